"""docs/schema against the real bridge: every kind of frame it sends validates,
malformed frames do not, and the examples in docs/protocol.md follow the schemas."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import pytest
from conftest import ROOT, TIMEOUT, NatsServer, eventually, nats_synced, unique
from schema_check import (
    CLIENT_FRAME,
    SERVER_FRAME,
    ValidationError,
    validate_client_frame,
    validate_server_frame,
    validator,
)

from bridge.core.subjects import subject_error

PROTOCOL_DOC = ROOT / "docs" / "protocol.md"




async def receive_type(client: Any, kind: str) -> dict[str, Any]:
    """The next frame of ``type`` kind, skipping others (each receive has a timeout)."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while True:
        frame = await client.receive(max(0.01, deadline - asyncio.get_running_loop().time()))
        if frame.get("type") == kind:
            return frame


# ---------------------------------------------------------------------------
# The schemas themselves
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", [SERVER_FRAME, CLIENT_FRAME], ids=lambda p: p.name)
def test_schema_file_is_valid_draft_2020_12(path) -> None:
    schema = json.loads(path.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    validator(path)  # check_schema raises on an invalid schema


# ---------------------------------------------------------------------------
# Frames produced by the real bridge
# ---------------------------------------------------------------------------


async def test_welcome_frame_validates(bridge, ws_factory) -> None:
    client = await ws_factory(bridge.ws_url)
    assert client.welcome["type"] == "welcome"
    validate_server_frame(client.welcome)


async def test_successful_subscribe_reply_with_id_validates(bridge, ws_factory) -> None:
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"action": "subscribe", "subjects": [unique()], "id": "req-1"})
    assert frame["success"] is True and frame["id"] == "req-1", frame
    validate_server_frame(frame)


async def test_error_reply_to_invalid_json_validates(bridge, ws_factory) -> None:
    client = await ws_factory(bridge.ws_url)
    frame = await client.request("{not json")
    assert frame["success"] is False, frame
    validate_server_frame(frame)


async def test_error_reply_to_a_binary_frame_validates(bridge, ws_factory) -> None:
    client = await ws_factory(bridge.ws_url)
    await asyncio.wait_for(client.ws.send_bytes(b'{"subjects": ["a"]}'), TIMEOUT)
    frame = await receive_type(client, "reply")
    assert frame["success"] is False, frame
    validate_server_frame(frame)


async def test_unsubscribe_replies_for_held_and_unheld_subjects_validate(bridge, ws_factory) -> None:
    client = await ws_factory(bridge.ws_url)
    held = unique()
    await client.subscribe(held)
    await client.send({"action": "unsubscribe", "subjects": [held, unique()], "id": 7})
    frames = [await receive_type(client, "reply"), await receive_type(client, "reply")]
    assert [f["success"] for f in frames] == [True, False], frames
    for frame in frames:
        validate_server_frame(frame)


async def test_reply_pushed_by_the_http_api_validates(bridge, ws_factory) -> None:
    client = await ws_factory(bridge.ws_url)
    body = {"subjects": [unique()], "id": 42}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        async with session.post(f"{bridge.http_url}/clients/{client.connection_id}", json=body) as resp:
            assert resp.status == 200, await resp.text()
    frame = await receive_type(client, "reply")
    assert frame["source"] == "http", frame
    validate_server_frame(frame)


async def test_publish_reply_and_publishing_welcome_validate(nats_server, bridge_factory, ws_factory) -> None:
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("schema.pub.>",))
    client = await ws_factory(bridge.ws_url)
    assert client.welcome["publish"] is True
    validate_server_frame(client.welcome)
    frame = await client.request({"action": "publish", "subject": "schema.pub.x", "data": {"a": 1}, "id": 1})
    assert frame["success"] is True, frame
    validate_server_frame(frame)


