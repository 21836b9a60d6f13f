"""Helpers for the backplane tests: waiting with a time-out, collecting deliveries, Redis.

* ``Inbox`` is a ``deliver`` callback that records what it gets and lets a test
  await a condition on it.
* ``eventually`` waits for a condition on state that has no event to await (such
  as ``backplane.ready``), always with a time-out.
* ``real_redis_url`` returns ``REDIS_URL`` if a Redis answers there; otherwise the
  test fails when ``CI`` is set and is skipped (saying why) when it is not.
* ``RedisServer`` runs a throw-away ``redis-server`` on a free port that a test
  may stop and start again; with ``tls_dir`` it also serves TLS on ``tls_port``
  with a fresh self-signed certificate (``cert``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class Inbox:
    """Records ``(channel, data)`` deliveries; ``wait_for`` awaits a condition on them."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._changed = asyncio.Event()

    def __call__(self, channel: str, data: bytes) -> None:
        self.messages.append((channel, data))
        self._changed.set()

    def on(self, channel: str) -> list[bytes]:
        return [data for name, data in self.messages if name == channel]

    async def wait_for(
        self, predicate: Callable[[list[tuple[str, bytes]]], bool], timeout: float = 3.0
    ) -> None:
        async def until() -> None:
            while not predicate(self.messages):
                self._changed.clear()
                await self._changed.wait()

        try:
            async with asyncio.timeout(timeout):
                await until()
        except TimeoutError:
            raise AssertionError(
                f"condition not met within {timeout} s; got {self.messages[-20:]!r}"
            ) from None

    async def wait_count(self, count: int, timeout: float = 3.0) -> None:
        await self.wait_for(lambda messages: len(messages) >= count, timeout)

    async def wait_message(self, channel: str, data: bytes, timeout: float = 3.0) -> None:
        await self.wait_for(lambda messages: (channel, data) in messages, timeout)


async def eventually(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.01
) -> float:
    """Poll ``condition`` until it holds; return the seconds it took. Fails after ``timeout``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not condition():
        if loop.time() - start > timeout:
            raise AssertionError(f"not {what} within {timeout} s")
        await asyncio.sleep(interval)
    return loop.time() - start


def our_tasks(before: set[asyncio.Task[object]]) -> set[asyncio.Task[object]]:
    """Tasks that exist now but did not before (the current task excluded)."""
    return {t for t in asyncio.all_tasks() if t not in before and t is not asyncio.current_task()}


def redis_unavailable(reason: str) -> None:
    """Fail in CI, where a real Redis is required; skip elsewhere, saying why."""
    if os.environ.get("CI"):
        pytest.fail(f"real Redis required in CI: {reason}")
    pytest.skip(f"real Redis not available: {reason} (set REDIS_URL, or CI=1 to make this fail)")


def real_redis_url() -> str:
    """``REDIS_URL`` (default redis://127.0.0.1:6379/0) if a Redis answers PING there."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    client = redis.Redis.from_url(
        url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        redis_unavailable(f"no answer at {url}: {exc}")
    finally:
        client.close()
    return url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A ``redis-server`` of the test's own on a free port, without persistence."""

    def __init__(self, tls_dir: Path | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            redis_unavailable("redis-server is not installed")
        assert binary is not None
        self.binary = binary
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.tls_port = 0
        self.cert: Path | None = None
        self._tls_args: list[str] = []
        if tls_dir is not None:
            self._make_certificate(tls_dir)

    def _make_certificate(self, directory: Path) -> None:
        if shutil.which("openssl") is None:
            pytest.skip("openssl is not installed")
        self.cert, key = directory / "redis.crt", directory / "redis.key"
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "ec"),
                *("-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"),
                *("-keyout", str(key), "-out", str(self.cert), "-subj", "/CN=127.0.0.1"),
                *("-addext", "subjectAltName=IP:127.0.0.1"),
            ],
            check=True,
            capture_output=True,
        )
        self.tls_port = free_port()
        self._tls_args = [
            *("--tls-port", str(self.tls_port), "--tls-cert-file", str(self.cert)),
            *("--tls-key-file", str(key), "--tls-ca-cert-file", str(self.cert)),
            *("--tls-auth-clients", "no"),
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 5.0) -> None:
        assert self.process is None, "already running"
        self.process = subprocess.Popen(
            [
                *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--protected-mode", "no"),
                *self._tls_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.kill()  # abrupt, like a crash: no goodbye to clients
        self.process.wait(timeout=5)
        self.process = None

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False
