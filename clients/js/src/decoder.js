// @ts-check
/**
 * @module decoder
 * Splits the relay's byte stream into frames (PROTOCOL.md §3's decoding rules, in order) and
 * decodes each with the session's protocol version. The result depends only on the bytes,
 * never on how they were split into WebSocket messages.
 *
 * Owns: the receive buffer of one connection (at most one partial frame: the frame limit
 * bounds it). Must not touch: frame layouts (the version modules), session state, sockets.
 */

import { FrameError, readVarintAt } from './wire.js';
import { DEFAULT_LIMITS } from './v1.js';

export class FrameDecoder {
  /**
   * @param {{ decodeRelayFrame: typeof import('./v1.js').decodeRelayFrame }} version
   * @param {Partial<typeof DEFAULT_LIMITS>} [limits]
   */
  constructor(version, limits = {}) {
    this.version = version;
    this.limits = { ...DEFAULT_LIMITS, ...limits };
    this.buf = new Uint8Array(0);
    this.start = 0;
    this.end = 0;
    /** Set once a decoding error happened: the stream cannot be resynchronised. */
    this.failed = false;
  }

  /**
   * Raises the frame limit (to WELCOME's `max_frame_len` when larger, §4).
   * @param {number} maxFrameLen
   */
  allowFrameLen(maxFrameLen) {
    this.limits.maxFrameLen = Math.max(this.limits.maxFrameLen, maxFrameLen);
  }

  /**
   * Takes one chunk of bytes and returns every frame completed by it.
   * @param {Uint8Array} chunk
   * @returns {import('../index').RelayFrame[]}
   * @throws {FrameError} on any malformed input; every later call throws too.
   */
  push(chunk) {
    if (this.failed) throw new FrameError('dead_stream', 'the stream failed before');
    this.#append(chunk);
    /** @type {import('../index').RelayFrame[]} */
    const frames = [];
    try {
      for (;;) {
        const len = readVarintAt(this.buf, this.start, this.end);
        if (len === null) break;
        if (len.value === 0) throw new FrameError('empty_frame', 'empty frame');
        if (len.value > this.limits.maxFrameLen) {
          throw new FrameError(
            'frame_too_large',
            `frame of ${len.big ?? len.value} bytes exceeds the limit of ${this.limits.maxFrameLen}`,
          );
        }
        if (this.end - len.next < len.value) break;
        const body = this.buf.subarray(len.next, len.next + len.value);
        this.start = len.next + len.value;
        frames.push(this.version.decodeRelayFrame(body, this.limits));
      }
    } catch (e) {
      this.failed = true;
      throw e;
    }
    return frames;
  }

  /** Bytes held for a frame not yet complete. */
  buffered() {
    return this.end - this.start;
  }

  /** @param {Uint8Array} chunk */
  #append(chunk) {
    if (this.start === this.end) {
      this.start = 0;
      this.end = 0;
    }
    if (this.end + chunk.length > this.buf.length) {
      const live = this.end - this.start;
      const size = Math.max(live + chunk.length, this.buf.length * 2, 4096);
      const next = size > this.buf.length ? new Uint8Array(size) : this.buf;
      next.set(this.buf.subarray(this.start, this.end), 0);
      this.buf = next;
      this.start = 0;
      this.end = live;
    }
    this.buf.set(chunk, this.end);
    this.end += chunk.length;
  }
}
