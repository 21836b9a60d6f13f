"""What the benchmark runners share about servers: a free loopback port, "is it up?",
and the server processes they start and stop."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.dialects import BenchError

HOST = "127.0.0.1"  # the only address the benchmarks ever target


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports, held open together while chosen so none repeats."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


async def answers(port: int, path: bytes | None) -> bool:
    """Return whether ``port`` accepts a connection (and ``GET path`` answers 200)."""
    try:
        async with asyncio.timeout(2.0):
            r, w = await asyncio.open_connection(HOST, port)
            try:
                if path is None:
                    return True
                w.write(
                    b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                )
                status = await r.readline()
                return status.split(b" ")[1:2] == [b"200"]
            finally:
                w.close()
    except (OSError, TimeoutError, IndexError):
        return False


@dataclass
class Server:
    """A server process started under ``taskset``; stopped with SIGTERM, then SIGKILL."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    http_port: int = 0  # the broker's service port; 0 for servers without one

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    def check_alive(self) -> None:
        """Raise if the process has exited."""
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise BenchError(f"{self.name} exited with {self.proc.returncode}; log tail:\n{tail}")

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
