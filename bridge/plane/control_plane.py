"""The control plane on NATS: a control command reaches connections on every bridge process.

Each bridge process (an instance: one per ``WORKERS`` worker, per host) listens
under ``CONTROL_SUBJECT`` (C, default ``bridge.control``), with Panini's
``@app.listen`` handlers (panini_workarounds.py, workaround 6):

- ``C.clients.request``, ``C.clients.disconnect``, ``C.users.request``,
  ``C.users.disconnect``: every instance listens in queue group C, so NATS
  hands each command to one of them, which gathers every instance's answer
  and answers once: the control API's result, with its HTTP ``status``.
- ``C.each.`` + the same four: every instance; each answers what it did,
  ``{"instance", "worker", "connections", "replies"}``.
- ``C.instances``: announcements (hello, up, down); a request here (a roll
  call) gets one answer per instance.
- ``C.replies.<instance>.<n>``: the answers to that instance's own fan-outs.

Bodies: ``{"key": "<connection id or sub>", "body": <the request, as an object or as
its JSON text>}`` for ``request``, ``{"key": "...", "reason": "..."}`` for ``disconnect``.

Gathering (``ControlPlane.gather``): a connection id held here is served at once
(ids are unique).  Otherwise the command goes to ``C.each.*`` with a reply
subject, and answers are collected until every instance the roster knows has
answered, or, for a connection id, one says it holds it, or ``CONTROL_TIMEOUT``
passes.  An instance cannot count its peers, so each announces itself every
``CONTROL_HEARTBEAT`` seconds (and says hello at start, which every peer
answers at once, and goodbye at stop); one silent for 3 intervals is no longer
waited for.  So with every instance alive a command costs one round trip; a
killed one costs the full bound until it expires; a slow one's answer after
the bound is not counted, and the result lists it under ``missing``.  An
instance that answers without being known (just started) is counted all the same.

Anything that can publish under C commands every connection of every instance:
the browsers never can (permissions.control_patterns), and the NATS account's
permissions must keep everyone but the bridges and trusted backends out
(README, Scaling).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from panini import app as panini_app

from bridge import panini_workarounds
from bridge.core.commands import OPS, TARGETS, Answer, Command, Result, summarize, unavailable
from bridge.core.plane import (
    BadCommand,
    Gathering,
    Roster,
    Subjects,
    decode_command,
    encode_command,
    failure_message,
    result_message,
)
from bridge.plane.execute import execute

if TYPE_CHECKING:
    from handler import WSSManager

logger = logging.getLogger(__name__)

class ControlPlane:
    """This process's place on the control plane: its handlers, its announcements, its gathering."""

    def __init__(self, app: panini_app.App, manager: WSSManager, nats: Callable[[], NATS | None], root: str,
                 timeout: float, heartbeat: float, worker: int = 1) -> None:
        self.subjects = Subjects(root)
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.worker = worker
        # Random, so that instances never collide; a subject token, so it can name a reply subject.
        self.instance = secrets.token_hex(6)
        self.roster = Roster(self.instance)
        self._app = app
        self._manager = manager
        self._nats = nats
        self._pending: dict[str, asyncio.Queue[Answer]] = {}
        self._tokens = itertools.count(1)
        self._register()

    def _register(self) -> None:
        """Panini handlers; subscribed once NATS is connected (``lifecycle``)."""
        app, s = self._app, self.subjects
        for target in TARGETS:
            for op in OPS:
                # One instance takes each api command (the queue group) and gathers for everyone.
                app.listen(s.api(target, op), data_type=bytes, queue=s.root)(self.on_api)
                app.listen(s.each(target, op), data_type=bytes)(self.on_each)
        app.listen(s.instances, data_type=bytes)(self.on_instances)
        app.listen(f"{s.replies(self.instance)}.*", data_type=bytes)(self.on_reply)
        app.task(interval=self.heartbeat)(self.announce_up)

    # -- lifecycle -------------------------------------------------------------

    async def lifecycle(self, web_app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context, after the NATS link: subscribe the handlers, say hello."""
        await panini_workarounds.subscribe_listeners(self._app)
        logger.info("control plane: instance %s (worker %d) on %s.>", self.instance, self.worker,
                    self.subjects.root)
        await self._announce("hello")
        yield

    async def leave(self, web_app: web.Application) -> None:
        """on_shutdown, first: peers stop waiting for us (we still answer until NATS is drained)."""
        await self._announce("down")

    async def announce_up(self) -> None:
        """The periodic announcement (a Panini task)."""
        await self._announce("up")

    async def _announce(self, state: str) -> None:
        nc = self._nats()
        # While NATS is away, skip: a late "up" would only mislead, and a stop must not wait.
        if nc is None or not nc.is_connected:
            return
        try:
            await nc.publish(self.subjects.instances, self._announcement(state))
        except (NatsError, OSError) as exc:
            logger.info("control plane: could not announce %s: %r", state, exc)

    def _announcement(self, state: str) -> bytes:
        return json.dumps({"instance": self.instance, "worker": self.worker, "host": socket.gethostname(),
                           "pid": os.getpid(), "state": state, "interval": self.heartbeat}).encode()

    # -- handlers (Panini publishes what they return to the message's reply subject) --

    async def on_api(self, msg: Msg) -> bytes:
        """A backend's command on an api subject: gather every instance's answer, answer once."""
        try:
            target, op = self.subjects.command_kind(msg.subject)
            command = decode_command(target, op, msg.data)
        except BadCommand as exc:
            return failure_message(400, str(exc))
        try:
            return result_message(await self.gather(command))
        except Exception:
            # The boundary of a NATS request: the backend gets an answer, the process carries on.
            logger.exception("control command on %s failed", msg.subject)
            return failure_message(500, "Internal error")

    async def on_each(self, msg: Msg) -> bytes:
        """A fan-out: carry the command out on this instance's connections and say what came of it."""
        try:
            target, op = self.subjects.command_kind(msg.subject)
            command = decode_command(target, op, msg.data)
        except BadCommand as exc:
            return json.dumps({**Answer(self.instance, self.worker).to_json(), "error": str(exc)}).encode()
        try:
            answer = await execute(self._manager, command, self.instance, self.worker)
        except Exception:
            # The boundary of a NATS request: one bad command must not reach the other connections.
            logger.exception("control command on %s failed", msg.subject)
            answer = Answer(self.instance, self.worker)
        return json.dumps(answer.to_json()).encode()

    async def on_instances(self, msg: Msg) -> bytes | None:
        """Announcements; a request here (a roll call) is answered with our own."""
        if msg.reply:
            return self._announcement("up")
        try:
            announcement = json.loads(msg.data)
        except ValueError:
            return None
        if not isinstance(announcement, dict):
            return None
        self.roster.heard(announcement, asyncio.get_running_loop().time())
        if announcement.get("state") == "hello" and announcement.get("instance") != self.instance:
            # A newcomer learns of us now, not a heartbeat later.
            await self._announce("up")
        return None

    async def on_reply(self, msg: Msg) -> None:
        """An answer to one of our fan-outs."""
        queue = self._pending.get(msg.subject.rsplit(".", 1)[-1])
        if queue is None:
            return  # after the bound: too late to count
        try:
            queue.put_nowait(Answer.from_json(json.loads(msg.data)))
        except ValueError as exc:
            logger.warning("control plane: bad answer on %s: %s", msg.subject, exc)

    # -- gathering ---------------------------------------------------------------

    async def gather(self, command: Command) -> Result:
        """Carry ``command`` out wherever its connections are; every instance's answer as one result."""
        if command.target == "client" and command.key in self._manager.sessions:
            # Connection ids are unique (128 random bits): held here, held nowhere else.
            return summarize(command, [await execute(self._manager, command, self.instance, self.worker)])
        nc = self._nats()
        if nc is None or not nc.is_connected:
            return unavailable(command)
        loop = asyncio.get_running_loop()
        # Ourselves included: our own handler answers like everyone else's.
        gathering = Gathering(command, self.roster.alive(loop.time()) | {self.instance})
        token = str(next(self._tokens))
        queue: asyncio.Queue[Answer] = asyncio.Queue()
        self._pending[token] = queue
        try:
            await nc.publish(self.subjects.each(command.target, command.op), encode_command(command),
                             reply=f"{self.subjects.replies(self.instance)}.{token}")
            deadline = loop.time() + self.timeout
            while not gathering.done and (left := deadline - loop.time()) > 0:
                try:
                    gathering.add(await asyncio.wait_for(queue.get(), left))
                except TimeoutError:
                    break
        except (NatsError, OSError) as exc:
            logger.warning("control plane: could not send %s %s: %r", command.target, command.op, exc)
            return unavailable(command)
        finally:
            del self._pending[token]
        if gathering.missing:
            logger.info("control plane: no answer within %g s from %s", self.timeout,
                        ", ".join(gathering.missing))
        return summarize(command, list(gathering.answers.values()), gathering.missing)


PLANE = web.AppKey("plane", ControlPlane)
