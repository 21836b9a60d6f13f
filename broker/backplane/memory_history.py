"""History and idempotency keys kept in this process's memory (pure, no I/O).

What the memory backplane keeps per channel with history: its epoch (random,
made when the channel is first seen, so a restarted process starts a new one),
its latest offset, and a ring of the last messages. Bounded three ways:

* per channel, by the rule's ``size`` (a ring) and ``ttl`` (older entries are
  not returned, and are dropped as new ones come);
* in total, by ``max_bytes``: past it, the oldest entries of the channel
  published to least recently are dropped first;
* in channels, by ``meta_ttl``: a channel idle that long is forgotten whole
  (its next publish starts a new epoch), and by ``max_channels``.

Idempotency keys are remembered per channel for ``window`` seconds, at most
``max_keys`` of them (the oldest forgotten first).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from broker.history import HistoryPolicy, HistoryRead, new_epoch
from broker.position import Position, Published

__all__ = ["IdempotencyKeys", "MemoryHistory"]


class _Log:
    __slots__ = ("bytes", "entries", "epoch", "top", "touched")

    def __init__(self, epoch: str, now: float) -> None:
        self.epoch = epoch
        self.top = 0
        # Made on the first append: an empty deque costs 760 bytes, and a
        # channel that is subscribed to but never published to keeps none.
        self.entries: deque[tuple[int, bytes, float]] | tuple[()] = ()
        self.bytes = 0
        self.touched = now


class MemoryHistory:
    """Per-channel offsets, epochs and kept messages; see the module docstring."""

    def __init__(
        self,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        meta_ttl: float = 86400.0,
        max_channels: int = 1_000_000,
    ) -> None:
        self.max_bytes = max_bytes
        self.meta_ttl = meta_ttl
        self.max_channels = max_channels
        self.bytes = 0
        # Least recently published first: where the total budget is taken from.
        self._logs: OrderedDict[str, _Log] = OrderedDict()

    def __len__(self) -> int:
        return len(self._logs)

    def append(self, channel: str, data: bytes, policy: HistoryPolicy, now: float) -> Position:
        """Give ``data`` the channel's next offset and keep it; return its position."""
        log = self._log(channel, now)
        self._logs.move_to_end(channel)
        log.top += 1
        log.touched = now
        entries = log.entries
        if not isinstance(entries, deque):
            entries = log.entries = deque()
        entries.append((log.top, data, now))
        log.bytes += len(data)
        self.bytes += len(data)
        horizon = now - policy.ttl
        while entries and (len(entries) > policy.size or entries[0][2] < horizon):
            self._drop_oldest(log)
        if self.bytes > self.max_bytes:
            self._shrink()
        return Position(log.top, log.epoch)

    def read(
        self,
        channel: str,
        policy: HistoryPolicy,
        now: float,
        *,
        after: int | None = None,
        last: int | None = None,
    ) -> HistoryRead:
        """The channel's position, and the entries after ``after`` or the ``last`` ones."""
        log = self._log(channel, now)
        horizon = now - policy.ttl
        kept = [(offset, data) for offset, data, at in log.entries if at >= horizon]
        if after is not None:
            wanted = [entry for entry in kept if entry[0] > after]
            # Complete when nothing after ``after`` is missing from what is kept;
            # else nothing is returned: never a partial answer.
            if after >= log.top or (wanted and wanted[0][0] == after + 1):
                return HistoryRead(log.epoch, log.top, tuple(wanted))
            return HistoryRead(log.epoch, log.top, (), complete=False)
        if last is not None:
            return HistoryRead(log.epoch, log.top, tuple(kept[-last:]))
        return HistoryRead(log.epoch, log.top)

    def expire(self, now: float) -> int:
        """Forget channels idle for ``meta_ttl``; return how many. Call now and then."""
        gone = [name for name, log in self._logs.items() if now - log.touched > self.meta_ttl]
        for name in gone:
            self._forget(name)
        return len(gone)

    def _log(self, channel: str, now: float) -> _Log:
        log = self._logs.get(channel)
        if log is not None and now - log.touched > self.meta_ttl:
            self._forget(channel)
            log = None
        if log is None:
            if len(self._logs) >= self.max_channels:
                self._forget(next(iter(self._logs)))
            log = self._logs[channel] = _Log(new_epoch(), now)
        return log

    def _drop_oldest(self, log: _Log) -> None:
        assert isinstance(log.entries, deque)  # only called when it holds entries
        _, data, _ = log.entries.popleft()
        log.bytes -= len(data)
        self.bytes -= len(data)

    def _shrink(self) -> None:
        for log in self._logs.values():
            while log.entries and self.bytes > self.max_bytes:
                self._drop_oldest(log)
            if self.bytes <= self.max_bytes:
                return

    def _forget(self, channel: str) -> None:
        log = self._logs.pop(channel)
        self.bytes -= log.bytes


class IdempotencyKeys:
    """Publish keys seen in the last ``window`` seconds, with what each publish got."""

    def __init__(self, window: float = 120.0, max_keys: int = 1_000_000) -> None:
        self.window = window
        self.max_keys = max_keys
        self._seen: OrderedDict[tuple[str, str], tuple[float, Published]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def get(self, channel: str, key: str, now: float) -> Published | None:
        """The first publish's result if ``key`` was used on ``channel`` within the window."""
        self._expire(now)
        entry = self._seen.get((channel, key))
        return None if entry is None else entry[1]

    def put(self, channel: str, key: str, published: Published, now: float) -> None:
        self._seen[(channel, key)] = (now, published)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)

    def _expire(self, now: float) -> None:
        seen = self._seen
        while seen:
            first = next(iter(seen.values()))
            if now - first[0] <= self.window:
                return
            seen.popitem(last=False)
