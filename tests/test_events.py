"""GET /events: NATS subjects as Server-Sent Events, read line by line by real HTTP clients.

The format (welcome, message events onmessage would get, ids on stored subjects only), the
history forms, refusals before the stream (all or nothing), loss-free resume from Last-Event-ID,
the endings (1013, 4001, 1001, 4003) and the control API reaching an event stream.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

import aiohttp
import nats
import pytest
import yarl
from conftest import TIMEOUT, eventually, nats_synced, publish, running_bridge, unique
from event_stream import EventStream, events
from minting import SECRET, claims, hs256
from test_control_plane import acquainted

from bridge.core.sse import (
    EventIdError,
    QueryError,
    data_lines,
    id_head,
    parse_event_id,
    parse_query,
    stream_key,
)

__all__ = ["events"]  # the fixture


# ---------------------------------------------------------------------------
# Fixtures: a JetStream server, a stream per test
# ---------------------------------------------------------------------------


@pytest.fixture
async def js(js_server) -> AsyncIterator[Any]:
    nc = await asyncio.wait_for(nats.connect(js_server.url), TIMEOUT)
    try:
        yield nc.jetstream()
    finally:
        with suppress(Exception):
            await asyncio.wait_for(nc.close(), TIMEOUT)


async def new_stream(js: Any) -> tuple[str, str]:
    """A fresh stream storing ``<base>.>``: its name and base subject."""
    base = f"e{uuid.uuid4().hex[:10]}"
    await js.add_stream(name=base.upper(), subjects=[f"{base}.>"])
    return base.upper(), base


@pytest.fixture
async def jbridge(js_server, bridge_factory) -> Any:
    return await bridge_factory(nats_url=js_server.url)


async def store(js: Any, subject: str, n: int, start: int = 0) -> list[int]:
    """Publish ``n`` messages {"n": start..} through JetStream; their sequences."""
    return [(await js.publish(subject, json.dumps({"n": start + i}).encode())).seq for i in range(n)]


def url(bridge: Any) -> str:
    return bridge.http_url + "/events"


async def ns(stream: EventStream, count: int) -> list[int]:
    """The ``n`` of the next ``count`` messages."""
    return [(await stream.message()).frame["data"]["n"] for _ in range(count)]


# ---------------------------------------------------------------------------
# The wire format, pure
# ---------------------------------------------------------------------------


def test_a_payload_with_line_breaks_becomes_one_data_line_each_and_joins_back_to_the_same_json():
    body = b'{"subject":"a","data":{\r\n "x": 1,\r "y": 2\n}}'
    lines = data_lines(body).decode().split("\n")[:-1]
    joined = "\n".join(line[len("data: "):] for line in lines)
    assert json.loads(joined) == json.loads(body) and all(line.startswith("data: ") for line in lines)


def test_an_event_id_holds_every_stored_subjects_position_and_reads_back():
    subjects = ["a.*", "core.x", "b.>"]
    head = id_head(subjects, [(0, stream_key("A", "e1")), (2, stream_key("B", "e2"))]).decode()
    positions = parse_event_id(f"{head}.4711.-", subjects)
    assert [(p.index, p.stream, p.seq) for p in positions] == [
        (0, stream_key("A", "e1"), 4711), (2, stream_key("B", "e2"), None)]


@pytest.mark.parametrize("text", ["", "x", "AQ", "!!!.1", "AQAAAAAA.1", "\u00e9.1"])
def test_an_id_the_bridge_never_gave_is_refused_in_words(text):
    with pytest.raises(EventIdError):
        parse_event_id(text, ["a"])


@pytest.mark.parametrize("seqs", ["\u00b2", "\u0661", "+1", "-1", str(2**64), "1.2", "", "1 "])
def test_an_id_whose_positions_are_not_sequences_is_refused_in_words(seqs):
    head = id_head(["a"], [(0, stream_key("A", "e"))]).decode()
    with pytest.raises(EventIdError):
        parse_event_id(f"{head}.{seqs}", ["a"])


def test_an_id_given_for_another_list_of_subjects_is_refused():
    head = id_head(["a", "b"], [(0, stream_key("A", "e"))]).decode()
    with pytest.raises(EventIdError, match="another list"):
        parse_event_id(f"{head}.5", ["b", "a"])


def test_an_id_for_100_stored_subjects_at_the_largest_sequences_stays_under_3_2_kb():
    subjects = [f"s.{i}" for i in range(100)]
    head = id_head(subjects, [(i, stream_key("S", "e")) for i in range(100)]).decode()
    text = head + "." + ".".join([str(2**64 - 1)] * 100)
    assert len(text) < 3200 and len(parse_event_id(text, subjects)) == 100


def test_the_url_asks_one_history_form_at_most():
    with pytest.raises(ValueError, match="at most one"):
        parse_query(["a"], {"last": "1", "since": "x"}, None, 50, 256)
    assert parse_query(["a", "a"], {"last": "3"}, None, 50, 256).history == {"last": 3}


@pytest.mark.parametrize("value", ["\u00b2", "\u0661", "+1", "1e3", "1234567890"])
def test_a_last_that_is_not_plain_digits_is_refused_in_words(value):
    with pytest.raises(QueryError, match="whole number"):
        parse_query(["a"], {"last": value}, None, 50, 256)


def test_the_last_event_id_header_wins_over_the_query_form():
    query = parse_query(["a"], {"last_event_id": "from-query"}, "from-header", 50, 256)
    assert query.last_event_id == "from-header"


# ---------------------------------------------------------------------------
# The format, against a real bridge
# ---------------------------------------------------------------------------


async def test_the_stream_is_text_event_stream_uncached_unbuffered_and_begins_with_retry_and_welcome(
        bridge, events):
    stream = await events(url(bridge), subject=unique(), welcome=False)
    headers = stream.response.headers
    assert (stream.status, headers["Content-Type"], headers["Cache-Control"],
            headers["X-Accel-Buffering"]) == (200, "text/event-stream", "no-cache", "no")
    first = await stream.next()
    assert first.lines[0].startswith("retry: ") and 1000 <= first.retry <= 3000
    assert first.kind == "welcome" and len(first.frame["connection_id"]) == 22


async def test_a_message_is_an_event_without_an_event_line_whose_data_is_the_sockets_frame(
        bridge, events, ws_factory, nc):
    subject = unique()
    stream = await events(url(bridge), subject=subject)
    client = await ws_factory(bridge.ws_url)
    await client.subscribe(subject)
    await nc.publish(subject, b'{"big": 12345678901234567890, "x": 1.0}', headers={"H": "v"})
    await nc.flush()
    got = await stream.message()
    frame = await asyncio.wait_for(client.ws.receive(), TIMEOUT)
    assert got.kind == "message" and not any(line.startswith("event:") for line in got.lines)
    assert got.data == frame.data  # the very text of the socket's frame, the payload's digits included
    assert '"big": 12345678901234567890, "x": 1.0' in got.data and got.frame["headers"] == {"H": "v"}


async def test_whatever_is_published_after_the_welcome_arrives(bridge, events, nc):
    subjects = [unique() for _ in range(5)]
    stream = await events(url(bridge), subject=subjects)
    for i, subject in enumerate(subjects):
        await publish(nc, subject, {"n": i})
    assert sorted(await ns(stream, 5)) == [0, 1, 2, 3, 4]


async def test_ids_come_on_stored_subjects_only(jbridge, events, js):
    _, base = await new_stream(js)
    core = unique("core")
    stream = await events(url(jbridge), subject=[f"{base}.a", core])
    assert stream.welcome  # the welcome itself carries the id to resume from
    await store(js, f"{base}.a", 1)
    stored = await stream.message()
    await js._nc.publish(core, b'{"n": 1}')
    live = await stream.message()
    assert stored.id is not None and stored.frame["seq"] >= 1
    assert live.id is None and "seq" not in live.frame


async def test_a_stored_message_published_while_the_stream_begins_has_its_id_after_the_welcomes(
        js_server, bridge_factory, events, js):
    _, base = await new_stream(js)
    subject = f"{base}.x"

    async def slow_prepare(request: Any, response: Any) -> None:
        if request.path == "/events" and "Last-Event-ID" not in request.headers:
            # Subscribed, the response not begun: the message waits in the stream's queue.
            await store(js, subject, 1)
            await asyncio.sleep(0.3)

    bridge = await bridge_factory(nats_url=js_server.url, on_response_prepare=slow_prepare)
    stream = await events(url(bridge), subject=subject, welcome=False)
    welcome = await stream.next()
    message = await stream.message()
    assert welcome.kind == "welcome" and message.id is not None and message.id != welcome.id
    # The welcome's id stands before that message: a stream broken off right after the welcome
    # gets it on its resume.
    again = await events(url(bridge), subject=subject, headers={"Last-Event-ID": welcome.id})
    assert (await again.next()).frame["recovered"] is True
    assert (await again.message()).frame["data"] == {"n": 0}


async def test_a_comment_line_keeps_a_silent_stream_open(nats_server, bridge_factory, events):
    bridge = await bridge_factory(nats_url=nats_server.url, ping_interval=0.2)
    stream = await events(url(bridge), subject=unique())
    line = await stream.line(timeout=3)
    assert line == ": "


async def test_head_is_not_a_stream(bridge):
    async with aiohttp.ClientSession() as session:
        async with session.head(url(bridge), params={"subject": "a"}) as resp:
            assert resp.status == 405


# ---------------------------------------------------------------------------
# History forms
# ---------------------------------------------------------------------------


async def test_last_n_sends_the_stored_ones_marked_then_live(jbridge, events, js):
    _, base = await new_stream(js)
    await store(js, f"{base}.a", 5)
    stream = await events(url(jbridge), subject=f"{base}.a", last=3)
    history = [(await stream.message()).frame for _ in range(3)]
    assert [(f["data"]["n"], f.get("history")) for f in history] == [(2, True), (3, True), (4, True)]
    await store(js, f"{base}.a", 1, start=5)
    live = (await stream.message()).frame
    assert (live["data"]["n"], "history" in live) == (5, False)


async def test_since_and_last_per_subject_are_the_sockets_forms(jbridge, events, js):
    _, base = await new_stream(js)
    await store(js, f"{base}.a", 2)
    await store(js, f"{base}.b", 1, start=2)
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    by_time = await events(url(jbridge), subject=f"{base}.*", since=since)
    assert await ns(by_time, 3) == [0, 1, 2]
    latest = await events(url(jbridge), subject=f"{base}.*", last_per_subject="true")
    assert await ns(latest, 2) == [1, 2]


# ---------------------------------------------------------------------------
# Refusals: before the stream, all or nothing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "status", "words"), [
    ({"subject": "a..b"}, 400, "Invalid subject"),
    ({}, 400, "subject required"),
    ({"subject": ["ok.one", "a b"]}, 400, "Invalid subject"),
    ({"subject": "_INBOX.>"}, 403, "not allowed"),
    ({"subject": "a", "last": "x"}, 400, "whole number"),
    ({"subject": "a", "last": "1", "since": "2026-01-01T00:00:00Z"}, 400, "at most one"),
    ({"subject": "plain.core", "last": "1"}, 400, "no stream stores"),
])
async def test_a_subject_the_socket_would_refuse_is_refused_before_the_stream(jbridge, events, params, status,
                                                                            words):
    stream = await events(url(jbridge), **params)
    body = await stream.json()
    assert (stream.status, body["success"]) == (status, False) and words in body["message"], body
    assert jbridge.manager.sessions == {} and jbridge.manager.registry.topics == {}


async def test_one_refused_subject_subscribes_none_of_the_others(nats_server, bridge_factory, events):
    bridge = await bridge_factory(nats_url=nats_server.url, subject_allow=["public.>"])
    stream = await events(url(bridge), subject=["public.a", "public.b", "secret.c"])
    assert stream.status == 403 and "secret.c" in (await stream.json())["message"]
    await nats_synced(bridge)
    assert nats_server.subscriptions_of(bridge.name) == []


async def test_the_tokens_nats_claim_binds_the_stream(nats_server, bridge_factory, events):
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET, subject_allow=["user.{sub}.>"])
    token = hs256(claims("alice", nats={"sub": {"allow": ["user.alice.public.>"]}}))
    refused = await events(url(bridge), subject="user.alice.private", token=token)
    assert refused.status == 403
    allowed = await events(url(bridge), subject="user.alice.public.x", token=token)
    assert allowed.status == 200 and allowed.welcome["user"] == "alice"


@pytest.mark.parametrize("how", ["none", "bad", "bearer-bad"])
async def test_a_missing_or_bad_token_is_401(nats_server, bridge_factory, events, how):
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET)
    params: dict[str, Any] = {"subject": "a"}
    headers = {}
    if how == "bad":
        params["token"] = hs256(claims("alice"), secret="another-secret-of-at-least-32-bytes!!")
    elif how == "bearer-bad":
        headers["Authorization"] = "Bearer not.a.jwt"
    stream = await events(url(bridge), headers=headers, **params)
    assert stream.status == 401 and (await stream.json())["message"].startswith("Unauthorized")


async def test_a_token_as_bearer_or_cookie_is_accepted(nats_server, bridge_factory, events):
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET)
    token = hs256(claims("alice"))
    bearer = await events(url(bridge), subject="a", headers={"Authorization": f"Bearer {token}"})
    cookie = await events(url(bridge), subject="a", headers={"Cookie": f"bridge_token={token}"})
    assert (bearer.welcome["user"], cookie.welcome["user"]) == ("alice", "alice")


async def test_a_foreign_origin_is_refused_with_403_and_no_cors_headers(bridge, events):
    """Threat: a page on another site opening the visitor's stream with the visitor's cookie."""
    stream = await events(url(bridge), subject="a", headers={"Origin": "https://evil.example"})
    assert stream.status == 403
    assert "Access-Control-Allow-Origin" not in stream.response.headers
    assert bridge.manager.sessions == {}


async def test_an_allowed_origin_is_named_with_credentials_never_a_star(nats_server, bridge_factory, events):
    bridge = await bridge_factory(nats_url=nats_server.url, allowed_origins=["*"])
    stream = await events(url(bridge), subject="a", headers={"Origin": "https://app.example"})
    headers = stream.response.headers
    assert stream.status == 200
    assert (headers["Access-Control-Allow-Origin"], headers["Access-Control-Allow-Credentials"]) == (
        "https://app.example", "true")


async def test_a_preflight_from_an_allowed_origin_may_send_last_event_id(nats_server, bridge_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, allowed_origins=["https://app.example"])
    async with aiohttp.ClientSession() as session:
        ok = await session.options(url(bridge), headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "last-event-id"})
        bad = await session.options(url(bridge), headers={"Origin": "https://evil.example"})
        assert ok.status == 204 and "Last-Event-ID" in ok.headers["Access-Control-Allow-Headers"]
        assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert bad.status == 403 and "Access-Control-Allow-Origin" not in bad.headers


async def test_max_connections_counts_sockets_and_streams_alike(nats_server, bridge_factory, events,
                                                                 ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, max_connections=2)
    await ws_factory(bridge.ws_url)
    first = await events(url(bridge), subject="a")
    over = await events(url(bridge), subject="a")
    assert (first.status, over.status) == (200, 503)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await asyncio.wait_for(session.ws_connect(bridge.ws_url), TIMEOUT)
    assert refused.value.status == 503


async def test_odd_urls_and_ids_get_a_stream_or_a_refusal_in_words_never_an_error(jbridge, js):
    """A few hundred URLs and Last-Event-IDs of every odd shape: each answer is a stream or a
    400/403 saying why, and the bridge goes on serving (no 500, no traceback)."""
    _, base = await new_stream(js)
    rng = random.Random(20)
    pieces = [f"{base}.x", f"{base}.*", "a", ">", "*", "a..b", "", " ", "\u00e9", "$JS.API.>", "_INBOX.1",
              "a" * 300, "a.\x00", "a.b", "%3E", "\ufffd"]
    # "\u00b2" is a digit to str.isdigit and not to int(); the AQ ids are well-formed heads.
    values = ["1", "0", "-1", "99999999999", "true", "false", "x", "", "2026-01-01T00:00:00Z", "\u00b2",
              "AQ.\u00b2", "AQAAAAAA.\u00b2"]
    # (Longest: under aiohttp's own 8190-byte limit on a header line, past which it answers 400 itself.)
    ids = ["", "x", ".", "..", "AQ.1", "A" * 8100, "AQAAAAAA.1.2", "-.-", "!!!", "AQ==.1"]
    head = id_head([f"{base}.x"], [(0, stream_key("S", "e"))]).decode()  # well-formed for that URL
    values += [f"{head}.\u00b2", f"{head}.{2**64}", f"{head}.-", f"{head}.1.2", f"{head}.+1"]
    names = ["last", "since", "last_per_subject", "last_event_id"]
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            query = [("subject", rng.choice(pieces)) for _ in range(rng.randint(0, 3))]
            query += [(name, rng.choice(values)) for name in rng.sample(names, rng.randint(0, 2))]
            headers = {"Last-Event-ID": rng.choice(ids)} if rng.random() < 0.3 else {}
            target = yarl.URL(url(jbridge)).with_query(query)
            async with session.get(target, headers=headers, timeout=timeout) as resp:
                assert resp.status in (200, 400, 403), (query, headers, resp.status)
                if resp.status == 200:
                    assert (await asyncio.wait_for(resp.content.readline(), TIMEOUT)).startswith(b"retry: ")
                else:
                    assert (await resp.json())["success"] is False
    await eventually(lambda: not jbridge.manager.sessions)
    assert jbridge.manager.registry.topics == {}


async def test_one_user_holds_at_most_max_connections_per_user_streams_and_sockets(
        nats_server, bridge_factory, events, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET, max_connections_per_user=2)
    token = hs256(claims("alice"))
    await ws_factory(f"{bridge.ws_url}?token={token}")
    first = await events(url(bridge), subject="a", token=token)
    over = await events(url(bridge), subject="a", token=token)
    other = await events(url(bridge), subject="a", token=hs256(claims("bob")))
    assert (first.status, over.status, other.status) == (200, 429, 200)
    assert "MAX_CONNECTIONS_PER_USER" in (await over.json())["message"]


# ---------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------


async def test_resume_across_two_subjects_of_two_streams_sends_exactly_the_missed_ones_then_live(
        jbridge, events, js):
    _, a = await new_stream(js)
    _, b = await new_stream(js)
    subjects = [f"{a}.x", f"{b}.y"]
    first = await events(url(jbridge), subject=subjects)
    await store(js, subjects[0], 2)
    await store(js, subjects[1], 2, start=100)
    assert sorted(await ns(first, 4)) == [0, 1, 100, 101]
    last_id = first.last_event_id
    await first.close()
    await eventually(lambda: not jbridge.manager.sessions)

    async def keep_publishing() -> None:
        for i in range(2, 40):
            await store(js, subjects[0], 1, start=i)
            await store(js, subjects[1], 1, start=100 + i)
            await asyncio.sleep(0.005)

    publishing = asyncio.create_task(keep_publishing())
    await asyncio.sleep(0.05)  # some are missed, some arrive while the resume is being set up
    again = await events(url(jbridge), subject=subjects, headers={"Last-Event-ID": last_id})
    recovered = await again.next()
    assert (recovered.kind, recovered.frame["recovered"]) == ("recovered", True), recovered.frame
    await publishing
    got = await ns(again, 76)
    assert sorted(n for n in got if n < 100) == list(range(2, 40))
    assert sorted(n for n in got if n >= 100) == list(range(102, 140))
    for low in (True, False):  # each subject in order
        mine = [n for n in got if (n < 100) == low]
        assert mine == sorted(mine)
    with pytest.raises(asyncio.TimeoutError):
        await again.message(timeout=0.3)  # and nothing twice


async def test_a_resume_the_stream_can_no_longer_serve_says_recovered_false_with_first_seq(
        jbridge, events, js):
    name, base = await new_stream(js)
    first = await events(url(jbridge), subject=f"{base}.x")
    await store(js, f"{base}.x", 1)
    await first.message()
    last_id = first.last_event_id
    await first.close()
    await store(js, f"{base}.x", 1, start=1)
    await js.purge_stream(name)  # what was missed is gone
    again = await events(url(jbridge), subject=f"{base}.x", last_event_id=last_id)
    recovered = (await again.next()).frame
    assert (recovered["type"], recovered["recovered"], recovered["first_seq"]) == ("recovered", False, 3)
    await store(js, f"{base}.x", 1, start=2)
    assert await ns(again, 1) == [2]  # no history, live goes on


async def test_a_resume_is_all_or_nothing_over_every_stream_of_the_connection(jbridge, events, js):
    _, a = await new_stream(js)
    b_name, b = await new_stream(js)
    subjects = [f"{a}.x", f"{b}.y"]
    first = await events(url(jbridge), subject=subjects)
    await store(js, subjects[0], 1)
    await store(js, subjects[1], 1, start=100)
    assert sorted(await ns(first, 2)) == [0, 100]
    last_id = first.last_event_id
    await first.close()
    await store(js, subjects[0], 1, start=1)  # a could be resumed...
    await store(js, subjects[1], 1, start=101)
    await js.purge_stream(b_name)  # ...but b cannot
    again = await events(url(jbridge), subject=subjects, headers={"Last-Event-ID": last_id})
    recovered = (await again.next()).frame
    assert recovered["recovered"] is False and recovered["streams"][subjects[0]]["history"] == 0, recovered
    assert recovered["first_seq"] == 3  # b's stream now begins after what was purged
    await store(js, subjects[0], 1, start=2)
    assert await ns(again, 1) == [2]  # a's missed one is not sent: no history at all; live goes on


async def test_the_last_event_id_wins_over_last_in_the_url(jbridge, events, js):
    _, base = await new_stream(js)
    await store(js, f"{base}.x", 3)
    first = await events(url(jbridge), subject=f"{base}.x", last=3)
    assert await ns(first, 3) == [0, 1, 2]
    last_id = first.last_event_id
    await first.close()
    await store(js, f"{base}.x", 2, start=3)
    again = await events(url(jbridge), subject=f"{base}.x", last=3, headers={"Last-Event-ID": last_id})
    assert (await again.next()).frame["recovered"] is True
    assert await ns(again, 2) == [3, 4]
    with pytest.raises(asyncio.TimeoutError):
        await again.message(timeout=0.3)


async def test_a_resume_during_the_history_sends_the_rest_of_it(jbridge, events, js):
    _, base = await new_stream(js)
    await store(js, f"{base}.a", 3)
    await store(js, f"{base}.b", 3, start=10)
    first = await events(url(jbridge), subject=[f"{base}.a", f"{base}.b"], last=3)
    seen = await ns(first, 4)  # all of a's history, then one of b's: b's position is now set too
    last_id = first.last_event_id
    await first.close()
    again = await events(url(jbridge), subject=[f"{base}.a", f"{base}.b"], last=3,
                         headers={"Last-Event-ID": last_id})
    assert (await again.next()).frame["recovered"] is True
    rest = await ns(again, 2)
    assert sorted(seen + rest) == [0, 1, 2, 10, 11, 12]


async def test_a_resume_whose_history_had_not_begun_asks_the_urls_history_again(jbridge, events, js):
    _, base = await new_stream(js)
    await store(js, f"{base}.a", 2)
    await store(js, f"{base}.b", 2, start=10)
    first = await events(url(jbridge), subject=[f"{base}.a", f"{base}.b"], last=2)
    assert await ns(first, 2) == [0, 1]  # a's history; b's has not begun
    last_id = first.last_event_id
    await first.close()
    again = await events(url(jbridge), subject=[f"{base}.a", f"{base}.b"], last=2, last_event_id=last_id)
    assert (await again.next()).frame["recovered"] is True
    assert await ns(again, 2) == [10, 11]


async def test_overlapping_stored_patterns_resume_each_message_once(jbridge, events, js):
    _, base = await new_stream(js)
    subjects = [f"{base}.*", f"{base}.a"]
    first = await events(url(jbridge), subject=subjects)
    await store(js, f"{base}.a", 1)
    await store(js, f"{base}.b", 1, start=1)
    assert await ns(first, 2) == [0, 1]
    last_id = first.last_event_id
    await first.close()
    await store(js, f"{base}.a", 1, start=2)
    await store(js, f"{base}.b", 1, start=3)
    again = await events(url(jbridge), subject=subjects, headers={"Last-Event-ID": last_id})
    assert (await again.next()).frame["recovered"] is True
    assert sorted(await ns(again, 2)) == [2, 3]
    with pytest.raises(asyncio.TimeoutError):
        await again.message(timeout=0.3)


async def test_an_id_the_bridge_never_gave_is_recovered_false_and_live_goes_on(jbridge, events, js):
    _, base = await new_stream(js)
    stream = await events(url(jbridge), subject=f"{base}.x", headers={"Last-Event-ID": "made-up"})
    recovered = (await stream.next()).frame
    assert recovered["recovered"] is False and "Last-Event-ID" in recovered["message"]
    await store(js, f"{base}.x", 1)
    assert await ns(stream, 1) == [0]


async def test_a_forged_id_cannot_reach_a_subject_the_url_does_not_name(jbridge, events, js):
    """Threat: a Last-Event-ID crafted to read another stream.  The id names no subject: what is
    followed is the URL's, checked like any subscribe; the id only says from where."""
    _, mine = await new_stream(js)
    _, theirs = await new_stream(js)
    await store(js, f"{theirs}.secret", 3)
    forged = id_head([f"{mine}.x"], [(0, stream_key(theirs.upper(), "x"))]).decode() + ".0"
    stream = await events(url(jbridge), subject=f"{mine}.x", headers={"Last-Event-ID": forged})
    assert (await stream.next()).frame["recovered"] is False
    with pytest.raises(asyncio.TimeoutError):
        await stream.message(timeout=0.3)


