"""The receiving side of a node: messages in order, holes filled, losses said.

Theory of operation. ``Delivery`` is the backplane's ``Listener``. A message
without a position (a channel without history) goes straight to the hub. A
message with a position is checked against the last offset this process
delivered on its channel (its *track*):

* the next offset: delivered;
* an offset already delivered: dropped (a copy);
* a jump: the hole is filled from the channel's history *before* the newer
  message. While the fill reads history, later messages of that channel wait
  in the track, so they still come out in order. If history no longer holds
  the hole, every subscription matching the channel gets one ``gap`` frame
  (``offset_hole``) and delivery goes on;
* another epoch: the channel's history was lost (Redis flushed or failed
  over); whatever the old epoch had after the last offset delivered here may
  never arrive, so every subscription matching the channel gets a ``gap``
  (``epoch_changed``), and the new epoch is counted from its start. Not when
  the old epoch was known at offset 0: nothing was published in it to miss
  (a quiet channel whose unused epoch expired).

A link that broke (``link_lost``, from the backplane) or a readiness canary
that stopped coming back (``canary_late``, from ``canary.Canary``) is an
*interruption*: messages published meanwhile may never arrive. When delivery
resumes, every exact channel with history that is subscribed here is filled
from history from its last delivered offset (its track is seeded when it is
subscribed, so a quiet channel is checked too); each subscription that cannot
be filled that way (patterns, channels without history, history that no
longer reaches back) gets exactly one ``gap`` (``backplane_interrupted``).

Channels whose name starts with ``$`` are the broker's own (the canary's);
they go to the handler registered for them, never to subscribers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from broker import codec
from broker.backplane import Backplane
from broker.channels import is_pattern
from broker.exceptions import BackplaneError
from broker.history import HistoryPolicy, HistoryRead, fill
from broker.hub import Hub
from broker.metrics import Metrics
from broker.position import Position

__all__ = ["BACKPLANE_INTERRUPTED", "EPOCH_CHANGED", "OFFSET_HOLE", "Delivery"]

log = logging.getLogger(__name__)

#: ``gap`` reasons.
BACKPLANE_INTERRUPTED = "backplane_interrupted"
OFFSET_HOLE = "offset_hole"
EPOCH_CHANGED = "epoch_changed"

#: Channels whose last offset is remembered; the oldest is forgotten past this.
MAX_TRACKS = 100_000


class _Track:
    """What this process last delivered on one channel with history."""

    __slots__ = ("epoch", "last", "pending", "seeded")

    def __init__(self, epoch: str, last: int, *, seeded: bool = False) -> None:
        self.epoch = epoch
        self.last = last
        #: Messages waiting while a fill reads history; None when no fill runs.
        self.pending: list[tuple[bytes, Position]] | None = None
        #: Seeded from a read, not from a delivery: an offset at or below
        #: ``last`` may still be in flight on the link and is delivered, not dropped.
        self.seeded = seeded


class Delivery:
    """The backplane's listener for one node; see the module docstring.

    ``history_of(channel)`` gives a channel's history policy (None: none).
    """

    def __init__(
        self,
        hub: Hub,
        backplane: Backplane,
        history_of: Callable[[str], HistoryPolicy | None],
        metrics: Metrics,
    ) -> None:
        self._hub = hub
        self._backplane = backplane
        self._history_of = history_of
        self._metrics = metrics
        self._tracks: dict[str, _Track] = {}
        self._fills: set[asyncio.Task[None]] = set()
        #: Handlers of the broker's own channels (``$...``), by channel.
        self.internal: dict[str, Callable[[bytes], None]] = {}
        self._link_down = False
        self._canary_late = False
        self._interrupted = False

    # -- the Listener interface -------------------------------------------------

    def deliver(self, channel: str, data: bytes, position: Position | None) -> None:
        """One message from the backplane (synchronous, never raises for a peer)."""
        if position is None:
            if channel[0] == "$":
                handler = self.internal.get(channel)
                if handler is not None:
                    handler(data)
                return
            self._hub.deliver(channel, data, None)
            return
        track = self._tracks.get(channel)
        if track is None:
            self._remember(channel, _Track(position.epoch, position.offset))
            self._hub.deliver(channel, data, position)
        elif track.pending is not None:
            track.pending.append((data, position))
        else:
            self._advance(channel, track, data, position)

    def link_lost(self) -> None:
        self._link_down = True
        self._update()

    def link_restored(self) -> None:
        self._link_down = False
        self._update()

    # -- from the canary ------------------------------------------------------------

    def canary_late(self) -> None:
        """The readiness canary did not come back in time: delivery may have stopped."""
        self._canary_late = True
        self._update()

    def canary_ok(self) -> None:
        """A canary came back: delivery works."""
        self._canary_late = False
        self._update()

    # -- from the node ----------------------------------------------------------------

    def seed(self, channel: str, position: Position) -> None:
        """A subscription to ``channel`` read its position: start tracking from there.

        Keeps what is already known; a new track starts *seeded* (offsets at or
        below the read may still be on their way, and are delivered).
        """
        if channel not in self._tracks:
            self._remember(channel, _Track(position.epoch, position.offset, seeded=True))

    def delivered_through(self, channel: str, position: Position) -> bool:
        """Whether every message of ``channel`` up to ``position`` has been delivered here.

        False while one may still be on its way: a seeded track delivers
        offsets at or below its seed when they come.
        """
        track = self._tracks.get(channel)
        return (
            track is not None
            and not track.seeded
            and track.epoch == position.epoch
            and track.last >= position.offset
        )

    async def close(self) -> None:
        """Stop the fills still running."""
        for task in list(self._fills):
            task.cancel()
        if self._fills:
            await asyncio.gather(*self._fills, return_exceptions=True)

    # -- ordering ---------------------------------------------------------------------

    def _advance(self, channel: str, track: _Track, data: bytes, position: Position) -> None:
        offset = position.offset
        if position.epoch != track.epoch:
            # The channel's offsets started over (its history was lost): what the old
            # epoch had after ``track.last`` can never be replayed. Say so (unless
            # nothing was ever published in it), then count the new epoch from the start.
            if track.last > 0:
                self._metrics.gaps_sent += self._gap_channel(channel, EPOCH_CHANGED)
            track.epoch, track.last, track.seeded = position.epoch, 0, False
        if offset == track.last + 1:
            track.last = offset
            track.seeded = False
            self._hub.deliver(channel, data, position)
        elif offset <= track.last:
            if track.seeded:
                self._hub.deliver(channel, data, position)  # was in flight when seeded
            else:
                self._metrics.duplicates_dropped += 1
        else:
            track.pending = [(data, position)]
            self._start_fill(channel, track, OFFSET_HOLE)

    def _start_fill(self, channel: str, track: _Track, reason: str) -> None:
        if track.pending is None:
            track.pending = []
        task = asyncio.get_running_loop().create_task(
            self._fill(channel, track, reason), name=f"fill {channel}"
        )
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)

    async def _fill(self, channel: str, track: _Track, reason: str) -> None:
        """Read what ``channel`` missed after ``track.last``, deliver it, then what waited."""
        after = track.last
        read = await self._read(channel, after)
        if read is not None and read.epoch != track.epoch:
            # History started over since we last delivered: the old epoch's tail is
            # gone for good (said here), the new epoch is filled from its start.
            if track.last > 0 or reason:
                self._metrics.gaps_sent += self._gap_channel(channel, reason or EPOCH_CHANGED)
            track.epoch, track.last, after = read.epoch, 0, 0
            reason = ""  # told already: a hole in the new epoch is not another gap
            read = await self._read(channel, 0)
            if read is not None and read.epoch != track.epoch:
                read = None  # changed again meanwhile: the live messages will tell
        pending = track.pending or []
        track.pending = None
        # Fill up to the first waiting message of this epoch, or to the top.
        until = read.top if read is not None else after
        for _, position in pending:
            if position.epoch == track.epoch:
                until = position.offset - 1
                break
        missed = fill(read, after, until) if read is not None else None
        if missed is None:
            self._metrics.gaps_sent += self._gap_channel(channel, reason)
            track.last = max(track.last, until)
        else:
            self._metrics.messages_recovered += len(missed)
            for offset, data in missed:
                track.last = offset
                self._hub.deliver(channel, data, Position(offset, track.epoch))
        track.seeded = False
        for index, (data, position) in enumerate(pending):
            self._advance(channel, track, data, position)
            if track.pending is not None:  # another hole: the rest waits for its fill
                track.pending.extend(pending[index + 1 :])
                return

    async def _read(self, channel: str, after: int) -> HistoryRead | None:
        """Everything ``channel`` kept after ``after``, or None when it cannot be read."""
        policy = self._history_of(channel)
        if policy is None:
            return None
        try:
            return await self._backplane.read(channel, policy, after=after)
        except BackplaneError as exc:
            log.debug("fill of %s failed: %s", channel, exc)
        except Exception:
            log.exception("fill of %s failed unexpectedly", channel)
        return None

    # -- interruptions ----------------------------------------------------------------

    def _update(self) -> None:
        down = self._link_down or self._canary_late
        if down and not self._interrupted:
            self._interrupted = True
            # The backplane or the canary has already said why, at warning level.
            log.info("delivery interrupted: messages published now may be lost")
        elif not down and self._interrupted:
            self._interrupted = False
            self._resume()

    def _resume(self) -> None:
        """Delivery works again: fill what history holds, say ``gap`` for the rest."""
        filled = 0
        gaps = 0
        exact_with_history: set[str] = set()
        for pattern in self._hub.patterns():
            if not is_pattern(pattern) and self._history_of(pattern) is not None:
                track = self._tracks.get(pattern)
                if track is not None:
                    exact_with_history.add(pattern)
                    if track.pending is None:
                        self._start_fill(pattern, track, BACKPLANE_INTERRUPTED)
                    filled += 1
                    continue
            gaps += self._hub.send_to_subscribers(
                pattern, codec.encode_gap(pattern, BACKPLANE_INTERRUPTED)
            )
        # Channels seen only through patterns: recover what history holds for
        # them too (their pattern subscriptions got their gap above).
        for channel, track in list(self._tracks.items()):
            if (
                channel not in exact_with_history
                and track.pending is None
                and self._hub.subscribers(channel)
            ):
                self._start_fill(channel, track, "")
        self._metrics.gaps_sent += gaps
        log.info(
            "delivery resumed: %d channels refilled from history, %d gap frames sent",
            filled,
            gaps,
        )

    def _gap_channel(self, channel: str, reason: str) -> int:
        """Tell the subscriptions of ``channel`` about a hole; ``reason`` "" says nothing."""
        if not reason:
            return 0
        if reason == BACKPLANE_INTERRUPTED:
            # After an interruption only the exact subscription is owed its gap
            # here; patterns got theirs when delivery resumed.
            return self._hub.send_to_subscribers(channel, codec.encode_gap(channel, reason))
        sent = 0
        for pattern in self._hub.matching_patterns(channel):
            sent += self._hub.send_to_subscribers(pattern, codec.encode_gap(pattern, reason))
        return sent

    def _remember(self, channel: str, track: _Track) -> None:
        tracks = self._tracks
        if len(tracks) >= MAX_TRACKS:
            for name in list(tracks)[: MAX_TRACKS // 10]:
                if tracks[name].pending is None:
                    del tracks[name]
        tracks[channel] = track
