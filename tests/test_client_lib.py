"""static/bridge-client.js on its own, in real Chromium, against a real bridge and nats-server.

Each test opens a document of the bridge's own that runs no script (``/healthz``: the
bridge admits same-origin pages, and Chromium lets a page served from 127.0.0.1 open
sockets there), imports /static/bridge-client.js in it and drives a BridgeClient through
``page.evaluate``.  What the client saw is recorded in ``window.log``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from typing import Any

import aiohttp
import chromium
import nats
import pytest
from chromium import TIMEOUT_MS, WS_REFUSED, OpenPage, Page, wait_listening
from conftest import NatsServer, eventually, free_port, unique
from minting import SECRET, claims, hs256

import main

browser = chromium.browser
open_page = chromium.open_page

# The harness document has no favicon: Chromium asks for /favicon.ico all the same.
NO_FAVICON = re.compile(r"^Failed to load resource: the server responded with a status of 404")

# Loads the library and starts a client; everything it reports goes into window.log.
START = """async ({url, options, worker}) => {
  const lib = await import("/static/bridge-client.js");
  window.lib = lib;
  window.log = {states: [], messages: [], resubscribed: [], replies: [], errors: []};
  if (worker) options.WebSocket = (await import("/static/worker-socket.js")).WorkerWebSocket;
  const client = new lib.BridgeClient(url, options);
  client.on("state", (state, detail) => log.states.push([state, detail.code ?? null]));
  client.on("message", (m) => log.messages.push({
    subject: m.subject, data: m.data, dataJson: m.dataJson, encoding: m.encoding ?? null, matches: m.matches,
    seq: m.seq ?? null, time: m.time ?? null, history: m.history,
  }));
  client.on("resubscribed", (r) => log.resubscribed.push(r));
  client.on("reply", (frame) => log.replies.push(frame));
  client.on("error", (err) => log.errors.push(String(err.message || err)));
  window.client = client;
}"""


async def harness(open_page: OpenPage, http_url: str, **options: Any) -> Page:
    """A blank page on the bridge's origin with a client connected to its /stream."""
    allow = (*options.pop("allow", ()), NO_FAVICON)
    watched = await open_page(http_url + "/healthz", connected=False, allow=allow)
    page = watched.page
    url = options.pop("url", http_url.replace("http", "ws", 1) + "/stream")
    worker = options.pop("worker", False)
    await page.evaluate(START, {"url": url, "options": options, "worker": worker})
    if options.get("connect", True):
        await connected(page)
    return page


async def connected(page: Page) -> None:
    await page.wait_for_function("() => client.state === 'connected'", timeout=TIMEOUT_MS)


async def messages(page: Page, subject: str, count: int = 1) -> list[dict[str, Any]]:
    await page.wait_for_function(
        "([s, n]) => log.messages.filter((m) => m.subject === s).length >= n", arg=[subject, count],
        timeout=TIMEOUT_MS,
    )
    return await page.evaluate("(s) => log.messages.filter((m) => m.subject === s)", subject)


