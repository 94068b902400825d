// Delivery against a real deployment (an exchange and three app servers):
// sends across servers, two devices of one user, gaps repaired by sync
// (a recipient offline, and a push lost on a live connection), history,
// large groups, and the file storage across a client restart.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { IimClient, MemoryStorage, Ope } from '../src/index.js';
import { FileStorage } from '../src/storage/file.js';
import { Deployment, waitFor, collect, spySocket, atLeast } from './harness.js';

/** The demo directory's large group (603 members, users 5000..5599 among
 * them); `iimctl demo-data` creates it second. */
const TOWN_HALL = 2;

let dep;
const clients = [];

before(async () => {
  dep = await Deployment.start({ servers: [1, 2, 3] });
});

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  dep?.stop();
});

/** A client of `user` on the given servers (indexes into the deployment). */
function client(user, servers, extra = {}) {
  const c = new IimClient({
    servers: servers.map((id) => dep.url(id)),
    token: () => dep.token(user),
    device: 'test',
    backoffInitialMs: 100,
    backoffMaxMs: 1000,
    ...extra,
  });
  clients.push(c);
  return c;
}

/** Connects and waits until the first syncs are done. */
async function ready(c) {
  const synced = waitFor(c, 'synced');
  await c.connect();
  await synced;
  return c;
}


test('a send from server 1 reaches a user on server 2, with ack and push in sequence', async () => {
  const alice = await ready(client(1001, [1]));
  const carol = await ready(client(2001, [2]));
  assert.equal(alice.welcome.server, 1);
  assert.equal(carol.welcome.server, 2);
  const [aliceMax, carolMax] = [alice.inboxMax, carol.inboxMax];
  const pushed = waitFor(carol, 'message', (m) => m.from === 1001);
  const own = waitFor(alice, 'message');
  const ack = await alice.send({ to: 2001, body: { text: 'hello across servers' } });
  assert.equal(ack.seq, aliceMax + 1);
  assert.equal(ack.duplicate, false);
  const m = await pushed;
  assert.equal(m.seq, carolMax + 1);
  assert.equal(m.req, ack.req);
  assert.equal(m.id, ack.id);
  assert.deepEqual(m.body, { text: 'hello across servers' });
  assert.equal(m.ope, Ope.single);
  // The sender's own message enters its stream at the ack's sequence.
  const mine = await own;
  assert.equal(mine.seq, ack.seq);
  assert.equal(mine.from, 1001);
  assert.equal(alice.inboxMax, ack.seq);
  assert.equal(carol.inboxMax, m.seq);
});

test('two devices of one user both get every message and keep their own cursors', async () => {
  const storage = new MemoryStorage();
  const phone = await ready(client(1002, [1], { device: 'phone', storage }));
  const laptop = await ready(client(1002, [3], { device: 'laptop', storage }));
  const dave = await ready(client(2002, [2]));
  const onPhone = collect(phone);
  const onLaptop = collect(laptop);
  const base = phone.inboxMax;
  assert.equal(laptop.inboxMax, base);
  for (let i = 0; i < 3; i++) await dave.send({ to: 1002, body: { n: i } });
  await atLeast(phone, onPhone, 3, 'three messages on the phone');
  await atLeast(laptop, onLaptop, 3, 'three messages on the laptop');
  for (const got of [onPhone, onLaptop]) {
    assert.deepEqual(got.map((m) => [m.seq, m.body.n]), [[base + 1, 0], [base + 2, 1], [base + 3, 2]]);
  }
  // A send from the phone: its ack there, a push to the laptop.
  const ack = await phone.send({ to: 2002, body: { n: 3 } });
  assert.equal(ack.seq, base + 4);
  await atLeast(laptop, onLaptop, 4, 'the phone\'s send on the laptop');
  assert.deepEqual(onLaptop[3].body, { n: 3 });
  assert.equal(onLaptop[3].from, 1002);
  assert.equal(onLaptop[3].seq, base + 4);

  // The laptop goes away; the phone goes on; each device's cursor is its own.
  await laptop.close();
  for (let i = 4; i < 6; i++) await dave.send({ to: 1002, body: { n: i } });
  await atLeast(phone, onPhone, 6, 'the phone\'s later messages');
  assert.equal(phone.inboxMax, base + 6);
  assert.equal((await storage.load(`1002/laptop`)).inbox, base + 4);
  // Saves are asynchronous: wait for the phone's to land.
  await phone.ping();
  assert.equal((await storage.load(`1002/phone`)).inbox, base + 6);

  // Back, the laptop fetches exactly what it missed.
  const again = client(1002, [2], { device: 'laptop', storage });
  const later = collect(again);
  await ready(again);
  assert.deepEqual(later.map((m) => [m.seq, m.body.n]), [[base + 5, 4], [base + 6, 5]]);
});

