// Types of the public API of @iim/client (src/index.js). The frames and
// their fields are those of docs/client-protocol.md.

/** `0` one to one (`to` is a user), `1` group (`to` is a group). */
export type OpeValue = 0 | 1;
export declare const Ope: Readonly<{ single: 0; group: 1 }>;

export type ConnectionState = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed';
export type Status = 'online' | 'away' | 'busy';

/** Where the client keeps a device's state (cursors and unacknowledged
 * sends) between sessions. Keys name a user and a device. */
export interface Storage {
  load(key: string): Promise<StoredState | undefined>;
  save(key: string, state: StoredState): Promise<void>;
}

export interface StoredState {
  version: 1;
  /** The highest inbox sequence held without a gap. */
  inbox: number;
  /** The same per large group, by group id. */
  groups: Record<string, number>;
  /** Unacknowledged sends, oldest first: each `send` frame as sent. */
  outbox: { req: string; frame: string }[];
}

export declare class MemoryStorage implements Storage {
  load(key: string): Promise<StoredState | undefined>;
  save(key: string, state: StoredState): Promise<void>;
}

export interface ClientOptions {
  /** App servers' client endpoints: `ws://HOST:PORT/ws` URLs, or `HOST:PORT`. */
  servers: string | string[];
  /** The token, or a function giving one; a function is asked again when
   * the server says the token expired (4001 or `auth_expired`). */
  token: string | (() => string | Promise<string>);
  /** 1 to 64 characters; default `default`. Cursors are kept per device. */
  device?: string;
  /** Default: a MemoryStorage. */
  storage?: Storage;
  /** The WebSocket class; default `globalThis.WebSocket`. */
  WebSocket?: new (url: string) => WebSocket;
  /** Where a device without a stored cursor starts; default `all`. */
  start?: 'all' | 'latest';
  /** No answer or welcome for this long: the connection is dead (10 000). */
  answerTimeoutMs?: number;
  /** A `ping` after this long without sending (25 000). */
  pingIntervalMs?: number;
  /** Reconnect backoff: doubling from 500 ms to 30 s, jittered. */
  backoffInitialMs?: number;
  backoffMaxMs?: number;
  /** A connection up this long resets the backoff (10 000). */
  stableMs?: number;
  /** Delay before resending a send refused `rate_limited` or `unavailable` (1 000). */
  retryMs?: number;
  /** Most unacknowledged sends (1 000); more are refused `queue_full`. */
  maxUnacked?: number;
  /** Most requests awaiting answers (256). */
  maxPending?: number;
  /** Most pushes held above a gap (10 000). */
  maxAside?: number;
  /** Messages per sync page (200, the server's maximum). */
  syncLimit?: number;
}

/** A chat message: a `msg` push or a sync page's entry, or the client's
 * own send once acknowledged. */
export interface Message {
  /** Sequence in this user's inbox (absent for large groups). */
  seq?: number;
  /** Sequence in the large group's timeline (large groups only). */
  gseq?: number;
  id: number;
  req: string;
  ope: OpeValue;
  from: number;
  /** The user or group sent to (the group for large groups). */
  to: number;
  type: string;
  body: unknown;
  ex?: unknown;
  /** Unix milliseconds. */
  ts: number;
}

export interface Ack {
  req: string;
  id: number;
  seq?: number;
  gseq?: number;
  ts: number;
  /** True when the server had stored this req before (a resend). */
  duplicate: boolean;
}

export interface Welcome {
  op: 'welcome';
  user: number;
  device: string;
  server: number;
  inbox_max: number;
  large_groups: { group: number; max: number }[];
}

export interface Presence {
  user: number;
  status: Status | 'offline';
  text: string;
  version: number;
}

export interface Notice {
  from: number;
  text: string;
}

export interface StateEvent {
  state: ConnectionState;
  /** With `open`: the app server's id. */
  server?: number;
  /** With `reconnecting`: why, and the delay before the next attempt. */
  code?: number;
  reason?: string;
  delay?: number;
  /** With `closed` after a refusal. */
  error?: ClientError;
}

