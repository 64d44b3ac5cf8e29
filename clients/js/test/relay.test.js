// The client against a real relay over WebSocket (the relay binary, on the backend named by
// PABAL_IO_BACKEND): chat in a room, a channel broadcast, resume after cut connections,
// GOAWAY retry hints, malformed input from the wire, heartbeats.

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { PabalClient, FrameError, GoAwayReason } from '../src/index.js';
import { startProxy, startRelay } from './support/relay.mjs';
import { inbox, until } from './support/wait.mjs';

/**
 * @param {import('node:test').TestContext} t
 * @param {string} url
 * @param {string} user
 * @param {Partial<import('../index').ClientOptions>} [extra]
 */
function client(t, url, user, extra = {}) {
  const c = new PabalClient({ url, token: user, backoffBaseMs: 50, backoffCapMs: 500, ackDelayMs: 10, ...extra });
  t.after(() => c.close());
  c.connect();
  return c;
}

test('two users chat in a room', async (t) => {
  const relay = await startRelay(t);
  const ann = client(t, relay.wsUrl, 'ann');
  const bob = client(t, relay.wsUrl, 'bob');
  const annGot = inbox(ann);
  const bobGot = inbox(bob);
  assert.equal((await ann.join('hiking-club')).name, 'hiking-club');
  await bob.join('hiking-club');
  assert.equal(ann.welcome?.user, 'ann');

  const seq = await ann.publish('hiking-club', 'see you at 7 tonight');
  await until(bob, () => bobGot.length === 1, 'bob receives');
  assert.deepEqual(bobGot, [{ room: 'hiking-club', channel: false, seq, sender: 'ann', text: 'see you at 7 tonight' }]);

  const reply = await bob.publish('hiking-club', 'ok!');
  assert.equal(reply, /** @type {number} */ (seq) + 1);
  await until(ann, () => annGot.length === 1, 'ann receives');
  assert.deepEqual(annGot, [{ room: 'hiking-club', channel: false, seq: reply, sender: 'bob', text: 'ok!' }]);

  // Ephemeral events reach the other side without a sequence and move no cursor.
  assert.equal(await ann.publish('hiking-club', 'typing', { ephemeral: true }), null);
  await until(bob, () => bobGot.length === 2, 'bob gets the ephemeral event');
  assert.equal(bobGot[1].seq, null);
  assert.equal(bob.rooms()[0].cursor, reply);
});

test('a channel broadcast reaches every subscriber', async (t) => {
  const relay = await startRelay(t);
  const ann = client(t, relay.wsUrl, 'ann');
  const bob = client(t, relay.wsUrl, 'bob');
  const annGot = inbox(ann);
  const bobGot = inbox(bob);
  await until(ann, () => ann.state === 'open', 'ann connects');
  await until(bob, () => bob.state === 'open', 'bob connects');
  // The app server subscribes both users, then broadcasts.
  await relay.api('POST', '/v1/channels/coffee-news/subscribers', { users: ['ann', 'bob'] });
  for (const c of [ann, bob]) await until(c, () => c.rooms().some((r) => r.channel), 'the channel is bound');
  const { seq } = await relay.api('POST', '/v1/channels/coffee-news/messages', { sender: 'newsroom', text: 'beans are in' });
  const expected = [{ room: 'coffee-news', channel: true, seq, sender: 'newsroom', text: 'beans are in' }];
  await until(ann, () => annGot.length === 1, 'ann gets the broadcast');
  await until(bob, () => bobGot.length === 1, 'bob gets the broadcast');
  assert.deepEqual(annGot, expected);
  assert.deepEqual(bobGot, expected);
});

test('cut connections resume without loss or repeats', async (t) => {
  const relay = await startRelay(t);
  const proxy = await startProxy(t, relay.wsAddr);
  const ann = client(t, relay.wsUrl, 'ann');
  const bob = client(t, proxy.url, 'bob');
  const bobGot = inbox(bob);
  await ann.join('family');
  await bob.join('family');

  const total = 60;
  /** @type {Promise<number | null>[]} */
  const bobSent = [];
  for (let i = 1; i <= total; i++) {
    await ann.publish('family', `m${i}`);
    if (i % 15 === 0) {
      const connects = bob.connects;
      bobSent.push(bob.publish('family', `bob ${i} a`)); // likely in flight at the cut
      proxy.cut(); // bob's link drops mid-stream...
      bobSent.push(bob.publish('family', `bob ${i} b`)); // ...while he publishes again
      await until(bob, () => bob.state === 'open' && bob.connects > connects, 'bob reconnects');
    }
  }
  const bobSeqs = /** @type {number[]} */ (await Promise.all(bobSent));
  const fromAnn = () => bobGot.filter((m) => m.sender === 'ann');
  await until(bob, () => fromAnn().length === total, `bob holds all ${total}`);
  assert.equal(bob.connects, 5);
  // Every message of ann's exactly once, in order.
  assert.deepEqual(fromAnn().map((m) => m.text), Array.from({ length: total }, (_, i) => `m${i + 1}`));
  // No sequence twice, none out of order, none lost: what bob did not receive is his own
  // (a PUBACK of his stands for it). A message of his that was in flight at a cut is
  // republished with its msg_id (version 2, PROTOCOL.md §12): stored once, but it may come
  // back to him on resume when his cursor was before it.
  const seqs = bobGot.map((m) => /** @type {number} */ (m.seq));
  assert.deepEqual(seqs, [...new Set(seqs)].sort((a, b) => a - b));
  const held = new Set([...seqs, ...bobSeqs]);
  const head = Math.max(...held);
  assert.deepEqual(Array.from({ length: head }, (_, i) => i + 1).filter((s) => !held.has(s)), []);
  assert.equal(bob.rooms()[0].cursor >= seqs[seqs.length - 1], true);
});

