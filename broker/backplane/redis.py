"""The Redis backplane: carries messages between broker processes over Redis pub/sub.

Theory of operation
-------------------

Two connections to one Redis server, both built by redis-py from the URL (so
TLS, credentials, database and Unix sockets work as redis-py documents), both
owned and watched here rather than by redis-py's ``PubSub`` or ``Pipeline``:

* **Publishing** (``redis_publisher.Publisher``). ``publish()`` does no I/O:
  it stamps the message with an id, queues the packed ``PUBLISH`` and returns
  a future. One *writer* task writes everything waiting in one go on its
  connection and reads the replies in order: one round trip per batch, in
  call order. While a batch is out, new publishes pile up and go together
  next time. (redis-py's ``Pipeline`` did the same about seven times slower.)

* **Receiving.** ``PubSub`` reconnects and re-subscribes on its own when its
  connection drops, losing messages without telling anybody (see the shared
  FACTS), so the receiving connection is driven by hand. A *session* is that
  connection plus everything Redis confirmed on it; when anything goes wrong
  the session is thrown away whole and a new one built. Its *reader* task
  reads replies and calls ``deliver()`` synchronously; its *health* task sends
  ``PING`` every ``socket_timeout`` seconds and gives up on the session when
  nothing comes back within ``socket_timeout``, which is how a half-open or
  black-holed link is noticed (within two ``socket_timeout``).

A *supervisor* task owns the sessions: it connects (every step bounded by
``socket_timeout``, redis-py's retries off), re-subscribes everything still
wanted, flips ``ready`` on, waits until the session is lost, flips ``ready``
off and fails what is queued, then reconnects: at once the first time, then
with capped exponential backoff and jitter. It logs one warning when the link
is lost and one info line when it is back, only debug lines in between. A new
session also makes the writer drop its connection, which shared the fate of
the old one, and open a fresh one for the next batch.

Subscriptions follow local demand: ``subscribe``/``unsubscribe`` record what
is wanted (never raising on an outage) and then, under one lock, compare it
with what the current session has confirmed, send the one command needed and
wait for Redis's confirmation (the reader counts them). The lock and the
re-check after it make racing calls for the same pattern end in the state of
the last call. Broker patterns become Redis globs that match a superset of
their channels; the hub filters exactly.

One publish reaches this process once per matching Redis subscription, the
copies back to back on the reader's connection; ``Deduplicator`` keeps the
first. Redis-side names are ``prefix + channel``; the payload is the envelope
of ``redis_wire``. Delivery is at most once: what is published while the
receiving link is down is lost, as with any pub/sub.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from broker.backplane import Backplane, DeliverFn
from broker.backplane.redis_publisher import (
    LINK_ERRORS,
    Publisher,
    RedisConnection,
    describe_error,
    disconnect_quietly,
)
from broker.backplane.redis_wire import (
    Deduplicator,
    EnvelopeError,
    MessageIds,
    RedisSubscription,
    backoff_delay,
    channel_from_redis,
    decode_envelope,
    encode_envelope,
    is_node_id,
    pack_publish,
    redis_subscription,
)
from broker.exceptions import BackplaneError, ConfigError

logger = logging.getLogger(__name__)

#: Most names in one SUBSCRIBE or PSUBSCRIBE when restoring after a reconnect.
_RESTORE_CHUNK = 512
#: Log one line per this many dropped messages (and the first one).
_LOG_EVERY = 1000
#: Redis channel names remembered with their broker name (or None: invalid).
_NAME_CACHE = 4096

_VERBS = {
    (True, False): "SUBSCRIBE",
    (True, True): "PSUBSCRIBE",
    (False, False): "UNSUBSCRIBE",
    (False, True): "PUNSUBSCRIBE",
}
_CONFIRMATIONS = frozenset({b"subscribe", b"unsubscribe", b"psubscribe", b"punsubscribe"})


class _Session:
    """One receiving connection and the subscriptions Redis confirmed on it."""

    def __init__(self, conn: RedisConnection, timeout: float) -> None:
        self.conn = conn
        self.timeout = timeout  # for each confirmation
        self.active: set[RedisSubscription] = set()
        self.dedupe = Deduplicator()
        self.reads = 0  # replies read so far: proof the link is alive
        self.pong = asyncio.Event()
        self.lost = asyncio.Event()
        self.error: BaseException | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self._confirm_left = 0
        self._confirmed: asyncio.Future[None] | None = None

    async def send(self, *args: bytes | str) -> None:
        # Never let redis-py reconnect this connection behind our back.
        if self.lost.is_set() or not self.conn.is_connected:
            raise BackplaneError("pub/sub connection is closed")
        await self.conn.send_command(*args, check_health=False)

    async def command(self, verb: str, names: list[bytes]) -> None:
        """Send one (P)(UN)SUBSCRIBE and wait until Redis confirmed every name."""
        self._confirmed = asyncio.get_running_loop().create_future()
        self._confirm_left = len(names)
        try:
            await self.send(verb, *names)
            async with asyncio.timeout(self.timeout):
                await self._confirmed
        except TimeoutError:
            raise BackplaneError(f"no confirmation of {verb} within {self.timeout:g} s") from None
        finally:
            self._confirmed = None
            self._confirm_left = 0

    def on_confirmation(self) -> None:
        # Our subscriptions changed at this point of the stream: see Deduplicator.
        self.dedupe.reset()
        if self._confirm_left > 0:
            self._confirm_left -= 1
            done = self._confirmed
            if self._confirm_left == 0 and done is not None and not done.done():
                done.set_result(None)

    def on_error_reply(self, error: ResponseError) -> bool:
        """Hand an error reply to the command waiting for one; False if none is."""
        done = self._confirmed
        if done is None or done.done():
            return False
        self._confirm_left = 0  # a refused command gets one error, no confirmations
        done.set_exception(error)
        return True

    def mark_lost(self, error: BaseException) -> bool:
        """Record why the session ended; return False when it had already ended."""
        if self.lost.is_set():
            return False
        self.error = error
        self.lost.set()
        if self._confirmed is not None and not self._confirmed.done():
            self._confirmed.set_exception(BackplaneError(f"connection lost: {error}"))
        return True


class RedisBackplane:
    """Carries messages between broker processes through Redis pub/sub.

    ``url`` is a redis-py URL: ``redis://``, ``rediss://`` (TLS) or ``unix://``,
    with credentials and database if needed (``rediss://user:pw@host:6380/0``).
    ``socket_timeout`` bounds every wait on Redis (connect, a publish batch, a
    PING) so that failures surface within about that long; ``reconnect_max`` caps
    the backoff between reconnect attempts; ``prefix`` is put before every channel
    name on Redis; ``node_id`` starts the ids of the messages this process
    publishes (random by default); ``max_pending`` caps the publishes waiting to
    be sent (beyond it ``publish`` fails at once). ``redis_options`` are extra
    keyword arguments for ``redis.asyncio.ConnectionPool.from_url`` (TLS files,
    a fake connection class in tests); options in the URL win over them.
    Constructing does no I/O; invalid options raise ``ConfigError``.
    """

    def __init__(
        self,
        url: str,
        *,
        node_id: str | None = None,
        socket_timeout: float = 1.0,
        reconnect_max: float = 5.0,
        prefix: str = "broker.",
        max_pending: int = 10_000,
        redis_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not socket_timeout > 0:
            raise ConfigError(f"redis socket timeout must be positive, not {socket_timeout!r}")
        if not reconnect_max > 0:
            raise ConfigError(f"redis reconnect cap must be positive, not {reconnect_max!r}")
        if max_pending < 1:
            raise ConfigError(f"redis max pending publishes must be >= 1, not {max_pending!r}")
        if not prefix.isascii() or any(c.isspace() for c in prefix):
            raise ConfigError(f"redis channel prefix must be ASCII without spaces: {prefix!r}")
        node_id = secrets.token_hex(5) if node_id is None else node_id
        if not is_node_id(node_id):
            raise ConfigError(f"node id must be 1 to 40 of [A-Za-z0-9_.:-]: {node_id!r}")
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            # FACTS: the default policy took 15.7 s to fail one command on a dead link.
            "retry": Retry(NoBackoff(), 0),
            **(redis_options or {}),
        }
        try:
            # Used only as a factory of connections (URL parsing, TLS, credentials).
            self._pool = aioredis.ConnectionPool.from_url(url, **options)
            # Both connections parse RESP2 replies as bytes, whatever the URL asks for.
            self._pool.connection_kwargs.update(decode_responses=False, protocol=2)
            # Building a connection does no I/O but checks the options now, not in a loop.
            self._pool.make_connection()  # type: ignore[no-untyped-call]
        except (TypeError, ValueError, RedisError) as exc:
            raise ConfigError(f"invalid Redis URL or options: {exc}") from None
        self._where = _describe(url)
        self._node_id = node_id
        self._ids = MessageIds(node_id)
        self._prefix = prefix
        self._prefix_bytes = prefix.encode("ascii")
        self._names: dict[bytes, str | None] = {}
        self._socket_timeout = socket_timeout
        self._reconnect_max = reconnect_max

        self._deliver: DeliverFn | None = None
        self._ready = False
        self._closed = False
        self._interest: dict[RedisSubscription, set[str]] = {}
        self._sub_lock = asyncio.Lock()
        self._session: _Session | None = None
        self._probe = asyncio.Event()  # a publish failed: check the link now
        self._first_attempt = asyncio.Event()
        self._publisher = Publisher(
            self._make_connection,
            timeout=socket_timeout,
            max_pending=max_pending,
            on_failure=self._probe.set,
        )
        self._supervisor: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._losses = 0
        self._dropped = 0
        self._deliver_errors = 0

    # -- the Backplane interface ------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the link to Redis is up and every wanted subscription is restored."""
        return self._ready

    async def start(self, deliver: DeliverFn) -> None:
        """Start the tasks and return after the first connection attempt.

        Does not raise when Redis is unreachable: ``ready`` stays False, the
        failure is logged once and reconnection goes on in the background.
        """
        if self._closed or self._supervisor is not None:
            raise RuntimeError("a RedisBackplane can be started once")
        self._deliver = deliver
        self._writer = asyncio.create_task(self._publisher.run(), name="redis-backplane-writer")
        self._supervisor = asyncio.create_task(self._supervise(), name="redis-backplane")
        try:
            await self._first_attempt.wait()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop every task, fail what is still queued and close all connections."""
        if self._closed:
            return
        self._closed = True
        self._ready = self._publisher.accepting = False
        tasks = [t for t in (self._supervisor, self._writer) if t is not None]
        await _stop(tasks)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                logger.error("redis backplane: task failed", exc_info=task.exception())
        await self._publisher.close()

    async def subscribe(self, pattern: str) -> None:
        """Want messages on ``pattern``; returns once Redis confirmed, or at once if down.

        Raises ``BadChannel`` for an invalid pattern, never for an outage.
        """
        sub = redis_subscription(self._prefix, pattern)
        self._interest.setdefault(sub, set()).add(pattern)
        await self._reconcile(sub)

    async def unsubscribe(self, pattern: str) -> None:
        """Stop wanting ``pattern``; never raises for an outage."""
        sub = redis_subscription(self._prefix, pattern)
        wanting = self._interest.get(sub)
        if wanting is not None:
            wanting.discard(pattern)
            if not wanting:
                del self._interest[sub]
        await self._reconcile(sub)

    def publish(self, channel: str, data: bytes) -> asyncio.Future[None]:
        """Queue ``data`` (JSON bytes) for ``channel``; the future resolves once Redis took it.

        It fails with ``BackplaneError`` at once when Redis is down or too much
        is queued, and within about ``socket_timeout`` when Redis stops
        answering. Await it or add a done callback, or asyncio will log the
        unretrieved exception.
        """
        payload = encode_envelope(self._ids.next(), data)
        return self._publisher.enqueue(pack_publish((self._prefix + channel).encode(), payload))

    # -- counters for metrics -----------------------------------------------------

    @property
    def node_id(self) -> str:
        return self._node_id

    def stats(self) -> dict[str, int]:
        """Counters for ``/metrics``: outages, and foreign payloads dropped."""
        return {
            "connection_losses": self.connection_losses,
            "dropped_messages": self.dropped_messages,
        }

    @property
    def connection_losses(self) -> int:
        """How many times an established connection was lost."""
        return self._losses

    @property
    def dropped_messages(self) -> int:
        """Messages read from Redis but not delivered: malformed payload or channel."""
        return self._dropped

    def _make_connection(self) -> RedisConnection:
        """A new, unconnected redis-py connection built from the URL."""
        return cast(RedisConnection, self._pool.make_connection())  # type: ignore[no-untyped-call]

    # -- the connection supervisor -----------------------------------------------

    async def _supervise(self) -> None:
        """Keep one session up: connect, wait for its loss, back off, reconnect."""
        try:
            await self._keep_connected()
        finally:
            self._first_attempt.set()  # never leave start() waiting

    async def _keep_connected(self) -> None:
        attempt = 0
        connected_before = False
        complained = False  # one warning per outage, not one per attempt
        while not self._closed:
            delay = backoff_delay(attempt, self._reconnect_max, random.random)
            if delay:
                await asyncio.sleep(delay)
            attempt += 1
            try:
                session = await self._open_session()
            except Exception as exc:
                self._first_attempt.set()
                if not isinstance(exc, LINK_ERRORS):
                    # Our bug, or a setting redis-py refuses late: say so loudly, keep trying.
                    logger.exception("redis backplane: unexpected error while connecting")
                elif not complained:
                    logger.warning(
                        "redis backplane: cannot connect to %s: %s (retrying)",
                        self._where,
                        describe_error(exc),
                    )
                else:
                    logger.debug(
                        "redis backplane: attempt %d failed: %s", attempt, describe_error(exc)
                    )
                complained = True
                continue
            self._first_attempt.set()
            if connected_before:
                logger.info(
                    "redis backplane: reconnected, %d subscriptions restored", len(session.active)
                )
            else:
                logger.info(
                    "redis backplane: connected to %s as node %s", self._where, self._node_id
                )
            connected_before = True
            complained = False
            try:
                await session.lost.wait()
            finally:
                await self._close_session(session)
            self._losses += 1
            logger.warning(
                "redis backplane: connection lost: %s",
                describe_error(session.error or RuntimeError()),
            )
            complained = True
            attempt = 0

    async def _open_session(self) -> _Session:
        """Connect, start the reader and health tasks, restore subscriptions, go ready."""
        conn = self._make_connection()
        session = _Session(conn, self._socket_timeout)
        try:
            async with asyncio.timeout(self._socket_timeout * 2):
                await conn.connect()  # a connect and a few handshake round trips
            self._session = session
            self._publisher.renew()  # its connection shared the fate of the old link
            session.tasks = [
                asyncio.create_task(self._read_loop(session), name="redis-backplane-reader"),
                asyncio.create_task(self._health_loop(session), name="redis-backplane-health"),
            ]
            async with self._sub_lock:
                await self._restore(session)
                if session.lost.is_set():
                    raise BackplaneError(f"connection lost: {session.error}")
                if self._closed:  # a swallowed cancellation (see _stop) let us get here
                    raise BackplaneError("closed")
                self._ready = self._publisher.accepting = True
        except BaseException:
            await self._close_session(session)
            raise
        return session

    async def _restore(self, session: _Session) -> None:
        """Subscribe everything wanted on a fresh session (the caller holds the lock)."""
        wanted = list(self._interest)
        for is_pattern, verb in ((False, "SUBSCRIBE"), (True, "PSUBSCRIBE")):
            subs = [sub for sub in wanted if sub.is_pattern is is_pattern]
            for start in range(0, len(subs), _RESTORE_CHUNK):
                chunk = subs[start : start + _RESTORE_CHUNK]
                try:
                    await session.command(verb, [sub.name for sub in chunk])
                except ResponseError:
                    # Redis refuses a whole command for one bad name: find it, keep the rest.
                    for sub in chunk:
                        try:
                            await session.command(verb, [sub.name])
                        except ResponseError as exc:
                            _refused(verb, sub.name, exc)
                        else:
                            session.active.add(sub)
                else:
                    session.active.update(chunk)

    async def _close_session(self, session: _Session) -> None:
        session.mark_lost(BackplaneError("closed"))
        if self._session is session:
            self._session = None
            self._go_down()
        await _stop(session.tasks)
        await disconnect_quietly(session.conn)

    def _lose(self, session: _Session, error: BaseException) -> None:
        """End ``session`` because of ``error``; the supervisor takes it from there."""
        if session.mark_lost(error) and self._session is session:
            self._go_down()

    def _go_down(self) -> None:
        self._ready = self._publisher.accepting = False
        self._publisher.fail_queued("redis backplane: connection to Redis lost")

    # -- subscriptions ------------------------------------------------------------

    async def _reconcile(self, sub: RedisSubscription) -> None:
        """Make the current session's state of ``sub`` match what is wanted."""
        async with self._sub_lock:
            session = self._session
            if session is None or session.lost.is_set():
                return  # recorded; the next session restores it
            wanted = sub in self._interest
            if wanted == (sub in session.active):
                return
            verb = _VERBS[wanted, sub.is_pattern]
            try:
                await session.command(verb, [sub.name])
            except ResponseError as exc:
                _refused(verb, sub.name, exc)  # wanted still; tried again after a reconnect
                return
            except LINK_ERRORS as exc:
                self._lose(session, exc)
                return
            if wanted:
                session.active.add(sub)
            else:
                session.active.discard(sub)

    # -- receiving ----------------------------------------------------------------

    async def _read_loop(self, session: _Session) -> None:
        """Read every reply of the session's connection until it fails."""
        read = session.conn.read_response
        try:
            while True:
                # math.inf: block without redis-py's socket timeout; _health_loop watches.
                try:
                    reply = await read(timeout=math.inf, disconnect_on_error=False)
                except ResponseError as exc:
                    # Redis refused a (P)SUBSCRIBE (an ACL, say): that command fails, the
                    # link is fine. An error nobody waits for means we are out of step.
                    session.reads += 1
                    if not session.on_error_reply(exc):
                        raise
                    continue
                session.reads += 1
                self._dispatch(session, reply)
        except LINK_ERRORS as exc:
            self._lose(session, exc)
        except Exception as exc:
            logger.exception("redis backplane: reader failed")
            self._lose(session, exc)

    def _dispatch(self, session: _Session, reply: Any) -> None:
        if not isinstance(reply, list) or not reply:
            if reply == b"PONG":  # PING on a connection without subscriptions
                session.pong.set()
            return
        kind = reply[0]
        if kind == b"message" and len(reply) == 3:
            self._on_message(session, None, reply[1], reply[2])
        elif kind == b"pmessage" and len(reply) == 4:
            self._on_message(session, reply[1], reply[2], reply[3])
        elif kind in _CONFIRMATIONS:
            session.on_confirmation()
        elif kind == b"pong":
            session.pong.set()

    def _on_message(
        self, session: _Session, source: bytes | None, raw_channel: bytes, payload: bytes
    ) -> None:
        try:
            message_id, data = decode_envelope(payload)
        except EnvelopeError as exc:
            self._drop(raw_channel, str(exc))
            return
        key = payload if message_id is None else message_id
        if not session.dedupe.first(raw_channel, key, source):
            return
        try:
            channel = self._names[raw_channel]
        except KeyError:
            if len(self._names) >= _NAME_CACHE:
                self._names.clear()
            channel = self._names[raw_channel] = channel_from_redis(self._prefix_bytes, raw_channel)
        if channel is None:
            self._drop(raw_channel, "not a valid channel name")
            return
        try:
            orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            self._drop(raw_channel, f"data is not JSON: {exc}")
            return
        assert self._deliver is not None
        try:
            self._deliver(channel, data)
        except Exception:
            # deliver must not raise; if it does, keep reading but say so, sparingly.
            self._deliver_errors += 1
            if self._deliver_errors % _LOG_EVERY == 1:
                logger.exception(
                    "redis backplane: deliver() raised (%d times so far)", self._deliver_errors
                )

    def _drop(self, raw_channel: bytes, reason: str) -> None:
        self._dropped += 1
        if self._dropped % _LOG_EVERY == 1:
            logger.warning(
                "redis backplane: dropped a message on %r: %s (%d dropped so far, one line per %d)",
                raw_channel,
                reason,
                self._dropped,
                _LOG_EVERY,
            )

    async def _health_loop(self, session: _Session) -> None:
        """PING every ``socket_timeout``, or at once when a publish failed."""
        try:
            while True:
                try:
                    async with asyncio.timeout(self._socket_timeout):
                        await self._probe.wait()
                    self._probe.clear()
                except TimeoutError:
                    pass
                await self._ping(session)
        except LINK_ERRORS as exc:
            self._lose(session, exc)

    async def _ping(self, session: _Session) -> None:
        session.pong.clear()
        before = session.reads
        await session.send("PING")
        while True:
            try:
                async with asyncio.timeout(self._socket_timeout):
                    await session.pong.wait()
                return
            except TimeoutError:
                # Replies still coming in (a backlog ahead of the PONG) prove the link alive.
                if session.reads == before:
                    raise BackplaneError(
                        f"no reply to PING within {self._socket_timeout:g} s"
                    ) from None
                before = session.reads


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they end, cancelling again while any runs on.

    Python 3.11's ``asyncio.wait_for``, which redis-py uses for every write, can
    swallow a cancellation that lands as the write completes; the task then
    carries on as if nothing happened. A second cancel lands elsewhere.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)


def _refused(verb: str, name: bytes, error: ResponseError) -> None:
    logger.warning("redis backplane: Redis refused %s %r: %s", verb, name, error)


def _describe(url: str) -> str:
    """The URL without credentials or query, for log lines."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}://{netloc}{parts.path}"


if TYPE_CHECKING:

    def _implements_backplane(backplane: RedisBackplane) -> Backplane:
        return backplane  # mypy checks RedisBackplane against the Protocol here
