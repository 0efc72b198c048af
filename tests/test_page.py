"""The browser page (static/), in real Chromium driven by Playwright (see chromium.py:
Debian's Chromium only; every page opened is watched for console errors and dialogs)."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import chromium
import nats
from chromium import TIMEOUT_MS, WS_REFUSED, OpenPage, expect, wait_listening
from conftest import ROOT, NatsServer, free_port, unique
from minting import SECRET, claims, hs256
from page_support import (
    chip,
    publish,
    publish_until_seen,
    rows,
    server_subjects,
    subscribe_with_button,
    welcomed,
)

from bridge.process import demo
from bridge.process.metrics import LINK

SCREENSHOT = ROOT / "docs" / "page.png"

# The Chromium fixtures (chromium.py), used by this module's tests.
browser = chromium.browser
open_page = chromium.open_page


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


async def test_raw_json_path(bridge: Any, nc: Any, open_page: OpenPage) -> None:
    """JSON typed in the box goes out as is (plus an id); each reply shows under its request."""
    page = (await open_page(bridge.http_url + "/")).page
    box = page.get_by_label("JSON request")
    assert await box.get_attribute("id") == "messageText"
    log = page.locator("#raw-log > li")

    await box.fill('{"subjects":["raw.one"],"action":"subscribe"}')
    await box.press("Enter")
    await expect(log.first).to_contain_text("Successfully connected to events: 'raw.one'")
    await expect(chip(page, "raw.one")).to_have_attribute("data-state", "subscribed")
    assert server_subjects(bridge) == [{"raw.one"}]
    await publish_until_seen(nc, rows(page, "raw.one"), "raw.one", b'{"n": 1, "nested": {"ok": true}}')
    await expect(rows(page, "raw.one").first.locator("pre")).to_contain_text('"n": 1')

    # The Send button; what is wrong with a request sits under it, in words, and the text
    # stays in the box to be fixed.
    await box.fill('{"subjects": [')
    await page.get_by_role("button", name="Send").click()
    await expect(log.first.locator(".raw-request")).to_have_text('{"subjects": [')
    await expect(log.first.locator(".reply.error")).to_contain_text(
        "Not sent: this is not valid JSON. It ends too early: it still needs ] } at the end.")
    await expect(box).to_have_value('{"subjects": [')

    # A request with its own id is matched by that id.
    await box.fill('{"subjects":["raw.one"],"action":"dance","id":7}')
    await box.press("Enter")
    await expect(log.first.locator(".reply.error")).to_contain_text("has to specify action")
    await expect(log.nth(1).locator(".reply")).to_have_count(1)

    # Unsubscribe answers once per subject, each under the same request.
    await box.fill('{"subjects":["raw.one","raw.never"],"action":"unsubscribe"}')
    await page.get_by_role("button", name="Send").click()
    await expect(log.first.locator(".reply.ok")).to_contain_text("unsubscribed from event: raw.one")
    await expect(log.first.locator(".reply.error")).to_contain_text("did not subscribe to event raw.never")
    await expect(chip(page, "raw.one")).to_have_count(0)
    assert server_subjects(bridge) == [set()]

    # ↑ in the empty box brings the last request back.
    await box.press("ArrowUp")
    await expect(box).to_have_value('{"subjects":["raw.one","raw.never"],"action":"unsubscribe"}')


async def test_button_path(bridge: Any, nc: Any, open_page: OpenPage) -> None:
    """Subject field + Subscribe/Unsubscribe; errors show next to the field."""
    page = (await open_page(bridge.http_url + "/")).page
    # Publishing is off on this bridge (no PUBLISH_ALLOW): once the welcome frame is in,
    # the publish box stays hidden.
    await welcomed(page)
    await expect(page.locator("#publish-panel")).to_be_hidden()
    await expect(page.get_by_label("Publish subject")).to_be_hidden()
    await subscribe_with_button(page, "btn.a btn.b")
    assert server_subjects(bridge) == [{"btn.a", "btn.b"}]
    await publish_until_seen(nc, rows(page, "btn.a"), "btn.a", b'{"hello": "world"}')

    field_ = page.get_by_label("Subject", exact=True)
    status = page.locator("#subject-status")
    await field_.fill("btn.a")
    await page.get_by_role("button", name="Unsubscribe", exact=True).click()
    await expect(chip(page, "btn.a")).to_have_count(0)
    await expect(status).to_have_text("Successfully unsubscribed from event: btn.a")
    assert server_subjects(bridge) == [{"btn.b"}]

    # Enter in the field subscribes; the server's refusal is shown beside it.
    await field_.fill("bad..subject")
    await field_.press("Enter")
    await expect(status).to_contain_text("Invalid subject")
    await expect(status).to_have_attribute("data-tone", "error")
    await expect(chip(page, "bad..subject")).to_have_count(0)

    await field_.fill("btn.never")
    await page.get_by_role("button", name="Unsubscribe", exact=True).click()
    await expect(status).to_contain_text("did not subscribe to event btn.never")
    assert server_subjects(bridge) == [{"btn.b"}]


async def test_removing_a_chip_unsubscribes(bridge: Any, nc: Any, open_page: OpenPage) -> None:
    page = (await open_page(bridge.http_url + "/")).page
    await subscribe_with_button(page, "chip.gone chip.kept")
    await publish_until_seen(nc, rows(page, "chip.gone"), "chip.gone", b"before")
    await publish_until_seen(nc, rows(page, "chip.kept"), "chip.kept", b"before")

    # With the keyboard: focus the chip's button and press Enter.
    await page.get_by_role("button", name="Unsubscribe from chip.gone").focus()
    await page.keyboard.press("Enter")
    await expect(chip(page, "chip.gone")).to_have_count(0)
    await expect(chip(page, "chip.kept")).to_have_count(1)
    assert server_subjects(bridge) == [{"chip.kept"}]

    # Published in this order on one connection, so once the second shows the first
    # would have too.
    await publish(nc, "chip.gone", b"after-removal")
    await publish(nc, "chip.kept", b"control-after")
    await expect(rows(page, "chip.kept", "control-after")).to_have_count(1)
    await expect(rows(page, "chip.gone", "after-removal")).to_have_count(0)


async def test_payloads_render_as_text(bridge: Any, nc: Any, open_page: OpenPage) -> None:
    """Text stays text, HTML is never parsed, base64 is marked, big values fold."""
    watched = await open_page(bridge.http_url + "/")
    page = watched.page
    await subscribe_with_button(page, "pay.>")

    await publish_until_seen(nc, rows(page, "pay.text"), "pay.text", b"hello plain text")
    row = rows(page, "pay.text").first
    await expect(row.locator(".badge.text")).to_have_text("text")
    await expect(row.locator("pre")).to_have_text("hello plain text")

    evil = "<img src=x onerror=alert(1)>"
    await publish(nc, "pay.html", evil.encode())
    await publish(nc, "pay.json", b'{"html": "<b>bold</b><script>alert(2)</script>"}')
    await expect(rows(page, "pay.html").locator("pre")).to_have_text(evil)
    await expect(rows(page, "pay.json").locator("pre")).to_contain_text("<b>bold</b><script>")
    await expect(page.locator("#messages img, #messages b, #messages script")).to_have_count(0)
    await expect(page.locator("img")).to_have_count(0)

    await publish(nc, "pay.bin", b"\xff\x00\xfe")
    bin_row = rows(page, "pay.bin")
    await expect(bin_row.locator(".badge.base64")).to_have_text("base64 · 3 bytes")
    await expect(bin_row.locator("pre")).to_have_text("/wD+")

    await publish(nc, "pay.big", ('{"items": [' + ", ".join(map(str, range(60))) + "]}").encode())
    details = rows(page, "pay.big").locator("details")
    await expect(details).to_have_count(1)
    await expect(details.locator("pre")).to_be_hidden()
    await details.locator("summary").click()
    await expect(details.locator("pre")).to_be_visible()
    await expect(details.locator("pre")).to_contain_text('"items": [')

    # Shown as sent: key order, big integers and number spellings survive.
    await publish(nc, "pay.exact", b'{"b": 1, "2": [2, 1.0], "big": 12345678901234567890, "e": 1E+2}')
    await expect(rows(page, "pay.exact").locator("pre")).to_have_text(
        '{"b": 1, "2": [2, 1.0], "big": 12345678901234567890, "e": 1E+2}'
    )

    await publish(nc, "pay.hdr", b"{}", headers={"X-Trace": "abc-123"})
    await expect(rows(page, "pay.hdr").locator(".headers")).to_contain_text("X-Trace")

    await asyncio.sleep(0.3)  # give a would-be alert() its chance
    assert watched.dialogs == []


async def test_filter_pause_clear_rate_and_cap(bridge: Any, nc: Any, open_page: OpenPage) -> None:
    page = (await open_page(bridge.http_url + "/")).page
    await subscribe_with_button(page, "flow.>")
    await publish_until_seen(nc, rows(page, "flow.a"), "flow.a", b"a0")
    await publish(nc, "flow.b", b"b0")
    await expect(rows(page, "flow.b")).to_have_count(1)

    filter_ = page.get_by_label("Filter by subject")
    for value, a_shown, b_shown in [("flow.a", True, False), ("*.b", False, True), ("flow.*", True, True)]:
        await filter_.fill(value)
        for subject, shown in (("flow.a", a_shown), ("flow.b", b_shown)):
            target = expect(rows(page, subject).first)
            await (target.to_be_visible() if shown else target.to_be_hidden())
    await filter_.fill("nothing.like.this")
    await expect(page.locator("#empty")).to_contain_text("No message matches")
    await filter_.fill("")

    # Pause keeps what arrives and shows it on resume, newest first.
    await page.get_by_role("button", name="Pause").click()
    await expect(page.locator("#pause")).to_have_text("Resume")
    await publish(nc, "flow.a", b"held-1")
    await publish(nc, "flow.a", b"held-2")
    await expect(page.locator("#paused-note")).to_contain_text("2 new messages")
    await expect(rows(page, "flow.a", "held-")).to_have_count(0)
    await page.get_by_role("button", name="Resume (2)").click()
    await expect(rows(page, "flow.a", "held-")).to_have_count(2)
    await expect(page.locator("#messages > li").first).to_contain_text("held-2")
    await expect(page.locator("#paused-note")).to_be_hidden()

    # A burst shows as a rate, and the list keeps only the newest 500 rows.
    for i in range(600):
        await nc.publish("flow.burst", f"burst-{i}".encode())
    await nc.flush(timeout=5)
    await expect(page.locator("#rate")).to_have_text(re.compile(r"^(?!0 )\d+(\.\d)? msg/s$"))
    await expect(page.locator("#messages > li").first).to_contain_text("burst-599")
    await expect(page.locator("#messages > li")).to_have_count(500)
    await expect(page.locator("#counts")).to_contain_text("the newest 500 are kept")

    await page.get_by_role("button", name="Clear").click()
    await expect(page.locator("#messages > li")).to_have_count(0)
    await expect(page.locator("#empty")).to_be_visible()
    await expect(page.locator("#counts")).to_have_text("0 shown · 0 received")


async def test_nats_link_state(bridge_factory: Any, open_page: OpenPage) -> None:
    """The bridge's status frames show whether its NATS link is up."""
    private = NatsServer()
    await asyncio.to_thread(private.start)
    try:
        bridge = await bridge_factory(nats_url=private.url, nats_reconnect_wait=0.2)
        page = (await open_page(bridge.http_url + "/")).page
        nats_state = page.locator("#nats-state")
        await expect(nats_state).to_have_attribute("data-state", "connected")
        await asyncio.to_thread(private.stop)
        await expect(nats_state).to_have_attribute("data-state", "disconnected")
        await expect(page.locator("#conn-detail")).to_contain_text("NATS connection lost")
        await expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected")
        await asyncio.to_thread(private.start)
        await expect(nats_state).to_have_attribute("data-state", "connected")
    finally:
        await asyncio.to_thread(private.stop)


