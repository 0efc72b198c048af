"""The benchmark harness still works: `bench/run.py --smoke` runs every workload for a
few seconds against the bridge and nats-server and prints its table.

A benchmark is not a test: nothing here asserts a timing, a rate or a latency, only
that the harness ran, delivered something in every case and reported it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 85  # seconds; the smoke usually takes ~25 s on 2 busy cores


@pytest.mark.timeout(TIMEOUT + 15)
def test_bench_smoke_runs_and_prints_a_table(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--out", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"bench/run.py --smoke did not finish in {TIMEOUT}s:\n{exc.stdout}\n{exc.stderr}")
    report = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, report

    # The table: one row per workload and target, each with "delivered / expected".
    rows = [line for line in proc.stdout.splitlines() if re.match(r"\| W[1-5]", line)]
    labels = {(row.split("|")[1].strip().split()[0], row.split("|")[2].strip()) for row in rows}
    for workload in ("W1", "W2", "W3", "W4"):
        assert (workload, "bridge") in labels, report
        assert (workload, "nats") in labels, report
    assert ("W5", "bridge") in labels, report
    assert any("stored" in row for row in rows), report  # W1 on a JetStream-stored subject
    assert any(row.startswith("| W1 SSE |") for row in rows), report  # W1 over Server-Sent Events
    for row in rows:
        delivered = re.search(r"\| ([\d,]+) / ([\d,]+)", row)
        assert delivered, row
        assert int(delivered.group(1).replace(",", "")) > 0, row

    text = out.read_text()
    assert "nproc" in text and "--smoke" in text, text
    assert "| Workload |" in text, text


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 15)
def test_bench_requests_smoke_runs_and_prints_a_table(tmp_path: Path) -> None:
    """bench/requests.py --smoke: request/reply through the bridge and through nats-server, and a ceiling."""
    out = tmp_path / "RESULTS-requests.md"
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "requests.py"), "--smoke", "--out", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"bench/requests.py --smoke did not finish in {TIMEOUT}s:\n{exc.stdout}\n{exc.stderr}")
    report = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, report
    text = out.read_text()
    totals = re.findall(r"^\| (bridge|nats) \(1 round\) \| \d+ \| [\d,]+ \| ([\d,]+) / ([\d,]+) \|", text,
                        re.M)
    assert {t for t, _, _ in totals} == {"bridge", "nats"}, report
    assert all(int(ok.replace(",", "")) > 0 for _, ok, _ in totals), report
    assert "Ceiling, one worker:" in text and "nproc" in text, report
