// The session rules without a socket (PROTOCOL.md §6, §9, §10): resume bindings, cursor
// moves, own sequences, GAP, LEFT, sender aliases and time deltas, and every violation
// refused as a SessionError rather than skipped.

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { LeftReason, Session, SessionError, roomId } from '../src/index.js';

const HIKING = roomId(false, 'hiking-club');
const EPOCH = 1_767_225_600_000n;
const welcome = { type: 'welcome', version: 1, connId: 1n, serverTimeMs: 1000, heartbeatSecs: 240, maxFrameLen: 65536, user: 'bob' };
const room = (/** @type {number} */ alias, cursor = 0, epoch = EPOCH, head = cursor) => ({
  type: 'room', alias, roomId: HIKING, epoch, cursor, head, name: 'hiking-club', channel: false,
});
const deliver = (/** @type {number | null} */ seq, sender = /** @type {string | null} */ ('ann'), tsDeltaMs = 5) => ({
  type: 'deliver', alias: 0, seq, senderAlias: 0, sender, tsDeltaMs, ephemeral: false, payload: new Uint8Array(),
});
const breaks = (/** @type {() => unknown} */ f, kind = 'sequence_break') =>
  assert.throws(f, (e) => e instanceof SessionError && e.kind === kind);

/** A session bound to hiking-club on alias 0 at `cursor`. */
function bound(cursor = 0) {
  const s = new Session();
  s.startConnection();
  s.apply(/** @type {any} */ (welcome));
  s.apply(/** @type {any} */ (room(0, cursor)));
  return s;
}

test('nothing but WELCOME, ERROR or GOAWAY before WELCOME', () => {
  const s = new Session();
  s.startConnection();
  breaks(() => s.apply(/** @type {any} */ (room(0))), 'before_welcome');
});

test('implicit sequences follow the cursor; times add up and never go below 0', () => {
  const s = bound(41);
  const first = s.apply(/** @type {any} */ (deliver(null)));
  assert.equal(first.type === 'message' && first.seq, 42);
  assert.equal(first.type === 'message' && first.timeMs, 1005);
  const second = s.apply(/** @type {any} */ (deliver(null, null, -5000)));
  assert.equal(second.type === 'message' && second.seq, 43);
  assert.equal(second.type === 'message' && second.timeMs, 0);
  assert.equal(s.room(HIKING)?.cursor, 43);
});

test('an explicit sequence may skip only own sequences', () => {
  const s = bound(41);
  s.publish(HIKING); // msg 1
  s.publish(HIKING); // msg 2
  s.apply({ type: 'puback', msgId: 2, seq: 43 }); // not contiguous: own
  s.apply({ type: 'puback', msgId: 1, seq: 42 }); // contiguous: the cursor moves
  assert.equal(s.room(HIKING)?.cursor, 42);
  const m = s.apply(/** @type {any} */ (deliver(44)));
  assert.equal(m.type === 'message' && m.seq, 44);
  breaks(() => s.apply(/** @type {any} */ (deliver(46)))); // 45 is not ours
  breaks(() => s.apply(/** @type {any} */ (deliver(44)))); // a repeat
});

test('the next connection resumes past own sequences right after the cursor', () => {
  // A PUBACK before the DELIVER of the sequence under it (a cluster's other node's message
  // on its way): the cursor follows the relay's numbering while the connection lives, and
  // the next one resumes after the client's own 43 and 44.
  const s = bound(41);
  s.publish(HIKING); // msg 1
  s.publish(HIKING); // msg 2
  s.apply({ type: 'puback', msgId: 1, seq: 43 }); // 42 not here yet: own
  s.apply(/** @type {any} */ (deliver(null))); // 42
  s.apply({ type: 'puback', msgId: 2, seq: 44 }); // own
  assert.equal(s.room(HIKING)?.cursor, 42);
  assert.equal(s.snapshot().rooms[0].cursor, 44);
  // The relay numbers a GAP from its cursor, at the client's own 43.
  const lagging = bound(41);
  lagging.publish(HIKING);
  lagging.apply({ type: 'puback', msgId: 1, seq: 43 });
  lagging.apply(/** @type {any} */ (deliver(null)));
  assert.equal(lagging.apply({ type: 'gap', alias: 0, from: 43, to: 50 }).type, 'gap');
  s.endConnection();
  assert.deepEqual(s.startConnection(), [{ roomId: HIKING, epoch: EPOCH, lastSeq: 44 }]);
});

