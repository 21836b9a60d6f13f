"""The hub: local subscriptions, backplane interest, and fan-out.

Theory of operation. The index maps patterns to local subscribers. The first
local subscriber of a pattern makes the hub subscribe on the backplane, the
last one leaving unsubscribes; both happen under a per-pattern lock and the
count is re-checked after every await, so a subscribe racing an unsubscribe of
the same pattern always ends in the right state.

Fan-out (``deliver``) is synchronous and never awaits a subscriber: the
message frame is encoded once, framed once, and the same bytes are handed to
every matching subscriber, each once however many of its patterns match.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from broker.backplane import Backplane
from broker.channels import SubscriptionIndex
from broker.codec import encode_message
from broker.metrics import Metrics
from broker.wsframe import text_frame


class Subscriber(Protocol):
    """Something that receives messages; in practice a WebSocket connection."""

    def deliver(self, payload: bytes, wire: bytes) -> None:
        """Queue one message frame: ``payload`` is its JSON, ``wire`` the framed bytes.

        Must not block or raise; a subscriber that cannot keep up closes itself.
        """


class Hub:
    """Holds this process's subscriptions and delivers messages to them."""

    def __init__(self, backplane: Backplane, metrics: Metrics) -> None:
        self.index: SubscriptionIndex[Subscriber] = SubscriptionIndex()
        self._backplane = backplane
        self._metrics = metrics
        self._on_backplane: set[str] = set()
        self._locks: dict[str, _PatternLock] = {}

    async def subscribe(self, pattern: str, subscriber: Subscriber) -> None:
        """Deliver ``pattern`` to ``subscriber``; returns once the backplane carries it."""
        self.index.add(pattern, subscriber)
        if pattern not in self._on_backplane or pattern in self._locks:
            # New here, or a change of the same pattern is in flight: wait for it.
            await self._sync(pattern)

    async def unsubscribe(self, pattern: str, subscriber: Subscriber) -> None:
        """Stop delivering ``pattern`` to ``subscriber``; takes effect at once locally.

        The backplane's interest is dropped whenever nobody here wants ``pattern``
        any more, also when ``subscriber`` was already taken out of the index
        (``Node.detach`` does that first, so no message reaches a closed peer).
        """
        self.index.remove(pattern, subscriber)
        if not self.index.has(pattern) and (
            pattern in self._on_backplane or pattern in self._locks
        ):
            await self._sync(pattern)

    def deliver(self, channel: str, data: bytes) -> None:
        """Fan a message out to every local subscriber of ``channel``.

        This is the backplane's ``deliver`` callback: synchronous, never raises
        for a subscriber's sake.
        """
        metrics = self._metrics
        metrics.messages_received += 1
        sets = self.index.match(channel)
        if not sets:
            return
        payload = encode_message(channel, data)
        wire = text_frame(payload)
        if len(sets) == 1:
            targets = sets[0]
        else:
            targets = {}
            for subscribers in sets:
                targets.update(subscribers)
        # Copy: a subscriber closing itself during delivery changes the index.
        for subscriber in list(targets):
            subscriber.deliver(payload, wire)
        metrics.messages_delivered += len(targets)

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
                    wanted = self.index.has(pattern)
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


class _PatternLock:
    """A lock that is dropped once nobody holds or awaits it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0
