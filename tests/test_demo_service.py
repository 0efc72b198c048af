"""The demo service (services/demo_service.py): a Panini microservice the page calls through the bridge.

The service runs as a real process on the session's nats-server, as ``make run`` and the
compose files run it; the bridge runs in-process with PUBLISH_ALLOW covering its subjects.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import nats
import pytest
from conftest import ROOT, TIMEOUT, NatsServer

SERVICE = ROOT / "services" / "demo_service.py"


def load_service() -> Any:
    spec = importlib.util.spec_from_file_location("demo_service", SERVICE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo_service = load_service()


@pytest.fixture
def start_service(nats_server: NatsServer) -> Iterator[Callable[[], subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, str(SERVICE)], cwd=ROOT, text=True,
                                env={**os.environ, "NATS_URL": nats_server.url},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate(timeout=10)


def services_subscribed(server: NatsServer) -> int:
    """How many demo services have subscribed both subjects (nats-server's own view, /connz)."""
    connz = server.monitor("/connz?subs=1&limit=1000")
    return sum(1 for c in connz.get("connections") or [] if c.get("name", "").startswith("demo_service")
               and {demo_service.ECHO, demo_service.TIME} <= set(c.get("subscriptions_list") or []))


async def answers_to_one_request(nc: Any, subject: str, wait: float = 0.5) -> list[bytes]:
    """Every answer one request gets within ``wait`` seconds."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, b"{}", reply=inbox)
    got = []
    try:
        while True:
            got.append((await sub.next_msg(timeout=wait)).data)
    except nats.errors.TimeoutError:
        pass
    await sub.unsubscribe()
    return got


@pytest.mark.slow
async def test_two_demo_services_answer_each_request_once(nats_server, start_service):
    start_service()
    start_service()
    deadline = asyncio.get_running_loop().time() + 30
    while await asyncio.to_thread(services_subscribed, nats_server) < 2:
        assert asyncio.get_running_loop().time() < deadline, "two demo services did not come up"
        await asyncio.sleep(0.2)
    nc = await asyncio.wait_for(nats.connect(nats_server.url), TIMEOUT)
    try:
        counts = [len(await answers_to_one_request(nc, demo_service.ECHO)) for _ in range(6)]
    finally:
        await asyncio.wait_for(nc.close(), TIMEOUT)
    assert counts == [1] * 6


@pytest.mark.slow
async def test_demo_service_stops_on_sigterm_with_exit_code_0_and_no_traceback(nats_server, start_service):
    proc = start_service()
    deadline = asyncio.get_running_loop().time() + 30
    while await asyncio.to_thread(services_subscribed, nats_server) < 1:
        assert asyncio.get_running_loop().time() < deadline, "the demo service did not come up"
        await asyncio.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.to_thread(proc.communicate, timeout=TIMEOUT)
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out


def test_echo_answers_json_as_json_and_says_how_other_payloads_travel():
    assert demo_service.echoed(b'{"n": 1}', {"X": "y"}) == {"data": {"n": 1}, "headers": {"X": "y"}}
    assert demo_service.echoed(b"plain", None) == {"data": "plain", "encoding": "text", "headers": {}}
    assert demo_service.echoed(b"\xff", None) == {"data": "/w==", "encoding": "base64", "headers": {}}


@pytest.mark.slow
async def test_demo_service_answers_echo_through_the_bridge_with_data_and_headers(
    nats_server, bridge_factory, ws_factory, start_service
):
    start_service()
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("svc.echo", "svc.time"))
    client = await ws_factory(bridge.ws_url)
    frame = await until_answered(client, {"action": "request", "subject": "svc.echo",
                                          "data": {"n": 123456789012345678901}, "headers": {"X-Trace": "t1"}})
    assert frame["data"] == {"data": {"n": 123456789012345678901}, "headers": {"X-Trace": "t1"}}


@pytest.mark.slow
async def test_demo_service_answers_time_through_the_bridge(nats_server, bridge_factory, ws_factory,
                                                            start_service):
    start_service()
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("svc.echo", "svc.time"))
    client = await ws_factory(bridge.ws_url)
    frame = await until_answered(client, {"action": "request", "subject": "svc.time", "data": ""})
    stamp = dt.datetime.fromisoformat(frame["data"]["time"].replace("Z", "+00:00"))
    assert abs(stamp.timestamp() - frame["data"]["unix"]) < 0.001


async def until_answered(client: Any, request: dict[str, Any]) -> dict[str, Any]:
    """The answer, asking again while the service is still starting (no responders yet)."""
    for _ in range(150):
        frame = await client.request(request)
        if frame.get("error") != "no_responders":
            assert frame["success"], frame
            return frame
        await asyncio.sleep(0.2)
    raise AssertionError("the demo service never answered")
