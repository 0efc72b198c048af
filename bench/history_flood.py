"""History of large messages, asked for over and over, beside a client that must lose nothing.

    .venv/bin/python bench/history_flood.py                 # 20 readers, 30 s
    .venv/bin/python bench/history_flood.py --seconds 10    # quicker

A file stream holds 1000 messages of 60 KB.  Twenty WebSocket clients loop
``{"last": 1000}`` on it (subscribe with history, read it all, unsubscribe,
again), while a publisher sends 100 small messages a second on a core NATS
subject that one more client follows.  Reported: how many of those the
healthy client lost, how often the bridge's NATS link was cut (nats-server
drops a connection that cannot keep up: "Slow Consumer Detected"), the
bridge's memory (RSS) before, at its peak and 10 s after, the history
messages delivered, and the JetStream API calls per history request.

``--bridge DIR`` runs the bridge of another checkout (to compare before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import nats

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import free_port  # noqa: E402
from bench.servers import NatsServer  # noqa: E402

PAYLOAD = 60 * 1024


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def fill(url: str, messages: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="BIG", subjects=["big.>"])
    pad = "x" * PAYLOAD
    for i in range(messages):
        await js.publish("big.data", json.dumps({"i": i, "pad": pad}).encode())
    await nc.close()


async def reader(ws_url: str, stop: float, counts: dict[str, int]) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        await ws.receive()
        while time.monotonic() < stop:
            await ws.send_str(json.dumps({"subjects": ["big.data"], "history": {"last": 1000}}))
            announced, got = None, 0
            while announced is None or got < announced:
                msg = await asyncio.wait_for(ws.receive(), 120)
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    counts["closed"] += 1
                    return
                frame = json.loads(msg.data)
                if frame.get("type") == "reply" and frame.get("action") == "subscribe":
                    if not frame["success"]:
                        counts["refused"] += 1
                        announced = 0
                        if "broke off" not in frame["message"]:
                            await asyncio.sleep(0.5)
                        break
                    announced = frame["streams"]["big.data"]["history"]
                elif frame.get("history"):
                    got += 1
            counts["history"] += got
            counts["requests"] += 1
            await ws.send_str(json.dumps({"action": "unsubscribe", "subjects": ["big.data"]}))


async def healthy(ws_url: str, nats_url: str, seconds: float) -> tuple[int, int]:
    """(published, received) on a core subject at 100 messages a second."""
    nc = await nats.connect(nats_url)
    received = 0
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:
        await ws.receive()
        await ws.send_str(json.dumps({"subjects": ["core.tick"]}))
        while json.loads((await ws.receive()).data).get("type") != "reply":
            pass

        async def read() -> None:
            nonlocal received
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT and '"core.tick"' in msg.data:
                    received += 1

        task = asyncio.create_task(read())
        published = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await nc.publish("core.tick", json.dumps({"n": published}).encode())
            published += 1
            await asyncio.sleep(0.01)
        await nc.flush()
        await asyncio.sleep(3)
        task.cancel()
    await nc.close()
    return published, received


async def run(args: argparse.Namespace, bridge_port: int, nats_url: str, pid: int) -> dict[str, float]:
    ws_url = f"ws://127.0.0.1:{bridge_port}/stream"
    counts = {"history": 0, "requests": 0, "refused": 0, "closed": 0}
    peak = rss_mib(pid)
    stop = time.monotonic() + args.seconds

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mib(pid))
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    api_before = await count_api(nats_url, None)
    results = await asyncio.gather(healthy(ws_url, nats_url, args.seconds),
                                   *(reader(ws_url, stop, counts) for _ in range(args.readers)),
                                   return_exceptions=True)
    published, received = results[0] if isinstance(results[0], tuple) else (0, 0)
    api_calls = await count_api(nats_url, api_before)
    await asyncio.sleep(10)
    watcher.cancel()
    for r in results:
        if isinstance(r, BaseException):
            print(f"client error: {r!r}")
    return {"published": published, "received": received, "peak": peak, "after": rss_mib(pid),
            **counts, "api": api_calls, "errors": sum(isinstance(r, BaseException) for r in results)}


async def count_api(nats_url: str, before: float | None) -> float:
    """JetStream API requests the server has handled (its own count, /jsz), or the change since ``before``."""
    del nats_url
    total = float(_jsz()["api"]["total"])
    return total if before is None else total - before


_MONITOR: list[int] = []


def _jsz() -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{_MONITOR[0]}/jsz", timeout=5) as resp:
        return json.load(resp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/history_flood.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--readers", type=int, default=20)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--bridge", type=Path, default=ROOT, help="checkout whose main.py to run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp:
        server = NatsServer(Path(tmp), "flood", jetstream=True).start()
        _MONITOR.append(server.monitor_port)
        port = free_port()
        bridge = None
        try:
            asyncio.run(fill(server.url, args.messages))
            log = open(Path(tmp) / "bridge.log", "wb")
            bridge = subprocess.Popen(
                [sys.executable, str(args.bridge / "main.py"), "--nats-url", server.url, "--http-host",
                 "127.0.0.1", "--http-port", str(port), "--test-publish-interval", "0",
                 "--log-level", "WARNING"],
                cwd=args.bridge, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            before = rss_mib(bridge.pid)
            result = asyncio.run(run(args, port, server.url, bridge.pid))
            reconnects = metric(port, "bridge_nats_reconnects_total")
        finally:
            if bridge is not None:
                bridge.terminate()
                bridge.wait(15)
            server.stop()
    lost = result["published"] - result["received"]
    per_request = result["api"] / max(1, result["requests"] + result["refused"])
    print(f"bridge: {args.bridge}")
    print(f"healthy client: {int(result['received'])} of {int(result['published'])} received, "
          f"{int(lost)} lost")
    print(f"NATS link reconnects: {int(reconnects)}")
    print(f"RSS MiB: before {before:.0f}, peak {result['peak']:.0f}, 10 s after {result['after']:.0f}")
    print(f"history: {int(result['requests'])} requests served, {int(result['history'])} messages, "
          f"{int(result['refused'])} refused or broken off, {int(result['closed'])} connections closed, "
          f"{int(result['errors'])} client errors")
    print(f"JetStream API calls: {int(result['api'])} ({per_request:.1f} per history request)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
