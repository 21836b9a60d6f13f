"""The client's local subscriptions, the patterns they hold, and where each channel is; no I/O.

The broker knows one subscription per pattern and connection; the client may
have several :class:`Subscription` objects holding the same pattern. The
table counts the holders of each pattern, so that the client subscribes on
the broker for the first and unsubscribes after the last, routes each message
to every subscription that matches it, and knows what to re-subscribe after
a reconnection. The client's public operations change it (under their lock);
the connection task reads it and ends the subscriptions the broker refuses.

Positions. For every exact channel some subscription holds, the table keeps
the last :class:`Position` (offset, epoch) it received, from the messages and
from subscribe replies; channels without history have none. After a
reconnection the link re-subscribes those channels with ``since`` that
position, and the broker replays what was missed. The position also drops
the copies a replay may repeat (an offset not above the last one, in the
same epoch) for the subscriptions that hold the channel itself, and notices
an epoch that changed between two messages (a gap).

A subscription is routed messages only for its *live* patterns: those the
broker has confirmed. The confirmation is applied by the connection task
when the reply is read, before the next frame, so that no message that
follows a subscribe's ``ok`` (a replay, say) reaches the table before the
subscription is ready for it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from typing import Any

from .errors import NotSubscribed, RequestError
from .frames import Gap, Message, Position, is_exact
from .subscription import Subscription

__all__ = ["Outcome", "SubscriptionTable"]


class Outcome(enum.Enum):
    """What a re-subscription after a reconnection did for the subscriptions holding it."""

    #: Nothing could be recovered (a pattern, a channel without history).
    LOST = "lost"
    #: Everything missed was replayed, or will be: no gap.
    RECOVERED = "recovered"
    #: The broker could not replay; the holders already got a :class:`Gap` saying why.
    REPORTED = "reported"


class _Verdict(enum.Enum):
    UNTRACKED = 0
    NEW = 1
    DUPLICATE = 2
    EPOCH_CHANGED = 3


class SubscriptionTable:
    """Local subscriptions, how many of them hold each pattern, and channel positions."""

    def __init__(self) -> None:
        self._subs: list[Subscription] = []  # confirmed ones, and those being subscribed
        self._refs: dict[str, int] = {}  # pattern -> confirmed subscriptions holding it
        self._positions: dict[str, Position] = {}  # exact channel held -> last position
        # Exact channels the broker just sent a gap for: an epoch change on the next
        # message was told already, not a second gap.
        self._told: set[str] = set()

    # -- what is held --------------------------------------------------------------

    def patterns(self) -> list[str]:
        """Return every pattern some subscription holds, oldest first."""
        return list(self._refs)

    def holds(self, pattern: str) -> bool:
        """Tell whether some subscription holds ``pattern`` (so the broker has it)."""
        return pattern in self._refs

    def position(self, channel: str) -> Position | None:
        """The last position received on ``channel``, if it is held and keeps history."""
        return self._positions.get(channel)

    # -- subscribing -----------------------------------------------------------------

    def add_pending(self, sub: Subscription) -> None:
        """Start routing to ``sub`` the patterns already held; the others once confirmed."""
        sub._live.update(p for p in sub.patterns if p in self._refs)
        self._subs.append(sub)

    def confirm(
        self,
        sub: Subscription | None,
        pattern: str,
        fields: Mapping[str, Any],
        *,
        since: Position | None = None,
        history: int | None = None,
        lost_since: float | None = None,
    ) -> Outcome:
        """Apply the broker's ``ok`` to a subscribe of ``pattern``; call it as the reply is read.

        ``sub`` is the new subscription that asked (None for a re-subscription
        after a reconnection, which concerns every holder). ``since`` and
        ``history`` are what the request asked for. Records the channel's
        position, and when a ``since`` could not be honoured gives the holders
        a :class:`Gap` with the broker's reason, from ``lost_since`` (when the
        connection was lost; default now).
        """
        if sub is not None:
            sub._live.add(pattern)
        if not is_exact(pattern):
            return Outcome.LOST
        offset, epoch = fields.get("offset"), fields.get("epoch")
        if type(offset) is not int or not isinstance(epoch, str):
            self._positions.pop(pattern, None)  # the channel keeps no history
        elif since is not None and fields.get("recovered") is True:
            # The replay of what followed ``since`` comes next, then live messages.
            self._positions[pattern] = Position(min(since.offset, offset), epoch)
            return Outcome.RECOVERED
        elif history is not None:
            # The last ``history`` kept messages come next (fewer if fewer are kept).
            self._positions[pattern] = Position(max(0, offset - history), epoch)
        else:
            self._positions[pattern] = Position(offset, epoch)
        if since is None:
            return Outcome.LOST
        reason = fields.get("reason")
        now = time.time()
        gap = Gap(
            reason if isinstance(reason, str) else "reconnect",
            now if lost_since is None else lost_since,
            now,
            channel=pattern,
        )
        for holder in [sub] if sub is not None else self._holders(pattern):
            holder._gap(gap)
        return Outcome.REPORTED

    def activate(self, sub: Subscription, generation: int) -> None:
        """Count ``sub`` as a holder of its patterns: the broker confirmed them all."""
        sub._generation = generation
        sub._live.update(sub.patterns)
        for pattern in sub.patterns:
            self._refs[pattern] = self._refs.get(pattern, 0) + 1

    def discard(self, sub: Subscription) -> None:
        """Forget a subscription that never became active (its subscribe failed)."""
        if sub in self._subs:
            self._subs.remove(sub)
        sub._end()
        self._forget_positions(sub.patterns)

    # -- unsubscribing ---------------------------------------------------------------

    def remove(self, sub: Subscription) -> list[str]:
        """End ``sub``; return the patterns no subscription holds any more.

        Does nothing (and returns no pattern) if ``sub`` already ended.
        """
        if sub.closed or sub not in self._subs:
            return []
        self._subs.remove(sub)
        sub._end()
        return self._release(sub.patterns)

    def remove_pattern(self, pattern: str) -> list[str]:
        """Drop ``pattern`` from every subscription; return it if no subscription holds it now.

        A subscription left without patterns ends. Raises
        :class:`NotSubscribed` if no subscription holds ``pattern``.
        """
        affected = [s for s in self._subs if pattern in s.patterns and s._generation >= 0]
        if not affected or pattern not in self._refs:
            raise NotSubscribed(f"not subscribed to {pattern!r}")
        for sub in affected:
            sub._remove_pattern(pattern)
            if not sub.patterns:
                self._subs.remove(sub)
                sub._end()
        return self._release([pattern] * len(affected))

    def refuse(self, pattern: str, error: RequestError) -> list[str]:
        """End every subscription holding ``pattern`` with ``error`` (the broker refused it).

        Return the *other* patterns no subscription holds any more, which the
        broker still sends and the caller should unsubscribe.
        """
        gone: list[str] = []
        for sub in [s for s in self._subs if pattern in s._live]:
            self._subs.remove(sub)
            sub._end(error)
            if sub._generation >= 0:
                gone += self._release(sub.patterns)
        self._positions.pop(pattern, None)
        self._told.discard(pattern)
        return [p for p in dict.fromkeys(gone) if p != pattern]

    def end_all(self, error: BaseException | None) -> None:
        """End every subscription (with ``error``, or cleanly when None) and forget them."""
        for sub in self._subs:
            sub._end(error)
        self._subs.clear()
        self._refs.clear()
        self._positions.clear()
        self._told.clear()

    # -- what the broker sends ---------------------------------------------------------

    def route(self, message: Message) -> None:
        """Hand ``message`` to every subscription that receives its channel.

        A subscription that holds the channel itself does not get a copy it
        already had (a replay overlapping what came live), and gets an
        ``epoch_changed`` :class:`Gap` before a message of another epoch.
        """
        channel = message.channel
        verdict = self._check(channel, message)
        for sub in self._subs:
            if channel in sub._live:
                if verdict is _Verdict.DUPLICATE:
                    continue
                if verdict is _Verdict.EPOCH_CHANGED:
                    now = time.time()
                    sub._gap(Gap("epoch_changed", now, now, channel=channel))
                sub._push(message)
            elif sub._receives(channel):
                sub._push(message)

    def gap(self, pattern: str, reason: str) -> None:
        """The broker said the subscription ``pattern`` may have missed messages."""
        now = time.time()
        gap = Gap(reason, now, now, channel=pattern)
        if pattern in self._positions:
            self._told.add(pattern)
        for sub in self._holders(pattern):
            sub._gap(gap)

    def mark_gap(self, gap: Gap, generation: int, outcomes: Mapping[str, Outcome]) -> None:
        """Give ``gap`` to every subscription confirmed before connection ``generation``...

        ... unless each of its patterns was recovered or already reported
        (``outcomes``, by pattern, from the re-subscriptions).
        """
        for sub in self._subs:
            if 0 <= sub._generation < generation and any(
                outcomes.get(p, Outcome.LOST) is Outcome.LOST for p in sub.patterns
            ):
                sub._gap(gap)

    # -- inside --------------------------------------------------------------------------

    def _holders(self, pattern: str) -> list[Subscription]:
        return [s for s in self._subs if pattern in s._live]

    def _check(self, channel: str, message: Message) -> _Verdict:
        last = self._positions.get(channel)
        if last is None:
            return _Verdict.UNTRACKED
        offset, epoch = message.offset, message.epoch
        if offset is None or epoch is None:
            return _Verdict.UNTRACKED
        told = channel in self._told
        if told:
            self._told.discard(channel)
        if epoch != last.epoch:
            self._positions[channel] = Position(offset, epoch)
            # At offset 0 the old epoch held nothing to miss (its unused epoch expired).
            return _Verdict.NEW if told or last.offset == 0 else _Verdict.EPOCH_CHANGED
        if offset <= last.offset:
            return _Verdict.DUPLICATE
        self._positions[channel] = Position(offset, epoch)
        return _Verdict.NEW

    def _forget_positions(self, patterns: tuple[str, ...] | list[str]) -> None:
        for pattern in patterns:
            if pattern not in self._refs and not self._holders(pattern):
                self._positions.pop(pattern, None)
                self._told.discard(pattern)

    def _release(self, patterns: tuple[str, ...] | list[str]) -> list[str]:
        """Count one holder less per item of ``patterns``; return those left with none."""
        gone: list[str] = []
        for pattern in patterns:
            left = self._refs.get(pattern, 1) - 1
            if left > 0:
                self._refs[pattern] = left
            else:
                self._refs.pop(pattern, None)
                if pattern not in gone:
                    gone.append(pattern)
        self._forget_positions(gone)
        return gone
