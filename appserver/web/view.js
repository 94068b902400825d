// Builds the web chat's DOM from its state. Every text goes through
// text nodes (never innerHTML), so nothing a sender writes becomes markup.

/** An element with attributes (`on*` functions become listeners) and
 * children (strings become text). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const STATUS_WORDS = { online: 'online', away: 'away', busy: 'busy', offline: 'offline' };

/** A presence dot with its words for screen readers. */
export function dot(p) {
  const words = STATUS_WORDS[p.status] ?? 'offline';
  return h('span', { class: `dot ${words}`, role: 'img', 'aria-label': words, title: words });
}

/** `online`, `away: lunch`… */
export function presenceText(p) {
  const words = STATUS_WORDS[p.status] ?? 'offline';
  return p.text ? `${words}: ${p.text}` : words;
}

/** What a message shows: its text, or its type for anything else. */
export function messageText(m) {
  const b = m.body;
  if (m.type === 'text' && b && typeof b.text === 'string') return b.text;
  if (typeof b === 'string') return b;
  return `[${m.type}] ${JSON.stringify(b)}`;
}

function time(ts) {
  const d = new Date(ts);
  return h(
    'time',
    { datetime: d.toISOString(), title: d.toLocaleString() },
    d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }),
  );
}

/**
 * One entry of the conversation list.
 * @param {{key: string, name: string, presence?: object, unread: number,
 *   last?: string, current: boolean, onclick: Function}} c
 */
export function conversationItem(c) {
  return h(
    'li',
    {},
    h(
      'button',
      { type: 'button', 'data-conv': c.key, 'aria-current': c.current ? 'true' : 'false', onclick: c.onclick },
      h('span', { class: 'conv-name' }, c.presence ? dot(c.presence) : null, c.name),
      c.unread > 0
        ? h('span', { class: 'unread', 'aria-label': `${c.unread} unread` }, String(c.unread))
        : h('span'),
      h('span', { class: 'conv-last' }, c.last ?? ''),
    ),
  );
}

/**
 * One message. Own messages carry their state: `pending` until the
 * server's ack, `delivered` once stored, `read` once the other side (in a
 * group: `readers` members) read it, `failed` when refused.
 * @param {{m: object, mine: boolean, from: string, showFrom: boolean,
 *   state?: string, error?: string, readers?: number, group?: boolean}} o
 */
export function messageItem({ m, mine, from, showFrom, state, error, readers = 0, group = false }) {
  const seq = m.gseq ?? m.seq;
  let tick = null;
  if (mine) {
    const readWords = group ? `read by ${readers}` : 'read';
    const [mark, words] =
      state === 'read'
        ? ['✓✓', readWords]
        : state === 'delivered'
          ? ['✓', 'delivered']
          : state === 'failed'
            ? ['!', `not sent: ${error}`]
            : ['…', 'sending'];
    tick = h('span', { class: 'tick', role: 'img', 'aria-label': words, title: words }, mark);
  }
  return h(
    'li',
    { class: mine ? 'msg mine' : 'msg', 'data-seq': seq, 'data-req': m.req, 'data-state': mine ? state : null },
    showFrom ? h('span', { class: 'from' }, from) : null,
    h('span', { class: 'text' }, messageText(m)),
    h('span', { class: 'meta' }, time(m.ts), tick),
  );
}
