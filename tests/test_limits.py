"""Per-client and per-process limits, each at its edge and one past it; Origin and token checks.

Every bridge here is started with the limit under test set small, so its edge
is cheap to reach; what happens is observed from real clients over real sockets
(replies, close codes, HTTP statuses) and from nats-server's /connz.
"""

from __future__ import annotations

import asyncio
import json
import socket
from contextlib import suppress
from typing import Any

import aiohttp
import pytest
from conftest import TIMEOUT, eventually, nats_synced, publish, unique
from minting import SECRET, claims, hs256

from bridge.process.metrics import LINK

CLOSING = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
           aiohttp.WSMsgType.ERROR)





async def close_code_of(ws: aiohttp.ClientWebSocketResponse, timeout: float = TIMEOUT) -> int | None:
    """Read (and ignore) frames until the server closes; the code in its close frame.

    The code comes from the CLOSE frame itself: ``ws.close_code`` can turn into
    1006 when aiohttp's automatic close reply meets an already closed socket.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        remaining = max(0.01, deadline - asyncio.get_running_loop().time())
        msg = await asyncio.wait_for(ws.receive(), remaining)
        if msg.type is aiohttp.WSMsgType.CLOSE:
            return int(msg.data)
        if msg.type in CLOSING:
            return ws.close_code


async def replies(client: Any, n: int) -> list[dict[str, Any]]:
    """The next ``n`` reply frames."""
    out = []
    while len(out) < n:
        frame = await client.receive()
        if frame.get("type") == "reply":
            out.append(frame)
    return out


def sized_frame(size: int) -> str:
    """A valid subscribe frame of exactly ``size`` bytes."""
    body = {"action": "subscribe", "subjects": ["lim.frame"], "pad": ""}
    base = len(json.dumps(body).encode())
    assert size >= base
    body["pad"] = "x" * (size - base)
    text = json.dumps(body)
    assert len(text.encode()) == size
    return text


# ---------------------------------------------------------------------------
# MAX_SUBSCRIPTIONS
# ---------------------------------------------------------------------------


async def test_max_subscriptions_allows_exactly_the_limit(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, max_subscriptions=3)
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"action": "subscribe", "subjects": [unique(), unique(), unique()]})
    assert frame["success"] is True, frame


async def test_subscription_past_max_subscriptions_is_refused(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, max_subscriptions=3)
    client = await ws_factory(bridge.ws_url)
    await client.subscribe(unique(), unique(), unique())
    frame = await client.request({"action": "subscribe", "subjects": [unique()]})
    assert frame["success"] is False
    assert "Subscription limit" in frame["message"]


async def test_request_that_would_pass_max_subscriptions_subscribes_none_of_it(
    bridge_factory, nats_server, ws_factory
):
    bridge = await bridge_factory(nats_url=nats_server.url, max_subscriptions=3)
    client = await ws_factory(bridge.ws_url)
    await client.subscribe(unique(), unique())
    extra = [unique(), unique()]
    frame = await client.request({"action": "subscribe", "subjects": extra})
    assert frame["success"] is False
    await nats_synced(bridge)
    held = nats_server.subscriptions_of(bridge.name)
    assert len(held) == 2
    assert not set(extra) & set(held)


async def test_connection_still_delivers_after_subscription_limit_refusal(
    bridge_factory, nats_server, ws_factory, nc
):
    bridge = await bridge_factory(nats_url=nats_server.url, max_subscriptions=3)
    client = await ws_factory(bridge.ws_url)
    held = unique()
    await client.subscribe(held, unique(), unique())
    await client.request({"action": "subscribe", "subjects": [unique()]})
    await nats_synced(bridge)
    await publish(nc, held, {"n": 1})
    frame = await client.receive_message()
    assert (frame["subject"], frame["data"]) == (held, {"n": 1})


async def test_resubscribing_held_subject_at_the_limit_is_not_refused(
    bridge_factory, nats_server, ws_factory
):
    bridge = await bridge_factory(nats_url=nats_server.url, max_subscriptions=3)
    client = await ws_factory(bridge.ws_url)
    subjects = [unique(), unique(), unique()]
    await client.subscribe(*subjects)
    frame = await client.request({"action": "subscribe", "subjects": subjects[:1]})
    assert frame["success"] is True, frame


async def test_unsubscribing_frees_a_slot_under_max_subscriptions(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, max_subscriptions=3)
    client = await ws_factory(bridge.ws_url)
    subjects = [unique(), unique(), unique()]
    await client.subscribe(*subjects)
    await client.request({"action": "unsubscribe", "subjects": subjects[:1]})
    frame = await client.request({"action": "subscribe", "subjects": [unique()]})
    assert frame["success"] is True, frame


# ---------------------------------------------------------------------------
# MAX_SUBJECTS_PER_REQUEST
# ---------------------------------------------------------------------------


async def test_max_subjects_per_request_allows_exactly_the_limit(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, max_subjects_per_request=3)
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"action": "subscribe", "subjects": [unique() for _ in range(3)]})
    assert frame["success"] is True, frame


async def test_subscribe_past_max_subjects_per_request_is_refused(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, max_subjects_per_request=3)
    client = await ws_factory(bridge.ws_url)
    subjects = [unique() for _ in range(4)]
    frame = await client.request({"action": "subscribe", "subjects": subjects})
    assert frame["success"] is False
    assert "Too many subjects" in frame["message"]
    await nats_synced(bridge)
    assert not set(subjects) & set(nats_server.subscriptions_of(bridge.name))


async def test_unsubscribe_past_max_subjects_per_request_is_refused(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, max_subjects_per_request=3)
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"action": "unsubscribe", "subjects": [unique() for _ in range(4)]})
    assert frame["success"] is False
    assert "Too many subjects" in frame["message"]


# ---------------------------------------------------------------------------
# MAX_FRAME_BYTES
# ---------------------------------------------------------------------------


async def test_control_frame_of_exactly_max_frame_bytes_is_answered(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, max_frame_bytes=1024)
    client = await ws_factory(bridge.ws_url)
    frame = await client.request(sized_frame(1024))
    assert frame["success"] is True, frame


async def test_control_frame_one_byte_under_max_frame_bytes_is_answered(
    bridge_factory, nats_server, ws_factory
):
    bridge = await bridge_factory(nats_url=nats_server.url, max_frame_bytes=1024)
    client = await ws_factory(bridge.ws_url)
    frame = await client.request(sized_frame(1023))
    assert frame["success"] is True, frame


async def test_control_frame_one_byte_over_max_frame_bytes_closes_with_1009(
    bridge_factory, nats_server, ws_factory
):
    bridge = await bridge_factory(nats_url=nats_server.url, max_frame_bytes=1024)
    client = await ws_factory(bridge.ws_url)
    await client.send(sized_frame(1025))
    assert await close_code_of(client.ws) == 1009


async def test_oversize_frame_releases_the_clients_subscriptions(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, max_frame_bytes=1024)
    client = await ws_factory(bridge.ws_url)
    subject = unique()
    await client.subscribe(subject)
    await client.send(sized_frame(4096))
    await close_code_of(client.ws)
    await eventually(lambda: subject not in nats_server.subscriptions_of(bridge.name))


# ---------------------------------------------------------------------------
# MAX_CONNECTIONS
# ---------------------------------------------------------------------------


async def test_max_connections_accepts_exactly_the_limit(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, max_connections=3)
    clients = [await ws_factory(bridge.ws_url) for _ in range(3)]
    assert all(c.welcome["success"] for c in clients)


async def test_connection_past_max_connections_gets_503_before_upgrade(
    bridge_factory, nats_server, ws_factory
):
    bridge = await bridge_factory(nats_url=nats_server.url, max_connections=3)
    for _ in range(3):
        await ws_factory(bridge.ws_url)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await ws_factory(bridge.ws_url)
    assert refused.value.status == 503


async def test_closed_connection_frees_its_slot(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, max_connections=3)
    clients = [await ws_factory(bridge.ws_url) for _ in range(3)]
    await clients[0].close()
    await eventually(lambda: len(bridge.manager.sessions) == 2)
    client = await ws_factory(bridge.ws_url)
    assert client.welcome["success"] is True


# ---------------------------------------------------------------------------
# MAX_CONNECTIONS_PER_USER (security review, finding 8).  Threat: one user's
# token opening every connection slot of the process (all 300 in 0.4 s), so
# every other user is refused with 503.  A user past the limit gets 429.
# ---------------------------------------------------------------------------


async def per_user_bridge(bridge_factory: Any, nats_server: Any, **overrides: Any) -> Any:
    overrides.setdefault("max_connections_per_user", 2)
    return await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET, **overrides)


def as_user(sub: str) -> dict[str, Any]:
    return {"headers": {"Authorization": f"Bearer {hs256(claims(sub))}"}}


async def handshake(bridge: Any, sub: str) -> tuple[int, dict[str, Any]]:
    """The HTTP status of ``sub``'s upgrade and, when refused, its JSON body."""
    headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", **as_user(sub)["headers"]}
    async with aiohttp.ClientSession() as session, session.get(
        bridge.ws_url, headers=headers, timeout=aiohttp.ClientTimeout(total=TIMEOUT)
    ) as resp:
        return resp.status, ({} if resp.status == 101 else await resp.json())


