"""The control plane on NATS: a control command reaches a connection on whichever bridge holds it.

Two (or three) real bridges on one real nats-server, then on a real three-node
cluster with the bridges on different nodes; real WebSocket clients; the HTTP
control API and the NATS subjects backends use.  The pure parts (bodies,
roster, gathering, the summary) are tested directly first.  Each test's bridges
get a control subject of their own, except where the default is the point.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from conftest import ROOT, TIMEOUT, NatsServer, close_of, eventually, publish, unique
from minting import SECRET, claims, hs256

from bridge.core.commands import Answer, Command, summarize
from bridge.core.plane import MISSES, BadCommand, Gathering, Roster, Subjects, decode_command, encode_command

CONTROL = "backend-control-secret"
JWT = {"jwt_secret": SECRET, "control_tokens": (CONTROL,), "subject_allow": ("user.{sub}.>", "public.>")}
# How long a command may take when an instance it waits for is dead: the bound,
# plus generous room for a busy machine (a liveness bound, not a speed claim).
TIMEOUT_BOUND = 0.5
LIVENESS_SLACK = 3.0


# ---------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------


def test_request_command_round_trips_through_its_nats_body():
    command = Command("client", "abc", "request", '{"subjects": ["a"]}')
    assert decode_command("client", "request", encode_command(command)) == command


def test_disconnect_command_round_trips_through_its_nats_body():
    command = Command("user", "alice", "disconnect", "account closed")
    assert decode_command("user", "disconnect", encode_command(command)) == command


def test_nats_body_may_carry_the_request_as_an_object():
    body = json.dumps({"key": "abc", "body": {"action": "subscribe", "subjects": ["a"]}}).encode()
    command = decode_command("client", "request", body)
    assert json.loads(command.body) == {"action": "subscribe", "subjects": ["a"]}


def test_disconnect_without_a_reason_gets_the_default_one():
    assert decode_command("user", "disconnect", b'{"key": "alice"}').body == "disconnected by the server"


def test_disconnect_reason_is_cut_to_what_a_close_frame_carries():
    body = json.dumps({"key": "alice", "reason": "é" * 100}).encode()
    assert len(decode_command("user", "disconnect", body).body.encode()) <= 123


@pytest.mark.parametrize(("op", "body", "words"), [
    ("request", b"not json", "Invalid JSON"),
    ("request", b"[1]", "JSON object"),
    ("request", b'{"body": {}}', "'key'"),
    ("request", b'{"key": "", "body": {}}', "'key'"),
    ("request", b'{"key": 7, "body": {}}', "'key'"),
    ("request", b'{"key": "abc"}', "'body'"),
    ("disconnect", b'{"key": "abc", "reason": 5}', "'reason'"),
])
def test_bad_nats_bodies_are_refused_saying_why(op, body, words):
    with pytest.raises(BadCommand) as refused:
        decode_command("client", op, body)
    assert words in str(refused.value)


@pytest.mark.parametrize("target", ["client", "user"])
@pytest.mark.parametrize("op", ["request", "disconnect"])
def test_api_and_each_subjects_name_their_command_kind(target, op):
    subjects = Subjects("bridge.control")
    assert subjects.command_kind(subjects.api(target, op)) == (target, op)
    assert subjects.command_kind(subjects.each(target, op)) == (target, op)


def test_subjects_are_the_documented_ones():
    subjects = Subjects("bridge.control")
    assert subjects.api("client", "request") == "bridge.control.clients.request"
    assert subjects.each("user", "disconnect") == "bridge.control.each.users.disconnect"
    assert subjects.instances == "bridge.control.instances"


def test_roster_knows_an_instance_until_it_has_been_silent_for_three_intervals():
    roster = Roster("me")
    roster.heard({"instance": "b", "state": "up", "interval": 1.0}, now=100.0)
    assert roster.alive(100.0 + MISSES - 0.01) == {"b"}
    assert roster.alive(100.0 + MISSES) == set()


def test_roster_forgets_an_instance_that_says_it_stops():
    roster = Roster("me")
    roster.heard({"instance": "b", "state": "up", "interval": 1.0}, now=0.0)
    roster.heard({"instance": "b", "state": "down"}, now=0.1)
    assert roster.alive(0.2) == set()


def test_roster_leaves_itself_out():
    roster = Roster("me")
    assert roster.heard({"instance": "me", "state": "hello", "interval": 1.0}, now=0.0) is False
    assert roster.alive(0.0) == set()


def test_roster_reports_a_newcomer_once():
    roster = Roster("me")
    first = roster.heard({"instance": "b", "state": "hello", "interval": 1.0}, now=0.0)
    again = roster.heard({"instance": "b", "state": "up", "interval": 1.0}, now=0.5)
    assert (first, again) == (True, False)


def test_gathering_for_a_user_waits_for_every_known_instance():
    gathering = Gathering(Command("user", "alice", "disconnect", "x"), {"a", "b"})
    gathering.add(Answer("a", connections=2))
    assert not gathering.done
    gathering.add(Answer("b", connections=0))
    assert gathering.done and gathering.missing == []


def test_gathering_for_a_connection_stops_at_the_instance_that_holds_it():
    gathering = Gathering(Command("client", "abc", "disconnect", "x"), {"a", "b", "c"})
    gathering.add(Answer("b", connections=1))
    assert gathering.done
    assert gathering.missing == []  # the others were not needed


def test_gathering_counts_an_instance_once():
    gathering = Gathering(Command("user", "alice", "disconnect", "x"), {"a", "b"})
    gathering.add(Answer("a", connections=1))
    gathering.add(Answer("a", connections=1))
    assert summarize(gathering.command, list(gathering.answers.values())).body["connections"] == 1


def test_summary_adds_up_the_connections_of_every_instance():
    command = Command("user", "alice", "disconnect", "x")
    result = summarize(command, [Answer("a", connections=2), Answer("b", connections=1)])
    assert (result.status, result.body["connections"], result.body["instances"]) == (200, 3, 2)


def test_summary_is_404_when_no_instance_holds_the_target_and_says_who_did_not_answer():
    result = summarize(Command("client", "abc", "request", "{}"), [Answer("a")], missing=["b"])
    assert (result.status, result.body["connections"], result.body["missing"]) == (404, 0, ["b"])


def test_summary_of_a_request_is_400_when_any_reply_failed():
    ok = {"success": True, "message": "fine", "type": "reply"}
    bad = {"success": False, "message": "nope", "type": "reply"}
    result = summarize(Command("user", "alice", "request", "{}"),
                       [Answer("a", connections=1, replies=[ok]), Answer("b", connections=1, replies=[bad])])
    assert (result.status, result.body["message"]) == (400, "fine; nope")


# ---------------------------------------------------------------------------
# Two bridges on one nats-server
# ---------------------------------------------------------------------------


async def control(bridge: Any, method: str, path: str, body: Any = None,
                  token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = body if isinstance(body, str) or body is None else json.dumps(body)
    async with aiohttp.ClientSession() as session, session.request(
        method, bridge.http_url + path, data=data, headers=headers,
        timeout=aiohttp.ClientTimeout(total=TIMEOUT),
    ) as resp:
        return resp.status, await resp.json()


def knows(bridge: Any, other: Any) -> bool:
    return other.plane.instance in bridge.plane.roster.alive(asyncio.get_running_loop().time())


async def acquainted(*bridges: Any) -> None:
    """Wait until every bridge has heard every other one announce itself."""
    await eventually(lambda: all(knows(a, b) for a in bridges for b in bridges if a is not b))


@pytest.fixture
def plane() -> str:
    """A control subject for this test's bridges alone."""
    return unique("ctl")


