// The client against a scripted fake socket: what it does with frames and
// close codes that a real broker sends only in rare conditions.

import assert from "node:assert/strict";
import { test } from "node:test";

import { BrokerError, connect } from "../broker.js";
import { FakeSocket, closingServer, sleep, waitFor, within } from "../testing/helpers.js";

const FAST = { WebSocket: FakeSocket, pingInterval: 0, minReconnectDelay: 10, maxReconnectDelay: 50 };

// A well-behaved broker: channels under "h." keep history in epoch "e1".
function broker({ expiresIn = 3600, top = 0 } = {}) {
  const state = { auths: [], top };
  FakeSocket.script((frame, socket) => {
    if (frame.op === "auth") {
      state.auths.push(frame.token);
      socket.reply({ op: "ok", id: frame.id, sub: "alice", expires_in: expiresIn });
    } else if (frame.op === "subscribe") {
      const extra = frame.channel.startsWith("h.") ? { offset: state.top, epoch: "e1" } : {};
      if (frame.since) Object.assign(extra, { recovered: true });
      socket.reply({ op: "ok", id: frame.id, ...extra });
    } else if (frame.op === "ping") {
      socket.reply({ op: "pong", id: frame.id });
    } else if (frame.id !== undefined) {
      socket.reply({ op: "ok", id: frame.id });
    }
  });
  return state;
}

function recorder(client) {
  const seen = { messages: [], gaps: [], errors: [], recoveries: [] };
  client.on("gap", (g) => seen.gaps.push(g));
  client.on("error", (e) => seen.errors.push(e));
  client.on("recovery", (r) => seen.recoveries.push(r));
  return seen;
}

test("a gap frame reaches the subscriptions holding that channel or pattern", async (t) => {
  broker();
  const client = connect("ws://fake/ws", FAST);
  t.after(() => client.close());
  const gaps = { a: [], b: [] };
  const a = client.subscribe("sensors.>", () => {}, { onGap: (g) => gaps.a.push(g) });
  const b = client.subscribe("other.x", () => {}, { onGap: (g) => gaps.b.push(g) });
  await within(Promise.all([a.ready, b.ready]));
  FakeSocket.last.reply({ op: "gap", channel: "sensors.>", reason: "backplane_interrupted" });
  assert.deepEqual(gaps.a, [{ reason: "backplane_interrupted", channel: "sensors.>", since: null, until: null }]);
  assert.equal(a.gaps, 1);
  assert.equal(a.lastGap.reason, "backplane_interrupted");
  assert.deepEqual(gaps.b, []);
  FakeSocket.last.reply({ op: "gap", channel: "nobody.subscribed", reason: "offset_hole" });
  assert.equal(a.gaps + b.gaps, 1);
});

test("an epoch change between two messages is a gap; a repeated offset is dropped", async (t) => {
  broker();
  const client = connect("ws://fake/ws", FAST);
  t.after(() => client.close());
  const seen = recorder(client);
  const got = [];
  const sub = client.subscribe("h.a", (m) => got.push([m.offset, m.epoch, m.data]));
  await within(sub.ready);
  const socket = FakeSocket.last;
  socket.reply({ op: "message", channel: "h.a", data: 1, offset: 1, epoch: "e1" });
  socket.reply({ op: "message", channel: "h.a", data: 1, offset: 1, epoch: "e1" });
  socket.reply({ op: "message", channel: "h.a", data: 2, offset: 2, epoch: "e1" });
  assert.equal(seen.gaps.length, 0);
  socket.reply({ op: "message", channel: "h.a", data: 3, offset: 1, epoch: "e2" });
  assert.deepEqual(got, [[1, "e1", 1], [2, "e1", 2], [1, "e2", 3]]);
  assert.deepEqual(seen.gaps.map((g) => [g.reason, g.channel]), [["epoch_changed", "h.a"]]);
  assert.equal(sub.gaps, 1);
  assert.deepEqual(client.position("h.a"), { offset: 1, epoch: "e2" });
});

