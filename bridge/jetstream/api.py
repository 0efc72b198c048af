"""The JetStream calls the bridge makes, what they answer, and its budget of consumers.

Everything goes through the bridge's one NATS connection as JetStream API
requests (``$JS.API.>``); browsers never see that API (it is denied to them).
Every call is counted by kind (``calls``, exported as
``bridge_jetstream_api_calls_total``), so what a request costs is measured,
not guessed.  The live feed of a stored pattern is feed.py; reading history,
reading.py.

Consumers are a shared, limited resource of the NATS account: a stream may
cap them (``max_consumers``) and every other application of the account needs
its own.  ``Consumers`` is the bridge's budget: at most ``MAX_JETSTREAM_CONSUMERS``
at once in this process, live feeds never past 80 % of it nor of a stream's
cap, history readers never past 90 %; the rest is never taken, so one
browser user can never use up what others (and other applications) need.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError

from bridge.core.subjects import pattern_within

logger = logging.getLogger(__name__)

NS = 1_000_000_000
HEARTBEAT = 5.0  # seconds between the server's idle heartbeats to a live feed
# An ephemeral consumer the bridge lost track of (a crash, a dropped link) is
# removed by the server after this long without interest.
LIVE_INACTIVE = 30.0
# A history reader waits while its client drains (history.read paces itself), so
# a slow client's reader must outlive a long pause; it is deleted once read.
READ_INACTIVE = 60.0
FETCH_BATCH = 256
# Bytes one history fetch may bring at most (raised to the server's largest
# message when that is bigger, or a large message could never be fetched).
# With FETCHES_IN_FLIGHT this bounds what history reads have in flight on the
# bridge's one NATS connection: past what it can take, nats-server cuts it
# off as a slow consumer, and every client loses messages.
FETCH_BYTES = 256 * 1024
FETCHES_IN_FLIGHT = 4
# A live feed keeps its latest message in memory up to this size (one per stored pattern).
LATEST_MAX_BYTES = 64 * 1024

# Error codes of the JetStream API that the bridge tells apart.
ERR_STREAM_NOT_FOUND = 10059
ERR_NO_MESSAGE = 10037
ERR_MAX_CONSUMERS = 10026

# Shares of a consumer cap (ours or a stream's) each use may reach.
FEED_SHARE = 0.8
READER_SHARE = 0.9


class JetStreamError(Exception):
    """A JetStream API call failed (not enabled, no such stream, timed out)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class BudgetError(JetStreamError):
    """No consumer may be made now: the bridge's or the stream's share is used up."""


@dataclass(frozen=True)
class StreamInfo:
    name: str
    subjects: tuple[str, ...]
    first_seq: int
    last_seq: int
    # Changes when the stream is deleted and recreated: its creation time.
    epoch: str
    # The stream's cap on consumers (-1: none) and how many it has.
    max_consumers: int = -1
    consumer_count: int = 0


def _stream_info(info: dict[str, Any]) -> StreamInfo:
    state, config = info.get("state") or {}, info.get("config") or {}
    return StreamInfo(
        name=str(config["name"]),
        subjects=tuple(config.get("subjects") or ()),
        first_seq=int(state.get("first_seq", 0)),
        last_seq=int(state.get("last_seq", 0)),
        epoch=str(info.get("created", "")),
        max_consumers=int(config.get("max_consumers", -1)),
        consumer_count=int(state.get("consumer_count", 0)),
    )


def storing(streams: list[StreamInfo], pattern: str) -> StreamInfo | None:
    """The stream that stores every subject ``pattern`` matches, or None.

    A pattern only partly inside a stream (``orders.>`` when the stream
    holds ``orders.new``) is not stored: history for it would be partial.
    """
    for stream in streams:
        if any(pattern_within(pattern, s) for s in stream.subjects):
            return stream
    return None


@dataclass(frozen=True)
class Delivery:
    """What JetStream's ``$JS.ACK`` reply subject says about a stored message."""

    stream_seq: int
    consumer_seq: int
    # When it was stored, in nanoseconds since the epoch.
    timestamp: int


def delivery(reply: str) -> Delivery | None:
    """The delivery facts of a stored message, or None for anything that is not one."""
    if not reply.startswith("$JS.ACK."):
        return None
    parts = reply.split(".")
    try:
        if len(parts) == 9:  # $JS.ACK.stream.consumer.delivered.sseq.dseq.ts.pending
            return Delivery(int(parts[5]), int(parts[6]), int(parts[7]))
        if len(parts) >= 11:  # with domain and account hash
            return Delivery(int(parts[7]), int(parts[8]), int(parts[9]))
    except ValueError:
        return None
    return None


def stream_sequence(reply: str) -> tuple[int, int] | None:
    """(stream sequence, consumer sequence) from a JetStream delivery's ``$JS.ACK`` reply subject."""
    found = delivery(reply)
    return (found.stream_seq, found.consumer_seq) if found is not None else None


