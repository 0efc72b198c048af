"""Browsers call NATS services: ``{"action": "request"}`` through the bridge, against real responders.

A responder here is a real NATS client (nats-py) answering on its subject: an
echo (data and headers back), a fixed answer, a slow one, a silent one.  The
bridge runs in-process on the session's nats-server; clients are real
WebSockets, and every frame they receive is checked against the schema.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import nats
import pytest
import pytest_asyncio
from conftest import TIMEOUT, Bridge, NatsServer, WSClient, eventually, metric_samples, unique
from minting import SECRET, claims, hs256
from nats.aio.msg import Msg
from schema_check import validate_server_frame

from bridge.core.frames import BadFrame, publish_payload
from bridge.core.request import answer, parse_headers, parse_timeout, reserved, wire_headers

Handler = Callable[[Msg], Awaitable[None]]


@pytest_asyncio.fixture
async def responder(nats_server: NatsServer) -> AsyncIterator[Callable[[str, Handler], Awaitable[None]]]:
    """Serve ``subject`` with ``handler`` on a NATS connection of its own."""
    nc = await asyncio.wait_for(nats.connect(nats_server.url), TIMEOUT)
    tasks: set[asyncio.Task[None]] = set()

    async def serve(subject: str, handler: Handler) -> None:
        async def each(msg: Msg) -> None:
            # A task per request, so that a slow answer does not hold up the next one.
            task = asyncio.create_task(handler(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        await nc.subscribe(subject, cb=each)
        await asyncio.wait_for(nc.flush(), TIMEOUT)

    yield serve
    for task in list(tasks):
        task.cancel()
    await asyncio.wait_for(nc.close(), TIMEOUT)


def echo(nc_msg: Msg) -> Awaitable[None]:
    """Data and headers back, as they came."""
    return nc_msg.respond(nc_msg.data)


def fixed(payload: bytes, headers: dict[str, str] | None = None, delay: float = 0.0) -> Handler:
    async def handler(msg: Msg) -> None:
        if delay:
            await asyncio.sleep(delay)
        await msg._client.publish(msg.reply, payload, headers=headers)

    return handler


async def silent(msg: Msg) -> None:
    """Takes every request and never answers."""


@pytest_asyncio.fixture
async def svc_bridge(nats_server: NatsServer, bridge_factory: Any) -> Bridge:
    return await bridge_factory(nats_url=nats_server.url, publish_allow=("svc.>",))


async def raw_reply(client: WSClient, timeout: float = TIMEOUT) -> tuple[dict[str, Any], str]:
    """The next reply frame, parsed and as the bridge wrote it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = max(0.01, deadline - asyncio.get_running_loop().time())
        msg = await asyncio.wait_for(client.ws.receive(), left)
        assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data)
        frame = json.loads(msg.data)
        if frame.get("type") == "reply":
            validate_server_frame(frame)
            return frame, msg.data


def call(subject: str, **members: Any) -> dict[str, Any]:
    return {"action": "request", "subject": subject, "data": members.pop("data", {"q": 1}), **members}


# ---------------------------------------------------------------------------
# The answer: what the service said, as a message frame carries a payload
# ---------------------------------------------------------------------------


async def test_request_answer_carries_the_services_json_verbatim(svc_bridge, ws_factory, responder):
    subject = unique("svc")
    payload = b'{"big": 123456789012345678901234567890, "exact": 1.10, "list": [1, 2]}'
    await responder(subject, fixed(payload))
    client = await ws_factory(svc_bridge.ws_url)
    await client.send(call(subject, id="r1"))
    frame, raw = await raw_reply(client)
    assert (frame["success"], frame["action"], frame["id"], frame["subjects"]) == (True, "request", "r1",
                                                                                  [subject])
    assert '"data":' + payload.decode() in raw
    assert "encoding" not in frame


