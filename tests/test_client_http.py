"""The HTTP publishers: ``AsyncHttpPublisher`` and ``HttpPublisher``.

Against a real broker's service API (in process), and against a small HTTP
server of our own that records what it receives and answers what a test
scripts: the API key header, keys, positions, errors, closed keep-alive
connections, silence.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import orjson
import pytest

from broker_client import (
    AsyncHttpPublisher,
    BadChannel,
    ConnectionClosed,
    HttpPublisher,
    PublishResult,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
    connect,
)
from tests.brokerproc import free_port
from tests.inproc import running_broker
from tests.tcpproxy import TcpProxy
from tests.wait import within

# --- against the broker ------------------------------------------------------------------


async def test_async_publisher_against_the_broker() -> None:
    async with (
        running_broker() as broker,
        TcpProxy("127.0.0.1", broker.http_port) as proxy,
        AsyncHttpPublisher(f"http://127.0.0.1:{proxy.port}") as publisher,
        connect(f"ws://127.0.0.1:{broker.ws_port}/ws") as client,
    ):
        sub = await client.subscribe("web.*")
        results = [await publisher.publish("web.a", {"n": n}) for n in range(10)]
        assert results == [PublishResult()] * 10
        assert [(await within(anext(sub))).data["n"] for _ in range(10)] == list(range(10))
        # Concurrent publishes share a few connections; sequential ones reuse one.
        await asyncio.gather(*(publisher.publish("web.b", n) for n in range(8)))
        assert 1 <= proxy.accepted <= 4
        with pytest.raises(BadChannel) as info:
            await publisher.publish("web.*", 1)
        assert info.value.code == "bad_channel"
        with pytest.raises(TooLarge):
            await publisher.publish("web.a", "x" * 70_000)
        keyed = await publisher.publish("web.a", "k", key="order-1")
        assert isinstance(keyed, PublishResult)
    with pytest.raises(ConnectionClosed):
        await publisher.publish("web.a", 1)  # closed
    async with AsyncHttpPublisher(f"http://127.0.0.1:{free_port()}") as nowhere:
        with pytest.raises(ConnectionClosed):
            await nowhere.publish("web.a", 1)


# --- against a scripted server -----------------------------------------------------------

Answer = Callable[[int], bytes | None]  # request number -> raw answer; None: close silently


def json_answer(status: int, body: object, *, close: bool = False, reason: str = "X") -> bytes:
    payload = orjson.dumps(body)
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(payload)}\r\n" + ("Connection: close\r\n" if close else "")
    return (head + "\r\n").encode() + payload


@dataclass
class Recorder:
    """What the scripted server received: per request, its headers and JSON body."""

    port: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)
    bodies: list[object] = field(default_factory=list)
    connections: int = 0


@asynccontextmanager
async def scripted(answer: Answer) -> AsyncIterator[Recorder]:
    seen = Recorder()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.connections += 1
        try:
            while request_line := await reader.readline():
                assert request_line.startswith(b"POST /publish HTTP/1.1")
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers["content-length"]))
                seen.headers.append(headers)
                seen.bodies.append(orjson.loads(body))
                raw = answer(len(seen.bodies))
                if raw is None:
                    break
                if raw == b"hang":
                    await asyncio.sleep(30)
                writer.write(raw)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    seen.port = server.sockets[0].getsockname()[1]
    try:
        yield seen
    finally:
        server.close()
        # Handlers still sleeping ("hang") are cancelled with the server.
        await asyncio.wait_for(server.wait_closed(), 5)


OK = json_answer(200, {"ok": True, "offset": 3, "epoch": "e1", "duplicate": True})


async def test_api_key_and_key_are_sent_and_the_result_read() -> None:
    async with scripted(lambda n: OK) as seen:
        base = f"http://127.0.0.1:{seen.port}"
        async with AsyncHttpPublisher(base, api_key="s3cret") as publisher:
            result = await publisher.publish("a.b", {"x": 1}, key="k-9")
            assert result == PublishResult(offset=3, epoch="e1", duplicate=True)
            await publisher.publish("a.b", 2)
        sync = HttpPublisher(base, api_key="s3cret", idempotent=True)
        assert await asyncio.to_thread(sync.publish, "a.c", 3, key="k-10") == result
        await asyncio.to_thread(sync.publish, "a.c", 4)  # a generated key
    assert all(h["authorization"] == "Bearer s3cret" for h in seen.headers)
    assert seen.headers[0]["host"] == f"127.0.0.1:{seen.port}"
    assert seen.bodies[0] == {"channel": "a.b", "data": {"x": 1}, "key": "k-9"}
    assert seen.bodies[1] == {"channel": "a.b", "data": 2}  # no key unless asked
    assert seen.bodies[2] == {"channel": "a.c", "data": 3, "key": "k-10"}
    generated = seen.bodies[3]
    assert isinstance(generated, dict) and 1 <= len(generated["key"]) <= 128
    assert seen.connections == 3  # the async publisher kept its connection; urllib did not


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (json_answer(401, {"error": {"code": "unauthorized", "message": "no key"}}), Unauthorized),
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 5\r\n\r\nbusy!", Unavailable),
        (
            b"HTTP/1.1 401 No\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'a\r\n{"error": \r\n33\r\n{"code": "unauthorized", "message": "chunked too"}}'
            b"\r\n0\r\n\r\n",
            Unauthorized,
        ),
    ],
)
async def test_error_answers_map_to_the_typed_exceptions(raw: bytes, error: type) -> None:
    async with (
        scripted(lambda n: raw) as seen,
        AsyncHttpPublisher(f"http://127.0.0.1:{seen.port}") as publisher,
    ):
        with pytest.raises(error):
            await publisher.publish("a", 1)
        # The connection is still usable after an error answer.
        with pytest.raises(error):
            await publisher.publish("a", 1)
        assert seen.connections == 1
        sync = HttpPublisher(f"http://127.0.0.1:{seen.port}")
        with pytest.raises(error):
            await asyncio.to_thread(sync.publish, "a", 1)


async def test_a_keep_alive_connection_closed_by_the_server_is_retried_only_with_a_key() -> None:
    # The second request on the first connection is read and never answered:
    # what a server closing an idle connection looks like, from the client.
    async with (
        scripted(lambda n: None if n in (2, 4) else OK) as seen,
        AsyncHttpPublisher(f"http://127.0.0.1:{seen.port}") as publisher,
    ):
        await publisher.publish("a", 1)
        result = await publisher.publish("a", 2, key="retry-me")  # request 2 lost, 3 answered
        assert result.duplicate and seen.bodies[1] == seen.bodies[2]
        with pytest.raises(ConnectionClosed) as info:
            await publisher.publish("a", 3)  # request 4 lost: no key, no retry
        assert "may or may not" in info.value.message
        assert len(seen.bodies) == 4


async def test_no_answer_is_a_timeout() -> None:
    async with (
        scripted(lambda n: b"hang") as seen,
        AsyncHttpPublisher(f"http://127.0.0.1:{seen.port}", timeout=0.3) as publisher,
    ):
        with pytest.raises(Timeout):
            await publisher.publish("a", 1)
        with pytest.raises(Timeout):
            await publisher.publish("a", 1, timeout=0.1)
        assert seen.connections == 2  # a timed-out connection is not reused


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        AsyncHttpPublisher("ws://127.0.0.1:1")
    with pytest.raises(ValueError):
        HttpPublisher(headers={"X-Evil": "a\r\nInjected: 1"})
