// PabalClient's version 2 without a socket (PROTOCOL.md §5, §12, §17 item 7): a fake WebSocket
// stands in for the relay, so the test sees every byte the client sends. A message whose
// PUBACK did not come before the connection ended is republished with the same msg_id on the
// next version-2 connection (the relay then answers with the original PUBACK); the HELLO
// carries the device id; a relay that refuses version 2 gets version 1 and fresh ids.

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { PabalClient, roomId } from '../src/index.js';
import { Writer } from '../src/wire.js';

const HIKING = roomId(false, 'hiking-club');
const EPOCH = 1_767_225_600_000n;

/** A WebSocket the test drives: it records what the client sends. */
class FakeSocket {
  /** @type {FakeSocket[]} */
  static all = [];
  /** @param {string} url */
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    /** @type {Uint8Array[]} */
    this.sent = [];
    /** @type {any} */ this.onopen = null;
    /** @type {any} */ this.onmessage = null;
    /** @type {any} */ this.onclose = null;
    /** @type {any} */ this.onerror = null;
    FakeSocket.all.push(this);
  }
  open() {
    this.readyState = 1;
    this.onopen?.();
  }
  /** @param {Uint8Array} frame */
  send(frame) {
    this.sent.push(frame);
  }
  /** @param {Uint8Array} bytes relay frames */
  receive(bytes) {
    this.onmessage?.({ data: bytes.slice().buffer });
  }
  close() {
    this.readyState = 3;
  }
  /** The connection drops (the relay→client stream ends). */
  drop() {
    this.readyState = 3;
    this.onclose?.({ code: 1006 });
  }
  /** The client frames sent so far, as [type byte, ...body] without the length. */
  frames() {
    return this.sent.map((f) => [...f.subarray(1)]); // every frame here is < 128 bytes
  }
}

const welcome = (/** @type {number} */ version) =>
  new Writer().u8(0x10).u8(version).varint(1).varint(1_767_229_200_000).varint32(600).varint32(65536).string('bob').frame();
const room = (/** @type {number} */ cursor) =>
  new Writer().u8(0x11).varint32(0).u64le(HIKING).varint(EPOCH).varint(cursor).varint(cursor).string('hiking-club').frame();
const puback = (/** @type {number} */ msgId, /** @type {number} */ seq) => new Writer().u8(0x13).varint(msgId).varint(seq).frame();
const unsupported = () => new Writer().u8(0x36).varint(3).varint(0).string('speaks 1').frame();

/** Waits until the client has opened `n` sockets (reconnects run on timers). */
async function sockets(/** @type {number} */ n) {
  for (let i = 0; i < 200 && FakeSocket.all.length < n; i++) await new Promise((r) => setTimeout(r, 5));
  assert.equal(FakeSocket.all.length, n, `${n} connections`);
  return /** @type {FakeSocket} */ (FakeSocket.all[n - 1]);
}

/** @param {Partial<import('../index').ClientOptions>} extra */
function fakeClient(extra = {}) {
  FakeSocket.all = [];
  const c = new PabalClient({
    url: 'ws://relay.test',
    token: 'bob',
    WebSocket: /** @type {any} */ (FakeSocket),
    backoffBaseMs: 1,
    random: () => 0,
    ...extra,
  });
  c.connect();
  return c;
}

const PUBLISH = 0x04;
/** msg_ids of the PUBLISH frames a socket carried (alias 0, ids < 128). */
const publishedIds = (/** @type {FakeSocket} */ ws) => ws.frames().filter((f) => (f[0] & 0x1f) === PUBLISH).map((f) => f[2]);

