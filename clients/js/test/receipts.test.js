// Read receipts and typing against a real deployment (an exchange and
// three app servers): a read on one server reaches the other side's device
// on another server and the reader's other device, in each one's own
// sequences; positions only move forward and come back after a fresh
// connect; typing reaches the other members and is rate limited.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { IimClient, Ope } from '../src/index.js';
import { Deployment, waitFor } from './harness.js';

/** The demo directory's small group (1001, 2001, 3001); created first. */
const TEAM = 1;

let dep;
const clients = [];

before(async () => {
  dep = await Deployment.start({ servers: [1, 2, 3] });
});

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  dep?.stop();
});

function client(user, servers, device = 'test') {
  const c = new IimClient({
    servers: servers.map((id) => dep.url(id)),
    token: () => dep.token(user),
    device,
    backoffInitialMs: 100,
    backoffMaxMs: 1000,
  });
  clients.push(c);
  return c;
}

/** Connects and waits until the first syncs and the read state are in. */
async function ready(c) {
  const synced = waitFor(c, 'synced');
  const state = waitFor(c, 'readstate');
  await c.connect();
  await Promise.all([synced, state]);
  return c;
}

async function refused(promise) {
  try {
    await promise;
  } catch (e) {
    return e.code;
  }
  assert.fail('accepted');
}

test('a read reaches the other side and the reader’s other device, and survives a reconnect', async () => {
  const alice = await ready(client(1001, [1]));
  const carol = await ready(client(2001, [2]));
  const tablet = await ready(client(2001, [3], 'tablet'));
  const got = waitFor(carol, 'message', (m) => m.body?.text === 'read me');
  const ack = await alice.send({ to: 2001, body: { text: 'read me' } });
  const m = await got;

  const atAlice = waitFor(alice, 'receipt', (r) => r.reader === 2001 && r.id === ack.id);
  const atTablet = waitFor(tablet, 'receipt', (r) => r.reader === 2001 && r.id === ack.id);
  const set = await carol.markRead({ to: 1001 });
  assert.equal(set.moved, true);
  assert.equal(set.seq, carol.inboxMax);
  const r = await atAlice;
  // Alice sees it in her own inbox's terms, in her conversation with 2001.
  assert.deepEqual(r, { reader: 2001, ope: Ope.single, to: 2001, id: ack.id, seq: ack.seq });
  assert.equal(alice.readBy({ to: 2001 })[2001], ack.seq);
  const t = await atTablet;
  assert.deepEqual(t, { reader: 2001, ope: Ope.single, to: 1001, id: ack.id, seq: m.seq });
  assert.equal(tablet.readPosition({ to: 1001 }), carol.inboxMax);

  // Only forward; bad positions and unknown users are refused.
  const back = await carol.markRead({ to: 1001, seq: 1 });
  assert.equal(back.moved, false);
  assert.equal(back.seq, carol.inboxMax);
  assert.equal(await refused(carol.markRead({ to: 1001, seq: carol.inboxMax + 50 })), 'bad_request');
  assert.equal(await refused(carol.markRead({ to: 999_999, seq: 1 })), 'unknown_user');
  assert.equal(await refused(carol.markRead({ ope: Ope.group, to: 999_999, seq: 1 })), 'unknown_group');

  // A fresh device of alice's, elsewhere, learns where carol stands.
  const laptop = await ready(client(1001, [3], 'laptop'));
  assert.equal(laptop.readBy({ to: 2001 })[2001], ack.seq);
  const fresh = await ready(client(2001, [1], 'phone-2'));
  assert.equal(fresh.readPosition({ to: 1001 }), carol.inboxMax);
});

test('typing reaches the other members on other servers and is rate limited', async () => {
  const alice = await ready(client(1001, [1], 'typist'));
  const carol = await ready(client(2001, [2], 'watcher'));
  const dave = await ready(client(3001, [3], 'watcher'));

  const seen = waitFor(carol, 'typing', (t) => t.from === 1001 && t.ope === Ope.single);
  await alice.typing({ to: 2001 });
  const t = await seen;
  assert.equal(t.to, 1001, 'carol sees it in her conversation with alice');
  assert.ok(t.expiresIn > 0);
  assert.deepEqual(carol.typers({ to: 1001 }), [1001]);

  const inGroup = [carol, dave].map((c) =>
    waitFor(c, 'typing', (x) => x.from === 1001 && x.ope === Ope.group && x.to === TEAM),
  );
  await alice.typing({ ope: Ope.group, to: TEAM });
  await Promise.all(inGroup);
  assert.deepEqual(dave.typers({ ope: Ope.group, to: TEAM }), [1001]);

  // A message from the typist ends the indicator.
  const msg = waitFor(carol, 'message', (m) => m.body?.text === 'done typing');
  await alice.send({ to: 2001, body: { text: 'done typing' } });
  await msg;
  assert.deepEqual(carol.typers({ to: 1001 }), []);

  // Three at once, then one a second: a quick run is refused soon.
  let code;
  for (let i = 0; i < 6 && !code; i++) {
    code = await alice.typing({ to: 2001 }).then(
      () => undefined,
      (e) => e.code,
    );
  }
  assert.equal(code, 'rate_limited');
});
