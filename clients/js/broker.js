// Browser client of the pub/sub broker, wire protocol version 1.
//
// One dependency-free ES module, served by the broker at /client/broker.js:
//
//   import { connect } from "/client/broker.js";
//   const client = connect(`ws://${location.host}/ws`);
//   client.subscribe("sensors.>", (msg) => console.log(msg.channel, msg.data));
//   await client.publish("sensors.kitchen", { t: 21.5 });
//
// Theory of operation. The client owns one WebSocket at a time. Requests get
// an integer id; each waits in `pending` for the reply with the same id, under
// its own time-out. When the socket drops, idempotent requests (subscribe,
// ping) go back to the queue and are sent again on the next socket; a publish
// that was already sent fails with ConnectionClosedError, because it may or
// may not have been delivered. The client reconnects with capped, jittered
// exponential backoff, re-subscribes every pattern that a subscription still
// holds, and then reports a gap (messages published while it was away may be
// lost) to each subscription's onGap and to "gap"/"reconnect" listeners. An
// application-level ping every `pingInterval` ms notices a connection that is
// dead without the browser knowing (a sleeping laptop, a dropped NAT entry).
//
// Types: /client/broker.d.ts.

/** Every wire error code of protocol version 1. */
export const ERROR_CODES = Object.freeze([
  "bad_frame",
  "bad_request",
  "bad_channel",
  "not_subscribed",
  "too_large",
  "forbidden",
  "rate_limited",
  "limit_exceeded",
  "unavailable",
  "internal",
]);

/** An error the broker answered with; `code` is the wire code. Base of the client's errors. */
export class BrokerError extends Error {
  constructor(code, message, requestId = null) {
    super(message);
    this.name = "BrokerError";
    this.code = code;
    this.requestId = requestId;
  }
}

/** No connection, or it dropped before the reply: code "connection_closed". */
export class ConnectionClosedError extends BrokerError {
  constructor(message, closeCode = null, closeReason = "") {
    super("connection_closed", message);
    this.name = "ConnectionClosedError";
    this.closeCode = closeCode;
    this.closeReason = closeReason;
  }
}

/** No reply within the time-out: code "timeout". */
export class RequestTimeoutError extends BrokerError {
  constructor(message) {
    super("timeout", message);
    this.name = "RequestTimeoutError";
  }
}

/** Tell whether `channel` matches `pattern` (`*` one token, `>` one or more trailing tokens). */
export function matches(pattern, channel) {
  if (pattern === channel) return true;
  if (!pattern.includes("*") && !pattern.includes(">")) return false;
  const want = pattern.split(".");
  const have = channel.split(".");
  for (let i = 0; i < want.length; i++) {
    if (want[i] === ">" && i === want.length - 1) return have.length > i;
    if (i >= have.length) return false;
    if (want[i] !== "*" && want[i] !== have[i]) return false;
  }
  return have.length === want.length;
}

const DEFAULTS = Object.freeze({
  requestTimeout: 10000,
  openTimeout: 10000,
  pingInterval: 15000,
  pingTimeout: 10000,
  minReconnectDelay: 200,
  maxReconnectDelay: 10000,
  stableAfter: 5000,
  reconnect: true,
  maxAttempts: Infinity,
  outboxSize: 1000,
  WebSocket: undefined,
});

function defaultUrl() {
  const loc = globalThis.location;
  if (!loc || !loc.host) return "ws://localhost:8000/ws";
  return `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}/ws`;
}

function report(error) {
  // An exception thrown by application code (a callback, a listener) must not
  // break the client's loop; rethrow it on its own so the console shows it.
  setTimeout(() => {
    throw error;
  }, 0);
}

/** The handle `subscribe()` returns. */
export class Subscription {
  constructor(client, patterns, callback, options) {
    this.patterns = patterns;
    this.gaps = 0;
    this.lastGap = null;
    this.closed = false;
    this.error = null;
    this._client = client;
    this._callback = callback;
    this._onGap = options.onGap || null;
    this._onError = options.onError || null;
    this._generation = client._generation;
    this._settled = false;
    this.ready = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    // Awaiting `ready` is optional: do not report a failure as unhandled
    // (it still goes to onError and to the client's "error" listeners).
    this.ready.catch(() => {});
  }

