"""The feed's reader: every presence message into this process's table, and what changed.

The feed (feed.py) hands over each stored message in the stream's order.  A
fresh read (``begin``) fills a new table while the old one goes on answering;
once it has caught up the new one takes its place and watchers hear only the
difference.  After that every message changes the table in place.  A join or
leave may wait (``reached``) until the table has applied its own write.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nats.aio.msg import Msg

from bridge.core.presence import Change, PresenceNames, PresenceTable, decode_entry, is_deletion

logger = logging.getLogger(__name__)


class TableReader:
    def __init__(self, names: PresenceNames, tell: Callable[[list[Change]], None],
                 lease_ended: Callable[[str], None]) -> None:
        self._names = names
        # Watchers hear each change; the room purges (or renews) after a lease ends.
        self._tell = tell
        self._lease_ended = lease_ended
        self.table = PresenceTable()  # what answers and watchers see
        self._building: PresenceTable | None = None  # a fresh read, until it has caught up
        self._building_seq = 0
        self.ready = False  # a table has been read whole at least once
        self.read = asyncio.Event()  # set with ready
        self._applied = 0  # the last stream sequence applied to the table
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def begin(self) -> None:
        self._building, self._building_seq = PresenceTable(), 0

    def message(self, seq: int, msg: Msg) -> None:
        table = self._building or self.table
        changes = self._apply(table, msg)
        if table is self.table:
            self._tell(changes)
            self._advance(seq)
        else:
            self._building_seq = seq

    def caught_up(self) -> None:
        fresh, self._building = self._building, None
        if fresh is None:
            return
        changes = self.table.changes_to(fresh)
        self.table = fresh
        self.ready = True
        self.read.set()
        self._tell(changes)
        self._advance(self._building_seq)

    def _apply(self, table: PresenceTable, msg: Msg) -> list[Change]:
        parsed = self._names.parse(msg.subject)
        if parsed is None:
            return []
        kind, incarnation, client = parsed
        gone = is_deletion(msg.headers)
        if kind == "lease":
            if not gone:
                return table.lease(incarnation)
            if table is self.table:
                self._lease_ended(incarnation)
            return table.end(incarnation)
        assert client is not None
        if gone:
            return table.drop(incarnation, client)
        entry = decode_entry(msg.data)
        return table.put(incarnation, entry) if entry is not None and entry.client == client else []

    def _advance(self, seq: int) -> None:
        self._applied = max(self._applied, seq)
        while self._waiters and self._waiters[0][0] <= self._applied:
            _, waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)

    async def reached(self, seq: int, timeout: float) -> None:
        """Wait (at most ``timeout``) until the table has applied ``seq``: a write of ours, read back."""
        if not seq or seq <= self._applied:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, waiter))
        self._waiters.sort(key=lambda w: w[0])
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            logger.info("presence: sequence %d not read back within %g s", seq, timeout)
        finally:
            self._waiters = [w for w in self._waiters if w[1] is not waiter]