async def test_reconnects_and_resubscribes_after_bridge_restart(
    nats_server: Any, bridge_process: Any, nc: Any, open_page: OpenPage
) -> None:
    port = free_port()
    env = {"HTTP_PORT": str(port), "NATS_URL": nats_server.url, "TEST_PUBLISH_INTERVAL": "0",
           "LOG_LEVEL": "WARNING"}
    first = bridge_process(env=env, wait=False)
    await wait_listening(port, first.proc)
    watched = await open_page(f"http://127.0.0.1:{port}/", allow=(WS_REFUSED,))
    page = watched.page
    await subscribe_with_button(page, "restart.x")
    await publish_until_seen(nc, rows(page, "restart.x", "before"), "restart.x", b"before")

    code, _ = await asyncio.to_thread(first.stop)
    assert code == 0
    await expect(page.locator("#conn-state")).to_have_attribute("data-state", "reconnecting")
    await expect(page.locator("#conn-detail")).to_contain_text("shutting down")
    await expect(chip(page, "restart.x")).to_have_count(1)

    second = bridge_process(env=env, wait=False)
    await wait_listening(port, second.proc)
    await expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected", timeout=20_000)
    await expect(chip(page, "restart.x")).to_have_attribute("data-state", "subscribed")
    await expect(page.locator("#subject-status")).to_contain_text("renewed")
    await publish_until_seen(nc, rows(page, "restart.x", "after"), "restart.x", b"after")
    assert len(watched.sockets) >= 2
    assert set(watched.sockets) == {f"ws://127.0.0.1:{port}/stream"}


