"""Which requests the service API admits, decided from a request's head alone.

Pure: the HTTP adapter (``broker.http_server``) parses bytes with h11 and
hands over a ``Head``; ``Gate.check`` returns either ``Admitted`` (read the
body if the route takes one, then answer) or the ``Answer`` that refuses it.
Everything is decided before a byte of body is read, so a request that is not
allowed costs no more than its headers.

The checks, in order (the first that fails answers):

1. The HTTP version (505 unless 1.0 or 1.1), the head's size and header
   count (431), then framing that two parsers
   could read two ways: ``Content-Length`` and ``Transfer-Encoding``
   together (400), or a security-relevant header given twice (400).
2. ``Host`` against ``http_allowed_hosts`` when that list is set (403): a
   browser tricked by DNS rebinding into calling us names the attacker's host.
3. The route: the target must be a path (400), the path a route (404), the
   method one of the route's (405, with ``Allow``).
4. ``Origin``, when present, against ``allowed_origins`` (403).
5. The API key, when ``api_key`` is set (401 with ``WWW-Authenticate:
   Bearer``): for ``/publish`` always, for ``/metrics`` unless
   ``metrics_public``, never for ``/healthz`` and ``/readyz``.
6. For ``/publish``: no ``Content-Encoding`` but identity (415), a JSON
   ``Content-Type`` (415: a cross-site ``text/plain`` form post must not
   publish, and a JSON one needs a CORS preflight that this API never grants),
   a length (411), a valid ``Idempotency-Key`` (400) and a ``Content-Length``
   within ``max_frame_bytes`` (413).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from broker import codec
from broker.access import OriginPolicy
from broker.codes import ErrorCode
from broker.settings import Settings

__all__ = [
    "JSON",
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "ROUTES",
    "Admitted",
    "Answer",
    "Gate",
    "Head",
    "error",
    "json_answer",
]

#: Largest request head (request line and headers), bytes; larger is 431.
MAX_HEAD_BYTES = 8 * 1024
#: Most header fields in one request; more is 431.
MAX_HEADERS = 64
#: Longest ``Idempotency-Key``, characters (as a body ``key``).
MAX_KEY_LENGTH = 128

JSON = "application/json"

#: Path: (route name, methods). A route that allows GET allows HEAD too.
ROUTES: dict[str, tuple[str, tuple[str, ...]]] = {
    "/publish": ("publish", ("POST",)),
    "/healthz": ("healthz", ("GET", "HEAD")),
    "/readyz": ("readyz", ("GET", "HEAD")),
    "/metrics": ("metrics", ("GET", "HEAD")),
}

#: Headers whose second copy could make two parsers disagree about the request.
_SINGLE = ("authorization", "origin", "content-type", "content-encoding", "idempotency-key")


@dataclass(frozen=True, slots=True)
class Head:
    """A request's method, target and headers, as h11 parsed them.

    Header names are lower case; values are the bytes as received, decoded as
    latin-1 (lossless), in order, repeats kept.
    """

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    version: str = "1.1"

    def values(self, name: str) -> list[str]:
        """Every value of header ``name`` (lower case), in order."""
        return [value for key, value in self.headers if key == name]

    def get(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def size(self) -> int:
        """Bytes of the head on the wire, give or take the spaces h11 dropped."""
        line = len(self.method) + len(self.target) + len(" HTTP/1.1\r\n") + 1
        return line + sum(len(key) + len(value) + 4 for key, value in self.headers) + 2


@dataclass(frozen=True, slots=True)
class Answer:
    """A response to send: status, body and the headers that are not framing.

    ``code`` is the wire error code of an error answer (None for a success),
    for counting; ``close`` asks to close the connection after it.
    """

    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()
    code: str | None = None
    close: bool = False


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request the gate let through: which route, and its ``Idempotency-Key``."""

    route: str
    key: str | None = None

    @property
    def takes_body(self) -> bool:
        """Whether the route reads a body; the others leave it unread (and close)."""
        return self.route == "publish"


def error(
    status: int,
    code: ErrorCode,
    message: str,
    headers: Iterable[tuple[str, str]] = (),
    *,
    close: bool = False,
) -> Answer:
    """An error answer in the API's shape, ``{"error": {"code", "message"}}``."""
    return Answer(
        status,
        codec.encode_http_error(code, message),
        headers=tuple(headers),
        code=code.value,
        close=close,
    )


def json_answer(status: int, fields: dict[str, Any]) -> Answer:
    """A JSON answer that is not an error."""
    return Answer(status, codec.encode_http_json(fields))


