"""The hub: local subscriptions, backplane interest, and fan-out.

Theory of operation. The index maps patterns to local peers. The first local
subscriber of a pattern makes the hub subscribe on the backplane, the last one
leaving unsubscribes; both happen under a per-pattern lock and the count is
re-checked after every await, so a subscribe racing an unsubscribe of the same
pattern always ends in the right state.

Fan-out (``deliver``) is synchronous and never awaits a peer: the message
frame's JSON is encoded once and the same bytes object is handed to every
matching peer, each once however many of its patterns match. How those bytes
travel (WebSocket framing, compression) is the transport's business: the hub
knows nothing of sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from time import perf_counter
from typing import Protocol

from broker.backplane import Backplane, Position
from broker.codec import encode_message
from broker.index import SubscriptionIndex
from broker.metrics import Metrics
from broker.session import Session

__all__ = ["Hub", "Peer", "Recipient", "Tap"]


class Recipient(Protocol):
    """What the hub's index holds: a peer, or a ``Tap`` standing in for one."""

    def deliver(self, payload: bytes) -> None:
        """Queue one message frame's JSON; the same object goes to every recipient.

        Must not block or raise; a peer that cannot keep up closes itself.
        """

    def send(self, payload: bytes) -> None:
        """Queue a reply-like frame's JSON, in order with delivered messages."""


class Peer(Recipient, Protocol):
    """A connected client as the hub and the node see it.

    The WebSocket transport's peer is ``outbox.Outbox``; tests use fakes.
    """

    session: Session

    def close(self, code: int, reason: str) -> None:
        """Start closing with ``code`` after what is queued; returns at once."""


class Hub:
    """Holds this process's subscriptions and delivers messages to them."""

    def __init__(self, backplane: Backplane, metrics: Metrics) -> None:
        #: The position of the message being delivered (for ``Tap``), or None.
        self.position: Position | None = None
        self._index: SubscriptionIndex[Recipient] = SubscriptionIndex()
        self._backplane = backplane
        self._metrics = metrics
        self._on_backplane: set[str] = set()
        self._locks: dict[str, _PatternLock] = {}

    @property
    def subscription_count(self) -> int:
        """Local (pattern, peer) subscriptions."""
        return len(self._index)

    @property
    def pattern_count(self) -> int:
        """Distinct channels and patterns with at least one local subscriber."""
        return self._index.pattern_count

    def wants(self, pattern: str) -> bool:
        """Whether some local peer is subscribed to ``pattern``."""
        return self._index.has(pattern)

    def patterns(self) -> list[str]:
        """Every channel and pattern with at least one local subscriber."""
        return list(self._index.patterns())

    def subscribers(self, channel: str) -> list[Recipient]:
        """Every local peer a message on ``channel`` would reach, each once."""
        return self._index.subscribers(channel)

    async def subscribe(self, pattern: str, peer: Recipient) -> None:
        """Deliver ``pattern`` to ``peer``; returns once the backplane carries it."""
        self._index.add(pattern, peer)
        if pattern not in self._on_backplane or pattern in self._locks:
            # New here, or a change of the same pattern is in flight: wait for it.
            await self._sync(pattern)

    async def unsubscribe(self, pattern: str, peer: Recipient) -> None:
        """Stop delivering ``pattern`` to ``peer``; takes effect at once locally.

        The backplane's interest is dropped whenever nobody here wants
        ``pattern`` any more, also when ``peer`` was already taken out of the
        index (``drop``), so a closed peer's patterns are released too.
        """
        self._index.remove(pattern, peer)
        if not self._index.has(pattern) and (
            pattern in self._on_backplane or pattern in self._locks
        ):
            await self._sync(pattern)

    def drop(self, peer: Recipient, patterns: Iterable[str]) -> None:
        """Stop delivering ``patterns`` to ``peer`` now, without touching the backplane.

        For a peer that is going away: no message may reach it after this
        returns; ``unsubscribe`` each pattern afterwards to release the
        backplane's interest.
        """
        for pattern in patterns:
            self._index.remove(pattern, peer)

    def deliver(self, channel: str, data: bytes, position: Position | None = None) -> None:
        """Fan a message out to every local subscriber of ``channel``.

        The backplane's ``deliver``: synchronous, never raises for a peer's sake.
        """
        metrics = self._metrics
        metrics.messages_received += 1
        sets = self._index.match(channel)
        if not sets:
            return
        started = perf_counter()
        self.position = position
        payload = encode_message(channel, data, position)
        if len(sets) == 1:
            targets = sets[0]
        else:
            targets = {}
            for peers in sets:
                targets.update(peers)
        # Copy: a peer closing itself during delivery changes the index.
        for peer in list(targets):
            peer.deliver(payload)
        metrics.messages_delivered += len(targets)
        metrics.fanout.observe(perf_counter() - started)

    def swap(self, pattern: str, old: Recipient, new: Recipient) -> None:
        """Hand ``old``'s subscription to ``pattern`` over to ``new``, with no message between.

        Synchronous: the backplane's interest does not change (the pattern has a
        subscriber throughout), and no delivery can come between the two steps.
        """
        self._index.add(pattern, new)
        self._index.remove(pattern, old)

    def matching_patterns(self, channel: str) -> list[str]:
        """Every subscribed channel or pattern that matches ``channel``."""
        return [pattern for pattern, _ in self._index.match_patterns(channel)]

    def send_to_subscribers(self, pattern: str, frame: bytes) -> int:
        """Send ``frame`` (a reply-like frame, such as ``gap``) to each peer of ``pattern``.

        Only the peers subscribed to exactly this channel or pattern, not those
        whose other patterns match it. Returns how many got it.
        """
        peers = [
            peer
            for peer in self._index.subscribers_of(pattern)
            if not isinstance(peer, Tap) or peer.peer is not None
        ]
        for peer in peers:
            peer.send(frame)  # a forwarding tap passes it on
        return len(peers)

    async def _sync(self, pattern: str) -> None:
        """Make the backplane's interest in ``pattern`` match the index."""
        entry = self._locks.get(pattern)
        if entry is None:
            entry = self._locks[pattern] = _PatternLock()
        entry.users += 1
        try:
            async with entry.lock:
                # Re-check after every await: the index may have changed meanwhile.
                while True:
                    wanted = self._index.has(pattern)
                    if wanted == (pattern in self._on_backplane):
                        return
                    if wanted:
                        await self._backplane.subscribe(pattern)
                        self._on_backplane.add(pattern)
                    else:
                        await self._backplane.unsubscribe(pattern)
                        self._on_backplane.discard(pattern)
        finally:
            entry.users -= 1
            if not entry.users:
                del self._locks[pattern]


