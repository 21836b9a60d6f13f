"""Pydantic models of every frame on the wire.

Client frames are frozen, reject unknown fields and form a union
discriminated on ``op``. Server frames are modelled too, but only to publish
their JSON Schema: the hot path encodes them in ``codec`` without pydantic.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    WithJsonSchema,
    field_validator,
)

from broker.codes import ErrorCode

#: A request id: an integer, or a string of at most 64 characters.
RequestId = StrictInt | Annotated[StrictStr, Field(max_length=64)]
#: A publish's idempotency key.
PublishKey = Annotated[StrictStr, Field(min_length=1, max_length=128)]


class _ClientFrame(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: RequestId | None = Field(
        default=None,
        description="Optional request id; a request with an id gets exactly one reply with it.",
    )


class Since(BaseModel):
    """A position in a channel to recover from: the last one the client saw."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    offset: StrictInt = Field(ge=0, description="The last offset seen; 0: from the start.")
    epoch: StrictStr = Field(description="The epoch that offset belongs to.")


class Subscribe(_ClientFrame):
    """Start receiving messages published to channels matching ``channel``."""

    op: Literal["subscribe"]
    channel: StrictStr = Field(description="A channel name or a pattern with `*` / `>`.")
    since: Since | None = Field(
        None, description="Exact channel with history: replay what came after this position."
    )
    history: StrictInt | None = Field(
        None, ge=1, description="Exact channel with history: replay the last N kept messages."
    )

    @field_validator("since", "history", mode="before")
    @classmethod
    def _left_out_not_null(cls, value: Any) -> Any:
        # Absent means "no replay"; an explicit null is "anything else" (bad_request).
        if value is None:
            raise ValueError("leave it out rather than sending null")
        return value


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
    key: PublishKey | None = Field(
        None, description="Idempotency key: a retry with the same key is not delivered again."
    )


class Ping(_ClientFrame):
    """Ask for a ``pong``: an application-level liveness check."""

    op: Literal["ping"]


class Auth(_ClientFrame):
    """Authenticate with a token, or replace the connection's token (refresh)."""

    op: Literal["auth"]
    # No length limit here: a token over 8,192 characters is refused unparsed as
    # ``unauthorized`` by the session, not as a malformed frame.
    token: StrictStr = Field(description="A JWT; never in the URL.")


class HttpPublish(BaseModel):
    """Body of ``POST /publish`` on the service API."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    channel: StrictStr = Field(description="A channel name (patterns are refused).")
    data: Any = Field(description="Any JSON value; its serialized size is capped.")
    key: PublishKey | None = Field(
        None, description="Idempotency key (or the Idempotency-Key header)."
    )


AnyClientFrame = Subscribe | Unsubscribe | Publish | Ping | Auth
ClientFrame = Annotated[AnyClientFrame, Field(discriminator="op")]
CLIENT_FRAME: TypeAdapter[AnyClientFrame] = TypeAdapter(ClientFrame)


class _ServerFrame(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")


class Ok(_ServerFrame):
    """Success reply to a request that carried an ``id``; more fields by request kind."""

    op: Literal["ok"]
    id: RequestId
    sub: str | None = Field(None, description="auth: the token's subject.")
    expires_in: int | None = Field(None, description="auth: whole seconds until the token expires.")
    offset: int | None = Field(
        None, description="On a channel with history: the publish's, or the channel's latest."
    )
    epoch: str | None = Field(None, description="On a channel with history: the offset's epoch.")
    recovered: bool | None = Field(None, description="subscribe with since: all was replayed.")
    reason: str | None = Field(
        None, description="recovered is false: trimmed, epoch_changed or no_history."
    )
    duplicate: bool | None = Field(
        None, description="publish with key: the key was seen, this one was not delivered."
    )


class Pong(_ServerFrame):
    """Reply to a ``ping`` that carried an ``id`` (an id-less ping gets no reply)."""

    op: Literal["pong"]
    id: RequestId


class Error(_ServerFrame):
    """A request failed; ``id`` is null when the request had none or was unreadable."""

    op: Literal["error"]
    id: RequestId | None
    # Inline in the schema (not a $ref), derived from the one list of codes.
    code: Annotated[
        ErrorCode, WithJsonSchema({"type": "string", "enum": [code.value for code in ErrorCode]})
    ]
    message: str


class Message(_ServerFrame):
    """A published message, delivered once per connection however many subscriptions match.

    On a channel with history it carries its ``offset`` and ``epoch``.
    """

    op: Literal["message"]
    channel: str
    data: Any
    offset: int | None = Field(None, ge=1, description="Only on a channel with history.")
    epoch: str | None = Field(None, min_length=1, description="Only on a channel with history.")


class Gap(_ServerFrame):
    """Messages the subscription ``channel`` should have had may be lost, and cannot be replayed."""

    op: Literal["gap"]
    channel: str = Field(description="The channel or pattern as the client subscribed it.")
    reason: str = Field(
        description="backplane_interrupted, offset_hole, epoch_changed, or another documented code."
    )


class Unsubscribed(_ServerFrame):
    """The broker ended the subscription ``channel`` (for example, a refresh narrowed the token)."""

    op: Literal["unsubscribed"]
    channel: str = Field(description="The channel or pattern as the client subscribed it.")
    code: Annotated[
        ErrorCode, WithJsonSchema({"type": "string", "enum": [code.value for code in ErrorCode]})
    ]


AnyServerFrame = Ok | Pong | Error | Message | Gap | Unsubscribed
ServerFrame = Annotated[AnyServerFrame, Field(discriminator="op")]
SERVER_FRAME: TypeAdapter[AnyServerFrame] = TypeAdapter(ServerFrame)


def json_schema() -> dict[str, Any]:
    """Return one JSON Schema document describing client and server frames."""
    client = CLIENT_FRAME.json_schema(ref_template="#/$defs/{model}")
    server = SERVER_FRAME.json_schema(ref_template="#/$defs/{model}")
    defs: dict[str, Any] = {**client.pop("$defs", {}), **server.pop("$defs", {})}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Broker wire protocol, version 2",
        "description": "Every frame is a JSON object in a WebSocket text frame. "
        "ClientFrame: client to server; ServerFrame: server to client.",
        "$defs": {**defs, "ClientFrame": client, "ServerFrame": server},
        "oneOf": [{"$ref": "#/$defs/ClientFrame"}, {"$ref": "#/$defs/ServerFrame"}],
    }