async def publish_until(nc: Any, page: Page, subject: str, payload: bytes) -> None:
    """Publish until the client has the message: its SUB may still be on its way to NATS."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while True:
        await nc.publish(subject, payload)
        await nc.flush(timeout=5)
        try:
            await page.wait_for_function(
                "(s) => log.messages.some((m) => m.subject === s)", arg=subject, timeout=300)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise


def held(bridge: Any) -> list[set[str]]:
    return [set(client.subscriptions) for client in bridge.manager.sessions.values()]


# ---------------------------------------------------------------------------
# Subscribe, receive, unsubscribe
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["websocket", "worker"])
async def test_subscribe_resolves_with_the_reply_delivers_messages_and_unsubscribe_stops_them(
    transport: str, bridge: Any, nc: Any, open_page: OpenPage
) -> None:
    """With the page's WebSocket, and with WorkerWebSocket (the socket in a worker)."""
    page = await harness(open_page, bridge.http_url, worker=transport == "worker")
    in_worker = await page.evaluate(
        "async () => client._ws instanceof (await import('/static/worker-socket.js')).WorkerWebSocket")
    assert in_worker is (transport == "worker")
    base = unique("lib")
    reply = await page.evaluate(
        """async (base) => {
            window.sub = client.subscribe([base + ".*", base + ".exact"]);
            window.subMessages = [];
            sub.on("message", (m) => subMessages.push(m.subject));
            return await sub.ready;
        }""",
        base,
    )
    assert reply["success"] is True and reply["type"] == "reply"
    assert reply["message"] == f"Successfully connected to events: '{base}.*', '{base}.exact'"
    assert held(bridge) == [{base + ".*", base + ".exact"}]
    assert await page.evaluate("sub.state") == "subscribed"

    await publish_until(nc, page, base + ".exact", b'{"n": 1}')
    [first] = await messages(page, base + ".exact")
    assert first["data"] == {"n": 1} and first["encoding"] is None
    # The client works out which of its subscriptions matched (the bridge sends the subject only).
    assert sorted(first["matches"]) == sorted([base + ".*", base + ".exact"])
    assert await page.evaluate("subMessages") == [base + ".exact"]

    replies = await page.evaluate("async () => (await sub.unsubscribe()).map((r) => r.message)")
    assert sorted(replies) == sorted(
        f"Successfully unsubscribed from event: {s}" for s in (base + ".*", base + ".exact"))
    assert held(bridge) == [set()]
    assert await page.evaluate("[sub.state, client.subjects().length]") == ["closed", 0]

    # Published in this order on one connection: once the control message is in, the
    # other would have been too.
    other = unique("lib")
    await page.evaluate("(s) => client.subscribe(s).ready", other)
    await nc.publish(base + ".exact", b"after")
    await publish_until(nc, page, other, b"control")
    assert len(await messages(page, base + ".exact")) == 1


async def test_subscribing_to_a_held_subject_again_resolves_and_keeps_it_for_the_other_holder(
    bridge: Any, nc: Any, open_page: OpenPage
) -> None:
    page = await harness(open_page, bridge.http_url)
    subject = unique("lib")
    results = await page.evaluate(
        """async (s) => {
            window.a = client.subscribe(s);
            window.b = client.subscribe(s);             // while the first is still in flight
            const first = await Promise.all([a.ready, b.ready]);
            window.c = client.subscribe([s, s]);        // once held; listed twice
            return [...first, await c.ready].map((r) => [r.success, r.subjects]);
        }""",
        subject,
    )
    assert results == [[True, [subject]]] * 3
    assert held(bridge) == [{subject}]

    # Dropping two of the three holders leaves the subject held: the bridge is not told.
    await page.evaluate("async () => { await a.unsubscribe(); await c.unsubscribe(); }")
    assert held(bridge) == [{subject}]
    assert await page.evaluate("client.subjects()") == [
        {"subject": subject, "state": "subscribed", "error": None}]
    await publish_until(nc, page, subject, b"still here")
    await page.evaluate("() => b.unsubscribe()")
    assert held(bridge) == [set()]


async def test_a_refused_subscribe_rejects_ready_with_the_bridges_message(
    nats_server: NatsServer, bridge_factory: Any, open_page: OpenPage
) -> None:
    bridge = await bridge_factory(nats_url=nats_server.url, subject_allow=("allowed.>",))
    page = await harness(open_page, bridge.http_url)
    outcome = await page.evaluate(
        """async () => {
            const good = client.subscribe("allowed.one");
            const bad = client.subscribe(["allowed.two", "denied.x"]);
            const results = await Promise.allSettled([good.ready, bad.ready]);
            return {
                results: results.map((r) => r.status === "fulfilled" ? r.value.message : r.reason.message),
                isError: results[1].reason instanceof Error,
                states: [good.state, bad.state],
                subjects: client.subjects().map((s) => s.subject),
            };
        }"""
    )
    [good, bad] = outcome["results"]
    assert good == "Successfully connected to events: 'allowed.one'"
    assert bad.startswith("Subject 'denied.x' is not allowed")
    assert outcome["isError"] is True
    assert outcome["states"] == ["subscribed", "failed"]
    # All or nothing, as the bridge did it: allowed.two went with the refused request.
    assert outcome["subjects"] == ["allowed.one"]
    assert held(bridge) == [{"allowed.one"}]


