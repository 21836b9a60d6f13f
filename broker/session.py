"""Per-connection protocol state: a frame in, a list of effects out.

Theory of operation. The WebSocket adapter hands every client frame to
``Session.receive`` together with the current time. The session decodes and
validates it, applies the per-connection rules (authentication, permissions,
subscription count, data size, request rate, error budget) and answers with
*effects*: what the node must do, in order. The session never awaits and
never touches a socket, so all of the protocol's decisions are unit-tested
without one.

Replies a session cannot decide alone are the node's: a ``publish``'s (whether
the backplane took it is known later), a ``subscribe``'s (it is sent once the
subscription is active, with the channel's position where it keeps history),
and an ``auth``'s (the node first checks the per-user connection limit, then
calls ``authenticated``).

Authentication. With no token verifier (auth off) a session is ``OPEN``: it
acts as the anonymous principal and its ``ChannelPolicy`` (if any) decides.
With auth on, it starts ``WAITING`` (every op but ``auth`` and ``ping`` is
``unauthorized``; no valid token within ``auth_timeout`` closes with 1008), or
``ANONYMOUS`` when anonymous connections are allowed (no deadline). A valid
token makes it ``AUTHENTICATED`` until the token's expiry; then one
``token_expired`` error, ``EXPIRED`` for ``refresh_grace`` seconds (every op
but ``auth`` and ``ping`` is ``token_expired``), then 1008 "token expired".
A later ``auth`` with the same subject replaces the token and ends, with an
``unsubscribed`` frame each, the subscriptions the new one no longer allows.
Time-outs are not timers here: ``deadline`` says when ``tick`` must be called.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass

from broker import codec
from broker.access import (
    ANONYMOUS,
    MAX_TOKEN_LENGTH,
    ChannelPolicy,
    Principal,
    TokenVerifier,
    Verified,
)
from broker.channels import check_pattern, is_pattern
from broker.codes import CloseCode, ErrorCode
from broker.exceptions import (
    BadFrame,
    BadRequest,
    Forbidden,
    LimitExceeded,
    NotSubscribed,
    RateLimited,
    RequestError,
    TokenExpired,
    Unauthorized,
)
from broker.frames import Auth, Ping, Publish, RequestId, Since, Subscribe, Unsubscribe
from broker.history import HistoryPolicy
from broker.position import Position
from broker.publishing import validate_publish
from broker.settings import Settings

__all__ = [
    "ABUSE_CLOSE",
    "AddSubscription",
    "AuthState",
    "Authenticate",
    "Close",
    "Effect",
    "Limits",
    "PublishMessage",
    "RemoveSubscription",
    "Reply",
    "Session",
]

#: Close code and reason when a connection exceeds its error budget.
ABUSE_CLOSE = (CloseCode.POLICY, "too many errors")


class AuthState(enum.Enum):
    """Where a connection is with authentication (see the module docstring)."""

    OPEN = "open"
    WAITING = "waiting"
    ANONYMOUS = "anonymous"
    AUTHENTICATED = "authenticated"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``frame`` to this connection; ``error`` is its code when it is an error."""

    frame: bytes
    error: str | None = None


@dataclass(frozen=True, slots=True)
class AddSubscription:
    """Start delivering ``pattern`` to this connection, then answer the subscribe.

    ``history`` is the channel's history policy (an exact channel that keeps
    history), ``since`` or ``last`` a replay the client asked for. ``already``:
    the connection had this subscription; only the reply is owed.
    """

    pattern: str
    request_id: RequestId | None = None
    history: HistoryPolicy | None = None
    since: Position | None = None
    last: int | None = None
    already: bool = False


@dataclass(frozen=True, slots=True)
class RemoveSubscription:
    """Stop delivering ``pattern`` to this connection."""

    pattern: str


