"""An asyncio publisher over the broker's HTTP API, with keep-alive connections.

For asyncio services that only publish: one ``POST /publish`` per message on
the service port (default 8001), over a few persistent HTTP/1.1 connections
opened with asyncio streams, so no dependency beyond the client's own. It
builds the request and reads the answer with the same helpers as the
synchronous :class:`HttpPublisher`, so both raise the same exceptions and
return the same :class:`PublishResult`.

Connections. At most ``max_connections`` requests run at once, each on a
connection of its own; a connection whose answer allowed keep-alive goes
back to the pool and is reused, unless it stayed idle longer than
``keepalive`` seconds (the server may have closed it: aiohttp's default is
75 s) or the server already closed it. A publish on a reused connection that
the server closed before answering anything is posted again on a new
connection only when it has a ``key`` (then a second copy is dropped by the
broker); without one it raises :class:`ConnectionClosed`, as its delivery
is unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .errors import ConnectionClosed, Timeout
from .frames import PublishResult
from .http import (
    DEFAULT_HTTP_URL,
    error_from_response,
    pick_key,
    publish_body,
    request_headers,
    result_from_body,
)

__all__ = ["AsyncHttpPublisher"]

#: The largest answer body read, in bytes (the broker's are tiny).
MAX_BODY = 1 << 20
#: The most header lines read in one answer.
MAX_HEADERS = 100


class _NoAnswer(Exception):
    """The server closed the connection before sending a byte of its answer."""


@dataclass(eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0

    def usable(self, keepalive: float) -> bool:
        return (
            not self.reader.at_eof()
            and not self.writer.is_closing()
            and time.monotonic() - self.idle_since < keepalive
        )

    def close(self) -> None:
        self.writer.transport.abort()
        self.writer.close()


class AsyncHttpPublisher:
    """Publish messages with ``POST {base_url}/publish`` from asyncio code.

    ::

        async with AsyncHttpPublisher("http://localhost:8001", api_key=key) as publisher:
            result = await publisher.publish("orders.created", {"id": 42}, key="order-42")

    ``api_key`` is sent as ``Authorization: Bearer``. ``timeout`` (seconds,
    default 10) bounds each publish, connecting included; ``connect_timeout``
    (default 5) bounds opening a connection. ``max_connections`` (default 4)
    publishes run at once, the others wait their turn within their time-out;
    ``keepalive`` (seconds, default 15) is how long an idle connection is
    kept. ``headers`` are added to every request; ``idempotent`` gives every
    publish without a ``key`` a random one. ``https://`` URLs use TLS with
    the default context, or ``ssl_context``. Close it (``async with``, or
    :meth:`close`) to close its connections.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_HTTP_URL,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        max_connections: int = 4,
        keepalive: float = 15.0,
        headers: Mapping[str, str] | None = None,
        idempotent: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"need an http:// or https:// URL, not {base_url!r}")
        if timeout <= 0 or connect_timeout <= 0 or max_connections < 1:
            raise ValueError("timeouts must be positive and max_connections at least 1")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.idempotent = idempotent
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        self._path = (parts.path.rstrip("/") or "") + "/publish"
        default_port = self._port == (443 if self._ssl else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._headers = {
            "Host": host if default_port else f"{host}:{self._port}",
            "User-Agent": "wsbroker-client",
            **request_headers(api_key, headers),
        }
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"<AsyncHttpPublisher {self.base_url}>"

    async def __aenter__(self) -> AsyncHttpPublisher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the idle connections; publishing afterwards raises :class:`ConnectionClosed`."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        key: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - raises our typed Timeout
    ) -> PublishResult:
        """Publish ``data`` (any JSON value) to ``channel``; return once the broker took it.

        With a ``key`` the broker delivers the message once however many
        times it is posted (within its idempotency window): after a
        :class:`Timeout` or :class:`ConnectionClosed` post it again with the
        same key, and the result's ``duplicate`` says whether it was in.

        Raises the broker's error as its :class:`RequestError` subclass
        (``BadChannel``, ``TooLarge``, ``Unauthorized``, ``Unavailable`` ...),
        :class:`Timeout` after ``timeout`` (default: the publisher's),
        :class:`ConnectionClosed` when the broker cannot be reached or the
        connection broke before the answer, and ``TypeError`` if ``data`` is
        not JSON-encodable.
        """
        if self._closed:
            raise ConnectionClosed("the publisher is closed")
        key = pick_key(key, self.idempotent)
        body = publish_body(channel, data, key)
        head = "".join(f"{name}: {value}\r\n" for name, value in self._headers.items())
        request = (
            f"POST {self._path} HTTP/1.1\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        limit = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit), self._slots:
                status, answer = await self._exchange(request, retry=key is not None)
        except TimeoutError:
            raise Timeout(f"no answer from {self.base_url} within {limit:g} s") from None
        if status == 200:
            return result_from_body(answer)
        raise error_from_response(status, answer)

    async def _exchange(self, request: bytes, *, retry: bool) -> tuple[int, bytes]:
        while True:
            connection, reused = await self._acquire()
            try:
                status, answer, keep = await _round_trip(connection, request)
            except _NoAnswer:
                connection.close()
                if reused and retry:
                    continue  # a keep-alive connection the server had closed: post again
                raise ConnectionClosed(
                    f"{self.base_url} closed the connection without answering; "
                    "the message may or may not have been published"
                ) from None
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                connection.close()
                raise ConnectionClosed(
                    f"connection to {self.base_url} failed before the answer ({exc!r}); "
                    "the message may or may not have been published"
                ) from exc
            except BaseException:
                connection.close()  # cancelled or timed out mid-exchange: state unknown
                raise
            if keep and not self._closed:
                connection.idle_since = time.monotonic()
                self._idle.append(connection)
            else:
                connection.close()
            return status, answer

    async def _acquire(self) -> tuple[_Connection, bool]:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable(self.keepalive):
                return connection, True
            connection.close()
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self._host, self._port, ssl=self._ssl, limit=MAX_BODY
                )
        except TimeoutError:
            raise ConnectionClosed(
                f"cannot reach {self.base_url}: no connection within {self.connect_timeout:g} s"
            ) from None
        except OSError as exc:
            raise ConnectionClosed(f"cannot reach {self.base_url}: {exc}") from exc
        return _Connection(reader, writer), False


