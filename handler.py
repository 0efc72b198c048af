"""WSSManager: maps each WebSocket client's subscribe/unsubscribe frames onto NATS.

Design in one paragraph: every distinct subject pattern has exactly one NATS
subscription (a ``Topic``), shared by every client that asked for it; the first
client creates it and the last one to leave removes it.  A NATS message is turned
into its JSON frame once, in the subscription's callback, and the same bytes are
appended to each interested client's bounded outbound queue.  Each client has one
writer task that drains its queue onto its socket, so a slow socket only ever
stalls its own writer.  A client whose queue passes its bound is disconnected
with close code 1013 (or, by policy, loses its oldest frames and is told so).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import secrets
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.http_websocket import WSCloseCode
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1

# Close codes (RFC 6455 section 7.4.1).
CLOSE_GOING_AWAY = int(WSCloseCode.GOING_AWAY)  # 1001: server shutting down
CLOSE_POLICY_VIOLATION = int(WSCloseCode.POLICY_VIOLATION)  # 1008: kept flooding
CLOSE_TRY_AGAIN_LATER = int(WSCloseCode.TRY_AGAIN_LATER)  # 1013: slow consumer
CLOSE_INTERNAL_ERROR = int(WSCloseCode.INTERNAL_ERROR)  # 1011

OVERFLOW_DISCONNECT = "disconnect"
OVERFLOW_DROP_OLDEST = "drop_oldest"

# The example's exact strings are part of the wire protocol.
MSG_CONNECTED = "Successfully connected"
MSG_SUBJECTS_REQUIRED = "subjects required"


def msg_bad_action(action: Any) -> str:
    return (
        "The user has to specify action in message ('subscribe' or 'unsubscribe'), "
        f"got {action} instead"
    )


def msg_subscribed(subjects: list[str]) -> str:
    # str(list)[1:-1] is the example's formatting: 'a', 'b'
    return f"Successfully connected to events: {str(subjects)[1:-1]}"


def msg_unsubscribed(subject: str) -> str:
    return f"Successfully unsubscribed from event: {subject}"


def msg_not_subscribed(subject: str) -> str:
    return f"The user did not subscribe to event {subject}"


# ---------------------------------------------------------------------------
# Subjects
# ---------------------------------------------------------------------------


def subject_error(subject: str, max_length: int, wildcards: bool = True) -> str | None:
    """Why ``subject`` is not a valid NATS subject, or None if it is.

    Checked here, before NATS sees it, because nats-server answers an invalid
    SUB with -ERR and drops the whole connection: one bad browser frame would
    otherwise cut every client off.
    """
    if not subject:
        return "Invalid subject '': must not be empty"
    try:
        encoded = subject.encode()
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape
        return f"Invalid subject {subject!r}: not valid Unicode"
    if len(encoded) > max_length:
        return f"Invalid subject: longer than {max_length} bytes"
    for ch in subject:
        if ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F:
            return f"Invalid subject {subject!r}: whitespace and control characters are not allowed"
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        if token == "":
            return f"Invalid subject {subject!r}: empty token"
        if token in ("*", ">") and not wildcards:
            return f"Invalid subject {subject!r}: wildcards are not allowed here"
        if token == ">":
            if i != len(tokens) - 1:
                return f"Invalid subject {subject!r}: '>' is only allowed as the last token"
        elif token != "*" and ("*" in token or ">" in token):
            return f"Invalid subject {subject!r}: wildcards must be a whole token"
    return None


def subject_matches(pattern: str, subject: str) -> bool:
    """Does the concrete ``subject`` match ``pattern`` (NATS wildcard rules)?"""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def pattern_within(inner: str, outer: str) -> bool:
    """Is every subject that ``inner`` matches also matched by ``outer``?"""
    p, q = inner.split("."), outer.split(".")
    for i, token in enumerate(p):
        if i >= len(q):
            return False
        if q[i] == ">":
            return True
        if token == ">" or (q[i] != "*" and (token == "*" or token != q[i])):
            return False
    return len(p) == len(q)


def patterns_overlap(a: str, b: str) -> bool:
    """Is there a subject that both patterns match?"""
    p, q = a.split("."), b.split(".")
    for i in range(min(len(p), len(q))):
        if p[i] == ">" or q[i] == ">":
            return True
        if p[i] != "*" and q[i] != "*" and p[i] != q[i]:
            return False
    return len(p) == len(q)


DEFAULT_DENY = ("$SYS.>", "$JS.>", "$KV.>", "$O.>", "_INBOX.>")


@dataclass(frozen=True)
class SubjectPolicy:
    """Which subjects browsers may follow and publish to."""

    allow: tuple[str, ...] = (">",)
    deny: tuple[str, ...] = DEFAULT_DENY
    publish_allow: tuple[str, ...] = ()

    def refusal(self, pattern: str) -> str | None:
        """Why a subscription to ``pattern`` is refused, or None."""
        if any(pattern_within(pattern, d) for d in self.deny):
            return f"Subject {pattern!r} is not allowed: it only matches denied subjects"
        if not any(patterns_overlap(pattern, a) for a in self.allow):
            return f"Subject {pattern!r} is not allowed: it matches no allowed subject"
        return None

    def needs_filter(self, pattern: str) -> bool:
        """Can ``pattern`` deliver a subject the policy forbids (so each must be checked)?"""
        return any(patterns_overlap(pattern, d) for d in self.deny) or not any(
            pattern_within(pattern, a) for a in self.allow
        )

    def permits(self, subject: str) -> bool:
        return any(subject_matches(a, subject) for a in self.allow) and not any(
            subject_matches(d, subject) for d in self.deny
        )

    def publish_refusal(self, subject: str) -> str | None:
        if not self.publish_allow:
            return "Publishing is disabled on this bridge"
        if not any(subject_matches(p, subject) for p in self.publish_allow) or not self.permits(subject):
            return f"Publishing to {subject!r} is not allowed"
        return None


# ---------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are accepted by json.loads but are not JSON: a browser's
    # JSON.parse would choke on the frame, so such payloads travel as text.
    raise ValueError(name)


def encode_nats_message(msg: Msg) -> bytes:
    """The UTF-8 JSON frame for one NATS message, built once and shared by all clients.

    A JSON payload is spliced in verbatim (after validation) rather than
    re-serialised: cheaper, and big integers or exact float spellings survive.
    """
    head = '{"subject":' + json.dumps(msg.subject, ensure_ascii=False)
    payload = msg.data
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        body = ',"data":"' + base64.b64encode(payload).decode("ascii") + '","encoding":"base64"'
    else:
        try:
            json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            body = ',"data":' + json.dumps(text, ensure_ascii=False)
        else:
            body = ',"data":' + text.strip()
    extra = ""
    if msg.headers:
        extra += ',"headers":' + json.dumps(msg.headers, ensure_ascii=False)
    if msg.reply:
        extra += ',"reply":' + json.dumps(msg.reply, ensure_ascii=False)
    return (head + body + extra + "}").encode("utf-8")


WRITE_BATCH_BYTES = 256 * 1024


def text_frame(payload: bytes) -> bytes:
    """A complete server-to-client WebSocket text frame (RFC 6455 5.2; servers never mask)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


