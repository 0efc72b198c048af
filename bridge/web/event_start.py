"""Following an event stream's subjects before it begins: all or nothing, and a resume.

Everything goes through ``WSSManager.subscribe``, so the URL's subjects obey
exactly what a socket's subscribe obeys (grammar, limits, policy, the stored
shares, history), and any refusal is raised as ``Refused`` (core/refusal.py) for an HTTP
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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from bridge.core.frames import BadFrame
from bridge.core.refusal import Refused
from bridge.core.sse import PENDING, EventIdError, id_head, parse_event_id, stream_key
from bridge.core.subjects import patterns_overlap

if TYPE_CHECKING:
    from bridge.core.sse import EventsQuery
    from bridge.hub.event_outbox import EventOutbox
    from bridge.hub.session import Session
    from handler import WSSManager

logger = logging.getLogger(__name__)


@dataclass
class Start:
    """What following the URL's subjects gave: a resume's ``recovered`` event (None: not a resume)."""

    recovered: dict[str, Any] | None = None


# What is known of a stored subject before it is followed: its stream, the stream's epoch, and a
# sequence at or before where it will stand once followed (a resume from there may send a little
# more than the stream missed, stored before it began, never less).
Known = tuple[str, str, int]


async def follow(manager: WSSManager, session: Session, query: EventsQuery) -> Start:
    """Subscribe ``session`` to the URL's subjects, as asked; ``Refused`` if any is refused.

    The stream's ids are set up first (``EventOutbox.track``): a stored message that arrives while
    the other subjects are being followed already has its id.
    """
    subjects = query.subjects
    # (The subscribe checks them too: refused here first, nothing is listed or followed.)
    for subject in subjects:
        refusal = session.perms.subscribe_refusal(subject)
        if refusal:
            raise Refused(403, "policy", refusal)
    stored = await _stored(manager, subjects)
    order = [s for s in subjects if s in stored] + [s for s in subjects if s not in stored]
    if query.last_event_id is not None:
        return await _resume(manager, session, query, stored, order)
    # With history, a subject's position is set by its first history event: until then, pending.
    _track(session, subjects, stored, {s: PENDING if query.history is not None else str(known[2])
                                       for s, known in stored.items()})
    await _subscribe(manager, session, order, query.history)
    return Start()


def _track(session: Session, subjects: list[str], stored: dict[str, Known], seqs: dict[str, str]) -> None:
    """The stream's ids: each stored subject's index in the URL, its stream's key, where it stands."""
    positions = [(index, s) for index, s in enumerate(subjects) if s in stored]
    head = id_head(subjects, [(index, stream_key(*stored[s][:2])) for index, s in positions])
    outbox = cast("EventOutbox", session.outbox)
    outbox.track(head, {s: slot for slot, (_, s) in enumerate(positions)}, [seqs[s] for _, s in positions])


def drop_history(manager: WSSManager, session: Session) -> None:
    """Let go of history planned but never to be sent (a refused or ended stream)."""
    for plan in session.plans:
        plan.drop(manager.jetstream)
    session.plans.clear()


async def _stored(manager: WSSManager, subjects: list[str]) -> dict[str, Known]:
    """What is known of each subject a stream stores, as far as is known now.

    One listing of the streams, and none when every subject is followed already."""
    registry = manager.registry
    listed = await registry.streams_storing(subjects, fresh=False)
    found: dict[str, Known] = {}
    for subject in subjects:
        topic = registry.topics.get(subject)
        if topic is not None and topic.feed is not None:
            found[subject] = (topic.feed.stream, topic.epoch, topic.feed.last_seq)
        elif topic is None and subject in listed:
            info = listed[subject]
            found[subject] = (info.name, info.epoch, info.last_seq)
    return found


async def _subscribe(manager: WSSManager, session: Session, subjects: list[str],
                     history: dict[str, Any] | None) -> dict[str, Any]:
    """The socket's subscribe; its refusal as an HTTP status: 403 policy, 400 the client's, 503 not now."""
    try:
        reply = await manager.subscribe(session, subjects, history=history)
    except BadFrame as exc:
        raise Refused(403 if exc.kind == "policy" else 400, exc.kind, exc.message) from None
    if not reply["success"]:
        # A history larger than MAX_HISTORY is the request's to change; the rest (JetStream or
        # NATS not answering, no consumer to spare) may pass.
        if "(MAX_HISTORY)" in reply["message"]:
            raise Refused(400, "history", reply["message"])
        raise Refused(503, "unavailable", reply["message"])
    return reply


def _asked(query: EventsQuery, stored: dict[str, Known]) -> tuple[dict[str, dict[str, Any]], list[str]]:
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
            name, epoch, _ = stored[subject]
            # The id names one incarnation of one stream: another (recreated, or another stream
            # storing the subject now) gets an epoch it cannot match, so the plan says not recovered.
            same = position.stream == stream_key(name, epoch)
            asked[subject] = {"after_seq": position.seq, "epoch": epoch if same else f"not {epoch}"}
    return asked, lost


async def _resume(manager: WSSManager, session: Session, query: EventsQuery,
                  stored: dict[str, Known], order: list[str]) -> Start:
    asked, lost = _asked(query, stored)
    resumed = {s: h["after_seq"] for s, h in asked.items() if "after_seq" in h}
    _track(session, query.subjects, stored, {s: str(resumed[s]) if s in resumed else PENDING if s in asked
                                             else str(known[2]) for s, known in stored.items()})
    streams: dict[str, dict[str, Any]] = {}
    plain: list[str] = []
    for subject in [*order, None]:
        if subject is not None and subject not in asked:
            plain.append(subject)  # followed as they come, in one request, before the next resumed one
            continue
        if plain:
            await _subscribe(manager, session, plain, None)
            plain = []
        if subject is not None:
            streams[subject] = await _resume_one(manager, session, subject, asked[subject], set(resumed),
                                                 lost)
    recovered = not lost and all(streams[s].get("recovered") for s in resumed)
    if not recovered:
        _forget_history(manager, session, list(asked))
    manager.stats.event_resumes["true" if recovered else "false"] += 1
    return Start(_recovered(recovered, {s: streams[s] for s in resumed}, lost))


async def _resume_one(manager: WSSManager, session: Session, subject: str, history: dict[str, Any],
                      resumed: set[str], lost: list[str]) -> dict[str, Any]:
    """One stored subject with its own history; what the subscribe reply says of it."""
    try:
        reply = await _subscribe(manager, session, [subject], history)
    except Refused as exc:
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


def _forget_history(manager: WSSManager, session: Session, asked: list[str]) -> None:
    """All or nothing: no history after all; what was held back meanwhile follows, then live.

    Each subject that asked for history then stands right before what was held back for it (or
    where its feed is, if nothing was): a later reconnect resumes from there, not from the gap
    this one could not close."""
    plans = {plan.pattern: plan for plan in session.plans}
    session.plans = []
    outbox = cast("EventOutbox", session.outbox)
    for pattern in asked:
        plan = plans.get(pattern)
        if plan is not None:
            plan.drop(manager.jetstream)
        topic = manager.registry.topics.get(pattern)
        if topic is None or topic.feed is None:
            continue
        backlog = topic.paused.get(outbox)
        held = backlog.messages if backlog is not None else []
        outbox.reposition(pattern, held[0][0] - 1 if held else topic.feed.last_seq)
        topic.resume(outbox, 0)


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
