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
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.backplane import Position

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class Inbox:
    """A backplane ``Listener`` that records ``(channel, data)`` deliveries and link events.

    ``wait_for`` awaits a condition on the deliveries.
    """

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.positions: list[Position | None] = []
        self.links: list[str] = []  # "lost" and "restored", in order
        self._changed = asyncio.Event()

    def deliver(self, channel: str, data: bytes, position: Position | None) -> None:
        self.messages.append((channel, data))
        self.positions.append(position)
        self._changed.set()

    def link_lost(self) -> None:
        self.links.append("lost")

    def link_restored(self) -> None:
        self.links.append("restored")

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


DEFAULT_CLUSTER_URL = "redis://127.0.0.1:7101"


def real_cluster_url() -> str:
    """``REDIS_CLUSTER_URL`` (default redis://127.0.0.1:7101) if a healthy cluster answers there.

    Fails in CI (``.ci/run`` starts one with ``.ci/redis-cluster``), skips elsewhere.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    url = os.environ.get("REDIS_CLUSTER_URL", DEFAULT_CLUSTER_URL)
    client = redis.Redis.from_url(
        url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )
    try:
        info = client.execute_command("CLUSTER", "INFO")
    except redis.RedisError as exc:
        redis_unavailable(f"no Redis Cluster at {url}: {exc} (run .ci/redis-cluster start)")
    finally:
        client.close()
    text = info.decode() if isinstance(info, bytes) else str(info)
    if "cluster_state:ok" not in text:
        redis_unavailable(f"the Redis Cluster at {url} is not healthy")
    return url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A ``redis-server`` of the test's own on a free port.

    Without persistence by default (a restart loses everything, as a flush
    would); with ``data_dir`` it keeps an append-only file fsynced on every
    write, so a restart keeps what was written before it.
    """

    def __init__(self, tls_dir: Path | None = None, data_dir: Path | None = None) -> None:
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
        self._persistence = ["--save", "", "--appendonly", "no"]
        if data_dir is not None:
            self._persistence = [
                *("--save", "", "--appendonly", "yes", "--appendfsync", "always"),
                *("--dir", str(data_dir)),
            ]
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
                *self._persistence,
                *("--protected-mode", "no"),
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


REPO = Path(__file__).resolve().parent.parent