async def test_a_user_may_open_exactly_max_connections_per_user(bridge_factory, nats_server, ws_factory):
    bridge = await per_user_bridge(bridge_factory, nats_server)
    clients = [await ws_factory(bridge.ws_url, **as_user("alice")) for _ in range(2)]
    assert all(c.welcome["user"] == "alice" for c in clients)


async def test_connection_past_max_connections_per_user_is_refused_with_429_saying_why(
    bridge_factory, nats_server, ws_factory
):
    bridge = await per_user_bridge(bridge_factory, nats_server)
    for _ in range(2):
        await ws_factory(bridge.ws_url, **as_user("alice"))
    status, body = await handshake(bridge, "alice")
    assert status == 429, body
    assert "user alice already has 2 connections (MAX_CONNECTIONS_PER_USER)" in body["message"], body
    assert bridge.app.http_server.web_app[LINK].refusals["user_connections"] == 1


async def test_one_user_cannot_take_every_connection_slot_from_the_others(
    bridge_factory, nats_server, ws_factory
):
    bridge = await per_user_bridge(bridge_factory, nats_server, max_connections=4)
    outcomes = []
    for _ in range(4):
        try:
            await ws_factory(bridge.ws_url, **as_user("mallory"))
            outcomes.append(101)
        except aiohttp.WSServerHandshakeError as exc:
            outcomes.append(exc.status)
    assert outcomes == [101, 101, 429, 429]
    bob = await ws_factory(bridge.ws_url, **as_user("bob"))
    assert bob.welcome["user"] == "bob"


