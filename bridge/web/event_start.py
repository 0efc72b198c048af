"""Following an event stream's subjects before it begins: all or nothing, and a resume.

Everything goes through ``WSSManager.subscribe``, so the URL's subjects obey
exactly what a socket's subscribe obeys (grammar, limits, policy, the stored
shares, history), and any refusal is raised as ``NotFollowed`` for an HTTP
answer before the stream begins (the handler then releases whatever was
already followed).  Stored subjects are followed first: a message that a
stored and a core pattern both match arrives through the stored one, with
its sequence and the stream's id.

**Resume** (a Last-Event-ID).  Its positions (core/sse.py) say, per stored
subject, the last sequence delivered.  Each such subject is subscribed on its
own with the socket's ``{"after_seq": S, "epoch": E}`` (so its live messages
are held back from the moment it is followed, hub/catchup.py); one whose
history had not begun gets the URL's history form again; the URL's
``last``/``since``/``last_per_subject`` apply to nothing else (they were the
first connection's).  All or nothing, like the socket's resume, over the
whole connection: if any subject cannot be resumed (its stream lost what was
missed, was recreated, no longer stores it, or more than MAX_HISTORY would
be needed), no history is sent at all, ``recovered`` is false (naming the
stream's ``first_seq``), and live messages go on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bridge.core.frames import BadFrame
from bridge.core.sse import EventIdError, parse_event_id, stream_key
from bridge.core.subjects import patterns_overlap

if TYPE_CHECKING:
    from bridge.core.sse import EventsQuery
    from bridge.hub.session import Session
    from handler import WSSManager

logger = logging.getLogger(__name__)

PENDING = "-"


class NotFollowed(Exception):
    """The stream cannot begin as asked: the HTTP status, the refusal's reason and its words."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


@dataclass
class Start:
    """What following the URL's subjects gave: each stored subject's position, and a resume's outcome."""

    # The URL's subjects, in its order: an id's indices refer to this list.
    subjects: list[str]
    # (index in ``subjects``, pattern, stream key, last sequence or "-" while its history has not begun)
    positions: list[tuple[int, str, bytes, str]] = field(default_factory=list)
    # The ``recovered`` event of a resume.
    recovered: dict[str, Any] | None = None


async def follow(manager: WSSManager, session: Session, query: EventsQuery) -> Start:
    """Subscribe ``session`` to the URL's subjects, as asked; ``NotFollowed`` if any is refused."""
    subjects = query.subjects
    for subject in subjects:
        refusal = session.perms.subscribe_refusal(subject)
        if refusal:
            raise NotFollowed(403, "policy", refusal)
    stored = await _stored(manager, subjects)
    order = [s for s in subjects if s in stored] + [s for s in subjects if s not in stored]
    if query.last_event_id is not None:
        return await _resume(manager, session, query, stored, order)
    reply = await _subscribe(manager, session, order, query.history)
    streams = reply.get("streams", {})
    # With history, a subject's position is set by its first history event: until then, pending.
    seqs = {s: PENDING if query.history is not None else str(e["last_seq"]) for s, e in streams.items()}
    return Start(subjects, _positions(subjects, streams, seqs))


def drop_history(manager: WSSManager, session: Session) -> None:
    """Let go of history planned but never to be sent (a refused or ended stream)."""
    for plan in session.plans:
        plan.drop(manager.jetstream)
    session.plans.clear()


async def _stored(manager: WSSManager, subjects: list[str]) -> dict[str, tuple[str, str]]:
    """The stream (name, epoch) of each subject that one stores, as far as is known now.

    One listing of the streams, and none when every subject is followed already."""
    registry = manager.registry
    listed = await registry.streams_storing(subjects, fresh=False)
    found: dict[str, tuple[str, str]] = {}
    for subject in subjects:
        topic = registry.topics.get(subject)
        if topic is not None and topic.feed is not None:
            found[subject] = (topic.feed.stream, topic.epoch)
        elif topic is None and subject in listed:
            found[subject] = (listed[subject].name, listed[subject].epoch)
    return found


async def _subscribe(manager: WSSManager, session: Session, subjects: list[str],
                     history: dict[str, Any] | None) -> dict[str, Any]:
    """The socket's subscribe; its refusal as an HTTP status: 403 policy, 400 the client's, 503 not now."""
    try:
        reply = await manager.subscribe(session, subjects, history=history)
    except BadFrame as exc:
        raise NotFollowed(403 if exc.kind == "policy" else 400, exc.kind, exc.message) from None
    if not reply["success"]:
        # A history larger than MAX_HISTORY is the request's to change; the rest (JetStream or
        # NATS not answering, no consumer to spare) may pass.
        if "(MAX_HISTORY)" in reply["message"]:
            raise NotFollowed(400, "history", reply["message"])
        raise NotFollowed(503, "unavailable", reply["message"])
    return reply


