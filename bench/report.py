"""The result table (Markdown, printed and written to RESULTS.md) and the target check."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from bench.harness import Row
from bench.servers import nats_server_binary


@dataclass
class W5Result:
    target: str
    steps: list[Row]
    best: Row | None
    workers: int = 1


def ms(us: int | None) -> str:
    if us is None:
        return "–"
    if us < 10_000:
        return f"{us / 1000:.2f}"
    if us < 1_000_000:
        return f"{us / 1000:.0f}"
    return f"{us / 1000:,.0f}"


def conn_rate(row: Row) -> float:
    return row.connected / row.connect_seconds if row.connect_seconds else 0.0


def rss_per_conn_kib(row: Row) -> float | None:
    if not row.connected:
        return None
    return (row.rss_connected_kib - row.rss_before_kib) / row.connected


def other_cores(row: Row) -> float:
    if not row.window:
        return 0.0
    other = row.system_busy - row.server_cpu - row.aux_cpu - row.loadgen_cpu
    return max(0.0, other) / row.window


def notes(row: Row) -> str:
    out: list[str] = []
    c = row.case
    if c.workload == "W4":
        per = rss_per_conn_kib(row)
        out.append(f"{conn_rate(row):,.0f} conn/s")
        if per is not None:
            out.append(f"{per:.1f} KiB RSS/conn")
    if c.workload == "W3" and row.delivered:
        if row.span_seconds > 0:
            out.append(f"{row.delivered / row.span_seconds:,.0f} deliveries/s")
        out.append(f"published in {row.publish_seconds:.2f} s, all received after {row.span_seconds:.2f} s")
    if c.workload == "W5" and row.delivered:
        out.append(f"{c.rate:g} msg/s × {c.clients} = {row.delivered / max(row.publish_seconds, 1e-9):,.0f}"
                   " deliveries/s")
    if row.server_cpu > 0:
        out.append(f"{row.server_sys / row.server_cpu:.0%} of server CPU in the kernel")
    if c.target == "bridge" and row.delivered:
        out.append(f"nats-server +{row.aux_cpu / row.delivered * 1e6:.1f} µs/msg")
    if row.connect_failures:
        out.append(f"{row.connect_failures} failed to connect")
    if row.disconnected:
        codes = ", ".join(f"{k}×{v}" for k, v in sorted(row.close_codes.items()))
        out.append(f"{row.disconnected} disconnected (close {codes})")
    if row.timed_out and row.delivered < row.expected:
        why = (f"still arriving at the {c.hard:g} s cut-off" if row.cut_off
               else f"deliveries stopped (nothing for {c.quiet:g} s)")
        out.append(f"drain gave up, {why}; {row.complete_clients}/{c.clients} clients complete")
    return "; ".join(out)


HEADER = (
    "| Workload | Target | Clients | Delivered / expected | Order | p50 ms | p99 ms | max ms "
    "| CPU µs/msg | Peak RSS MiB | Load-gen cores | Other cores | Notes |"
)
RULE = "|---|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|---|"


def row_line(row: Row, label: str | None = None) -> str:
    c = row.case
    pct = f" ({row.delivered / row.expected:.1%})" if row.expected and row.delivered != row.expected else ""
    order = "ok" if row.in_order else f"{row.out_of_order} out of order"
    cpu = f"{row.cpu_us_per_msg:.1f}" if row.cpu_us_per_msg is not None else "–"
    load = f"{row.loadgen_cpu / row.window:.2f}" if row.window else "–"
    return (
        f"| {label or c.workload} | {c.target} | {c.clients:,} | {row.delivered:,} / {row.expected:,}{pct} "
        f"| {order} | {ms(row.p50_us)} | {ms(row.p99_us)} | {ms(row.max_us)} | {cpu} "
        f"| {row.peak_rss_kib / 1024:.0f} | {load} | {other_cores(row):.2f} | {notes(row)} |"
    )


def table(rows: Sequence[tuple[str, Row]]) -> str:
    return "\n".join([HEADER, RULE, *(row_line(r, label) for label, r in rows)])


def w5_table(results: Sequence[W5Result]) -> str:
    lines = [
        "| Target | Workers | Rate msg/s | Deliveries/s | Delivered / expected | Order | p99 ms | max ms "
        "| CPU µs/msg | Load-gen cores | Verdict |",
        "|---|--:|--:|--:|--:|---|--:|--:|--:|--:|---|",
    ]
    for res in results:
        for row in res.steps:
            c = row.case
            rate = row.delivered / row.publish_seconds if row.publish_seconds else 0.0
            verdict = "pass" if w5_pass(row) else "FAIL"
            cpu = f"{row.cpu_us_per_msg:.1f}" if row.cpu_us_per_msg is not None else "–"
            lines.append(
                f"| {c.target} | {c.workers} | {c.rate:g} | {rate:,.0f} "
                f"| {row.delivered:,} / {row.expected:,} "
                f"| {'ok' if row.in_order else row.out_of_order} | {ms(row.p99_us)} | {ms(row.max_us)} "
                f"| {cpu} | {row.loadgen_cpu / row.window if row.window else 0:.2f} | {verdict} |"
            )
    return "\n".join(lines)


def _cores(cpu_seconds: float, row: Row) -> str:
    return f"{cpu_seconds / row.window:.2f}" if row.window else "–"


def scaling_table(results: Sequence[W5Result]) -> str:
    """The W5 ceilings per WORKERS, in the shape of Centrifugo's benchmark tables."""
    lines = [
        "| Bridge processes (WORKERS) | Connections | Connections per process | Deliveries/s (zero loss) "
        "| p99 latency ms | KiB per connection | Bridge CPU cores | Load-gen cores |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for res in results:
        if res.target != "bridge":
            continue
        row = res.best
        if row is None:
            lines.append(f"| {res.workers} | – | – | none passed | – | – | – | – |")
            continue
        c = row.case
        rate = row.delivered / row.publish_seconds if row.publish_seconds else 0.0
        per = rss_per_conn_kib(row)
        lines.append(
            f"| {c.workers} | {row.connected:,} | {row.connected / c.workers:,.0f} | {rate:,.0f} "
            f"| {ms(row.p99_us)} | {f'{per:.1f}' if per is not None else '–'} "
            f"| {_cores(row.server_cpu, row)} | {_cores(row.loadgen_cpu, row)} |"
        )
    return "\n".join(lines)


# A W5 step is sustained only if the backlog stays small: past capacity, latency grows for
# the whole step, so a bound on p99 catches a rate that is delivered late but "without loss".
W5_P99_LIMIT_US = 1_000_000


def w5_pass(row: Row) -> bool:
    return (row.lossless and row.in_order and not row.timed_out and not row.errors
            and row.p99_us is not None and row.p99_us <= W5_P99_LIMIT_US)


def find(rows: Sequence[tuple[str, Row]], workload: str, target: str, transport: str = "websocket"
         ) -> Row | None:
    for _, r in rows:
        if r.case.workload == workload and r.case.target == target and r.case.transport == transport:
            return r
    return None


def target_check(rows: Sequence[tuple[str, Row]]) -> list[str]:
    """The issue's targets, as ratios to nats-server in the same run; one line each."""
    out: list[str] = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("**met**" if ok else "**not met**")

    b1, n1 = find(rows, "W1", "bridge"), find(rows, "W1", "nats")
    if b1 and n1 and b1.cpu_us_per_msg and n1.cpu_us_per_msg:
        ratio = b1.cpu_us_per_msg / n1.cpu_us_per_msg
        out.append(f"- W1 CPU per delivered message ≤ 0.5× nats-server: {b1.cpu_us_per_msg:.1f} vs "
                   f"{n1.cpu_us_per_msg:.1f} µs = {ratio:.2f}× — {verdict(ratio <= 0.5)}")
    b1d = next((r for label, r in rows if label.startswith("W1 FLUSH_DELAY")), None)
    if b1d and n1 and b1d.cpu_us_per_msg and n1.cpu_us_per_msg:
        ratio = b1d.cpu_us_per_msg / n1.cpu_us_per_msg
        p99 = ms(b1d.p99_us) if b1d.p99_us else "?"
        out.append(f"- the same with FLUSH_DELAY=0.05: {b1d.cpu_us_per_msg:.1f} vs "
                   f"{n1.cpu_us_per_msg:.1f} µs = {ratio:.2f}× — {verdict(ratio <= 0.5)}; p99 {p99} ms")
    s1 = find(rows, "W1", "bridge", "sse")
    if b1 and s1 and b1.cpu_us_per_msg and s1.cpu_us_per_msg:
        ratio = s1.cpu_us_per_msg / b1.cpu_us_per_msg
        out.append(f"- W1 over Server-Sent Events: CPU per delivered message ≤ 1.2× the WebSocket's: "
                   f"{s1.cpu_us_per_msg:.1f} vs {b1.cpu_us_per_msg:.1f} µs = {ratio:.2f}× — "
                   f"{verdict(ratio <= 1.2)}")
    if b1 and n1 and b1.p99_us is not None and n1.p99_us is not None:
        out.append(f"- W1 p99 ≤ nats-server's: {ms(b1.p99_us)} vs {ms(n1.p99_us)} ms — "
                   f"{verdict(b1.p99_us <= n1.p99_us)}")
    b2 = find(rows, "W2", "bridge")
    if b2 and b2.p99_us is not None:
        out.append(f"- W2 p99 ≤ 5 ms: {ms(b2.p99_us)} ms — {verdict(b2.p99_us <= 5000)}")
    bridge_rows = [(label, r) for label, r in rows if r.case.target == "bridge"]
    if bridge_rows:
        bad = [label for label, r in bridge_rows
               if not r.in_order or r.disconnected or (not r.lossless and not r.cut_off)]
        late = [label for label, r in bridge_rows if label not in bad and not r.lossless]
        line = "- Bridge loses nothing and keeps order in every workload: "
        if bad:
            line += f"{verdict(False)} ({', '.join(bad)})"
        elif late:
            line += (f"**not shown**: {', '.join(late)} still delivering (in order, nobody "
                     "disconnected) when the drain's time limit cut it off")
        else:
            line += verdict(True)
        out.append(line)
    b4 = find(rows, "W4", "bridge")
    if b4 and (per := rss_per_conn_kib(b4)) is not None:
        out.append(f"- W4 ≤ 10 KiB RSS per connection: {per:.1f} KiB — {verdict(per <= 10)}")
    return out


def nats_server_version() -> str:
    try:
        return subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError, RuntimeError):
        return "?"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def git_revision() -> str:
    from bench.servers import ROOT

    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine_lines(command: str, started: str, load_before: tuple[float, ...],
                  load_after: tuple[float, ...], duration: float, client: str) -> list[str]:
    return [
        f"- Date: {started} (took {duration:.0f} s)",
        f"- Command: `{command}` (bridge at git `{git_revision()}`)",
        f"- Machine: `nproc` = {os.cpu_count()} ({cpu_model()}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, {nats_server_version()}",
        f"- Load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in load_before)}, "
        f"at end {'/'.join(f'{x:.2f}' for x in load_after)}",
        f"- Load clients: `{client}` (WebSocket client implementation on event loop), "
        "in separate processes",
    ]


