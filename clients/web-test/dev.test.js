// The web chat in development mode: app servers running with the public
// development secret (on loopback, the only place the config allows it)
// offer POST /dev/token, and the page lets a person pick a demo user. Also
// makes the screenshot of a conversation: into docs/web-chat.png when
// IIM_WEB_SCREENSHOT=docs (to refresh the one the docs show), else into a
// temporary file, so a test run leaves the checkout as it was.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Deployment } from '../js/test/harness.js';
import {
  launch, newPage, pageUrl, connected, openConversation, send, waitMessage, texts, groupId,
} from './browser.js';

/** iim::token::DEV_SECRET. */
const DEV_SECRET = 'iim-development-secret';
const SCREENSHOT = process.env.IIM_WEB_SCREENSHOT === 'docs'
  ? resolve(dirname(fileURLToPath(import.meta.url)), '../../docs/web-chat.png')
  : join(tmpdir(), `iim-web-chat-${process.pid}.png`);

let d;
let browser;

before(async () => {
  d = await Deployment.start({ servers: [1, 2, 3] });
  // The harness gives its servers a secret of their own; start them again
  // with the development secret instead.
  const config = join(d.dir, 'server.toml');
  const text = readFileSync(config, 'utf8');
  assert.match(text, /^jwt_secret = ".*"$/m);
  writeFileSync(config, text.replace(/^jwt_secret = ".*"$/m, `jwt_secret = "${DEV_SECRET}"`));
  d.secret = DEV_SECRET;
  for (const id of d.ids) await d.signal(id, 'SIGKILL');
  for (const id of d.ids) d.startServer(id);
  await d.waitServers(d.ids);
  browser = await launch();
});

after(async () => {
  await browser?.close();
  d?.stop();
});

/** Signs in on app server `server`'s page by picking demo user `user`, or
 * by typing the id when `typed`. */
async function pick(server, user, { typed = false } = {}) {
  const page = await newPage(browser);
  await page.goto(pageUrl(d, server));
  await page.waitForSelector('#dev-login:not([hidden])');
  if (typed) {
    await page.fill('#dev-user', String(user));
    await page.click('#dev-form button[type="submit"]');
  } else {
    await page.click(`#demo-users button[data-user="${user}"]`);
  }
  await connected(page, server);
  return page;
}

test('the development token endpoint mints tokens the servers accept', async () => {
  const url = `http://127.0.0.1:${d.ports.get(1).ws}/dev/token`;
  const res = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ user: 2002 }),
  });
  assert.equal(res.status, 200);
  assert.equal(res.headers.get('cache-control'), 'no-store');
  const body = await res.json();
  assert.equal(body.user, 2002);
  const claims = JSON.parse(Buffer.from(body.token.split('.')[1], 'base64url').toString());
  assert.equal(claims.sub, '2002');
  // Short-lived: minutes, not the day `iimctl token` gives.
  assert.ok(claims.exp - claims.iat <= 15 * 60, `lifetime ${claims.exp - claims.iat} s`);
  assert.equal(body.expires_in, claims.exp - claims.iat);
  // A form post (no CORS preflight) gets nothing.
  const form = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: 'user=2002',
  });
  assert.equal(form.status, 415);
});

test('demo users picked on the page chat 1:1 and in their group; the screenshot', async () => {
  const team = await groupId(d, 'team');
  const alice = await pick(1, 1001);
  const carol = await pick(2, 2001);
  const erin = await pick(3, 3001, { typed: true });
  for (const [p, name] of [[alice, 'Alice (1001)'], [carol, 'Carol (2001)'], [erin, 'Erin (3001)']]) {
    assert.match(await p.textContent('#me'), new RegExp(`^${name.replace(/[()]/g, '\\$&')} · web-`));
  }

  await openConversation(carol, 'u', 1001);
  await send(carol, 'Lunch at noon?');
  await openConversation(alice, 'g', team);
  await openConversation(erin, 'g', team);
  await send(alice, 'Morning all! The release notes are up for review.');
  await waitMessage(erin, 'Morning all! The release notes are up for review.');
  await send(erin, 'Reading them now, looks good so far.');
  await openConversation(carol, 'g', team);
  await send(carol, 'I will add the migration steps after lunch.');
  await waitMessage(alice, 'I will add the migration steps after lunch.');
  await send(alice, 'Thanks, both of you!');
  for (const p of [carol, erin]) await waitMessage(p, 'Thanks, both of you!');
  const expected = [
    'Morning all! The release notes are up for review.',
    'Reading them now, looks good so far.',
    'I will add the migration steps after lunch.',
    'Thanks, both of you!',
  ];
  for (const p of [alice, carol, erin]) assert.deepEqual(await texts(p), expected);
  // Alice has not read Carol's 1:1 message: her list says so.
  await alice.waitForSelector('#conversations button[data-conv="u2001"] .unread');
  assert.equal(await alice.textContent('#conversations button[data-conv="u2001"] .unread'), '1');
  // Senders are named in the group, by the demo directory's names.
  const from = await alice.$$eval('#messages li .from', (els) => els.map((e) => e.textContent));
  assert.deepEqual(from, ['Erin (3001)', 'Carol (2001)']);

  await alice.screenshot({ path: SCREENSHOT });
  assert.ok(statSync(SCREENSHOT).size > 10_000, 'the screenshot is an image of the page');
  for (const p of [alice, carol, erin]) assert.deepEqual(p.problems, []);
});
