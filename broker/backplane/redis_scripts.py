"""History, offsets and idempotency keys on Redis: the scripts and their formats (pure).

Theory of operation. A publish to a channel with history, or with an
idempotency key, is one Lua script run by Redis as one atomic step:

1. with a key: if ``SET``-remembered for the channel, stop and return the first
   publish's position marked as a duplicate;
2. with history: take the channel's epoch (made from the caller's candidate
   when the channel has none: first use, expired, or Redis lost its data, in
   which case the old stream is dropped too), increment its offset, ``XADD``
   the data to its stream under the ID ``<offset>-0`` with an exact ``MAXLEN``
   (so a channel keeps exactly its ``history_size``, as the memory backplane
   does; trimming one entry per publish is cheap) and the publish time, and
   renew the expiries;
3. ``PUBLISH`` the envelope, which now carries ``;<offset>;<epoch>`` (on a
   cluster, ``SPUBLISH`` it to the channel's shard channel and its bucket's);
4. with a key: remember it for the idempotency window.

Because Redis runs scripts one at a time, no two publishes through any
process share an offset, and the order of offsets is the order of the
``PUBLISH`` es, so every subscriber reads a channel's messages in offset
order. A read is another script: the epoch and latest offset, plus either
every kept entry after an offset (only if none is missing: never a partial
answer) or the last N, all from one atomic look.

Keys (for a channel ``c`` and the backplane's ``prefix``): ``<prefix>h:m:c``
(a hash: epoch ``e``, offset ``o`` and, on a cluster, ``n``, the id of the
master that started the epoch; expires after ``history_meta_ttl``),
``<prefix>h:s:c`` (the stream, expires ``history_ttl`` after the last
publish), ``<prefix>h:k:<len(c)>:c:<key>`` (an idempotency key, expires after
``idempotency_window``, to the millisecond). A read of a channel nobody
published to yet makes its epoch (so the subscriber and the first publish
agree on it) with a short expiry, ``history_ttl``: subscribing to many
channels that stay quiet does not leave keys behind for a day. A
``KeyScheme`` makes these names, so a Redis Cluster can put a channel's keys
in one slot (a hash tag after ``h:m:``, ``h:s:`` and ``h:k:``).

Scripts are sent with ``EVALSHA``; each new connection loads them first
(``SCRIPT LOAD``), so a Redis restarted or flushed meanwhile gets them again.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

from broker.backplane.cluster_map import Buckets
from broker.history import HistoryPolicy, HistoryRead, new_epoch
from broker.position import PUBLISHED, Position, Published

__all__ = [
    "PUBLISH_SCRIPT",
    "READ_SCRIPT",
    "SHARD_PUBLISH_SCRIPT",
    "KeyScheme",
    "ScriptCommands",
    "ScriptError",
    "load_commands",
    "pack_eval_publish",
    "pack_eval_read",
    "pack_shard_publish",
    "parse_publish_reply",
    "parse_read_reply",
    "shard_publish_head",
]

PUBLISH_SCRIPT = """
local key_given = ARGV[10] == '1'
if key_given then
  local seen = redis.call('GET', KEYS[3])
  if seen then return {0, seen} end
end
local position = ''
local envelope
if ARGV[9] == '1' then
  local epoch = redis.call('HGET', KEYS[1], 'e')
  if epoch and ARGV[13] ~= '' and redis.call('HGET', KEYS[1], 'n') ~= ARGV[13] then
    epoch = false  -- written by another master: a failover may have lost its tail
  end
  if not epoch then
    epoch = ARGV[8]
    redis.call('DEL', KEYS[2])
    redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0, 'n', ARGV[13])
  end
  local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], offset .. '-0', 'd', ARGV[3], 't', ms)
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  position = offset .. ';' .. epoch
  envelope = '@' .. ARGV[2] .. ';' .. position .. ' ' .. ARGV[3]
else
  envelope = '@' .. ARGV[2] .. ' ' .. ARGV[3]
end
if ARGV[14] ~= '' then  -- a cluster: the channel's own shard channel, then its bucket's
  local n = redis.call('PUBSUB', 'SHARDNUMSUB', ARGV[14], ARGV[1])
  if n[2] > 0 then redis.call('SPUBLISH', ARGV[14], envelope) end
  if n[4] > 0 then redis.call('SPUBLISH', ARGV[1], ARGV[12] .. envelope) end
