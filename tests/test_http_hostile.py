"""The service API under hostile input, over raw sockets.

Each case sends bytes no well-behaved client would, and checks that the
answer is a JSON error with the right status and code, that the connection
is closed where it must be (and kept where it may be), that the broker still
serves afterwards, and that nothing was logged at warning or above or with a
traceback: a client's garbage is an answer, never an error of ours.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from broker.app import Running
from tests.inproc import running_broker
from tests.rawhttp import JSON_POST, assert_error, assert_quiet, raw
from tests.wait import within

TIMEOUT = 0.5  # http_timeout of these tests, seconds


@asynccontextmanager
async def hostile_broker(
    caplog: pytest.LogCaptureFixture, **overrides: Any
) -> AsyncIterator[Running]:
    """A broker with a short ``http_timeout``; on exit: still serving, nothing logged."""
    caplog.set_level(logging.DEBUG)
    values: dict[str, Any] = {"http_timeout": TIMEOUT, "max_frame_bytes": 4096}
    values["max_data_bytes"] = 1024
    values.update(overrides)
    async with running_broker(**values) as broker:
        yield broker
        await assert_serving(broker)
    assert_quiet(caplog)


async def assert_serving(broker: Running) -> None:
    async with raw(broker.http_port) as client:
        await client.send("GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n")
        reply = await client.reply()
        assert (reply.status, reply.json) == (200, {"status": "ok"})


def client_hello() -> bytes:
    """The first bytes a TLS client sends: a real ClientHello."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="api")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# --- one request, one error, then the connection closes ---------------------------------

CLOSING: dict[str, tuple[bytes | str, int, str, str]] = {
    "negative Content-Length": (
        JSON_POST + "Content-Length: -1\r\n\r\n",
        400,
        "bad_frame",
        "Content-Length",
    ),
    "non-numeric Content-Length": (
        JSON_POST + "Content-Length: twelve\r\n\r\n",
        400,
        "bad_frame",
        "Content-Length",
    ),
    "Content-Length of 25 digits": (
        JSON_POST + "Content-Length: " + "9" * 25 + "\r\n\r\n",
        400,
        "bad_frame",
        "Content-Length",
    ),
    "two different Content-Lengths": (
        JSON_POST + "Content-Length: 3\r\nContent-Length: 4\r\n\r\n{}",
        400,
        "bad_frame",
        "Content-Length",
    ),
    "huge Content-Length": (
        JSON_POST + "Content-Length: 1000000000000000\r\n\r\n{",
        413,
        "too_large",
        "1000000000000000 bytes",
    ),
    "Content-Length and Transfer-Encoding": (
        JSON_POST + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "bad_frame",
        "ambiguous",
    ),
    "Transfer-Encoding other than chunked": (
        JSON_POST + "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        400,
        "bad_frame",
        "chunked",
    ),
    "chunk size not hex": (
        JSON_POST + "Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        400,
        "bad_frame",
        "chunk",
    ),
    "negative chunk size": (
        JSON_POST + "Transfer-Encoding: chunked\r\n\r\n-2\r\n{}\r\n0\r\n\r\n",
        400,
        "bad_frame",
        "chunk",
    ),
    "chunk size of 24 hex digits": (
        JSON_POST + "Transfer-Encoding: chunked\r\n\r\n" + "f" * 24 + "\r\n{}\r\n",
        400,
        "bad_frame",
        "chunk",
    ),
    "chunk longer than its size": (
        JSON_POST + "Transfer-Encoding: chunked\r\n\r\n2\r\n{}}}\r\n0\r\n\r\n",
        400,
        "bad_frame",
        "chunk",
    ),
    "chunk size of 2**64 - 1 and a stream of bytes": (
        JSON_POST + "Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n" + "x" * 5000,
        413,
        "too_large",
        "4096-byte cap",
    ),
    "Content-Encoding deflate and garbage": (
        JSON_POST.encode()
        + b"Content-Encoding: deflate\r\nContent-Length: 16\r\n\r\n"
        + bytes(range(240, 256)),
        415,
        "bad_request",
        "Content-Encoding",
    ),
    "Content-Encoding gzip": (
        JSON_POST + "Content-Encoding: identity, gzip\r\nContent-Length: 2\r\n\r\n{}",
        415,
        "bad_request",
        "Content-Encoding",
    ),
    "text/plain POST (a cross-site form)": (
        "POST /publish HTTP/1.1\r\nHost: api\r\nContent-Type: text/plain\r\n"
        'Content-Length: 24\r\n\r\n{"channel":"a","data":1}',
        415,
        "bad_request",
        "application/json",
    ),
    "POST without Content-Type (a cross-site Blob)": (
        'POST /publish HTTP/1.1\r\nHost: api\r\nContent-Length: 24\r\n\r\n{"channel":"a","data":1}',
        415,
        "bad_request",
        "application/json",
    ),
    "an 8 KB header": (
        "GET /healthz HTTP/1.1\r\nHost: api\r\nX-Big: " + "a" * 8192 + "\r\n\r\n",
        431,
        "too_large",
        "8192-byte cap",
    ),
    "a 20 KB header line that never ends": (
        "GET /healthz HTTP/1.1\r\nHost: api\r\nX-Big: " + "a" * 20000,
        431,
        "too_large",
        "8192-byte cap",
    ),
    "500 headers": (
        "GET /healthz HTTP/1.1\r\nHost: api\r\n"
        + "".join(f"X-{i}: y\r\n" for i in range(500))
        + "\r\n",
        431,
        "too_large",
        "header fields",
    ),
    "TLS ClientHello on the plain port": (client_hello(), 400, "bad_frame", "TLS"),
    "a request line of garbage": ("\x00\x01garbage\xff\r\n\r\n", 400, "bad_frame", "malformed"),
    "words, not a request": ("hello broker, please publish\r\n\r\n", 400, "bad_frame", "malformed"),
    "no Host header in HTTP/1.1": ("GET /healthz HTTP/1.1\r\n\r\n", 400, "bad_frame", "Host"),
    "two Host headers": (
        "GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        400,
        "bad_frame",
        "Host",
    ),
    "a NUL in a header": (
        "GET /healthz HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
        400,
        "bad_frame",
        "",
    ),
    "a space before the colon": ("GET /healthz HTTP/1.1\r\nHost : a\r\n\r\n", 400, "bad_frame", ""),
    "HTTP/2 prior knowledge": (
        "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        505,
        "bad_frame",
        "HTTP/2.0",
    ),
    "HTTP/1.2": ("GET /healthz HTTP/1.2\r\nHost: api\r\n\r\n", 505, "bad_frame", "HTTP/1.2"),
}


