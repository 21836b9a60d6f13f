// The client against real broker processes (python -m broker serve), started
// and stopped by each test on free ports.

import assert from "node:assert/strict";
import { test } from "node:test";

import { ConnectionClosedError, connect } from "../broker.js";
import { SECRET, TcpProxy, mintToken, sleep, startBroker, waitFor, within } from "../testing/helpers.js";

const FAST = { pingInterval: 0, minReconnectDelay: 20, maxReconnectDelay: 200, requestTimeout: 5000 };
const HISTORY = JSON.stringify([{ pattern: "h.>", history_size: 100 }]);

function open(t, url, options = {}) {
  const client = connect(url, { ...FAST, ...options });
  t.after(() => client.close());
  return client;
}

function record(client) {
  const seen = { gaps: [], errors: [], recoveries: [], closes: [] };
  client.on("gap", (g) => seen.gaps.push(g));
  client.on("error", (e) => seen.errors.push(e));
  client.on("recovery", (r) => seen.recoveries.push(r));
  client.on("close", (c) => seen.closes.push(c));
  return seen;
}

test("messages and acks carry offset and epoch; a keyed retry is a duplicate", async (t) => {
  const broker = await startBroker(t, { BROKER_CHANNELS: HISTORY });
  const client = open(t, broker.wsUrl);
  const got = [];
  const sub = client.subscribe("h.a", (m) => got.push(m));
  await within(sub.ready);
  assert.deepEqual(client.position("h.a")?.offset, 0);

  const first = await client.publish("h.a", { n: 1 }, { key: "order-1" });
  assert.equal(first.duplicate, false);
  assert.equal(first.offset, 1);
  assert.equal(typeof first.epoch, "string");
  const again = await client.publish("h.a", { n: 1 }, { key: "order-1" });
  assert.deepEqual(again, { ...first, duplicate: true });
  assert.deepEqual(await client.publish("plain", 1), { duplicate: false });

  await waitFor(() => got.length === 1);
  await client.ping();
  assert.equal(got.length, 1, "the duplicate was not delivered");
  assert.deepEqual([got[0].offset, got[0].epoch, got[0].data], [1, first.epoch, { n: 1 }]);
  assert.deepEqual(client.position("h.a"), { offset: 1, epoch: first.epoch });
});

test("history replays the last messages before live ones; since replays from a position", async (t) => {
  const broker = await startBroker(t, { BROKER_CHANNELS: HISTORY });
  const publisher = open(t, broker.wsUrl);
  for (let i = 1; i <= 5; i++) await publisher.publish("h.b", i);

  const client = open(t, broker.wsUrl);
  const seen = record(client);
  const last = [];
  await within(client.subscribe("h.b", (m) => last.push(m.data), { history: 3 }).ready);
  await publisher.publish("h.b", 6);
  await waitFor(() => last.length === 4);
  assert.deepEqual(last, [3, 4, 5, 6]);

  const { epoch } = client.position("h.b");
  const from = [];
  const gaps = [];
  await within(client.subscribe("h.c", () => {}).ready); // another channel: unaffected
  const since = client.subscribe("h.b2", (m) => from.push(m.data), { since: { offset: 0, epoch: "nope" }, onGap: (g) => gaps.push(g) });
  await within(since.ready);
  assert.deepEqual(gaps.map((g) => g.reason), ["epoch_changed"], "another epoch cannot be recovered");

  const other = open(t, broker.wsUrl);
  const replayed = [];
  await within(other.subscribe("h.b", (m) => replayed.push(m.data), { since: { offset: 4, epoch } }).ready);
  await waitFor(() => replayed.length === 2);
  assert.deepEqual(replayed, [5, 6]);
  assert.deepEqual(seen.errors, []);
});

test("a dropped connection recovers every missed message exactly once, with no gap", async (t) => {
  const broker = await startBroker(t, { BROKER_CHANNELS: HISTORY });
  const proxy = await new TcpProxy(broker.port).start();
  t.after(() => proxy.close());
  const client = open(t, proxy.wsUrl);
  const seen = record(client);
  const got = [];
  const gaps = [];
  const sub = client.subscribe("h.r", (m) => got.push(m.data), { onGap: (g) => gaps.push(g) });
  await within(sub.ready);
  const reconnected = new Promise((r) => client.on("reconnect", r));

  const publisher = open(t, broker.wsUrl);
  let n = 0;
  const publishSome = async (count) => {
    for (let i = 0; i < count; i++) await publisher.publish("h.r", ++n);
  };
  await publishSome(5);
  proxy.hold(); // the next ones never reach the client on this connection
  await publishSome(10);
  proxy.cut();
  await publishSome(5); // while it reconnects
  await within(reconnected, 5000, "reconnect");
  await publishSome(5);
  await waitFor(() => got.length >= n, 5000, `all ${n} messages`);
  await sleep(50);
  assert.deepEqual(got, Array.from({ length: n }, (_, i) => i + 1), "every message once, in order");
  assert.deepEqual(gaps, []);
  assert.deepEqual(seen.gaps, []);
  assert.equal(seen.recoveries.length, 1);
  assert.equal(seen.recoveries[0].recovered, true);
  assert.ok(seen.recoveries[0].missed >= 10, `missed ${seen.recoveries[0].missed}`);
});

