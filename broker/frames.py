"""Pydantic models of every frame on the wire.

Client frames are frozen, reject unknown fields and form a union
discriminated on ``op``. Server frames are modelled too, but only to publish
their JSON Schema: the hot path encodes them in ``codec`` without pydantic.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter

#: A request id: an integer, or a string of at most 64 characters.
RequestId = StrictInt | Annotated[StrictStr, Field(max_length=64)]


class _ClientFrame(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: RequestId | None = Field(
        default=None,
        description="Optional request id; a request with an id gets exactly one reply with it.",
    )


class Subscribe(_ClientFrame):
    """Start receiving messages published to channels matching ``channel``."""

    op: Literal["subscribe"]
    channel: StrictStr = Field(description="A channel name or a pattern with `*` / `>`.")


class Unsubscribe(_ClientFrame):
    """Stop a subscription made with the same ``channel`` string."""

    op: Literal["unsubscribe"]
    channel: StrictStr = Field(description="Exactly the string given to subscribe.")


class Publish(_ClientFrame):
    """Publish ``data`` to every subscriber of ``channel``."""

    op: Literal["publish"]
    channel: StrictStr = Field(description="A channel name (patterns are refused).")
    # Any JSON value. Kept as ``Any`` on purpose: the codec has already parsed it
    # with orjson (which refuses NaN and Infinity), and re-validating a large
    # document value by value would cost more than the rest of the request.
    data: Any = Field(description="Any JSON value; its serialized size is capped.")


class Ping(_ClientFrame):
    """Ask for a ``pong``: an application-level liveness check."""

    op: Literal["ping"]


class HttpPublish(BaseModel):
    """Body of ``POST /publish`` on the service API."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    channel: StrictStr = Field(description="A channel name (patterns are refused).")
    data: Any = Field(description="Any JSON value; its serialized size is capped.")


ClientFrame = Annotated[Subscribe | Unsubscribe | Publish | Ping, Field(discriminator="op")]
CLIENT_FRAME: TypeAdapter[Subscribe | Unsubscribe | Publish | Ping] = TypeAdapter(ClientFrame)


class _ServerFrame(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")


class Ok(_ServerFrame):
    """Success reply to a request that carried an ``id``."""

    op: Literal["ok"]
    id: RequestId


class Pong(_ServerFrame):
    """Reply to a ``ping`` that carried an ``id`` (an id-less ping gets no reply)."""

    op: Literal["pong"]
    id: RequestId


class Error(_ServerFrame):
    """A request failed; ``id`` is null when the request had none or was unreadable."""

    op: Literal["error"]
    id: RequestId | None
    code: Literal[
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
    ]
    message: str


class Message(_ServerFrame):
    """A published message, delivered once per connection however many subscriptions match."""

    op: Literal["message"]
    channel: str
    data: Any


ServerFrame = Annotated[Ok | Pong | Error | Message, Field(discriminator="op")]
SERVER_FRAME: TypeAdapter[Ok | Pong | Error | Message] = TypeAdapter(ServerFrame)


def json_schema() -> dict[str, Any]:
    """Return one JSON Schema document describing client and server frames."""
    client = CLIENT_FRAME.json_schema(ref_template="#/$defs/{model}")
    server = SERVER_FRAME.json_schema(ref_template="#/$defs/{model}")
    defs: dict[str, Any] = {**client.pop("$defs", {}), **server.pop("$defs", {})}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Broker wire protocol, version 1",
        "description": "Every frame is a JSON object in a WebSocket text frame. "
        "ClientFrame: client to server; ServerFrame: server to client.",
        "$defs": {**defs, "ClientFrame": client, "ServerFrame": server},
        "oneOf": [{"$ref": "#/$defs/ClientFrame"}, {"$ref": "#/$defs/ServerFrame"}],
    }
