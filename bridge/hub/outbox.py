"""One connection's way out: its bounded outbound queue, written once per loop turn.

An ``Outbox`` never blocks its sender.  Frames go straight into the socket's
transport while it accepts them, gathered per event-loop turn by the
``Flusher`` (one write per connection per turn, however many NATS messages
came in); only while the peer reads slower than we send do they wait in the
bounded queue, drained by a writer task that exists only then.  Past the
bound, the written overflow policy applies: close with 1013 (``disconnect``)
or drop the oldest frames and say so (``drop_oldest``).  History reads go
through the same queue (and wait for room in it), so the same policy applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.base_protocol import BaseProtocol

from bridge.config import OVERFLOW_DROP_OLDEST
from bridge.core.frames import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_TRY_AGAIN_LATER,
    close_frame,
    close_reason,
    dropped_notice,
    dump,
    text_frame,
)

if TYPE_CHECKING:
    from bridge.config import Limits
    from bridge.core.stats import Stats

logger = logging.getLogger(__name__)

# Most bytes one write of a catching-up client's queue takes at once.
WRITE_BATCH_BYTES = 256 * 1024


class Flusher:
    """Writes each client's gathered frames once per event-loop turn.

    With a delay, writes happen at most once per ``delay`` seconds: the first
    frame after a quiet spell still goes out at once, but under sustained
    traffic frames are gathered, trading up to ``delay`` of latency for fewer
    writes (each write to a socket is a syscall, most of the bridge's cost).
    """

    def __init__(self, delay: float = 0.0) -> None:
        self._delay = delay
        self._dirty: list[Outbox] = []
        self._scheduled = False
        self._last_run = float("-inf")

    def mark(self, outbox: Outbox) -> None:
        self._dirty.append(outbox)
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
        for outbox in dirty:
            try:
                outbox.flush()
            except Exception:
                # Per-connection boundary: one broken connection must not stop the
                # flush for everyone after it in this turn.
                logger.exception("flush to connection %s failed; closing it", outbox.label)
                outbox.close_soon(CLOSE_INTERNAL_ERROR, "internal error")


class Outbox:
    """One connection's bounded outbound queue.

    Frames go straight into the socket's transport while it accepts them; only
    when the transport is paused (the peer reads slower than we send) do they
    wait in this bounded queue, which its writer task drains.

    This one speaks WebSocket.  A Server-Sent Events stream is the same queue
    and the same policy (hub/event_outbox.py): it differs only in how a frame is
    framed for the wire (``framed``), how a message is sent (``send_message``),
    how a write is framed (``_write``) and how a close is written (``_end``).
    """

    # True for a Server-Sent Events stream: topics keep such outboxes apart (hub/topic.py).
    sse = False

    # Slots: one of these per connection, and there may be tens of thousands.
    __slots__ = (
        "_closer", "_closing", "_flusher", "_limits", "_pending", "_protocol", "_queue", "_queued_bytes",
        "_room", "_stats", "_stream", "_transport", "_unreported_drops", "_writer", "close_code",
        "dropped", "label", "sent", "ws",
    )

    def __init__(
        self, transport: asyncio.Transport, protocol: BaseProtocol, stream: AbstractStreamWriter,
        ws: web.WebSocketResponse | None, limits: Limits, stats: Stats, flusher: Flusher, label: str,
    ) -> None:
        self.ws = ws
        # Who this is in log lines: the connection's id and its peer.
        self.label = label
        self.sent = 0
        self.dropped = 0
        self.close_code: int | None = None
        self._limits = limits
        self._stats = stats
        # Writing frames to the transport ourselves (rather than ws.send_*) lets
        # one prebuilt frame serve every connection; compression is off, and each
        # write is a whole frame, so aiohttp's own pings and close interleave safely.
        self._transport = transport
        self._protocol = protocol
        self._stream = stream
        self._flusher = flusher
        # Frames of this event-loop turn, written together by the Flusher.  At
        # most one NATS read's worth (nats-py reads in bounded chunks) before
        # the bound below applies.
        self._pending: list[bytes] = []
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._unreported_drops = 0
        self._closing = False
        # Started only while the peer lags (see _enqueue): an idle or keeping-up
        # connection costs no task, which matters at tens of thousands of them.
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        # Set while a history read waits for room in the queue (see ``room``).
        self._room: asyncio.Future[None] | None = None

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
        if self._closing:
            return  # what is pending is the closer's to send or discard
        frames, self._pending = self._pending, []
        if not frames:
            return
        if not self._queue and not self._protocol.writing_paused:
            if self._transport.is_closing():
                self._closing = True
                self._roomier()
                return
            self._write(frames[0] if len(frames) == 1 else b"".join(frames), len(frames))
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
                    "connection %s is a slow consumer: %d frames / %d bytes queued; disconnecting",
                    self.label, len(self._queue), self._queued_bytes,
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
            self._writer = asyncio.create_task(self._write_queue(), name=f"ws-writer-{self.label}")

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

    @staticmethod
    def framed(body: bytes, kind: str | None = None) -> bytes:
        """A frame's JSON ``body`` (of type ``kind``, None for a NATS message) as this outbox's
        wire form: a complete WebSocket text frame."""
        return text_frame(body)

    def send_message(self, frame: bytes, pattern: str, seq: int | None) -> None:
        """A NATS message's frame (from ``framed``), delivered through ``pattern`` (at stream
        sequence ``seq`` when stored).  A WebSocket needs neither: the frame says it all."""
        self.send(frame)

    def send_json(self, frame: dict[str, Any]) -> None:
        self.send(self.framed(dump(frame), frame.get("type")))

    def _crowded(self) -> bool:
        limits = self._limits
        return len(self._queue) > limits.queue_messages // 2 or self._queued_bytes > limits.queue_bytes // 2

    async def room(self) -> None:
        """Wait while this client's queue is more than half full.

        History reads pace themselves by it: they fetch the next batch only once
        the client has taken most of the last, so a large history costs the
        client's queue and nothing more (never the bridge's memory, never its
        NATS link), and a client that reads slowly slows only its own history.
        """
        await asyncio.sleep(0)  # this turn's frames reach the socket or the queue first
        while not self._closing and self._crowded():
            if self._room is None or self._room.done():
                self._room = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._room)

    def _roomier(self) -> None:
        if self._room is not None and not self._room.done() and (self._closing or not self._crowded()):
            self._room.set_result(None)

    async def _write_queue(self) -> None:
        """Drain the queue as the peer takes it; ends when the queue is empty."""
        try:
            await self._drain_queue()
        finally:
            self._writer = None
            self._roomier()

    async def _drain_queue(self) -> None:
        queue, transport = self._queue, self._transport
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
                batch.append(self.framed(dump(dropped_notice(n)), "dropped"))
            size = 0
            # One write for many frames: fewer syscalls for a client catching up.
            while queue and size < WRITE_BATCH_BYTES:
                frame = queue.popleft()
                self._queued_bytes -= len(frame)
                size += len(frame)
                batch.append(frame)
            self._write(b"".join(batch), len(batch))
            self._roomier()

    def _write(self, data: bytes, frames: int) -> None:
        self._transport.write(data)
        self.sent += frames
        self._stats.frames_sent += frames
        self._stats.bytes_sent += len(data)

    # -- closing ---------------------------------------------------------------

    def close_soon(self, code: int, reason: str, *, send_queued: bool = False) -> None:
        """Start closing from synchronous code (a NATS callback, a fan-out loop).

        Nothing more is accepted for sending.  With ``send_queued`` what was
        already accepted (the replies to frames read before the decision to
        close) goes out first, then the close frame; otherwise it is discarded
        (a slow consumer, whose queue is the problem).
        """
        if self._closing:
            return
        self._closing = True
        self._roomier()
        self._closer = asyncio.create_task(self._close(code, reason, send_queued),
                                           name=f"ws-close-{self.label}")

    async def close(self, code: int, reason: str, timeout: float | None = None) -> None:
        """Close now; wait at most ``timeout`` (default close_timeout) for the peer's answer."""
        if not self._closing:
            self._closing = True
            self._roomier()
            await self._close(code, reason, False, timeout)
        elif self._closer is not None:
            await asyncio.shield(self._closer)

    async def _close(self, code: int, reason: str, send_queued: bool, timeout: float | None = None) -> None:
        self.close_code = code
        if timeout is None:
            timeout = self._limits.close_timeout
        if send_queued:
            self._send_last_frames()
            if self._writer is not None:
                # The peer is lagging: give it the timeout to take the
                # queue; past that the close below discards the rest.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._writer), timeout)
        self._pending.clear()
        self._queue.clear()
        self._queued_bytes = 0
        if self._writer is not None:
            self._writer.cancel()
        await self._end(code, close_reason(reason), timeout)

    async def _end(self, code: int, message: str, timeout: float) -> None:
        """How a close is written, once nothing more is queued: the WebSocket close handshake."""
        if self._protocol.writing_paused or self.ws is None:
            # The peer is not reading, so a close handshake cannot finish: put
            # the close frame behind what it has not read yet, give it
            # the timeout to catch up, then abort, which ends the connection
            # handler and so releases everything this connection followed.
            # (Without a WebSocketResponse, a bare transport, the same.)
            self._transport.write(close_frame(code, message.encode()))
            asyncio.get_running_loop().call_later(timeout, self._transport.abort)
            return
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=message), timeout)
        except (TimeoutError, ConnectionError) as exc:
            logger.info("connection %s closed abruptly: %r", self.label, exc)
            self._transport.abort()

    def _send_last_frames(self) -> None:
        """While closing: what this turn gathered goes out after the queue, unbounded.

        Only replies can be here (the client is already closing, so no new
        message is accepted), at most one per frame read before the close.
        """
        frames, self._pending = self._pending, []
        if self._transport.is_closing():
            return
        if self._queue or self._protocol.writing_paused:
            self._queue.extend(frames)
            self._queued_bytes += sum(map(len, frames))
            if self._writer is None:
                self._writer = asyncio.create_task(self._write_queue(), name=f"ws-writer-{self.label}")
        elif frames:
            self._write(b"".join(frames), len(frames))

    async def stop_writer(self) -> None:
        """Stop the writer; a writer that died on a broken socket is not an error."""
        self._closing = True
        self._roomier()
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


def broadcast(outboxes: Iterable[Outbox], frame: dict[str, Any]) -> None:
    """One frame to every outbox, encoded once and framed once per kind of outbox."""
    body, kind = dump(frame), frame.get("type")
    framed: dict[type[Outbox], bytes] = {}
    for outbox in outboxes:
        data = framed.get(type(outbox))
        if data is None:
            data = framed[type(outbox)] = outbox.framed(body, kind)
        outbox.send(data)


def _consume_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
