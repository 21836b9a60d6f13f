"""Channel rules (pure): first match wins, {sub}, the token's claims, patterns spanning rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.access import ANONYMOUS, Principal
from broker.channels import matches
from broker.history import HistoryPolicy
from broker.rules import Rules
from broker.settings import ChannelRule
from tests.strategies import CHANNELS, PATTERNS

ALICE = Principal("alice", subscribe=("sensors.>",), publish=("sensors.kitchen",))
BOB = Principal("bob")


def rules(*specs: dict[str, object], auth: bool = True) -> Rules:
    return Rules([ChannelRule.model_validate(spec) for spec in specs], auth=auth)


def test_defaults_are_anyone_with_auth_off_and_token_with_it_on() -> None:
    off = rules(auth=False)
    assert off.may_subscribe(ANONYMOUS, ">") and off.may_publish(ANONYMOUS, "a.b")
    on = rules()
    assert not on.may_subscribe(ANONYMOUS, "sensors.kitchen")
    assert on.may_subscribe(ALICE, "sensors.kitchen")  # the token's claim
    assert on.may_subscribe(ALICE, "sensors.*")  # within sensors.>
    assert not on.may_subscribe(ALICE, ">")  # > is inside nothing narrower
    assert on.may_publish(ALICE, "sensors.kitchen")
    assert not on.may_publish(ALICE, "sensors.hall")
    assert not on.may_subscribe(BOB, "sensors.kitchen")  # authenticated, no claim


def test_first_matching_rule_wins() -> None:
    r = rules(
        {"pattern": "public.>", "subscribe": "anyone", "publish": "nobody"},
        {"pattern": "public.admin.>", "subscribe": "nobody"},  # shadowed by the first
        {"pattern": ">", "subscribe": "authenticated", "publish": "authenticated"},
    )
    assert r.may_subscribe(ANONYMOUS, "public.admin.x")
    assert not r.may_publish(ALICE, "public.news")
    assert r.may_subscribe(BOB, "other.thing") and r.may_publish(BOB, "other.thing")
    assert not r.may_subscribe(ANONYMOUS, "other.thing")


def test_sub_stands_for_the_subject_and_only_a_valid_token_matches() -> None:
    r = rules(
        {"pattern": "user.{sub}.>", "subscribe": "authenticated", "publish": "authenticated"},
        {"pattern": "user.>", "subscribe": "nobody", "publish": "nobody"},
    )
    assert r.may_subscribe(BOB, "user.bob.inbox") and r.may_subscribe(BOB, "user.bob.>")
    assert not r.may_subscribe(BOB, "user.alice.inbox")
    assert not r.may_subscribe(BOB, "user.*.inbox")  # spans other users' channels
    assert r.may_publish(BOB, "user.bob.x") and not r.may_publish(BOB, "user.alice.x")
    # Anonymous, or a subject that is not a channel token, match no {sub} rule.
    assert not r.may_subscribe(ANONYMOUS, "user.bob.inbox")
    for odd in ("a.b", "*", ">", "has space", ""):
        assert not r.may_subscribe(Principal(odd), f"user.{odd}.inbox".replace("..", "."))


def test_sub_inside_a_token() -> None:
    r = rules({"pattern": "inbox-{sub}.>", "subscribe": "authenticated"}, auth=True)
    assert r.may_subscribe(BOB, "inbox-bob.x") and not r.may_subscribe(BOB, "inbox-alice.x")


def test_a_pattern_spanning_rules_needs_every_part_allowed() -> None:
    r = rules(
        {"pattern": "secret.>", "subscribe": "nobody"},
        {"pattern": ">", "subscribe": "anyone"},
    )
    assert r.may_subscribe(ANONYMOUS, "news.>")
    assert not r.may_subscribe(ANONYMOUS, "*.temp")  # would match secret.temp
    assert not r.may_subscribe(ANONYMOUS, ">")
    assert r.may_subscribe(ANONYMOUS, "news.*")


def test_history_follows_the_first_rule_with_sub_as_any_token() -> None:
    r = rules(
        {"pattern": "user.{sub}.>", "history_size": 10, "history_ttl": 60},
        {"pattern": "sensors.>", "history_size": 100},
        {"pattern": "sensors.raw.>", "history_size": 5},  # shadowed
    )
    assert r.history("user.alice.inbox") == HistoryPolicy(10, 60.0)
    assert r.history("sensors.raw.x") == HistoryPolicy(100, 300.0)
    assert r.history("other") is None
    assert rules({"pattern": "a.>"}).history("a.b") is None  # size 0: none
    assert not rules({"pattern": "a.>"}).keeps_history


def test_sub_repeated_must_bind_one_subject_for_history() -> None:
    r = rules({"pattern": "dm.{sub}.{sub}", "history_size": 3})
    assert r.history("dm.bob.bob") is not None
    assert r.history("dm.bob.alice") is None


# --- the property: a subscription is allowed only if every channel is ------------------

WHO = st.sampled_from(["anyone", "authenticated", "token", "nobody"])
RULES = st.lists(st.builds(lambda p, s: {"pattern": p, "subscribe": s}, PATTERNS, WHO), max_size=4)
_CHANNELS = [f"{a}.{b}" for a in "abcd" for b in "abcd"] + list("abcd")
_CHANNELS += [f"{c}.{d}" for c in _CHANNELS if "." in c for d in "ab"]


@settings(max_examples=300, deadline=None)
@given(
    specs=RULES,
    subscription=PATTERNS,
    claims=st.lists(PATTERNS, max_size=2),
    auth=st.booleans(),
    anonymous=st.booleans(),
)
def test_an_allowed_pattern_never_reaches_a_forbidden_channel(
    specs: list[dict[str, object]],
    subscription: str,
    claims: list[str],
    auth: bool,
    anonymous: bool,
) -> None:
    principal = ANONYMOUS if anonymous else Principal("u", subscribe=tuple(claims))
    r = rules(*specs, auth=auth)
    if not r.may_subscribe(principal, subscription):
        return
    for channel in _CHANNELS:
        if matches(subscription, channel):
            # The channel alone, under the same rules, must be allowed too.
            assert r.may_subscribe(principal, channel), (subscription, channel)


@settings(max_examples=200, deadline=None)
@given(specs=RULES, channel=CHANNELS)
def test_a_channel_is_decided_by_its_first_matching_rule(
    specs: list[dict[str, object]], channel: str
) -> None:
    r = rules(*specs, auth=True)
    first = next((s for s in specs if matches(str(s["pattern"]), channel)), None)
    who = "token" if first is None else first["subscribe"]
    expected = {"anyone": True, "authenticated": True, "token": False, "nobody": False}[who]
    assert r.may_subscribe(BOB, channel) is expected


@pytest.mark.parametrize("pattern", ["a..b", "*x", "a.>.b", ""])
def test_rule_patterns_are_validated(pattern: str) -> None:
    with pytest.raises(ValueError):
        ChannelRule(pattern=pattern)
