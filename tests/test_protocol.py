"""The WebSocket control protocol: every reply the example defines, and every bad frame.

The example's strings are part of the wire protocol, so the replies are compared
exactly; bad frames are checked for an error reply that says what was wrong, and
for the connection (and everyone else's) carrying on afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from conftest import TIMEOUT, nats_synced, unique

BAD_ACTION = (
    "The user has to specify action in message ('subscribe' or 'unsubscribe'), got {} instead"
)


async def publish_and_expect(bridge: Any, nc: Any, client: Any, subject: str) -> dict[str, Any]:
    """Publish one message on ``subject`` and return the frame ``client`` receives for it."""
    await nats_synced(bridge)
    token = uuid.uuid4().hex
    await nc.publish(subject, f'{{"token": "{token}"}}'.encode())
    await nc.flush()
    frame = await client.receive_message()
    assert frame["subject"] == subject, frame
    assert frame["data"] == {"token": token}, frame
    return frame


# ---------------------------------------------------------------------------
# Greeting
# ---------------------------------------------------------------------------


async def test_greeting_is_the_examples_success_frame(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    assert client.welcome["success"] is True
    assert client.welcome["data"] == "Successfully connected"


async def test_greeting_carries_a_connection_id(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    connection_id = client.welcome["connection_id"]
    assert isinstance(connection_id, str)
    # The id is the capability for POST /clients/{id}: it must not be short.
    assert len(connection_id) >= 16


async def test_greeting_carries_the_protocol_version(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    assert client.welcome["protocol"] == 1


async def test_each_connection_gets_its_own_id(bridge, ws_factory):
    clients = [await ws_factory(bridge.ws_url) for _ in range(5)]
    ids = {c.connection_id for c in clients}
    assert len(ids) == 5


# ---------------------------------------------------------------------------
# Subscribe / unsubscribe replies
# ---------------------------------------------------------------------------


async def test_subscribe_reply_uses_the_examples_list_formatting(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"subjects": ["a", "b"], "action": "subscribe"})
    assert frame["success"] is True
    assert frame["message"] == "Successfully connected to events: 'a', 'b'"


async def test_subscribe_reply_for_one_wildcard_subject(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"subjects": ["*.>"], "action": "subscribe"})
    assert frame["success"] is True
    assert frame["message"] == "Successfully connected to events: '*.>'"


async def test_action_defaults_to_subscribe(bridge, ws_factory, nc):
    client = await ws_factory(bridge.ws_url)
    subject = unique()
    frame = await client.request({"subjects": [subject]})
    assert frame["success"] is True
    assert frame["message"] == f"Successfully connected to events: '{subject}'"
    await publish_and_expect(bridge, nc, client, subject)


async def test_subscribed_client_receives_published_message(bridge, ws_factory, nc):
    client = await ws_factory(bridge.ws_url)
    subject = unique()
    await client.subscribe(subject)
    frame = await publish_and_expect(bridge, nc, client, subject)
    assert frame["subject"] == subject


async def test_unsubscribe_replies_once_per_subject(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    first, second = unique(), unique()
    await client.subscribe(first, second)
    replies = [await client.request({"subjects": [first, second], "action": "unsubscribe"})]
    replies.append(await client.receive())
    assert [(r["success"], r["message"]) for r in replies] == [
        (True, f"Successfully unsubscribed from event: {first}"),
        (True, f"Successfully unsubscribed from event: {second}"),
    ]


async def test_subscribe_with_a_subject_repeated_echoes_it_once(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    subject, other = unique("dup"), unique("dup")
    frame = await client.request({"subjects": [subject, subject, other, subject], "action": "subscribe"})
    assert frame["message"] == f"Successfully connected to events: '{subject}', '{other}'"
    assert frame["subjects"] == [subject, other]


async def test_unsubscribe_with_a_subject_repeated_answers_once_per_distinct_subject(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    subject = unique("dup")
    await client.subscribe(subject)
    first = await client.request({"subjects": [subject, subject], "action": "unsubscribe", "id": "u"})
    assert (first["success"], first["subjects"]) == (True, [subject])
    # The next reply is the one for this probe, not a second answer for the repeat.
    probe = await client.request({"subjects": [subject], "action": "unsubscribe", "id": "probe"})
    assert (probe["id"], probe["success"]) == ("probe", False)


async def test_repeated_subject_counts_once_against_max_subscriptions(
    bridge_factory, nats_server, ws_factory
):
    bridge = await bridge_factory(nats_url=nats_server.url, max_subscriptions=1)
    client = await ws_factory(bridge.ws_url)
    subject = unique("dup")
    frame = await client.request({"subjects": [subject, subject, subject], "action": "subscribe"})
    assert frame["success"] is True, frame


async def test_unsubscribed_client_stops_receiving(bridge, ws_factory, nc):
    client = await ws_factory(bridge.ws_url)
    subject = unique()
    await client.subscribe(subject)
    await client.request({"subjects": [subject], "action": "unsubscribe"})
    await nats_synced(bridge)
    await nc.publish(subject, b'"after"')
    await nc.flush()
    await client.assert_silent()


async def test_unsubscribe_from_subject_not_held_fails(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    subject = unique()
    frame = await client.request({"subjects": [subject], "action": "unsubscribe"})
    assert frame["success"] is False
    assert frame["message"] == f"The user did not subscribe to event {subject}"


async def test_unsubscribe_from_subject_only_another_client_holds_fails(bridge, ws_factory):
    holder = await ws_factory(bridge.ws_url)
    other = await ws_factory(bridge.ws_url)
    subject = unique()
    await holder.subscribe(subject)
    frame = await other.request({"subjects": [subject], "action": "unsubscribe"})
    assert frame["success"] is False
    assert frame["message"] == f"The user did not subscribe to event {subject}"


async def test_unsubscribe_mixing_held_and_not_held_subjects_answers_each(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    held, not_held = unique(), unique()
    await client.subscribe(held)
    replies = [await client.request({"subjects": [held, not_held], "action": "unsubscribe"})]
    replies.append(await client.receive())
    assert [(r["success"], r["message"]) for r in replies] == [
        (True, f"Successfully unsubscribed from event: {held}"),
        (False, f"The user did not subscribe to event {not_held}"),
    ]


async def test_unknown_action_gets_the_examples_message(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"subjects": ["a"], "action": "listen"})
    assert frame["success"] is False
    assert frame["message"] == BAD_ACTION.format("listen")


async def test_missing_subjects_gets_subjects_required(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"action": "subscribe"})
    assert frame["success"] is False
    assert frame["message"] == "subjects required"


@pytest.mark.parametrize(
    ("request_kind", "body", "success"),
    [
        ("subscribe", {"subjects": ["echo.a"], "action": "subscribe"}, True),
        ("unsubscribe not held", {"subjects": ["echo.b"], "action": "unsubscribe"}, False),
        ("unknown action", {"subjects": ["echo.c"], "action": "listen"}, False),
        ("missing subjects", {"action": "subscribe"}, False),
        ("invalid subject", {"subjects": ["a..b"]}, False),
        ("subjects not a list", {"subjects": "echo.d"}, False),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
async def test_reply_echoes_request_id(bridge, ws_factory, request_kind, body, success):
    client = await ws_factory(bridge.ws_url)
    request_id = f"req-{uuid.uuid4().hex[:6]}"
    frame = await client.request({**body, "id": request_id})
    assert frame["success"] is success, frame
    assert frame["id"] == request_id


async def test_unsubscribe_replies_each_echo_request_id(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    first, second = unique(), unique()
    await client.subscribe(first, second)
    replies = [await client.request({"subjects": [first, second], "action": "unsubscribe", "id": 7})]
    replies.append(await client.receive())
    assert [r["id"] for r in replies] == [7, 7]


async def test_reply_without_request_id_has_no_id(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"subjects": [unique()]})
    assert "id" not in frame


# ---------------------------------------------------------------------------
# Bad frames: an error reply that says what was wrong; nothing else breaks
# ---------------------------------------------------------------------------

LONG_SUBJECT = ".".join(["x" * 15] * 20)  # 319 bytes, past the 256-byte default limit

# (id, frame sent as text (str) or binary (bytes), words the error message must contain)
BAD_FRAMES: list[tuple[str, str | bytes, tuple[str, ...]]] = [
    ("not-json", "subscribe me to a.b", ("invalid json",)),
    ("truncated-json", '{"subjects": ["a"', ("invalid json",)),
    ("json-array", '["a", "b"]', ("object", "array")),
    ("json-string", '"a.b"', ("object", "string")),
    ("json-number", "42", ("object", "number")),
    ("json-null", "null", ("object", "null")),
    ("deeply-nested-json", "[" * 20_000 + "]" * 20_000, ("json",)),
    ("subjects-a-string", '{"subjects": "a.b"}', ("subjects", "list")),
    ("subjects-an-object", '{"subjects": {"a": 1}}', ("subjects", "list")),
    ("subjects-with-a-number", '{"subjects": ["a.b", 5]}', ("subjects", "string")),
    ("subjects-with-null", '{"subjects": [null]}', ("subjects", "string")),
    ("subjects-empty-list", '{"subjects": []}', ("subjects", "empty")),
    ("subject-empty-token", '{"subjects": ["a..b"]}', ("a..b", "empty token")),
    ("subject-leading-dot", '{"subjects": [".a"]}', (".a", "empty token")),
    ("subject-trailing-dot", '{"subjects": ["a."]}', ("a.", "empty token")),
    ("subject-with-space", '{"subjects": ["a b"]}', ("a b", "whitespace")),
    ("subject-with-tab", '{"subjects": ["a\\tb"]}', ("whitespace",)),
    ("subject-with-control-char", '{"subjects": ["a\\u0000b"]}', ("control",)),
    ("subject-partial-star", '{"subjects": ["a.*b"]}', ("a.*b", "wildcard")),
    ("subject-partial-gt", '{"subjects": ["a.b>"]}', ("a.b>", "wildcard")),
    ("subject-gt-not-last", '{"subjects": [">.a"]}', (">.a", "last token")),
    ("subject-empty", '{"subjects": [""]}', ("empty",)),
    ("subject-too-long", f'{{"subjects": ["{LONG_SUBJECT}"]}}', ("longer than",)),
    ("one-bad-among-good", '{"subjects": ["fine.one", "a..b"]}', ("a..b",)),
    ("unsubscribe-bad-subject", '{"subjects": ["a..b"], "action": "unsubscribe"}', ("a..b",)),
    ("binary-frame", b'{"subjects": ["a.b"]}', ("binary",)),
]


def bad_frame_params() -> list[Any]:
    return [pytest.param(frame, words, id=name) for name, frame, words in BAD_FRAMES]


async def send_raw(client: Any, frame: str | bytes) -> None:
    if isinstance(frame, bytes):
        await client.ws.send_bytes(frame)
    else:
        await client.ws.send_str(frame)


async def next_reply(client: Any) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while True:
        frame = await client.receive(max(0.01, deadline - asyncio.get_running_loop().time()))
        if frame.get("type") == "reply":
            return frame


@pytest.mark.parametrize(("frame", "words"), bad_frame_params())
async def test_bad_frame_gets_error_reply_saying_what_was_wrong(bridge, ws_factory, frame, words):
    client = await ws_factory(bridge.ws_url)
    await send_raw(client, frame)
    reply = await next_reply(client)
    assert reply["success"] is False, reply
    message = reply["message"].lower()
    for word in words:
        assert word.lower() in message, (word, reply["message"])


@pytest.mark.parametrize(("frame", "words"), bad_frame_params())
async def test_connection_still_works_after_bad_frame(bridge, ws_factory, nc, frame, words):
    client = await ws_factory(bridge.ws_url)
    await send_raw(client, frame)
    await next_reply(client)
    subject = unique()
    await client.subscribe(subject)
    await publish_and_expect(bridge, nc, client, subject)


@pytest.mark.parametrize(("frame", "words"), bad_frame_params())
async def test_other_client_keeps_receiving_after_bad_frame(bridge, ws_factory, nc, frame, words):
    bystander = await ws_factory(bridge.ws_url)
    subject = unique()
    await bystander.subscribe(subject)
    offender = await ws_factory(bridge.ws_url)
    await send_raw(offender, frame)
    await next_reply(offender)
    # If the bad subject had reached nats-server, it would now drop the bridge's
    # NATS connection and this message would never arrive.
    await publish_and_expect(bridge, nc, bystander, subject)


async def test_frame_with_one_invalid_subject_subscribes_none(bridge, ws_factory, nc):
    client = await ws_factory(bridge.ws_url)
    good = unique()
    frame = await client.request({"subjects": [good, "a..b"]})
    assert frame["success"] is False
    await nats_synced(bridge)
    await nc.publish(good, b'"should not arrive"')
    await nc.flush()
    await client.assert_silent()


async def test_bad_frame_keeps_existing_subscriptions(bridge, ws_factory, nc):
    client = await ws_factory(bridge.ws_url)
    subject = unique()
    await client.subscribe(subject)
    await client.send("not json at all")
    await next_reply(client)
    await publish_and_expect(bridge, nc, client, subject)
