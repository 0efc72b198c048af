"""One benchmark case: fresh servers, load-client processes, a publisher, measurements.

Every case starts its own nats-server (and, for the bridge target, its own bridge),
so peak RSS (VmHWM) and CPU belong to that case alone.  Every wait is bounded.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from bench.common import HIST_SIZE, percentile, proc_cpu, tree_cpu_split, tree_status_kib
from bench.loadclient import ClientSpec, Stats, worker_main
from bench.publisher import PublishPlan, PublishResult, publisher_main
from bench.servers import BridgeProcess, NatsServer

# fork: the orchestrator has no threads and no event loop, and children start at once.
CTX = mp.get_context("fork")


class HarnessError(RuntimeError):
    """The benchmark itself broke (as opposed to the system under test losing messages)."""


@dataclass
class Case:
    workload: str  # "W1" ...
    target: str  # "bridge" or "nats"
    clients: int
    subjects: list[str]  # client i subscribes to subjects[i % len(subjects)]
    messages: int  # published in all, round-robin over the subjects
    rate: float | None  # msgs/s in all; None = as fast as possible
    per_proc: int = 500  # clients per load process
    handshakes: int = 64  # handshakes in flight, over all load processes
    connect_timeout: float = 120.0
    quiet: float = 5.0  # drain gives up after this long without progress
    hard: float = 120.0  # ... or this long in all after publishing ends
    # Pause after every client is subscribed, before measuring RSS and publishing, so that
    # connection setup does not overlap the measurement.
    settle: float = 0.5
    label: str = ""
    impl: str = "raw"  # load-client implementation: "raw" or "aiohttp"
    uvloop: bool = False  # load clients on uvloop
    # A JetStream stream stores the subjects: the bridge follows them through its
    # live feed (messages with sequences) instead of a core subscription.
    stored: bool = False
    workers: int = 1  # the bridge's WORKERS
    # How bridge clients connect: "websocket" (/stream) or "sse" (Server-Sent Events on /events).
    transport: str = "websocket"


@dataclass
class Row:
    case: Case
    delivered: int = 0
    expected: int = 0
    out_of_order: int = 0
    disconnected: int = 0
    close_codes: dict[int, int] = field(default_factory=dict)
    complete_clients: int = 0
    connected: int = 0
    connect_failures: int = 0
    connect_seconds: float = 0.0
    p50_us: int | None = None
    p99_us: int | None = None
    max_us: int | None = None
    server_cpu: float = 0.0  # serving process (all its workers), publish start -> drain end
    server_sys: float = 0.0  # the kernel part of server_cpu
    aux_cpu: float = 0.0  # nats-server behind the bridge, same window
    loadgen_cpu: float = 0.0  # load clients + publisher, same window
    loadgen_sys: float = 0.0  # the kernel part of the load clients' CPU
    window: float = 0.0  # seconds from publish start to drain end
    system_busy: float = 0.0  # whole machine, CPU seconds, same window (from /proc/stat)
    peak_rss_kib: int = 0
    rss_before_kib: int = 0
    rss_connected_kib: int = 0
    publish_seconds: float = 0.0
    drain_seconds: float = 0.0  # from the end of publishing to the last receipt
    span_seconds: float = 0.0  # from the start of publishing to the last receipt
    timed_out: bool = False
    cut_off: bool = False  # some client was still receiving when the drain's hard limit hit
    errors: list[str] = field(default_factory=list)

    @property
    def cpu_us_per_msg(self) -> float | None:
        return self.server_cpu / self.delivered * 1e6 if self.delivered else None

    @property
    def lossless(self) -> bool:
        return self.delivered == self.expected and self.expected > 0 and self.disconnected == 0

    @property
    def in_order(self) -> bool:
        return self.out_of_order == 0


def system_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    import os

    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return (sum(parts[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _recv(conn: Connection, timeout: float, what: str) -> Any:
    if not conn.poll(timeout):
        raise HarnessError(f"{what}: no answer within {timeout:g}s")
    try:
        return conn.recv()
    except EOFError:
        raise HarnessError(f"{what}: the process died") from None


class LoadPool:
    """The load-client processes of one case."""

    def __init__(self, case: Case, url: str) -> None:
        subjects = [case.subjects[i % len(case.subjects)] for i in range(case.clients)]
        nprocs = max(1, -(-case.clients // case.per_proc))
        per_proc_handshakes = max(2, case.handshakes // nprocs)
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []
        for p in range(nprocs):
            chunk = subjects[p::nprocs]
            if not chunk:
                continue
            spec = ClientSpec(
                target=case.target, url=url, subjects=chunk, impl=case.impl, uvloop=case.uvloop,
                concurrency=per_proc_handshakes, connect_timeout=case.connect_timeout,
                transport=case.transport,
            )
            parent, child = CTX.Pipe()
            proc = CTX.Process(target=worker_main, args=(child, spec), daemon=True,
                               name=f"bench-load-{p}")
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    def request(self, cmd: tuple[Any, ...], expect: str, timeout: float) -> list[Any]:
        for conn in self.conns:
            conn.send(cmd)
        replies: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < len(self.conns):
            left = deadline - time.monotonic()
            pending = [c for i, c in enumerate(self.conns) if i not in replies]
            if left <= 0 or not (ready := wait(pending, left)):
                raise HarnessError(f"load clients: no {expect!r} within {timeout:g}s")
            for conn in ready:
                i = self.conns.index(conn)  # type: ignore[arg-type]
                try:
                    kind, body = conn.recv()  # type: ignore[union-attr]
                except EOFError:
                    raise HarnessError(f"load process {i} died (see its stderr)") from None
                if kind == "error":
                    raise HarnessError(f"load process {i} failed:\n{body}")
                if kind != expect:
                    raise HarnessError(f"load process {i}: expected {expect!r}, got {kind!r}")
                replies[i] = body
        return [replies[i] for i in range(len(self.conns))]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                total += proc_cpu(pid)
            except OSError:
                pass
        return total

    def close(self) -> None:
        try:
            self.request(("close",), "closed", 30)
        except (HarnessError, OSError):
            pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for conn in self.conns:
            conn.close()


class Publisher:
    def __init__(self, plan: PublishPlan) -> None:
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=publisher_main, args=(child, plan), daemon=True,
                                name="bench-publisher")
        self.proc.start()
        child.close()
        first = _recv(self.conn, 30, "publisher start")
        if first != "ready":
            err = first.error if isinstance(first, PublishResult) else first
            raise HarnessError(f"publisher could not connect: {err}")

    def go(self) -> None:
        self.conn.send("go")

    def result(self, timeout: float) -> PublishResult:
        res = _recv(self.conn, timeout, "publisher")
        if res.error:
            raise HarnessError(f"publisher failed:\n{res.error}")
        return res

    def cpu(self) -> float:
        try:
            return proc_cpu(self.proc.pid) if self.proc.pid else 0.0
        except OSError:
            return 0.0

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()


def expected_per_subject(subjects: list[str], messages: int) -> dict[str, int]:
    n = len(subjects)
    return {s: messages // n + (1 if k < messages % n else 0) for k, s in enumerate(subjects)}


def run_case(case: Case, workdir: Path, bridge_args: list[str], profile: str | None = None) -> Row:
    """Run one case from scratch and measure it.  Raises HarnessError if the harness breaks."""
    row = Row(case=case)
    name = (f"{case.workload}-{case.target}" + (f"-w{case.workers}" if case.workers > 1 else "")
            + (f"-{case.label}" if case.label else ""))
    nats = NatsServer(workdir, name, jetstream=case.stored)
    bridge: BridgeProcess | None = None
    pool: LoadPool | None = None
    publisher: Publisher | None = None
    spy = None
    try:
        nats.start()
        if case.stored:
            create_stream(nats.url, case.subjects)
        if case.target == "bridge":
            # Room for every client (as an env var, so a flag in bridge_args still wins).
            env = {"MAX_CONNECTIONS": str(max(10_000, case.clients + 100)), "WORKERS": str(case.workers)}
            bridge = BridgeProcess(workdir, name, nats.url, bridge_args, env).start()
            serving, url = bridge.pid, bridge.events_url if case.transport == "sse" else bridge.ws_url
        else:
            serving, url = nats.pid, nats.ws_url
        pool = LoadPool(case, url)
        publisher = Publisher(PublishPlan(nats.url, case.subjects, case.messages, case.rate))
        # Summed over the process tree: the bridge's workers are its children.
        row.rss_before_kib = tree_status_kib(serving, "VmRSS")

        ready: list[Stats] = pool.request(("connect",), "ready", case.connect_timeout + 30)
        row.connected = sum(s.connected for s in ready)
        row.connect_failures = sum(s.connect_failures for s in ready)
        row.connect_seconds = max(s.connect_seconds for s in ready)
        for s in ready:
            row.errors.extend(s.connect_errors)
        if row.connected == 0:
            raise HarnessError(f"{name}: no client could connect: {row.errors[:3]}")
        if case.settle:
            time.sleep(case.settle)
        row.rss_connected_kib = tree_status_kib(serving, "VmRSS")

        if profile and bridge is not None:
            spy = start_py_spy(profile, workdir / f"{name}.svg", serving)

        user0, sys0 = tree_cpu_split(serving)
        aux0 = proc_cpu(nats.pid) if bridge is not None else 0.0
        busy0 = system_busy_seconds()
        t0 = time.monotonic()
        publisher.go()
        expected_time = case.messages / case.rate if case.rate else 0.0
        pub = publisher.result(timeout=expected_time * 2 + 60)
        t_published = time.monotonic()
        row.publish_seconds = pub.seconds
        expected = expected_per_subject(case.subjects, case.messages)
        results: list[Stats] = pool.request(
            ("drain", expected, case.quiet, case.hard), "result", case.hard + case.quiet + 60
        )
        t1 = time.monotonic()
        user1, sys1 = tree_cpu_split(serving)
        row.server_cpu = user1 + sys1 - user0 - sys0
        row.server_sys = sys1 - sys0
        row.aux_cpu = (proc_cpu(nats.pid) - aux0) if bridge is not None else 0.0
        row.loadgen_cpu = sum(s.cpu_seconds for s in results) + pub.cpu_seconds
        row.loadgen_sys = sum(s.sys_seconds for s in results)
        row.system_busy = system_busy_seconds() - busy0
        row.window = t1 - t0
        row.peak_rss_kib = tree_status_kib(serving, "VmHWM")
        if spy is not None:
            stop_py_spy(spy)
            spy = None

        hist = [0] * HIST_SIZE
        last_ns = 0
        for s in results:
            row.delivered += s.received
            row.expected += s.expected
            row.out_of_order += s.out_of_order
            row.disconnected += s.disconnected
            row.complete_clients += s.complete_clients
            row.timed_out = row.timed_out or s.timed_out
            row.cut_off = row.cut_off or s.timeout_reason == "hard"
            for code, n in s.close_codes.items():
                row.close_codes[code] = row.close_codes.get(code, 0) + n
            row.errors.extend(s.protocol_errors)
            for i, n in enumerate(s.hist):
                if n:
                    hist[i] += n
            last_ns = max(last_ns, s.last_receipt_ns)
        row.p50_us = percentile(hist, 0.50)
        row.p99_us = percentile(hist, 0.99)
        # Exact for latencies of 128 µs and more; below that the histogram is exact anyway.
        row.max_us = max(s.max_latency_us for s in results) or percentile(hist, 1.0)
        if last_ns:
            row.drain_seconds = max(0.0, last_ns / 1e9 - t_published)
            row.span_seconds = max(0.0, last_ns / 1e9 - t0)
        for label, proc in (("bridge", bridge and bridge.proc), ("nats-server", nats.proc)):
            if proc is not None and proc.poll() is not None:
                row.errors.append(f"{label} exited with {proc.returncode} during the run")
        return row
    finally:
        if spy is not None:
            stop_py_spy(spy)
        if pool is not None:
            pool.close()
        if publisher is not None:
            publisher.close()
        if bridge is not None:
            bridge.stop()
        nats.stop()


def create_stream(url: str, subjects: list[str]) -> None:
    """A file stream storing the case's subjects (what an application would have)."""
    import asyncio

    import nats as nats_py

    async def create() -> None:
        nc = await nats_py.connect(url, connect_timeout=5)
        try:
            await nc.jetstream().add_stream(name="BENCH", subjects=subjects)
        finally:
            await nc.close()

    asyncio.run(create())


def start_py_spy(binary: str, out: Path, pid: int) -> Any:
    import subprocess

    return subprocess.Popen(
        [binary, "record", "--nonblocking", "--rate", "200", "-o", str(out), "--pid", str(pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def stop_py_spy(proc: Any) -> None:
    import signal
    import subprocess

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
