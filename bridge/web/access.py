"""Who may connect and who may use the control API, decided before the request goes further.

- Every route, without user authentication: the Host header (``check_host``).
- /stream and /events: the browser's Origin; then, with JWT on, a verified
  token (the connection's user) or, with ``AUTH_TOKENS``, one of those static
  tokens.
- The control API: a backend credential (``CONTROL_TOKENS``) once any user
  authentication is configured.

A refusal is a plain HTTP answer before the WebSocket upgrade (or before an
event stream begins), counted by reason for /metrics.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web

from bridge.config import CONFIG
from bridge.core.refusal import Refused
from bridge.core.tokens import Identity, TokenError
from bridge.process.keys import KEYS
from bridge.process.metrics import LINK

if TYPE_CHECKING:
    from handler import WSSManager

logger = logging.getLogger(__name__)

TOKEN_COOKIE = "bridge_token"

# The app's key to this process's WSSManager: declared with the checks that hand it
# connections, so that nothing in the package imports the top-level handler.
MANAGER: web.AppKey[WSSManager] = web.AppKey("manager")


def _origin_pattern(pattern: str) -> re.Pattern[str]:
    # '*' stands for one or more host characters, never a scheme, port or path separator.
    parts = [re.escape(p) for p in pattern.lower().rstrip("/").split("*")]
    return re.compile("[^/:@]+".join(parts))


def origin_allowed(origin: str | None, host: str | None, allowed: Sequence[str]) -> bool:
    """Same-origin, an Origin on the allow list, or no Origin (not a browser).

    Stops cross-site WebSocket hijacking: a page on another site cannot open a
    socket with the visitor's cookies (``bridge_token``) and read their feed.
    """
    if origin is None:
        return True
    origin = origin.lower().rstrip("/")
    if "*" in allowed or any(_origin_pattern(p).fullmatch(origin) for p in allowed):
        return True
    parts = urlsplit(origin)
    if not parts.hostname or not host:
        return False
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    try:
        served = urlsplit("//" + host.lower())
        return parts.hostname == served.hostname and (parts.port or default_port) == (
            served.port or default_port
        )
    except ValueError:  # a Host header with a bad port
        return False


# What a browser sends as a name: labels of letters, digits, - and _ (IDNs come as xn--).
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def _host_name(host: str) -> str | None:
    """The name or address in a Host header, without its port; None if it is malformed."""
    host = host.strip().lower()
    if host.startswith("["):  # [v6]:port
        name, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return None
        return name
    if host.count(":") > 1:  # a bare IPv6 address: not valid in Host, but unambiguous
        return host
    name, colon, port = host.partition(":")
    if colon and not port.isdigit():
        return None
    name = name.rstrip(".")
    return name if _HOST_NAME.fullmatch(name) else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _host_pattern(pattern: str) -> re.Pattern[str]:
    # '*' stands for one or more name characters (dots included: *.example.com covers a.b.example.com).
    return re.compile("[a-z0-9_.-]+".join(re.escape(p) for p in pattern.split("*")))


def host_allowed(host: str | None, allowed: Sequence[str]) -> bool:
    """May a request with this Host header be served while no user authentication is on?

    Stops DNS rebinding: a page on attacker.example re-points its own name at
    the bridge's address, and the visitor's browser, reaching the bridge on the
    visitor's network, counts it as the attacker's origin: Origin and Host both
    say attacker.example, so the Origin check passes, and the page reads the
    feed and drives the open control API.  The browser still sends the
    attacker's name as Host, so names are refused unless ``ALLOWED_HOSTS``
    lists them.  Always served: IP addresses (a page's origin cannot be our
    address unless it is served by us) and localhost and ``*.localhost``
    (browsers resolve them to loopback themselves, never through DNS).  A
    request without Host is not from a browser (browsers always send it).
    """
    if host is None:
        return True
    name = _host_name(host)
    if name is None:
        return False
    if _is_ip(name) or name == "localhost" or name.endswith(".localhost"):
        return True
    return "*" in allowed or any(_host_pattern(p).fullmatch(name) for p in allowed)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def check_host(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route, without AUTH_TOKENS or JWT: a Host that may be a rebound name gets 421.

    421 Misdirected Request: this server does not answer for that name, which
    no credential changes (401/403 would suggest one).  With user
    authentication on, a rebinding page gains nothing: the visitor's token is
    not the attacker's to send (the browser keeps cookies per name, and pages
    on other origins cannot read it), so any Host is served.  Probes
    (/healthz, /readyz) are checked too: they come by IP address or localhost.
    """
    config = request.app[CONFIG]
    if config.auth_tokens or config.jwt_enabled:
        return await handler(request)
    host = request.headers.get("Host")
    if host_allowed(host, config.allowed_hosts):
        return await handler(request)
    name = (_host_name(host or "") or host or "")[:100]
    return refuse(request, request.app[LINK].refusals, "host", 421,
                  f"Host {name} is not allowed: add it to ALLOWED_HOSTS")


def _bearer(request: web.Request) -> str | None:
    """The ``Authorization: Bearer`` credential, if the request has one."""
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


def presented_token(request: web.Request) -> str | None:
    """The token a request carries: Bearer header, ``?token=`` or the cookie (browsers cannot set headers)."""
    given = _bearer(request)
    if given is not None:
        return given
    return request.query.get("token") or request.cookies.get(TOKEN_COOKIE)


