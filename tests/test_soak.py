"""Soak: a client that never reads while 200 MB goes to its subject, and 5000 connection cycles.

The bridge runs as its own process here, so its memory can be read from
/proc/PID/status (VmRSS now, VmHWM the peak) without the test's own
allocations in the way.  What nats-server holds is read from its /connz, what
the bridge holds from its /metrics.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import struct
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import suppress
from typing import Any

import aiohttp
import nats
import pytest
from conftest import TIMEOUT, BridgeProcess, NatsServer, spawn_bridge, wait_for_port

# The campaign runs in the first test's setup: more than the default 120 s must be allowed.
pytestmark = pytest.mark.timeout(300)

MiB = 1024 * 1024
QUEUE_BYTES = 4 * MiB
MEMORY_BOUND = 2 * QUEUE_BYTES + 64 * MiB

MESSAGE_BYTES = 64 * 1024
MESSAGES = 3200  # 200 MiB
WINDOW = 16  # messages the publisher may be ahead of the healthy client (1 MiB, under its bound)

CYCLES = 5000
CONCURRENCY = 50
FLAT_BOUND = 8 * MiB


def memory_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def rss(pid: int) -> int:
    return memory_kib(pid, "VmRSS") * 1024


def peak_rss(pid: int) -> int:
    return memory_kib(pid, "VmHWM") * 1024


async def metrics(bp: BridgeProcess) -> dict[str, float]:
    """The bridge's unlabelled metrics, by name."""
    async with aiohttp.ClientSession() as session:
        async with session.get(bp.http_url + "/metrics", timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as r:
            text = await r.text()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            values[name] = float(value)
    return values


async def settled(bp: BridgeProcess, connections: int, nats_subscriptions: int) -> None:
    async def check() -> bool:
        m = await metrics(bp)
        return (m["bridge_connections"], m["bridge_nats_subscriptions"]) == (connections, nats_subscriptions)

    deadline = asyncio.get_running_loop().time() + 30
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, await metrics(bp)
        await asyncio.sleep(0.1)


def run_with_bridge(
    nats_server: NatsServer, scenario: Callable[[BridgeProcess, str], Coroutine[Any, Any, dict[str, Any]]],
    **env: str,
) -> dict[str, Any]:
    """Start a bridge process, run ``scenario`` against it in a fresh event loop, stop the bridge."""
    name = f"soak_{uuid.uuid4().hex[:10]}"
    bp = spawn_bridge(env={
        "NATS_URL": nats_server.url,
        "TEST_PUBLISH_INTERVAL": "0",
        # Nothing per connection in the log: the stdout pipe is not read while we run.
        "LOG_LEVEL": "WARNING",
        "SERVICE_NAME": name,
        **env,
    })
    try:
        wait_for_port(bp.port, timeout=30, proc=bp.proc)
        # A Runner, not asyncio.run: panini's nest_asyncio replaces asyncio.run with one
        # that needs a current loop, and pytest-asyncio leaves none between tests.
        with asyncio.Runner() as runner:
            return runner.run(scenario(bp, name))
    finally:
        bp.stop(signal.SIGKILL, timeout=10)


# ---------------------------------------------------------------------------
# A raw WebSocket client that never reads
# ---------------------------------------------------------------------------


def masked_text_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    header = bytes((0x81, 0x80 | n)) if n < 126 else struct.pack("!BBH", 0x81, 0x80 | 126, n)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_frame(sock: socket.socket, buf: bytearray) -> tuple[int, bytes]:
    """One server frame (unmasked) from ``sock``, ``buf`` holding bytes already read."""

    def need(n: int) -> None:
        while len(buf) < n:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buf.extend(chunk)

    need(2)
    opcode, length = buf[0] & 0x0F, buf[1] & 0x7F
    start = 2
    if length == 126:
        need(4)
        length, start = struct.unpack("!H", buf[2:4])[0], 4
    elif length == 127:
        need(10)
        length, start = struct.unpack("!Q", buf[2:10])[0], 10
    need(start + length)
    payload = bytes(buf[start : start + length])
    del buf[: start + length]
    return opcode, payload


def never_reading_client(port: int, subject: str) -> socket.socket:
    """Handshake by hand, subscribe, read the reply; from then on the socket is never read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        assert chunk, "closed during the handshake"
        buf.extend(chunk)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"101", head
    buf = bytearray(rest)
    welcome = json.loads(read_frame(sock, buf)[1])
    assert welcome["type"] == "welcome"
    sock.sendall(masked_text_frame(json.dumps({"action": "subscribe", "subjects": [subject]}).encode()))
    reply = json.loads(read_frame(sock, buf)[1])
    assert reply["success"] is True, reply
    return sock


def drained_until_closed(sock: socket.socket) -> bool:
    """Read what the bridge left in the socket; True once the connection has ended."""
    sock.settimeout(TIMEOUT)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


# ---------------------------------------------------------------------------
# 200 MB to a subject one client never reads
# ---------------------------------------------------------------------------


def payload(n: int) -> bytes:
    head = b'{"n":%d,"pad":"' % n
    return head + b"x" * (MESSAGE_BYTES - len(head) - 2) + b'"}'


class Healthy:
    """A client that reads everything and checks it is the stream, in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, subject: str) -> None:
        self.ws = ws
        self.subject = subject
        self.received: list[int] = []
        self.progress = asyncio.Event()

    async def next_progress(self, reader: asyncio.Task[None]) -> None:
        """Wait until the client has received one more message (or its reader failed)."""
        self.progress.clear()
        waiter = asyncio.ensure_future(self.progress.wait())
        try:
            done, _ = await asyncio.wait({reader, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if reader in done:
            reader.result()  # raises what went wrong
        assert done, f"healthy client stuck at {len(self.received)} messages"

    async def run(self) -> None:
        while len(self.received) < MESSAGES:
            msg = await asyncio.wait_for(self.ws.receive(), 30)
            assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, self.ws.close_code)
            frame = json.loads(msg.data)
            if frame.get("subject") == self.subject:
                self.received.append(frame["data"]["n"])
                self.progress.set()


async def flood(bp: BridgeProcess, name: str, nats_server: NatsServer) -> dict[str, Any]:
    pid = bp.proc.pid
    subject = f"soak.{uuid.uuid4().hex[:10]}"
    slow = await asyncio.to_thread(never_reading_client, bp.port, subject)
    session = aiohttp.ClientSession()
    nc = await asyncio.wait_for(nats.connect(nats_server.url), TIMEOUT)
    try:
        ws = await asyncio.wait_for(session.ws_connect(bp.http_url + "/stream"), TIMEOUT)
        await asyncio.wait_for(ws.receive(), TIMEOUT)
        await ws.send_str(json.dumps({"action": "subscribe", "subjects": [subject], "id": "h"}))
        while json.loads((await asyncio.wait_for(ws.receive(), TIMEOUT)).data).get("id") != "h":
            pass
        healthy = Healthy(ws, subject)
        baseline = rss(pid)
        reader = asyncio.create_task(healthy.run())
        try:
            for n in range(MESSAGES):
                while n - len(healthy.received) >= WINDOW:
                    await healthy.next_progress(reader)
                await nc.publish(subject, payload(n))
                if n % WINDOW == 0:
                    await asyncio.wait_for(nc.flush(), TIMEOUT)
            await asyncio.wait_for(reader, 60)
        finally:
            reader.cancel()
            with suppress(BaseException):
                await reader
        peak = peak_rss(pid)
        slow_ended = await asyncio.to_thread(drained_until_closed, slow)
        # The bridge gives a non-reading client its close grace before it lets go.
        for _ in range(150):
            m = await metrics(bp)
            if m["bridge_connections"] == 1:
                break
            await asyncio.sleep(0.1)
        return {
            "baseline": baseline, "peak": peak, "received": healthy.received, "metrics": m,
            "slow_ended": slow_ended, "alive": bp.proc.poll() is None,
            "subscriptions": nats_server.subscriptions_of(name), "subject": subject,
        }
    finally:
        slow.close()
        await session.close()
        await asyncio.wait_for(nc.close(), TIMEOUT)


@pytest.fixture(scope="module")
def flood_run(nats_server: NatsServer) -> Iterator[dict[str, Any]]:
    """The 200 MB flood, run once; the tests below each check one outcome."""
    yield run_with_bridge(
        nats_server, lambda bp, name: flood(bp, name, nats_server), CLIENT_QUEUE_BYTES=str(QUEUE_BYTES)
    )


def test_never_reading_client_keeps_bridge_memory_within_queue_bound(flood_run):
    growth = flood_run["peak"] - flood_run["baseline"]
    assert growth < MEMORY_BOUND, f"peak RSS grew {growth / MiB:.1f} MiB (bound {MEMORY_BOUND / MiB:.0f} MiB)"


def test_never_reading_client_is_disconnected_as_slow_consumer(flood_run):
    assert flood_run["metrics"]["bridge_slow_consumer_disconnects_total"] == 1
    assert flood_run["slow_ended"]


def test_healthy_client_receives_all_200_mb_in_order_beside_a_never_reading_one(flood_run):
    assert flood_run["received"] == list(range(MESSAGES))


def test_bridge_keeps_one_subscription_for_the_healthy_client_after_the_flood(flood_run):
    assert flood_run["alive"]
    assert flood_run["metrics"]["bridge_connections"] == 1
    assert flood_run["subscriptions"] == [flood_run["subject"]]


# ---------------------------------------------------------------------------
# Churn: 5000 connect / subscribe / disconnect cycles
# ---------------------------------------------------------------------------


async def one_cycle(session: aiohttp.ClientSession, url: str, i: int) -> None:
    ws = await asyncio.wait_for(session.ws_connect(url), TIMEOUT)
    try:
        await asyncio.wait_for(ws.receive(), TIMEOUT)
        subjects = [f"churn.{uuid.uuid4().hex[:12]}", "churn.shared", "churn.*"]
        await ws.send_str(json.dumps({"action": "subscribe", "subjects": subjects}))
        msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
        assert json.loads(msg.data)["success"] is True, msg.data
        if i % 3 == 0:
            # Gone without a close handshake: the TCP connection is torn down.
            connection = ws._response.connection
            assert connection is not None and connection.transport is not None
            connection.transport.abort()
    finally:
        await asyncio.wait_for(ws.close(), TIMEOUT)


async def churn(url: str, cycles: range) -> None:
    pending = iter(cycles)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            for i in pending:
                await one_cycle(session, url, i)

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), 240)