else
  redis.call(ARGV[11], ARGV[1], envelope)
end
if key_given then
  if position == '' then
    redis.call('SET', KEYS[3], '-', 'PX', ARGV[7])
  else
    redis.call('SET', KEYS[3], position, 'PX', ARGV[7])
  end
end
return {1, position}
"""

READ_SCRIPT = """
local epoch = redis.call('HGET', KEYS[1], 'e')
if epoch and ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'n') ~= ARGV[6] then
  epoch = false  -- written by another master: a failover may have lost its tail
end
if not epoch then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', ARGV[5], 'o', 0, 'n', ARGV[6])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return {ARGV[5], 0, 1}
end
local top = tonumber(redis.call('HGET', KEYS[1], 'o'))
local now = redis.call('TIME')
local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[3])
local out = {epoch, top, 1}
if ARGV[1] == 'a' then
  local after = tonumber(ARGV[2])
  if after >= top then return out end
  local entries = redis.call('XRANGE', KEYS[2], (after + 1) .. '-0', '+', 'COUNT', top - after)
  local fresh = {}
  for _, entry in ipairs(entries) do
    if tonumber(entry[2][4]) >= cutoff then table.insert(fresh, entry) end
  end
  if #fresh ~= top - after then return {epoch, top, 0} end
  for _, entry in ipairs(fresh) do
    table.insert(out, string.sub(entry[1], 1, -3))
    table.insert(out, entry[2][2])
  end
elseif ARGV[1] == 'l' then
  local entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', tonumber(ARGV[2]))
  local last = #entries
  for i, entry in ipairs(entries) do
    if tonumber(entry[2][4]) < cutoff then last = i - 1 break end
  end
  for i = last, 1, -1 do
    table.insert(out, string.sub(entries[i][1], 1, -3))
    table.insert(out, entries[i][2][2])
  end
end
return out
"""

#: A plain publish on a cluster: the channel's own shard channel (``KEYS[1]``,
#: ``<prefix>{b<i>}<channel>``), then its bucket's (``KEYS[2]``) with the channel at
#: the head (``cluster_map``), in one step so that the copies are adjacent on every
#: link; each only if somebody subscribes it on this master (the broker subscribes
#: on masters), so that a copy nobody reads does not travel to the replica either.
#: The shard channels are passed as keys so that any cluster client routes the
#: script to the master of their slot; an outside program may run it too.
SHARD_PUBLISH_SCRIPT = """
local n = redis.call('PUBSUB', 'SHARDNUMSUB', KEYS[1], KEYS[2])
if n[2] > 0 then redis.call('SPUBLISH', KEYS[1], ARGV[1]) end
if n[4] > 0 then
  local channel = string.sub(KEYS[1], string.find(KEYS[1], '}', 1, true) + 1)
  redis.call('SPUBLISH', KEYS[2], channel .. ' ' .. ARGV[1])
