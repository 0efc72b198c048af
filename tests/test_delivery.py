"""Delivery: how each kind of NATS payload is framed, ordering, and the slow-consumer bound."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import TIMEOUT, StalledWebSocket, eventually, nats_synced, unique


async def subscribed_client(bridge: Any, ws_factory: Any, subject: str) -> Any:
    client = await ws_factory(bridge.ws_url)
    await client.subscribe(subject)
    await nats_synced(bridge)
    return client


async def deliver(
    bridge: Any, ws_factory: Any, nc: Any, payload: bytes, **publish_kwargs: Any
) -> tuple[str, str]:
    """Publish ``payload`` to a fresh subject a client follows; return (subject, frame text)."""
    subject = unique()
    client = await subscribed_client(bridge, ws_factory, subject)
    await nc.publish(subject, payload, **publish_kwargs)
    await nc.flush()
    msg = await asyncio.wait_for(client.ws.receive(), TIMEOUT)
    assert isinstance(msg.data, str), msg
    return subject, msg.data


def strict_json(text: str) -> Any:
    """Parse as a browser's JSON.parse would: NaN / Infinity are not JSON."""

    def reject(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=reject)


# ---------------------------------------------------------------------------
# Payload kinds
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        {"a": [1, 2.5, None, True], "b": {"c": "d"}},
        [1, "two", 3.0],
        "a JSON string",
        42,
        -0.5,
        True,
        None,
        {"key1": "value1", "key7": None, "unicode": "héllo ✓"},
    ],
    ids=["object", "array", "string", "int", "float", "bool", "null", "unicode-object"],
)
async def test_json_payload_arrives_as_json_value(bridge, ws_factory, nc, value):
    subject, text = await deliver(bridge, ws_factory, nc, json.dumps(value, ensure_ascii=False).encode())
    frame = strict_json(text)
    assert frame["subject"] == subject
    assert frame["data"] == value
    assert "encoding" not in frame


async def test_json_payload_with_surrounding_whitespace_arrives_as_json_value(bridge, ws_factory, nc):
    _, text = await deliver(bridge, ws_factory, nc, b'  \n{"a": 1}\r\n ')
    assert strict_json(text)["data"] == {"a": 1}


async def test_large_integer_keeps_every_digit(bridge, ws_factory, nc):
    _, text = await deliver(bridge, ws_factory, nc, b'{"big": 123456789012345678901234567890}')
    assert strict_json(text)["data"] == {"big": 123456789012345678901234567890}


@pytest.mark.parametrize(
    "text",
    ["héllo wörld ✓, not JSON", "{not json}", "plain", "12 34", "[1, 2", "'single quotes'"],
)
async def test_utf8_text_payload_arrives_as_string_marked_text(bridge, ws_factory, nc, text):
    subject, raw = await deliver(bridge, ws_factory, nc, text.encode())
    frame = strict_json(raw)
    assert frame["subject"] == subject
    assert frame["data"] == text
    assert frame["encoding"] == "text"


async def test_empty_payload_arrives_as_empty_text(bridge, ws_factory, nc):
    _, raw = await deliver(bridge, ws_factory, nc, b"")
    frame = strict_json(raw)
    assert (frame["data"], frame["encoding"]) == ("", "text")


async def test_text_and_json_string_with_the_same_characters_are_told_apart(bridge, ws_factory, nc):
    _, text = await deliver(bridge, ws_factory, nc, b"hello")
    _, json_string = await deliver(bridge, ws_factory, nc, b'"hello"')
    assert strict_json(text)["data"] == strict_json(json_string)["data"] == "hello"
    assert strict_json(text)["encoding"] == "text"
    assert "encoding" not in strict_json(json_string)


@pytest.mark.parametrize(
    "payload",
    [bytes(range(256)), b"\xff\xfe\x00binary", b'{"a": "\xe9"}', b"\xc3"],
    ids=["all-bytes", "bom-ish", "latin1-in-json", "truncated-utf8"],
)
async def test_non_utf8_payload_arrives_as_base64(bridge, ws_factory, nc, payload):
    subject, raw = await deliver(bridge, ws_factory, nc, payload)
    frame = strict_json(raw)
    assert frame["subject"] == subject
    assert frame["encoding"] == "base64"
    assert base64.b64decode(frame["data"], validate=True) == payload


