"""The Redis backplane's pure helpers: envelope, message ids, names and globs.

Synchronous, no Redis. The glob translation is checked against the broker's own
matcher (``broker.channels.matches``) through a small implementation of Redis's
glob rules. De-duplication is in ``test_dedupe.py``, backoff in ``test_backoff.py``.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from broker.backplane.redis_wire import (
    MAX_ID_LENGTH,
    EnvelopeError,
    MessageIds,
    RedisSubscription,
    channel_from_redis,
    decode_envelope,
    encode_envelope,
    from_broker_node,
    glob_escape,
    pack_publish,
    redis_subscription,
)
from broker.channels import matches
from broker.exceptions import BadChannel
from broker.position import Position

# -- the envelope ---------------------------------------------------------------------

# An id is 1 to 64 bytes without a space or a ";" (";" starts a position).
ids = st.binary(min_size=1, max_size=MAX_ID_LENGTH).filter(
    lambda b: b" " not in b and b";" not in b
)


@given(ids, st.binary())
def test_envelope_round_trip(message_id: bytes, data: bytes) -> None:
    assert decode_envelope(encode_envelope(message_id, data)) == (message_id, None, data)


def test_envelope_bytes_are_as_documented() -> None:
    assert encode_envelope(b"n1-2a", b'{"t": 21.5}') == b'@n1-2a {"t": 21.5}'


@pytest.mark.parametrize(
    "payload", [b'{"t":1}', b"[1]", b'"s"', b"12", b"-1", b"true", b"null", b" {}", b"", b"x"]
)
def test_payload_without_mark_is_bare_data(payload: bytes) -> None:
    assert decode_envelope(payload) == (None, None, payload)


@pytest.mark.parametrize(
    "payload",
    [b"@", b"@ {}", b"@abc", b"@" + b"x" * (MAX_ID_LENGTH + 1) + b" {}"],
)
def test_malformed_envelope_is_refused(payload: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode_envelope(payload)


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_pack_publish_is_what_redis_py_would_send(channel: bytes, payload: bytes) -> None:
    expected = b"".join(Connection().pack_command("PUBLISH", channel, payload))
    assert pack_publish(channel, payload) == expected


def test_longest_id_and_spaces_in_data() -> None:
    longest = b"i" * MAX_ID_LENGTH
    assert decode_envelope(b"@" + longest + b' {"a": "b c"}') == (longest, None, b'{"a": "b c"}')


def test_message_ids_are_unique_and_carry_the_node() -> None:
    make = MessageIds("node-1")
    made = [make.next() for _ in range(1000)]
    assert len(set(made)) == 1000
    assert made[0] == b"node-1~1"
    assert made[15] == b"node-1~10"
    assert all(b" " not in i and len(i) <= MAX_ID_LENGTH for i in made)


def test_longest_node_id_and_counter_fit_in_an_id() -> None:
    make = MessageIds("n" * 40)
    make._count = 2**64 - 2  # a process publishing for ever still writes valid ids
    assert len(make.next()) <= MAX_ID_LENGTH


def test_ids_of_broker_nodes_are_told_apart_from_outside_ids() -> None:
    ours = MessageIds("a-b.c:d_9").next()
    message_id, _, _ = decode_envelope(encode_envelope(ours, b"1"))
    assert message_id is not None and from_broker_node(message_id)
    # What outside programs write (docs/redis.md), and what nodes wrote before the mark.
    for outside in (b"billing-42", b"3f9a2c11d0-1a2b", b"6f1e0b2c-uuid-like", b"x"):
        assert not from_broker_node(outside)


@pytest.mark.parametrize("node_id", ["", "has space", "é", "x" * 41])
def test_bad_node_ids_are_refused(node_id: str) -> None:
    with pytest.raises(ValueError):
        MessageIds(node_id)


# -- names and globs ------------------------------------------------------------------


def redis_glob_matches(glob: bytes, name: bytes) -> bool:
    """Redis's stringmatchlen for what we emit: ``*``, ``?`` and backslash escapes."""
    regex = []
    i = 0
    while i < len(glob):
        c = glob[i : i + 1]
        if c == b"*":
            regex.append(b".*")
        elif c == b"?":
            regex.append(b".")
        elif c == b"\\" and i + 1 < len(glob):
            i += 1
            regex.append(re.escape(glob[i : i + 1]))
        elif c in b"[]":
            raise AssertionError(f"unescaped {c!r} in {glob!r}")
        else:
            regex.append(re.escape(c))
        i += 1
    return re.fullmatch(b"".join(regex), name, re.DOTALL) is not None


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("sensors.kitchen", RedisSubscription(False, b"broker.sensors.kitchen")),
        ("a", RedisSubscription(False, b"broker.a")),
        ("x:y-z_1", RedisSubscription(False, b"broker.x:y-z_1")),
        ("sensors.*", RedisSubscription(True, b"broker.sensors.*")),
        ("sensors.>", RedisSubscription(True, b"broker.sensors.?*")),
        ("*", RedisSubscription(True, b"broker.*")),
        (">", RedisSubscription(True, b"broker.?*")),
        ("*.kitchen", RedisSubscription(True, b"broker.*.kitchen")),
        ("a.*.c.>", RedisSubscription(True, b"broker.a.*.c.?*")),
    ],
)
def test_translation_examples(pattern: str, expected: RedisSubscription) -> None:
    assert redis_subscription("broker.", pattern) == expected


