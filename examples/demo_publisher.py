"""Feed the live dashboard (/demo) with changing values.

    python examples/demo_publisher.py                      # until interrupted
    python examples/demo_publisher.py --count 20           # 20 rounds, then exit
    python examples/demo_publisher.py --http http://localhost:8001   # over the HTTP API
    python examples/demo_publisher.py --token "$(broker token --sub demo --publish 'demo.>')"

Every ``--interval`` seconds it publishes a random walk to ``demo.cpu``,
``demo.memory``, ``demo.temperature.kitchen`` and ``demo.temperature.office``,
each as ``{"value": number, "unit": str, "seq": int}``. Over WebSocket it uses
the Python client, so it rides out a broker restart: rounds that fail while
the broker is away are reported and skipped, and it goes on once it is back.

``--token`` is sent as ``Authorization: Bearer <token>``: a JWT that may
publish to ``demo.>`` over WebSocket (a broker with authentication on), the
``api_key`` with ``--http``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from broker_client import DEFAULT_HTTP_URL, DEFAULT_URL, BrokerError, HttpPublisher, connect

log = logging.getLogger("demo_publisher")

#: channel -> (unit, start, low, high, largest step)
SERIES: dict[str, tuple[str, float, float, float, float]] = {
    "demo.cpu": ("%", 35.0, 0.0, 100.0, 8.0),
    "demo.memory": ("%", 60.0, 5.0, 95.0, 2.0),
    "demo.temperature.kitchen": ("°C", 21.0, 15.0, 30.0, 0.4),
    "demo.temperature.office": ("°C", 23.5, 15.0, 30.0, 0.3),
}


def rounds(seed: int | None = None) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Yield, forever, one list of (channel, data) per round."""
    rng = random.Random(seed)
    values = {channel: start for channel, (_, start, *_) in SERIES.items()}
    seq = 0
    while True:
        seq += 1
        batch = []
        for channel, (unit, _, low, high, step) in SERIES.items():
            values[channel] = min(high, max(low, values[channel] + rng.uniform(-step, step)))
            batch.append((channel, {"value": round(values[channel], 2), "unit": unit, "seq": seq}))
        yield batch


def _authorization(args: argparse.Namespace) -> dict[str, str] | None:
    return {"Authorization": f"Bearer {args.token}"} if args.token else None


def _limits(args: argparse.Namespace) -> Iterator[int]:
    deadline = time.monotonic() + args.duration if args.duration else None
    n = 0
    while (args.count is None or n < args.count) and (
        deadline is None or time.monotonic() < deadline
    ):
        n += 1
        yield n


class Tally:
    """What was published and what was not, for the line printed at exit."""

    def __init__(self) -> None:
        self.published = 0
        self.failed = 0
        self.started = time.monotonic()

    def summary(self) -> str:
        seconds = time.monotonic() - self.started
        return (
            f"demo_publisher: {self.published} messages published, {self.failed} not published,"
            f" in {seconds:.1f} s"
        )


async def run_ws(args: argparse.Namespace, tally: Tally) -> int:
    source = rounds(args.seed)
    headers = _authorization(args)
    async with connect(
        args.url, retry_first_connect=True, request_timeout=2.0, additional_headers=headers
    ) as client:
        log.info("publishing to %s every %.2f s", args.url, args.interval)
        for _ in _limits(args):
            started = time.monotonic()
            for channel, data in next(source):
                try:
                    await client.publish(channel, data)
                    tally.published += 1
                except BrokerError as exc:  # the broker is away, or refused it
                    tally.failed += 1
                    log.warning("%s not published: %s", channel, exc)
                    break
            await asyncio.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    return 0


def run_http(args: argparse.Namespace, tally: Tally) -> int:
    publisher = HttpPublisher(args.http, timeout=2.0, headers=_authorization(args))
    source = rounds(args.seed)
    log.info("publishing to %s every %.2f s", args.http, args.interval)
    for _ in _limits(args):
        started = time.monotonic()
        for channel, data in next(source):
            try:
                publisher.publish(channel, data)
                tally.published += 1
            except BrokerError as exc:
                tally.failed += 1
                log.warning("%s not published: %s", channel, exc)
                break
        time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL, help=f"WebSocket URL (default {DEFAULT_URL})")
    parser.add_argument(
        "--http",
        nargs="?",
        const=DEFAULT_HTTP_URL,
        metavar="URL",
        help=f"publish over the HTTP API instead (default URL {DEFAULT_HTTP_URL})",
    )
    parser.add_argument(
        "--token",
        help="bearer token: a JWT allowed to publish to demo.> (or, with --http, the api_key)",
    )
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between rounds")
    parser.add_argument("--count", type=int, help="stop after this many rounds")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--seed", type=int, help="random seed, for repeatable values")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    tally = Tally()
    signal.signal(signal.SIGTERM, _interrupt)  # stopped by a supervisor: exit 0 with the summary
    try:
        if args.http:
            return run_http(args, tally)
        return asyncio.run(run_ws(args, tally))
    except KeyboardInterrupt:
        return 0
    except BrokerError as exc:
        print(f"demo_publisher: {exc}", file=sys.stderr)
        return 1
    finally:
        print(tally.summary(), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
