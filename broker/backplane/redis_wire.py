"""Pure helpers of the Redis backplane: the envelope, Redis names, de-duplication, backoff.

Nothing here does I/O (no asyncio, no redis), so all of it is tested synchronously;
``broker/backplane/redis.py`` is the thin part that talks to Redis. See
``docs/redis.md`` for the formats written down for people outside this code.

The envelope
------------

A message on Redis is the bytes ``@<id> <data>``: an ``@``, a message id of 1 to
64 bytes without a space, one space, then the message's ``data`` as JSON text.
A payload that does not start with ``@`` is taken as bare JSON ``data`` without
an id, so another service can ``PUBLISH broker.sensors.kitchen '{"t": 21.5}'``
straight into Redis. No JSON text starts with ``@``, so the two never collide,
and a node reads the header with one ``find`` instead of parsing JSON twice.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from broker.channels import check_channel, check_pattern
from broker.exceptions import BadChannel

#: First byte of an enveloped payload; no JSON text can start with it.
ENVELOPE_MARK = b"@"
#: Longest message id accepted in an envelope, in bytes.
MAX_ID_LENGTH = 64
_GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")
_NODE_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,40}")


class EnvelopeError(ValueError):
    """A payload starts like an envelope but its header is malformed."""


def encode_envelope(message_id: bytes, data: bytes) -> bytes:
    """Wrap ``data`` (JSON bytes) and its id into the bytes published on Redis."""
    return b"@%s %s" % (message_id, data)


def pack_publish(channel: bytes, payload: bytes) -> bytes:
    """The RESP bytes of ``PUBLISH channel payload``, so that a batch is one ``join``."""
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel),
        channel,
        len(payload),
        payload,
    )


def decode_envelope(payload: bytes) -> tuple[bytes | None, bytes]:
    """Split a payload read from Redis into ``(message id or None, data bytes)``.

    Does not check that ``data`` is JSON: the caller does that once per
    message, after dropping duplicates. Raises ``EnvelopeError`` when the
    payload starts with ``@`` but has no well-formed id.
    """
    if payload[:1] != ENVELOPE_MARK:
        return None, payload
    end = payload.find(b" ", 1, MAX_ID_LENGTH + 2)
    if end < 2:
        raise EnvelopeError(f"envelope without an id of 1 to {MAX_ID_LENGTH} bytes")
    return payload[1:end], payload[end + 1 :]


class MessageIds:
    """Makes the ids this process stamps on what it publishes: ``<node>-<counter in hex>``.

    They are unique per process while it runs; de-duplication does not even
    need that (see ``Deduplicator``), the id only makes the comparison cheap
    and lets an operator trace a message back to its node.
    """

    __slots__ = ("_count", "_node")

    def __init__(self, node_id: str) -> None:
        if not is_node_id(node_id):
            raise ValueError(f"invalid node id {node_id!r}")
        self._node = node_id.encode("ascii")
        self._count = 0

    def next(self) -> bytes:
        self._count += 1
        return b"%s-%x" % (self._node, self._count)


def is_node_id(node_id: str) -> bool:
    """Whether ``node_id`` can prefix message ids: 1 to 40 of ``[A-Za-z0-9_.:-]``."""
    return _NODE_ID.fullmatch(node_id) is not None


class RedisSubscription(NamedTuple):
    """What one broker pattern becomes on Redis: a ``SUBSCRIBE`` or a ``PSUBSCRIBE`` name."""

    is_pattern: bool
    name: bytes


def glob_escape(text: str) -> str:
    """Escape the characters Redis glob patterns treat specially (``\\ * ? [ ]``)."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def redis_subscription(prefix: str, pattern: str) -> RedisSubscription:
    """Translate a broker channel or pattern into what to subscribe to on Redis.

    A plain channel becomes ``SUBSCRIBE prefix+channel``. A pattern becomes a
    ``PSUBSCRIBE`` glob that matches a *superset* of its channels: Redis's ``*``
    also crosses dots, so ``*`` stays ``*`` and a final ``>`` becomes ``?*``
    (at least one character). The hub re-matches every delivered channel
    against its own index, which removes the surplus. Raises ``BadChannel``
    for an invalid pattern.
    """
    tokens = check_pattern(pattern).split(".")
    if "*" not in tokens and tokens[-1] != ">":
        return RedisSubscription(False, (prefix + pattern).encode("ascii"))
    parts = ["*" if t == "*" else "?*" if t == ">" else glob_escape(t) for t in tokens]
    return RedisSubscription(True, (glob_escape(prefix) + ".".join(parts)).encode("ascii"))


def channel_from_redis(prefix: bytes, raw: bytes) -> str | None:
    """Turn a Redis channel back into a broker channel, or ``None`` when it is not one.

    A pattern subscription can match names that are not valid channels (``a..b``,
    non-ASCII, over-long), published by some other program; those are dropped.
    """
    if not raw.startswith(prefix):
        return None
    try:
        name = raw[len(prefix) :].decode("ascii")
    except UnicodeDecodeError:
        return None
    try:
        return check_channel(name)
    except BadChannel:
        return None


class Deduplicator:
    """Drops the extra copies Redis sends when several subscriptions match one publish.

    Redis sends one message per matching subscription of a connection (the
    exact channel and each matching pattern), written one after another while
    it runs that single ``PUBLISH``: nothing can come between them. So a copy
    is a message equal to the previous one (same channel and key) that arrives
    through a subscription *not yet seen* in the current run. A second publish
    of equal content starts with a subscription already seen, because it
    matches the same subscriptions, unless our subscriptions changed in
    between, and then a (un)subscribe confirmation came in between and called
    ``reset()``. This makes de-duplication exact, also for messages without an
    id (where the key is the whole payload).
    """

    __slots__ = ("_channel", "_key", "_sources")

    def __init__(self) -> None:
        self._channel: bytes | None = None
        self._key: bytes | None = None
        self._sources: set[bytes | None] = set()

    def first(self, channel: bytes, key: bytes, source: bytes | None) -> bool:
        """Return whether to deliver this message; ``source`` is the pattern, or ``None``."""
        if key == self._key and channel == self._channel and source not in self._sources:
            self._sources.add(source)
            return False
        self._channel = channel
        self._key = key
        self._sources.clear()
        self._sources.add(source)
        return True

    def reset(self) -> None:
        """Forget the last message: the set of subscriptions has just changed."""
        self._channel = None
        self._key = None
        self._sources.clear()


def backoff_delay(attempt: int, cap: float, rand: Callable[[], float], base: float = 0.1) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (0 is the first, right away).

    Exponential from ``base``, capped at ``cap``, with "equal jitter" (a random
    point in the upper half) so that many processes cut off together do not
    come back in lockstep.
    """
    if attempt <= 0:
        return 0.0
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 30))
    return ceiling / 2 + rand() * ceiling / 2
