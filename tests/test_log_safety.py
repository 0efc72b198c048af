"""What the bridge writes to its log, as a real process under attack (logs.py):

- no credential ever appears: a JWT or AUTH_TOKENS token in ``?token=`` (the WebSocket's
  URL, a Referer), the password or token in NATS_URL (on connect, on reconnect, in the
  line that ends a failed start, in a bad setting's line);
- no request can write a line of its own (line breaks, control characters), in text or JSON;
- a request too large to parse is one line, not a traceback.

Each attack runs once against one bridge process (a module fixture); the tests read its output.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import pytest
from conftest import TIMEOUT, BridgeProcess, NatsServer, free_port, spawn_bridge, wait_for_port
from minting import SECRET, claims, hs256

NATS_USER = "bridge-user"
NATS_PASSWORD = f"nats-pw-{uuid.uuid4().hex}"
NATS_TOKEN = f"nats-token-{uuid.uuid4().hex}"
STATIC_TOKEN = f"static-token-{uuid.uuid4().hex}"
CONTROL_TOKEN = f"control-token-{uuid.uuid4().hex}"
USER_JWT = hs256(claims("ada", ttl=600))

# A line of our text format: "2026-12-05 22:52:55,027 INFO logger: message".
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")
FORGED = "1999-01-01 00:00:00,000 INFO handler: connection FORGED opened from 10.0.0.1"
FORGED_PATH = "/clients/x%0a" + FORGED.replace(" ", "%20")
# ESC (ANSI colours, cursor moves), CR, NEL, U+2028 LINE SEPARATOR, U+202E RIGHT-TO-LEFT OVERRIDE.
CONTROL_PATH = "/users/a%1b[31mred%0dcr%c2%85nel%e2%80%a8ls%e2%80%aertl"
RAW_CONTROLS = ["\x1b", "\r", "\x85", "\u2028", "\u202e"]


@dataclass
class Run:
    """One bridge process, attacked; ``output`` is everything it printed."""

    output: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.output.split("\n") if line.strip()]


def get(url: str, method: str = "GET", **headers: str) -> int:
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def send_raw(port: int, data: bytes) -> bytes:
    """Send bytes as they are (no client would send these) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        return sock.recv(4096)


def wait_ready(bp: BridgeProcess, ready: bool = True) -> None:
    """Until /readyz says the NATS link is (or is not) up."""
    deadline = time.monotonic() + 2 * TIMEOUT
    while time.monotonic() < deadline:
        if (get(bp.http_url + "/readyz") == 200) is ready:
            return
        time.sleep(0.1)
    raise TimeoutError(f"/readyz did not become {'ready' if ready else 'not ready'}")


async def open_stream(url: str) -> None:
    """A WebSocket that is let in (its welcome frame arrives), then closed."""
    async with aiohttp.ClientSession() as session:
        ws = await asyncio.wait_for(session.ws_connect(url), TIMEOUT)
        welcome = json.loads((await asyncio.wait_for(ws.receive(), TIMEOUT)).data)
        assert welcome["type"] == "welcome", welcome
        await ws.close()


