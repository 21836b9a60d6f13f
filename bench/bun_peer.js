// Bun's native WebSocket pub/sub (uWebSockets inside), speaking the broker's JSON
// frames so the bench's load generator drives it unchanged: the peer of
// bench/peers.py. Subscribe is ws.subscribe(channel), publish is
// server.publish(channel, message): Bun frames each message once and writes
// each connection's pending messages once per loop iteration, like the broker.
// No validation, no authentication, no history. Past backpressureLimit (16 MiB
// by default) Bun drops a connection's messages silently.
//
// Usage: bun bench/bun_peer.js --host 127.0.0.1 --port 8000

function arg(name, fallback) {
  const i = Bun.argv.indexOf(name);
  return i >= 0 && i + 1 < Bun.argv.length ? Bun.argv[i + 1] : fallback;
}

const hostname = arg("--host", "127.0.0.1");
const port = Number(arg("--port", "8000"));

function reply(ws, id, error) {
  if (id === undefined || id === null) return;
  ws.send(
    error === undefined
      ? JSON.stringify({ op: "ok", id })
      : JSON.stringify({ op: "error", id, code: "bad_request", message: error }),
  );
}

const server = Bun.serve({
  hostname,
  port,
  fetch(req, srv) {
    if (new URL(req.url).pathname === "/ws" && srv.upgrade(req)) return undefined;
    return new Response("not found\n", { status: 404 });
  },
  websocket: {
    perMessageDeflate: false,
    message(ws, raw) {
      let frame;
      try {
        frame = JSON.parse(raw);
      } catch {
        reply(ws, -1, "not JSON");
        return;
      }
      const { op, id, channel } = frame;
      if (typeof channel !== "string") {
        reply(ws, id, "channel must be a string");
      } else if (op === "subscribe") {
        ws.subscribe(channel);
        reply(ws, id);
      } else if (op === "publish") {
        server.publish(channel, JSON.stringify({ op: "message", channel, data: frame.data }));
        reply(ws, id);
      } else if (op === "unsubscribe") {
        ws.unsubscribe(channel);
        reply(ws, id);
      } else {
        reply(ws, id, "unknown op");
      }
    },
  },
});

console.log(`bun peer listening on ${server.hostname}:${server.port}`);
for (const sig of ["SIGTERM", "SIGINT"]) {
  process.on(sig, () => {
    server.stop(true);
    process.exit(0);
  });
}
