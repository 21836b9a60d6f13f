"""What an operator sees: the connection limit and its log line, the listen backlog,
the periodic summary instead of a line per connection.

In-process brokers on the memory backplane; the kernel's view of the listening
sockets comes from ``ss`` (iproute2).
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import subprocess

import pytest
from websockets.asyncio.client import connect

from broker.limits import default_max_connections, open_files_limit
from tests.inproc import running_broker
from tests.wait import until


def test_the_default_connection_limit_leaves_a_reserve_of_open_files() -> None:
    assert default_max_connections(20_000) == 19_000  # 5 %
    assert default_max_connections(1024) == 924  # at least 100
    assert default_max_connections(50) == 1  # never zero


async def test_the_limit_is_derived_from_the_open_files_limit_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="broker"):
        async with running_broker() as broker:
            assert broker.node.max_connections == default_max_connections()
        async with running_broker(max_connections=7) as broker:
            assert broker.node.max_connections == 7
    lines = [r.getMessage() for r in caplog.records if "accepting at most" in r.getMessage()]
    limit = open_files_limit()
    assert lines == [
        f"accepting at most {default_max_connections()} connections (open files limit {limit})",
        f"accepting at most 7 connections (open files limit {limit}), as max_connections says",
    ]


def _accept_queue(port: int) -> int:
    """The backlog of the socket listening on ``port``, as the kernel reports it."""
    ss = shutil.which("ss")
    assert ss is not None, "ss (iproute2) is needed to read the listen backlog"
    out = subprocess.run(
        [ss, "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    # State Recv-Q Send-Q Local Peer: for a listening socket Send-Q is the backlog.
    fields = out.split()
    assert fields and fields[0] == "LISTEN", out
    return int(fields[2])


def _somaxconn() -> int:
    with open("/proc/sys/net/core/somaxconn", encoding="ascii") as fh:
        return int(fh.read())


async def test_the_listen_backlog_applies_to_both_ports() -> None:
    async with running_broker(listen_backlog=321) as broker:
        want = min(321, _somaxconn())
        assert _accept_queue(broker.ws_port) == want
        assert _accept_queue(broker.http_port) == want
    async with running_broker() as broker:  # the default is sized for reconnect storms
        assert _accept_queue(broker.ws_port) == min(4096, _somaxconn())


async def test_a_periodic_summary_with_rates_and_no_line_per_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="broker"):
        async with running_broker(log_summary_interval=0.3) as broker:
            url = f"ws://127.0.0.1:{broker.ws_port}/ws"
            for _ in range(3):
                async with connect(url) as ws:
                    await ws.send('{"op":"publish","id":1,"channel":"c","data":1}')
                    await ws.recv()
            async with connect(url) as ws:
                await ws.send('{"op":"subscribe","id":1,"channel":"c"}')
                await ws.recv()
                seen = len(caplog.records)
                await until(
                    lambda: any("summary:" in r.getMessage() for r in caplog.records[seen:]), 5
                )
                await asyncio.sleep(0)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not any("connection opened" in m or "connection closed" in m for m in messages)
    summaries = [m for m in messages if m.startswith("summary: ")]
    assert any(
        m.startswith("summary: 1 connection, 1 subscriptions; per second: ") for m in summaries
    )
    totals = re.search(r"so far: (\d+) opened, (\d+) published", summaries[-1])
    assert totals is not None and totals.groups() == ("4", "3"), summaries[-1]
    # The first line's rates cover the connections opened before it.
    first = re.search(r"per second: ([\d.]+) opened", summaries[0])
    assert first is not None and float(first.group(1)) > 0, summaries[0]
