"""Authentication, permissions, origins and abuse limits through a real server.

Real tokens made with PyJWT and real key pairs made with ``cryptography``. Each
refused token gets ``unauthorized`` and the connection stays usable for a
correct ``auth``. (The service API's key is tested in ``test_http_api.py``.)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from broker.app import Running
from tests.inproc import running_broker
from tests.wait import within

SECRET = "a-test-secret-of-at-least-32-bytes!!"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def pem(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def hs256(sub: str | None = "alice", ttl: float = 60, **claims: Any) -> str:
    payload: dict[str, Any] = {"exp": int(time.time() + ttl), **claims}
    if sub is not None:
        payload["sub"] = sub
    return jwt.encode(payload, SECRET, algorithm="HS256")


def rs256(sub: str = "alice", ttl: float = 60, **claims: Any) -> str:
    """An RS256 token, with the audience and issuer the RS256 broker below expects."""
    payload = {"aud": "broker", "iss": "https://id.example", **claims}
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl), **payload}, RSA_KEY, "RS256")


def http_get(address: str, api_key: str) -> tuple[int, str]:
    request = urllib.request.Request(address, headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(request, timeout=5) as response:  # loopback only
        return int(response.status), response.read().decode()


def url(broker: Running) -> str:
    return f"ws://127.0.0.1:{broker.ws_port}/ws"


async def call(ws: ClientConnection, **frame: Any) -> dict[str, Any]:
    await ws.send(orjson.dumps(frame).decode())
    return await recv(ws)


async def recv(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    frame: dict[str, Any] = orjson.loads(await within(ws.recv(), timeout))
    return frame


@asynccontextmanager
async def broker_with(**settings: Any) -> AsyncIterator[Running]:
    async with running_broker(**settings) as broker:
        yield broker


# --- refused tokens --------------------------------------------------------------------


def _tampered_payload(token: str) -> str:
    head, _, sig = token.split(".")
    body = base64.urlsafe_b64encode(b'{"sub":"admin","exp":9999999999}').rstrip(b"=").decode()
    return f"{head}.{body}.{sig}"


def _tampered_signature(token: str) -> str:
    head, body, sig = token.split(".")
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    return f"{head}.{body}.{flipped}"


def _hs256_with_rsa_public_key() -> str:
    """The classic confusion attack: the verifier's public key used as an HMAC secret."""
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    claims = {"sub": "alice", "exp": 9999999999, "aud": "broker", "iss": "https://id.example"}
    body = base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b"=")
    signature = hmac.new(pem(RSA_KEY), header + b"." + body, hashlib.sha256).digest()
    return b".".join((header, body, base64.urlsafe_b64encode(signature).rstrip(b"="))).decode()


#: Each refused token, and words its refusal must contain (so it fails for that reason).
REFUSED: dict[str, tuple[Any, str]] = {
    "alg none": (
        lambda: jwt.encode({"sub": "alice", "exp": 9999999999}, None, algorithm="none"),
        "algorithm 'none' is not accepted",
    ),
    "HS256 signed with the RSA public key": (
        _hs256_with_rsa_public_key,
        "algorithm 'HS256' is not accepted",
    ),
    "expired": (lambda: rs256(ttl=-10), "expired"),
    "nbf in the future": (lambda: rs256(nbf=int(time.time()) + 600), "not valid yet"),
    "wrong aud": (lambda: rs256(aud="someone-else"), "audience"),
    "wrong iss": (lambda: rs256(iss="https://evil.example"), "issuer"),
    "tampered payload": (lambda: _tampered_payload(rs256()), "signature is invalid"),
    "tampered signature": (lambda: _tampered_signature(rs256()), "signature is invalid"),
    "missing sub": (
        lambda: jwt.encode(
            {"exp": int(time.time()) + 60, "aud": "broker", "iss": "https://id.example"},
            RSA_KEY,
            "RS256",
        ),
        "'sub'",
    ),
    "10 KiB token": (lambda: "a" * 10 * 1024, "longer than 8192"),
    "garbage": (lambda: "not-a-jwt", "malformed"),
    "non-ASCII": (lambda: "éèà.ü.ß", "malformed"),
    "empty": (lambda: "", "malformed"),
}


