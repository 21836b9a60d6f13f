"""The browser client and the live dashboard, in headless Chromium, against real broker processes.

Needs Debian's ``chromium`` package (``apt-get install chromium``) at
``/usr/bin/chromium`` (or ``$CHROMIUM``). Without it these tests skip on a
developer's machine and fail in CI (``CI`` set), so CI cannot go green
without running them.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from playwright.async_api import Browser, Page, async_playwright

from broker.codes import ERROR_CODES
from broker_client import Client, ClientOptions, HttpPublisher, Subscription, connect
from tests.brokerproc import REPO, BrokerProcess
from tests.tcpproxy import TcpProxy
from tests.wait import within

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
HAVE_CHROMIUM = Path(CHROMIUM).exists()
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FAST: ClientOptions = {"backoff_initial": 0.05, "backoff_max": 0.5, "request_timeout": 5.0}
WAIT_MS = 15_000
SECRET = "browser-tests-secret-browser-tests!!"
#: Channels under demo.> and h.> keep history (the memory backplane loses it on restart).
HISTORY = {
    "BROKER_CHANNELS": json.dumps([{"pattern": p, "history_size": 100} for p in ("demo.>", "h.>")])
}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        reason = f"Chromium not found at {CHROMIUM}: apt-get install chromium"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
def broker() -> Iterator[BrokerProcess]:
    with BrokerProcess(log_level="warning") as proc:
        yield proc


@pytest.fixture
def history_broker() -> Iterator[BrokerProcess]:
    with BrokerProcess(log_level="warning", env=HISTORY) as proc:
        yield proc


def token(sub: str = "alice", ttl: float = 3600, secret: str = SECRET, **claims: Any) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + ttl, **claims}, secret, "HS256")


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context()
    pg = await context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield pg
    finally:
        await context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


async def card(page: Page, channel: str) -> dict[str, Any]:
    """What the dashboard shows for ``channel``: its count, value and text."""
    result: dict[str, Any] = await page.evaluate(
        """(channel) => {
            const el = document.querySelector(`.card[data-channel="${channel}"]`);
            if (!el) return {count: 0, value: null, text: null};
            return {
                count: Number(el.dataset.count),
                value: el.dataset.value ?? null,
                text: el.querySelector("[data-field=value]").textContent,
            };
        }""",
        channel,
    )
    return result


async def wait_count(page: Page, channel: str, at_least: int) -> None:
    await page.wait_for_function(
        """([channel, n]) => {
            const el = document.querySelector(`.card[data-channel="${channel}"]`);
            return el !== null && Number(el.dataset.count) >= n;
        }""",
        arg=[channel, at_least],
        timeout=WAIT_MS,
    )


async def next_data(sub: Subscription, timeout: float = 15.0) -> Any:
    return (await within(anext(sub), timeout)).data


async def test_demo_is_served_with_the_client(broker: BrokerProcess, page: Page) -> None:
    for path, kind in [
        ("/client/broker.js", "javascript"),
        ("/client/broker.d.ts", "typescript"),
        ("/demo", "text/html"),
    ]:
        response = await page.request.get(broker.base_url + path)
        assert response.status == 200, path
        assert kind in response.headers["content-type"], path


async def test_dashboard_updates_and_survives_a_broker_restart(
    broker: BrokerProcess, page: Page
) -> None:
    """The README's dashboard: values update live, and keep updating after a restart.

    The example publisher runs as a subprocess; a Python subscriber stays open
    beside the page. The broker is killed (SIGKILL) and restarted on the same
    ports: both get new messages afterwards, the page without a reload.
    """
    publisher = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO / "examples" / "demo_publisher.py"),
        *("--url", broker.ws_url, "--interval", "0.2", "--duration", "60"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with connect(broker.ws_url, **FAST) as client:
            reconnected = asyncio.Event()
            client.on_reconnect(lambda gap: reconnected.set())
            sub = await client.subscribe("demo.>")

            await page.goto(f"{broker.base_url}/demo")
            await page.wait_for_selector('#status[data-state="open"]', timeout=WAIT_MS)
            await wait_count(page, "demo.cpu", 3)
            before = await card(page, "demo.cpu")
            assert before["text"].endswith("%")
            assert float(before["value"]) >= 0
            await wait_count(page, "demo.temperature.kitchen", 3)
            assert (await card(page, "demo.temperature.kitchen"))["text"].endswith("°C")
            assert (await next_data(sub))["unit"]

            await broker.arestart(kill=True)

            # Both notice, reconnect and re-subscribe by themselves.
            await within(reconnected.wait(), 20)
            await page.wait_for_function(
                "document.querySelector('#reconnects').textContent === '1'", timeout=WAIT_MS
            )
            await page.wait_for_selector('#status[data-state="open"]', timeout=WAIT_MS)
            assert await page.text_content("#gaps") == "1"

            # A value published after the restart reaches the page and the subscriber.
            await asyncio.to_thread(
                HttpPublisher(broker.http_url).publish,
                "demo.marker",
                {"value": "after-restart"},
            )
            await wait_count(page, "demo.marker", 1)
            assert (await card(page, "demo.marker"))["text"] == "after-restart"
            while (data := await next_data(sub)) != {"value": "after-restart"}:
                assert "unit" in data  # the publisher's own values, also after the restart

            # The example publisher rode out the restart too: the page keeps updating.
            now = (await card(page, "demo.cpu"))["count"]
            await wait_count(page, "demo.cpu", now + 2)
            assert await page.evaluate("window.brokerClient.reconnects") == 1
    finally:
        publisher.terminate()
        await within(publisher.wait(), 10)


JS_API_SCENARIO = """async (wsUrl) => {
    const { connect, BrokerError, ConnectionClosedError, ERROR_CODES } =
        await import("/client/broker.js");
    const out = {};
    const client = connect(wsUrl, { pingInterval: 0 });
    await client.whenConnected();
    out.state = client.state;

    const got = [];
    const sub = client.subscribe(["js.*", "js.>"], (m) => got.push([m.channel, m.data]));
    await sub.ready;
    await client.publish("js.a", { n: 1 });
    await client.publish("js.a.b", [2]);
    out.ping = typeof (await client.ping());
    out.got = got.slice();

    try {
        await client.publish("js.*", 1);
        out.patternPublish = "resolved";
    } catch (e) {
        out.patternPublish = {
            isBrokerError: e instanceof BrokerError, code: e.code, name: e.name,
            hasMessage: e.message.length > 0, requestId: typeof e.requestId,
        };
    }
    const bad = client.subscribe("js..bad", () => {});
    try { await bad.ready; out.badSubscribe = "resolved"; }
    catch (e) { out.badSubscribe = { code: e.code, closed: bad.closed }; }

    const errors = [];
    client.on("error", (e) => errors.push(e.code));
    out.sentAtOnce = client.publishNoWait("js.*", "refused");
    await client.ping();
    out.noWaitErrors = errors.slice();

    try { await client.publish("js.big", "x".repeat(70000)); out.big = "resolved"; }
    catch (e) { out.big = e.code; }

    await sub.unsubscribe();
    out.closedAfterUnsubscribe = sub.closed;
    await client.publish("js.a", "not delivered");
    await client.ping();
    out.gotAfterUnsubscribe = got.length;

    client.close();
    out.closedState = client.state;
    try { await client.publish("js.a", 1); out.afterClose = "resolved"; }
    catch (e) { out.afterClose = e instanceof ConnectionClosedError ? e.code : String(e); }
    out.codes = ERROR_CODES.length;
    return out;
}"""


async def test_js_client_api(broker: BrokerProcess, page: Page) -> None:
    await page.goto(f"{broker.base_url}/healthz")
    out = await page.evaluate(JS_API_SCENARIO, broker.ws_url)
    assert out["state"] == "open"
    assert out["ping"] == "number"
    # One message per publish, however many of the subscription's patterns match.
    assert out["got"] == [["js.a", {"n": 1}], ["js.a.b", [2]]]
    assert out["patternPublish"] == {
        "isBrokerError": True,
        "code": "bad_channel",
        "name": "BrokerError",
        "hasMessage": True,
        "requestId": "number",
    }
    assert out["badSubscribe"] == {"code": "bad_channel", "closed": True}
    assert out["sentAtOnce"] is True
    assert out["noWaitErrors"] == ["bad_channel"]
    assert out["big"] == "too_large"
    assert out["closedAfterUnsubscribe"] is True
    assert out["gotAfterUnsubscribe"] == 2
    assert out["closedState"] == "closed"
    assert out["afterClose"] == "connection_closed"
    assert out["codes"] == len(ERROR_CODES)


async def test_js_client_notices_a_dead_link_by_ping(broker: BrokerProcess, page: Page) -> None:
    """A link that carries nothing (no close, no error) is noticed by the app-level ping."""
    async with (
        TcpProxy(broker.host, broker.port) as proxy,
        connect(broker.ws_url, **FAST) as publisher,
    ):
        await page.goto(f"{broker.base_url}/healthz")
        await page.evaluate(
            """async (wsUrl) => {
                const { connect } = await import("/client/broker.js");
                const client = connect(wsUrl, {
                    pingInterval: 300, pingTimeout: 300, minReconnectDelay: 50,
                    maxReconnectDelay: 300,
                });
                // A second client without pings, to see a request time out.
                const quiet = connect(wsUrl, { pingInterval: 0 });
                await quiet.whenConnected();
                window.t = { client, quiet, got: [], closes: [], gaps: 0 };
                client.on("close", (e) => window.t.closes.push(e.reason));
                const sub = client.subscribe("dead.x", (m) => window.t.got.push(m.data), {
                    onGap: () => { window.t.gaps += 1; },
                });
                await sub.ready;
            }""",
            f"ws://127.0.0.1:{proxy.port}/ws",
        )
        proxy.pause()
        timed_out = await page.evaluate(
            """() => window.t.quiet.publish("dead.x", 1, { timeout: 200 }).then(
                () => "resolved", (e) => [e.name, e.code])"""
        )
        assert timed_out == ["RequestTimeoutError", "timeout"]
        await page.wait_for_function("window.t.closes.includes('ping timed out')", timeout=WAIT_MS)
        await proxy.cut()
        proxy.resume()
        await page.wait_for_function("window.t.gaps === 1", timeout=WAIT_MS)
        await publisher.publish("dead.x", "alive again")
        await page.wait_for_function("window.t.got.includes('alive again')", timeout=WAIT_MS)


async def test_js_client_reconnects_after_restart_with_sigterm(
    broker: BrokerProcess, page: Page
) -> None:
    await page.goto(f"{broker.base_url}/healthz")
    await page.evaluate(
        """async (wsUrl) => {
            const { connect } = await import("/client/broker.js");
            const client = connect(wsUrl, { minReconnectDelay: 50, maxReconnectDelay: 500 });
            window.t = { client, got: [], reconnects: [] };
            client.on("reconnect", (e) => window.t.reconnects.push(e));
            await client.subscribe("restart.*", (m) => window.t.got.push(m.data)).ready;
        }""",
        broker.ws_url,
    )
    await broker.arestart()
    await page.wait_for_function("window.t.reconnects.length === 1", timeout=WAIT_MS)
    info = await page.evaluate("window.t.reconnects[0]")
    assert info["reason"] == "reconnect" and info["until"] >= info["since"]
    assert info["attempts"] >= 1
    client: Client
    async with connect(broker.ws_url, **FAST) as client:
        await client.publish("restart.a", "after")
    await page.wait_for_function("window.t.got.includes('after')", timeout=WAIT_MS)


# --- the dashboard: phones, stale values, tokens, gaps ------------------------------------


async def _publisher(broker: BrokerProcess, *extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO / "examples" / "demo_publisher.py"),
        *("--url", broker.ws_url, "--interval", "0.2", "--duration", "60", *extra),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
    await within(process.wait(), 10)


async def test_demo_fits_a_phone_and_logs_whole_values(
    history_broker: BrokerProcess, browser: Browser
) -> None:
    """Finding 7 of the ecosystem review: at 390 px the page scrolled sideways."""
    broker = history_broker
    context = await browser.new_context(viewport={"width": 390, "height": 800})
    try:
        page = await context.new_page()
        await page.goto(f"{broker.base_url}/demo")
        await page.wait_for_selector('#status[data-state="open"]', timeout=WAIT_MS)
        long_value = {"value": "x" * 40, "note": "a-long-unbroken-token-" * 12}
        publisher = HttpPublisher(broker.http_url)
        await asyncio.to_thread(publisher.publish, "demo.cpu", {"value": 42.5, "unit": "%"})
        long_channel = "demo.some.very.long.channel.name.here"
        await asyncio.to_thread(publisher.publish, long_channel, long_value)
        await wait_count(page, long_channel, 1)
        width = await page.evaluate("[document.documentElement.scrollWidth, innerWidth]")
        assert width[0] <= width[1], f"horizontal overflow: scrollWidth {width[0]} > {width[1]}"
        # The log line holds the whole value, wrapped, not cut.
        line = await page.evaluate("document.querySelector('#log li').textContent")
        assert json.dumps(long_value, separators=(",", ":")) in line
        assert (await card(page, "demo.cpu"))["text"] == "42.5 %"
        # Every card has the same parts, a chart included.
        parts = await page.evaluate(
            """[...document.querySelectorAll('.card')].map((c) =>
                ['.name', '.value', 'svg .line', '[data-field=count]']
                    .every((s) => c.querySelector(s)))"""
        )
        assert len(parts) >= 5 and all(parts)
        line_path = await page.get_attribute('.card[data-channel="demo.cpu"] svg .line', "d")
        assert line_path and line_path.startswith("M")
    finally:
        await context.close()


async def test_demo_dims_values_while_down_and_shows_the_lost_history(
    history_broker: BrokerProcess, page: Page
) -> None:
    """A broker restart: values dimmed meanwhile; then recovered:false is counted and logged."""
    broker = history_broker
    publisher = await _publisher(broker)
    try:
        await page.goto(f"{broker.base_url}/demo")
        await page.wait_for_selector('#status[data-state="open"]', timeout=WAIT_MS)
        await wait_count(page, "demo.cpu", 3)
        opacity = "Number(getComputedStyle(document.querySelector('.card .value')).opacity)"
        assert await page.evaluate(opacity) == 1

        await broker.akill()
        await page.wait_for_selector('body[data-state="reconnecting"]', timeout=WAIT_MS)
        await page.wait_for_function(f"{opacity} < 0.5", timeout=WAIT_MS)
        stale = await page.evaluate(
            "getComputedStyle(document.querySelector('.card .meta'), '::after').content"
        )
        assert "stale" in stale

        await broker.astart()  # a new process: the memory backplane starts new epochs
        await page.wait_for_selector('body[data-state="open"]', timeout=WAIT_MS)
        await page.wait_for_function(f"{opacity} === 1", timeout=WAIT_MS)
        await page.wait_for_function(
            "document.querySelector('#gaps').textContent === '1'", timeout=WAIT_MS
        )
        log = await page.evaluate(
            "[...document.querySelectorAll('#log li.gap')].map((li) => li.textContent)"
        )
        lost = [line for line in log if "lost this channel's history" in line]
        assert lost and "demo.cpu" in lost[0], log
        now = (await card(page, "demo.cpu"))["count"]
        await wait_count(page, "demo.cpu", now + 2)
    finally:
        await _stop(publisher)


async def test_demo_asks_for_a_token_and_keeps_it_out_of_the_url(
    browser: Browser,
) -> None:
    env = {
        "BROKER_JWT_SECRET": SECRET,
        "BROKER_CHANNELS": json.dumps([{"pattern": "demo.>", "history_size": 100}]),
    }
    with BrokerProcess(log_level="warning", env=env) as broker:
        context = await browser.new_context()
        try:
            page = await context.new_page()
            await page.goto(f"{broker.base_url}/demo")
            # No token: the page says so plainly, and stops.
            await page.wait_for_selector('#status[data-state="signin"]', timeout=WAIT_MS)
            assert await page.is_visible("#auth")
            assert "needs a token" in (await page.text_content("#auth-message") or "")

            # A token the broker refuses: said plainly too.
            await page.fill("#token", token(secret="not-the-broker-secret-not-the-secret"))
            await page.click("#token-form button[type=submit]")
            await page.wait_for_function(
                "document.querySelector('#auth-message').textContent.includes('refused the token')",
                timeout=WAIT_MS,
            )
            assert await page.get_attribute("#status", "data-state") == "signin"

            good = token(sub="viewer", subscribe=["demo.>"])
            await page.fill("#token", good)
            await page.click("#token-form button[type=submit]")
            await page.wait_for_selector('#status[data-state="open"]', timeout=WAIT_MS)
            assert not await page.is_visible("#auth")
            assert await page.text_content("#auth-toggle") == "token: viewer"
            await asyncio.to_thread(
                HttpPublisher(broker.http_url).publish, "demo.cpu", {"value": 7, "unit": "%"}
            )
            await wait_count(page, "demo.cpu", 1)
            assert good not in page.url
            assert await page.evaluate("sessionStorage.getItem('broker-demo-token')") == good

            # A reload in the same tab signs in again with the kept token.
            await page.reload()
            await page.wait_for_selector('#status[data-state="open"]', timeout=WAIT_MS)
            assert await page.evaluate("window.brokerClient.subject") == "viewer"
        finally:
            await context.close()


# --- the browser client: tokens and recovery ----------------------------------------------


async def test_js_client_refreshes_a_short_lived_token(browser: Browser) -> None:
    """3-second tokens, 1 s of grace: the subscription sees every message across refreshes."""
    env = {"BROKER_JWT_SECRET": SECRET, "BROKER_REFRESH_GRACE": "1"}
    with BrokerProcess(log_level="warning", env=env) as broker:
        context = await browser.new_context()
        try:
            page = await context.new_page()
            minted: list[float] = []

            def mint() -> str:
                minted.append(time.monotonic())
                return token(ttl=3, subscribe=["t.>"], publish=["t.>"])

            await page.expose_function("mintToken", mint)
            await page.goto(f"{broker.base_url}/healthz")
            await page.evaluate(
                """async (wsUrl) => {
                    const { connect } = await import("/client/broker.js");
                    const client = connect(wsUrl, { getToken: () => window.mintToken() });
                    window.t = { client, got: [], closes: [], auths: [], errors: [] };
                    client.on("close", (e) => window.t.closes.push(e.code));
                    client.on("auth", (e) => window.t.auths.push(e.refresh));
                    client.on("error", (e) => window.t.errors.push(e.code));
                    await client.subscribe("t.x", (m) => window.t.got.push(m.data)).ready;
                }""",
                broker.ws_url,
            )
            bearer = {"Authorization": f"Bearer {token(ttl=60, publish=['t.>'])}"}
            async with connect(broker.ws_url, **FAST, additional_headers=bearer) as publisher:
                sent = 0
                deadline = time.monotonic() + 7.5  # two and a half token lifetimes
                while time.monotonic() < deadline:
                    sent += 1
                    await publisher.publish("t.x", sent)
                    await asyncio.sleep(0.1)
            await page.wait_for_function(f"window.t.got.length === {sent}", timeout=WAIT_MS)
            result = await page.evaluate("window.t")
            assert result["got"] == list(range(1, sent + 1))
            assert result["closes"] == [], "the connection never dropped"
            assert result["errors"] == []
            assert result["auths"][0] is False and result["auths"].count(True) >= 2
            assert len(minted) == len(result["auths"])
        finally:
            await context.close()


RECORDER = """async ([wsUrl, channel]) => {
    const { connect } = await import("/client/broker.js");
    const client = connect(wsUrl, {
        pingInterval: 0, minReconnectDelay: 50, maxReconnectDelay: 500,
    });
    window.t = { client, got: [], gaps: [], recoveries: [], reconnects: 0 };
    client.on("recovery", (r) => window.t.recoveries.push(r));
    client.on("reconnect", () => { window.t.reconnects += 1; });
    const onGap = (g) => window.t.gaps.push([g.channel, g.reason]);
    await client.subscribe(channel, (m) => window.t.got.push(m.data), { onGap }).ready;
}"""


async def test_js_client_surfaces_lost_history_after_a_sigterm_restart(
    history_broker: BrokerProcess, page: Page
) -> None:
    broker = history_broker
    await page.goto(f"{broker.base_url}/healthz")
    await page.evaluate(RECORDER, [broker.ws_url, "h.restart"])
    publisher = HttpPublisher(broker.http_url)
    await asyncio.to_thread(publisher.publish, "h.restart", "before")
    await page.wait_for_function("window.t.got.length === 1", timeout=WAIT_MS)

    await broker.arestart()  # SIGTERM; the new process has new epochs
    await page.wait_for_function("window.t.reconnects === 1", timeout=WAIT_MS)
    result = await page.evaluate("window.t")
    assert result["gaps"] == [["h.restart", "epoch_changed"]]
    (recovery,) = result["recoveries"]
    assert recovery["recovered"] is False and recovery["reason"] == "epoch_changed"
    await asyncio.to_thread(publisher.publish, "h.restart", "after")
    await page.wait_for_function("window.t.got.includes('after')", timeout=WAIT_MS)
    assert await page.evaluate("window.t.got") == ["before", "after"]


async def test_js_client_recovers_a_dropped_connection_exactly_once(
    history_broker: BrokerProcess, page: Page
) -> None:
    """History kept (one process), the link cut: every message once, in order, and no gap."""
    broker = history_broker
    async with TcpProxy(broker.host, broker.port) as proxy:
        await page.goto(f"{broker.base_url}/healthz")
        await page.evaluate(RECORDER, [f"ws://127.0.0.1:{proxy.port}/ws", "h.cut"])
        publisher = HttpPublisher(broker.http_url)
        sent = 0

        async def publish(n: int) -> None:
            nonlocal sent
            for _ in range(n):
                sent += 1
                await asyncio.to_thread(publisher.publish, "h.cut", sent)

        await publish(5)
        proxy.pause()  # these reach the broker, not the page
        await publish(10)
        await proxy.cut()
        proxy.resume()
        await publish(5)
        await page.wait_for_function("window.t.reconnects === 1", timeout=WAIT_MS)
        await publish(5)
        await page.wait_for_function(f"window.t.got.length >= {sent}", timeout=WAIT_MS)
        await asyncio.sleep(0.2)
        result = await page.evaluate("window.t")
        assert result["got"] == list(range(1, sent + 1))
        assert result["gaps"] == []
        (recovery,) = result["recoveries"]
        assert recovery["recovered"] is True and recovery["missed"] >= 10
