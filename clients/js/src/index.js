// @ts-check
/**
 * @module pabal-client
 * The pabal JavaScript client for browsers and Node: {@link PabalClient} over WebSocket, and
 * the sans-IO parts it is built from (frames, stream decoder, session rules) for anyone who
 * drives another transport.
 *
 * Owns: the package's public surface. Must not touch: anything else (it only re-exports).
 */

export { PabalClient, RelayError, ErrorCode, GoAwayReason } from './client.js';
export { Session, SessionError, LeftReason } from './session.js';
export { FrameDecoder } from './decoder.js';
export { FrameError, roomId } from './wire.js';
export { VERSIONS } from './versions.js';
export * as v1 from './v1.js';
export * as v2 from './v2.js';
export * as v3 from './v3.js';
