"""``broker.backoff``: the one backoff policy of the server, and the two ways it is used
(Redis reconnects with jitter, worker restarts without). Synchronous."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from broker.backoff import backoff_delay
from broker.workers import RESTART_BACKOFF_MAX, restart_delay

Rand = Callable[[], float] | None


def redis_delay(attempt: int, rand: Rand = random.random) -> float:
    """The Redis backplane's reconnect policy: from 0.1 s, jittered."""
    return backoff_delay(attempt, base=0.1, cap=5.0, rand=rand)


@pytest.mark.parametrize("rand", [random.random, None])
def test_first_attempt_is_immediate(rand: Rand) -> None:
    assert backoff_delay(0, base=0.1, cap=5.0, rand=rand) == 0.0
    assert backoff_delay(-1, base=0.1, cap=5.0, rand=rand) == 0.0


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8, 50, 10_000])
@pytest.mark.parametrize("cap", [0.3, 5.0])
def test_backoff_grows_is_capped_and_jittered(attempt: int, cap: float) -> None:
    ceiling = min(cap, 0.1 * 2 ** min(attempt - 1, 30))
    assert backoff_delay(attempt, base=0.1, cap=cap, rand=lambda: 0.0) == pytest.approx(ceiling / 2)
    assert backoff_delay(attempt, base=0.1, cap=cap, rand=lambda: 1.0) == pytest.approx(ceiling)
    assert ceiling / 2 <= backoff_delay(attempt, base=0.1, cap=cap, rand=random.random) <= ceiling
    assert backoff_delay(attempt, base=0.1, cap=cap, rand=None) == pytest.approx(ceiling)


def test_reconnect_sequence() -> None:
    upper = [redis_delay(n, lambda: 1.0) for n in range(9)]
    assert upper == pytest.approx([0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    lower = [redis_delay(n, lambda: 0.0) for n in range(9)]
    assert lower == pytest.approx([0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.5, 2.5])


def test_worker_restart_sequence_is_what_it_always_was() -> None:
    # 0.5 s doubling to a 10 s cap, no jitter: the waits the supervisor logs.
    assert [restart_delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 10, 10, 10]
    assert restart_delay(10_000) == RESTART_BACKOFF_MAX
