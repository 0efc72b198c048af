"""main.py as a real process: --help, start-up failures, the test publisher, signals, no log files."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import (
    ROOT,
    TIMEOUT,
    BridgeProcess,
    NatsServer,
    close_of,
    free_port,
    spawn_bridge,
    wait_for_port,
)

import main
from bridge.config import Config
from bridge.process import nats_link

# The four names other tools rely on, plus the rest of the core's settings.
CORE_SETTINGS = [
    "NATS_URL",
    "HTTP_HOST",
    "HTTP_PORT",
    "TEST_PUBLISH_INTERVAL",
    "NATS_CONNECT_TIMEOUT",
    "NATS_RECONNECT_WAIT",
    "CLIENT_QUEUE_MESSAGES",
    "CLIENT_QUEUE_BYTES",
    "MAX_SUBJECT_LENGTH",
    "SERVICE_NAME",
    "LOG_LEVEL",
]


def every_setting_env_var() -> list[str]:
    """The core's settings and whatever else Config declares today."""
    declared = [f.metadata["env"] for f in dataclasses.fields(Config) if "env" in f.metadata]
    return sorted(set(CORE_SETTINGS) | set(declared))


def finish(bp: BridgeProcess, timeout: float = 30) -> tuple[int, str]:
    """Wait for a process that exits on its own; its return code and output."""
    out, _ = bp.proc.communicate(timeout=timeout)
    return bp.proc.returncode, out