# ---------------------------------------------------------------------------
# Publish
# ---------------------------------------------------------------------------


async def test_publish_resolves_with_the_reply_and_reaches_nats_with_every_digit(
    nats_server: NatsServer, bridge_factory: Any, nc: Any, open_page: OpenPage
) -> None:
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("lib.pub.>",))
    on_nats = await nc.subscribe("lib.pub.>")
    await nc.flush(timeout=5)
    page = await harness(open_page, bridge.http_url)
    assert await page.evaluate("client.canPublish") is True

    reply = await page.evaluate("() => client.publish('lib.pub.a', {n: 1, s: 'x'})")
    assert (reply["success"], reply["message"]) == (True, "Published to lib.pub.a")
    assert (await on_nats.next_msg(timeout=TIMEOUT_MS / 1000)).data == b'{"n": 1, "s": "x"}'

    # JSON text goes verbatim: the digits JavaScript's numbers would round survive.
    await page.evaluate(
        """() => client.publish('lib.pub.b', '{"big": 12345678901234567890}', {json: true})""")
    assert (await on_nats.next_msg(timeout=TIMEOUT_MS / 1000)).data == b'{"big": 12345678901234567890}'
    await page.evaluate("() => client.publish('lib.pub.c', 'plain words')")
    assert (await on_nats.next_msg(timeout=TIMEOUT_MS / 1000)).data == b"plain words"
    await page.evaluate("() => client.publish('lib.pub.d', btoa('\\x00\\xff\\x01'), {encoding: 'base64'})")
    assert (await on_nats.next_msg(timeout=TIMEOUT_MS / 1000)).data == b"\x00\xff\x01"

    refused = await page.evaluate(
        "() => client.publish('lib.other', 1).then(() => 'resolved', (err) => err.message)")
    assert refused.startswith("Publishing to 'lib.other' is not allowed")


async def test_publish_rejects_where_the_bridge_has_publishing_off(bridge: Any, open_page: OpenPage) -> None:
    page = await harness(open_page, bridge.http_url)
    assert await page.evaluate("client.canPublish") is False
    refused = await page.evaluate(
        "() => client.publish('x.y', 1).then(() => 'resolved', (err) => err.message)")
    assert refused == "Publishing is disabled on this bridge"


# ---------------------------------------------------------------------------
# Request: a NATS service's answer, or why there is none
# ---------------------------------------------------------------------------


async def serve(nc: Any, subject: str, answer: bytes | None,
                headers: dict[str, str] | None = None) -> list[Any]:
    """A NATS service on ``subject`` answering ``answer`` (None: never answering); what it got."""
    got: list[Any] = []

    async def handler(msg: Any) -> None:
        got.append(msg)
        if answer is not None:
            await nc.publish(msg.reply, answer, headers=headers)

    await nc.subscribe(subject, cb=handler)
    await nc.flush(timeout=5)
    return got


@pytest.mark.slow
async def test_request_resolves_with_the_answer_its_exact_json_and_headers(
    nats_server: NatsServer, bridge_factory: Any, nc: Any, open_page: OpenPage
) -> None:
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("lib.svc.>",))
    subject = unique("lib.svc")
    got = await serve(nc, subject, b'{"big": 123456789012345678901234567890, "f": 1.10}', {"X-Answer": "yes"})
    page = await harness(open_page, bridge.http_url)
    answer = await page.evaluate(
        """async (s) => {
            const a = await client.request(s, {q: 1}, {timeout: 5, headers: {"X-Trace": "abc"}});
            return {data: a.data, dataJson: a.dataJson, encoding: a.encoding ?? null, headers: a.headers};
        }""", subject)
    assert answer["dataJson"] == '{"big": 123456789012345678901234567890, "f": 1.10}'
    assert (answer["encoding"], answer["headers"]) == (None, {"X-Answer": "yes"})
    assert (got[0].data, got[0].headers) == (b'{"q": 1}', {"X-Trace": "abc"})


