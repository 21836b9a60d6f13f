// Browser client of the pub/sub broker, wire protocol version 2.
//
// One dependency-free ES module, served by the broker at /client/broker.js
// and published as the npm package `wsbroker-client`:
//
//   import { connect } from "/client/broker.js";
//   const client = connect(`wss://${location.host}/ws`, { getToken: () => fetchToken() });
//   client.subscribe("sensors.kitchen", (msg) => show(msg.data), { onGap: () => reload() });
//   await client.publish("sensors.kitchen", { t: 21.5 }, { key: crypto.randomUUID() });
//
// Theory of operation.
//
// Connection. The client owns one WebSocket at a time. Once it is open the
// client authenticates first (when `getToken` is given), and only then is the
// connection "ready": it re-subscribes, then sends what waited. It reconnects
// with capped, jittered exponential backoff, except after close code 1012
// (the broker restarts): then it comes back after a short random delay. An
// application-level ping every `pingInterval` ms notices a connection that is
// dead without the browser knowing (a sleeping laptop, a dropped NAT entry).
//
// Requests. Each gets an integer id and waits in `pending` for the reply with
// the same id, under its own time-out. When the socket drops, requests that are
// safe to repeat (pings, and publishes that carry a `key`, which the broker
// deduplicates) go back to the queue and are sent on the next connection; a
// publish without a key fails with ConnectionClosedError, because it may or
// may not have been delivered.
//
// Tokens. `getToken()` is called for every connection, and again before the
// token expires (at a random point in the last 10-20 % of its lifetime, from
// the broker's `expires_in`) to send a fresh `auth` on the open connection:
// subscriptions do not notice. A request refused with `token_expired` goes
// back to the queue and is sent again after the refresh.
//
// Subscriptions. Local subscriptions share one broker subscription per
// channel or pattern (a "wire entry", reference counted). For an exact
// channel whose broker rule keeps history, the entry remembers the last
// position (offset, epoch) from messages and subscribe replies; after a
// reconnect it re-subscribes with `since`, and the broker replays what was
// missed. When it cannot (`recovered: false`), when the broker reports a `gap`,
// when the epoch changes between two messages, and for patterns and channels
// without history after every reconnect, each subscription holding the entry
// gets a gap: the moment to reload state from its source of truth.
//
// Types: /client/broker.d.ts.

// -- errors --------------------------------------------------------------------

/** Every wire error code of protocol version 2. */
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
  "unauthorized",
  "token_expired",
]);

/** Close code of a broker that restarts (drains): come back soon, with jitter. */
const RESTART_CLOSE_CODE = 1012;

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

// -- helpers -------------------------------------------------------------------

/** Tell whether `channel` matches `pattern` (`*` one token, `>` one or more trailing tokens). */
export function matches(pattern, channel) {
  if (pattern === channel) return true;
  if (!isPattern(pattern)) return false;
  const want = pattern.split(".");
  const have = channel.split(".");
  for (let i = 0; i < want.length; i++) {
    if (want[i] === ">" && i === want.length - 1) return have.length > i;
    if (i >= have.length) return false;
    if (want[i] !== "*" && want[i] !== have[i]) return false;
  }
  return have.length === want.length;
}

function isPattern(channel) {
  return channel.includes("*") || channel.includes(">");
}

const DEFAULTS = Object.freeze({
  requestTimeout: 10000,
  openTimeout: 10000,
  pingInterval: 15000,
  pingTimeout: 10000,
  minReconnectDelay: 200,
  maxReconnectDelay: 10000,
  restartDelay: 1000,
  stableAfter: 5000,
  reconnect: true,
  maxAttempts: Infinity,
  outboxSize: 1000,
  getToken: undefined,
  WebSocket: undefined,
});

/** Shortest wait before a token refresh, ms, so that a short token cannot make a busy loop. */
const MIN_REFRESH_DELAY = 500;
/** Wait before trying a failed refresh, or a re-subscribe the broker could not serve, again. */
const RETRY_DELAY = 1000;

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

