// Keeps device state in one JSON file (Node only): a map from storage key
// (user and device) to that device's state. Every save reads the file,
// changes its key and writes it back through a temporary file and a
// rename, so a crash mid-write leaves the previous state, never half of
// one. Saves to one path are serialised across every FileStorage of this
// process (several clients may share a file); separate processes need
// separate files.

import { readFile, writeFile, rename, mkdir } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';

/** The last operation queued on each path, by absolute path. */
const chains = new Map();

export class FileStorage {
  #path;

  /** @param {string} path */
  constructor(path) {
    this.#path = resolve(path);
  }

  async #read() {
    try {
      const parsed = JSON.parse(await readFile(this.#path, 'utf8'));
      return parsed && typeof parsed === 'object' ? parsed : {};
    } catch (e) {
      if (e.code === 'ENOENT') return {};
      throw e; // a corrupt file is reported, not silently reset
    }
  }

  load(key) {
    return this.#queue(async () => (await this.#read())[key]);
  }

  save(key, state) {
    return this.#queue(async () => {
      const all = await this.#read();
      all[key] = state;
      const tmp = `${this.#path}.${process.pid}.tmp`;
      await mkdir(dirname(this.#path), { recursive: true });
      await writeFile(tmp, JSON.stringify(all), { mode: 0o600 });
      await rename(tmp, this.#path);
    });
  }

  #queue(fn) {
    const run = (chains.get(this.#path) ?? Promise.resolve()).then(fn);
    const tail = run.catch(() => {});
    chains.set(this.#path, tail);
    // Forget the path once idle, so the map does not grow with paths.
    tail.then(() => chains.get(this.#path) === tail && chains.delete(this.#path));
    return run;
  }
}
