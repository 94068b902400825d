// Pushes dropped at the sending server (its push queue full) are not left
// for the recipient's next push or reconnect: the server says
// `sync_needed`, and the client syncs at once and shows every message, in
// sequence order, once. A real deployment whose app servers hold one push
// at a time, and forty senders writing to one user at once.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { IimClient } from '../src/index.js';
import { Deployment, waitFor, collect, spySocket, atLeast } from './harness.js';

let dep;
const clients = [];

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  dep?.stop();
});

async function ready(user, server, extra = {}) {
  const c = new IimClient({
    servers: [dep.url(server)],
    token: () => dep.token(user),
    device: 'test',
    ...extra,
  });
  clients.push(c);
  const synced = waitFor(c, 'synced');
  await c.connect();
  await synced;
  return c;
}

test('sync_needed: the client syncs at once and holds every message once, in order', async () => {
  dep = await Deployment.start({ servers: [1, 2], serverToml: '[chat]\npush_queue = 1\n' });
  // The recipient's socket loses every `msg` push, so nothing but the
  // server's `sync_needed` can tell the client that messages wait.
  const spy = spySocket((f) => f.op === 'msg');
  const rcpt = await ready(5100, 2, { WebSocket: spy.WebSocket });
  const base = rcpt.inboxMax;
  const got = collect(rcpt);
  const senders = [];
  for (let u = 5101; u <= 5140; u++) senders.push(await ready(u, 1));
  await Promise.all(
    senders.map(async (c, i) => {
      for (let n = 0; n < 3; n++) await c.send({ to: 5100, body: { i, n } });
    }),
  );
  // Pushes were dropped at server 1; the client heard sync_needed and
  // fetched what was stored by then without being asked to.
  await atLeast(rcpt, got, 1, 'messages fetched after sync_needed');
  assert.ok(spy.received.some((f) => f.op === 'sync_needed'), 'the server said sync_needed');
  // The rest (stored after the last sync_needed, their pushes lost here)
  // by an explicit sync; then everything is there once, in order.
  const synced = waitFor(rcpt, 'synced');
  rcpt.sync();
  await synced;
  await atLeast(rcpt, got, 120, 'all 120 messages');
  await rcpt.ping();
  assert.deepEqual(
    got.map((m) => m.seq),
    Array.from({ length: 120 }, (_, k) => base + 1 + k),
    'every message once, in sequence order',
  );
  // Each sender's three messages in the order sent.
  for (let i = 0; i < senders.length; i++) {
    const ns = got.filter((m) => m.body.i === i).map((m) => m.body.n);
    assert.deepEqual(ns, [0, 1, 2], `sender ${i}`);
  }
});
