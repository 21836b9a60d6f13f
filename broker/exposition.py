"""Prometheus text exposition of the broker's metrics, for ``/metrics``.

The only module that imports ``prometheus_client`` (which loads ``http.server``,
``socket`` and ``threading``): the counters themselves are plain integers in
the core (``broker.metrics``), turned into metric families here at scrape time
by a custom collector, the pattern ``prometheus_client`` documents for values
kept elsewhere.

What is exposed is a list of *process snapshots*: one for a single process,
one per worker with ``--workers`` (each worker writes its own to a directory
the supervisor shares, and whichever worker a scrape reaches exposes them all,
each series labelled with its ``worker``; see ``docs/operations.md``). A
snapshot is ``Metrics.snapshot()`` plus the process's gauges, its backplane's
counters, its identity and, with several workers, its resource usage.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterator, Mapping, Sequence
from importlib.metadata import version as _version_of
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from broker import __version__
from broker.codes import ERROR_CODES
from broker.metrics import COUNTERS, HISTOGRAMS, LABELLED, LATENCY_BUCKETS

__all__ = ["GAUGE_HELP", "Snapshot", "process_usage", "render"]

#: One process's view: ``Metrics.snapshot()`` keys plus "gauges", "backplane",
#: "info" (pid, worker, backplane) and, with workers, "process" (usage).
Snapshot = Mapping[str, Any]

#: Help text of the gauges read from live state.
GAUGE_HELP = {
    "connections": "Open WebSocket connections.",
    "subscriptions": "Active (connection, pattern) subscriptions.",
    "patterns": "Distinct channels and patterns with at least one local subscriber.",
    "backplane_ready": "1 when the backplane's link is up, else 0.",
    "ready": "1 when /readyz answers 200: the canary proves delivery and not draining.",
    "draining": "1 while the process drains after SIGTERM.",
    "max_connections": "Connections this process accepts (max_connections or derived).",
}


def process_usage() -> dict[str, float]:
    """This process's memory, CPU and open files, for a worker's snapshot."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        rss, fds = usage.ru_maxrss * 1024, -1
    return {
        "resident_memory_bytes": float(rss),
        "cpu_seconds_total": usage.ru_utime + usage.ru_stime,
        "open_fds": float(fds),
        "max_fds": float(resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
    }


class _Collector(Collector):
    def __init__(self, snapshots: Sequence[Snapshot], by_worker: bool) -> None:
        self._snapshots = snapshots
        self._by_worker = by_worker

    def _labels(self, snapshot: Snapshot) -> tuple[list[str], list[str]]:
        if not self._by_worker:
            return [], []
        return ["worker"], [str(snapshot["info"]["worker"])]

    def collect(self) -> Iterator[Metric]:
        yield from self._counters()
        yield from self._labelled()
        yield from self._histograms()
        yield from self._gauges()
        yield from self._identity()
        if self._by_worker:
            yield from self._usage()

    def _counters(self) -> Iterator[Metric]:
        backplane_names = sorted({n for s in self._snapshots for n in s["backplane"]})
        families = [(a, n, d) for a, n, d in COUNTERS]
        for attribute, name, doc in families:
            keys, _ = self._labels(self._snapshots[0])
            family = CounterMetricFamily(name, doc, labels=keys)
            for snapshot in self._snapshots:
                family.add_metric(self._labels(snapshot)[1], snapshot["counters"][attribute])
            yield family
        for name in backplane_names:
            keys, _ = self._labels(self._snapshots[0])
            family = CounterMetricFamily(
                f"broker_backplane_{name}",
                f"Backplane counter: {name.replace('_', ' ')}.",
                labels=keys,
            )
            for snapshot in self._snapshots:
                family.add_metric(self._labels(snapshot)[1], snapshot["backplane"].get(name, 0))
            yield family

    def _labelled(self) -> Iterator[Metric]:
        for attribute, name, label, doc in LABELLED:
            keys, _ = self._labels(self._snapshots[0])
            family = CounterMetricFamily(name, doc, labels=[*keys, label])
            for snapshot in self._snapshots:
                values = dict(snapshot["labelled"][attribute])
                if attribute == "errors":  # every code, so alerts see zeros
                    values = {code: values.get(code, 0) for code in ERROR_CODES}
                for value, count in sorted(values.items()):
                    family.add_metric([*self._labels(snapshot)[1], value], count)
            yield family

    def _histograms(self) -> Iterator[Metric]:
        bounds = [*(f"{b:g}" for b in LATENCY_BUCKETS), "+Inf"]
        for attribute, name, doc in HISTOGRAMS:
            keys, _ = self._labels(self._snapshots[0])
            family = HistogramMetricFamily(name, doc, labels=keys)
            for snapshot in self._snapshots:
                data = snapshot["histograms"][attribute]
                running, buckets = 0, []
                for bound, count in zip(bounds, data["counts"], strict=True):
                    running += count
                    buckets.append((bound, running))
                family.add_metric(self._labels(snapshot)[1], buckets, data["sum"])
            yield family

    def _gauges(self) -> Iterator[Metric]:
        names = list(self._snapshots[0]["gauges"])
        for name in names:
            keys, _ = self._labels(self._snapshots[0])
            family = GaugeMetricFamily(f"broker_{name}", GAUGE_HELP.get(name, name), labels=keys)
            for snapshot in self._snapshots:
                family.add_metric(self._labels(snapshot)[1], snapshot["gauges"].get(name, 0))
            yield family

    def _identity(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "broker_process_info",
            "This process (pid, worker index, backplane).",
            labels=["backplane", "pid", "worker"],
        )
        for snapshot in self._snapshots:
            identity = snapshot["info"]
            info.add_metric(
                [str(identity["backplane"]), str(identity["pid"]), str(identity["worker"])], 1
            )
        yield info
        build = GaugeMetricFamily(
            "broker_build_info",
            "The broker's version and the versions it runs on.",
            labels=["version", "python", "websockets"],
        )
        python = ".".join(str(part) for part in sys.version_info[:3])
        build.add_metric([__version__, python, _version_of("websockets")], 1)
        yield build

    def _usage(self) -> Iterator[Metric]:
        docs = {
            "resident_memory_bytes": ("process_resident_memory_bytes", "Resident memory."),
            "open_fds": ("process_open_fds", "Open file descriptors."),
            "max_fds": ("process_max_fds", "The open-files limit."),
        }
        for key, (name, doc) in docs.items():
            family = GaugeMetricFamily(name, doc, labels=["worker"])
            for snapshot in self._snapshots:
                family.add_metric(self._labels(snapshot)[1], snapshot["process"][key])
            yield family
        cpu = CounterMetricFamily("process_cpu_seconds", "User and system CPU.", labels=["worker"])
        for snapshot in self._snapshots:
            cpu.add_metric(self._labels(snapshot)[1], snapshot["process"]["cpu_seconds_total"])
        yield cpu


def render(snapshots: Sequence[Snapshot], *, by_worker: bool = False) -> bytes:
    """The Prometheus text exposition of ``snapshots``.

    One process (``by_worker`` false): unlabelled series, plus the standard
    ``process_*`` metrics of this process. Several workers: every series
    labelled ``worker``, and each worker's usage from its snapshot.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snapshots, by_worker))
    if not by_worker:
        ProcessCollector(registry=registry)
    return generate_latest(registry)
