"""The Python client with authentication on: tokens, refresh, refusals, ``unsubscribed``.

In-process brokers (``tests/inproc.py``) with a ``jwt_secret``, and real
tokens made with PyJWT.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Unpack

import jwt
import pytest

from broker.app import Running
from broker_client import (
    ClientOptions,
    ConnectionClosed,
    Forbidden,
    Gap,
    Message,
    RequestError,
    Subscription,
    TokenExpired,
    Unauthorized,
    connect,
)
from tests.inproc import running_broker
from tests.tcpproxy import TcpProxy
from tests.wait import until, within

SECRET = "a-test-secret-of-at-least-32-bytes!!"
FAST: ClientOptions = {"backoff_initial": 0.05, "backoff_max": 0.3, "request_timeout": 5.0}
RULES = [{"pattern": "a.>", "history_size": 100}]


def token(
    sub: str = "alice",
    ttl: float = 60,
    *,
    subscribe: tuple[str, ...] = (">",),
    publish: tuple[str, ...] = (">",),
    secret: str = SECRET,
) -> str:
    claims: dict[str, Any] = {
        "sub": sub,
        "exp": int(time.time() + ttl),
        "subscribe": list(subscribe),
        "publish": list(publish),
    }
    return jwt.encode(claims, secret, algorithm="HS256")


@asynccontextmanager
async def auth_broker(**settings: Any) -> AsyncIterator[Running]:
    async with running_broker(
        jwt_secret=SECRET, refresh_grace=1.0, channels=RULES, **settings
    ) as broker:
        yield broker


def url(broker: Running) -> str:
    return f"ws://127.0.0.1:{broker.ws_port}/ws"


def fast(**overrides: Unpack[ClientOptions]) -> ClientOptions:
    return {**FAST, **overrides}


async def drain_messages(sub: Subscription, count: int, timeout: float = 10.0) -> list[Any]:
    """The next ``count`` events of ``sub`` (messages' data, and Gap objects)."""
    events = sub.events()
    got: list[Any] = []
    while len(got) < count:
        event = await within(anext(events), timeout)
        got.append(event if isinstance(event, Gap) else event.data)
    return got


async def test_a_short_token_is_refreshed_without_dropping_anything() -> None:
    calls: list[float] = []

    async def provider() -> str:
        calls.append(time.monotonic())
        await asyncio.sleep(0)  # a real provider would fetch it
        return token(ttl=3)

    async with (
        auth_broker() as broker,
        connect(url(broker), token_provider=provider, **FAST) as client,
        connect(url(broker), token=token(ttl=600), **FAST) as publisher,
    ):
        lost: list[object] = []
        client.on_disconnect(lost.append)
        client.on_error(lost.append)
        sub = await client.subscribe("a.x")
        started = time.monotonic()
        sent = 0
        # Longer than two token lifetimes: without refreshing, the broker would
        # close the connection after the first one plus the grace.
        while time.monotonic() - started < 4.5:
            await publisher.publish("a.x", sent)
            sent += 1
            await asyncio.sleep(0.05)
        assert await drain_messages(sub, sent) == list(range(sent))
        assert len(calls) >= 3, calls
        assert lost == [] and client.reconnects == 0 and sub.gaps == 0


async def test_token_expired_refreshes_at_once() -> None:
    calls = 0

    def provider() -> str:  # a plain function works too
        nonlocal calls
        calls += 1
        # The first token runs out at once; the broker says token_expired and
        # the client answers with a fresh one within the grace.
        return token(ttl=1 if calls == 1 else 60)

    async with (
        auth_broker() as broker,
        connect(url(broker), token_provider=provider, **FAST) as client,
    ):
        lost: list[object] = []
        client.on_disconnect(lost.append)
        await until(lambda: calls >= 2, timeout=5)
        await asyncio.sleep(1.2)  # past the 1 s grace of a refresh that did not happen
        assert await client.ping() >= 0 and lost == []


async def test_a_bad_token_at_the_first_connect_raises_unauthorized() -> None:
    async with auth_broker() as broker:
        started = time.monotonic()
        with pytest.raises(Unauthorized) as info:
            async with connect(url(broker), token=token(secret="x" * 40), **FAST):
                pass
        assert "signature" in info.value.message
        assert time.monotonic() - started < 2  # not retried

        async def failing() -> str:
            raise OSError("identity provider unreachable")

        with pytest.raises(Unauthorized) as failed:
            async with connect(url(broker), token_provider=failing, retry_first_connect=True):
                pass
        assert isinstance(failed.value.__cause__, OSError)

        with pytest.raises(ValueError):
            connect(url(broker), token="t", token_provider=failing)


async def test_without_a_token_requests_are_unauthorized() -> None:
    async with auth_broker() as broker, connect(url(broker), **FAST) as client:
        with pytest.raises(Unauthorized):
            await client.subscribe("a.x")


async def test_a_refused_token_on_reconnect_is_reported_and_retried() -> None:
    tokens = iter([token(), token(secret="y" * 40), token(secret="y" * 40)])

    def provider() -> str:
        return next(tokens, None) or token()

    async with (
        auth_broker() as broker,
        TcpProxy("127.0.0.1", broker.ws_port) as proxy,
        connect(f"ws://127.0.0.1:{proxy.port}/ws", token_provider=provider, **FAST) as client,
        connect(url(broker), token=token(), **FAST) as publisher,
    ):
        errors: list[RequestError] = []
        client.on_error(errors.append)
        reconnected = asyncio.Event()
        client.on_reconnect(lambda gap: reconnected.set())
        sub = await client.subscribe("a.y")
        await proxy.cut()
        await within(reconnected.wait(), 10)
        assert [type(e) for e in errors] == [Unauthorized, Unauthorized]
        await publisher.publish("a.y", "after")
        assert (await within(anext(sub))).data == "after"
        assert sub.gaps == 0  # a.y keeps history: recovered, nothing missed


async def test_unsubscribed_after_a_narrower_token() -> None:
    calls = 0

    def provider() -> str:
        nonlocal calls
        calls += 1
        # The refresh (about a second in) no longer allows a.secret.
        allowed = (">",) if calls == 1 else ("a.public.>",)
        return token(ttl=3, subscribe=allowed)

    async with (
        auth_broker() as broker,
        connect(url(broker), token_provider=provider, **FAST) as client,
        connect(url(broker), token=token(), **FAST) as publisher,
    ):
        errors: list[RequestError] = []
        client.on_error(errors.append)
        public = await client.subscribe("a.public.x")
        secret = await client.subscribe("a.secret", "a.public.y")
        with pytest.raises(Forbidden) as ended:
            await within(anext(secret), 5)
        assert "a.secret" in ended.value.message and secret.closed
        assert [type(e) for e in errors] == [Forbidden]
        await publisher.publish("a.public.x", 1)
        assert (await within(anext(public))).data == 1
        # a.public.y, held only by the ended subscription, is unsubscribed too.
        await until(lambda: client._table.patterns() == ["a.public.x"])


async def test_a_fixed_token_that_expires_is_reported() -> None:
    async with (
        auth_broker() as broker,
        connect(url(broker), token=token(ttl=1), **fast(max_attempts=1)) as client,
    ):
        errors: list[RequestError] = []
        client.on_error(errors.append)
        await until(lambda: bool(errors), timeout=5)
        assert isinstance(errors[0], TokenExpired)
        # With no provider nothing can refresh it: after the grace, 1008, and the
        # reconnection is refused with the same expired token.
        await until(lambda: client.state == "closed", timeout=10)
        with pytest.raises(ConnectionClosed):
            await client.ping()


async def test_messages_carry_offsets_and_epochs() -> None:
    async with (
        auth_broker() as broker,
        connect(url(broker), token=token(), **FAST) as client,
    ):
        sub = await client.subscribe("a.z", "plain")
        first = await client.publish("a.z", 1)
        await client.publish("plain", 2)
        message: Message = await within(anext(sub))
        assert (message.offset, message.epoch) == (first.offset, first.epoch)
        assert message.position is not None and message.position.offset == 1
        plain: Message = await within(anext(sub))
        assert (plain.offset, plain.epoch, plain.position) == (None, None, None)
