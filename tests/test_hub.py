"""The hub (and the node around it) with fake subscribers and fake backplanes, no sockets."""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.backplane import PUBLISHED, Listener, Published
from broker.backplane.memory import MemoryBackplane
from broker.codec import encode_message
from broker.exceptions import BackplaneError, LimitExceeded
from broker.hub import Hub
from broker.metrics import Metrics
from broker.node import Node
from broker.session import Session
from broker.settings import Settings
from tests.wait import within


class RecordingSubscriber:
    """A peer that records the messages it is given."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.payloads: list[bytes] = []

    def deliver(self, payload: bytes) -> None:
        self.payloads.append(payload)

    def __repr__(self) -> str:
        return f"RecordingSubscriber({self.name!r})"


class RecordingBackplane:
    """A backplane that records interest changes and can be slowed down or held.

    Flags: ``gates`` (a call for a pattern listed there waits until its event is set),
    ``pauses`` (a source of event-loop yields inside each call, to interleave),
    ``fail_publish`` (publishes fail with ``BackplaneError``).
    Protocol violations (subscribing twice, unsubscribing what is not there,
    two calls for one pattern at once) are recorded, not raised, so the hub
    under test cannot swallow them.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.active: set[str] = set()
        self.violations: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.entered = asyncio.Event()
        self.pauses: random.Random | None = None
        self.fail_publish = False
        self._busy: dict[str, str] = {}
        self._listener: Listener | None = None

    @property
    def ready(self) -> bool:
        return self._listener is not None

    async def start(self, listener: Listener) -> None:
        self._listener = listener

    async def close(self) -> None:
        self._listener = None

    async def subscribe(self, pattern: str) -> None:
        await self._call("subscribe", pattern)
        if pattern in self.active:
            self.violations.append(f"subscribe {pattern!r} twice")
        self.active.add(pattern)

    async def unsubscribe(self, pattern: str) -> None:
        await self._call("unsubscribe", pattern)
        if pattern not in self.active:
            self.violations.append(f"unsubscribe {pattern!r} while not subscribed")
        self.active.discard(pattern)

    async def _call(self, op: str, pattern: str) -> None:
        self.calls.append((op, pattern))
        if pattern in self._busy:
            self.violations.append(f"{op} {pattern!r} while another call for it is running")
        self._busy[pattern] = op
        try:
            self.entered.set()
            gate = self.gates.get(pattern)
            if gate is not None:
                await gate.wait()
            if self.pauses is not None:
                for _ in range(self.pauses.randrange(4)):
                    await asyncio.sleep(0)
        finally:
            del self._busy[pattern]

    def carries(self, pattern: str) -> bool:
        """Whether messages for ``pattern`` flow, and will go on flowing."""
        return pattern in self.active and self._busy.get(pattern) != "unsubscribe"

    def publish(self, channel: str, data: bytes, **options: object) -> asyncio.Future[Published]:
        future: asyncio.Future[Published] = asyncio.get_running_loop().create_future()
        if self.fail_publish or self._listener is None:
            future.set_exception(BackplaneError("recording backplane told to fail"))
        else:
            self._listener.deliver(channel, data, None)
            future.set_result(PUBLISHED)
        return future


# --- fan-out --------------------------------------------------------------------


async def test_deliver_once_per_subscriber_with_overlapping_patterns() -> None:
    metrics = Metrics()
    backplane = MemoryBackplane()
    hub = Hub(backplane, metrics)
    await backplane.start(hub)
    s1, s2, s3 = RecordingSubscriber("s1"), RecordingSubscriber("s2"), RecordingSubscriber("s3")
    for pattern in ("a.b", "a.*", "a.>", ">", "*.b", "*.*"):
        await hub.subscribe(pattern, s1)
    await hub.subscribe("a.*", s2)
    await hub.subscribe("a.b", s2)
    await hub.subscribe("x.y", s3)

    await within(backplane.publish("a.b", b'{"k":1}'))

    expected = encode_message("a.b", b'{"k":1}')
    assert orjson.loads(expected) == {"op": "message", "channel": "a.b", "data": {"k": 1}}
    assert s1.payloads == [expected]
    assert s2.payloads == [expected]
    assert s3.payloads == []
    # Encoded once, the same bytes object handed to every subscriber (the
    # outbox frames a shared payload once: see test_outbox.py).
    assert s1.payloads[0] is s2.payloads[0]
    assert (metrics.messages_received, metrics.messages_delivered) == (1, 2)