MESSAGES = {
    "json-object": (b'{"key1": "value1", "n": [1, 2.5, null]}', {}, lambda f: isinstance(f["data"], dict)),
    "json-number": (b"12345678901234567890", {}, lambda f: f["data"] == 12345678901234567890),
    "text": (b"plain text, not JSON", {}, lambda f: f["data"] == "plain text, not JSON"
             and f["encoding"] == "text"),
    "json-string": (b'"a JSON string"', {}, lambda f: f["data"] == "a JSON string" and "encoding" not in f),
    "empty": (b"", {}, lambda f: f["data"] == "" and f["encoding"] == "text"),
    "base64": (b"\x00\x01\xfe\xff", {}, lambda f: f.get("encoding") == "base64"),
    "headers-and-reply": (
        b'"x"',
        {"headers": {"Trace-Id": "abc", "X-Other": "1"}, "reply": "schema.reply.inbox"},
        lambda f: f["headers"]["Trace-Id"] == "abc" and f["reply"] == "schema.reply.inbox",
    ),
}


@pytest.mark.parametrize("kind", list(MESSAGES))
async def test_message_frame_validates(kind, bridge, ws_factory, nc) -> None:
    payload, options, is_that_kind = MESSAGES[kind]
    subject = unique()
    client = await ws_factory(bridge.ws_url)
    await client.subscribe(subject)
    await nats_synced(bridge)
    await asyncio.wait_for(nc.publish(subject, payload, **options), TIMEOUT)
    frame = await client.receive_message()
    assert is_that_kind(frame), frame
    validate_server_frame(frame)


async def test_status_frames_for_nats_loss_and_return_validate(bridge_factory, ws_factory) -> None:
    server = NatsServer().start()  # our own: stopping the session's would disturb other tests
    try:
        bridge = await bridge_factory(nats_url=server.url, nats_reconnect_wait=0.2)
        client = await ws_factory(bridge.ws_url)
        server.stop()
        lost = await receive_type(client, "status")
        server.start()
        back = await receive_type(client, "status")
    finally:
        server.stop()
    assert (lost["nats"], back["nats"]) == ("disconnected", "connected")
    validate_server_frame(lost)
    validate_server_frame(back)


async def test_dropped_frame_validates(nats_server, bridge_factory, ws_factory, nc) -> None:
    # The test client stops reading: once the socket's buffers are full the
    # bridge queues, its small queue overflows, and drop_oldest discards frames.
    bridge = await bridge_factory(
        nats_url=nats_server.url,
        client_queue_overflow="drop_oldest",
        client_queue_messages=64,
        client_queue_bytes=64 * 1024,
    )
    subject = unique()
    client = await ws_factory(bridge.ws_url)
    await client.subscribe(subject)
    await nats_synced(bridge)
    payload = b"x" * 8192
    for _ in range(3000):  # 24 MiB: more than loopback socket buffers hold
        await asyncio.wait_for(nc.publish(subject, payload), TIMEOUT)
    await asyncio.wait_for(nc.flush(), TIMEOUT)
    await eventually(lambda: bridge.manager.stats.dropped > 0)
    frame = await receive_type(client, "dropped")
    assert frame["dropped"] >= 1, frame
    validate_server_frame(frame)


# ---------------------------------------------------------------------------
# The schema can fail
# ---------------------------------------------------------------------------

WELCOME = {
    "success": True, "data": "Successfully connected", "type": "welcome",
    "connection_id": "Zq3x0mW8sYk2bV1cR7tN4A", "protocol": 1, "nats": "connected", "publish": False,
}

ANSWER = {"success": True, "message": "Answer from svc.x", "type": "reply", "id": 1, "action": "request",
          "subjects": ["svc.x"], "data": {"ok": 1}}
REQUEST_FAILED = {"success": False, "message": "No service answers on svc.x (no responders)", "type": "reply",
                  "action": "request", "subjects": ["svc.x"], "error": "no_responders"}

