"""The Redis backplane: carries messages between broker processes over Redis pub/sub.

Theory of operation
-------------------

Two connections to one Redis server, both built by redis-py from the URL (so
TLS, credentials, database and Unix sockets work as redis-py documents), both
owned and watched by this backplane rather than by redis-py's ``PubSub`` or
``Pipeline``. ``RedisBackplane`` is the façade that owns one object per
connection and wires them together:

* **Publishing** (``redis_publisher.Publisher``). ``publish()`` does no I/O:
  it stamps the message with an id, queues the packed ``PUBLISH`` and returns
  a future. One *writer* task writes everything waiting in one go on its
  connection and reads the replies in order: one round trip per batch, in
  call order. While a batch is out, new publishes pile up and go together
  next time. (redis-py's ``Pipeline`` does the same several times slower;
  ``bench/redis_publish.py`` measures by how much.)

* **Receiving** (``redis_link.Receiver``). Its *supervisor* task keeps one
  subscriber link up, restores every wanted subscription on each new link,
  watches the link with PINGs, and calls the listener's ``deliver()``,
  ``link_lost()`` and ``link_restored()``; see that module for how.

``ready`` is true while the receiver has a link up with every subscription
restored; the publisher takes publishes only then. When the link goes down,
``ready`` turns false at once and what is queued to publish fails. A new link
also makes the writer drop its connection, which shared the fate of the old
link, and open a fresh one for the next batch; the writer, for its part, asks
the receiver to check the link at once when a batch fails.

Subscriptions follow local demand: ``subscribe``/``unsubscribe`` record what
is wanted here (the *interest*: Redis subscription to the broker patterns
that want it), never raising on an outage, and then ask the receiver to make
the current link match. Broker patterns become Redis globs that match a
superset of their channels; the hub filters exactly. Redis-side names are
``prefix + channel``; the payload is the envelope of ``redis_wire``. Delivery
is at most once: what is published while the receiving link is down is lost,
as with any pub/sub.
"""

from __future__ import annotations

