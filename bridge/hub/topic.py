"""One shared NATS subscription (a ``Topic``), its subscribers, and the delivery of each message to them.

Like centrifuge's hub: the subscribers and the loop that delivers to them
live together.  A NATS message is turned into its frame once, here, and the
same bytes go to each subscriber's outbox, in the order NATS delivered them.

- ``everyone``: outboxes that get every message of the pattern;
- ``checked``: outboxes that get a message only if their ``Rule`` says so
  (an older overlapping pattern of theirs delivers it instead, or their
  token denies its subject; core/delivery.py);
- ``paused``: outboxes of sessions reading history on this pattern: their
  live messages wait in a ``Backlog``, with their sequences, until the
  history is sent; ``resume`` then sends those the history did not cover;
- ``sse_everyone`` and ``sse_checked``: the same for Server-Sent Events
  streams (hub/event_outbox.py), kept apart so that neither kind pays for the
  other: their event is built from the same JSON, once per message and only
  when the topic has such a subscriber, and each stored message gets the
  stream's own ``id:`` (``Outbox.send_message``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from bridge.core.frames import CLOSE_TRY_AGAIN_LATER, encode_nats_message, text_frame
from bridge.core.sse import message_event

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

    from bridge.core.delivery import Rule
    from bridge.core.stats import Stats
    from bridge.hub.outbox import Outbox
    from bridge.jetstream.feed import LiveFeed


class Backlog:
    """Live messages held back for a session reading history, and how it takes the pattern after."""

    __slots__ = ("messages", "rule")

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        # (stream sequence, subject, frame in the outbox's own wire form)
        self.messages: list[tuple[int, str, bytes]] = []


class Topic:
    """One NATS subscription (or JetStream live feed) of a pattern, shared by all who follow it."""

    __slots__ = ("_backlog_limit", "_permits", "_stats", "checked", "epoch", "everyone", "feed", "filtered",
                 "pattern", "paused", "sse_checked", "sse_everyone", "sub")

    def __init__(self, pattern: str, filtered: bool, permits: Callable[[str], bool], stats: Stats,
                 backlog_limit: int) -> None:
        self.pattern = pattern
        self.everyone: set[Outbox] = set()
        self.checked: dict[Outbox, Rule] = {}
        self.paused: dict[Outbox, Backlog] = {}
        self.sse_everyone: set[Outbox] = set()
        self.sse_checked: dict[Outbox, Rule] = {}
        # A core NATS subscription, or for a stored pattern a JetStream live feed.
        self.sub: Subscription | None = None
        self.feed: LiveFeed | None = None
        self.epoch = ""
        # True when the pattern can match subjects the server denies (e.g. ">"),
        # so each message's subject is checked before it is forwarded.
        self.filtered = filtered
        self._permits = permits
        self._stats = stats
        # Live messages one paused session may have waiting; past it, it is a slow consumer.
        self._backlog_limit = backlog_limit

    @property
    def in_use(self) -> bool:
        """Does any session still follow this pattern?"""
        return bool(self.everyone or self.checked or self.paused or self.sse_everyone or self.sse_checked)

    def deliver(self, msg: Msg, seq: int | None = None, when: str | None = None) -> None:
        """One message from NATS to every subscriber: encoded once, sent to each in NATS's order.

        Synchronous: called per message in order, so every outbox receives the
        frames in that same order.
        """
        stats = self._stats
        stats.messages_received += 1
        subject = msg.subject
        if self.filtered and not self._permits(subject):
            stats.filtered += 1
            return
        payload = encode_nats_message(msg, seq, when)
        frame = event = None
        if self.everyone or self.checked:
            frame = text_frame(payload)
            for outbox in self.everyone:
                outbox.send(frame)
            if self.checked:
                for outbox, rule in self.checked.items():
                    if rule.delivers(subject):
                        outbox.send(frame)
        if self.sse_everyone or self.sse_checked:
            event = message_event(payload)
            self._deliver_events(event, subject, seq)
        if self.paused and seq is not None:
            for outbox, backlog in self.paused.items():
                if outbox.closing:
                    continue  # nothing more will be sent to it: keep and count nothing more
                if outbox.sse:
                    event = event or message_event(payload)
                    backlog.messages.append((seq, subject, event))
                else:
                    frame = frame or text_frame(payload)
                    backlog.messages.append((seq, subject, frame))
                if len(backlog.messages) > self._backlog_limit:
                    # Held back for a session that cannot even read its history in time.
                    stats.slow_consumer_disconnects += 1
                    outbox.close_soon(CLOSE_TRY_AGAIN_LATER, "slow consumer: outbound queue full")

    def _deliver_events(self, event: bytes, subject: str, seq: int | None) -> None:
        """The same message to every Server-Sent Events subscriber; a stored one with each one's id."""
        if seq is None:
            for outbox in self.sse_everyone:
                outbox.send(event)
            for outbox, rule in self.sse_checked.items():
                if rule.delivers(subject):
                    outbox.send(event)
            return
        pattern = self.pattern
        for outbox in self.sse_everyone:
            outbox.send_message(event, pattern, seq)
        for outbox, rule in self.sse_checked.items():
            if rule.delivers(subject):
                outbox.send_message(event, pattern, seq)

    async def deliver_core(self, msg: Msg) -> None:
        """nats-py's callback for a core NATS subscription (no sequence, no time)."""
        self.deliver(msg)

    def place(self, outbox: Outbox, rule: Rule) -> None:
        """Deliver to ``outbox`` under ``rule`` from now on (while paused: once resumed)."""
        backlog = self.paused.get(outbox)
        if backlog is not None:
            backlog.rule = rule
            return
        everyone, checked = self._lanes(outbox)
        if rule.plain:
            checked.pop(outbox, None)
            everyone.add(outbox)
        else:
            everyone.discard(outbox)
            checked[outbox] = rule

    def _lanes(self, outbox: Outbox) -> tuple[set[Outbox], dict[Outbox, Rule]]:
        if outbox.sse:
            return self.sse_everyone, self.sse_checked
        return self.everyone, self.checked

    def pause(self, outbox: Outbox, rule: Rule) -> None:
        """From now on, hold ``outbox``'s live messages back (its session is about to read history)."""
        everyone, checked = self._lanes(outbox)
        everyone.discard(outbox)
        checked.pop(outbox, None)
        self.paused[outbox] = Backlog(rule)

    def resume(self, outbox: Outbox, after_seq: int) -> None:
        """Send what was held back, except what history already sent, and go live."""
        backlog = self.paused.pop(outbox, None)
        if backlog is None:
            return
        for seq, subject, frame in backlog.messages:
            if seq > after_seq and backlog.rule.delivers(subject):
                outbox.send_message(frame, self.pattern, seq)
        self.place(outbox, backlog.rule)

    def rule_of(self, outbox: Outbox) -> Rule | None:
        """How ``outbox`` takes this pattern while it reads history (None: it is not reading)."""
        backlog = self.paused.get(outbox)
        return backlog.rule if backlog is not None else None

    def discard(self, outbox: Outbox) -> None:
        everyone, checked = self._lanes(outbox)
        everyone.discard(outbox)
        checked.pop(outbox, None)
        self.paused.pop(outbox, None)
