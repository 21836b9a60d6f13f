"""The in-memory backplane: the single-process default and the test double."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from broker.backplane import PUBLISHED, Listener, Published
from broker.backplane.memory_history import IdempotencyKeys, MemoryHistory
from broker.exceptions import BackplaneError
from broker.history import HistoryPolicy, HistoryRead

if TYPE_CHECKING:
    from broker.backplane import Backplane

__all__ = ["MemoryBackplane"]


class MemoryBackplane:
    """Delivers every publish straight back to this process, synchronously.

    Interest is not tracked: the hub's own index already filters channels, so
    with one process there is nothing to save by remembering subscriptions.
    History (offsets, epochs, kept messages) and idempotency keys live in this
    process's memory (``memory_history``), bounded by ``history_max_bytes``,
    ``history_meta_ttl`` and ``idempotency_window``. ``fail_publish`` and
    ``fail_reads`` make those fail, to test the ``unavailable`` paths.
    """

    def __init__(
        self,
        *,
        history_max_bytes: int = 64 * 1024 * 1024,
        history_meta_ttl: float = 86400.0,
        idempotency_window: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._listener: Listener | None = None
        self.history = MemoryHistory(max_bytes=history_max_bytes, meta_ttl=history_meta_ttl)
        self.keys = IdempotencyKeys(idempotency_window)
        self._clock = clock
        self._expired_at = 0.0
        self.fail_publish = False
        self.fail_reads = False

    @property
    def ready(self) -> bool:
        return self._listener is not None and not self.fail_publish

    async def start(self, listener: Listener) -> None:
        self._listener = listener

    async def close(self) -> None:
        self._listener = None

    async def subscribe(self, pattern: str) -> None:
        return None

    async def unsubscribe(self, pattern: str) -> None:
        return None

    def publish(
        self,
        channel: str,
        data: bytes,
        *,
        history: HistoryPolicy | None = None,
        key: str | None = None,
    ) -> asyncio.Future[Published]:
        future: asyncio.Future[Published] = asyncio.get_running_loop().create_future()
        listener = self._listener
        if listener is None or self.fail_publish:
            future.set_exception(BackplaneError("memory backplane is not running"))
            return future
        now = self._clock()
        if key is not None:
            first = self.keys.get(channel, key, now)
            if first is not None:
                future.set_result(Published(first.position, duplicate=True))
                return future
        if history is None:
            published = PUBLISHED
            listener.deliver(channel, data, None)
        else:
            position = self.history.append(channel, data, history, now)
            published = Published(position)
            listener.deliver(channel, data, position)
            if now - self._expired_at > 60.0:
                self._expired_at = now
                self.history.expire(now)
        if key is not None:
            self.keys.put(channel, key, published, now)
        future.set_result(published)
        return future

    async def read(
        self,
        channel: str,
        history: HistoryPolicy,
        *,
        after: int | None = None,
        last: int | None = None,
    ) -> HistoryRead:
        if self._listener is None or self.fail_reads:
            raise BackplaneError("memory backplane cannot read history now")
        return self.history.read(channel, history, self._clock(), after=after, last=last)

    def stats(self) -> dict[str, int]:
        return {}


if TYPE_CHECKING:

    def _implements_backplane(backplane: MemoryBackplane) -> Backplane:
        return backplane  # mypy checks MemoryBackplane against the Protocol here
