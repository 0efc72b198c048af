"""NATS ⇄ WebSocket bridge built on Panini: the wiring, in one screen.

``create_app`` builds the Panini app from the settings (config.py): the test
publisher, the HTTP and WebSocket routes, and the lifecycle.  ``main`` binds
the port, then serves until SIGTERM/SIGINT.  What each part does lives in its
own module; the README's Layout section lists them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import os
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiohttp import web
from panini import app as panini_app

import control
import metrics
import panini_workarounds
import routes
from app_state import CONFIG, KEYS, LINK, MANAGER, PANINI, REGISTRY
from config import TEST_SUBJECT, Config, ConfigError, StartupError, load_config
from frames import CLOSE_GOING_AWAY
from handler import WSSManager
from jetstream import HEARTBEAT, JetStreamError
from keys import KeyStore
from logs import configure_logging
from nats_link import nats_link

logger = logging.getLogger("bridge")

# The static route guesses types from this table; the RFC 9239 name, not the legacy one.
mimetypes.add_type("text/javascript", ".js")


def create_app(config: Config) -> panini_app.App:
    """Build the Panini app; ``app.http_server.web_app`` is the aiohttp app to serve."""
    app = panini_workarounds.make_app(config.service_name, config.nats_servers, config.nats_reconnect_wait)
    web_app = web.Application(client_max_size=config.max_frame_bytes)
    app.setup_web_server(host=config.http_host, port=config.http_port, web_app=web_app)
    keys = KeyStore(config)
    manager = WSSManager(lambda: panini_workarounds.nats_client(app), config.limits, config.policy,
                         config.max_connections, verifier=lambda: keys.verifier,
                         refresh_lead=config.jwt_refresh_lead)
    web_app[CONFIG] = config
    web_app[KEYS] = keys
    web_app[PANINI] = app
    web_app[MANAGER] = manager
    web_app[LINK] = metrics.LinkStats()
    web_app[REGISTRY] = metrics.make_registry(manager, web_app[LINK], lambda: routes.nats_connected(web_app))

    app.http.get("/")(routes.index)
    app.http.get("/stream")(routes.stream)
    app.http.post("/clients/{connection_id}")(control.post_client)
    app.http.delete("/clients/{connection_id}")(control.delete_client)
    app.http.post("/users/{sub}")(control.post_user)
    app.http.delete("/users/{sub}")(control.delete_user)
    app.http.get("/healthz")(routes.healthz)
    app.http.get("/readyz")(routes.readyz)
    app.http.get("/metrics")(routes.metrics_endpoint)
    app.http.static("/static", routes.STATIC_DIR)
    web_app.add_routes(app.http)

    if config.test_publish_interval > 0:
        register_test_publisher(app, config.test_publish_interval)
    app.task(interval=HEARTBEAT)(manager.check_feeds)

    web_app.cleanup_ctx.append(keys.lifecycle)  # a bad key fails the start before NATS is tried
    web_app.cleanup_ctx.append(nats_link)  # first in, last out: NATS outlives the tasks
    if config.create_stream:
        web_app.cleanup_ctx.append(demo_stream)
    web_app.cleanup_ctx.append(panini_tasks)
    web_app.on_shutdown.append(close_websockets)
    return app


def test_message() -> dict[str, Any]:
    """The example's test message, key3 random."""
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
        nc = panini_workarounds.nats_client(app)
        # While NATS is away, skip rather than pile test messages into the
        # reconnect buffer; the stream resumes when the link does.
        if nc is not None and nc.is_connected:
            await nc.publish(TEST_SUBJECT, json.dumps(test_message()).encode())


async def stop_once(web_app: web.Application) -> AsyncIterator[None]:
    """The first SIGINT/SIGTERM stops the bridge; later ones are noted, not obeyed.

    aiohttp raises GracefulExit on every signal, so a second one (Ctrl-C in a
    terminal reaches both `make run` and the bridge, which then passes it on)
    would cut the shutdown short and exit 1.
    """
    loop = asyncio.get_running_loop()
    stopping = False

    def on_signal() -> None:
        nonlocal stopping
        if stopping:
            logger.info("already stopping")
            return
        stopping = True
        raise web.GracefulExit()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    yield
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)


async def demo_stream(web_app: web.Application) -> AsyncIterator[None]:
    """CREATE_STREAM: a stream for history to come from (make run's demo); never replaces one."""
    config = web_app[CONFIG]
    name, _, subjects = config.create_stream.partition(":")
    try:
        created = await web_app[MANAGER].jetstream.ensure_stream(
            name, subjects.split(","), config.create_stream_max_msgs, config.create_stream_max_age)
        logger.info("stream %s %s for %s", name, "created" if created else "already exists", subjects)
    except JetStreamError as exc:
        logger.warning("CREATE_STREAM: could not create stream %s: %s", name, exc)
    yield


async def panini_tasks(web_app: web.Application) -> AsyncIterator[None]:
    """Run the ``@app.task`` tasks; stop them before NATS goes."""
    tasks = panini_workarounds.start_tasks(web_app[PANINI])
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def close_websockets(web_app: web.Application) -> None:
    # Every client gets its 1001 at once; a peer that does not answer the
    # close within a second is cut off, so a stop never waits on one.
    manager = web_app[MANAGER]
    logger.info("stopping: closing %d connections", len(manager.clients))
    await manager.close_all(CLOSE_GOING_AWAY, "server shutting down", timeout=1.0)


def listen(host: str, port: int) -> socket.socket:
    """Bind the HTTP port now, before NATS is reached, so a taken port fails at once."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((host, port), family=family, backlog=128)


def stop_early(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # ends start-up quietly; run_app installs its own handlers later


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"main.py: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    # The port is bound (and reachable) before run_app handles signals: a stop
    # requested in that moment must still end with 0, not a default-handler kill.
    signal.signal(signal.SIGTERM, stop_early)
    try:
        sock = listen(config.http_host, config.http_port)
    except OSError as exc:
        where = f"{config.http_host}:{config.http_port}"
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        print(f"main.py: error: cannot serve on {where}: {reason}", file=sys.stderr)
        return 1
    try:
        app = create_app(config)
        web_app = app.http_server.web_app
        web_app.cleanup_ctx.insert(0, stop_once)
        # run_app turns SIGINT/SIGTERM into a graceful shutdown: on_shutdown
        # (clients get 1001), then the cleanup contexts (tasks, NATS let go).
        web.run_app(
            web_app,
            sock=sock,
            print=lambda text: logger.info("%s", text.splitlines()[0].strip("= ")),
            shutdown_timeout=2,
        )
    except StartupError as exc:
        print(f"main.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        logger.info("stopped during start-up")
        return 0
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
