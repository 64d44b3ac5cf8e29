// The golden fixtures of codec/PROTOCOL.md (codec/testdata/*.bin, the bytes the Rust codec is
// tested against): every client frame this package encodes must produce them byte for byte,
// and every relay frame must decode to the values PROTOCOL.md's tables give.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import { FrameDecoder, roomId, v1, v2, v3 } from '../src/index.js';

const TESTDATA = fileURLToPath(new URL('../../../codec/testdata/', import.meta.url));
const fixture = (/** @type {string} */ name) => new Uint8Array(readFileSync(`${TESTDATA}${name}.bin`));
const utf8 = (/** @type {string} */ s) => new TextEncoder().encode(s);
const decodeOne = (/** @type {Uint8Array} */ bytes) => {
  const frames = new FrameDecoder(v1).push(bytes);
  assert.equal(frames.length, 1);
  return frames[0];
};

const HIKING = roomId(false, 'hiking-club');
const FAMILY = roomId(false, 'family');
const COFFEE = roomId(true, 'coffee-news');

/** Client → relay fixtures and how this package builds them. */
const ENCODED = {
  hello: () => v1.encodeHello({ heartbeatSecs: 0, token: utf8('ann'), resume: [] }),
  hello_resume: () =>
    v1.encodeHello({
      heartbeatSecs: 600,
      token: utf8('bob'),
      resume: [
        { roomId: HIKING, epoch: 1_767_225_600_000n, lastSeq: 41 },
        { roomId: FAMILY, epoch: 1_767_225_600_000n, lastSeq: 7 },
        { roomId: COFFEE, epoch: 1_766_000_000_000n, lastSeq: 300 },
      ],
    }),
  hello_v2_device: () =>
    v2.encodeHello({
      heartbeatSecs: 600,
      token: utf8('bob'),
      deviceId: 0x5eed0fb0b5eed001n,
      resume: [{ roomId: HIKING, epoch: 1_767_225_600_000n, lastSeq: 41 }],
    }),
  hello_v3: () =>
    v3.encodeHello({ heartbeatSecs: 600, token: utf8('bob'), deviceId: 0x5eed0fb0b5eed001n, resume: [] }),
  read: () => v3.encodeRead({ alias: 0, seq: 42 }),
  subscribe: () => v1.encodeSubscribe('coffee-news', false),
  unsubscribe_block: () => v1.encodeUnsubscribe(3, true),
  publish: () => v1.encodePublish({ alias: 2, msgId: 5, ack: null, payload: utf8('see you at 7 tonight') }),
  publish_with_ack: () => v1.encodePublish({ alias: 2, msgId: 6, ack: 43, payload: utf8('ok!') }),
  publish_ephemeral: () => v1.encodePublish({ alias: 2, msgId: null, ack: null, payload: Uint8Array.of(1) }),
  ack: () => v1.encodeAck([{ alias: 0, seq: 42 }, { alias: 1, seq: 1007 }]),
  ping: () => v1.encodePing(null),
  ping_interval: () => v1.encodePing(1200),
  pong: () => v1.encodePong(null),
  bye: () => v1.encodeBye(),
};

/** Relay → client fixtures and the values of PROTOCOL.md §8. */
const DECODED = {
  welcome: { type: 'welcome', version: 1, connId: 42n, serverTimeMs: 1_767_229_200_000, heartbeatSecs: 600, maxFrameLen: 65536, user: 'bob' },
  welcome_v2: { type: 'welcome', version: 2, connId: 42n, serverTimeMs: 1_767_229_200_000, heartbeatSecs: 600, maxFrameLen: 65536, user: 'bob' },
  room: { type: 'room', alias: 2, roomId: COFFEE, epoch: 1_767_225_600_000n, cursor: 0, head: 120, name: 'coffee-news', channel: true },
  left: { type: 'left', alias: 1, reason: 3 },
  left_restarted: { type: 'left', alias: 0, reason: 4 },
  puback: { type: 'puback', msgId: 5, seq: 42 },
  deliver_new_sender: { type: 'deliver', alias: 0, seq: null, senderAlias: 0, sender: 'ann', tsDeltaMs: 1234, ephemeral: false, payload: utf8('see you at 7 tonight') },
  deliver_implicit: { type: 'deliver', alias: 0, seq: null, senderAlias: 0, sender: null, tsDeltaMs: 1234, ephemeral: false, payload: utf8('see you at 7 tonight') },
  deliver_seq: { type: 'deliver', alias: 0, seq: 44, senderAlias: 1, sender: null, tsDeltaMs: -20, ephemeral: false, payload: utf8('ok') },
  deliver_ephemeral: { type: 'deliver', alias: 0, seq: null, senderAlias: 0, sender: null, tsDeltaMs: 0, ephemeral: true, payload: Uint8Array.of(1) },
  gap: { type: 'gap', alias: 1, from: 8, to: 1007 },
  error: { type: 'error', fatal: false, code: 19, reference: 9, message: 'alias 7 is not bound' },
  error_fatal: { type: 'error', fatal: true, code: 3, reference: 0, message: 'speaks 1' },
  goaway: { type: 'goaway', reason: 1, retryAfterMs: 17_250, message: 'restart' },
  ping: { type: 'ping', intervalSecs: null },
  pong: { type: 'pong', intervalSecs: null },
  pong_interval: { type: 'pong', intervalSecs: 1200 },
};

