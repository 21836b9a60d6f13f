"""``broker serve --workers N``: a parent that runs and supervises N worker processes.

Each worker is an ordinary ``broker serve`` process on the same ports with
SO_REUSEPORT, so the kernel spreads connections across them; the Redis
backplane makes them one broker. The parent restarts a worker that dies
(with a capped backoff if it keeps dying), forwards SIGTERM/SIGINT to every
worker for a graceful shutdown, and exits 0 once they all have.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time

from broker.settings import ENV_PREFIX, Settings

log = logging.getLogger("broker.workers")

#: Extra seconds the parent waits past the workers' own shutdown deadline.
GRACE = 5.0
RESTART_BACKOFF_MAX = 10.0
#: A worker failing within this many seconds of its first start is not restarted.
FIRST_START = 5.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux for SIGTERM if the supervisor dies.

    Without it, workers of a supervisor killed with SIGKILL would go on serving
    the port unsupervised. Elsewhere this is a no-op.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def check_ports_free(settings: Settings) -> None:
    """Bind both ports once without SO_REUSEPORT; raise ``OSError`` if either is taken.

    With SO_REUSEPORT a second supervisor on the same ports would silently
    share the traffic; this makes it fail like a single process does.
    """
    for host, port in ((settings.host, settings.port), (settings.http_host, settings.http_port)):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))


def worker_environment(settings: Settings, index: int) -> dict[str, str]:
    """The environment of one worker: every resolved setting, as ``BROKER_*`` variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    for name, value in settings.model_dump().items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        env[ENV_PREFIX + name.upper()] = str(value)
    env[ENV_PREFIX + "WORKERS"] = "1"
    env[ENV_PREFIX + "REUSE_PORT"] = "true"
    env[ENV_PREFIX + "WORKER_INDEX"] = str(index)
    return env


class Supervisor:
    """Keeps ``settings.workers`` worker processes running until told to stop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = asyncio.Event()
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self.failed = False

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker",
            "serve",
            env=worker_environment(self.settings, index),
            preexec_fn=_die_with_parent,
        )
        self._procs[index] = proc
        log.info("worker %d started (pid %d)", index, proc.pid)
        return proc

    async def _keep(self, index: int) -> None:
        """Run worker ``index``, restarting it whenever it dies unexpectedly."""
        backoff = 0.5
        first = True
        while not self.stopping.is_set():
            started = time.monotonic()
            proc = await self._spawn(index)
            code = await proc.wait()
            if self.stopping.is_set():
                log.info("worker %d exited with %d", index, code)
                return
            if code == 2 or (first and code > 0 and time.monotonic() - started < FIRST_START):
                # A configuration error, or a worker that failed by itself right
                # after its first start (a port taken, Redis URL refused):
                # restarting would fail the same way. Killed by a signal is a crash.
                log.error("worker %d could not start (exit %d); stopping all", index, code)
                self.failed = True
                self.stopping.set()
                return
            first = False
            if time.monotonic() - started > 30:
                backoff = 0.5  # it ran fine for a while: restart at once
            log.log(
                logging.INFO if code == 0 else logging.ERROR,
                "worker %d (pid %d) exited with %d; restarting in %.1fs",
                index,
                proc.pid,
                code,
                backoff,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)

    def _forward(self, signum: int) -> None:
        for proc in self._procs.values():
            if proc.returncode is None:
                proc.send_signal(signum)

    async def run(self) -> int:
        """Supervise until SIGTERM/SIGINT; returns the exit status (0 if all stopped)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        log.info(
            "supervising %d workers on ports %d and %d",
            self.settings.workers,
            self.settings.port,
            self.settings.http_port,
        )
        keepers = [asyncio.create_task(self._keep(i)) for i in range(self.settings.workers)]
        await self.stopping.wait()
        log.info("stopping %d workers", len(self._procs))
        self._forward(signal.SIGTERM)
        deadline = self.settings.shutdown_timeout + GRACE
        _, pending = await asyncio.wait(keepers, timeout=deadline)
        status = 0
        if pending:
            log.warning("workers still running after %.1fs; killing them", deadline)
            self._forward(signal.SIGKILL)
            await asyncio.wait(pending, timeout=GRACE)
            for task in pending:
                task.cancel()
            status = 1
        for proc in self._procs.values():
            if proc.returncode not in (0, None):
                status = 1
        log.info("all workers stopped")
        return 2 if self.failed else status


def supervise(settings: Settings) -> int:
    """Run the supervisor in its own event loop; returns the exit status."""
    try:
        check_ports_free(settings)
    except OSError as exc:
        print(f"broker: cannot serve: {exc}", file=sys.stderr)
        return 1
    return asyncio.run(Supervisor(settings).run())
