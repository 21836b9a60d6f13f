"""Configuration: one frozen object, read in one place.

Precedence, lowest first: defaults in this file (mirrored, with comments, in
``config/broker.toml``), a TOML file (``--config`` or ``BROKER_CONFIG``),
``BROKER_*`` environment variables, then command-line flags. Everything is
validated before the broker starts; a bad value raises ``ConfigError`` whose
text names the setting and where it came from.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from broker.exceptions import ConfigError

ENV_PREFIX = "BROKER_"
KiB = 1024
MiB = 1024 * KiB


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
        8001, ge=0, le=65535, description="Service HTTP API port (0: any free port)."
    )

    # Backplane
    backplane: Literal["memory", "redis"] = Field(
        "memory", description="'memory' for one process, 'redis' to scale out."
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="redis://, rediss:// (TLS); credentials may be in the URL.",
    )
    redis_prefix: str = Field(
        "broker.", description="Prefix of every Redis channel this broker uses."
    )
    redis_timeout: float = Field(
        1.0, gt=0, le=60, description="Seconds before a Redis command counts as failed."
    )
    redis_reconnect_max: float = Field(
        5.0, gt=0, le=300, description="Cap, in seconds, of the backoff between reconnects."
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
    max_connections: int = Field(
        10000, ge=1, description="Open WebSocket connections per process (limit_exceeded)."
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
    uvloop: bool = Field(False, description="Run on uvloop when it is installed.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Least severe level that is logged."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="'json': one JSON object per line; 'text': human readable."
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.workers > 1 and self.backplane == "memory":
            raise ValueError(
                "workers > 1 needs backplane = 'redis': with the memory backplane, "
                "workers would not see each other's messages"
            )
        if self.workers > 1 and (self.port == 0 or self.http_port == 0):
            raise ValueError("workers > 1 needs fixed ports: port and http_port must not be 0")
        if self.max_data_bytes >= self.max_frame_bytes:
            raise ValueError("max_data_bytes must be smaller than max_frame_bytes")
        return self


def load(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from a TOML file, the environment and explicit overrides.

    ``config_file`` defaults to ``$BROKER_CONFIG`` when set. Raises ``ConfigError``.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}

    path = config_file if config_file is not None else env.get(f"{ENV_PREFIX}CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
        for key, value in _flatten(data).items():
            values[key] = value
            origin[key] = f"config file {path}"

    fields = Settings.model_fields
    for name in fields:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = raw
            origin[name] = f"environment {ENV_PREFIX}{name.upper()}"

    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
            origin[name] = f"command line --{name.replace('_', '-')}"

    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    """Accept settings at the top level or grouped in ``[tables]``; names are unique.

    The table names are only for readers (``config/broker.toml`` groups by
    topic); a setting given twice is an error rather than a silent override.
    """
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            nested = _flatten(value)
            for name in nested:
                if name in flat:
                    raise ConfigError(f"setting '{name}' is given twice in the config file")
            flat.update(nested)
        elif key in flat:
            raise ConfigError(f"setting '{key}' is given twice in the config file")
        else:
            flat[key] = value
    return flat


def _describe(exc: ValidationError, origin: Mapping[str, str]) -> str:
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    if not loc:
        return f"invalid configuration: {error['msg'].removeprefix('Value error, ')}"
    name = loc[0]
    where = origin.get(name, "default")
    if error["type"] == "extra_forbidden":
        return f"unknown setting '{name}' (from {where})"
    return f"setting '{name}' (from {where}): {error['msg']}, got {error.get('input')!r}"


def default_config_path() -> Path:
    """Where the documented default configuration lives in a source checkout."""
    return Path(__file__).resolve().parent.parent / "config" / "broker.toml"
