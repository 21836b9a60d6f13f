"""The write path of a WebSocket connection: frame once, coalesce, write directly.

Theory of operation. Everything the broker sends to a client (replies and
messages) goes through its ``Outbox`` instead of ``websockets``' ``send()``:
frames are appended to a list and, once per event-loop iteration, the
``Flusher`` writes each outbox's list with a single call. A burst of messages
therefore costs one system call per connection, not one per message, and
replies stay in order with messages. The outbox counts the bytes it holds plus
the transport's buffer; past ``max_backlog_bytes`` the connection is closed
with 1013 and nothing else is affected.

Framing happens here and only here. Server frames are unmasked, so the bytes
of one message's frame are the same for every uncompressed connection: the hub
hands every recipient the *same* payload object, and the outbox frames it once
(``_shared`` keeps the last payload and its frame) and writes those same
bytes everywhere. A connection that negotiated compression cannot share them
and frames its own through ``websockets``.

The write itself skips asyncio's ``transport.write`` while that is safe: when
the transport's buffer is empty, the outbox calls the socket's ``send``
directly, and only what the kernel did not take goes to the transport, which
then keeps it in order. Fan-out is one small write per connection, so the
Python around each system call is most of what the broker itself costs
(measured: 11.4 against 10.1 µs of CPU per delivery, commit a964af8).

What this relies on, and how it is kept honest. ``websockets`` (pinned to the
major version this was verified against) writes to the transport, and changes
the connection's state, only on paths that end in its ``send_data`` or
``connection_lost``; ``server.WsConnection`` overrides both to call
``Outbox.sync``, so the outbox knows, without asking on every write, whether
the transport holds bytes and whether the connection is open.
``tests/test_outbox.py`` fails if a ``websockets`` write ever bypasses those
hooks: it reads every write in ``websockets``' source and records every write
a live connection makes. The direct ``send`` is used only on asyncio's own
selector transport (``_direct_send``); uvloop and TLS transports always go
through ``transport.write``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from websockets.protocol import State

from broker.metrics import Metrics
from broker.session import Session
from broker.wsframe import text_frame

if TYPE_CHECKING:
    from broker.hub import Peer

__all__ = ["Flusher", "Outbox"]

log = logging.getLogger(__name__)

_OPEN = State.OPEN

#: Seconds a slow consumer gets to read its backlog and the 1013 close frame.
SLOW_CONSUMER_CLOSE_TIMEOUT = 60.0

# The last shared payload and its frame: fan-out hands the same object to every
# recipient in a row, so all but the first find it here (one identity check).
_shared: list[bytes] = [b"", text_frame(b"")]


class Flusher:
    """Writes every outbox that has queued frames, once per loop iteration."""

    def __init__(self) -> None:
        self._dirty: list[Outbox] = []
        self._scheduled = False

    def mark(self, outbox: Outbox) -> None:
        """Schedule ``outbox`` for the next flush."""
        self._dirty.append(outbox)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write everything queued now (also called before a shutdown)."""
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for outbox in dirty:
            outbox.flush()


