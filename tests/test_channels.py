"""Channel names and patterns (pure, no sockets).

Every rule of the Channels section of the wire contract (docs/protocol.md)
has a case here; the reference ``matches()`` (which the index is checked against, in
``test_index.py``) is itself checked against an independent
regular-expression translation of the rules.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings

from broker.channels import (
    MAX_CHANNEL_LENGTH,
    check_channel,
    check_pattern,
    is_pattern,
    matches,
    pattern_within,
    patterns_overlap,
)
from broker.exceptions import BadChannel
from tests.strategies import CHANNELS, PATTERNS

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
        # The examples of the contract (docs/protocol.md, Channels).
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


@given(pattern=PATTERNS, channel=CHANNELS)
def test_matches_agrees_with_regex_reference(pattern: str, channel: str) -> None:
    check_pattern(pattern)
    check_channel(channel)
    assert matches(pattern, channel) is _regex_matches(pattern, channel)


# --- containment and overlap (for permissions) -------------------------------------

# Brute force over every channel of up to six tokens from an alphabet that has
# the patterns' tokens and one they never use: a counterexample, if there is
# one, has at most one token more than the longer pattern.
_ALPHABET = ["a", "b", "c", "d"]


def _all_channels(max_tokens: int) -> list[str]:
    out: list[str] = []
    level = [""]
    for _ in range(max_tokens):
        level = [f"{prefix}.{t}" if prefix else t for prefix in level for t in _ALPHABET]
        out += level
    return out


_UNIVERSE = _all_channels(6)


@pytest.mark.parametrize(
    ("inner", "outer", "within"),
    [
        ("sensors.*", "sensors.>", True),
        ("sensors.kitchen", "sensors.*", True),
        ("sensors.>", "sensors.>", True),
        ("sensors.*.temp", "sensors.>", True),
        ("sensors.>", "sensors.*", False),
        ("sensors", "sensors.>", False),
        (">", "sensors.>", False),
        ("*.temp", "sensors.*", False),
        (">", ">", True),
        ("a.b", ">", True),
        ("a.*", "a.b", False),
    ],
)
def test_pattern_within(inner: str, outer: str, within: bool) -> None:
    assert pattern_within(inner, outer) is within


@settings(max_examples=400, deadline=None)
@given(inner=PATTERNS, outer=PATTERNS)
def test_within_and_overlap_agree_with_brute_force(inner: str, outer: str) -> None:
    inner_set = {c for c in _UNIVERSE if matches(inner, c)}
    outer_set = {c for c in _UNIVERSE if matches(outer, c)}
    assert pattern_within(inner, outer) is (inner_set <= outer_set)
    assert patterns_overlap(inner, outer) is bool(inner_set & outer_set)
    assert patterns_overlap(outer, inner) is patterns_overlap(inner, outer)


@given(channel=CHANNELS, pattern=PATTERNS)
def test_a_channel_is_within_exactly_the_patterns_that_match_it(channel: str, pattern: str) -> None:
    assert pattern_within(channel, pattern) is matches(pattern, channel)
