"""The publishing half of the Redis backplane: an outbox, batches, one connection.

``RedisBackplane`` (``broker/backplane/redis.py``) owns a ``Publisher`` and runs
its ``run()`` as the *writer* task. ``enqueue()`` does no I/O: it appends an
already packed ``PUBLISH`` to the outbox and returns a future. The writer takes
everything waiting (up to ``MAX_BATCH`` commands or about ``MAX_BATCH_BYTES``),
writes it in one go and reads the replies in order: a pipeline without MULTI,
one round trip per batch, in call order. While a batch is out, new publishes
pile up and go together next time.

redis-py's ``Pipeline`` does the same job about seven times slower here (it
packs in Python and arms a timer per reply; ``bench/redis_publish.py`` measures
it), so batches are packed by ``redis_wire.pack_publish`` and written on a
redis-py connection of our own.
That connection is replaced when the backplane reconnects (``renew()``), when
it looks dirty before use, or after a failure.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from redis.exceptions import (
    AskError,
    ClusterDownError,
    NoScriptError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from broker.backplane import PUBLISHED
from broker.backplane.redis_scripts import load_commands
from broker.exceptions import BackplaneError

logger = logging.getLogger(__name__)

#: Most publishes written in one batch, and about the most bytes.
MAX_BATCH = 1024
MAX_BATCH_BYTES = 1 << 20

#: What a failing link or a failing Redis raises; anything else is our bug.
LINK_ERRORS = (RedisError, OSError, TimeoutError, BackplaneError)

#: Replies of a Redis Cluster saying the command went to the wrong node (not run):
#: MOVED (``MovedError``, an ``AskError``), ASK, TRYAGAIN, CLUSTERDOWN. redis-py
#: parses them into these classes and drops the word from the message.
_REDIRECTS = (AskError, TryAgainError, ClusterDownError)


def is_redirect(error: ResponseError) -> bool:
    """Whether a Redis Cluster refused a command because its slot is elsewhere (or moving)."""
    return isinstance(error, _REDIRECTS)


#: A queued command: the packed bytes, the future to resolve, and how to turn
#: Redis's reply into its result (None: a PUBLISH, whose result is ``PUBLISHED``).
_Outgoing = tuple[bytes, "asyncio.Future[Any]", "Callable[[Any], Any] | None"]


class RedisConnection(Protocol):
    """The part of redis-py's asyncio ``Connection`` the backplane uses."""

    socket_timeout: float | None

    @property
    def is_connected(self) -> bool: ...

    async def connect(self) -> None: ...

    async def send_command(self, *args: Any, **kwargs: Any) -> None: ...

    async def send_packed_command(self, command: bytes, check_health: bool = True) -> None: ...

    async def read_response(self, *args: Any, **kwargs: Any) -> Any: ...

    async def can_read(self) -> bool: ...

    async def disconnect(self, nowait: bool = False) -> None: ...