async def test_follows_its_location_on_another_port(bridge: Any, open_page: OpenPage) -> None:
    """Served on a free port (not 5001), the page talks to that port and fetches nothing else."""
    assert bridge.port != 5001
    watched = await open_page(bridge.http_url + "/")
    page = watched.page
    assert watched.sockets == [f"ws://127.0.0.1:{bridge.port}/stream"]
    foreign = [u for u in watched.requests if not u.startswith((bridge.http_url + "/", "data:"))]
    assert foreign == []
    [connection_id] = bridge.manager.sessions
    await expect(page.locator("#connection-id")).to_have_text(connection_id)

    for path, content_types in [("/", ("text/html",)),
                                ("/static/app.js", ("text/javascript", "application/javascript")),
                                ("/static/style.css", ("text/css",))]:
        response = await page.request.get(bridge.http_url + path)
        assert response.status == 200, path
        assert response.headers["content-type"].startswith(content_types), (path, response.headers)

    # Disconnect is "closed" and stays so; Connect opens a new connection on the same URL.
    await page.get_by_role("button", name="Disconnect").click()
    await expect(page.locator("#conn-state")).to_have_attribute("data-state", "closed")
    await expect(page.locator("#connection-id")).to_have_text("—")
    await page.get_by_role("button", name="Connect", exact=True).click()
    await expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected")
    await expect(page.locator("#connection-id")).not_to_have_text(re.compile(f"^(—|{connection_id})$"))
    assert watched.sockets == [f"ws://127.0.0.1:{bridge.port}/stream"] * 2


