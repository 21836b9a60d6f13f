"""Scenarios: what the load generator does against one server, and what it measures.

Each scenario connects its clients (see ``bench.clients``), opens the
``Probe`` window, drives load, closes the window and checks every subscriber's
count. Every loop is bounded in count and in time, and only the URLs the
orchestrator passes (127.0.0.1) are ever contacted.

Flow control of throughput runs: the publisher keeps at most ``ack_window``
publish requests without their ``ok``, and at most ``lag_window`` messages per
subscriber published but not yet counted as delivered. The server is kept
saturated, while its buffers (and so our loss check and its slow-consumer
policy) stay bounded.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from bench.clients import (
    BenchError,
    Dialect,
    Fleet,
    Publisher,
    RawSub,
    connect,
    connect_raw,
    split_frames,
)
from bench.procstat import Probe


async def drained(done: Callable[[], bool], timeout_s: float, poll_s: float = 0.01) -> bool:
    """Poll ``done`` until it holds or ``timeout_s`` passes; return whether it held.

    Deliveries are counted inside protocol callbacks, so there is no event to
    await; polling at 10 ms costs nothing measurable.
    """
    deadline = time.perf_counter() + timeout_s
    while not done():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(poll_s)
    return True


@dataclass
class ThroughputParams:
    """Sizes of one throughput run; every loop is bounded by both count and time."""

    duration_s: float = 10.0
    max_messages: int = 1_000_000
    ack_window: int = 64
    lag_window: int = 512
    tick_s: float = 0.0  # 0: adapt, so that each read carries about frames_per_read frames
    frames_per_read: float = 50.0
    tick_min_s: float = 0.02
    tick_max_s: float = 0.5
    drain_timeout_s: float = 30.0
    connect_concurrency: int = 200


async def throughput(
    dialect: Dialect,
    sub_urls: Sequence[str],
    pub_url: str,
    channels: Sequence[str],
    subs_per_channel: int,
    params: ThroughputParams,
    probe: Probe,
    *,
    packed: int = 1,
) -> dict[str, Any]:
    """Publish round-robin over ``channels`` as fast as the windows allow; count deliveries.

    ``fanout`` is one channel with many subscribers, ``channels`` many channels
    with a few each. ``packed`` > 1 puts that many subscriptions on each
    connection (``packed`` times fewer connections, each channel still with
    ``subs_per_channel`` subscribers): connection ``i`` subscribes to channels
    ``i * packed`` to ``i * packed + packed - 1``, modulo their number. Returns
    delivered messages per second over the window from the first publish to the
    last delivery, plus the loss check.
    """
    loop = asyncio.get_running_loop()
    n_ch = len(channels)
    n_conns = -(-n_ch * subs_per_channel // packed)
    if packed > 1 and (n_conns * packed != n_ch * subs_per_channel or packed > n_ch):
        raise ValueError("packed must divide channels x subs_per_channel and be <= channels")

    def chans_of(i: int) -> list[int]:
        return [(i * packed + k) % n_ch for k in range(packed)]

    fleet = Fleet(dialect, batching=True)
    # Resume at most ~250 readers at a time (a few ms of work), so the publisher's
    # replies, on the same event loop, are never left waiting long.
    fleet.slots = max(8, -(-n_conns // 250))
    t_conn = time.perf_counter()
    await fleet.open(
        sub_urls,
        (lambda i: channels[i % n_ch])
        if packed == 1
        else (lambda i: [channels[c] for c in chans_of(i)]),
        n_conns,
        params.connect_concurrency,
    )
    connect_s = time.perf_counter() - t_conn
    pub_conn = await connect(dialect, pub_url)
    pub = Publisher(pub_conn, dialect)
    per_channel = [0] * n_ch
    expected = 0  # deliveries owed for everything published so far
    lag_limit = params.lag_window * subs_per_channel * n_ch
    stop_at = 0.0
    stopping = False

    def pump() -> None:
        nonlocal expected, stopping
        if stopping:
            return
        if loop.time() >= stop_at:
            stopping = True
            return
        while (
            pub.inflight < params.ack_window
            and pub.sent < params.max_messages
            and expected - fleet.delivered < lag_limit
        ):
            i = pub.sent % n_ch
            pub.publish(channels[i], pub.sent)
            per_channel[i] += 1
            expected += subs_per_channel
        if pub.sent >= params.max_messages:
            stopping = True

    pub.on_reply = pump
    fleet.start("count")
    gc.collect()
    gc.disable()  # a full collection over 10,000 client objects would stall the ticker
    try:
        probe.start()
        t0 = time.perf_counter()
        stop_at = loop.time() + params.duration_s
        pump()
        hard_stop = stop_at + params.drain_timeout_s
        t_end = t0
        period = params.tick_s or params.tick_min_s
        periods: list[float] = []
        n_subs = len(fleet.subs)
        slot = 0
        rate_t, rate_d = time.perf_counter(), 0
        while loop.time() < hard_stop:
            await asyncio.sleep(max(0.001, period / fleet.slots))
            now = loop.time()
            fleet.tick(now, 0.0 if stopping else period)
            pump()
            if stopping:
                if fleet.delivered >= expected and pub.inflight == 0:
                    t_end = time.perf_counter()
                    break
                period = params.tick_min_s  # drain: find the end promptly
                continue
            slot += 1
            if slot % fleet.slots:
                continue
            periods.append(period)
            t_now = time.perf_counter()
            per_sub = (fleet.delivered - rate_d) / max(1e-3, t_now - rate_t) / n_subs
            rate_t, rate_d = t_now, fleet.delivered
            if not params.tick_s and per_sub > 0:
                # Long enough that a read carries several frames, short enough that
                # the lag window never runs dry while a subscriber sleeps.
                period = min(
                    params.tick_max_s,
                    params.lag_window / 4 / per_sub,
                    max(params.tick_min_s, params.frames_per_read / per_sub),
                )
        else:
            t_end = time.perf_counter()
        cpu = probe.stop()
        await pub.wait_idle(5.0)
        fleet.batching = False
        fleet.tick(loop.time(), 0.0)
        await asyncio.sleep(0.05)  # let the last resumed reads land before the exact check
        for s_i, s in enumerate(fleet.subs):
            if packed == 1:
                s.expected = per_channel[s_i % n_ch]
            else:
                s.expected = sum(per_channel[c] for c in chans_of(s_i))
        check = fleet.check()
        delivered = fleet.total()
    finally:
        gc.enable()
        pub_conn.close()
        fleet.close()
    elapsed = t_end - t0
    return {
        "subscribers": n_ch * subs_per_channel,
        "connections": n_conns,
        "channels": n_ch,
        "published": pub.sent,
        "acked": pub.acked,
        "publish_errors": pub.error_count,
        "error_samples": pub.errors,
        "expected": expected,
        "delivered": delivered,
        **check,
        "elapsed_s": round(elapsed, 3),
        "connect_s": round(connect_s, 3),
        "deliveries_per_s": round(delivered / elapsed) if elapsed > 0 else 0,
        "publishes_per_s": round(pub.sent / elapsed) if elapsed > 0 else 0,
        "median_read_period_ms": (
            round(1000 * sorted(periods)[len(periods) // 2], 1) if periods else None
        ),
        **cpu,
        # Server CPU per delivered message, split: steadier than throughput when
        # the machine is noisy, and the user part is what the broker's code costs.
        "server_us_per_delivery": _per(cpu["server_cpu_s"], delivered),
        "server_user_us_per_delivery": _per(cpu["server_user_s"], delivered),
    }


def _per(seconds: float, count: int) -> float | None:
    return round(1e6 * seconds / count, 2) if count else None


@dataclass
class LatencyParams:
    """Sizes of a latency run."""

    subscribers: int = 100
    rate: float = 200.0
    duration_s: float = 10.0
    warmup_s: float = 1.0
    drain_timeout_s: float = 10.0


async def latency(
    dialect: Dialect, url: str, channel: str, params: LatencyParams, probe: Probe
) -> dict[str, Any]:
    """Publish at a fixed rate; every subscriber reads eagerly and timestamps each frame.

    (The publisher and the subscribers share one event loop: a subscriber's
    timestamp includes the time to take the frames of the subscribers served
    before it in the same loop iteration, about 1 µs each, the same for every
    server.)

    Latency is receive time minus the send time stamped in the payload, both
    from the load generator's monotonic clock, so no clock sync is involved.
    Samples from the first ``warmup_s`` seconds are dropped.
    """
    fleet = Fleet(dialect, batching=False)
    await fleet.open([url], lambda i: channel, params.subscribers, picows=True)
    pub_conn = await connect(dialect, url)
    pub = Publisher(pub_conn, dialect)
    fleet.start("latency")
    n_msgs = max(1, int(params.rate * params.duration_s))
    warm_msgs = int(params.rate * params.warmup_s)
    try:
        probe.start()
        t0 = time.perf_counter()
        for seq in range(n_msgs):
            delay = t0 + seq / params.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pub.publish(channel, seq)
        await drained(lambda: fleet.total() >= n_msgs * len(fleet.subs), params.drain_timeout_s)
        cpu = probe.stop()
        await pub.wait_idle(5.0)
        samples = sorted(x for s in fleet.subs for x in s.latencies(warm_msgs))
        for s in fleet.subs:
            s.expected = n_msgs
        check = fleet.check()
    finally:
        pub_conn.close()
        fleet.close()

    def pct(p: float) -> float:
        if not samples:
            return float("nan")
        return samples[min(len(samples) - 1, int(p * len(samples)))] / 1e6

    return {
        "subscribers": params.subscribers,
        "rate": params.rate,
        "published": pub.sent,
        "publish_errors": pub.error_count,
        "error_samples": pub.errors,
        "samples": len(samples),
        "p50_ms": round(pct(0.50), 3),
        "p99_ms": round(pct(0.99), 3),
        "max_ms": round(samples[-1] / 1e6, 3) if samples else float("nan"),
        **check,
        **cpu,
    }


async def memory(
    dialect: Dialect,
    url: str,
    prefix: str,
    n: int,
    probe: Probe,
    settle_s: float = 1.0,
    concurrency: int = 200,
) -> dict[str, Any]:
    """Open ``n`` idle connections, each subscribed to its own channel; RSS growth per one.

    RSS is sampled before the first connection and after every subscribe has
    its ok and ``settle_s`` has passed; the difference divided by ``n``.
    """
    await asyncio.sleep(settle_s)
    rss0 = probe.rss_kib()
    fleet = Fleet(dialect, batching=False)
    t0 = time.perf_counter()
    try:
        await fleet.open([url], lambda i: f"{prefix}.{i}", n, concurrency)
        connect_s = time.perf_counter() - t0
        await asyncio.sleep(settle_s)
        rss1 = probe.rss_kib()
        alive = sum(not s.closed for s in fleet.subs)
    finally:
        fleet.close()
    return {
        "connections": n,
        "alive": alive,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "kib_per_conn": round((rss1 - rss0) / n, 2),
        "connect_s": round(connect_s, 3),
        "connects_per_s": round(n / connect_s) if connect_s > 0 else 0,
    }


async def connect_rate(
    dialect: Dialect,
    url: str,
    prefix: str,
    n: int,
    probe: Probe,
    concurrency: int = 200,
) -> dict[str, Any]:
    """Open ``n`` connections that each authenticate (if the dialect does) and subscribe.

    The figure is connections per second from the first SYN to the last
    subscribe's ok, with ``concurrency`` handshakes in progress at once. The
    connections stay open until all are counted, then are dropped. Tokens are
    minted before (see ``mint_tokens``), so only the server's work is timed.
    """
    fleet = Fleet(dialect, batching=False)
    try:
        probe.start()
        t0 = time.perf_counter()
        await fleet.open([url], lambda i: f"{prefix}.{i}", n, concurrency)
        elapsed = time.perf_counter() - t0
        cpu = probe.stop()
        alive = sum(not s.closed for s in fleet.subs)
    finally:
        fleet.close()
    return {
        "connections": n,
        "alive": alive,
        "elapsed_s": round(elapsed, 3),
        "connects_per_s": round(n / elapsed) if elapsed > 0 else 0,
        **cpu,
        "server_us_per_connect": _per(cpu["server_cpu_s"], n),
    }


@dataclass
class RecoveryParams:
    """Sizes of a recovery run."""

    subscribers: int = 1000
    messages: int = 100  # published while every subscriber is away
    concurrency: int = 1000  # reconnects in progress at once: all of them
    timeout_s: float = 60.0


def _position(payload: bytes) -> tuple[int, str] | None:
    msg = orjson.loads(payload)
    if msg.get("op") != "message" or "offset" not in msg:
        return None
    return int(msg["offset"]), str(msg["epoch"])


async def recovery(
    dialect: Dialect, url: str, pub_url: str, channel: str, params: RecoveryParams, probe: Probe
) -> dict[str, Any]:
    """Subscribers leave, messages are published, all come back at once with ``since``.

    1. ``subscribers`` connections subscribe to ``channel`` (a history
       channel); one message is published and each notes the offset and epoch
       of the last message it saw.
    2. All disconnect; ``messages`` are published and acknowledged.
    3. All reconnect at once and subscribe with ``since``. Timed from the first
       reconnect to the moment the last subscriber has counted every missed
       message (``catchup_ms``), with the frames kept and checked afterwards:
       each must get ``recovered: true`` and exactly the offsets it missed, in
       order (``missing``, ``duplicates``, ``out_of_order``, ``not_recovered``).
    """
    n, m = params.subscribers, params.messages
    fleet = Fleet(dialect, batching=False)
    pub_conn = await connect(dialect, pub_url)
    pub = Publisher(pub_conn, dialect)
    back: list[RawSub | None] = [None] * n
    try:
        await fleet.open([url], lambda i: channel, n)
        pub.publish(channel, 0)
        await pub.wait_idle(10.0)
        if not await drained(lambda: all(s._inbox for s in fleet.subs), params.timeout_s):
            raise BenchError("the first message did not reach every subscriber")
        seen: list[tuple[int, str]] = []
        for s in fleet.subs:
            pos = _position(s._inbox[-1])
            if pos is None:
                raise BenchError(f"no offset in {s._inbox[-1][:200]!r}: is history on?")
            seen.append(pos)
        fleet.close()
        await asyncio.sleep(0.2)  # let the server see every close before publishing
        for seq in range(1, m + 1):
            pub.publish(channel, seq)
        await pub.wait_idle(params.timeout_s)
        sem = asyncio.Semaphore(params.concurrency)
        gone = Fleet(dialect, batching=False)  # RawSub wants a fleet; record mode ignores it

        async def one(i: int) -> None:
            async with sem:
                sub = await connect_raw(dialect, url, gone)
                back[i] = sub
                sub.expected = m
                sub.mode = "record"
                since = {"offset": seen[i][0], "epoch": seen[i][1]}
                sub.send(
                    orjson.dumps({"op": "subscribe", "id": 7, "channel": channel, "since": since})
                )

        probe.start()
        t0 = time.perf_counter()
        async with asyncio.timeout(params.timeout_s), asyncio.TaskGroup() as tg:
            for i in range(n):
                tg.create_task(one(i))
        connected_s = time.perf_counter() - t0
        subs = [s for s in back if s is not None]
        caught_up = await drained(
            lambda: all(s.done_at or s.closed for s in subs), params.timeout_s, 0.002
        )
        cpu = probe.stop()
        await asyncio.sleep(0.05)  # a duplicate arriving just after the last message counts
        check = _check_recovery(subs, seen, m)
    finally:
        pub_conn.close()
        fleet.close()
        for s in back:
            if s is not None:
                s.close()
    done = sorted(s.done_at - t0 for s in subs if s.done_at)
    return {
        "subscribers": n,
        "messages": m,
        "caught_up": caught_up,
        "subs_closed": sum(s.closed for s in subs),
        "connected_ms": round(1000 * connected_s, 1),
        "catchup_ms": round(1000 * done[-1], 1) if len(done) == n else None,
        "catchup_p50_ms": round(1000 * done[len(done) // 2], 1) if done else None,
        **check,
        **cpu,
    }


def _check_recovery(subs: list[RawSub], seen: list[tuple[int, str]], m: int) -> dict[str, Any]:
    """Count, over every subscriber, what its recorded frames lack or repeat."""
    missing = duplicates = out_of_order = not_recovered = extra = 0
    samples: list[str] = []
    for s, (since, epoch) in zip(subs, seen, strict=True):
        ok: dict[str, Any] | None = None
        offsets: list[int] = []
        for opcode, payload in split_frames(b"".join(s.chunks)):
            if opcode != 0x1:
                continue
            msg = orjson.loads(payload)
            if msg.get("op") == "message":
                if msg.get("epoch") != epoch:
                    extra += 1
                offsets.append(int(msg["offset"]))
            elif msg.get("id") == 7:
                ok = msg
        if ok is None or ok.get("op") != "ok" or not ok.get("recovered"):
            not_recovered += 1
            if len(samples) < 3:
                samples.append(orjson.dumps(ok).decode() if ok else "no reply")
        want = set(range(since + 1, since + m + 1))
        got = set(offsets)
        missing += len(want - got)
        extra += len(got - want)
        duplicates += len(offsets) - len(got)
        out_of_order += sum(b <= a for a, b in itertools.pairwise(offsets))
    return {
        "missing": missing,
        "duplicates": duplicates,
        "extra": extra,
        "out_of_order": out_of_order,
        "not_recovered": not_recovered,
        "reply_samples": samples,
    }
