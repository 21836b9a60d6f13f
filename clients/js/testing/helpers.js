// Test helpers: a real broker process, tokens, a fault-injecting TCP proxy, waits with time-outs.
//
// The broker runs as `python -m broker serve` on free ports, from the
// repository this package lives in. The Python interpreter is
// $WSBROKER_PYTHON, else the repository's .venv, else python3.

import { spawn } from "node:child_process";
import { createHmac, createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { createServer, connect as tcpConnect } from "node:net";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
export const SECRET = "node-tests-secret-node-tests-secret!!";

function python() {
  if (process.env.WSBROKER_PYTHON) return process.env.WSBROKER_PYTHON;
  const venv = join(REPO, ".venv", "bin", "python");
  return existsSync(venv) ? venv : "python3";
}

/** A TCP port nothing listens on right now. */
export function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/** Poll `predicate` every 10 ms; reject after `timeout` ms. */
export async function waitFor(predicate, timeout = 5000, what = "condition") {
  const deadline = Date.now() + timeout;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`${what} not reached within ${timeout} ms`);
    await sleep(10);
  }
}

/** Settle with `promise`, or reject after `timeout` ms. */
export function within(promise, timeout = 5000, what = "promise") {
  let timer;
  const limit = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} not settled within ${timeout} ms`)), timeout);
  });
  return Promise.race([promise, limit]).finally(() => clearTimeout(timer));
}

/** One broker process on fixed ports, which survive restarts. */
export class Broker {
  constructor(env = {}) {
    this.env = env;
    this.proc = null;
    this.log = "";
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  get httpUrl() {
    return `http://127.0.0.1:${this.httpPort}`;
  }

  async start(timeout = 20000) {
    this.port ??= await freePort();
    this.httpPort ??= await freePort();
    const args = ["-m", "broker", "serve", "--host", "127.0.0.1", "--port", String(this.port),
      "--http-port", String(this.httpPort), "--log-level", "warning"];
    // Only this test's BROKER_* settings: none leak in from the shell.
    const inherited = Object.entries(process.env).filter(([name]) => !name.startsWith("BROKER_"));
    const env = { ...Object.fromEntries(inherited), PYTHONUNBUFFERED: "1", ...this.env };
    this.proc = spawn(python(), args, { cwd: REPO, env, stdio: ["ignore", "pipe", "pipe"] });
    const keep = (chunk) => {
      this.log = (this.log + chunk.toString()).slice(-8000);
    };
    this.proc.stdout.on("data", keep);
    this.proc.stderr.on("data", keep);
    const exited = new Promise((r) => this.proc.once("exit", (code) => r(code)));
    this.exited = exited;
    const deadline = Date.now() + timeout;
    for (;;) {
      if (this.proc.exitCode !== null) throw new Error(`the broker exited (${this.proc.exitCode}):\n${this.log}`);
      try {
        const response = await fetch(`http://127.0.0.1:${this.port}/healthz`, { signal: AbortSignal.timeout(1000) });
        if (response.ok) return this;
      } catch {
        // not listening yet
      }
      if (Date.now() > deadline) {
        await this.kill();
        throw new Error(`the broker was not ready within ${timeout} ms:\n${this.log}`);
      }
      await sleep(50);
    }
  }

  /** SIGTERM, then SIGKILL after `timeout` ms; resolves with the exit code. */
  async stop(timeout = 10000) {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return proc?.exitCode ?? null;
    proc.kill("SIGTERM");
    let timer;
    const late = new Promise((r) => {
      timer = setTimeout(() => {
        proc.kill("SIGKILL");
        r(null);
      }, timeout);
    });
    const code = await Promise.race([this.exited, late]);
    clearTimeout(timer);
    await this.exited;
    return code;
  }

  async kill() {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    proc.kill("SIGKILL");
    await within(this.exited, 5000, "broker exit");
  }

  async restart({ kill = false } = {}) {
    if (kill) await this.kill();
    else await this.stop();
    await this.start();
  }

  /** POST /publish on the service API; resolves with the JSON answer. */
  async publish(channel, data, headers = {}) {
    const response = await fetch(`${this.httpUrl}/publish`, {
      method: "POST",
      headers: { "Content-Type": "application/json", ...headers },
      body: JSON.stringify({ channel, data }),
      signal: AbortSignal.timeout(5000),
    });
    return response.json();
  }
}

/** Start a broker with these BROKER_* variables; `t.after` stops it. */
export async function startBroker(t, env = {}) {
  const broker = new Broker(env);
  await broker.start();
  t.after(() => broker.stop());
  return broker;
}

