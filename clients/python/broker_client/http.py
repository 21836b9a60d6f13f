"""A synchronous publisher for services that only publish, over the broker's HTTP API.

It needs no event loop and no WebSocket: each :meth:`HttpPublisher.publish`
is one ``POST /publish`` on the service port (default 8001), made with the
standard library's ``urllib``. Safe to share between threads. The asyncio
twin, with keep-alive connections, is :class:`AsyncHttpPublisher`
(``async_http.py``); both build the request and read the answer with the
helpers here, so they agree on every status and error.
"""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from .errors import (
    BadRequest,
    ConnectionClosed,
    Forbidden,
    Internal,
    RateLimited,
    RequestError,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
    error_for_code,
)
from .frames import PublishResult, check_key

__all__ = [
    "DEFAULT_HTTP_URL",
    "HttpPublisher",
    "error_from_response",
    "publish_body",
    "request_headers",
    "result_from_body",
]

#: Where the publishers post when no URL is given.
DEFAULT_HTTP_URL = "http://localhost:8001"
# Used when an error answer has no readable {"error": {...}} body (a proxy's page, say).
_BY_STATUS: dict[int, type[RequestError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    413: TooLarge,
    429: RateLimited,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


def publish_body(channel: str, data: Any, key: str | None) -> bytes:
    """The JSON body of ``POST /publish``; ``TypeError`` if ``data`` is not JSON-encodable."""
    body: dict[str, Any] = {"channel": channel, "data": data}
    if key is not None:
        body["key"] = check_key(key)
    return orjson.dumps(body)


def pick_key(key: str | None, idempotent: bool) -> str | None:
    """``key``, or a random one when ``idempotent`` and there is none."""
    if key is None and idempotent:
        return uuid.uuid4().hex
    return key


def request_headers(
    api_key: str | None, headers: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The headers of every publish: JSON, the API key as a Bearer token, then ``headers``."""
    result = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key is not None:
        result["Authorization"] = f"Bearer {api_key}"
    result.update(headers or {})
    for name, value in result.items():
        if any(c in name + value for c in "\r\n\0"):
            raise ValueError(f"header {name!r} holds a line break")
    return result


def result_from_body(body: bytes) -> PublishResult:
    """Read a ``200`` answer: ``{"ok": true}`` and, on newer brokers, the message's position."""
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError:
        return PublishResult()
    return PublishResult.from_fields(fields) if isinstance(fields, dict) else PublishResult()


def error_from_response(status: int, body: bytes) -> RequestError:
    """The exception for an error answer: from its JSON ``error`` body, else from its status."""
    try:
        error = orjson.loads(body)["error"]
        code, message = error["code"], error["message"]
        if isinstance(code, str) and isinstance(message, str):
            return error_for_code(code, message)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    cls = _BY_STATUS.get(status, Internal if status >= 500 else BadRequest)
    text = body[:200].decode("utf-8", "replace").strip()
    return cls(f"HTTP {status}" + (f": {text}" if text else ""))


class HttpPublisher:
    """Publish messages with ``POST {base_url}/publish``.

    ::

        publisher = HttpPublisher("http://localhost:8001", api_key=os.environ["BROKER_API_KEY"])
        publisher.publish("orders.created", {"id": 42}, key="order-42")

    ``api_key`` is sent as ``Authorization: Bearer`` (the broker's ``api_key``
    setting). ``timeout`` (seconds, default 10) bounds each request;
    ``headers`` are added to every request. ``idempotent`` gives every
    publish without a ``key`` a random one. It keeps no connection open.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_HTTP_URL,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        headers: Mapping[str, str] | None = None,
        idempotent: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.idempotent = idempotent
        self.headers = request_headers(api_key, headers)

    def __repr__(self) -> str:
        return f"<HttpPublisher {self.base_url}>"

    def publish(self, channel: str, data: Any, *, key: str | None = None) -> PublishResult:
        """Publish ``data`` (any JSON value) to ``channel``; return once the broker took it.

        With a ``key`` the broker delivers the message once however many
        times it is posted (within its idempotency window), so a publish that
        failed with :class:`Timeout` or :class:`ConnectionClosed` can be
        posted again; the result's ``duplicate`` then says it was already in.

        Raises the broker's error as its :class:`RequestError` subclass
        (``BadChannel``, ``TooLarge``, ``Unauthorized``, ``Unavailable`` ...),
        :class:`Timeout` when no answer came in time, :class:`ConnectionClosed`
        when the broker cannot be reached, and ``TypeError`` if ``data`` is
        not JSON-encodable.
        """
        body = publish_body(channel, data, pick_key(key, self.idempotent))
        request = urllib.request.Request(
            f"{self.base_url}/publish", data=body, headers=self.headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return result_from_body(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                raise error_from_response(exc.code, exc.read()) from None
        except TimeoutError as exc:
            raise Timeout(f"no answer from {self.base_url} within {self.timeout:g} s") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise Timeout(f"no answer from {self.base_url} within {self.timeout:g} s") from exc
            raise ConnectionClosed(f"cannot reach {self.base_url}: {exc.reason}") from exc
        except OSError as exc:  # reset or closed mid-answer
            raise ConnectionClosed(f"connection to {self.base_url} failed: {exc}") from exc
