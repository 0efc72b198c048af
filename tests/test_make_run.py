"""`make run` as a person runs it: what it prints, and the publish command it suggests really works."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ROOT, TIMEOUT, free_port


@pytest.fixture
def make_run(nats_server) -> Iterator[dict[str, Any]]:
    """`make -s run` on a free port beside the session's nats-server; its lines as they come."""
    port = free_port()
    env = {**os.environ, "NATS_URL": nats_server.url, "HTTP_PORT": str(port), "TEST_PUBLISH_INTERVAL": "0"}
    proc = subprocess.Popen(["make", "-s", "run"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    run = {"proc": proc, "port": port, "lines": lines}
    try:
        yield run
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def read_until(run: dict[str, Any], pattern: str, timeout: float = 60) -> re.Match[str]:
    """Read `make run`'s output until a line matches ``pattern``."""
    proc, lines = run["proc"], run["lines"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            pytest.fail("make run ended early:\n" + "".join(lines))
        lines.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    pytest.fail(f"no line matching {pattern!r} within {timeout} s:\n" + "".join(lines))


async def test_make_run_prints_the_url_to_open(make_run):
    match = await asyncio.to_thread(read_until, make_run, r"Open (http://\S+)")
    assert match.group(1) == f"http://localhost:{make_run['port']}/"


async def test_make_run_prints_a_publish_command_that_delivers_to_the_page(make_run, ws_factory, nats_server):
    match = await asyncio.to_thread(read_until, make_run, r"publish a message of your own \(.*?\): (.+)$")
    command = shlex.split(match.group(1))
    assert command[1:3] == ["scripts/publish.py", "demo.hello"], command
    client = await ws_factory(f"http://127.0.0.1:{make_run['port']}/stream")
    await client.subscribe("demo.>")
    done = await asyncio.to_thread(subprocess.run, command, cwd=ROOT, capture_output=True, text=True,
                                   timeout=TIMEOUT, env={**os.environ, "NATS_URL": nats_server.url})
    assert done.returncode == 0, done.stderr
    frame = await client.receive_message()
    assert (frame["subject"], frame["data"]) == ("demo.hello", {"text": "hello"})


async def test_make_run_lets_the_page_publish_under_demo(make_run, ws_factory):
    await asyncio.to_thread(read_until, make_run, r"Open http://")
    client = await ws_factory(f"http://127.0.0.1:{make_run['port']}/stream")
    assert client.welcome["publish"] is True
    await client.subscribe("demo.page")
    reply = await client.request({"action": "publish", "subject": "demo.page", "data": "hi"})
    assert reply["success"], reply
    assert (await client.receive_message())["data"] == "hi"


async def test_make_run_stops_cleanly_on_ctrl_c(make_run):
    await asyncio.to_thread(read_until, make_run, r"Open http://")
    proc = make_run["proc"]
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = await asyncio.to_thread(proc.communicate, timeout=15)
    output = "".join(make_run["lines"]) + rest
    assert "Traceback" not in output, output
    assert any(line.endswith("bridge: stopped") for line in output.splitlines()), output
