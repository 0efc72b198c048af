"""The control plane's vocabulary: its subjects, a command's NATS body, who is out there.

Pure, no I/O: plane/control_plane.py sends and receives; this decides what
the subjects are, how a command travels (``encode_command``/``decode_command``),
which instances a gatherer waits for (``Roster``: heard within ``MISSES``
heartbeats) and when it has heard enough (``Gathering``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bridge.core.commands import DEFAULT_REASON, OPS, TARGETS, Answer, Command, Op, Result, Target
from bridge.core.frames import close_reason

# Announcements an instance may miss before gatherers stop waiting for it.
MISSES = 3


class BadCommand(ValueError):
    """A control command that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class Subjects:
    """The control plane's subjects under ``root`` (CONTROL_SUBJECT)."""

    root: str

    def api(self, target: Target, op: Op) -> str:
        return f"{self.root}.{target}s.{op}"

    def each(self, target: Target, op: Op) -> str:
        return f"{self.root}.each.{target}s.{op}"

    @property
    def instances(self) -> str:
        return f"{self.root}.instances"

    def replies(self, instance: str) -> str:
        return f"{self.root}.replies.{instance}"

    def command_kind(self, subject: str) -> tuple[Target, Op]:
        """(target, op) of an api or each subject."""
        tail = subject[len(self.root) + 1:].removeprefix("each.")
        target, _, op = tail.partition(".")
        for t in TARGETS:
            if target == f"{t}s" and op in OPS:
                return t, op  # type: ignore[return-value]
        raise BadCommand(f"{subject!r} is not a control command subject")


def encode_command(command: Command) -> bytes:
    """The NATS body of ``command`` (the request travels as its text, so a bad one is
    answered by the instance holding the connection, exactly as over HTTP)."""
    if command.op == "disconnect":
        return json.dumps({"key": command.key, "reason": command.body}).encode()
    return json.dumps({"key": command.key, "body": command.body}).encode()


def decode_command(target: Target, op: Op, data: bytes) -> Command:
    """A command from its NATS body; BadCommand saying what is wrong."""
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise BadCommand(f"Invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadCommand('Expected a JSON object like {"key": "...", ...}')
    key = obj.get("key")
    if not isinstance(key, str) or not key:
        raise BadCommand("'key' must be a connection id or a user's sub (a non-empty string)")
    if op == "disconnect":
        reason = obj.get("reason", DEFAULT_REASON)
        if not isinstance(reason, str):
            raise BadCommand("'reason' must be a string")
        return Command(target, key, op, close_reason(reason))
    if "body" not in obj:
        raise BadCommand("'body' is required: the request, as an object or its JSON text")
    body = obj["body"]
    return Command(target, key, op, body if isinstance(body, str) else json.dumps(body))


def result_message(result: Result) -> bytes:
    """A gathered result as the answer to a command on an api subject."""
    return json.dumps({"status": result.status, **result.body}).encode()


def failure_message(status: int, message: str) -> bytes:
    """The answer to a command on an api subject that could not be carried out at all."""
    return json.dumps({"status": status, "success": False, "type": "reply", "connections": 0,
                       "message": message}).encode()


class Roster:
    """The other instances, from their announcements; one silent for ``MISSES`` intervals is gone."""

    def __init__(self, own: str) -> None:
        self.own = own
        self._expiry: dict[str, float] = {}

    def heard(self, announcement: dict[str, Any], now: float) -> bool:
        """Note an announcement; True if it came from an instance not known until now."""
        instance = announcement.get("instance")
        if not isinstance(instance, str) or instance == self.own:
            return False
        if announcement.get("state") == "down":
            self._expiry.pop(instance, None)
            return False
        interval = announcement.get("interval")
        interval = float(interval) if isinstance(interval, int | float) and 0 < interval <= 3600 else 1.0
        new = self._expiry.get(instance, 0.0) <= now
        self._expiry[instance] = now + MISSES * interval
        return new

    def alive(self, now: float) -> set[str]:
        for instance in [i for i, t in self._expiry.items() if t <= now]:
            del self._expiry[instance]
        return set(self._expiry)


@dataclass
class Gathering:
    """The answers to one fan-out, and whether waiting for more is pointless."""

    command: Command
    expected: set[str]
    answers: dict[str, Answer] = field(default_factory=dict)

    def add(self, answer: Answer) -> None:
        self.answers.setdefault(answer.instance, answer)  # a duplicate changes nothing

    @property
    def found(self) -> bool:
        """A connection's holder has answered: connection ids are unique, nobody else holds it."""
        return self.command.target == "client" and any(a.connections for a in self.answers.values())

    @property
    def done(self) -> bool:
        return self.found or self.expected <= self.answers.keys()

    @property
    def missing(self) -> list[str]:
        """Instances whose silence may have left the result short (none, once the holder is found)."""
        return [] if self.found else sorted(self.expected - self.answers.keys())
