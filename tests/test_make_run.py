"""`make run` as a person runs it: what it prints, and every hint it prints (subscribe, publish, token)
really works with the settings it runs with."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
import yarl
from conftest import ROOT, TIMEOUT, free_port
from minting import SECRET


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


async def test_make_run_lets_the_page_call_the_demo_service(make_run, ws_factory):
    await asyncio.to_thread(read_until, make_run, r"Request button may call the demo service")
    client = await ws_factory(f"http://127.0.0.1:{make_run['port']}/stream")
    for _ in range(150):  # the service may still be starting
        reply = await client.request({"action": "request", "subject": "svc.echo", "data": {"hi": 1}})
        if reply.get("error") != "no_responders":
            break
        await asyncio.sleep(0.2)
    assert (reply["success"], reply["data"]) == (True, {"data": {"hi": 1}, "headers": {}}), reply


async def test_make_run_stops_cleanly_on_ctrl_c(make_run):
    await asyncio.to_thread(read_until, make_run, r"Open http://")
    proc = make_run["proc"]
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = await asyncio.to_thread(proc.communicate, timeout=15)
    output = "".join(make_run["lines"]) + rest
    assert "Traceback" not in output, output
    assert any(line.endswith("bridge: stopped") for line in output.splitlines()), output
    assert not [p for p in service_processes() if p], "the demo service outlived make run"


def service_processes() -> list[str]:
    """Command lines of the demo services running from this repository."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(ROOT / "services" / "demo_service.py") in command:
                found.append(command)
    return found


# ---------------------------------------------------------------------------
# The hints follow the configuration: every one is tried on a bridge with those settings
# ---------------------------------------------------------------------------


