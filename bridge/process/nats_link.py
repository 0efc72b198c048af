"""The bridge's one NATS connection: made at start, watched while up, let go at stop.

At start the connection is retried every ``NATS_RECONNECT_WAIT`` seconds for
at most ``NATS_CONNECT_TIMEOUT``; then the bridge gives up with one line.
While running, every client hears when the link drops and when it returns
(nats-py re-sends every SUB on reconnect, so subscriptions resume by themselves).
At stop the connection is flushed if it is up and closed, never waited on
for long: a stop must end promptly whatever NATS is doing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from bridge import panini_workarounds
from bridge.config import CONFIG, StartupError
from bridge.core.redaction import redact_url
from bridge.panini_workarounds import PANINI
from bridge.process.metrics import LINK

logger = logging.getLogger(__name__)

# The final flush hands nats-server our UNSUBs and what we published; on a
# healthy link it takes milliseconds.  Past these bounds the link is not
# healthy, and waiting longer only delays the exit.
DRAIN_TIMEOUT = 1.5
CLOSE_TIMEOUT = 1.0


async def nats_link(web_app: web.Application,
                    on_status: Callable[[dict[str, Any]], None]) -> AsyncIterator[None]:
    """aiohttp cleanup context: connect Panini's NATS client, let it go at the very end.

    ``on_status`` hears each loss and return of the link, as a status frame for every client.
    """
    app, config, link = web_app[PANINI], web_app[CONFIG], web_app[LINK]
    connected = False
    attempts = 0
    nc: NATS | None = None
    # NATS_URL may carry a user's password or a token (nats://user:pass@host,
    # nats://token@host): every line and error below names the servers without it.
    servers = redact_url(config.nats_url)

    async def error_cb(exc: Exception) -> None:
        nonlocal attempts
        if not connected:
            attempts += 1
            logger.warning("NATS at %s not reachable (attempt %d): %s",
                           servers, attempts, exc or type(exc).__name__)
        else:
            logger.warning("NATS error: %r", exc)

    async def disconnected_cb() -> None:
        if connected and nc is not None and not nc.is_closed and not nc.is_draining:
            link.nats_disconnects += 1
            logger.warning("NATS connection lost; reconnecting")
            on_status({"success": False, "type": "status", "nats": "disconnected",
                               "message": "NATS connection lost; reconnecting"})

    async def reconnected_cb() -> None:
        link.nats_reconnects += 1
        logger.info("NATS connection restored (%s)", _server(nc))
        on_status({"success": True, "type": "status", "nats": "connected",
                           "message": "NATS connection restored"})

    try:
        nc = await panini_workarounds.connect(
            app, config.nats_connect_timeout,
            error_cb=error_cb, disconnected_cb=disconnected_cb, reconnected_cb=reconnected_cb,
        )
    except TimeoutError:
        raise StartupError(
            f"cannot reach NATS at {servers} after {config.nats_connect_timeout:g} s "
            f"({attempts} attempts); is nats-server running? (set NATS_URL / --nats-url)"
        ) from None
    connected = True
    logger.info("connected to NATS at %s as %s", _server(nc), app.client_nats_name)
    yield
    # Runs after on_shutdown has closed every WebSocket.
    await let_go(nc)


def _server(nc: NATS | None) -> str:
    """The server ``nc`` is connected to, as its URL without credentials."""
    if nc is None or nc.connected_url is None:
        return "?"
    return redact_url(nc.connected_url.geturl())


async def let_go(nc: NATS) -> None:
    """Let the NATS connection go: flush what we sent if the link is up, then close; bounded.

    Not nats-py's ``drain()``: it swallows its own cancellation and then waits
    out a 10 s flush when NATS has just gone away, so a stop at that moment
    would hang for seconds.  By now every client is closed and every
    subscription dropped, so a flush (our UNSUBs and any publish reach the
    server) is all a drain would add.
    """
    if nc.is_connected:
        try:
            await nc.flush(timeout=DRAIN_TIMEOUT)
        except (TimeoutError, NatsError) as exc:
            # NATS went away at the last moment: nobody is left to hear us.
            logger.warning("NATS flush at shutdown abandoned: %r", exc)
    if not nc.is_closed:
        closing = asyncio.ensure_future(nc.close())
        done, _ = await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT)
        if closing in done and not closing.cancelled():
            closing.exception()  # read, so a failed close is not reported as unretrieved
        else:
            logger.warning("NATS connection did not close within %g s; leaving it", CLOSE_TIMEOUT)


def connected(web_app: web.Application) -> bool:
    """Is the NATS link up right now?"""
    nc = panini_workarounds.nats_client(web_app[PANINI])
    return nc is not None and nc.is_connected
