"""Subscriptions: per-client sets, one shared NATS subscription per pattern, release on any end.

What NATS holds is read from nats-server's own monitoring endpoint
(``nats_server.subscriptions_of``), not from the bridge's bookkeeping.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

from conftest import eventually, nats_synced, publish, unique


def count_of(nats_server: Any, bridge: Any, subject: str) -> int:
    """How many subscriptions nats-server says the bridge holds on ``subject``."""
    return nats_server.subscriptions_of(bridge.name).count(subject)


async def receive_until(client: Any, last_subject: str) -> list[str]:
    """Subjects of the messages ``client`` receives, up to and including ``last_subject``."""
    subjects = []
    while True:
        frame = await client.receive_message()
        subjects.append(frame["subject"])
        if frame["subject"] == last_subject:
            return subjects


def reset_connection(client: Any) -> None:
    """Tear the client's TCP connection down with an RST, no close frame, no FIN."""
    transport = client.ws._response.connection.transport
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


# ---------------------------------------------------------------------------
# Unsubscribe touches only that client
# ---------------------------------------------------------------------------


async def test_other_client_still_receives_after_one_unsubscribes(bridge, ws_factory, nc):
    stays, leaves = await ws_factory(bridge.ws_url), await ws_factory(bridge.ws_url)
    subject = unique()
    await stays.subscribe(subject)
    await leaves.subscribe(subject)
    await leaves.request({"subjects": [subject], "action": "unsubscribe"})
    await nats_synced(bridge)
    await publish(nc, subject, {"n": 1})
    frame = await stays.receive_message()
    assert (frame["subject"], frame["data"]) == (subject, {"n": 1})


async def test_unsubscribing_client_no_longer_receives_shared_subject(bridge, ws_factory, nc):
    stays, leaves = await ws_factory(bridge.ws_url), await ws_factory(bridge.ws_url)
    subject = unique()
    await stays.subscribe(subject)
    await leaves.subscribe(subject)
    await leaves.request({"subjects": [subject], "action": "unsubscribe"})
    await nats_synced(bridge)
    await publish(nc, subject, {"n": 1})
    # Once the other client has it, a frame for this one would have been queued too.
    await stays.receive_message()
    await leaves.assert_silent()


async def test_unsubscribe_by_one_client_keeps_shared_nats_subscription(
    bridge, ws_factory, nats_server
):
    stays, leaves = await ws_factory(bridge.ws_url), await ws_factory(bridge.ws_url)
    subject = unique()
    await stays.subscribe(subject)
    await leaves.subscribe(subject)
    await leaves.request({"subjects": [subject], "action": "unsubscribe"})
    await nats_synced(bridge)
    assert count_of(nats_server, bridge, subject) == 1


async def test_last_unsubscribe_removes_nats_subscription(bridge, ws_factory, nats_server):
    client = await ws_factory(bridge.ws_url)
    subject = unique()
    await client.subscribe(subject)
    await nats_synced(bridge)
    assert count_of(nats_server, bridge, subject) == 1
    await client.request({"subjects": [subject], "action": "unsubscribe"})
    await nats_synced(bridge)
    assert count_of(nats_server, bridge, subject) == 0


async def test_subscribing_twice_then_unsubscribing_once_releases_subject(
    bridge, ws_factory, nats_server
):
    client = await ws_factory(bridge.ws_url)
    subject = unique()
    await client.subscribe(subject)
    await client.subscribe(subject, subject)
    frame = await client.request({"subjects": [subject], "action": "unsubscribe"})
    assert frame["success"] is True
    await nats_synced(bridge)
    assert count_of(nats_server, bridge, subject) == 0


async def test_duplicate_subscribe_delivers_each_message_once(bridge, ws_factory, nc):
    client = await ws_factory(bridge.ws_url)
    subject = unique()
    await client.subscribe(subject, subject)
    await client.subscribe(subject)
    await nats_synced(bridge)
    await publish(nc, subject, {"n": 1})
    first = await client.receive_message()
    assert first["subject"] == subject
    # A second copy would be queued right behind the first.
    await client.assert_silent(0.3)


# ---------------------------------------------------------------------------
# Release on disconnect
# ---------------------------------------------------------------------------


async def test_closing_connection_releases_its_nats_subscriptions(bridge, ws_factory, nats_server):
    await nats_synced(bridge)
    before = sorted(nats_server.subscriptions_of(bridge.name))
    client = await ws_factory(bridge.ws_url)
    await client.subscribe(unique(), unique("subs.wild") + ".*", unique("subs.tail") + ".>")
    await nats_synced(bridge)
    assert len(nats_server.subscriptions_of(bridge.name)) == len(before) + 3
    await client.close()
    await eventually(lambda: sorted(nats_server.subscriptions_of(bridge.name)) == before)


