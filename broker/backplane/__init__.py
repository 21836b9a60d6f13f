"""The backplane interface: how published messages travel between broker processes.

A backplane carries ``(channel, data)`` pairs, where ``data`` is the message's
``data`` already serialized as JSON bytes, from any process that publishes to
every process that has declared interest in a matching channel or pattern.

Delivery guarantee (both implementations): at most once per message per
process, in publish order per publishing process and channel. A process that
has not subscribed to a matching channel or pattern receives nothing.

Contract, in the order a node calls it:

* ``await start(deliver)``: connect; ``deliver(channel, data)`` is then called,
  synchronously, on the event loop, once per message and process. It must not
  block and must not raise.
* ``await subscribe(pattern)`` / ``await unsubscribe(pattern)``: the hub calls
  these for the first local subscriber of a pattern and for the last one
  leaving. Patterns use the broker's own syntax (``*`` and ``>``). They do not
  raise on an outage: the backplane records the interest and restores it when
  it reconnects.
* ``publish(channel, data)``: hands the message over *now* (so calls made in
  order are delivered in order) and returns a future that resolves once the
  backplane has taken the message, or fails with ``BackplaneError`` when it
  cannot (promptly, within about a second, never after a long retry).
* ``ready``: whether messages can flow right now (``/readyz``).
* ``stats()``: the backplane's own counters, exported as
  ``broker_backplane_<name>_total`` on ``/metrics``.
* ``await close()``: stop, release every connection and task. Idempotent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

DeliverFn = Callable[[str, bytes], None]


class Backplane(Protocol):
    """Carries messages between broker processes; see the module docstring."""

    @property
    def ready(self) -> bool: ...

    async def start(self, deliver: DeliverFn) -> None: ...

    async def close(self) -> None: ...

    async def subscribe(self, pattern: str) -> None: ...

    async def unsubscribe(self, pattern: str) -> None: ...

    def publish(self, channel: str, data: bytes) -> asyncio.Future[None]: ...

    def stats(self) -> dict[str, int]: ...
