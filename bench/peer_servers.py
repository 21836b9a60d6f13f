"""The systems ``bench/peers.py`` measures: installing, configuring, starting, stopping.

The broker runs with authentication and history on (a generated
configuration), Bun from the npm package ``bun`` (installed on first use),
the NATS server from its Debian package with a generated configuration. Every
process is pinned to the server core and stopped with SIGTERM, then SIGKILL,
even when a measurement fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from bench.dialects import BenchError
from bench.net import HOST, Server, answers, free_ports

ROOT = Path(__file__).resolve().parent.parent

BUN_DIR = Path(os.environ.get("BENCH_BUN_DIR", Path.home() / ".cache" / "broker-bench" / "bun"))
BUN_VERSION = "1"  # npm range of the `bun` package installed on first use
#: Channel names all start with this; the broker's rule for them keeps history.
CHANNEL_ROOT = "bench"


@dataclass
class Ctx:
    """What one invocation shares."""

    args: argparse.Namespace
    log_dir: Path
    prefix: str
    bun: Path | None
    nats: str | None
    broker_config: Path
    token: str
    failures: list[str]

    @property
    def core(self) -> int | None:
        return None if self.args.no_pin else self.args.server_core


@contextlib.asynccontextmanager
async def server(ctx: Ctx, system: str) -> AsyncIterator[Server]:
    """Start one system pinned to the server core; stop it afterwards, even on error."""
    port, http_port, nats_monitor = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    ready_http: tuple[int, bytes] | None = None
    if system in ("broker", "broker-ref"):
        template = ctx.args.broker_cmd if system == "broker" else ctx.args.broker_ref_cmd
        argv = shlex.split(
            template.format(
                python=sys.executable,
                host=HOST,
                port=port,
                http_port=http_port,
                config=ctx.broker_config,
            )
        )
        # 10,000 subscribers plus the publisher; the default cap is 10,000.
        env["BROKER_MAX_CONNECTIONS"] = "20000"
        ready_http = (http_port, b"/readyz")
    elif system == "bun":
        assert ctx.bun is not None
        argv = [str(ctx.bun), str(ROOT / "bench" / "bun_peer.js"), "--host", HOST]
        argv += ["--port", str(port)]
    elif system == "nats":
        assert ctx.nats is not None
        conf = ctx.log_dir / f"nats-{port}.conf"
        conf.write_text(nats_config(port, nats_monitor))
        argv = [ctx.nats, "-c", str(conf)]
        env["GOMAXPROCS"] = "1"  # one core, like the others
    else:
        raise ValueError(system)
    if ctx.core is not None:
        argv = ["taskset", "-c", str(ctx.core), *argv]
    log = ctx.log_dir / f"{system}.log"
    with open(log, "ab") as logf:  # noqa: ASYNC230 (before the measurement starts)
        logf.write(f"\n=== {time.strftime('%H:%M:%S')} {shlex.join(argv)}\n".encode())
        logf.flush()
        popen = subprocess.Popen(  # noqa: ASYNC220 (before the measurement starts)
            argv, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    proc = Server(system, popen, port, log)
    try:
        deadline = time.monotonic() + 30.0
        for p, path in [(port, None)] + ([ready_http] if ready_http else []):
            while not await answers(p, path):
                proc.check_alive()
                if time.monotonic() > deadline:
                    raise BenchError(f"{system} not ready after 30 s")
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # start-up work (imports, JIT) out of the window
        yield proc
        proc.check_alive()
    finally:
        await asyncio.sleep(0.1)  # let our closed sockets reach the server first
        await proc.stop()


def nats_config(ws_port: int, client_port: int) -> str:
    """A NATS server configuration: loopback only, WebSocket without TLS or compression."""
    return (
        f"host: {HOST}\nport: {client_port}\n"
        # No protocol PINGs from the server during a run (the counting
        # subscribers do not parse frames); runs are far shorter than this.
        'ping_interval: "10m"\n'
        "max_payload: 1048576\n"
        f"websocket {{\n  host: {HOST}\n  port: {ws_port}\n  no_tls: true\n"
        "  compression: false\n}\n"
    )


def broker_config(path: Path, secret: str) -> None:
    """Write the broker's configuration: authentication on, history on the bench channels."""
    path.write_text(
        f'jwt_secret = "{secret}"\n\n'
        "[[channels]]\n"
        f'pattern = "{CHANNEL_ROOT}.>"\n'
        'subscribe = "authenticated"\n'
        'publish = "authenticated"\n'
        "history_size = 100\n"
        "history_ttl = 300.0\n"
    )


def ensure_bun(install: bool) -> Path | None:
    """Return the ``bun`` binary, installing the npm package ``bun`` on first use."""
    override = os.environ.get("BENCH_BUN")
    if override:
        return Path(override)
    binary = BUN_DIR / "node_modules" / ".bin" / "bun"
    if binary.exists() or not install:
        return binary if binary.exists() else None
    npm = shutil.which("npm")
    if npm is None:
        print("bun: npm not found; skipping Bun (see bench/README.md)")
        return None
    BUN_DIR.mkdir(parents=True, exist_ok=True)
    print(f"bun: installing the npm package bun@{BUN_VERSION} into {BUN_DIR} ...", flush=True)
    try:
        subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(BUN_DIR),
                "--no-audit",
                "--no-fund",
                "--loglevel",
                "error",
                f"bun@{BUN_VERSION}",
            ],
            check=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"bun: install failed ({exc}); skipping Bun")
        return None
    return binary if binary.exists() else None


def find_nats() -> str | None:
    """The ``nats-server`` binary (Debian installs it in /usr/sbin), or None."""
    for candidate in (shutil.which("nats-server"), "/usr/sbin/nats-server"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def tool_version(argv: list[str]) -> str:
    """The first line a tool prints for its version, or 'unknown'."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""
