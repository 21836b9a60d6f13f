"""The readiness canary: proof that this process's backplane delivers, not just connects.

Theory of operation. Every ``interval`` seconds the canary publishes a small
message on its own channel (``$canary.<node id>``: a name no client can use)
through the backplane, and the backplane brings it back like any other
message. The process is *ready* (``/readyz`` 200) while the latest canary that
came back did so within ``budget`` seconds, and no canary has been out longer
than ``budget``. So a process turns unready within ``interval + budget``
seconds after its backplane stops delivering, and ready again within about
``interval`` after it delivers again; with the defaults (1 s, 2 s) both are
within the protocol's 5 s.

A canary out longer than ``budget`` tells ``Delivery`` that delivery may have
stopped (``canary_late``); the next one back tells it delivery works again
(``canary_ok``), which makes it fill from history or send ``gap`` frames for
what may have been lost meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable

import orjson

from broker.backplane import Backplane, Published
from broker.delivery import Delivery
from broker.exceptions import BackplaneError
from broker.metrics import Metrics

__all__ = ["CANARY_PREFIX", "Canary"]

log = logging.getLogger(__name__)

#: The canary channel is this plus the node's id; "$" is never in a client's channel.
CANARY_PREFIX = "$canary."


class Canary:
    """Sends canaries through ``backplane`` and tells whether they come back in time."""

    def __init__(
        self,
        backplane: Backplane,
        delivery: Delivery,
        metrics: Metrics,
        node_id: str,
        *,
        interval: float = 1.0,
        budget: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.channel = CANARY_PREFIX + node_id
        self._backplane = backplane
        self._delivery = delivery
        self._metrics = metrics
        self._interval = interval
        self._budget = budget
        self._clock = clock
        self._sequence = 0
        self._out: dict[int, float] = {}  # canaries sent and not yet back: number -> time
        self._last_good: float | None = None  # when the latest canary back in time was sent
        self._late = False
        self._task: asyncio.Task[None] | None = None
        #: Round trip of the latest canary back, in seconds (None before the first).
        self.last_round_trip: float | None = None

    @property
    def ready(self) -> bool:
        """Whether delivery through the backplane is proven recent (see the module docstring)."""
        if self._last_good is None:
            return False
        now = self._clock()
        if now - self._last_good > self._interval + self._budget:
            return False
        return not any(now - sent > self._budget for sent in self._out.values())

    async def start(self) -> None:
        """Subscribe to the canary channel and start sending (the first one at once)."""
        self._delivery.internal[self.channel] = self._received
        await self._backplane.subscribe(self.channel)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="canary")

    async def close(self) -> None:
        """Stop sending; idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._delivery.internal.pop(self.channel, None)

    async def _run(self) -> None:
        while True:
            self._send()
            await asyncio.sleep(self._interval)
            self._check()

    def _send(self) -> None:
        self._sequence += 1
        number = self._sequence
        now = self._clock()
        self._out[number] = now
        # Forget canaries lost for good (a publish that failed, a dropped link).
        for old in [n for n, sent in self._out.items() if now - sent > 10 * self._budget]:
            del self._out[old]
        future = self._backplane.publish(self.channel, b"%d" % number)
        future.add_done_callback(functools.partial(self._published, number))

    def _published(self, number: int, future: asyncio.Future[Published]) -> None:
        if future.cancelled():
            self._out.pop(number, None)
            return
        exc = future.exception()
        if exc is not None:
            # It will never come back, and the backplane already knows why (its
            # link is down): not a canary that is late, one that was never sent.
            self._out.pop(number, None)
            if not isinstance(exc, BackplaneError):
                log.error("canary publish failed unexpectedly", exc_info=exc)

    def _received(self, data: bytes) -> None:
        try:
            number = int(orjson.loads(data))
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return
        sent = self._out.pop(number, None)
        if sent is None:
            return  # long forgotten, or another process's (same name: cannot happen)
        now = self._clock()
        self.last_round_trip = now - sent
        self._metrics.canary_round_trip.observe(self.last_round_trip)
        # Older canaries still out will not come back sooner than this one did.
        for old in [n for n in self._out if n < number]:
            del self._out[old]
        if self.last_round_trip <= self._budget:
            self._last_good = sent
        if self._late:
            self._late = False
            log.info("readiness canary back after %.2f s", self.last_round_trip)
            self._delivery.canary_ok()

    def _check(self) -> None:
        now = self._clock()
        late = any(now - sent > self._budget for sent in self._out.values())
        if late and not self._late:
            self._late = True
            # A link the backplane knows is down has been reported already; a
            # link that looks up but does not deliver is worth a warning.
            level = logging.WARNING if self._backplane.ready else logging.INFO
            log.log(level, "readiness canary not back within %.1f s", self._budget)
            self._delivery.canary_late()
