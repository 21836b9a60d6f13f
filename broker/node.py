"""The node: carries out what sessions decide, and owns the hub and the backplane.

A node is one broker process's orchestrator. Transports (the WebSocket server,
the HTTP API) hand it frames and publishes; it asks the session what to do,
awaits what must be awaited (a subscription reaching the backplane, a history
read) and never awaits what must not be (a publish is handed over in order and
its reply sent when the backplane answers, so one publisher's frames are not
serialized behind round trips).

Replays. A subscribe to a channel with history joins the history and the live
stream with no hole and no duplicate: a ``hub.Tap`` takes the channel's place
in the index first (so the backplane carries it, and every live message from
then on is recorded with its position), then the history is read, then, with
no await in between, the ``ok``, the replayed messages, the recorded live
messages newer than the read, and the hand-over from the tap to the peer.
The read and the live stream travel on different connections, so the read
may already hold messages this process has not delivered yet; until it has,
the tap stays in the peer's place, dropping those (the replay gave them) and
forwarding the rest, and hands over at the first message past the read.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

from broker import codec
from broker.access import Handshake, TokenVerifier
from broker.backplane import Backplane, Published
from broker.canary import Canary
from broker.codes import CloseCode, ErrorCode
from broker.delivery import Delivery
from broker.exceptions import BackplaneError, LimitExceeded, Unavailable
from broker.history import NO_HISTORY, HistoryPolicy, HistoryRead, recover
from broker.hub import Hub, Peer, Recipient, Tap
from broker.metrics import Metrics
from broker.position import Position
from broker.publishing import validate_publish
from broker.rules import Rules
from broker.session import (
    AddSubscription,
    Authenticate,
    Close,
    Effect,
    Limits,
    PublishMessage,
    RemoveSubscription,
    Reply,
    Session,
)
from broker.settings import Settings

__all__ = ["Node"]

log = logging.getLogger(__name__)


class Node:
    """One broker process: hub, backplane, metrics and the connected peers.

    ``verifier`` checks tokens (None: authentication off). Channel rules come
    from the settings; with auth off and no rules, no policy is consulted at
    all (protocol version 1). ``canary``: whether to prove delivery for
    ``ready`` with a readiness canary (tests of other things may turn it off).
    """

    def __init__(
        self,
        settings: Settings,
        backplane: Backplane,
        *,
        metrics: Metrics | None = None,
        verifier: TokenVerifier | None = None,
        clock: Callable[[], float] = time.monotonic,
        canary: bool = True,
        max_connections: int | None = None,
    ) -> None:
        self.settings = settings
        self.backplane = backplane
        self.metrics = metrics or Metrics()
        self.hub = Hub(backplane, self.metrics)
        self.limits = Limits.from_settings(settings)
        self.rules: Rules | None = None
        if settings.channels or verifier is not None:
            self.rules = Rules(settings.channels, auth=verifier is not None)
        self.delivery = Delivery(self.hub, backplane, self.history_of, self.metrics)
        self.peers: set[Peer] = set()
        #: Subscriptions whose tap still forwards (see the module docstring).
        self._joining: dict[tuple[Peer, str], Tap] = {}
        self._summarised: tuple[float, tuple[int, ...]] = (clock(), self._summary_counts())
        self.verifier = verifier
        self.node_id = secrets.token_hex(5)
        self.canary: Canary | None = None
        if canary:
            self.canary = Canary(
                backplane,
                self.delivery,
                self.metrics,
                self.node_id,
                interval=settings.canary_interval,
                budget=settings.canary_budget,
            )
        self.draining = False
        #: Connections this process takes: ``max_connections``, else what the
        #: caller derived from the open-files limit (``limits``), else 10,000.
        self.max_connections = settings.max_connections or max_connections or 10_000
        self._clock = clock
        self._timers: dict[Peer, asyncio.TimerHandle] = {}
        # One context for every peer's timer, instead of a copy of the current
        # one each (the timers read no context variable).
        self._timer_context = contextvars.Context()
        self._frame_read = 0.0
        self._per_ip: Counter[str] = Counter()
        self._per_user: Counter[str] = Counter()
        self._address: dict[Peer, str] = {}

    def history_of(self, channel: str) -> HistoryPolicy | None:
        """The history policy of ``channel`` (None: it keeps none)."""
        return None if self.rules is None else self.rules.history(channel)

    @property
    def ready(self) -> bool:
        """Whether this node can deliver messages now (``/readyz``)."""
        if self.draining or not self.backplane.ready:
            return False
        return self.canary is None or self.canary.ready

    async def start(self) -> None:
        """Connect the backplane; messages start flowing into the hub."""
        await self.backplane.start(self.delivery)
        if self.canary is not None:
            await self.canary.start()

    async def close(self) -> None:
        """Release the backplane. Call after every peer has been detached."""
        if self.canary is not None:
            await self.canary.close()
        await self.delivery.close()
        await self.backplane.close()

    def summary(self) -> str:
        """One line on this process's state, with rates since the previous line.

        For the periodic summary log: an operator reads a reconnect storm or a
        flood of errors in it without the per-connection lines.
        """
        m = self.metrics
        now, counts = self._clock(), self._summary_counts()
        then, before = self._summarised
        self._summarised = (now, counts)
        span = max(now - then, 1e-6)
        opened, closed, published, delivered, errors = (
            (c - b) / span for c, b in zip(counts, before, strict=True)
        )
        connections = len(self.peers)
        return (
            f"{connections} connection{'' if connections == 1 else 's'}, "
            f"{self.hub.subscription_count} subscriptions; per second: {opened:.1f} opened, "
            f"{closed:.1f} closed, {published:.1f} published, {delivered:.1f} delivered, "
            f"{errors:.1f} error frames; so far: {m.connections_opened} opened, "
            f"{m.messages_published} published, {m.messages_delivered} delivered, "
            f"{sum(m.errors.values())} error frames, {m.gaps_sent} gaps; ready {self.ready}"
        )

    def _summary_counts(self) -> tuple[int, ...]:
        m = self.metrics
        return (
            m.connections_opened,
            m.connections_closed,
            m.messages_published,
            m.messages_delivered,
            sum(m.errors.values()),
        )

    # -- connections ----------------------------------------------------------------

    def admit(self, handshake: Handshake | None = None) -> None:
        """Check that one more connection is allowed; raises ``LimitExceeded``."""
        settings = self.settings
        if len(self.peers) >= self.max_connections:
            self.metrics.connections_rejected += 1
            raise LimitExceeded(
                f"server has reached its limit of {self.max_connections} connections"
            )
        per_ip = settings.max_connections_per_ip
        if per_ip and handshake is not None and self._per_ip[handshake.address] >= per_ip:
            self.metrics.connections_rejected += 1
            raise LimitExceeded(f"{per_ip} connections from {handshake.address} already open")

    def new_session(self, handshake: Handshake | None = None, verified: Any = None) -> Session:
        """Return the session for a connection that opened with ``handshake``.

        ``verified`` is the token its ``Authorization`` header carried, if any.
        """
        return Session(
            self.limits,
            now=self._clock(),
            verifier=self.verifier,
            policy=self.rules,
            verified=verified,
        )

    def attach(self, peer: Peer, handshake: Handshake | None = None) -> None:
        """Register a connected peer (its session made by ``new_session``)."""
        self.peers.add(peer)
        self.metrics.connections_opened += 1
        if handshake is not None and self.settings.max_connections_per_ip:
            # Only counted when limited: the entry costs about 100 bytes a connection.
            self._address[peer] = handshake.address
            self._per_ip[handshake.address] += 1
        sub = peer.session.principal.sub
        if sub is not None:
            self._per_user[sub] += 1
        self._arm(peer)

    def user_full(self, sub: str) -> bool:
        """Whether ``sub`` already holds its share of connections here."""
        limit = self.settings.max_connections_per_user
        return bool(limit) and self._per_user[sub] >= limit

    async def detach(self, peer: Peer) -> None:
        """Forget a peer and drop its subscriptions (locally at once, then on the backplane)."""
        if peer not in self.peers:
            return
        self.peers.discard(peer)
        self.metrics.connections_closed += 1
        timer = self._timers.pop(peer, None)
        if timer is not None:
            timer.cancel()
        address = self._address.pop(peer, None)
        if address is not None:
            _decrement(self._per_ip, address)
        sub = peer.session.principal.sub
        if sub is not None:
            _decrement(self._per_user, sub)
        patterns = list(peer.session.subscriptions)
        peer.session.subscriptions.clear()
        recipients = [(pattern, self._recipient(peer, pattern)) for pattern in patterns]
        for pattern, recipient in recipients:
            self.hub.drop(recipient, (pattern,))
        for pattern, recipient in recipients:
            await self.hub.unsubscribe(pattern, recipient)

    # -- frames ---------------------------------------------------------------------

    async def receive(self, peer: Peer, raw: bytes, *, text: bool) -> None:
        """Handle one frame from ``peer``. Never raises for the client's sake."""
        self._frame_read = time.perf_counter()
        metrics = self.metrics
        metrics.frames_received += 1
        metrics.bytes_received += len(raw)
        session = peer.session
        deadline = session.deadline
        try:
            effects = session.receive(raw, text=text, now=self._clock())
            await self.execute(peer, effects)
        except Exception:
            # Our bug, not the client's: keep the connection, hide the details.
            log.exception("internal error while handling a frame")
            self.metrics.errors[ErrorCode.INTERNAL] += 1
            request_id = codec.peek_id(raw) if text else None
            peer.send(
                codec.encode_error(
                    request_id, ErrorCode.INTERNAL, "internal error; it has been logged"
                )
            )
        # The timer follows the deadline; most frames leave it where it was, and
        # re-checking the timer cost 0.8 µs per frame (detach cancels it itself).
        if session.deadline != deadline:
            self._arm(peer)

    async def execute(self, peer: Peer, effects: list[Effect]) -> None:
        """Carry out a session's effects, in order."""
        for effect in effects:
            if isinstance(effect, PublishMessage):
                self._publish_from(peer, effect)
            elif isinstance(effect, Reply):
                self._reply(peer, effect)
            elif isinstance(effect, AddSubscription):
                await self._subscribe(peer, effect)
            elif isinstance(effect, RemoveSubscription):
                await self.hub.unsubscribe(effect.pattern, self._recipient(peer, effect.pattern))
            elif isinstance(effect, Authenticate):
                await self._authenticate(peer, effect)
            elif isinstance(effect, Close):
                self._close(peer, effect)

    def _reply(self, peer: Peer, effect: Reply) -> None:
        if effect.error is not None:
            self.metrics.errors[effect.error] += 1
            if effect.error == ErrorCode.UNAUTHORIZED:
                self.metrics.auth_failures += 1
        peer.send(effect.frame)

    def _close(self, peer: Peer, effect: Close) -> None:
        if effect.code == CloseCode.POLICY:
            self.metrics.abuse_disconnects += 1
        peer.close(effect.code, effect.reason)

    # -- authentication ---------------------------------------------------------------

    async def _authenticate(self, peer: Peer, effect: Authenticate) -> None:
        session = peer.session
        sub = effect.verified.principal.sub
        first = session.principal.sub is None
        if first and sub is not None and self.user_full(sub):
            limit = self.settings.max_connections_per_user
            self._reply(
                peer,
                Reply(
                    codec.encode_error(
                        effect.request_id,
                        ErrorCode.LIMIT_EXCEEDED,
                        f"{limit} connections of {sub!r} already open",
                    ),
                    ErrorCode.LIMIT_EXCEEDED,
                ),
            )
            session.closed = True
            peer.close(CloseCode.TRY_AGAIN, "too many connections for this user")
            return
        if first and sub is not None:
            self._per_user[sub] += 1
        now = self._clock()
        await self.execute(peer, session.authenticated(effect.verified, effect.request_id, now))

    def _arm(self, peer: Peer) -> None:
        """Keep one timer per peer at its session's next deadline."""
        deadline = peer.session.deadline
        timer = self._timers.get(peer)
        if deadline is None or peer not in self.peers:
            if timer is not None:
                timer.cancel()
                del self._timers[peer]
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, deadline - self._clock())
        if timer is not None:
            if abs(timer.when() - when) < 0.001:
                return
            timer.cancel()
        self._timers[peer] = loop.call_at(when, self._expire, peer, context=self._timer_context)

    def _expire(self, peer: Peer) -> None:
        self._timers.pop(peer, None)
        for effect in peer.session.tick(self._clock()):
            if isinstance(effect, Reply):
                self._reply(peer, effect)
            elif isinstance(effect, Close):
                self._close(peer, effect)
        self._arm(peer)

    # -- subscriptions ---------------------------------------------------------------

    async def _subscribe(self, peer: Peer, effect: AddSubscription) -> None:
        channel = effect.pattern
        if effect.history is None:
            if not effect.already:
                await self.hub.subscribe(channel, peer)
            if effect.request_id is not None:
                extra = {"recovered": False, "reason": NO_HISTORY} if effect.since else None
                peer.send(codec.encode_ok(effect.request_id, extra))
            return
        if effect.already:
            try:
                read = await self.backplane.read(channel, effect.history)
            except BackplaneError as exc:
                self._unavailable(peer, effect, exc)
                return
            if effect.request_id is not None:
                peer.send(codec.encode_ok(effect.request_id, _position(read)))
            return
        await self._subscribe_with_history(peer, effect)

    async def _subscribe_with_history(self, peer: Peer, effect: AddSubscription) -> None:
        channel = effect.pattern
        assert effect.history is not None
        tap = Tap(self.hub)
        await self.hub.subscribe(channel, tap)
        try:
            if effect.since is not None:
                read = await self.backplane.read(channel, effect.history, after=effect.since.offset)
            elif effect.last is not None:
                read = await self.backplane.read(channel, effect.history, last=effect.last)
            else:
                read = await self.backplane.read(channel, effect.history)
        except BackplaneError as exc:
            if effect.since is None and effect.last is None:
                # A plain subscribe needs no history now: it is recorded like any
                # other while the backplane is down (and gets its gap once back),
                # answered without a position.
                if effect.request_id is not None:
                    peer.send(codec.encode_ok(effect.request_id))
                if not self._hand_over(peer, channel, tap, []):
                    await self.hub.unsubscribe(channel, tap)
                return
            peer.session.subscriptions.discard(channel)
            await self.hub.unsubscribe(channel, tap)
            self._unavailable(peer, effect, exc)
            return
        except BaseException:
            peer.session.subscriptions.discard(channel)
            await self.hub.unsubscribe(channel, tap)
            raise
        # From here to the hand-over, nothing awaits: no message can come between.
        extra = _position(read)
        replay: tuple[tuple[int, bytes], ...] = ()
        if effect.since is not None:
            recovery = recover(read, effect.since)
            extra["recovered"] = recovery.recovered
            if recovery.reason is not None:
                extra["reason"] = recovery.reason
            replay = recovery.replay
            self.metrics.recoveries[recovery.reason or "recovered"] += 1
        elif effect.last is not None:
            replay = read.entries[-effect.last :]
        if effect.request_id is not None:
            peer.send(codec.encode_ok(effect.request_id, extra))
        for offset, data in replay:
            peer.send(codec.encode_message(channel, data, Position(offset, read.epoch)))
        newer = tap.newer_than(read.position)
        self.delivery.seed(channel, read.position)
        if not self._hand_over(peer, channel, tap, newer, read.position):
            await self.hub.unsubscribe(channel, tap)

    def _hand_over(
        self, peer: Peer, channel: str, tap: Tap, newer: list[bytes], read: Position | None = None
    ) -> bool:
        """Deliver what the tap recorded after the read, then put ``peer`` in its place.

        Synchronous, so no message comes between. When this process has not
        yet delivered everything up to ``read``, the tap forwards until it has
        (see the module docstring). False when the peer has unsubscribed or
        gone meanwhile: the caller then releases the tap.
        """
        for payload in newer:
            peer.deliver(payload)
        if channel not in peer.session.subscriptions or peer not in self.peers:
            return False
        if read is None or self._past(channel, tap, read):
            self.hub.swap(channel, tap, peer)
        else:
            self._joining[peer, channel] = tap
            tap.forward(peer, read, partial(self._joined, peer, channel))
        return True

    def _past(self, channel: str, tap: Tap, read: Position) -> bool:
        """Whether this process has delivered every message up to ``read`` on ``channel``."""
        return (
            read.offset == 0 or self.delivery.delivered_through(channel, read) or tap.reached(read)
        )

    def _joined(self, peer: Peer, channel: str, tap: Tap) -> None:
        """A forwarding tap saw the live stream pass its read: the peer takes its place."""
        if self._joining.get((peer, channel)) is tap:
            del self._joining[peer, channel]
            self.hub.swap(channel, tap, peer)

    def _recipient(self, peer: Peer, channel: str) -> Recipient:
        """Who holds ``peer``'s subscription to ``channel`` in the index: it, or its tap."""
        tap = self._joining.pop((peer, channel), None)
        return peer if tap is None else tap

    def _unavailable(self, peer: Peer, effect: AddSubscription, exc: Exception) -> None:
        message = f"cannot read the history of {effect.pattern!r} now: {exc}"
        self._reply(
            peer,
            Reply(
                codec.encode_error(effect.request_id, ErrorCode.UNAVAILABLE, message),
                ErrorCode.UNAVAILABLE,
            ),
        )

    # -- publishing -------------------------------------------------------------------

    async def publish(self, channel: str, data: object, key: str | None = None) -> Published:
        """Publish from a service (HTTP API); returns once the backplane took it.

        Raises ``BadChannel``, ``BadRequest``, ``TooLarge`` or ``Unavailable``.
        """
        encoded = validate_publish(channel, data, self.settings.max_data_bytes)
        try:
            published = await self.backplane.publish(
                channel, encoded, history=self.history_of(channel), key=key
            )
        except BackplaneError as exc:
            self.metrics.publish_failures += 1
            raise Unavailable(_not_delivered(exc)) from exc
        self._count(published)
        return published

    def _publish_from(self, peer: Peer, effect: PublishMessage) -> None:
        handed = time.perf_counter()
        future = self.backplane.publish(
            effect.channel, effect.data, history=effect.history, key=effect.key
        )
        # Synchronous since receive() read the frame: that read is when it arrived.
        times = (self._frame_read, handed)
        if future.done():
            self._published(peer, effect.request_id, times, future)
        else:
            future.add_done_callback(partial(self._published, peer, effect.request_id, times))

    def _published(
        self,
        peer: Peer,
        request_id: int | str | None,
        times: tuple[float, float],
        future: asyncio.Future[Published],
    ) -> None:
        exc = future.exception() if not future.cancelled() else BackplaneError("cancelled")
        if exc is None:
            published = future.result()
            self._count(published)
            now = time.perf_counter()
            self.metrics.backplane_publish.observe(now - times[1])
            self.metrics.publish_ack.observe(now - times[0])
            if request_id is not None:
                peer.send(codec.encode_ok(request_id, published_fields(published)))
            return
        self.metrics.publish_failures += 1
        if isinstance(exc, BackplaneError):
            code, message = ErrorCode.UNAVAILABLE, _not_delivered(exc)
        else:
            # A bug in the backplane, not an outage: say so, log the traceback.
            log.error("backplane publish failed unexpectedly", exc_info=exc)
            code = ErrorCode.INTERNAL
            message = "message not delivered: internal error; it has been logged"
        self.metrics.errors[code] += 1
        peer.send(codec.encode_error(request_id, code, message))

    def _count(self, published: Published) -> None:
        if published.duplicate:
            self.metrics.publish_duplicates += 1
        else:
            self.metrics.messages_published += 1


def published_fields(published: Published) -> dict[str, Any] | None:
    """The fields a publish's acknowledgement adds: position, and whether a duplicate."""
    if published.position is None and not published.duplicate:
        return None
    fields: dict[str, Any] = {}
    if published.duplicate:
        fields["duplicate"] = True
    if published.position is not None:
        fields["offset"] = published.position.offset
        fields["epoch"] = published.position.epoch
    return fields


def _not_delivered(exc: BackplaneError) -> str:
    """What an ``unavailable`` publish says: not delivered, or not confirmed."""
    return str(exc) if exc.maybe_sent else f"message not delivered: {exc}"


def _position(read: HistoryRead) -> dict[str, Any]:
    return {"offset": read.top, "epoch": read.epoch}


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
