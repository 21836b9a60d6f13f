"""One contract, three backplanes: memory, Redis on fakeredis, and a real Redis (REDIS_URL).

The contract is the module docstring of ``broker/backplane/__init__.py``. The
memory backplane ignores interest by design (the hub filters), so cases about
*not* receiving something run on the two Redis backplanes only (``redis_env``);
everything else runs on all three (``env``). The real-Redis case fails when
Redis is unreachable and ``CI`` is set, and is skipped otherwise.

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

from broker.backplane.memory import MemoryBackplane
from broker.backplane.redis import RedisBackplane
from broker.exceptions import BackplaneError
from tests.backplane_support import Inbox, our_tasks, real_redis_url

ALL = ["memory", "fakeredis", pytest.param("redis", marks=pytest.mark.redis)]
REDIS_ONLY = ["fakeredis", pytest.param("redis", marks=pytest.mark.redis)]


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
        """A new backplane; ``options`` go to ``RedisBackplane`` (memory takes none)."""
        bp: Any
        if self.kind == "memory":
            bp = MemoryBackplane()
        elif self.kind == "fakeredis":
            fake = {"connection_class": FakeAsyncRedisConnection, "server": self.server}
            bp = RedisBackplane(
                "redis://fakeredis", prefix=self.prefix, redis_options=fake, **options
            )
        else:
            bp = RedisBackplane(self.url, prefix=self.prefix, **options)
        self.created.append(bp)
        return bp

    async def started(self) -> tuple[Any, Inbox]:
        bp = self.make()
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
    assert await bp.publish("sensors.kitchen", b'{"t":21.5}') is None
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
        assert await future is None


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
    pubsub = redis_env.raw.pubsub()
    await pubsub.subscribe(f"{redis_env.prefix}sensors.kitchen")
    await bp.publish("sensors.kitchen", b'{"t":21.5}')
    try:
        async with asyncio.timeout(3):
            async for message in pubsub.listen():
                if message["type"] == "message":
                    break
    finally:
        await pubsub.aclose()
    header, _, data = message["data"].partition(b" ")
    assert header.startswith(b"@" + bp.node_id.encode())
    assert data == b'{"t":21.5}'


async def test_outside_publishers_with_and_without_id(redis_env: Env) -> None:
    bp, inbox = await redis_env.started()
    await bp.subscribe("orders.new")
    await bp.subscribe("orders.*")
    channel = f"{redis_env.prefix}orders.new"
    await redis_env.raw.publish(channel, b'{"n":1}')
    await redis_env.raw.publish(channel, b'{"n":1}')  # same bytes again: a second message
    await redis_env.raw.publish(channel, b'@billing-7 {"n":2}')
    await inbox.wait_count(3)
    await bp.publish("orders.new", b'"sentinel"')
    await inbox.wait_message("orders.new", b'"sentinel"')
    assert inbox.on("orders.new") == [b'{"n":1}', b'{"n":1}', b'{"n":2}', b'"sentinel"']


async def test_garbage_is_dropped_and_reading_goes_on(redis_env: Env) -> None:
    bp, inbox = await redis_env.started()
    await bp.subscribe("in.>")
    prefix = redis_env.prefix
    garbage = [
        (f"{prefix}in.a", b"not json"),
        (f"{prefix}in.a", b""),
        (f"{prefix}in.a", b"@ {}"),  # empty id
        (f"{prefix}in.a", b"@" + b"x" * 100),  # no end of id
        (f"{prefix}in.a", b'{"a":NaN}'),
        (f"{prefix}in.a", b"\xff\xfe"),
        (f"{prefix}in..a", b"1"),  # matches the glob, not a channel
        (f"{prefix}in.\xc3\xa9", b"1"),
    ]
    for channel, payload in garbage:
        await redis_env.raw.publish(channel, payload)
    await redis_env.raw.publish(f"{prefix}in.ok", b"[1,2]")
    await inbox.wait_message("in.ok", b"[1,2]")
    assert inbox.messages == [("in.ok", b"[1,2]")]
    assert bp.dropped_messages == len(garbage)
    assert bp.ready


async def test_subscribe_is_confirmed_before_it_returns(redis_env: Env) -> None:
    subscriber, inbox = await redis_env.started()
    await subscriber.subscribe("fresh")
    # An outsider's publish right after subscribe() returned must be received.
    await redis_env.raw.publish(f"{redis_env.prefix}fresh", b"1")
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