test('a recipient offline while 250 messages are sent gets them all, in order, once, in pages', async () => {
  const storage = new MemoryStorage();
  const spy = spySocket();
  const bob = await ready(client(5002, [2], { storage, WebSocket: spy.WebSocket }));
  const base = bob.inboxMax;
  await bob.close();
  const sender = await ready(client(5001, [1]));
  for (let i = 0; i < 250; i++) await sender.send({ to: 5002, body: { n: i } });

  const back = client(5002, [3], { storage, WebSocket: spy.WebSocket });
  const got = collect(back);
  await ready(back);
  assert.equal(got.length, 250);
  got.forEach((m, i) => {
    assert.equal(m.seq, base + 1 + i);
    assert.equal(m.body.n, i);
  });
  // Two pages: the second from where the first ended.
  const syncs = spy.sentOps('sync').filter((f) => f.group === undefined);
  const since = syncs.map((f) => f.since);
  assert.deepEqual(since.slice(-2), [base, base + 200]);
  assert.equal(back.inboxMax, base + 250);

  // History pages backwards through the same inbox.
  const page = await back.history({ before: base + 101, limit: 50 });
  assert.deepEqual(page.map((m) => m.seq), Array.from({ length: 50 }, (_, i) => base + 51 + i));
  assert.deepEqual(page.map((m) => m.body.n), Array.from({ length: 50 }, (_, i) => 50 + i));
  // A new device that starts at the latest message syncs nothing and
  // reads history from the top.
  const fresh = client(5002, [1], { device: 'fresh', start: 'latest' });
  const none = collect(fresh);
  await ready(fresh);
  assert.equal(fresh.inboxMax, base + 250);
  assert.equal(none.length, 0);
  const top = await fresh.history({ limit: 3 });
  assert.deepEqual(top.map((m) => m.body.n), [247, 248, 249]);
});

test('a push above local_max + 1 (one push lost on the way) makes the client sync', async () => {
  let lostSeq = null;
  const spy = spySocket((f) => f.op === 'msg' && f.seq === lostSeq && !(lostSeq = null));
  const rcpt = await ready(client(5004, [2], { WebSocket: spy.WebSocket }));
  const sender = await ready(client(5003, [1]));
  const base = rcpt.inboxMax;
  lostSeq = base + 2; // the second push never reaches the client
  const got = collect(rcpt);
  const resynced = waitFor(rcpt, 'synced', () => got.length >= 3);
  for (let i = 0; i < 3; i++) await sender.send({ to: 5004, body: { n: i } });
  await resynced;
  assert.equal(lostSeq, null, 'the push was dropped');
  // The third push arrived above a gap: a sync from the cursor fetched it.
  const syncs = spy.sentOps('sync').map((f) => f.since);
  assert.ok(syncs.includes(base + 1), `a sync from ${base + 1}, got ${syncs}`);
  // Once more round the connection, so nothing is still on its way.
  await rcpt.ping();
  assert.deepEqual(got.map((m) => [m.seq, m.body.n]), [[base + 1, 0], [base + 2, 1], [base + 3, 2]]);
});

test('an ack that never comes: the client reconnects and resends the same req', async () => {
  let dropAck = true;
  const spy = spySocket((f) => f.op === 'ack' && dropAck && !(dropAck = false));
  const sender = await ready(client(5007, [1, 2], { WebSocket: spy.WebSocket, answerTimeoutMs: 1500 }));
  const rcpt = await ready(client(5008, [3]));
  const got = collect(rcpt);
  const reconnected = waitFor(sender, 'state', (s) => s.state === 'reconnecting');
  const ack = await sender.send({ to: 5008, body: { text: 'once' } });
  await reconnected;
  assert.equal(ack.duplicate, true, 'the resend was recognised');
  const sends = spy.sent.filter((t) => JSON.parse(t).op === 'send');
  assert.equal(sends.length, 2);
  assert.equal(sends[0], sends[1], 'the resend repeats the first send byte for byte');
  assert.equal(sender.welcome.server, 2);
  await atLeast(rcpt, got, 1, 'the message');
  rcpt.sync();
  await waitFor(rcpt, 'synced');
  await rcpt.ping();
  assert.equal(got.length, 1);
  assert.equal(got[0].req, ack.req);
});