# ---------------------------------------------------------------------------
# Endings
# ---------------------------------------------------------------------------


async def test_a_client_that_hangs_up_releases_its_subscriptions_at_once(nats_server, bridge, events):
    subject = unique()
    stream = await events(url(bridge), subject=subject)
    await nats_synced(bridge)
    assert nats_server.subscriptions_of(bridge.name) == [subject]
    await stream.close()
    await eventually(lambda: not bridge.manager.sessions and not bridge.manager.registry.topics, timeout=2)


async def test_a_slow_consumer_is_ended_with_a_close_event_1013(nats_server, bridge_factory, nc):
    bridge = await bridge_factory(nats_url=nats_server.url, client_queue_messages=50)
    subject = unique()
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", bridge.port)), TIMEOUT)
    request = f"GET /events?subject={subject} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    await loop.sock_sendall(sock, request.encode())
    try:
        await eventually(lambda: bridge.manager.registry.topics)
        payload = b'{"pad": "' + b"x" * 2000 + b'"}'
        while bridge.manager.stats.slow_consumer_disconnects == 0:
            for _ in range(50):
                await nc.publish(subject, payload)
            await nc.flush()
        received = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), TIMEOUT):
            received += chunk
    finally:
        sock.close()
    assert b'event: close\ndata: {"type": "close", "code": 1013' in received
    assert received.endswith(b"0\r\n\r\n")  # the chunked response ends properly
    await eventually(lambda: not bridge.manager.sessions)


