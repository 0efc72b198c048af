"""WORKERS=2: a real `python main.py` whose two worker processes share one port.

Which worker serves a connection is read from its welcome frame (``worker``);
the workers' process ids from the supervisor's /proc children.  Clients are
real WebSockets, NATS is the session's real nats-server.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import (
    TIMEOUT,
    BridgeProcess,
    NatsServer,
    eventually,
    free_port,
    metric_samples,
    publish,
    spawn_bridge,
    unique,
)
from minting import SECRET, claims, hs256

from bridge import config
from bridge.process import workers

CONTROL = "backend-control-secret"
CLIENTS = 40
# The supervisor waits this long before restarting a worker that died (workers.RESTART_DELAYS[0]),
# then the worker needs a moment to start: the bound for "comes back" (liveness, not speed).
COMES_BACK_WITHIN = 20.0
# "Within a few seconds": each worker's own stop is bounded at about 3 s, and they stop together.
STOPS_WITHIN = 5.0


def env_for(nats_server: NatsServer, **extra: str) -> dict[str, str]:
    return {"NATS_URL": nats_server.url, "WORKERS": "2", "TEST_PUBLISH_INTERVAL": "0",
            "JWT_SECRET": SECRET, "CONTROL_TOKENS": CONTROL, "SUBJECT_ALLOW": "user.{sub}.>,public.>",
            "CONTROL_SUBJECT": unique("ctl"), **extra}


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def ready(bp: BridgeProcess) -> bool:
    return http_get(bp.http_url + "/readyz")[0] == 200


def wait_ready(bp: BridgeProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready(bp):
        if bp.proc.poll() is not None:
            raise AssertionError(f"exited with {bp.proc.returncode}:\n{bp.proc.communicate()[0]}")
        assert time.monotonic() < deadline, "the workers did not all become ready"
        time.sleep(0.05)


def start(nats_server: NatsServer, **extra: str) -> BridgeProcess:
    bp = spawn_bridge(env=env_for(nats_server, **extra))
    try:
        wait_ready(bp)
    except BaseException:
        bp.stop(signal.SIGKILL, timeout=10)
        raise
    return bp


def worker_pids(bp: BridgeProcess) -> set[int]:
    children = Path(f"/proc/{bp.proc.pid}/task/{bp.proc.pid}/children").read_text().split()
    return {int(pid) for pid in children}


@pytest.fixture(scope="module")
def shared(nats_server: NatsServer) -> Iterator[BridgeProcess]:
    """One WORKERS=2 bridge for the tests that do not stop or kill anything."""
    bp = start(nats_server)
    yield bp
    bp.stop(signal.SIGTERM, timeout=20)


@pytest.fixture
def own(nats_server: NatsServer) -> Iterator[BridgeProcess]:
    """A WORKERS=2 bridge this test may signal."""
    bp = start(nats_server)
    yield bp
    bp.stop(signal.SIGKILL, timeout=10)


async def connect(ws_factory: Any, bp: BridgeProcess, sub: str = "alice") -> Any:
    return await ws_factory(bp.http_url.replace("http", "ws", 1) + "/stream",
                            headers={"Authorization": f"Bearer {hs256(claims(sub))}"})


async def spread(ws_factory: Any, bp: BridgeProcess, n: int = CLIENTS, sub: str = "alice") -> list[Any]:
    return [await connect(ws_factory, bp, sub) for _ in range(n)]


async def control(bp: BridgeProcess, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.request(
        method, bp.http_url + path, json=body, headers={"Authorization": f"Bearer {CONTROL}"},
        timeout=aiohttp.ClientTimeout(total=TIMEOUT),
    ) as resp:
        return resp.status, await resp.json()


async def scrape(bp: BridgeProcess) -> dict[str, float]:
    status, text = await asyncio.to_thread(http_get, bp.http_url + "/metrics")
    assert status == 200, text
    return metric_samples(text)


async def close_code(client: Any) -> int:
    while True:
        msg = await asyncio.wait_for(client.ws.receive(), TIMEOUT)
        if msg.type is aiohttp.WSMsgType.CLOSE:
            return int(msg.data)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg


# ---------------------------------------------------------------------------
# Sharing the port
# ---------------------------------------------------------------------------


async def test_forty_connections_land_on_both_workers(shared, ws_factory):
    clients = await spread(ws_factory, shared)
    assert {c.welcome["worker"] for c in clients} == {1, 2}


async def test_control_api_reaches_a_connection_on_each_worker(shared, ws_factory, nc):
    clients = await spread(ws_factory, shared, 20, sub=unique("u").replace(".", "-"))
    one_each = {c.welcome["worker"]: c for c in clients}
    assert set(one_each) == {1, 2}
    subject = f"public.{unique().replace('.', '-')}"
    for client in one_each.values():
        status, answer = await control(shared, "POST", f"/clients/{client.connection_id}",
                                       {"subjects": [subject]})
        assert (status, answer["connections"]) == (200, 1), answer
    await publish(nc, subject, {"n": 1})
    for client in one_each.values():
        assert (await client.receive_message())["subject"] == subject


async def test_delete_user_closes_the_users_connections_on_both_workers(shared, ws_factory):
    sub = unique("u").replace(".", "-")
    clients = await spread(ws_factory, shared, 20, sub=sub)
    assert {c.welcome["worker"] for c in clients} == {1, 2}
    status, answer = await control(shared, "DELETE", f"/users/{sub}")
    assert (status, answer["connections"], answer["instances"]) == (200, 20, 2), answer
    assert [await close_code(c) for c in clients] == [4003] * 20


async def test_metrics_report_the_sum_over_both_workers(shared, ws_factory):
    sub = unique("u").replace(".", "-")
    clients = await spread(ws_factory, shared, sub=sub)
    per_worker = [sum(1 for c in clients if c.welcome["worker"] == w) for w in (1, 2)]
    assert all(0 < n < CLIENTS for n in per_worker), per_worker
    # Each scrape lands on one worker or the other; every one must say the host's total.
    for _ in range(6):
        samples = await eventually(scrape_when(shared, lambda s: s["bridge_connections"] == CLIENTS))
        assert samples["bridge_workers"] == 2 and samples["bridge_workers_reporting"] == 2
        assert samples["bridge_nats_connected"] == 2


def scrape_when(bp: BridgeProcess, condition: Any) -> Any:
    """For ``eventually``: a scrape (taken in a thread) once ``condition`` holds."""
    def check() -> Any:
        status, text = http_get(bp.http_url + "/metrics")
        assert status == 200, text
        samples = {name: float(value) for name, value in
                   (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}
        return samples if condition(samples) else None
    return check


async def test_readyz_says_every_worker_is_ready(shared):
    status, body = await asyncio.to_thread(http_get, shared.http_url + "/readyz")
    assert (status, json.loads(body)["workers"]) == (200, {"count": 2, "ready": 2})


# ---------------------------------------------------------------------------
# Stopping, dying, starting
# ---------------------------------------------------------------------------


async def test_sigterm_closes_every_client_with_1001_and_exits_0(own, ws_factory):
    clients = await spread(ws_factory, own, 10)
    assert {c.welcome["worker"] for c in clients} == {1, 2}
    started = time.monotonic()
    own.proc.send_signal(signal.SIGTERM)
    codes = [await close_code(c) for c in clients]
    code, output = await asyncio.to_thread(own.stop, signal.SIGTERM, 20)
    assert codes == [1001] * 10
    assert code == 0, output
    assert time.monotonic() - started < STOPS_WITHIN, output
    assert "Traceback" not in output, output


def exited(pids: set[int]) -> bool:
    """Every one of ``pids`` is gone (or a zombie waiting for init to reap it)."""
    def alive(pid: int) -> bool:
        try:
            return "zombie" not in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False
    return not any(alive(pid) for pid in pids)


@pytest.mark.parametrize("after", [0.05, 0.2, 0.5, 0.8])
async def test_a_second_sigterm_while_stopping_still_exits_0(nats_server, after):
    # Orchestrators and impatient people send a second one; it must not make a clean stop a kill.
    bp = await asyncio.to_thread(start, nats_server)
    try:
        bp.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(after)
        if bp.proc.poll() is None:
            bp.proc.send_signal(signal.SIGTERM)
        code, output = await asyncio.to_thread(bp.stop, signal.SIGTERM, 20)
    finally:
        bp.stop(signal.SIGKILL, timeout=10)
    assert code == 0, output


async def test_sigterm_leaves_no_worker_behind(own):
    workers = worker_pids(own)
    await asyncio.to_thread(own.stop, signal.SIGTERM, 20)
    assert exited(workers)


async def test_each_workers_log_lines_name_it(own, ws_factory):
    await spread(ws_factory, own, 10)
    _, output = await asyncio.to_thread(own.stop, signal.SIGTERM, 20)
    assert " w1 handler: connection" in output and " w2 handler: connection" in output, output


async def test_a_killed_worker_is_restarted_and_serves_again(own, ws_factory):
    before = worker_pids(own)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    await eventually(lambda: len(worker_pids(own) - before) == 1 and len(worker_pids(own)) == 2,
                     timeout=COMES_BACK_WITHIN)
    await eventually(lambda: ready(own), timeout=COMES_BACK_WITHIN)
    clients = await spread(ws_factory, own, 20)
    assert {c.welcome["worker"] for c in clients} == {1, 2}
    _, output = await asyncio.to_thread(own.stop, signal.SIGTERM, 20)
    assert f"(pid {victim}) was killed by SIGKILL" in output and "restarting it in" in output, output


async def test_readyz_is_503_while_a_worker_is_down(own):
    os.kill(min(worker_pids(own)), signal.SIGKILL)
    await eventually(lambda: http_get(own.http_url + "/readyz")[0] == 503, timeout=COMES_BACK_WITHIN)
    await eventually(lambda: ready(own), timeout=COMES_BACK_WITHIN)


async def test_workers_die_with_a_killed_supervisor(own):
    workers = worker_pids(own)
    own.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(own.proc.wait, TIMEOUT)
    # Each worker gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and stops as usual.
    await eventually(lambda: exited(workers), timeout=COMES_BACK_WITHIN)


def test_worker_that_cannot_reach_nats_stops_the_start_with_exit_1():
    bp = spawn_bridge(env={"WORKERS": "2", "NATS_URL": f"nats://127.0.0.1:{free_port()}",
                           "NATS_CONNECT_TIMEOUT": "1", "NATS_RECONNECT_WAIT": "0.2"})
    out, _ = bp.proc.communicate(timeout=30)
    assert bp.proc.returncode == 1, out
    assert "cannot reach NATS" in out and "Traceback" not in out, out


def test_port_held_by_another_reuseport_socket_is_not_shared():
    # Another process (say, a second bridge) holding the port with SO_REUSEPORT would
    # silently get half the connections if we only bound with SO_REUSEPORT ourselves.
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        bp = spawn_bridge(env={"WORKERS": "2", "NATS_URL": f"nats://127.0.0.1:{free_port()}"}, port=port)
        out, _ = bp.proc.communicate(timeout=30)
    assert bp.proc.returncode == 1, out
    assert out.strip() == f"main.py: error: cannot serve on 127.0.0.1:{port}: Address already in use"


# ---------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------


def test_listen_binds_one_port_once_per_worker_with_so_reuseport():
    sockets = workers.listen("127.0.0.1", 0, 3)
    try:
        assert len({s.getsockname()[1] for s in sockets}) == 1
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in sockets)
    finally:
        for s in sockets:
            s.close()


def test_workers_auto_is_the_number_of_cores_this_process_may_use():
    assert config.load_config([], {"WORKERS": "auto"}).workers == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_workers_setting_is_a_config_error(value):
    with pytest.raises(config.ConfigError):
        config.load_config([], {"WORKERS": value})


async def test_a_single_process_is_worker_1(bridge, ws_factory):
    client = await ws_factory(bridge.ws_url)
    assert client.welcome["worker"] == 1


# ---------------------------------------------------------------------------
# Run directories left by a killed supervisor
# ---------------------------------------------------------------------------


def rundirs(tmpdir: Path) -> set[Path]:
    return set(tmpdir.glob(workers.RUNDIR_PREFIX + "*"))


def rundir_of(bp: BridgeProcess, tmpdir: Path) -> Path:
    """The run directory of ``bp``'s supervisor, by the pid it wrote there."""
    (found,) = [d for d in rundirs(tmpdir) if (d / workers.PID_FILE).read_text().strip() == str(bp.proc.pid)]
    return found


