"""A load-client process: hundreds of WebSocket (or Server-Sent Events) clients on one asyncio loop.

Two protocols, chosen per process:

* ``bridge``: the bridge's own protocol on ``/stream`` (welcome frame, a
  ``subscribe`` control frame, a ``reply``, then ``{"subject":..,"data":..}``),
  or with ``transport="sse"`` the same frames as Server-Sent Events on
  ``/events?subject=..`` (``RawEvents``: the chunked response de-chunked and
  split into events inside ``data_received``, like the raw WebSocket client);
* ``nats``: the NATS client protocol over nats-server's WebSocket listener
  (INFO, then CONNECT + SUB + PING, wait for PONG, then parse MSG lines, answer
  PING with PONG).

And two client implementations:

* ``raw`` (default): a minimal RFC 6455 client on an ``asyncio.Protocol`` that
  handles every frame of a TCP read inside ``data_received`` (no task, future or
  queue per message);
* ``aiohttp``: ``aiohttp.ClientSession.ws_connect``, one receive loop task per
  client; a cross-check of the raw client against a third-party one.

Every receipt costs an epoll wakeup and a recv syscall when the server writes one
frame per read, and on the stock asyncio loop that machinery dominates both
clients (they measure about the same).  On uvloop (``ClientSpec.uvloop``) the raw
client needs ~40 % less CPU per frame than aiohttp's (17 vs 28 µs per receipt in
W2 on the 2-core machine), and the CPU the load clients do not burn is left to
the server under test.

Receipts are counted cheaply: frames stay bytes, and the sequence number and
publish timestamp are found with ``bytes.find`` and ``int`` rather than a JSON
parse.  Each receipt bins its latency into a histogram (``common.lat_bucket``), so
results are a few KiB whatever the traffic.

The parent drives the process over a ``multiprocessing`` pipe; every command is
answered with exactly one reply:

    ("connect",)                     -> ("ready", Stats)
    ("drain", expected, quiet, hard) -> ("result", Stats)
    ("close",)                       -> ("closed", None)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit

from bench.common import HIST_SIZE, own_cpu, own_sys_cpu, raise_nofile

CONNECT_LINE = b'CONNECT {"verbose":false,"pedantic":false,"protocol":1}\r\n'
HIST_TOP = HIST_SIZE - 1


@dataclass
class ClientSpec:
    target: str  # "bridge" or "nats"
    url: str
    subjects: list[str]  # one per client
    impl: str = "raw"  # "raw" or "aiohttp"
    concurrency: int = 16  # WebSocket handshakes in flight at once
    connect_timeout: float = 60.0
    uvloop: bool = False  # run this process on uvloop (must be installed)
    transport: str = "websocket"  # the bridge's "websocket" (/stream) or "sse" (/events)


@dataclass
class Stats:
    clients: int = 0
    connected: int = 0
    connect_failures: int = 0
    connect_errors: list[str] = field(default_factory=list)
    connect_seconds: float = 0.0
    received: int = 0
    expected: int = 0
    complete_clients: int = 0
    out_of_order: int = 0  # receipts whose seq was not above the client's previous one
    disconnected: int = 0  # clients the server closed during the run
    close_codes: dict[int, int] = field(default_factory=dict)
    protocol_errors: list[str] = field(default_factory=list)
    hist: list[int] = field(default_factory=list)
    max_latency_us: int = 0
    first_receipt_ns: int = 0
    last_receipt_ns: int = 0
    cpu_seconds: float = 0.0  # this process, between its "ready" and "result" replies
    sys_seconds: float = 0.0  # the system (kernel) part of cpu_seconds
    timed_out: bool = False
    timeout_reason: str = ""  # "quiet": deliveries had stopped; "hard": still arriving at the cut-off


class Receipts:
    """Counters shared by every client of the process."""

    __slots__ = ("all_received", "expected_total", "hist", "stats", "total")

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.hist = [0] * HIST_SIZE
        self.total = 0
        self.expected_total = 1 << 62  # set by "drain"
        self.all_received = asyncio.Event()

    def record(self, client: _Client, seq: int, ts: int, now: int) -> None:
        stats = self.stats
        if seq <= client.last:
            stats.out_of_order += 1
        client.last = seq
        client.count += 1
        us = (now - ts) // 1000
        if us < 128:
            self.hist[us if us > 0 else 0] += 1
        else:
            # common.lat_bucket, inlined
            b = us.bit_length()
            k = 128 + (b - 8) * 64 + ((us >> (b - 7)) & 63)
            self.hist[k if k < HIST_TOP else HIST_TOP] += 1
            if us > stats.max_latency_us:
                stats.max_latency_us = us
        if not stats.first_receipt_ns:
            stats.first_receipt_ns = now
        stats.last_receipt_ns = now
        self.total += 1
        if self.total >= self.expected_total:
            self.all_received.set()


class _Client:
    __slots__ = ("closer", "count", "last", "subject")

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.count = 0
        self.last = -1
        self.closer: Any = None  # how to close it at the end


# ---------------------------------------------------------------------------
# The raw client
# ---------------------------------------------------------------------------


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client→server frame (RFC 6455 §5.3)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    if n:
        mask = (key * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")
    return head + key + payload


class RawWS(asyncio.Protocol):
    """HTTP upgrade, then server frames parsed straight out of each TCP read."""

    def __init__(self, worker: Worker, client: _Client, host: str, path: str) -> None:
        self.worker = worker
        self.receipts = worker.receipts
        self.client = client
        self.host = host
        self.path = path
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = False
        self.frags: list[bytes] | None = None
        self.close_code: int | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- plumbing ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(ws_frame(opcode, payload))

    def fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(why))
        else:
            self.worker.protocol_error(why)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Our side of the end of the run: a close frame, then the TCP close."""
        self.send(0x8, (1000).to_bytes(2, "big"))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost during handshake: {exc!r}"))
            return
        self.worker.disconnected(self.close_code if self.close_code is not None else 1006)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buf = self.buf + data if self.buf else data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            status = buf[: buf.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                self.fail(f"upgrade refused: {buf[:end].decode(errors='replace')[:300]}")
                return
            self.upgraded = True
            buf = buf[end + 4 :]
        n = len(buf)
        pos = 0
        while n - pos >= 2:
            b0 = buf[pos]
            ln = buf[pos + 1]
            if ln & 0x80:
                self.fail("server frame is masked")
                return
            if ln < 126:
                start = pos + 2
            elif ln == 126:
                if n - pos < 4:
                    break
                ln = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            else:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + ln
            if end > n:
                break
            opcode = b0 & 0x0F
            if opcode <= 2:  # continuation, text, binary
                if b0 & 0x80 and opcode and self.frags is None:
                    self.on_message(buf, start, end, now)
                else:
                    if self.frags is None:
                        self.frags = []
                    self.frags.append(buf[start:end])
                    if b0 & 0x80:
                        whole = b"".join(self.frags)
                        self.frags = None
                        self.on_message(whole, 0, len(whole), now)
            elif opcode == 0x9:  # ping
                self.send(0xA, buf[start:end])
            elif opcode == 0x8:  # close
                self.close_code = int.from_bytes(buf[start : start + 2], "big") if ln >= 2 else 1005
                self.send(0x8, buf[start : start + 2])
                if self.transport is not None:
                    self.transport.close()
                self.buf = b""
                return
            pos = end
        self.buf = buf[pos:] if pos < n else b""

    def on_message(self, buf: bytes, start: int, end: int, now: int) -> None:
        raise NotImplementedError


class RawBridge(RawWS):
    """The bridge's protocol: welcome, subscribe, reply, then data frames."""

    def on_message(self, buf: bytes, start: int, end: int, now: int) -> None:
        i = buf.find(b'"seq":', start, end)
        if i >= 0 and self.ready.done():
            j = buf.find(b",", i, end)
            self.receipts.record(
                self.client, int(buf[i + 6 : j]), int(buf[j + 6 : buf.find(b",", j + 6, end)]), now
            )
            return
        try:
            body = json.loads(buf[start:end])
        except ValueError:
            self.fail(f"not JSON: {buf[start:end][:200]!r}")
            return
        kind = body.get("type") if isinstance(body, dict) else None
        if not self.ready.done():
            if kind == "welcome":
                self.send(0x1, json.dumps({"subjects": [self.client.subject], "action": "subscribe"})
                          .encode())
            elif kind == "reply":
                if body.get("success"):
                    self.ready.set_result(None)
                else:
                    self.fail(f"subscribe refused: {body}")
            return
        if kind == "status" or kind != "reply":
            self.worker.protocol_error(f"unexpected frame: {buf[start:end][:200]!r}")


class RawEvents(asyncio.Protocol):
    """``GET /events?subject=..``: the response de-chunked and split into events as they arrive.

    The same receipts as the WebSocket clients: a message event's data is the bridge's
    message frame, whose first ``"seq":`` and ``"ts":`` are the publisher's.
    """

    def __init__(self, worker: Worker, client: _Client, host: str, path: str) -> None:
        self.worker = worker
        self.receipts = worker.receipts
        self.client = client
        self.request = (f"GET {path}?subject={client.subject} HTTP/1.1\r\nHost: {host}\r\n"
                        "Accept: text/event-stream\r\n\r\n").encode()
        self.transport: asyncio.Transport | None = None
        self.raw = b""  # bytes of the response not yet de-chunked
        self.text = b""  # de-chunked bytes not yet a whole event
        self.headed = False
        self.chunked = True
        self.left = 0  # bytes of the current chunk still to come
        self.skip = 0  # the CRLF after a chunk still to come
        self.close_code: int | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(why))
        else:
            self.worker.protocol_error(why)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost before the welcome: {exc!r}"))
            return
        self.worker.disconnected(self.close_code if self.close_code is not None else 1006)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buf = self.raw + data if self.raw else data
        if not self.headed:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.raw = buf
                return
            head = buf[:end].lower()
            if not head.startswith(b"http/1.1 200"):
                self.fail(f"refused: {buf[:end].decode(errors='replace')[:300]}")
                return
            self.headed, self.chunked = True, b"transfer-encoding: chunked" in head
            buf = buf[end + 4:]
        if self.chunked:
            out, pos, n = [], 0, len(buf)
            while pos < n:
                if self.skip:
                    k = min(self.skip, n - pos)
                    self.skip -= k
                    pos += k
                elif self.left:
                    k = min(self.left, n - pos)
                    out.append(buf[pos:pos + k])
                    pos += k
                    self.left -= k
                    if not self.left:
                        self.skip = 2
                else:
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        break
                    self.left = int(buf[pos:eol], 16)
                    pos = eol + 2
                    if not self.left:  # the last chunk: the stream is over
                        pos = n
            self.raw = buf[pos:] if pos < n else b""
            body = b"".join(out)
        else:
            self.raw, body = b"", buf
        text = self.text + body if self.text else body
        start = 0
        while (end := text.find(b"\n\n", start)) >= 0:
            self.on_event(text, start, end, now)
            start = end + 2
        self.text = text[start:]

    def on_event(self, text: bytes, start: int, end: int, now: int) -> None:
        # A message: "data: " first, or its id first (named events begin with "event:" or "retry:").
        if self.ready.done() and (text.startswith(b"data: ", start) or text.startswith(b"id: ", start)):
            i = text.find(b'"seq":', start, end)
            j = text.find(b",", i, end)
            ts = int(text[j + 6:text.find(b",", j + 6, end)])
            self.receipts.record(self.client, int(text[i + 6:j]), ts, now)
            return
        block = text[start:end]
        if block.startswith(b":"):
            return  # a comment: the bridge's keep-alive
        if b"event: welcome" in block:
            if not self.ready.done():
                self.ready.set_result(None)
        elif b"event: close" in block:
            found = block.find(b'"code": ')
            self.close_code = int(block[found + 8:block.find(b",", found)]) if found >= 0 else 1005
        else:
            self.worker.protocol_error(f"unexpected event: {block[:200]!r}")


