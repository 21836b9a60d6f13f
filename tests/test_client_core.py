"""The Python client's pure parts: pattern matching, backoff, frame codec, error mapping."""

from __future__ import annotations

import random

import orjson
import pytest

from broker_client import (
    ERROR_CODES,
    Backoff,
    BadFrame,
    BrokerError,
    Forbidden,
    Internal,
    RequestError,
    Timeout,
    error_for_code,
    matches,
)
from broker_client.frames import Message, Reply, Unknown, decode, encode


@pytest.mark.parametrize(
    ("pattern", "channel", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.*", "a", False),
        ("*.b", "a.b", True),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        (">", "a", True),
        (">", "a.b", True),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.b.d", False),
        ("a.*.>", "a.b.c.d", True),
        ("a.*.>", "a.b", False),
    ],
)
def test_matches(pattern: str, channel: str, expected: bool) -> None:
    assert matches(pattern, channel) is expected


def test_backoff_is_jittered_capped_and_resets() -> None:
    backoff = Backoff(0.1, 2.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(20)]
    assert 0 <= delays[0] <= 0.1
    assert all(0.1 <= d <= 2.0 for d in delays[1:])
    assert max(delays) > 1.0  # it grows towards the cap
    assert len(set(delays)) == len(delays)  # jittered
    backoff.reset()
    assert backoff.next_delay() <= 0.1
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_encode_leaves_out_a_missing_id() -> None:
    assert orjson.loads(encode("publish", None, channel="a", data=None)) == {
        "op": "publish",
        "channel": "a",
        "data": None,
    }
    assert orjson.loads(encode("ping", 3)) == {"op": "ping", "id": 3}


def test_decode_server_frames() -> None:
    message = decode(b'{"op":"message","channel":"a.b","data":{"t":1},"offset":7}')
    assert message == Message("a.b", {"t": 1})
    assert isinstance(message, Message) and message.extra == {"offset": 7}
    assert decode('{"op":"ok","id":1}') == Reply("ok", 1)
    error = decode(b'{"op":"error","id":null,"code":"forbidden","message":"no"}')
    assert error == Reply("error", None, "forbidden", "no")
    assert decode(b'{"op":"presence","who":[]}') == Unknown("presence")
    for bad in (b"nope", b"[1]", b'{"op":"message"}', b'{"id":1}', b'{"op":"ok","id":[1]}'):
        with pytest.raises(BadFrame):
            decode(bad)


def test_error_tree() -> None:
    assert len(ERROR_CODES) == 10
    for code in ERROR_CODES:
        exc = error_for_code(code, "why", request_id=5)
        assert exc.code == code and exc.message == "why" and exc.request_id == 5
        assert type(exc) is not RequestError
    assert isinstance(error_for_code("forbidden", "x"), Forbidden)
    assert isinstance(error_for_code("internal", "x"), Internal)
    future = error_for_code("new_code", "from a newer broker")
    assert type(future) is RequestError and future.code == "new_code"
    assert str(future) == "new_code: from a newer broker"
    timeout = Timeout("slow")
    assert isinstance(timeout, BrokerError) and isinstance(timeout, TimeoutError)
    assert timeout.code == "timeout"