test("a quiet channel whose unused epoch expired (offset 0) changes epoch without a gap", async (t) => {
  broker(); // subscribe replies offset 0: nothing was ever published
  const client = connect("ws://fake/ws", FAST);
  t.after(() => client.close());
  const seen = recorder(client);
  const got = [];
  const sub = client.subscribe("h.q", (m) => got.push([m.offset, m.epoch]));
  await within(sub.ready);
  FakeSocket.last.reply({ op: "message", channel: "h.q", data: 1, offset: 1, epoch: "e2" });
  assert.deepEqual(got, [[1, "e2"]]);
  assert.equal(seen.gaps.length, 0);
  assert.deepEqual(client.position("h.q"), { offset: 1, epoch: "e2" });
});

test("an epoch change the broker announced with a gap frame is one gap, not two", async (t) => {
  broker();
  const client = connect("ws://fake/ws", FAST);
  t.after(() => client.close());
  const seen = recorder(client);
  const sub = client.subscribe("h.a", () => {});
  await within(sub.ready);
  const socket = FakeSocket.last;
  socket.reply({ op: "message", channel: "h.a", data: 1, offset: 1, epoch: "e1" });
  socket.reply({ op: "gap", channel: "h.a", reason: "epoch_changed" });
  socket.reply({ op: "message", channel: "h.a", data: 2, offset: 1, epoch: "e2" });
  assert.deepEqual(seen.gaps.map((g) => [g.reason, g.channel]), [["epoch_changed", "h.a"]]);
  // The announcement covers that one change only: a later one is a gap again.
  socket.reply({ op: "message", channel: "h.a", data: 3, offset: 1, epoch: "e3" });
  assert.equal(sub.gaps, 2);
});

test("after a reconnect: since for tracked channels, recovered:false is a gap, patterns get one", async (t) => {
  const state = broker({ top: 5 });
  const client = connect("ws://fake/ws", FAST);
  t.after(() => client.close());
  const seen = recorder(client);
  const reconnects = [];
  client.on("reconnect", (e) => reconnects.push(e));
  const gaps = [];
  const onGap = (g) => gaps.push(`${g.channel}:${g.reason}`);
  const subs = [
    client.subscribe("h.kept", () => {}, { onGap }),
    client.subscribe("h.lost", () => {}, { onGap }),
    client.subscribe("plain", () => {}, { onGap }),
    client.subscribe("h.*", () => {}, { onGap }),
  ];
  await within(Promise.all(subs.map((s) => s.ready)));
  FakeSocket.last.reply({ op: "message", channel: "h.kept", data: "x", offset: 6, epoch: "e1" });

  state.top = 9;
  const first = FakeSocket.last;
  FakeSocket.script((frame, socket) => {
    if (frame.op !== "subscribe") return;
    if (frame.channel === "h.lost") {
      socket.reply({ op: "ok", id: frame.id, offset: 2, epoch: "e9", recovered: false, reason: "epoch_changed" });
    } else if (frame.since) {
      socket.reply({ op: "ok", id: frame.id, offset: 9, epoch: "e1", recovered: true });
    } else {
      socket.reply({ op: "ok", id: frame.id });
    }
  });
  first.drop(1006);
  await waitFor(() => reconnects.length === 1, 3000, "reconnect");
  const sent = FakeSocket.last.sent.filter((f) => f.op === "subscribe");
  // Exact channels first (their replays precede a pattern's live copies), each with its position.
  assert.deepEqual(
    sent.map((f) => [f.channel, f.since ?? null]),
    [
      ["h.kept", { offset: 6, epoch: "e1" }],
      ["h.lost", { offset: 5, epoch: "e1" }],
      ["plain", null],
      ["h.*", null],
    ],
  );
  assert.deepEqual(gaps.sort(), ["h.*:reconnect", "h.lost:epoch_changed", "plain:reconnect"]);
  const lost = seen.gaps.find((g) => g.channel === "h.lost");
  assert.ok(lost.since !== null && lost.until >= lost.since);
  assert.deepEqual(
    seen.recoveries.map((r) => [r.channel, r.recovered, r.reason ?? null, r.missed ?? null]),
    [["h.kept", true, null, 3], ["h.lost", false, "epoch_changed", null]],
  );
  assert.deepEqual(client.position("h.lost"), { offset: 2, epoch: "e9" });
  assert.equal(client.reconnects, 1);
});

