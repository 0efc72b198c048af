"""NATS ⇄ WebSocket bridge built on Panini.

Read top to bottom: typed app state, the app factory, the test publisher, the
HTTP and WebSocket routes, the lifecycle hooks, logging and ``main()``.
Settings live in config.py; the WebSocket ⇄ NATS logic in handler.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import mimetypes
import random
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web
from nats.aio.client import Client as NATS
from panini import app as panini_app
from prometheus_client import CollectorRegistry

import metrics
from config import TEST_SUBJECT, Config, ConfigError, load_config
from handler import CLOSE_GOING_AWAY, WSSManager

logger = logging.getLogger("bridge")


def undo_nest_asyncio() -> None:
    """Put back what importing Panini took from asyncio.

    Panini's NATS client module calls nest_asyncio.apply() on import, which swaps
    asyncio's C Task and Future for the pure-Python ones and patches the event
    loop class, so that Panini's *_sync helpers can re-enter a running loop.  The
    bridge never uses those helpers, and the pure-Python versions cost time on
    every await of every message (README, Benchmark), so the originals go back.
    """
    import _asyncio

    asyncio.Task = asyncio.tasks.Task = asyncio.tasks._CTask = _asyncio.Task  # type: ignore[attr-defined,misc]
    asyncio.Future = asyncio.futures.Future = asyncio.futures._CFuture = _asyncio.Future  # type: ignore[attr-defined,misc]
    asyncio.tasks._enter_task = _asyncio._enter_task  # type: ignore[attr-defined]
    asyncio.tasks._leave_task = _asyncio._leave_task  # type: ignore[attr-defined]
    if hasattr(asyncio, "_run_orig"):
        asyncio.run = asyncio._run_orig
    loop_class = asyncio.SelectorEventLoop
    if "_nest_patched" in vars(loop_class):
        for name in ("run_forever", "run_until_complete", "_run_once", "_check_running", "_check_runnung",
                     "_nest_patched", "_num_runs_pending", "_is_proactorloop"):
            if name in vars(loop_class):
                delattr(loop_class, name)


undo_nest_asyncio()

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The static route guesses types from this table; the RFC 9239 name, not the legacy one.
mimetypes.add_type("text/javascript", ".js")
TOKEN_COOKIE = "bridge_token"

# ---------------------------------------------------------------------------
# Typed application state
# ---------------------------------------------------------------------------

CONFIG = web.AppKey("config", Config)
PANINI = web.AppKey("panini", panini_app.App)
MANAGER = web.AppKey("manager", WSSManager)
LINK = web.AppKey("link", metrics.LinkStats)
SLOTS = web.AppKey("slots", asyncio.Semaphore)
REGISTRY = web.AppKey("registry", CollectorRegistry)


class StartupError(RuntimeError):
    """The service cannot start; the message is the one line the operator sees."""


# ---------------------------------------------------------------------------
# The app factory
# ---------------------------------------------------------------------------


def create_app(config: Config) -> panini_app.App:
    """Build the Panini app; ``app.http_server.web_app`` is the aiohttp app to serve."""
    app = panini_app.App(
        service_name=config.service_name,
        servers=config.nats_servers,
        # Reconnect for ever: Panini exits the process (code 99) once its NATS
        # client closes for good, and a bridge must ride out NATS restarts.
        reconnect=True,
        max_reconnect_attempts=-1,
        reconnecting_time_sleep=config.nats_reconnect_wait,
        # A logger of our own keeps Panini from writing log files under logs/.
        custom_logger=logging.getLogger("panini"),
    )
    web_app = web.Application(client_max_size=config.max_frame_bytes)
    app.setup_web_server(host=config.http_host, port=config.http_port, web_app=web_app)
    manager = WSSManager(lambda: app.nats.client, config.limits, config.policy)
    web_app[CONFIG] = config
    web_app[PANINI] = app
    web_app[MANAGER] = manager
    web_app[LINK] = metrics.LinkStats()
    web_app[SLOTS] = asyncio.Semaphore(config.max_connections)
    web_app[REGISTRY] = metrics.make_registry(manager, web_app[LINK], lambda: nats_connected(web_app))

    app.http.get("/")(index)
    app.http.get("/stream")(stream)
    app.http.post("/clients/{connection_id}")(control)
    app.http.get("/healthz")(healthz)
    app.http.get("/readyz")(readyz)
    app.http.get("/metrics")(metrics_endpoint)
    app.http.static("/static", STATIC_DIR)
    web_app.add_routes(app.http)

    if config.test_publish_interval > 0:
        register_test_publisher(app, config.test_publish_interval)

    web_app.cleanup_ctx.append(nats_connection)
    web_app.cleanup_ctx.append(panini_tasks)
    web_app.on_shutdown.append(close_websockets)
    return app


# ---------------------------------------------------------------------------
# The test publisher (the example's message, key3 random)
# ---------------------------------------------------------------------------


def test_message() -> dict[str, Any]:
    return {
        "key1": "value1",
        "key2": 2,
        "key3": random.random(),
        "key4": [1, 2, 3, 4],
        "key5": {"1": 1, "2": 2, "3": 3, "4": 4, "5": 5},
        "key6": {"subkey1": "1", "subkey2": 2, "3": 3, "4": 4, "5": 5},
        "key7": None,
    }


def register_test_publisher(app: panini_app.App, interval: float) -> None:
    @app.task(interval=interval)
    async def publish_periodically_for_test() -> None:
        nc: NATS = app.nats.client
        # While NATS is away, skip rather than pile test messages into the
        # reconnect buffer; the stream resumes when the link does.
        if nc.is_connected:
            await nc.publish(TEST_SUBJECT, json.dumps(test_message()).encode())


# ---------------------------------------------------------------------------
# Who may connect: Origin, token, connection slots
# ---------------------------------------------------------------------------


def _origin_pattern(pattern: str) -> re.Pattern[str]:
    # '*' stands for one or more host characters, never a scheme, port or path separator.
    parts = [re.escape(p) for p in pattern.lower().rstrip("/").split("*")]
    return re.compile("[^/:@]+".join(parts))


def origin_allowed(origin: str | None, host: str | None, allowed: Sequence[str]) -> bool:
    """Same-origin, an Origin on the allow list, or no Origin (not a browser)."""
    if origin is None:
        return True
    origin = origin.lower().rstrip("/")
    if "*" in allowed or any(_origin_pattern(p).fullmatch(origin) for p in allowed):
        return True
    parts = urlsplit(origin)
    if not parts.hostname or not host:
        return False
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    try:
        served = urlsplit("//" + host.lower())
        return parts.hostname == served.hostname and (parts.port or default_port) == (
            served.port or default_port
        )
    except ValueError:  # a Host header with a bad port
        return False


def presented_token(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.query.get("token") or request.cookies.get(TOKEN_COOKIE)


def token_valid(given: str | None, tokens: Sequence[str]) -> bool:
    if given is None:
        return False
    # Compare against every token, in constant time, so timing says nothing.
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(token.encode(), given.encode())
    return ok


def refusal(request: web.Request, reason: str, status: int, message: str) -> web.Response:
    request.app[LINK].refusals[reason] += 1
    logger.info("refused %s from %s: %s", request.path, request.remote, message)
    return web.json_response({"success": False, "message": message}, status=status)


def check_auth(request: web.Request) -> web.Response | None:
    tokens = request.app[CONFIG].auth_tokens
    if tokens and not token_valid(presented_token(request), tokens):
        return refusal(request, "auth", 401, "Unauthorized: a valid token is required")
    return None


# ---------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


def nats_connected(web_app: web.Application) -> bool:
    nc = getattr(web_app[PANINI].nats, "client", None)
    return nc is not None and nc.is_connected


async def stream(request: web.Request) -> web.StreamResponse:
    """One WebSocket client: checks, register, read control frames, always unregister."""
    config, manager, slots = request.app[CONFIG], request.app[MANAGER], request.app[SLOTS]
    if not origin_allowed(request.headers.get("Origin"), request.host, config.allowed_origins):
        return refusal(request, "origin", 403, "Forbidden: this Origin may not connect")
    denied = check_auth(request)
    if denied:
        return denied
    if slots.locked():
        return refusal(request, "capacity", 503, "Too many connections; try again later")
    await slots.acquire()
    try:
        return await serve_websocket(request, config, manager)
    finally:
        slots.release()


async def serve_websocket(request: web.Request, config: Config, manager: WSSManager) -> web.WebSocketResponse:
    # compress=False: permessage-deflate would compress each frame once per
    # client, while the uncompressed frame is built once for all of them.
    ws = web.WebSocketResponse(
        compress=False,
        # aiohttp refuses a frame of exactly max_msg_size; ours is the largest allowed.
        max_msg_size=config.max_frame_bytes + 1,
        heartbeat=config.ping_interval or None,
    )
    # aiohttp fixes the pong timeout at half the ping interval; ours is a setting.
    ws._pong_heartbeat = config.pong_timeout
    await ws.prepare(request)
    client = manager.register(request, ws, nats_connected(request.app))
    logger.info("connection %s opened from %s", client.id, client.peer)
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await manager.handle_text(client, msg.data)
            elif msg.type is WSMsgType.BINARY:
                manager.reject_binary(client)
            elif msg.type is WSMsgType.ERROR:
                logger.info("connection %s: %r", client.id, ws.exception())
    except Exception:
        # The one catch-all, at the connection boundary: one client's failure
        # must never reach the server or other clients.
        logger.exception("connection %s failed", client.id)
    finally:
        await manager.unregister(client)
        logger.info(
            "connection %s closed: peer %s, code %s, %d frames sent, %d dropped, %.1f s",
            client.id, client.peer, client.close_code or ws.close_code, client.sent, client.dropped,
            time.monotonic() - client.opened,
        )
    return ws


async def control(request: web.Request) -> web.Response:
    """Subscribe or unsubscribe a connected client from a backend, same JSON body and replies."""
    denied = check_auth(request)
    if denied:
        return denied
    manager = request.app[MANAGER]
    client = manager.clients.get(request.match_info["connection_id"])
    if client is None:
        return web.json_response({"success": False, "message": "No such connection", "type": "reply"},
                                 status=404)
    replies = await manager.handle_request(client, await request.text())
    for frame in replies:
        # The client hears about it too, so its view of its subscriptions stays true.
        client.send_json({**frame, "source": "http"})
    ok = all(frame["success"] for frame in replies)
    body = {
        "success": ok,
        "message": "; ".join(frame["message"] for frame in replies),
        "type": "reply",
        "replies": replies,
    }
    return web.json_response(body, status=200 if ok else 400)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if nats_connected(request.app):
        return web.json_response({"status": "ready", "nats": "connected"})
    return web.json_response({"status": "not ready", "nats": "disconnected"}, status=503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = metrics.render(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


# ---------------------------------------------------------------------------
# Lifecycle
# ---------------------------------------------------------------------------


async def nats_connection(web_app: web.Application) -> AsyncIterator[None]:
    """Connect Panini's NATS client (bounded retries at start), drain it at the very end."""
    app, config, manager, link = web_app[PANINI], web_app[CONFIG], web_app[MANAGER], web_app[LINK]
    nc = NATS()
    connected = False
    attempts = 0

    async def error_cb(exc: Exception) -> None:
        nonlocal attempts
        if not connected:
            attempts += 1
            logger.warning("NATS at %s not reachable (attempt %d): %s",
                           config.nats_url, attempts, exc or type(exc).__name__)
        else:
            logger.warning("NATS error: %r", exc)

    async def disconnected_cb() -> None:
        if connected and not nc.is_closed and not nc.is_draining:
            link.nats_disconnects += 1
            logger.warning("NATS connection lost; reconnecting")
            manager.broadcast({"success": False, "type": "status", "nats": "disconnected",
                               "message": "NATS connection lost; reconnecting"})

    async def reconnected_cb() -> None:
        link.nats_reconnects += 1
        logger.info("NATS connection restored (%s)", nc.connected_url.netloc if nc.connected_url else "?")
        # nats-py has already re-sent every SUB, so clients resume as they were.
        manager.broadcast({"success": True, "type": "status", "nats": "connected",
                           "message": "NATS connection restored"})

    # Panini's own connect (NATSClient._establish_connection) would also start
    # a watcher that calls exit(99) when the client closes, so we connect its
    # client with its settings here, where start and stop are ours to order.
    options: dict[str, Any] = {
        "servers": app.nats.servers,
        "name": app.client_nats_name,
        "allow_reconnect": app.nats.allow_reconnect,
        "max_reconnect_attempts": app.nats.max_reconnect_attempts,
        "reconnect_time_wait": app.nats.reconnecting_time_wait,
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
        "drain_timeout": 5,
    }
    try:
        await asyncio.wait_for(nc.connect(**options), timeout=config.nats_connect_timeout)
    except TimeoutError:
        raise StartupError(
            f"cannot reach NATS at {config.nats_url} after {config.nats_connect_timeout:g} s "
            f"({attempts} attempts); is nats-server running? (set NATS_URL / --nats-url)"
        ) from None
    connected = True
    app.nats.client = nc
    logger.info("connected to NATS at %s as %s", nc.connected_url.netloc, app.client_nats_name)
    yield
    # Runs after on_shutdown has closed every WebSocket.
    if nc.is_connected:
        await nc.drain()
    elif not nc.is_closed:
        await nc.close()


async def panini_tasks(web_app: web.Application) -> AsyncIterator[None]:
    """Run the tasks registered with ``@app.task`` and stop them before NATS goes."""
    app = web_app[PANINI]
    # TaskManager.create_tasks() would start them untracked; we keep the
    # handles so shutdown can stop them before the NATS connection drains.
    tasks = [asyncio.create_task(task()) for task in app._task_manager.tasks]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def close_websockets(web_app: web.Application) -> None:
    await web_app[MANAGER].close_all(CLOSE_GOING_AWAY, "server shutting down")


# ---------------------------------------------------------------------------
# Logging and the entry point
# ---------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"main.py: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    app = create_app(config)
    try:
        # run_app turns SIGINT/SIGTERM into a graceful shutdown: on_shutdown
        # (clients get 1001), then the cleanup contexts (tasks, NATS drain).
        web.run_app(
            app.http_server.web_app,
            host=config.http_host,
            port=config.http_port,
            print=lambda text: logger.info("%s", text.splitlines()[0].strip("= ")),
            shutdown_timeout=10,
        )
    except StartupError as exc:
        print(f"main.py: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the port is taken
        where = f"{config.http_host}:{config.http_port}"
        print(f"main.py: error: cannot serve on {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