test("a broker restart that lost history is surfaced: recovered false, and a gap for patterns", async (t) => {
  const broker = await startBroker(t, { BROKER_CHANNELS: HISTORY });
  const client = open(t, broker.wsUrl);
  const seen = record(client);
  const gaps = [];
  const sub = client.subscribe(["h.x", "h.*"], () => {}, { onGap: (g) => gaps.push(`${g.channel} ${g.reason}`) });
  await within(sub.ready);
  await client.publish("h.x", 1);
  const reconnected = new Promise((r) => client.on("reconnect", r));
  await broker.restart(); // SIGTERM: the memory backplane starts a new epoch
  await within(reconnected, 10000, "reconnect");
  assert.deepEqual(gaps.sort(), ["h.* reconnect", "h.x epoch_changed"]);
  assert.deepEqual(
    seen.recoveries.map((r) => [r.channel, r.recovered, r.reason]),
    [["h.x", false, "epoch_changed"]],
  );
  const got = [];
  client.subscribe("h.x", (m) => got.push(m.offset));
  await client.publish("h.x", 2);
  await waitFor(() => got.length === 1);
  assert.deepEqual(got, [1], "tracking goes on in the new epoch");
});

test("a keyed publish whose reply was lost is sent again and not delivered twice", async (t) => {
  const broker = await startBroker(t, { BROKER_CHANNELS: HISTORY });
  const proxy = await new TcpProxy(broker.port).start();
  t.after(() => proxy.close());
  const watcher = open(t, broker.wsUrl);
  const got = [];
  await within(watcher.subscribe("h.k", (m) => got.push(m.data)).ready);
  const client = open(t, proxy.wsUrl);
  await within(client.whenConnected());

  proxy.hold(); // the broker's ok will not come back on this connection
  const keyed = client.publish("h.k", "keyed", { key: "k-42" });
  const unkeyed = client.publish("h.k", "unkeyed").then(() => "resolved", (e) => e);
  await waitFor(() => got.length === 2, 5000, "both delivered once");
  proxy.cut();
  const ack = await within(keyed, 5000, "keyed publish");
  assert.equal(ack.duplicate, true);
  assert.equal(ack.offset, 1);
  assert.ok((await unkeyed) instanceof ConnectionClosedError, "without a key: may or may not have been delivered");
  await client.ping();
  await watcher.ping();
  assert.deepEqual(got, ["keyed", "unkeyed"]);
});

test("tokens: auth first, refresh before expiry without dropping the subscription", async (t) => {
  const broker = await startBroker(t, {
    BROKER_JWT_SECRET: SECRET,
    BROKER_REFRESH_GRACE: "1",
    BROKER_CHANNELS: JSON.stringify([{ pattern: "h.>", history_size: 100 }]),
  });
  const tokens = [];
  const getToken = async ({ reason }) => {
    tokens.push(reason);
    return mintToken("alice", { ttl: 2, subscribe: ["h.>"], publish: ["h.>"] });
  };
  const client = open(t, broker.wsUrl, { getToken });
  const seen = record(client);
  const got = [];
  const sub = client.subscribe("h.t", (m) => got.push(m.data));
  await within(sub.ready);
  assert.equal(client.subject, "alice");
  let n = 0;
  const until = Date.now() + 4500; // past two token lifetimes
  while (Date.now() < until) {
    await client.publish("h.t", ++n);
    await sleep(100);
  }
  await waitFor(() => got.length === n);
  assert.deepEqual(got, Array.from({ length: n }, (_, i) => i + 1));
  assert.ok(tokens.filter((r) => r === "refresh").length >= 2, `token calls: ${tokens}`);
  assert.equal(tokens.filter((r) => r === "connect").length, 1);
  assert.deepEqual(seen.closes, [], "the connection never dropped");
  assert.deepEqual(seen.errors, []);
  assert.equal(sub.closed, false);
});

test("tokens: a refused token closes the client plainly; a narrower refresh ends a subscription", async (t) => {
  const broker = await startBroker(t, { BROKER_JWT_SECRET: SECRET });
  const refused = open(t, broker.wsUrl, { getToken: () => mintToken("bob", { secret: "another-secret-another-secret-!!" }) });
  const errors = record(refused).errors;
  await assert.rejects(within(refused.whenConnected()), { code: "unauthorized" });
  assert.equal(refused.state, "closed");
  assert.deepEqual(errors.map((e) => e.code), ["unauthorized"]);

  let claims = { subscribe: ["a.>", "b.>"] };
  const client = open(t, broker.wsUrl, { getToken: () => mintToken("carol", claims) });
  const seen = record(client);
  const a = client.subscribe("a.x", () => {});
  const bErrors = [];
  const b = client.subscribe("b.x", () => {}, { onError: (e) => bErrors.push(e.code) });
  await within(Promise.all([a.ready, b.ready]));
  claims = { subscribe: ["a.>"] };
  client._refresh(client._ws, "refresh"); // what the timer does, now
  await waitFor(() => b.closed, 5000, "b ended");
  assert.deepEqual(bErrors, ["forbidden"]);
  assert.equal(a.closed, false);
  assert.deepEqual(seen.errors.map((e) => e.code), ["forbidden"]);
});
