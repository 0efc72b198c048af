"""Every HTTP answer's security headers (headers.py) and the Host check against DNS rebinding
(access.check_host, ALLOWED_HOSTS), against a real bridge over real sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from conftest import TIMEOUT, metric_samples, nats_synced, unique
from minting import SECRET, claims, hs256

from bridge import config
from bridge.web.access import host_allowed
from bridge.web.headers import SECURITY_HEADERS

REBOUND = "attacker.example"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        yield session


async def status_of(http: aiohttp.ClientSession, method: str, url: str, host: str | None = None,
                    **kwargs: Any) -> tuple[int, dict[str, str], str]:
    headers = {"Host": host} if host is not None else {}
    async with http.request(method, url, headers=headers, **kwargs) as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def handshake(bridge: Any, host: str, origin: str | None = None, query: str = "") -> int:
    """101 if the upgrade with this Host (and Origin) succeeds, else the status of the refusal."""
    headers = {"Host": host}
    if origin is not None:
        headers["Origin"] = origin
    async with aiohttp.ClientSession() as session:
        try:
            ws = await asyncio.wait_for(session.ws_connect(bridge.ws_url + query, headers=headers), TIMEOUT)
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101


# ---------------------------------------------------------------------------
# Security headers
# ---------------------------------------------------------------------------

ROUTES = [("GET", "/"), ("GET", "/static/app.js"), ("GET", "/static/bridge-socket-worker.js"),
          ("GET", "/metrics"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/no-such-page"),
          ("POST", "/clients/no-such-connection"), ("DELETE", "/users/nobody")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_every_answer_carries_the_security_headers(bridge, http, method, path):
    _, headers, _ = await status_of(http, method, bridge.http_url + path)
    for name, value in SECURITY_HEADERS.items():
        assert headers.get(name) == value, (path, name, headers)


def test_the_policy_forbids_framing_by_others_and_connections_elsewhere():
    directives = dict(d.strip().split(" ", 1) for d in SECURITY_HEADERS["Content-Security-Policy"].split(";"))
    assert directives["frame-ancestors"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert directives["default-src"] == "'none'"


async def test_the_page_carries_no_policy_of_its_own_beside_the_header(bridge, http):
    _, _, body = await status_of(http, "GET", bridge.http_url + "/")
    assert 'http-equiv="content-security-policy"' not in body.lower()


async def test_a_refused_handshake_carries_the_security_headers(nats_server, bridge_factory, http):
    bridge = await bridge_factory(nats_url=nats_server.url, auth_tokens=("t1",))
    status, headers, _ = await status_of(http, "GET", bridge.ws_url)
    assert status == 401
    assert headers["X-Frame-Options"] == "SAMEORIGIN"


# ---------------------------------------------------------------------------
# Host: DNS rebinding
# ---------------------------------------------------------------------------


async def test_rebound_host_is_refused_on_stream_without_auth(bridge):
    port = bridge.port
    status = await handshake(bridge, f"{REBOUND}:{port}", origin=f"http://{REBOUND}:{port}")
    assert status == 421
    assert bridge.manager.sessions == {}


async def test_rebound_host_refusal_names_the_setting(bridge, http):
    status, _, body = await status_of(http, "GET", bridge.ws_url, host=f"{REBOUND}:{bridge.port}")
    assert status == 421
    assert json.loads(body) == {
        "success": False, "message": f"Host {REBOUND} is not allowed: add it to ALLOWED_HOSTS"}


async def test_rebound_host_cannot_use_the_open_control_api(bridge, http, ws_factory):
    client = await ws_factory(bridge.ws_url)
    subject = unique()
    status, _, _ = await status_of(
        http, "POST", f"{bridge.http_url}/clients/{client.connection_id}", host=f"{REBOUND}:{bridge.port}",
        data=json.dumps({"subjects": [subject], "action": "subscribe"}))
    assert status == 421
    await nats_synced(bridge)
    assert [set(c.subscriptions) for c in bridge.manager.sessions.values()] == [set()]


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/metrics", "/healthz", "/readyz", "/nothing"])
async def test_rebound_host_is_refused_on_every_route(bridge, http, path):
    status, _, _ = await status_of(http, "GET", bridge.http_url + path, host=REBOUND)
    assert status == 421


async def test_rebound_host_refusals_are_counted(bridge, http):
    await status_of(http, "GET", bridge.ws_url, host=REBOUND)
    _, _, text = await status_of(http, "GET", bridge.http_url + "/metrics")
    assert metric_samples(text)['bridge_handshake_refusals_total{reason="host"}'] == 1


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:{port}", "10.1.2.3:80", "[::1]", "[::1]:{port}",
                                  "localhost", "LOCALHOST:{port}", "localhost.:{port}",
                                  "app.localhost:{port}"])
async def test_ip_addresses_and_localhost_are_always_served(bridge, host):
    assert await handshake(bridge, host.format(port=bridge.port)) == 101


@pytest.mark.parametrize(("allowed", "host", "status"), [
    (("bridge.example.com",), "bridge.example.com:{port}", 101),
    (("bridge.example.com",), "BRIDGE.example.com", 101),
    (("bridge.example.com",), "other.example.com", 421),
    (("*.example.com",), "a.example.com:{port}", 101),
    (("*.example.com",), "a.b.example.com", 101),
    (("*.example.com",), "example.com", 421),
    (("*.example.com",), "example.com.evil.io", 421),
    (("*",), "anything.example.org", 101),
])
async def test_allowed_hosts_lets_listed_names_through(nats_server, bridge_factory, allowed, host, status):
    bridge = await bridge_factory(nats_url=nats_server.url, allowed_hosts=allowed)
    assert await handshake(bridge, host.format(port=bridge.port)) == status


async def test_any_host_is_served_with_auth_tokens(nats_server, bridge_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, auth_tokens=("t1",))
    assert await handshake(bridge, f"{REBOUND}:{bridge.port}", query="?token=t1") == 101


async def test_any_host_is_served_with_jwt(nats_server, bridge_factory):
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET)
    assert await handshake(bridge, REBOUND, query="?token=" + hs256(claims("ada"))) == 101


@pytest.mark.parametrize(("host", "allowed"), [
    (None, True),  # no Host at all: not a browser
    ("127.0.0.1:5001", True),
    ("[2001:db8::1]:443", True),
    ("::1", True),
    ("bridge1:5001", False),
    ("localhost.evil.io", False),
    ("evil.io#.localhost", False),
    ("127.0.0.1.nip.io", False),
    ("[::1", False),
    ("localhost:port", False),
    ("", False),
])
def test_host_allowed_without_allowed_hosts(host, allowed):
    assert host_allowed(host, ()) is allowed


@pytest.mark.parametrize("value", ["https://bridge.example.com", "bridge.example.com:5001", "a/b", "a b"])
def test_allowed_hosts_takes_host_names_only(value):
    with pytest.raises(config.ConfigError, match="ALLOWED_HOSTS"):
        config.load_config([], {"ALLOWED_HOSTS": value})


# ---------------------------------------------------------------------------
# Static files: nothing outside static/
# ---------------------------------------------------------------------------


async def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """The status and body of a GET sent exactly as written (no client normalises the path)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("target", ["/static/../main.py", "/static/%2e%2e/main.py", "/static/..%2fmain.py",
                                    "/static/%2e%2e%2fconfig.py", "/static//etc/passwd",
                                    "/static/..\\main.py", "/static/....//main.py"])
async def test_static_paths_cannot_leave_the_static_folder(bridge, target):
    status, body = await raw_get(bridge.port, target)
    assert status in (400, 403, 404), (status, body[:200])
    assert b"create_app" not in body and b"root:" not in body
