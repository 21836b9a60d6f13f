"""Bytes to frames and frames to bytes: the JSON of the wire protocol.

Decoding parses once with orjson (which refuses ``NaN``, ``Infinity`` and
lone surrogates, so none of them can reach a browser) and validates that one
object with pydantic. Encoding of server frames is done by hand with
pre-serialized pieces, because a message is built once and then written to
thousands of connections.

Numbers are relayed exactly as sent. orjson reads every number into an
``int`` or a ``float``, and writing a float back can change its text
(``1.10``, ``1e2``, ``0.1234567890123456789``), as can ``-0`` and integers
beyond 64 bits. So when a publish's ``data`` holds a float (or an integer
zero that might have been ``-0``), the frame is read again by the standard
library with every such number kept as its original text
(``orjson.Fragment``), which orjson then writes back verbatim. Payloads
without floats, the common case for counters and strings, never pay for it.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from pydantic import ValidationError

from broker.exceptions import BadFrame, BadRequest
from broker.frames import CLIENT_FRAME, AnyClientFrame, HttpPublish
from broker.position import Position

_OPS = ("subscribe", "unsubscribe", "publish", "ping", "auth")

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
    obj = _load_object(raw, "frame")
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
    obj = _load_object(raw, "body")
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
    if _has_fragment(value):
        raise BadRequest(
            "data with fractional or very large numbers nested deeper than 254 levels "
            "cannot be relayed exactly"
        ) from None
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except RecursionError:
        raise BadRequest(f"data is nested deeper than {MAX_DATA_DEPTH} levels") from None
    return text.encode()


def encode_message(channel: str, data: bytes, position: Position | None = None) -> bytes:
    """Build a ``message`` frame from a validated channel and serialized data.

    Channel names and epochs are ASCII without quotes or backslashes (see
    ``channels``; epochs are checked where they enter), so they need no
    escaping. ``position`` adds ``offset`` and ``epoch``.
    """
    head = b'{"op":"message","channel":"'
    if position is None:
        return b"".join((head, channel.encode(), b'","data":', data, b"}"))
    tail = b',"offset":%d,"epoch":"%s"}' % (position.offset, position.epoch.encode())
    return b"".join((head, channel.encode(), b'","data":', data, tail))


def encode_ok(request_id: int | str, extra: dict[str, Any] | None = None) -> bytes:
    """Build an ``ok`` reply; ``extra`` adds fields (the protocol allows more)."""
    frame: dict[str, Any] = {"op": "ok", "id": request_id}
    if extra:
        frame.update(extra)
    return orjson.dumps(frame)


def encode_unsubscribed(channel: str, code: str) -> bytes:
    """Build an ``unsubscribed`` frame: the broker ended the subscription ``channel``."""
    return orjson.dumps({"op": "unsubscribed", "channel": channel, "code": code})


def encode_gap(channel: str, reason: str) -> bytes:
    """Build a ``gap`` frame: messages of the subscription ``channel`` may be lost."""
    return orjson.dumps({"op": "gap", "channel": channel, "reason": reason})


def encode_pong(request_id: int | str | None) -> bytes:
    """Build a ``pong`` reply."""
    return orjson.dumps({"op": "pong", "id": request_id})


def check_data(raw: bytes) -> None:
    """Raise ``BadFrame`` unless ``raw`` is one JSON value.

    For data that arrives from outside programs through the backplane: it is
    relayed as written, so only its validity matters, and a number a double
    cannot hold (``1e400``) is valid JSON like any other.
    """
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "infinity" not in str(exc):
            raise BadFrame(f"data is not JSON: {exc}") from None
        _load_exact(raw, "data")


def encode_error(request_id: int | str | None, code: str, message: str) -> bytes:
    """Build an ``error`` frame."""
    return orjson.dumps({"op": "error", "id": request_id, "code": code, "message": message})


def encode_http_error(code: str, message: str) -> bytes:
    """Build the service API's error body, ``{"error": {"code", "message"}}``."""
    return orjson.dumps({"error": {"code": code, "message": message}})


def encode_http_json(fields: dict[str, Any]) -> bytes:
    """Build any other JSON body of the service API (``{"ok": true, ...}``, health)."""
    return orjson.dumps(fields)


def _load_object(raw: bytes | str, what: str) -> dict[str, Any]:
    """Parse a JSON object, keeping the text of a ``data`` value's numbers when it matters."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        reason = str(exc)
        if "infinity" in reason:
            # Valid JSON (1e400) that a double cannot hold: relayed as written.
            obj = _load_exact(raw, what)
        elif "depth limit" in reason:
            raise BadFrame(f"{what} is nested deeper than {MAX_PARSE_DEPTH} levels") from None
        elif "UTF-8" in reason or "surrogate" in reason:
            raise BadFrame(f"{what} is not valid JSON (not UTF-8): {reason}") from None
        else:
            raise BadFrame(f"{what} is not valid JSON: {reason}") from None
    if not isinstance(obj, dict):
        raise BadFrame(f"{what} must be a JSON object, got {_json_type(obj)}")
    if "data" in obj:
        risk = _numbers_at_risk(obj["data"])
        if risk == 2 or (risk == 1 and b"-0" in _as_bytes(raw)):
            obj = _load_exact(raw, what)
    result: dict[str, Any] = obj
    return result


def _numbers_at_risk(value: object) -> int:
    """2 if ``value`` holds a float, 1 if it holds an integer zero (maybe ``-0``), else 0.

    Iterative: ``data`` may be nested about a thousand levels deep.
    """
    risk = 0
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is float:
            return 2
        if kind is int:
            if item == 0:
                risk = 1
        elif kind is dict:
            stack.extend(item.values())  # type: ignore[attr-defined]
        elif kind is list:
            stack.extend(item)  # type: ignore[arg-type]
    return risk


def _as_bytes(raw: bytes | str) -> bytes:
    return raw if isinstance(raw, bytes) else raw.encode()


def _number_text(text: str) -> Any:
    return orjson.Fragment(text.encode())


def _int_text(text: str) -> Any:
    value = int(text)
    # "-0" keeps its sign; orjson writes integers of 64 bits only.
    if text.startswith("-0") or not -(2**63) <= value < 2**64:
        return orjson.Fragment(text.encode())
    return value


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_EXACT = json.JSONDecoder(
    parse_float=_number_text, parse_int=_int_text, parse_constant=_no_constants
)


def _load_exact(raw: bytes | str, what: str) -> Any:
    """The slow, exact reading: numbers that would change keep their text."""
    try:
        return _EXACT.decode(raw if isinstance(raw, str) else raw.decode())
    except RecursionError:
        raise BadFrame(f"{what} is nested too deeply to relay its numbers exactly") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadFrame(f"{what} is not valid JSON: {exc}") from None


def _has_fragment(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, orjson.Fragment):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


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
        # Name nested fields (since.offset); union branch names (id.int) are noise.
        field = ".".join(loc[:2]) if len(loc) > 1 and loc[0] == "since" else (loc or ["frame"])[0]
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
        elif kind == "value_error":  # our own validators' sentences, without pydantic's label
            problems.append(f"'{field}': {error['ctx']['error']}")
        else:
            problems.append(f"'{field}': {error['msg']}")
    return f"{op}: " + "; ".join(problems)
