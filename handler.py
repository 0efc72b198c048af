"""WSSManager: maps each WebSocket client's subscribe/unsubscribe frames onto NATS.

The story of a connection, as ``serve`` tells it: take a connection slot,
upgrade, register (the welcome frame), answer each control frame with its
replies, and whatever ends the connection, unregister in ``finally``, which
releases every subscription the client held.

The story of a subscription: every distinct subject pattern has exactly one
NATS subscription (a ``Topic``), shared by every client that holds it; the
first client creates it and the last one to leave removes it.  A NATS message
is turned into its frame once, in the subscription's callback, and the same
bytes go to each interested client's bounded outbound queue (connection.py).
A client holding overlapping patterns (``a.*`` and ``a.b``) gets each message
once: the oldest of its patterns that matches delivers it.

The story of a stored subject (JetStream): a pattern that a stream stores is
followed through a ``LiveFeed`` (an ordered consumer), so its messages carry
their stream sequence; a subscribe may ask for history (history.py), which is
sent oldest first before the live messages held back meanwhile, with no gap
and no duplicate between them.

The story of a user (JWT on): the token's ``sub`` and ``nats`` claim decide
what the connection may do (permissions.py); before ``exp`` the client is told
``token_expiring`` and may send a fresh token (``refresh``); at ``exp`` without
one it is closed with 4001.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from aiohttp import WSMsgType, web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

import history
from config import Limits
from connection import Client, Flusher, Held
from frames import (
    CLOSE_POLICY_VIOLATION,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TRY_AGAIN_LATER,
    MSG_CONNECTED,
    MSG_SUBJECTS_REQUIRED,
    PROTOCOL_VERSION,
    BadFrame,
    echoable,
    encode_nats_message,
    json_frame,
    msg_bad_action,
    msg_not_subscribed,
    msg_subscribed,
    msg_unsubscribed,
    parse_object,
    peek_id,
    publish_payload,
    reply,
    text_frame,
)
from history import HistoryError, Plan, parse_history
from jetstream import JetStream, JetStreamError, LiveFeed, StreamInfo, storing
from metrics import Stats
from permissions import SubjectPolicy
from subjects import patterns_overlap, subject_error
from tokens import Identity, TokenError
from topics import Check, Topic, delivers, denied

logger = logging.getLogger(__name__)


class FeedUnavailable(Exception):
    """A stored pattern cannot get its live feed now; the message is the reply."""


class WSSManager:
    """Owns the clients and the shared NATS subscriptions."""

    def __init__(
        self,
        nats_client: Callable[[], NATS],
        limits: Limits | None = None,
        policy: SubjectPolicy | None = None,
        max_connections: int = 10_000,
        verifier: Callable[[], Any] = lambda: None,
        refresh_lead: float = 30.0,
        worker: int = 1,
        max_connections_per_user: int = 50,
    ) -> None:
        # A callable, not the client itself: the NATS connection is made in the
        # app's startup hook, after the manager exists.
        self._nats = nats_client
        self.limits = limits or Limits()
        self.policy = policy or SubjectPolicy()
        self.stats = Stats()
        self.clients: dict[str, Client] = {}
        # Every connection of each user (JWT on), for the user-level control API.
        self.users: defaultdict[str, set[Client]] = defaultdict(set)
        self.topics: dict[str, Topic] = {}
        self.jetstream = JetStream(nats_client, timeout=self.limits.close_timeout,
                                   max_consumers=self.limits.max_jetstream_consumers)
        # The current tokens.Verifier (None: no JWT); a callable, since a JWKS refresh swaps it.
        self._verifier = verifier
        self._refresh_lead = refresh_lead
        # Which of this host's worker processes we are (WORKERS), told to every client.
        self.worker = worker
        self._slots = asyncio.Semaphore(max_connections)
        # Connections each user holds or is opening here (MAX_CONNECTIONS_PER_USER).
        self.max_connections_per_user = max_connections_per_user
        self._user_slots: Counter[str] = Counter()
        # Serialises changes to ``topics`` so that two clients asking for the same
        # new pattern at once cannot create two NATS subscriptions.
        self._lock = asyncio.Lock()
        self._flusher = Flusher(self.limits.flush_delay)
        # History being sent for backend requests (kept so the tasks are not collected).
        self._catch_ups: set[asyncio.Task[None]] = set()

    @property
    def client_subscriptions(self) -> int:
        return sum(len(c.subjects) for c in self.clients.values())

    @property
    def full(self) -> bool:
        """Every connection slot is taken (checked before the upgrade, to answer 503)."""
        return self._slots.locked()

    def user_full(self, sub: str) -> bool:
        """``sub`` holds every connection it may here (checked before the upgrade, to answer 429)."""
        return self._user_slots[sub] >= self.max_connections_per_user

    @contextlib.asynccontextmanager
    async def _user_slot(self, user: Identity | None) -> AsyncIterator[None]:
        """Count one of ``user``'s connections from before the upgrade to the end.

        Threat: one user's handshakes racing past the check.  ``ws.prepare``
        awaits, and ``register`` comes after it, so counting there would let
        every handshake already in flight pass routes.stream's check.  This is
        entered synchronously right after that check (nothing awaits between).
        """
        if user is None:
            yield
            return
        self._user_slots[user.sub] += 1
        try:
            yield
        finally:
            self._user_slots[user.sub] -= 1
            if not self._user_slots[user.sub]:
                del self._user_slots[user.sub]

    # -- one connection, start to end ----------------------------------------

    async def serve(self, request: web.Request, user: Identity | None = None) -> web.WebSocketResponse:
        """One WebSocket client: register, read control frames, always unregister."""
        async with self._user_slot(user), self._slots:
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
            client = self.register(request, ws, user)
            logger.info("connection %s opened from %s%s", client.id, client.peer, _as_user(client))
            try:
                async for msg in ws:
                    if msg.type is WSMsgType.TEXT:
                        await self.handle_text(client, msg.data)
                    elif msg.type is WSMsgType.PING or msg.type is WSMsgType.PONG:
                        await self.handle_ping_pong(client, msg.type, msg.data)
                    elif msg.type is WSMsgType.BINARY:
                        self.reject_binary(client)
                    elif msg.type is WSMsgType.ERROR:
                        logger.info("connection %s: %r", client.id, ws.exception())
            except Exception:
                # The one catch-all, at the connection boundary: one client's failure
                # must never reach the server or other clients.
                logger.exception("connection %s failed", client.id)
            finally:
                await self.unregister(client)
                logger.info(
                    "connection %s closed: peer %s%s, code %s, %d frames sent, %d dropped, %.1f s",
                    client.id, client.peer, _as_user(client), client.close_code or ws.close_code, client.sent,
                    client.dropped, time.monotonic() - client.opened,
                )
            return ws

    def register(
        self, request: web.Request, ws: web.WebSocketResponse, user: Identity | None = None
    ) -> Client:
        perms = self.policy.for_user(user.sub, user.claim) if user else self.policy.for_user()
        client = Client(request, ws, self.limits, self.stats, self._flusher, user, perms)
        self.clients[client.id] = client
        self.stats.connections_opened += 1
        nc = self._nats()
        welcome = {
            "success": True,
            "data": MSG_CONNECTED,
            "type": "welcome",
            "connection_id": client.id,
            "protocol": PROTOCOL_VERSION,
            "nats": "connected" if nc is not None and nc.is_connected else "disconnected",
            "publish": bool(self.policy.publish_allow),
            "worker": self.worker,
        }
        if user is not None:
            welcome.update(user=user.sub, expires_at=user.expires_at)
            self.users[user.sub].add(client)
        client.send_json(welcome)
        if user is not None:
            self._arm_expiry(client)
        return client

    async def unregister(self, client: Client) -> None:
        """Release everything ``client`` held.  Safe to call more than once."""
        self.clients.pop(client.id, None)
        self._disarm_expiry(client)
        if client.user is not None:
            mine = self.users.get(client.user.sub)
            if mine is not None:
                mine.discard(client)
                if not mine:
                    del self.users[client.user.sub]
        await self._remove(client, list(client.subjects))
        await client.stop_writer()

    # -- the token's lifetime --------------------------------------------------

    def _arm_expiry(self, client: Client) -> None:
        """Warn ``JWT_REFRESH_LEAD`` seconds before the token's exp; close with 4001 at exp."""
        self._disarm_expiry(client)
        assert client.user is not None
        loop = asyncio.get_running_loop()
        left = client.user.expires_at - time.time()
        client.timers = [
            loop.call_later(max(0.0, left - self._refresh_lead), self._warn_expiry, client),
            loop.call_later(max(0.0, left), self._expire, client),
        ]

    def _disarm_expiry(self, client: Client) -> None:
        for timer in client.timers:
            timer.cancel()
        client.timers = []

    def _warn_expiry(self, client: Client) -> None:
        assert client.user is not None
        expires_at = client.user.expires_at
        client.send_json({
            "type": "token_expiring", "expires_at": expires_at,
            "message": f"The token expires in {max(0, round(expires_at - time.time()))} s; "
                       'send {"action": "refresh", "token": "<a new token>"}',
        })

    def _expire(self, client: Client) -> None:
        logger.info("connection %s%s: token expired; closing", client.id, _as_user(client))
        self.stats.token_expiries += 1
        client.close_soon(CLOSE_TOKEN_EXPIRED, "token expired", send_queued=True)

    async def close_all(self, code: int, reason: str, timeout: float | None = None) -> None:
        """Close every client at once; ``timeout`` bounds the wait for each one's answer."""
        clients = list(self.clients.values())
        await asyncio.gather(*(c.close(code, reason, timeout) for c in clients), return_exceptions=True)

    def broadcast(self, frame: dict[str, Any]) -> None:
        data = json_frame(frame)
        for client in self.clients.values():
            client.send(data)

    # -- control frames -------------------------------------------------------

    async def handle_text(self, client: Client, text: str) -> None:
        """One control frame from the client; every outcome is a reply frame."""
        if client.closing:  # already cut off (flooding, slow): nothing more to say
            return
        if not client.take_control_token():
            self.stats.bad_frames["rate"] += 1
            rate = self.limits.control_rate
            client.send_json(reply(False, f"Rate limit: at most {rate:g} control frames per second",
                                   peek_id(text)))
            if client.strike():
                logger.warning("client %s (%s) keeps flooding; closing", client.id, client.peer)
                self.stats.rate_limit_disconnects += 1
                # Every frame read so far has its reply queued: they go out first.
                client.close_soon(CLOSE_POLICY_VIOLATION, "control frame rate exceeded", send_queued=True)
            return
        for frame in await self.handle_request(client, text):
            client.send_json(frame)
        await self.finish_catch_up(client)

    async def handle_ping_pong(self, client: Client, kind: WSMsgType, payload: bytes) -> None:
        """A ping or pong from the client: a control frame, spending the same budget as requests.

        Threat: a ping flood (security review, finding 7).  Answered by aiohttp at any
        rate, 12 connections flooding 125-byte pings took a healthy client's p50 from
        2.5 ms to 411 ms.  Within the budget a ping gets its pong; past it, no pong and
        no error reply (a ping has no id and expects no words), only a strike, and a
        client that keeps going is closed with 1008 like one flooding requests.  An
        unsolicited pong costs a token too, or pongs would be a free flood.
        """
        if client.closing:
            return
        if client.take_control_token():
            if kind is WSMsgType.PING:
                # The peer may have gone meanwhile; the read loop then ends by itself.
                with contextlib.suppress(ConnectionError):
                    await client.ws.pong(payload)
            return
        self.stats.bad_frames["rate"] += 1
        if client.strike():
            # As handle_text does for requests.
            logger.warning("client %s (%s) keeps flooding pings/pongs; closing", client.id, client.peer)
            self.stats.rate_limit_disconnects += 1
            client.close_soon(CLOSE_POLICY_VIOLATION, "control frame rate exceeded", send_queued=True)

    def reject_binary(self, client: Client) -> None:
        self.stats.bad_frames["binary"] += 1
        client.send_json(reply(False, "Binary frames are not supported: send JSON as text"))

    async def handle_request(
        self, client: Client, text: str | bytes, by_backend: bool = False
    ) -> list[dict[str, Any]]:
        """Parse and apply one control frame; shared by the WebSocket and the control API."""
        request_id = None
        try:
            body = parse_object(text)
            request_id = echoable(body.get("id"))
            return await self.apply(client, body, request_id, by_backend)
        except BadFrame as exc:
            self.stats.bad_frames[exc.kind] += 1
            return [reply(False, exc.message, request_id)]

    async def apply(
        self, client: Client, body: dict[str, Any], request_id: Any = None, by_backend: bool = False
    ) -> list[dict[str, Any]]:
        """Apply a parsed control object.  Raises BadFrame for anything the client got wrong.

        ``by_backend``: asked through the control API, so the user's claims do not bind it.
        """
        action = body.get("action", "subscribe")
        if action == "publish":
            return [await self.publish(client, body, request_id, by_backend)]
        if action == "refresh" and not by_backend:
            return [await self.refresh(client, body, request_id)]
        if action not in ("subscribe", "unsubscribe"):
            raise BadFrame("action", msg_bad_action(action))
        subjects = self._subjects(body)
        if action == "subscribe":
            return [await self.subscribe(client, subjects, request_id, by_backend, body.get("history"))]
        return await self.unsubscribe(client, subjects, request_id)

    def _subjects(self, body: dict[str, Any]) -> list[str]:
        """The request's subjects, each once, in the order first given."""
        if "subjects" not in body:
            raise BadFrame("subjects", MSG_SUBJECTS_REQUIRED)
        subjects = body["subjects"]
        if not isinstance(subjects, list) or not subjects or not all(isinstance(s, str) for s in subjects):
            raise BadFrame("subjects", "subjects must be a non-empty list of strings")
        if len(subjects) > self.limits.max_subjects_per_request:
            raise BadFrame(
                "limit", f"Too many subjects: at most {self.limits.max_subjects_per_request} per request"
            )
        for subject in subjects:
            error = subject_error(subject, self.limits.max_subject_length)
            if error:
                raise BadFrame("subject", error)
        return list(dict.fromkeys(subjects))

    async def subscribe(
        self, client: Client, subjects: list[str], request_id: Any = None, by_backend: bool = False,
        history: Any = None,
    ) -> dict[str, Any]:
        for subject in subjects:
            refusal = client.perms.subscribe_refusal(subject, trusted=by_backend)
            if refusal:
                raise BadFrame("policy", refusal)
        spec = None
        if history is not None:
            try:
                spec = parse_history(history, self.limits.max_history)
            except HistoryError as exc:
                raise BadFrame("history", str(exc)) from None
        wanted = [s for s in subjects if s not in client.subjects]
        if len(client.subjects) + len(wanted) > self.limits.max_subscriptions:
            raise BadFrame(
                "limit", f"Subscription limit: at most {self.limits.max_subscriptions} per connection"
            )
        try:
            stored = await self._streams_storing(subjects if spec is not None else wanted, spec is not None)
        except JetStreamError as exc:
            return reply(False, f"Could not read history: {exc}", request_id, action="subscribe",
                         subjects=subjects)
        if spec is not None:
            # All or nothing: every subject must be stored before anything is subscribed.
            for subject in subjects:
                if subject not in stored:
                    raise BadFrame("history", f"no stream stores {subject!r}: it has no history")
        self._check_stored_share(client, [s for s in wanted if s in stored])
        try:
            await self._add(client, wanted, by_backend, stored)
        except FeedUnavailable as exc:
            return reply(False, str(exc), request_id, action="subscribe", subjects=subjects)
        except (TimeoutError, NatsError, OSError) as exc:
            # NATS refused or is down: tell the client, keep the connection.
            logger.warning("subscribe %s for client %s failed: %r", wanted, client.id, exc)
            return reply(False, f"Could not subscribe: {exc or type(exc).__name__}", request_id,
                         action="subscribe", subjects=subjects)
        extra: dict[str, Any] = {}
        if spec is not None:
            try:
                extra = await self._plan_history(client, subjects, spec, stored)
            except (HistoryError, JetStreamError) as exc:
                await self._remove(client, wanted)
                return reply(False, f"Could not read history: {exc}", request_id,
                             action="subscribe", subjects=subjects)
        else:
            streams = {s: {"stream": t.feed.stream, "epoch": t.epoch, "last_seq": t.feed.last_seq}
                       for s in subjects if (t := self.topics.get(s)) is not None and t.feed is not None}
            if streams:
                extra["streams"] = streams
        return reply(True, msg_subscribed(subjects), request_id, action="subscribe", subjects=subjects,
                     **extra)

    async def _streams_storing(self, patterns: list[str], fresh: bool) -> dict[str, StreamInfo]:
        """The stream storing each of ``patterns``, from one listing of the streams (one API call).

        Patterns followed already keep what they have: a feed's stream, or none for a
        core subscription made before a stream stored the pattern (its live messages
        carry no sequence to join history to).  The listing is skipped when every
        pattern is followed already, unless ``fresh`` (history needs the streams'
        state as it is now).  Without JetStream, nothing is stored.
        """
        new = [p for p in patterns if p not in self.topics]
        if not new and not fresh:
            return {}
        try:
            streams = await self.jetstream.streams()
        except JetStreamError as exc:
            if fresh:
                raise
            logger.debug("no stream lookup for %s: %s", new, exc)
            return {}
        found: dict[str, StreamInfo] = {}
        for pattern in patterns:
            topic = self.topics.get(pattern)
            if topic is not None and topic.feed is None:
                continue
            stream = storing(streams, pattern)
            if stream is not None and (topic is None or topic.feed.stream == stream.name):  # type: ignore[union-attr]
                found[pattern] = stream
        return found

    def _check_stored_share(self, client: Client, stored: list[str]) -> None:
        """Refuse more stored patterns than one connection or one user may follow.

        Threat: one user exhausting JetStream consumers for everyone.  Each stored
        pattern costs a consumer (its live feed) on the NATS account, where streams
        and other applications have limits of their own; without these shares one
        user's connections could take them all, and then nobody else could read
        history, resume, or even create the durable consumer their own app needs.
        """
        if not stored:
            return
        limits = self.limits
        mine = sum(1 for p in client.subjects if self._is_stored(p))
        if mine + len(stored) > limits.max_stored_subjects:
            raise BadFrame("limit", f"Stored subject limit: at most {limits.max_stored_subjects} subjects "
                                    "from JetStream streams per connection (MAX_STORED_SUBJECTS)")
        if client.user is None:
            return
        theirs = {p for c in self.users.get(client.user.sub, ()) for p in c.subjects if self._is_stored(p)}
        if len(theirs | set(stored)) > limits.max_stored_subjects_per_user:
            raise BadFrame("limit", f"Stored subject limit: user {client.user.sub} may follow at most "
                                    f"{limits.max_stored_subjects_per_user} subjects from JetStream streams "
                                    "at once (MAX_STORED_SUBJECTS_PER_USER)")

    def _is_stored(self, pattern: str) -> bool:
        topic = self.topics.get(pattern)
        return topic is not None and topic.feed is not None

    async def _plan_history(self, client: Client, subjects: list[str], spec: Any,
                            stored: dict[str, StreamInfo]) -> dict[str, Any]:
        """Hold the client's live messages back on each topic and plan its history.

        Holding starts before the stream is asked anything, so every message
        stored after the plan's last one is held; those the plan covers are
        skipped by sequence when the held ones are released.
        """
        for subject in subjects:
            self.topics[subject].hold(client, self._check(client, subject))
        plans: list[Plan] = []
        try:
            for subject in subjects:
                feed = self.topics[subject].feed
                if feed is None:
                    raise HistoryError(f"no stream stores {subject!r}: it has no history")
                plans.append(await history.plan(self.jetstream, feed, stored[subject], spec,
                                                 self.limits.max_history))
        except BaseException:
            for p in plans:
                p.drop(self.jetstream)
            for subject in subjects:
                topic = self.topics.get(subject)
                if topic is not None:
                    topic.release(client, 0)
            raise
        client.catch_ups.extend(plans)
        # last_seq: where this client stands once the history is sent: every later
        # message reaches it live, so a resume from there loses nothing.
        extra: dict[str, Any] = {"streams": {
            p.pattern: {**p.describe(), "last_seq": self._last_seq(p.pattern)} for p in plans}}
        if spec.mode == "after_seq":
            extra["recovered"] = all(p.recovered for p in plans)
            if len(plans) == 1 and not plans[0].recovered:
                extra["first_seq"] = plans[0].stream.first_seq
        return extra

    def _last_seq(self, pattern: str) -> int:
        topic = self.topics.get(pattern)
        return topic.feed.last_seq if topic is not None and topic.feed is not None else 0

    def catch_up_soon(self, client: Client) -> None:
        """``finish_catch_up`` in a task of its own (for requests a backend made)."""
        if client.catch_ups:
            task = asyncio.create_task(self.finish_catch_up(client))
            self._catch_ups.add(task)
            task.add_done_callback(self._catch_ups.discard)

    async def finish_catch_up(self, client: Client) -> None:
        """Send the history planned by the last request, then what was held back meanwhile.

        Called once the request's reply is on its way, so the reply comes first.
        Runs in the client's own task: other clients never wait for it.
        """
        while client.catch_ups:
            plan = client.catch_ups.pop(0)
            last = 0
            try:
                async for batch in history.read(self.jetstream, plan):
                    topic = self.topics.get(plan.pattern)
                    catching = topic.catching.get(client) if topic is not None else None
                    if catching is None or client.closing:
                        return  # unsubscribed or gone meanwhile
                    for stored in batch:
                        msg = stored.msg
                        last = stored.seq
                        if topic.filtered and not self.policy.permits(msg.subject):
                            continue
                        if denied(catching.check[1], msg.subject):
                            continue
                        plan.sent += 1
                        client.send(text_frame(encode_nats_message(msg, stored.seq, stored.time,
                                                                   history=True)))
                    # Read no faster than the client takes it: its queue, not our
                    # memory or the NATS link, absorbs a large history.
                    await client.room()
            except JetStreamError as exc:
                logger.warning("history of %s for client %s broke off: %s", plan.pattern, client.id, exc)
                message = f"History of {plan.pattern} broke off after {plan.sent} messages: {exc}"
                client.send_json(reply(False, message, action="subscribe", subjects=[plan.pattern]))
            finally:
                topic = self.topics.get(plan.pattern)
                if topic is not None:
                    topic.release(client, last)

    async def unsubscribe(
        self, client: Client, subjects: list[str], request_id: Any = None
    ) -> list[dict[str, Any]]:
        held = [s for s in subjects if s in client.subjects]
        await self._remove(client, held)
        return [
            reply(True, msg_unsubscribed(s), request_id, action="unsubscribe", subjects=[s])
            if s in held
            else reply(False, msg_not_subscribed(s), request_id, action="unsubscribe", subjects=[s])
            for s in subjects
        ]

    async def publish(
        self, client: Client, body: dict[str, Any], request_id: Any = None, by_backend: bool = False
    ) -> dict[str, Any]:
        """Publish from the browser: only where the server's and the user's publish permissions allow."""
        if not self.policy.publish_allow:
            # Said before anything else is checked: the rest of the frame is moot.
            raise BadFrame("policy", "Publishing is disabled on this bridge")
        subject = body.get("subject")
        if not isinstance(subject, str):
            raise BadFrame("publish", "publish needs a string 'subject'")
        error = subject_error(subject, self.limits.max_subject_length, wildcards=False)
        if error:
            raise BadFrame("subject", error)
        refusal = client.perms.publish_refusal(subject, trusted=by_backend)
        if refusal:
            raise BadFrame("policy", refusal)
        payload = publish_payload(body)
        if len(payload) > self.limits.max_publish_bytes:
            raise BadFrame("limit", f"Payload too large: at most {self.limits.max_publish_bytes} bytes")
        try:
            await self._nats().publish(subject, payload)
        except (TimeoutError, NatsError, OSError) as exc:
            return reply(False, f"Could not publish: {exc or type(exc).__name__}", request_id,
                         action="publish", subjects=[subject])
        self.stats.published += 1
        return reply(True, f"Published to {subject}", request_id, action="publish", subjects=[subject])

    async def refresh(self, client: Client, body: dict[str, Any], request_id: Any = None) -> dict[str, Any]:
        """A fresh token on the open socket: same user, new expiry and permissions.

        Subscriptions the new token no longer allows are dropped and named in
        the reply.  Another user's token, or one that fails any check, is
        refused and the connection keeps its old expiry.
        """
        verifier = self._verifier()
        if verifier is None or client.user is None:
            raise BadFrame("refresh", "This bridge does not use tokens: there is nothing to refresh")
        token = body.get("token")
        if not isinstance(token, str):
            raise BadFrame("refresh", "refresh needs a string 'token'")
        try:
            user = verifier.verify(token)
        except TokenError as exc:
            self.stats.token_refreshes["refused"] += 1
            return reply(False, f"Token refused: {exc.message}", request_id, action="refresh")
        if user.sub != client.user.sub:
            self.stats.token_refreshes["refused"] += 1
            return reply(False, "Token refused: it is for another user (sub); reconnect to change users",
                         request_id, action="refresh")
        client.user = user
        client.perms = self.policy.for_user(user.sub, user.claim)
        self._arm_expiry(client)
        revoked = []
        for pattern, held in client.subjects.items():
            if held.by_backend:
                continue  # a backend's subscription: the user's claims never bound it
            if client.perms.subscribe_refusal(pattern):
                revoked.append(pattern)
            else:
                held.filters = client.perms.filters(pattern)
        await self._remove(client, revoked)
        self._recheck(client)
        self.stats.token_refreshes["ok"] += 1
        logger.info("connection %s%s: token refreshed, expires at %d%s", client.id, _as_user(client),
                    user.expires_at, f"; dropped {revoked}" if revoked else "")
        message = "Token refreshed" + (f"; unsubscribed from {', '.join(revoked)}" if revoked else "")
        return reply(True, message, request_id, action="refresh", expires_at=user.expires_at,
                     unsubscribed=revoked)

    # -- shared NATS subscriptions -------------------------------------------

    async def _add(
        self, client: Client, patterns: Iterable[str], by_backend: bool = False,
        stored: dict[str, StreamInfo] | None = None,
    ) -> None:
        patterns = list(patterns)
        async with self._lock:
            created: list[Topic] = []
            try:
                for pattern in patterns:
                    topic = self.topics.get(pattern)
                    if topic is None:
                        topic = await self._open(pattern, (stored or {}).get(pattern))
                        self.topics[pattern] = topic
                        created.append(topic)
                    client.subjects[pattern] = Held(client.perms.filters(pattern, by_backend), by_backend)
                    topic.place(client, self._check(client, pattern))
                if any(t.sub is not None for t in created):
                    await self._confirm_subscriptions()
            except BaseException:
                # All or nothing: undo this request's part so no half-made
                # subscription outlives it.
                self._detach(client, [p for p in patterns if p in client.subjects])
                for topic in created:
                    if not topic.held:
                        await self._drop(topic)
                raise

    async def _open(self, pattern: str, stream: StreamInfo | None) -> Topic:
        """A new topic: a live feed when a stream stores the pattern (its messages then
        carry their sequence), else a core NATS subscription."""
        topic = Topic(pattern, self.policy.needs_filter(pattern))
        on_message = self._make_callback(topic)
        if stream is not None:
            feed = LiveFeed(self.jetstream, self._nats, stream, pattern, on_message)
            try:
                await feed.start()
            except JetStreamError as exc:
                # Never quietly without sequences: a client that loses seq loses resume.
                logger.warning("no live feed for %s from stream %s: %s", pattern, stream.name, exc)
                raise FeedUnavailable(f"Could not follow {pattern!r} from stream {stream.name} now: {exc}; "
                                      "nothing was subscribed, try again later") from None
            topic.feed, topic.epoch = feed, stream.epoch
            logger.debug("live feed created for %s from stream %s", pattern, stream.name)
            return topic

        async def on_core_message(msg: Msg) -> None:
            on_message(msg, None, None)

        topic.sub = await self._nats().subscribe(pattern, cb=on_core_message)
        logger.debug("NATS subscription created for %s", pattern)
        return topic

    async def check_feeds(self) -> None:
        """Watchdog for the live feeds: restart any whose consumer went silent (a Panini task)."""
        now = time.monotonic()
        for topic in list(self.topics.values()):
            if topic.feed is not None:
                topic.feed.check(now)

    async def _confirm_subscriptions(self) -> None:
        """Wait until nats-server has our new SUBs, so "subscribed" is true when we say it.

        nats-py only buffers a SUB; without this round trip a message published
        right after the reply could reach nats-server first and be missed.
        """
        nc = self._nats()
        if not nc.is_connected:
            return  # nats-py re-sends every SUB when the link returns
        try:
            # Twice: nats-py writes flush()'s PING straight to the socket, ahead of
            # commands still in its buffer, so the first PONG can come back
            # before nats-server has our SUB.  By the time it does, the buffer
            # (SUB included) has been written, so the second PING follows it.
            await nc.flush(timeout=self.limits.close_timeout)
            await nc.flush(timeout=self.limits.close_timeout)
        except (TimeoutError, NatsError) as exc:
            # The SUB stays registered with nats-py either way; only the
            # confirmation is missing, which is not the client's error.
            logger.warning("NATS did not confirm new subscriptions: %r", exc)

    def _check(self, client: Client, pattern: str) -> Check:
        """How ``client`` holds ``pattern`` now.  The client's older patterns keep
        delivering what they match, so adding a pattern never loses or doubles a message."""
        older = []
        for other, held in client.subjects.items():
            if other == pattern:
                break
            if patterns_overlap(other, pattern):
                older.append((other, held.filters))
        return tuple(older), client.subjects[pattern].filters

    def _recheck(self, client: Client) -> None:
        for pattern in client.subjects:
            topic = self.topics.get(pattern)
            if topic is not None:
                topic.place(client, self._check(client, pattern))

    def _detach(self, client: Client, patterns: list[str]) -> list[Topic]:
        """Stop delivering ``patterns`` to ``client``; returns the topics nobody holds now."""
        empty: list[Topic] = []
        for pattern in patterns:
            client.subjects.pop(pattern, None)
            topic = self.topics.get(pattern)
            if topic is None:
                continue
            topic.discard(client)
            if not topic.held:
                empty.append(topic)
        if patterns and client.subjects:
            # Newer overlapping patterns now deliver what the removed ones did.
            self._recheck(client)
        return empty

    async def _remove(self, client: Client, patterns: list[str]) -> None:
        # Detach synchronously first: even if we are cancelled while NATS is
        # being told, the client no longer receives anything for these.
        empty = self._detach(client, patterns)
        if empty:
            # Shielded so a cancelled connection task still finishes the release.
            await asyncio.shield(self._drop_if_unused(empty))

    async def _drop_if_unused(self, topics: list[Topic]) -> None:
        async with self._lock:
            for topic in topics:
                # Someone may have re-subscribed while we waited for the lock.
                if not topic.held and self.topics.get(topic.pattern) is topic:
                    await self._drop(topic)

    async def _drop(self, topic: Topic) -> None:
        self.topics.pop(topic.pattern, None)
        if topic.feed is not None:
            await topic.feed.stop()
            return
        if topic.sub is None:
            return
        try:
            await topic.sub.unsubscribe()
            logger.debug("NATS subscription removed for %s", topic.pattern)
        except (TimeoutError, NatsError, OSError) as exc:
            # The NATS connection may already be closed at shutdown.
            logger.info("unsubscribe %s: %r", topic.pattern, exc)

    def _make_callback(self, topic: Topic) -> Callable[[Msg, int | None, str | None], None]:
        stats, permits, limit = self.stats, self.policy.permits, self.limits.queue_messages

        def on_message(msg: Msg, seq: int | None, when: str | None) -> None:
            # Synchronous: called per message in order, and every client's
            # queue receives the frame in that same order.
            stats.messages_received += 1
            subject = msg.subject
            if topic.filtered and not permits(subject):
                stats.filtered += 1
                return
            frame = text_frame(encode_nats_message(msg, seq, when))
            for client in topic.clients:
                client.send(frame)
            if topic.checked:
                for client, check in topic.checked.items():
                    if delivers(check, subject):
                        client.send(frame)
            if topic.catching and seq is not None:
                for client, catching in topic.catching.items():
                    if client.closing:
                        continue  # nothing more will be sent to it: hold and count nothing more
                    catching.held.append((seq, subject, frame))
                    if len(catching.held) > limit:
                        # Held back for a client that cannot even read its history in time.
                        stats.slow_consumer_disconnects += 1
                        client.close_soon(CLOSE_TRY_AGAIN_LATER, "slow consumer: outbound queue full")

        return on_message


def _as_user(client: Client) -> str:
    """" (user alice)" for a log line, or nothing for an anonymous connection."""
    return f" (user {client.user.sub})" if client.user is not None else ""