function call(fn, arg) {
  if (!fn) return;
  try {
    fn(arg);
  } catch (error) {
    report(error);
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

function positionOf(frame) {
  return typeof frame.offset === "number" && typeof frame.epoch === "string"
    ? { offset: frame.offset, epoch: frame.epoch }
    : null;
}

function isPosition(value) {
  return (
    value !== null &&
    typeof value === "object" &&
    Number.isInteger(value.offset) &&
    value.offset >= 0 &&
    typeof value.epoch === "string"
  );
}

// -- subscriptions ---------------------------------------------------------------

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
    call(this._callback, message);
  }

  _gap(gap) {
    this.gaps += 1;
    this.lastGap = gap;
    call(this._onGap, gap);
  }

  _confirm() {
    if (this._settled) return;
    this._settled = true;
    this._resolve();
  }

  _end(error) {
    if (this.closed) return;
    this.closed = true;
    this.error = error || null;
    if (!this._settled) {
      this._settled = true;
      this._reject(error || new ConnectionClosedError("the subscription ended before the broker confirmed it"));
    }
    if (error) call(this._onError, error);
  }
}

// -- the client ------------------------------------------------------------------

/**
 * A connection to the broker that authenticates, reconnects, re-subscribes and
 * recovers by itself. Create it with `connect(url, options)`, which also starts it.
 */
export class BrokerClient {
  constructor(url = defaultUrl(), options = {}) {
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    this.state = "new";
    this.reconnects = 0;
    /** The token's subject once authenticated, else null. */
    this.subject = null;
    this._WebSocket = this.options.WebSocket || globalThis.WebSocket;
    this._ws = null; // the socket being opened or open
    this._ready = false; // `_ws` is open and authenticated: requests may go
    this._expired = false; // the broker said token_expired: hold requests until the refresh
    this._generation = 0; // counts ready connections
    this._nextId = 0;
    this._seq = 0; // creation order of requests, kept when they are queued again
    this._pending = new Map(); // id -> request entry, sent on the current socket
    this._queue = []; // request entries waiting to be sent, in creation order
    this._outbox = []; // fire-and-forget frames waiting for a connection
    this._subs = new Set();
    this._wire = new Map(); // channel or pattern -> wire entry
    this._leaving = new Map(); // entries no longer wanted whose subscribe is still in flight
    this._listeners = new Map();
    this._finalError = null;
    this._attempt = 0; // backoff step
    this._failures = 0; // attempts in a row that never became ready
    this._tries = 0; // sockets created since the last ready one
    this._downSince = null;
    this._openedAt = 0;
    this._reconnectTimer = null;
    this._openTimer = null;
    this._pingTimer = null;
    this._refreshTimer = null;
    this._refreshing = null; // the socket a refresh is running on
    this._onOnline = () => {
      if (this._reconnectTimer !== null) {
        clearTimeout(this._reconnectTimer);
        this._reconnectTimer = null;
        this._connect();
      }
    };
  }

  /** True while a connection is open (and authenticated, with getToken). */
  get connected() {
    return this._ready;
  }

