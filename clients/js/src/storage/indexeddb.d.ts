import type { Storage, StoredState } from '../index.js';

/** Device state in the browser's IndexedDB. */
export declare class IndexedDbStorage implements Storage {
  constructor(name?: string);
  load(key: string): Promise<StoredState | undefined>;
  save(key: string, state: StoredState): Promise<void>;
}