@pytest.fixture
def rsa_pem(tmp_path: Path) -> str:
    path = tmp_path / "jwt.pem"
    path.write_bytes(pem(RSA_KEY))
    return str(path)


async def test_every_refused_token_is_unauthorized_and_the_connection_stays_usable(
    rsa_pem: str,
) -> None:
    async with (
        broker_with(
            jwt_public_key=rsa_pem,
            jwt_algorithms=["RS256"],
            jwt_audience="broker",
            jwt_issuer="https://id.example",
            auth_timeout=30.0,
        ) as broker,
        connect(url(broker)) as ws,
    ):
        answers: dict[str, str] = {}
        for i, (name, (make, words)) in enumerate(REFUSED.items()):
            reply = await call(ws, op="auth", id=i, token=make())
            assert (reply["op"], reply["code"], reply["id"]) == ("error", "unauthorized", i), name
            assert words in reply["message"], (name, reply["message"])
            answers[name] = reply["message"]
        good = rs256()
        assert await call(ws, op="auth", id="ok", token=good) == {
            "op": "ok",
            "id": "ok",
            "sub": "alice",
            "expires_in": pytest.approx(59, abs=2),
        }
    # A signature failure never says which part was wrong.
    assert answers["tampered signature"] == answers["tampered payload"]
    print("refused tokens:", answers)


async def test_an_ec_key_and_an_aud_claim_ignored_without_jwt_audience(tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    path.write_bytes(pem(EC_KEY))
    token = jwt.encode(
        {"sub": "eve", "exp": int(time.time()) + 60, "aud": "anything"}, EC_KEY, "ES256"
    )
    async with broker_with(jwt_public_key=str(path)) as broker, connect(url(broker)) as ws:
        assert (await call(ws, op="auth", id=1, token=token))["sub"] == "eve"


# --- before authentication ------------------------------------------------------------


async def test_only_auth_and_ping_before_authenticating_then_1008_at_the_deadline() -> None:
    async with (
        broker_with(jwt_secret=SECRET, auth_timeout=1.0) as broker,
        connect(url(broker)) as ws,
    ):
        started = time.monotonic()
        assert (await call(ws, op="subscribe", id=1, channel="a"))["code"] == "unauthorized"
        reply = await call(ws, op="publish", id=2, channel="a", data=1)
        assert reply["code"] == "unauthorized"
        assert await call(ws, op="ping", id=3) == {"op": "pong", "id": 3}
        with pytest.raises(ConnectionClosed) as closed:
            await within(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert 0.9 <= time.monotonic() - started < 3.0


async def test_a_valid_auth_stops_the_deadline() -> None:
    async with (
        broker_with(jwt_secret=SECRET, auth_timeout=0.5) as broker,
        connect(url(broker)) as ws,
    ):
        assert (await call(ws, op="auth", id=1, token=hs256(subscribe=["a"])))["op"] == "ok"
        assert await call(ws, op="subscribe", id=2, channel="a") == {"op": "ok", "id": 2}
        with pytest.raises(TimeoutError):
            await within(ws.recv(), 1.0)  # still open well past the deadline


async def test_a_handshake_bearer_token_authenticates_and_a_bad_one_is_401() -> None:
    async with broker_with(jwt_secret=SECRET, auth_timeout=0.5) as broker:
        headers = {"Authorization": f"Bearer {hs256(subscribe=['a'])}"}
        async with connect(url(broker), additional_headers=headers) as ws:
            assert await call(ws, op="subscribe", id=1, channel="a") == {"op": "ok", "id": 1}
        for header in (f"Bearer {hs256(ttl=-5)}", "Basic dXNlcjpwdw==", "Bearer", "Bearer x.y.z"):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url(broker), additional_headers={"Authorization": header}):
                    pass
            assert refused.value.response.status_code == 401, header
            body = orjson.loads(refused.value.response.body)
            assert body["error"]["code"] == "unauthorized"


async def test_tokens_are_never_in_the_url() -> None:
    async with (
        broker_with(jwt_secret=SECRET, auth_timeout=0.5) as broker,
        connect(url(broker) + f"?token={hs256()}") as ws,
    ):
        assert (await call(ws, op="subscribe", id=1, channel="a"))["code"] == "unauthorized"


# --- refresh and expiry ----------------------------------------------------------------


async def test_refresh_and_refresh_with_another_sub() -> None:
    async with broker_with(jwt_secret=SECRET) as broker, connect(url(broker)) as ws:
        assert (await call(ws, op="auth", id=1, token=hs256(subscribe=["a.>"])))["op"] == "ok"
        refreshed = await call(ws, op="auth", id=2, token=hs256(ttl=600, subscribe=["a.>"]))
        assert refreshed["sub"] == "alice" and refreshed["expires_in"] > 500
        other = await call(ws, op="auth", id=3, token=hs256("mallory", subscribe=[">"]))
        assert other["code"] == "forbidden"
        # The old token still holds: its permissions, not mallory's.
        assert (await call(ws, op="subscribe", id=4, channel="b"))["code"] == "forbidden"
        assert await call(ws, op="subscribe", id=5, channel="a.x") == {"op": "ok", "id": 5}


async def test_expiry_sends_token_expired_then_closes_after_the_grace() -> None:
    async with (
        broker_with(
            jwt_secret=SECRET,
            refresh_grace=1.0,
            channels=[{"pattern": ">", "subscribe": "authenticated", "publish": "authenticated"}],
        ) as broker,
        connect(url(broker)) as ws,
        connect(url(broker)) as publisher,
    ):
        assert (await call(publisher, op="auth", id=1, token=hs256("pub", ttl=60)))["op"] == "ok"
        assert (await call(ws, op="auth", id=1, token=hs256(ttl=1.5)))["op"] == "ok"
        assert await call(ws, op="subscribe", id=2, channel="live") == {"op": "ok", "id": 2}
        expired = await recv(ws, 4)
        assert (expired["op"], expired["code"], expired["id"]) == ("error", "token_expired", None)
        # During the grace: still receiving, but requests get token_expired.
        await call(publisher, op="publish", id=2, channel="live", data="in grace")
        assert (await recv(ws))["data"] == "in grace"
        assert (await call(ws, op="subscribe", id=3, channel="x"))["code"] == "token_expired"
        with pytest.raises(ConnectionClosed) as closed:
            await within(ws.recv(), 3)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "token expired")