  /** Start connecting (`connect()` calls it). */
  start() {
    if (this.state !== "new") return this;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError("no WebSocket implementation: pass options.WebSocket");
    }
    if (this.options.getToken !== undefined && typeof this.options.getToken !== "function") {
      throw new TypeError("options.getToken must be a function returning a token (or a promise of one)");
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
    if (ws) quietly(() => ws.close(1000, "client closed"));
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

  /** Resolve once a connection is ready; reject if the client closes first (say, a refused token). */
  whenConnected() {
    if (this._ready) return Promise.resolve();
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

  /** The last position (offset, epoch) seen on an exact channel with history, or null. */
  position(channel) {
    const position = this._wire.get(channel)?.position;
    return position ? { ...position } : null;
  }

  /**
   * Subscribe `callback(message)` to one pattern or an array of patterns.
   * Returns a Subscription at once; `subscription.ready` settles when the
   * broker confirmed (or refused: then the subscription ends with the error,
   * also given to `options.onError` and to "error" listeners). `since` and
   * `history` ask the broker to replay messages of one exact channel.
   */
  subscribe(patterns, callback, options = {}) {
    const list = [...new Set(Array.isArray(patterns) ? patterns : [patterns])];
    if (list.length === 0 || list.some((p) => typeof p !== "string")) {
      throw new TypeError("subscribe needs a channel or pattern string, or an array of them");
    }
    if (typeof callback !== "function") throw new TypeError("subscribe needs a callback");
    const ask = replayAsk(list, options);
    const sub = new Subscription(this, list, callback, options);
    if (this.state === "closed") {
      sub._end(this._finalError);
      return sub;
    }
    if (ask && (this._wire.has(list[0]) || this._leaving.has(list[0]))) {
      // The broker cannot join a replay to a subscription it already has.
      sub._end(new BrokerError("bad_request", `already subscribed to ${list[0]}; since and history need the first subscription to it`));
      return sub;
    }
    this._subs.add(sub);
    const confirmations = list.map((channel) => this._hold(channel, ask).ready);
    Promise.all(confirmations).then(
      () => sub._confirm(),
      (error) => {
        if (sub.closed) return;
        this._dropSub(sub);
        this._emit("error", error);
        sub._end(error);
      },
    );
    return sub;
  }

  /**
   * Publish `data` (any JSON value) to `channel`. Resolves with the broker's
   * acknowledgement (`offset`/`epoch` on channels with history, `duplicate`);
   * rejects with a BrokerError (`.code`: "bad_channel", "too_large", ...),
   * RequestTimeoutError, or ConnectionClosedError if the connection dropped
   * before the reply. With a `key`, a publish whose connection dropped is sent
   * again on the next one: the broker drops the copy and answers duplicate.
   */
  publish(channel, data, options = {}) {
    const check = checkData(data);
    if (check) return Promise.reject(check);
    const { key, timeout } = options;
    const fields = { op: "publish", channel, data };
    if (key !== undefined) {
      if (typeof key !== "string" || key.length < 1 || key.length > 128) {
        return Promise.reject(new TypeError("key must be a string of 1 to 128 characters"));
      }
      fields.key = key;
    }
    return this._request(fields, { retry: key !== undefined, timeout }).then((reply) => {
      const ack = { duplicate: reply.duplicate === true };
      const position = positionOf(reply);
      return position ? { ...ack, ...position } : ack;
    });
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
    if (this._canSend()) {
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

  // -- events ---------------------------------------------------------------------

  _emit(type, detail) {
    const listeners = this._listeners.get(type);
    if (!listeners) return;
    for (const listener of [...listeners]) call(listener, detail);
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", { state });
  }

  // -- requests -------------------------------------------------------------------

  _canSend() {
    return this._ready && !this._expired;
  }

  // `retry`: send again on the next connection if this one drops before the
  // reply. `immediate`: send now on the open socket even before it is ready
  // (auth, liveness pings), else fail; never queued.
  _request(fields, { retry = false, timeout, immediate = false }) {
    if (this.state === "closed") return Promise.reject(this._finalError);
    const limit = timeout ?? this.options.requestTimeout;
    return new Promise((resolve, reject) => {
      const entry = { fields, retry, immediate, resolve, reject, id: null, timer: null, seq: ++this._seq };
      if (immediate && !this._socketOpen()) {
        reject(new ConnectionClosedError("not connected"));
        return;
      }
      entry.timer = setTimeout(() => {
        this._forget(entry);
        reject(new RequestTimeoutError(`no reply to ${fields.op} within ${limit} ms`));
      }, limit);
      if (immediate || this._canSend()) this._send(entry);
      else this._enqueue(entry);
    });
  }

  _socketOpen() {
    return this._ws !== null && this._ws.readyState === 1;
  }

  _send(entry) {
    entry.id = ++this._nextId;
    this._pending.set(entry.id, entry);
    this._ws.send(JSON.stringify({ op: entry.fields.op, id: entry.id, ...entry.fields }));
  }

  _enqueue(entry) {
    // Keep creation order, so a request sent again does not pass later ones.
    let i = this._queue.length;
    while (i > 0 && this._queue[i - 1].seq > entry.seq) i -= 1;
    this._queue.splice(i, 0, entry);
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

  _onReply(frame) {
    const entry = frame.id === null || frame.id === undefined ? null : this._pending.get(frame.id);
    if (!entry) {
      if (frame.op === "error" && (frame.id === null || frame.id === undefined)) this._onUnsolicitedError(frame);
      return;
    }
    if (frame.op !== "error") {
      this._settle(entry, null, frame);
      return;
    }
    if (frame.code === "token_expired" && !entry.immediate && entry.fields.op !== "subscribe") {
      // Refused only because the token ran out: nothing happened, so send it
      // again after the refresh (subscribes are re-sent by the wire entries).
      this._pending.delete(entry.id);
      entry.id = null;
      this._enqueue(entry);
      this._tokenExpired();
      return;
    }
    if (frame.code === "token_expired") this._tokenExpired();
    this._settle(entry, new BrokerError(frame.code, frame.message, frame.id));
  }

  _onUnsolicitedError(frame) {
    if (frame.code === "token_expired") {
      this._tokenExpired();
      return;
    }
    this._emit("error", new BrokerError(frame.code, frame.message, null));
  }

  // Send what waited, once the connection is ready (or the token refreshed):
  // subscriptions first, then requests, then fire-and-forget frames.
  _flush() {
    const sent = this._syncWire();
    for (const entry of this._queue.splice(0)) this._send(entry);
    for (const frame of this._outbox.splice(0)) this._ws.send(frame);
    return sent;
  }

  // -- connection ---------------------------------------------------------------------

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
    // Opening includes authenticating: both must fit in openTimeout.
    this._openTimer = setTimeout(() => this._abandon(ws, "open timed out", 1006), this.options.openTimeout);
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (event) => this._onFrame(event.data);
    ws.onclose = (event) => this._onClose(ws, event.code, event.reason);
    // Browsers follow "error" with "close"; some WebSocket implementations do
    // not when the connection never opened, so a failed attempt ends here.
    ws.onerror = () => {
      if (ws === this._ws && !this._ready) this._abandon(ws, "connection failed", 1006);
    };
  }

  _abandon(ws, reason, code = 4000) {
    // Closing a dead socket can take minutes to report: detach it, and act now.
    if (ws !== this._ws) return;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    quietly(() => ws.close(4000, reason));
    this._onClose(ws, code, reason);
  }

  _onOpen(ws) {
    if (ws !== this._ws) return;
    if (!this.options.getToken) {
      this._onReady(ws, null);
      return;
    }
    this._authenticate(ws, "connect").then(
      (reply) => {
        if (ws === this._ws) this._onReady(ws, reply);
      },
      (error) => {
        if (ws !== this._ws) return;
        if (error.code === "unauthorized") {
          // The broker refused the token (or uses no authentication): retrying
          // with what getToken gives cannot help. Say so plainly, and stop.
          this._emit("error", error);
          this._emit("close", { code: 1000, reason: "unauthorized", willReconnect: false, delay: null });
          this._shut(error, true);
          quietly(() => ws.close(1000, "unauthorized"));
          return;
        }
        // getToken failed, a limit, a time-out: this attempt failed; back off.
        if (!(error instanceof ConnectionClosedError)) this._emit("error", error);
        this._abandon(ws, `authentication failed: ${error.code}`);
      },
    );
  }

  _onReady(ws, authReply) {
    clearTimeout(this._openTimer);
    this._ready = true;
    this._expired = false;
    this._openedAt = Date.now();
    this._generation += 1;
    const wasDown = this._downSince;
    const attempts = this._tries;
    this._tries = 0;
    if (authReply) this._authenticated(ws, authReply, false);
    this._setState("open");
    this._emit("open", { reconnect: wasDown !== null });
    this._schedulePing();

    const resubscribed = this._flush();
    if (wasDown === null) return;
    const generation = this._generation;
    Promise.allSettled(resubscribed).then(() => {
      if (generation !== this._generation || !this._ready) return; // dropped again meanwhile
      this._downSince = null;
      this.reconnects += 1;
      this._emit("reconnect", { reason: "reconnect", since: wasDown, until: Date.now(), attempts });
    });
  }

  _onClose(ws, code, reason) {
    if (ws !== this._ws) return;
    clearTimeout(this._openTimer);
    clearTimeout(this._pingTimer);
    clearTimeout(this._refreshTimer);
    const wasReady = this._ready;
    this._ws = null;
    this._ready = false;
    this._expired = false;
    this._refreshing = null;
    if (wasReady && this._downSince === null) this._downSince = Date.now();
    for (const entry of this._wire.values()) entry.active = false;
    this._leaving.clear(); // the broker forgets everything of this connection
    // What was sent on this socket: requests safe to repeat go again on the next one.
    const lost = new ConnectionClosedError(
      `connection lost (code ${code}${reason ? `: ${reason}` : ""}) before the broker replied`,
      code,
      reason,
    );
    for (const entry of [...this._pending.values()]) {
      this._pending.delete(entry.id);
      entry.id = null;
      if (entry.retry) this._enqueue(entry);
      else this._settle(entry, lost);
    }
    if (this.state === "closed") return;
    if (wasReady) {
      this._failures = 0;
      if (Date.now() - this._openedAt >= this.options.stableAfter) this._attempt = 0;
      // 1008 (policy) and 1013 (slow consumer, overload): skip the quick first retry.
      if ((code === 1008 || code === 1013) && this._attempt === 0) this._attempt = 1;
    } else {
      this._failures += 1;
    }
    if (!this.options.reconnect || this._failures >= this.options.maxAttempts) {
      this._emit("close", { code, reason, willReconnect: false, delay: null });
      const why = wasReady ? `closed (code ${code})` : `failed ${this._failures} times`;
      this._shut(new ConnectionClosedError(`connection to ${this.url} ${why}`, code, reason), true);
      return;
    }
    const delay = wasReady && code === RESTART_CLOSE_CODE ? this._restartDelay() : this._nextDelay();
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

  _restartDelay() {
    // The broker drains for a restart: another process (or this one, back) is
    // ready soon. A short random delay spreads the clients; if that attempt
    // fails, the normal backoff goes on from its second step.
    this._attempt = Math.max(this._attempt, 1);
    return Math.random() * this.options.restartDelay;
  }

  _schedulePing() {
    clearTimeout(this._pingTimer);
    if (!this.options.pingInterval) return;
    const ws = this._ws;
    this._pingTimer = setTimeout(() => {
      if (ws !== this._ws || !this._ready) return;
      this._request({ op: "ping" }, { immediate: true, timeout: this.options.pingTimeout }).then(
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

  _shut(error, failSubs) {
    if (this.state === "closed") return;
    this._finalError = error;
    clearTimeout(this._reconnectTimer);
    clearTimeout(this._openTimer);
    clearTimeout(this._pingTimer);
    clearTimeout(this._refreshTimer);
    this._reconnectTimer = null;
    globalThis.removeEventListener?.("online", this._onOnline);
    const ws = this._ws;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    this._ws = null;
    this._ready = false;
    for (const entry of [...this._pending.values(), ...this._queue]) this._settle(entry, error);
    this._outbox = [];
    for (const entry of this._wire.values()) clearTimeout(entry.deadline);
    this._wire.clear();
    this._leaving.clear();
    for (const sub of this._subs) sub._end(failSubs ? error : null);
    this._subs.clear();
    this._setState("closed");
  }

  // -- tokens -------------------------------------------------------------------------

  // Get a token and send it in an `auth` on `ws`; resolves with the broker's ok.
  async _authenticate(ws, reason) {
    let token;
    try {
      token = await this.options.getToken({ reason });
    } catch (cause) {
      const error = new BrokerError("token_unavailable", `getToken failed: ${cause?.message ?? cause}`);
      error.cause = cause;
      throw error;
    }
    if (ws !== this._ws) throw new ConnectionClosedError("the connection closed while getToken ran");
    if (token === null || token === undefined || token === "") return null; // go on without a token
    if (typeof token !== "string") {
      throw new BrokerError("token_unavailable", `getToken must give a string, not ${typeof token}`);
    }
    return this._request({ op: "auth", token }, { immediate: true });
  }

  _authenticated(ws, reply, refresh) {
    if (typeof reply.sub === "string") this.subject = reply.sub;
    const expiresIn = typeof reply.expires_in === "number" ? reply.expires_in : null;
    this._emit("auth", { sub: this.subject, expiresIn, refresh });
    if (expiresIn === null) return;
    // At a random point in the last 10-20 % of the token's lifetime.
    const delay = Math.max(MIN_REFRESH_DELAY, expiresIn * 1000 * (0.8 + Math.random() * 0.1));
    clearTimeout(this._refreshTimer);
    this._refreshTimer = setTimeout(() => this._refresh(ws, "refresh"), delay);
  }

  _tokenExpired() {
    if (!this._ready || !this.options.getToken) return;
    this._expired = true; // hold requests until a fresh token is in
    this._refresh(this._ws, "expired");
  }

  _refresh(ws, reason) {
    if (ws !== this._ws || !this._ready || this._refreshing === ws) return;
    this._refreshing = ws;
    clearTimeout(this._refreshTimer);
    this._authenticate(ws, reason).then(
      (reply) => {
        if (ws !== this._ws) return;
        this._refreshing = null;
        if (!reply) return; // getToken gave none: the connection keeps what it has
        this._authenticated(ws, reply, true);
        if (this._expired) {
          this._expired = false;
          this._flush();
        }
      },
      (error) => {
        if (ws !== this._ws) return;
        this._refreshing = null;
        // The connection keeps its current token until it expires; try again soon.
        if (!(error instanceof ConnectionClosedError)) this._emit("error", error);
        const delay = RETRY_DELAY * (0.5 + Math.random());
        this._refreshTimer = setTimeout(() => this._refresh(ws, this._expired ? "expired" : "refresh"), delay);
      },
    );
  }

  // -- subscriptions on the wire -------------------------------------------------------

  // The wire entry for `channel`, with one more holder.
  _hold(channel, ask) {
    let entry = this._wire.get(channel);
    if (!entry) {
      entry = this._leaving.get(channel);
      if (entry) {
        // No longer wanted, but its subscribe is still in flight: keep it.
        this._leaving.delete(channel);
        entry.dead = false;
      } else {
        entry = {
          channel,
          exact: !isPattern(channel),
          count: 0,
          confirmed: false, // the broker confirmed it at least once
          active: false, // confirmed on the current connection
          sentOn: 0, // generation of the connection its subscribe was last sent on
          position: null, // last { offset, epoch } seen, exact channels with history
          ask, // the application's replay request, until the first confirmation
          deadline: null,
          dead: false,
        };
        entry.ready = new Promise((resolve, reject) => {
          entry.resolve = resolve;
          entry.reject = reject;
        });
        entry.ready.catch(() => {});
        if (this._canSend()) this._sendSubscribe(entry);
      }
      if (!entry.confirmed) {
        // The first confirmation must come within requestTimeout, connected or not.
        clearTimeout(entry.deadline);
        const limit = this.options.requestTimeout;
        entry.deadline = setTimeout(() => {
          this._failEntry(entry, new RequestTimeoutError(`no reply to subscribe ${channel} within ${limit} ms`));
        }, limit);
      }
      this._wire.set(channel, entry);
    }
    entry.count += 1;
    return entry;
  }

  // Send a subscribe for every entry not yet sent on this connection: exact
  // channels first, so that their replays come before a pattern's live copies.
  _syncWire() {
    const todo = [...this._wire.values()].filter((e) => e.sentOn !== this._generation);
    todo.sort((a, b) => Number(b.exact) - Number(a.exact));
    return todo.map((entry) => this._sendSubscribe(entry));
  }

  _sendSubscribe(entry) {
    const frame = { op: "subscribe", channel: entry.channel };
    if (entry.position) frame.since = { ...entry.position };
    else if (!entry.confirmed && entry.ask?.since) frame.since = { ...entry.ask.since };
    else if (!entry.confirmed && entry.ask?.history) frame.history = entry.ask.history;
    const generation = this._generation;
    const ws = this._ws;
    entry.sentOn = generation;
    return this._request(frame, {}).then(
      (reply) => {
        if (generation === this._generation) this._subscribed(entry, frame, reply);
      },
      (error) => {
        if (generation !== this._generation) return;
        if (entry.dead) {
          if (this._leaving.get(entry.channel) === entry) this._leaving.delete(entry.channel);
          return;
        }
        if (error instanceof ConnectionClosedError) return; // the next connection sends it again
        if (error.code === "token_expired" || error.code === "unavailable") {
          // Not refused: after the refresh, or once the broker can read its history again.
          entry.sentOn = 0;
          if (error.code === "unavailable") {
            setTimeout(() => {
              if (generation === this._generation && this._canSend() && entry.sentOn === 0 && !entry.dead) {
                this._sendSubscribe(entry);
              }
            }, RETRY_DELAY * (0.5 + Math.random()));
          }
          return;
        }
        if (error instanceof RequestTimeoutError && entry.confirmed) {
          this._abandon(ws, "re-subscribe timed out"); // try again on a fresh connection
          return;
        }
        // Refused (or, the first time, no answer in time): its subscriptions end.
        this._failEntry(entry, error);
      },
    );
  }

  _subscribed(entry, frame, reply) {
    if (entry.dead) {
      // Every subscription holding it ended while the request was in flight.
      if (this._leaving.get(entry.channel) === entry) {
        this._leaving.delete(entry.channel);
        this._unsubscribeWire([entry.channel]);
      }
      return;
    }
    const first = !entry.confirmed;
    entry.confirmed = true;
    entry.active = true;
    entry.ask = null;
    clearTimeout(entry.deadline);
    const top = entry.exact ? positionOf(reply) : null;
    if (frame.since) {
      const recovered = reply.recovered === true;
      const event = { channel: entry.channel, recovered, since: frame.since };
      if (top) Object.assign(event, top);
      if (recovered) {
        // The replay follows (offsets after `since`), then live messages.
        entry.position = { ...frame.since };
        event.missed = top ? Math.max(0, top.offset - frame.since.offset) : 0;
      } else {
        entry.position = top;
        event.reason = reply.reason ?? "unknown";
      }
      this._emit("recovery", event);
      if (!recovered) this._gap(entry, event.reason, first ? null : this._downSince);
    } else if (frame.history) {
      // The last `history` messages follow: track from just before them.
      entry.position = top && { offset: Math.max(0, top.offset - frame.history), epoch: top.epoch };
    } else {
      entry.position = top;
      if (!first) this._gap(entry, "reconnect", this._downSince); // patterns, channels without history
    }
    if (first) entry.resolve();
  }

  // `since`: when the connection dropped, for a gap found on re-subscribing.
  _gap(entry, reason, since = null) {
    const gap = { reason, channel: entry.channel, since, until: since === null ? null : Date.now() };
    for (const sub of [...this._subs]) {
      if (!sub.closed && sub.patterns.includes(entry.channel)) sub._gap(gap);
    }
    this._emit("gap", gap);
  }

  // The broker refused (or ended) this subscription: every subscription holding it ends.
  _failEntry(entry, error) {
    clearTimeout(entry.deadline);
    if (this._wire.get(entry.channel) === entry) this._wire.delete(entry.channel);
    entry.dead = true;
    if (!entry.confirmed) {
      entry.reject(error); // subscribe() ends the subscriptions waiting for it
      return;
    }
    this._emit("error", error);
    for (const sub of [...this._subs]) {
      if (sub.patterns.includes(entry.channel)) {
        this._dropSub(sub);
        sub._end(error);
      }
    }
  }

  _dropSub(sub) {
    if (!this._subs.delete(sub)) return [];
    const gone = [];
    for (const channel of sub.patterns) {
      const entry = this._wire.get(channel);
      if (!entry) continue;
      entry.count -= 1;
      if (entry.count > 0) continue;
      this._wire.delete(channel);
      clearTimeout(entry.deadline);
      entry.dead = true;
      if (entry.active) gone.push(channel);
      else if (entry.sentOn === this._generation && this._ready) this._leaving.set(channel, entry);
    }
    return this._unsubscribeWire(gone);
  }

  _unsubscribe(sub) {
    const done = this._dropSub(sub);
    sub._end(null);
    return done;
  }

  _unsubscribeWire(channels) {
    // Best effort: when offline, the next connection simply does not re-subscribe.
    if (!this._canSend() || channels.length === 0) return Promise.resolve();
    const requests = channels.map((channel) =>
      this._request({ op: "unsubscribe", channel }, {}).catch(() => {}),
    );
    return Promise.all(requests).then(() => undefined);
  }

  // -- frames from the broker ------------------------------------------------------------

  _onFrame(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      console.warn("broker.js: ignoring a frame that is not JSON");
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    switch (frame.op) {
      case "message":
        if (typeof frame.channel === "string") this._onMessage(frame);
        return;
      case "ok":
      case "pong":
      case "error":
        this._onReply(frame);
        return;
      case "gap":
        if (typeof frame.channel === "string") this._onGapFrame(frame);
        return;
      case "unsubscribed":
        if (typeof frame.channel === "string") this._onUnsubscribed(frame);
        return;
      default:
      // Unknown ops are ignored: the protocol lets servers add them.
    }
  }

  _onMessage(frame) {
    const entry = this._wire.get(frame.channel);
    const position = positionOf(frame);
    if (entry && entry.active && position) {
      const last = entry.position;
      if (last && last.epoch === position.epoch && position.offset <= last.offset) return; // seen
      // A broker gap just before (entry.told) already said the epoch changed.
      // At offset 0 the old epoch held nothing to miss (its unused epoch expired).
      if (last && last.epoch !== position.epoch && last.offset > 0 && !entry.told) {
        this._gap(entry, "epoch_changed");
      }
      entry.told = false;
      entry.position = position;
    }
    for (const sub of [...this._subs]) {
      if (!sub.closed && sub.patterns.some((p) => matches(p, frame.channel))) sub._deliver(frame);
    }
  }

  _onGapFrame(frame) {
    const entry = this._wire.get(frame.channel);
    if (!entry) return;
    if (entry.position) entry.told = true;
    this._gap(entry, typeof frame.reason === "string" ? frame.reason : "unknown");
  }

  _onUnsubscribed(frame) {
    // The broker ended this subscription (a refreshed token no longer allows it).
    const entry = this._wire.get(frame.channel);
    if (!entry) return;
    entry.active = false; // nothing to unsubscribe on the wire
    const code = typeof frame.code === "string" ? frame.code : "forbidden";
    this._failEntry(entry, new BrokerError(code, `the broker ended the subscription to ${frame.channel} (${code})`));
  }
}

function quietly(fn) {
  try {
    fn();
  } catch {
    // closing a socket that is not open yet, or already closing
  }
}

function replayAsk(list, options) {
  const { since, history } = options;
  if (since === undefined && history === undefined) return null;
  if (list.length !== 1 || isPattern(list[0])) {
    throw new TypeError("since and history need one exact channel, not patterns or a list");
  }
  if (since !== undefined && history !== undefined) throw new TypeError("give since or history, not both");
  if (since !== undefined && !isPosition(since)) {
    throw new TypeError("since must be { offset: integer >= 0, epoch: string }");
  }
  if (history !== undefined && !(Number.isInteger(history) && history >= 1)) {
    throw new TypeError("history must be an integer >= 1");
  }
  return since !== undefined ? { since: { offset: since.offset, epoch: since.epoch } } : { history };
}

/** Create a client for `url` (default: /ws on the page's own host) and start connecting. */
export function connect(url, options) {
  return new BrokerClient(url, options).start();
}
