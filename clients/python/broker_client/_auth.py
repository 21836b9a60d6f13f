"""Where the client's token comes from, and when to ask for the next one.

The broker wants a JWT in an ``auth`` frame on every connection, and a fresh
one on the same connection before the current one expires (else one
``token_expired`` error, a short grace, then close 1008). A
:class:`TokenSource` wraps what the application gave: a fixed ``token``, or
a ``token_provider`` called for every connection and every refresh (a
function or a coroutine function, so it may fetch the token over the
network). :func:`refresh_delay` says when to refresh: at a random point in
the last 10 to 20 % of the token's lifetime, so that clients given tokens at
the same moment do not all come back at once, and at least a few seconds
before the end, so that a slow provider still makes it.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Awaitable, Callable

from .errors import Unauthorized

__all__ = ["MIN_EARLY", "TokenProvider", "TokenSource", "refresh_delay"]

#: Returns the token to send: a function or a coroutine function.
TokenProvider = Callable[[], Awaitable[str] | str]

#: Refresh at least this many seconds before expiry (at most half the lifetime).
MIN_EARLY = 5.0
#: Never refresh sooner than this after the previous ``auth``, in seconds.
MIN_DELAY = 1.0

_RNG = random.Random()


class TokenSource:
    """The token of every ``auth`` frame: fixed, or from the application's provider."""

    def __init__(self, token: str | None = None, provider: TokenProvider | None = None) -> None:
        if token is not None and provider is not None:
            raise ValueError("give token or token_provider, not both")
        if token is None and provider is None:
            raise ValueError("a TokenSource needs a token or a token_provider")
        if token is not None:
            _check(token)
        self._token = token
        self._provider = provider

    @property
    def refreshable(self) -> bool:
        """Whether a new token can be had (a provider), so refreshing is worth it."""
        return self._provider is not None

    async def get(self) -> str:
        """Return the token to send now; calls the provider if there is one.

        Raises :class:`Unauthorized` when the provider fails or returns
        something that is not a token (its exception is the ``__cause__``).
        """
        if self._provider is None:
            assert self._token is not None
            return self._token
        try:
            result = self._provider()
            token = await result if inspect.isawaitable(result) else result
        except Exception as exc:
            raise Unauthorized(f"the token provider failed: {exc!r}") from exc
        return _check(token)


def _check(token: object) -> str:
    if not isinstance(token, str) or not token:
        raise Unauthorized(f"a token is a non-empty str, not {type(token).__name__}")
    return token


def refresh_delay(expires_in: float, rng: random.Random | None = None) -> float:
    """Return how many seconds from now to refresh a token that expires in ``expires_in``.

    A random point in the last 10-20 % of the lifetime, at least
    ``min(MIN_EARLY, expires_in / 2)`` before the end, and never sooner than
    :data:`MIN_DELAY` (a token that is already almost out gets its
    ``token_expired`` error, which refreshes at once anyway).
    """
    rng = rng or _RNG
    early = max(expires_in * rng.uniform(0.1, 0.2), min(MIN_EARLY, expires_in / 2))
    return max(MIN_DELAY, expires_in - early)