test('own sequences the PUBACKs moved the cursor past stay own for a rebinding below them', () => {
  // On a cluster a rejoin's join point (42) can lie below an own sequence whose PUBACK moved
  // the cursor on the old binding (43); the relay skips it on the new binding too.
  const s = bound(41);
  s.publish(HIKING); // msg 1
  s.publish(HIKING); // msg 2
  s.apply({ type: 'puback', msgId: 1, seq: 42 });
  s.apply({ type: 'puback', msgId: 2, seq: 43 });
  assert.equal(s.room(HIKING)?.cursor, 43);
  s.apply({ type: 'left', alias: 0, reason: LeftReason.REMOVED });
  s.apply(/** @type {any} */ (room(0, 42)));
  const m = s.apply(/** @type {any} */ (deliver(44)));
  assert.equal(m.type === 'message' && m.seq, 44);
  // Passed by a delivery too, they stay the connection's own: another rebinding from 42
  // skips 43 again; anything else is refused, however far the sequence jumps.
  s.apply(/** @type {any} */ (room(0, 42)));
  const again = s.apply(/** @type {any} */ (deliver(44)));
  assert.equal(again.type === 'message' && again.seq, 44);
  breaks(() => s.apply(/** @type {any} */ (deliver(Number.MAX_SAFE_INTEGER))));
});

test('an undefined sender alias is a violation', () => {
  const s = bound();
  breaks(() => s.apply(/** @type {any} */ (deliver(null, null))), 'unknown_sender');
});

test('GAP must start right after the cursor', () => {
  const s = bound(7);
  breaks(() => bound(7).apply({ type: 'gap', alias: 0, from: 9, to: 20 }));
  const g = s.apply({ type: 'gap', alias: 0, from: 8, to: 1007 });
  assert.equal(g.type, 'gap');
  assert.equal(s.room(HIKING)?.cursor, 1007);
});

test('the resume list binds entry i to alias i, grouped by epoch, and keeps cursors', () => {
  const s = bound();
  s.apply(/** @type {any} */ (deliver(null)));
  assert.deepEqual(s.endConnection(), []);
  const entries = s.startConnection();
  assert.deepEqual(entries, [{ roomId: HIKING, epoch: EPOCH, lastSeq: 1 }]);
  s.apply(/** @type {any} */ (welcome));
  // Resumed cleanly: the next DELIVER continues the stream with no ROOM.
  const m = s.apply(/** @type {any} */ (deliver(null)));
  assert.equal(m.type === 'message' && m.seq, 2);
});

test('a ROOM in a new epoch says what was lost', () => {
  const s = bound(41);
  const e = s.apply(/** @type {any} */ (room(0, 0, EPOCH + 1n, 120)));
  assert.deepEqual(e.type === 'room' && e.lost, { epoch: EPOCH, after: 41 });
  assert.equal(s.room(HIKING)?.cursor, 0);
});

test('LEFT Restarted keeps the room for the next resume; LEFT UnknownRoom drops it', () => {
  const s = bound(5);
  s.apply({ type: 'left', alias: 0, reason: LeftReason.RESTARTED });
  breaks(() => s.apply(/** @type {any} */ (deliver(null))), 'unknown_alias');
  s.endConnection();
  assert.equal(s.startConnection().length, 1);
  s.apply(/** @type {any} */ (welcome));
  s.apply({ type: 'left', alias: 0, reason: LeftReason.UNKNOWN_ROOM });
  s.endConnection();
  assert.deepEqual(s.startConnection(), []);
});

test('a snapshot restores rooms, epochs and cursors', () => {
  const s = bound(41);
  const again = new Session(JSON.parse(JSON.stringify(s.snapshot())));
  assert.deepEqual(again.startConnection(), [{ roomId: HIKING, epoch: EPOCH, lastSeq: 41 }]);
});

test('cumulative acks: one pair per alias that moved, then none', () => {
  const s = bound(0);
  s.apply(/** @type {any} */ (deliver(null)));
  s.apply(/** @type {any} */ (deliver(null, null)));
  assert.deepEqual(s.takeAcks(512), [{ alias: 0, seq: 2 }]);
  assert.deepEqual(s.takeAcks(512), []);
});

