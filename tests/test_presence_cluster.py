"""Presence where it is hard: a bridge process killed with SIGKILL, NATS restarted under live
connections, a three-node NATS cluster with a bridge on each node, a thousand members.

All slow: real bridge processes, restarts and waits of seconds, a cluster, many sockets.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from conftest import (
    TIMEOUT,
    NatsServer,
    WSClient,
    cluster_nodes,
    eventually,
    routed_peers,
    running_bridge,
    start,
    stop,
    unique,
)
from test_presence import ask, next_of, watch

pytestmark = pytest.mark.slow


async def count_is(client: WSClient, subject: str, count: int, timeout: float = TIMEOUT) -> dict[str, Any]:
    """Ask until the answer counts ``count`` (a successful answer), within ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        answer = await ask(client, subject)
        if answer["success"] and answer["count"] == count:
            return answer
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not {count} within {timeout} s: {answer}")
        await asyncio.sleep(0.1)


async def serving(url: str, timeout: float = 30) -> None:
    """Wait until a bridge process answers /readyz (it binds its port before it is ready)."""
    async def ready() -> bool:
        try:
            async with aiohttp.ClientSession() as session, session.get(url + "/readyz") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    deadline = asyncio.get_running_loop().time() + timeout
    while not await ready():
        assert asyncio.get_running_loop().time() < deadline, f"{url} not ready within {timeout} s"
        await asyncio.sleep(0.2)


async def test_two_bridge_processes_on_one_nats_see_each_others_joins_and_leaves(
    js_server, bridge_process, ws_factory
):
    env = {"NATS_URL": js_server.url, "PRESENCE_SUBJECTS": "room.*", "CONTROL_SUBJECT": unique("ctl"),
           "TEST_PUBLISH_INTERVAL": "0"}
    procs = [bridge_process(env=env), bridge_process(env=env)]
    for proc in procs:
        await serving(proc.http_url)
    a, b = [await ws_factory(f"ws://127.0.0.1:{p.port}/stream") for p in procs]
    await watch(a, "room.1")
    mine = (await next_of(a, "join"))["client"]
    await watch(b, "room.1")
    theirs = (await next_of(a, "join", timeout=1.0))["client"]
    assert [(await next_of(b, "join", timeout=1.0))["client"]] == [theirs]  # its own, after its reply
    for client in (a, b):
        answer = await ask(client, "room.1")
        assert {e["client"] for e in answer["presence"]} == {mine, theirs}, answer
    assert (await b.request({"action": "unsubscribe", "subjects": ["room.1"]}))["success"]
    assert (await next_of(a, "leave", timeout=1.0))["client"] == theirs
    await b.subscribe("room.1")
    again = (await next_of(a, "join", timeout=1.0))["client"]
    await b.close()
    assert (await next_of(a, "leave", timeout=1.0))["client"] == again
    assert (await ask(a, "room.1"))["count"] == 1


async def test_a_killed_bridge_process_members_leave_within_presence_ttl(
    js_server, bridge_factory, bridge_process, ws_factory
):
    control, ttl = unique("ctl"), 3
    settings = {"presence_subjects": ("room.*",), "presence_ttl": float(ttl), "control_subject": control}
    proc = bridge_process(env={"NATS_URL": js_server.url, "PRESENCE_SUBJECTS": "room.*",
                               "PRESENCE_TTL": str(ttl), "CONTROL_SUBJECT": control,
                               "TEST_PUBLISH_INTERVAL": "0"})
    survivor = await bridge_factory(nats_url=js_server.url, **settings)
    watcher = await ws_factory(survivor.ws_url)
    await watch(watcher, "room.kill")
    await next_of(watcher, "join")
    await serving(proc.http_url)
    member = await ws_factory(f"ws://127.0.0.1:{proc.port}/stream")
    await member.subscribe("room.kill")
    joined = await next_of(watcher, "join", timeout=1.0)
    await count_is(watcher, "room.kill", 2)
    proc.proc.send_signal(signal.SIGKILL)  # no goodbye: its lease just stops being renewed
    left = await next_of(watcher, "leave", timeout=ttl + 2)
    assert left["client"] == joined["client"]
    assert (await ask(watcher, "room.kill"))["count"] == 1


