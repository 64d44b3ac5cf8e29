// @ts-check
/**
 * @module v1
 * Version 1 of the pabal wire protocol (PROTOCOL.md §3, §7, §8): the client frames this
 * client encodes and the relay frames it decodes, as plain objects tagged by `type`.
 *
 * Owns: v1's frame layouts, flags and per-frame rules. Must not touch: framing of the byte
 * stream (decoder.js), session state (session.js), sockets. A later version is a module with
 * the same shape registered in versions.js.
 */

import { FrameError, Reader, Writer } from './wire.js';

export const VERSION = 1;

/**
 * Whether this version's HELLO carries the device id, so that a PUBLISH's msg_id is the
 * device's counter and a republish keeps it (§5, §12): not in version 1.
 * @type {boolean}
 */
export const DEVICE = false;

/** Frame type numbers (low 5 bits of the type byte). */
export const T = Object.freeze({
  HELLO: 0x01,
  SUBSCRIBE: 0x02,
  UNSUBSCRIBE: 0x03,
  PUBLISH: 0x04,
  ACK: 0x05,
  PING: 0x06,
  PONG: 0x07,
  BYE: 0x08,
  WELCOME: 0x10,
  ROOM: 0x11,
  LEFT: 0x12,
  PUBACK: 0x13,
  DELIVER: 0x14,
  GAP: 0x15,
  ERROR: 0x16,
  GOAWAY: 0x17,
});

const F20 = 0x20;
const F40 = 0x40;
const F80 = 0x80;

/** The decoding limits of PROTOCOL.md §4 (`pabal-codec`'s defaults). */
export const DEFAULT_LIMITS = Object.freeze({
  maxFrameLen: 65536,
  maxNameLen: 255,
  maxTokenLen: 8192,
  maxResumeEntries: 4096,
  maxAckEntries: 512,
  maxTextLen: 1024,
});

// ---- client → relay ----

/**
 * HELLO (§7). `resume` entries are grouped into runs of one epoch; entry i is alias i. Version
 * 1 has no device id: a `deviceId` passed here is ignored (its msg_ids are per connection).
 * @param {{ heartbeatSecs: number, token: Uint8Array, deviceId?: bigint | null,
 *   resume: { roomId: bigint, epoch: bigint, lastSeq: number }[] }} hello
 */
export function encodeHello({ heartbeatSecs, token, resume }) {
  return encodeHelloOf(VERSION, { heartbeatSecs, token, deviceId: null, resume });
}

/**
 * HELLO of any version (§7): the layout every version shares, with the DEVICE flag and the
 * device id after the token when `deviceId` is not null (version 2 on; v2.js calls this).
 * @param {number} version
 * @param {{ heartbeatSecs: number, token: Uint8Array, deviceId: bigint | null,
 *   resume: { roomId: bigint, epoch: bigint, lastSeq: number }[] }} hello
 */
export function encodeHelloOf(version, { heartbeatSecs, token, deviceId, resume }) {
  const flags = (resume.length > 0 ? F20 : 0) | (deviceId === null ? 0 : F40);
  const w = new Writer().u8(T.HELLO | flags).u8(version);
  w.varint32(heartbeatSecs).bytesField(token);
  if (deviceId !== null) w.u64le(deviceId);
  if (resume.length > 0) {
    /** @type {{ epoch: bigint, entries: typeof resume }[]} */
    const groups = [];
    for (const e of resume) {
      const last = groups[groups.length - 1];
      if (last && last.epoch === e.epoch) last.entries.push(e);
      else groups.push({ epoch: e.epoch, entries: [e] });
    }
    w.varint(groups.length);
    for (const g of groups) {
      w.varint(g.epoch).varint(g.entries.length);
      for (const e of g.entries) w.u64le(e.roomId).varint(e.lastSeq);
    }
  }
  return w.frame();
}

/** @param {string} name @param {boolean} room join a room (else a channel) */
export function encodeSubscribe(name, room) {
  return new Writer().u8(T.SUBSCRIBE | (room ? F20 : 0)).string(name).frame();
}

/** @param {number} alias @param {boolean} block */
export function encodeUnsubscribe(alias, block) {
  return new Writer().u8(T.UNSUBSCRIBE | (block ? F20 : 0)).varint32(alias).frame();
}

/**
 * PUBLISH: `msgId` null for an ephemeral event; `ack` null when none rides along.
 * @param {{ alias: number, msgId: number | null, ack: number | null, payload: Uint8Array }} p
 */
export function encodePublish({ alias, msgId, ack, payload }) {
  const w = new Writer().u8(T.PUBLISH | (msgId === null ? F20 : 0) | (ack === null ? 0 : F40));
  w.varint32(alias);
  if (msgId !== null) w.varint(msgId);
  if (ack !== null) w.varint(ack);
  return w.raw(payload).frame();
}

/** @param {{ alias: number, seq: number }[]} pairs 1 to max_ack_entries */
export function encodeAck(pairs) {
  if (pairs.length === 0 || pairs.length > DEFAULT_LIMITS.maxAckEntries) {
    throw new RangeError(`an ACK carries 1 to ${DEFAULT_LIMITS.maxAckEntries} pairs`);
  }
  const w = new Writer().u8(T.ACK);
  for (const p of pairs) w.varint32(p.alias).varint(p.seq);
  return w.frame();
}

/** @param {number | null} intervalSecs */
export function encodePing(intervalSecs = null) {
  return heartbeat(T.PING, intervalSecs);
}

