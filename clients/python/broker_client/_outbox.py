"""The outbox: every publish waits here, in order, until a connection writes it.

Theory of operation
-------------------

Both ``publish`` (which waits for the broker's reply) and ``publish_nowait``
(which does not) put an :class:`Outgoing` at the back of one queue; the
connection task's writer takes them from the front and writes them while a
connection is up. One queue for both keeps a publisher's messages in the
order it made them, whichever call it used, across reconnections too.

A publish that expects an answer (``publish``, or any publish with a
``key``) gets a request ``id`` when it is written and stays *in flight*
until the reply with that ``id`` comes. When the connection drops first:

* a publish with a ``key`` goes back to the front of the queue (in its
  original order) and is written again on the next connection: the broker
  drops a second copy with the same key and answers ``duplicate: true``. It
  is written at most :data:`MAX_WRITES` times, so a publish the broker keeps
  closing the connection over cannot loop forever;
* a ``publish`` without a key fails (the caller gets ``ConnectionClosed``),
  because it may or may not have been delivered;
* a ``publish_nowait`` without a key has no ``id`` and is never in flight:
  once written it is gone.

``publish_nowait`` entries count against the outbox's ``limit``; beyond it
:class:`OutboxFull` is raised. ``publish`` entries do not: each has a caller
waiting for it, within a time-out, which bounds them already.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from .errors import ConnectionClosed, OutboxFull
from .frames import Reply, encode

__all__ = ["MAX_WRITES", "Lost", "Outbox", "Outgoing"]

#: How many times one keyed publish is written (on as many connections) at most.
MAX_WRITES = 3


@dataclass(eq=False, slots=True)
class Outgoing:
    """One publish waiting to be written, or written and waiting for its reply."""

    channel: str
    data: bytes  # the JSON of the message's data
    key: str | None = None
    #: ``publish``'s future, resolved with the reply; None for ``publish_nowait``.
    waiter: asyncio.Future[Reply] | None = None
    writes: int = 0

    @property
    def answered(self) -> bool:
        """Whether it carries an ``id`` (so the broker answers it)."""
        return self.waiter is not None or self.key is not None

    def frame(self, request_id: int | None) -> bytes:
        """The ``publish`` frame, with ``request_id`` (None: fire and forget)."""
        fields: dict[str, object] = {
            "channel": self.channel,
            "data": orjson.Fragment(self.data),
        }
        if self.key is not None:
            fields["key"] = self.key
        return encode("publish", request_id, **fields)


class Lost(Exception):
    """The connection dropped before the reply (internal; the caller maps it)."""


class Outbox:
    """The queue of publishes and the table of those in flight; see the module docstring."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("max_outbox must be at least 1")
        self.limit = limit
        self._queue: deque[Outgoing] = deque()
        self._nowait = 0  # publish_nowait entries in the queue
        self._in_flight: dict[int, Outgoing] = {}
        self._changed = asyncio.Event()  # replaced (after being set) on every change
        self._closed: ConnectionClosed | None = None

    def __len__(self) -> int:
        return len(self._queue) + len(self._in_flight)

    # -- for the caller -----------------------------------------------------------------

    def put(self, item: Outgoing) -> None:
        """Queue ``item``; raise :class:`OutboxFull` for a fire-and-forget one over the limit."""
        if self._closed is not None:
            raise self._closed
        if item.waiter is None:
            if self._nowait >= self.limit:
                raise OutboxFull(
                    f"{self._nowait} fire-and-forget publishes already wait for the "
                    f"connection (max_outbox={self.limit})"
                )
            self._nowait += 1
        self._queue.append(item)
        self._notify()

    def withdraw(self, item: Outgoing) -> None:
        """Forget ``item`` (its caller gave up): not written, or its reply no longer awaited."""
        try:
            self._queue.remove(item)
        except ValueError:
            for request_id, other in list(self._in_flight.items()):
                if other is item:
                    del self._in_flight[request_id]
        else:
            if item.waiter is None:
                self._nowait -= 1
        self._notify()

    async def wait_empty(self) -> None:
        """Wait until every publish was written and every one in flight answered."""
        while self._queue or self._in_flight:
            if self._closed is not None:
                raise self._closed
            await self._changed.wait()

    # -- for the writer ---------------------------------------------------------------

    async def wait_items(self) -> None:
        """Wait until something is queued."""
        while not self._queue:
            await self._changed.wait()

    def take(self, new_id: Callable[[], int]) -> tuple[Outgoing, int | None] | None:
        """Take the next publish to write and its ``id`` (None: no answer wanted).

        It is in flight from now on; if writing fails, call :meth:`unwrite`.
        """
        if not self._queue:
            return None
        item = self._queue.popleft()
        if item.waiter is None:
            self._nowait -= 1
        item.writes += 1
        request_id: int | None = None
        if item.answered:
            request_id = new_id()
            self._in_flight[request_id] = item
        self._notify()
        return item, request_id

    def unwrite(self, item: Outgoing, request_id: int | None) -> None:
        """Writing ``item`` failed (the connection was closed): put it back in front."""
        if request_id is not None:
            self._in_flight.pop(request_id, None)
        item.writes -= 1
        if item.waiter is None:
            self._nowait += 1
        self._queue.appendleft(item)
        self._notify()

    def answer(self, request_id: int, reply: Reply) -> Outgoing | None:
        """Apply the reply with ``request_id``; return its publish if it was one of ours."""
        item = self._in_flight.pop(request_id, None)
        if item is None:
            return None
        if item.waiter is not None and not item.waiter.done():
            item.waiter.set_result(reply)
        self._notify()
        return item

    def connection_lost(self) -> list[Outgoing]:
        """The connection dropped: re-queue the keyed publishes in flight, fail the others.

        Return the fire-and-forget publishes given up (keyed ones written
        :data:`MAX_WRITES` times), for the caller to report.
        """
        again: list[Outgoing] = []
        given_up: list[Outgoing] = []
        for _, item in sorted(self._in_flight.items()):
            if item.key is not None and item.writes < MAX_WRITES:
                again.append(item)
            elif item.waiter is not None:
                if not item.waiter.done():
                    item.waiter.set_exception(Lost())
            else:
                given_up.append(item)
        self._in_flight.clear()
        for item in reversed(again):
            if item.waiter is None:
                self._nowait += 1
            self._queue.appendleft(item)
        self._notify()
        return given_up

    def close(self, error: ConnectionClosed) -> int:
        """Fail every waiting ``publish`` with ``error``; return how many others were dropped."""
        self._closed = error
        dropped = 0
        for item in [*self._queue, *self._in_flight.values()]:
            if item.waiter is not None:
                if not item.waiter.done():
                    item.waiter.set_exception(error)
            else:
                dropped += 1
        self._queue.clear()
        self._in_flight.clear()
        self._nowait = 0
        self._notify()
        return dropped

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