@pytest.fixture
async def pair(nats_server, bridge_factory, plane) -> tuple[Any, Any]:
    a = await bridge_factory(nats_url=nats_server.url, control_subject=plane)
    b = await bridge_factory(nats_url=nats_server.url, control_subject=plane)
    await acquainted(a, b)
    return a, b


@pytest.fixture
async def jwt_pair(nats_server, bridge_factory, plane) -> tuple[Any, Any]:
    a = await bridge_factory(nats_url=nats_server.url, control_subject=plane, **JWT)
    b = await bridge_factory(nats_url=nats_server.url, control_subject=plane, **JWT)
    await acquainted(a, b)
    return a, b


async def user(ws_factory: Any, bridge: Any, sub: str) -> Any:
    return await ws_factory(bridge.ws_url, headers={"Authorization": f"Bearer {hs256(claims(sub))}"})


async def test_post_client_sent_to_b_subscribes_a_client_on_a_which_then_receives_messages(
    pair, ws_factory, nc
):
    a, b = pair
    client = await ws_factory(a.ws_url)
    subject = unique()
    status, answer = await control(b, "POST", f"/clients/{client.connection_id}", {"subjects": [subject]})
    assert (status, answer["connections"]) == (200, 1), answer
    await publish(nc, subject, {"n": 1})
    frame = await client.receive_message()
    assert (frame["subject"], frame["data"]) == (subject, {"n": 1})


