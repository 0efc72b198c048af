"""WSSManager: maps each WebSocket client's subscribe/unsubscribe frames onto NATS.

Design in one paragraph: every distinct subject pattern has exactly one NATS
subscription (a ``Topic``), shared by every client that asked for it; the first
client creates it and the last one to leave removes it.  A NATS message is turned
into its JSON frame once, in the subscription's callback, and the same string is
appended to each interested client's bounded outbound queue.  Each client has one
writer task that drains its queue onto its socket, so a slow socket only ever
stalls its own writer.  A client whose queue passes its bound is disconnected
with close code 1013 and everything it held is released.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_websocket import WSCloseCode
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1

# Close codes (RFC 6455 section 7.4.1); 1013 is "try again later", which is what
# a slow consumer should do: reconnect once it can keep up.
CLOSE_GOING_AWAY = int(WSCloseCode.GOING_AWAY)  # 1001
CLOSE_TRY_AGAIN_LATER = int(WSCloseCode.TRY_AGAIN_LATER)  # 1013

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


def subject_error(subject: str, max_length: int) -> str | None:
    """Why ``subject`` is not a valid NATS subscription subject, or None if it is.

    Checked here, before NATS sees it, because nats-server answers an invalid
    SUB with -ERR and drops the whole connection: one bad browser frame would
    otherwise cut every client off.
    """
    if not subject:
        return "Invalid subject '': must not be empty"
    if len(subject.encode()) > max_length:
        return f"Invalid subject: longer than {max_length} bytes"
    for ch in subject:
        if ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F:
            return f"Invalid subject {subject!r}: whitespace and control characters are not allowed"
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        if token == "":
            return f"Invalid subject {subject!r}: empty token"
        if token == ">":
            if i != len(tokens) - 1:
                return f"Invalid subject {subject!r}: '>' is only allowed as the last token"
        elif token != "*" and ("*" in token or ">" in token):
            return f"Invalid subject {subject!r}: wildcards must be a whole token"
    return None


# ---------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are accepted by json.loads but are not JSON: a browser's
    # JSON.parse would choke on the frame, so such payloads travel as text.
    raise ValueError(name)


def encode_nats_message(msg: Msg) -> str:
    """The JSON frame for one NATS message, built once and shared by all clients.

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
        except ValueError:
            body = ',"data":' + json.dumps(text, ensure_ascii=False)
        else:
            body = ',"data":' + text.strip()
    extra = ""
    if msg.headers:
        extra += ',"headers":' + json.dumps(msg.headers, ensure_ascii=False)
    if msg.reply:
        extra += ',"reply":' + json.dumps(msg.reply, ensure_ascii=False)
    return head + body + extra + "}"


def dump(frame: dict[str, Any]) -> str:
    return json.dumps(frame, ensure_ascii=False)


