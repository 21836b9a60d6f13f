"""Per-connection protocol decisions: a frame in, effects out (pure, explicit clocks)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from broker.session import (
    ABUSE_CLOSE,
    AddSubscription,
    Close,
    Effect,
    Limits,
    PublishMessage,
    RemoveSubscription,
    Reply,
    Session,
)
from broker.settings import Settings


def _raw(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def _replies(effects: list[Effect]) -> list[dict[str, Any]]:
    return [orjson.loads(e.frame) for e in effects if isinstance(e, Reply)]


def _error(effects: list[Effect]) -> dict[str, Any]:
    """The one error frame in ``effects``, checked for shape and for its Reply.error."""
    replies = [e for e in effects if isinstance(e, Reply)]
    assert len(replies) == 1, effects
    frame: dict[str, Any] = orjson.loads(replies[0].frame)
    assert frame["op"] == "error"
    assert set(frame) == {"op", "id", "code", "message"}
    assert isinstance(frame["message"], str) and frame["message"]
    assert replies[0].error == frame["code"]
    return frame


def _session(**limits: Any) -> Session:
    return Session(Limits(**limits), now=0.0)


def receive(
    session: Session, raw: bytes | str, now: float = 0.0, text: bool = True
) -> list[Effect]:
    return session.receive(raw, text=text, now=now)


# --- each op --------------------------------------------------------------------


def test_subscribe_with_id() -> None:
    session = _session()
    effects = receive(session, _raw(op="subscribe", id=1, channel="sensors.*"))
    # The node answers a subscribe once the subscription is active (see test_hub.py).
    assert effects == [AddSubscription("sensors.*", request_id=1)]
    assert session.subscriptions == {"sensors.*"}


def test_subscribe_without_id_has_no_reply() -> None:
    session = _session()
    assert receive(session, _raw(op="subscribe", channel="a")) == [AddSubscription("a")]


def test_duplicate_subscribe_is_ok_and_adds_nothing() -> None:
    session = _session()
    receive(session, _raw(op="subscribe", id=1, channel="a.>"))
    effects = receive(session, _raw(op="subscribe", id=2, channel="a.>"))
    assert effects == [AddSubscription("a.>", request_id=2, already=True)]
    assert receive(session, _raw(op="subscribe", channel="a.>")) == []
    assert session.subscriptions == {"a.>"}


def test_unsubscribe() -> None:
    session = _session()
    receive(session, _raw(op="subscribe", channel="a.*"))
    effects = receive(session, _raw(op="unsubscribe", id="u", channel="a.*"))
    assert effects == [RemoveSubscription("a.*"), Reply(b'{"op":"ok","id":"u"}')]
    assert session.subscriptions == set()


def test_unsubscribe_without_id_has_no_reply() -> None:
    session = _session()
    receive(session, _raw(op="subscribe", channel="a"))
    assert receive(session, _raw(op="unsubscribe", channel="a")) == [RemoveSubscription("a")]


def test_unsubscribe_not_subscribed() -> None:
    session = _session()
    receive(session, _raw(op="subscribe", channel="a.*"))
    # Unsubscribe removes exactly the string subscribed, not what it matches.
    frame = _error(receive(session, _raw(op="unsubscribe", id=9, channel="a.b")))
    assert (frame["id"], frame["code"]) == (9, "not_subscribed")
    frame = _error(receive(session, _raw(op="unsubscribe", channel="never")))
    assert (frame["id"], frame["code"]) == (None, "not_subscribed")
    assert session.subscriptions == {"a.*"}


def test_unsubscribe_twice() -> None:
    session = _session()
    receive(session, _raw(op="subscribe", channel="a"))
    receive(session, _raw(op="unsubscribe", channel="a"))
    assert _error(receive(session, _raw(op="unsubscribe", id=1, channel="a")))["code"] == (
        "not_subscribed"
    )


def test_publish_is_handed_to_the_node_with_compact_data() -> None:
    session = _session()
    effects = receive(session, b'{"op":"publish","id":3,"channel":"s.k","data": { "t" : 21.5 }}')
    assert effects == [PublishMessage("s.k", b'{"t":21.5}', 3)]
    effects = receive(session, _raw(op="publish", channel="s.k", data=None))
    assert effects == [PublishMessage("s.k", b"null", None)]


def test_ping() -> None:
    session = _session()
    assert receive(session, _raw(op="ping", id=4)) == [Reply(b'{"op":"pong","id":4}')]
    assert receive(session, _raw(op="ping", id="p")) == [Reply(b'{"op":"pong","id":"p"}')]


def test_ping_without_id_gets_no_reply() -> None:
    assert receive(_session(), _raw(op="ping")) == []


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code", "request_id"),
    [
        (b"garbage", "bad_frame", None),
        (b"[1]", "bad_frame", None),
        (b'{"op":"ping","id":"\xff"}', "bad_frame", None),
        (b'{"op":"ping","id":1,"x":1}', "bad_request", 1),
        (b'{"op":"nope","id":"q"}', "bad_request", "q"),
        (b'{"op":"ping","id":true}', "bad_request", None),
        (b'{"op":"subscribe","id":2,"channel":"a..b"}', "bad_channel", 2),
        (b'{"op":"unsubscribe","id":2,"channel":"a.>.b"}', "bad_channel", 2),
        (b'{"op":"publish","id":3,"channel":"a.*","data":1}', "bad_channel", 3),
        (b'{"op":"publish","channel":"a.>","data":1}', "bad_channel", None),
        (b'{"op":"publish","id":4,"channel":"","data":1}', "bad_channel", 4),
        (
            b'{"op":"publish","id":5,"channel":"a","data":' + b"[" * 1020 + b"]" * 1020 + b"}",
            "bad_request",
            5,
        ),
    ],
)
def test_request_errors(raw: bytes, code: str, request_id: int | str | None) -> None:
    session = _session()
    frame = _error(receive(session, raw))
    assert (frame["code"], frame["id"]) == (code, request_id)
    assert not session.closed


def test_binary_frame_is_bad_frame_even_with_valid_json() -> None:
    frame = _error(receive(_session(), b'{"op":"ping","id":1}', text=False))
    assert frame["code"] == "bad_frame"
    assert "binary" in frame["message"]


def test_id_less_failure_is_an_error_with_null_id() -> None:
    frame = _error(receive(_session(), _raw(op="subscribe", channel="no good")))
    assert frame["id"] is None
    assert frame["code"] == "bad_channel"


def test_error_leaves_subscriptions_untouched() -> None:
    session = _session()
    receive(session, _raw(op="subscribe", channel="a"))
    receive(session, _raw(op="subscribe", channel="b b"))
    assert session.subscriptions == {"a"}


# --- too_large at the boundary ------------------------------------------------------


@pytest.mark.parametrize("cap", [1, 16, 65536])
def test_too_large_at_the_cap_boundary(cap: int) -> None:
    session = _session(max_data_bytes=cap)
    # A JSON string of n characters serializes to n + 2 bytes.
    exactly = "x" * (cap - 2) if cap >= 2 else None
    if exactly is not None:
        effects = receive(session, _raw(op="publish", id=1, channel="c", data=exactly))
        assert effects == [PublishMessage("c", orjson.dumps(exactly), 1)]
        assert len(effects[0].data) == cap  # type: ignore[union-attr]
    else:
        effects = receive(session, _raw(op="publish", id=1, channel="c", data=1))
        assert effects == [PublishMessage("c", b"1", 1)]
    over = "x" * (cap - 1)
    frame = _error(receive(session, _raw(op="publish", id=2, channel="c", data=over)))
    assert (frame["code"], frame["id"]) == ("too_large", 2)
    assert f"{cap + 1} bytes" in frame["message"]
    assert f"{cap}-byte cap" in frame["message"]


def test_size_is_measured_on_the_compact_serialization() -> None:
    session = _session(max_data_bytes=7)
    # 7 bytes compact ('[1,2,3]') although the frame spells it with spaces.
    effects = receive(session, b'{"op":"publish","channel":"c","data":[ 1 , 2 , 3 ]}')
    assert effects == [PublishMessage("c", b"[1,2,3]", None)]


# --- max_subscriptions ----------------------------------------------------------


def test_max_subscriptions() -> None:
    session = _session(max_subscriptions=2)
    receive(session, _raw(op="subscribe", channel="a"))
    receive(session, _raw(op="subscribe", channel="b.*"))
    frame = _error(receive(session, _raw(op="subscribe", id=3, channel="c")))
    assert (frame["code"], frame["id"]) == ("limit_exceeded", 3)
    assert "limit is 2" in frame["message"]
    # Re-subscribing something already there is not a new subscription.
    assert receive(session, _raw(op="subscribe", id=4, channel="a")) == [
        AddSubscription("a", request_id=4, already=True)
    ]
    # Room again after an unsubscribe.
    receive(session, _raw(op="unsubscribe", channel="a"))
    assert receive(session, _raw(op="subscribe", channel="c")) == [AddSubscription("c")]
    assert session.subscriptions == {"b.*", "c"}


# --- rate limit (token bucket) -----------------------------------------------------


def test_rate_limit_is_off_by_default() -> None:
    session = _session()
    for _ in range(10_000):
        assert receive(session, _raw(op="ping", id=1), now=0.0) == [Reply(b'{"op":"pong","id":1}')]


def test_rate_limit_token_bucket() -> None:
    session = Session(Limits(rate_limit=2.0, rate_burst=3), now=0.0)
    pong = [Reply(b'{"op":"pong","id":1}')]
    ping = _raw(op="ping", id=1)
    # A full bucket: a burst of three, then limited.
    for _ in range(3):
        assert receive(session, ping, now=0.0) == pong
    frame = _error(receive(session, ping, now=0.0))
    assert frame["code"] == "rate_limited"
    assert frame["id"] == 1  # a request with an id gets its one reply with that id
    # Two tokens a second: after 0.5 s one more request.
    assert receive(session, ping, now=0.5) == pong
    assert _error(receive(session, ping, now=0.5))["code"] == "rate_limited"
    assert _error(receive(session, ping, now=0.9))["code"] == "rate_limited"
    assert receive(session, ping, now=1.0) == pong
    # A long pause refills to the burst, no more.
    for _ in range(3):
        assert receive(session, ping, now=100.0) == pong
    assert _error(receive(session, ping, now=100.0))["code"] == "rate_limited"


def test_bucket_starts_full_at_the_session_clock() -> None:
    session = Session(Limits(rate_limit=1.0, rate_burst=1), now=50.0)
    assert receive(session, _raw(op="ping"), now=50.0) == []
    assert _error(receive(session, _raw(op="ping"), now=50.5))["code"] == "rate_limited"
    assert receive(session, _raw(op="ping"), now=51.0) == []


def test_rate_limited_error_echoes_a_readable_id_only() -> None:
    session = Session(Limits(rate_limit=0.001, rate_burst=1), now=0.0)
    receive(session, _raw(op="ping"))
    cases: list[tuple[bytes, bool, int | str | None]] = [
        (_raw(op="publish", id="p-1", channel="c", data=1), True, "p-1"),
        (_raw(op="nope", id=7), True, 7),  # refused for its rate before its op
        (_raw(op="ping"), True, None),
        (_raw(op="ping", id=True), True, None),
        (b"junk", True, None),
        (_raw(op="ping", id=3), False, None),  # a binary frame is not a request
    ]
    for raw, text, request_id in cases:
        frame = _error(receive(session, raw, text=text))
        assert (frame["code"], frame["id"]) == ("rate_limited", request_id)


def test_rate_limit_counts_every_frame_even_invalid_ones() -> None:
    session = Session(Limits(rate_limit=1.0, rate_burst=2), now=0.0)
    assert _error(receive(session, b"junk", now=0.0))["code"] == "bad_frame"
    assert _error(receive(session, b"junk", now=0.0))["code"] == "bad_frame"
    assert _error(receive(session, _raw(op="ping", id=1), now=0.0))["code"] == "rate_limited"


# --- error budget ---------------------------------------------------------------


def test_error_budget_closes_with_1008_after_the_error_that_crossed_it() -> None:
    session = _session(error_limit=3, error_window=10.0)
    for t in (0.0, 1.0, 2.0):
        effects = receive(session, b"junk", now=t)
        assert not any(isinstance(e, Close) for e in effects)
    effects = receive(session, b"junk", now=3.0)
    assert len(effects) == 2
    assert _error(effects)["code"] == "bad_frame"
    assert effects[-1] == Close(1008, "too many errors")
    assert ABUSE_CLOSE == (1008, "too many errors")
    assert session.closed
    # A closed session ignores everything, valid or not.
    assert receive(session, _raw(op="ping", id=1), now=4.0) == []
    assert receive(session, b"junk", now=4.0) == []


def test_error_budget_forgets_errors_older_than_the_window() -> None:
    session = _session(error_limit=3, error_window=10.0)
    for t in (0.0, 1.0, 2.0):
        receive(session, b"junk", now=t)
    # At 10.5 the error of t=0 has left the window: still three in it.
    effects = receive(session, b"junk", now=10.5)
    assert not any(isinstance(e, Close) for e in effects)
    assert not session.closed
    # At 11.0 the error of t=1 is exactly at the window's edge and still counts.
    effects = receive(session, b"junk", now=11.0)
    assert effects[-1] == Close(1008, "too many errors")


def test_successful_requests_do_not_use_the_error_budget() -> None:
    session = _session(error_limit=1)
    for i in range(100):
        receive(session, _raw(op="subscribe", id=i, channel=f"c{i}"))
    receive(session, b"junk", now=0.0)
    assert not session.closed


def test_rate_limited_requests_count_as_errors() -> None:
    session = Session(Limits(rate_limit=0.001, rate_burst=1, error_limit=2), now=0.0)
    receive(session, _raw(op="ping"), now=0.0)
    effects: list[Effect] = []
    for _ in range(3):
        effects = receive(session, _raw(op="ping"), now=0.0)
    assert effects[-1] == Close(1008, "too many errors")


# --- settings ---------------------------------------------------------------------


def test_limits_come_from_settings() -> None:
    settings = Settings(
        max_data_bytes=10,
        max_subscriptions=3,
        rate_limit=5.0,
        rate_burst=7,
        error_limit=11,
        error_window=13.0,
    )
    assert Limits.from_settings(settings) == Limits(10, 3, 5.0, 7, 11, 13.0)
    assert Limits() == Limits.from_settings(Settings())
