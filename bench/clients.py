"""Benchmark clients, built so that the load generator costs far less per frame than a server.

Theory of operation. A fan-out server spends ~10 µs per delivered frame (see
shared FACTS); a client that wakes up, reads and parses every frame in Python
spends about as much, and on a 2-core machine the figures would then measure
the client. So there are two kinds of client:

* ``RawSub`` — the subscriber of throughput and memory runs: a small
  WebSocket client on a plain asyncio ``Protocol`` (uvloop's transport, in C).
  During setup it parses frames fully. Once counting it does no per-frame work
  in Python at all: every message's data carries ``MARKER`` once, and a read
  buffer's messages are ``bytes.count(MARKER)`` (memchr speed; a marker split
  across two reads is caught by re-checking the seam). Walking frame headers
  in Python instead cost ~0.35 µs a frame, as much as a coalescing server
  spends per delivery. It *reads in batches*: after each read it pauses
  reading, and the fleet's ticker resumes every paused socket every
  few tens of ms (see ``loadgen.throughput``), so one read carries many frames.

  The price is that counting mode does not track frame boundaries, so server
  pings are found by their header byte: message payloads are ASCII JSON, where
  a byte >= 0x80 can only be part of a frame header, and ``0x89`` after the
  closing ``}``/``]`` of a message (or at the start of the stream) followed by
  a length <= 125 is a ping, answered with its pong. A missed ping is loud, not
  silent: the server drops the connection and the run reports it.
* ``Conn`` — a picows client, used where every frame must be parsed anyway:
  the publisher (replies) and latency subscribers (timestamps).

Both expose the same small surface (``send``, ``recv``, ``request``, ``count``,
``expected``, ``closed``, ``close``), which ``Fleet`` and the scenarios use.
Client frames are masked with an all-zero key: the RFC asks clients to mask,
servers only check that the mask bit is set, and a zero key costs nothing.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import os
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.dialects import (
    AuthJsonDialect,
    BenchError,
    Dialect,
    JsonDialect,
    SocketIODialect,
    mint_tokens,
)

__all__ = [
    "AuthJsonDialect",
    "BenchError",
    "Conn",
    "Dialect",
    "Fleet",
    "JsonDialect",
    "Publisher",
    "RawSub",
    "SocketIODialect",
    "connect",
    "connect_raw",
    "mint_tokens",
    "split_frames",
]

# Every published message carries MARKER exactly once, inside its data, which
# servers relay verbatim; counting subscribers count MARKER occurrences (see RawSub).
MARKER = b"~bench-msg~"
PAD = MARKER.decode() + "x" * 47  # with seq and ts, a message's data serializes to ~100 bytes
MARKER_SEAM = len(MARKER) - 1
PING_BYTE = b"\x89"
FRAME_ENDS = (b"}", b"]", b"")  # the last byte of a JSON text frame, or no byte yet
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HANDSHAKE = 16384


# --------------------------------------------------------------------------- connections


class Inbox:
    """Setup-time request/reply plumbing shared by both client kinds."""

    dialect: Dialect
    closed: bool

    def _init_inbox(self) -> None:
        self._inbox: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def send(self, payload: bytes) -> None:
        raise NotImplementedError

    async def recv(self) -> bytes:
        """Return the next text payload received during setup."""
        while not self._inbox:
            if self.closed:
                raise BenchError("connection closed during setup")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._inbox.popleft()

    async def request(self, payload: bytes, req_id: int) -> None:
        """Send a request and wait for its ok; raise BenchError on an error reply."""
        self.send(payload)
        while True:
            rep = self.dialect.reply(await self.recv())
            # An id of None answers whatever was asked last (NATS's PONG carries none).
            if rep is not None and (rep[0] == req_id or rep[0] is None):
                if rep[1] is not None:
                    raise BenchError(f"request {req_id} failed: {rep[1]}")
                return

    def drain_inbox(self) -> int:
        """Drop queued payloads, returning how many were messages (raced the last ok)."""
        n = sum(self.dialect.message_data(p) is not None for p in self._inbox)
        self._inbox.clear()
        return n


class Conn(WSListener, Inbox):  # type: ignore[misc]
    """A picows connection: an inbox during setup, then a hook or latency sampler.

    ``mode`` is ``"setup"`` (payloads queue for ``recv()``), ``"latency"``
    (note the receive time and keep the payload; parsing waits until the run is
    over, so one subscriber's parsing does not delay the next one's timestamp),
    or anything else with ``on_payload`` set (the publisher's reply handler).
    """

    def __init__(self, dialect: Dialect) -> None:
        super().__init__()
        self._init_inbox()
        self.dialect = dialect
        self.transport: WSTransport | None = None
        self.mode = "setup"
        self.count = 0
        self.expected = 0
        self.closed = False
        self.received: list[tuple[int, bytes]] = []  # latency mode: (receive ns, payload)
        self.on_payload: Callable[[bytes], None] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        self._wake()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        now = time.perf_counter_ns()
        if frame.msg_type != WSMsgType.TEXT and frame.msg_type != WSMsgType.BINARY:
            return  # picows answers pings itself; a close ends in on_ws_disconnected
        payload = frame.get_payload_as_bytes()
        if len(payload) < 4 and self.dialect.control(self, payload):
            return
        if self.mode == "latency":
            self.count += 1
            self.received.append((now, payload))
        elif self.on_payload is not None:
            self.on_payload(payload)
        else:
            self._inbox.append(payload)
            self._wake()

    def latencies(self, first_seq: int) -> list[int]:
        """Return the latencies (ns) of messages from ``first_seq`` on; drop non-messages."""
        out = []
        many = getattr(self.dialect, "messages_data", None)  # several messages per frame
        for t, payload in self.received:
            datas = many(payload) if many is not None else [self.dialect.message_data(payload)]
            datas = [d for d in datas if d is not None]
            self.count += len(datas) - 1
            out.extend(t - d["ts"] for d in datas if d["seq"] >= first_seq)
        return out

    def send(self, payload: bytes) -> None:
        """Send one text frame."""
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, payload)

    def close(self) -> None:
        """Drop the connection without waiting."""
        if self.transport is not None and not self.closed:
            self.transport.disconnect(graceful=False)


async def connect(dialect: Dialect, url: str) -> Conn:
    """Open one picows connection and run the dialect's handshake."""
    _, conn = await ws_connect(
        lambda: Conn(dialect),
        dialect.url(url),
        websocket_handshake_timeout=10,
        read_buffer_init_size=4096,
        # aiofastnet's pause/resume go through loop.add_reader in Python; uvloop's own
        # transport is cheaper for us.
        use_aiofastnet=False,
        extra_headers=dialect.headers() or None,
    )
    await dialect.handshake(conn)
    return conn  # type: ignore[no-any-return]


class RawSub(asyncio.Protocol, Inbox):
    """A minimal WebSocket client that counts text frames without a call per frame.

    Modes: ``"setup"`` parses every frame into the inbox; ``"count"`` counts
    markers (see the module docstring); ``"record"`` counts markers too, keeps
    every byte read for an exact check afterwards (``split_frames``), and
    notes when the count first reached ``expected`` (``done_at``): the
    recovery scenario's catch-up time, without parsing while it is measured.
    """

    def __init__(self, dialect: Dialect, fleet: Fleet, host: str, path: str) -> None:
        self._init_inbox()
        self.dialect = dialect
        self.fleet = fleet
        self.mode = "setup"
        self.count = 0
        self.seen = 0  # the part of count already folded into fleet.delivered
        self.paused_at = 0.0
        self.expected = 0
        self.closed = False
        self.done_at = 0.0  # record mode: perf_counter() when count reached expected
        self.chunks: list[bytes] = []  # record mode: everything read
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf = b""
        self._seam = b""  # counting: the last bytes of the previous read
        self._last = b""  # counting: the very last byte of the previous read
        self._ping_tail = b""  # counting: a ping frame cut by the end of a read
        self._upgraded = False
        key = base64.b64encode(os.urandom(16))
        self._accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        extra = "".join(f"{k}: {v}\r\n" for k, v in dialect.headers().items())
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        ).encode()

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(BenchError(f"connection lost during handshake: {exc}"))
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self.mode == "record":
            self.chunks.append(data)
            self._count(data)
            if not self.done_at and self.count >= self.expected:
                self.done_at = time.perf_counter()
            return
        if self.mode == "count":
            self._count(data)
            fleet = self.fleet
            if fleet.batching and self.transport is not None:
                self.transport.pause_reading()
                self.paused_at = fleet.now
                fleet.paused.append(self)
            return
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if not self._upgraded:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HANDSHAKE:
                    self._fail("handshake response too long")
                self._buf = data
                return
            head = data[:end].lower()
            if not head.startswith(b"http/1.1 101") or self._accept.lower() not in head:
                self._fail(f"handshake refused: {data[:end].splitlines()[0]!r}")
                return
            self._upgraded = True
            self.opened.set_result(None)
            data = data[end + 4 :]
        self._parse(data)

    # -- frames

    def _count(self, data: bytes) -> None:
        """Count the messages in ``data`` by their marker; answer any ping in it."""
        seam = self._seam
        count = data.count(MARKER)
        if seam:
            count += (seam + data[:MARKER_SEAM]).count(MARKER)
        self.count += count
        if len(data) >= MARKER_SEAM:
            self._seam = data[-MARKER_SEAM:]
        else:
            self._seam = (seam + data)[-MARKER_SEAM:]
        if self._ping_tail or PING_BYTE in data:
            self._pings(data)
        text_ping = self.dialect.text_ping
        if text_ping is not None and text_ping in data:
            for _ in range(data.count(text_ping)):
                self.dialect.control(self, text_ping[2:])
        self._last = data[-1:]

    def _pings(self, data: bytes) -> None:
        """Find ping frames in a counting-mode buffer by header byte and answer them."""
        buf = self._ping_tail + data
        before = self._last if not self._ping_tail else b"}"
        self._ping_tail = b""
        i = buf.find(PING_BYTE)
        while i >= 0:
            prev = buf[i - 1 : i] if i else before
            if prev in FRAME_ENDS:
                if i + 2 > len(buf):
                    self._ping_tail = buf[i:]
                    return
                size = buf[i + 1]
                if size <= 125:
                    if i + 2 + size > len(buf):
                        self._ping_tail = buf[i:]
                        return
                    self._write(0x8A, buf[i + 2 : i + 2 + size])
            i = buf.find(PING_BYTE, i + 1)

    def _parse(self, data: bytes) -> None:
        """Split ``data`` into frames and handle each (setup and teardown path)."""
        n = len(data)
        pos = 0
        while pos + 2 <= n:
            b1 = data[pos + 1]
            hdr = 2 if b1 < 126 else 4 if b1 == 126 else 10
            if pos + hdr > n:
                break
            size = b1 if b1 < 126 else int.from_bytes(data[pos + 2 : pos + hdr], "big")
            if pos + hdr + size > n:
                break
            if self._frame(data[pos], data[pos + hdr : pos + hdr + size]):
                self._inbox.append(data[pos + hdr : pos + hdr + size])
                self._wake()
            pos += hdr + size
        if pos < n:
            self._buf = data[pos:]

    def _frame(self, b0: int, payload: bytes) -> int:
        """Handle one frame off the fast path; return 1 if it is a message to keep or count."""
        opcode = b0 & 0x0F
        if not b0 & 0x80:
            self._fail("fragmented frames are not expected from these servers")
            return 0
        if opcode == 0x1 or opcode == 0x2:  # NATS sends its protocol in binary frames
            if len(payload) < 4 and self.dialect.control(self, payload):
                return 0
            return 1
        if opcode == 0x9:  # ping: answer with a pong carrying the same payload
            self._write(0x8A, payload)
        elif opcode == 0x8:  # close: echo it, the server will drop the TCP connection
            self._write(0x88, payload[:2])
            self.closed = True
            self._wake()
        return 0

    def _write(self, b0: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            hdr = bytes((b0, 0x80 | n))
        elif n < 65536:
            hdr = bytes((b0, 0xFE)) + n.to_bytes(2, "big")
        else:
            hdr = bytes((b0, 0xFF)) + n.to_bytes(8, "big")
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(hdr + b"\0\0\0\0" + payload)

    def _fail(self, why: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(BenchError(why))
        if self.transport is not None:
            self.transport.abort()

    # -- the common surface

    def send(self, payload: bytes) -> None:
        """Send one text frame."""
        self._write(0x81, payload)

    def resume(self) -> None:
        """Resume reading after a batching pause."""
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        """Drop the connection without waiting."""
        if self.transport is not None:
            self.transport.abort()


def split_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split server-to-client WebSocket bytes into ``(opcode, payload)``; a cut tail is dropped.

    For checks after a measurement (record mode), where speed does not matter.
    """
    out = []
    n, pos = len(data), 0
    while pos + 2 <= n:
        b1 = data[pos + 1] & 0x7F
        hdr = 2 if b1 < 126 else 4 if b1 == 126 else 10
        if pos + hdr > n:
            break
        size = b1 if b1 < 126 else int.from_bytes(data[pos + 2 : pos + hdr], "big")
        if pos + hdr + size > n:
            break
        out.append((data[pos] & 0x0F, data[pos + hdr : pos + hdr + size]))
        pos += hdr + size
    return out


async def connect_raw(dialect: Dialect, url: str, fleet: Fleet, timeout_s: float = 10.0) -> RawSub:
    """Open one ``RawSub`` and run the dialect's handshake."""
    u = urllib.parse.urlparse(dialect.url(url))
    host, port = u.hostname or "127.0.0.1", u.port or 80
    path = u.path + (f"?{u.query}" if u.query else "")
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        _, sub = await loop.create_connection(
            lambda: RawSub(dialect, fleet, f"{host}:{port}", path), host, port
        )
        try:
            await sub.opened
            await dialect.handshake(sub)
        except BaseException:
            sub.close()
            raise
    return sub


# --------------------------------------------------------------------------- fleet


@dataclass
class Fleet:
    """The subscriber connections of one run and the ticker that batches their reads."""

    dialect: Dialect
    batching: bool = True
    subs: list[Any] = field(default_factory=list)  # RawSub, or Conn for latency runs
    paused: collections.deque[RawSub] = field(default_factory=collections.deque)
    delivered: int = 0  # as of the last tick
    now: float = 0.0  # loop time of the last tick
    # The ticker runs `slots` times per read period and resumes only the readers
    # paused a period ago, so reads are spread evenly instead of arriving as one
    # burst that would leave the publisher (same event loop) unanswered meanwhile.
    slots: int = 8

    async def open(
        self,
        urls: Sequence[str],
        channels: Callable[[int], str | Sequence[str]],
        n: int,
        concurrency: int = 200,
        timeout_s: float = 180.0,
        picows: bool = False,
    ) -> None:
        """Connect ``n`` subscribers round-robin over ``urls``; ``i`` subscribes to ``channels(i)``.

        ``channels(i)`` is one channel, or several (a packed connection), each
        subscribed in turn with request ids 1, 2, ...

        At most ``concurrency`` handshakes are in progress at once, so 5,000
        connections do not reach the server as one burst of SYNs.
        """
        sem = asyncio.Semaphore(concurrency)
        subs: list[Any] = [None] * n

        async def one(i: int) -> None:
            async with sem:
                url = urls[i % len(urls)]
                sub = await (
                    connect(self.dialect, url) if picows else connect_raw(self.dialect, url, self)
                )
                subs[i] = sub
                chans = channels(i)
                for k, channel in enumerate([chans] if isinstance(chans, str) else chans, 1):
                    await sub.request(self.dialect.subscribe(channel, k), k)

        try:
            async with asyncio.timeout(timeout_s), asyncio.TaskGroup() as tg:
                for i in range(n):
                    tg.create_task(one(i))
        except BaseException:
            for s in subs:
                if s is not None:
                    s.close()
            raise
        self.subs = subs

    def start(self, mode: str) -> None:
        """Leave setup mode: every subscriber now counts (or samples latency)."""
        for s in self.subs:
            s.mode = mode
            s.count += s.drain_inbox()

    def tick(self, now: float, period: float) -> None:
        """Resume the readers paused at least a period ago (all if ``period`` is 0).

        Their new counts are folded into ``delivered``.
        """
        self.now = now
        cutoff = now - period * (self.slots - 1) / self.slots
        paused = self.paused
        delivered = self.delivered
        while paused and paused[0].paused_at <= cutoff:
            s = paused.popleft()
            delivered += s.count - s.seen
            s.seen = s.count
            s.resume()
        self.delivered = delivered

    def total(self) -> int:
        """Return the exact number of messages counted by all subscribers."""
        return sum(s.count for s in self.subs)

    def close(self) -> None:
        """Drop every subscriber connection."""
        for s in self.subs:
            s.close()
        self.subs = []
        self.paused.clear()

    def check(self) -> dict[str, int]:
        """Compare each subscriber's count with what it should have received."""
        lost = extra = short = closed = 0
        for s in self.subs:
            if s.count < s.expected:
                lost += s.expected - s.count
                short += 1
            elif s.count > s.expected:
                extra += s.count - s.expected
            closed += s.closed
        return {"lost": lost, "extra": extra, "subs_short": short, "subs_closed": closed}


# --------------------------------------------------------------------------- publisher


class Publisher:
    """One publishing connection; every publish carries an id and is answered by ok."""

    def __init__(self, conn: Conn, dialect: Dialect) -> None:
        self.conn = conn
        self.dialect = dialect
        self.sent = 0
        self.acked = 0
        self.errors: list[str] = []
        self.error_count = 0
        self.on_reply: Callable[[], None] | None = None
        self._idle: asyncio.Future[None] | None = None
        conn.on_payload = self._on_payload

    @property
    def inflight(self) -> int:
        """Publish requests sent whose reply has not come back yet."""
        return self.sent - self.acked - self.error_count

    def _on_payload(self, payload: bytes) -> None:
        many = getattr(self.dialect, "replies", None)  # several replies per frame (NATS)
        reps = many(payload) if many is not None else [self.dialect.reply(payload)]
        reps = [rep for rep in reps if rep is not None]
        if not reps:
            return
        for rep in reps:
            if rep[1] is None:
                self.acked += 1
            else:
                self.error_count += 1
                if len(self.errors) < 5:
                    self.errors.append(rep[1])
        if self.on_reply is not None:
            self.on_reply()
        if self._idle is not None and self.inflight == 0 and not self._idle.done():
            self._idle.set_result(None)

    def publish(self, channel: str, seq: int) -> None:
        """Send message ``seq`` to ``channel``, stamped with the send time."""
        self.sent += 1
        data = {"seq": seq, "ts": time.perf_counter_ns(), "pad": PAD}
        self.conn.send(self.dialect.publish(channel, data, self.sent))

    async def wait_idle(self, timeout_s: float) -> None:
        """Wait until every publish has its reply (bounded by ``timeout_s``)."""
        if self.inflight == 0:
            return
        self._idle = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle
        except TimeoutError:
            missing = self.inflight
            raise BenchError(f"{missing} publish replies missing after {timeout_s}s") from None
