"""History and loss-free resume from JetStream, on a real nats-server with JetStream on.

Each test makes its own stream over its own subjects, publishes through
JetStream (so it knows every sequence), and checks the exact sequences a
client receives: history oldest first, then live, none missing, none twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

import nats
import pytest
from conftest import TIMEOUT, NatsServer, StalledWebSocket, eventually, free_port
from minting import SECRET, claims, hs256

from bridge.core.history import HistoryError, parse_history
from bridge.jetstream.api import stream_sequence

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


@pytest.fixture
async def stream(js) -> dict[str, Any]:
    """A fresh stream storing ``<base>.>``; its name and base subject."""
    base = f"h{uuid.uuid4().hex[:10]}"
    name = base.upper()
    await js.add_stream(name=name, subjects=[f"{base}.>"])
    return {"name": name, "base": base}


@pytest.fixture
async def jbridge(js_server, bridge_factory) -> Any:
    return await bridge_factory(nats_url=js_server.url)


async def store(js: Any, subject: str, n: int, tag: str = "m") -> list[int]:
    """Publish ``n`` messages through JetStream; their stream sequences."""
    seqs = []
    for i in range(n):
        ack = await js.publish(subject, json.dumps({"tag": tag, "i": i}).encode())
        seqs.append(ack.seq)
    return seqs


async def epoch_of(js: Any, name: str) -> str:
    """The stream's creation time, as JetStream's API gives it (nats-py's StreamInfo leaves it out)."""
    msg = await js._nc.request(f"$JS.API.STREAM.INFO.{name}", b"", timeout=TIMEOUT)
    return json.loads(msg.data)["created"]


async def messages(client: Any, n: int, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    return [await client.receive_message(timeout) for _ in range(n)]


async def subscribe_with(client: Any, subject: str, history: Any) -> dict[str, Any]:
    return await client.request({"action": "subscribe", "subjects": [subject], "history": history})


# ---------------------------------------------------------------------------
# parse_history, directly
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    {"last": 0}, {"last": 1001}, {"last": "5"}, {"last": True}, {"since": "yesterday"},
    {"since": "2026-01-01T00:00:00"}, {"last_per_subject": 1}, {"after_seq": -1},
    {"after_seq": 1, "epoch": 5}, {"last": 1, "since": "2026-01-01T00:00:00Z"}, {}, [], "last",
    {"last": 1, "epoch": "e"}, {"after": 3},
])
def test_parse_history_refuses_what_is_not_one_valid_mode(value):
    with pytest.raises(HistoryError):
        parse_history(value, 1000)


def test_parse_history_reads_each_mode():
    assert parse_history({"last": 3}, 1000).last == 3
    assert parse_history({"since": "2026-01-31T12:00:00+01:00"}, 1000).since == dt.datetime(
        2026, 1, 31, 11, tzinfo=dt.UTC)
    assert parse_history({"last_per_subject": True}, 1000).mode == "last_per_subject"
    resume = parse_history({"after_seq": 7, "epoch": "E"}, 1000)
    assert (resume.after_seq, resume.epoch) == (7, "E")


def test_stream_sequence_reads_both_ack_subject_forms():
    assert stream_sequence("$JS.ACK.S.C.1.42.7.1700000000000000000.0") == (42, 7)
    assert stream_sequence("$JS.ACK.dom.acchash.S.C.1.42.7.1700000000000000000.0.tok") == (42, 7)
    assert stream_sequence("_INBOX.abc") is None


# ---------------------------------------------------------------------------
# Live messages of stored subjects carry their sequence
# ---------------------------------------------------------------------------


async def test_live_message_on_a_stored_subject_carries_its_stream_sequence(jbridge, ws_factory, js, stream):
    client = await ws_factory(jbridge.ws_url)
    await client.subscribe(f"{stream['base']}.live")
    [seq] = await store(js, f"{stream['base']}.live", 1)
    frame = await client.receive_message()
    assert (frame["seq"], "history" in frame) == (seq, False)


async def test_live_message_on_an_unstored_subject_has_no_sequence(jbridge, ws_factory, js):
    client = await ws_factory(jbridge.ws_url)
    subject = f"plain{uuid.uuid4().hex[:8]}.x"
    await client.subscribe(subject)
    await js._nc.publish(subject, b"1")
    assert "seq" not in await client.receive_message()


async def test_subscribe_reply_names_stream_and_epoch_of_a_stored_subject(jbridge, ws_factory, js, stream):
    client = await ws_factory(jbridge.ws_url)
    reply = await client.subscribe(f"{stream['base']}.x")
    [seq] = await store(js, f"{stream['base']}.other", 1)
    epoch = await epoch_of(js, stream["name"])
    expected = {"stream": stream["name"], "epoch": epoch, "last_seq": 0}
    assert reply["streams"] == {f"{stream['base']}.x": expected}
    second = await ws_factory(jbridge.ws_url)
    again = await second.subscribe(f"{stream['base']}.>")
    assert again["streams"][f"{stream['base']}.>"]["last_seq"] == seq


# ---------------------------------------------------------------------------
# Each history mode, with exact sequences
# ---------------------------------------------------------------------------


async def test_last_n_sends_the_n_most_recent_oldest_first(jbridge, ws_factory, js, stream):
    seqs = await store(js, f"{stream['base']}.a", 10)
    client = await ws_factory(jbridge.ws_url)
    reply = await subscribe_with(client, f"{stream['base']}.a", {"last": 4})
    assert reply["streams"][f"{stream['base']}.a"]["history"] == 4
    got = await messages(client, 4)
    assert [f["seq"] for f in got] == seqs[-4:]
    assert all(f["history"] is True for f in got)


async def test_last_n_on_a_wildcard_skips_other_subjects_of_the_stream(jbridge, ws_factory, js, stream):
    base = stream["base"]
    a = await store(js, f"{base}.a.1", 3)
    await store(js, f"{base}.b", 5)
    a += await store(js, f"{base}.a.2", 2)
    await store(js, f"{base}.b", 5)
    client = await ws_factory(jbridge.ws_url)
    await subscribe_with(client, f"{base}.a.*", {"last": 4})
    assert [f["seq"] for f in await messages(client, 4)] == a[-4:]


async def test_last_n_with_fewer_stored_sends_all(jbridge, ws_factory, js, stream):
    seqs = await store(js, f"{stream['base']}.few", 2)
    client = await ws_factory(jbridge.ws_url)
    reply = await subscribe_with(client, f"{stream['base']}.few", {"last": 50})
    assert reply["streams"][f"{stream['base']}.few"]["history"] == 2
    assert [f["seq"] for f in await messages(client, 2)] == seqs


async def test_since_sends_every_message_from_that_time(jbridge, ws_factory, js, stream):
    await store(js, f"{stream['base']}.t", 3, tag="before")
    await asyncio.sleep(1.1)
    since = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
    await asyncio.sleep(0.1)
    after = await store(js, f"{stream['base']}.t", 3, tag="after")
    client = await ws_factory(jbridge.ws_url)
    await subscribe_with(client, f"{stream['base']}.t", {"since": since})
    assert [f["seq"] for f in await messages(client, 3)] == after
    await client.assert_silent(0.3)


async def test_last_per_subject_sends_the_latest_of_each_subject(jbridge, ws_factory, js, stream):
    base = stream["base"]
    latest = {}
    for round_ in range(3):
        for sensor in ("s1", "s2", "s3"):
            [latest[sensor]] = await store(js, f"{base}.sensor.{sensor}", 1, tag=str(round_))
    client = await ws_factory(jbridge.ws_url)
    reply = await subscribe_with(client, f"{base}.sensor.*", {"last_per_subject": True})
    assert reply["streams"][f"{base}.sensor.*"]["history"] == 3
    got = await messages(client, 3)
    assert {f["subject"].rsplit(".", 1)[1]: f["seq"] for f in got} == latest
    assert [f["seq"] for f in got] == sorted(latest.values())


async def test_after_seq_sends_exactly_the_messages_after_it(jbridge, ws_factory, js, stream):
    seqs = await store(js, f"{stream['base']}.r", 8)
    epoch = await epoch_of(js, stream["name"])
    client = await ws_factory(jbridge.ws_url)
    reply = await subscribe_with(client, f"{stream['base']}.r", {"after_seq": seqs[4], "epoch": epoch})
    assert (reply["recovered"], reply["streams"][f"{stream['base']}.r"]["history"]) == (True, 3)
    assert [f["seq"] for f in await messages(client, 3)] == seqs[5:]


async def test_history_then_live_with_no_gap_and_no_duplicate(jbridge, ws_factory, js, stream):
    subject = f"{stream['base']}.hl"
    seqs = await store(js, subject, 5)
    client = await ws_factory(jbridge.ws_url)
    await subscribe_with(client, subject, {"last": 3})
    seqs += await store(js, subject, 3, tag="live")
    got = await messages(client, 6)
    assert [f["seq"] for f in got] == seqs[-6:]
    assert [f.get("history", False) for f in got] == [True] * 3 + [False] * 3
    await client.assert_silent(0.3)


# ---------------------------------------------------------------------------
# Resume after being away
# ---------------------------------------------------------------------------


async def test_client_away_while_1000_published_resumes_with_exactly_those_then_live(
    jbridge, ws_factory, js, stream
):
    subject = f"{stream['base']}.away"
    first = await ws_factory(jbridge.ws_url)
    reply = await first.subscribe(subject)
    epoch = reply["streams"][subject]["epoch"]
    [last_seen] = await store(js, subject, 1)
    assert (await first.receive_message())["seq"] == last_seen
    await first.close()
    missed = await store(js, subject, 1000, tag="away")
    second = await ws_factory(jbridge.ws_url)
    reply = await subscribe_with(second, subject, {"after_seq": last_seen, "epoch": epoch})
    assert reply["recovered"] is True
    live = await store(js, subject, 5, tag="live")
    got = [f["seq"] for f in await messages(second, 1005)]
    assert got == missed + live
    await second.assert_silent(0.3)


def publish_in_a_thread(url: str, subject: str, stop: threading.Event) -> int:
    """Publish about 10,000 messages a second, from another thread with its own event loop (so the
    bridge under test, in this process's loop, does not pace it); how many were published."""

    async def run() -> int:
        nc = await nats.connect(url)
        n = 0
        while not stop.is_set():
            await nc.publish(subject, json.dumps({"n": n}).encode())
            n += 1
            if n % 20 == 0:
                await nc.flush()
                await asyncio.sleep(0.001)
        await nc.flush()
        await nc.close()
        return n

    return asyncio.run(run())


async def test_publishing_during_the_catch_up_misses_nothing_and_doubles_nothing(
    js_server, bridge_factory, ws_factory, js, stream
):
    jbridge = await bridge_factory(nats_url=js_server.url, max_history=20_000)
    subject = f"{stream['base']}.busy"
    [start] = await store(js, subject, 1)
    stop = threading.Event()
    publisher = asyncio.create_task(asyncio.to_thread(publish_in_a_thread, js_server.url, subject, stop))
    try:
        await asyncio.sleep(0.1)
        client = await ws_factory(jbridge.ws_url)
        reply = await subscribe_with(client, subject, {"after_seq": start})
        assert reply["recovered"] is True, reply
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.wait_for(publisher, TIMEOUT)
    last = (await js.stream_info(stream["name"])).state.last_seq
    expected = list(range(start + 1, last + 1))
    got = [f["seq"] for f in await messages(client, len(expected), timeout=30)]
    assert got == expected
    await client.assert_silent(0.3)


async def test_second_client_on_the_subject_sees_no_extra_message(jbridge, ws_factory, js, stream):
    subject = f"{stream['base']}.two"
    await store(js, subject, 5)
    plain = await ws_factory(jbridge.ws_url)
    await plain.subscribe(subject)
    with_history = await ws_factory(jbridge.ws_url)
    await subscribe_with(with_history, subject, {"last": 5})
    [live] = await store(js, subject, 1)
    assert [f["seq"] for f in await messages(plain, 1)] == [live]
    await plain.assert_silent(0.3)
    assert len(await messages(with_history, 6)) == 6


async def test_resume_from_a_purged_stream_is_not_recovered_and_live_flows(jbridge, ws_factory, js, stream):
    subject = f"{stream['base']}.purged"
    seqs = await store(js, subject, 5)
    epoch = await epoch_of(js, stream["name"])
    await js.purge_stream(stream["name"])
    await store(js, f"{stream['base']}.other", 1)
    client = await ws_factory(jbridge.ws_url)
    reply = await subscribe_with(client, subject, {"after_seq": seqs[1], "epoch": epoch})
    after = await js.stream_info(stream["name"])
    assert (reply["success"], reply["recovered"], reply["first_seq"]) == (True, False, after.state.first_seq)
    [live] = await store(js, subject, 1)
    assert (await client.receive_message())["seq"] == live


async def test_resume_from_a_recreated_stream_is_not_recovered(jbridge, ws_factory, js, stream):
    subject = f"{stream['base']}.again"
    seqs = await store(js, subject, 5)
    old = await epoch_of(js, stream["name"])
    await js.delete_stream(stream["name"])
    await asyncio.sleep(0.01)  # a different creation time
    await js.add_stream(name=stream["name"], subjects=[f"{stream['base']}.>"])
    await store(js, subject, 5)
    client = await ws_factory(jbridge.ws_url)
    reply = await subscribe_with(client, subject, {"after_seq": seqs[1], "epoch": old})
    assert (reply["recovered"], reply["streams"][subject]["history"]) == (False, 0)
    [live] = await store(js, subject, 1)
    assert (await client.receive_message())["seq"] == live


async def test_resume_needing_more_than_max_history_is_not_recovered(
    js_server, bridge_factory, ws_factory, js, stream
):
    bridge = await bridge_factory(nats_url=js_server.url, max_history=10)
    subject = f"{stream['base']}.many"
    seqs = await store(js, subject, 11)
    client = await ws_factory(bridge.ws_url)
    reply = await subscribe_with(client, subject, {"after_seq": seqs[0] - 1})
    assert reply["recovered"] is False
    [live] = await store(js, subject, 1)
    assert (await client.receive_message())["seq"] == live


async def test_plain_after_seq_after_a_gap_sends_what_is_left(jbridge, ws_factory, js, stream):
    subject = f"{stream['base']}.left"
    seqs = await store(js, subject, 4)
    client = await ws_factory(jbridge.ws_url)
    reply = await subscribe_with(client, subject, {"after_seq": 0})
    assert (reply["recovered"], reply["streams"][subject]["history"]) == (True, 4)
    assert [f["seq"] for f in await messages(client, 4)] == seqs


# ---------------------------------------------------------------------------
# What is not stored, and what may not be read
# ---------------------------------------------------------------------------


async def test_history_on_a_subject_no_stream_stores_fails_as_a_whole(jbridge, ws_factory, stream):
    client = await ws_factory(jbridge.ws_url)
    unstored = f"nostream{uuid.uuid4().hex[:6]}.x"
    reply = await client.request({"action": "subscribe", "history": {"last": 1},
                                  "subjects": [f"{stream['base']}.ok", unstored]})
    assert reply["success"] is False
    assert reply["message"] == f"no stream stores {unstored!r}: it has no history"
    assert not jbridge.manager.sessions[client.connection_id].subscriptions


async def test_pattern_only_partly_inside_a_stream_has_no_history(jbridge, ws_factory, js):
    base = f"p{uuid.uuid4().hex[:8]}"
    await js.add_stream(name=base.upper(), subjects=[f"{base}.stored"])
    client = await ws_factory(jbridge.ws_url)
    reply = await subscribe_with(client, f"{base}.*", {"last": 1})
    assert reply["success"] is False and "no stream stores" in reply["message"]


async def test_last_over_max_history_is_refused(jbridge, ws_factory, stream):
    client = await ws_factory(jbridge.ws_url)
    reply = await subscribe_with(client, f"{stream['base']}.x", {"last": 1001})
    assert reply["success"] is False and "MAX_HISTORY" in reply["message"]


async def test_history_obeys_the_users_denied_subjects(js_server, bridge_factory, ws_factory, js, stream):
    base = stream["base"]
    bridge = await bridge_factory(nats_url=js_server.url, jwt_secret=SECRET)
    await store(js, f"{base}.open", 2)
    await store(js, f"{base}.secret", 2)
    token = hs256(claims("alice", nats={"sub": {"deny": [f"{base}.secret"]}}))
    client = await ws_factory(bridge.ws_url, headers={"Authorization": f"Bearer {token}"})
    await subscribe_with(client, f"{base}.>", {"last": 4})
    got = await messages(client, 2)
    assert {f["subject"] for f in got} == {f"{base}.open"}
    await client.assert_silent(0.3)


# ---------------------------------------------------------------------------
# A slow consumer during a large history
# ---------------------------------------------------------------------------


async def test_history_waits_for_a_client_that_stops_reading_and_others_are_unaffected(
    js_server, bridge_factory, ws_factory, js, stream
):
    subject = f"{stream['base']}.big"
    bridge = await bridge_factory(nats_url=js_server.url, client_queue_messages=64)
    big = json.dumps({"pad": "x" * (32 * 1024)})
    for _ in range(500):
        await js.publish(subject, big.encode())
    healthy = await ws_factory(bridge.ws_url)
    await healthy.subscribe(subject)
    stalled = await StalledWebSocket.connect(bridge.port)
    try:
        await stalled.send_json({"subjects": [subject], "history": {"last": 500}})
        # Paced by the client: what it has not taken waits in its own queue, bounded, and
        # the reading stops there rather than filling the bridge's memory.
        clients = bridge.manager.sessions
        stalled_client = await eventually(
            lambda: next((c for i, c in clients.items() if i != healthy.connection_id), None))
        await eventually(lambda: len(stalled_client.outbox._queue) > 0)
        await asyncio.sleep(1)
        assert len(stalled_client.outbox._queue) <= 64
        assert bridge.manager.stats.slow_consumer_disconnects == 0
        assert stalled_client.outbox.sent < 500
        [live] = await store(js, subject, 1, tag="after")
        assert (await healthy.receive_message())["seq"] == live
        # Live messages held back behind its history pile up past its queue bound: then it is closed.
        await store(js, subject, 70, tag="pile")
        await eventually(lambda: bridge.manager.stats.slow_consumer_disconnects == 1, timeout=TIMEOUT)
        await eventually(lambda: len(bridge.manager.sessions) == 1, timeout=TIMEOUT)
        assert len(await messages(healthy, 70)) == 70
    finally:
        stalled.close()


# ---------------------------------------------------------------------------
# The live feed survives losing its consumer, and a cluster node
# ---------------------------------------------------------------------------


@pytest.mark.slow  # waits for the watchdog (two missed heartbeats)
async def test_live_feed_recovers_every_message_after_its_consumer_is_deleted(
    jbridge, ws_factory, js, stream
):
    subject = f"{stream['base']}.lost"
    client = await ws_factory(jbridge.ws_url)
    await client.subscribe(subject)
    [first] = await store(js, subject, 1)
    assert (await client.receive_message())["seq"] == first
    feed = jbridge.manager.registry.topics[subject].feed
    await js._jsm.delete_consumer(stream["name"], feed._consumer)
    missed = await store(js, subject, 5, tag="while-lost")
    got = [f["seq"] for f in await messages(client, 5, timeout=30)]
    assert got == missed


def js_cluster_nodes(store: str) -> list[NatsServer]:
    route_ports = [free_port() for _ in range(3)]
    nodes = []
    for i, port in enumerate(route_ports):
        routes = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(route_ports) if j != i)
        nodes.append(NatsServer(extra_args=[
            "-js", "-sd", f"{store}/node{i}", "--cluster", f"nats://127.0.0.1:{port}", "--routes", routes,
            "--cluster_name", "jstest", "--name", f"jsnode{i}",
        ]))
    return nodes


@pytest.fixture
async def js_cluster() -> AsyncIterator[list[NatsServer]]:
    with tempfile.TemporaryDirectory() as store:
        nodes = js_cluster_nodes(store)
        try:
            for node in nodes:
                await asyncio.wait_for(asyncio.to_thread(node.start), 30)
            yield nodes
        finally:
            for node in nodes:
                await asyncio.wait_for(asyncio.to_thread(node.stop), 30)


async def js_ready(url: str, name: str, subjects: list[str]) -> tuple[Any, Any]:
    """Connect and make an R3 stream once the JetStream cluster has a leader."""
    deadline = time.monotonic() + 30
    while True:
        nc = await asyncio.wait_for(nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2),
                                    TIMEOUT)
        js = nc.jetstream()
        try:
            await js.add_stream(name=name, subjects=subjects, num_replicas=3)
            return nc, js
        except Exception:
            await nc.close()
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


@pytest.mark.slow  # a three-node JetStream cluster
async def test_bridge_moving_to_another_cluster_node_keeps_the_live_sequence_intact(
    js_cluster, bridge_factory, ws_factory
):
    base = f"c{uuid.uuid4().hex[:8]}"
    subject = f"{base}.x"
    bridge = await bridge_factory(nats_url=",".join(n.url for n in js_cluster), nats_reconnect_wait=0.2)
    home = next(n for n in js_cluster
                if any(c.get("name", "").startswith(bridge.name)
                       for c in n.monitor("/connz").get("connections") or []))
    other = next(n for n in js_cluster if n is not home)
    nc, js = await js_ready(other.url, base.upper(), [f"{base}.>"])
    try:
        client = await ws_factory(bridge.ws_url)
        await client.subscribe(subject)
        published: list[int] = []
        published += await store(js, subject, 5, tag="before")
        home.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(asyncio.to_thread(home.proc.wait), TIMEOUT)
        deadline = time.monotonic() + 30
        while len(published) < 40 and time.monotonic() < deadline:
            with suppress(Exception):
                published += await store(js, subject, 1, tag="after")
            await asyncio.sleep(0.05)
        got = [f["seq"] for f in await messages(client, len(published), timeout=30)]
        assert got == published
        await client.assert_silent(0.5)
    finally:
        with suppress(Exception):
            await asyncio.wait_for(nc.close(), TIMEOUT)
