"""A control command carried out on this process's sessions (from the HTTP API or the plane).

A backend is trusted: what it asks obeys the server's policy but not the
user's token claims.  Each affected session hears what was done for it too
(its replies, marked ``"source": "http"``), so its view of its subscriptions
stays true.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bridge.core.commands import Answer, Command
from bridge.core.frames import CLOSE_DISCONNECTED

if TYPE_CHECKING:
    from bridge.hub.session import Session
    from handler import WSSManager

logger = logging.getLogger(__name__)


def targets(manager: WSSManager, command: Command) -> list[Session]:
    """The sessions a command names on this process: one by its id, or every one of a user."""
    if command.target == "client":
        session = manager.sessions.get(command.key)
        return [session] if session is not None else []
    return list(manager.users.get(command.key, ()))


async def execute(manager: WSSManager, command: Command, instance: str = "", worker: int = 1) -> Answer:
    """Carry ``command`` out on this process's sessions; what was done, as an ``Answer``."""
    answer = Answer(instance, worker)
    for session in targets(manager, command):
        answer.connections += 1
        if command.op == "disconnect":
            logger.info("connection %s: disconnected by a backend: %s", session.id, command.body)
            # Started, not awaited: the answer must not wait for each peer's close
            # handshake (up to seconds for a dead one), or the gatherer's bound
            # would count this process as missing.
            session.outbox.close_soon(CLOSE_DISCONNECTED, command.body)
            continue
        replies = await manager.handle_request(session, command.body, trusted=True)
        for frame in replies:
            session.send_json({**frame, "source": "http"})
        # History asked for by a backend goes out in the background: the command's
        # answer must not wait for it (other processes gather answers for a bounded time).
        manager.catch_up.send_soon(session)
        if command.target == "user":
            replies = [{**frame, "connection_id": session.id} for frame in replies]
        answer.replies.extend(replies)
    return answer
