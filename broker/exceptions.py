"""One exception tree for the broker, each request-level error carrying its wire code.

::

    BrokerError
    ├── RequestError            the client's fault: becomes an ``error`` frame
    │   ├── BadFrame            bad_frame
    │   ├── BadRequest          bad_request
    │   ├── BadChannel          bad_channel
    │   ├── NotSubscribed       not_subscribed
    │   ├── TooLarge            too_large
    │   ├── Unauthorized        unauthorized (no or invalid credentials)
    │   ├── TokenExpired        token_expired
    │   ├── Forbidden           forbidden
    │   ├── RateLimited         rate_limited
    │   ├── LimitExceeded       limit_exceeded
    │   └── Unavailable         unavailable (the backplane cannot take it now)
    ├── ConfigError             a setting is invalid; the process exits with one line
    └── BackplaneError          the backplane failed; callers answer ``unavailable``

``internal`` is not an exception class: any other exception reaching a
request boundary is our bug, logged with its traceback, answered ``internal``.
"""

from __future__ import annotations

from typing import ClassVar

from broker.codes import ERROR_CODES, ErrorCode

__all__ = [
    "ERROR_CODES",
    "BackplaneError",
    "BadChannel",
    "BadFrame",
    "BadRequest",
    "BrokerError",
    "ConfigError",
    "Forbidden",
    "LimitExceeded",
    "NotSubscribed",
    "RateLimited",
    "RequestError",
    "TokenExpired",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
]


class BrokerError(Exception):
    """Base class of every exception the broker raises on purpose."""


class RequestError(BrokerError):
    """A request failed for a reason the client can be told about."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    #: HTTP status the service API answers with for this error.
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, *, request_id: int | str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The ``id`` of the request that failed, when it could be read.
        self.request_id = request_id


class BadFrame(RequestError):
    code = ErrorCode.BAD_FRAME
    http_status = 400


class BadRequest(RequestError):
    code = ErrorCode.BAD_REQUEST
    http_status = 400


class BadChannel(RequestError):
    code = ErrorCode.BAD_CHANNEL
    http_status = 400


class NotSubscribed(RequestError):
    code = ErrorCode.NOT_SUBSCRIBED
    http_status = 409


class TooLarge(RequestError):
    code = ErrorCode.TOO_LARGE
    http_status = 413


class Unauthorized(RequestError):
    code = ErrorCode.UNAUTHORIZED
    http_status = 401


class TokenExpired(RequestError):
    code = ErrorCode.TOKEN_EXPIRED
    http_status = 401


class Forbidden(RequestError):
    code = ErrorCode.FORBIDDEN
    http_status = 403


class RateLimited(RequestError):
    code = ErrorCode.RATE_LIMITED
    http_status = 429


class LimitExceeded(RequestError):
    code = ErrorCode.LIMIT_EXCEEDED
    http_status = 429


class Unavailable(RequestError):
    code = ErrorCode.UNAVAILABLE
    http_status = 503


class ConfigError(BrokerError):
    """A configuration value is invalid; ``str(exc)`` names the setting."""


class BackplaneError(BrokerError):
    """The backplane could not carry out an operation (for example Redis is down).

    ``maybe_sent``: the operation had left this process when it failed (a
    time-out on a stalled link), so it may still take effect.
    """

    def __init__(self, message: str, *, maybe_sent: bool = False) -> None:
        super().__init__(message)
        self.maybe_sent = maybe_sent