async def test_client_hears_a_command_sent_to_another_instance_as_an_http_reply(pair, ws_factory):
    a, b = pair
    client = await ws_factory(a.ws_url)
    subject = unique()
    await control(b, "POST", f"/clients/{client.connection_id}", {"subjects": [subject], "id": "b-1"})
    frame = await client.receive()
    assert (frame["source"], frame["id"], frame["subjects"]) == ("http", "b-1", [subject])


@pytest.mark.parametrize("which", ["a", "b"])
async def test_unknown_connection_id_answers_404_from_either_instance(pair, ws_factory, which):
    a, b = pair
    await ws_factory(a.ws_url)  # a real connection exists somewhere; just not this one
    status, answer = await control(a if which == "a" else b, "POST", "/clients/AAAAAAAAAAAAAAAAAAAAAA",
                                   {"subjects": ["x"]})
    assert (status, answer["connections"], answer["instances"], answer["missing"]) == (404, 0, 2, [])


async def test_delete_client_sent_to_b_closes_a_client_on_a_with_4003(pair, ws_factory):
    a, b = pair
    client = await ws_factory(a.ws_url)
    status, _ = await control(b, "DELETE", f"/clients/{client.connection_id}", {"reason": "bye from b"})
    assert status == 200
    assert await close_of(client) == (4003, "bye from b")


async def test_delete_user_closes_the_users_connections_on_both_instances(jwt_pair, ws_factory):
    a, b = jwt_pair
    alices = [await user(ws_factory, a, "alice"), await user(ws_factory, b, "alice"),
              await user(ws_factory, b, "alice")]
    bob = await user(ws_factory, a, "bob")
    status, answer = await control(a, "DELETE", "/users/alice", {"reason": "account closed"}, CONTROL)
    assert (status, answer["connections"], answer["instances"]) == (200, 3, 2), answer
    for alice in alices:
        assert await close_of(alice) == (4003, "account closed")
    assert (await bob.request({"action": "subscribe", "subjects": ["public.x"]}))["success"]


async def test_post_user_subscribes_the_users_connections_on_both_instances(jwt_pair, ws_factory, nc):
    a, b = jwt_pair
    alices = [await user(ws_factory, a, "alice"), await user(ws_factory, b, "alice")]
    status, answer = await control(b, "POST", "/users/alice", {"subjects": ["user.alice.alerts"]}, CONTROL)
    assert (status, answer["connections"]) == (200, 2), answer
    assert {r["connection_id"] for r in answer["replies"]} == {c.connection_id for c in alices}
    await publish(nc, "user.alice.alerts", {"n": 1})
    for alice in alices:
        assert (await alice.receive_message())["subject"] == "user.alice.alerts"


