// Starts a real deployment for the tests: the built `iim-exchange` and
// `iim-appserver` binaries on loopback, sharing a fresh SQLite registry
// holding the demo directory (`iimctl demo-data`), with development
// certificates (`iimctl certs`) in a temporary directory, as `iimctl demo`
// does. The binaries are found in $IIM_BIN_DIR, else <repo>/target/debug.
//
// Readiness is polled (the registry through `iimctl servers --json`,
// `/health`, the client port), never slept for. Every process is killed
// when the deployment stops, and also if the test process exits early.

import { spawn, execFile } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { mkdtempSync, writeFileSync, openSync, closeSync, rmSync, existsSync, readFileSync } from 'node:fs';
import { createServer, connect } from 'node:net';
import { createSocket } from 'node:dgram';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const run = promisify(execFile);
const here = dirname(fileURLToPath(import.meta.url));
export const BIN_DIR = process.env.IIM_BIN_DIR ?? resolve(here, '../../../target/debug');
const EXCHANGE_ID = 100;
const START_WAIT_MS = 60_000;

/** Every child of this process, killed however the process ends. */
const children = new Set();
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});

function bin(name) {
  const p = join(BIN_DIR, name);
  if (!existsSync(p)) {
    throw new Error(`${p} is missing: build it (cargo build --bins) or set IIM_BIN_DIR`);
  }
  return p;
}

/** A port nothing listens on now, for TCP (and UDP when `udp`). Taken
 * below the kernel's ephemeral range, where no outgoing connection grabs
 * it before the server binds it. */
async function freePort(udp = false) {
  for (;;) {
    const port = 20_000 + Math.floor(Math.random() * 12_000);
    const ok = await new Promise((res) => {
      if (udp) {
        const s = createSocket('udp4');
        s.once('error', () => res(false));
        s.bind(port, '127.0.0.1', () => s.close(() => res(true)));
      } else {
        const s = createServer();
        s.once('error', () => res(false));
        s.listen(port, '127.0.0.1', () => s.close(() => res(true)));
      }
    });
    if (ok) return port;
  }
}

/** Polls `check` until it returns true; fails after `ms`, or at once if
 * `alive` says a process died. */
export async function until(what, check, { ms = START_WAIT_MS, every = 100, alive } = {}) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    alive?.();
    try {
      if (await check()) return;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) {
      throw new Error(`timed out waiting for ${what}${last ? ` (last error: ${last.message})` : ''}`);
    }
    await new Promise((r) => setTimeout(r, every));
  }
}

function tcpOpen(port) {
  return new Promise((res) => {
    const s = connect(port, '127.0.0.1');
    s.once('connect', () => {
      s.destroy();
      res(true);
    });
    s.once('error', () => res(false));
  });
}

export class Deployment {
  /** @param {{servers?: number[], serverToml?: string}} [opts] */
  static async start(opts = {}) {
    const d = new Deployment(opts);
    try {
      await d.#start();
    } catch (e) {
      d.stop();
      throw e;
    }
    return d;
  }

  constructor({ servers = [1, 2, 3], serverToml = '' } = {}) {
    this.dir = mkdtempSync(join(tmpdir(), 'iim-js-'));
    this.ids = servers;
    this.serverToml = serverToml;
    // A fresh secret per run: the development secret is not used, and
    // nothing here outlives the run.
    this.secret = randomBytes(32).toString('hex');
    this.database = `sqlite://${join(this.dir, 'registry.db')}`;
    /** @type {Map<string, import('node:child_process').ChildProcess>} */
    this.procs = new Map();
    this.ports = new Map();
  }

