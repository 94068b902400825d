// Errors the client reports: the server's error codes (docs/client-protocol.md
// §6) pass through unchanged, and the client adds a few of its own
// (`queue_full`, `closed`, `not_connected`, `timeout`, `storage`,
// `user_changed`), so an app branches on `code` only, as the protocol asks.

export class ClientError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{req?: string, cause?: unknown}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message, extra.cause === undefined ? undefined : { cause: extra.cause });
    this.name = 'ClientError';
    this.code = code;
    if (extra.req !== undefined) this.req = extra.req;
  }
}