async def test_a_token_that_expires_gets_token_expiring_then_close_4001(nats_server, bridge_factory, events):
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET, jwt_refresh_lead=1.0)
    token = hs256(claims("alice", exp=int(time.time()) + 2))
    stream = await events(url(bridge), subject="a", token=token)
    warning = await stream.named("token_expiring")
    assert "reconnect with a new token" in warning.frame["message"]
    close = await stream.named("close", timeout=5)
    assert (close.frame["code"], close.frame["reason"]) == (4001, "token expired")
    assert await stream.end() == []


async def test_a_stopping_bridge_ends_its_streams_with_close_1001(nats_server, events):
    async with running_bridge(nats_url=nats_server.url) as bridge:
        stream = await events(url(bridge), subject="a")
        stopping = asyncio.create_task(bridge.runner.cleanup())
        close = await stream.named("close")
        await asyncio.wait_for(stopping, 30)
    assert close.frame["code"] == 1001
    assert await stream.end() == []


async def test_the_control_api_adds_a_subject_to_a_stream_and_its_delete_ends_it_with_4003(
        nats_server, bridge_factory, events, nc):
    plane = unique("ctl")
    here = await bridge_factory(nats_url=nats_server.url, control_subject=plane)
    there = await bridge_factory(nats_url=nats_server.url, control_subject=plane)  # another process's API
    await acquainted(here, there)
    stream = await events(url(here), subject=unique())
    added = unique()
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{there.http_url}/clients/{stream.connection_id}",
                                  json={"action": "subscribe", "subjects": [added]})
        assert resp.status == 200, await resp.text()
        reply = await stream.named("reply")
        assert (reply.frame["source"], reply.frame["subjects"]) == ("http", [added])
        await publish(nc, added, {"n": 1})
        assert (await stream.message()).frame["data"] == {"n": 1}
        resp = await session.delete(f"{there.http_url}/clients/{stream.connection_id}")
        assert resp.status == 200, await resp.text()
    close = await stream.named("close")
    assert close.frame["code"] == 4003


async def test_a_status_change_reaches_a_stream_as_an_event(nats_server, bridge, events):
    stream = await events(url(bridge), subject="a")
    bridge.manager.broadcast({"success": False, "type": "status", "nats": "disconnected",
                              "message": "NATS connection lost; reconnecting"})
    assert (await stream.named("status")).frame["nats"] == "disconnected"


async def test_metrics_count_event_streams_and_resumes(jbridge, events, js):
    _, base = await new_stream(js)
    await events(url(jbridge), subject=f"{base}.x", last_event_id="nope")
    async with aiohttp.ClientSession() as session:
        text = await (await session.get(jbridge.http_url + "/metrics")).text()
    assert "bridge_event_streams 1.0" in text
    assert 'bridge_event_stream_resumes_total{recovered="false"} 1.0' in text