REQUEST_FAILURES = {
    # code: (the request, in the page; the bridge's settings beyond PUBLISH_ALLOW=lib.svc.>)
    "no_responders": ("client.request(S + '.nobody', 1)", {}),
    "timeout": ("client.request(S, 1, {timeout: 0.2})", {}),
    "not_allowed": ("client.request('lib.elsewhere', 1)", {}),
    "too_many_requests": ("(client.request(S, 1), client.request(S, 2))", {"max_pending_requests": 1}),
    "invalid": ("client.request(S, 1, {headers: {'Nats-Rollup': 'all'}})", {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("code", list(REQUEST_FAILURES))
async def test_request_rejects_with_an_error_whose_code_is_the_bridges(
    code: str, nats_server: NatsServer, bridge_factory: Any, nc: Any, open_page: OpenPage
) -> None:
    call, settings = REQUEST_FAILURES[code]
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("lib.svc.>",), **settings)
    subject = unique("lib.svc")
    await serve(nc, subject, None)  # takes requests, never answers
    page = await harness(open_page, bridge.http_url)
    failure = await page.evaluate(
        f"""async (S) => {{
            try {{ await {call}; return "resolved"; }}
            catch (err) {{ return {{isError: err instanceof Error, code: err.code, message: err.message}}; }}
        }}""", subject)
    assert failure != "resolved"
    assert (failure["isError"], failure["code"]) == (True, code), failure


@pytest.mark.slow
async def test_request_rejects_disconnected_when_the_socket_drops_and_is_never_sent_again(
    nats_server: NatsServer, bridge_factory: Any, nc: Any, open_page: OpenPage
) -> None:
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("lib.svc.>",))
    subject = unique("lib.svc")
    got = await serve(nc, subject, None)
    page = await harness(open_page, bridge.http_url, minDelay=50)
    await page.evaluate("(s) => { window.pending = client.request(s, 'once').catch((err) => err); }", subject)
    await eventually(lambda: len(got) == 1)
    await page.evaluate("() => client._ws.close()")  # the socket drops under the request
    failure = await page.evaluate("async () => { const e = await pending; return [e.code, e.message]; }")
    assert failure[0] == "disconnected", failure
    await connected(page)  # reconnected...
    await page.evaluate("(s) => client.subscribe(s + '.x').ready", subject)  # ...and a round trip done
    assert len(got) == 1


@pytest.mark.slow
async def test_request_rejects_disconnected_when_not_connected(bridge: Any, open_page: OpenPage) -> None:
    page = await harness(open_page, bridge.http_url, connect=False)
    code = await page.evaluate("() => client.request('lib.svc.x', 1).catch((err) => err.code)")
    assert code == "disconnected"


# ---------------------------------------------------------------------------
# Messages as the payload wrote them
# ---------------------------------------------------------------------------


async def test_messages_keep_the_payloads_own_text_and_say_text_from_json_string(
    bridge: Any, nc: Any, open_page: OpenPage
) -> None:
    page = await harness(open_page, bridge.http_url)
    subject = unique("lib")
    await page.evaluate("(s) => client.subscribe(s).ready", subject)
    exact = b'{"z": 1, "2": [1.0, 1E+2], "big": 123456789012345678901234567890}'
    await publish_until(nc, page, subject, exact)
    await nc.publish(subject, b'"hello"')
    await nc.publish(subject, b"hello")
    await nc.flush(timeout=5)
    [as_json, json_string, text] = await messages(page, subject, 3)
    assert as_json["dataJson"] == exact.decode()
    assert as_json["data"]["big"] != 123456789012345678901234567890  # what JSON.parse alone gives
    assert (json_string["data"], json_string["encoding"]) == ("hello", None)
    assert json_string["dataJson"] == '"hello"'
    assert (text["data"], text["encoding"]) == ("hello", "text")


# ---------------------------------------------------------------------------
# Reconnecting
# ---------------------------------------------------------------------------


async def test_many_requests_in_a_row_stay_under_the_bridges_rate_limit(
    bridge: Any, open_page: OpenPage
) -> None:
    """40 subscribe calls at once: twice the bridge's burst of 20 (CONTROL_RATE)."""
    page = await harness(open_page, bridge.http_url)
    base = unique("lib")
    outcome = await page.evaluate(
        """async (base) => {
            const subs = [];
            for (let i = 0; i < 40; i++) subs.push(client.subscribe(`${base}.${i}`));
            const results = await Promise.allSettled(subs.map((s) => s.ready));
            return results.map((r) => r.status === "fulfilled" ? "ok" : r.reason.message);
        }""",
        base,
    )
    assert outcome == ["ok"] * 40
    assert held(bridge) == [{f"{base}.{i}" for i in range(40)}]
    assert await page.evaluate("log.replies.filter((r) => /Rate limit/.test(r.message)).length") == 0


async def test_reconnects_after_a_bridge_restart_and_renews_every_subscription(
    nats_server: NatsServer, bridge_process: Any, nc: Any, open_page: OpenPage
) -> None:
    """130 subjects (over the bridge's 50 per request) in subscriptions of every shape."""
    port = free_port()
    name = f"libtest_{os.getpid()}_{time.monotonic_ns()}"
    env = {"HTTP_PORT": str(port), "NATS_URL": nats_server.url, "TEST_PUBLISH_INTERVAL": "0",
           "LOG_LEVEL": "WARNING", "MAX_SUBSCRIPTIONS": "200", "SERVICE_NAME": name}
    first = bridge_process(env=env, wait=False)
    await wait_listening(port, first.proc)
    page = await harness(open_page, f"http://127.0.0.1:{port}", allow=(WS_REFUSED,))
    base = unique("lib")
    wanted = {f"{base}.big.{i}" for i in range(100)} | {f"{base}.one.{i}" for i in range(30)}
    await page.evaluate(
        """async (base) => {
            const big = [];
            for (let i = 0; i < 100; i++) big.push(`${base}.big.${i}`);
            const subs = [client.subscribe(big)];   // more than one request takes
            for (let i = 0; i < 30; i++) subs.push(client.subscribe(`${base}.one.${i}`));
            await Promise.all(subs.map((s) => s.ready));
            window.subs = subs;
        }""",
        base,
    )
    assert set(nats_server.subscriptions_of(name)) == wanted

    code, _ = await asyncio.to_thread(first.stop)
    assert code == 0
    await page.wait_for_function("() => client.state !== 'connected'", timeout=TIMEOUT_MS)
    second = bridge_process(env=env, wait=False)
    await wait_listening(port, second.proc)
    await page.wait_for_function("() => log.resubscribed.length === 1", timeout=30_000)
    renewal = await page.evaluate("log.resubscribed[0]")
    assert renewal["failed"] == [] and set(renewal["renewed"]) == wanted
    await eventually(lambda: set(nats_server.subscriptions_of(name)) == wanted)
    assert await page.evaluate("subs.every((s) => s.state === 'subscribed')")
    states = await page.evaluate("log.states")
    assert states[-1] == ["connected", None]
    assert ["disconnected", 1001] in states  # the first bridge said it was shutting down
    assert await page.evaluate("log.replies.filter((r) => !r.success).length") == 0

    await publish_until(nc, page, f"{base}.big.99", b"after")
    await publish_until(nc, page, f"{base}.one.29", b"after")


async def test_a_token_comes_from_get_token_when_the_handshake_is_refused(
    nats_server: NatsServer, bridge_factory: Any, open_page: OpenPage
) -> None:
    bridge = await bridge_factory(nats_url=nats_server.url, auth_tokens=("t1",))
    page = await harness(open_page, bridge.http_url, connect=False, allow=(WS_REFUSED,))
    await page.evaluate(
        """() => {
            window.tokenCalls = 0;
            // A stale token first: refused; getToken is asked for a fresh one and that one works.
            window.client2 = new lib.BridgeClient(client.url, {
                token: "stale", minDelay: 50,
                getToken: async () => { tokenCalls += 1; return "t1"; },
            });
        }"""
    )
    await page.wait_for_function("() => client2.state === 'connected'", timeout=TIMEOUT_MS)
    assert await page.evaluate("tokenCalls") == 1
    assert len(bridge.manager.sessions) == 1
    await page.evaluate("() => client2.close()")


async def test_a_refused_handshake_is_reported_with_the_bridges_status_and_message(
    nats_server: NatsServer, bridge_factory: Any, open_page: OpenPage
) -> None:
    """A browser hides why a handshake failed; the client asks the same address over HTTP with
    the same token, so a 401 is told apart from a bridge that is down (status 0: see
    test_page.py's restart without auth)."""
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET)
    page = await harness(open_page, bridge.http_url, connect=False, allow=(WS_REFUSED,))
    await page.evaluate(
        """() => {
            window.refusals = [];
            window.wrong = new lib.BridgeClient(client.url, {token: "nope", minDelay: 50});
            wrong.on("refused", (r) => refusals.push(r));
        }"""
    )
    await page.wait_for_function("() => refusals.length >= 2", timeout=TIMEOUT_MS)
    await page.evaluate("() => wrong.close()")
    first = await page.evaluate("refusals[0]")
    # Asked with the client's token (in a header, not in one more URL for the logs): the
    # bridge judged "nope", rather than finding no token at all.
    assert first == {"status": 401, "message": "Unauthorized: the token is malformed (not a JWT)"}
    assert bridge.app.http_server.web_app[main.LINK].refusals["token_missing"] == 0
    assert bridge.manager.sessions == {}


