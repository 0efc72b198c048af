"""Every setting of the bridge, in one place.

Each setting is an env var and a ``python main.py`` flag; a flag wins over the
env var, which wins over the default.  ``python main.py --help`` and the README's
settings table are both made from this table.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from bridge.core.permissions import (
    DEFAULT_CONTROL_SUBJECT,
    DEFAULT_DENY,
    SUB_TEMPLATE,
    SubjectPolicy,
    template_error,
)
from bridge.core.redaction import redact
from bridge.core.subjects import subject_error

TEST_SUBJECT = "test.subject"

OVERFLOW_DISCONNECT = "disconnect"
OVERFLOW_DROP_OLDEST = "drop_oldest"


@dataclass(frozen=True)
class Limits:
    """Per-client limits, as the connection and the manager use them (from Config.limits)."""

    queue_messages: int = 10_000
    queue_bytes: int = 8 * 1024 * 1024
    overflow: str = OVERFLOW_DISCONNECT
    max_subject_length: int = 256
    max_subscriptions: int = 100
    max_subjects_per_request: int = 50
    control_rate: float = 20.0
    # Rejected frames (leaking one per second) before a flooding client is closed.
    control_strikes: int = 10
    max_publish_bytes: int = 64 * 1024
    close_timeout: float = 5.0
    flush_delay: float = 0.0
    max_frame_bytes: int = 64 * 1024
    ping_interval: float = 20.0
    pong_timeout: float = 10.0
    max_history: int = 1000
    max_stored_subjects: int = 20
    max_stored_subjects_per_user: int = 100
    max_jetstream_consumers: int = 500
    request_timeout: float = 10.0
    max_pending_requests: int = 16


class ConfigError(ValueError):
    """A setting has a value we cannot use; reported as one line, no traceback."""


# Exit codes, the same for every way a start can fail (an orchestrator tells them apart):
# 2, a bad setting: the operator must change it, and restarting as configured cannot help
# (argparse's own code for bad arguments); 1, a runtime failure: what was configured is
# fine but not there now (NATS down, a port taken, keys not fetchable), and a restart may work.
EXIT_BAD_SETTING = 2
EXIT_RUNTIME = 1


class StartupError(RuntimeError):
    """The service cannot start (NATS unreachable, a key unusable); the message is the one line shown.

    ``exit_code``: EXIT_RUNTIME unless the cause is a setting's value (EXIT_BAD_SETTING).
    """

    def __init__(self, message: str, exit_code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- parsers: text in, value out; on bad input ValueError("expected ...") ------


def _number(text: str, kind: type[int] | type[float], expected: str) -> float:
    try:
        return kind(text.strip())
    except ValueError:
        raise ValueError(expected) from None


def _port(text: str) -> int:
    expected = "expected an integer port 1-65535"
    value = int(_number(text, int, expected))
    if not 1 <= value <= 65535:
        raise ValueError(expected)
    return value


def _seconds(text: str) -> float:
    expected = "expected a number of seconds >= 0, like 1 or 0.5"
    value = _number(text, float, expected)
    if not 0 <= value < float("inf"):
        raise ValueError(expected)
    return value


def _positive_seconds(text: str) -> float:
    expected = "expected a number of seconds > 0, like 1 or 0.5"
    value = _number(text, float, expected)
    if not 0 < value < float("inf"):
        raise ValueError(expected)
    return value


def _count(text: str) -> int:
    expected = "expected a whole number >= 1"
    value = int(_number(text, int, expected))
    if value < 1:
        raise ValueError(expected)
    return value


def _rate(text: str) -> float:
    expected = "expected a number > 0, like 20 or 0.5"
    value = _number(text, float, expected)
    if not 0 < value < float("inf"):
        raise ValueError(expected)
    return value


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("expected a non-empty value")
    return text.strip()


def _list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _patterns(text: str) -> tuple[str, ...]:
    patterns = _list(text)
    for pattern in patterns:
        if SUB_TEMPLATE in pattern:
            raise ValueError(f"expected comma-separated NATS subject patterns ({SUB_TEMPLATE} is only "
                             "allowed in SUBJECT_ALLOW and PUBLISH_ALLOW)")
        _template_patterns(pattern)
    return patterns


def _template_patterns(text: str) -> tuple[str, ...]:
    patterns = _list(text)
    for pattern in patterns:
        error = template_error(pattern)
        if error:
            raise ValueError(f"expected comma-separated NATS subject patterns like orders.*,user.{{sub}}.>; "
                             f"{error}")
    return patterns


def _protected_patterns(text: str) -> tuple[str, ...]:
    """Built-in protected patterns, each spelled exactly: a near miss (``$JS.API.>``) is an error,
    not a silent no-op that leaves the operator believing something was opened, or closed."""
    patterns = _list(text)
    for pattern in patterns:
        if pattern not in DEFAULT_DENY:
            raise ValueError(f"expected built-in protected patterns, comma-separated, each exactly one of "
                             f"{','.join(DEFAULT_DENY)}; {pattern!r} is not one")
    return patterns


def _secret(text: str) -> str:
    if len(text.encode()) < 32:
        raise ValueError("expected an HMAC secret of at least 32 bytes (256 bits)")
    return text


def _file(text: str) -> str:
    path = os.path.expanduser(text.strip())
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError("expected the path of a readable file")
    return path


def _file_or_https(text: str) -> str:
    if "://" in text:
        parts = urlsplit(text.strip())
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError("expected a file path or an https:// URL (keys fetched over plain http "
                             "could be swapped on the way)")
        return text.strip()
    return _file(text)


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        # The cores this process may run on (taskset, cpusets), not every core of the host.
        return len(os.sched_getaffinity(0))
    expected = "expected a whole number >= 1, or auto (one per core)"
    value = int(_number(text, int, expected))
    if value < 1:
        raise ValueError(expected)
    return value


def _presence_ttl(text: str) -> float:
    # Whole seconds: JetStream's per-message TTL counts in them, and a lease lives one second
    # less than this so that a dead process's leaves are sent within it (docs/presence.md).
    expected = "expected a whole number of seconds >= 3, like 15"
    value = _number(text, float, expected)
    if not value.is_integer() or not 3 <= value <= 86_400:
        raise ValueError(expected)
    return value


def _concrete_subject(text: str) -> str:
    error = subject_error(text.strip(), 200, wildcards=False)
    if error:
        raise ValueError(f"expected a NATS subject without wildcards, like {DEFAULT_CONTROL_SUBJECT}; "
                         f"{error}")
    return text.strip()


def _optional_text(text: str) -> str:
    return text.strip()


def _stream_spec(text: str) -> str:
    """NAME:subject,subject (empty: none)."""
    text = text.strip()
    if not text:
        return ""
    name, _, subjects = text.partition(":")
    expected = "expected NAME:subject,subject, e.g. DEMO:test.subject,demo.>"
    if not name or any(c in name for c in ".*> \t/\\") or not _list(subjects):
        raise ValueError(expected)
    for subject in _list(subjects):
        error = template_error(subject) if SUB_TEMPLATE not in subject else "templates are not allowed"
        if error:
            raise ValueError(f"{expected}; {error}")
    return text


_HOST_PATTERN = re.compile(r"\*|[a-z0-9_*-]+(\.[a-z0-9_*-]+)*")
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*\.?")


def _bind_host(text: str) -> str:
    """An IP address or a host name to bind.  Checked here because a malformed name
    (``a..b``, a 64-character label) fails inside getaddrinfo's IDNA step with a traceback."""
    host = text.strip()
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if len(host) > 253 or not _HOST_NAME.fullmatch(host):
        raise ValueError("expected an IP address or a host name, like 0.0.0.0, :: or localhost")
    return host