test("unsubscribed ends the subscriptions holding it with forbidden, and only those", async (t) => {
  broker();
  const client = connect("ws://fake/ws", FAST);
  t.after(() => client.close());
  const seen = recorder(client);
  const errors = [];
  const gone = client.subscribe(["secret.>", "public.a"], () => {}, { onError: (e) => errors.push(e.code) });
  const kept = client.subscribe("public.a", () => {});
  await within(Promise.all([gone.ready, kept.ready]));
  FakeSocket.last.reply({ op: "unsubscribed", channel: "secret.>", code: "forbidden" });
  assert.equal(gone.closed, true);
  assert.equal(gone.error.code, "forbidden");
  assert.deepEqual(errors, ["forbidden"]);
  assert.equal(kept.closed, false);
  assert.deepEqual(seen.errors.map((e) => e.code), ["forbidden"]);
  await sleep(10);
  // public.a is still held by `kept`: no unsubscribe for it; secret.> needs none.
  assert.deepEqual(FakeSocket.last.sent.filter((f) => f.op === "unsubscribe"), []);
});

test("a subscription the broker refuses on re-subscribing ends with the error", async (t) => {
  broker();
  const client = connect("ws://fake/ws", FAST);
  t.after(() => client.close());
  const seen = recorder(client);
  const errors = [];
  const gone = client.subscribe(["a.x", "b.x"], () => {}, { onError: (e) => errors.push(e.code) });
  const kept = client.subscribe("b.x", () => {});
  await within(Promise.all([gone.ready, kept.ready]));
  const first = FakeSocket.last;
  FakeSocket.script((frame, socket) => {
    if (frame.channel === "a.x") socket.reply({ op: "error", id: frame.id, code: "forbidden", message: "no" });
    else socket.reply({ op: "ok", id: frame.id });
  });
  first.drop(1006);
  await waitFor(() => gone.closed, 3000, "the refused subscription ended");
  assert.deepEqual(errors, ["forbidden"]);
  assert.equal(gone.error.code, "forbidden");
  assert.deepEqual(seen.errors.map((e) => e.code), ["forbidden"]);
  await waitFor(() => client.reconnects === 1, 3000, "reconnect");
  assert.equal(kept.closed, false, "b.x is still held");
  assert.deepEqual(FakeSocket.last.sent.filter((f) => f.op === "unsubscribe"), []);
});

test("unsubscribing while the subscribe is in flight: unsubscribed after the ok, unless wanted again", async (t) => {
  const held = [];
  FakeSocket.script((frame, socket) => {
    if (frame.op === "subscribe") held.push(() => socket.reply({ op: "ok", id: frame.id }));
    else socket.reply({ op: "ok", id: frame.id });
  });
  const client = connect("ws://fake/ws", FAST);
  t.after(() => client.close());
  await within(client.whenConnected());
  const wire = () => FakeSocket.last.sent.filter((f) => f.op !== "ping").map((f) => `${f.op} ${f.channel}`);

  const a = client.subscribe("x", () => {});
  await a.unsubscribe();
  const b = client.subscribe("x", () => {}); // wanted again: the subscribe in flight serves it
  held.shift()();
  await within(b.ready);
  assert.deepEqual(wire(), ["subscribe x"]);

  const c = client.subscribe("y", () => {});
  await c.unsubscribe();
  held.shift()();
  await waitFor(() => wire().length === 3, 1000, "unsubscribe y");
  assert.deepEqual(wire(), ["subscribe x", "subscribe y", "unsubscribe y"]);
});