async def test_phone_width_and_keyboard(bridge: Any, nc: Any, open_page: OpenPage) -> None:
    """At 375 px nothing scrolls sideways; every control is labelled and reachable by keyboard."""
    page = (await open_page(bridge.http_url + "/", width=375, height=740)).page
    unlabelled = await page.evaluate(
        """() => [...document.querySelectorAll('input, button')]
              .filter(e => !e.hidden && !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                           && !e.textContent.trim())
              .map(e => e.outerHTML)"""
    )
    assert unlabelled == []

    await page.get_by_label("Subject", exact=True).focus()
    await page.keyboard.type("phone.x")
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.id") == "subscribe"
    await page.keyboard.press("Enter")
    await expect(chip(page, "phone.x")).to_have_attribute("data-state", "subscribed")
    long_line = '{"token": "' + "x" * 400 + '", "list": [' + ", ".join(["1.25"] * 80) + "]}"
    await publish_until_seen(nc, rows(page, "phone.x"), "phone.x", long_line.encode())
    await publish(nc, "phone.x", ("word" * 200).encode())
    await expect(rows(page, "phone.x")).to_have_count(2)
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0


async def test_token_from_the_page_address(nats_server: Any, bridge_factory: Any, nc: Any,
                                           open_page: OpenPage) -> None:
    """With AUTH_TOKENS, /?token=T reaches the socket as ?token=T; without it the page
    never connects and says a token may be needed."""
    bridge = await bridge_factory(nats_url=nats_server.url, auth_tokens=("t1",))
    stream = f"ws://127.0.0.1:{bridge.port}/stream"
    # The refused pages retry in the background while the one with the token is used.
    missing = await open_page(bridge.http_url + "/", connected=False, allow=(WS_REFUSED,))
    wrong = await open_page(bridge.http_url + "/?token=nope", connected=False, allow=(WS_REFUSED,))

    watched = await open_page(bridge.http_url + "/?token=t1")
    page = watched.page
    assert watched.sockets == [stream + "?token=t1"]
    await subscribe_with_button(page, "auth.x")
    await publish_until_seen(nc, rows(page, "auth.x", "let in"), "auth.x", b"let in")
    await expect(page.locator("#conn-detail")).to_be_hidden()  # empty: nothing went wrong

    detail = missing.page.locator("#conn-detail")
    await expect(detail).to_contain_text("If this bridge needs a token, open the page as /?token=")
    await expect(detail).to_have_attribute("data-tone", "error")
    await expect(wrong.page.locator("#conn-detail")).to_contain_text(
        "token in this page's address may be wrong")
    for refused, url in ((missing, stream), (wrong, stream + "?token=nope")):
        await expect(refused.page.locator("#conn-state")).not_to_have_attribute("data-state", "connected")
        assert len(refused.sockets) >= 2 and set(refused.sockets) == {url}
        assert refused.frames_received == 0  # not even a welcome: it never connected
    assert len(bridge.manager.sessions) == 1  # the page with the token
    assert bridge.app.http_server.web_app[LINK].refusals["auth"] >= 4


