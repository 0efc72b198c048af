"""Presence: who is on a subject, over every bridge sharing the NATS cluster (docs/presence.md).

Real nats-server with JetStream, bridges in-process (each with its own NATS
connection, incarnation and reader: to NATS they are separate bridges), real
WebSocket clients.  Each test has a CONTROL_SUBJECT of its own, so its presence
stream is its own.  Killed processes, NATS restarts and a cluster:
test_presence_cluster.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import nats
import pytest
from conftest import TIMEOUT, WSClient, metric_samples, nats_synced, running_bridge, unique
from minting import SECRET, claims, hs256

from bridge.core.presence import Entry

PRESENCE_SUBJECTS = ("room.*", "desk.{sub}")


@pytest.fixture
def control() -> str:
    """A control plane, and so a presence stream, of this test's own."""
    return unique("ctl")


@pytest.fixture
def start(bridge_factory, js_server, control):
    async def start_bridge(**overrides: Any) -> Any:
        overrides.setdefault("nats_url", js_server.url)
        overrides.setdefault("presence_subjects", PRESENCE_SUBJECTS)
        return await bridge_factory(control_subject=control, **overrides)

    return start_bridge


async def next_of(client: WSClient, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The next frame of ``type`` kind, skipping others."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        frame = await client.receive(max(0.01, deadline - asyncio.get_running_loop().time()))
        if frame.get("type") == kind:
            return frame


async def watch(client: WSClient, subject: str) -> dict[str, Any]:
    frame = await client.request({"action": "subscribe", "subjects": [subject], "presence": True})
    assert frame["success"], frame
    return frame


async def ask(client: WSClient, subject: str) -> dict[str, Any]:
    return await client.request({"action": "presence", "subject": subject, "id": "who"})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def clients_of(answer: dict[str, Any]) -> set[str]:
    return {e["client"] for e in answer["presence"]}


# ---------------------------------------------------------------------------
# Joining, asking, leaving: across two bridges
# ---------------------------------------------------------------------------


async def test_a_client_on_each_of_two_bridges_sees_the_others_join_and_both_answers_list_both(
    start, ws_factory
):
    one, two = await start(), await start()
    subject = unique("room")[: len("room.") + 12]
    a, b = await ws_factory(one.ws_url), await ws_factory(two.ws_url)
    await watch(a, subject)
    mine = await next_of(a, "join")
    await watch(b, subject)
    theirs = await next_of(a, "join", timeout=1.0)  # within a second, from the other bridge
    assert (await next_of(b, "join", timeout=1.0))["client"] == theirs["client"]
    assert theirs["client"] != mine["client"]
    for client in (a, b):
        answer = await ask(client, subject)
        assert (answer["success"], answer["count"], answer["users"]) == (True, 2, 0), answer
        assert clients_of(answer) == {mine["client"], theirs["client"]}
        assert answer["subject"] == subject and answer["id"] == "who"


async def test_unsubscribe_sends_a_leave_to_the_other_bridge_and_the_entry_is_gone(start, ws_factory):
    one, two = await start(), await start()
    a, b = await ws_factory(one.ws_url), await ws_factory(two.ws_url)
    await watch(a, "room.leave")
    await next_of(a, "join")
    await b.subscribe("room.leave")
    joined = await next_of(a, "join")
    assert (await b.request({"action": "unsubscribe", "subjects": ["room.leave"]}))["success"]
    left = await next_of(a, "leave", timeout=1.0)
    assert (left["client"], left["subject"], left["user"]) == (joined["client"], "room.leave", None)
    answer = await ask(a, "room.leave")
    assert (answer["count"], clients_of(answer)) == (1, {e["client"] for e in answer["presence"]})
    assert joined["client"] not in clients_of(answer)


async def test_closing_the_connection_sends_a_leave_to_the_other_bridge(start, ws_factory):
    one, two = await start(), await start()
    a, b = await ws_factory(one.ws_url), await ws_factory(two.ws_url)
    await watch(a, "room.close")
    await next_of(a, "join")
    await b.subscribe("room.close")
    joined = await next_of(a, "join")
    await b.close()
    assert (await next_of(a, "leave", timeout=1.0))["client"] == joined["client"]
    assert (await ask(a, "room.close"))["count"] == 1


async def test_a_watchers_own_join_comes_after_its_subscribe_reply(start, ws_factory):
    client = await ws_factory((await start()).ws_url)
    await client.send({"action": "subscribe", "subjects": ["room.own"], "presence": True, "id": 7})
    first, second = await client.receive(), await client.receive()
    assert (first["type"], first["id"], second["type"]) == ("reply", 7, "join"), (first, second)
    answer = await ask(client, "room.own")
    assert clients_of(answer) == {second["client"]}


async def test_a_stopped_bridge_takes_its_entries_with_it_at_once(start, ws_factory, js_server, control):
    one = await start()
    async with running_bridge(nats_url=js_server.url, control_subject=control,
                              presence_subjects=PRESENCE_SUBJECTS) as two:
        a, b = await ws_factory(one.ws_url), await ws_factory(two.ws_url)
        await watch(a, "room.stop")
        await next_of(a, "join")
        await b.subscribe("room.stop")
        joined = await next_of(a, "join")
    # Stopped gracefully: its lease is removed, every reader drops its entries (no TTL to wait).
    assert (await next_of(a, "leave", timeout=2.0))["client"] == joined["client"]
    assert (await ask(a, "room.stop"))["count"] == 1


# ---------------------------------------------------------------------------
# Who joins
# ---------------------------------------------------------------------------


async def test_a_wildcard_subscription_does_not_join(start, ws_factory):
    bridge = await start()
    watcher, other = await ws_factory(bridge.ws_url), await ws_factory(bridge.ws_url)
    await watch(watcher, "room.wild")
    await next_of(watcher, "join")
    await other.subscribe("room.*", "room.>")
    await watcher.assert_silent(0.5)
    answer = await ask(other, "room.wild")  # it may still ask
    assert (answer["success"], answer["count"]) == (True, 1)
    assert bridge.manager.presence.entries.keys() == clients_of(answer)


async def test_a_subject_outside_presence_subjects_does_not_join(start, ws_factory):
    bridge = await start()
    client = await ws_factory(bridge.ws_url)
    await client.subscribe("lobby.1", "room.1")
    assert [e.subject for e in bridge.manager.presence.entries.values()] == ["room.1"]


async def test_presence_subjects_with_sub_keep_presence_on_the_users_own_subject_only(start, ws_factory):
    bridge = await start(jwt_secret=SECRET)
    alice = await ws_factory(bridge.ws_url, headers=bearer(hs256(claims("alice"))))
    await alice.subscribe("desk.alice", "desk.bob")
    assert [e.subject for e in bridge.manager.presence.entries.values()] == ["desk.alice"]
    refused = await ask(alice, "desk.bob")
    assert not refused["success"] and "PRESENCE_SUBJECTS" in refused["message"], refused


# ---------------------------------------------------------------------------
# Refusals, in words
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("frame", "words"), [
    ({"action": "presence", "subject": "lobby.1"}, "not within PRESENCE_SUBJECTS"),
    ({"action": "presence", "subject": "room.*"}, "exact subject"),
    ({"action": "presence", "subject": "room..x"}, "empty token"),
    ({"action": "presence"}, "needs a 'subject'"),
    ({"action": "subscribe", "subjects": ["room.*"], "presence": True}, "exact subject"),
    ({"action": "subscribe", "subjects": ["room.1", "lobby.1"], "presence": True},
     "not within PRESENCE_SUBJECTS"),
    ({"action": "subscribe", "subjects": ["room.1"], "presence": "yes"}, "must be true or false"),
], ids=["ask-outside", "ask-wildcard", "ask-invalid", "ask-without-subject", "watch-wildcard",
        "watch-outside", "watch-not-boolean"])
