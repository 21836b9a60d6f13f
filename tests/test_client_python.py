"""The Python client against real broker processes, including restarts and network faults."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Unpack

import pytest

from broker_client import (
    BadChannel,
    BrokerError,
    CannotConnect,
    Client,
    ClientOptions,
    ConnectionClosed,
    Gap,
    HttpPublisher,
    Message,
    NotSubscribed,
    RequestError,
    State,
    Subscription,
    Timeout,
    TooLarge,
    connect,
)
from tests.brokerproc import BrokerProcess, free_port
from tests.tcpproxy import TcpProxy
from tests.wait import until, within

# Short backoff so that reconnections happen well within the test time-outs.
FAST: ClientOptions = {"backoff_initial": 0.05, "backoff_max": 0.5, "request_timeout": 5.0}


def fast(**overrides: Unpack[ClientOptions]) -> ClientOptions:
    """FAST with ``overrides``."""
    return {**FAST, **overrides}


@pytest.fixture(scope="module")
def shared_broker() -> Iterator[BrokerProcess]:
    """One broker for the tests that do not stop it."""
    with BrokerProcess(log_level="warning") as proc:
        yield proc


@pytest.fixture
def broker() -> Iterator[BrokerProcess]:
    """A broker of the test's own, which it may kill and restart."""
    with BrokerProcess(log_level="warning") as proc:
        yield proc


@pytest.fixture
async def client(shared_broker: BrokerProcess) -> AsyncIterator[Client]:
    async with connect(shared_broker.ws_url, **FAST) as c:
        yield c


async def next_message(sub: Subscription, timeout: float = 5.0) -> Message:
    return await within(anext(sub), timeout)


async def test_publish_reaches_subscriber_once_across_patterns(client: Client) -> None:
    sub = await client.subscribe("t1.*", "t1.>")
    assert sub.patterns == ("t1.*", "t1.>")
    await client.publish("t1.kitchen", {"t": 21.5})
    await client.publish("t1.kitchen.temp", [1, 2])
    first = await next_message(sub)
    assert (first.channel, first.data) == ("t1.kitchen", {"t": 21.5})
    # The first message matched both patterns but arrives once.
    second = await next_message(sub)
    assert (second.channel, second.data) == ("t1.kitchen.temp", [1, 2])


async def test_two_subscriptions_share_a_pattern(client: Client) -> None:
    a = await client.subscribe("t2.x")
    b = await client.subscribe("t2.x")
    await client.publish("t2.x", 1)
    assert (await next_message(a)).data == 1
    assert (await next_message(b)).data == 1
    await a.unsubscribe()
    # b still receives: the pattern stays subscribed on the broker while b holds it.
    await client.publish("t2.x", 2)
    assert (await next_message(b)).data == 2


async def test_publish_to_pattern_raises_bad_channel(client: Client) -> None:
    with pytest.raises(BadChannel) as info:
        await client.publish("a.*", {"x": 1})
    exc = info.value
    assert exc.code == "bad_channel"
    assert isinstance(exc, RequestError) and isinstance(exc, BrokerError)
    assert exc.message
    assert isinstance(exc.request_id, int)


async def test_subscribe_error_leaves_nothing_subscribed(client: Client) -> None:
    with pytest.raises(BadChannel):
        await client.subscribe("t3.ok", "t3..bad")
    with pytest.raises(NotSubscribed) as info:
        await client.unsubscribe("t3.ok")
    assert info.value.code == "not_subscribed"


async def test_too_large(client: Client) -> None:
    with pytest.raises(TooLarge) as info:
        await client.publish("t4.big", "x" * 70_000)
    assert info.value.code == "too_large"
    # The connection goes on.
    assert await client.ping() >= 0


async def test_unsubscribe_ends_iteration(client: Client) -> None:
    sub = await client.subscribe("t5.a")
    await client.publish("t5.a", "before")
    await client.ping()  # the message arrived before the pong
    await sub.unsubscribe()
    assert sub.closed
    # Buffered messages are still read, then iteration ends.
    assert [m.data async for m in sub] == ["before"]
    await sub.unsubscribe()  # again: no-op