async def test_publish_box(nats_server: Any, bridge_factory: Any, nc: Any, open_page: OpenPage) -> None:
    """With PUBLISH_ALLOW the box shows; JSON goes as JSON, text as text; refusals show beside it."""
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("chat.>",))
    on_nats = await nc.subscribe("chat.room")
    await nc.flush(timeout=5)
    page = (await open_page(bridge.http_url + "/")).page
    subject = page.get_by_label("Publish subject")
    data = page.get_by_label("Data")
    status = page.locator("#publish-status")
    await expect(page.locator("#publish-panel")).to_be_visible()
    await subscribe_with_button(page, "chat.>")

    await subject.fill("chat.room")
    await data.fill('{"n": 1}')
    await expect(page.locator("#publish-kind")).to_have_text("sent as JSON object")
    await page.get_by_role("button", name="Publish").click()
    msg = await on_nats.next_msg(timeout=TIMEOUT_MS / 1000)
    assert json.loads(msg.data) == {"n": 1}
    await expect(status).to_have_text("Published to chat.room")
    await expect(status).to_have_attribute("data-tone", "ok")
    await expect(rows(page, "chat.room").first.locator("pre")).to_have_text('{"n": 1}')

    # From the keyboard: not JSON, so a string; Ctrl+Enter in the data box publishes.
    await data.fill("hello <b>there</b>")
    await expect(page.locator("#publish-kind")).to_have_text("sent as text")
    await data.press("Control+Enter")
    msg = await on_nats.next_msg(timeout=TIMEOUT_MS / 1000)
    assert msg.data == b"hello <b>there</b>"
    await expect(rows(page, "chat.room", "hello <b>there</b>").locator(".badge.text")).to_have_text("text")

    # Outside PUBLISH_ALLOW, and a wildcard: the bridge's refusal sits under the box.
    await subject.fill("other.room")
    await subject.press("Enter")
    await expect(status).to_contain_text("Publishing to 'other.room' is not allowed")
    await expect(status).to_have_attribute("data-tone", "error")
    await subject.fill("chat.*")
    await page.get_by_role("button", name="Publish").click()
    await expect(status).to_contain_text("Invalid subject")
    await expect(page.locator("#raw-log > li")).to_have_count(0)
    await expect(rows(page, "chat.room")).to_have_count(2)


async def test_close_codes_are_explained(nats_server: Any, bridge_factory: Any, open_page: OpenPage) -> None:
    """1009 (frame too large) and 1008 (flooding) are said in words, and the page reconnects."""
    bridge = await bridge_factory(nats_url=nats_server.url, max_frame_bytes=1024, control_rate=1)
    page = (await open_page(bridge.http_url + "/")).page
    detail = page.locator("#conn-detail")
    box = page.get_by_label("JSON request")

    await box.fill('{"subjects": ["big.' + "x" * 2000 + '"]}')
    await box.press("Enter")
    await expect(detail).to_contain_text("a request was larger than it accepts (code 1009)")
    await expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected")
    await expect(detail).to_contain_text("Reconnected. The last connection ended: the bridge closed")
    # The request that was too large is not sent again (that would loop for ever).
    await expect(page.locator("#raw-log > li").first).to_contain_text("too large); not sent again")
    await expect(page.locator("#subscriptions > li")).to_have_count(0)

    # Requests far over CONTROL_RATE: rate-limit replies (matched by their id), then 1008.
    await welcomed(page)
    await page.evaluate(
        """() => {
            const box = document.getElementById('messageText');
            for (let i = 0; i < 12; i++) {
                box.value = '{"subjects": ["flood.x"], "action": "unsubscribe"}';
                document.getElementById('raw-form').requestSubmit();
            }
        }"""
    )
    await expect(page.locator("#raw-log .reply.error").filter(has_text="Rate limit")).not_to_have_count(0)
    await expect(detail).to_contain_text("sent requests too fast (rate limit, code 1008)")
    await expect(detail).to_have_attribute("data-tone", "error")
    # It waits a little before reconnecting after 1008 (not hammering the bridge).
    await expect(page.locator("#conn-state")).to_have_text(re.compile(r"^Reconnecting in [12] s$"))


