"""The Redis backplane under faults, against a real redis-server of the test's own.

Faults come from the shared TCP proxy between the backplane and Redis
(``tests/tcpproxy.py``: ``pause()`` holds every byte in both directions, a black
hole for as long as it lasts; ``cut()`` resets every open link; ``pause()`` then
``cut()`` is an outage where new connections open but get no answer), from
``CLIENT KILL TYPE pubsub``, and from killing and restarting the server.

Each case checks the promises of ``broker/backplane/redis.py`` and
``redis_link.py``: ``ready`` drops promptly, publishes fail promptly with
``BackplaneError``, one warning per outage and one info line per recovery (no
traceback), subscriptions restored (a message published after recovery
arrives), the listener's link events, and no task left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.backplane import Published
from broker.backplane.redis import RedisBackplane
from broker.backplane.redis_link import stop_tasks
from broker.exceptions import BackplaneError
from tests.backplane_support import Inbox, RedisServer, eventually, our_tasks
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.redis

# Each module of the Redis backplane logs under its own name; the supervisor's lines
# (connected, lost, reconnected, refused) come from redis_link.
LOGGERS = {
    "broker.backplane.redis",
    "broker.backplane.redis_link",
    "broker.backplane.redis_publisher",
}


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[TcpProxy]:
    relay = TcpProxy("127.0.0.1", redis_server.port)
    await relay.start()
    yield relay
    await relay.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Any]:
    """A plain client straight to Redis (not through the proxy), to publish and kill."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="broker.backplane")
    return caplog


def lines(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name in LOGGERS and r.levelno == level and text in r.getMessage()
    ]


def assert_one_line_per_state_change(caplog: pytest.LogCaptureFixture, restored: int) -> None:
    ours = [r for r in caplog.records if r.name in LOGGERS and r.levelno >= logging.INFO]
    assert [r.levelname for r in ours] == ["INFO", "WARNING", "INFO"], [
        r.getMessage() for r in ours
    ]
    assert "connected to" in ours[0].getMessage()
    assert ours[1].getMessage().startswith("redis backplane: connection lost: ")
    assert ours[2].getMessage() == (
        f"redis backplane: reconnected, {restored} subscriptions restored"
    )
    assert all(r.exc_info is None for r in ours), "no tracebacks for outages"


async def close_and_check(bp: RedisBackplane, before: set[asyncio.Task[Any]]) -> None:
    await bp.close()
    assert not_the_proxys(our_tasks(before)) == set(), "tasks left behind after close()"


