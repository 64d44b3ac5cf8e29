// @ts-check
/**
 * @module wire
 * The byte-level building blocks of the pabal protocol (PROTOCOL.md §2): varints, zigzag,
 * `u64le`, strings, a bounded reader over one frame body and a growable writer, the room id
 * hash (§9) and the typed decoding error.
 *
 * Owns: bytes ↔ values. Must not touch: frame layouts (v1.js), sessions, sockets.
 *
 * Numbers: sequences, message ids, times and counts are JS numbers; a value above
 * 2^53 − 1 (which no relay sends in practice) is refused as `out_of_range` rather than
 * silently rounded. Room ids, epochs and connection ids are opaque 64-bit values and are
 * `bigint`.
 */

const TEXT_DECODER = new TextDecoder('utf-8', { fatal: true });
const TEXT_ENCODER = new TextEncoder();
const MAX_SAFE = Number.MAX_SAFE_INTEGER;
const U64_MAX = (1n << 64n) - 1n;

/**
 * A frame that cannot be decoded (PROTOCOL.md §3): after one, the byte stream cannot be
 * resynchronised and the connection is dead. `kind` names the rule that was broken.
 */
export class FrameError extends Error {
  /**
   * @param {import('../index').FrameErrorKind} kind
   * @param {string} message
   */
  constructor(kind, message) {
    super(message);
    this.name = 'FrameError';
    /** @type {import('../index').FrameErrorKind} */
    this.kind = kind;
  }
}

/** Sentinel thrown by {@link Reader} when a varint runs past the available bytes. */
export const NEED_MORE = Symbol('need more bytes');

/**
 * Decodes one varint at `buf[pos..end]`.
 * @param {Uint8Array} buf
 * @param {number} pos
 * @param {number} end
 * @returns {{ value: number, big: bigint | null, next: number } | null} null when the bytes
 *   end inside the varint; `big` is set (and `value` is Infinity) when it is above 2^53 − 1.
 */
export function readVarintAt(buf, pos, end) {
  let value = 0;
  let scale = 1;
  for (let i = 0; i < 10; i++) {
    if (pos + i >= end) return null;
    const byte = buf[pos + i];
    if (i === 9 && byte > 1) throw new FrameError('varint_overflow', 'varint overflows 64 bits');
    value += (byte & 0x7f) * scale;
    scale *= 128;
    if ((byte & 0x80) === 0) {
      if (i > 0 && byte === 0) {
        throw new FrameError('non_canonical_varint', 'non-canonical varint');
      }
      if (value <= MAX_SAFE) return { value, big: null, next: pos + i + 1 };
      let big = 0n;
      for (let j = i; j >= 0; j--) big = (big << 7n) | BigInt(buf[pos + j] & 0x7f);
      return { value: Infinity, big, next: pos + i + 1 };
    }
  }
  throw new FrameError('varint_overflow', 'varint overflows 64 bits');
}

/**
 * Appends the varint of `v` (a non-negative safe integer or a bigint below 2^64).
 * @param {number[]} out
 * @param {number | bigint} v
 */
function pushVarint(out, v) {
  if (typeof v === 'bigint') {
    if (v < 0n || v > U64_MAX) throw new RangeError(`varint out of range: ${v}`);
    while (v >= 0x80n) {
      out.push(Number(v & 0x7fn) | 0x80);
      v >>= 7n;
    }
    out.push(Number(v));
    return;
  }
  if (!Number.isSafeInteger(v) || v < 0) throw new RangeError(`varint out of range: ${v}`);
  while (v >= 0x80) {
    out.push((v % 128) | 0x80);
    v = Math.floor(v / 128);
  }
  out.push(v);
}

/** Builds one frame: the body is written first, then framed with its length. */
export class Writer {
  constructor() {
    /** @type {number[]} */
    this.bytes = [];
  }

  /** @param {number} v */
  u8(v) {
    this.bytes.push(v & 0xff);
    return this;
  }

  /** @param {number | bigint} v */
  varint(v) {
    pushVarint(this.bytes, v);
    return this;
  }

  /** @param {number} v a 32-bit unsigned value */
  varint32(v) {
    if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) {
      throw new RangeError(`varint32 out of range: ${v}`);
    }
    pushVarint(this.bytes, v);
    return this;
  }

  /** @param {bigint} v */
  u64le(v) {
    let x = BigInt.asUintN(64, v);
    for (let i = 0; i < 8; i++) {
      this.bytes.push(Number(x & 0xffn));
      x >>= 8n;
    }
    return this;
  }

  /** @param {Uint8Array} b */
  bytesField(b) {
    pushVarint(this.bytes, b.length);
    return this.raw(b);
  }

  /** @param {string} s */
  string(s) {
    return this.bytesField(TEXT_ENCODER.encode(s));
  }

  /** @param {Uint8Array} b */
  raw(b) {
    for (let i = 0; i < b.length; i++) this.bytes.push(b[i]);
    return this;
  }

  /** The frame: length varint, then the body written so far. */
  frame() {
    /** @type {number[]} */
    const head = [];
    pushVarint(head, this.bytes.length);
    const out = new Uint8Array(head.length + this.bytes.length);
    out.set(head, 0);
    out.set(this.bytes, head.length);
    return out;
  }
}