/** Version 3's relay frames: decoded by v3's decoder only. */
const DECODED_V3 = {
  welcome_v3: { type: 'welcome', version: 3, connId: 42n, serverTimeMs: 1_767_229_200_000, heartbeatSecs: 600, maxFrameLen: 65536, user: 'bob' },
  receipt: {
    type: 'receipt',
    alias: 0,
    entries: [
      { memberAlias: 2, name: 'cat', delivered: 42, read: 40 },
      { memberAlias: 0, name: null, delivered: 42, read: 42 },
    ],
  },
};

for (const [name, expected] of Object.entries(DECODED_V3)) {
  test(`decodes fixture ${name} (version 3)`, () => {
    assert.deepEqual(new FrameDecoder(v3).push(fixture(name)), [expected]);
  });
}

test('version 3 decodes every earlier relay fixture as version 1 does; RECEIPT is unknown before it', () => {
  for (const [name, expected] of Object.entries(DECODED)) {
    assert.deepEqual(new FrameDecoder(v3).push(fixture(name)), [expected], name);
  }
  assert.throws(() => new FrameDecoder(v2).push(fixture('receipt')), /unknown frame type 0x18/);
  // An unread above delivered, and a RECEIPT without entries, are malformed.
  assert.throws(() => new FrameDecoder(v3).push(Uint8Array.of(0x05, 0x18, 0x00, 0x00, 0x03, 0x04)), /unread/);
  assert.throws(() => new FrameDecoder(v3).push(Uint8Array.of(0x02, 0x18, 0x00)), /without entries/);
});

for (const [name, encode] of Object.entries(ENCODED)) {
  test(`encodes fixture ${name}`, () => {
    assert.deepEqual(encode(), fixture(name));
  });
}

for (const [name, expected] of Object.entries(DECODED)) {
  test(`decodes fixture ${name}`, () => {
    assert.deepEqual(decodeOne(fixture(name)), expected);
  });
}

test('version 2 changes only HELLO: its version byte and the DEVICE flag with the device id', () => {
  const hello = { heartbeatSecs: 0, token: utf8('ann'), resume: [] };
  // Without a device id a v2 HELLO is v1's with version 2; v1 never writes a device id.
  assert.deepEqual(v2.encodeHello(hello), Uint8Array.of(0x07, 0x01, 0x02, 0x00, 0x03, 0x61, 0x6e, 0x6e));
  assert.deepEqual(v1.encodeHello({ ...hello, deviceId: 7n }), fixture('hello'));
  assert.deepEqual(v2.encodeHello({ ...hello, deviceId: 1n }).subarray(0, 3), Uint8Array.of(0x0f, 0x41, 0x02));
  assert.equal(v2.encodePublish, v1.encodePublish);
  assert.equal(v2.decodeRelayFrame, v1.decodeRelayFrame);
  assert.deepEqual([v1.DEVICE, v2.DEVICE], [false, true]);
  // Decoding is shared: v2's decoder reads every relay fixture as v1's does.
  for (const [name, expected] of Object.entries(DECODED)) {
    assert.deepEqual(new FrameDecoder(v2).push(fixture(name)), [expected], name);
  }
});

test('every fixture in codec/testdata is covered', () => {
  const names = readdirSync(TESTDATA).filter((f) => f.endsWith('.bin')).map((f) => f.slice(0, -4));
  const covered = new Set([...Object.keys(ENCODED), ...Object.keys(DECODED), ...Object.keys(DECODED_V3)]);
  assert.deepEqual(names.filter((n) => !covered.has(n)), []);
});

test('room ids are the test vectors of PROTOCOL.md §9', () => {
  assert.equal(roomId(false, ''), 0xaf63ef4c86020cd5n);
  assert.equal(HIKING, 0x631ed6d8da58e40cn);
  assert.equal(COFFEE, 0x2281d104ec84e802n);
});

test('the whole fixture stream decodes the same however it is cut', () => {
  const names = Object.keys(DECODED);
  const stream = Buffer.concat(names.map((n) => fixture(n)));
  for (let cut = 1; cut <= stream.length; cut++) {
    const d = new FrameDecoder(v1);
    const frames = [];
    for (let i = 0; i < stream.length; i += cut) {
      frames.push(...d.push(new Uint8Array(stream.subarray(i, i + cut))));
    }
    assert.deepEqual(frames, names.map((n) => DECODED[n]), `cut every ${cut} bytes`);
    assert.equal(d.buffered(), 0);
  }
});