async def test_long_strings_show_as_strings_with_true_line_counts(bridge: Any, nc: Any,
                                                                  open_page: OpenPage) -> None:
    page = (await open_page(bridge.http_url + "/")).page
    await subscribe_with_button(page, "exact.>")
    note = "The quick brown fox jumps over the lazy dog, and then it keeps running for a while."
    payload = ('{"id":7,"note":"' + note + '"}').encode()
    await publish_until_seen(nc, rows(page, "exact.note"), "exact.note", payload)
    row = rows(page, "exact.note")
    await expect(row.locator("pre")).to_have_text('{\n  "id": 7,\n  "note": "' + note + '"\n}')
    await expect(row.locator("details")).to_have_count(0)  # four lines: nothing to fold

    url = "https://example.com/" + "/".join(["segment"] * 12) + "?q=1"
    await publish(nc, "exact.url", ('{"url": "' + url + '"}').encode())
    await expect(rows(page, "exact.url").locator("pre")).to_have_text('{\n  "url": "' + url + '"\n}')

    # Folded when long: the summary counts the lines the value really has.
    items = [f"line {i} " + "word " * 12 for i in range(30)]
    await publish(nc, "exact.list", json.dumps(items).encode())
    summary = rows(page, "exact.list").locator("details summary")
    await expect(summary).to_contain_text("32 lines")
    await summary.click()
    await expect(rows(page, "exact.list").locator("pre")).to_have_text(
        "[\n" + ",\n".join(f'  "{item}"' for item in items) + "\n]")


async def test_big_numbers_keep_the_payloads_own_digits(bridge: Any, nc: Any, open_page: OpenPage) -> None:
    page = (await open_page(bridge.http_url + "/")).page
    await subscribe_with_button(page, "digits.>")
    hundred = "9" * 60 + "1234567890" * 4
    await publish_until_seen(nc, rows(page, "digits.bare"), "digits.bare", hundred.encode())
    await expect(rows(page, "digits.bare").locator("pre")).to_have_text(hundred)
    await publish(nc, "digits.obj", f'{{"n": {hundred}, "small": 1.50, "e": -2E-7}}'.encode())
    await expect(rows(page, "digits.obj").locator("pre")).to_have_text(
        f'{{\n  "n": {hundred},\n  "small": 1.50,\n  "e": -2E-7\n}}')


async def test_a_json_string_payload_looks_different_from_text(bridge: Any, nc: Any,
                                                               open_page: OpenPage) -> None:
    page = (await open_page(bridge.http_url + "/")).page
    await subscribe_with_button(page, "kind.>")
    await publish_until_seen(nc, rows(page, "kind.json"), "kind.json", b'"hello"')
    await publish(nc, "kind.text", b"hello")
    json_row, text_row = rows(page, "kind.json"), rows(page, "kind.text")
    await expect(json_row.locator(".badge.json-string")).to_have_text("JSON string")
    await expect(json_row.locator("pre")).to_have_text('"hello"')
    await expect(text_row.locator(".badge.text")).to_have_text("text")
    await expect(text_row.locator("pre")).to_have_text("hello")
    await expect(json_row.locator(".badge.text")).to_have_count(0)


