"""Helpers for the page tests: locating rows and chips, publishing until a row shows."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from chromium import TIMEOUT_MS, Locator, Page, expect


def rows(page: Page, subject: str, text: str | None = None) -> Locator:
    found = page.locator(f'#messages > li.msg[data-subject="{subject}"]')
    return found.filter(has_text=text) if text is not None else found


def chip(page: Page, subject: str) -> Locator:
    return page.locator(f'#subscriptions > li.chip[data-subject="{subject}"]')


async def publish_until_seen(nc: Any, row: Locator, subject: str, payload: bytes, **kw: Any) -> None:
    """Publish until the row shows: the bridge's SUB may still be on its way to nats-server."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT_MS / 1000
    while True:
        await nc.publish(subject, payload, **kw)
        await nc.flush(timeout=5)
        try:
            await expect(row.first).to_be_visible(timeout=400)
            return
        except AssertionError:
            if loop.time() > deadline:
                raise


async def publish(nc: Any, subject: str, payload: bytes, **kw: Any) -> None:
    await nc.publish(subject, payload, **kw)
    await nc.flush(timeout=5)


async def subscribe_with_button(page: Page, subjects: str) -> None:
    await page.get_by_label("Subject", exact=True).fill(subjects)
    await page.get_by_role("button", name="Subscribe", exact=True).click()
    for subject in subjects.split():
        await expect(chip(page, subject)).to_have_attribute("data-state", "subscribed")


async def welcomed(page: Page) -> None:
    """The welcome frame has arrived (the connection id comes with it)."""
    await expect(page.locator("#connection-id")).not_to_have_text(re.compile(r"^(—|)$"))


def server_subjects(bridge: Any) -> list[set[str]]:
    return [set(client.subscriptions) for client in bridge.manager.sessions.values()]
