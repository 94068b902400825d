// The iim JavaScript client library: see README.md and
// docs/client-protocol.md at the repository's root.

export { IimClient } from './client.js';
export { ClientError } from './errors.js';
export { MemoryStorage } from './storage/memory.js';

/** The `ope` of a send: one to one, or a group. */
export const Ope = Object.freeze({ single: 0, group: 1 });