@dataclass(frozen=True, slots=True)
class PublishMessage:
    """Hand ``data`` (serialized JSON) for ``channel`` to the backplane, then reply."""

    channel: str
    data: bytes
    request_id: RequestId | None
    history: HistoryPolicy | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Authenticate:
    """A token checked out; the node admits the subject, then calls ``authenticated``."""

    verified: Verified
    request_id: RequestId | None


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with a WebSocket close code and reason."""

    code: int
    reason: str


Effect = Reply | AddSubscription | RemoveSubscription | PublishMessage | Authenticate | Close


@dataclass(frozen=True, slots=True)
class Limits:
    """The settings a session enforces, shared by every session of a node."""

    max_data_bytes: int = 64 * 1024
    max_subscriptions: int = 1000
    rate_limit: float = 0.0
    rate_burst: int = 100
    error_limit: int = 50
    error_window: float = 10.0
    auth_timeout: float = 5.0
    refresh_grace: float = 10.0
    anonymous: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_data_bytes=settings.max_data_bytes,
            max_subscriptions=settings.max_subscriptions,
            rate_limit=settings.rate_limit,
            rate_burst=settings.rate_burst,
            error_limit=settings.error_limit,
            error_window=settings.error_window,
            auth_timeout=settings.auth_timeout,
            refresh_grace=settings.refresh_grace,
            anonymous=settings.anonymous,
        )


class Session:
    """The protocol state of one connection.

    ``verifier`` checks tokens (None: authentication is off); ``policy``
    decides permissions and knows which channels keep history (None: all is
    allowed and nothing kept). ``verified`` is a token that came with the
    opening handshake.
    """

    __slots__ = (
        "_deadline", "_errors", "_last", "_policy", "_tokens", "_verifier", "closed",
        "limits", "principal", "state", "subscriptions",
    )  # fmt: skip

    def __init__(
        self,
        limits: Limits,
        now: float = 0.0,
        *,
        verifier: TokenVerifier | None = None,
        policy: ChannelPolicy | None = None,
        verified: Verified | None = None,
    ) -> None:
        self.limits = limits
        #: Who this connection acts as.
        self.principal: Principal = ANONYMOUS
        self._verifier = verifier
        self._policy = policy
        #: Patterns (and channels) this connection subscribed to, as given.
        self.subscriptions: set[str] = set()
        self.closed = False
        self._tokens = float(limits.rate_burst)
        self._last = now
        # Times of recent errors, at most error_limit + 1; a list (an empty
        # deque costs 760 bytes), made on the first error (most connections make none).
        self._errors: list[float] | None = None
        self._deadline: float | None = None
        if verifier is None:
            self.state = AuthState.OPEN
        elif verified is not None:
            self._accept(verified, now)
        elif limits.anonymous:
            self.state = AuthState.ANONYMOUS
        else:
            self.state = AuthState.WAITING
            self._deadline = now + limits.auth_timeout

    @property
    def deadline(self) -> float | None:
        """When ``tick`` must be called next (monotonic seconds), or None."""
        return self._deadline

    def receive(self, raw: bytes | str, *, text: bool, now: float) -> list[Effect]:
        """Handle one client frame received at time ``now`` (seconds, monotonic)."""
        if self.closed:
            return []
        request_id: RequestId | None = None
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
            request_id = frame.id
            if isinstance(frame, Publish):
                self._check_state()
                return [self._publish(frame)]
            if isinstance(frame, Subscribe):
                self._check_state()
                return self._subscribe(frame)
            if isinstance(frame, Unsubscribe):
                self._check_state()
                return self._unsubscribe(frame)
            if isinstance(frame, Auth):
                return [self._auth(frame)]
            assert isinstance(frame, Ping)
            return [Reply(codec.encode_pong(frame.id))] if frame.id is not None else []
        except RequestError as exc:
            if exc.request_id is None:
                exc.request_id = request_id
            return self.error(exc, now)

    def authenticated(
        self, verified: Verified, request_id: RequestId | None, now: float
    ) -> list[Effect]:
        """Take a verified token the node admitted: the new principal applies from now on.

        Subscriptions it no longer allows end, each with an ``unsubscribed``
        frame, before the ``ok``.
        """
        self._accept(verified, now)
        effects: list[Effect] = []
        policy = self._policy
        if policy is not None:
            for pattern in sorted(self.subscriptions):
                if not policy.may_subscribe(self.principal, pattern):
                    self.subscriptions.discard(pattern)
                    effects.append(RemoveSubscription(pattern))
                    effects.append(Reply(codec.encode_unsubscribed(pattern, ErrorCode.FORBIDDEN)))
        if request_id is not None:
            extra = {"sub": self.principal.sub, "expires_in": max(0, int(verified.expires_in))}
            effects.append(Reply(codec.encode_ok(request_id, extra)))
        return effects

    def tick(self, now: float) -> list[Effect]:
        """Act on a deadline that has passed (auth time-out, token expiry, grace)."""
        deadline = self._deadline
        if self.closed or deadline is None or now < deadline:
            return []
        if self.state is AuthState.AUTHENTICATED:
            self.state = AuthState.EXPIRED
            self._deadline = now + self.limits.refresh_grace
            message = (
                f"the token has expired; send a fresh one with auth within "
                f"{self.limits.refresh_grace:g} s"
            )
            return [
                Reply(
                    codec.encode_error(None, ErrorCode.TOKEN_EXPIRED, message),
                    ErrorCode.TOKEN_EXPIRED,
                )
            ]
        self.closed = True
        self._deadline = None
        if self.state is AuthState.EXPIRED:
            return [Close(CloseCode.POLICY, "token expired")]
        return [
            Close(
                CloseCode.POLICY,
                f"no authentication within {self.limits.auth_timeout:g} s",
            )
        ]

    def error(self, exc: RequestError, now: float) -> list[Effect]:
        """Answer a client error, and close the connection once it exceeds its budget."""
        effects: list[Effect] = [
            Reply(codec.encode_error(exc.request_id, exc.code, exc.message), exc.code)
        ]
        errors = self._errors
        if errors is None:
            errors = self._errors = []
        errors.append(now)
        horizon = now - self.limits.error_window
        if errors[0] < horizon:
            del errors[: bisect.bisect_left(errors, horizon)]
        if len(errors) > self.limits.error_limit:
            self.closed = True
            effects.append(Close(*ABUSE_CLOSE))
        return effects

    # -- the ops ------------------------------------------------------------------

    def _check_state(self) -> None:
        if self.state is AuthState.WAITING:
            raise Unauthorized('authenticate first: send {"op": "auth", "token": ...}')
        if self.state is AuthState.EXPIRED:
            raise TokenExpired("the token has expired; send a fresh one with auth")

    def _denied(self, what: str) -> RequestError:
        # An anonymous connection could do better with a token; one with a token
        # is simply not allowed. With auth off there is no token to get.
        if self.principal.sub is None and self._verifier is not None:
            return Unauthorized(f"{what} needs a token that allows it")
        return Forbidden(f"not allowed to {what}")

    def _publish(self, frame: Publish) -> PublishMessage:
        data = validate_publish(frame.channel, frame.data, self.limits.max_data_bytes)
        policy = self._policy
        if policy is None:
            return PublishMessage(frame.channel, data, frame.id, None, frame.key)
        if not policy.may_publish(self.principal, frame.channel):
            raise self._denied(f"publish to {frame.channel!r}")
        return PublishMessage(
            frame.channel, data, frame.id, policy.history(frame.channel), frame.key
        )

    def _subscribe(self, frame: Subscribe) -> list[Effect]:
        pattern = check_pattern(frame.channel)
        since, last = frame.since, frame.history
        replay = since is not None or last is not None
        if replay:
            if is_pattern(pattern):
                raise BadRequest(
                    "since and history need an exact channel, not the pattern " + repr(pattern)
                )
            if since is not None and last is not None:
                raise BadRequest("give either since or history, not both")
            if pattern in self.subscriptions:
                raise BadRequest(
                    f"already subscribed to {pattern!r}; unsubscribe before replaying it"
                )
        policy = self._policy
        history = None
        if policy is not None and not is_pattern(pattern):
            history = policy.history(pattern)
        if last is not None:
            if history is None:
                raise BadRequest(f"{pattern!r} keeps no history; history needs a channel that does")
            if last > history.size:
                raise BadRequest(f"history is at most {history.size} on {pattern!r}, not {last}")
        if pattern in self.subscriptions:
            # Already there: only the reply is owed, if one was asked for.
            if frame.id is None:
                return []
            return [AddSubscription(pattern, frame.id, history, already=True)]
        if policy is not None and not policy.may_subscribe(self.principal, pattern):
            raise self._denied(f"subscribe to {pattern!r}")
        if len(self.subscriptions) >= self.limits.max_subscriptions:
            raise LimitExceeded(
                f"connection already has {len(self.subscriptions)} subscriptions, "
                f"the limit is {self.limits.max_subscriptions}"
            )
        self.subscriptions.add(pattern)
        return [AddSubscription(pattern, frame.id, history, _position(since), last)]

    def _unsubscribe(self, frame: Unsubscribe) -> list[Effect]:
        pattern = check_pattern(frame.channel)
        if pattern not in self.subscriptions:
            raise NotSubscribed(f"not subscribed to {pattern!r}")
        self.subscriptions.discard(pattern)
        effects: list[Effect] = [RemoveSubscription(pattern)]
        if frame.id is not None:
            effects.append(Reply(codec.encode_ok(frame.id)))
        return effects

    def _auth(self, frame: Auth) -> Authenticate:
        verifier = self._verifier
        if verifier is None:
            raise Unauthorized("this broker does not use authentication; connect without auth")
        if len(frame.token) > MAX_TOKEN_LENGTH:
            raise Unauthorized(f"token is longer than {MAX_TOKEN_LENGTH} characters")
        verified = verifier.verify(frame.token)
        current = self.principal.sub
        if current is not None and verified.principal.sub != current:
            raise Forbidden(
                f"a refresh must carry the same subject: this connection is {current!r}"
            )
        return Authenticate(verified, frame.id)

    def _accept(self, verified: Verified, now: float) -> None:
        self.principal = verified.principal
        self.state = AuthState.AUTHENTICATED
        self._deadline = now + verified.expires_in

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


def _position(since: Since | None) -> Position | None:
    return None if since is None else Position(since.offset, since.epoch)
