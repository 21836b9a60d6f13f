"""Pure helpers of the Redis Cluster backplane: buckets, hash slots, the slot map.

Nothing here does I/O; ``broker/backplane/redis_cluster.py`` is the thin part.

Buckets and shard channels
--------------------------

Sharded pub/sub (``SSUBSCRIBE``) has no pattern subscriptions. So every
broker channel falls into one of ``n`` *buckets*, chosen by the CRC-32 of its
first token, and a bucket ``i`` owns two kinds of shard channel, both hash-tagged
``{b<i>}`` so that Redis puts them (and the channel's history keys, which carry
the same tag) in one slot of one shard:

* ``<prefix>{b<i>}<channel>``: the channel alone, payload the single-Redis
  envelope of ``redis_wire``. An exact subscription subscribes this, so a
  process receives only the channels it asked for.
* ``<prefix>{b<i>}``: the bucket, payload ``<channel> <envelope>`` (channel
  names hold no space). A pattern subscribes this: one bucket when its first
  token is a literal (``sensors.>``, ``sensors.*.temp``), all ``n`` when it
  starts with ``*`` or ``>``; the process drops the channels no local pattern
  matches (``ChannelFilter``).

A publish goes to both, in one script, so the two copies are adjacent on a
subscriber's link (no confirmation can come between them): a process that
holds an exact subscription to a channel and a pattern matching it takes the
channel's copy and drops the bucket's (``Dispatcher``), exactly, also while
either subscription is being added or removed.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import NamedTuple

from broker.backplane.redis_wire import INTERNAL_MARK
from broker.channels import check_pattern, matches

__all__ = [
    "SLOTS",
    "Buckets",
    "ChannelFilter",
    "Node",
    "SlotMap",
    "is_exact",
    "key_slot",
    "parse_cluster_slots",
    "shard_target",
    "split_head",
]

#: Hash slots of a Redis Cluster.
SLOTS = 16384


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def key_slot(key: bytes) -> int:
    """The hash slot of ``key`` (CRC16/XMODEM mod 16384, honouring a ``{tag}``)."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    crc = 0
    for byte in key:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc % SLOTS


class Buckets:
    """Maps broker channels and patterns to ``count`` buckets, each one shard channel."""

    __slots__ = ("_cache", "count", "names", "prefix", "slots")

    _CACHE = 8192

    def __init__(self, prefix: bytes, count: int) -> None:
        if count < 1:
            raise ValueError(f"bucket count must be >= 1, not {count!r}")
        if b"{" in prefix or b"}" in prefix:
            raise ValueError("a cluster prefix must not hold '{' or '}' (hash tags)")
        self.prefix = prefix
        self.count = count
        #: The shard channel of each bucket.
        self.names = [b"%s{b%d}" % (prefix, i) for i in range(count)]
        #: The hash slot of each bucket (its shard channel's and its keys').
        self.slots = [key_slot(name) for name in self.names]
        self._cache: dict[str, int] = {}

    def of_channel(self, channel: str) -> int:
        """The bucket of a channel (by its first token); cached, it runs per publish."""
        try:
            return self._cache[channel]
        except KeyError:
            if len(self._cache) >= self._CACHE:
                self._cache.clear()
            first, _, _ = channel.partition(".")
            bucket = self._cache[channel] = zlib.crc32(first.encode()) % self.count
            return bucket

    def of_pattern(self, pattern: str) -> range | tuple[int]:
        """The buckets a subscription to ``pattern`` needs; raises ``BadChannel`` if invalid."""
        if not pattern.startswith(INTERNAL_MARK):
            check_pattern(pattern)
        first, _, _ = pattern.partition(".")
        if first in ("*", ">"):
            return range(self.count)
        return (self.of_channel(pattern),)

    def tag(self, channel: str) -> bytes:
        """The hash tag that puts a channel's keys in its bucket's slot: ``{b<i>}``."""
        return b"{b%d}" % self.of_channel(channel)

    def channel_name(self, channel: str) -> bytes:
        """The shard channel that carries ``channel`` alone: ``<prefix>{b<i>}<channel>``."""
        return self.names[self.of_channel(channel)] + channel.encode()