async def test_closed_connection_frees_its_users_slot(bridge_factory, nats_server, ws_factory):
    bridge = await per_user_bridge(bridge_factory, nats_server)
    clients = [await ws_factory(bridge.ws_url, **as_user("alice")) for _ in range(2)]
    await clients[0].close()
    await eventually(lambda: len(bridge.manager.sessions) == 1)
    client = await ws_factory(bridge.ws_url, **as_user("alice"))
    assert client.welcome["user"] == "alice"


async def test_concurrent_handshakes_of_one_user_never_pass_max_connections_per_user(
    bridge_factory, nats_server, ws_factory
):
    # The check runs before the upgrade, which may await (here: a prepare hook that
    # sleeps, as an app's own hook could): every handshake in flight must count.
    async def slow_prepare(request: Any, response: Any) -> None:
        await asyncio.sleep(0.05)

    bridge = await per_user_bridge(bridge_factory, nats_server, max_connections_per_user=3,
                                   on_response_prepare=slow_prepare)
    results = await asyncio.gather(*(ws_factory(bridge.ws_url, **as_user("alice")) for _ in range(20)),
                                   return_exceptions=True)
    accepted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, aiohttp.WSServerHandshakeError)]
    assert (len(accepted), len(refused)) == (3, 17), results
    assert {r.status for r in refused} == {429}
    assert len(bridge.manager.sessions) == 3


