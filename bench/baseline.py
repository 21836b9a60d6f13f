"""Baseline pub/sub server: the yardstick every broker figure is divided by.

Deliberately minimal (websockets 17, exact channels, subscribe and publish
only): fan-out is one ``orjson.dumps`` per message and one
``websockets.asyncio.server.broadcast`` of those bytes. No validation, no
patterns, no backpressure. A broker that is slower than this is paying for
something; a broker that is faster has found a cheaper write path.

Run: ``python bench/baseline.py --host 127.0.0.1 --port 8000``.
"""

from __future__ import annotations

import argparse
import asyncio
import http

import orjson
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

CHANNELS: dict[str, set[ServerConnection]] = {}


def only_ws(conn: ServerConnection, request: Request) -> Response | None:
    """Answer 404 to any path but /ws, as the protocol requires."""
    if request.path != "/ws":
        return conn.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
    return None


async def handler(ws: ServerConnection) -> None:
    """Serve one connection: subscribe, publish, reply ok when an id is given."""
    mine: set[str] = set()
    try:
        while True:
            msg = orjson.loads(await ws.recv(decode=False))
            op, channel = msg.get("op"), msg.get("channel")
            if op == "subscribe":
                CHANNELS.setdefault(channel, set()).add(ws)
                mine.add(channel)
            elif op == "publish":
                frame = orjson.dumps({"op": "message", "channel": channel, "data": msg["data"]})
                broadcast(CHANNELS.get(channel, ()), frame, text=True)
            if "id" in msg:
                await ws.send(orjson.dumps({"op": "ok", "id": msg["id"]}), text=True)
    except ConnectionClosed:
        pass
    finally:
        for channel in mine:
            subs = CHANNELS[channel]
            subs.discard(ws)
            if not subs:
                del CHANNELS[channel]


async def main() -> None:
    """Parse flags and serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    async with serve(handler, args.host, args.port, process_request=only_ws) as server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
