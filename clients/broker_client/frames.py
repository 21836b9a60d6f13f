"""Frames of wire protocol version 1, encoded and decoded without any I/O.

This module is the client's only JSON codec. :func:`encode` turns a request
into the bytes of one text frame; :func:`decode` turns the bytes of a server
frame into a frozen event: :class:`Reply` (``ok``, ``pong`` or ``error``),
:class:`Message`, or :class:`Unknown` for an op this client does not know
(servers may add ops, and clients must ignore what they do not know).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import orjson

from .errors import BadFrame

__all__ = [
    "Gap",
    "Message",
    "Reply",
    "ServerEvent",
    "Unknown",
    "decode",
    "encode",
    "matches",
]

RequestId = int | str

# Shared, read-only: the ``extra`` of the usual frame that has no extra fields.
_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Message:
    """A message published to ``channel``.

    ``extra`` holds any fields the broker added beyond ``channel`` and ``data``
    (for example a per-channel ``offset``).
    """

    channel: str
    data: Any
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages may have been missed between ``since`` and ``until`` (``time.time()`` values).

    ``reason`` is ``"reconnect"`` when the connection was lost and the client
    re-subscribed on a new one, or ``"overflow"`` when a subscription's buffer
    was full and its ``dropped`` oldest messages were discarded.
    """

    reason: Literal["reconnect", "overflow"]
    since: float
    until: float
    dropped: int = 0


@dataclass(frozen=True, slots=True)
class Reply:
    """The broker's answer to a request that carried an ``id``."""

    op: Literal["ok", "pong", "error"]
    id: RequestId | None
    code: str = ""
    message: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Unknown:
    """A frame with an op this client does not know; ignored."""

    op: str


ServerEvent = Reply | Message | Unknown

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
    if isinstance(op, str):
        return Unknown(op)
    raise BadFrame("server sent a frame without an op")


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
