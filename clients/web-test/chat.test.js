// The web chat in a real browser against real app servers with a secret of
// their own (the harness's): people sign in with a pasted token, chat
// across servers, in a group of three, through a server's death and across
// a reload. Every wait is on what the page shows, never a fixed sleep.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Deployment } from '../js/test/harness.js';
import { IimClient } from '../js/src/index.js';
import {
  launch, newPage, pageUrl, connected, signInWithToken, openConversation, send, waitMessage,
  texts, unread, groupId, recordBanner, bannerSeen,
} from './browser.js';

let d;
let browser;
const pages = [];

before(async () => {
  d = await Deployment.start({ servers: [1, 2, 3] });
  browser = await launch();
});

after(async () => {
  await browser?.close();
  d?.stop();
});

async function person(server, user, others = []) {
  const page = await newPage(browser);
  pages.push(page);
  await signInWithToken(page, pageUrl(d, server, others), d.token(user));
  return page;
}

function noProblems(...ps) {
  for (const p of ps) assert.deepEqual(p.problems, [], 'the page logged errors');
}

test('without the development secret there is no token endpoint and no demo picker', async () => {
  const page = await newPage(browser);
  const res = await page.goto(pageUrl(d, 1));
  const csp = res.headers()['content-security-policy'];
  assert.match(csp, /connect-src 'self' ws:\/\/127\.0\.0\.1:\* wss:\/\/127\.0\.0\.1:\*/);
  assert.match(csp, /script-src 'self';/);
  await page.waitForSelector('#token-form');
  // The page learns there are no development tokens and keeps the
  // picker hidden; the endpoint does not exist.
  assert.equal(await page.evaluate(async () => (await (await fetch('/config.json')).json()).dev_tokens), false);
  const status = await page.evaluate(async () =>
    (await fetch('/dev/token', { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"user":1001}' })).status,
  );
  assert.equal(status, 404);
  assert.equal(await page.isVisible('#dev-login'), false);
  await page.context().close();
});

test('two pages on two app servers chat; a killed server\'s page reconnects and catches up', async () => {
  // Alice on server 1; Carol on server 2, failing over to server 3.
  const alice = await person(1, 1001);
  const carol = await person(2, 2001, [3]);
  await connected(carol, 2);

  // Colleagues see each other online.
  await alice.waitForSelector('#conversations button[data-conv="u2001"] .dot.online');
  await carol.waitForSelector('#conversations button[data-conv="u1001"] .dot.online');

  await openConversation(alice, 'u', 2001);
  await send(alice, 'hello Carol, from server 1');
  // Carol's list counts it unread until she opens the conversation.
  await carol.waitForSelector('#conversations button[data-conv="u1001"] .unread');
  assert.equal(await unread(carol, 'u1001'), 1);
  await carol.click('#conversations button[data-conv="u1001"]');
  await waitMessage(carol, 'hello Carol, from server 1');
  await carol.waitForSelector('#conversations button[data-conv="u1001"]:not(:has(.unread))');
  // Carol has seen it: Alice's page shows the read tick.
  await waitMessage(alice, 'hello Carol, from server 1', { state: 'read' });
  // Carol types: Alice's page says so, until her message arrives.
  await carol.fill('#text', 'hi Alice');
  await alice.waitForSelector('#peer-presence[data-typing="true"]');
  await send(carol, 'hi Alice, server 2 here');
  await waitMessage(alice, 'hi Alice, server 2 here');

  // Server 2 dies. Carol's page must say so while it reconnects.
  await recordBanner(carol);
  await d.signal(2, 'SIGKILL');
  await bannerSeen(carol, 'reconnecting', /Connection lost\. Reconnecting/);
  // What Alice sends meanwhile waits in Carol's inbox.
  const missed = ['while you were away 1', 'while you were away 2', 'while you were away 3'];
  for (const t of missed) await send(alice, t);

  try {
    await connected(carol, 3);
  } finally {
    // Server 2 back for the next tests.
    d.startServer(2);
    await d.waitServers([2]);
  }
  assert.equal(await carol.isVisible('#banner'), false);
  for (const t of missed) await waitMessage(carol, t);
  assert.deepEqual(await texts(carol), [
    'hello Carol, from server 1',
    'hi Alice, server 2 here',
    ...missed,
  ]);
  // And her replies go out through server 3.
  await send(carol, 'back, on server 3');
  await waitMessage(alice, 'back, on server 3');
  assert.deepEqual(await texts(alice), [
    'hello Carol, from server 1',
    'hi Alice, server 2 here',
    ...missed,
    'back, on server 3',
  ]);
  noProblems(alice, carol);
});

test('a group of three pages on three servers', async () => {
  const team = await groupId(d, 'team');
  const alice = await person(1, 1001);
  const carol = await person(2, 2001);
  const erin = await person(3, 3001);

  await openConversation(alice, 'g', team);
  await openConversation(carol, 'g', team);
  await send(alice, 'team: standup in 5');
  await waitMessage(carol, 'team: standup in 5');
  // Erin has not opened the group: it shows in her list, unread.
  await erin.waitForSelector(`#conversations button[data-conv="g${team}"] .unread`);
  assert.equal(await unread(erin, `g${team}`), 1);
  await erin.click(`#conversations button[data-conv="g${team}"]`);
  await waitMessage(erin, 'team: standup in 5');
  // A group message names its sender.
  const from = await erin.$eval('#messages li:last-child .from', (e) => e.textContent);
  assert.equal(from, 'User 1001');

  await send(erin, 'Erin here, on my way');
  await waitMessage(alice, 'Erin here, on my way');
  await waitMessage(carol, 'Erin here, on my way');
  await send(carol, 'Carol too');
  for (const p of [alice, erin]) await waitMessage(p, 'Carol too');
  const expected = ['team: standup in 5', 'Erin here, on my way', 'Carol too'];
  for (const p of [alice, carol, erin]) assert.deepEqual(await texts(p), expected);
  noProblems(alice, carol, erin);
});

test('a reload keeps the history, and what came meanwhile shows once', async () => {
  const dave = await person(2, 2002);
  const bob = await person(1, 1002);
  await openConversation(dave, 'u', 1002);
  const first = ['one', 'two', 'three'].map((w) => `before the reload: ${w}`);
  for (const t of first) await send(dave, t);
  await bob.click('#conversations button[data-conv="u2002"]');
  for (const t of first) await waitMessage(bob, t);

  // The device's cursor is in IndexedDB.
  const stored = await bob.evaluate(
    () =>
      new Promise((res, rej) => {
        const r = indexedDB.open('iim-web');
        r.onsuccess = () => {
          const all = r.result.transaction('devices').objectStore('devices').getAll();
          all.onsuccess = () => res(all.result);
          all.onerror = () => rej(all.error);
        };
        r.onerror = () => rej(r.error);
      }),
  );
  assert.equal(stored.length, 1);
  assert.ok(stored[0].inbox >= first.length, `stored cursor ${stored[0].inbox}`);

  await bob.reload();
  await connected(bob);
  for (const t of first) await waitMessage(bob, t);
  assert.deepEqual(await texts(bob), first);
  await send(dave, 'after the reload');
  await waitMessage(bob, 'after the reload');
  assert.deepEqual(await texts(bob), [...first, 'after the reload']);
  // A second reload with nothing new shows exactly the same.
  await bob.reload();
  await connected(bob);
  await waitMessage(bob, 'after the reload');
  assert.deepEqual(await texts(bob), [...first, 'after the reload']);
  noProblems(bob, dave);
});

test('scrolling back reads older history pages', async () => {
  // Bob writes more than the page's first history page (200) holds, from
  // a Node client of the library.
  const bob = new IimClient({ servers: [d.url(1)], token: d.token(1002), device: 'script' });
  await bob.connect();
  const sent = Array.from({ length: 230 }, (_, i) => `note ${i + 1}`);
  await Promise.all(sent.map((t) => bob.send({ to: 3001, body: { text: t } })));
  await bob.close();

  const erin = await person(3, 3001);
  await erin.click('#conversations button[data-conv="u1002"]');
  await waitMessage(erin, 'note 230');
  const first = await texts(erin);
  assert.ok(first.length < sent.length, `the first page already held ${first.length}`);
  assert.deepEqual(first, sent.slice(sent.length - first.length));
  assert.equal(await erin.isVisible('#older'), true);
  assert.equal(await erin.isVisible('#history-start'), false);

  // Scrolling to the top fetches the rest.
  await erin.$eval('#scroller', (s) => {
    s.scrollTop = 0;
  });
  await erin.waitForSelector('#history-start:not([hidden])');
  assert.deepEqual(await texts(erin), sent);
  assert.equal(await erin.isVisible('#older'), false);
  noProblems(erin);
});
