"""The Redis Cluster backplane: sharded pub/sub, one receiver and publisher per master.

Theory of operation
-------------------

Classic ``PUBLISH`` on a Redis Cluster is broadcast to every node, so the
cluster carries each message once per node and scales nothing. Sharded pub/sub
(``SPUBLISH``/``SSUBSCRIBE``, Redis 7) keeps a message on the shard that owns
its channel's slot. Broker channels are grouped into buckets (``cluster_map``):
an exact subscription subscribes the channel's own shard channel, a pattern its
buckets', and a publish (one script) sends to both; history keys carry the
bucket's hash tag, so a publish is always one script on one shard.

``ClusterBackplane`` is a façade over one ``_Shard`` per master. A shard is
what ``RedisBackplane`` is for a single Redis: a ``redis_link.Receiver`` (in
sharded mode) with the shard channels of the buckets that master serves, and a
``redis_publisher.Publisher`` for the publishes and reads of those buckets,
both on connections built from the first URL with the master's address. The
reused pieces keep their guarantees: confirmed subscriptions, PING health
checks, batched publishing, prompt failures, link events.

A *topology* task asks the cluster (``CLUSTER SLOTS``, from any node it knows
or the seeds) which master serves which slots: at start, every
``topology_interval`` seconds, at once when a shard's link fails, a reply
says ``MOVED``/``ASK`` or a master drops a shard subscription by itself (it
does when a slot leaves it), and twice a second while not every shard is up. A
node that became a master (a failover promoted a replica) gets a new
``_Shard``, and the shard of a node that is no longer one is closed. A master
whose slots changed (a reshard moved a slot) keeps its shard and its links:
only the shard channels of the moved slots are unsubscribed there and
subscribed on their new master.

Link events, aggregated for the node's ``Listener``: ``link_lost()`` when a
shard that was up goes down (its link lost, or its node no longer a master) or
subscribed shard channels change masters, while no such interruption is
already open; ``link_restored()`` when every master of a complete slot map is
up again with its subscriptions restored. A shard's outage
is thus reported to every subscription, not only to the buckets it served:
delivery fills each channel with history from where it stopped (nothing is
re-sent) and sends a ``gap`` where it cannot, so the cost is a history read
per subscribed channel, not a duplicate. ``ready`` is true while that holds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from broker.backplane import Backplane, Listener, Position, Published
from broker.backplane.cluster_map import (
    Buckets,
    ChannelFilter,
    Node,
    SlotMap,
    is_exact,
    parse_cluster_slots,
)
from broker.backplane.redis import check_options, connection_factory, describe_url
from broker.backplane.redis_link import Receiver, close_pair, stop_tasks
from broker.backplane.redis_publisher import (
    LINK_ERRORS,
    Publisher,
    RedisConnection,
    describe_error,
    disconnect_quietly,
)
from broker.backplane.redis_scripts import (
    KeyScheme,
    ScriptCommands,
    pack_shard_publish,
    parse_publish_reply,
    parse_read_reply,
    shard_publish_head,
)
from broker.backplane.redis_wire import (
    MessageIds,
    RedisSubscription,
    encode_envelope,
)
from broker.exceptions import BackplaneError, ConfigError
from broker.history import HistoryPolicy, HistoryRead

__all__ = ["ClusterBackplane"]

logger = logging.getLogger(__name__)

#: Seconds between topology checks while some shard is down.
_URGENT_INTERVAL = 0.5
#: Channels whose publish command head is kept (``ClusterBackplane._heads``).
_HEADS_CACHE = 8192


class _Shard:
    """One master: a receiver and a publisher of its own, for the buckets it serves."""

    def __init__(
        self,
        owner: ClusterBackplane,
        node: Node,
        ranges: tuple[tuple[int, int], ...],
    ) -> None:
        self.node = node
        self.where = f"{node.host}:{node.port}"
        self.ranges = ranges
        self.up = False
        self.interest: set[RedisSubscription] = set()
        self._owner = owner
        self.receiver = Receiver(
            lambda: owner.connection_to(node),
            self.interest,
            prefix=owner.prefix,
            timeout=owner.timeout,
            reconnect_max=owner.reconnect_max,
            where=f"cluster master {self.where}",
            node_id=owner.node_id,
            on_up=self._on_up,
            on_down=self._on_down,
            sharded=True,
            accept=owner.channel_filter,
            on_moved=owner.refresh,
        )
        self.publisher = Publisher(
            lambda: owner.connection_to(node),
            timeout=owner.timeout,
            max_pending=owner.max_pending,
            on_failure=self._on_failure,
        )
        self.tasks: list[asyncio.Task[None]] = []

    def serves(self, slot: int) -> bool:
        return any(start <= slot <= end for start, end in self.ranges)

    def start(self, listener: Listener) -> None:
        self.tasks = [
            asyncio.create_task(self.publisher.run(), name=f"redis-cluster-writer {self.where}"),
            asyncio.create_task(
                self.receiver.run(_ShardListener(self._owner, listener)),
                name=f"redis-cluster-shard {self.where}",
            ),
        ]

    async def close(self) -> None:
        self.up = False
        await close_pair(self.receiver, self.publisher, self.tasks, "redis cluster backplane")

    def _on_up(self) -> None:
        self.publisher.renew()
        self.up = self.publisher.accepting = True
        self._owner.shard_up()

    def _on_down(self) -> None:
        self.up = self.publisher.accepting = False
        self.publisher.fail_queued("redis cluster backplane: connection to a master lost")
        self._owner.refresh()

    def _on_failure(self) -> None:
        self.receiver.probe()
        self._owner.refresh()


class _ShardListener:
    """A shard's view of the node's listener: deliveries pass, link events are merged."""

    def __init__(self, owner: ClusterBackplane, listener: Listener) -> None:
        self._owner = owner
        self._listener = listener

    def deliver(self, channel: str, data: bytes, position: Position | None) -> None:
        self._listener.deliver(channel, data, position)

    def link_lost(self) -> None:
        self._owner.shard_lost()

    def link_restored(self) -> None:
        """The façade says when everything is back (``shard_up``), not each shard."""


class ClusterBackplane:
    """Carries messages between broker processes through a Redis Cluster's sharded pub/sub.

    ``urls`` are seed nodes (``redis://`` or ``rediss://``, credentials and TLS
    options as for ``RedisBackplane``; database 0 only, the cluster has no
    other); the options of the first one are used for every node. ``buckets``
    is how many shard channels the channels are spread over (see
    ``cluster_map``); ``topology_interval`` is how often, in seconds, the slot
    map is checked when nothing prompts it. The other options are
    ``RedisBackplane``'s. Constructing does no I/O; invalid options raise
    ``ConfigError``.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        node_id: str | None = None,
        socket_timeout: float = 1.0,
        reconnect_max: float = 2.0,
        prefix: str = "broker.",
        buckets: int = 64,
        topology_interval: float = 5.0,
        max_pending: int = 10_000,
        history_meta_ttl: float = 86400.0,
        idempotency_window: float = 120.0,
        redis_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not urls:
            raise ConfigError("a Redis Cluster needs at least one seed URL")
        self.node_id = check_options(
            socket_timeout=socket_timeout,
            reconnect_max=reconnect_max,
            max_pending=max_pending,
            prefix=prefix,
            node_id=node_id,
        )
        if not 1 <= buckets <= 16384:
            raise ConfigError(f"redis cluster buckets must be 1 to 16384, not {buckets!r}")
        if not topology_interval > 0:
            raise ConfigError(f"topology interval must be positive, not {topology_interval!r}")
        try:
            self._buckets = Buckets(prefix.encode("ascii"), buckets)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._pool = connection_factory(urls[0], socket_timeout, redis_options)
        if int(self._pool.connection_kwargs.get("db") or 0) != 0:
            raise ConfigError("a Redis Cluster has database 0 only: drop the /N from the URL")
        self._seeds = [_seed(url) for url in urls]
        self._where = ", ".join(describe_url(url) for url in urls)
        self.prefix = prefix.encode("ascii")
        self.timeout = socket_timeout
        self.reconnect_max = reconnect_max
        self.max_pending = max_pending
        self.channel_filter = ChannelFilter()
        self._ids = MessageIds(self.node_id)
        self._scripts = ScriptCommands(
            KeyScheme(self.prefix, self._buckets), history_meta_ttl, idempotency_window
        )
        self._interval = topology_interval
        #: Each channel's publish command up to the envelope (``shard_publish_head``).
        self._heads: dict[str, bytes] = {}

        self._listener: Listener | None = None
        self._closed = False
        self._slot_map: SlotMap | None = None
        self._shards: dict[Node, _Shard] = {}
        #: The shard serving each bucket (None: unknown yet).
        self._route: list[_Shard | None] = [None] * buckets
        #: Buckets subscribed for patterns, and the patterns that want each.
        self._patterns: dict[int, set[str]] = {}
        #: Channels subscribed exactly, each on its own shard channel.
        self._channels: set[str] = set()
        self._interrupted = False
        self._losses = 0  # of shards closed since, so that the count never drops
        self._dropped = 0
        self._refresh = asyncio.Event()
        self._mapped = asyncio.Event()  # the first topology attempt is over
        self._watcher: asyncio.Task[None] | None = None
        self._complained = False

    # -- the Backplane interface ------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether every master of a complete slot map is up with its subscriptions."""
        return (
            not self._closed
            and self._slot_map is not None
            and bool(self._shards)
            and all(shard.up for shard in self._shards.values())
        )

    async def start(self, listener: Listener) -> None:
        """Map the cluster, connect to every master; return after the first attempts.

        Does not raise when the cluster is unreachable: ``ready`` stays False
        and the topology task keeps trying.
        """
        if self._closed or self._watcher is not None:
            raise RuntimeError("a ClusterBackplane can be started once")
        self._listener = listener
        self._watcher = asyncio.create_task(self._watch(), name="redis-cluster-topology")
        try:
            await self._mapped.wait()
            for shard in list(self._shards.values()):
                await shard.receiver.first_attempt.wait()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop the topology task and every shard; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            await stop_tasks([self._watcher])
        shards, self._shards = list(self._shards.values()), {}
        self._route = [None] * self._buckets.count
        for shard in shards:
            await self._retire(shard)

    async def subscribe(self, pattern: str) -> None:
        """Want ``pattern``: its shard channel(s) are subscribed on their masters (confirmed).

        An exact channel has a shard channel of its own; a pattern subscribes
        the buckets it needs (``cluster_map``).
        """
        buckets = self._buckets.of_pattern(pattern)  # checks the pattern
        if is_exact(pattern):
            self._channels.add(pattern)
            await self._reconcile(buckets[0], pattern)
            return
        self.channel_filter.add(pattern)
        for bucket in buckets:
            self._patterns.setdefault(bucket, set()).add(pattern)
        await asyncio.gather(*(self._reconcile(b) for b in buckets))

    async def unsubscribe(self, pattern: str) -> None:
        """Stop wanting ``pattern``; a shard channel nobody wants any more is unsubscribed."""
        buckets = self._buckets.of_pattern(pattern)
        if is_exact(pattern):
            self._channels.discard(pattern)
            await self._reconcile(buckets[0], pattern)
            return
        for bucket in buckets:
            wanting = self._patterns.get(bucket)
            if wanting is not None:
                wanting.discard(pattern)
                if not wanting:
                    del self._patterns[bucket]
        await asyncio.gather(*(self._reconcile(b) for b in buckets))
        # Only now: a message published before this call may still be on its
        # way through a bucket, and Redis confirms the unsubscribe after it.
        # A subscribe of the same pattern meanwhile keeps it wanted.
        if not any(pattern in self._patterns.get(b, ()) for b in buckets):
            self.channel_filter.discard(pattern)

    def publish(
        self,
        channel: str,
        data: bytes,
        *,
        history: HistoryPolicy | None = None,
        key: str | None = None,
    ) -> asyncio.Future[Published]:
        """Queue ``data`` for ``channel`` on the master of its bucket; see ``RedisBackplane``."""
        bucket = self._buckets.of_channel(channel)
        shard = self._route[bucket]
        if shard is None:
            return _failed("redis cluster backplane: no master known for this channel's slot")
        if history is None and key is None:
            envelope = encode_envelope(self._ids.next(), data)
            try:
                head = self._heads[channel]
            except KeyError:
                if len(self._heads) >= _HEADS_CACHE:
                    self._heads.clear()
                head = self._heads[channel] = shard_publish_head(self._buckets, channel)
            return shard.publisher.enqueue(pack_shard_publish(head, envelope))
        packed = self._scripts.publish(
            channel, self._ids.next(), data, history=history, key=key, master=shard.node.id.encode()
        )
        return shard.publisher.enqueue(packed, parse_publish_reply)

    async def read(
        self,
        channel: str,
        history: HistoryPolicy,
        *,
        after: int | None = None,
        last: int | None = None,
    ) -> HistoryRead:
        """The channel's position and kept messages, from the master of its bucket."""
        shard = self._route[self._buckets.of_channel(channel)]
        if shard is None:
            raise BackplaneError("redis cluster backplane: no master known for this channel")
        packed = self._scripts.read(
            channel, history, after=after, last=last, master=shard.node.id.encode()
        )
        result: HistoryRead = await shard.publisher.enqueue(packed, parse_read_reply)
        return result

    def stats(self) -> dict[str, int]:
        """Counters for ``/metrics``: outages, and foreign payloads dropped."""
        return {
            "connection_losses": self.connection_losses,
            "dropped_messages": self.dropped_messages,
        }

    @property
    def connection_losses(self) -> int:
        """How many times an established link to a master was lost."""
        return self._losses + sum(s.receiver.losses for s in self._shards.values())

    @property
    def dropped_messages(self) -> int:
        """Messages read but not delivered: malformed payload or channel."""
        return self._dropped + sum(s.receiver.dropped for s in self._shards.values())

    # -- for the shards -----------------------------------------------------------

    def connection_to(self, node: Node) -> RedisConnection:
        """A new, unconnected connection to ``node`` with the first URL's options."""
        kwargs = dict(self._pool.connection_kwargs)
        kwargs.update(host=node.host, port=node.port)
        return cast(RedisConnection, self._pool.connection_class(**kwargs))

    def refresh(self) -> None:
        """Look at the topology now (a link failed, or a slot moved)."""
        self._refresh.set()

    def shard_lost(self) -> None:
        """A shard that was up is down: messages of its buckets may be lost from now on."""
        self.refresh()
        self._interrupt()

    def _interrupt(self) -> None:
        """Messages may be missed from now on: tell delivery, once per interruption."""
        if not self._interrupted and self._listener is not None and not self._closed:
            self._interrupted = True
            self._listener.link_lost()

    def shard_up(self) -> None:
        """A shard is up; once all are, with every subscription placed, an interruption is over."""
        if (
            self._interrupted
            and self.ready
            and self._listener is not None
            and not any(shard.receiver.unplaced for shard in self._shards.values())
        ):
            self._interrupted = False
            logger.info("redis cluster backplane: every master is up again")
            self._listener.link_restored()

    @property
    def buckets(self) -> Buckets:
        """How channels map to shard channels (for tools and tests)."""
        return self._buckets

    # -- topology -----------------------------------------------------------------

    async def _watch(self) -> None:
        """The topology task: map the slots, keep one shard per master."""
        try:
            while True:
                slot_map = await self._fetch()
                if slot_map is not None:
                    await self._apply(slot_map)
                    await self._place_refused()
                self._mapped.set()
                settled = self.ready and not self._interrupted
                interval = self._interval if settled else _URGENT_INTERVAL
                try:
                    async with asyncio.timeout(interval):
                        await self._refresh.wait()
                except TimeoutError:
                    pass
                self._refresh.clear()
        finally:
            self._mapped.set()  # never leave start() waiting

    async def _fetch(self) -> SlotMap | None:
        """``CLUSTER SLOTS`` from the first node that answers with a complete map."""
        known = self._slot_map.nodes() if self._slot_map is not None else []
        candidates = list(dict.fromkeys([*known, *self._seeds]))
        errors = []
        for node in candidates:
            conn = self.connection_to(node)
            try:
                async with asyncio.timeout(self.timeout * 2):
                    await conn.connect()
                    await conn.send_command("CLUSTER", "SLOTS", check_health=False)
                    reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
                slot_map = parse_cluster_slots(reply, node)
            except (*LINK_ERRORS, ValueError) as exc:
                errors.append(f"{node.host}:{node.port}: {describe_error(exc)}")
                continue
            finally:
                await disconnect_quietly(conn)
            if slot_map.complete():
                self._complained = False
                return slot_map
            errors.append(f"{node.host}:{node.port}: slot map incomplete")
        if not self._complained:
            self._complained = True
            logger.warning(
                "redis cluster backplane: cannot map the cluster at %s: %s (retrying)",
                self._where,
                "; ".join(errors) or "no node",
            )
        return None

    async def _apply(self, slot_map: SlotMap) -> None:
        """Keep one shard per master of ``slot_map``; move the interest whose slot moved.

        A node that is no longer a master (a failover) loses its shard and its
        successor gets a new one. A master whose slots changed (a reshard)
        keeps its links: only the shard channels whose slot moved change
        hands, and only then may messages have been missed meanwhile, so only
        then is delivery told (``link_lost``, then ``link_restored`` once they
        are subscribed where they now live).
        """
        masters = slot_map.masters()
        self._slot_map = slot_map
        retired = [shard for node, shard in self._shards.items() if node not in masters]
        for shard in retired:
            del self._shards[shard.node]
        added: list[_Shard] = []
        resharded = False
        for node, ranges in masters.items():
            kept = self._shards.get(node)
            if kept is None:
                kept = self._shards[node] = _Shard(self, node, ranges)
                added.append(kept)
            elif kept.ranges != ranges:
                kept.ranges = ranges
                resharded = True
        if not retired and not added and not resharded:
            return  # the usual pass: routes and interest are as they were
        self._route = [
            next((s for s in self._shards.values() if s.serves(slot)), None)
            for slot in self._buckets.slots
        ]
        moved = self._place_interest()
        if not retired and not added and not moved:
            return
        logger.info(
            "redis cluster backplane: %d masters (%s)%s",
            len(masters),
            ", ".join(f"{n.host}:{n.port}" for n in masters),
            f"; {len(moved)} shard channel subscriptions moved" if moved else "",
        )
        if moved:
            self._interrupt()  # what is published on them meanwhile may be missed
        for shard in retired:
            if shard.up:
                self.shard_lost()  # its buckets move: what is published meanwhile may be missed
            await self._retire(shard)
        assert self._listener is not None
        for shard in added:
            shard.start(self._listener)
        if moved:
            # Gone from a master: it drops them by itself (sends ``sunsubscribe``).
            # New on one: subscribed there, confirmed.
            for shard, sub in moved:
                if sub not in shard.interest:
                    shard.receiver.forget(sub)
            await asyncio.gather(
                *(shard.receiver.reconcile(sub) for shard, sub in moved if sub in shard.interest)
            )

    async def _place_refused(self) -> None:
        """Subscribe again what a master refused while its slot was moving; end the interruption."""
        shards = [shard for shard in self._shards.values() if shard.receiver.unplaced]
        if shards:
            self._interrupt()  # messages may be missed until they are placed
            await asyncio.gather(*(shard.receiver.retry_unplaced() for shard in shards))
        self.shard_up()

    def _place_interest(self) -> list[tuple[_Shard, RedisSubscription]]:
        """Give each shard the wanted shard channels of the slots it now serves.

        Returns the subscriptions that changed on shards already running (each
        to be subscribed or unsubscribed there); a new shard subscribes its
        interest when it connects.
        """
        wanted: dict[_Shard, set[RedisSubscription]] = {s: set() for s in self._shards.values()}
        for bucket in self._patterns:
            owner = self._route[bucket]
            if owner is not None:
                wanted[owner].add(RedisSubscription(False, self._buckets.names[bucket]))
        for channel in self._channels:
            owner = self._route[self._buckets.of_channel(channel)]
            if owner is not None:
                wanted[owner].add(RedisSubscription(False, self._buckets.channel_name(channel)))
        moved = []
        for shard, subs in wanted.items():
            if shard.interest == subs:
                continue
            if shard.tasks:
                moved += [(shard, sub) for sub in shard.interest ^ subs]
            shard.interest.clear()  # in place: the shard's receiver holds this set
            shard.interest.update(subs)
        return moved

    async def _retire(self, shard: _Shard) -> None:
        self._losses += shard.receiver.losses
        self._dropped += shard.receiver.dropped
        await shard.close()

    async def _reconcile(self, bucket: int, channel: str | None = None) -> None:
        """Bring one shard channel on its master in line with the interest.

        ``channel``'s own shard channel, or with ``None`` the bucket's.
        """
        shard = self._route[bucket]
        if shard is None:
            return  # recorded above; the shard that gets this bucket subscribes it
        if channel is None:
            sub = RedisSubscription(False, self._buckets.names[bucket])
            wanted = bucket in self._patterns
        else:
            sub = RedisSubscription(False, self._buckets.channel_name(channel))
            wanted = channel in self._channels
        if wanted:
            shard.interest.add(sub)
        else:
            shard.interest.discard(sub)
        await shard.receiver.reconcile(sub)


def _seed(url: str) -> Node:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"a Redis Cluster URL is redis:// or rediss://, not {parts.scheme}://")
    try:
        port = parts.port or 6379
    except ValueError as exc:
        raise ConfigError(f"invalid Redis URL: {exc}") from None
    return Node(parts.hostname or "127.0.0.1", port)


def _failed(reason: str) -> asyncio.Future[Published]:
    future: asyncio.Future[Published] = asyncio.get_running_loop().create_future()
    future.set_exception(BackplaneError(reason))
    return future


if TYPE_CHECKING:

    def _implements_backplane(backplane: ClusterBackplane) -> Backplane:
        return backplane  # mypy checks ClusterBackplane against the Protocol here
