"""Presence on this process: its sessions' joins and leaves, the watchers' frames, the answers.

The manager calls four hooks (``check`` before a subscribe, ``subscribed``,
``unsubscribed``, ``unregistered``) and dispatches the ``presence`` action to
``answer``; everything else happens here.

- A session joins each exact subject it subscribes to within
  ``PRESENCE_SUBJECTS``: one entry, stored under this process's incarnation
  (store.py), acknowledged and read back (the feed) before the subscribe's
  reply, so the reply means "you are here".  It leaves on unsubscribe and when
  the connection ends (then in the background: an ending connection waits for
  nothing).
- Every process reads every presence message into its ``PresenceTable``
  (feed.py, reader.py); answers and join/leave frames come from it, so they are the same
  on every process of the cluster and cost no NATS work.
- A watcher (a subscribe with ``"presence": true``) gets each change of the
  table on its subject.  Its own join comes after the subscribe's reply: frames
  for it are held until the reply has been queued.
- ``tick`` (every second, more often for short leases) renews the lease,
  starts a new incarnation when the old one may have lapsed or NATS came back
  (every entry written again under it, then the old one removed: watchers see
  no leave for the move), reads the stream again when the feed falls silent,
  retries failed writes, and purges what dead incarnations left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from bridge.core.frames import BadFrame, json_frame, reply
from bridge.core.presence import Change, Entry, PresenceNames, PresenceSpace
from bridge.core.subjects import subject_error
from bridge.jetstream.api import JetStream, JetStreamError
from bridge.presence.feed import PresenceFeed
from bridge.presence.reader import TableReader
from bridge.presence.store import LeaseLost, PresenceStore

if TYPE_CHECKING:
    from bridge.hub.session import Session

logger = logging.getLogger(__name__)

# No PRESENCE_SUBJECTS: presence kept nowhere (a manager built without settings, in tests).
NOWHERE = PresenceSpace()
# Writes in flight at once when every entry is written again (a new incarnation).
WRITES_IN_FLIGHT = 64
# How long a join or leave waits to read itself back before its reply goes anyway.
READ_BACK_TIMEOUT = 2.0
# An incarnation with entries and no lease seen is purged after this many lease lifetimes.
ORPHAN_LIFETIMES = 2


class Watcher:
    """A session watching one subject; frames are held until its subscribe's reply is queued."""

    __slots__ = ("held", "session")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.held: list[bytes] | None = []

    def send(self, frame: bytes) -> None:
        if self.held is not None:
            self.held.append(frame)
        else:
            self.session.send(frame)

    def release(self) -> None:
        held, self.held = self.held, None
        for frame in held or ():
            self.session.send(frame)