# ---------------------------------------------------------------------------
# CONTROL_RATE
# ---------------------------------------------------------------------------


def probe_frame(i: int) -> str:
    """A control frame the bridge answers without touching NATS (so without pausing between frames)."""
    return json.dumps({"action": "unsubscribe", "subjects": ["lim.rate"], "id": i})


def rate_limited(reply: dict[str, Any]) -> bool:
    return reply["success"] is False and "Rate limit" in reply["message"]


async def test_burst_within_control_rate_is_all_answered(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, control_rate=5)
    client = await ws_factory(bridge.ws_url)
    for i in range(5):
        await client.send(probe_frame(i))
    got = await replies(client, 5)
    assert [r.get("id") for r in got] == list(range(5))
    assert not any(rate_limited(r) for r in got)


async def test_frames_beyond_control_rate_get_rate_limit_replies(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, control_rate=5)
    client = await ws_factory(bridge.ws_url)
    for i in range(8):
        await client.send(probe_frame(i))
    got = await replies(client, 8)
    assert [rate_limited(r) for r in got] == [False] * 5 + [True] * 3


async def test_connection_survives_a_few_rate_limited_frames(bridge_factory, nats_server, ws_factory, nc):
    bridge = await bridge_factory(nats_url=nats_server.url, control_rate=5)
    client = await ws_factory(bridge.ws_url)
    subject = unique()
    await client.subscribe(subject)
    for i in range(7):
        await client.send(probe_frame(i))
    await replies(client, 7)
    await nats_synced(bridge)
    await publish(nc, subject, {"n": 1})
    frame = await client.receive_message()
    assert frame["subject"] == subject


async def test_flooding_past_control_rate_closes_with_1008(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, control_rate=5)
    client = await ws_factory(bridge.ws_url)
    for i in range(60):
        await client.send(probe_frame(i))
    limited = 0
    while True:
        msg = await asyncio.wait_for(client.ws.receive(), TIMEOUT)
        if msg.type in CLOSING:
            break
        limited += rate_limited(json.loads(msg.data))
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1008)
    assert limited > 0


async def test_burst_of_40_frames_gets_every_reply_up_to_the_close_then_1008(bridge, ws_factory):
    # Default CONTROL_RATE (20/s, burst 20) and 10 strikes: frames 0-19 succeed,
    # 20-29 get rate-limit replies, and the 10th of those (frame 29) closes.
    client = await ws_factory(bridge.ws_url)
    subject = unique("flood")
    for i in range(40):
        await client.send({"subjects": [subject], "action": "subscribe", "id": i})
    got = []
    while True:
        msg = await asyncio.wait_for(client.ws.receive(), TIMEOUT)
        if msg.type in CLOSING:
            break
        got.append(json.loads(msg.data))
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1008)
    assert [r["id"] for r in got] == list(range(len(got)))
    successes = [r for r in got if r["success"]]
    assert successes == got[: len(successes)] and len(successes) >= 20
    assert all(rate_limited(r) for r in got[len(successes):])
    assert len(got) - len(successes) == 10


async def test_flooding_client_counts_as_one_rate_limit_disconnect(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, control_rate=5)
    client = await ws_factory(bridge.ws_url)
    for i in range(60):
        await client.send(probe_frame(i))
    await close_code_of(client.ws)
    await eventually(lambda: not bridge.manager.sessions)
    # bridge_rate_limit_disconnects is documented as "Clients closed with 1008".
    assert bridge.manager.stats.rate_limit_disconnects == 1


async def test_control_rate_below_one_per_second_still_allows_a_first_frame(
    bridge_factory, nats_server, ws_factory
):
    # CONTROL_RATE=0.5 should mean one frame every two seconds, not none at all.
    bridge = await bridge_factory(nats_url=nats_server.url, control_rate=0.5)
    client = await ws_factory(bridge.ws_url)
    frame = await client.request(probe_frame(1))
    assert not rate_limited(frame), frame


