// A sender's app server dies (SIGKILL) while a send is unacknowledged: the
// client reconnects to another server of its list and resends with the
// same req; the recipient gets the message exactly once. Both ways it can
// happen: the message was stored before the server died (the resend is a
// `duplicate`), or the server never read it (the resend stores it).
// Also: connection states, and a refused token stops the client for good.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { IimClient } from '../src/index.js';
import { Deployment, waitFor, collect, spySocket } from './harness.js';

let dep;
const clients = [];

before(async () => {
  dep = await Deployment.start({ servers: [1, 2] });
});

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  dep?.stop();
});

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

async function ready(c) {
  const synced = waitFor(c, 'synced');
  await c.connect();
  await synced;
  return c;
}

/** Asks the recipient to sync and round-trips, so any duplicate would be
 * in `got` by now. */
async function settle(c) {
  const synced = waitFor(c, 'synced');
  c.sync();
  await synced;
  await c.ping();
}

async function restartServer1() {
  if (dep.procs.get('server-1').exited) {
    dep.startServer(1);
    await dep.waitServers([1]);
  }
}

test('server killed after storing the message, before its ack: resent, a duplicate, delivered once', async () => {
  await restartServer1();
  let killed = null;
  // The ack is held back and the server killed as it arrives: the message
  // is stored, the client never learns it.
  const spy = spySocket((f) => {
    if (f.op !== 'ack' || killed) return false;
    killed = dep.signal(1, 'SIGKILL');
    return true;
  });
  const sender = await ready(client(5020, [1, 2], { WebSocket: spy.WebSocket }));
  const rcpt = await ready(client(5021, [2]));
  const got = collect(rcpt);
  const states = [];
  sender.on('state', (s) => states.push(s.state));
  assert.equal(sender.welcome.server, 1);

  const ack = await sender.send({ to: 5021, body: { text: 'stored, then the server died' } });
  await killed;
  assert.equal(ack.duplicate, true);
  assert.equal(sender.welcome.server, 2);
  assert.deepEqual(states, ['reconnecting', 'open']);
  const sends = spy.sent.filter((t) => JSON.parse(t).op === 'send');
  assert.equal(sends.length, 2);
  assert.equal(sends[0], sends[1]);
  assert.equal(JSON.parse(sends[0]).req, ack.req);

  await settle(rcpt);
  assert.equal(got.length, 1);
  assert.equal(got[0].req, ack.req);
  assert.equal(got[0].id, ack.id);
  // The sender holds its own message once too, at the ack's sequence.
  assert.equal(sender.inboxMax, ack.seq);
});

test('server killed before reading the send: resent to another server and stored once', async () => {
  await restartServer1();
  const spy = spySocket();
  const sender = await ready(client(5022, [1, 2], { WebSocket: spy.WebSocket }));
  const rcpt = await ready(client(5023, [2]));
  const got = collect(rcpt);
  assert.equal(sender.welcome.server, 1);
  const base = sender.inboxMax;

  // Frozen first, so the frame waits unread in the socket, then killed.
  await dep.signal(1, 'SIGSTOP');
  const sent = sender.send({ to: 5023, body: { text: 'never read by server 1' } });
  await dep.signal(1, 'SIGKILL');
  const ack = await sent;
  assert.equal(ack.duplicate, false);
  assert.equal(ack.seq, base + 1);
  assert.equal(sender.welcome.server, 2);
  const sends = spy.sent.filter((t) => JSON.parse(t).op === 'send');
  assert.equal(sends.length, 2, 'sent to server 1, then resent to server 2');
  assert.equal(sends[0], sends[1]);

  await settle(rcpt);
  assert.equal(got.length, 1);
  assert.equal(got[0].req, ack.req);
});

test('a refused token closes the client for good', async () => {
  const c = new IimClient({
    servers: [dep.url(2)],
    token: 'not-a-jwt',
    backoffInitialMs: 100,
  });
  clients.push(c);
  const error = waitFor(c, 'error');
  await assert.rejects(c.connect(), (e) => e.code === 'auth_failed');
  assert.equal((await error).code, 'auth_failed');
  assert.equal(c.state, 'closed');
  await assert.rejects(c.send({ to: 1001, body: 1 }), (e) => e.code === 'closed');
});

test('an expired token: the client asks for a fresh one and reconnects', async () => {
  let calls = 0;
  // The first token has expired already (beyond the 5 s of skew).
  const c = client(5024, [2], { token: () => dep.token(5024, ++calls === 1 ? -60 : 3600) });
  const states = [];
  c.on('state', (s) => states.push(s.state));
  await c.connect();
  assert.equal(calls, 2);
  assert.deepEqual(states, ['connecting', 'reconnecting', 'open']);
});
