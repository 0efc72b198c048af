"""The hot path, unit by unit: a NATS message's frame, a topic's delivery, the control budget,
and a connection's outbox over a real socket (aiohttp's own protocol and writer on it).

Fast (no NATS server, no bridge): the end-to-end tests show the same from outside.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_writer import StreamWriter
from conftest import TIMEOUT
from nats.aio.msg import Msg

from bridge.config import OVERFLOW_DISCONNECT, OVERFLOW_DROP_OLDEST, Limits
from bridge.core.budget import ControlBudget
from bridge.core.delivery import Rule
from bridge.core.frames import encode_nats_message, text_frame
from bridge.core.stats import Stats
from bridge.hub.outbox import Flusher, Outbox
from bridge.hub.topic import Topic
from bridge.jetstream.api import rfc3339


def msg(subject: str, data: bytes, headers: dict[str, str] | None = None, reply: str = "") -> Msg:
    return Msg(None, subject=subject, data=data, headers=headers, reply=reply)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# A NATS message's frame, built once
# ---------------------------------------------------------------------------


def test_json_payload_is_spliced_in_verbatim_with_its_digits_and_key_order():
    frame = encode_nats_message(msg("a", b'{"z": 12345678901234567890, "a": 1.0}'))
    assert frame == b'{"subject":"a","data":{"z": 12345678901234567890, "a": 1.0}}'


def test_text_and_binary_payloads_are_marked():
    assert json.loads(encode_nats_message(msg("a", b"hello"))) == {"subject": "a", "data": "hello",
                                                                   "encoding": "text"}
    raw = bytes(range(250, 256))
    frame = json.loads(encode_nats_message(msg("a", raw)))
    assert (base64.b64decode(frame["data"]), frame["encoding"]) == (raw, "base64")


def test_nan_is_not_json_and_travels_as_text():
    assert json.loads(encode_nats_message(msg("a", b"NaN")))["encoding"] == "text"


def test_a_stored_message_carries_seq_and_time_and_never_its_jetstream_reply():
    frame = json.loads(encode_nats_message(msg("a", b"1", reply="$JS.ACK.x"), 7, "2026-01-01T00:00:00.1Z",
                                           history=True))
    assert frame == {"subject": "a", "data": 1, "seq": 7, "time": "2026-01-01T00:00:00.1Z", "history": True}


def test_a_core_message_carries_its_reply_and_headers():
    frame = json.loads(encode_nats_message(msg("a", b"1", {"X": "y"}, reply="_INBOX.1")))
    assert (frame["reply"], frame["headers"]) == ("_INBOX.1", {"X": "y"})


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_text_frame_length_header_is_the_rfc_6455_one(size):
    frame = text_frame(b"x" * size)
    assert frame[0] == 0x81
    if size < 126:
        assert (frame[1], len(frame)) == (size, size + 2)
    elif size < 65536:
        assert (frame[1], struct.unpack("!H", frame[2:4])[0]) == (126, size)
    else:
        assert (frame[1], struct.unpack("!Q", frame[2:10])[0]) == (127, size)


# ---------------------------------------------------------------------------
# Which pattern delivers, and a topic's fan-out
# ---------------------------------------------------------------------------


def test_an_older_overlapping_pattern_delivers_instead():
    rule = Rule(older=(("a.*", ()),))
    assert (rule.delivers("a.b"), rule.delivers("a.b.c")) == (False, True)


def test_an_older_pattern_that_filters_the_subject_leaves_it_to_this_one():
    assert Rule(older=(("a.*", ("a.secret",)),)).delivers("a.secret")


def test_a_tokens_filter_denies_the_subject():
    assert not Rule(filters=("a.secret",)).delivers("a.secret")


@dataclass(eq=False)
class Sink:
    """What a topic delivers to: a recording outbox (the real one is tested below)."""

    frames: list[bytes] = field(default_factory=list)
    closing: bool = False
    closed_with: int | None = None
    sse: bool = False  # a WebSocket's outbox (the topic keeps event streams apart)

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)

    def send_message(self, frame: bytes, pattern: str, seq: int | None) -> None:
        self.frames.append(frame)

    def close_soon(self, code: int, reason: str) -> None:
        self.closing, self.closed_with = True, code


def topic(pattern: str = "a.>", permits: Any = lambda s: True, backlog: int = 3) -> tuple[Topic, Stats]:
    stats = Stats()
    return Topic(pattern, filtered=True, permits=permits, stats=stats, backlog_limit=backlog), stats


def test_one_frame_object_is_shared_by_every_subscriber():
    t, stats = topic()
    sinks = [Sink() for _ in range(3)]
    for s in sinks:
        t.place(s, Rule())  # type: ignore[arg-type]
    t.deliver(msg("a.b", b"1"))
    assert len({id(s.frames[0]) for s in sinks}) == 1 and stats.messages_received == 1


@dataclass(eq=False)
class EventSink(Sink):
    """An event stream's outbox, recording what it is sent with the pattern and sequence."""

    sse: bool = True
    stored: list[tuple[str, int | None]] = field(default_factory=list)

    def send_message(self, frame: bytes, pattern: str, seq: int | None) -> None:
        self.frames.append(frame)
        self.stored.append((pattern, seq))


