"""Requests and their replies: ids, the pending table, time-outs, retries on a new connection.

One :class:`Requests` per client. A request gets the next integer ``id``,
waits for an open connection (through the :class:`Gate`, the connection
task), is written, and waits in the pending table for the reply with its
``id``, all within one time-out. The connection task hands every reply to
:meth:`Requests.answer` and, when the connection drops, calls
:meth:`Requests.connection_lost`: an idempotent request (``retry=True``) is
then written again on the next connection, any other raises
:class:`ConnectionClosed`. Publishes go through the :class:`Outbox` instead
(see ``_outbox.py``), with ids from the same counter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed as WsConnectionClosed

from ._outbox import Lost, Outbox, Outgoing
from ._session import Call
from .errors import ConnectionClosed, NotSubscribed, RequestError, Timeout, error_for_code
from .frames import Reply, encode

__all__ = ["Gate", "OnReply", "Requests"]

log = logging.getLogger("broker_client")

T = TypeVar("T")
#: Applied to a request's ``ok`` as it is read, before any frame that follows it.
OnReply = Callable[[Reply], None]


class Gate(Protocol):
    """What requests need of the connection task."""

    @property
    def connected(self) -> bool: ...

    def check_open(self) -> None: ...

    async def wait_open(self, exclude: ClientConnection | None = None) -> ClientConnection: ...


class Requests:
    """The client's requests in flight; see the module docstring."""

    def __init__(self, gate: Gate, outbox: Outbox, request_timeout: float) -> None:
        #: Default time-out of a request, in seconds, including any wait for a connection.
        self.request_timeout = request_timeout
        self.outbox = outbox
        self._gate = gate
        self._next_id = 0
        self._pending: dict[int, tuple[asyncio.Future[Reply], OnReply | None]] = {}

    def new_id(self) -> int:
        """The next request ``id``."""
        self._next_id += 1
        return self._next_id

    async def request(
        self,
        op: str,
        fields: dict[str, Any],
        *,
        retry: bool,
        wait: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109 - raises our typed Timeout
        on_reply: OnReply | None = None,
    ) -> Reply:
        """Send one request and return its ``ok``/``pong``; raise its error as an exception.

        ``retry``: re-send on the next connection if this one drops (idempotent
        requests only). ``wait``: wait for a connection when there is none,
        else raise :class:`ConnectionClosed` at once. ``timeout`` (default
        :attr:`request_timeout`) bounds everything, waits included, and
        raises :class:`Timeout`. ``on_reply`` is applied to the ``ok`` as
        it is read, before any frame that follows it.
        """
        gate = self._gate
        gate.check_open()

        async def attempt() -> Reply:
            failed: ClientConnection | None = None
            while True:
                if not wait and not gate.connected:
                    raise ConnectionClosed("not connected")
                ws = await gate.wait_open(exclude=failed)
                try:
                    return await self.call(ws, op, fields, on_reply=on_reply)
                except Lost:
                    if not retry:
                        raise ConnectionClosed(
                            f"connection lost before the broker answered {op}; "
                            "it may or may not have taken effect"
                        ) from None
                    failed = ws

        return await self.with_timeout(attempt(), op, timeout)

    async def publish(
        self,
        channel: str,
        data: bytes,
        key: str | None,
        timeout: float | None,  # noqa: ASYNC109 - raises our typed Timeout
    ) -> Reply:
        """Queue a publish that wants its reply, and return the ``ok`` (see ``_outbox.py``)."""
        self._gate.check_open()
        waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        item = Outgoing(channel, data, key, waiter)
        self.outbox.put(item)

        async def answer() -> Reply:
            return await waiter

        try:
            reply = await self.with_timeout(answer(), "publish", timeout)
        except Lost:
            raise ConnectionClosed(
                "connection lost before the broker answered publish; "
                "it may or may not have taken effect (publish with a key to retry safely)"
            ) from None
        finally:
            if not waiter.done():
                waiter.cancel()
                self.outbox.withdraw(item)
        if reply.op == "error":
            raise error_for_code(reply.code, reply.message, request_id=reply.id)
        return reply

    async def drain(self, timeout: float | None) -> None:  # noqa: ASYNC109 - typed Timeout
        """Wait until the outbox is written and answered, then for a ``ping`` round trip."""
        self._gate.check_open()

        async def run() -> None:
            await self.outbox.wait_empty()
            # Frames are read in order: the pong comes after the broker read them all.
            await self.request("ping", {}, retry=True)

        await self.with_timeout(run(), "drain", timeout)

    async def unsubscribe(
        self,
        pattern: str,
        timeout: float | None,  # noqa: ASYNC109 - raises our typed Timeout
    ) -> None:
        """Ask the broker to stop sending ``pattern``, at best; never raises a broker error.

        If this fails the broker keeps sending messages nobody wants, which
        the client drops, and the next connection forgets them.
        """
        try:
            await self.request(
                "unsubscribe", {"channel": pattern}, retry=False, wait=False, timeout=timeout
            )
        except (NotSubscribed, ConnectionClosed):
            pass
        except (RequestError, Timeout) as exc:
            log.warning("unsubscribe from %r failed: %s", pattern, exc)

    async def with_timeout(self, coro: Coroutine[Any, Any, T], what: str, limit: float | None) -> T:
        """Await ``coro`` within ``limit`` (default :attr:`request_timeout`), or raise Timeout."""
        delay = self.request_timeout if limit is None else limit
        try:
            async with asyncio.timeout(delay) as scope:
                return await coro
        except TimeoutError:
            if scope.expired():
                raise Timeout(f"no reply to {what} within {delay:g} s") from None
            raise

    async def call(
        self, ws: ClientConnection, op: str, fields: dict[str, Any], *, on_reply: OnReply | None
    ) -> Reply:
        """Send one request on ``ws`` and wait for its reply; raise ``Lost`` if ``ws`` drops."""
        rid = self.new_id()
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (future, on_reply)
        try:
            try:
                await ws.send(encode(op, rid, **fields), text=True)
            except WsConnectionClosed:
                raise Lost from None
            reply = await future
        finally:
            self._pending.pop(rid, None)
        if reply.op == "error":
            raise error_for_code(reply.code, reply.message, request_id=rid)
        return reply

    def caller(self, ws: ClientConnection) -> Call:
        """A :class:`Call` on ``ws`` alone, with the request time-out."""

        async def call(
            op: str, fields: dict[str, Any], *, on_reply: OnReply | None = None
        ) -> Reply:
            return await self.with_timeout(self.call(ws, op, fields, on_reply=on_reply), op, None)

        return call

    def answer(self, request_id: int, reply: Reply) -> RequestError | None:
        """Hand ``reply`` to the request with its id; return an error that nobody awaits."""
        entry = self._pending.get(request_id)
        if entry is not None:
            future, on_reply = entry
            if not future.done():
                if on_reply is not None and reply.op == "ok":
                    try:
                        on_reply(reply)
                    except Exception:
                        log.exception("applying the reply to request %d failed", request_id)
                future.set_result(reply)
            return None
        item = self.outbox.answer(request_id, reply)
        if item is not None and item.waiter is None and reply.op == "error":
            # A fire-and-forget publish with a key: nobody awaits its answer.
            return error_for_code(reply.code, reply.message, request_id=request_id)
        return None

    def connection_lost(self) -> None:
        """The connection dropped: every request waiting for a reply learns it now."""
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(Lost())
        given_up = self.outbox.connection_lost()
        if given_up:
            log.warning(
                "%d keyed fire-and-forget publishes were given up after %d writes",
                len(given_up),
                given_up[0].writes,
            )
