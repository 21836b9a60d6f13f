"""The WebSocket server end to end: a real broker on an ephemeral port, real clients.

Every error code, every close code the broker decides (1001, 1008, 1009, 1013),
patterns, once-per-connection delivery, ordering, limits and hostile input.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close

from broker.app import Running
from broker.backplane import Published
from broker.backplane.memory import MemoryBackplane
from broker.exceptions import BackplaneError
from broker.frames import SERVER_FRAME
from tests.inproc import running_broker
from tests.tcpproxy import TcpProxy
from tests.wait import until, within

# --- helpers ------------------------------------------------------------------------


def ws_url(broker: Running, path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{broker.ws_port}{path}"


async def send(ws: ClientConnection, frame: dict[str, Any] | str | bytes) -> None:
    """Send one text frame; a dict is encoded as JSON, bytes are sent as they are."""
    if isinstance(frame, dict):
        frame = orjson.dumps(frame)
    await ws.send(frame, text=True)


async def recv(ws: ClientConnection) -> dict[str, Any]:
    """Receive one frame and check it is a well-formed server frame."""
    raw = await within(ws.recv())
    frame: dict[str, Any] = orjson.loads(raw)
    SERVER_FRAME.validate_python(frame)
    return frame


async def request(ws: ClientConnection, frame: dict[str, Any] | str | bytes) -> dict[str, Any]:
    await send(ws, frame)
    return await recv(ws)


def assert_error(frame: dict[str, Any], code: str, request_id: int | str | None) -> None:
    assert frame["op"] == "error", frame
    assert set(frame) == {"op", "id", "code", "message"}, frame
    assert (frame["code"], frame["id"]) == (code, request_id), frame
    assert isinstance(frame["message"], str) and frame["message"]


async def assert_alive(ws: ClientConnection, request_id: str = "alive") -> None:
    """The connection is open and everything sent before has been answered."""
    assert await request(ws, {"op": "ping", "id": request_id}) == {"op": "pong", "id": request_id}


async def drain(ws: ClientConnection, limit: int = 100_000) -> tuple[list[dict[str, Any]], Close]:
    """Read frames until the server closes; return them and the close frame received."""
    frames: list[dict[str, Any]] = []
    for _ in range(limit):
        try:
            raw = await within(ws.recv())
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, f"closed without a close frame: {exc!r}"
            return frames, exc.rcvd
        frames.append(orjson.loads(raw))
    raise AssertionError(f"still open after {limit} frames")


async def subscribe(ws: ClientConnection, *patterns: str) -> None:
    for i, pattern in enumerate(patterns):
        reply = await request(ws, {"op": "subscribe", "id": f"s{i}", "channel": pattern})
        assert reply == {"op": "ok", "id": f"s{i}"}


async def publish(ws: ClientConnection, channel: str, data: Any, request_id: Any = "p") -> None:
    reply = await request(ws, {"op": "publish", "id": request_id, "channel": channel, "data": data})
    assert reply == {"op": "ok", "id": request_id}


@asynccontextmanager
async def clients(broker: Running, count: int) -> AsyncIterator[list[ClientConnection]]:
    connections = [await within(connect(ws_url(broker))) for _ in range(count)]
    try:
        yield connections
    finally:
        for ws in connections:
            await within(ws.close())


class FaultyBackplane(MemoryBackplane):
    """The memory backplane plus a flag: ``explode`` makes publish raise a bug."""

    def __init__(self) -> None:
        super().__init__()
        self.explode = False
        self.fail_with: BaseException | None = None

    def publish(self, channel: str, data: bytes, **options: Any) -> asyncio.Future[Published]:
        if self.explode:
            raise RuntimeError("a bug in the backplane")
        if self.fail_with is not None:
            future: asyncio.Future[Published] = asyncio.get_running_loop().create_future()
            future.set_exception(self.fail_with)
            return future
        return super().publish(channel, data, **options)


# --- every error code -------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code", "request_id"),
    [
        (b"not json", "bad_frame", None),
        (b"[1,2]", "bad_frame", None),
        (b'{"op":"publish","id":1,"channel":"c","data":NaN}', "bad_frame", None),
        (b'{"op":"nope","id":"r1"}', "bad_request", "r1"),
        (b'{"op":"ping","id":2,"extra":true}', "bad_request", 2),
        (b'{"op":"subscribe","id":3}', "bad_request", 3),
        (b'{"op":"subscribe","id":3,"channel":7}', "bad_request", 3),
        (b'{"op":"ping","id":true}', "bad_request", None),
        (b'{"op":"subscribe","id":4,"channel":"a..b"}', "bad_channel", 4),
        (b'{"op":"publish","id":5,"channel":"a.*","data":1}', "bad_channel", 5),
        (b'{"op":"unsubscribe","id":6,"channel":"never"}', "not_subscribed", 6),
        (b'{"op":"subscribe","channel":"bad channel"}', "bad_channel", None),
    ],
)
async def test_request_error_frame_and_the_connection_stays_up(
    frame: bytes, code: str, request_id: int | str | None
) -> None:
    async with running_broker() as broker, connect(ws_url(broker)) as ws:
        assert_error(await request(ws, frame), code, request_id)
        await assert_alive(ws)
        assert broker.node.metrics.errors[code] == 1


async def test_too_large_at_the_default_cap_of_64_kib() -> None:
    async with running_broker() as broker, connect(ws_url(broker)) as ws:
        # A JSON string of n characters is n + 2 bytes serialized.
        await publish(ws, "c", "x" * (65536 - 2), request_id=1)
        reply = await request(ws, {"op": "publish", "id": 2, "channel": "c", "data": "x" * 65535})
        assert_error(reply, "too_large", 2)
        assert "65537 bytes" in reply["message"]
        await assert_alive(ws)


async def test_rate_limited() -> None:
    async with (
        running_broker(rate_limit=0.001, rate_burst=3) as broker,
        clients(broker, 2) as (ws, other),
    ):
        for i in range(3):
            await assert_alive(ws, f"ok-{i}")
        assert_error(await request(ws, {"op": "ping", "id": "over"}), "rate_limited", "over")
        assert_error(await request(ws, {"op": "ping"}), "rate_limited", None)
        # The bucket is per connection.
        await assert_alive(other)


async def test_limit_exceeded_for_subscriptions() -> None:
    async with running_broker(max_subscriptions=2) as broker, connect(ws_url(broker)) as ws:
        await subscribe(ws, "a", "b.*")
        reply = await request(ws, {"op": "subscribe", "id": 9, "channel": "c"})
        assert_error(reply, "limit_exceeded", 9)
        await subscribe(ws, "a")  # already there: ok
        await assert_alive(ws)


async def test_unavailable_when_the_backplane_cannot_take_the_message() -> None:
    backplane = MemoryBackplane()
    async with running_broker(backplane=backplane) as broker, clients(broker, 2) as (ws, sub):
        await subscribe(sub, "c")
        backplane.fail_publish = True
        reply = await request(ws, {"op": "publish", "id": 8, "channel": "c", "data": 1})
        assert_error(reply, "unavailable", 8)
        assert_error(
            await request(ws, {"op": "publish", "channel": "c", "data": 2}), "unavailable", None
        )
        await assert_alive(ws)
        backplane.fail_publish = False
        await publish(ws, "c", 3)
        # Not delivered: the subscriber sees only the message published afterwards.
        assert await recv(sub) == {"op": "message", "channel": "c", "data": 3}
        assert broker.node.metrics.publish_failures == 2


async def test_internal_error_keeps_the_connection_up() -> None:
    backplane = FaultyBackplane()
    async with running_broker(backplane=backplane) as broker, connect(ws_url(broker)) as ws:
        backplane.explode = True
        reply = await request(ws, {"op": "publish", "id": 9, "channel": "c", "data": 1})
        assert reply["op"] == "error" and reply["code"] == "internal"
        assert set(reply) == {"op", "id", "code", "message"}
        assert "RuntimeError" not in reply["message"]  # no details leak to the client
        await assert_alive(ws)
        backplane.explode = False
        await publish(ws, "c", 2)
        assert broker.node.metrics.errors["internal"] == 1


async def test_internal_error_carries_the_request_id() -> None:
    backplane = FaultyBackplane()
    async with running_broker(backplane=backplane) as broker, connect(ws_url(broker)) as ws:
        backplane.explode = True
        reply = await request(ws, {"op": "publish", "id": 9, "channel": "c", "data": 1})
        assert_error(reply, "internal", 9)


async def test_a_publish_future_failing_with_a_bug_gets_one_error_reply_with_its_id() -> None:
    backplane = FaultyBackplane()
    async with running_broker(backplane=backplane) as broker, connect(ws_url(broker)) as ws:
        backplane.fail_with = RuntimeError("a bug in the backplane")
        reply = await request(ws, {"op": "publish", "id": "f", "channel": "c", "data": 1})
        # Our bug, not an outage: 'internal', with the id, and no details.
        assert_error(reply, "internal", "f")
        assert "a bug" not in reply["message"]
        backplane.fail_with = BackplaneError("down")
        assert_error(
            await request(ws, {"op": "publish", "id": "g", "channel": "c", "data": 1}),
            "unavailable",
            "g",
        )
        await assert_alive(ws)


async def test_id_less_requests_get_no_reply_on_success() -> None:
    async with running_broker() as broker, clients(broker, 2) as (ws, other):
        for frame in (
            {"op": "subscribe", "channel": "x"},
            {"op": "subscribe", "channel": "x"},
            {"op": "publish", "channel": "elsewhere", "data": 1},
            {"op": "ping"},
            {"op": "unsubscribe", "channel": "x"},
        ):
            await send(ws, frame)
        await send(ws, {"op": "unsubscribe", "channel": "x"})  # fails: error with id null
        assert_error(await recv(ws), "not_subscribed", None)
        await assert_alive(ws)
        # The subscription was real: made and dropped without a word.
        await send(other, {"op": "publish", "channel": "x", "data": 1})
        await assert_alive(other)
        await assert_alive(ws, "still-nothing")


# --- close codes -----------------------------------------------------------------


async def test_frame_over_max_frame_bytes_closes_with_1009() -> None:
    async with running_broker(max_frame_bytes=4096, max_data_bytes=1024) as broker:
        async with connect(ws_url(broker)) as ws:
            head = '{"op":"ping","id":1'
            exactly = head + " " * (4096 - len(head) - 1) + "}"
            assert len(exactly.encode()) == 4096
            assert await request(ws, exactly) == {"op": "pong", "id": 1}
            await send(ws, exactly + " ")
            frames, close = await drain(ws)
            assert frames == []
            assert close.code == 1009
        async with connect(ws_url(broker)) as ws:
            await assert_alive(ws)


async def test_error_budget_closes_with_1008() -> None:
    async with running_broker(error_limit=3) as broker, connect(ws_url(broker)) as ws:
        for _ in range(4):
            await send(ws, b"junk")
        frames, close = await drain(ws)
        assert [f["code"] for f in frames] == ["bad_frame"] * 4
        assert (close.code, close.reason) == (1008, "too many errors")
        assert broker.node.metrics.abuse_disconnects == 1


async def test_connection_limit_sends_limit_exceeded_then_1013() -> None:
    async with running_broker(max_connections=2) as broker:
        async with clients(broker, 2) as (first, second):
            async with connect(ws_url(broker)) as third:
                frames, close = await drain(third)
                assert len(frames) == 1
                assert_error(frames[0], "limit_exceeded", None)
                assert (close.code, close.reason) == (1013, "too many connections")
            await assert_alive(first)
            await within(second.close())
            await until(lambda: len(broker.node.peers) == 1)
            async with connect(ws_url(broker)) as fourth:
                await assert_alive(fourth)
        assert broker.node.metrics.connections_rejected == 1


async def test_shutdown_flushes_and_closes_every_connection_with_1001() -> None:
    async with running_broker() as broker, clients(broker, 3) as (sub, pub, idle):
        await subscribe(sub, "c")
        for i in range(100):
            await send(pub, {"op": "publish", "channel": "c", "data": i})
        await assert_alive(pub)  # all 100 handed over (memory: queued to sub)

        broker.stop.set()

        frames, close = await drain(sub)
        assert [f["data"] for f in frames] == list(range(100))
        assert (close.code, close.reason) == (1001, "server shutting down")
        for ws in (pub, idle):
            frames, close = await drain(ws)
            assert (frames, close.code) == ([], 1001)
        with pytest.raises((OSError, InvalidStatus)):
            async with connect(ws_url(broker), open_timeout=2):
                pass


def _small_receive_buffer_socket(port: int) -> socket.socket:
    """A connected socket with a tiny receive buffer, so a client that stops
    reading backs up into the server quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


