// A small event emitter, the same in browsers and Node. Listeners run
// synchronously, in the order they were added; one that throws does not
// stop the others or the client (its exception is reported as an `error`
// event, and swallowed if it came from an `error` listener, which would
// otherwise loop).

export class Emitter {
  /** @type {Map<string, Set<Function>>} */
  #listeners = new Map();

  on(type, listener) {
    let set = this.#listeners.get(type);
    if (!set) this.#listeners.set(type, (set = new Set()));
    set.add(listener);
    return () => this.off(type, listener);
  }

  off(type, listener) {
    this.#listeners.get(type)?.delete(listener);
  }

  once(type, listener) {
    const off = this.on(type, (...args) => {
      off();
      listener(...args);
    });
    return off;
  }

  emit(type, ...args) {
    const set = this.#listeners.get(type);
    if (!set) return;
    for (const listener of [...set]) {
      try {
        listener(...args);
      } catch (e) {
        if (type !== 'error') this.emit('error', e);
      }
    }
  }
}
