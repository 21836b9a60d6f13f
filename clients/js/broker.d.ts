// Types of the browser client served at /client/broker.js (wire protocol version 2),
// also the npm package wsbroker-client.

/** Wire error codes of protocol version 2. */
export type ErrorCode =
  | "bad_frame"
  | "bad_request"
  | "bad_channel"
  | "not_subscribed"
  | "too_large"
  | "forbidden"
  | "rate_limited"
  | "limit_exceeded"
  | "unavailable"
  | "internal"
  | "unauthorized"
  | "token_expired";

export declare const ERROR_CODES: readonly ErrorCode[];

/** Codes of errors the client makes itself, beside the wire codes. */
export type ClientErrorCode =
  /** No connection, or it dropped before the reply. */
  | "connection_closed"
  /** No reply within the time-out. */
  | "timeout"
  /** `getToken` threw, rejected, or gave something other than a string (see `cause`). */
  | "token_unavailable";

/** An error the broker answered with; base class of every error the client raises. */
export declare class BrokerError extends Error {
  constructor(code: string, message: string, requestId?: number | string | null);
  /** A wire code, a client code, or a code from a newer broker. */
  readonly code: ErrorCode | ClientErrorCode | (string & {});
  /** Id of the failed request; null for fire-and-forget publishes and unsolicited errors. */
  readonly requestId: number | string | null;
}

/** No connection, or it dropped before the reply (the request may or may not have taken effect). */
export declare class ConnectionClosedError extends BrokerError {
  constructor(message: string, closeCode?: number | null, closeReason?: string);
  readonly code: "connection_closed";
  readonly closeCode: number | null;
  readonly closeReason: string;
}

/** No reply within the time-out. */
export declare class RequestTimeoutError extends BrokerError {
  constructor(message: string);
  readonly code: "timeout";
}

/** A position in a channel that keeps history: offsets start at 1 in each epoch. */
export interface Position {
  readonly offset: number;
  readonly epoch: string;
}

/** A published message. Fields the broker adds are kept. */
export interface Message<T = unknown> {
  readonly op: "message";
  readonly channel: string;
  readonly data: T;
  /** The message's place in its channel, on channels whose rule keeps history. */
  readonly offset?: number;
  readonly epoch?: string;
  readonly [extra: string]: unknown;
}

/**
 * Why messages may have been missed:
 * - `reconnect`: the connection dropped, and this pattern (or channel without
 *   history) could not be recovered;
 * - `trimmed`, `epoch_changed`, `no_history`: a subscribe with `since` got
 *   `recovered: false` with that reason (after a reconnect, or asked for);
 *   `epoch_changed` also when two messages of a channel have different epochs;
 * - `backplane_interrupted`, `offset_hole`, `epoch_changed`: the broker sent a
 *   `gap` frame (for an epoch change, the client then adds no gap of its own).
 */
export type GapReason =
  | "reconnect"
  | "trimmed"
  | "epoch_changed"
  | "no_history"
  | "backplane_interrupted"
  | "offset_hole"
  | (string & {});

/** Messages of `channel` may have been missed: reload what depends on them. */
export interface Gap {
  readonly reason: GapReason;
  /** The channel or pattern, as subscribed, that may have missed messages. */
  readonly channel: string;
  /** For a gap found on re-subscribing: when the connection dropped (ms since the epoch), else null. */
  readonly since: number | null;
  /** For a gap found on re-subscribing: when it was found (ms since the epoch), else null. */
  readonly until: number | null;
}

/** What a subscribe with `since` got back (after a reconnect, or asked for). */
export interface RecoveryEvent {
  readonly channel: string;
  /** True: the missed messages follow, in order, before live ones. */
  readonly recovered: boolean;
  /** When not recovered: "trimmed", "epoch_changed", "no_history", or a newer code. */
  readonly reason?: string;
  /** The position asked for. */
  readonly since: Position;
  /** The channel's latest position, when it keeps history. */
  readonly offset?: number;
  readonly epoch?: string;
  /** When recovered: how many messages are replayed. */
  readonly missed?: number;
}

