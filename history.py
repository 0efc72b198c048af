"""History on subscribe: what a client may ask for, how much of it there is, and reading it.

A subscribe may carry ``"history"``, one of:

- ``{"last": N}``: the N most recent stored messages matching the subject;
- ``{"since": "<RFC 3339 time>"}``: every stored message from that time;
- ``{"last_per_subject": true}``: the latest message of each matching subject;
- ``{"after_seq": S, "epoch": E}``: resume after sequence S of the stream
  incarnation E (``epoch`` may be left out to skip that check).

Planning happens before the reply: the stream is asked (through an ephemeral
reader consumer) how many messages the request covers, so the reply can say
it, and a resume can say whether it recovers everything.  A resume recovers
only all or nothing: when the stream no longer holds S+1, the epoch differs,
or more than ``MAX_HISTORY`` messages would be needed, it answers
``recovered: false`` with the stream's ``first_seq`` and sends no history.

The handler then streams the planned messages (oldest first, up to the last
one the reader counted) into the client's queue, and the live messages it
held back meanwhile follow, those already sent as history skipped by sequence.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg

from jetstream import FETCH_BATCH, JetStream, StreamInfo, start_after, start_at_time, stream_sequence

logger = logging.getLogger(__name__)

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
    if not _whole(arg) or arg < 0:
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
        except ValueError:
            when = None
        if when is not None and when.tzinfo is not None:
            return when.astimezone(dt.UTC)
    raise HistoryError('history.since must be an RFC 3339 time with a zone, e.g. "2026-01-31T12:00:00Z"')


@dataclass
class Plan:
    """What one subject's history request will send."""

    pattern: str
    stream: StreamInfo
    # The reader consumer to fetch from, and how many of its messages to send,
    # after skipping ``skip`` (a "last N" reader may start a few early).
    consumer: str | None = None
    count: int = 0
    skip: int = 0
    recovered: bool | None = None
    sent: int = field(default=0)

    def describe(self) -> dict[str, Any]:
        """This subject's part of the subscribe reply."""
        out: dict[str, Any] = {"stream": self.stream.name, "epoch": self.stream.epoch, "history": self.count}
        if self.recovered is not None:
            out["recovered"] = self.recovered
            if not self.recovered:
                out["first_seq"] = self.stream.first_seq
        return out


async def plan(js: JetStream, pattern: str, stream_name: str, spec: HistorySpec, max_history: int) -> Plan:
    """Ask the stream how much ``spec`` covers; JetStreamError or HistoryError if it cannot be served."""
    stream = await js.stream_info(stream_name)
    result = Plan(pattern, stream)
    if spec.mode == "after_seq":
        gone = spec.epoch is not None and spec.epoch != stream.epoch
        if gone or spec.after_seq > stream.last_seq or stream.first_seq > spec.after_seq + 1:
            result.recovered = False
            return result
        consumer, pending = await js.reader(stream.name, pattern, start_after(spec.after_seq))
        if pending > max_history:
            js.in_background(js.delete_consumer(stream.name, consumer))
            result.recovered = False
            return result
        result.consumer, result.count, result.recovered = consumer, pending, True
        return result
    if spec.mode == "last":
        return await _plan_last(js, result, spec.last)
    start = ({"deliver_policy": "last_per_subject"} if spec.mode == "last_per_subject"
             else start_at_time(spec.since))  # type: ignore[arg-type]
    consumer, pending = await js.reader(stream.name, pattern, start)
    if pending > max_history:
        js.in_background(js.delete_consumer(stream.name, consumer))
        what = ("subjects" if spec.mode == "last_per_subject"
                else f"messages since {spec.since:%Y-%m-%dT%H:%M:%SZ}")
        raise HistoryError(f"{pattern!r} has {pending} stored {what}; at most {max_history} can be sent "
                           "(MAX_HISTORY): ask for less")
    result.consumer, result.count = consumer, pending
    return result


async def _plan_last(js: JetStream, result: Plan, n: int) -> Plan:
    """The N most recent messages without reading the stream: binary search for the latest start
    sequence whose reader still has N pending (each probe is one consumer creation, ~20 for 10^6)."""
    stream, pattern = result.stream, result.pattern
    probes: list[str] = []

    async def pending_from(seq: int) -> tuple[str, int]:
        name, pending = await js.reader(stream.name, pattern, start_after(seq - 1))
        probes.append(name)
        return name, pending

    lo = max(1, stream.first_seq)
    best, best_pending = await pending_from(lo)
    hi = stream.last_seq + 1
    while best_pending > n and hi - lo > 1:
        mid = (lo + hi) // 2
        name, pending = await pending_from(mid)
        if pending >= n:
            lo, best, best_pending = mid, name, pending
        else:
            hi = mid
    for name in probes:
        if name != best:
            js.in_background(js.delete_consumer(stream.name, name))
    result.consumer, result.count = best, min(n, best_pending)
    result.skip = best_pending - result.count
    return result


async def read(js: JetStream, p: Plan) -> AsyncIterator[list[tuple[Msg, int]]]:
    """The planned messages with their stream sequences, oldest first, in batches."""
    if p.consumer is None:
        return
    wanted = p.skip + p.count
    got = 0
    try:
        while got < wanted:
            batch = await js.fetch(p.stream.name, p.consumer, min(FETCH_BATCH, wanted - got))
            if not batch:
                logger.warning("history of %s ended after %d of %d messages", p.pattern, got, wanted)
                return
            out = []
            for msg in batch:
                got += 1
                seqs = stream_sequence(msg.reply or "")
                if got > p.skip and seqs is not None:
                    out.append((msg, seqs[0]))
            yield out
    finally:
        js.in_background(js.delete_consumer(p.stream.name, p.consumer))
