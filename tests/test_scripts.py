"""The helper scripts under scripts/ as a person runs them: real processes against a real nats-server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from conftest import ROOT, TIMEOUT, unique


async def test_publish_script_sends_stdin_bytes_exactly_as_they_are(nc, nats_server):
    # Every byte value, bytes that are not UTF-8, and line endings text mode would translate.
    payload = bytes(range(256)) + b"\xff\xfe\x80 not utf-8 \r\n\r last"
    subject = unique("scripts.publish")
    sub = await nc.subscribe(subject)
    await nc.flush()
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "scripts/publish.py", subject, "-"], input=payload, cwd=ROOT,
        capture_output=True, timeout=TIMEOUT, env={**os.environ, "NATS_URL": nats_server.url},
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    msg = await sub.next_msg(timeout=TIMEOUT)
    assert msg.data == payload
    assert done.stdout.decode().strip() == f"published {len(payload)} bytes to {subject}"
