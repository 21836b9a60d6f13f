"""The Redis Cluster backplane: its pure mapping, and masters killed on a real cluster.

The contract suite (``test_backplane_contract.py``) and the scale-out test
(``test_scaleout.py``) run on the shared cluster at ``REDIS_CLUSTER_URL``.
The fault tests here start a cluster of their own (``LocalCluster``: three
masters, three replicas, ``cluster-node-timeout`` 1 s) and SIGKILL the master
that serves the channels under test, so that its replica is promoted:

* the backplane reports ``link_lost`` once and ``link_restored`` once, and
  publishes to the promoted master;
* two broker processes under load, a master killed twice (the second time the
  replica promoted by the first failover): ``/readyz`` turns 503 and back to
  200, no acknowledged message is lost silently on a channel with history or
  without, and the counts are printed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker import config
from broker.app import make_backplane
from broker.backplane.cluster_map import (
    Buckets,
    ChannelFilter,
    Node,
    is_exact,
    key_slot,
    parse_cluster_slots,
    shard_target,
    split_head,
)
from broker.backplane.redis_cluster import ClusterBackplane
from broker.backplane.redis_scripts import (
    SHARD_PUBLISH_SCRIPT,
    SHARD_PUBLISH_SHA,
    KeyScheme,
    pack,
    pack_shard_publish,
    shard_publish_head,
)
from broker.exceptions import BackplaneError, BadChannel, ConfigError
from broker.history import HistoryPolicy
from tests.backplane_support import (
    REPO,
    Inbox,
    LocalCluster,
    TlsCluster,
    eventually,
    free_port,
    our_tasks,
    real_cluster_url,
)
from tests.brokerproc import BrokerProcess
from tests.test_delivery_faults import Publisher, Subscriber, caught_up, check, tasks, ws
from tests.test_deploy import dockerfile_env
from tests.test_scaleout import new_prefix, redis_broker, running, until_status

# -- the mapping (pure) ------------------------------------------------------------------


def test_key_slot_matches_redis() -> None:
    # Values from the Redis Cluster specification and CLUSTER KEYSLOT.
    assert key_slot(b"foo") == 12182
    assert key_slot(b"123456789") == 0x31C3 % 16384
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers")
    assert key_slot(b"foo{}{bar}") == key_slot(b"foo{}{bar}")  # an empty tag: the whole key
    assert key_slot(b"foo{{bar}}zap") == key_slot(b"{bar")


def test_a_channel_and_its_keys_share_the_slot_of_its_bucket() -> None:
    buckets = Buckets(b"broker.", 64)
    bucket = buckets.of_channel("sensors.kitchen")
    assert bucket == zlib.crc32(b"sensors") % 64
    assert buckets.names[bucket] == b"broker.{b%d}" % bucket
    assert buckets.slots[bucket] == key_slot(b"broker.h:m:" + buckets.tag("sensors.kitchen"))
    assert buckets.of_channel("sensors.hall.temp") == bucket  # same first token


def test_every_key_of_a_channel_is_in_the_slot_of_its_shard_channel() -> None:
    # The publish script touches all of them: one slot, or Redis refuses it (CROSSSLOT).
    scheme = KeyScheme(b"broker.", Buckets(b"broker.", 64))
    for channel in (b"sensors.kitchen", b"a", b"x.y.z", b"$canary.n1"):
        slot = key_slot(scheme.pubsub(channel))
        names = [scheme.meta(channel), scheme.stream(channel), scheme.key(channel, b"k{1}")]
        assert {key_slot(name) for name in names} == {slot}, channel
        assert key_slot(scheme.channel_pubsub(channel)) == slot
        assert scheme.publish == b"SPUBLISH" and scheme.head(channel) == channel + b" "
    single = KeyScheme(b"broker.")
    assert single.meta(b"a.b") == b"broker.h:m:a.b" and single.head(b"a.b") == b""
    assert single.channel_pubsub(b"a.b") == b""


def test_patterns_need_one_bucket_or_all() -> None:
    buckets = Buckets(b"p.", 16)
    assert buckets.of_pattern("sensors.>") == (buckets.of_channel("sensors"),)
    assert buckets.of_pattern("sensors.*.temp") == (buckets.of_channel("sensors"),)
    assert list(buckets.of_pattern("*.temp")) == list(range(16))
    assert list(buckets.of_pattern(">")) == list(range(16))
    assert buckets.of_pattern("$canary.n1") == (buckets.of_channel("$canary"),)
    with pytest.raises(BadChannel):
        buckets.of_pattern("a..b")
    with pytest.raises(ValueError, match="hash tags"):
        Buckets(b"a{b}.", 16)


def test_the_filter_keeps_what_a_pattern_matches() -> None:
    wanted = ChannelFilter()
    assert not wanted("a.b")
    wanted.add("s.*")
    assert wanted("s.k") and not wanted("s.k.l") and not wanted("a.b")
    wanted.add("s.>")
    assert wanted("s.k.l")  # the cached "no" was forgotten
    wanted.discard("s.*")
    assert wanted("s.k.l") and wanted("s.k")
    wanted.discard("s.>")
    assert not wanted("s.k.l") and not wanted("s.k")


def test_exact_subscriptions_and_patterns_are_told_apart() -> None:
    assert is_exact("a.b") and is_exact("a") and is_exact("$canary.n1")
    assert not is_exact("a.*") and not is_exact("a.>") and not is_exact(">")


def test_each_channel_has_a_shard_channel_of_its_own_in_its_bucket() -> None:
    buckets = Buckets(b"p.", 16)
    bucket = buckets.of_channel("s.k")
    assert buckets.channel_name("s.k") == b"p.{b%d}s.k" % bucket
    assert key_slot(buckets.channel_name("s.k")) == buckets.slots[bucket]
    assert shard_target(b"p.", buckets.channel_name("s.k")) == b"s.k"
    assert shard_target(b"p.", buckets.names[bucket]) is None  # the bucket
    for foreign in (b"q.{b1}s.k", b"p.s.k", b"p.{b1"):
        with pytest.raises(ValueError):
            shard_target(b"p.", foreign)


def test_the_script_outside_programs_are_told_to_run_is_the_brokers() -> None:
    text = (REPO / "docs" / "redis.md").read_text()
    documented = re.findall(r"```lua\n(.*?)```", text, re.S)
    assert documented == [SHARD_PUBLISH_SCRIPT.strip() + "\n"]


def test_a_plain_publish_sends_the_channel_copy_and_the_bucket_copy() -> None:
    buckets = Buckets(b"p.", 16)
    packed = pack_shard_publish(shard_publish_head(buckets, "s.k"), b"@n~1 {}")
    name, bucket = buckets.channel_name("s.k"), buckets.names[buckets.of_channel("s.k")]
    assert packed == pack(b"EVALSHA", SHARD_PUBLISH_SHA, b"2", name, bucket, b"@n~1 {}")
    assert split_head(b"s.k @n~1 {}") == (b"s.k", b"@n~1 {}")
    with pytest.raises(ValueError):
        split_head(b"no-head")


def test_cluster_slots_reply_is_parsed() -> None:
    reply = [
        [5461, 10922, [b"127.0.0.1", 7102, b"id2"], [b"127.0.0.1", 7105, b"id5"]],
        [0, 5460, [b"", 7101, b"id1"], [b"127.0.0.1", 7104, b"id4"]],
        [10923, 16383, [b"127.0.0.1", 7103, b"id3"]],
    ]
    slot_map = parse_cluster_slots(reply, Node("10.0.0.9", 7101))
    assert slot_map.complete()
    assert slot_map.owner(0) == Node("10.0.0.9", 7101, "id1")  # empty host: the node asked
    assert slot_map.owner(16383) == Node("127.0.0.1", 7103, "id3")
    assert set(slot_map.masters()) == {
        slot_map.owner(0),
        slot_map.owner(6000),
        slot_map.owner(11000),
    }
    assert Node("127.0.0.1", 7105, "id5") in slot_map.nodes()
    assert not parse_cluster_slots(reply[:2], Node("h", 1)).complete()


def test_bad_cluster_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="database 0"):
        ClusterBackplane(["redis://127.0.0.1:7101/2"])
    with pytest.raises(ConfigError, match="redis:// or rediss://"):
        ClusterBackplane(["unix:///tmp/redis.sock"])
    with pytest.raises(ConfigError, match="hash tags"):
        ClusterBackplane(["redis://127.0.0.1:7101"], prefix="a{b}.")
    with pytest.raises(ConfigError, match="seed"):
        ClusterBackplane([])


async def test_start_while_no_node_answers_is_not_ready_and_closes_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = set(asyncio.all_tasks())
    bp = ClusterBackplane([f"redis://127.0.0.1:{free_port()}"], socket_timeout=0.2)
    await bp.start(Inbox())
    assert not bp.ready
    with pytest.raises(BackplaneError, match="no master known"):
        await bp.publish("a.b", b"1")
    await bp.subscribe("a.>")  # recorded, not refused
    await bp.close()
    assert our_tasks(before) == set()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cannot map the cluster" in warnings[0], warnings


@pytest.mark.redis_cluster
async def test_a_pattern_is_wanted_until_redis_confirms_its_unsubscribe() -> None:
    # A message published before unsubscribe() may still be in a bucket's
    # stream; Redis confirms the unsubscribe after it, so the filter must not
    # drop it first (the CI flake of test_unsubscribe_stops_traffic[cluster]).
    before = set(asyncio.all_tasks())
    bp = ClusterBackplane([real_cluster_url()], prefix=new_prefix())
    inbox = Inbox()
    await bp.start(inbox)
    try:
        await bp.subscribe("news.*")
        wanted_while_pending: list[bool] = []
        for shard in bp._shards.values():
            original = shard.receiver.reconcile

            async def spy(sub: Any, original: Any = original) -> None:
                wanted_while_pending.append(bp.channel_filter("news.sport"))
                await original(sub)

            shard.receiver.reconcile = spy  # type: ignore[method-assign]
        await bp.unsubscribe("news.*")
        assert wanted_while_pending and all(wanted_while_pending)
        assert not bp.channel_filter("news.sport")

        # Unsubscribed and subscribed again at once: the last call wins.
        await asyncio.gather(bp.unsubscribe("news.*"), bp.subscribe("news.*"))
        await bp.publish("news.sport", b"again")
        await inbox.wait_message("news.sport", b"again")
    finally:
        await bp.close()
    assert our_tasks(before) == set()


# -- masters killed on a cluster of the test's own ----------------------------------------


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One cluster for this module's fault tests; each leaves it whole (3 + 3, in sync)."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def _made_whole(cluster: LocalCluster, killed: int) -> None:
    """Start a killed node again; it rejoins as a replica and syncs."""
    await asyncio.to_thread(cluster.start_node, killed)
    await eventually(cluster.replicas_in_sync, 20, "replicas in sync", 0.2)


async def _failover(cluster: LocalCluster, slot: int) -> int:
    """Kill the master of ``slot`` and wait until its replica serves it; return the new port."""
    old = cluster.master_of(slot)
    cluster.kill(old)
    asker = next(p for p in range(cluster.base, cluster.base + 6) if p != old)
    start = time.monotonic()
    while time.monotonic() - start < 20:
        try:
            new = cluster.master_of(slot, ask=asker)
        except AssertionError:
            new = old
        if new != old:
            return new
        await asyncio.sleep(0.1)
    raise AssertionError(f"no failover of slot {slot} within 20 s")


@pytest.mark.redis_cluster
@pytest.mark.slow
async def test_a_killed_master_is_followed_to_its_promoted_replica(
    own_cluster: LocalCluster,
) -> None:
    bp = ClusterBackplane([own_cluster.url], prefix="f.", socket_timeout=0.5, reconnect_max=0.5)
    ready_at_events: list[tuple[str, bool]] = []

    class Watch(Inbox):
        def link_lost(self) -> None:
            super().link_lost()
            ready_at_events.append(("lost", bp.ready))

        def link_restored(self) -> None:
            super().link_restored()
            ready_at_events.append(("restored", bp.ready))

    inbox = Watch()
    await bp.start(inbox)
    try:
        assert bp.ready
        await bp.subscribe("orders.>")
        await bp.publish("orders.a", b"1")
        await inbox.wait_message("orders.a", b"1")
        slot = bp.buckets.slots[bp.buckets.of_channel("orders")]
        killed = own_cluster.master_of(slot)
        await _failover(own_cluster, slot)
        await eventually(lambda: bp.ready and len(inbox.links) == 2, 20, "ready again")
        assert inbox.links == ["lost", "restored"]
        assert ready_at_events == [("lost", False), ("restored", True)]
        await bp.publish("orders.a", b"2")  # on the promoted replica
        await inbox.wait_message("orders.a", b"2")
        assert bp.stats()["connection_losses"] >= 1
    finally:
        await bp.close()
    await _made_whole(own_cluster, killed)


#: What an ACL user of the cluster backplane needs (docs/redis.md, "Redis Cluster").
CLUSTER_ACL = [
    *("on", ">s3cret", "resetchannels", "&broker-acl.*", "resetkeys", "~broker-acl.*", "-@all"),
    *("+spublish", "+ssubscribe", "+sunsubscribe", "+pubsub|shardnumsub", "+ping"),
    "+cluster|slots",
    *("+evalsha", "+script|load", "+get", "+set", "+hget", "+hset", "+hincrby", "+xadd"),
    *("+xrange", "+xrevrange", "+del", "+expire", "+pexpire", "+time"),
]


@pytest.mark.redis_cluster
async def test_an_acl_user_with_the_documented_rights_works_and_is_not_logged(
    own_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    ports = range(own_cluster.base, own_cluster.base + 6)
    for port in ports:  # ACLs are per node, not replicated
        own_cluster.cli("acl", "setuser", "bk", *CLUSTER_ACL, port=port)
    try:
        url = f"redis://bk:s3cret@127.0.0.1:{own_cluster.base}"
        bp = ClusterBackplane([url], prefix="broker-acl.")
        inbox = Inbox()
        await bp.start(inbox)
        try:
            assert bp.ready
            await bp.subscribe("acl.>")
            await bp.publish("acl.a", b"1")
            kept = await bp.publish("acl.b", b"2", history=HistoryPolicy(size=5, ttl=60.0), key="k")
            assert kept.position is not None
            await inbox.wait_message("acl.b", b"2")
            assert (await bp.read("acl.b", HistoryPolicy(size=5, ttl=60.0), after=0)).entries == (
                (1, b"2"),
            )
        finally:
            await bp.close()
    finally:
        for port in ports:
            own_cluster.cli("acl", "deluser", "bk", port=port)
    assert all("s3cret" not in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]


@pytest.mark.redis_cluster
@pytest.mark.slow
async def test_a_resharded_slot_is_followed_and_its_history_starts_a_new_epoch(
    own_cluster: LocalCluster,
) -> None:
    bp = ClusterBackplane([own_cluster.url], prefix="m.", socket_timeout=0.5, reconnect_max=0.5)
    inbox = Inbox()
    await bp.start(inbox)
    history = HistoryPolicy(size=10, ttl=60.0)
    try:
        await bp.subscribe("orders.>")
        first = await bp.publish("orders.a", b"1", history=history)
        await inbox.wait_message("orders.a", b"1")
        slot = bp.buckets.slots[bp.buckets.of_channel("orders")]
        old = own_cluster.master_of(slot)
        new = next(
            own_cluster.master_of(s) for s in (0, 8000, 16383) if own_cluster.master_of(s) != old
        )
        await asyncio.to_thread(own_cluster.move_slot, slot, new)
        # The old master unsubscribes us from the moved shard channel: followed at once.
        took = await eventually(
            lambda: inbox.links == ["lost", "restored"], 10, "the reshard followed"
        )
        print(f"reshard followed in {took:.2f} s")
        second = await bp.publish("orders.a", b"2", history=history)
        await inbox.wait_message("orders.a", b"2")
        # The moved history was written by another master: a new epoch, never a reused offset.
        assert first.position is not None and second.position is not None
        assert second.position.epoch != first.position.epoch and second.position.offset == 1
    finally:
        await bp.close()


@pytest.mark.redis_cluster
@pytest.mark.slow
async def test_a_reshard_moves_only_the_subscriptions_whose_slot_moved(
    own_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Both masters keep their links; delivery is told only when a subscribed slot moves."""
    bp = ClusterBackplane(
        [own_cluster.url], prefix="r.", socket_timeout=0.5, reconnect_max=0.5, topology_interval=0.2
    )
    inbox = Inbox()
    await bp.start(inbox)

    def served_by(slot: int) -> int | None:
        ports = [shard.node.port for shard in bp._shards.values() if shard.serves(slot)]
        return ports[0] if ports else None

    async def moved(slot: int, to: int) -> None:
        await asyncio.to_thread(own_cluster.move_slot, slot, to)
        await eventually(lambda: served_by(slot) == to, 10, f"slot {slot} followed")

    async def flowing(tag: bytes) -> None:
        await bp.publish("orders.a", tag)
        await bp.publish("stock.level", tag)
        await inbox.wait_message("orders.a", tag)
        await inbox.wait_message("stock.level", tag)

    try:
        await bp.subscribe("orders.>")
        await bp.subscribe("stock.level")
        shards = dict(bp._shards)
        orders = bp.buckets.slots[bp.buckets.of_channel("orders")]
        stock = bp.buckets.slots[bp.buckets.of_channel("stock")]
        home = served_by(orders)
        assert home is not None
        away = next(node.port for node in shards if node.port != home)
        home_ranges = next(shard.ranges for node, shard in shards.items() if node.port == home)
        idle = next(
            slot
            for start, end in home_ranges
            for slot in range(start, end + 1)
            if slot not in (orders, stock)
        )
        await flowing(b"0")

        # A slot nobody here subscribes to: nothing is interrupted.
        await moved(idle, away)
        await flowing(b"1")
        assert inbox.links == []

        # The subscribed bucket's slot, away and back: told each time, links kept.
        await moved(orders, away)
        await eventually(lambda: inbox.links == ["lost", "restored"], 10, "first move told")
        await flowing(b"2")
        await moved(orders, home)
        await eventually(lambda: len(inbox.links) == 4, 10, "second move told")
        assert inbox.links == ["lost", "restored"] * 2
        await flowing(b"3")
        await moved(idle, home)

        assert bp._shards.keys() == shards.keys()
        assert all(bp._shards[node] is shard for node, shard in shards.items())  # links kept
        assert bp.connection_losses == 0
        assert inbox.on("orders.a") == [b"0", b"1", b"2", b"3"]
        assert inbox.on("stock.level") == [b"0", b"1", b"2", b"3"]
    finally:
        await bp.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, warnings