test('v2: a publish whose PUBACK was lost is republished and stored once', async (t) => {
  const relay = await startRelay(t);
  const proxy = await startProxy(t, relay.wsAddr);
  const ann = client(t, proxy.url, 'ann');
  const bob = client(t, relay.wsUrl, 'bob');
  const bobGot = inbox(bob);
  await ann.join('family');
  await bob.join('family');
  // Version 3 keeps version 2's idempotent publish unchanged.
  assert.equal(ann.welcome?.version, 3);
  /** @type {number[]} */
  const pubacks = [];
  ann.on('puback', (p) => pubacks.push(p.msgId));

  // The relay's answers stop reaching ann: her PUBLISH arrives, its PUBACK does not.
  proxy.mute();
  const connects = ann.connects;
  const sent = ann.publish('family', 'exactly once');
  await until(bob, () => bobGot.length === 1, 'the relay stored it and bob got it');
  assert.deepEqual(pubacks, []);
  proxy.cut();
  await until(ann, () => ann.state === 'open' && ann.connects > connects, 'ann reconnects');

  // The republish (same msg_id) is answered with the original sequence, stored nothing new.
  const seq = await sent;
  assert.equal(seq, bobGot[0].seq);
  assert.equal(ann.snapshot().lastMsgId, 1, 'one msg_id for the message, sent twice');
  const next = await ann.publish('family', 'after');
  assert.equal(next, /** @type {number} */ (seq) + 1, 'no second copy took a sequence');
  await until(bob, () => bobGot.some((m) => m.text === 'after'), 'bob gets the next message');
  assert.deepEqual(bobGot.map((m) => [m.text, m.seq]), [['exactly once', seq], ['after', next]]);
});

test('v3: READ moves the reader\'s marker and the other member gets a RECEIPT', async (t) => {
  const relay = await startRelay(t, { toml: '[receipts]\ninterval = "20ms"' });
  const ann = client(t, relay.wsUrl, 'ann');
  const bob = client(t, relay.wsUrl, 'bob');
  const bobGot = inbox(bob);
  await ann.join('family');
  await bob.join('family');
  assert.equal(bob.welcome?.version, 3);
  /** @type {{ user: string, delivered: number, read: number }[]} */
  const seen = [];
  ann.on('receipt', (r) => seen.push(...r.members));
  const seq = /** @type {number} */ (await ann.publish('family', 'dinner at 7?'));
  await until(bob, () => bobGot.length === 1, 'bob receives');
  // bob's client acknowledges what it received (delivered); then bob reads it.
  assert.equal(bob.read('family', seq), true);
  await until(ann, () => seen.some((m) => m.user === 'bob' && m.read === seq && m.delivered === seq), 'ann hears bob read it');
  assert.equal(ann.read('nowhere', 1), false, 'not a bound room');
});

