"""The WebSocket front-end: ``websockets`` glue for the public port.

``websockets`` owns the handshake, reading, pings and the closing handshake.
``WsConnection`` adapts it to the broker: it keeps each message's opcode
(binary frames and invalid UTF-8 are ours to answer as ``bad_frame``),
answers methods other than GET with a proper HTTP error, and tells the
connection's ``Outbox`` (``broker.outbox``, everything the broker sends goes
through it) whenever ``websockets`` wrote or changed state.
``WebSocketFrontEnd`` serves ``/ws`` and a few plain GET routes and runs one
handler per connection: read a frame, hand it to the node, until it closes.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
import struct
from collections.abc import Iterable
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State

from broker import codec
from broker.access import MAX_TOKEN_LENGTH, Handshake, OriginPolicy, Verified, client_address
from broker.codes import CloseCode
from broker.exceptions import LimitExceeded, Unauthorized
from broker.node import Node
from broker.outbox import Flusher, Outbox
from broker.settings import Settings

__all__ = ["WS_PATH", "Keepalive", "WebSocketFrontEnd", "WsConnection", "find_static_dir"]

log = logging.getLogger(__name__)

WS_PATH = "/ws"

#: Client messages read ahead of the node; beyond it reading pauses and TCP
#: pushes back on the client (websockets' own default is 16).
MAX_READ_QUEUE = 64


#: The instance attributes of websockets' ``Connection`` and ``ServerConnection``.
WEBSOCKETS_SLOTS = (
    "close_deadline", "close_timeout", "connection_exc", "connection_lost_waiter",
    "debug", "drain_waiters", "id", "keepalive_task", "latency", "logger", "loop",
    "max_queue_high", "max_queue_low", "paused", "pending_pings", "ping_interval",
    "ping_timeout", "protocol", "recv_messages", "request", "request_rcvd", "response",
    "send_in_progress", "server", "transport", "write_limit_high", "write_limit_low",
)  # fmt: skip


#: The headers of every connection's request once read: none (never modified).
_NO_HEADERS = Headers()


class _FrameQueue(list[Any]):
    """The ``deque`` operations ``websockets``' frame queue uses, on a list.

    An empty deque costs 760 bytes, an empty list 56; the queue holds at most
    ``MAX_READ_QUEUE`` frames (then reading pauses), so ``pop(0)`` stays cheap.
    ``tests/test_connection_memory.py`` checks that ``websockets`` uses no other.
    """

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)

    def extendleft(self, items: Iterable[Any]) -> None:
        self[:0] = list(items)[::-1]


class _ConnectionLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """``websockets``' per-connection logger adapter, in slots, its ``extra`` made on use.

    The same logger and the same ``{"websocket": <weak proxy>}`` extra as the
    adapter ``websockets`` makes, without its instance dict and extra dict
    kept for the connection's life (about 290 bytes).
    """

    __slots__ = ("_websocket", "logger")

    def __init__(self, logger: Any, websocket: Any) -> None:
        self.logger = logger
        self._websocket = websocket

    @property
    def extra(self) -> dict[str, Any]:  # type: ignore[override]
        return {"websocket": self._websocket}


class WsConnection(ServerConnection):
    """A ``ServerConnection`` that remembers whether each message was text or binary.

    ``recv(decode=False)`` returns bytes for both kinds (so invalid UTF-8 is
    ours to report as ``bad_frame`` rather than a 1007 close), which loses the
    opcode; the opcodes of the first frames of messages are kept here, in order.
    """

    # Slots, not instance attributes, for ours and for websockets' own: with
    # websockets' 27 in slots too, an idle connection measured 1.2 KiB less RSS
    # (tracemalloc had put 1.6 KiB on the instance's attributes). A websockets
    # release that adds an attribute only puts that one in a dict;
    # tests/test_connection_memory.py checks that none is left there and that
    # no slot hides a class attribute of websockets.
    __slots__ = ("_sniffed", "opcodes", "outbox", "ping_entry", "verified", *WEBSOCKETS_SLOTS)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        adapter = self.protocol.logger
        if isinstance(adapter, logging.LoggerAdapter) and adapter.extra is not None:
            self.protocol.logger = self.logger = _ConnectionLogger(
                adapter.logger, adapter.extra["websocket"]
            )
        # A list, not a deque: an empty deque costs 760 bytes per connection, and
        # this holds at most max_queue entries.
        self.opcodes: list[Opcode] = []
        self._sniffed = False
        #: The broker's writer for this connection, once the handshake is done.
        self.outbox: Outbox | None = None
        #: The token of the handshake's ``Authorization`` header, once verified.
        self.verified: Verified | None = None
        # Appended to, removed from and iterated only (checked in tests), and
        # empty unless the transport is paused: a list, not a 760-byte deque.
        self.drain_waiters = []  # type: ignore[assignment]
        #: This connection's entry in the front end's ``Keepalive``, while in it.
        self.ping_entry: list[Any] | None = None

    def start_keepalive(self) -> None:
        # No task per connection: the front end's Keepalive pings every connection
        # from one timer (the handler adds this one as soon as it runs).
        return None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.recv_messages.frames.queue = _FrameQueue()  # type: ignore[assignment]

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

    def drop_handshake(self) -> None:
        """Forget the handshake's headers once they have been read (about 2 KiB).

        ``request`` stays (empty), as ``websockets``' parser keeps it too.
        """
        if self.request is not None:
            self.request.headers = _NO_HEADERS  # frees them (clear() makes new containers)
        self.response = None
        self.request_rcvd = None  # type: ignore[assignment]  # a done future

    def process_event(self, event: Any) -> None:
        opcode = getattr(event, "opcode", None)
        if self.request is not None and (opcode is Opcode.TEXT or opcode is Opcode.BINARY):
            self.opcodes.append(opcode)
        super().process_event(event)

    def was_text(self) -> bool:
        """Whether the message ``recv(decode=False)`` just returned was text.

        Call once per message, right after ``recv``. (Not a coroutine around
        ``recv``: one more frame held for the connection's life costs 256 bytes.)
        """
        opcode = self.opcodes.pop(0) if self.opcodes else Opcode.TEXT
        return opcode is Opcode.TEXT


class Keepalive:
    """Pings every connection every ``interval`` seconds from one timer, not a task each.

    It does what ``websockets``' keepalive does, whose task per connection
    cost about 1 KiB of an idle connection's memory: a ping ``interval``
    seconds after the connection opened and after each ping (or as soon as
    the pong of a slow previous one came), and a connection that has not
    answered a ping within ``timeout`` seconds fails with 1011 "keepalive ping
    timeout" (``websockets``' own words and code path). One heap of entries
    ``[when, seq, connection, pong waiter, ping sent at]`` holds the next
    thing to check for each connection; ``discard`` empties an entry, so a
    closed connection is not kept alive by it.
    """

    def __init__(self, interval: float, timeout: float) -> None:
        self.interval = interval
        self.timeout = timeout
        self._heap: list[list[Any]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._failing: set[asyncio.Task[None]] = set()

    def add(self, ws: WsConnection) -> None:
        """Start pinging ``ws`` (an open connection), first in ``interval`` seconds."""
        loop = asyncio.get_running_loop()
        entry = [loop.time() + self.interval, next(self._seq), ws, None, 0.0]
        ws.ping_entry = entry
        self._push(entry)

    def discard(self, ws: WsConnection) -> None:
        """Stop pinging ``ws`` (closed); its entry leaves the heap when due."""
        entry = ws.ping_entry
        if entry is not None:
            entry[2] = entry[3] = None
            ws.ping_entry = None

    async def close(self) -> None:
        """Stop the timer; wait for the connections being failed to close."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()
        if self._failing:
            await asyncio.gather(*self._failing, return_exceptions=True)

    def _push(self, entry: list[Any]) -> None:
        heapq.heappush(self._heap, entry)
        timer = self._timer
        if timer is None or entry[0] < timer.when():
            if timer is not None:
                timer.cancel()
            self._timer = asyncio.get_running_loop().call_at(entry[0], self._run)

    def _run(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        heap = self._heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            ws, waiter, sent = entry[2], entry[3], entry[4]
            if ws is None:
                continue  # discarded
            if waiter is not None and not waiter.done():
                if now >= sent + self.timeout:
                    self.discard(ws)
                    self._fail(ws)
                    continue
                entry[0] = sent + self.timeout  # the interval passed; the pong is late
                heapq.heappush(heap, entry)
                continue
            if waiter is not None and now < sent + self.interval:
                entry[0], entry[3] = sent + self.interval, None  # answered: next ping
                heapq.heappush(heap, entry)
                continue
            waiter = self._ping(ws)
            if waiter is None:
                self.discard(ws)  # closing: websockets' keepalive would end too
                continue
            entry[3], entry[4] = waiter, now
            entry[0] = now + min(self.interval, self.timeout)
            heapq.heappush(heap, entry)
        if heap:
            self._timer = loop.call_at(heap[0][0], self._run)

    @staticmethod
    def _ping(ws: WsConnection) -> asyncio.Future[float] | None:
        """Send a ping as ``websockets``' ``ping()`` does, synchronously; None if not open."""
        if ws.protocol.state is not State.OPEN:
            return None
        pending = ws.pending_pings
        data = struct.pack("!I", random.getrandbits(32))
        while data in pending:
            data = struct.pack("!I", random.getrandbits(32))
        waiter: asyncio.Future[float] = ws.loop.create_future()
        pending[data] = (waiter, ws.loop.time())
        try:
            ws.protocol.send_ping(data)
            ws.send_data()
        except Exception:
            log.exception("keepalive ping failed")
        return waiter

    def _fail(self, ws: WsConnection) -> None:
        task = asyncio.get_running_loop().create_task(_fail_keepalive(ws))
        self._failing.add(task)
        task.add_done_callback(self._failing.discard)


async def _fail_keepalive(ws: WsConnection) -> None:
    """Fail ``ws`` for a missing pong, exactly as ``websockets``' keepalive does."""
    try:
        async with ws.send_context():
            ws.protocol.fail(CloseCode.INTERNAL, "keepalive ping timeout")
    except ConnectionClosed:
        pass


class WebSocketFrontEnd:
    """Serves ``/ws`` and a few plain GET routes on the public port."""

    def __init__(self, settings: Settings, node: Node, static_dir: Path | None) -> None:
        self.settings = settings
        self.node = node
        self._origins = OriginPolicy(settings.allowed_origins)
        self.flusher = Flusher()
        self.keepalive = Keepalive(settings.ping_interval, settings.ping_timeout)
        self._static = static_dir
        self._server: Server | None = None

    async def start(self) -> Server:
        """Start listening; returns the ``websockets`` server."""
        s = self.settings
        self._server = await serve(
            self._handle,
            s.host,
            s.port,
            create_connection=WsConnection,
            process_request=self._process_request,
            max_size=s.max_frame_bytes,
            compression="deflate" if s.compression else None,
            ping_interval=s.ping_interval,
            ping_timeout=s.ping_timeout,
            close_timeout=s.close_timeout,
            max_queue=MAX_READ_QUEUE,
            server_header="broker",
            reuse_port=s.reuse_port,
            backlog=s.listen_backlog,
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

    async def drain(
        self, spread: float, reason: str = "service restart", limit: int | None = None
    ) -> None:
        """Close every connection (or ``limit`` of them) with 1012, spread over ``spread`` s.

        Ten batches a second: a process with 10,000 connections and the default
        3 s closes about 330 every 100 ms, so their reconnects arrive spread out.
        """
        peers = list(self.node.peers)[:limit]
        steps = max(1, round(spread * 10))
        size = -(-len(peers) // steps)  # ceiling
        for step in range(steps):
            batch = peers[step * size : (step + 1) * size]
            for peer in batch:
                peer.close(CloseCode.RESTART, reason)
            if (step + 1) * size >= len(peers):
                break
            await asyncio.sleep(spread / steps)

    async def close(
        self, code: int = CloseCode.GOING_AWAY, reason: str = "server shutting down"
    ) -> None:
        """Flush what is queued, close every connection with ``code``, wait for handlers."""
        if self._server is None:
            return
        self.flusher.flush()
        self._server.close(close_connections=True, code=code, reason=reason)
        await self._server.wait_closed()
        await self.keepalive.close()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == WS_PATH:
            return self._check_handshake(connection, request)
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
            if name != "demo.html":
                # The client may be imported by pages of other origins: the ones
                # allowed to connect (any, when allowed_origins is empty).
                origin = request.headers.get("Origin")
                if not self.settings.allowed_origins:
                    response.headers["Access-Control-Allow-Origin"] = "*"
                elif origin is not None and self._origins.allows(origin):
                    response.headers["Access-Control-Allow-Origin"] = origin
                    response.headers["Vary"] = "Origin"
            return response
        return connection.respond(HTTPStatus.NOT_FOUND, f"not found: {path}; WebSocket is at /ws\n")

    def _check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse a WebSocket handshake before the upgrade: draining, origin, bad token."""
        if self.node.draining:
            self.node.metrics.connections_rejected += 1
            return _json_error(
                connection,
                HTTPStatus.SERVICE_UNAVAILABLE,
                "unavailable",
                "this process is restarting; connect again (to another process)",
            )
        origin = request.headers.get("Origin")
        if not self._origins.allows(origin):
            log.warning("handshake refused: origin %r is not allowed", origin)
            self.node.metrics.connections_rejected += 1
            return _json_error(
                connection, HTTPStatus.FORBIDDEN, "forbidden", f"origin {origin!r} is not allowed"
            )
        header = request.headers.get("Authorization")
        verifier = self.node.verifier
        if header is None or verifier is None:
            return None  # with authentication off, the header means nothing to us
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        try:
            if scheme.lower() != "bearer" or not token:
                raise Unauthorized("the Authorization header must be 'Bearer <token>'")
            if len(token) > MAX_TOKEN_LENGTH:
                raise Unauthorized(f"token is longer than {MAX_TOKEN_LENGTH} characters")
            assert isinstance(connection, WsConnection)
            connection.verified = verifier.verify(token)
        except Unauthorized as exc:
            self.node.metrics.auth_failures += 1
            self.node.metrics.connections_rejected += 1
            response = _json_error(connection, HTTPStatus.UNAUTHORIZED, exc.code, exc.message)
            response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
            return response
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert isinstance(ws, WsConnection)
        node = self.node
        handshake = handshake_of(ws, self.settings.trusted_proxies)
        ws.drop_handshake()
        verified, ws.verified = ws.verified, None
        try:
            node.admit(handshake)
            sub = None if verified is None else verified.principal.sub
            if sub is not None and node.user_full(sub):
                limit = self.settings.max_connections_per_user
                raise LimitExceeded(f"{limit} connections of {sub!r} already open")
        except LimitExceeded as exc:
            log.warning("connection refused from %s: %s", handshake.address, exc.message)
            node.metrics.errors[exc.code] += 1
            await ws.send(codec.encode_error(None, exc.code, exc.message), text=True)
            await ws.close(CloseCode.TRY_AGAIN, "too many connections")
            return
        session = node.new_session(handshake, verified)
        outbox = Outbox(ws, session, self.flusher, self.settings.max_backlog_bytes, node.metrics)
        node.attach(outbox, handshake)
        # This frame lives as long as the connection: keep only what it needs.
        address = handshake.address
        del handshake, verified, session
        level = logging.INFO if self.settings.log_connections else logging.DEBUG
        log.log(level, "connection opened from %s (%d open)", address, len(node.peers))
        self.keepalive.add(ws)
        try:
            while True:
                raw = await ws.recv(decode=False)
                await node.receive(outbox, raw, text=ws.was_text())
        except ConnectionClosed:
            pass
        finally:
            self.keepalive.discard(ws)
            await node.detach(outbox)
            await outbox.wait_closed()
            ws.outbox = None  # no cycle left for the garbage collector
            node.metrics.closes[ws.close_code if ws.close_code is not None else 1006] += 1
            log.log(
                level,
                "connection closed from %s: code %s%s (%d open)",
                address,
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


def handshake_of(ws: ServerConnection, trusted_proxies: list[str]) -> Handshake:
    """What the opening handshake of ``ws`` says about the client.

    The address is the peer's, or, when the peer is a trusted proxy, the client
    ``X-Forwarded-For`` names (``access.client_address``).
    """
    try:
        host, port = ws.remote_address[:2]
    except (TypeError, ValueError):
        host, port = "", 0
    request = ws.request
    headers = {} if request is None else {k.lower(): v for k, v in request.headers.raw_items()}
    address = client_address(str(host), headers.get("x-forwarded-for"), trusted_proxies)
    return Handshake(address=address, port=int(port), headers=headers)


def _json_error(
    connection: ServerConnection, status: HTTPStatus, code: str, message: str
) -> Response:
    """An HTTP error before the upgrade, in the service API's JSON error shape."""
    body = orjson.dumps({"error": {"code": code, "message": message}}).decode() + "\n"
    response = connection.respond(status, body)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


def find_static_dir() -> Path | None:
    """Locate the browser client files: in the wheel, or in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "static" / "js", here.parent / "clients" / "js"):
        if candidate.is_dir():
            return candidate
    return None
