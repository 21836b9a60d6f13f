"""The NATS dialect: its client protocol over WebSocket, for ``bench/peers.py``.

The broker's dialects, with or without tokens, are in ``bench.dialects``.
"""

from __future__ import annotations

from typing import Any

import orjson

from bench.dialects import BenchError, Client


class NatsDialect:
    """The NATS client protocol over WebSocket (binary frames of protocol text).

    Requests have no ids: every ``SUB`` and ``PUB`` is followed by ``PING``,
    and each ``PONG`` answers the oldest request (replies come in order), so
    the publisher's window works as with the broker's ``ok``.
    """

    name = "nats"
    text_ping = None

    def url(self, base: str) -> str:
        return f"{base}/"

    def headers(self) -> dict[str, str]:
        return {}  # NATS takes its credentials in CONNECT, not in the handshake

    async def handshake(self, conn: Client) -> None:
        info = await conn.recv()
        if not info.startswith(b"INFO "):
            raise BenchError(f"expected INFO from NATS, got {info[:60]!r}")
        conn.send(
            b'CONNECT {"verbose":false,"pedantic":false,"protocol":1,'
            b'"name":"bench","lang":"python","version":"0"}\r\nPING\r\n'
        )
        while True:
            rep = self.reply(await conn.recv())
            if rep is not None:
                if rep[1] is not None:
                    raise BenchError(f"NATS refused CONNECT: {rep[1]}")
                return

    def subscribe(self, channel: str, req_id: int) -> bytes:
        return b"SUB %s %d\r\nPING\r\n" % (channel.encode(), req_id)

    def publish(self, channel: str, data: dict[str, Any], req_id: int) -> bytes:
        body = orjson.dumps(data)
        return b"PUB %s %d\r\n%s\r\nPING\r\n" % (channel.encode(), len(body), body)

    def replies(self, payload: bytes) -> list[tuple[int | None, str | None]]:
        out: list[tuple[int | None, str | None]] = [(None, None)] * payload.count(b"PONG\r\n")
        if b"-ERR" in payload:
            for line in payload.split(b"\r\n"):
                if line.startswith(b"-ERR"):
                    out.append((None, line.decode(errors="replace")))
        return out

    def reply(self, payload: bytes) -> tuple[int | None, str | None] | None:
        reps = self.replies(payload)
        return reps[-1] if reps else None

    def messages_data(self, payload: bytes) -> list[Any]:
        out: list[Any] = []
        pos = payload.find(b"MSG ")
        while pos >= 0:
            eol = payload.index(b"\r\n", pos)
            size = int(payload[pos:eol].rsplit(b" ", 1)[1])
            out.append(orjson.loads(payload[eol + 2 : eol + 2 + size]))
            pos = payload.find(b"MSG ", eol + 2 + size)
        return out

    def message_data(self, payload: bytes) -> Any:
        found = self.messages_data(payload)
        return found[0] if found else None

    def control(self, conn: Client, payload: bytes) -> bool:
        return False