test("the token is refreshed before it expires, on the same connection", async (t) => {
  const state = broker({ expiresIn: 1 });
  let n = 0;
  const client = connect("ws://fake/ws", { ...FAST, getToken: ({ reason }) => `t${++n}-${reason}` });
  t.after(() => client.close());
  const auths = [];
  client.on("auth", (e) => auths.push(e));
  await within(client.whenConnected());
  assert.equal(FakeSocket.last.sent[0].op, "auth", "auth goes first");
  assert.equal(client.subject, "alice");
  await waitFor(() => state.auths.length >= 3, 4000, "two refreshes");
  assert.deepEqual(state.auths.slice(0, 3), ["t1-connect", "t2-refresh", "t3-refresh"]);
  assert.equal(FakeSocket.sockets.length, 1, "no reconnection");
  assert.deepEqual(auths.map((a) => a.refresh), [false, true, true]);
  assert.equal(auths[1].expiresIn, 1);
});

test("a request refused with token_expired is sent again after the refresh", async (t) => {
  const state = { expired: false, auths: 0 };
  FakeSocket.script((frame, socket) => {
    if (frame.op === "auth") {
      state.auths += 1;
      state.expired = false;
      socket.reply({ op: "ok", id: frame.id, sub: "alice", expires_in: 3600 });
    } else if (state.expired) {
      socket.reply({ op: "error", id: frame.id, code: "token_expired", message: "expired" });
    } else {
      socket.reply({ op: "ok", id: frame.id });
    }
  });
  const client = connect("ws://fake/ws", { ...FAST, getToken: () => "tok" });
  t.after(() => client.close());
  await within(client.whenConnected());
  state.expired = true;
  // The broker says so (id null), but a publish already on its way is refused.
  const published = client.publish("a.b", 1);
  FakeSocket.last.reply({ op: "error", id: null, code: "token_expired", message: "expired" });
  assert.deepEqual(await within(published), { duplicate: false });
  assert.equal(state.auths, 2);
  const publishes = FakeSocket.last.sent.filter((f) => f.op === "publish");
  assert.equal(publishes.length, 2, "sent, refused, sent again");
});

test("unauthorized at the first connection closes the client plainly", async (t) => {
  FakeSocket.script((frame, socket) => {
    if (frame.op === "auth") socket.reply({ op: "error", id: frame.id, code: "unauthorized", message: "token expired" });
  });
  const client = connect("ws://fake/ws", { ...FAST, getToken: () => "old" });
  t.after(() => client.close());
  const seen = recorder(client);
  const sub = client.subscribe("a", () => {});
  await assert.rejects(within(client.whenConnected()), (e) => e instanceof BrokerError && e.code === "unauthorized");
  assert.equal(client.state, "closed");
  assert.deepEqual(seen.errors.map((e) => [e.code, e.message]), [["unauthorized", "token expired"]]);
  await assert.rejects(sub.ready, { code: "unauthorized" });
  await assert.rejects(client.publish("a", 1), { code: "unauthorized" });
  assert.equal(FakeSocket.sockets.length, 1, "no retry");
});

test("getToken failing is a failed attempt: reported, then retried", async (t) => {
  broker();
  let calls = 0;
  const getToken = async () => {
    calls += 1;
    if (calls === 1) throw new Error("token service down");
    return "tok";
  };
  const client = connect("ws://fake/ws", { ...FAST, getToken });
  t.after(() => client.close());
  const seen = recorder(client);
  await within(client.whenConnected(), 3000);
  assert.equal(calls, 2);
  assert.deepEqual(seen.errors.map((e) => e.code), ["token_unavailable"]);
  assert.match(seen.errors[0].message, /token service down/);
});

