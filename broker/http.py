"""The service HTTP API, on its own port so it need not face browsers.

``POST /publish`` answers once the backplane took the message; ``/healthz``
says the process is alive, ``/readyz`` that it can deliver, ``/metrics``
exposes Prometheus text. Built on aiohttp because ``websockets`` cannot read
request bodies.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from aiohttp import web

from broker import codec
from broker.exceptions import RequestError, TooLarge
from broker.metrics import render
from broker.node import Node
from broker.settings import Settings

log = logging.getLogger("broker.http")

NODE_KEY = web.AppKey("node", Node)


def error_response(exc: RequestError) -> web.Response:
    """The JSON error body of PROTOCOL.md, with the error's HTTP status."""
    return web.json_response(
        {"error": {"code": exc.code, "message": exc.message}}, status=exc.http_status
    )


async def publish(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    node.metrics.http_requests["publish"] += 1
    try:
        if request.content_length is not None and (
            request.content_length > node.settings.max_frame_bytes
        ):
            raise TooLarge(
                f"body is {request.content_length} bytes, over the "
                f"{node.settings.max_frame_bytes}-byte cap"
            )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise TooLarge(f"body is over the {node.settings.max_frame_bytes}-byte cap") from None
        frame = codec.decode_http_publish(body)
        await node.publish(frame.channel, frame.data)
    except RequestError as exc:
        node.metrics.errors[exc.code] += 1
        return error_response(exc)
    return web.json_response({"ok": True})


async def healthz(request: web.Request) -> web.Response:
    request.app[NODE_KEY].metrics.http_requests["healthz"] += 1
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    node.metrics.http_requests["readyz"] += 1
    if node.ready:
        return web.json_response({"status": "ready", "backplane": node.settings.backplane})
    return web.json_response(
        {"status": "unavailable", "backplane": node.settings.backplane}, status=503
    )


async def metrics(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    node.metrics.http_requests["metrics"] += 1
    body = render(
        node.metrics,
        lambda: _gauges(node),
        node.backplane.stats,
        {
            "pid": str(os.getpid()),
            "worker": str(node.settings.worker_index),
            "backplane": node.settings.backplane,
        },
    )
    return web.Response(
        body=body,
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


def _gauges(node: Node) -> dict[str, float]:
    return {
        "connections": len(node.peers),
        "subscriptions": len(node.hub.index),
        "patterns": sum(1 for _ in node.hub.index.patterns()),
        "backplane_ready": 1.0 if node.ready else 0.0,
    }


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Answer aiohttp's own errors (404, 405) in the API's JSON error shape."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = "bad_request" if exc.status < 500 else "internal"
        return web.json_response(
            {"error": {"code": code, "message": f"{exc.reason}: {request.method} {request.path}"}},
            status=exc.status,
        )


def make_app(node: Node) -> web.Application:
    """Build the aiohttp application for ``node``."""
    app = web.Application(client_max_size=node.settings.max_frame_bytes, middlewares=[json_errors])
    app[NODE_KEY] = node
    app.router.add_post("/publish", publish)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


class HttpApi:
    """Owns the aiohttp runner and site for the service API."""

    def __init__(self, settings: Settings, node: Node) -> None:
        self._settings = settings
        self._runner = web.AppRunner(make_app(node), access_log=None, handle_signals=False)
        self._site: web.TCPSite | None = None

    async def start(self) -> None:
        await self._runner.setup()
        self._site = web.TCPSite(
            self._runner,
            self._settings.http_host,
            self._settings.http_port,
            reuse_port=self._settings.reuse_port,
        )
        await self._site.start()

    @property
    def port(self) -> int:
        assert self._site is not None and self._site._server is not None
        server: Any = self._site._server
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        await self._runner.cleanup()