def test_event_streams_share_one_event_per_message_whose_data_is_the_sockets_frame():
    t, _ = topic()
    socket_sink, streams = Sink(), [EventSink() for _ in range(3)]
    t.place(socket_sink, Rule())  # type: ignore[arg-type]
    for s in streams:
        t.place(s, Rule())  # type: ignore[arg-type]
    t.deliver(msg("a.b", b'{"x": 1}'))
    assert len({id(s.frames[0]) for s in streams}) == 1
    assert streams[0].frames[0] == b"data: " + socket_sink.frames[0][2:] + b"\n\n"  # the frame's JSON


def test_a_stored_message_reaches_an_event_stream_with_its_pattern_and_sequence():
    t, _ = topic()
    stream = EventSink()
    t.place(stream, Rule(filters=("a.secret",)))  # type: ignore[arg-type]
    t.deliver(msg("a.b", b"1"), 7, "2026-01-01T00:00:00Z")
    t.deliver(msg("a.secret", b"2"), 8, "2026-01-01T00:00:00Z")
    assert stream.stored == [("a.>", 7)]  # the token's filter applies to event streams too


def test_checked_subscribers_get_only_what_their_rule_delivers():
    t, _ = topic()
    plain, checked = Sink(), Sink()
    t.place(plain, Rule())  # type: ignore[arg-type]
    t.place(checked, Rule(filters=("a.secret",)))  # type: ignore[arg-type]
    t.deliver(msg("a.secret", b"1"))
    t.deliver(msg("a.open", b"2"))
    assert (len(plain.frames), len(checked.frames)) == (2, 1)


def test_a_subject_the_policy_denies_is_dropped_and_counted():
    t, stats = topic(permits=lambda s: not s.startswith("a.hidden"))
    sink = Sink()
    t.place(sink, Rule())  # type: ignore[arg-type]
    t.deliver(msg("a.hidden.x", b"1"))
    assert (sink.frames, stats.filtered) == ([], 1)


def test_paused_subscriber_gets_the_backlog_after_the_history_less_what_it_covered():
    t, _ = topic()
    sink = Sink()
    t.pause(sink, Rule())  # type: ignore[arg-type]
    for seq in (5, 6, 7):
        t.deliver(msg("a.b", str(seq).encode()), seq, "2026-01-01T00:00:00Z")
    assert sink.frames == []
    t.resume(sink, after_seq=5)  # type: ignore[arg-type]
    assert [json.loads(f[2:])["seq"] for f in sink.frames] == [6, 7]
    t.deliver(msg("a.b", b"8"), 8, "2026-01-01T00:00:00Z")
    assert len(sink.frames) == 3  # live again


def test_a_backlog_past_its_bound_closes_the_slow_subscriber_with_1013():
    t, stats = topic(backlog=3)
    sink = Sink()
    t.pause(sink, Rule())  # type: ignore[arg-type]
    for seq in range(1, 6):
        t.deliver(msg("a.b", b"1"), seq, "2026-01-01T00:00:00Z")
    assert (sink.closed_with, stats.slow_consumer_disconnects) == (1013, 1)


def test_a_topic_is_in_use_until_its_last_subscriber_leaves():
    t, _ = topic()
    a, b = Sink(), Sink()
    t.place(a, Rule())  # type: ignore[arg-type]
    t.pause(b, Rule())  # type: ignore[arg-type]
    t.discard(a)  # type: ignore[arg-type]
    assert t.in_use
    t.discard(b)  # type: ignore[arg-type]
    assert not t.in_use


# ---------------------------------------------------------------------------
# The control budget
# ---------------------------------------------------------------------------


