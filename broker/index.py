"""The subscription index: which local subscribers want a published channel.

A token trie, so matching a channel costs about its number of tokens plus the
number of matching subscriptions, however many channels are in use. It is
generic over the subscriber type and knows nothing of sockets; patterns are
assumed valid (``broker.channels`` checks them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from broker.channels import matches as _matches

__all__ = ["SubscriptionIndex"]

S = TypeVar("S")


#: The children of every leaf: one shared empty mapping, replaced by a dict of
#: the node's own on its first child (64 bytes less per subscribed channel).
_NO_CHILDREN: dict[str, Any] = {}


class _TrieNode(Generic[S]):
    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _TrieNode[S]] = _NO_CHILDREN
        # A dict keeps insertion order, so delivery order is stable and testable.
        self.subscribers: dict[S, None] = {}


class SubscriptionIndex(Generic[S]):
    """Maps channels and patterns to subscribers; matches a channel in O(tokens).

    ``add`` and ``remove`` report when a pattern gains its first subscriber or
    loses its last one, which is when the backplane must follow.
    """

    def __init__(self) -> None:
        self._root: _TrieNode[S] = _TrieNode()
        self._count = 0
        self._patterns: dict[str, int] = {}

    def __len__(self) -> int:
        """The number of (pattern, subscriber) pairs."""
        return self._count

    @property
    def pattern_count(self) -> int:
        """The number of distinct patterns with at least one subscriber."""
        return len(self._patterns)

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
                if node.children is _NO_CHILDREN:
                    node.children = {}
                child = node.children[token] = _TrieNode()
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
        path: list[tuple[_TrieNode[S], str]] = []
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

    def match_patterns(self, channel: str) -> list[tuple[str, list[S]]]:
        """Each pattern matching ``channel`` with its subscribers (for notices, not fan-out)."""
        out: list[tuple[str, list[S]]] = []
        for pattern in self.patterns():
            # Rare (gaps), so the plain reference matcher is good enough here.
            if _matches(pattern, channel):
                out.append((pattern, self.subscribers_of(pattern)))
        return out

    def subscribers_of(self, pattern: str) -> list[S]:
        """The subscribers of exactly ``pattern`` (not of other patterns matching it)."""
        node = self._root
        for token in pattern.split("."):
            child = node.children.get(token)
            if child is None:
                return []
            node = child
        return list(node.subscribers)

    def match(self, channel: str) -> list[dict[S, None]]:
        """Return the subscriber sets of every pattern matching ``channel``.

        A subscriber may appear in several sets; callers that need each once
        (deliver once per connection) merge them. The common case is one set.
        """
        tokens = channel.split(".")
        last = len(tokens)
        found: list[dict[S, None]] = []
        stack: list[tuple[_TrieNode[S], int]] = [(self._root, 0)]
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