def _positions(subjects: list[str], streams: dict[str, dict[str, Any]],
               seqs: dict[str, str]) -> list[tuple[int, str, bytes, str]]:
    return [(index, s, stream_key(streams[s]["stream"], streams[s]["epoch"]), seqs[s])
            for index, s in enumerate(subjects) if s in streams]


def _asked(query: EventsQuery, stored: dict[str, tuple[str, str]]
           ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The history each stored subject asks on this reconnect, and why it cannot be resumed (if so)."""
    assert query.last_event_id is not None
    try:
        positions = parse_event_id(query.last_event_id, query.subjects)
    except EventIdError as exc:
        return {}, [f"the Last-Event-ID cannot be resumed: {exc}"]
    asked: dict[str, dict[str, Any]] = {}
    lost: list[str] = []
    for position in positions:
        subject = query.subjects[position.index]
        if subject not in stored:
            lost.append(f"{subject} is no longer stored")
        elif position.seq is None:
            if query.history is not None:
                asked[subject] = query.history  # its history had not begun: ask it again
        else:
            name, epoch = stored[subject]
            # The id names one incarnation of one stream: another (recreated, or another stream
            # storing the subject now) gets an epoch it cannot match, so the plan says not recovered.
            same = position.stream == stream_key(name, epoch)
            asked[subject] = {"after_seq": position.seq, "epoch": epoch if same else f"not {epoch}"}
    return asked, lost


async def _resume(manager: WSSManager, session: Session, query: EventsQuery,
                  stored: dict[str, tuple[str, str]], order: list[str]) -> Start:
    asked, lost = _asked(query, stored)
    resumed = {s for s, h in asked.items() if "after_seq" in h}
    streams: dict[str, dict[str, Any]] = {}
    plain: list[str] = []
    for subject in [*order, None]:
        if subject is not None and subject not in asked:
            plain.append(subject)  # followed as they come, in one request, before the next resumed one
            continue
        if plain:
            streams.update((await _subscribe(manager, session, plain, None)).get("streams", {}))
            plain = []
        if subject is not None:
            streams[subject] = await _resume_one(manager, session, subject, asked[subject], resumed, lost)
    recovered = not lost and all(streams[s].get("recovered") for s in resumed)
    if not recovered:
        _forget_history(manager, session)
    seqs = {s: str(e["last_seq"]) for s, e in streams.items()}
    if recovered:
        seqs.update({s: str(asked[s]["after_seq"]) if s in resumed else PENDING for s in asked})
    manager.stats.event_resumes["true" if recovered else "false"] += 1
    return Start(query.subjects, _positions(query.subjects, streams, seqs),
                 _recovered(recovered, {s: streams[s] for s in resumed}, lost))


async def _resume_one(manager: WSSManager, session: Session, subject: str, history: dict[str, Any],
                      resumed: set[str], lost: list[str]) -> dict[str, Any]:
    """One stored subject with its own history; what the subscribe reply says of it."""
    try:
        reply = await _subscribe(manager, session, [subject], history)
    except NotFollowed as exc:
        if exc.reason not in ("history", "unavailable"):
            raise
        # What was missed cannot be read now: follow it live, and say so.
        lost.append(f"{subject}: {exc.message}")
        reply = await _subscribe(manager, session, [subject], None)
        return dict(reply["streams"][subject])
    entry = dict(reply["streams"][subject])
    if subject in resumed and session.plans and session.plans[-1].pattern == subject:
        # Overlapping resumed patterns: a message an older one matches is its to resend.
        older = [p for p in session.subscriptions if p != subject and patterns_overlap(p, subject)]
        session.plans[-1].exclusive = bool(older) and all(p in resumed for p in older)
    return entry


def _forget_history(manager: WSSManager, session: Session) -> None:
    """All or nothing: no history after all; what was held back meanwhile follows, then live."""
    plans, session.plans = session.plans, []
    for plan in plans:
        plan.drop(manager.jetstream)
        topic = manager.registry.topics.get(plan.pattern)
        if topic is not None:
            topic.resume(session.outbox, 0)


def _recovered(recovered: bool, streams: dict[str, dict[str, Any]], lost: list[str]) -> dict[str, Any]:
    """The ``recovered`` event: the outcome, in words, and each resumed subject's stream."""
    if recovered:
        missed = sum(e.get("history", 0) for e in streams.values())
        message = f"Resumed: {missed} missed messages follow, then live ones"
    else:
        reasons = [*lost, *(f"{s} cannot be resumed from where it was (stream {e['stream']} now begins "
                            f"at {e.get('first_seq', '?')})" for s, e in streams.items()
                            if not e.get("recovered"))]
        message = f"Not resumed: {'; '.join(reasons)}; no history was sent, live messages follow"
        streams = {s: {**e, "history": 0} for s, e in streams.items()}
    frame: dict[str, Any] = {"type": "recovered", "recovered": recovered, "message": message}
    if streams:
        frame["streams"] = streams
    gaps = [e for e in streams.values() if e.get("recovered") is False and "first_seq" in e]
    if len(gaps) == 1:
        frame["first_seq"] = gaps[0]["first_seq"]
    return frame
