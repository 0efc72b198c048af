"""NATS ⇄ WebSocket bridge built on Panini.

Read top to bottom: configuration, the app factory, the HTTP and WebSocket
routes, the lifecycle hooks, and ``main()``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web
from nats.aio.client import Client as NATS
from panini import app as panini_app

from handler import (
    CLOSE_GOING_AWAY,
    Limits,
    WSSManager,
    reply,
)

logger = logging.getLogger("bridge")

STATIC_DIR = Path(__file__).resolve().parent / "static"
TEST_SUBJECT = "test.subject"


# ---------------------------------------------------------------------------
# Configuration: every setting is an env var and a flag (see README.md).
# ---------------------------------------------------------------------------


class ConfigError(ValueError):
    """A setting has a value we cannot use; reported as one line, no traceback."""


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a number >= 0")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a number > 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be a whole number >= 1")
    return value


def _nats_urls(text: str) -> str:
    urls = [u.strip() for u in text.split(",") if u.strip()]
    if not urls:
        raise ValueError("must name at least one server, e.g. nats://127.0.0.1:4222")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
            raise ValueError(f"{url!r} is not a NATS URL like nats://host:4222")
    return ",".join(urls)


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return level


def setting(env: str, parse: Callable[[str], Any], help: str) -> dict[str, Any]:
    return {"env": env, "parse": parse, "help": help}


@dataclass(frozen=True)
class Config:
    nats_url: str = field(
        default="nats://127.0.0.1:4222",
        metadata=setting("NATS_URL", _nats_urls, "NATS server URLs, comma-separated (failover)"),
    )
    http_host: str = field(
        default="0.0.0.0", metadata=setting("HTTP_HOST", str, "address the HTTP server binds")
    )
    http_port: int = field(
        default=5001, metadata=setting("HTTP_PORT", _port, "port of the page, /stream and the API")
    )
    test_publish_interval: float = field(
        default=1.0,
        metadata=setting(
            "TEST_PUBLISH_INTERVAL",
            _non_negative_float,
            f"seconds between test messages on {TEST_SUBJECT}; 0 turns the publisher off",
        ),
    )
    nats_connect_timeout: float = field(
        default=30.0,
        metadata=setting(
            "NATS_CONNECT_TIMEOUT",
            _positive_float,
            "seconds to keep trying to reach NATS at start before exiting",
        ),
    )
    nats_reconnect_wait: float = field(
        default=1.0,
        metadata=setting(
            "NATS_RECONNECT_WAIT", _positive_float, "seconds between attempts to (re)connect to NATS"
        ),
    )
    client_queue_messages: int = field(
        default=10_000,
        metadata=setting(
            "CLIENT_QUEUE_MESSAGES",
            _positive_int,
            "frames one client may have waiting; past it the client is closed with 1013",
        ),
    )
    client_queue_bytes: int = field(
        default=8 * 1024 * 1024,
        metadata=setting(
            "CLIENT_QUEUE_BYTES",
            _positive_int,
            "bytes one client may have waiting; past it the client is closed with 1013",
        ),
    )
    max_subject_length: int = field(
        default=256,
        metadata=setting("MAX_SUBJECT_LENGTH", _positive_int, "longest subject accepted, in bytes"),
    )
    service_name: str = field(
        default="async_NATS_WSS_bridge",
        metadata=setting("SERVICE_NAME", str, "Panini service name, shown in NATS as the client name"),
    )
    log_level: str = field(
        default="INFO", metadata=setting("LOG_LEVEL", _log_level, "DEBUG, INFO, WARNING or ERROR")
    )

    @property
    def nats_servers(self) -> list[str]:
        return self.nats_url.split(",")

    @property
    def limits(self) -> Limits:
        return Limits(
            queue_messages=self.client_queue_messages,
            queue_bytes=self.client_queue_bytes,
            max_subject_length=self.max_subject_length,
        )


def _flag(f: dataclasses.Field[Any]) -> str:
    return "--" + f.name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="NATS ⇄ WebSocket bridge. Every flag can also be set by its env var; "
        "a flag wins over the env var.",
    )
    for f in dataclasses.fields(Config):
        meta = f.metadata
        parser.add_argument(
            _flag(f),
            dest=f.name,
            metavar=meta["env"],
            default=None,
            help=f"{meta['help']} (env {meta['env']}, default {f.default})",
        )
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults, then env vars, then flags; each value checked by its parser."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        env = f.metadata["env"]
        given = getattr(args, f.name)
        source = _flag(f) if given is not None else env
        raw = given if given is not None else environ.get(env)
        if raw is None:
            continue
        try:
            values[f.name] = f.metadata["parse"](raw)
        except ValueError as exc:
            reason = str(exc) if "must" in str(exc) or "NATS URL" in str(exc) else "not a valid value"
            raise ConfigError(f"{source}={raw!r}: {reason}") from None
    return Config(**values)


# ---------------------------------------------------------------------------
# Typed application state
# ---------------------------------------------------------------------------

CONFIG = web.AppKey("config", Config)
PANINI = web.AppKey("panini", panini_app.App)
MANAGER = web.AppKey("manager", WSSManager)


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
    web_app = web.Application()
    app.setup_web_server(host=config.http_host, port=config.http_port, web_app=web_app)
    web_app[CONFIG] = config
    web_app[PANINI] = app
    web_app[MANAGER] = WSSManager(lambda: app.nats.client, config.limits)

    app.http.get("/")(index)
    app.http.get("/stream")(stream)
    app.http.post("/clients/{connection_id}")(control)
    app.http.get("/healthz")(healthz)
    app.http.get("/readyz")(readyz)
    app.http.static("/static", STATIC_DIR)
    web_app.add_routes(app.http)

    if config.test_publish_interval > 0:
        register_test_publisher(app, config.test_publish_interval)

    web_app.cleanup_ctx.append(nats_connection)
    web_app.cleanup_ctx.append(panini_tasks)
    web_app.on_shutdown.append(close_websockets)
    return app


def test_message() -> dict[str, Any]:
    """The example's test message; key3 changes every time."""
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
# Routes
# ---------------------------------------------------------------------------


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