# Pings and pongs count against CONTROL_RATE (security review, finding 7).
# Threat: a ping flood.  aiohttp answered every ping by itself, at any rate:
# 12 connections flooding 125-byte pings took a healthy client's p50 from
# 2.5 ms to 411 ms.  Within the budget a ping gets its pong; past it, no pong
# and no error reply, only strikes, and then 1008 like any other flood.

PING = b"p" * 125  # the largest payload a control frame may carry


async def control_flood(ws: aiohttp.ClientWebSocketResponse, send: Any, n: int = 200) -> None:
    """Send ``n`` control frames as fast as the socket takes them, until the server closes."""
    with suppress(ConnectionError):
        for _ in range(n):
            if ws.closed:
                return
            await send(PING)


async def after_flood(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, list[Any], int | None]:
    """Pongs received, other frames received, and the close code, up to the server's close."""
    pongs, others = 0, []
    while True:
        msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
        if msg.type is aiohttp.WSMsgType.PONG:
            pongs += 1
        elif msg.type in CLOSING:
            return pongs, others, int(msg.data) if msg.type is aiohttp.WSMsgType.CLOSE else None
        else:
            others.append(msg)


async def test_ping_flood_is_closed_with_1008_while_another_client_keeps_receiving(
    bridge, ws_factory, nc
):
    healthy = await ws_factory(bridge.ws_url)
    subject = unique()
    await healthy.subscribe(subject)
    flooder = await ws_factory(bridge.ws_url, autoping=False)
    await control_flood(flooder.ws, flooder.ws.ping)
    pongs, others, code = await after_flood(flooder.ws)
    assert code == 1008
    assert others == []  # no error reply for a ping
    assert 1 <= pongs < 200
    await nats_synced(bridge)
    await publish(nc, subject, {"still": "served"})
    assert (await healthy.receive_message())["data"] == {"still": "served"}


async def test_pong_flood_is_closed_with_1008(bridge, ws_factory):
    flooder = await ws_factory(bridge.ws_url, autoping=False)
    await control_flood(flooder.ws, flooder.ws.pong)
    _, others, code = await after_flood(flooder.ws)
    assert (code, others) == (1008, [])


async def test_pings_within_the_rate_get_their_pongs(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, control_rate=5)
    client = await ws_factory(bridge.ws_url, autoping=False)
    for i in range(5):
        await client.ws.ping(b"ping %d" % i)
    answers = [await asyncio.wait_for(client.ws.receive(), TIMEOUT) for _ in range(5)]
    assert [(m.type, m.data) for m in answers] == [(aiohttp.WSMsgType.PONG, b"ping %d" % i) for i in range(5)]


async def test_ping_past_the_rate_gets_no_pong_and_no_reply(bridge_factory, nats_server, ws_factory):
    # One frame a second (a burst of one): the first ping is answered, the next two are not.
    bridge = await bridge_factory(nats_url=nats_server.url, control_rate=1)
    client = await ws_factory(bridge.ws_url, autoping=False)
    for i in range(3):
        await client.ws.ping(b"ping %d" % i)
    answer = await asyncio.wait_for(client.ws.receive(), TIMEOUT)
    assert (answer.type, answer.data) == (aiohttp.WSMsgType.PONG, b"ping 0")
    with pytest.raises(asyncio.TimeoutError):
        extra = await asyncio.wait_for(client.ws.receive(), 0.5)  # well inside the next second
        pytest.fail(f"unexpected {extra}")


async def test_pings_spend_the_same_budget_as_requests(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, control_rate=1)
    client = await ws_factory(bridge.ws_url, autoping=False)
    await client.ws.ping(b"spends the one token of this second")
    assert (await asyncio.wait_for(client.ws.receive(), TIMEOUT)).type is aiohttp.WSMsgType.PONG
    assert rate_limited(await client.request(probe_frame(1)))


# ---------------------------------------------------------------------------
# CLIENT_QUEUE_* : a client whose socket does not drain
# ---------------------------------------------------------------------------


def small_buffer_socket(addr_info: Any) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    return sock


