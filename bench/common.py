"""Small helpers shared by the orchestrator and its child processes."""

from __future__ import annotations

import os
import resource
import socket
import time

# Latency histogram: exact below 128 µs, then 64 buckets per power of two
# (≤ 1.6 % error).  Clients bin every receipt in O(1) with integer ops, so
# merging millions of receipts from several processes stays cheap.
HIST_SIZE = 128 + 48 * 64


def lat_bucket(us: int) -> int:
    """Histogram index of a latency in µs (the load clients inline this)."""
    if us < 128:
        return us if us > 0 else 0
    b = us.bit_length()
    return 128 + (b - 8) * 64 + ((us >> (b - 7)) & 63)


def bucket_value(index: int) -> int:
    """Representative value (µs, the bucket's midpoint) of a histogram index."""
    if index < 128:
        return index
    b = (index - 128) // 64 + 8
    m = 64 + (index - 128) % 64
    low = m << (b - 7)
    high = ((m + 1) << (b - 7)) - 1
    return (low + high) // 2


def percentile(hist: list[int], q: float) -> int | None:
    """The q-quantile (0..1) of a merged histogram, in µs; None if empty."""
    total = sum(hist)
    if total == 0:
        return None
    rank = max(1, int(q * total + 0.999999))
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= rank:
            return bucket_value(i)
    return bucket_value(len(hist) - 1)


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def own_cpu() -> float:
    """CPU seconds (user + system) this process has used so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def own_sys_cpu() -> float:
    """System CPU seconds this process has used so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, alive: object = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():  # type: ignore[operator]
            raise RuntimeError(f"process exited before listening on 127.0.0.1:{port}")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout:g}s")


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds, from /proc/PID/stat."""
    return sum(proc_cpu_split(pid))


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid`` (all its threads) in seconds, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int:
    """A ``kB`` value (VmRSS, VmHWM, ...) from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a WORKERS=N bridge is a supervisor and N workers)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            with open(f"/proc/{current}/task/{current}/children") as f:
                todo.extend(int(child) for child in f.read().split())
        except OSError:
            pass
    return pids


def tree_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) summed over ``pid`` and its descendants, in seconds."""
    user = system = 0.0
    for member in process_tree(pid):
        try:
            u, s = proc_cpu_split(member)
        except OSError:
            continue  # it exited meanwhile
        user, system = user + u, system + s
    return user, system


def tree_status_kib(pid: int, key: str) -> int:
    """A /proc status ``kB`` value summed over ``pid`` and its descendants (each process's own,
    so summed VmHWM is each one's peak added up, not the peak of the sum)."""
    total = 0
    for member in process_tree(pid):
        try:
            total += proc_status_kib(member, key)
        except (OSError, KeyError):
            continue
    return total
