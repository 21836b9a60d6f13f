"""A pub/sub message broker over WebSockets, on asyncio.

The package is layered in three rings, imports pointing inward only: a pure
core (frames, codec, channels, index, session, access, publishing, settings
and friends), orchestration (hub, node, the backplane interface and its
in-memory twin) and adapters (outbox, server, http, exposition, the Redis
backplane, config, app, workers, cli, logs). ``docs/architecture.md`` has the
table; ``tests/test_architecture.py`` enforces it.
"""

__version__ = "0.1.0"
