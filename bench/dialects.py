"""Protocol dialects: how each server under test spells subscribe, publish and replies.

The clients in ``bench.clients`` speak WebSocket; a ``Dialect`` adds what goes
inside the frames, so one load generator drives the broker and the baseline
(the broker's JSON protocol, PROTOCOL.md) and the optional python-socketio peer.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson


class BenchError(Exception):
    """A functional failure of a run: lost messages, error replies, time-outs."""


class Client(Protocol):
    """What a dialect needs from a connection to run its handshake."""

    def send(self, payload: bytes) -> None: ...

    async def recv(self) -> bytes: ...


class Dialect(Protocol):
    """How one server's protocol spells subscribe, publish, replies and messages."""

    name: str

    def url(self, base: str) -> str:
        """Return the WebSocket URL for ``ws://host:port``."""
        ...

    async def handshake(self, conn: Client) -> None:
        """Run whatever must happen after the WebSocket opens, before requests."""
        ...

    def subscribe(self, channel: str, req_id: int) -> bytes:
        """Encode a subscribe request."""
        ...

    def publish(self, channel: str, data: dict[str, Any], req_id: int) -> bytes:
        """Encode a publish request that expects a reply."""
        ...

    def reply(self, payload: bytes) -> tuple[int, str | None] | None:
        """Decode a reply: ``(id, None)`` for ok, ``(id, error)``, or None if not a reply."""
        ...

    def message_data(self, payload: bytes) -> Any:
        """Return the ``data`` of a message frame, or None if it is not one."""
        ...

    def control(self, conn: Client, payload: bytes) -> bool:
        """Handle a tiny text frame (payload < 4 bytes); True if it was a control frame."""
        ...

    text_ping: bytes | None
    """Exact bytes of a protocol-level ping sent as a text frame (Engine.IO), or None."""


class JsonDialect:
    """The broker's wire protocol (PROTOCOL.md), spoken by broker and baseline."""

    name = "json"
    text_ping = None

    def url(self, base: str) -> str:
        return f"{base}/ws"

    async def handshake(self, conn: Client) -> None:
        return None

    def subscribe(self, channel: str, req_id: int) -> bytes:
        return orjson.dumps({"op": "subscribe", "id": req_id, "channel": channel})

    def publish(self, channel: str, data: dict[str, Any], req_id: int) -> bytes:
        return orjson.dumps({"op": "publish", "id": req_id, "channel": channel, "data": data})

    def reply(self, payload: bytes) -> tuple[int, str | None] | None:
        msg = orjson.loads(payload)
        op = msg.get("op")
        if op == "ok":
            return msg["id"], None
        if op == "error":
            return msg.get("id") or -1, f"{msg.get('code')}: {msg.get('message')}"
        return None

    def message_data(self, payload: bytes) -> Any:
        msg = orjson.loads(payload)
        return msg.get("data") if msg.get("op") == "message" else None

    def control(self, conn: Client, payload: bytes) -> bool:
        return False


class SocketIODialect:
    """Socket.IO v5 over Engine.IO v4, WebSocket transport only (the optional peer).

    Frames are text: ``0{...}`` open, ``40`` connect, ``42<id>[event, arg]`` an
    event with an ack id, ``43<id>[result]`` the ack, ``2``/``3`` ping/pong.
    """

    name = "socketio"
    text_ping = b"\x81\x012"  # an unmasked text frame of one byte: "2"

    def url(self, base: str) -> str:
        return f"{base}/socket.io/?EIO=4&transport=websocket"

    async def handshake(self, conn: Client) -> None:
        opened = await conn.recv()
        if not opened.startswith(b"0"):
            raise BenchError(f"unexpected Engine.IO open packet {opened[:60]!r}")
        conn.send(b"40")
        while not (await conn.recv()).startswith(b"40"):
            pass

    def subscribe(self, channel: str, req_id: int) -> bytes:
        return b"42%d" % req_id + orjson.dumps(["subscribe", channel])

    def publish(self, channel: str, data: dict[str, Any], req_id: int) -> bytes:
        return b"42%d" % req_id + orjson.dumps(["publish", {"channel": channel, "data": data}])

    def reply(self, payload: bytes) -> tuple[int, str | None] | None:
        if not payload.startswith(b"43"):
            return None
        i = payload.index(b"[")
        args = orjson.loads(payload[i:])
        return int(payload[2:i]), None if args == ["ok"] else f"ack {args!r}"

    def message_data(self, payload: bytes) -> Any:
        if not payload.startswith(b'42["message"'):
            return None
        return orjson.loads(payload[2:])[1]["data"]

    def control(self, conn: Client, payload: bytes) -> bool:
        if payload == b"2":
            conn.send(b"3")
            return True
        return False