async def test_a_narrowing_refresh_ends_subscriptions_before_its_ok() -> None:
    async with broker_with(jwt_secret=SECRET) as broker, connect(url(broker)) as ws:
        await call(ws, op="auth", id=1, token=hs256(subscribe=["a.>", "b.>"]))
        for i, channel in enumerate(("a.x", "b.y", "a.*")):
            assert (await call(ws, op="subscribe", id=10 + i, channel=channel))["op"] == "ok"
        await ws.send(
            orjson.dumps({"op": "auth", "id": 2, "token": hs256(subscribe=["a.x"])}).decode()
        )
        frames = [await recv(ws) for _ in range(3)]
        assert frames == [
            {"op": "unsubscribed", "channel": "a.*", "code": "forbidden"},
            {"op": "unsubscribed", "channel": "b.y", "code": "forbidden"},
            {"op": "ok", "id": 2, "sub": "alice", "expires_in": pytest.approx(59, abs=2)},
        ]
        assert (await call(ws, op="unsubscribe", id=3, channel="b.y"))["code"] == "not_subscribed"


# --- rules -----------------------------------------------------------------------------


async def test_sub_rules_and_anonymous_connections() -> None:
    rules = [
        {"pattern": "user.{sub}.>", "subscribe": "authenticated", "publish": "authenticated"},
        {"pattern": "public.>", "subscribe": "anyone", "publish": "nobody"},
    ]
    async with broker_with(jwt_secret=SECRET, anonymous=True, channels=rules) as broker:
        async with connect(url(broker)) as anon:
            assert (await call(anon, op="subscribe", id=1, channel="public.news"))["op"] == "ok"
            reply = await call(anon, op="subscribe", id=2, channel="user.bob.inbox")
            assert reply["code"] == "unauthorized"
            reply = await call(anon, op="publish", id=3, channel="public.news", data=1)
            assert reply["code"] == "unauthorized"
        async with connect(url(broker)) as bob:
            await call(bob, op="auth", id=1, token=hs256("bob"))
            assert (await call(bob, op="subscribe", id=2, channel="user.bob.>"))["op"] == "ok"
            reply = await call(bob, op="subscribe", id=3, channel="user.alice.inbox")
            assert reply["code"] == "forbidden"
            for wider in ("user.>", "user.*.inbox", ">"):  # would reach other users' channels
                reply = await call(bob, op="subscribe", id=3, channel=wider)
                assert reply["code"] == "forbidden", wider
            # Bob is subscribed to his own channels: the message, then the ok.
            reply = await call(bob, op="publish", id=4, channel="user.bob.note", data=1)
            assert reply == {"op": "message", "channel": "user.bob.note", "data": 1}
            assert await recv(bob) == {"op": "ok", "id": 4}
            reply = await call(bob, op="publish", id=5, channel="public.news", data=1)
            assert reply["code"] == "forbidden"


