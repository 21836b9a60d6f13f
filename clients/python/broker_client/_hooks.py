"""Running application code for the client: hooks, subscription callbacks, and their tasks.

Application code must never break the connection task: a hook or a callback
that raises is logged and the client goes on. A coroutine hook runs in a task
of its own, so a slow one holds up neither the connection nor the other
hooks. Every task the client starts, these and the connection task, is kept
in one :class:`TaskSet`, which :meth:`Client.close` cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from .errors import BrokerError, ConnectionClosed, RequestError
from .frames import Gap, Message
from .subscription import Subscription

__all__ = [
    "DisconnectCallback",
    "ErrorCallback",
    "GapCallback",
    "Hooks",
    "MessageCallback",
    "TaskSet",
    "add_hook",
    "fire",
    "run_callback",
]

log = logging.getLogger("broker_client")

T = TypeVar("T")
MessageCallback = Callable[[Message], Awaitable[None] | None]
GapCallback = Callable[[Gap], Awaitable[None] | None]
ErrorCallback = Callable[[RequestError], Awaitable[None] | None]
DisconnectCallback = Callable[[ConnectionClosed], Awaitable[None] | None]


class TaskSet:
    """Every task a client started, so that closing the client can cancel them all.

    A task that fails is logged when it ends: nothing else awaits these tasks,
    so without this its exception would be lost.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> None:
        """Run ``coro`` in a task that :meth:`cancel` will cancel."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def cancel(self) -> None:
        """Cancel every task but the calling one and wait for them to end."""
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())


class Hooks:
    """The application's hooks on the life of the connection.

    The client registers them (``on_reconnect`` ...); the connection task
    reports through :meth:`reconnected`, :meth:`disconnected` and
    :meth:`refused`, and knows nothing else of the client.
    """

    def __init__(self, tasks: TaskSet) -> None:
        self._tasks = tasks
        self.on_reconnect: list[GapCallback] = []
        self.on_disconnect: list[DisconnectCallback] = []
        self.on_error: list[ErrorCallback] = []

    def reconnected(self, gap: Gap) -> None:
        """Tell the hooks the client is back and re-subscribed, after ``gap``."""
        fire(self.on_reconnect, gap, self._tasks)

    def disconnected(self, error: ConnectionClosed) -> None:
        """Tell the hooks the connection dropped (before any reconnection)."""
        fire(self.on_disconnect, error, self._tasks)

    def refused(self, error: RequestError) -> None:
        """Report an error no caller is waiting for; logged when there is no hook."""
        if self.on_error:
            fire(self.on_error, error, self._tasks)
        else:
            log.warning("broker error: %s", error)


def add_hook(hooks: list[T], hook: T) -> Callable[[], None]:
    """Append ``hook``; return the function that removes it (and does nothing the second time)."""
    hooks.append(hook)

    def remove() -> None:
        with contextlib.suppress(ValueError):
            hooks.remove(hook)

    return remove


def fire(hooks: list[Callable[[T], Awaitable[None] | None]], arg: T, tasks: TaskSet) -> None:
    """Call every hook with ``arg``, now; a coroutine hook finishes in a task of ``tasks``.

    Iterates over a copy, so a hook may remove itself.
    """
    for hook in list(hooks):
        try:
            result = hook(arg)
            if inspect.isawaitable(result):
                tasks.spawn(_await(result), name=f"hook {hook!r}")
        except Exception:
            log.exception("hook %r failed", hook)


async def run_callback(
    sub: Subscription, callback: MessageCallback, on_gap: GapCallback | None
) -> None:
    """Feed ``sub``'s messages to ``callback`` and its gaps to ``on_gap``, one at a time.

    Runs until the subscription ends. A callback that raises is logged and
    the next message is delivered all the same.
    """
    try:
        async for event in sub._events():
            try:
                if isinstance(event, Gap):
                    result = on_gap(event) if on_gap is not None else None
                else:
                    result = callback(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("subscription callback failed on %r", event)
    except BrokerError as exc:  # the client gave up, or the broker ended it (unsubscribed)
        log.info("subscription %s ended: %s", sub.patterns, exc)


async def _await(awaitable: Awaitable[None]) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("hook failed")
