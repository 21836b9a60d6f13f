"""The service HTTP API against a real broker: publish, health, readiness, metrics."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect

from broker.app import Running
from broker.backplane import Published
from broker.backplane.memory import MemoryBackplane
from broker.exceptions import ERROR_CODES
from broker.frames import SERVER_FRAME
from tests.inproc import running_broker
from tests.wait import until, within

JSON_TYPE = {"Content-Type": "application/json"}


def api(broker: Running, path: str) -> str:
    return f"http://127.0.0.1:{broker.http_port}{path}"


def ws_url(broker: Running) -> str:
    return f"ws://127.0.0.1:{broker.ws_port}/ws"


async def recv(ws: ClientConnection) -> dict[str, Any]:
    frame: dict[str, Any] = orjson.loads(await within(ws.recv()))
    SERVER_FRAME.validate_python(frame)
    return frame


async def ws_request(ws: ClientConnection, frame: dict[str, Any] | bytes) -> dict[str, Any]:
    await ws.send(frame if isinstance(frame, bytes) else orjson.dumps(frame), text=True)
    return await recv(ws)


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` (bytes as they are, anything else as JSON); return status and JSON."""
    data = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    async with http.post(url, data=data, headers=headers, **kwargs) as response:
        assert response.content_type == "application/json"
        return response.status, orjson.loads(await response.read())


def assert_http_error(status: int, body: dict[str, Any], want_status: int, code: str) -> None:
    assert status == want_status, body
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# --- POST /publish ------------------------------------------------------------------


async def test_publish_reaches_a_websocket_subscriber() -> None:
    async with (
        running_broker() as broker,
        aiohttp.ClientSession() as http,
        connect(ws_url(broker)) as sub,
    ):
        assert await ws_request(sub, {"op": "subscribe", "id": 1, "channel": "svc.*"}) == {
            "op": "ok",
            "id": 1,
        }
        for i, data in enumerate([{"t": 21.5}, None, [1, "two"], "s"]):
            status, body = await post(
                http, api(broker, "/publish"), {"channel": f"svc.{i}", "data": data}
            )
            assert (status, body) == (200, {"ok": True})
            assert await recv(sub) == {"op": "message", "channel": f"svc.{i}", "data": data}
        assert broker.node.metrics.messages_published == 4


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        (b"not json", "bad_frame", "not valid JSON"),
        (b"", "bad_frame", "not valid JSON"),
        (b"[1]", "bad_frame", "must be a JSON object"),
        (b'{"channel":"a","data":NaN}', "bad_frame", "not valid JSON"),
        (b'{"channel":"a","data":"\xff"}', "bad_frame", "not valid JSON"),
        (b'{"channel":"a"}', "bad_request", "missing field 'data'"),
        (b'{"data":1}', "bad_request", "missing field 'channel'"),
        (b'{"channel":"a","data":1,"id":2}', "bad_request", "unknown field 'id'"),
        (b'{"channel":5,"data":1}', "bad_request", "'channel'"),
        (b'{"channel":"a","data":' + b"[" * 1020 + b"]" * 1020 + b"}", "bad_request", "900"),
        (b'{"channel":"a.*","data":1}', "bad_channel", "cannot publish to a pattern"),
        (b'{"channel":"a.>","data":1}', "bad_channel", "cannot publish to a pattern"),
        (b'{"channel":"a..b","data":1}', "bad_channel", "empty token"),
        (b'{"channel":"","data":1}', "bad_channel", "empty"),
    ],
)
async def test_publish_refuses_bad_bodies_with_400(body: bytes, code: str, words: str) -> None:
    async with running_broker() as broker, aiohttp.ClientSession() as http:
        status, reply = await post(http, api(broker, "/publish"), body)
        assert_http_error(status, reply, 400, code)
        assert words in reply["error"]["message"]
        assert broker.node.metrics.errors[code] == 1


