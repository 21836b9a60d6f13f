"""The subscription index (pure, no sockets), checked against ``channels.matches``."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.channels import matches
from broker.index import SubscriptionIndex
from tests.strategies import CHANNELS, PATTERNS


def test_add_reports_first_subscriber_of_a_pattern_only() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    assert index.add("a.*", "s1") is True
    assert index.add("a.*", "s2") is False
    assert index.add("a.*", "s1") is False  # the same pair again: no change
    assert index.add("a.b", "s1") is True  # another pattern of the same subscriber
    assert len(index) == 3
    assert sorted(index.patterns()) == ["a.*", "a.b"]
    assert index.has("a.*") and index.has("a.b") and not index.has("a")


def test_remove_reports_last_subscriber_of_a_pattern_only() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("a.*", "s1")
    index.add("a.*", "s2")
    assert index.remove("a.*", "s1") is False
    assert index.has("a.*")
    assert index.remove("a.*", "s1") is False  # already gone: a no-op
    assert index.remove("a.*", "s2") is True
    assert not index.has("a.*")
    assert len(index) == 0
    assert list(index.patterns()) == []


def test_remove_of_unknown_pairs_is_a_no_op() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("a.b", "s1")
    assert index.remove("a.c", "s1") is False  # unknown pattern
    assert index.remove("a", "s1") is False  # a prefix of a known pattern
    assert index.remove("a.b.c", "s1") is False  # an extension of it
    assert index.remove("a.b", "s2") is False  # unknown subscriber
    assert len(index) == 1
    assert index.subscribers("a.b") == ["s1"]


def test_removing_everything_prunes_the_trie() -> None:
    index: SubscriptionIndex[int] = SubscriptionIndex()
    pairs = [(f"t{i}.x.{j}.>", i) for i in range(20) for j in range(5)]
    pairs += [("t0.x", 1), ("t0.*.0", 2), (">", 3)]
    for pattern, subscriber in pairs:
        index.add(pattern, subscriber)
    for pattern, subscriber in pairs:
        index.remove(pattern, subscriber)
    assert len(index) == 0
    # White-box: pruning is only observable in memory, so look at the trie.
    assert index._root.children == {}
    assert index._root.subscribers == {}


def test_pruning_keeps_branches_still_in_use() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("a.b.c", "s1")
    index.add("a.b", "s2")
    index.remove("a.b.c", "s1")
    assert index.subscribers("a.b") == ["s2"]
    assert index.subscribers("a.b.c") == []
    index.add("a.b.c", "s3")
    index.remove("a.b", "s2")
    assert index.subscribers("a.b.c") == ["s3"]
    assert index.subscribers("a.b") == []


def test_subscribers_are_each_returned_once_however_many_patterns_match() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    for pattern in ("a.b", "a.*", "a.>", "*.b", ">", "*.*"):
        index.add(pattern, "s1")
    index.add("a.>", "s2")
    index.add("x.>", "s3")
    assert sorted(index.subscribers("a.b")) == ["s1", "s2"]
    assert len(index.match("a.b")) == 6  # one set per matching pattern, merged above
    assert sorted(index.subscribers("x.y")) == ["s1", "s3"]
    assert index.subscribers("nothing.here.at.all") == ["s1"]  # only '>' matches
    assert index.subscribers("q") == ["s1"]  # '>' and nothing else


def test_subscribers_of_one_pattern_come_in_subscription_order() -> None:
    index: SubscriptionIndex[int] = SubscriptionIndex()
    order = [5, 3, 9, 1, 7]
    for subscriber in order:
        index.add("a.b", subscriber)
    assert index.subscribers("a.b") == order


def test_gt_needs_at_least_one_more_token_in_the_index() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("a.>", "s1")
    index.add("a.*", "s2")
    assert index.subscribers("a") == []
    assert sorted(index.subscribers("a.b")) == ["s1", "s2"]
    assert index.subscribers("a.b.c") == ["s1"]


@settings(max_examples=200, deadline=None)
@given(
    subscriptions=st.lists(st.tuples(PATTERNS, st.integers(0, 5)), max_size=25),
    removals=st.lists(st.integers(0, 24), max_size=15),
    channels=st.lists(CHANNELS, min_size=1, max_size=10),
)
def test_index_agrees_with_brute_force(
    subscriptions: list[tuple[str, int]], removals: list[int], channels: list[str]
) -> None:
    index: SubscriptionIndex[int] = SubscriptionIndex()
    live: set[tuple[str, int]] = set()
    for pattern, subscriber in subscriptions:
        first = not any(p == pattern for p, _ in live)
        new = (pattern, subscriber) not in live
        assert index.add(pattern, subscriber) is (first and new)
        live.add((pattern, subscriber))
    for position in removals:
        if position >= len(subscriptions):
            continue
        pattern, subscriber = subscriptions[position]
        was_there = (pattern, subscriber) in live
        live.discard((pattern, subscriber))
        last = was_there and not any(p == pattern for p, _ in live)
        assert index.remove(pattern, subscriber) is last

    assert len(index) == len(live)
    assert set(index.patterns()) == {p for p, _ in live}
    for channel in channels:
        found = index.subscribers(channel)
        assert len(found) == len(set(found)), "a subscriber was returned twice"
        assert set(found) == {s for p, s in live if matches(p, channel)}
