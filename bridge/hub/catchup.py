"""History, then live, with no gap and no duplicate between them.

When a subscribe asks for history, each of its topics pauses the session's
live messages (they wait in a backlog, with their sequences) before the
stream is asked anything; the history is planned (jetstream/reading.py) and
its size goes in the reply; once the reply is on its way the planned
messages are sent, oldest first, at the pace the client drains its outbox;
then the backlog follows, less what the history already covered.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from bridge.core.delivery import denied
from bridge.core.frames import encode_nats_message, reply
from bridge.core.history import HistoryError
from bridge.jetstream import reading
from bridge.jetstream.api import JetStreamError

if TYPE_CHECKING:
    from bridge.core.history import HistorySpec
    from bridge.core.permissions import SubjectPolicy
    from bridge.hub.registry import Registry
    from bridge.hub.session import Session
    from bridge.jetstream.api import JetStream, StreamInfo
    from bridge.jetstream.reading import Plan

logger = logging.getLogger(__name__)


class CatchUp:
    def __init__(self, registry: Registry, jetstream: JetStream, policy: SubjectPolicy,
                 max_history: int) -> None:
        self._registry = registry
        self._jetstream = jetstream
        self._policy = policy
        self._max_history = max_history
        # History being sent for a backend's requests (kept so the tasks are not collected).
        self._tasks: set[asyncio.Task[None]] = set()

    async def plan(self, session: Session, subjects: list[str], spec: HistorySpec,
                   stored: dict[str, StreamInfo]) -> dict[str, Any]:
        """Pause the session's live messages on each topic and plan its history; the reply's part.

        Pausing starts before the stream is asked anything, so every message
        stored after the plan's last one is held; those the plan covers are
        skipped by sequence when the held ones are released.
        """
        topics = self._registry.topics
        for subject in subjects:
            topics[subject].pause(session.outbox, self._registry.rule(session, subject))
        plans: list[Plan] = []
        try:
            for subject in subjects:
                feed = topics[subject].feed
                if feed is None:
                    raise HistoryError(f"no stream stores {subject!r}: it has no history")
                plans.append(await reading.plan(self._jetstream, feed, stored[subject], spec,
                                                self._max_history))
        except BaseException:
            for p in plans:
                p.drop(self._jetstream)
            for subject in subjects:
                topic = topics.get(subject)
                if topic is not None:
                    topic.resume(session.outbox, 0)
            raise
        session.plans.extend(plans)
        # last_seq: where this session stands once the history is sent: every later
        # message reaches it live, so a resume from there loses nothing.
        extra: dict[str, Any] = {"streams": {
            p.pattern: {**p.describe(), "last_seq": self._last_seq(p.pattern)} for p in plans}}
        if spec.mode == "after_seq":
            extra["recovered"] = all(p.recovered for p in plans)
            if len(plans) == 1 and not plans[0].recovered:
                extra["first_seq"] = plans[0].stream.first_seq
        return extra

    def _last_seq(self, pattern: str) -> int:
        topic = self._registry.topics.get(pattern)
        return topic.feed.last_seq if topic is not None and topic.feed is not None else 0

    def send_soon(self, session: Session) -> None:
        """``send`` in a task of its own (for requests a backend made)."""
        if session.plans:
            task = asyncio.create_task(self.send(session))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def send(self, session: Session) -> None:
        """Send the history planned by the last request, then what was held back meanwhile.

        Called once the request's reply is on its way, so the reply comes first.
        Runs in the session's own task: other sessions never wait for it.
        """
        while session.plans:
            plan = session.plans.pop(0)
            last = 0
            try:
                last = await self._send_plan(session, plan)
            except JetStreamError as exc:
                logger.warning("history of %s for connection %s broke off: %s", plan.pattern, session.id, exc)
                message = f"History of {plan.pattern} broke off after {plan.sent} messages: {exc}"
                session.send_json(reply(False, message, action="subscribe", subjects=[plan.pattern]))
            finally:
                plan.drop(self._jetstream)
                topic = self._registry.topics.get(plan.pattern)
                if topic is not None:
                    topic.resume(session.outbox, last)

    async def _send_plan(self, session: Session, plan: Plan) -> int:
        """One subject's history into the session's outbox; the last sequence read."""
        last = 0
        outbox = session.outbox
        batches = reading.read(self._jetstream, plan)
        try:
            async for batch in batches:
                topic = self._registry.topics.get(plan.pattern)
                rule = topic.rule_of(outbox) if topic is not None else None
                if topic is None or rule is None or session.closing:
                    break  # unsubscribed or gone meanwhile
                for stored in batch:
                    msg = stored.msg
                    last = stored.seq
                    if topic.filtered and not self._policy.permits(msg.subject):
                        continue
                    subject = msg.subject
                    if not rule.delivers(subject) if plan.exclusive else denied(rule.filters, subject):
                        continue
                    plan.sent += 1
                    payload = encode_nats_message(msg, stored.seq, stored.time, history=True)
                    outbox.send_message(outbox.framed(payload), plan.pattern, stored.seq)
                # Read no faster than the client takes it: its queue, not our
                # memory or the NATS link, absorbs a large history.
                await outbox.room()
        finally:
            await batches.aclose()  # its reader is deleted now, not when the generator is collected
        return last
