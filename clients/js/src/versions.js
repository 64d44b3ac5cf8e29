// @ts-check
/**
 * @module versions
 * The protocol versions this client speaks, newest first (PROTOCOL.md §5). Each is a module
 * with the same shape as v1.js. A client starts with the newest it is allowed and, when a
 * relay answers ERROR `UnsupportedVersion` (3, fatal), reconnects with the next older one.
 * Adding a version is: write vN.js with v1's exports (re-exporting what it shares, as v2.js
 * does), add it to `VERSIONS` here, newest first.
 *
 * Owns: the version list. Must not touch: frame layouts (the version modules).
 */

import * as v1 from './v1.js';
import * as v2 from './v2.js';
import * as v3 from './v3.js';

/** @typedef {typeof v1} ProtocolVersion */

/** @type {ReadonlyMap<number, ProtocolVersion>} newest first */
export const VERSIONS = new Map([
  [v3.VERSION, /** @type {ProtocolVersion} */ (/** @type {unknown} */ (v3))],
  [v2.VERSION, v2],
  [v1.VERSION, v1],
]);

/**
 * The versions to try, newest first, limited to `allowed` when given.
 * @param {number[] | undefined} allowed
 * @returns {ProtocolVersion[]}
 */
export function versionsToTry(allowed) {
  const all = [...VERSIONS.values()];
  const list = allowed ? all.filter((v) => allowed.includes(v.VERSION)) : all;
  if (list.length === 0) throw new RangeError(`no supported protocol version in ${allowed}`);
  return list;
}
