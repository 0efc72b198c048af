"""Publish one message to NATS, to watch it arrive in the page.

    .venv/bin/python scripts/publish.py demo.hello '{"text": "hello"}'
    echo 'plain text' | .venv/bin/python scripts/publish.py demo.log -
    .venv/bin/python scripts/publish.py demo.blob - < picture.png

DATA is sent as given (JSON or any text); `-` reads standard input and sends
its bytes exactly as they are (binary too: no decoding, no newline changes);
without DATA a small JSON greeting is sent.  NATS_URL (default nats://127.0.0.1:4222)
says where.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import nats


async def publish(url: str, subject: str, payload: bytes) -> None:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        await nc.publish(subject, payload)
        await nc.flush(timeout=5)
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/publish.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("subject", help="a concrete subject, e.g. demo.hello")
    parser.add_argument("data", nargs="?", help="the payload; '-' reads standard input, bytes as they are")
    parser.add_argument("--nats-url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    args = parser.parse_args(argv)
    if args.data is None:
        data = json.dumps({"text": "hello from scripts/publish.py", "at": time.strftime("%H:%M:%S")}).encode()
    elif args.data == "-":
        # The raw bytes: text-mode stdin would decode them (a traceback on bytes that are not
        # UTF-8) and translate line endings, so a binary payload would never arrive intact.
        data = sys.stdin.buffer.read()
    else:
        # The argument's own bytes (os.fsencode undoes the surrogateescape decoding of argv).
        data = os.fsencode(args.data)
    try:
        asyncio.run(publish(args.nats_url, args.subject, data))
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        print(f"publish.py: error: cannot publish to {args.nats_url}: {exc or type(exc).__name__}",
              file=sys.stderr)
        return 1
    print(f"published {len(data)} bytes to {args.subject}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