async def test_closing_connection_keeps_subjects_other_clients_hold(bridge, ws_factory, nats_server):
    stays, leaves = await ws_factory(bridge.ws_url), await ws_factory(bridge.ws_url)
    shared, own = unique(), unique()
    await stays.subscribe(shared)
    await leaves.subscribe(shared, own)
    await leaves.close()
    await eventually(lambda: count_of(nats_server, bridge, own) == 0)
    assert count_of(nats_server, bridge, shared) == 1


# ---------------------------------------------------------------------------
# One NATS subscription per pattern, shared
# ---------------------------------------------------------------------------


async def connect_many(ws_factory: Any, url: str, n: int) -> list[Any]:
    return list(await asyncio.gather(*(ws_factory(url) for _ in range(n))))


async def test_forty_clients_on_one_subject_hold_one_nats_subscription(
    bridge, ws_factory, nats_server
):
    clients = await connect_many(ws_factory, bridge.ws_url, 40)
    subject = unique()
    for client in clients:
        await client.subscribe(subject)
    await nats_synced(bridge)
    assert count_of(nats_server, bridge, subject) == 1


async def test_message_on_shared_subscription_reaches_all_forty_clients(bridge, ws_factory, nc):
    clients = await connect_many(ws_factory, bridge.ws_url, 40)
    subject = unique()
    for client in clients:
        await client.subscribe(subject)
    await nats_synced(bridge)
    await publish(nc, subject, {"n": 1})
    frames = await asyncio.gather(*(c.receive_message() for c in clients))
    assert all(f["subject"] == subject and f["data"] == {"n": 1} for f in frames)


async def test_shared_subscription_kept_until_last_of_forty_clients_leaves(
    bridge, ws_factory, nats_server, nc
):
    clients = await connect_many(ws_factory, bridge.ws_url, 40)
    subject = unique()
    for client in clients:
        await client.subscribe(subject)
    *leaving, last = clients
    await asyncio.gather(*(c.close() for c in leaving))
    await eventually(lambda: len(bridge.manager.sessions) == 1)
    await nats_synced(bridge)
    assert count_of(nats_server, bridge, subject) == 1
    await publish(nc, subject, {"n": 1})
    assert (await last.receive_message())["data"] == {"n": 1}


async def test_shared_subscription_removed_when_all_forty_clients_leave(
    bridge, ws_factory, nats_server
):
    clients = await connect_many(ws_factory, bridge.ws_url, 40)
    subject = unique()
    for client in clients:
        await client.subscribe(subject)
    await asyncio.gather(*(c.close() for c in clients))
    await eventually(lambda: count_of(nats_server, bridge, subject) == 0)


async def test_concurrent_subscribes_to_new_subject_create_one_nats_subscription(
    bridge, ws_factory, nats_server
):
    clients = await connect_many(ws_factory, bridge.ws_url, 30)
    subject = unique()
    replies = await asyncio.gather(*(c.subscribe(subject) for c in clients))
    assert all(r["success"] for r in replies)
    await nats_synced(bridge)
    assert count_of(nats_server, bridge, subject) == 1


async def test_concurrent_subscribes_leave_nothing_behind_when_all_leave(
    bridge, ws_factory, nats_server
):
    clients = await connect_many(ws_factory, bridge.ws_url, 30)
    subjects = [unique() for _ in range(3)]
    await asyncio.gather(*(c.subscribe(*subjects) for c in clients))
    await asyncio.gather(*(c.close() for c in clients))
    await eventually(
        lambda: not set(subjects) & set(nats_server.subscriptions_of(bridge.name))
    )


async def test_concurrent_subscribes_all_receive_each_message_once(bridge, ws_factory, nc):
    clients = await connect_many(ws_factory, bridge.ws_url, 30)
    subject = unique()
    await asyncio.gather(*(c.subscribe(subject) for c in clients))
    await nats_synced(bridge)
    await publish(nc, subject, {"n": 1})
    frames = await asyncio.gather(*(c.receive_message() for c in clients))
    assert all(f["data"] == {"n": 1} for f in frames)
    await asyncio.gather(*(c.assert_silent(0.3) for c in clients))


# ---------------------------------------------------------------------------
# Wildcards match as NATS does
# ---------------------------------------------------------------------------