@pytest.mark.parametrize("payload", ["NaN", "Infinity", "-Infinity", '{"a": NaN}', "[Infinity]"])
async def test_non_json_number_constant_arrives_as_text(bridge, ws_factory, nc, payload):
    _, raw = await deliver(bridge, ws_factory, nc, payload.encode())
    # strict_json fails if the constant was spliced in as if it were JSON.
    frame = strict_json(raw)
    assert (frame["data"], frame["encoding"]) == (payload, "text")


async def test_headers_arrive_as_headers(bridge, ws_factory, nc):
    headers = {"X-Trace-Id": "abc-123", "Content-Type": "application/json"}
    _, raw = await deliver(bridge, ws_factory, nc, b'{"a": 1}', headers=headers)
    frame = strict_json(raw)
    assert frame["headers"] == headers
    assert frame["data"] == {"a": 1}


async def test_reply_subject_arrives_as_reply(bridge, ws_factory, nc):
    inbox = unique("inbox")
    _, raw = await deliver(bridge, ws_factory, nc, b'"question"', reply=inbox)
    frame = strict_json(raw)
    assert frame["reply"] == inbox
    assert frame["data"] == "question"


async def test_plain_message_has_only_subject_and_data(bridge, ws_factory, nc):
    subject, raw = await deliver(bridge, ws_factory, nc, b'{"a": 1}')
    assert strict_json(raw) == {"subject": subject, "data": {"a": 1}}


async def test_message_on_wildcard_subscription_names_the_concrete_subject(bridge, ws_factory, nc):
    base = unique()
    client = await subscribed_client(bridge, ws_factory, base + ".>")
    await nc.publish(base + ".x.y", b"1")
    await nc.flush()
    frame = await client.receive_message()
    assert frame["subject"] == base + ".x.y"


# ---------------------------------------------------------------------------
# Ordering
# ---------------------------------------------------------------------------


async def test_burst_of_3000_messages_arrives_complete_and_in_order(bridge, ws_factory, nc):
    subject = unique()
    client = await subscribed_client(bridge, ws_factory, subject)
    for seq in range(3000):
        await nc.publish(subject, b'{"seq": %d}' % seq)
    await nc.flush()
    received = [(await client.receive_message())["data"]["seq"] for _ in range(3000)]
    assert received == list(range(3000))


async def test_burst_arrives_in_order_at_every_client(bridge, ws_factory, nc):
    subject = unique()
    clients = [await subscribed_client(bridge, ws_factory, subject) for _ in range(5)]
    for seq in range(1000):
        await nc.publish(subject, b"%d" % seq)
    await nc.flush()

    async def collect(client: Any) -> list[int]:
        return [(await client.receive_message())["data"] for _ in range(1000)]

    for received in await asyncio.gather(*(collect(c) for c in clients)):
        assert received == list(range(1000))


async def test_flush_delay_keeps_every_message_and_reply_in_order(
    nats_server, bridge_factory, ws_factory, nc
):
    bridge = await bridge_factory(nats_url=nats_server.url, flush_delay=0.05)
    subject = unique()
    client = await subscribed_client(bridge, ws_factory, subject)
    for seq in range(2000):
        await nc.publish(subject, b'{"seq": %d}' % seq)
        if seq == 1000:
            await nc.flush()
            # A control frame in the middle of the stream: its reply comes after
            # everything queued before it and before everything after it.
            await client.send({"subjects": ["nobody.holds.this"], "action": "unsubscribe", "id": "mid"})
    await nc.flush()
    frames = [await client.receive() for _ in range(2001)]
    seqs = [f["data"]["seq"] for f in frames if "subject" in f]
    assert seqs == list(range(2000))
    replies = [f for f in frames if f.get("type") == "reply"]
    assert [r["id"] for r in replies] == ["mid"]


# ---------------------------------------------------------------------------
# Slow consumer
# ---------------------------------------------------------------------------


