"""Request/reply: browsers calling a NATS service through the bridge, beside nats-server's own WebSocket.

    .venv/bin/python bench/requests.py            # 100 clients x 20 requests/s, 3 rounds of 10 s each way,
                                                   # then the one-worker ceiling (a few minutes)
    .venv/bin/python bench/requests.py --smoke    # seconds-long, for CI

One nats-server (with its WebSocket listener), one responder (bench/rrclient.py:
it echoes each payload, on one core, far faster than either target needs) and
one bridge (``WORKERS=1``, ``PUBLISH_ALLOW=bench.>``) serve the whole run, so
both targets call the very same service:

- *bridge*: clients send ``{"action": "request", ...}`` frames to ``/stream``;
- *nats*: clients speak the NATS protocol to nats-server's WebSocket listener,
  as nats.ws does a request (an ``_INBOX`` subscription, ``PUB`` with a reply).

Each client sends at a steady rate from a random phase; the round trip is from
the client's send to the answer, in the client process.  *Ceiling*: the
highest total rate (the same clients, faster) the bridge with one worker
answers with no error, none missing and p99 ≤ 1 s, doubling from the start
rate and then bisecting.  The bridge's ``CONTROL_RATE`` is raised out of the
way (its default, 20 frames a second, is exactly this workload's rate per
client: the limiter is not what is measured here).

Writes a Markdown table to stdout and to ``--out`` (default
bench/RESULTS-requests.md; bench/out/RESULTS-requests-smoke.md with ``--smoke``).
Exit status: 0 when the harness worked, 1 when it broke (a process failed or
nothing was answered), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import HIST_SIZE, percentile, proc_cpu, raise_nofile, tree_cpu_split  # noqa: E402
from bench.report import machine_lines, ms  # noqa: E402
from bench.rrclient import LoadSpec, RunResult, load_main, responder_main  # noqa: E402
from bench.servers import BridgeProcess, NatsServer  # noqa: E402

CTX = mp.get_context("fork")
SUBJECT = "bench.rr"
PER_PROCESS = 50  # clients per load process
TARGET_RATIO = 1.5  # the bridge's p99 at most this many times nats-server's


class HarnessError(RuntimeError):
    pass


def _recv(conn: Connection, timeout: float, what: str) -> Any:
    if not conn.poll(timeout):
        raise HarnessError(f"{what}: no answer within {timeout:g} s")
    try:
        kind, body = conn.recv()
    except EOFError:
        raise HarnessError(f"{what}: the process died") from None
    if kind == "error":
        raise HarnessError(f"{what} failed:\n{body}")
    return body


class Responder:
    def __init__(self, url: str) -> None:
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=responder_main, args=(child, url, SUBJECT), daemon=True,
                                name="bench-responder")
        self.proc.start()
        child.close()
        _recv(self.conn, 30, "responder start")

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid) if self.proc.pid else 0.0

    def stop(self) -> None:
        try:
            self.conn.send("stop")
            _recv(self.conn, 10, "responder stop")
        except (HarnessError, OSError):
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()


class LoadPool:
    def __init__(self, target: str, url: str, clients: int) -> None:
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        nprocs = max(1, -(-clients // PER_PROCESS))
        for p in range(nprocs):
            share = clients // nprocs + (1 if p < clients % nprocs else 0)
            parent, child = CTX.Pipe()
            spec = LoadSpec(target, url, share, SUBJECT)
            proc = CTX.Process(target=load_main, args=(child, spec), daemon=True, name=f"bench-rr-{p}")
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def ask(self, cmd: tuple[Any, ...], timeout: float) -> list[Any]:
        for conn in self.conns:
            conn.send(cmd)
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < len(self.conns):
            pending = [c for i, c in enumerate(self.conns) if i not in answers]
            ready = wait(pending, max(0.0, deadline - time.monotonic()))
            if not ready:
                raise HarnessError(f"load clients: no answer to {cmd[0]!r} within {timeout:g} s")
            for conn in ready:
                answers[self.conns.index(conn)] = _recv(conn, 1, f"load process ({cmd[0]})")  # type: ignore[arg-type]
        return [answers[i] for i in range(len(self.conns))]

    def close(self) -> None:
        try:
            self.ask(("close",), 30)
        except (HarnessError, OSError):
            pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()


@dataclass
class Row:
    target: str
    clients: int
    rate: float  # requests per second in all, as scheduled
    seconds: float
    workers: int = 1
    round: int = 0
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    missing: int = 0
    late_sends: int = 0
    disconnected: int = 0
    p50_us: int | None = None
    p99_us: int | None = None
    max_us: int | None = None
    hist: list[int] = field(default_factory=lambda: [0] * HIST_SIZE)
    server_cpu: float = 0.0  # the serving process (the bridge, or nats-server for nats)
    server_sys: float = 0.0  # the kernel's part of it
    nats_cpu: float = 0.0  # nats-server behind the bridge
    responder_cpu: float = 0.0
    loadgen_cpu: float = 0.0
    window: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(self.errors.values()) + self.missing

    @property
    def clean(self) -> bool:
        """No error, none missing, and p99 within a second: a rate this target sustains."""
        return self.ok > 0 and not self.failed and not self.disconnected and (self.p99_us or 0) <= 1_000_000


def run_load(target: str, url: str, clients: int, per_client: float, seconds: float, serving: int,
             nats_pid: int, responder: Responder, grace: float) -> Row:
    row = Row(target, clients, per_client * clients, seconds)
    pool = LoadPool(target, url, clients)
    try:
        connected = sum(pool.ask(("connect",), 120))
        if connected < clients:
            row.notes.append(f"{clients - connected} could not connect")
        if not connected:
            raise HarnessError(f"{target}: no client could connect")
        time.sleep(0.3)
        user0, sys0 = tree_cpu_split(serving)
        nats0, resp0 = proc_cpu(nats_pid), responder.cpu()
        t0 = time.monotonic()
        results: list[RunResult] = pool.ask(("run", t0 + 0.2, seconds, per_client, grace),
                                            seconds + grace + 60)
        row.window = time.monotonic() - t0
        user1, sys1 = tree_cpu_split(serving)
        row.server_cpu = user1 + sys1 - user0 - sys0
        row.server_sys = sys1 - sys0
        row.nats_cpu = proc_cpu(nats_pid) - nats0 if serving != nats_pid else 0.0
        row.responder_cpu = responder.cpu() - resp0
    finally:
        pool.close()
    hist = row.hist
    for r in results:
        row.sent += r.sent
        row.ok += r.ok
        row.missing += r.missing
        row.late_sends += r.late_sends
        row.disconnected += r.disconnected
        row.loadgen_cpu += r.cpu_seconds
        row.max_us = max(row.max_us or 0, r.max_us)
        for kind, n in r.errors.items():
            row.errors[kind] = row.errors.get(kind, 0) + n
        for i, n in enumerate(r.hist):
            hist[i] += n
        row.notes.extend(r.protocol_errors[:2])
    row.p50_us, row.p99_us = percentile(hist, 0.50), percentile(hist, 0.99)
    return row


def combined(rows: list[Row], label: str) -> Row:
    """Several rounds of one target as one row: every request of every round."""
    total = Row(label, rows[0].clients, rows[0].rate, sum(r.seconds for r in rows))
    for r in rows:
        for name in ("sent", "ok", "missing", "late_sends", "disconnected", "server_cpu", "server_sys",
                     "nats_cpu", "responder_cpu", "loadgen_cpu", "window"):
            setattr(total, name, getattr(total, name) + getattr(r, name))
        for kind, n in r.errors.items():
            total.errors[kind] = total.errors.get(kind, 0) + n
        total.hist = [a + b for a, b in zip(total.hist, r.hist, strict=True)]
        total.max_us = max(total.max_us or 0, r.max_us or 0)
    total.p50_us, total.p99_us = percentile(total.hist, 0.50), percentile(total.hist, 0.99)
    return total


def bridge_env(workers: int) -> dict[str, str]:
    return {"PUBLISH_ALLOW": "bench.>", "CONTROL_RATE": "100000", "LOG_LEVEL": "WARNING",
            "WORKERS": str(workers)}


def ceiling(args: argparse.Namespace, nats: NatsServer, responder: Responder, workdir: Path) -> list[Row]:
    """The highest rate one bridge worker answers cleanly: double from the start, then bisect."""
    steps: list[Row] = []
    bridge = BridgeProcess(workdir, "rr-ceiling", nats.url, [], bridge_env(1)).start()
    try:
        def step(rate: float) -> bool:
            row = run_load("bridge", bridge.ws_url, args.clients, rate / args.clients, args.ceiling_seconds,
                           bridge.pid, nats.pid, responder, args.grace)
            steps.append(row)
            print(f"  ceiling {rate:,.0f} req/s: {row.ok:,}/{row.sent:,} answered, {row.failed} failed, "
                  f"p99 {ms(row.p99_us)} ms -> {'pass' if row.clean else 'FAIL'}", flush=True)
            return row.clean

        best, fail, rate = None, None, float(args.ceiling_start)
        while rate <= args.ceiling_max:
            if step(rate):
                best, rate = rate, rate * 2
            else:
                fail = rate
                break
        if best is not None and fail is not None:
            for _ in range(args.bisect):
                mid = round((best + fail) / 2, -1)
                if mid in (best, fail):
                    break
                if step(mid):
                    best = mid
                else:
                    fail = mid
    finally:
        bridge.stop()
    return steps


def line(row: Row, label: str | None = None) -> str:
    answered = f"{row.ok:,} / {row.sent:,}"
    errors = ", ".join(f"{k} {v}" for k, v in sorted(row.errors.items()))
    failed = "; ".join(x for x in (errors, f"missing {row.missing}" if row.missing else "") if x) or "0"
    per = row.server_cpu / row.ok * 1e6 if row.ok else 0.0
    extra = f"; nats-server {row.nats_cpu / row.ok * 1e6:.0f}" if row.nats_cpu and row.ok else ""
    notes = list(row.notes)
    if row.server_cpu > 0:
        notes.append(f"{row.server_sys / row.server_cpu:.0%} of its CPU in the kernel")
    if row.late_sends:
        notes.append(f"{row.late_sends:,} sends over 5 ms late (the load generator lagging)")
    return (f"| {label or row.target} | {row.clients:,} | {row.rate:,.0f} | {answered} | {failed} "
            f"| {ms(row.p50_us)} | {ms(row.p99_us)} | {ms(row.max_us)} | {per:.0f}{extra} "
            f"| {row.loadgen_cpu / row.window:.2f} | {'; '.join(notes)} |")


HEADER = ("| Target | Clients | Requests/s | Answered / sent | Failed | p50 ms | p99 ms | max ms "
          "| CPU µs/request | Load-gen cores | Notes |\n|---|--:|--:|--:|---|--:|--:|--:|--:|--:|---|")


def verdict(rows: dict[str, Row]) -> str:
    bridge, nats = rows.get("bridge"), rows.get("nats")
    if not (bridge and nats and bridge.p99_us and nats.p99_us):
        return ""
    ratio = bridge.p99_us / nats.p99_us
    met = "met" if ratio <= TARGET_RATIO else "not met"
    return (f"Target p99 ≤ {TARGET_RATIO:g}× nats-server's: {ms(bridge.p99_us)} vs {ms(nats.p99_us)} ms "
            f"= {ratio:.2f}× — **{met}**")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/requests.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--rate", type=float, default=20.0, help="requests per second per client (default 20)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per target and round (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per target, taking turns (default 3)")
    p.add_argument("--grace", type=float, default=3.0,
                   help="seconds to wait for the last answers (default 3)")
    p.add_argument("--ceiling-start", type=float, default=2000, help="first total rate of the ceiling search")
    p.add_argument("--ceiling-max", type=float, default=64000)
    p.add_argument("--ceiling-seconds", type=float, default=5.0, help="seconds per ceiling step (default 5)")
    p.add_argument("--bisect", type=int, default=2,
                   help="bisection steps after the first failure (default 2)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the ceiling search")
    p.add_argument("--smoke", action="store_true", help="a seconds-long version with a few clients")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.clients, args.seconds, args.grace, args.rounds = 10, 1.0, 2.0, 1
        args.ceiling_start, args.ceiling_max, args.ceiling_seconds, args.bisect = 400, 800, 1.0, 0
    if args.out is None:
        args.out = ROOT / "bench" / ("out/RESULTS-requests-smoke.md" if args.smoke else "RESULTS-requests.md")
    if args.clients < 1 or args.rate <= 0 or args.seconds <= 0:
        p.error("--clients, --rate and --seconds must be positive")
    return args


def measure(args: argparse.Namespace, nats: NatsServer, responder: Responder, workdir: Path) -> list[Row]:
    """Both targets, ``--rounds`` times each, taking turns (bridge first, then nats first, ...), so
    that a busy spell of the machine falls on both alike."""
    rounds: list[Row] = []
    bridge = BridgeProcess(workdir, "rr", nats.url, [], bridge_env(1)).start()
    try:
        targets = [("bridge", bridge.ws_url, bridge.pid), ("nats", nats.ws_url, nats.pid)]
        for n in range(args.rounds):
            for target, url, serving in targets if n % 2 == 0 else targets[::-1]:
                print(f"bench: round {n + 1}, {target}: {args.clients} clients x {args.rate:g}/s "
                      f"for {args.seconds:g} s", flush=True)
                row = run_load(target, url, args.clients, args.rate, args.seconds, serving, nats.pid,
                               responder, args.grace)
                row.round = n + 1
                rounds.append(row)
                print("  " + line(row), flush=True)
    finally:
        bridge.stop()
    return rounds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    t_start, load_before = time.monotonic(), os.getloadavg()
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="requests-", dir=ROOT / "bench" / "out"))
    rounds: list[Row] = []
    steps: list[Row] = []
    nats = NatsServer(workdir, "rr").start()
    responder: Responder | None = None
    try:
        responder = Responder(nats.url)
        rounds = measure(args, nats, responder, workdir)
        if not args.no_ceiling:
            print("bench: the bridge's ceiling with one worker", flush=True)
            steps = ceiling(args, nats, responder, workdir)
    except HarnessError as exc:
        print(f"bench: FAILED: {exc}\nlogs kept in {workdir}", file=sys.stderr)
        return 1
    finally:
        if responder is not None:
            responder.stop()
        nats.stop()
    totals = {t: combined([r for r in rounds if r.target == t], t) for t in ("bridge", "nats")}
    best = max((s for s in steps if s.clean), key=lambda s: s.rate, default=None)
    command = " ".join([os.path.relpath(sys.executable), *sys.argv])
    rounds_said = f"{args.rounds} round" + ("s" if args.rounds != 1 else "")
    text = "\n".join([
        *machine_lines(command, started, load_before, os.getloadavg(), time.monotonic() - t_start,
                       f"raw on {'uvloop' if uvloop_installed() else 'asyncio'}"),
        "",
        HEADER,
        *(line(r, f"{r.target} ({rounds_said})") for r in totals.values()),
        "",
        verdict(totals),
        "",
        f"Ceiling, one worker: {best.rate:,.0f} requests/s answered with no error (p99 {ms(best.p99_us)} ms)"
        if best else "Ceiling, one worker: no rate passed" if steps else "Ceiling: not searched",
        "",
        "Each round:",
        "",
        HEADER.replace("| Target |", "| Round |"),
        *(line(r, f"{r.round}: {r.target}") for r in rounds),
        "",
        *(["Ceiling steps:", "", HEADER.replace("| Target |", "| Step |"),
           *(line(s, f"bridge @{s.rate:,.0f}/s") for s in steps), ""] if steps else []),
    ])
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"bench: wrote {args.out}")
    if not all(r.ok for r in totals.values()):
        print(f"bench: some target answered nothing; logs kept in {workdir}", file=sys.stderr)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def uvloop_installed() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
