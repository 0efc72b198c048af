"""A browser calls a NATS service: a request, and its answer when it comes.

A request is a publish (``Publisher.check``: publishing on, the subject
concrete and allowed for this user, the payload within bounds) sent with a
reply subject of the bridge's own (``ReplyInbox``), which the browser never
sees or chooses.  The answer goes to that connection only: the reply subjects
are under ``_INBOX.>``, which no browser may subscribe to, and a browser's
``>`` is filtered by the same policy message by message.

Requests never block the connection: the read loop only hands the request to
the NATS client's buffer, and goes on to the next frame.  Each request then
waits as a ``Call`` (a timer, and its place in the inbox), not a task: the
answer, nats-server's "no responders", or the timer ends it, whichever comes
first, and its reply goes out through the connection's outbox, in any order.
As on the hot path, nothing runs per waiting request.  At most
``MAX_PENDING_REQUESTS`` wait per connection (more are refused at once); a
connection that closes ends its calls (``cancel``), and nothing is left behind.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from nats.errors import Error as NatsError

from bridge.core.frames import BadFrame, json_frame
from bridge.core.request import (
    NO_RESPONDERS,
    NO_RESPONDERS_STATUS,
    OK,
    TIMEOUT,
    TOO_MANY_REQUESTS,
    answer,
    failure,
    parse_headers,
    parse_timeout,
    refused,
    wire_headers,
)
from bridge.core.subjects import subject_error

if TYPE_CHECKING:
    from aiohttp import web
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg

    from bridge.actions.publish import Publisher
    from bridge.config import Limits
    from bridge.core.stats import Stats
    from bridge.hub.session import Session

logger = logging.getLogger(__name__)


class Call:
    """One request waiting for its answer: whose it is, what it called, and when it gives up."""

    # Slots: one of these per request in flight, up to MAX_PENDING_REQUESTS per connection.
    __slots__ = ("request_id", "session", "subject", "timeout", "timer", "token")

    def __init__(self, session: Session, subject: str, request_id: Any, timeout: float) -> None:
        self.session = session
        self.subject = subject
        self.request_id = request_id
        self.timeout = timeout
        self.token = ""  # its reply subject's last token (ReplyInbox.open)
        self.timer: asyncio.TimerHandle | None = None


class ReplyInbox:
    """The bridge's own reply subject: one subscription to ``_INBOX.<random>.*``, a token per call.

    Not nats-py's ``nc.request``: it keeps each request's future in a map until
    an answer comes or its own timeout passes, so a request cancelled in between
    (its connection closed) stays there for good when no answer ever comes.
    Threat: a client growing the bridge's memory without bound by sending
    requests to a service that never answers and closing, again and again.
    Here each call is removed however it ends (``close``).

    Each call's token is random, not a count: a service sees the reply subject
    of the request it answers, and must not be able to guess another request's
    (to another service, for another user) and answer it instead.
    """

    def __init__(self, nats_client: Callable[[], NATS | None], answered: Callable[[Call, Msg], None]) -> None:
        self._nats = nats_client
        self._answered = answered
        self._client: NATS | None = None  # the client the subscription is on
        self._prefix = ""
        self._calls: dict[str, Call] = {}
        self._lock = asyncio.Lock()

    @property
    def waiting(self) -> int:
        return len(self._calls)

    async def ready(self) -> NATS:
        """The NATS client, with the reply inbox subscribed on it (once per client)."""
        nc = self._nats()
        if nc is None:
            raise ConnectionError("NATS is not connected yet")
        if self._client is not nc:
            async with self._lock:
                if self._client is not nc:
                    prefix = nc.new_inbox() + "."
                    await nc.subscribe(prefix + "*", cb=self._on_answer)
                    self._client, self._prefix = nc, prefix
        return nc

    async def flush(self) -> None:
        """Wait until NATS has the subscription (a round trip)."""
        if self._client is not None:
            await self._client.flush(timeout=5)

    def open(self, call: Call) -> str:
        """Register ``call``; its reply subject."""
        call.token = secrets.token_urlsafe(12)
        self._calls[call.token] = call
        return self._prefix + call.token

    def close(self, call: Call) -> bool:
        """Forget ``call``; False if it was gone already (answered, timed out, cancelled)."""
        return self._calls.pop(call.token, None) is not None

    async def _on_answer(self, msg: Msg) -> None:
        call = self._calls.get(msg.subject[len(self._prefix):])
        # A second answer, or one after the call ended, finds nobody waiting: dropped.
        if call is not None:
            self._answered(call, msg)


class Requester:
    """Browsers' NATS requests: checked, sent, bounded per connection, answered when NATS answers."""

    def __init__(self, nats_client: Callable[[], NATS | None], publisher: Publisher, limits: Limits,
                 stats: Stats) -> None:
        self.inbox = ReplyInbox(nats_client, self._answered)
        self._publisher = publisher
        self._limits = limits
        self._stats = stats

    @property
    def in_flight(self) -> int:
        """Requests waiting for their answers, over every connection (bridge_requests_in_flight)."""
        return self.inbox.waiting

    async def lifecycle(self, web_app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context, after the NATS link: the reply inbox subscribed before any request.

        So the first answer cannot outrun the inbox's interest across a NATS cluster.  Only when
        publishing is on: otherwise no request is ever sent, and the bridge's NATS user need not
        be allowed to subscribe to ``_INBOX.>``.
        """
        if self._publisher.enabled:
            try:
                await self.inbox.ready()
                await self.inbox.flush()
            except (NatsError, OSError, TimeoutError) as exc:
                # The first request tries again; meanwhile the bridge serves everything else.
                logger.warning("could not subscribe the request inbox yet: %r", exc)
        yield

    async def start(self, session: Session, body: dict[str, Any], request_id: Any = None
                    ) -> list[dict[str, Any]]:
        """Check a request and hand it to NATS; BadFrame (with its ``error``) if refused.

        Nothing is answered yet (an empty list of replies) unless it could not
        be sent: the answer comes as a reply frame whenever NATS gives it.  The
        only wait is the NATS client taking the message into its buffer.
        """
        limits = self._limits
        try:
            # A request is a publish: the same policy, subject rules and payload bound.
            subject, payload = self._publisher.check(session, body, trusted=False)
        except BadFrame as exc:
            raise self._counted(refused(exc.kind, exc.message, self._named(body))) from None
        try:
            headers = parse_headers(body.get("headers"), subject)
            timeout = parse_timeout(body.get("timeout"), limits.request_timeout, subject)
        except BadFrame as exc:
            raise self._counted(exc) from None
        if len(session.requests) >= limits.max_pending_requests:
            # Threat: one client holding an unbounded number of waiting calls in the bridge.
            raise self._counted(refused(
                "pending", f"Too many requests in flight: at most {limits.max_pending_requests} per "
                           "connection (MAX_PENDING_REQUESTS)", subject))
        call = Call(session, subject, request_id, timeout)
        try:
            nc = await self.inbox.ready()
            # Open before sending: nats-server's "no responders" may come back at once.
            reply = self.inbox.open(call)
            session.requests.add(call)
            call.timer = asyncio.get_running_loop().call_later(timeout, self._expired, call)
            await nc.publish(subject, payload, reply=reply, headers=wire_headers(headers))
        except (NatsError, OSError) as exc:
            # Not sent (NATS unreachable, the link closed): no service got it, as with no responders,
            # so the client knows that trying again cannot make a service act twice.
            self._end(call)
            logger.info("request to %s for connection %s not sent: %r", subject, session.label, exc)
            self._stats.requests[NO_RESPONDERS] += 1
            return [failure(NO_RESPONDERS, f"Could not send the request to {subject}: "
                                           f"{exc or type(exc).__name__}", request_id, subject)]
        return []

    def _named(self, body: dict[str, Any]) -> str | None:
        """The request's subject, for its refusal to name, if it is a valid concrete subject."""
        subject = body.get("subject")
        if isinstance(subject, str) and not subject_error(subject, self._limits.max_subject_length,
                                                          wildcards=False):
            return subject
        return None

    def _counted(self, refusal: BadFrame) -> BadFrame:
        self._stats.requests[refusal.extra["error"]] += 1
        return refusal

    def over_rate(self) -> dict[str, Any]:
        """What a request refused for CONTROL_RATE adds to its rate-limit reply (and counts)."""
        self._stats.requests[TOO_MANY_REQUESTS] += 1
        return {"action": "request", "error": TOO_MANY_REQUESTS}

    def _end(self, call: Call) -> bool:
        """``call`` is over: out of the inbox and its connection, its timer stopped (False: it was)."""
        if not self.inbox.close(call):
            return False
        if call.timer is not None:
            call.timer.cancel()
        call.session.requests.discard(call)
        return True

    def _answered(self, call: Call, msg: Msg) -> None:
        """NATS answered (or said nobody listens): the reply, built once from the answer's bytes."""
        if not self._end(call):
            return
        if not msg.data and msg.headers and msg.headers.get("Status") == NO_RESPONDERS_STATUS:
            result, frame = NO_RESPONDERS, json_frame(failure(
                NO_RESPONDERS, f"No service answers on {call.subject} (no responders)", call.request_id,
                call.subject))
        else:
            result, frame = OK, answer(call.request_id, call.subject, msg.data, msg.headers)
        self._stats.requests[result] += 1
        call.session.send(frame)

    def _expired(self, call: Call) -> None:
        if not self._end(call):
            return
        self._stats.requests[TIMEOUT] += 1
        call.session.send_json(failure(
            TIMEOUT, f"No answer from {call.subject} within {call.timeout:g} s (timeout)", call.request_id,
            call.subject))

    def cancel(self, session: Session) -> None:
        """The connection is ending: its calls end now, unanswered; nothing is left waiting."""
        for call in list(session.requests):
            self._end(call)
