"""Publishing with the Python client: results, keys and retries, the outbox and ``drain``.

In-process brokers (memory backplane) and the TCP proxy, which can hold back
the broker's answers while still forwarding what the client sends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from broker.app import Running
from broker_client import (
    BadChannel,
    BadRequest,
    ClientOptions,
    ConnectionClosed,
    Gap,
    OutboxFull,
    PublishResult,
    RequestError,
    Subscription,
    TooLarge,
    connect,
)
from tests.inproc import running_broker
from tests.tcpproxy import TcpProxy
from tests.wait import until, within

FAST: ClientOptions = {"backoff_initial": 0.05, "backoff_max": 0.3, "request_timeout": 5.0}
RULES = [{"pattern": "h.>", "history_size": 100}]


def url(broker: Running) -> str:
    return f"ws://127.0.0.1:{broker.ws_port}/ws"


async def data_of(sub: Subscription, count: int, timeout: float = 10.0) -> list[Any]:
    """The data of the next ``count`` messages of ``sub`` (failing on a Gap)."""
    stream = sub.events()
    got: list[Any] = []
    while len(got) < count:
        event = await within(anext(stream), timeout)
        assert not isinstance(event, Gap), event
        got.append(event.data)
    return got


async def test_publish_returns_the_position_and_duplicates() -> None:
    async with running_broker(channels=RULES) as broker, connect(url(broker), **FAST) as client:
        first = await client.publish("h.a", 1, key="k-1")
        assert first == PublishResult(offset=1, epoch=first.epoch, duplicate=False)
        again = await client.publish("h.a", 1, key="k-1")
        assert again == PublishResult(offset=1, epoch=first.epoch, duplicate=True)
        assert await client.publish("plain", 1) == PublishResult()
        generated = await client.publish("h.a", 2, idempotent=True)
        assert generated.offset == 2 and not generated.duplicate
        with pytest.raises(BadRequest):
            await client.publish("h.a", 1, key="x" * 129)
        with pytest.raises(TypeError):
            await client.publish("h.a", 1, key=5)  # type: ignore[arg-type]


async def keyed_scenario(nowait: bool) -> None:
    """A keyed publish whose answer is lost with its connection is re-sent, delivered once."""
    async with (
        running_broker(channels=RULES) as broker,
        TcpProxy("127.0.0.1", broker.ws_port) as proxy,
        connect(f"ws://127.0.0.1:{proxy.port}/ws", **FAST) as publisher,
        connect(url(broker), **FAST) as subscriber,
    ):
        errors: list[RequestError] = []
        publisher.on_error(errors.append)
        sub = await subscriber.subscribe("h.k")
        proxy.pause(upstream=False)  # the publish reaches the broker; its ok does not come back
        if nowait:
            publisher.publish_nowait("h.k", "once", key="order-1")
            publishing: asyncio.Task[Any] = asyncio.create_task(publisher.drain())
        else:
            publishing = asyncio.create_task(publisher.publish("h.k", "once", key="order-1"))
        assert await data_of(sub, 1) == ["once"]  # delivered, unanswered
        assert not publishing.done()
        await proxy.cut()  # the connection drops before the answer
        proxy.resume()
        result = await within(publishing)
        if not nowait:
            assert result.duplicate and result.offset == 1  # the first copy's position
        assert publisher.reconnects == 1 and publisher.outbox_size == 0
        await subscriber.publish("h.k", "next")
        assert await data_of(sub, 1) == ["next"]  # no second "once" in between
        assert errors == []


async def test_a_keyed_publish_is_retried_across_a_dropped_connection() -> None:
    await keyed_scenario(nowait=False)


async def test_a_keyed_publish_nowait_is_retried_across_a_dropped_connection() -> None:
    await keyed_scenario(nowait=True)


async def test_an_unkeyed_publish_across_a_dropped_connection_raises() -> None:
    async with (
        running_broker(channels=RULES) as broker,
        TcpProxy("127.0.0.1", broker.ws_port) as proxy,
        connect(f"ws://127.0.0.1:{proxy.port}/ws", **FAST) as publisher,
    ):
        proxy.pause(upstream=False)
        publishing = asyncio.create_task(publisher.publish("h.u", 1))
        await until(lambda: publisher.outbox_size == 1 and not publisher._link.outbox._queue)
        await proxy.cut()
        proxy.resume()
        with pytest.raises(ConnectionClosed) as info:
            await within(publishing)
        assert "may or may not" in info.value.message


async def test_publish_nowait_queues_while_disconnected_and_drain_flushes() -> None:
    async with (
        running_broker(channels=RULES) as broker,
        TcpProxy("127.0.0.1", broker.ws_port) as proxy,
        connect(f"ws://127.0.0.1:{proxy.port}/ws", **FAST, max_outbox=30) as publisher,
        connect(url(broker), **FAST) as subscriber,
    ):
        sub = await subscriber.subscribe("h.q")
        proxy.pause()
        await proxy.cut()
        await until(lambda: not publisher.connected)
        for n in range(30):
            assert publisher.publish_nowait("h.q", n) is None  # returns at once
        with pytest.raises(OutboxFull):
            publisher.publish_nowait("h.q", "one too many")
        assert publisher.outbox_size == 30
        # publish() still waits its turn, behind the fire-and-forget ones.
        awaited = asyncio.create_task(publisher.publish("h.q", "awaited"))
        proxy.resume()
        await within(publisher.drain())
        assert awaited.done() and publisher.outbox_size == 0
        assert await data_of(sub, 31) == [*range(30), "awaited"]


async def test_drain_reports_refusals_and_close_can_drain() -> None:
    async with running_broker(channels=RULES) as broker, connect(url(broker), **FAST) as client:
        errors: list[RequestError] = []
        client.on_error(errors.append)
        client.publish_nowait("h.big", "x" * 70_000)  # no id: refused with "id": null
        client.publish_nowait("h.*", "refused", key="k-1")  # keyed: refused with its id
        await within(client.drain())
        assert [type(e) for e in errors] == [TooLarge, BadChannel]
        assert errors[0].request_id is None and isinstance(errors[1].request_id, int)

    async with (
        running_broker(channels=RULES) as broker,
        connect(url(broker), **FAST) as watcher,
    ):
        sub = await watcher.subscribe("h.c")
        client = await connect(url(broker), **FAST)
        for n in range(5):
            client.publish_nowait("h.c", n)
        await client.close(drain=True)
        assert await data_of(sub, 5) == list(range(5))
        with pytest.raises(ConnectionClosed):
            client.publish_nowait("h.c", "late")


async def test_close_without_drain_drops_the_outbox_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with (
        running_broker(channels=RULES) as broker,
        TcpProxy("127.0.0.1", broker.ws_port) as proxy,
    ):
        client = await connect(f"ws://127.0.0.1:{proxy.port}/ws", **FAST)
        proxy.pause()
        await proxy.cut()
        await until(lambda: not client.connected)
        client.publish_nowait("h.d", 1)
        with caplog.at_level(logging.WARNING, logger="broker_client"):
            await client.close()
        assert "1 fire-and-forget publishes were never sent" in caplog.text
        proxy.resume()
