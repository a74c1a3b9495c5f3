// Types of tidings-client: the ES module, and (through global.d.ts) the
// browser build's window.Tidings. Hand-written: keep in step with src/client.js
// (test/unit/types.test.js checks every public name is declared here).

import type { ManagerOptions, Socket, SocketOptions, io } from 'socket.io-client';

/** connecting → connected ⇄ reconnecting; disconnected after close() or a refusal. */
export type State = 'connecting' | 'connected' | 'reconnecting' | 'disconnected';

export type TransportName = 'websocket' | 'sse';

/** An offset: a Redis stream id "<ms>-<seq>", strictly increasing per topic. */
export type Offset = string;

export interface Publication<T = unknown> {
  topic: string;
  offset: Offset;
  /** The payload: parsed JSON, or the text when it is not JSON. */
  data: T;
}

export interface DeliveryInfo {
  /** true for publications replayed from history after a reconnect (or `since`). */
  recovered: boolean;
}

export type PublicationHandler<T = unknown> = (
  publications: Publication<T>[],
  info: DeliveryInfo,
) => void;

/** Why a subscribe (or the connection) was refused. */
export type ErrorCode =
  | 'forbidden'
  | 'invalid_topic'
  | 'limit'
  | 'unavailable'
  | 'invalid_token'
  | 'unsubscribed'
  | 'sse_unavailable'
  | (string & {});

export interface SubscribeOk<T = unknown> {
  ok: true;
  topic: string;
  /** The topic's latest offset (null: none yet, or unknown over SSE). */
  offset?: Offset | null;
  recovered: boolean;
  publications: Publication<T>[];
}

export interface SubscribeRefused {
  ok: false;
  topic?: string;
  error: ErrorCode;
}

export type SubscribeAck<T = unknown> = SubscribeOk<T> | SubscribeRefused;

export interface UnsubscribeAck {
  ok: boolean;
  error?: string;
}

export interface SubscribeOptions {
  /** Start after this offset (history permitting) instead of at the latest. */
  since?: Offset;
}

export interface RequestOptions {
  /** Milliseconds to wait for the answer; default: the client's ackTimeout. */
  timeout?: number;
}

/** One subscriber of a topic, in `join` and `leave` events. */
export interface Member {
  topic: string;
  /** The token's user; null for an anonymous client. */
  sub: string | null;
  /** The connection. */
  client: string;
}

export interface Presence {
  ok: true;
  topic: string;
  clients: number;
  users: { sub: string; clients: number }[];
}

export interface PresenceStats {
  ok: true;
  topic: string;
  clients: number;
  users: number;
}

export interface Events {
  state: State;
  recovered: { topic: string; count: number };
  gap: { topic: string };
  /** topic null: the connection itself was refused (e.g. invalid_token). */
  error: { topic: string | null; error: ErrorCode };
  join: Member;
  leave: Member;
}

/** The parts of an EventSource the "sse" transport uses (a browser's, or the "eventsource" package's). */
export interface EventSourceLike {
  readonly readyState: number;
  onopen: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
  addEventListener(type: string, listener: (event: { data: string }) => void): void;
  close(): void;
}

export type EventSourceConstructor = new (
  url: string,
  init?: { withCredentials?: boolean },
) => EventSourceLike;

export type FetchLike = (
  url: string,
  init: { headers: Record<string, string>; credentials: string; signal?: any },
) => Promise<{ status: number }>;

export interface TidingsOptions {
  /** The server; default: the page's origin. */
  url?: string;
  /** A JWT, or a function asked for one on every (re)connect. */
  token?: string | (() => string);
  /** "websocket" (Socket.IO, the default) or "sse" (Server-Sent Events, receive only). */
  transport?: TransportName;
  /** Milliseconds to wait for a subscribe's answer before reconnecting (15000). */
  ackTimeout?: number;
  /** websocket: Socket.IO's transports (default ["websocket", "polling"]). */
  transports?: ('websocket' | 'polling' | 'webtransport')[];
  /** websocket: the Socket.IO path (default "/socket.io"). */
  path?: string;
  /** websocket: more options for Socket.IO's io(). */
  io?: Partial<ManagerOptions & SocketOptions>;
  /** websocket: the Socket.IO client to use instead of socket.io-client's (or window.io). */
  ioClient?: typeof io;
  /** sse: the EventSource class (browsers have one; in Node, the "eventsource" package's). */
  EventSource?: EventSourceConstructor;
  /** sse: fetch, used to learn why a stream was refused (default: the global one). */
  fetch?: FetchLike;
  /** sse: the endpoint's path (default "/sse"). */
  ssePath?: string;
  /** sse: send cookies to another origin. */
  withCredentials?: boolean;
}

/** A refused or failed request; code is the server's error or "timeout", "unsupported", "closed". */
export class TidingsError extends Error {
  readonly code: ErrorCode | 'presence_off' | 'timeout' | 'unsupported' | 'closed';
  readonly topic: string | null;
  constructor(code: string, message: string, topic?: string | null);
}

export class Tidings {
  constructor(options?: TidingsOptions);

  readonly state: State;
  readonly transport: TransportName;
  /** websocket: the Socket.IO socket (null over SSE). */
  readonly socket: Socket | null;

  on<E extends keyof Events>(event: E, listener: (arg: Events[E]) => void): this;
  off<E extends keyof Events>(event: E, listener: (arg: Events[E]) => void): this;

  /**
   * Receive topic's publications, each once, in offset order, across
   * reconnects. Resolves with the server's answer; a refusal resolves too
   * (ok: false) and is also an `error` event.
   */
  subscribe<T = unknown>(
    topic: string,
    onPublications: PublicationHandler<T>,
    options?: SubscribeOptions,
  ): Promise<SubscribeAck<T>>;
  /** Stop receiving topic and forget its offset. */
  unsubscribe(topic: string): Promise<UnsubscribeAck>;
  /** The offset of the last publication delivered for topic (null: none yet). */
  offset(topic: string): Offset | null;
  /** The topics subscribed to. */
  topics(): string[];
  /** Who is subscribed to topic (websocket only); rejects with a TidingsError. */
  presence(topic: string, options?: RequestOptions): Promise<Presence>;
  /** How many are subscribed to topic (websocket only); rejects with a TidingsError. */
  presenceStats(topic: string, options?: RequestOptions): Promise<PresenceStats>;
  /** Disconnect for good. */
  close(): void;

  static compareOffsets(a: Offset | null | undefined, b: Offset | null | undefined): -1 | 0 | 1;
  static parseOffset(offset: unknown): [string, string] | null;
  static isValidTopic(topic: unknown): topic is string;
  static TidingsError: typeof TidingsError;
}

export function compareOffsets(a: Offset | null | undefined, b: Offset | null | undefined): -1 | 0 | 1;
export function parseOffset(offset: unknown): [string, string] | null;
export function isValidTopic(topic: unknown): topic is string;

export default Tidings;