async def test_presence_where_it_cannot_be_kept_is_refused_in_words_and_subscribes_nothing(
    start, ws_factory, frame, words
):
    bridge = await start()
    client = await ws_factory(bridge.ws_url)
    answer = await client.request(frame)
    assert not answer["success"] and words in answer["message"], answer
    session = bridge.manager.sessions[client.connection_id]
    assert (session.subscriptions, bridge.manager.presence.entries) == ({}, {})


async def test_presence_on_a_subject_the_client_may_not_subscribe_to_is_refused(start, ws_factory):
    bridge = await start(subject_allow=("room.open",))
    client = await ws_factory(bridge.ws_url)
    answer = await ask(client, "room.secret")
    assert not answer["success"] and "not allowed" in answer["message"], answer
    assert (await ask(client, "room.open"))["success"]


async def test_presence_refused_by_the_tokens_claim(start, ws_factory):
    bridge = await start(jwt_secret=SECRET)
    token = hs256(claims("alice", nats={"sub": {"allow": ["room.alice"]}}))
    alice = await ws_factory(bridge.ws_url, headers=bearer(token))
    answer = await ask(alice, "room.bob")
    assert not answer["success"] and "not allowed" in answer["message"], answer


async def test_without_presence_subjects_presence_is_refused_in_words(bridge_factory, js_server, ws_factory):
    bridge = await bridge_factory(nats_url=js_server.url)
    client = await ws_factory(bridge.ws_url)
    answer = await ask(client, "room.1")
    assert not answer["success"] and "PRESENCE_SUBJECTS is empty" in answer["message"], answer


