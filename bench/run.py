"""Benchmark the bridge beside nats-server's own WebSocket listener.

    .venv/bin/python bench/run.py                      # everything (several minutes)
    .venv/bin/python bench/run.py --workloads W1,W2    # some workloads
    .venv/bin/python bench/run.py --smoke              # seconds-long version, for CI
    .venv/bin/python bench/run.py --workloads W5 --workers 1,2   # the ceiling with WORKERS=1 and 2

Workloads (full size):
  W1 fan-out   1000 clients, one subject, 100 msg/s for 10 s (and the same over Server-Sent
               Events, on a stored subject, and with FLUSH_DELAY=0.05, against the bridge)
  W2 latency   100 clients, 200 msg/s for 10 s
  W3 burst     100 clients, 5000 messages as fast as the publisher can
  W4 scale     10 000 idle connections over 100 subjects (RSS/conn, conn/s), then 3 msgs/subject
  W5 ceiling   the highest rate with zero loss (and p99 ≤ 1 s) at 1000 clients (×2 steps, then
               bisection), once per --workers value (the bridge's WORKERS; default 1 and 2)

W1–W4 run against the bridge and, as the reference, nats-server's WebSocket listener.
Exit status: 0 when the harness worked (whatever the numbers), 1 when it broke
(a process failed, a wait timed out, or some case delivered nothing), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import raise_nofile  # noqa: E402
from bench.harness import Case, HarnessError, Row, run_case  # noqa: E402
from bench.report import (  # noqa: E402
    W5Result,
    machine_lines,
    render,
    scaling_table,
    table,
    w5_pass,
    w5_table,
)

WORKLOADS = ("W1", "W2", "W3", "W4", "W5")
FLUSH_DELAY_LABEL = "FLUSH_DELAY=0.05"
STORED_LABEL = "stored (JetStream)"
SSE_LABEL = "SSE"

# name -> settings; "rate" None = as fast as possible.
FULL = {
    "W1": {"clients": 1000, "subjects": 1, "rate": 100, "messages": 1000},
    "W2": {"clients": 100, "subjects": 1, "rate": 200, "messages": 2000},
    "W3": {"clients": 100, "subjects": 1, "rate": None, "messages": 5000},
    "W4": {"clients": 10_000, "subjects": 100, "rate": 100, "messages": 300, "per_proc": 1000,
           "settle": 1.0},
    "W5": {"clients": 1000, "subjects": 1, "seconds": 5.0, "start": 25, "factor": 2, "max_rate": 3200,
           "bisect": 2},
}
SMOKE = {
    "W1": {"clients": 20, "subjects": 1, "rate": 50, "messages": 50},
    "W2": {"clients": 10, "subjects": 1, "rate": 100, "messages": 100},
    "W3": {"clients": 10, "subjects": 1, "rate": None, "messages": 500},
    "W4": {"clients": 200, "subjects": 10, "rate": 100, "messages": 30, "per_proc": 100},
    "W5": {"clients": 20, "subjects": 1, "seconds": 1.0, "start": 100, "factor": 4, "max_rate": 400,
           "bisect": 0},
}


def make_case(workload: str, target: str, cfg: dict, smoke: bool, load: dict, **over: object) -> Case:
    subjects = (
        [f"bench.{workload.lower()}"]
        if cfg["subjects"] == 1
        else [f"bench.{workload.lower()}.{k}" for k in range(cfg["subjects"])]
    )
    kwargs: dict = {
        "workload": workload, "target": target, "clients": cfg["clients"], "subjects": subjects,
        "messages": cfg.get("messages", 0), "rate": cfg.get("rate"),
        "per_proc": cfg.get("per_proc", 500), "settle": cfg.get("settle", 0.5),
        "hard": cfg.get("hard", 120.0), **load,
    }
    if smoke:
        kwargs.update(quiet=3.0, hard=15.0, connect_timeout=20.0)
    kwargs.update(over)
    return Case(**kwargs)


def run_w5(target: str, cfg: dict, smoke: bool, load: dict, workdir: Path, bridge_args: list[str],
           log: list[str], workers: int = 1) -> W5Result:
    steps: list[Row] = []

    def step(rate: int) -> bool:
        case = make_case("W5", target, cfg, smoke, load, rate=float(rate),
                         messages=max(1, int(rate * cfg["seconds"])), quiet=2.0, hard=2.0,
                         label=f"{rate}", workers=workers)
        row = run_case(case, workdir, bridge_args)
        steps.append(row)
        ok = w5_pass(row)
        print(f"  W5 {target} WORKERS={workers} {rate} msg/s: {row.delivered:,}/{row.expected:,} "
              f"p99 {row.p99_us} µs -> {'pass' if ok else 'FAIL'}", flush=True)
        return ok

    best: int | None = None
    fail: int | None = None
    rate = int(cfg["start"])
    while rate <= cfg["max_rate"]:
        if step(rate):
            best = rate
            rate *= cfg["factor"]
        else:
            fail = rate
            break
    if best is not None and fail is not None:
        for _ in range(cfg["bisect"]):
            mid = (best + fail) // 2
            if mid in (best, fail):
                break
            if step(mid):
                best = mid
            else:
                fail = mid
    best_row = next((r for r in steps if r.case.rate == best), None) if best is not None else None
    if best is None:
        log.append(f"W5 {target} WORKERS={workers}: even {cfg['start']} msg/s failed")
    return W5Result(target=target, steps=steps, best=best_row, workers=workers)


def w1_variants(cfg: dict, smoke: bool, load: dict, workdir: Path, bridge_args: list[str],
                errors: list[str]) -> list[tuple[str, Row]]:
    """W1 against the bridge again: over Server-Sent Events (on a plain and on a stored subject),
    on a stored subject, and with FLUSH_DELAY=0.05 (the last only in a full run)."""
    variants: list[tuple[str, list[str], dict]] = [
        # Every client on /events instead of the WebSocket: its CPU per delivered message beside
        # the WebSocket row's, in the same run; then on a stored subject, where each event
        # carries its connection's own id.
        (f"W1 {SSE_LABEL}", bridge_args, {"transport": "sse", "label": "sse"}),
        (f"W1 {SSE_LABEL} {STORED_LABEL}", bridge_args,
         {"transport": "sse", "stored": True, "label": "sse-stored"}),
        # Live delivery through the bridge's ordered consumer, every frame with its sequence.
        (f"W1 {STORED_LABEL}", bridge_args, {"stored": True, "label": "stored"}),
    ]
    if not smoke:
        # Frames gathered for up to 50 ms under sustained traffic: fewer writes (syscalls) per
        # delivery, at that latency.
        variants.append((f"W1 {FLUSH_DELAY_LABEL}", [*bridge_args, "--flush-delay", "0.05"], {}))
    rows: list[tuple[str, Row]] = []
    for label, args, over in variants:
        print(f"bench: {label} bridge ...", flush=True)
        try:
            rows.append((label, run_case(make_case("W1", "bridge", cfg, smoke, load, **over), workdir, args)))
        except (HarnessError, RuntimeError, OSError) as exc:
            errors.append(f"{label} bridge: {exc}")
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="comma-separated subset of W1..W5 (default: all)")
    p.add_argument("--targets", default="bridge,nats",
                   help="comma-separated subset of bridge,nats (default both; W5 is bridge only "
                   "unless --w5-reference)")
    p.add_argument("--w5-reference", action="store_true", help="also search nats-server's W5 ceiling")
    p.add_argument("--workers", default="1,2",
                   help="comma-separated WORKERS values for the bridge's W5 ceiling (default 1,2: "
                   "one process, then two sharing the port); W1-W4 always run one")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long version of every workload with a few clients (for CI)")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write the Markdown results (default bench/RESULTS.md; "
                   "with --smoke, bench/out/RESULTS-smoke.md)")
    p.add_argument("--client", choices=("raw", "aiohttp"), default="raw",
                   help="load-client implementation: a minimal asyncio.Protocol WebSocket client "
                   "(default; on uvloop it needs ~40%% less CPU per frame than aiohttp's) or "
                   "aiohttp's ws_connect (a cross-check)")
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="event loop of the load clients (never the bridge's): auto = uvloop when it "
                   "is installed (their CPU per received frame drops by 25-65%%), else asyncio")
    p.add_argument("--bridge-args", default="",
                   help="extra arguments for main.py, e.g. '--log-level WARNING'")
    p.add_argument("--py-spy", metavar="PATH", nargs="?", const="py-spy", default=None,
                   help="record a py-spy flame graph of the bridge in every bridge case "
                   "(into the run's work directory; perturbs the numbers)")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the work directory (server logs, configs) even on success")
    args = p.parse_args(argv)
    args.workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in args.workloads if w not in WORKLOADS]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad += [t for t in args.targets if t not in ("bridge", "nats")]
    try:
        args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        p.error(f"--workers: expected whole numbers like 1,2, got {args.workers!r}")
    if not args.workers or min(args.workers) < 1:
        p.error("--workers: expected whole numbers >= 1")
    if bad or not args.workloads or not args.targets:
        p.error(f"unknown or empty selection: {bad}")
    if args.out is None:
        args.out = ROOT / "bench" / ("out/RESULTS-smoke.md" if args.smoke else "RESULTS.md")
    if args.loop != "asyncio":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            if args.loop == "uvloop":
                p.error("--loop uvloop: uvloop is not installed (pip install uvloop)")
            args.loop = "asyncio"
        else:
            args.loop = "uvloop"
    if args.py_spy and not shutil.which(args.py_spy):
        alt = Path(sys.executable).parent / "py-spy"
        if not alt.exists():
            p.error("py-spy not found: pip install py-spy into the venv")
        args.py_spy = str(alt)
    return args


def command_line() -> str:
    exe = sys.executable
    with contextlib.suppress(ValueError):
        exe = os.path.relpath(exe, Path.cwd())
    return shlex.join([exe, *sys.argv])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limit = raise_nofile()
    cfgs = SMOKE if args.smoke else FULL
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    t_start = time.monotonic()
    load_before = os.getloadavg()
    out_dir = ROOT / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"run-{time.strftime('%Y%m%d-%H%M%S')}-", dir=out_dir))
    bridge_args = shlex.split(args.bridge_args)
    load = {"impl": args.client, "uvloop": args.loop == "uvloop"}
    need = max(cfgs[w]["clients"] for w in args.workloads) + 200
    if limit < need:
        print(f"warning: RLIMIT_NOFILE is {limit}, below the {need} this run needs", file=sys.stderr)
    print(f"bench: {'smoke' if args.smoke else 'full'} run of {','.join(args.workloads)} "
          f"against {','.join(args.targets)}; logs in {workdir}", flush=True)

    rows: list[tuple[str, Row]] = []
    w5: list[W5Result] = []
    errors: list[str] = []
    for workload in args.workloads:
        cfg = cfgs[workload]
        if workload == "W5":
            runs = [("bridge", n) for n in args.workers] if "bridge" in args.targets else []
            if "nats" in args.targets and args.w5_reference:
                runs.append(("nats", 1))
            for target, workers in runs:
                what = f"W5 {target}" + (f" WORKERS={workers}" if target == "bridge" else "")
                print(f"bench: {what} ...", flush=True)
                try:
                    res = run_w5(target, cfg, args.smoke, load, workdir, bridge_args, errors, workers)
                except Exception as exc:
                    errors.append(f"{what}: {exc}")
                    print(f"bench: {what} FAILED: {exc}", file=sys.stderr, flush=True)
                    continue
                w5.append(res)
                summary = res.best or (res.steps[0] if res.steps else None)
                if summary is not None:
                    variant = f" WORKERS={workers}" if workers > 1 else ""
                    label = f"W5{variant} @{summary.case.rate:g}/s" if res.best else f"W5{variant} (no pass)"
                    rows.append((label, summary))
            continue
        for target in [t for t in ("bridge", "nats") if t in args.targets]:
            print(f"bench: {workload} {target} ...", flush=True)
            case = make_case(workload, target, cfg, args.smoke, load)
            t0 = time.monotonic()
            try:
                row = run_case(case, workdir, bridge_args,
                               profile=args.py_spy if target == "bridge" else None)
            except (HarnessError, RuntimeError, OSError) as exc:
                errors.append(f"{workload} {target}: {exc}")
                print(f"bench: {workload} {target} FAILED: {exc}", file=sys.stderr, flush=True)
                continue
            except Exception:
                errors.append(f"{workload} {target}: {traceback.format_exc()}")
                print(f"bench: {workload} {target} CRASHED:\n{traceback.format_exc()}",
                      file=sys.stderr, flush=True)
                continue
            rows.append((workload, row))
            per = row.loadgen_cpu / row.delivered * 1e6 if row.delivered else 0.0
            print(f"  {row.delivered:,}/{row.expected:,} delivered, p99 {row.p99_us} µs, server "
                  f"{row.server_cpu:.2f} s CPU ({row.server_sys:.2f} sys) = {row.cpu_us_per_msg or 0:.1f} "
                  f"µs/msg, load-gen {row.loadgen_cpu:.2f} s ({row.loadgen_sys:.2f} sys) = {per:.1f} µs/msg, "
                  f"window {row.window:.1f} s, machine busy "
                  f"{row.system_busy:.1f} s ({time.monotonic() - t0:.1f} s in all)", flush=True)
            for e in row.errors[:5]:
                print(f"    {e}", flush=True)

    if "W1" in args.workloads and "bridge" in args.targets:
        rows += w1_variants(cfgs["W1"], args.smoke, load, workdir, bridge_args, errors)

    for label, row in rows:
        if row.delivered == 0:
            errors.append(f"{label} {row.case.target}: nothing delivered")

    header = machine_lines(command_line(), started, load_before, os.getloadavg(),
                           time.monotonic() - t_start, f"{args.client} on {args.loop}")
    text = render(header, rows, w5, errors, smoke=args.smoke)
    print()
    print(table(rows))
    if w5:
        print()
        print(scaling_table(w5))
        print()
        print(w5_table(w5))
    print()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"bench: wrote {args.out}")
    if errors:
        print("bench: HARNESS ERRORS:", file=sys.stderr)
        for e in errors:
            print(f"  {e}", file=sys.stderr)
        print(f"bench: logs kept in {workdir}", file=sys.stderr)
        return 1
    if args.keep_logs or args.py_spy:
        print(f"bench: logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
