"""A small HTTP/1.1 server on h11: bytes in, one request at a time, JSON out.

Theory of operation. h11 does all the parsing (request line, headers,
``Content-Length``, chunked bodies); this module only moves bytes, owns the
timers and turns every way a request can fail into a JSON answer. One task
per connection runs ``_Connection.serve``: read a head (within ``timeout``),
ask the application whether to admit it (``Application.check``, pure), read
the body if the route takes one (within ``timeout`` again, at most
``max_body`` bytes), answer, and go round again if both sides may keep the
connection alive. Pipelined requests wait in h11's buffer until the answer
before them is written.

A connection is closed after an answer whose request was not read to its
end (a refused upload, a malformed request, a time-out): the answer says
``Connection: close``, the write side is shut, and what the client still
sends is read and dropped for up to ``LINGER`` seconds, so that closing with
unread bytes does not reset the connection before the client has read the
answer.

A keep-alive connection that sends nothing for ``timeout`` seconds is closed
without an answer; one that sent part of a request gets 408. ``close``
stops listening, closes idle connections at once and gives requests in
flight ``grace`` seconds to finish.

Nothing a client sends is logged above debug or with a traceback: malformed
input is an answer, not an error. The application decides what to log.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
from contextlib import suppress
from http import HTTPStatus
from typing import Protocol

import h11

from broker.codes import ErrorCode
from broker.http_gate import MAX_HEAD_BYTES, Admitted, Answer, Head, error

__all__ = ["CLOSE_GRACE", "LINGER", "MAX_CONNECTIONS", "Application", "HttpServer"]

log = logging.getLogger(__name__)

#: Open connections per process; one more is answered 429 and closed.
MAX_CONNECTIONS = 512
#: Seconds ``close`` waits for requests in flight by default.
CLOSE_GRACE = 5.0
#: Seconds, at most, spent reading and dropping what a client still sends
#: after an answer that closes its connection.
LINGER = 2.0
#: Bytes read from the socket at a time.
READ_SIZE = 64 * 1024


class Application(Protocol):
    """What the server asks of the service API behind it."""

    def check(self, head: Head) -> Admitted | Answer:
        """Admit a request from its head alone, or return the answer that refuses it."""

    async def respond(self, admitted: Admitted, body: bytes) -> Answer:
        """Answer an admitted request; ``body`` is complete (empty if none)."""

    def refused(self, answer: Answer, head: Head | None, peer: str) -> None:
        """Account for an error answer that ``respond`` did not make (count it, log it)."""


class HttpServer:
    """Listens on one address and serves ``app``, one task per connection."""

    def __init__(
        self,
        app: Application,
        *,
        timeout: float,
        max_body: int,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.app = app
        self.timeout = timeout
        self.max_body = max_body
        self.max_connections = max_connections
        self.closing = False
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(
        self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 100
    ) -> None:
        """Start listening; ``reuse_port`` binds with SO_REUSEPORT (several workers)."""
        self._server = await asyncio.start_server(
            self._accept, host, port, reuse_port=reuse_port or None, backlog=backlog
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        assert self._port is not None, "not started"
        return self._port

    async def close(self, grace: float = CLOSE_GRACE) -> None:
        """Stop listening, close idle connections, wait ``grace`` s for the rest, drop them."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            if connection.idle:
                connection.hang_up()
        tasks = set(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        connection = _Connection(self, reader, writer)
        try:
            if self.closing:
                await connection.serve(
                    error(503, ErrorCode.UNAVAILABLE, "shutting down", close=True)
                )
                return
            if len(self._connections) >= self.max_connections:
                await connection.serve(
                    error(429, ErrorCode.LIMIT_EXCEEDED, "too many connections", close=True)
                )
                return
            self._connections.add(connection)
            await connection.serve()
        except Exception:
            # Our bug, not the client's: whatever the client sent is an answer.
            log.exception("service API connection from %s failed", connection.peer)
        finally:
            self._connections.discard(connection)
            self._tasks.discard(task)


class _TooLarge(Exception):
    """The body passed ``max_body``."""


class _Connection:
    """One client connection: h11's state machine and the socket it reads."""

    def __init__(
        self, server: HttpServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._server = server
        self._reader = reader
        self._writer = writer
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        #: Waiting for the first byte of a request: safe to close at shutdown.
        self.idle = True
        self._opening = b""  # the first bytes of the current request

    def hang_up(self) -> None:
        """Close the socket now (an idle connection at shutdown)."""
        self._writer.close()

    async def serve(self, refusal: Answer | None = None) -> None:
        """Serve requests until one side closes; or send ``refusal`` at once and close."""
        try:
            if refusal is not None:
                self._server.app.refused(refusal, None, self.peer)
                await self._answer(None, refusal)
                return
            while await self._exchange():
                self._h11.start_next_cycle()
        except (ConnectionError, TimeoutError) as exc:
            log.debug("service API connection from %s lost: %r", self.peer, exc)
        finally:
            await self._close()

    async def _exchange(self) -> bool:
        """Serve one request; return whether the connection can take another."""
        server = self._server
        loop = asyncio.get_running_loop()
        self.idle, self._opening = True, b""
        if server.closing and not self._h11.trailing_data[0]:
            return False
        try:
            event = await self._next(loop.time() + server.timeout)
        except TimeoutError:
            if self.idle and not self._h11.trailing_data[0]:
                return False  # an idle keep-alive connection: close without a word
            message = f"request head not received within {server.timeout:g} s"
            return await self._refuse(None, error(408, ErrorCode.BAD_REQUEST, message))
        except h11.RemoteProtocolError as exc:
            return await self._refuse(None, self._malformed(exc))
        finally:
            self.idle = False
        if isinstance(event, h11.ConnectionClosed):
            return False
        assert isinstance(event, h11.Request), event
        head = _head(event)
        verdict = server.app.check(head)
        if isinstance(verdict, Answer):
            return await self._refuse(head, verdict)
        body = b""
        if verdict.takes_body:
            try:
                body = await self._body(loop.time() + server.timeout)
            except TimeoutError:
                message = f"request body not received within {server.timeout:g} s"
                return await self._refuse(head, error(408, ErrorCode.BAD_REQUEST, message))
            except _TooLarge:
                message = f"body is over the {server.max_body}-byte cap"
                return await self._refuse(head, error(413, ErrorCode.TOO_LARGE, message))
            except h11.RemoteProtocolError as exc:
                return await self._refuse(head, self._malformed(exc))
        return await self._answer(head, await server.app.respond(verdict, body))

    async def _next(self, deadline: float) -> h11.Event:
        """h11's next event, reading from the socket until ``deadline`` as needed."""
        while True:
            event = self._h11.next_event()
            if event is h11.PAUSED:
                # A protocol switch (CONNECT, Upgrade) we will not make, with more behind it.
                raise h11.RemoteProtocolError("cannot continue after a protocol switch", 400)
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Event)
                return event
            async with asyncio.timeout_at(deadline):
                data = await self._reader.read(READ_SIZE)
            if data and self.idle:
                self.idle, self._opening = False, data[:2]
            self._h11.receive_data(data)  # b"": the client closed its side

    async def _body(self, deadline: float) -> bytes:
        """Read the request's body, at most ``max_body`` bytes, until ``deadline``."""
        if self._h11.they_are_waiting_for_100_continue:
            go_on = h11.InformationalResponse(status_code=100, headers=[])
            await self._write(self._h11.send(go_on) or b"")
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next(deadline)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self._server.max_body:
                    raise _TooLarge
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:  # ConnectionClosed: h11 raises before this for a short body
                raise h11.RemoteProtocolError("connection closed before the body ended", 400)

    def _malformed(self, exc: h11.RemoteProtocolError) -> Answer:
        """The answer to a request h11 could not parse."""
        if exc.error_status_hint == 431:
            message = f"request head is over the {MAX_HEAD_BYTES}-byte cap"
            return error(431, ErrorCode.TOO_LARGE, message, close=True)
        if self._opening[:1] == b"\x16":  # a TLS handshake record
            message = "this port speaks plain HTTP, not TLS: use http://"
        else:
            message = f"malformed HTTP request: {str(exc)[:200]}"
        return error(400, ErrorCode.BAD_FRAME, message, close=True)

    async def _refuse(self, head: Head | None, answer: Answer) -> bool:
        self._server.app.refused(answer, head, self.peer)
        return await self._answer(head, answer)

    async def _answer(self, head: Head | None, answer: Answer) -> bool:
        """Send ``answer``; return whether the connection may serve another request."""
        conn = self._h11
        if not _can_answer(conn):
            return False  # nothing can be sent any more (h11 is in its error state)
        close = answer.close or self._server.closing or not self._read_to_end()
        headers = [
            ("content-type", answer.content_type),
            ("content-length", str(len(answer.body))),
            ("date", email.utils.formatdate(usegmt=True)),
            ("cache-control", "no-store"),
            ("x-content-type-options", "nosniff"),
            *answer.headers,
        ]
        if close:
            headers.append(("connection", "close"))
        reason = HTTPStatus(answer.status).phrase.encode()
        response = h11.Response(status_code=answer.status, headers=headers, reason=reason)
        data = conn.send(response) or b""
        if head is None or head.method != "HEAD":
            data += conn.send(h11.Data(data=answer.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await self._write(data)
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            return True
        if conn.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            await self._linger()
        return False

    def _read_to_end(self) -> bool:
        """Whether the request was read to its end, taking what h11 already holds.

        A request without a body ends at once; the unread body of a refused
        request may already sit in h11's buffer (and is dropped).
        """
        conn = self._h11
        while conn.their_state is h11.SEND_BODY:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return False
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return False
        return conn.their_state is h11.DONE

    async def _write(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise ConnectionResetError("connection closed")
        self._writer.write(data)
        async with asyncio.timeout(self._server.timeout):
            await self._writer.drain()

    async def _linger(self) -> None:
        """Shut our side, then read and drop what the client still sends, briefly."""
        if self._writer.is_closing():
            return
        if self._writer.can_write_eof():
            self._writer.write_eof()
        dropped = 0
        with suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(min(LINGER, self._server.timeout)):
                while dropped <= self._server.max_body:
                    data = await self._reader.read(READ_SIZE)
                    if not data:
                        break
                    dropped += len(data)

    async def _close(self) -> None:
        writer = self._writer
        writer.close()
        try:
            async with asyncio.timeout(1.0):
                await writer.wait_closed()
        except TimeoutError:
            writer.transport.abort()  # a client that does not read: drop what is left
        except (ConnectionError, OSError):
            pass


def _can_answer(conn: h11.Connection) -> bool:
    return conn.our_state in (h11.IDLE, h11.SEND_RESPONSE)


def _head(request: h11.Request) -> Head:
    return Head(
        method=request.method.decode("latin-1"),
        target=request.target.decode("latin-1"),
        headers=tuple(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in request.headers
        ),
        version=request.http_version.decode("latin-1"),
    )