export interface ReconnectEvent {
  readonly reason: "reconnect";
  /** When the connection dropped, and when it was back with everything re-subscribed (ms since the epoch). */
  readonly since: number;
  readonly until: number;
  /** Connection attempts it took. */
  readonly attempts: number;
}

export interface CloseEvent {
  readonly code: number;
  readonly reason: string;
  readonly willReconnect: boolean;
  /** Milliseconds until the next attempt, or null when giving up. */
  readonly delay: number | null;
}

/** The broker accepted a token. */
export interface AuthEvent {
  readonly sub: string | null;
  /** Whole seconds the token has left, as the broker said. */
  readonly expiresIn: number | null;
  /** False for the auth that opened a connection, true for a refresh on an open one. */
  readonly refresh: boolean;
}

export type State = "new" | "connecting" | "open" | "reconnecting" | "closed";

export interface ClientEvents {
  /** The state changed. */
  state: { readonly state: State };
  /** A connection is ready: open and, with getToken, authenticated (`reconnect`: not the first). */
  open: { readonly reconnect: boolean };
  /** A connection closed; the client reconnects unless `willReconnect` is false. */
  close: CloseEvent;
  /** Reconnected and re-subscribed everything. */
  reconnect: ReconnectEvent;
  /** A subscription may have missed messages (also given to each holder's `onGap`). */
  gap: Gap;
  /** A subscribe with `since` was answered. */
  recovery: RecoveryEvent;
  /** The broker accepted a token (at connection, or a refresh). */
  auth: AuthEvent;
  /**
   * An error that answers no awaited request: a refused publishNoWait or
   * subscription, a subscription the broker ended (`unsubscribed`), a token
   * refused (`unauthorized`: at connection the client then closes) or a
   * getToken failure (`token_unavailable`).
   */
  error: BrokerError;
}

/** Why getToken is called. */
export interface TokenRequest {
  /** "connect": a new connection; "refresh": the token expires soon; "expired": the broker said token_expired. */
  readonly reason: "connect" | "refresh" | "expired";
}

/**
 * Gives the token (a JWT) the client sends in `auth`, or a promise of it.
 * null, undefined or "": connect without a token (brokers with `anonymous = true`).
 */
export type GetToken = (
  request: TokenRequest,
) => string | null | undefined | Promise<string | null | undefined>;

export interface ClientOptions {
  /**
   * Called for every connection and before the token expires. Without it the
   * client sends no `auth` (brokers without authentication).
   */
  getToken?: GetToken;
  /** Milliseconds a request waits for its reply, including any wait for a connection. Default 10000. */
  requestTimeout?: number;
  /** Milliseconds one connection attempt may take, authentication included. Default 10000. */
  openTimeout?: number;
  /** Milliseconds between application-level pings; 0 disables them. Default 15000. */
  pingInterval?: number;
  /** Milliseconds without a pong before the connection counts as dead. Default 10000. */
  pingTimeout?: number;
  /** Shortest delay before reconnecting, ms. Default 200. */
  minReconnectDelay?: number;
  /** Longest delay before reconnecting, ms (the cap of the exponential backoff). Default 10000. */
  maxReconnectDelay?: number;
  /** After close code 1012 (broker restart), reconnect within this many ms, at random. Default 1000. */
  restartDelay?: number;
  /** A connection that lived this long (ms) resets the backoff. Default 5000. */
  stableAfter?: number;
  /** Reconnect when the connection drops. Default true. */
  reconnect?: boolean;
  /** Failed attempts in a row before giving up. Default Infinity. */
  maxAttempts?: number;
  /** Fire-and-forget frames kept while disconnected (oldest dropped). Default 1000. */
  outboxSize?: number;
  /** WebSocket constructor to use instead of globalThis.WebSocket. */
  WebSocket?: typeof WebSocket;
}