MALFORMED_SERVER_FRAMES = {
    "welcome-without-connection-id": {k: v for k, v in WELCOME.items() if k != "connection_id"},
    "welcome-with-wrong-protocol": {**WELCOME, "protocol": 2},
    "reply-with-string-success": {"success": "yes", "message": "ok", "type": "reply"},
    "reply-with-object-id": {"success": True, "message": "ok", "type": "reply", "id": {"a": 1}},
    "reply-from-unknown-source": {"success": True, "message": "ok", "type": "reply", "source": "ws"},
    "status-connected-but-failed": {"success": False, "type": "status", "nats": "connected", "message": "x"},
    "dropped-zero": {"success": False, "type": "dropped", "dropped": 0, "message": "x"},
    "message-without-data": {"subject": "a.b"},
    "message-with-a-type": {"subject": "a.b", "data": 1, "type": "message"},
    "message-base64-not-a-string": {"subject": "a.b", "data": [1, 2], "encoding": "base64"},
    "message-base64-bad-alphabet": {"subject": "a.b", "data": "not base64!", "encoding": "base64"},
    "message-text-not-a-string": {"subject": "a.b", "data": {"a": 1}, "encoding": "text"},
    "message-unknown-encoding": {"subject": "a.b", "data": "x", "encoding": "utf-16"},
    "message-header-not-a-string": {"subject": "a.b", "data": 1, "headers": {"k": 1}},
    "unknown-type": {"success": True, "type": "bonus", "message": "x"},
    "not-an-object": ["subject", "data"],
    "request-answer-failed-yet-with-data": {**ANSWER, "success": False},
    "request-answer-without-subjects": {k: v for k, v in ANSWER.items() if k != "subjects"},
    "request-answer-base64-not-base64": {**ANSWER, "data": "not base64!", "encoding": "base64"},
    "request-answer-header-not-a-string": {**ANSWER, "headers": {"X": ["a"]}},
    "request-error-on-a-success": {**REQUEST_FAILED, "success": True},
    "request-unknown-error": {**REQUEST_FAILED, "error": "busy"},
    "data-on-a-subscribe-reply": {**ANSWER, "action": "subscribe"},
}


@pytest.mark.parametrize("name", list(MALFORMED_SERVER_FRAMES))
def test_malformed_server_frame_does_not_validate(name) -> None:
    with pytest.raises(ValidationError):
        validate_server_frame(MALFORMED_SERVER_FRAMES[name])


# ---------------------------------------------------------------------------
# The client schema
# ---------------------------------------------------------------------------

VALID_CLIENT_FRAMES = {
    "subscribe": {"action": "subscribe", "subjects": ["a.b", "c.*", "d.>"], "id": 1},
    "subscribe-by-default": {"subjects": ["test.subject"]},
    "unsubscribe": {"action": "unsubscribe", "subjects": ["a.b"], "id": "x"},
    "publish-json": {"action": "publish", "subject": "a.b", "data": {"k": [1, 2]}},
    "publish-base64": {"action": "publish", "subject": "a.b", "data": "AAEC/w==", "encoding": "base64"},
    "publish-text": {"action": "publish", "subject": "a.b", "data": "hi", "encoding": "text"},
    "request": {"action": "request", "subject": "svc.x", "data": {"q": 1}, "id": "r"},
    "request-with-headers-and-timeout": {"action": "request", "subject": "svc.x", "data": "AA==",
                                         "encoding": "base64", "headers": {"X-A": "1", "X-B": ["2", "3"]},
                                         "timeout": 0.5},
}