end
return 1
"""

PUBLISH_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode()).hexdigest().encode()
SHARD_PUBLISH_SHA = hashlib.sha1(SHARD_PUBLISH_SCRIPT.encode()).hexdigest().encode()
READ_SHA = hashlib.sha1(READ_SCRIPT.encode()).hexdigest().encode()

#: What an epoch may be: we make them (hex), but a Redis is shared ground.
_EPOCH = re.compile(rb"[A-Za-z0-9_\-]{1,64}")


class ScriptError(ValueError):
    """A script's reply is not what the script returns: another program's doing."""


@dataclass(frozen=True, slots=True)
class KeyScheme:
    """Names a channel's keys and the channel it is published on.

    ``prefix`` starts every name. With ``buckets`` (a Redis Cluster), every
    key of a channel carries its bucket's hash tag (``broker.h:m:{b7}c``), and
    the script ``SPUBLISH``es to the channel's own shard channel and to its
    bucket's, whose payload starts with the channel (``cluster_map``), each
    if it has subscribers: the whole step runs in one slot of one shard.
    """

    prefix: bytes
    buckets: Buckets | None = None

    @property
    def publish(self) -> bytes:
        return b"PUBLISH" if self.buckets is None else b"SPUBLISH"

    def _tag(self, channel: bytes) -> bytes:
        return b"" if self.buckets is None else self.buckets.tag(channel.decode())

    def meta(self, channel: bytes) -> bytes:
        return b"%sh:m:%s%s" % (self.prefix, self._tag(channel), channel)

    def stream(self, channel: bytes) -> bytes:
        return b"%sh:s:%s%s" % (self.prefix, self._tag(channel), channel)

    def key(self, channel: bytes, key: bytes) -> bytes:
        # The channel's length first: channel "a:b" with key "c" and channel "a"
        # with key "b:c" must not share a name (a colon is allowed in both).
        tag = self._tag(channel)
        return b"%sh:k:%s%d:%s:%s" % (self.prefix, tag, len(channel), channel, key)

    def pubsub(self, channel: bytes) -> bytes:
        if self.buckets is None:
            return self.prefix + channel
        return self.buckets.names[self.buckets.of_channel(channel.decode())]

    def channel_pubsub(self, channel: bytes) -> bytes:
        """The channel's own shard channel on a cluster; nothing on one Redis."""
        return b"" if self.buckets is None else self.buckets.channel_name(channel.decode())

    def head(self, channel: bytes) -> bytes:
        """What the payload starts with: nothing, or the channel on a cluster."""
        return b"" if self.buckets is None else channel + b" "


@dataclass(frozen=True, slots=True)
class ScriptCommands:
    """Packs one backplane's script runs: its key scheme, position expiry and key window.

    ``master`` is the cluster node id the command goes to (see
    ``pack_eval_publish``); empty on one Redis.
    """

    keys: KeyScheme
    meta_ttl: float
    window: float

    def publish(
        self,
        channel: str,
        message_id: bytes,
        data: bytes,
        *,
        history: HistoryPolicy | None,
        key: str | None,
        master: bytes = b"",
    ) -> bytes:
        return pack_eval_publish(
            self.keys,
            channel,
            message_id,
            data,
            history=history,
            key=key,
            meta_ttl=self.meta_ttl,
            window=self.window,
            epoch=new_epoch().encode(),
            master=master,
        )

    def read(
        self,
        channel: str,
        history: HistoryPolicy,
        *,
        after: int | None,
        last: int | None,
        master: bytes = b"",
    ) -> bytes:
        return pack_eval_read(
            self.keys,
            channel,
            history,
            after=after,
            last=last,
            meta_ttl=self.meta_ttl,
            epoch=new_epoch().encode(),
            master=master,
        )


def load_commands() -> list[tuple[bytes, ...]]:
    """The ``SCRIPT LOAD`` commands a new connection sends before using the scripts."""
    return [
        (b"SCRIPT", b"LOAD", PUBLISH_SCRIPT.encode()),
        (b"SCRIPT", b"LOAD", READ_SCRIPT.encode()),
        (b"SCRIPT", b"LOAD", SHARD_PUBLISH_SCRIPT.encode()),
    ]