import asyncio
import secrets
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from broker.backplane import Backplane, Listener, Published
from broker.backplane.redis_link import Receiver, close_pair
from broker.backplane.redis_publisher import Publisher, RedisConnection
from broker.backplane.redis_scripts import (
    KeyScheme,
    ScriptCommands,
    parse_publish_reply,
    parse_read_reply,
)
from broker.backplane.redis_wire import (
    MessageIds,
    RedisSubscription,
    encode_envelope,
    is_node_id,
    pack_publish,
    redis_subscription,
)
from broker.exceptions import ConfigError
from broker.history import HistoryPolicy, HistoryRead


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
        reconnect_max: float = 2.0,
        prefix: str = "broker.",
        max_pending: int = 10_000,
        history_meta_ttl: float = 86400.0,
        idempotency_window: float = 120.0,
        redis_options: Mapping[str, Any] | None = None,
    ) -> None:
        node_id = check_options(
            socket_timeout=socket_timeout,
            reconnect_max=reconnect_max,
            max_pending=max_pending,
            prefix=prefix,
            node_id=node_id,
        )
        self._pool = connection_factory(url, socket_timeout, redis_options)
        self._where = describe_url(url)
        self._node_id = node_id
        self._ids = MessageIds(node_id)
        self._prefix = prefix
        self._scripts = ScriptCommands(
            KeyScheme(prefix.encode("ascii")), history_meta_ttl, idempotency_window
        )

        self._ready = False
        self._closed = False
        self._interest: dict[RedisSubscription, set[str]] = {}
        self._receiver = Receiver(
            self._make_connection,
            self._interest,
            prefix=prefix.encode("ascii"),
            timeout=socket_timeout,
            reconnect_max=reconnect_max,
            where=self._where,
            node_id=node_id,
            on_up=self._link_up,
            on_down=self._link_down,
        )
        self._publisher = Publisher(
            self._make_connection,
            timeout=socket_timeout,
            max_pending=max_pending,
            on_failure=self._receiver.probe,
        )
        self._supervisor: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None

    # -- the Backplane interface ------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the link to Redis is up and every wanted subscription is restored."""
        return self._ready

    async def start(self, listener: Listener) -> None:
        """Start the tasks and return after the first connection attempt.

        Does not raise when Redis is unreachable: ``ready`` stays False, the
        failure is logged once and reconnection goes on in the background.
        """
        if self._closed or self._supervisor is not None:
            raise RuntimeError("a RedisBackplane can be started once")
        self._writer = asyncio.create_task(self._publisher.run(), name="redis-backplane-writer")
        self._supervisor = asyncio.create_task(self._receiver.run(listener), name="redis-backplane")
        try:
            await self._receiver.first_attempt.wait()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop every task, fail what is still queued and close all connections."""
        if self._closed:
            return
        self._closed = True
        self._ready = False
        tasks = [t for t in (self._supervisor, self._writer) if t is not None]
        await close_pair(self._receiver, self._publisher, tasks, "redis backplane")

    async def subscribe(self, pattern: str) -> None:
        """Want messages on ``pattern``; returns once Redis confirmed, or at once if down.

        Raises ``BadChannel`` for an invalid pattern, never for an outage.
        """
        sub = redis_subscription(self._prefix, pattern)
        self._interest.setdefault(sub, set()).add(pattern)
        await self._receiver.reconcile(sub)

    async def unsubscribe(self, pattern: str) -> None:
        """Stop wanting ``pattern``; never raises for an outage."""
        sub = redis_subscription(self._prefix, pattern)
        wanting = self._interest.get(sub)
        if wanting is not None:
            wanting.discard(pattern)
            if not wanting:
                del self._interest[sub]
        await self._receiver.reconcile(sub)

    async def read(
        self,
        channel: str,
        history: HistoryPolicy,
        *,
        after: int | None = None,
        last: int | None = None,
    ) -> HistoryRead:
        """The channel's position and kept messages, from one atomic look (``redis_scripts``).

        Goes through the publisher's queue, so it sees every publish this
        process handed over before it. Raises ``BackplaneError`` when Redis
        cannot answer now.
        """
        packed = self._scripts.read(channel, history, after=after, last=last)
        result: HistoryRead = await self._publisher.enqueue(packed, parse_read_reply)
        return result

    def publish(
        self,
        channel: str,
        data: bytes,
        *,
        history: HistoryPolicy | None = None,
        key: str | None = None,
    ) -> asyncio.Future[Published]:
        """Queue ``data`` (JSON bytes) for ``channel``; the future resolves once Redis took it.

        ``data`` must be valid JSON: receivers trust what a broker node
        publishes and do not parse it again (see ``redis_wire``). It fails with
        ``BackplaneError`` at once when Redis is down or too much is queued,
        and within about ``socket_timeout`` when Redis stops answering. Await it
        or add a done callback, or asyncio will log the unretrieved exception.
        """
        if history is None and key is None:
            payload = encode_envelope(self._ids.next(), data)
            return self._publisher.enqueue(pack_publish((self._prefix + channel).encode(), payload))
        packed = self._scripts.publish(channel, self._ids.next(), data, history=history, key=key)
        return self._publisher.enqueue(packed, parse_publish_reply)

    # -- counters for metrics -----------------------------------------------------

    @property
    def node_id(self) -> str:
        """The node id that starts the ids of this process's messages."""
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
        return self._receiver.losses

    @property
    def dropped_messages(self) -> int:
        """Messages read from Redis but not delivered: malformed payload or channel."""
        return self._receiver.dropped

    # -- wiring -------------------------------------------------------------------

    def _make_connection(self) -> RedisConnection:
        """A new, unconnected redis-py connection built from the URL."""
        return cast(RedisConnection, self._pool.make_connection())  # type: ignore[no-untyped-call]

    def _link_up(self) -> None:
        """The receiver has a new link with everything restored: take publishes again."""
        self._publisher.renew()  # its connection shared the fate of the old link
        self._ready = self._publisher.accepting = True

    def _link_down(self) -> None:
        """The receiver's link is gone: refuse publishes, fail the queued ones."""
        self._ready = self._publisher.accepting = False
        self._publisher.fail_queued("redis backplane: connection to Redis lost")


def check_options(
    *,
    socket_timeout: float,
    reconnect_max: float,
    max_pending: int,
    prefix: str,
    node_id: str | None,
) -> str:
    """Check the options both Redis backplanes share; return the node id (random if None)."""
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
    return node_id


def connection_factory(
    url: str, socket_timeout: float, redis_options: Mapping[str, Any] | None
) -> aioredis.ConnectionPool:
    """A redis-py pool used only to build connections from ``url`` (TLS, credentials).

    Every wait is bounded by ``socket_timeout`` and redis-py's retries are off;
    replies are RESP2 bytes whatever the URL asks. Raises ``ConfigError``.
    """
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        # FACTS: the default policy took 15.7 s to fail one command on a dead link.
        "retry": Retry(NoBackoff(), 0),
        **(redis_options or {}),
    }
    try:
        pool = aioredis.ConnectionPool.from_url(url, **options)
        pool.connection_kwargs.update(decode_responses=False, protocol=2)
        # Building a connection does no I/O but checks the options now, not in a loop.
        pool.make_connection()  # type: ignore[no-untyped-call]
    except (TypeError, ValueError, RedisError) as exc:
        raise ConfigError(f"invalid Redis URL or options: {exc}") from None
    return pool


def describe_url(url: str) -> str:
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
