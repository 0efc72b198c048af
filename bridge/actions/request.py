"""A browser calls a NATS service: a request, and its answer when it comes.

A request is a publish (``Publisher.check``: publishing on, the subject
concrete and allowed for this user, the payload within bounds) sent with a
reply subject of the bridge's own (``ReplyInbox``), which the browser never
sees or chooses.  The answer goes to that connection only: the reply subjects
are under ``_INBOX.>``, which no browser may subscribe to, and a browser's
``>`` is filtered by the same policy message by message.

Requests never block the connection: each waits in a task of its own, at most
``MAX_PENDING_REQUESTS`` per connection (more are refused at once), and its
reply goes out through the connection's outbox whenever the answer arrives, in
any order.  A connection that closes cancels its requests (``cancel``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from nats.errors import Error as NatsError
from nats.errors import NoRespondersError

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


class ReplyInbox:
    """The bridge's own reply subject: one subscription to ``_INBOX.<random>.*``, one waiter per request.

    Not nats-py's ``nc.request``: it keeps each request's future in a map until
    an answer comes or its own timeout passes, so a request cancelled in between
    (its connection closed) stays there for good when no answer ever comes.
    Threat: a client growing the bridge's memory without bound by sending
    requests to a service that never answers and closing, again and again.  Here
    every wait removes its own entry, however it ends.

    Each request's token is random, not a count: a service sees the reply
    subject of the request it answers, and must not be able to guess another
    request's (to another service, for another user) and answer it instead.
    """

    def __init__(self, nats_client: Callable[[], NATS | None]) -> None:
        self._nats = nats_client
        self._client: NATS | None = None  # the client the subscription is on
        self._prefix = ""
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._lock = asyncio.Lock()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def ready(self) -> str:
        """The reply subjects' prefix, subscribed on the current NATS client (once per client)."""
        nc = self._nats()
        if nc is None:
            raise ConnectionError("NATS is not connected yet")
        if self._client is not nc:
            async with self._lock:
                if self._client is not nc:
                    prefix = nc.new_inbox() + "."
                    await nc.subscribe(prefix + "*", cb=self._on_answer)
                    self._client, self._prefix = nc, prefix
        return self._prefix

    async def flush(self) -> None:
        """Wait until NATS has the subscription (a round trip)."""
        if self._client is not None:
            await self._client.flush(timeout=5)

    async def _on_answer(self, msg: Msg) -> None:
        waiter = self._waiting.get(msg.subject[len(self._prefix):])
        # A second answer, or one after the wait ended, finds nobody waiting: dropped.
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)

    async def request(self, subject: str, payload: bytes, headers: dict[str, str] | None,
                      timeout: float) -> Msg:
        """Publish with a reply subject of ours and wait for the first answer.

        Raises NoRespondersError (nobody subscribes to ``subject``: nats-server
        says so at once), TimeoutError, or NATS's and the socket's errors.
        """
        prefix = await self.ready()
        token = secrets.token_urlsafe(12)
        waiter: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = waiter
        try:
            async with asyncio.timeout(timeout):
                await self._client.publish(subject, payload, reply=prefix + token,  # type: ignore[union-attr]
                                           headers=headers)
                msg = await waiter
        finally:
            del self._waiting[token]
        if not msg.data and msg.headers and msg.headers.get("Status") == NO_RESPONDERS_STATUS:
            raise NoRespondersError
        return msg


class Requester:
    """Browsers' NATS requests: checked, sent, bounded per connection, answered when NATS answers."""

    def __init__(self, nats_client: Callable[[], NATS | None], publisher: Publisher, limits: Limits,
                 stats: Stats) -> None:
        self.inbox = ReplyInbox(nats_client)
        self._publisher = publisher
        self._limits = limits
        self._stats = stats
        # Requests waiting for their answers, over every connection (bridge_requests_in_flight).
        self.in_flight = 0

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

    def start(self, session: Session, body: dict[str, Any], request_id: Any = None) -> list[dict[str, Any]]:
        """Check a request and send it off in a task of its own; BadFrame (with its ``error``) if refused.

        Nothing here awaits, and nothing is answered yet (an empty list of
        replies): the connection reads its next frame at once, and the answer
        comes as a reply frame whenever NATS gives it.
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
            # Threat: one client holding unbounded tasks and waiters in the bridge.
            raise self._counted(refused(
                "pending", f"Too many requests in flight: at most {limits.max_pending_requests} per "
                           "connection (MAX_PENDING_REQUESTS)", subject))
        task = asyncio.create_task(self._call(session, subject, payload, wire_headers(headers), timeout,
                                              request_id))
        self.in_flight += 1
        session.requests.add(task)
        task.add_done_callback(functools.partial(self._done, session))
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

    async def _call(self, session: Session, subject: str, payload: bytes, headers: dict[str, str] | None,
                    timeout: float, request_id: Any) -> None:
        try:
            msg = await self.inbox.request(subject, payload, headers, timeout)
        except NoRespondersError:
            result, frame = NO_RESPONDERS, json_frame(failure(
                NO_RESPONDERS, f"No service answers on {subject} (no responders)", request_id, subject))
        except TimeoutError:
            result, frame = TIMEOUT, json_frame(failure(
                TIMEOUT, f"No answer from {subject} within {timeout:g} s (timeout)", request_id, subject))
        except (NatsError, OSError) as exc:
            # Not sent (NATS unreachable, the link closed): no service got it, as with no responders,
            # so the client knows that trying again cannot make a service act twice.
            logger.info("request to %s for connection %s not sent: %r", subject, session.label, exc)
            result, frame = NO_RESPONDERS, json_frame(failure(
                NO_RESPONDERS, f"Could not send the request to {subject}: {exc or type(exc).__name__}",
                request_id, subject))
        else:
            result, frame = OK, answer(request_id, subject, msg.data, msg.headers)
        self._stats.requests[result] += 1
        session.send(frame)

    def _done(self, session: Session, task: asyncio.Task[None]) -> None:
        self.in_flight -= 1
        session.requests.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("request for connection %s broke", session.label, exc_info=exc)

    async def cancel(self, session: Session) -> None:
        """The connection is ending: its requests are cancelled, and gone when this returns."""
        tasks = list(session.requests)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
