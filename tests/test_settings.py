"""Configuration: defaults, TOML file, environment, command line, and their errors."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from broker.config import default_config_path, load, unknown_variables
from broker.exceptions import ConfigError
from broker.settings import ChannelRule, Settings
from broker.workers import worker_environment


def _write(tmp_path: Path, text: str, name: str = "broker.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    settings = load(env={})
    assert settings == Settings()
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert (settings.http_host, settings.http_port) == ("127.0.0.1", 8001)
    assert settings.backplane == "memory"
    assert settings.max_frame_bytes == 1024 * 1024
    assert settings.max_data_bytes == 64 * 1024
    assert settings.max_backlog_bytes == 4 * 1024 * 1024
    assert settings.rate_limit == 0.0
    assert (settings.error_limit, settings.error_window) == (50, 10.0)
    assert settings.workers == 1


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.port = 1  # type: ignore[misc]


def test_load_ignores_the_process_environment_when_given_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BROKER_PORT", "1234")
    assert load(env={}).port == 8000
    assert load().port == 1234  # and reads os.environ by default


def test_environment_overrides_defaults() -> None:
    settings = load(
        env={
            "BROKER_PORT": "9000",
            "BROKER_DEMO": "false",
            "BROKER_RATE_LIMIT": "2.5",
            "BROKER_BACKPLANE": "redis",
            "BROKER_LOG_LEVEL": "debug",
            "BROKER_TOKEN": "for the client commands, not a setting",
            "PORT": "1",  # no prefix: not ours
        }
    )
    assert settings.port == 9000
    assert settings.demo is False
    assert settings.rate_limit == 2.5
    assert settings.backplane == "redis"
    assert settings.log_level == "debug"


def test_a_mistyped_environment_variable_is_reported_with_a_suggestion() -> None:
    env = {"BROKER_PORTT": "9000", "BROKER_NOT_A_SETTING": "x", "BROKER_PORT": "1"}
    assert load(env=env).port == 1  # reported, not fatal: other tools use the prefix too
    assert unknown_variables(env) == [
        "environment variable BROKER_NOT_A_SETTING is not a setting; ignored",
        "environment variable BROKER_PORTT is not a setting; ignored (did you mean BROKER_PORT?)",
    ]
    assert unknown_variables({"BROKER_TOKEN": "t", "BROKER_CONFIG": "f"}) == []


def test_list_settings_from_the_environment_as_json_or_commas() -> None:
    settings = load(
        env={
            "BROKER_ALLOWED_ORIGINS": "https://a.example, https://*.b.example",
            "BROKER_TRUSTED_PROXIES": '["10.0.0.0/8", "127.0.0.1"]',
        }
    )
    assert settings.allowed_origins == ["https://a.example", "https://*.b.example"]
    assert settings.trusted_proxies == ["10.0.0.0/8", "127.0.0.1"]


def test_secrets_come_from_files_and_are_never_echoed(tmp_path: Path) -> None:
    secret = _write(tmp_path, "s" * 40 + "\n", "jwt.secret")
    settings = load(env={"BROKER_JWT_SECRET_FILE": str(secret)})
    assert settings.jwt_secret is not None
    assert settings.jwt_secret.get_secret_value() == "s" * 40  # the final newline dropped
    assert "s" * 40 not in repr(settings)
    with pytest.raises(ConfigError, match="give jwt_secret or jwt_secret_file, not both"):
        load(env={"BROKER_JWT_SECRET_FILE": str(secret), "BROKER_JWT_SECRET": "x" * 40})
    with pytest.raises(ConfigError, match="jwt_secret_file"):
        load(env={"BROKER_JWT_SECRET_FILE": str(tmp_path / "missing")})
    path = _write(tmp_path, "[auth]\njwt_secret = 12345\n")
    with pytest.raises(ConfigError) as refused:
        load(path, env={})
    assert "jwt_secret" in str(refused.value) and "12345" not in str(refused.value)


def test_auth_and_channel_rules_from_the_contract_example(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
[auth]
jwt_secret = "0123456789abcdef0123456789abcdef"
jwt_algorithms = ["HS256"]
jwt_audience = "broker"
jwt_leeway = 0
anonymous = false
api_key = "k"
allowed_origins = ["https://dash.example.com", "https://*.example.org"]

[[channels]]
pattern = "sensors.>"
subscribe = "token"
publish = "token"
history_size = 100
history_ttl = 300

[[channels]]
pattern = "user.{sub}.>"
""",
    )
    settings = load(path, env={})
    assert settings.auth_required and settings.jwt_audience == "broker"
    assert [rule.pattern for rule in settings.channels] == ["sensors.>", "user.{sub}.>"]
    assert settings.channels[0].history_size == 100 and settings.channels[1].history_size == 0
    assert settings.channels[1].subscribe is None  # the default applies


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ('[auth]\njwt_algorithms = ["none"]', "'none' is never accepted"),
        ('[auth]\njwt_algorithms = ["HS999"]', "unknown algorithm"),
        ('[auth]\nallowed_origins = ["https://a.example/path"]', "must be 'scheme://host"),
        ('[auth]\ntrusted_proxies = ["not an ip"]', "not an IP address"),
        ('[[channels]]\npattern = "a..b"', "channels[0]"),
        ('[[channels]]\npattern = "a"\nsubscribe = "everyone"', "channels[0][subscribe]"),
        ('[[channels]]\npattern = "a"\nhistory_size = -1', "history_size"),
        ('[[channels]]\npattern = "a"\ntypo = 1', "typo"),
    ],
)
def test_bad_auth_and_rule_settings_are_refused(tmp_path: Path, toml: str, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        load(_write(tmp_path, toml), env={})


def test_flat_toml_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 'port = 9100\nhost = "127.0.0.1"\ncompression = true\n')
    settings = load(path, env={})
    assert (settings.port, settings.host, settings.compression) == (9100, "127.0.0.1", True)
    assert settings.http_port == 8001  # untouched: the default


