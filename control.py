"""The control API: a backend acts for a connected client (``POST /clients/{id}``)."""

from __future__ import annotations

from aiohttp import web

from access import check_token
from app_state import MANAGER


async def post_client(request: web.Request) -> web.Response:
    """Subscribe, unsubscribe or publish for a connected client: same JSON body and replies."""
    denied = check_token(request)
    if denied:
        return denied
    manager = request.app[MANAGER]
    client = manager.clients.get(request.match_info["connection_id"])
    if client is None:
        return web.json_response({"success": False, "message": "No such connection", "type": "reply"},
                                 status=404)
    replies = await manager.handle_request(client, await request.text())
    for frame in replies:
        # The client hears about it too, so its view of its subscriptions stays true.
        client.send_json({**frame, "source": "http"})
    ok = all(frame["success"] for frame in replies)
    body = {
        "success": ok,
        "message": "; ".join(frame["message"] for frame in replies),
        "type": "reply",
        "replies": replies,
    }
    return web.json_response(body, status=200 if ok else 400)