def close_frame(code: int, reason: bytes) -> bytes:
    payload = struct.pack("!H", code) + reason
    return bytes((0x88, len(payload))) + payload


def dump(frame: dict[str, Any]) -> bytes:
    try:
        return json.dumps(frame, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate echoed from the client (an id, an action) is not
        # UTF-8; as a \u escape it is still valid JSON in a valid text frame.
        return json.dumps(frame).encode("ascii")


def reply(success: bool, message: str, request_id: Any = None, **extra: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"success": success, "message": message, "type": "reply"}
    if request_id is not None:
        frame["id"] = request_id
    frame.update(extra)
    return frame


class BadFrame(Exception):
    """A control frame we answer with an error reply; ``kind`` labels the metric."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


# ---------------------------------------------------------------------------
# Limits and counters
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Per-client limits; see the settings table in README.md."""

    queue_messages: int = 10_000
    queue_bytes: int = 8 * 1024 * 1024
    overflow: str = OVERFLOW_DISCONNECT
    max_subject_length: int = 256
    max_subscriptions: int = 100
    max_subjects_per_request: int = 50
    control_rate: float = 20.0
    # Rejected frames (leaking one per second) before a flooding client is closed.
    control_strikes: int = 10
    max_publish_bytes: int = 64 * 1024
    close_timeout: float = 5.0
    flush_delay: float = 0.0


@dataclass
class Stats:
    """Plain counters, cheap on the hot path; exported by metrics.py at scrape time."""

    messages_received: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0
    dropped: int = 0
    filtered: int = 0
    slow_consumer_disconnects: int = 0
    rate_limit_disconnects: int = 0
    published: int = 0
    connections_opened: int = 0
    bad_frames: Counter[str] = field(default_factory=Counter)


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------


class Flusher:
    """Writes each client's gathered frames once per event-loop turn.

    With a delay, writes happen at most once per ``delay`` seconds: the first
    frame after a quiet spell still goes out at once, but under sustained
    traffic frames are gathered, trading up to ``delay`` of latency for fewer
    writes (each write to a socket is a syscall, most of the bridge's cost).
    """

    def __init__(self, delay: float = 0.0) -> None:
        self._delay = delay
        self._dirty: list[Client] = []
        self._scheduled = False
        self._last_run = float("-inf")

    def mark(self, client: Client) -> None:
        self._dirty.append(client)
        if not self._scheduled:
            self._scheduled = True
            loop = asyncio.get_running_loop()
            due = self._last_run + self._delay
            if self._delay and due > loop.time():
                loop.call_at(due, self._run)
            else:
                loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        if self._delay:
            self._last_run = asyncio.get_running_loop().time()
        dirty, self._dirty = self._dirty, []
        for client in dirty:
            try:
                client.flush()
            except Exception:
                # Per-client boundary: one broken connection must not stop the
                # flush for everyone after it in this turn.
                logger.exception("flush to client %s failed; closing it", client.id)
                client.close_soon(CLOSE_INTERNAL_ERROR, "internal error")


class Client:
    """One WebSocket connection: its subscriptions and its bounded outbound queue.

    Frames go straight into the socket's transport while it accepts them; only
    when the transport is paused (the peer reads slower than we send) do they
    wait in this client's bounded queue, which its writer task drains.
    """

    # Slots: one of these per connection, and there may be tens of thousands.
    __slots__ = (
        "_closer", "_closing", "_flusher", "_limits", "_pending", "_protocol", "_queue", "_queued_bytes",
        "_stats", "_stream", "_strikes", "_strikes_at", "_tokens", "_tokens_at", "_transport",
        "_unreported_drops", "_writer", "close_code", "dropped", "id", "opened", "peer", "sent",
        "subjects", "ws",
    )

    def __init__(
        self, request: web.Request, ws: web.WebSocketResponse, limits: Limits, stats: Stats, flusher: Flusher
    ) -> None:
        # 128 bits from the CSPRNG: the id doubles as the capability that lets a
        # backend subscribe this client over HTTP, so it must not be guessable.
        self.id = secrets.token_urlsafe(16)
        self.ws = ws
        self.peer = request.remote or "?"
        self.subjects: set[str] = set()
        self.opened = time.monotonic()
        self.sent = 0
        self.dropped = 0
        self.close_code: int | None = None
        self._limits = limits
        self._stats = stats
        # Writing frames to the transport ourselves (rather than ws.send_*) lets
        # one prebuilt frame serve every client; compression is off, and each
        # write is a whole frame, so aiohttp's own pings and close interleave safely.
        transport = request.transport
        assert transport is not None, "the WebSocket must be prepared first"
        self._transport = transport
        self._protocol = request.protocol
        self._stream = request.writer
        self._flusher = flusher
        # Frames of this event-loop turn, written together by the Flusher.  At
        # most one NATS read's worth (nats-py reads in bounded chunks) before
        # the bound below applies.
        self._pending: list[bytes] = []
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._unreported_drops = 0
        self._closing = False
        # Token bucket for control frames, and a leaky count of rejected ones.
        self._tokens = max(1.0, limits.control_rate)
        self._tokens_at = self.opened
        self._strikes = 0.0
        self._strikes_at = self.opened
        # Started only while the peer lags (see _enqueue): an idle or keeping-up
        # client costs no task, which matters at tens of thousands of connections.
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None

    @property
    def closing(self) -> bool:
        return self._closing

    def send(self, frame: bytes) -> None:
        """Send a complete WebSocket frame; never blocks.

        Frames are gathered until the end of this event-loop turn and then
        written together: a burst from NATS costs this client one write, not
        one per message.  Order is kept because every frame takes this path.
        """
        if self._closing:
            return
        if not self._pending:
            self._flusher.mark(self)
        self._pending.append(frame)

    def flush(self) -> None:
        """Write what this turn gathered, or queue it if the peer is lagging."""
        frames, self._pending = self._pending, []
        if self._closing or not frames:
            return
        if not self._queue and not self._protocol.writing_paused:
            if self._transport.is_closing():
                self._closing = True
                return
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            self._transport.write(data)
            self.sent += len(frames)
            self._stats.frames_sent += len(frames)
            self._stats.bytes_sent += len(data)
            return
        for frame in frames:
            self._enqueue(frame)
            if self._closing:
                return

    def _enqueue(self, frame: bytes) -> None:
        """Past the bound, the overflow policy applies."""
        size = len(frame)
        limits = self._limits
        if len(self._queue) >= limits.queue_messages or self._queued_bytes + size > limits.queue_bytes:
            if limits.overflow == OVERFLOW_DROP_OLDEST:
                self._drop_oldest(size)
            else:
                logger.warning(
                    "client %s (%s) is a slow consumer: %d frames / %d bytes queued; disconnecting",
                    self.id, self.peer, len(self._queue), self._queued_bytes,
                )
                self._stats.slow_consumer_disconnects += 1
                self.close_soon(CLOSE_TRY_AGAIN_LATER, "slow consumer: outbound queue full")
                return
        if size > limits.queue_bytes:  # can never fit, even in an empty queue
            self._count_drops(1)
            return
        self._queue.append(frame)
        self._queued_bytes += size
        self._start_writer()

    def _start_writer(self) -> None:
        if self._writer is None and not self._closing:
            self._writer = asyncio.create_task(self._write_queue(), name=f"ws-writer-{self.id}")

    def _drop_oldest(self, incoming: int) -> None:
        queue, limits = self._queue, self._limits
        dropped = 0
        while queue and (
            len(queue) >= limits.queue_messages or self._queued_bytes + incoming > limits.queue_bytes
        ):
            self._queued_bytes -= len(queue.popleft())
            dropped += 1
        self._count_drops(dropped)

    def _count_drops(self, n: int) -> None:
        self.dropped += n
        self._unreported_drops += n
        self._stats.dropped += n
        self._start_writer()

    def send_json(self, frame: dict[str, Any]) -> None:
        self.send(text_frame(dump(frame)))

    async def _write_queue(self) -> None:
        """Drain the queue as the peer takes it; ends when the queue is empty."""
        try:
            await self._drain_queue()
        finally:
            self._writer = None

    async def _drain_queue(self) -> None:
        queue, stats, transport = self._queue, self._stats, self._transport
        while queue or self._unreported_drops:
            # Wait until the peer has taken what the transport holds.  Shielded:
            # aiohttp shares one drain future per connection, and cancelling
            # this task must not cancel it under ws.close().  The inner task
            # may outlive us and fail on a reset; its error is read, not leaked.
            drain = asyncio.ensure_future(self._stream.drain())
            drain.add_done_callback(_consume_result)
            await asyncio.shield(drain)
            if transport.is_closing():
                # The peer is gone; the connection handler's finally
                # releases its subscriptions.  Stop queueing for it.
                self._closing = True
                queue.clear()
                self._queued_bytes = 0
                return
            batch: list[bytes] = []
            if self._unreported_drops:
                # Told at the point of the gap, so the client knows where it is.
                n, self._unreported_drops = self._unreported_drops, 0
                batch.append(text_frame(dump(
                    {"success": False, "type": "dropped", "dropped": n,
                     "message": f"{n} messages dropped: this client reads too slowly"}
                )))
            size = 0
            # One write for many frames: fewer syscalls for a client catching up.
            while queue and size < WRITE_BATCH_BYTES:
                frame = queue.popleft()
                self._queued_bytes -= len(frame)
                size += len(frame)
                batch.append(frame)
            data = b"".join(batch)
            transport.write(data)
            self.sent += len(batch)
            stats.frames_sent += len(batch)
            stats.bytes_sent += len(data)

    # -- control-frame rate ----------------------------------------------------

    def take_control_token(self) -> bool:
        """True if this control frame is within the client's rate."""
        rate = self._limits.control_rate
        now = time.monotonic()
        # The bucket holds at least one token, so rates below 1/s still allow frames.
        self._tokens = min(max(1.0, rate), self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def strike(self) -> bool:
        """Count a rejected frame; True once the client has earned a disconnect."""
        now = time.monotonic()
        self._strikes = max(0.0, self._strikes - (now - self._strikes_at)) + 1
        self._strikes_at = now
        return self._strikes >= self._limits.control_strikes

    # -- closing ---------------------------------------------------------------

    def close_soon(self, code: int, reason: str) -> None:
        """Start closing from synchronous code (a NATS callback, a fan-out loop)."""
        if self._closing:
            return
        self._closing = True
        self._closer = asyncio.create_task(self._close(code, reason), name=f"ws-close-{self.id}")

    async def close(self, code: int, reason: str) -> None:
        if not self._closing:
            self._closing = True
            await self._close(code, reason)
        elif self._closer is not None:
            await asyncio.shield(self._closer)

    async def _close(self, code: int, reason: str) -> None:
        self.close_code = code
        self._pending.clear()
        self._queue.clear()
        self._queued_bytes = 0
        if self._writer is not None:
            self._writer.cancel()
        message = reason.encode()[:123]
        if self._protocol.writing_paused:
            # The peer is not reading, so a close handshake cannot finish: put
            # the close frame behind what it has not read yet, give it
            # close_timeout to catch up, then abort, which ends the connection
            # handler and so releases everything this client held.
            self._transport.write(close_frame(code, message))
            asyncio.get_running_loop().call_later(self._limits.close_timeout, self._transport.abort)
            return
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=message), self._limits.close_timeout)
        except (TimeoutError, ConnectionError) as exc:
            logger.info("client %s closed abruptly: %r", self.id, exc)
            self._transport.abort()

    async def stop_writer(self) -> None:
        """Stop the writer; a writer that died on a broken socket is not an error."""
        self._closing = True
        writer = self._writer
        if writer is None:
            return
        writer.cancel()
        try:
            await writer
        except asyncio.CancelledError:
            # Re-raise only if *we* are being cancelled, not the writer.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise


# ---------------------------------------------------------------------------
# Topics and the manager
# ---------------------------------------------------------------------------


class Topic:
    """One NATS subscription and the clients that share it."""

    __slots__ = ("clients", "filtered", "pattern", "sub")

    def __init__(self, pattern: str, filtered: bool) -> None:
        self.pattern = pattern
        self.clients: set[Client] = set()
        self.sub: Subscription | None = None
        # True when the pattern can match denied subjects (e.g. ">"), so each
        # message's subject is checked before it is forwarded.
        self.filtered = filtered


class WSSManager:
    """Owns the clients and the shared NATS subscriptions."""

    def __init__(
        self,
        nats_client: Callable[[], NATS],
        limits: Limits | None = None,
        policy: SubjectPolicy | None = None,
    ) -> None:
        # A callable, not the client itself: the NATS connection is made in the
        # app's startup hook, after the manager exists.
        self._nats = nats_client
        self.limits = limits or Limits()
        self.policy = policy or SubjectPolicy()
        self.stats = Stats()
        self.clients: dict[str, Client] = {}
        self.topics: dict[str, Topic] = {}
        # Serialises changes to ``topics`` so that two clients asking for the same
        # new pattern at once cannot create two NATS subscriptions.
        self._lock = asyncio.Lock()
        self._flusher = Flusher(self.limits.flush_delay)

    @property
    def client_subscriptions(self) -> int:
        return sum(len(c.subjects) for c in self.clients.values())

    # -- connection lifecycle ------------------------------------------------

    def register(self, request: web.Request, ws: web.WebSocketResponse, nats_connected: bool) -> Client:
        client = Client(request, ws, self.limits, self.stats, self._flusher)
        self.clients[client.id] = client
        self.stats.connections_opened += 1
        client.send_json(
            {
                "success": True,
                "data": MSG_CONNECTED,
                "type": "welcome",
                "connection_id": client.id,
                "protocol": PROTOCOL_VERSION,
                "nats": "connected" if nats_connected else "disconnected",
                "publish": bool(self.policy.publish_allow),
            }
        )
        return client

    async def unregister(self, client: Client) -> None:
        """Release everything ``client`` held.  Safe to call more than once."""
        self.clients.pop(client.id, None)
        await self._remove(client, list(client.subjects))
        await client.stop_writer()

    async def close_all(self, code: int, reason: str) -> None:
        clients = list(self.clients.values())
        await asyncio.gather(*(c.close(code, reason) for c in clients), return_exceptions=True)

    def broadcast(self, frame: dict[str, Any]) -> None:
        data = text_frame(dump(frame))
        for client in self.clients.values():
            client.send(data)

    # -- control frames -------------------------------------------------------

    async def handle_text(self, client: Client, text: str) -> None:
        """One control frame from the client; every outcome is a reply frame."""
        if client.closing:  # already cut off (flooding, slow): nothing more to say
            return
        if not client.take_control_token():
            self.stats.bad_frames["rate"] += 1
            if client.strike():
                logger.warning("client %s (%s) keeps flooding; closing", client.id, client.peer)
                self.stats.rate_limit_disconnects += 1
                client.close_soon(CLOSE_POLICY_VIOLATION, "control frame rate exceeded")
                return
            rate = self.limits.control_rate
            client.send_json(
                reply(False, f"Rate limit: at most {rate:g} control frames per second", _peek_id(text))
            )
            return
        for frame in await self.handle_request(client, text):
            client.send_json(frame)

    def reject_binary(self, client: Client) -> None:
        self.stats.bad_frames["binary"] += 1
        client.send_json(reply(False, "Binary frames are not supported: send JSON as text"))

    async def handle_request(self, client: Client, text: str | bytes) -> list[dict[str, Any]]:
        """Parse and apply one control frame; shared by the WebSocket and HTTP paths."""
        request_id = None
        try:
            body = _parse_object(text)
            request_id = _echoable(body.get("id"))
            return await self.apply(client, body, request_id)
        except BadFrame as exc:
            self.stats.bad_frames[exc.kind] += 1
            return [reply(False, exc.message, request_id)]

    async def apply(
        self, client: Client, body: dict[str, Any], request_id: Any = None
    ) -> list[dict[str, Any]]:
        """Apply a parsed control object.  Raises BadFrame for anything the client got wrong."""
        action = body.get("action", "subscribe")
        if action == "publish":
            return [await self.publish(body, request_id)]
        if action not in ("subscribe", "unsubscribe"):
            raise BadFrame("action", msg_bad_action(action))
        subjects = self._subjects(body)
        if action == "subscribe":
            return [await self.subscribe(client, subjects, request_id)]
        return await self.unsubscribe(client, subjects, request_id)

    def _subjects(self, body: dict[str, Any]) -> list[str]:
        if "subjects" not in body:
            raise BadFrame("subjects", MSG_SUBJECTS_REQUIRED)
        subjects = body["subjects"]
        if not isinstance(subjects, list) or not subjects or not all(isinstance(s, str) for s in subjects):
            raise BadFrame("subjects", "subjects must be a non-empty list of strings")
        if len(subjects) > self.limits.max_subjects_per_request:
            raise BadFrame(
                "limit", f"Too many subjects: at most {self.limits.max_subjects_per_request} per request"
            )
        for subject in subjects:
            error = subject_error(subject, self.limits.max_subject_length)
            if error:
                raise BadFrame("subject", error)
        return subjects

    async def subscribe(
        self, client: Client, subjects: list[str], request_id: Any = None
    ) -> dict[str, Any]:
        for subject in subjects:
            refusal = self.policy.refusal(subject)
            if refusal:
                raise BadFrame("policy", refusal)
        wanted = list(dict.fromkeys(s for s in subjects if s not in client.subjects))
        if len(client.subjects) + len(wanted) > self.limits.max_subscriptions:
            raise BadFrame(
                "limit", f"Subscription limit: at most {self.limits.max_subscriptions} per connection"
            )
        try:
            await self._add(client, wanted)
        except (TimeoutError, NatsError, OSError) as exc:
            # NATS refused or is down: tell the client, keep the connection.
            logger.warning("subscribe %s for client %s failed: %r", wanted, client.id, exc)
            return reply(False, f"Could not subscribe: {exc or type(exc).__name__}", request_id,
                         action="subscribe", subjects=subjects)
        return reply(True, msg_subscribed(subjects), request_id, action="subscribe", subjects=subjects)

    async def unsubscribe(
        self, client: Client, subjects: list[str], request_id: Any = None
    ) -> list[dict[str, Any]]:
        replies = []
        held = [s for s in dict.fromkeys(subjects) if s in client.subjects]
        await self._remove(client, held)
        for subject in subjects:
            if subject in held:
                replies.append(reply(True, msg_unsubscribed(subject), request_id,
                                     action="unsubscribe", subjects=[subject]))
            else:
                replies.append(reply(False, msg_not_subscribed(subject), request_id,
                                     action="unsubscribe", subjects=[subject]))
        return replies

    async def publish(self, body: dict[str, Any], request_id: Any = None) -> dict[str, Any]:
        """Publish from the browser: only where the policy's publish patterns allow."""
        subject = body.get("subject")
        if not isinstance(subject, str):
            raise BadFrame("publish", "publish needs a string 'subject'")
        error = subject_error(subject, self.limits.max_subject_length, wildcards=False)
        if error:
            raise BadFrame("subject", error)
        refusal = self.policy.publish_refusal(subject)
        if refusal:
            raise BadFrame("policy", refusal)
        payload = _publish_payload(body)
        if len(payload) > self.limits.max_publish_bytes:
            raise BadFrame("limit", f"Payload too large: at most {self.limits.max_publish_bytes} bytes")
        try:
            await self._nats().publish(subject, payload)
        except (TimeoutError, NatsError, OSError) as exc:
            return reply(False, f"Could not publish: {exc or type(exc).__name__}", request_id,
                         action="publish", subjects=[subject])
        self.stats.published += 1
        return reply(True, f"Published to {subject}", request_id, action="publish", subjects=[subject])

    # -- shared NATS subscriptions -------------------------------------------

    async def _add(self, client: Client, patterns: Iterable[str]) -> None:
        patterns = list(patterns)
        async with self._lock:
            created: list[Topic] = []
            try:
                for pattern in patterns:
                    topic = self.topics.get(pattern)
                    if topic is None:
                        topic = Topic(pattern, self.policy.needs_filter(pattern))
                        topic.sub = await self._nats().subscribe(pattern, cb=self._make_callback(topic))
                        self.topics[pattern] = topic
                        created.append(topic)
                        logger.debug("NATS subscription created for %s", pattern)
                    topic.clients.add(client)
                    client.subjects.add(pattern)
                if created:
                    await self._confirm_subscriptions()
            except BaseException:
                # All or nothing: undo this request's part so no half-made
                # subscription outlives it.
                for pattern in patterns:
                    if pattern in client.subjects:
                        client.subjects.discard(pattern)
                        topic = self.topics.get(pattern)
                        if topic is not None:
                            topic.clients.discard(client)
                for topic in created:
                    if not topic.clients:
                        await self._drop(topic)
                raise

    async def _confirm_subscriptions(self) -> None:
        """Wait until nats-server has our new SUBs, so "subscribed" is true when we say it.

        nats-py only buffers a SUB; without this round trip a message published
        right after the reply could reach nats-server first and be missed.
        """
        nc = self._nats()
        if not nc.is_connected:
            return  # nats-py re-sends every SUB when the link returns
        try:
            await nc.flush(timeout=self.limits.close_timeout)
        except (TimeoutError, NatsError) as exc:
            # The SUB stays registered with nats-py either way; only the
            # confirmation is missing, which is not the client's error.
            logger.warning("NATS did not confirm new subscriptions: %r", exc)

    async def _remove(self, client: Client, patterns: Iterable[str]) -> None:
        # Detach synchronously first: even if we are cancelled while NATS is
        # being told, the client no longer receives anything for these.
        empty: list[Topic] = []
        for pattern in patterns:
            client.subjects.discard(pattern)
            topic = self.topics.get(pattern)
            if topic is None:
                continue
            topic.clients.discard(client)
            if not topic.clients:
                empty.append(topic)
        if empty:
            # Shielded so a cancelled connection task still finishes the release.
            await asyncio.shield(self._drop_if_unused(empty))

    async def _drop_if_unused(self, topics: list[Topic]) -> None:
        async with self._lock:
            for topic in topics:
                # Someone may have re-subscribed while we waited for the lock.
                if not topic.clients and self.topics.get(topic.pattern) is topic:
                    await self._drop(topic)

    async def _drop(self, topic: Topic) -> None:
        self.topics.pop(topic.pattern, None)
        if topic.sub is None:
            return
        try:
            await topic.sub.unsubscribe()
            logger.debug("NATS subscription removed for %s", topic.pattern)
        except (TimeoutError, NatsError, OSError) as exc:
            # The NATS connection may already be closed at shutdown.
            logger.info("unsubscribe %s: %r", topic.pattern, exc)

    def _make_callback(self, topic: Topic) -> Callable[[Msg], Any]:
        stats, permits = self.stats, self.policy.permits

        async def on_message(msg: Msg) -> None:
            # No await in here: nats-py runs this per message in order, and
            # every client's queue receives the frame in that same order.
            stats.messages_received += 1
            if topic.filtered and not permits(msg.subject):
                stats.filtered += 1
                return
            frame = text_frame(encode_nats_message(msg))
            for client in topic.clients:
                client.send(frame)

        return on_message


