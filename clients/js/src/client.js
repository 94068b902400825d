// The iim client: one logical session of one device, kept alive across
// connections to any app server of a deployment. It speaks
// docs/client-protocol.md and does what its section 8 asks of a client:
//
// - one gap-free cursor per stream (the inbox, each large group's
//   timeline); pushes are applied in sequence order, a push above a gap is
//   kept aside and the stream synced from its cursor, pages fetched while
//   `more`;
// - every send carries a unique `req` and stays in the outbox, persisted
//   with the cursors, until its `ack`; after a reconnect (or an answer that
//   never came) it is resent with the same `req`, byte for byte, and the
//   server's `duplicate` makes that harmless;
// - read positions (its own and the others', asked with `read_state` at
//   every welcome, then kept from `receipt` pushes, highest wins) and
//   who is typing where, each until its `expires_in` passes;
// - reconnects with jittered exponential backoff, moving along the server
//   list, and stops for good only when the server refuses the token.
//
// Sends go one at a time, the oldest first (as `iimctl chat` does): a
// refused or rate-limited send cannot be overtaken by a later one, so
// messages are stored in the order the app sent them.

import { Emitter } from './emitter.js';
import { ClientError } from './errors.js';
import { MemoryStorage } from './storage/memory.js';

/** Defaults; every one can be changed through the constructor's options. */
const DEFAULTS = {
  device: 'default',
  /** No answer (or no welcome) for this long: the connection is dead. */
  answerTimeoutMs: 10_000,
  /** Send a `ping` after this long without sending anything, so a dead
   * connection is noticed by the answer timeout, and the server's idle
   * timeout (60 s) never fires on a live one. */
  pingIntervalMs: 25_000,
  /** Reconnect delays: doubling from `initialMs` to `maxMs`, each drawn
   * at random between half and all of it, so clients cut off together do
   * not come back together. */
  backoffInitialMs: 500,
  backoffMaxMs: 30_000,
  /** A connection up this long resets the backoff. */
  stableMs: 10_000,
  /** How long to wait before resending a send refused `rate_limited` or
   * `unavailable`. */
  retryMs: 1_000,
  maxUnacked: 1_000,
  maxPending: 256,
  /** Pushes held above a gap; more are dropped (the sync brings them). */
  maxAside: 10_000,
  syncLimit: 200,
  /** Where a device without a stored cursor starts: `all` fetches the
   * whole inbox (and large groups' timelines), `latest` starts at the
   * welcome's maxima and leaves older messages to `history`. */
  start: 'all',
};

/** The protocol's limit on one text frame (`limits.max_message_bytes`). */
const MAX_FRAME_BYTES = 65_536;
/** The protocol's limit on users in one `presence_subscribe`. */
const MAX_WATCHED = 500;
/** The key of the inbox among the cursors; large groups use their id. */
const INBOX = 0;
/** Auth refusals that a new attempt with the same token cannot cure. */
const FATAL_AUTH = new Set(['auth_failed', 'auth_required', 'unknown_user']);
const STATUSES = new Set(['online', 'away', 'busy']);

/**
 * @typedef {{max: number, aside: Map<number, object>, syncing: boolean, again: boolean,
 *   retryAt: number}} Cursor
 * @typedef {{req: string, frame: string, msg: object, inFlight: boolean,
 *   due: number, waiters: {resolve: Function, reject: Function}[]}} Unacked
 * @typedef {{kind: string, req: string, at: number, key?: number,
 *   history?: boolean, before?: number, resolve?: Function, reject?: Function}} Pending
 */

export class IimClient extends Emitter {
  #o;
  #servers;
  #storage;
  #WebSocket;
  #tokenSource;
  /** @type {string | null} */
  #token = null;
  #tokenStale = false;

  #state = 'idle';
  #ws = null;
  /** Bumped for every connection (and on close): events of an older
   * socket are ignored. */
  #gen = 0;
  #serverIndex = 0;
  #attempt = 0;
  #connectedAt = 0;
  #welcomed = false;
  #lastSentAt = 0;
  #authError = null;
  #caughtUp = false;
  /** @type {object | null} */
  #welcome = null;

  #user = null;
  #loaded = false;
  /** @type {Map<number, Cursor>} */
  #cursors = new Map();
  /** @type {Unacked[]} */
  #outbox = [];
  /** @type {Pending[]} */
  #pending = [];
  #reqCounter = 0;
  #reqPrefix;

  /** @type {Map<number, {user: number, status: string, text: string, version: number}>} */
  #presence = new Map();
  #status = null;
  #watched = new Set();