test('v2: an unacknowledged publish keeps its msg_id across a reconnect', async (t) => {
  const c = fakeClient({ deviceId: 0x5eed0fb0b5eed001n, lastMsgId: 9, versions: [2, 1] });
  t.after(() => c.close());
  const first = await sockets(1);
  first.open();
  const hello = first.frames()[0];
  // HELLO + DEVICE (0x41), version 2, heartbeat 0, token "bob", then the device id.
  assert.deepEqual(hello, [0x41, 2, 0, 3, 0x62, 0x6f, 0x62, 0x01, 0xd0, 0xee, 0xb5, 0xb0, 0x0f, 0xed, 0x5e]);
  first.receive(welcome(2));
  first.receive(room(0));
  const published = c.publish('hiking-club', 'see you at 7 tonight');
  assert.deepEqual(publishedIds(first), [10], 'the device counter goes on from the app\'s 9');

  // The PUBLISH left, but the connection ends before its PUBACK.
  first.drop();
  const second = await sockets(2);
  second.open();
  assert.deepEqual(second.frames()[0].slice(0, 2), [0x61, 2], 'HELLO v2 + RESUME + DEVICE');
  second.receive(welcome(2));
  assert.deepEqual(publishedIds(second), [10], 'republished with the same msg_id');
  second.receive(puback(10, 1)); // the relay's original answer
  assert.equal(await published, 1);
  assert.deepEqual(c.snapshot().lastMsgId, 10);
  assert.equal(c.snapshot().deviceId, '5eed0fb0b5eed001');

  // The next message takes a new id, and a reloaded client continues the counter.
  c.publish('hiking-club', 'ok');
  assert.deepEqual(publishedIds(second), [10, 11]);
  const snap = JSON.parse(JSON.stringify(c.snapshot()));
  c.close();
  const reloaded = fakeClient({ snapshot: snap, versions: [2, 1] });
  t.after(() => reloaded.close());
  const ws = await sockets(1);
  ws.open();
  assert.deepEqual(ws.frames()[0].slice(7, 15), [0x01, 0xd0, 0xee, 0xb5, 0xb0, 0x0f, 0xed, 0x5e]);
  ws.receive(welcome(2));
  // The unacknowledged "ok" of the closed client is gone with it; a new message gets 12.
  reloaded.publish('hiking-club', 'again');
  assert.deepEqual(publishedIds(ws), [12]);
});

test('a relay that refuses v3 and v2 gets v1 without a device id, and republishes take fresh ids', async (t) => {
  const c = fakeClient({ deviceId: 5n });
  t.after(() => c.close());
  const zeroth = await sockets(1);
  zeroth.open();
  assert.deepEqual(zeroth.frames()[0].slice(0, 2), [0x41, 3], 'HELLO v3 + DEVICE first');
  zeroth.receive(unsupported());
  const first = await sockets(2);
  first.open();
  assert.deepEqual(first.frames()[0].slice(0, 2), [0x41, 2], 'then v2, still with the device id');
  first.receive(unsupported());
  const second = await sockets(3);
  second.open();
  assert.deepEqual(second.frames()[0], [0x01, 1, 0, 3, 0x62, 0x6f, 0x62], 'HELLO v1, no DEVICE');
  second.receive(welcome(1));
  second.receive(room(0));
  c.publish('hiking-club', 'hi');
  assert.deepEqual(publishedIds(second), [1]);
  second.drop();
  const third = await sockets(4);
  third.open();
  assert.equal(third.frames()[0][1], 1, 'stays on version 1');
  third.receive(welcome(1));
  assert.deepEqual(publishedIds(third), [2], 'version 1: a fresh msg_id');
});

test('a random device id per client when the app passes none', () => {
  const a = new PabalClient({ url: 'ws://x', token: 'a', WebSocket: /** @type {any} */ (FakeSocket) });
  const b = new PabalClient({ url: 'ws://x', token: 'a', WebSocket: /** @type {any} */ (FakeSocket) });
  assert.match(a.deviceId, /^[0-9a-f]{16}$/);
  assert.notEqual(a.deviceId, b.deviceId);
  assert.equal(new PabalClient({ url: 'ws://x', token: 'a', WebSocket: /** @type {any} */ (FakeSocket), snapshot: a.snapshot() }).deviceId, a.deviceId);
});