def test_grouped_toml_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        [listeners]
        port = 9200
        [limits]
        max_subscriptions = 5
        error_window = 2.5
        [features]
        demo = false
        """.replace("        ", ""),
    )
    settings = load(path, env={})
    assert (settings.port, settings.max_subscriptions) == (9200, 5)
    assert (settings.error_window, settings.demo) == (2.5, False)


def test_config_file_from_broker_config_variable(tmp_path: Path) -> None:
    path = _write(tmp_path, "port = 9300\n")
    assert load(env={"BROKER_CONFIG": str(path)}).port == 9300
    # An explicit file wins over the variable.
    other = _write(tmp_path, "port = 9301\n", "other.toml")
    assert load(other, env={"BROKER_CONFIG": str(path)}).port == 9301


def test_precedence_file_then_environment_then_command_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "port = 1001\nhttp_port = 1002\nmax_connections = 1003\n")
    env = {"BROKER_PORT": "2001", "BROKER_HTTP_PORT": "2002"}
    settings = load(path, env=env, overrides={"port": 3001})
    assert settings.port == 3001  # command line beats environment and file
    assert settings.http_port == 2002  # environment beats file
    assert settings.max_connections == 1003  # file beats default
    assert settings.max_subscriptions == 1000  # default


def test_command_line_none_means_not_given() -> None:
    settings = load(env={"BROKER_PORT": "2001"}, overrides={"port": None, "demo": None})
    assert settings.port == 2001
    assert settings.demo is True


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("file", "setting 'port' (from config file "),
        ("env", "setting 'port' (from environment BROKER_PORT)"),
        ("cli", "setting 'port' (from command line --port)"),
    ],
)
def test_bad_value_names_the_setting_and_where_it_came_from(
    tmp_path: Path, source: str, words: str
) -> None:
    path = _write(tmp_path, "port = 1\n" if source != "file" else 'port = "abc"\n')
    env = {"BROKER_PORT": "abc"} if source == "env" else {}
    overrides: dict[str, Any] = {"port": "abc"} if source == "cli" else {}
    with pytest.raises(ConfigError) as caught:
        load(path, env=env, overrides=overrides)
    message = str(caught.value)
    assert words in message
    assert "'abc'" in message  # the offending value


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"BROKER_PORT": "70000"}, "port"),
        ({"BROKER_PORT": "-1"}, "port"),
        ({"BROKER_HTTP_PORT": "x"}, "http_port"),
        ({"BROKER_BACKPLANE": "kafka"}, "backplane"),
        ({"BROKER_MAX_FRAME_BYTES": "100"}, "max_frame_bytes"),
        ({"BROKER_MAX_DATA_BYTES": "0"}, "max_data_bytes"),
        ({"BROKER_MAX_SUBSCRIPTIONS": "0"}, "max_subscriptions"),
        ({"BROKER_MAX_CONNECTIONS": "0"}, "max_connections"),
        ({"BROKER_MAX_BACKLOG_BYTES": "10"}, "max_backlog_bytes"),
        ({"BROKER_RATE_LIMIT": "-1"}, "rate_limit"),
        ({"BROKER_RATE_BURST": "0"}, "rate_burst"),
        ({"BROKER_ERROR_LIMIT": "0"}, "error_limit"),
        ({"BROKER_ERROR_WINDOW": "0"}, "error_window"),
        ({"BROKER_PING_INTERVAL": "0"}, "ping_interval"),
        ({"BROKER_REDIS_TIMEOUT": "0"}, "redis_timeout"),
        ({"BROKER_COMPRESSION": "maybe"}, "compression"),
        ({"BROKER_WORKERS": "0"}, "workers"),
        ({"BROKER_LOG_LEVEL": "loud"}, "log_level"),
        ({"BROKER_LOG_FORMAT": "xml"}, "log_format"),
    ],
)
def test_out_of_range_values_are_refused(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(env=env)
    var = "BROKER_" + setting.upper()
    assert f"setting '{setting}' (from environment {var})" in str(caught.value)


def test_unknown_setting_in_file_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "[limits]\nmax_conections = 5\n")
    with pytest.raises(ConfigError) as caught:
        load(path, env={})
    assert "unknown setting 'max_conections'" in str(caught.value)
    assert f"config file {path}" in str(caught.value)


def test_unknown_setting_on_command_line_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        load(env={}, overrides={"colour": "blue"})


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"config file {missing}"):
        load(missing, env={})


def test_invalid_toml(tmp_path: Path) -> None:
    path = _write(tmp_path, "port = = 3\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load(path, env={})


def test_workers_need_the_redis_backplane() -> None:
    with pytest.raises(ConfigError, match="workers > 1 needs backplane = 'redis'"):
        load(env={"BROKER_WORKERS": "2"})
    with pytest.raises(ConfigError, match="workers"):
        load(env={}, overrides={"workers": 4, "backplane": "memory"})
    settings = load(env={}, overrides={"workers": 4, "backplane": "redis"})
    assert (settings.workers, settings.backplane) == (4, "redis")


def test_workers_need_fixed_ports() -> None:
    with pytest.raises(ConfigError, match="fixed ports"):
        load(env={}, overrides={"workers": 2, "backplane": "redis", "port": 0})
    with pytest.raises(ConfigError, match="fixed ports"):
        load(env={}, overrides={"workers": 2, "backplane": "redis", "http_port": 0})


def test_websocket_and_service_ports_must_differ() -> None:
    with pytest.raises(ConfigError, match="port and http_port are both 9000"):
        load(env={}, overrides={"port": 9000, "http_port": 9000})
    with pytest.raises(ConfigError, match="must differ"):
        load(env={}, overrides={"port": 9000, "http_port": 9000, "http_host": "0.0.0.0"})
    # Different addresses may share a number; 0 means "any free port" for both.
    apart = {"host": "127.0.0.1", "http_host": "127.0.0.2"}
    settings = load(env={}, overrides={"port": 9000, "http_port": 9000, **apart})
    assert (settings.host, settings.http_host) == ("127.0.0.1", "127.0.0.2")
    assert load(env={}, overrides={"port": 0, "http_port": 0}).port == 0


def test_data_cap_must_be_below_frame_cap() -> None:
    with pytest.raises(ConfigError, match="max_data_bytes must be smaller than max_frame_bytes"):
        load(env={"BROKER_MAX_FRAME_BYTES": "65536"})
    settings = load(env={"BROKER_MAX_FRAME_BYTES": "65537"})
    assert settings.max_data_bytes < settings.max_frame_bytes


# --- the documented default configuration -------------------------------------------


def _flatten(table: dict[str, Any], seen: dict[str, str], where: str = "") -> None:
    for key, value in table.items():
        if isinstance(value, dict):
            _flatten(value, seen, f"{where}[{key}]")
        else:
            assert key not in seen, f"{key} is listed twice: in {seen[key]} and {where or 'top'}"
            seen[key] = where or "top"


def test_default_config_file_lists_every_setting_with_its_default() -> None:
    path = default_config_path()
    assert path == Path(__file__).resolve().parent.parent / "config" / "broker.toml"
    assert path.is_file(), f"{path} is missing"
    with path.open("rb") as fh:
        document = tomllib.load(fh)
    seen: dict[str, str] = {}
    _flatten(document, seen)
    # TOML has no null: a setting that is unset by default is shown commented out.
    unset = {name for name, field in Settings.model_fields.items() if field.default is None}
    text = path.read_text(encoding="utf-8")
    for name in sorted(unset):
        assert f"\n# {name} = " in text, f"{name} (unset by default) is not shown commented"
    fields = set(Settings.model_fields) - unset
    assert sorted(fields - set(seen)) == [], "settings missing from config/broker.toml"
    assert sorted(set(seen) - fields) == [], "config/broker.toml lists unknown settings"
    # Loaded as a config file, it must give exactly the built-in defaults.
    assert load(path, env={}) == Settings()
    # And value by value, for a readable failure.
    flat: dict[str, Any] = {}
    _collect(document, flat)
    for name, field in Settings.model_fields.items():
        if name in unset:
            continue
        default = field.get_default(call_default_factory=True)
        assert flat[name] == default, f"{name}: file {flat[name]!r} != {default!r}"
        assert type(flat[name]) is type(default), f"{name}: written with the wrong type"


def _collect(table: dict[str, Any], into: dict[str, Any]) -> None:
    for key, value in table.items():
        if isinstance(value, dict):
            _collect(value, into)
        else:
            into[key] = value


def test_every_setting_documents_itself() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no description"


def test_a_setting_given_twice_in_the_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "twice.toml"
    path.write_text("port = 1\n[listeners]\nport = 2\n")
    with pytest.raises(ConfigError, match="'port' is given twice"):
        load(path, env={})


def test_the_configuration_reference_documents_every_setting() -> None:
    reference = (default_config_path().parent.parent / "docs" / "configuration.md").read_text()
    for name in Settings.model_fields:
        assert f"| `{name}` | `BROKER_{name.upper()}` |" in reference, name


def test_the_configuration_reference_documents_every_rule_field() -> None:
    reference = (default_config_path().parent.parent / "docs" / "configuration.md").read_text()
    for name in ChannelRule.model_fields:
        assert f"| `{name}` |" in reference, name


def test_workers_get_the_resolved_settings_secrets_and_rules_included(tmp_path: Path) -> None:
    secret_file = _write(tmp_path, "a-secret-read-from-a-file-0123456789\n", "jwt.secret")
    config = _write(
        tmp_path,
        f'jwt_secret_file = "{secret_file}"\napi_key = "key-0123456789abcdef"\n'
        '[[channels]]\npattern = "user.{sub}.>"\nsubscribe = "token"\nhistory_size = 5\n',
    )
    parent = load(config, env={"BROKER_PORT": "9100", "BROKER_PATH": "/usr/bin"})
    env = worker_environment(parent, 1)
    # The worker reads exactly what the supervisor resolved, not its own BROKER_* variables.
    assert not any(k.startswith("BROKER_") and k != "BROKER_WORKER_CONFIG" for k in env)
    worker = load(env={**env, "BROKER_PORT": "1"})
    assert worker.port == 9100 and worker.workers == 1 and worker.reuse_port
    assert worker.worker_index == 1
    assert worker.jwt_secret is not None and parent.jwt_secret is not None
    assert worker.jwt_secret.get_secret_value() == "a-secret-read-from-a-file-0123456789"
    assert (
        worker.api_key is not None and worker.api_key.get_secret_value() == "key-0123456789abcdef"
    )
    assert worker.channels == parent.channels
    # Shown nowhere: the settings' own text masks them.
    assert "a-secret-read" not in repr(worker) and "key-0123" not in repr(worker)
