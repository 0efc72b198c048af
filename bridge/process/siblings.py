"""The other workers of this host (WORKERS > 1): /metrics and /readyz answer for all of them.

The kernel hands each HTTP connection to one worker, so a scrape or a probe
reaches one of them at random.  Each worker therefore also serves a private
app on a Unix socket in the supervisor's run directory (``w<N>.sock``, not
reachable from the network) with its own metrics and readiness; the worker a
request lands on asks the others there, at that moment:

- ``/metrics`` is the sum of every worker that answered (metrics.merge), with
  ``bridge_workers`` and ``bridge_workers_reporting``;
- ``/readyz`` is 200 only when this worker and every other one is ready.

Why not prometheus_client's multiprocess mode: it needs its own metric objects
(a lock and a memory-mapped write per increment, on the per-message path that
bumps plain integers) and leaves dead workers' files to clean up.  Why not
the NATS control plane: metrics and readiness must still answer when NATS is
away.  The cost is N-1 local round trips per scrape, about a millisecond.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from bridge.process import metrics, nats_link
from bridge.process.metrics import REGISTRY
from bridge.process.workers import WORKER

logger = logging.getLogger(__name__)

ASK_TIMEOUT = 1.0  # seconds: a sibling that takes longer counts as not answering
HOST_APP = web.AppKey("host_app", web.Application)


async def private_site(web_app: web.Application) -> AsyncIterator[None]:
    """aiohttp cleanup context: this worker's own metrics and readiness on its Unix socket."""
    worker = web_app[WORKER]
    if worker.count == 1:
        yield
        return
    private = web.Application()
    private[HOST_APP] = web_app
    private.router.add_get("/metrics", _own_metrics)
    private.router.add_get("/readyz", _own_readiness)
    runner = web.AppRunner(private, access_log=None)
    await runner.setup()
    path = worker.socket_path(worker.index)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by this worker's previous life
    await web.UnixSite(runner, path).start()
    try:
        yield
    finally:
        await runner.cleanup()


async def _own_metrics(request: web.Request) -> web.Response:
    body = metrics.render(request.app[HOST_APP][REGISTRY])
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


async def _own_readiness(request: web.Request) -> web.Response:
    return web.Response(status=200 if nats_link.connected(request.app[HOST_APP]) else 503)


async def _ask(path: str, sock: str) -> tuple[int, str] | None:
    """(status, body) of ``path`` on a sibling's socket, or None if it does not answer in time."""
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock),
                                         timeout=aiohttp.ClientTimeout(total=ASK_TIMEOUT)) as session:
            async with session.get(f"http://worker{path}") as resp:
                return resp.status, await resp.text()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        logger.debug("worker at %s did not answer %s: %r", sock, path, exc)
        return None


async def _ask_siblings(web_app: web.Application, path: str) -> list[tuple[int, str] | None]:
    worker = web_app[WORKER]
    return list(await asyncio.gather(*(_ask(path, worker.socket_path(i)) for i in worker.siblings)))


async def host_metrics(web_app: web.Application) -> bytes:
    """This host's metrics: this worker's, plus every sibling's that answers, summed."""
    worker = web_app[WORKER]
    own = metrics.render(web_app[REGISTRY]).decode()
    texts = [own] + [answer[1] for answer in await _ask_siblings(web_app, "/metrics")
                     if answer is not None and answer[0] == 200]
    families = metrics.merge(texts) if len(texts) > 1 else []
    extra = metrics.workers_families(worker.count, len(texts))
    if not families:  # alone: no need to parse our own text back
        return own.encode() + metrics.render_families(extra)
    return metrics.render_families([*families, *extra])


async def host_readiness(web_app: web.Application) -> tuple[bool, int]:
    """(every worker ready, how many are)."""
    ready = int(nats_link.connected(web_app))
    answers = await _ask_siblings(web_app, "/readyz")
    ready += sum(1 for a in answers if a is not None and a[0] == 200)
    return ready == web_app[WORKER].count, ready
