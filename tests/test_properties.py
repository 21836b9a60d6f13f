"""Property: whatever a client sends, it gets well-formed answers and nothing dies.

Random frames (JSON values, plausible frames with random fields, random bytes
including invalid UTF-8, binary frames) go to a real broker over one
connection per example. After each frame a ping with a fresh id acts as a
barrier, so every answer to that frame is seen and attributed to it:

* every frame the server sends validates against ``broker.frames.SERVER_FRAME``;
* a frame that cannot be decoded gets exactly one ``error`` with the code and id
  the codec decides; a request with an id gets exactly one reply with that id;
  a request without one gets nothing or one ``error`` with ``id: null``;
* the connection stays open (the barrier is answered) and the server keeps
  accepting connections (every example opens a new one).

One broker serves the whole module: it runs in an event loop of its own, which
each example drives with ``run_until_complete``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect

from broker import codec
from broker.app import Running
from broker.exceptions import RequestError
from broker.frames import SERVER_FRAME
from tests.inproc import running_broker
from tests.wait import within

SYNC = "\u00a7sync"  # barrier ids start with this; random ids never do

Frame = tuple[bool, bytes]  # (is text, payload)


# --- strategies ------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=10,
)
ids = (
    st.integers(-(2**65), 2**65)
    | st.text(max_size=70).filter(lambda s: not s.startswith(SYNC))
    | st.booleans()
    | st.floats()
    | st.none()
    | st.lists(st.integers(), max_size=2)
)
channels = (
    st.sampled_from(["a", "a.b", "a.*", "a.>", ">", "*", "", "a..b", "a b", "x" * 256, "a.>.b"])
    | st.text(alphabet="ab.*>", max_size=8)
    | st.text(max_size=8)
    | st.integers()
    | st.none()
)
ops = st.sampled_from(["subscribe", "unsubscribe", "publish", "ping", "nope", "PING", ""]) | scalars
plausible = st.fixed_dictionaries(
    {"op": ops},
    optional={"id": ids, "channel": channels, "data": json_values, "extra": json_values},
).map(lambda frame: frame if frame["op"] != "" else {k: v for k, v in frame.items() if k != "op"})


def _dump(value: Any, ascii_only: bool) -> bytes:
    """Serialize with the standard module: it writes NaN, Infinity, big integers and
    (without ASCII escaping) lone surrogates as invalid UTF-8, all of which a hostile
    client may send."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


text_json = st.builds(_dump, json_values | plausible, st.booleans())
frames: st.SearchStrategy[Frame] = st.one_of(
    st.tuples(st.just(True), text_json),
    st.tuples(st.just(True), st.binary(max_size=40)),
    st.tuples(
        st.just(True), st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass"))
    ),
    st.tuples(st.just(False), st.binary(max_size=40) | text_json),
)


# --- the broker, one per module ------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[asyncio.AbstractEventLoop, Running]]:
    loop = asyncio.new_event_loop()
    broker_cm = running_broker(error_limit=1_000_000)
    try:
        broker = loop.run_until_complete(broker_cm.__aenter__())
        try:
            yield loop, broker
        finally:
            loop.run_until_complete(broker_cm.__aexit__(None, None, None))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# --- the oracle ----------------------------------------------------------------------


def check_replies(frame: Frame, replies: list[dict[str, Any]]) -> None:
    """Check the non-message frames the server answered ``frame`` with."""
    text, payload = frame
    for reply in replies:
        if reply["op"] == "error":
            assert set(reply) == {"op", "id", "code", "message"}, reply
    if not text:
        assert len(replies) == 1, replies
        assert (replies[0]["op"], replies[0]["code"], replies[0]["id"]) == (
            "error",
            "bad_frame",
            None,
        )
        return
    try:
        decoded = codec.decode(payload)
    except RequestError as exc:
        assert len(replies) == 1, replies
        assert (replies[0]["op"], replies[0]["code"], replies[0]["id"]) == (
            "error",
            exc.code,
            exc.request_id,
        )
        return
    if decoded.id is not None:
        assert len(replies) == 1, replies
        assert replies[0]["op"] in {"ok", "pong", "error"}
        assert replies[0]["id"] == decoded.id
        assert type(replies[0]["id"]) is type(decoded.id)
        if replies[0]["op"] == "pong":
            assert decoded.op == "ping"
    else:
        assert len(replies) <= 1, replies
        if replies:
            assert (replies[0]["op"], replies[0]["id"]) == ("error", None)


