// @ts-check
/**
 * @module v3
 * Version 3 of the pabal wire protocol (PROTOCOL.md §5 "What version 3 adds"): version 2's
 * frames unchanged, plus receipts (§12): READ (`0x09`, client → relay: the user read a room
 * up to a sequence) and RECEIPT (`0x18`, relay → client: members' delivered and read markers
 * in one room, members named by the connection's sender aliases, §10). WELCOME's `version`
 * is 3. Every other export is v2's.
 *
 * Owns: what version 3 changes. Must not touch: what it shares with versions 1 and 2.
 */

import { encodeHelloOf, decodeRelayFrame as decodeV1, DEFAULT_LIMITS } from './v1.js';
import { FrameError, Reader, Writer } from './wire.js';

export * from './v2.js';

export const VERSION = 3;

/** HELLO carries the device id and msg_ids survive reconnects (§12). @type {boolean} */
export const DEVICE = true;

/** READ and RECEIPT exist (§12, receipts). @type {boolean} */
export const RECEIPTS = true;

/** Version 3's frame types: version 1's and READ, RECEIPT. */
export const T3 = Object.freeze({ READ: 0x09, RECEIPT: 0x18 });

/**
 * HELLO (§7), version 3: with DEVICE and the device id when `deviceId` is given.
 * @param {{ heartbeatSecs: number, token: Uint8Array, deviceId?: bigint | null,
 *   resume: { roomId: bigint, epoch: bigint, lastSeq: number }[] }} hello
 */
export function encodeHello({ heartbeatSecs, token, deviceId = null, resume }) {
  return encodeHelloOf(VERSION, { heartbeatSecs, token, deviceId, resume });
}

/**
 * READ (§7): the user read every message of `alias` up to `seq` (cumulative).
 * @param {{ alias: number, seq: number }} read
 */
export function encodeRead({ alias, seq }) {
  return new Writer().u8(T3.READ).varint32(alias).varint(seq).frame();
}

/**
 * Decodes one relay frame body: RECEIPT here, every other type as version 1 does.
 * @param {Uint8Array} body
 * @param {typeof DEFAULT_LIMITS} limits
 * @returns {import('../index').RelayFrame}
 */
export function decodeRelayFrame(body, limits) {
  if ((body[0] & 0x1f) !== T3.RECEIPT) return decodeV1(body, limits);
  if ((body[0] & 0xe0) !== 0) {
    throw new FrameError('undefined_flags', `undefined flags 0x${(body[0] & 0xe0).toString(16)} on RECEIPT`);
  }
  const r = new Reader(body, 'RECEIPT');
  r.pos = 1;
  const alias = r.u32('alias');
  /** @type {import('../index').ReceiptEntry[]} */
  const entries = [];
  while (r.more()) {
    const member = r.num('member');
    const memberAlias = Math.floor(member / 2);
    if (memberAlias > 0xffffffff) throw new FrameError('out_of_range', `RECEIPT member slot ${memberAlias}`);
    const name = member % 2 === 1 ? r.string('member name', 1, limits.maxNameLen) : null;
    const delivered = r.num('delivered');
    const unread = r.num('unread');
    if (unread > delivered) throw new FrameError('out_of_range', `RECEIPT unread ${unread} > delivered ${delivered}`);
    entries.push({ memberAlias, name, delivered, read: delivered - unread });
  }
  if (entries.length === 0) throw new FrameError('out_of_range', 'RECEIPT without entries');
  return { type: 'receipt', alias, entries };
}
