"""Real Chromium for the page and client-library tests, through Playwright.

Debian's Chromium only (`apt-get install -y chromium`), never a downloaded browser.
Without it the importing module is skipped with one line, unless REQUIRE_BROWSER=1 (CI),
where that is a failure.  Every page opened through ``open_page`` is watched: a console
error, a page error or a dialog fails the test that opened it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio

__all__ = [
    "TIMEOUT_MS", "WS_REFUSED", "Browser", "Locator", "OpenPage", "Page", "Watched", "browser", "expect",
    "open_page", "wait_listening",
]

CHROMIUM = shutil.which("chromium")


def _unavailable(reason: str) -> None:
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (REQUIRE_BROWSER=1 makes this a failure)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


try:
    from playwright.async_api import Browser, Locator, Page, async_playwright, expect
except ImportError:
    _unavailable("playwright is not installed: pip install -r requirements-dev.txt")
if CHROMIUM is None:
    _unavailable("no chromium on PATH: apt-get install -y chromium")

LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 10_000
# Chromium logs a refused WebSocket handshake as a console error, and so the client's HTTP
# question that follows it (what the bridge answers: bridge-client.js "refused"); only the
# tests where that is the point (the bridge restarting, a page without its token) allow them.
WS_REFUSED = re.compile(r"^(WebSocket connection to '.*' failed"
                        r"|Failed to load resource: (net::ERR_CONNECTION_REFUSED"
                        r"|the server responded with a status of (401|403|429|503)\b))")

expect.set_options(timeout=TIMEOUT_MS)


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@dataclass
class Watched:
    """A page and everything it did that a test may want to check."""

    page: Page
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    frames_received: int = 0
    allowed: list[re.Pattern[str]] = field(default_factory=list)

    def problems(self) -> list[str]:
        unexpected = [e for e in self.errors if not any(p.search(e) for p in self.allowed)]
        return unexpected + [f"dialog: {d}" for d in self.dialogs]


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS, timeout=30_000
        )
        try:
            yield launched
        finally:
            await asyncio.wait_for(launched.close(), 30)


OpenPage = Callable[..., Awaitable[Watched]]


@pytest_asyncio.fixture
async def open_page(browser: Browser) -> AsyncIterator[OpenPage]:
    """Open a URL in a fresh context and wait until the page says it is connected
    (unless ``connected=False``: a page the bridge is expected to refuse)."""
    opened: list[Watched] = []

    async def open_(url: str, width: int = 1100, height: int = 800, allow: tuple[re.Pattern[str], ...] = (),
                    connected: bool = True, init_script: str | None = None) -> Watched:
        context = await browser.new_context(viewport={"width": width, "height": height})
        page = await context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        watched = Watched(page=page, allowed=list(allow))
        opened.append(watched)

        def on_console(msg: Any) -> None:
            if msg.type == "error":
                watched.errors.append(msg.text)

        async def on_dialog(dialog: Any) -> None:
            watched.dialogs.append(f"{dialog.type}: {dialog.message}")
            await dialog.dismiss()

        page.on("console", on_console)
        page.on("pageerror", lambda exc: watched.errors.append(f"page error: {exc}"))
        page.on("dialog", on_dialog)
        def on_websocket(ws: Any) -> None:
            watched.sockets.append(ws.url)

            def on_frame(_payload: Any) -> None:
                watched.frames_received += 1

            ws.on("framereceived", on_frame)

        page.on("websocket", on_websocket)
        page.on("request", lambda req: watched.requests.append(req.url))
        if init_script is not None:
            await page.add_init_script(init_script)  # runs before the page's own scripts
        await page.goto(url, timeout=TIMEOUT_MS)
        if connected:
            await expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected")
        return watched

    yield open_
    for watched in opened:
        await asyncio.wait_for(watched.page.context.close(), 30)
    problems = [p for watched in opened for p in watched.problems()]
    assert not problems, f"the page logged errors or opened dialogs: {problems}"


async def wait_listening(port: int, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"bridge exited with {proc.returncode}:\n{out}")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
        except (OSError, TimeoutError):
            if loop.time() > deadline:
                raise TimeoutError(f"nothing listening on {port} after {timeout} s") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