class Presence:
    def __init__(self, nats_client: Callable[[], NATS | None], jetstream: JetStream,
                 space: PresenceSpace = NOWHERE, root: str = "bridge.control", ttl: float = 15.0,
                 max_entries: int = 1000, max_subject_length: int = 256, worker: int = 1) -> None:
        self.space = space
        self.max_entries = max_entries
        self._max_subject_length = max_subject_length
        self._nats = nats_client
        self._js = jetstream
        self.names = PresenceNames(root)
        self.store = PresenceStore(jetstream, nats_client, self.names, ttl, worker)
        self.reader = TableReader(self.names, self._tell, self._lease_ended)
        self.feed = PresenceFeed(jetstream, nats_client, self.names.stream, self.names.pattern, self.reader)
        self.problem = "starting"
        # This process's entries: client -> entry, each session's subject -> client, and for
        # each client the incarnation it was last written under.
        self.entries: dict[str, Entry] = {}
        self._joined: dict[Session, dict[str, str]] = {}
        self._written: dict[str, str] = {}
        self._dirty: set[str] = set()  # to write (again) under the current incarnation
        self._erase: dict[str, str] = {}  # client -> incarnation: removals to retry
        self._watchers: dict[str, dict[Session, Watcher]] = {}
        self._syncing: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._reconnects = 0
        self._orphans: dict[str, float] = {}
        self._purged: set[str] = set()

    # -- the manager's hooks --------------------------------------------------------------

    def check(self, session: Session, subjects: list[str], watch: Any) -> None:
        """Before a subscribe: refuse (BadFrame, nothing subscribed) a watch that cannot be kept."""
        if watch is None or watch is False:
            return
        if watch is not True:
            raise BadFrame("presence", "'presence' must be true or false")
        for subject in subjects:
            refusal = self.space.refusal(subject, _sub(session))
            if refusal:
                raise BadFrame("presence", refusal)

    async def subscribed(self, session: Session, subjects: list[str], watch: Any = None) -> None:
        """After a successful subscribe: join where presence is kept, watch where asked."""
        if not self.space.on:
            return
        watchers = [self._watch(session, s) for s in subjects] if watch is True else []
        mine = self._joined.get(session, {})
        new = [s for s in subjects
               if s in session.subscriptions and s not in mine and self.space.keeps(s, _sub(session))]
        clients = [self._join(session, s) for s in new]
        seqs = await asyncio.gather(*(self._write(c) for c in clients))
        # An entry lives only while its subscription does: one released meanwhile (the
        # connection ended while a backend's subscribe for it was under way) leaves at once.
        for subject, client in list(self._joined.get(session, {}).items()):
            if subject not in session.subscriptions:
                self._background_task(self._leave(session, subject, client))
        await self._reached(max((s for s in seqs if s is not None), default=0))
        # After every await: the reply is queued before this runs (call_soon), so a watcher's
        # own join, already applied by now, reaches it after the reply.
        for watcher in watchers:
            asyncio.get_running_loop().call_soon(watcher.release)

    async def unsubscribed(self, session: Session, subjects: list[str]) -> None:
        """After an unsubscribe (or a refresh that dropped subscriptions): leave and stop watching."""
        seqs = []
        for subject in subjects:
            self._unwatch(session, subject)
            client = self._joined.get(session, {}).get(subject)
            if client is not None:
                seqs.append(await self._leave(session, subject, client))
        await self._reached(max((s for s in seqs if s is not None), default=0))

    def unregistered(self, session: Session) -> None:
        """The connection ended: stop watching, and leave everywhere (stored in the background:
        an ending connection waits for nothing, and a cancelled one must still leave)."""
        for subject in list(self._watchers):
            self._unwatch(session, subject)
        for subject, client in list(self._joined.get(session, {}).items()):
            incarnation = self._forget(session, subject, client)
            if incarnation is not None:
                self._background_task(self._remove(client, incarnation))

    def answer(self, session: Session, body: dict[str, Any], request_id: Any = None,
               trusted: bool = False) -> dict[str, Any]:
        """``{"action": "presence", "subject": ...}``: who is here, from this process's table."""
        subject = body.get("subject")
        if not isinstance(subject, str):
            raise BadFrame("presence", "presence needs a 'subject': one exact subject, as a string")
        error = subject_error(subject, self._max_subject_length)
        if error:
            raise BadFrame("subject", error)
        refusal = session.perms.subscribe_refusal(subject, trusted=trusted) or \
            self.space.refusal(subject, _sub(session))
        if refusal is None and not self.reader.ready:
            refusal = f"Presence is not available right now: {self.problem}"
        if refusal is not None:
            return reply(False, refusal, request_id, action="presence", subject=subject)
        found = self.reader.table.answer(subject, self.max_entries)
        shown = len(found["presence"])
        message = f"{found['count']} here on {subject}"
        if shown < found["count"]:
            message += f" ({shown} listed: PRESENCE_MAX)"
        return reply(True, message, request_id, action="presence", subject=subject, **found)

    # -- joining and leaving ------------------------------------------------------------------

    def _join(self, session: Session, subject: str) -> str:
        """A new entry of ours (written by ``_write``); its client id, random, never the connection id."""
        user = session.user
        entry = Entry(subject, user.sub if user else None, secrets.token_urlsafe(12), int(time.time()),
                      user.info if user else None)
        self.entries[entry.client] = entry
        self._joined.setdefault(session, {})[subject] = entry.client
        return entry.client

    async def _write(self, client: str) -> int | None:
        """Store one of our entries under the current incarnation; its sequence, or None (retried later)."""
        entry, incarnation = self.entries.get(client), self.store.incarnation
        if entry is None:
            return None  # left meanwhile
        if incarnation is None or self.store.lapsed(time.monotonic()):
            self._dirty.add(client)
            return None
        self._written[client] = incarnation
        self._dirty.discard(client)
        try:
            return await self.store.put(incarnation, entry)
        except JetStreamError as exc:
            logger.info("presence: entry on %s not stored yet: %s", entry.subject, exc)
            if client in self.entries:
                self._dirty.add(client)
            return None

    async def _leave(self, session: Session, subject: str, client: str) -> int | None:
        incarnation = self._forget(session, subject, client)
        if incarnation is None:
            return None  # never written: nothing to remove
        return await self._remove(client, incarnation)

    def _forget(self, session: Session, subject: str, client: str) -> str | None:
        """No longer ours to keep; the incarnation it was written under, if it was."""
        mine = self._joined.get(session, {})
        mine.pop(subject, None)
        if not mine:
            self._joined.pop(session, None)
        self.entries.pop(client, None)
        self._dirty.discard(client)
        return self._written.pop(client, None)

    async def _remove(self, client: str, incarnation: str) -> int | None:
        self._erase[client] = incarnation
        try:
            seq = await self.store.remove(incarnation, client)
        except JetStreamError as exc:
            logger.info("presence: leave not stored yet: %s", exc)
            return None
        if self._erase.get(client) == incarnation:
            del self._erase[client]
        return seq

    # -- watchers -------------------------------------------------------------------------------

    def _watch(self, session: Session, subject: str) -> Watcher:
        watchers = self._watchers.setdefault(subject, {})
        watcher = watchers.get(session)
        if watcher is None:
            watcher = watchers[session] = Watcher(session)
        return watcher

    def _unwatch(self, session: Session, subject: str) -> None:
        watchers = self._watchers.get(subject)
        if watchers is not None and watchers.pop(session, None) is not None and not watchers:
            del self._watchers[subject]

    def _tell(self, changes: list[Change]) -> None:
        for change in changes:
            watchers = self._watchers.get(change.entry.subject)
            if watchers:
                frame = json_frame(change.frame())  # encoded once for every watcher
                for watcher in watchers.values():
                    watcher.send(frame)

    def _lease_ended(self, incarnation: str) -> None:
        """A lease is gone from the table (told by the reader)."""
        if incarnation == self.store.incarnation:
            # Our own lease expired under us (we could not renew it in time): start anew.
            logger.warning("presence: our lease %s expired; writing our entries again", incarnation)
            self._sync(reincarnate=True)
        elif incarnation not in self._purged:
            self._purged.add(incarnation)
            self._background_task(self._purge(incarnation))

    async def _reached(self, seq: int) -> None:
        if self.feed.running:
            await self.reader.reached(seq, READ_BACK_TIMEOUT)

    # -- keeping it stored --------------------------------------------------------------------------

    async def lifecycle(self, web_app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context, after the NATS link: a lease, the feed read whole (bounded)."""
        if self.space.on:
            nc = self._nats()
            self._reconnects = nc.stats["reconnects"] if nc is not None else 0
            self._sync(reincarnate=True, read=True)
            assert self._syncing is not None
            await asyncio.gather(self._syncing, return_exceptions=True)
            await self._until_ready(self._js.timeout)
        yield
        await self.stop()

    async def _until_ready(self, timeout: float) -> None:
        if self.feed.running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reader.read.wait(), timeout)

    @property
    def tick_interval(self) -> float:
        """How often ``tick`` runs: every second, or twice per renewal when leases are short."""
        return min(1.0, self.store.renew_every / 2)

    async def tick(self) -> None:
        """Every ``tick_interval`` (a Panini task): keep the lease, the feed and the writes going."""
        nc = self._nats()
        if not self.space.on or nc is None or not nc.is_connected:
            return
        if self._syncing is not None and not self._syncing.done():
            return
        now = time.monotonic()
        reconnects = nc.stats["reconnects"]
        if reconnects != self._reconnects:
            # NATS came back: the stream may be new (a restarted server keeps no memory stream)
            # and our lease may have expired meanwhile.  Both are made good at once.
            self._reconnects = reconnects
            self._sync(reincarnate=True, read=True)
            return
        if self.store.lapsed(now):
            self._sync(reincarnate=True, read=not self.feed.healthy(now))
            return
        if not self.feed.healthy(now):
            self._sync(reincarnate=False, read=True)
            return
        if self.store.renewal_due(now):
            try:
                await self.store.renew()
            except LeaseLost as exc:
                logger.warning("presence: lease lost (%s); writing our entries again", exc)
                self._sync(reincarnate=True, read=False)
                return
            except JetStreamError as exc:
                logger.info("presence: lease not renewed this time: %s", exc)
        await self._retry()
        self._collect(now)

    def _sync(self, reincarnate: bool, read: bool = False) -> None:
        if self._syncing is not None and not self._syncing.done():
            return
        self._syncing = asyncio.create_task(self._resync(reincarnate, read))

    async def _resync(self, reincarnate: bool, read: bool) -> None:
        try:
            await self.store.ensure_stream()
            if reincarnate:
                old = self.store.incarnation
                await self.store.begin()
                self._dirty = set(self.entries)
                self._erase.clear()  # whatever the old incarnation held goes with it
                await self._retry()
                if old is not None:
                    self._purged.add(old)  # we purge it ourselves, right here
                    try:
                        await self.store.end(old)
                    except JetStreamError:
                        self._purged.discard(old)  # its lease expires: whoever sees that purges
            if read or not self.feed.running:
                await self.feed.start()
        except (JetStreamError, NatsError, OSError) as exc:
            # NATS or JetStream not there (yet): the next tick tries again.
            self.problem = str(exc) or type(exc).__name__
            logger.warning("presence: %s (trying again)", self.problem)

    async def _retry(self) -> None:
        """Write what is not stored under the current incarnation, and the removals that failed."""
        current = self.store.incarnation
        self._erase = {c: i for c, i in self._erase.items() if i == current}  # others go with their lease
        for client, incarnation in list(self._erase.items()):
            await self._remove(client, incarnation)
        dirty = [c for c in self._dirty if c in self.entries]
        for start in range(0, len(dirty), WRITES_IN_FLIGHT):
            await asyncio.gather(*(self._write(c) for c in dirty[start:start + WRITES_IN_FLIGHT]))

    def _collect(self, now: float) -> None:
        """Purge incarnations whose entries outlived any lease we saw (their bridges died unseen)."""
        table = self.reader.table
        orphans = table.orphans() - {self.store.incarnation}
        limit = ORPHAN_LIFETIMES * self.store.lease_ttl
        self._orphans = {i: self._orphans.get(i, now) for i in orphans}
        for incarnation, since in list(self._orphans.items()):
            if now - since > limit:
                del self._orphans[incarnation]
                table.end(incarnation)
                self._background_task(self._purge(incarnation))

    async def _purge(self, incarnation: str) -> None:
        try:
            await self.store.purge(incarnation)
        except JetStreamError as exc:
            logger.info("presence: could not purge %s: %s", incarnation, exc)

    def _background_task(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self) -> None:
        """At shutdown: our lease removed (everyone drops our entries at once), the feed stopped."""
        tasks = [t for t in (self._syncing, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.feed.stop()
        incarnation, self.store.incarnation = self.store.incarnation, None
        nc = self._nats()
        if incarnation is not None and nc is not None and nc.is_connected:
            try:
                await self.store.end(incarnation)
            except JetStreamError as exc:
                logger.info("presence: lease not removed at stop (it expires by itself): %s", exc)


def _sub(session: Session) -> str | None:
    return session.user.sub if session.user is not None else None

