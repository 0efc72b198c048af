"""Presence, the pure part: where it is kept, what an entry is and how it is stored, the table of who is here.

No I/O: bridge/presence/ stores entries in JetStream and reads them back; this
decides the names, the stored form, what each stored message means to the
table, which entries are visible, and what an answer says.

The model (docs/presence.md).  Every bridge process has a *lease*, one stored
message that expires unless renewed (a per-message TTL), under an
*incarnation* id of its own.  Each entry is one stored message under the
incarnation that wrote it.  An entry is visible while its incarnation's lease
is alive: a process that dies without a word takes every entry it held with
it when its lease expires, at one stroke, without anyone deleting them one by
one.  Every process reads every presence message, in the stream's order, into
a ``PresenceTable``; answers and join/leave frames come from that table.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bridge.core.permissions import expand
from bridge.core.subjects import subject_matches

# Headers that make a stored message a deletion: the server's own marker on a lease
# that expired (Nats-Marker-Reason: MaxAge) and ours on an entry or a lease removed.
MARKER_REASON = "Nats-Marker-Reason"
KV_OPERATION = "KV-Operation"


# -- where presence is kept --------------------------------------------------------


@dataclass(frozen=True)
class PresenceSpace:
    """``PRESENCE_SUBJECTS``: the patterns (``{sub}`` allowed) whose exact subjects keep presence."""

    patterns: tuple[str, ...] = ()

    @property
    def on(self) -> bool:
        return bool(self.patterns)

    def keeps(self, subject: str, sub: str | None) -> bool:
        """Is presence kept on the exact ``subject`` for the user ``sub`` (None: anonymous)?"""
        if is_pattern(subject):
            return False
        return any(subject_matches(p, subject) for p in expand(self.patterns, sub))

    def refusal(self, subject: str, sub: str | None) -> str | None:
        """Why presence cannot be watched or asked on ``subject``, in words, or None."""
        if not self.on:
            return "Presence is not kept on any subject here (PRESENCE_SUBJECTS is empty)"
        if is_pattern(subject):
            return (f"Presence needs an exact subject: {subject!r} has a wildcard "
                    "(a wildcard subscription never joins presence)")
        if not self.keeps(subject, sub):
            return f"Presence is not kept on {subject!r}: it is not within PRESENCE_SUBJECTS"
        return None


def is_pattern(subject: str) -> bool:
    return any(token in ("*", ">") for token in subject.split("."))


# -- what is stored, and where -------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One client's presence on one subject.  ``client`` is an opaque id for this entry alone:
    never the connection id, which is a capability for the control API."""

    subject: str
    user: str | None
    client: str
    since: int
    info: Mapping[str, Any] | None = None

    def public(self) -> dict[str, Any]:
        """As an answer lists it."""
        shown: dict[str, Any] = {"user": self.user, "client": self.client, "since": self.since}
        if self.info is not None:
            shown["info"] = self.info
        return shown

    def encode(self) -> bytes:
        return json.dumps({"subject": self.subject, **self.public()}, ensure_ascii=False).encode()


def decode_entry(data: bytes) -> Entry | None:
    """A stored entry, or None for anything that is not one (whoever may write there is trusted,
    but a malformed message must not break every bridge's table)."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    subject, user, client, since = obj.get("subject"), obj.get("user"), obj.get("client"), obj.get("since")
    info = obj.get("info")
    if not (isinstance(subject, str) and isinstance(client, str) and (user is None or isinstance(user, str))):
        return None
    if isinstance(since, bool) or not isinstance(since, int) or not (info is None or isinstance(info, dict)):
        return None
    return Entry(subject, user, client, since, info)


_NAME_CHARACTER = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class PresenceNames:
    """Presence's stream and subjects under ``root`` (CONTROL_SUBJECT).

    Under the control plane's subject on purpose: permissions.control_patterns
    denies it to browsers whatever SUBJECT_ALLOW, SUBJECT_DENY and
    DANGEROUSLY_UNPROTECT_SUBJECTS say, so no browser can read presence through
    a subscription (``>`` is filtered message by message) nor forge an entry.
    """

    root: str

    @property
    def prefix(self) -> str:
        return f"{self.root}.presence"

    @property
    def pattern(self) -> str:
        return f"{self.prefix}.>"

    @property
    def stream(self) -> str:
        # One per CONTROL_SUBJECT, as separate deployments on one NATS need.  Stream names
        # take no '.', '*', '>', spaces or slashes; a long root is shortened by its hash.
        name = "PRESENCE_" + _NAME_CHARACTER.sub("_", self.root)
        if len(name) > 64:
            name = name[:47] + "_" + hashlib.sha256(self.root.encode()).hexdigest()[:16]
        return name

    def lease(self, incarnation: str) -> str:
        return f"{self.prefix}.i.{incarnation}"

    def entry(self, incarnation: str, client: str) -> str:
        return f"{self.prefix}.e.{incarnation}.{client}"

    def entries_of(self, incarnation: str) -> str:
        return f"{self.prefix}.e.{incarnation}.>"

    def parse(self, subject: str) -> tuple[str, str, str | None] | None:
        """("lease", incarnation, None) or ("entry", incarnation, client), or None."""
        if not subject.startswith(self.prefix + "."):
            return None
        tokens = subject[len(self.prefix) + 1:].split(".")
        if len(tokens) == 2 and tokens[0] == "i":
            return "lease", tokens[1], None
        if len(tokens) == 3 and tokens[0] == "e":
            return "entry", tokens[1], tokens[2]
        return None


def is_deletion(headers: Mapping[str, str] | None) -> bool:
    """Does a stored message with these headers delete its subject's entry or lease?"""
    if not headers:
        return False
    return MARKER_REASON in headers or headers.get(KV_OPERATION) in ("DEL", "PURGE")