export interface SendOptions {
  to: number;
  /** Default 0 (one to one). */
  ope?: OpeValue;
  /** Default `text`. */
  type?: string;
  body: unknown;
  ex?: unknown;
  /** Default: a fresh unique id. */
  req?: string;
}

/** A conversation, as this user sends to it. */
export interface Conversation {
  to: number;
  /** Default 0 (one to one). */
  ope?: OpeValue;
}

/** The answer to `markRead`: the position stored. */
export interface ReadSet {
  ope: OpeValue;
  to: number;
  /** This user's inbox sequence (absent for large groups). */
  seq?: number;
  /** The large group's timeline sequence (large groups only). */
  gseq?: number;
  /** False when the position was there or beyond already. */
  moved: boolean;
}

/** `reader` has read the conversation `ope`/`to` (as this user sends to
 * it) up to this user's `seq` (or, for its own devices in a large group,
 * `gseq`); `id` is the last message read. */
export interface Receipt {
  reader: number;
  ope: OpeValue;
  to: number;
  seq?: number;
  gseq?: number;
  id: number;
}

export interface ReadState {
  /** This user's positions. */
  mine: { ope: OpeValue; to: number; seq?: number; gseq?: number }[];
  /** The others' positions, in this user's inbox sequences (1:1 and
   * groups of at most 32 members). */
  theirs: { reader: number; ope: OpeValue; to: number; seq: number }[];
}

export interface Typing {
  from: number;
  ope: OpeValue;
  to: number;
  /** Show it for this long unless another one comes. */
  expiresIn: number;
}

export interface ClientEvents {
  /** Every message of the inbox and large groups, in sequence order,
   * exactly once, the client's own sends included. */
  message: (m: Message) => void;
  /** A send acknowledged (also one restored from storage). */
  sent: (ack: Ack) => void;
  /** Contacts whose presence changed (a higher version). */
  presence: (changed: Presence[]) => void;
  notice: (n: Notice) => void;
  /** A read position rose: another member's, or this user's on another
   * device. */
  receipt: (r: Receipt) => void;
  /** `read_state` answered (at every welcome). */
  readstate: (s: ReadState) => void;
  /** Someone is typing. */
  typing: (t: Typing) => void;
  state: (s: StateEvent) => void;
  /** Every stream caught up after a connect or a sync. */
  synced: (s: { inboxMax: number; groupMax: Record<number, number> }) => void;
  /** Refusals nobody awaits, storage failures, refused tokens. */
  error: (e: ClientError | Error) => void;
}

export declare class ClientError extends Error {
  constructor(code: string, message: string, extra?: { req?: string; cause?: unknown });
  /** A code of the protocol (§6), or `queue_full`, `closed`,
   * `not_connected`, `disconnected`, `too_large`, `storage`, `user_changed`. */
  code: string;
  req?: string;
}

export declare class IimClient {
  constructor(options: ClientOptions);
  readonly state: ConnectionState;
  readonly user: number | null;
  readonly welcome: Welcome | null;
  readonly inboxMax: number;
  readonly groupMax: Record<number, number>;
  readonly unacked: ({ req: string } & Omit<SendOptions, 'req'>)[];
  on<K extends keyof ClientEvents>(type: K, listener: ClientEvents[K]): () => void;
  once<K extends keyof ClientEvents>(type: K, listener: ClientEvents[K]): () => void;
  off<K extends keyof ClientEvents>(type: K, listener: ClientEvents[K]): void;
  connect(): Promise<Welcome>;
  send(m: SendOptions): Promise<Ack>;
  setStatus(status: Status, text?: string): Promise<{ status: Status; text: string }>;
  presenceSubscribe(users: number[]): Promise<Presence[]>;
  presence(user: number): Presence;
  markRead(c: Conversation & { seq?: number }): Promise<ReadSet>;
  readState(): Promise<ReadState>;
  readPosition(c: Conversation): number;
  readBy(c: Conversation): Record<number, number>;
  typing(c: Conversation): Promise<void>;
  typers(c: Conversation): number[];
  ping(): Promise<void>;
  history(options?: { group?: number; before?: number; limit?: number }): Promise<Message[]>;
  sync(): void;
  close(): Promise<void>;
}