def pack(*args: bytes) -> bytes:
    """The RESP bytes of one command."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def pack_eval_publish(
    scheme: KeyScheme,
    channel: str,
    message_id: bytes,
    data: bytes,
    *,
    history: HistoryPolicy | None,
    key: str | None,
    meta_ttl: float,
    window: float,
    epoch: bytes,
    master: bytes = b"",
) -> bytes:
    """The ``EVALSHA`` of one publish with history and/or an idempotency key.

    ``master`` (a cluster node id, or empty) is the node the script runs on: a
    channel whose position another master wrote starts a new epoch, since a
    replica promoted by a failover may lack the last messages its master
    published and would hand their offsets out again.
    """
    name = channel.encode()
    size = history.size if history is not None else 0
    ttl_ms = int(history.ttl * 1000) if history is not None else 0
    meta_seconds = int(max(meta_ttl, history.ttl if history is not None else 0.0)) + 1
    return pack(
        b"EVALSHA",
        PUBLISH_SHA,
        b"3",
        scheme.meta(name),
        scheme.stream(name),
        scheme.key(name, key.encode()) if key is not None else scheme.key(name, b""),
        scheme.pubsub(name),
        message_id,
        data,
        b"%d" % size,
        b"%d" % max(1, ttl_ms),
        b"%d" % meta_seconds,
        b"%d" % max(1, math.ceil(window * 1000)),  # milliseconds: never shorter than asked
        epoch,
        b"1" if history is not None else b"0",
        b"1" if key is not None else b"0",
        scheme.publish,
        scheme.head(name),
        master,
        scheme.channel_pubsub(name),
    )


def pack_shard_publish(head: bytes, envelope: bytes) -> bytes:
    """The ``EVALSHA`` of a plain publish on a cluster (``SHARD_PUBLISH_SCRIPT``).

    ``head`` is the channel's ``shard_publish_head``, which a caller may keep.
    """
    return b"%s$%d\r\n%s\r\n" % (head, len(envelope), envelope)


def shard_publish_head(buckets: Buckets, channel: str) -> bytes:
    """The command up to the envelope: the same for every publish to ``channel``."""
    own, bucket = buckets.channel_name(channel), buckets.names[buckets.of_channel(channel)]
    return pack(b"EVALSHA", SHARD_PUBLISH_SHA, b"2", own, bucket).replace(b"*5", b"*6", 1)


def pack_eval_read(
    scheme: KeyScheme,
    channel: str,
    history: HistoryPolicy,
    *,
    after: int | None,
    last: int | None,
    meta_ttl: float,
    epoch: bytes,
    master: bytes = b"",
) -> bytes:
    """The ``EVALSHA`` of one history read (position only, ``after`` an offset, or ``last`` N)."""
    name = channel.encode()
    mode, n = (
        (b"a", after) if after is not None else (b"l", last) if last is not None else (b"p", 0)
    )
    return pack(
        b"EVALSHA",
        READ_SHA,
        b"2",
        scheme.meta(name),
        scheme.stream(name),
        mode,
        b"%d" % (n or 0),
        b"%d" % max(1, int(history.ttl * 1000)),
        b"%d" % (int(min(meta_ttl, history.ttl)) + 1),  # made by a read: see the module text
        epoch,
        master,
    )


def parse_publish_reply(reply: object) -> Published:
    """``{1, "<offset>;<epoch>"|""}`` for a new message, ``{0, position|"-"}`` for a duplicate."""
    if not isinstance(reply, list) or len(reply) != 2:
        raise ScriptError(f"unexpected publish reply {reply!r}")
    fresh, position = reply
    if not isinstance(position, bytes):
        raise ScriptError(f"unexpected publish position {position!r}")
    parsed = parse_position(position) if position not in (b"", b"-") else None
    if fresh == 1:
        return PUBLISHED if parsed is None else Published(parsed)
    return Published(parsed, duplicate=True)


def parse_position(text: bytes) -> Position:
    """``<offset>;<epoch>`` to a ``Position``; ``ScriptError`` when malformed."""
    offset, _, epoch = text.partition(b";")
    if not offset.isdigit() or not _EPOCH.fullmatch(epoch):
        raise ScriptError(f"malformed position {text!r}")
    return Position(int(offset), epoch.decode("ascii"))


def parse_read_reply(reply: object) -> HistoryRead:
    """``{epoch, top, complete, offset, data, offset, data, ...}`` to a ``HistoryRead``."""
    if not isinstance(reply, list) or len(reply) < 3 or len(reply) % 2 == 0:
        raise ScriptError(f"unexpected read reply {str(reply)[:80]}")
    epoch, top, complete = reply[:3]
    if not isinstance(epoch, bytes) or not _EPOCH.fullmatch(epoch) or not isinstance(top, int):
        raise ScriptError(f"unexpected read reply head {reply[:3]!r}")
    entries = []
    rest = reply[3:]
    for i in range(0, len(rest), 2):
        offset, data = rest[i], rest[i + 1]
        if not isinstance(offset, bytes) or not offset.isdigit() or not isinstance(data, bytes):
            raise ScriptError(f"unexpected read entry {offset!r}")
        entries.append((int(offset), data))
    return HistoryRead(epoch.decode("ascii"), top, tuple(entries), complete == 1)