async def test_with_auth_off_rules_still_apply_and_say_forbidden() -> None:
    rules = [{"pattern": "ro.>", "publish": "nobody"}]
    async with broker_with(channels=rules) as broker, connect(url(broker)) as ws:
        assert (await call(ws, op="subscribe", id=1, channel="ro.x"))["op"] == "ok"
        assert (await call(ws, op="publish", id=2, channel="ro.x", data=1))["code"] == "forbidden"
        assert (await call(ws, op="publish", id=3, channel="rw.x", data=1)) == {"op": "ok", "id": 3}


# --- origins ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://dash.example.com", True),
        ("https://DASH.example.com:443", True),
        ("https://a.example.org", True),
        ("https://a.b.example.org", True),
        ("https://example.org", False),
        ("http://dash.example.com", False),
        ("https://evil.example", False),
        ("https://dash.example.com.evil.example", False),
        ("null", False),
        (None, True),
    ],
)
async def test_origins(origin: str | None, allowed: bool) -> None:
    origins = ["https://dash.example.com", "https://*.example.org"]
    async with broker_with(allowed_origins=origins) as broker:
        if allowed:
            async with connect(url(broker), origin=origin) as ws:  # type: ignore[arg-type]
                assert await call(ws, op="ping", id=1) == {"op": "pong", "id": 1}
        else:
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url(broker), origin=origin):  # type: ignore[arg-type]
                    pass
            assert refused.value.response.status_code == 403
            assert orjson.loads(refused.value.response.body)["error"]["code"] == "forbidden"


async def test_a_refused_origin_is_one_log_line_naming_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="broker"):
        async with broker_with(allowed_origins=["https://dash.example.com"]) as broker:
            with pytest.raises(InvalidStatus):
                async with connect(url(broker), origin="https://evil.example"):  # type: ignore[arg-type]
                    pass
    lines = [r.getMessage() for r in caplog.records if "evil.example" in r.getMessage()]
    assert lines == ["handshake refused: origin 'https://evil.example' is not allowed"], lines


# --- leeway, and secrets kept out of logs -----------------------------------------------


async def test_jwt_leeway_accepts_a_token_just_expired_and_no_more() -> None:
    async with (
        broker_with(jwt_secret=SECRET, jwt_leeway=30, auth_timeout=30.0) as broker,
        connect(url(broker)) as ws,
    ):
        reply = await call(ws, op="auth", id=1, token=hs256(ttl=-10))  # within the leeway
        assert (reply["op"], reply["sub"]) == ("ok", "alice"), reply
        assert 15 <= reply["expires_in"] <= 20, reply  # counted to exp + leeway: no expiry at once
        assert await call(ws, op="ping", id=2) == {"op": "pong", "id": 2}
        reply = await call(ws, op="auth", id=3, token=hs256(ttl=-60))  # past it
        assert (reply["op"], reply["code"]) == ("error", "unauthorized"), reply
    async with (
        broker_with(jwt_secret=SECRET, auth_timeout=30.0) as broker,
        connect(url(broker)) as ws,
    ):  # no leeway by default
        reply = await call(ws, op="auth", id=1, token=hs256(ttl=-10))
        assert (reply["op"], reply["code"]) == ("error", "unauthorized"), reply


