"""``redis_link.Dispatcher``: what the receiving side does with each reply, synchronously.

No Redis and no event loop: replies are fed in as redis-py returns them (RESP2, bytes).
The supervisor around it (reconnects, restores, link events) is tested against a
real redis-server in ``test_redis_faults.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from broker.backplane import Position
from broker.backplane.redis_link import Dispatcher, SubscriberLink
from broker.backplane.redis_wire import MessageIds, RedisSubscription, encode_envelope
from tests.backplane_support import Inbox

PREFIX = b"broker."


class Unused:
    """Stands for the link's connection: the dispatcher never touches it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the dispatcher used the connection ({name})")


class Raising(Inbox):
    def deliver(self, channel: str, data: bytes, position: Position | None) -> None:
        super().deliver(channel, data, position)
        raise RuntimeError("a bug in deliver")


def setup(listener: Inbox | None = None) -> tuple[Dispatcher, SubscriberLink, Inbox]:
    inbox = listener or Inbox()
    dispatcher = Dispatcher(PREFIX)
    dispatcher.listener = inbox
    return dispatcher, SubscriberLink(Unused(), timeout=1.0), inbox  # type: ignore[arg-type]


def message(channel: bytes, payload: bytes) -> list[bytes]:
    return [b"message", PREFIX + channel, payload]


def pmessage(pattern: bytes, channel: bytes, payload: bytes) -> list[bytes]:
    return [b"pmessage", PREFIX + pattern, PREFIX + channel, payload]


def test_messages_are_delivered_without_position() -> None:
    dispatcher, link, inbox = setup()
    dispatcher.dispatch(link, message(b"a.b", b'{"x":1}'))
    assert inbox.messages == [("a.b", b'{"x":1}')]
    assert inbox.positions == [None]


def test_data_from_a_broker_node_is_not_parsed_again() -> None:
    # A node validated its data when it published; receivers trust its mark. The
    # invalid JSON here stands for "not parsed": a real node never sends it.
    dispatcher, link, inbox = setup()
    ours = MessageIds("node-1").next()
    dispatcher.dispatch(link, message(b"a", encode_envelope(ours, b"not json")))
    assert inbox.messages == [("a", b"not json")]
    assert dispatcher.dropped == 0


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",  # bare
        b"@billing-42 not json",  # an outside program's id
        b"@3f9a2c11d0-1a2b {",  # a node of the version before the mark: checked as before
        b'{"a":NaN}',
        b"\xff\xfe",
    ],
)
def test_data_nobody_checked_is_validated(payload: bytes) -> None:
    dispatcher, link, inbox = setup()
    dispatcher.dispatch(link, message(b"a", payload))
    dispatcher.dispatch(link, message(b"a", b'@billing-43 {"ok":true}'))
    assert inbox.messages == [("a", b'{"ok":true}')]
    assert dispatcher.dropped == 1


@pytest.mark.parametrize(
    "payload",
    [
        b"1e400",
        b"-1e400",
        b"[1E-400]",
        b"123456789012345678901234567890",
        b"-0",
        b"-0.0",
        b"18446744073709551616",
        b"-9223372036854775809",
        b'{"x": 0.1000000000000000055511151231257827}',
    ],
)
def test_numbers_written_straight_into_redis_are_relayed_as_written(payload: bytes) -> None:
    # An outside program's data is checked, not re-encoded: what a double cannot
    # hold is still valid JSON, and reaches the subscribers byte for byte.
    dispatcher, link, inbox = setup()
    dispatcher.dispatch(link, message(b"a", payload))
    dispatcher.dispatch(link, message(b"a", b"@billing-7 " + payload))
    assert inbox.messages == [("a", payload), ("a", payload)]
    assert dispatcher.dropped == 0


@pytest.mark.parametrize(
    "reply",
    [
        message(b"a", b"@ {}"),  # malformed envelope
        message(b"a..b", b"1"),  # not a channel
        [b"message", b"other.a", b"1"],  # outside the prefix
    ],
)
def test_malformed_messages_are_dropped_and_counted(reply: list[bytes]) -> None:
    dispatcher, link, inbox = setup()
    dispatcher.dispatch(link, reply)
    assert inbox.messages == []
    assert dispatcher.dropped == 1


def test_copies_through_several_subscriptions_are_delivered_once() -> None:
    dispatcher, link, inbox = setup()
    payload = encode_envelope(b"n~1", b"1")
    dispatcher.dispatch(link, message(b"s.k", payload))
    dispatcher.dispatch(link, pmessage(b"s.*", b"s.k", payload))
    dispatcher.dispatch(link, pmessage(b"s.?*", b"s.k", payload))
    # The same bare bytes published twice: two messages, each once.
    for _ in range(2):
        dispatcher.dispatch(link, message(b"s.k", b'"bare"'))
        dispatcher.dispatch(link, pmessage(b"s.*", b"s.k", b'"bare"'))
    assert inbox.on("s.k") == [b"1", b'"bare"', b'"bare"']


def test_confirmations_reset_dedupe_and_pongs_reach_the_link() -> None:
    dispatcher, link, inbox = setup()
    dispatcher.dispatch(link, message(b"a", b"1"))
    dispatcher.dispatch(link, [b"psubscribe", PREFIX + b"*", 2])
    dispatcher.dispatch(link, pmessage(b"*", b"a", b"1"))  # subscriptions changed: new
    assert inbox.on("a") == [b"1", b"1"]
    for pong in ([b"pong", b""], b"PONG"):
        link.pong.clear()
        dispatcher.dispatch(link, pong)
        assert link.pong.is_set()


