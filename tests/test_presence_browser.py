"""Presence in real Chromium: the client library's presence() and join/leave events, and the
page saying how many are here and who.  Against a real bridge (JetStream on) and real
WebSocket clients joining from Python."""

from __future__ import annotations

from typing import Any

import chromium
import pytest
from chromium import TIMEOUT_MS, OpenPage, expect
from conftest import unique
from minting import SECRET, claims, hs256
from page_support import chip, subscribe_with_button
from test_client_lib import harness

browser = chromium.browser
open_page = chromium.open_page

pytestmark = pytest.mark.slow


@pytest.fixture
async def presence_bridge(bridge_factory, js_server) -> Any:
    return await bridge_factory(nats_url=js_server.url, presence_subjects=("room.*", "demo.>"),
                                control_subject=unique("ctl"))


async def events(page: Any, count: int) -> list[list[Any]]:
    await page.wait_for_function("(n) => window.events.length >= n", arg=count, timeout=TIMEOUT_MS)
    return await page.evaluate("() => window.events")


async def test_library_subscription_hears_joins_and_leaves_and_answers_who_is_here(
    presence_bridge, ws_factory, open_page: OpenPage
):
    page = await harness(open_page, presence_bridge.http_url)
    await page.evaluate("""async () => {
        window.events = [];
        window.sub = client.subscribe("room.lib", {presence: true});
        sub.on("join", (e) => events.push(["join", e.client, e.user, e.order]));
        sub.on("leave", (e) => events.push(["leave", e.client, e.user, e.order]));
        await sub.ready;
    }""")
    (own,) = await events(page, 1)  # its own join, after the reply
    other = await ws_factory(presence_bridge.ws_url)
    await other.subscribe("room.lib")
    joined = (await events(page, 2))[1]
    assert (own[0], own[3], joined[0], joined[2], joined[3]) == ("join", 1, "join", None, 2)
    answer = await page.evaluate("async () => await sub.presence()")
    assert (answer["subject"], answer["count"], answer["users"]) == ("room.lib", 2, 0)
    assert {e["client"] for e in answer["presence"]} == {own[1], joined[1]}
    assert answer["order"] == 2  # the events it already counts
    await other.close()
    assert (await events(page, 3))[2] == ["leave", joined[1], None, 3]


async def test_library_presence_refusals_reject_with_the_bridges_words(presence_bridge, open_page: OpenPage):
    page = await harness(open_page, presence_bridge.http_url)
    asked = await page.evaluate("""async () => {
        try { await client.presence("lobby.x"); return "resolved"; } catch (e) { return e.message; }
    }""")
    assert "not within PRESENCE_SUBJECTS" in asked
    watched = await page.evaluate("""async () => {
        try { await client.subscribe("room.*", {presence: true}).ready; return "resolved"; }
        catch (e) { return e.message; }
    }""")
    assert "exact subject" in watched


async def test_page_shows_how_many_are_here_and_that_they_are_anonymous(
    presence_bridge, ws_factory, open_page: OpenPage
):
    page = (await open_page(presence_bridge.http_url + "/")).page
    await subscribe_with_button(page, "demo.room lobby.quiet")
    presence = chip(page, "demo.room").locator(".chip-presence")
    await expect(presence).to_have_text("1 here: 1 anonymous")
    others = [await ws_factory(presence_bridge.ws_url) for _ in range(2)]
    for other in others:
        await other.subscribe("demo.room")
    await expect(presence).to_have_text("3 here: 3 anonymous")
    await others[0].close()
    await expect(presence).to_have_text("2 here: 2 anonymous")
    # Where presence is not kept the chip says nothing of it.
    await expect(chip(page, "lobby.quiet").locator(".chip-presence")).to_have_count(0)


async def test_page_names_the_users_who_are_here(bridge_factory, js_server, ws_factory, open_page: OpenPage):
    bridge = await bridge_factory(nats_url=js_server.url, presence_subjects=("demo.>",), jwt_secret=SECRET,
                                  control_subject=unique("ctl"))
    page = (await open_page(bridge.http_url + "/?token=" + hs256(claims("alice")))).page
    await subscribe_with_button(page, "demo.team")
    presence = chip(page, "demo.team").locator(".chip-presence")
    await expect(presence).to_have_text("1 here: alice")
    for user in ("bob", "alice"):
        other = await ws_factory(bridge.ws_url, headers={"Authorization": f"Bearer {hs256(claims(user))}"})
        await other.subscribe("demo.team")
    await expect(presence).to_have_text("3 here: alice, bob")
