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
    │   ├── Internal            internal
    │   ├── Unauthorized        unauthorized
    │   └── TokenExpired        token_expired
    ├── ConnectionClosed        connection_closed: no connection, or it was lost
    │                           before the reply came (the request may or may not
    │                           have reached the broker)
    ├── CannotConnect           cannot_connect: the first connection never opened
    │                           (.cause; also an OSError, like websockets' own)
    ├── OutboxFull              outbox_full: too many fire-and-forget publishes
    │                           wait for a connection
    └── Timeout                 timeout: no reply in time (also a TimeoutError)

A code this client does not know (from a newer broker) becomes a plain
:class:`RequestError` carrying that code, so ``except RequestError`` and
``exc.code`` keep working.
"""

from __future__ import annotations

from broker_protocol import ErrorCode

__all__ = [
    "ERROR_CODES",
    "BadChannel",
    "BadFrame",
    "BadRequest",
    "BrokerError",
    "CannotConnect",
    "ConnectionClosed",
    "Forbidden",
    "Internal",
    "LimitExceeded",
    "NotSubscribed",
    "OutboxFull",
    "RateLimited",
    "RequestError",
    "Timeout",
    "TokenExpired",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "error_for_code",
]


class BrokerError(Exception):
    """Base class of every exception this client raises on purpose."""

    code: str = ErrorCode.INTERNAL.value

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
    code = ErrorCode.BAD_FRAME.value


class BadRequest(RequestError):
    code = ErrorCode.BAD_REQUEST.value


class BadChannel(RequestError):
    code = ErrorCode.BAD_CHANNEL.value


class NotSubscribed(RequestError):
    code = ErrorCode.NOT_SUBSCRIBED.value


class TooLarge(RequestError):
    code = ErrorCode.TOO_LARGE.value


class Forbidden(RequestError):
    code = ErrorCode.FORBIDDEN.value


class RateLimited(RequestError):
    code = ErrorCode.RATE_LIMITED.value


class LimitExceeded(RequestError):
    code = ErrorCode.LIMIT_EXCEEDED.value


class Unavailable(RequestError):
    code = ErrorCode.UNAVAILABLE.value


class Internal(RequestError):
    code = ErrorCode.INTERNAL.value


class Unauthorized(RequestError):
    """No valid token where one is needed, or a refused token (the message says why)."""

    code = ErrorCode.UNAUTHORIZED.value


class TokenExpired(RequestError):
    """The connection's token ran out; a fresh ``auth`` within the grace keeps it."""

    code = ErrorCode.TOKEN_EXPIRED.value


class ConnectionClosed(BrokerError):
    """There is no connection to the broker any more, or it was lost mid-request.

    Raised when the client is closed or has given up reconnecting, and when a
    publish without a ``key`` was sent but the connection dropped before its
    reply: the message may or may not have been delivered. (A connection that
    never opened is :class:`CannotConnect`.)
    """

    code = "connection_closed"

    def __init__(
        self, message: str, *, close_code: int | None = None, close_reason: str = ""
    ) -> None:
        super().__init__(message)
        #: WebSocket close code when the broker closed the connection, else None.
        self.close_code = close_code
        self.close_reason = close_reason


class CannotConnect(BrokerError, OSError):
    """The client could not open its first connection, so entering it failed.

    ``cause`` is what went wrong (refused, unknown host, handshake refused,
    time-out, bad URL); it is also the exception's ``__cause__``. An
    ``OSError``, as the ``websockets`` library raises for the same failures,
    so ``except OSError`` keeps working. Reconnections after the first
    connection never raise it: they are retried with backoff.
    """

    code = "cannot_connect"

    def __init__(self, message: str, *, cause: BaseException | None = None) -> None:
        super().__init__(message)
        #: The underlying failure (``OSError``, ``InvalidStatus``, ``TimeoutError`` ...).
        self.cause = cause
        self.__cause__ = cause


class OutboxFull(BrokerError):
    """``publish_nowait`` found the outbox full: the message was not queued.

    The outbox holds fire-and-forget publishes while the client is not
    connected (or has not written them yet); its size is the client's
    ``max_outbox`` option. Wait for the connection (``await client.drain()``)
    or use ``await client.publish()``, which waits by itself.
    """

    code = "outbox_full"


class Timeout(BrokerError, TimeoutError):
    """No reply came within the time-out (the request may still take effect)."""

    code = "timeout"


# The wire codes (ErrorCode) are the one source: a code without its class here
# fails tests/test_client_core.py, and unknown codes still map to RequestError.
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
        Unauthorized,
        TokenExpired,
    )
}

#: Every wire error code of protocol version 2, in the order of the protocol document.
ERROR_CODES: tuple[str, ...] = tuple(code.value for code in ErrorCode)


def error_for_code(code: str, message: str, *, request_id: int | str | None = None) -> RequestError:
    """Return the exception for a wire error ``code`` (unknown codes give a RequestError)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return RequestError(message, code=code, request_id=request_id)
    return cls(message, request_id=request_id)
