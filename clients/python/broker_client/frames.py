"""Frames of wire protocol version 2, encoded and decoded without any I/O.

This module is the client's only JSON codec. :func:`encode` turns a request
into the bytes of one text frame; :func:`decode` turns the bytes of a server
frame into a frozen event: :class:`Reply` (``ok``, ``pong`` or ``error``),
:class:`Message`, :class:`GapNotice` (``gap``), :class:`Unsubscribed`, or
:class:`Unknown` for an op this client does not know (servers may add ops,
and clients must ignore what they do not know).

It also holds the small frozen values the public API hands out:
:class:`Gap`, :class:`Position` and :class:`PublishResult`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

import orjson

from .errors import BadFrame, BadRequest

__all__ = [
    "Gap",
    "GapNotice",
    "GapReason",
    "Message",
    "Position",
    "PublishResult",
    "Reply",
    "ServerEvent",
    "Unknown",
    "Unsubscribed",
    "check_key",
    "check_replay",
    "decode",
    "encode",
    "is_exact",
    "matches",
]

RequestId = int | str

#: The longest publish ``key`` the broker accepts.
MAX_KEY_LENGTH = 128

# Shared, read-only: the ``extra`` of the usual frame that has no extra fields.
_EMPTY: Mapping[str, Any] = MappingProxyType({})


class Position(NamedTuple):
    """Where a message sits in its channel's stream: pass it as ``since=`` to resume after it.

    Only channels whose broker rule keeps history have positions. ``epoch``
    changes when the channel's offsets start over (history lost).
    """

    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Message:
    """A message published to ``channel``.

    ``extra`` holds any fields the broker added beyond ``channel`` and ``data``
    (``offset`` and ``epoch`` on a channel with history, also readable as the
    properties below).
    """

    channel: str
    data: Any
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def offset(self) -> int | None:
        """The message's offset in its channel (from 1), or None on a channel without history."""
        value = self.extra.get("offset")
        return value if type(value) is int else None

    @property
    def epoch(self) -> str | None:
        """The epoch of :attr:`offset`, or None on a channel without history."""
        value = self.extra.get("epoch")
        return value if isinstance(value, str) and value else None

    @property
    def position(self) -> Position | None:
        """``Position(offset, epoch)``, or None on a channel without history."""
        offset, epoch = self.offset, self.epoch
        return None if offset is None or epoch is None else Position(offset, epoch)


#: Why messages may have been missed. The client's own: ``reconnect`` (the
#: connection was lost and nothing could be recovered), ``overflow`` (the
#: subscription's buffer was full), ``epoch_changed`` (also when two messages
#: of a channel carry different epochs). The broker's, after a ``since``
#: re-subscribe: ``trimmed``, ``epoch_changed``, ``no_history``; in its ``gap``
#: frames: ``backplane_interrupted``, ``offset_hole``, ``epoch_changed``. A newer broker may send
#: other codes, which are passed on as they are.
GapReason = Literal[
    "reconnect",
    "overflow",
    "trimmed",
    "epoch_changed",
    "no_history",
    "backplane_interrupted",
    "offset_hole",
]


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages may have been missed between ``since`` and ``until`` (``time.time()`` values).

    ``reason`` says why (see :data:`GapReason`): ``"reconnect"`` when the
    connection was lost and the client re-subscribed without being able to
    recover what it missed, ``"overflow"`` when a subscription's buffer was
    full and its ``dropped`` oldest messages were discarded, or a reason the
    broker gave. ``channel`` names the channel or pattern the gap concerns
    when it concerns one (a broker ``gap`` frame, a ``since`` re-subscribe
    that did not recover), else None. For a gap the broker reports, ``since``
    and ``until`` are both the time the client learned of it.
    """

    reason: GapReason | str
    since: float
    until: float
    dropped: int = 0
    channel: str | None = None


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What the broker answered to a publish.

    ``offset`` and ``epoch``: the message's position on a channel with
    history (else None). ``duplicate``: the publish carried a ``key`` the
    broker had already seen, so this copy was not delivered again (the
    position is then the first copy's).
    """

    offset: int | None = None
    epoch: str | None = None
    duplicate: bool = False

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> PublishResult:
        """Read the result from a publish reply's (or HTTP answer's) fields."""
        offset = fields.get("offset")
        epoch = fields.get("epoch")
        return cls(
            offset if type(offset) is int else None,
            epoch if isinstance(epoch, str) else None,
            fields.get("duplicate") is True,
        )


@dataclass(frozen=True, slots=True)
class Reply:
    """The broker's answer to a request that carried an ``id``."""

    op: Literal["ok", "pong", "error"]
    id: RequestId | None
    code: str = ""
    message: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class GapNotice:
    """The broker's ``gap`` frame: the subscription ``channel`` may have missed messages."""

    channel: str
    reason: str


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """The broker ended the subscription ``channel`` (a refreshed token no longer allows it)."""

    channel: str
    code: str


@dataclass(frozen=True, slots=True)
class Unknown:
    """A frame with an op this client does not know; ignored."""

    op: str


