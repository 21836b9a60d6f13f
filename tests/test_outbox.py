"""The per-connection outbox (``server.Connection``) on a real asyncio socket transport.

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
from broker.server import BrokerConnection, Connection, Flusher
from broker.session import Limits, Session
from broker.settings import Settings
from broker.wsframe import text_frame
from tests.wait import until


@dataclass
class StubProtocol:
    state: State = State.OPEN
    extensions: list[Any] = field(default_factory=list)


class StubWebSocket:
    """What ``Connection`` reads of a ``BrokerConnection``."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.protocol = StubProtocol()
        self.outbox: Connection | None = None


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
    conn: Connection
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
    """A ``Connection`` on one end of a socket pair with small kernel buffers."""
    ours, peer = small_socket_pair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    ws = StubWebSocket(transport)
    conn = Connection(
        ws,  # type: ignore[arg-type]
        Session(Limits()),
        Flusher(),
        Settings(max_backlog_bytes=64 * 1024 * 1024),
        Metrics(),
    )
    try:
        yield Pair(conn, ws, transport, peer, WriteSpy(transport))
    finally:
        transport.abort()
        peer.close()


def frames_of(prefix: str, count: int, size: int) -> list[bytes]:
    """Distinct framed messages, each recognisable in the byte stream."""
    return [text_frame(f"{prefix}{i:06d}".encode().ljust(size, b".")) for i in range(count)]


async def test_an_empty_transport_means_one_direct_write_per_flush(pair: Pair) -> None:
    assert pair.ws.outbox is pair.conn
    frames = frames_of("m", 3, 40)
    for frame in frames:
        pair.conn.deliver(b"", frame)
    pair.conn.flush()
    assert await pair.read_exactly(sum(map(len, frames))) == b"".join(frames)
    assert pair.spy.calls == 0, "went through transport.write although its buffer was empty"


async def test_what_the_socket_cannot_take_waits_in_the_transport_in_order(pair: Pair) -> None:
    sent: list[bytes] = []
    # Fill the kernel buffers: the peer reads nothing yet.
    for batch in range(200):
        for frame in frames_of(f"b{batch:03d}-", 4, 1000):
            pair.conn.deliver(b"", frame)
            sent.append(frame)
        pair.conn.flush()
        if pair.transport.get_write_buffer_size():
            break
    assert pair.transport.get_write_buffer_size() > 0, "the socket never filled up"
    calls_when_full = pair.spy.calls
    assert calls_when_full >= 1
    # More flushes while the transport holds bytes: all through the transport.
    for batch in range(5):
        frame = frames_of(f"late{batch}-", 1, 300)[0]
        pair.conn.deliver(b"", frame)
        sent.append(frame)
        pair.conn.flush()
    assert pair.spy.calls == calls_when_full + 5
    expected = b"".join(sent)
    assert await pair.read_exactly(len(expected)) == expected
    # Drained: the next flush goes straight to the socket again.
    await asyncio.sleep(0.05)
    assert pair.transport.get_write_buffer_size() == 0
    calls = pair.spy.calls
    pair.conn.deliver(b"", frames_of("again", 1, 50)[0])  # first flush: through, and syncs
    pair.conn.flush()
    pair.conn.deliver(b"", frames_of("direct", 1, 50)[0])
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
    pair.conn.sync()  # what BrokerConnection.send_data does after every write
    # The client reads a little: the socket has room again, but the transport
    # has not run yet to move its buffer, so a direct write would jump the queue.
    head = pair.peer.recv(8192)
    message = text_frame(b'{"op":"message"}')
    pair.conn.deliver(b"", message)
    pair.conn.flush()
    rest = await pair.read_exactly(written + 4 + len(message) - len(head))
    assert (head + rest).endswith(b"PONG" + message)


async def test_nothing_is_written_once_websockets_is_closing(pair: Pair) -> None:
    pair.ws.protocol.state = State.CLOSING
    pair.conn.sync()
    pair.conn.deliver(b"", text_frame(b"after the close frame"))
    pair.conn.flush()
    await asyncio.sleep(0.05)
    with pytest.raises(BlockingIOError):
        pair.peer.recv(100)
    assert pair.spy.calls == 0


async def test_a_reset_peer_is_handed_to_the_transport_which_closes(pair: Pair) -> None:
    pair.peer.close()
    for _ in range(3):
        pair.conn.deliver(b"", text_frame(b"x" * 100))
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
    """``BrokerConnection`` tells the outbox whenever websockets wrote or changed state."""
    ours, peer = small_socket_pair()
    loop = asyncio.get_running_loop()
    ws = BrokerConnection(ServerProtocol(state=State.OPEN), StubServer())  # type: ignore[arg-type]
    transport, _ = await loop.create_connection(lambda: ws, sock=ours)
    conn = Connection(ws, Session(Limits()), Flusher(), Settings(), Metrics())
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
        conn.deliver(b"", message)
        conn.flush()
        rest = bytearray()
        async with asyncio.timeout(10):
            while len(head) + len(rest) < written + len(message):
                rest += await loop.sock_recv(peer, 65536)
        assert (head + rest).endswith(b"\x89\x04PING" + message)
        # websockets closing: the outbox stops writing at once.
        ws.protocol.send_close(1001, "bye")
        ws.send_data()
        conn.deliver(b"", text_frame(b"too late"))
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

    for factory in (ServerConnection, BrokerConnection):
        async with serve(handler, "127.0.0.1", 0, create_connection=factory) as server:
            port = server.sockets[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}"):
                await until(lambda name=factory.__name__: name in sizes)
    assert sizes["BrokerConnection"] <= sizes["ServerConnection"], sizes
