// Keeps device state in memory: what a test or a throwaway session needs.
// A restart starts over (sync from 0, unacknowledged sends lost).

export class MemoryStorage {
  #states = new Map();

  async load(key) {
    const s = this.#states.get(key);
    return s === undefined ? undefined : structuredClone(s);
  }

  async save(key, state) {
    this.#states.set(key, structuredClone(state));
  }
}
