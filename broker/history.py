"""Channel history and recovery, the pure part: what a read returns, what it means.

A backplane keeps, per channel whose rule asks for it, the last messages with
their offsets (``HistoryPolicy``); reading them gives a ``HistoryRead``. The
decisions made from a read live here, so they are the same for every
backplane and tested without one:

* ``recover(read, since)``: a ``subscribe`` with ``since`` either replays
  exactly every message after ``since`` (``recovered: true``) or nothing
  (``recovered: false`` with a reason): never a partial replay;
* ``fill(read, after, until)``: the messages a process missed between two
  offsets it saw, or ``None`` when history no longer holds all of them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from broker.position import Position

__all__ = [
    "EPOCH_CHANGED",
    "NO_HISTORY",
    "TRIMMED",
    "HistoryPolicy",
    "HistoryRead",
    "Recovery",
    "fill",
    "new_epoch",
    "recover",
]

#: The reasons of ``recovered: false``, as the protocol names them.
TRIMMED = "trimmed"
EPOCH_CHANGED = "epoch_changed"
NO_HISTORY = "no_history"


def new_epoch() -> str:
    """A fresh epoch: short, URL- and JSON-safe, and unlikely ever to repeat."""
    return secrets.token_hex(4)


@dataclass(frozen=True, slots=True)
class HistoryPolicy:
    """How much history a channel keeps: ``size`` messages for ``ttl`` seconds."""

    size: int
    ttl: float


@dataclass(frozen=True, slots=True)
class HistoryRead:
    """A channel's state as one read saw it, atomically.

    ``top`` is the latest offset in ``epoch`` (0: nothing published yet).
    ``entries`` are ``(offset, data)`` pairs in offset order, the ones the read
    asked for that history still holds (expired ones left out); ``complete``
    is False when the read asked for offsets history no longer holds.
    """

    epoch: str
    top: int
    entries: tuple[tuple[int, bytes], ...] = ()
    complete: bool = True

    @property
    def position(self) -> Position:
        return Position(self.top, self.epoch)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a ``subscribe`` with ``since`` gets: ``replay`` (in order) or a reason."""

    recovered: bool
    replay: tuple[tuple[int, bytes], ...] = ()
    reason: str | None = None


def recover(read: HistoryRead, since: Position) -> Recovery:
    """Decide a recovery from a read of everything after ``since.offset``."""
    if read.epoch != since.epoch or since.offset > read.top:
        # An offset beyond the top cannot be from this epoch's history either.
        return Recovery(False, reason=EPOCH_CHANGED)
    missed = fill(read, since.offset, read.top)
    if missed is None:
        return Recovery(False, reason=TRIMMED)
    return Recovery(True, missed)


def fill(read: HistoryRead, after: int, until: int) -> tuple[tuple[int, bytes], ...] | None:
    """The entries with offsets ``after + 1`` to ``until``, all of them, or None.

    ``read`` must come from a read of the same epoch that asked for at least
    that range; entries outside the range are left out.
    """
    if until <= after:
        return ()
    if not read.complete:
        return None
    wanted = tuple(entry for entry in read.entries if after < entry[0] <= until)
    if len(wanted) != until - after:
        return None
    expected = after + 1
    for offset, _ in wanted:
        if offset != expected:
            return None
        expected += 1
    return wanted