def _channels_on_one_master(cluster: LocalCluster, prefix: str, tag: str) -> tuple[str, str, int]:
    """A channel with history and one without that the same master serves, and their slot."""
    buckets = Buckets(prefix.encode(), 64)
    history_channel = f"h.{tag}"
    slot = buckets.slots[buckets.of_channel(history_channel)]
    master = cluster.master_of(slot)
    plain = next(
        f"p{i}.{tag}"
        for i in range(1000)
        if cluster.master_of(buckets.slots[buckets.of_channel(f"p{i}")]) == master
    )
    return history_channel, plain, slot


def _cluster_brokers(cluster: LocalCluster, prefix: str) -> tuple[BrokerProcess, BrokerProcess]:
    """Two broker processes on ``cluster``, ``h.>`` with history."""
    rules = '[{"pattern": "h.>", "history_size": 10000, "history_ttl": 600}]'
    a, b = (
        redis_broker(cluster.url, prefix, backplane="redis-cluster", BROKER_CHANNELS=rules)
        for _ in range(2)
    )
    return a, b


def _subscribers_of(a: BrokerProcess, b: BrokerProcess, channels: list[str]) -> list[Subscriber]:
    return [Subscriber([ws(a)], channels, "on_a"), Subscriber([ws(b)], channels, "on_b")]