async def _recv(ws: ClientConnection) -> dict[str, Any]:
    frame: dict[str, Any] = orjson.loads(await within(ws.recv()))
    SERVER_FRAME.validate_python(frame)  # every server frame is well formed
    return frame


async def exchange(broker: Running, sequence: list[Frame]) -> None:
    async with connect(f"ws://127.0.0.1:{broker.ws_port}/ws") as ws:
        for n, frame in enumerate(sequence):
            text, payload = frame
            await ws.send(payload, text=text)
            barrier = f"{SYNC}-{n}"
            await ws.send(orjson.dumps({"op": "ping", "id": barrier}), text=True)
            replies: list[dict[str, Any]] = []
            for _ in range(1000):
                reply = await _recv(ws)
                if reply == {"op": "pong", "id": barrier}:
                    break
                if reply["op"] != "message":
                    replies.append(reply)
            else:
                raise AssertionError("the barrier was never answered")
            check_replies(frame, replies)
        # Still open, still answering.
        await ws.send(b'{"op":"ping","id":"end"}', text=True)
        while (reply := await _recv(ws))["op"] == "message":
            pass
        assert reply == {"op": "pong", "id": "end"}
    assert ws.close_code == 1000


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(sequence=st.lists(frames, min_size=1, max_size=8))
def test_random_frames_get_well_formed_answers_and_kill_nothing(
    served: tuple[asyncio.AbstractEventLoop, Running], sequence: list[Frame]
) -> None:
    loop, broker = served
    loop.run_until_complete(exchange(broker, sequence))


async def _post(broker: Running, body: bytes) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{broker.http_port}/publish",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as response,
    ):
        return response.status, orjson.loads(await response.read())


http_bodies = st.one_of(
    text_json,
    st.binary(max_size=40),
    st.builds(
        lambda channel, data, extra, ascii_only: _dump(
            {"channel": channel, "data": data, **extra}, ascii_only
        ),
        channels,
        json_values,
        st.dictionaries(st.sampled_from(["id", "op", "x"]), scalars, max_size=1),
        st.booleans(),
    ),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=http_bodies)
def test_random_http_publish_bodies_get_a_well_formed_answer(
    served: tuple[asyncio.AbstractEventLoop, Running], body: bytes
) -> None:
    loop, broker = served
    status, reply = loop.run_until_complete(_post(broker, body))
    if status == 200:
        assert reply == {"ok": True}
        return
    assert status in {400, 413}, (status, reply)
    assert set(reply) == {"error"}
    assert set(reply["error"]) == {"code", "message"}
    try:
        frame = codec.decode_http_publish(body)
    except RequestError as exc:
        assert (status, reply["error"]["code"]) == (exc.http_status, exc.code)
    else:
        # Decodes, so it failed on the channel or the data.
        assert reply["error"]["code"] in {"bad_channel", "bad_request", "too_large"}, frame


def test_the_server_still_accepts_connections_after_all_that(
    served: tuple[asyncio.AbstractEventLoop, Running],
) -> None:
    loop, broker = served

    async def check() -> None:
        await exchange(broker, [(True, b'{"op":"subscribe","id":1,"channel":"a"}')])
        assert broker.node.metrics.connections_opened > 0
        assert broker.node.metrics.errors["internal"] == 0

    loop.run_until_complete(check())
