// Waiting for a client to reach a condition, event-driven, with a generous deadline that only
// turns a hang into a failure (never a timed assertion).

export const DEADLINE_MS = 30_000;

/**
 * Resolves once `check()` is true, re-checking on each of the client's events.
 * @param {import('../../index').PabalClient} client
 * @param {() => boolean} check
 * @param {string} what
 */
export function until(client, check, what) {
  return new Promise((resolve, reject) => {
    if (check()) return resolve(undefined);
    const offs = [];
    const done = (/** @type {Error | undefined} */ err) => {
      clearTimeout(timer);
      clearInterval(poll);
      for (const off of offs) off();
      err ? reject(err) : resolve(undefined);
    };
    const timer = setTimeout(() => done(new Error(`timed out waiting for ${what}`)), DEADLINE_MS);
    // Events cover every state change but one driven from outside (a test's own counters).
    const poll = setInterval(() => check() && done(), 50);
    for (const type of ['welcome', 'room', 'left', 'message', 'gap', 'receipt', 'puback', 'goaway', 'state', 'error', 'relayError']) {
      offs.push(client.on(/** @type {any} */ (type), () => check() && done()));
    }
  });
}

/**
 * A client's received messages, collected from its events.
 * @param {import('../../index').PabalClient} client
 */
export function inbox(client) {
  /** @type {{ room: string, channel: boolean, seq: number | null, sender: string, text: string }[]} */
  const messages = [];
  client.on('message', (m) =>
    messages.push({ room: m.room.name, channel: m.room.channel, seq: m.seq, sender: m.sender, text: new TextDecoder().decode(m.payload) }),
  );
  return messages;
}
