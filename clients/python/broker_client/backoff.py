"""Reconnection delays: capped exponential backoff with jitter, no I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """Produce the delay before each reconnection attempt.

    Attempt ``n`` (0 for the first retry after a connection was lost) waits a
    random time between ``initial`` and ``min(maximum, initial * factor**n)``
    seconds; the very first retry after a working connection waits between 0 and
    ``initial``, so that clients dropped together by a restarting broker do not
    all come back at the same instant.
    """

    initial: float = 0.2
    maximum: float = 10.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random, repr=False)
    attempt: int = 0

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or self.factor < 1:
            raise ValueError("need 0 < initial <= maximum and factor >= 1")

    def next_delay(self) -> float:
        """Return the delay before the next attempt and count that attempt."""
        n = self.attempt
        self.attempt += 1
        if n == 0:
            return self.rng.uniform(0.0, self.initial)
        ceiling = min(self.maximum, self.initial * self.factor ** min(n, 64))
        return self.rng.uniform(self.initial, ceiling)

    def reset(self) -> None:
        """Start again from the shortest delay (call once a connection has proved stable)."""
        self.attempt = 0
