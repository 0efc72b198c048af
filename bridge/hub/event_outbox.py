"""A Server-Sent Events stream's way out: the Outbox's bounded queue and policy, written as events.

``EventOutbox`` is an ``Outbox`` (hub/outbox.py): the same queue, bound,
overflow policy, Flusher and writer task; only the wire differs:

- a frame is an event (``framed``): ``event: <type>`` and ``data: <the frame's JSON>``;
  a NATS message has no ``event:`` line, and on a stored subject it carries the
  connection's ``id:`` (``send_message``: the id holds every stored subject's
  position, core/sse.py), so EventSource's Last-Event-ID resumes them all;
- each write is one chunk of the chunked response (``_write``), straight to the
  transport like the WebSocket's frames;
- a close is an ``event: close`` with the code a socket would get, then the end
  of the response (``_end``); a peer that has stopped reading may never see it,
  and is cut off after ``close_timeout`` all the same;
- a ``: `` comment line after ``PING_INTERVAL`` seconds of silence keeps proxies
  from closing an idle stream.

Until the response begins the outbox is *held*: what arrives (live messages of
subjects subscribed while the others are being set up) waits in the same
bounded queue, so the welcome is the first event and a refusal can still be an
HTTP answer (web/events.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from bridge.core.frames import close_notice, dump
from bridge.core.sse import PING, event
from bridge.hub.outbox import Flusher, Outbox

if TYPE_CHECKING:
    from aiohttp.abc import AbstractStreamWriter
    from aiohttp.base_protocol import BaseProtocol

    from bridge.config import Limits
    from bridge.core.stats import Stats


class EventOutbox(Outbox):
    sse = True

    __slots__ = ("_chunked", "_head", "_held", "_id_line", "_index", "_last_write", "_ping", "_seqs",
                 "_welcome_id", "ended")

    def __init__(self, transport: asyncio.Transport, protocol: BaseProtocol, stream: AbstractStreamWriter,
                 limits: Limits, stats: Stats, flusher: Flusher, label: str, chunked: bool) -> None:
        super().__init__(transport, protocol, stream, None, limits, stats, flusher, label)
        # HTTP/1.1 answers are chunked (aiohttp's choice); HTTP/1.0 ones end with the connection.
        self._chunked = chunked
        self._held = True
        # The id's fixed part, each stored subject's slot in it, and their positions (core/sse.py).
        self._head = b""
        self._id_line = b"id: "  # and the head, and its dot: what every id line begins with
        self._index: dict[str, int] = {}
        self._seqs: list[str] = []
        # The positions just before the first message that waited for the response: the welcome's id.
        self._welcome_id: bytes | None = None
        self._last_write = time.monotonic()
        self._ping: asyncio.TimerHandle | None = None
        # Done when the stream has ended: closed by us, or the peer hung up.
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @staticmethod
    def framed(body: bytes, kind: str | None = None) -> bytes:
        return event(kind, body)

    # -- ids ---------------------------------------------------------------------

    def track(self, head: bytes, slots: dict[str, int], seqs: list[str]) -> None:
        """Carry ids: ``slots`` maps each stored pattern to its position in ``seqs``.

        Called before anything is followed, so every stored message has its id, even one
        that arrives while the stream is being set up."""
        self._head, self._index, self._seqs = head, slots, seqs
        self._id_line = b"id: " + head + b"."

    def reposition(self, pattern: str, seq: int) -> None:
        """``pattern`` stands at ``seq`` now (a resume that could not be made starts from here)."""
        slot = self._index.get(pattern)
        if slot is not None:
            self._seqs[slot] = str(seq)

    def event_id(self) -> bytes | None:
        """The id that resumes every stored subject from here (None: the stream has none)."""
        if not self._index:
            return None
        return self._head + b"." + ".".join(self._seqs).encode("ascii")

    def welcome_id(self) -> bytes | None:
        """The welcome's id: it goes out before what waited, so it says where things stood before."""
        return self._welcome_id if self._welcome_id is not None else self.event_id()

    def send_message(self, frame: bytes, pattern: str, seq: int | None) -> None:
        # The one per-connection cost of a stored message: its id (the event itself is shared).
        if seq is not None:
            slot = self._index.get(pattern)
            if slot is not None:
                if self._held and self._welcome_id is None:
                    self._welcome_id = self.event_id()
                seqs = self._seqs
                seqs[slot] = str(seq)
                # One formatting, one copy of the shared event (five concatenations cost twice this).
                frame = b"%b%b\n%b" % (self._id_line, ".".join(seqs).encode("ascii"), frame)
        self.send(frame)

    # -- held until the response begins -----------------------------------------

    def flush(self) -> None:
        if self._held and not self._closing:
            # Nothing may reach the socket before the response's headers: queue it, bounded.
            frames, self._pending = self._pending, []
            for frame in frames:
                self._enqueue(frame)
                if self._closing:
                    return
            return
        super().flush()

    def _start_writer(self) -> None:
        if not self._held:
            super()._start_writer()

    def release(self) -> None:
        """The response has begun (headers and welcome are out): what waited follows, then the rest."""
        self._held = False
        self._last_write = time.monotonic()
        if self._queue or self._unreported_drops:
            self._start_writer()
        interval = self._limits.ping_interval
        if interval and not self._closing:
            self._ping = asyncio.get_running_loop().call_later(interval, self._tick)

    # -- writing -----------------------------------------------------------------

    def _write(self, data: bytes, frames: int) -> None:
        self._last_write = time.monotonic()
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        super()._write(data, frames)

    def _tick(self) -> None:
        """A comment line after ``PING_INTERVAL`` seconds without a write."""
        self._ping = None
        if self._closing:
            return
        interval = self._limits.ping_interval
        idle = time.monotonic() - self._last_write
        if idle >= interval:
            self.send(PING)
            idle = 0.0
        self._ping = asyncio.get_running_loop().call_later(interval - idle, self._tick)

    # -- ending ------------------------------------------------------------------

    async def _close(self, code: int, reason: str, send_queued: bool, timeout: float | None = None) -> None:
        self._stop_ping()
        if self._held:
            # The stream never began: the handler answers with an HTTP status instead.
            self.close_code = code
            self._finish()
            return
        try:
            await super()._close(code, reason, send_queued, timeout)
        finally:
            self._finish()

    async def _end(self, code: int, message: str, timeout: float) -> None:
        if self._transport.is_closing():
            return
        self._write(self.framed(dump(close_notice(code, message)), "close"), 1)
        # A peer that has stopped reading may never see it: the stream ends regardless.
        asyncio.get_running_loop().call_later(timeout, self._transport.abort)

    def hang_up(self) -> None:
        """The peer closed the connection: nothing more is sent, and the stream is over."""
        self._closing = True
        self._roomier()
        self._stop_ping()
        self._finish()

    async def stop_writer(self) -> None:
        self._stop_ping()
        try:
            await super().stop_writer()
        finally:
            self._finish()

    def _stop_ping(self) -> None:
        if self._ping is not None:
            self._ping.cancel()
            self._ping = None

    def _finish(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)
