"""No silent loss, with real broker processes on a real Redis: recovery, outages, restarts.

Each test runs broker processes on Redis, subscribers that reconnect and
recover with ``since`` as the clients do, and a publisher that records which
of its messages were acknowledged. At the end every subscriber must hold
every acknowledged message exactly once and in order; a message it misses is
*silent* unless the broker told it (``gap`` or ``recovered: false``). Each
test prints ``messages_lost_silently=0`` from its own counts, and fails
otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from broker_client import ClientOptions, Gap
from broker_client import connect as client_connect
from tests.backplane_support import RedisServer, real_redis_url
from tests.brokerproc import BrokerProcess
from tests.tcpproxy import TcpProxy
from tests.test_scaleout import (
    children,
    new_prefix,
    redis_broker,
    running,
    scrape_each,
    stop_redis,
    until_status,
)
from tests.wait import until

pytestmark = [pytest.mark.redis, pytest.mark.slow]

HISTORY_RULES = json.dumps([{"pattern": "h.>", "history_size": 10000, "history_ttl": 600}])


def history_broker(url: str, prefix: str, *args: str, **env: str) -> BrokerProcess:
    return redis_broker(url, prefix, *args, BROKER_CHANNELS=HISTORY_RULES, **env)


@dataclass
class Subscriber:
    """Subscribes to channels, and on every drop reconnects (to the next URL) with ``since``."""

    urls: list[str]
    channels: list[str]
    name: str
    received: dict[str, list[int]] = field(default_factory=dict)
    positions: dict[str, tuple[int, str]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    closes: list[int | None] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    stop: bool = False

    async def run(self) -> None:
        attempt = 0
        while not self.stop:
            url = self.urls[attempt % len(self.urls)]
            attempt += 1
            try:
                async with connect(url, open_timeout=3) as ws:
                    await self._subscribe(ws)
                    self.connected.set()
                    await self._read(ws)
            except ConnectionClosed as closed:
                self.closes.append(closed.rcvd.code if closed.rcvd else None)
            except (OSError, InvalidStatus, TimeoutError):
                pass
            self.connected.clear()
            await asyncio.sleep(0.05)

    async def _subscribe(self, ws: ClientConnection) -> None:
        for i, channel in enumerate(self.channels):
            frame: dict[str, Any] = {"op": "subscribe", "id": i, "channel": channel}
            if channel in self.positions:
                offset, epoch = self.positions[channel]
                frame["since"] = {"offset": offset, "epoch": epoch}
            await ws.send(orjson.dumps(frame).decode())
            while True:
                reply = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                if reply.get("op") == "ok" and reply.get("id") == i:
                    break
                self._take(reply)  # a message of a channel subscribed just before
            if reply.get("recovered") is False:
                self.events.append({"op": "recovered_false", **reply})
            if "offset" in reply and "since" not in frame:
                self.positions[channel] = (reply["offset"], reply["epoch"])

    async def _read(self, ws: ClientConnection) -> None:
        while not self.stop:
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.5)
            except TimeoutError:
                continue
            self._take(orjson.loads(raw))

    def _take(self, frame: dict[str, Any]) -> None:
        if frame.get("op") == "message":
            channel = frame["channel"]
            self.received.setdefault(channel, []).append(frame["data"]["n"])
            if "offset" in frame:
                self.positions[channel] = (frame["offset"], frame["epoch"])
        elif frame.get("op") in ("gap", "unsubscribed", "error"):
            self.events.append(frame)


@dataclass
class Publisher:
    """Publishes numbered messages with ids; records which were acknowledged."""

    urls: list[str]
    channel: str
    acked: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    unknown: list[int] = field(default_factory=list)
    next: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, count: int, interval: float) -> None:
        try:
            await self._run(count, interval)
        finally:
            self.done.set()

    async def _run(self, count: int, interval: float) -> None:
        attempt = 0
        while self.next < count:
            url = self.urls[attempt % len(self.urls)]
            attempt += 1
            try:
                async with connect(url, open_timeout=3) as ws:
                    while self.next < count:
                        n = self.next
                        self.next += 1
                        frame = {
                            "op": "publish",
                            "id": n,
                            "channel": self.channel,
                            "data": {"n": n},
                        }
                        await ws.send(orjson.dumps(frame).decode())
                        reply = await self._reply(ws, n)
                        if reply is None:
                            self.unknown.append(n)
                        elif reply["op"] == "ok":
                            self.acked.append(n)
                        elif "may still be delivered" in reply.get("message", ""):
                            self.unknown.append(n)
                        else:
                            self.refused.append(n)
                        await asyncio.sleep(interval)
            except (ConnectionClosed, OSError, InvalidStatus, TimeoutError):
                if self.next and self.next - 1 not in self.acked + self.refused + self.unknown:
                    self.unknown.append(self.next - 1)
                await asyncio.sleep(0.05)

    async def _reply(self, ws: ClientConnection, n: int) -> dict[str, Any] | None:
        while True:
            try:
                frame: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            except (ConnectionClosed, TimeoutError):
                return None
            if frame.get("id") == n:
                return frame


def check(subscribers: list[Subscriber], publisher: Publisher, channel: str) -> dict[str, int]:
    """Every acknowledged message exactly once and in order; count what went missing."""
    acked = set(publisher.acked)
    maybe = set(publisher.unknown)
    lost_silently = 0
    totals = {"acked": len(acked), "unconfirmed": len(maybe), "refused": len(publisher.refused)}
    for sub in subscribers:
        got = sub.received.get(channel, [])
        assert len(got) == len(set(got)), f"{sub.name}: duplicates"
        assert got == sorted(got), f"{sub.name}: out of order"
        assert set(got) <= acked | maybe, f"{sub.name}: messages nobody published"
        missing = acked - set(got)
        told = [e for e in sub.events if e.get("op") in ("gap", "recovered_false")]
        if missing and not told:
            lost_silently += len(missing)
        totals[f"{sub.name}_missing"] = len(missing)
        totals[f"{sub.name}_told"] = len(told)
    totals["messages_lost_silently"] = lost_silently
    return totals


@asynccontextmanager
async def tasks(*coroutines: Any) -> AsyncIterator[list[asyncio.Task[Any]]]:
    started = [asyncio.create_task(c) for c in coroutines]
    try:
        yield started
    finally:
        for task in started:
            task.cancel()
        await asyncio.gather(*started, return_exceptions=True)


async def caught_up(
    subs: list[Subscriber], channel: str, publisher: Publisher, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(set(publisher.acked) <= set(s.received.get(channel, [])) for s in subs):
            return
        await asyncio.sleep(0.05)


def ws(broker: BrokerProcess) -> str:
    return broker.ws_url


# --- recovery across processes ---------------------------------------------------------------


async def test_recovery_publishing_through_one_process_and_recovering_through_another() -> None:
    url = real_redis_url()
    prefix = new_prefix()
    a, b = history_broker(url, prefix), history_broker(url, prefix)
    async with running(a, b):
        pub = Publisher([ws(a)], "h.x")
        await pub.run(20, 0)
        assert pub.acked == list(range(20))
        sub = Subscriber([ws(b)], ["h.x"], "late")
        sub.positions["h.x"] = (5, await _epoch(a, "h.x"))
        async with tasks(sub.run()):
            await asyncio.wait_for(sub.connected.wait(), 10)
            more = Publisher([ws(a)], "h.x", next=20)
            await more.run(30, 0)
            pub.acked += more.acked
            await caught_up([sub], "h.x", pub, 10)
        assert sub.received["h.x"] == list(range(5, 30))  # offsets 6.. are n 5..
        assert sub.events == []
    print("messages_lost_silently=0")


async def _epoch(broker: BrokerProcess, channel: str) -> str:
    async with connect(ws(broker)) as conn:
        await conn.send(orjson.dumps({"op": "subscribe", "id": 1, "channel": channel}).decode())
        reply = orjson.loads(await asyncio.wait_for(conn.recv(), 5))
        return str(reply["epoch"])


async def test_a_hundred_clients_recover_on_another_process_while_the_channel_is_hammered() -> None:
    url = real_redis_url()
    prefix = new_prefix()
    a, b = history_broker(url, prefix), history_broker(url, prefix)
    async with running(a, b):
        warm = Publisher([ws(a)], "h.hot")
        await warm.run(20, 0)
        epoch = await _epoch(a, "h.hot")
        subs = [Subscriber([ws(b)], ["h.hot"], f"s{i}") for i in range(100)]
        for i, sub in enumerate(subs):
            sub.positions["h.hot"] = (i % 20, epoch)
        hammer = Publisher([ws(a)], "h.hot", next=20)
        async with tasks(*(s.run() for s in subs), hammer.run(600, 0)):
            await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in subs)), 30)
            await asyncio.wait_for(hammer.done.wait(), 60)
            hammer.acked = warm.acked + hammer.acked
            await caught_up(subs, "h.hot", hammer, 30)
        for i, sub in enumerate(subs):
            assert sub.received["h.hot"] == list(range(i % 20, 600)), sub.name
    print(f"messages_lost_silently=0 ({len(subs)} clients)")


# --- Redis outages -----------------------------------------------------------------------------


async def _outage(
    server: RedisServer, history: bool, events: list[Any] | None = None
) -> dict[str, int]:
    prefix = new_prefix()
    make = history_broker if history else redis_broker
    channel = "h.o" if history else "p.o"
    a, b = make(server.url, prefix), make(server.url, prefix)
    async with running(a, b):
        subs = [Subscriber([ws(a)], [channel], "on_a"), Subscriber([ws(b)], [channel], "on_b")]
        pub = Publisher([ws(a), ws(b)], channel)
        async with tasks(*(s.run() for s in subs)):
            await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in subs)), 10)
            async with tasks(pub.run(400, 0.01)):
                await asyncio.sleep(1.0)
                await asyncio.to_thread(stop_redis, server)
                await asyncio.sleep(2.0)
                await asyncio.to_thread(server.start)
                for broker in (a, b):  # both back: each has resumed and said so
                    await until_status(f"{broker.http_url}/readyz", 200, 20)
                await asyncio.wait_for(pub.done.wait(), 60)
            await caught_up(subs, channel, pub, 15)
        if events is not None:
            events.extend((s.name, e) for s in subs for e in s.events)

        return check(subs, pub, channel)


async def test_a_redis_restart_with_history_loses_no_acknowledged_message(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path)  # an append-only file: history survives the restart
    server.start()
    try:
        totals = await _outage(server, history=True)
    finally:
        server.stop()
    print("redis restart, history:", totals)
    print(f"messages_lost_silently={totals['messages_lost_silently']}")
    assert totals["messages_lost_silently"] == 0
    assert totals["on_a_missing"] == totals["on_b_missing"] == 0, totals
    assert totals["acked"] >= 50 and totals["refused"] > 0, totals  # there was an outage


async def test_a_redis_restart_without_history_is_told_with_a_gap() -> None:
    server = RedisServer()
    server.start()
    events: list[Any] = []
    try:
        totals = await _outage(server, history=False, events=events)
    finally:
        server.stop()
    print("redis restart, no history:", totals, events)
    print(f"messages_lost_silently={totals['messages_lost_silently']}")
    assert totals["messages_lost_silently"] == 0
    assert totals["on_a_told"] == totals["on_b_told"] == 1, totals


async def _blackhole(history: bool) -> tuple[dict[str, int], Subscriber]:
    """Black-hole process A's Redis link for 3 s while B publishes 300 messages."""
    make = history_broker if history else redis_broker
    channel = "h.b" if history else "p.b"
    target = urllib.parse.urlsplit(real_redis_url())
    async with TcpProxy(target.hostname or "127.0.0.1", target.port or 6379) as proxy:
        proxied = target._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
        prefix = new_prefix()
        a, b = make(proxied, prefix), make(real_redis_url(), prefix)
        async with running(a, b):
            sub = Subscriber([ws(a)], [channel], "on_a")
            pub = Publisher([ws(b)], channel)  # B's link is fine: it keeps publishing
            async with tasks(sub.run()):
                await asyncio.wait_for(sub.connected.wait(), 10)
                async with tasks(pub.run(300, 0.01)):
                    await asyncio.sleep(0.8)
                    proxy.pause()
                    await asyncio.sleep(3.0)
                    proxy.resume()
                    await asyncio.wait_for(pub.done.wait(), 60)
                await until_status(f"{a.http_url}/readyz", 200, 10)
                if history:
                    await caught_up([sub], channel, pub, 15)
                else:
                    await until(lambda: len(sub.events) >= 1, 10)
                    await asyncio.sleep(0.5)  # anything still on its way
            totals = check([sub], pub, channel)
    print(f"black hole, history {history}:", totals, sub.events)
    print(f"messages_lost_silently={totals['messages_lost_silently']}")
    return totals, sub


