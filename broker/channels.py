"""Channel names, patterns, and the subscription index that matches them.

A channel is 1 to 255 characters: ``.``-separated tokens of ASCII letters,
digits, ``_``, ``-`` and ``:``. A pattern may also use ``*`` as a whole token
(exactly one token) and ``>`` as the last token (one or more tokens).

The index is a token trie, so matching a channel costs about its number of
tokens plus the number of matching subscriptions, however many channels are
in use. It is generic over the subscriber type and knows nothing of sockets.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Generic, TypeVar

from broker.exceptions import BadChannel

MAX_CHANNEL_LENGTH = 255

_TOKEN = r"[A-Za-z0-9_:\-]+"
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
        if not re.fullmatch(_TOKEN, token) and token not in ("*", ">"):
            return (
                f"invalid channel {shown!r}: tokens may only contain "
                "ASCII letters, digits, '_', '-' and ':'"
            )
    return f"invalid channel {shown!r}"


S = TypeVar("S")


class _Node(Generic[S]):
    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node[S]] = {}
        # A dict keeps insertion order, so delivery order is stable and testable.
        self.subscribers: dict[S, None] = {}


class SubscriptionIndex(Generic[S]):
    """Maps channels and patterns to subscribers; matches a channel in O(tokens).

    ``add`` and ``remove`` report when a pattern gains its first subscriber or
    loses its last one, which is when the backplane must follow.
    """

    def __init__(self) -> None:
        self._root: _Node[S] = _Node()
        self._count = 0
        self._patterns: dict[str, int] = {}

    def __len__(self) -> int:
        """The number of (pattern, subscriber) pairs."""
        return self._count

    def patterns(self) -> Iterator[str]:
        """Every pattern that has at least one subscriber."""
        return iter(list(self._patterns))

    def has(self, pattern: str) -> bool:
        """Whether ``pattern`` has at least one subscriber."""
        return pattern in self._patterns

    def add(self, pattern: str, subscriber: S) -> bool:
        """Subscribe; return True if ``pattern`` had no subscriber before."""
        node = self._root
        for token in pattern.split("."):
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node()
            node = child
        if subscriber in node.subscribers:
            return False
        node.subscribers[subscriber] = None
        self._count += 1
        first = pattern not in self._patterns
        self._patterns[pattern] = self._patterns.get(pattern, 0) + 1
        return first

    def remove(self, pattern: str, subscriber: S) -> bool:
        """Unsubscribe; return True if that was the pattern's last subscriber.

        Removing a pair that is not there is a no-op returning False.
        """
        path: list[tuple[_Node[S], str]] = []
        node = self._root
        for token in pattern.split("."):
            child = node.children.get(token)
            if child is None:
                return False
            path.append((node, token))
            node = child
        if subscriber not in node.subscribers:
            return False
        del node.subscribers[subscriber]
        self._count -= 1
        remaining = self._patterns[pattern] - 1
        if remaining:
            self._patterns[pattern] = remaining
        else:
            del self._patterns[pattern]
        # Prune empty branches so a churn of unique channels does not leak nodes.
        for parent, token in reversed(path):
            child = parent.children[token]
            if child.subscribers or child.children:
                break
            del parent.children[token]
        return remaining == 0

    def match(self, channel: str) -> list[dict[S, None]]:
        """Return the subscriber sets of every pattern matching ``channel``.

        A subscriber may appear in several sets; callers that need each once
        (deliver once per connection) merge them. The common case is one set.
        """
        tokens = channel.split(".")
        last = len(tokens)
        found: list[dict[S, None]] = []
        stack: list[tuple[_Node[S], int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            if depth == last:
                if node.subscribers:
                    found.append(node.subscribers)
                continue
            children = node.children
            if not children:
                continue
            tail = children.get(">")
            if tail is not None and tail.subscribers:
                found.append(tail.subscribers)
            star = children.get("*")
            if star is not None:
                stack.append((star, depth + 1))
            exact = children.get(tokens[depth])
            if exact is not None:
                stack.append((exact, depth + 1))
        return found

    def subscribers(self, channel: str) -> list[S]:
        """Every subscriber matching ``channel``, each once."""
        sets = self.match(channel)
        if len(sets) == 1:
            return list(sets[0])
        merged: dict[S, None] = {}
        for subscribers in sets:
            merged.update(subscribers)
        return list(merged)
