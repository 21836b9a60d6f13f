"""Run one broker process: wire the parts together, serve, shut down in order.

SIGTERM *drains* (a restart, a deploy, a scale-down): ``/readyz`` turns 503
and new WebSocket handshakes get HTTP 503 at once; after ``drain_grace`` (for
load balancers to notice) the connections are closed with 1012 in batches
spread over ``drain_spread``, so their reconnects (with ``since``) land on the
other processes gradually instead of all at once. SIGINT (Ctrl-C), or the
``stop`` event of an in-process run, closes at once with 1001.

Then, in order: wait for the connection handlers, stop the HTTP API (which
answers until here), close the node and its backplane. Draining and closing
connections is bounded by ``shutdown_timeout``; past it the remaining
connections are dropped and the process still exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

from broker.backplane import Backplane
from broker.backplane.memory import MemoryBackplane
from broker.codes import CloseCode
from broker.http import HttpApi
from broker.limits import default_max_connections, open_files_limit
from broker.node import Node
from broker.server import WebSocketFrontEnd, find_static_dir
from broker.settings import Settings
from broker.snapshots import gather, share
from broker.tokens import verifier_from_settings

log = logging.getLogger("broker")


def make_backplane(settings: Settings) -> Backplane:
    """Build the backplane the settings ask for."""
    if settings.backplane == "redis-cluster":
        from broker.backplane.redis_cluster import ClusterBackplane

        return ClusterBackplane(
            [url.strip() for url in settings.redis_url.split(",") if url.strip()],
            prefix=settings.redis_prefix,
            socket_timeout=settings.redis_timeout,
            reconnect_max=settings.redis_reconnect_max,
            buckets=settings.redis_cluster_buckets,
            history_meta_ttl=settings.history_meta_ttl,
            idempotency_window=settings.idempotency_window,
        )
    if settings.backplane == "redis":
        from broker.backplane.redis import RedisBackplane

        return RedisBackplane(
            settings.redis_url,
            prefix=settings.redis_prefix,
            socket_timeout=settings.redis_timeout,
            reconnect_max=settings.redis_reconnect_max,
            history_meta_ttl=settings.history_meta_ttl,
            idempotency_window=settings.idempotency_window,
        )
    return MemoryBackplane(
        history_max_bytes=settings.history_max_bytes,
        history_meta_ttl=settings.history_meta_ttl,
        idempotency_window=settings.idempotency_window,
    )


@dataclass
class Running:
    """What a started broker exposes to whoever started it (tests, the CLI).

    Set ``drain`` (then ``stop``) to shut down as on SIGTERM; ``stop`` alone
    shuts down as on SIGINT.
    """

    node: Node
    ws_port: int
    http_port: int
    stop: asyncio.Event
    drain: asyncio.Event


async def run(
    settings: Settings,
    *,
    backplane: Backplane | None = None,
    on_started: Callable[[Running], None] | None = None,
    stop: asyncio.Event | None = None,
    install_signal_handlers: bool = True,
) -> None:
    """Serve until ``stop`` is set or a SIGTERM/SIGINT arrives, then shut down."""
    stop = stop or asyncio.Event()
    drain = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_sigterm() -> None:
        drain.set()
        stop.set()

    if install_signal_handlers:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        loop.add_signal_handler(signal.SIGINT, stop.set)

    node = Node(
        settings,
        backplane or make_backplane(settings),
        verifier=verifier_from_settings(settings),
        max_connections=default_max_connections(),
    )
    front = WebSocketFrontEnd(settings, node, find_static_dir())
    api = HttpApi(settings, node)
    background: list[asyncio.Task[None]] = []  # owned here, ended in the finally below
    await node.start()
    listening = False
    try:
        await front.start()
        await api.start()
        listening = True
        log.info(
            "broker listening: ws://%s:%d/ws, http://%s:%d (backplane %s)",
            settings.host,
            front.port,
            settings.http_host,
            api.port,
            settings.backplane,
            extra={"ws_port": front.port, "http_port": api.port},
        )
        log.info(
            "accepting at most %d connections (open files limit %d)%s",
            node.max_connections,
            open_files_limit(),
            "" if settings.max_connections is None else ", as max_connections says",
        )
        if on_started is not None:
            on_started(Running(node, front.port, api.port, stop, drain))
        if settings.log_summary_interval > 0:
            background.append(
                loop.create_task(_summaries(node, settings.log_summary_interval), name="summary")
            )
        if settings.metrics_dir is not None:
            background.append(loop.create_task(share(node), name="metrics snapshots"))
            if install_signal_handlers:
                loop.add_signal_handler(
                    signal.SIGUSR1,
                    lambda: background.append(
                        loop.create_task(_shed(node, front, settings), name="rebalance")
                    ),
                )
        await stop.wait()
        node.draining = True  # /readyz 503 and handshakes 503 from now on
        try:
            async with asyncio.timeout(settings.shutdown_timeout):
                if drain.is_set():
                    log.info(
                        "draining %s: closing them with 1012 over %.1f s in %.1f s",
                        _connections(len(node.peers)),
                        settings.drain_spread,
                        settings.drain_grace,
                    )
                    await asyncio.sleep(settings.drain_grace)
                    await front.drain(settings.drain_spread)
                    await front.close(CloseCode.RESTART, "service restart")
                else:
                    log.info("shutting down: %s open", _connections(len(node.peers)))
                    front.stop_accepting()
                    await front.close()
        except TimeoutError:
            log.warning(
                "shutdown deadline of %.1fs passed; dropping %d connections",
                settings.shutdown_timeout,
                len(node.peers),
            )
    finally:
        # The handlers stay until the end: a second SIGTERM while shutting down
        # must not kill the process half way (it only sets ``stop`` again).
        try:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await api.close()
            await node.close()
        finally:
            if install_signal_handlers:
                loop.remove_signal_handler(signal.SIGUSR1)
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(signum)
                    # Exiting anyway: a late SIGTERM must not turn exit 0 into -15.
                    signal.signal(signum, signal.SIG_IGN)
        if listening:  # a port that could not be bound is the caller's error line
            log.info(
                "broker stopped: %s served, %d open at exit",
                _connections(node.metrics.connections_opened),
                len(node.peers),
            )


def _connections(count: int) -> str:
    return f"{count} connection{'' if count == 1 else 's'}"


async def _summaries(node: Node, interval: float) -> None:
    """Log one line on the process's state every ``interval`` seconds (owned by ``run``)."""
    while True:
        await asyncio.sleep(interval)
        log.info("summary: %s", node.summary())


async def _shed(node: Node, front: WebSocketFrontEnd, settings: Settings) -> None:
    """Close, with 1012, the connections this worker holds above the workers' average.

    The supervisor asks (SIGUSR1) when a replaced worker is ready again; the
    average comes from the workers' shared snapshots (``broker.snapshots``).
    """
    snapshots, _ = gather(node)
    total = sum(int(s["gauges"]["connections"]) for s in snapshots)
    target = -(-total // max(1, len(snapshots)))  # ceiling
    excess = len(node.peers) - target
    if excess <= 0 or node.draining:
        return
    log.info("rebalancing: closing %d of %d connections with 1012", excess, len(node.peers))
    await front.drain(settings.drain_spread, reason="rebalancing", limit=excess)