def _hosts(text: str) -> tuple[str, ...]:
    hosts = tuple(host.lower().rstrip(".") for host in _list(text))
    for host in hosts:
        if not _HOST_PATTERN.fullmatch(host):
            raise ValueError(f"expected host names, comma-separated, like bridge.example.com,*.example.com "
                             f"(no scheme, port or path); {host!r} is not one")
    return hosts


def _nats_urls(text: str) -> str:
    urls = _list(text)
    expected = "expected NATS server URLs, comma-separated, like nats://127.0.0.1:4222"
    if not urls:
        raise ValueError(expected)
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
            raise ValueError(f"{expected} (scheme nats, tls, ws or wss); {url!r} is not one")
    return ",".join(urls)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _log_level(text: str) -> str:
    return _choice("debug", "info", "warning", "error", "critical")(text).upper()


# The sections of the settings, in --help's order: each setting names its own (its
# ``group``), so the one table still feeds flags, env vars, --help and the README.
GROUP_NATS = "NATS"
GROUP_HTTP = "HTTP"
GROUP_WHO = "who may connect"
GROUP_WHAT = "what they may do"
GROUP_HISTORY = "history (JetStream)"
GROUP_SLOW = "slow clients"
GROUP_SCALE = "beyond one process"
GROUP_PRESENCE = "presence"
GROUP_LOGS = "logs"