SLOW_QUEUE_MESSAGES = 64
FLOOD_MESSAGES = 500
PAD = "x" * (64 * 1024)


@dataclass
class SlowConsumerRun:
    bridge: Any
    shared: str
    slow_only: str
    stalled: StalledWebSocket
    healthy_received: list[int]


@pytest.fixture
async def slow_consumer_run(bridge_factory, nats_server, ws_factory, nc):
    """Flood a subject that a stalled client and a healthy client both follow.

    The publisher keeps at most a few messages ahead of the healthy client, so the
    healthy client never falls behind its bound; the stalled client reads nothing
    after its subscribe reply, so its queue passes ``SLOW_QUEUE_MESSAGES``.
    """
    bridge = await bridge_factory(nats_url=nats_server.url, client_queue_messages=SLOW_QUEUE_MESSAGES)
    shared, slow_only = unique("flood"), unique("slowonly")
    healthy = await subscribed_client(bridge, ws_factory, shared)
    stalled = await StalledWebSocket.connect(bridge.port)
    try:
        assert (await stalled.read_json())["data"] == "Successfully connected"
        await stalled.send_json({"subjects": [shared, slow_only]})
        assert (await stalled.read_json())["success"] is True
        await nats_synced(bridge)

        received: list[int] = []

        async def read_healthy() -> None:
            while len(received) < FLOOD_MESSAGES:
                received.append((await healthy.receive_message())["data"]["seq"])

        reader = asyncio.create_task(read_healthy())
        try:
            for seq in range(FLOOD_MESSAGES):
                await nc.publish(shared, json.dumps({"seq": seq, "pad": PAD}).encode())
                if seq % 8 == 0:
                    await nc.flush()
                    await eventually(lambda seq=seq: len(received) >= seq - 16 or reader.done(),
                                     interval=0.001)
            await nc.flush()
            await asyncio.wait_for(asyncio.shield(reader), 30)
        finally:
            reader.cancel()
        yield SlowConsumerRun(bridge, shared, slow_only, stalled, received)
    finally:
        stalled.close()


async def test_healthy_client_receives_everything_in_order_beside_slow_consumer(slow_consumer_run):
    assert slow_consumer_run.healthy_received == list(range(FLOOD_MESSAGES))


async def test_slow_consumer_subscriptions_are_released(slow_consumer_run, nats_server):
    run = slow_consumer_run
    # The stalled client still reads nothing; the bridge must let go regardless.
    await eventually(lambda: run.slow_only not in nats_server.subscriptions_of(run.bridge.name), timeout=12)
    assert nats_server.subscriptions_of(run.bridge.name).count(run.shared) == 1


async def test_slow_consumer_is_closed_with_1013(slow_consumer_run):
    stalled = slow_consumer_run.stalled
    while True:
        opcode, payload = await stalled.read_frame()
        if opcode == 0x8:
            break
    (code,) = struct.unpack("!H", payload[:2])
    assert code == 1013
    assert payload[2:], "the close frame should carry a reason"


async def test_slow_consumer_gets_an_in_order_prefix_before_the_close(slow_consumer_run):
    stalled = slow_consumer_run.stalled
    seqs = []
    while True:
        opcode, payload = await stalled.read_frame()
        if opcode == 0x8:
            break
        frame = json.loads(payload)
        if "subject" in frame:
            seqs.append(frame["data"]["seq"])
    assert seqs == list(range(len(seqs)))
    assert len(seqs) < FLOOD_MESSAGES


async def test_slow_consumer_reset_while_closing_leaves_no_unretrieved_task_exception(
    slow_consumer_run, nats_server, caplog
):
    run = slow_consumer_run
    caplog.set_level(logging.ERROR, logger="asyncio")
    # The peer resets its connection while the bridge is still closing it.
    run.stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    run.stalled.close()
    await eventually(lambda: run.slow_only not in nats_server.subscriptions_of(run.bridge.name))
    # A task that failed with nobody awaiting it is reported when it is collected.
    for _ in range(3):
        gc.collect()
        await asyncio.sleep(0.05)
    errors = [r.getMessage() for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert errors == []
