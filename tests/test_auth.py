"""Per-user authorization end to end: real tokens, a real bridge, real NATS, real sockets.

Alice and Bob connect with JWTs signed here; the bridge's policy gives each
user their own subjects (``user.{sub}.>``) and everyone ``public.>``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import ROOT, TIMEOUT, close_of, nats_synced, publish
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from minting import (
    SECRET,
    claims,
    ec_key,
    ed_key,
    hmac_with_public_key,
    hs256,
    rsa_key,
    signed,
    tampered,
    unsigned,
)

from bridge.process.metrics import LINK

CONTROL = "backend-control-secret"
POLICY = {"subject_allow": ("user.{sub}.>", "public.>"), "publish_allow": ("user.{sub}.>",)}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def jwt_bridge(bridge_factory, nats_server):
    return await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET, control_tokens=(CONTROL,),
                                **POLICY)


async def connect(ws_factory: Any, bridge: Any, token: str) -> Any:
    return await ws_factory(bridge.ws_url, headers=bearer(token))


async def refusal(bridge: Any, token: str | None, **params: str) -> tuple[int, dict[str, Any]]:
    """The HTTP status and body of an upgrade the bridge refuses (101 and {} if it accepts)."""
    headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    if token is not None:
        headers.update(bearer(token))
    async with aiohttp.ClientSession() as session, session.get(
        bridge.ws_url, headers=headers, params=params, timeout=aiohttp.ClientTimeout(total=TIMEOUT)
    ) as resp:
        if resp.status == 101:
            return 101, {}
        return resp.status, await resp.json()


async def next_of_type(client: Any, kind: str) -> dict[str, Any]:
    while True:
        frame = await client.receive()
        if frame.get("type") == kind:
            return frame


# ---------------------------------------------------------------------------
# Connecting with a token
# ---------------------------------------------------------------------------


async def test_welcome_names_the_user_and_the_tokens_expiry(jwt_bridge, ws_factory):
    payload = claims("alice")
    client = await connect(ws_factory, jwt_bridge, hs256(payload))
    assert (client.welcome["user"], client.welcome["expires_at"]) == ("alice", payload["exp"])


async def test_token_in_query_string_is_accepted(jwt_bridge, ws_factory):
    client = await ws_factory(jwt_bridge.ws_url + "?token=" + hs256(claims("alice")))
    assert client.welcome["user"] == "alice"


async def test_token_in_cookie_is_accepted(jwt_bridge, ws_factory):
    client = await ws_factory(jwt_bridge.ws_url, headers={"Cookie": f"bridge_token={hs256(claims('alice'))}"})
    assert client.welcome["user"] == "alice"


@pytest.mark.parametrize("make_key", [rsa_key, ec_key, ed_key], ids=["RS256", "ES256", "EdDSA"])
async def test_public_key_file_token_connects(bridge_factory, nats_server, ws_factory, tmp_path, make_key):
    key = make_key()
    path = tmp_path / "public.pem"
    path.write_bytes(key.public_pem)
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_public_key=str(path), **POLICY)
    client = await connect(ws_factory, bridge, signed(claims("bob"), key))
    assert client.welcome["user"] == "bob"


async def test_jwks_file_with_two_keys_accepts_a_token_of_each(
    bridge_factory, nats_server, ws_factory, tmp_path
):
    one, two = rsa_key("k1"), ed_key("k2")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [one.jwk, two.jwk]}))
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_jwks=str(path), **POLICY)
    first = await connect(ws_factory, bridge, signed(claims("a1"), one))
    second = await connect(ws_factory, bridge, signed(claims("a2"), two))
    assert (first.welcome["user"], second.welcome["user"]) == ("a1", "a2")


async def test_jwks_rotation_accepts_the_new_kid_once_the_file_changes(
    bridge_factory, nats_server, ws_factory, tmp_path
):
    old, new = rsa_key("old"), ec_key("new")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [old.jwk]}))
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_jwks=str(path), jwt_jwks_refresh=0.2,
                                  **POLICY)
    token = signed(claims("rot"), new)
    status, body = await refusal(bridge, token)
    assert status == 401 and "kid" in body["message"], body
    path.write_text(json.dumps({"keys": [old.jwk, new.jwk]}))
    deadline = time.monotonic() + TIMEOUT
    while (await refusal(bridge, token))[0] != 101:
        assert time.monotonic() < deadline, "the new key was never picked up"
        await asyncio.sleep(0.1)
    assert (await connect(ws_factory, bridge, token)).welcome["user"] == "rot"


# ---------------------------------------------------------------------------
# Refused at the handshake: 401 with a body that says which check failed
# ---------------------------------------------------------------------------


def _no(claim: str) -> dict[str, Any]:
    payload = claims("alice")
    del payload[claim]
    return payload


REFUSED = {
    "missing": (None, "a token is required"),
    "malformed": ("garbage", "malformed"),
    "tampered": (tampered(hs256(claims("alice"))), "signature"),
    "other-secret": (hs256(claims("alice"), secret="some-other-secret-of-32-bytes-or-more"), "signature"),
    "alg-none": (unsigned(claims("alice")), "algorithm"),
    "expired": (hs256(claims("alice", ttl=-5)), "expired"),
    "not-yet-valid": (hs256(claims("alice", nbf=int(time.time()) + 3600)), "not valid yet"),
    "no-exp": (hs256(_no("exp")), "'exp'"),
    "no-sub": (hs256(_no("sub")), "'sub'"),
    "sub-star": (hs256(claims("*")), "sub"),
    "sub-gt": (hs256(claims(">")), "sub"),
    "sub-dotted": (hs256(claims("a.b")), "sub"),
    "sub-empty": (hs256(claims("")), "sub"),
}


@pytest.mark.parametrize("case", REFUSED)
async def test_bad_token_is_refused_with_401_saying_why(jwt_bridge, case):
    token, words = REFUSED[case]
    status, body = await refusal(jwt_bridge, token)
    assert status == 401, body
    assert words in body["message"], body


async def test_hs256_signed_with_the_public_keys_pem_is_refused(bridge_factory, nats_server, tmp_path):
    # Algorithm confusion: the bridge knows only the RSA public key, which anyone may have.
    key = rsa_key()
    path = tmp_path / "public.pem"
    path.write_bytes(key.public_pem)
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_public_key=str(path))
    status, body = await refusal(bridge, hmac_with_public_key(claims("mallory"), key))
    assert status == 401 and "HS256" in body["message"], body


@pytest.mark.parametrize(("setting", "value", "claim", "words"), [
    ("jwt_audience", "bridge", {"aud": "elsewhere"}, "audience"),
    ("jwt_issuer", "https://auth.example", {"iss": "https://evil.example"}, "issuer"),
], ids=["aud", "iss"])
async def test_wrong_audience_or_issuer_is_refused(bridge_factory, nats_server, setting, value, claim, words):
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET, **{setting: value})
    status, body = await refusal(bridge, hs256(claims("alice", **claim)))
    assert status == 401 and words in body["message"], body


async def test_refusals_are_counted_by_reason(jwt_bridge):
    await refusal(jwt_bridge, hs256(claims("alice", ttl=-5)))
    await refusal(jwt_bridge, None)
    refusals = jwt_bridge.app.http_server.web_app[LINK].refusals
    assert (refusals["token_expired"], refusals["token_missing"]) == (1, 1)


# ---------------------------------------------------------------------------
# What a user may follow
# ---------------------------------------------------------------------------


async def test_alice_cannot_subscribe_to_bobs_subjects(jwt_bridge, ws_factory):
    alice = await connect(ws_factory, jwt_bridge, hs256(claims("alice")))
    frame = await alice.request({"action": "subscribe", "subjects": ["user.bob.inbox"]})
    assert frame["success"] is False and "not allowed" in frame["message"]


@pytest.mark.parametrize("pattern", [">", "user.*.>", "user.>", "*.bob.*", "user.*.inbox"])
async def test_alice_cannot_subscribe_to_a_pattern_reaching_beyond_her_subjects(
    jwt_bridge, ws_factory, pattern
):
    alice = await connect(ws_factory, jwt_bridge, hs256(claims("alice")))
    frame = await alice.request({"action": "subscribe", "subjects": [pattern]})
    assert frame["success"] is False, frame


async def test_message_on_bobs_subject_never_reaches_alice_by_any_pattern(jwt_bridge, ws_factory, nc):
    alice = await connect(ws_factory, jwt_bridge, hs256(claims("alice")))
    tried = [">", "user.>", "user.*.>", "user.bob.>", "user.bob.inbox", "*.*.*", "*.bob.*", "user.*.inbox",
             "user.alice.>", "public.>"]
    for pattern in tried:
        await alice.request({"action": "subscribe", "subjects": [pattern]})
    assert set(jwt_bridge.manager.sessions[alice.connection_id].subscriptions) == {"user.alice.>", "public.>"}
    await nats_synced(jwt_bridge)
    await publish(nc, "user.bob.inbox", {"secret": True})
    await publish(nc, "user.alice.inbox", {"mine": True})
    assert (await alice.receive_message())["subject"] == "user.alice.inbox"
    await alice.assert_silent(0.3)


async def test_alice_follows_her_own_subjects(jwt_bridge, ws_factory, nc):
    alice = await connect(ws_factory, jwt_bridge, hs256(claims("alice")))
    await alice.subscribe("user.alice.*")
    await nats_synced(jwt_bridge)
    await publish(nc, "user.alice.inbox", {"n": 1})
    assert (await alice.receive_message())["data"] == {"n": 1}


async def test_claim_deny_filters_a_shared_subscription_for_that_user_only(jwt_bridge, ws_factory, nc):
    alice = await connect(ws_factory, jwt_bridge,
                          hs256(claims("alice", nats={"sub": {"deny": ["public.secret"]}})))
    bob = await connect(ws_factory, jwt_bridge, hs256(claims("bob")))
    await alice.subscribe("public.>")
    await bob.subscribe("public.>")
    await nats_synced(jwt_bridge)
    await publish(nc, "public.secret", {"n": 1})
    await publish(nc, "public.news", {"n": 2})
    assert [(await bob.receive_message())["subject"] for _ in range(2)] == ["public.secret", "public.news"]
    assert (await alice.receive_message())["subject"] == "public.news"


async def test_claim_pub_allow_limits_publishing(jwt_bridge, ws_factory):
    alice = await connect(ws_factory, jwt_bridge,
                          hs256(claims("alice", nats={"pub": {"allow": ["user.{sub}.chat"]}})))
    ok = await alice.request({"action": "publish", "subject": "user.alice.chat", "data": "hi"})
    refused = await alice.request({"action": "publish", "subject": "user.alice.other", "data": "hi"})
    assert (ok["success"], refused["success"]) == (True, False)


# ---------------------------------------------------------------------------
# Expiry and refresh on the open socket
# ---------------------------------------------------------------------------


async def short_lived(bridge_factory: Any, nats_server: Any, lead: float = 1.0) -> Any:
    return await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET, jwt_refresh_lead=lead, **POLICY)


async def test_token_expiring_is_sent_before_exp(bridge_factory, nats_server, ws_factory):
    bridge = await short_lived(bridge_factory, nats_server)
    payload = claims("alice", ttl=2)
    client = await connect(ws_factory, bridge, hs256(payload))
    frame = await next_of_type(client, "token_expiring")
    assert frame["expires_at"] == payload["exp"]


async def test_expiry_without_refresh_closes_with_4001(bridge_factory, nats_server, ws_factory):
    bridge = await short_lived(bridge_factory, nats_server)
    client = await connect(ws_factory, bridge, hs256(claims("alice", ttl=2)))
    assert await close_of(client) == (4001, "token expired")
    assert bridge.manager.stats.token_expiries == 1


async def test_refresh_extends_the_connection_past_the_old_exp(bridge_factory, nats_server, ws_factory):
    bridge = await short_lived(bridge_factory, nats_server)
    client = await connect(ws_factory, bridge, hs256(claims("alice", ttl=2)))
    fresh = claims("alice", ttl=120)
    frame = await client.request({"action": "refresh", "token": hs256(fresh), "id": "r"})
    assert (frame["success"], frame["expires_at"], frame["unsubscribed"]) == (True, fresh["exp"], [])
    await asyncio.sleep(2.5)
    assert (await client.request({"action": "subscribe", "subjects": ["public.x"]}))["success"]
    assert bridge.manager.stats.token_refreshes["ok"] == 1


async def test_refresh_with_a_narrower_token_drops_exactly_what_it_no_longer_allows(
    jwt_bridge, ws_factory, nc
):
    client = await connect(ws_factory, jwt_bridge, hs256(claims("alice")))
    await client.subscribe("user.alice.a", "user.alice.b.x", "public.news")
    narrower = hs256(claims("alice", nats={"sub": {"allow": ["user.{sub}.a", "public.>"]}}))
    frame = await client.request({"action": "refresh", "token": narrower})
    assert (frame["success"], frame["unsubscribed"]) == (True, ["user.alice.b.x"])
    session = jwt_bridge.manager.sessions[client.connection_id]
    assert set(session.subscriptions) == {"user.alice.a", "public.news"}
    await nats_synced(jwt_bridge)
    await publish(nc, "user.alice.b.x", {"n": 1})
    await publish(nc, "user.alice.a", {"n": 2})
    assert (await client.receive_message())["subject"] == "user.alice.a"


async def test_refresh_with_another_users_token_is_refused(jwt_bridge, ws_factory):
    client = await connect(ws_factory, jwt_bridge, hs256(claims("alice")))
    frame = await client.request({"action": "refresh", "token": hs256(claims("bob"))})
    assert frame["success"] is False and "another user" in frame["message"]
    assert jwt_bridge.manager.sessions[client.connection_id].user.sub == "alice"


async def test_refused_refresh_keeps_the_old_expiry(bridge_factory, nats_server, ws_factory):
    bridge = await short_lived(bridge_factory, nats_server)
    client = await connect(ws_factory, bridge, hs256(claims("alice", ttl=2)))
    frame = await client.request({"action": "refresh", "token": hs256(claims("bob", ttl=120))})
    assert frame["success"] is False
    assert (await close_of(client))[0] == 4001


@pytest.mark.parametrize("token", [hs256(claims("alice", ttl=-5)), "garbage", unsigned(claims("alice"))],
                         ids=["expired", "malformed", "alg-none"])
async def test_refresh_with_a_bad_token_is_refused_saying_why(jwt_bridge, ws_factory, token):
    client = await connect(ws_factory, jwt_bridge, hs256(claims("alice")))
    frame = await client.request({"action": "refresh", "token": token})
    assert frame["success"] is False and frame["message"].startswith("Token refused: "), frame
    assert jwt_bridge.manager.stats.token_refreshes["refused"] == 1


async def test_refresh_without_jwt_is_an_error(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    frame = await client.request({"action": "refresh", "token": "x"})
    assert frame["success"] is False and "does not use tokens" in frame["message"]


# ---------------------------------------------------------------------------
# The control API is for backends
# ---------------------------------------------------------------------------


async def control(bridge: Any, method: str, path: str, token: str | None = CONTROL,
                  body: Any = None) -> tuple[int, dict[str, Any]]:
    headers = bearer(token) if token else {}
    async with aiohttp.ClientSession() as session, session.request(
        method, bridge.http_url + path, headers=headers, json=body,
        timeout=aiohttp.ClientTimeout(total=TIMEOUT),
    ) as resp:
        return resp.status, await resp.json()


async def test_users_token_on_the_control_api_is_refused_with_403(jwt_bridge, ws_factory):
    token = hs256(claims("alice"))
    alice = await connect(ws_factory, jwt_bridge, token)
    body = {"action": "subscribe", "subjects": ["user.bob.inbox"]}
    status, answer = await control(jwt_bridge, "POST", f"/clients/{alice.connection_id}", token, body)
    assert status == 403, answer


async def test_control_api_without_a_token_is_refused_with_401(jwt_bridge, ws_factory):
    alice = await connect(ws_factory, jwt_bridge, hs256(claims("alice")))
    status, _ = await control(jwt_bridge, "DELETE", f"/clients/{alice.connection_id}", token=None)
    assert status == 401


async def test_delete_user_closes_every_connection_of_that_user_and_no_other(jwt_bridge, ws_factory):
    alice1 = await connect(ws_factory, jwt_bridge, hs256(claims("alice")))
    alice2 = await connect(ws_factory, jwt_bridge, hs256(claims("alice")))
    bob = await connect(ws_factory, jwt_bridge, hs256(claims("bob")))
    status, body = await control(jwt_bridge, "DELETE", "/users/alice", body={"reason": "account closed"})
    assert (status, body["connections"]) == (200, 2)
    assert await close_of(alice1) == (4003, "account closed")
    assert await close_of(alice2) == (4003, "account closed")
    assert (await bob.request({"action": "subscribe", "subjects": ["public.x"]}))["success"]


async def test_delete_client_closes_that_connection_with_4003(jwt_bridge, ws_factory):
    alice = await connect(ws_factory, jwt_bridge, hs256(claims("alice")))
    status, _ = await control(jwt_bridge, "DELETE", f"/clients/{alice.connection_id}")
    assert status == 200
    assert await close_of(alice) == (4003, "disconnected by the server")


async def test_delete_unknown_user_answers_404(jwt_bridge):
    status, body = await control(jwt_bridge, "DELETE", "/users/nobody")
    assert (status, body["connections"]) == (404, 0)


async def test_post_user_subscribes_every_connection_of_that_user(jwt_bridge, ws_factory, nc):
    alices = [await connect(ws_factory, jwt_bridge, hs256(claims("alice"))) for _ in range(2)]
    body = {"action": "subscribe", "subjects": ["user.alice.alerts"]}
    status, answer = await control(jwt_bridge, "POST", "/users/alice", body=body)
    assert (status, answer["connections"]) == (200, 2), answer
    await nats_synced(jwt_bridge)
    await publish(nc, "user.alice.alerts", {"n": 1})
    for alice in alices:
        assert (await alice.receive_message())["subject"] == "user.alice.alerts"


async def test_backend_subscription_obeys_the_server_policy_not_the_claim(jwt_bridge, ws_factory):
    alice = await connect(ws_factory, jwt_bridge,
                          hs256(claims("alice", nats={"sub": {"allow": ["user.{sub}.a"]}})))
    inside_policy = {"action": "subscribe", "subjects": ["user.alice.b"]}
    outside_policy = {"action": "subscribe", "subjects": ["user.bob.b"]}
    status_in, _ = await control(jwt_bridge, "POST", f"/clients/{alice.connection_id}", body=inside_policy)
    status_out, _ = await control(jwt_bridge, "POST", f"/clients/{alice.connection_id}", body=outside_policy)
    assert (status_in, status_out) == (200, 400)


# ---------------------------------------------------------------------------
# JWKS over https, and key settings that cannot work: the bridge as a process
# ---------------------------------------------------------------------------


def self_signed_for_loopback(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA, and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bridge test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
async def jwks_https(tmp_path) -> Any:
    """An https server on loopback serving a JWKS with one key; (url, key, CA file)."""
    key = rsa_key("https-key")
    cert_path, key_path = self_signed_for_loopback(tmp_path)
    app = web.Application()

    async def serve_jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": [key.jwk]})

    app.router.add_get("/jwks.json", serve_jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}/jwks.json", key, cert_path
    finally:
        await runner.cleanup()


async def test_jwks_https_url_is_fetched_at_start(jwks_https, nats_server, bridge_process, ws_factory):
    url, key, ca = jwks_https
    bp = bridge_process(env={"NATS_URL": nats_server.url, "JWT_JWKS": url, "SSL_CERT_FILE": str(ca),
                             "TEST_PUBLISH_INTERVAL": "0"})
    client = await connect_url(ws_factory, f"{bp.http_url}/stream", signed(claims("carol"), key))
    assert client.welcome["user"] == "carol"


async def test_jwks_https_url_with_an_untrusted_certificate_stops_the_start_with_one_line(
    jwks_https, nats_server, bridge_process
):
    url, _, _ = jwks_https
    bp = bridge_process(env={"NATS_URL": nats_server.url, "JWT_JWKS": url}, wait=False)
    output, _ = await asyncio.to_thread(bp.proc.communicate, timeout=30)
    returncode = bp.proc.returncode
    lines = [line for line in output.splitlines() if line.strip()]
    assert returncode == 1, output
    assert lines[-1].startswith(f"main.py: error: JWT_JWKS={url}: "), output
    assert "Traceback" not in output


async def connect_url(ws_factory: Any, url: str, token: str) -> Any:
    return await ws_factory(url, headers=bearer(token))


def private_pem() -> bytes:
    return rsa_key().private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


# A bad key setting is a bad setting: exit 2, as for every other (main.py, config.EXIT_BAD_SETTING).
# A value ("setting", b"...") is written to a file first, and the setting is its path.
@pytest.mark.parametrize(("env", "words", "code"), [
    ({"JWT_PUBLIC_KEY": ("private.pem", private_pem)}, "holds a private key", 2),
    ({"JWT_PUBLIC_KEY": ("key.pem", lambda: b"not a key\n")}, "not a PEM public key or certificate", 2),
    ({"JWT_JWKS": ("jwks.json", lambda: b'{"keys": [\n  {"kty": "RSA",}]}')},
     "not a JSON document (line 2 column 17", 2),
    ({"JWT_JWKS": ("jwks.json", lambda: b"\xff\xfe\x00garbage")}, "not a JSON document", 2),
    ({"JWT_JWKS": ("jwks.json", lambda: b'{"kid": "k1"}')}, 'a JWKS is a JSON object {"keys": [...]}', 2),
    ({"JWT_SECRET": SECRET, "AUTH_TOKENS": "a,b"}, "cannot both be set", 2),
    ({"JWT_SECRET": "short-secret"}, "at least 32 bytes", 2),
    ({"JWT_AUDIENCE": "bridge"}, "need a key", 2),
    ({"JWT_JWKS": "http://keys.example/jwks.json"}, "https", 2),
], ids=["private-key", "not-a-pem", "jwks-not-json", "jwks-not-text", "jwks-without-keys",
        "jwt-and-auth-tokens", "short-secret", "audience-without-key", "plain-http-jwks"])
async def test_unusable_key_setting_stops_the_start_with_one_line(tmp_path, nats_server, bridge_process, env,
                                                                   words, code):
    env = dict(env)
    for name, value in env.items():
        if isinstance(value, tuple):
            path = tmp_path / value[0]
            path.write_bytes(value[1]())
            env[name] = str(path)
    bp = bridge_process(env={"NATS_URL": nats_server.url, **env}, wait=False)
    output, _ = await asyncio.to_thread(bp.proc.communicate, timeout=30)
    returncode = bp.proc.returncode
    lines = [line for line in output.splitlines() if line.strip()]
    assert returncode == code, output
    assert len(lines) == 1 and words in lines[0], output
    assert "short-secret" not in output  # a secret is never echoed


async def test_bad_key_file_with_workers_exits_2_as_a_lone_process_does(tmp_path, nats_server,
                                                                        bridge_process):
    path = tmp_path / "key.pem"
    path.write_bytes(b"not a key\n")
    bp = bridge_process(env={"NATS_URL": nats_server.url, "JWT_PUBLIC_KEY": str(path), "WORKERS": "2"},
                        wait=False)
    output, _ = await asyncio.to_thread(bp.proc.communicate, timeout=30)
    assert bp.proc.returncode == 2, output
    assert f"main.py: error: JWT_PUBLIC_KEY={path}: not a PEM public key or certificate" in output, output
    assert "Traceback" not in output


# ---------------------------------------------------------------------------
# Seen from outside: logs and metrics
# ---------------------------------------------------------------------------


async def test_connection_log_lines_name_the_user(jwt_bridge, ws_factory, caplog):
    caplog.set_level("INFO", logger="handler")
    alice = await connect(ws_factory, jwt_bridge, hs256(claims("alice")))
    await alice.close()
    await asyncio.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if alice.connection_id in r.getMessage()]
    assert any("opened" in line and "(user alice)" in line for line in lines), lines
    assert any("closed" in line and "(user alice)" in line for line in lines), lines


async def test_metrics_count_refreshes_expiries_and_refusals(bridge_factory, nats_server, ws_factory):
    bridge = await short_lived(bridge_factory, nats_server)
    client = await connect(ws_factory, bridge, hs256(claims("alice", ttl=2)))
    await client.request({"action": "refresh", "token": hs256(claims("bob"))})
    await close_of(client)
    await refusal(bridge, "garbage")
    async with aiohttp.ClientSession() as session, session.get(
        bridge.http_url + "/metrics", timeout=aiohttp.ClientTimeout(total=TIMEOUT)
    ) as resp:
        text = await resp.text()
    assert 'bridge_token_refreshes_total{result="refused"} 1.0' in text
    assert "bridge_token_expiries_total 1.0" in text
    assert 'bridge_handshake_refusals_total{reason="token_malformed"} 1.0' in text


async def test_mint_script_token_is_accepted_with_its_permissions(jwt_bridge, ws_factory):
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "scripts/mint_token.py", "dora", "--sub-allow", "user.{sub}.a"],
        cwd=ROOT, env={**os.environ, "JWT_SECRET": SECRET}, capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    dora = await connect(ws_factory, jwt_bridge, done.stdout.strip())
    assert dora.welcome["user"] == "dora"
    allowed = await dora.request({"action": "subscribe", "subjects": ["user.dora.a"]})
    refused = await dora.request({"action": "subscribe", "subjects": ["user.dora.b"]})
    assert (allowed["success"], refused["success"]) == (True, False)
