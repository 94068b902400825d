import type { Storage, StoredState } from '../index.js';

/** Device state in one JSON file (Node only). */
export declare class FileStorage implements Storage {
  constructor(path: string);
  load(key: string): Promise<StoredState | undefined>;
  save(key: string, state: StoredState): Promise<void>;
}
