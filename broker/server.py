"""The WebSocket front-end: ``websockets`` glue and the per-connection writer.

Theory of operation. ``websockets`` owns the handshake, reading, pings and
the closing handshake. Everything the broker sends (replies and messages)
goes through a ``Connection``'s outbox instead of ``send()``: frames are
appended to a list and, once per event-loop iteration, a ``Flusher`` writes
each connection's list with a single ``transport.write``. A burst of messages
therefore costs one system call per connection, not one per message, and
replies stay in order with messages. The outbox counts the bytes it holds plus
the transport's buffer; past ``max_backlog_bytes`` the connection is closed
with 1013 and nothing else is affected.

Messages are framed once by the hub (server frames are unmasked, so the bytes
are the same for every connection). A connection that negotiated compression
cannot share them and frames its own through ``websockets``.

The write itself skips asyncio's ``transport.write`` while that is safe: when
the transport's buffer is empty, the outbox calls the socket's ``send``
directly, and only what the kernel did not take goes to the transport, which
then keeps it in order. Fan-out is one small write per connection, so the
Python around each system call is most of what the broker itself costs. Every
write ``websockets`` makes and every change of its state passes through
``BrokerConnection.send_data`` or ``connection_lost``, which tell the outbox
(``Connection.sync``); the outbox therefore knows, without asking on every
write, whether the transport holds bytes and whether the connection is open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State

from broker import codec
from broker.exceptions import LimitExceeded
from broker.metrics import Metrics
from broker.node import Node
from broker.session import Session
from broker.settings import Settings
from broker.wsframe import text_frame

log = logging.getLogger("broker.server")

WS_PATH = "/ws"
_OPEN = State.OPEN


class BrokerConnection(ServerConnection):
    """A ``ServerConnection`` that remembers whether each message was text or binary.

    ``recv(decode=False)`` returns bytes for both kinds (so invalid UTF-8 is
    ours to report as ``bad_frame`` rather than a 1007 close), which loses the
    opcode; the opcodes of the first frames of messages are kept here, in order.
    """

    # Slots, not instance attributes: websockets puts 27 attributes in the
    # instance dict; with our three it held 30, CPython stopped sharing its
    # keys between instances, and each connection cost 1.3 KiB more.
    __slots__ = ("_sniffed", "opcodes", "outbox")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A list, not a deque: an empty deque costs 760 bytes per connection, and
        # this holds at most max_queue entries.
        self.opcodes: list[Opcode] = []
        self._sniffed = False
        #: The broker's writer for this connection, once the handshake is done.
        self.outbox: Connection | None = None

    def send_data(self) -> None:
        # websockets writes (handshake, pongs, pings, the close frame) and changes
        # state only on paths that end here or in connection_lost.
        try:
            super().send_data()
        finally:
            if self.outbox is not None:
                self.outbox.sync()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.outbox is not None:
            self.outbox.sync()

    def data_received(self, data: bytes) -> None:
        # websockets only parses bodiless GET requests and drops anything else
        # without a word; answer other methods with a proper HTTP error instead.
        if not self._sniffed:
            self._sniffed = True
            end = data.find(b"\r\n")
            if end > 0:
                method, _, rest = data[:end].partition(b" ")
                if method != b"GET" and method.isalpha() and method.isupper():
                    self._refuse_method(method, rest.partition(b" ")[0])
                    return
        super().data_received(data)

    def _refuse_method(self, method: bytes, target: bytes) -> None:
        path = urlsplit(target.decode("latin-1")).path
        if path == WS_PATH or path in _GET_ROUTES:
            status, body = HTTPStatus.METHOD_NOT_ALLOWED, f"{path} only answers GET\n"
        else:
            status, body = HTTPStatus.NOT_FOUND, f"not found: {path}; WebSocket is at /ws\n"
        payload = body.encode() if method != b"HEAD" else b""
        head = (
            f"HTTP/1.1 {status.value} {status.phrase}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body.encode())}\r\n"
            + ("Allow: GET\r\n" if status is HTTPStatus.METHOD_NOT_ALLOWED else "")
            + "Connection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + payload)
        self.transport.close()

    def process_event(self, event: Any) -> None:
        opcode = getattr(event, "opcode", None)
        if self.request is not None and (opcode is Opcode.TEXT or opcode is Opcode.BINARY):
            self.opcodes.append(opcode)
        super().process_event(event)

    async def recv_frame(self) -> tuple[bytes, bool]:
        """Return the next message's bytes and whether it was a text message."""
        data = await self.recv(decode=False)
        opcode = self.opcodes.pop(0) if self.opcodes else Opcode.TEXT
        return data, opcode is Opcode.TEXT


