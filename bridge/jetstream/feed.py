"""The live feed of a stored pattern: every message once, in order, with its stream sequence.

Stored messages are data, whatever headers they carry.  A message that came
out of a stream always has JetStream's ``$JS.ACK.`` reply subject; the server's
own control messages (idle heartbeats, flow control, a pull request's end)
never do.  That, not a ``Status`` header, is what tells them apart: anyone
allowed to publish into a stream can store a message with ``Status: 100`` and
``Nats-Consumer-Stalled: $JS.API.STREAM.DELETE.X`` headers, and a bridge that
believed them would delete the stream on its own connection (and follow a
forged ``Nats-Last-Consumer`` into restarting its feed for ever).

``LiveFeed`` is an ordered push consumer written here rather than nats-py's
``ordered_consumer=True``: nats-py 2.6 never stops that mode's heartbeat and
flow-control tasks when the subscription is dropped, and the heartbeat task
then "resets" the consumer, quietly re-subscribing a feed nobody wants.  The
bridge drops feeds whenever the last client of a pattern leaves, so it needs
one that stops for good.  What it guarantees: every message of the pattern,
with its stream sequence, in order, none twice, across gaps (a missed
delivery is detected by the consumer sequence and the feed restarts right
after the last stream sequence it delivered) and across the loss of the
consumer itself (heartbeats stop; a watchdog restarts it the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from bridge.jetstream.api import (
    HEARTBEAT,
    LATEST_MAX_BYTES,
    LIVE_INACTIVE,
    NS,
    JetStream,
    JetStreamError,
    Stored,
    StreamInfo,
    delivery,
    rfc3339,
    start_after,
)

logger = logging.getLogger(__name__)


def server_control(msg: Msg) -> bool:
    """Is this one of the server's own messages to a push consumer (heartbeat, flow control)?

    Only a message without a ``$JS.ACK`` reply can be: a stored message always
    has one, so forged ``Status`` headers in it are just data.
    """
    return not (msg.reply or "").startswith("$JS.ACK.") and bool(msg.headers) and \
        msg.headers.get("Status") == "100"  # type: ignore[union-attr]


def flow_control_subject(subject: str | None) -> bool:
    """The only subjects a feed ever answers on the server's behalf: its flow-control replies."""
    return bool(subject) and subject.startswith("$JS.FC.")  # type: ignore[union-attr]


async def answer_server_control(nc: NATS, msg: Msg, delivered: int) -> str | None:
    """Answer the server's heartbeat or flow-control request (``server_control`` said it is one).

    A flow-control request is answered on its own ``$JS.FC.`` reply (every
    earlier delivery has been handed on: the callbacks run in order), so is a
    stalled consumer's; nothing else is ever published for the server.  A
    heartbeat whose ``Nats-Last-Consumer`` is not ``delivered`` means a delivery
    went missing: the reason to restart is returned, in words.
    """
    headers = msg.headers or {}
    if "FlowControl" in headers.get("Description", "") and flow_control_subject(msg.reply):
        await nc.publish(msg.reply, b"")
        return None
    stalled = headers.get("Nats-Consumer-Stalled")
    if flow_control_subject(stalled):
        await nc.publish(stalled, b"")  # type: ignore[arg-type]
    last = headers.get("Nats-Last-Consumer")
    if last is not None and last.isdigit() and int(last) != delivered:
        return f"heartbeat says {last} delivered, we have {delivered}"
    return None