async def test_after_a_nats_restart_live_connections_are_back_without_resubscribing(
    tmp_path: Path, bridge_factory, ws_factory
):
    server = NatsServer(extra_args=["-js", "-sd", str(tmp_path)]).start()
    try:
        settings = {"nats_url": server.url, "presence_subjects": ("room.*",),
                    "control_subject": unique("ctl")}
        one, two = await bridge_factory(**settings), await bridge_factory(**settings)
        a, b = await ws_factory(one.ws_url), await ws_factory(two.ws_url)
        await watch(a, "room.restart")
        await b.subscribe("room.restart")
        before = {e["client"] for e in (await count_is(a, "room.restart", 2))["presence"]}
        await stop(server)
        await start(server)  # the same ports; the memory stream is gone with the old server
        returned = asyncio.get_running_loop().time()
        # A bridge started now reads only what is stored: its answer proves the entries are back.
        async with running_bridge(**settings) as fresh:
            looker = await ws_factory(fresh.ws_url)
            left = 15 - (asyncio.get_running_loop().time() - returned)
            after = await count_is(looker, "room.restart", 2, timeout=left)
        assert {e["client"] for e in after["presence"]} == before
        for client in (a, b):
            assert (await count_is(client, "room.restart", 2))["count"] == 2
    finally:
        server.stop()


def meta_leader(node: NatsServer) -> str | None:
    return (node.monitor("/jsz").get("meta_cluster") or {}).get("leader")


@pytest_asyncio.fixture
async def js_cluster(tmp_path: Path) -> AsyncIterator[list[NatsServer]]:
    """Three routed nats-servers, each with JetStream (one meta group)."""
    nodes = cluster_nodes()
    for i, node in enumerate(nodes):
        node.extra_args += ["-js", "-sd", str(tmp_path / f"node{i}")]
    try:
        for node in nodes:
            await start(node)
        await eventually(lambda: all(len(routed_peers(n)) == 2 for n in nodes), timeout=20)
        await eventually(lambda: all(meta_leader(n) for n in nodes), timeout=30)
        yield nodes
    finally:
        for node in nodes:
            await stop(node)


async def test_on_a_three_node_cluster_each_bridge_sees_the_others_and_every_answer_lists_all(
    js_cluster, bridge_factory, ws_factory
):
    control = unique("ctl")
    bridges = [await bridge_factory(nats_url=node.url, presence_subjects=("room.*",), control_subject=control)
               for node in js_cluster]
    clients = [await ws_factory(b.ws_url) for b in bridges]
    for client in clients:
        await watch(client, "room.cluster")
    mine = [(await next_of(c, "join"))["client"] for c in clients]
    everyone = set(mine)
    assert len(everyone) == 3
    for i, client in enumerate(clients):
        # After its own join, each hears those who came after it, from the other nodes.
        later = {(await next_of(client, "join", timeout=1.0))["client"] for _ in mine[i + 1:]}
        assert later == set(mine[i + 1:])
    for client in clients:
        answer = await count_is(client, "room.cluster", 3)
        assert {e["client"] for e in answer["presence"]} == everyone


async def test_a_thousand_members_are_answered_in_full_within_presence_max(bridge_factory, js_server):
    settings = {"nats_url": js_server.url, "presence_subjects": ("room.*",), "control_subject": unique("ctl")}
    bridges = [await bridge_factory(**settings), await bridge_factory(**settings)]
    # limit=0: aiohttp allows 100 connections per session by default, and each socket keeps its own.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        sockets = []

        async def member(n: int) -> None:
            ws = await session.ws_connect(bridges[n % 2].ws_url)
            sockets.append(ws)
            await ws.receive_json(timeout=TIMEOUT)  # welcome
            await ws.send_json({"action": "subscribe", "subjects": ["room.big"]})
            assert (await ws.receive_json(timeout=TIMEOUT))["success"]

        try:
            for first in range(0, 1000, 100):
                await asyncio.wait_for(asyncio.gather(*(member(n) for n in range(first, first + 100))), 60)
            client = WSClient(session, await session.ws_connect(bridges[0].ws_url))
            client.welcome = await client.receive()
            answer = await count_is(client, "room.big", 1000, timeout=30)
            assert (len(answer["presence"]), answer["users"]) == (1000, 0)
            assert len({e["client"] for e in answer["presence"]}) == 1000
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))
