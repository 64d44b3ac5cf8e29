// Types of the pabal JavaScript client (src/*.js are plain ES modules with JSDoc types that
// refer to these). See README.md "JavaScript client" and codec/PROTOCOL.md.

export type FrameErrorKind =
  | 'varint_overflow'
  | 'non_canonical_varint'
  | 'out_of_range'
  | 'truncated'
  | 'trailing_bytes'
  | 'too_long'
  | 'empty_name'
  | 'invalid_utf8'
  | 'unknown_frame_type'
  | 'undefined_flags'
  | 'empty_frame'
  | 'frame_too_large'
  | 'dead_stream';

export class FrameError extends Error {
  readonly kind: FrameErrorKind;
}

export class SessionError extends Error {
  readonly kind:
    | 'before_welcome'
    | 'unknown_alias'
    | 'unknown_sender'
    | 'sequence_break'
    | 'unknown_msg_id'
    | 'version_mismatch';
}

export class RelayError extends Error {
  readonly code: number;
  readonly reference: number;
  readonly fatal: boolean;
}

/** A room or channel as the client knows it. */
export interface RoomInfo {
  roomId: bigint;
  name: string;
  channel: boolean;
  epoch: bigint;
  /** The last sequence held (0: none). */
  cursor: number;
}

/** What to store to resume in a later run (JSON-friendly). */
export interface SessionSnapshot {
  rooms: { roomId: string; name: string; channel: boolean; epoch: string; cursor: number }[];
  /** The device id of version 2's HELLO, 16 hex digits (absent in older snapshots: drawn anew). */
  deviceId?: string;
  /** The device's last msg_id: restored with the same device id, so no id is reused (§12). */
  lastMsgId?: number;
}

// ---- relay frames, as decoded ----
export interface WelcomeEvent {
  type: 'welcome';
  version: number;
  connId: bigint;
  serverTimeMs: number;
  heartbeatSecs: number;
  maxFrameLen: number;
  user: string;
}
export interface RoomFrame {
  type: 'room';
  alias: number;
  roomId: bigint;
  epoch: bigint;
  cursor: number;
  head: number;
  name: string;
  channel: boolean;
}
export interface LeftFrame { type: 'left'; alias: number; reason: number }
export interface PubAckFrame { type: 'puback'; msgId: number; seq: number }
export interface DeliverFrame {
  type: 'deliver';
  alias: number;
  seq: number | null;
  senderAlias: number;
  sender: string | null;
  tsDeltaMs: number;
  ephemeral: boolean;
  payload: Uint8Array;
}
export interface GapFrame { type: 'gap'; alias: number; from: number; to: number }
export interface ErrorEvent { type: 'error'; fatal: boolean; code: number; reference: number; message: string }
export interface GoAwayEvent { type: 'goaway'; reason: number; retryAfterMs: number; message: string }
export interface HeartbeatFrame { type: 'ping' | 'pong'; intervalSecs: number | null }
/** One member's markers in a RECEIPT (version 3); `name` set when the entry defines the slot. */
export interface ReceiptEntry { memberAlias: number; name: string | null; delivered: number; read: number }
export interface ReceiptFrame { type: 'receipt'; alias: number; entries: ReceiptEntry[] }
export type RelayFrame =
  | WelcomeEvent | RoomFrame | LeftFrame | PubAckFrame | DeliverFrame | GapFrame
  | ErrorEvent | GoAwayEvent | HeartbeatFrame | ReceiptFrame;

// ---- session events ----
export interface RoomEvent {
  type: 'room';
  alias: number;
  room: RoomInfo;
  head: number;
  /** Set when the stream restarted: what came after `after` in `epoch` is lost (fetch it). */
  lost: { epoch: bigint; after: number } | null;
}
export interface LeftEvent { type: 'left'; alias: number; room: RoomInfo; reason: number }
export interface MessageEvent {
  type: 'message';
  room: RoomInfo;
  /** null for an ephemeral event. */
  seq: number | null;
  sender: string;
  /** The relay's acceptance time, ms since the Unix epoch. */
  timeMs: number;
  ephemeral: boolean;
  payload: Uint8Array;
}
export interface GapEvent { type: 'gap'; room: RoomInfo; from: number; to: number }
export interface PubAckEvent { type: 'puback'; msgId: number; seq: number; room: RoomInfo | null }
/** Version 3: members' delivered and read markers that moved in a room. */
export interface ReceiptEvent {
  type: 'receipt';
  room: RoomInfo;
  members: { user: string; delivered: number; read: number }[];
}
export type SessionEvent =
  | WelcomeEvent | RoomEvent | LeftEvent | MessageEvent | GapEvent | PubAckEvent
  | ErrorEvent | GoAwayEvent | HeartbeatFrame | ReceiptEvent;

