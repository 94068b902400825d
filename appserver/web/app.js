// The iim web chat, served by the app server at `/`. It speaks to the
// servers only through the JavaScript client library (served under /js/),
// which keeps the device's cursor and unacknowledged sends in IndexedDB.
//
// Messages themselves are not kept in the browser: the server holds every
// user's inbox, so the page reads the latest page of it with `history()`
// when it connects, and older pages when the person scrolls back. The
// library's cursor makes a reload resume where the page left off (what came
// in meanwhile arrives as `message` events) and resend what was not
// acknowledged.
//
// The server list is this page's own server first, then those named in the
// URL: `/?servers=127.0.0.1:8202,127.0.0.1:8203`.

import { IimClient } from '/js/index.js';
import { IndexedDbStorage } from '/js/storage/indexeddb.js';
import { h, conversationItem, messageItem, messageText, presenceText } from '/view.js';

const SESSION = 'iim-web.session';
const DEVICE = 'iim-web.device';
/** Inbox messages fetched per history page (the server's maximum). */
const PAGE = 200;
/** Scrolling back in a conversation reads inbox pages until it gained
 * this many messages, or this many pages. */
const OLDER_WANTED = 30;
const OLDER_PAGES = 5;
/** The users `iimctl demo-data` creates, offered in development mode.
 * The protocol has no directory lookup, so other users show by id. */
const DEMO_USERS = new Map([
  [1001, 'Alice'],
  [1002, 'Bob'],
  [2001, 'Carol'],
  [2002, 'Dave'],
  [3001, 'Erin'],
]);

const $ = (id) => document.getElementById(id);

function randomHex(bytes) {
  // getRandomValues works outside secure contexts too (plain http to a
  // LAN address), unlike crypto.randomUUID.
  return [...crypto.getRandomValues(new Uint8Array(bytes))].map((b) => b.toString(16).padStart(2, '0')).join('');
}

/** This page's server, then those of `?servers=`. */
function serverList() {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const list = [`${scheme}://${location.host}/ws`];
  const extra = new URLSearchParams(location.search).get('servers') ?? '';
  for (const s of extra.split(',').map((x) => x.trim()).filter(Boolean)) {
    list.push(s.includes('://') ? s : `${scheme}://${s}/ws`);
  }
  return [...new Set(list)];
}

/** True when this server mints development tokens (`POST /dev/token`). */
async function devTokensOffered() {
  try {
    const r = await fetch('/config.json');
    return r.ok && (await r.json()).dev_tokens === true;
  } catch {
    return false;
  }
}

async function devToken(user) {
  const r = await fetch('/dev/token', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ user }),
  });
  if (!r.ok) throw new Error(`no token from the server (HTTP ${r.status})`);
  return (await r.json()).token;
}

// ---- Signing in ------------------------------------------------------------

async function showLogin(error = '') {
  $('chat').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = error;
  const dev = await devTokensOffered();
  $('dev-login').hidden = !dev;
  if (dev && !$('demo-users').childElementCount) {
    for (const [id, name] of DEMO_USERS) {
      $('demo-users').append(
        h('li', {}, h('button', { type: 'button', 'data-user': id, onclick: () => signIn({ kind: 'dev', user: id }) }, `${name} (${id})`)),
      );
    }
  }
}

$('dev-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const user = Number($('dev-user').value);
  if (Number.isSafeInteger(user) && user > 0) signIn({ kind: 'dev', user });
});

$('token-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const token = $('token').value.trim();
  if (token) signIn({ kind: 'token', token });
});

/** The session survives reloads of this tab (sessionStorage), so does the
 * device name: a reload is the same device, with its stored cursor. */
function signIn(session) {
  sessionStorage.setItem(SESSION, JSON.stringify(session));
  let device = sessionStorage.getItem(DEVICE);
  if (!device) {
    device = `web-${randomHex(4)}`;
    sessionStorage.setItem(DEVICE, device);
  }
  $('login').hidden = true;
  $('chat').hidden = false;
  chat = new Chat(session, device);
}

async function signOut(error = '') {
  sessionStorage.removeItem(SESSION);
  const c = chat;
  chat = null;
  await c?.client.close();
  location.hash = '';
  showLogin(error);
}

$('sign-out').addEventListener('click', () => signOut());

// ---- The chat ----------------------------------------------------------------

/**
 * @typedef {{key: string, kind: 'u' | 'g', id: number, large: boolean,
 *   msgs: Map<number, object>, pending: Map<string, object>, complete: boolean,
 *   last: number}} Conversation
 */