METHOD = """\
How to read it:

- Each row is a fresh nats-server (and, for *bridge*, a fresh `python main.py`) with
  load clients in separate processes (~500 clients per process, 1000 for W4) and one
  nats-py publisher process. *bridge* clients speak the bridge's
  protocol on `/stream` (in *W1 SSE*, they read `/events?subject=..` as Server-Sent Events
  instead); *nats* clients speak the NATS protocol over nats-server's own
  WebSocket listener (the reference).
- Messages are ~100-byte JSON with a sequence number and a `CLOCK_MONOTONIC` publish
  timestamp; latency is publish → receipt by the client process, so it includes the load
  client's own queueing when the CPU is saturated.
- *Delivered / expected* counts every (client, message) pair; *Order* counts receipts whose
  sequence number was not above the client's previous one.
- *CPU µs/msg* is the serving process's utime + stime (`/proc/PID/stat`, all threads) from the
  start of publishing to the last receipt, divided by delivered messages. It is far less
  sensitive to a busy machine than latency, but not immune: on a saturated machine work
  batches (more frames per write, fewer wakeups), so CPU/msg drops; compare rows of one run.
  The kernel counts in 10 ms ticks, so tiny runs are coarse. The notes give the kernel's
  share of it (socket writes) and, for *bridge*, the nats-server behind it.
- *Peak RSS* is the serving process's `VmHWM` (a fresh process per row, so the row's peak).
  W4 RSS/conn is (VmRSS once every client is subscribed − VmRSS before) / connections.
- *Load-gen cores* is the CPU the load clients and publisher used over the same window (in
  cores); *Other cores* is the rest of the machine's busy time (other processes, kernel
  networking not charged to a process). Everything shares the same cores, so when
  load-gen + server approach `nproc`, latency and ceilings measure the machine, not only the
  server.
- Publishing starts 0.5 s after the last client is subscribed, so that connection setup
  does not overlap the measurement. (The bridge confirms each new subscription with
  nats-server before it replies, so no message would be missed without the pause.)
- W5 raises the rate (×2 steps, then bisection) with W5's clients on one subject for a few
  seconds a step; a step passes if every client gets every message in order, nobody is
  disconnected, everything has arrived within 2 s of the end of publishing, and p99 latency
  is at most 1 s (past capacity the backlog, hence latency, grows all through the step).
  The table row shows the best passing step. With 1000 clients every message is 1000
  receipts for the load clients on the same 2 cores, so the ceiling is as much theirs as
  the server's: see its *Load-gen cores*.
"""