async def test_unsubscribe_one_pattern_of_several(client: Client) -> None:
    sub = await client.subscribe("t6.a", "t6.b")
    await client.unsubscribe("t6.a")
    assert sub.patterns == ("t6.b",) and not sub.closed
    await client.publish("t6.a", "dropped")
    await client.publish("t6.b", "kept")
    assert (await next_message(sub)).data == "kept"
    await client.unsubscribe("t6.b")
    assert sub.closed
    with pytest.raises(NotSubscribed):
        await client.unsubscribe("t6.b")


async def test_async_with_subscription_unsubscribes(client: Client) -> None:
    async with await client.subscribe("t7.a") as sub:
        await client.publish("t7.a", 1)
        assert (await next_message(sub)).data == 1
    assert sub.closed


async def test_callback_form(client: Client) -> None:
    got: list[object] = []
    done = asyncio.Event()

    async def on_message(message: Message) -> None:
        got.append(message.data)
        if len(got) == 3:
            done.set()

    sub = await client.subscribe("t8.*", callback=on_message)
    with pytest.raises(RuntimeError):
        sub.__aiter__()
    for i in range(3):
        await client.publish(f"t8.c{i}", i)
    await within(done.wait())
    assert got == [0, 1, 2]

    plain: list[str] = []
    sync_sub = await client.subscribe("t8.sync", callback=lambda m: plain.append(m.channel))
    await client.publish("t8.sync", None)
    await until(lambda: plain == ["t8.sync"])
    await sync_sub.unsubscribe()
    await sub.unsubscribe()


async def test_publish_nowait_and_error_hook(client: Client) -> None:
    errors: list[RequestError] = []
    remove = client.on_error(errors.append)
    sub = await client.subscribe("t9.x")
    assert client.publish_nowait("t9.x", "ff") is None  # synchronous: queued, written soon
    assert (await next_message(sub)).data == "ff"
    client.publish_nowait("t9.*", "refused")
    await within(client.drain())  # the broker has read it: its refusal came before the pong
    assert len(errors) == 1
    assert isinstance(errors[0], BadChannel) and errors[0].request_id is None
    remove()


async def test_unencodable_data_raises_type_error(client: Client) -> None:
    with pytest.raises(TypeError):
        await client.publish("t10.x", object())


async def test_overflow_drops_oldest_and_records_a_gap(client: Client) -> None:
    sub = await client.subscribe("t11.x", max_buffer=2)
    for i in range(5):
        await client.publish("t11.x", i)
    await client.ping()  # every message has arrived before the pong
    assert sub.dropped == 3 and sub.gaps == 1
    events = sub.events()
    gap = await within(anext(events))
    assert isinstance(gap, Gap) and gap.reason == "overflow" and gap.dropped == 3
    assert [(await within(anext(events))).data for _ in range(2)] == [3, 4]  # type: ignore[union-attr]


async def test_connect_refused_raises_cannot_connect() -> None:
    port = free_port()
    with pytest.raises(CannotConnect) as info:
        async with connect(f"ws://127.0.0.1:{port}/ws"):
            pass
    assert info.value.code == "cannot_connect"
    assert isinstance(info.value, OSError) and not isinstance(info.value, ConnectionClosed)
    assert isinstance(info.value.cause, OSError) and info.value.__cause__ is info.value.cause


async def test_close_ends_everything(shared_broker: BrokerProcess) -> None:
    client = await connect(shared_broker.ws_url)
    sub = await client.subscribe("t12.x")
    await client.close()
    assert client.state is State.CLOSED and not client._tasks
    assert [m async for m in sub] == []
    with pytest.raises(ConnectionClosed):
        await client.publish("t12.x", 1)


async def test_publish_times_out_when_the_link_is_dead(shared_broker: BrokerProcess) -> None:
    async with (
        TcpProxy(shared_broker.host, shared_broker.port) as proxy,
        connect(f"ws://127.0.0.1:{proxy.port}/ws", **fast(ping_interval=None)) as client,
    ):
        proxy.pause()
        with pytest.raises(Timeout) as info:
            await client.publish("t13.x", 1, timeout=0.5)
        assert info.value.code == "timeout" and isinstance(info.value, TimeoutError)
        proxy.resume()
        await client.publish("t13.x", 2)


