"""A plain EventSource in real Chromium: loss-free across a bridge restart, with no code of its own.

The page is a document of the bridge's own origin (``/healthz``: EventSource there is
same-origin, which the bridge's CSP, ``connect-src 'self'``, allows); all it does is
``new EventSource(url)`` and note what ``onmessage`` gets.  The bridge is a real process,
stopped and started again on the same port; the stream is JetStream's, so the id EventSource
sends back as Last-Event-ID is all the bridge needs to resume.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from typing import Any

import chromium
import nats
import pytest
from chromium import TIMEOUT_MS, OpenPage, wait_listening
from conftest import NatsServer, free_port

browser = chromium.browser
open_page = chromium.open_page

pytestmark = pytest.mark.slow

# The document has no favicon (EventSource's refused reconnects, while the bridge is down, log nothing).
NO_FAVICON = re.compile(r"^Failed to load resource: the server responded with a status of 404")

# The page's whole program: an EventSource and a note of what it gets (the test reads the notes).
PLAIN_PAGE = """(url) => {
  window.got = [];
  window.notes = [];
  window.events = new EventSource(url);
  events.onmessage = (e) => got.push(JSON.parse(e.data).data.n);
  events.addEventListener("recovered", (e) => notes.push(JSON.parse(e.data)));
}"""


async def test_a_plain_event_source_gets_every_message_once_across_a_bridge_restart(
        js_server: NatsServer, bridge_process: Any, open_page: OpenPage) -> None:
    nc = await asyncio.wait_for(nats.connect(js_server.url), 10)
    try:
        js = nc.jetstream()
        base = f"page{os.getpid()}x{time.monotonic_ns()}"
        subject = f"{base}.feed"
        await js.add_stream(name=base.upper(), subjects=[f"{base}.>"])
        port = free_port()
        env = {"HTTP_PORT": str(port), "NATS_URL": js_server.url, "TEST_PUBLISH_INTERVAL": "0",
               "LOG_LEVEL": "WARNING"}

        async def start_bridge() -> Any:
            bp = bridge_process(env=env, wait=False)
            await wait_listening(port, bp.proc)
            return bp

        async def publish(n: int) -> None:
            await js.publish(subject, b'{"n": %d}' % n)

        async def got(count: int) -> list[int]:
            await page.wait_for_function("(n) => got.length >= n", arg=count, timeout=30_000)
            return await page.evaluate("got")

        bridge = await start_bridge()
        watched = await open_page(f"http://127.0.0.1:{port}/healthz", connected=False, allow=(NO_FAVICON,))
        page = watched.page
        await page.evaluate(PLAIN_PAGE, f"/events?subject={subject}")
        await page.wait_for_function("() => events.readyState === EventSource.OPEN", timeout=TIMEOUT_MS)
        await publish(0)
        assert await got(1) == [0]

        await asyncio.to_thread(bridge.stop)  # SIGTERM: the stream ends with close 1001
        for n in range(1, 6):
            await publish(n)  # published while nothing serves the page
        await start_bridge()
        assert await got(6) == [0, 1, 2, 3, 4, 5]
        await publish(6)
        assert await got(7) == [0, 1, 2, 3, 4, 5, 6]
        await asyncio.sleep(0.3)
        assert await page.evaluate("got") == [0, 1, 2, 3, 4, 5, 6]  # nothing twice
        notes = await page.evaluate("notes")
        assert [(note["recovered"], note["streams"][subject]["history"]) for note in notes] == [(True, 5)]
    finally:
        await nc.close()