async def test_offline_closes_and_online_reconnects_at_once_renewing_subscriptions(
    bridge: Any, nc: Any, open_page: OpenPage
) -> None:
    # Offline, the next attempt waits up to maxDelay: here far beyond the test, so only the
    # online event can bring the connection back in time.
    page = await harness(open_page, bridge.http_url, allow=(WS_REFUSED,), maxDelay=600_000)
    subject = unique("lib")
    await page.evaluate("(s) => client.subscribe(s).ready", subject)
    await page.context.set_offline(True)
    await page.wait_for_function("() => client.state === 'disconnected'", timeout=TIMEOUT_MS)
    await page.context.set_offline(False)
    await page.wait_for_function("() => log.resubscribed.length === 1", timeout=TIMEOUT_MS)
    assert held(bridge) == [{subject}]
    await publish_until(nc, page, subject, b"back")


# ---------------------------------------------------------------------------
# Resume from JetStream, tokens, a backend's disconnect
# ---------------------------------------------------------------------------

RECORD_RESUME = """() => {
    log.recovered = []; log.gaps = [];
    client.on("recovered", (r) => log.recovered.push(r));
    client.on("gap", (g) => log.gaps.push(g));
}"""


@pytest.fixture
async def js_nc(js_server: NatsServer) -> Any:
    nc = await asyncio.wait_for(nats.connect(js_server.url), 10)
    try:
        yield nc
    finally:
        await nc.close()