async def wildcard_deliveries(bridge: Any, ws_factory: Any, nc: Any, base: str, pattern: str,
                              published: list[str], last: str) -> list[str]:
    """Subscribe to ``base + pattern``, publish on ``base + s`` for each s, then ``base + last``
    (which must match); return the suffixes that arrived, in order."""
    client = await ws_factory(bridge.ws_url)
    await client.subscribe(base + pattern)
    await nats_synced(bridge)
    for suffix in [*published, last]:
        await nc.publish(base + suffix, json.dumps(suffix).encode())
    await nc.flush()
    return [s.removeprefix(base) for s in await receive_until(client, base + last)]


async def test_star_matches_exactly_one_token(bridge, ws_factory, nc):
    base = unique("wc") + "."
    got = await wildcard_deliveries(
        bridge, ws_factory, nc, base, "*",
        published=["a", "b", "a.b", "a.b.c"],
        last="z",
    )
    assert got == ["a", "b", "z"]


async def test_star_in_the_middle_matches_one_token_there(bridge, ws_factory, nc):
    base = unique("wc") + "."
    got = await wildcard_deliveries(
        bridge, ws_factory, nc, base, "m.*.end",
        published=["m.a.end", "m.end", "m.a.b.end", "m.a.end.x", "n.a.end", "m.b.end"],
        last="m.z.end",
    )
    assert got == ["m.a.end", "m.b.end", "m.z.end"]


async def test_gt_matches_one_or_more_trailing_tokens(bridge, ws_factory, nc):
    base = unique("wc") + "."
    got = await wildcard_deliveries(
        bridge, ws_factory, nc, base, "t.>",
        published=["t", "t.a", "t.a.b", "t.a.b.c.d", "u.a", "tt.a", "x.t.a"],
        last="t.z",
    )
    assert got == ["t.a", "t.a.b", "t.a.b.c.d", "t.z"]


async def test_star_then_gt_needs_at_least_two_tokens(bridge, ws_factory, nc):
    base = unique("wc") + "."
    got = await wildcard_deliveries(
        bridge, ws_factory, nc, base, "*.>",
        published=["a", "a.b", "a.b.c", "b.c"],
        last="z.z",
    )
    assert got == ["a.b", "a.b.c", "b.c", "z.z"]


# ---------------------------------------------------------------------------
# Overlapping patterns: each message once per client
# ---------------------------------------------------------------------------


async def deliveries(bridge: Any, nc: Any, client: Any, base: str, suffixes: list[str],
                     expected: int) -> list[str]:
    """Publish on ``base + s`` for each suffix; return the suffixes of the ``expected`` messages
    ``client`` receives, sorted (messages of different NATS subscriptions may interleave),
    after checking that nothing more arrives."""
    await nats_synced(bridge)
    for suffix in suffixes:
        await nc.publish(base + suffix, json.dumps(suffix).encode())
    await nc.flush()
    got = [(await client.receive_message())["subject"].removeprefix(base) for _ in range(expected)]
    await client.assert_silent(0.3)
    return sorted(got)


async def overlapping_client(bridge: Any, ws_factory: Any, base: str, *patterns: str) -> Any:
    client = await ws_factory(bridge.ws_url)
    for pattern in patterns:
        await client.subscribe(base + pattern)
    return client


async def test_exact_subject_and_star_deliver_each_message_once(bridge, ws_factory, nc):
    base = unique("ov") + "."
    client = await overlapping_client(bridge, ws_factory, base, "test.subject", "test.*")
    got = await deliveries(bridge, nc, client, base, ["test.subject", "test.other", "test.subject"], 3)
    assert got == ["test.other", "test.subject", "test.subject"]


async def test_star_then_exact_subject_deliver_each_message_once(bridge, ws_factory, nc):
    base = unique("ov") + "."
    client = await overlapping_client(bridge, ws_factory, base, "test.*", "test.subject")
    got = await deliveries(bridge, nc, client, base, ["test.subject", "test.other"], 2)
    assert got == ["test.other", "test.subject"]


async def test_gt_and_partly_overlapping_star_deliver_each_message_once(bridge, ws_factory, nc):
    base = unique("ov") + "."
    client = await overlapping_client(bridge, ws_factory, base, "a.b.*", "a.>")
    got = await deliveries(bridge, nc, client, base, ["a.b.c", "a.x", "a.b.c.d", "a.b.z"], 4)
    assert got == ["a.b.c", "a.b.c.d", "a.b.z", "a.x"]


async def test_three_overlapping_patterns_deliver_each_message_once(bridge, ws_factory, nc):
    base = unique("ov") + "."
    client = await overlapping_client(bridge, ws_factory, base, "a.*.c", "a.b.*", "a.>")
    got = await deliveries(bridge, nc, client, base, ["a.b.c", "a.x.c", "a.b.x", "a.x.x", "a.b"], 5)
    assert got == ["a.b", "a.b.c", "a.b.x", "a.x.c", "a.x.x"]