@pytest.mark.parametrize(
    ("close_timeout", "pause"),
    [
        (10.0, 0.0),
        # A client that reads only after the usual close_timeout still gets its
        # 1013 (the cut waits longer, SLOW_CONSUMER_CLOSE_TIMEOUT), not a 1006.
        (0.5, 2.0),
    ],
)
async def test_slow_consumer_is_closed_with_1013_and_nobody_else_notices(
    close_timeout: float, pause: float
) -> None:
    cap = 64 * 1024
    async with running_broker(max_backlog_bytes=cap, close_timeout=close_timeout) as broker:
        sock = _small_receive_buffer_socket(broker.ws_port)
        # max_queue=1: the client stops reading its socket after one unread frame.
        async with (
            connect(ws_url(broker), sock=sock, max_queue=1) as slow,
            clients(broker, 2) as (pub, fast),
        ):
            await subscribe(slow, "flood")
            await subscribe(fast, "flood")

            async def read_all() -> list[Any]:
                seen: list[Any] = []
                while not seen or seen[-1] != "done":
                    seen.append((await recv(fast))["data"])
                return seen

            reader = asyncio.create_task(read_all())
            payload = "x" * 8000
            published = 0
            for i in range(3000):  # about 24 MB at most; ~400 fill the kernel buffers
                await publish(pub, "flood", [i, payload], request_id=i)
                published += 1
                if broker.node.metrics.slow_consumer_disconnects:
                    break
            assert broker.node.metrics.slow_consumer_disconnects == 1, "never detected"
            await publish(pub, "flood", "done")

            seen = await within(reader)
            assert [item[0] for item in seen[:-1]] == list(range(published))

            # The slow client reads at last: what its socket held, then the close.
            await asyncio.sleep(pause)
            frames, close = await drain(slow)
            assert close.code == 1013
            assert close.reason == f"slow consumer: backlog over {cap} bytes"
            assert all(f["op"] == "message" for f in frames)
            received = [f["data"][0] for f in frames]
            assert received == list(range(len(received)))  # in order, a prefix, no gaps
            assert len(received) < published
            await assert_alive(pub)
            await assert_alive(fast)
        async with aiohttp.ClientSession() as http:
            metrics_url = f"http://127.0.0.1:{broker.http_port}/metrics"
            async with http.get(metrics_url) as response:
                exposition = await response.text()
        assert "\nbroker_slow_consumer_disconnects_total 1.0\n" in exposition


