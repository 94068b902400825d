// Keeps device state in the browser's IndexedDB: one object store, one
// record per storage key (user and device). The database is opened on first
// use and kept open.

export class IndexedDbStorage {
  #name;
  /** @type {Promise<IDBDatabase> | null} */
  #db = null;

  /** @param {string} [name] the database's name */
  constructor(name = 'iim-client') {
    this.#name = name;
  }

  #open() {
    this.#db ??= new Promise((resolve, reject) => {
      const req = indexedDB.open(this.#name, 1);
      req.onupgradeneeded = () => req.result.createObjectStore('devices');
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
    // A failed open is tried again next time rather than remembered.
    this.#db.catch(() => (this.#db = null));
    return this.#db;
  }

  async #run(mode, fn) {
    const db = await this.#open();
    return new Promise((resolve, reject) => {
      const tx = db.transaction('devices', mode);
      const req = fn(tx.objectStore('devices'));
      // Resolve once the transaction is durable, not when the request is.
      tx.oncomplete = () => resolve(req.result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  }

  load(key) {
    return this.#run('readonly', (store) => store.get(key));
  }

  async save(key, state) {
    await this.#run('readwrite', (store) => store.put(state, key));
  }
}
