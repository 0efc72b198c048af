"""Control commands: what a backend asks of connections, and what came of it.

A ``Command`` names its target (one connection by id, or every connection of a
user), the operation (apply a request, or disconnect) and its body.  It comes
from the HTTP control API (web/control_api.py) or from NATS
(plane/control_plane.py).  Each bridge process carries it out on the
connections it holds (plane/execute.py) and says what it did (an
``Answer``); ``summarize`` turns the answers of every process into the one
result a backend sees, with its HTTP status.  Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_REASON = "disconnected by the server"

Target = Literal["client", "user"]
Op = Literal["request", "disconnect"]
TARGETS: tuple[Target, ...] = ("client", "user")
OPS: tuple[Op, ...] = ("request", "disconnect")


@dataclass(frozen=True)
class Command:
    """One control command: ``target`` names a connection id or a user's sub."""

    target: Target
    key: str
    op: Op
    # The request's JSON text, or the close reason.
    body: str


@dataclass
class Answer:
    """What one bridge process did with a command."""

    instance: str = ""
    worker: int = 1
    connections: int = 0
    replies: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"instance": self.instance, "worker": self.worker, "connections": self.connections,
                "replies": self.replies}

    @classmethod
    def from_json(cls, obj: Any) -> Answer:
        """An answer received from another process; ValueError if it is not one."""
        if not isinstance(obj, dict):
            raise ValueError("an answer must be a JSON object")
        instance, worker = obj.get("instance"), obj.get("worker", 1)
        connections, replies = obj.get("connections"), obj.get("replies", [])
        if not isinstance(instance, str) or not instance:
            raise ValueError("an answer needs its 'instance'")
        if type(connections) is not int or connections < 0 or type(worker) is not int:
            raise ValueError("an answer needs 'connections' and 'worker' as whole numbers")
        if not isinstance(replies, list) or not all(isinstance(r, dict) for r in replies):
            raise ValueError("an answer's 'replies' must be a list of objects")
        return cls(instance, worker, connections, replies)


@dataclass(frozen=True)
class Result:
    """The outcome a backend sees: an HTTP status and a JSON body."""

    status: int
    body: dict[str, Any]


def summarize(command: Command, answers: Sequence[Answer], missing: Sequence[str] = ()) -> Result:
    """Every process's answer to ``command`` as one result.

    ``missing``: processes that were expected to answer and did not within the
    bound; when it is not empty, a count (or a 404) may be short of the truth.
    """
    connections = sum(a.connections for a in answers)
    where = {"instances": len(answers), "missing": sorted(missing)}
    if not connections:
        message = ("No such connection" if command.target == "client"
                   else f"No connection of user {command.key!r}")
        return Result(404, {"success": False, "message": message, "type": "reply", "connections": 0, **where})
    if command.op == "disconnect":
        plural = "s" if connections != 1 else ""
        return Result(200, {"success": True, "type": "reply", "connections": connections,
                            "message": f"Disconnected {connections} connection{plural}", **where})
    replies = [frame for a in answers for frame in a.replies]
    ok = all(frame["success"] for frame in replies)
    return Result(200 if ok else 400, {
        "success": ok,
        "message": "; ".join(dict.fromkeys(frame["message"] for frame in replies)),
        "type": "reply",
        "connections": connections,
        "replies": replies,
        **where,
    })


def unavailable(command: Command) -> Result:
    """The control plane cannot be reached, and this process alone cannot answer for every connection."""
    what = ("that connection is not on this process" if command.target == "client"
            else "a user may be anywhere")
    return Result(503, {"success": False, "type": "reply", "connections": 0,
                        "message": f"The control plane is unavailable (no NATS link) and {what}; try again"})