export interface SubscribeOptions {
  /** Messages may have been missed (see Gap): reload what depends on them. */
  onGap?: (gap: Gap) => void;
  /** Called if the broker refuses the subscription (now or when re-subscribing) or ends it. */
  onError?: (error: BrokerError) => void;
  /**
   * One exact channel with history: replay what came after this position
   * (say, one saved from `client.position()`), then live messages. If it
   * cannot, onGap gets the reason.
   */
  since?: Position;
  /** One exact channel with history: replay its last N kept messages first. */
  history?: number;
}

export interface RequestOptions {
  /** Milliseconds; default: the client's requestTimeout. */
  timeout?: number;
}

export interface PublishOptions extends RequestOptions {
  /**
   * 1 to 128 characters. The broker delivers a message with a given key once
   * per channel (within its idempotency window), so the client sends it again
   * if the connection drops before the reply.
   */
  key?: string;
}

/** The broker's acknowledgement of a publish. */
export interface PublishAck {
  /** True when the broker had already taken a publish with this key: not delivered again. */
  readonly duplicate: boolean;
  /** The message's position, on channels with history (for a duplicate: the first one's). */
  readonly offset?: number;
  readonly epoch?: string;
}

export declare class Subscription<T = unknown> {
  readonly patterns: readonly string[];
  /** Resolves once the broker confirmed every pattern; rejects with its error. */
  readonly ready: Promise<void>;
  /** Gaps seen so far. */
  readonly gaps: number;
  readonly lastGap: Gap | null;
  /** True once unsubscribed, refused, ended by the broker, or the client closed. */
  readonly closed: boolean;
  /** Why it ended, when it ended with an error. */
  readonly error: BrokerError | null;
  /** Stop receiving; resolves once the broker confirmed (at once when offline). */
  unsubscribe(): Promise<void>;
}

export declare class BrokerClient {
  constructor(url?: string, options?: ClientOptions);
  readonly url: string;
  readonly options: Required<Omit<ClientOptions, "WebSocket" | "getToken">> &
    Pick<ClientOptions, "WebSocket" | "getToken">;
  readonly state: State;
  /** True while a connection is ready. */
  readonly connected: boolean;
  /** Successful reconnections so far. */
  readonly reconnects: number;
  /** The token's subject once the broker accepted a token, else null. */
  readonly subject: string | null;
  /** Start connecting; `connect()` does it for you. */
  start(): this;
  /** Close for good; pending requests reject with ConnectionClosedError. */
  close(): void;
  on<K extends keyof ClientEvents>(type: K, listener: (event: ClientEvents[K]) => void): () => void;
  off<K extends keyof ClientEvents>(type: K, listener: (event: ClientEvents[K]) => void): void;
  /** Resolves once a connection is ready; rejects if the client closes first (a refused token, say). */
  whenConnected(): Promise<void>;
  /** The last position seen on a subscribed exact channel with history, or null. */
  position(channel: string): Position | null;
  subscribe<T = unknown>(
    patterns: string | readonly string[],
    callback: (message: Message<T>) => void,
    options?: SubscribeOptions,
  ): Subscription<T>;
  /** Resolves with the broker's acknowledgement; rejects with BrokerError (see `.code`). */
  publish(channel: string, data: unknown, options?: PublishOptions): Promise<PublishAck>;
  /** Fire and forget; true if sent at once, false if queued until the next connection. */
  publishNoWait(channel: string, data: unknown): boolean;
  /** Application-level ping; resolves with the round trip in ms. */
  ping(options?: RequestOptions): Promise<number>;
}

/** Whether `channel` matches `pattern` (`*` one token, `>` one or more trailing tokens). */
export declare function matches(pattern: string, channel: string): boolean;

/** Create a client (default URL: ws(s)://<page host>/ws) and start connecting. */
export declare function connect(url?: string, options?: ClientOptions): BrokerClient;
