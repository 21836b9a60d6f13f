"""Measure the broker beside the fastest peers: Bun's native pub/sub and the NATS server.

Every system runs pinned to the server core, the load generator (this process)
to the other; each is driven by the same load generator (``bench.loadgen``)
in its own protocol: the broker's JSON frames (with authentication and
history on, as deployed), the same JSON frames for Bun (``bun_peer.js``), and
the NATS text protocol over WebSocket. For every system and scenario the
report gives the server's CPU time per delivery (``/proc``), deliveries per
second, latency and memory, and says when the load generator, not the
server, was the limit. ``--smoke`` runs tiny sizes and fails only on a
functional error (a lost or extra message, an error reply, a dead server).

Usage (from the repository root)::

    .venv/bin/python bench/peers.py            # full run, about 10 minutes
    .venv/bin/python bench/peers.py --smoke    # functional check, under a minute
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import platform
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if not __package__:  # run as a script (python bench/peers.py): make `bench` importable
    sys.path.insert(0, str(ROOT))

import jwt  # noqa: E402
import orjson  # noqa: E402

from bench import loadgen  # noqa: E402
from bench.dialects import AuthJsonDialect, JsonDialect  # noqa: E402
from bench.peer_dialects import NatsDialect  # noqa: E402
from bench.peer_servers import (  # noqa: E402
    CHANNEL_ROOT,
    Ctx,
    broker_config,
    ensure_bun,
    find_nats,
    server,
    tool_version,
)
from bench.procstat import Probe, measured  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SYSTEMS = ("broker", "bun", "nats")
SCENARIOS = ("fanout", "channels", "packed", "memory", "latency200", "latency1000")
BROKER_CMD = (
    "{python} -m broker serve --host {host} --port {port} --http-port {http_port}"
    " --log-level warning --backplane memory --config {config}"
)


# --------------------------------------------------------------------------- measuring


def dialect_of(ctx: Ctx, system: str) -> Any:
    """How the load generator speaks to ``system``."""
    if system.startswith("broker"):
        return AuthJsonDialect([ctx.token])
    if system == "nats":
        return NatsDialect()
    return JsonDialect()


async def measure_once(ctx: Ctx, scenario: str, system: str) -> dict[str, Any]:
    """Start ``system``, drive one scenario, stop it; return the raw result."""
    a = ctx.args
    dialect = dialect_of(ctx, system)
    prefix = f"{ctx.prefix}.{scenario}"
    params = loadgen.ThroughputParams(
        duration_s=a.duration,
        max_messages=a.max_messages,
        drain_timeout_s=a.drain_timeout,
        connect_concurrency=a.connect_concurrency,
    )
    async with server(ctx, system) as srv:
        probe = Probe([srv.proc.pid], {}, a.server_core, a.loadgen_core)
        if scenario == "fanout":
            return await loadgen.throughput(
                dialect, [srv.url], srv.url, [f"{prefix}.0"], a.subscribers, params, probe
            )
        if scenario in ("channels", "packed"):
            chans = [f"{prefix}.{i}" for i in range(a.channels)]
            return await loadgen.throughput(
                dialect,
                [srv.url],
                srv.url,
                chans,
                a.subs_per_channel,
                params,
                probe,
                packed=a.packed if scenario == "packed" else 1,
            )
        if scenario == "memory":
            return await loadgen.memory(
                dialect, srv.url, prefix, a.connections, probe, concurrency=a.connect_concurrency
            )
        if scenario.startswith("latency"):
            rate = float(scenario.removeprefix("latency"))
            lp = loadgen.LatencyParams(a.latency_subscribers, rate, a.latency_duration, a.warmup)
            r = await loadgen.latency(dialect, srv.url, f"{prefix}.0", lp, probe)
            r["deliveries"] = r["published"] * r["subscribers"]
            r["server_us_per_delivery"] = loadgen._per(r["server_cpu_s"], r["deliveries"])
            return r
    raise ValueError(scenario)


def failures_of(key: str, r: dict[str, Any]) -> list[str]:
    """What went wrong functionally in one result (never speed)."""
    out = [
        f"{key}: {k}={r[k]}" for k in ("lost", "extra", "subs_closed", "publish_errors") if r.get(k)
    ]
    if "alive" in r and r["alive"] != r["connections"]:
        out.append(f"{key}: only {r['alive']}/{r['connections']} connections alive")
    if r.get("error_samples"):
        out.append(f"{key}: errors {r['error_samples']}")
    return out


async def measure(ctx: Ctx, scenario: str, system: str) -> dict[str, Any]:
    """One measurement, retried while the machine was noisy; the failure recorded, not raised."""
    a = ctx.args
    key = f"{scenario}/{system}"
    t0 = time.perf_counter()
    r = await measured(key, lambda: measure_once(ctx, scenario, system), a, ctx.failures)
    if "error" in r:
        return r
    r["loadgen_bound"] = r.get("loadgen_cpu_pct", 0.0) >= a.bound_threshold
    r["server_bound"] = r.get("server_cpu_pct", 0.0) >= a.bound_threshold
    ctx.failures.extend(failures_of(key, r))
    print(f" {time.perf_counter() - t0:.1f}s {headline(scenario, r)}")
    return r


def headline(scenario: str, r: dict[str, Any]) -> str:
    """The most telling numbers of one result, for the progress log."""
    if scenario == "memory":
        return f"{r['kib_per_conn']} KiB/conn alive={r['alive']}/{r['connections']}"
    lg = " LOADGEN-BOUND" if r.get("loadgen_bound") else ""
    if scenario.startswith("latency"):
        return (
            f"p50={r['p50_ms']}ms p99={r['p99_ms']}ms lost={r['lost']} "
            f"srv={r['server_cpu_pct']}% srv-us/msg={r['server_us_per_delivery']}{lg}"
        )
    return (
        f"{r['deliveries_per_s']:,}/s lost={r['lost']} srv={r['server_cpu_pct']}% "
        f"lg={r['loadgen_cpu_pct']}% other={r['other_cpu_pct']}% "
        f"srv-us/msg={r['server_us_per_delivery']} (user {r['server_user_us_per_delivery']}){lg}"
    )


# --------------------------------------------------------------------------- report

#: The figures of each scenario in the table: (result key, label, lower is better).
FIGURES: dict[str, list[tuple[str, str, bool]]] = {
    "fanout": [
        ("server_us_per_delivery", "µs CPU/delivery", True),
        ("deliveries_per_s", "deliveries/s", False),
    ],
    "channels": [
        ("server_us_per_delivery", "µs CPU/delivery", True),
        ("deliveries_per_s", "deliveries/s", False),
    ],
    "packed": [
        ("server_us_per_delivery", "µs CPU/delivery", True),
        ("deliveries_per_s", "deliveries/s", False),
    ],
    "memory": [("kib_per_conn", "KiB RSS/connection", True)],
    "latency200": [
        ("p50_ms", "p50 ms", True),
        ("p99_ms", "p99 ms", True),
        ("server_us_per_delivery", "µs CPU/delivery", True),
    ],
    "latency1000": [
        ("p50_ms", "p50 ms", True),
        ("p99_ms", "p99 ms", True),
        ("server_us_per_delivery", "µs CPU/delivery", True),
    ],
}


def target(scenario: str, key: str, res: dict[str, dict[str, Any]]) -> tuple[str, bool | None]:
    """The issue's target for the broker's figure, and whether it was met."""
    b = res.get("broker", {}).get(key)
    bun = res.get("bun", {}).get(key)
    nats = res.get("nats", {}).get(key)
    if not isinstance(b, int | float):
        return "", None
    if scenario == "fanout" and key == "server_us_per_delivery":
        return "≤ 0.4", b <= 0.4
    if scenario == "channels" and key == "server_us_per_delivery":
        return "≤ 1.2 x Bun", (b <= 1.2 * bun) if isinstance(bun, int | float) else None
    if scenario == "packed" and key == "server_us_per_delivery":
        return "< NATS", (b < nats) if isinstance(nats, int | float) else None
    if scenario == "memory":
        return "≤ 10", b <= 10
    if key == "p99_ms":
        peers = [v for v in (bun, nats) if isinstance(v, int | float)]
        return "no peer better", (b <= min(peers)) if peers else None
    return "", None


def fmt(v: Any) -> str:
    """Format one figure for the table."""
    if v is None:
        return "—"
    if (isinstance(v, float) and v >= 1000) or isinstance(v, int):
        return f"{v:,.0f}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def table(results: dict[str, dict[str, dict[str, Any]]], systems: list[str]) -> str:
    """The Markdown table of every figure: one row per scenario and figure."""
    head = [
        "scenario",
        "figure",
        *systems,
        "broker target",
        "met",
        "bound (LOADGEN = load generator)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for scen, per in results.items():
        for key, label, _ in FIGURES[scen]:
            cells = []
            for s in systems:
                r = per.get(s, {})
                cells.append("FAILED" if "error" in r else fmt(r.get(key)))
            goal, met = target(scen, key, per)
            bounds = []
            for s in systems:
                r = per.get(s, {})
                if "loadgen_bound" in r and key in ("deliveries_per_s", "p99_ms"):
                    tag = (
                        "LOADGEN"
                        if r["loadgen_bound"]
                        else "server"
                        if r["server_bound"]
                        else "neither"
                    )
                    bounds.append(f"{s}: {tag}{' NOISY' if r.get('noisy') else ''}")
            row = [
                scen,
                label,
                *cells,
                goal,
                {True: "yes", False: "NO", None: ""}[met],
                ", ".join(bounds),
            ]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def pick(scenario: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median main figure (a failed round stands for the whole)."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    key = FIGURES[scenario][0][0]
    ranked = sorted(runs, key=lambda r: r.get(key) or 0)
    median = dict(ranked[(len(ranked) - 1) // 2])
    median["rounds"] = {k: [r.get(k) for r in runs] for k, _, _ in FIGURES[scenario]}
    return median


# --------------------------------------------------------------------------- main

SMOKE = {
    "subscribers": 50,
    "duration": 1.0,
    "max_messages": 300,
    "channels": 20,
    "subs_per_channel": 3,
    "packed": 3,
    "latency_subscribers": 10,
    "latency_duration": 1.0,
    "warmup": 0.2,
    "connections": 200,
    "drain_timeout": 10.0,
    "retries": 0,
    "quiet_wait": 0.0,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; every size has a default that finishes in minutes."""
    p = argparse.ArgumentParser(
        prog="python bench/peers.py",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, functional check only")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    p.add_argument(
        "--rounds", type=int, default=1, help="measurements per system, order alternating"
    )
    p.add_argument("--subscribers", type=int, default=1000, help="fanout: subscribers")
    p.add_argument("--channels", type=int, default=1000, help="channels and packed: channels")
    p.add_argument("--subs-per-channel", type=int, default=10)
    p.add_argument("--packed", type=int, default=10, help="packed: subscriptions per connection")
    p.add_argument("--duration", type=float, default=10.0, help="publishing time per run (s)")
    p.add_argument("--max-messages", type=int, default=1_000_000)
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("--connections", type=int, default=5000, help="memory: idle connections")
    p.add_argument("--connect-concurrency", type=int, default=200)
    p.add_argument("--latency-subscribers", type=int, default=100)
    p.add_argument("--latency-duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0, help="latency: seconds of samples dropped")
    p.add_argument(
        "--broker-cmd", default=BROKER_CMD, help="{python} {host} {port} {http_port} {config}"
    )
    p.add_argument(
        "--broker-ref-cmd",
        default=None,
        help="a second broker measured as system 'broker-ref' (an older build, to compare); "
        "same fields as --broker-cmd. See bench/README.md",
    )
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--loadgen-core", type=int, default=1)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument(
        "--bound-threshold", type=float, default=90.0, help="CPU %% that counts as saturated"
    )
    p.add_argument("--noise-threshold", type=float, default=15.0)
    p.add_argument("--retries", type=int, default=1, help="repeats of a noisy measurement")
    p.add_argument("--quiet-wait", type=float, default=20.0)
    p.add_argument(
        "--require-peers", action="store_true", help="fail instead of skipping a peer not installed"
    )
    p.add_argument("--no-install", action="store_true", help="do not install Bun if it is missing")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    if args.output is None:
        args.output = RESULTS / ("peers-smoke.json" if args.smoke else "peers.json")
    if args.broker_ref_cmd and "broker-ref" not in args.systems.split(","):
        args.systems += ",broker-ref"
    if "broker-ref" in args.systems.split(",") and not args.broker_ref_cmd:
        p.error("broker-ref needs --broker-ref-cmd")
    for name, allowed in (("systems", (*SYSTEMS, "broker-ref")), ("scenarios", SCENARIOS)):
        bad = set(getattr(args, name).split(",")) - set(allowed)
        if bad:
            p.error(f"unknown {name}: {','.join(sorted(bad))}")
    return args