async def test_without_jetstream_presence_says_it_is_unavailable_and_subscribes_still_work(
    bridge_factory, nats_server, ws_factory
):
    bridge = await bridge_factory(nats_url=nats_server.url, presence_subjects=("room.*",),
                                  control_subject=unique("ctl"))
    client = await ws_factory(bridge.ws_url)
    await client.subscribe("room.nojs")
    answer = await ask(client, "room.nojs")
    assert not answer["success"] and "not available" in answer["message"], answer


# ---------------------------------------------------------------------------
# Users, limits, ids
# ---------------------------------------------------------------------------


async def test_jwt_users_count_entries_and_distinct_users_and_show_the_info_claim(start, ws_factory):
    one, two = await start(jwt_secret=SECRET), await start(jwt_secret=SECRET)

    async def join(bridge: Any, sub: str, **extra: Any) -> WSClient:
        client = await ws_factory(bridge.ws_url, headers=bearer(hs256(claims(sub, **extra))))
        await client.subscribe("room.jwt")
        return client

    alice = await join(one, "alice", info={"name": "Alice A.", "n": 12345678901234567890})
    await join(two, "alice", info={"name": "Alice A.", "n": 12345678901234567890})
    await join(two, "bob")
    answer = await _settled(alice, "room.jwt", 3)
    assert (answer["count"], answer["users"]) == (3, 2)
    by_user = sorted((e["user"], json.dumps(e.get("info"))) for e in answer["presence"])
    alices_info = json.dumps({"name": "Alice A.", "n": 12345678901234567890})
    assert by_user == [("alice", alices_info), ("alice", alices_info), ("bob", "null")]


