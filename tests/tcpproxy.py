"""A TCP proxy for fault injection: pause the traffic, or cut every connection.

::

    async with TcpProxy("127.0.0.1", broker.port) as proxy:
        connect(f"ws://127.0.0.1:{proxy.port}/ws") ...
        proxy.pause()        # bytes stop flowing both ways: a dead link
        proxy.pause(upstream=False)  # only the answers stop: requests still arrive
        proxy.resume()
        await proxy.cut()    # every connection is reset: a network blink
"""

from __future__ import annotations

import asyncio
from types import TracebackType

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forward ``127.0.0.1:port`` to ``(target_host, target_port)``, with faults on demand."""

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self._server: asyncio.Server | None = None
        # Bytes flow towards the target (upstream) and back (downstream) while set.
        self._up = asyncio.Event()
        self._down = asyncio.Event()
        self._up.set()
        self._down.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Connections accepted so far.
        self.accepted = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def pause(self, *, upstream: bool = True, downstream: bool = True) -> None:
        """Stop forwarding bytes (connections stay open, nothing gets through).

        ``upstream=False`` keeps forwarding what the client sends and holds
        back only what comes back; ``downstream=False`` the other way round.
        """
        if upstream:
            self._up.clear()
        if downstream:
            self._down.clear()

    def resume(self) -> None:
        self._up.set()
        self._down.set()

    async def cut(self) -> None:
        """Reset every open connection (new ones are still accepted)."""
        for writer in list(self._writers):
            writer.transport.abort()
        await self._drain_tasks()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.resume()
        await self.cut()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _drain_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for src, dst, flowing in ((reader, up_writer, self._up), (up_reader, writer, self._down)):
            task = asyncio.get_running_loop().create_task(
                self._pump(src, dst, flowing, writer, up_writer)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        flowing: asyncio.Event,
        *ends: asyncio.StreamWriter,
    ) -> None:
        try:
            while data := await src.read(65536):
                await flowing.wait()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            for end in ends:
                self._writers.discard(end)
                end.transport.abort()