async def test_publish_too_large() -> None:
    async with (
        running_broker(max_frame_bytes=4096, max_data_bytes=1024) as broker,
        aiohttp.ClientSession() as http,
    ):
        url = api(broker, "/publish")
        # data at the cap is fine, one byte over is too_large.
        status, _ = await post(http, url, {"channel": "c", "data": "x" * 1022})
        assert status == 200
        status, body = await post(http, url, {"channel": "c", "data": "x" * 1023})
        assert_http_error(status, body, 413, "too_large")
        assert "1025 bytes" in body["error"]["message"]
        # A body over max_frame_bytes, announced by Content-Length.
        status, body = await post(http, url, {"channel": "c", "data": "x" * 5000})
        assert_http_error(status, body, 413, "too_large")

        # ... and one sent in chunks, without a Content-Length.
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"channel":"c","data":"'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        async with http.post(url, data=chunks(), headers=JSON_TYPE) as response:
            assert "Content-Length" not in response.request_info.headers
            body = orjson.loads(await response.read())
            assert_http_error(response.status, body, 413, "too_large")
        status, _ = await post(http, url, {"channel": "c", "data": 1})
        assert status == 200


async def test_publish_unavailable_when_the_backplane_fails() -> None:
    backplane = MemoryBackplane()
    async with (
        running_broker(backplane=backplane) as broker,
        aiohttp.ClientSession() as http,
        connect(ws_url(broker)) as sub,
    ):
        await ws_request(sub, {"op": "subscribe", "id": 1, "channel": "c"})
        backplane.fail_publish = True
        status, body = await post(http, api(broker, "/publish"), {"channel": "c", "data": 1})
        assert_http_error(status, body, 503, "unavailable")
        backplane.fail_publish = False
        status, _ = await post(http, api(broker, "/publish"), {"channel": "c", "data": 2})
        assert status == 200
        # The failed one was not delivered.
        assert (await recv(sub))["data"] == 2
        assert broker.node.metrics.publish_failures == 1


async def test_unknown_path_and_method_answer_json_errors() -> None:
    async with running_broker() as broker, aiohttp.ClientSession() as http:
        async with http.get(api(broker, "/nope")) as response:
            body = orjson.loads(await response.read())
            assert_http_error(response.status, body, 404, "bad_request")
        async with http.get(api(broker, "/publish")) as response:
            body = orjson.loads(await response.read())
            assert_http_error(response.status, body, 405, "bad_request")
        status, body = await post(http, api(broker, "/healthz"), {"x": 1})
        assert_http_error(status, body, 405, "bad_request")
        # The WebSocket endpoint is not on this port.
        async with http.get(api(broker, "/ws")) as response:
            assert response.status == 404


# --- health and readiness ---------------------------------------------------------------


async def test_healthz_and_readyz() -> None:
    backplane = MemoryBackplane()
    async with running_broker(backplane=backplane) as broker, aiohttp.ClientSession() as http:
        async with http.get(api(broker, "/healthz")) as response:
            assert response.status == 200
            assert orjson.loads(await response.read()) == {"status": "ok"}
        async with http.get(api(broker, "/readyz")) as response:
            assert response.status == 200
            assert orjson.loads(await response.read())["status"] == "ready"

        backplane.fail_publish = True  # the backplane cannot deliver: not ready
        async with http.get(api(broker, "/readyz")) as response:
            assert response.status == 503
            assert orjson.loads(await response.read())["status"] == "unavailable"
        async with http.get(api(broker, "/healthz")) as response:
            assert response.status == 200  # but alive

        backplane.fail_publish = False
        async with http.get(api(broker, "/readyz")) as response:
            assert response.status == 200


# --- metrics ----------------------------------------------------------------------