class Chat {
  constructor(session, device) {
    this.session = session;
    this.names = session.kind === 'dev' ? DEMO_USERS : new Map();
    this.me = null;
    /** @type {Map<string, Conversation>} */
    this.convs = new Map();
    /** Lowest inbox sequence held, and whether the inbox's start is. */
    this.inboxLow = Infinity;
    this.inboxComplete = false;
    this.loading = false;
    this.contacts = new Set();
    /** Reqs of own messages already held (a restored send acknowledged
     * before the page listed it must not show as pending). */
    this.ownReqs = new Set();
    /** Conversation key -> the position a `read` is on its way for. */
    this.marking = new Map();
    /** When this page last told the current conversation it types. */
    this.typedAt = 0;
    this.scheduled = false;
    this.keepOffset = null;

    const token = session.kind === 'dev' ? () => devToken(session.user) : session.token;
    this.client = new IimClient({
      servers: serverList(),
      token,
      device,
      storage: new IndexedDbStorage('iim-web'),
      // A new device reads history on demand instead of syncing the
      // whole inbox through `message` events.
      start: 'latest',
    });
    const c = this.client;
    c.on('message', (m) => {
      this.file(m);
      this.render();
    });
    c.on('presence', (changed) => {
      for (const p of changed) {
        if (p.user === this.client.user) continue;
        this.contacts.add(p.user);
        this.conv('u', p.user);
      }
      this.render();
    });
    c.on('state', (s) => this.onState(s));
    c.on('receipt', () => this.render());
    c.on('readstate', () => this.render());
    c.on('typing', (t) => {
      this.render();
      // Drawn again once it expires (unless another one comes).
      setTimeout(() => this.render(), t.expiresIn + 50);
    });
    c.on('error', (e) => {
      const p = e.req && this.findPending(e.req);
      if (p) {
        p.state = 'failed';
        p.error = e.code;
        this.render();
      } else {
        console.warn('iim:', e.code ?? '', e.message);
      }
    });
    c.connect().then(
      (w) => this.onFirstWelcome(w),
      () => {}, // a refusal arrives as a `closed` state
    );
    window.addEventListener('hashchange', () => this.render());
    document.addEventListener('visibilitychange', () => this.render());
    $('text').oninput = () => this.typing();
    $('composer').onsubmit = (e) => {
      e.preventDefault();
      this.send();
    };
    $('new-chat').onsubmit = (e) => {
      e.preventDefault();
      const id = Number($('new-id').value);
      if (!Number.isSafeInteger(id) || id <= 0) return;
      this.open(this.conv($('new-kind').value, id));
      $('new-id').value = '';
    };
    $('older').onclick = () => this.loadOlder(this.current());
    $('scroller').onscroll = () => {
      const cur = this.current();
      if ($('scroller').scrollTop < 40 && cur && !cur.complete && !this.loading) this.loadOlder(cur);
    };
  }

  onFirstWelcome(w) {
    this.me = w.user;
    $('me').textContent = `${this.userName(w.user)} · ${w.device}`;
    for (const g of w.large_groups) this.conv('g', g.group).large = true;
    // Sends of an earlier page of this device that still wait for their
    // ack: the library resends them; show them as sending meanwhile.
    for (const u of this.client.unacked) {
      if (this.ownReqs.has(u.req)) continue;
      const conv = u.ope === 1 ? this.conv('g', u.to) : this.conv('u', u.to);
      conv.pending.set(u.req, { req: u.req, type: u.type, body: u.body, ts: Date.now(), state: 'pending' });
    }
    this.loadInbox();
    this.render();
  }

  onState(s) {
    const banner = $('banner');
    banner.dataset.state = s.state;
    banner.classList.remove('bad');
    $('connection').dataset.state = s.state;
    if (s.state === 'open') {
      banner.hidden = true;
      $('connection').dataset.server = s.server;
      $('connection').textContent = `connected to server ${s.server}`;
    } else if (s.state === 'connecting') {
      banner.hidden = false;
      banner.textContent = 'Connecting…';
      $('connection').textContent = 'connecting';
    } else if (s.state === 'reconnecting') {
      banner.hidden = false;
      const secs = Math.max(1, Math.round((s.delay ?? 0) / 1000));
      banner.textContent = `Connection lost. Reconnecting in ${secs} s… Messages you write meanwhile are sent once connected.`;
      $('connection').textContent = 'reconnecting';
      delete $('connection').dataset.server;
    } else if (s.state === 'closed' && s.error && chat === this) {
      // The server refused the token: back to signing in.
      signOut(`Signed out: ${s.error.code}: ${s.error.message}`);
    }
  }

  userName(id) {
    const n = this.names.get(id);
    return n ? `${n} (${id})` : `User ${id}`;
  }

  /** The conversation `kind` (`u` a user, `g` a group) `id`, created if new. */
  conv(kind, id) {
    const key = `${kind}${id}`;
    let c = this.convs.get(key);
    if (!c) {
      c = { key, kind, id, large: false, msgs: new Map(), pending: new Map(), complete: false, last: 0 };
      this.convs.set(key, c);
    }
    return c;
  }

