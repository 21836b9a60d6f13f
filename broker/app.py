"""Run one broker process: wire the parts together, serve, shut down in order.

Shutdown order on SIGTERM or SIGINT: stop accepting, flush and close every
connection with 1001, stop the HTTP API, close the node and its backplane.
The whole sequence is bounded by ``shutdown_timeout``; past it the remaining
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
from broker.http import HttpApi
from broker.node import Node
from broker.server import WebSocketFrontEnd, find_static_dir
from broker.settings import Settings

log = logging.getLogger("broker")


def make_backplane(settings: Settings) -> Backplane:
    """Build the backplane the settings ask for."""
    if settings.backplane == "redis":
        from broker.backplane.redis import RedisBackplane

        return RedisBackplane(
            settings.redis_url,
            prefix=settings.redis_prefix,
            socket_timeout=settings.redis_timeout,
            reconnect_max=settings.redis_reconnect_max,
        )
    return MemoryBackplane()


@dataclass
class Running:
    """What a started broker exposes to whoever started it (tests, the CLI)."""

    node: Node
    ws_port: int
    http_port: int
    stop: asyncio.Event


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
    loop = asyncio.get_running_loop()
    if install_signal_handlers:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)

    node = Node(settings, backplane or make_backplane(settings))
    front = WebSocketFrontEnd(settings, node, find_static_dir())
    api = HttpApi(settings, node)
    await node.start()
    try:
        await front.start()
        await api.start()
        log.info(
            "broker listening: ws://%s:%d/ws, http://%s:%d (backplane %s)",
            settings.host,
            front.port,
            settings.http_host,
            api.port,
            settings.backplane,
            extra={"ws_port": front.port, "http_port": api.port},
        )
        if on_started is not None:
            on_started(Running(node, front.port, api.port, stop))
        await stop.wait()
        log.info("shutting down: %d connections open", len(node.peers))
        try:
            async with asyncio.timeout(settings.shutdown_timeout):
                front.stop_accepting()
                await front.close()
        except TimeoutError:
            log.warning(
                "shutdown deadline of %.1fs passed; dropping %d connections",
                settings.shutdown_timeout,
                len(node.peers),
            )
    finally:
        if install_signal_handlers:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        await api.close()
        await node.close()
        log.info(
            "broker stopped: %d connections served, %d open at exit",
            node.metrics.connections_opened,
            len(node.peers),
        )