@functools.lru_cache(maxsize=4)
def _utc_second(seconds: int) -> str:
    # Cached: the messages of one second share their date text (this runs per stored message).
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def rfc3339(timestamp_ns: int) -> str:
    """A JetStream timestamp as RFC 3339 in UTC, written exactly as JetStream's own API writes it
    (Go's RFC3339Nano: no trailing zeros in the fraction), so that a message's ``time`` is the same
    string whichever way it was read (a live feed, a reader, a message get)."""
    seconds, nanos = divmod(timestamp_ns, NS)
    fraction = f".{nanos:09d}".rstrip("0") if nanos else ""
    return f"{_utc_second(seconds)}{fraction}Z"


def parse_headers(raw: bytes) -> dict[str, str] | None:
    """A stored message's header block (``NATS/1.0\\r\\nK: V\\r\\n...``) as nats-py would give it."""
    lines = raw.decode("utf-8", "replace").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip():
            headers[name.strip()] = value.strip()
    return headers or None


@dataclass(frozen=True)
class Stored:
    """A stored message read from a stream: the message, its sequence and its time."""

    msg: Msg
    seq: int
    time: str


def stored_from_delivery(msg: Msg) -> Stored | None:
    found = delivery(msg.reply or "")
    if found is None:
        return None
    return Stored(msg, found.stream_seq, rfc3339(found.timestamp))


