"""History, recovery decisions and the memory backplane's store (pure, explicit clock)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.backplane.memory_history import IdempotencyKeys, MemoryHistory
from broker.history import HistoryPolicy, HistoryRead, fill, recover
from broker.position import Position, Published

POLICY = HistoryPolicy(size=5, ttl=60.0)


def store(**options: float) -> MemoryHistory:
    return MemoryHistory(**options)  # type: ignore[arg-type]


def test_offsets_start_at_1_and_grow_by_1_within_an_epoch() -> None:
    h = store()
    positions = [h.append("c", b"%d" % i, POLICY, now=0.0) for i in range(3)]
    assert [p.offset for p in positions] == [1, 2, 3]
    assert len({p.epoch for p in positions}) == 1 and positions[0].epoch
    other = h.append("d", b"x", POLICY, now=0.0)
    assert other.offset == 1 and other.epoch != positions[0].epoch


def test_the_ring_keeps_the_last_size_messages() -> None:
    h = store()
    for i in range(1, 9):
        h.append("c", b"%d" % i, POLICY, now=0.0)
    read = h.read("c", POLICY, now=0.0, last=5)
    assert read.top == 8 and [o for o, _ in read.entries] == [4, 5, 6, 7, 8]
    assert h.read("c", POLICY, now=0.0, last=2).entries == ((7, b"7"), (8, b"8"))


def test_since_recovery_is_exact_or_says_why() -> None:
    h = store()
    for i in range(1, 9):
        h.append("c", b"%d" % i, POLICY, now=0.0)
    epoch = h.read("c", POLICY, now=0.0).epoch
    ok = recover(h.read("c", POLICY, now=0.0, after=5), Position(5, epoch))
    assert ok.recovered and [o for o, _ in ok.replay] == [6, 7, 8]
    assert recover(h.read("c", POLICY, now=0.0, after=8), Position(8, epoch)).replay == ()
    trimmed = recover(h.read("c", POLICY, now=0.0, after=2), Position(2, epoch))
    assert (trimmed.recovered, trimmed.reason, trimmed.replay) == (False, "trimmed", ())
    changed = recover(h.read("c", POLICY, now=0.0, after=5), Position(5, "other"))
    assert (changed.recovered, changed.reason) == (False, "epoch_changed")
    ahead = recover(h.read("c", POLICY, now=0.0, after=99), Position(99, epoch))
    assert (ahead.recovered, ahead.reason) == (False, "epoch_changed")


def test_since_zero_means_from_the_start_of_the_epoch() -> None:
    h = store()
    h.append("c", b"1", POLICY, now=0.0)
    h.append("c", b"2", POLICY, now=0.0)
    epoch = h.read("c", POLICY, now=0.0).epoch
    assert [
        o for o, _ in recover(h.read("c", POLICY, 0.0, after=0), Position(0, epoch)).replay
    ] == [
        1,
        2,
    ]
    empty = h.read("fresh", POLICY, now=0.0, after=0)
    assert recover(empty, Position(0, empty.epoch)).recovered


def test_expired_messages_are_not_replayed_and_make_recovery_fail() -> None:
    h = store()
    h.append("c", b"old", POLICY, now=0.0)
    h.append("c", b"new", POLICY, now=50.0)
    epoch = h.read("c", POLICY, now=0.0).epoch
    read = h.read("c", POLICY, now=70.0, after=0)
    assert (read.entries, read.complete) == ((), False)  # never a partial answer
    assert recover(read, Position(0, epoch)).reason == "trimmed"
    assert recover(h.read("c", POLICY, 70.0, after=1), Position(1, epoch)).recovered
    assert h.read("c", POLICY, now=70.0, last=5).entries == ((2, b"new"),)


def test_an_idle_channel_is_forgotten_and_starts_a_new_epoch() -> None:
    h = store(meta_ttl=100.0)
    first = h.append("c", b"1", POLICY, now=0.0)
    assert h.append("c", b"2", POLICY, now=50.0).epoch == first.epoch
    later = h.append("c", b"3", POLICY, now=200.0)
    assert (later.offset, later.epoch != first.epoch) == (1, True)
    h.append("d", b"1", POLICY, now=200.0)
    assert h.expire(now=301.0) == 2 and len(h) == 0 and h.bytes == 0


def test_the_byte_budget_takes_from_the_least_recently_published_channel() -> None:
    h = store(max_bytes=100)
    big = HistoryPolicy(size=100, ttl=1e9)
    for i in range(5):
        h.append("old", b"o" * 10, big, now=float(i))
    for i in range(8):
        h.append("new", b"n" * 10, big, now=10.0 + i)
    assert h.bytes <= 100
    assert len(h.read("new", big, now=20.0, last=100).entries) == 8
    assert len(h.read("old", big, now=20.0, last=100).entries) == 2
    # The old channel's position survives its entries.
    assert h.read("old", big, now=20.0).top == 5


def test_many_channels_are_bounded() -> None:
    h = MemoryHistory(max_channels=10)
    for i in range(25):
        h.append(f"c{i}", b"x", POLICY, now=0.0)
    assert len(h) == 10


def test_fill_needs_every_offset() -> None:
    read = HistoryRead("e", 6, ((3, b"3"), (4, b"4"), (5, b"5"), (6, b"6")))
    assert fill(read, 2, 5) == ((3, b"3"), (4, b"4"), (5, b"5"))
    assert fill(read, 1, 5) is None  # 2 is gone
    assert fill(read, 5, 5) == ()
    assert fill(HistoryRead("e", 6, ((3, b"3"), (5, b"5"))), 2, 5) is None
    assert fill(HistoryRead("e", 6, ((3, b"3"),), complete=False), 2, 3) is None


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 8),
    published=st.integers(0, 30),
    since=st.integers(0, 32),
)
def test_recovery_is_all_or_nothing(size: int, published: int, since: int) -> None:
    policy = HistoryPolicy(size=size, ttl=1e9)
    h = MemoryHistory()
    epoch = h.read("c", policy, now=0.0).epoch
    for i in range(1, published + 1):
        h.append("c", b"%d" % i, policy, now=0.0)
    result = recover(h.read("c", policy, now=0.0, after=since), Position(since, epoch))
    if since > published:
        assert not result.recovered
    elif published - since <= size:
        assert result.recovered
        assert [o for o, _ in result.replay] == list(range(since + 1, published + 1))
    else:
        assert (result.recovered, result.replay) == (False, ())


def test_idempotency_keys_expire_after_the_window_and_are_bounded() -> None:
    keys = IdempotencyKeys(window=10.0, max_keys=3)
    first = Published(Position(1, "e"))
    keys.put("c", "k", first, now=0.0)
    assert keys.get("c", "k", now=5.0) == first
    assert keys.get("other", "k", now=5.0) is None  # keys are per channel
    assert keys.get("c", "k", now=11.0) is None
    for i in range(5):
        keys.put("c", f"k{i}", first, now=20.0)
    assert len(keys) == 3 and keys.get("c", "k0", now=20.0) is None