async def test_request_echo_returns_the_data_and_headers_sent(svc_bridge, ws_factory, responder):
    subject = unique("svc")
    await responder(subject, echo)
    client = await ws_factory(svc_bridge.ws_url)
    frame = await client.request(call(subject, data={"text": "hello"}, headers={"X-Trace": "abc"}))
    assert frame["success"], frame
    assert (frame["data"], frame["headers"]) == ({"text": "hello"}, {"X-Trace": "abc"})


async def test_request_text_answer_is_marked_text(svc_bridge, ws_factory, responder):
    subject = unique("svc")
    await responder(subject, fixed(b"plain words"))
    client = await ws_factory(svc_bridge.ws_url)
    frame = await client.request(call(subject))
    assert (frame["data"], frame["encoding"]) == ("plain words", "text")


async def test_request_binary_answer_is_base64(svc_bridge, ws_factory, responder):
    subject = unique("svc")
    await responder(subject, fixed(b"\x00\xff\x01"))
    client = await ws_factory(svc_bridge.ws_url)
    frame = await client.request(call(subject))
    assert (base64.b64decode(frame["data"]), frame["encoding"]) == (b"\x00\xff\x01", "base64")


async def test_request_base64_data_reaches_the_service_as_its_bytes(svc_bridge, ws_factory, responder):
    subject = unique("svc")
    await responder(subject, echo)
    client = await ws_factory(svc_bridge.ws_url)
    data = base64.b64encode(b"\x00\xfe").decode()
    frame = await client.request(call(subject, data=data, encoding="base64"))
    assert (base64.b64decode(frame["data"]), frame["encoding"]) == (b"\x00\xfe", "base64")


async def test_request_text_data_reaches_the_service_as_text(svc_bridge, ws_factory, responder):
    subject = unique("svc")
    await responder(subject, echo)
    client = await ws_factory(svc_bridge.ws_url)
    frame = await client.request(call(subject, data="hi there", encoding="text"))
    assert (frame["data"], frame["encoding"]) == ("hi there", "text")


async def test_request_header_with_several_values_reaches_the_service_as_repeated_lines(
    svc_bridge, ws_factory, nats_server
):
    # nats-py keeps one value per name, so the service here reads NATS's own protocol.
    subject = unique("svc")
    host, port = "127.0.0.1", nats_server.port
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
    try:
        await asyncio.wait_for(reader.readline(), TIMEOUT)  # INFO
        writer.write(b'CONNECT {"verbose":false,"headers":true,"protocol":1}\r\n'
                     + f"SUB {subject} 1\r\nPING\r\n".encode())
        assert (await asyncio.wait_for(reader.readline(), TIMEOUT)) == b"PONG\r\n"
        client = await ws_factory(svc_bridge.ws_url)
        await client.send(call(subject, headers={"X-Multi": ["a", "b"]}, timeout=0.5))
        line = await asyncio.wait_for(reader.readline(), TIMEOUT)
        while not line.startswith(b"HMSG "):  # INFO updates, PINGs
            if line == b"PING\r\n":
                writer.write(b"PONG\r\n")
            line = await asyncio.wait_for(reader.readline(), TIMEOUT)
        assert line.startswith(b"HMSG " + subject.encode()), line
        header_bytes = int(line.split()[-2])
        block = await asyncio.wait_for(reader.readexactly(header_bytes), TIMEOUT)
        assert b"\r\nX-Multi: a\r\nX-Multi: b\r\n" in block, block
    finally:
        writer.close()


# ---------------------------------------------------------------------------
# When NATS does not answer
# ---------------------------------------------------------------------------


async def test_request_without_responders_is_answered_no_responders_before_the_timeout(
    nats_server, bridge_factory, ws_factory
):
    # REQUEST_TIMEOUT far beyond the wait below: only nats-server's "no responders" can answer in time.
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("svc.>",), request_timeout=600)
    client = await ws_factory(bridge.ws_url)
    frame = await client.request(call(unique("svc"), id=7))
    assert (frame["success"], frame["error"], frame["id"]) == (False, "no_responders", 7), frame