class LiveFeed:
    """A shared live subscription to a stored pattern: every message once, in order, with its sequence.

    It starts at the pattern's latest stored message (``deliver_policy: last``):
    that one is not live, it is handed over as ``latest`` (a ``{"last": 1}``
    history then costs no call at all); everything after it is delivered live.
    """

    def __init__(self, js: JetStream, nats_client: Callable[[], NATS | None], stream: StreamInfo,
                 pattern: str, on_message: Callable[[Msg, int, str], None]) -> None:
        self._js = js
        self._nats = nats_client
        self.stream = stream.name
        self._info = stream
        self.pattern = pattern
        self._on_message = on_message
        self._sub: Subscription | None = None
        self._consumer: str | None = None
        self._generation = 0
        self._expected = 1  # the next consumer sequence
        self.last_seq = 0  # the last stream sequence delivered
        # The latest stored message of the pattern, (msg, seq, time), kept while it is
        # small: a {"last": 1} history is then served without a call.
        self._latest: tuple[Msg, int, str] | None = None
        # Set once the message stored before the feed began has arrived (or there was none).
        self._latest_ready = asyncio.Event()
        # How many messages were stored when the consumer was made (0 or 1, the latest
        # match): they are history, not live.  Unknown (None) until its answer comes.
        self._stored_at_start: int | None = None
        self._nothing_stored = False
        self.last_activity = time.monotonic()
        self._restarting: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        """Subscribe from the latest stored message; JetStreamError (BudgetError) if no consumer is made."""
        await self._open({"deliver_policy": "last"})

    async def _open(self, start: dict[str, Any]) -> None:
        nc = self._nats()
        if nc is None:
            raise JetStreamError("not connected to NATS")
        self._generation += 1
        generation = self._generation
        inbox = nc.new_inbox()
        old_sub, old_consumer = self._sub, self._consumer
        # Subscribe before the consumer exists: its first delivery must find us.
        self._sub = await nc.subscribe(inbox, cb=self._callback(generation))
        self._expected = 1
        config = {"deliver_subject": inbox, "ack_policy": "none", "filter_subject": self.pattern,
                  "flow_control": True, "idle_heartbeat": int(HEARTBEAT * NS), "mem_storage": True,
                  "num_replicas": 1, "inactive_threshold": int(LIVE_INACTIVE * NS), **start}
        try:
            if old_consumer is None:
                info = await self._js.create_consumer(self._info, "feed", config)
            else:
                # A restart replaces our own consumer: it takes no more of the budget.
                info = await self._js.api(f"CONSUMER.CREATE.{self.stream}",
                                          {"stream_name": self.stream, "config": config})
        except JetStreamError:
            with contextlib.suppress(NatsError):
                await self._sub.unsubscribe()
            self._sub = old_sub
            raise
        self._consumer = str(info["name"])
        if start.get("deliver_policy") == "last":
            # Deliveries may have come before this answer; none of them was live.
            delivered = int((info.get("delivered") or {}).get("stream_seq", 0))
            stored = self._stored_at_start = int(info.get("num_pending", 0))
            # The consumer starts at the latest stored match, right after ``delivered``.
            self.last_seq = max(self.last_seq, delivered + 1 if stored else delivered)
            self._nothing_stored = stored == 0 and self._expected == 1
            if self._expected - 1 >= stored:
                self._latest_ready.set()
        self.last_activity = time.monotonic()
        if old_sub is not None:
            with contextlib.suppress(NatsError):
                await old_sub.unsubscribe()
        if old_consumer is not None:
            with contextlib.suppress(JetStreamError):
                await self._js.api(f"CONSUMER.DELETE.{self.stream}.{old_consumer}")

    def _callback(self, generation: int) -> Callable[[Msg], Any]:
        async def on_delivery(msg: Msg) -> None:
            if generation != self._generation or self._stopped:
                return  # a replaced consumer's last words
            self.last_activity = time.monotonic()
            found = delivery(msg.reply or "")
            if found is None:
                if server_control(msg):
                    await self._control(msg)
                return
            if found.consumer_seq != self._expected:
                # A delivery went missing (or came twice): start again right
                # after the last one delivered, so nothing is lost or doubled.
                self.restart_soon(f"consumer sequence {found.consumer_seq}, expected {self._expected}")
                return
            self._expected = found.consumer_seq + 1
            when = rfc3339(found.timestamp)
            self._latest = (msg, found.stream_seq, when) if len(msg.data) <= LATEST_MAX_BYTES else None
            self._nothing_stored = False
            if generation == 1 and (self._stored_at_start is None
                                    or found.consumer_seq <= self._stored_at_start):
                # Stored before the feed began, or delivered before anyone could follow
                # it (its consumer's answer has not even come): history, not live.
                self.last_seq = max(self.last_seq, found.stream_seq)
                if self._stored_at_start is not None and found.consumer_seq >= self._stored_at_start:
                    self._latest_ready.set()
                return
            self.last_seq = found.stream_seq
            self._on_message(msg, found.stream_seq, when)

        return on_delivery

    async def latest(self) -> Stored | None:
        """The pattern's latest stored message (None: nothing is stored): from memory, else one call."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._latest_ready.wait(), self._js.timeout)
        if self._latest is not None and self._latest[1] == self.last_seq:
            return Stored(*self._latest)
        if self._nothing_stored:
            return None
        return await self._js.last_message(self.stream, self.pattern)

    async def _control(self, msg: Msg) -> None:
        """The server's heartbeat or flow-control request (``server_control`` said so)."""
        nc = self._nats()
        if nc is not None and (why := await answer_server_control(nc, msg, self._expected - 1)):
            self.restart_soon(why)

    def restart_soon(self, why: str) -> None:
        if self._stopped or (self._restarting is not None and not self._restarting.done()):
            return
        logger.info("live feed %s on %s restarts after %d: %s", self.pattern, self.stream, self.last_seq, why)
        self._latest_ready.set()  # whatever has not arrived by now will not
        self._restarting = asyncio.create_task(self._restart())

    async def _restart(self) -> None:
        try:
            await self._open(start_after(self.last_seq))
        except (JetStreamError, NatsError, OSError) as exc:
            # The watchdog tries again after the next quiet spell.
            logger.warning("live feed %s on %s could not restart: %s", self.pattern, self.stream, exc)

    def check(self, now: float) -> None:
        """Watchdog: no delivery and no heartbeat for two heartbeats means the consumer is gone."""
        nc = self._nats()
        if nc is not None and nc.is_connected and now - self.last_activity > 2 * HEARTBEAT + 1:
            self.last_activity = now
            self.restart_soon("no heartbeat")

    async def stop(self) -> None:
        self._stopped = True
        self._latest_ready.set()
        if self._restarting is not None:
            self._restarting.cancel()
        if self._sub is not None:
            with contextlib.suppress(NatsError):
                await self._sub.unsubscribe()
        nc = self._nats()
        if self._consumer is not None:
            if nc is not None and nc.is_connected:
                # Not awaited: the server removes it anyway once nobody listens.
                self._js.in_background(self._js.delete_consumer(self.stream, "feed", self._consumer))
            else:
                self._js.consumers.gone("feed", self.stream)