/** Reads the fields of one frame body; every read is bounded by the body. */
export class Reader {
  /**
   * @param {Uint8Array} body
   * @param {string} frame the frame's name, for errors
   */
  constructor(body, frame) {
    this.buf = body;
    this.pos = 0;
    this.frame = frame;
  }

  /** @param {string} field */
  u8(field) {
    if (this.pos >= this.buf.length) throw truncated(field);
    return this.buf[this.pos++];
  }

  /**
   * A varint as a number (≤ 2^53 − 1).
   * @param {string} field
   */
  num(field) {
    const r = this.#varint(field);
    if (r.big !== null) {
      throw new FrameError('out_of_range', `${field} value ${r.big} is beyond 2^53-1`);
    }
    return r.value;
  }

  /**
   * A varint as a bigint.
   * @param {string} field
   */
  big(field) {
    const r = this.#varint(field);
    return r.big ?? BigInt(r.value);
  }

  /**
   * A varint that must fit in 32 bits.
   * @param {string} field
   */
  u32(field) {
    const r = this.#varint(field);
    if (r.big !== null || r.value > 0xffffffff) {
      throw new FrameError('out_of_range', `${field} value ${r.big ?? r.value} out of range`);
    }
    return r.value;
  }

  /**
   * A zigzag-encoded signed value, as a number (clamped to the safe range).
   * @param {string} field
   */
  zigzag(field) {
    const r = this.#varint(field);
    if (r.big === null) {
      return r.value % 2 === 0 ? r.value / 2 : -(r.value + 1) / 2;
    }
    const signed = (r.big >> 1n) ^ -(r.big & 1n);
    return Number(signed);
  }

  /** @param {string} field */
  u64le(field) {
    if (this.buf.length - this.pos < 8) throw truncated(field);
    let v = 0n;
    for (let i = 7; i >= 0; i--) v = (v << 8n) | BigInt(this.buf[this.pos + i]);
    this.pos += 8;
    return v;
  }

  /**
   * A length-prefixed byte string of at most `max` bytes.
   * @param {string} field
   * @param {number} max
   */
  bytes(field, max) {
    const r = this.#varint(field);
    const len = r.big ?? r.value;
    if (len > max) throw new FrameError('too_long', `${field} of ${len} exceeds the limit of ${max}`);
    const n = Number(len);
    if (this.buf.length - this.pos < n) throw truncated(field);
    const out = this.buf.slice(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }

  /**
   * A UTF-8 string of `min..=max` bytes.
   * @param {string} field
   * @param {number} min
   * @param {number} max
   */
  string(field, min, max) {
    const b = this.bytes(field, max);
    if (b.length < min) throw new FrameError('empty_name', `${field} is empty`);
    try {
      return TEXT_DECODER.decode(b);
    } catch {
      throw new FrameError('invalid_utf8', `${field} is not valid UTF-8`);
    }
  }

  /** The rest of the body (a copy the caller owns). */
  rest() {
    const out = this.buf.slice(this.pos);
    this.pos = this.buf.length;
    return out;
  }

  /** Whether bytes are left. */
  more() {
    return this.pos < this.buf.length;
  }

  /** Refuses bytes left over after the last field. */
  end() {
    if (this.pos !== this.buf.length) {
      throw new FrameError(
        'trailing_bytes',
        `${this.buf.length - this.pos} trailing bytes after ${this.frame}`,
      );
    }
  }

  /** @param {string} field */
  #varint(field) {
    const r = readVarintAt(this.buf, this.pos, this.buf.length);
    if (r === null) throw truncated(field);
    this.pos = r.next;
    return r;
  }
}

/** @param {string} field */
function truncated(field) {
  return new FrameError('truncated', `frame truncated inside ${field}`);
}

/**
 * A room's or channel's id (PROTOCOL.md §9): FNV-1a 64 over `r`/`c` and the name's UTF-8.
 * @param {boolean} channel
 * @param {string} name
 * @returns {bigint}
 */
export function roomId(channel, name) {
  // Two 32-bit halves instead of bigint arithmetic per byte.
  let hi = 0xcbf29ce4;
  let lo = 0x84222325;
  const step = (/** @type {number} */ byte) => {
    lo = (lo ^ byte) >>> 0;
    // x * 0x100000001b3 = x * 0x1b3 + (x << 40)
    const loMul = lo * 0x1b3;
    const carry = Math.floor(loMul / 0x100000000);
    const newLo = loMul >>> 0;
    const newHi = (hi * 0x1b3 + carry + ((lo << 8) >>> 0)) >>> 0;
    hi = newHi;
    lo = newLo;
  };
  step(channel ? 0x63 : 0x72);
  for (const byte of TEXT_ENCODER.encode(name)) step(byte);
  return (BigInt(hi) << 32n) | BigInt(lo);
}

export { TEXT_ENCODER };