def versions(ctx: Ctx) -> dict[str, str]:
    """Versions of everything the figures depend on."""
    out = {"python": platform.python_version()}
    for pkg in ("websockets", "orjson", "pydantic", "picows", "uvloop"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    if ctx.bun is not None:
        out["bun"] = tool_version([str(ctx.bun), "--version"])
    if ctx.nats is not None:
        out["nats-server"] = tool_version([ctx.nats, "--version"])
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out["broker_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    return out


async def run(args: argparse.Namespace) -> int:
    """Measure every selected scenario on every available system; print and save the report."""
    t_start = time.perf_counter()
    log_dir = RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    systems = args.systems.split(",")
    failures: list[str] = []
    bun = ensure_bun(not args.no_install) if "bun" in systems else None
    nats = find_nats() if "nats" in systems else None
    for name, found, hint in (
        ("bun", bun, "npm install bun (bench/README.md)"),
        ("nats", nats, "apt-get install nats-server"),
    ):
        if name in systems and found is None:
            msg = f"{name}: not installed ({hint})"
            print(f"{msg}; skipping it")
            if args.require_peers:
                failures.append(msg)
            systems.remove(name)
    secret = secrets.token_hex(32)
    config = log_dir / "peers-broker.toml"
    broker_config(config, secret)
    token = jwt.encode(
        {"sub": "bench", "iat": int(time.time()), "exp": int(time.time()) + 3 * 3600},
        secret,
        algorithm="HS256",
    )
    ctx = Ctx(args, log_dir, f"{CHANNEL_ROOT}.p{os.getpid()}", bun, nats, config, token, failures)
    scenarios = [s for s in SCENARIOS if s in args.scenarios.split(",")]
    pinned = (
        "unpinned"
        if args.no_pin
        else (f"servers on core {args.server_core}, load generator on core {args.loadgen_core}")
    )
    smoke = "SMOKE " if args.smoke else ""
    print(f"peers: {smoke}{','.join(systems)}; {','.join(scenarios)}; {pinned}")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for scen in scenarios:
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
        for k in range(args.rounds):
            for system in systems if k % 2 == 0 else systems[::-1]:
                runs[system].append(await measure(ctx, scen, system))
        results[scen] = {s: pick(scen, runs[s]) for s in systems}
    md = table(results, systems)
    elapsed = round(time.perf_counter() - t_start, 1)
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "smoke": args.smoke,
        "elapsed_s": elapsed,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "kernel": platform.release()},
        "versions": versions(ctx),
        "pinning": pinned,
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "failures": failures,
        "table_markdown": md,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print()
    print(md)
    print("\n" + " ".join(f"{k} {v}" for k, v in report["versions"].items()))
    print(f"written {args.output} in {elapsed}s")
    if failures:
        print("\nFUNCTIONAL FAILURES:")
        for f in failures:
            print(f"  - {f}")
        return 1
    return 0


def cpu_model() -> str:
    """The CPU's model name."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


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

    runner: Callable[..., int] = uvloop.run
    return runner(run(args))


if __name__ == "__main__":
    sys.exit(main())
