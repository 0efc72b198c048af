"""One connection's state: who it is, what it may do, what it follows, and its way out.

A ``Session`` is what the bridge knows of one WebSocket client: its id (a
capability: the control API acts on a connection by it), the user its token
names and that user's permissions, the patterns it follows (each a
``Subscription``, oldest first), the history planned for its last request,
its budget of control frames, its NATS requests in flight, and its
``Outbox``, the bounded way out that every frame for it takes.  The manager,
the registry and the catch-up change a session through its methods; nothing
else writes its fields.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import TYPE_CHECKING, Any

from bridge.core.budget import ControlBudget

if TYPE_CHECKING:
    from bridge.actions.request import Call
    from bridge.core.permissions import Permissions
    from bridge.core.tokens import Identity
    from bridge.hub.outbox import Outbox
    from bridge.jetstream.reading import Plan


class Subscription:
    """How a session follows one pattern: its own denied subjects to filter out, and who asked."""

    __slots__ = ("filters", "trusted")

    def __init__(self, filters: tuple[str, ...], trusted: bool) -> None:
        # The user's own denied patterns this one can reach (checked per message).
        self.filters = filters
        # Asked by a trusted backend (control API): the user's claims do not bind it.
        self.trusted = trusted


class Session:
    # Slots: one of these per connection, and there may be tens of thousands.
    __slots__ = ("budget", "expiry", "id", "opened", "outbox", "peer", "perms", "plans", "requests",
                 "subscriptions", "user")

    def __init__(self, peer: str, user: Identity | None, perms: Permissions, rate: float,
                 strikes: int) -> None:
        # 128 bits from the CSPRNG: the id doubles as the capability that lets a
        # backend act on this connection over the control API, so it must not be guessable.
        self.id = secrets.token_urlsafe(16)
        self.peer = peer
        # Who the token says this is (None: anonymous) and what they may do.
        self.user = user
        self.perms = perms
        # The patterns this session follows, oldest first: the order decides which
        # of two overlapping patterns delivers a message (core/delivery.py).
        self.subscriptions: dict[str, Subscription] = {}
        # History planned by the request being answered, sent after its reply (hub/catchup.py).
        self.plans: list[Plan] = []
        # The token's expiry warning and deadline (hub/lifetime.py arms them).
        self.expiry: list[asyncio.TimerHandle] = []
        # Its NATS requests waiting for their answers (actions/request.py).
        self.requests: set[Call] = set()
        self.opened = time.monotonic()
        self.budget = ControlBudget(rate, strikes, self.opened)
        # Set by the manager once the WebSocket is prepared.
        self.outbox: Outbox = None  # type: ignore[assignment]

    @property
    def label(self) -> str:
        """Who this is in a log line: its id, and its user when there is one."""
        return f"{self.id} (user {self.user.sub})" if self.user is not None else self.id

    @property
    def closing(self) -> bool:
        return self.outbox.closing

    def send(self, frame: bytes) -> None:
        self.outbox.send(frame)

    def send_json(self, frame: dict[str, Any]) -> None:
        self.outbox.send_json(frame)

    def take_frame(self) -> bool:
        """Is a frame arriving now within this session's budget?"""
        return self.budget.take(time.monotonic())

    def strike(self) -> bool:
        """Count a refused frame; True once the session has earned a disconnect."""
        return self.budget.strike(time.monotonic())

    def renew(self, user: Identity, perms: Permissions) -> None:
        """A fresh token for the same user: its expiry and permissions from now on."""
        self.user = user
        self.perms = perms
