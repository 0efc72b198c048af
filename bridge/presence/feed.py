"""Every presence message, stored then live, in the stream's order: one ordered push consumer per process.

The consumer delivers everything the presence stream holds (``deliver_policy:
all``: with one message per subject that is the current state of every lease
and entry) and then every new message as it is stored, server markers of
expired leases included.  Its reader builds a fresh table from the stored part
(``begin``), hears when it has caught up with what was stored (``caught_up``)
and applies each later message as it comes (``message``).

Any doubt starts it again from scratch, never from where it was: a delivery
missing (the consumer sequence jumps), the server's heartbeat saying we missed
some, or no heartbeat at all (the consumer or the stream is gone, e.g. NATS
restarted and the memory stream with it).  A restart from a sequence could
miss a marker that aged out meanwhile, and a recreated stream numbers from 1
again; a fresh read cannot go wrong.  Stored messages are told from the
server's own control messages by their ``$JS.ACK.`` reply subject, never by
headers (jetstream/feed.py says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from bridge.jetstream.api import HEARTBEAT, LIVE_INACTIVE, NS, JetStream, JetStreamError, delivery
from bridge.jetstream.feed import answer_server_control, server_control

logger = logging.getLogger(__name__)


class Reader(Protocol):
    def begin(self) -> None: ...

    def message(self, seq: int, msg: Msg) -> None: ...

    def caught_up(self) -> None: ...


def pending_of(reply: str) -> int | None:
    """How many stored messages follow this delivery, from its ``$JS.ACK`` reply subject."""
    parts = reply.split(".")
    try:
        if len(parts) == 9:  # $JS.ACK.stream.consumer.delivered.sseq.dseq.ts.pending
            return int(parts[8])
        if len(parts) >= 11:  # with domain and account hash
            return int(parts[10])
    except ValueError:
        return None
    return None


class PresenceFeed:
    def __init__(self, js: JetStream, nats_client: Callable[[], NATS | None], stream: str, pattern: str,
                 reader: Reader) -> None:
        self._js = js
        self._nats = nats_client
        self.stream = stream
        self.pattern = pattern
        self._reader = reader
        self._sub: Subscription | None = None
        self._consumer: str | None = None
        self._generation = 0
        self._expected = 1  # the next consumer sequence
        self._caught_up = False
        # False until a consumer is made, and again once one is found wanting.
        self.running = False
        self.last_activity = time.monotonic()
        self._restarting: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        """Read everything again from the start; JetStreamError if no consumer could be made."""
        nc = self._nats()
        if nc is None:
            raise JetStreamError("not connected to NATS")
        await self._let_go()
        self._generation += 1
        self._expected = 1
        self._caught_up = False
        self._reader.begin()
        inbox = nc.new_inbox()
        # Subscribed before the consumer exists: its first delivery must find us.
        self._sub = await nc.subscribe(inbox, cb=self._callback(self._generation))
        config = {"deliver_subject": inbox, "ack_policy": "none", "deliver_policy": "all",
                  "filter_subject": self.pattern, "flow_control": True, "idle_heartbeat": int(HEARTBEAT * NS),
                  "mem_storage": True, "num_replicas": 1, "inactive_threshold": int(LIVE_INACTIVE * NS)}
        try:
            info = await self._js.api(f"CONSUMER.CREATE.{self.stream}", {"stream_name": self.stream,
                                                                         "config": config})
        except JetStreamError:
            await self._let_go()
            raise
        self._consumer = str(info["name"])
        self.running = True
        self.last_activity = time.monotonic()
        if int(info.get("num_pending", 0)) == 0 and self._expected == 1:
            self._catch_up()  # nothing stored: every delivery from now on is live

    def _callback(self, generation: int) -> Callable[[Msg], Any]:
        async def on_delivery(msg: Msg) -> None:
            if generation != self._generation or self._stopped:
                return  # a replaced consumer's last words
            self.last_activity = time.monotonic()
            reply = msg.reply or ""
            found = delivery(reply)
            if found is None:
                if server_control(msg):
                    await self._control(msg)
                return
            if found.consumer_seq != self._expected:
                self.restart_soon(f"consumer sequence {found.consumer_seq}, expected {self._expected}")
                return
            self._expected += 1
            self._reader.message(found.stream_seq, msg)
            if not self._caught_up and pending_of(reply) == 0:
                self._catch_up()

        return on_delivery

    def _catch_up(self) -> None:
        self._caught_up = True
        self._reader.caught_up()

    async def _control(self, msg: Msg) -> None:
        """The server's heartbeat or flow-control request (``server_control`` said so)."""
        nc = self._nats()
        if nc is not None and (why := await answer_server_control(nc, msg, self._expected - 1)):
            self.restart_soon(why)

    def restart_soon(self, why: str) -> None:
        if self._stopped or (self._restarting is not None and not self._restarting.done()):
            return
        logger.info("presence: reading %s again from the start: %s", self.stream, why)
        self.running = False
        self._restarting = asyncio.create_task(self._restart())

    async def _restart(self) -> None:
        try:
            await self.start()
        except (JetStreamError, NatsError, OSError) as exc:
            # Not running: the presence room's tick makes sure of the stream and tries again.
            logger.warning("presence: could not read %s again: %s", self.stream, exc)

    def healthy(self, now: float) -> bool:
        """Running, and heard from within two heartbeats (a consumer gone silent is gone)."""
        if self._restarting is not None and not self._restarting.done():
            return True  # being taken care of
        return self.running and now - self.last_activity <= 2 * HEARTBEAT + 1

    async def _let_go(self) -> None:
        """Drop the current subscription and consumer, if any (the server forgets an unheard one anyway)."""
        self.running = False
        sub, self._sub = self._sub, None
        consumer, self._consumer = self._consumer, None
        if sub is not None:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()
        nc = self._nats()
        if consumer is not None and nc is not None and nc.is_connected:
            self._js.in_background(self._delete(consumer))

    async def _delete(self, consumer: str) -> None:
        with contextlib.suppress(JetStreamError):
            await self._js.api(f"CONSUMER.DELETE.{self.stream}.{consumer}")

    async def stop(self) -> None:
        self._stopped = True
        if self._restarting is not None:
            self._restarting.cancel()
            await asyncio.gather(self._restarting, return_exceptions=True)
        await self._let_go()