def test_prefix_glob_characters_are_escaped() -> None:
    sub = redis_subscription("app[1]*?\\.", "a.*")
    assert sub == RedisSubscription(True, b"app\\[1\\]\\*\\?\\\\.a.*")
    assert redis_glob_matches(sub.name, b"app[1]*?\\.a.b")
    assert not redis_glob_matches(sub.name, b"app1XY\\.a.b")
    # An exact channel is not a glob: its prefix stays as it is.
    assert redis_subscription("app[1].", "a") == RedisSubscription(False, b"app[1].a")


def test_glob_escape() -> None:
    assert glob_escape("a*b?c[d]e\\f") == "a\\*b\\?c\\[d\\]e\\\\f"
    assert glob_escape("plain.prefix:-_") == "plain.prefix:-_"


@pytest.mark.parametrize("bad", ["", "a..b", ".a", "a.", "a.>.b", "a*", "a b", "é", "x" * 256])
def test_invalid_patterns_are_refused(bad: str) -> None:
    with pytest.raises(BadChannel):
        redis_subscription("broker.", bad)


tokens = st.sampled_from(["a", "b", "ab", "c-1", "x:y"])
channels = st.lists(tokens, min_size=1, max_size=5).map(".".join)
patterns = st.builds(
    lambda toks, tail: ".".join(toks + tail),
    st.lists(st.one_of(tokens, st.just("*")), min_size=0, max_size=4),
    st.sampled_from([[], [">"], ["*"], ["a"]]),
).filter(bool)


@settings(max_examples=500)
@given(patterns, channels, st.sampled_from(["broker.", "", "app[1]*?.", "x"]))
def test_glob_matches_a_superset_of_the_pattern(pattern: str, channel: str, prefix: str) -> None:
    sub = redis_subscription(prefix, pattern)
    name = (prefix + channel).encode()
    hit = redis_glob_matches(sub.name, name) if sub.is_pattern else sub.name == name
    if matches(pattern, channel):
        assert hit, (pattern, channel, sub)
    if hit and "*" not in pattern.split(".") and not pattern.endswith(">"):
        assert matches(pattern, channel)  # exact subscriptions are exact
    # Nothing outside the prefix ever matches (an empty prefix shares the whole Redis).
    if sub.is_pattern and prefix:
        assert not redis_glob_matches(sub.name, b"other:" + channel.encode())


def test_glob_surplus_is_what_the_hub_filters() -> None:
    sub = redis_subscription("broker.", "sensors.*")
    assert redis_glob_matches(sub.name, b"broker.sensors.kitchen.temp")
    assert not matches("sensors.*", "sensors.kitchen.temp")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"broker.sensors.kitchen", "sensors.kitchen"),
        (b"broker.a", "a"),
        (b"other.a", None),
        (b"broker.", None),
        (b"broker.a..b", None),
        (b"broker.a.*", None),
        (b"broker.caf\xc3\xa9", None),
        (b"broker." + b"a" * 256, None),
    ],
)
def test_channel_from_redis(raw: bytes, expected: str | None) -> None:
    assert channel_from_redis(b"broker.", raw) == expected


def test_an_envelope_with_a_position() -> None:
    payload = b'@node~1f;18;k3j9 {"t": 21.5}'
    assert decode_envelope(payload) == (b"node~1f", Position(18, "k3j9"), b'{"t": 21.5}')
    for bad in (b"@;1;e x", b"@id;x;e x", b"@id;1; x", b"@id;1;e\xff x", b"@id;1 x"):
        with pytest.raises(EnvelopeError):
            decode_envelope(bad)