def not_the_proxys(tasks: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    return {t for t in tasks if not t.get_coro().__qualname__.startswith("TcpProxy.")}


def prefix() -> str:
    return f"f{uuid.uuid4().hex[:12]}."


async def test_cut_link_is_noticed_and_everything_restored(
    proxy: TcpProxy, raw: Any, log: pytest.LogCaptureFixture
) -> None:
    before = set(asyncio.all_tasks())
    pre = prefix()
    bp = RedisBackplane(
        f"redis://127.0.0.1:{proxy.port}/0", prefix=pre, socket_timeout=0.3, reconnect_max=0.3
    )
    inbox = Inbox()
    await bp.start(inbox)
    for pattern in ("t.a", "t.*", "t.gone"):
        await bp.subscribe(pattern)

    proxy.pause()
    await proxy.cut()
    took = await eventually(lambda: not bp.ready, 2.0, "down after the cut")
    assert took < 0.5
    with pytest.raises(BackplaneError):
        async with asyncio.timeout(1.5):
            await bp.publish("t.a", b"1")

    # Interest changes during the outage are recorded without raising or waiting.
    async with asyncio.timeout(0.5):
        await bp.subscribe("t.new")
        await bp.unsubscribe("t.gone")

    # Let it fail to reconnect a few times: still only one warning.
    attempts = proxy.accepted
    await eventually(lambda: proxy.accepted >= attempts + 3, 3.0, "retrying")
    assert not bp.ready

    proxy.resume()
    await eventually(lambda: bp.ready, 3.0, "ready again")
    assert bp.connection_losses == 1
    await raw.publish(f"{pre}t.a", b'"a"')
    await raw.publish(f"{pre}t.gone", b'"gone"')
    await raw.publish(f"{pre}t.new", b'"new"')
    await inbox.wait_message("t.new", b'"new"')
    assert inbox.messages == [("t.a", b'"a"'), ("t.gone", b'"gone"'), ("t.new", b'"new"')]
    assert_one_line_per_state_change(log, restored=3)  # t.a, t.*, t.new
    await close_and_check(bp, before)


async def test_blackholed_link_is_noticed(
    proxy: TcpProxy, raw: Any, log: pytest.LogCaptureFixture
) -> None:
    before = set(asyncio.all_tasks())
    pre = prefix()
    # Default timeouts: the promised numbers are about these.
    bp = RedisBackplane(f"redis://127.0.0.1:{proxy.port}/0", prefix=pre, reconnect_max=0.5)
    inbox = Inbox()
    await bp.start(inbox)
    await bp.subscribe("b.x")
    loop = asyncio.get_running_loop()

    proxy.pause()
    start = loop.time()
    in_flight = [bp.publish("b.x", b"%d" % i) for i in range(100)]
    async with asyncio.timeout(1.5):
        results = await asyncio.gather(*in_flight, return_exceptions=True)
    assert all(isinstance(r, BackplaneError) for r in results), results[:3]
    # Worst case: the batch times out (1 s), then the PING it triggers does (1 s).
    await eventually(lambda: not bp.ready, 3.0, "down after the black hole")
    assert loop.time() - start < 3.0

    proxy.resume()
    await eventually(lambda: bp.ready, 4.0, "ready again")
    await raw.publish(f"{pre}b.x", b'"after"')
    await inbox.wait_message("b.x", b'"after"')
    assert inbox.on("b.x") == [b'"after"']
    assert_one_line_per_state_change(log, restored=1)
    await close_and_check(bp, before)


async def test_a_publish_batch_is_written_without_a_task_of_its_own(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py wraps each send in ``wait_for`` (a task, a loop turn) when the
    connection has a socket timeout; the publisher bounds its batches itself
    (the test above), so its connection has none. Measured: 10-25 % of the
    broker's CPU per message on a cluster, where batches are small."""
    sends: list[object] = []
    real_wait_for = asyncio.wait_for

    async def spy(awaitable: Any, timeout: float | None) -> Any:
        sends.append(getattr(awaitable, "cr_frame", None) and awaitable.cr_frame.f_locals["self"])
        return await real_wait_for(awaitable, timeout)

    bp = RedisBackplane(redis_server.url, prefix=prefix())
    inbox = Inbox()
    await bp.start(inbox)
    await bp.subscribe("w.x")
    await bp.publish("w.x", b"0")  # the connection is made (its handshake may use wait_for)
    monkeypatch.setattr(asyncio, "wait_for", spy)
    for round_ in range(5):
        await asyncio.gather(*(bp.publish("w.x", b"%d" % (round_ * 10 + i)) for i in range(10)))
    await inbox.wait_count(51)
    publisher_conn = bp._publisher._conn
    assert publisher_conn is not None and publisher_conn.socket_timeout is None
    assert [conn for conn in sends if conn is publisher_conn] == []
    await bp.close()


async def test_idle_blackholed_link_is_noticed_by_ping(proxy: TcpProxy) -> None:
    before = set(asyncio.all_tasks())
    bp = RedisBackplane(f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix(), socket_timeout=0.5)
    await bp.start(Inbox())
    await bp.subscribe("idle")
    proxy.pause()
    took = await eventually(lambda: not bp.ready, 2.0, "down without any traffic")
    assert took < 1.0 + 0.5  # one PING interval plus one PING time-out, plus slack
    await close_and_check(bp, before)


async def test_client_kill_pubsub_is_noticed_and_restored(
    redis_server: RedisServer, raw: Any, log: pytest.LogCaptureFixture
) -> None:
    before = set(asyncio.all_tasks())
    pre = prefix()
    bp = RedisBackplane(redis_server.url, prefix=pre)
    inbox = Inbox()
    await bp.start(inbox)
    await bp.subscribe("k.a")
    await bp.subscribe("k.*")

    killed = await raw.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    assert killed >= 1
    await eventually(lambda: bp.connection_losses == 1 and bp.ready, 3.0, "reconnected")
    await raw.publish(f"{pre}k.a", b'"after"')
    await raw.publish(f"{pre}k.end", b'"end"')
    await inbox.wait_message("k.end", b'"end"')
    assert inbox.on("k.a") == [b'"after"']  # both subscriptions back, still delivered once
    assert_one_line_per_state_change(log, restored=2)
    await close_and_check(bp, before)


async def test_server_restart_is_survived(
    redis_server: RedisServer, log: pytest.LogCaptureFixture
) -> None:
    before = set(asyncio.all_tasks())
    pre = prefix()
    bp = RedisBackplane(redis_server.url, prefix=pre, reconnect_max=0.3)
    inbox = Inbox()
    await bp.start(inbox)
    await bp.subscribe("r.>")
    try:
        redis_server.stop()
        await eventually(lambda: not bp.ready, 1.0, "down after the server died")
        with pytest.raises(BackplaneError):
            await bp.publish("r.x", b"1")  # fails at once while down
    finally:
        if redis_server.process is None:
            redis_server.start()
    await eventually(lambda: bp.ready, 3.0, "ready again")
    assert_one_line_per_state_change(log, restored=1)
    # The first publish after the restart goes out on a fresh connection.
    async with asyncio.timeout(1):
        await bp.publish("r.mine", b'"first"')
    await inbox.wait_message("r.mine", b'"first"')
    # A second backplane publishes, as another broker process would.
    other = RedisBackplane(redis_server.url, prefix=pre)
    await other.start(Inbox())
    await other.publish("r.x.y", b'"back"')
    await inbox.wait_message("r.x.y", b'"back"')
    await other.close()
    await close_and_check(bp, before)


async def test_start_while_redis_is_down(
    proxy: TcpProxy, raw: Any, log: pytest.LogCaptureFixture
) -> None:
    before = set(asyncio.all_tasks())
    pre = prefix()
    proxy.pause()
    bp = RedisBackplane(
        f"redis://127.0.0.1:{proxy.port}/0", prefix=pre, socket_timeout=0.3, reconnect_max=0.3
    )
    inbox = Inbox()
    async with asyncio.timeout(2):
        await bp.start(inbox)  # returns after the first attempt, without raising
    assert not bp.ready
    with pytest.raises(BackplaneError):
        await bp.publish("s.x", b"1")
    await bp.subscribe("s.x")
    proxy.resume()
    await eventually(lambda: bp.ready, 2.0, "connected")
    await raw.publish(f"{pre}s.x", b'"hello"')
    await inbox.wait_message("s.x", b'"hello"')
    warnings = lines(log, logging.WARNING, "cannot connect to redis://127.0.0.1:")
    assert len(warnings) == 1
    assert len(lines(log, logging.INFO, "connected to")) == 1
    await close_and_check(bp, before)


async def test_close_during_outage_is_prompt(proxy: TcpProxy) -> None:
    before = set(asyncio.all_tasks())
    bp = RedisBackplane(f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix())
    await bp.start(Inbox())
    await bp.subscribe("c.x")
    proxy.pause()
    future = bp.publish("c.x", b"1")
    async with asyncio.timeout(1.0):
        await bp.close()
    with pytest.raises(BackplaneError):
        await future
    assert not_the_proxys(our_tasks(before)) == set()


@asynccontextmanager
async def redis_user(
    raw: Any, server: RedisServer, name: str, password: str, *rules: str
) -> AsyncIterator[str]:
    """An ACL user with ``rules`` for the block; yields a URL that logs in as it."""
    await raw.execute_command("ACL", "SETUSER", name, "on", f">{password}", *rules)
    try:
        yield f"redis://{name}:{password}@127.0.0.1:{server.port}/0"
    finally:
        await raw.execute_command("ACL", "DELUSER", name)


async def test_credentials_in_url_are_used_and_not_logged(
    redis_server: RedisServer, raw: Any, log: pytest.LogCaptureFixture
) -> None:
    async with redis_user(raw, redis_server, "bp", "s3cret", "~*", "&*", "+@all") as url:
        pre = prefix()
        bp = RedisBackplane(url, prefix=pre)
        inbox = Inbox()
        await bp.start(inbox)
        await bp.subscribe("cred")
        await bp.publish("cred", b"1")
        await inbox.wait_message("cred", b"1")
        await bp.close()
        assert all("s3cret" not in r.getMessage() for r in log.records)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tls_dir=tmp_path_factory.mktemp("tls"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("where", ["query", "options"])
async def test_tls_url(tls_server: RedisServer, where: str) -> None:
    base = f"rediss://127.0.0.1:{tls_server.tls_port}/0"
    if where == "query":
        bp = RedisBackplane(f"{base}?ssl_ca_certs={tls_server.cert}", prefix=prefix())
    else:
        bp = RedisBackplane(base, prefix=prefix(), redis_options={"ssl_ca_certs": tls_server.cert})
    inbox = Inbox()
    await bp.start(inbox)
    assert bp.ready
    await bp.subscribe("secure.>")
    await bp.publish("secure.x", b'"tls"')
    await inbox.wait_message("secure.x", b'"tls"')
    await bp.close()


async def test_tls_with_an_untrusted_certificate_is_a_logged_outage(
    tls_server: RedisServer, log: pytest.LogCaptureFixture
) -> None:
    before = set(asyncio.all_tasks())
    bp = RedisBackplane(f"rediss://127.0.0.1:{tls_server.tls_port}/0", prefix=prefix())
    await bp.start(Inbox())  # the system's CAs do not know our self-signed certificate
    assert not bp.ready
    (warning,) = lines(log, logging.WARNING, "cannot connect to rediss://127.0.0.1:")
    assert "certificate verify failed" in warning.getMessage()
    await close_and_check(bp, before)


async def test_a_refused_publish_fails_alone(redis_server: RedisServer, raw: Any) -> None:
    pre = prefix()
    rules = ("resetchannels", f"&{pre}ok.*", "+@all", "~*")
    async with redis_user(raw, redis_server, "narrow", "pw", *rules) as url:
        bp = RedisBackplane(url, prefix=pre)
        inbox = Inbox()
        await bp.start(inbox)
        await bp.subscribe("ok.x")
        results = await asyncio.gather(
            bp.publish("ok.x", b"1"),
            bp.publish("not.allowed", b"2"),
            bp.publish("ok.x", b"3"),
            return_exceptions=True,
        )
        assert results[0] == Published() and results[2] == Published()
        assert isinstance(results[1], BackplaneError)
        assert "NOPERM" in str(results[1]) or "permission" in str(results[1]).lower()
        await inbox.wait_count(2)
        assert inbox.on("ok.x") == [b"1", b"3"]
        assert bp.ready  # a refusal is not an outage
        await bp.close()


async def test_a_refused_subscription_is_logged_not_an_outage(
    redis_server: RedisServer, raw: Any, log: pytest.LogCaptureFixture
) -> None:
    # Redis checks a PSUBSCRIBE pattern literally against the user's channel rules,
    # so "&<prefix>*" allows every channel but not the pattern "<prefix>p.*".
    pre = prefix()
    rules = ("resetchannels", f"&{pre}*", "+@all", "~*")
    async with redis_user(raw, redis_server, "exact", "pw", *rules) as url:
        bp = RedisBackplane(url, prefix=pre)
        inbox = Inbox()
        await bp.start(inbox)
        await bp.subscribe("ok.x")
        await bp.subscribe("p.*")  # refused: logged, not raised
        await bp.subscribe("ok.y")
        (refusal,) = lines(log, logging.WARNING, "refused PSUBSCRIBE")
        assert f"{pre}p.*" in refusal.getMessage()
        assert bp.ready and bp.connection_losses == 0

        # After a reconnect the refused pattern does not keep the others from coming back.
        await raw.execute_command("CLIENT", "KILL", "USER", "exact")
        await eventually(lambda: bp.connection_losses == 1 and bp.ready, 3.0, "reconnected")
        assert len(lines(log, logging.WARNING, "refused PSUBSCRIBE")) == 2
        assert len(lines(log, logging.INFO, "reconnected, 2 subscriptions restored")) == 1
        await bp.publish("ok.y", b"1")
        await inbox.wait_message("ok.y", b"1")
        await bp.close()


# -- link events (Listener.link_lost / link_restored) ---------------------------------


class ReadyAtEvents(Inbox):
    """An ``Inbox`` that also records what ``ready`` said at each link event."""

    def __init__(self) -> None:
        super().__init__()
        self.backplane: RedisBackplane | None = None
        self.ready_at: list[bool] = []

    def link_lost(self) -> None:
        super().link_lost()
        assert self.backplane is not None
        self.ready_at.append(self.backplane.ready)

    def link_restored(self) -> None:
        super().link_restored()
        assert self.backplane is not None
        self.ready_at.append(self.backplane.ready)


async def test_first_connect_and_close_report_no_link_event(
    redis_server: RedisServer, raw: Any
) -> None:
    pre = prefix()
    bp = RedisBackplane(redis_server.url, prefix=pre)
    inbox = Inbox()
    await bp.start(inbox)
    await bp.subscribe("e.a")
    await raw.publish(f"{pre}e.a", b'"hi"')
    await inbox.wait_message("e.a", b'"hi"')
    await bp.close()
    assert inbox.links == []


async def test_connecting_after_failed_attempts_is_no_link_event(proxy: TcpProxy) -> None:
    proxy.pause()
    bp = RedisBackplane(
        f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix(), socket_timeout=0.3, reconnect_max=0.3
    )
    inbox = Inbox()
    await bp.start(inbox)
    attempts = proxy.accepted
    await eventually(lambda: proxy.accepted >= attempts + 2, 3.0, "retrying")
    proxy.resume()
    await eventually(lambda: bp.ready, 3.0, "connected")
    await bp.close()
    assert inbox.links == []  # never established before: nothing was lost


async def test_client_kill_reports_lost_then_restored_each_time(
    redis_server: RedisServer, raw: Any
) -> None:
    pre = prefix()
    bp = RedisBackplane(redis_server.url, prefix=pre)
    inbox = ReadyAtEvents()
    inbox.backplane = bp
    await bp.start(inbox)
    await bp.subscribe("k.a")
    await bp.subscribe("k.*")
    for outage in (1, 2):
        await raw.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        expected = ["lost", "restored"] * outage
        await eventually(lambda: inbox.links == expected, 3.0, f"lost and restored #{outage}")  # noqa: B023
        assert bp.connection_losses == outage
    # Lost while ready turned false; restored once ready again, subscriptions back.
    assert inbox.ready_at == [False, True, False, True]
    await raw.publish(f"{pre}k.a", b'"after"')
    await inbox.wait_message("k.a", b'"after"')
    assert inbox.on("k.a") == [b'"after"']
    await bp.close()
    assert inbox.links == ["lost", "restored"] * 2


async def test_server_restart_reports_lost_once_then_restored(
    redis_server: RedisServer, log: pytest.LogCaptureFixture
) -> None:
    pre = prefix()
    bp = RedisBackplane(redis_server.url, prefix=pre, socket_timeout=0.3, reconnect_max=0.3)
    inbox = ReadyAtEvents()
    inbox.backplane = bp
    await bp.start(inbox)
    await bp.subscribe("r.>")
    try:
        redis_server.stop()
        await eventually(lambda: inbox.links == ["lost"], 2.0, "lost after the server died")
        # Attempts that fail while down are not events of their own.
        await eventually(lambda: len(lines(log, logging.DEBUG, "failed: ")) >= 3, 5.0, "retrying")
        assert inbox.links == ["lost"]
    finally:
        if redis_server.process is None:
            redis_server.start()
    await eventually(lambda: inbox.links == ["lost", "restored"], 3.0, "restored")
    assert inbox.ready_at == [False, True]
    async with asyncio.timeout(1):
        await bp.publish("r.x", b'"back"')
    await inbox.wait_message("r.x", b'"back"')
    await bp.close()
    assert inbox.links == ["lost", "restored"]


async def test_stopping_tasks_finishes_even_when_the_stopper_is_cancelled() -> None:
    """A child that swallows a cancel (Python 3.11's wait_for can) still ends before
    its owner, though the owner is itself cancelled while it waits (as close() does)."""
    ended: list[str] = []

    async def stubborn() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # swallowed once, as wait_for may
            await asyncio.sleep(10)
        try:
            await asyncio.sleep(10)
        finally:
            ended.append("child")

    child = asyncio.create_task(stubborn())
    await asyncio.sleep(0)

    async def owner() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await stop_tasks([child])  # raises the owner's cancellation, once the child ended

    task = asyncio.create_task(owner())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(0.05)  # the owner is inside stop_tasks, the child swallowed a cancel
    task.cancel()  # a second cancel of the owner, as stop_tasks does to what it stops
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ended == ["child"] and child.done()
