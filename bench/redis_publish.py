"""Microbenchmark: the backplane's hand-packed batched publisher against redis-py's Pipeline.

docs/redis.md claims the hand-packed batches (``redis_wire.pack_publish`` and
``redis_publisher.Publisher``) are several times faster than redis-py's
``Pipeline`` doing the same job. This re-checks that claim, on the same Redis in
the same run, so that an upgrade of redis-py or hiredis can change the decision:

```sh
.venv/bin/python bench/redis_publish.py              # 3 rounds of 200,000 messages each
.venv/bin/python bench/redis_publish.py --messages 20000 --rounds 1   # a quick look
```

Three ways to send the same ``PUBLISH`` commands (the same enveloped payloads,
to one channel nobody subscribes to, under a fresh prefix), each in batches of
up to ``--batch`` commands, one batch in flight at a time:

* ``batches``: ``pack_publish``, one ``b"".join`` and one write per batch, the
  replies read in order: the batching itself, without the outbox around it.
* ``Publisher``: what ``RedisBackplane.publish`` does after the envelope:
  ``pack_publish`` and ``Publisher.enqueue`` for every message (a future
  each), the writer task batching up to ``MAX_BATCH``; timed until every
  future resolved.
* ``Pipeline``: ``redis.asyncio`` ``pipeline(transaction=False)``,
  ``publish()`` per message and ``execute()`` per batch.

The methods take turns within each round, in an order that rotates from round
to round. The table gives each method's median over the rounds and the median
of the per-round ratios to ``Pipeline`` (run-to-run noise here is 5 to 30 %;
only ratios from one invocation compare). Only loopback Redis is contacted;
every count is bounded and every measurement has a time-out.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import redis
import redis.asyncio as aioredis
from redis.utils import HIREDIS_AVAILABLE

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: measure this checkout's broker
    sys.path.insert(0, str(ROOT))

from broker.backplane.redis_publisher import MAX_BATCH, Publisher, RedisConnection  # noqa: E402
from broker.backplane.redis_wire import MessageIds, encode_envelope, pack_publish  # noqa: E402

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_MESSAGES = 5_000_000
#: No measurement may take longer than this, in seconds.
MEASUREMENT_TIMEOUT = 300.0

Method = Callable[[list[bytes]], Awaitable[None]]


def check_loopback(url: str) -> None:
    """Refuse any Redis that is not on this machine (TCP loopback or a Unix socket)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "unix" and parts.hostname not in LOOPBACK:
        raise SystemExit(f"--redis-url must point at loopback, not {parts.hostname}")


class Bench:
    """The three methods, on one Redis, sending to one unused channel."""

    def __init__(self, url: str, batch: int) -> None:
        self.url = url
        self.batch = batch
        self.channel = f"bench.{uuid.uuid4().hex[:12]}.nobody".encode()
        # Like the backplane's connections: RESP2, replies as bytes.
        self.pool = aioredis.ConnectionPool.from_url(url, protocol=2, decode_responses=False)

    def connection(self) -> RedisConnection:
        return cast(RedisConnection, self.pool.make_connection())

    async def batches(self, payloads: list[bytes]) -> None:
        conn = self.connection()
        await conn.connect()
        try:
            channel = self.channel
            for start in range(0, len(payloads), self.batch):
                chunk = payloads[start : start + self.batch]
                packed = b"".join([pack_publish(channel, p) for p in chunk])
                await conn.send_packed_command(packed, check_health=False)
                for _ in chunk:
                    await conn.read_response(timeout=math.inf, disconnect_on_error=False)
        finally:
            await conn.disconnect()

    async def publisher(self, payloads: list[bytes]) -> None:
        publisher = Publisher(
            self.connection, timeout=10.0, max_pending=len(payloads), on_failure=lambda: None
        )
        publisher.accepting = True
        writer = asyncio.create_task(publisher.run())
        try:
            channel = self.channel
            futures = [publisher.enqueue(pack_publish(channel, p)) for p in payloads]
            # Batches go out and resolve in order: the last future done means all are.
            # (Not gather(): its callback per future would be measured too.)
            await futures[-1]
            failed = [f for f in futures if not f.done() or f.exception() is not None]
            if failed:
                raise RuntimeError(f"{len(failed)} publishes failed or are still pending")
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            await publisher.close()

    async def pipeline(self, payloads: list[bytes]) -> None:
        client = aioredis.Redis(connection_pool=self.pool)
        channel = self.channel
        for start in range(0, len(payloads), self.batch):
            pipe = client.pipeline(transaction=False)
            for p in payloads[start : start + self.batch]:
                pipe.publish(channel, p)
            await pipe.execute()

    async def close(self) -> None:
        await self.pool.aclose()


