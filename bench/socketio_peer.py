"""Optional peer: the same pub/sub subset on python-socketio over aiohttp.

Written the way its documentation suggests (rooms for channels, an ack for
each request, ``emit(..., room=channel)`` for fan-out) so the figure shows
what a typical Socket.IO deployment costs, not a tuned one. Events:
``subscribe(channel) -> "ok"`` and ``publish({"channel", "data"}) -> "ok"``;
subscribers receive ``message`` events ``{"channel", "data"}``.

Run: ``python bench/socketio_peer.py --host 127.0.0.1 --port 8000``.
"""

from __future__ import annotations

import argparse
from typing import Any

import socketio
from aiohttp import web

sio = socketio.AsyncServer(async_mode="aiohttp", logger=False, engineio_logger=False)


@sio.event
async def subscribe(sid: str, channel: str) -> str:
    """Join the room named after the channel."""
    await sio.enter_room(sid, channel)
    return "ok"


@sio.event
async def publish(sid: str, msg: dict[str, Any]) -> str:
    """Emit the message to every member of the channel's room."""
    await sio.emit("message", {"channel": msg["channel"], "data": msg["data"]}, room=msg["channel"])
    return "ok"


def main() -> None:
    """Parse flags and serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    app = web.Application()
    sio.attach(app)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
