"""Request/reply load for bench/requests.py: the responder, and load-client processes.

* The responder speaks NATS's own protocol over TCP and echoes each request's
  payload to its reply subject, batching its writes per read: it answers tens
  of thousands of requests a second on one core, so the service is never what
  is measured, and both targets get the very same one.
* A load process holds many WebSocket clients (``bench/loadclient.py``'s raw
  RFC 6455 client) of one kind:

  - ``bridge``: ``{"action": "request", "subject": ..., "data": {"n": K}, "id": K}``
    on the bridge's ``/stream``; the answer is the reply with that ``id``;
  - ``nats``: the NATS protocol over nats-server's WebSocket listener, as
    nats.ws does a request: one ``SUB _INBOX.<random>.*``, then
    ``PUB <subject> _INBOX.<random>.<K>`` per request; the answer is the
    ``MSG`` on that inbox (a ``503`` status: no responders).

  Every client sends at its own steady rate from a random phase (open loop:
  a late send goes out as soon as it can, it is never skipped), and each
  round trip, send to answer, is binned in a latency histogram.

A load process is driven over a pipe: ``("connect",)`` → ``("ready", connected)``,
``("run", start_at, seconds, rate, grace)`` → ``("result", RunResult)``,
``("close",)`` → ``("closed", None)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit

from bench.common import HIST_SIZE, lat_bucket, own_cpu, raise_nofile
from bench.loadclient import RawWS

HIST_TOP = HIST_SIZE - 1


# ---------------------------------------------------------------------------
# The responder
# ---------------------------------------------------------------------------


class Responder(asyncio.Protocol):
    """Echoes every MSG/HMSG's payload to its reply subject (PUB), one write per read."""

    def __init__(self, subject: str, ready: asyncio.Future[None]) -> None:
        self.subject = subject
        self.ready = ready
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        connect = {"verbose": False, "pedantic": False, "protocol": 1, "headers": True,
                   "name": "bench-responder"}
        self.transport.write(f"CONNECT {json.dumps(connect)}\r\nSUB {self.subject} rr 1\r\nPING\r\n".encode())

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        out: list[bytes] = []
        pos, n = 0, len(buf)
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            line = buf[pos:eol]
            if line.startswith((b"MSG ", b"HMSG ")):
                words = line.split()
                size = int(words[-1])
                start, end = eol + 2, eol + 2 + size
                if end + 2 > n:
                    break
                # HMSG <subject> <sid> <reply> <header bytes> <total bytes>: answer the payload only.
                body = buf[start + int(words[-2]):end] if line[0:1] == b"H" else buf[start:end]
                reply = words[3] if len(words) >= (6 if line[0:1] == b"H" else 5) else None
                if reply is not None:
                    out.append(b"PUB %s %d\r\n%s\r\n" % (reply, len(body), body))
                    self.answered += 1
                pos = end + 2
                continue
            pos = eol + 2
            if line == b"PING":
                out.append(b"PONG\r\n")
            elif line == b"PONG" and not self.ready.done():
                self.ready.set_result(None)
            elif line.startswith(b"-ERR") and not self.ready.done():
                self.ready.set_exception(RuntimeError(line.decode(errors="replace")))
        self.buf = buf[pos:] if pos < n else b""
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"responder lost its connection: {exc!r}"))


