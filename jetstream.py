"""The JetStream calls the bridge makes, and its live feed of a stored pattern.

Everything goes through the bridge's one NATS connection as JetStream API
requests (``$JS.API.>``); browsers never see that API (it is denied to them).

``LiveFeed`` is an ordered push consumer written here rather than nats-py's
``ordered_consumer=True``: nats-py 2.6 never stops that mode's heartbeat and
flow-control tasks when the subscription is dropped, and the heartbeat task
then "resets" the consumer, quietly re-subscribing a feed nobody wants.  The
bridge drops feeds whenever the last client of a pattern leaves, so it needs
one that stops for good.  What it guarantees: every message of the pattern,
with its stream sequence, in order, none twice, across gaps (a missed
delivery is detected by the consumer sequence and the feed restarts right
after the last stream sequence it delivered) and across the loss of the
consumer itself (heartbeats stop; a watchdog restarts it the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError

from subjects import pattern_within

logger = logging.getLogger(__name__)

NS = 1_000_000_000
HEARTBEAT = 5.0  # seconds between the server's idle heartbeats to a live feed
# An ephemeral consumer the bridge lost track of (a crash, a dropped link) is
# removed by the server after this long without interest.
LIVE_INACTIVE = 30.0
READ_INACTIVE = 5.0
FETCH_BATCH = 256


class JetStreamError(Exception):
    """A JetStream API call failed (not enabled, no such stream, timed out)."""


@dataclass(frozen=True)
class StreamInfo:
    name: str
    subjects: tuple[str, ...]
    first_seq: int
    last_seq: int
    # Changes when the stream is deleted and recreated: its creation time.
    epoch: str


def _stream_info(info: dict[str, Any]) -> StreamInfo:
    state, config = info.get("state", {}), info.get("config", {})
    return StreamInfo(
        name=config["name"],
        subjects=tuple(config.get("subjects") or ()),
        first_seq=int(state.get("first_seq", 0)),
        last_seq=int(state.get("last_seq", 0)),
        epoch=str(info.get("created", "")),
    )


def stream_sequence(reply: str) -> tuple[int, int] | None:
    """(stream sequence, consumer sequence) from a JetStream delivery's ``$JS.ACK`` reply subject."""
    parts = reply.split(".")
    if len(parts) == 9 and parts[1] == "ACK":  # $JS.ACK.stream.consumer.delivered.sseq.dseq.ts.pending
        return int(parts[5]), int(parts[6])
    if len(parts) >= 11 and parts[1] == "ACK":  # with domain and account hash
        return int(parts[7]), int(parts[8])
    return None


class JetStream:
    """The JetStream API over the bridge's NATS connection."""

    def __init__(self, nats_client: Callable[[], NATS | None], timeout: float = 5.0) -> None:
        self._nats = nats_client
        self._timeout = timeout
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

    async def api(self, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        payload = json.dumps(body).encode() if body is not None else b""
        try:
            msg = await self._nc().request(f"$JS.API.{subject}", payload, timeout=self._timeout)
        except NoRespondersError:
            raise JetStreamError("JetStream is not enabled on the NATS server") from None
        except (TimeoutError, NatsError, OSError) as exc:
            raise JetStreamError(f"JetStream did not answer: {exc or type(exc).__name__}") from None
        answer = json.loads(msg.data)
        if "error" in answer:
            error = answer["error"]
            raise JetStreamError(f"{error.get('description', 'error')} ({error.get('err_code', '?')})")
        return answer

    async def stream_storing(self, pattern: str) -> StreamInfo | None:
        """The stream that stores every subject ``pattern`` matches, or None.

        A pattern only partly inside a stream (``orders.>`` when the stream
        holds ``orders.new``) is not stored: history for it would be partial.
        """
        try:
            answer = await self.api("STREAM.LIST", {"subject": pattern})
        except JetStreamError as exc:
            logger.debug("no stream lookup for %s: %s", pattern, exc)
            return None
        for info in answer.get("streams") or ():
            stream = _stream_info(info)
            if any(pattern_within(pattern, s) for s in stream.subjects):
                return stream
        return None

    async def stream_info(self, name: str) -> StreamInfo:
        return _stream_info(await self.api(f"STREAM.INFO.{name}"))

    async def create_consumer(self, stream: str, config: dict[str, Any]) -> dict[str, Any]:
        return await self.api(f"CONSUMER.CREATE.{stream}", {"stream_name": stream, "config": config})

    async def delete_consumer(self, stream: str, name: str) -> None:
        with contextlib.suppress(JetStreamError):
            await self.api(f"CONSUMER.DELETE.{stream}.{name}")

    async def reader(self, stream: str, pattern: str, start: dict[str, Any]) -> tuple[str, int]:
        """An ephemeral pull consumer over ``pattern`` from ``start`` (a deliver policy and its
        options); its name and how many messages it has pending."""
        config = {"ack_policy": "none", "filter_subject": pattern, "mem_storage": True, "num_replicas": 1,
                  "inactive_threshold": int(READ_INACTIVE * NS), **start}
        info = await self.create_consumer(stream, config)
        return info["name"], int(info.get("num_pending", 0))

    async def fetch(self, stream: str, consumer: str, batch: int) -> list[Msg]:
        """Up to ``batch`` messages from a pull consumer, without waiting for new ones."""
        nc = self._nc()
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        try:
            request = json.dumps({"batch": batch, "no_wait": True}).encode()
            await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}", request, reply=inbox)
            msgs: list[Msg] = []
            while len(msgs) < batch:
                try:
                    msg = await sub.next_msg(timeout=self._timeout)
                except (TimeoutError, NatsError) as exc:
                    raise JetStreamError(f"reading {stream} timed out: {exc or type(exc).__name__}") from None
                if msg.headers and msg.headers.get("Status"):
                    break  # 404 no messages, 408 request expired: that is all there is
                msgs.append(msg)
            return msgs
        finally:
            await sub.unsubscribe()

    async def ensure_stream(self, name: str, subjects: list[str], max_msgs: int, max_age: float) -> bool:
        """Create the stream unless it exists (an existing one is left as it is); True if created."""
        try:
            await self.api(f"STREAM.INFO.{name}")
            return False
        except JetStreamError as exc:
            if "10059" not in str(exc):  # stream not found
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


