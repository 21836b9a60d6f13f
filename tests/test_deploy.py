"""The files in ``deploy/``, proven: nginx in front of real brokers, the rest offline.

* nginx: ``deploy/nginx.conf`` itself, with only its upstream ``server`` lines and its
  ``listen`` line rewritten to free loopback ports, in front of two real
  ``broker serve --backplane redis`` processes: the WebSocket upgrade, clients receiving
  HTTP publishes made on either process once each and in order, ``X-Forwarded-For``
  honoured with ``trusted_proxies`` (and only then), ``/healthz``; and failover from a
  dead host within ``proxy_connect_timeout``.
* Dockerfile: hadolint finds nothing; the image's shape; its HEALTHCHECK command run
  against a real broker; ``.dockerignore`` keeps the context to what the image installs.
  (No Docker engine here: nothing is built.)
* docker-compose.yml and Kubernetes: structure, the Kubernetes schemas
  (kubernetes-validate, offline), and their settings loaded by the broker's own loader.
* systemd: ``systemd-analyze security --offline`` scores the unit below 5 and
  ``systemd-analyze verify`` is clean; the broker runs under the kernel's
  memory-deny-write-execute, which the unit asks for.
* Stopping: every supervisor (systemd, compose, Kubernetes) gives the drain the time the
  broker's defaults say it takes.
* Monitoring: ``promtool check rules`` and ``promtool test rules`` (each alert fires and
  stays quiet); the dashboard's expressions parse and name only known metrics.

A missing tool (nginx, promtool, systemd-analyze, hadolint) fails the test when ``CI``
is set and skips it otherwise; ``.ci/run`` installs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from broker import config
from broker.settings import Settings
from broker.workers import GRACE
from tests.backplane_support import real_redis_url
from tests.brokerproc import (
    REPO,
    BrokerProcess,
    free_port,
    free_ports,
    http_get,
    running,
    wait_until,
)
from tests.wait import until, within

DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
MONITORING = DEPLOY / "monitoring"
#: The service API publishes JSON only (a text/plain POST from a web page must not publish).
JSON = {"Content-Type": "application/json"}

Frame = dict[str, Any]


def default(name: str) -> Any:
    """The built-in default of a broker setting."""
    return Settings.model_fields[name].default


def need_tool(name: str, *elsewhere: Path) -> str:
    """The path of ``name``; fail in CI, where .ci/run installs it, skip elsewhere."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    for path in elsewhere:
        if not found and os.access(path, os.X_OK):
            found = str(path)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI (.ci/run installs it)")
        pytest.skip(f"{name} is not installed (.ci/run installs it; with CI set this fails)")
    return found


