"""Who may connect: the browser's Origin and the static tokens (``AUTH_TOKENS``).

Pure checks plus the one helper that turns a refusal into an HTTP answer
before the WebSocket upgrade, counted by reason for /metrics.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections import Counter
from collections.abc import Sequence
from urllib.parse import urlsplit

from aiohttp import web

from app_state import CONFIG, LINK

logger = logging.getLogger(__name__)

TOKEN_COOKIE = "bridge_token"


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


def presented_token(request: web.Request) -> str | None:
    """The token a request carries: Bearer header, ``?token=`` or the cookie (browsers cannot set headers)."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
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
    request: web.Request, refusals: Counter[str], reason: str, status: int, message: str
) -> web.Response:
    """The plain HTTP answer to a refused request, counted by ``reason``."""
    refusals[reason] += 1
    logger.info("refused %s from %s: %s", request.path, request.remote, message)
    return web.json_response({"success": False, "message": message}, status=status)


def check_token(request: web.Request) -> web.Response | None:
    """With ``AUTH_TOKENS`` set, the 401 for a request without one of them; else None."""
    tokens = request.app[CONFIG].auth_tokens
    if tokens and not token_valid(presented_token(request), tokens):
        message = "Unauthorized: a valid token is required"
        return refuse(request, request.app[LINK].refusals, "auth", 401, message)
    return None