ServerEvent = Reply | Message | GapNotice | Unsubscribed | Unknown

_REPLY_KEYS = frozenset({"op", "id", "code", "message"})
_MESSAGE_KEYS = frozenset({"op", "channel", "data"})


def encode(op: str, id: RequestId | None = None, **fields: Any) -> bytes:
    """Return one client frame as JSON bytes; ``id`` is left out when None."""
    frame: dict[str, Any] = {"op": op}
    if id is not None:
        frame["id"] = id
    frame.update(fields)
    return orjson.dumps(frame)


def _extra(obj: dict[str, Any], known: frozenset[str]) -> Mapping[str, Any]:
    if len(obj) <= len(known) and known.issuperset(obj):
        return _EMPTY
    return {k: v for k, v in obj.items() if k not in known}


def decode(raw: bytes | str) -> ServerEvent:
    """Parse one server frame; raise :class:`BadFrame` if it is not a valid one."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadFrame(f"server sent invalid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise BadFrame("server sent a frame that is not a JSON object")
    op = obj.get("op")
    if op == "message":
        channel = obj.get("channel")
        if not isinstance(channel, str) or "data" not in obj:
            raise BadFrame("server sent a message without channel or data")
        return Message(channel, obj["data"], _extra(obj, _MESSAGE_KEYS))
    if op in ("ok", "pong", "error"):
        rid = obj.get("id")
        if rid is not None and not isinstance(rid, int | str):
            raise BadFrame("server sent a reply with an invalid id")
        code = obj.get("code", "")
        message = obj.get("message", "")
        return Reply(
            op,
            rid,
            code if isinstance(code, str) else str(code),
            message if isinstance(message, str) else str(message),
            _extra(obj, _REPLY_KEYS),
        )
    if op == "gap" or op == "unsubscribed":
        channel = obj.get("channel")
        field_name = "reason" if op == "gap" else "code"
        detail = obj.get(field_name)
        if not isinstance(channel, str) or not isinstance(detail, str):
            raise BadFrame(f"server sent a {op} frame without channel or {field_name}")
        return GapNotice(channel, detail) if op == "gap" else Unsubscribed(channel, detail)
    if isinstance(op, str):
        return Unknown(op)
    raise BadFrame("server sent a frame without an op")


def check_key(key: object) -> str:
    """Return ``key`` if the broker accepts it as a publish key (1 to 128 characters).

    Raises ``TypeError`` for a key that is not a str, :class:`BadRequest`
    (the broker's answer) for one of the wrong length.
    """
    if not isinstance(key, str):
        raise TypeError(f"a publish key is a str, not {type(key).__name__}")
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise BadRequest(f"a publish key has 1 to {MAX_KEY_LENGTH} characters, not {len(key)}")
    return key


def check_replay(
    patterns: tuple[str, ...], since: Position | tuple[int, str] | None, history: int | None
) -> Position | None:
    """Validate a subscribe's ``since`` and ``history`` as the broker would.

    Return ``since`` as a :class:`Position` (None without it). Raises
    ``ValueError`` for more than one channel, :class:`BadRequest` for what the
    broker would refuse (a pattern, both at once, a bad offset or count).
    """
    if since is None and history is None:
        return None
    if len(patterns) != 1:
        raise ValueError("since and history apply to one channel: subscribe to it on its own")
    channel = patterns[0]
    if not is_exact(channel):
        raise BadRequest(f"since and history need an exact channel, not the pattern {channel!r}")
    if since is not None and history is not None:
        raise BadRequest("give either since or history, not both")
    if history is not None:
        if type(history) is not int or history < 1:
            raise BadRequest(f"history is an integer of at least 1, not {history!r}")
        return None
    assert since is not None
    try:
        offset, epoch = since
    except (TypeError, ValueError):
        raise BadRequest(f"since is (offset, epoch), not {since!r}") from None
    if type(offset) is not int or offset < 0:
        raise BadRequest(f"since's offset is an integer of at least 0, not {offset!r}")
    if not isinstance(epoch, str):
        raise BadRequest(f"since's epoch is a str, not {type(epoch).__name__}")
    return Position(offset, epoch)


def is_exact(pattern: str) -> bool:
    """Tell whether ``pattern`` names one channel (no ``*`` or ``>`` token)."""
    return "*" not in pattern and ">" not in pattern


def matches(pattern: str, channel: str) -> bool:
    """Tell whether ``channel`` matches ``pattern`` (``*`` one token, ``>`` the rest).

    >>> matches("sensors.*", "sensors.kitchen"), matches("sensors.*", "sensors.a.b")
    (True, False)
    >>> matches("sensors.>", "sensors.a.b"), matches("sensors.>", "sensors")
    (True, False)
    """
    if pattern == channel:
        return True
    if "*" not in pattern and ">" not in pattern:
        return False
    want = pattern.split(".")
    have = channel.split(".")
    for i, token in enumerate(want):
        if token == ">" and i == len(want) - 1:
            return len(have) > i
        if i >= len(have):
            return False
        if token != "*" and token != have[i]:
            return False
    return len(have) == len(want)