  /** Files a message (a push, a sync's, a history page's, an own ack). */
  file(m) {
    // The library knows the user from the welcome, before any message.
    const me = this.client.user;
    let c;
    if (m.gseq != null) {
      c = this.conv('g', m.to);
      c.large = true;
    } else if (m.ope === 1) {
      c = this.conv('g', m.to);
    } else {
      c = this.conv('u', m.from === me ? m.to : m.from);
    }
    const seq = m.gseq ?? m.seq;
    c.msgs.set(seq, m);
    c.last = Math.max(c.last, m.ts);
    if (m.seq != null) this.inboxLow = Math.min(this.inboxLow, m.seq);
    if (m.from === me) {
      this.ownReqs.add(m.req);
      c.pending.delete(m.req);
    }
    if (seq <= 1 && c.large) c.complete = true;
  }

  findPending(req) {
    for (const c of this.convs.values()) if (c.pending.has(req)) return c.pending.get(req);
    return null;
  }

  /** The latest page of the inbox: the conversations and their recent
   * messages. */
  async loadInbox() {
    await this.olderInbox(null);
    const cur = this.current();
    if (cur && cur.msgs.size < OLDER_WANTED && !cur.complete) this.loadOlder(cur);
  }

  /** One inbox page below what is held; false when there is no more. */
  async olderInbox() {
    if (this.inboxComplete) return false;
    const before = Number.isFinite(this.inboxLow) ? this.inboxLow : undefined;
    const page = await this.client.history({ before, limit: PAGE });
    for (const m of page) this.file(m);
    if (!page.length || page[0].seq <= 1) {
      this.inboxComplete = true;
      for (const c of this.convs.values()) if (!c.large) c.complete = true;
    }
    this.render();
    return !this.inboxComplete;
  }

  /** Scrolling back: older messages of conversation `c`. */
  async loadOlder(c) {
    if (!c || c.complete || this.loading) return;
    this.loading = true;
    this.keepOffset = $('scroller').scrollHeight - $('scroller').scrollTop;
    try {
      if (c.large) {
        const low = Math.min(...c.msgs.keys());
        const page = await this.client.history({ group: c.id, before: Number.isFinite(low) ? low : undefined, limit: 50 });
        for (const m of page) this.file(m);
        if (!page.length || page[0].gseq <= 1) c.complete = true;
      } else {
        const had = c.msgs.size;
        for (let i = 0; i < OLDER_PAGES && c.msgs.size - had < OLDER_WANTED; i++) {
          if (!(await this.olderInbox())) break;
        }
        if (this.inboxComplete) c.complete = true;
      }
    } catch (e) {
      console.warn('iim: history:', e.code ?? '', e.message);
    } finally {
      this.loading = false;
      this.render();
    }
  }

  current() {
    const m = /^#([ug])(\d+)$/.exec(location.hash);
    if (!m) return null;
    const c = this.conv(m[1], Number(m[2]));
    if (this.inboxComplete && !c.large) c.complete = true;
    return c;
  }

  open(c) {
    location.hash = `#${c.key}`;
    if (c.msgs.size < OLDER_WANTED && !c.complete) this.loadOlder(c);
    $('text').focus();
  }

  send() {
    const c = this.current();
    const text = $('text').value.trim();
    if (!c || !text) return;
    const req = `web-${randomHex(12)}`;
    const body = { text };
    const p = { req, type: 'text', body, ts: Date.now(), state: 'pending' };
    c.pending.set(req, p);
    $('text').value = '';
    this.stick = true;
    this.client.send({ to: c.id, ope: c.kind === 'g' ? 1 : 0, body, req }).then(
      () => {
        p.state = 'delivered';
        this.render();
      },
      (e) => {
        p.state = 'failed';
        p.error = e.code ?? e.message;
        this.render();
      },
    );
    this.render();
  }

  /** The library's name of conversation `c`. */
  target(c) {
    return { to: c.id, ope: c.kind === 'g' ? 1 : 0 };
  }

  /** Unread: others' messages above this user's read position, which the
   * server keeps (shared by every device of the user). */
  unread(c) {
    const upTo = Math.max(this.client.readPosition(this.target(c)), this.marking.get(c.key) ?? 0);
    let n = 0;
    for (const [seq, m] of c.msgs) if (seq > upTo && m.from !== this.me) n++;
    return n;
  }

  /** The conversation on screen is read up to its last message: one
   * `read` tells the server, the other side and this user's devices. */
  markRead(c) {
    if (document.visibilityState !== 'visible' || !c.msgs.size || this.client.state !== 'open') return;
    const top = Math.max(...c.msgs.keys());
    if (this.client.readPosition(this.target(c)) >= top || (this.marking.get(c.key) ?? 0) >= top) return;
    this.marking.set(c.key, top);
    this.client.markRead({ ...this.target(c), seq: top }).then(
      () => this.render(),
      (e) => {
        this.marking.delete(c.key);
        console.warn('iim: read:', e.code ?? '', e.message);
      },
    );
  }

