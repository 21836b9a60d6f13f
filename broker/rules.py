"""Channel rules: who may subscribe and publish where, and which channels keep history.

Theory of operation. The ``[[channels]]`` rules are tried in order; the first
whose pattern matches a channel decides for it, and a channel no rule matches
uses the defaults (``anyone`` with authentication off, ``token`` with it on;
no history). ``{sub}`` in a rule's pattern stands for the connection's
subject: a connection without one, or whose subject is not a valid channel
token, matches no such rule.

A *publish* names one channel, so one rule decides. A *subscription* may be a
pattern covering channels of several rules; it is allowed only if every
channel it can match is allowed by that channel's own rule. Rules are walked
in order: a rule whose pattern contains the whole subscription decides for
the rest of it; a rule that only overlaps it must allow its part, or the
subscription is refused; what no rule covers falls to the defaults. This is
conservative (it never allows a channel its rule forbids), exact for the
usual nesting of rules, and pure pattern algebra (``channels.pattern_within``
and ``patterns_overlap``, tested against brute force).

``"token"`` defers to the token's own lists: a subscription must lie within
one pattern of the token's ``subscribe`` claim, a publish's channel must be
matched by one of its ``publish`` claim. History is a property of the channel
alone: for it, ``{sub}`` matches any token. Decisions are made once per
subscribe and once per publish (with a small cache for the publish path),
never per delivery.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from broker.access import Principal
from broker.channels import is_token, matches, pattern_within, patterns_overlap
from broker.history import HistoryPolicy
from broker.settings import ChannelRule, Who

__all__ = ["Rules"]

_SUB = "{sub}"
_TOKEN = r"[A-Za-z0-9_:\-]+"
#: Publish decisions remembered (by subject and channel); then the cache starts over.
_CACHE_SIZE = 8192


class _Rule:
    """One configured rule, ready to match."""

    __slots__ = ("_channel_re", "history", "pattern", "publish", "subscribe", "templated")

    def __init__(self, rule: ChannelRule, default: Who) -> None:
        self.pattern = rule.pattern
        self.subscribe: Who = rule.subscribe or default
        self.publish: Who = rule.publish or default
        self.history = (
            HistoryPolicy(rule.history_size, rule.history_ttl) if rule.history_size else None
        )
        self.templated = _SUB in rule.pattern
        # For history: the pattern with {sub} read as any token (consistently).
        self._channel_re = _channel_regex(rule.pattern) if self.templated else None

    def for_subject(self, sub: str | None) -> str | None:
        """The rule's pattern for a connection with subject ``sub``; None: not for it."""
        if not self.templated:
            return self.pattern
        if sub is None or not is_token(sub):
            return None
        pattern = self.pattern.replace(_SUB, sub)
        return pattern if len(pattern) <= 255 else None

    def matches_any_subject(self, channel: str) -> bool:
        if self._channel_re is None:
            return matches(self.pattern, channel)
        return self._channel_re.fullmatch(channel) is not None


class Rules:
    """The channel rules of one broker; an ``Authorizer``, and the history policy.

    ``auth`` says whether authentication is configured: it picks the defaults
    (``token`` when on, ``anyone`` when off).
    """

    def __init__(self, rules: Sequence[ChannelRule], *, auth: bool) -> None:
        self.default: Who = "token" if auth else "anyone"
        self._rules = [_Rule(rule, self.default) for rule in rules]
        self._publish_rule: dict[tuple[str | None, str], _Rule | None] = {}
        self._history: dict[str, HistoryPolicy | None] = {}
        #: Whether any rule keeps history (else ``history`` is always None, cheaply).
        self.keeps_history = any(rule.history for rule in self._rules)

    def may_subscribe(self, principal: Principal, pattern: str) -> bool:
        """Whether ``principal`` may receive every channel ``pattern`` can match."""
        for rule in self._rules:
            covering = rule.for_subject(principal.sub)
            if covering is None:
                continue
            if pattern_within(pattern, covering):
                return _allows(rule.subscribe, principal, pattern, subscribing=True)
            if patterns_overlap(pattern, covering) and not _allows(
                rule.subscribe, principal, pattern, subscribing=True
            ):
                return False
        return _allows(self.default, principal, pattern, subscribing=True)

    def may_publish(self, principal: Principal, channel: str) -> bool:
        """Whether ``principal`` may publish to ``channel``."""
        key = (principal.sub, channel)
        try:
            rule = self._publish_rule[key]
        except KeyError:
            rule = self._first_rule(principal.sub, channel)
            if len(self._publish_rule) >= _CACHE_SIZE:
                self._publish_rule.clear()
            self._publish_rule[key] = rule
        who = self.default if rule is None else rule.publish
        return _allows(who, principal, channel, subscribing=False)

    def history(self, channel: str) -> HistoryPolicy | None:
        """The history ``channel`` keeps, or None (from its first rule, ``{sub}`` as any token)."""
        if not self.keeps_history:
            return None
        try:
            return self._history[channel]
        except KeyError:
            pass
        policy = None
        for rule in self._rules:
            if rule.matches_any_subject(channel):
                policy = rule.history
                break
        if len(self._history) >= _CACHE_SIZE:
            self._history.clear()
        self._history[channel] = policy
        return policy

    def _first_rule(self, sub: str | None, channel: str) -> _Rule | None:
        for rule in self._rules:
            pattern = rule.for_subject(sub)
            if pattern is not None and matches(pattern, channel):
                return rule
        return None


def _allows(who: Who, principal: Principal, target: str, *, subscribing: bool) -> bool:
    if who == "anyone":
        return True
    if who == "nobody" or principal.sub is None:
        return False
    if who == "authenticated":
        return True
    # "token": the token's own claim decides.
    claims = principal.subscribe if subscribing else principal.publish
    if subscribing:
        return any(pattern_within(target, claim) for claim in claims)
    return any(matches(claim, target) for claim in claims)


def _channel_regex(pattern: str) -> re.Pattern[str]:
    """A regex for the channels ``pattern`` matches when ``{sub}`` may be any token.

    Every ``{sub}`` must stand for the same token, as it would for one subject.
    """
    parts: list[str] = []
    seen_sub = False
    for token in pattern.split("."):
        if token == "*":
            parts.append(_TOKEN)
        elif token == ">":
            parts.append(_TOKEN + r"(?:\." + _TOKEN + ")*")
        else:
            pieces = token.split(_SUB)
            out = re.escape(pieces[0])
            for piece in pieces[1:]:
                out += "(?P=sub)" if seen_sub else f"(?P<sub>{_TOKEN})"
                seen_sub = True
                out += re.escape(piece)
            parts.append(out)
    return re.compile(r"\.".join(parts))
