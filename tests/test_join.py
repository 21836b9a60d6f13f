"""A subscribe with history joining the live stream while messages are still on their way.

The history read and the live stream come on different connections, so a
read may already hold messages this process has not delivered yet. Here the
node runs on a memory backplane whose history is appended to directly (the
message "reached Redis"), and the live copy is handed to the listener later
(it "was still on the pub/sub link"): each peer must get every offset once,
in order, whatever the timing.
"""

from __future__ import annotations

from typing import Any

import orjson

from broker.backplane.memory import MemoryBackplane
from broker.history import HistoryPolicy
from broker.node import Node
from broker.position import Position
from broker.session import Session
from broker.settings import Settings
from tests.wait import until

POLICY = HistoryPolicy(size=100, ttl=300.0)


class Peer:
    """A connection as the node sees it, recording every frame in order."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.frames: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None

    def deliver(self, payload: bytes) -> None:
        self.frames.append(orjson.loads(payload))

    def send(self, payload: bytes) -> None:
        self.frames.append(orjson.loads(payload))

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def offsets(self) -> list[int]:
        return [f["offset"] for f in self.frames if f["op"] == "message"]

    def ops(self) -> list[str]:
        return [f["op"] for f in self.frames]


class Setup:
    def __init__(self, size: int = 100) -> None:
        rules = [{"pattern": "h.>", "history_size": size, "history_ttl": 300}]
        self.backplane = MemoryBackplane()
        self.node = Node(Settings(channels=rules), self.backplane, canary=False)
        self.policy = HistoryPolicy(size=size, ttl=300.0)

    async def peer(self, *frames: dict[str, Any]) -> Peer:
        peer = Peer(self.node.new_session())
        self.node.attach(peer)
        for frame in frames:
            await self.node.receive(peer, orjson.dumps(frame), text=True)
        return peer

    def stored(self, count: int) -> list[Position]:
        """``count`` messages that reached history; their live copies are still on the way."""
        now = self.backplane._clock()
        return [
            self.backplane.history.append("h.a", orjson.dumps(n), self.policy, now)
            for n in range(count)
        ]

    def arrive(self, positions: list[Position]) -> None:
        """The live copies of ``positions`` reach this process."""
        for position in positions:
            self.node.delivery.deliver("h.a", b"0", position)

    async def publish(self) -> None:
        await self.backplane.publish("h.a", b"1", history=self.policy)


async def test_messages_in_flight_at_the_first_read_reach_the_peer_once() -> None:
    s = Setup()
    await s.node.start()
    in_flight = s.stored(5)
    epoch = in_flight[0].epoch
    peer = await s.peer(
        {"op": "subscribe", "id": 1, "channel": "h.a", "since": {"offset": 2, "epoch": epoch}}
    )
    assert peer.frames[0] == {"op": "ok", "id": 1, "offset": 5, "epoch": epoch, "recovered": True}
    assert peer.offsets() == [3, 4, 5]  # the replay

    s.arrive(in_flight)  # the live copies of what was replayed: not again
    await s.publish()

    assert peer.offsets() == [3, 4, 5, 6]
    assert s.node.hub.subscribers("h.a") == [peer]  # the tap handed over at offset 5


async def test_a_later_subscriber_joins_a_track_that_is_behind_its_read() -> None:
    s = Setup()
    await s.node.start()
    early = await s.peer({"op": "subscribe", "channel": "h.a"})
    await s.publish()
    await s.publish()
    in_flight = s.stored(2)  # offsets 3 and 4: in history, not delivered here yet
    late = await s.peer({"op": "subscribe", "channel": "h.a", "history": 3})
    assert late.offsets() == [2, 3, 4]

    s.arrive(in_flight)
    await s.publish()

    assert early.offsets() == [1, 2, 3, 4, 5]
    assert late.offsets() == [2, 3, 4, 5]
    assert sorted(map(id, s.node.hub.subscribers("h.a"))) == sorted([id(early), id(late)])


async def test_a_subscriber_whose_process_is_up_to_date_is_handed_over_at_once() -> None:
    s = Setup()
    await s.node.start()
    await s.peer({"op": "subscribe", "channel": "h.a"})
    await s.publish()
    peer = await s.peer({"op": "subscribe", "channel": "h.a", "history": 1})
    assert peer in s.node.hub.subscribers("h.a")
    assert s.node._joining == {}


async def test_a_gap_while_the_tap_forwards_reaches_the_peer() -> None:
    s = Setup(size=2)
    await s.node.start()
    s.stored(3)  # offsets 1-3 in history, none delivered here
    peer = await s.peer({"op": "subscribe", "id": 1, "channel": "h.a"})
    assert peer.frames[0]["offset"] == 3
    s.stored(5)  # 4-8; history keeps 7 and 8
    s.arrive([Position(8, peer.frames[0]["epoch"])])  # 4-6 are gone for good
    await until(lambda: len(peer.frames) == 3)

    assert peer.ops() == ["ok", "gap", "message"]
    assert peer.frames[1] == {"op": "gap", "channel": "h.a", "reason": "offset_hole"}
    assert peer.offsets() == [8]
    assert s.node.hub.subscribers("h.a") == [peer]


async def test_unsubscribing_or_leaving_while_the_tap_forwards_releases_the_channel() -> None:
    s = Setup()
    await s.node.start()
    s.stored(2)
    leaves = await s.peer({"op": "subscribe", "channel": "h.a"})
    closes = await s.peer({"op": "subscribe", "channel": "h.a"})
    assert len(s.node._joining) == 2 and not s.node.hub.subscribers("h.a").count(leaves)

    await s.node.receive(leaves, b'{"op":"unsubscribe","channel":"h.a"}', text=True)
    await s.node.detach(closes)
    await s.publish()

    assert s.node._joining == {}
    assert s.node.hub.subscribers("h.a") == []
    assert leaves.offsets() == [] and closes.offsets() == []
    assert not s.node.hub.wants("h.a")
