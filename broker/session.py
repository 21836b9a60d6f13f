"""Per-connection protocol state: a frame in, a list of effects out.

Theory of operation. The WebSocket adapter hands every client frame to
``Session.receive`` together with the current time. The session decodes and
validates it, applies the per-connection rules (subscription count, data size,
request rate, error budget) and answers with *effects*: what the node must do,
in order. The session never awaits and never touches a socket, so all of the
protocol's decisions are unit-tested without one.

The only replies a session cannot decide are those to ``publish``: whether the
backplane took the message is known later, so the node answers those.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from broker import codec
from broker.channels import check_channel, check_pattern
from broker.exceptions import (
    BadFrame,
    LimitExceeded,
    NotSubscribed,
    RateLimited,
    RequestError,
    TooLarge,
)
from broker.frames import Ping, Publish, Subscribe, Unsubscribe
from broker.settings import Settings

RequestId = int | str | None

#: Close code and reason when a connection exceeds its error budget.
ABUSE_CLOSE = (1008, "too many errors")


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``frame`` to this connection; ``error`` is its code when it is an error."""

    frame: bytes
    error: str | None = None


@dataclass(frozen=True, slots=True)
class AddSubscription:
    """Start delivering ``pattern`` to this connection."""

    pattern: str


@dataclass(frozen=True, slots=True)
class RemoveSubscription:
    """Stop delivering ``pattern`` to this connection."""

    pattern: str


@dataclass(frozen=True, slots=True)
class PublishMessage:
    """Hand ``data`` (serialized JSON) for ``channel`` to the backplane, then reply."""

    channel: str
    data: bytes
    request_id: RequestId


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with a WebSocket close code and reason."""

    code: int
    reason: str


Effect = Reply | AddSubscription | RemoveSubscription | PublishMessage | Close


@dataclass(frozen=True, slots=True)
class Limits:
    """The settings a session enforces."""

    max_data_bytes: int = 64 * 1024
    max_subscriptions: int = 1000
    rate_limit: float = 0.0
    rate_burst: int = 100
    error_limit: int = 50
    error_window: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_data_bytes=settings.max_data_bytes,
            max_subscriptions=settings.max_subscriptions,
            rate_limit=settings.rate_limit,
            rate_burst=settings.rate_burst,
            error_limit=settings.error_limit,
            error_window=settings.error_window,
        )


class Session:
    """The protocol state of one connection."""

    __slots__ = ("_errors", "_last", "_tokens", "closed", "limits", "request_id", "subscriptions")

    def __init__(self, limits: Limits, now: float = 0.0) -> None:
        self.limits = limits
        #: Patterns (and channels) this connection subscribed to, as given.
        self.subscriptions: set[str] = set()
        self.closed = False
        #: The id of the frame being handled, once it has been read; lets the
        #: node answer its own failures (``internal``) with the right id.
        self.request_id: RequestId = None
        self._tokens = float(limits.rate_burst)
        self._last = now
        # Times of recent errors; a list (an empty deque costs 760 bytes), at
        # most error_limit + 1 long.
        self._errors: list[float] = []

    def receive(self, raw: bytes | str, *, text: bool, now: float) -> list[Effect]:
        """Handle one client frame received at time ``now`` (seconds, monotonic)."""
        if self.closed:
            return []
        request_id: RequestId = None
        self.request_id = None
        try:
            if self.limits.rate_limit and not self._take_token(now):
                # A refused request with an id still gets its one reply with that id.
                raise RateLimited(
                    f"over the rate limit of {self.limits.rate_limit:g} requests/s "
                    f"(burst {self.limits.rate_burst})",
                    request_id=codec.peek_id(raw) if text else None,
                )
            if not text:
                raise BadFrame("binary frames are not accepted; send JSON in text frames")
            frame = codec.decode(raw)
            request_id = self.request_id = frame.id
            if isinstance(frame, Publish):
                return [self._publish(frame)]
            if isinstance(frame, Subscribe):
                return self._subscribe(frame)
            if isinstance(frame, Unsubscribe):
                return self._unsubscribe(frame)
            assert isinstance(frame, Ping)
            return [Reply(codec.encode_pong(frame.id))] if frame.id is not None else []
        except RequestError as exc:
            if exc.request_id is None:
                exc.request_id = request_id
            return self.error(exc, now)

    def error(self, exc: RequestError, now: float) -> list[Effect]:
        """Answer a client error, and close the connection once it exceeds its budget."""
        effects: list[Effect] = [
            Reply(codec.encode_error(exc.request_id, exc.code, exc.message), exc.code)
        ]
        errors = self._errors
        errors.append(now)
        horizon = now - self.limits.error_window
        if errors[0] < horizon:
            del errors[: bisect.bisect_left(errors, horizon)]
        if len(errors) > self.limits.error_limit:
            self.closed = True
            effects.append(Close(*ABUSE_CLOSE))
        return effects

    def _publish(self, frame: Publish) -> PublishMessage:
        data = prepare_publish(frame.channel, frame.data, self.limits.max_data_bytes)
        return PublishMessage(frame.channel, data, frame.id)

    def _subscribe(self, frame: Subscribe) -> list[Effect]:
        pattern = check_pattern(frame.channel)
        effects: list[Effect] = []
        if pattern not in self.subscriptions:
            if len(self.subscriptions) >= self.limits.max_subscriptions:
                raise LimitExceeded(
                    f"connection already has {len(self.subscriptions)} subscriptions, "
                    f"the limit is {self.limits.max_subscriptions}"
                )
            self.subscriptions.add(pattern)
            effects.append(AddSubscription(pattern))
        if frame.id is not None:
            effects.append(Reply(codec.encode_ok(frame.id)))
        return effects

    def _unsubscribe(self, frame: Unsubscribe) -> list[Effect]:
        pattern = check_pattern(frame.channel)
        if pattern not in self.subscriptions:
            raise NotSubscribed(f"not subscribed to {pattern!r}")
        self.subscriptions.discard(pattern)
        effects: list[Effect] = [RemoveSubscription(pattern)]
        if frame.id is not None:
            effects.append(Reply(codec.encode_ok(frame.id)))
        return effects

    def _take_token(self, now: float) -> bool:
        limits = self.limits
        self._tokens = min(
            float(limits.rate_burst), self._tokens + (now - self._last) * limits.rate_limit
        )
        self._last = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


def prepare_publish(channel: str, data: object, max_data_bytes: int) -> bytes:
    """Check a publish's channel and size and serialize its data, once.

    Shared by the WebSocket session and the HTTP API so both refuse the same
    things with the same words. Raises ``BadChannel``, ``BadRequest``, ``TooLarge``.
    """
    check_channel(channel)
    encoded = codec.encode_data(data)
    if len(encoded) > max_data_bytes:
        raise TooLarge(
            f"data is {len(encoded)} bytes serialized, over the {max_data_bytes}-byte cap"
        )
    return encoded
