// Malformed relay input (PROTOCOL.md §3, §4): each rule of the decoder refuses its input with
// a typed FrameError, and no byte string makes it throw anything else or hang.

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { FrameDecoder, FrameError, v1 } from '../src/index.js';

const decode = (/** @type {number[]} */ bytes, limits = {}) => new FrameDecoder(v1, limits).push(Uint8Array.from(bytes));

/** [name, bytes, kind] */
const CASES = [
  ['non-canonical length', [0x81, 0x00, 0x06], 'non_canonical_varint'],
  ['overflowing length', [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02], 'varint_overflow'],
  ['eleven-byte varint', [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x81, 0x00], 'varint_overflow'],
  ['empty frame', [0x00], 'empty_frame'],
  ['a client frame type (HELLO) from the relay', [0x01, 0x01], 'unknown_frame_type'],
  ['a reserved frame type', [0x01, 0x1f], 'unknown_frame_type'],
  ['an undefined flag on PUBACK', [0x03, 0x33, 0x05, 0x2a], 'undefined_flags'],
  ['DELIVER with EPHEMERAL and SEQ', [0x06, 0xb4, 0x00, 0x01, 0x00, 0x00, 0x01], 'undefined_flags'],
  ['a truncated PUBACK', [0x02, 0x13, 0x05], 'truncated'],
  ['trailing bytes after GAP', [0x06, 0x15, 0x01, 0x08, 0xef, 0x07, 0x00], 'trailing_bytes'],
  ['a non-canonical field', [0x04, 0x13, 0x85, 0x00, 0x2a], 'non_canonical_varint'],
  ['an alias past 32 bits', [0x08, 0x12, 0x80, 0x80, 0x80, 0x80, 0x10, 0x00, 0x00], 'out_of_range'],
  ['GAP from 0', [0x04, 0x15, 0x01, 0x00, 0x05], 'out_of_range'],
  ['GAP to below from', [0x04, 0x15, 0x01, 0x05, 0x04], 'out_of_range'],
  ['ROOM head below cursor', [0x0e, 0x11, 0x00, 1, 2, 3, 4, 5, 6, 7, 8, 0x01, 0x05, 0x04, 0x01, 0x61], 'out_of_range'],
  ['an empty user name in WELCOME', [0x07, 0x10, 0x01, 0x01, 0x01, 0x00, 0x00, 0x00], 'empty_name'],
  ['invalid UTF-8', [0x06, 0x16, 0x01, 0x00, 0x02, 0xc3, 0x28], 'invalid_utf8'],
  ['an ERROR text past max_text_len', [0x05, 0x16, 0x01, 0x00, 0x81, 0x08], 'too_long'],
  ['a sequence past 2^53-1', [0x0b, 0x13, 0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], 'out_of_range'],
];

for (const [name, bytes, kind] of CASES) {
  test(`refuses ${name}`, () => {
    assert.throws(() => decode(bytes), (e) => e instanceof FrameError && e.kind === kind);
  });
}

test('a length above the frame limit is refused before its body arrives', () => {
  const d = new FrameDecoder(v1, { maxFrameLen: 100 });
  // 101 announced, one byte of body so far.
  assert.throws(() => d.push(Uint8Array.of(0x65, 0x14)), (e) => e instanceof FrameError && e.kind === 'frame_too_large');
});

test('WELCOME raises the frame limit, never lowers it', () => {
  const d = new FrameDecoder(v1, { maxFrameLen: 100 });
  d.allowFrameLen(50);
  assert.equal(d.limits.maxFrameLen, 100);
  d.allowFrameLen(200);
  assert.equal(d.limits.maxFrameLen, 200);
});

test('after one error the stream stays dead', () => {
  const d = new FrameDecoder(v1);
  assert.throws(() => d.push(Uint8Array.of(0x00)));
  assert.throws(() => d.push(Uint8Array.of(0x01, 0x06)), (e) => e instanceof FrameError && e.kind === 'dead_stream');
});

test('a partial frame waits for the rest', () => {
  const d = new FrameDecoder(v1);
  assert.deepEqual(d.push(Uint8Array.of(0x03, 0x13)), []);
  assert.deepEqual(d.push(Uint8Array.of(0x05, 0x2a)), [{ type: 'puback', msgId: 5, seq: 42 }]);
});

test('random bytes only ever raise FrameError', () => {
  // A fixed-seed generator, so a failure reproduces.
  let state = 0x2545f491;
  const next = () => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return state >>> 0;
  };
  let refused = 0;
  for (let i = 0; i < 20_000; i++) {
    const len = 1 + (next() % 24);
    const bytes = Uint8Array.from({ length: len }, (_, j) => (j === 0 ? next() % 24 : next() & 0xff));
    try {
      new FrameDecoder(v1).push(bytes);
    } catch (e) {
      assert.ok(e instanceof FrameError, `${e} for ${Buffer.from(bytes).toString('hex')}`);
      refused++;
    }
  }
  assert.ok(refused > 0);
});