def load_dev_run() -> Any:
    spec = importlib.util.spec_from_file_location("dev_run", ROOT / "scripts" / "dev_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dev_run = load_dev_run()

HINT_CONFIGS = {
    # id: (ARGS, env) as `make run` would get them
    "defaults": ([], {}),
    # README's worked example, with an audience the minted token must carry.
    "jwt-per-user": ([], {"JWT_SECRET": SECRET, "SUBJECT_ALLOW": "user.{sub}.>,public.>",
                          "PUBLISH_ALLOW": "user.{sub}.>", "JWT_AUDIENCE": "bridge"}),
    "auth-tokens-orders-only": (["--publish-allow", ""], {"AUTH_TOKENS": "dev-token-1,dev-token-2",
                                                           "SUBJECT_ALLOW": "orders.*"}),
    "demo-denied": (["--subject-deny", "demo.>"], {"TEST_PUBLISH_INTERVAL": "0"}),
}


@dataclass
class Hinted:
    lines: list[str]
    client: Any
    nats_url: str
    bridge: Any = None
    query: str = ""  # "?token=..." when the page needs a token

    def find(self, pattern: str) -> re.Match[str] | None:
        return next((m for m in map(re.compile(pattern).search, self.lines) if m), None)


async def follow_hints(key: str, nats_server: Any, bridge_factory: Any, ws_factory: Any) -> Hinted:
    """`make run`'s hints for one configuration, and a page opened as they say on a bridge with it."""
    args, env = HINT_CONFIGS[key]
    config, _ = dev_run.effective_config(args, env)
    lines = dev_run.hints(config, "http://localhost:5001/", sys.executable)
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    settings.update(nats_url=nats_server.url, http_host="127.0.0.1", http_port=0, create_stream="",
                    test_publish_interval=0, nats_connect_timeout=10,
                    service_name=f"bridge_hints_{os.getpid()}_{time.monotonic_ns()}")
    bridge = await bridge_factory(**settings)
    hinted = Hinted(lines, None, nats_server.url)
    opened = hinted.find(r"Open (http://\S+?)(\?token=TOKEN)?[ ;,]")
    assert opened, lines
    query = ""
    if config.jwt_enabled or config.auth_tokens:
        # Without the token the page is refused: the hint must say how to open it.
        assert opened.group(2), lines
        mint = hinted.find(r"mint one .*?: (.+)$")
        if config.jwt_enabled:
            assert mint, lines
            done = await asyncio.to_thread(subprocess.run, shlex.split(mint.group(1)), cwd=ROOT,
                                           capture_output=True, text=True, timeout=TIMEOUT,
                                           env={**os.environ, "JWT_SECRET": config.jwt_secret})
            assert done.returncode == 0, done.stderr
            query = "?token=" + done.stdout.strip()
        else:
            assert hinted.find(r"AUTH_TOKENS"), lines
            query = "?token=" + config.auth_tokens[0]
    else:
        assert not opened.group(2), lines
    hinted.client = await ws_factory(f"{bridge.ws_url}{query}")
    hinted.bridge, hinted.query = bridge, query
    return hinted


@pytest.mark.parametrize("key", HINT_CONFIGS)
async def test_make_run_hint_subscribe_example_is_accepted(key, nats_server, bridge_factory, ws_factory):
    hinted = await follow_hints(key, nats_server, bridge_factory, ws_factory)
    example = hinted.find(r"and send (\{.*\})$")
    assert example, hinted.lines
    reply = await hinted.client.request(json.loads(example.group(1)))
    assert reply["success"], (hinted.lines, reply)


@pytest.mark.parametrize("key", HINT_CONFIGS)
async def test_make_run_hint_publish_command_reaches_the_page(key, nats_server, bridge_factory, ws_factory):
    hinted = await follow_hints(key, nats_server, bridge_factory, ws_factory)
    hint = hinted.find(r"subscribe to (\S+) to see it\): (.+)$")
    assert hint, hinted.lines
    await hinted.client.subscribe(hint.group(1))
    command = shlex.split(hint.group(2))
    done = await asyncio.to_thread(subprocess.run, command, cwd=ROOT, capture_output=True, text=True,
                                   timeout=TIMEOUT, env={**os.environ, "NATS_URL": hinted.nats_url})
    assert done.returncode == 0, done.stderr
    frame = await hinted.client.receive_message()
    assert frame["subject"] == command[2]


@pytest.mark.parametrize("key", HINT_CONFIGS)
async def test_make_run_hint_on_page_publishing_is_true(key, nats_server, bridge_factory, ws_factory):
    hinted = await follow_hints(key, nats_server, bridge_factory, ws_factory)
    allowed = hinted.find(r"Publish box may publish to (\S+)")
    off = hinted.find(r"publishing from the page is off")
    assert bool(allowed) != bool(off), hinted.lines
    subject = allowed.group(1) if allowed else "demo.hello"
    reply = await hinted.client.request({"action": "publish", "subject": subject, "data": "hi"})
    assert reply["success"] is bool(allowed), (hinted.lines, reply)


@pytest.mark.parametrize("key", HINT_CONFIGS)
async def test_make_run_hint_curl_line_streams_the_subjects_messages(key, nats_server, bridge_factory,
                                                                     ws_factory, nc):
    hinted = await follow_hints(key, nats_server, bridge_factory, ws_factory)
    hint = hinted.find(r"as Server-Sent Events: (curl -N .+)$")
    assert hint, hinted.lines
    command = shlex.split(hint.group(1))
    assert command[:2] == ["curl", "-N"] and len(command) == 3, command
    # The URL exactly as curl sends it (curl does not re-encode), on this test's bridge, with its token.
    target = command[2].replace("http://localhost:5001", hinted.bridge.http_url)
    target = target.replace("token=TOKEN", hinted.query.removeprefix("?"))
    pattern = unquote(target.split("subject=")[1].split("&")[0])
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession() as session, session.get(yarl.URL(target, encoded=True),
                                                               timeout=timeout) as resp:
        assert (resp.status, resp.headers["Content-Type"]) == (200, "text/event-stream"), await resp.text()
        await asyncio.wait_for(resp.content.readuntil(b"\n\n"), TIMEOUT)  # retry: and the welcome
        subject = dev_run._concrete(pattern)
        await nc.publish(subject, b'{"from": "curl"}')
        await nc.flush()
        event = (await asyncio.wait_for(resp.content.readuntil(b"\n\n"), TIMEOUT)).decode()
    assert event.startswith("data: ") and json.loads(event[6:])["subject"] == subject, event


def test_make_run_keeps_presence_on_demo_unless_presence_subjects_says_otherwise():
    assert dev_run.effective_config([], {})[0].presence_subjects == ("demo.>",)
    assert dev_run.effective_config([], {"PRESENCE_SUBJECTS": ""})[0].presence_subjects == ()


@pytest.mark.parametrize("key", HINT_CONFIGS)
async def test_make_run_hint_on_calling_the_demo_service_is_true(key, nats_server, bridge_factory, ws_factory,
                                                                 nc):
    async def echo(msg: Any) -> None:
        await msg.respond(b'"answered"')

    await nc.subscribe("svc.echo", cb=echo)
    await nc.flush(timeout=TIMEOUT)
    hinted = await follow_hints(key, nats_server, bridge_factory, ws_factory)
    may = hinted.find(r"Request button may call the demo service on (\S+)")
    may_not = hinted.find(r"may not call the demo service")
    assert bool(may) != bool(may_not), hinted.lines
    reply = await hinted.client.request({"action": "request", "subject": "svc.echo", "data": "hi"})
    assert reply["success"] is bool(may), (hinted.lines, reply)


def test_make_run_hints_say_when_nothing_can_be_followed():
    config, _ = dev_run.effective_config([], {"SUBJECT_ALLOW": "user.{sub}.>"})
    lines = dev_run.hints(config, "http://localhost:5001/", "python")
    assert any("no subject can be followed" in line and "JWT" in line for line in lines), lines
    assert not any("send {" in line or "publish.py" in line for line in lines), lines