def lines_of(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# Runs that end on their own, started together so they overlap
# ---------------------------------------------------------------------------

BAD_SETTINGS = {
    # id: (args, env, the setting the error line must name)
    "port-not-a-number": ((), {"HTTP_PORT": "abc"}, "HTTP_PORT"),
    "port-out-of-range": ((), {"HTTP_PORT": "70000"}, "HTTP_PORT"),
    "nats-url-scheme": ((), {"NATS_URL": "http://127.0.0.1:4222"}, "NATS_URL"),
    "negative-interval": ((), {"TEST_PUBLISH_INTERVAL": "-1"}, "TEST_PUBLISH_INTERVAL"),
    "timeout-not-a-number": ((), {"NATS_CONNECT_TIMEOUT": "soon"}, "NATS_CONNECT_TIMEOUT"),
    "flag-port-not-a-number": (("--http-port", "abc"), {}, "http-port"),
    # Only the built-in protected patterns, each spelled exactly, can be unprotected.
    "unprotect-not-a-built-in": ((), {"DANGEROUSLY_UNPROTECT_SUBJECTS": "internal.>"},
                                 "DANGEROUSLY_UNPROTECT_SUBJECTS"),
    # Not a name at all: getaddrinfo's IDNA step would fail with a traceback.
    "host-empty-label": ((), {"HTTP_HOST": "bridge..example"}, "HTTP_HOST"),
}


@pytest.fixture(scope="module")
def finished_runs() -> Iterator[dict[str, tuple[int, str]]]:
    """main.py runs that exit by themselves: --help, NATS unreachable, each bad setting."""
    runs = {
        "help": spawn_bridge("--help"),
        # Nothing listens on a just-freed port: connection refused on every attempt.
        "unreachable": spawn_bridge(env={
            "NATS_URL": f"nats://127.0.0.1:{free_port()}",
            "NATS_CONNECT_TIMEOUT": "2",
            "NATS_RECONNECT_WAIT": "0.5",
        }),
    }
    for key, (args, env, _) in BAD_SETTINGS.items():
        runs[key] = spawn_bridge(*args, env=env)
    try:
        yield {key: finish(bp) for key, bp in runs.items()}
    finally:
        for bp in runs.values():
            bp.stop(signal.SIGKILL, timeout=10)


# --help


def test_help_exits_0(finished_runs):
    returncode, _ = finished_runs["help"]
    assert returncode == 0


@pytest.mark.parametrize("env_var", every_setting_env_var())
def test_help_lists_setting_env_var(finished_runs, env_var):
    _, output = finished_runs["help"]
    assert env_var in output


# The sections of Config (its comments), in its order; a few settings each must be under.
HELP_SECTIONS = {
    "options": ["--help"],
    "NATS": ["--nats-url", "--nats-connect-timeout"],
    "HTTP": ["--http-host", "--http-port"],
    "who may connect": ["--allowed-origins", "--auth-tokens", "--jwt-secret", "--max-connections"],
    "what they may do": ["--subject-allow", "--publish-allow", "--control-rate"],
    "history (JetStream)": ["--max-history", "--create-stream"],
    "slow clients": ["--client-queue-messages", "--ping-interval"],
    "beyond one process": ["--workers", "--control-subject"],
    "presence": ["--presence-subjects", "--presence-ttl", "--presence-max"],
    "logs": ["--log-level", "--log-format"],
}


def help_sections(output: str) -> dict[str, str]:
    """--help's sections: each heading (a line `title:`) and the text under it."""
    sections: dict[str, str] = {}
    title = None
    for line in output.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            title = line[:-1]
            sections[title] = ""
        elif title is not None:
            sections[title] += line + "\n"
    return sections


def test_help_shows_the_settings_in_sections_in_order(finished_runs):
    _, output = finished_runs["help"]
    assert list(help_sections(output)) == list(HELP_SECTIONS), output


@pytest.mark.parametrize("section", HELP_SECTIONS)
def test_help_section_lists_its_settings(finished_runs, section):
    _, output = finished_runs["help"]
    flags = re.findall(r"^  (--[a-z-]+|-h, --help)", help_sections(output)[section], re.M)
    for expected in HELP_SECTIONS[section]:
        assert any(expected in f for f in flags), (section, flags)


def test_help_lists_every_setting_under_its_declared_section(finished_runs):
    _, output = finished_runs["help"]
    sections = help_sections(output)
    for f in dataclasses.fields(main.Config):
        flag = "--" + f.name.replace("_", "-")
        assert re.search(rf"^  {flag} ", sections[f.metadata["group"]], re.M), (flag, f.metadata["group"])


@pytest.mark.parametrize(
    ("env_var", "default"),
    [
        ("NATS_URL", "nats://127.0.0.1:4222"),
        ("HTTP_HOST", "0.0.0.0"),
        ("HTTP_PORT", "5001"),
        ("TEST_PUBLISH_INTERVAL", "1"),
    ],
)
def test_help_gives_fixed_settings_default(finished_runs, env_var, default):
    _, output = finished_runs["help"]
    flag = "--" + env_var.lower().replace("_", "-")
    # The option's own entry: from its line in the options list to the next option.
    entry = output[output.index(f"\n  {flag}"):]
    entry = entry[: entry.find("\n  --", 1) if "\n  --" in entry[1:] else None]
    match = re.search(r"default:?\s+(\S+)", entry)
    assert match, entry
    shown = match.group(1).rstrip(").,")
    assert shown == default or (default.isdigit() and float(shown) == float(default)), entry


# NATS unreachable at start


def test_unreachable_nats_exits_nonzero(finished_runs):
    returncode, _ = finished_runs["unreachable"]
    assert returncode != 0


def test_unreachable_nats_ends_with_one_clear_line(finished_runs):
    _, output = finished_runs["unreachable"]
    matching = [line for line in lines_of(output) if "cannot reach NATS" in line]
    assert len(matching) == 1, output
    assert lines_of(output)[-1] == matching[0], output


def test_unreachable_nats_prints_no_traceback(finished_runs):
    _, output = finished_runs["unreachable"]
    assert "Traceback" not in output, output


def test_unreachable_nats_logs_each_attempt(finished_runs):
    _, output = finished_runs["unreachable"]
    attempts = [
        line for line in lines_of(output) if "attempt" in line.lower() and "cannot reach" not in line
    ]
    assert len(attempts) >= 2, output


# A bad setting


@pytest.mark.parametrize("key", BAD_SETTINGS)
def test_bad_setting_exits_2(finished_runs, key):
    returncode, output = finished_runs[key]
    assert returncode == 2, output


@pytest.mark.parametrize("key", BAD_SETTINGS)
def test_bad_setting_prints_one_line_naming_it_without_traceback(finished_runs, key):
    _, output = finished_runs[key]
    name = BAD_SETTINGS[key][2]
    assert len(lines_of(output)) == 1, output
    assert "Traceback" not in output
    assert name.lower().replace("_", "-") in output.lower().replace("_", "-")


# ---------------------------------------------------------------------------
# With a NATS server
# ---------------------------------------------------------------------------


async def test_test_publisher_delivers_the_examples_message(bridge_process, nats_server, ws_factory):
    bp = bridge_process(env={"NATS_URL": nats_server.url, "TEST_PUBLISH_INTERVAL": "0.2"})
    client = await ws_factory(f"{bp.http_url}/stream")
    await client.subscribe("test.subject")
    frame = await client.receive_message()
    assert frame["subject"] == "test.subject"
    data = frame["data"]
    assert isinstance(data.pop("key3"), float)
    assert data == {
        "key1": "value1",
        "key2": 2,
        "key4": [1, 2, 3, 4],
        "key5": {"1": 1, "2": 2, "3": 3, "4": 4, "5": 5},
        "key6": {"subkey1": "1", "subkey2": 2, "3": 3, "4": 4, "5": 5},
        "key7": None,
    }


async def test_test_publisher_varies_key3(bridge_process, nats_server, ws_factory):
    bp = bridge_process(env={"NATS_URL": nats_server.url, "TEST_PUBLISH_INTERVAL": "0.1"})
    client = await ws_factory(f"{bp.http_url}/stream")
    await client.subscribe("test.subject")
    values = {(await client.receive_message())["data"]["key3"] for _ in range(3)}
    assert len(values) == 3


async def test_test_publisher_interval_0_publishes_nothing(bridge_process, nats_server, ws_factory):
    bp = bridge_process(env={"NATS_URL": nats_server.url, "TEST_PUBLISH_INTERVAL": "0"})
    client = await ws_factory(f"{bp.http_url}/stream")
    await client.subscribe("test.subject")
    # Five times the interval the other tests use.
    await client.assert_silent(1.0)


async def start_with_client(bridge_process, nats_server, ws_factory):
    bp = bridge_process(env={"NATS_URL": nats_server.url, "TEST_PUBLISH_INTERVAL": "0"})
    client = await ws_factory(f"{bp.http_url}/stream")
    await client.subscribe("proc.signals")
    return bp, client


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
async def test_signal_closes_websocket_clients_with_1001(bridge_process, nats_server, ws_factory, sig):
    bp, client = await start_with_client(bridge_process, nats_server, ws_factory)
    bp.proc.send_signal(sig)
    msg = await asyncio.wait_for(client.ws.receive(), TIMEOUT)
    assert msg.type is aiohttp.WSMsgType.CLOSE, msg
    assert msg.data == 1001


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
async def test_signal_exits_0(bridge_process, nats_server, ws_factory, sig):
    bp, _ = await start_with_client(bridge_process, nats_server, ws_factory)
    returncode, output = await asyncio.to_thread(bp.stop, sig)
    assert returncode == 0, output
    assert "Traceback" not in output, output


def files_under(path: Path) -> set[Path]:
    return set(path.rglob("*")) if path.exists() else set()


async def test_no_logs_directory_is_created(bridge_process, nats_server, ws_factory):
    logs = ROOT / "logs"
    existed, before = logs.exists(), files_under(logs)
    bp, _ = await start_with_client(bridge_process, nats_server, ws_factory)
    await asyncio.to_thread(bp.stop, signal.SIGTERM)
    if existed:
        assert files_under(logs) == before, "the bridge wrote under logs/"
    else:
        assert not logs.exists(), "the bridge created logs/"


# ---------------------------------------------------------------------------
# Start-up checks that must not wait for NATS
# ---------------------------------------------------------------------------


def test_bad_port_says_what_is_expected():
    returncode, output = finish(spawn_bridge("--http-port", "abc"))
    assert returncode == 2
    assert lines_of(output) == ["main.py: error: --http-port='abc': expected an integer port 1-65535"]


def test_taken_port_exits_within_2_s_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # NATS is unreachable too: a bridge that waited for it would take 30 s.
        env = {"NATS_URL": f"nats://127.0.0.1:{free_port()}", "NATS_CONNECT_TIMEOUT": "30"}
        started = time.monotonic()
        bp = spawn_bridge(env={**env, "HTTP_PORT": str(port)}, port=port)
        returncode, output = finish(bp, timeout=10)
        elapsed = time.monotonic() - started
    assert returncode == 1, output
    assert elapsed < 2, f"took {elapsed:.1f} s"
    assert lines_of(output) == [f"main.py: error: cannot serve on 127.0.0.1:{port}: Address already in use"]


def test_unresolvable_http_host_says_so_in_one_line():
    env = {"HTTP_HOST": "no-such-host.invalid", "NATS_URL": f"nats://127.0.0.1:{free_port()}"}
    returncode, output = finish(spawn_bridge(env=env), timeout=20)
    lines = lines_of(output)
    assert len(lines) == 1 and "Traceback" not in output, output
    assert lines[0].startswith("main.py: error: HTTP_HOST='no-such-host.invalid': "
                               "cannot resolve host 'no-such-host.invalid': "), output
    # A name that does not exist is a bad setting (2); only a resolver that could not be
    # asked (no DNS server reachable where the suite runs) is a runtime failure (1).
    assert returncode == (1 if "Temporary failure" in lines[0] else 2), output


# ---------------------------------------------------------------------------
# NATS_URL pointing at something that is not NATS
# ---------------------------------------------------------------------------


@asynccontextmanager
async def tcp_server(greeting: bytes | None) -> AsyncIterator[int]:
    """A TCP server on a free port that sends ``greeting`` on connect (None: says nothing, ever)."""
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if greeting is not None:
            writer.write(greeting)
        with contextlib.suppress(OSError):
            await reader.read()  # until the peer leaves
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@asynccontextmanager
async def http_server() -> AsyncIterator[int]:
    runner = web.AppRunner(web.Application())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def run_against(nats_url: str, timeout: str) -> tuple[int, str]:
    bp = spawn_bridge(env={"NATS_URL": nats_url, "NATS_CONNECT_TIMEOUT": timeout,
                           "NATS_RECONNECT_WAIT": "0.5"})
    try:
        return await asyncio.to_thread(finish, bp, 30)
    finally:
        bp.stop(signal.SIGKILL, timeout=10)


def error_lines(output: str) -> list[str]:
    return [line for line in lines_of(output) if line.startswith("main.py: error:")]


async def test_nats_url_at_an_http_server_stops_the_start_naming_what_answered():
    # NATS_CONNECT_TIMEOUT far beyond finish's 30 s: a bridge that waited it out fails the test.
    async with http_server() as port:
        returncode, output = await run_against(f"nats://127.0.0.1:{port}", "300")
    assert returncode == 1, output
    assert error_lines(output) == [lines_of(output)[-1]], output
    assert lines_of(output)[-1].startswith(
        f"main.py: error: NATS_URL=nats://127.0.0.1:{port}: not a NATS server: it answered 'HTTP/1."), output
    assert "Traceback" not in output, output


async def test_nats_url_at_a_server_with_another_greeting_stops_the_start_quoting_it_escaped():
    async with tcp_server(b"SSH-2.0-OpenSSH_9.6\x1b[2J\r\n") as port:
        returncode, output = await run_against(f"nats://127.0.0.1:{port}", "300")
    assert returncode == 1, output
    assert lines_of(output)[-1] == (f"main.py: error: NATS_URL=nats://127.0.0.1:{port}: not a NATS server: "
                                    "it answered 'SSH-2.0-OpenSSH_9.6\\x1b[2J' (set NATS_URL / --nats-url)")
    assert "\x1b" not in output, output  # what a server sends never drives the terminal


async def test_nats_url_at_a_silent_port_warns_each_attempt_with_a_reason():
    async with tcp_server(None) as port:
        returncode, output = await run_against(f"nats://127.0.0.1:{port}", "3")
    attempts = [line for line in lines_of(output) if "not reachable (attempt" in line]
    assert attempts, output
    assert all("no NATS greeting (INFO)" in line for line in attempts), output
    assert returncode == 1 and "cannot reach NATS" in lines_of(output)[-1], output


async def test_a_non_nats_server_beside_a_nats_server_in_nats_url_is_no_reason_to_stop(nats_server):
    # Checked on the probe itself: in a whole start the connect to the real server usually
    # wins the race and the probe's verdict is never asked for.
    async with tcp_server(b"SSH-2.0-OpenSSH_9.6\r\n") as port:
        other = f"nats://127.0.0.1:{port}"
        alone = await asyncio.wait_for(nats_link.not_nats([other]), TIMEOUT)
        beside = await asyncio.wait_for(nats_link.not_nats([other, nats_server.url]), TIMEOUT)
    assert alone == "not a NATS server: it answered 'SSH-2.0-OpenSSH_9.6'"
    assert beside is None


# ---------------------------------------------------------------------------
# Shutdown ends promptly whatever NATS is doing
# ---------------------------------------------------------------------------

# When NATS is killed, in seconds relative to SIGTERM: well before ("down": the
# bridge is already reconnecting), just before (the bridge has not noticed yet),
# and after, throughout the shutdown and its NATS drain.
NATS_KILLED_AT = [-0.5] * 3 + [-0.02, -0.01, -0.005, -0.003, -0.001, 0.0, 0.0, 0.0, 0.001, 0.002, 0.003,
                               0.005, 0.01, 0.02, 0.05, 0.2, 1.0]


@pytest.mark.parametrize("killed_at", NATS_KILLED_AT,
                         ids=[f"{i}:{t:+g}s" for i, t in enumerate(NATS_KILLED_AT)])
@pytest.mark.slow
async def test_sigterm_exits_0_within_3_s_whatever_nats_does(ws_factory, killed_at):
    server = NatsServer().start()
    bp = spawn_bridge(env={"NATS_URL": server.url, "TEST_PUBLISH_INTERVAL": "0.05",
                           "NATS_RECONNECT_WAIT": "0.2"})
    try:
        await asyncio.to_thread(wait_for_port, bp.port, 30, bp.proc)
        client = await ws_factory(f"{bp.http_url}/stream")
        await client.subscribe("test.subject", "proc.shutdown.>")
        assert server.proc is not None
        if killed_at < 0:
            server.proc.kill()
            await asyncio.sleep(-killed_at)
        started = time.monotonic()
        bp.proc.send_signal(signal.SIGTERM)
        if killed_at >= 0:
            await asyncio.sleep(killed_at)
            server.proc.kill()
        close, _ = await close_of(client)
        returncode, output = await asyncio.to_thread(finish, bp, 10)
        elapsed = time.monotonic() - started
    finally:
        bp.stop(signal.SIGKILL, timeout=10)
        server.stop()
    assert returncode == 0, output
    assert elapsed < 3, f"took {elapsed:.1f} s\n{output}"
    assert close == 1001, output
    assert "Traceback" not in output and "cannot serve" not in output, output