async def measure(method: Method, payloads: list[bytes]) -> float:
    """Messages per second of one method over ``payloads``."""
    start = time.perf_counter()
    async with asyncio.timeout(MEASUREMENT_TIMEOUT):
        await method(payloads)
    return len(payloads) / (time.perf_counter() - start)


async def run(args: argparse.Namespace) -> None:
    bench = Bench(args.redis_url, args.batch)
    try:
        info = await aioredis.Redis(connection_pool=bench.pool).info("server")
        ids = MessageIds("bench")
        data = b'{"n":%s}' % (b"7" * max(1, args.size - 6))
        payloads = [encode_envelope(ids.next(), data) for _ in range(args.messages)]
        methods: dict[str, Method] = {
            "batches": bench.batches,
            "Publisher": bench.publisher,
            "Pipeline": bench.pipeline,
        }
        print(
            f"redis_publish: {args.messages:,} PUBLISH per method and round, "
            f"{len(payloads[0])}-byte payloads, batches of up to {args.batch:,}; "
            f"Redis {info.get('redis_version', '?')} at {args.redis_url}, "
            f"redis-py {redis.__version__}, hiredis {'yes' if HIREDIS_AVAILABLE else 'no'}, "
            f"Python {sys.version.split()[0]}"
        )
        await measure(bench.batches, payloads[: min(len(payloads), 5_000)])  # warm up
        await measure(bench.pipeline, payloads[: min(len(payloads), 5_000)])
        rates: dict[str, list[float]] = {name: [] for name in methods}
        names = list(methods)
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                rates[name].append(await measure(methods[name], payloads))
            line = "  ".join(f"{name} {rates[name][-1]:>11,.0f}/s" for name in names)
            print(f"round {round_ + 1}: {line}", flush=True)
    finally:
        await bench.close()

    print()
    print("| method | msgs/s (median) | ratio to Pipeline (median of rounds) |")
    print("|---|---|---|")
    reference = rates["Pipeline"]
    for name in names:
        ratio = statistics.median(r / p for r, p in zip(rates[name], reference, strict=True))
        print(f"| {name} | {statistics.median(rates[name]):,.0f} | {ratio:.2f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="a loopback Redis (default: REDIS_URL or redis://127.0.0.1:6379/0)",
    )
    parser.add_argument("--messages", type=int, default=200_000, help="per method and round")
    parser.add_argument("--batch", type=int, default=MAX_BATCH, help="commands per batch")
    parser.add_argument("--size", type=int, default=50, help="bytes of JSON data per message")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if not 1 <= args.messages <= MAX_MESSAGES:
        parser.error(f"--messages must be 1 to {MAX_MESSAGES:,}")
    if not 1 <= args.batch <= MAX_BATCH or not 1 <= args.rounds <= 20:
        parser.error(f"--batch must be 1 to {MAX_BATCH}, --rounds 1 to 20")
    if not 1 <= args.size <= 1 << 20:
        parser.error("--size must be 1 to 1 MiB")
    check_loopback(args.redis_url)
    try:
        asyncio.run(run(args))
    except (redis.RedisError, OSError) as exc:
        raise SystemExit(f"redis_publish: {type(exc).__name__}: {exc}") from None


if __name__ == "__main__":
    main()