// ---- version 2: the device's msg_id counter (PROTOCOL.md §5, §12) ----

test('v2: a republish keeps its msg_id across a reconnect; v1 takes a fresh one', () => {
  const s = new Session(undefined, { deviceId: 0xfeedn, lastMsgId: 41 });
  s.startConnection(true);
  s.apply(/** @type {any} */ ({ ...welcome, version: 2 }));
  s.apply(/** @type {any} */ (room(0, 0)));
  const first = s.publish(HIKING);
  assert.deepEqual([first.msgId, first.idempotent], [42, true]);
  // The connection ends before the PUBACK: the message is unconfirmed.
  assert.deepEqual(s.endConnection(), [42]);
  s.startConnection(true);
  s.apply(/** @type {any} */ ({ ...welcome, version: 2 }));
  const again = s.publish(HIKING, first.msgId);
  assert.equal(again.msgId, 42, 'the same msg_id names the same message');
  const puback = s.apply({ type: 'puback', msgId: 42, seq: 1 });
  assert.equal(puback.type === 'puback' && puback.room?.cursor, 1);
  // A new message still takes the next id; the counter never went back.
  assert.equal(s.publish(HIKING).msgId, 43);
  assert.equal(s.lastMsgId, 43);
  // On a version-1 connection (no device id) a republish gets a fresh id.
  s.endConnection();
  s.startConnection(false);
  s.apply(/** @type {any} */ (welcome));
  const v1 = s.publish(HIKING, 43);
  assert.deepEqual([v1.msgId, v1.idempotent], [44, false]);
});

test('v2: the snapshot keeps the device id and the counter; an app may pass its own id', () => {
  const s = new Session(undefined, { deviceId: '5eed0fb0b5eed001' });
  s.startConnection(true);
  s.apply(/** @type {any} */ ({ ...welcome, version: 2 }));
  s.apply(/** @type {any} */ (room(0, 0)));
  s.publish(HIKING);
  s.publish(HIKING);
  const snap = JSON.parse(JSON.stringify(s.snapshot()));
  assert.deepEqual([snap.deviceId, snap.lastMsgId], ['5eed0fb0b5eed001', 2]);
  const reloaded = new Session(snap);
  assert.equal(reloaded.deviceId, 0x5eed0fb0b5eed001n);
  reloaded.startConnection(true);
  reloaded.apply(/** @type {any} */ ({ ...welcome, version: 2 }));
  assert.equal(reloaded.publish(HIKING).msgId, 3, 'no id is reused after a reload');
  // Another device id than the snapshot's starts its own counter.
  assert.equal(new Session(snap, { deviceId: 7n }).lastMsgId, 0);
  // Without either, each session draws its own random id.
  assert.notEqual(new Session().deviceId, new Session().deviceId);
  assert.throws(() => new Session(undefined, { deviceId: 'not hex' }), RangeError);
  assert.throws(() => new Session(undefined, { deviceId: 1n << 64n }), RangeError);
});

test('RECEIPT (version 3) names members through the sender aliases and needs a bound alias', () => {
  const s = bound(10);
  s.apply(/** @type {any} */ (deliver(null, 'ann')));
  const ev = s.apply(/** @type {any} */ ({
    type: 'receipt',
    alias: 0,
    entries: [
      { memberAlias: 0, name: null, delivered: 11, read: 11 },
      { memberAlias: 1, name: 'cat', delivered: 11, read: 9 },
    ],
  }));
  assert.equal(ev.type, 'receipt');
  assert.deepEqual(/** @type {any} */ (ev).members, [
    { user: 'ann', delivered: 11, read: 11 },
    { user: 'cat', delivered: 11, read: 9 },
  ]);
  // The slot the RECEIPT defined names the sender of a later DELIVER.
  const m = s.apply(/** @type {any} */ ({ ...deliver(null, null), senderAlias: 1 }));
  assert.equal(/** @type {any} */ (m).sender, 'cat');
  const stray = (/** @type {number} */ alias, /** @type {number} */ memberAlias) => ({ type: 'receipt', alias, entries: [{ memberAlias, name: null, delivered: 1, read: 1 }] });
  breaks(() => s.apply(/** @type {any} */ (stray(0, 9))), 'unknown_sender');
  breaks(() => s.apply(/** @type {any} */ (stray(5, 0))), 'unknown_alias');
});