SCALING_NOTE = """\
The best rate each bridge configuration sustained with zero loss (W5: every step's rule),
as deliveries per second; *KiB per connection* is the bridge's RSS growth (all its
processes) over its connections at that step; *cores* are CPU seconds per second over the
step. The load clients run on the same cores as the bridge: a second worker process can
only take cores the load generator is not already using."""


def busy_warning(rows: Sequence[tuple[str, Row]]) -> str | None:
    """A sentence when the machine was doing other work during the run."""
    worst = max((other_cores(r) for _, r in rows), default=0.0)
    if worst < 0.25:
        return None
    return (f"**The machine was busy with other work during this run** (up to {worst:.1f} of "
            f"{os.cpu_count()} cores in *Other cores*): latencies and the W5 ceiling are pessimistic "
            "and noisy; CPU µs/msg is still comparable between rows.")


def render(header_lines: list[str], rows: Sequence[tuple[str, Row]], w5: Sequence[W5Result],
           errors: list[str], smoke: bool = False) -> str:
    parts = ["# Benchmark results", "", *header_lines, ""]
    if smoke:
        parts += ["**Smoke run**: a few clients for a second or two per workload, to check the "
                  "harness; the numbers mean nothing.", ""]
    if (warning := busy_warning(rows)) is not None:
        parts += [warning, ""]
    parts += [table(rows), ""]
    if w5:
        parts += ["## W5 ceiling by WORKERS", "", scaling_table(w5), "", SCALING_NOTE, ""]
        parts += ["## W5 ceiling search", "", w5_table(w5), ""]
    checks = target_check(rows)
    if checks:
        parts += ["## Targets", "", *checks, ""]
    if errors:
        parts += ["## Harness errors", "", *(f"- {e}" for e in errors), ""]
    remarks = [f"- {label} {r.case.target}: {e}" for label, r in rows for e in r.errors[:5]]
    if remarks:
        parts += ["## Remarks from the run", "", *remarks, ""]
    parts += ["## Method", "", METHOD]
    return "\n".join(parts)