class Tap:
    """Stands in for a peer in the index while its replay is joined to the live stream.

    First it *records*: it holds the channel's backplane interest and keeps
    every live message that arrives while the history is being read, with its
    position. Then, if this process has not yet delivered everything the read
    saw (messages at or below the read's top still on their way here), it
    *forwards*: messages the replay already gave are dropped, the rest go to
    the peer, until the first message past the read; ``on_joined`` then puts
    the peer in the tap's place. So the peer gets no hole and no duplicate.
    """

    __slots__ = ("_hub", "_joined", "_top", "messages", "peer")

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self.messages: list[tuple[Position | None, bytes]] = []
        #: The peer forwarded to; None while recording.
        self.peer: Recipient | None = None
        self._top: Position | None = None
        self._joined: Callable[[Tap], None] | None = None

    def forward(self, peer: Recipient, top: Position, on_joined: Callable[[Tap], None]) -> None:
        """Forward to ``peer`` what comes after ``top``; call ``on_joined`` once past it."""
        self.peer, self._top, self._joined = peer, top, on_joined

    def newer_than(self, top: Position) -> list[bytes]:
        """The recorded messages that a read ending at ``top`` did not hold."""
        return [payload for position, payload in self.messages if _newer(position, top)]

    def reached(self, top: Position) -> bool:
        """Whether a recorded message shows the live stream has come as far as ``top``."""
        return any(_reached(position, top) for position, _ in self.messages)

    def deliver(self, payload: bytes) -> None:
        position = self._hub.position
        if self.peer is None:
            self.messages.append((position, payload))
            return
        top = self._top
        assert top is not None and self._joined is not None
        if _newer(position, top):
            self.peer.deliver(payload)
        if _reached(position, top):
            self._joined(self)

    def send(self, payload: bytes) -> None:
        if self.peer is not None:
            self.peer.send(payload)
        # While recording, a gap is not passed on: the replay decides what the peer is told.


def _newer(position: Position | None, top: Position) -> bool:
    """Not in a read that ended at ``top``: no position, another epoch, or past it."""
    return position is None or position.epoch != top.epoch or position.offset > top.offset


def _reached(position: Position | None, top: Position) -> bool:
    """At or past ``top`` (or in another epoch): the live stream has caught up with it."""
    return position is not None and (position.epoch != top.epoch or position.offset >= top.offset)


class _PatternLock:
    """A lock that is dropped once nobody holds or awaits it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0
