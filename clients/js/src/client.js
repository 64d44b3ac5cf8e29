// @ts-check
/**
 * @module client
 * `PabalClient`: one user's connection to a pabal relay over WebSocket, kept alive across
 * drops. It drives a {@link Session} (the protocol's rules) and a {@link FrameDecoder} over a
 * WebSocket (the browser's, Node's global one, or any constructor passed in), and adds what
 * needs I/O and time (PROTOCOL.md §17 items 7-9): HELLO on every connect with the resume list
 * (version 3, then 2 with the device id, then 1 as relays refuse them), READ and RECEIPT
 * (version 3: `read()`, `receipt` events), republishing
 * what was not acknowledged (in version 2 with the same msg_id, so nothing is stored twice), batched cumulative ACKs (piggybacked on PUBLISH
 * when possible), PING/PONG heartbeats, and reconnects with full-jitter exponential backoff
 * that waits at least a GOAWAY's `retry_after_ms`.
 *
 * Owns: the socket, the timers and the outbox of one client. Must not touch: frame layouts
 * (the version modules) and the cursor rules (session.js).
 */

import { FrameDecoder } from './decoder.js';
import { FrameError, roomId as roomIdOf, TEXT_ENCODER } from './wire.js';
import { Session, SessionError } from './session.js';
import { versionsToTry } from './versions.js';
import { DEFAULT_LIMITS } from './v1.js';

/** ERROR codes the client acts on (§14). */
export const ErrorCode = Object.freeze({
  MALFORMED: 1,
  FRAME_TOO_LARGE: 2,
  UNSUPPORTED_VERSION: 3,
  UNKNOWN_FRAME_TYPE: 4,
  PROTOCOL_VIOLATION: 5,
  AUTH_FAILED: 16,
  TOKEN_EXPIRED: 17,
  NOT_PERMITTED: 18,
  UNKNOWN_ALIAS: 19,
  RATE_LIMITED: 20,
  LIMIT_EXCEEDED: 21,
  PAYLOAD_TOO_LARGE: 22,
  NOT_FOUND: 23,
  INTERNAL: 32,
  OVERLOADED: 33,
});

/** GOAWAY reasons (§14). */
export const GoAwayReason = Object.freeze({
  SHUTDOWN: 1,
  OVERLOAD: 2,
  KICKED: 3,
  TIMEOUT: 4,
  TOKEN_EXPIRED: 5,
  HANDSHAKE_TIMEOUT: 6,
});

/** A refusal from the relay (a non-fatal ERROR answering one request, or a fatal one). */
export class RelayError extends Error {
  /** @param {{ code: number, reference: number, message: string, fatal: boolean }} e */
  constructor(e) {
    super(`relay error ${e.code}${e.fatal ? ' (fatal)' : ''}: ${e.message}`);
    this.name = 'RelayError';
    this.code = e.code;
    this.reference = e.reference;
    this.fatal = e.fatal;
  }
}

const DEFAULTS = {
  heartbeatSecs: 0,
  heartbeatTimeoutMs: 30_000,
  backoffBaseMs: 500,
  backoffCapMs: 30_000,
  ackDelayMs: 100,
};

/** @typedef {import('../index').ClientOptions} ClientOptions */
/** @typedef {import('../index').ClientEvents} ClientEvents */

