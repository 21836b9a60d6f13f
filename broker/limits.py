"""How many connections a process can hold: derived from its open-files limit.

Every WebSocket connection is a file descriptor; so are the listening sockets,
the Redis links, the service API's connections and the files Python opens. The
default ``max_connections`` leaves a reserve of 5 % of the limit (at least 100)
for those, so the process refuses a connection with ``limit_exceeded`` before
``accept()`` starts failing with "too many open files".
"""

from __future__ import annotations

import resource

__all__ = ["RESERVE_FRACTION", "RESERVE_MIN", "default_max_connections", "open_files_limit"]

RESERVE_FRACTION = 0.05
RESERVE_MIN = 100


def open_files_limit() -> int:
    """The process's soft limit of open files (``RLIMIT_NOFILE``); a large number if none."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1_048_576


def default_max_connections(limit: int | None = None) -> int:
    """Connections that fit under ``limit`` open files (default: this process's) with a reserve."""
    limit = open_files_limit() if limit is None else limit
    reserve = max(RESERVE_MIN, int(limit * RESERVE_FRACTION))
    return max(1, limit - reserve)