async def test_request_to_a_slow_service_with_a_short_timeout_is_answered_timeout(
    svc_bridge, ws_factory, responder
):
    subject = unique("svc")
    await responder(subject, silent)
    client = await ws_factory(svc_bridge.ws_url)
    frame = await client.request(call(subject, timeout=0.2))
    assert (frame["success"], frame["error"]) == (False, "timeout"), frame
    assert "0.2 s" in frame["message"]


async def test_request_timeout_above_request_timeout_is_capped(nats_server, bridge_factory, ws_factory,
                                                               responder):
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("svc.>",), request_timeout=0.3)
    subject = unique("svc")
    await responder(subject, silent)
    client = await ws_factory(bridge.ws_url)
    # Asked for an hour; REQUEST_TIMEOUT is the most: answered long before the wait below ends.
    frame = await client.request(call(subject, timeout=3600))
    assert (frame["success"], frame["error"]) == (False, "timeout"), frame
    assert "0.3 s" in frame["message"]


async def test_a_late_answer_after_the_timeout_is_dropped(svc_bridge, ws_factory, responder):
    subject = unique("svc")
    await responder(subject, fixed(b'"late"', delay=0.4))
    client = await ws_factory(svc_bridge.ws_url)
    frame = await client.request(call(subject, timeout=0.1))
    assert frame["error"] == "timeout"
    await client.assert_silent(0.8)


# ---------------------------------------------------------------------------
# Requests never block the connection
# ---------------------------------------------------------------------------


async def test_requests_are_answered_as_answers_arrive_not_in_order_sent(svc_bridge, ws_factory, responder):
    slow, fast = unique("svc"), unique("svc")
    await responder(slow, fixed(b'"slow"', delay=1.0))
    await responder(fast, fixed(b'"fast"'))
    client = await ws_factory(svc_bridge.ws_url)
    await client.send(call(slow, id="slow"))
    await client.send(call(fast, id="fast"))
    first, _ = await raw_reply(client)
    second, _ = await raw_reply(client)
    assert [(first["id"], first["data"]), (second["id"], second["data"])] == [("fast", "fast"),
                                                                              ("slow", "slow")]


async def test_subscribe_sent_after_a_slow_request_is_answered_first(svc_bridge, ws_factory, responder):
    slow = unique("svc")
    await responder(slow, fixed(b'"slow"', delay=1.0))
    client = await ws_factory(svc_bridge.ws_url)
    await client.send(call(slow, id="slow"))
    await client.send({"action": "subscribe", "subjects": [unique("news")], "id": "sub"})
    first, _ = await raw_reply(client)
    second, _ = await raw_reply(client)
    assert [(first["id"], first["action"]), (second["id"], second["action"])] == [
        ("sub", "subscribe"), ("slow", "request")]


async def test_requests_over_max_pending_requests_are_refused_at_once(nats_server, bridge_factory, ws_factory,
                                                                      responder):
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("svc.>",), max_pending_requests=2,
                                  request_timeout=600)
    subject = unique("svc")
    await responder(subject, silent)
    client = await ws_factory(bridge.ws_url)
    for n in (1, 2):
        await client.send(call(subject, id=n))
    frame = await client.request(call(subject, id=3))
    assert (frame["id"], frame["success"], frame["error"], frame["action"]) == (3, False, "too_many_requests",
                                                                               "request"), frame
    assert "MAX_PENDING_REQUESTS" in frame["message"]


async def test_a_request_over_the_control_rate_is_refused_too_many_requests(nats_server, bridge_factory,
                                                                            ws_factory, responder):
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("svc.>",), control_rate=1)
    subject = unique("svc")
    await responder(subject, echo)
    client = await ws_factory(bridge.ws_url)
    await client.send(call(subject, id="within"))
    await client.send(call(subject, id="over"))
    replies = {}
    while len(replies) < 2:
        frame, _ = await raw_reply(client)
        replies[frame["id"]] = frame
    assert replies["within"]["success"] is True
    assert (replies["over"]["success"], replies["over"]["error"], replies["over"]["action"]) == (
        False, "too_many_requests", "request")
    assert replies["over"]["message"].startswith("Rate limit")


# ---------------------------------------------------------------------------
# Who may: a request is a publish
# ---------------------------------------------------------------------------


