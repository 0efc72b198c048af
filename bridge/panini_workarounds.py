"""Every place the bridge works around Panini 0.8.4, and why.

The bridge is a Panini app: ``main.py`` builds a ``panini.app.App``, registers
its test publisher with ``@app.task`` and its routes on ``app.http``, and the
NATS connection is the App's own client (``app.nats.client``).  What Panini
does that a long-running bridge cannot live with, and what we do instead:

1. **Importing Panini calls ``nest_asyncio.apply()``** (in
   ``panini/managers/nats_client.py``), which swaps asyncio's C ``Task`` and
   ``Future`` for pure-Python ones and patches the event loop class, so that
   Panini's ``*_sync`` helpers can re-enter a running loop.  The bridge never
   uses those helpers, and the pure-Python versions cost time on every await of
   every message (README, Benchmark: W1 4.5 -> 3.7 us/msg).  Importing this
   module puts the originals back.

2. **``App.start()`` owns the process.**  It connects with
   ``NATSClient._establish_connection``, which starts a watcher task that calls
   ``exit(99)`` once the client is closed (so a NATS outage or our own drain at
   shutdown would kill the process mid-way), lets a failed connect escape as a
   traceback, and starts the ``@app.task`` tasks without keeping their handles.
   So we never call it: ``connect`` connects a nats-py client with the App's
   own settings (servers, name, reconnect) and installs it as ``app.nats.client``,
   and ``start_tasks`` starts the registered tasks and returns their handles, so
   start-up and shutdown happen in an order we choose (aiohttp's lifecycle).

3. **The App's reconnect settings default to giving up** (60 attempts), after
   which the client closes and (see 2) Panini would exit.  ``make_app`` asks for
   reconnect for ever: a bridge must ride out NATS restarts.

4. **Panini's default logger writes files under ``logs/``** in the working
   directory.  ``make_app`` hands it a plain stdlib logger instead; the bridge
   logs to the console only.

5. **``App.subscribe_new_subject`` is not used for browser subscriptions**: it
   creates a task per message, drops payloads that are not JSON, and publishes
   the callback's return value to the reply subject.  hub/registry.py subscribes
   on the nats-py client directly.

6. **The control plane's handlers are Panini's ``@app.listen``, subscribed by us.**
   Request handlers are what Panini is for (plane/control_plane.py registers them with
   ``@app.listen``; Panini wraps each in its ``_ReceivedMessageHandler``, which
   publishes the handler's return value to the message's reply subject).  But
   Panini subscribes them only in ``App.start()`` (see 2), through
   ``NATSClient.subscribe_listeners()``, which also needs ``set_listeners()``
   first and schedules its JetStream part with ``self.loop.create_task``: the
   loop the App captured when it was built, which under ``web.run_app`` (a new
   loop) never runs.  So ``subscribe_listeners`` below hands each registered
   ``Listen`` to ``NATSClient.subscribe_new_subject``, which needs only the
   connected client (ours, from ``connect``) and the running loop.  Also,
   ``@app.listen(..., queue=...)`` files ``queue`` under ``Listen._meta``, where
   nothing reads it (only the App-wide ``allocation_queue_group`` applies); we
   move it to ``Listen.queue`` so one listener can be in a queue group and the
   others not.  What the handlers do because of Panini's wrapper: they take
   ``data_type=bytes`` and parse it themselves (with ``dict``, a body that is
   not a JSON object raises inside Panini's task and the requester gets no
   answer at all), and they return bytes whenever there is a reply subject
   (Panini cannot publish ``None``).  The wrapper's task per message is fine
   for control traffic, which is rare; browser traffic never goes through it (5).
"""

from __future__ import annotations

import _asyncio
import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from panini import app as panini_app


def _undo_nest_asyncio() -> None:
    """Workaround 1: put back what importing Panini took from asyncio."""
    asyncio.Task = asyncio.tasks.Task = asyncio.tasks._CTask = _asyncio.Task  # type: ignore[attr-defined,misc]
    asyncio.Future = asyncio.futures.Future = asyncio.futures._CFuture = _asyncio.Future  # type: ignore[attr-defined,misc]
    asyncio.tasks._enter_task = _asyncio._enter_task  # type: ignore[attr-defined]
    asyncio.tasks._leave_task = _asyncio._leave_task  # type: ignore[attr-defined]
    if hasattr(asyncio, "_run_orig"):
        asyncio.run = asyncio._run_orig
    loop_class = asyncio.SelectorEventLoop
    if "_nest_patched" in vars(loop_class):
        for name in ("run_forever", "run_until_complete", "_run_once", "_check_running", "_check_runnung",
                     "_nest_patched", "_num_runs_pending", "_is_proactorloop"):
            if name in vars(loop_class):
                delattr(loop_class, name)


# Panini is imported above, so its patch is in place by now: undo it once, here.
_undo_nest_asyncio()


def make_app(service_name: str, servers: list[str], reconnect_wait: float) -> panini_app.App:
    """A Panini App that never gives up on NATS and never writes log files (workarounds 3, 4)."""
    return panini_app.App(
        service_name=service_name,
        servers=servers,
        reconnect=True,
        max_reconnect_attempts=-1,
        reconnecting_time_sleep=reconnect_wait,
        custom_logger=logging.getLogger("panini"),
    )


def nats_client(app: panini_app.App) -> NATS | None:
    """The App's NATS client once ``connect`` has installed it, else None."""
    return getattr(app.nats, "client", None)


async def connect(app: panini_app.App, timeout: float, **callbacks: Callable[..., Awaitable[None]]) -> NATS:
    """Workaround 2: connect the App's NATS client ourselves, with the App's settings.

    Raises TimeoutError if no server answered within ``timeout`` seconds.
    """
    nc = NATS()
    options: dict[str, Any] = {
        "servers": app.nats.servers,
        "name": app.client_nats_name,
        "allow_reconnect": app.nats.allow_reconnect,
        "max_reconnect_attempts": app.nats.max_reconnect_attempts,
        "reconnect_time_wait": app.nats.reconnecting_time_wait,
        **callbacks,
    }
    await asyncio.wait_for(nc.connect(**options), timeout=timeout)
    app.nats.client = nc
    return nc


def start_tasks(app: panini_app.App) -> list[asyncio.Task[Any]]:
    """Workaround 2: start the ``@app.task`` tasks and keep their handles (Panini keeps none)."""
    return [asyncio.create_task(task()) for task in app._task_manager.tasks]


async def subscribe_listeners(app: panini_app.App) -> list[Subscription]:
    """Workaround 6: subscribe the App's ``@app.listen`` handlers on the connected client."""
    subscriptions = []
    for listeners in app._event_manager.subscriptions.values():
        for listener in listeners:
            meta = listener._meta if isinstance(listener._meta, dict) else {}
            if meta.get("queue"):
                listener.queue = meta["queue"]
            subscriptions.append(await app.nats.subscribe_new_subject(listener))
    return subscriptions


# The aiohttp application's key to the Panini App it is served by.
PANINI = web.AppKey("panini", panini_app.App)