  async #start() {
    const iimctl = bin('iimctl');
    bin('iim-exchange');
    bin('iim-appserver');
    const certs = join(this.dir, 'certs');
    await run(iimctl, ['certs', '--dir', certs, '--exchange', String(EXCHANGE_ID), '--servers', this.ids.join(',')]);
    // Creates the schema before any daemon starts (no migration races).
    await run(iimctl, ['demo-data', '--database', this.database]);
    writeFileSync(join(this.dir, 'database.url'), `${this.database}\n`, { mode: 0o600 });
    const quic = '[quic]\nkeep_alive_ms = 200\nidle_timeout_ms = 1000\n';
    writeFileSync(join(this.dir, 'exchange.toml'), `lease_secs = 3\nshutdown_grace_secs = 2\n${quic}`);
    writeFileSync(
      join(this.dir, 'server.toml'),
      `reconnect_min_ms = 50\nreconnect_max_ms = 300\n${this.serverToml}\n` +
        `[auth]\njwt_secret = "${this.secret}"\n` +
        '[limits]\nrate_per_sec = 100000\nrate_burst = 100000\n' +
        quic,
      { mode: 0o600 },
    );
    this.quic = await freePort(true);
    this.exchangeHttp = await freePort();
    for (const id of this.ids) {
      this.ports.set(id, { ws: await freePort(), http: await freePort() });
    }
    this.#spawn('exchange', 'iim-exchange', [
      '--config', join(this.dir, 'exchange.toml'),
      '--id', String(EXCHANGE_ID),
      '--listen', `127.0.0.1:${this.quic}`,
      '--http-listen', `127.0.0.1:${this.exchangeHttp}`,
      ...this.#common(),
    ]);
    await until('the exchange to register', async () => {
      const up = await this.#registryUp();
      return up.has(EXCHANGE_ID);
    }, { alive: () => this.check() });
    for (const id of this.ids) this.startServer(id);
    await this.waitServers(this.ids);
  }

  #common() {
    return ['--database-file', join(this.dir, 'database.url'), '--certs', join(this.dir, 'certs')];
  }

  #spawn(name, binary, args) {
    const log = openSync(join(this.dir, `${name}.log`), 'a');
    const child = spawn(bin(binary), args, {
      stdio: ['ignore', log, log],
      env: { PATH: process.env.PATH, NO_COLOR: '1', RUST_LOG: process.env.RUST_LOG ?? 'info' },
    });
    closeSync(log);
    child.exited = null;
    child.once('exit', (code, signal) => {
      child.exited = { code, signal };
      children.delete(child);
    });
    children.add(child);
    this.procs.set(name, child);
    return child;
  }

  /** Throws, naming the log, if a process that should run has exited. */
  check() {
    for (const [name, p] of this.procs) {
      if (p.exited && !p.expectedExit) {
        const log = join(this.dir, `${name}.log`);
        const tail = readFileSync(log, 'utf8').split('\n').slice(-15).join('\n');
        throw new Error(`${name} exited (${JSON.stringify(p.exited)}); the end of ${log}:\n${tail}`);
      }
    }
  }

  async #registryUp() {
    const { stdout } = await run(bin('iimctl'), ['servers', '--database', this.database, '--json']);
    return new Set(JSON.parse(stdout).filter((s) => s.state === 'up').map((s) => s.id));
  }

  startServer(id) {
    const { ws, http } = this.ports.get(id);
    return this.#spawn(`server-${id}`, 'iim-appserver', [
      '--config', join(this.dir, 'server.toml'),
      '--id', String(id),
      ...this.#common(),
      '--http-listen', `127.0.0.1:${http}`,
      '--client-listen', `127.0.0.1:${ws}`,
      '--exchange', `${EXCHANGE_ID}@127.0.0.1:${this.quic}`,
    ]);
  }

  /** Until app servers `ids` answer on `/health` and their client port and
   * the registry shows them up. */
  async waitServers(ids) {
    await until(`app servers ${ids} to come up`, async () => {
      for (const id of ids) {
        const { ws, http } = this.ports.get(id);
        const h = await fetch(`http://127.0.0.1:${http}/health`).catch(() => null);
        if (!h?.ok || !(await tcpOpen(ws))) return false;
      }
      const up = await this.#registryUp();
      return ids.every((id) => up.has(id));
    }, { alive: () => this.check() });
  }

  /** App server `id`'s client endpoint. */
  url(id) {
    return `ws://127.0.0.1:${this.ports.get(id).ws}/ws`;
  }

  /** Signals app server `id` (SIGKILL by default); resolves once it is gone
   * (for SIGKILL) or at once (SIGSTOP, SIGCONT). */
  async signal(id, sig = 'SIGKILL') {
    const p = this.procs.get(`server-${id}`);
    if (sig === 'SIGKILL') p.expectedExit = true;
    p.kill(sig);
    if (sig === 'SIGKILL' && !p.exited) await new Promise((r) => p.once('exit', r));
  }

  /** An HS256 token for `user`, signed with this deployment's secret. */
  token(user, ttlSecs = 3600) {
    const now = Math.floor(Date.now() / 1000);
    const part = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
    const head = part({ alg: 'HS256', typ: 'JWT' });
    const body = part({ sub: String(user), iat: now, exp: now + ttlSecs });
    const sig = createHmac('sha256', this.secret).update(`${head}.${body}`).digest('base64url');
    return `${head}.${body}.${sig}`;
  }

  /** Kills everything and removes the directory (kept when IIM_KEEP_DIR
   * is set, to read the logs). */
  stop() {
    for (const p of this.procs.values()) {
      p.expectedExit = true;
      // SIGKILL also ends a process stopped with SIGSTOP.
      if (!p.exited) p.kill('SIGKILL');
    }
    if (!process.env.IIM_KEEP_DIR) rmSync(this.dir, { recursive: true, force: true });
    else console.log(`deployment kept in ${this.dir}`);
  }
}

/** Resolves with the first event `type` of `emitter` that `match`es;
 * rejects after `ms`, naming `what`. */
export function waitFor(emitter, type, match = () => true, ms = 30_000, what = type) {
  return new Promise((res, rej) => {
    const timer = setTimeout(() => {
      off();
      rej(new Error(`timed out waiting for ${what}`));
    }, ms);
    const off = emitter.on(type, (e) => {
      if (!match(e)) return;
      clearTimeout(timer);
      off();
      res(e);
    });
  });
}

/** Collects every `message` event of a client. */
export function collect(client) {
  const got = [];
  client.on('message', (m) => got.push(m));
  return got;
}

/** Until `list` (filled by `client`'s `message` events, as `collect`
 * does) holds `n` items; at once if it does already. */
export async function atLeast(client, list, n, what) {
  if (list.length >= n) return;
  await waitFor(client, 'message', () => list.length >= n, 30_000, what);
}

/**
 * A WebSocket class for one test client that records every frame sent
 * (as text) and received, and drops the received frames `drop` picks: the
 * loss of a push or an ack on a real connection to a real server.
 */
export function spySocket(drop = () => false) {
  const sent = [];
  const received = [];
  class SpySocket extends WebSocket {
    send(data) {
      sent.push(String(data));
      super.send(data);
    }
    addEventListener(type, listener, options) {
      if (type !== 'message') return super.addEventListener(type, listener, options);
      return super.addEventListener(
        'message',
        (e) => {
          const f = JSON.parse(e.data);
          received.push(f);
          if (!drop(f)) listener(e);
        },
        options,
      );
    }
  }
  return { WebSocket: SpySocket, sent, received, sentOps: (op) => sent.map((t) => JSON.parse(t)).filter((f) => f.op === op) };
}
