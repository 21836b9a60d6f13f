"""Benchmark the broker against a minimal websockets baseline, in one invocation.

Every figure is printed as the broker's value, the baseline's value measured in
the same run, and their ratio, and everything is written to
``bench/results/latest.json``. Servers run pinned to one core, this process
(the load generator) to the other. ``--smoke`` runs tiny sizes in well under a
minute and exits non-zero on any functional failure (loss, error replies,
time-outs, a server that dies); it asserts nothing about speed.

Usage (from the repository root)::

    .venv/bin/python -m bench.run              # full run, a few minutes
    .venv/bin/python -m bench.run --smoke      # CI: functional check only
    .venv/bin/python -m bench.run --help       # sizes and options
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import io
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if not __package__:  # run as a script (python bench/run.py): make `bench` importable
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from bench import clients, loadgen  # noqa: E402
from bench.net import HOST, Server, answers, free_ports  # noqa: E402
from bench.procstat import Probe, measured  # noqa: E402

RESULTS = ROOT / "bench" / "results"


BASELINE_CMD = "{python} bench/baseline.py --host {host} --port {port}"
BROKER_CMD = (
    "{python} -m broker serve --host {host} --port {port} --http-port {http_port}"
    " --log-level warning --backplane {backplane} --redis-url {redis_url}"
)
SOCKETIO_CMD = "{python} bench/socketio_peer.py --host {host} --port {port}"

SCENARIOS = (
    "fanout",
    "channels",
    "latency",
    "memory",
    "redis",
    "redis-channels",
    "connect",
    "recovery",
)
# What each scenario drives (see measure_once); redis-* are their shape on Redis.
SHAPES = {"redis": "fanout", "redis-channels": "channels"}
VARIANTS = ("auth", "history")
# The channels scenario holds 10,000 subscribers plus a publisher in one process;
# the broker's default cap is 10,000 connections. The baseline ignores this.
# A drain (1012 to every client, spread over seconds) is for rolling restarts;
# here every client has left before the stop, and it would add 1-4 s to each of
# the ~60 starts and stops of a run. Brokers that lack these settings ignore them.
SERVER_ENV = {
    "BROKER_MAX_CONNECTIONS": "20000",
    "BROKER_DRAIN_GRACE": "0",
    "BROKER_DRAIN_SPREAD": "0",
}
# Every channel the bench uses starts with this token; the auth and history
# rules are written for it.
CHANNEL_ROOT = "bench"
JWT_SECRET = "bench-only-secret-not-for-production-0123456789"


@dataclass(frozen=True)
class Peer:
    """One kind of server under test: which command, backplane, config and processes."""

    template: str  # key of Ctx.templates: baseline, broker, broker-ref, socketio
    backplane: str = "memory"
    config: str = ""  # "", "auth" or "history": the TOML file the broker starts with
    procs: int = 1


PEERS: dict[str, Peer] = {
    "baseline": Peer("baseline"),
    "socketio": Peer("socketio"),
    "broker": Peer("broker"),
    "broker-auth": Peer("broker", config="auth"),
    "broker-auth-header": Peer("broker", config="auth"),  # token in the handshake
    "broker-history": Peer("broker", config="history"),
    "broker-ref": Peer("broker-ref"),
    "broker-redis": Peer("broker", "redis"),
    "broker-redis-2proc": Peer("broker", "redis", procs=2),
    "broker-redis-history": Peer("broker", "redis", config="history"),
    "broker-ref-redis": Peer("broker-ref", "redis"),
}


def auth_config(secret: str) -> str:
    """The auth-on broker's TOML: a secret and rules in force (first match wins).

    The first two rules never match the bench's channels, so every subscribe
    and publish walks the rule list before the third allows it by the token's
    claims: what a real deployment pays.
    """
    return f"""[auth]
jwt_secret = "{secret}"

[[channels]]
pattern = "admin.>"
subscribe = "nobody"
publish = "nobody"

[[channels]]
pattern = "user.{{sub}}.>"
subscribe = "authenticated"
publish = "authenticated"

[[channels]]
pattern = "{CHANNEL_ROOT}.>"
subscribe = "token"
publish = "token"
"""


def history_config(size: int, ttl_s: float) -> str:
    """The history-on broker's TOML: every bench channel keeps ``size`` messages."""
    return f"""history_meta_ttl = {max(600.0, 2 * ttl_s)}

[[channels]]
pattern = "{CHANNEL_ROOT}.>"
history_size = {size}
history_ttl = {ttl_s}
"""


# --------------------------------------------------------------------------- servers