async def test_each_row_shows_the_subscription_it_matched(bridge: Any, nc: Any, open_page: OpenPage) -> None:
    page = (await open_page(bridge.http_url + "/")).page
    await subscribe_with_button(page, "via.* via.deep.> via.exact")
    await publish_until_seen(nc, rows(page, "via.one"), "via.one", b"1")
    await publish(nc, "via.deep.a.b", b"2")
    await publish(nc, "via.exact", b"3")
    await expect(rows(page, "via.one").locator(".badge.via")).to_have_text("via via.*")
    await expect(rows(page, "via.deep.a.b").locator(".badge.via")).to_have_text("via via.deep.>")
    # Matched by the subject itself and by via.*: the wildcard is the news.
    await expect(rows(page, "via.exact").locator(".badge.via")).to_have_text("via via.*")
    await expect(rows(page, "via.exact")).to_have_attribute("data-matched", "via.* via.exact")


async def test_the_examples_json_typed_into_the_first_box_subscribes(bridge: Any, nc: Any,
                                                                      open_page: OpenPage) -> None:
    example = '{"subjects":["test.subject"],"action":"subscribe"}'
    page = (await open_page(bridge.http_url + "/")).page
    field = page.get_by_label("Subject", exact=True)
    status = page.locator("#subject-status")
    await field.fill(example)
    await field.press("Enter")
    await expect(status).to_have_text("Successfully connected to events: 'test.subject'")
    await expect(chip(page, "test.subject")).to_have_attribute("data-state", "subscribed")
    await expect(page.locator("#subscriptions > li")).to_have_count(1)
    assert server_subjects(bridge) == [{"test.subject"}]
    await expect(field).to_have_value("")
    await expect(page.locator("#raw-log > li").first.locator(".raw-request")).to_have_text(example)

    # What is wrong is said in words, and the text stays to be fixed.
    await field.fill('{"subjects": ["a",]}')
    await field.press("Enter")
    await expect(status).to_have_text(
        "Not sent: this is not valid JSON. A value is missing before ] (character 19): "
        "remove the comma before it.")
    await expect(status).to_have_attribute("data-tone", "error")
    await expect(field).to_have_value('{"subjects": ["a",]}')
    await field.fill("{'subjects': ['a']}")
    await field.press("Enter")
    await expect(status).to_contain_text('Use double quotes (") around names and text, not single quotes')
    assert server_subjects(bridge) == [{"test.subject"}]

    # The raw box starts empty (nothing to type into the middle of), the example shown in it.
    await page.reload()
    raw = page.get_by_label("JSON request")
    await expect(raw).to_have_value("")
    await expect(raw).to_have_attribute("placeholder", example)


async def test_screenshot_for_the_readme(bridge: Any, nc: Any, open_page: OpenPage, tmp_path: Path) -> None:
    """The page at desktop width with a few messages; UPDATE_SCREENSHOT=1 writes docs/page.png.

    Written only on request, so an ordinary test run leaves the work tree clean.
    """
    page = (await open_page(bridge.http_url + "/", width=1280, height=900)).page
    box = page.get_by_label("JSON request")
    await box.fill('{"subjects":["test.subject"],"action":"subscribe"}')
    await box.press("Enter")
    await expect(chip(page, "test.subject")).to_have_attribute("data-state", "subscribed")
    await subscribe_with_button(page, "orders.> sensors.*.temperature")

    await publish_until_seen(nc, rows(page, "test.subject"), "test.subject",
                             json.dumps(demo.test_message()).encode())
    await publish_until_seen(nc, rows(page, "orders.created"), "orders.created",
                             b'{"order": 1042, "customer": "Ada", "total": 31.5, "items": 3}')
    await publish_until_seen(nc, rows(page, "sensors.kitchen.temperature"), "sensors.kitchen.temperature",
                             b"21.4")
    await publish(nc, "orders.shipped", b"order 1042 left the warehouse", headers={"Trace-Id": "7f3a9c"})
    await publish(nc, "orders.audit", bytes(range(250, 256)) + b"\x00\x01binary")
    await publish(nc, "orders.note", b'"gift wrap, please"')
    await publish(nc, "test.subject", json.dumps(demo.test_message()).encode())
    await expect(page.locator("#messages > li")).to_have_count(7)
    await asyncio.sleep(1.1)  # one tick of the rate
    await page.get_by_label("Subject", exact=True).blur()

    target = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / "page.png"
    png = await page.screenshot(path=str(target), full_page=False, timeout=TIMEOUT_MS)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000



# ---------------------------------------------------------------------------
# Who is connected, and a token that runs out (JWT on)
# ---------------------------------------------------------------------------


