"""Counters the broker keeps, and their Prometheus exposition.

The hot path only adds to plain integers; ``prometheus_client`` formats them
when ``/metrics`` is scraped, so the text format is not written by hand.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.exceptions import ERROR_CODES


class Metrics:
    """The broker's own counters; gauges are read from live state at scrape time."""

    def __init__(self) -> None:
        self.connections_opened = 0
        self.connections_closed = 0
        self.connections_rejected = 0
        self.messages_published = 0
        self.messages_received = 0
        self.messages_delivered = 0
        self.publish_failures = 0
        self.slow_consumer_disconnects = 0
        self.abuse_disconnects = 0
        self.frames_received = 0
        self.errors: Counter[str] = Counter()
        self.http_requests: Counter[str] = Counter()


class _Collector(Collector):
    def __init__(
        self,
        metrics: Metrics,
        gauges: Callable[[], dict[str, float]],
        backplane: Callable[[], dict[str, int]],
        info: dict[str, str],
    ) -> None:
        self._metrics = metrics
        self._gauges = gauges
        self._backplane = backplane
        self._info = info

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        counters = (
            (
                "broker_connections_opened",
                "WebSocket connections accepted.",
                m.connections_opened,
            ),
            ("broker_connections_closed", "WebSocket connections ended.", m.connections_closed),
            (
                "broker_connections_rejected",
                "Connections refused (connection limit or shutting down).",
                m.connections_rejected,
            ),
            (
                "broker_messages_published",
                "Messages accepted from publishers (WebSocket and HTTP) by this process.",
                m.messages_published,
            ),
            (
                "broker_messages_received",
                "Messages this process received from the backplane for its subscribers.",
                m.messages_received,
            ),
            (
                "broker_messages_delivered",
                "Message frames queued to subscriber connections.",
                m.messages_delivered,
            ),
            (
                "broker_publish_failures",
                "Publishes the backplane could not take (answered unavailable).",
                m.publish_failures,
            ),
            (
                "broker_slow_consumer_disconnects",
                "Connections closed with 1013 because their unsent backlog passed the cap.",
                m.slow_consumer_disconnects,
            ),
            (
                "broker_abuse_disconnects",
                "Connections closed with 1008 for too many errors in the window.",
                m.abuse_disconnects,
            ),
            ("broker_frames_received", "Client frames received.", m.frames_received),
        )
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family
        errors = CounterMetricFamily(
            "broker_errors", "Error frames sent, by code.", labels=["code"]
        )
        for code in ERROR_CODES:
            errors.add_metric([code], m.errors.get(code, 0))
        yield errors
        http = CounterMetricFamily(
            "broker_http_requests", "Service API requests, by route.", labels=["route"]
        )
        for route, count in sorted(m.http_requests.items()):
            http.add_metric([route], count)
        yield http
        for name, count in sorted(self._backplane().items()):
            family = CounterMetricFamily(
                f"broker_backplane_{name}", f"Backplane counter: {name.replace('_', ' ')}."
            )
            family.add_metric([], count)
            yield family
        info = GaugeMetricFamily(
            "broker_process_info",
            "This process (pid, worker index, backplane).",
            labels=sorted(self._info),
        )
        info.add_metric([self._info[key] for key in sorted(self._info)], 1)
        yield info
        for name, reading in self._gauges().items():
            gauge = GaugeMetricFamily(f"broker_{name}", _GAUGE_HELP.get(name, name))
            gauge.add_metric([], reading)
            yield gauge


_GAUGE_HELP = {
    "connections": "Open WebSocket connections.",
    "subscriptions": "Active (connection, pattern) subscriptions.",
    "patterns": "Distinct channels and patterns with at least one local subscriber.",
    "backplane_ready": "1 when the backplane can carry messages, else 0.",
}


def render(
    metrics: Metrics,
    gauges: Callable[[], dict[str, float]],
    backplane: Callable[[], dict[str, int]] = dict,
    info: dict[str, str] | None = None,
) -> bytes:
    """Return the Prometheus text exposition of ``metrics``, live ``gauges``,
    the backplane's counters and an info metric labelled with ``info``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(metrics, gauges, backplane, info or {}))
    return generate_latest(registry)