async def start_server(
    name: str,
    template: str,
    core: int | None,
    log_dir: Path,
    fmt: dict[str, str],
    ready_timeout_s: float = 30.0,
    extra_args: list[str] | None = None,
) -> Server:
    """Start ``template`` pinned to ``core`` and wait until its port accepts connections.

    ``extra_args`` (a broker's ``--config FILE``) go after the template's own.
    """
    port, http_port = free_ports(2)
    fields = {
        "python": sys.executable,
        "host": HOST,
        "port": str(port),
        "http_port": str(http_port),
        **fmt,
    }
    argv = shlex.split(template.format(**fields)) + list(extra_args or [])
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(SERVER_ENV)
    if core is not None:
        argv = ["taskset", "-c", str(core), *argv]
    log = log_dir / f"{name}.log"
    with open(log, "ab") as logf:  # noqa: ASYNC230 (before the measurement starts)
        logf.write(f"\n=== {time.strftime('%H:%M:%S')} {shlex.join(argv)}\n".encode())
        logf.flush()
        proc = subprocess.Popen(  # noqa: ASYNC220 (before the measurement starts)
            argv, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    server = Server(name, proc, port, log, http_port)
    # Ready when the WebSocket port accepts and, for a server with a service API
    # (the broker), /readyz answers 200: its backplane is connected.
    probes = [(port, None)] + ([(http_port, b"/readyz")] if "{http_port}" in template else [])
    deadline = time.monotonic() + ready_timeout_s
    for p, path in probes:
        while not await answers(p, path):
            server.check_alive()
            if time.monotonic() > deadline:
                await server.stop()
                raise clients.BenchError(f"{name} not ready after {ready_timeout_s}s")
            await asyncio.sleep(0.1)
    return server


@contextlib.asynccontextmanager
async def servers(
    specs: list[tuple[str, str]],
    core: int | None,
    log_dir: Path,
    fmt: dict[str, str],
    extra_args: list[str] | None = None,
) -> AsyncIterator[list[Server]]:
    """Run several servers for one measurement; stop them all afterwards."""
    started: list[Server] = []
    try:
        for name, template in specs:
            started.append(
                await start_server(name, template, core, log_dir, fmt, extra_args=extra_args)
            )
        await asyncio.sleep(0.3)  # let start-up work (imports, backplane connect) finish
        yield started
        for s in started:
            s.check_alive()
    finally:
        await asyncio.sleep(0.1)  # let our closed sockets reach the server first
        for s in started:
            took = await s.stop()
            if took > 3:
                print(f" [{s.name} took {took}s to stop]", end="", flush=True)


# --------------------------------------------------------------------------- the run


def redis_target(url: str) -> tuple[str, int]:
    """Return host and port of a loopback Redis URL; refuse any other host."""
    u = urllib.parse.urlparse(url)
    host, port = u.hostname or HOST, u.port or 6379
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"REDIS_URL must point at loopback, not {host}")
    return host, port


def redis_info(url: str) -> str | None:
    """Return the Redis server version if one answers at ``url``, else None."""
    host, port = redis_target(url)
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            s.sendall(b"INFO server\r\n")
            data = b""
            while b"redis_version" not in data or not data.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("redis_version:"):
            return line.split(":", 1)[1]
    return "unknown"


def redis_pid(port: int) -> int | None:
    """Find the local redis-server process serving ``port`` (only to read its CPU time)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "redis-server" in cmd.split(" ", 1)[0] and f":{port}" in cmd:
            return int(d.name)
    return None


def versions() -> dict[str, str]:
    """Versions of the interpreter and every package the figures depend on."""
    out = {"python": platform.python_version()}
    for pkg in (
        "websockets",
        "orjson",
        "pydantic",
        "picows",
        "uvloop",
        "redis",
        "python-socketio",
        "aiohttp",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "broker"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "commit": commit or "none",
        "broker_tree_dirty": dirty,
    }


@dataclass
class Ctx:
    """Everything one invocation shares."""

    args: argparse.Namespace
    dialects: dict[str, clients.Dialect]
    templates: dict[str, str]
    log_dir: Path
    prefix: str
    redis_version: str | None
    redis_pid: int | None
    results: dict[str, dict[str, Any]]
    failures: list[str]
    #: Every round's result, per scenario and server, in round order.
    runs: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    #: The broker's TOML files per variant ("auth", "history").
    configs: dict[str, Path] = field(default_factory=dict)
    #: What --compare-ref / --compare-cmd measures, for the report.
    ref_label: str = ""

    def peers(self, scenario: str) -> list[str]:
        """The servers a scenario measures, in the order of its first round."""
        a = self.args
        var = set(filter(None, a.variants.split(",")))
        ref = "broker-ref" in self.templates
        sio = "socketio" in self.templates
        if scenario in ("fanout", "channels"):
            out = ["baseline", "broker"]
            out += ["broker-auth"] if "auth" in var else []
            out += ["broker-history"] if "history" in var else []
            return out + (["broker-ref"] if ref else []) + (["socketio"] if sio else [])
        if scenario in ("latency", "memory"):
            return (
                ["baseline", "broker"]
                + (["broker-ref"] if ref else [])
                + (["socketio"] if sio else [])
            )
        if scenario == "redis":
            out = ["broker-redis", "broker-redis-2proc"]
            out += ["broker-redis-history"] if "history" in var else []
            return out + (["broker-ref-redis"] if ref else [])
        if scenario == "redis-channels":
            return ["broker-redis", "broker-redis-history"] if "history" in var else []
        if scenario == "connect":
            auth = ["broker-auth", "broker-auth-header"] if "auth" in var else []
            return ["baseline", "broker", *auth]
        if scenario == "recovery":
            return ["broker-history"] + (["broker-redis-history"] if self.redis_version else [])
        raise ValueError(scenario)

    def dialect(self, server: str) -> clients.Dialect:
        """The protocol spoken to ``server`` (auth-on brokers get tokens)."""
        return self.dialects.get(server) or self.dialects[PEERS[server].config or "json"]

    @property
    def core(self) -> int | None:
        return None if self.args.no_pin else self.args.server_core

    def probe(self, srvs: list[Server], with_redis: bool = False) -> Probe:
        aux = {"redis": self.redis_pid} if with_redis and self.redis_pid else {}
        return Probe([s.proc.pid for s in srvs], aux, self.args.server_core, self.args.loadgen_core)

    def fmt(self, backplane: str = "memory") -> dict[str, str]:
        return {"backplane": backplane, "redis_url": self.args.redis_url}

    def extra_args(self, server: str) -> list[str]:
        """``--config FILE`` for a broker variant, nothing for the others."""
        cfg = PEERS[server].config
        return ["--config", str(self.configs[cfg])] if cfg else []


def throughput_params(a: argparse.Namespace) -> loadgen.ThroughputParams:
    """Map command-line sizes onto the load generator's parameters."""
    return loadgen.ThroughputParams(
        duration_s=a.duration,
        max_messages=a.max_messages,
        ack_window=a.ack_window,
        lag_window=a.lag_window,
        tick_s=a.tick_ms / 1000,
        frames_per_read=a.frames_per_read,
        drain_timeout_s=a.drain_timeout,
        connect_concurrency=a.connect_concurrency,
    )


