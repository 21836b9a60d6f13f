"""Protocol dialects: how each server under test spells subscribe, publish and replies.

The clients in ``bench.clients`` speak WebSocket; a ``Dialect`` adds what goes
inside the frames, so one load generator drives the broker and the baseline
(the broker's JSON protocol, PROTOCOL.md) and the optional python-socketio peer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import jwt
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

    def headers(self) -> dict[str, str]:
        """Extra handshake headers for the next connection (a Bearer token, or none)."""
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

    def reply(self, payload: bytes) -> tuple[int | None, str | None] | None:
        """Decode a reply: ``(id, None)`` for ok, ``(id, error)``, or None if not a reply.

        An id of None answers the connection's latest request (a protocol
        whose replies carry no id, such as NATS's ``PONG``).
        """
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
    text_ping: bytes | None = None

    def url(self, base: str) -> str:
        return f"{base}/ws"

    def headers(self) -> dict[str, str]:
        return {}

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


AUTH_REQUEST_ID = 999_999_999  # the auth frame's id; no other request of a run uses it


def mint_tokens(
    secret: str, n: int, subscribe: Sequence[str], publish: Sequence[str], ttl_s: float = 3600.0
) -> list[str]:
    """Mint ``n`` HS256 tokens, one subject each, valid for ``ttl_s``.

    Minted before any measurement: signing costs the load generator ~20 µs a
    token, which must not count against the broker's connect rate.
    """
    exp = int(time.time() + ttl_s)
    claims = {"exp": exp, "subscribe": list(subscribe), "publish": list(publish)}
    return [
        jwt.encode({"sub": f"bench-{i}", **claims}, secret, algorithm="HS256") for i in range(n)
    ]


class AuthJsonDialect(JsonDialect):
    """The broker's protocol with auth on: every connection presents a token.

    ``via="frame"`` sends ``{"op": "auth"}`` first and waits for its ok (what a
    browser must do); ``via="header"`` puts ``Authorization: Bearer`` in the
    handshake (what a service does). Tokens are taken round-robin from a pool.
    """

    name = "json+auth"

    def __init__(self, tokens: Sequence[str], via: str = "frame") -> None:
        if not tokens:
            raise ValueError("no tokens")
        if via not in ("frame", "header"):
            raise ValueError(f"via must be 'frame' or 'header', not {via!r}")
        self.tokens = list(tokens)
        self.via = via
        self._next = 0

    def _token(self) -> str:
        token = self.tokens[self._next % len(self.tokens)]
        self._next += 1
        return token

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token()}"} if self.via == "header" else {}

    async def handshake(self, conn: Client) -> None:
        if self.via != "frame":
            return
        req = {"op": "auth", "id": AUTH_REQUEST_ID, "token": self._token()}
        conn.send(orjson.dumps(req))
        while True:
            rep = self.reply(await conn.recv())
            if rep is not None and rep[0] in (AUTH_REQUEST_ID, -1):
                if rep[1] is not None:
                    raise BenchError(f"auth refused: {rep[1]}")
                return


class SocketIODialect:
    """Socket.IO v5 over Engine.IO v4, WebSocket transport only (the optional peer).

    Frames are text: ``0{...}`` open, ``40`` connect, ``42<id>[event, arg]`` an
    event with an ack id, ``43<id>[result]`` the ack, ``2``/``3`` ping/pong.
    """

    name = "socketio"
    text_ping: bytes | None = b"\x81\x012"  # an unmasked text frame of one byte: "2"

    def url(self, base: str) -> str:
        return f"{base}/socket.io/?EIO=4&transport=websocket"

    def headers(self) -> dict[str, str]:
        return {}

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
