"""The codec: bytes to client frames and server frames to bytes (pure, no sockets)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from broker import codec
from broker.exceptions import BadFrame, BadRequest, RequestError
from broker.frames import SERVER_FRAME, Auth, Ping, Publish, Subscribe, Unsubscribe
from broker.publishing import validate_publish
from broker.wsframe import text_frame


def _decode_error(raw: bytes | str) -> RequestError:
    with pytest.raises(RequestError) as caught:
        codec.decode(raw)
    return caught.value


# --- valid frames -----------------------------------------------------------


def test_decodes_every_op_of_the_protocol() -> None:
    assert codec.decode(b'{"op":"subscribe","id":1,"channel":"sensors.*"}') == Subscribe(
        op="subscribe", id=1, channel="sensors.*"
    )
    assert codec.decode(b'{"op":"unsubscribe","id":2,"channel":"sensors.*"}') == Unsubscribe(
        op="unsubscribe", id=2, channel="sensors.*"
    )
    frame = codec.decode(b'{"op":"publish","id":3,"channel":"s.k","data":{"t":21.5}}')
    assert isinstance(frame, Publish) and (frame.id, frame.channel) == (3, "s.k")
    # A float keeps its text (see test_numbers_are_relayed_exactly_as_written).
    assert orjson.dumps(frame.data) == b'{"t":21.5}'
    keyed = codec.decode(b'{"op":"publish","channel":"s.k","data":1,"key":"k"}')
    assert keyed == Publish(op="publish", channel="s.k", data=1, key="k")
    assert codec.decode(b'{"op":"auth","id":5,"token":"t"}') == Auth(op="auth", id=5, token="t")
    assert codec.decode(b'{"op":"ping","id":4}') == Ping(op="ping", id=4)


def test_decodes_str_input_and_ignores_whitespace() -> None:
    assert codec.decode(' { "op" : "ping" , "id" : "x" } \n') == Ping(op="ping", id="x")


@pytest.mark.parametrize(
    "request_id",
    [0, -1, 2**63 - 1, -(2**63), 2**64 - 1, "", "a", "x" * 64, "\u00e9\u4e2d\U0001f600"],
)
def test_valid_ids(request_id: int | str) -> None:
    raw = orjson.dumps({"op": "ping", "id": request_id})
    assert codec.decode(raw).id == request_id


def test_id_is_optional() -> None:
    assert codec.decode(b'{"op":"ping"}').id is None
    assert codec.decode(b'{"op":"ping","id":null}').id is None


@pytest.mark.parametrize("data", [None, 0, -1.5, "s", [], {}, [1, [2, [3]]], {"a": {"b": None}}])
def test_data_is_any_json_value(data: Any) -> None:
    raw = orjson.dumps({"op": "publish", "channel": "c", "data": data})
    frame = codec.decode(raw)
    assert isinstance(frame, Publish)
    assert orjson.dumps(frame.data) == orjson.dumps(data)


def test_duplicate_keys_last_one_wins() -> None:
    frame = codec.decode(b'{"op":"publish","channel":"a","channel":"b","data":1}')
    assert isinstance(frame, Publish)
    assert frame.channel == "b"


def test_frames_are_frozen() -> None:
    frame = codec.decode(b'{"op":"ping","id":1}')
    with pytest.raises(ValueError, match="frozen"):
        frame.id = 2  # type: ignore[misc]


# --- numbers are never altered ----------------------------------------------------

EXACT = [
    "9007199254740992", "9007199254740993", "-9007199254740993",  # around 2**53
    "9223372036854775807", "9223372036854775808", "-9223372036854775809",  # 2**63
    "18446744073709551615", "18446744073709551616", "-18446744073709551616",  # 2**64
    "123456789012345678901234567890", "-0", "-0.0", "0", "0.0", "1.10",
    "0.1234567890123456789", "3.141592653589793238462643383279", "1e2", "1E2", "1e+2",
    "-1.5e-7", "1e400", "-1e400", "1e-400", "5e-324", "2.2250738585072014e-308",
]  # fmt: skip


@pytest.mark.parametrize("number", EXACT)
def test_numbers_are_relayed_exactly_as_written(number: str) -> None:
    for shape in ("{n}", '[{n}, 1, 0, {{"x": {n}}}]'):
        data = shape.format(n=number)
        for raw in (
            f'{{"op":"publish","channel":"c","data":{data}}}'.encode(),
            f'{{"channel":"c","data":{data}}}'.encode(),
        ):
            frame = codec.decode(raw) if b'"op"' in raw else codec.decode_http_publish(raw)
            assert validate_publish("c", frame.data, 65536) == data.replace(" ", "").encode()


def test_an_id_too_large_for_a_double_is_a_bad_request() -> None:
    error = _decode_error(b'{"op":"ping","id":1e400}')
    assert isinstance(error, BadRequest) and "'id'" in error.message


# --- bad_frame ----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"nope", id="not-json"),
        pytest.param(b'{"op":"ping"', id="truncated"),
        pytest.param(b'{"op":"ping"} {}', id="two-values"),
        pytest.param(b"{'op':'ping'}", id="single-quotes"),
        pytest.param(b'{"op":"ping",}', id="trailing-comma"),
        pytest.param(b"NaN", id="nan"),
        pytest.param(b'{"op":"publish","channel":"a","data":NaN}', id="nan-in-data"),
        pytest.param(b'{"op":"publish","channel":"a","data":Infinity}', id="infinity"),
        pytest.param(b'{"op":"publish","channel":"a","data":-Infinity}', id="minus-infinity"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deep-nesting"),
        pytest.param(b'{"a":' * 2000 + b"1" + b"}" * 2000, id="deep-objects"),
    ],
)
def test_not_json_is_bad_frame(raw: bytes) -> None:
    error = _decode_error(raw)
    assert isinstance(error, BadFrame)
    assert error.code == "bad_frame"
    assert error.request_id is None
    assert error.message


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"null", "null"),
        (b"true", "a boolean"),
        (b"1", "a number"),
        (b'"ping"', "a string"),
        (b'[{"op":"ping","id":1}]', "an array"),
    ],
)
def test_json_that_is_not_an_object_is_bad_frame(raw: bytes, kind: str) -> None:
    error = _decode_error(raw)
    assert isinstance(error, BadFrame)
    assert error.message == f"frame must be a JSON object, got {kind}"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"op":"ping","id":"\xff"}', id="invalid-byte"),
        pytest.param(b'{"op":"ping","id":"\xc3"}', id="truncated-sequence"),
        pytest.param(b'{"op":"ping","id":"\xed\xa0\x80"}', id="encoded-surrogate"),
        pytest.param(b'{"op":"ping","id":"\xc0\xaf"}', id="overlong"),
        pytest.param(b'{"op":"ping","id":"\\ud800"}', id="escaped-lone-surrogate"),
        pytest.param(b"\xff\xfe{}", id="bom-like-garbage"),
    ],
)
def test_invalid_utf8_is_bad_frame(raw: bytes) -> None:
    error = _decode_error(raw)
    assert isinstance(error, BadFrame)
    assert "UTF-8" in error.message


# --- bad_request ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "request_id", "words"),
    [
        ({}, None, "missing field 'op'"),
        ({"id": 7}, 7, "missing field 'op'"),
        ({"op": "nope", "id": 1}, 1, 'unknown op "nope"'),
        ({"op": 5, "id": "x"}, "x", "unknown op 5"),
        ({"op": None}, None, "unknown op null"),
        ({"op": "PING", "id": 2}, 2, "unknown op"),
        ({"op": "subscribe", "id": 3}, 3, "missing field 'channel'"),
        ({"op": "unsubscribe", "id": 3}, 3, "missing field 'channel'"),
        ({"op": "publish", "id": 4, "channel": "a"}, 4, "missing field 'data'"),
        ({"op": "publish", "id": 4, "data": 1}, 4, "missing field 'channel'"),
        ({"op": "ping", "id": 5, "extra": 1}, 5, "unknown field 'extra'"),
        ({"op": "ping", "id": 5, "channel": "a"}, 5, "unknown field 'channel'"),
        ({"op": "subscribe", "id": 6, "channel": "a", "data": 1}, 6, "unknown field 'data'"),
        ({"op": "subscribe", "id": 6, "chanel": "a"}, 6, "unknown field 'chanel'"),
        ({"op": "subscribe", "id": 8, "channel": 5}, 8, "'channel' must be a string"),
        ({"op": "subscribe", "id": 8, "channel": None}, 8, "'channel' must be a string"),
        ({"op": "publish", "id": 8, "channel": ["a"], "data": 1}, 8, "must be a string"),
    ],
)
def test_invalid_frame_is_bad_request_naming_the_problem(
    obj: dict[str, Any], request_id: int | str | None, words: str
) -> None:
    error = _decode_error(orjson.dumps(obj))
    assert isinstance(error, BadRequest)
    assert error.code == "bad_request"
    assert error.request_id == request_id
    assert words in error.message


@pytest.mark.parametrize(
    "bad_id",
    [
        pytest.param(True, id="true"),
        pytest.param(False, id="false"),
        pytest.param(1.0, id="float-1.0"),
        pytest.param(1.5, id="float"),
        pytest.param(2**64, id="beyond-u64-read-as-float"),
        pytest.param(-(2**63) - 1, id="below-i64-read-as-float"),
        pytest.param("x" * 65, id="str-65"),
        pytest.param([1], id="list"),
        pytest.param({"a": 1}, id="object"),
    ],
)
def test_invalid_id_is_bad_request_and_not_echoed(bad_id: Any) -> None:
    raw = b'{"op":"ping","id":' + _json_number_or_value(bad_id) + b"}"
    error = _decode_error(raw)
    assert isinstance(error, BadRequest)
    assert error.request_id is None
    assert "'id' must be an integer or a string of at most 64 characters" in error.message


def _json_number_or_value(value: Any) -> bytes:
    # orjson refuses integers outside 64 bits, but they are valid JSON text.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode()
    return orjson.dumps(value)


def test_error_echoes_a_readable_id_even_when_the_op_is_wrong() -> None:
    error = _decode_error(b'{"op":"nope","id":"req-1"}')
    assert error.request_id == "req-1"
    # ... but not an id that is not a valid id.
    assert _decode_error(b'{"op":"nope","id":true}').request_id is None
    assert _decode_error(b'{"op":"nope","id":"' + b"x" * 65 + b'"}').request_id is None


@pytest.mark.parametrize(
    ("raw", "request_id"),
    [
        (b'{"op":"ping","id":5}', 5),
        (b'{"op":"whatever","id":"x","extra":[1]}', "x"),
        (b'{"id":true}', None),
        (b'{"id":1.0}', None),
        (b'{"id":"' + b"x" * 65 + b'"}', None),
        (b'{"op":"ping"}', None),
        (b"[1]", None),
        (b"junk", None),
        (b'{"id":"\xff"}', None),
        (b"[" * 5000, None),
    ],
)
def test_peek_id_never_raises(raw: bytes, request_id: int | str | None) -> None:
    assert codec.peek_id(raw) == request_id


# --- the service API body -------------------------------------------------------


def test_http_publish_body() -> None:
    body = codec.decode_http_publish(b'{"channel":"a.b","data":[1,2]}')
    assert (body.channel, body.data) == ("a.b", [1, 2])
    with pytest.raises(BadFrame):
        codec.decode_http_publish(b"nope")
    with pytest.raises(BadFrame):
        codec.decode_http_publish(b"[]")
    with pytest.raises(BadFrame):
        codec.decode_http_publish(b'{"channel":"a","data":NaN}')
    with pytest.raises(BadRequest, match="missing field 'data'"):
        codec.decode_http_publish(b'{"channel":"a"}')
    with pytest.raises(BadRequest, match="unknown field 'op'"):
        codec.decode_http_publish(b'{"op":"publish","channel":"a","data":1}')


# --- encoding ------------------------------------------------------------------


def test_encoded_server_frames_validate_against_the_schema_models() -> None:
    frames = [
        codec.encode_ok(1),
        codec.encode_ok("x", {"something_new": 3}),
        codec.encode_pong(4),
        codec.encode_error(None, "bad_frame", "nope"),
        codec.encode_error("id", "internal", "bug"),
        codec.encode_message("sensors.kitchen", codec.encode_data({"t": 21.5})),
    ]
    for raw in frames:
        SERVER_FRAME.validate_json(raw)
    assert orjson.loads(frames[1]) == {"op": "ok", "id": "x", "something_new": 3}
    assert orjson.loads(frames[5]) == {
        "op": "message",
        "channel": "sensors.kitchen",
        "data": {"t": 21.5},
    }


def test_encode_data_is_compact_and_keeps_key_order() -> None:
    assert codec.encode_data({"b": 1, "a": [1, 2, {"c": None}]}) == b'{"b":1,"a":[1,2,{"c":null}]}'
    assert codec.encode_data("\u00e9") == '"\u00e9"'.encode()


def test_encode_data_serializes_deep_nesting_past_orjsons_limit() -> None:
    # orjson stops at 254 levels; the fallback takes over, byte for byte compact.
    assert codec.encode_data(_nested(255)) == b"[" * 255 + b"]" * 255
    assert codec.encode_data(_nested(codec.MAX_DATA_DEPTH)) == (
        b"[" * codec.MAX_DATA_DEPTH + b"]" * codec.MAX_DATA_DEPTH
    )
    assert codec.encode_data([{"k": _nested(300), "u": "\u00e9"}]).endswith(b',"u":"\xc3\xa9"}]')


def test_encode_data_refuses_nesting_beyond_what_it_can_serialize() -> None:
    with pytest.raises(BadRequest, match="nested deeper than 900 levels"):
        codec.encode_data(_nested(1020))


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_header_for_every_length_class(length: int) -> None:
    payload = b"x" * length
    frame = text_frame(payload)
    assert frame[0] == 0x81  # FIN, text, no RSV bits
    assert frame[1] & 0x80 == 0  # server frames are not masked
    if length < 126:
        header, size = 2, frame[1]
    elif length < 65536:
        header, size = 4, int.from_bytes(frame[2:4], "big")
        assert frame[1] == 126
    else:
        header, size = 10, int.from_bytes(frame[2:10], "big")
        assert frame[1] == 127
    assert size == length
    assert frame[header:] == payload
    # Cross-check with the parser of websockets itself, as a client would read it.
    reader = StreamReader()
    reader.feed_data(frame)
    parser = Frame.parse(reader.read_exact, mask=False)
    with pytest.raises(StopIteration) as done:
        next(parser)
    parsed = done.value.value
    assert (parsed.opcode, parsed.fin, bytes(parsed.data)) == (Opcode.TEXT, True, payload)
