"""Pure helpers of the Redis Cluster backplane: buckets, hash slots, the slot map.

Nothing here does I/O; ``broker/backplane/redis_cluster.py`` is the thin part.

Buckets
-------

Sharded pub/sub (``SSUBSCRIBE``) has no pattern subscriptions, and one shard
channel per broker channel would make a pattern impossible to serve. So every
broker channel falls into one of ``n`` *buckets*, chosen by the CRC-32 of its
first token, and each bucket is one shard channel, ``<prefix>{b<i>}``. The
``{b<i>}`` is a hash tag: Redis puts the shard channel, and the channel's
history keys (which carry the same tag), in the slot of ``b<i>``, so a publish
with history is one script on one shard. The payload on the shard channel is
``<channel> <envelope>``: the real channel first (channel names hold no space),
then the single-Redis envelope of ``redis_wire``.

A pattern whose first token is a literal (``sensors.>``, ``sensors.*.temp``)
needs the one bucket of that token; a pattern starting with ``*`` or ``>``
needs all ``n``. A process receives every message of the buckets it holds and
drops the channels it does not want before delivery (``ChannelFilter``).
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
    "key_slot",
    "pack_spublish",
    "parse_cluster_slots",
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


class ChannelFilter:
    """Whether this process wants a channel, from the patterns it subscribed.

    A bucket carries every channel whose first token falls in it, so the
    receiver drops the ones no local subscription matches before they reach
    delivery. Answers are cached per channel until the patterns change.
    """

    __slots__ = ("_cache", "_exact", "_patterns")

    _CACHE = 8192

    def __init__(self) -> None:
        self._exact: set[str] = set()
        self._patterns: set[str] = set()
        self._cache: dict[str, bool] = {}

    def add(self, pattern: str) -> None:
        """Want ``pattern`` (an exact channel or a pattern)."""
        if _is_exact(pattern):
            self._exact.add(pattern)  # looked up before the cache: nothing to forget
        elif pattern not in self._patterns:
            self._patterns.add(pattern)
            self._cache.clear()

    def discard(self, pattern: str) -> None:
        """Stop wanting ``pattern``."""
        if _is_exact(pattern):
            self._exact.discard(pattern)
        elif pattern in self._patterns:
            self._patterns.discard(pattern)
            self._cache.clear()

    def __call__(self, channel: str) -> bool:
        if channel in self._exact:
            return True
        if not self._patterns:
            return False
        try:
            return self._cache[channel]
        except KeyError:
            if len(self._cache) >= self._CACHE:
                self._cache.clear()
            found = self._cache[channel] = any(matches(p, channel) for p in self._patterns)
            return found


def _is_exact(pattern: str) -> bool:
    tokens = pattern.split(".")
    return pattern.startswith(INTERNAL_MARK) or ("*" not in tokens and tokens[-1] != ">")


def split_head(payload: bytes) -> tuple[bytes, bytes]:
    """``<channel> <envelope>`` to ``(channel, envelope)``; ``ValueError`` without a head."""
    end = payload.find(b" ", 0, 257)
    if end < 1:
        raise ValueError("shard payload without a channel")
    return payload[:end], payload[end + 1 :]


def pack_spublish(shard_channel: bytes, channel: bytes, payload: bytes) -> bytes:
    """The RESP bytes of ``SPUBLISH shard_channel '<channel> <payload>'``."""
    return b"*3\r\n$8\r\nSPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s %s\r\n" % (
        len(shard_channel),
        shard_channel,
        len(channel) + 1 + len(payload),
        channel,
        payload,
    )


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
