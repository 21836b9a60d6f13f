"""The Python client recovers what it missed: ``since`` after reconnecting, gaps as events.

In-process brokers on the memory backplane (one process), the client's
connection cut or stalled by the TCP proxy, and a fake broker of our own for
close code 1012 (the real broker's drain is tested with the server).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve

from broker.app import Running
from broker_client import (
    BadRequest,
    ClientOptions,
    Gap,
    Message,
    Position,
    Subscription,
    connect,
)
from tests.inproc import running_broker
from tests.tcpproxy import TcpProxy
from tests.wait import until, within

FAST: ClientOptions = {"backoff_initial": 0.05, "backoff_max": 0.3, "request_timeout": 5.0}
RULES = [
    {"pattern": "h.>", "history_size": 1000},
    {"pattern": "tiny.>", "history_size": 3},
    {"pattern": "g.>", "history_size": 2},
]


def url(broker: Running) -> str:
    return f"ws://127.0.0.1:{broker.ws_port}/ws"


async def events(sub: Subscription, count: int, timeout: float = 10.0) -> list[Any]:
    """The next ``count`` events of ``sub``: messages' data, and the Gap objects."""
    stream = sub.events()
    got: list[Any] = []
    while len(got) < count:
        event = await within(anext(stream), timeout)
        got.append(event if isinstance(event, Gap) else event.data)
    return got