async def test_deliver_metrics_count_messages_without_subscribers_too() -> None:
    metrics = Metrics()
    hub = Hub(MemoryBackplane(), metrics)
    subscriber = RecordingSubscriber("s")
    await hub.subscribe("a", subscriber)
    hub.deliver("b", b"1")
    assert (metrics.messages_received, metrics.messages_delivered) == (1, 0)
    for i in range(5):
        hub.deliver("a", str(i).encode())
    assert (metrics.messages_received, metrics.messages_delivered) == (6, 5)
    assert [orjson.loads(p)["data"] for p in subscriber.payloads] == [0, 1, 2, 3, 4]


async def test_a_subscriber_leaving_during_delivery_does_not_disturb_the_others() -> None:
    hub = Hub(MemoryBackplane(), Metrics())

    class LeavesOnFirstMessage(RecordingSubscriber):
        def deliver(self, payload: bytes) -> None:
            super().deliver(payload)
            hub.drop(self, ["a"])  # as a slow consumer closing itself would

    leaver = LeavesOnFirstMessage("leaver")
    others = [RecordingSubscriber(f"s{i}") for i in range(3)]
    await hub.subscribe("a", others[0])
    await hub.subscribe("a", leaver)
    for subscriber in others[1:]:
        await hub.subscribe("a", subscriber)
    hub.deliver("a", b"1")
    hub.deliver("a", b"2")
    assert len(leaver.payloads) == 1
    assert all(len(s.payloads) == 2 for s in others)


# --- backplane interest follows local demand -------------------------------------------


async def test_first_subscriber_subscribes_and_last_unsubscribes_on_the_backplane() -> None:
    backplane = RecordingBackplane()
    hub = Hub(backplane, Metrics())
    s1, s2 = RecordingSubscriber("s1"), RecordingSubscriber("s2")

    await hub.subscribe("a.*", s1)
    assert backplane.calls == [("subscribe", "a.*")]
    await hub.subscribe("a.*", s2)
    await hub.subscribe("a.*", s1)  # again: nothing new
    assert backplane.calls == [("subscribe", "a.*")]

    await hub.unsubscribe("a.*", s1)
    assert backplane.calls == [("subscribe", "a.*")]
    await hub.unsubscribe("a.*", s1)  # not subscribed any more: a no-op
    await hub.unsubscribe("b", s1)  # never subscribed: a no-op
    assert backplane.calls == [("subscribe", "a.*")]
    await hub.unsubscribe("a.*", s2)
    assert backplane.calls == [("subscribe", "a.*"), ("unsubscribe", "a.*")]
    assert backplane.active == set()
    assert backplane.violations == []


async def test_a_second_subscriber_waits_until_the_backplane_carries_the_pattern() -> None:
    backplane = RecordingBackplane()
    gate = backplane.gates["p"] = asyncio.Event()
    hub = Hub(backplane, Metrics())
    s1, s2 = RecordingSubscriber("s1"), RecordingSubscriber("s2")

    first = asyncio.create_task(hub.subscribe("p", s1))
    await within(backplane.entered.wait())
    second = asyncio.create_task(hub.subscribe("p", s2))
    # Let the second run as far as it can: it must wait for the first's backplane call.
    for _ in range(10):
        await asyncio.sleep(0)
    assert not first.done() and not second.done()
    gate.set()
    await within(asyncio.gather(first, second))
    assert backplane.calls == [("subscribe", "p")]
    assert backplane.active == {"p"}
    assert backplane.violations == []