class Resume:
    """A stream storing `subject`, a bridge process to restart on one port, a page following
    `subject` with `sub` (its "gap" events in `subGaps`), and one message seen: `seen`."""

    async def start(
        self, js_nc: Any, js_server: NatsServer, bridge_process: Any, open_page: OpenPage
    ) -> Resume:
        self.js = js_nc.jetstream()
        base = f"res{os.getpid()}x{time.monotonic_ns()}"
        self.stream, self.subject = base.upper(), f"{base}.feed"
        await self.js.add_stream(name=self.stream, subjects=[f"{base}.>"])
        self.bridge_process = bridge_process
        self.env = {"HTTP_PORT": str(free_port()), "NATS_URL": js_server.url, "TEST_PUBLISH_INTERVAL": "0",
                    "LOG_LEVEL": "WARNING"}
        self.bridge = await self.start_bridge()
        self.page = await harness(open_page, f"http://127.0.0.1:{self.env['HTTP_PORT']}", allow=(WS_REFUSED,))
        await self.page.evaluate(RECORD_RESUME)
        await self.page.evaluate("""(s) => {
            window.sub = client.subscribe(s);
            window.subGaps = [];
            sub.on("gap", (g) => subGaps.push(g));
            return sub.ready;
        }""", self.subject)
        self.seen = (await self.js.publish(self.subject, b'{"n": 0}')).seq
        await messages(self.page, self.subject, 1)
        return self

    async def start_bridge(self) -> Any:
        bp = self.bridge_process(env=self.env, wait=False)
        await wait_listening(int(self.env["HTTP_PORT"]), bp.proc)
        return bp

    async def stop_bridge(self) -> None:
        await asyncio.to_thread(self.bridge.stop)
        await self.page.wait_for_function("() => client.state !== 'connected'", timeout=TIMEOUT_MS)

    async def publish(self, n: int) -> int:
        return (await self.js.publish(self.subject, b'{"n": %d}' % n)).seq


