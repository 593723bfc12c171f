// Type declarations for edgeplex.js (the module the edge serves at GET /edgeplex.js).

export type TransportName = "webtransport" | "websocket" | "sse";
export type State = "connecting" | "open" | "reconnecting" | "closed";

/** The protocol's error codes, plus the client's own: disconnected, timeout, closed. */
export type ErrorCode =
  | "bad_request"
  | "unknown_op"
  | "too_large"
  | "rate_limited"
  | "forbidden"
  | "not_subscribed"
  | "unavailable"
  | "internal"
  | "unauthorized"
  | "disconnected"
  | "timeout"
  | "closed";

export interface CertificateHash {
  algorithm?: "sha-256";
  /** Bytes, or the hex the edge prints at start (colons allowed). */
  value: BufferSource | string;
}

export interface ConnectOptions {
  /** Tried in this order; default all three. */
  transports?: TransportName[];
  /** Called at connect and again before the token's `exp`. */
  token?: () => Promise<string> | string;
  /** Passed to `new WebTransport()` (a dev certificate's SHA-256). */
  serverCertificateHashes?: CertificateHash[];
  /** A transport that has not opened by then counts as unable to (default 5000 ms). */
  openTimeout?: number;
  /** A request without a reply by then rejects with `timeout` (default 10000 ms). */
  requestTimeout?: number;
}

export interface MessageMeta {
  channel: string;
  /** Opaque position; compare only for equality. */
  offset: string;
}

export interface SubscribeOptions {
  /** WebTransport only: pushes as unreliable datagrams (latest-value feeds; no resume). */
  delivery?: "stream" | "datagram";
}

export class EdgeplexError extends Error {
  code: ErrorCode;
  retry_after_ms?: number;
}

export interface Subscription {
  readonly channel: string;
  /** The last offset delivered (SSE: `-` when the channel had no history). */
  readonly offset: string | null;
  on(event: "gap", fn: () => void): () => void;
  on(event: "subscribed", fn: () => void): () => void;
  on(event: "error", fn: (e: EdgeplexError) => void): () => void;
  off(event: string, fn: (...args: any[]) => void): void;
  unsubscribe(): void;
}

export interface Client {
  /** Set once a transport has opened; kept for the client's life. */
  readonly transport: TransportName | null;
  readonly state: State;
  readonly session?: string;
  on(event: "state", fn: (s: State) => void): () => void;
  off(event: string, fn: (...args: any[]) => void): void;
  subscribe<T = unknown>(
    channel: string,
    handler: (data: T, meta: MessageMeta) => void,
    opts?: SubscribeOptions,
  ): Subscription;
  /** Resolves with the reply (`{ok: true}`); rejects with an EdgeplexError. */
  publish(channel: string, data: unknown): Promise<{ ok: true }>;
  close(): void;
}

export function connect(url: string, opts?: ConnectOptions): Client;
/** Full-jitter delay in ms for the `attempt`-th retry (0-based): [0, min(10 s, 250 ms·2^n)]. */
export function backoff(attempt: number, random?: () => number): number;
/** A JWT's `exp` in ms since the epoch, read without verifying; null when absent. */
export function tokenExpiry(jwt: string): number | null;
