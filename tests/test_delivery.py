"""The receiving side (``delivery.Delivery``): order, holes filled from history, gaps.

Messages are fed straight into the listener, as a backplane would; a memory
backplane's history store plays the channel's history (what was published
while this process was not looking is appended to it directly).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from broker.backplane.memory import MemoryBackplane
from broker.delivery import Delivery
from broker.history import HistoryPolicy
from broker.hub import Hub
from broker.metrics import Metrics
from broker.position import Position
from tests.wait import until

POLICY = HistoryPolicy(size=100, ttl=1e9)


class Peer:
    """Records messages (data and offset) and other frames, in arrival order."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def deliver(self, payload: bytes) -> None:
        self.frames.append(orjson.loads(payload))

    def send(self, payload: bytes) -> None:
        self.frames.append(orjson.loads(payload))

    def offsets(self, channel: str) -> list[int]:
        return [
            f["offset"] for f in self.frames if f["op"] == "message" and f["channel"] == channel
        ]

    def gaps(self) -> list[tuple[str, str]]:
        return [(f["channel"], f["reason"]) for f in self.frames if f["op"] == "gap"]


class Setup:
    def __init__(self, history: dict[str, HistoryPolicy] | None = None) -> None:
        self.metrics = Metrics()
        self.backplane = MemoryBackplane()
        self.hub = Hub(self.backplane, self.metrics)
        policies = {"h.a": POLICY, "h.b": POLICY} if history is None else history
        self.delivery = Delivery(self.hub, self.backplane, policies.get, self.metrics)

    async def start(self) -> None:
        await self.backplane.start(self.delivery)

    def publish_unseen(self, channel: str, count: int) -> list[Position]:
        """Messages that reached history but not this process (lost on the link)."""
        return [
            self.backplane.history.append(channel, b'"unseen"', POLICY, now=0.0)
            for _ in range(count)
        ]

    def publish_seen(self, channel: str) -> Position:
        position = self.backplane.history.append(channel, b'"seen"', POLICY, now=0.0)
        self.delivery.deliver(channel, b'"seen"', position)
        return position


async def subscribed(setup: Setup, *patterns: str) -> Peer:
    peer = Peer()
    for pattern in patterns:
        await setup.hub.subscribe(pattern, peer)
    return peer


async def test_in_order_messages_pass_and_copies_are_dropped() -> None:
    s = Setup()
    await s.start()
    peer = await subscribed(s, "h.a")
    positions = [s.publish_seen("h.a") for _ in range(3)]
    s.delivery.deliver("h.a", b'"copy"', positions[1])
    assert peer.offsets("h.a") == [1, 2, 3]
    assert s.metrics.duplicates_dropped == 1


async def test_a_hole_is_filled_from_history_before_the_newer_message() -> None:
    s = Setup()
    await s.start()
    peer = await subscribed(s, "h.a", "h.>")
    s.publish_seen("h.a")
    s.publish_unseen("h.a", 3)  # offsets 2-4 lost on the way
    fifth = s.publish_seen("h.a")  # 5 arrives: a hole
    sixth = s.publish_seen("h.a")  # 6 arrives while the hole is being filled
    assert fifth.offset == 5 and sixth.offset == 6
    await until(lambda: len(peer.offsets("h.a")) == 6)
    assert peer.offsets("h.a") == [1, 2, 3, 4, 5, 6]  # once per connection, in order
    assert peer.gaps() == [] and s.metrics.messages_recovered == 3


async def test_a_hole_history_no_longer_holds_is_a_gap_for_every_matching_subscription() -> None:
    s = Setup({"h.a": HistoryPolicy(size=2, ttl=1e9)})
    await s.start()
    exact, pattern, other = Peer(), Peer(), Peer()
    await s.hub.subscribe("h.a", exact)
    await s.hub.subscribe("h.*", pattern)
    await s.hub.subscribe("h.b", other)
    s.publish_seen("h.a")
    for _ in range(5):
        s.backplane.history.append("h.a", b"0", HistoryPolicy(size=2, ttl=1e9), now=0.0)
    last = s.backplane.history.append("h.a", b"7", HistoryPolicy(size=2, ttl=1e9), now=0.0)
    s.delivery.deliver("h.a", b"7", last)
    await until(lambda: 7 in exact.offsets("h.a"))
    assert exact.gaps() == [("h.a", "offset_hole")] and pattern.gaps() == [("h.*", "offset_hole")]
    assert exact.offsets("h.a") == [1, 7] and other.frames == []


