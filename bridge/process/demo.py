"""The demo: the example's test feed on test.subject, and the stream history comes from.

- ``TEST_PUBLISH_INTERVAL``: the example's message on ``test.subject`` every
  so many seconds, as a Panini ``@app.task``;
- ``CREATE_STREAM``: a JetStream stream made at start if it does not exist
  (``make run`` and the compose demos: ``DEMO`` on ``test.subject,demo.>``),
  so history works out of the box; an existing stream is never replaced.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from panini import app as panini_app

from bridge import panini_workarounds
from bridge.config import CONFIG, TEST_SUBJECT
from bridge.jetstream.api import JetStream, JetStreamError

logger = logging.getLogger(__name__)


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


async def demo_stream(web_app: web.Application, jetstream: JetStream) -> AsyncIterator[None]:
    """aiohttp cleanup context: CREATE_STREAM's stream, made if it does not exist."""
    config = web_app[CONFIG]
    name, _, subjects = config.create_stream.partition(":")
    try:
        created = await jetstream.ensure_stream(
            name, subjects.split(","), config.create_stream_max_msgs, config.create_stream_max_age)
        logger.info("stream %s %s for %s", name, "created" if created else "already exists", subjects)
    except JetStreamError as exc:
        logger.warning("CREATE_STREAM: could not create stream %s: %s", name, exc)
    yield
