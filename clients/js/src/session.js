// @ts-check
/**
 * @module session
 * The client's side of the pabal protocol as a sans-IO state machine (PROTOCOL.md §6, §9,
 * §10, §17 items 2-7): the rooms it knows with their epochs and cursors (kept across
 * connections, the resume list of the next HELLO), and per connection the alias bindings,
 * own sequences, sender aliases, running time and messages in flight. `apply` turns each
 * relay frame into a complete event, or throws {@link SessionError} on any violation of the
 * cursor rules (never a silent skip or repeat).
 *
 * Owns: that state and its rules. Must not touch: sockets, timers or the clock (it reads
 * no time; the relay's times arrive in frames), frame layouts (the version modules).
 */

/** LEFT reasons (§14). */
export const LeftReason = Object.freeze({
  UNSUBSCRIBED: 0,
  REMOVED: 1,
  BLOCKED: 2,
  UNKNOWN_ROOM: 3,
  RESTARTED: 4,
});

/** A frame that breaks the session rules: the connection must end (and resume). */
export class SessionError extends Error {
  /**
   * @param {'before_welcome' | 'unknown_alias' | 'unknown_sender' | 'sequence_break' |
   *   'unknown_msg_id' | 'version_mismatch'} kind
   * @param {string} message
   */
  constructor(kind, message) {
    super(message);
    this.name = 'SessionError';
    this.kind = kind;
  }
}

/**
 * @typedef {object} RoomState what the client keeps of one room across connections
 * @property {bigint} roomId
 * @property {string} name
 * @property {boolean} channel
 * @property {bigint} epoch
 * @property {number} cursor the last sequence held (0: none)
 */

/**
 * @typedef {object} OwnSeqs the sequences of one room this connection published and got
 *   PUBACKs for: the relay skips them instead of echoing them, on every binding of the room
 *   (PROTOCOL.md §9). Kept per room for the life of the connection (a new epoch forgets them):
 *   a later binding may start below one the cursor has passed (on a cluster, a removal and a
 *   rejoin whose join point Redis took before the publish ran).
 * @property {bigint} epoch
 * @property {Array<[number, number]>} runs runs of consecutive sequences, ascending, apart;
 *   at most MAX_OWN_RUNS, the oldest dropped first
 */

/** @param {bigint} id */
const keyOf = (id) => id.toString(16);

/**
 * Runs of own sequences one room keeps. Past it the oldest go: a rebinding below one of them
 * then meets a DELIVER the session refuses (sequence_break), and the next connection resumes
 * without loss.
 */
const MAX_OWN_RUNS = 1024;

/**
 * The index of the first run ending at or after `seq`.
 * @param {OwnSeqs} own
 * @param {number} seq
 */
