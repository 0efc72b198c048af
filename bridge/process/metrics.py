"""Prometheus metrics for the bridge.

The hot path only bumps plain integers (core/stats.py); this collector turns
them into metric families when /metrics is scraped, so a delivered message costs
no lock and no label lookup.  With several workers, /metrics is the host's
total: ``merge`` sums the workers' own expositions sample by sample (siblings.py
fetches them at scrape time).  ``LINK`` and ``REGISTRY`` are the app's keys to
the link counters and this process's registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from bridge.core.stats import REQUEST_RESULTS, LinkStats

if TYPE_CHECKING:
    from handler import WSSManager

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LINK = web.AppKey("link", LinkStats)
REGISTRY = web.AppKey("registry", CollectorRegistry)


class BridgeCollector:
    def __init__(self, manager: WSSManager, link: LinkStats, nats_connected: Callable[[], bool]) -> None:
        self._manager = manager
        self._link = link
        self._nats_connected = nats_connected

    def collect(self) -> Iterator[Metric]:
        yield from self._connections()
        yield from self._traffic()
        yield from self._jetstream()
        yield from self._requests()
        yield from self._refusals()

    def _connections(self) -> Iterator[Metric]:
        m, s = self._manager, self._manager.stats
        yield gauge("connections", "Open connections: WebSockets and event streams.", len(m.sessions))
        yield gauge("event_streams", "Open Server-Sent Events streams (/events), of the connections.",
                    sum(1 for session in m.sessions.values() if session.outbox.sse))
        yield gauge("client_subscriptions", "Subjects followed by clients, summed over clients.",
                    m.client_subscriptions)
        yield gauge("nats_subscriptions", "NATS subscriptions of the bridge (one per pattern).",
                    len(m.registry.topics))
        yield gauge("nats_connected", "1 while the NATS link is up.", 1 if self._nats_connected() else 0)
        yield counter("connections_opened", "Connections accepted: WebSockets and event streams.",
                      s.connections_opened)
        yield counter("event_streams_opened", "Server-Sent Events streams begun.", s.event_streams_opened)
        yield labelled(CounterMetricFamily, "event_stream_resumes", "Event streams resumed from a "
                       "Last-Event-ID, by outcome.", "recovered",
                       {outcome: s.event_resumes[outcome] for outcome in ("true", "false")})
        yield gauge("presence_entries", "Presence entries of this process's connections (one per "
                    "connection and subject within PRESENCE_SUBJECTS).", len(m.presence.entries))
        yield counter("nats_reconnects", "Times the NATS link came back.", self._link.nats_reconnects)
        yield counter("nats_disconnects", "Times the NATS link was lost.", self._link.nats_disconnects)

    def _traffic(self) -> Iterator[Metric]:
        s = self._manager.stats
        yield counter("nats_messages_received", "Messages received from NATS.", s.messages_received)
        yield counter("nats_messages_filtered",
                      "Messages not forwarded because the subject policy denies them.", s.filtered)
        yield counter("frames_sent", "Frames (WebSocket) and events (/events) sent to clients.",
                      s.frames_sent)
        yield counter("bytes_sent", "Bytes of frames and events sent to clients.", s.bytes_sent)
        yield counter("messages_dropped", "Frames dropped for slow clients (drop_oldest policy).", s.dropped)
        yield counter("slow_consumer_disconnects", "Clients closed with 1013 for falling behind.",
                      s.slow_consumer_disconnects)
        yield counter("rate_limit_disconnects", "Clients closed with 1008 for flooding control frames.",
                      s.rate_limit_disconnects)
        yield counter("published", "Messages published from browsers.", s.published)
        yield counter("token_expiries", "Connections closed with 4001: the token expired unrefreshed.",
                      s.token_expiries)
        yield labelled(CounterMetricFamily, "token_refreshes", "Token refreshes on open connections, "
                       "by result.", "result", {r: s.token_refreshes[r] for r in ("ok", "refused")})

    def _jetstream(self) -> Iterator[Metric]:
        js = self._manager.jetstream
        yield labelled(CounterMetricFamily, "jetstream_api_calls", "JetStream API requests the bridge made, "
                       "by call.", "call", js.calls)
        yield labelled(GaugeMetricFamily, "jetstream_consumers", "JetStream consumers held now: live feeds "
                       "and history readers.", "kind",
                       {"feed": js.consumers.feeds, "reader": js.consumers.readers})

    def _requests(self) -> Iterator[Metric]:
        m = self._manager
        yield labelled(CounterMetricFamily, "requests", "Browsers' NATS requests, by how they ended (those "
                       "whose connection closed first are not counted).", "result",
                       {result: m.stats.requests[result] for result in REQUEST_RESULTS})
        yield gauge("requests_in_flight", "Browsers' NATS requests waiting for their answers.",
                    m.requester.in_flight)

    def _refusals(self) -> Iterator[Metric]:
        yield labelled(CounterMetricFamily, "bad_frames", "Control frames answered with an error (a ping "
                       "over the rate: left unanswered), by kind.", "kind", self._manager.stats.bad_frames)
        yield labelled(CounterMetricFamily, "handshake_refusals", "Requests refused before the upgrade (or "
                       "at the control API), by reason.", "reason", self._link.refusals)


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"bridge_{name}", doc, value=value)


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"bridge_{name}", doc, value=value)


def labelled(kind: type[CounterMetricFamily] | type[GaugeMetricFamily], name: str, doc: str, label: str,
             values: Mapping[str, float]) -> Metric:
    """One family with a sample per label value, in label order."""
    family = kind(f"bridge_{name}", doc, labels=[label])
    for value, n in sorted(values.items()):
        family.add_metric([value], n)
    return family


def make_registry(
    manager: WSSManager, link: LinkStats, nats_connected: Callable[[], bool]
) -> CollectorRegistry:
    # A registry per app, not prometheus_client's global one: tests build many apps.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BridgeCollector(manager, link, nats_connected))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def merge(texts: Sequence[str]) -> list[Metric]:
    """Several processes' exposition texts as one: every sample summed over them.

    Every bridge metric is a count (of connections, subscriptions, frames,
    links up), so the host's value is the sum of its workers'.
    """
    families: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                sums[family.name] = {}
            totals = sums[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                totals[key] = totals.get(key, 0.0) + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in sums[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(families.values())


def workers_families(count: int, reporting: int) -> list[Metric]:
    return [
        GaugeMetricFamily("bridge_workers", "Worker processes configured on this host (WORKERS).",
                          value=count),
        GaugeMetricFamily("bridge_workers_reporting",
                          "Workers whose metrics are in this scrape (fewer while one restarts).",
                          value=reporting),
    ]


class _Fixed:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render_families(families: Iterable[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    return generate_latest(registry)
