"""One shared NATS subscription (a ``Topic``) and who gets each of its messages.

Most clients of a topic get every message (``clients``).  Some get a message
only after a check (``checked``): a client holding an older pattern that
overlaps this one gets the message from that older pattern instead (so each
message arrives once), and a user's token may deny some subjects inside an
allowed pattern.  A client reading history on the topic (``catching``) has
its live messages held back, with their sequences, until the history is sent;
``release`` then sends those the history did not cover.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nats.aio.subscription import Subscription

from subjects import subject_matches

if TYPE_CHECKING:
    from connection import Client
    from jetstream import LiveFeed


# How a client that needs a per-message check holds a pattern: the older
# overlapping patterns it also holds (each with its own filters), and its own
# filters for this one.
Check = tuple[tuple[tuple[str, tuple[str, ...]], ...], tuple[str, ...]]


class CatchUp:
    """A client reading history on a topic: its live messages wait here, with their sequences."""

    __slots__ = ("check", "held")

    def __init__(self, check: Check) -> None:
        self.check = check
        self.held: list[tuple[int, str, bytes]] = []


class Topic:
    """One NATS subscription (or JetStream live feed) and the clients that share it."""

    __slots__ = ("catching", "checked", "clients", "epoch", "feed", "filtered", "pattern", "sub")

    def __init__(self, pattern: str, filtered: bool) -> None:
        self.pattern = pattern
        # Clients that get every message of this subscription.
        self.clients: set[Client] = set()
        # Clients that get a message only after a check: one of their older
        # overlapping patterns delivers it instead (each message once), or it
        # is on a subject their token denies.  Clients with neither never pay.
        self.checked: dict[Client, Check] = {}
        # Clients reading history: live messages are held for them until it is sent.
        self.catching: dict[Client, CatchUp] = {}
        # A core NATS subscription, or for a stored pattern a JetStream live feed.
        self.sub: Subscription | None = None
        self.feed: LiveFeed | None = None
        self.epoch = ""
        # True when the pattern can match subjects the server denies (e.g. ">"),
        # so each message's subject is checked before it is forwarded.
        self.filtered = filtered

    @property
    def held(self) -> bool:
        return bool(self.clients or self.checked or self.catching)

    def place(self, client: Client, check: Check) -> None:
        catching = self.catching.get(client)
        if catching is not None:
            catching.check = check  # applies once its history is sent
        elif check[0] or check[1]:
            self.clients.discard(client)
            self.checked[client] = check
        else:
            self.checked.pop(client, None)
            self.clients.add(client)

    def hold(self, client: Client, check: Check) -> None:
        """From now on, hold ``client``'s live messages back (it is about to read history)."""
        self.clients.discard(client)
        self.checked.pop(client, None)
        self.catching[client] = CatchUp(check)

    def release(self, client: Client, after_seq: int) -> None:
        """Send what was held back, except what history already sent, and go live."""
        catching = self.catching.pop(client, None)
        if catching is None:
            return
        for seq, subject, frame in catching.held:
            if seq > after_seq and delivers(catching.check, subject):
                client.send(frame)
        self.place(client, catching.check)

    def discard(self, client: Client) -> None:
        self.clients.discard(client)
        self.checked.pop(client, None)
        self.catching.pop(client, None)


def denied(filters: tuple[str, ...], subject: str) -> bool:
    """Does one of a client's filters (its token's denied patterns) match ``subject``?"""
    return any(subject_matches(f, subject) for f in filters)


def delivers(check: Check, subject: str) -> bool:
    """Does a checked client get a message on ``subject`` through this pattern?"""
    older, filters = check
    if denied(filters, subject):
        return False  # the user's token denies it
    # An older pattern that matches (and does not filter it) delivers it instead.
    return not any(subject_matches(p, subject) and not denied(pf, subject) for p, pf in older)