# -- the table: who is here, as this process has read it -----------------------------


@dataclass(frozen=True)
class Change:
    """A client came (``join``) or went (``leave``) on its entry's subject."""

    kind: str
    entry: Entry

    def frame(self) -> dict[str, Any]:
        e = self.entry
        if self.kind == "leave":
            return {"type": "leave", "subject": e.subject, "user": e.user, "client": e.client}
        frame: dict[str, Any] = {"type": "join", "subject": e.subject, "user": e.user, "client": e.client,
                                 "since": e.since}
        if e.info is not None:
            frame["info"] = e.info
        return frame


class PresenceTable:
    """Every stored lease and entry, applied in the stream's order; what is visible, and what changed.

    A client is visible on a subject while at least one of its stored entries
    belongs to an incarnation whose lease is alive (a process that starts a new
    incarnation writes its entries again under it before it ends the old one,
    so watchers see no leave and join for the move).  Each method returns the
    joins and leaves its change made.
    """

    def __init__(self) -> None:
        self.alive: set[str] = set()
        # incarnation -> client -> entry: everything stored, visible or not.
        self._held: dict[str, dict[str, Entry]] = {}
        # subject -> client -> incarnations holding that client's entry.
        self._subjects: dict[str, dict[str, set[str]]] = {}

    # -- applying stored messages --

    def lease(self, incarnation: str) -> list[Change]:
        if incarnation in self.alive:
            return []
        before = self._visible_clients(incarnation)
        self.alive.add(incarnation)
        held = self._held.get(incarnation, {})
        return [Change("join", held[c]) for c in held if c not in before]

    def end(self, incarnation: str) -> list[Change]:
        """The lease is gone (expired or removed): every entry of the incarnation goes with it."""
        was_alive = incarnation in self.alive
        self.alive.discard(incarnation)
        changes = []
        for client, entry in list(self._held.get(incarnation, {}).items()):
            self._forget(incarnation, entry)
            if was_alive and not self._visible(entry.subject, client):
                changes.append(Change("leave", entry))
        self._held.pop(incarnation, None)
        return changes

    def put(self, incarnation: str, entry: Entry) -> list[Change]:
        held = self._held.setdefault(incarnation, {})
        if entry.client in held:
            return []  # written again (a retry): an entry never changes
        visible_before = self._visible(entry.subject, entry.client)
        held[entry.client] = entry
        self._subjects.setdefault(entry.subject, {}).setdefault(entry.client, set()).add(incarnation)
        if not visible_before and incarnation in self.alive:
            return [Change("join", entry)]
        return []

    def drop(self, incarnation: str, client: str) -> list[Change]:
        entry = self._held.get(incarnation, {}).pop(client, None)
        if entry is None:
            return []
        if not self._held[incarnation]:
            del self._held[incarnation]
        self._forget(incarnation, entry)
        if incarnation in self.alive and not self._visible(entry.subject, client):
            return [Change("leave", entry)]
        return []

    def _forget(self, incarnation: str, entry: Entry) -> None:
        clients = self._subjects.get(entry.subject)
        if clients is None:
            return
        holders = clients.get(entry.client)
        if holders is not None:
            holders.discard(incarnation)
            if not holders:
                del clients[entry.client]
        if not clients:
            del self._subjects[entry.subject]

    # -- reading it --

    def _visible(self, subject: str, client: str) -> bool:
        holders = self._subjects.get(subject, {}).get(client, ())
        return any(i in self.alive for i in holders)

    def _visible_clients(self, incarnation: str) -> set[str]:
        return {c for c, e in self._held.get(incarnation, {}).items() if self._visible(e.subject, c)}

    def visible(self, subject: str) -> dict[str, Entry]:
        """client -> entry, for every client visible on ``subject``."""
        shown: dict[str, Entry] = {}
        for client, holders in self._subjects.get(subject, {}).items():
            for incarnation in holders:
                if incarnation in self.alive:
                    shown[client] = self._held[incarnation][client]
                    break
        return shown

    def answer(self, subject: str, limit: int) -> dict[str, Any]:
        """``presence`` (oldest first, at most ``limit``), ``count`` and ``users``, exact over all."""
        entries = sorted(self.visible(subject).values(), key=lambda e: (e.since, e.client))
        users = {e.user for e in entries if e.user is not None}
        return {"presence": [e.public() for e in entries[:limit]], "count": len(entries), "users": len(users)}

    def orphans(self) -> set[str]:
        """Incarnations with stored entries and no lease seen (dead before we looked, or not yet seen)."""
        return set(self._held) - self.alive

    @property
    def subjects(self) -> Iterable[str]:
        return self._subjects.keys()

    def changes_to(self, other: PresenceTable) -> list[Change]:
        """What a watcher must hear when ``other`` replaces this table (after a fresh read)."""
        changes = []
        for subject in set(self._subjects) | set(other._subjects):
            mine, theirs = self.visible(subject), other.visible(subject)
            changes.extend(Change("leave", e) for c, e in mine.items() if c not in theirs)
            changes.extend(Change("join", e) for c, e in theirs.items() if c not in mine)
        return changes
