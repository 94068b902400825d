// The package as `npm pack` would publish it, and its type declarations
// against what the modules really export. No TypeScript compiler is
// needed: the checks read the declaration files.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const root = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const pkg = JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8'));

test('npm pack ships every module and declaration the package exports, and nothing else', () => {
  const out = execFileSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], {
    cwd: root,
    encoding: 'utf8',
    env: { ...process.env, npm_config_update_notifier: 'false' },
  });
  const [info] = JSON.parse(out);
  assert.equal(info.version, pkg.version);
  const files = new Set(info.files.map((f) => f.path));
  const wanted = new Set(['package.json', 'README.md', pkg.types.replace(/^\.\//, '')]);
  for (const target of Object.values(pkg.exports)) {
    for (const file of Object.values(target)) wanted.add(file.replace(/^\.\//, ''));
  }
  for (const f of wanted) assert.ok(files.has(f), `${f} is in the package`);
  for (const f of files) {
    assert.ok(f === 'package.json' || f === 'README.md' || f.startsWith('src/'), `${f} belongs in it`);
  }
});

/** Names a declaration file exports (`export declare const|class|function`). */
function declared(dts) {
  return new Set([...dts.matchAll(/^export declare (?:const|class|function) (\w+)/gm)].map((m) => m[1]));
}

test('the declarations name exactly what each module exports', async () => {
  for (const target of Object.values(pkg.exports)) {
    const js = target.default ?? target.node;
    const mod = await import(path.join(root, js));
    const dts = readFileSync(path.join(root, target.types), 'utf8');
    assert.deepEqual(declared(dts), new Set(Object.keys(mod)), `${target.types} vs ${js}`);
  }
});

test('IimClient: every public method and property is declared, every declared method exists', async () => {
  const { IimClient } = await import(path.join(root, 'src/index.js'));
  const dts = readFileSync(path.join(root, pkg.types), 'utf8');
  const body = dts.slice(dts.indexOf('export declare class IimClient'));
  const classBody = body.slice(0, body.indexOf('\n}') + 2);
  for (const name of Object.getOwnPropertyNames(IimClient.prototype)) {
    if (name === 'constructor') continue;
    assert.match(classBody, new RegExp(`\\b${name}\\b\\??[(:<]`), `${name} is declared`);
  }
  for (const m of classBody.matchAll(/^\s+(\w+)\s*[<(]/gm)) {
    if (m[1] === 'constructor') continue;
    assert.equal(typeof IimClient.prototype[m[1]], 'function', `declared ${m[1]}() exists`);
  }
});
