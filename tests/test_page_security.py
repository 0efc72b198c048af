"""The page's own defences, in real Chromium (see chromium.py): its token leaves its address
and goes out as no Referer, and another origin cannot frame it."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import chromium
import pytest
from aiohttp import web
from chromium import TIMEOUT_MS, Browser, OpenPage, expect
from conftest import TIMEOUT, eventually

from bridge.core.frames import CLOSE_GOING_AWAY

browser = chromium.browser
open_page = chromium.open_page

TOKEN = "page-token-t1"


async def test_the_page_drops_its_token_from_the_address_and_reconnects_with_it(
        nats_server: Any, bridge_factory: Any, open_page: OpenPage) -> None:
    bridge = await bridge_factory(nats_url=nats_server.url, auth_tokens=(TOKEN,))
    stream = f"ws://127.0.0.1:{bridge.port}/stream?token={TOKEN}"
    watched = await open_page(f"{bridge.http_url}/?token={TOKEN}#top")
    page = watched.page
    assert page.url == f"{bridge.http_url}/#top"
    assert await page.evaluate("window.location.search") == ""
    assert watched.sockets == [stream]

    # The bridge drops every connection; the page comes back with the token it kept.
    await bridge.manager.close_all(CLOSE_GOING_AWAY, "restarting", timeout=1.0)
    await expect(page.locator("#conn-state")).not_to_have_attribute("data-state", "connected")
    await expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected")
    assert watched.sockets == [stream, stream]
    assert len(bridge.manager.sessions) == 1
    assert page.url == f"{bridge.http_url}/#top"


async def test_the_page_sends_its_token_in_no_referer(nats_server: Any, bridge_factory: Any,
                                                      browser: Browser) -> None:
    """Everything the page fetches (its modules, styles, workers) goes out without a Referer."""
    bridge = await bridge_factory(nats_url=nats_server.url, auth_tokens=(TOKEN,))
    context = await browser.new_context()
    try:
        page = await context.new_page()
        referers: list[tuple[str, str | None]] = []
        pending: list[asyncio.Task[Any]] = []

        async def record(request: Any) -> None:
            referers.append((request.url, (await request.all_headers()).get("referer")))

        page.on("request", lambda request: pending.append(asyncio.ensure_future(record(request))))
        await page.goto(f"{bridge.http_url}/?token={TOKEN}", timeout=TIMEOUT_MS)
        await expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected")
        await asyncio.wait_for(asyncio.gather(*pending), TIMEOUT)
    finally:
        await asyncio.wait_for(context.close(), 30)
    fetched = [url for url, _ in referers]
    assert f"{bridge.http_url}/static/app.js" in fetched and f"{bridge.http_url}/static/style.css" in fetched
    assert [(url, referer) for url, referer in referers if referer] == []


@pytest.fixture
async def other_origin() -> AsyncIterator[Any]:
    """A site on another origin (another port) that serves whatever page a test gives it."""
    pages: dict[str, str] = {}

    async def serve(request: web.Request) -> web.Response:
        if request.path not in pages:
            raise web.HTTPNotFound()
        return web.Response(text=pages[request.path], content_type="text/html")

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    def host(path: str, html: str) -> str:
        pages[path] = html
        return f"http://127.0.0.1:{port}{path}"

    try:
        yield host
    finally:
        await asyncio.wait_for(runner.cleanup(), 30)


async def test_another_origin_cannot_frame_the_page(bridge: Any, other_origin: Any,
                                                    open_page: OpenPage) -> None:
    """Clickjacking: a decoy page on another origin frames the bridge's page; Chromium blocks it."""
    url = other_origin("/decoy", '<!DOCTYPE html><title>decoy</title><link rel="icon" href="data:,">'
                                 f'<iframe src="{bridge.http_url}/"></iframe>')
    refused = re.compile(r"^Framing '.*' violates the following Content Security Policy directive: "
                         r"\"frame-ancestors 'self'\"")
    watched = await open_page(url, connected=False, allow=(refused,))
    await eventually(lambda: any(refused.search(e) for e in watched.errors))
    [framed] = [f for f in watched.page.frames if f != watched.page.main_frame]
    assert not framed.url.startswith(bridge.http_url)  # Chromium shows its error page instead
    assert await framed.locator("#conn-state").count() == 0
    assert bridge.manager.sessions == {}