async def test_request_outside_publish_allow_is_refused_not_allowed(svc_bridge, ws_factory):
    client = await ws_factory(svc_bridge.ws_url)
    frame = await client.request(call("orders.new", id=1))
    assert (frame["success"], frame["error"], frame["action"], frame["subjects"]) == (
        False, "not_allowed", "request", ["orders.new"]), frame


async def test_request_with_publishing_off_is_refused_as_a_publish_would_be(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    frame = await client.request(call("svc.echo"))
    assert (frame["success"], frame["error"], frame["message"]) == (
        False, "not_allowed", "Publishing is disabled on this bridge"), frame


@pytest.mark.parametrize("subject", ["svc.*", "svc.>", "svc..x", "svc. x"])
async def test_request_to_a_wildcard_or_invalid_subject_is_refused_invalid(svc_bridge, ws_factory, subject):
    client = await ws_factory(svc_bridge.ws_url)
    frame = await client.request(call(subject))
    assert (frame["success"], frame["error"], frame["action"]) == (False, "invalid", "request"), frame
    assert "subjects" not in frame


@pytest.mark.parametrize("subject", ["_INBOX.abc.def", "$JS.API.STREAM.LIST", "bridge.control.users.request"])
async def test_request_to_a_protected_subject_is_refused_even_when_publish_allow_is_everything(
    nats_server, bridge_factory, ws_factory, subject
):
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=(">",))
    client = await ws_factory(bridge.ws_url)
    frame = await client.request(call(subject))
    assert (frame["success"], frame["error"]) == (False, "not_allowed"), frame


@pytest.mark.parametrize("name", ["Nats-Rollup", "nats-expected-last-sequence", "NATS-MSG-ID", "Status",
                                  "description"])
async def test_request_with_a_header_nats_gives_meaning_to_is_refused(svc_bridge, ws_factory, responder,
                                                                      name):
    subject = unique("svc")
    await responder(subject, echo)
    client = await ws_factory(svc_bridge.ws_url)
    frame = await client.request(call(subject, headers={name: "all"}))
    assert (frame["success"], frame["error"]) == (False, "invalid"), frame
    assert "reserved" in frame["message"]


@pytest.mark.parametrize("value", ["a\r\nNats-Rollup: sub", "a\nNats-Rollup: sub",
                                   ["ok", "b\r\nStatus: 503"]])
async def test_request_header_value_smuggling_a_header_line_is_refused(svc_bridge, ws_factory, responder,
                                                                       value):
    subject = unique("svc")
    await responder(subject, echo)
    client = await ws_factory(svc_bridge.ws_url)
    frame = await client.request(call(subject, headers={"X-Trace": value}))
    assert (frame["success"], frame["error"]) == (False, "invalid"), frame


async def test_request_through_the_control_api_is_refused(svc_bridge, ws_factory):
    client = await ws_factory(svc_bridge.ws_url)
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{svc_bridge.http_url}/clients/{client.connection_id}",
                               json=call("svc.echo"), timeout=aiohttp.ClientTimeout(total=TIMEOUT))
        body = await resp.json()
    assert resp.status == 400, body
    assert body["replies"][0]["success"] is False


# ---------------------------------------------------------------------------
# JWT: the token's nats.pub claim decides, as for a publish
# ---------------------------------------------------------------------------


@pytest_asyncio.fixture
async def alice(nats_server, bridge_factory, ws_factory) -> WSClient:
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("svc.>",), jwt_secret=SECRET)
    token = hs256(claims("alice", nats={"pub": {"allow": ["svc.alice.>"]}}))
    return await ws_factory(f"{bridge.ws_url}?token={token}")


async def test_alice_may_call_a_service_under_svc_alice(alice, responder):
    subject = unique("svc.alice")
    await responder(subject, echo)
    frame = await alice.request(call(subject, data="mine"))
    assert (frame["success"], frame["data"]) == (True, "mine"), frame


