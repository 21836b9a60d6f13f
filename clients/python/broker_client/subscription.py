"""A subscription: a bounded buffer of messages between the connection and the application."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType

from .errors import ConnectionClosed
from .frames import Gap, Message, matches

__all__ = ["Subscription"]

#: Default number of messages a subscription buffers before it drops the oldest.
DEFAULT_MAX_BUFFER = 10_000


class Subscription:
    """Messages from one or more channel patterns, as an async iterator.

    Create one with :meth:`Client.subscribe`. Iterating yields
    :class:`Message` objects; iteration ends when the subscription is
    unsubscribed or its client closed, and raises the error that ended it
    otherwise: :class:`ConnectionClosed` if the client gave up reconnecting,
    the broker's error (``Forbidden`` ...) if the broker ended or refused the
    subscription. :meth:`events` also yields :class:`Gap` markers where
    messages may have been missed.

    A subscription buffers at most ``max_buffer`` messages: if the application
    reads slower than messages arrive, the oldest are dropped and an
    ``"overflow"`` gap is recorded, so a slow consumer never grows memory
    without bound nor stalls the other subscriptions of the connection.
    """

    def __init__(
        self,
        patterns: tuple[str, ...],
        *,
        unsubscribe: Callable[[Subscription], Awaitable[None]],
        max_buffer: int = DEFAULT_MAX_BUFFER,
        generation: int = -1,
    ) -> None:
        if max_buffer < 1:
            raise ValueError("max_buffer must be at least 1")
        self._patterns = patterns
        self._unsubscribe = unsubscribe
        self._max_buffer = max_buffer
        self._items: deque[Message | Gap] = deque()
        self._wakeup = asyncio.Event()
        self._ended = False
        self._error: BaseException | None = None
        self._overflow = 0
        self._overflow_since = 0.0
        self._has_callback = False
        #: Connection generation on which this subscription was confirmed (-1: not yet).
        self._generation = generation
        #: Patterns the broker has confirmed for it: only those are routed to it.
        self._live: set[str] = set()
        #: How many gaps (reconnections or overflows) this subscription has seen.
        self.gaps = 0
        #: How many messages were dropped because the buffer was full.
        self.dropped = 0
        #: The most recent gap, or None.
        self.last_gap: Gap | None = None

    def __repr__(self) -> str:
        state = "closed" if self._ended else "open"
        return f"<Subscription {' '.join(self._patterns)} {state}>"

    @property
    def patterns(self) -> tuple[str, ...]:
        """The channels and patterns this subscription receives."""
        return self._patterns

    @property
    def closed(self) -> bool:
        """True once the subscription ended (unsubscribed, client closed or gave up)."""
        return self._ended

    def matches(self, channel: str) -> bool:
        """Tell whether a message on ``channel`` belongs to this subscription."""
        return any(matches(p, channel) for p in self._patterns)

    def _receives(self, channel: str) -> bool:
        return any(matches(p, channel) for p in self._live)

    async def unsubscribe(self) -> None:
        """Stop receiving; buffered messages can still be read, then iteration ends."""
        await self._unsubscribe(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._ended:
            await self.unsubscribe()

    def __aiter__(self) -> Subscription:
        self._check_no_callback()
        return self

    async def __anext__(self) -> Message:
        while True:
            item = await self._next_event()
            if isinstance(item, Message):
                return item

    def events(self) -> AsyncIterator[Message | Gap]:
        """Return an async iterator of the messages and the :class:`Gap` markers between them."""
        self._check_no_callback()
        return self._events()

    # -- called by the client ------------------------------------------------

    async def _events(self) -> AsyncIterator[Message | Gap]:
        while True:
            try:
                item = await self._next_event()
            except StopAsyncIteration:
                return
            yield item

    def _check_no_callback(self) -> None:
        if self._has_callback:
            raise RuntimeError("this subscription delivers its messages to a callback")

    async def _next_event(self) -> Message | Gap:
        while True:
            if self._overflow:
                gap = Gap("overflow", self._overflow_since, time.time(), self._overflow)
                self._overflow = 0
                return gap
            if self._items:
                return self._items.popleft()
            if self._ended:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    def _push(self, item: Message) -> None:
        if self._ended:
            return
        if len(self._items) >= self._max_buffer:
            self._items.popleft()
            if not self._overflow:
                self._overflow_since = time.time()
                self.gaps += 1
                self.last_gap = Gap("overflow", self._overflow_since, self._overflow_since)
            self._overflow += 1
            self.dropped += 1
        self._items.append(item)
        self._wakeup.set()

    def _gap(self, gap: Gap) -> None:
        if self._ended:
            return
        self.gaps += 1
        self.last_gap = gap
        self._items.append(gap)
        self._wakeup.set()

    def _remove_pattern(self, pattern: str) -> None:
        self._patterns = tuple(p for p in self._patterns if p != pattern)
        self._live.discard(pattern)

    def _ending_error(self) -> BaseException:
        return self._error or ConnectionClosed("the subscription ended before it was confirmed")

    def _end(self, error: BaseException | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self._error = error
        self._wakeup.set()
