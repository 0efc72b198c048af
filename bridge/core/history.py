"""What a subscribe may ask of the past: the ``history`` member, parsed and checked.

- ``{"last": N}``: the N most recent stored messages matching the subject;
- ``{"since": "<RFC 3339 time>"}``: every stored message from that time;
- ``{"last_per_subject": true}``: the latest message of each matching subject;
- ``{"after_seq": S, "epoch": E}``: resume after sequence S of the stream
  incarnation E (``epoch`` may be left out to skip that check).

Pure: every bad value is a ``HistoryError`` whose message is the reply
(never a traceback, never a closed socket).  Reading the stream is
jetstream/reading.py; sending it, then live, hub/catchup.py.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

MODES = ("last", "since", "last_per_subject", "after_seq")


class HistoryError(ValueError):
    """A history request we refuse as a whole; the message is the reply."""


@dataclass(frozen=True)
class HistorySpec:
    mode: str
    last: int = 0
    since: dt.datetime | None = None
    after_seq: int = 0
    epoch: str | None = None


def parse_history(value: Any, max_history: int) -> HistorySpec:
    """The ``history`` member of a subscribe; HistoryError saying what is wrong."""
    if not isinstance(value, dict):
        raise HistoryError('history must be an object, e.g. {"last": 10}')
    modes = [m for m in MODES if m in value]
    allowed = {*modes, "epoch"} if modes == ["after_seq"] else set(modes)
    if len(modes) != 1 or set(value) - allowed:
        raise HistoryError(f"history must have exactly one of {', '.join(MODES)} "
                           "(and epoch only with after_seq)")
    mode = modes[0]
    arg = value[mode]
    if mode == "last":
        if not _whole(arg) or not 1 <= arg <= max_history:
            raise HistoryError(f"history.last must be a whole number from 1 to {max_history} (MAX_HISTORY)")
        return HistorySpec(mode, last=arg)
    if mode == "since":
        return HistorySpec(mode, since=_rfc3339(arg))
    if mode == "last_per_subject":
        if arg is not True:
            raise HistoryError("history.last_per_subject must be true")
        return HistorySpec(mode)
    epoch = value.get("epoch")
    # JetStream sequences are unsigned 64-bit: a larger one could only be refused by the server.
    if not _whole(arg) or not 0 <= arg < 2**64:
        raise HistoryError("history.after_seq must be a whole number >= 0 (a stream sequence)")
    if epoch is not None and not isinstance(epoch, str):
        raise HistoryError("history.epoch must be the string the subscribe reply gave")
    return HistorySpec(mode, after_seq=arg, epoch=epoch)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rfc3339(value: Any) -> dt.datetime:
    if isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value)
            if when.tzinfo is not None:
                # OverflowError: a time at the edge of the calendar (0001-01-01T00:00+14:00)
                # that has no UTC equivalent; a bad value like any other.
                return when.astimezone(dt.UTC)
        except (ValueError, OverflowError):
            pass
    raise HistoryError('history.since must be an RFC 3339 time with a zone, e.g. "2026-01-31T12:00:00Z"')