async def test_control_api_needs_a_control_token_whichever_instance_holds_the_user(jwt_pair, ws_factory):
    a, b = jwt_pair
    await user(ws_factory, a, "alice")
    status, _ = await control(b, "DELETE", "/users/alice", token=hs256(claims("alice")))
    assert status == 403


async def test_connection_ids_are_unique_across_instances(pair, ws_factory):
    a, b = pair
    clients = [await ws_factory(bridge.ws_url) for bridge in (a, b) for _ in range(15)]
    ids = [c.connection_id for c in clients]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", i) for i in ids)


# -- an instance killed or stopped ---------------------------------------------


@pytest.fixture
async def with_a_process(nats_server, bridge_factory, bridge_process, plane) -> tuple[Any, Any]:
    """Bridge A in-process, bridge B a real process (so it can be killed), on one plane."""
    a = await bridge_factory(nats_url=nats_server.url, control_subject=plane, **JWT)
    b = bridge_process(env=process_env(nats_server, plane, JWT_SECRET=SECRET, CONTROL_TOKENS=CONTROL,
                                       SUBJECT_ALLOW="user.{sub}.>,public.>"))
    await eventually(lambda: a.plane.roster.alive(asyncio.get_running_loop().time()))
    return a, b


def process_env(nats_server: NatsServer, plane: str, **extra: str) -> dict[str, str]:
    return {"NATS_URL": nats_server.url, "CONTROL_SUBJECT": plane, "TEST_PUBLISH_INTERVAL": "0", **extra}


async def test_with_an_instance_killed_a_command_still_answers_within_the_bound(with_a_process):
    a, b = with_a_process
    (b_instance,) = a.plane.roster.alive(asyncio.get_running_loop().time())
    b.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(b.proc.wait, TIMEOUT)
    started = time.monotonic()
    status, answer = await control(a, "DELETE", "/clients/AAAAAAAAAAAAAAAAAAAAAA", token=CONTROL)
    elapsed = time.monotonic() - started
    assert (status, answer["missing"]) == (404, [b_instance]), answer
    assert elapsed < TIMEOUT_BOUND + LIVENESS_SLACK


async def test_with_an_instance_killed_a_user_command_still_reaches_the_living(with_a_process, ws_factory):
    a, b = with_a_process
    alice = await user(ws_factory, a, "alice")
    b.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(b.proc.wait, TIMEOUT)
    status, answer = await control(a, "DELETE", "/users/alice", token=CONTROL)
    assert (status, answer["connections"], len(answer["missing"])) == (200, 1, 1), answer
    assert (await close_of(alice))[0] == 4003


async def test_a_killed_instance_is_no_longer_waited_for_after_three_silent_heartbeats(
    nats_server, bridge_factory, bridge_process, plane
):
    a = await bridge_factory(nats_url=nats_server.url, control_subject=plane, control_heartbeat=0.2)
    b = bridge_process(env=process_env(nats_server, plane, CONTROL_HEARTBEAT="0.2"))
    await eventually(lambda: a.plane.roster.alive(asyncio.get_running_loop().time()))
    b.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(b.proc.wait, TIMEOUT)
    await eventually(lambda: not a.plane.roster.alive(asyncio.get_running_loop().time()))
    status, answer = await control(a, "POST", "/clients/AAAAAAAAAAAAAAAAAAAAAA", {"subjects": ["x"]})
    assert (status, answer["instances"], answer["missing"]) == (404, 1, [])


async def test_an_instance_that_stops_says_so_and_is_not_waited_for(nats_server, bridge_factory,
                                                                   bridge_process, plane):
    a = await bridge_factory(nats_url=nats_server.url, control_subject=plane)
    b = bridge_process(env=process_env(nats_server, plane))
    await eventually(lambda: a.plane.roster.alive(asyncio.get_running_loop().time()))
    code, output = await asyncio.to_thread(b.stop, signal.SIGTERM)
    assert code == 0, output
    # Forgotten on its goodbye, not three heartbeats (3 s) later.
    await eventually(lambda: not a.plane.roster.alive(asyncio.get_running_loop().time()), timeout=1.5)