  /** Stop receiving. Resolves once the broker confirmed (or at once when offline). */
  unsubscribe() {
    return this._client._unsubscribe(this);
  }

  _deliver(message) {
    try {
      this._callback(message);
    } catch (error) {
      report(error);
    }
  }

  _gap(gap) {
    this.gaps += 1;
    this.lastGap = gap;
    if (this._onGap) {
      try {
        this._onGap(gap);
      } catch (error) {
        report(error);
      }
    }
  }

  _end(error) {
    if (this.closed) return;
    this.closed = true;
    this.error = error || null;
    if (!this._settled) {
      this._settled = true;
      this._reject(error || new ConnectionClosedError("the subscription ended before the broker confirmed it"));
    }
    if (error && this._onError) {
      try {
        this._onError(error);
      } catch (e) {
        report(e);
      }
    }
  }
}

/**
 * A connection to the broker that reconnects and re-subscribes by itself.
 * Create it with `connect(url, options)`, which also starts it.
 */
export class BrokerClient {
  constructor(url = defaultUrl(), options = {}) {
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    this.state = "new";
    this.reconnects = 0;
    this._WebSocket = this.options.WebSocket || globalThis.WebSocket;
    this._ws = null; // the socket being opened or open
    this._open = false; // true while `_ws` is open
    this._generation = 0; // counts opened sockets
    this._nextId = 0;
    this._pending = new Map(); // id -> request entry, sent on the current socket
    this._queue = []; // request entries waiting for a socket
    this._outbox = []; // fire-and-forget frames waiting for a socket
    this._subs = new Set();
    this._patterns = new Map(); // pattern -> { count, confirmed, sub: Promise }
    this._listeners = new Map();
    this._attempt = 0; // backoff step
    this._failures = 0; // attempts in a row that never opened
    this._tries = 0; // sockets created since the last open
    this._downSince = null;
    this._openedAt = 0;
    this._reconnectTimer = null;
    this._openTimer = null;
    this._pingTimer = null;
    this._onOnline = () => {
      if (this._reconnectTimer !== null) {
        clearTimeout(this._reconnectTimer);
        this._reconnectTimer = null;
        this._connect();
      }
    };
  }

  /** True while a connection is open. */
  get connected() {
    return this._open;
  }