async def connect_small_buffer(url: str) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_buffer_socket))
    try:
        ws = await asyncio.wait_for(session.ws_connect(url), TIMEOUT)
    except BaseException:
        await session.close()
        raise
    return session, ws


async def next_json(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
    assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, ws.close_code)
    return json.loads(msg.data)


async def flood(nc: Any, subject: str, count: int, size: int) -> None:
    pad = "x" * size
    for n in range(count):
        await nc.publish(subject, json.dumps({"n": n, "pad": pad}).encode())
        if n % 50 == 49:
            await asyncio.wait_for(nc.flush(), TIMEOUT)
    await asyncio.wait_for(nc.flush(), TIMEOUT)


FLOOD_COUNT = 300
FLOOD_SIZE = 16 * 1024


async def test_drop_oldest_tells_a_slow_client_how_many_were_dropped(bridge_factory, nats_server, nc):
    bridge = await bridge_factory(
        nats_url=nats_server.url, client_queue_messages=8, client_queue_overflow="drop_oldest"
    )
    session, ws = await connect_small_buffer(bridge.ws_url)
    try:
        await next_json(ws)  # welcome
        subject = unique()
        await ws.send_str(json.dumps({"action": "subscribe", "subjects": [subject]}))
        assert (await next_json(ws))["success"] is True
        await nats_synced(bridge)
        await flood(nc, subject, FLOOD_COUNT, FLOOD_SIZE)
        await eventually(lambda: bridge.manager.stats.messages_received >= FLOOD_COUNT)
        received, dropped = [], []
        while not received or received[-1] != FLOOD_COUNT - 1:
            frame = await next_json(ws)
            if frame.get("type") == "dropped":
                dropped.append(frame["dropped"])
            elif "subject" in frame:
                received.append(frame["data"]["n"])
        assert dropped and all(n > 0 for n in dropped)
        assert received == sorted(set(received))  # in order, no repeats
        assert len(received) + sum(dropped) == FLOOD_COUNT
    finally:
        with suppress(Exception):
            await asyncio.wait_for(ws.close(), TIMEOUT)
        await session.close()


async def test_drop_oldest_keeps_the_slow_client_connected(bridge_factory, nats_server, nc):
    bridge = await bridge_factory(
        nats_url=nats_server.url, client_queue_messages=8, client_queue_overflow="drop_oldest"
    )
    session, ws = await connect_small_buffer(bridge.ws_url)
    try:
        await next_json(ws)
        subject = unique()
        await ws.send_str(json.dumps({"action": "subscribe", "subjects": [subject]}))
        await next_json(ws)
        await nats_synced(bridge)
        await flood(nc, subject, FLOOD_COUNT, FLOOD_SIZE)
        await eventually(lambda: bridge.manager.stats.messages_received >= FLOOD_COUNT)
        assert bridge.manager.stats.dropped > 0
        await ws.send_str(json.dumps({"action": "subscribe", "subjects": [unique()], "id": "after"}))
        while True:
            frame = await next_json(ws)
            if frame.get("id") == "after":
                break
        assert frame["success"] is True
    finally:
        with suppress(Exception):
            await asyncio.wait_for(ws.close(), TIMEOUT)
        await session.close()


async def test_slow_client_is_closed_with_1013_when_its_queue_overflows(bridge_factory, nats_server, nc):
    bridge = await bridge_factory(nats_url=nats_server.url, client_queue_messages=8)
    session, ws = await connect_small_buffer(bridge.ws_url)
    try:
        await next_json(ws)
        subject = unique()
        await ws.send_str(json.dumps({"action": "subscribe", "subjects": [subject]}))
        await next_json(ws)
        await nats_synced(bridge)
        await flood(nc, subject, FLOOD_COUNT, FLOOD_SIZE)
        await eventually(lambda: bridge.manager.stats.slow_consumer_disconnects == 1)
        assert await close_code_of(ws) == 1013
    finally:
        with suppress(Exception):
            await asyncio.wait_for(ws.close(), TIMEOUT)
        await session.close()