test('a GOAWAY retry hint is waited out before reconnecting', async (t) => {
  // One connection at most: a second one is shed with GOAWAY(overload) and a retry hint
  // spread over [1 s, 3 s).
  const relay = await startRelay(t, {
    limits: 'max_connections = 1',
    toml: '[shutdown]\nreconnect_spread = "2s"\n',
  });
  const proxy = await startProxy(t, relay.wsAddr);
  const ann = client(t, relay.wsUrl, 'ann');
  await until(ann, () => ann.state === 'open', 'ann holds the only slot');

  const bob = client(t, proxy.url, 'bob', { random: () => 0 });
  /** @type {{ at: number, goaway: import('../index').GoAwayEvent }[]} */
  const goaways = [];
  bob.on('goaway', (goaway) => goaways.push({ at: Date.now(), goaway }));
  /** @type {number[]} */
  const delays = [];
  bob.on('reconnecting', (r) => delays.push(r.delayMs));
  await until(bob, () => goaways.length >= 2, 'two GOAWAYs');
  ann.close(); // the slot frees up
  await until(bob, () => bob.state === 'open', 'bob gets in');

  for (const [i, { at, goaway }] of goaways.entries()) {
    assert.equal(goaway.reason, GoAwayReason.OVERLOAD);
    assert.ok(goaway.retryAfterMs >= 1000, `hint ${goaway.retryAfterMs}`);
    // The reconnect waited at least the hint (with jitter drawn as 0 here)...
    assert.ok(delays[i] >= goaway.retryAfterMs, `delay ${delays[i]} < hint ${goaway.retryAfterMs}`);
    // ...and the proxy saw the next connection no earlier than that.
    const next = proxy.connectTimes[i + 1];
    assert.ok(next - at >= goaway.retryAfterMs, `reconnected after ${next - at} ms, hint ${goaway.retryAfterMs}`);
  }
});

test('malformed input from the wire ends the connection, and the resume loses nothing', async (t) => {
  const relay = await startRelay(t);
  const proxy = await startProxy(t, relay.wsAddr);
  const ann = client(t, relay.wsUrl, 'ann');
  const bob = client(t, proxy.url, 'bob');
  const bobGot = inbox(bob);
  /** @type {Error[]} */
  const errors = [];
  bob.on('error', (e) => errors.push(e.error));
  await ann.join('hiking-club');
  await bob.join('hiking-club');
  await ann.publish('hiking-club', 'before');
  await until(bob, () => bobGot.length === 1, 'the first message');

  // A reserved frame type, then a non-canonical length, each in a message of the relay's.
  for (const [i, garbage] of [[0x01, 0x1f], [0x81, 0x00]].entries()) {
    const connects = bob.connects;
    proxy.inject(Uint8Array.from(garbage));
    await until(bob, () => errors.length === i + 1 && bob.state === 'open' && bob.connects > connects, 'bob reconnects');
    await ann.publish('hiking-club', `after ${i}`);
  }
  await until(bob, () => bobGot.length === 3, 'everything arrives');
  assert.deepEqual(bobGot.map((m) => m.text), ['before', 'after 0', 'after 1']);
  assert.deepEqual(errors.map((e) => e instanceof FrameError && e.kind), ['unknown_frame_type', 'non_canonical_varint']);
});

test('relay heartbeats are answered, so an idle connection stays up', async (t) => {
  const relay = await startRelay(t, {
    toml: '[heartbeat]\ninterval = "1s"\nmin_interval = "1s"\ntimeout = "2s"\n',
  });
  const ann = client(t, relay.wsUrl, 'ann', { heartbeatSecs: 1 });
  await until(ann, () => ann.state === 'open', 'ann connects');
  assert.equal(ann.welcome?.heartbeatSecs, 1);
  const states = [];
  ann.on('state', (s) => states.push(s.state));
  // Several intervals of silence: the relay pings after a second of it and closes a client
  // that stays silent two seconds more; this one answers every PING.
  await new Promise((resolve) => setTimeout(resolve, 5000));
  assert.deepEqual(states, []);
  assert.equal(ann.connects, 1);
});

test('after GOAWAY Kicked the client does not reconnect on its own', async (t) => {
  const relay = await startRelay(t);
  const ann = client(t, relay.wsUrl, 'ann');
  await until(ann, () => ann.state === 'open', 'ann connects');
  /** @type {(string | null)[]} */
  const reasons = [];
  ann.on('state', (s) => reasons.push(s.reason));
  await relay.api('POST', '/v1/users/ann/disconnect');
  await until(ann, () => ann.state === 'closed', 'ann is closed');
  assert.deepEqual(reasons, ['kicked']);
  // Until the app calls connect() again (with a fresh token), nothing more happens.
  await new Promise((resolve) => setTimeout(resolve, 500));
  assert.equal(ann.connects, 1);
  ann.connect();
  await until(ann, () => ann.state === 'open', 'ann reconnects when asked');
});

test('failed reconnects back off exponentially with full jitter, up to the cap', async (t) => {
  const relay = await startRelay(t);
  const ann = client(t, relay.wsUrl, 'ann', { random: () => 0.999 });
  await until(ann, () => ann.state === 'open', 'ann connects');
  /** @type {number[]} */
  const delays = [];
  ann.on('reconnecting', (r) => delays.push(r.delayMs));
  await relay.stop(); // every reconnect now fails
  await until(ann, () => delays.length >= 6, 'six attempts');
  // base 50 ms, cap 500 ms: the window doubles per failure; the draw is 0.999 of it.
  assert.deepEqual(delays.slice(0, 6), [50, 100, 200, 400, 500, 500].map((w) => Math.floor(0.999 * w)));
});
