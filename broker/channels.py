"""Channel names and patterns: what is valid, and what matches what.

A channel is 1 to 255 characters: ``.``-separated tokens of ASCII letters,
digits, ``_``, ``-`` and ``:``. A pattern may also use ``*`` as a whole token
(exactly one token) and ``>`` as the last token (one or more tokens).
``matches`` is the reference the subscription index (``broker.index``) is
tested against.
"""

from __future__ import annotations

import re

from broker.exceptions import BadChannel

__all__ = [
    "MAX_CHANNEL_LENGTH",
    "check_channel",
    "check_pattern",
    "is_pattern",
    "is_token",
    "matches",
    "pattern_within",
    "patterns_overlap",
]

MAX_CHANNEL_LENGTH = 255

_TOKEN = r"[A-Za-z0-9_:\-]+"
_TOKEN_RE = re.compile(_TOKEN)
_CHANNEL_RE = re.compile(rf"{_TOKEN}(?:\.{_TOKEN})*")
_PATTERN_RE = re.compile(rf"(?:{_TOKEN}|\*)(?:\.(?:{_TOKEN}|\*))*(?:\.>)?|>")


def check_channel(name: str) -> str:
    """Return ``name`` if it is a valid channel (not a pattern); raise ``BadChannel``."""
    if 0 < len(name) <= MAX_CHANNEL_LENGTH and _CHANNEL_RE.fullmatch(name):
        return name
    if _PATTERN_RE.fullmatch(name) and len(name) <= MAX_CHANNEL_LENGTH:
        raise BadChannel(f"cannot publish to a pattern: {name!r}; publish to a channel name")
    raise BadChannel(_why_invalid(name))


def check_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is a valid channel or pattern; raise ``BadChannel``."""
    if 0 < len(pattern) <= MAX_CHANNEL_LENGTH and _PATTERN_RE.fullmatch(pattern):
        return pattern
    raise BadChannel(_why_invalid(pattern))


def is_pattern(name: str) -> bool:
    """Whether a valid pattern uses a wildcard."""
    return "*" in name or ">" in name


def matches(pattern: str, channel: str) -> bool:
    """Whether ``pattern`` matches ``channel`` (both assumed valid); the index's reference."""
    want = pattern.split(".")
    have = channel.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def is_token(text: str) -> bool:
    """Whether ``text`` is one valid channel token (no ``.``, ``*``, ``>`` or space)."""
    return _TOKEN_RE.fullmatch(text) is not None


def pattern_within(inner: str, outer: str) -> bool:
    """Whether every channel ``inner`` can match is matched by ``outer`` (both valid).

    ``sensors.*`` is within ``sensors.>``; ``>`` is within nothing narrower. A
    channel is a pattern that matches only itself, so this also answers
    whether ``outer`` matches a channel.
    """
    have = inner.split(".")
    want = outer.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i  # one or more tokens, whatever they are
        if i >= len(have):
            return False
        mine = have[i]
        if mine == ">":
            return False  # inner goes on for any length; outer does not
        if token != "*" and mine != token:
            return False  # a different literal, or a '*' that is broader
    return len(have) == len(want)


def patterns_overlap(first: str, second: str) -> bool:
    """Whether some channel is matched by both patterns (both valid)."""
    a = first.split(".")
    b = second.split(".")
    for x, y in zip(a, b, strict=False):
        if x == ">" or y == ">":
            return True  # the other has a token here, and what follows can be chosen
        if x != y and x != "*" and y != "*":
            return False
    return len(a) == len(b)


def _why_invalid(name: str) -> str:
    shown = name if len(name) <= 40 else name[:37] + "..."
    if not name:
        return "channel must not be empty"
    if len(name) > MAX_CHANNEL_LENGTH:
        return f"channel is {len(name)} characters, over the {MAX_CHANNEL_LENGTH}-character limit"
    tokens = name.split(".")
    for i, token in enumerate(tokens):
        if not token:
            return f"invalid channel {shown!r}: empty token (leading, trailing or double '.')"
        if token == ">" and i != len(tokens) - 1:
            return f"invalid channel {shown!r}: '>' is only allowed as the last token"
        if ("*" in token or ">" in token) and len(token) > 1:
            return f"invalid channel {shown!r}: '*' and '>' must be whole tokens"
        if not _TOKEN_RE.fullmatch(token) and token not in ("*", ">"):
            return (
                f"invalid channel {shown!r}: tokens may only contain "
                "ASCII letters, digits, '_', '-' and ':'"
            )
    return f"invalid channel {shown!r}"
