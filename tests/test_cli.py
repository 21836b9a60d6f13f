"""The ``broker`` command as users run it: real processes, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from broker.frames import SERVER_FRAME
from tests.brokerproc import REPO, BrokerProcess, free_port, http_get
from tests.wait import within

BROKER = [sys.executable, "-m", "broker"]


def run_cli(*args: str, timeout: float = 20.0, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BROKER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **env},
        check=False,
    )


def test_schema_describes_every_frame() -> None:
    result = run_cli("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    defs = schema["$defs"]
    for name in ("Subscribe", "Unsubscribe", "Publish", "Ping", "Ok", "Pong", "Error", "Message"):
        assert name in defs, name
    assert defs["Subscribe"]["additionalProperties"] is False
    assert set(defs["Error"]["properties"]["code"]["enum"]) >= {"bad_frame", "internal"}


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--port", "x"], {}, "setting 'port' (from command line --port)"),
        (["--port", "70000"], {}, "setting 'port' (from command line --port)"),
        ([], {"BROKER_PORT": "abc"}, "setting 'port' (from environment BROKER_PORT)"),
        ([], {"BROKER_MAX_DATA_BYTES": "0"}, "setting 'max_data_bytes'"),
        (["--workers", "2"], {}, "workers > 1 needs backplane = 'redis'"),
        (["--config", "/nonexistent.toml"], {}, "config file /nonexistent.toml"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(
    args: list[str], env: dict[str, str], needle: str
) -> None:
    result = run_cli("serve", *args, **env)
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_port_in_use_is_one_line_and_exit_1() -> None:
    with BrokerProcess() as running:
        result = run_cli(
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(running.port),
            "--http-port",
            str(free_port()),
            "--log-level",
            "error",
        )
    assert result.returncode == 1
    assert "cannot serve" in result.stderr and "Traceback" not in result.stderr


async def test_publish_and_subscribe_commands_across_a_restart() -> None:
    broker = BrokerProcess()
    await broker.astart()
    sub = await asyncio.create_subprocess_exec(
        *BROKER,
        "subscribe",
        "cli.>",
        "cli.*",
        "--url",
        broker.ws_url,
        "--count",
        "2",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert sub.stdout is not None and sub.stderr is not None

        async def publish_until_printed(key: str) -> Any:
            """Publish with the CLI until the subscriber prints a line (it may not
            have (re)subscribed yet); return that line, parsed."""
            line = asyncio.create_task(sub.stdout.readline())
            for attempt in range(50):
                published = await asyncio.to_thread(
                    run_cli, "publish", "cli.a", f'{{"{key}": {attempt}}}', "--url", broker.ws_url
                )
                assert published.returncode == 0, published.stderr
                done, _ = await asyncio.wait({line}, timeout=0.2)
                if done:
                    break
            return orjson.loads(await within(line))

        first = await publish_until_printed("n")
        assert first["channel"] == "cli.a" and "n" in first["data"]
        await broker.arestart(kill=True)
        # Across the restart, `broker subscribe` reconnects and says a gap may exist.
        warning = await within(sub.stderr.readline(), 20)
        assert b"reconnected" in warning
        assert "after" in (await publish_until_printed("after"))["data"]
        assert await within(sub.wait(), 10) == 0  # --count 2 reached
    finally:
        if sub.returncode is None:
            sub.kill()
            await sub.wait()
        await broker.astop()


def test_publish_errors_exit_1_with_the_code() -> None:
    with BrokerProcess() as broker:
        bad = run_cli("publish", "a.*", "1", "--url", broker.ws_url)
        assert bad.returncode == 1 and "bad_channel" in bad.stderr
        notjson = run_cli("publish", "a", "{nope", "--url", broker.ws_url)
        assert notjson.returncode == 2 and "not valid JSON" in notjson.stderr
    unreachable = run_cli("publish", "a", "1", "--url", f"ws://127.0.0.1:{free_port()}/ws")
    assert unreachable.returncode == 1 and "cannot connect" in unreachable.stderr


async def test_sigterm_closes_clients_with_1001_and_exits_0() -> None:
    broker = BrokerProcess()
    await broker.astart()
    try:
        async with connect(broker.ws_url) as ws:
            await ws.send('{"op":"subscribe","id":1,"channel":"x"}')
            assert SERVER_FRAME.validate_json(await within(ws.recv())).op == "ok"
            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                await within(ws.recv(), 10)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1001
        code = await broker.astop()
        assert code == 0
        log = broker.log_text()
        assert "shutting down: 1 connections open" in log
        assert "broker stopped" in log
    finally:
        await broker.astop()


def test_the_ws_port_answers_healthz_for_load_balancers() -> None:
    with BrokerProcess() as broker:
        status, body = http_get(f"{broker.base_url}/healthz")
        assert (status, body) == (200, b"ok\n")
        status, _ = http_get(f"{broker.http_url}/readyz")
        assert status == 200
