"""Who a connection is and what it may do: handshake, principal, authorizer.

Pure: nothing here verifies a signature or reads a socket. The WebSocket
adapter turns the opening handshake into a ``Handshake``; a token verifier
(an adapter) turns a token into a ``Principal``; an ``Authorizer`` decides,
once per subscribe and once per publish, never per delivery.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from broker.history import HistoryPolicy

__all__ = [
    "ALLOW_ALL",
    "ANONYMOUS",
    "MAX_TOKEN_LENGTH",
    "AllowAll",
    "Authorizer",
    "ChannelPolicy",
    "Handshake",
    "OriginPolicy",
    "Principal",
    "TokenVerifier",
    "Verified",
    "client_address",
]

#: Longest token accepted; a longer one is refused without being parsed.
MAX_TOKEN_LENGTH = 8192


@dataclass(frozen=True, slots=True)
class Handshake:
    """What a client's opening handshake told us, for deciding who it is.

    ``address`` is the client's IP address as the broker believes it (the
    peer's, or a trusted proxy's ``X-Forwarded-For``); ``headers`` holds the
    request's headers with lower-case names. Kept only while a connection
    opens, never per connection.
    """

    address: str = ""
    port: int = 0
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class Principal:
    """The identity a connection acts as.

    ``sub`` is the authenticated subject, ``None`` for an anonymous
    connection; ``subscribe`` and ``publish`` are the channel patterns its
    token grants where a rule defers to the token; ``expires_at`` is when its
    credentials run out (seconds on the wall clock, ``None``: never).
    """

    sub: str | None = None
    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    expires_at: float | None = None

    @property
    def anonymous(self) -> bool:
        return self.sub is None


#: The principal of every connection that has not authenticated.
ANONYMOUS = Principal()


class Authorizer(Protocol):
    """Decides what a principal may do; pure and synchronous."""

    def may_subscribe(self, principal: Principal, pattern: str) -> bool:
        """Whether ``principal`` may receive every channel ``pattern`` can match."""

    def may_publish(self, principal: Principal, channel: str) -> bool:
        """Whether ``principal`` may publish to ``channel``."""


class ChannelPolicy(Authorizer, Protocol):
    """An authorizer that also knows which channels keep history (``rules.Rules``)."""

    def history(self, channel: str) -> HistoryPolicy | None:
        """The history ``channel`` keeps, or None."""


@dataclass(frozen=True, slots=True)
class Verified:
    """A token that passed verification: who it names, and for how much longer.

    ``expires_in`` is in seconds, measured on the verifier's wall clock when it
    verified, so the session can turn it into a deadline on its own clock.
    """

    principal: Principal
    expires_in: float


class TokenVerifier(Protocol):
    """Checks a token; pure from the session's point of view (no awaiting)."""

    def verify(self, token: str) -> Verified:
        """Return who ``token`` names; raise ``Unauthorized`` saying why it is refused."""


class AllowAll:
    """Everybody may do everything: protocol version 1 (no auth, no rules)."""

    def may_subscribe(self, principal: Principal, pattern: str) -> bool:
        return True

    def may_publish(self, principal: Principal, channel: str) -> bool:
        return True


ALLOW_ALL = AllowAll()


class OriginPolicy:
    """Which browser origins may open a WebSocket (``allowed_origins``).

    Empty: any. Otherwise an origin is allowed when scheme, host and port equal
    a listed one (case-insensitive; a default port may be written or left out),
    or when a listed ``scheme://*.domain[:port]`` has one or more labels before
    ``domain`` (never ``domain`` itself). ``null`` (sandboxed pages, files)
    only when listed.
    """

    def __init__(self, allowed: Sequence[str]) -> None:
        self._any = not allowed
        self._exact: set[str] = set()
        self._suffixes: list[tuple[str, str, str]] = []  # scheme, ".domain", port
        for origin in allowed:
            if origin.lower() == "null":
                self._exact.add("null")
                continue
            scheme, host, port = _split_origin(origin)
            if host.startswith("*."):
                self._suffixes.append((scheme, host[1:], port))
            else:
                self._exact.add(f"{scheme}://{host}:{port}")

    def allows(self, origin: str | None) -> bool:
        """Whether a request with this ``Origin`` header (None: none) may connect."""
        if origin is None or self._any:
            return True  # not a browser: the Origin check protects browsers only
        if origin.strip().lower() == "null":
            return "null" in self._exact
        try:
            scheme, host, port = _split_origin(origin)
        except ValueError:
            return False
        if f"{scheme}://{host}:{port}" in self._exact:
            return True
        return any(
            scheme == s and port == p and host.endswith(suffix) and len(host) > len(suffix)
            for s, suffix, p in self._suffixes
        )


_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _split_origin(origin: str) -> tuple[str, str, str]:
    """``scheme, host, port`` of an origin, lower-cased, with the default port filled in."""
    scheme, sep, rest = origin.strip().lower().partition("://")
    if not sep or not scheme or "/" in rest or "?" in rest or "#" in rest or "@" in rest:
        raise ValueError(f"not an origin: {origin!r}")
    if rest.startswith("["):  # an IPv6 literal
        host, _, port = rest.partition("]")
        host += "]"
        port = port.removeprefix(":")
    else:
        host, _, port = rest.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"not an origin: {origin!r}")
    return scheme, host, port or _DEFAULT_PORTS.get(scheme, "")


def client_address(peer: str, forwarded_for: str | None, trusted: Sequence[str]) -> str:
    """The client's address: the peer's, unless the peer is a trusted proxy.

    Behind trusted proxies the client is the right-most address of
    ``X-Forwarded-For`` that is not itself a trusted proxy (each proxy appends
    the address it saw; anything left of a trusted hop could be forged).
    """
    if not trusted or not forwarded_for:
        return peer
    networks = [ipaddress.ip_network(net, strict=False) for net in trusted]

    def is_trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in networks)

    if not is_trusted(peer):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # garbage in the header: fall back to what we know
    return hops[0] if hops else peer
