"""Exact de-duplication of the copies a pub/sub server sends for one publish.

Pure (no asyncio, no I/O): any backplane whose server sends one copy per
matching subscription, back to back, can use it. The Redis backplane does
(``broker/backplane/redis_link.py``); a NATS one with overlapping subscriptions
on one connection would meet the same problem.
"""

from __future__ import annotations

__all__ = ["Deduplicator"]


class Deduplicator:
    """Drops the extra copies Redis sends when several subscriptions match one publish.

    Redis sends one message per matching subscription of a connection (the
    exact channel and each matching pattern), written one after another while
    it runs that single ``PUBLISH``: nothing can come between them. So a copy
    is a message equal to the previous one (same channel and key) that arrives
    through a subscription *not yet seen* in the current run. A second publish
    of equal content starts with a subscription already seen, because it
    matches the same subscriptions, unless our subscriptions changed in
    between, and then a (un)subscribe confirmation came in between and called
    ``reset()``. This makes de-duplication exact, also for messages without an
    id (where the key is the whole payload).

    One instance serves one connection: the argument above is about the order
    of one stream, so a new connection needs a new ``Deduplicator``.
    """

    __slots__ = ("_channel", "_key", "_sources")

    def __init__(self) -> None:
        self._channel: bytes | None = None
        self._key: bytes | None = None
        self._sources: set[bytes | None] = set()

    def first(self, channel: bytes, key: bytes, source: bytes | None) -> bool:
        """Return whether to deliver this message; ``source`` is the pattern, or ``None``.

        Call it in the order messages were read. A check that drops a message
        before this call must drop every copy of it alike (a check on the
        channel and payload does), or a copy would lose the one it follows.
        """
        if key == self._key and channel == self._channel and source not in self._sources:
            self._sources.add(source)
            return False
        self._channel = channel
        self._key = key
        self._sources.clear()
        self._sources.add(source)
        return True

    def reset(self) -> None:
        """Forget the last message: the set of subscriptions has just changed.

        Call it at the point of the stream where the server confirmed a
        subscribe or an unsubscribe.
        """
        self._channel = None
        self._key = None
        self._sources.clear()
