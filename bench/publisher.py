"""The publisher process: nats-py, paced or as fast as it can.

Each message is ~100 bytes of JSON: ``{"seq":N,"ts":T,"pad":"xx…"}`` where N counts
up from 0 per subject and T is ``time.monotonic_ns()`` at publish time
(CLOCK_MONOTONIC is system-wide on Linux, so the clients' clocks agree).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import nats

from bench.common import own_cpu, raise_nofile

PAYLOAD_SIZE = 100


@dataclass
class PublishPlan:
    url: str
    subjects: list[str]
    messages: int  # in all, spread round-robin over the subjects
    rate: float | None  # messages per second in all; None = as fast as possible


@dataclass
class PublishResult:
    published: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    error: str | None = None


def payload(seq: int, ts: int) -> bytes:
    head = b'{"seq":%d,"ts":%d,"pad":"' % (seq, ts)
    return head + b"x" * max(0, PAYLOAD_SIZE - len(head) - 2) + b'"}'


async def publish(conn: Connection, plan: PublishPlan) -> PublishResult:
    result = PublishResult()
    nc = await nats.connect(plan.url, name="bench-publisher", connect_timeout=5,
                            allow_reconnect=False, pending_size=64 * 1024 * 1024)
    try:
        conn.send("ready")
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(None, conn.recv) != "go":
            return result
        cpu0 = own_cpu()
        seqs = dict.fromkeys(plan.subjects, 0)
        subjects = plan.subjects
        nsub = len(subjects)
        clock = time.monotonic_ns
        pub = nc.publish
        start = time.monotonic()
        interval = 1.0 / plan.rate if plan.rate else 0.0
        for i in range(plan.messages):
            if interval:
                wait = start + i * interval - time.monotonic()
                if wait > 0.0005:
                    await asyncio.sleep(wait)
            subject = subjects[i % nsub]
            seq = seqs[subject]
            seqs[subject] = seq + 1
            await pub(subject, payload(seq, clock()))
            if not interval and i % 500 == 499:
                # Let nats-py's flusher run now and then during a burst.
                await asyncio.sleep(0)
        await nc.flush(timeout=30)
        result.published = plan.messages
        result.seconds = time.monotonic() - start
        result.cpu_seconds = own_cpu() - cpu0
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)
    return result


def publisher_main(conn: Connection, plan: PublishPlan) -> None:
    """multiprocessing target: connect, say "ready", wait for "go", publish, report."""
    raise_nofile()
    try:
        result = asyncio.run(publish(conn, plan))
    except KeyboardInterrupt:
        return
    except Exception:
        result = PublishResult(error=traceback.format_exc())
    with contextlib.suppress(OSError):
        conn.send(result)
