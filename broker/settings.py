"""Configuration: one frozen, validated object, passed down explicitly.

Every setting with its unit and default (mirrored, with comments, in
``config/broker.toml``, which a test keeps in sync). Reading them from a file,
the environment and the command line is ``broker.config``'s job; this module
does no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from broker.channels import check_pattern
from broker.exceptions import BadChannel

__all__ = [
    "ENV_PREFIX",
    "JWT_ALGORITHMS",
    "ChannelRule",
    "KiB",
    "MiB",
    "Settings",
    "Who",
]

ENV_PREFIX = "BROKER_"
KiB = 1024
MiB = 1024 * KiB


#: Who may subscribe to or publish on a channel (see ``ChannelRule``).
Who = Literal["anyone", "authenticated", "token", "nobody"]

#: The JWT algorithms the broker can verify ("none" is never one of them).
JWT_ALGORITHMS = frozenset(
    {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
    | {"ES256", "ES384", "ES512", "EdDSA"}
)

_ORIGIN = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<host>[^/:?#]+)(?::(?P<port>\d{1,5}))?")


class ChannelRule(BaseModel):
    """One ``[[channels]]`` rule: what applies to the channels ``pattern`` matches.

    Rules are tried in order and the first whose pattern matches wins; a
    channel no rule matches uses the defaults. ``{sub}`` inside a token of
    ``pattern`` stands for the connection's subject. ``subscribe`` and
    ``publish`` left out take the defaults: ``"anyone"`` with authentication
    off, ``"token"`` with it on.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    pattern: str = Field(description="A channel pattern; '{sub}' in a token is the subject.")
    subscribe: Who | None = Field(None, description="Who may subscribe (default: see above).")
    publish: Who | None = Field(None, description="Who may publish (default: see above).")
    history_size: int = Field(
        0, ge=0, le=1_000_000, description="Messages kept per channel for recovery; 0: none."
    )
    history_ttl: float = Field(300.0, gt=0, description="Seconds a kept message stays.")

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, pattern: str) -> str:
        # "{sub}" stands for one token's worth of characters; check the rest.
        try:
            check_pattern(pattern.replace("{sub}", "sub"))
        except BadChannel as exc:
            raise ValueError(exc.message) from None
        return pattern