def opt(default: Any, env: str, parse: Callable[[str], Any], help: str, secret: bool = False, *,
        group: str) -> Any:
    return field(default=default,
                 metadata={"env": env, "parse": parse, "help": help, "secret": secret, "group": group})


@dataclass(frozen=True)
class Config:
    # NATS
    nats_url: str = opt(
        "nats://127.0.0.1:4222",
        "NATS_URL",
        _nats_urls,
        "NATS server URLs, comma-separated; the bridge fails over between them",
        group=GROUP_NATS,
    )
    nats_connect_timeout: float = opt(
        30.0,
        "NATS_CONNECT_TIMEOUT",
        _positive_seconds,
        "seconds to keep trying to reach NATS at start before giving up",
        group=GROUP_NATS,
    )
    nats_reconnect_wait: float = opt(
        1.0,
        "NATS_RECONNECT_WAIT",
        _positive_seconds,
        "seconds between attempts to (re)connect to a NATS server",
        group=GROUP_NATS,
    )
    service_name: str = opt(
        "async_NATS_WSS_bridge",
        "SERVICE_NAME",
        _text,
        "Panini service name; the NATS client name starts with it",
        group=GROUP_NATS,
    )
    # HTTP
    http_host: str = opt(
        "0.0.0.0", "HTTP_HOST", _bind_host, "address the HTTP server binds",
        group=GROUP_HTTP,
    )
    http_port: int = opt(
        5001, "HTTP_PORT", _port, "port of the page, /stream and the HTTP API",
        group=GROUP_HTTP,
    )
    test_publish_interval: float = opt(
        1.0,
        "TEST_PUBLISH_INTERVAL",
        _seconds,
        f"seconds between test messages on {TEST_SUBJECT}; 0 turns it off",
        group=GROUP_HTTP,
    )
    # Who may connect
    allowed_origins: tuple[str, ...] = opt(
        (),
        "ALLOWED_ORIGINS",
        _list,
        "extra browser Origins allowed, comma-separated, wildcards "
        "like https://*.example.com; '*' allows any. Same-origin "
        "and Origin-less clients are always allowed",
        group=GROUP_WHO,
    )
    allowed_hosts: tuple[str, ...] = opt(
        (),
        "ALLOWED_HOSTS",
        _hosts,
        "host names the bridge answers to without AUTH_TOKENS or JWT, comma-separated, wildcards like "
        "*.example.com; '*' allows any. IP addresses and localhost always work; other Host headers get "
        "421 (stops DNS rebinding). With AUTH_TOKENS or JWT any Host is served",
        group=GROUP_WHO,
    )
    auth_tokens: tuple[str, ...] = opt(
        (),
        "AUTH_TOKENS",
        _list,
        "tokens clients must present (Bearer header, ?token= or "
        "bridge_token cookie), comma-separated; empty: no auth",
        group=GROUP_WHO,
    )
    jwt_secret: str = opt(
        "", "JWT_SECRET", _secret,
        "HMAC key for HS256/384/512 connection tokens (at least 32 bytes); any JWT_* key set "
        "means every connection needs a valid JWT", secret=True,
        group=GROUP_WHO,
    )
    jwt_public_key: str = opt(
        "", "JWT_PUBLIC_KEY", _file,
        "path of a PEM public key (RSA: RS/PS*, EC: ES*, Ed25519/Ed448: EdDSA) for connection tokens",
        group=GROUP_WHO,
    )
    jwt_jwks: str = opt(
        "", "JWT_JWKS", _file_or_https,
        "path of a JWKS file, or an https URL fetched at start and refreshed; the token's kid picks the key",
        group=GROUP_WHO,
    )
    jwt_jwks_refresh: float = opt(
        300.0, "JWT_JWKS_REFRESH", _positive_seconds,
        "seconds between re-reads of JWT_JWKS (a token with an unknown kid also triggers one)",
        group=GROUP_WHO,
    )
    jwt_audience: str = opt(
        "", "JWT_AUDIENCE", _optional_text, "required aud of connection tokens",
        group=GROUP_WHO,
    )
    jwt_issuer: str = opt(
        "", "JWT_ISSUER", _optional_text, "required iss of connection tokens",
        group=GROUP_WHO,
    )
    jwt_leeway: float = opt(
        0.0, "JWT_LEEWAY", _seconds, "seconds of clock skew allowed for exp and nbf",
        group=GROUP_WHO,
    )
    jwt_refresh_lead: float = opt(
        30.0, "JWT_REFRESH_LEAD", _seconds,
        "seconds before a token's exp that the client is sent token_expiring",
        group=GROUP_WHO,
    )
    control_tokens: tuple[str, ...] = opt(
        (), "CONTROL_TOKENS", _list,
        "backend credentials for the control API (Bearer), comma-separated; required for it "
        "when AUTH_TOKENS or JWT is set", secret=True,
        group=GROUP_WHO,
    )
    max_connections: int = opt(
        10_000, "MAX_CONNECTIONS", _count, "open WebSockets per process; more are refused with HTTP 503",
        group=GROUP_WHO,
    )
    max_connections_per_user: int = opt(
        50, "MAX_CONNECTIONS_PER_USER", _count,
        "open WebSockets one user (the JWT's sub) may hold, counted per process (with WORKERS=N, up to N "
        "times this on a host); more are refused with HTTP 429",
        group=GROUP_WHO,
    )
    # What they may do
    subject_allow: tuple[str, ...] = opt(
        (">",), "SUBJECT_ALLOW", _template_patterns,
        "subject patterns clients may subscribe within; {sub} stands for the token's sub",
        group=GROUP_WHAT,
    )
    subject_deny: tuple[str, ...] = opt(
        (), "SUBJECT_DENY", _patterns,
        "subject patterns never forwarded, even through wildcards, on top of the built-in protected ones "
        f"({','.join(DEFAULT_DENY)}), which always apply",
        group=GROUP_WHAT,
    )
    dangerously_unprotect_subjects: tuple[str, ...] = opt(
        (), "DANGEROUSLY_UNPROTECT_SUBJECTS", _protected_patterns,
        "built-in protected patterns to open to browsers (within SUBJECT_ALLOW and PUBLISH_ALLOW), "
        "comma-separated, each spelled exactly as listed under SUBJECT_DENY; logged as a warning at start. "
        "$JS.> opens JetStream's API (deleting streams), _INBOX.> every app's replies",
        group=GROUP_WHAT,
    )
    publish_allow: tuple[str, ...] = opt(
        (), "PUBLISH_ALLOW", _template_patterns,
        "subject patterns clients may publish to ({sub}: the token's sub); empty: publish off",
        group=GROUP_WHAT,
    )
    max_publish_bytes: int = opt(
        64 * 1024, "MAX_PUBLISH_BYTES", _count, "largest payload a client may publish",
        group=GROUP_WHAT,
    )
    request_timeout: float = opt(
        10.0, "REQUEST_TIMEOUT", _positive_seconds,
        "seconds a client's NATS request waits for its answer by default, and at most (a request may "
        "ask for less); then it is answered timeout",
        group=GROUP_WHAT,
    )
    max_pending_requests: int = opt(
        16, "MAX_PENDING_REQUESTS", _count,
        "NATS requests one client may have waiting for their answers at once; more are answered "
        "too_many_requests",
        group=GROUP_WHAT,
    )
    max_subscriptions: int = opt(
        100, "MAX_SUBSCRIPTIONS", _count, "subjects one client may follow at once",
        group=GROUP_WHAT,
    )
    max_subjects_per_request: int = opt(
        50, "MAX_SUBJECTS_PER_REQUEST", _count, "subjects in one subscribe/unsubscribe request",
        group=GROUP_WHAT,
    )
    max_subject_length: int = opt(
        256, "MAX_SUBJECT_LENGTH", _count, "longest subject accepted, in bytes",
        group=GROUP_WHAT,
    )
    max_frame_bytes: int = opt(
        64 * 1024,
        "MAX_FRAME_BYTES",
        _count,
        "largest control frame from a client; larger ones close it with 1009",
        group=GROUP_WHAT,
    )
    control_rate: float = opt(
        20.0,
        "CONTROL_RATE",
        _rate,
        "control frames per second per client, WebSocket pings and pongs included (burst of the same "
        "size); over it: error replies (no pong), then close 1008 if it goes on",
        group=GROUP_WHAT,
    )
    # History (JetStream)
    max_history: int = opt(
        1000, "MAX_HISTORY", _count,
        "most stored messages one subscribe's history may send; a resume needing more "
        "answers recovered: false",
        group=GROUP_HISTORY,
    )
    max_stored_subjects: int = opt(
        20, "MAX_STORED_SUBJECTS", _count,
        "subjects from JetStream streams one connection may follow at once (each costs the bridge a "
        "JetStream consumer)",
        group=GROUP_HISTORY,
    )
    max_stored_subjects_per_user: int = opt(
        100, "MAX_STORED_SUBJECTS_PER_USER", _count,
        "distinct subjects from JetStream streams one user (JWT sub) may follow at once over all their "
        "connections to this process",
        group=GROUP_HISTORY,
    )
    max_jetstream_consumers: int = opt(
        500, "MAX_JETSTREAM_CONSUMERS", _count,
        "JetStream consumers this process holds at once: live feeds take at most 80%, history readers "
        "90%; a stream's own max_consumers is shared the same way, the rest left to other applications",
        group=GROUP_HISTORY,
    )
    create_stream: str = opt(
        "", "CREATE_STREAM", _stream_spec,
        "NAME:subject,subject: create this JetStream stream at start if it does not exist "
        "(make run: DEMO:test.subject,demo.>); empty: never create streams",
        group=GROUP_HISTORY,
    )
    create_stream_max_msgs: int = opt(
        10_000, "CREATE_STREAM_MAX_MSGS", _count, "messages the CREATE_STREAM stream keeps",
        group=GROUP_HISTORY,
    )
    create_stream_max_age: float = opt(
        3600.0, "CREATE_STREAM_MAX_AGE", _positive_seconds,
        "seconds the CREATE_STREAM stream keeps a message", group=GROUP_HISTORY,
    )
    # Slow clients
    client_queue_messages: int = opt(
        10_000, "CLIENT_QUEUE_MESSAGES", _count, "frames one client may have waiting to be sent",
        group=GROUP_SLOW,
    )
    client_queue_bytes: int = opt(
        8 * 1024 * 1024, "CLIENT_QUEUE_BYTES", _count, "bytes one client may have waiting to be sent",
        group=GROUP_SLOW,
    )
    client_queue_overflow: str = opt(
        OVERFLOW_DISCONNECT,
        "CLIENT_QUEUE_OVERFLOW",
        _choice(OVERFLOW_DISCONNECT, OVERFLOW_DROP_OLDEST),
        "past the queue bound: 'disconnect' (close 1013) or "
        "'drop_oldest' (drop and tell the client how many)",
        group=GROUP_SLOW,
    )
    flush_delay: float = opt(0.0, "FLUSH_DELAY", _seconds,
                             "seconds to gather frames under sustained traffic before writing them; "
                             "0: write every event-loop turn (lowest latency); 0.05 cut CPU per message "
                             "by 60% in the W1 benchmark, at that much latency", group=GROUP_SLOW)
    ping_interval: float = opt(
        20.0, "PING_INTERVAL", _seconds, "seconds of silence before the server pings a client; 0: never",
        group=GROUP_SLOW,
    )
    pong_timeout: float = opt(
        10.0, "PONG_TIMEOUT", _positive_seconds, "seconds to wait for the pong before closing a dead client",
        group=GROUP_SLOW,
    )
    # Beyond one process
    workers: int = opt(
        1, "WORKERS", _workers,
        "processes serving HTTP_PORT together (SO_REUSEPORT), each with its own NATS connection; "
        "auto: one per core this process may use",
        group=GROUP_SCALE,
    )
    control_subject: str = opt(
        DEFAULT_CONTROL_SUBJECT, "CONTROL_SUBJECT", _concrete_subject,
        "subject prefix of the control plane on NATS, where every bridge process takes control "
        "commands; never open to browsers",
        group=GROUP_SCALE,
    )
    control_timeout: float = opt(
        0.5, "CONTROL_TIMEOUT", _positive_seconds,
        "seconds a control command waits for the other bridge processes' answers",
        group=GROUP_SCALE,
    )
    control_heartbeat: float = opt(
        1.0, "CONTROL_HEARTBEAT", _positive_seconds,
        "seconds between a bridge process's announcements on the control plane; one silent for 3 of "
        "them is no longer waited for",
        group=GROUP_SCALE,
    )
    # Presence
    presence_subjects: tuple[str, ...] = opt(
        (), "PRESENCE_SUBJECTS", _template_patterns,
        "subject patterns on which presence is kept ({sub}: the token's sub): a client subscribing to an "
        "exact subject within them joins it, on every bridge process sharing the NATS cluster (needs "
        "JetStream); empty: none",
        group=GROUP_PRESENCE,
    )
    presence_ttl: float = opt(
        15.0, "PRESENCE_TTL", _presence_ttl,
        "seconds within which the entries of a bridge process that died without a word are gone and "
        "their leaves sent",
        group=GROUP_PRESENCE,
    )
    presence_max: int = opt(
        1000, "PRESENCE_MAX", _count,
        "most entries one presence answer lists (its count and users stay exact)",
        group=GROUP_PRESENCE,
    )
    # Logs
    log_level: str = opt("INFO", "LOG_LEVEL", _log_level, "DEBUG, INFO, WARNING or ERROR", group=GROUP_LOGS)
    log_format: str = opt(
        "text", "LOG_FORMAT", _choice("text", "json"), "text or json (one object a line)",
        group=GROUP_LOGS,
    )

    @property
    def jwt_enabled(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key or self.jwt_jwks)

    @property
    def nats_servers(self) -> list[str]:
        return self.nats_url.split(",")

    @property
    def limits(self) -> Limits:
        return Limits(
            queue_messages=self.client_queue_messages,
            queue_bytes=self.client_queue_bytes,
            overflow=self.client_queue_overflow,
            max_subject_length=self.max_subject_length,
            max_subscriptions=self.max_subscriptions,
            max_subjects_per_request=self.max_subjects_per_request,
            control_rate=self.control_rate,
            max_publish_bytes=self.max_publish_bytes,
            flush_delay=self.flush_delay,
            max_frame_bytes=self.max_frame_bytes,
            ping_interval=self.ping_interval,
            pong_timeout=self.pong_timeout,
            max_history=self.max_history,
            max_stored_subjects=self.max_stored_subjects,
            max_stored_subjects_per_user=self.max_stored_subjects_per_user,
            max_jetstream_consumers=self.max_jetstream_consumers,
            request_timeout=self.request_timeout,
            max_pending_requests=self.max_pending_requests,
        )

    @property
    def policy(self) -> SubjectPolicy:
        return SubjectPolicy(
            allow=self.subject_allow, deny=self.subject_deny, publish_allow=self.publish_allow,
            control_subject=self.control_subject, unprotect=self.dangerously_unprotect_subjects,
        )