async def test_resumes_after_a_bridge_restart_with_every_stored_message_missed(
    js_nc: Any, js_server: NatsServer, bridge_process: Any, open_page: OpenPage
) -> None:
    r = await Resume().start(js_nc, js_server, bridge_process, open_page)
    await r.stop_bridge()
    missed = [await r.publish(n) for n in range(1, 6)]
    r.bridge = await r.start_bridge()
    await r.page.wait_for_function("() => log.recovered.length === 1", timeout=30_000)
    assert await r.page.evaluate("log.recovered[0]") == {"subject": r.subject, "afterSeq": r.seen, "count": 5}
    live = await r.publish(6)
    got = await messages(r.page, r.subject, 7)
    assert [m["data"]["n"] for m in got] == list(range(7))
    assert await r.page.evaluate("(s) => log.messages.filter((m) => m.subject === s).length", r.subject) == 7
    assert await r.page.evaluate("[log.gaps, subGaps]") == [[], []]
    assert missed[-1] + 1 == live


async def test_a_gap_is_reported_when_the_stream_no_longer_holds_what_was_missed(
    js_nc: Any, js_server: NatsServer, bridge_process: Any, open_page: OpenPage
) -> None:
    r = await Resume().start(js_nc, js_server, bridge_process, open_page)
    await r.stop_bridge()
    await r.publish(1)
    await r.js.purge_stream(r.stream)  # what was missed is gone
    r.bridge = await r.start_bridge()
    await r.page.wait_for_function("() => log.gaps.length === 1", timeout=30_000)
    gap = await r.page.evaluate("log.gaps[0]")
    assert (gap["subject"], gap["afterSeq"], gap["firstSeq"]) == (r.subject, r.seen, r.seen + 2)
    assert await r.page.evaluate("subGaps.length") == 1
    await r.publish(2)
    assert [m["data"]["n"] for m in await messages(r.page, r.subject, 2)] == [0, 2]


async def test_the_token_is_refreshed_on_the_open_socket_before_it_expires(
    nats_server: NatsServer, bridge_factory: Any, open_page: OpenPage
) -> None:
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET, jwt_refresh_lead=2)
    first, fresh = hs256(claims("ada", ttl=3)), hs256(claims("ada", ttl=120))
    page = await harness(open_page, bridge.http_url, connect=False)
    await page.evaluate(
        """([first, fresh]) => {
            window.calls = 0; window.refreshed = [];
            window.c = new lib.BridgeClient(client.url, {token: first,
                getToken: async () => { calls += 1; return fresh; }});
            c.on("refreshed", (r) => refreshed.push(r));
        }""",
        [first, fresh],
    )
    await page.wait_for_function("() => c.state === 'connected'", timeout=TIMEOUT_MS)
    connection = await page.evaluate("[c.connectionId, c.user]")
    assert connection[1] == "ada"
    await page.wait_for_function("() => refreshed.length === 1", timeout=TIMEOUT_MS)
    await asyncio.sleep(2)  # past the first token's exp
    assert await page.evaluate("[c.connectionId, c.user]") == connection
    assert await page.evaluate("[calls, c.expiresAt]") == [1, claims_exp(fresh)]
    assert bridge.manager.stats.token_expiries == 0


async def test_connect_after_an_expired_token_opens_no_socket_until_set_token_gives_another(
    nats_server: NatsServer, bridge_factory: Any, open_page: OpenPage
) -> None:
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET, jwt_refresh_lead=1)
    page = await harness(open_page, bridge.http_url, token=hs256(claims("ada", ttl=2)), minDelay=50)
    await page.wait_for_function("() => client.state === 'disconnected'", timeout=TIMEOUT_MS)
    refusals = bridge.app.http_server.web_app[main.LINK].refusals
    before = sum(refusals.values())
    await page.evaluate("() => client.connect()")
    await asyncio.sleep(1)
    last = await page.evaluate("[client.state, log.states.at(-1)]")
    assert last == ["disconnected", ["disconnected", 4001]]
    assert sum(refusals.values()) == before  # the dead token was not offered again
    assert not bridge.manager.sessions
    await page.evaluate("(t) => { client.setToken(t); client.connect(); }", hs256(claims("bob", ttl=60)))
    await connected(page)
    assert await page.evaluate("client.user") == "bob"