async def _round_trip(connection: _Connection, request: bytes) -> tuple[int, bytes, bool]:
    """Send ``request``, read the answer: (status, body, whether the connection may be reused)."""
    writer, reader = connection.writer, connection.reader
    writer.write(request)
    await writer.drain()
    try:
        line = await reader.readline()
    except ConnectionResetError:
        raise _NoAnswer from None
    if not line:
        raise _NoAnswer
    while True:
        version, status = _status_line(line)
        headers = await _headers(reader)
        if not 100 <= status < 200:
            break
        line = await reader.readline()  # an interim answer (100 Continue): the real one follows
    keep = version == "HTTP/1.1"
    connection_header = headers.get("connection", "").lower()
    if "close" in connection_header:
        keep = False
    elif "keep-alive" in connection_header:
        keep = True
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _chunked(reader)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if not 0 <= length <= MAX_BODY:
            raise ValueError(f"answer of {length} bytes")
        body = await reader.readexactly(length)
    else:
        body = await reader.read(MAX_BODY)  # until the server closes
        keep = False
    return status, body, keep


def _status_line(line: bytes) -> tuple[str, int]:
    parts = line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP status line: {line[:80]!r}")
    return parts[0], int(parts[1])


async def _headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS):
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            return headers
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    raise ValueError(f"more than {MAX_HEADERS} header lines")


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readline()
        size = int(size_line.split(b";")[0].strip(), 16)  # ValueError if not hex
        if size == 0:
            with contextlib.suppress(ValueError):
                await _headers(reader)  # trailers, then the final empty line
            return bytes(body)
        if len(body) + size > MAX_BODY:
            raise ValueError("answer over the size cap")
        body += await reader.readexactly(size)
        await reader.readexactly(2)  # the chunk's CRLF
