"""A synchronous publisher for services that only publish, over the broker's HTTP API.

It needs no event loop and no WebSocket: each :meth:`HttpPublisher.publish`
is one ``POST /publish`` on the service port (default 8001), made with the
standard library's ``urllib``. Safe to share between threads.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import orjson

from .errors import (
    BadRequest,
    ConnectionClosed,
    Internal,
    RequestError,
    Timeout,
    TooLarge,
    Unavailable,
    error_for_code,
)

__all__ = ["DEFAULT_HTTP_URL", "HttpPublisher"]

#: Where the publisher posts when no URL is given.
DEFAULT_HTTP_URL = "http://localhost:8001"

# Used when an error answer has no readable {"error": {...}} body (a proxy's page, say).
_BY_STATUS: dict[int, type[RequestError]] = {
    400: BadRequest,
    413: TooLarge,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


class HttpPublisher:
    """Publish messages with ``POST {base_url}/publish``.

    ::

        publisher = HttpPublisher("http://localhost:8001")
        publisher.publish("orders.created", {"id": 42})

    ``timeout`` (seconds, default 10) bounds each request; ``headers`` are
    added to every request (for example an ``Authorization`` header).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_HTTP_URL,
        *,
        timeout: float = 10.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", **(headers or {})}

    def __repr__(self) -> str:
        return f"<HttpPublisher {self.base_url}>"

    def publish(self, channel: str, data: Any) -> None:
        """Publish ``data`` (any JSON value) to ``channel``; return once the broker took it.

        Raises the broker's error as its :class:`RequestError` subclass
        (``BadChannel``, ``TooLarge``, ``Unavailable`` ...), :class:`Timeout`
        when no answer came in time, :class:`ConnectionClosed` when the broker
        cannot be reached, and ``TypeError`` if ``data`` is not JSON-encodable.
        """
        body = orjson.dumps({"channel": channel, "data": data})
        request = urllib.request.Request(
            f"{self.base_url}/publish", data=body, headers=self.headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                raise _error_from_response(exc.code, exc.read()) from None
        except TimeoutError as exc:
            raise Timeout(f"no answer from {self.base_url} within {self.timeout:g} s") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise Timeout(f"no answer from {self.base_url} within {self.timeout:g} s") from exc
            raise ConnectionClosed(f"cannot reach {self.base_url}: {exc.reason}") from exc
        except OSError as exc:  # reset or closed mid-answer
            raise ConnectionClosed(f"connection to {self.base_url} failed: {exc}") from exc


def _error_from_response(status: int, body: bytes) -> RequestError:
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