async def _settled(client: WSClient, subject: str, count: int) -> dict[str, Any]:
    """The answer once ``count`` entries are there (another bridge's may take a moment to arrive)."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while True:
        answer = await ask(client, subject)
        if answer.get("count") == count or asyncio.get_running_loop().time() > deadline:
            return answer
        await asyncio.sleep(0.05)


async def test_an_answer_lists_at_most_presence_max_with_exact_count_and_users(start, ws_factory):
    bridge = await start(jwt_secret=SECRET, presence_max=3)
    users = ["u1", "u2", "u3", "u4", "u5", "u1", "u2"]
    clients = [await ws_factory(bridge.ws_url, headers=bearer(hs256(claims(u))))
               for u in users]
    for client in clients:
        await client.subscribe("room.max")
    answer = await ask(clients[0], "room.max")
    assert (len(answer["presence"]), answer["count"], answer["users"]) == (3, 7, 5), answer
    assert "3 listed" in answer["message"]


async def test_no_frame_ever_carries_a_connection_id_as_client(start, ws_factory):
    one, two = await start(), await start()
    clients = [await ws_factory(b.ws_url) for b in (one, two, one, two)]
    connection_ids = {c.connection_id for c in clients}
    seen: list[str] = []
    for client in clients:
        await watch(client, "room.ids")
    await _settled(clients[0], "room.ids", 4)
    for client in clients:
        seen += [e["client"] for e in (await ask(client, "room.ids"))["presence"]]
    await clients[3].close()
    for client in clients[:3]:
        while True:
            frame = await client.receive()
            if frame.get("type") in ("join", "leave"):
                seen.append(frame["client"])
            if frame.get("type") == "leave":
                break
    assert len(set(seen)) == 4 and not set(seen) & connection_ids, (seen, connection_ids)


async def test_a_refresh_that_drops_a_subscription_leaves_its_presence(start, ws_factory):
    bridge = await start(jwt_secret=SECRET)
    watcher = await ws_factory(bridge.ws_url, headers=bearer(hs256(claims("bob"))))
    await watch(watcher, "room.refresh")
    await next_of(watcher, "join")
    alice = await ws_factory(bridge.ws_url, headers=bearer(hs256(claims("alice"))))
    await alice.subscribe("room.refresh")
    joined = await next_of(watcher, "join")
    narrower = hs256(claims("alice", nats={"sub": {"allow": ["room.other"]}}))
    frame = await alice.request({"action": "refresh", "token": narrower})
    assert frame["unsubscribed"] == ["room.refresh"], frame
    assert (await next_of(watcher, "leave", timeout=1.0))["client"] == joined["client"]


async def test_bridge_presence_entries_counts_this_processes_entries(start, ws_factory):
    bridge = await start()
    client = await ws_factory(bridge.ws_url)
    await client.subscribe("room.m1", "room.m2", "lobby.m3")
    samples = await _metrics(bridge)
    assert samples["bridge_presence_entries"] == 2
    await client.request({"action": "unsubscribe", "subjects": ["room.m1"]})
    assert (await _metrics(bridge))["bridge_presence_entries"] == 1


async def _metrics(bridge: Any) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(bridge.http_url + "/metrics") as resp:
        return metric_samples(await resp.text())


# ---------------------------------------------------------------------------
# Security: presence is never readable through a NATS subject
# ---------------------------------------------------------------------------


async def test_presence_data_never_reaches_a_browser_through_a_nats_subject(start, ws_factory, control):
    # Threat: a browser reading who is where (users, their info claims) through NATS itself:
    # a ">" subscription, or one aimed at presence's own subjects.  Presence lives under
    # CONTROL_SUBJECT, denied to browsers whatever SUBJECT_ALLOW and SUBJECT_DENY say.
    bridge = await start(subject_allow=(">",), jwt_secret=SECRET)
    spy = await ws_factory(bridge.ws_url, headers=bearer(hs256(claims("mallory"))))
    await spy.subscribe(">")
    for pattern in (f"{control}.presence.>", f"{control}.presence.e.*.*", f"{control}.>"):
        refused = await spy.request({"action": "subscribe", "subjects": [pattern]})
        assert not refused["success"], refused
    alice = await ws_factory(bridge.ws_url, headers={
        "Authorization": f"Bearer {hs256(claims('alice', info={'secret': 'alice-was-here'}))}"})
    await alice.subscribe("room.spied")
    await alice.request({"action": "unsubscribe", "subjects": ["room.spied"]})
    await alice.subscribe("room.spied")
    await nats_synced(bridge)
    frames = []
    with pytest.raises(asyncio.TimeoutError):
        while True:
            frames.append(await spy.receive(1.0))
    leaked = [f for f in frames if "alice-was-here" in json.dumps(f) or "presence" in f.get("subject", "")]
    assert leaked == [], leaked


# ---------------------------------------------------------------------------
# Incarnations and leases
# ---------------------------------------------------------------------------


async def test_a_new_incarnation_moves_every_entry_without_a_leave_or_join(start, ws_factory):
    one, two = await start(), await start()
    watcher, member = await ws_factory(one.ws_url), await ws_factory(two.ws_url)
    await watch(watcher, "room.move")
    await next_of(watcher, "join")
    await member.subscribe("room.move")
    joined = await next_of(watcher, "join")
    presence = two.manager.presence
    old = presence.store.incarnation
    # What NATS coming back does: a new incarnation, the entries written again, the old removed.
    presence._sync(reincarnate=True)
    await asyncio.wait_for(presence._syncing, TIMEOUT)
    assert presence.store.incarnation != old
    await watcher.assert_silent(1.0)
    answer = await ask(watcher, "room.move")
    assert answer["count"] == 2 and joined["client"] in clients_of(answer)


async def test_a_bridge_whose_lease_was_lost_writes_its_entries_again(start, ws_factory, js_server):
    one, two = await start(), await start()
    watcher, member = await ws_factory(one.ws_url), await ws_factory(two.ws_url)
    await watch(watcher, "room.lost")
    await next_of(watcher, "join")
    await member.subscribe("room.lost")
    joined = await next_of(watcher, "join")
    store = two.manager.presence.store
    lost = store.incarnation
    # The lease vanishes under the bridge (as when it expired while JetStream was out of reach).
    nc = await asyncio.wait_for(nats.connect(js_server.url), TIMEOUT)
    try:
        await nc.request(store.names.lease(lost), b"", headers={"Nats-Marker-Reason": "Remove"}, timeout=5)
    finally:
        await nc.close()
    assert (await next_of(watcher, "leave"))["client"] == joined["client"]
    assert (await next_of(watcher, "join"))["client"] == joined["client"]  # written again, same id
    assert store.incarnation != lost
    assert (await ask(watcher, "room.lost"))["count"] == 2


async def test_an_entry_without_a_live_lease_is_never_listed_and_is_purged(start, ws_factory, js_server):
    bridge = await start(presence_ttl=3.0)  # leases of 2 s: orphans purged after 4 s
    client = await ws_factory(bridge.ws_url)
    names = bridge.manager.presence.names
    ghost = Entry("room.ghost", "ghost", "ghostghostghost0", 1)
    nc = await asyncio.wait_for(nats.connect(js_server.url), TIMEOUT)
    try:
        await nc.request(names.entry("deadbeefdeadbeef", ghost.client), ghost.encode(), timeout=5)
        await client.subscribe("room.ghost")
        answer = await ask(client, "room.ghost")
        assert (answer["count"], answer["users"]) == (1, 0), answer  # ours only

        async def stored() -> int:
            ask_for = {"subjects_filter": names.entries_of("deadbeefdeadbeef")}
            info = await nc.request(f"$JS.API.STREAM.INFO.{names.stream}", json.dumps(ask_for).encode(),
                                    timeout=5)
            return len(json.loads(info.data)["state"].get("subjects") or {})

        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while await stored():
            assert asyncio.get_running_loop().time() < deadline, "the orphan entry was never purged"
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