class Gate:
    """The checks of the module docstring, configured once from the settings."""

    def __init__(self, settings: Settings) -> None:
        key = settings.api_key
        self._key = key.get_secret_value().encode() if key is not None else None
        self._keyed = {"publish"} if settings.metrics_public else {"publish", "metrics"}
        self._hosts = frozenset(host_name(host) for host in settings.http_allowed_hosts)
        self._origins = OriginPolicy(settings.allowed_origins)
        self._max_body = settings.max_frame_bytes

    def check(self, head: Head) -> Admitted | Answer:
        """Admit ``head`` or return the answer that refuses it (see the module docstring)."""
        refused = self._framing(head) or self._host(head)
        if refused is not None:
            return refused
        routed = self._route(head)
        if isinstance(routed, Answer):
            return routed
        refused = self._origin(head) or self._credentials(head, routed)
        if refused is not None:
            return refused
        if routed == "publish":
            return self._publish(head)
        return Admitted(routed)

    def route_of(self, head: Head) -> str | None:
        """The route ``head`` asks for, if any (for counting requests by route)."""
        entry = ROUTES.get(head.target.partition("?")[0])
        return entry[0] if entry is not None and head.method in entry[1] else None

    # -- the checks, each returning None when it passes ---------------------------------

    def _framing(self, head: Head) -> Answer | None:
        if head.version not in ("1.0", "1.1"):  # an HTTP/2 preface, say
            return error(
                505,
                ErrorCode.BAD_FRAME,
                f"HTTP/{head.version[:10]} is not supported: this API speaks HTTP/1.1",
                close=True,
            )
        if head.size > MAX_HEAD_BYTES:
            return error(
                431,
                ErrorCode.TOO_LARGE,
                f"request head is over the {MAX_HEAD_BYTES}-byte cap",
                close=True,
            )
        if len(head.headers) > MAX_HEADERS:
            return error(
                431,
                ErrorCode.TOO_LARGE,
                f"{len(head.headers)} header fields, over the cap of {MAX_HEADERS}",
                close=True,
            )
        if head.get("content-length") is not None and head.get("transfer-encoding") is not None:
            return error(
                400,
                ErrorCode.BAD_FRAME,
                "both Content-Length and Transfer-Encoding: the body's length is ambiguous",
                close=True,
            )
        for name in _SINGLE:
            if len(head.values(name)) > 1:
                return error(400, ErrorCode.BAD_REQUEST, f"header {name} given more than once")
        return None

    def _host(self, head: Head) -> Answer | None:
        if not self._hosts:
            return None
        host = head.get("host")
        if host is not None and host_name(host) in self._hosts:
            return None
        shown = "no Host header" if host is None else f"Host {host[:100]!r}"
        return error(403, ErrorCode.FORBIDDEN, f"{shown} is not one this API answers")

    def _route(self, head: Head) -> str | Answer:
        if not head.target.startswith("/"):
            return error(400, ErrorCode.BAD_REQUEST, "the request target must be a path")
        path = head.target.partition("?")[0]
        entry = ROUTES.get(path)
        if entry is None:
            return error(404, ErrorCode.BAD_REQUEST, f"Not Found: {head.method} {path[:100]}")
        route, methods = entry
        if head.method not in methods:
            return error(
                405,
                ErrorCode.BAD_REQUEST,
                f"Method Not Allowed: {head.method[:20]} {path}",
                [("allow", ", ".join(methods))],
            )
        return route

    def _origin(self, head: Head) -> Answer | None:
        origin = head.get("origin")
        if self._origins.allows(origin):
            return None
        return error(403, ErrorCode.FORBIDDEN, f"origin {(origin or '')[:100]!r} is not allowed")

    def _credentials(self, head: Head, route: str) -> Answer | None:
        if self._key is None or route not in self._keyed:
            return None
        value = head.get("authorization")
        if value is None:
            reason = "this route needs 'Authorization: Bearer <api_key>'"
        else:
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "bearer":
                reason = "Authorization must be 'Bearer <api_key>'"
            elif hmac.compare_digest(token.strip().encode("latin-1"), self._key):
                return None
            else:
                reason = "wrong API key"
        return error(401, ErrorCode.UNAUTHORIZED, reason, [("www-authenticate", "Bearer")])

    def _publish(self, head: Head) -> Admitted | Answer:
        encodings = [
            token.strip().lower()
            for token in (head.get("content-encoding") or "").split(",")
            if token.strip()
        ]
        if any(token != "identity" for token in encodings):
            return error(
                415,
                ErrorCode.BAD_REQUEST,
                "Content-Encoding is not supported: send the JSON body as it is",
                close=True,
            )
        media = (head.get("content-type") or "").partition(";")[0].strip().lower()
        if media != JSON:
            return error(415, ErrorCode.BAD_REQUEST, f"Content-Type must be {JSON}", close=True)
        length = head.get("content-length")
        if length is None and head.get("transfer-encoding") is None:
            return error(
                411,
                ErrorCode.BAD_REQUEST,
                "Content-Length (or Transfer-Encoding: chunked) is required",
            )
        key = head.get("idempotency-key")
        if key is not None:
            try:
                key = key.encode("latin-1").decode()
            except UnicodeDecodeError:
                return error(400, ErrorCode.BAD_REQUEST, "Idempotency-Key is not UTF-8")
            if not 1 <= len(key) <= MAX_KEY_LENGTH:
                return error(
                    400,
                    ErrorCode.BAD_REQUEST,
                    f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters",
                )
        # h11 checked that Content-Length is digits, at most 20 of them.
        if length is not None and int(length) > self._max_body:
            return error(
                413,
                ErrorCode.TOO_LARGE,
                f"body is {int(length)} bytes, over the {self._max_body}-byte cap",
                close=True,
            )
        return Admitted("publish", key)


def host_name(value: str) -> str:
    """``value`` (a Host header or a setting) lower-cased, without its port.

    An IPv6 address keeps its brackets; one written without them (in a
    setting) gets them, so ``::1`` and ``[::1]:8001`` compare equal.
    """
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end > 0 else value
    if value.count(":") > 1:
        return f"[{value}]"
    name, sep, port = value.rpartition(":")
    return name if sep and (port.isdigit() or not port) else value