class Outbox:
    """One client's side of the broker: its session, its queued frames, how it closes.

    This is the ``Peer`` the node and the hub talk to for a WebSocket client.
    ``ws`` is the ``websockets`` connection (``server.WsConnection``), whose
    ``send_data`` and ``connection_lost`` call ``sync``.
    """

    __slots__ = (
        "_buffered", "_cap", "_closer", "_closing", "_compressed", "_flusher", "_frames",
        "_metrics", "_open", "_queued", "_send", "_transport", "session", "ws",
    )  # fmt: skip

    def __init__(
        self,
        ws: Any,
        session: Session,
        flusher: Flusher,
        max_backlog_bytes: int,
        metrics: Metrics,
    ) -> None:
        self.ws = ws
        self.session = session
        self._flusher = flusher
        self._metrics = metrics
        self._cap = max_backlog_bytes
        self._transport = ws.transport
        self._compressed = bool(ws.protocol.extensions)
        self._send = None if self._compressed else _direct_send(self._transport)
        self._frames: list[bytes] = []
        self._queued = 0  # bytes in _frames
        self._buffered = 0  # bytes in the transport's buffer, as of the last look
        self._open = True  # websockets' state is OPEN, as of the last look
        self._closing = False
        self._closer: asyncio.Task[None] | None = None
        self.sync()
        ws.outbox = self

    def deliver(self, payload: bytes) -> None:
        """Queue a message frame whose ``payload`` object is shared by every recipient.

        Never blocks or raises: a connection that cannot keep up closes itself.
        """
        # The hot path of fan-out: inlined on purpose (a call costs ~60 ns here).
        if self._closing:
            return
        if self._compressed:
            frame = payload
        else:
            shared = _shared
            if shared[0] is payload:
                frame = shared[1]
            else:
                frame = shared[1] = text_frame(payload)
                shared[0] = payload
        frames = self._frames
        frames.append(frame)
        self._queued += len(frame)
        if self._queued + self._buffered > self._cap and self._over_cap():
            return
        if len(frames) == 1:
            self._flusher.mark(self)

    def send(self, payload: bytes) -> None:
        """Queue a reply (the JSON bytes of one frame), in order with messages."""
        if self._closing:
            return
        frame = payload if self._compressed else text_frame(payload)
        frames = self._frames
        frames.append(frame)
        self._queued += len(frame)
        if self._queued + self._buffered > self._cap and self._over_cap():
            return
        if len(frames) == 1:
            self._flusher.mark(self)

    def sync(self) -> None:
        """Look again at the transport's buffer and the connection's state.

        Called whenever ``websockets`` may have written or changed state; a
        write of ours that did not go straight to the socket re-reads the
        buffer itself (``flush``), as the state cannot have changed.
        """
        self._open = self.ws.protocol.state is _OPEN
        self._buffered = self._transport.get_write_buffer_size()

    def flush(self) -> None:
        """Write what is queued with one call. Called by the flusher."""
        frames = self._frames
        if not frames:
            return
        self._queued = 0
        if not self._open:
            frames.clear()
            return  # closing: the peer will not read these any more
        try:
            if self._compressed:
                payloads = frames.copy()
                frames.clear()
                for payload in payloads:
                    self.ws.protocol.send_text(payload)
                self.ws.send_data()  # syncs
            else:
                data = frames[0] if len(frames) == 1 else b"".join(frames)
                # Emptied, not replaced: a new list per write is a garbage-collected
                # object made and freed per delivery.
                frames.clear()
                self._metrics.bytes_sent += len(data)
                send = self._send
                if send is not None and not self._buffered:
                    try:
                        sent = send(data)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError:
                        sent = 0  # the transport meets it again below and closes
                    if sent == len(data):
                        return
                    data = data[sent:]
                self._transport.write(data)
                self._buffered = self._transport.get_write_buffer_size()
        except Exception:
            log.exception("write failed; closing the connection")
            self.close(1011, "write failed")
            return
        if self._buffered > self._cap:
            self._over_cap()

    def close(self, code: int, reason: str) -> None:
        """Write what is queued, then start the closing handshake; returns at once."""
        if self._closing:
            return
        self.flush()
        if self._closing:
            return  # the flush found a slow consumer and is closing it already
        self._closing = True
        self._closer = asyncio.get_running_loop().create_task(self.ws.close(code, reason))

    async def wait_closed(self) -> None:
        """Wait for a close this outbox started (owned by the connection's handler)."""
        if self._closer is not None:
            await self._closer

    def _over_cap(self) -> bool:
        """Close a slow consumer; False if the transport has drained meanwhile."""
        self._buffered = self._transport.get_write_buffer_size()
        backlog = self._queued + self._buffered
        if backlog <= self._cap:
            return False
        self._frames.clear()
        self._queued = 0
        self._metrics.slow_consumer_disconnects += 1
        log.warning(
            "slow consumer %s: %d bytes unsent, over the %d-byte cap; closing with 1013",
            peer_name(self.ws),
            backlog,
            self._cap,
        )
        self._closing = True
        # The close frame waits behind what the socket already holds: give a
        # client that still reads the time to get to it and see 1013 rather
        # than an abort (1006) after the usual close_timeout.
        self.ws.close_timeout = max(self.ws.close_timeout or 0.0, SLOW_CONSUMER_CLOSE_TIMEOUT)
        self._closer = asyncio.get_running_loop().create_task(
            self.ws.close(1013, f"slow consumer: backlog over {self._cap} bytes")
        )
        return True


def _direct_send(transport: asyncio.BaseTransport) -> Callable[[bytes], int] | None:
    """Return the socket's ``send`` if ``transport`` is asyncio's plain socket transport.

    Only there is it known that the transport writes nothing of its own and
    holds back only what is in its buffer. Other transports (uvloop's, TLS)
    are always written through ``transport.write``.
    """
    if type(transport).__module__ != "asyncio.selector_events":
        return None
    sock = getattr(transport, "_sock", None)
    send = getattr(sock, "send", None)
    return send if callable(send) else None


def peer_name(ws: Any) -> str:
    """``host:port`` of the connection's remote end, for log lines."""
    try:
        host, port = ws.remote_address[:2]
    except (TypeError, ValueError):
        return "unknown"
    return f"{host}:{port}"


if TYPE_CHECKING:

    def _is_a_peer(outbox: Outbox) -> Peer:
        return outbox  # mypy checks Outbox against the hub's Peer protocol here