async def test_alice_may_not_call_a_service_outside_her_claim(alice, responder):
    subject = unique("svc.bob")
    await responder(subject, echo)
    frame = await alice.request(call(subject))
    assert (frame["success"], frame["error"]) == (False, "not_allowed"), frame


# ---------------------------------------------------------------------------
# The response reaches the one who asked, and nobody else
# ---------------------------------------------------------------------------


async def test_a_client_subscribed_to_everything_never_sees_a_response(nats_server, bridge_factory,
                                                                       ws_factory, responder):
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("svc.>",))
    subject = unique("svc")
    await responder(subject, fixed(b'"secret answer"'))
    watcher = await ws_factory(bridge.ws_url)
    await watcher.subscribe(">")
    asker = await ws_factory(bridge.ws_url)
    assert (await asker.request(call(subject)))["data"] == "secret answer"
    seen = []
    with pytest.raises(asyncio.TimeoutError):
        while True:
            seen.append(await watcher.receive(0.5))
    # The request itself is a publish on the subject (the watcher may follow it); never its answer.
    leaked = [f for f in seen if f.get("data") == "secret answer" or f.get("subject", "").startswith("_IN")]
    assert leaked == []
    assert any(f.get("subject") == subject for f in seen), seen


async def test_a_service_cannot_answer_another_request_by_guessing_its_reply_subject(svc_bridge, ws_factory,
                                                                                     responder):
    # Threat: a service sees the reply subject of each request it gets; were the tokens a count,
    # it could answer the request before its own (to another service, maybe another user's).
    quiet, evil = unique("svc"), unique("svc")
    await responder(quiet, silent)

    async def forge(msg: Msg) -> None:
        prefix, _, token = msg.reply.rpartition(".")
        for guess in {str(int(token) - 1) if token.isdigit() else "", token[:-1] + "A", "1", "0"} - {""}:
            await msg._client.publish(f"{prefix}.{guess}", b'"forged"')
        await msg.respond(b'"evil"')

    await responder(evil, forge)
    client = await ws_factory(svc_bridge.ws_url)
    await client.send(call(quiet, id="victim", timeout=1))
    await client.send(call(evil, id="evil"))
    replies = {}
    while len(replies) < 2:
        frame, _ = await raw_reply(client)
        replies[frame["id"]] = frame
    assert (replies["victim"]["success"], replies["victim"]["error"]) == (False, "timeout"), replies


def inboxes_held(server: NatsServer, bridge: Bridge) -> list[str]:
    connz = server.monitor("/connz?subs=1&limit=1000")
    return [s for c in connz.get("connections") or [] if c.get("name", "").startswith(bridge.name)
            for s in c.get("subscriptions_list") or [] if s.startswith("_INBOX.")]


@pytest.mark.parametrize(("publish_allow", "held"), [(("svc.>",), 1), ((), 0)], ids=["publishing", "off"])
async def test_the_reply_inbox_is_subscribed_at_start_only_when_publishing_is_on(
    nats_server, bridge_factory, publish_allow, held
):
    # Before any request: a first answer cannot outrun the inbox's interest across a cluster.
    # Publishing off: the bridge's NATS user need not be allowed _INBOX.> at all.
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=publish_allow)
    if held:  # nats-server's monitor may show it a moment after the bridge's flush
        await eventually(lambda: len(inboxes_held(nats_server, bridge)) == held)
    inboxes = inboxes_held(nats_server, bridge)
    assert len(inboxes) == held, inboxes


# ---------------------------------------------------------------------------
# Closing, and the metrics
# ---------------------------------------------------------------------------


async def test_closing_with_requests_in_flight_leaves_none_in_flight(nats_server, bridge_factory, ws_factory,
                                                                     responder):
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("svc.>",), request_timeout=600)
    subject = unique("svc")
    await responder(subject, silent)
    client = await ws_factory(bridge.ws_url)
    for n in range(3):
        await client.send(call(subject, id=n))
    requester = bridge.manager.requester
    await eventually(lambda: requester.in_flight == 3 and requester.inbox.waiting == 3)
    await client.close()
    await eventually(lambda: requester.in_flight == 0 and requester.inbox.waiting == 0)
    assert await in_flight_metric(bridge) == 0


