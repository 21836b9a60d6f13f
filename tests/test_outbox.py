"""The per-connection outbox (``outbox.Outbox``) on a real asyncio socket transport.

The outbox writes to the socket directly while the transport's buffer is
empty and through the transport otherwise. These tests pin what must never
change: bytes leave in the order they were queued, whatever the socket took,
and bytes ``websockets`` left in the transport (a pong, a close frame) are
never overtaken. A stream socket pair stands in for the network; the
``websockets`` side is a stub with a state and a transport.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.protocol import State
from websockets.server import ServerProtocol

from broker.metrics import Metrics
from broker.outbox import Flusher, Outbox
from broker.server import WsConnection
from broker.session import Limits, Session
from broker.wsframe import text_frame
from tests.wait import until, within


@dataclass
class StubProtocol:
    state: State = State.OPEN
    extensions: list[Any] = field(default_factory=list)


class StubWebSocket:
    """What ``Outbox`` reads of a ``WsConnection``."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.protocol = StubProtocol()
        self.outbox: Outbox | None = None


class WriteSpy:
    """Counts the calls that went through ``transport.write``."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.calls = 0
        self._write = transport.write

        def write(data: bytes | bytearray | memoryview) -> None:
            self.calls += 1
            self._write(data)

        transport.write = write  # type: ignore[method-assign]


@dataclass
class Pair:
    conn: Outbox
    ws: StubWebSocket
    transport: asyncio.Transport
    peer: socket.socket
    spy: WriteSpy

    async def read_exactly(self, size: int, timeout: float = 10.0) -> bytes:
        """Read ``size`` bytes from the peer end (the client)."""
        loop = asyncio.get_running_loop()
        out = bytearray()
        async with asyncio.timeout(timeout):
            while len(out) < size:
                out += await loop.sock_recv(self.peer, size - len(out))
        return bytes(out)


def small_socket_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected non-blocking sockets whose kernel buffers fill after a few KiB."""
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ours.setblocking(False)
    peer.setblocking(False)
    return ours, peer


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    """An ``Outbox`` on one end of a socket pair with small kernel buffers."""
    ours, peer = small_socket_pair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    ws = StubWebSocket(transport)
    conn = Outbox(ws, Session(Limits()), Flusher(), 64 * 1024 * 1024, Metrics())
    try:
        yield Pair(conn, ws, transport, peer, WriteSpy(transport))
    finally:
        transport.abort()
        peer.close()


def payloads_of(prefix: str, count: int, size: int) -> list[bytes]:
    """Distinct message payloads, each recognisable in the byte stream."""
    return [f"{prefix}{i:06d}".encode().ljust(size, b".") for i in range(count)]


async def test_an_empty_transport_means_one_direct_write_per_flush(pair: Pair) -> None:
    assert pair.ws.outbox is pair.conn
    payloads = payloads_of("m", 3, 40)
    for payload in payloads:
        pair.conn.deliver(payload)
    pair.conn.flush()
    frames = [text_frame(p) for p in payloads]
    assert await pair.read_exactly(sum(map(len, frames))) == b"".join(frames)
    assert pair.spy.calls == 0, "went through transport.write although its buffer was empty"


async def test_what_the_socket_cannot_take_waits_in_the_transport_in_order(pair: Pair) -> None:
    sent: list[bytes] = []
    # Fill the kernel buffers: the peer reads nothing yet.
    for batch in range(200):
        for payload in payloads_of(f"b{batch:03d}-", 4, 1000):
            pair.conn.deliver(payload)
            sent.append(text_frame(payload))
        pair.conn.flush()
        if pair.transport.get_write_buffer_size():
            break
    assert pair.transport.get_write_buffer_size() > 0, "the socket never filled up"
    calls_when_full = pair.spy.calls
    assert calls_when_full >= 1
    # More flushes while the transport holds bytes: all through the transport.
    for batch in range(5):
        payload = payloads_of(f"late{batch}-", 1, 300)[0]
        pair.conn.deliver(payload)
        sent.append(text_frame(payload))
        pair.conn.flush()
    assert pair.spy.calls == calls_when_full + 5
    expected = b"".join(sent)
    assert await pair.read_exactly(len(expected)) == expected
    # Drained: the next flush goes straight to the socket again.
    await asyncio.sleep(0.05)
    assert pair.transport.get_write_buffer_size() == 0
    calls = pair.spy.calls
    pair.conn.deliver(payloads_of("again", 1, 50)[0])  # first flush: through, and syncs
    pair.conn.flush()
    pair.conn.deliver(payloads_of("direct", 1, 50)[0])
    pair.conn.flush()
    assert pair.spy.calls == calls + 1
    assert len(await pair.read_exactly(2 * (50 + 2))) == 104


