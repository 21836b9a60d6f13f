"""The service API's HTTP server: its connection cap and its shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from broker.backplane import Published
from broker.backplane.memory import MemoryBackplane
from broker.http import HttpApi
from broker.http_gate import Admitted, Answer, Head, json_answer
from broker.http_server import HttpServer
from broker.node import Node
from tests.inproc import make_settings
from tests.rawhttp import JSON_POST, assert_error, assert_quiet, is_closed, read_reply
from tests.wait import until, within


class _Echo:
    """A minimal application: admits everything, answers ``{"ok": true}``."""

    def check(self, head: Head) -> Admitted | Answer:
        return Admitted("healthz")

    async def respond(self, admitted: Admitted, body: bytes) -> Answer:
        return json_answer(200, {"ok": True})

    def refused(self, answer: Answer, head: Head | None, peer: str) -> None:
        pass


async def test_connections_over_the_limit_get_429(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = HttpServer(_Echo(), timeout=5.0, max_body=1024, max_connections=2)
    await server.start("127.0.0.1", 0)
    opened: list[asyncio.StreamWriter] = []
    try:
        readers = []
        for _ in range(2):
            reader, writer = await within(asyncio.open_connection("127.0.0.1", server.port))
            readers.append(reader)
            opened.append(writer)
        await until(lambda: len(server._connections) == 2)
        reader, writer = await within(asyncio.open_connection("127.0.0.1", server.port))
        opened.append(writer)
        assert_error(await read_reply(reader), 429, "limit_exceeded", "too many connections")
        assert await is_closed(reader)
        opened[0].write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await read_reply(readers[0])).json == {"ok": True}
    finally:
        for writer in opened:
            writer.close()
        await within(server.close())
    assert_quiet(caplog)


class _Slow(MemoryBackplane):
    """A memory backplane whose publishes wait for ``go``."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()
        self.waiting = 0

    def publish(self, channel: str, data: bytes, **options: Any) -> asyncio.Future[Published]:
        inner = super().publish(channel, data, **options)

        async def later() -> Published:
            self.waiting += 1
            await self.go.wait()
            return await inner

        return asyncio.ensure_future(later())


async def test_close_drops_idle_connections_and_finishes_requests_in_flight(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(http_timeout=5.0)
    backplane = _Slow()
    node = Node(settings, backplane, canary=False)
    await node.start()
    api = HttpApi(settings, node)
    await api.start()
    port = api.port
    try:
        idle_r, idle_w = await within(asyncio.open_connection("127.0.0.1", port))
        busy_r, busy_w = await within(asyncio.open_connection("127.0.0.1", api.port))
        busy_w.write((JSON_POST + 'Content-Length: 24\r\n\r\n{"channel":"a","data":1}').encode())
        await until(lambda: backplane.waiting == 1)
        closing = asyncio.create_task(api.close(grace=5.0))
        assert await is_closed(idle_r)  # at once, without an answer
        assert not closing.done()  # the publish is still in flight
        backplane.go.set()
        reply = await read_reply(busy_r)
        assert (reply.status, reply.json) == (200, {"ok": True})
        assert reply.headers["connection"] == "close"
        assert await is_closed(busy_r)
        await within(closing)
        with pytest.raises(OSError):
            await within(asyncio.open_connection("127.0.0.1", port))
        idle_w.close()
        busy_w.close()
    finally:
        await within(api.close())
        await within(node.close())
    assert_quiet(caplog)


async def test_close_gives_up_on_a_request_after_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(http_timeout=5.0)
    backplane = _Slow()
    node = Node(settings, backplane, canary=False)
    await node.start()
    api = HttpApi(settings, node)
    await api.start()
    try:
        reader, writer = await within(asyncio.open_connection("127.0.0.1", api.port))
        writer.write((JSON_POST + 'Content-Length: 24\r\n\r\n{"channel":"a","data":1}').encode())
        await until(lambda: backplane.waiting == 1)
        start = time.monotonic()
        await within(api.close(grace=0.2))
        assert time.monotonic() - start < 2.0
        assert await is_closed(reader)
        writer.close()
    finally:
        backplane.go.set()
        await within(node.close())