def use_uvloop() -> None:
    """The load generator's own loop (never the bridge's): uvloop when installed, as bench/run.py does.

    Its CPU per frame is lower, and every core the load generator does not burn is left to
    the target, for both targets alike."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def responder_main(conn: Connection, url: str, subject: str) -> None:
    """multiprocessing target: answer until told to stop; report the requests answered."""

    async def run() -> None:
        parts = urlsplit(url)
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        transport, proto = await loop.create_connection(lambda: Responder(subject, ready), parts.hostname,
                                                        parts.port)
        await asyncio.wait_for(ready, 10)
        conn.send(("ready", None))
        await loop.run_in_executor(None, conn.recv)  # "stop"
        conn.send(("stopped", proto.answered))
        transport.close()

    use_uvloop()
    try:
        asyncio.run(run())
    except Exception:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))


# ---------------------------------------------------------------------------
# The load clients
# ---------------------------------------------------------------------------


@dataclass
class RunResult:
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # the bridge's error, or no_responders, ...
    missing: int = 0  # sent, and no answer by the end of the grace period
    late_sends: int = 0  # sends more than 5 ms behind their schedule (the load generator lagging)
    hist: list[int] = field(default_factory=list)
    max_us: int = 0
    cpu_seconds: float = 0.0
    protocol_errors: list[str] = field(default_factory=list)
    disconnected: int = 0


class _Shim:
    """What loadclient.RawWS expects of its worker."""

    receipts = None

    def __init__(self, result: RunResult) -> None:
        self.result = result
        self.closing = False

    def disconnected(self, code: int) -> None:
        if not self.closing:
            self.result.disconnected += 1

    def protocol_error(self, text: str) -> None:
        if len(self.result.protocol_errors) < 10:
            self.result.protocol_errors.append(text)


class _Caller:
    """The request side of a load client: pending sends and the histogram they end in."""

    pending: dict[int, int]
    result: RunResult
    hist: list[int]

    def answered(self, k: int, now: int, error: str | None) -> None:
        sent = self.pending.pop(k, None)
        if sent is None:
            return  # an answer after the grace period, or twice: counted as missing already
        if error is not None:
            self.result.errors[error] = self.result.errors.get(error, 0) + 1
            return
        self.result.ok += 1
        us = (now - sent) // 1000
        self.hist[min(lat_bucket(us), HIST_TOP)] += 1
        if us > self.result.max_us:
            self.result.max_us = us


class BridgeCaller(_Caller, RawWS):
    """The bridge's protocol: one request frame per call, its reply matched by id."""

    def setup(self, subject: str, result: RunResult, hist: list[int]) -> None:
        self.head = b'{"action":"request","subject":' + json.dumps(subject).encode() + b',"data":{"n":'
        self.pending, self.result, self.hist = {}, result, hist

    def call(self, k: int) -> None:
        self.pending[k] = time.monotonic_ns()
        self.send(0x1, self.head + b'%d},"id":%d}' % (k, k))

    def on_message(self, buf: bytes, start: int, end: int, now: int) -> None:
        if self.ready.done():
            # The bridge writes its replies with json.dumps's separators: '"id": 7'.
            i = buf.find(b'"id": ', start, end)
            if i < 0:
                self.worker.protocol_error(f"frame without id: {buf[start:end][:200]!r}")
                return
            j = i + 6
            while j < end and 48 <= buf[j] <= 57:
                j += 1
            error = None
            if not buf.startswith(b'{"success": true', start):
                frame = json.loads(buf[start:end])
                error = str(frame.get("error") or frame.get("message"))
            self.answered(int(buf[i + 6:j]), now, error)
            return
        frame = json.loads(buf[start:end])
        if frame.get("type") == "welcome":
            self.ready.set_result(None)


class NatsCaller(_Caller, RawWS):
    """The NATS protocol over WebSocket: one inbox subscription, a PUB with a reply subject per call."""

    def setup(self, subject: str, result: RunResult, hist: list[int]) -> None:
        self.subject = subject.encode()
        self.inbox = b"_INBOX." + os.urandom(8).hex().encode()
        self.stream = b""
        self.pending, self.result, self.hist = {}, result, hist

    def call(self, k: int) -> None:
        payload = b'{"n":%d}' % k
        self.pending[k] = time.monotonic_ns()
        self.send(0x2, b"PUB %s %s.%d %d\r\n%s\r\n" % (self.subject, self.inbox, k, len(payload), payload))

    def on_message(self, buf: bytes, start: int, end: int, now: int) -> None:
        data = self.stream + buf[start:end] if self.stream else buf[start:end]
        pos, n = 0, len(data)
        while True:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                break
            line = data[pos:eol]
            if line.startswith((b"MSG ", b"HMSG ")):
                words = line.split()
                size = int(words[-1])
                body_end = eol + 2 + size
                if body_end + 2 > n:
                    break
                k = int(words[1].rsplit(b".", 1)[1])
                headers = data[eol + 2:eol + 2 + int(words[-2])] if line[0:1] == b"H" else b""
                self.answered(k, now, "no_responders" if headers.startswith(b"NATS/1.0 503") else None)
                pos = body_end + 2
                continue
            pos = eol + 2
            if line == b"PING":
                self.send(0x2, b"PONG\r\n")
            elif line == b"PONG" and not self.ready.done():
                self.ready.set_result(None)
            elif line.startswith(b"INFO") and not self.ready.done():
                connect = {"verbose": False, "pedantic": False, "protocol": 1, "headers": True,
                           "no_responders": True}
                self.send(0x2, f"CONNECT {json.dumps(connect)}\r\n".encode()
                          + b"SUB %s.* 1\r\nPING\r\n" % self.inbox)
            elif line.startswith(b"-ERR"):
                self.worker.protocol_error(line.decode(errors="replace"))
        self.stream = data[pos:] if pos < n else b""