async def test_a_killed_supervisors_run_directory_is_removed_by_the_next_supervisor(nats_server, tmp_path):
    killed = await asyncio.to_thread(start, nats_server, TMPDIR=str(tmp_path))
    left = rundir_of(killed, tmp_path)
    pids = worker_pids(killed)
    await asyncio.to_thread(killed.stop, signal.SIGKILL, 20)
    await eventually(lambda: exited(pids), timeout=COMES_BACK_WITHIN)  # PR_SET_PDEATHSIG
    assert left.is_dir(), "SIGKILL skips the supervisor's own clean-up: the directory stays"
    nxt = await asyncio.to_thread(start, nats_server, TMPDIR=str(tmp_path))
    try:
        assert rundirs(tmp_path) == {rundir_of(nxt, tmp_path)}
    finally:
        nxt.stop(signal.SIGTERM, timeout=20)


async def test_a_live_supervisors_run_directory_is_kept_by_the_next_supervisor(nats_server, tmp_path):
    live = await asyncio.to_thread(start, nats_server, TMPDIR=str(tmp_path))
    try:
        kept = rundir_of(live, tmp_path)
        nxt = await asyncio.to_thread(start, nats_server, TMPDIR=str(tmp_path))
        nxt.stop(signal.SIGTERM, timeout=20)
        assert kept.is_dir()
        # Its workers still find each other there: every one of them counts as ready.
        status, body = await asyncio.to_thread(http_get, live.http_url + "/readyz")
        assert (status, json.loads(body)["workers"]) == (200, {"count": 2, "ready": 2})
    finally:
        live.stop(signal.SIGTERM, timeout=20)