def _outcome(
    subs: list[Subscriber], pubs: list[Publisher], channels: list[str]
) -> dict[str, dict[str, Any]]:
    """Per channel: ``check``'s counts, what each subscriber got, and its gaps."""
    results = {}
    for pub, channel in zip(pubs, channels, strict=True):
        delivered = {s.name: len(s.received.get(channel, [])) for s in subs}
        gaps = {
            s.name: sum(1 for e in s.events if e.get("op") == "gap" and e["channel"] == channel)
            for s in subs
        }
        results[channel] = {**check(subs, pub, channel), "delivered": delivered, "gaps": gaps}
    return results


@pytest.mark.redis_cluster
@pytest.mark.slow
async def test_two_failovers_under_load_lose_no_acknowledged_message_silently(
    own_cluster: LocalCluster,
) -> None:
    prefix = new_prefix()
    history_channel, plain, slot = _channels_on_one_master(own_cluster, prefix, "o")
    a, b = _cluster_brokers(own_cluster, prefix)
    async with running(a, b):
        subs = _subscribers_of(a, b, [history_channel, plain])
        pubs = [Publisher([ws(a), ws(b)], history_channel), Publisher([ws(b), ws(a)], plain)]
        failovers = 0
        async with tasks(*(s.run() for s in subs)):
            await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in subs)), 10)
            async with tasks(*(p.run(600, 0.01) for p in pubs)):
                for _ in range(2):
                    await asyncio.sleep(1.0)
                    killed = own_cluster.master_of(slot)
                    unready = [  # /readyz tells the truth meanwhile (watched from before the kill)
                        asyncio.create_task(until_status(f"{broker.http_url}/readyz", 503, 20))
                        for broker in (a, b)
                    ]
                    await _failover(own_cluster, slot)
                    failovers += 1
                    await asyncio.gather(*unready)
                    for broker in (a, b):
                        await until_status(f"{broker.http_url}/readyz", 200, 30)
                    # The killed node comes back as a replica, ready for the next failover.
                    await _made_whole(own_cluster, killed)
                await asyncio.wait_for(asyncio.gather(*(p.done.wait() for p in pubs)), 60)
            for pub, channel in zip(pubs, (history_channel, plain), strict=True):
                await caught_up(subs, channel, pub, 15)
        results: dict[str, Any] = {"failovers": failovers}
        results.update(_outcome(subs, pubs, [history_channel, plain]))
    print("redis cluster failovers:", results)
    for channel in (history_channel, plain):
        totals = results[channel]
        assert totals["messages_lost_silently"] == 0, totals
        assert totals["acked"] >= 100 and totals["refused"] > 0, totals  # traffic, and outages
    # Without history every subscriber is told of each outage it may have missed.
    assert all(n >= 1 for n in results[plain]["gaps"].values()), results


