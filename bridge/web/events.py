"""``GET /events``: NATS subjects as Server-Sent Events, with loss-free resume.

The story of an event stream, as ``events`` tells it:

1. the WebSocket's own checks (routes.admit: Origin, credential, the user's
   and the process's connection slots), then the URL (core/sse.py: the
   ``subject`` list, one history form, a Last-Event-ID);
2. a session whose outbox is *held* (hub/event_outbox.py), and every subject
   subscribed as the socket would (``WSSManager.subscribe``: grammar, limits,
   policy, streams, history, all or nothing; web/event_start.py).  Any
   refusal is an HTTP answer (400 invalid, 403 not allowed, 503 not now)
   before the stream begins: a client never gets half of what it asked;
3. the response: ``retry:`` and ``event: welcome`` (with the id that resumes
   every stored subject from here), the one ``event: recovered`` of a resume,
   the history, then live events;
4. the end: ``event: close`` (1013 slow, 4001 token expired, 1001 shutdown,
   4003 a backend's DELETE) or the peer hanging up; either way the session is
   released as a socket's is.
"""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING

from aiohttp import HttpVersion11, web

from bridge.config import CONFIG
from bridge.core.frames import dump
from bridge.core.refusal import Refused
from bridge.core.sse import QueryError, event, parse_query
from bridge.hub.event_outbox import EventOutbox
from bridge.web.access import MANAGER, admit, origin_allowed, refused
from bridge.web.event_start import Start, drop_history, follow

if TYPE_CHECKING:
    from bridge.core.sse import EventsQuery
    from bridge.core.tokens import Identity
    from bridge.hub.session import Session
    from handler import WSSManager

logger = logging.getLogger(__name__)

# EventSource waits this long (ms) before reconnecting, drawn per stream so that the pages of a
# restarted bridge do not all come back in the same instant.
RETRY_MS = (1000, 3000)
HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
           # nginx and its kind would otherwise buffer the stream.
           "X-Accel-Buffering": "no"}


def cors_headers(request: web.Request) -> dict[str, str]:
    """For a page of an allowed other origin: that origin, never ``*``, and credentials.

    Threat: another site reading a visitor's stream with the visitor's cookie.  A
    browser shows a page of another origin the answer only with these headers, and
    they are given only to an origin the WebSocket would admit (the bridge's own, or
    one ALLOWED_ORIGINS lists), named as it came: ``*`` would hand every site the
    stream, and browsers refuse ``*`` with credentials anyway.
    """
    origin = request.headers.get("Origin")
    if origin is None or not origin_allowed(origin, request.host, request.app[CONFIG].allowed_origins):
        return {}
    return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true",
            "Vary": "Origin"}


async def preflight(request: web.Request) -> web.Response:
    """``OPTIONS /events``: a page of an allowed origin may send Last-Event-ID and a Bearer token."""
    cors = cors_headers(request)
    if not cors:
        return refused(request, Refused(403, "origin", "Forbidden: this Origin may not connect"))
    return web.Response(status=204, headers={
        **cors, "Access-Control-Allow-Methods": "GET",
        "Access-Control-Allow-Headers": "Authorization, Last-Event-ID, Cache-Control",
        "Access-Control-Max-Age": "600"})


async def events(request: web.Request) -> web.StreamResponse:
    """One event stream: refused with an HTTP answer before it begins, or served to its end."""
    cors = cors_headers(request)
    user, refusal = admit(request)
    if refusal is not None:
        refusal.headers.update(cors)  # a page may read why (EventSource itself never shows it)
        return refusal
    config, manager = request.app[CONFIG], request.app[MANAGER]
    try:
        query = parse_query(request.query.getall("subject", []), request.query,
                            request.headers.get("Last-Event-ID"), config.limits.max_subjects_per_request,
                            config.limits.max_subject_length)
    except QueryError as exc:
        answer = refused(request, Refused(400, exc.kind, exc.message))
        answer.headers.update(cors)
        return answer
    # Nothing awaited since admit's checks: the slots are counted before any other handshake runs.
    async with manager.admission.slot(user):
        return await _serve(request, manager, user, query, cors)


async def _serve(request: web.Request, manager: WSSManager, user: Identity | None, query: EventsQuery,
                 cors: dict[str, str]) -> web.StreamResponse:
    session = manager.open_session(request, user)
    transport = request.transport
    assert transport is not None, "a request being handled has its connection"
    outbox = session.outbox = EventOutbox(transport, request.protocol, request.writer, manager.limits,
                                          manager.stats, manager.flusher, session.label,
                                          chunked=request.version >= HttpVersion11)
    _watch_hang_up(request, outbox)
    answer: web.StreamResponse | None = None
    try:
        try:
            start = await follow(manager, session, query)
            if outbox.closing:
                raise Refused(503, "unavailable", "The stream could not begin (too many messages "
                                                  "meanwhile, or the bridge is stopping); try again")
        except Refused as exc:
            answer = refused(request, exc)
            answer.headers.update(cors)
            answer.force_close()  # the connection's reading is ours now (_watch_hang_up)
            return answer
        answer = web.StreamResponse(headers={**HEADERS, **cors})
        answer.force_close()  # nothing follows a stream on its connection
        await answer.prepare(request)
        await answer.write(_preamble(manager, session, outbox, start))
        outbox.release()
        manager.lifetime.arm(session)
        manager.stats.connections_opened += 1
        manager.stats.event_streams_opened += 1
        logger.info("event stream %s opened from %s: %s", session.label, session.peer,
                    " ".join(query.subjects))
        await manager.catch_up.send(session)
        await outbox.ended
    except ConnectionError as exc:
        logger.info("event stream %s: the peer went away: %r", session.id, exc)
    except Exception:
        # The one catch-all, at the connection boundary: one client's failure
        # must never reach the server or other clients.
        logger.exception("event stream %s failed", session.id)
    finally:
        drop_history(manager, session)
        await manager.unregister(session)
        if answer is not None and answer.prepared:
            logger.info("event stream %s closed: peer %s, code %s, %d events sent, %d dropped, %.1f s",
                        session.label, session.peer, outbox.close_code or "none (the peer left)", outbox.sent,
                        outbox.dropped, time.monotonic() - session.opened)
    return answer if answer is not None else web.json_response(
        {"success": False, "message": "Internal error"}, status=500)


class _HangUp:
    """Takes the connection's reading over once the request is in.

    An event stream's client sends nothing more (whatever it might is dropped,
    never buffered), and when it hangs up the stream ends at once, its
    subscriptions released, rather than at the next write (aiohttp does not
    cancel a handler whose client has gone).
    """

    def __init__(self, outbox: EventOutbox) -> None:
        self._outbox = outbox

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        return False, b""

    def feed_eof(self) -> None:
        self._outbox.hang_up()


def _watch_hang_up(request: web.Request, outbox: EventOutbox) -> None:
    transport = request.transport
    if transport is None or transport.is_closing():
        outbox.hang_up()
        return
    request.protocol.set_parser(_HangUp(outbox))  # type: ignore[arg-type]


def _preamble(manager: WSSManager, session: Session, outbox: EventOutbox, start: Start) -> bytes:
    """``retry:`` and the welcome (with the id to resume from), then a resume's ``recovered``."""
    body = event("welcome", dump(manager.welcome(session)), outbox.welcome_id(), random.randint(*RETRY_MS))
    if start.recovered is not None:
        body += event("recovered", dump(start.recovered))
    return body