export class PabalClient {
  /** @param {ClientOptions} options */
  constructor(options) {
    if (!options || typeof options.url !== 'string') throw new TypeError('options.url is required');
    if (options.token === undefined) throw new TypeError('options.token is required');
    this.options = { ...DEFAULTS, ...options };
    /** @type {typeof WebSocket} */
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.WebSocket !== 'function') {
      throw new TypeError('no WebSocket here: pass options.WebSocket (Node 20: --experimental-websocket)');
    }
    this.random = options.random ?? Math.random;
    this.versions = versionsToTry(options.versions);
    this.versionIndex = 0;
    this.session = new Session(options.snapshot, { deviceId: options.deviceId, lastMsgId: options.lastMsgId });
    /** @type {'idle' | 'connecting' | 'open' | 'waiting' | 'closed'} */
    this.state = 'idle';
    /** @type {WebSocket | null} */
    this.ws = null;
    /** @type {FrameDecoder | null} */
    this.decoder = null;
    /** Failed attempts since the last WELCOME (the backoff exponent). */
    this.attempt = 0;
    /** The last GOAWAY's retry hint, consumed by the next reconnect. */
    this.retryAfterMs = 0;
    /** @type {import('../index').WelcomeEvent | null} */
    this.welcome = null;
    /** @type {{ key: bigint, payload: Uint8Array, ephemeral: boolean, msgId: number | null,
     *   resolve: (seq: number | null) => void, reject: (e: Error) => void }[]}
     * `msgId`: the id a message was sent with on a version-2 connection, kept for its
     * republish (§12); null before, and in version 1 (a republish takes a fresh id). */
    this.outbox = [];
    /** @type {Map<number, (typeof this.outbox)[number]>} */
    this.sent = new Map();
    /** @type {{ name: string, channel: boolean, resolve: (r: import('../index').RoomInfo) => void,
     *   reject: (e: Error) => void }[]} */
    this.joining = [];
    /** @type {Map<string, Set<Function>>} */
    this.listeners = new Map();
    /** @type {ReturnType<typeof setTimeout> | null} */
    this.reconnectTimer = null;
    /** @type {ReturnType<typeof setTimeout> | null} */
    this.ackTimer = null;
    /** @type {ReturnType<typeof setTimeout> | null} */
    this.heartbeatTimer = null;
    this.lastHeardMs = 0;
    this.pingSentMs = 0;
    /** Connections opened so far (1 for the first). */
    this.connects = 0;
  }

  /**
   * Subscribes to an event; returns a function that unsubscribes.
   * @template {keyof ClientEvents} K
   * @param {K} type
   * @param {(e: ClientEvents[K]) => void} fn
   */
  on(type, fn) {
    let set = this.listeners.get(type);
    if (!set) this.listeners.set(type, (set = new Set()));
    set.add(fn);
    return () => set.delete(fn);
  }

  /**
   * @template {keyof ClientEvents} K
   * @param {K} type
   * @param {ClientEvents[K]} event
   */
  #emit(type, event) {
    for (const fn of this.listeners.get(type) ?? []) {
      try {
        fn(event);
      } catch (e) {
        // A listener's bug must not break the connection's state machine.
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }

  /** Opens the connection (and keeps it open until {@link close}). */
  connect() {
    if (this.state === 'connecting' || this.state === 'open') return;
    this.#clearTimer('reconnectTimer');
    this.#open();
  }

  /** Closes on purpose with BYE; the rooms stay resumable. No reconnect follows. */
  close() {
    this.#clearTimer('reconnectTimer');
    const ws = this.ws;
    if (ws && this.state === 'open') this.#send(this.#v().encodeBye());
    this.#teardown();
    ws?.close(1000);
    this.#setState('closed', 'closed by the client');
  }

  /**
   * What to keep to resume in a later run: cursors and epochs, and the device id with its
   * message counter (so a reloaded app reuses no msg_id the relay may remember, §12).
   */
  snapshot() {
    return this.session.snapshot();
  }

  /** The device id a version-2 HELLO carries, as 16 hex digits. */
  get deviceId() {
    return this.session.deviceId.toString(16).padStart(16, '0');
  }

  /** The rooms this client knows, with their cursors. */
  rooms() {
    return [...this.session.rooms.values()].map((r) => ({ ...r }));
  }

  /**
   * Publishes a message; resolves with its sequence once the relay acknowledged it (null
   * for an ephemeral event, at once). Unacknowledged messages are published again on the
   * next connection.
   * @param {string} name the room's or channel's name
   * @param {Uint8Array | string} payload
   * @param {{ channel?: boolean, ephemeral?: boolean }} [opts]
   * @returns {Promise<number | null>}
   */
  publish(name, payload, opts = {}) {
    const key = roomIdOf(opts.channel ?? false, name);
    if (!this.session.room(key)) return Promise.reject(new RangeError(`not a member of ${name}`));
    const bytes = typeof payload === 'string' ? TEXT_ENCODER.encode(payload) : payload;
    return new Promise((resolve, reject) => {
      this.outbox.push({ key, payload: bytes, ephemeral: opts.ephemeral ?? false, msgId: null, resolve, reject });
      this.#flushOutbox();
    });
  }

  /**
   * Joins a room (where the relay lets clients do so) or subscribes to a channel; resolves
   * when it is bound.
   * @param {string} name
   * @param {{ channel?: boolean }} [opts]
   * @returns {Promise<import('../index').RoomInfo>}
   */
  join(name, opts = {}) {
    const channel = opts.channel ?? false;
    return new Promise((resolve, reject) => {
      this.joining.push({ name, channel, resolve, reject });
      if (this.state === 'open') this.#send(this.#v().encodeSubscribe(name, !channel));
    });
  }

  /**
   * Leaves a room or channel (`block`: also refuse later subscriptions to the channel).
   * @param {string} name
   * @param {{ channel?: boolean, block?: boolean }} [opts]
   */
  leave(name, opts = {}) {
    const alias = this.session.aliasOf(roomIdOf(opts.channel ?? false, name));
    if (alias === undefined || this.state !== 'open') return false;
    this.#send(this.#v().encodeUnsubscribe(alias, opts.block ?? false));
    return true;
  }

  /**
   * Tells the relay the user read a room up to `seq` (protocol version 3: READ; the room's
   * members get it in their RECEIPTs). Returns whether it was sent: not when the room is
   * not bound, the connection is not open, or it speaks an older version.
   * @param {string} name
   * @param {number} seq
   * @param {{ channel?: boolean }} [opts]
   */
  read(name, seq, opts = {}) {
    const alias = this.session.aliasOf(roomIdOf(opts.channel ?? false, name));
    const v = /** @type {{ encodeRead?: (r: { alias: number, seq: number }) => Uint8Array }} */ (
      /** @type {unknown} */ (this.#v())
    );
    if (alias === undefined || this.state !== 'open' || !v.encodeRead) return false;
    this.#send(v.encodeRead({ alias, seq }));
    return true;
  }

  #v() {
    return this.versions[this.versionIndex];
  }

  async #open() {
    this.#setState('connecting', null);
    this.connects++;
    let token;
    try {
      const t = typeof this.options.token === 'function' ? await this.options.token() : this.options.token;
      token = typeof t === 'string' ? TEXT_ENCODER.encode(t) : t;
    } catch (e) {
      this.#emit('error', { kind: 'token', error: /** @type {Error} */ (e) });
      return this.#scheduleReconnect();
    }
    if (this.state !== 'connecting') return; // closed while the token was fetched
    const version = this.#v();
    const ws = new this.WebSocket(this.options.url);
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    this.decoder = new FrameDecoder(version, { maxFrameLen: DEFAULT_LIMITS.maxFrameLen });
    ws.onopen = () => {
      if (this.ws !== ws) return;
      const resume = this.session.startConnection(version.DEVICE);
      const deviceId = version.DEVICE ? this.session.deviceId : null;
      this.#send(version.encodeHello({ heartbeatSecs: this.options.heartbeatSecs, token, deviceId, resume }));
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      if (!(ev.data instanceof ArrayBuffer)) {
        return this.#fail('protocol', new FrameError('truncated', 'a text WebSocket message'));
      }
      this.#receive(new Uint8Array(ev.data));
    };
    // An error ends the connection by itself: browsers follow it with a close event, but
    // Node 20's WebSocket does not when the connection is refused.
    ws.onerror = () => {
      if (this.ws !== ws) return;
      this.#connectionLost('socket error');
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.#connectionLost(`socket closed (${ev.code})`);
    };
  }

  /** @param {Uint8Array} bytes */
  #receive(bytes) {
    this.lastHeardMs = Date.now();
    this.pingSentMs = 0;
    let frames;
    try {
      frames = /** @type {FrameDecoder} */ (this.decoder).push(bytes);
    } catch (e) {
      return this.#fail('protocol', /** @type {Error} */ (e));
    }
    for (const frame of frames) {
      let event;
      try {
        event = this.session.apply(frame);
      } catch (e) {
        if (e instanceof SessionError) return this.#fail('protocol', e);
        throw e;
      }
      if (this.#handle(event) === 'stop') return;
    }
    this.#scheduleAck();
  }

  /**
   * @param {import('../index').SessionEvent} e
   * @returns {'stop' | void}
   */
  #handle(e) {
    switch (e.type) {
      case 'welcome':
        if (e.version !== this.#v().VERSION) {
          this.#fail('protocol', new SessionError('version_mismatch', `WELCOME for version ${e.version}`));
          return 'stop';
        }
        this.attempt = 0;
        this.welcome = e;
        /** @type {FrameDecoder} */ (this.decoder).allowFrameLen(e.maxFrameLen);
        this.#setState('open', null);
        this.#armHeartbeat();
        for (const j of this.joining) this.#send(this.#v().encodeSubscribe(j.name, !j.channel));
        this.#emit('welcome', e);
        this.#flushOutbox();
        return;
      case 'room':
        this.joining = this.joining.filter((j) => {
          const match = j.name === e.room.name && j.channel === e.room.channel;
          if (match) j.resolve(e.room);
          return !match;
        });
        this.#emit('room', e);
        this.#flushOutbox();
        return;
      case 'left':
        this.#emit('left', e);
        return;
      case 'message':
        this.#emit('message', e);
        return;
      case 'gap':
        this.#emit('gap', e);
        return;
      case 'receipt':
        this.#emit('receipt', e);
        return;
      case 'puback': {
        const entry = this.sent.get(e.msgId);
        this.sent.delete(e.msgId);
        entry?.resolve(e.seq);
        this.#emit('puback', e);
        return;
      }
      case 'ping':
        this.#send(this.#v().encodePong(null));
        return;
      case 'pong':
        return;
      case 'error':
        return this.#relayError(e);
      case 'goaway':
        this.#emit('goaway', e);
        this.retryAfterMs = e.retryAfterMs;
        if (e.reason === GoAwayReason.KICKED) {
          // §14: no automatic reconnect before the app has a fresh token.
          this.#stop('kicked');
          return 'stop';
        }
        this.#connectionLost(`GOAWAY ${e.reason}: ${e.message}`);
        return 'stop';
    }
  }

  /** @param {import('../index').ErrorEvent} e */
  #relayError(e) {
    const err = new RelayError(e);
    if (e.fatal) {
      this.#emit('relayError', e);
      if (e.code === ErrorCode.UNSUPPORTED_VERSION && this.versionIndex + 1 < this.versions.length) {
        this.versionIndex++; // §5: an older version this client also speaks
        this.#connectionLost(e.message);
      } else if (e.code === ErrorCode.UNSUPPORTED_VERSION || e.code === ErrorCode.AUTH_FAILED) {
        for (const j of this.joining.splice(0)) j.reject(err);
        this.#stop(e.message);
      } else {
        this.#connectionLost(e.message);
      }
      return 'stop';
    }
    // A refused PUBLISH names its msg_id; a refused SUBSCRIBE names the room in its text.
    const refused = e.reference === 0 ? undefined : this.sent.get(e.reference);
    if (refused) {
      this.sent.delete(e.reference);
      refused.reject(err);
    } else if (e.reference === 0) {
      const i = this.joining.findIndex((j) => e.message === j.name || e.message.startsWith(`${j.name}:`));
      if (i >= 0) this.joining.splice(i, 1)[0].reject(err);
    }
    this.#emit('relayError', e);
  }

  #flushOutbox() {
    if (this.state !== 'open') return;
    const waiting = [];
    const v = this.#v();
    for (const m of this.outbox) {
      if (this.session.aliasOf(m.key) === undefined) {
        if (this.session.room(m.key)) waiting.push(m); // bound later by a ROOM
        else m.reject(new RangeError('no longer a member of that room'));
        continue;
      }
      if (m.ephemeral) {
        const { alias, ack } = this.session.publishEphemeral(m.key);
        this.#send(v.encodePublish({ alias, msgId: null, ack, payload: m.payload }));
        m.resolve(null);
      } else {
        // A republish keeps its msg_id on a version-2 connection (§12): the relay answers a
        // message it already stored with the original PUBACK and delivers nothing twice.
        const { alias, msgId, ack, idempotent } = this.session.publish(m.key, m.msgId);
        m.msgId = idempotent ? msgId : null;
        this.sent.set(msgId, m);
        this.#send(v.encodePublish({ alias, msgId, ack, payload: m.payload }));
      }
    }
    this.outbox = waiting;
  }

  #scheduleAck() {
    if (this.ackTimer !== null || this.state !== 'open') return;
    this.ackTimer = setTimeout(() => {
      this.ackTimer = null;
      this.#flushAcks();
    }, this.options.ackDelayMs);
  }

  #flushAcks() {
    if (this.state !== 'open') return;
    for (;;) {
      const pairs = this.session.takeAcks(DEFAULT_LIMITS.maxAckEntries);
      if (pairs.length === 0) return;
      this.#send(this.#v().encodeAck(pairs));
    }
  }

  /** Heartbeats (§13): ping after interval + timeout of silence, give up a timeout later. */
  #armHeartbeat() {
    this.#clearTimer('heartbeatTimer');
    const welcome = this.welcome;
    if (!welcome || this.state !== 'open') return;
    const timeout = this.options.heartbeatTimeoutMs;
    const silentLimit = welcome.heartbeatSecs * 1000 + timeout;
    const now = Date.now();
    let wait;
    if (this.pingSentMs !== 0) {
      if (now - this.pingSentMs >= timeout) return this.#fail('heartbeat', new Error('no answer to PING'));
      wait = this.pingSentMs + timeout - now;
    } else if (now - this.lastHeardMs >= silentLimit) {
      this.pingSentMs = now;
      this.#send(this.#v().encodePing(null));
      wait = timeout;
    } else {
      wait = this.lastHeardMs + silentLimit - now;
    }
    this.heartbeatTimer = setTimeout(() => {
      this.heartbeatTimer = null;
      this.#armHeartbeat();
    }, wait);
  }

  /** @param {Uint8Array} frame */
  #send(frame) {
    const ws = this.ws;
    if (ws && ws.readyState === 1) ws.send(frame);
  }

  /**
   * The connection is unusable (malformed input, a session rule broken, a dead heartbeat):
   * close it and reconnect; the resume list recovers what it carried.
   * @param {'protocol' | 'heartbeat'} kind
   * @param {Error} error
   */
  #fail(kind, error) {
    this.#emit('error', { kind, error });
    this.#connectionLost(error.message);
  }

  /** @param {string} why */
  #connectionLost(why) {
    this.#dropSocket();
    this.#emit('disconnected', { reason: why, retryAfterMs: this.retryAfterMs });
    this.#scheduleReconnect();
  }

  /**
   * Ends the connection for good (until {@link connect} is called again).
   * @param {string} why
   */
  #stop(why) {
    this.#dropSocket();
    this.#setState('closed', why);
  }

  /** Tears the connection's state down and closes its socket. */
  #dropSocket() {
    const ws = this.ws;
    this.#teardown();
    try {
      ws?.close();
    } catch {
      // already closing
    }
  }

  /** Ends the connection's state: in-flight publishes go back to the outbox, in order. */
  #teardown() {
    if (this.ws) {
      this.ws.onopen = this.ws.onmessage = this.ws.onclose = this.ws.onerror = null;
    }
    this.ws = null;
    this.decoder = null;
    this.welcome = null;
    this.pingSentMs = 0;
    this.#clearTimer('ackTimer');
    this.#clearTimer('heartbeatTimer');
    const resend = [...this.sent.values()];
    this.sent.clear();
    this.session.endConnection();
    this.outbox = [...resend, ...this.outbox];
  }

  /**
   * Waits the GOAWAY hint (if any) plus full jitter: uniform over
   * [0, min(cap, base · 2^attempt)], the attempt counting failures since the last WELCOME.
   */
  #scheduleReconnect() {
    if (this.options.reconnect === false) return this.#setState('closed', 'reconnect disabled');
    const ceiling = Math.min(this.options.backoffCapMs, this.options.backoffBaseMs * 2 ** this.attempt);
    const delay = this.retryAfterMs + Math.floor(this.random() * ceiling);
    this.retryAfterMs = 0;
    this.attempt++;
    this.#setState('waiting', null);
    this.#emit('reconnecting', { delayMs: delay, attempt: this.attempt });
    this.#reconnectAt(Date.now() + delay);
  }

  /**
   * Reconnects at `deadline` (wall clock), never before: a timer may fire early against the
   * wall clock (an event loop's cached time), and a GOAWAY's hint is a minimum.
   * @param {number} deadline
   */
  #reconnectAt(deadline) {
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      if (Date.now() < deadline) return this.#reconnectAt(deadline);
      this.#open();
    }, Math.max(0, deadline - Date.now()));
  }

  /** @param {'reconnectTimer' | 'ackTimer' | 'heartbeatTimer'} name */
  #clearTimer(name) {
    const t = this[name];
    if (t !== null) clearTimeout(t);
    this[name] = null;
  }

  /**
   * @param {'idle' | 'connecting' | 'open' | 'waiting' | 'closed'} state
   * @param {string | null} reason
   */
  #setState(state, reason) {
    if (this.state === state) return;
    this.state = state;
    this.#emit('state', { state, reason });
  }
}
