"""What the client does on each new connection: authenticate, restore, keep the token fresh.

Theory of operation
-------------------

Once a WebSocket is open (and while the connection task reads it), the
link runs, in order:

1. :func:`authenticate`: with a token configured, one ``auth`` frame; the
   connection is usable only after its ``ok``. Its ``expires_in`` starts
   the refresh timer.
2. :func:`restore`: re-subscribe every pattern some subscription still holds,
   exact channels first. An exact channel whose last position the table
   knows is re-subscribed with ``since`` that position: the broker replays
   what was missed (``recovered: true``) or says why it cannot
   (``recovered: false`` and a reason, which becomes a :class:`Gap` for the
   holders). Patterns are re-subscribed only after every exact channel is
   confirmed, so that no live message of a channel comes in through a
   pattern while that channel's replay is being read (the broker would then
   send it twice, once out of order). The result, per pattern, says which
   subscriptions still need the plain reconnection :class:`Gap`.
3. :func:`keep_fresh`, for as long as the connection lives: a new ``auth``
   on the same connection before the token expires (subscriptions stay as
   they are), or at once when the broker says ``token_expired``.

These functions know the link only through ``call``, which sends one
request on this connection and returns its reply (see :class:`Call`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ._auth import TokenSource, refresh_delay
from ._hooks import Hooks
from ._outbox import Lost
from ._table import Outcome, SubscriptionTable
from .errors import RequestError, Timeout, Unavailable
from .frames import Position, Reply, is_exact

__all__ = ["Call", "Restored", "authenticate", "keep_fresh", "restore"]

log = logging.getLogger("broker_client")

#: Longest wait between two attempts at refreshing a token that failed, in seconds.
MAX_REFRESH_RETRY = 30.0


class Call(Protocol):
    """Send one request on the current connection; return its ``ok`` or raise its error.

    ``on_reply`` is applied to an ``ok`` as it is read, before any later frame.
    Raises the broker's :class:`RequestError`, :class:`Timeout`, or an
    internal error when the connection drops first.
    """

    def __call__(
        self,
        op: str,
        fields: dict[str, Any],
        *,
        on_reply: Callable[[Reply], None] | None = None,
    ) -> Awaitable[Reply]: ...


async def authenticate(call: Call, tokens: TokenSource) -> float | None:
    """Send ``auth`` with a token from ``tokens``; return its ``expires_in`` (None if unsaid).

    Raises :class:`Unauthorized` (a refused token, or a provider that failed),
    :class:`Forbidden` (a refresh for another subject), and what ``call`` raises.
    """
    token = await tokens.get()
    reply = await call("auth", {"token": token})
    expires_in = reply.extra.get("expires_in")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        return float(expires_in)
    return None


async def keep_fresh(
    call: Call,
    tokens: TokenSource,
    expires_in: float | None,
    wake: asyncio.Event,
    hooks: Hooks,
) -> None:
    """Refresh the token on this connection before it expires, for as long as it lives.

    ``wake`` set means "now" (the broker said ``token_expired``). A refused or
    failed refresh goes to the ``on_error`` hooks and is tried again after
    1, 2, 4 ... seconds (at most :data:`MAX_REFRESH_RETRY`); the broker keeps
    the old token meanwhile. Runs until cancelled.
    """
    delay = None if expires_in is None else refresh_delay(expires_in)
    failures = 0
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await wake.wait()
        wake.clear()
        try:
            expires_in = await authenticate(call, tokens)
        except Lost:
            return  # the connection dropped; the next one authenticates afresh
        except (RequestError, Timeout) as exc:
            failures += 1
            delay = min(MAX_REFRESH_RETRY, 2.0 ** (failures - 1))
            log.warning("token refresh failed (%s); trying again in %.0f s", exc, delay)
            if isinstance(exc, RequestError):
                hooks.refused(exc)
            continue
        failures = 0
        delay = None if expires_in is None else refresh_delay(expires_in)
        log.debug("token refreshed; next refresh in %s s", delay)


class Restored:
    """What :func:`restore` did: each pattern's :class:`Outcome`, and the refusals."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Outcome] = {}
        #: Patterns the broker refused, with its error.
        self.refused: list[tuple[str, RequestError]] = []
        #: A re-subscription timed out: the connection is not worth keeping.
        self.timed_out = False


async def restore(
    call: Call, table: SubscriptionTable, lost_since: float | None
) -> Restored | None:
    """Re-subscribe every pattern the table holds, recovering exact channels with ``since``.

    Return what happened, or None when the connection dropped meanwhile (the
    next connection starts over). ``lost_since`` dates the gaps of channels
    that could not be recovered.
    """
    done = Restored()
    patterns = table.patterns()

    async def one(pattern: str) -> None:
        since = table.position(pattern) if is_exact(pattern) else None

        def confirmed(reply: Reply, since: Position | None = since) -> None:
            if table.holds(pattern):  # not unsubscribed meanwhile
                done.outcomes[pattern] = table.confirm(
                    None, pattern, reply.extra, since=since, lost_since=lost_since
                )

        fields: dict[str, Any] = {"channel": pattern}
        if since is not None:
            fields["since"] = {"offset": since.offset, "epoch": since.epoch}
        try:
            await call("subscribe", fields, on_reply=confirmed)
        except Unavailable:
            if since is None:
                raise
            # The broker cannot read history now: subscribe live; the holders get a gap.
            log.warning("cannot recover %r now (history unavailable); subscribing live", pattern)
            await call("subscribe", {"channel": pattern}, on_reply=lambda r: confirmed(r, None))

    for phase in ([p for p in patterns if is_exact(p)], [p for p in patterns if not is_exact(p)]):
        results = await asyncio.gather(*(one(p) for p in phase), return_exceptions=True)
        for pattern, result in zip(phase, results, strict=True):
            if isinstance(result, RequestError):
                done.refused.append((pattern, result))
            elif isinstance(result, Timeout):
                log.warning("re-subscribing %r timed out; reconnecting", pattern)
                done.timed_out = True
            elif isinstance(result, BaseException):
                return None  # the connection dropped again
        if done.timed_out:
            return done
    return done
