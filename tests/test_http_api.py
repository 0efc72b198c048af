"""The HTTP API: POST /clients/{connection_id} (subscribe/unsubscribe a client from a backend),
/healthz and /readyz."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from conftest import TIMEOUT, NatsServer, eventually, nats_synced, publish, unique


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        yield session


async def post(http: aiohttp.ClientSession, bridge: Any, connection_id: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    async with http.post(f"{bridge.http_url}/clients/{connection_id}", data=data) as resp:
        return resp.status, await resp.json()



# ---------------------------------------------------------------------------
# POST /clients/{connection_id}
# ---------------------------------------------------------------------------


async def test_post_subscribe_returns_200_with_the_subscribe_reply(bridge, ws_factory, http):
    client = await ws_factory(bridge.ws_url)
    first, second = unique(), unique()
    status, body = await post(http, bridge, client.connection_id,
                              {"subjects": [first, second], "action": "subscribe"})
    assert status == 200
    assert body["success"] is True
    assert body["message"] == f"Successfully connected to events: '{first}', '{second}'"


async def test_post_subscribe_makes_client_receive_those_messages(bridge, ws_factory, nc, http):
    client = await ws_factory(bridge.ws_url)
    subject = unique()
    await post(http, bridge, client.connection_id, {"subjects": [subject], "action": "subscribe"})
    await nats_synced(bridge)
    await publish(nc, subject, {"n": 1})
    frame = await client.receive_message()
    assert (frame["subject"], frame["data"]) == (subject, {"n": 1})


async def test_post_without_action_subscribes(bridge, ws_factory, nc, http):
    client = await ws_factory(bridge.ws_url)
    subject = unique()
    status, _ = await post(http, bridge, client.connection_id, {"subjects": [subject]})
    assert status == 200
    await nats_synced(bridge)
    await publish(nc, subject, {"n": 1})
    assert (await client.receive_message())["subject"] == subject


async def test_post_unsubscribe_returns_200_with_the_unsubscribe_reply(bridge, ws_factory, http):
    client = await ws_factory(bridge.ws_url)
    subject = unique()
    await client.subscribe(subject)
    status, body = await post(http, bridge, client.connection_id,
                              {"subjects": [subject], "action": "unsubscribe"})
    assert status == 200
    assert body["success"] is True
    assert body["message"] == f"Successfully unsubscribed from event: {subject}"


async def test_post_unsubscribe_stops_delivery_to_that_client(bridge, ws_factory, nc, http):
    client = await ws_factory(bridge.ws_url)
    subject = unique()
    await client.subscribe(subject)
    await post(http, bridge, client.connection_id, {"subjects": [subject], "action": "unsubscribe"})
    await nats_synced(bridge)
    await publish(nc, subject, {"n": 1})
    with pytest.raises(asyncio.TimeoutError):
        await client.receive_message(timeout=0.5)


async def test_post_unsubscribe_leaves_other_clients_subscribed(bridge, ws_factory, nc, http):
    target, other = await ws_factory(bridge.ws_url), await ws_factory(bridge.ws_url)
    subject = unique()
    await target.subscribe(subject)
    await other.subscribe(subject)
    await post(http, bridge, target.connection_id, {"subjects": [subject], "action": "unsubscribe"})
    await nats_synced(bridge)
    await publish(nc, subject, {"n": 1})
    assert (await other.receive_message())["data"] == {"n": 1}


async def test_post_subscribe_affects_only_the_named_client(bridge, ws_factory, nc, http):
    target, other = await ws_factory(bridge.ws_url), await ws_factory(bridge.ws_url)
    subject = unique()
    await post(http, bridge, target.connection_id, {"subjects": [subject]})
    await nats_synced(bridge)
    await publish(nc, subject, {"n": 1})
    await target.receive_message()
    with pytest.raises(asyncio.TimeoutError):
        await other.receive_message(timeout=0.3)


async def test_post_unsubscribe_of_subject_not_held_returns_400(bridge, ws_factory, http):
    client = await ws_factory(bridge.ws_url)
    subject = unique()
    status, body = await post(http, bridge, client.connection_id,
                              {"subjects": [subject], "action": "unsubscribe"})
    assert status == 400
    assert body["success"] is False
    assert f"The user did not subscribe to event {subject}" in body["message"]


async def test_post_to_unknown_connection_id_returns_404(bridge, ws_factory, http):
    await ws_factory(bridge.ws_url)
    status, body = await post(http, bridge, "no-such-connection", {"subjects": ["a"]})
    assert status == 404
    assert body["success"] is False


async def test_post_to_closed_connection_returns_404(bridge, ws_factory, http):
    client = await ws_factory(bridge.ws_url)
    connection_id = client.connection_id
    await client.close()
    await eventually(lambda: connection_id not in bridge.manager.sessions)
    status, _ = await post(http, bridge, connection_id, {"subjects": ["a"]})
    assert status == 404


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("this is not json", ("invalid json",)),
        ("[1, 2]", ("object",)),
        ('{"subjects": "a.b"}', ("list",)),
        ('{"subjects": []}', ("empty",)),
        ('{"subjects": ["a", 1]}', ("string",)),
        ('{"action": "subscribe"}', ("subjects required",)),
        ('{"subjects": ["a"], "action": "listen"}', ("got listen instead",)),
    ],
    ids=["not-json", "not-object", "subjects-string", "subjects-empty", "subjects-non-string",
         "no-subjects", "unknown-action"],
)
async def test_post_bad_body_returns_400(bridge, ws_factory, http, body, words):
    client = await ws_factory(bridge.ws_url)
    status, reply = await post(http, bridge, client.connection_id, body)
    assert status == 400
    assert reply["success"] is False
    for word in words:
        assert word in reply["message"].lower(), reply


@pytest.mark.parametrize("subject", ["a..b", "a b", "a.*b", ">.a", "", "x" * 300])
async def test_post_invalid_subject_returns_400(bridge, ws_factory, http, subject):
    client = await ws_factory(bridge.ws_url)
    status, reply = await post(http, bridge, client.connection_id, {"subjects": [subject]})
    assert status == 400
    assert reply["success"] is False
    assert "invalid subject" in reply["message"].lower()


async def test_post_invalid_subject_leaves_client_working(bridge, ws_factory, nc, http):
    client = await ws_factory(bridge.ws_url)
    status, _ = await post(http, bridge, client.connection_id, {"subjects": ["a..b"]})
    assert status == 400
    # The bridge tells the client about the failed request too; take that frame first.
    assert (await client.receive())["success"] is False
    subject = unique()
    await client.subscribe(subject)
    await nats_synced(bridge)
    await publish(nc, subject, {"n": 1})
    assert (await client.receive_message())["data"] == {"n": 1}


# ---------------------------------------------------------------------------
# Health and readiness
# ---------------------------------------------------------------------------


async def test_healthz_returns_200(bridge, http):
    async with http.get(f"{bridge.http_url}/healthz") as resp:
        assert resp.status == 200


async def test_readyz_returns_200_when_nats_is_connected(bridge, http):
    async with http.get(f"{bridge.http_url}/readyz") as resp:
        assert resp.status == 200


async def test_readyz_returns_503_when_nats_is_down(bridge_factory, http):
    own = NatsServer().start()
    try:
        bridge = await bridge_factory(nats_url=own.url, nats_reconnect_wait=0.2)
        own.stop()
        await eventually(lambda: not bridge.app.nats.client.is_connected)
        async with http.get(f"{bridge.http_url}/readyz") as resp:
            assert resp.status == 503
    finally:
        own.stop()


async def test_healthz_returns_200_when_nats_is_down(bridge_factory, http):
    own = NatsServer().start()
    try:
        bridge = await bridge_factory(nats_url=own.url, nats_reconnect_wait=0.2)
        own.stop()
        await eventually(lambda: not bridge.app.nats.client.is_connected)
        async with http.get(f"{bridge.http_url}/healthz") as resp:
            assert resp.status == 200
    finally:
        own.stop()