def claims_exp(token: str) -> int:
    import jwt

    return jwt.decode(token, options={"verify_signature": False})["exp"]


async def test_an_expired_token_without_get_token_stops_reconnecting(
    nats_server: NatsServer, bridge_factory: Any, open_page: OpenPage
) -> None:
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET, jwt_refresh_lead=1)
    page = await harness(open_page, bridge.http_url, token=hs256(claims("ada", ttl=2)), minDelay=50)
    await page.wait_for_function("() => client.state === 'disconnected'", timeout=TIMEOUT_MS)
    await asyncio.sleep(1)
    last = await page.evaluate("[client.state, log.states.at(-1)]")
    assert last == ["disconnected", ["disconnected", 4001]]
    assert not bridge.manager.sessions


async def test_stored_messages_carry_when_they_were_published_history_and_live_alike(
    js_nc: Any, js_server: NatsServer, bridge_factory: Any, open_page: OpenPage
) -> None:
    bridge = await bridge_factory(nats_url=js_server.url)
    js = js_nc.jetstream()
    base = f"libtime{os.getpid()}x{time.monotonic_ns()}"
    await js.add_stream(name=base.upper(), subjects=[f"{base}.>"])
    first = (await js.publish(f"{base}.s", b'{"n": 0}')).seq
    page = await harness(open_page, bridge.http_url)
    await page.evaluate("(s) => client.subscribe(s, {history: {last: 1}}).ready", f"{base}.s")
    live = (await js.publish(f"{base}.s", b'{"n": 1}')).seq
    got = await messages(page, f"{base}.s", 2)

    async def stored_time(seq: int) -> str:
        answer = await js_nc.request(f"$JS.API.STREAM.MSG.GET.{base.upper()}", b'{"seq": %d}' % seq,
                                     timeout=5)
        return json.loads(answer.data)["message"]["time"]

    assert [(m["seq"], m["history"], m["time"]) for m in got] == [
        (first, True, await stored_time(first)), (live, False, await stored_time(live))]
    # A subject no stream stores: no seq, so no time.
    await page.evaluate("(s) => client.subscribe(s).ready", f"plain{base}")
    await publish_until(js_nc, page, f"plain{base}", b"{}")
    [plain] = await messages(page, f"plain{base}")
    assert (plain["seq"], plain["time"]) == (None, None)


async def test_a_backends_disconnect_4003_stops_reconnecting(bridge: Any, open_page: OpenPage) -> None:
    page = await harness(open_page, bridge.http_url, minDelay=50)
    connection = await page.evaluate("client.connectionId")
    async with aiohttp.ClientSession() as session, session.delete(
        f"{bridge.http_url}/clients/{connection}", timeout=aiohttp.ClientTimeout(total=10)
    ) as resp:
        assert resp.status == 200
    await page.wait_for_function("() => client.state === 'disconnected'", timeout=TIMEOUT_MS)
    await asyncio.sleep(1)
    assert await page.evaluate("log.states.at(-1)") == ["disconnected", 4003]
    assert not bridge.manager.sessions


def test_the_type_declarations_cover_the_fixed_api() -> None:
    """bridge-client.d.ts declares what the issue fixed (other tools rely on it)."""
    from conftest import ROOT

    dts = (ROOT / "static" / "bridge-client.d.ts").read_text()
    for needle in ["export declare class BridgeClient", "constructor(url: string", "token?:", "getToken?:",
                   "subscribe(subjects: string | readonly string[]", "ready: Promise<Reply>",
                   "unsubscribe(): Promise<", 'on(event: "message"', 'on(event: "state"',
                   '"connecting" | "connected" | "disconnected"', "publish(subject: string", "close(): void",
                   "time?: string", "expired?: boolean", "setToken(token: string | null): void",
                   'on(event: "refused"']:
        assert needle in dts, needle
