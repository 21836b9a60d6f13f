"""Python client of the WebSocket pub/sub broker.

::

    from broker_client import connect

    async with connect("ws://localhost:8000/ws") as client:
        await client.publish("sensors.kitchen", {"t": 21.5})
        async for message in await client.subscribe("sensors.>"):
            print(message.channel, message.data)

The client reconnects by itself (capped, jittered backoff), re-subscribes
everything, and reports each possible gap in the stream as a :class:`Gap`
(``client.on_reconnect``, ``Subscription.events()``, ``Subscription.gaps``).
:class:`HttpPublisher` publishes synchronously over the HTTP API.
"""

from .backoff import Backoff
from .client import DEFAULT_URL, Client, ClientOptions, State, connect
from .errors import (
    ERROR_CODES,
    BadChannel,
    BadFrame,
    BadRequest,
    BrokerError,
    ConnectionClosed,
    Forbidden,
    Internal,
    LimitExceeded,
    NotSubscribed,
    RateLimited,
    RequestError,
    Timeout,
    TooLarge,
    Unavailable,
    error_for_code,
)
from .frames import Gap, Message, matches
from .http import DEFAULT_HTTP_URL, HttpPublisher
from .subscription import Subscription

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_HTTP_URL",
    "DEFAULT_URL",
    "ERROR_CODES",
    "Backoff",
    "BadChannel",
    "BadFrame",
    "BadRequest",
    "BrokerError",
    "Client",
    "ClientOptions",
    "ConnectionClosed",
    "Forbidden",
    "Gap",
    "HttpPublisher",
    "Internal",
    "LimitExceeded",
    "Message",
    "NotSubscribed",
    "RateLimited",
    "RequestError",
    "State",
    "Subscription",
    "Timeout",
    "TooLarge",
    "Unavailable",
    "connect",
    "error_for_code",
    "matches",
]
