"""The HTTP endpoints beside the control API and /events: the page, the WebSocket, probes, metrics."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from bridge.process import metrics, nats_link, siblings
from bridge.process.workers import WORKER
from bridge.web.access import MANAGER, admit

# MANAGER, the app's key to this process's WSSManager, lives with the checks that hand it connections.
__all__ = ["MANAGER", "STATIC_DIR", "healthz", "index", "metrics_endpoint", "readyz", "stream"]

# The page and the client library: static/ at the top of the repository.
STATIC_DIR = Path(__file__).resolve().parents[2] / "static"


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


async def stream(request: web.Request) -> web.StreamResponse:
    """The WebSocket: refused with a plain HTTP answer before the upgrade, or served."""
    user, refusal = admit(request)
    if refusal is not None:
        return refusal
    # Nothing awaits between admit's checks and serve() counting the slot (see Admission.slot).
    return await request.app[MANAGER].serve(request, user)


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