def stale_rundir(tmpdir: Path, name: str = "dead") -> Path:
    """A run directory like one a killed supervisor leaves: a pid file that nobody holds locked."""
    rundir = tmpdir / f"{workers.RUNDIR_PREFIX}{name}"
    rundir.mkdir(mode=0o700)
    (rundir / workers.PID_FILE).write_text("4194304\n")
    (rundir / "w1.sock").touch()
    return rundir


def test_stale_rundir_behind_a_symlink_is_not_followed(tmp_path):
    # A symlink /tmp/bridge-workers-x -> some other directory must never get that directory emptied.
    (tmp_path / "elsewhere").mkdir()
    elsewhere = stale_rundir(tmp_path / "elsewhere")
    link = tmp_path / f"{workers.RUNDIR_PREFIX}link"
    link.symlink_to(elsewhere, target_is_directory=True)
    workers.remove_stale_rundirs(str(tmp_path))
    assert link.is_symlink() and (elsewhere / "w1.sock").exists()


def test_rundir_without_a_pid_file_is_kept(tmp_path):
    # A supervisor between mkdtemp and its locked pid file looks like this.
    starting = stale_rundir(tmp_path)
    (starting / workers.PID_FILE).unlink()
    workers.remove_stale_rundirs(str(tmp_path))
    assert starting.is_dir()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_another_users_stale_rundir_is_kept(tmp_path):
    theirs = stale_rundir(tmp_path)
    os.chown(theirs, os.getuid() + 1, -1)
    workers.remove_stale_rundirs(str(tmp_path))
    assert theirs.is_dir()


def test_directories_of_another_kind_are_kept(tmp_path):
    other = stale_rundir(tmp_path).rename(tmp_path / "pymp-dead")
    workers.remove_stale_rundirs(str(tmp_path))
    assert other.is_dir()
