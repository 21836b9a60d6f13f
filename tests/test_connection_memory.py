"""What keeps an idle connection small, and that it loses nothing for it.

An idle subscribed connection cost 16-18 KiB; most of it was ``websockets``'
per-connection objects (an instance dict, two 760-byte deques, the handshake's
headers, a keepalive task). The broker trims them (``broker/server.py``);
these tests pin what that relies on in ``websockets`` and check that the
behaviour around it (keepalive, handshake data) is unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection

from broker.app import Running
from broker.outbox import Outbox
from broker.server import WEBSOCKETS_SLOTS, WsConnection
from tests.inproc import running_broker
from tests.tcpproxy import TcpProxy
from tests.wait import until, within

WS_SOURCE = Path(websockets.__file__).parent


def server_side(broker: Running) -> WsConnection:
    """The broker's end of its first connection."""
    peer = next(iter(broker.node.peers))
    assert isinstance(peer, Outbox)
    ws = peer.ws
    assert isinstance(ws, WsConnection)
    return ws


async def subscribed(ws: Any, channel: str) -> None:
    await ws.send(orjson.dumps({"op": "subscribe", "id": 1, "channel": channel}), text=True)
    assert '"ok"' in await within(ws.recv())


async def test_an_open_connection_keeps_everything_in_slots() -> None:
    async with running_broker() as broker, connect(f"ws://127.0.0.1:{broker.ws_port}/ws") as ws:
        await subscribed(ws, "a")
        conn = server_side(broker)
        assert vars(conn) == {}, "a websockets attribute is missing from WEBSOCKETS_SLOTS"


def test_no_slot_hides_a_class_attribute_of_websockets() -> None:
    for name in WEBSOCKETS_SLOTS:
        for klass in ServerConnection.__mro__:
            assert name not in vars(klass), f"{name} is also {klass.__name__}.{name}"


def test_websockets_uses_only_list_operations_on_what_the_broker_makes_lists() -> None:
    """``drain_waiters`` and the frame queue are lists in the broker, deques in websockets."""
    connection = (WS_SOURCE / "asyncio" / "connection.py").read_text()
    used = set(re.findall(r"\bdrain_waiters\.(\w+)", connection))
    assert used <= {"append", "remove"}, used
    messages = (WS_SOURCE / "asyncio" / "messages.py").read_text()
    used = set(re.findall(r"\bself\.queue\.(\w+)", messages))
    assert used <= {"append", "popleft", "extendleft"}, used


async def test_the_handshake_is_read_then_its_headers_dropped() -> None:
    """The per-address limit still sees the forwarded address the headers named."""
    url = "ws://127.0.0.1:{}/ws"
    async with running_broker(trusted_proxies=["127.0.0.1"], max_connections_per_ip=1) as broker:
        port = broker.ws_port
        first = {"X-Forwarded-For": "203.0.113.9"}
        async with connect(url.format(port), additional_headers=first) as ws:
            await subscribed(ws, "a")
            conn = server_side(broker)
            assert conn.request is not None and not conn.request.headers
            assert conn.response is None
            async with connect(url.format(port), additional_headers=first) as refused:
                assert "limit_exceeded" in await within(refused.recv())
                await within(refused.wait_closed())
                assert refused.close_code == 1013
            other = {"X-Forwarded-For": "203.0.113.10"}
            async with connect(url.format(port), additional_headers=other) as accepted:
                await subscribed(accepted, "b")


async def test_an_idle_connection_is_pinged_and_answering_keeps_it_open() -> None:
    async with (
        running_broker(ping_interval=0.05, ping_timeout=0.2) as broker,
        # The client sends no pings of its own; it answers the broker's.
        connect(f"ws://127.0.0.1:{broker.ws_port}/ws", ping_interval=None) as ws,
    ):
        await subscribed(ws, "a")
        conn = server_side(broker)
        await until(lambda: conn.latency > 0)  # a ping went out and its pong came back
        first = conn.latency
        await until(lambda: conn.latency != first)  # and the next one, an interval later
        await ws.send('{"op":"ping","id":"x"}')
        assert '"pong"' in await within(ws.recv())
        assert conn.keepalive_task is None  # no task per connection
        assert len(broker.node.peers) == 1


async def test_a_closed_connection_leaves_the_keepalive() -> None:
    async with running_broker(ping_interval=0.05, ping_timeout=0.2) as broker:
        async with connect(f"ws://127.0.0.1:{broker.ws_port}/ws") as ws:
            await subscribed(ws, "a")
            conn = server_side(broker)
            assert conn.ping_entry is not None
        await until(lambda: not broker.node.peers)
        assert conn.ping_entry is None


async def test_a_silent_peer_is_dropped_when_the_timeout_is_shorter_than_the_interval() -> None:
    async with (
        running_broker(ping_interval=0.1, ping_timeout=0.05, close_timeout=0.2) as broker,
        TcpProxy("127.0.0.1", broker.ws_port) as proxy,
    ):
        ws = await connect(f"ws://127.0.0.1:{proxy.port}/ws", ping_interval=None)
        try:
            await subscribed(ws, "dead.a")
            conn = server_side(broker)
            await until(lambda: conn.latency > 0)  # answered while the link is up
            proxy.pause()  # the link goes silent both ways
            await until(lambda: not broker.node.peers, timeout=5)
            assert broker.node.hub.subscription_count == 0
        finally:
            proxy.resume()
            await ws.close()