  /** Own messages up to this inbox sequence have been read by someone
   * else, and by how many (none for large groups). */
  readUpTo(c) {
    if (c.large) return [];
    return Object.values(this.client.readBy(this.target(c)));
  }

  /** The person types in the conversation on screen: tell its other
   * members, at most every 3 s (their indicator lasts longer). */
  typing() {
    const c = this.current();
    if (!c || c.large || !$('text').value.trim() || Date.now() - this.typedAt < 3_000) return;
    this.typedAt = Date.now();
    this.client.typing(this.target(c)).catch((e) => console.warn('iim: typing:', e.code ?? '', e.message));
  }

  /** "typing…" for the conversation on screen, or nothing. */
  typingText(c) {
    const who = this.client.typers(this.target(c)).filter((u) => u !== this.me);
    if (!who.length) return '';
    if (c.kind === 'u') return 'typing…';
    return `${who.map((u) => this.userName(u)).join(', ')} ${who.length > 1 ? 'are' : 'is'} typing…`;
  }

  /** A contact's presence; none for groups and for users who are not
   * contacts (the server shares presence between contacts only). */
  presenceOf(c) {
    return c.kind === 'u' && this.contacts.has(c.id) ? this.client.presence(c.id) : null;
  }

  title(c) {
    if (c.kind === 'u') return this.userName(c.id);
    return c.large ? `Group ${c.id} (large)` : `Group ${c.id}`;
  }

  /** Renders on the next microtask: a burst of messages renders once. */
  render() {
    if (this.scheduled || chat !== this) return;
    this.scheduled = true;
    queueMicrotask(() => {
      this.scheduled = false;
      if (chat === this && this.me !== null) this.draw();
    });
  }

  draw() {
    const cur = this.current();
    if (cur) this.markRead(cur);
    const list = [...this.convs.values()].sort((a, b) => b.last - a.last || a.key.localeCompare(b.key));
    $('conversations').replaceChildren(
      ...list.map((c) => {
        const last = [...c.msgs.values()].reduce((a, m) => (!a || (m.gseq ?? m.seq) > (a.gseq ?? a.seq) ? m : a), null);
        return conversationItem({
          key: c.key,
          name: this.title(c),
          presence: this.presenceOf(c),
          unread: this.unread(c),
          last: last ? messageText(last) : '',
          current: c === cur,
          onclick: () => this.open(c),
        });
      }),
    );

    $('composer').hidden = !cur;
    if (!cur) {
      $('title').textContent = 'Pick a conversation';
      $('peer-presence').textContent = '';
      $('messages').replaceChildren();
      $('older').hidden = true;
      $('history-start').hidden = true;
      return;
    }
    $('title').textContent = this.title(cur);
    const p = this.presenceOf(cur);
    const typing = this.typingText(cur);
    $('peer-presence').textContent = typing || (p ? presenceText(p) : '');
    $('peer-presence').dataset.typing = typing ? 'true' : 'false';
    const reads = this.readUpTo(cur);
    const sc = $('scroller');
    const atBottom = sc.scrollHeight - sc.scrollTop - sc.clientHeight < 40;
    const held = [...cur.msgs.entries()].sort((a, b) => a[0] - b[0]).map(([, m]) => m);
    const items = held.map((m) =>
      messageItem({
        m,
        mine: m.from === this.me,
        from: this.userName(m.from),
        showFrom: cur.kind === 'g' && m.from !== this.me,
        state: m.from === this.me && reads.some((r) => r >= (m.gseq ?? m.seq)) ? 'read' : 'delivered',
        readers: reads.filter((r) => r >= (m.gseq ?? m.seq)).length,
        group: cur.kind === 'g',
      }),
    );
    for (const p of cur.pending.values()) {
      items.push(messageItem({ m: p, mine: true, from: '', showFrom: false, state: p.state, error: p.error }));
    }
    $('messages').replaceChildren(...items);
    $('older').hidden = cur.complete;
    $('older').disabled = this.loading;
    $('history-start').hidden = !cur.complete;
    if (this.keepOffset !== null && !this.loading) {
      // Older messages came in above: keep what was on screen in place.
      sc.scrollTop = sc.scrollHeight - this.keepOffset;
      this.keepOffset = null;
    } else if (atBottom || this.stick || this.lastDrawn !== cur.key) {
      sc.scrollTop = sc.scrollHeight;
    }
    this.stick = false;
    this.lastDrawn = cur.key;
  }
}

/** @type {Chat | null} */
let chat = null;

const saved = sessionStorage.getItem(SESSION);
if (saved) signIn(JSON.parse(saved));
else showLogin();