class ChannelFilter:
    """Whether a local pattern matches a channel that came through a bucket.

    A bucket carries every channel whose first token falls in it, so the
    receiver drops the ones no local pattern matches before they reach
    delivery. Exact subscriptions have shard channels of their own and are not
    kept here. Answers are cached per channel until the patterns change.
    """

    __slots__ = ("_cache", "_patterns")

    _CACHE = 8192

    def __init__(self) -> None:
        self._patterns: set[str] = set()
        self._cache: dict[str, bool] = {}

    def add(self, pattern: str) -> None:
        """Want the channels ``pattern`` matches (a pattern, not an exact channel)."""
        if pattern not in self._patterns:
            self._patterns.add(pattern)
            self._cache.clear()

    def discard(self, pattern: str) -> None:
        """Stop wanting ``pattern``."""
        if pattern in self._patterns:
            self._patterns.discard(pattern)
            self._cache.clear()

    def __call__(self, channel: str) -> bool:
        if not self._patterns:
            return False
        try:
            return self._cache[channel]
        except KeyError:
            if len(self._cache) >= self._CACHE:
                self._cache.clear()
            found = self._cache[channel] = any(matches(p, channel) for p in self._patterns)
            return found


def is_exact(pattern: str) -> bool:
    """Whether a subscription names one channel (its own shard channel) or is a pattern."""
    tokens = pattern.split(".")
    return pattern.startswith(INTERNAL_MARK) or ("*" not in tokens and tokens[-1] != ">")


def shard_target(prefix: bytes, name: bytes) -> bytes | None:
    """The channel a shard channel carries alone, or ``None`` for a bucket.

    ``ValueError`` when ``name`` is neither of ``prefix``'s shard channels.
    """
    end = name.find(b"}", len(prefix))
    if not name.startswith(prefix + b"{b") or end < 0:
        raise ValueError("not one of our shard channels")
    return name[end + 1 :] or None


def split_head(payload: bytes) -> tuple[bytes, bytes]:
    """``<channel> <envelope>`` to ``(channel, envelope)``; ``ValueError`` without a head."""
    end = payload.find(b" ", 0, 257)
    if end < 1:
        raise ValueError("shard payload without a channel")
    return payload[:end], payload[end + 1 :]


class Node(NamedTuple):
    """A cluster node's address, as the cluster announces it, and its id (if known)."""

    host: str
    port: int
    id: str = ""


class SlotMap(NamedTuple):
    """Which master serves each slot range, and the replicas the cluster knows."""

    ranges: tuple[tuple[int, int, Node], ...]
    replicas: tuple[Node, ...]

    def owner(self, slot: int) -> Node | None:
        for start, end, node in self.ranges:
            if start <= slot <= end:
                return node
        return None

    def masters(self) -> dict[Node, tuple[tuple[int, int], ...]]:
        """Each master and the slot ranges it serves."""
        out: dict[Node, list[tuple[int, int]]] = {}
        for start, end, node in self.ranges:
            out.setdefault(node, []).append((start, end))
        return {node: tuple(sorted(r)) for node, r in out.items()}

    def complete(self) -> bool:
        """Whether every slot has a master."""
        return sum(end - start + 1 for start, end, _ in self.ranges) == SLOTS

    def nodes(self) -> list[Node]:
        """Every node named, masters first: where to ask next time."""
        seen = dict.fromkeys(node for _, _, node in self.ranges)
        seen.update(dict.fromkeys(self.replicas))
        return list(seen)


def parse_cluster_slots(reply: object, asked: Node) -> SlotMap:
    """``CLUSTER SLOTS`` to a ``SlotMap``; an empty host means the node asked."""
    if not isinstance(reply, list):
        raise ValueError(f"unexpected CLUSTER SLOTS reply {str(reply)[:80]}")
    ranges = []
    replicas = []
    for entry in reply:
        if not isinstance(entry, list) or len(entry) < 3:
            raise ValueError(f"unexpected CLUSTER SLOTS entry {str(entry)[:80]}")
        start, end, *nodes = entry
        parsed = [_node(n, asked) for n in nodes]
        ranges.append((int(start), int(end), parsed[0]))
        replicas.extend(parsed[1:])
    return SlotMap(tuple(sorted(ranges)), tuple(dict.fromkeys(replicas)))


def _node(entry: object, asked: Node) -> Node:
    if not isinstance(entry, Sequence) or len(entry) < 2:
        raise ValueError(f"unexpected node in CLUSTER SLOTS {entry!r}")
    host = entry[0].decode() if isinstance(entry[0], bytes) else str(entry[0])
    node_id = entry[2] if len(entry) > 2 else b""
    node_id = node_id.decode() if isinstance(node_id, bytes) else str(node_id)
    return Node(host or asked.host, int(entry[1]), node_id)
