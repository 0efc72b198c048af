"""Every pattern followed on this process, each with exactly one shared NATS subscription.

The first session to follow a pattern creates its ``Topic`` (a core NATS
subscription, or a JetStream live feed when a stream stores the pattern, so
its messages carry their sequence); the last one to leave removes it.  A
lock serialises the changes, so two sessions asking for the same new pattern
at once never make two subscriptions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from nats.errors import Error as NatsError

from bridge.core.delivery import Rule
from bridge.core.frames import BadFrame
from bridge.core.subjects import patterns_overlap
from bridge.hub.session import Subscription
from bridge.hub.topic import Topic
from bridge.jetstream.api import JetStreamError, storing
from bridge.jetstream.feed import LiveFeed

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from bridge.config import Limits
    from bridge.core.permissions import SubjectPolicy
    from bridge.core.stats import Stats
    from bridge.hub.session import Session
    from bridge.jetstream.api import JetStream, StreamInfo

logger = logging.getLogger(__name__)


class FeedUnavailable(Exception):
    """A stored pattern cannot get its live feed now; the message is the reply."""


class Registry:
    def __init__(self, nats_client: Callable[[], NATS], jetstream: JetStream, policy: SubjectPolicy,
                 stats: Stats, limits: Limits) -> None:
        self._nats = nats_client
        self._jetstream = jetstream
        self._policy = policy
        self._stats = stats
        self._limits = limits
        self.topics: dict[str, Topic] = {}
        # Serialises changes to ``topics``: two sessions asking for the same new
        # pattern at once must not create two NATS subscriptions.
        self._lock = asyncio.Lock()

    def is_stored(self, pattern: str) -> bool:
        """Is ``pattern`` followed through a live feed (its messages carry their sequence)?"""
        topic = self.topics.get(pattern)
        return topic is not None and topic.feed is not None

    def check_share(self, session: Session, stored: list[str],
                    users: Mapping[str, Iterable[Session]]) -> None:
        """BadFrame if ``session`` may not follow the stored patterns ``stored`` as well.

        Threat: one user exhausting JetStream consumers for everyone.  Each stored
        pattern costs a consumer (its live feed) on the NATS account, where streams
        and other applications have limits of their own; without these shares one
        user's connections could take them all, and then nobody else could read
        history, resume, or even create the durable consumer their own app needs.
        """
        if not stored:
            return
        limits, is_stored = self._limits, self.is_stored
        mine = sum(1 for p in session.subscriptions if is_stored(p))
        if mine + len(stored) > limits.max_stored_subjects:
            raise BadFrame("limit", f"Stored subject limit: at most {limits.max_stored_subjects} subjects "
                                    "from JetStream streams per connection (MAX_STORED_SUBJECTS)")
        if session.user is None:
            return
        theirs = {p for s in users.get(session.user.sub, ()) for p in s.subscriptions if is_stored(p)}
        if len(theirs | set(stored)) > limits.max_stored_subjects_per_user:
            raise BadFrame("limit", f"Stored subject limit: user {session.user.sub} may follow at most "
                                    f"{limits.max_stored_subjects_per_user} subjects from JetStream streams "
                                    "at once (MAX_STORED_SUBJECTS_PER_USER)")

    async def streams_storing(self, patterns: list[str], fresh: bool) -> dict[str, StreamInfo]:
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
            streams = await self._jetstream.streams()
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

    # -- following and leaving ------------------------------------------------

    async def add(self, session: Session, patterns: Iterable[str], trusted: bool = False,
                  stored: dict[str, StreamInfo] | None = None) -> None:
        """``session`` follows ``patterns``, all or nothing: nothing half-made outlives the call."""
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
                    session.subscriptions[pattern] = Subscription(session.perms.filters(pattern, trusted),
                                                                  trusted)
                    topic.place(session.outbox, self.rule(session, pattern))
                if any(t.sub is not None for t in created):
                    await self._confirm_subscriptions()
            except BaseException:
                self._detach(session, [p for p in patterns if p in session.subscriptions])
                for topic in created:
                    if not topic.in_use:
                        await self._drop(topic)
                raise

    async def remove(self, session: Session, patterns: list[str]) -> None:
        """``session`` stops following ``patterns``; a pattern nobody follows any more is dropped."""
        # Detach synchronously first: even if we are cancelled while NATS is
        # being told, the session no longer receives anything for these.
        empty = self._detach(session, patterns)
        if empty:
            # Shielded so a cancelled connection task still finishes the release.
            await asyncio.shield(self._drop_if_unused(empty))

    def rule(self, session: Session, pattern: str) -> Rule:
        """How ``session`` takes ``pattern`` now.  Its older patterns keep delivering what
        they match, so adding a pattern never loses or doubles a message."""
        older = []
        for other, subscription in session.subscriptions.items():
            if other == pattern:
                break
            if patterns_overlap(other, pattern):
                older.append((other, subscription.filters))
        return Rule(tuple(older), session.subscriptions[pattern].filters)

    def reroute(self, session: Session) -> None:
        """Place ``session`` on each of its topics again (its patterns or filters changed)."""
        for pattern in session.subscriptions:
            topic = self.topics.get(pattern)
            if topic is not None:
                topic.place(session.outbox, self.rule(session, pattern))

    async def check_feeds(self) -> None:
        """Watchdog for the live feeds: restart any whose consumer went silent (a Panini task)."""
        now = time.monotonic()
        for topic in list(self.topics.values()):
            if topic.feed is not None:
                topic.feed.check(now)

    # -- the NATS side ----------------------------------------------------------

    async def _open(self, pattern: str, stream: StreamInfo | None) -> Topic:
        """A new topic: a live feed when a stream stores the pattern, else a core NATS subscription."""
        topic = Topic(pattern, self._policy.needs_filter(pattern), self._policy.permits, self._stats,
                      self._limits.queue_messages)
        if stream is not None:
            feed = LiveFeed(self._jetstream, self._nats, stream, pattern, topic.deliver)
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
        topic.sub = await self._nats().subscribe(pattern, cb=topic.deliver_core)
        logger.debug("NATS subscription created for %s", pattern)
        return topic

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
            await nc.flush(timeout=self._limits.close_timeout)
            await nc.flush(timeout=self._limits.close_timeout)
        except (TimeoutError, NatsError) as exc:
            # The SUB stays registered with nats-py either way; only the
            # confirmation is missing, which is not the client's error.
            logger.warning("NATS did not confirm new subscriptions: %r", exc)

    def _detach(self, session: Session, patterns: list[str]) -> list[Topic]:
        """Stop delivering ``patterns`` to ``session``; the topics nobody follows now."""
        empty: list[Topic] = []
        for pattern in patterns:
            session.subscriptions.pop(pattern, None)
            topic = self.topics.get(pattern)
            if topic is None:
                continue
            topic.discard(session.outbox)
            if not topic.in_use:
                empty.append(topic)
        if patterns and session.subscriptions:
            # Newer overlapping patterns now deliver what the removed ones did.
            self.reroute(session)
        return empty

    async def _drop_if_unused(self, topics: list[Topic]) -> None:
        async with self._lock:
            for topic in topics:
                # Someone may have subscribed again while we waited for the lock.
                if not topic.in_use and self.topics.get(topic.pattern) is topic:
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
