"""The example's test feed: its message on test.subject every TEST_PUBLISH_INTERVAL seconds."""

from __future__ import annotations

import json
import random
from typing import Any

from panini import app as panini_app

import panini_workarounds
from config import TEST_SUBJECT


def test_message() -> dict[str, Any]:
    """The example's test message, key3 random."""
    return {
        "key1": "value1",
        "key2": 2,
        "key3": random.random(),
        "key4": [1, 2, 3, 4],
        "key5": {"1": 1, "2": 2, "3": 3, "4": 4, "5": 5},
        "key6": {"subkey1": "1", "subkey2": 2, "3": 3, "4": 4, "5": 5},
        "key7": None,
    }


def register(app: panini_app.App, interval: float) -> None:
    """The feed as a Panini ``@app.task``."""

    @app.task(interval=interval)
    async def publish_periodically_for_test() -> None:
        nc = panini_workarounds.nats_client(app)
        # While NATS is away, skip rather than pile test messages into the
        # reconnect buffer; the stream resumes when the link does.
        if nc is not None and nc.is_connected:
            await nc.publish(TEST_SUBJECT, json.dumps(test_message()).encode())
