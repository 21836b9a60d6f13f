"""The counters a broker process keeps; plain integers, cheap on the hot path.

Adding to an ``int`` attribute costs a tenth of a ``prometheus_client``
``Counter.inc`` (0.09 against 0.9 µs, measured), and these are bumped per
message. Exposition (the Prometheus text format) is the job of the adapter
that serves ``/metrics`` (``broker.exposition``); it reads ``COUNTERS`` to
name and describe each one, so a counter is named in one place.
"""

from __future__ import annotations

import bisect
from collections import Counter

__all__ = ["COUNTERS", "HISTOGRAMS", "LABELLED", "Histogram", "Metrics"]

#: Latency buckets, seconds: 50 µs to 10 s.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Histogram:
    """Observations counted into fixed buckets; cumulative only when exported.

    ``observe`` is a ``bisect`` and two additions, cheap enough for every
    publish; exposition turns the counts into Prometheus's cumulative buckets.
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value


#: ``Metrics`` attribute, exported name (``_total`` is added), help text.
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("connections_opened", "broker_connections_opened", "WebSocket connections accepted."),
    (
        "connections_rejected",
        "broker_connections_rejected",
        "Connections refused (connection limit or shutting down).",
    ),
    (
        "messages_published",
        "broker_messages_published",
        "Messages accepted from publishers (WebSocket and HTTP) by this process.",
    ),
    (
        "messages_received",
        "broker_messages_received",
        "Messages this process received from the backplane for its subscribers.",
    ),
    (
        "messages_delivered",
        "broker_messages_delivered",
        "Message frames queued to subscriber connections.",
    ),
    (
        "publish_failures",
        "broker_publish_failures",
        "Publishes the backplane could not take (answered unavailable).",
    ),
    (
        "slow_consumer_disconnects",
        "broker_slow_consumer_disconnects",
        "Connections closed with 1013 because their unsent backlog passed the cap.",
    ),
    (
        "abuse_disconnects",
        "broker_abuse_disconnects",
        "Connections closed with 1008 for too many errors in the window.",
    ),
    ("frames_received", "broker_frames_received", "Client frames received."),
    (
        "duplicates_dropped",
        "broker_duplicates_dropped",
        "Messages with an offset already delivered here, dropped.",
    ),
    (
        "messages_recovered",
        "broker_messages_recovered",
        "Messages this process filled from history after a hole or an interruption.",
    ),
    ("gaps_sent", "broker_gaps_sent", "gap frames sent to subscribers."),
    ("bytes_received", "broker_bytes_received", "Bytes of client frames received."),
    ("bytes_sent", "broker_bytes_sent", "Bytes written to WebSocket connections (frames)."),
    (
        "publish_duplicates",
        "broker_publish_duplicates",
        "Publishes whose idempotency key was seen before: acknowledged, not delivered again.",
    ),
    (
        "auth_failures",
        "broker_auth_failures",
        "Tokens refused (auth frames and handshake headers).",
    ),
)


#: ``Metrics`` attribute, exported name (``_seconds`` included), help text.
HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    (
        "publish_ack",
        "broker_publish_ack_seconds",
        "From a WebSocket publish frame read to its acknowledgement queued.",
    ),
    (
        "backplane_publish",
        "broker_backplane_publish_seconds",
        "From a message handed to the backplane to the backplane taking it.",
    ),
    (
        "fanout",
        "broker_fanout_seconds",
        "Time to hand one message to every local subscriber.",
    ),
    (
        "canary_round_trip",
        "broker_canary_round_trip_seconds",
        "Round trip of the readiness canary through the backplane.",
    ),
)


#: ``Metrics`` attribute (a ``Counter``), exported name, label, help text.
LABELLED: tuple[tuple[str, str, str, str], ...] = (
    ("errors", "broker_errors", "code", "Error frames sent, by code."),
    ("http_requests", "broker_http_requests", "route", "Service API requests, by route."),
    ("closes", "broker_connections_closed", "code", "WebSocket connections ended, by close code."),
    (
        "recoveries",
        "broker_recoveries",
        "outcome",
        "Subscribes with since, by outcome: recovered, or why not.",
    ),
)


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
        self.duplicates_dropped = 0
        self.messages_recovered = 0
        self.gaps_sent = 0
        self.auth_failures = 0
        self.publish_duplicates = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.publish_ack = Histogram()
        self.backplane_publish = Histogram()
        self.fanout = Histogram()
        self.canary_round_trip = Histogram()
        #: Error frames sent, by wire code.
        self.errors: Counter[str] = Counter()
        #: Connections closed, by WebSocket close code (1006: no close frame).
        self.closes: Counter[int] = Counter()
        #: Subscribes with since, by outcome ("recovered" or the reason it did not).
        self.recoveries: Counter[str] = Counter()
        #: Service API requests, by route.
        self.http_requests: Counter[str] = Counter()

    def snapshot(self) -> dict[str, object]:
        """Every counter and histogram as plain JSON-able values (for ``--workers``)."""
        return {
            "counters": {attribute: getattr(self, attribute) for attribute, _, _ in COUNTERS},
            "labelled": {
                attribute: {str(k): v for k, v in getattr(self, attribute).items()}
                for attribute, _, _, _ in LABELLED
            },
            "histograms": {
                attribute: {
                    "counts": list(getattr(self, attribute).counts),
                    "sum": getattr(self, attribute).sum,
                    "count": getattr(self, attribute).count,
                }
                for attribute, _, _ in HISTOGRAMS
            },
        }
