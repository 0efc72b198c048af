"""The bridge's counters: plain integers bumped on the hot path, exported at scrape time.

No lock and no label lookup per message: process/metrics.py turns these into
Prometheus families when /metrics is scraped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# How a browser's NATS request ended: the ``result`` label of bridge_requests_total, and the
# ``error`` of a failed request's reply (core/request.py names each).
REQUEST_RESULTS = ("ok", "timeout", "no_responders", "not_allowed", "too_many_requests", "invalid")


@dataclass
class Stats:
    """The manager's counters: plain integers bumped on the hot path, exported at scrape time."""

    messages_received: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0
    dropped: int = 0
    filtered: int = 0
    slow_consumer_disconnects: int = 0
    rate_limit_disconnects: int = 0
    published: int = 0
    connections_opened: int = 0
    event_streams_opened: int = 0
    token_expiries: int = 0
    token_refreshes: Counter[str] = field(default_factory=Counter)
    # Browsers' NATS requests by how they ended (core/request.py RESULTS).
    requests: Counter[str] = field(default_factory=Counter)
    bad_frames: Counter[str] = field(default_factory=Counter)
    # Event streams resumed from a Last-Event-ID, by outcome ("true": recovered, "false": not).
    event_resumes: Counter[str] = field(default_factory=Counter)


@dataclass
class LinkStats:
    """NATS link and handshake counters kept by main.py."""

    nats_reconnects: int = 0
    nats_disconnects: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