class Settings(BaseModel):
    """Every setting of the broker, with its unit and default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Listeners
    host: str = Field("0.0.0.0", description="Address the WebSocket server binds to.")
    port: int = Field(8000, ge=0, le=65535, description="WebSocket port (0: any free port).")
    http_host: str = Field(
        "127.0.0.1", description="Address of the service HTTP API (keep it off the internet)."
    )
    http_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Service HTTP API port (0: any free port; not the WebSocket port).",
    )

    # Backplane
    backplane: Literal["memory", "redis", "redis-cluster"] = Field(
        "memory",
        description="'memory' one process, 'redis' to scale out, 'redis-cluster' past one Redis.",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="redis://, rediss:// (TLS); credentials may be in the URL. "
        "For redis-cluster: seed nodes, comma-separated.",
    )
    redis_prefix: str = Field(
        "broker.", description="Prefix of every Redis channel this broker uses."
    )
    redis_timeout: float = Field(
        1.0, gt=0, le=60, description="Seconds before a Redis command counts as failed."
    )
    redis_reconnect_max: float = Field(
        2.0,
        gt=0,
        le=300,
        description="Cap, in seconds, of the backoff between reconnects (above 3, /readyz may "
        "take longer than the contract's 5 s to turn 200 after Redis is back).",
    )
    redis_cluster_buckets: int = Field(
        64,
        ge=1,
        le=16384,
        description=(
            "redis-cluster: buckets the channels are spread over by first token "
            "(a pattern subscribes its buckets)."
        ),
    )

    # Limits
    max_frame_bytes: int = Field(
        1 * MiB, ge=1 * KiB, description="Largest client frame, bytes; bigger closes with 1009."
    )
    max_data_bytes: int = Field(
        64 * KiB, ge=1, description="Largest serialized 'data' of a publish, bytes (too_large)."
    )
    max_subscriptions: int = Field(
        1000, ge=1, description="Subscriptions per connection (limit_exceeded)."
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="Open WebSocket connections per process (limit_exceeded); default: the "
        "open-files limit minus a reserve of 5 % (at least 100).",
    )
    listen_backlog: int = Field(
        4096,
        ge=16,
        le=65535,
        description="Connections the kernel queues before accept(), on the WebSocket and the "
        "service port; sized for reconnect storms (capped by net.core.somaxconn).",
    )
    max_backlog_bytes: int = Field(
        4 * MiB,
        ge=1 * KiB,
        description="Unsent bytes a connection may accumulate before it is closed with 1013.",
    )
    rate_limit: float = Field(
        0.0, ge=0, description="Requests per second per connection; 0 turns the limit off."
    )
    rate_burst: int = Field(
        100, ge=1, description="Requests a connection may send at once above rate_limit."
    )
    error_limit: int = Field(
        50, ge=1, description="Error replies per connection within error_window before 1008."
    )
    error_window: float = Field(10.0, gt=0, description="Seconds over which errors are counted.")

    # Timers
    ping_interval: float = Field(
        20.0, gt=0, description="Seconds between WebSocket pings to each client."
    )
    ping_timeout: float = Field(
        20.0, gt=0, description="Seconds to wait for a pong before dropping a dead peer."
    )
    close_timeout: float = Field(
        5.0, gt=0, description="Seconds to wait for a closing handshake before aborting."
    )
    shutdown_timeout: float = Field(
        10.0, gt=0, description="Seconds a graceful shutdown may take before exiting anyway."
    )
    http_timeout: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Seconds the service HTTP API waits for a request's headers, then for "
        "its body (408), and keeps an idle connection open.",
    )

    # Features
    compression: bool = Field(
        False, description="permessage-deflate; costs about 4x memory per connection."
    )
    demo: bool = Field(True, description="Serve the live dashboard example at /demo.")
    workers: int = Field(
        1, ge=1, le=64, description="Worker processes sharing the ports (needs backplane 'redis')."
    )
    reuse_port: bool = Field(
        False,
        description="Bind with SO_REUSEPORT so several processes share the ports "
        "(the worker supervisor sets it).",
    )
    worker_index: int = Field(
        0, ge=0, description="This worker's number, for logs and metrics (the supervisor sets it)."
    )
    rebalance_workers: bool = Field(
        True,
        description="When a replaced worker is ready, the others close their connections above "
        "the average with 1012 so clients spread again.",
    )
    metrics_dir: str | None = Field(
        None,
        description="Directory where workers share their metrics, so any one of them answers "
        "/metrics for all (the supervisor sets it).",
    )
    uvloop: bool = Field(False, description="Run on uvloop when it is installed.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Least severe level that is logged."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="'json': one JSON object per line; 'text': human readable."
    )
    log_connections: bool = Field(
        False,
        description="Log each connection opened and closed at info (else at debug); a "
        "reconnect storm makes thousands of such lines.",
    )
    log_summary_interval: float = Field(
        60.0, ge=0, description="Seconds between summary lines at info (connections, rates); 0 off."
    )

    # Authentication ([auth] in the TOML file)
    jwt_secret: SecretStr | None = Field(
        None, description="HMAC key of HS256/384/512 tokens; setting it turns auth on."
    )
    jwt_secret_file: str | None = Field(
        None, description="File holding jwt_secret (read at start; a final newline is dropped)."
    )
    jwt_public_key: str | None = Field(
        None, description="PEM file of the RSA or EC public key verifying tokens; turns auth on."
    )
    jwt_algorithms: list[str] | None = Field(
        None,
        description="The only algorithms accepted (default: HS256 for a secret, RS256 or ES256 "
        "for a public key, by its type); 'none' never is.",
    )
    jwt_audience: str | None = Field(None, description="When set, a token's 'aud' must match.")
    jwt_issuer: str | None = Field(None, description="When set, a token's 'iss' must match.")
    jwt_leeway: float = Field(
        0.0, ge=0, le=300, description="Seconds of clock skew tolerated on 'exp' and 'nbf'."
    )
    anonymous: bool = Field(
        False,
        description="With auth on: a connection may skip auth and gets what rules grant 'anyone'.",
    )
    auth_timeout: float = Field(
        5.0, gt=0, description="Seconds a connection has to authenticate before 1008."
    )
    refresh_grace: float = Field(
        10.0, gt=0, description="Seconds after 'token_expired' to send a fresh token before 1008."
    )
    api_key: SecretStr | None = Field(
        None, description="When set, the HTTP API needs 'Authorization: Bearer <api_key>'."
    )
    api_key_file: str | None = Field(None, description="File holding api_key (read at start).")
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Origins a browser may connect from ('https://*.example.org' wildcards, "
        "'null'); empty: any.",
    )
    metrics_public: bool = Field(
        False, description="Serve /metrics without the API key even when api_key is set."
    )
    http_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host header values the HTTP API answers (DNS rebinding); empty: any.",
    )
    max_connections_per_user: int = Field(
        0, ge=0, description="Open connections per token subject, per process; 0: no limit."
    )
    max_connections_per_ip: int = Field(
        0, ge=0, description="Open connections per client address, per process; 0: no limit."
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or networks whose X-Forwarded-For names the client.",
    )

    # Delivery
    idempotency_window: float = Field(
        120.0, gt=0, description="Seconds a publish 'key' is remembered to drop a retry."
    )
    history_max_bytes: int = Field(
        64 * MiB,
        ge=0,
        description="Memory backplane: bytes of history kept in all, oldest dropped first.",
    )
    history_meta_ttl: float = Field(
        86400.0,
        gt=0,
        description="Seconds an idle channel keeps its offset and epoch after its last publish.",
    )
    canary_interval: float = Field(
        1.0, gt=0, le=60, description="Seconds between readiness canaries through the backplane."
    )
    canary_budget: float = Field(
        2.0, gt=0, le=60, description="Seconds a canary may take before /readyz turns 503."
    )
    drain_grace: float = Field(
        1.0, ge=0, le=60, description="Seconds after SIGTERM before connections are closed (1012)."
    )
    drain_spread: float = Field(
        3.0, ge=0, le=300, description="Seconds over which connections are closed with 1012."
    )

    # Channel rules ([[channels]] in the TOML file)
    channels: list[ChannelRule] = Field(
        default_factory=list,
        description="Channel rules, first match wins: pattern, subscribe, publish, history.",
    )

    @property
    def auth_required(self) -> bool:
        """Whether connections must authenticate (a key to verify tokens is configured)."""
        return self.jwt_secret is not None or self.jwt_public_key is not None

    @field_validator("jwt_algorithms")
    @classmethod
    def _known_algorithms(cls, algorithms: list[str] | None) -> list[str] | None:
        if algorithms is None:
            return None
        if not algorithms:
            raise ValueError("list at least one algorithm")
        for name in algorithms:
            if name.lower() == "none":
                raise ValueError("'none' is never accepted: unsigned tokens prove nothing")
            if name not in JWT_ALGORITHMS:
                raise ValueError(f"unknown algorithm {name!r} (one of {sorted(JWT_ALGORITHMS)})")
        return algorithms

    @field_validator("allowed_origins")
    @classmethod
    def _valid_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin == "null":
                continue
            match = _ORIGIN.fullmatch(origin.lower())
            host = match["host"] if match else ""
            if match is None or "*" in host.removeprefix("*."):
                raise ValueError(
                    f"origin {origin!r} must be 'scheme://host[:port]' (a leading '*.' "
                    "wildcard allowed) or 'null', with no path"
                )
        return origins

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_networks(cls, networks: list[str]) -> list[str]:
        for network in networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not an IP address or network") from None
        return networks

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.workers > 1 and self.backplane == "memory":
            raise ValueError(
                "workers > 1 needs backplane = 'redis': with the memory backplane, "
                "workers would not see each other's messages"
            )
        if self.workers > 1 and (self.port == 0 or self.http_port == 0):
            raise ValueError("workers > 1 needs fixed ports: port and http_port must not be 0")
        same_port = self.port != 0 and self.port == self.http_port
        if same_port and _same_address(self.host, self.http_host):
            # Bound with SO_REUSEPORT (workers), both servers would share the port
            # and the kernel would hand each connection to either one at random.
            raise ValueError(
                f"port and http_port are both {self.port}: the WebSocket and service "
                "ports must differ"
            )
        if self.max_data_bytes >= self.max_frame_bytes:
            raise ValueError("max_data_bytes must be smaller than max_frame_bytes")
        if self.jwt_secret is not None and not self.jwt_secret.get_secret_value():
            raise ValueError("jwt_secret must not be empty")
        if self.api_key is not None and not self.api_key.get_secret_value():
            raise ValueError("api_key must not be empty")
        return self


def _same_address(a: str, b: str) -> bool:
    """Whether listening on hosts ``a`` and ``b`` could take the same connections."""
    wildcard = {"", "0.0.0.0", "::"}
    return a == b or a in wildcard or b in wildcard
