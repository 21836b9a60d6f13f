"""One contract, four backplanes: memory, Redis on fakeredis, a real Redis (REDIS_URL) and
a real Redis Cluster (REDIS_CLUSTER_URL, sharded pub/sub: ``ClusterBackplane``).

The contract is the module docstring of ``broker/backplane/__init__.py``. The
memory backplane ignores interest by design (the hub filters), so cases about
*not* receiving something run on the two Redis backplanes only (``redis_env``);
everything else runs on all three (``env``). The real-Redis case fails when
Redis is unreachable and ``CI`` is set, and is skipped otherwise; so does the
cluster case (``.ci/redis-cluster start`` runs one on 127.0.0.1:7101-7106).

Absence is checked without sleeping: publish the unwanted message, then a
sentinel on a subscribed channel through the same publisher; Redis handles one
connection's commands in order, so once the sentinel arrives the unwanted one
would have arrived before it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from fakeredis import FakeServer
from fakeredis.aioredis import FakeAsyncRedisConnection, FakeRedis
from redis.asyncio.cluster import RedisCluster

from broker.backplane import Published
from broker.backplane.cluster_map import Buckets
from broker.backplane.memory import MemoryBackplane
from broker.backplane.redis import RedisBackplane
from broker.backplane.redis_cluster import ClusterBackplane
from broker.backplane.redis_scripts import SHARD_PUBLISH_SCRIPT, KeyScheme
from broker.exceptions import BackplaneError
from broker.history import HistoryPolicy
from broker.position import Position
from tests.backplane_support import Inbox, our_tasks, real_cluster_url, real_redis_url

CLUSTER = pytest.param("cluster", marks=pytest.mark.redis_cluster)
ALL = ["memory", "fakeredis", pytest.param("redis", marks=pytest.mark.redis), CLUSTER]
REDIS_ONLY = ["fakeredis", pytest.param("redis", marks=pytest.mark.redis), CLUSTER]


@dataclass
class Env:
    """Makes backplanes of one kind sharing one server and one unique prefix."""

    kind: str
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:12]}.")
    url: str = ""
    server: FakeServer | None = None
    created: list[Any] = field(default_factory=list)
    raw: Any = None  # a plain redis.asyncio client on the same server, to act as an outsider

    def make(self, **options: Any) -> Any:
        """A new backplane; ``options`` go to its constructor (both take the history ones)."""
        bp: Any
        if self.kind == "memory":
            bp = MemoryBackplane(**options)
        elif self.kind == "fakeredis":
            fake = {"connection_class": FakeAsyncRedisConnection, "server": self.server}
            bp = RedisBackplane(
                "redis://fakeredis", prefix=self.prefix, redis_options=fake, **options
            )
        elif self.kind == "cluster":
            bp = ClusterBackplane([self.url], prefix=self.prefix, **options)
        else:
            bp = RedisBackplane(self.url, prefix=self.prefix, **options)
        self.created.append(bp)
        return bp

    async def outside(self, channel: str, payload: bytes) -> None:
        """Publish as another program would: PUBLISH, or on a cluster the shard script."""
        if self.kind != "cluster":
            await self.raw.publish(f"{self.prefix}{channel}", payload)
            return
        # As docs/redis.md tells outside programs: the script, routed by its keys.
        buckets = Buckets(self.prefix.encode(), 64)
        own, bucket = buckets.channel_name(channel), buckets.names[buckets.of_channel(channel)]
        await self.raw.eval(SHARD_PUBLISH_SCRIPT, 2, own, bucket, payload)

    async def started(self, **options: Any) -> tuple[Any, Inbox]:
        bp = self.make(**options)
        inbox = Inbox()
        await bp.start(inbox)
        assert bp.ready
        return bp, inbox

    async def close(self) -> None:
        for bp in self.created:
            await bp.close()
        if self.raw is not None:
            await self.raw.aclose()


async def _env(kind: str) -> Env:
    env = Env(kind)
    if kind == "fakeredis":
        env.server = FakeServer()
        env.raw = FakeRedis(server=env.server)
    elif kind == "redis":
        env.url = real_redis_url()
        env.raw = aioredis.Redis.from_url(env.url)
    elif kind == "cluster":
        env.url = real_cluster_url()
        env.raw = RedisCluster.from_url(env.url)
        await env.raw.initialize()
    return env


@pytest.fixture(params=ALL)
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    environment = await _env(request.param)
    yield environment
    await environment.close()


@pytest.fixture(params=REDIS_ONLY)
async def redis_env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    environment = await _env(request.param)
    yield environment
    await environment.close()


# -- every backplane ---------------------------------------------------------------


async def test_round_trip(env: Env) -> None:
    bp, inbox = await env.started()
    await bp.subscribe("sensors.kitchen")
    assert await bp.publish("sensors.kitchen", b'{"t":21.5}') == Published()
    await inbox.wait_message("sensors.kitchen", b'{"t":21.5}')


async def test_order_of_many_publishes_is_kept(env: Env) -> None:
    bp, inbox = await env.started()
    await bp.subscribe("order.a")
    await bp.subscribe("order.b")
    sent = [(f"order.{'ab'[i % 2]}", b"%d" % i) for i in range(2000)]
    futures = [bp.publish(channel, data) for channel, data in sent]
    await asyncio.gather(*futures)
    await inbox.wait_count(len(sent))
    assert inbox.messages == sent


async def test_pattern_subscription_delivers_matching_channels(env: Env) -> None:
    bp, inbox = await env.started()
    await bp.subscribe("sensors.*")
    await bp.subscribe("logs.>")
    wanted = [("sensors.kitchen", b"1"), ("logs.app", b"2"), ("logs.app.db.slow", b"3")]
    await asyncio.gather(*(bp.publish(channel, data) for channel, data in wanted))
    await inbox.wait_for(lambda messages: all(m in messages for m in wanted))


async def test_exact_and_two_patterns_deliver_once(env: Env) -> None:
    bp, inbox = await env.started()
    for pattern in ("s.k", "s.*", "s.>", "*.k"):
        await bp.subscribe(pattern)
    await bp.publish("s.k", b'"once"')
    await bp.publish("s.k", b'"once"')  # equal content published twice: twice, not four times
    await bp.publish("s.end", b'"sentinel"')
    await inbox.wait_message("s.end", b'"sentinel"')
    assert inbox.on("s.k") == [b'"once"', b'"once"']


async def test_publish_future_resolves(env: Env) -> None:
    bp, _ = await env.started()
    future = bp.publish("nobody.listens", b"null")
    assert isinstance(future, asyncio.Future)
    async with asyncio.timeout(2):
        assert await future == Published()


async def test_close_is_idempotent_and_leaves_no_tasks(env: Env) -> None:
    before = set(asyncio.all_tasks())
    bp, _ = await env.started()
    await bp.subscribe("a.b")
    await bp.publish("a.b", b"1")
    await bp.close()
    await bp.close()
    assert not bp.ready
    assert our_tasks(before) == set()
    with pytest.raises(BackplaneError):
        await bp.publish("a.b", b"2")


async def test_ready_follows_start_and_close(env: Env) -> None:
    bp = env.make()
    assert not bp.ready
    await bp.start(Inbox())
    assert bp.ready
    await bp.close()
    assert not bp.ready


async def test_subscribe_before_start_is_honoured(env: Env) -> None:
    bp = env.make()
    await bp.subscribe("early.bird")
    inbox = Inbox()
    await bp.start(inbox)
    await bp.publish("early.bird", b"1")
    await inbox.wait_message("early.bird", b"1")


# -- Redis backplanes: interest, other processes, outsiders ------------------------


async def test_no_delivery_without_subscription(redis_env: Env) -> None:
    bp, inbox = await redis_env.started()
    await bp.subscribe("wanted")
    await bp.publish("unwanted", b"1")
    await bp.publish("wanted.not.a.prefix", b"2")
    await bp.publish("wanted", b"3")
    await inbox.wait_message("wanted", b"3")
    assert inbox.messages == [("wanted", b"3")]


async def test_unsubscribe_stops_traffic(redis_env: Env) -> None:
    bp, inbox = await redis_env.started()
    await bp.subscribe("news.sport")
    await bp.subscribe("news.*")
    await bp.subscribe("sentinel")
    await bp.publish("news.sport", b"1")
    await inbox.wait_message("news.sport", b"1")
    await bp.unsubscribe("news.sport")
    await bp.publish("news.sport", b"2")  # the pattern still wants it
    await bp.unsubscribe("news.*")
    await bp.publish("news.sport", b"3")
    await bp.publish("sentinel", b"4")
    await inbox.wait_message("sentinel", b"4")
    assert inbox.on("news.sport") == [b"1", b"2"]


async def test_another_process_receives(redis_env: Env) -> None:
    publisher, _ = await redis_env.started()
    subscriber, inbox = await redis_env.started()
    await subscriber.subscribe("chat.>")
    await publisher.publish("chat.room1", b'{"text":"hi"}')
    await inbox.wait_message("chat.room1", b'{"text":"hi"}')


async def test_racing_subscribe_and_unsubscribe_end_in_last_state(redis_env: Env) -> None:
    bp, inbox = await redis_env.started()
    calls = [bp.subscribe, bp.unsubscribe] * 5 + [bp.subscribe]
    await asyncio.gather(*(call("race.*") for call in calls))
    await bp.publish("race.on", b"1")
    await inbox.wait_message("race.on", b"1")
    calls = [bp.unsubscribe, bp.subscribe] * 5 + [bp.unsubscribe]
    await asyncio.gather(*(call("race.*") for call in calls))
    await bp.subscribe("sentinel")
    await bp.publish("race.off", b"2")
    await bp.publish("sentinel", b"3")
    await inbox.wait_message("sentinel", b"3")
    assert inbox.on("race.off") == []


async def test_channel_name_on_redis_is_prefixed_and_enveloped(redis_env: Env) -> None:
    bp, _ = await redis_env.started()
    client = redis_env.raw
    kind, wanted = "message", 1
    if redis_env.kind == "cluster":
        # The channel's own shard channel, then its bucket's, on the master of their slot.
        buckets = Buckets(redis_env.prefix.encode(), 64)
        own = buckets.channel_name("sensors.kitchen")
        shard = buckets.names[buckets.of_channel("sensors.kitchen")]
        node = redis_env.raw.get_node_from_key(shard)
        client = aioredis.Redis(host=node.host, port=node.port)
        pubsub = client.pubsub()
        await pubsub.ssubscribe(own, shard)
        kind, wanted = "smessage", 2
    else:
        pubsub = client.pubsub()
        await pubsub.subscribe(f"{redis_env.prefix}sensors.kitchen")
    await bp.publish("sensors.kitchen", b'{"t":21.5}')
    messages = []
    try:
        async with asyncio.timeout(3):
            while len(messages) < wanted:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == kind:
                    messages.append(message)
    finally:
        await pubsub.aclose()
        if client is not redis_env.raw:
            await client.aclose()
    payload = messages[0]["data"]
    if redis_env.kind == "cluster":
        assert [m["channel"] for m in messages] == [own, shard]
        assert messages[1]["data"] == b"sensors.kitchen " + payload
    header, _, data = payload.partition(b" ")
    assert header.startswith(b"@" + bp.node_id.encode())
    assert data == b'{"t":21.5}'


async def test_outside_publishers_with_and_without_id(redis_env: Env) -> None:
    bp, inbox = await redis_env.started()
    await bp.subscribe("orders.new")
    await bp.subscribe("orders.*")
    channel = "orders.new"
    await redis_env.outside(channel, b'{"n":1}')
    await redis_env.outside(channel, b'{"n":1}')  # same bytes again: a second message
    await redis_env.outside(channel, b'@billing-7 {"n":2}')
    await inbox.wait_count(3)
    await bp.publish("orders.new", b'"sentinel"')
    await inbox.wait_message("orders.new", b'"sentinel"')
    assert inbox.on("orders.new") == [b'{"n":1}', b'{"n":1}', b'{"n":2}', b'"sentinel"']


async def test_garbage_is_dropped_and_reading_goes_on(redis_env: Env) -> None:
    bp, inbox = await redis_env.started()
    await bp.subscribe("in.>")
    garbage = [
        ("in.a", b"not json"),
        ("in.a", b""),
        ("in.a", b"@ {}"),  # empty id
        ("in.a", b"@" + b"x" * 100),  # no end of id
        ("in.a", b'{"a":NaN}'),
        ("in.a", b"\xff\xfe"),
        ("in..a", b"1"),  # matches the glob, not a channel
        ("in.\xc3\xa9", b"1"),
    ]
    for channel, payload in garbage:
        await redis_env.outside(channel, payload)
    await redis_env.outside("in.ok", b"[1,2]")
    await inbox.wait_message("in.ok", b"[1,2]")
    assert inbox.messages == [("in.ok", b"[1,2]")]
    assert bp.dropped_messages == len(garbage)
    assert bp.ready


async def test_subscribe_is_confirmed_before_it_returns(redis_env: Env) -> None:
    subscriber, inbox = await redis_env.started()
    await subscriber.subscribe("fresh")
    # An outsider's publish right after subscribe() returned must be received.
    await redis_env.outside("fresh", b"1")
    await inbox.wait_message("fresh", b"1")


async def test_publish_fails_fast_when_not_started(redis_env: Env) -> None:
    bp = redis_env.make()
    with pytest.raises(BackplaneError):
        await bp.publish("a", b"1")


async def test_too_many_queued_publishes_fail_at_once(redis_env: Env) -> None:
    bp = redis_env.make(max_pending=10)
    await bp.start(Inbox())
    futures = [bp.publish("q", b"%d" % i) for i in range(11)]  # the writer has not run yet
    assert futures[10].done()
    with pytest.raises(BackplaneError, match="too many"):
        futures[10].result()
    await asyncio.gather(*futures[:10])


# -- history, offsets and keys (every backplane) -------------------------------------

HISTORY = HistoryPolicy(size=5, ttl=60.0)


async def test_offsets_start_at_1_and_come_with_each_delivery(env: Env) -> None:
    bp, inbox = await env.started()
    await bp.subscribe("h.a")
    results = [await bp.publish("h.a", b"%d" % i, history=HISTORY) for i in range(3)]
    positions = [r.position for r in results]
    assert [p.offset for p in positions] == [1, 2, 3]
    assert len({p.epoch for p in positions}) == 1
    await inbox.wait_count(3)
    assert inbox.positions == positions
    assert [data for _, data in inbox.messages] == [b"0", b"1", b"2"]


async def test_history_reads_after_an_offset_or_the_last_n(env: Env) -> None:
    bp, _ = await env.started()
    empty = await bp.read("h.r", HISTORY)
    assert (empty.top, empty.entries, empty.complete) == (0, (), True) and empty.epoch
    for i in range(1, 9):
        await bp.publish("h.r", b"%d" % i, history=HISTORY)
    read = await bp.read("h.r", HISTORY, after=5)
    assert (read.top, read.epoch, read.complete) == (8, empty.epoch, True)
    assert read.entries == ((6, b"6"), (7, b"7"), (8, b"8"))
    assert (await bp.read("h.r", HISTORY, after=8)).entries == ()
    # Offsets 1-3 were trimmed (size 5): never a partial answer.
    trimmed = await bp.read("h.r", HISTORY, after=1)
    assert not trimmed.complete and trimmed.entries == ()
    assert [o for o, _ in (await bp.read("h.r", HISTORY, last=2)).entries] == [7, 8]


async def test_a_channel_without_history_has_no_positions(env: Env) -> None:
    bp, inbox = await env.started()
    await bp.subscribe("plain")
    assert await bp.publish("plain", b"1") == Published()
    await inbox.wait_count(1)
    assert inbox.positions == [None]


async def test_a_key_makes_a_retry_a_duplicate_with_the_first_position(env: Env) -> None:
    bp, inbox = await env.started()
    await bp.subscribe("h.k")
    await bp.subscribe("p.k")
    first = await bp.publish("h.k", b"1", history=HISTORY, key="order-1")
    again = await bp.publish("h.k", b"1", history=HISTORY, key="order-1")
    assert again == Published(first.position, duplicate=True)
    assert await bp.publish("p.k", b"2", key="order-1") == Published()  # another channel
    assert await bp.publish("p.k", b"2", key="order-1") == Published(None, duplicate=True)
    await bp.publish("h.k", b"end", history=HISTORY)
    await inbox.wait_message("h.k", b"end")
    assert [data for _, data in inbox.messages] == [b"1", b"2", b"end"]


async def test_keys_of_channels_with_colons_never_collide(env: Env) -> None:
    # Channel "k.c" with key "a:b" and channel "k.c:a" with key "b" are two messages.
    bp, inbox = await env.started()
    await bp.subscribe("k.>")
    assert await bp.publish("k.c", b"1", key="a:b") == Published()
    assert await bp.publish("k.c:a", b"2", key="b") == Published()
    assert await bp.publish("k.c", b"3", key="a:b") == Published(None, duplicate=True)
    await inbox.wait_count(2)
    assert sorted(inbox.messages) == [("k.c", b"1"), ("k.c:a", b"2")]


async def test_a_key_is_remembered_for_the_whole_window_and_no_longer(env: Env) -> None:
    bp, _ = await env.started(idempotency_window=1.9)  # not a whole number of seconds
    assert await bp.publish("w.a", b"1", key="k") == Published()
    await asyncio.sleep(1.2)  # past the whole second a rounding down would keep
    assert await bp.publish("w.a", b"1", key="k") == Published(None, duplicate=True)
    await asyncio.sleep(1.1)
    assert await bp.publish("w.a", b"2", key="k") == Published()  # the window is over


async def test_reading_a_quiet_channel_leaves_a_short_lived_position(redis_env: Env) -> None:
    # A subscribe reads the position of a channel nobody published to: the epoch it
    # makes lives history_ttl, not history_meta_ttl (a day), so subscribing to many
    # quiet channels leaves nothing behind for long.
    bp, _ = await redis_env.started()
    read = await bp.read("h.quiet", HISTORY)
    assert read.top == 0
    prefix = redis_env.prefix.encode()
    buckets = Buckets(prefix, 64) if redis_env.kind == "cluster" else None
    meta = KeyScheme(prefix, buckets).meta(b"h.quiet")
    assert 0 < await redis_env.raw.ttl(meta) <= HISTORY.ttl + 1
    again = await bp.read("h.quiet", HISTORY)
    assert again.epoch == read.epoch  # the first publish will use it too
    published = await bp.publish("h.quiet", b"1", history=HISTORY)
    assert published.position == Position(1, read.epoch)
    assert await redis_env.raw.ttl(meta) > HISTORY.ttl + 1  # published: kept for the day


async def test_concurrent_publishers_never_share_an_offset(redis_env: Env) -> None:
    a, _ = await redis_env.started()
    b, inbox = await redis_env.started()
    await b.subscribe("h.c")
    results = await asyncio.gather(
        *(bp.publish("h.c", b"%d" % i, history=HISTORY) for i in range(100) for bp in (a, b))
    )
    offsets = sorted(r.position.offset for r in results)
    assert offsets == list(range(1, 201))
    await inbox.wait_count(200)
    assert [p.offset for p in inbox.positions] == list(range(1, 201))  # in offset order


async def test_a_flushed_script_cache_is_loaded_again_and_nothing_is_refused(
    redis_env: Env,
) -> None:
    bp, inbox = await redis_env.started()
    await bp.subscribe("h.s")
    first = await bp.publish("h.s", b"1", history=HISTORY)
    if redis_env.kind == "cluster":
        await redis_env.raw.execute_command("SCRIPT FLUSH", target_nodes=RedisCluster.PRIMARIES)
    else:
        await redis_env.raw.script_flush()
    after = await asyncio.gather(
        bp.publish("h.s", b"2", history=HISTORY), bp.publish("h.s", b"3", key="k-flush")
    )
    assert first.position is not None and first.position.offset == 1
    assert after[0].position is not None and after[0].position.offset == 2
    await inbox.wait_message("h.s", b"3")
    assert inbox.on("h.s") == [b"1", b"2", b"3"]


async def test_an_epoch_changes_when_history_is_lost(redis_env: Env) -> None:
    bp, _ = await redis_env.started()
    first = (await bp.publish("h.e", b"1", history=HISTORY)).position
    keys = [key async for key in redis_env.raw.scan_iter(f"{redis_env.prefix}h:*")]
    for key in keys:  # one by one: on a cluster they need not share a slot
        await redis_env.raw.delete(key)  # as a flushed or restarted Redis would
    second = (await bp.publish("h.e", b"2", history=HISTORY)).position
    assert second.offset == 1 and second.epoch != first.epoch