async def test_without_nats_a_command_for_a_connection_elsewhere_answers_503(bridge_factory, ws_factory):
    server = NatsServer().start()
    try:
        bridge = await bridge_factory(nats_url=server.url, nats_reconnect_wait=0.2)
        client = await ws_factory(bridge.ws_url)
        await asyncio.to_thread(server.stop)
        await eventually(lambda: not bridge.app.nats.client.is_connected)
        elsewhere, _ = await control(bridge, "POST", "/clients/AAAAAAAAAAAAAAAAAAAAAA", {"subjects": ["x"]})
        here, _ = await control(bridge, "POST", f"/clients/{client.connection_id}", {"subjects": ["x"]})
    finally:
        server.stop()
    assert (elsewhere, here) == (503, 200)


# -- backends that speak NATS ------------------------------------------------------


async def request(nc: nats.NATS, subject: str, body: Any) -> dict[str, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    msg = await nc.request(subject, data, timeout=TIMEOUT)
    return json.loads(msg.data)


async def test_nats_request_on_the_api_subject_gets_the_gathered_answer(pair, ws_factory, nc, plane):
    _, b = pair
    client = await ws_factory(b.ws_url)
    subject = unique()
    answer = await request(nc, f"{plane}.clients.request",
                           {"key": client.connection_id, "body": {"subjects": [subject]}})
    assert (answer["status"], answer["connections"], answer["success"]) == (200, 1, True), answer
    await publish(nc, subject, {"n": 1})
    assert (await client.receive_message())["subject"] == subject


async def test_nats_request_for_a_user_counts_connections_on_both_instances(jwt_pair, ws_factory, nc, plane):
    a, b = jwt_pair
    alices = [await user(ws_factory, a, "alice"), await user(ws_factory, b, "alice")]
    answer = await request(nc, f"{plane}.users.disconnect", {"key": "alice", "reason": "from nats"})
    assert (answer["status"], answer["connections"], answer["instances"]) == (200, 2, 2), answer
    for alice in alices:
        assert await close_of(alice) == (4003, "from nats")


async def test_nats_request_for_an_unknown_user_answers_404(pair, nc, plane):
    answer = await request(nc, f"{plane}.users.request", {"key": "nobody", "body": {"subjects": ["x"]}})
    assert (answer["status"], answer["connections"]) == (404, 0)


async def test_nats_request_with_a_bad_body_answers_400_saying_why(pair, nc, plane):
    answer = await request(nc, f"{plane}.clients.disconnect", b"not json")
    assert answer["status"] == 400 and "Invalid JSON" in answer["message"]


async def test_scatter_gather_on_the_each_subject_gets_one_answer_per_instance(pair, ws_factory, nc, plane):
    a, b = pair
    await ws_factory(a.ws_url)
    target = await ws_factory(b.ws_url)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"{plane}.each.clients.disconnect", json.dumps({"key": target.connection_id}).encode(),
                     reply=inbox)
    answers = [json.loads((await sub.next_msg(TIMEOUT)).data) for _ in range(2)]
    await sub.unsubscribe()
    assert {x["instance"] for x in answers} == {a.plane.instance, b.plane.instance}
    assert sorted(x["connections"] for x in answers) == [0, 1]


async def test_roll_call_on_instances_gets_one_answer_per_instance(pair, nc, plane):
    a, b = pair
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"{plane}.instances", b"", reply=inbox)
    answers = [json.loads((await sub.next_msg(TIMEOUT)).data) for _ in range(2)]
    await sub.unsubscribe()
    assert {x["instance"] for x in answers} == {a.plane.instance, b.plane.instance}
    assert all(x["state"] == "up" and x["worker"] == 1 for x in answers)


# ---------------------------------------------------------------------------
# Browsers never reach the control plane (the default control subject)
# ---------------------------------------------------------------------------

OPEN = {"subject_allow": (">",), "publish_allow": (">",)}