def attack(bp: BridgeProcess, token: str) -> None:
    """Everything that used to put a secret or a forged line in the log."""
    asyncio.run(open_stream(f"ws://127.0.0.1:{bp.port}/stream?token={token}"))
    assert get(f"{bp.http_url}/static/app.js", Referer=f"{bp.http_url}/?token={token}") == 200
    assert get(f"{bp.http_url}/?TOKEN={token}&x=1") == 200
    # The control API without a control token: refused, and the refusal logs the path.
    assert get(bp.http_url + FORGED_PATH, "POST") == 401
    assert get(bp.http_url + CONTROL_PATH, "DELETE") == 401
    # A header, and a request line (carrying the token), each over aiohttp's 8190 bytes.
    head = send_raw(bp.port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400"), head
    line = f"GET /stream?token={token}&pad={'b' * 9000} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    assert send_raw(bp.port, line).startswith(b"HTTP/1.0 400")


def finish(bp: BridgeProcess) -> tuple[int, str]:
    """Wait for a process that exits by itself; its code and output."""
    output, _ = bp.proc.communicate(timeout=30)
    return bp.proc.returncode, output


def stop(bp: BridgeProcess) -> str:
    code, output = bp.stop(signal.SIGTERM)
    assert code == 0, output
    return output


@pytest.fixture(scope="module")
def text_run() -> Iterator[Run]:
    """JWT on, NATS with a user and password, text logs; NATS restarted once (a reconnect)."""
    nats = NatsServer(extra_args=["--user", NATS_USER, "--pass", NATS_PASSWORD]).start()
    bp = spawn_bridge(env={
        "NATS_URL": f"nats://{NATS_USER}:{NATS_PASSWORD}@127.0.0.1:{nats.port}",
        "JWT_SECRET": SECRET, "CONTROL_TOKENS": CONTROL_TOKEN, "NATS_RECONNECT_WAIT": "0.2",
        "TEST_PUBLISH_INTERVAL": "0", "LOG_LEVEL": "INFO",
    })
    try:
        wait_for_port(bp.port, timeout=30, proc=bp.proc)
        wait_ready(bp)
        attack(bp, USER_JWT)
        nats.stop()
        wait_ready(bp, False)
        nats.start()
        wait_ready(bp)
        yield Run(stop(bp))
    finally:
        bp.stop(signal.SIGKILL, timeout=10)
        nats.stop()


@pytest.fixture(scope="module")
def json_run() -> Iterator[Run]:
    """AUTH_TOKENS on, NATS with a token in its URL, JSON logs."""
    nats = NatsServer(extra_args=["--auth", NATS_TOKEN]).start()
    bp = spawn_bridge(env={
        "NATS_URL": f"nats://{NATS_TOKEN}@127.0.0.1:{nats.port}", "AUTH_TOKENS": STATIC_TOKEN,
        "CONTROL_TOKENS": CONTROL_TOKEN, "TEST_PUBLISH_INTERVAL": "0", "LOG_FORMAT": "json",
    })
    try:
        wait_for_port(bp.port, timeout=30, proc=bp.proc)
        wait_ready(bp)
        attack(bp, STATIC_TOKEN)
        yield Run(stop(bp))
    finally:
        bp.stop(signal.SIGKILL, timeout=10)
        nats.stop()


# ---------------------------------------------------------------------------
# Credentials
# ---------------------------------------------------------------------------


def test_a_jwt_in_the_url_or_referer_never_reaches_the_log(text_run):
    assert "[redacted]" in text_run.output  # the lines that carried it were written
    assert USER_JWT not in text_run.output
    assert USER_JWT.split(".")[2] not in text_run.output  # not even its signature


def test_an_auth_token_in_the_url_or_referer_never_reaches_the_log(json_run):
    assert "[redacted]" in json_run.output
    assert STATIC_TOKEN not in json_run.output


def test_the_nats_password_never_reaches_the_log_on_connect_or_reconnect(text_run):
    assert any("connected to NATS at" in line for line in text_run.lines), text_run.output
    assert any("NATS connection restored" in line for line in text_run.lines), text_run.output
    assert NATS_PASSWORD not in text_run.output


def test_the_token_in_nats_url_never_reaches_the_log(json_run):
    assert any("connected to NATS at" in json.loads(line)["message"] for line in json_run.lines)
    assert NATS_TOKEN not in json_run.output


def test_the_nats_password_never_reaches_the_failed_start_line():
    bp = spawn_bridge(env={"NATS_URL": f"nats://{NATS_USER}:{NATS_PASSWORD}@127.0.0.1:{free_port()}",
                           "NATS_CONNECT_TIMEOUT": "1", "NATS_RECONNECT_WAIT": "0.3"})
    code, output = finish(bp)
    assert code == 1, output
    assert f"cannot reach NATS at nats://{NATS_USER}:***@127.0.0.1" in output
    assert NATS_PASSWORD not in output


def test_the_nats_password_never_reaches_a_bad_setting_line():
    bp = spawn_bridge(env={"NATS_URL": f"nats://{NATS_USER}:{NATS_PASSWORD}@127.0.0.1:4222,"
                                       f"http://{NATS_USER}:{NATS_PASSWORD}@127.0.0.1:80"})
    code, output = finish(bp)
    assert code == 2, output
    assert "NATS_URL=" in output
    assert NATS_PASSWORD not in output


# ---------------------------------------------------------------------------
# Log injection
# ---------------------------------------------------------------------------


def test_a_line_break_in_a_path_cannot_forge_a_text_log_line(text_run):
    assert "\\n" + FORGED in text_run.output  # logged, escaped, on the refusal's own line
    assert not any(line.startswith(FORGED[:10]) for line in text_run.lines)


def test_every_text_log_line_is_one_of_ours(text_run):
    """Each line starts with our time and level, or belongs to a traceback (none here)."""
    assert [line for line in text_run.lines if not TEXT_LINE.match(line)] == []


def test_control_characters_from_a_request_are_escaped_in_text_logs(text_run):
    assert "\\x1b[31mred\\rcr\\x85nel\\u2028ls\\u202ertl" in text_run.output
    assert [c for c in RAW_CONTROLS if c in text_run.output] == []


def test_json_logs_stay_one_object_per_line_under_injection(json_run):
    # str.splitlines breaks at \x85, \u2028 and more, as some shippers do.
    entries = [json.loads(line) for line in json_run.output.splitlines() if line.strip()]
    messages = [e["message"] for e in entries]
    assert any(FORGED in m and "\n" + FORGED in m for m in messages)  # the path, exactly as it came
    assert any("\u2028ls\u202ertl" in m for m in messages)
    assert [c for c in RAW_CONTROLS if c in json_run.output] == []


# ---------------------------------------------------------------------------
# Requests too large to parse
# ---------------------------------------------------------------------------


def test_an_oversized_request_is_one_log_line_not_a_traceback(text_run):
    bad = [line for line in text_run.lines if "bad request from 127.0.0.1: 400 LineTooLong" in line]
    assert len(bad) == 2, text_run.output  # the header, the request line
    assert all(" INFO aiohttp.server: " in line for line in bad)
    assert "Traceback" not in text_run.output
    assert " ERROR " not in text_run.output