async def test_no_token_secret_or_key_is_ever_logged_or_exported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api_key = "an-api-key-nobody-should-see-0123456789"
    good, bad = hs256(), _tampered_signature(hs256())
    # Every logger of the broker at debug, and websockets at the level the broker sets it
    # to (its own debug lines print request headers, so the broker never lowers it).
    with caplog.at_level(logging.DEBUG, logger="broker"):
        async with broker_with(jwt_secret=SECRET, api_key=api_key, auth_timeout=30.0) as broker:
            async with connect(url(broker)) as ws:
                await call(ws, op="auth", id=1, token=bad)
                await call(ws, op="auth", id=2, token=good)
            with pytest.raises(InvalidStatus):
                async with connect(
                    url(broker), additional_headers={"Authorization": f"Bearer {bad}"}
                ):
                    pass
            async with connect(url(broker), additional_headers={"Authorization": f"Bearer {good}"}):
                pass
            status, metrics = await asyncio.to_thread(
                http_get, f"http://127.0.0.1:{broker.http_port}/metrics", api_key
            )
            assert status == 200
    logged = caplog.text + "\n".join(repr(r.args) for r in caplog.records)
    assert "connection opened" in logged  # the broker's debug lines were captured
    for secret in (SECRET, api_key, good, bad, good.split(".")[2], bad.split(".")[2]):
        assert secret not in logged
        assert secret not in metrics


# --- abuse limits ---------------------------------------------------------------------


async def test_per_ip_and_per_user_connection_limits() -> None:
    async with broker_with(
        jwt_secret=SECRET, anonymous=True, max_connections_per_ip=2, max_connections_per_user=1
    ) as broker:
        async with connect(url(broker)) as first, connect(url(broker)):
            async with connect(url(broker)) as third:
                refused = await recv(third)
                assert (refused["code"], refused["id"]) == ("limit_exceeded", None)
                with pytest.raises(ConnectionClosed) as closed:
                    await within(third.recv())
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            assert (await call(first, op="auth", id=1, token=hs256("carol")))["op"] == "ok"
        async with connect(url(broker)) as a, connect(url(broker)) as b:
            assert (await call(a, op="auth", id=1, token=hs256("dave")))["op"] == "ok"
            refused = await call(b, op="auth", id=2, token=hs256("dave"))
            assert (refused["code"], refused["id"]) == ("limit_exceeded", 2)
            with pytest.raises(ConnectionClosed) as closed:
                await within(b.recv())
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013


async def test_x_forwarded_for_counts_only_behind_a_trusted_proxy() -> None:
    async with broker_with(max_connections_per_ip=1, trusted_proxies=["127.0.0.1"]) as broker:
        one = {"X-Forwarded-For": "203.0.113.1"}
        two = {"X-Forwarded-For": "203.0.113.2"}
        async with (
            connect(url(broker), additional_headers=one) as a,
            connect(url(broker), additional_headers=two) as b,
        ):
            assert await call(a, op="ping", id=1) == {"op": "pong", "id": 1}
            assert await call(b, op="ping", id=1) == {"op": "pong", "id": 1}
            async with connect(url(broker), additional_headers=one) as c:
                assert (await recv(c))["code"] == "limit_exceeded"
    one, other = {"X-Forwarded-For": "203.0.113.1"}, {"X-Forwarded-For": "203.0.113.9"}
    async with (
        broker_with(max_connections_per_ip=1) as broker,  # no trusted proxy
        connect(url(broker), additional_headers=one),
        connect(url(broker), additional_headers=other) as c,
    ):
        assert (await recv(c))["code"] == "limit_exceeded"  # both are 127.0.0.1


async def test_the_browser_client_can_be_imported_from_allowed_origins() -> None:
    """A module import from another origin needs Access-Control-Allow-Origin."""
    import urllib.request

    def get(port: int, origin: str | None) -> dict[str, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/client/broker.js")
        if origin is not None:
            request.add_header("Origin", origin)
        with urllib.request.urlopen(request, timeout=5) as response:
            return dict(response.headers)

    async with broker_with() as broker:
        headers = await asyncio.to_thread(get, broker.ws_port, "https://any.example")
        assert headers["Access-Control-Allow-Origin"] == "*"
    async with broker_with(allowed_origins=["https://*.example.org"]) as broker:
        headers = await asyncio.to_thread(get, broker.ws_port, "https://app.example.org")
        assert headers["Access-Control-Allow-Origin"] == "https://app.example.org"
        assert headers["Vary"] == "Origin"
        headers = await asyncio.to_thread(get, broker.ws_port, "https://evil.example")
        assert "Access-Control-Allow-Origin" not in headers
