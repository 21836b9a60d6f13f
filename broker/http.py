"""The service HTTP API, on its own port so it need not face browsers.

``POST /publish`` answers once the backplane took the message; ``/healthz``
says the process is alive, ``/readyz`` that it can deliver, ``/metrics``
exposes Prometheus text. Every other answer, whatever went wrong, is JSON:
``{"error": {"code": "...", "message": "..."}}`` with a wire code.

Three modules: ``http_gate`` decides from a request's head who may ask what
(pure), ``http_server`` speaks HTTP/1.1 with h11 (bytes, timers, limits), and
this one answers admitted requests and keeps the books.

**Decision, ``/metrics`` and the API key:** with ``api_key`` set, ``/metrics``
needs it too unless ``metrics_public`` is set. The exposition tells traffic
volumes, connection counts, error rates, the process id and the backplane:
enough to plan an attack or watch a victim. Prometheus sends a bearer token
(``authorization: {credentials: ...}`` in a scrape config) at no cost;
``metrics_public`` is for scrapers that cannot. ``/healthz`` and ``/readyz``
stay open: load balancers and orchestrators probe them without secrets, and
they tell nothing but up or down.

Refusals (malformed HTTP, a wrong key, a forbidden origin...) are the
client's doing: each is counted in ``broker_errors_total{code}`` and logged
at debug; when they keep coming, one line at info per minute sums them up.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from broker import codec
from broker.codes import ErrorCode
from broker.exceptions import BadRequest, RequestError
from broker.exposition import render
from broker.http_gate import Admitted, Answer, Gate, Head, error, json_answer
from broker.http_server import CLOSE_GRACE, HttpServer
from broker.node import Node, published_fields
from broker.settings import Settings
from broker.snapshots import gather

__all__ = ["HttpApi", "RefusalLog", "ServiceApi"]

log = logging.getLogger(__name__)

#: Prometheus text exposition format, version 0.0.4.
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


class HttpApi:
    """The service API of one broker process: start, serve, close."""

    def __init__(self, settings: Settings, node: Node) -> None:
        self._settings = settings
        self._server = HttpServer(
            ServiceApi(settings, node),
            timeout=settings.http_timeout,
            max_body=settings.max_frame_bytes,
        )

    async def start(self) -> None:
        """Listen on ``http_host:http_port`` (SO_REUSEPORT with ``reuse_port``)."""
        s = self._settings
        await self._server.start(
            s.http_host, s.http_port, reuse_port=s.reuse_port, backlog=s.listen_backlog
        )

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        return self._server.port

    async def close(self, grace: float = CLOSE_GRACE) -> None:
        """Stop listening and close idle connections; requests in flight get ``grace`` s."""
        await self._server.close(grace)


class ServiceApi:
    """The routes, and the books kept on every request (``http_server.Application``)."""

    def __init__(self, settings: Settings, node: Node) -> None:
        self.node = node
        self.gate = Gate(settings)
        self.refusals = RefusalLog()

    def check(self, head: Head) -> Admitted | Answer:
        """Count the request by route, then let the gate decide."""
        route = self.gate.route_of(head)
        if route is not None:
            self.node.metrics.http_requests[route] += 1
        return self.gate.check(head)

    def refused(self, answer: Answer, head: Head | None, peer: str) -> None:
        """Count a refusal by its code and log it (see ``RefusalLog``)."""
        metrics = self.node.metrics
        if answer.code is not None:
            metrics.errors[answer.code] += 1
        if answer.code == ErrorCode.UNAUTHORIZED:
            metrics.auth_failures += 1
        request = "-" if head is None else f"{head.method[:20]} {head.target[:100]}"
        self.refusals.note(answer.status, peer, request, answer.body)

    async def respond(self, admitted: Admitted, body: bytes) -> Answer:
        """Answer an admitted request; a bug of ours is logged and answered 500."""
        try:
            if admitted.route == "publish":
                return await self._publish(admitted, body)
            if admitted.route == "healthz":
                return json_answer(200, {"status": "ok"})
            if admitted.route == "readyz":
                return self._readyz()
            return self._metrics()
        except RequestError as exc:
            self.node.metrics.errors[exc.code] += 1
            return error(exc.http_status, exc.code, exc.message)
        except Exception:
            log.exception("internal error in the service API (%s)", admitted.route)
            self.node.metrics.errors[ErrorCode.INTERNAL] += 1
            return error(500, ErrorCode.INTERNAL, "internal error; it has been logged")

    async def _publish(self, admitted: Admitted, body: bytes) -> Answer:
        frame = codec.decode_http_publish(body)
        key = frame.key
        if admitted.key is not None:
            if key is not None and key != admitted.key:
                raise BadRequest("the Idempotency-Key header and the body's 'key' differ")
            key = admitted.key
        published = await self.node.publish(frame.channel, frame.data, key)
        return json_answer(200, {"ok": True, **(published_fields(published) or {})})

    def _readyz(self) -> Answer:
        node = self.node
        if node.ready:
            return json_answer(200, {"status": "ready", "backplane": node.settings.backplane})
        return json_answer(503, {"status": "unavailable", "backplane": node.settings.backplane})

    def _metrics(self) -> Answer:
        snapshots, by_worker = gather(self.node)
        return Answer(200, render(snapshots, by_worker=by_worker), content_type=PROMETHEUS)


class RefusalLog:
    """Log refusals at debug one by one, and at info as one line a minute when they repeat.

    A client that sends garbage, a wrong key or a forbidden origin is not an
    error of the broker's; an operator wants to know that it keeps happening,
    not a line per request. The summary is written when a refusal arrives
    after ``window`` seconds, if the window held at least ``threshold``.
    """

    def __init__(
        self,
        *,
        window: float = 60.0,
        threshold: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.threshold = threshold
        self._clock = clock
        self._since = clock()
        self._statuses: Counter[int] = Counter()
        self._last = ""

    def note(self, status: int, peer: str, request: str, body: bytes) -> None:
        """Record one refusal: ``status`` sent to ``peer`` for ``request``."""
        log.debug("service API refused %s from %s: %d %s", request, peer, status, body[:300])
        now = self._clock()
        if now - self._since >= self.window:
            total = sum(self._statuses.values())
            if total >= self.threshold:
                by_status = ", ".join(f"{s}: {n}" for s, n in sorted(self._statuses.items()))
                log.info(
                    "service API refused %d requests in the last %.0f s (%s); the last %s",
                    total,
                    now - self._since,
                    by_status,
                    self._last,
                )
            self._since = now
            self._statuses.clear()
        self._statuses[status] += 1
        self._last = f"from {peer}: {request} -> {status}"