async def test_bytes_websockets_left_in_the_transport_are_never_overtaken(pair: Pair) -> None:
    # Fill the socket, then let "websockets" write a pong the socket cannot take.
    filler = b"f" * 4096
    written = 0
    while not pair.transport.get_write_buffer_size():
        pair.transport.write(filler)
        written += len(filler)
    pair.transport.write(b"PONG")  # queued behind the filler in the transport
    pair.conn.sync()  # what WsConnection.send_data does after every write
    # The client reads a little: the socket has room again, but the transport
    # has not run yet to move its buffer, so a direct write would jump the queue.
    head = pair.peer.recv(8192)
    message = text_frame(b'{"op":"message"}')
    pair.conn.deliver(b'{"op":"message"}')
    pair.conn.flush()
    rest = await pair.read_exactly(written + 4 + len(message) - len(head))
    assert (head + rest).endswith(b"PONG" + message)


async def test_nothing_is_written_once_websockets_is_closing(pair: Pair) -> None:
    pair.ws.protocol.state = State.CLOSING
    pair.conn.sync()
    pair.conn.deliver(b"after the close frame")
    pair.conn.flush()
    await asyncio.sleep(0.05)
    with pytest.raises(BlockingIOError):
        pair.peer.recv(100)
    assert pair.spy.calls == 0


async def test_a_reset_peer_is_handed_to_the_transport_which_closes(pair: Pair) -> None:
    pair.peer.close()
    for _ in range(3):
        pair.conn.deliver(b"x" * 100)
        pair.conn.flush()
    assert pair.spy.calls >= 1  # the direct send failed; the transport saw the error
    await asyncio.sleep(0.05)
    assert pair.transport.is_closing()


class StubServer:
    """What ``ServerConnection.connection_made`` needs of a ``Server``."""

    def __init__(self) -> None:
        self.handler_tasks: set[asyncio.Task[None]] = set()

    async def handler(self, connection: Any) -> None:
        return None


async def test_websockets_writes_and_state_changes_reach_the_outbox() -> None:
    """``WsConnection`` tells the outbox whenever websockets wrote or changed state."""
    ours, peer = small_socket_pair()
    loop = asyncio.get_running_loop()
    ws = WsConnection(ServerProtocol(state=State.OPEN), StubServer())  # type: ignore[arg-type]
    transport, _ = await loop.create_connection(lambda: ws, sock=ours)
    conn = Outbox(ws, Session(Limits()), Flusher(), 4 * 1024 * 1024, Metrics())
    try:
        # websockets itself fills the socket, then leaves a ping in the transport.
        written = 0
        while not transport.get_write_buffer_size():
            ws.protocol.send_binary(b"w" * 4000)
            ws.send_data()
            written += 4000 + 4  # 2-byte header + 16-bit length
        ws.protocol.send_ping(b"PING")
        ws.send_data()
        written += 2 + 4
        head = peer.recv(8192)  # room in the socket; the transport has not moved yet
        message = text_frame(b'{"op":"message"}')
        conn.deliver(b'{"op":"message"}')
        conn.flush()
        rest = bytearray()
        async with asyncio.timeout(10):
            while len(head) + len(rest) < written + len(message):
                rest += await loop.sock_recv(peer, 65536)
        assert (head + rest).endswith(b"\x89\x04PING" + message)
        # websockets closing: the outbox stops writing at once.
        ws.protocol.send_close(1001, "bye")
        ws.send_data()
        conn.deliver(b"too late")
        conn.flush()
        await asyncio.sleep(0.05)
        tail = peer.recv(65536)
        assert tail.startswith(b"\x88") and b"too late" not in tail
    finally:
        transport.abort()
        peer.close()
        await asyncio.sleep(0)


async def test_a_broker_connection_costs_no_more_dict_than_a_plain_one() -> None:
    """Our per-connection state lives in slots, so websockets' instance dict keeps
    sharing its keys; one extra instance attribute once cost 1.3 KiB per connection."""
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import ServerConnection, serve

    sizes: dict[str, int] = {}

    async def handler(ws: ServerConnection) -> None:
        sizes[type(ws).__name__] = sys.getsizeof(ws.__dict__)
        await ws.wait_closed()

    for factory in (ServerConnection, WsConnection):
        async with serve(handler, "127.0.0.1", 0, create_connection=factory) as server:
            port = server.sockets[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}"):
                await until(lambda name=factory.__name__: name in sizes)
    assert sizes["WsConnection"] <= sizes["ServerConnection"], sizes