class LiveFeed:
    """A shared live subscription to a stored pattern: every message once, in order, with its sequence."""

    def __init__(self, js: JetStream, nats_client: Callable[[], NATS | None], stream: str, pattern: str,
                 on_message: Callable[[Msg, int], None]) -> None:
        self._js = js
        self._nats = nats_client
        self.stream = stream
        self.pattern = pattern
        self._on_message = on_message
        self._sub: Subscription | None = None
        self._consumer: str | None = None
        self._generation = 0
        self._expected = 1  # the next consumer sequence
        self.last_seq = 0  # the last stream sequence delivered
        self.last_activity = time.monotonic()
        self._restarting: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        """Subscribe from the next message stored; raises JetStreamError if the consumer cannot be made."""
        await self._open({"deliver_policy": "new"})

    async def _open(self, start: dict[str, Any]) -> None:
        nc = self._nats()
        if nc is None:
            raise JetStreamError("not connected to NATS")
        self._generation += 1
        generation = self._generation
        inbox = nc.new_inbox()
        old_sub, old_consumer = self._sub, self._consumer
        # Subscribe before the consumer exists: its first delivery must find us.
        self._sub = await nc.subscribe(inbox, cb=self._callback(generation))
        self._expected = 1
        config = {"deliver_subject": inbox, "ack_policy": "none", "filter_subject": self.pattern,
                  "flow_control": True, "idle_heartbeat": int(HEARTBEAT * NS), "mem_storage": True,
                  "num_replicas": 1, "inactive_threshold": int(LIVE_INACTIVE * NS), **start}
        try:
            info = await self._js.create_consumer(self.stream, config)
        except JetStreamError:
            with contextlib.suppress(NatsError):
                await self._sub.unsubscribe()
            self._sub = old_sub
            raise
        self._consumer = info["name"]
        if start.get("deliver_policy") == "new":
            # Where "new" began: a restart goes on from right after it.
            self.last_seq = int(info.get("delivered", {}).get("stream_seq", 0))
        self.last_activity = time.monotonic()
        if old_sub is not None:
            with contextlib.suppress(NatsError):
                await old_sub.unsubscribe()
        if old_consumer is not None:
            await self._js.delete_consumer(self.stream, old_consumer)

    def _callback(self, generation: int) -> Callable[[Msg], Any]:
        async def on_delivery(msg: Msg) -> None:
            if generation != self._generation or self._stopped:
                return  # a replaced consumer's last words
            self.last_activity = time.monotonic()
            headers = msg.headers
            if headers and headers.get("Status") == "100":
                await self._control(msg)
                return
            seqs = stream_sequence(msg.reply or "")
            if seqs is None:
                return
            sseq, dseq = seqs
            if dseq != self._expected:
                # A delivery went missing (or came twice): start again right
                # after the last one delivered, so nothing is lost or doubled.
                self.restart_soon(f"consumer sequence {dseq}, expected {self._expected}")
                return
            self._expected = dseq + 1
            self.last_seq = sseq
            self._on_message(msg, sseq)

        return on_delivery

    async def _control(self, msg: Msg) -> None:
        headers = msg.headers or {}
        nc = self._nats()
        if nc is None:
            return
        if "FlowControl" in headers.get("Description", "") and msg.reply:
            # Every earlier delivery has been handed on (this callback runs in order).
            await nc.publish(msg.reply, b"")
            return
        stalled = headers.get("Nats-Consumer-Stalled")
        if stalled:
            await nc.publish(stalled, b"")
        last = headers.get("Nats-Last-Consumer")
        if last is not None and int(last) != self._expected - 1:
            self.restart_soon(f"heartbeat says {last} delivered, we have {self._expected - 1}")

    def restart_soon(self, why: str) -> None:
        if self._stopped or (self._restarting is not None and not self._restarting.done()):
            return
        logger.info("live feed %s on %s restarts after %d: %s", self.pattern, self.stream, self.last_seq, why)
        self._restarting = asyncio.create_task(self._restart())

    async def _restart(self) -> None:
        try:
            await self._open(start_after(self.last_seq))
        except (JetStreamError, NatsError, OSError) as exc:
            # The watchdog tries again after the next quiet spell.
            logger.warning("live feed %s on %s could not restart: %s", self.pattern, self.stream, exc)

    def check(self, now: float) -> None:
        """Watchdog: no delivery and no heartbeat for two heartbeats means the consumer is gone."""
        nc = self._nats()
        if nc is not None and nc.is_connected and now - self.last_activity > 2 * HEARTBEAT + 1:
            self.last_activity = now
            self.restart_soon("no heartbeat")

    async def stop(self) -> None:
        self._stopped = True
        if self._restarting is not None:
            self._restarting.cancel()
        if self._sub is not None:
            with contextlib.suppress(NatsError):
                await self._sub.unsubscribe()
        nc = self._nats()
        if self._consumer is not None and nc is not None and nc.is_connected:
            # Not awaited: the server removes it anyway once nobody listens.
            self._js.in_background(self._js.delete_consumer(self.stream, self._consumer))