  /** Start connecting (`connect()` calls it). */
  start() {
    if (this.state !== "new") return this;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError("no WebSocket implementation: pass options.WebSocket");
    }
    globalThis.addEventListener?.("online", this._onOnline);
    this._connect();
    return this;
  }

  /** Close for good: reject what waits, end every subscription. */
  close() {
    if (this.state === "closed") return;
    const ws = this._ws;
    this._shut(new ConnectionClosedError("the client is closed"), false);
    if (ws) {
      try {
        ws.close(1000, "client closed");
      } catch {
        // already closing
      }
    }
  }

  /** Add a listener; returns a function that removes it. Events: see broker.d.ts. */
  on(type, listener) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(listener);
    return () => this.off(type, listener);
  }

  off(type, listener) {
    this._listeners.get(type)?.delete(listener);
  }

  /** Resolve once a connection is open (reject if the client closes first). */
  whenConnected() {
    if (this._open) return Promise.resolve();
    if (this.state === "closed") return Promise.reject(this._finalError);
    return new Promise((resolve, reject) => {
      const offOpen = this.on("open", () => {
        offOpen();
        offState();
        resolve();
      });
      const offState = this.on("state", ({ state }) => {
        if (state === "closed") {
          offOpen();
          offState();
          reject(this._finalError);
        }
      });
    });
  }

  /**
   * Subscribe `callback(message)` to one pattern or an array of patterns.
   * Returns a Subscription at once; `subscription.ready` settles when the
   * broker confirmed (or refused: then the subscription ends with the error,
   * also given to `options.onError` and to "error" listeners).
   */
  subscribe(patterns, callback, options = {}) {
    const list = [...new Set(Array.isArray(patterns) ? patterns : [patterns])];
    if (list.length === 0 || list.some((p) => typeof p !== "string")) {
      throw new TypeError("subscribe needs a channel or pattern string, or an array of them");
    }
    if (typeof callback !== "function") throw new TypeError("subscribe needs a callback");
    const sub = new Subscription(this, list, callback, options);
    if (this.state === "closed") {
      sub._end(this._finalError);
      return sub;
    }
    this._subs.add(sub);
    const confirmations = list.map((pattern) => {
      let entry = this._patterns.get(pattern);
      if (!entry) {
        entry = { count: 0, confirmed: false, ready: null };
        this._patterns.set(pattern, entry);
        entry.ready = this._request({ op: "subscribe", channel: pattern }, { retry: true }).then(
          () => {
            entry.confirmed = true;
            // Every subscription holding it ended while the request was in flight.
            if (this._patterns.get(pattern) !== entry) this._unsubscribeWire([pattern]);
          },
        );
      }
      entry.count += 1;
      return entry.ready;
    });
    Promise.all(confirmations).then(
      () => {
        if (!sub._settled) {
          sub._settled = true;
          sub._resolve();
        }
      },
      (error) => {
        if (sub.closed) return;
        this._unsubscribeWire(this._dropSub(sub));
        this._emit("error", error);
        sub._end(error);
      },
    );
    return sub;
  }

  /**
   * Publish `data` (any JSON value) to `channel`. Resolves on the broker's ok;
   * rejects with a BrokerError (`.code`: "bad_channel", "too_large", ...),
   * RequestTimeoutError, or ConnectionClosedError if the connection dropped
   * before the reply (the message may or may not have been delivered).
   */
  publish(channel, data, options = {}) {
    const check = checkData(data);
    if (check) return Promise.reject(check);
    return this._request({ op: "publish", channel, data }, { retry: false, timeout: options.timeout }).then(
      () => undefined,
    );
  }

  /**
   * Publish without waiting for any reply (fire and forget). Sent at once when
   * connected, else queued (at most `outboxSize` frames, oldest dropped) until
   * the next connection. Returns true if it was sent at once. A refusal comes
   * back as an "error" event.
   */
  publishNoWait(channel, data) {
    const check = checkData(data);
    if (check) throw check;
    if (this.state === "closed") throw this._finalError;
    const frame = JSON.stringify({ op: "publish", channel, data });
    if (this._open) {
      this._ws.send(frame);
      return true;
    }
    this._outbox.push(frame);
    if (this._outbox.length > this.options.outboxSize) this._outbox.shift();
    return false;
  }

  /** Send an application-level ping; resolves with the round trip in ms. */
  ping(options = {}) {
    const started = performance.now();
    return this._request({ op: "ping" }, { retry: true, timeout: options.timeout }).then(
      () => performance.now() - started,
    );
  }

  // -- internals ---------------------------------------------------------------

  _emit(type, detail) {
    const listeners = this._listeners.get(type);
    if (!listeners) return;
    for (const listener of [...listeners]) {
      try {
        listener(detail);
      } catch (error) {
        report(error);
      }
    }
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", { state });
  }

  _request(fields, { retry, timeout, noWait = false }) {
    if (this.state === "closed") return Promise.reject(this._finalError);
    if (noWait && !this._open) return Promise.reject(new ConnectionClosedError("not connected"));
    const limit = timeout ?? this.options.requestTimeout;
    return new Promise((resolve, reject) => {
      const entry = { fields, retry, resolve, reject, id: null, timer: null };
      entry.timer = setTimeout(() => {
        this._forget(entry);
        reject(new RequestTimeoutError(`no reply to ${fields.op} within ${limit} ms`));
      }, limit);
      if (this._open) this._send(entry);
      else this._queue.push(entry);
    });
  }

  _send(entry) {
    entry.id = ++this._nextId;
    this._pending.set(entry.id, entry);
    this._ws.send(JSON.stringify({ op: entry.fields.op, id: entry.id, ...entry.fields }));
  }

  _forget(entry) {
    if (entry.id !== null) this._pending.delete(entry.id);
    const i = this._queue.indexOf(entry);
    if (i >= 0) this._queue.splice(i, 1);
  }

  _settle(entry, error, reply) {
    clearTimeout(entry.timer);
    this._forget(entry);
    if (error) entry.reject(error);
    else entry.resolve(reply);
  }

  _connect() {
    this._reconnectTimer = null;
    if (this.state === "closed") return;
    this._setState(this._downSince === null && this._generation === 0 ? "connecting" : "reconnecting");
    let ws;
    try {
      ws = new this._WebSocket(this.url);
    } catch (error) {
      // A malformed URL: no point in retrying.
      this._shut(new ConnectionClosedError(`cannot connect to ${this.url}: ${error.message}`), true);
      return;
    }
    this._ws = ws;
    this._tries += 1;
    this._openTimer = setTimeout(() => this._abandon(ws, "open timed out", 1006), this.options.openTimeout);
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (event) => this._onFrame(event.data);
    ws.onclose = (event) => this._onClose(ws, event.code, event.reason);
    // Browsers follow "error" with "close"; some WebSocket implementations do
    // not when the connection never opened, so a failed attempt ends here.
    ws.onerror = () => {
      if (ws === this._ws && !this._open) this._abandon(ws, "connection failed", 1006);
    };
  }

  _abandon(ws, reason, code = 4000) {
    // Closing a dead socket can take minutes to report: detach it, and act now.
    if (ws !== this._ws) return;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(4000, reason);
    } catch {
      // not open yet, or already closing
    }
    this._onClose(ws, code, reason);
  }

  _onOpen(ws) {
    if (ws !== this._ws) return;
    clearTimeout(this._openTimer);
    this._open = true;
    this._openedAt = Date.now();
    this._generation += 1;
    const generation = this._generation;
    const wasDown = this._downSince;
    const attempts = this._tries;
    this._tries = 0;
    this._setState("open");
    this._emit("open", { reconnect: wasDown !== null });
    this._schedulePing();

    // Re-subscribe what was confirmed before; patterns never confirmed are
    // still in the queue and are sent with it below.
    const patterns = [...this._patterns].filter(([, e]) => e.confirmed).map(([p]) => p);
    const resubscribed = patterns.map((channel) =>
      this._request({ op: "subscribe", channel }, { retry: false }),
    );
    for (const entry of this._queue.splice(0)) this._send(entry);
    for (const frame of this._outbox.splice(0)) ws.send(frame);

    Promise.allSettled(resubscribed).then((results) => {
      if (generation !== this._generation || !this._open) return; // dropped again meanwhile
      if (results.some((r) => r.status === "rejected" && r.reason instanceof RequestTimeoutError)) {
        this._abandon(ws, "re-subscribe timed out"); // try again on a fresh connection
        return;
      }
      results.forEach((result, i) => {
        if (result.status === "rejected" && result.reason instanceof BrokerError) {
          const error = result.reason;
          if (error.code === "timeout" || error.code === "connection_closed") return;
          // The broker now refuses this pattern: its subscriptions cannot be restored.
          this._emit("error", error);
          for (const sub of [...this._subs]) {
            if (sub.patterns.includes(patterns[i])) {
              this._unsubscribeWire(this._dropSub(sub));
              sub._end(error);
            }
          }
        }
      });
      if (wasDown === null) return;
      const gap = { reason: "reconnect", since: wasDown, until: Date.now() };
      this._downSince = null;
      this.reconnects += 1;
      for (const sub of this._subs) {
        if (sub._generation < generation) sub._gap(gap);
      }
      this._emit("gap", gap);
      this._emit("reconnect", { ...gap, attempts });
    });
  }

  _onFrame(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      console.warn("broker.js: ignoring a frame that is not JSON");
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    if (frame.op === "message") {
      if (typeof frame.channel !== "string") return;
      for (const sub of [...this._subs]) {
        if (!sub.closed && sub.patterns.some((p) => matches(p, frame.channel))) sub._deliver(frame);
      }
      return;
    }
    if (frame.op === "ok" || frame.op === "pong" || frame.op === "error") {
      const entry = frame.id === null || frame.id === undefined ? null : this._pending.get(frame.id);
      if (entry) {
        if (frame.op === "error") {
          this._settle(entry, new BrokerError(frame.code, frame.message, frame.id));
        } else {
          this._settle(entry, null, frame);
        }
      } else if (frame.op === "error" && (frame.id === null || frame.id === undefined)) {
        this._emit("error", new BrokerError(frame.code, frame.message, null));
      }
    }
    // Unknown ops are ignored: the protocol lets servers add them.
  }

  _onClose(ws, code, reason) {
    if (ws !== this._ws) return;
    clearTimeout(this._openTimer);
    clearTimeout(this._pingTimer);
    const wasOpen = this._open;
    this._ws = null;
    this._open = false;
    if (wasOpen && this._downSince === null) this._downSince = Date.now();
    // What was sent on this socket: idempotent requests go again on the next one.
    const lost = new ConnectionClosedError(
      `connection lost (code ${code}${reason ? `: ${reason}` : ""}) before the broker replied`,
      code,
      reason,
    );
    for (const entry of [...this._pending.values()]) {
      this._pending.delete(entry.id);
      entry.id = null;
      if (entry.retry) this._queue.push(entry);
      else this._settle(entry, lost);
    }
    if (this.state === "closed") return;
    if (wasOpen) {
      this._failures = 0;
      if (Date.now() - this._openedAt >= this.options.stableAfter) this._attempt = 0;
      // 1008 (policy) and 1013 (slow consumer, overload): skip the quick first retry.
      if ((code === 1008 || code === 1013) && this._attempt === 0) this._attempt = 1;
    } else {
      this._failures += 1;
    }
    if (!this.options.reconnect || this._failures >= this.options.maxAttempts) {
      this._emit("close", { code, reason, willReconnect: false, delay: null });
      const why = wasOpen ? `closed (code ${code})` : `failed ${this._failures} times`;
      this._shut(new ConnectionClosedError(`connection to ${this.url} ${why}`, code, reason), true);
      return;
    }
    const delay = this._nextDelay();
    this._emit("close", { code, reason, willReconnect: true, delay });
    this._setState("reconnecting");
    this._reconnectTimer = setTimeout(() => this._connect(), delay);
  }

  _nextDelay() {
    const { minReconnectDelay: low, maxReconnectDelay: high } = this.options;
    const n = this._attempt++;
    if (n === 0) return Math.random() * low;
    const ceiling = Math.min(high, low * 2 ** Math.min(n, 30));
    return low + Math.random() * (ceiling - low);
  }

  _schedulePing() {
    clearTimeout(this._pingTimer);
    if (!this.options.pingInterval) return;
    const ws = this._ws;
    this._pingTimer = setTimeout(() => {
      if (ws !== this._ws || !this._open) return;
      this._request({ op: "ping" }, { retry: false, timeout: this.options.pingTimeout }).then(
        () => {
          if (ws === this._ws) this._schedulePing();
        },
        (error) => {
          if (error instanceof RequestTimeoutError && ws === this._ws) {
            this._abandon(ws, "ping timed out");
          }
        },
      );
    }, this.options.pingInterval);
  }

  _dropSub(sub) {
    if (!this._subs.delete(sub)) return [];
    const gone = [];
    for (const pattern of sub.patterns) {
      const entry = this._patterns.get(pattern);
      if (!entry) continue;
      entry.count -= 1;
      if (entry.count <= 0) {
        this._patterns.delete(pattern);
        if (entry.confirmed) gone.push(pattern);
      }
    }
    return gone;
  }

  _unsubscribe(sub) {
    const gone = this._dropSub(sub);
    sub._end(null);
    return this._unsubscribeWire(gone);
  }

  _unsubscribeWire(patterns) {
    // Best effort: when offline, the next connection simply does not re-subscribe.
    if (!this._open || patterns.length === 0) return Promise.resolve();
    const requests = patterns.map((channel) =>
      this._request({ op: "unsubscribe", channel }, { retry: false, noWait: true }).catch(() => {}),
    );
    return Promise.all(requests).then(() => undefined);
  }

  _shut(error, failSubs) {
    if (this.state === "closed") return;
    this._finalError = error;
    clearTimeout(this._reconnectTimer);
    clearTimeout(this._openTimer);
    clearTimeout(this._pingTimer);
    this._reconnectTimer = null;
    globalThis.removeEventListener?.("online", this._onOnline);
    const ws = this._ws;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    this._ws = null;
    this._open = false;
    for (const entry of [...this._pending.values(), ...this._queue]) this._settle(entry, error);
    this._outbox = [];
    for (const sub of this._subs) sub._end(failSubs ? error : null);
    this._subs.clear();
    this._patterns.clear();
    this._setState("closed");
  }
}

function checkData(data) {
  if (data === undefined) return new TypeError("data must be a JSON value, not undefined");
  try {
    JSON.stringify(data);
  } catch (error) {
    return new TypeError(`data is not JSON-encodable: ${error.message}`);
  }
  return null;
}

/** Create a client for `url` (default: /ws on the page's own host) and start connecting. */
export function connect(url, options) {
  return new BrokerClient(url, options).start();
}
