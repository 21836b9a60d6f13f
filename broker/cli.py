"""The ``broker`` command: serve, publish, subscribe, schema."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
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

    serve = commands.add_parser(
        "serve",
        help="run the broker",
        description="Run the broker. Every setting (see docs/configuration.md) can also come "
        "from a TOML file (--config) or a BROKER_<NAME> environment variable; the order is "
        "flags, then environment, then file, then defaults. A mistyped BROKER_* variable is "
        "reported at start.",
    )
    serve.add_argument("--config", help="TOML configuration file (default: $BROKER_CONFIG)")
    serve.add_argument("--host", help="WebSocket bind address (default 0.0.0.0)")
    serve.add_argument("--port", help="WebSocket port (default 8000)")
    serve.add_argument("--http-host", help="service API bind address (default 127.0.0.1)")
    serve.add_argument("--http-port", help="service API port (default 8001)")
    serve.add_argument(
        "--backplane", choices=["memory", "redis", "redis-cluster"], help="default memory"
    )
    serve.add_argument(
        "--redis-url", help="Redis URL (redis-cluster: seed node URLs, comma-separated)"
    )
    serve.add_argument("--workers", help="worker processes (needs redis)")
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="default info"
    )
    serve.add_argument("--log-format", choices=["json", "text"], help="default json")
    serve.add_argument(
        "--demo",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve the dashboard example at /demo (on by default; --no-demo in production)",
    )

    publish = commands.add_parser("publish", help="publish one message")
    publish.add_argument("channel")
    publish.add_argument("data", help="a JSON value, for example '{\"t\": 21.5}'")
    publish.add_argument("--url", default=DEFAULT_URL, help=f"default {DEFAULT_URL}")
    publish.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    publish.add_argument(
        "--key",
        help="idempotency key: the broker delivers one message per key, so a retry is safe",
    )
    _token_argument(publish)

    subscribe = commands.add_parser(
        "subscribe",
        help="print messages as JSON lines, until interrupted",
        description="Print each message as a JSON line on stdout. Gaps (messages that may "
        "have been missed) and ended subscriptions are told on stderr, one line each.",
    )
    subscribe.add_argument("patterns", nargs="+", metavar="PATTERN")
    subscribe.add_argument("--url", default=DEFAULT_URL, help=f"default {DEFAULT_URL}")
    subscribe.add_argument("--count", type=int, help="exit after this many messages")
    _token_argument(subscribe)

    commands.add_parser("schema", help="print the JSON Schema of the wire frames")

    token = commands.add_parser(
        "token",
        help="mint a token with the configured jwt_secret (for development and tests)",
        description="Print a JWT signed with the broker's jwt_secret (from --config, "
        "BROKER_CONFIG or BROKER_JWT_SECRET), with the configured audience and issuer.",
    )
    token.add_argument("--sub", required=True, help="the subject (user) the token names")
    token.add_argument(
        "--subscribe", action="append", default=[], metavar="PATTERN",
        help="a pattern the token may subscribe to where a rule says 'token' (repeatable)",
    )  # fmt: skip
    token.add_argument(
        "--publish", action="append", default=[], metavar="PATTERN",
        help="a pattern the token may publish to where a rule says 'token' (repeatable)",
    )  # fmt: skip
    token.add_argument("--ttl", default="1h", help="lifetime: 90, 90s, 15m, 1h, 7d (default 1h)")
    token.add_argument("--config", help="TOML configuration file (default: $BROKER_CONFIG)")
    return parser


def _token_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token",
        default=os.environ.get("BROKER_TOKEN") or None,
        help="a JWT to authenticate with (default: $BROKER_TOKEN); "
        "prefer the variable: a command line is visible to other users",
    )


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
        if args.command == "token":
            return _token(args)
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
    from broker import config as configuration
    from broker import logs

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
    config = configuration.load(args.config, overrides=overrides)
    logs.configure(
        config.log_level, config.log_format, config.worker_index if config.reuse_port else None
    )
    if not config.reuse_port:  # a worker's supervisor has said it already
        for line in configuration.unknown_variables():
            logging.getLogger("broker.config").warning("%s", line)
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


def _token(args: argparse.Namespace) -> int:
    from broker import config as configuration
    from broker.exceptions import BadChannel
    from broker.tokens import mint

    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        print(f"broker token: {exc}", file=sys.stderr)
        return 2
    settings = configuration.load(args.config)
    try:
        token = mint(settings, args.sub, ttl=ttl, subscribe=args.subscribe, publish=args.publish)
    except BadChannel as exc:
        print(f"broker token: {exc.message}", file=sys.stderr)
        return 2
    print(token)
    return 0


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``15m``, ``1h`` or ``7d``; ``ValueError`` otherwise."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    factor = units.get(text[-1:], 0)
    number = text[:-1] if factor else text
    try:
        value = float(number) * (factor or 1)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (say 90, 90s, 15m, 1h or 7d)") from None
    if value <= 0:
        raise ValueError(f"a duration must be positive, not {text!r}")
    return value


async def _publish(args: argparse.Namespace) -> int:
    from broker_client import BrokerError, connect

    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError as exc:
        print(f"broker publish: DATA is not valid JSON: {exc}", file=sys.stderr)
        return 2
    try:
        async with connect(args.url, reconnect=False, token=args.token) as client:
            result = await client.publish(args.channel, data, key=args.key, timeout=args.timeout)
    except BrokerError as exc:
        print(f"broker publish: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"broker publish: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if result.duplicate:
        print(
            f"broker publish: key {args.key!r} was already published; not delivered again",
            file=sys.stderr,
        )
    return 0


async def _subscribe(args: argparse.Namespace) -> int:
    from broker_client import BrokerError, Gap, RequestError, connect

    def warn(text: str) -> None:
        print(f"broker subscribe: {text}", file=sys.stderr, flush=True)

    def describe(gap: Gap) -> str:
        if gap.reason == "reconnect":
            return "reconnected; messages may have been missed"
        if gap.reason == "overflow":
            return f"fell behind; {gap.dropped} messages dropped"
        return f"gap on {gap.channel} ({gap.reason}); messages may have been missed"

    told: list[BaseException] = []

    def refused(error: RequestError) -> None:
        # An ended subscription (unsubscribed, or refused on re-subscribe) or a
        # refused token; the former also ends the iteration below, with this error.
        told.append(error)
        warn(f"{error.code}: {error.message}")

    out = sys.stdout
    seen = 0
    try:
        async with connect(args.url, token=args.token) as client:
            client.on_error(refused)
            subscription = await client.subscribe(*args.patterns)
            async for event in subscription.events():
                if isinstance(event, Gap):
                    warn(describe(event))
                    continue
                line = orjson.dumps({"channel": event.channel, "data": event.data})
                out.write(line.decode() + "\n")
                out.flush()
                seen += 1
                if args.count is not None and seen >= args.count:
                    break
    except BrokerError as exc:
        if not any(exc is error for error in told):
            warn(f"{exc.code}: {exc.message}")
        return 1
    return 0
