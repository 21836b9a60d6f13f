"""Every wait in the tests goes through here, with a time-out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 5.0


async def within(awaitable: Awaitable[T], timeout: float = DEFAULT_TIMEOUT) -> T:
    """Await ``awaitable`` or fail after ``timeout`` seconds."""
    return await asyncio.wait_for(awaitable, timeout)


async def until(
    predicate: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT, interval: float = 0.01
) -> None:
    """Poll ``predicate`` until it is true, or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
