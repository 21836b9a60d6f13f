"""Capped exponential backoff: how long to wait before trying again.

One policy for the whole server: the Redis backplane's reconnects
(``broker/backplane/redis_link.py``) and the ``--workers`` supervisor's restarts
(``broker/workers.py``). Pure arithmetic, no asyncio and no clock, so the delays
are tested synchronously; randomness comes in as a function, so a test can pin
it. (The Python client has its own, ``clients/broker_client/backoff.py``: it is
shipped apart from the server.)
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["backoff_delay"]

#: Doubling stops here; far past any cap, it keeps ``2.0 ** n`` finite.
_MAX_DOUBLINGS = 30


def backoff_delay(
    attempt: int, *, base: float, cap: float, rand: Callable[[], float] | None
) -> float:
    """Seconds to wait before try number ``attempt`` (0 is the first try: no wait).

    The ceiling is ``base`` for attempt 1, doubling with each attempt up to
    ``cap``. With ``rand`` (a function returning a float in ``[0, 1]``, such as
    ``random.random``) the wait is "equal jitter", a random point in the upper
    half of the ceiling, so that many processes cut off together do not come back
    in lockstep. With ``rand=None`` the wait is the ceiling itself: for a caller
    whose waits are logged and asserted, and that has nobody to fall into step
    with.
    """
    if attempt <= 0:
        return 0.0
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, _MAX_DOUBLINGS))
    if rand is None:
        return ceiling
    return ceiling / 2 + rand() * ceiling / 2
