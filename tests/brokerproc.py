"""Run a real broker process for a test: free ports, readiness, stop, kill, restart.

::

    with BrokerProcess() as broker:          # started and ready
        connect(broker.ws_url) ...
        broker.restart(kill=True)            # same ports, ready again

The process runs ``python -m broker serve --host 127.0.0.1 --port P
--http-port Q --log-level L`` plus any extra arguments, in its own process
group, with its output in a log file whose tail is shown when it fails to
start. ``BROKER_SERVE_COMMAND`` (split like a shell would) replaces
``python -m broker serve``, to run the suite against another build of the
broker. Async tests should use the ``a``-prefixed methods, which run the
blocking waits in a thread so the event loop (and the clients under test)
keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = [
    "BrokerProcess",
    "BrokerStartError",
    "free_port",
    "free_ports",
    "http_get",
    "wait_until",
]

REPO = Path(__file__).resolve().parent.parent


class BrokerStartError(RuntimeError):
    """The broker did not become ready; the message ends with its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free TCP ports (held open together while chosen, so never equal)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``url``; return (status, body). Raise OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), bytes(exc.read())


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.05,
    message: str = "condition",
) -> None:
    """Poll ``predicate`` until it is true; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not reached within {timeout:g} s")
        time.sleep(interval)


class BrokerProcess:
    """One broker process on fixed ports, which survive restarts."""

    def __init__(
        self,
        *args: str,
        host: str = "127.0.0.1",
        port: int | None = None,
        http_port: int | None = None,
        log_level: str = "info",
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 20.0,
        check_http: bool = True,
        command: Sequence[str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.host = host
        ws_free, http_free = free_ports(2, host)  # two calls to free_port may agree
        self.port = port if port is not None else ws_free
        self.http_port = http_port if http_port is not None else http_free
        self.args = args
        self.log_level = log_level
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.check_http = check_http
        if command is None:
            override = os.environ.get("BROKER_SERVE_COMMAND")
            command = (
                shlex.split(override) if override else [sys.executable, "-m", "broker", "serve"]
            )
        self.command = list(command)
        self.cwd = cwd or REPO
        self.log_path = Path(tempfile.mkstemp(prefix="broker-", suffix=".log")[1])
        self._log: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        #: How many times the process was started.
        self.starts = 0

    def __repr__(self) -> str:
        state = f"pid {self._proc.pid}" if self.running and self._proc else "stopped"
        return f"<BrokerProcess {self.ws_url} {state}>"

    # -- addresses ---------------------------------------------------------------

    @property
    def ws_url(self) -> str:
        """``ws://host:port/ws``."""
        return f"ws://{self.host}:{self.port}/ws"

    @property
    def base_url(self) -> str:
        """``http://host:port``: the public port (WebSocket, /healthz, /client, /demo)."""
        return f"http://{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        """``http://host:http_port``: the service API (/publish, /readyz, /metrics)."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """Everything the process (all its starts) wrote so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start the process and wait until it is ready; raise BrokerStartError if not."""
        if self.running:
            raise RuntimeError("the broker is already running")
        argv = [
            *self.command,
            "--host", self.host,
            "--port", str(self.port),
            "--http-port", str(self.http_port),
            "--log-level", self.log_level,
            *self.args,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"--- start {self.starts + 1}: {shlex.join(argv)}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            argv,
            cwd=self.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so kill() reaches any workers
        )
        self.starts += 1
        try:
            self.wait_ready(self.startup_timeout)
        except BaseException:
            self.kill()
            raise

    def wait_ready(self, timeout: float) -> None:
        """Wait until ``/healthz`` answers 200 on the public port (and the service port)."""
        urls = [f"{self.base_url}/healthz"]
        if self.check_http:
            urls.append(f"{self.http_url}/healthz")
        deadline = time.monotonic() + timeout
        for url in urls:
            while True:
                if not self.running:
                    raise BrokerStartError(self._failure(f"the broker exited (code {self.code})"))
                try:
                    status, _ = http_get(url, timeout=1.0)
                    if status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() >= deadline:
                    raise BrokerStartError(self._failure(f"{url} not ready within {timeout:g} s"))
                time.sleep(0.05)

    @property
    def code(self) -> int | None:
        """The exit status once the process has ended."""
        return self._proc.poll() if self._proc is not None else None

    def stop(self, timeout: float = 10.0) -> int | None:
        """Send SIGTERM, wait up to ``timeout`` seconds (then SIGKILL); return the exit status."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                proc.wait(5.0)
        self._kill_group()  # leftovers of the group, if any
        self._close_log()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group at once (no clean shutdown) and reap it."""
        proc = self._proc
        if proc is None:
            return
        self._kill_group()
        proc.wait(5.0)
        self._close_log()

    def restart(self, *, kill: bool = False, down_for: float = 0.0) -> None:
        """Stop (SIGTERM, or SIGKILL if ``kill``), wait ``down_for`` s, start on the same ports."""
        if kill:
            self.kill()
        else:
            self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def _kill_group(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _failure(self, what: str) -> str:
        tail = self.log_text()[-4000:]
        return f"{what}\n--- broker log ({self.log_path}) ---\n{tail}"

    # -- async wrappers --------------------------------------------------------------

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self, timeout: float = 10.0) -> int | None:
        return await asyncio.to_thread(self.stop, timeout)

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    async def arestart(self, *, kill: bool = False, down_for: float = 0.0) -> None:
        await asyncio.to_thread(self.restart, kill=kill, down_for=down_for)

    # -- context manager ---------------------------------------------------------------

    def __enter__(self) -> BrokerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the process if it runs and remove the log file."""
        self.stop()
        self.log_path.unlink(missing_ok=True)


@asynccontextmanager
async def running(*brokers: BrokerProcess) -> AsyncIterator[None]:
    """Start ``brokers`` side by side; stop them on exit, showing their logs on failure."""
    try:
        results = await asyncio.gather(*(b.astart() for b in brokers), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        yield
    except BaseException:
        for b in brokers:
            print(f"--- log of {b!r} ---\n{b.log_text()[-6000:]}")
        raise
    finally:
        await asyncio.gather(*(asyncio.to_thread(b.close) for b in brokers))