def test_deliver_raising_is_counted_and_reading_goes_on() -> None:
    dispatcher, link, inbox = setup(Raising())
    dispatcher.dispatch(link, message(b"a", b"1"))
    dispatcher.dispatch(link, message(b"a", b"2"))
    assert inbox.on("a") == [b"1", b"2"]
    assert dispatcher.deliver_errors == 2


# -- sharded (a Redis Cluster) ----------------------------------------------------------


def sharded(accept: set[str]) -> tuple[Dispatcher, SubscriberLink, Inbox, list[str]]:
    moved: list[str] = []
    dispatcher = Dispatcher(
        PREFIX, sharded=True, accept=accept.__contains__, on_moved=lambda: moved.append("moved")
    )
    inbox = Inbox()
    dispatcher.listener = inbox
    return dispatcher, SubscriberLink(Unused(), timeout=1.0), inbox, moved  # type: ignore[arg-type]


def test_a_shard_message_is_delivered_on_the_channel_at_its_head() -> None:
    dispatcher, link, inbox, _ = sharded({"s.k", "s.j"})
    envelope = encode_envelope(b"n~1", b'{"t":1}')
    dispatcher.dispatch(link, [b"smessage", b"broker.{b3}", b"s.k " + envelope])
    dispatcher.dispatch(link, [b"smessage", b"broker.{b3}", b's.j {"bare":true}'])
    dispatcher.dispatch(link, [b"smessage", b"broker.{b3}", b"s.other " + envelope])  # not wanted
    assert inbox.messages == [("s.k", b'{"t":1}'), ("s.j", b'{"bare":true}')]
    assert dispatcher.dropped == 0


def test_a_shard_payload_without_a_valid_head_is_dropped() -> None:
    dispatcher, link, inbox, _ = sharded({"s.k"})
    for payload in (b"no-head", b" s.k {}", b"s..k {}", b"s.k not-json"):
        dispatcher.dispatch(link, [b"smessage", b"broker.{b3}", payload])
    assert inbox.messages == []
    assert dispatcher.dropped == 4


def test_a_channel_shard_message_is_delivered_whatever_the_patterns() -> None:
    dispatcher, link, inbox, _ = sharded(set())  # no local pattern
    envelope = encode_envelope(b"n~1", b'{"t":1}')
    dispatcher.dispatch(link, [b"smessage", b"broker.{b3}s.k", envelope])
    dispatcher.dispatch(link, [b"smessage", b"other.{b3}s.k", envelope])  # not our prefix
    dispatcher.dispatch(link, [b"smessage", b"broker.{b3}s..k", envelope])  # not a channel
    assert inbox.messages == [("s.k", b'{"t":1}')]
    assert dispatcher.dropped == 2


def test_exact_and_pattern_subscriptions_on_one_link_deliver_each_publish_once() -> None:
    """Each publish sends the channel's copy, then the bucket's, adjacent on the link.

    A pattern matching ``s.k`` is held throughout; the exact subscription to
    ``s.k`` starts and ends between publishes. Whatever the point of the stream,
    every publish reaches the listener exactly once.
    """
    dispatcher, link, inbox, _ = sharded({"s.k"})  # the local pattern matches s.k
    own, bucket = b"broker.{b3}s.k", b"broker.{b3}"
    subscribed = False

    def publish(n: int) -> None:
        envelope = encode_envelope(b"n~%d" % n, b"%d" % n)
        if subscribed:  # Redis sends the channel's copy only to its subscribers
            dispatcher.dispatch(link, [b"smessage", own, envelope])
        dispatcher.dispatch(link, [b"smessage", bucket, b"s.k " + envelope])

    publish(1)
    link._confirm_left = 1  # a SSUBSCRIBE is waiting for its confirmation
    dispatcher.dispatch(link, [b"ssubscribe", own, 2])
    subscribed = True
    publish(2)
    publish(3)
    link._confirm_left = 1
    dispatcher.dispatch(link, [b"sunsubscribe", own, 1])
    subscribed = False
    publish(4)
    # An outside program that publishes to the bucket only still reaches the pattern.
    dispatcher.dispatch(link, [b"smessage", bucket, b"s.k " + encode_envelope(b"x", b"5")])
    assert [data for _, data in inbox.messages] == [b"1", b"2", b"3", b"4", b"5"]


def test_a_sunsubscribe_nobody_asked_for_means_the_slot_moved() -> None:
    dispatcher, link, _, moved = sharded(set())
    dispatcher.dispatch(link, [b"sunsubscribe", b"broker.{b3}", 0])
    assert moved == ["moved"]
    dispatcher.dispatch(link, [b"unsubscribe", b"broker.a", 0])  # not a shard: no topology news
    assert moved == ["moved"]


class Sends:
    """A connection that takes commands and answers nothing: replies are dispatched by hand."""

    is_connected = True

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    async def send_command(self, *args: Any, **kwargs: Any) -> None:
        self.sent.append(args)


async def test_a_dropped_shard_subscription_is_no_longer_active_and_confirms_nothing() -> None:
    dispatcher, _, _, moved = sharded(set())
    link = SubscriberLink(Sends(), timeout=1.0)  # type: ignore[arg-type]
    dropped = RedisSubscription(False, b"broker.{b3}")
    link.active.add(dropped)
    # An SSUBSCRIBE of another slot is waiting for Redis when Redis drops this one.
    pending = asyncio.create_task(link.command("SSUBSCRIBE", [b"broker.{b9}"]))
    await asyncio.sleep(0)
    dispatcher.dispatch(link, [b"sunsubscribe", b"broker.{b3}", 0])
    assert dropped not in link.active and moved == ["moved"]
    await asyncio.sleep(0)
    assert not pending.done()  # a push, not the answer to the command
    dispatcher.dispatch(link, [b"ssubscribe", b"broker.{b9}", 1])
    await asyncio.wait_for(pending, 1)
