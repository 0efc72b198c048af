"""A demo NATS microservice, written the Panini way: what a browser calls through the bridge.

    python services/demo_service.py      # NATS_URL (comma-separated), default nats://127.0.0.1:4222

It answers two subjects with Panini's ``@app.listen`` (a handler's return value
is the answer, published to the request's reply subject):

- ``svc.echo``: what it got, ``{"data": <the request's payload>, "headers": {...}}``
  (a payload that is not JSON comes back as a string, with ``"encoding"``
  ``"text"`` or, for bytes, ``"base64"``);
- ``svc.time``: the time, ``{"time": "2026-11-21T18:43:50.101Z", "unix": 1795286630.101}``.

Why the echo's headers travel in the body: Panini publishes a handler's return
value with no headers, and a handler that answered by itself would be answered
twice (once more by Panini).

Every instance is in the queue group ``demo_service`` (Panini's
``allocation_queue_group``), so with several running (two bridges, compose
``--scale``) NATS hands each request to one of them: answered once.

Why not ``svc.`` under ``demo.>``: ``make run``'s stream DEMO stores ``demo.>``,
and JetStream answers every publish it stores that has a reply subject (its
acknowledgement), so a request there would be answered by JetStream, racing
the service, and stored.

The bridge is not needed to run this, nor this to run the bridge: it is any
NATS service.  ``make run`` and both compose files start it; the bridge lets
browsers call it where ``PUBLISH_ALLOW`` says so.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import signal
import sys
from typing import Any

from panini import app as panini_app

ECHO = "svc.echo"
TIME = "svc.time"
QUEUE_GROUP = "demo_service"

logger = logging.getLogger("demo_service")


def echoed(payload: bytes, headers: dict[str, str] | None) -> dict[str, Any]:
    """What svc.echo answers: the payload as JSON when it is JSON, else as text or base64."""
    answer: dict[str, Any]
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        answer = {"data": base64.b64encode(payload).decode("ascii"), "encoding": "base64"}
    else:
        try:
            answer = {"data": json.loads(text)}
        except ValueError:
            answer = {"data": text, "encoding": "text"}
    answer["headers"] = dict(headers or {})
    return answer


def now() -> dict[str, Any]:
    at = dt.datetime.now(dt.UTC)
    return {"time": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "unix": at.timestamp()}


async def nats_error(exc: Exception) -> None:
    logger.warning("NATS: %s", exc or type(exc).__name__)


async def nats_disconnected() -> None:
    logger.warning("NATS connection lost; reconnecting")


async def nats_reconnected() -> None:
    logger.info("NATS connection restored")


def make_app(servers: list[str]) -> panini_app.App:
    app = panini_app.App(
        service_name="demo_service",
        servers=servers,
        allocation_queue_group=QUEUE_GROUP,
        # Ride out NATS restarts rather than give up (Panini's default is 60 attempts).
        reconnect=True,
        max_reconnect_attempts=-1,
        # Panini's own logger writes files under logs/ in the working directory.
        custom_logger=logger,
        # Passed on to nats-py: a line each, rather than its default traceback per attempt.
        error_cb=nats_error,
        disconnected_cb=nats_disconnected,
        reconnected_cb=nats_reconnected,
    )

    # data_type=bytes: the payload as it came (Panini's default, dict, refuses what is not a JSON object).
    @app.listen(ECHO, data_type=bytes)
    async def echo(msg: Any) -> bytes:
        return json.dumps(echoed(msg.data, msg.headers)).encode()

    @app.listen(TIME, data_type=bytes)
    async def time(msg: Any) -> bytes:
        return json.dumps(now()).encode()

    return app


def stop() -> None:
    raise SystemExit(0)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    urls = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    servers = [url.strip() for url in urls.split(",") if url.strip()]
    app = make_app(servers)
    # A container's stop (SIGTERM) and Ctrl-C end the process at once, quietly, with exit code 0:
    # through the loop Panini runs (its wakeup wakes it), not a plain handler, which would wait
    # for the loop's next turn.
    for sig in (signal.SIGTERM, signal.SIGINT):
        app.loop.add_signal_handler(sig, stop)
    logger.info("answering %s and %s (queue group %s) on %s", ECHO, TIME, QUEUE_GROUP, ", ".join(servers))
    app.start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
