"""The exceptions the client raises, one tree rooted at :class:`BrokerError`.

::

    BrokerError                 .code, .message
    ├── RequestError            the broker answered a request with an ``error`` frame
    │   ├── BadFrame            bad_frame
    │   ├── BadRequest          bad_request
    │   ├── BadChannel          bad_channel
    │   ├── NotSubscribed       not_subscribed
    │   ├── TooLarge            too_large
    │   ├── Forbidden           forbidden
    │   ├── RateLimited         rate_limited
    │   ├── LimitExceeded       limit_exceeded
    │   ├── Unavailable         unavailable
    │   └── Internal            internal
    ├── ConnectionClosed        connection_closed: no connection, or it was lost
    │                           before the reply came (the request may or may not
    │                           have reached the broker)
    └── Timeout                 timeout: no reply in time (also a TimeoutError)

A code this client does not know (from a newer broker) becomes a plain
:class:`RequestError` carrying that code, so ``except RequestError`` and
``exc.code`` keep working.
"""

from __future__ import annotations

__all__ = [
    "ERROR_CODES",
    "BadChannel",
    "BadFrame",
    "BadRequest",
    "BrokerError",
    "ConnectionClosed",
    "Forbidden",
    "Internal",
    "LimitExceeded",
    "NotSubscribed",
    "RateLimited",
    "RequestError",
    "Timeout",
    "TooLarge",
    "Unavailable",
    "error_for_code",
]


class BrokerError(Exception):
    """Base class of every exception this client raises on purpose."""

    code: str = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class RequestError(BrokerError):
    """The broker refused a request; ``code`` is the wire error code."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        request_id: int | str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        #: The ``id`` of the request that failed (None for fire-and-forget requests).
        self.request_id = request_id


class BadFrame(RequestError):
    code = "bad_frame"


class BadRequest(RequestError):
    code = "bad_request"


class BadChannel(RequestError):
    code = "bad_channel"


class NotSubscribed(RequestError):
    code = "not_subscribed"


class TooLarge(RequestError):
    code = "too_large"


class Forbidden(RequestError):
    code = "forbidden"


class RateLimited(RequestError):
    code = "rate_limited"


class LimitExceeded(RequestError):
    code = "limit_exceeded"


class Unavailable(RequestError):
    code = "unavailable"


class Internal(RequestError):
    code = "internal"


class ConnectionClosed(BrokerError):
    """There is no connection to the broker, or it was lost mid-request.

    Raised when the first connection fails, when the client is closed or has
    given up reconnecting, and when a non-idempotent request (``publish``) was
    sent but the connection dropped before its reply: the message may or may
    not have been delivered.
    """

    code = "connection_closed"

    def __init__(
        self, message: str, *, close_code: int | None = None, close_reason: str = ""
    ) -> None:
        super().__init__(message)
        #: WebSocket close code when the broker closed the connection, else None.
        self.close_code = close_code
        self.close_reason = close_reason


class Timeout(BrokerError, TimeoutError):
    """No reply came within the time-out (the request may still take effect)."""

    code = "timeout"


_BY_CODE: dict[str, type[RequestError]] = {
    cls.code: cls
    for cls in (
        BadFrame,
        BadRequest,
        BadChannel,
        NotSubscribed,
        TooLarge,
        Forbidden,
        RateLimited,
        LimitExceeded,
        Unavailable,
        Internal,
    )
}

#: Every wire error code of protocol version 1, in the order of the protocol document.
ERROR_CODES: tuple[str, ...] = tuple(_BY_CODE)


def error_for_code(code: str, message: str, *, request_id: int | str | None = None) -> RequestError:
    """Return the exception for a wire error ``code`` (unknown codes give a RequestError)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return RequestError(message, code=code, request_id=request_id)
    return cls(message, request_id=request_id)
