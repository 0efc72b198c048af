"""Server-Sent Events: the wire format of ``GET /events``, its event ids, and what its URL may ask.

Pure, no I/O.  An event's ``data`` is exactly the JSON of the frame the
WebSocket would carry; a NATS message is an event without an ``event:`` line
(so ``EventSource.onmessage`` gets it), every other frame is named by its
``type`` (``event: welcome``, ``event: status``, ...).

**Event ids.**  Every event of a stored subject carries an ``id:`` from which
the bridge resumes *every* stored subject of the connection (EventSource sends
the last one back as ``Last-Event-ID`` when it reconnects).  It must survive
a bridge restart, so it holds the positions themselves, not a key to state
kept on the server::

    <head>.<seq>.<seq>...

``head`` is base64url (no padding) of: a version byte, 4 bytes of a hash of
the URL's subject list (so an id is never applied to another list), and for
each stored subject its index in that list and 6 bytes of a hash of its
stream's name and epoch (so a recreated stream is noticed).  Then one field
per stored subject: the stream sequence of the last message it delivered (a
resume sends everything after it), or ``-`` while its history has not begun
(a resume asks the URL's history for it again).  The id is opaque to clients
but not secret: it holds nothing the events do not (sequences), and no
subject names, so it can widen nothing: what a connection follows is the
URL's subjects, checked as on the socket.  Its size is bounded by the
subjects a URL may name (``MAX_SUBJECTS_PER_REQUEST``, at most
``MAX_SUBSCRIPTIONS``): 7 bytes of head (under 10 characters) and at most 21
characters of sequence per stored subject, so under 3.2 KB for 100, well within
the 8 KB a request header may have.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.core.frames import BadFrame, requested_subjects

# A comment line: EventSource ignores it; proxies see bytes and keep the stream open.
PING = b": \n\n"
ID_VERSION = 1
PENDING = "-"
# Longest Last-Event-ID looked at: the bound above, with room to spare.
MAX_EVENT_ID = 8192
# URL members that ask for history, as the socket's ``history`` forms.
HISTORY_PARAMS = ("last", "since", "last_per_subject")


def data_lines(body: bytes) -> bytes:
    """``body`` as ``data:`` lines.  JSON holds a line break only as whitespace between tokens
    (a payload spliced in verbatim may have some); each line gets its own ``data:`` field and
    EventSource joins them with ``\\n``, so the event's data is the same JSON."""
    if b"\n" not in body and b"\r" not in body:
        return b"data: " + body + b"\n"
    lines = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return b"".join([b"data: " + line + b"\n" for line in lines])


def event(kind: str | None, body: bytes, event_id: bytes | None = None, retry_ms: int | None = None) -> bytes:
    """One event: its ``retry:``, ``id:`` and ``event:`` lines when given, the data, a blank line.

    ``kind`` None: a NATS message, which EventSource hands to ``onmessage``."""
    head = b""
    if retry_ms is not None:
        head += b"retry: %d\n" % retry_ms
    if event_id is not None:
        head += b"id: " + event_id + b"\n"
    if kind is not None:
        head += b"event: " + kind.encode("ascii") + b"\n"
    return head + data_lines(body) + b"\n"


def message_event(payload: bytes) -> bytes:
    """A NATS message's frame (core/frames.encode_nats_message) as an event, built once per message."""
    return data_lines(payload) + b"\n"


# ---------------------------------------------------------------------------
# Event ids
# ---------------------------------------------------------------------------


class EventIdError(ValueError):
    """A Last-Event-ID this URL's stream cannot have given; the message says why."""


def _hash(text: str, size: int) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=size).digest()


def stream_key(stream: str, epoch: str) -> bytes:
    """6 bytes naming one incarnation of a stream (its name and creation time)."""
    return _hash(f"{stream}\n{epoch}", 6)


def subjects_key(subjects: Sequence[str]) -> bytes:
    return _hash("\n".join(subjects), 4)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@dataclass(frozen=True)