# --- patterns, once per connection, ordering ----------------------------------------------


async def test_patterns_end_to_end() -> None:
    async with running_broker() as broker, clients(broker, 5) as (pub, star, gt, exact, all_):
        await subscribe(star, "sensors.*")
        await subscribe(gt, "sensors.>")
        await subscribe(exact, "sensors.kitchen.temp")
        await subscribe(all_, ">")
        expected = {
            "sensors.kitchen": [star, gt, all_],
            "sensors.kitchen.temp": [gt, exact, all_],
            "sensors": [all_],
            "other.kitchen": [all_],
        }
        for i, (channel, receivers) in enumerate(expected.items()):
            await publish(pub, channel, i)
            for ws in (star, gt, exact, all_):
                if ws in receivers:
                    assert await recv(ws) == {"op": "message", "channel": channel, "data": i}
                # Nothing else is pending: the next frame is the reply to this ping.
                await assert_alive(ws, f"after-{i}")


async def test_a_connection_receives_a_message_once_however_many_subscriptions_match() -> None:
    async with running_broker() as broker, clients(broker, 2) as (pub, sub):
        await subscribe(sub, "a.b", "a.*", "a.>", ">", "*.b", "*.*", "*.>")
        await publish(pub, "a.b", {"n": 1})
        assert await recv(sub) == {"op": "message", "channel": "a.b", "data": {"n": 1}}
        await assert_alive(sub)
        assert broker.node.metrics.messages_delivered == 1


