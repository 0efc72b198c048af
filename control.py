"""The control API: a backend acts for connections, one by id or every one of a user.

| Endpoint | Command |
|---|---|
| ``POST /clients/{id}``   | apply a request (subscribe, unsubscribe, publish) for that connection |
| ``DELETE /clients/{id}`` | close that connection with 4003 |
| ``POST /users/{sub}``    | apply a request for every connection of that user |
| ``DELETE /users/{sub}``  | close every connection of that user with 4003 |

A backend is trusted: what it asks obeys the server's policy but not the
user's token claims.  With user authentication configured it must present a
``CONTROL_TOKENS`` bearer (access.check_backend).  Each HTTP call becomes a
``Command``; ``execute`` carries it out on this process's connections.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from access import Refused, check_backend, refused
from app_state import MANAGER
from connection import Client
from frames import CLOSE_DISCONNECTED
from handler import WSSManager

logger = logging.getLogger(__name__)

DEFAULT_REASON = "disconnected by the server"


@dataclass(frozen=True)
class Command:
    """One control command: ``target`` names a connection id or a user's sub."""

    target: Literal["client", "user"]
    key: str
    op: Literal["request", "disconnect"]
    # The request's JSON text, or the close reason.
    body: str


@dataclass
class Outcome:
    """What a command did: how many connections it reached, and their replies."""

    connections: int = 0
    replies: list[dict[str, Any]] = field(default_factory=list)


def _targets(manager: WSSManager, command: Command) -> list[Client]:
    if command.target == "client":
        client = manager.clients.get(command.key)
        return [client] if client is not None else []
    return list(manager.users.get(command.key, ()))


async def execute(manager: WSSManager, command: Command) -> Outcome:
    """Carry ``command`` out on this process's connections."""
    outcome = Outcome()
    for client in _targets(manager, command):
        outcome.connections += 1
        if command.op == "disconnect":
            logger.info("connection %s: disconnected by a backend: %s", client.id, command.body)
            await client.close(CLOSE_DISCONNECTED, command.body)
            continue
        replies = await manager.handle_request(client, command.body, by_backend=True)
        for frame in replies:
            # The client hears about it too, so its view of its subscriptions stays true.
            client.send_json({**frame, "source": "http"})
        await manager.finish_catch_up(client)
        if command.target == "user":
            replies = [{**frame, "connection_id": client.id} for frame in replies]
        outcome.replies.extend(replies)
    return outcome


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------


def _nobody(command: Command) -> web.Response:
    message = "No such connection" if command.target == "client" else f"No connection of user {command.key!r}"
    return web.json_response({"success": False, "message": message, "type": "reply", "connections": 0},
                             status=404)


async def _request(request: web.Request, target: Literal["client", "user"], key: str) -> web.Response:
    try:
        check_backend(request)
    except Refused as exc:
        return refused(request, exc)
    command = Command(target, key, "request", await request.text())
    outcome = await execute(request.app[MANAGER], command)
    if not outcome.connections:
        return _nobody(command)
    ok = all(frame["success"] for frame in outcome.replies)
    body = {
        "success": ok,
        "message": "; ".join(dict.fromkeys(frame["message"] for frame in outcome.replies)),
        "type": "reply",
        "connections": outcome.connections,
        "replies": outcome.replies,
    }
    return web.json_response(body, status=200 if ok else 400)


async def _disconnect(request: web.Request, target: Literal["client", "user"], key: str) -> web.Response:
    try:
        check_backend(request)
        reason = await _reason(request)
    except Refused as exc:
        return refused(request, exc)
    command = Command(target, key, "disconnect", reason)
    outcome = await execute(request.app[MANAGER], command)
    if not outcome.connections:
        return _nobody(command)
    n = outcome.connections
    return web.json_response({"success": True, "type": "reply", "connections": n,
                              "message": f"Disconnected {n} connection{'s' if n != 1 else ''}"})


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
    return reason.encode()[:123].decode(errors="ignore")


async def post_client(request: web.Request) -> web.Response:
    return await _request(request, "client", request.match_info["connection_id"])


async def delete_client(request: web.Request) -> web.Response:
    return await _disconnect(request, "client", request.match_info["connection_id"])


async def post_user(request: web.Request) -> web.Response:
    return await _request(request, "user", request.match_info["sub"])


async def delete_user(request: web.Request) -> web.Response:
    return await _disconnect(request, "user", request.match_info["sub"])
