"""The connection task: one WebSocket at a time, kept up for as long as the client is open.

Theory of operation
-------------------

One *connection task* (:meth:`Link._run`) owns the WebSocket. It connects,
reads every frame and routes it: a ``message`` goes into the buffer of each
local subscription that receives its channel (the broker sends a message once
per connection, however many of our subscriptions match, so the client routes
it locally, through the :class:`SubscriptionTable`); a reply resolves the
request with the same ``id`` (a request in the pending table, or a publish in
the :class:`Outbox`); an ``error`` without an ``id`` goes to the ``on_error``
hooks; a ``gap`` becomes a :class:`Gap` for the subscriptions it names; an
``unsubscribed`` ends the subscriptions holding that pattern.

On each new connection (see ``_session.py``) the task first authenticates
when a token is configured; only then is the connection *open* for requests
and the outbox writer. It re-subscribes what the table holds, recovering
exact channels with ``since``; once the broker has confirmed them all, each
subscription that existed before the drop and could not be fully recovered
receives a :class:`Gap`, and the ``on_reconnect`` hooks run. Meanwhile a
timer refreshes the token on the open connection.

When the connection drops, every pending request learns it at once, and the
task reconnects with capped, jittered backoff: a first retry that waits a
full step when the broker closed with 1008 or 1013, and only a short random
delay (``restart_delay``) after 1012, the broker's "restarting, come back".
A refused token is a failed attempt: reported to ``on_error`` and retried
with backoff (the provider is asked again), except on the very first
connection, where entering the client raises :class:`Unauthorized`. An
``auth`` left unanswered is a failed attempt too.

A request waits for an open connection (:meth:`Link.wait_open`) within its
time-out, then waits in the pending table for the reply with its ``id``. If
the connection drops first, an idempotent request (``retry=True``: subscribe,
ping) is sent again on the next connection; publishes follow the outbox's
rules (a keyed one is re-sent, another fails with :class:`ConnectionClosed`).
An unsubscribe is sent only on the connection of the moment, at best.

The link knows the rest of the client through four objects only: the
:class:`SubscriptionTable` it routes to and re-subscribes from, the
:class:`Outbox` it writes, the :class:`Hooks` it reports to, and the
:class:`TaskSet` its task runs in.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsConnectionClosed
from websockets.exceptions import InvalidURI

from broker_protocol import CloseCode, ErrorCode

from ._auth import TokenSource
from ._hooks import Hooks, TaskSet
from ._outbox import Lost, Outbox
from ._requests import Requests
from ._session import Call, authenticate, keep_fresh, restore
from ._table import SubscriptionTable
from .backoff import Backoff
from .errors import (
    BadFrame,
    BrokerError,
    CannotConnect,
    ConnectionClosed,
    RequestError,
    Timeout,
    error_for_code,
)
from .frames import Gap, GapNotice, Message, Reply, ServerEvent, Unsubscribed, decode

__all__ = ["STABLE_AFTER", "Link", "State"]

#: A connection that lived this long (seconds) resets the backoff to its shortest delay.
STABLE_AFTER = 5.0

# Close codes after which even the first retry waits a full backoff step:
# policy (too many errors, token expired) and try again later (slow consumer, overload).
_BACK_OFF_CODES = frozenset({CloseCode.POLICY, CloseCode.TRY_AGAIN})

log = logging.getLogger("broker_client")

T = TypeVar("T")
OnReply = Callable[[Reply], None]


class State(enum.StrEnum):
    """Where the client is in its life."""

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


class Link:
    """The connection task of one client.

    The client calls :meth:`start` once, makes its requests through
    :attr:`requests` (and queues fire-and-forget publishes in
    :attr:`outbox`), and calls :meth:`close` once.
    """

    def __init__(
        self,
        url: str,
        *,
        table: SubscriptionTable,
        hooks: Hooks,
        tasks: TaskSet,
        outbox: Outbox,
        tokens: TokenSource | None,
        request_timeout: float,
        reconnect: bool,
        max_attempts: int | None,
        retry_first_connect: bool,
        backoff: Backoff,
        restart_delay: float,
        ws_options: dict[str, Any],
    ) -> None:
        #: Where to connect; read again on every attempt.
        self.url = url
        #: How many times the link has reconnected (successfully) so far.
        self.reconnects = 0
        self.outbox = outbox
        #: The requests in flight and their replies.
        self.requests = Requests(self, outbox, request_timeout)
        self._table = table
        self._hooks = hooks
        self._tasks = tasks
        self._tokens = tokens
        self._reconnect = reconnect
        self._max_attempts = max_attempts
        self._retry_first = retry_first_connect
        self._backoff = backoff
        self._restart_delay = restart_delay
        self._ws_options = ws_options

        self._state = State.NEW
        self._ws: ClientConnection | None = None  # set while a connection is open for requests
        self._changed = asyncio.Event()  # replaced (after being set) on every state change
        self._final_error: ConnectionClosed | None = None
        self._first: asyncio.Future[None] | None = None
        self._generation = 0  # counts connections
        self._down_since: float | None = None  # when the connection was lost, until restored
        self._failed: BrokerError | None = None  # this connection's auth failed
        self._refresh_now: asyncio.Event | None = None  # the current connection's refresh timer

    # -- for the client --------------------------------------------------------

    @property
    def state(self) -> State:
        """The current :class:`State`."""
        return self._state

    @property
    def connected(self) -> bool:
        """True while a connection is open (and authenticated, with a token)."""
        return self._ws is not None

    @property
    def generation(self) -> int:
        """How many connections there have been: a subscription confirmed now is of this one."""
        return self._generation

    def start(self) -> asyncio.Future[None]:
        """Start the connection task; return a future done once the first connection is up.

        The future fails with :class:`CannotConnect` (or :class:`Unauthorized`
        for a refused token) if the link closes before that. Raises
        ``RuntimeError`` if the link was started before.
        """
        if self._state is not State.NEW:
            raise RuntimeError("a client can be started only once")
        self._set_state(State.CONNECTING)
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._first = first
        self._tasks.spawn(self._run(first), name=f"broker-client {self.url}")
        return first

    async def close(self) -> None:
        """Enter the CLOSED state (subscriptions end cleanly) and close the WebSocket.

        The connection task itself is cancelled with the rest of the task set.
        """
        self._shut(ConnectionClosed("the client is closed"), clean=True)
        ws = self._ws
        self._ws = None
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(CloseCode.NORMAL), timeout=2.0)

    def check_open(self) -> None:
        """Raise if no request can be made now, so that the caller fails before waiting.

        Raises the final :class:`ConnectionClosed` once the link closed, and
        ``RuntimeError`` before :meth:`start`.
        """
        if self._state is State.CLOSED:
            raise self._final_error or ConnectionClosed("the client is closed")
        if self._state is State.NEW:
            raise RuntimeError("start the client first: async with connect(url) as client")

    async def wait_open(self, exclude: ClientConnection | None = None) -> ClientConnection:
        """Return the open connection once there is one (other than ``exclude``).

        Raises :class:`ConnectionClosed` if the link closes first; waits
        without a time-out otherwise.
        """
        while True:
            if self._state is State.CLOSED:
                raise self._final_error or ConnectionClosed("the client is closed")
            ws = self._ws
            if ws is not None and ws is not exclude:
                return ws
            await self._changed.wait()

    def drop_patterns(self, patterns: list[str]) -> None:
        """Unsubscribe ``patterns`` in the background (nobody holds them any more)."""
        if patterns:
            self._tasks.spawn(self._drop(patterns), name=f"unsubscribe {patterns}")

    async def _drop(self, patterns: list[str]) -> None:
        for pattern in patterns:
            await self.requests.unsubscribe(pattern, None)

    # -- the connection task ---------------------------------------------------

    def _set_state(self, state: State) -> None:
        self._state = state
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _shut(
        self, error: ConnectionClosed, *, clean: bool, first_error: BrokerError | None = None
    ) -> None:
        """Enter the CLOSED state: fail what waits, end every subscription.

        ``first_error`` is what entering the client raises if the first
        connection was never up (default ``error``).
        """
        if self._state is State.CLOSED:
            return
        self._final_error = error
        self._set_state(State.CLOSED)
        if self._first is not None and not self._first.done():
            self._first.set_exception(first_error or error)
        self.requests.connection_lost()
        dropped = self.outbox.close(error)
        if dropped:
            log.warning(
                "%d fire-and-forget publishes were never sent "
                "(await client.drain() or close(drain=True) to send them first)",
                dropped,
            )
        self._table.end_all(None if clean else error)

    async def _run(self, first: asyncio.Future[None]) -> None:
        failures = 0  # failed attempts in a row
        while True:
            try:
                ws = await ws_connect(self.url, **self._ws_options)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # OSError, handshake refused, time-out, bad URI...
                failures += 1
                reason = f"cannot connect to {self.url}: {exc or type(exc).__name__}"
                fatal = isinstance(exc, InvalidURI | ValueError)
                if not first.done() and (fatal or not self._retry_first):
                    never = CannotConnect(reason, cause=exc)
                    self._shut(ConnectionClosed(reason), clean=False, first_error=never)
                    return
                if self._give_up(fatal, failures):
                    log.error("%s; giving up after %d attempts", reason, failures)
                    gave_up = f"{reason}; gave up after {failures} attempts"
                    self._shut(
                        ConnectionClosed(gave_up),
                        clean=False,
                        first_error=CannotConnect(gave_up, cause=exc),
                    )
                    return
                delay = self._backoff.next_delay()
                log.info("%s; retrying in %.2f s", reason, delay)
                await asyncio.sleep(delay)
                continue

            opened = time.monotonic()
            self._generation += 1
            log.info("connected to %s", self.url)
            error = await self._serve(ws, first)
            if self._state is State.CLOSED:
                return
            failed, self._failed = self._failed, None
            if failed is not None:
                # The token was refused, or auth not answered: a failed attempt.
                failures += 1
                reason = f"authentication failed: {failed}"
                if not first.done() and not self._retry_first:
                    never = CannotConnect(f"{reason} (at {self.url})", cause=failed)
                    self._shut(ConnectionClosed(reason), clean=False, first_error=never)
                    return
                if self._give_up(False, failures):
                    log.error("%s; giving up after %d attempts", reason, failures)
                    self._shut(ConnectionClosed(reason), clean=False)
                    return
                self._backoff.attempt = max(self._backoff.attempt, 1)
                self._set_state(State.RECONNECTING)
                delay = self._backoff.next_delay()
                log.warning("%s; retrying in %.2f s", reason, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            # Kept until a re-subscription completes: a connection that drops
            # again before that does not shorten the reported gap.
            if self._down_since is None:
                self._down_since = time.time()
            log.warning("connection to %s lost: %s", self.url, error.message)
            self._hooks.disconnected(error)
            if time.monotonic() - opened >= STABLE_AFTER:
                self._backoff.reset()
            if not self._reconnect:
                self._shut(error, clean=False)
                return
            self._set_state(State.RECONNECTING)
            if error.close_code == CloseCode.RESTART:
                # The broker drains for a restart and another process (or this
                # one, back) is ready soon: come back after a short random delay.
                # Should that fail, the backoff goes on from its second step.
                self._backoff.attempt = max(self._backoff.attempt, 1)
                delay = random.uniform(0.0, self._restart_delay)
            else:
                if error.close_code in _BACK_OFF_CODES and self._backoff.attempt == 0:
                    self._backoff.attempt = 1  # the broker asked us to hold back
                delay = self._backoff.next_delay()
            await asyncio.sleep(delay)

    def _give_up(self, fatal: bool, failures: int) -> bool:
        return (
            fatal
            or not self._reconnect
            or (self._max_attempts is not None and failures >= self._max_attempts)
        )

    async def _serve(self, ws: ClientConnection, first: asyncio.Future[None]) -> ConnectionClosed:
        """Run one connection until it drops; return why it dropped."""
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(ws), name="broker-client reader")
        session = loop.create_task(self._session(ws, first), name="broker-client session")
        try:
            return await reader
        finally:
            if self._ws is ws:
                self._ws = None
            self._refresh_now = None
            self.requests.connection_lost()
            for task in (session, reader):
                task.cancel()
            for result in await asyncio.gather(session, reader, return_exceptions=True):
                if isinstance(result, ConnectionClosed):
                    # The connection dropped under a request (a re-subscribe, say):
                    # the reconnection that follows takes it from there.
                    log.debug("connection task ended: %s", result)
                elif isinstance(result, Exception):
                    log.error("connection task failed", exc_info=result)

    async def _session(self, ws: ClientConnection, first: asyncio.Future[None]) -> None:
        """Authenticate, open the connection for requests, restore, keep the token fresh."""
        call = self.requests.caller(ws)
        expires_in: float | None = None
        if self._tokens is not None:
            try:
                expires_in = await authenticate(call, self._tokens)
            except RequestError as exc:
                if not first.done():
                    # A bad token at the first connection: no point retrying forever.
                    self._shut(
                        ConnectionClosed(f"token refused: {exc.message}"),
                        clean=False,
                        first_error=exc,
                    )
                else:
                    self._failed = exc
                    self._hooks.refused(exc)
                await ws.close(CloseCode.NORMAL, "token refused")
                return
            except Timeout as exc:
                self._failed = exc
                await ws.close(CloseCode.NORMAL, "auth timed out")
                return
            except Lost:
                return  # the connection dropped: the reader says why
        self._ws = ws
        self._set_state(State.CONNECTED)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._write(ws), name="broker-client writer")
            if self._tokens is not None and self._tokens.refreshable:
                wake = self._refresh_now = asyncio.Event()
                group.create_task(
                    keep_fresh(call, self._tokens, expires_in, wake, self._hooks),
                    name="broker-client token refresh",
                )
            await self._restore(ws, call, first)

    async def _restore(self, ws: ClientConnection, call: Call, first: asyncio.Future[None]) -> None:
        generation = self._generation
        done = await restore(call, self._table, self._down_since)
        if done is None:
            return  # the connection dropped again: the next one retries
        for pattern, error in done.refused:
            # The broker now refuses this pattern (permissions or limits changed):
            # the subscriptions holding it cannot be restored.
            self._hooks.refused(error)
            self.drop_patterns(self._table.refuse(pattern, error))
        if done.timed_out:
            await ws.close(CloseCode.NORMAL, "re-subscribe timed out")
            return
        # Patterns unsubscribed while the re-subscribe was in flight.
        for pattern in [p for p in done.outcomes if not self._table.holds(p)]:
            await self.requests.unsubscribe(pattern, None)
        if not first.done():
            first.set_result(None)
        down_since, self._down_since = self._down_since, None
        if down_since is not None:
            self.reconnects += 1
            gap = Gap("reconnect", down_since, time.time())
            self._table.mark_gap(gap, generation, done.outcomes)
            log.info(
                "re-subscribed %d patterns after %.2f s away",
                len(done.outcomes),
                gap.until - gap.since,
            )
            self._hooks.reconnected(gap)

    async def _write(self, ws: ClientConnection) -> None:
        """Write the outbox's publishes, in order, for as long as ``ws`` is open."""
        outbox = self.outbox
        while True:
            await outbox.wait_items()
            while (taken := outbox.take(self.requests.new_id)) is not None:
                item, request_id = taken
                try:
                    await ws.send(item.frame(request_id), text=True)
                except WsConnectionClosed:
                    outbox.unwrite(item, request_id)
                    return

    async def _read(self, ws: ClientConnection) -> ConnectionClosed:
        while True:
            try:
                raw = await ws.recv(decode=False)
            except WsConnectionClosed as exc:
                return ConnectionClosed(_describe_close(exc), **_close_info(exc))
            try:
                event = decode(raw)
            except BadFrame as exc:
                log.warning("ignoring a frame from the broker: %s", exc.message)
                continue
            self._route(event)

    def _route(self, event: ServerEvent) -> None:
        """Hand one frame from the broker to whoever waits for it; ignore unknown ops."""
        if isinstance(event, Message):
            self._table.route(event)
        elif isinstance(event, Reply):
            if isinstance(event.id, int):
                unawaited = self.requests.answer(event.id, event)
                if unawaited is not None:
                    self._hooks.refused(unawaited)
            elif event.id is None and event.op == "error":
                self._unanswered(error_for_code(event.code, event.message))
        elif isinstance(event, GapNotice):
            self._table.gap(event.channel, event.reason)
        elif isinstance(event, Unsubscribed):
            error = error_for_code(
                event.code,
                f"the broker ended the subscription to {event.channel!r} ({event.code}): "
                "the refreshed token no longer allows it",
            )
            self.drop_patterns(self._table.refuse(event.channel, error))
            self._hooks.refused(error)

    def _unanswered(self, error: RequestError) -> None:
        """An ``error`` without ``id``: a refused fire-and-forget request, or the token ran out."""
        if error.code == ErrorCode.TOKEN_EXPIRED and self._refresh_now is not None:
            log.info("the broker says the token expired; refreshing it now")
            self._refresh_now.set()
            return
        self._hooks.refused(error)


def _close_info(exc: WsConnectionClosed) -> dict[str, Any]:
    frame = exc.rcvd or exc.sent
    return {
        "close_code": frame.code if frame else None,
        "close_reason": frame.reason if frame else "",
    }


def _describe_close(exc: WsConnectionClosed) -> str:
    frame = exc.rcvd
    if frame is None:
        return "connection closed abruptly (no close frame)"
    return f"closed by the broker with code {frame.code}" + (
        f": {frame.reason}" if frame.reason else ""
    )
