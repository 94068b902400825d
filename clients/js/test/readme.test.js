// The README's example, run as written against a real deployment: only
// the package name (resolved to this checkout), the addresses and the
// token function are filled in.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { IimClient } from '../src/index.js';
import { Deployment, waitFor } from './harness.js';

const here = dirname(fileURLToPath(import.meta.url));
let dep;
let child;
let rcpt;

after(async () => {
  child?.kill('SIGKILL');
  await rcpt?.close();
  dep?.stop();
});

test('the README example connects, sends, and prints its own message', async () => {
  dep = await Deployment.start({ servers: [1, 2] });
  const readme = readFileSync(resolve(here, '../README.md'), 'utf8');
  const example = readme.match(/```js\n([\s\S]*?)```/)[1];
  const code = example
    .replace("'@iim/client'", `'${pathToFileURL(resolve(here, '../src/index.js'))}'`)
    .replace('ws://127.0.0.1:8201/ws', dep.url(1))
    .replace('ws://127.0.0.1:8202/ws', dep.url(2));
  assert.notEqual(code, example);
  const prelude = `const getToken = async () => ${JSON.stringify(dep.token(1001))};\n`;
  const file = join(dep.dir, 'example.mjs');
  writeFileSync(file, prelude + code);

  rcpt = new IimClient({ servers: [dep.url(2)], token: dep.token(2001), device: 'readme' });
  await rcpt.connect();
  const pushed = waitFor(rcpt, 'message', (m) => m.from === 1001 && m.body?.text === 'hello');

  child = spawn(process.execPath, ['--experimental-websocket', '--no-warnings', file], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  const printed = new Promise((res, rej) => {
    child.stdout.on('data', (d) => {
      out += d;
      if (/#\d+ from 1001: \{ text: 'hello' \}/.test(out)) res();
    });
    child.stderr.on('data', (d) => (out += d));
    child.once('exit', (code) => rej(new Error(`the example exited (${code}):\n${out}`)));
  });
  await Promise.all([printed, pushed]);
  assert.match(out, /connection: connecting\nconnection: open\n/);
});
