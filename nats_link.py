"""The bridge's one NATS connection: made at start, watched while up, let go at stop.

At start the connection is retried every ``NATS_RECONNECT_WAIT`` seconds for
at most ``NATS_CONNECT_TIMEOUT``; then the bridge gives up with one line.
While running, every client hears when the link drops and when it returns
(nats-py re-sends every SUB on reconnect, so subscriptions resume by themselves).
At stop the connection is drained if it is up, but never waited on for long:
a stop must end promptly whatever NATS is doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from nats.aio.client import Client as NATS
from nats.errors import ConnectionClosedError
from nats.errors import Error as NatsError

import panini_workarounds
from app_state import CONFIG, LINK, MANAGER, PANINI
from config import StartupError

logger = logging.getLogger(__name__)

# A drain hands nats-server our UNSUBs and flushes what we published; on a
# healthy link it takes milliseconds.  Past these bounds the link is not
# healthy, and waiting longer only delays the exit.
DRAIN_TIMEOUT = 1.5
CLOSE_TIMEOUT = 1.0


async def nats_link(web_app: web.Application) -> AsyncIterator[None]:
    """aiohttp cleanup context: connect Panini's NATS client, let it go at the very end."""
    app, config, manager, link = web_app[PANINI], web_app[CONFIG], web_app[MANAGER], web_app[LINK]
    connected = False
    attempts = 0
    nc: NATS | None = None

    async def error_cb(exc: Exception) -> None:
        nonlocal attempts
        if not connected:
            attempts += 1
            logger.warning("NATS at %s not reachable (attempt %d): %s",
                           config.nats_url, attempts, exc or type(exc).__name__)
        else:
            logger.warning("NATS error: %r", exc)

    async def disconnected_cb() -> None:
        if connected and nc is not None and not nc.is_closed and not nc.is_draining:
            link.nats_disconnects += 1
            logger.warning("NATS connection lost; reconnecting")
            manager.broadcast({"success": False, "type": "status", "nats": "disconnected",
                               "message": "NATS connection lost; reconnecting"})

    async def reconnected_cb() -> None:
        link.nats_reconnects += 1
        url = nc.connected_url.netloc if nc is not None and nc.connected_url else "?"
        logger.info("NATS connection restored (%s)", url)
        manager.broadcast({"success": True, "type": "status", "nats": "connected",
                           "message": "NATS connection restored"})

    try:
        nc = await panini_workarounds.connect(
            app, config.nats_connect_timeout,
            error_cb=error_cb, disconnected_cb=disconnected_cb, reconnected_cb=reconnected_cb,
        )
    except TimeoutError:
        raise StartupError(
            f"cannot reach NATS at {config.nats_url} after {config.nats_connect_timeout:g} s "
            f"({attempts} attempts); is nats-server running? (set NATS_URL / --nats-url)"
        ) from None
    connected = True
    logger.info("connected to NATS at %s as %s", nc.connected_url.netloc, app.client_nats_name)
    yield
    # Runs after on_shutdown has closed every WebSocket.
    await let_go(nc)


async def let_go(nc: NATS) -> None:
    """Drain ``nc`` if the link is up, close it otherwise; bounded either way."""
    if nc.is_connected:
        drain = asyncio.ensure_future(nc.drain())
        await asyncio.wait({drain}, timeout=DRAIN_TIMEOUT)
        if drain.done() and not drain.cancelled() and drain.exception() is None:
            return
        # NATS went away mid-drain: nobody is left to hear the UNSUBs.
        failed = drain.done() and not drain.cancelled()
        why = drain.exception() if failed else f"not done in {DRAIN_TIMEOUT:g} s"
        logger.warning("NATS drain abandoned: %r", why)
        await _abandon(nc, drain)
    if not nc.is_closed:
        # OSError: closing flushes what is pending onto a socket that may be gone.
        with contextlib.suppress(TimeoutError, NatsError, OSError):
            await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT)


def connected(web_app: web.Application) -> bool:
    """Is the NATS link up right now?"""
    nc = panini_workarounds.nats_client(web_app[PANINI])
    return nc is not None and nc.is_connected


async def _abandon(nc: NATS, drain: asyncio.Future[None]) -> None:
    """End a drain that cannot finish, without cancelling it.

    nats-py's ``drain`` waits for a PONG after each UNSUB and once more at the
    end, each for up to 10 s; when the link drops mid-drain those PONGs never
    come (the reconnect forgets them).  Cancelling instead is no better: the
    drain swallows the first cancellation, and a cancellation caught in its
    ``gather`` leaves an exception asyncio logs at exit.  So the waits are
    ended the way a closed connection would end them: each outstanding PONG
    fails (``nc._pongs``, nats-py's own list), and the drain unwinds.
    """
    for _ in range(20):
        if drain.done():
            break
        for pong in list(nc._pongs):
            if not pong.done():
                pong.set_exception(ConnectionClosedError())
        await asyncio.wait({drain}, timeout=0.05)
    if not drain.done():
        drain.cancel()  # something else holds it: the last resort
    elif not drain.cancelled():
        drain.exception()  # retrieved: it was logged above, not by asyncio at exit
