"""The HTTP endpoints beside the control API: the page, the WebSocket, probes and metrics."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

import metrics
import panini_workarounds
from access import Refused, identify, origin_allowed, refuse, refused
from app_state import CONFIG, LINK, MANAGER, PANINI, REGISTRY

STATIC_DIR = Path(__file__).resolve().parent / "static"


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


async def stream(request: web.Request) -> web.StreamResponse:
    """The WebSocket: refused with a plain HTTP answer before the upgrade, or served."""
    config, manager, link = request.app[CONFIG], request.app[MANAGER], request.app[LINK]
    if not origin_allowed(request.headers.get("Origin"), request.host, config.allowed_origins):
        return refuse(request, link.refusals, "origin", 403, "Forbidden: this Origin may not connect")
    try:
        user = identify(request)
    except Refused as exc:
        return refused(request, exc)
    if manager.full:
        return refuse(request, link.refusals, "capacity", 503, "Too many connections; try again later")
    return await manager.serve(request, user)


def nats_connected(web_app: web.Application) -> bool:
    nc = panini_workarounds.nats_client(web_app[PANINI])
    return nc is not None and nc.is_connected


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if nats_connected(request.app):
        return web.json_response({"status": "ready", "nats": "connected"})
    return web.json_response({"status": "not ready", "nats": "disconnected"}, status=503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = metrics.render(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})
