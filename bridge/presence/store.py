"""This process's side of the stored presence: the stream, its lease, and the writes of its entries.

The stream (``PRESENCE_<CONTROL_SUBJECT>``, in memory, one message per
subject, per-message TTLs allowed, three replicas where the cluster has three
JetStream servers) holds one lease per bridge incarnation and one message per
entry.  Each write is one JetStream publish, acknowledged: a join or a leave
costs that, whatever the number of members.

The lease (``<C>.presence.i.<incarnation>``) lives ``PRESENCE_TTL - 1`` seconds
and is renewed every third of that.  Each renewal names the sequence of the
last one (``Nats-Expected-Last-Subject-Sequence``): once the lease has expired,
or the stream was lost with a NATS restart, no renewal can bring it back, and
the process starts a new incarnation instead.  So an incarnation whose lease
lapsed is never alive again, and the others may safely purge its entries.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError

from bridge.core.presence import KV_OPERATION, MARKER_REASON, Entry, PresenceNames
from bridge.jetstream.api import ERR_STREAM_NOT_FOUND, NS, JetStream, JetStreamError

logger = logging.getLogger(__name__)

# What the server answers to a renewal of a lease that is no longer ours to renew.
ERR_WRONG_LAST_SEQUENCE = 10071
# How long a server marker of an expired lease stays: only live readers need it (a fresh
# read of the stream finds the lease simply gone, which means the same).
MARKER_TTL = 60.0
# A lease is taken for lost this long before the server could expire it.
LAPSE_MARGIN = 0.5


class LeaseLost(JetStreamError):
    """Our lease is gone for good (expired, or the stream was lost): a new incarnation is needed."""


class PresenceStore:
    def __init__(self, js: JetStream, nats_client: Callable[[], NATS | None], names: PresenceNames,
                 ttl: float, worker: int = 1) -> None:
        self._js = js
        self._nats = nats_client
        self.names = names
        # Whole seconds (JetStream's unit), one less than PRESENCE_TTL: the server expires a
        # lease to the second, and its marker must reach every bridge within PRESENCE_TTL.
        self.lease_ttl = max(1, int(ttl) - 1)
        self.renew_every = self.lease_ttl / 3
        self.worker = worker
        self.incarnation: str | None = None
        self._lease_seq = 0
        self._lease_sent = 0.0  # when the last renewal that was acknowledged was sent (monotonic)

    # -- the stream -------------------------------------------------------------------

    async def ensure_stream(self) -> None:
        """The presence stream, made if it is not there; JetStreamError saying why it cannot be used."""
        name = self.names.stream
        try:
            info = await self._js.api(f"STREAM.INFO.{name}")
        except JetStreamError as exc:
            if exc.code != ERR_STREAM_NOT_FOUND:
                raise
            info = await self._create()
        self._check(info.get("config") or {})

    async def _create(self) -> dict[str, Any]:
        config = {
            "name": self.names.stream, "subjects": [self.names.pattern], "storage": "memory",
            "max_msgs_per_subject": 1, "discard": "new", "allow_msg_ttl": True,
            "subject_delete_marker_ttl": int(MARKER_TTL * NS), "allow_direct": False,
        }
        try:
            # Three replicas survive a server's loss; a lone server (or a smaller cluster) refuses them.
            return await self._js.api(f"STREAM.CREATE.{self.names.stream}", {**config, "num_replicas": 3})
        except JetStreamError as exc:
            logger.debug("presence stream with 3 replicas refused (%s); trying 1", exc)
            return await self._js.api(f"STREAM.CREATE.{self.names.stream}", {**config, "num_replicas": 1})

    def _check(self, config: dict[str, Any]) -> None:
        if not config.get("allow_msg_ttl") or not config.get("subject_delete_marker_ttl"):
            raise JetStreamError(f"stream {self.names.stream} has no per-message TTL: presence needs "
                                 "nats-server 2.11 or later (and a stream it made itself)")
        subjects = config.get("subjects") or ()
        if config.get("max_msgs_per_subject") != 1 or self.names.pattern not in subjects:
            raise JetStreamError(f"stream {self.names.stream} exists with another configuration; "
                                 "delete it and the bridges make it again")

    # -- the lease ----------------------------------------------------------------------

    def lapsed(self, now: float) -> bool:
        """Could our lease have expired by now (or have we none)?  Then it must never be renewed."""
        return self.incarnation is None or now - self._lease_sent >= self.lease_ttl - LAPSE_MARGIN

    def renewal_due(self, now: float) -> bool:
        return now - self._lease_sent >= self.renew_every

    async def begin(self) -> str:
        """A new incarnation and its lease; the old one, if any, is left for ``end``."""
        incarnation = secrets.token_hex(8)
        sent = time.monotonic()
        seq = await self._publish(self.names.lease(incarnation), self._lease_body(), self._lease_headers(0))
        self.incarnation, self._lease_seq, self._lease_sent = incarnation, seq, sent
        logger.info("presence: incarnation %s (lease of %d s)", incarnation, self.lease_ttl)
        return incarnation

    async def renew(self) -> None:
        """Renew our lease; LeaseLost when it cannot be had again, JetStreamError when it is unknown."""
        if self.incarnation is None:
            raise LeaseLost("no lease yet")
        sent = time.monotonic()
        try:
            self._lease_seq = await self._publish(self.names.lease(self.incarnation), self._lease_body(),
                                                  self._lease_headers(self._lease_seq))
        except JetStreamError as exc:
            if exc.code in (ERR_WRONG_LAST_SEQUENCE, ERR_STREAM_NOT_FOUND):
                raise LeaseLost(str(exc), exc.code) from None
            raise
        self._lease_sent = sent

    async def end(self, incarnation: str) -> None:
        """Remove an incarnation's lease (every reader drops its entries at once) and its entries."""
        await self._publish(self.names.lease(incarnation), b"", self._removal())
        await self.purge(incarnation)

    async def purge(self, incarnation: str) -> None:
        """Remove every stored entry of a dead incarnation (readers dropped them with its lease)."""
        await self._js.api(f"STREAM.PURGE.{self.names.stream}",
                           {"filter": self.names.entries_of(incarnation)})

    def _lease_headers(self, last: int) -> dict[str, str]:
        # ``last``: the sequence of our previous lease message (0: none), or the write is refused.
        return {"Nats-TTL": f"{self.lease_ttl}s", "Nats-Expected-Last-Subject-Sequence": str(last)}

    def _lease_body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "worker": self.worker}).encode()

    # -- entries ------------------------------------------------------------------------

    async def put(self, incarnation: str, entry: Entry) -> int:
        return await self._publish(self.names.entry(incarnation, entry.client), entry.encode())

    async def remove(self, incarnation: str, client: str) -> int:
        return await self._publish(self.names.entry(incarnation, client), b"", self._removal())

    def _removal(self) -> dict[str, str]:
        # A marker of our own replaces the message (one per subject) and ages out by itself;
        # the server adds no marker of its own when a marker expires.
        return {MARKER_REASON: "Remove", KV_OPERATION: "DEL", "Nats-TTL": f"{self.lease_ttl}s"}

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> int:
        """One stored message; its stream sequence, or JetStreamError (with JetStream's code)."""
        nc = self._nats()
        if nc is None or not nc.is_connected:
            raise JetStreamError("not connected to NATS")
        try:
            msg = await nc.request(subject, data, timeout=self._js.timeout, headers=headers)
        except NoRespondersError:
            raise JetStreamError(f"no stream takes {subject} (JetStream off, or the stream is gone)",
                                 ERR_STREAM_NOT_FOUND) from None
        except (TimeoutError, NatsError, OSError) as exc:
            raise JetStreamError(f"JetStream did not acknowledge: {exc or type(exc).__name__}") from None
        try:
            ack = json.loads(msg.data)
        except ValueError:
            raise JetStreamError("JetStream acknowledged with something that is not JSON") from None
        error = ack.get("error") if isinstance(ack, dict) else None
        if isinstance(error, dict):
            code = error.get("err_code", 0)
            raise JetStreamError(f"{error.get('description', 'error')} ({code or '?'})",
                                 code if isinstance(code, int) else 0)
        seq = ack.get("seq") if isinstance(ack, dict) else None
        if not isinstance(seq, int):
            raise JetStreamError("JetStream acknowledged without a sequence")
        return seq