def functional_failures(name: str, r: dict[str, Any]) -> list[str]:
    """List what went wrong functionally in one result (never speed)."""
    out = []
    keys = ("lost", "extra", "subs_closed", "publish_errors", "missing", "duplicates")
    for key in (*keys, "out_of_order", "not_recovered"):
        if r.get(key):
            out.append(f"{name}: {key}={r[key]}")
    if "alive" in r and r["alive"] != r["connections"]:
        out.append(f"{name}: only {r['alive']}/{r['connections']} connections alive")
    if r.get("error_samples"):
        out.append(f"{name}: errors {r['error_samples']}")
    if r.get("caught_up") is False:
        out.append(f"{name}: not every subscriber caught up in time")
    if r.get("reply_samples"):
        out.append(f"{name}: subscribe replies {r['reply_samples']}")
    return out


async def measure(ctx: Ctx, scenario: str, server: str) -> None:
    """Run one scenario against one server kind and record the result or the failure.

    A measurement during which other processes took more than ``--noise-threshold``
    % of a core is repeated (up to ``--retries`` times); the quietest attempt counts.
    """
    key = f"{scenario}/{server}"
    t0 = time.perf_counter()
    r = await measured(key, lambda: measure_once(ctx, scenario, server), ctx.args, ctx.failures)
    ctx.runs.setdefault(scenario, {}).setdefault(server, []).append(r)
    if "error" in r:
        return
    ctx.failures.extend(functional_failures(key, r))
    print(f" {time.perf_counter() - t0:.1f}s {headline(scenario, r)}")


async def measure_once(ctx: Ctx, scenario: str, server: str) -> dict[str, Any]:
    """Start the server(s) for one scenario, drive it once, stop them."""
    a = ctx.args
    dialect = ctx.dialect(server)
    peer = PEERS[server]
    shape = SHAPES.get(scenario, scenario)
    # The server's name is in the channel, so a history channel (kept in Redis
    # across processes) is never shared by two kinds of server.
    prefix = f"{ctx.prefix}.{scenario}.{server}"
    specs = [
        (server if peer.procs == 1 else f"{server}-{i}", ctx.templates[peer.template])
        for i in range(peer.procs)
    ]
    started = servers(specs, ctx.core, ctx.log_dir, ctx.fmt(peer.backplane), ctx.extra_args(server))
    async with started as srvs:
        probe = ctx.probe(srvs, with_redis=peer.backplane == "redis")
        srv = srvs[0]
        if shape in ("fanout", "channels"):
            # fanout: one channel, many subscribers; channels: many channels, a few
            # each. With two processes the subscribers are split between them and
            # the publisher is on the first.
            n_ch = 1 if shape == "fanout" else a.channels
            per = a.subscribers if shape == "fanout" else a.subs_per_channel
            chans = [f"{prefix}.{i}" for i in range(n_ch)]
            r = await loadgen.throughput(
                dialect, [x.url for x in srvs], srv.url, chans, per, throughput_params(a), probe
            )
            r["processes"] = peer.procs
            return r
        if shape == "latency":
            lp = loadgen.LatencyParams(
                a.latency_subscribers, a.latency_rate, a.latency_duration, a.latency_warmup
            )
            return await loadgen.latency(dialect, srv.url, f"{prefix}.0", lp, probe)
        if shape == "memory":
            return await loadgen.memory(
                dialect,
                srv.url,
                prefix,
                a.connections,
                probe,
                settle_s=a.memory_settle,
                concurrency=a.connect_concurrency,
            )
        if shape == "connect":
            return await loadgen.connect_rate(
                dialect, srv.url, prefix, a.connect_connections, probe, a.connect_concurrency
            )
        if shape == "recovery":
            rp = loadgen.RecoveryParams(
                a.recovery_subscribers, a.recovery_messages, a.recovery_concurrency
            )
            return await loadgen.recovery(dialect, srv.url, srv.url, f"{prefix}.0", rp, probe)
    raise ValueError(scenario)


