"""Where the memory of an idle subscribed connection goes: RSS and tracemalloc, per connection.

Runs a broker in this process (authentication and history on, as in
``bench/peers.py``) and opens ``--connections`` idle connections from a child
process, each authenticated with a JWT and subscribed to a channel of its own.
Prints the RSS growth per connection and, with ``--trace``, the Python
allocations per connection grouped by the line that made them (tracemalloc
costs memory of its own, so RSS is only meaningful without it).

Usage (from the repository root)::

    .venv/bin/python bench/memprofile.py --connections 2000          # RSS per connection
    .venv/bin/python bench/memprofile.py --connections 2000 --trace  # and where it goes
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if not __package__:
    sys.path.insert(0, str(ROOT))

import jwt  # noqa: E402

from bench.procstat import proc_rss_kib  # noqa: E402
from broker.app import Running, run  # noqa: E402
from broker.settings import Settings  # noqa: E402

CLIENT = """
import asyncio, sys
sys.path.insert(0, {root!r})
from bench.clients import Fleet
from bench.dialects import AuthJsonDialect

async def main():
    fleet = Fleet(AuthJsonDialect([{token!r}]), batching=False)
    await fleet.open([{url!r}], lambda i: f"bench.mem.{{i}}", {n}, 200)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    fleet.close()

asyncio.run(main())
"""


async def measure(n: int, trace: bool, top: int, tracebacks: bool = False) -> None:
    """Start the broker, connect ``n`` clients from a child process, print the figures."""
    secret = secrets.token_hex(32)
    settings = Settings.model_validate(
        {
            "host": "127.0.0.1",
            "port": 0,
            "http_port": 0,
            "log_level": "warning",
            "max_connections": 20000,
            "jwt_secret": secret,
            "channels": [
                {
                    "pattern": "bench.>",
                    "subscribe": "authenticated",
                    "publish": "authenticated",
                    "history_size": 100,
                }
            ],
        }
    )
    token = jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600}, secret, algorithm="HS256")
    started: asyncio.Future[Running] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(
        run(settings, on_started=started.set_result, stop=stop, install_signal_handlers=False)
    )
    running = await asyncio.wait_for(started, 10)
    url = f"ws://127.0.0.1:{running.ws_port}"
    script = CLIENT.format(root=str(ROOT), token=token, url=url, n=n)
    await asyncio.sleep(0.5)
    gc.collect()
    if trace:
        tracemalloc.start(8)
    snap0 = tracemalloc.take_snapshot() if trace else None
    rss0 = proc_rss_kib(os.getpid())
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        line = await asyncio.wait_for(child.stdout.readline(), 300)
        if line.strip() != b"ready":
            raise RuntimeError(f"client failed: {line!r}")
        await asyncio.sleep(1.0)
        gc.collect()
        rss1 = proc_rss_kib(os.getpid())
        print(f"{n} connections: {len(running.node.peers)} peers")
        print(f"RSS growth: {(rss1 - rss0) / n:.2f} KiB per connection")
        if snap0 is not None:
            snap1 = tracemalloc.take_snapshot()
            stats = snap1.compare_to(snap0, "traceback" if tracebacks else "lineno")
            total = sum(s.size_diff for s in stats)
            print(f"tracemalloc: {total / n / 1024:.2f} KiB per connection (Python heap)")
            for s in stats[:top]:
                if s.size_diff / n < 8:
                    break
                frame = s.traceback[0]
                if tracebacks:
                    where = (f"{f.filename.split('/')[-1]}:{f.lineno}" for f in s.traceback)
                    print("      " + " < ".join(where))
                name = frame.filename.split("site-packages/")[-1].split("wt-speed/")[-1]
                print(
                    f"  {s.size_diff / n:8.1f} B/conn  {s.count_diff / n:5.2f} blocks/conn"
                    f"  {name}:{frame.lineno}"
                )
            tracemalloc.stop()
        child.stdin.close()
        await asyncio.wait_for(child.wait(), 30)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        stop.set()
        await asyncio.wait_for(task, 30)


def main() -> None:
    """Parse the options and measure."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--trace", action="store_true", help="group Python allocations by line")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--tracebacks", action="store_true", help="group by whole traceback")
    args = p.parse_args()
    asyncio.run(measure(args.connections, args.trace or args.tracebacks, args.top, args.tracebacks))


if __name__ == "__main__":
    main()
