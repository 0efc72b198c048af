"""Who may take a connection slot: ``MAX_CONNECTIONS`` a process, ``MAX_CONNECTIONS_PER_USER`` a user.

Checked before the upgrade (routes answer 503 or 429 in words) and held for
the connection's whole life.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge.core.tokens import Identity


class Admission:
    def __init__(self, max_connections: int, max_connections_per_user: int) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self.max_connections_per_user = max_connections_per_user
        # Connections each user holds or is opening here.
        self._user_slots: Counter[str] = Counter()

    @property
    def full(self) -> bool:
        """Every connection slot is taken (checked before the upgrade, to answer 503)."""
        return self._slots.locked()

    def user_full(self, sub: str) -> bool:
        """``sub`` holds every connection it may here (checked before the upgrade, to answer 429)."""
        return self._user_slots[sub] >= self.max_connections_per_user

    @contextlib.asynccontextmanager
    async def slot(self, user: Identity | None) -> AsyncIterator[None]:
        """Hold a connection slot (and one of ``user``'s) from before the upgrade to the end.

        Threat: one user's handshakes racing past the check.  ``ws.prepare``
        awaits, and registration comes after it, so counting there would let
        every handshake already in flight pass routes.stream's check.  This is
        entered synchronously right after that check (nothing awaits between).
        """
        if user is not None:
            self._user_slots[user.sub] += 1
        try:
            async with self._slots:
                yield
        finally:
            if user is not None:
                self._user_slots[user.sub] -= 1
                if not self._user_slots[user.sub]:
                    del self._user_slots[user.sub]