async def _master_fault(cluster: LocalCluster, fault: str) -> dict[str, Any]:
    """Two brokers under load; ``fault`` hits the master of both channels' slot meanwhile.

    The cluster counterparts of the single-Redis fault tests: ``"pause"`` makes the
    master unresponsive for 3 s (``CLIENT PAUSE``: alive, links open, no replies,
    no failover), as a black-holed link does; ``"kill-links"`` drops every pub/sub
    connection to it (``CLIENT KILL TYPE pubsub``), as a proxy or a restart does.
    A channel with history and one without share the master.
    """
    prefix = new_prefix()
    history_channel, plain, slot = _channels_on_one_master(cluster, prefix, "f")
    master = cluster.master_of(slot)
    a, b = _cluster_brokers(cluster, prefix)
    async with running(a, b):
        subs = _subscribers_of(a, b, [history_channel, plain])
        pubs = [Publisher([ws(b)], history_channel), Publisher([ws(b)], plain)]
        async with tasks(*(s.run() for s in subs)):
            await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in subs)), 10)
            async with tasks(*(p.run(300, 0.01) for p in pubs)):
                await asyncio.sleep(0.8)
                if fault == "pause":
                    unready = asyncio.create_task(until_status(f"{a.http_url}/readyz", 503, 10))
                    cluster.cli("client", "pause", "3000", "all", port=master)
                    await unready  # /readyz tells the truth meanwhile
                else:
                    cluster.cli("client", "kill", "type", "pubsub", port=master)
                for broker in (a, b):
                    await until_status(f"{broker.http_url}/readyz", 200, 20)
                await asyncio.wait_for(asyncio.gather(*(p.done.wait() for p in pubs)), 60)
            await caught_up(subs, history_channel, pubs[0], 15)
            await asyncio.sleep(0.5)  # anything still on its way
        results = _outcome(subs, pubs, [history_channel, plain])
    print(f"redis cluster, master {fault}:", results)
    print(f"messages_lost_silently={sum(r['messages_lost_silently'] for r in results.values())}")
    history, without = results[history_channel], results[plain]
    for totals in (history, without):
        assert totals["messages_lost_silently"] == 0, totals
    # With history every acknowledged message arrives, and nobody is told of a hole.
    assert history["on_a_missing"] == history["on_b_missing"] == 0, history
    assert history["gaps"] == {"on_a": 0, "on_b": 0}, history
    # Without, every subscriber was told its link broke.
    assert all(n >= 1 for n in without["gaps"].values()), without
    return results


