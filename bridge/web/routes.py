"""The HTTP endpoints beside the control API: the page, the WebSocket, probes and metrics."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from bridge.config import CONFIG
from bridge.process import metrics, nats_link, siblings
from bridge.process.metrics import LINK
from bridge.process.workers import WORKER
from bridge.web.access import Refused, identify, origin_allowed, origin_refusal, refuse, refused

if TYPE_CHECKING:
    from handler import WSSManager

# The app's key to this process's WSSManager: declared here, where connections are
# handed to it, so that nothing in the package imports the top-level handler.
MANAGER: web.AppKey[WSSManager] = web.AppKey("manager")

# The page and the client library: static/ at the top of the repository.
STATIC_DIR = Path(__file__).resolve().parents[2] / "static"


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


async def stream(request: web.Request) -> web.StreamResponse:
    """The WebSocket: refused with a plain HTTP answer before the upgrade, or served."""
    config, manager, link = request.app[CONFIG], request.app[MANAGER], request.app[LINK]
    origin = request.headers.get("Origin")
    if not origin_allowed(origin, request.host, config.allowed_origins):
        # (A request without Origin is always allowed: ``origin`` is the header here.)
        return refuse(request, link.refusals, "origin", 403, "Forbidden: this Origin may not connect",
                      log=origin_refusal(origin or ""))
    try:
        user = identify(request)
    except Refused as exc:
        return refused(request, exc)
    if user is not None and manager.admission.user_full(user.sub):
        # One user's token must not take every slot of the process from everyone else.
        # Nothing awaits between this check and serve() counting the slot (see there).
        return refuse(request, link.refusals, "user_connections", 429,
                      f"Too many connections: user {user.sub} already has "
                      f"{manager.admission.max_connections_per_user} connections (MAX_CONNECTIONS_PER_USER)")
    if manager.admission.full:
        return refuse(request, link.refusals, "capacity", 503, "Too many connections; try again later")
    return await manager.serve(request, user)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready while the NATS link is up; with several workers, only while every worker's is."""
    nats = "connected" if nats_link.connected(request.app) else "disconnected"
    worker = request.app[WORKER]
    if worker.count == 1:
        ready = nats == "connected"
        body = {"status": "ready" if ready else "not ready", "nats": nats}
    else:
        ready, count = await siblings.host_readiness(request.app)
        body = {"status": "ready" if ready else "not ready", "nats": nats,
                "workers": {"count": worker.count, "ready": count}}
    return web.json_response(body, status=200 if ready else 503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = await siblings.host_metrics(request.app)
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})