async def nothing_more(sub: Subscription) -> None:
    """Nothing else is buffered (the caller made sure everything has arrived)."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(sub.events()), 0.2)


async def test_recovery_after_a_dropped_connection_is_exact_and_silent() -> None:
    async with (
        running_broker(channels=RULES) as broker,
        TcpProxy("127.0.0.1", broker.ws_port) as proxy,
        connect(f"ws://127.0.0.1:{proxy.port}/ws", **FAST) as client,
        connect(url(broker), **FAST) as publisher,
    ):
        reconnects: list[Gap] = []
        client.on_reconnect(reconnects.append)
        exact = await client.subscribe("h.a")
        pattern = await client.subscribe("h.*")
        total = 300
        cuts = {50: 0, 120: 1, 121: None, 200: 2}  # at n, after this many reconnections
        for n in range(total):
            await publisher.publish("h.a", n)
            if n in cuts:  # cut while messages are flowing, twice in a row once
                after = cuts[n]
                if after is not None:  # the previous cut was recovered (a loaded CI is slow)
                    await until(lambda: len(reconnects) >= after, timeout=10)  # noqa: B023
                await proxy.cut()
            if n % 10 == 0:
                await asyncio.sleep(0.01)
        await until(lambda: len(reconnects) >= 3, timeout=10)
        got = await events(exact, total)
        assert got == list(range(total))  # every message once, in order, and no Gap
        await client.ping()
        await nothing_more(exact)
        # The pattern cannot be recovered: it gets the reconnection gap, as before.
        assert pattern.gaps >= 1 and pattern.last_gap is not None
        assert pattern.last_gap.reason == "reconnect"
        assert client.reconnects == len(reconnects) >= 3


async def test_recovery_after_a_longer_outage() -> None:
    async with (
        running_broker(channels=RULES) as broker,
        TcpProxy("127.0.0.1", broker.ws_port) as proxy,
        connect(f"ws://127.0.0.1:{proxy.port}/ws", **FAST) as client,
        connect(url(broker), **FAST) as publisher,
    ):
        sub = await client.subscribe("h.b")
        await publisher.publish("h.b", "before")
        proxy.pause()
        await proxy.cut()  # the reconnection hangs in its handshake until resumed
        for n in range(20):
            await publisher.publish("h.b", n)
        proxy.resume()
        await within(client.wait_connected())
        await publisher.publish("h.b", "after")
        assert await events(sub, 22) == ["before", *range(20), "after"]


async def test_recovered_false_is_a_gap_with_the_reason() -> None:
    async with (
        running_broker(channels=RULES) as broker,
        TcpProxy("127.0.0.1", broker.ws_port) as proxy,
        connect(f"ws://127.0.0.1:{proxy.port}/ws", **FAST) as client,
        connect(url(broker), **FAST) as publisher,
    ):
        sub = await client.subscribe("tiny.a")
        await publisher.publish("tiny.a", 0)
        assert await events(sub, 1) == [0]
        proxy.pause()
        await proxy.cut()
        for n in range(1, 10):  # more than the 3 kept: the history is trimmed
            await publisher.publish("tiny.a", n)
        proxy.resume()
        await within(client.wait_connected())
        await publisher.publish("tiny.a", "live")
        gap, live = await events(sub, 2)
        assert isinstance(gap, Gap) and (gap.reason, gap.channel) == ("trimmed", "tiny.a")
        assert gap.since <= gap.until and live == "live"


async def test_broker_gap_frames_become_gaps() -> None:
    async with (
        running_broker(channels=RULES) as broker,
        connect(url(broker), **FAST) as client,
    ):
        exact = await client.subscribe("g.a")
        pattern = await client.subscribe("g.*")
        plain = await client.subscribe("plain.x")
        first = await client.publish("g.a", "seen")
        assert first.offset == 1
        assert await events(exact, 1) == ["seen"] and await events(pattern, 1) == ["seen"]

        # The process loses its backplane link and gets it back: what history
        # holds is filled in (g.a), the others get a gap.
        broker.node.delivery.link_lost()
        broker.node.delivery.link_restored()
        [interrupted] = await events(pattern, 1)
        assert isinstance(interrupted, Gap)
        assert (interrupted.reason, interrupted.channel) == ("backplane_interrupted", "g.*")
        [interrupted] = await events(plain, 1)
        assert isinstance(interrupted, Gap)
        assert (interrupted.reason, interrupted.channel) == ("backplane_interrupted", "plain.x")

        # Offsets jump past what history (2 kept) still holds: offset_hole.
        policy = broker.node.history_of("g.a")
        assert policy is not None
        for _ in range(5):
            broker.node.backplane.history.append("g.a", b'"unseen"', policy, time.monotonic())
        await client.publish("g.a", "after the hole")
        for sub, name in ((exact, "g.a"), (pattern, "g.*")):
            gap, message = await events(sub, 2)
            assert isinstance(gap, Gap) and (gap.reason, gap.channel) == ("offset_hole", name)
            assert message == "after the hole"


async def test_an_epoch_change_between_messages_is_a_gap() -> None:
    async with (
        running_broker(channels=RULES, history_meta_ttl=0.3) as broker,
        connect(url(broker), **FAST) as client,
    ):
        sub = await client.subscribe("h.e")
        pattern = await client.subscribe("h.*")
        first = await client.publish("h.e", 1)
        await asyncio.sleep(0.5)  # idle past history_meta_ttl: the channel starts over
        second = await client.publish("h.e", 2)
        assert first.epoch != second.epoch and second.offset == 1
        # The broker says it once (to the pattern too); the client adds no second gap.
        for held, name in ((sub, "h.e"), (pattern, "h.*")):
            got = await events(held, 3)
            assert got[0] == 1 and got[2] == 2
            assert isinstance(got[1], Gap) and (got[1].reason, got[1].channel) == (
                "epoch_changed",
                name,
            )
        await client.publish("h.e", 3)
        assert await events(sub, 1) == [3]


async def test_a_quiet_channel_whose_unused_epoch_expired_is_no_gap() -> None:
    async with (
        running_broker(channels=RULES, history_meta_ttl=0.3) as broker,
        connect(url(broker), **FAST) as client,
    ):
        sub = await client.subscribe("h.q")  # never published: its position is offset 0
        first = client.position("h.q")
        assert first is not None and first.offset == 0
        await asyncio.sleep(0.5)  # past history_meta_ttl: the unused epoch is gone
        ack = await client.publish("h.q", 1)
        assert ack.epoch != first.epoch and ack.offset == 1
        assert await events(sub, 1) == [1]  # nothing was there to miss: no gap
        await client.publish("h.q", 2)
        assert await events(sub, 1) == [2]
        assert sub.gaps == 0


async def test_since_and_history_on_request() -> None:
    async with (
        running_broker(channels=RULES) as broker,
        connect(url(broker), **FAST) as client,
    ):
        acks = [await client.publish("h.s", n) for n in range(5)]
        epoch = acks[0].epoch
        assert epoch is not None and [a.offset for a in acks] == [1, 2, 3, 4, 5]
        sub = await client.subscribe("h.s", since=Position(2, epoch))
        await client.publish("h.s", 5)
        assert await events(sub, 4) == [2, 3, 4, 5]
        await sub.unsubscribe()
        last = await client.subscribe("h.s", history=2)
        assert await events(last, 2) == [4, 5]
        stale = await client.subscribe("tiny.s", since=(7, "old-epoch"))
        [gap] = await events(stale, 1)
        assert isinstance(gap, Gap) and gap.reason == "epoch_changed" and gap.channel == "tiny.s"

        for bad in (
            {"since": (1, epoch), "history": 2},
            {"since": (-1, epoch)},
            {"history": 0},
        ):
            with pytest.raises(BadRequest):
                await client.subscribe("h.t", **bad)  # type: ignore[arg-type]
        with pytest.raises(BadRequest):
            await client.subscribe("h.*", history=2)
        with pytest.raises(BadRequest):  # already subscribed: no replay can join it
            await client.subscribe("h.s", history=2)
        with pytest.raises(ValueError):
            await client.subscribe("h.t", "h.u", history=2)


# --- close code 1012, against a fake broker ----------------------------------------------


@asynccontextmanager
async def restarting_broker(restarts: int, code: int = 1012) -> AsyncIterator[dict[str, Any]]:
    """A fake broker that answers subscribes with a position, sends one message, and
    closes each of the first ``restarts`` connections with ``code``.

    Yields a dict: ``url``, ``opened`` (time.monotonic() of each connection) and
    ``subscribes`` (the subscribe frames received, in order).
    """
    state: dict[str, Any] = {"opened": [], "subscribes": []}

    async def handler(ws: ServerConnection) -> None:
        state["opened"].append(time.monotonic())
        number = len(state["opened"])
        async for raw in ws:
            frame = orjson.loads(raw)
            if frame["op"] != "subscribe":
                await ws.send(orjson.dumps({"op": "pong", "id": frame["id"]}).decode())
                continue
            state["subscribes"].append(frame)
            reply = {"op": "ok", "id": frame["id"], "offset": 10 * number, "epoch": "e1"}
            if "since" in frame:
                reply["recovered"] = True
            await ws.send(orjson.dumps(reply).decode())
            message = {"op": "message", "channel": frame["channel"], "data": number}
            message |= {"offset": 10 * number + 1, "epoch": "e1"}
            await ws.send(orjson.dumps(message).decode())
            if number <= restarts:
                await ws.close(code, "service restart")

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        state["url"] = f"ws://127.0.0.1:{port}/ws"
        yield state


async def test_1012_reconnects_after_a_short_delay_and_resumes_with_since() -> None:
    # A backoff this long would show: each 1012 must cost at most restart_delay.
    options: ClientOptions = {"backoff_initial": 3.0, "backoff_max": 10.0, "restart_delay": 0.3}
    async with (
        restarting_broker(restarts=3) as fake,
        connect(fake["url"], **options) as client,
    ):
        sub = await client.subscribe("r.a")
        got = await events(sub, 4, timeout=5)
        assert got == [1, 2, 3, 4]  # no Gap: each reconnection recovered with since
        opened = fake["opened"]
        assert len(opened) == 4
        # At most restart_delay plus a reconnection each; a backoff would be 3 s or more.
        assert all(later - earlier < 1.5 for earlier, later in itertools.pairwise(opened))
        frames = fake["subscribes"]
        assert "since" not in frames[0]
        # Each re-subscribe resumes after the last message received.
        assert [f["since"] for f in frames[1:]] == [
            {"offset": 11, "epoch": "e1"},
            {"offset": 21, "epoch": "e1"},
            {"offset": 31, "epoch": "e1"},
        ]
        assert client.reconnects == 3 and sub.gaps == 0


async def test_1013_still_backs_off() -> None:
    options: ClientOptions = {"backoff_initial": 0.5, "backoff_max": 1.0, "restart_delay": 0.0}
    async with (
        restarting_broker(restarts=1, code=1013) as fake,
        connect(fake["url"], **options) as client,
    ):
        sub = await client.subscribe("r.b")
        assert await events(sub, 2, timeout=5) == [1, 2]
        first, second = fake["opened"]
        assert second - first >= 0.5


async def test_messages_routed_after_a_replayed_ok_are_not_lost() -> None:
    # The replay follows the subscribe's ok at once, in the same read: the
    # subscription must already be there to receive it.
    async with (
        running_broker(channels=RULES) as broker,
        connect(url(broker), **FAST) as client,
    ):
        for n in range(50):
            await client.publish("h.r", n)
        sub = await client.subscribe("h.r", history=50)
        messages = await events(sub, 50)
        assert messages == list(range(50))
        assert all(isinstance(m, int) for m in messages)
        await client.publish("h.r", 50)
        message = await within(anext(sub))
        assert isinstance(message, Message) and message.offset == 51
