"""The node: carries out what sessions decide, and owns the hub and the backplane.

A node is one broker process's orchestrator. Transports (the WebSocket server,
the HTTP API) hand it frames and publishes; it asks the session what to do,
awaits what must be awaited (a subscription reaching the backplane) and
never awaits what must not be (a publish is handed over in order and its reply
sent when the backplane answers, so one publisher's frames are not serialized
behind round trips).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Protocol

from broker import codec
from broker.backplane import Backplane
from broker.exceptions import BackplaneError, LimitExceeded, Unavailable
from broker.hub import Hub, Subscriber
from broker.metrics import Metrics
from broker.session import (
    AddSubscription,
    Close,
    Effect,
    Limits,
    PublishMessage,
    RemoveSubscription,
    Reply,
    Session,
    prepare_publish,
)
from broker.settings import Settings

log = logging.getLogger("broker.node")


class Peer(Subscriber, Protocol):
    """A client connection as the node sees it."""

    session: Session

    def send(self, payload: bytes) -> None:
        """Queue a reply frame (JSON bytes), in order with delivered messages."""

    def close(self, code: int, reason: str) -> None:
        """Start closing with ``code`` after what is queued; returns at once."""


class Node:
    """One broker process: hub, backplane, metrics and the connected peers."""

    def __init__(
        self,
        settings: Settings,
        backplane: Backplane,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.backplane = backplane
        self.metrics = metrics or Metrics()
        self.hub = Hub(backplane, self.metrics)
        self.limits = Limits.from_settings(settings)
        self.peers: set[Peer] = set()
        self._clock = clock

    @property
    def ready(self) -> bool:
        """Whether this node can deliver messages now (``/readyz``)."""
        return self.backplane.ready

    async def start(self) -> None:
        """Connect the backplane; messages start flowing into the hub."""
        await self.backplane.start(self.hub.deliver)

    async def close(self) -> None:
        """Release the backplane. Call after every peer has been detached."""
        await self.backplane.close()

    def new_session(self) -> Session:
        """Return the session for a new connection."""
        return Session(self.limits, now=self._clock())

    def admit(self) -> None:
        """Check that one more connection is allowed; raises ``LimitExceeded``."""
        if len(self.peers) >= self.settings.max_connections:
            self.metrics.connections_rejected += 1
            raise LimitExceeded(
                f"server has reached its limit of {self.settings.max_connections} connections"
            )

    def attach(self, peer: Peer) -> None:
        """Register a connected peer."""
        self.peers.add(peer)
        self.metrics.connections_opened += 1

    async def detach(self, peer: Peer) -> None:
        """Forget a peer and drop its subscriptions (locally at once, then on the backplane)."""
        if peer not in self.peers:
            return
        self.peers.discard(peer)
        self.metrics.connections_closed += 1
        patterns = list(peer.session.subscriptions)
        peer.session.subscriptions.clear()
        for pattern in patterns:
            self.hub.index.remove(pattern, peer)
        for pattern in patterns:
            await self.hub.unsubscribe(pattern, peer)

    async def receive(self, peer: Peer, raw: bytes, *, text: bool) -> None:
        """Handle one frame from ``peer``. Never raises for the client's sake."""
        self.metrics.frames_received += 1
        try:
            effects = peer.session.receive(raw, text=text, now=self._clock())
            await self.execute(peer, effects)
        except Exception:
            # Our bug, not the client's: keep the connection, hide the details.
            log.exception("internal error while handling a frame")
            self.metrics.errors["internal"] += 1
            peer.send(
                codec.encode_error(
                    peer.session.request_id, "internal", "internal error; it has been logged"
                )
            )

    async def execute(self, peer: Peer, effects: list[Effect]) -> None:
        """Carry out a session's effects, in order."""
        for effect in effects:
            if isinstance(effect, PublishMessage):
                self._publish_from(peer, effect)
            elif isinstance(effect, Reply):
                if effect.error is not None:
                    self.metrics.errors[effect.error] += 1
                peer.send(effect.frame)
            elif isinstance(effect, AddSubscription):
                await self.hub.subscribe(effect.pattern, peer)
            elif isinstance(effect, RemoveSubscription):
                await self.hub.unsubscribe(effect.pattern, peer)
            elif isinstance(effect, Close):
                if effect.code == 1008:
                    self.metrics.abuse_disconnects += 1
                peer.close(effect.code, effect.reason)

    async def publish(self, channel: str, data: object) -> None:
        """Publish from a service (HTTP API); returns once the backplane took it.

        Raises ``BadChannel``, ``BadRequest``, ``TooLarge`` or ``Unavailable``.
        """
        encoded = prepare_publish(channel, data, self.settings.max_data_bytes)
        try:
            await self.backplane.publish(channel, encoded)
        except BackplaneError as exc:
            self.metrics.publish_failures += 1
            raise Unavailable(f"message not delivered: {exc}") from exc
        self.metrics.messages_published += 1

    def _publish_from(self, peer: Peer, effect: PublishMessage) -> None:
        future = self.backplane.publish(effect.channel, effect.data)
        if future.done():
            self._published(peer, effect.request_id, future)
        else:
            future.add_done_callback(partial(self._published, peer, effect.request_id))

    def _published(
        self, peer: Peer, request_id: int | str | None, future: asyncio.Future[None]
    ) -> None:
        exc = future.exception() if not future.cancelled() else BackplaneError("cancelled")
        if exc is None:
            self.metrics.messages_published += 1
            if request_id is not None:
                peer.send(codec.encode_ok(request_id))
            return
        self.metrics.publish_failures += 1
        if isinstance(exc, BackplaneError):
            code, message = "unavailable", f"message not delivered: {exc}"
        else:
            # A bug in the backplane, not an outage: say so, log the traceback.
            log.error("backplane publish failed unexpectedly", exc_info=exc)
            code, message = "internal", "message not delivered: internal error; it has been logged"
        self.metrics.errors[code] += 1
        peer.send(codec.encode_error(request_id, code, message))