def flag(f: dataclasses.Field[Any]) -> str:
    return "--" + f.name.replace("_", "-")


def shown(value: Any) -> str:
    """A default as a person would type it."""
    if isinstance(value, tuple):
        return ",".join(value) or "(empty)"
    if value == "":
        return "(empty)"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py",
        # Not every flag again (40 lines): they are listed below, by section.
        usage="%(prog)s [-h] [--SETTING VALUE ...]",
        description="NATS ⇄ WebSocket bridge. Every flag can also be set by its env var; "
        "a flag wins over the env var.",
    )
    groups: dict[str, Any] = {}  # section -> its argparse argument group
    for f in dataclasses.fields(Config):
        meta = f.metadata
        if meta["group"] not in groups:  # created in the table's order
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        groups[meta["group"]].add_argument(
            flag(f),
            dest=f.name,
            metavar=meta["env"],
            default=None,
            # argparse %-formats help text; a literal % must be doubled.
            help=f"{meta['help']} (env {meta['env']}, default {shown(f.default)})".replace("%", "%%"),
        )
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults, then env vars, then flags; each value checked by its parser."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        env = f.metadata["env"]
        given = getattr(args, f.name)
        source = flag(f) if given is not None else env
        raw = given if given is not None else environ.get(env)
        if raw is None:
            continue
        try:
            values[f.name] = f.metadata["parse"](raw)
        except ValueError as exc:
            # NATS_URL and JWT_JWKS may carry a password: a bad value is shown without it.
            shown_raw = "(hidden)" if f.metadata["secret"] else repr(redact(raw))
            raise ConfigError(f"{source}={shown_raw}: {exc}") from None
    config = Config(**values)
    check_together(config)
    return config


def check_together(config: Config) -> None:
    """Settings that are fine alone but not together."""
    if config.auth_tokens and config.jwt_enabled:
        raise ConfigError("AUTH_TOKENS and JWT_* cannot both be set: with JWT every connection is a user; "
                          "give backends CONTROL_TOKENS instead")
    if (config.jwt_audience or config.jwt_issuer) and not config.jwt_enabled:
        raise ConfigError("JWT_AUDIENCE/JWT_ISSUER need a key to check tokens with: "
                          "set JWT_SECRET, JWT_PUBLIC_KEY or JWT_JWKS")


def settings_table() -> str:
    """The README's settings table (a test keeps the README in step with it)."""
    rows = ["| Env var | Flag | Default | Meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(Config):
        meta = f.metadata
        rows.append(f"| `{meta['env']}` | `{flag(f)}` | `{shown(f.default)}` | {meta['help']} |")
    return "\n".join(rows)


# The aiohttp application's key to the settings it was built with.
CONFIG = web.AppKey("config", Config)
