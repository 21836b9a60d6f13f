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
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
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
from bench.procstat import Probe, core_times  # noqa: E402

RESULTS = ROOT / "bench" / "results"
HOST = "127.0.0.1"  # the only address this suite ever targets

BASELINE_CMD = "{python} bench/baseline.py --host {host} --port {port}"
BROKER_CMD = (
    "{python} -m broker serve --host {host} --port {port} --http-port {http_port}"
    " --log-level warning --backplane {backplane} --redis-url {redis_url}"
)
SOCKETIO_CMD = "{python} bench/socketio_peer.py --host {host} --port {port}"

SCENARIOS = ("fanout", "channels", "latency", "memory", "redis")
# The channels scenario holds 10,000 subscribers plus a publisher in one process;
# the broker's default cap is 10,000 connections. The baseline ignores this.
SERVER_ENV = {"BROKER_MAX_CONNECTIONS": "20000"}


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    """A server process started under ``taskset``; stopped with SIGTERM, then SIGKILL."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    http_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    def check_alive(self) -> None:
        """Raise if the process has exited."""
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise clients.BenchError(
                f"{self.name} exited with {self.proc.returncode}; log tail:\n{tail}"
            )

    async def stop(self, timeout_s: float = 10.0) -> float:
        """Terminate the process (ours: we started it and hold its pid); return seconds taken.

        Waits without blocking the event loop, so the load generator's own
        sockets finish closing and the server's graceful shutdown is not left
        waiting for close handshakes from a frozen client.
        """
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, 5)
        return round(time.monotonic() - t0, 2)


async def start_server(
    name: str, template: str, core: int | None, log_dir: Path, fmt: dict[str, str],
    ready_timeout_s: float = 30.0,
) -> Server:
    """Start ``template`` pinned to ``core`` and wait until its port accepts connections."""
    port, http_port = free_port(), free_port()
    fields = {"python": sys.executable, "host": HOST, "port": str(port),
              "http_port": str(http_port), **fmt}
    argv = shlex.split(template.format(**fields))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(SERVER_ENV)
    if core is not None:
        argv = ["taskset", "-c", str(core), *argv]
    log = log_dir / f"{name}.log"
    with open(log, "ab") as logf:  # noqa: ASYNC230 (before the measurement starts)
        logf.write(f"\n=== {time.strftime('%H:%M:%S')} {shlex.join(argv)}\n".encode())
        logf.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT,  # noqa: ASYNC220
                                stdin=subprocess.DEVNULL, env=env)
    server = Server(name, proc, port, http_port, log)
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


async def answers(port: int, path: bytes | None) -> bool:
    """Return whether ``port`` accepts a connection (and ``GET path`` answers 200)."""
    try:
        async with asyncio.timeout(2.0):
            r, w = await asyncio.open_connection(HOST, port)
            try:
                if path is None:
                    return True
                w.write(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Connection: close\r\n\r\n")
                status = await r.readline()
                return status.split(b" ")[1:2] == [b"200"]
            finally:
                w.close()
    except (OSError, TimeoutError, IndexError):
        return False


@contextlib.asynccontextmanager
async def servers(
    specs: list[tuple[str, str]], core: int | None, log_dir: Path, fmt: dict[str, str]
) -> AsyncIterator[list[Server]]:
    """Run several servers for one measurement; stop them all afterwards."""
    started: list[Server] = []
    try:
        for name, template in specs:
            started.append(await start_server(name, template, core, log_dir, fmt))
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
    for pkg in ("websockets", "orjson", "pydantic", "picows", "uvloop", "redis",
                "python-socketio", "aiohttp"):
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
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "broker"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "commit": commit or "none", "broker_tree_dirty": dirty}


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

    @property
    def core(self) -> int | None:
        return None if self.args.no_pin else self.args.server_core

    def probe(self, srvs: list[Server], with_redis: bool = False) -> Probe:
        aux = {"redis": self.redis_pid} if with_redis and self.redis_pid else {}
        return Probe([s.proc.pid for s in srvs], aux,
                     self.args.server_core, self.args.loadgen_core)

    def fmt(self, backplane: str = "memory") -> dict[str, str]:
        return {"backplane": backplane, "redis_url": self.args.redis_url}


def throughput_params(a: argparse.Namespace) -> loadgen.ThroughputParams:
    """Map command-line sizes onto the load generator's parameters."""
    return loadgen.ThroughputParams(
        duration_s=a.duration, max_messages=a.max_messages, ack_window=a.ack_window,
        lag_window=a.lag_window, tick_s=a.tick_ms / 1000, frames_per_read=a.frames_per_read,
        drain_timeout_s=a.drain_timeout,
        connect_concurrency=a.connect_concurrency,
    )


