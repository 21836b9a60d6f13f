"""Raw HTTP/1.1 over a socket, for tests that send what no client library would."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from tests.wait import within

#: The head of a valid publish, up to its length.
JSON_POST = "POST /publish HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"


@dataclass
class Reply:
    """One HTTP response as read off the socket."""

    status: int
    headers: dict[str, str]
    body: bytes
    raw_head: str = ""

    @property
    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json", self.headers
        return orjson.loads(self.body)


async def read_reply(reader: asyncio.StreamReader, timeout: float = 5.0) -> Reply:
    """Read one response; the broker always sends Content-Length."""
    head = (await within(reader.readuntil(b"\r\n\r\n"), timeout)).decode("latin-1")
    status_line, *lines = head.removesuffix("\r\n\r\n").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"{name} twice"
        headers[name.lower()] = value.strip()
    length = int(headers["content-length"])
    body = await within(reader.readexactly(length), timeout) if length else b""
    return Reply(int(status), headers, body, head)


async def is_closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """Whether the server closed the connection (nothing more than EOF arrives)."""
    try:
        return await within(reader.read(1), timeout) == b""
    except ConnectionResetError:
        return True


def assert_error(reply: Reply, status: int, code: str, words: str = "") -> None:
    assert reply.status == status, (reply.status, reply.body)
    body = reply.json
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert words in body["error"]["message"], body
    assert "server" not in reply.headers


@dataclass
class Client:
    """A raw connection to the service API."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes | str) -> None:
        raw = data.encode("latin-1") if isinstance(data, str) else data
        self.writer.write(raw)
        await within(self.writer.drain())

    async def reply(self, timeout: float = 5.0) -> Reply:
        return await read_reply(self.reader, timeout)

    async def closed(self, timeout: float = 5.0) -> bool:
        return await is_closed(self.reader, timeout)


@asynccontextmanager
async def raw(port: int) -> AsyncIterator[Client]:
    """A raw connection to ``127.0.0.1:port``, closed on exit."""
    reader, writer = await within(asyncio.open_connection("127.0.0.1", port))
    try:
        yield Client(reader, writer)
    finally:
        writer.close()
        with suppress(ConnectionError):
            await within(writer.wait_closed())


def assert_quiet(caplog: pytest.LogCaptureFixture) -> None:
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert loud == [], [f"{r.levelname} {r.name}: {r.getMessage()}" for r in loud]
