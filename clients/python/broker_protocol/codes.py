"""The wire protocol's error codes and close codes: the one source of both.

The broker server (``broker.codes``) and the Python client (``broker_client.errors``)
both derive their exception trees from these, the server its frame models
and JSON Schema too, and a test checks the browser client's lists against
them. They ship with the client distribution, which the server depends on.
"""

from __future__ import annotations

import enum

__all__ = ["CloseCode", "ErrorCode"]


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ``error`` frame, in the order of the protocol document."""

    BAD_FRAME = "bad_frame"
    BAD_REQUEST = "bad_request"
    BAD_CHANNEL = "bad_channel"
    NOT_SUBSCRIBED = "not_subscribed"
    TOO_LARGE = "too_large"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    LIMIT_EXCEEDED = "limit_exceeded"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    # Protocol version 2.
    UNAUTHORIZED = "unauthorized"  # no or invalid credentials
    TOKEN_EXPIRED = "token_expired"  # the token ran out; refresh within the grace


class CloseCode(enum.IntEnum):
    """WebSocket close codes the broker uses, each with the one meaning the protocol gives it."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the server is shutting down
    POLICY = 1008  # authentication failed, or sustained abuse
    TOO_BIG = 1009  # a frame over the frame size cap
    INTERNAL = 1011  # unexpected server error
    RESTART = 1012  # service restart: reconnect, possibly to another process
    TRY_AGAIN = 1013  # slow consumer or overload: try again later