def functional_failures(name: str, r: dict[str, Any]) -> list[str]:
    """List what went wrong functionally in one result (never speed)."""
    out = []
    for key in ("lost", "extra", "subs_closed", "publish_errors"):
        if r.get(key):
            out.append(f"{name}: {key}={r[key]}")
    if "alive" in r and r["alive"] != r["connections"]:
        out.append(f"{name}: only {r['alive']}/{r['connections']} connections alive")
    if r.get("error_samples"):
        out.append(f"{name}: errors {r['error_samples']}")
    return out


async def wait_quiet(max_wait_s: float, threshold_pct: float) -> float:
    """Wait (bounded) until the machine's cores are nearly idle; return their busy %.

    Other tenants (a test suite, a browser) slow whichever server happens to run
    beside them, which skews a ratio far more than the 5-10 % run-to-run noise.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        c0 = core_times()
        await asyncio.sleep(0.5)
        c1 = core_times()
        busy = total = 0
        for core, t1 in c1.items():
            d = [b - a for a, b in zip(c0.get(core, [0] * 8), t1, strict=True)]
            busy += sum(d) - d[3] - d[4]
            total += sum(d)
        pct = 100.0 * len(c1) * busy / total if total else 0.0  # 100 = one core
        if pct <= threshold_pct or time.monotonic() >= deadline:
            return round(pct, 1)


async def measure(ctx: Ctx, scenario: str, server: str) -> None:
    """Run one scenario against one server kind and record the result or the failure.

    A measurement during which other processes took more than ``--noise-threshold``
    % of a core is repeated (up to ``--retries`` times); the quietest attempt counts.
    """
    a = ctx.args
    key = f"{scenario}/{server}"
    print(f"  {key} ...", end="", flush=True)
    t0 = time.perf_counter()
    attempts: list[dict[str, Any]] = []
    try:
        for _ in range(1 + a.retries):
            idle = await wait_quiet(a.quiet_wait, a.noise_threshold)
            r = await measure_once(ctx, scenario, server)
            r["machine_busy_before_pct"] = idle
            attempts.append(r)
            if r.get("other_cpu_pct", 0.0) <= a.noise_threshold:
                break
            if a.retries:
                print(f" [noisy: other={r['other_cpu_pct']}%]", end="", flush=True)
    except Exception as exc:  # one failed measurement must not hide the others
        if isinstance(exc, ExceptionGroup):
            exc = exc.exceptions[0]
            while isinstance(exc, ExceptionGroup):
                exc = exc.exceptions[0]
        msg = f"{key}: {type(exc).__name__}: {exc}"
        ctx.failures.append(msg)
        ctx.runs.setdefault(scenario, {}).setdefault(server, []).append({"error": msg})
        print(f" FAILED ({msg.splitlines()[0]})")
        if a.verbose:
            traceback.print_exc()
        return
    r = min(attempts, key=lambda x: x.get("other_cpu_pct", 0.0))
    r["attempts"] = len(attempts)
    r["noisy"] = r.get("other_cpu_pct", 0.0) > a.noise_threshold
    ctx.runs.setdefault(scenario, {}).setdefault(server, []).append(r)
    ctx.failures.extend(functional_failures(key, r))
    print(f" {time.perf_counter() - t0:.1f}s {headline(scenario, r)}")


async def measure_once(ctx: Ctx, scenario: str, server: str) -> dict[str, Any]:
    """Start the server(s) for one scenario, drive it once, stop them."""
    a = ctx.args
    dialect = ctx.dialects[server]
    prefix = f"{ctx.prefix}.{scenario}"
    template = ctx.templates.get(server, "")
    if scenario in ("fanout", "channels"):
        # fanout: one channel, many subscribers; channels: many channels, a few each
        n_ch = 1 if scenario == "fanout" else a.channels
        per = a.subscribers if scenario == "fanout" else a.subs_per_channel
        chans = [f"{prefix}.{i}" for i in range(n_ch)]
        async with servers([(server, template)], ctx.core, ctx.log_dir, ctx.fmt()) as (srv,):
            return await loadgen.throughput(dialect, [srv.url], srv.url, chans, per,
                                            throughput_params(a), ctx.probe([srv]))
    if scenario == "latency":
        lp = loadgen.LatencyParams(a.latency_subscribers, a.latency_rate,
                                   a.latency_duration, a.latency_warmup)
        async with servers([(server, template)], ctx.core, ctx.log_dir, ctx.fmt()) as (srv,):
            return await loadgen.latency(dialect, srv.url, f"{prefix}.0", lp, ctx.probe([srv]))
    if scenario == "memory":
        async with servers([(server, template)], ctx.core, ctx.log_dir, ctx.fmt()) as (srv,):
            return await loadgen.memory(dialect, srv.url, prefix, a.connections,
                                        ctx.probe([srv]), concurrency=a.connect_concurrency)
    if scenario == "redis":
        # One broker on the Redis backplane, or two with the subscribers split
        # between them and the publisher on the first (both on the server core).
        procs = 2 if server.endswith("2proc") else 1
        specs = [(f"{server}-{i}", ctx.templates["broker"]) for i in range(procs)]
        chans = [f"{prefix}.{procs}p"]
        async with servers(specs, ctx.core, ctx.log_dir, ctx.fmt("redis")) as srvs:
            r = await loadgen.throughput(
                dialect, [s.url for s in srvs], srvs[0].url, chans, a.subscribers,
                throughput_params(a), ctx.probe(srvs, with_redis=True))
            r["processes"] = procs
            return r
    raise ValueError(scenario)


def headline(scenario: str, r: dict[str, Any]) -> str:
    """One line of the most telling numbers of a result, for the progress log."""
    if scenario == "latency":
        return (f"p50={r['p50_ms']}ms p99={r['p99_ms']}ms max={r['max_ms']}ms "
                f"lost={r['lost']} srv={r['server_cpu_pct']}%")
    if scenario == "memory":
        return f"{r['kib_per_conn']} KiB/conn alive={r['alive']}/{r['connections']}"
    return (f"{r['deliveries_per_s']:,}/s lost={r['lost']} srv={r['server_cpu_pct']}% "
            f"srv-core={r['server_core_busy_pct']}% (softirq {r['server_core_softirq_pct']}%, "
            f"steal {r['server_core_steal_pct']}%) lg={r['loadgen_cpu_pct']}% "
            f"lg-core={r['loadgen_core_busy_pct']}% other={r['other_cpu_pct']}% "
            f"srv-us/msg={r['server_us_per_delivery']} (user {r['server_user_us_per_delivery']})")


# --------------------------------------------------------------------------- report


TARGETS: dict[str, tuple[str, str, float, str]] = {
    # scenario: (metric key, unit, target ratio, "min" if higher is better else "max")
    "fanout": ("deliveries_per_s", "msg/s", 5.0, "min"),
    "channels": ("deliveries_per_s", "msg/s", 1.3, "min"),
    "latency": ("p99_ms", "ms", 1.5, "max"),
    "memory": ("kib_per_conn", "KiB/conn", 1.1, "max"),
}


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
    return {"latency": "p99_ms", "memory": "kib_per_conn"}.get(scenario, "deliveries_per_s")


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
    metrics = ["p50_ms", "p99_ms", "max_ms"] if scenario == "latency" else [key]
    median["rounds"] = {m: [r.get(m) for r in runs] for m in metrics}
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
    pairs = list(zip(b.get("rounds", {}).get(metric, []),
                     base.get("rounds", {}).get(metric, []), strict=False))
    ratios = [r for r in (ratio(x, y) for x, y in pairs) if r is not None]
    if len(ratios) < 2:
        return ratio(b.get(metric), base.get(metric))
    ratios.sort()
    mid = len(ratios) // 2
    return round(ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2, 2)


def summarize(ctx: Ctx) -> list[dict[str, Any]]:
    """Build the table rows: broker value, reference value, ratio, target."""
    rows: list[dict[str, Any]] = []
    res = ctx.results
    thr = ctx.args.bound_threshold
    for scen, (metric, unit, target, sense) in TARGETS.items():
        if scen not in res:
            continue
        for peer in [p for p in res[scen] if p != "baseline"]:
            b, base = res[scen].get(peer, {}), res[scen].get("baseline", {})
            metrics = [metric] if scen != "latency" else ["p50_ms", "p99_ms", "max_ms"]
            for m in metrics:
                rt = paired_ratio(res[scen].get(peer, {}), res[scen].get("baseline", {}), m)
                has_target = m == metric and peer == "broker"
                met = None
                if has_target and rt is not None:
                    met = rt >= target if sense == "min" else rt <= target
                rows.append({
                    "scenario": scen, "server": peer, "metric": m, "unit": unit,
                    "value": median_value(b, m), "reference": "baseline",
                    "reference_value": median_value(base, m),
                    "ratio": rt, "target": (f"{'≥' if sense == 'min' else '≤'}{target}"
                                            if has_target else ""),
                    "met": met,
                    "server_cpu_pct": b.get("server_cpu_pct"),
                    "reference_cpu_pct": base.get("server_cpu_pct"),
                    "loadgen_cpu_pct": b.get("loadgen_cpu_pct"),
                    "bound": (bound(b, thr) + "/" + bound(base, thr)
                              if scen in ("fanout", "channels") and "error" not in b
                              and "error" not in base else ""),
                    "noisy": bool(b.get("noisy") or base.get("noisy")),
                })
    if "redis" in res:
        mem = res.get("fanout", {}).get("broker", {})
        for peer, r in res["redis"].items():
            rt = ratio(r.get("deliveries_per_s"), mem.get("deliveries_per_s"))
            one = peer == "broker-redis"
            rows.append({
                "scenario": "redis", "server": peer, "metric": "deliveries_per_s",
                "unit": "msg/s", "value": r.get("deliveries_per_s"),
                "reference": "broker memory fanout",
                "reference_value": mem.get("deliveries_per_s"), "ratio": rt,
                "target": "≥0.8" if one else "",
                "met": (rt >= 0.8) if one and rt is not None else None,
                "server_cpu_pct": r.get("server_cpu_pct"),
                "reference_cpu_pct": mem.get("server_cpu_pct"),
                "loadgen_cpu_pct": r.get("loadgen_cpu_pct"),
                "bound": bound(r, thr) if "error" not in r else "",
                "noisy": bool(r.get("noisy") or mem.get("noisy")),
            })
    return rows


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
    head = ["scenario", "server", "metric", "value", "reference", "ref. value", "ratio",
            "target", "met", "server CPU % (ref.)", "loadgen CPU %", "bound (ref.)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        met = {True: "yes", False: "NO", None: ""}[r["met"]]
        lines.append("| " + " | ".join([
            r["scenario"], r["server"], f"{r['metric']} ({r['unit']})", fmt_num(r["value"]),
            r["reference"], fmt_num(r["reference_value"]), fmt_num(r["ratio"]), r["target"],
            met, f"{fmt_num(r['server_cpu_pct'])} ({fmt_num(r['reference_cpu_pct'])})",
            fmt_num(r["loadgen_cpu_pct"]), r["bound"] + (" NOISY" if r["noisy"] else ""),
        ]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


SMOKE = {
    "subscribers": 50, "duration": 1.0, "max_messages": 300, "channels": 20,
    "subs_per_channel": 3, "latency_subscribers": 10, "latency_duration": 1.0,
    "latency_warmup": 0.2, "connections": 200, "drain_timeout": 10.0,
    "retries": 0, "quiet_wait": 0.0, "rounds": 1,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; every size has a default that finishes in minutes."""
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, functional check only (for CI)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--socketio", action="store_true",
                   help="also measure python-socketio on aiohttp as a peer")
    g = p.add_argument_group("throughput (fanout, channels, redis)")
    g.add_argument("--subscribers", type=int, default=1000, help="fanout subscribers")
    g.add_argument("--channels", type=int, default=1000, help="channels scenario: channels")
    g.add_argument("--subs-per-channel", type=int, default=10)
    g.add_argument("--duration", type=float, default=10.0, help="publishing time per run (s)")
    g.add_argument("--max-messages", type=int, default=1_000_000,
                   help="cap on messages published per run")
    g.add_argument("--ack-window", type=int, default=64,
                   help="publish requests in flight without their ok")
    g.add_argument("--lag-window", type=int, default=512,
                   help="messages per subscriber published but not yet delivered")
    g.add_argument("--tick-ms", type=float, default=0.0,
                   help="subscribers read in batches this often; 0 adapts the period so "
                        "that each read carries about --frames-per-read frames")
    g.add_argument("--frames-per-read", type=float, default=50.0)
    g.add_argument("--drain-timeout", type=float, default=30.0)
    g = p.add_argument_group("latency")
    g.add_argument("--latency-subscribers", type=int, default=100)
    g.add_argument("--latency-rate", type=float, default=200.0, help="publishes per second")
    g.add_argument("--latency-duration", type=float, default=10.0)
    g.add_argument("--latency-warmup", type=float, default=1.0,
                   help="seconds of samples dropped at the start")
    g = p.add_argument_group("memory")
    g.add_argument("--connections", type=int, default=5000)
    g.add_argument("--connect-concurrency", type=int, default=200,
                   help="handshakes in progress at once")
    g = p.add_argument_group("servers and machine")
    g.add_argument("--broker-cmd", default=BROKER_CMD,
                   help="command template for the broker ({python} {host} {port} "
                        "{http_port} {backplane} {redis_url})")
    g.add_argument("--baseline-cmd", default=BASELINE_CMD)
    g.add_argument("--socketio-cmd", default=SOCKETIO_CMD)
    g.add_argument("--redis-url", default=os.environ.get("REDIS_URL",
                                                         "redis://127.0.0.1:6379/0"))
    g.add_argument("--require-redis", action="store_true",
                   help="fail (instead of skipping the redis scenario) without Redis")
    g.add_argument("--server-core", type=int, default=0)
    g.add_argument("--loadgen-core", type=int, default=1)
    g.add_argument("--no-pin", action="store_true", help="do not use taskset/affinity")
    g.add_argument("--bound-threshold", type=float, default=90.0,
                   help="CPU %% at which a side counts as saturated")
    g.add_argument("--noise-threshold", type=float, default=15.0,
                   help="CPU %% taken by other processes above which a measurement is redone")
    g.add_argument("--rounds", type=int, default=3,
                   help="measure every server this many times, alternating the order; "
                        "figures are medians, ratios the median of each round's ratio")
    g.add_argument("--retries", type=int, default=2, help="repeats of a noisy measurement")
    g.add_argument("--quiet-wait", type=float, default=30.0,
                   help="seconds to wait for an idle machine before each measurement")
    g.add_argument("--output", type=Path, default=None,
                   help="JSON report (default bench/results/latest.json, smoke.json with --smoke)")
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
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