class Scrape:
    """One parsed /metrics exposition."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                self.samples[key] = sample.value

    def total(self, name: str) -> float:
        """The sum of ``name`` over all its labels."""
        return sum(value for (sample, _), value in self.samples.items() if sample == name)

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in self.samples, f"{name}{labels} not exposed"
        return self.samples[key]


async def scrape(http: aiohttp.ClientSession, broker: Running) -> Scrape:
    async with http.get(api(broker, "/metrics")) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return Scrape(await response.text())


async def test_metrics_exposition_names_and_types() -> None:
    async with running_broker() as broker, aiohttp.ClientSession() as http:
        metrics = await scrape(http, broker)
        gauges = ["connections", "subscriptions", "patterns", "backplane_ready"]
        counters = [
            "connections_opened",
            "connections_closed",
            "connections_rejected",
            "messages_published",
            "messages_received",
            "messages_delivered",
            "publish_failures",
            "slow_consumer_disconnects",
            "abuse_disconnects",
            "frames_received",
            "errors",
            "http_requests",
        ]
        for name in gauges:
            assert metrics.types[f"broker_{name}"] == "gauge", name
        for name in counters:
            assert metrics.types[f"broker_{name}"] == "counter", name
        for code in ERROR_CODES:
            assert metrics("broker_errors_total", code=code) == 0
        assert metrics("broker_connections") == 0
        assert metrics("broker_backplane_ready") == 1
        assert metrics("broker_slow_consumer_disconnects_total") == 0


async def test_metrics_follow_activity() -> None:
    backplane = MemoryBackplane()
    async with (
        running_broker(backplane=backplane, error_limit=2) as broker,
        aiohttp.ClientSession() as http,
    ):
        before = await scrape(http, broker)
        assert before("broker_connections") == 0
        async with connect(ws_url(broker)) as sub, connect(ws_url(broker)) as pub:
            await ws_request(sub, {"op": "subscribe", "id": 1, "channel": "m.*"})
            await ws_request(sub, {"op": "subscribe", "id": 2, "channel": "m.>"})
            await ws_request(pub, {"op": "subscribe", "id": 3, "channel": "m.*"})
            await ws_request(pub, {"op": "publish", "id": 4, "channel": "m.x", "data": 1})
            status, _ = await post(http, api(broker, "/publish"), {"channel": "m.y", "data": 2})
            assert status == 200
            await ws_request(pub, b"junk")
            await ws_request(pub, {"op": "nope", "id": 5})
            backplane.fail_publish = True
            await ws_request(pub, {"op": "publish", "id": 6, "channel": "m.z", "data": 3})

            during = await scrape(http, broker)
            assert during("broker_connections") == 2
            assert during("broker_subscriptions") == 3
            assert during("broker_patterns") == 2
            assert during("broker_backplane_ready") == 0
            assert during("broker_connections_opened_total") == 2
            assert during("broker_messages_published_total") == 2  # one WS, one HTTP
            assert during("broker_messages_received_total") == 2
            assert during("broker_messages_delivered_total") == 4  # 2 messages x 2 conns
            assert during("broker_publish_failures_total") == 1
            assert during("broker_errors_total", code="bad_frame") == 1
            assert during("broker_errors_total", code="bad_request") == 1
            assert during("broker_errors_total", code="unavailable") == 1
            assert during("broker_frames_received_total") == 7
            assert during("broker_http_requests_total", route="publish") == 1
            assert during("broker_http_requests_total", route="metrics") == 2

            # A third client error crosses the budget of 2: closed with 1008.
            await pub.send(b"junk", text=True)
            await until(lambda: broker.node.metrics.abuse_disconnects == 1)

        await until(lambda: not broker.node.peers)
        after = await scrape(http, broker)
        assert after("broker_connections") == 0
        assert after("broker_subscriptions") == 0
        assert after("broker_patterns") == 0
        assert after.total("broker_connections_closed_total") == 2
        # By close code: the client's normal close, and the 1008 of the error budget.
        assert after("broker_connections_closed_total", code="1000") == 1
        assert after("broker_connections_closed_total", code="1008") == 1
        assert after("broker_abuse_disconnects_total") == 1
        assert after("broker_errors_total", code="bad_frame") == 2


async def test_every_error_code_without_auth_is_reachable_in_one_process() -> None:
    """One broker, one connection per code; /metrics counts each one once.

    The codes of authentication and permissions (``unauthorized``,
    ``token_expired``, ``forbidden``) need auth or rules configured; they have
    their own test in ``test_security.py``.
    """

    class Faulty(MemoryBackplane):
        explode = False

        def publish(self, channel: str, data: bytes, **options: Any) -> asyncio.Future[Published]:
            if self.explode:
                raise RuntimeError("a bug")
            return super().publish(channel, data, **options)

    backplane = Faulty()
    triggers: dict[str, list[dict[str, Any] | bytes]] = {
        "bad_frame": [b"junk"],
        "bad_request": [{"op": "nope", "id": 1}],
        "bad_channel": [{"op": "subscribe", "id": 1, "channel": "a b"}],
        "not_subscribed": [{"op": "unsubscribe", "id": 1, "channel": "a"}],
        "too_large": [{"op": "publish", "id": 1, "channel": "a", "data": "x" * 2000}],
        "rate_limited": [{"op": "ping", "id": i} for i in range(4)],
        "limit_exceeded": [{"op": "subscribe", "id": i, "channel": f"c{i}"} for i in range(3)],
        "unavailable": [{"op": "publish", "id": 1, "channel": "a", "data": 1}],
        "internal": [{"op": "publish", "id": 1, "channel": "a", "data": 1}],
    }
    async with (
        running_broker(
            backplane=backplane,
            max_frame_bytes=4096,
            max_data_bytes=1024,
            max_subscriptions=2,
            rate_limit=0.001,
            rate_burst=3,
        ) as broker,
        aiohttp.ClientSession() as http,
    ):
        for code, frames in triggers.items():
            backplane.fail_publish = code == "unavailable"
            backplane.explode = code == "internal"
            async with connect(ws_url(broker)) as ws:
                replies = [await ws_request(ws, frame) for frame in frames]
            assert replies[-1]["op"] == "error"
            assert replies[-1]["code"] == code
            assert all(r["op"] != "error" for r in replies[:-1]), replies
        metrics = await scrape(http, broker)
        for code in ERROR_CODES:
            assert metrics("broker_errors_total", code=code) == (code in triggers), code


class _CountingBackplane(MemoryBackplane):
    """A memory backplane that reports counters of its own, as Redis does."""

    def stats(self) -> dict[str, int]:
        return {"connection_losses": 3}


async def test_metrics_name_the_process_and_export_backplane_counters() -> None:
    async with (
        running_broker(backplane=_CountingBackplane(), worker_index=4) as broker,
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{broker.http_port}/metrics") as response,
    ):
        families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    info = families["broker_process_info"].samples[0]
    assert info.labels == {"pid": str(os.getpid()), "worker": "4", "backplane": "memory"}
    losses = families["broker_backplane_connection_losses"].samples[0]
    assert losses.value == 3


# --- the API key --------------------------------------------------------------------

KEY = "a-long-random-service-key-0123456789"
ROUTES = {
    "publish": ("POST", "/publish"),
    "healthz": ("GET", "/healthz"),
    "readyz": ("GET", "/readyz"),
    "metrics": ("GET", "/metrics"),
}
CREDENTIALS = {
    "missing": None,
    "wrong": "Bearer not-the-key",
    "a prefix of the key": f"Bearer {KEY[:-1]}",
    "the key and more": f"Bearer {KEY}x",
    "another scheme": f"Basic {KEY}",
    "the key alone": KEY,
    "empty": "",
    "right": f"Bearer {KEY}",
    "right, scheme in lower case": f"bearer {KEY}",
}


async def call(
    http: aiohttp.ClientSession, broker: Running, route: str, headers: dict[str, str]
) -> tuple[int, bytes, Any]:
    """Make a valid request to ``route`` with ``headers``; return status, body, headers."""
    method, path = ROUTES[route]
    body = orjson.dumps({"channel": "k", "data": 1}) if method == "POST" else None
    async with http.request(
        method, api(broker, path), data=body, headers={**JSON_TYPE, **headers}
    ) as response:
        return response.status, await response.read(), response.headers


@pytest.mark.parametrize("metrics_public", [False, True])
async def test_api_key_on_each_route(metrics_public: bool) -> None:
    async with (
        running_broker(api_key=KEY, metrics_public=metrics_public) as broker,
        aiohttp.ClientSession() as http,
    ):
        refused = 0
        for route in ROUTES:
            keyed = route == "publish" or (route == "metrics" and not metrics_public)
            for name, value in CREDENTIALS.items():
                headers = {} if value is None else {"Authorization": value}
                status, body, response_headers = await call(http, broker, route, headers)
                if keyed and not name.startswith("right"):
                    refused += 1
                    assert_http_error(status, orjson.loads(body), 401, "unauthorized")
                    assert response_headers["WWW-Authenticate"] == "Bearer"
                    assert KEY not in body.decode()
                else:
                    assert status == 200, (route, name, body)
        assert broker.node.metrics.auth_failures == refused
        assert broker.node.metrics.errors["unauthorized"] == refused
        assert broker.node.metrics.messages_published == 2  # the two right ones


async def test_without_an_api_key_any_authorization_is_ignored() -> None:
    async with running_broker() as broker, aiohttp.ClientSession() as http:
        for route in ROUTES:
            status, _, _ = await call(http, broker, route, {"Authorization": "Bearer whatever"})
            assert status == 200, route


async def test_the_key_is_checked_before_the_body_is_looked_at() -> None:
    async with running_broker(api_key=KEY) as broker, aiohttp.ClientSession() as http:
        url = api(broker, "/publish")
        # No key and a text/plain body: the answer is about the key, not the body.
        async with http.post(url, data=b"junk", headers={"Content-Type": "text/plain"}) as r:
            assert_http_error(r.status, orjson.loads(await r.read()), 401, "unauthorized")
        # An unknown path says so, key or not: it holds nothing.
        async with http.get(api(broker, "/admin")) as r:
            assert_http_error(r.status, orjson.loads(await r.read()), 404, "bad_request")


# --- Origin and Host ------------------------------------------------------------------


async def test_a_browser_origin_not_allowed_is_forbidden() -> None:
    async with (
        running_broker(allowed_origins=["https://dash.example.com"]) as broker,
        aiohttp.ClientSession() as http,
    ):
        for route in ROUTES:
            for origin, allowed in [
                (None, True),  # not a browser
                ("https://dash.example.com", True),
                ("https://DASH.example.com:443", True),
                ("https://evil.example", False),
                ("http://dash.example.com", False),
                ("null", False),
                ("not an origin", False),
            ]:
                headers = {} if origin is None else {"Origin": origin}
                status, body, _ = await call(http, broker, route, headers)
                if allowed:
                    assert status == 200, (route, origin)
                else:
                    assert_http_error(status, orjson.loads(body), 403, "forbidden")
                    assert "origin" in orjson.loads(body)["error"]["message"]
        assert broker.node.metrics.messages_published == 3


async def test_with_no_allowed_origins_any_origin_may_call() -> None:
    """``allowed_origins`` empty means any, as on the WebSocket port; the JSON
    Content-Type rule is what keeps a cross-site page from publishing."""
    async with running_broker() as broker, aiohttp.ClientSession() as http:
        status, _, headers = await call(http, broker, "publish", {"Origin": "https://x.example"})
        assert status == 200
        assert "Access-Control-Allow-Origin" not in headers


async def test_host_header_not_allowed_is_forbidden() -> None:
    hosts = ["broker.internal", "LOCALHOST", "::1", "10.0.0.7:8001"]
    async with (
        running_broker(http_allowed_hosts=hosts) as broker,
        aiohttp.ClientSession() as http,
    ):
        for host, allowed in [
            ("broker.internal", True),
            ("Broker.Internal:8001", True),  # port ignored, case-insensitive
            ("localhost:9999", True),
            ("[::1]:8001", True),
            ("10.0.0.7", True),
            (f"127.0.0.1:{broker.http_port}", False),
            ("evil.example", False),
            ("broker.internal.evil.example", False),
            ("broker.internal@evil.example", False),
        ]:
            for route in ROUTES:
                status, body, _ = await call(http, broker, route, {"Host": host})
                if allowed:
                    assert status == 200, (route, host, body)
                else:
                    assert_http_error(status, orjson.loads(body), 403, "forbidden")
                    assert "Host" in orjson.loads(body)["error"]["message"]


# --- the publish answer and Idempotency-Key ------------------------------------------


async def publish_with(
    http: aiohttp.ClientSession, broker: Running, body: dict[str, Any], key: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {} if key is None else {"Idempotency-Key": key}
    return await post(http, api(broker, "/publish"), body, headers=headers)


async def test_publish_answer_carries_position_and_duplicate() -> None:
    async with (
        running_broker(channels=[{"pattern": "h.>", "history_size": 10}]) as broker,
        aiohttp.ClientSession() as http,
        connect(ws_url(broker)) as sub,
    ):
        await ws_request(sub, {"op": "subscribe", "id": 1, "channel": "h.a"})
        status, first = await publish_with(http, broker, {"channel": "h.a", "data": 1})
        assert status == 200
        epoch = first["epoch"]
        assert first == {"ok": True, "offset": 1, "epoch": epoch}
        assert isinstance(epoch, str) and epoch

        keyed = {"channel": "h.a", "data": 2}
        assert await publish_with(http, broker, keyed, key="k1") == (
            200,
            {"ok": True, "offset": 2, "epoch": epoch},
        )
        # A retry, by header or by body field: acknowledged, not delivered again.
        duplicate = {"ok": True, "duplicate": True, "offset": 2, "epoch": epoch}
        assert await publish_with(http, broker, keyed, key="k1") == (200, duplicate)
        assert await publish_with(http, broker, {**keyed, "key": "k1"}) == (200, duplicate)
        assert await publish_with(http, broker, {**keyed, "key": "k1"}, key="k1") == (
            200,
            duplicate,
        )

        # Without history: no position, but duplicates are still known.
        assert await publish_with(http, broker, {"channel": "p.x", "data": 3}, key="k2") == (
            200,
            {"ok": True},
        )
        assert await publish_with(http, broker, {"channel": "p.x", "data": 3}, key="k2") == (
            200,
            {"ok": True, "duplicate": True},
        )
        received = [await recv(sub), await recv(sub)]
        assert [(m["data"], m["offset"]) for m in received] == [(1, 1), (2, 2)]
        assert broker.node.metrics.publish_duplicates == 4
        assert broker.node.metrics.messages_published == 3


@pytest.mark.parametrize(
    ("key", "body_key", "words"),
    [
        ("x" * 129, None, "1 to 128 characters"),
        ("k1", "k2", "differ"),
        (None, "x" * 129, "'key'"),
        (None, "", "'key'"),
    ],
)
async def test_publish_refuses_bad_idempotency_keys(
    key: str | None, body_key: str | None, words: str
) -> None:
    async with running_broker() as broker, aiohttp.ClientSession() as http:
        body: dict[str, Any] = {"channel": "c", "data": 1}
        if body_key is not None:
            body["key"] = body_key
        status, reply = await publish_with(http, broker, body, key=key)
        assert_http_error(status, reply, 400, "bad_request")
        assert words in reply["error"]["message"], reply
        assert broker.node.metrics.messages_published == 0
        # The longest key is fine.
        status, _ = await publish_with(http, broker, {"channel": "c", "data": 1}, key="x" * 128)
        assert status == 200


async def test_publish_content_type_may_carry_parameters() -> None:
    async with running_broker() as broker, aiohttp.ClientSession() as http:
        for content_type in ["application/json; charset=utf-8", "Application/JSON"]:
            body = orjson.dumps({"channel": "c", "data": 1})
            headers = {"Content-Type": content_type}
            async with http.post(api(broker, "/publish"), data=body, headers=headers) as r:
                assert r.status == 200, content_type
        for content_type in ["text/plain", "application/x-www-form-urlencoded", "json"]:
            body = orjson.dumps({"channel": "c", "data": 1})
            headers = {"Content-Type": content_type}
            async with http.post(api(broker, "/publish"), data=body, headers=headers) as r:
                assert_http_error(r.status, orjson.loads(await r.read()), 415, "bad_request")
        assert broker.node.metrics.messages_published == 2


async def test_metrics_operators_expect_histograms_build_info_process_and_bytes() -> None:
    rules = [{"pattern": "h.>", "history_size": 10}]
    async with (
        running_broker(channels=rules) as broker,
        aiohttp.ClientSession() as http,
        connect(ws_url(broker)) as ws,
    ):
        assert (await ws_request(ws, {"op": "subscribe", "id": 1, "channel": "h.a"}))["op"] == "ok"
        await ws.send(
            orjson.dumps({"op": "publish", "id": 2, "channel": "h.a", "data": 1}).decode()
        )
        assert (await recv(ws))["op"] == "message" and (await recv(ws))["op"] == "ok"
        since = {"offset": 0, "epoch": "another"}
        reply = await ws_request(ws, {"op": "subscribe", "id": 3, "channel": "h.b", "since": since})
        assert reply["recovered"] is False
        metrics = await scrape(http, broker)
    for name in ("publish_ack", "backplane_publish", "fanout", "canary_round_trip"):
        assert metrics.types[f"broker_{name}_seconds"] == "histogram", name
    assert metrics("broker_publish_ack_seconds_count") == 1
    assert metrics("broker_fanout_seconds_count") == 1
    assert metrics("broker_canary_round_trip_seconds_count") >= 1
    assert metrics("broker_recoveries_total", outcome="epoch_changed") == 1
    assert metrics("broker_bytes_received_total") > 0 and metrics("broker_bytes_sent_total") > 0
    (build,) = [key for key in metrics.samples if key[0] == "broker_build_info"]
    assert dict(build[1])["version"] == "0.1.0"
    assert metrics("process_open_fds") > 0 and metrics("process_resident_memory_bytes") > 0
    assert metrics("broker_ready") == 1 and metrics("broker_draining") == 0
    assert metrics("broker_max_connections") > 0
