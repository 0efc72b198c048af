"""WSSManager: maps each WebSocket client's subscribe/unsubscribe frames onto NATS subscriptions.

The story of a connection, as ``serve`` tells it: take a connection slot,
upgrade, register (the welcome frame), answer each frame the client sends,
and whatever ends the connection, unregister in ``finally``, which releases
every subscription the session held.

The story of a subscription, as ``subscribe`` tells it: the subjects are
checked against the server's policy and the user's token; the streams that
store them are looked up (one listing); every distinct pattern has exactly
one NATS subscription, shared by every session that follows it (the
registry: the first creates it, the last removes it); each NATS message is
encoded once and the same bytes go to every subscriber's bounded outbox
(hub/topic.py).  A subscribe may ask for history: it is sent after the
reply, then the live messages held back meanwhile, with no gap and no
duplicate (hub/catchup.py).

What else a client may ask (publish, a NATS request, refresh) lives in
bridge/actions/; what a session is, in bridge/hub/session.py.  Who is here
(presence) follows the subscriptions through hooks into
bridge/presence/room.py: a check before a subscribe, then after it, after an
unsubscribe (a refresh's too) and at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from bridge.actions.publish import Publisher
from bridge.actions.refresh import Refresher
from bridge.actions.request import Requester
from bridge.config import Limits
from bridge.core.frames import (
    CLOSE_POLICY_VIOLATION,
    MSG_CONNECTED,
    PROTOCOL_VERSION,
    BadFrame,
    echoable,
    msg_bad_action,
    msg_not_subscribed,
    msg_subscribed,
    msg_unsubscribed,
    parse_object,
    peek,
    reply,
    requested_subjects,
)
from bridge.core.history import HistoryError, parse_history
from bridge.core.permissions import SubjectPolicy
from bridge.core.stats import Stats
from bridge.core.tokens import Identity, Verifier
from bridge.hub.admission import Admission
from bridge.hub.catchup import CatchUp
from bridge.hub.lifetime import TokenLifetime
from bridge.hub.outbox import Flusher, Outbox, broadcast
from bridge.hub.registry import FeedUnavailable, Registry
from bridge.hub.session import Session
from bridge.jetstream.api import JetStream, JetStreamError
from bridge.presence.room import Presence

logger = logging.getLogger(__name__)


class WSSManager:
    """Owns the sessions and, through the registry, the shared NATS subscriptions."""

    def __init__(
        self,
        nats_client: Callable[[], NATS],
        limits: Limits | None = None,
        policy: SubjectPolicy | None = None,
        max_connections: int = 10_000,
        verifier: Callable[[], Verifier | None] = lambda: None,
        refresh_lead: float = 30.0,
        worker: int = 1,
        max_connections_per_user: int = 50,
        presence: Callable[[Callable[[], NATS], JetStream], Presence] = Presence,
    ) -> None:
        # A callable, not the client itself: the NATS connection is made in the
        # app's startup hook, after the manager exists.
        self._nats = nats_client
        self.limits = limits = limits or Limits()
        self.policy = policy = policy or SubjectPolicy()
        self.stats = stats = Stats()
        self.sessions: dict[str, Session] = {}
        # Every session of each user (JWT on), for the user-level control API.
        self.users: defaultdict[str, set[Session]] = defaultdict(set)
        self.jetstream = JetStream(nats_client, timeout=limits.close_timeout,
                                   max_consumers=limits.max_jetstream_consumers)
        self.registry = Registry(nats_client, self.jetstream, policy, stats, limits)
        self.catch_up = CatchUp(self.registry, self.jetstream, policy, limits.max_history)
        self.lifetime = TokenLifetime(stats, refresh_lead)
        self.publisher = Publisher(nats_client, policy, limits, stats)
        self.presence = presence(nats_client, self.jetstream)
        self.refresher = Refresher(verifier, policy, self.registry, self.lifetime, stats, self.presence)
        self.requester = Requester(nats_client, self.publisher, limits, stats)
        self.admission = Admission(max_connections, max_connections_per_user)
        # Which of this host's worker processes we are (WORKERS), told to every client.
        self.worker = worker
        # One per process: every outbox's writes of a loop turn, WebSocket and event stream alike.
        self.flusher = Flusher(limits.flush_delay)

    @property
    def client_subscriptions(self) -> int:
        return sum(len(s.subscriptions) for s in self.sessions.values())

    # -- one connection, start to end ----------------------------------------

    async def serve(self, request: web.Request, user: Identity | None = None) -> web.WebSocketResponse:
        """One WebSocket client: register, read its frames, always unregister."""
        async with self.admission.slot(user):
            limits = self.limits
            # compress=False: permessage-deflate would compress each frame once per
            # client, while the uncompressed frame is built once for all of them.
            ws = web.WebSocketResponse(
                compress=False,
                # aiohttp refuses a frame of exactly max_msg_size; ours is the largest allowed.
                max_msg_size=limits.max_frame_bytes + 1,
                heartbeat=limits.ping_interval or None,
                # Pings and pongs come to us (handle_ping_pong), to be rate-limited: aiohttp
                # would answer every ping inside receive(), at any rate.  Its heartbeat does
                # not need them: in aiohttp 3.14 any bytes received reset it (data_received_cb).
                autoping=False,
            )
            # aiohttp fixes the pong timeout at half the ping interval; ours is a setting.
            ws._pong_heartbeat = limits.pong_timeout
            await ws.prepare(request)
            session = self.register(request, ws, user)
            logger.info("connection %s opened from %s", session.label, session.peer)
            try:
                async for msg in ws:
                    if msg.type is WSMsgType.TEXT:
                        await self.handle_text(session, msg.data)
                    elif msg.type is WSMsgType.PING or msg.type is WSMsgType.PONG:
                        await self.handle_ping_pong(session, msg.type, msg.data)
                    elif msg.type is WSMsgType.BINARY:
                        self.reject_binary(session)
                    elif msg.type is WSMsgType.ERROR:
                        logger.info("connection %s: %r", session.id, ws.exception())
            except Exception:
                # The one catch-all, at the connection boundary: one client's failure
                # must never reach the server or other clients.
                logger.exception("connection %s failed", session.id)
            finally:
                await self.unregister(session)
                outbox = session.outbox
                logger.info("connection %s closed: peer %s, code %s, %d frames sent, %d dropped, %.1f s",
                            session.label, session.peer, outbox.close_code or ws.close_code, outbox.sent,
                            outbox.dropped, time.monotonic() - session.opened)
            return ws

    def register(self, request: web.Request, ws: web.WebSocketResponse,
                 user: Identity | None = None) -> Session:
        """A new WebSocket session: known by its id, welcomed, its token's lifetime armed."""
        session = self.open_session(request, user)
        transport = request.transport
        assert transport is not None, "the WebSocket is prepared before it is registered"
        session.outbox = Outbox(transport, request.protocol, request.writer, ws, self.limits, self.stats,
                                self.flusher, session.label)
        self.stats.connections_opened += 1
        session.send_json(self.welcome(session))
        self.lifetime.arm(session)
        return session

    def open_session(self, request: web.Request, user: Identity | None = None) -> Session:
        """A new session, known by its id (and its user's); its outbox is the caller's to set at once."""
        perms = self.policy.for_user(user.sub, user.claim) if user else self.policy.for_user()
        session = Session(request.remote or "?", user, perms, self.limits.control_rate,
                          self.limits.control_strikes)
        self.sessions[session.id] = session
        if user is not None:
            self.users[user.sub].add(session)
        return session

    def welcome(self, session: Session) -> dict[str, Any]:
        """The first frame of every connection."""
        nc = self._nats()
        welcome = {
            "success": True, "data": MSG_CONNECTED, "type": "welcome", "connection_id": session.id,
            "protocol": PROTOCOL_VERSION,
            "nats": "connected" if nc is not None and nc.is_connected else "disconnected",
            "publish": bool(self.policy.publish_allow), "worker": self.worker,
        }
        if session.user is not None:
            welcome.update(user=session.user.sub, expires_at=session.user.expires_at)
        return welcome

    async def unregister(self, session: Session) -> None:
        """Release everything ``session`` followed.  Safe to call more than once."""
        self.sessions.pop(session.id, None)
        self.lifetime.disarm(session)
        if session.user is not None:
            mine = self.users.get(session.user.sub)
            if mine is not None:
                mine.discard(session)
                if not mine:
                    del self.users[session.user.sub]
        self.requester.cancel(session)
        self.presence.unregistered(session)
        await self.registry.remove(session, list(session.subscriptions))
        await session.outbox.stop_writer()

    async def close_all(self, code: int, reason: str, timeout: float | None = None) -> None:
        """Close every connection at once; ``timeout`` bounds the wait for each one's answer."""
        outboxes = [s.outbox for s in self.sessions.values()]
        await asyncio.gather(*(o.close(code, reason, timeout) for o in outboxes), return_exceptions=True)

    def broadcast(self, frame: dict[str, Any]) -> None:
        broadcast((session.outbox for session in self.sessions.values()), frame)

    # -- what the client sends -----------------------------------------------

    async def handle_text(self, session: Session, text: str) -> None:
        """One control frame from the client; every outcome is a reply frame."""
        if session.closing:  # already cut off (flooding, slow): nothing more to say
            return
        if not session.take_frame():
            rate = self.limits.control_rate
            request_id, action = peek(text)
            refusal = reply(False, f"Rate limit: at most {rate:g} control frames per second", request_id)
            if action == "request":
                refusal.update(self.requester.over_rate())
            session.send_json(refusal)
            self._over_budget(session)
            return
        for frame in await self.handle_request(session, text):
            session.send_json(frame)
        await self.catch_up.send(session)

    async def handle_ping_pong(self, session: Session, kind: WSMsgType, payload: bytes) -> None:
        """A ping or pong from the client: a control frame, spending the same budget as requests.

        Threat: a ping flood.  Answered by aiohttp at any rate, 12 connections
        flooding 125-byte pings took a healthy client's p50 from 2.5 ms to
        411 ms.  Within the budget a ping gets its pong; past it, no pong and no
        error reply (a ping has no id and expects no words), only a strike, and
        a client that keeps going is closed with 1008 like one flooding
        requests.  An unsolicited pong costs a token too, or pongs would be a
        free flood.
        """
        if session.closing:
            return
        if session.take_frame():
            if kind is WSMsgType.PING:
                # The peer may have gone meanwhile; the read loop then ends by itself.
                with contextlib.suppress(ConnectionError):
                    await session.outbox.ws.pong(payload)
            return
        self._over_budget(session)

    def _over_budget(self, session: Session) -> None:
        """A frame past the budget: counted, and a client that keeps going is closed with 1008."""
        self.stats.bad_frames["rate"] += 1
        if session.strike():
            logger.warning("connection %s keeps flooding; closing", session.label)
            self.stats.rate_limit_disconnects += 1
            # Every frame read so far has its reply queued: they go out first.
            session.outbox.close_soon(CLOSE_POLICY_VIOLATION, "control frame rate exceeded", send_queued=True)

    def reject_binary(self, session: Session) -> None:
        self.stats.bad_frames["binary"] += 1
        session.send_json(reply(False, "Binary frames are not supported: send JSON as text"))

    async def handle_request(self, session: Session, text: str | bytes, trusted: bool = False
                             ) -> list[dict[str, Any]]:
        """Parse and apply one control frame; shared by the WebSocket and the control API."""
        request_id = None
        try:
            body = parse_object(text)
            request_id = echoable(body.get("id"))
            return await self.apply(session, body, request_id, trusted)
        except BadFrame as exc:
            self.stats.bad_frames[exc.kind] += 1
            return [reply(False, exc.message, request_id, **exc.extra)]

    async def apply(self, session: Session, body: dict[str, Any], request_id: Any = None,
                    trusted: bool = False) -> list[dict[str, Any]]:
        """Apply a parsed control object.  Raises BadFrame for anything the client got wrong.

        ``trusted``: asked by a backend through the control API, so the user's claims do not bind it.
        """
        action = body.get("action", "subscribe")
        if action == "publish":
            return [await self.publisher.publish(session, body, request_id, trusted)]
        if action == "refresh" and not trusted:
            return [await self.refresher.refresh(session, body, request_id)]
        if action == "presence":
            return [self.presence.answer(session, body, request_id, trusted)]
        if action == "request" and not trusted:
            return await self.requester.start(session, body, request_id)  # answered when NATS answers
        if action not in ("subscribe", "unsubscribe"):
            raise BadFrame("action", msg_bad_action(action))
        limits = self.limits
        subjects = requested_subjects(body, limits.max_subjects_per_request, limits.max_subject_length)
        if action == "subscribe":
            return [await self.subscribe(session, subjects, request_id, trusted, body.get("history"),
                                         body.get("presence"))]
        return await self.unsubscribe(session, subjects, request_id)

    # -- one subscription, start to end --------------------------------------

    async def subscribe(self, session: Session, subjects: list[str], request_id: Any = None,
                        trusted: bool = False, history: Any = None, presence: Any = None) -> dict[str, Any]:
        for subject in subjects:
            refusal = session.perms.subscribe_refusal(subject, trusted=trusted)
            if refusal:
                raise BadFrame("policy", refusal)
        self.presence.check(session, subjects, presence)
        spec = None
        if history is not None:
            try:
                spec = parse_history(history, self.limits.max_history)
            except HistoryError as exc:
                raise BadFrame("history", str(exc)) from None
        wanted = [s for s in subjects if s not in session.subscriptions]
        if len(session.subscriptions) + len(wanted) > self.limits.max_subscriptions:
            raise BadFrame(
                "limit", f"Subscription limit: at most {self.limits.max_subscriptions} per connection"
            )
        try:
            stored = await self.registry.streams_storing(subjects if spec is not None else wanted,
                                                         fresh=spec is not None)
        except JetStreamError as exc:
            return reply(False, f"Could not read history: {exc}", request_id, action="subscribe",
                         subjects=subjects)
        if spec is not None:
            # All or nothing: every subject must be stored before anything is subscribed.
            for subject in subjects:
                if subject not in stored:
                    raise BadFrame("history", f"no stream stores {subject!r}: it has no history")
        self.registry.check_share(session, [s for s in wanted if s in stored], self.users)
        try:
            await self.registry.add(session, wanted, trusted, stored)
        except FeedUnavailable as exc:
            return reply(False, str(exc), request_id, action="subscribe", subjects=subjects)
        except (TimeoutError, NatsError, OSError) as exc:
            # NATS refused or is down: tell the client, keep the connection.
            logger.warning("subscribe %s for connection %s failed: %r", wanted, session.id, exc)
            return reply(False, f"Could not subscribe: {exc or type(exc).__name__}", request_id,
                         action="subscribe", subjects=subjects)
        extra: dict[str, Any] = {}
        if spec is not None:
            try:
                extra = await self.catch_up.plan(session, subjects, spec, stored)
            except (HistoryError, JetStreamError) as exc:
                await self.registry.remove(session, wanted)
                return reply(False, f"Could not read history: {exc}", request_id,
                             action="subscribe", subjects=subjects)
        else:
            topics = self.registry.topics
            streams = {s: {"stream": t.feed.stream, "epoch": t.epoch, "last_seq": t.feed.last_seq}
                       for s in subjects if (t := topics.get(s)) is not None and t.feed is not None}
            if streams:
                extra["streams"] = streams
        await self.presence.subscribed(session, subjects, presence)
        return reply(True, msg_subscribed(subjects), request_id, action="subscribe", subjects=subjects,
                     **extra)

    async def unsubscribe(self, session: Session, subjects: list[str], request_id: Any = None
                          ) -> list[dict[str, Any]]:
        followed = [s for s in subjects if s in session.subscriptions]
        await self.registry.remove(session, followed)
        await self.presence.unsubscribed(session, followed)
        return [
            reply(True, msg_unsubscribed(s), request_id, action="unsubscribe", subjects=[s])
            if s in followed
            else reply(False, msg_not_subscribed(s), request_id, action="unsubscribe", subjects=[s])
            for s in subjects
        ]

