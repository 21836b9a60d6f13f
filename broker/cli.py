"""The ``broker`` command: serve, publish, subscribe, schema."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from broker import __version__
from broker.exceptions import ConfigError

DEFAULT_URL = "ws://localhost:8000/ws"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broker", description="Pub/sub message broker over WebSockets."
    )
    parser.add_argument("--version", action="version", version=f"broker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the broker")
    serve.add_argument("--config", help="TOML configuration file (default: $BROKER_CONFIG)")
    serve.add_argument("--host", help="WebSocket bind address (default 0.0.0.0)")
    serve.add_argument("--port", help="WebSocket port (default 8000)")
    serve.add_argument("--http-host", help="service API bind address (default 127.0.0.1)")
    serve.add_argument("--http-port", help="service API port (default 8001)")
    serve.add_argument("--backplane", choices=["memory", "redis"], help="default memory")
    serve.add_argument("--redis-url", help="Redis URL for the redis backplane")
    serve.add_argument("--workers", help="worker processes (needs redis)")
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="default info"
    )
    serve.add_argument("--log-format", choices=["json", "text"], help="default json")
    serve.add_argument(
        "--demo",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve the dashboard example at /demo",
    )

    publish = commands.add_parser("publish", help="publish one message")
    publish.add_argument("channel")
    publish.add_argument("data", help="a JSON value, for example '{\"t\": 21.5}'")
    publish.add_argument("--url", default=DEFAULT_URL, help=f"default {DEFAULT_URL}")
    publish.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")

    subscribe = commands.add_parser(
        "subscribe", help="print messages as JSON lines, until interrupted"
    )
    subscribe.add_argument("patterns", nargs="+", metavar="PATTERN")
    subscribe.add_argument("--url", default=DEFAULT_URL, help=f"default {DEFAULT_URL}")
    subscribe.add_argument("--count", type=int, help="exit after this many messages")

    commands.add_parser("schema", help="print the JSON Schema of the wire frames")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``broker`` and ``python -m broker``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "publish":
            return asyncio.run(_publish(args))
        if args.command == "subscribe":
            with contextlib.suppress(KeyboardInterrupt):
                return asyncio.run(_subscribe(args))
            return 0
        if args.command == "schema":
            from broker.frames import json_schema

            sys.stdout.write(orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2).decode())
            sys.stdout.write("\n")
            return 0
    except ConfigError as exc:
        print(f"broker: configuration error: {exc}", file=sys.stderr)
        return 2
    return 2


def _serve(args: argparse.Namespace) -> int:
    from broker import logs, settings

    overrides: dict[str, Any] = {
        name: getattr(args, name)
        for name in (
            "host",
            "port",
            "http_host",
            "http_port",
            "backplane",
            "redis_url",
            "workers",
            "log_level",
            "log_format",
            "demo",
        )
    }
    config = settings.load(args.config, overrides=overrides)
    logs.configure(
        config.log_level, config.log_format, config.worker_index if config.reuse_port else None
    )
    if config.workers > 1:
        from broker.workers import supervise

        return supervise(config)
    from broker.app import run

    if config.uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
    try:
        asyncio.run(run(config))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        # Typically the port is taken: one line, no traceback.
        print(f"broker: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


async def _publish(args: argparse.Namespace) -> int:
    from broker_client import BrokerError, connect

    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError as exc:
        print(f"broker publish: DATA is not valid JSON: {exc}", file=sys.stderr)
        return 2
    try:
        async with connect(args.url, reconnect=False) as client:
            await client.publish(args.channel, data, timeout=args.timeout)
    except BrokerError as exc:
        print(f"broker publish: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"broker publish: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _subscribe(args: argparse.Namespace) -> int:
    from broker_client import BrokerError, connect

    def gap(*_: object) -> None:
        print("broker subscribe: reconnected; messages may have been missed", file=sys.stderr)

    out = sys.stdout
    seen = 0
    try:
        async with connect(args.url) as client:
            client.on_reconnect(gap)
            subscription = await client.subscribe(*args.patterns)
            async for message in subscription:
                line = orjson.dumps({"channel": message.channel, "data": message.data})
                out.write(line.decode() + "\n")
                out.flush()
                seen += 1
                if args.count is not None and seen >= args.count:
                    break
    except BrokerError as exc:
        print(f"broker subscribe: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    return 0
