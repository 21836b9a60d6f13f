"""The ``broker`` command as users run it: real processes, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from broker.frames import SERVER_FRAME
from tests.backplane_support import real_redis_url
from tests.brokerproc import REPO, BrokerProcess, free_port, http_get
from tests.wait import until, within

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
        taken = f"127.0.0.1:{running.port}"
        ports = ("--host", "127.0.0.1", "--port", str(running.port))
        ports += ("--http-port", str(free_port()), "--log-level", "info", "--log-format", "text")
        result = run_cli("serve", *ports)
        workers = run_cli(
            "serve",
            *ports,
            "--workers",
            "2",
            "--backplane",
            "redis",
            "--redis-url",
            real_redis_url(),
        )
    for failed in (result, workers):
        assert failed.returncode == 1
        assert "cannot serve" in failed.stderr and "Traceback" not in failed.stderr
        assert "broker stopped" not in failed.stderr  # it never served: no "0 connections served"
    # Both say which address is taken.
    assert "127.0.0.1" in result.stderr and str(running.port) in result.stderr
    assert f"cannot bind {taken}: Address already in use" in workers.stderr


def test_the_demo_publisher_stops_on_sigterm_with_a_summary() -> None:
    with BrokerProcess() as running:
        publisher = subprocess.Popen(
            [
                *(sys.executable, str(REPO / "examples" / "demo_publisher.py")),
                *("--url", running.ws_url, "--interval", "0.05", "--duration", "30"),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(1.5)
            publisher.send_signal(signal.SIGTERM)
            _, err = publisher.communicate(timeout=10)
        finally:
            publisher.kill()
    assert publisher.returncode == 0, err
    summary = re.search(r"demo_publisher: (\d+) messages published, 0 not published", err)
    assert summary is not None and int(summary.group(1)) > 0, err


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


async def test_sigint_closes_clients_with_1001_and_exits_0() -> None:
    broker = BrokerProcess()
    await broker.astart()
    try:
        async with connect(broker.ws_url) as ws:
            await ws.send('{"op":"subscribe","id":1,"channel":"x"}')
            assert SERVER_FRAME.validate_json(await within(ws.recv())).op == "ok"
            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGINT)
            with pytest.raises(ConnectionClosed) as closed:
                await within(ws.recv(), 10)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1001
        # Let it exit by itself: astop() would send a second SIGTERM, which kills the
        # process if it lands after app.run removed its handlers, before the exit.
        await until(lambda: not broker.running, 10)
        code = await broker.astop()
        assert code == 0
        log = broker.log_text()
        assert "shutting down: 1 connection open" in log
        assert "broker stopped" in log
    finally:
        await broker.astop()


async def test_sigterm_drains_with_1012_spread_out_and_exits_0_in_time() -> None:
    """The contract's "Restarts without loss" (docs/operations.md), at the defaults.

    Grace 1 s, spread 3 s.
    """
    broker = BrokerProcess()
    await broker.astart()
    try:
        clients = [await connect(broker.ws_url) for _ in range(30)]
        for ws in clients:
            await ws.send('{"op":"ping","id":1}')
            await within(ws.recv())
        assert broker.pid is not None
        signalled = asyncio.get_running_loop().time()
        os.kill(broker.pid, signal.SIGTERM)
        # At once: not ready, and new handshakes refused with 503; the HTTP port answers.
        status, _ = await asyncio.to_thread(http_get, f"{broker.http_url}/readyz")
        assert status == 503
        with pytest.raises(InvalidStatus) as refused:
            await connect(broker.ws_url)
        assert refused.value.response.status_code == 503

        async def closed_at(ws: ClientConnection) -> tuple[float, int | None]:
            with pytest.raises(ConnectionClosed) as closed:
                await within(ws.recv(), 10)
            frame = closed.value.rcvd
            return asyncio.get_running_loop().time() - signalled, frame and frame.code

        results = await asyncio.gather(*(closed_at(ws) for ws in clients))
        times = sorted(t for t, _ in results)
        assert {code for _, code in results} == {1012}
        assert times[0] >= 0.9  # the grace, for load balancers to notice
        assert times[-1] - times[0] >= 1.5  # spread out, not all at once
        assert times[-1] < 5.5
        code = await broker.astop(timeout=10)
        assert code == 0
        assert asyncio.get_running_loop().time() - signalled < 10
    finally:
        await broker.astop()


def test_the_ws_port_answers_healthz_for_load_balancers() -> None:
    with BrokerProcess() as broker:
        status, body = http_get(f"{broker.base_url}/healthz")
        assert (status, body) == (200, b"ok\n")
        status, _ = http_get(f"{broker.http_url}/readyz")
        assert status == 200


async def test_token_key_and_gap_lines_of_the_client_commands(tmp_path: Path) -> None:
    secret = "a-cli-test-secret-of-at-least-32-bytes"
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[auth]\njwt_secret = "{secret}"\n\n'
        '[[channels]]\npattern = "cli.h.>"\nhistory_size = 10\n',
        encoding="utf-8",
    )
    claims = {"sub": "cli", "exp": int(time.time() + 600), "subscribe": [">"], "publish": [">"]}
    token = jwt.encode(claims, secret, algorithm="HS256")
    broker = BrokerProcess("--config", str(config), log_level="warning")
    await broker.astart()
    sub = await asyncio.create_subprocess_exec(
        *BROKER,
        "subscribe",
        "cli.h.a",
        "--url",
        broker.ws_url,
        "--count",
        "2",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "BROKER_TOKEN": token},
    )
    try:
        assert sub.stdout is not None and sub.stderr is not None
        refused = await asyncio.to_thread(
            run_cli, "publish", "cli.h.a", "0", "--url", broker.ws_url
        )
        assert refused.returncode == 1 and "unauthorized" in refused.stderr

        async def publish(key: str) -> subprocess.CompletedProcess[str]:
            return await asyncio.to_thread(
                run_cli, "publish", "cli.h.a", '"once"', "--url", broker.ws_url,
                "--token", token, "--key", key,
            )  # fmt: skip

        # The subscriber may not have subscribed yet: publish until it prints.
        line = asyncio.create_task(sub.stdout.readline())
        for attempt in range(50):
            published = await publish(f"k-{attempt}")
            assert published.returncode == 0, published.stderr
            if (await asyncio.wait({line}, timeout=0.2))[0]:
                break
        assert orjson.loads(await within(line)) == {"channel": "cli.h.a", "data": "once"}
        again = await publish(f"k-{attempt}")
        assert again.returncode == 0 and "already published" in again.stderr

        # A restart loses the memory backplane's history: the channel's epoch
        # changes, so the subscriber cannot recover and says so on stderr.
        await broker.arestart(kill=True)
        warning = await within(sub.stderr.readline(), 20)
        assert b"gap on cli.h.a (epoch_changed)" in warning, warning
        line = asyncio.create_task(sub.stdout.readline())
        for attempt in range(50, 100):
            assert (await publish(f"k-{attempt}")).returncode == 0
            if (await asyncio.wait({line}, timeout=0.2))[0]:
                break
        assert orjson.loads(await within(line))["data"] == "once"
        assert await within(sub.wait(), 10) == 0
    finally:
        if sub.returncode is None:
            sub.kill()
            await sub.wait()
        await broker.astop()