async def churn_twice(bp: BridgeProcess, name: str, nats_server: NatsServer) -> dict[str, Any]:
    url = bp.http_url + "/stream"
    half = CYCLES // 2
    await churn(url, range(half))
    await settled(bp, 0, 0)
    middle = rss(bp.proc.pid)
    await churn(url, range(half, CYCLES))
    await settled(bp, 0, 0)
    end = rss(bp.proc.pid)
    for _ in range(100):  # nats-server's view may lag the bridge's by a moment
        if not nats_server.subscriptions_of(name):
            break
        await asyncio.sleep(0.1)
    return {"middle": middle, "end": end, "metrics": await metrics(bp),
            "subscriptions": nats_server.subscriptions_of(name), "alive": bp.proc.poll() is None}


@pytest.fixture(scope="module")
def churn_run(nats_server: NatsServer) -> Iterator[dict[str, Any]]:
    """The 5000 cycles, run once; the tests below each check one outcome."""
    yield run_with_bridge(nats_server, lambda bp, name: churn_twice(bp, name, nats_server))


def test_churn_leaves_no_subscription_on_nats_server(churn_run):
    assert churn_run["metrics"]["bridge_connections_opened_total"] == CYCLES
    assert churn_run["subscriptions"] == []


def test_churn_memory_is_flat_over_the_second_half(churn_run):
    growth = churn_run["end"] - churn_run["middle"]
    assert growth < FLAT_BOUND, f"RSS grew {growth / MiB:.1f} MiB over the last {CYCLES // 2} cycles"