def token_valid(given: str | None, tokens: Sequence[str]) -> bool:
    """Is ``given`` one of ``tokens``?  Compared in constant time against every one,
    so response timing does not reveal how much of a guess was right."""
    if given is None:
        return False
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(token.encode(), given.encode())
    return ok


def refuse(
    request: web.Request, refusals: Counter[str], reason: str, status: int, message: str,
    log: str | None = None,
) -> web.Response:
    """The plain HTTP answer to a refused request, counted by ``reason``.

    ``log``: what the operator's log line says instead of ``message``, when the operator
    needs more than the client is told (what was refused and which setting would allow it).
    """
    refusals[reason] += 1
    logger.info("refused %s from %s: %s", request.path, request.remote, log or message)
    return web.json_response({"success": False, "message": message}, status=status)


ORIGIN_SHOWN = 200  # characters of a refused Origin in the log: the header is the client's, of any size


def origin_refusal(origin: str) -> str:
    """The log line's words for a refused Origin: which one, and the setting that would let it in.

    Only the log says it: the page that was refused is told no more than "Forbidden" (the
    body is readable cross-origin, and the settings are none of an attacker's business).
    The log formatter escapes the header's control characters (process/logs.py).
    """
    shown = origin[:ORIGIN_SHOWN] + ("..." if len(origin) > ORIGIN_SHOWN else "")
    if origin.strip().lower() == "null":
        # Sandboxed iframes, file:// pages and some redirects all send "null": allowing it
        # allows every one of them.
        return ("Origin null (a sandboxed or file:// page) is not allowed; ALLOWED_ORIGINS=null "
                "would let in every such page")
    return f"Origin {shown} is not allowed (add it to ALLOWED_ORIGINS)"


def identify(request: web.Request) -> Identity | None:
    """Who is connecting to /stream or /events: a verified user (JWT on), or None (anonymous); else Refused.

    With any JWT_* key set every connection is a user: no token, or a token
    that fails any check, is a 401 that says which check.
    """
    config = request.app[CONFIG]
    given = presented_token(request)
    if config.jwt_enabled:
        if not given:
            raise Refused(401, "token_missing", "Unauthorized: a token is required")
        store = request.app[KEYS]
        assert store.verifier is not None, "keys are loaded at start"
        try:
            return store.verifier.verify(given)
        except TokenError as exc:
            if exc.reason == "unknown_key":
                store.unknown_kid()
            raise Refused(401, f"token_{exc.reason}", f"Unauthorized: {exc.message}") from None
    if config.auth_tokens and not token_valid(given, config.auth_tokens):
        raise Refused(401, "auth", "Unauthorized: a valid token is required")
    return None


def admit(request: web.Request) -> tuple[Identity | None, web.Response | None]:
    """Who may open a connection (/stream or /events): its user, or the refusal to answer with.

    The browser's Origin, then the credential, then the user's and the process's
    connection slots (MAX_CONNECTIONS counts WebSockets and event streams alike).
    """
    config, manager, link = request.app[CONFIG], request.app[MANAGER], request.app[LINK]
    origin = request.headers.get("Origin")
    if not origin_allowed(origin, request.host, config.allowed_origins):
        # (A request without Origin is always allowed: ``origin`` is the header here.)
        return None, refuse(request, link.refusals, "origin", 403, "Forbidden: this Origin may not connect",
                            log=origin_refusal(origin or ""))
    try:
        user = identify(request)
    except Refused as exc:
        return None, refused(request, exc)
    admission = manager.admission
    if user is not None and admission.user_full(user.sub):
        # One user's token must not take every slot of the process from everyone else.
        return None, refuse(request, link.refusals, "user_connections", 429,
                            f"Too many connections: user {user.sub} already has "
                            f"{admission.max_connections_per_user} connections (MAX_CONNECTIONS_PER_USER)")
    if admission.full:
        return None, refuse(request, link.refusals, "capacity", 503, "Too many connections; try again later")
    return user, None


def check_backend(request: web.Request) -> None:
    """The control API is for backends: with user auth on, only a CONTROL_TOKENS bearer may use it.

    Stops a user (or a page acting with the user's cookie) from subscribing,
    publishing or disconnecting for others: user credentials get 403, and the
    credential must be an Authorization header, which a browser never adds to
    a cross-site request by itself.
    """
    config = request.app[CONFIG]
    if not (config.control_tokens or config.auth_tokens or config.jwt_enabled):
        return  # no auth configured anywhere: open, as the settings say
    given = _bearer(request)
    if token_valid(given, config.control_tokens):
        return
    if given and _is_user_credential(request, given):
        raise Refused(403, "control_user_token",
                      "Forbidden: a user's token cannot use the control API; use a CONTROL_TOKENS token")
    hint = "" if config.control_tokens else " (none is configured: set CONTROL_TOKENS)"
    raise Refused(401, "control_auth", f"Unauthorized: a control token is required{hint}")


def _is_user_credential(request: web.Request, given: str) -> bool:
    config = request.app[CONFIG]
    if token_valid(given, config.auth_tokens):
        return True
    verifier = request.app[KEYS].verifier
    if verifier is None:
        return False
    try:
        verifier.verify(given)
    except TokenError:
        return False
    return True


def refused(request: web.Request, exc: Refused) -> web.Response:
    return refuse(request, request.app[LINK].refusals, exc.reason, exc.status, exc.message)