async def test_a_blackholed_link_with_history_loses_no_acknowledged_message() -> None:
    totals, sub = await _blackhole(history=True)
    assert totals["messages_lost_silently"] == 0
    assert totals["on_a_missing"] == 0 and totals["acked"] == 300, totals
    assert sub.events == []  # filled from history: nothing to tell


async def test_a_blackholed_link_without_history_is_told_with_a_gap() -> None:
    totals, sub = await _blackhole(history=False)
    assert totals["messages_lost_silently"] == 0
    assert totals["on_a_missing"] > 0, totals  # there was a hole, and no history to fill it
    assert sub.events == [{"op": "gap", "channel": "p.b", "reason": "backplane_interrupted"}]


# --- a key recognised by every process ---------------------------------------------------------


def http_post_json(address: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(
        address,
        data=orjson.dumps(body),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # loopback only
        return int(response.status), orjson.loads(response.read())


async def test_a_publish_key_is_recognised_through_any_process_and_over_http() -> None:
    url = real_redis_url()
    prefix = new_prefix()
    a, b = history_broker(url, prefix), history_broker(url, prefix)
    async with running(a, b):
        sub = Subscriber([ws(a)], ["h.key", "p.key"], "sub")
        async with tasks(sub.run()):
            await asyncio.wait_for(sub.connected.wait(), 10)
            answers = []
            for channel in ("h.key", "p.key"):
                first = {
                    "op": "publish",
                    "id": 1,
                    "channel": channel,
                    "data": {"n": 1},
                    "key": "o-1",
                }
                async with connect(ws(a)) as conn_a, connect(ws(b)) as conn_b:
                    await conn_a.send(orjson.dumps(first).decode())
                    answers.append(orjson.loads(await asyncio.wait_for(conn_a.recv(), 5)))
                    await conn_b.send(orjson.dumps({**first, "id": 2}).decode())  # the retry
                    answers.append(orjson.loads(await asyncio.wait_for(conn_b.recv(), 5)))
                status, body = await asyncio.to_thread(
                    http_post_json,
                    f"{b.http_url}/publish",
                    {"channel": channel, "data": {"n": 1}},
                    {"Idempotency-Key": "o-1"},
                )
                answers.append({"status": status, **body})
            await asyncio.sleep(0.5)  # a duplicate delivered would have arrived by now
    h_first, h_ws, h_http, p_first, p_ws, p_http = answers
    assert h_first["op"] == "ok" and "duplicate" not in h_first
    position = {"offset": h_first["offset"], "epoch": h_first["epoch"]}
    assert h_ws == {"op": "ok", "id": 2, "duplicate": True, **position}
    assert h_http == {"status": 200, "ok": True, "duplicate": True, **position}
    assert p_first == {"op": "ok", "id": 1}
    assert p_ws == {"op": "ok", "id": 2, "duplicate": True}
    assert p_http == {"status": 200, "ok": True, "duplicate": True}
    assert sub.received == {"h.key": [1], "p.key": [1]}


# --- a rolling restart --------------------------------------------------------------------------


async def test_a_drained_process_loses_nothing_for_a_subscriber_that_recovers_elsewhere() -> None:
    """SIGTERM the subscriber's process while a publisher sends through the other one."""
    url = real_redis_url()
    prefix = new_prefix()
    a, b = history_broker(url, prefix), history_broker(url, prefix)
    async with running(a, b):
        sub = Subscriber([ws(a), ws(b)], ["h.d"], "sub")
        pub = Publisher([ws(b)], "h.d")
        async with tasks(sub.run()):
            await asyncio.wait_for(sub.connected.wait(), 10)
            async with tasks(pub.run(400, 0.01)):
                await asyncio.sleep(0.8)
                assert a.pid is not None
                os.kill(a.pid, signal.SIGTERM)
                await asyncio.wait_for(pub.done.wait(), 60)
            await caught_up([sub], "h.d", pub, 15)
        totals = check([sub], pub, "h.d")
        assert await a.astop(timeout=10) == 0  # it was exiting already
    print("rolling restart:", totals, "closes:", sub.closes)
    print(f"messages_lost_silently={totals['messages_lost_silently']}")
    assert 1012 in sub.closes
    assert totals["messages_lost_silently"] == 0 and totals["sub_missing"] == 0, totals
    assert sub.events == []
    with contextlib.suppress(Exception):
        await AsyncExitStack().aclose()


# --- a worker killed outright ---------------------------------------------------------------


async def test_a_killed_worker_loses_nothing_for_the_python_client() -> None:
    """SIGKILL the worker holding the client's connection while another process publishes.

    No drain, no 1012: the connection just drops. The Python client, on its
    own, reconnects (to the surviving or the replacement worker) and resubscribes
    with ``since``: it ends with every acknowledged message exactly once, in order.
    """
    url = real_redis_url()
    prefix = new_prefix()
    parent = history_broker(url, prefix, "--workers", "2")
    other = history_broker(url, prefix)
    async with running(parent, other):
        ppid = parent.pid
        assert ppid is not None
        await until(lambda: "ready: 2 workers" in parent.log_text(), 15)
        workers = children(ppid)
        options: ClientOptions = {"backoff_initial": 0.05, "backoff_max": 0.5}
        async with client_connect(parent.ws_url, **options) as client:
            reconnects: list[Gap] = []
            client.on_reconnect(reconnects.append)
            sub = await client.subscribe("h.k")
            received: list[int] = []
            gaps: list[Gap] = []

            async def consume() -> None:
                async for event in sub.events():
                    if isinstance(event, Gap):
                        gaps.append(event)
                    else:
                        received.append(event.data["n"])

            pub = Publisher([ws(other)], "h.k")
            total = 600
            async with tasks(consume(), pub.run(total, 0.01)):
                await until(lambda: len(received) >= 50, 15)

                def holder() -> int | None:  # the worker that counts the client's connection
                    views = scrape_each(parent.http_url, workers)
                    return next((p for p, v in views.items() if v["broker_connections"]), None)

                victim = None
                deadline = time.monotonic() + 10  # worker snapshots are shared every second
                while victim is None and time.monotonic() < deadline:
                    victim = await asyncio.to_thread(holder)
                assert victim is not None, "no worker counts the client's connection"
                os.kill(victim, signal.SIGKILL)
                killed_at = pub.next
                await asyncio.wait_for(pub.done.wait(), 90)
                await until(lambda: set(pub.acked) <= set(received), 20)
        assert reconnects, "the client did not notice the kill"
    missing = set(pub.acked) - set(received)
    lost_silently = len(missing) if not gaps else 0
    print(
        f"worker SIGKILL after publish {killed_at}: acked {len(pub.acked)},"
        f" received {len(received)},"
        f" missing {len(missing)}, gaps {len(gaps)}, reconnects {len(reconnects)}"
    )
    print(f"messages_lost_silently={lost_silently}")
    assert killed_at < total, "the worker was killed after the last publish"
    assert received == sorted(set(received)), "duplicates or out of order"
    assert missing == set() and gaps == [] and lost_silently == 0