@pytest.mark.parametrize("case", list(CLOSING))
async def test_hostile_request_gets_a_json_error_and_the_connection_closes(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    data, status, code, words = CLOSING[case]
    async with hostile_broker(caplog) as broker, raw(broker.http_port) as client:
        await client.send(data)
        reply = await client.reply()
        assert_error(reply, status, code, words)
        assert await client.closed()
        if status >= 400 and status != 405:
            errors = broker.node.metrics.errors[code]
            assert errors == 1, errors


# --- errors that keep the connection --------------------------------------------------

KEEPING: dict[str, tuple[str, int, str, str]] = {
    "unknown method": ("BREW /publish HTTP/1.1\r\nHost: api\r\n\r\n", 405, "bad_request", "BREW"),
    "OPTIONS (a CORS preflight)": (
        "OPTIONS /publish HTTP/1.1\r\nHost: api\r\nOrigin: https://evil.example\r\n"
        "Access-Control-Request-Method: POST\r\n\r\n",
        405,
        "bad_request",
        "OPTIONS",
    ),
    "unknown path": ("GET /admin HTTP/1.1\r\nHost: api\r\n\r\n", 404, "bad_request", "/admin"),
    "a path through ..": (
        "GET /healthz/../metrics HTTP/1.1\r\nHost: api\r\n\r\n",
        404,
        "bad_request",
        "Not Found",
    ),
    "a path out of the root": (
        "GET /../../etc/passwd HTTP/1.1\r\nHost: api\r\n\r\n",
        404,
        "bad_request",
        "Not Found",
    ),
    "a percent-encoded path": (
        "GET /%6detrics HTTP/1.1\r\nHost: api\r\n\r\n",
        404,
        "bad_request",
        "Not Found",
    ),
    "an absolute URL as target": (
        "GET http://evil.example/healthz HTTP/1.1\r\nHost: api\r\n\r\n",
        400,
        "bad_request",
        "must be a path",
    ),
    "a body that is not JSON": (
        JSON_POST + "Content-Length: 4\r\n\r\nnope",
        400,
        "bad_frame",
        "not valid JSON",
    ),
    "POST without a length": (JSON_POST + "\r\n", 411, "bad_request", "Content-Length"),
    "two Content-Types": (
        JSON_POST + "Content-Type: text/plain\r\nContent-Length: 0\r\n\r\n",
        400,
        "bad_request",
        "content-type",
    ),
}


@pytest.mark.parametrize("case", list(KEEPING))
async def test_request_error_keeps_the_connection(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    data, status, code, words = KEEPING[case]
    async with hostile_broker(caplog) as broker, raw(broker.http_port) as client:
        await client.send(data)
        reply = await client.reply()
        assert_error(reply, status, code, words)
        if status == 405:
            assert reply.headers["allow"] in {"POST", "GET, HEAD"}
        assert "connection" not in reply.headers
        await client.send("GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n")
        assert (await client.reply()).json == {"status": "ok"}


# --- time-outs -------------------------------------------------------------------


async def test_a_body_shorter_than_its_length_gets_408_within_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with hostile_broker(caplog) as broker, raw(broker.http_port) as client:
        start = time.monotonic()
        await client.send(JSON_POST + 'Content-Length: 100\r\n\r\n{"channel":"a","data":1}')
        reply = await client.reply(timeout=TIMEOUT + 2)
        elapsed = time.monotonic() - start
        assert_error(reply, 408, "bad_request", "body not received")
        assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 1.5, elapsed
        assert await client.closed()
        assert broker.node.metrics.messages_published == 0


async def test_a_body_longer_than_its_length_is_a_bad_body_then_a_bad_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with hostile_broker(caplog) as broker, raw(broker.http_port) as client:
        await client.send(JSON_POST + 'Content-Length: 5\r\n\r\n{"channel":"a","data":1}')
        assert_error(await client.reply(), 400, "bad_frame", "not valid JSON")
        # The rest is the start of the next request, which never ends...
        assert_error(await client.reply(timeout=TIMEOUT + 2), 408, "bad_request", "head")
        assert await client.closed()
    async with hostile_broker(caplog) as broker, raw(broker.http_port) as client:
        await client.send(JSON_POST + 'Content-Length: 5\r\n\r\n{"channel":"a","data":1}\r\n\r\n')
        assert_error(await client.reply(), 400, "bad_frame", "not valid JSON")
        # ... or is garbage.
        assert_error(await client.reply(), 400, "bad_frame", "malformed")
        assert await client.closed()
        assert broker.node.metrics.messages_published == 0


async def test_slowloris_sending_headers_a_byte_at_a_time_gets_408(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with hostile_broker(caplog) as broker, raw(broker.http_port) as client:
        start = time.monotonic()
        answer = asyncio.create_task(client.reply(timeout=TIMEOUT + 2))
        head = b"GET /healthz HTTP/1.1\r\nHost: api\r\nX-Slow: " + b"a" * 1000
        for byte in head:
            if answer.done():
                break
            await client.send(bytes([byte]))
            await asyncio.sleep(0.02)
        assert_error(await answer, 408, "bad_request", "head not received")
        assert time.monotonic() - start < TIMEOUT + 1.5
        assert await client.closed()


async def test_an_idle_keep_alive_connection_is_closed_without_a_word(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with hostile_broker(caplog) as broker, raw(broker.http_port) as client:
        await client.send("GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n")
        assert (await client.reply()).status == 200
        start = time.monotonic()
        assert await client.closed(timeout=TIMEOUT + 2)
        assert TIMEOUT * 0.9 <= time.monotonic() - start < TIMEOUT + 1.5
    async with hostile_broker(caplog) as broker, raw(broker.http_port) as client:
        assert await client.closed(timeout=TIMEOUT + 2)  # connected, never said a thing


# --- keep-alive, pipelining, Expect ------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(caplog: pytest.LogCaptureFixture) -> None:
    async with hostile_broker(caplog) as broker, raw(broker.http_port) as client:
        publish = JSON_POST + 'Content-Length: 24\r\n\r\n{"channel":"a","data":1}'
        await client.send(
            "GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n"
            + publish
            + "GET /nope HTTP/1.1\r\nHost: api\r\n\r\n"
            + "GET /readyz HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
        )
        assert (await client.reply()).json == {"status": "ok"}
        assert (await client.reply()).json == {"ok": True}
        assert_error(await client.reply(), 404, "bad_request", "/nope")
        last = await client.reply()
        assert last.json["status"] == "ready"
        assert last.headers["connection"].lower() == "close"
        assert await client.closed()
        assert broker.node.metrics.messages_published == 1


async def test_pipelined_garbage_after_a_good_request(caplog: pytest.LogCaptureFixture) -> None:
    async with hostile_broker(caplog) as broker, raw(broker.http_port) as client:
        await client.send("GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n\x16\x03\x01garbage\r\n\r\n")
        assert (await client.reply()).json == {"status": "ok"}
        assert_error(await client.reply(), 400, "bad_frame")
        assert await client.closed()


async def test_expect_100_continue(caplog: pytest.LogCaptureFixture) -> None:
    async with hostile_broker(caplog) as broker, raw(broker.http_port) as client:
        await client.send(JSON_POST + "Content-Length: 24\r\nExpect: 100-continue\r\n\r\n")
        go_on = await within(client.reader.readuntil(b"\r\n\r\n"))
        assert go_on.startswith(b"HTTP/1.1 100 ")
        await client.send('{"channel":"a","data":1}')
        assert (await client.reply()).json == {"ok": True}
        # Refused before the body: no 100, and the client need not send it.
        await client.send("POST /publish HTTP/1.1\r\nHost: api\r\nContent-Length: 24\r\n")
        await client.send("Expect: 100-continue\r\n\r\n")
        assert_error(await client.reply(), 415, "bad_request")
        assert await client.closed()


async def test_head_requests_get_headers_only(caplog: pytest.LogCaptureFixture) -> None:
    async with hostile_broker(caplog) as broker, raw(broker.http_port) as client:
        await client.send("HEAD /healthz HTTP/1.1\r\nHost: api\r\n\r\n")
        head = (await within(client.reader.readuntil(b"\r\n\r\n"))).decode()
        assert head.startswith("HTTP/1.1 200 OK\r\n")
        assert "content-length: 15\r\n" in head
        await client.send("GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n")
        assert (await client.reply()).json == {"status": "ok"}  # no stray body in between


async def test_http_1_0_is_answered_and_closed(caplog: pytest.LogCaptureFixture) -> None:
    async with hostile_broker(caplog) as broker, raw(broker.http_port) as client:
        await client.send("GET /healthz HTTP/1.0\r\n\r\n")
        assert (await client.reply()).json == {"status": "ok"}
        assert await client.closed()


async def test_a_refused_upload_is_answered_before_the_body_and_the_client_can_read_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The answer comes first, the rest of the body is read and dropped: no reset."""
    async with hostile_broker(caplog, api_key="k" * 32) as broker, raw(broker.http_port) as client:
        await client.send(JSON_POST + "Content-Length: 4000\r\n\r\n")
        assert_error(await client.reply(), 401, "unauthorized")
        await client.send(b"x" * 4000)  # the client goes on sending, as many do
        assert await client.closed()


# --- answers are plain ---------------------------------------------------------------


async def test_no_server_header_and_no_version_anywhere(caplog: pytest.LogCaptureFixture) -> None:
    async with hostile_broker(caplog) as broker, raw(broker.http_port) as client:
        await client.send("GET /nope HTTP/1.1\r\nHost: api\r\n\r\n")
        reply = await client.reply()
        assert "server" not in reply.headers
        assert "x-powered-by" not in reply.headers
        text = (reply.raw_head + reply.body.decode()).lower()
        assert "h11" not in text and "python" not in text and "aiohttp" not in text
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert reply.headers["cache-control"] == "no-store"


async def test_every_refusal_is_logged_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    async with hostile_broker(caplog) as broker:
        for _ in range(3):
            async with raw(broker.http_port) as client:
                await client.send("garbage\r\n\r\n")
                await client.reply()
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 3
    assert all(r.levelno == logging.DEBUG for r in refusals)