async def test_subscribe_during_an_unsubscribe_in_flight_ends_subscribed() -> None:
    backplane = RecordingBackplane()
    hub = Hub(backplane, Metrics())
    s1, s2 = RecordingSubscriber("s1"), RecordingSubscriber("s2")
    await hub.subscribe("p", s1)

    gate = backplane.gates["p"] = asyncio.Event()
    backplane.entered.clear()
    leaving = asyncio.create_task(hub.unsubscribe("p", s1))
    await within(backplane.entered.wait())
    assert backplane.calls[-1] == ("unsubscribe", "p")
    joining = asyncio.create_task(hub.subscribe("p", s2))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not joining.done()  # it must not return before the backplane carries "p" again
    gate.set()
    await within(asyncio.gather(leaving, joining))

    assert backplane.calls == [("subscribe", "p"), ("unsubscribe", "p"), ("subscribe", "p")]
    assert backplane.active == {"p"}
    assert hub.subscribers("p") == [s2]
    assert backplane.violations == []
    assert hub._locks == {}  # white-box: no lock left behind


async def test_unsubscribe_during_a_subscribe_in_flight_ends_unsubscribed() -> None:
    backplane = RecordingBackplane()
    gate = backplane.gates["p"] = asyncio.Event()
    hub = Hub(backplane, Metrics())
    s1 = RecordingSubscriber("s1")

    joining = asyncio.create_task(hub.subscribe("p", s1))
    await within(backplane.entered.wait())
    leaving = asyncio.create_task(hub.unsubscribe("p", s1))
    for _ in range(10):
        await asyncio.sleep(0)
    gate.set()
    await within(asyncio.gather(joining, leaving))

    assert backplane.calls == [("subscribe", "p"), ("unsubscribe", "p")]
    assert backplane.active == set()
    assert not hub.wants("p")
    assert backplane.violations == []
    assert hub._locks == {}


async def test_different_patterns_do_not_wait_for_each_other() -> None:
    backplane = RecordingBackplane()
    hub = Hub(backplane, Metrics())
    gate = backplane.gates["slow"] = asyncio.Event()
    held = asyncio.create_task(hub.subscribe("slow", RecordingSubscriber("s1")))
    await within(backplane.entered.wait())
    await within(hub.subscribe("fast", RecordingSubscriber("s2")))
    assert backplane.active == {"fast"}
    assert not held.done()
    gate.set()
    await within(held)
    assert backplane.active == {"fast", "slow"}
    assert hub._locks == {}


OPS = st.lists(
    st.lists(st.tuples(st.booleans(), st.sampled_from(["p", "q"])), min_size=1, max_size=6),
    min_size=2,
    max_size=5,
)


@settings(max_examples=150, deadline=None)
@given(plans=OPS, seed=st.integers(0, 2**32 - 1))
def test_concurrent_subscribe_and_unsubscribe_end_consistent(
    plans: list[list[tuple[bool, str]]], seed: int
) -> None:
    """Several subscribers change their subscriptions at once over a backplane that
    yields at random points: the backplane ends up with exactly the patterns that
    have local subscribers, and a subscribe returns only once the backplane has it."""

    async def scenario() -> None:
        backplane = RecordingBackplane()
        backplane.pauses = random.Random(seed)
        hub = Hub(backplane, Metrics())
        broken: list[str] = []

        async def run(subscriber: RecordingSubscriber, plan: list[tuple[bool, str]]) -> None:
            for subscribe, pattern in plan:
                if subscribe:
                    await hub.subscribe(pattern, subscriber)
                    if not backplane.carries(pattern):
                        broken.append(f"{subscriber.name} subscribed {pattern} before backplane")
                else:
                    await hub.unsubscribe(pattern, subscriber)

        subscribers = [RecordingSubscriber(f"s{i}") for i in range(len(plans))]
        await within(
            asyncio.gather(*(run(s, plan) for s, plan in zip(subscribers, plans, strict=True)))
        )
        assert broken == []
        assert backplane.violations == []
        assert backplane.active == set(hub.patterns())
        assert hub._locks == {}
        for pattern in ("p", "q"):
            expected = set()
            for subscriber, plan in zip(subscribers, plans, strict=True):
                last = [subscribe for subscribe, p in plan if p == pattern]
                if last and last[-1]:
                    expected.add(subscriber)
            assert set(hub.subscribers(pattern)) == expected

    asyncio.run(scenario())