function base64url(value) {
  return Buffer.from(typeof value === "string" ? value : JSON.stringify(value)).toString("base64url");
}

/** An HS256 JWT for `sub`, valid `ttl` seconds, with `claims` added. */
export function mintToken(sub, { ttl = 3600, secret = SECRET, ...claims } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const head = base64url({ alg: "HS256", typ: "JWT" });
  const body = base64url({ sub, exp: now + ttl, iat: now, ...claims });
  const signature = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${signature}`;
}

/**
 * A TCP proxy to `port` on 127.0.0.1, with faults on demand: `cut()` resets
 * every connection, `hold()` keeps the broker's bytes from reaching clients
 * (what a client sends still goes through) until `cut()` or `release()`.
 */
export class TcpProxy {
  constructor(targetPort) {
    this.targetPort = targetPort;
    this.sockets = new Set();
    this.holding = false;
    this.accepted = 0;
  }

  async start() {
    this.server = createServer((client) => this._accept(client));
    await new Promise((r) => this.server.listen(0, "127.0.0.1", r));
    this.port = this.server.address().port;
    return this;
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  _accept(client) {
    this.accepted += 1;
    const upstream = tcpConnect(this.targetPort, "127.0.0.1");
    const pair = { client, upstream, held: [] };
    this.sockets.add(pair);
    client.on("data", (chunk) => upstream.write(chunk));
    upstream.on("data", (chunk) => {
      if (this.holding) pair.held.push(chunk);
      else client.write(chunk);
    });
    const end = () => {
      client.destroy();
      upstream.destroy();
      this.sockets.delete(pair);
    };
    client.on("error", end).on("close", end);
    upstream.on("error", end).on("close", end);
  }

  hold() {
    this.holding = true;
  }

  release() {
    this.holding = false;
    for (const pair of this.sockets) {
      for (const chunk of pair.held.splice(0)) pair.client.write(chunk);
    }
  }

  /** Reset every open connection (what was held is dropped); new ones are accepted. */
  cut() {
    this.holding = false;
    for (const pair of [...this.sockets]) {
      pair.held = [];
      pair.client.resetAndDestroy();
      pair.upstream.destroy();
    }
  }

  close() {
    this.cut();
    return new Promise((r) => this.server.close(r));
  }
}

/**
 * A tiny WebSocket server that accepts every connection and closes it with
 * `code` after `after` ms: enough to see how the client reacts to a close code.
 */
export async function closingServer(code, after = 50) {
  const connections = [];
  const sockets = new Set();
  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.on("error", () => {});
    socket.once("data", (head) => {
      const key = /sec-websocket-key:\s*(\S+)/i.exec(head.toString())?.[1] ?? "";
      const accept = createHash("sha1").update(`${key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest("base64");
      socket.write(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
          `Sec-WebSocket-Accept: ${accept}\r\n\r\n`,
      );
      connections.push(Date.now());
      setTimeout(() => {
        // A close frame: FIN + opcode 8, payload = the code, big-endian.
        socket.end(Buffer.from([0x88, 0x02, code >> 8, code & 0xff]));
      }, after);
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    url: `ws://127.0.0.1:${server.address().port}/ws`,
    connections,
    close: () =>
      new Promise((r) => {
        for (const socket of sockets) socket.destroy();
        server.close(r);
      }),
  };
}

/**
 * A scripted stand-in for WebSocket, for tests of what the client does with
 * frames no real broker sends on demand. `FakeSocket.script(handler)` sets
 * `handler(frame, socket)`, called for each frame the client sends; the
 * socket's `reply(obj)` and `drop(code)` act as the broker.
 */
export class FakeSocket {
  static sockets = [];
  static handler = () => {};

  static script(handler) {
    FakeSocket.sockets = [];
    FakeSocket.handler = handler;
  }

  static get last() {
    return FakeSocket.sockets.at(-1);
  }

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.sockets.push(this);
    setTimeout(() => {
      if (this.readyState !== 0) return;
      this.readyState = 1;
      this.onopen?.({});
    }, 0);
  }

  send(text) {
    if (this.readyState !== 1) throw new Error("not open");
    const frame = JSON.parse(text);
    this.sent.push(frame);
    queueMicrotask(() => FakeSocket.handler(frame, this));
  }

  reply(frame) {
    if (this.readyState === 1) this.onmessage?.({ data: JSON.stringify(frame) });
  }

  drop(code = 1006, reason = "") {
    if (this.readyState > 1) return;
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  close(code = 1000, reason = "") {
    this.drop(code, reason);
  }
}
