"""One exception tree for the broker, each request-level error carrying its wire code.

::

    BrokerError
    ├── RequestError            the client's fault: becomes an ``error`` frame
    │   ├── BadFrame            bad_frame
    │   ├── BadRequest          bad_request
    │   ├── BadChannel          bad_channel
    │   ├── NotSubscribed       not_subscribed
    │   ├── TooLarge            too_large
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


class BrokerError(Exception):
    """Base class of every exception the broker raises on purpose."""


class RequestError(BrokerError):
    """A request failed for a reason the client can be told about."""

    code: ClassVar[str] = "internal"
    #: HTTP status the service API answers with for this error.
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, *, request_id: int | str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The ``id`` of the request that failed, when it could be read.
        self.request_id = request_id


class BadFrame(RequestError):
    code = "bad_frame"
    http_status = 400


class BadRequest(RequestError):
    code = "bad_request"
    http_status = 400


class BadChannel(RequestError):
    code = "bad_channel"
    http_status = 400


class NotSubscribed(RequestError):
    code = "not_subscribed"
    http_status = 409


class TooLarge(RequestError):
    code = "too_large"
    http_status = 413


class Forbidden(RequestError):
    code = "forbidden"
    http_status = 403


class RateLimited(RequestError):
    code = "rate_limited"
    http_status = 429


class LimitExceeded(RequestError):
    code = "limit_exceeded"
    http_status = 429


class Unavailable(RequestError):
    code = "unavailable"
    http_status = 503


class ConfigError(BrokerError):
    """A configuration value is invalid; ``str(exc)`` names the setting."""


class BackplaneError(BrokerError):
    """The backplane could not carry out an operation (for example Redis is down)."""


#: Every wire error code, in the order of PROTOCOL.md.
ERROR_CODES: tuple[str, ...] = (
    "bad_frame",
    "bad_request",
    "bad_channel",
    "not_subscribed",
    "too_large",
    "forbidden",
    "rate_limited",
    "limit_exceeded",
    "unavailable",
    "internal",
)