async def test_network_blink_resubscribes_and_reports_a_gap(shared_broker: BrokerProcess) -> None:
    async with (
        TcpProxy(shared_broker.host, shared_broker.port) as proxy,
        connect(f"ws://127.0.0.1:{proxy.port}/ws", **FAST) as sub_client,
        connect(shared_broker.ws_url, **FAST) as pub,
    ):
        gaps: list[Gap] = []
        sub_client.on_reconnect(gaps.append)
        sub = await sub_client.subscribe("t14.>")
        await proxy.cut()
        await until(lambda: len(gaps) == 1)
        await pub.publish("t14.after", "blink")
        events = sub.events()
        gap = await within(anext(events))
        assert isinstance(gap, Gap) and gap.reason == "reconnect" and gap.until >= gap.since
        message = await within(anext(events))
        assert isinstance(message, Message) and message.data == "blink"
        assert sub_client.reconnects == 1 and sub.gaps == 1


async def test_dead_link_noticed_by_keepalive(shared_broker: BrokerProcess) -> None:
    async with (
        TcpProxy(shared_broker.host, shared_broker.port) as proxy,
        connect(
            f"ws://127.0.0.1:{proxy.port}/ws",
            **fast(ping_interval=0.2, ping_timeout=0.3, close_timeout=0.3),
        ) as client,
    ):
        lost: list[ConnectionClosed] = []
        client.on_disconnect(lost.append)
        proxy.pause()
        await until(lambda: len(lost) == 1)
        proxy.resume()
        await within(client.wait_connected())
        assert await client.ping() >= 0


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
async def test_subscriber_survives_broker_restart(broker: BrokerProcess, kill: bool) -> None:
    async with connect(broker.ws_url, **FAST) as sub_client, connect(broker.ws_url, **FAST) as pub:
        reconnected = asyncio.Event()
        sub_client.on_reconnect(lambda gap: reconnected.set())
        sub = await sub_client.subscribe("t15.*", "t15.x.>")
        await pub.publish("t15.a", "before")
        assert (await next_message(sub)).data == "before"

        await broker.arestart(kill=kill)
        await within(reconnected.wait(), 15)
        await within(pub.wait_connected(), 15)
        await pub.publish("t15.a", "after")
        await pub.publish("t15.x.y", "after too")
        assert (await next_message(sub)).data == "after"
        assert (await next_message(sub)).data == "after too"
        assert sub.gaps == 1 and sub.last_gap is not None and sub.last_gap.reason == "reconnect"
        assert broker.starts == 2


async def test_requests_wait_for_the_reconnection(broker: BrokerProcess) -> None:
    async with connect(broker.ws_url, **FAST) as client:
        await broker.astop()
        await until(lambda: client.state is State.RECONNECTING)
        assert not client.connected
        publishing = asyncio.create_task(client.publish("t16.x", 1, timeout=15))
        await broker.astart()
        await within(publishing, 15)


async def test_gives_up_after_max_attempts(broker: BrokerProcess) -> None:
    async with connect(broker.ws_url, **fast(max_attempts=2)) as client:
        sub = await client.subscribe("t17.x")
        await broker.astop()
        with pytest.raises(ConnectionClosed):
            await within(anext(sub), 10)
        assert client.state is State.CLOSED


def test_http_publisher(shared_broker: BrokerProcess) -> None:
    async def scenario() -> None:
        async with connect(shared_broker.ws_url, **FAST) as client:
            sub = await client.subscribe("t18.*")
            publisher = HttpPublisher(shared_broker.http_url)
            await asyncio.to_thread(publisher.publish, "t18.a", {"via": "http"})
            message = await next_message(sub)
            assert (message.channel, message.data) == ("t18.a", {"via": "http"})

    asyncio.run(scenario())
    publisher = HttpPublisher(shared_broker.http_url)
    with pytest.raises(BadChannel) as info:
        publisher.publish("t18.*", 1)
    assert info.value.code == "bad_channel"
    with pytest.raises(TooLarge):
        publisher.publish("t18.a", "x" * 70_000)
    with pytest.raises(ConnectionClosed):
        HttpPublisher(f"http://127.0.0.1:{free_port()}", timeout=2).publish("t18.a", 1)
