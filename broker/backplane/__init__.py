"""The backplane interface: how published messages travel between broker processes.

A backplane carries ``(channel, data)`` pairs, where ``data`` is the message's
``data`` already serialized as JSON bytes, from any process that publishes to
every process that has declared interest in a matching channel or pattern.

Delivery guarantee (every implementation): at most once per message per
process, in publish order per publishing process and channel. A process that
has not subscribed to a matching channel or pattern receives nothing. When a
backplane knows it may have dropped messages (its link was lost), it says so
through ``Listener.link_lost`` and ``Listener.link_restored``; what was
published in between is not delivered late.

Contract, in the order a node calls it:

* ``await start(listener)``: connect; ``listener.deliver(channel, data,
  position)`` is then called, synchronously, on the event loop, once per
  message and process. It must not block and must not raise. ``position`` is
  the message's place in its channel (``Position``) on a channel the backplane
  keeps positions for, else ``None``.
* ``await subscribe(pattern)`` / ``await unsubscribe(pattern)``: the hub calls
  these for the first local subscriber of a pattern and for the last one
  leaving. Patterns use the broker's own syntax (``*`` and ``>``). They do not
  raise on an outage: the backplane records the interest and restores it when
  it reconnects.
* ``publish(channel, data, history=None, key=None)``: hands the message over
  *now* (so calls made in order are delivered in order) and returns a future
  that resolves to a ``Published`` once the backplane has taken the message,
  or fails with ``BackplaneError`` when it cannot (promptly, within about a
  second, never after a long retry). With a ``history`` policy the message
  gets the channel's next offset, assigned atomically with the publish (no
  two publishes through any process share one), is kept in the channel's
  history, and is delivered with its ``Position``. With a ``key``, a second
  publish with the same key on the same channel within the backplane's
  idempotency window is not delivered again and resolves to the first one's
  ``Published`` with ``duplicate`` set.
* ``await read(channel, history, after=None, last=None)``: the channel's
  position and, with ``after``, every kept message with a greater offset, or
  with ``last``, the last kept messages, as a ``HistoryRead``, all from one
  atomic look. Raises ``BackplaneError`` when it cannot read now.
* ``ready``: whether messages can flow right now (``/readyz``).
* ``stats()``: the backplane's own counters, exported as
  ``broker_backplane_<name>_total`` on ``/metrics``.
* ``await close()``: stop, release every connection and task. Idempotent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from broker.history import HistoryPolicy, HistoryRead
from broker.position import PUBLISHED, Position, Published

if TYPE_CHECKING:
    # Only for annotations: the package stays importable without an event loop
    # runtime, so the pure modules inside it (redis_wire) load nothing of asyncio.
    import asyncio

__all__ = [
    "PUBLISHED",
    "Backplane",
    "HistoryPolicy",
    "HistoryRead",
    "Listener",
    "Position",
    "Published",
]


class Listener(Protocol):
    """What a backplane reports to: the node's receiving side."""

    def deliver(self, channel: str, data: bytes, position: Position | None) -> None:
        """One message for this process; synchronous, must not block or raise."""

    def link_lost(self) -> None:
        """The link broke: messages published from now on may not arrive."""

    def link_restored(self) -> None:
        """The link is back and every subscription is active on it again."""


class Backplane(Protocol):
    """Carries messages between broker processes; see the module docstring."""

    @property
    def ready(self) -> bool: ...

    async def start(self, listener: Listener) -> None: ...

    async def close(self) -> None: ...

    async def subscribe(self, pattern: str) -> None: ...

    async def unsubscribe(self, pattern: str) -> None: ...

    def publish(
        self,
        channel: str,
        data: bytes,
        *,
        history: HistoryPolicy | None = None,
        key: str | None = None,
    ) -> asyncio.Future[Published]: ...

    async def read(
        self,
        channel: str,
        history: HistoryPolicy,
        *,
        after: int | None = None,
        last: int | None = None,
    ) -> HistoryRead: ...

    def stats(self) -> dict[str, int]: ...