@pytest.mark.redis_cluster
@pytest.mark.slow
async def test_an_unresponsive_master_loses_no_acknowledged_message_silently(
    own_cluster: LocalCluster,
) -> None:
    results = await _master_fault(own_cluster, "pause")
    # Publishes the master could not answer in time are unconfirmed, never refused wrongly.
    assert results["h.f"]["unconfirmed"] + results["h.f"]["refused"] > 0, results


@pytest.mark.redis_cluster
@pytest.mark.slow
async def test_killed_subscriber_links_lose_no_acknowledged_message_silently(
    own_cluster: LocalCluster,
) -> None:
    await _master_fault(own_cluster, "kill-links")


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[TlsCluster]:
    cluster = TlsCluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.redis_cluster
@pytest.mark.slow
async def test_a_tls_cluster_carries_messages_and_history_on_every_master(
    tls_cluster: TlsCluster,
) -> None:
    """``rediss://`` seeds: every master is reached over TLS with the first URL's options."""
    bp = ClusterBackplane([tls_cluster.url], prefix="tls.")
    inbox = Inbox()
    await bp.start(inbox)
    try:
        assert bp.ready
        # One channel on each master, exact and through a pattern, plain and with history.
        buckets = bp.buckets
        by_master: dict[int, str] = {}
        for i in range(200):
            slot = buckets.slots[buckets.of_channel(f"t{i}.x")]
            master = next(p for p in tls_cluster.ports if _serves(tls_cluster, p, slot))
            by_master.setdefault(master, f"t{i}.x")
        assert len(by_master) == 3
        history = HistoryPolicy(size=10, ttl=60)
        for channel in by_master.values():
            await bp.subscribe(channel)
        await bp.subscribe("t0.>")
        for n, channel in enumerate(by_master.values()):
            published = await bp.publish(channel, b"%d" % n, history=history)
            assert published.position is not None and published.position.offset == 1
            await inbox.wait_message(channel, b"%d" % n)
        read = await bp.read(next(iter(by_master.values())), history, after=0)
        assert [data for _, data in read.entries] == [b"0"]
    finally:
        await bp.close()


