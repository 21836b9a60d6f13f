"""A message's place in its channel, and what a publish got (pure)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PUBLISHED", "Position", "Published"]


@dataclass(frozen=True, slots=True)
class Position:
    """Where a message sits in its channel: ``offset`` counts from 1 within ``epoch``.

    ``epoch`` changes whenever the channel's offsets start over (its history
    was lost), so an offset means nothing without it.
    """

    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Published:
    """What the backplane reports about a publish it took.

    ``position`` is the message's position on a channel with history;
    ``duplicate`` is true when a publish with the same idempotency key was
    taken before (and ``position`` is then that first one's).
    """

    position: Position | None = None
    duplicate: bool = False


#: The result of a plain publish (no position, not a duplicate), shared.
PUBLISHED = Published()