# ---------------------------------------------------------------------------
# PING_INTERVAL / PONG_TIMEOUT
# ---------------------------------------------------------------------------


async def test_client_that_never_answers_pings_is_closed(bridge_factory, nats_server, ws_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, ping_interval=0.5, pong_timeout=0.5)
    client = await ws_factory(bridge.ws_url, autoping=False)
    await client.subscribe(unique())
    pings = 0
    while True:
        msg = await asyncio.wait_for(client.ws.receive(), TIMEOUT)
        if msg.type is aiohttp.WSMsgType.PING:
            pings += 1  # and never answered
            continue
        assert msg.type in CLOSING, msg
        break
    assert pings >= 1


async def test_client_that_never_answers_pings_has_its_subscriptions_released(
    bridge_factory, nats_server, ws_factory
):
    bridge = await bridge_factory(nats_url=nats_server.url, ping_interval=0.5, pong_timeout=0.5)
    client = await ws_factory(bridge.ws_url, autoping=False)
    subject = unique()
    await client.subscribe(subject)
    await nats_synced(bridge)
    assert subject in nats_server.subscriptions_of(bridge.name)
    # The client's socket stays open on its side; it just never sends a pong.
    await eventually(lambda: not bridge.manager.sessions)
    await eventually(lambda: subject not in nats_server.subscriptions_of(bridge.name))


async def test_client_answering_pings_stays_connected_past_several_intervals(
    bridge_factory, nats_server, ws_factory, nc
):
    bridge = await bridge_factory(nats_url=nats_server.url, ping_interval=0.5, pong_timeout=0.5)
    client = await ws_factory(bridge.ws_url)  # autoping: receive() answers every ping
    subject = unique()
    await client.subscribe(subject)
    await client.assert_silent(3.0)
    await nats_synced(bridge)
    await publish(nc, subject, {"still": "here"})
    frame = await client.receive_message()
    assert frame["data"] == {"still": "here"}


# ---------------------------------------------------------------------------
# Origin
# ---------------------------------------------------------------------------


async def origin_status(ws_factory: Any, url: str, origin: str | None) -> int:
    """101 if the upgrade with this Origin succeeds, else the HTTP status of the refusal."""
    kwargs = {} if origin is None else {"origin": origin}
    try:
        await ws_factory(url, **kwargs)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    return 101


async def test_same_origin_is_allowed(bridge, ws_factory):
    assert await origin_status(ws_factory, bridge.ws_url, bridge.http_url) == 101


async def test_foreign_origin_is_refused_with_403(bridge, ws_factory):
    assert await origin_status(ws_factory, bridge.ws_url, "http://evil.example.org") == 403


async def test_same_host_on_another_port_is_a_foreign_origin(bridge, ws_factory):
    other = f"http://127.0.0.1:{bridge.port + 1}"
    assert await origin_status(ws_factory, bridge.ws_url, other) == 403


async def test_request_without_origin_is_allowed(bridge, ws_factory):
    assert await origin_status(ws_factory, bridge.ws_url, None) == 101


@pytest.mark.parametrize("origin", ["https://app.example", "null"])
async def test_refused_origin_log_line_names_the_origin_and_the_setting(bridge, ws_factory, caplog, origin):
    caplog.set_level("INFO", logger="bridge.web.access")
    assert await origin_status(ws_factory, bridge.ws_url, origin) == 403
    messages = [r.getMessage() for r in caplog.records if r.name == "bridge.web.access"]
    lines = [m for m in messages if "refused /stream" in m]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"refused /stream from 127.0.0.1: Origin {origin} "), lines
    assert "ALLOWED_ORIGINS" in lines[0], lines


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        ("http://a.example.com", 101),
        ("http://a.b.example.com", 101),
        ("http://example.com.evil.io", 403),
        ("http://a.example.com.evil.io", 403),
        ("http://evil.io/.example.com", 403),
        ("https://a.example.com", 403),
        ("http://a.example.com:8080", 403),
    ],
)
async def test_allowed_origins_wildcard(bridge_factory, nats_server, ws_factory, origin, status):
    bridge = await bridge_factory(nats_url=nats_server.url, allowed_origins=("http://*.example.com",))
    assert await origin_status(ws_factory, bridge.ws_url, origin) == status