export interface ClientEvents {
  welcome: WelcomeEvent;
  room: RoomEvent;
  left: LeftEvent;
  message: MessageEvent;
  gap: GapEvent;
  receipt: ReceiptEvent;
  puback: PubAckEvent;
  goaway: GoAwayEvent;
  relayError: ErrorEvent;
  error: { kind: 'protocol' | 'heartbeat' | 'token'; error: Error };
  disconnected: { reason: string; retryAfterMs: number };
  reconnecting: { delayMs: number; attempt: number };
  state: { state: 'idle' | 'connecting' | 'open' | 'waiting' | 'closed'; reason: string | null };
}

export interface ClientOptions {
  /** ws:// or wss:// address of the relay's WebSocket listener. */
  url: string;
  /** The credential (or, on a relay without auth, the user id); a function is called per connect. */
  token: string | Uint8Array | (() => string | Uint8Array | Promise<string | Uint8Array>);
  /** Heartbeat interval to ask for, seconds (0: the relay's default). */
  heartbeatSecs?: number;
  /** How long to wait for an answer to a PING, ms (default 30000). */
  heartbeatTimeoutMs?: number;
  /** Full-jitter backoff: base and cap of the window, ms (defaults 500 and 30000). */
  backoffBaseMs?: number;
  backoffCapMs?: number;
  /** How long received messages wait before their cumulative ACK, ms (default 100). */
  ackDelayMs?: number;
  /** Reconnect on its own after a drop (default true). */
  reconnect?: boolean;
  /** Protocol versions allowed (default: every version this client speaks, newest first). */
  versions?: number[];
  /** Rooms, cursors, device id and msg_id counter from an earlier run (PabalClient.snapshot()). */
  snapshot?: SessionSnapshot;
  /**
   * The device id sent in a version-2 HELLO (PROTOCOL.md §7), as a bigint or up to 16 hex
   * digits: an app that persists its own passes it here (default: the snapshot's, else drawn
   * at random per client). With it, a message republished after a dropped connection keeps
   * its msg_id and the relay stores it once (§12).
   */
  deviceId?: bigint | string;
  /** The persisted msg_id counter of `deviceId` when the snapshot is not of that device (default 0). */
  lastMsgId?: number;
  /** A WebSocket constructor (default: globalThis.WebSocket). */
  WebSocket?: typeof WebSocket;
  /** A source of uniform numbers in [0, 1) for the backoff jitter (default Math.random). */
  random?: () => number;
}

export class PabalClient {
  constructor(options: ClientOptions);
  readonly state: 'idle' | 'connecting' | 'open' | 'waiting' | 'closed';
  readonly welcome: WelcomeEvent | null;
  /** Connections opened so far. */
  readonly connects: number;
  /** The device id of version-2 HELLOs, 16 hex digits (also in snapshot()). */
  readonly deviceId: string;
  on<K extends keyof ClientEvents>(type: K, fn: (e: ClientEvents[K]) => void): () => void;
  connect(): void;
  close(): void;
  snapshot(): SessionSnapshot;
  rooms(): RoomInfo[];
  publish(
    name: string,
    payload: Uint8Array | string,
    opts?: { channel?: boolean; ephemeral?: boolean },
  ): Promise<number | null>;
  join(name: string, opts?: { channel?: boolean }): Promise<RoomInfo>;
  leave(name: string, opts?: { channel?: boolean; block?: boolean }): boolean;
  /** Version 3: READ up to `seq`; false when not sent (not bound, not open, older version). */
  read(name: string, seq: number, opts?: { channel?: boolean }): boolean;
}

export class FrameDecoder {
  constructor(version: { decodeRelayFrame: unknown }, limits?: Partial<Limits>);
  push(chunk: Uint8Array): RelayFrame[];
  allowFrameLen(maxFrameLen: number): void;
  buffered(): number;
}

export interface Limits {
  maxFrameLen: number;
  maxNameLen: number;
  maxTokenLen: number;
  maxResumeEntries: number;
  maxAckEntries: number;
  maxTextLen: number;
}

export class Session {
  constructor(snapshot?: SessionSnapshot, device?: { deviceId?: bigint | string; lastMsgId?: number });
  readonly deviceId: bigint;
  /** The device's message counter: the last msg_id given out. */
  readonly lastMsgId: number;
  /** Whether this connection keeps msg_ids across reconnects (version 2 with the device id). */
  readonly idempotent: boolean;
  /** `device`: the HELLO carries the device id (version 2). */
  startConnection(device?: boolean): { roomId: bigint; epoch: bigint; lastSeq: number }[];
  /** `republishOf`: the msg_id the message had; kept when `idempotent` (version 2). */
  publish(
    roomId: bigint,
    republishOf?: number | null,
  ): { alias: number; msgId: number; ack: number | null; idempotent: boolean };
  endConnection(): number[];
  apply(frame: RelayFrame): SessionEvent;
  snapshot(): SessionSnapshot;
}

export function roomId(channel: boolean, name: string): bigint;
export const ErrorCode: Readonly<Record<string, number>>;
export const GoAwayReason: Readonly<Record<string, number>>;
export const LeftReason: Readonly<Record<string, number>>;
export const VERSIONS: ReadonlyMap<number, unknown>;
export * as v1 from './src/v1.js';
export * as v2 from './src/v2.js';
export * as v3 from './src/v3.js';
