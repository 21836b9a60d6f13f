"""The asyncio client: one WebSocket connection, kept up for as long as the client is open.

For contributors, who owns what:

* ``client.py`` (this module): the public API. :class:`Client` checks its
  arguments, carries out subscribe, unsubscribe and the publishes through
  the link, and registers hooks; :func:`connect`, :class:`ClientOptions`,
  :class:`State` (defined with the state machine in ``_link.py``).
* ``_link.py``: the connection task, :class:`~broker_client._link.Link`:
  connecting and reconnecting with backoff, reading and routing frames. Its
  theory of operation is there.
* ``_requests.py``: request ids, the table of pending requests, their
  time-outs and their retries on a new connection.
* ``_session.py``: what each new connection does: authenticate, re-subscribe
  and recover, refresh the token.
* ``_outbox.py``: the queue every publish goes through, and which publishes
  are re-sent after a reconnection.
* ``_table.py``: which local subscriptions hold which patterns, and the last
  position received on each exact channel (no I/O).
* ``_auth.py``: where tokens come from and when to refresh them.
* ``_hooks.py``: running application code (hooks, subscription callbacks)
  safely, and the set of every task the client starts.
* ``subscription.py``, ``frames.py``, ``errors.py``, ``backoff.py``: the
  subscription buffer, the wire codec and the values handed out, the
  exception tree, the delays.

Imports point one way, down the layers listed in ``tests/test_client_core.py``
(``client``; ``_link``; ``_requests``; ``_session``; ``_auth``, ``_outbox``,
``_table``, ``_hooks``; ``subscription``, ``backoff``; ``frames``;
``errors``). No module imports one above it (that test checks it).

Theory of operation
-------------------

A :class:`Client` is a thin front. Each operation checks its arguments and
goes through the link, which owns the connection task (its theory of
operation is in ``_link.py``).

The client keeps the one piece of state the broker cannot: several local
subscriptions may hold the same pattern, while the broker has it once per
connection. ``subscribe`` and ``unsubscribe``, under one lock, subscribe on
the broker for the first holder of a pattern and unsubscribe after the last;
the table in ``_table.py`` counts the holders, and remembers where each
exact channel is so that a reconnection can recover what it missed.

Requests (``subscribe``, ``publish`` ...) made while the client is
reconnecting wait for the next connection, within their time-out. Subscribe
and ping are idempotent and are re-sent on the next connection if the one
they were sent on drops. A publish is re-sent only when it has a ``key``
(the broker then drops a second copy); without one, if the connection drops
after the frame was sent and before the ``ok``, it raises
:class:`ConnectionClosed`, because the message may or may not have been
delivered. Unsubscribe need not be: a new connection does not re-subscribe
what nobody holds.

Every task the client starts is kept in one set and cancelled by
:meth:`Client.close`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Generator, Mapping
from types import TracebackType
from typing import Any, TypedDict, Unpack

import orjson

from ._auth import TokenProvider, TokenSource
from ._hooks import (
    DisconnectCallback,
    ErrorCallback,
    GapCallback,
    Hooks,
    MessageCallback,
    TaskSet,
    add_hook,
    run_callback,
)
from ._link import Link, State
from ._outbox import Outbox, Outgoing
from ._table import SubscriptionTable
from .backoff import Backoff
from .errors import BadRequest, RequestError
from .frames import Position, PublishResult, Reply, check_key, check_replay
from .subscription import DEFAULT_MAX_BUFFER, Subscription

__all__ = ["DEFAULT_MAX_OUTBOX", "DEFAULT_URL", "Client", "ClientOptions", "State", "connect"]

#: Where the client connects when no URL is given.
DEFAULT_URL = "ws://localhost:8000/ws"
#: Fire-and-forget publishes the outbox holds at most (as the browser client's ``outboxSize``).
DEFAULT_MAX_OUTBOX = 1000

log = logging.getLogger("broker_client")
# A library does not print by itself: the application configures logging.
log.addHandler(logging.NullHandler())


class ClientOptions(TypedDict, total=False):
    """Keyword options of :func:`connect` and :class:`Client` (see :class:`Client`)."""

    token: str | None
    token_provider: TokenProvider | None
    request_timeout: float
    reconnect: bool
    max_attempts: int | None
    retry_first_connect: bool
    backoff_initial: float
    backoff_max: float
    restart_delay: float
    open_timeout: float
    ping_interval: float | None
    ping_timeout: float | None
    close_timeout: float
    max_size: int | None
    max_buffer: int
    max_outbox: int
    idempotent: bool
    additional_headers: Mapping[str, str] | None


class Client:
    """A connection to the broker that reconnects, re-subscribes and recovers by itself.

    Use it as ``async with connect(url) as client:`` (or ``client = await
    connect(url)`` and later ``await client.close()``).

    Options, all keyword-only:

    * ``token``: a JWT sent in an ``auth`` frame on every connection; or
      ``token_provider``: a function or coroutine function returning one,
      called for every connection and again before each token expires (the
      client refreshes on the open connection, subscriptions untouched).
      A token refused on the first connection makes entering the client
      raise :class:`Unauthorized`; on a reconnection it goes to ``on_error``
      and the attempt is retried with backoff.
    * ``request_timeout`` (seconds, default 10): how long a request waits for
      its reply, including any wait for a connection, before it raises
      :class:`Timeout`. Each operation also takes its own ``timeout=``.
    * ``reconnect`` (default True): reconnect when the connection drops.
    * ``max_attempts`` (default None: forever): failed connection attempts in a
      row before the client gives up and closes; subscriptions then raise
      :class:`ConnectionClosed`.
    * ``retry_first_connect`` (default False): if False, entering the client
      raises :class:`CannotConnect` when the first attempt fails; if True it
      keeps trying like a reconnection.
    * ``backoff_initial`` / ``backoff_max`` (seconds, default 0.2 / 10): the
      jittered exponential delay between attempts starts at the first and is
      capped at the second.
    * ``restart_delay`` (seconds, default 1): after the broker closed with
      1012 (restarting), reconnect after a random delay up to this long
      instead of backing off.
    * ``open_timeout`` (seconds, default 10): time-out of one connection attempt.
    * ``ping_interval`` / ``ping_timeout`` (seconds, default 20 / 20): WebSocket
      keepalive that notices a dead connection; None disables it.
    * ``close_timeout`` (seconds, default 5): how long closing waits for the
      broker's answer; a dead connection counts as lost after
      ``ping_interval + ping_timeout + close_timeout`` at most.
    * ``max_size`` (bytes, default 16 MiB): largest frame accepted from the broker.
    * ``max_buffer`` (default 10000): messages each subscription buffers
      before dropping the oldest (see :class:`Subscription`).
    * ``max_outbox`` (default 1000): fire-and-forget publishes that may wait
      for a connection; one more raises :class:`OutboxFull`.
    * ``idempotent`` (default False): give every publish without a ``key`` a
      random one, so that it is re-sent safely after a dropped connection.
    * ``additional_headers``: extra HTTP headers for the opening handshake.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        request_timeout: float = 10.0,
        reconnect: bool = True,
        max_attempts: int | None = None,
        retry_first_connect: bool = False,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        restart_delay: float = 1.0,
        open_timeout: float = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        close_timeout: float = 5.0,
        max_size: int | None = 16 * 2**20,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        max_outbox: int = DEFAULT_MAX_OUTBOX,
        idempotent: bool = False,
        additional_headers: Mapping[str, str] | None = None,
    ) -> None:
        if request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError("max_attempts must be at least 1 or None")
        if restart_delay < 0:
            raise ValueError("restart_delay must not be negative")
        tokens = None
        if token is not None or token_provider is not None:
            tokens = TokenSource(token, token_provider)
        self._max_buffer = max_buffer
        self._idempotent = idempotent
        self._tasks = TaskSet()
        self._hooks = Hooks(self._tasks)
        self._table = SubscriptionTable()
        # Held by subscribe and unsubscribe across their requests, so that the
        # table and the broker agree on which patterns are subscribed.
        self._sub_lock = asyncio.Lock()
        self._link = Link(
            url,
            table=self._table,
            hooks=self._hooks,
            tasks=self._tasks,
            outbox=Outbox(max_outbox),
            tokens=tokens,
            request_timeout=request_timeout,
            reconnect=reconnect,
            max_attempts=max_attempts,
            retry_first_connect=retry_first_connect,
            backoff=Backoff(backoff_initial, backoff_max),
            restart_delay=restart_delay,
            ws_options={
                "open_timeout": open_timeout,
                "ping_interval": ping_interval,
                "ping_timeout": ping_timeout,
                "close_timeout": close_timeout,
                "max_size": max_size,
                "additional_headers": additional_headers,
            },
        )
        self._requests = self._link.requests

    def __repr__(self) -> str:
        return f"<Client {self.url} {self.state}>"

    # -- life cycle ------------------------------------------------------------

    @property
    def url(self) -> str:
        """The broker's WebSocket URL; a new value applies from the next connection attempt."""
        return self._link.url

    @url.setter
    def url(self, url: str) -> None:
        self._link.url = url

    @property
    def request_timeout(self) -> float:
        """Default time-out of each request, in seconds (see ``request_timeout`` above)."""
        return self._requests.request_timeout

    @request_timeout.setter
    def request_timeout(self, seconds: float) -> None:
        self._requests.request_timeout = seconds

    def position(self, channel: str) -> Position | None:
        """The last position seen on a subscribed exact ``channel`` with history, else None.

        What the client resubscribes with after a reconnect; an application
        that keeps it (in a file, say) can pass it as ``since=`` next time.
        """
        return self._table.position(channel)

    @property
    def reconnects(self) -> int:
        """How many times the client has reconnected (successfully) so far."""
        return self._link.reconnects

    @property
    def state(self) -> State:
        """The current :class:`State`."""
        return self._link.state

    @property
    def connected(self) -> bool:
        """True while a connection is up (and authenticated, with a token)."""
        return self._link.connected

    @property
    def outbox_size(self) -> int:
        """Publishes not yet written or not yet answered (see :meth:`drain`)."""
        return len(self._link.outbox)

    async def start(self) -> Client:
        """Connect; return once the first connection is up and its subscriptions restored.

        Raises :class:`CannotConnect` if it cannot connect (at once, or after
        ``max_attempts`` when ``retry_first_connect`` is set), and
        :class:`Unauthorized` if the broker refuses the token.
        """
        first = self._link.start()
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

    async def close(self, *, drain: bool = False) -> None:
        """Close the connection, end every subscription and cancel every task of the client.

        Publishes still queued are dropped (and logged) unless ``drain`` is
        True, which first waits for them as :meth:`drain` does; the client
        is closed even if draining fails, and the error is raised then.
        """
        try:
            if drain and self.state not in (State.NEW, State.CLOSED):
                await self.drain()
        finally:
            if self.state is not State.CLOSED or self._tasks:
                await self._link.close()
                await self._tasks.cancel()

    async def wait_connected(self) -> None:
        """Wait until a connection is up; raise :class:`ConnectionClosed` if the client closed.

        Waits as long as it takes: wrap it in ``asyncio.timeout()`` to bound it.
        """
        await self._link.wait_open()

    async def drain(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - raises our typed Timeout
    ) -> None:
        """Wait until every queued publish was written and every publish in flight answered.

        Then a ``ping`` round trip makes sure the broker has also read the
        fire-and-forget publishes written before it, so that a refusal it
        decides at once (``bad_channel``, ``too_large``, ``forbidden``) has
        reached the ``on_error`` hooks. (A later ``unavailable`` for one of
        them may still come: give it a ``key`` to have it answered.) Waits for
        a connection if need be; raises :class:`Timeout` after ``timeout``
        (default ``request_timeout``).
        """
        await self._requests.drain(timeout)

    # -- hooks -----------------------------------------------------------------

    def on_reconnect(self, callback: GapCallback) -> Callable[[], None]:
        """Call ``callback(gap)`` each time the client has reconnected and re-subscribed.

        Messages published between ``gap.since`` and ``gap.until`` may be lost
        on the subscriptions that received this :class:`Gap` (those whose
        channels were all recovered with ``since`` did not). ``callback`` may
        be a coroutine function. Return a function that removes the hook.
        """
        return add_hook(self._hooks.on_reconnect, callback)

    def on_disconnect(self, callback: DisconnectCallback) -> Callable[[], None]:
        """Call ``callback(exc)`` when the connection drops (before reconnecting)."""
        return add_hook(self._hooks.on_disconnect, callback)

    def on_error(self, callback: ErrorCallback) -> Callable[[], None]:
        """Call ``callback(exc)`` for an ``error`` that answers no awaited request.

        That is the broker refusing a fire-and-forget publish, a re-subscribe
        after a reconnection, or a token (on a reconnection, or a refresh);
        or ending a subscription (``unsubscribed``): the subscriptions
        holding that pattern then end with the same error. Without any hook
        such errors are logged.
        """
        return add_hook(self._hooks.on_error, callback)

    # -- operations ------------------------------------------------------------

    async def subscribe(
        self,
        *patterns: str,
        callback: MessageCallback | None = None,
        on_gap: GapCallback | None = None,
        max_buffer: int | None = None,
        since: Position | tuple[int, str] | None = None,
        history: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - raises our typed Timeout
    ) -> Subscription:
        """Subscribe to one or more channels or patterns and return the :class:`Subscription`.

        Returns once the broker has confirmed every pattern. Without
        ``callback`` iterate the subscription; with it, ``callback(message)``
        (a function or coroutine function) is called for each message in
        order, and ``on_gap(gap)`` for each gap. Raises the broker's error
        (``BadChannel``, ``Forbidden``, ``LimitExceeded`` ...), :class:`Timeout`
        or :class:`ConnectionClosed`; on error nothing stays subscribed.

        ``since=(offset, epoch)`` (a :class:`Position`, for example a
        message's ``position``) first replays what the channel received
        after that position; if the broker cannot, the subscription's first
        event is a :class:`Gap` with its reason. ``history=n`` first replays
        the channel's last ``n`` kept messages. Both need one exact channel
        whose broker rule keeps history, not already subscribed by this
        client (else :class:`BadRequest`, as the broker would answer).
        """
        if not patterns:
            raise ValueError("subscribe needs at least one channel or pattern")
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise TypeError(f"a pattern is a str, not {type(pattern).__name__}")
        unique = tuple(dict.fromkeys(patterns))
        position = check_replay(unique, since, history)
        link = self._link
        link.check_open()
        table = self._table
        async with self._sub_lock:
            if (position is not None or history is not None) and table.holds(unique[0]):
                raise BadRequest(
                    f"already subscribed to {unique[0]!r}; unsubscribe it before replaying it"
                )
            sub = Subscription(
                unique,
                unsubscribe=self.unsubscribe,
                max_buffer=self._max_buffer if max_buffer is None else max_buffer,
            )
            table.add_pending(sub)
            try:
                await self._confirm_all(sub, position, history, timeout)
            except BaseException:
                table.discard(sub)  # failed or cancelled: it never existed
                raise
            table.activate(sub, link.generation)
        if callback is not None:
            sub._has_callback = True
            self._tasks.spawn(run_callback(sub, callback, on_gap), name=f"callback {unique}")
        return sub

    async def _confirm_all(
        self,
        sub: Subscription,
        position: Position | None,
        history: int | None,
        timeout: float | None,  # noqa: ASYNC109 - raises our typed Timeout
    ) -> None:
        """Subscribe on the broker to the patterns of ``sub`` that no one holds yet."""
        link = self._link
        confirmed: dict[str, int] = {}  # pattern -> connection it was confirmed on
        wanted = [p for p in sub.patterns if not self._table.holds(p)]
        todo = wanted
        while todo:
            results = await asyncio.gather(
                *(self._subscribe_one(sub, p, confirmed, position, history, timeout) for p in todo),
                return_exceptions=True,
            )
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures or sub.closed:
                refused = {
                    p for p, r in zip(todo, results, strict=True) if isinstance(r, RequestError)
                }
                for pattern in wanted:
                    if pattern not in refused:  # maybe subscribed: undo it, at best
                        await self._requests.unsubscribe(pattern, timeout)
                raise failures[0] if failures else sub._ending_error()
            # A pattern confirmed on a connection that has dropped since is not
            # on the broker any more: ask again, on this one.
            todo = [p for p in wanted if confirmed.get(p) != link.generation]
            position = history = None

    async def _subscribe_one(
        self,
        sub: Subscription,
        pattern: str,
        confirmed: dict[str, int],
        since: Position | None,
        history: int | None,
        timeout: float | None,  # noqa: ASYNC109 - raises our typed Timeout
    ) -> None:
        link = self._link
        table = self._table
        if pattern in confirmed and since is None and history is None:
            since = table.position(pattern)  # asked again: resume where it was
        fields: dict[str, Any] = {"channel": pattern}
        if since is not None:
            fields["since"] = {"offset": since.offset, "epoch": since.epoch}
        if history is not None:
            fields["history"] = history

        def on_reply(reply: Reply) -> None:
            confirmed[pattern] = link.generation
            table.confirm(sub, pattern, reply.extra, since=since, history=history)

        await self._requests.request(
            "subscribe", fields, retry=True, timeout=timeout, on_reply=on_reply
        )

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
                gone = self._table.remove(target)
            else:
                gone = self._table.remove_pattern(target)
            for pattern in gone:
                await self._requests.unsubscribe(pattern, timeout)

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        key: str | None = None,
        idempotent: bool | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - raises our typed Timeout
    ) -> PublishResult:
        """Publish ``data`` (any JSON value) to ``channel``; return the broker's answer.

        With a ``key`` (or ``idempotent=True``, or the client's ``idempotent``
        option, which make a random one) the publish is idempotent: if the
        connection drops before the reply, it is sent again on the next
        connection, and the broker delivers it once (the result's
        ``duplicate`` says the copy that answered was dropped). Without one,
        a dropped connection raises :class:`ConnectionClosed`: the message
        may or may not have been delivered.

        Raises the broker's error (``BadChannel`` for a pattern, ``TooLarge``,
        ``Forbidden``, ``RateLimited``, ``Unavailable`` ...), :class:`Timeout`,
        :class:`ConnectionClosed`, and ``TypeError`` if ``data`` cannot be
        encoded as JSON.
        """
        payload = orjson.dumps(data)
        key = self._key(key, idempotent)
        reply = await self._requests.publish(channel, payload, key, timeout)
        return PublishResult.from_fields(reply.extra)

    def publish_nowait(
        self,
        channel: str,
        data: Any,
        *,
        key: str | None = None,
        idempotent: bool | None = None,
    ) -> None:
        """Queue a publish and return at once, without waiting for the broker (fire and forget).

        The outbox is written, in order with every other publish, while a
        connection is up; until then it holds at most ``max_outbox`` such
        publishes, and one more raises :class:`OutboxFull`. A refusal by the
        broker goes to the ``on_error`` hooks. Without a ``key`` a publish
        written on a connection that then drops is lost or not, unknown;
        with one it is re-sent, and delivered once. ``await drain()`` waits
        until everything queued is written (and keyed ones answered).
        Raises ``TypeError`` at once if ``data`` cannot be encoded as JSON.
        """
        payload = orjson.dumps(data)
        key = self._key(key, idempotent)
        self._link.check_open()
        self._link.outbox.put(Outgoing(channel, payload, key))

    async def ping(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - raises our typed Timeout
    ) -> float:
        """Send an application-level ``ping``; return the round trip in seconds."""
        started = time.monotonic()
        await self._requests.request("ping", {}, retry=True, timeout=timeout)
        return time.monotonic() - started

    def _key(self, key: str | None, idempotent: bool | None) -> str | None:
        if key is None:
            if idempotent if idempotent is not None else self._idempotent:
                return uuid.uuid4().hex
            return None
        return check_key(key)


def connect(url: str = DEFAULT_URL, **options: Unpack[ClientOptions]) -> Client:
    """Return a :class:`Client` for ``url``; use ``async with`` or ``await`` to connect.

    ::

        async with connect("ws://localhost:8000/ws", token_provider=get_token) as client:
            async for message in await client.subscribe("sensors.>"):
                print(message.channel, message.data)
    """
    return Client(url, **options)
