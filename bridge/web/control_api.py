"""The control API over HTTP: a backend acts for connections, one by id or every one of a user.

| Endpoint | Command |
|---|---|
| ``POST /clients/{id}``   | apply a request (subscribe, unsubscribe, publish) for that connection |
| ``DELETE /clients/{id}`` | close that connection with 4003 |
| ``POST /users/{sub}``    | apply a request for every connection of that user |
| ``DELETE /users/{sub}``  | close every connection of that user with 4003 |

A backend is trusted: what it asks obeys the server's policy but not the
user's token claims.  With user authentication configured it must present a
``CONTROL_TOKENS`` bearer (access.check_backend).  Each HTTP call becomes a
``Command`` (core/commands.py), which the control plane
(plane/control_plane.py) carries out on every bridge process, wherever the
connections are.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web

from bridge.core.commands import DEFAULT_REASON, Command, Result, Target
from bridge.core.frames import close_reason
from bridge.core.refusal import Refused
from bridge.plane.control_plane import PLANE
from bridge.web.access import check_backend, refused

logger = logging.getLogger(__name__)


def _answer(result: Result) -> web.Response:
    return web.json_response(result.body, status=result.status)


async def _request(request: web.Request, target: Target, key: str) -> web.Response:
    try:
        check_backend(request)
    except Refused as exc:
        return refused(request, exc)
    command = Command(target, key, "request", await request.text())
    return _answer(await request.app[PLANE].gather(command))


async def _disconnect(request: web.Request, target: Target, key: str) -> web.Response:
    try:
        check_backend(request)
        reason = await _reason(request)
    except Refused as exc:
        return refused(request, exc)
    return _answer(await request.app[PLANE].gather(Command(target, key, "disconnect", reason)))


async def _reason(request: web.Request) -> str:
    """The close reason from an optional body ``{"reason": "..."}``, cut to the 123 bytes RFC 6455 allows."""
    text = await request.text()
    if not text.strip():
        return DEFAULT_REASON
    try:
        body = json.loads(text)
    except ValueError:
        raise Refused(400, "control_body", 'Expected an empty body or {"reason": "..."}') from None
    reason = body.get("reason", DEFAULT_REASON) if isinstance(body, dict) else None
    if not isinstance(reason, str):
        raise Refused(400, "control_body", 'Expected an empty body or {"reason": "..."}')
    return close_reason(reason)


async def post_client(request: web.Request) -> web.Response:
    return await _request(request, "client", request.match_info["connection_id"])


async def delete_client(request: web.Request) -> web.Response:
    return await _disconnect(request, "client", request.match_info["connection_id"])


async def post_user(request: web.Request) -> web.Response:
    return await _request(request, "user", request.match_info["sub"])


async def delete_user(request: web.Request) -> web.Response:
    return await _disconnect(request, "user", request.match_info["sub"])
