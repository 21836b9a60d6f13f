"""The in-memory backplane: the single-process default and the test double."""

from __future__ import annotations

import asyncio

from broker.backplane import DeliverFn
from broker.exceptions import BackplaneError


class MemoryBackplane:
    """Delivers every publish straight back to this process, synchronously.

    Interest is not tracked: the hub's own index already filters channels, so
    with one process there is nothing to save by remembering subscriptions.
    ``fail_publish`` makes publishes fail, to test the ``unavailable`` path.
    """

    def __init__(self) -> None:
        self._deliver: DeliverFn | None = None
        self.fail_publish = False

    @property
    def ready(self) -> bool:
        return self._deliver is not None and not self.fail_publish

    async def start(self, deliver: DeliverFn) -> None:
        self._deliver = deliver

    async def close(self) -> None:
        self._deliver = None

    async def subscribe(self, pattern: str) -> None:
        return None

    async def unsubscribe(self, pattern: str) -> None:
        return None

    def publish(self, channel: str, data: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._deliver is None or self.fail_publish:
            future.set_exception(BackplaneError("memory backplane is not running"))
            return future
        self._deliver(channel, data)
        future.set_result(None)
        return future

    def stats(self) -> dict[str, int]:
        return {}