/** @param {number | null} intervalSecs */
export function encodePong(intervalSecs = null) {
  return heartbeat(T.PONG, intervalSecs);
}

/** @param {number} type @param {number | null} interval */
function heartbeat(type, interval) {
  const w = new Writer().u8(type | (interval === null ? 0 : F20));
  if (interval !== null) w.varint32(interval);
  return w.frame();
}

export function encodeBye() {
  return new Writer().u8(T.BYE).frame();
}

// ---- relay → client ----

/**
 * Decodes one relay frame body (type byte first) into a tagged object.
 * @param {Uint8Array} body
 * @param {typeof DEFAULT_LIMITS} limits
 * @returns {import('../index').RelayFrame}
 */
export function decodeRelayFrame(body, limits) {
  const typeByte = body[0];
  const type = typeByte & 0x1f;
  const flags = typeByte & 0xe0;
  const name = NAMES[type];
  if (name === undefined) {
    throw new FrameError('unknown_frame_type', `unknown frame type 0x${hex(typeByte)}`);
  }
  const allowed = FLAGS[type];
  if ((flags & ~allowed) !== 0) {
    throw new FrameError('undefined_flags', `undefined flags 0x${hex(flags)} on ${name}`);
  }
  const r = new Reader(body, name);
  r.pos = 1;
  const nameField = (/** @type {string} */ f) => r.string(f, 1, limits.maxNameLen);
  /** @type {import('../index').RelayFrame} */
  let frame;
  switch (type) {
    case T.PING:
    case T.PONG: {
      const intervalSecs = flags & F20 ? r.u32('interval_secs') : null;
      frame = { type: type === T.PING ? 'ping' : 'pong', intervalSecs };
      break;
    }
    case T.WELCOME:
      frame = {
        type: 'welcome',
        version: r.u8('version'),
        connId: r.big('conn_id'),
        serverTimeMs: r.num('server_time_ms'),
        heartbeatSecs: r.u32('heartbeat_secs'),
        maxFrameLen: r.u32('max_frame_len'),
        user: nameField('user'),
      };
      break;
    case T.ROOM: {
      const alias = r.u32('alias');
      const roomId = r.u64le('room_id');
      const epoch = r.big('epoch');
      const cursor = r.num('cursor');
      const head = r.num('head');
      if (head < cursor) throw new FrameError('out_of_range', `ROOM head ${head} < cursor ${cursor}`);
      frame = { type: 'room', alias, roomId, epoch, cursor, head, name: nameField('name'), channel: (flags & F20) !== 0 };
      break;
    }
    case T.LEFT:
      frame = { type: 'left', alias: r.u32('alias'), reason: r.num('reason') };
      break;
    case T.PUBACK:
      frame = { type: 'puback', msgId: r.num('msg_id'), seq: r.num('seq') };
      break;
    case T.DELIVER: {
      const ephemeral = (flags & F80) !== 0;
      if (ephemeral && flags & F20) {
        throw new FrameError('undefined_flags', 'DELIVER with both EPHEMERAL and SEQ');
      }
      const alias = r.u32('alias');
      const seq = flags & F20 ? r.num('seq') : null;
      const senderAlias = r.u32('sender_alias');
      const sender = flags & F40 ? nameField('sender') : null;
      const tsDeltaMs = r.zigzag('ts_delta_ms');
      frame = { type: 'deliver', alias, seq, senderAlias, sender, tsDeltaMs, ephemeral, payload: r.rest() };
      break;
    }
    case T.GAP: {
      const alias = r.u32('alias');
      const from = r.num('from');
      const to = r.num('to');
      if (from === 0 || to < from) throw new FrameError('out_of_range', `GAP ${from}..=${to}`);
      frame = { type: 'gap', alias, from, to };
      break;
    }
    case T.ERROR:
      frame = {
        type: 'error',
        fatal: (flags & F20) !== 0,
        code: r.num('code'),
        reference: r.num('reference'),
        message: r.string('message', 0, limits.maxTextLen),
      };
      break;
    case T.GOAWAY:
      frame = {
        type: 'goaway',
        reason: r.num('reason'),
        retryAfterMs: r.num('retry_after_ms'),
        message: r.string('message', 0, limits.maxTextLen),
      };
      break;
    default:
      throw new FrameError('unknown_frame_type', `unknown frame type 0x${hex(typeByte)}`);
  }
  if (type !== T.DELIVER) r.end();
  return frame;
}

/** Relay → client frame names by type; every other type is unknown in this direction. */
const NAMES = /** @type {Record<number, string>} */ ({
  [T.PING]: 'PING',
  [T.PONG]: 'PONG',
  [T.WELCOME]: 'WELCOME',
  [T.ROOM]: 'ROOM',
  [T.LEFT]: 'LEFT',
  [T.PUBACK]: 'PUBACK',
  [T.DELIVER]: 'DELIVER',
  [T.GAP]: 'GAP',
  [T.ERROR]: 'ERROR',
  [T.GOAWAY]: 'GOAWAY',
});

/** The flags each relay frame type defines. */
const FLAGS = /** @type {Record<number, number>} */ ({
  [T.PING]: F20,
  [T.PONG]: F20,
  [T.WELCOME]: 0,
  [T.ROOM]: F20,
  [T.LEFT]: 0,
  [T.PUBACK]: 0,
  [T.DELIVER]: F20 | F40 | F80,
  [T.GAP]: 0,
  [T.ERROR]: F20,
  [T.GOAWAY]: 0,
});

/** @param {number} b */
function hex(b) {
  return b.toString(16).padStart(2, '0');
}
