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
import pytest
from chromium import TIMEOUT_MS, WS_REFUSED, OpenPage, expect, wait_listening
from conftest import ROOT, NatsServer, eventually, free_port, unique
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

    filter_ = page.get_by_label("Filter by subject or data")
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
    never connects and says the bridge needs a token; with a wrong one, that the bridge
    refused the token it was opened with (not its address, which no longer holds it)."""
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
    await expect(detail).to_contain_text(
        "The bridge needs a token (Unauthorized: a valid token is required). Open this page as /?token=…")
    await expect(detail).to_have_attribute("data-tone", "error")
    wrong_detail = wrong.page.locator("#conn-detail")
    await expect(wrong_detail).to_contain_text(
        "The bridge refused the token this page was opened with (Unauthorized: a valid token is required). "
        "Open the page with a valid one: /?token=…")
    await expect(wrong_detail).not_to_contain_text("address")
    for refused, url in ((missing, stream), (wrong, stream + "?token=nope")):
        await expect(refused.page.locator("#conn-state")).not_to_have_attribute("data-state", "connected")
        # It tries again (full-jitter backoff from 500 ms): wait for the second try, not a set time.
        await eventually(lambda r=refused: len(r.sockets) >= 2, timeout=20)
        assert set(refused.sockets) == {url}
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
    data = page.get_by_label("Data", exact=True)
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


@pytest.mark.slow
async def test_request_action_shows_the_answer_and_its_round_trip_time_or_the_error_in_words(
    nats_server: Any, bridge_factory: Any, nc: Any, open_page: OpenPage
) -> None:
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("svc.>",))

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe("svc.page.echo", cb=echo)
    await nc.flush(timeout=5)
    page = (await open_page(bridge.http_url + "/")).page
    status = page.locator("#publish-status")
    await page.get_by_label("Publish subject").fill("svc.page.echo")
    await page.get_by_label("Data", exact=True).fill('{"big": 123456789012345678901234567890}')
    await page.get_by_role("button", name="Request").click()
    await expect(status).to_have_text(re.compile(r"^Answered in [\d.]+ ms$"))
    await expect(page.locator("#request-answer-head")).to_have_text("Answer from svc.page.echo (JSON)")
    await expect(page.locator("#request-answer-data")).to_have_text('{"big": 123456789012345678901234567890}')

    # Nobody serves this one: said at once, in words, and the old answer goes away.
    await page.get_by_label("Publish subject").fill("svc.page.nobody")
    await page.get_by_role("button", name="Request").click()
    await expect(status).to_have_text("No service answers on svc.page.nobody (no responders)")
    await expect(status).to_have_attribute("data-tone", "error")
    await expect(page.locator("#request-answer")).to_be_hidden()


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


async def test_after_the_token_expired_the_page_says_what_to_do_and_never_offers_it_again(
        nats_server: Any, bridge_factory: Any, open_page: OpenPage) -> None:
    """Closed with 4001 and no way to renew: no Connect (it would only offer the dead token),
    nobody signed in, and chips that say they are not connected rather than subscribing."""
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET, jwt_refresh_lead=1)
    watched = await open_page(bridge.http_url + "/?token=" + hs256(claims("ada", ttl=4)))
    page = watched.page
    await subscribe_with_button(page, "expiry.x")
    await expect(page.locator("#user")).to_have_text("Signed in as ada")
    detail = page.locator("#conn-detail")
    await expect(detail).to_contain_text("Your access token expires in")
    await expect(detail).to_have_text(
        "Your access token expired, so the bridge closed the connection (code 4001). This page cannot get "
        "a new token by itself: open it again with a new one, as /?token=…", timeout=10_000)
    await expect(page.locator("#conn-state")).to_have_text("Token expired")
    await expect(page.locator("#conn-state")).to_have_attribute("data-state", "closed")
    await expect(page.locator("#conn-toggle")).to_be_hidden()
    await expect(page.locator("#user")).to_be_hidden()
    await expect(chip(page, "expiry.x").locator(".chip-state")).to_have_text("not connected")
    await asyncio.sleep(1)
    assert len(watched.sockets) == 1  # an expired token is not tried again


async def test_after_a_backend_closed_the_connection_nobody_is_signed_in_and_chips_are_not_connected(
        nats_server: Any, bridge_factory: Any, open_page: OpenPage) -> None:
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET, control_tokens=("ctl",))
    watched = await open_page(bridge.http_url + "/?token=" + hs256(claims("ada")))
    page = watched.page
    await subscribe_with_button(page, "kicked.x")
    await expect(page.locator("#user")).to_have_text("Signed in as ada")
    [connection_id] = bridge.manager.sessions
    response = await page.request.delete(f"{bridge.http_url}/clients/{connection_id}",
                                         headers={"Authorization": "Bearer ctl"})
    assert response.status == 200
    await expect(page.locator("#conn-detail")).to_have_text(
        "A backend closed this connection (code 4003): disconnected by the server. "
        "Connect again if you should still be here.")
    await expect(page.locator("#conn-state")).to_have_attribute("data-state", "closed")
    await expect(page.locator("#user")).to_be_hidden()
    await expect(chip(page, "kicked.x").locator(".chip-state")).to_have_text("not connected")
    # Connect is offered (the token is still good), and brings the subscription back.
    await page.get_by_role("button", name="Connect", exact=True).click()
    await expect(chip(page, "kicked.x")).to_have_attribute("data-state", "subscribed")
    await expect(chip(page, "kicked.x").locator(".chip-state")).to_have_count(0)
    await expect(page.locator("#user")).to_have_text("Signed in as ada")


async def test_the_expiry_warning_counts_seconds_under_two_minutes_and_minutes_and_seconds_above(
        nats_server: Any, bridge_factory: Any, open_page: OpenPage) -> None:
    # A lead longer than either token's life: the warning comes as soon as each connects.
    bridge = await bridge_factory(nats_url=nats_server.url, jwt_secret=SECRET, jwt_refresh_lead=600)
    soon = await open_page(bridge.http_url + "/?token=" + hs256(claims("ada", ttl=50)))
    later = await open_page(bridge.http_url + "/?token=" + hs256(claims("bob", ttl=250)))
    await expect(soon.page.locator("#conn-detail")).to_contain_text(
        re.compile(r"^Your access token expires in (4\d|50) s \(at \d\d:\d\d:\d\d\); "
                   r"this page cannot renew it\."))
    await expect(later.page.locator("#conn-detail")).to_contain_text(
        re.compile(r"^Your access token expires in 4 min( \d\d? s)? \(at \d\d:\d\d:\d\d\)"))
    # It counts down.
    first = await soon.page.locator("#conn-detail").text_content()
    await expect(soon.page.locator("#conn-detail")).not_to_have_text(first or "")


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


async def stored_time(nc_js: Any, stream: str, seq: int) -> str:
    """When JetStream stored message ``seq`` of ``stream``, as its API says (RFC 3339)."""
    answer = await nc_js.request(f"$JS.API.STREAM.MSG.GET.{stream}", json.dumps({"seq": seq}).encode(),
                                 timeout=5)
    return json.loads(answer.data)["message"]["time"]


async def test_a_stored_row_shows_when_it_was_published_not_when_it_reached_the_page(
    js_server: Any, bridge_factory: Any, open_page: OpenPage
) -> None:
    bridge = await bridge_factory(nats_url=js_server.url)
    base = unique("pagetime").replace(".", "")
    nc_js = await nats.connect(js_server.url)
    try:
        js = await stream_for(nc_js, base)
        seq = (await js.publish(f"{base}.s", b'{"n": 1}')).seq
        published = await stored_time(nc_js, base.upper(), seq)
        await asyncio.sleep(1.5)  # so that reaching the page is seconds later than publishing
        page = (await open_page(bridge.http_url + "/")).page
        await page.locator("#history").fill("1")
        await subscribe_with_button(page, f"{base}.s")
        time_ = rows(page, f"{base}.s").locator(".msg-time")
        await expect(time_).to_have_attribute("datetime", published)
        # HH:MM:SS.mmm in the page's zone: the seconds and milliseconds are the same in any zone.
        seconds = re.search(r":(\d\d)\.(\d{3})", published)
        assert seconds is not None
        await expect(time_).to_have_text(re.compile(rf"\d\d:\d\d:{seconds[1]}\.{seconds[2]}$"))
        await expect(time_).to_have_attribute("title", re.compile(rf"^Published {re.escape(published)} "))
    finally:
        await nc_js.close()


async def test_asking_for_the_same_history_again_shows_it_marked_as_stored_again(
    js_server: Any, bridge_factory: Any, open_page: OpenPage
) -> None:
    """The bridge sends a repeated history with "history": true; the page keeps the mark."""
    bridge = await bridge_factory(nats_url=js_server.url)
    base = unique("pageagain").replace(".", "")
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
        await subscribe_with_button(page, f"{base}.s")
        await expect(stored).to_have_count(6)
        await expect(rows(page, f"{base}.s")).to_have_count(6)
        badges = await stored.locator(".badge.stored").all_text_contents()
        assert badges == ["stored #5", "stored #4", "stored #3"] * 2
    finally:
        await nc_js.close()


# ---------------------------------------------------------------------------
# What the page says when it has nothing to show, or cannot connect
# ---------------------------------------------------------------------------


async def test_the_filter_finds_text_in_the_data_as_well_as_the_subject(bridge: Any, nc: Any,
                                                                       open_page: OpenPage) -> None:
    page = (await open_page(bridge.http_url + "/")).page
    await subscribe_with_button(page, "find.>")
    await publish_until_seen(nc, rows(page, "find.pie"), "find.pie", b"apple pie")
    await publish(nc, "find.json", b'{"fruit": "Banana", "n": 12345678901234567890}')
    await publish(nc, "find.other", b"nothing to see")
    await expect(page.locator("#messages > li.msg")).to_have_count(3)
    filter_ = page.get_by_label("Filter by subject or data")
    await expect(filter_).to_have_attribute("placeholder", "text in subject or data, or a pattern: orders.>")

    async def shown() -> list[str | None]:
        return [await row.get_attribute("data-subject")
                for row in await page.locator("#messages > li.msg:visible").all()]

    cases = [("banana", ["find.json"]), ("PIE", ["find.pie"]), ("12345678901234567890", ["find.json"]),
             ("find.other", ["find.other"]), ("find.*", ["find.other", "find.json", "find.pie"]),
             ("*.pie", ["find.pie"])]
    for value, subjects in cases:
        await filter_.fill(value)
        await expect(page.locator("#messages > li.msg:visible")).to_have_count(len(subjects))
        assert await shown() == subjects, value
    # A message that arrives while the filter is set is matched on its data too.
    await filter_.fill("cherry")
    await publish(nc, "find.late", b'{"fruit": "cherry"}')
    await publish(nc, "find.late", b'{"fruit": "plum"}')
    await expect(rows(page, "find.late")).to_have_count(2)
    await expect(page.locator("#messages > li.msg:visible")).to_have_count(1)
    await expect(page.locator("#counts")).to_contain_text("1 of 5 shown")


async def test_an_empty_list_names_the_subjects_it_waits_for_and_says_when_it_was_cleared(
        bridge: Any, nc: Any, open_page: OpenPage) -> None:
    page = (await open_page(bridge.http_url + "/")).page
    empty = page.locator("#empty")
    await expect(empty).to_have_text("No messages yet. Subscribe to a subject to watch it here.")
    await subscribe_with_button(page, "wait.b wait.a")
    await expect(empty).to_have_text("No messages yet; waiting for messages on wait.a, wait.b.")
    await publish_until_seen(nc, rows(page, "wait.a"), "wait.a", b"one")
    await expect(empty).to_be_hidden()
    await page.get_by_role("button", name="Clear").click()
    await expect(empty).to_have_text("Cleared; waiting for messages on wait.a, wait.b.")
    await subscribe_with_button(page, "wait.c wait.d")
    await expect(empty).to_have_text(
        "Cleared; waiting for messages on wait.a, wait.b, wait.c and 1 more subject.")
    await page.get_by_role("button", name="Unsubscribe from wait.a").click()
    await page.get_by_role("button", name="Unsubscribe from wait.b").click()
    await page.get_by_role("button", name="Unsubscribe from wait.c").click()
    await page.get_by_role("button", name="Unsubscribe from wait.d").click()
    await expect(empty).to_have_text("Cleared. Subscribe to a subject to watch it here.")


async def test_a_restarting_bridge_without_auth_is_never_said_to_need_a_token(
    nats_server: Any, bridge_process: Any, open_page: OpenPage
) -> None:
    """Only a bridge that asked for a token (401) makes the page talk about tokens."""
    port = free_port()
    env = {"HTTP_PORT": str(port), "NATS_URL": nats_server.url, "TEST_PUBLISH_INTERVAL": "0",
           "LOG_LEVEL": "WARNING"}
    first = bridge_process(env=env, wait=False)
    await wait_listening(port, first.proc)
    page = (await open_page(f"http://127.0.0.1:{port}/", allow=(WS_REFUSED,))).page
    code, _ = await asyncio.to_thread(first.stop)
    assert code == 0
    detail = page.locator("#conn-detail")
    # From the fourth failed attempt on the page says more about why: here, that nothing answers.
    # Attempts come on a random backoff and may follow each other within a poll: the fourth or any later.
    await expect(detail).to_contain_text(re.compile(r"\(attempt ([4-9]|\d{2,})\)\."), timeout=20_000)
    await expect(detail).to_contain_text("The bridge does not answer: it is down, restarting or out of reach")
    await expect(detail).not_to_contain_text("token")


# ---------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------


async def test_with_publishing_on_the_first_message_is_in_view_at_1280_by_900(
        nats_server: Any, bridge_factory: Any, open_page: OpenPage) -> None:
    """The controls (a publish box grown with ten lines of data, three chips, status lines)
    never push the newest message below the fold of a laptop screen."""
    bridge = await bridge_factory(nats_url=nats_server.url, publish_allow=("fold.>",))
    page = (await open_page(bridge.http_url + "/", width=1280, height=900)).page
    await subscribe_with_button(page, "fold.> orders.> sensors.*.temperature")
    await page.get_by_label("Publish subject").fill("fold.room")
    await page.get_by_label("Data", exact=True).fill(
        "{\n" + ",\n".join(f'  "field{i}": {i}' for i in range(10)) + "\n}")
    await page.get_by_role("button", name="Publish").click()
    await expect(page.locator("#publish-status")).to_have_text("Published to fold.room")
    first = page.locator("#messages > li.msg").first
    await expect(first).to_contain_text('"field9": 9')
    assert await page.evaluate("window.scrollY") == 0
    box = await first.bounding_box()
    assert box is not None
    assert 0 <= box["y"] and box["y"] + box["height"] <= 900, box
