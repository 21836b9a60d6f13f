"""The readiness canary on its own: ready only while canaries come back within budget.

A memory backplane that can be told to swallow messages (a link that looks up
but delivers nothing, which the backplane itself cannot see), a real event
loop with short intervals, and a stand-in for the delivery that records what
the canary told it.
"""

from __future__ import annotations

from broker.backplane.memory import MemoryBackplane
from broker.canary import Canary
from broker.metrics import Metrics
from broker.position import Position
from tests.wait import until


class Swallowing(MemoryBackplane):
    """Publishes succeed; while ``swallow`` is set, its listener drops what arrives."""

    swallow = False


class Recorder:
    """What ``Delivery`` offers the canary: the internal handlers, and late/ok."""

    def __init__(self) -> None:
        self.internal: dict[str, object] = {}
        self.events: list[str] = []

    def canary_late(self) -> None:
        self.events.append("late")

    def canary_ok(self) -> None:
        self.events.append("ok")


class Listener:
    def __init__(self, backplane: Swallowing, delivery: Recorder) -> None:
        self.backplane = backplane
        self.delivery = delivery

    def deliver(self, channel: str, data: bytes, position: Position | None) -> None:
        handler = self.delivery.internal.get(channel)
        if handler is not None and not self.backplane.swallow:
            handler(data)  # type: ignore[operator]

    def link_lost(self) -> None: ...

    def link_restored(self) -> None: ...


async def test_ready_only_while_canaries_come_back_in_time() -> None:
    backplane = Swallowing()
    delivery = Recorder()
    await backplane.start(Listener(backplane, delivery))
    metrics = Metrics()
    canary = Canary(backplane, delivery, metrics, "n1", interval=0.05, budget=0.1)  # type: ignore[arg-type]
    assert not canary.ready  # nothing proven yet
    await canary.start()
    try:
        await until(lambda: canary.ready, 2)
        assert canary.last_round_trip is not None and canary.last_round_trip < 0.1
        # The link looks up (publishes succeed) but delivers nothing.
        backplane.swallow = True
        await until(lambda: not canary.ready, 2)
        await until(lambda: delivery.events == ["late"], 2)
        assert backplane.ready  # the backplane itself did not notice: only the canary did
        backplane.swallow = False
        await until(lambda: canary.ready, 2)
        await until(lambda: delivery.events == ["late", "ok"], 2)
    finally:
        await canary.close()
    assert "$canary.n1" not in delivery.internal
    await backplane.close()
