"""``broker serve --workers N``: a parent that runs and supervises N worker processes.

Each worker is an ordinary ``broker serve`` process on the same ports with
SO_REUSEPORT, so the kernel spreads connections across them; the Redis
backplane makes them one broker. The parent restarts a worker that dies
(with a capped backoff if it keeps dying), forwards SIGTERM to every worker
(each drains: 1012 in batches) and SIGINT (each closes with 1001), and exits
0 once they all have.

The workers share their metrics through a directory the parent creates
(``metrics_dir``, see ``broker.snapshots``), which the parent reads too: it
logs one "ready: N workers" line once every worker reports ready, and when a
replaced worker is ready again it asks the others (SIGUSR1) to shed what
they hold above the average with 1012, so the newcomer does not stay empty
while the survivors carry its share. Clients reconnect within about a second
(the 1012 contract) and recover with ``since``, and SO_REUSEPORT spreads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

from broker.backoff import backoff_delay
from broker.config import WORKER_CONFIG, worker_config_json
from broker.settings import ENV_PREFIX, Settings

log = logging.getLogger(__name__)

#: Extra seconds the parent waits past the workers' own shutdown deadline.
GRACE = 5.0
#: Seconds before the first restart of a worker that died; doubled each time after.
RESTART_BACKOFF_MIN = 0.5
RESTART_BACKOFF_MAX = 10.0
#: A worker that ran this many seconds before dying is restarted after the shortest wait.
STABLE_RUN = 30.0
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


def restart_delay(restarts: int) -> float:
    """Seconds to wait before restart number ``restarts`` (1 is the first) of one worker.

    0.5 s, doubling up to 10 s: a worker that keeps dying does not spin, one
    that died once is back within half a second. No jitter: one supervisor has
    nobody to fall into step with, and the wait is logged and asserted as is.
    """
    return backoff_delay(restarts, base=RESTART_BACKOFF_MIN, cap=RESTART_BACKOFF_MAX, rand=None)


def check_ports_free(settings: Settings) -> None:
    """Bind both ports once without SO_REUSEPORT; raise ``OSError`` if either is taken.

    With SO_REUSEPORT a second supervisor on the same ports would silently
    share the traffic; this makes it fail like a single process does.
    """
    for host, port in ((settings.host, settings.port), (settings.http_host, settings.http_port)):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:  # name the address, as a single process's error does
                raise OSError(exc.errno, f"cannot bind {host}:{port}: {exc.strerror}") from None


def worker_environment(settings: Settings, index: int) -> dict[str, str]:
    """The environment of one worker: the resolved settings, whole, as one JSON value.

    One variable (``BROKER_WORKER_CONFIG``) rather than a string per setting, so
    lists, rules and secrets arrive exactly as the supervisor resolved them;
    ``BROKER_*`` variables of the supervisor's own environment are not passed on.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    update = {"workers": 1, "reuse_port": True, "worker_index": index}
    worker = settings.model_copy(update=update)
    env[WORKER_CONFIG] = worker_config_json(worker)
    return env


class Supervisor:
    """Keeps ``settings.workers`` worker processes running until told to stop."""

    def __init__(self, settings: Settings) -> None:
        self._metrics_dir = tempfile.mkdtemp(prefix="broker-metrics-")
        self.settings = settings.model_copy(update={"metrics_dir": self._metrics_dir})
        self.stopping = asyncio.Event()
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._replaced: set[int] = set()  # restarted workers not yet reported ready
        self._signal: int = signal.SIGTERM  # what stopping was asked with, passed on
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
        restarts = 0  # since the worker last ran for STABLE_RUN seconds
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
            self._replaced.add(index)
            if time.monotonic() - started > STABLE_RUN:
                restarts = 0  # it ran fine for a while: back to the shortest wait
            restarts += 1
            delay = restart_delay(restarts)
            log.log(
                logging.INFO if code == 0 else logging.ERROR,
                "worker %d (pid %d) exited with %d; restarting in %.1fs",
                index,
                proc.pid,
                code,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    def _forward(self, signum: int) -> None:
        for proc in self._procs.values():
            if proc.returncode is None:
                proc.send_signal(signum)

    async def run(self) -> int:
        """Supervise until SIGTERM/SIGINT; returns the exit status (0 if all stopped)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop, signum)
        log.info(
            "supervising %d workers on ports %d and %d",
            self.settings.workers,
            self.settings.port,
            self.settings.http_port,
        )
        keepers = [asyncio.create_task(self._keep(i)) for i in range(self.settings.workers)]
        watcher = asyncio.create_task(self._watch(), name="readiness")
        try:
            return await self._until_stopped(keepers)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _stop(self, signum: int) -> None:
        self._signal = signum
        self.stopping.set()

    async def _until_stopped(self, keepers: list[asyncio.Task[None]]) -> int:
        await self.stopping.wait()
        signum = self._signal
        log.info("stopping %d workers (%s)", len(self._procs), signal.Signals(signum).name)
        self._forward(signum)
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
            # -15: a worker signalled before it had installed its handlers (just
            # started) stops at once; that is a clean stop, not a failure.
            if proc.returncode not in (0, None, -signal.SIGTERM, -signal.SIGINT):
                status = 1
        log.info("all workers stopped")
        return 2 if self.failed else status

    async def _watch(self) -> None:
        """Log when all workers are ready; rebalance when a replaced one is."""
        announced = False
        while True:
            await asyncio.sleep(0.2)
            ready = self._ready_workers()
            if not announced and len(ready) == self.settings.workers:
                announced = True
                pids = ", ".join(str(self._procs[i].pid) for i in sorted(ready) if i in self._procs)
                log.info("ready: %d workers (pids %s)", len(ready), pids)
            for index in sorted(self._replaced & ready):
                self._replaced.discard(index)
                if not self.settings.rebalance_workers:
                    continue
                others = [
                    proc
                    for i, proc in self._procs.items()
                    if i != index and proc.returncode is None
                ]
                log.info(
                    "worker %d is back: asking %d others to shed their extra connections",
                    index,
                    len(others),
                )
                for proc in others:
                    proc.send_signal(signal.SIGUSR1)

    def _ready_workers(self) -> set[int]:
        """Workers whose latest snapshot says ready, from their current process."""
        ready = set()
        for index, proc in self._procs.items():
            if proc.returncode is not None:
                continue  # dead, its replacement not spawned yet: its file is stale
            path = os.path.join(self._metrics_dir, f"worker-{index}.json")
            try:
                with open(path, encoding="utf-8") as fh:
                    snapshot = json.load(fh)
            except (OSError, ValueError):
                continue
            if snapshot.get("info", {}).get("pid") == proc.pid and snapshot["gauges"]["ready"]:
                ready.add(index)
        return ready


def supervise(settings: Settings) -> int:
    """Run the supervisor in its own event loop; returns the exit status."""
    try:
        check_ports_free(settings)
    except OSError as exc:
        print(f"broker: cannot serve: {exc}", file=sys.stderr)
        return 1
    return asyncio.run(Supervisor(settings).run())