function runAt(own, seq) {
  let lo = 0;
  let hi = own.runs.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (own.runs[mid][1] < seq) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/**
 * Whether every sequence of `from..=to` is one of the room's own (runs are maximal: one holds
 * them all).
 * @param {OwnSeqs} own
 * @param {number} from
 * @param {number} to
 */
function ownCovers(own, from, to) {
  const end = ownRunEnd(own, from);
  return end !== null && to <= end;
}

/**
 * The last of the run that holds `seq`, or null.
 * @param {OwnSeqs} own
 * @param {number} seq
 */
function ownRunEnd(own, seq) {
  const run = own.runs[runAt(own, seq)];
  return run !== undefined && run[0] <= seq ? run[1] : null;
}

/** @param {OwnSeqs} own @param {number} seq */
function insertOwn(own, seq) {
  const i = runAt(own, seq);
  const next = own.runs[i];
  if (next && next[0] <= seq) return;
  const before = i > 0 && own.runs[i - 1][1] + 1 === seq;
  const after = next !== undefined && next[0] === seq + 1;
  if (before && after) {
    own.runs[i - 1][1] = next[1];
    own.runs.splice(i, 1);
  } else if (before) {
    own.runs[i - 1][1] = seq;
  } else if (after) {
    next[0] = seq;
  } else {
    own.runs.splice(i, 0, [seq, seq]);
    if (own.runs.length > MAX_OWN_RUNS) own.runs.shift();
  }
}

/**
 * A device id as a bigint: a bigint, or a string of 1 to 16 hex digits (the snapshot's form).
 * @param {bigint | string} id
 */
export function parseDeviceId(id) {
  const v = typeof id === 'bigint' ? id : /^[0-9a-fA-F]{1,16}$/.test(id) ? BigInt(`0x${id}`) : -1n;
  if (v < 0n || v > 0xffff_ffff_ffff_ffffn) throw new RangeError(`not a 64-bit device id: ${id}`);
  return v;
}

/** A device id drawn at random (64 bits, never 0). */
function randomDeviceId() {
  const words = new Uint32Array(2);
  do crypto.getRandomValues(words);
  while (words[0] === 0 && words[1] === 0);
  return (BigInt(words[0]) << 32n) | BigInt(words[1]);
}

export class Session {
  /**
   * @param {import('../index').SessionSnapshot} [snapshot] rooms, device id and message
   *   counter from an earlier run
   * @param {{ deviceId?: bigint | string, lastMsgId?: number }} [device] the app's own device
   *   id (default: the snapshot's, else drawn at random) and, for a device id the snapshot
   *   does not hold, its persisted counter (default 0)
   */
  constructor(snapshot, device = {}) {
    const saved = snapshot?.deviceId === undefined ? null : parseDeviceId(snapshot.deviceId);
    /** The device id a version-2 HELLO carries (§7): kept, with the counter, across runs. */
    this.deviceId = device.deviceId === undefined ? (saved ?? randomDeviceId()) : parseDeviceId(device.deviceId);
    /**
     * The last msg_id given out: the device's message counter (§12). It only grows, across
     * connections and (through the snapshot) runs, so no id is reused for another message.
     */
    this.lastMsgId = saved === this.deviceId ? (snapshot?.lastMsgId ?? 0) : (device.lastMsgId ?? 0);
    /** Whether this connection's msg_ids name messages across reconnects (version 2). */
    this.idempotent = false;
    /** @type {Map<string, RoomState>} rooms known, by id */
    this.rooms = new Map();
    for (const r of snapshot?.rooms ?? []) {
      const room = {
        roomId: BigInt(r.roomId),
        name: r.name,
        channel: r.channel,
        epoch: BigInt(r.epoch),
        cursor: r.cursor,
      };
      this.rooms.set(keyOf(room.roomId), room);
    }
    this.#resetConnection();
  }

  #resetConnection() {
    // The next connection resumes after the client's own sequences that follow each cursor
    // (§9): it holds them, and this connection's record of them ends here.
    if (this.own) for (const [key, room] of this.rooms) this.#foldOwn(key, room);
    this.welcomed = false;
    this.lastTsMs = 0;
    /** @type {Map<number, string>} alias → room key */
    this.aliases = new Map();
    /** @type {Map<string, number>} room key → alias */
    this.aliasOfRoom = new Map();
    /** @type {Map<number, string>} */
    this.senders = new Map();
    /** @type {Map<string, OwnSeqs>} own sequences per room */
    this.own = new Map();
    /** @type {Map<number, { alias: number, key: string }>} publishes awaiting PUBACK */
    this.inFlight = new Map();
    /** @type {Map<number, number>} alias → the highest sequence acknowledged to the relay */
    this.acked = new Map();
  }

  /**
   * Starts a connection: forgets the last one's per-connection state and returns HELLO's
   * resume list, binding entry i to alias i (§6.4).
   * @param {boolean} [device] the HELLO carries the device id (version 2): republishes keep
   *   their msg_ids on this connection
   * @returns {{ roomId: bigint, epoch: bigint, lastSeq: number }[]}
   */
  startConnection(device = false) {
    this.#resetConnection();
    this.idempotent = device;
    const entries = [];
    for (const [key, room] of this.rooms) {
      const alias = entries.length;
      this.#bind(alias, key);
      entries.push({ roomId: room.roomId, epoch: room.epoch, lastSeq: room.cursor });
    }
    return entries;
  }

  /** The connection ended: what was in flight is unconfirmed; the rooms stay. */
  endConnection() {
    const unconfirmed = [...this.inFlight.keys()];
    this.#resetConnection();
    return unconfirmed;
  }

  /**
   * The alias a room is bound to on this connection, if any.
   * @param {bigint} roomId
   */
  aliasOf(roomId) {
    return this.aliasOfRoom.get(keyOf(roomId));
  }

  /** @param {bigint} roomId */
  room(roomId) {
    return this.rooms.get(keyOf(roomId));
  }

  /**
   * Registers a PUBLISH about to be sent; returns its msg_id and the ack that rides along
   * (null when the relay already has the alias's cursor). A republish of a message whose
   * PUBACK never came passes the msg_id it had: on a version-2 connection it keeps it, so
   * the relay answers a repeat with the original PUBACK (§12); otherwise (version 1) it gets
   * a fresh one. `idempotent` in the result says whether the msg_id names the message across
   * reconnects (keep it for a republish).
   * @param {bigint} roomId a bound room
   * @param {number | null} [republishOf] the msg_id the message was sent with before
   */
  publish(roomId, republishOf = null) {
    const key = keyOf(roomId);
    const alias = this.aliasOfRoom.get(key);
    if (alias === undefined) throw new RangeError(`room ${key} is not bound`);
    const msgId = this.idempotent && republishOf !== null && republishOf > 0 ? republishOf : ++this.lastMsgId;
    this.inFlight.set(msgId, { alias, key });
    return { alias, msgId, ack: this.#takeAck(alias), idempotent: this.idempotent };
  }

  /**
   * An ephemeral publish's alias and piggybacked ack.
   * @param {bigint} roomId a bound room
   */
  publishEphemeral(roomId) {
    const alias = this.aliasOfRoom.get(keyOf(roomId));
    if (alias === undefined) throw new RangeError(`room ${keyOf(roomId)} is not bound`);
    return { alias, ack: this.#takeAck(alias) };
  }

  /**
   * Cumulative acks not yet sent, at most `max` pairs; marks them sent.
   * @param {number} max
   */
  takeAcks(max) {
    const pairs = [];
    for (const alias of this.aliases.keys()) {
      if (pairs.length === max) break;
      const seq = this.#takeAck(alias);
      if (seq !== null) pairs.push({ alias, seq });
    }
    return pairs;
  }

  /** @param {number} alias */
  #takeAck(alias) {
    const key = this.aliases.get(alias);
    const room = key === undefined ? undefined : this.rooms.get(key);
    if (!room || room.cursor <= (this.acked.get(alias) ?? 0)) return null;
    this.acked.set(alias, room.cursor);
    return room.cursor;
  }

  /**
   * What to keep for a later run (JSON-friendly: ids and epochs as strings): the rooms, and
   * the device id with its message counter, so a restarted app reuses no msg_id (§12).
   */
  snapshot() {
    return {
      deviceId: this.deviceId.toString(16).padStart(16, '0'),
      lastMsgId: this.lastMsgId,
      rooms: [...this.rooms].map(([key, r]) => ({
        roomId: r.roomId.toString(),
        name: r.name,
        channel: r.channel,
        epoch: r.epoch.toString(),
        cursor: this.#held(key, r),
      })),
    };
  }

  /**
   * Applies one relay frame.
   * @param {import('../index').RelayFrame} f
   * @returns {import('../index').SessionEvent}
   * @throws {SessionError}
   */
  apply(f) {
    if (!this.welcomed && f.type !== 'welcome' && f.type !== 'error' && f.type !== 'goaway') {
      throw new SessionError('before_welcome', `${f.type} before WELCOME`);
    }
    switch (f.type) {
      case 'welcome':
        this.welcomed = true;
        this.lastTsMs = f.serverTimeMs;
        return f;
      case 'room': {
        const key = keyOf(f.roomId);
        const old = this.rooms.get(key);
        const previousEpoch = old && old.epoch !== f.epoch ? old.epoch : null;
        const lost =
          old && (previousEpoch !== null || f.cursor < old.cursor)
            ? { epoch: old.epoch, after: old.cursor }
            : null;
        const room = { roomId: f.roomId, name: f.name, channel: f.channel, epoch: f.epoch, cursor: f.cursor };
        this.rooms.set(key, room);
        if (this.own.get(key)?.epoch !== f.epoch) this.own.delete(key);
        const previous = this.aliases.get(f.alias);
        if (previous !== undefined) this.aliasOfRoom.delete(previous);
        const oldAlias = this.aliasOfRoom.get(key);
        if (oldAlias !== undefined && oldAlias !== f.alias) this.aliases.delete(oldAlias);
        this.#bind(f.alias, key);
        this.acked.set(f.alias, f.cursor);
        return { type: 'room', alias: f.alias, room: publicRoom(room), head: f.head, lost };
      }
      case 'left': {
        const key = this.aliases.get(f.alias);
        if (key === undefined) throw new SessionError('unknown_alias', `LEFT for unbound alias ${f.alias}`);
        this.aliases.delete(f.alias);
        this.aliasOfRoom.delete(key);
        const room = /** @type {RoomState} */ (this.rooms.get(key));
        // §17.5: drop the room, except after LEFT Restarted: keep it and its cursor.
        if (f.reason !== LeftReason.RESTARTED) this.rooms.delete(key);
        return { type: 'left', alias: f.alias, room: publicRoom(room), reason: f.reason };
      }
      case 'puback': {
        const sent = this.inFlight.get(f.msgId);
        if (!sent) throw new SessionError('unknown_msg_id', `PUBACK for unknown msg_id ${f.msgId}`);
        this.inFlight.delete(f.msgId);
        const room = this.rooms.get(sent.key);
        const bound = this.aliases.get(sent.alias) === sent.key ? room : undefined;
        if (bound && f.seq === bound.cursor + 1) bound.cursor = f.seq;
        // Own either way: a later binding of the room may start below it.
        if (room) {
          let own = this.own.get(sent.key);
          if (!own || own.epoch !== room.epoch) {
            own = { epoch: room.epoch, runs: [] };
            this.own.set(sent.key, own);
          }
          insertOwn(own, f.seq);
        }
        return { type: 'puback', msgId: f.msgId, seq: f.seq, room: room ? publicRoom(room) : null };
      }
      case 'deliver': {
        const room = this.#bound(f.alias, 'DELIVER');
        if (f.sender !== null) this.senders.set(f.senderAlias, f.sender);
        const sender = this.senders.get(f.senderAlias);
        if (sender === undefined) {
          throw new SessionError('unknown_sender', `DELIVER from undefined sender alias ${f.senderAlias}`);
        }
        this.lastTsMs = Math.max(0, this.lastTsMs + f.tsDeltaMs);
        /** @type {number | null} */
        let seq = null;
        if (!f.ephemeral) {
          const next = room.cursor + 1;
          seq = f.seq ?? next;
          const stored = this.own.get(keyOf(room.roomId));
          const own = stored && stored.epoch === room.epoch ? stored : null;
          if (seq <= room.cursor || !Number.isSafeInteger(next)) {
            throw breakOf(f.alias, room.cursor, seq);
          }
          // Only the client's own may be skipped (one look-up however far it jumps).
          if (seq !== next && !(own && ownCovers(own, next, seq - 1))) throw breakOf(f.alias, room.cursor, seq);
          room.cursor = seq;
        }
        return {
          type: 'message',
          room: publicRoom(room),
          seq,
          sender,
          timeMs: this.lastTsMs,
          ephemeral: f.ephemeral,
          payload: f.payload,
        };
      }
      case 'receipt': {
        // §12 (version 3): members are named by sender aliases; an entry may define one.
        const room = this.#bound(f.alias, 'RECEIPT');
        const members = f.entries.map((e) => {
          if (e.name !== null) this.senders.set(e.memberAlias, e.name);
          const user = this.senders.get(e.memberAlias);
          if (user === undefined) {
            throw new SessionError('unknown_sender', `RECEIPT for undefined member alias ${e.memberAlias}`);
          }
          return { user, delivered: e.delivered, read: e.read };
        });
        return { type: 'receipt', room: publicRoom(room), members };
      }
      case 'gap': {
        const room = this.#bound(f.alias, 'GAP');
        if (f.from !== room.cursor + 1) throw breakOf(f.alias, room.cursor, f.from);
        room.cursor = f.to;
        return { type: 'gap', room: publicRoom(room), from: f.from, to: f.to };
      }
      default:
        return f;
    }
  }

  /**
   * Moves a room's cursor past the client's own sequences directly after it: their PUBACKs
   * stood in for their delivery. The cursor stops below them when a PUBACK came before the
   * DELIVERs of the sequences under it (on a cluster, another node's message still on its
   * way); a new connection resumes after them instead.
   * @param {string} key
   * @param {RoomState} room
   */
  #foldOwn(key, room) {
    room.cursor = this.#held(key, room);
  }

  /**
   * The last sequence of a room the client holds: its cursor, passed by its own sequences
   * directly after it.
   * @param {string} key
   * @param {RoomState} room
   * @returns {number}
   */
  #held(key, room) {
    const own = this.own.get(key);
    let held = room.cursor;
    if (!own || own.epoch !== room.epoch) return held;
    if (Number.isSafeInteger(held + 1)) held = ownRunEnd(own, held + 1) ?? held;
    return held;
  }

  /** @param {number} alias @param {string} key */
  #bind(alias, key) {
    this.aliases.set(alias, key);
    this.aliasOfRoom.set(key, alias);
  }

  /** @param {number} alias @param {string} frame */
  #bound(alias, frame) {
    const key = this.aliases.get(alias);
    const room = key === undefined ? undefined : this.rooms.get(key);
    if (!room) throw new SessionError('unknown_alias', `${frame} for unbound alias ${alias}`);
    return room;
  }
}

/** @param {RoomState} r @returns {import('../index').RoomInfo} */
function publicRoom(r) {
  return { roomId: r.roomId, name: r.name, channel: r.channel, epoch: r.epoch, cursor: r.cursor };
}

/** @param {number} alias @param {number} cursor @param {number} got */
function breakOf(alias, cursor, got) {
  return new SessionError('sequence_break', `alias ${alias}: cursor ${cursor}, got sequence ${got}`);
}