def test_the_budget_allows_a_burst_of_its_rate_then_refills():
    budget = ControlBudget(rate=5, strikes=10, now=0.0)
    assert [budget.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert budget.take(0.2)  # one token back after 1/5 s


def test_strikes_leak_one_a_second_and_the_tenth_in_a_burst_closes():
    budget = ControlBudget(rate=1, strikes=10, now=0.0)
    assert [budget.strike(0.0) for _ in range(10)][-2:] == [False, True]
    calm = ControlBudget(rate=1, strikes=10, now=0.0)
    assert not any(calm.strike(float(t)) for t in range(100))  # one a second never adds up


# ---------------------------------------------------------------------------
# The outbox, over a real socket
# ---------------------------------------------------------------------------


@dataclass
class Wire:
    outbox: Outbox
    peer: socket.socket
    stats: Stats

    async def read(self, n: int) -> bytes:
        loop = asyncio.get_running_loop()
        data = b""
        while len(data) < n:
            chunk = await asyncio.wait_for(loop.sock_recv(self.peer, n - len(data)), TIMEOUT)
            assert chunk, "closed"
            data += chunk
        return data


@pytest.fixture
async def wire(request: pytest.FixtureRequest) -> AsyncIterator[Wire]:
    limits: Limits = getattr(request, "param", Limits())
    loop = asyncio.get_running_loop()
    ours, peer = socket.socketpair()
    for s in (ours, peer):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.setblocking(False)
    protocol_holder: list[BaseProtocol] = []

    def make() -> BaseProtocol:
        protocol_holder.append(BaseProtocol(loop))
        return protocol_holder[0]

    transport, protocol = await loop.create_connection(make, sock=ours)
    transport.set_write_buffer_limits(high=8192)
    stats = Stats()
    writer = StreamWriter(protocol, loop)
    outbox = Outbox(transport, protocol, writer, None, limits, stats, Flusher(), "test")  # type: ignore[arg-type]
    yield Wire(outbox, peer, stats)
    transport.abort()
    peer.close()


async def test_frames_of_one_loop_turn_go_out_in_one_write_in_order(wire):
    for i in range(3):
        wire.outbox.send(text_frame(str(i).encode()))
    assert wire.stats.frames_sent == 0  # gathered until the end of this turn
    await asyncio.sleep(0)
    assert (wire.stats.frames_sent, await wire.read(9)) == (3, b"\x81\x010\x81\x011\x81\x012")


@pytest.mark.parametrize(
    "wire", [Limits(queue_messages=50, queue_bytes=1 << 30, overflow=OVERFLOW_DISCONNECT)], indirect=True)
async def test_a_peer_that_stops_reading_is_closed_with_1013_past_the_queue_bound(wire):
    frame = text_frame(b"x" * 1000)
    for _ in range(400):  # far more than the socket and the transport take
        wire.outbox.send(frame)
        await asyncio.sleep(0)
    outbox = wire.outbox
    assert (outbox.closing, outbox.close_code, wire.stats.slow_consumer_disconnects) == (True, 1013, 1)


@pytest.mark.parametrize(
    "wire", [Limits(queue_messages=50, queue_bytes=1 << 30, overflow=OVERFLOW_DROP_OLDEST)], indirect=True)
async def test_drop_oldest_keeps_the_connection_and_counts_what_it_dropped(wire):
    frame = text_frame(b"x" * 1000)
    for _ in range(400):
        wire.outbox.send(frame)
        await asyncio.sleep(0)
    assert not wire.outbox.closing and wire.outbox.dropped > 0 and wire.stats.dropped == wire.outbox.dropped
    assert len(wire.outbox._queue) <= 50


@pytest.mark.parametrize("wire", [Limits(queue_messages=40, queue_bytes=1 << 30)], indirect=True)
async def test_room_waits_while_the_queue_is_more_than_half_full_and_returns_as_the_peer_reads(wire):
    frame = text_frame(b"x" * 1000)
    for _ in range(30):  # more than the socket takes: the transport pauses
        wire.outbox.send(frame)
    await asyncio.sleep(0)
    for _ in range(30):  # these wait in the queue, past half of its 40
        wire.outbox.send(frame)
    room = asyncio.ensure_future(wire.outbox.room())
    await asyncio.sleep(0.05)
    assert not room.done() and len(wire.outbox._queue) > 20
    await wire.read(60 * len(frame))  # the peer takes it all
    await asyncio.wait_for(room, TIMEOUT)
    assert len(wire.outbox._queue) <= 20


async def test_flusher_with_a_delay_writes_what_came_meanwhile_together_a_delay_later():
    flushed: list[tuple[str, float]] = []

    @dataclass
    class Named:
        name: str

        def flush(self) -> None:
            flushed.append((self.name, flusher._last_run))  # the same for everything one run writes

    flusher = Flusher(delay=0.05)
    flusher.mark(Named("first"))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # after a quiet spell: at once
    flusher.mark(Named("second"))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    flusher.mark(Named("third"))  # type: ignore[arg-type]
    await asyncio.sleep(0.1)
    names = [n for n, _ in flushed]
    assert names == ["first", "second", "third"]
    first, second, third = (run for _, run in flushed)
    assert second == third and second - first >= 0.045  # one run, a delay after the first


@pytest.mark.parametrize(("ns", "text"), [
    (1_764_979_200_123_456_789, "2025-12-06T00:00:00.123456789Z"),
    (1_764_979_200_476_886_690, "2025-12-06T00:00:00.47688669Z"),  # as JetStream writes it: no trailing zero
    (1_764_979_200_500_000_000, "2025-12-06T00:00:00.5Z"),
    (1_764_979_200_000_000_000, "2025-12-06T00:00:00Z"),
])
def test_a_stored_messages_time_is_written_as_jetstream_writes_it(ns, text):
    assert rfc3339(ns) == text
