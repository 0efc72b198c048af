"""The bridge's one NATS connection: made at start, watched while up, let go at stop.

At start the connection is retried every ``NATS_RECONNECT_WAIT`` seconds for
at most ``NATS_CONNECT_TIMEOUT``; then the bridge gives up with one line.  A
NATS_URL whose servers answer but are clearly not NATS (an HTTP port) stops the
start at once, with what they answered (``not_nats``).
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
from urllib.parse import urlsplit

from aiohttp import web
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from bridge import panini_workarounds
from bridge.config import CONFIG, StartupError
from bridge.core.redaction import escape, redact_url
from bridge.panini_workarounds import PANINI
from bridge.process.metrics import LINK

logger = logging.getLogger(__name__)

# The final flush hands nats-server our UNSUBs and what we published; on a
# healthy link it takes milliseconds.  Past these bounds the link is not
# healthy, and waiting longer only delays the exit.
DRAIN_TIMEOUT = 1.5
CLOSE_TIMEOUT = 1.0

# nats-py's own bound on a TCP connect plus the server's INFO (its connect_timeout default).
NATS_PY_CONNECT_TIMEOUT = 2.0
# nats-server sends its INFO line the moment it accepts a connection; a peer that
# has said nothing by then is waiting for us to speak first (an HTTP server).
GREETING_TIMEOUT = 2.0
# Said to a silent peer: an HTTP server answers it with a 400 status line, which names it.
NUDGE = b"PING\r\n"


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
                           servers, attempts, connect_failure(exc))
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

    connecting = asyncio.ensure_future(panini_workarounds.connect(
        app, config.nats_connect_timeout,
        error_cb=error_cb, disconnected_cb=disconnected_cb, reconnected_cb=reconnected_cb,
    ))
    # Beside the connect, each server is asked what it is: a port that answers but is not
    # NATS (NATS_URL pointing at an HTTP server) would otherwise be retried until
    # NATS_CONNECT_TIMEOUT with a reason nats-py leaves empty.
    probing = asyncio.ensure_future(not_nats(config.nats_servers))
    try:
        await asyncio.wait({connecting, probing}, return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done() and probing.result():
            raise StartupError(f"NATS_URL={servers}: {probing.result()} (set NATS_URL / --nats-url)")
        nc = await connecting
    except TimeoutError:
        raise StartupError(
            f"cannot reach NATS at {servers} after {config.nats_connect_timeout:g} s "
            f"({attempts} attempts); is nats-server running? (set NATS_URL / --nats-url)"
        ) from None
    finally:
        # Ours to stop whatever ends the wait (the connect, when the probe gave up on NATS; a
        # cancelled start): their CancelledError is collected, ours still propagates.
        for task in (connecting, probing):
            task.cancel()
        await asyncio.gather(connecting, probing, return_exceptions=True)
    connected = True
    logger.info("connected to NATS at %s as %s", _server(nc), app.client_nats_name)
    yield
    # Runs after on_shutdown has closed every WebSocket.
    await let_go(nc)


def connect_failure(exc: BaseException) -> str:
    """Why an attempt to connect failed, in words (nats-py's timeouts and some of its errors have none)."""
    if isinstance(exc, TimeoutError):
        return (f"no connection, or no NATS greeting (INFO) from the server, within "
                f"{NATS_PY_CONNECT_TIMEOUT:g} s ({type(exc).__name__})")
    if isinstance(exc, NatsError) and "expecting INFO" in str(exc):
        # nats-py's words for a first line that is not INFO: "empty response from server".
        return "it answered, but not with a NATS greeting (INFO): is this a NATS port?"
    return str(exc) or type(exc).__name__


async def not_nats(urls: list[str]) -> str | None:
    """Why the servers at ``urls`` are not NATS servers, if each clearly is not; else None.

    Clearly not NATS: it answered, and not with INFO (a silent peer is nudged first,
    see NUDGE).  Anything less certain (refused, unreachable, closed at once, silent
    even when nudged: NATS behind a proxy that is not up yet) is left to nats-py's
    retries; so is a list where any one server may still be NATS.
    """
    answers = await asyncio.gather(*(_answer(url) for url in urls))
    if any(answer is None for answer in answers):
        for url, answer in zip(urls, answers, strict=True):
            if answer is not None:
                logger.warning("NATS_URL: %s is not a NATS server: it answered %s", redact_url(url), answer)
        return None
    if len(urls) == 1:
        return f"not a NATS server: it answered {answers[0]}"
    return "none is a NATS server: " + "; ".join(
        f"{redact_url(url)} answered {answer}" for url, answer in zip(urls, answers, strict=True))


async def _answer(url: str) -> str | None:
    """The first line the server at ``url`` sends, quoted, if it is not a NATS INFO; else None."""
    parts = urlsplit(url)
    if parts.scheme != "nats" or not parts.hostname:
        return None  # tls/ws/wss: their first bytes are not ours to judge here
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port or 4222), NATS_PY_CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError):
        return None
    try:
        first = await _first_line(reader)
        if first is None:
            writer.write(NUDGE)
            await writer.drain()
            first = await _first_line(reader)
    except OSError:
        return None
    finally:
        writer.close()
    if not first or first.startswith(b"INFO"):
        return None
    line = first.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "backslashreplace")
    return "'" + escape(line[:80]) + ("...'" if len(line) > 80 else "'")


async def _first_line(reader: asyncio.StreamReader) -> bytes | None:
    """What the peer sends first (up to a line, or 200 bytes); b"" if it closed; None if silent."""
    data = b""
    try:
        async with asyncio.timeout(GREETING_TIMEOUT):
            while len(data) < 200 and b"\n" not in data:
                chunk = await reader.read(200 - len(data))
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        return data or None
    return data


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
