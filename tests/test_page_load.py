"""The page under real traffic, in real Chromium: a burst of 50,000 messages, one 1 MB
message, and Pause/Resume with more than the list holds.

The burst and the 1 MB message measure the page's main thread with a PerformanceObserver
for "longtask" entries (tasks over 50 ms), installed before the page's own scripts.  The
bound on the longest task is the one timing assertion these tests make.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import chromium
from chromium import OpenPage, expect
from conftest import NatsServer
from page_support import publish, publish_until_seen, rows, subscribe_with_button

browser = chromium.browser
open_page = chromium.open_page

logger = logging.getLogger(__name__)

LONG_TASKS = """
window.__longTasks = [];
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) window.__longTasks.push(Math.round(entry.duration));
}).observe({type: "longtask", buffered: true});
"""


def sensor(i: int) -> bytes:
    """About 150 bytes of JSON."""
    head = (f'{{"seq": {i}, "sensor": "kitchen-temperature-01", "value": 21.4375, "unit": "celsius", '
            '"ts": "2026-11-21T18:20:00.123456Z", "ok": true, "pad": "')
    return (head + "x" * max(0, 150 - len(head) - 2) + '"}').encode()


async def test_a_burst_of_50000_messages_never_blocks_the_page_for_more_than_100_ms(
    nats_server: NatsServer, bridge_factory: Any, nc: Any, open_page: OpenPage
) -> None:
    """Every message counted, the connection kept, the list ends with the newest; the bridge's
    queue is raised past the burst so that what is measured is the page."""
    bridge = await bridge_factory(nats_url=nats_server.url, client_queue_messages=100_000,
                                  client_queue_bytes=64 * 1024 * 1024)
    watched = await open_page(bridge.http_url + "/", init_script=LONG_TASKS)
    page = watched.page
    await subscribe_with_button(page, "burst.>")
    await publish_until_seen(nc, rows(page, "burst.warmup"), "burst.warmup", b"{}")
    warmup = int((await page.locator("#counts").text_content() or "").split(" shown · ")[1].split()[0])
    await page.evaluate("window.__longTasks = []")

    started = time.monotonic()
    for i in range(50_000):
        await nc.publish("burst.sensor", sensor(i))
    await nc.flush(timeout=30)
    published = time.monotonic() - started

    total = 50_000 + warmup
    received = re.compile(f"{total // 1000},?{total % 1000:03d} received")
    await expect(page.locator("#counts")).to_contain_text(received, timeout=60_000)
    # The list catching up with the newest rows once the burst is over is measured too.
    await expect(rows(page, "burst.sensor").first).to_contain_text('"seq": 49999', timeout=20_000)
    await expect(page.locator("#messages > li")).to_have_count(500)
    long_tasks = await page.evaluate("window.__longTasks")
    # The margin, for whoever watches it over time (pytest -o log_cli=true).
    logger.info("burst: long tasks %s ms; published in %.2f s", long_tasks, published)
    assert max(long_tasks, default=0) <= 100, (
        f"long tasks (ms) {long_tasks}; 50,000 messages published in {published:.2f} s")
    await expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected")
    assert len(watched.sockets) == 1  # never reconnected
    await expect(page.locator("#counts")).to_have_text(
        f"500 shown · {total:,} received · the newest 500 are kept")


def large_document(size: int) -> tuple[bytes, int]:
    """A JSON document of about ``size`` bytes and the lines it has laid out for reading:
    each item fits on a line, so it is ``{``, ``"items": [``, the items, ``]``, ``}``."""
    items = []
    length = 14
    while length < size - 80:
        item = f'{{"id": {len(items)}, "v": "item-{len(items)}", "n": 12345678901234567890}}'
        items.append(item)
        length += len(item) + 2
    return ('{"items": [' + ", ".join(items) + "]}").encode(), len(items) + 4


async def test_a_1_mb_message_arrives_folded_with_its_true_line_count_and_no_task_over_200_ms(
    bridge: Any, nc: Any, open_page: OpenPage
) -> None:
    page = (await open_page(bridge.http_url + "/", init_script=LONG_TASKS)).page
    await subscribe_with_button(page, "large.>")
    await publish_until_seen(nc, rows(page, "large.warmup"), "large.warmup", b"{}")
    payload, lines = large_document(1_000_000)
    assert 990_000 < len(payload) <= 1_000_000
    await page.evaluate("window.__longTasks = []")

    await publish(nc, "large.doc", payload)
    row = rows(page, "large.doc")
    summary = row.locator("details summary")
    await expect(summary).to_contain_text(re.compile(f"{lines // 1000},?{lines % 1000:03d} lines"))
    pre = row.locator("details pre")
    await expect(pre).to_be_hidden()
    await summary.click()
    await expect(pre).to_be_visible()
    # Exactly as published, laid out one item a line.
    first = '{"id": 0, "v": "item-0", "n": 12345678901234567890}'
    await expect(pre).to_contain_text('{\n  "items": [\n    ' + first + ",\n")
    long_tasks = await page.evaluate("window.__longTasks")
    logger.info("1 MB message: long tasks %s ms", long_tasks)
    assert max(long_tasks, default=0) <= 200, f"long tasks (ms) {long_tasks}"

    await expect(summary).to_contain_text(f"{lines:,} lines · 976.5 KB")
    # A chunk at a time: a megabyte of text in the page at once would freeze it.
    await row.get_by_role("button", name="Show more").click()
    await expect(pre).to_contain_text('"v": "item-1200"')


async def test_pause_note_button_and_counts_agree_with_what_resume_shows(
    bridge: Any, nc: Any, open_page: OpenPage
) -> None:
    page = (await open_page(bridge.http_url + "/")).page
    await subscribe_with_button(page, "hold.>")
    await publish_until_seen(nc, rows(page, "hold.first"), "hold.first", b"first")
    pause = page.locator("#pause")
    note = page.locator("#paused-note")
    counts = page.locator("#counts")

    # More than the list keeps: counted while paused, and the note says which Resume shows.
    await pause.click()
    for i in range(800):
        await nc.publish("hold.many", f"many-{i}".encode())
    await nc.flush(timeout=5)
    await expect(counts).to_have_text("1 shown · 801 received")
    await expect(note).to_have_text(
        "Paused: 800 new messages; Resume shows the newest 500 (the list keeps 500); "
        "all are counted in “received”.")
    await expect(pause).to_have_text("Resume (500)")
    await expect(rows(page, "hold.many")).to_have_count(0)

    await page.get_by_role("button", name="Resume (500)").click()
    await expect(note).to_be_hidden()
    await expect(pause).to_have_text("Pause")
    await expect(rows(page, "hold.many")).to_have_count(500)
    listed = page.locator("#messages > li")
    await expect(listed.first.locator("pre")).to_have_text("many-799")
    await expect(listed.last.locator("pre")).to_have_text("many-300")
    await expect(counts).to_have_text("500 shown · 801 received · the newest 500 are kept")

    # A few: Resume shows all of them.
    await pause.click()
    await expect(note).to_have_text("Paused: new messages are counted and kept until you resume.")
    for i in range(2):
        await nc.publish("hold.few", f"few-{i}".encode())
    await nc.flush(timeout=5)
    await expect(note).to_have_text("Paused: 2 new messages; Resume shows all of them.")
    await expect(pause).to_have_text("Resume (2)")
    await expect(counts).to_have_text("500 shown · 803 received · the newest 500 are kept")
    await pause.click()
    await expect(rows(page, "hold.few")).to_have_count(2)
    await expect(listed.first.locator("pre")).to_have_text("few-1")