def reply(success: bool, message: str, request_id: Any = None, **extra: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"success": success, "message": message, "type": "reply"}
    if request_id is not None:
        frame["id"] = request_id
    frame.update(extra)
    return frame


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Per-client limits; see the settings table in README.md."""

    queue_messages: int = 10_000
    queue_bytes: int = 8 * 1024 * 1024
    max_subject_length: int = 256
    close_timeout: float = 5.0


class Client:
    """One WebSocket connection: its subscriptions and its bounded outbound queue."""

    def __init__(self, ws: web.WebSocketResponse, peer: str, limits: Limits) -> None:
        # 128 bits from the CSPRNG: the id doubles as the capability that lets a
        # backend subscribe this client over HTTP, so it must not be guessable.
        self.id = secrets.token_urlsafe(16)
        self.ws = ws
        self.peer = peer
        self.subjects: set[str] = set()
        self.opened = time.monotonic()
        self.sent = 0
        self.close_code: int | None = None
        self._limits = limits
        self._queue: deque[str] = deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._writer = asyncio.create_task(self._write_loop(), name=f"ws-writer-{self.id}")
        self._closer: asyncio.Task[None] | None = None

    @property
    def closing(self) -> bool:
        return self._closing

    def send(self, frame: str) -> None:
        """Queue ``frame``; never blocks.  Past the bound the client is cut off."""
        if self._closing:
            return
        size = len(frame)
        if (
            len(self._queue) >= self._limits.queue_messages
            or self._queued_bytes + size > self._limits.queue_bytes
        ):
            logger.warning(
                "client %s (%s) is a slow consumer: %d frames / %d bytes queued; disconnecting",
                self.id, self.peer, len(self._queue), self._queued_bytes,
            )
            self.close_soon(CLOSE_TRY_AGAIN_LATER, "slow consumer: outbound queue full")
            return
        self._queue.append(frame)
        self._queued_bytes += size
        self._wakeup.set()

    def send_json(self, frame: dict[str, Any]) -> None:
        self.send(dump(frame))

    async def _write_loop(self) -> None:
        ws = self.ws
        queue = self._queue
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while queue:
                frame = queue.popleft()
                self._queued_bytes -= len(frame)
                try:
                    await ws.send_str(frame)
                except ConnectionError:
                    # The peer is gone; the connection handler's finally
                    # releases its subscriptions.  Stop queueing for it.
                    self._closing = True
                    queue.clear()
                    self._queued_bytes = 0
                    return
                self.sent += 1

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
        self._queue.clear()
        self._queued_bytes = 0
        self._writer.cancel()
        try:
            # A peer that stopped reading never lets the close frame drain;
            # on timeout aiohttp aborts the transport, which is what we want.
            await asyncio.wait_for(
                self.ws.close(code=code, message=reason.encode()[:123]),
                timeout=self._limits.close_timeout,
            )
        except (TimeoutError, ConnectionError) as exc:
            logger.info("client %s closed abruptly: %r", self.id, exc)

    async def stop_writer(self) -> None:
        """Stop the writer; a writer that died on a broken socket is not an error."""
        self._closing = True
        self._writer.cancel()
        try:
            await self._writer
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

    __slots__ = ("clients", "delivered", "pattern", "sub")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.clients: set[Client] = set()
        self.sub: Subscription | None = None
        self.delivered = 0


class WSSManager:
    """Owns the clients and the shared NATS subscriptions."""

    def __init__(self, nats_client: Callable[[], NATS], limits: Limits | None = None) -> None:
        # A callable, not the client itself: the NATS connection is made in the
        # app's startup hook, after the manager exists.
        self._nats = nats_client
        self.limits = limits or Limits()
        self.clients: dict[str, Client] = {}
        self.topics: dict[str, Topic] = {}
        # Serialises changes to ``topics`` so that two clients asking for the same
        # new pattern at once cannot create two NATS subscriptions.
        self._lock = asyncio.Lock()

    # -- connection lifecycle ------------------------------------------------

    def register(self, ws: web.WebSocketResponse, peer: str, nats_connected: bool) -> Client:
        client = Client(ws, peer, self.limits)
        self.clients[client.id] = client
        client.send_json(
            {
                "success": True,
                "data": MSG_CONNECTED,
                "type": "welcome",
                "connection_id": client.id,
                "protocol": PROTOCOL_VERSION,
                "nats": "connected" if nats_connected else "disconnected",
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
        text = dump(frame)
        for client in self.clients.values():
            client.send(text)

    # -- control frames -------------------------------------------------------

    async def handle_text(self, client: Client, text: str) -> None:
        """One control frame from the client; every outcome is a reply frame."""
        for frame in await self.handle_request(client, text):
            client.send_json(frame)

    async def handle_request(self, client: Client, text: str | bytes) -> list[dict[str, Any]]:
        try:
            body = json.loads(text)
        except ValueError as exc:
            return [reply(False, f"Invalid JSON: {exc}")]
        except RecursionError:
            return [reply(False, "Invalid JSON: nested too deeply")]
        if not isinstance(body, dict):
            return [reply(False, f"Expected a JSON object, got {_json_type(body)}")]
        return await self.apply(client, body)

    async def apply(self, client: Client, body: dict[str, Any]) -> list[dict[str, Any]]:
        """Apply a parsed control object; shared by the WebSocket and HTTP paths."""
        request_id = body.get("id")
        action = body.get("action", "subscribe")
        if action not in ("subscribe", "unsubscribe"):
            return [reply(False, msg_bad_action(action), request_id)]
        if "subjects" not in body:
            return [reply(False, MSG_SUBJECTS_REQUIRED, request_id)]
        subjects = body["subjects"]
        if (
            not isinstance(subjects, list)
            or not subjects
            or not all(isinstance(s, str) for s in subjects)
        ):
            return [reply(False, "subjects must be a non-empty list of strings", request_id)]
        for subject in subjects:
            error = subject_error(subject, self.limits.max_subject_length)
            if error:
                return [reply(False, error, request_id)]
        if action == "subscribe":
            return [await self.subscribe(client, subjects, request_id)]
        return await self.unsubscribe(client, subjects, request_id)

    async def subscribe(
        self, client: Client, subjects: list[str], request_id: Any = None
    ) -> dict[str, Any]:
        wanted = list(dict.fromkeys(s for s in subjects if s not in client.subjects))
        try:
            await self._add(client, wanted)
        except (TimeoutError, NatsError, OSError) as exc:
            # NATS refused or is down: tell the client, keep the connection.
            logger.warning("subscribe %s for client %s failed: %r", wanted, client.id, exc)
            return reply(False, f"Could not subscribe: {exc or type(exc).__name__}", request_id)
        return reply(True, msg_subscribed(subjects), request_id)

    async def unsubscribe(
        self, client: Client, subjects: list[str], request_id: Any = None
    ) -> list[dict[str, Any]]:
        replies = []
        held = [s for s in dict.fromkeys(subjects) if s in client.subjects]
        await self._remove(client, held)
        for subject in subjects:
            if subject in held:
                replies.append(reply(True, msg_unsubscribed(subject), request_id))
            else:
                replies.append(reply(False, msg_not_subscribed(subject), request_id))
        return replies

    # -- shared NATS subscriptions -------------------------------------------

    async def _add(self, client: Client, patterns: Iterable[str]) -> None:
        async with self._lock:
            created: list[Topic] = []
            try:
                for pattern in patterns:
                    topic = self.topics.get(pattern)
                    if topic is None:
                        topic = Topic(pattern)
                        topic.sub = await self._nats().subscribe(
                            pattern, cb=self._make_callback(topic)
                        )
                        self.topics[pattern] = topic
                        created.append(topic)
                        logger.debug("NATS subscription created for %s", pattern)
                    topic.clients.add(client)
                    client.subjects.add(pattern)
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

    async def _remove(self, client: Client, patterns: Iterable[str]) -> None:
        patterns = list(patterns)
        if not patterns:
            return
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
        async def on_message(msg: Msg) -> None:
            # No await in here: nats-py runs this per message in order, and
            # every client's queue receives the frame in that same order.
            frame = encode_nats_message(msg)
            topic.delivered += 1
            for client in topic.clients:
                client.send(frame)

        return on_message


def _json_type(value: Any) -> str:
    return {
        list: "an array",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), type(value).__name__)
