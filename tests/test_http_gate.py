"""The service API's gate, without sockets: which head gets which answer, and in what order."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest

from broker.http import RefusalLog
from broker.http_gate import MAX_HEAD_BYTES, Admitted, Answer, Gate, Head, host_name
from broker.settings import Settings

KEY = "k" * 32
GOOD_POST = (
    ("host", "api"),
    ("content-type", "application/json"),
    ("content-length", "24"),
    ("authorization", f"Bearer {KEY}"),
)


def gate(**overrides: Any) -> Gate:
    values = {"max_frame_bytes": 4096, "max_data_bytes": 1024, **overrides}
    return Gate(Settings.model_validate(values))


def refusal(verdict: Admitted | Answer) -> tuple[int, str]:
    assert isinstance(verdict, Answer), verdict
    body = orjson.loads(verdict.body)
    assert verdict.code == body["error"]["code"]
    return verdict.status, body["error"]["code"]


def post(*headers: tuple[str, str], without: tuple[str, ...] = ()) -> Head:
    kept = tuple((k, v) for k, v in GOOD_POST if k not in without)
    return Head("POST", "/publish", kept + headers)


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("Example.COM", "example.com"),
        ("example.com:8001", "example.com"),
        ("example.com:", "example.com"),
        ("[::1]:8001", "[::1]"),
        ("[::1]", "[::1]"),
        ("::1", "[::1]"),
        ("10.0.0.1:80", "10.0.0.1"),
        ("a:b", "a:b"),
        ("[broken", "[broken"),
    ],
)
def test_host_name(value: str, name: str) -> None:
    assert host_name(value) == name


def test_a_good_publish_is_admitted_with_its_key() -> None:
    g = gate(api_key=KEY)
    assert g.check(post()) == Admitted("publish")
    assert g.check(post(("idempotency-key", "k-1"))) == Admitted("publish", "k-1")
    # A UTF-8 key arrives as bytes decoded latin-1; it is read back as UTF-8.
    raw = "clé".encode().decode("latin-1")
    assert g.check(post(("idempotency-key", raw))) == Admitted("publish", "clé")
    assert refusal(g.check(post(("idempotency-key", "\xff")))) == (400, "bad_request")
    assert refusal(g.check(post(("idempotency-key", "")))) == (400, "bad_request")


def test_checks_come_in_order() -> None:
    g = gate(api_key=KEY, http_allowed_hosts=["api"], allowed_origins=["https://ok.example"])
    bad_everything = Head(
        "POST",
        "/publish",
        (("host", "evil"), ("origin", "https://evil"), ("content-type", "text/plain")),
        version="2.0",
    )
    steps = [
        (bad_everything, (505, "bad_frame")),
        (Head("POST", "/publish", (("x", "y" * MAX_HEAD_BYTES),)), (431, "too_large")),
        (Head("POST", "/publish", tuple(("x", "y") for _ in range(65))), (431, "too_large")),
        (post(("transfer-encoding", "chunked"), ("host", "evil")), (400, "bad_frame")),
        (post(("authorization", "Bearer x"), ("host", "evil")), (400, "bad_request")),
        (Head("POST", "/nope", (("host", "evil"),)), (403, "forbidden")),
        (Head("POST", "http://api/publish", (("host", "api"),)), (400, "bad_request")),
        (Head("POST", "/nope", (("host", "api"),)), (404, "bad_request")),
        (Head("PUT", "/publish", (("host", "api"), ("origin", "x"))), (405, "bad_request")),
        (post(("origin", "https://evil"), without=("authorization",)), (403, "forbidden")),
        (post(("content-encoding", "gzip"), without=("authorization",)), (401, "unauthorized")),
        (post(("content-encoding", "gzip"), without=("content-type",)), (415, "bad_request")),
        (post(("content-length", "9999"), without=("content-type",)), (415, "bad_request")),
        (post(without=("content-length",)), (411, "bad_request")),
        (post(("idempotency-key", "x" * 129), without=("content-length",)), (411, "bad_request")),
        (post(("idempotency-key", "x" * 129)), (400, "bad_request")),
        (post(("content-length", "4097"), without=("content-length",)), (413, "too_large")),
    ]  # fmt: skip
    for head, expected in steps:
        assert refusal(g.check(head)) == expected, head
    assert g.check(post(("origin", "https://ok.example"))) == Admitted("publish")


def test_answers_that_close_the_connection() -> None:
    g = gate()
    closing = [
        Head("GET", "/healthz", (("host", "a"),), version="2.0"),
        Head("GET", "/healthz", (("x", "y" * MAX_HEAD_BYTES),)),
        post(("transfer-encoding", "chunked")),
        post(("content-type", "text/plain"), without=("content-type",)),
        post(("content-length", "5000"), without=("content-length",)),
    ]
    for head in closing:
        verdict = g.check(head)
        assert isinstance(verdict, Answer) and verdict.close, head
    keeping = [Head("GET", "/nope"), Head("DELETE", "/healthz")]
    for head in keeping:
        verdict = g.check(head)
        assert isinstance(verdict, Answer) and not verdict.close, head


def test_405_names_the_allowed_methods() -> None:
    verdict = gate().check(Head("POST", "/metrics"))
    assert isinstance(verdict, Answer)
    assert ("allow", "GET, HEAD") in verdict.headers
    assert gate().check(Head("HEAD", "/metrics")) == Admitted("metrics")


def test_the_key_guards_publish_and_metrics_unless_public() -> None:
    keyed = gate(api_key=KEY)
    public = gate(api_key=KEY, metrics_public=True)
    for route in ("/healthz", "/readyz"):
        assert isinstance(keyed.check(Head("GET", route)), Admitted)
    assert refusal(keyed.check(Head("GET", "/metrics"))) == (401, "unauthorized")
    assert public.check(Head("GET", "/metrics")) == Admitted("metrics")
    assert refusal(public.check(post(without=("authorization",)))) == (401, "unauthorized")
    # Bytes that are not ASCII in the header are compared, not choked on.
    weird = post(("authorization", "Bearer \xe9\xff"), without=("authorization",))
    assert refusal(keyed.check(weird)) == (401, "unauthorized")
    verdict = keyed.check(Head("GET", "/metrics"))
    assert isinstance(verdict, Answer)
    assert ("www-authenticate", "Bearer") in verdict.headers


def test_content_encoding_identity_is_fine() -> None:
    g = gate()
    assert g.check(post(("content-encoding", "identity"))) == Admitted("publish")
    assert g.check(post(("content-encoding", "Identity, identity"))) == Admitted("publish")


def test_route_of_counts_only_known_routes() -> None:
    g = gate()
    assert g.route_of(Head("POST", "/publish?x=1")) == "publish"
    assert g.route_of(Head("GET", "/publish")) is None
    assert g.route_of(Head("GET", "/anything")) is None


def test_refusal_log_sums_up_repeated_refusals_once_a_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="broker.http")
    now = [0.0]
    refusals = RefusalLog(window=60.0, threshold=3, clock=lambda: now[0])
    for _ in range(5):
        refusals.note(401, "10.0.0.9:5000", "POST /publish", b"{}")
    refusals.note(400, "10.0.0.9:5001", "-", b"{}")
    now[0] = 61.0
    refusals.note(400, "10.0.0.9:5002", "-", b"{}")
    info = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == 1
    assert "refused 6 requests" in info[0].getMessage()
    assert "400: 1, 401: 5" in info[0].getMessage()
    # A quiet window (below the threshold) says nothing at info.
    now[0] = 200.0
    refusals.note(400, "10.0.0.9:5003", "-", b"{}")
    assert len([r for r in caplog.records if r.levelno == logging.INFO]) == 1
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 8