# --- the node around the hub (no sockets) ---------------------------------------------


class FakePeer(RecordingSubscriber):
    """What the node needs of a connection: a session, send, close, deliver."""

    def __init__(self, name: str, session: Session) -> None:
        super().__init__(name)
        self.session = session
        self.sent: list[bytes] = []
        self.closed: tuple[int, str] | None = None

    def send(self, payload: bytes) -> None:
        self.sent.append(payload)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


async def _node() -> tuple[Node, RecordingBackplane]:
    backplane = RecordingBackplane()
    node = Node(Settings(), backplane, canary=False)
    await node.start()
    return node, backplane


async def test_node_detach_drops_the_backplane_interest_of_the_last_subscriber() -> None:
    node, backplane = await _node()
    peer = FakePeer("p1", node.new_session())
    other = FakePeer("p2", node.new_session())
    node.attach(peer)
    node.attach(other)
    for raw in (b'{"op":"subscribe","channel":"a.*"}', b'{"op":"subscribe","channel":"b"}'):
        await node.receive(peer, raw, text=True)
    await node.receive(other, b'{"op":"subscribe","channel":"b"}', text=True)
    assert backplane.active == {"a.*", "b"}

    await node.detach(peer)

    assert node.hub.subscription_count == 1
    assert node.hub.subscribers("b") == [other]
    assert backplane.active == {"b"}, "the last subscriber of 'a.*' left; the backplane must too"
    assert backplane.violations == []
    await node.detach(other)
    assert backplane.active == set()
    assert len(node.peers) == 0
    assert (node.metrics.connections_opened, node.metrics.connections_closed) == (2, 2)


async def test_node_publish_replies_after_the_backplane_took_the_message() -> None:
    node, backplane = await _node()
    publisher = FakePeer("pub", node.new_session())
    subscriber = FakePeer("sub", node.new_session())
    node.attach(publisher)
    node.attach(subscriber)
    await node.receive(subscriber, b'{"op":"subscribe","channel":"c"}', text=True)
    await node.receive(publisher, b'{"op":"publish","id":1,"channel":"c","data":[1]}', text=True)
    await node.receive(publisher, b'{"op":"publish","channel":"c","data":[2]}', text=True)
    assert [orjson.loads(f) for f in publisher.sent] == [{"op": "ok", "id": 1}]
    assert [orjson.loads(p)["data"] for p in subscriber.payloads] == [[1], [2]]
    assert node.metrics.messages_published == 2

    backplane.fail_publish = True
    await node.receive(publisher, b'{"op":"publish","id":2,"channel":"c","data":3}', text=True)
    await node.receive(publisher, b'{"op":"publish","channel":"c","data":4}', text=True)
    errors = [orjson.loads(f) for f in publisher.sent[1:]]
    assert [(e["op"], e["id"], e["code"]) for e in errors] == [
        ("error", 2, "unavailable"),
        ("error", None, "unavailable"),
    ]
    assert node.metrics.publish_failures == 2
    assert node.metrics.errors["unavailable"] == 2
    assert len(subscriber.payloads) == 2


async def test_node_closes_a_peer_over_its_error_budget() -> None:
    backplane = RecordingBackplane()
    node = Node(Settings(error_limit=2), backplane, canary=False)
    await node.start()
    peer = FakePeer("p", node.new_session())
    node.attach(peer)
    for _ in range(3):
        await node.receive(peer, b"junk", text=True)
    assert peer.closed == (1008, "too many errors")
    assert len(peer.sent) == 3
    assert node.metrics.abuse_disconnects == 1
    assert node.metrics.errors["bad_frame"] == 3
    assert node.metrics.frames_received == 3


async def test_node_admits_up_to_max_connections() -> None:
    node = Node(Settings(max_connections=2), RecordingBackplane(), canary=False)
    peers = [FakePeer(f"p{i}", node.new_session()) for i in range(2)]
    for peer in peers:
        node.admit()
        node.attach(peer)
    with pytest.raises(LimitExceeded, match="limit of 2 connections"):
        node.admit()
    assert node.metrics.connections_rejected == 1
    await node.detach(peers[0])
    node.admit()  # room again