async def test_after_an_interruption_history_fills_and_the_rest_get_one_gap() -> None:
    s = Setup()
    await s.start()
    exact = await subscribed(s, "h.a")
    quiet = await subscribed(s, "h.b")
    pattern = await subscribed(s, "h.>")
    plain = await subscribed(s, "plain")
    s.publish_seen("h.a")
    s.delivery.seed("h.b", s.backplane.history.read("h.b", POLICY, now=0.0).position)
    s.delivery.link_lost()
    s.publish_unseen("h.a", 2)
    s.publish_unseen("h.b", 1)  # h.b had never delivered anything here
    s.delivery.link_restored()
    await until(lambda: len(exact.offsets("h.a")) == 3 and len(quiet.offsets("h.b")) == 1)
    assert exact.offsets("h.a") == [1, 2, 3] and exact.gaps() == []
    assert quiet.offsets("h.b") == [1] and quiet.gaps() == []
    assert plain.gaps() == [("plain", "backplane_interrupted")]
    assert pattern.gaps() == [("h.>", "backplane_interrupted")]
    # The pattern subscriber also gets what history held of the channels it saw.
    await until(lambda: pattern.offsets("h.a") == [1, 2, 3])


async def test_a_channel_history_cannot_fill_gets_its_gap_after_an_interruption() -> None:
    s = Setup({"h.a": HistoryPolicy(size=1, ttl=1e9)})
    await s.start()
    exact = await subscribed(s, "h.a")
    s.delivery.deliver(
        "h.a", b"1", s.backplane.history.append("h.a", b"1", HistoryPolicy(1, 1e9), 0.0)
    )
    s.delivery.canary_late()
    for _ in range(3):
        s.backplane.history.append("h.a", b"x", HistoryPolicy(1, 1e9), now=0.0)
    s.delivery.canary_ok()
    await until(lambda: exact.gaps() != [])
    assert exact.gaps() == [("h.a", "backplane_interrupted")]
    # Live delivery goes on from the new top, without another gap.
    nxt = s.backplane.history.append("h.a", b"5", HistoryPolicy(1, 1e9), now=0.0)
    s.delivery.deliver("h.a", b"5", nxt)
    assert exact.offsets("h.a") == [1, 5] and len(exact.gaps()) == 1


async def test_link_and_canary_together_make_one_interruption() -> None:
    s = Setup()
    await s.start()
    plain = await subscribed(s, "plain")
    s.delivery.link_lost()
    s.delivery.canary_late()
    s.delivery.link_restored()
    assert plain.gaps() == []  # the canary is still late: not resumed yet
    s.delivery.canary_ok()
    assert plain.gaps() == [("plain", "backplane_interrupted")]
    s.delivery.link_restored()  # nothing was lost again
    assert len(plain.gaps()) == 1


async def test_a_seeded_track_delivers_what_was_in_flight() -> None:
    s = Setup()
    await s.start()
    peer = await subscribed(s, "h.a")
    first = s.backplane.history.append("h.a", b"1", POLICY, now=0.0)
    s.delivery.seed("h.a", first)  # the subscribe read offset 1 before it arrived live
    s.delivery.deliver("h.a", b"1", first)  # ...and here it is
    s.publish_seen("h.a")
    assert peer.offsets("h.a") == [1, 2]


async def test_an_epoch_change_is_told_and_starts_counting_again() -> None:
    s = Setup()
    await s.start()
    peer = await subscribed(s, "h.a")
    s.delivery.deliver("h.a", b"1", Position(7, "old"))
    s.delivery.deliver("h.a", b"2", Position(1, "new"))
    s.delivery.deliver("h.a", b"3", Position(2, "new"))
    # The old epoch's tail may be lost for good: said once; the new epoch counts from 1.
    assert peer.offsets("h.a") == [7, 1, 2] and peer.gaps() == [("h.a", "epoch_changed")]


async def test_an_epoch_that_never_had_a_message_changes_without_a_gap() -> None:
    s = Setup()
    await s.start()
    peer = await subscribed(s, "h.a")
    s.delivery.seed("h.a", Position(0, "quiet"))  # the subscribe read a channel never published
    s.delivery.deliver("h.a", b"1", Position(1, "new"))  # ...whose unused epoch then expired
    s.delivery.deliver("h.a", b"2", Position(2, "new"))
    assert peer.offsets("h.a") == [1, 2] and peer.gaps() == []


async def test_the_brokers_own_channels_never_reach_subscribers() -> None:
    s = Setup()
    await s.start()
    peer = await subscribed(s, ">")
    got: list[bytes] = []
    s.delivery.internal["$canary.n1"] = got.append
    s.delivery.deliver("$canary.n1", b"1", None)
    s.delivery.deliver("$canary.other", b"2", None)  # nobody's: dropped
    assert got == [b"1"] and peer.frames == []
    await asyncio.sleep(0)


async def test_after_an_interruption_a_lost_history_is_told_not_refilled_silently() -> None:
    s = Setup()
    await s.start()
    peer = await subscribed(s, "h.a")
    s.publish_seen("h.a")
    s.delivery.link_lost()
    s.backplane.history = type(s.backplane.history)()  # Redis flushed: a new epoch
    s.publish_unseen("h.a", 2)
    s.delivery.link_restored()
    await until(lambda: len(peer.offsets("h.a")) == 3)
    assert peer.gaps() == [("h.a", "backplane_interrupted")]
    assert peer.offsets("h.a") == [1, 1, 2]  # the new epoch's, from its start