@pytest.fixture
async def open_pair(nats_server, bridge_factory) -> tuple[Any, Any]:
    """Two bridges that let browsers publish and subscribe all but the protected subjects."""
    a = await bridge_factory(nats_url=nats_server.url, subject_deny=(), control_heartbeat=0.2, **OPEN)
    b = await bridge_factory(nats_url=nats_server.url, subject_deny=(), control_heartbeat=0.2, **OPEN)
    await acquainted(a, b)
    return a, b


CONTROL_SUBJECTS = ["bridge.control", "bridge.control.x", "bridge.control.clients.disconnect",
                    "bridge.control.each.users.disconnect"]


@pytest.mark.parametrize("subject", CONTROL_SUBJECTS)
async def test_browser_allowed_to_publish_anything_is_refused_on_the_control_plane(open_pair, ws_factory,
                                                                                   subject):
    _, b = open_pair
    attacker = await ws_factory(b.ws_url)
    frame = await attacker.request({"action": "publish", "subject": subject, "data": {"key": "x"}})
    assert frame["success"] is False and "not allowed" in frame["message"], frame


async def test_browser_publishing_a_disconnect_command_does_not_disconnect_anyone(open_pair, ws_factory, nc):
    a, b = open_pair
    victim = await ws_factory(a.ws_url)
    attacker = await ws_factory(b.ws_url)
    heard = await nc.subscribe("bridge.control.clients.disconnect")
    await attacker.request({"action": "publish", "subject": "bridge.control.clients.disconnect",
                            "data": {"key": victim.connection_id}})
    await attacker.request({"action": "publish", "subject": "bridge.control.each.clients.disconnect",
                            "data": {"key": victim.connection_id}})
    # Still connected and served; and nothing of it ever reached NATS.
    assert (await victim.request({"action": "subscribe", "subjects": ["still.here"]}))["success"]
    with pytest.raises(nats.errors.TimeoutError):
        await heard.next_msg(0.5)


@pytest.mark.parametrize("pattern", ["bridge.control.>", "bridge.control", "bridge.control.instances",
                                     "bridge.control.*.request"])
async def test_browser_allowed_to_subscribe_anything_is_refused_on_the_control_plane(open_pair, ws_factory,
                                                                                     pattern):
    attacker = await ws_factory(open_pair[0].ws_url)
    frame = await attacker.request({"action": "subscribe", "subjects": [pattern]})
    assert frame["success"] is False and "not allowed" in frame["message"], frame


@pytest.mark.parametrize("pattern", [">", "bridge.>", "*.control.>"])
async def test_wildcard_subscription_never_delivers_a_control_plane_message(open_pair, ws_factory, nc,
                                                                            pattern):
    a, b = open_pair
    watcher = await ws_factory(a.ws_url)
    other = await ws_factory(b.ws_url)
    await watcher.subscribe(pattern)
    control_traffic = await nc.subscribe("bridge.control.>")
    # Commands fan out over the plane (with connection ids in them); heartbeats flow every 0.2 s.
    await control(b, "POST", f"/clients/{other.connection_id}", {"subjects": ["bridge.probe"]})
    await control(a, "POST", "/clients/AAAAAAAAAAAAAAAAAAAAAA", {"subjects": ["bridge.probe"]})
    await control_traffic.next_msg(TIMEOUT)  # the plane really was busy meanwhile
    marker = "bridge.marker" if pattern != "*.control.>" else "x.control.marker"
    await publish(nc, marker, {"end": True})
    while (frame := await watcher.receive_message())["subject"] != marker:
        assert not frame["subject"].startswith("bridge.control"), frame


async def test_backend_cannot_subscribe_a_client_to_the_control_plane(open_pair, ws_factory):
    a, b = open_pair
    client = await ws_factory(a.ws_url)
    status, answer = await control(b, "POST", f"/clients/{client.connection_id}",
                                   {"subjects": ["bridge.control.>"]})
    assert status == 400 and "not allowed" in answer["message"], answer


async def test_backend_cannot_publish_to_the_control_plane_for_a_client(open_pair, ws_factory):
    a, _ = open_pair
    client = await ws_factory(a.ws_url)
    status, answer = await control(a, "POST", f"/clients/{client.connection_id}",
                                   {"action": "publish", "subject": "bridge.control.users.disconnect",
                                    "data": {"key": "alice"}})
    assert status == 400 and "not allowed" in answer["message"], answer


# ---------------------------------------------------------------------------
# On a three-node cluster, the bridges on different nodes
# ---------------------------------------------------------------------------


@pytest.fixture
async def cluster_pair(cluster, bridge_factory, plane) -> AsyncIterator[dict[str, Any]]:
    """Bridge A on node 0, bridge B on node 1 (JWT on), a backend's NATS client on node 2."""
    a = await bridge_factory(nats_url=cluster[0].url, control_subject=plane, **JWT)
    b = await bridge_factory(nats_url=cluster[1].url, control_subject=plane, **JWT)
    await acquainted(a, b)
    nc = await asyncio.wait_for(nats.connect(cluster[2].url), TIMEOUT)
    try:
        yield {"a": a, "b": b, "nc": nc}
    finally:
        await asyncio.wait_for(nc.close(), TIMEOUT)


async def test_on_a_cluster_post_client_sent_to_b_subscribes_a_client_on_a(cluster_pair, ws_factory):
    a, b, nc = cluster_pair["a"], cluster_pair["b"], cluster_pair["nc"]
    alice = await user(ws_factory, a, "alice")
    status, answer = await control(b, "POST", f"/clients/{alice.connection_id}",
                                   {"subjects": ["public.news"]}, CONTROL)
    assert (status, answer["connections"]) == (200, 1), answer

    async def delivered() -> bool:
        # Interest crosses the routes asynchronously: publish until it arrives.
        await publish(nc, "public.news", {"n": 1})
        try:
            return (await alice.receive_message(timeout=0.2))["subject"] == "public.news"
        except TimeoutError:
            return False

    deadline = time.monotonic() + TIMEOUT
    while not await delivered():
        assert time.monotonic() < deadline, "no message through the cluster"


@pytest.mark.parametrize("which", ["a", "b"])
async def test_on_a_cluster_unknown_connection_id_answers_404_from_either_instance(cluster_pair, which):
    status, answer = await control(cluster_pair[which], "DELETE", "/clients/AAAAAAAAAAAAAAAAAAAAAA",
                                   token=CONTROL)
    assert (status, answer["instances"], answer["missing"]) == (404, 2, [])


async def test_on_a_cluster_delete_user_closes_the_users_connections_on_both_instances(cluster_pair,
                                                                                      ws_factory):
    a, b = cluster_pair["a"], cluster_pair["b"]
    alices = [await user(ws_factory, a, "alice"), await user(ws_factory, b, "alice")]
    status, answer = await control(b, "DELETE", "/users/alice", token=CONTROL)
    assert (status, answer["connections"]) == (200, 2), answer
    for alice in alices:
        assert (await close_of(alice))[0] == 4003


async def test_on_a_cluster_a_backend_on_a_third_node_reaches_both_instances(cluster_pair, ws_factory, plane):
    a, b, nc = cluster_pair["a"], cluster_pair["b"], cluster_pair["nc"]
    await user(ws_factory, a, "alice")
    await user(ws_factory, b, "alice")
    answer = await request(nc, f"{plane}.users.request", {"key": "alice", "body": {"subjects": ["public.x"]}})
    assert (answer["status"], answer["connections"], answer["instances"]) == (200, 2, 2), answer


# ---------------------------------------------------------------------------
# The NATS permissions of docs/security.md, on a real nats-server
# ---------------------------------------------------------------------------


def documented_permissions() -> str:
    text = (ROOT / "docs" / "security.md").read_text()
    block = text.split("<!-- nats-permissions -->")[1].split("<!-- /nats-permissions -->")[0]
    return block.split("```conf")[1].split("```")[0]


