"""``broker.backplane.dedupe``: exact de-duplication, checked against a model of what
Redis sends one subscriber. Synchronous, no Redis."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.backplane.dedupe import Deduplicator

# The subscriptions a process may hold: (source as Redis reports it, channels matched).
SUBSCRIPTIONS = {
    "exact-a": (None, {b"a"}),
    "exact-b": (None, {b"b"}),
    "p-ab": (b"p-ab", {b"a", b"b"}),
    "p-a": (b"p-a", {b"a"}),
    "p-a2": (b"p-a2", {b"a"}),
}

events = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.sampled_from([b"a", b"b"]), st.sampled_from([b"1", b"2"])),
        st.tuples(
            st.just("toggle"), st.sampled_from([n.encode() for n in SUBSCRIPTIONS]), st.just(b"")
        ),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(events, st.randoms(use_true_random=False), st.booleans())
def test_dedupe_delivers_each_publish_exactly_once(
    script: list[tuple[str, bytes, bytes]], rnd: random.Random, with_ids: bool
) -> None:
    """Simulate what Redis writes to one subscriber and check the survivors."""
    held: set[str] = set()
    dedupe = Deduplicator()
    delivered: list[tuple[bytes, bytes]] = []
    expected: list[tuple[bytes, bytes]] = []
    for serial, (kind, arg, payload) in enumerate(script):
        if kind == "toggle":
            held ^= {arg.decode()}
            dedupe.reset()  # Redis confirms the (un)subscribe in the stream
            continue
        channel = arg
        copies = [SUBSCRIPTIONS[name][0] for name in held if channel in SUBSCRIPTIONS[name][1]]
        rnd.shuffle(copies)  # the order among one publish's copies does not matter
        if copies:
            expected.append((channel, payload))
        key = b"id-%d" % serial if with_ids else payload
        for source in copies:
            if dedupe.first(channel, key, source):
                delivered.append((channel, payload))
    assert delivered == expected


def test_dedupe_examples() -> None:
    dedupe = Deduplicator()
    assert dedupe.first(b"a", b"x", None)
    assert not dedupe.first(b"a", b"x", b"a.*")  # the same publish through a pattern
    assert not dedupe.first(b"a", b"x", b">")
    assert dedupe.first(b"a", b"x", None)  # equal content again: a new publish
    assert dedupe.first(b"b", b"x", b">")  # another channel
    dedupe.reset()
    assert dedupe.first(b"b", b"x", b">")  # subscriptions changed in between
