// Types of the browser client served at /client/broker.js (wire protocol version 1).

/** Wire error codes of protocol version 1. */
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
  | "internal";

export declare const ERROR_CODES: readonly ErrorCode[];

/** An error the broker answered with; base class of every error the client raises. */
export declare class BrokerError extends Error {
  constructor(code: string, message: string, requestId?: number | string | null);
  /** A wire code, "connection_closed", "timeout", or a code from a newer broker. */
  readonly code: ErrorCode | "connection_closed" | "timeout" | (string & {});
  /** Id of the failed request; null for fire-and-forget publishes. */
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

/** A published message. Fields the broker adds (such as `offset`) are kept. */
export interface Message<T = unknown> {
  readonly op: "message";
  readonly channel: string;
  readonly data: T;
  readonly [extra: string]: unknown;
}

/** Messages published between `since` and `until` (ms since the epoch) may have been missed. */
export interface Gap {
  readonly reason: "reconnect";
  readonly since: number;
  readonly until: number;
}

export interface ReconnectEvent extends Gap {
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

export type State = "new" | "connecting" | "open" | "reconnecting" | "closed";

export interface ClientEvents {
  /** The state changed. */
  state: { readonly state: State };
  /** A connection opened (`reconnect`: it is not the first). */
  open: { readonly reconnect: boolean };
  /** A connection closed; the client reconnects unless `willReconnect` is false. */
  close: CloseEvent;
  /** Reconnected and re-subscribed everything. */
  reconnect: ReconnectEvent;
  /** Messages may have been missed (today: after every reconnection). */
  gap: Gap;
  /** An error that answers no awaited request: a refused publishNoWait or subscription. */
  error: BrokerError;
}

export interface ClientOptions {
  /** Milliseconds a request waits for its reply, including any wait for a connection. Default 10000. */
  requestTimeout?: number;
  /** Milliseconds one connection attempt may take. Default 10000. */
  openTimeout?: number;
  /** Milliseconds between application-level pings; 0 disables them. Default 15000. */
  pingInterval?: number;
  /** Milliseconds without a pong before the connection counts as dead. Default 10000. */
  pingTimeout?: number;
  /** Shortest delay before reconnecting, ms. Default 200. */
  minReconnectDelay?: number;
  /** Longest delay before reconnecting, ms (the cap of the exponential backoff). Default 10000. */
  maxReconnectDelay?: number;
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
  /** Called after each reconnection: messages may have been missed. */
  onGap?: (gap: Gap) => void;
  /** Called if the broker refuses the subscription (now or when re-subscribing). */
  onError?: (error: BrokerError) => void;
}

export interface RequestOptions {
  /** Milliseconds; default: the client's requestTimeout. */
  timeout?: number;
}

export declare class Subscription<T = unknown> {
  readonly patterns: readonly string[];
  /** Resolves once the broker confirmed every pattern; rejects with its error. */
  readonly ready: Promise<void>;
  /** Gaps seen so far. */
  readonly gaps: number;
  readonly lastGap: Gap | null;
  /** True once unsubscribed, refused, or the client closed. */
  readonly closed: boolean;
  /** Why it ended, when it ended with an error. */
  readonly error: BrokerError | null;
  /** Stop receiving; resolves once the broker confirmed (at once when offline). */
  unsubscribe(): Promise<void>;
}

export declare class BrokerClient {
  constructor(url?: string, options?: ClientOptions);
  readonly url: string;
  readonly options: Required<Omit<ClientOptions, "WebSocket">> & Pick<ClientOptions, "WebSocket">;
  readonly state: State;
  /** True while a connection is open. */
  readonly connected: boolean;
  /** Successful reconnections so far. */
  readonly reconnects: number;
  /** Start connecting; `connect()` does it for you. */
  start(): this;
  /** Close for good; pending requests reject with ConnectionClosedError. */
  close(): void;
  on<K extends keyof ClientEvents>(type: K, listener: (event: ClientEvents[K]) => void): () => void;
  off<K extends keyof ClientEvents>(type: K, listener: (event: ClientEvents[K]) => void): void;
  /** Resolves once a connection is open. */
  whenConnected(): Promise<void>;
  subscribe<T = unknown>(
    patterns: string | readonly string[],
    callback: (message: Message<T>) => void,
    options?: SubscribeOptions,
  ): Subscription<T>;
  /** Resolves on the broker's ok; rejects with BrokerError (see `.code`). */
  publish(channel: string, data: unknown, options?: RequestOptions): Promise<void>;
  /** Fire and forget; true if sent at once, false if queued until the next connection. */
  publishNoWait(channel: string, data: unknown): boolean;
  /** Application-level ping; resolves with the round trip in ms. */
  ping(options?: RequestOptions): Promise<number>;
}

/** Whether `channel` matches `pattern` (`*` one token, `>` one or more trailing tokens). */
export declare function matches(pattern: string, channel: string): boolean;

/** Create a client (default URL: ws(s)://<page host>/ws) and start connecting. */
export declare function connect(url?: string, options?: ClientOptions): BrokerClient;
