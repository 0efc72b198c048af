"""NATS outages and cluster failover, with real nats-server processes that are stopped and killed.

Each test here owns its nats-server(s): a function-scoped server restarted on the
same ports, or a three-node cluster routed on loopback.  Clients are real
WebSockets; that they never reconnect is checked by their connection id and by
their socket staying open.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from typing import Any

import aiohttp
import nats
import pytest
from conftest import TIMEOUT, NatsServer, eventually, start, stop, unique

RECONNECT_WAIT = 0.2
FAILOVER_BOUND = 5.0  # seconds, from the issue



async def status_frame(client: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The next status frame, skipping messages and replies."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        frame = await client.receive(max(0.01, deadline - asyncio.get_running_loop().time()))
        if frame.get("type") == "status":
            return frame


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def http_status_async(url: str) -> int:
    return await asyncio.wait_for(asyncio.to_thread(http_status, url), TIMEOUT)


@pytest.fixture
def own_nats() -> Iterator[NatsServer]:
    """A nats-server this test may stop and start again (same ports)."""
    server = NatsServer().start()
    yield server
    server.stop()


@pytest.fixture
async def outage_bridge(own_nats, bridge_factory) -> Any:
    return await bridge_factory(nats_url=own_nats.url, nats_reconnect_wait=RECONNECT_WAIT)


async def connect_nc(url: str) -> nats.NATS:
    return await asyncio.wait_for(nats.connect(url, allow_reconnect=False), TIMEOUT)


# ---------------------------------------------------------------------------
# NATS restart
# ---------------------------------------------------------------------------


async def test_clients_get_nats_disconnected_status_when_nats_stops(own_nats, outage_bridge, ws_factory):
    client = await ws_factory(outage_bridge.ws_url)
    await client.subscribe(unique())
    await stop(own_nats)
    frame = await status_frame(client)
    assert frame["nats"] == "disconnected"
    assert frame["success"] is False


async def test_clients_keep_their_sockets_open_while_nats_is_down(own_nats, outage_bridge, ws_factory):
    client = await ws_factory(outage_bridge.ws_url)
    await client.subscribe(unique())
    await stop(own_nats)
    await status_frame(client)
    # Still a working socket: a control frame is answered during the outage.
    frame = await client.request({"action": "unsubscribe", "subjects": ["never.held"]})
    assert frame["type"] == "reply"
    assert not client.ws.closed
    assert client.connection_id in outage_bridge.manager.sessions


async def test_welcome_during_outage_says_nats_disconnected(own_nats, outage_bridge, ws_factory):
    first = await ws_factory(outage_bridge.ws_url)
    await stop(own_nats)
    await status_frame(first)
    late = await ws_factory(outage_bridge.ws_url)
    assert late.welcome["nats"] == "disconnected"


async def test_clients_get_nats_connected_status_when_nats_returns(own_nats, outage_bridge, ws_factory):
    client = await ws_factory(outage_bridge.ws_url)
    await client.subscribe(unique())
    await stop(own_nats)
    assert (await status_frame(client))["nats"] == "disconnected"
    await start(own_nats)
    frame = await status_frame(client)
    assert frame["nats"] == "connected"
    assert frame["success"] is True


async def test_subscriptions_resume_after_nats_restart_without_reconnecting(
    own_nats, outage_bridge, ws_factory
):
    client = await ws_factory(outage_bridge.ws_url)
    subject = unique()
    await client.subscribe(subject)
    await stop(own_nats)
    await status_frame(client)
    await start(own_nats)
    assert (await status_frame(client))["nats"] == "connected"
    nc = await connect_nc(own_nats.url)
    try:
        await nc.publish(subject, b'{"after": "restart"}')
        await asyncio.wait_for(nc.flush(), TIMEOUT)
        frame = await client.receive_message()
    finally:
        await asyncio.wait_for(nc.close(), TIMEOUT)
    assert (frame["subject"], frame["data"]) == (subject, {"after": "restart"})
    assert not client.ws.closed
    assert list(outage_bridge.manager.sessions) == [client.connection_id]


async def test_restarted_nats_server_holds_the_bridge_subscription_once(own_nats, outage_bridge, ws_factory):
    client = await ws_factory(outage_bridge.ws_url)
    subject = unique()
    await client.subscribe(subject)
    await stop(own_nats)
    await status_frame(client)
    await start(own_nats)
    await status_frame(client)
    assert own_nats.subscriptions_of(outage_bridge.name).count(subject) == 1


async def test_readyz_is_503_during_nats_outage(own_nats, outage_bridge, ws_factory):
    client = await ws_factory(outage_bridge.ws_url)
    await stop(own_nats)
    await status_frame(client)
    assert await http_status_async(outage_bridge.http_url + "/readyz") == 503
    assert await http_status_async(outage_bridge.http_url + "/healthz") == 200


async def test_readyz_is_200_after_nats_returns(own_nats, outage_bridge, ws_factory):
    client = await ws_factory(outage_bridge.ws_url)
    await stop(own_nats)
    await status_frame(client)
    await start(own_nats)
    await status_frame(client)
    assert await http_status_async(outage_bridge.http_url + "/readyz") == 200


@pytest.mark.slow
async def test_bridge_process_outlives_a_long_nats_outage(own_nats, bridge_process):
    # 0.03 s between attempts: 4 s of outage is about twice nats-py's default of
    # 60 attempts, after which a client without max_reconnect_attempts=-1 gives up.
    bp = bridge_process(env={
        "NATS_URL": own_nats.url,
        "NATS_RECONNECT_WAIT": "0.03",
        "TEST_PUBLISH_INTERVAL": "0",
        "LOG_LEVEL": "WARNING",
    })
    readyz = bp.http_url + "/readyz"
    assert await http_status_async(readyz) == 200
    await stop(own_nats)
    await eventually(lambda: http_status(readyz) == 503)
    await asyncio.sleep(4)
    assert bp.proc.poll() is None
    await start(own_nats)
    await eventually(lambda: http_status(readyz) == 200)
    assert bp.proc.poll() is None


# ---------------------------------------------------------------------------
# A three-node cluster on loopback
# ---------------------------------------------------------------------------


def bridge_connections(node: NatsServer, name: str) -> int:
    if node.proc is None or node.proc.poll() is not None:
        return 0
    connz = node.monitor("/connz")
    return sum(1 for c in connz.get("connections") or [] if c.get("name", "").startswith(name))


def node_of(nodes: list[NatsServer], name: str) -> NatsServer:
    holding = [n for n in nodes if bridge_connections(n, name)]
    assert len(holding) == 1, holding
    return holding[0]


async def kill(node: NatsServer) -> None:
    assert node.proc is not None
    node.proc.send_signal(signal.SIGKILL)
    await asyncio.wait_for(asyncio.to_thread(node.proc.wait), TIMEOUT)


async def publish_until_received(
    nc: nats.NATS, subject: str, client: Any, phase: str, timeout: float = TIMEOUT
) -> dict[str, Any]:
    """Publish numbered messages every 0.1 s until ``client`` gets one of this phase."""
    deadline = time.monotonic() + timeout
    for seq in itertools.count():
        assert time.monotonic() < deadline, f"no {phase} message within {timeout}s"
        await nc.publish(subject, json.dumps({"phase": phase, "seq": seq}).encode())
        await asyncio.wait_for(nc.flush(), TIMEOUT)
        with suppress(TimeoutError):
            while True:
                frame = await client.receive_message(timeout=0.1)
                if frame["subject"] == subject and frame["data"].get("phase") == phase:
                    return frame
    raise AssertionError("unreachable")


@pytest.fixture
async def cluster_setup(cluster, bridge_factory, ws_factory) -> AsyncIterator[dict[str, Any]]:
    """A bridge on the cluster, a subscribed client, and a publisher on a node the bridge is not on."""
    bridge = await bridge_factory(
        nats_url=",".join(n.url for n in cluster), nats_reconnect_wait=RECONNECT_WAIT
    )
    client = await ws_factory(bridge.ws_url)
    subject = unique("cluster")
    await client.subscribe(subject)
    home = node_of(cluster, bridge.name)
    other = next(n for n in cluster if n is not home)
    nc = await connect_nc(other.url)
    try:
        # Interest crosses the routes asynchronously: wait until delivery works.
        await publish_until_received(nc, subject, client, "before")
        yield {"bridge": bridge, "client": client, "subject": subject, "home": home, "nc": nc,
               "survivors": [n for n in cluster if n is not home]}
    finally:
        with suppress(Exception):
            await asyncio.wait_for(nc.close(), TIMEOUT)


@pytest.mark.slow
async def test_cluster_failover_delivers_through_another_node_within_5_seconds(cluster_setup):
    s = cluster_setup
    started = time.monotonic()
    await kill(s["home"])
    frame = await publish_until_received(s["nc"], s["subject"], s["client"], "after")
    assert time.monotonic() - started < FAILOVER_BOUND
    assert frame["subject"] == s["subject"]
    assert not s["client"].ws.closed


@pytest.mark.slow
async def test_cluster_failover_keeps_the_client_socket(cluster_setup):
    s = cluster_setup
    await kill(s["home"])
    await publish_until_received(s["nc"], s["subject"], s["client"], "after")
    assert not s["client"].ws.closed
    assert list(s["bridge"].manager.sessions) == [s["client"].connection_id]


@pytest.mark.slow
async def test_cluster_failover_leaves_one_bridge_subscription_on_surviving_nodes(cluster_setup):
    s = cluster_setup
    await kill(s["home"])
    await publish_until_received(s["nc"], s["subject"], s["client"], "after")
    await asyncio.wait_for(s["bridge"].app.nats.client.flush(), TIMEOUT)
    name = s["bridge"].name
    assert sum(bridge_connections(n, name) for n in s["survivors"]) == 1
    held = [subj for n in s["survivors"] for subj in n.subscriptions_of(name)]
    assert held.count(s["subject"]) == 1


@pytest.mark.slow
async def test_cluster_failover_delivers_each_message_once(cluster_setup):
    s = cluster_setup
    await kill(s["home"])
    await publish_until_received(s["nc"], s["subject"], s["client"], "after")
    await asyncio.wait_for(s["bridge"].app.nats.client.flush(), TIMEOUT)
    # Drain the stragglers of the probing phase, then a clean numbered run.
    with suppress(TimeoutError):
        while True:
            await s["client"].receive_message(timeout=0.5)
    for n in range(20):
        await s["nc"].publish(s["subject"], json.dumps({"phase": "counted", "n": n}).encode())
    await asyncio.wait_for(s["nc"].flush(), TIMEOUT)
    got = []
    while len(got) < 20:
        frame = await s["client"].receive_message()
        got.append(frame["data"]["n"])
    assert got == list(range(20))
    await s["client"].assert_silent(0.5)


@pytest.mark.slow
async def test_bridge_on_cluster_survives_losing_two_nodes_one_after_another(
    cluster, bridge_factory, ws_factory
):
    bridge = await bridge_factory(
        nats_url=",".join(n.url for n in cluster), nats_reconnect_wait=RECONNECT_WAIT
    )
    client = await ws_factory(bridge.ws_url)
    subject = unique("cluster")
    await client.subscribe(subject)
    for _ in range(2):
        await kill(node_of(cluster, bridge.name))
        await eventually(
            lambda: sum(bridge_connections(n, bridge.name) for n in cluster) == 1, timeout=TIMEOUT
        )
    last = node_of(cluster, bridge.name)
    nc = await connect_nc(last.url)
    try:
        frame = await publish_until_received(nc, subject, client, "last")
    finally:
        await asyncio.wait_for(nc.close(), TIMEOUT)
    assert frame["subject"] == subject


@pytest.mark.slow
async def test_readyz_is_200_after_cluster_failover(cluster_setup):
    s = cluster_setup
    await kill(s["home"])
    await publish_until_received(s["nc"], s["subject"], s["client"], "after")
    async with aiohttp.ClientSession() as session:
        async with session.get(
            s["bridge"].http_url + "/readyz", timeout=aiohttp.ClientTimeout(total=TIMEOUT)
        ) as resp:
            assert resp.status == 200