class Consumers:
    """The bridge's consumer budget (``MAX_JETSTREAM_CONSUMERS``): feeds and readers held now."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.feeds = 0
        self.readers = 0
        # Consumers this process made on each stream since its count was last read
        # (a stream's consumer_count comes from the listing made for the request).
        self._made: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return self.feeds + self.readers

    def check(self, kind: str, stream: StreamInfo | None) -> None:
        """BudgetError saying why, if a consumer of ``kind`` ("feed" or "reader") may not be made now."""
        share = FEED_SHARE if kind == "feed" else READER_SHARE
        if self.total + 1 > int(self.limit * share):
            raise BudgetError(f"the bridge already holds {self.total} JetStream consumers "
                              f"(MAX_JETSTREAM_CONSUMERS={self.limit})", ERR_MAX_CONSUMERS)
        if stream is not None and stream.max_consumers > 0:
            count = stream.consumer_count + self._made[stream.name]
            if count + 1 > int(stream.max_consumers * share):
                raise BudgetError(f"stream {stream.name} has {count} of its {stream.max_consumers} "
                                  "consumers in use; the rest are kept for others", ERR_MAX_CONSUMERS)

    def made(self, kind: str, stream: str) -> None:
        if kind == "feed":
            self.feeds += 1
        else:
            self.readers += 1
        self._made[stream] += 1

    def gone(self, kind: str, stream: str) -> None:
        if kind == "feed":
            self.feeds -= 1
        else:
            self.readers -= 1
        if self._made[stream] > 0:
            self._made[stream] -= 1

    def listed(self) -> None:
        """The streams were just listed: their consumer counts include ours again."""
        self._made.clear()


class JetStream:
    """The JetStream API over the bridge's NATS connection."""

    def __init__(self, nats_client: Callable[[], NATS | None], timeout: float = 5.0,
                 max_consumers: int = 500) -> None:
        self._nats = nats_client
        self.timeout = timeout
        self.consumers = Consumers(max_consumers)
        # API calls made, by kind (STREAM.LIST, CONSUMER.CREATE, ...).
        self.calls: Counter[str] = Counter()
        self._fetches = asyncio.Semaphore(FETCHES_IN_FLIGHT)
        # Clean-ups nobody waits for, kept so they are not collected half-way.
        self._background: set[asyncio.Task[None]] = set()

    def in_background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _nc(self) -> NATS:
        nc = self._nats()
        if nc is None:
            raise JetStreamError("not connected to NATS")
        return nc

    def _count(self, subject: str) -> None:
        tokens = subject.split(".")
        # STREAM.MSG.GET.<stream> and CONSUMER.MSG.NEXT.<stream>.<consumer> name three tokens.
        self.calls[".".join(tokens[:3] if tokens[1:2] == ["MSG"] else tokens[:2])] += 1

    async def api(self, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        payload = json.dumps(body).encode() if body is not None else b""
        self._count(subject)
        try:
            msg = await self._nc().request(f"$JS.API.{subject}", payload, timeout=self.timeout)
        except NoRespondersError:
            raise JetStreamError("JetStream is not enabled on the NATS server") from None
        except (TimeoutError, NatsError, OSError) as exc:
            raise JetStreamError(f"JetStream did not answer: {exc or type(exc).__name__}") from None
        try:
            answer = json.loads(msg.data)
        except ValueError:
            raise JetStreamError("JetStream answered something that is not JSON") from None
        if not isinstance(answer, dict):
            raise JetStreamError("JetStream answered something that is not a JSON object")
        if "error" in answer:
            error = answer["error"] if isinstance(answer["error"], dict) else {}
            code = error.get("err_code", 0)
            raise JetStreamError(f"{error.get('description', 'error')} ({code or '?'})",
                                 code if isinstance(code, int) else 0)
        return answer

    async def streams(self) -> list[StreamInfo]:
        """Every stream of the account, with its state: one call per 256 streams."""
        found: list[StreamInfo] = []
        offset = 0
        while True:
            answer = await self.api("STREAM.LIST", {"offset": offset})
            page = answer.get("streams") or []
            for info in page:
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    found.append(_stream_info(info))
            offset += len(page)
            if not page or offset >= int(answer.get("total", 0)):
                break
        self.consumers.listed()
        return found

    async def create_consumer(self, stream: StreamInfo, kind: str, config: dict[str, Any]) -> dict[str, Any]:
        """A consumer within the budget; BudgetError when none may be made now."""
        self.consumers.check(kind, stream)
        body = {"stream_name": stream.name, "config": config}
        answer = await self.api(f"CONSUMER.CREATE.{stream.name}", body)
        self.consumers.made(kind, stream.name)
        return answer

    async def delete_consumer(self, stream: str, kind: str, name: str) -> None:
        self.consumers.gone(kind, stream)
        with contextlib.suppress(JetStreamError):
            await self.api(f"CONSUMER.DELETE.{stream}.{name}")

    async def reader(self, stream: StreamInfo, pattern: str, start: dict[str, Any]) -> tuple[str, int]:
        """An ephemeral pull consumer over ``pattern`` from ``start`` (a deliver policy and its
        options); its name and how many messages it has pending."""
        config = {"ack_policy": "none", "filter_subject": pattern, "mem_storage": True, "num_replicas": 1,
                  "inactive_threshold": int(READ_INACTIVE * NS), **start}
        info = await self.create_consumer(stream, "reader", config)
        return str(info["name"]), int(info.get("num_pending", 0))

    def drop_reader(self, stream: str, name: str) -> None:
        self.in_background(self.delete_consumer(stream, "reader", name))

    async def last_message(self, stream: str, pattern: str) -> Stored | None:
        """The latest stored message matching ``pattern``: one call, no consumer."""
        try:
            answer = await self.api(f"STREAM.MSG.GET.{stream}", {"last_by_subj": pattern})
        except JetStreamError as exc:
            if exc.code == ERR_NO_MESSAGE:
                return None
            raise
        return self._stored(answer)

    def _stored(self, answer: dict[str, Any]) -> Stored:
        message = answer.get("message")
        try:
            raw_headers = base64.b64decode(message.get("hdrs") or "")  # type: ignore[union-attr]
            msg = Msg(self._nc(), subject=str(message["subject"]),  # type: ignore[index]
                      data=base64.b64decode(message.get("data") or ""),  # type: ignore[union-attr]
                      headers=parse_headers(raw_headers) if raw_headers else None)
            return Stored(msg, int(message["seq"]), str(message["time"]))  # type: ignore[index]
        except (AttributeError, KeyError, TypeError, ValueError):
            raise JetStreamError("JetStream answered a message get without a message") from None

    async def fetch(self, stream: str, consumer: str, batch: int) -> list[Stored]:
        """Up to ``batch`` stored messages from a pull consumer, without waiting for new ones.

        Bounded in bytes (``FETCH_BYTES``) and in how many fetches run at once, so
        history reads, however many and however large, never flood the bridge's
        NATS connection.
        """
        nc = self._nc()
        max_bytes = max(FETCH_BYTES, nc.max_payload + 4096)
        async with self._fetches:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            try:
                request = json.dumps({"batch": batch, "no_wait": True, "max_bytes": max_bytes}).encode()
                self.calls["CONSUMER.MSG.NEXT"] += 1
                await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}", request, reply=inbox)
                got: list[Stored] = []
                while len(got) < batch:
                    try:
                        msg = await sub.next_msg(timeout=self.timeout)
                    except (TimeoutError, NatsError) as exc:
                        what = exc or type(exc).__name__
                        raise JetStreamError(f"reading {stream} timed out: {what}") from None
                    stored = stored_from_delivery(msg)
                    if stored is None:
                        # The server's own status (404 no messages, 408 expired, 409 max
                        # bytes): this fetch is over.  A stored message is never taken for
                        # one, whatever headers it carries.
                        break
                    got.append(stored)
                return got
            finally:
                await sub.unsubscribe()

    async def ensure_stream(self, name: str, subjects: list[str], max_msgs: int, max_age: float) -> bool:
        """Create the stream unless it exists (an existing one is left as it is); True if created."""
        try:
            await self.api(f"STREAM.INFO.{name}")
            return False
        except JetStreamError as exc:
            if exc.code != ERR_STREAM_NOT_FOUND:
                raise
        await self.api(f"STREAM.CREATE.{name}", {
            "name": name, "subjects": subjects, "max_msgs": max_msgs, "max_age": int(max_age * NS),
            "storage": "file", "num_replicas": 1, "discard": "old",
        })
        return True


def start_after(seq: int) -> dict[str, Any]:
    return {"deliver_policy": "by_start_sequence", "opt_start_seq": seq + 1}


def start_at_time(when: dt.datetime) -> dict[str, Any]:
    return {"deliver_policy": "by_start_time", "opt_start_time": when.isoformat().replace("+00:00", "Z")}