@dataclass
class LoadSpec:
    target: str  # "bridge" or "nats"
    url: str
    clients: int
    subject: str


class LoadProcess:
    def __init__(self, conn: Connection, spec: LoadSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.callers: list[Any] = []
        self.result = RunResult(hist=[0] * HIST_SIZE)
        self.shim = _Shim(self.result)

    async def connect(self) -> int:
        loop = asyncio.get_running_loop()
        parts = urlsplit(self.spec.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        cls = BridgeCaller if self.spec.target == "bridge" else NatsCaller
        for _ in range(self.spec.clients):
            caller = cls(self.shim, None, f"{host}:{port}", parts.path or "/")  # type: ignore[arg-type]
            caller.setup(self.spec.subject, self.result, self.result.hist)
            try:
                await loop.create_connection(lambda c=caller: c, host, port)
                await asyncio.wait_for(caller.ready, 30)
            except (OSError, RuntimeError, TimeoutError) as exc:
                self.shim.protocol_error(f"connect: {exc!r}")
                continue
            self.callers.append(caller)
        return len(self.callers)

    async def run(self, start_at: float, seconds: float, rate: float, grace: float) -> RunResult:
        loop = asyncio.get_running_loop()
        result = self.result
        period = 1.0 / rate
        count = max(1, round(rate * seconds))
        done = loop.create_future()
        left = [len(self.callers)]
        cpu0 = own_cpu()

        def schedule(caller: Any, first: float, k: int) -> None:
            def fire() -> None:
                if loop.time() - (first + k * period) > 0.005:
                    result.late_sends += 1
                caller.call(k)
                result.sent += 1
                if k + 1 < count:
                    schedule(caller, first, k + 1)
                else:
                    left[0] -= 1
                    if not left[0] and not done.done():
                        done.set_result(None)

            loop.call_at(first + k * period, fire)

        for caller in self.callers:
            schedule(caller, start_at + random.uniform(0, period), 0)
        if self.callers:
            await done
        for _ in range(max(1, int(grace / 0.02))):  # answers still on their way
            if not any(c.pending for c in self.callers):
                break
            await asyncio.sleep(0.02)
        result.missing = sum(len(c.pending) for c in self.callers)
        for caller in self.callers:
            caller.pending.clear()
        result.cpu_seconds = own_cpu() - cpu0
        return result

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            cmd = await loop.run_in_executor(None, self.conn.recv)
            if cmd[0] == "connect":
                self.conn.send(("ready", await self.connect()))
            elif cmd[0] == "run":
                self.conn.send(("result", await self.run(*cmd[1:])))
            elif cmd[0] == "close":
                self.shim.closing = True
                for caller in self.callers:
                    caller.close()
                await asyncio.sleep(0.2)
                self.conn.send(("closed", None))
                return


def load_main(conn: Connection, spec: LoadSpec) -> None:
    """multiprocessing target."""
    raise_nofile()
    use_uvloop()
    try:
        asyncio.run(LoadProcess(conn, spec).serve())
    except Exception:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