class RawNats(RawWS):
    """The NATS protocol over WebSocket: frames are just a byte stream of protocol lines."""

    stream = b""

    def on_message(self, buf: bytes, start: int, end: int, now: int) -> None:
        chunk = buf[start:end] if start or end != len(buf) else buf
        data = self.stream + chunk if self.stream else chunk
        self.stream = parse_nats(self, data, now)


def parse_nats(conn: RawNats | AiohttpNats, data: bytes, now: int) -> bytes:
    """Handle every complete protocol line in ``data``; return the incomplete rest."""
    n = len(data)
    pos = 0
    record = conn.receipts.record
    client = conn.client
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            break
        if data.startswith(b"MSG ", pos):
            # MSG <subject> <sid> [reply-to] <#bytes>\r\n<payload>\r\n
            start = eol + 2
            end = start + int(data[data.rfind(b" ", pos, eol) + 1 : eol])
            if end + 2 > n:
                break  # the payload has not all arrived yet
            i = data.find(b'"seq":', start, end)
            j = data.find(b",", i, end)
            record(client, int(data[i + 6 : j]), int(data[j + 6 : data.find(b",", j + 6, end)]), now)
            pos = end + 2
            continue
        line = data[pos:eol]
        pos = eol + 2
        if line == b"PING":
            conn.send_proto(b"PONG\r\n")
        elif line == b"PONG":
            conn.pong()
        elif line.startswith(b"INFO"):
            conn.send_proto(CONNECT_LINE + f"SUB {client.subject} 1\r\nPING\r\n".encode())
        elif line.startswith(b"-ERR"):
            conn.nats_error(line.decode(errors="replace"))
    return data[pos:] if pos < n else b""