  /** Conversation key (`ope:to`) -> this user's read position. */
  #myReads = new Map();
  /** Conversation key -> reader -> the position (in this user's inbox). */
  #theirReads = new Map();
  /** Conversation key -> typist -> when its indicator expires (ms). */
  #typing = new Map();

  #tick = null;
  #reconnectTimer = null;
  #opened = null;
  /** Frames are handled one after the other, also across the one await
   * (loading the stored state at the first welcome). */
  #frames = Promise.resolve();
  #saving = null;
  #dirty = false;

  /**
   * @param {import('./index.js').ClientOptions} options
   */
  constructor(options) {
    super();
    const o = { ...DEFAULTS, ...options };
    const servers = Array.isArray(o.servers) ? o.servers : [o.servers];
    if (!servers.length || servers.some((s) => typeof s !== 'string' || !s)) {
      throw new TypeError('servers: a list of ws:// URLs or HOST:PORT');
    }
    if (typeof o.token !== 'string' && typeof o.token !== 'function') {
      throw new TypeError('token: a string, or a function returning one');
    }
    if (typeof o.device !== 'string' || o.device.length < 1 || o.device.length > 64) {
      throw new TypeError('device: 1 to 64 characters');
    }
    if (o.start !== 'all' && o.start !== 'latest') throw new TypeError("start: 'all' or 'latest'");
    this.#WebSocket = o.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== 'function') {
      throw new TypeError(
        'no WebSocket: pass options.WebSocket (on Node 20, run with --experimental-websocket)',
      );
    }
    this.#o = o;
    this.#servers = servers.map((s) => (s.includes('://') ? s : `ws://${s}/ws`));
    this.#storage = o.storage ?? new MemoryStorage();
    this.#tokenSource = o.token;
    // Unique per user across devices and restarts, as the protocol asks.
    this.#reqPrefix = `${o.device.slice(0, 24)}-${randomId()}`;
  }

  // ---- Public API --------------------------------------------------------

  /** `idle`, `connecting`, `open`, `reconnecting` or `closed`. */
  get state() {
    return this.#state;
  }

  /** The authenticated user id (after the first welcome), else null. */
  get user() {
    return this.#user;
  }

  /** The last `welcome` frame, or null. */
  get welcome() {
    return this.#welcome;
  }

  /** The highest inbox sequence held without a gap. */
  get inboxMax() {
    return this.#cursors.get(INBOX)?.max ?? 0;
  }

  /** The highest sequence held without a gap of each large group. */
  get groupMax() {
    const out = {};
    for (const [k, c] of this.#cursors) if (k !== INBOX) out[k] = c.max;
    return out;
  }

  /** Sends not acknowledged yet, oldest first. */
  get unacked() {
    return this.#outbox.map((u) => ({ req: u.req, ...pick(u.msg) }));
  }

  /** The presence held of `user` (offline at version 0 if never heard of). */
  presence(user) {
    return this.#presence.get(user) ?? { user, status: 'offline', text: '', version: 0 };
  }

  /** Starts connecting; resolves at the first `welcome`, rejects if the
   * client closes before (a refused token, `close()`). */
  connect() {
    if (this.#state === 'closed') return Promise.reject(new ClientError('closed', 'client closed'));
    if (!this.#opened) {
      this.#opened = deferred();
      this.#opened.promise.catch(() => {}); // a caller may not wait for it
      this.#setState('connecting');
      this.#open();
    }
    return this.#opened.promise;
  }

  /**
   * Queues a message; resolves with its `ack` once stored, rejects with the
   * server's refusal. It is kept (and resent with the same `req`) across
   * reconnects until acknowledged, also when called while disconnected.
   * @param {{to: number, ope?: 0 | 1, type?: string, body: unknown, ex?: unknown, req?: string}} m
   */
  send(m) {
    if (this.#state === 'closed') return Promise.reject(new ClientError('closed', 'client closed'));
    const { to, ope = 0, type = 'text', body, ex } = m ?? {};
    if (!Number.isSafeInteger(to) || to <= 0) return badSend('to: a positive integer');
    if (ope !== 0 && ope !== 1) return badSend('ope: 0 (one to one) or 1 (group)');
    if (typeof type !== 'string' || type.length < 1 || type.length > 32) {
      return badSend('type: 1 to 32 characters');
    }
    if (body === undefined) return badSend('body: required');
    if (this.#outbox.length >= this.#o.maxUnacked) {
      return Promise.reject(
        new ClientError('queue_full', `${this.#outbox.length} sends await their ack already`),
      );
    }
    const req = m.req ?? this.#nextReq();
    if (this.#outbox.some((u) => u.req === req)) return badSend(`req: ${req} is queued already`);
    const frame = { op: 'send', req, ope, to, type, body };
    if (ex !== undefined) frame.ex = ex;
    // Serialised once: a resend repeats these very bytes (the server
    // refuses a resend that differs with `req_reused`).
    const text = JSON.stringify(frame);
    if (new TextEncoder().encode(text).length > MAX_FRAME_BYTES) {
      return Promise.reject(
        new ClientError('too_large', `the send is over ${MAX_FRAME_BYTES} bytes`, { req }),
      );
    }
    const d = deferred();
    this.#outbox.push({ req, frame: text, msg: frame, inFlight: false, due: 0, waiters: [d] });
    this.#persist();
    this.#flush();
    return d.promise;
  }

  /** Sets this connection's status (kept and set again after reconnects). */
  setStatus(status, text = '') {
    if (!STATUSES.has(status)) {
      return Promise.reject(new ClientError('bad_request', 'status: online, away or busy'));
    }
    this.#status = { status, text };
    return this.#request({ op: 'set_status', status, text }, 'set_status');
  }

  /** Watches these contacts' presence (again after every reconnect);
   * resolves with their current presence. */
  presenceSubscribe(users) {
    const all = new Set([...this.#watched, ...users]);
    if (all.size > MAX_WATCHED) {
      return Promise.reject(new ClientError('bad_request', `at most ${MAX_WATCHED} watched users`));
    }
    const p = this.#request({ op: 'presence_subscribe', users: [...users] }, 'presence_subscribe', {
      users: [...users],
    });
    // Only what the server accepted is watched again after a reconnect.
    return p.then((contacts) => {
      for (const u of users) this.#watched.add(u);
      return contacts;
    });
  }

  /**
   * Marks a conversation read up to `seq` (this user's inbox sequence, or a
   * large group's timeline sequence; default: everything held). Resolves
   * with the position stored: `{ope, to, seq | gseq, moved}`. The other
   * side's devices get a `receipt`; one call acknowledges everything below.
   * @param {{to: number, ope?: 0 | 1, seq?: number}} c
   */
  markRead({ to, ope = 0, seq } = {}) {
    if (!Number.isSafeInteger(to) || to <= 0) return badSend('to: a positive integer');
    if (ope !== 0 && ope !== 1) return badSend('ope: 0 (one to one) or 1 (group)');
    const at = seq ?? (ope === 1 && this.#cursors.has(to) ? this.#cursors.get(to).max : this.inboxMax);
    if (!Number.isSafeInteger(at) || at <= 0) return badSend('seq: a positive integer');
    return this.#request({ op: 'read', ope, to, seq: at }, 'read').then((r) => {
      this.#raise(this.#myReads, convKey(ope, to), r.gseq ?? r.seq);
      return r;
    });
  }

  /** Asks the server where this user and the others stand (done by itself
   * at every welcome); resolves with `{mine, theirs}`. */
  readState() {
    return this.#request({ op: 'read_state' }, 'read_state').then((s) => {
      for (const m of Array.isArray(s?.mine) ? s.mine : []) {
        this.#raise(this.#myReads, convKey(m.ope, m.to), m.gseq ?? m.seq);
      }
      for (const t of Array.isArray(s?.theirs) ? s.theirs : []) {
        this.#raiseTheirs(t.ope, t.to, t.reader, t.seq);
      }
      this.emit('readstate', s);
      return s;
    });
  }

  /** This user's read position in a conversation (0: none known). */
  readPosition({ to, ope = 0 }) {
    return this.#myReads.get(convKey(ope, to)) ?? 0;
  }

  /** The others' read positions in a conversation, in this user's inbox
   * sequences: `{reader: seq}`. */
  readBy({ to, ope = 0 }) {
    return Object.fromEntries(this.#theirReads.get(convKey(ope, to)) ?? []);
  }

  /** Tells the conversation's other members that this user is typing.
   * Call it at most every few seconds while the user types (the server
   * allows 3 at once, then 1 a second). */
  typing({ to, ope = 0 }) {
    if (!Number.isSafeInteger(to) || to <= 0) return badSend('to: a positive integer');
    if (ope !== 0 && ope !== 1) return badSend('ope: 0 (one to one) or 1 (group)');
    return this.#request({ op: 'typing', ope, to }, 'typing');
  }

  /** Who is typing in a conversation now (indicators not yet expired). */
  typers({ to, ope = 0 }) {
    const now = Date.now();
    const m = this.#typing.get(convKey(ope, to));
    if (!m) return [];
    for (const [u, until] of m) if (until <= now) m.delete(u);
    return [...m.keys()];
  }

  /** Round trip to the server; resolves when its `pong` arrives. */
  ping() {
    return this.#request({ op: 'ping' }, 'ping');
  }

  /**
   * Older messages of the inbox (or of a large group), oldest first: those
   * with a sequence below `before` (default: everything held), at most
   * `limit`. The protocol has no history request of its own: the inbox
   * and timelines are gap-free, so a `sync` from `before - 1 - limit`
   * returns exactly the page below `before`. It does not move the cursor
   * and emits no `message` events.
   */
  history({ group, before, limit = 50 } = {}) {
    const key = group ?? INBOX;
    const top = before ?? (this.#cursors.get(key)?.max ?? 0) + 1;
    const n = Math.min(Math.max(1, limit), 200);
    const since = Math.max(0, top - 1 - n);
    if (top <= 1) return Promise.resolve([]);
    const frame = { op: 'sync', since, limit: top - 1 - since };
    if (group !== undefined) frame.group = group;
    return this.#request(frame, 'sync', { history: true, before: top, key });
  }

  /** Syncs every stream from its cursor now (normally not needed). */
  sync() {
    if (!this.#welcomed) return;
    for (const key of this.#cursors.keys()) this.#requestSync(key);
  }

  /** Closes for good: clears every timer, closes the socket, rejects what
   * waits. Unacknowledged sends stay in the storage for a later session. */
  async close() {
    if (this.#state === 'closed') return this.#saving ?? undefined;
    this.#shutdown(new ClientError('closed', 'client closed'));
    this.#setState('closed');
    while (this.#saving) await this.#saving.catch(() => {});
  }

  // ---- Connections -------------------------------------------------------

  async #open() {
    const gen = ++this.#gen;
    this.#welcomed = false;
    this.#authError = null;
    this.#connectedAt = Date.now();
    let token;
    try {
      token = await this.#currentToken();
    } catch (e) {
      if (gen === this.#gen) this.#fail(new ClientError('auth_failed', 'no token', { cause: e }));
      return;
    }
    if (gen !== this.#gen) return;
    const url = this.#servers[this.#serverIndex % this.#servers.length];
    let ws;
    try {
      ws = new this.#WebSocket(url);
    } catch (e) {
      this.#dropped(gen, 0, String(e?.message ?? e));
      return;
    }
    this.#ws = ws;
    this.#startTick(gen);
    ws.addEventListener('open', () => {
      if (gen !== this.#gen) return;
      this.#write({ op: 'auth', token, device: this.#o.device });
    });
    ws.addEventListener('message', (e) => {
      if (gen !== this.#gen) return;
      const data = e.data;
      this.#frames = this.#frames
        .then(() => gen === this.#gen && this.#frame(data))
        .catch((err) => this.emit('error', err));
    });
    ws.addEventListener('close', (e) => this.#dropped(gen, e.code, e.reason));
    // An `error` is always followed by `close`; nothing to do here.
    ws.addEventListener('error', () => {});
  }

  async #currentToken() {
    if (this.#token !== null && !this.#tokenStale) return this.#token;
    if (typeof this.#tokenSource === 'string') {
      if (this.#tokenStale) throw new Error('the token expired and no token function was given');
      this.#token = this.#tokenSource;
    } else {
      const t = await this.#tokenSource();
      if (typeof t !== 'string' || !t) throw new Error('the token function returned no token');
      this.#token = t;
    }
    this.#tokenStale = false;
    return this.#token;
  }

  /** The connection `gen` is gone: decide whether and when to come back. */
  #dropped(gen, code, reason) {
    if (gen !== this.#gen || this.#state === 'closed') return;
    this.#gen++;
    this.#teardown(new ClientError('disconnected', `connection lost (${code} ${reason})`));
    const auth = this.#authError;
    if (code === 4001 || auth === 'auth_expired') {
      if (typeof this.#tokenSource !== 'function') {
        this.#fail(new ClientError('auth_expired', 'the token expired; give a token function'));
        return;
      }
      this.#tokenStale = true;
    } else if (FATAL_AUTH.has(auth) || code === 1008) {
      this.#fail(new ClientError(auth ?? 'auth_failed', `refused by the server: ${reason || auth}`));
      return;
    }
    if (this.#welcomed && Date.now() - this.#connectedAt >= this.#o.stableMs) this.#attempt = 0;
    // The next attempt goes to the next server: this one may be the
    // one that is down.
    this.#serverIndex++;
    const base = Math.min(this.#o.backoffMaxMs, this.#o.backoffInitialMs * 2 ** this.#attempt);
    const delay = Math.round(base / 2 + (Math.random() * base) / 2);
    this.#attempt = Math.min(this.#attempt + 1, 30);
    this.#setState('reconnecting', { code, reason, delay });
    this.#reconnectTimer = setTimeout(() => {
      this.#reconnectTimer = null;
      this.#open();
    }, delay);
  }

  /** A refusal no reconnect can cure: the client closes. */
  #fail(err) {
    this.#shutdown(err);
    this.#setState('closed', { error: err });
    this.emit('error', err);
  }

  #shutdown(err) {
    this.#gen++;
    this.#teardown(err);
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = null;
    for (const u of this.#outbox) for (const w of u.waiters.splice(0)) w.reject(err);
    this.#opened?.reject(err);
  }

  /** Forgets the current socket and what was asked on it. */
  #teardown(err) {
    clearInterval(this.#tick);
    this.#tick = null;
    const ws = this.#ws;
    this.#ws = null;
    if (ws && ws.readyState < 2) {
      try {
        ws.close(1000);
      } catch {
        // Closing a socket that never opened can throw in some runtimes.
      }
    }
    for (const p of this.#pending.splice(0)) p.reject?.(err);
    for (const u of this.#outbox) u.inFlight = false;
    for (const c of this.#cursors.values()) {
      c.syncing = c.again = false;
      c.retryAt = 0;
    }
  }

  #startTick(gen) {
    clearInterval(this.#tick);
    const every = Math.max(50, Math.min(500, this.#o.answerTimeoutMs / 4));
    this.#tick = setInterval(() => {
      if (gen !== this.#gen) return;
      const now = Date.now();
      const limit = this.#o.answerTimeoutMs;
      if (!this.#welcomed && now - this.#connectedAt > limit) {
        this.#dropped(gen, 0, 'no welcome in time');
      } else if (this.#pending.length && now - this.#pending[0].at > limit) {
        this.#dropped(gen, 0, 'no answer in time');
      } else if (this.#welcomed) {
        if (now - this.#lastSentAt > this.#o.pingIntervalMs) {
          this.#request({ op: 'ping' }, 'ping').catch(() => {});
        }
        for (const [key, c] of this.#cursors) {
          if (c.retryAt && c.retryAt <= now) {
            c.retryAt = 0;
            this.#requestSync(key);
          }
        }
        this.#flush();
      }
    }, every);
  }

  #setState(state, detail = {}) {
    this.#state = state;
    this.emit('state', { state, ...detail });
  }

  #write(frame) {
    const text = typeof frame === 'string' ? frame : JSON.stringify(frame);
    this.#lastSentAt = Date.now();
    this.#ws.send(text);
  }

  #nextReq() {
    return `${this.#reqPrefix}-${++this.#reqCounter}`;
  }

  /** A request whose answer resolves the returned promise. */
  #request(frame, kind, extra = {}) {
    if (!this.#welcomed) return Promise.reject(new ClientError('not_connected', 'not connected'));
    if (this.#pending.length >= this.#o.maxPending) {
      return Promise.reject(new ClientError('queue_full', 'too many requests await answers'));
    }
    const d = deferred();
    const req = this.#nextReq();
    this.#pending.push({ kind, req, at: Date.now(), resolve: d.resolve, reject: d.reject, ...extra });
    this.#write({ ...frame, req });
    return d.promise;
  }

  /** The first pending request of `kind` (answers come in order). */
  #take(kind) {
    const i = this.#pending.findIndex((p) => p.kind === kind);
    return i < 0 ? undefined : this.#pending.splice(i, 1)[0];
  }

  #takeReq(req) {
    const i = this.#pending.findIndex((p) => p.req === req);
    return i < 0 ? undefined : this.#pending.splice(i, 1)[0];
  }

  /** The pending request an answer is for: by the `req` the server echoes,
   * else (an older server) the first pending one of `kind`. */
  #answered(f, kind) {
    return typeof f.req === 'string' ? this.#takeReq(f.req) : this.#take(kind);
  }

  // ---- Frames ------------------------------------------------------------

  async #frame(data) {
    let f;
    try {
      f = JSON.parse(data);
    } catch {
      return; // nothing the server sends makes the client stop
    }
    if (!f || typeof f !== 'object') return;
    switch (f.op) {
      case 'welcome':
        return this.#onWelcome(f);
      case 'msg':
        return this.#onMsg(f);
      case 'ack':
        return this.#onAck(f);
      case 'sync':
        return this.#onSync(f);
      case 'error':
        return this.#onError(f);
      case 'pong':
        return this.#answered(f, 'ping')?.resolve();
      case 'status_set':
        return this.#answered(f, 'set_status')?.resolve({ status: f.status, text: f.text });
      case 'presence':
        return this.#onPresence(f);
      case 'notice':
        return this.emit('notice', { from: f.from, text: f.text });
      case 'sync_needed':
        // Pushes for this user were dropped at their sending server.
        return this.sync();
      case 'read_set':
        return this.#answered(f, 'read')?.resolve(readSet(f));
      case 'read_state':
        return this.#answered(f, 'read_state')?.resolve({ mine: f.mine ?? [], theirs: f.theirs ?? [] });
      case 'typing_sent':
        return this.#answered(f, 'typing')?.resolve();
      case 'receipt':
        return this.#onReceipt(f);
      case 'typing':
        return this.#onTyping(f);
      default:
        return; // ops of a newer server are ignored, as the protocol allows
    }
  }

  async #onWelcome(w) {
    if (this.#user !== null && w.user !== this.#user) {
      this.#fail(new ClientError('user_changed', `the token is for user ${w.user}, not ${this.#user}`));
      return;
    }
    this.#user = w.user;
    if (!this.#loaded) {
      const gen = this.#gen;
      try {
        await this.#load();
      } catch (e) {
        this.#fail(new ClientError('storage', 'cannot load the stored state', { cause: e }));
        return;
      }
      if (gen !== this.#gen) return;
    }
    this.#welcome = w;
    this.#welcomed = true;
    this.#caughtUp = false;
    this.#setState('open', { server: w.server });
    this.#opened?.resolve(w);
    const streams = [[INBOX, w.inbox_max]];
    for (const g of w.large_groups ?? []) streams.push([g.group, g.max]);
    for (const [key, max] of streams) {
      let c = this.#cursors.get(key);
      if (!c) {
        c = this.#cursor(key);
        if (this.#o.start === 'latest') c.max = max;
      }
      if (max > c.max || c.aside.size) this.#requestSync(key);
    }
    this.#persist();
    if (this.#status) {
      this.#request({ op: 'set_status', ...this.#status }, 'set_status').catch((e) => this.#report(e));
    }
    if (this.#watched.size) {
      const users = [...this.#watched];
      this.#request({ op: 'presence_subscribe', users }, 'presence_subscribe').catch((e) => this.#report(e));
    }
    // Receipts pushed while disconnected are lost: the stored positions
    // are asked for again.
    this.readState().catch((e) => this.#report(e));
    for (const u of this.#outbox) u.due = 0;
    this.#flush();
    this.#checkCaughtUp();
  }

  #onReceipt(f) {
    const at = f.gseq ?? f.seq;
    if (!Number.isSafeInteger(f.reader) || !Number.isSafeInteger(f.to) || !Number.isSafeInteger(at)) return;
    const key = convKey(f.ope, f.to);
    // Receipts may come late, twice or out of order: the highest wins.
    const rose =
      f.reader === this.#user
        ? this.#raise(this.#myReads, key, at)
        : this.#raiseTheirs(f.ope, f.to, f.reader, at);
    if (!rose) return;
    const r = { reader: f.reader, ope: f.ope, to: f.to, id: f.id };
    if (f.gseq != null) r.gseq = f.gseq;
    else r.seq = f.seq;
    this.emit('receipt', r);
  }

  #onTyping(f) {
    if (!Number.isSafeInteger(f.from) || !Number.isSafeInteger(f.to)) return;
    const ms = Math.min(Math.max(0, Number(f.expires_in) || 0), 60_000);
    const key = convKey(f.ope, f.to);
    let m = this.#typing.get(key);
    if (!m) this.#typing.set(key, (m = new Map()));
    m.set(f.from, Date.now() + ms);
    this.emit('typing', { from: f.from, ope: f.ope, to: f.to, expiresIn: ms });
  }

  /** Sets `map[key]` to `at` if higher; true when it rose. */
  #raise(map, key, at) {
    if (!Number.isSafeInteger(at) || (map.get(key) ?? 0) >= at) return false;
    map.set(key, at);
    return true;
  }

  #raiseTheirs(ope, to, reader, at) {
    const key = convKey(ope, to);
    let m = this.#theirReads.get(key);
    if (!m) this.#theirReads.set(key, (m = new Map()));
    return this.#raise(m, reader, at);
  }

  #onMsg(f) {
    const { op, ...m } = f;
    // A message from someone typing ends their indicator there.
    const conv = f.ope === 1 ? f.to : f.from === this.#user ? f.to : f.from;
    this.#typing.get(convKey(f.ope, conv))?.delete(f.from);
    const large = f.gseq != null;
    const seq = large ? f.gseq : f.seq;
    if (!Number.isSafeInteger(seq) || seq <= 0) return;
    if (this.#apply(large ? f.to : INBOX, seq, m)) this.#requestSync(large ? f.to : INBOX);
  }

  #onAck(a) {
    this.#takeReq(a.req);
    const i = this.#outbox.findIndex((u) => u.req === a.req);
    if (i < 0) return; // a second ack of a resend answered already
    const [u] = this.#outbox.splice(i, 1);
    const ack = { req: a.req, id: a.id, ts: a.ts, duplicate: a.duplicate === true };
    if (a.gseq != null) ack.gseq = a.gseq;
    else ack.seq = a.seq;
    for (const w of u.waiters) w.resolve(ack);
    this.emit('sent', ack);
    // The sent message is part of the stream: the app sees it as a
    // `message` at its sequence, like every other one, exactly once.
    const own = { ...pick(u.msg), req: u.req, from: this.#user, id: a.id, ts: a.ts };
    const large = a.gseq != null;
    const seq = large ? a.gseq : a.seq;
    if (large) own.gseq = seq;
    else own.seq = seq;
    const key = large ? u.msg.to : INBOX;
    if (Number.isSafeInteger(seq) && seq > 0 && this.#apply(key, seq, own)) this.#requestSync(key);
    this.#persist();
    this.#flush();
  }

  #onSync(page) {
    const p = this.#answered(page, 'sync');
    if (!p) return;
    const messages = Array.isArray(page.messages) ? page.messages : [];
    if (p.history) {
      const seqOf = (m) => (p.key === INBOX ? m.seq : m.gseq);
      p.resolve(messages.filter((m) => seqOf(m) < p.before));
      return;
    }
    const key = p.key;
    const c = this.#cursor(key);
    const before = c.max;
    for (const m of messages) {
      const seq = key === INBOX ? m.seq : m.gseq;
      if (Number.isSafeInteger(seq)) this.#apply(key, seq, m);
    }
    c.syncing = false;
    // Only a page that advanced asks for more: a server that skipped a
    // sequence cannot make the client loop.
    const more = page.more === true && c.max > before;
    const again = c.again && c.aside.size > 0;
    c.again = false;
    if (more || again) this.#requestSync(key);
    p.resolve?.(messages);
    this.#checkCaughtUp();
  }

  #onError(e) {
    const err = new ClientError(String(e.code), String(e.message ?? e.code), { req: e.req });
    if (!this.#welcomed) {
      // The refusal of `auth`; the close that follows decides what next.
      this.#authError = e.code;
      return;
    }
    const p = e.req ? this.#takeReq(e.req) : undefined;
    const u = e.req ? this.#outbox.find((x) => x.req === e.req) : undefined;
    if (u) {
      u.inFlight = false;
      if (e.code === 'rate_limited' || e.code === 'unavailable') {
        // Not stored (or not known to be): the same req again, later.
        u.due = Date.now() + this.#o.retryMs;
        return;
      }
      this.#outbox.splice(this.#outbox.indexOf(u), 1);
      this.#persist();
      if (u.waiters.length) for (const w of u.waiters) w.reject(err);
      else this.emit('error', err);
      this.#flush();
      return;
    }
    if (p?.kind === 'sync' && !p.history) {
      const c = this.#cursor(p.key);
      c.syncing = false;
      // A store that is briefly unavailable is asked again; a refusal
      // (`not_member` after leaving a group) is only reported.
      // The tick asks again (no timer of its own to clear on close).
      if (e.code === 'unavailable' || e.code === 'rate_limited') {
        c.retryAt = Date.now() + this.#o.retryMs;
      }
      this.emit('error', err);
      this.#checkCaughtUp();
      return;
    }
    if (p?.reject) p.reject(err);
    else this.emit('error', err);
  }

  #onPresence(f) {
    const changed = [];
    for (const c of Array.isArray(f.contacts) ? f.contacts : []) {
      if (!Number.isSafeInteger(c?.user)) continue;
      const held = this.#presence.get(c.user);
      // Updates may come late, twice or out of order: the version decides.
      if (held && !(c.version > held.version)) continue;
      if (!held && c.version === 0 && c.status === 'offline') {
        // What an unknown user is anyway; remembered so `presence` says so.
        this.#presence.set(c.user, { ...c });
        continue;
      }
      const entry = { user: c.user, status: c.status, text: c.text ?? '', version: c.version };
      this.#presence.set(c.user, entry);
      changed.push(entry);
    }
    // The answer to `presence_subscribe` is the `presence` frame that
    // names the users it now watches (`subscribed`, and our `req`); a push
    // has neither.
    if (Array.isArray(f.subscribed) || typeof f.req === 'string') {
      const p = this.#answered(f, 'presence_subscribe');
      p?.resolve((p.users ?? []).map((u) => this.presence(u)));
    }
    if (changed.length) this.emit('presence', changed);
  }

  // ---- Streams -----------------------------------------------------------

  #cursor(key) {
    let c = this.#cursors.get(key);
    if (!c) this.#cursors.set(key, (c = { max: 0, aside: new Map(), syncing: false, again: false, retryAt: 0 }));
    return c;
  }

  /** Files a message at `seq` and emits what is now in order; true when a
   * gap remains below what is held aside. */
  #apply(key, seq, m) {
    const c = this.#cursor(key);
    if (seq <= c.max || c.aside.has(seq)) return false;
    if (c.aside.size < this.#o.maxAside) c.aside.set(seq, m);
    let advanced = false;
    while (c.aside.has(c.max + 1)) {
      const next = c.aside.get(c.max + 1);
      c.aside.delete(c.max + 1);
      c.max += 1;
      advanced = true;
      this.emit('message', next);
    }
    if (advanced) this.#persist();
    return c.aside.size > 0 || seq > c.max;
  }

  #requestSync(key) {
    if (!this.#welcomed) return;
    const c = this.#cursor(key);
    if (c.syncing) {
      c.again = true;
      return;
    }
    const frame = { op: 'sync', since: c.max, limit: this.#o.syncLimit };
    if (key !== INBOX) frame.group = key;
    c.syncing = true;
    this.#caughtUp = false;
    this.#request(frame, 'sync', { key }).catch(() => {});
  }

  #checkCaughtUp() {
    if (this.#caughtUp || !this.#welcomed) return;
    for (const c of this.#cursors.values()) if (c.syncing || c.aside.size) return;
    this.#caughtUp = true;
    this.emit('synced', { inboxMax: this.inboxMax, groupMax: this.groupMax });
  }

  /** Sends the oldest unacknowledged message when it is due. */
  #flush() {
    if (!this.#welcomed) return;
    const u = this.#outbox[0];
    if (!u || u.inFlight || u.due > Date.now()) return;
    u.inFlight = true;
    this.#pending.push({ kind: 'send', req: u.req, at: Date.now() });
    this.#write(u.frame);
  }

  #report(err) {
    if (err?.code !== 'disconnected' && err?.code !== 'closed') this.emit('error', err);
  }

  // ---- Storage -----------------------------------------------------------

  #storageKey() {
    return `${this.#user}/${this.#o.device}`;
  }

  async #load() {
    const s = await this.#storage.load(this.#storageKey());
    this.#loaded = true;
    if (!s) return;
    this.#cursor(INBOX).max = Math.max(this.#cursor(INBOX).max, s.inbox ?? 0);
    for (const [g, max] of Object.entries(s.groups ?? {})) {
      const c = this.#cursor(Number(g));
      c.max = Math.max(c.max, max);
    }
    // Sends stored by an earlier session are older than any made since.
    const queued = new Set(this.#outbox.map((u) => u.req));
    const restored = [];
    for (const { req, frame } of s.outbox ?? []) {
      if (queued.has(req)) continue;
      restored.push({ req, frame, msg: JSON.parse(frame), inFlight: false, due: 0, waiters: [] });
    }
    this.#outbox.unshift(...restored);
  }

  #snapshot() {
    return {
      version: 1,
      inbox: this.inboxMax,
      groups: this.groupMax,
      outbox: this.#outbox.map((u) => ({ req: u.req, frame: u.frame })),
    };
  }

  /** Saves the state soon; saves never overlap, the last one wins. */
  #persist() {
    if (!this.#loaded) return;
    this.#dirty = true;
    if (this.#saving) return;
    this.#saving = (async () => {
      while (this.#dirty) {
        this.#dirty = false;
        try {
          await this.#storage.save(this.#storageKey(), this.#snapshot());
        } catch (e) {
          this.emit('error', new ClientError('storage', 'cannot save the state', { cause: e }));
        }
      }
      this.#saving = null;
    })();
  }
}

/** The key of a conversation, as this user sends to it. */
function convKey(ope, to) {
  return `${ope === 1 ? 1 : 0}:${to}`;
}

function readSet(f) {
  const r = { ope: f.ope, to: f.to, moved: f.moved === true };
  if (f.gseq != null) r.gseq = f.gseq;
  else r.seq = f.seq;
  return r;
}

function pick(msg) {
  const out = { ope: msg.ope, to: msg.to, type: msg.type, body: msg.body };
  if (msg.ex !== undefined) out.ex = msg.ex;
  return out;
}

function badSend(message) {
  return Promise.reject(new ClientError('bad_request', message));
}

function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

function randomId() {
  const c = globalThis.crypto;
  if (c?.randomUUID) return c.randomUUID();
  const b = new Uint8Array(16);
  c.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}
