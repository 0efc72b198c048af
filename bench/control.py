"""What the control plane costs: latency of a control command with 1 and 2 bridge instances.

    .venv/bin/python bench/control.py                 # 300 commands per case (about a minute)
    .venv/bin/python bench/control.py --count 50      # quicker

Starts its own nats-server and one, then two ``python main.py`` bridges (JWT on, so
there are users), holds a connection for user ``alice`` on each bridge, and times
HTTP commands sent one after another to the first bridge, on a kept-alive connection:

- *connection here*: ``POST /clients/{id}`` for a connection on the bridge that gets
  the call (ids are unique: served without NATS);
- *connection on the other instance*: the same for a connection on the second bridge
  (a fan-out; the answer comes when its holder answers);
- *unknown connection*: a 404 (every known instance must answer first);
- *user*: ``POST /users/alice`` (every instance answers with its connections);
- *NATS request*: the same user command as a NATS request on ``bridge.control.users.request``
  (one instance takes it from the queue group, gathers, answers).

Latency is from sending the request to the whole answer, in the client.  Writes a
Markdown table to stdout and to ``--out`` (default bench/out/CONTROL.md).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import jwt
import nats

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.servers import BridgeProcess, NatsServer  # noqa: E402

SECRET = "bench-control-secret-of-at-least-32-bytes"
CONTROL = "bench-backend"
BODY = {"action": "subscribe", "subjects": ["bench.control"]}


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


async def timed(count: int, call) -> list[float]:  # type: ignore[no-untyped-def]
    for _ in range(10):  # warm up: connections, NATS subscriptions
        await call()
    out = []
    for _ in range(count):
        start = time.perf_counter()
        await call()
        out.append((time.perf_counter() - start) * 1000)
    return out


async def measure(bridges: list[BridgeProcess], nats_url: str, count: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    headers = {"Authorization": f"Bearer {CONTROL}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        sockets = []
        for bridge in bridges:
            alice = {"Authorization": f"Bearer {token('alice')}"}
            ws = await session.ws_connect(bridge.ws_url, headers=alice)
            sockets.append((ws, json.loads((await ws.receive(timeout=10)).data)["connection_id"]))
        drain = [asyncio.create_task(_discard(ws)) for ws, _ in sockets]
        first = bridges[0].ws_url.replace("ws://", "http://").removesuffix("/stream")

        def post(path: str, expect: int):  # type: ignore[no-untyped-def]
            async def call() -> None:
                async with session.post(first + path, json=BODY) as resp:
                    await resp.read()
                    assert resp.status == expect, (path, resp.status)
            return call

        results["connection here"] = await timed(count, post(f"/clients/{sockets[0][1]}", 200))
        if len(bridges) > 1:
            other = post(f"/clients/{sockets[1][1]}", 200)
            results["connection on the other instance"] = await timed(count, other)
        results["unknown connection (404)"] = await timed(count, post("/clients/AAAAAAAAAAAAAAAAAAAAAA", 404))
        results["user (every instance)"] = await timed(count, post("/users/alice", 200))
        nc = await nats.connect(nats_url)
        body = json.dumps({"key": "alice", "body": BODY}).encode()

        async def nats_request() -> None:
            answer = json.loads((await nc.request("bridge.control.users.request", body, timeout=5)).data)
            assert answer["status"] == 200, answer

        results["user, as a NATS request"] = await timed(count, nats_request)
        await nc.close()
        for task in drain:
            task.cancel()
        for ws, _ in sockets:
            await ws.close()
    return results


async def _discard(ws: aiohttp.ClientWebSocketResponse) -> None:
    async for _ in ws:
        pass


def run(instances: int, count: int, workdir: Path) -> dict[str, list[float]]:
    server = NatsServer(workdir, f"control-{instances}").start()
    env = {"JWT_SECRET": SECRET, "CONTROL_TOKENS": CONTROL, "SUBJECT_ALLOW": ">", "LOG_LEVEL": "WARNING"}
    bridges: list[BridgeProcess] = []
    try:
        for i in range(instances):
            bridges.append(BridgeProcess(workdir, f"control-{instances}-{i}", server.url, [], env).start())
        time.sleep(1.5)  # every instance has heard the others announce themselves
        return asyncio.run(measure(bridges, server.url, count))
    finally:
        for bridge in bridges:
            bridge.stop()
        server.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/control.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=300, help="commands timed per case (default 300)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "CONTROL.md")
    args = p.parse_args(argv)
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="control-") as tmp:
        by_instances = {n: run(n, args.count, Path(tmp)) for n in (1, 2)}
    lines = [
        f"Command: `{shlex.join([os.path.relpath(sys.executable), *sys.argv])}`, {started}, "
        f"`nproc` = {os.cpu_count()}, load average at start {load[0]:.2f}; {args.count} commands per case.",
        "",
        "| Command | Instances | p50 ms | p99 ms | mean ms |",
        "|---|--:|--:|--:|--:|",
    ]
    for n, results in by_instances.items():
        for case, values in results.items():
            lines.append(f"| {case} | {n} | {statistics.median(values):.2f} | {percentile(values, 0.99):.2f} "
                         f"| {statistics.fmean(values):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