class LocalCluster:
    """A Redis Cluster of the test's own (three masters, three replicas) that it may break.

    Started and stopped with ``.ci/redis-cluster`` on six free loopback ports,
    in a data directory of its own, so killing a master here never disturbs the
    shared cluster other tests use.
    """

    def __init__(self, directory: Path) -> None:
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            redis_unavailable("redis-server or redis-cli is not installed")
        self.base = _free_port_run(6)
        self.env = {
            **os.environ,
            "REDIS_CLUSTER_PORT": str(self.base),
            "REDIS_CLUSTER_DIR": str(directory),
        }
        self.directory = directory

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.base}"

    def _script(self, *args: str) -> None:
        subprocess.run(
            [str(REPO / ".ci" / "redis-cluster"), *args],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        self._script("start")

    def stop(self) -> None:
        self._script("stop")

    def kill(self, port: int) -> None:
        """SIGKILL one node, as a crash would."""
        pid = int((self.directory / str(port) / "redis.pid").read_text())
        os.kill(pid, signal.SIGKILL)

    def start_node(self, port: int) -> None:
        self._script("start-node", str(port))

    def cli(self, *args: str, port: int | None = None) -> str:
        result = subprocess.run(
            ["redis-cli", "-p", str(port or self.base), *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return result.stdout

    def master_of(self, slot: int, ask: int | None = None) -> int:
        """The port of the master serving ``slot``, as node ``ask`` sees it."""
        for line in self.cli("cluster", "nodes", port=ask).splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for part in fields[8:]:
                if "[" in part:
                    continue
                start, _, end = part.partition("-")
                if int(start) <= slot <= int(end or start):
                    return int(fields[1].split(":")[1].split("@")[0])
        raise AssertionError(f"no master serves slot {slot}")

    def move_slot(self, slot: int, to_port: int) -> None:
        """Reshard one slot, keys included, to the master at ``to_port`` (as redis-cli does).

        The masters are asked, not any node: a replica learns of a previous
        move by gossip, later.
        """
        from_port = self.master_of(slot, ask=to_port)
        source, target = (self.cli("cluster", "myid", port=p).strip() for p in (from_port, to_port))
        self.cli("cluster", "setslot", str(slot), "importing", source, port=to_port)
        self.cli("cluster", "setslot", str(slot), "migrating", target, port=from_port)
        while keys := self.cli(
            "cluster", "getkeysinslot", str(slot), "100", port=from_port
        ).split():
            self.cli(
                "migrate", "127.0.0.1", str(to_port), "", "0", "5000", "keys", *keys, port=from_port
            )
        # As redis-cli: the target first, then the source (which ends its
        # migrating state), then every other master.
        others = sorted(set(self.masters(ask=to_port)) - {to_port, from_port})
        for port in [to_port, from_port, *others]:
            self.cli("cluster", "setslot", str(slot), "node", target, port=port)

    def masters(self, ask: int | None = None) -> list[int]:
        """The ports of the masters that serve slots, as node ``ask`` sees it."""
        ports = []
        for line in self.cli("cluster", "nodes", port=ask).splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2] and len(fields) > 8:
                ports.append(int(fields[1].split(":")[1].split("@")[0]))
        return ports

    def replicas_in_sync(self) -> bool:
        """Whether three replicas are in sync with their masters (so a failover can happen)."""
        synced = 0
        for port in range(self.base, self.base + 6):
            try:
                info = self.cli("info", "replication", port=port)
            except subprocess.CalledProcessError:
                continue
            synced += "master_link_status:up" in info
        return synced >= 3


class TlsCluster:
    """Three TLS-only masters (``tls-cluster yes``, no plain port) with a self-signed
    certificate for 127.0.0.1; owned by the test, killed by ``stop()``."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            redis_unavailable("redis-server or redis-cli is not installed")
        self.directory = directory
        self.base = _free_port_run(3)
        self.ports = [self.base + i for i in range(3)]
        self.processes: list[subprocess.Popen[bytes]] = []
        certificate = RedisServer(tls_dir=directory)  # only for its certificate
        assert certificate.cert is not None
        self.cert = certificate.cert
        self.key = directory / "redis.key"

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.base}?ssl_ca_certs={self.cert}"

    def _cli(self, *args: str, port: int | None = None) -> str:
        result = subprocess.run(
            ["redis-cli", "--tls", "--cacert", str(self.cert), "-p", str(port or self.base), *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return result.stdout

    def start(self) -> None:
        for port in self.ports:
            data = self.directory / str(port)
            data.mkdir()
            self.processes.append(
                subprocess.Popen(
                    [
                        *("redis-server", "--port", "0", "--tls-port", str(port)),
                        *("--bind", "127.0.0.1", "--dir", str(data)),
                        *("--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key)),
                        *("--tls-ca-cert-file", str(self.cert), "--tls-auth-clients", "no"),
                        *("--tls-cluster", "yes", "--tls-replication", "yes"),
                        *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                        *("--cluster-node-timeout", "1000", "--save", "", "--appendonly", "no"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 10
        while True:
            try:
                for port in self.ports:
                    self._cli("ping", port=port)
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        self._cli("--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes")
        while "cluster_state:ok" not in self._cli("cluster", "info"):
            if time.monotonic() > deadline + 20:
                raise AssertionError("the TLS cluster did not come up")
            time.sleep(0.1)

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait(timeout=5)
        self.processes = []


def _free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free ports (their bus ports, +10000, free too)."""
    for _ in range(200):
        base = random.randrange(20000, 22700)  # bus ports below the ephemeral range
        ports = [base + i for i in range(count)] + [base + 10000 + i for i in range(count)]
        if all(_port_free(port) for port in ports):
            return base
    raise AssertionError("no run of free ports found")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