async def test_a_shared_payload_is_framed_once_for_every_outbox() -> None:
    """Fan-out hands every recipient the same payload object; the frame bytes are
    built for the first and reused, identical, for the others."""
    loop = asyncio.get_running_loop()
    outboxes: list[Outbox] = []
    ends: list[asyncio.Transport] = []
    peers: list[socket.socket] = []
    try:
        for _ in range(3):
            ours, peer = small_socket_pair()
            transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
            ends.append(transport)
            peers.append(peer)
            outboxes.append(
                Outbox(StubWebSocket(transport), Session(Limits()), Flusher(), 1 << 20, Metrics())
            )
        payload = b'{"op":"message","channel":"a","data":1}'
        for outbox in outboxes:
            outbox.deliver(payload)
        queued = [outbox._frames[0] for outbox in outboxes]  # white-box: the queued frame
        assert queued[0] == text_frame(payload)
        assert queued[0] is queued[1] is queued[2]
        # A different payload object with equal bytes is framed again (by identity).
        again = bytes(bytearray(payload))
        outboxes[0].deliver(again)
        assert outboxes[0]._frames[1] == queued[0] and outboxes[0]._frames[1] is not queued[0]
    finally:
        for transport in ends:
            transport.abort()
        for peer in peers:
            peer.close()


# --- what the outbox relies on in websockets --------------------------------------
#
# The outbox knows whether the transport holds bytes and whether the connection
# is open only because every websockets write ends in send_data (and every state
# change in send_data or connection_lost), which WsConnection hooks. If a
# websockets release wrote anywhere else, messages could overtake its bytes:
# these tests fail loudly instead.


def _transport_writes_outside_send_data() -> list[str]:
    import ast
    from pathlib import Path

    import websockets

    root = Path(websockets.__file__).parent / "asyncio"
    found: list[str] = []
    # client.py is left out: its only other write is the client's proxy CONNECT.
    for path in sorted(p for p in root.glob("*.py") if p.name != "client.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in {"write", "writelines", "write_eof"}
                    and "transport" in ast.unparse(node.func.value)
                    and function.name != "send_data"
                ):
                    found.append(f"{path.name}:{node.lineno} in {function.name}()")
    return found


def test_websockets_writes_to_the_transport_only_in_send_data() -> None:
    assert _transport_writes_outside_send_data() == []


def test_the_hooked_websockets_methods_keep_their_signatures() -> None:
    import inspect

    from websockets.asyncio.server import ServerConnection

    expected = {
        "send_data": ["self"],
        "connection_lost": ["self", "exc"],
        "data_received": ["self", "data"],
        "process_event": ["self", "event"],
    }
    for name, parameters in expected.items():
        method = getattr(ServerConnection, name)
        assert list(inspect.signature(method).parameters) == parameters, name
        assert name in WsConnection.__dict__, f"WsConnection no longer overrides {name}"


async def test_every_write_of_a_live_connection_goes_through_the_hooks() -> None:
    """A real server and client: handshake, messages, pings, pongs and the close.
    Every byte websockets writes must be written inside ``send_data``."""
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    outside: list[bytes] = []
    inside: list[bytes] = []

    class Recording(WsConnection):
        in_send_data = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            write = transport.write  # type: ignore[attr-defined]

            def recording_write(data: bytes | bytearray | memoryview) -> None:
                (inside if self.in_send_data else outside).append(bytes(data))
                write(data)

            transport.write = recording_write  # type: ignore[attr-defined]
            super().connection_made(transport)

        def send_data(self) -> None:
            self.in_send_data = True
            try:
                super().send_data()
            finally:
                self.in_send_data = False

    async def handler(ws: Any) -> None:
        await ws.send("hello")
        await ws.ping(b"from-server")
        await ws.recv()
        await ws.close(1001, "bye")

    async with serve(handler, "127.0.0.1", 0, create_connection=Recording) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}") as client:
            assert await within(client.recv()) == "hello"
            await within(client.ping(b"from-client"))
            await client.send("bye")
            await within(client.wait_closed())
    assert outside == []
    assert len(inside) >= 4  # the handshake, hello, ping, pong, close
