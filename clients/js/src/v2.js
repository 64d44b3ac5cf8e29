// @ts-check
/**
 * @module v2
 * Version 2 of the pabal wire protocol (PROTOCOL.md §5 "What version 2 adds"): version 1's
 * frames unchanged, plus HELLO's DEVICE flag (`0x40`) with the device id (`u64le`) after the
 * token, which makes a PUBLISH's msg_id the device's own counter, kept across reconnects: a
 * PUBLISH repeated with the same msg_id is answered with the original PUBACK and delivered to
 * nobody again (§12). WELCOME's `version` is 2. Every other export is v1's.
 *
 * Owns: what version 2 changes. Must not touch: what it shares with version 1 (v1.js).
 */

import { encodeHelloOf } from './v1.js';

export * from './v1.js';

export const VERSION = 2;

/** HELLO carries the device id and msg_ids survive reconnects (§12). @type {boolean} */
export const DEVICE = true;

/**
 * HELLO (§7), version 2: with DEVICE and the device id when `deviceId` is given.
 * @param {{ heartbeatSecs: number, token: Uint8Array, deviceId?: bigint | null,
 *   resume: { roomId: bigint, epoch: bigint, lastSeq: number }[] }} hello
 */
export function encodeHello({ heartbeatSecs, token, deviceId = null, resume }) {
  return encodeHelloOf(VERSION, { heartbeatSecs, token, deviceId, resume });
}
