"""Benchmark the Redis Cluster backplane beside the single-Redis one, in one invocation.

Two figures (see bench/README.md, "Redis Cluster"):

1. **Throughput.** ``fanout`` (one channel, many subscribers) and ``channels``
   (many channels, a few subscribers each), each with two broker processes
   (subscribers split between them, the publisher on the first), once on one
   Redis (``REDIS_URL``) and once on the cluster (``REDIS_CLUSTER_URL``),
   alternating, ``--rounds`` times. Printed: deliveries per second, server CPU
   per delivery, and the cluster/single ratio of the medians.
2. **What each shard carries.** ``--messages`` publishes spread over 1, 16 and
   256 channels, through the sharded path (what the backplane sends: one
   script that ``SPUBLISH``es to the channel's own shard channel and to its
   bucket's) and through classic ``PUBLISH`` on the same cluster, with one
   subscriber process subscribed to every channel. The
   counts come from the nodes themselves: ``INFO commandstats``
   (``cmdstat_spublish``/``cmdstat_publish`` calls) plus ``CLUSTER INFO``
   (pub/sub messages each node received over the cluster bus), reset before
   each step. Printed: node-messages per delivered message, in all and on the
   busiest master.

Loopback only; every loop is bounded. Results go to
``bench/results/cluster.json`` (git-ignored).

Usage (from the repository root)::

    .ci/redis-cluster start                     # a local cluster on 127.0.0.1:7101-7106
    .venv/bin/python bench/cluster.py           # about two minutes
    .venv/bin/python bench/cluster.py --quick   # a few seconds per step
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if not __package__:  # run as a script (python bench/cluster.py): make `bench` importable
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from bench import clients, loadgen  # noqa: E402
from bench.procstat import Probe  # noqa: E402
from bench.run import BROKER_CMD, RESULTS, servers  # noqa: E402
from broker.backplane.cluster_map import Buckets  # noqa: E402
from broker.backplane.redis_scripts import SHARD_PUBLISH_SCRIPT  # noqa: E402

HOST = "127.0.0.1"


def _loopback(url: str) -> str:
    host = urllib.parse.urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"loopback only: {url}")
    return url


# --------------------------------------------------------------------------- 1. throughput


async def throughput(
    args: argparse.Namespace, backplane: str, url: str, scenario: str, round_no: int
) -> dict[str, Any]:
    """Two broker processes on ``backplane``; one throughput run of ``scenario``."""
    log_dir = RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"benchcl{os.getpid()}r{round_no}"
    if scenario == "fanout":
        chans, per = [f"{prefix}.fan"], args.subscribers
    else:
        chans, per = [f"c{i}.{prefix}" for i in range(args.channels)], args.subs_per_channel
    specs = [(f"{backplane}-{i}", BROKER_CMD) for i in range(2)]
    fmt = {"backplane": backplane, "redis_url": url}
    core = None if args.no_pin else args.server_core
    params = loadgen.ThroughputParams(duration_s=args.duration, max_messages=args.max_messages)
    async with servers(specs, core, log_dir, fmt) as srvs:
        probe = Probe([s.proc.pid for s in srvs], {}, args.server_core, args.loadgen_core)
        result = await loadgen.throughput(
            clients.JsonDialect(), [s.url for s in srvs], srvs[0].url, chans, per, params, probe
        )
    if result["lost"] or result["publish_errors"]:
        raise SystemExit(f"{backplane} {scenario}: functional failure: {result}")
    return result


async def compare(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    targets = [("redis", args.redis_url), ("redis-cluster", args.cluster_url)]
    for scenario in ("fanout", "channels"):
        runs: dict[str, list[dict[str, Any]]] = {"redis": [], "redis-cluster": []}
        for round_no in range(args.rounds):
            order = targets if round_no % 2 == 0 else targets[::-1]
            for backplane, url in order:
                r = await throughput(args, backplane, url, scenario, round_no)
                runs[backplane].append(r)
                print(
                    f"  {scenario:8} {backplane:13} round {round_no}: "
                    f"{r['deliveries_per_s']:>9,} deliveries/s, "
                    f"{r['server_us_per_delivery']} µs server CPU per delivery",
                    flush=True,
                )
        single = statistics.median(r["deliveries_per_s"] for r in runs["redis"])
        cluster = statistics.median(r["deliveries_per_s"] for r in runs["redis-cluster"])
        cpu_single = statistics.median(r["server_us_per_delivery"] or 0 for r in runs["redis"])
        cpu_cluster = statistics.median(
            r["server_us_per_delivery"] or 0 for r in runs["redis-cluster"]
        )
        out[scenario] = {
            "single_deliveries_per_s": single,
            "cluster_deliveries_per_s": cluster,
            "ratio": round(cluster / single, 2) if single else None,
            "single_us_per_delivery": cpu_single,
            "cluster_us_per_delivery": cpu_cluster,
            "runs": runs,
        }
        print(
            f"{scenario}: cluster {cluster:,.0f}/s vs single Redis {single:,.0f}/s "
            f"= {out[scenario]['ratio']}x (CPU/delivery {cpu_cluster} vs {cpu_single} µs)",
            flush=True,
        )
    return out


# --------------------------------------------------------------------------- 2. shard traffic


async def nodes_of(url: str) -> tuple[list[tuple[str, int]], set[tuple[str, int]]]:
    """Every node of the cluster, and which of them are masters."""
    client = aioredis.Redis.from_url(url)
    try:
        slots = await client.execute_command("CLUSTER", "SLOTS")
    finally:
        await client.aclose()
    nodes: list[tuple[str, int]] = []
    masters = set()
    for entry in slots:
        for i, node in enumerate(entry[2:]):
            host = node[0].decode() or HOST
            address = (host, int(node[1]))
            nodes.append(address)
            if i == 0:
                masters.add(address)
    return list(dict.fromkeys(nodes)), masters


async def node_counts(nodes: list[tuple[str, int]]) -> dict[str, int]:
    """Per node, so far: the pub/sub commands it ran plus the pub/sub messages its bus received."""
    counts = {}
    for host, port in nodes:
        client = aioredis.Redis(host=host, port=port)
        try:
            stats = await client.info("commandstats")
            bus = (await client.execute_command("CLUSTER", "INFO")).decode()
        finally:
            await client.aclose()
        calls = sum(
            stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("publish", "spublish")
        )
        for line in bus.splitlines():
            key, _, value = line.partition(":")
            if key in (
                "cluster_stats_messages_publish_received",
                "cluster_stats_messages_publishshard_received",
            ):
                calls += int(value)
        counts[f"{host}:{port}"] = calls
    return counts


async def shard_traffic(args: argparse.Namespace) -> list[dict[str, Any]]:
    nodes, masters = await nodes_of(args.cluster_url)
    buckets = Buckets(b"benchtraffic.", 64)
    cluster = aioredis.RedisCluster.from_url(args.cluster_url)
    await cluster.initialize()
    rows = []
    try:
        for n_channels in (1, 16, 256):
            channels = [f"t{i}.x" for i in range(n_channels)]
            for mode in ("sharded", "classic"):
                before = await node_counts(nodes)
                delivered = await one_traffic_step(
                    args, cluster, nodes, buckets, channels, mode == "sharded"
                )
                after = await node_counts(nodes)
                counts = {node: after[node] - before[node] for node in after}
                total = sum(counts.values())
                busiest = max(counts[f"{h}:{p}"] for h, p in masters)
                row = {
                    "mode": mode,
                    "channels": n_channels,
                    "published": args.messages,
                    "delivered": delivered,
                    "node_messages": total,
                    "per_delivered": round(total / delivered, 2) if delivered else None,
                    "busiest_master_per_delivered": round(busiest / delivered, 2)
                    if delivered
                    else None,
                    "per_node": counts,
                }
                rows.append(row)
                print(
                    f"  {mode:8} {n_channels:>4} channels: {total:>6} node-messages for "
                    f"{delivered} delivered = {row['per_delivered']} per delivered message, "
                    f"busiest master {row['busiest_master_per_delivered']}",
                    flush=True,
                )
    finally:
        await cluster.aclose()
    return rows


async def one_traffic_step(
    args: argparse.Namespace,
    cluster: aioredis.RedisCluster,
    nodes: list[tuple[str, int]],
    buckets: Buckets,
    channels: list[str],
    sharded: bool,
) -> int:
    """Subscribe to every channel, publish, count what arrives."""
    received = 0
    expected = args.messages
    done = asyncio.Event()
    subscribers: list[Any] = []
    clients_: list[aioredis.Redis] = []
    try:
        if sharded:
            # One subscriber connection per master, subscribed to each channel's own
            # shard channel, as the backplane does for exact subscriptions.
            by_node: dict[Any, list[bytes]] = {}
            for channel in channels:
                name = buckets.channel_name(channel)
                node = cluster.get_node_from_key(name)
                by_node.setdefault((node.host, node.port), []).append(name)
            for (host, port), names in by_node.items():
                client = aioredis.Redis(host=host, port=port)
                clients_.append(client)
                pubsub = client.pubsub()
                for name in names:
                    await pubsub.ssubscribe(name)
                subscribers.append(pubsub)
        else:
            client = aioredis.Redis(host=nodes[0][0], port=nodes[0][1])
            clients_.append(client)
            pubsub = client.pubsub()
            await pubsub.subscribe(*[f"benchtraffic.{c}" for c in channels])
            subscribers.append(pubsub)

        async def reader(pubsub: Any) -> None:
            nonlocal received
            while received < expected:
                message = await pubsub.get_message(timeout=1.0)
                if message and message["type"] in ("message", "smessage"):
                    received += 1
            done.set()

        readers = [asyncio.create_task(reader(p)) for p in subscribers]
        payload = orjson.dumps({"n": 0})
        for i in range(args.messages):
            channel = channels[i % len(channels)]
            if sharded:  # what the backplane sends: the channel's copy and the bucket's
                own = buckets.channel_name(channel)
                bucket = buckets.names[buckets.of_channel(channel)]
                await cluster.eval(SHARD_PUBLISH_SCRIPT, 2, own, bucket, b"@b~1 " + payload)
            else:
                await cluster.publish(f"benchtraffic.{channel}", payload)
        try:
            async with asyncio.timeout(10):
                await done.wait()
        except TimeoutError:
            pass
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await asyncio.sleep(0.2)  # let the bus messages land in the counters
        return received
    finally:
        for pubsub in subscribers:
            await pubsub.aclose()
        for client in clients_:
            await client.aclose()


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument(
        "--cluster-url", default=os.environ.get("REDIS_CLUSTER_URL", "redis://127.0.0.1:7101")
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating runs per backplane")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run")
    p.add_argument("--max-messages", type=int, default=200_000)
    p.add_argument("--subscribers", type=int, default=1000, help="fanout subscribers")
    p.add_argument("--channels", type=int, default=300, help="channels scenario: channels")
    p.add_argument("--subs-per-channel", type=int, default=5)
    p.add_argument("--messages", type=int, default=3000, help="publishes per traffic step")
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--loadgen-core", type=int, default=1)
    p.add_argument("--no-pin", action="store_true", help="do not pin servers with taskset")
    p.add_argument("--quick", action="store_true", help="small sizes, one round")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.messages = 1, 2.0, 600
        args.subscribers, args.channels = 200, 50
    _loopback(args.redis_url)
    _loopback(args.cluster_url)
    return args


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    print("1. throughput, two broker processes, single Redis vs Redis Cluster", flush=True)
    compared = await compare(args)
    print("2. node-messages per delivered message (sharded vs classic pub/sub)", flush=True)
    traffic = await shard_traffic(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "throughput": compared, "shard_traffic": traffic}
    (RESULTS / "cluster.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"written bench/results/cluster.json in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