INVALID_CLIENT_FRAMES = {
    "no-subjects": {"action": "subscribe"},
    "empty-subjects": {"subjects": []},
    "subjects-not-strings": {"subjects": [1]},
    "typo-subject-for-subjects": {"subject": ["a"]},
    "unknown-action": {"action": "watch", "subjects": ["a"]},
    "publish-to-a-wildcard": {"action": "publish", "subject": "a.*", "data": 1},
    "publish-without-data": {"action": "publish", "subject": "a.b"},
    "publish-bad-base64": {"action": "publish", "subject": "a", "data": "AAE", "encoding": "base64"},
    "object-id": {"subjects": ["a"], "id": {"n": 1}},
    "publish-text-not-a-string": {"action": "publish", "subject": "a", "data": 1, "encoding": "text"},
    "request-to-a-wildcard": {"action": "request", "subject": "svc.*", "data": 1},
    "request-with-a-reserved-header": {"action": "request", "subject": "svc.x", "data": 1,
                                       "headers": {"nats-rollup": "all"}},
    "request-header-with-a-line-break": {"action": "request", "subject": "svc.x", "data": 1,
                                         "headers": {"X": "a\r\nStatus: 503"}},
    "request-with-zero-timeout": {"action": "request", "subject": "svc.x", "data": 1, "timeout": 0},
    "not-an-object": [{"subjects": ["a"]}],
}


@pytest.mark.parametrize("name", list(VALID_CLIENT_FRAMES))
def test_well_formed_client_frame_validates(name) -> None:
    validate_client_frame(VALID_CLIENT_FRAMES[name])


@pytest.mark.parametrize("name", list(INVALID_CLIENT_FRAMES))
def test_malformed_client_frame_does_not_validate(name) -> None:
    with pytest.raises(ValidationError):
        validate_client_frame(INVALID_CLIENT_FRAMES[name])


SUBJECTS = [
    "a", "a.b.c", "a.*", "*", ">", "a.>", "*.b.>", "$SYS.x", "_INBOX.abc", "dash-and_under.9",
    "é.ü", "", "a..b", ".a", "a.", "a b", "a\tb", "a\x00b", "a\x7fb", "a*", "a.b*", "a.>.b",
    ">.a", "a.>x", "a.*.>",
]


@pytest.mark.parametrize("wildcards", [True, False], ids=["subscribe", "publish"])
@pytest.mark.parametrize("subject", SUBJECTS, ids=repr)
def test_client_schema_subject_rules_agree_with_the_bridge(subject, wildcards) -> None:
    accepted_by_bridge = subject_error(subject, 256, wildcards=wildcards) is None
    frame = (
        {"subjects": [subject]} if wildcards else {"action": "publish", "subject": subject, "data": 1}
    )
    accepted_by_schema = not list(validator(CLIENT_FRAME).iter_errors(frame))
    assert accepted_by_schema == accepted_by_bridge


# ---------------------------------------------------------------------------
# docs/protocol.md's examples
# ---------------------------------------------------------------------------


def doc_examples(tag: str) -> list[Any]:
    """The ```json <tag> blocks of docs/protocol.md, parsed."""
    blocks = re.findall(rf"^```json {tag}\n(.*?)^```", PROTOCOL_DOC.read_text(), re.S | re.M)
    return [json.loads(block) for block in blocks]


def schema_frame_kinds() -> set[str]:
    """Every frame kind the server schema defines: its ``type`` const, or "message"."""
    schema = json.loads(SERVER_FRAME.read_text())
    kinds = set()
    for ref in schema["oneOf"]:
        definition = schema["$defs"][ref["$ref"].rsplit("/", 1)[1]]
        kinds.add(definition["properties"].get("type", {}).get("const", "message"))
    return kinds


def test_protocol_doc_has_examples_of_every_server_frame_kind() -> None:
    kinds = {frame.get("type", "message") for frame in doc_examples("server-frame")}
    assert kinds == schema_frame_kinds()
    assert {"welcome", "reply", "status", "dropped", "message", "token_expiring"} <= kinds


def test_protocol_doc_server_frame_examples_validate() -> None:
    for frame in doc_examples("server-frame"):
        validate_server_frame(frame)


def test_protocol_doc_client_frame_examples_validate() -> None:
    examples = doc_examples("client-frame")
    assert examples
    for frame in examples:
        validate_client_frame(frame)