class Flusher:
    """Writes every connection that has queued frames, once per loop iteration."""

    def __init__(self) -> None:
        self._dirty: list[Connection] = []
        self._scheduled = False

    def mark(self, connection: Connection) -> None:
        """Schedule ``connection`` for the next flush."""
        self._dirty.append(connection)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write everything queued now (also called before a shutdown)."""
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for connection in dirty:
            connection.flush()


class Connection:
    """One client connection: its session, its outbox, and how it closes."""

    __slots__ = (
        "_buffered", "_cap", "_closer", "_closing", "_compressed", "_flusher", "_frames",
        "_metrics", "_open", "_queued", "_send", "_transport", "session", "ws",
    )  # fmt: skip

    def __init__(
        self,
        ws: BrokerConnection,
        session: Session,
        flusher: Flusher,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self.ws = ws
        self.session = session
        self._flusher = flusher
        self._metrics = metrics
        self._cap = settings.max_backlog_bytes
        self._transport = ws.transport
        self._compressed = bool(ws.protocol.extensions)
        self._send = None if self._compressed else _direct_send(self._transport)
        self._frames: list[bytes] = []
        self._queued = 0  # bytes in _frames
        self._buffered = 0  # bytes in the transport's buffer, as of the last look
        self._open = True  # websockets' state is OPEN, as of the last look
        self._closing = False
        self._closer: asyncio.Task[None] | None = None
        self.sync()
        ws.outbox = self

    def deliver(self, payload: bytes, wire: bytes) -> None:
        """Queue a message; never blocks (see ``Subscriber``)."""
        if self._closing:
            return
        frames = self._frames
        frames.append(payload if self._compressed else wire)
        self._queued += len(wire)
        if self._queued + self._buffered > self._cap and self._over_cap():
            return
        if len(frames) == 1:
            self._flusher.mark(self)

    def send(self, payload: bytes) -> None:
        """Queue a reply, in order with messages."""
        self.deliver(payload, payload if self._compressed else text_frame(payload))

    def sync(self) -> None:
        """Look again at the transport's buffer and the connection's state.

        Called whenever ``websockets`` may have written or changed state; a
        write of ours that did not go straight to the socket re-reads the
        buffer itself (``flush``), as the state cannot have changed.
        """
        self._open = self.ws.protocol.state is _OPEN
        self._buffered = self._transport.get_write_buffer_size()

    def flush(self) -> None:
        """Write what is queued with one call. Called by the flusher."""
        frames = self._frames
        if not frames:
            return
        self._queued = 0
        if not self._open:
            frames.clear()
            return  # closing: the peer will not read these any more
        try:
            if self._compressed:
                payloads = frames.copy()
                frames.clear()
                for payload in payloads:
                    self.ws.protocol.send_text(payload)
                self.ws.send_data()  # syncs
            else:
                data = frames[0] if len(frames) == 1 else b"".join(frames)
                # Emptied, not replaced: a new list per write is a garbage-collected
                # object made and freed per delivery.
                frames.clear()
                send = self._send
                if send is not None and not self._buffered:
                    try:
                        sent = send(data)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError:
                        sent = 0  # the transport meets it again below and closes
                    if sent == len(data):
                        return
                    data = data[sent:]
                self._transport.write(data)
                self._buffered = self._transport.get_write_buffer_size()
        except Exception:
            log.exception("write failed; closing the connection")
            self.close(1011, "write failed")
            return
        if self._buffered > self._cap:
            self._over_cap()

    def close(self, code: int, reason: str) -> None:
        """Write what is queued, then start the closing handshake; returns at once."""
        if self._closing:
            return
        self.flush()
        if self._closing:
            return  # the flush found a slow consumer and is closing it already
        self._closing = True
        self._closer = asyncio.get_running_loop().create_task(self.ws.close(code, reason))

    async def wait_closed(self) -> None:
        """Wait for a close this connection started (owned by the handler)."""
        if self._closer is not None:
            await self._closer

    def _over_cap(self) -> bool:
        """Close a slow consumer; False if the transport has drained meanwhile."""
        self._buffered = self._transport.get_write_buffer_size()
        backlog = self._queued + self._buffered
        if backlog <= self._cap:
            return False
        self._frames.clear()
        self._queued = 0
        self._metrics.slow_consumer_disconnects += 1
        log.warning(
            "slow consumer %s: %d bytes unsent, over the %d-byte cap; closing with 1013",
            _peer_name(self.ws),
            backlog,
            self._cap,
        )
        self._closing = True
        self._closer = asyncio.get_running_loop().create_task(
            self.ws.close(1013, f"slow consumer: backlog over {self._cap} bytes")
        )
        return True


class WebSocketFrontEnd:
    """Serves ``/ws`` and a few plain GET routes on the public port."""

    def __init__(self, settings: Settings, node: Node, static_dir: Path | None) -> None:
        self.settings = settings
        self.node = node
        self.flusher = Flusher()
        self._static = static_dir
        self._server: Server | None = None

    async def start(self) -> Server:
        """Start listening; returns the ``websockets`` server."""
        s = self.settings
        self._server = await serve(
            self._handle,
            s.host,
            s.port,
            create_connection=BrokerConnection,
            process_request=self._process_request,
            max_size=s.max_frame_bytes,
            compression="deflate" if s.compression else None,
            ping_interval=s.ping_interval,
            ping_timeout=s.ping_timeout,
            close_timeout=s.close_timeout,
            max_queue=64,
            server_header="broker",
            reuse_port=s.reuse_port,
        )
        return self._server

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def stop_accepting(self) -> None:
        """Stop accepting new connections; existing ones go on."""
        if self._server is not None:
            self._server.server.close()

    async def close(self, code: int = 1001, reason: str = "server shutting down") -> None:
        """Flush what is queued, close every connection with ``code``, wait for handlers."""
        if self._server is None:
            return
        self.flusher.flush()
        self._server.close(close_connections=True, code=code, reason=reason)
        await self._server.wait_closed()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == WS_PATH:
            return None
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        static = _STATIC_ROUTES.get(path)
        if static is not None and self._static is not None:
            name, content_type = static
            if name == "demo.html" and not self.settings.demo:
                return connection.respond(HTTPStatus.NOT_FOUND, "demo is disabled\n")
            try:
                body = (self._static / name).read_text(encoding="utf-8")
            except OSError:
                return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
            response = connection.respond(HTTPStatus.OK, body)
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = content_type
            response.headers["Cache-Control"] = "no-cache"
            return response
        return connection.respond(HTTPStatus.NOT_FOUND, f"not found: {path}; WebSocket is at /ws\n")

    async def _handle(self, ws: ServerConnection) -> None:
        assert isinstance(ws, BrokerConnection)
        node = self.node
        try:
            node.admit()
        except LimitExceeded as exc:
            log.warning("connection refused from %s: %s", _peer_name(ws), exc.message)
            await ws.send(codec.encode_error(None, exc.code, exc.message), text=True)
            await ws.close(1013, "too many connections")
            return
        connection = Connection(ws, node.new_session(), self.flusher, self.settings, node.metrics)
        node.attach(connection)
        log.info("connection opened from %s (%d open)", _peer_name(ws), len(node.peers))
        try:
            while True:
                raw, text = await ws.recv_frame()
                await node.receive(connection, raw, text=text)
        except ConnectionClosed:
            pass
        finally:
            await node.detach(connection)
            await connection.wait_closed()
            ws.outbox = None  # no cycle left for the garbage collector
            log.info(
                "connection closed from %s: code %s%s (%d open)",
                _peer_name(ws),
                ws.close_code,
                f" {ws.close_reason}" if ws.close_reason else "",
                len(node.peers),
            )


_STATIC_ROUTES: dict[str, tuple[str, str]] = {
    "/client/broker.js": ("broker.js", "text/javascript; charset=utf-8"),
    "/client/broker.d.ts": ("broker.d.ts", "application/typescript; charset=utf-8"),
    "/demo": ("demo.html", "text/html; charset=utf-8"),
    "/demo/": ("demo.html", "text/html; charset=utf-8"),
}

#: Every plain-HTTP path of the WebSocket port (other methods on them get 405).
_GET_ROUTES = {"/healthz", *_STATIC_ROUTES}


def _direct_send(transport: asyncio.BaseTransport) -> Callable[[bytes], int] | None:
    """Return the socket's ``send`` if ``transport`` is asyncio's plain socket transport.

    Only there is it known that the transport writes nothing of its own and
    holds back only what is in its buffer. Other transports (uvloop's, TLS)
    are always written through ``transport.write``.
    """
    if type(transport).__module__ != "asyncio.selector_events":
        return None
    sock = getattr(transport, "_sock", None)
    send = getattr(sock, "send", None)
    return send if callable(send) else None


def _peer_name(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
    except (TypeError, ValueError):
        return "unknown"
    return f"{host}:{port}"


def find_static_dir() -> Path | None:
    """Locate the browser client files: in the wheel, or in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "static" / "js", here.parent / "clients" / "js"):
        if candidate.is_dir():
            return candidate
    return None