test('large groups: a send gets a gseq, members on other servers get it, cursors per group', async () => {
  const a = await ready(client(5010, [1]));
  const b = await ready(client(5011, [2]));
  assert.ok(a.welcome.large_groups.some((g) => g.group === TOWN_HALL));
  const gmax = b.groupMax[TOWN_HALL];
  assert.equal(typeof gmax, 'number');
  const pushed = waitFor(b, 'message', (m) => m.gseq !== undefined);
  const ack = await a.send({ to: TOWN_HALL, ope: Ope.group, body: { text: 'to the town hall' } });
  assert.equal(ack.gseq, gmax + 1);
  assert.equal(ack.seq, undefined);
  const m = await pushed;
  assert.equal(m.gseq, gmax + 1);
  assert.equal(m.to, TOWN_HALL);
  assert.equal(b.groupMax[TOWN_HALL], gmax + 1);
  // A new device of another member fetches the timeline from the start.
  const c = client(5012, [3]);
  const got = collect(c);
  await ready(c);
  assert.equal(c.groupMax[TOWN_HALL], gmax + 1);
  assert.deepEqual(got.filter((x) => x.gseq !== undefined).map((x) => x.gseq), Array.from({ length: gmax + 1 }, (_, i) => i + 1));
});

test('the file storage keeps cursors and unacknowledged sends across a restart', async () => {
  const path = join(dep.dir, 'client-state.json');
  const rcpt = await ready(client(5006, [2], { storage: new FileStorage(path) }));
  const sender = await ready(client(5005, [1], { storage: new FileStorage(path) }));
  const got = collect(rcpt);
  for (let i = 0; i < 2; i++) await sender.send({ to: 5006, body: { n: i } });
  await atLeast(rcpt, got, 2, 'two messages');
  const held = rcpt.inboxMax;
  await rcpt.close();
  await sender.send({ to: 5006, body: { n: 2 } });
  // A send the sender never sees acknowledged: closed right after it.
  const lost = sender.send({ to: 5006, body: { n: 3 } }).catch((e) => e);
  const req = sender.unacked[0].req;
  await sender.close();
  assert.equal((await lost).code, 'closed');

  // Restarted, both from the file alone.
  const rcpt2 = client(5006, [3], { storage: new FileStorage(path) });
  const got2 = collect(rcpt2);
  await ready(rcpt2);
  const sender2 = client(5005, [2], { storage: new FileStorage(path) });
  const resent = waitFor(sender2, 'sent', (a) => a.req === req);
  await sender2.connect();
  await resent;
  await atLeast(rcpt2, got2, 2, 'the messages sent while the recipient was away');
  rcpt2.sync();
  await waitFor(rcpt2, 'synced');
  assert.deepEqual(got2.map((m) => [m.seq, m.body.n]), [[held + 1, 2], [held + 2, 3]]);
  assert.equal(got2[1].req, req);
});

test('presence: a friend on another server comes online, sets a status, goes away', async () => {
  // 3001 (globex) is a friend of 2001 (acme) in the demo directory, and
  // no other test connects as 3001.
  const watcher = await ready(client(2001, [2], { device: 'watcher' }));
  assert.equal(watcher.presence(3001).status, 'offline');
  const online = waitFor(watcher, 'presence', (c) => c.some((p) => p.user === 3001 && p.status === 'online'));
  const erin = await ready(client(3001, [3]));
  await online;
  const v = watcher.presence(3001).version;
  const busy = waitFor(watcher, 'presence', (c) => c.some((p) => p.user === 3001 && p.status === 'busy'));
  assert.deepEqual(await erin.setStatus('busy', 'in a call'), { status: 'busy', text: 'in a call' });
  await busy;
  assert.equal(watcher.presence(3001).text, 'in a call');
  assert.ok(watcher.presence(3001).version > v);
  const watched = await watcher.presenceSubscribe([3001]);
  assert.deepEqual(watched.map((p) => [p.user, p.status]), [[3001, 'busy']]);
  // 5000 (bigcorp) is neither a friend nor a colleague of 2001.
  await assert.rejects(watcher.presenceSubscribe([5000]), (e) => e.code === 'not_a_contact');
  const offline = waitFor(watcher, 'presence', (c) => c.some((p) => p.user === 3001 && p.status === 'offline'));
  await erin.close();
  await offline;
});

test('the outbox is bounded: a send over maxUnacked is refused queue_full at once', async () => {
  // Never connected: sends wait in the outbox.
  const c = client(5030, [1], { maxUnacked: 2 });
  const first = [c.send({ to: 5031, body: 1 }), c.send({ to: 5031, body: 2 })];
  await assert.rejects(c.send({ to: 5031, body: 3 }), (e) => e.code === 'queue_full');
  assert.deepEqual(c.unacked.map((u) => u.body), [1, 2]);
  // Connected, the two queued ones go out in order.
  await c.connect();
  const acks = await Promise.all(first);
  assert.equal(acks[1].seq, acks[0].seq + 1);
});