# ---------------------------------------------------------------------------
# AUTH_TOKENS
# ---------------------------------------------------------------------------

TOKENS = ("s3cret-one", "s3cret-two")
CONTROL = "backend-s3cret"


async def auth_status(ws_factory: Any, url: str, **kwargs: Any) -> int:
    try:
        await ws_factory(url, **kwargs)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    return 101


@pytest.fixture
async def auth_bridge(bridge_factory, nats_server):
    return await bridge_factory(nats_url=nats_server.url, auth_tokens=TOKENS, control_tokens=(CONTROL,))


async def test_auth_without_token_is_refused_with_401(auth_bridge, ws_factory):
    assert await auth_status(ws_factory, auth_bridge.ws_url) == 401


async def test_auth_with_wrong_token_is_refused_with_401(auth_bridge, ws_factory):
    headers = {"Authorization": "Bearer s3cret-three"}
    assert await auth_status(ws_factory, auth_bridge.ws_url, headers=headers) == 401


async def test_auth_with_token_prefix_is_refused_with_401(auth_bridge, ws_factory):
    assert await auth_status(ws_factory, auth_bridge.ws_url + "?token=s3cret") == 401


async def test_auth_bearer_header_is_accepted(auth_bridge, ws_factory):
    headers = {"Authorization": "Bearer s3cret-one"}
    assert await auth_status(ws_factory, auth_bridge.ws_url, headers=headers) == 101


async def test_auth_second_token_of_the_list_is_accepted(auth_bridge, ws_factory):
    headers = {"Authorization": "Bearer s3cret-two"}
    assert await auth_status(ws_factory, auth_bridge.ws_url, headers=headers) == 101


async def test_auth_token_query_parameter_is_accepted(auth_bridge, ws_factory):
    assert await auth_status(ws_factory, auth_bridge.ws_url + "?token=s3cret-one") == 101


async def test_auth_cookie_is_accepted(auth_bridge, ws_factory):
    headers = {"Cookie": "bridge_token=s3cret-one"}
    assert await auth_status(ws_factory, auth_bridge.ws_url, headers=headers) == 101


async def test_auth_post_endpoint_without_token_is_refused_with_401(auth_bridge, ws_factory):
    client = await ws_factory(auth_bridge.ws_url, headers={"Authorization": "Bearer s3cret-one"})
    url = f"{auth_bridge.http_url}/clients/{client.connection_id}"
    async with aiohttp.ClientSession() as session:
        body = {"action": "subscribe", "subjects": [unique()]}
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as resp:
            assert resp.status == 401
    assert not client.ws.closed
    assert not bridge_clients_subjects(auth_bridge)


async def post_subscribe_status(bridge: Any, client: Any, headers: dict[str, str]) -> int:
    url = f"{bridge.http_url}/clients/{client.connection_id}"
    async with aiohttp.ClientSession() as session:
        body = {"action": "subscribe", "subjects": [unique()]}
        async with session.post(
            url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=TIMEOUT)
        ) as resp:
            return resp.status


async def test_auth_post_endpoint_with_a_users_token_is_refused_with_403(auth_bridge, ws_factory):
    client = await ws_factory(auth_bridge.ws_url, headers={"Authorization": "Bearer s3cret-one"})
    assert await post_subscribe_status(auth_bridge, client, {"Authorization": "Bearer s3cret-two"}) == 403
    assert not bridge_clients_subjects(auth_bridge)


async def test_auth_post_endpoint_with_a_control_token_is_accepted(auth_bridge, ws_factory):
    client = await ws_factory(auth_bridge.ws_url, headers={"Authorization": "Bearer s3cret-one"})
    assert await post_subscribe_status(auth_bridge, client, {"Authorization": f"Bearer {CONTROL}"}) == 200


def bridge_clients_subjects(bridge: Any) -> set[str]:
    return {s for c in bridge.manager.sessions.values() for s in c.subscriptions}