async def run(args: argparse.Namespace) -> int:
    """Run every selected scenario against every server; print and save the report."""
    t_start = time.perf_counter()
    scen = [s for s in SCENARIOS if s in args.scenarios.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    log_dir = RESULTS / "logs"
    log_dir.mkdir(exist_ok=True)
    for old in log_dir.glob("*.log"):
        old.unlink()
    templates = {"baseline": args.baseline_cmd, "broker": args.broker_cmd}
    dialects: dict[str, clients.Dialect] = {"baseline": clients.JsonDialect(),
                                            "broker": clients.JsonDialect()}
    if args.socketio:
        templates["socketio"] = args.socketio_cmd
        dialects["socketio"] = clients.SocketIODialect()
    rv = redis_info(args.redis_url) if "redis" in scen else None
    ctx = Ctx(args, dialects, templates, log_dir, f"bench.p{os.getpid()}", rv,
              redis_pid(redis_target(args.redis_url)[1]) if rv else None, {}, [])
    if "redis" in scen and rv is None:
        msg = f"redis: no Redis answering at {args.redis_url}"
        if args.require_redis:
            ctx.failures.append(msg)
        print(f"{msg}; skipping the redis scenario")
        scen.remove("redis")
    if "redis" in scen:
        dialects["broker-redis"] = dialects["broker-redis-2proc"] = clients.JsonDialect()

    pinned = "unpinned" if args.no_pin else (
        f"servers on core {args.server_core}, load generator on core {args.loadgen_core}")
    print(f"bench: {'SMOKE ' if args.smoke else ''}scenarios {','.join(scen)}; {pinned}")
    for s in scen:
        peers = ["broker-redis", "broker-redis-2proc"] if s == "redis" else list(templates)
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

    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
