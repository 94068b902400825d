// What the browser tests share: Debian's chromium, headless, driven by
// playwright-core (no browser download), and the steps a person takes in
// the web chat. The deployment is the client library's test harness
// (../js/test/harness.js): a real exchange and real app servers on
// loopback, which serve the page under test.

import { chromium } from 'playwright-core';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { join } from 'node:path';
import { BIN_DIR } from '../js/test/harness.js';

export const CHROMIUM = process.env.IIM_CHROMIUM ?? '/usr/bin/chromium';
const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
/** Longest wait for anything a page shows. */
export const WAIT_MS = 30_000;

export function launch() {
  return chromium.launch({ executablePath: CHROMIUM, args: ARGS, headless: true });
}

/** A page of its own browser context (its own storage, as another
 * person's browser), collecting its console errors and failed requests. */
export async function newPage(browser) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 680 } });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  page.problems = [];
  page.on('pageerror', (e) => page.problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error') page.problems.push(`console: ${m.text()}`);
  });
  page.on('response', (r) => {
    if (r.status() >= 400) page.problems.push(`HTTP ${r.status()} for ${r.url()}`);
  });
  // The page must never reach beyond loopback.
  page.on('request', (r) => {
    const host = new URL(r.url()).hostname;
    if (host !== '127.0.0.1') page.problems.push(`request to ${r.url()}`);
  });
  return page;
}

/** The page of app server `id`, failing over to `others`. */
export function pageUrl(d, id, others = []) {
  const servers = others.map((o) => `127.0.0.1:${d.ports.get(o).ws}`).join(',');
  return `http://127.0.0.1:${d.ports.get(id).ws}/${servers ? `?servers=${servers}` : ''}`;
}

/** Waits until the page is connected, to server `server` if given. */
export async function connected(page, server) {
  const sel = server === undefined ? '#connection[data-state="open"]' : `#connection[data-state="open"][data-server="${server}"]`;
  await page.waitForSelector(sel);
}

/** Signs in on the login form with a pasted token. */
export async function signInWithToken(page, url, token) {
  await page.goto(url);
  await page.waitForSelector('#token-form');
  await page.fill('#token', token);
  await page.click('#token-form button[type="submit"]');
  await connected(page);
}

/** Opens conversation `kind` (`u` or `g`) `id` through the "start a
 * conversation" form. */
export async function openConversation(page, kind, id) {
  await page.selectOption('#new-kind', kind);
  await page.fill('#new-id', String(id));
  await page.click('#new-chat button[type="submit"]');
  await page.waitForSelector(`#conversations button[data-conv="${kind}${id}"][aria-current="true"]`);
}

/** Sends `text` in the open conversation and waits for its delivered
 * tick (the server's ack), or its read tick when the other side was
 * quicker still. */
export async function send(page, text) {
  await page.fill('#text', text);
  await page.click('#composer button[type="submit"]');
  await waitMessage(page, text, { state: ['delivered', 'read'] });
}

/** Waits until the open conversation shows a message reading `text` (in
 * `state`, or one of several). */
export async function waitMessage(page, text, { state } = {}) {
  const states = state === undefined ? null : [state].flat();
  await page.waitForFunction(
    ([t, s]) =>
      [...document.querySelectorAll('#messages li')].some(
        (li) => li.querySelector('.text')?.textContent === t && (!s || s.includes(li.dataset.state)),
      ),
    [text, states],
    { timeout: WAIT_MS },
  );
}

/** The texts of the open conversation, in order. */
export function texts(page) {
  return page.$$eval('#messages li .text', (els) => els.map((e) => e.textContent));
}

/** The unread count the conversation list shows for `key` (0 when none). */
export async function unread(page, key) {
  const badge = await page.$(`#conversations button[data-conv="${key}"] .unread`);
  return badge ? Number(await badge.textContent()) : 0;
}

/** The id of the demo group `name`. */
export async function groupId(d, name) {
  const { stdout } = await promisify(execFile)(join(BIN_DIR, 'iimctl'), [
    'groups',
    'list',
    '--database',
    d.database,
    '--json',
  ]);
  const g = JSON.parse(stdout).find((x) => x.name === name);
  if (!g) throw new Error(`no group ${name} in the demo data`);
  return g.id;
}

/** Starts recording what the banner says each time it changes, so a
 * state that lasts a moment is not missed; `bannerSeen(page, re)` waits
 * for a recorded text matching `re` while the banner was visible with
 * state `state`. */
export function recordBanner(page) {
  return page.evaluate(() => {
    const b = document.getElementById('banner');
    window.bannerLog = [];
    new MutationObserver(() => {
      if (!b.hidden) window.bannerLog.push({ state: b.dataset.state, text: b.textContent });
    }).observe(b, { attributes: true, childList: true, characterData: true, subtree: true });
  });
}

export function bannerSeen(page, state, re) {
  return page.waitForFunction(
    ([s, source]) => window.bannerLog.some((e) => e.state === s && new RegExp(source).test(e.text)),
    [state, re.source],
    { timeout: WAIT_MS },
  );
}
