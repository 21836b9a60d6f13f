"""The session's authentication states and v2 requests (pure: no sockets, no clock).

A fake verifier stands in for JWT checking (``tests/test_tokens.py`` covers the
real one), so every state change is driven by explicit times.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from broker.access import Principal, Verified
from broker.exceptions import Unauthorized
from broker.position import Position
from broker.rules import Rules
from broker.session import (
    AddSubscription,
    Authenticate,
    AuthState,
    Close,
    Effect,
    Limits,
    PublishMessage,
    RemoveSubscription,
    Reply,
    Session,
)
from broker.settings import ChannelRule


class FakeVerifier:
    """Tokens are ``sub:seconds[:pattern,pattern]`` ; anything else is refused."""

    def __init__(self) -> None:
        self.calls = 0

    def verify(self, token: str) -> Verified:
        self.calls += 1
        parts = token.split(":")
        try:
            seconds = float(parts[1])
        except (IndexError, ValueError):
            raise Unauthorized("token is malformed") from None
        claims = tuple(parts[2].split(",")) if len(parts) > 2 and parts[2] else ()
        return Verified(Principal(parts[0], claims, claims), seconds)


LIMITS = Limits(auth_timeout=5.0, refresh_grace=10.0)


def session(
    *rules: dict[str, Any], limits: Limits = LIMITS, verifier: FakeVerifier | None = None
) -> Session:
    policy = Rules([ChannelRule.model_validate(r) for r in rules], auth=True)
    return Session(limits, now=0.0, verifier=verifier or FakeVerifier(), policy=policy)


def raw(**frame: Any) -> bytes:
    return orjson.dumps(frame)


def frames(effects: list[Effect]) -> list[dict[str, Any]]:
    return [orjson.loads(e.frame) for e in effects if isinstance(e, Reply)]


def authenticate(s: Session, token: str, now: float = 0.0, request_id: int = 1) -> list[Effect]:
    """What the node does: the Authenticate effect, then ``authenticated``."""
    effects = s.receive(raw(op="auth", id=request_id, token=token), text=True, now=now)
    assert len(effects) == 1 and isinstance(effects[0], Authenticate), effects
    return s.authenticated(effects[0].verified, effects[0].request_id, now)


def test_waiting_allows_only_auth_and_ping() -> None:
    s = session()
    assert s.state is AuthState.WAITING and s.deadline == 5.0
    for frame in (
        raw(op="subscribe", id=1, channel="a"),
        raw(op="publish", id=2, channel="a", data=1),
        raw(op="unsubscribe", id=3, channel="a"),
    ):
        (reply,) = frames(s.receive(frame, text=True, now=1.0))
        assert reply["code"] == "unauthorized"
    assert frames(s.receive(raw(op="ping", id=4), text=True, now=1.0)) == [{"op": "pong", "id": 4}]


def test_no_auth_within_the_timeout_closes_with_1008() -> None:
    s = session()
    assert s.tick(4.9) == []
    assert s.tick(5.0) == [Close(1008, "no authentication within 5 s")]
    assert s.closed and s.deadline is None


def test_auth_ok_carries_sub_and_whole_seconds_left() -> None:
    s = session()
    effects = authenticate(s, "alice:3599.7", now=2.0)
    assert frames(effects) == [{"op": "ok", "id": 1, "sub": "alice", "expires_in": 3599}]
    assert s.state is AuthState.AUTHENTICATED and s.principal.sub == "alice"
    assert s.deadline == pytest.approx(3601.7)


def test_a_refused_auth_changes_nothing() -> None:
    s = session()
    authenticate(s, "alice:100:a.>")
    (reply,) = frames(s.receive(raw(op="auth", id=2, token="garbage"), text=True, now=1.0))
    assert (reply["code"], reply["id"]) == ("unauthorized", 2)
    assert s.principal.sub == "alice" and s.state is AuthState.AUTHENTICATED


def test_a_long_token_is_refused_without_being_parsed() -> None:
    verifier = FakeVerifier()
    s = session(verifier=verifier)
    (reply,) = frames(s.receive(raw(op="auth", id=1, token="x" * 8193), text=True, now=0.0))
    assert reply["code"] == "unauthorized" and "8192" in reply["message"]
    assert verifier.calls == 0
    authenticate(s, "alice:10:" + "a" * (8192 - len("alice:10:")))  # exactly 8,192 is fine


def test_expiry_then_grace_then_1008() -> None:
    s = session()
    authenticate(s, "alice:100:a.>")
    assert s.tick(99.0) == []
    (expired,) = frames(s.tick(100.0))
    assert (expired["code"], expired["id"]) == ("token_expired", None)
    assert s.state is AuthState.EXPIRED and s.deadline == 110.0
    # During the grace: ops but auth and ping get token_expired.
    (reply,) = frames(s.receive(raw(op="publish", id=5, channel="a.b", data=1), text=True, now=101))
    assert (reply["code"], reply["id"]) == ("token_expired", 5)
    assert s.tick(110.0) == [Close(1008, "token expired")]


def test_refresh_in_the_grace_keeps_the_connection() -> None:
    s = session()
    authenticate(s, "alice:100:a.>")
    s.tick(100.0)
    assert frames(authenticate(s, "alice:200:a.>", now=105.0)) == [
        {"op": "ok", "id": 1, "sub": "alice", "expires_in": 200}
    ]
    assert s.state is AuthState.AUTHENTICATED and s.deadline == 305.0


def test_refresh_with_another_sub_is_forbidden_and_keeps_the_old_token() -> None:
    s = session()
    authenticate(s, "alice:100:a.>")
    (reply,) = frames(s.receive(raw(op="auth", id=2, token="bob:100"), text=True, now=1.0))
    assert reply["code"] == "forbidden" and "alice" in reply["message"]
    assert s.principal.sub == "alice" and s.deadline == 100.0


def test_a_narrowing_refresh_ends_subscriptions_with_unsubscribed_before_the_ok() -> None:
    s = session()
    authenticate(s, "alice:100:a.>,b.>")
    for channel in ("a.x", "b.y", "a.*"):
        s.receive(raw(op="subscribe", channel=channel), text=True, now=1.0)
    effects = authenticate(s, "alice:100:a.x", now=2.0, request_id=9)
    assert effects[:-1] == [
        RemoveSubscription("a.*"),
        Reply(b'{"op":"unsubscribed","channel":"a.*","code":"forbidden"}'),
        RemoveSubscription("b.y"),
        Reply(b'{"op":"unsubscribed","channel":"b.y","code":"forbidden"}'),
    ]
    assert frames(effects[-1:]) == [{"op": "ok", "id": 9, "sub": "alice", "expires_in": 100}]
    assert s.subscriptions == {"a.x"}


def test_anonymous_mode_uses_the_rules_for_anyone_and_says_unauthorized_elsewhere() -> None:
    s = session(
        {"pattern": "public.>", "subscribe": "anyone", "publish": "anyone"},
        limits=Limits(anonymous=True),
    )
    assert s.state is AuthState.ANONYMOUS and s.deadline is None
    effects = s.receive(raw(op="subscribe", id=1, channel="public.x"), text=True, now=0.0)
    assert effects == [AddSubscription("public.x", request_id=1)]
    (reply,) = frames(s.receive(raw(op="subscribe", id=2, channel="private"), text=True, now=0))
    assert reply["code"] == "unauthorized"
    authenticate(s, "alice:100:private")
    effects = s.receive(raw(op="subscribe", id=3, channel="private"), text=True, now=1.0)
    assert effects == [AddSubscription("private", request_id=3)]
    (reply,) = frames(s.receive(raw(op="subscribe", id=4, channel="other"), text=True, now=1))
    assert reply["code"] == "forbidden"  # with a token: not unauthorized


def test_a_token_from_the_handshake_starts_authenticated() -> None:
    verified = FakeVerifier().verify("alice:30:a.>")
    s = Session(LIMITS, now=10.0, verifier=FakeVerifier(), policy=Rules([], auth=True),
                verified=verified)  # fmt: skip
    assert s.state is AuthState.AUTHENTICATED and s.deadline == 40.0


def test_auth_with_auth_off_is_unauthorized() -> None:
    s = Session(Limits())
    (reply,) = frames(s.receive(raw(op="auth", id=1, token="t"), text=True, now=0.0))
    assert reply["code"] == "unauthorized" and "does not use authentication" in reply["message"]


# --- v2 subscribe and publish --------------------------------------------------------

HISTORY = {"pattern": "h.>", "subscribe": "anyone", "publish": "anyone", "history_size": 10}


def open_session() -> Session:
    policy = Rules([ChannelRule.model_validate(HISTORY)], auth=False)
    return Session(Limits(), policy=policy)


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        ({"channel": "h.*", "since": {"offset": 1, "epoch": "e"}}, "exact channel"),
        ({"channel": "h.>", "history": 3}, "exact channel"),
        ({"channel": "h.a", "since": {"offset": 1, "epoch": "e"}, "history": 2}, "either"),
        ({"channel": "h.a", "history": 11}, "at most 10"),
        ({"channel": "h.a", "history": 0}, "greater than or equal to 1"),
        ({"channel": "x", "history": 1}, "keeps no history"),
        ({"channel": "h.a", "since": {"offset": -1, "epoch": "e"}}, "since.offset"),
        ({"channel": "h.a", "since": {"offset": 1}}, "since.epoch"),
        ({"channel": "h.a", "since": {"offset": "1", "epoch": "e"}}, "since.offset"),
        ({"channel": "h.a", "since": {"offset": 1, "epoch": 5}}, "since.epoch"),
        ({"channel": "h.a", "since": [1, "e"]}, "since"),
        ({"channel": "h.a", "since": None}, "'since': leave it out rather than sending null"),
        ({"channel": "h.a", "history": None}, "'history': leave it out rather than sending null"),
    ],
)
def test_bad_since_and_history_are_bad_request(frame: dict[str, Any], words: str) -> None:
    s = open_session()
    (reply,) = frames(s.receive(raw(op="subscribe", id=7, **frame), text=True, now=0.0))
    assert (reply["code"], reply["id"]) == ("bad_request", 7)
    assert words in reply["message"]
    assert s.subscriptions == set()


def test_subscribe_with_since_or_history_becomes_one_effect_for_the_node() -> None:
    s = open_session()
    policy = Rules([ChannelRule.model_validate(HISTORY)], auth=False).history("h.a")
    since = raw(op="subscribe", id=1, channel="h.a", since={"offset": 4, "epoch": "e1"})
    assert s.receive(since, text=True, now=0.0) == [
        AddSubscription("h.a", 1, policy, Position(4, "e1"))
    ]
    last = raw(op="subscribe", id=2, channel="h.b", history=3)
    assert s.receive(last, text=True, now=0.0) == [AddSubscription("h.b", 2, policy, last=3)]
    # Since on a channel without history: the node answers recovered false, no_history.
    plain = raw(op="subscribe", id=3, channel="x", since={"offset": 0, "epoch": "e"})
    assert s.receive(plain, text=True, now=0.0) == [AddSubscription("x", 3, None, Position(0, "e"))]
    # A replay of a channel already subscribed is refused: unsubscribe first.
    (reply,) = frames(s.receive(since.replace(b'"id":1', b'"id":4'), text=True, now=0.0))
    assert reply["code"] == "bad_request" and "already subscribed" in reply["message"]


def test_publish_carries_the_history_policy_and_the_key() -> None:
    s = open_session()
    effects = s.receive(raw(op="publish", id=1, channel="h.a", data=1, key="k-1"), text=True, now=0)
    (effect,) = effects
    assert isinstance(effect, PublishMessage)
    assert (effect.history is not None, effect.key) == (True, "k-1")
    for key in ("", "k" * 129, 5):
        (reply,) = frames(
            s.receive(raw(op="publish", id=2, channel="h.a", data=1, key=key), text=True, now=0)
        )
        assert reply["code"] == "bad_request" and "key" in reply["message"]