def headline(scenario: str, r: dict[str, Any]) -> str:
    """One line of the most telling numbers of a result, for the progress log."""
    if scenario == "latency":
        return (
            f"p50={r['p50_ms']}ms p99={r['p99_ms']}ms max={r['max_ms']}ms "
            f"lost={r['lost']} srv={r['server_cpu_pct']}%"
        )
    if scenario == "memory":
        return f"{r['kib_per_conn']} KiB/conn alive={r['alive']}/{r['connections']}"
    if scenario == "connect":
        return (
            f"{r['connects_per_s']:,} conn/s alive={r['alive']}/{r['connections']} "
            f"srv={r['server_cpu_pct']}% lg={r['loadgen_cpu_pct']}% "
            f"srv-us/conn={r['server_us_per_connect']}"
        )
    if scenario == "recovery":
        return (
            f"all caught up in {r['catchup_ms']} ms (p50 {r['catchup_p50_ms']} ms, "
            f"connected {r['connected_ms']} ms) missing={r['missing']} "
            f"duplicates={r['duplicates']} not_recovered={r['not_recovered']} "
            f"srv={r['server_cpu_pct']}%"
        )
    return (
        f"{r['deliveries_per_s']:,}/s lost={r['lost']} srv={r['server_cpu_pct']}% "
        f"srv-core={r['server_core_busy_pct']}% (softirq {r['server_core_softirq_pct']}%, "
        f"steal {r['server_core_steal_pct']}%) lg={r['loadgen_cpu_pct']}% "
        f"lg-core={r['loadgen_core_busy_pct']}% other={r['other_cpu_pct']}% "
        f"srv-us/msg={r['server_us_per_delivery']} (user {r['server_user_us_per_delivery']})"
    )


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Row:
    """One comparison in the table: ``server`` against ``reference`` in one scenario."""

    scenario: str
    server: str
    reference: str
    metrics: tuple[str, ...]
    unit: str
    target: float | None = None  # on the first metric's ratio
    sense: str = "min"  # "min": higher is better (ratio ≥ target); "max": lower is better
    ref_scenario: str = ""  # the reference's scenario when not the same (unpaired)


# The second figure of a throughput row, server CPU per delivery, is far steadier
# than throughput on a machine shared with other work (lower is better).
THROUGHPUT = ("deliveries_per_s", "server_us_per_delivery")
LATENCY = ("p99_ms", "p50_ms", "max_ms")
MEMORY = ("kib_per_conn",)
CONNECT = ("connects_per_s", "server_us_per_connect")
UNITS = {"server_us_per_delivery": "µs/msg", "server_us_per_connect": "µs/conn"}
ROWS: tuple[Row, ...] = (
    Row("fanout", "broker", "baseline", THROUGHPUT, "msg/s", 5.0),
    Row("fanout", "broker-auth", "broker", THROUGHPUT, "msg/s", 0.95),
    Row("fanout", "broker-history", "broker", THROUGHPUT, "msg/s", 0.8),
    Row("fanout", "broker", "broker-ref", THROUGHPUT, "msg/s"),
    Row("fanout", "socketio", "baseline", THROUGHPUT, "msg/s"),
    Row("channels", "broker", "baseline", THROUGHPUT, "msg/s", 1.3),
    Row("channels", "broker-auth", "broker", THROUGHPUT, "msg/s", 0.95),
    Row("channels", "broker-history", "broker", THROUGHPUT, "msg/s", 0.8),
    Row("channels", "broker", "broker-ref", THROUGHPUT, "msg/s"),
    Row("channels", "socketio", "baseline", THROUGHPUT, "msg/s"),
    Row("latency", "broker", "baseline", LATENCY, "ms", 1.5, "max"),
    Row("latency", "broker", "broker-ref", LATENCY, "ms", None, "max"),
    Row("latency", "socketio", "baseline", LATENCY, "ms", None, "max"),
    Row("memory", "broker", "baseline", MEMORY, "KiB/conn", 1.1, "max"),
    Row("memory", "broker", "broker-ref", MEMORY, "KiB/conn", None, "max"),
    Row("memory", "socketio", "baseline", MEMORY, "KiB/conn", None, "max"),
    Row("redis", "broker-redis", "broker", THROUGHPUT, "msg/s", 0.8, ref_scenario="fanout"),
    Row("redis", "broker-redis-2proc", "broker", THROUGHPUT, "msg/s", ref_scenario="fanout"),
    Row("redis", "broker-redis-history", "broker-redis", THROUGHPUT, "msg/s", 0.7),
    Row("redis", "broker-redis", "broker-ref-redis", THROUGHPUT, "msg/s"),
    Row("redis-channels", "broker-redis-history", "broker-redis", THROUGHPUT, "msg/s", 0.7),
    Row("connect", "broker-auth", "baseline", CONNECT, "conn/s", 0.7),
    Row("connect", "broker-auth-header", "baseline", CONNECT, "conn/s", 0.7),
    Row("connect", "broker", "baseline", CONNECT, "conn/s"),
    Row("recovery", "broker-history", "", ("catchup_ms", "missing"), "ms"),
    Row("recovery", "broker-redis-history", "", ("catchup_ms", "missing"), "ms"),
)


