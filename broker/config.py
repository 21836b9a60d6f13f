"""Reading the configuration: a TOML file, ``BROKER_*`` variables, flags.

Precedence, lowest first: the defaults of ``broker.settings.Settings``
(mirrored, with comments, in ``config/broker.toml``), a TOML file
(``--config`` or ``BROKER_CONFIG``), ``BROKER_*`` environment variables, then
command-line flags. Everything is validated before the broker starts; a bad
value raises ``ConfigError`` whose text names the setting and where it came
from. The only module that reads files and the environment for settings.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from broker.exceptions import ConfigError
from broker.settings import ENV_PREFIX, Settings

__all__ = [
    "ENV_NOT_SETTINGS",
    "SECRETS",
    "WORKER_CONFIG",
    "default_config_path",
    "load",
    "unknown_variables",
    "worker_config_json",
]

#: The resolved settings of a worker, as JSON, set by the worker supervisor.
WORKER_CONFIG = ENV_PREFIX + "WORKER_CONFIG"
#: ``BROKER_*`` variables that are not settings (read elsewhere, or by the CLI's clients).
ENV_NOT_SETTINGS = {ENV_PREFIX + "CONFIG", ENV_PREFIX + "TOKEN", ENV_PREFIX + "URL", WORKER_CONFIG}
#: Settings whose values are never shown in an error or a log line.
SECRETS = {"jwt_secret", "api_key"}
#: Settings that name a file whose content is another setting's value.
_SECRET_FILES = {"jwt_secret_file": "jwt_secret", "api_key_file": "api_key"}


def load(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from a TOML file, the environment and explicit overrides.

    ``config_file`` defaults to ``$BROKER_CONFIG`` when set. Raises ``ConfigError``.
    """
    env = os.environ if env is None else env
    worker = env.get(WORKER_CONFIG)
    if worker:
        # A worker of ``--workers N``: exactly what its supervisor resolved.
        return Settings.model_validate_json(worker)
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
    for name, field in fields.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _from_environment(raw, field.annotation)
            origin[name] = f"environment {ENV_PREFIX}{name.upper()}"

    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
            origin[name] = f"command line --{name.replace('_', '-')}"

    for file_setting, secret in _SECRET_FILES.items():
        file_name = values.get(file_setting)
        if file_name is None:
            continue
        if values.get(secret) is not None:
            raise ConfigError(f"give {secret} or {file_setting}, not both")
        try:
            with open(file_name, encoding="utf-8") as fh:
                values[secret] = fh.read().removesuffix("\n").removesuffix("\r")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"setting '{file_setting}' ({file_name}): {reason}") from None
        origin[secret] = f"{origin.get(file_setting, 'default')} via {file_setting}"

    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None


def unknown_variables(env: Mapping[str, str] | None = None) -> list[str]:
    """One line for each ``BROKER_*`` variable that is not a setting (a typo, most likely).

    Reported as warnings at start rather than refused: other tools use the
    prefix too (Celery's ``BROKER_URL``), and a broker must not refuse to
    start because of a neighbour's variable.
    """
    env = os.environ if env is None else env
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | ENV_NOT_SETTINGS
    lines = []
    for variable in sorted(env):
        if variable.startswith(ENV_PREFIX) and variable not in known:
            close = difflib.get_close_matches(variable, sorted(known), n=1, cutoff=0.85)
            hint = f" (did you mean {close[0]}?)" if close else ""
            lines.append(f"environment variable {variable} is not a setting; ignored{hint}")
    return lines


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
        if len(loc) > 1:
            inside = name + "".join(f"[{part}]" for part in loc[1:-1])
            return f"unknown field '{loc[-1]}' in {inside} (from {where})"
        return f"unknown setting '{name}' (from {where})"
    if name in SECRETS:
        return f"setting '{name}' (from {where}): {error['msg']}"  # never echo a secret
    detail = "".join(f"[{part}]" for part in loc[1:])
    return f"setting '{name}{detail}' (from {where}): {error['msg']}, got {error.get('input')!r}"


def _from_environment(raw: str, annotation: Any) -> Any:
    """A list setting from the environment: JSON (``["a", "b"]``) or ``a,b``."""
    if "list" not in str(annotation):
        return raw
    text = raw.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return raw  # validation says what is wrong
    return [item.strip() for item in text.split(",") if item.strip()]


def default_config_path() -> Path:
    """Where the documented default configuration lives in a source checkout."""
    return Path(__file__).resolve().parent.parent / "config" / "broker.toml"


def worker_config_json(settings: Settings) -> str:
    """``settings`` as the JSON a worker reads back with ``load`` (secrets included).

    Only for a child's environment, which only its own user can read: never log it.
    """
    values = settings.model_dump(mode="json")
    for name in SECRETS:
        secret = getattr(settings, name)
        values[name] = None if secret is None else secret.get_secret_value()
    # The file settings were already read into their secrets.
    for file_setting in _SECRET_FILES:
        values[file_setting] = None
    return json.dumps(values)