class _NatsMixin:
    ready: asyncio.Future[None]
    worker: Worker

    def send_proto(self, data: bytes) -> None:
        raise NotImplementedError

    def pong(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def nats_error(self, text: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(f"nats-server: {text}"))
        else:
            self.worker.protocol_error(f"nats-server: {text}")


class RawNatsClient(_NatsMixin, RawNats):
    def send_proto(self, data: bytes) -> None:
        self.send(0x2, data)


# ---------------------------------------------------------------------------
# The aiohttp client (cross-check)
# ---------------------------------------------------------------------------


class AiohttpNats(_NatsMixin):
    def __init__(self, worker: Worker, client: _Client, ws: Any) -> None:
        self.worker = worker
        self.receipts = worker.receipts
        self.client = client
        self.ws = ws
        self.ready = asyncio.get_running_loop().create_future()

    def send_proto(self, data: bytes) -> None:
        task = asyncio.ensure_future(self.ws.send_bytes(data))
        self.worker.background.add(task)
        task.add_done_callback(self.worker.background.discard)


async def aiohttp_loop(worker: Worker, client: _Client, ws: Any, ready: asyncio.Future[None]) -> None:
    """One aiohttp client from handshake to close; ``ready`` once subscribed."""
    from aiohttp import WSMsgType

    receipts = worker.receipts
    record = receipts.record
    clock = time.monotonic_ns
    receive = ws.receive
    nats = AiohttpNats(worker, client, ws) if worker.spec.target == "nats" else None
    if nats is not None:
        nats.ready = ready
    stream = b""
    try:
        while True:
            msg = await receive()
            now = clock()
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                data = msg.data
                if nats is not None:
                    stream = parse_nats(nats, stream + data if stream else data, now)
                    continue
                i = data.find(b'"seq":')
                if i >= 0 and ready.done():
                    j = data.find(b",", i)
                    record(client, int(data[i + 6 : j]), int(data[j + 6 : data.find(b",", j + 6)]), now)
                    continue
                body = json.loads(data)
                kind = body.get("type")
                if not ready.done():
                    if kind == "welcome":
                        await ws.send_str(json.dumps({"subjects": [client.subject], "action": "subscribe"}))
                    elif kind == "reply":
                        if body.get("success"):
                            ready.set_result(None)
                        else:
                            ready.set_exception(RuntimeError(f"subscribe refused: {body}"))
                            return
                elif kind != "reply":
                    worker.protocol_error(f"unexpected frame: {data[:200]!r}")
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                if not ready.done():
                    ready.set_exception(ConnectionError(f"closed during handshake: {msg!r}"))
                else:
                    worker.disconnected(ws.close_code if ws.close_code is not None else 1006)
                return
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if not ready.done():
            ready.set_exception(exc)
        else:
            worker.protocol_error(f"aiohttp client: {exc!r}\n{traceback.format_exc(limit=3)}")


# ---------------------------------------------------------------------------
# The process
# ---------------------------------------------------------------------------


class Worker:
    def __init__(self, conn: Connection, spec: ClientSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.clients = [_Client(s) for s in spec.subjects]
        self.stats = Stats(clients=len(self.clients))
        self.receipts = Receipts(self.stats)
        self.closing = False
        self.background: set[asyncio.Task[Any]] = set()
        self.session: Any = None  # aiohttp.ClientSession for impl "aiohttp"

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        commands: asyncio.Queue[Any] = asyncio.Queue()

        def readable() -> None:
            try:
                commands.put_nowait(self.conn.recv())
            except EOFError:
                loop.remove_reader(self.conn.fileno())
                commands.put_nowait(("close",))

        loop.add_reader(self.conn.fileno(), readable)
        if self.spec.impl == "aiohttp":
            import aiohttp

            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        cpu0, sys0 = own_cpu(), own_sys_cpu()
        try:
            while True:
                cmd = await commands.get()
                if cmd[0] == "connect":
                    await self.connect_all()
                    cpu0, sys0 = own_cpu(), own_sys_cpu()
                    self.conn.send(("ready", self.stats))
                elif cmd[0] == "drain":
                    await self.drain(cmd[1], cmd[2], cmd[3])
                    self.stats.cpu_seconds = own_cpu() - cpu0
                    self.stats.sys_seconds = own_sys_cpu() - sys0
                    self.stats.received = self.receipts.total
                    self.stats.hist = self.receipts.hist
                    self.conn.send(("result", self.stats))
                elif cmd[0] == "close":
                    await self.close_all()
                    with contextlib.suppress(OSError):
                        self.conn.send(("closed", None))
                    return
        finally:
            with contextlib.suppress(Exception):
                loop.remove_reader(self.conn.fileno())

    # -- connecting ---------------------------------------------------------------

    async def connect_all(self) -> None:
        sem = asyncio.Semaphore(self.spec.concurrency)
        t0 = time.monotonic()

        async def one(client: _Client) -> None:
            async with sem:
                try:
                    await asyncio.wait_for(self.connect_one(client), self.spec.connect_timeout)
                except Exception as exc:
                    self.stats.connect_failures += 1
                    if len(self.stats.connect_errors) < 5:
                        self.stats.connect_errors.append(f"{type(exc).__name__}: {exc}")
                    if client.closer is not None:
                        with contextlib.suppress(Exception):
                            client.closer()
                        client.closer = None
                    return
            self.stats.connected += 1

        await asyncio.gather(*(one(c) for c in self.clients))
        self.stats.connect_seconds = time.monotonic() - t0

    async def connect_one(self, client: _Client) -> None:
        loop = asyncio.get_running_loop()
        parts = urlsplit(self.spec.url)
        if self.spec.transport == "sse":  # one client for it, whatever --client says
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            events = RawEvents(self, client, f"{host}:{port}", parts.path or "/events")
            client.closer = events.close
            await loop.create_connection(lambda: events, host, port)
            await events.ready
            return
        if self.spec.impl == "raw":
            cls = RawBridge if self.spec.target == "bridge" else RawNatsClient
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            proto = cls(self, client, f"{host}:{port}", parts.path or "/")
            client.closer = proto.close
            await loop.create_connection(lambda: proto, host, port)
            await proto.ready
            return
        ws = await self.session.ws_connect(self.spec.url, autoping=True, compress=0, max_msg_size=0,
                                           decode_text=False)
        ready: asyncio.Future[None] = loop.create_future()
        task = asyncio.create_task(aiohttp_loop(self, client, ws, ready))

        def close_aiohttp() -> None:
            task.cancel()
            t = asyncio.ensure_future(ws.close())
            self.background.add(t)
            t.add_done_callback(self.background.discard)

        client.closer = close_aiohttp
        self.background.add(task)
        await ready

    # -- events -------------------------------------------------------------------

    def disconnected(self, code: int) -> None:
        if self.closing:
            return
        self.stats.disconnected += 1
        self.stats.close_codes[code] = self.stats.close_codes.get(code, 0) + 1

    def protocol_error(self, text: str) -> None:
        if len(self.stats.protocol_errors) < 10:
            self.stats.protocol_errors.append(text)

    # -- finishing ----------------------------------------------------------------

    async def drain(self, expected: dict[str, int], quiet: float, hard: float) -> None:
        """Wait until every client has its expected count, or no progress for ``quiet``
        seconds, or ``hard`` seconds in all."""
        receipts = self.receipts
        # Clients that failed to connect were expected to receive too.
        self.stats.expected = sum(expected.get(c.subject, 0) for c in self.clients)
        receipts.expected_total = self.stats.expected
        if receipts.total >= receipts.expected_total:
            receipts.all_received.set()
        deadline = time.monotonic() + hard
        last_seen, last_change = receipts.total, time.monotonic()
        while not receipts.all_received.is_set():
            now = time.monotonic()
            if receipts.total != last_seen:
                last_seen, last_change = receipts.total, now
            if now - last_change >= quiet or now >= deadline:
                self.stats.timed_out = True
                self.stats.timeout_reason = "quiet" if now - last_change >= quiet else "hard"
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(receipts.all_received.wait(), min(0.2, max(0.01, deadline - now)))
        self.stats.complete_clients = sum(1 for c in self.clients if c.count >= expected.get(c.subject, 0))

    async def close_all(self) -> None:
        self.closing = True
        for client in self.clients:
            if client.closer is not None:
                with contextlib.suppress(Exception):
                    client.closer()
        await asyncio.sleep(0.2)  # let the close frames go out
        if self.background:
            await asyncio.wait(list(self.background), timeout=5)
        if self.session is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.session.close(), 5)


def worker_main(conn: Connection, spec: ClientSpec) -> None:
    """multiprocessing target."""
    raise_nofile()
    if spec.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        asyncio.run(Worker(conn, spec).run())
    except KeyboardInterrupt:
        pass
    except Exception:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise
