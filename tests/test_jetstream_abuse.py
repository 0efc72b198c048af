"""A hostile NATS publisher or user against the bridge's JetStream side: each attack, as it was made.

- Stored messages are data: forged ``Status``/``Nats-Consumer-Stalled``/``Nats-Last-Consumer``
  headers never make the bridge publish, restart its feed, or stop its history.
- One user cannot use up the JetStream consumers others need.
- History reads never make the bridge's NATS connection a slow consumer.
- A history request costs a bounded number of JetStream API calls.
- Every bad history value gets an error reply.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import nats
import pytest
from conftest import TIMEOUT, NatsServer, eventually
from minting import SECRET, claims, hs256

from bridge.process.metrics import LINK

# ---------------------------------------------------------------------------
# A NATS server with users: the bridge, a sensor allowed one subject, an operator
# ---------------------------------------------------------------------------

SENSOR_SUBJECT = "sensors.dev42.data"


@pytest.fixture
def guarded_js(tmp_path: Path) -> Iterator[NatsServer]:
    conf = tmp_path / "nats.conf"
    conf.write_text(f"""
jetstream {{ store_dir: "{tmp_path / 'js'}" }}
accounts {{
  APP {{
    jetstream: enabled
    users: [
      {{ user: bridge, password: bridge-pw }}
      {{ user: ops, password: ops-pw }}
      # A device: it may publish its own readings and nothing else.
      {{ user: sensor, password: sensor-pw,
         permissions: {{ publish: {{ allow: ["{SENSOR_SUBJECT}"] }},
                         subscribe: {{ allow: ["_INBOX.>"] }} }} }}
    ]
  }}
}}
""")
    server = NatsServer(extra_args=["-c", str(conf)]).start()
    yield server
    server.stop()


def url(server: NatsServer, user: str) -> str:
    return f"nats://{user}:{user}-pw@127.0.0.1:{server.port}"


@pytest.fixture
async def ops(guarded_js: NatsServer) -> AsyncIterator[nats.NATS]:
    nc = await asyncio.wait_for(nats.connect(url(guarded_js, "ops")), TIMEOUT)
    yield nc
    with suppress(Exception):
        await asyncio.wait_for(nc.close(), TIMEOUT)


@pytest.fixture
async def sensor(guarded_js: NatsServer) -> AsyncIterator[nats.NATS]:
    nc = await asyncio.wait_for(nats.connect(url(guarded_js, "sensor")), TIMEOUT)
    yield nc
    with suppress(Exception):
        await asyncio.wait_for(nc.close(), TIMEOUT)


async def api(nc: nats.NATS, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    msg = await nc.request(f"$JS.API.{subject}", json.dumps(body).encode() if body is not None else b"",
                           timeout=TIMEOUT)
    return json.loads(msg.data)


async def streams_for_the_attack(ops: nats.NATS) -> None:
    js = ops.jetstream()
    await js.add_stream(name="SENSORS", subjects=["sensors.>"])
    await js.add_stream(name="BILLING", subjects=["billing.>"])
    for i in range(3):
        await js.publish("billing.invoice", json.dumps({"n": i}).encode())


async def hostile_reading(sensor: nats.NATS, **headers: str) -> None:
    """What the device sends: an HPUB on its own subject, with JetStream's control headers forged."""
    await sensor.publish(SENSOR_SUBJECT, b'{"temp": 21}', headers={"Status": "100", **headers})
    await sensor.flush(TIMEOUT)


@pytest.mark.parametrize("target", ["$JS.API.STREAM.DELETE.BILLING", "$JS.API.STREAM.PURGE.BILLING"])
async def test_forged_stall_header_in_a_stored_message_never_makes_the_bridge_publish(
    guarded_js, ops, sensor, bridge_factory, ws_factory, target
):
    await streams_for_the_attack(ops)
    bridge = await bridge_factory(nats_url=url(guarded_js, "bridge"))
    page = await ws_factory(bridge.ws_url)
    await page.subscribe("sensors.>")
    await hostile_reading(sensor, **{"Nats-Consumer-Stalled": target})
    frame = await page.receive_message()
    # The forged message is what it is: data, headers and all.
    assert (frame["subject"], frame["headers"]["Nats-Consumer-Stalled"]) == (SENSOR_SUBJECT, target)
    # It stays stored: a new feed of the pattern starts with it (the latest stored
    # message), and a feed restart goes through it again.  Make both happen.
    await page.request({"action": "unsubscribe", "subjects": ["sensors.>"]})
    await page.subscribe("sensors.>")
    feed = bridge.manager.registry.topics["sensors.>"].feed
    feed.last_seq -= 1  # as if the poison had not been delivered yet
    feed.restart_soon("test")
    await eventually(lambda: feed._generation > 1)
    await sensor.publish(SENSOR_SUBJECT, b'{"after": true}')
    while (await page.receive_message())["data"] != {"after": True}:
        pass
    info = await api(ops, "STREAM.INFO.BILLING")
    assert info.get("state", {}).get("messages") == 3, info


async def test_forged_last_consumer_header_does_not_freeze_a_stored_pattern(
    guarded_js, ops, sensor, bridge_factory, ws_factory
):
    await streams_for_the_attack(ops)
    bridge = await bridge_factory(nats_url=url(guarded_js, "bridge"))
    page = await ws_factory(bridge.ws_url)
    await page.subscribe("sensors.>")
    await hostile_reading(sensor, **{"Nats-Last-Consumer": "999999", "Description": "Idle Heartbeat"})
    for i in range(5):
        await sensor.publish(SENSOR_SUBJECT, json.dumps({"n": i}).encode())
    await sensor.flush(TIMEOUT)
    got = [await page.receive_message() for _ in range(6)]
    assert [f.get("data") for f in got[1:]] == [{"n": i} for i in range(5)]
    assert [f["seq"] for f in got] == list(range(got[0]["seq"], got[0]["seq"] + 6))
    assert bridge.manager.registry.topics["sensors.>"].feed._generation == 1  # never restarted


async def test_history_goes_on_past_stored_messages_with_status_headers(
    guarded_js, ops, sensor, bridge_factory, ws_factory
):
    await streams_for_the_attack(ops)
    for i in range(8):
        headers = {"Status": "100"} if i % 3 == 0 else {"Status": "404", "Description": "No Messages"} \
            if i % 3 == 1 else None
        await sensor.publish(SENSOR_SUBJECT, json.dumps({"n": i}).encode(), headers=headers)
    await sensor.flush(TIMEOUT)
    await eventually(lambda: True)
    bridge = await bridge_factory(nats_url=url(guarded_js, "bridge"))
    page = await ws_factory(bridge.ws_url)
    reply = await page.request({"action": "subscribe", "subjects": ["sensors.>"], "history": {"last": 8}})
    assert (reply["success"], reply["streams"]["sensors.>"]["history"]) == (True, 8), reply
    got = [await page.receive_message() for _ in range(8)]
    assert [f["data"] for f in got] == [{"n": i} for i in range(8)]
    assert all(f["history"] for f in got)


# ---------------------------------------------------------------------------
# One user cannot use up the consumers others need
# ---------------------------------------------------------------------------


def token(sub: str) -> str:
    return hs256(claims(sub, ttl=600))


@pytest.fixture
async def jsnc(js_server: NatsServer) -> AsyncIterator[nats.NATS]:
    """A NATS connection to the JetStream server, for the test's own streams and messages."""
    nc = await asyncio.wait_for(nats.connect(js_server.url), TIMEOUT)
    yield nc
    with suppress(Exception):
        await asyncio.wait_for(nc.close(), TIMEOUT)


async def new_stream(nc: nats.NATS, **config: Any) -> str:
    """A fresh memory stream on ``<base>.>``; its base subject (its name is the base in capitals)."""
    base = f"c{uuid.uuid4().hex[:8]}"
    answer = await api(nc, f"STREAM.CREATE.{base.upper()}",
                       {"name": base.upper(), "subjects": [f"{base}.>"], "storage": "memory", **config})
    assert "error" not in answer, answer
    return base


async def durable_consumer_made(nc: nats.NATS, stream: str, name: str) -> bool:
    """Can another application of the account still make its durable consumer on ``stream``?"""
    made = await api(nc, f"CONSUMER.CREATE.{stream}.{name}",
                     {"stream_name": stream, "config": {"durable_name": name, "ack_policy": "explicit"}})
    return "error" not in made


async def test_one_user_cannot_take_the_consumers_another_user_and_another_app_need(
    js_server, jsnc, bridge_factory, ws_factory
):
    base = await new_stream(jsnc, max_consumers=50)
    js = jsnc.jetstream()
    for i in range(5):
        await js.publish(f"{base}.bob", json.dumps({"n": i}).encode())
    bridge = await bridge_factory(nats_url=js_server.url, jwt_secret=SECRET, max_stored_subjects_per_user=20)
    # Alice: five connections, twenty distinct stored subjects each.
    refusals = []
    for c in range(5):
        alice = await ws_factory(f"{bridge.ws_url}?token={token('alice')}")
        reply = await alice.request({"subjects": [f"{base}.a{c}x{i}" for i in range(20)]})
        if not reply["success"]:
            refusals.append(reply["message"])
    assert len(refusals) == 4
    assert all("MAX_STORED_SUBJECTS_PER_USER" in m for m in refusals), refusals
    # Bob still reads history, and follows with sequences.
    bob = await ws_factory(f"{bridge.ws_url}?token={token('bob')}")
    reply = await bob.request({"subjects": [f"{base}.bob"], "history": {"last": 5}})
    assert (reply["success"], reply["streams"][f"{base}.bob"]["history"]) == (True, 5), reply
    assert [(await bob.receive_message())["data"] for _ in range(5)] == [{"n": i} for i in range(5)]
    ack = await js.publish(f"{base}.bob", b'{"live": true}')
    assert (await bob.receive_message())["seq"] == ack.seq
    # And another application still makes its durable consumer.
    assert await durable_consumer_made(jsnc, base.upper(), "worker")


async def test_past_a_streams_share_of_consumers_a_subscribe_is_refused_in_words(
    js_server, jsnc, bridge_factory, ws_factory
):
    base = await new_stream(jsnc, max_consumers=10)
    name = base.upper()
    bridge = await bridge_factory(nats_url=js_server.url)
    client = await ws_factory(bridge.ws_url)
    # 80% of the stream's 10 consumers may be live feeds: 8.
    assert (await client.request({"subjects": [f"{base}.s{i}" for i in range(8)]}))["success"]
    reply = await client.request({"subjects": [f"{base}.one.more"], "id": 9})
    assert (reply["success"], reply["id"]) == (False, 9)
    assert f"stream {name} has 8 of its 10 consumers in use" in reply["message"], reply
    assert f"{base}.one.more" not in bridge.manager.registry.topics  # never quietly without sequences
    # The connection carries on, and another app still has its consumers.
    assert (await client.request({"subjects": ["not.stored.here"]}))["success"]
    assert await durable_consumer_made(jsnc, name, "app")


async def test_one_connection_follows_at_most_max_stored_subjects(
    js_server, jsnc, bridge_factory, ws_factory
):
    base = await new_stream(jsnc)
    bridge = await bridge_factory(nats_url=js_server.url, max_stored_subjects=3)
    client = await ws_factory(bridge.ws_url)
    assert (await client.request({"subjects": [f"{base}.{i}" for i in range(3)]}))["success"]
    reply = await client.request({"subjects": [f"{base}.x"]})
    assert not reply["success"] and "MAX_STORED_SUBJECTS" in reply["message"]
    assert (await client.request({"subjects": ["plain.core.subject"]}))["success"]


# ---------------------------------------------------------------------------
# What a history request costs
# ---------------------------------------------------------------------------


async def count_api_calls(nc: nats.NATS) -> tuple[list[str], Any]:
    seen: list[str] = []

    async def note(msg: Any) -> None:
        seen.append(msg.subject)

    sub = await nc.subscribe("$JS.API.>", cb=note)
    await nc.flush(TIMEOUT)
    return seen, sub


@pytest.mark.parametrize("followed", [False, True], ids=["new-subjects", "followed-subjects"])
async def test_fifty_subject_last_one_history_costs_at_most_100_jetstream_api_calls(
    js_server, bridge_factory, ws_factory, followed
):
    base = f"c{uuid.uuid4().hex[:8]}"
    nc = await asyncio.wait_for(nats.connect(js_server.url), TIMEOUT)
    try:
        js = nc.jetstream()
        await js.add_stream(name=base.upper(), subjects=[f"{base}.>"])
        subjects = [f"{base}.s{i}" for i in range(50)]
        for round_ in range(4):
            for s in subjects:
                await js.publish(s, json.dumps({"r": round_}).encode())
        bridge = await bridge_factory(nats_url=js_server.url, max_stored_subjects=50)
        if followed:
            other = await ws_factory(bridge.ws_url)
            await other.request({"subjects": subjects})
        client = await ws_factory(bridge.ws_url)
        seen, sub = await count_api_calls(nc)
        reply = await client.request({"subjects": subjects, "history": {"last": 1}}, timeout=30)
        assert reply["success"], reply
        got = [await client.receive_message() for _ in range(50)]
        await asyncio.sleep(0.5)  # background clean-ups are part of the cost
        await sub.unsubscribe()
    finally:
        await asyncio.wait_for(nc.close(), TIMEOUT)
    assert sorted(f["subject"] for f in got) == sorted(subjects)
    assert all(f["data"] == {"r": 3} and f["history"] for f in got)
    print(f"50 subjects, last 1, {'followed' if followed else 'new'}: {len(seen)} JetStream API calls")
    assert len(seen) <= 100, (len(seen), sorted(set(seen))[:10])


async def test_last_n_history_finds_its_start_in_a_few_readers(js_server, bridge_factory, ws_factory):
    base = f"c{uuid.uuid4().hex[:8]}"
    nc = await asyncio.wait_for(nats.connect(js_server.url), TIMEOUT)
    try:
        js = nc.jetstream()
        await js.add_stream(name=base.upper(), subjects=[f"{base}.>"])
        for i in range(3000):  # one subject in seven is ours
            await js.publish(f"{base}.{'mine' if i % 7 == 0 else 'other'}", json.dumps({"i": i}).encode())
        bridge = await bridge_factory(nats_url=js_server.url)
        client = await ws_factory(bridge.ws_url)
        seen, sub = await count_api_calls(nc)
        reply = await client.request({"subjects": [f"{base}.mine"], "history": {"last": 25}})
        got = [(await client.receive_message())["data"]["i"] for _ in range(25)]
        await asyncio.sleep(0.5)
        await sub.unsubscribe()
    finally:
        await asyncio.wait_for(nc.close(), TIMEOUT)
    assert reply["streams"][f"{base}.mine"]["history"] == 25
    assert got == [i for i in range(3000) if i % 7 == 0][-25:]
    # Bisecting the 3000 sequences took 9 readers (each made and deleted); the density guess, two or three.
    readers = [s for s in seen if ".CONSUMER.CREATE." in s][1:]  # the first is the live feed
    assert len(readers) <= 4, seen


# ---------------------------------------------------------------------------
# Every bad history value gets an error reply
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("history", [
    {"since": "0001-01-01T00:00:00+14:00"},
    {"since": "9999-12-31T23:59:59-14:00"},
    {"after_seq": 2**64},
    {"after_seq": -1},
    {"after_seq": 1.5},
    {"last": 10**30},
    {"since": 12},
    {"last_per_subject": "yes"},
])
async def test_every_bad_history_value_gets_an_error_reply(js_server, bridge_factory, ws_factory, history):
    base = f"c{uuid.uuid4().hex[:8]}"
    nc = await asyncio.wait_for(nats.connect(js_server.url), TIMEOUT)
    try:
        await nc.jetstream().add_stream(name=base.upper(), subjects=[f"{base}.>"])
    finally:
        await asyncio.wait_for(nc.close(), TIMEOUT)
    bridge = await bridge_factory(nats_url=js_server.url)
    client = await ws_factory(bridge.ws_url)
    reply = await client.request({"subjects": [f"{base}.x"], "history": history, "id": 1})
    assert (reply["success"], reply["id"]) == (False, 1), reply
    assert (await client.request({"subjects": [f"{base}.y"]}))["success"]  # still connected


# ---------------------------------------------------------------------------
# History of large messages never cuts the bridge's NATS link
# ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_history_flood_of_large_messages_loses_nothing_for_a_healthy_client(
    js_server, bridge_factory, ws_factory
):
    base = f"c{uuid.uuid4().hex[:8]}"
    nc = await asyncio.wait_for(nats.connect(js_server.url), TIMEOUT)
    try:
        js = nc.jetstream()
        await js.add_stream(name=base.upper(), subjects=[f"{base}.>"], storage="memory")
        pad = "x" * (60 * 1024)
        for i in range(300):
            await js.publish(f"{base}.big", json.dumps({"i": i, "pad": pad}).encode())
        bridge = await bridge_factory(nats_url=js_server.url)
        healthy = await ws_factory(bridge.ws_url)
        await healthy.subscribe(f"{base}.tick")
        readers = [await ws_factory(bridge.ws_url, max_msg_size=0) for _ in range(10)]

        async def read_history(client: Any) -> int:
            got = 0
            for _ in range(3):
                reply = await client.request({"subjects": [f"{base}.big"], "history": {"last": 300}},
                                             timeout=60)
                assert reply["success"], reply
                round_ = 0
                while round_ < 300:
                    round_ += bool((await client.receive(60)).get("history"))
                got += round_
                await client.request({"action": "unsubscribe", "subjects": [f"{base}.big"]}, timeout=60)
            return got

        flood = asyncio.gather(*(read_history(c) for c in readers))
        published = 0
        while not flood.done():
            await nc.publish(f"{base}.tick", json.dumps({"n": published}).encode())
            published += 1
            await asyncio.sleep(0.005)
        assert await flood == [900] * 10
        await nc.flush(TIMEOUT)
        got = [(await healthy.receive_message())["data"]["n"] for _ in range(published)]
    finally:
        await asyncio.wait_for(nc.close(), TIMEOUT)
    assert got == list(range(published))
    assert bridge.app.http_server.web_app[LINK].nats_reconnects == 0


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


@pytest.mark.slow
async def test_memory_comes_back_down_after_a_history_flood(js_server, bridge_process, ws_factory):
    base = f"c{uuid.uuid4().hex[:8]}"
    nc = await asyncio.wait_for(nats.connect(js_server.url), TIMEOUT)
    try:
        js = nc.jetstream()
        await js.add_stream(name=base.upper(), subjects=[f"{base}.>"], storage="memory")
        pad = "x" * (60 * 1024)
        for i in range(300):
            await js.publish(f"{base}.big", json.dumps({"i": i, "pad": pad}).encode())
    finally:
        await asyncio.wait_for(nc.close(), TIMEOUT)
    bridge = bridge_process(env={"NATS_URL": js_server.url, "TEST_PUBLISH_INTERVAL": "0",
                                 "LOG_LEVEL": "WARNING"})
    url = f"ws://127.0.0.1:{bridge.port}/stream"
    idle = rss_mib(bridge.proc.pid)
    readers = [await ws_factory(url, max_msg_size=0) for _ in range(10)]

    async def read_history(client: Any) -> None:
        for _ in range(3):
            await client.request({"subjects": [f"{base}.big"], "history": {"last": 300}}, timeout=60)
            got = 0
            while got < 300:
                got += bool((await client.receive(60)).get("history"))
            await client.request({"action": "unsubscribe", "subjects": [f"{base}.big"]}, timeout=60)

    await asyncio.gather(*(read_history(c) for c in readers))
    # Given back within a trim interval or two (bridge/process/memory.py).
    await eventually(lambda: rss_mib(bridge.proc.pid) < idle + 25, timeout=30, interval=1)
