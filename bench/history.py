"""How long "last 100" takes on a large stream: the bridge must not read the stream to find them.

    .venv/bin/python bench/history.py                    # 1,000,000 messages (a minute or two)
    .venv/bin/python bench/history.py --messages 20000   # quicker

Stores N messages of ~100 bytes in a file stream over 1000 subjects
(``hist.0`` .. ``hist.999``), starts the bridge, then times, from the subscribe
frame to the 100th stored message received: ``{"last": 100}`` on the wildcard
``hist.>`` (the newest 100 of the whole stream) and on ``hist.7`` (one subject
in a thousand: its newest 100 are spread over the last ~100,000 sequences).
Each is repeated; the median, best and worst are printed and written to
bench/RESULTS-history.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import nats

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.servers import BridgeProcess, NatsServer  # noqa: E402

SUBJECTS = 1000


async def fill(url: str, messages: int) -> float:
    """Publish ``messages`` into a fresh stream; seconds until the stream holds them all."""
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    js = nc.jetstream()
    await js.add_stream(name="HIST", subjects=["hist.>"])
    start = time.monotonic()
    pad = b"x" * 80
    for i in range(messages):
        await nc.publish(f"hist.{i % SUBJECTS}", b'{"i":%d,"pad":"%s"}' % (i, pad))
        if i % 5000 == 4999:
            await nc.flush(timeout=60)
    await nc.flush(timeout=60)
    for _ in range(600):  # JetStream stores asynchronously: wait (at most two minutes) until it holds all
        if (await js.stream_info("HIST")).state.messages >= messages:
            break
        await asyncio.sleep(0.2)
    seconds = time.monotonic() - start
    await nc.close()
    return seconds


async def time_last(ws_url: str, subject: str, n: int) -> float:
    """Seconds from the subscribe frame to the last stored message the reply announced."""
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:
        await ws.receive()  # welcome
        start = time.monotonic()
        await ws.send_str(json.dumps({"subjects": [subject], "history": {"last": n}}))
        got, announced = 0, None
        while announced is None or got < announced:
            frame = json.loads((await asyncio.wait_for(ws.receive(), 60)).data)
            if frame.get("type") == "reply":
                if not frame["success"]:
                    raise RuntimeError(frame["message"])
                announced = frame["streams"][subject]["history"]
            got += bool(frame.get("history"))
        return time.monotonic() - start


async def measure(ws_url: str, repeats: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    for subject in ("hist.>", "hist.7"):
        results[subject] = [await time_last(ws_url, subject, 100) for _ in range(repeats)]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/history.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS-history.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
        workdir = Path(tmp)
        server = NatsServer(workdir, "history", jetstream=True).start()
        bridge = None
        try:
            print(f"bench: storing {args.messages:,} messages ...", flush=True)
            filled = asyncio.run(fill(server.url, args.messages))
            print(f"bench: stored in {filled:.1f} s; timing last 100 ...", flush=True)
            bridge = BridgeProcess(workdir, "history", server.url, ["--log-level", "WARNING"]).start()
            results = asyncio.run(measure(bridge.ws_url, args.repeats))
        finally:
            if bridge is not None:
                bridge.stop()
            server.stop()
    lines = [
        f"`{' '.join(['.venv/bin/python', 'bench/history.py', *sys.argv[1:]])}` on "
        f"{time.strftime('%Y-%m-%d')}: a file stream of {args.messages:,} messages over {SUBJECTS} "
        f"subjects; time from the subscribe frame to the last stored message announced (100), "
        f"{args.repeats} runs each.",
        "",
        "| Subscribe | history | median ms | best ms | worst ms |",
        "|---|---|--:|--:|--:|",
    ]
    for subject, times in results.items():
        ms = [t * 1000 for t in times]
        lines.append(f"| `{subject}` | `{{\"last\": 100}}` | {statistics.median(ms):.1f} | {min(ms):.1f} | "
                     f"{max(ms):.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)
    print(f"bench: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
