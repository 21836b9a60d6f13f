"""A pub/sub message broker over WebSockets, on asyncio.

The package is layered in three rings, imports pointing inward only:

* core, no I/O: ``exceptions``, ``frames``, ``codec``, ``channels``,
  ``session``, ``metrics``, ``settings`` (reads files and environment, nothing else);
* orchestration: ``hub``, ``node``, ``backplane`` (the interface);
* adapters: ``server`` (WebSocket), ``http`` (service API),
  ``backplane.memory``, ``backplane.redis``, ``app``, ``workers``, ``cli``.
"""

__version__ = "0.1.0"
