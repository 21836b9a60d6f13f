"""The asyncio client: one WebSocket connection, kept up for as long as the client is open.

Theory of operation
-------------------

One *connection task* owns the WebSocket. It connects, reads every frame and
hands it on: a ``message`` goes into the buffer of each local subscription
that matches its channel (the broker sends a message once per connection,
however many of our subscriptions match, so the client routes it locally), a
reply resolves the future of the request with the same ``id``. When the
connection drops, every pending request learns it at once, and the task
reconnects with capped, jittered backoff.

On each new connection the task re-subscribes every pattern some local
subscription still holds. Once the broker has confirmed them all, each
subscription that existed before the drop receives a :class:`Gap` marker
and the ``on_reconnect`` hooks run with the same :class:`Gap`: messages
published while the client was away may be lost.

Requests (``subscribe``, ``publish`` ...) made while the client is
reconnecting wait for the next connection, within their time-out. Subscribe,
unsubscribe and ping are idempotent and are re-sent on the next connection if
the one they were sent on drops. Publish is not: if the connection drops
after the frame was sent and before the ``ok``, it raises
:class:`ConnectionClosed`, because the message may or may not have been
delivered.

Every task the client starts is kept in one set and cancelled by
:meth:`Client.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from types import TracebackType
from typing import Any, TypedDict, TypeVar, Unpack

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsConnectionClosed
from websockets.exceptions import InvalidURI

from .backoff import Backoff
from .errors import BadFrame, ConnectionClosed, NotSubscribed, RequestError, Timeout, error_for_code
from .frames import Gap, Message, Reply, decode, encode
from .subscription import DEFAULT_MAX_BUFFER, Subscription

__all__ = ["DEFAULT_URL", "Client", "ClientOptions", "State", "connect"]

#: Where the client connects when no URL is given.
DEFAULT_URL = "ws://localhost:8000/ws"

#: A connection that lived this long (seconds) resets the backoff to its shortest delay.
STABLE_AFTER = 5.0

# Close codes after which even the first retry waits a full backoff step:
# policy (1008: too many errors) and try again later (1013: slow consumer, overload).
_BACK_OFF_CODES = frozenset({1008, 1013})

log = logging.getLogger("broker_client")
# A library does not print by itself: the application configures logging.
log.addHandler(logging.NullHandler())

T = TypeVar("T")
MessageCallback = Callable[[Message], Awaitable[None] | None]
GapCallback = Callable[[Gap], Awaitable[None] | None]
ErrorCallback = Callable[[RequestError], Awaitable[None] | None]
DisconnectCallback = Callable[[ConnectionClosed], Awaitable[None] | None]


class State(enum.StrEnum):
    """Where the client is in its life."""

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


class ClientOptions(TypedDict, total=False):
    """Keyword options of :func:`connect` and :class:`Client` (see :class:`Client`)."""

    request_timeout: float
    reconnect: bool
    max_attempts: int | None
    retry_first_connect: bool
    backoff_initial: float
    backoff_max: float
    open_timeout: float
    ping_interval: float | None
    ping_timeout: float | None
    close_timeout: float
    max_size: int | None
    max_buffer: int
    additional_headers: Mapping[str, str] | None


class _Lost(Exception):
    """The connection a request was sent on dropped before its reply (internal)."""


class Client:
    """A connection to the broker that reconnects and re-subscribes by itself.

    Use it as ``async with connect(url) as client:`` (or ``client = await
    connect(url)`` and later ``await client.close()``).

    Options, all keyword-only:

    * ``request_timeout`` (seconds, default 10): how long a request waits for
      its reply, including any wait for a connection, before it raises
      :class:`Timeout`. Each operation also takes its own ``timeout=``.
    * ``reconnect`` (default True): reconnect when the connection drops.
    * ``max_attempts`` (default None: forever): failed connection attempts in a
      row before the client gives up and closes; subscriptions then raise
      :class:`ConnectionClosed`.
    * ``retry_first_connect`` (default False): if False, entering the client
      raises :class:`ConnectionClosed` when the first attempt fails; if True it
      keeps trying like a reconnection.
    * ``backoff_initial`` / ``backoff_max`` (seconds, default 0.2 / 10): the
      jittered exponential delay between attempts starts at the first and is
      capped at the second.
    * ``open_timeout`` (seconds, default 10): time-out of one connection attempt.
    * ``ping_interval`` / ``ping_timeout`` (seconds, default 20 / 20): WebSocket
      keepalive that notices a dead connection; None disables it.
    * ``close_timeout`` (seconds, default 5): how long closing waits for the
      broker's answer; a dead connection counts as lost after
      ``ping_interval + ping_timeout + close_timeout`` at most.
    * ``max_size`` (bytes, default 16 MiB): largest frame accepted from the broker.
    * ``max_buffer`` (default 10000): messages each subscription buffers
      before dropping the oldest (see :class:`Subscription`).
    * ``additional_headers``: extra HTTP headers for the opening handshake.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        request_timeout: float = 10.0,
        reconnect: bool = True,
        max_attempts: int | None = None,
        retry_first_connect: bool = False,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        close_timeout: float = 5.0,
        max_size: int | None = 16 * 2**20,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        additional_headers: Mapping[str, str] | None = None,
    ) -> None:
        if request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError("max_attempts must be at least 1 or None")
        self.url = url
        self.request_timeout = request_timeout
        self._reconnect = reconnect
        self._max_attempts = max_attempts
        self._retry_first = retry_first_connect
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._ws_options: dict[str, Any] = {
            "open_timeout": open_timeout,
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout,
            "close_timeout": close_timeout,
            "max_size": max_size,
            "additional_headers": additional_headers,
        }
        self._max_buffer = max_buffer

        self._state = State.NEW
        self._ws: ClientConnection | None = None  # set while a connection is usable
        self._changed = asyncio.Event()  # replaced (after being set) on every state change
        self._final_error: ConnectionClosed | None = None
        self._first: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._subs: list[Subscription] = []
        self._refs: dict[str, int] = {}  # pattern -> local subscriptions holding it
        self._sub_lock = asyncio.Lock()
        self._generation = 0  # counts connections
        self._down_since: float | None = None  # when the connection was lost, until restored
        self._on_reconnect: list[GapCallback] = []
        self._on_disconnect: list[DisconnectCallback] = []
        self._on_error: list[ErrorCallback] = []
        #: How many times the client has reconnected (successfully) so far.
        self.reconnects = 0

    def __repr__(self) -> str:
        return f"<Client {self.url} {self._state}>"

    # -- life cycle ------------------------------------------------------------

    @property
    def state(self) -> State:
        """The current :class:`State`."""
        return self._state

    @property
    def connected(self) -> bool:
        """True while a connection is up."""
        return self._ws is not None

    async def start(self) -> Client:
        """Connect; return once the first connection is up.

        Raises :class:`ConnectionClosed` if it cannot connect (at once, or after
        ``max_attempts`` when ``retry_first_connect`` is set).
        """
        if self._state is not State.NEW:
            raise RuntimeError("a client can be started only once")
        self._set_state(State.CONNECTING)
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._first = first
        self._spawn(self._run(first), name=f"broker-client {self.url}")
        try:
            await first
        except BaseException:
            await self.close()
            raise
        return self

    def __await__(self) -> Generator[Any, None, Client]:
        return self.start().__await__()

    async def __aenter__(self) -> Client:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection, end every subscription and cancel every task of the client."""
        if self._state is State.CLOSED and not self._tasks:
            return
        self._shut(ConnectionClosed("the client is closed"), clean=True)
        ws = self._ws
        self._ws = None
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), timeout=2.0)
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_connected(self) -> None:
        """Wait until a connection is up; raise :class:`ConnectionClosed` if the client closed.

        Waits as long as it takes: wrap it in ``asyncio.timeout()`` to bound it.
        """
        await self._wait_open()

    # -- hooks -----------------------------------------------------------------

    def on_reconnect(self, callback: GapCallback) -> Callable[[], None]:
        """Call ``callback(gap)`` each time the client has reconnected and re-subscribed.

        Messages published between ``gap.since`` and ``gap.until`` may be lost:
        this is the place to reload state from elsewhere. ``callback`` may be a
        coroutine function. Return a function that removes the hook.
        """
        return _add_hook(self._on_reconnect, callback)

    def on_disconnect(self, callback: DisconnectCallback) -> Callable[[], None]:
        """Call ``callback(exc)`` when the connection drops (before reconnecting)."""
        return _add_hook(self._on_disconnect, callback)

    def on_error(self, callback: ErrorCallback) -> Callable[[], None]:
        """Call ``callback(exc)`` for an ``error`` that answers no request of ours.

        That is the broker refusing a fire-and-forget publish, or a re-subscribe
        after a reconnection (the subscriptions holding that pattern then end
        with the same error). Without any hook such errors are logged.
        """
        return _add_hook(self._on_error, callback)

    # -- operations ------------------------------------------------------------

    async def subscribe(
        self,
        *patterns: str,
        callback: MessageCallback | None = None,
        on_gap: GapCallback | None = None,
        max_buffer: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - raises our typed Timeout
    ) -> Subscription:
        """Subscribe to one or more channels or patterns and return the :class:`Subscription`.

        Returns once the broker has confirmed every pattern. Without
        ``callback`` iterate the subscription; with it, ``callback(message)``
        (a function or coroutine function) is called for each message in
        order, and ``on_gap(gap)`` for each gap. Raises the broker's error
        (``BadChannel``, ``Forbidden``, ``LimitExceeded`` ...), :class:`Timeout`
        or :class:`ConnectionClosed`; on error nothing stays subscribed.
        """
        if not patterns:
            raise ValueError("subscribe needs at least one channel or pattern")
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise TypeError(f"a pattern is a str, not {type(pattern).__name__}")
        unique = tuple(dict.fromkeys(patterns))
        self._check_open()
        async with self._sub_lock:
            new = [p for p in unique if p not in self._refs]
            results = await asyncio.gather(
                *(
                    self._request("subscribe", {"channel": p}, retry=True, limit=timeout)
                    for p in new
                ),
                return_exceptions=True,
            )
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures:
                for pattern, result in zip(new, results, strict=True):
                    if not isinstance(result, BaseException):
                        await self._unsubscribe_wire(pattern, timeout)
                raise failures[0]
            for pattern in unique:
                self._refs[pattern] = self._refs.get(pattern, 0) + 1
            sub = Subscription(
                unique,
                unsubscribe=self.unsubscribe,
                max_buffer=self._max_buffer if max_buffer is None else max_buffer,
                generation=self._generation,
            )
            self._subs.append(sub)
        if callback is not None:
            sub._has_callback = True
            self._spawn(_run_callback(sub, callback, on_gap), name=f"callback {unique}")
        return sub

    async def unsubscribe(
        self,
        target: Subscription | str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - raises our typed Timeout
    ) -> None:
        """End a :class:`Subscription`, or drop one pattern from every subscription holding it.

        A subscription left with no pattern ends. Unsubscribing an ended
        subscription does nothing; a pattern no subscription holds raises
        :class:`NotSubscribed`. Never fails because the connection is down:
        the next connection simply does not re-subscribe.
        """
        async with self._sub_lock:
            if isinstance(target, Subscription):
                if target.closed or target not in self._subs:
                    return
                affected = [target]
                removed = list(target.patterns)
            else:
                affected = [s for s in self._subs if target in s.patterns]
                if not affected:
                    raise NotSubscribed(f"not subscribed to {target!r}")
                removed = [target] * len(affected)
            for sub in affected:
                if isinstance(target, str):
                    sub._remove_pattern(target)
                if isinstance(target, Subscription) or not sub.patterns:
                    self._subs.remove(sub)
                    sub._end()
            for pattern in removed:
                self._refs[pattern] -= 1
            gone = [p for p in dict.fromkeys(removed) if self._refs[p] <= 0]
            for pattern in gone:
                del self._refs[pattern]
            for pattern in gone:
                await self._unsubscribe_wire(pattern, timeout)

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - raises our typed Timeout
    ) -> None:
        """Publish ``data`` (any JSON value) to ``channel`` and wait for the broker's ``ok``.

        Raises the broker's error (``BadChannel`` for a pattern, ``TooLarge``,
        ``Forbidden``, ``RateLimited``, ``Unavailable`` ...), :class:`Timeout`,
        or :class:`ConnectionClosed` if the connection dropped before the reply
        (the message may or may not have been delivered). ``TypeError`` if
        ``data`` cannot be encoded as JSON.
        """
        payload = orjson.Fragment(orjson.dumps(data))
        await self._request(
            "publish", {"channel": channel, "data": payload}, retry=False, limit=timeout
        )

    async def publish_nowait(
        self,
        channel: str,
        data: Any,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - raises our typed Timeout
    ) -> None:
        """Publish without waiting for the broker's reply (fire and forget).

        Returns once the frame is written to the connection (waiting for one
        while reconnecting, within ``timeout``). If the broker refuses the
        message, the ``on_error`` hooks get the error. Cheaper than
        :meth:`publish`, with no delivery confirmation at all.
        """
        frame = encode("publish", None, channel=channel, data=orjson.Fragment(orjson.dumps(data)))
        self._check_open()

        async def send() -> None:
            ws = await self._wait_open()
            try:
                await ws.send(frame, text=True)
            except WsConnectionClosed as exc:
                raise ConnectionClosed(
                    "connection lost while publishing", **_close_info(exc)
                ) from None

        await self._with_timeout(send(), "publish", timeout)

    async def ping(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - raises our typed Timeout
    ) -> float:
        """Send an application-level ``ping``; return the round trip in seconds."""
        started = time.monotonic()
        await self._request("ping", {}, retry=True, limit=timeout)
        return time.monotonic() - started

    # -- requests --------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state is State.CLOSED:
            raise self._final_error or ConnectionClosed("the client is closed")
        if self._state is State.NEW:
            raise RuntimeError("start the client first: async with connect(url) as client")

    async def _with_timeout(
        self, coro: Coroutine[Any, Any, T], what: str, limit: float | None
    ) -> T:
        delay = self.request_timeout if limit is None else limit
        try:
            async with asyncio.timeout(delay) as scope:
                return await coro
        except TimeoutError:
            if scope.expired():
                raise Timeout(f"no reply to {what} within {delay:g} s") from None
            raise

    async def _request(
        self,
        op: str,
        fields: dict[str, Any],
        *,
        retry: bool,
        wait: bool = True,
        limit: float | None = None,
    ) -> Reply:
        """Send one request and return its ``ok``/``pong``; raise its error as an exception.

        ``retry``: re-send on the next connection if this one drops (idempotent
        requests only). ``wait``: wait for a connection when there is none,
        else raise :class:`ConnectionClosed` at once.
        """
        self._check_open()

        async def attempt() -> Reply:
            failed: ClientConnection | None = None
            while True:
                if not wait and self._ws is None:
                    raise ConnectionClosed("not connected")
                ws = await self._wait_open(exclude=failed)
                rid = self._next_id = self._next_id + 1
                future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
                self._pending[rid] = future
                try:
                    try:
                        await ws.send(encode(op, rid, **fields), text=True)
                    except WsConnectionClosed:
                        raise _Lost from None
                    reply = await future
                except _Lost:
                    if not retry:
                        raise ConnectionClosed(
                            f"connection lost before the broker answered {op}; "
                            "it may or may not have taken effect"
                        ) from None
                    failed = ws
                    continue
                finally:
                    self._pending.pop(rid, None)
                if reply.op == "error":
                    raise error_for_code(reply.code, reply.message, request_id=rid)
                return reply

        return await self._with_timeout(attempt(), op, limit)

    async def _wait_open(self, exclude: ClientConnection | None = None) -> ClientConnection:
        while True:
            if self._state is State.CLOSED:
                raise self._final_error or ConnectionClosed("the client is closed")
            ws = self._ws
            if ws is not None and ws is not exclude:
                return ws
            await self._changed.wait()

    async def _unsubscribe_wire(self, pattern: str, limit: float | None) -> None:
        # Best effort: if this fails the broker keeps sending messages nobody
        # wants, which the client drops, and the next connection forgets them.
        try:
            await self._request(
                "unsubscribe", {"channel": pattern}, retry=False, wait=False, limit=limit
            )
        except (NotSubscribed, ConnectionClosed):
            pass
        except (RequestError, Timeout) as exc:
            log.warning("unsubscribe from %r failed: %s", pattern, exc)

    # -- the connection task ---------------------------------------------------

    def _set_state(self, state: State) -> None:
        self._state = state
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def _shut(self, error: ConnectionClosed, *, clean: bool) -> None:
        """Enter the CLOSED state: fail what waits, end every subscription."""
        if self._state is State.CLOSED:
            return
        self._final_error = error
        self._set_state(State.CLOSED)
        if self._first is not None and not self._first.done():
            self._first.set_exception(error)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(_Lost())
        for sub in self._subs:
            sub._end(None if clean else error)
        self._subs.clear()
        self._refs.clear()

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
                    self._shut(ConnectionClosed(reason), clean=False)
                    return
                if (
                    fatal
                    or not self._reconnect
                    or (self._max_attempts is not None and failures >= self._max_attempts)
                ):
                    log.error("%s; giving up after %d attempts", reason, failures)
                    self._shut(
                        ConnectionClosed(f"{reason}; gave up after {failures} attempts"),
                        clean=False,
                    )
                    return
                delay = self._backoff.next_delay()
                log.info("%s; retrying in %.2f s", reason, delay)
                await asyncio.sleep(delay)
                continue

            failures = 0
            opened = time.monotonic()
            self._generation += 1
            log.info("connected to %s", self.url)
            error = await self._serve(ws, first)
            if self._state is State.CLOSED:
                return
            # Kept until a re-subscription completes: a connection that drops
            # again before that does not shorten the reported gap.
            if self._down_since is None:
                self._down_since = time.time()
            log.warning("connection to %s lost: %s", self.url, error.message)
            self._fire(self._on_disconnect, error)
            if time.monotonic() - opened >= STABLE_AFTER:
                self._backoff.reset()
            if error.close_code in _BACK_OFF_CODES and self._backoff.attempt == 0:
                self._backoff.attempt = 1  # the broker asked us to hold back
            if not self._reconnect:
                self._shut(error, clean=False)
                return
            self._set_state(State.RECONNECTING)
            await asyncio.sleep(self._backoff.next_delay())

    async def _serve(self, ws: ClientConnection, first: asyncio.Future[None]) -> ConnectionClosed:
        """Run one connection until it drops; return why it dropped."""
        self._ws = ws
        self._set_state(State.CONNECTED)
        resubscribe = asyncio.get_running_loop().create_task(
            self._resubscribe(ws, first), name="resubscribe"
        )
        try:
            error = await self._read(ws)
        finally:
            if self._ws is ws:
                self._ws = None
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(_Lost())
            resubscribe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await resubscribe
        return error

    async def _resubscribe(self, ws: ClientConnection, first: asyncio.Future[None]) -> None:
        patterns = list(self._refs)
        generation = self._generation
        results = await asyncio.gather(
            *(self._request("subscribe", {"channel": p}, retry=False) for p in patterns),
            return_exceptions=True,
        )
        for pattern, result in zip(patterns, results, strict=True):
            if isinstance(result, RequestError):
                # The broker now refuses this pattern (permissions or limits changed):
                # the subscriptions holding it cannot be restored.
                self._fire_error(result)
                for sub in [s for s in self._subs if pattern in s.patterns]:
                    self._subs.remove(sub)
                    sub._end(result)
                    for p in sub.patterns:
                        self._refs[p] = self._refs.get(p, 1) - 1
                        if self._refs[p] <= 0:
                            del self._refs[p]
            elif isinstance(result, Timeout):
                log.warning("re-subscribing %r timed out; reconnecting", pattern)
                await ws.close(1000, "re-subscribe timed out")
                return
            elif isinstance(result, BaseException):
                return  # the connection dropped again: the next one retries
        # Patterns unsubscribed while the re-subscribe was in flight.
        for pattern in set(patterns) - set(self._refs):
            await self._unsubscribe_wire(pattern, None)
        if not first.done():
            first.set_result(None)
        down_since, self._down_since = self._down_since, None
        if down_since is not None:
            self.reconnects += 1
            gap = Gap("reconnect", down_since, time.time())
            for sub in self._subs:
                if sub._generation < generation:
                    sub._gap(gap)
            log.info(
                "re-subscribed %d patterns after %.2f s away", len(patterns), gap.until - gap.since
            )
            self._fire(self._on_reconnect, gap)

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
            if isinstance(event, Message):
                for sub in self._subs:
                    if sub.matches(event.channel):
                        sub._push(event)
            elif isinstance(event, Reply):
                if isinstance(event.id, int):
                    future = self._pending.get(event.id)
                    if future is not None and not future.done():
                        future.set_result(event)
                elif event.id is None and event.op == "error":
                    self._fire_error(error_for_code(event.code, event.message))

    def _fire(self, hooks: list[Callable[[T], Awaitable[None] | None]], arg: T) -> None:
        for hook in list(hooks):
            try:
                result = hook(arg)
                if inspect.isawaitable(result):
                    self._spawn(_await(result), name=f"hook {hook!r}")
            except Exception:
                log.exception("hook %r failed", hook)

    def _fire_error(self, error: RequestError) -> None:
        if self._on_error:
            self._fire(self._on_error, error)
        else:
            log.warning("broker error: %s", error)


def connect(url: str = DEFAULT_URL, **options: Unpack[ClientOptions]) -> Client:
    """Return a :class:`Client` for ``url``; use ``async with`` or ``await`` to connect.

    ::

        async with connect("ws://localhost:8000/ws") as client:
            async for message in await client.subscribe("sensors.>"):
                print(message.channel, message.data)
    """
    return Client(url, **options)


def _add_hook(hooks: list[T], hook: T) -> Callable[[], None]:
    hooks.append(hook)

    def remove() -> None:
        with contextlib.suppress(ValueError):
            hooks.remove(hook)

    return remove


async def _await(awaitable: Awaitable[None]) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("hook failed")


async def _run_callback(
    sub: Subscription, callback: MessageCallback, on_gap: GapCallback | None
) -> None:
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
    except ConnectionClosed as exc:
        log.info("subscription %s ended: %s", sub.patterns, exc.message)


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
