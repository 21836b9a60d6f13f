"""What one process exposes on ``/metrics``, and how workers share it.

With ``--workers N`` a scrape reaches whichever worker the kernel picks, so
each worker writes a snapshot of its metrics to a directory the supervisor
created (``metrics_dir``), once a second and when it stops, atomically
(write, then rename). The worker a scrape reaches exposes its own snapshot,
fresh, and the others' files, each series labelled with its ``worker``:
every scrape sees the whole server, at most a second old. A worker that is
replaced starts its counters from zero under the same label, which
Prometheus reads as a counter reset of that series, as it should.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from broker.exposition import Snapshot, process_usage
from broker.node import Node

__all__ = ["gather", "process_snapshot", "share"]

log = logging.getLogger(__name__)

#: Seconds between the snapshots a worker writes.
INTERVAL = 1.0


def process_snapshot(node: Node, *, usage: bool = False) -> dict[str, Any]:
    """This process's snapshot: counters, histograms, gauges, backplane counters, identity."""
    snapshot = node.metrics.snapshot()
    snapshot["gauges"] = {
        "connections": len(node.peers),
        "subscriptions": node.hub.subscription_count,
        "patterns": node.hub.pattern_count,
        "backplane_ready": 1.0 if node.backplane.ready else 0.0,
        "ready": 1.0 if node.ready else 0.0,
        "draining": 1.0 if node.draining else 0.0,
        "max_connections": node.max_connections,
    }
    snapshot["backplane"] = node.backplane.stats()
    snapshot["info"] = {
        "pid": os.getpid(),
        "worker": node.settings.worker_index,
        "backplane": node.settings.backplane,
    }
    if usage:
        snapshot["process"] = process_usage()
    return snapshot


def gather(node: Node) -> tuple[list[Snapshot], bool]:
    """The snapshots a scrape exposes, and whether they are per worker."""
    directory = node.settings.metrics_dir
    if directory is None:
        return [process_snapshot(node)], False
    own = process_snapshot(node, usage=True)
    snapshots: list[Snapshot] = [own]
    for path in sorted(Path(directory).glob("worker-*.json")):
        if path.name == _name(node.settings.worker_index):
            continue
        try:
            snapshots.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            log.debug("cannot read %s: %s", path, exc)  # being replaced: next scrape
    snapshots.sort(key=lambda s: int(s["info"]["worker"]))
    return snapshots, True


async def share(node: Node) -> None:
    """Write this worker's snapshot every ``INTERVAL`` seconds (owned by ``app.run``)."""
    directory = node.settings.metrics_dir
    assert directory is not None
    try:
        while True:
            _write(Path(directory), node)
            await asyncio.sleep(INTERVAL)
    finally:
        with contextlib.suppress(OSError):
            _write(Path(directory), node)  # the final counts, as the worker stops


def _write(directory: Path, node: Node) -> None:
    name = _name(node.settings.worker_index)
    temporary = directory / f".{name}.{os.getpid()}"
    temporary.write_text(json.dumps(process_snapshot(node, usage=True)), encoding="utf-8")
    os.replace(temporary, directory / name)


def _name(index: int) -> str:
    return f"worker-{index}.json"