def bound(r: dict[str, Any], threshold: float) -> str:
    """Name the side that ran out of CPU in a throughput result."""
    # Process CPU, not core busy: softirq run on behalf of a process is charged to
    # it, while core busy also counts other tenants of the machine.
    if r.get("server_cpu_pct", 0) >= threshold:
        return "server"
    if r.get("loadgen_cpu_pct", 0) >= threshold:
        return "LOADGEN"
    return "neither"


def ratio(a: Any, b: Any) -> float | None:
    """Return a / b, or None when either is missing or b is zero."""
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return None
    if math.isnan(a) or math.isnan(b):
        return None
    return round(a / b, 2)


def main_metric(scenario: str) -> str:
    """The figure a scenario's rounds are ranked by."""
    return {
        "latency": "p99_ms",
        "memory": "kib_per_conn",
        "connect": "connects_per_s",
        "recovery": "catchup_ms",
    }.get(scenario, "deliveries_per_s")


def pick_median(scenario: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the round with the median main figure, carrying every round's figures.

    A round that failed stands for the whole: a broker that fails once, fails.
    """
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    key = main_metric(scenario)
    ranked = sorted(runs, key=lambda r: r.get(key) or 0)
    median = dict(ranked[(len(ranked) - 1) // 2])
    metrics = {
        "latency": list(LATENCY),
        "recovery": [key, "missing", "duplicates"],
        "connect": list(CONNECT),
        "memory": [key],
    }.get(scenario, list(THROUGHPUT))
    median["rounds"] = {m: [r.get(m) for r in runs] for m in metrics}
    if scenario == "recovery":  # a message missed in any round counts
        for m in ("missing", "duplicates", "out_of_order", "not_recovered"):
            median[m] = sum(r.get(m) or 0 for r in runs)
    return median


def median_value(r: dict[str, Any], metric: str) -> Any:
    """The median of a figure over the rounds (the lower middle for an even count)."""
    values = sorted(v for v in r.get("rounds", {}).get(metric, []) if isinstance(v, int | float))
    return values[(len(values) - 1) // 2] if values else r.get(metric)


def paired_ratio(b: dict[str, Any], base: dict[str, Any], metric: str) -> float | None:
    """The median over rounds of the ratio within each round (server / baseline).

    Pairing the two servers of one round cancels slow drifts of the machine
    (the kernel's cost per send() moves by ±10 % over minutes on this VM); the
    median keeps one odd round from deciding. With one round it is the ratio.
    """
    pairs = list(
        zip(
            b.get("rounds", {}).get(metric, []),
            base.get("rounds", {}).get(metric, []),
            strict=False,
        )
    )
    ratios = [r for r in (ratio(x, y) for x, y in pairs) if r is not None]
    if len(ratios) < 2:
        return ratio(b.get(metric), base.get(metric))
    ratios.sort()
    mid = len(ratios) // 2
    return round(ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2, 2)


def summarize(ctx: Ctx) -> list[dict[str, Any]]:
    """Build the table rows: value, reference value, ratio, target, for every Row measured."""
    rows: list[dict[str, Any]] = []
    res = ctx.results
    thr = ctx.args.bound_threshold
    for spec in ROWS:
        b = res.get(spec.scenario, {}).get(spec.server)
        if b is None:
            continue
        if spec.scenario == "recovery":
            rows.extend(recovery_rows(spec, b))
            continue
        paired = not spec.ref_scenario
        base = res.get(spec.ref_scenario or spec.scenario, {}).get(spec.reference)
        if base is None:
            continue
        for m in spec.metrics:
            if paired:
                rt = paired_ratio(b, base, m)
            else:  # another scenario's figure: no rounds to pair with
                rt = ratio(median_value(b, m), median_value(base, m))
            has_target = m == spec.metrics[0] and spec.target is not None
            met = None
            if has_target and rt is not None:
                met = rt >= spec.target if spec.sense == "min" else rt <= spec.target  # type: ignore[operator]
            ref_name = spec.reference + (f" {spec.ref_scenario}" if spec.ref_scenario else "")
            if spec.reference.startswith("broker-ref") and ctx.ref_label:
                ref_name += f" ({ctx.ref_label})"
            rows.append(
                {
                    "scenario": spec.scenario,
                    "server": spec.server,
                    "metric": m,
                    "unit": UNITS.get(m, spec.unit),
                    "value": median_value(b, m),
                    "reference": ref_name,
                    "reference_value": median_value(base, m),
                    "ratio": rt,
                    "target": (
                        f"{'≥' if spec.sense == 'min' else '≤'}{spec.target}" if has_target else ""
                    ),
                    "met": met,
                    "server_cpu_pct": b.get("server_cpu_pct"),
                    "reference_cpu_pct": base.get("server_cpu_pct"),
                    "loadgen_cpu_pct": b.get("loadgen_cpu_pct"),
                    "bound": (
                        bound(b, thr) + ("/" + bound(base, thr) if paired else "")
                        if m == "deliveries_per_s" and "error" not in b and "error" not in base
                        else ""
                    ),
                    "noisy": bool(b.get("noisy") or base.get("noisy")),
                }
            )
    return rows


def recovery_rows(spec: Row, r: dict[str, Any]) -> list[dict[str, Any]]:
    """The recovery rows: catch-up time (no reference) and missed messages (must be 0)."""
    lost = (r.get("missing") or 0) + (r.get("duplicates") or 0) + (r.get("not_recovered") or 0)
    common = {
        "scenario": spec.scenario,
        "server": spec.server,
        "reference": "",
        "reference_value": None,
        "ratio": None,
        "server_cpu_pct": r.get("server_cpu_pct"),
        "reference_cpu_pct": None,
        "loadgen_cpu_pct": r.get("loadgen_cpu_pct"),
        "bound": "",
        "noisy": bool(r.get("noisy")),
    }
    ok = "error" not in r
    return [
        {
            **common,
            "metric": "catchup_ms",
            "unit": "ms",
            "value": median_value(r, "catchup_ms"),
            "target": "",
            "met": None,
        },
        {
            **common,
            "metric": "missing+duplicates+not_recovered",
            "unit": "msgs",
            "value": lost if ok else None,
            "target": "=0",
            "met": ok and lost == 0,
        },
    ]


def fmt_num(v: Any) -> str:
    """Format a figure for the table."""
    if v is None:
        return "—"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, int) or (isinstance(v, float) and v >= 1000):
        return f"{v:,.0f}"
    return f"{v:g}"


def table(rows: list[dict[str, Any]]) -> str:
    """Render the rows as a Markdown table (what the README shows)."""
    head = [
        "scenario",
        "server",
        "metric",
        "value",
        "reference",
        "ref. value",
        "ratio",
        "target",
        "met",
        "server CPU % (ref.)",
        "loadgen CPU %",
        "bound (ref.)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        met = {True: "yes", False: "NO", None: ""}[r["met"]]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["scenario"],
                    r["server"],
                    f"{r['metric']} ({r['unit']})",
                    fmt_num(r["value"]),
                    r["reference"],
                    fmt_num(r["reference_value"]),
                    fmt_num(r["ratio"]),
                    r["target"],
                    met,
                    f"{fmt_num(r['server_cpu_pct'])} ({fmt_num(r['reference_cpu_pct'])})",
                    fmt_num(r["loadgen_cpu_pct"]),
                    r["bound"] + (" NOISY" if r["noisy"] else ""),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


SMOKE = {
    "subscribers": 50,
    "duration": 0.5,
    "max_messages": 300,
    "channels": 20,
    "subs_per_channel": 3,
    "latency_subscribers": 10,
    "latency_duration": 0.5,
    "latency_warmup": 0.1,
    "memory_settle": 0.3,
    "connections": 200,
    "connect_connections": 100,
    "recovery_subscribers": 50,
    "recovery_messages": 20,
    "drain_timeout": 10.0,
    "retries": 0,
    "quiet_wait": 0.0,
    "rounds": 1,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; every size has a default that finishes in minutes."""
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny sizes, functional check only (for CI)"
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    p.add_argument(
        "--socketio", action="store_true", help="also measure python-socketio on aiohttp as a peer"
    )
    g = p.add_argument_group("throughput (fanout, channels, redis)")
    g.add_argument("--subscribers", type=int, default=1000, help="fanout subscribers")
    g.add_argument("--channels", type=int, default=1000, help="channels scenario: channels")
    g.add_argument("--subs-per-channel", type=int, default=10)
    g.add_argument("--duration", type=float, default=10.0, help="publishing time per run (s)")
    g.add_argument(
        "--max-messages", type=int, default=1_000_000, help="cap on messages published per run"
    )
    g.add_argument(
        "--ack-window", type=int, default=64, help="publish requests in flight without their ok"
    )
    g.add_argument(
        "--lag-window",
        type=int,
        default=512,
        help="messages per subscriber published but not yet delivered",
    )
    g.add_argument(
        "--tick-ms",
        type=float,
        default=0.0,
        help="subscribers read in batches this often; 0 adapts the period so "
        "that each read carries about --frames-per-read frames",
    )
    g.add_argument("--frames-per-read", type=float, default=50.0)
    g.add_argument("--drain-timeout", type=float, default=30.0)
    g = p.add_argument_group("latency")
    g.add_argument("--latency-subscribers", type=int, default=100)
    g.add_argument("--latency-rate", type=float, default=200.0, help="publishes per second")
    g.add_argument("--latency-duration", type=float, default=10.0)
    g.add_argument(
        "--latency-warmup", type=float, default=1.0, help="seconds of samples dropped at the start"
    )
    g = p.add_argument_group("memory")
    g.add_argument("--connections", type=int, default=5000)
    g.add_argument(
        "--memory-settle",
        type=float,
        default=1.0,
        help="seconds before each RSS sample (start-up work and the connects finish)",
    )
    g.add_argument(
        "--connect-concurrency", type=int, default=200, help="handshakes in progress at once"
    )
    g.add_argument(
        "--connect-connections",
        type=int,
        default=2000,
        help="connect scenario: connections opened (and authenticated, subscribed)",
    )
    g = p.add_argument_group("variants: auth (#11) and history (#12)")
    g.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="broker variants measured beside the plain broker in fanout, channels, "
        "redis, connect (comma-separated subset of auth,history; empty: none)",
    )
    g.add_argument(
        "--auth-via",
        choices=("frame", "header"),
        default="frame",
        help="how broker-auth's connections present their token: an auth frame after "
        "the handshake (as browsers must), or an Authorization: Bearer header "
        "(connect also measures broker-auth-header, which always uses the header)",
    )
    g.add_argument("--history-size", type=int, default=200, help="history_size of the history rule")
    g.add_argument("--history-ttl", type=float, default=300.0)
    g.add_argument("--recovery-subscribers", type=int, default=1000)
    g.add_argument(
        "--recovery-messages",
        type=int,
        default=100,
        help="messages published while the recovery scenario's subscribers are away",
    )
    g.add_argument(
        "--recovery-concurrency",
        type=int,
        default=1000,
        help="reconnects in progress at once (default: all of them)",
    )
    g = p.add_argument_group("before/after: another commit's broker as a second broker")
    g.add_argument(
        "--compare-ref",
        metavar="REF",
        help="also measure the broker of git commit REF (extracted with git archive into "
        "a temporary directory, run with this venv) in fanout, channels, latency, "
        "memory and redis, as broker-ref; rows give broker / broker-ref",
    )
    g.add_argument(
        "--compare-cmd",
        metavar="TEMPLATE",
        help="command template of the broker-ref (same fields as --broker-cmd), "
        "instead of --compare-ref",
    )
    g = p.add_argument_group("servers and machine")
    g.add_argument(
        "--broker-cmd",
        default=BROKER_CMD,
        help="command template for the broker ({python} {host} {port} "
        "{http_port} {backplane} {redis_url})",
    )
    g.add_argument("--baseline-cmd", default=BASELINE_CMD)
    g.add_argument("--socketio-cmd", default=SOCKETIO_CMD)
    g.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    g.add_argument(
        "--require-redis",
        action="store_true",
        help="fail (instead of skipping the redis scenario) without Redis",
    )
    g.add_argument("--server-core", type=int, default=0)
    g.add_argument("--loadgen-core", type=int, default=1)
    g.add_argument("--no-pin", action="store_true", help="do not use taskset/affinity")
    g.add_argument(
        "--bound-threshold",
        type=float,
        default=90.0,
        help="CPU %% at which a side counts as saturated",
    )
    g.add_argument(
        "--noise-threshold",
        type=float,
        default=15.0,
        help="CPU %% taken by other processes above which a measurement is redone",
    )
    g.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="measure every server this many times, alternating the order; "
        "figures are medians, ratios the median of each round's ratio",
    )
    g.add_argument("--retries", type=int, default=2, help="repeats of a noisy measurement")
    g.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="seconds to wait for an idle machine before each measurement",
    )
    g.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON report (default bench/results/latest.json, smoke.json with --smoke)",
    )
    g.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    if args.output is None:
        args.output = RESULTS / ("smoke.json" if args.smoke else "latest.json")
    bad = set(args.scenarios.split(",")) - set(SCENARIOS)
    if bad:
        p.error(f"unknown scenarios: {','.join(sorted(bad))}")
    bad = set(filter(None, args.variants.split(","))) - set(VARIANTS)
    if bad:
        p.error(f"unknown variants: {','.join(sorted(bad))}")
    if args.compare_ref and args.compare_cmd:
        p.error("give --compare-ref or --compare-cmd, not both")
    if "history" in args.variants and args.history_size < args.recovery_messages + 1:
        p.error("--history-size must exceed --recovery-messages (the recovery must fit)")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def prepare_ref(ref: str, tmp: Path) -> tuple[str, str]:
    """Extract commit ``ref`` into ``tmp`` and return a broker template running it, and a label.

    ``git archive`` rather than ``git worktree add``: nothing is registered in
    the repository, so an interrupted run leaves nothing behind but a
    temporary directory. The old tree goes first on ``sys.path`` through a
    small launcher (servers start in this repository, where ``-m broker``
    would load the current code); its dependencies are this venv's.
    """
    commit = subprocess.run(
        ["git", "rev-parse", "--short", f"{ref}^{{commit}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    tree = tmp / f"ref-{commit}"
    tar = subprocess.run(
        ["git", "archive", "--format=tar", commit],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(tree, filter="data")
    launcher = tmp / "ref_broker.py"
    launcher.write_text(
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(tree)!r})\n"
        "import broker\n"
        "print('broker-ref: running', broker.__file__, file=sys.stderr, flush=True)\n"
        "runpy.run_module('broker', run_name='__main__', alter_sys=True)\n"
    )
    return BROKER_CMD.replace("-m broker", shlex.quote(str(launcher)), 1), commit


async def run(args: argparse.Namespace) -> int:
    """Run every selected scenario against every server; print and save the report.

    Config files and another commit's tree live in a temporary directory that
    is removed however the run ends.
    """
    # SIGTERM (and SIGINT, which a shell's background job ignores) cancel the
    # run, so that every server it started is stopped on the way out.
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        return await run_in(args, Path(tmp))


async def run_in(args: argparse.Namespace, tmp: Path) -> int:
    """The body of ``run``, with its temporary directory."""
    t_start = time.perf_counter()
    scen = [s for s in SCENARIOS if s in args.scenarios.split(",")]
    variants = set(filter(None, args.variants.split(",")))
    RESULTS.mkdir(parents=True, exist_ok=True)
    log_dir = RESULTS / "logs"
    log_dir.mkdir(exist_ok=True)
    for old in log_dir.glob("*.log"):
        old.unlink()
    templates = {"baseline": args.baseline_cmd, "broker": args.broker_cmd}
    dialects: dict[str, clients.Dialect] = {"json": clients.JsonDialect()}
    if args.socketio:
        templates["socketio"] = args.socketio_cmd
        dialects["socketio"] = clients.SocketIODialect()
    ref_label = ""
    if args.compare_ref:
        templates["broker-ref"], ref_label = prepare_ref(args.compare_ref, tmp)
    elif args.compare_cmd:
        templates["broker-ref"], ref_label = args.compare_cmd, "--compare-cmd"
    configs: dict[str, Path] = {}
    if "auth" in variants:
        configs["auth"] = tmp / "auth.toml"
        configs["auth"].write_text(auth_config(JWT_SECRET))
        # One token (and subject) per connection of the largest scenario, minted now.
        n_tok = 1 + max(
            args.subscribers, args.channels * args.subs_per_channel, args.connect_connections
        )
        root = [f"{CHANNEL_ROOT}.>"]
        tokens = clients.mint_tokens(JWT_SECRET, min(n_tok, 20_000), root, root)
        dialects["auth"] = clients.AuthJsonDialect(tokens, args.auth_via)
        # The connect scenario also measures the token in the handshake.
        dialects["broker-auth-header"] = clients.AuthJsonDialect(tokens, "header")
    if "history" in variants:
        configs["history"] = tmp / "history.toml"
        configs["history"].write_text(history_config(args.history_size, args.history_ttl))
        dialects["history"] = clients.JsonDialect()
    elif "recovery" in scen:
        print("recovery needs the history variant; skipping it")
        scen.remove("recovery")
    if "redis-channels" in scen and "history" not in variants:
        scen.remove("redis-channels")
    on_redis = {"redis", "redis-channels", "recovery"}
    rv = redis_info(args.redis_url) if on_redis & set(scen) else None
    ctx = Ctx(
        args,
        dialects,
        templates,
        log_dir,
        f"{CHANNEL_ROOT}.p{os.getpid()}",
        rv,
        redis_pid(redis_target(args.redis_url)[1]) if rv else None,
        {},
        [],
        configs=configs,
        ref_label=ref_label,
    )
    for s in ("redis", "redis-channels"):
        if s in scen and rv is None:
            msg = f"{s}: no Redis answering at {args.redis_url}"
            if args.require_redis:
                ctx.failures.append(msg)
            print(f"{msg}; skipping the {s} scenario")
            scen.remove(s)

    pinned = (
        "unpinned"
        if args.no_pin
        else (f"servers on core {args.server_core}, load generator on core {args.loadgen_core}")
    )
    print(f"bench: {'SMOKE ' if args.smoke else ''}scenarios {','.join(scen)}; {pinned}")
    if ref_label:
        print(f"broker-ref: {ref_label} ({templates['broker-ref']})")
    for s in scen:
        peers = ctx.peers(s)
        for k in range(args.rounds):
            # Alternate the order, so that neither side always runs first (on a
            # machine just left warm, or cold) in every round.
            for peer in peers if k % 2 == 0 else peers[::-1]:
                await measure(ctx, s, peer)
        for peer in peers:
            ctx.results.setdefault(s, {})[peer] = pick_median(s, ctx.runs[s][peer])

    rows = summarize(ctx)
    md = table(rows)
    elapsed = round(time.perf_counter() - t_start, 1)
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "smoke": args.smoke,
        "elapsed_s": elapsed,
        "machine": machine(),
        "versions": {**versions(), **({"redis-server": rv} if rv else {})},
        "pinning": pinned,
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": ctx.results,
        "runs": ctx.runs,  # every round of every server, in order
        "summary": rows,
        "failures": ctx.failures,
        "table_markdown": md,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print()
    print(md)
    m = report["machine"]
    vers = " ".join(f"{k} {v}" for k, v in report["versions"].items())
    print(f"\n{m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; {vers}")
    print(f"written {args.output} in {elapsed}s")
    if ctx.failures:
        print("\nFUNCTIONAL FAILURES:")
        for f in ctx.failures:
            print(f"  - {f}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Pin this process (the load generator) to its core and run on uvloop."""
    args = parse_args(argv)
    if not args.no_pin:
        if (os.cpu_count() or 1) < 2:
            print("fewer than 2 cores: running unpinned")
            args.no_pin = True
        else:
            os.sched_setaffinity(0, {args.loadgen_core})
    import uvloop

    try:
        return uvloop.run(run(args))
    except asyncio.CancelledError:
        print("\nbench: interrupted; every server it started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
