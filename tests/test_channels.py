"""Channel names, patterns and the subscription index (pure, no sockets).

Every rule of the Channels section of PROTOCOL.md has a case here; the index
is checked against the brute-force reference ``matches()``, which is itself
checked against an independent regular-expression translation of the rules.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.channels import (
    MAX_CHANNEL_LENGTH,
    SubscriptionIndex,
    check_channel,
    check_pattern,
    is_pattern,
    matches,
)
from broker.exceptions import BadChannel

# --- names and patterns -----------------------------------------------------

VALID_CHANNELS = [
    "a",
    "sensors",
    "sensors.kitchen",
    "sensors.kitchen.temp",
    "A-Z_a-z:0-9",
    "user:42.events",
    "-._.:",  # every allowed punctuation, as tokens of its own
    "1.2.3",
    "x" * MAX_CHANNEL_LENGTH,
    ".".join(["ab"] * 85),  # 254 characters, many tokens
]

INVALID_EVERYWHERE = [
    pytest.param("", id="empty"),
    pytest.param("x" * (MAX_CHANNEL_LENGTH + 1), id="256-chars"),
    pytest.param(".", id="lone-dot"),
    pytest.param(".a", id="leading-dot"),
    pytest.param("a.", id="trailing-dot"),
    pytest.param("a..b", id="double-dot"),
    pytest.param("a b", id="space"),
    pytest.param("a/b", id="slash"),
    pytest.param("a#b", id="hash"),
    pytest.param("a$", id="dollar"),
    pytest.param("caf\u00e9", id="non-ascii-letter"),
    pytest.param("\uff21", id="fullwidth-letter"),
    pytest.param("\u0661", id="arabic-digit"),
    pytest.param("a\n", id="trailing-newline"),
    pytest.param("a\x00", id="nul"),
    pytest.param('a"b', id="quote"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("a*", id="star-in-token"),
    pytest.param("*a", id="star-prefix"),
    pytest.param("a.b*.c", id="star-inside"),
    pytest.param("**", id="double-star"),
    pytest.param("a>", id="gt-in-token"),
    pytest.param(">>", id="double-gt"),
    pytest.param(">.a", id="gt-first-of-two"),
    pytest.param("a.>.b", id="gt-not-last"),
    pytest.param("a.>.>", id="two-gt"),
    pytest.param("a.*.", id="star-then-trailing-dot"),
    pytest.param("a." + "x" * 254, id="256-chars-two-tokens"),
]

VALID_PATTERNS = [
    "*",
    ">",
    "a.*",
    "*.a",
    "*.*",
    "a.>",
    "*.>",
    "a.*.b.>",
    "*." * 126 + "*",  # 253 characters
    "a" * 253 + ".>",  # 255 characters exactly
]


@pytest.mark.parametrize("name", VALID_CHANNELS)
def test_valid_channel_is_accepted_as_channel_and_as_pattern(name: str) -> None:
    assert check_channel(name) == name
    assert check_pattern(name) == name
    assert not is_pattern(name)


def test_length_limits_are_1_to_255() -> None:
    assert check_channel("x" * 255) == "x" * 255
    assert check_pattern("a" * 253 + ".>") == "a" * 253 + ".>"
    with pytest.raises(BadChannel, match="over the 255-character limit"):
        check_channel("x" * 256)
    with pytest.raises(BadChannel, match="over the 255-character limit"):
        check_pattern("a" * 254 + ".>")
    with pytest.raises(BadChannel, match="empty"):
        check_channel("")


@pytest.mark.parametrize("name", INVALID_EVERYWHERE)
def test_invalid_name_is_refused_as_channel_and_as_pattern(name: str) -> None:
    with pytest.raises(BadChannel) as as_channel:
        check_channel(name)
    with pytest.raises(BadChannel) as as_pattern:
        check_pattern(name)
    assert as_channel.value.code == as_pattern.value.code == "bad_channel"
    assert as_channel.value.message  # a human readable reason


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("a..b", "empty token"),
        ("a.>.b", "'>' is only allowed as the last token"),
        ("a*", "must be whole tokens"),
        ("a b", "ASCII letters, digits"),
    ],
)
def test_refusal_says_why(name: str, reason: str) -> None:
    with pytest.raises(BadChannel, match=re.escape(reason)):
        check_pattern(name)


@pytest.mark.parametrize("pattern", VALID_PATTERNS)
def test_pattern_is_valid_for_subscribe_but_bad_channel_for_publish(pattern: str) -> None:
    assert check_pattern(pattern) == pattern
    assert is_pattern(pattern)
    with pytest.raises(BadChannel, match="cannot publish to a pattern"):
        check_channel(pattern)


# --- matching -------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "channel", "expected"),
    [
        # The examples of PROTOCOL.md.
        ("sensors.*", "sensors.kitchen", True),
        ("sensors.*", "sensors.kitchen.temp", False),
        ("sensors.>", "sensors.kitchen", True),
        ("sensors.>", "sensors.kitchen.temp", True),
        # '>' needs at least one token; '*' exactly one.
        ("sensors.>", "sensors", False),
        ("sensors.*", "sensors", False),
        (">", "a", True),
        (">", "a.b.c", True),
        ("*", "a", True),
        ("*", "a.b", False),
        ("*.b", "a.b", True),
        ("*.b", "a.c", False),
        ("a.*.c", "a.x.c", True),
        ("a.*.c", "a.x.y.c", False),
        ("*.>", "a", False),
        ("*.>", "a.b", True),
        # No wildcard: equality, token by token (no prefix matches).
        ("a.b", "a.b", True),
        ("a.b", "a.bc", False),
        ("a", "a.b", False),
        ("a.b", "a", False),
    ],
)
def test_matches(pattern: str, channel: str, expected: bool) -> None:
    assert matches(pattern, channel) is expected
    assert _regex_matches(pattern, channel) is expected


def _regex_matches(pattern: str, channel: str) -> bool:
    """An independent reference: translate the pattern rules into a regex."""
    parts = []
    for token in pattern.split("."):
        if token == "*":
            parts.append(r"[^.]+")
        elif token == ">":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(re.escape(token))
    return re.fullmatch(r"\.".join(parts), channel) is not None


TOKENS = st.sampled_from(["a", "b", "c"])
CHANNELS = st.lists(TOKENS, min_size=1, max_size=4).map(".".join)
# Tokens and stars, the last one possibly replaced by '>' (so '>' alone too).
PATTERNS = st.builds(
    lambda tokens, tail: ".".join([*tokens[:-1], ">"] if tail else tokens),
    st.lists(st.one_of(TOKENS, st.just("*")), min_size=1, max_size=5),
    st.booleans(),
)


@given(pattern=PATTERNS, channel=CHANNELS)
def test_matches_agrees_with_regex_reference(pattern: str, channel: str) -> None:
    check_pattern(pattern)
    check_channel(channel)
    assert matches(pattern, channel) is _regex_matches(pattern, channel)


# --- the subscription index ---------------------------------------------


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