class Position:
    """Where one stored subject of the URL stands: its stream, and its last sequence (None: pending)."""

    index: int
    stream: bytes
    seq: int | None


def id_head(subjects: Sequence[str], stored: Sequence[tuple[int, bytes]]) -> bytes:
    """The fixed part of a connection's ids: its subject list and each stored subject's stream."""
    raw = bytes((ID_VERSION,)) + subjects_key(subjects)
    raw += b"".join(_varint(index) + key for index, key in stored)
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def parse_event_id(text: str, subjects: Sequence[str]) -> list[Position]:
    """The positions a Last-Event-ID holds, for the URL's ``subjects``; EventIdError if it is not one."""
    if len(text) > MAX_EVENT_ID or not text.isascii():
        raise EventIdError("it is not an id this bridge gives")
    head, _, rest = text.partition(".")
    try:
        raw = base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))
    except (binascii.Error, ValueError):
        raise EventIdError("it is not an id this bridge gives") from None
    if len(raw) < 5 or raw[0] != ID_VERSION:
        raise EventIdError("it is not an id this bridge gives")
    if raw[1:5] != subjects_key(subjects):
        raise EventIdError("it was given for another list of subjects")
    entries: list[tuple[int, bytes]] = []
    pos = 5
    while pos < len(raw):
        index, shift = 0, 0
        while True:
            if pos >= len(raw) or shift > 14:
                raise EventIdError("it is not an id this bridge gives")
            byte = raw[pos]
            pos += 1
            index |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if index >= len(subjects) or pos + 6 > len(raw) or any(i == index for i, _ in entries):
            raise EventIdError("it is not an id this bridge gives")
        entries.append((index, raw[pos:pos + 6]))
        pos += 6
    seqs = rest.split(".") if rest else []
    if len(seqs) != len(entries):
        raise EventIdError("it is not an id this bridge gives")
    positions = []
    for (index, key), seq in zip(entries, seqs, strict=True):
        if seq == PENDING:
            positions.append(Position(index, key, None))
        elif seq.isdigit() and len(seq) <= 20 and int(seq) < 2**64:
            positions.append(Position(index, key, int(seq)))
        else:
            raise EventIdError("it is not an id this bridge gives")
    return positions


# ---------------------------------------------------------------------------
# What the URL asks
# ---------------------------------------------------------------------------


class QueryError(ValueError):
    """A URL /events refuses; ``kind`` labels the refusal (the same kinds as a refused subscribe)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class EventsQuery:
    subjects: list[str]
    # The socket's ``history`` member the URL asks for (checked by the subscribe), or None.
    history: dict[str, Any] | None
    last_event_id: str | None


def parse_query(subjects: Sequence[str], params: Mapping[str, str], last_event_id: str | None,
                max_subjects: int, max_length: int) -> EventsQuery:
    """``subject`` (repeatable), one history form, and a Last-Event-ID (header, else ``?last_event_id=``).

    The subjects obey the socket's grammar and limits (frames.requested_subjects)."""
    if not subjects:
        raise QueryError("subjects", "subject required: /events?subject=a.b&subject=orders.*")
    try:
        wanted = requested_subjects({"subjects": list(subjects)}, max_subjects, max_length)
    except BadFrame as exc:
        raise QueryError(exc.kind, exc.message) from None
    asked = [p for p in HISTORY_PARAMS if p in params]
    if len(asked) > 1:
        raise QueryError("history", f"at most one of {', '.join(HISTORY_PARAMS)}")
    history: dict[str, Any] | None = None
    if asked:
        name, value = asked[0], params[asked[0]]
        if name == "last":
            if not value.isascii() or not value.isdigit() or len(value) > 9:
                raise QueryError("history", "last must be a whole number, e.g. last=10")
            history = {"last": int(value)}
        elif name == "since":
            history = {"since": value}
        elif value != "true":
            raise QueryError("history", "last_per_subject must be true")
        else:
            history = {"last_per_subject": True}
    event_id = last_event_id if last_event_id else params.get("last_event_id") or None
    return EventsQuery(wanted, history, event_id)