async def test_after_unsubscribing_the_older_pattern_the_newer_one_still_delivers(bridge, ws_factory, nc):
    base = unique("ov") + "."
    client = await overlapping_client(bridge, ws_factory, base, "test.*", "test.subject")
    await client.request({"subjects": [base + "test.*"], "action": "unsubscribe"})
    got = await deliveries(bridge, nc, client, base, ["test.subject", "test.other", "test.subject"], 2)
    assert got == ["test.subject", "test.subject"]


async def test_after_unsubscribing_the_newer_pattern_the_older_one_still_delivers_once(
    bridge, ws_factory, nc
):
    base = unique("ov") + "."
    client = await overlapping_client(bridge, ws_factory, base, "test.*", "test.subject")
    await client.request({"subjects": [base + "test.subject"], "action": "unsubscribe"})
    got = await deliveries(bridge, nc, client, base, ["test.subject", "test.other"], 2)
    assert got == ["test.other", "test.subject"]


async def test_overlap_of_one_client_changes_nothing_for_another(bridge, ws_factory, nc):
    base = unique("ov") + "."
    await overlapping_client(bridge, ws_factory, base, "test.subject", "test.*")
    plain = await overlapping_client(bridge, ws_factory, base, "test.subject")
    got = await deliveries(bridge, nc, plain, base, ["test.subject", "test.other", "test.subject"], 2)
    assert got == ["test.subject", "test.subject"]


async def test_client_without_overlap_gets_every_message_of_each_pattern(bridge, ws_factory, nc):
    base = unique("ov") + "."
    client = await overlapping_client(bridge, ws_factory, base, "a.*", "b.>")
    got = await deliveries(bridge, nc, client, base, ["a.1", "b.1.2", "a.2", "c.1", "b.3"], 4)
    assert got == ["a.1", "a.2", "b.1.2", "b.3"]


# ---------------------------------------------------------------------------
# A client whose TCP connection is reset
# ---------------------------------------------------------------------------


async def test_reset_connection_releases_its_subscriptions(bridge, ws_factory, nats_server):
    client = await ws_factory(bridge.ws_url)
    own = unique()
    await client.subscribe(own)
    await nats_synced(bridge)
    assert count_of(nats_server, bridge, own) == 1
    reset_connection(client)
    await eventually(lambda: count_of(nats_server, bridge, own) == 0)


async def test_reset_connection_does_not_disturb_other_clients(bridge, ws_factory, nats_server, nc):
    others = await connect_many(ws_factory, bridge.ws_url, 3)
    victim = await ws_factory(bridge.ws_url)
    shared = unique()
    for client in [*others, victim]:
        await client.subscribe(shared)
    await nats_synced(bridge)
    await publish(nc, shared, {"n": 0})
    for client in others:
        assert (await client.receive_message())["data"] == {"n": 0}
    reset_connection(victim)
    # Publish while the bridge is noticing the reset and after it has.
    await publish(nc, shared, {"n": 1})
    await eventually(lambda: len(bridge.manager.sessions) == 3)
    await publish(nc, shared, {"n": 2})
    for client in others:
        assert (await client.receive_message())["data"] == {"n": 1}
        assert (await client.receive_message())["data"] == {"n": 2}
    assert count_of(nats_server, bridge, shared) == 1


async def test_reset_while_messages_flow_does_not_disturb_other_clients(bridge, ws_factory, nc):
    other = await ws_factory(bridge.ws_url)
    victims = await connect_many(ws_factory, bridge.ws_url, 5)
    subject = unique()
    for client in [other, *victims]:
        await client.subscribe(subject)
    await nats_synced(bridge)
    for i in range(200):
        await nc.publish(subject, json.dumps(i).encode())
        if i % 40 == 20:
            reset_connection(victims[i // 40])
    await nc.flush()
    received = [(await other.receive_message())["data"] for _ in range(200)]
    assert received == list(range(200))


async def test_message_published_right_after_the_subscribe_reply_is_delivered(bridge, ws_factory, nc):
    # No flush of the bridge's NATS connection here: "subscribed" must already be true.
    client = await ws_factory(bridge.ws_url)
    for i in range(15):  # within the default control-frame rate
        subject = f"{unique()}.{i}"
        await client.subscribe(subject)
        await nc.publish(subject, json.dumps({"i": i}).encode())
        frame = await client.receive_message(timeout=5)
        assert frame == {"subject": subject, "data": {"i": i}}
