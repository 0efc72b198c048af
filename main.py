"""NATS ⇄ WebSocket bridge built on Panini: the wiring, in one screen.

``create_app`` builds the Panini app from the settings (bridge/config.py): the
test publisher, the control plane, the HTTP and WebSocket routes, and the
lifecycle.  ``main`` binds the port, then serves until SIGTERM/SIGINT: itself,
or with ``WORKERS`` > 1 through N worker processes (bridge/process/workers.py).
What each part does lives in the bridge package (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial

from aiohttp import web
from panini import app as panini_app

from bridge import panini_workarounds
from bridge.config import (
    CONFIG,
    EXIT_BAD_SETTING,
    EXIT_RUNTIME,
    Config,
    ConfigError,
    StartupError,
    load_config,
)
from bridge.core.frames import CLOSE_GOING_AWAY
from bridge.core.presence import PresenceSpace
from bridge.core.redaction import redact, scrub
from bridge.core.stats import LinkStats
from bridge.jetstream.api import HEARTBEAT
from bridge.panini_workarounds import PANINI
from bridge.plane.control_plane import PLANE, ControlPlane
from bridge.presence.room import Presence
from bridge.process import demo, memory, metrics, nats_link, siblings, workers
from bridge.process.keys import KEYS, KeyStore
from bridge.process.logs import AccessLog, configure_logging
from bridge.process.metrics import LINK, REGISTRY
from bridge.process.workers import WORKER, Worker
from bridge.web import access, control_api, events, headers, routes
from bridge.web.routes import MANAGER
from handler import WSSManager

logger = logging.getLogger("bridge")

# The static route guesses types from this table; the RFC 9239 name, not the legacy one.
mimetypes.add_type("text/javascript", ".js")


def create_app(config: Config, worker: Worker = workers.LONE) -> panini_app.App:
    """Build the Panini app; ``app.http_server.web_app`` is the aiohttp app to serve."""
    if config.dangerously_unprotect_subjects:
        # Said at every start, so an operator reading the log cannot miss what is open.
        logger.warning("DANGEROUSLY_UNPROTECT_SUBJECTS: browsers may follow and publish on %s "
                       "(within SUBJECT_ALLOW and PUBLISH_ALLOW)",
                       ", ".join(config.dangerously_unprotect_subjects))
    app = panini_workarounds.make_app(config.service_name, config.nats_servers, config.nats_reconnect_wait)
    # check_host first: a rebound Host is refused before any route is looked at (access.py).
    web_app = web.Application(client_max_size=config.max_frame_bytes, middlewares=[access.check_host])
    web_app.on_response_prepare.append(headers.add_security_headers)
    app.setup_web_server(host=config.http_host, port=config.http_port, web_app=web_app)
    keys = KeyStore(config)
    nats = partial(panini_workarounds.nats_client, app)
    presence = partial(Presence, space=PresenceSpace(config.presence_subjects), root=config.control_subject,
                       ttl=config.presence_ttl, max_entries=config.presence_max,
                       max_subject_length=config.max_subject_length, worker=worker.index)
    manager = WSSManager(nats, config.limits, config.policy, config.max_connections,
                         verifier=lambda: keys.verifier, refresh_lead=config.jwt_refresh_lead,
                         worker=worker.index, max_connections_per_user=config.max_connections_per_user,
                         presence=presence)
    plane = ControlPlane(app, manager, nats, config.control_subject, config.control_timeout,
                         config.control_heartbeat, worker.index)
    web_app[CONFIG] = config
    web_app[KEYS] = keys
    web_app[PANINI] = app
    web_app[MANAGER] = manager
    web_app[PLANE] = plane
    web_app[WORKER] = worker
    web_app[LINK] = LinkStats()
    web_app[REGISTRY] = metrics.make_registry(manager, web_app[LINK], partial(nats_link.connected, web_app))

    app.http.get("/")(routes.index)
    app.http.get("/stream")(routes.stream)
    # No HEAD: a stream's head would promise a body that a HEAD answer must not have.
    app.http.get("/events", allow_head=False)(events.events)
    app.http.route("OPTIONS", "/events")(events.preflight)
    app.http.post("/clients/{connection_id}")(control_api.post_client)
    app.http.delete("/clients/{connection_id}")(control_api.delete_client)
    app.http.post("/users/{sub}")(control_api.post_user)
    app.http.delete("/users/{sub}")(control_api.delete_user)
    app.http.get("/healthz")(routes.healthz)
    app.http.get("/readyz")(routes.readyz)
    app.http.get("/metrics")(routes.metrics_endpoint)
    app.http.static("/static", routes.STATIC_DIR)
    web_app.add_routes(app.http)

    if config.test_publish_interval > 0 and worker.index == 1:  # one test stream per host
        demo.register(app, config.test_publish_interval)
    app.task(interval=HEARTBEAT)(manager.registry.check_feeds)
    app.task(interval=memory.INTERVAL)(memory.give_back)
    app.task(interval=manager.presence.tick_interval)(manager.presence.tick)

    web_app.cleanup_ctx.append(keys.lifecycle)  # a bad key fails the start before NATS is tried
    # First in, last out: NATS outlives the rest.
    web_app.cleanup_ctx.append(partial(nats_link.nats_link, on_status=manager.broadcast))
    if config.create_stream and worker.index == 1:
        web_app.cleanup_ctx.append(partial(demo.demo_stream, jetstream=manager.jetstream))
    web_app.cleanup_ctx.append(plane.lifecycle)
    web_app.cleanup_ctx.append(manager.presence.lifecycle)  # its lease removed before NATS goes
    web_app.cleanup_ctx.append(manager.requester.lifecycle)  # browsers' NATS requests: the reply inbox
    web_app.cleanup_ctx.append(siblings.private_site)
    web_app.cleanup_ctx.append(panini_tasks)
    web_app.on_shutdown.append(plane.leave)  # peers stop waiting for us first
    web_app.on_shutdown.append(close_websockets)
    return app


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
    logger.info("stopping: closing %d connections", len(manager.sessions))
    await manager.close_all(CLOSE_GOING_AWAY, "server shutting down", timeout=1.0)


def main(argv: Sequence[str] | None = None) -> int:
    workers.hold_stop_signals()  # released once a handler can stop us gracefully
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"main.py: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_BAD_SETTING
    configure_logging(config.log_level, config.log_format)
    try:
        sockets = workers.listen(config.http_host, config.http_port, config.workers)
    except socket.gaierror as exc:
        # HTTP_HOST names no address.  A bad setting (2), like any other, unless the lookup
        # could not be made just now (EAI_AGAIN: a DNS server down), which a restart may
        # cure (1).  (os.strerror knows nothing of resolver codes: "Unknown error -2".)
        print(f"main.py: error: HTTP_HOST={config.http_host!r}: cannot resolve host "
              f"{config.http_host!r}: {exc.strerror}", file=sys.stderr)
        return EXIT_RUNTIME if exc.errno == socket.EAI_AGAIN else EXIT_BAD_SETTING
    except OSError as exc:
        # The address is fine but cannot be had now (taken, or not on this host yet): runtime (1).
        where = f"{config.http_host}:{config.http_port}"
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        print(f"main.py: error: cannot serve on {where}: {reason}", file=sys.stderr)
        return EXIT_RUNTIME
    if config.workers == 1:
        return serve(config, sockets[0])
    return workers.supervise(sockets, partial(serve, config))


def serve(config: Config, sock: socket.socket, worker: Worker = workers.LONE,
          ready: Callable[[], None] | None = None) -> int:
    """One bridge process on ``sock`` until SIGTERM/SIGINT; its exit code."""
    if worker.count > 1:
        configure_logging(config.log_level, config.log_format, worker.index)
    workers.hold_stop_signals()
    app = create_app(config, worker)
    web_app = app.http_server.web_app

    async def release(_: web.Application) -> None:
        workers.release_stop_signals()  # our handlers are in place: a stop is graceful now

    web_app.cleanup_ctx.insert(0, workers.stop_once)
    web_app.on_startup.insert(0, release)
    if ready is not None:
        async def started(_: web.Application) -> None:
            ready()

        web_app.on_startup.append(started)
    try:
        # A stop signal means a graceful shutdown: on_shutdown (clients get
        # 1001), then the cleanup contexts (tasks, NATS let go).
        web.run_app(
            web_app,
            sock=sock,
            print=lambda text: logger.info("%s", text.splitlines()[0].strip("= ")),
            shutdown_timeout=2,
            # Tokens in URLs (?token=, Referer) are logged redacted (AccessLog); the
            # tests' runner (tests/conftest.py) serves the app with it too.
            access_log_class=AccessLog,
        )
    except StartupError as exc:
        # The message may name a URL given with its password (NATS_URL, JWT_JWKS), and quote
        # what a server answered: credentials hidden, one line whatever it holds.  With
        # WORKERS > 1 this is a worker's exit code, and the supervisor exits with it (workers.py).
        print(f"main.py: error: {scrub(str(exc))}", file=sys.stderr)
        return exc.exit_code
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
