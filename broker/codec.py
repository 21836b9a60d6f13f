"""Bytes to frames and frames to bytes: the only module that touches JSON.

Decoding parses once with orjson (which refuses ``NaN``, ``Infinity``,
numbers that overflow a double and lone surrogates, so none of them can reach
a browser) and validates that one object with pydantic. Encoding of server
frames is done by hand with pre-serialized pieces, because a message is built
once and then written to thousands of connections.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from pydantic import ValidationError

from broker.exceptions import BadFrame, BadRequest
from broker.frames import CLIENT_FRAME, HttpPublish, Ping, Publish, Subscribe, Unsubscribe

AnyClientFrame = Subscribe | Unsubscribe | Publish | Ping

_OPS = ("subscribe", "unsubscribe", "publish", "ping")

# pydantic-core's validator itself: TypeAdapter.validate_python adds a Python
# layer that costs a third of the validation of a small frame.
_validate_frame = CLIENT_FRAME.validator.validate_python

#: orjson parses up to 1,024 levels of nesting; ``encode_data`` serializes at
#: least this many (the standard library's recursion limit bounds it).
MAX_PARSE_DEPTH = 1024
MAX_DATA_DEPTH = 900


def decode(raw: bytes | str) -> AnyClientFrame:
    """Parse and validate one client frame.

    Raises ``BadFrame`` when ``raw`` is not a JSON object and ``BadRequest``
    when it is one but not a valid frame; both carry the frame's ``id`` in
    ``request_id`` when that much could be read, so the error reply can too.
    """
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        reason = str(exc)
        if "depth limit" in reason:
            raise BadFrame(f"frame is nested deeper than {MAX_PARSE_DEPTH} levels") from None
        if "UTF-8" in reason or "surrogate" in reason:
            raise BadFrame(f"frame is not valid UTF-8 JSON: {reason}") from None
        raise BadFrame(f"frame is not valid JSON: {reason}") from None
    if not isinstance(obj, dict):
        raise BadFrame(f"frame must be a JSON object, got {_json_type(obj)}")
    request_id = _readable_id(obj.get("id"))
    try:
        frame: AnyClientFrame = _validate_frame(obj)
        return frame
    except ValidationError as exc:
        raise BadRequest(_describe(exc, obj), request_id=request_id) from None


def peek_id(raw: bytes | str) -> int | str | None:
    """Return the frame's ``id`` if it is a JSON object with a valid one, else None.

    For errors decided before a frame is validated (``rate_limited``), so that
    their reply still carries the request's id. Never raises.
    """
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return _readable_id(obj.get("id")) if isinstance(obj, dict) else None


def decode_http_publish(raw: bytes) -> HttpPublish:
    """Parse the body of ``POST /publish``; raises ``BadFrame`` or ``BadRequest``."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadFrame(f"body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadFrame(f"body must be a JSON object, got {_json_type(obj)}")
    try:
        return HttpPublish.model_validate(obj)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "body"
            if error["type"] == "missing":
                problems.append(f"missing field '{field}'")
            elif error["type"] == "extra_forbidden":
                problems.append(f"unknown field '{field}'")
            else:
                problems.append(f"'{field}': {error['msg']}")
        raise BadRequest("; ".join(problems)) from None


def encode_data(value: Any) -> bytes:
    """Serialize a publish's ``data`` once; raises ``BadRequest`` if it cannot be.

    orjson serializes at most 254 levels of nesting; deeper (but parseable)
    values go through the standard library, which manages several hundred
    more. ``value`` came from orjson, so it holds no NaN or lone surrogate.
    """
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        if "Recursion" not in str(exc):
            raise BadRequest(f"data cannot be serialized: {exc}") from None
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except RecursionError:
        raise BadRequest(f"data is nested deeper than {MAX_DATA_DEPTH} levels") from None
    return text.encode()


def encode_message(channel: str, data: bytes) -> bytes:
    """Build a ``message`` frame from a validated channel and serialized data.

    Channel names are ASCII without quotes or backslashes (see ``channels``),
    so they need no escaping.
    """
    return b'{"op":"message","channel":"' + channel.encode() + b'","data":' + data + b"}"


def encode_ok(request_id: int | str, extra: dict[str, Any] | None = None) -> bytes:
    """Build an ``ok`` reply; ``extra`` adds fields (the protocol allows more)."""
    frame: dict[str, Any] = {"op": "ok", "id": request_id}
    if extra:
        frame.update(extra)
    return orjson.dumps(frame)


def encode_pong(request_id: int | str | None) -> bytes:
    """Build a ``pong`` reply."""
    return orjson.dumps({"op": "pong", "id": request_id})


def encode_error(request_id: int | str | None, code: str, message: str) -> bytes:
    """Build an ``error`` frame."""
    return orjson.dumps({"op": "error", "id": request_id, "code": code, "message": message})


def _readable_id(value: object) -> int | str | None:
    """Return ``value`` if it is a valid request id, so an error can echo it."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and len(value) <= 64):
        return value
    return None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _describe(exc: ValidationError, obj: dict[str, Any]) -> str:
    """Turn pydantic's errors into one short sentence naming the field."""
    op = obj.get("op")
    if "op" not in obj:
        return "missing field 'op' (one of: " + ", ".join(_OPS) + ")"
    if not isinstance(op, str) or op not in _OPS:
        shown = orjson.dumps(op).decode()[:40]
        return f"unknown op {shown} (expected one of: " + ", ".join(_OPS) + ")"
    problems: list[str] = []
    seen: set[str] = set()
    for error in exc.errors():
        loc = [str(part) for part in error["loc"][1:]]
        field = loc[0] if loc else "frame"
        if field in seen:
            continue  # the id union reports once per member; one line is enough
        seen.add(field)
        kind = error["type"]
        if kind == "missing":
            problems.append(f"missing field '{field}'")
        elif kind == "extra_forbidden":
            problems.append(f"unknown field '{field}'")
        elif field == "id":
            problems.append("'id' must be an integer or a string of at most 64 characters")
        elif kind == "string_type":
            problems.append(f"'{field}' must be a string")
        else:
            problems.append(f"'{field}': {error['msg']}")
    return f"{op}: " + "; ".join(problems)