def _consume_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _parse_object(text: str | bytes) -> dict[str, Any]:
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise BadFrame("json", f"Invalid JSON: {exc}") from None
    except RecursionError:
        raise BadFrame("json", "Invalid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise BadFrame("not_object", f"Expected a JSON object, got {_json_type(body)}")
    return body


def _peek_id(text: str) -> Any:
    """The id of a frame we will not otherwise process, so even that reply can be matched."""
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return _echoable(body.get("id")) if isinstance(body, dict) else None


def _echoable(request_id: Any) -> Any:
    """The request id to echo, if it is a plain JSON scalar that survives the round trip."""
    if isinstance(request_id, bool) or request_id is None:
        return request_id
    if isinstance(request_id, str) and len(request_id) <= 256:
        return request_id
    if isinstance(request_id, int) and abs(request_id) < 2**53:
        return request_id
    if isinstance(request_id, float) and math.isfinite(request_id):
        return request_id
    return None


def _publish_payload(body: dict[str, Any]) -> bytes:
    """A string is sent as its text, base64 as its bytes, any other JSON value as JSON."""
    if "data" not in body:
        raise BadFrame("publish", "publish needs 'data'")
    data = body["data"]
    if body.get("encoding") == "base64":
        if not isinstance(data, str):
            raise BadFrame("publish", "base64 data must be a string")
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error as exc:
            raise BadFrame("publish", f"Invalid base64: {exc}") from None
    try:
        if isinstance(data, str):
            return data.encode("utf-8")
        return json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadFrame("publish", "data is not valid Unicode (lone surrogate)") from None


def _json_type(value: Any) -> str:
    return {
        list: "an array",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), type(value).__name__)