@pytest.mark.redis_cluster
@pytest.mark.slow
async def test_a_tls_cluster_with_an_untrusted_certificate_is_not_ready_and_says_why(
    tls_cluster: TlsCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="broker.backplane")
    bp = ClusterBackplane([f"rediss://127.0.0.1:{tls_cluster.base}"], prefix="tls.")
    await bp.start(Inbox())
    try:
        assert not bp.ready
        assert "cannot map the cluster" in caplog.text and "certificate" in caplog.text.lower()
    finally:
        await bp.close()


def _serves(cluster: TlsCluster, port: int, slot: int) -> bool:
    for line in cluster._cli("cluster", "nodes", port=port).splitlines():
        fields = line.split()
        if "myself" not in fields[2]:
            continue
        for part in fields[8:]:
            start, _, end = part.partition("-")
            if int(start) <= slot <= int(end or start):
                return True
    return False


# -- the compose example ---------------------------------------------------------------


def test_compose_cluster_example_is_valid_broker_configuration() -> None:
    data = yaml.safe_load((REPO / "deploy" / "docker-compose.cluster.yml").read_text())
    services = data["services"]
    nodes = {name for name in services if name.startswith("redis")}
    assert len(nodes) == 6
    addresses = {services[n]["networks"]["backend"]["ipv4_address"] for n in nodes}
    create = " ".join(services["cluster-init"]["command"])
    assert sorted(re.findall(r"(172\.30\.1\.\d+):6379", create.split("--cluster create")[1])) == (
        sorted(addresses)
    )
    for name in ("broker1", "broker2"):
        env = {**dockerfile_env(), **services[name]["environment"]}
        settings = config.load(env={k: v for k, v in env.items() if k.startswith("BROKER_")})
        assert settings.backplane == "redis-cluster"
        seeds = [urllib.parse.urlsplit(u).hostname for u in settings.redis_url.split(",")]
        assert set(seeds) <= addresses
        assert settings.http_host == "0.0.0.0"
        assert (
            services[name]["environment"]["BROKER_TRUSTED_PROXIES"]
            == (services["lb"]["networks"]["backend"]["ipv4_address"])
        )
        make_backplane(settings)  # the seeds parse; constructing does no I/O
