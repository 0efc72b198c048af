"""Operations: metrics, logs, configuration and the settings table in docs/operations.md."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp
import pytest
from conftest import TIMEOUT, eventually, metric_samples

from bridge import config

ROOT = Path(__file__).resolve().parent.parent


async def scrape(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    return metric_samples(text)


async def test_metrics_count_connections_subscriptions_and_delivered_frames(bridge, ws_factory, nc):
    before = await scrape(bridge.http_url)
    client = await ws_factory(bridge.ws_url)
    await client.subscribe("metrics.a", "metrics.b")
    await nc.publish("metrics.a", b"{}")
    await client.receive_message()
    after = await scrape(bridge.http_url)
    assert after["bridge_connections"] == before["bridge_connections"] + 1
    assert after["bridge_client_subscriptions"] == before["bridge_client_subscriptions"] + 2
    assert after["bridge_nats_subscriptions"] == before["bridge_nats_subscriptions"] + 2
    assert after["bridge_nats_messages_received_total"] >= before["bridge_nats_messages_received_total"] + 1
    # welcome + reply + message
    assert after["bridge_frames_sent_total"] >= before["bridge_frames_sent_total"] + 3
    assert after["bridge_bytes_sent_total"] > before["bridge_bytes_sent_total"]
    assert after["bridge_nats_connected"] == 1


async def test_metrics_count_bad_frames_by_kind(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    await client.request("not json")
    await client.request({"subjects": ["a..b"]})
    samples = await scrape(bridge.http_url)
    assert samples['bridge_bad_frames_total{kind="json"}'] == 1
    assert samples['bridge_bad_frames_total{kind="subject"}'] == 1


async def test_metrics_count_handshake_refusals_by_reason(nats_server, bridge_factory):
    bridge = await bridge_factory(nats_url=nats_server.url)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await asyncio.wait_for(
                session.ws_connect(bridge.ws_url, headers={"Origin": "http://evil.example"}), TIMEOUT
            )
    assert refused.value.status == 403
    samples = await scrape(bridge.http_url)
    assert samples['bridge_handshake_refusals_total{reason="origin"}'] == 1


async def test_metrics_gauges_return_to_zero_after_clients_leave(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    await client.subscribe("metrics.gone")
    await client.close()

    async def settled() -> bool:
        samples = await scrape(bridge.http_url)
        return samples["bridge_connections"] == 0 and samples["bridge_nats_subscriptions"] == 0

    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not await settled():
        assert asyncio.get_running_loop().time() < deadline, "gauges did not return to zero"
        await asyncio.sleep(0.05)


async def test_json_logs_are_one_object_per_line_with_connection_open_and_close(nats_server, bridge_process):
    proc = bridge_process(
        env={"NATS_URL": nats_server.url, "LOG_FORMAT": "json", "TEST_PUBLISH_INTERVAL": "0"}
    )

    async def one_connection() -> str:
        async with aiohttp.ClientSession() as session:
            ws = await asyncio.wait_for(session.ws_connect(proc.http_url + "/stream"), TIMEOUT)
            welcome = json.loads((await asyncio.wait_for(ws.receive(), TIMEOUT)).data)
            await ws.close()
            return welcome["connection_id"]

    connection_id = await one_connection()
    code, output = await asyncio.to_thread(proc.stop)
    assert code == 0, output
    lines = [line for line in output.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line parses
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    messages = [e["message"] for e in entries]
    assert any(connection_id in m and "opened" in m for m in messages)
    closed = [m for m in messages if connection_id in m and "closed" in m]
    assert closed and re.search(r"code \d+", closed[0]) and "frames sent" in closed[0]


def test_operations_doc_settings_table_matches_the_code():
    doc = (ROOT / "docs" / "operations.md").read_text()
    block = doc.split("<!-- settings-table -->")[1].split("<!-- /settings-table -->")[0].strip()
    assert block == config.settings_table()


def test_every_setting_has_an_env_var_and_flag_and_env_is_overridden_by_flag():
    cfg = config.load_config(
        ["--http-port", "6000"], {"HTTP_PORT": "7000", "NATS_URL": "nats://a:1,nats://b:2"}
    )
    assert cfg.http_port == 6000
    assert cfg.nats_servers == ["nats://a:1", "nats://b:2"]


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("HTTP_PORT", "abc"),
        ("HTTP_PORT", "70000"),
        ("NATS_URL", "http://x"),
        ("TEST_PUBLISH_INTERVAL", "-1"),
        ("CLIENT_QUEUE_OVERFLOW", "explode"),
        ("SUBJECT_DENY", "a..b"),
        ("LOG_FORMAT", "xml"),
        ("PRESENCE_TTL", "1.5"),
        ("PRESENCE_TTL", "2"),
        ("PRESENCE_SUBJECTS", "room.{sub}x"),
    ],
)
def test_bad_setting_is_a_config_error_naming_the_setting(env, value):
    with pytest.raises(config.ConfigError) as error:
        config.load_config([], {env: value})
    assert env in str(error.value) and "\n" not in str(error.value)


def test_empty_subject_deny_keeps_the_built_in_protected_subjects():
    # Finding 6: SUBJECT_DENY adds to the built-in list; emptying it removes nothing.
    perms = config.load_config([], {"SUBJECT_DENY": ""}).policy.for_user()
    assert perms.subscribe_refusal("$JS.>") is not None and perms.subscribe_refusal("_INBOX.>") is not None


async def test_readyz_is_ready_and_healthz_is_ok(bridge):
    async with aiohttp.ClientSession() as session:
        for path, body in (
            ("/healthz", {"status": "ok"}),
            ("/readyz", {"status": "ready", "nats": "connected"}),
        ):
            async with session.get(bridge.http_url + path, timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as r:
                assert r.status == 200
                assert await r.json() == body


async def test_manager_holds_no_state_after_all_clients_leave(bridge, ws_factory):
    clients = [await ws_factory(bridge.ws_url) for _ in range(5)]
    for i, client in enumerate(clients):
        await client.subscribe(f"state.{i % 2}")
    for client in clients:
        await client.close()
    await eventually(lambda: not bridge.manager.sessions and not bridge.manager.registry.topics)


async def test_importing_the_bridge_leaves_asyncio_with_its_c_tasks_and_futures():
    # Panini's import applies nest_asyncio (pure-Python Task/Future); main.py undoes it.
    import _asyncio

    assert asyncio.Task is _asyncio.Task
    assert asyncio.Future is _asyncio.Future
    assert type(asyncio.current_task()) is _asyncio.Task
    assert "_nest_patched" not in vars(asyncio.SelectorEventLoop)