class Publisher:
    """Sends queued PUBLISH commands in batches on one connection it owns.

    ``make_connection`` builds an unconnected redis-py connection; every wait on
    Redis for one batch is bounded by ``timeout``; at most ``max_pending``
    publishes wait; ``on_failure`` is called when a batch failed on the link, so
    the backplane can check the link at once. Publishes are taken only while
    ``accepting`` is true (the backplane sets it to its ``ready``).
    """

    def __init__(
        self,
        make_connection: Callable[[], RedisConnection],
        *,
        timeout: float,
        max_pending: int,
        on_failure: Callable[[], None],
    ) -> None:
        self.accepting = False
        self._make_connection = make_connection
        self._timeout = timeout
        self._max_pending = max_pending
        self._on_failure = on_failure
        self._outbox: deque[_Outgoing] = deque()
        self._wakeup = asyncio.Event()  # the outbox has something
        self._conn: RedisConnection | None = None
        self._stale = False  # the link was replaced: do not trust the connection
        self._fresh = False  # the current batch's connection has just loaded the scripts

    def enqueue(
        self, packed: bytes, parse: Callable[[Any], Any] | None = None
    ) -> asyncio.Future[Any]:
        """Queue one packed command; the future resolves once Redis answered it.

        Without ``parse`` the command is a ``PUBLISH`` and the result
        ``PUBLISHED``; with it, the result is ``parse(reply)`` (a script's).
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self.accepting:
            future.set_exception(BackplaneError("redis backplane: not connected to Redis"))
        elif len(self._outbox) >= self._max_pending:
            future.set_exception(BackplaneError("redis backplane: too many publishes queued"))
        else:
            self._outbox.append((packed, future, parse))
            self._wakeup.set()
        return future

    def renew(self) -> None:
        """The backplane reconnected: open a new connection for the next batch."""
        self._stale = True

    def fail_queued(self, reason: str) -> None:
        """Fail every publish still waiting (the link is down, or closing)."""
        batch = list(self._outbox)
        self._outbox.clear()
        _fail(batch, reason)

    async def run(self) -> None:
        """The writer task: send the outbox in batches, one at a time, in order."""
        outbox = self._outbox
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while outbox:
                batch = [outbox.popleft()]
                size = len(batch[0][0])
                while outbox and len(batch) < MAX_BATCH and size < MAX_BATCH_BYTES:
                    batch.append(outbox.popleft())
                    size += len(batch[-1][0])
                await self._flush(batch)

    async def close(self) -> None:
        """Fail what is queued and close the connection (after ``run()`` has stopped)."""
        self.accepting = False
        self.fail_queued("redis backplane: closed")
        await self._drop()

    async def _flush(self, batch: list[_Outgoing]) -> None:
        if not self.accepting:
            _fail(batch, "redis backplane: not connected to Redis")
            return
        replies: list[Any] = []
        sent = False
        try:
            async with asyncio.timeout(self._timeout):
                conn = await self._connection()
                await conn.send_packed_command(b"".join(c for c, _, _ in batch), check_health=False)
                sent = True
                for _ in batch:
                    try:
                        reply = await conn.read_response(
                            timeout=math.inf, disconnect_on_error=False
                        )
                    except ResponseError as exc:  # this command was refused (an ACL, say)
                        replies.append(exc)
                    else:
                        replies.append(reply)
        except asyncio.CancelledError:
            _fail(batch, "redis backplane: closed")
            await self._drop()
            raise
        except LINK_ERRORS as exc:
            # What is queued behind this batch would wait on the same dead link.
            if sent:
                # The commands left: Redis may still run them when the link heals.
                reason = (
                    f"redis backplane: no confirmation ({describe_error(exc)}); "
                    "the message may still be delivered: retry with the same key"
                )
            else:
                reason = f"redis backplane: publish failed: {describe_error(exc)}"
            _fail(batch, reason, maybe_sent=sent)
            self.fail_queued(f"redis backplane: publish failed: {describe_error(exc)}")
            await self._drop()
            self._on_failure()
            logger.debug("%s", reason)
            return
        again: list[_Outgoing] = []
        for command, reply in zip(batch, replies, strict=True):
            _, future, parse = command
            if future.done():
                continue
            if isinstance(reply, ResponseError):
                if isinstance(reply, NoScriptError) and not self._fresh:
                    # The script cache was flushed (SCRIPT FLUSH): nothing ran. Load
                    # the scripts on a new connection and send it again, first (a
                    # plain PUBLISH of this batch, which did run, stays before it).
                    self._stale = True
                    again.append(command)
                    continue
                if is_redirect(reply):
                    self._on_failure()  # a cluster's slot moved: look at the topology again
                future.set_exception(BackplaneError(f"redis backplane: refused: {reply}"))
            elif parse is None:
                future.set_result(PUBLISHED)
            else:
                try:
                    future.set_result(parse(reply))
                except ValueError as exc:
                    future.set_exception(BackplaneError(f"redis backplane: bad reply: {exc}"))
        if again:
            logger.info("redis backplane: Redis lost its scripts; loading them again")
            self._outbox.extendleft(reversed(again))
            self._wakeup.set()

    async def _connection(self) -> RedisConnection:
        """The connection for the next batch: a fresh one if the current one is suspect."""
        conn = self._conn
        if conn is not None and (
            self._stale
            or not conn.is_connected
            or await conn.can_read()  # unread bytes or EOF: not safe to use
        ):
            await self._drop()
            conn = None
        self._fresh = conn is None
        if conn is None:
            self._stale = False
            conn = self._make_connection()
            await conn.connect()
            # Every batch is bounded by our own timeout (_flush); with a socket
            # timeout set, redis-py would also wrap each send in wait_for, which
            # costs a task and a loop iteration per batch.
            conn.socket_timeout = None
            for command in load_commands():
                await conn.send_command(*command, check_health=False)
                await conn.read_response(timeout=math.inf, disconnect_on_error=False)
            self._conn = conn
        return conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await disconnect_quietly(conn)


async def disconnect_quietly(conn: RedisConnection) -> None:
    """Close ``conn``, logging (at debug) rather than raising a network error."""
    # Wait for the close (TLS sends close_notify), so no socket outlives close();
    # redis-py bounds the wait with socket_connect_timeout.
    try:
        await conn.disconnect()
    except LINK_ERRORS as exc:
        logger.debug("redis backplane: error while disconnecting: %s", exc)


def describe_error(exc: BaseException) -> str:
    """``Type: message`` for one log line (``Type`` alone when there is no message)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fail(batch: list[_Outgoing], reason: str, *, maybe_sent: bool = False) -> None:
    for _, future, _ in batch:
        if not future.done():
            future.set_exception(BackplaneError(reason, maybe_sent=maybe_sent))