def nats_connected(web_app: web.Application) -> bool:
    nc = getattr(web_app[PANINI].nats, "client", None)
    return nc is not None and nc.is_connected


async def stream(request: web.Request) -> web.WebSocketResponse:
    """One WebSocket client: register, read control frames, always unregister."""
    manager = request.app[MANAGER]
    # compress=False: permessage-deflate would compress each frame once per
    # client, while the uncompressed frame is built once for all of them.
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    peer = request.remote or "?"
    client = manager.register(ws, peer, nats_connected(request.app))
    logger.info("connection %s opened from %s", client.id, peer)
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await manager.handle_text(client, msg.data)
            elif msg.type is WSMsgType.BINARY:
                client.send_json(reply(False, "Binary frames are not supported: send JSON as text"))
            elif msg.type is WSMsgType.ERROR:
                logger.info("connection %s: %r", client.id, ws.exception())
    except Exception:
        # The one catch-all, at the connection boundary: one client's failure
        # must never reach the server or other clients.
        logger.exception("connection %s failed", client.id)
    finally:
        await manager.unregister(client)
        logger.info(
            "connection %s closed: code %s, %d frames sent, %.1f s",
            client.id,
            client.close_code or ws.close_code,
            client.sent,
            time.monotonic() - client.opened,
        )
    return ws


async def control(request: web.Request) -> web.Response:
    """Subscribe or unsubscribe a connected client from a backend, same JSON body and replies."""
    manager = request.app[MANAGER]
    client = manager.clients.get(request.match_info["connection_id"])
    if client is None:
        return web.json_response(
            {"success": False, "message": "No such connection", "type": "reply"}, status=404
        )
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


# ---------------------------------------------------------------------------
# Lifecycle
# ---------------------------------------------------------------------------


async def nats_connection(web_app: web.Application) -> AsyncIterator[None]:
    """Connect Panini's NATS client (bounded retries), drain it at the very end."""
    app = web_app[PANINI]
    config = web_app[CONFIG]
    manager = web_app[MANAGER]
    nc = NATS()
    connected = False
    attempts = 0

    async def error_cb(exc: Exception) -> None:
        nonlocal attempts
        if not connected:
            attempts += 1
            logger.warning(
                "NATS at %s not reachable (attempt %d): %s",
                config.nats_url, attempts, exc or type(exc).__name__,
            )
        else:
            logger.warning("NATS error: %r", exc)

    async def disconnected_cb() -> None:
        if connected and not nc.is_closed and not nc.is_draining:
            logger.warning("NATS connection lost; reconnecting")
            manager.broadcast(
                {"success": False, "type": "status", "nats": "disconnected",
                 "message": "NATS connection lost; reconnecting"}
            )

    async def reconnected_cb() -> None:
        logger.info("NATS connection restored (%s)", nc.connected_url.netloc if nc.connected_url else "?")
        manager.broadcast(
            {"success": True, "type": "status", "nats": "connected",
             "message": "NATS connection restored"}
        )

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
# Entry point
# ---------------------------------------------------------------------------


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"main.py: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
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
