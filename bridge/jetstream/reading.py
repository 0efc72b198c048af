"""Reading history from a stream: how much a request covers (the plan), then the messages.

What a client may ask for is core/history.py.  Planning happens before the
reply: the stream is asked (through an ephemeral reader consumer) how many
messages the request covers, so the reply can say it, and a resume can say
whether it recovers everything.  A resume recovers
only all or nothing: when the stream no longer holds S+1, the epoch differs,
or more than ``MAX_HISTORY`` messages would be needed, it answers
``recovered: false`` with the stream's ``first_seq`` and sends no history.

What planning costs, in JetStream API calls (each one counted by
api.JetStream): ``{"last": 1}`` none when the live feed holds the
latest message, else one message get; a resume with nothing missed, none;
``since``, ``last_per_subject`` and a resume, one reader; ``{"last": N}``
a few readers, found by interpolating the pattern's density rather than
bisecting the whole stream (reading up to N messages more than asked, and
skipping them, instead of asking again).  Each reader is deleted once read.

hub/catchup.py then sends the planned messages (oldest first, up to the last
one the reader counted) through the client's outbox, at the pace the client
drains it, and the live messages held back meanwhile follow, those already
sent as history skipped by sequence.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bridge.core.history import HistoryError
from bridge.jetstream.api import FETCH_BATCH, JetStreamError, start_after, start_at_time

if TYPE_CHECKING:
    from bridge.core.history import HistorySpec
    from bridge.jetstream.api import JetStream, Stored, StreamInfo
    from bridge.jetstream.feed import LiveFeed

logger = logging.getLogger(__name__)

# Readers a "last N" plan may try before it settles for the best it has found.
MAX_PROBES = 40


@dataclass
class Plan:
    """What one subject's history request will send."""

    pattern: str
    stream: StreamInfo
    # Messages already in hand (a "last 1"), sent before anything read.
    ready: list[Stored] = field(default_factory=list)
    # The reader consumer to fetch from, and how many of its messages to send,
    # after skipping ``skip`` (a "last N" reader may start a few early).
    consumer: str | None = None
    count: int = 0
    skip: int = 0
    recovered: bool | None = None
    sent: int = field(default=0)
    # A resume of several overlapping patterns at once (an /events reconnect): leave out what an
    # older pattern of the session delivers, whose own resume sends it, so nothing comes twice.
    exclusive: bool = False

    def describe(self) -> dict[str, Any]:
        """This subject's part of the subscribe reply."""
        out: dict[str, Any] = {"stream": self.stream.name, "epoch": self.stream.epoch, "history": self.count}
        if self.recovered is not None:
            out["recovered"] = self.recovered
            if not self.recovered:
                out["first_seq"] = self.stream.first_seq
        return out

    def drop(self, js: JetStream) -> None:
        """Let the reader go without reading it (the subscribe failed after planning)."""
        if self.consumer is not None:
            js.drop_reader(self.stream.name, self.consumer)
            self.consumer = None


async def plan(js: JetStream, feed: LiveFeed, stream: StreamInfo, spec: HistorySpec,
               max_history: int) -> Plan:
    """Ask the stream how much ``spec`` covers; JetStreamError or HistoryError if it cannot be served.

    ``stream`` is as listed for this request (no call of its own); ``feed`` is the
    pattern's live feed, which knows the pattern's latest sequence.
    """
    pattern = feed.pattern
    result = Plan(pattern, stream)
    if spec.mode == "after_seq":
        gone = spec.epoch is not None and spec.epoch != stream.epoch
        if gone or spec.after_seq > stream.last_seq or stream.first_seq > spec.after_seq + 1:
            result.recovered = False
            return result
        result.recovered = True
        if spec.after_seq >= feed.last_seq:
            return result  # nothing of this pattern was stored since: nothing to read
        consumer, pending = await js.reader(stream, pattern, start_after(spec.after_seq))
        if pending > max_history:
            js.drop_reader(stream.name, consumer)
            result.recovered = False
            return result
        result.consumer, result.count = consumer, pending
        return result
    if spec.mode == "last":
        if spec.last == 1:
            latest = await feed.latest()
            if latest is not None:
                result.ready, result.count = [latest], 1
            return result
        return await _plan_last(js, result, spec.last, feed.last_seq)
    start = ({"deliver_policy": "last_per_subject"} if spec.mode == "last_per_subject"
             else start_at_time(spec.since))  # type: ignore[arg-type]
    consumer, pending = await js.reader(stream, pattern, start)
    if pending > max_history:
        js.drop_reader(stream.name, consumer)
        what = ("subjects" if spec.mode == "last_per_subject"
                else f"messages since {spec.since:%Y-%m-%dT%H:%M:%SZ}")
        raise HistoryError(f"{pattern!r} has {pending} stored {what}; at most {max_history} can be sent "
                           "(MAX_HISTORY): ask for less")
    result.consumer, result.count = consumer, pending
    return result