async def in_flight_metric(bridge: Bridge) -> float:
    async with aiohttp.ClientSession() as http:
        async with http.get(bridge.http_url + "/metrics",
                            timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as resp:
            return metric_samples(await resp.text())["bridge_requests_in_flight"]


async def test_requests_are_counted_by_result(svc_bridge, ws_factory, responder):
    subject = unique("svc")
    await responder(subject, echo)
    client = await ws_factory(svc_bridge.ws_url)
    await client.request(call(subject))
    await client.request(call(unique("svc")))  # no responders
    await client.request(call("orders.x"))  # not allowed
    async with aiohttp.ClientSession() as http:
        async with http.get(svc_bridge.http_url + "/metrics",
                            timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as resp:
            samples = metric_samples(await resp.text())
    counted = {r: samples[f'bridge_requests_total{{result="{r}"}}'] for r in
               ("ok", "timeout", "no_responders", "not_allowed", "too_many_requests", "invalid")}
    assert counted == {"ok": 1, "timeout": 0, "no_responders": 1, "not_allowed": 1, "too_many_requests": 0,
                       "invalid": 0}


# ---------------------------------------------------------------------------
# The rules, unit by unit (bridge/core/request.py)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Nats-Rollup", "NATS-EXPECTED-STREAM", "nats-msg-id", "Status",
                                  "DESCRIPTION"])
def test_reserved_header_names_are_recognised_in_any_case(name):
    assert reserved(name)


@pytest.mark.parametrize("name", ["X-Trace", "Natsy", "Statuses", "Content-Type"])
def test_ordinary_header_names_are_not_reserved(name):
    assert not reserved(name)


@pytest.mark.parametrize("headers", [[], "X: y", {"": "v"}, {"X Y": "v"}, {"X:Y": "v"}, {"X": 1}, {"X": []},
                                     {"X": ["a", 2]}, {"X": "ä"}, {"X": "a\x00"}, {"X": "a\rb"}])
def test_malformed_headers_are_refused(headers):
    with pytest.raises(BadFrame) as refused:
        parse_headers(headers, "svc.x")
    assert refused.value.extra == {"action": "request", "error": "invalid", "subjects": ["svc.x"]}


def test_headers_with_several_values_are_written_as_one_line_each():
    headers = parse_headers({"X-A": ["1", "2"], "X-B": "3"}, "svc.x")
    assert wire_headers(headers) == {"X-A": "1\r\nX-A: 2", "X-B": "3"}


def test_no_headers_are_sent_as_none():
    assert wire_headers(parse_headers(None, "svc.x")) is None


@pytest.mark.parametrize(("given", "expected"), [(None, 10.0), (2, 2.0), (0.25, 0.25), (30, 10.0)])
def test_timeout_is_the_request_timeout_unless_the_request_asks_for_less(given, expected):
    assert parse_timeout(given, 10.0, "svc.x") == expected


@pytest.mark.parametrize("given", [0, -1, True, "1", float("nan"), float("inf"), [1]])
def test_timeout_that_is_not_a_positive_number_is_refused(given):
    with pytest.raises(BadFrame):
        parse_timeout(given, 10.0, "svc.x")


def test_answer_splices_the_payload_and_headers_into_the_reply():
    frame = answer("a", "svc.x", b'{"n": 1e400}', {"X": "y"})
    assert frame[:2] == bytes((0x81, 126))  # a text frame, its length in the next two bytes
    body = json.loads(frame[4:])
    assert body["data"] == json.loads('{"n": 1e400}')
    assert frame.endswith(b',"data":{"n": 1e400},"headers":{"X": "y"}}')
    assert (body["action"], body["id"], body["subjects"]) == ("request", "a", ["svc.x"])


@pytest.mark.parametrize("body", [{"data": 1, "encoding": "text"}, {"data": "x", "encoding": "hex"}])
def test_payload_with_an_encoding_it_cannot_have_is_refused(body):
    with pytest.raises(BadFrame):
        publish_payload(body)