@pytest.fixture
def guarded_nats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    conf = tmp_path / "nats.conf"
    conf.write_text(documented_permissions())
    for user in ("bridge", "backend", "app"):
        monkeypatch.setenv(f"{user.upper()}_PASSWORD", f"{user}-password")  # nats-server reads $VARS
    server = NatsServer(extra_args=["-c", str(conf)]).start()
    yield server
    server.stop()


def as_user(server: NatsServer, user: str) -> str:
    return f"nats://{user}:{user}-password@127.0.0.1:{server.port}"


async def test_documented_nats_permissions_let_a_backend_command_the_bridges(guarded_nats, bridge_factory,
                                                                            ws_factory):
    bridge = await bridge_factory(nats_url=as_user(guarded_nats, "bridge"),
                                  subject_allow=("public.>", "user.{sub}.>"))
    client = await ws_factory(bridge.ws_url)
    backend = await asyncio.wait_for(nats.connect(as_user(guarded_nats, "backend")), TIMEOUT)
    app = await asyncio.wait_for(nats.connect(as_user(guarded_nats, "app")), TIMEOUT)
    try:
        answer = await request(backend, "bridge.control.clients.request",
                               {"key": client.connection_id, "body": {"subjects": ["public.news"]}})
        await publish(app, "public.news", {"n": 1})
        frame = await client.receive_message()
    finally:
        await asyncio.wait_for(backend.close(), TIMEOUT)
        await asyncio.wait_for(app.close(), TIMEOUT)
    assert (answer["status"], frame["subject"]) == (200, "public.news")


async def test_documented_nats_permissions_let_a_browser_call_a_service(guarded_nats, bridge_factory,
                                                                        ws_factory):
    bridge = await bridge_factory(nats_url=as_user(guarded_nats, "bridge"), subject_allow=("public.>",),
                                  publish_allow=("user.*.outbox",))
    app = await asyncio.wait_for(nats.connect(as_user(guarded_nats, "app")), TIMEOUT)

    async def service(msg: Any) -> None:
        await msg.respond(b'"done"')

    try:
        await app.subscribe("user.alice.outbox", cb=service)
        await asyncio.wait_for(app.flush(), TIMEOUT)
        client = await ws_factory(bridge.ws_url)
        frame = await client.request({"action": "request", "subject": "user.alice.outbox", "data": 1})
    finally:
        await asyncio.wait_for(app.close(), TIMEOUT)
    assert (frame["success"], frame.get("data")) == (True, "done"), frame


async def test_documented_nats_permissions_keep_other_users_off_the_control_plane(guarded_nats):
    refused: list[str] = []

    async def error_cb(exc: Exception) -> None:
        refused.append(str(exc))

    app = await asyncio.wait_for(nats.connect(as_user(guarded_nats, "app"), error_cb=error_cb), TIMEOUT)
    try:
        await app.publish("bridge.control.users.disconnect", b'{"key": "alice"}')
        await app.subscribe("bridge.control.>")
        await app.flush(TIMEOUT)
        await eventually(lambda: len(refused) >= 2)
    finally:
        await asyncio.wait_for(app.close(), TIMEOUT)
    assert any("publish" in r and "bridge.control.users.disconnect" in r for r in refused), refused
    assert any("subscription" in r and "bridge.control.>" in r for r in refused), refused


async def test_a_bridge_holds_each_control_plane_subscription_once(bridge, nats_server):
    await asyncio.wait_for(bridge.app.nats.client.flush(), TIMEOUT)
    held = sorted(nats_server.subscriptions_of(bridge.name, control_plane=True))
    commands = [f"bridge.control.{each}{target}.{op}" for each in ("", "each.")
                for target in ("clients", "users") for op in ("request", "disconnect")]
    replies = f"bridge.control.replies.{bridge.plane.instance}.*"
    assert held == sorted([*commands, "bridge.control.instances", replies])