async def _plan_last(js: JetStream, result: Plan, n: int, latest_seq: int) -> Plan:
    """The N most recent messages without reading the stream from its start.

    A reader from sequence S says how many of the pattern's messages lie at or
    after S.  We look for an S with between N and 2N of them: guessed first
    as if every message in the stream matched, then from the density the
    readers so far have seen, with bisection as the fallback that bounds the
    number of readers.  The extra messages (up to N) are read and skipped.
    """
    stream, pattern = result.stream, result.pattern
    floor = max(1, stream.first_seq)
    top = min(latest_seq or stream.last_seq, stream.last_seq)
    if top < floor:
        return result
    readers: dict[str, int] = {}  # every probe made, by name: its start

    async def pending_from(seq: int) -> tuple[str, int]:
        name, pending = await js.reader(stream, pattern, start_after(seq - 1))
        readers[name] = seq
        return name, pending

    # (start, pending, reader) known to hold at least n, and a start known to hold fewer.
    enough: tuple[int, int, str] | None = None
    short_start, short_pending = top + 1, 0
    guess = max(floor, top - n + 1)
    for probe in range(MAX_PROBES):
        name, pending = await pending_from(guess)
        if pending >= n:
            enough = (guess, pending, name)
            if pending <= 2 * n or short_start - guess <= 1:
                break
        else:
            short_start, short_pending = guess, pending
            if guess == floor:
                enough = (guess, pending, name)  # the whole stream holds fewer than n
                break
        if enough is None:
            # Further back: as far as the density seen in [guess, top] says n needs, with room to spare.
            span = top - guess + 1
            back = math.ceil((n - pending) * span / pending * 1.25) if pending else 2 * span
            guess = max(floor, guess - max(back, 1))
        else:
            start, held, _ = enough
            if probe % 2:  # every other probe bisects, so the bracket always halves
                guess = (start + short_start) // 2
            else:
                # Where the count falls to about 1.5 n, interpolating between the two ends.
                fraction = (held - 1.5 * n) / max(1, held - short_pending)
                guess = start + max(1, int((short_start - start) * fraction))
            guess = min(max(guess, start + 1), short_start - 1)
            if guess <= start:
                break
    if enough is None:  # out of probes before reaching back far enough: from the start, then
        name, pending = await pending_from(floor)
        enough = (floor, pending, name)
    _, best_pending, best = enough
    for name in readers:
        if name != best:
            js.drop_reader(stream.name, name)
    result.consumer, result.count = best, min(n, best_pending)
    result.skip = best_pending - result.count
    return result


async def read(js: JetStream, p: Plan) -> AsyncIterator[list[Stored]]:
    """The planned messages, oldest first, in batches (each bounded in bytes by jetstream.fetch)."""
    if p.ready:
        yield p.ready
    if p.consumer is None:
        return
    wanted = p.skip + p.count
    got = 0
    try:
        while got < wanted:
            batch = await js.fetch(p.stream.name, p.consumer, min(FETCH_BATCH, wanted - got))
            if not batch:
                # Removed meanwhile (max_age, a purge), or the reader itself was lost.
                raise JetStreamError(f"the stream had only {max(0, got - p.skip)} of the {p.count} "
                                     "messages planned")
            out = []
            for stored in batch:
                got += 1
                if got > p.skip:
                    out.append(stored)
            yield out
    finally:
        p.drop(js)
