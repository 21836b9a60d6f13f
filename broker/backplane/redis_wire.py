"""Pure helpers of the Redis backplane: the envelope, message ids, Redis names.

Nothing here does I/O (no asyncio, no redis), so all of it is tested synchronously;
``broker/backplane/redis.py``, ``redis_link.py`` and ``redis_publisher.py`` are
the thin parts that talk to Redis. See ``docs/redis.md`` for the formats written
down for people outside this code.

The envelope
------------

A message on Redis is the bytes ``@<id> <data>``: an ``@``, a message id of 1 to
64 bytes without a space, one space, then the message's ``data`` as JSON text.
A payload that does not start with ``@`` is taken as bare JSON ``data`` without
an id, so another service can ``PUBLISH broker.sensors.kitchen '{"t": 21.5}'``
straight into Redis. No JSON text starts with ``@``, so the two never collide,
and a node reads the header with one ``find`` instead of parsing JSON twice.

Message ids
-----------

A broker node writes ids as ``<node id>~<counter in hex>``. Node ids cannot
contain ``~`` and the docs reserve it for broker nodes, so ``~`` in an id says
"written by a broker node, whose ``data`` was validated when it was published";
receivers then skip the JSON check (``from_broker_node``). Ids of outside
programs (``@billing-42 ...``) carry no ``~``: their ``data`` is checked like a
bare payload's. Before this mark existed, nodes wrote ``<node id>-<counter>``,
which cannot be told apart from an outside id such as ``billing-42``; such ids
are simply checked, so nodes of both versions work together.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from broker.channels import check_channel, check_pattern
from broker.exceptions import BadChannel
from broker.position import Position

#: First character of the broker's own channels (the canary's); no client channel has it.
INTERNAL_MARK = "$"
_INTERNAL = re.compile(r"\$[a-z]+\.[A-Za-z0-9_.:\-]{1,64}")
#: First byte of an enveloped payload; no JSON text can start with it.
ENVELOPE_MARK = b"@"
#: Longest message id accepted in an envelope, in bytes.
MAX_ID_LENGTH = 64
#: Longest envelope header: the id, and ``;<offset>;<epoch>`` with history.
MAX_HEADER_LENGTH = MAX_ID_LENGTH + 1 + 20 + 1 + 64
_EPOCH = re.compile(rb"[A-Za-z0-9_\-]{1,64}")
#: In a message id, between the node id and the counter: reserved for broker nodes.
NODE_ID_MARK = b"~"
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


def decode_envelope(payload: bytes) -> tuple[bytes | None, Position | None, bytes]:
    """Split a payload read from Redis into ``(message id or None, position or None, data)``.

    A message published with history carries ``;<offset>;<epoch>`` after its
    id (``@node~1f;18;k3j9 {...}``); ids never hold ``;``.

    Does not check that ``data`` is JSON: the caller does that once per
    message, after dropping duplicates, and only when the id does not say
    ``from_broker_node``. Raises ``EnvelopeError`` when the payload starts
    with ``@`` but has no well-formed id.
    """
    if payload[:1] != ENVELOPE_MARK:
        return None, None, payload
    end = payload.find(b" ", 1, MAX_HEADER_LENGTH + 2)
    if end < 2:
        raise EnvelopeError(f"envelope without an id of 1 to {MAX_ID_LENGTH} bytes")
    header = payload[1:end]
    if b";" not in header:
        if len(header) > MAX_ID_LENGTH:
            raise EnvelopeError(f"envelope without an id of 1 to {MAX_ID_LENGTH} bytes")
        return header, None, payload[end + 1 :]
    message_id, _, position = header.partition(b";")
    offset, _, epoch = position.partition(b";")
    if (
        not message_id
        or len(message_id) > MAX_ID_LENGTH
        or not offset.isdigit()
        or not _EPOCH.fullmatch(epoch)
    ):
        raise EnvelopeError(f"malformed envelope header {header[:80]!r}")
    return message_id, Position(int(offset), epoch.decode("ascii")), payload[end + 1 :]


def from_broker_node(message_id: bytes) -> bool:
    """Whether ``message_id`` was written by a broker node (it holds ``NODE_ID_MARK``).

    Such a message's ``data`` was validated by the node that published it, so
    a receiver need not parse it again. Only an outside program that writes
    ``~`` in its own ids, against ``docs/redis.md``, can make this true for
    data nobody checked; the receiver then relays that data as it is.
    """
    return NODE_ID_MARK in message_id


class MessageIds:
    """Makes the ids this process stamps on what it publishes: ``<node>~<counter in hex>``.

    They are unique per process while it runs; de-duplication does not even
    need that (see ``broker.backplane.dedupe``), the id only makes the
    comparison cheap, lets an operator trace a message back to its node and,
    through its ``~``, tells receivers that the data was already validated.
    """

    __slots__ = ("_count", "_node")

    def __init__(self, node_id: str) -> None:
        if not is_node_id(node_id):
            raise ValueError(f"invalid node id {node_id!r}")
        self._node = node_id.encode("ascii")
        self._count = 0

    def next(self) -> bytes:
        self._count += 1
        return b"%s~%x" % (self._node, self._count)


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
    if pattern.startswith(INTERNAL_MARK):
        # The broker's own channels ($canary.<node>): exact, never a client's.
        return RedisSubscription(False, (prefix + pattern).encode("ascii"))
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
    if name.startswith(INTERNAL_MARK):
        return name if _INTERNAL.fullmatch(name) else None
    try:
        return check_channel(name)
    except BadChannel:
        return None