test("a keyed publish is sent again when the connection drops before the reply", async (t) => {
  let publishes = 0;
  FakeSocket.script((frame, socket) => {
    if (frame.op !== "publish") return socket.reply({ op: "ok", id: frame.id });
    publishes += 1;
    if (publishes === 1) return socket.drop(1006); // the reply never comes
    socket.reply({ op: "ok", id: frame.id, duplicate: true, offset: 7, epoch: "e1" });
  });
  const client = connect("ws://fake/ws", FAST);
  t.after(() => client.close());
  await within(client.whenConnected());
  const ack = await within(client.publish("h.a", { n: 1 }, { key: "k-1" }), 3000);
  assert.deepEqual(ack, { duplicate: true, offset: 7, epoch: "e1" });
  assert.deepEqual(FakeSocket.last.sent.find((f) => f.op === "publish").key, "k-1");

  // Without a key it may or may not have been delivered: the caller is told.
  publishes = 0;
  await assert.rejects(within(client.publish("h.a", 2), 3000), { code: "connection_closed" });
  await assert.rejects(client.publish("h.a", 2, { key: "" }), TypeError);
});

test("since and history ask for one exact channel", async (t) => {
  broker({ top: 10 });
  const client = connect("ws://fake/ws", FAST);
  t.after(() => client.close());
  assert.throws(() => client.subscribe("h.*", () => {}, { history: 5 }), TypeError);
  assert.throws(() => client.subscribe(["h.a", "h.b"], () => {}, { history: 5 }), TypeError);
  assert.throws(() => client.subscribe("h.a", () => {}, { since: { offset: -1, epoch: "x" } }), TypeError);
  assert.throws(() => client.subscribe("h.a", () => {}, { history: 2, since: { offset: 1, epoch: "e" } }), TypeError);
  const sub = client.subscribe("h.a", () => {}, { history: 4 });
  await within(sub.ready);
  assert.equal(FakeSocket.last.sent.find((f) => f.op === "subscribe").history, 4);
  // Tracking starts just before the replayed messages.
  assert.deepEqual(client.position("h.a"), { offset: 6, epoch: "e1" });
  const again = client.subscribe("h.a", () => {}, { history: 2 });
  await assert.rejects(again.ready, { code: "bad_request" });
});

test("after 1012 the client comes back within restartDelay and recovers with since", async (t) => {
  broker({ top: 3 });
  const client = connect("ws://fake/ws", { ...FAST, minReconnectDelay: 5000, maxReconnectDelay: 5000, restartDelay: 100 });
  t.after(() => client.close());
  const closes = [];
  client.on("close", (e) => closes.push(e));
  await within(client.subscribe("h.a", () => {}).ready);
  FakeSocket.last.reply({ op: "message", channel: "h.a", data: 1, offset: 4, epoch: "e1" });
  const started = Date.now();
  FakeSocket.last.drop(1012, "service restart");
  await waitFor(() => client.reconnects === 1, 2000, "reconnect");
  assert.ok(Date.now() - started < 1000, "not the 5 s backoff");
  assert.ok(closes[0].delay < 100);
  const resubscribe = FakeSocket.last.sent.find((f) => f.op === "subscribe");
  assert.deepEqual(resubscribe.since, { offset: 4, epoch: "e1" });
});

test("close code 1012 reconnects after a short random delay; 1008 and 1013 back off", async (t) => {
  for (const [code, low, high] of [[1012, 0, 300], [1008, 1000, 2000], [1013, 1000, 2000], [1001, 0, 1000]]) {
    const server = await closingServer(code, 20);
    t.after(() => server.close());
    const client = connect(server.url, {
      pingInterval: 0, minReconnectDelay: 1000, maxReconnectDelay: 2000, restartDelay: 300,
    });
    const closes = [];
    client.on("close", (e) => closes.push(e));
    await waitFor(() => closes.length >= 1, 5000, `close ${code}`);
    client.close();
    assert.equal(closes[0].code, code);
    assert.ok(closes[0].willReconnect);
    assert.ok(closes[0].delay >= low && closes[0].delay < high, `${code}: delay ${closes[0].delay}`);
  }
});