async def test_shows_who_is_connected(nats_server: Any, bridge_factory: Any, open_page: OpenPage) -> None:
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET)
    watched = await open_page(bridge.http_url + "/?token=" + hs256(claims("<b")))
    user = watched.page.locator("#user")
    await expect(user).to_have_text("Signed in as <b")  # a name is text, never markup
    assert await watched.page.locator("#user b").count() == 0


async def test_says_plainly_when_the_token_expired(nats_server: Any, bridge_factory: Any,
                                                   open_page: OpenPage) -> None:
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET, jwt_refresh_lead=1)
    watched = await open_page(bridge.http_url + "/?token=" + hs256(claims("ada", ttl=3)))
    page = watched.page
    detail = page.locator("#conn-detail")
    await expect(detail).to_contain_text("Your access token expires at")
    await expect(detail).to_contain_text("Your access token expired", timeout=10_000)
    await expect(detail).to_contain_text("Open this page with a new token")
    await expect(page.locator("#conn-state")).to_have_attribute("data-state", "closed")
    await asyncio.sleep(1)
    assert len(watched.sockets) == 1  # an expired token is not tried again


# ---------------------------------------------------------------------------
# History from JetStream
# ---------------------------------------------------------------------------


async def stream_for(nc_js: Any, base: str) -> Any:
    js = nc_js.jetstream()
    await js.add_stream(name=base.upper(), subjects=[f"{base}.>"])
    return js


async def test_asks_for_the_last_n_and_marks_stored_rows(js_server: Any, bridge_factory: Any,
                                                        open_page: OpenPage) -> None:
    bridge = await bridge_factory(nats_url=js_server.url)
    base = unique("pagehist").replace(".", "")
    nc_js = await nats.connect(js_server.url)
    try:
        js = await stream_for(nc_js, base)
        for n in range(5):
            await js.publish(f"{base}.s", b'{"n": %d}' % n)
        page = (await open_page(bridge.http_url + "/")).page
        await page.locator("#history").fill("3")
        await subscribe_with_button(page, f"{base}.s")
        stored = page.locator(f'#messages > li.msg[data-subject="{base}.s"][data-history="true"]')
        await expect(stored).to_have_count(3)
        await expect(stored.first.locator(".badge.stored")).to_have_text("stored #5")
        await js.publish(f"{base}.s", b'{"n": 5}')
        await expect(rows(page, f"{base}.s")).to_have_count(4)
        await expect(rows(page, f"{base}.s").first.locator(".badge.seq")).to_have_text("#6")
    finally:
        await nc_js.close()


async def test_reconnects_after_a_bridge_restart_and_shows_every_message_published_meanwhile(
    js_server: Any, bridge_process: Any, open_page: OpenPage
) -> None:
    base = unique("pageresume").replace(".", "")
    nc_js = await nats.connect(js_server.url)
    try:
        js = await stream_for(nc_js, base)
        port = free_port()
        env = {"HTTP_PORT": str(port), "NATS_URL": js_server.url, "TEST_PUBLISH_INTERVAL": "0",
               "LOG_LEVEL": "WARNING"}
        first = bridge_process(env=env, wait=False)
        await wait_listening(port, first.proc)
        page = (await open_page(f"http://127.0.0.1:{port}/", allow=(WS_REFUSED,))).page
        await subscribe_with_button(page, f"{base}.feed")
        await js.publish(f"{base}.feed", b'{"n": 0}')
        await expect(rows(page, f"{base}.feed")).to_have_count(1)

        await asyncio.to_thread(first.stop)
        await expect(page.locator("#conn-state")).to_have_attribute("data-state", "reconnecting")
        for n in range(1, 6):  # published while the bridge is down: NATS keeps them in the stream
            await js.publish(f"{base}.feed", b'{"n": %d}' % n)
        second = bridge_process(env=env, wait=False)
        await wait_listening(port, second.proc)
        await expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected", timeout=20_000)
        await expect(rows(page, f"{base}.feed")).to_have_count(6)
        await expect(page.locator("#subject-status")).to_contain_text("Recovered 5 messages")
        texts = await rows(page, f"{base}.feed").locator(".payload").all_text_contents()
        assert [json.loads(t)["n"] for t in reversed(texts)] == [0, 1, 2, 3, 4, 5]  # newest first on the page
    finally:
        await nc_js.close()
