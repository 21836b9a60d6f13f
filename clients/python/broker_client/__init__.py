"""Python client of the WebSocket pub/sub broker.

::

    from broker_client import connect

    async with connect("ws://localhost:8000/ws") as client:
        await client.publish("sensors.kitchen", {"t": 21.5})
        async for message in await client.subscribe("sensors.>"):
            print(message.channel, message.data)

The client authenticates with a token (``token=`` or ``token_provider=``,
refreshed before it expires), reconnects by itself (capped, jittered
backoff), re-subscribes everything, recovers what exact channels with
history missed (``since``), and reports each remaining possible gap in the
stream as a :class:`Gap` (``client.on_reconnect``, ``Subscription.events()``,
``Subscription.gaps``). :class:`HttpPublisher` (synchronous) and
:class:`AsyncHttpPublisher` publish over the HTTP API.
"""

from ._auth import TokenProvider
from .async_http import AsyncHttpPublisher
from .backoff import Backoff
from .client import DEFAULT_MAX_OUTBOX, DEFAULT_URL, Client, ClientOptions, State, connect
from .errors import (
    ERROR_CODES,
    BadChannel,
    BadFrame,
    BadRequest,
    BrokerError,
    CannotConnect,
    ConnectionClosed,
    Forbidden,
    Internal,
    LimitExceeded,
    NotSubscribed,
    OutboxFull,
    RateLimited,
    RequestError,
    Timeout,
    TokenExpired,
    TooLarge,
    Unauthorized,
    Unavailable,
    error_for_code,
)
from .frames import Gap, GapReason, Message, Position, PublishResult, matches
from .http import DEFAULT_HTTP_URL, HttpPublisher
from .subscription import Subscription

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_HTTP_URL",
    "DEFAULT_MAX_OUTBOX",
    "DEFAULT_URL",
    "ERROR_CODES",
    "AsyncHttpPublisher",
    "Backoff",
    "BadChannel",
    "BadFrame",
    "BadRequest",
    "BrokerError",
    "CannotConnect",
    "Client",
    "ClientOptions",
    "ConnectionClosed",
    "Forbidden",
    "Gap",
    "GapReason",
    "HttpPublisher",
    "Internal",
    "LimitExceeded",
    "Message",
    "NotSubscribed",
    "OutboxFull",
    "Position",
    "PublishResult",
    "RateLimited",
    "RequestError",
    "State",
    "Subscription",
    "Timeout",
    "TokenExpired",
    "TokenProvider",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "connect",
    "error_for_code",
    "matches",
]
