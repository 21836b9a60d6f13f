"""Run a real broker inside the test's event loop, on ephemeral ports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from broker.app import Running, run
from broker.backplane import Backplane
from broker.settings import Settings


def make_settings(**overrides: Any) -> Settings:
    """Settings for tests: loopback, ephemeral ports, quiet, with ``overrides``."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "http_port": 0,
        "log_level": "warning",
        "shutdown_timeout": 5.0,
    }
    values.update(overrides)
    return Settings.model_validate(values)


@asynccontextmanager
async def running_broker(
    backplane: Backplane | None = None, **overrides: Any
) -> AsyncIterator[Running]:
    """Start a broker with ``overrides``; stop it (gracefully) on exit."""
    started: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(
        run(
            make_settings(**overrides),
            backplane=backplane,
            on_started=started.set_result,
            stop=stop,
            install_signal_handlers=False,
        )
    )
    try:
        done, _ = await asyncio.wait({started, task}, timeout=10, return_when="FIRST_COMPLETED")
        if task in done:
            task.result()  # raises what made the broker fail to start
        if started not in done:
            raise TimeoutError("broker did not start within 10 s")
        yield started.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)