def run(
    argv: Sequence[str], timeout: float = 60.0, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


def seconds(value: str | int | float) -> float:
    """A duration as systemd, compose or Kubernetes write it (``25``, ``15s``, ``1m``)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", str(value).strip())
    assert match, f"not a duration: {value!r}"
    number, unit = float(match[1]), match[2] or "s"
    return number * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]


# --- nginx in front of real brokers ------------------------------------------------------

NGINX_ELSEWHERE = Path("/usr/sbin/nginx")


def nginx_conf(upstreams: Sequence[str], port: int, workdir: Path) -> str:
    """deploy/nginx.conf with its upstream servers and listen address replaced.

    Everything else is the shipped file, plus log and temporary paths inside
    ``workdir`` so that nginx writes nothing outside it.
    """
    text = (DEPLOY / "nginx.conf").read_text()
    servers = list(re.finditer(r"^(\s*)server broker\d+:8000( [^;]*)?;\n", text, re.M))
    assert len(servers) == 2, "nginx.conf no longer has the two compose upstreams"
    indent, params = servers[0][1], servers[0][2] or ""
    lines = "".join(f"{indent}server {address}{params};\n" for address in upstreams)
    text = text[: servers[0].start()] + lines + text[servers[-1].end() :]
    text, listens = re.subn(
        r"^(\s*)listen 8000;", rf"\g<1>listen 127.0.0.1:{port};", text, flags=re.M
    )
    assert listens == 1, "nginx.conf no longer has 'listen 8000;'"
    local = "".join(
        f"  {directive} {workdir / name};\n"
        for directive, name in [
            ("access_log", "access.log"),
            ("client_body_temp_path", "body"),
            ("proxy_temp_path", "proxy"),
            ("fastcgi_temp_path", "fastcgi"),
            ("uwsgi_temp_path", "uwsgi"),
            ("scgi_temp_path", "scgi"),
        ]
    )
    text, https = re.subn(r"^http \{\n", "http {\n" + local, text, flags=re.M)
    assert https == 1
    return text


class Nginx:
    """nginx in the foreground on a free loopback port, owned by the test."""

    def __init__(self, upstreams: Sequence[str], workdir: Path) -> None:
        self.binary = need_tool("nginx", NGINX_ELSEWHERE)
        self.workdir = workdir
        self.port = free_port()
        self.conf = workdir / "nginx.conf"
        self.conf.write_text(nginx_conf(upstreams, self.port, workdir))
        self.log_path = workdir / "nginx.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def argv(self, *extra: str) -> list[str]:
        pid = self.workdir / "nginx.pid"
        return [
            self.binary, "-p", str(self.workdir), "-c", str(self.conf), "-e", "stderr",
            "-g", f"daemon off; pid {pid}; error_log stderr;", *extra,
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> None:
        check = run(self.argv("-t"), timeout=timeout)
        assert check.returncode == 0, f"nginx -t refused the config:\n{check.stderr}"
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # master and workers in a group of their own
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise AssertionError(f"nginx exited ({self._proc.returncode}):\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"nginx not listening within {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: fast shutdown, open WebSockets included
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # any worker left behind
        proc.wait(5.0)
        self._proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@asynccontextmanager
async def nginx_in_front(upstreams: Sequence[str], workdir: Path) -> AsyncIterator[Nginx]:
    lb = Nginx(upstreams, workdir)
    await asyncio.to_thread(lb.start)
    try:
        yield lb
    except BaseException:
        print(f"--- nginx log ---\n{lb.log()}")
        raise
    finally:
        await asyncio.to_thread(lb.stop)


def redis_brokers(count: int, **env: str) -> list[BrokerProcess]:
    """``count`` brokers on the real Redis, one broker (a prefix of this test's own)."""
    url = real_redis_url()
    prefix = f"dep{uuid.uuid4().hex[:10]}."
    args = ("--backplane", "redis", "--redis-url", url, "--no-demo")
    return [BrokerProcess(*args, env={"BROKER_REDIS_PREFIX": prefix, **env}) for _ in range(count)]


def address(broker: BrokerProcess) -> str:
    return f"{broker.host}:{broker.port}"


def gauge(broker: BrokerProcess, name: str) -> float:
    """One unlabelled sample from the broker's /metrics."""
    status, body = http_get(f"{broker.http_url}/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    raise AssertionError(f"{name} not in /metrics of {broker!r}")


class Client:
    """A raw WebSocket client speaking the broker's protocol."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def recv(self, timeout: float = 5.0) -> Frame:
        frame: Frame = orjson.loads(await within(self.ws.recv(), timeout))
        return frame

    async def call(self, op: str, **fields: Any) -> Frame:
        request_id = next(self._ids)
        await self.ws.send(orjson.dumps({"op": op, "id": request_id, **fields}).decode())
        reply = await self.recv()
        assert reply.get("id") == request_id, reply
        return reply

    async def subscribe(self, *patterns: str) -> None:
        for pattern in patterns:
            assert (await self.call("subscribe", channel=pattern))["op"] == "ok"

    async def messages(self, count: int, timeout: float = 10.0) -> list[Frame]:
        got = []
        async with asyncio.timeout(timeout):
            while len(got) < count:
                frame = await self.recv()
                assert frame["op"] == "message", frame
                got.append(frame)
        return got


async def through(stack: AsyncExitStack, lb: Nginx, forwarded_for: str) -> ClientConnection:
    """A WebSocket through nginx, claiming to come from ``forwarded_for``."""
    return await stack.enter_async_context(
        connect(
            lb.ws_url,
            additional_headers={"X-Forwarded-For": forwarded_for},
            open_timeout=5,
            close_timeout=2,
        )
    )


@pytest.mark.slow
@pytest.mark.redis
async def test_nginx_in_front_of_two_brokers(tmp_path: Path) -> None:
    # nginx runs on 127.0.0.1 too, so it is the trusted proxy. Every client
    # connects from 127.0.0.1 and names a different address in X-Forwarded-For:
    # with at most one connection per address, all are accepted only if the
    # broker counts the forwarded addresses.
    brokers = redis_brokers(
        2, BROKER_TRUSTED_PROXIES="127.0.0.1", BROKER_MAX_CONNECTIONS_PER_IP="1"
    )
    count, clients_n = 40, 6
    async with (
        running(*brokers),
        nginx_in_front([address(b) for b in brokers], tmp_path) as lb,
        AsyncExitStack() as stack,
    ):
        status, body = await asyncio.to_thread(http_get, f"{lb.url}/healthz")
        assert (status, body.strip()) == (200, b"ok")

        clients = []
        for i in range(clients_n):
            ws = await through(stack, lb, f"198.51.100.{i + 1}")
            assert ws.response is not None
            assert ws.response.status_code == 101
            assert ws.response.headers["Upgrade"].lower() == "websocket"
            assert ws.response.headers.get("Server", "").startswith("nginx")
            client = Client(ws)
            # Two overlapping patterns: still one delivery per connection.
            await client.subscribe("dep.*", "dep.>")
            clients.append(client)
        held = [await asyncio.to_thread(gauge, b, "broker_connections") for b in brokers]
        assert sum(held) == clients_n and min(held) >= 1, held  # both processes serve

        async with aiohttp.ClientSession() as http:
            for n in range(count):
                broker = brokers[n % 2]  # alternate the process published on
                body_bytes = orjson.dumps({"channel": "dep.x", "data": {"n": n}})
                async with http.post(
                    f"{broker.http_url}/publish", data=body_bytes, headers=JSON
                ) as response:
                    assert response.status == 200, await response.text()

        for i, client in enumerate(clients):
            got = await client.messages(count)
            assert [m["channel"] for m in got] == ["dep.x"] * count
            assert [m["data"]["n"] for m in got] == list(range(count)), f"client {i}"
            # The next frame is the pong: nothing was delivered twice.
            assert (await client.call("ping"))["op"] == "pong"

        # A rolling restart: SIGTERM to one process. New clients through nginx land
        # on the other at once (a draining process answers handshakes 503, a stopped
        # one refuses the connection: nginx moves on either way); the stopping
        # process's clients are closed (1012 after a drain, else 1001) and it exits 0
        # within shutdown_timeout.
        stopping, staying = brokers
        assert stopping.pid is not None
        os.kill(stopping.pid, signal.SIGTERM)
        for i in range(4):
            late = Client(await through(stack, lb, f"203.0.113.{i + 1}"))
            assert (await late.call("ping"))["op"] == "pong"
        timeout = default("shutdown_timeout") + 5
        await asyncio.to_thread(
            wait_until, lambda: not stopping.running, timeout=timeout, message="stopped"
        )
        assert stopping.code == 0
        await until(lambda: sum(c.ws.close_code is not None for c in clients) >= held[0])
        closed = [c.ws.close_code for c in clients if c.ws.close_code is not None]
        assert len(closed) == held[0] and set(closed) <= {1001, 1012}, closed
        for client in clients:
            if client.ws.close_code is None:  # on the other process: undisturbed
                assert (await client.call("ping"))["op"] == "pong"
        assert await asyncio.to_thread(gauge, staying, "broker_connections") == held[1] + 4


@pytest.mark.slow
@pytest.mark.redis
async def test_forwarded_for_counts_only_from_trusted_proxies(tmp_path: Path) -> None:
    # The same, without BROKER_TRUSTED_PROXIES: every client is 127.0.0.1 (nginx),
    # so each process takes one of them and refuses the rest.
    brokers = redis_brokers(2, BROKER_MAX_CONNECTIONS_PER_IP="1")
    async with (
        running(*brokers),
        nginx_in_front([address(b) for b in brokers], tmp_path) as lb,
        AsyncExitStack() as stack,
    ):
        accepted, refused = 0, 0
        for i in range(4):
            client = Client(await through(stack, lb, f"198.51.100.{i + 1}"))
            with contextlib.suppress(ConnectionClosed):  # a refused one may be closed already
                await client.ws.send(orjson.dumps({"op": "ping", "id": 1}).decode())
            frame = await client.recv()
            if frame["op"] == "pong":
                accepted += 1
                continue
            assert frame["op"] == "error" and frame["code"] == "limit_exceeded", frame
            with pytest.raises(ConnectionClosed) as closed:
                await within(client.ws.recv())
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            refused += 1
        # least_conn hands the second client to the process without one.
        assert (accepted, refused) == (2, 2)


class BlackHole:
    """A loopback address that never completes a TCP handshake.

    A listening socket whose accept queue is full: Linux drops further SYNs,
    exactly what a dead host looks like to nginx.
    """

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", self.port))
            self.fillers.append(filler)
        probe = socket.socket()
        probe.settimeout(0.5)
        try:
            with pytest.raises(TimeoutError):
                probe.connect(("127.0.0.1", self.port))
        finally:
            probe.close()

    def close(self) -> None:
        for sock in [*self.fillers, self.listener]:
            sock.close()


@pytest.mark.slow
async def test_nginx_fails_over_from_a_dead_host(tmp_path: Path) -> None:
    text = (DEPLOY / "nginx.conf").read_text()
    connect_timeout = seconds(re.search(r"proxy_connect_timeout (\w+);", text)[1])  # type: ignore[index]
    hole = BlackHole()
    broker = BrokerProcess("--no-demo")
    try:
        async with (
            running(broker),
            nginx_in_front([f"127.0.0.1:{hole.port}", address(broker)], tmp_path) as lb,
            AsyncExitStack() as stack,
        ):
            took = []
            for i in range(2):
                start = time.monotonic()
                client = Client(await through(stack, lb, f"198.51.100.{i + 1}"))
                assert (await client.call("ping"))["op"] == "pong"
                took.append(time.monotonic() - start)
            # Both handshakes succeeded and none waited much longer than the connect
            # time-out. One of them was sent to the dead host first (least_conn hands
            # the second client to the upstream without a connection) and waited
            # for that time-out: nginx gave up on the dead host and moved on.
            assert max(took) < connect_timeout + 2.0, took
            assert max(took) > connect_timeout * 0.75, took
    finally:
        hole.close()


def test_nginx_timeouts_fit_the_broker() -> None:
    text = (DEPLOY / "nginx.conf").read_text()
    read = seconds(re.search(r"proxy_read_timeout (\w+);", text)[1])  # type: ignore[index]
    assert read > default("ping_interval") * 2, "idle clients would be cut between pings"
    assert "proxy_next_upstream error timeout" in text
    for header in ("X-Forwarded-For $proxy_add_x_forwarded_for", "X-Real-IP", "Host $host"):
        assert f"proxy_set_header {header}" in text
    # A location with a proxy_set_header of its own would inherit none of the others.
    for block in re.findall(r"location [^{]*\{([^}]*)\}", text):
        assert "proxy_set_header" not in block


# --- Dockerfile ----------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            instructions.append((keyword.upper(), " ".join(rest.split())))
            pending = ""
    return instructions


def dockerfile_env() -> dict[str, str]:
    """The ENV of the final stage (``KEY=value`` pairs, no quoting used)."""
    stages = [i for i, (keyword, _) in enumerate(dockerfile()) if keyword == "FROM"]
    env = {}
    for keyword, rest in dockerfile()[stages[-1] :]:
        if keyword == "ENV":
            for pair in rest.split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    hadolint = need_tool("hadolint")
    # No configuration file of anyone's may relax the rules: run where there is none.
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path),
    }
    result = run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")], cwd=tmp_path, env=env)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_dockerfile_shape() -> None:
    instructions = dockerfile()
    stages = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    final = instructions[stages[-1] :]
    keywords = [keyword for keyword, _ in final]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0
    assert ("STOPSIGNAL", "SIGTERM") in final
    assert "HEALTHCHECK" in keywords
    assert dockerfile_env()["BROKER_DEMO"] == "false"
    cmd = json.loads(next(rest for keyword, rest in final if keyword == "CMD"))
    assert cmd == ["broker", "serve"]  # exec form: SIGTERM reaches the broker itself
    # Only what the wheel needs is copied, and .dockerignore lets all of it through.
    for keyword, rest in instructions:
        if keyword == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (REPO / source).exists(), source
                assert not dockerignored(source), f"{source} is excluded by .dockerignore"


def healthcheck_commands() -> dict[str, list[str]]:
    """The health check commands of the image and of the compose brokers."""
    rest = next(rest for keyword, rest in dockerfile() if keyword == "HEALTHCHECK")
    image = json.loads(rest[rest.index("CMD ") + 4 :])
    compose_test = compose()["services"]["broker1"]["healthcheck"]["test"]
    assert compose_test[0] == "CMD"
    return {"Dockerfile": image, "docker-compose.yml": compose_test[1:]}


@pytest.mark.parametrize("source", ["Dockerfile", "docker-compose.yml"])
def test_healthcheck_command_checks_the_service_port(source: str) -> None:
    argv = healthcheck_commands()[source]
    assert argv[0] == "python"
    argv = [sys.executable, *argv[1:]]
    with BrokerProcess("--no-demo") as broker:
        env = {**os.environ, "BROKER_HTTP_PORT": str(broker.http_port)}
        assert run(argv, timeout=10, env=env).returncode == 0
    env = {**os.environ, "BROKER_HTTP_PORT": str(free_port())}
    assert run(argv, timeout=10, env=env).returncode != 0  # nothing listens: unhealthy


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(regex)))
    return rules


def dockerignored(path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context (last matching rule
    wins; a rule matching a parent directory matches everything in it)."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, regex in _dockerignore_rules():
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_context_to_what_the_image_installs() -> None:
    tracked = run(["git", "ls-files"], cwd=REPO).stdout.split()
    assert "pyproject.toml" in tracked
    wanted = ("pyproject.toml", "README.md", "broker/", "clients/")
    for path in tracked:
        assert dockerignored(path) != path.startswith(wanted), path
    for path in [
        ".venv/bin/python", ".git/HEAD", "bench/results/run.json", ".mypy_cache/x.json",
        "broker/__pycache__/app.cpython-311.pyc", "clients/broker_client/__pycache__/a.pyc",
        ".pytest_cache/v/cache", "wsbroker.egg-info/PKG-INFO", "tests/test_deploy.py",
    ]:  # fmt: skip
        assert dockerignored(path), path


# --- docker compose --------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return data


def test_compose_structure() -> None:
    data = compose()
    services = data["services"]
    brokers = {name: s for name, s in services.items() if name.startswith("broker")}
    assert set(brokers) == {"broker1", "broker2"}
    # One image name, built once, run twice.
    images = {s["image"] for s in brokers.values()}
    assert len(images) == 1
    builders = [name for name, s in services.items() if "build" in s]
    assert builders == ["broker1"]
    build = services["broker1"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert services["broker2"].get("pull_policy") == "never"
    # The service API on the host's loopback only, and only for broker1.
    assert services["broker1"]["ports"] == ["127.0.0.1:8001:8001"]
    assert "ports" not in services["broker2"]
    for name, service in services.items():
        for port in service.get("ports", []):
            if not str(port).startswith("127.0.0.1:"):
                assert name == "lb" and str(port).endswith(":8000"), (name, port)
    # Health checks, and start order on them.
    for name in ("redis", "broker1", "broker2"):
        assert services[name]["healthcheck"]["test"], name
    for name in ("broker1", "broker2"):
        assert services[name]["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert services["lb"]["depends_on"] == {
        "broker1": {"condition": "service_healthy"},
        "broker2": {"condition": "service_healthy"},
    }
    # nginx gets the checked-in config; the brokers trust its fixed address only.
    assert services["lb"]["volumes"] == ["./nginx.conf:/etc/nginx/nginx.conf:ro"]
    lb_address = services["lb"]["networks"]["backend"]["ipv4_address"]
    subnet = data["networks"]["backend"]["ipam"]["config"][0]["subnet"]
    assert lb_address.rsplit(".", 1)[0] == subnet.rsplit(".", 1)[0]
    for service in brokers.values():
        assert service["environment"]["BROKER_TRUSTED_PROXIES"] == lb_address
    # nginx.conf's upstreams are the broker services, on the image's port.
    upstreams = re.findall(r"server (\w+):8000", (DEPLOY / "nginx.conf").read_text())
    assert sorted(upstreams) == sorted(brokers)


def test_compose_environment_is_valid_broker_configuration() -> None:
    for name in ("broker1", "broker2"):
        env = {**dockerfile_env(), **compose()["services"][name]["environment"]}
        settings = config.load(env={k: v for k, v in env.items() if k.startswith("BROKER_")})
        assert settings.backplane == "redis"
        assert settings.demo is False
        assert settings.http_host == "0.0.0.0"  # reachable from the other containers
        assert settings.workers == 1


# --- Kubernetes ----------------------------------------------------------------------


def kubernetes_documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    files = kustomization["resources"]
    on_disk = sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(files) == on_disk, "kustomization.yaml must list every manifest"
    documents = []
    for name in files:
        documents += [d for d in yaml.safe_load_all((KUBERNETES / name).read_text()) if d]
    return documents


def kubernetes_object(kind: str, name: str) -> dict[str, Any]:
    for document in kubernetes_documents():
        if document["kind"] == kind and document["metadata"]["name"] == name:
            return document
    raise AssertionError(f"no {kind} {name}")


def test_kubernetes_manifests_match_the_schemas() -> None:
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    kinds = []
    for document in kubernetes_documents():
        # Raises ValidationError, naming the field, on anything the schema refuses;
        # strict: unknown fields too (a typo is not silently ignored).
        kubernetes_validate.validate(document, version, strict=True)
        kinds.append(document["kind"])
    assert sorted(kinds) == sorted(
        [
            "ConfigMap",
            "Deployment",
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "Service",
            "Service",
        ]
    )


def test_kubernetes_deployment_shape() -> None:
    deployment = kubernetes_object("Deployment", "broker")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"ws": 8000, "http": 8001}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["resources"]["requests"].keys() >= {"cpu", "memory"}
    assert pod["enableServiceLinks"] is False  # else BROKER_PORT=tcp://... breaks the broker
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # Configuration from the ConfigMap, secrets from the Secret, both as files.
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "broker-config"
    assert env["BROKER_CONFIG"] == mounts["config"] + "/broker.toml"
    assert "secretName" in volumes["secrets"]["secret"]
    for variable in ("BROKER_JWT_SECRET_FILE", "BROKER_API_KEY_FILE"):
        assert Path(env[variable]).parent == Path(mounts["secrets"])
    assert not env.keys() & {"BROKER_JWT_SECRET", "BROKER_API_KEY"}  # no secret in the spec
    # Services and the disruption budget select these pods; the API stays internal.
    for service_name, port in (("broker", "ws"), ("broker-api", "http")):
        service = kubernetes_object("Service", service_name)
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        assert [p["targetPort"] for p in service["spec"]["ports"]] == [port]
    pdb = kubernetes_object("PodDisruptionBudget", "broker")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert kubernetes_object("Service", "redis")["spec"]["ports"][0]["port"] == 6379


def test_kubernetes_configuration_is_valid_broker_configuration(tmp_path: Path) -> None:
    configmap = kubernetes_object("ConfigMap", "broker-config")
    container = kubernetes_object("Deployment", "broker")["spec"]["template"]["spec"]["containers"][
        0
    ]
    env = dict(dockerfile_env())
    for item in container["env"]:
        env[item["name"]] = item["value"]
    # The mounted files, here: the ConfigMap's broker.toml and two made-up secrets.
    (tmp_path / "broker.toml").write_text(configmap["data"]["broker.toml"])
    env["BROKER_CONFIG"] = str(tmp_path / "broker.toml")
    for variable in ("BROKER_JWT_SECRET_FILE", "BROKER_API_KEY_FILE"):
        secret = tmp_path / Path(env[variable]).name
        secret.write_text(uuid.uuid4().hex + "\n")
        env[variable] = str(secret)
    settings = config.load(env={k: v for k, v in env.items() if k.startswith("BROKER_")})
    assert settings.workers == 1  # one process per pod: probes and /metrics see all of it
    assert settings.backplane == "redis" and settings.redis_url.startswith("redis://redis:")
    assert settings.jwt_secret is not None and settings.api_key is not None
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (settings.port, settings.http_port) == (ports["ws"], ports["http"])
    assert settings.http_host == "0.0.0.0"  # the kubelet probes the pod's address
    assert settings.demo is False


# --- systemd ---------------------------------------------------------------------------


def test_systemd_unit_exposure_is_below_5() -> None:
    analyze = need_tool("systemd-analyze")
    result = run([analyze, "security", "--offline=true", str(DEPLOY / "broker.service")])
    match = re.search(r"Overall exposure level for broker\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) < 5.0, result.stdout


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = need_tool("systemd-analyze")
    unit = (DEPLOY / "broker.service").read_text()
    assert "ExecStart=/opt/broker/.venv/bin/broker serve " in unit
    # The installed path does not exist here: run the same command from this checkout.
    unit = unit.replace("/opt/broker/.venv/bin/broker", f"{sys.executable} -m broker")
    (tmp_path / "broker.service").write_text(unit)
    result = run([analyze, "verify", str(tmp_path / "broker.service")])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_unit_config_and_secrets_paths() -> None:
    unit = (DEPLOY / "broker.service").read_text()
    assert "--config /etc/broker/broker.toml" in unit
    assert "deploy/production.toml" in unit  # says where the file comes from
    assert re.search(r"^#LoadCredential=jwt_secret:", unit, re.M)
    assert not re.search(r"^Environment=BROKER_(JWT_SECRET|API_KEY)=", unit, re.M)
    # The file the unit's comments say to copy there is a valid configuration.
    assert config.load(DEPLOY / "production.toml", env={}).demo is False


PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
_MDWE_THEN_EXEC = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_MDWE): errno {{ctypes.get_errno()}}")
os.execvp(sys.argv[1], sys.argv[1:])
"""


def syscall_set(analyze: str, *groups: str) -> set[str]:
    """The system calls in systemd's filter groups (``@system-service`` ...), resolved."""
    names: set[str] = set()
    for group in groups:
        listing = run([analyze, "syscall-filter", group]).stdout.splitlines()[1:]
        for line in listing:
            word = line.strip()
            if not word or word.startswith("#"):
                continue
            names |= syscall_set(analyze, word) if word.startswith("@") else {word}
    return names


def unit_syscall_filter(analyze: str) -> tuple[set[str], set[str]]:
    """(allowed, denied) system calls of the unit's ``SystemCallFilter=`` lines."""
    allowed: set[str] = set()
    denied: set[str] = set()
    unit = (DEPLOY / "broker.service").read_text()
    for line in re.findall(r"^SystemCallFilter=(.+)$", unit, re.M):
        if line.startswith("~"):
            denied |= syscall_set(analyze, *line[1:].split())
        else:
            allowed |= syscall_set(analyze, *line.split())
    assert allowed and denied
    return allowed, denied


@pytest.mark.slow
@pytest.mark.redis
async def test_broker_runs_inside_the_unit_sandbox(tmp_path: Path) -> None:
    """The broker must need neither W+X memory nor a system call the unit filters out.

    MemoryDenyWriteExecute: Linux 6.3+ has the same rule as a process flag
    (PR_SET_MDWE), inherited across fork and exec. SystemCallFilter: strace lists
    every system call made. So the broker (supervisor and two workers, the Redis
    backplane, the JWT and crypto libraries loaded) runs under both, serves, and stops.
    """
    analyze, strace = need_tool("systemd-analyze"), need_tool("strace")
    read_flag = f"import ctypes; print(ctypes.CDLL(None).prctl({PR_GET_MDWE}, 0, 0, 0, 0))"
    probe = run([sys.executable, "-c", _MDWE_THEN_EXEC, sys.executable, "-c", read_flag])
    if probe.returncode != 0:
        pytest.skip(f"this kernel cannot deny W+X memory to a process: {probe.stderr.strip()}")
    assert probe.stdout.strip() == str(PR_MDWE_REFUSE_EXEC_GAIN)
    allowed, denied = unit_syscall_filter(analyze)

    trace = tmp_path / "strace.txt"
    ports = free_ports(2)
    broker = BrokerProcess(
        "--backplane", "redis", "--redis-url", real_redis_url(), "--workers", "2", "--no-demo",
        port=ports[0], http_port=ports[1], startup_timeout=30,
        command=[strace, "-f", "-qq", "-o", str(trace),
                 sys.executable, "-c", _MDWE_THEN_EXEC, *serve_command()],
        env={"BROKER_REDIS_PREFIX": f"dep{uuid.uuid4().hex[:10]}."},
    )  # fmt: skip
    async with running(broker):
        # Both workers serving (strace makes starting slow; a worker signalled before
        # its handlers are installed dies of SIGTERM and the supervisor exits 1).
        await asyncio.to_thread(
            wait_until,
            lambda: broker.log_text().count('"event":"broker listening') == 2,
            timeout=30,
            message="both workers listening",
        )
        async with connect(broker.ws_url, open_timeout=5) as ws:
            client = Client(ws)
            await client.subscribe("sandbox.>")
            await ws.send('{"op": "publish", "id": 7, "channel": "sandbox.a", "data": 1}')
            frames = [await client.recv(), await client.recv()]  # the ok and the message
            assert {"op": "ok", "id": 7} in frames
            assert {"op": "message", "channel": "sandbox.a", "data": 1} in frames
            async with aiohttp.ClientSession() as http:
                body = orjson.dumps({"channel": "sandbox.b", "data": 2})
                async with http.post(
                    f"{broker.http_url}/publish", data=body, headers=JSON
                ) as response:
                    assert response.status == 200
            assert (await client.messages(1))[0]["data"] == 2
        status, metrics = await asyncio.to_thread(http_get, f"{broker.http_url}/metrics")
        assert status == 200 and b"broker_connections" in metrics
        # SIGTERM to the supervisor itself (strace's child), so that its shutdown
        # is traced too; strace then exits with the supervisor's status.
        assert broker.pid is not None
        (supervisor,) = children(broker.pid)
        os.kill(supervisor, signal.SIGTERM)
        await asyncio.to_thread(
            wait_until, lambda: not broker.running, timeout=20, message="broker stopped"
        )
        log = broker.log_text()
        assert broker.code == 0, log[-3000:]
        assert "Traceback" not in log and '"level":"error"' not in log, log[-3000:]
    used = set(re.findall(r"^\d+ +([a-z0-9_]+)\(", trace.read_text(), re.M))
    assert {"socket", "bind", "accept4", "sendto", "epoll_wait"} <= used  # it did serve
    assert used <= allowed, f"not in the unit's SystemCallFilter: {sorted(used - allowed)}"
    assert not used & denied, f"denied by the unit: {sorted(used & denied)}"


def serve_command() -> list[str]:
    """``python -m broker serve``, or what ``BROKER_SERVE_COMMAND`` says (as brokerproc)."""
    override = os.environ.get("BROKER_SERVE_COMMAND")
    return shlex.split(override) if override else [sys.executable, "-m", "broker", "serve"]


def children(pid: int) -> list[int]:
    """The child processes of ``pid``."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


# --- stopping: every supervisor waits for the drain ---------------------------------------


def test_stop_timeouts_leave_the_drain_its_time() -> None:
    shutdown = default("shutdown_timeout")
    # The drain (1012 closes over drain_grace + drain_spread) fits in shutdown_timeout...
    assert default("drain_grace") + default("drain_spread") < shutdown
    # ...after which a process still closes its Redis links (each bounded by redis_timeout).
    one_process = shutdown + default("redis_timeout")
    # With --workers the supervisor waits shutdown_timeout + GRACE, kills, waits GRACE.
    supervised = shutdown + 2 * GRACE
    margin = 2.0

    unit = (DEPLOY / "broker.service").read_text()
    stop_sec = seconds(re.search(r"^TimeoutStopSec=(\S+)", unit, re.M)[1])  # type: ignore[index]
    assert stop_sec >= max(one_process, supervised) + margin

    for name in ("broker1", "broker2"):
        grace = seconds(compose()["services"][name]["stop_grace_period"])
        assert grace >= one_process + margin  # one process per container (checked above)

    pod = kubernetes_object("Deployment", "broker")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = seconds(command[1])
    assert 3 <= pre_stop <= 15  # long enough for the endpoints to drop the pod
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + one_process + margin


# --- monitoring ------------------------------------------------------------------------

#: Every series the alerts and the dashboard may name: what the broker exports
#: (broker/metrics.py, broker/exposition.py, and the histograms, byte counters and
#: gauges being added with these files), prometheus_client's process collector, and
#: Prometheus' own ``up``.
KNOWN_METRICS = {
    "up",
    "process_resident_memory_bytes",
    "process_open_fds",
    "broker_connections",
    "broker_max_connections",
    "broker_subscriptions",
    "broker_patterns",
    "broker_ready",
    "broker_backplane_ready",
    "broker_process_info",
    "broker_connections_opened_total",
    "broker_connections_closed_total",
    "broker_connections_rejected_total",
    "broker_messages_published_total",
    "broker_messages_received_total",
    "broker_messages_delivered_total",
    "broker_publish_failures_total",
    "broker_errors_total",
    "broker_slow_consumer_disconnects_total",
    "broker_abuse_disconnects_total",
    "broker_frames_received_total",
    "broker_http_requests_total",
    "broker_auth_failures_total",
    "broker_gaps_sent_total",
    "broker_recoveries_total",
    "broker_messages_recovered_total",
    "broker_bytes_received_total",
    "broker_bytes_sent_total",
    "broker_backplane_connection_losses_total",
    "broker_canary_round_trip_seconds_bucket",
    "broker_publish_ack_seconds_bucket",
    "broker_fanout_seconds_bucket",
    "broker_backplane_publish_seconds_bucket",
}

#: What the dashboard must show (the operations issue's list).
DASHBOARD_METRICS = {
    "broker_connections",
    "broker_messages_published_total",
    "broker_messages_delivered_total",
    "broker_errors_total",
    "broker_connections_closed_total",
    "broker_publish_ack_seconds_bucket",
    "broker_fanout_seconds_bucket",
    "broker_backplane_publish_seconds_bucket",
    "broker_canary_round_trip_seconds_bucket",
    "broker_gaps_sent_total",
    "broker_recoveries_total",
    "broker_bytes_received_total",
    "broker_bytes_sent_total",
    "process_resident_memory_bytes",
    "process_open_fds",
}

_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
_PROMQL_WORDS |= {"and", "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, labels, keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("(") or match[0].lower() in _PROMQL_WORDS:
            continue  # a function or aggregation, or a keyword
        names.add(match[0])
    return names


def test_metric_names_reads_promql() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{instance=~"$instance"}[5m])))'
    ) == {"a_bucket"}
    assert metric_names("x / y > 0.9 and on (instance) z offset 5m") == {"x", "y", "z"}


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_alert_rules_pass_promtool() -> None:
    promtool = need_tool("promtool")
    result = run([promtool, "check", "rules", str(MONITORING / "alerts.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    for rule in alert_rules():
        assert metric_names(rule["expr"]) <= KNOWN_METRICS, rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]


def test_alerts_cover_the_documented_failures() -> None:
    expressions = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    watched = set().union(*(metric_names(e) for e in expressions.values()))
    assert watched >= {
        "broker_backplane_ready",
        "broker_ready",
        "broker_canary_round_trip_seconds_bucket",
        "broker_slow_consumer_disconnects_total",
        "broker_gaps_sent_total",
        "broker_connections",
        "broker_max_connections",
        "broker_auth_failures_total",
        "broker_publish_failures_total",
        "broker_errors_total",
    }
    assert expressions.keys() == ALERT_CASES.keys()


def _bucket_series(name: str, slow: bool) -> list[dict[str, str]]:
    """Histogram buckets where every observation is slow (1 to 2.5 s) or fast (< 0.1 s)."""
    series = []
    for le in ("0.1", "1", "2.5", "+Inf"):
        grows = le in ("2.5", "+Inf") if slow else True
        series.append(
            {
                "series": f'{name}{{instance="b1", job="broker", le="{le}"}}',
                "values": "0+60x20" if grows else "0x20",
            }
        )
    return series


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    text = ", ".join(f'{k}="{v}"' for k, v in {"instance": "b1", "job": "broker", **labels}.items())
    return {"series": f"{name}{{{text}}}", "values": values}


#: alert: (input series when it must fire, input series when it must not, minutes to wait).
ALERT_CASES: dict[str, tuple[list[dict[str, str]], list[dict[str, str]], int]] = {
    "BrokerDown": ([_series("up", "1 0x10")], [_series("up", "1x10")], 5),
    "BrokerBackplaneDown": (
        [_series("broker_backplane_ready", "1 0x10")],
        [_series("broker_backplane_ready", "1 0 1 0 1 0 1 0 1 0 1")],
        5,
    ),
    "BrokerNotReady": (
        [_series("broker_ready", "1 0x10")],
        [_series("broker_ready", "1 0 1x9")],  # a drain: seconds, not minutes
        5,
    ),
    "BrokerCanaryLate": (
        _bucket_series("broker_canary_round_trip_seconds_bucket", slow=True),
        _bucket_series("broker_canary_round_trip_seconds_bucket", slow=False),
        15,
    ),
    "BrokerSlowConsumersCut": (
        [_series("broker_slow_consumer_disconnects_total", "0 0 1x10")],
        [_series("broker_slow_consumer_disconnects_total", "0x12")],
        4,
    ),
    "BrokerGapsSent": (
        [_series("broker_gaps_sent_total", "0 0 3x10")],
        [_series("broker_gaps_sent_total", "0x12")],
        4,
    ),
    "BrokerConnectionsNearLimit": (
        [_series("broker_connections", "9500x10"), _series("broker_max_connections", "10000x10")],
        [_series("broker_connections", "8000x10"), _series("broker_max_connections", "10000x10")],
        8,
    ),
    "BrokerAuthFailuresSpiking": (
        [_series("broker_auth_failures_total", "0+120x20")],  # 2 a second
        [_series("broker_auth_failures_total", "0+30x20")],  # one every 2 s
        12,
    ),
    "BrokerPublishFailures": (
        [_series("broker_publish_failures_total", "0+1x10")],
        [_series("broker_publish_failures_total", "0x10")],
        5,
    ),
    "BrokerInternalErrors": (
        [_series("broker_errors_total", "0 0 1x10", code="internal")],
        [_series("broker_errors_total", "0+5x10", code="bad_frame")],
        4,
    ),
}


def test_alerts_fire_and_stay_quiet(tmp_path: Path) -> None:
    promtool = need_tool("promtool")
    rules = {rule["alert"]: rule for rule in alert_rules()}
    tests = []
    for alert, (firing, quiet, minutes) in ALERT_CASES.items():
        rule = rules[alert]
        labels = {"instance": "b1", "job": "broker", **rule["labels"]}
        if alert == "BrokerInternalErrors":
            labels["code"] = "internal"
        annotations = {
            key: value.replace("{{ $labels.instance }}", "b1")
            for key, value in rule["annotations"].items()
        }
        expected = [{"exp_labels": labels, "exp_annotations": annotations}]
        for series, exp_alerts in ((firing, expected), (quiet, [])):
            tests.append(
                {
                    "interval": "1m",
                    "input_series": series,
                    "alert_rule_test": [
                        {"eval_time": f"{minutes}m", "alertname": alert, "exp_alerts": exp_alerts}
                    ],
                }
            )
    (tmp_path / "alerts.yml").write_text((MONITORING / "alerts.yml").read_text())
    spec = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "alerts.test.yml").write_text(yaml.safe_dump(spec))
    result = run([promtool, "test", "rules", "alerts.test.yml"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def dashboard_targets() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def test_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_dashboard_names_only_known_metrics() -> None:
    shown: set[str] = set()
    for panel, target in dashboard_targets():
        names = metric_names(target["expr"])
        assert names, (panel["title"], target["expr"])
        assert names <= KNOWN_METRICS, (panel["title"], names - KNOWN_METRICS)
        shown |= names
    assert shown >= DASHBOARD_METRICS, DASHBOARD_METRICS - shown


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    promtool = need_tool("promtool")
    rules = [
        {
            "record": f"dashboard:panel{panel['id']}_{target['refId']}",
            "expr": target["expr"].replace("$__rate_interval", "5m").replace("$instance", ".*"),
        }
        for panel, target in dashboard_targets()
    ]
    (tmp_path / "dashboard.rules.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    result = run([promtool, "check", "rules", str(tmp_path / "dashboard.rules.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