async def test_a_publisher_subscribed_to_its_channel_receives_its_own_message() -> None:
    async with running_broker() as broker, connect(ws_url(broker)) as ws:
        await subscribe(ws, "self")
        await send(ws, {"op": "publish", "id": 1, "channel": "self", "data": "me"})
        frames = [await recv(ws), await recv(ws)]
        assert {"op": "message", "channel": "self", "data": "me"} in frames
        assert {"op": "ok", "id": 1} in frames


async def test_compressed_and_plain_connections_get_the_same_frames() -> None:
    async with (
        running_broker(compression=True) as broker,
        connect(ws_url(broker)) as deflated,
        connect(ws_url(broker), compression=None) as plain,
        connect(ws_url(broker), compression=None) as pub,
    ):
        assert deflated.protocol.extensions and not plain.protocol.extensions
        for ws in (deflated, plain):
            await subscribe(ws, "z.>")
        for i in range(50):
            await send(pub, {"op": "publish", "channel": f"z.{i % 3}", "data": "x" * i})
        await assert_alive(pub)
        for ws in (deflated, plain):
            received = [await recv(ws) for _ in range(50)]
            assert [m["data"] for m in received] == ["x" * i for i in range(50)]
            await assert_alive(ws)


async def test_order_of_1000_messages_to_several_subscribers() -> None:
    count = 1000
    async with running_broker() as broker, clients(broker, 4) as (pub, *subs):
        await subscribe(subs[0], "seq")
        await subscribe(subs[1], ">")
        await subscribe(subs[2], "seq", "*")  # overlapping: still once each
        for i in range(count):
            frame: dict[str, Any] = {"op": "publish", "channel": "seq", "data": i}
            if i % 2:
                frame["id"] = i
            await send(pub, frame)
        replies = [await recv(pub) for _ in range(count // 2)]
        assert replies == [{"op": "ok", "id": i} for i in range(1, count, 2)]
        for sub in subs:
            received = [await recv(sub) for _ in range(count)]
            assert [m["data"] for m in received] == list(range(count))
            assert {m["channel"] for m in received} == {"seq"}
            await assert_alive(sub)


async def test_unsubscribe_stops_delivery() -> None:
    async with running_broker() as broker, clients(broker, 2) as (pub, sub):
        await subscribe(sub, "a.*", "a.b")
        reply = await request(sub, {"op": "unsubscribe", "id": "u", "channel": "a.*"})
        assert reply == {"op": "ok", "id": "u"}
        await publish(pub, "a.b", 1)
        assert (await recv(sub))["data"] == 1  # still subscribed to a.b
        await publish(pub, "a.c", 2)
        await assert_alive(sub)  # a.c no longer matches anything
        reply = await request(sub, {"op": "unsubscribe", "id": "v", "channel": "a.b"})
        assert reply == {"op": "ok", "id": "v"}
        await publish(pub, "a.b", 3)
        await assert_alive(sub)
        assert broker.node.hub.subscription_count == 0


async def test_closing_a_connection_drops_its_subscriptions() -> None:
    async with running_broker() as broker:
        async with connect(ws_url(broker)) as ws:
            await subscribe(ws, "a", "b.*", "c.>")
            assert broker.node.hub.subscription_count == 3
        await until(lambda: broker.node.hub.subscription_count == 0 and not broker.node.peers)


# --- HTTP on the WebSocket port ----------------------------------------------------


async def test_plain_http_on_the_websocket_port() -> None:
    async with running_broker() as broker, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{broker.ws_port}"
        async with http.get(f"{base}/healthz") as response:
            assert response.status == 200
        for path in ("/", "/nope", "/ws/extra", "/publish", "/metrics"):
            async with http.get(base + path) as response:
                assert response.status == 404, path
        async with http.get(f"{base}/ws") as response:
            assert response.status == 426  # a GET without the upgrade headers
    async with running_broker() as broker:
        with pytest.raises(InvalidStatus) as caught:
            async with connect(ws_url(broker, "/other")):
                pass
        assert caught.value.response.status_code == 404
        async with connect(ws_url(broker, "/ws?token=x")) as ws:  # the query is ignored
            await assert_alive(ws)


async def test_other_methods_on_the_websocket_port_get_http_errors() -> None:
    # websockets alone would drop these connections without an answer.
    async with running_broker() as broker, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{broker.ws_port}"
        async with http.post(f"{base}/publish", json={"channel": "a", "data": 1}) as response:
            assert response.status == 404
            assert "WebSocket is at /ws" in await response.text()
        async with http.post(f"{base}/ws", data=b"x") as response:
            assert response.status == 405
            assert response.headers["Allow"] == "GET"
        async with http.delete(f"{base}/healthz") as response:
            assert response.status == 405
        async with http.head(f"{base}/nope") as response:
            assert response.status == 404
            assert await response.read() == b""
        await assert_alive_url(ws_url(broker))


async def assert_alive_url(url: str) -> None:
    async with connect(url) as ws:
        await assert_alive(ws)


# --- hostile input ---------------------------------------------------------------------


async def test_binary_frame_is_bad_frame() -> None:
    async with running_broker() as broker, connect(ws_url(broker)) as ws:
        await ws.send(b'{"op":"ping","id":1}')  # bytes without text=True: a binary frame
        reply = await recv(ws)
        assert_error(reply, "bad_frame", None)
        assert "binary" in reply["message"]
        await assert_alive(ws)


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfe", b'{"op":"ping","id":"\xc3"}', b'{"op":"ping","id":"\xed\xa0\x80"}'],
)
async def test_invalid_utf8_in_a_text_frame_is_bad_frame(raw: bytes) -> None:
    async with running_broker() as broker, connect(ws_url(broker)) as ws:
        await ws.send(raw, text=True)  # websockets sends the bytes as they are
        reply = await recv(ws)
        assert_error(reply, "bad_frame", None)
        assert "UTF-8" in reply["message"]
        # Valid multi-byte UTF-8 is fine.
        reply = await request(ws, '{"op":"ping","id":"caf\u00e9 \U0001f600"}'.encode())
        assert reply == {"op": "pong", "id": "caf\u00e9 \U0001f600"}


async def test_deep_nesting_is_refused_and_the_connection_lives() -> None:
    async with running_broker() as broker, connect(ws_url(broker)) as ws:
        assert_error(await request(ws, "[" * 100_000 + "]" * 100_000), "bad_frame", None)
        deep = '{"op":"publish","id":1,"channel":"c","data":' + "[" * 1020 + "]" * 1020 + "}"
        assert_error(await request(ws, deep), "bad_request", 1)
        ok = '{"op":"publish","id":2,"channel":"c","data":' + "[" * 900 + "]" * 900 + "}"
        assert await request(ws, ok) == {"op": "ok", "id": 2}
        await assert_alive(ws)


async def test_fragmented_messages_up_to_the_websockets_cap() -> None:
    async with running_broker(close_timeout=0.5) as broker:
        async with connect(ws_url(broker)) as ws:
            frame = '{"op":"ping","id":"frag"' + " " * 200 + "}"
            await ws.send(list(frame))  # one fragment per character
            assert await recv(ws) == {"op": "pong", "id": "frag"}
            many = '{"op":"ping","id":"many"' + " " * 5000 + "}"
            await ws.send(list(many))  # over websockets' cap of 4,096 fragments
            frames, close = await drain(ws)
            assert frames == []
            assert (close.code, close.reason) == (1009, "too many fragments")
        async with connect(ws_url(broker)) as ws:
            await assert_alive(ws)
        # The server lets go of it (after close_timeout: websockets leaves the reading
        # paused after this error, so the client's EOF is not seen before that).
        await until(lambda: len(broker.node.peers) == 1, timeout=5)


async def test_flood_of_garbage_with_a_high_error_limit_is_answered_in_full() -> None:
    count = 10_000
    async with running_broker(error_limit=count + 1) as broker, connect(ws_url(broker)) as ws:

        async def read() -> list[dict[str, Any]]:
            return [await recv(ws) for _ in range(count)]

        reader = asyncio.create_task(read())
        for i in range(count):
            await send(ws, b"\x00garbage" if i % 2 else b'{"op":')
        frames = await within(reader, 30)
        assert {(f["op"], f["code"], f["id"]) for f in frames} == {("error", "bad_frame", None)}
        await assert_alive(ws)
        assert broker.node.metrics.errors["bad_frame"] == count


async def test_flood_of_garbage_closes_with_1008_and_the_server_carries_on() -> None:
    count = 10_000
    async with running_broker() as broker:  # default error budget: 50 in 10 s
        async with connect(ws_url(broker)) as ws:
            reader = asyncio.create_task(drain(ws))
            sent = 0
            try:
                for _ in range(count):
                    await send(ws, b"garbage")
                    sent += 1
            except ConnectionClosed:
                pass
            frames, close = await within(reader, 30)
            assert (close.code, close.reason) == (1008, "too many errors")
            assert len(frames) == 51  # the error that crossed the limit, then the close
            assert all(f["code"] == "bad_frame" for f in frames)
        async with connect(ws_url(broker)) as ws:
            await assert_alive(ws)
        assert broker.node.metrics.abuse_disconnects == 1


async def test_a_dead_peer_is_dropped_by_ping_timeout() -> None:
    async with (
        running_broker(ping_interval=0.2, ping_timeout=0.3, close_timeout=0.3) as broker,
        TcpProxy("127.0.0.1", broker.ws_port) as proxy,
    ):
        ws = await connect(f"ws://127.0.0.1:{proxy.port}/ws", ping_interval=None)
        try:
            await subscribe(ws, "dead.>")
            assert len(broker.node.peers) == 1
            proxy.pause()  # the link goes silent both ways, nothing is closed
            await until(lambda: not broker.node.peers, timeout=5)
            assert broker.node.hub.subscription_count == 0
        finally:
            proxy.resume()
            await ws.close()
