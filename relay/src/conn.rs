//! One client connection's state on its worker: read buffer, outbound queue, bound aliases
//! and their stream positions, heartbeat bookkeeping.
//!
//! Owns: the bytes queued for one socket and the per-alias cursors that decide how each
//! DELIVER is encoded. Must not touch: other connections, rooms, the backend (the worker
//! hands the queue to the backend when it flushes).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pabal_codec::{DeliverContext, DeliverHeader, ServerFrame};

use crate::ids::RoomName;
use crate::mesh::StartFrom;
use crate::sender_name::SenderName;

mod rate;

pub use rate::{Bucket, BucketRates, RateBuckets, TokenBucket};

/// Payloads at least this long travel as their own shared buffer in the send batch (a
/// vectored send) instead of being copied into the connection's buffer.
pub const SHARED_PAYLOAD_MIN: usize = 2048;

/// The most bytes a DELIVER's length prefix and header fields take besides the sender's
/// name: varints for the length, alias, sequence, sender alias, name length and timestamp
/// delta, and the type byte.
const DELIVER_FIELDS_MAX: usize = 64;

/// An upper bound on the bytes a DELIVER of `payload_len` bytes from `sender` takes queued
/// (the sender's name counts in case it must be defined in this frame).
pub fn deliver_bound(payload_len: usize, sender: &SenderName) -> usize {
    payload_len + sender.len() + DELIVER_FIELDS_MAX
}

/// Below this many aliases a connection's bindings grow one at a time.
const EXACT_SUBS: usize = 8;

/// Spare output buffers kept by one worker's pool.
const OUT_POOL_BUFFERS: usize = 256;
/// Output buffers with more spare capacity than this are freed rather than pooled.
const OUT_POOL_BUFFER_MAX: usize = 16 * 1024;

/// What a connection has queued or in flight. A connection holds one only while it has
/// something to send: it takes one from the worker's pool and gives it back once everything
/// it queued is written, so an idle connection holds a `None` instead of two buffers and a
/// list (80 bytes of its record).
#[derive(Debug, Default)]
struct Output {
    /// Frames encoded and not yet handed to the backend.
    out: BytesMut,
    /// Batches ready for the backend, in order.
    pending: VecDeque<Bytes>,
    pending_bytes: usize,
    inflight_bytes: usize,
}

thread_local! {
    /// The worker's pool of [`Output`]s, with their buffers. Per thread, and a worker's core
    /// runs on its own thread: the pool is the worker's, never shared or locked across cores.
    #[allow(clippy::vec_box)] // reason: the boxes themselves are what is pooled (a connection holds one)
    static OUTPUT_POOL: RefCell<Vec<Box<Output>>> = const { RefCell::new(Vec::new()) };
}

/// Batch lists longer than this are freed rather than pooled.
const PENDING_POOL_MAX: usize = 64;

/// A spare output from this worker's pool (a new, unallocated one when the pool is empty).
fn take_output() -> Box<Output> {
    OUTPUT_POOL
        .with(|pool| pool.borrow_mut().pop())
        .unwrap_or_default()
}

/// Gives an emptied output back to this worker's pool (or frees it), keeping its buffers
/// unless they grew large.
fn give_output(mut output: Box<Output>) {
    if output.out.capacity() > OUT_POOL_BUFFER_MAX || !output.out.is_empty() {
        output.out = BytesMut::new();
    }
    if output.pending.capacity() > PENDING_POOL_MAX {
        output.pending = VecDeque::new();
    }
    output.pending.clear();
    output.pending_bytes = 0;
    output.inflight_bytes = 0;
    OUTPUT_POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < OUT_POOL_BUFFERS {
            pool.push(output);
        }
    });
}

/// A time on a worker's clock, kept in a connection's record: milliseconds since the
/// worker's base instant, modulo 2^32 (4 bytes instead of an `Instant`'s 16). The worker
/// converts (`Core::stamp`, `Core::instant_of`); a stamp is only ever read as an age
/// (`now.since(stamp)`), which is exact while the age is under 2^32 ms (49.7 days). Every
/// stamp a connection keeps is refreshed far sooner: `last_rx` and the PING's time within
/// a heartbeat interval and timeout (at most a day: `heartbeat.max_interval`), the
/// handshake's only while it lasts, the token buckets' at every heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp(pub u32);

impl Stamp {
    /// Milliseconds from `earlier` to `self` (`self` no earlier than `earlier`).
    pub fn since(self, earlier: Stamp) -> u32 {
        self.0.wrapping_sub(earlier.0)
    }
}

/// A heartbeat interval in ms, as a record keeps it (saturating: the config bounds it to a
/// day).
pub fn heartbeat_ms(interval: Duration) -> u32 {
    u32::try_from(interval.as_millis()).unwrap_or(u32::MAX)
}

/// Where a connection stands in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepted; waiting for HELLO.
    Handshake,
    /// Open.
    Open,
    /// A fatal error is decided but publishes this connection sent before it are still
    /// with their rooms' owners: their PUBACKs go out first, then the ERROR, so the ERROR is
    /// the last frame. Nothing is read or delivered meanwhile.
    Failing,
    /// Closing: the last frame is queued; flushing it, then half-closed, waiting for the
    /// peer's EOF. Nothing more is written.
    Closing,
}

/// How a pending binding was asked for (decides whether a ROOM frame is needed and whether
/// the client saw the alias before the owner's answer). The start's epoch and sequence wait
/// in the binding's `epoch` and `cursor` meanwhile (see [`Sub::start_from`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    /// [`StartFrom::Live`].
    Live,
    /// [`StartFrom::Resume`].
    Resume,
    /// [`StartFrom::Join`].
    Join,
}

/// How a bound alias is being fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubMode {
    /// Asked the room's owner; waiting for its answer. Deliveries are ignored.
    Pending {
        /// How the binding was asked for. Only the kind lives here (1 byte); a
        /// [`StartFrom`] kept in every binding took 24 bytes of each [`Sub`].
        from: StartKind,
    },
    /// Behind the room's head: fed page by page from history, not from live deliveries.
    CatchingUp {
        /// A page request is in flight.
        fetching: bool,
    },
    /// At the head: fed by live deliveries.
    Live,
}

/// `Sub::acked_behind`'s value for "no acknowledgement held": nothing acknowledged yet, or
/// an acknowledgement more than `u32::MAX - 1` sequences behind the position (the explicit
/// fallback of the 4-byte field: it reads as 0, and the client's next ACK restates it).
const NO_ACK: u32 = u32::MAX;

/// A bound alias: 56 bytes (it was 80 with the pending start kept in every binding and the
/// acknowledgement a full `u64`).
#[derive(Debug, Clone)]
pub struct Sub {
    /// The room.
    pub room: RoomName,
    /// The epoch of the room's stream (while pending: the requested start's epoch).
    pub epoch: u64,
    /// The client's cursor: the last sequence it has accounted for. DELIVER omits the
    /// sequence when it is `cursor + 1`. While pending: the requested start's sequence
    /// (the owner's answer sets the cursor; nothing reads it before).
    pub cursor: u64,
    /// The last sequence processed for this connection, including the client's own
    /// messages that are skipped rather than echoed (`position >= cursor`). While pending:
    /// 0, or where PUBACKs of the client's own messages right after a resumed cursor moved
    /// the client's cursor (the owner's answer then starts past them). Moved only by
    /// [`Sub::set_position`], which keeps `acked` where it was.
    position: u64,
    /// The membership this binding was made for (its serial; see `JoinPoint::serial`): a
    /// removal of another membership leaves it alone.
    pub membership: u64,
    /// The subscription request this binding waits for (or was answered by): answers to
    /// any other request, e.g. one still in flight from an earlier membership, are stale.
    pub request: u64,
    /// The highest sequence the client acknowledged (never past `position`), as its
    /// distance below `position`, or [`NO_ACK`].
    acked_behind: u32,
    /// How it is fed.
    pub mode: SubMode,
}

impl Sub {
    /// A binding waiting for the owner's answer to `request`, asked to start `from`.
    pub fn pending(room: RoomName, from: StartFrom, request: u64, membership: u64) -> Self {
        let (kind, epoch, seq) = match from {
            StartFrom::Live => (StartKind::Live, 0, 0),
            StartFrom::Resume { epoch, last_seq } => (StartKind::Resume, epoch, last_seq),
            StartFrom::Join { epoch, seq } => (StartKind::Join, epoch, seq),
        };
        Sub {
            room,
            epoch,
            cursor: seq,
            position: 0,
            membership,
            request,
            acked_behind: NO_ACK,
            mode: SubMode::Pending { from: kind },
        }
    }

    /// Waiting for the owner's answer ([`SubMode::Pending`]).
    pub fn is_pending(&self) -> bool {
        matches!(self.mode, SubMode::Pending { .. })
    }

    /// The start this binding asked for, while it waits for the owner's answer.
    pub fn start_from(&self) -> Option<StartFrom> {
        let SubMode::Pending { from } = self.mode else {
            return None;
        };
        Some(match from {
            StartKind::Live => StartFrom::Live,
            StartKind::Resume => StartFrom::Resume {
                epoch: self.epoch,
                last_seq: self.cursor,
            },
            StartKind::Join => StartFrom::Join {
                epoch: self.epoch,
                seq: self.cursor,
            },
        })
    }

    /// The last sequence processed for this connection (see the field).
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Moves the position to `seq`, keeping the acknowledgement where it was.
    pub fn set_position(&mut self, seq: u64) {
        let acked = self.acked();
        self.position = seq;
        self.acked_behind = behind(seq, acked);
    }

    /// The highest sequence the client acknowledged (0 for none).
    pub fn acked(&self) -> u64 {
        match self.acked_behind {
            NO_ACK => 0,
            behind => self.position - u64::from(behind),
        }
    }

    /// Records an acknowledgement of `seq` (at most the position): whether it moved. One
    /// more than `u32::MAX - 1` sequences below the position is not held (the field's
    /// explicit limit): it moves nothing, and an ACK nearer the position does.
    pub fn ack(&mut self, seq: u64) -> bool {
        let acked = seq.min(self.position);
        if acked <= self.acked() {
            return false;
        }
        match behind(self.position, acked) {
            NO_ACK => false,
            held => {
                self.acked_behind = held;
                true
            }
        }
    }
}

/// `acked`'s distance below `position` as `Sub::acked_behind` keeps it: [`NO_ACK`] for
/// nothing acknowledged, or for a distance the field cannot hold.
fn behind(position: u64, acked: u64) -> u32 {
    if acked == 0 {
        return NO_ACK;
    }
    position
        .checked_sub(acked)
        .and_then(|d| u32::try_from(d).ok())
        .filter(|&d| d != NO_ACK)
        .unwrap_or(NO_ACK)
}

/// A connection's bound aliases (index = alias). Up to two bindings (a phone's 1:1 room
/// and a channel) live inline in the record, as two slots; a third moves them all into a
/// vector. Inline, an idle phone's bindings take no heap block (two of them in an exact
/// vector took a 112-byte block, its allocator overhead and the vector's 24 bytes here).
/// Reads as a slice of slots: an unbound alias is `None`, an alias past the end unknown.
#[derive(Debug)]
pub enum Bindings {
    /// Aliases 0 and 1.
    Inline([Option<Sub>; INLINE_SUBS]),
    /// Any number of aliases.
    Spilled(Vec<Option<Sub>>),
}

/// Bindings held in the connection's record before they move to a vector.
const INLINE_SUBS: usize = 2;

impl Default for Bindings {
    fn default() -> Self {
        Bindings::Inline([None, None])
    }
}

impl From<Vec<Option<Sub>>> for Bindings {
    /// Inline when the slots fit, the vector itself otherwise (every slot kept: a free
    /// one may be a retired alias that [`Conn::free_alias`] must not hand out again).
    fn from(subs: Vec<Option<Sub>>) -> Self {
        if subs.len() > INLINE_SUBS {
            return Bindings::Spilled(subs);
        }
        let mut inline = Bindings::default();
        for (slot, sub) in inline.iter_mut().zip(subs) {
            *slot = sub;
        }
        inline
    }
}

impl Bindings {
    /// The bound aliases' bindings, in alias order.
    pub fn into_bound(self) -> impl Iterator<Item = Sub> {
        let (inline, spilled) = match self {
            Bindings::Inline(slots) => (slots, Vec::new()),
            Bindings::Spilled(subs) => ([None, None], subs),
        };
        inline.into_iter().chain(spilled).flatten()
    }

    /// Adds a free slot at the end (moving inline slots to a vector).
    fn push_free(&mut self) {
        match self {
            Bindings::Inline(slots) => {
                let mut spilled = Vec::with_capacity(INLINE_SUBS + 1);
                spilled.extend(slots.iter_mut().map(Option::take));
                spilled.push(None);
                *self = Bindings::Spilled(spilled);
            }
            Bindings::Spilled(subs) => {
                // A phone binds a few rooms: no spare slots (56 bytes each) for those.
                if subs.len() < EXACT_SUBS {
                    subs.reserve_exact(1);
                }
                subs.push(None);
            }
        }
    }
}

impl std::ops::Deref for Bindings {
    type Target = [Option<Sub>];

    fn deref(&self) -> &[Option<Sub>] {
        match self {
            Bindings::Inline(slots) => slots,
            Bindings::Spilled(subs) => subs,
        }
    }
}

impl std::ops::DerefMut for Bindings {
    fn deref_mut(&mut self) -> &mut [Option<Sub>] {
        match self {
            Bindings::Inline(slots) => slots,
            Bindings::Spilled(subs) => subs,
        }
    }
}

/// The state only some connections need, boxed apart so that the record of an idle phone
/// stays small.
#[derive(Debug, Default)]
pub struct Rare {
    /// Latest ephemeral event per (alias, sender) held back while the queue is full.
    pub ephemeral_backlog: Vec<(u32, SenderName, u64, Bytes)>,
    /// When closing began.
    pub closing_since: Option<Instant>,
    /// The fatal ERROR to send once `publishes_in_flight` reaches zero ([`Phase::Failing`]).
    pub fatal: Option<ServerFrame>,
    /// Aliases unbound (LEFT sent) that may not be bound again yet, each with the number of
    /// PONGs that frees it (the PINGs unanswered when it was retired, and the one that
    /// follows the LEFT): until the client has answered a PING sent after the LEFT, a frame
    /// naming the alias may still be one it sent for the old room.
    pub retired: Vec<(u32, u32)>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.ephemeral_backlog.is_empty()
            && self.closing_since.is_none()
            && self.fatal.is_none()
            && self.retired.is_empty()
    }
}

/// Defines a connection's yes/no states as bits of [`Conn`]'s flags, each with a reader and
/// a setter named after it.
macro_rules! conn_flags {
    ($($(#[$doc:meta])* $get:ident, $set:ident = $bit:expr;)*) => {
        impl Conn {
            $(
                $(#[$doc])*
                pub fn $get(&self) -> bool {
                    self.flags & $bit != 0
                }

                #[doc = concat!("Sets [`Conn::", stringify!($get), "`].")]
                pub fn $set(&mut self, on: bool) {
                    if on {
                        self.flags |= $bit;
                    } else {
                        self.flags &= !$bit;
                    }
                }
            )*
        }
    };
}

conn_flags! {
    /// A batch is with the backend.
    sending, set_sending = 1 << 0;
    /// In the worker's list of connections to flush this tick.
    dirty, set_dirty = 1 << 1;
    /// Fed from history because the queue hit its cap.
    lagging, set_lagging = 1 << 2;
    /// Half-closed already.
    shut, set_shut = 1 << 3;
    /// A PING must follow the LEFTs queued since the last one (see [`Rare::retired`]).
    retire_ping_due, set_retire_ping_due = 1 << 4;
    /// A service connection (trusted app server): exempt from the publish rate limit and
    /// allowed to publish anywhere.
    service, set_service = 1 << 5;
    /// Protocol v3: the session takes RECEIPT frames and may send READ.
    receipts, set_receipts = 1 << 6;
    /// Reading is wanted by the protocol (false while draining for shutdown).
    reading, set_reading = 1 << 7;
    /// Whether the backend is currently reading this socket (it starts reading on accept).
    backend_reading, set_backend_reading = 1 << 8;
}

/// [`Conn::flags`]: a heartbeat PING is outstanding (since [`Conn::since`]).
const PING_OUTSTANDING: u16 = 1 << 9;
/// [`Conn::flags`]: a deadline is in force (at [`Conn::timer_at`]).
const TIMER_ARMED: u16 = 1 << 10;
/// [`Conn::flags`]: where the [`Phase`] is kept (two bits).
const PHASE_SHIFT: u32 = 11;
const PHASE_MASK: u16 = 0b11 << PHASE_SHIFT;

/// One client connection: 216 bytes (the test
/// `an_idle_connection_holds_no_buffers_and_a_compact_record` guards it).
#[derive(Debug)]
pub struct Conn {
    /// Bytes received but not yet decoded (at most one partial frame); `None` without
    /// one, which is how an idle connection is (8 bytes of its record instead of 32).
    #[allow(clippy::box_collection)] // reason: the box is what keeps an idle record small
    pub rbuf: Option<Box<BytesMut>>,
    /// What is queued or in flight (`None` while idle: see [`Output`]).
    output: Option<Box<Output>>,
    /// The authenticated user, once open.
    pub user: Option<crate::ids::UserName>,
    /// What only some connections need (`None` until one does).
    pub rare: Option<Box<Rare>>,
    /// What the token allows (`None` without auth: everything a client may do).
    pub claims: Option<Box<crate::auth::Claims>>,
    /// Protocol v2: who this connection publishes as, a hash of the user and HELLO's device
    /// id; its publishes' ids are `(publisher, msg_id)`, recognised by rooms when repeated.
    /// 0: version 1 or no device id (no recognition).
    pub publisher: u64,
    /// Bound aliases (index = alias).
    pub subs: Bindings,
    /// DELIVER encoding state.
    pub ctx: DeliverContext<SenderName>,
    /// Last time anything arrived.
    pub last_rx: Stamp,
    /// While handshaking, when the connection was accepted; once open, when the
    /// outstanding heartbeat PING was sent, if one is ([`PING_OUTSTANDING`]). One field
    /// for both: the handshake's deadline is the only reader of the first, and no PING is
    /// sent before the session opens.
    since: Stamp,
    /// The one heartbeat/handshake/linger deadline in force, if one is ([`TIMER_ARMED`]);
    /// timer entries for any other time are stale and ignored, so a connection has exactly
    /// one timer chain.
    timer_at: Stamp,
    /// The negotiated heartbeat interval, ms (at most `heartbeat.max_interval`, a day).
    pub heartbeat_ms: u32,
    /// Publishes sent to their rooms' owners and not yet answered.
    pub publishes_in_flight: u32,
    /// PINGs the relay sent on this connection that the client has not answered yet (each
    /// PONG answers the oldest). Counts of all PINGs and PONGs took 16 bytes; saturating,
    /// though a client cannot leave 2^32 PINGs unanswered: the relay sends one per
    /// heartbeat and one per flush that queued a LEFT, and a client that answers none is
    /// closed at its heartbeat timeout.
    pub pings_unanswered: u32,
    /// Publishes, and SUBSCRIBE and UNSUBSCRIBE frames, allowed per second
    /// (`limits.publish_rate`, `publish_burst`, `subscribe_rate`, `subscribe_burst`).
    pub buckets: RateBuckets,
    /// Page requests in flight (at most the worker's page budget, itself at most
    /// `u16::MAX`).
    pub fetches: u16,
    /// The yes/no states (see `conn_flags!`), whether a PING is outstanding and a deadline
    /// armed, and the [`Phase`]: 2 bytes, where a `bool` each, two `Option<Stamp>`s' tags
    /// and the phase took 26.
    flags: u16,
}

impl Conn {
    /// A new connection in the handshake phase, reading.
    pub fn new(now: Stamp, heartbeat: Duration, buckets: RateBuckets) -> Self {
        let mut conn = Conn {
            rbuf: None,
            output: None,
            user: None,
            rare: None,
            claims: None,
            publisher: 0,
            subs: Bindings::default(),
            ctx: DeliverContext::new(0),
            last_rx: now,
            since: now,
            timer_at: now,
            heartbeat_ms: heartbeat_ms(heartbeat),
            publishes_in_flight: 0,
            pings_unanswered: 0,
            buckets,
            fetches: 0,
            flags: 0,
        };
        conn.set_phase(Phase::Handshake);
        conn.set_reading(true);
        conn.set_backend_reading(true);
        conn
    }

    /// Where it stands.
    pub fn phase(&self) -> Phase {
        match (self.flags & PHASE_MASK) >> PHASE_SHIFT {
            0 => Phase::Handshake,
            1 => Phase::Open,
            2 => Phase::Failing,
            _ => Phase::Closing,
        }
    }

    /// Moves to `phase`.
    pub fn set_phase(&mut self, phase: Phase) {
        let bits: u16 = match phase {
            Phase::Handshake => 0,
            Phase::Open => 1,
            Phase::Failing => 2,
            Phase::Closing => 3,
        };
        self.flags = (self.flags & !PHASE_MASK) | (bits << PHASE_SHIFT);
    }

    /// When the connection was accepted (read only while handshaking: see the field).
    pub fn accepted_at(&self) -> Stamp {
        self.since
    }

    /// When the outstanding heartbeat PING was sent, if one is.
    pub fn ping_sent(&self) -> Option<Stamp> {
        (self.flags & PING_OUTSTANDING != 0).then_some(self.since)
    }

    /// A heartbeat PING was sent at `at` (the session is open).
    pub fn set_ping_sent(&mut self, at: Stamp) {
        self.since = at;
        self.flags |= PING_OUTSTANDING;
    }

    /// The heartbeat was answered: the PING's time, if one was outstanding.
    pub fn take_ping_sent(&mut self) -> Option<Stamp> {
        let sent = self.ping_sent();
        self.flags &= !PING_OUTSTANDING;
        sent
    }

    /// The deadline in force, if one is.
    pub fn timer_at(&self) -> Option<Stamp> {
        (self.flags & TIMER_ARMED != 0).then_some(self.timer_at)
    }

    /// Makes `at` the deadline in force (`None`: none).
    pub fn set_timer_at(&mut self, at: Option<Stamp>) {
        match at {
            Some(at) => {
                self.timer_at = at;
                self.flags |= TIMER_ARMED;
            }
            None => self.flags &= !TIMER_ARMED,
        }
    }

    /// Bytes queued or in flight.
    pub fn queued(&self) -> usize {
        self.output
            .as_ref()
            .map_or(0, |o| o.out.len() + o.pending_bytes + o.inflight_bytes)
    }

    /// Whether a frame of (at most) `frame_len` bytes fits the connection's window of
    /// `window` queued bytes. An empty queue takes any one frame, so a frame larger than the
    /// window still goes out, alone.
    pub fn window_allows(&self, frame_len: usize, window: usize) -> bool {
        let queued = self.queued();
        queued == 0 || queued + frame_len <= window
    }

    /// Whether anything waits to be handed to the backend.
    pub fn has_output(&self) -> bool {
        self.output
            .as_ref()
            .is_some_and(|o| !o.out.is_empty() || !o.pending.is_empty())
    }

    /// Whether frames may still be queued: not once closing, when the last frame (a GOAWAY
    /// or a fatal ERROR) is already queued and the socket is about to be half-closed.
    pub fn writable(&self) -> bool {
        self.phase() != Phase::Closing
    }

    /// Whether the session is open for deliveries (not handshaking, failing or closing).
    pub fn is_open(&self) -> bool {
        self.phase() == Phase::Open
    }

    /// The output, taken from the worker's pool if the connection holds none.
    fn output(&mut self) -> &mut Output {
        self.output.get_or_insert_with(take_output)
    }

    /// Queues a frame (dropped once closing: see [`Conn::writable`]).
    pub fn write(&mut self, frame: &ServerFrame) {
        if self.writable() {
            frame.encode(&mut self.output().out);
        }
    }

    /// Queues a DELIVER: the per-connection header, then the shared payload (copied when
    /// small, referenced when large). Dropped once closing.
    pub fn write_deliver(&mut self, header: &DeliverHeader<SenderName>, payload: &Bytes) {
        if !self.writable() {
            return;
        }
        let o = self.output();
        header.encode_prefix(payload.len(), &mut o.out);
        if payload.len() >= SHARED_PAYLOAD_MIN {
            let head = o.out.split().freeze();
            o.pending_bytes += head.len() + payload.len();
            o.pending.push_back(head);
            o.pending.push_back(payload.clone());
        } else {
            o.out.extend_from_slice(payload);
        }
    }

    /// Moves everything queued into `pending` for a send; returns the batch's size.
    pub fn take_batch(&mut self) -> usize {
        let o = self.output();
        if !o.out.is_empty() {
            let tail = o.out.split().freeze();
            o.pending_bytes += tail.len();
            o.pending.push_back(tail);
        }
        let bytes = o.pending_bytes;
        o.inflight_bytes = bytes;
        o.pending_bytes = 0;
        self.set_sending(true);
        bytes
    }

    /// The batch [`Conn::take_batch`] made, for the backend (which takes its contents).
    pub fn batch(&mut self) -> &mut VecDeque<Bytes> {
        &mut self.output().pending
    }

    /// The backend finished the batch in flight. A connection with nothing more to send
    /// gives its output buffers back to the worker's pool.
    pub fn batch_sent(&mut self) {
        self.set_sending(false);
        if let Some(o) = &mut self.output {
            o.inflight_bytes = 0;
        }
        if !self.has_output()
            && let Some(output) = self.output.take()
        {
            give_output(output);
        }
    }

    /// The user as a message's sender (no one before HELLO): the connection's name record,
    /// shared, so a publish copies nothing and allocates nothing for its sender (the room's
    /// history and every recipient's sender table hold the same record).
    pub fn sender(&self) -> SenderName {
        self.user
            .as_ref()
            .map_or_else(SenderName::default, |u| SenderName::User(u.clone()))
    }

    /// The connection's rare state, made on first use.
    pub fn rare_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_default()
    }

    /// Frees the rare state once nothing is left in it.
    pub fn trim_rare(&mut self) {
        if self.rare.as_ref().is_some_and(|r| r.is_empty()) {
            self.rare = None;
        }
    }

    /// The lowest free alias: unbound and not retired (see [`Rare::retired`]).
    pub fn free_alias(&mut self) -> u32 {
        let retired: &[(u32, u32)] = self.rare.as_ref().map_or(&[], |r| &r.retired);
        let free = self
            .subs
            .iter()
            .enumerate()
            .position(|(i, s)| s.is_none() && !retired.iter().any(|&(a, _)| a as usize == i));
        match free {
            Some(i) => i as u32,
            None => {
                self.subs.push_free();
                (self.subs.len() - 1) as u32
            }
        }
    }

    /// An alias was unbound with a LEFT: it stays out of use until the client answers the
    /// PING that will follow the LEFT (queued at the next flush).
    pub fn retire(&mut self, alias: u32) {
        let pongs = self.pings_unanswered.saturating_add(1);
        self.rare_mut().retired.push((alias, pongs));
        self.set_retire_ping_due(true);
    }

    /// Queues a PING (heartbeat or retirement), counting it.
    pub fn ping(&mut self) {
        self.write(&ServerFrame::Ping(pabal_codec::Ping::default()));
        self.pings_unanswered = self.pings_unanswered.saturating_add(1);
        self.set_retire_ping_due(false);
    }

    /// The client answered a PING: aliases retired before it are free again. A PONG with
    /// no PING unanswered frees nothing.
    pub fn pong(&mut self) {
        if self.pings_unanswered == 0 {
            return;
        }
        self.pings_unanswered -= 1;
        if let Some(rare) = &mut self.rare {
            for (_, pongs) in &mut rare.retired {
                *pongs -= 1;
            }
            rare.retired.retain(|&(_, pongs)| pongs > 0);
        }
        self.trim_rare();
    }

    /// The alias bound to `room`, if any.
    pub fn alias_of(&self, room: &RoomName) -> Option<u32> {
        self.subs
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| &s.room == room))
            .map(|i| i as u32)
    }

    /// The sub bound to `alias`, if it is bound to `room`.
    pub fn sub_for(&mut self, alias: u32, room: &RoomName) -> Option<&mut Sub> {
        self.subs
            .get_mut(alias as usize)?
            .as_mut()
            .filter(|s| &s.room == room)
    }

    /// Bound aliases.
    pub fn bound(&self) -> usize {
        self.subs.iter().filter(|s| s.is_some()).count()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use pabal_codec::Text;

    use super::*;

    const ONE_A_SECOND: BucketRates = BucketRates {
        publish: rate::Rate {
            per_sec: 1.0,
            burst: 1.0,
        },
        subscribe: rate::Rate {
            per_sec: 1.0,
            burst: 1.0,
        },
    };

    fn idle_conn() -> Conn {
        let t0 = Stamp(0);
        let buckets = RateBuckets::full(ONE_A_SECOND, t0);
        Conn::new(t0, Duration::from_secs(30), buckets)
    }

    #[test]
    fn an_idle_connection_holds_no_buffers_and_a_compact_record() {
        let mut conn = idle_conn();
        // Rare state (backlogs, retired aliases, a pending fatal ERROR) lives apart; times
        // are 32-bit stamps (they were `Instant`s, 16 bytes each: 352 bytes), and a partial
        // frame's buffer is boxed (an empty one took 32 bytes); the user's name is an 8-byte
        // shared handle (a 32-byte `Text`: 240 bytes); two bindings live in it (216 bytes
        // with a 24-byte vector of them, which took a heap block of its own; 312 with the
        // DELIVER state's sender-alias bound and hand as usizes; 296 with counts of every
        // PING and PONG instead of the PINGs unanswered, and page requests as a u32; 280
        // with the backend's token, which is the slab key, and the relay-wide id, which is
        // only sent in WELCOME, kept in it; 264 with the DELIVER state's sender table
        // inline, empty; 240 with a byte per yes/no state and for the phase, the PING's and
        // the deadline's times as `Option<Stamp>`s, the accept time apart from the PING's,
        // and a stamp per rate bucket).
        let record = std::mem::size_of::<Conn>();
        eprintln!("the connection record: {record} bytes");
        assert!(
            record <= 216,
            "the connection record grew to {record} bytes"
        );
        assert!(
            std::mem::size_of::<Bindings>() <= 2 * std::mem::size_of::<Option<Sub>>() + 8,
            "two inline bindings and a tag"
        );
        // The DELIVER encoding state: the last timestamp and the sender table, made on the
        // first sender (40 bytes with the table's list, bound and hand inline; 48 with the
        // bound and hand as usizes).
        assert!(std::mem::size_of::<DeliverContext<SenderName>>() <= 16);
        assert!(
            !conn.ctx.senders().is_made(),
            "nothing sent: no sender table"
        );
        assert!(conn.rbuf.is_none());
        conn.ping();
        assert!(conn.queued() > 0 && conn.output.as_ref().is_some_and(|o| o.out.capacity() > 0));
        conn.take_batch();
        // The backend takes the batch (`Transport::send` swaps the list's contents out).
        conn.batch().clear();
        conn.batch_sent();
        assert_eq!(conn.queued(), 0);
        assert!(conn.output.is_none(), "the output went back to the pool");
        // The next frame takes it, with its buffer, from the pool again.
        conn.ping();
        assert!(conn.output.as_ref().is_some_and(|o| o.out.capacity() > 0));
        // Two bindings take the record's two slots, no heap block.
        for (expected, name) in [(0, "a"), (1, "b")] {
            let alias = conn.free_alias();
            assert_eq!(alias, expected);
            conn.subs[alias as usize] = Some(Sub::pending(
                RoomName::new(false, Text::from(name)),
                StartFrom::Join { epoch: 1, seq: 0 },
                1,
                1,
            ));
        }
        assert!(matches!(conn.subs, Bindings::Inline(_)));
        // A binding: the room's shared name, its epoch, cursor and position (sequences are
        // u64 on the wire), its membership serial and request id, the acknowledgement as a
        // 4-byte distance below the position, and how it is fed (a byte: a pending start's
        // epoch and sequence wait in the epoch and cursor). It was 128 bytes with the room's
        // name inline, 80 with the start and the acknowledgement in full.
        let sub = std::mem::size_of::<Option<Sub>>();
        assert!(sub <= 56, "a binding grew to {sub} bytes");
        // Retiring an alias makes the rare state; the PONG that frees it drops it again.
        conn.retire(0);
        assert!(conn.rare.is_some());
        conn.ping();
        while conn.pings_unanswered > 0 {
            conn.pong();
        }
        assert!(conn.rare.is_none());
    }

    #[test]
    fn the_flags_the_phase_and_the_shared_stamps_read_back_what_was_set() {
        let mut conn = idle_conn();
        assert_eq!(conn.phase(), Phase::Handshake);
        let flags = |c: &Conn| {
            [
                c.sending(),
                c.dirty(),
                c.lagging(),
                c.shut(),
                c.retire_ping_due(),
                c.service(),
                c.receipts(),
                c.reading(),
                c.backend_reading(),
            ]
        };
        let mut expected = [false, false, false, false, false, false, false, true, true];
        assert_eq!(flags(&conn), expected);
        // Each flag moves alone, and none moves the phase or the others.
        let setters: [fn(&mut Conn, bool); 9] = [
            Conn::set_sending,
            Conn::set_dirty,
            Conn::set_lagging,
            Conn::set_shut,
            Conn::set_retire_ping_due,
            Conn::set_service,
            Conn::set_receipts,
            Conn::set_reading,
            Conn::set_backend_reading,
        ];
        for (i, set) in setters.iter().enumerate() {
            expected[i] = !expected[i];
            set(&mut conn, expected[i]);
            assert_eq!(flags(&conn), expected, "flag {i}");
            assert_eq!(conn.phase(), Phase::Handshake);
        }
        for phase in [
            Phase::Open,
            Phase::Failing,
            Phase::Closing,
            Phase::Handshake,
        ] {
            conn.set_phase(phase);
            assert_eq!(conn.phase(), phase);
            assert_eq!(flags(&conn), expected, "the phase moved a flag");
        }
        // The accept time reads back while handshaking; no PING is outstanding.
        let mut conn = Conn::new(
            Stamp(7),
            Duration::from_secs(30),
            RateBuckets::full(ONE_A_SECOND, Stamp(7)),
        );
        assert_eq!((conn.accepted_at(), conn.ping_sent()), (Stamp(7), None));
        assert_eq!(conn.take_ping_sent(), None);
        // Open: a PING at any stamp, the clock's last included, reads back until answered.
        conn.set_phase(Phase::Open);
        conn.set_ping_sent(Stamp(u32::MAX));
        assert_eq!(conn.ping_sent(), Some(Stamp(u32::MAX)));
        assert_eq!(conn.take_ping_sent(), Some(Stamp(u32::MAX)));
        assert_eq!((conn.ping_sent(), conn.take_ping_sent()), (None, None));
        // A deadline at stamp 0 is a deadline, none is none.
        assert_eq!(conn.timer_at(), None);
        conn.set_timer_at(Some(Stamp(0)));
        assert_eq!(conn.timer_at(), Some(Stamp(0)));
        conn.set_ping_sent(Stamp(3));
        assert_eq!(
            conn.timer_at(),
            Some(Stamp(0)),
            "the PING moved the deadline"
        );
        conn.set_timer_at(None);
        assert_eq!((conn.timer_at(), conn.ping_sent()), (None, Some(Stamp(3))));
        assert_eq!(conn.phase(), Phase::Open);
    }

    #[test]
    fn a_retired_alias_is_freed_by_the_pong_to_the_ping_after_its_left() {
        let mut conn = idle_conn();
        conn.ping();
        conn.ping(); // two heartbeats unanswered
        conn.retire(0);
        conn.pong(); // the first heartbeat's
        assert_eq!(conn.free_alias(), 1, "alias 0 is retired");
        conn.ping(); // the PING after the LEFT
        conn.ping(); // and another heartbeat
        conn.pong(); // the second heartbeat's
        assert_eq!(conn.free_alias(), 1, "its PING is not answered yet");
        conn.pong(); // the PING after the LEFT
        assert!(conn.rare.is_none());
        assert_eq!(conn.free_alias(), 0, "free again");
        conn.pong();
        conn.pong(); // one more than was sent: nothing to answer
        assert_eq!(conn.pings_unanswered, 0);
        conn.retire(0);
        assert_eq!(
            conn.free_alias(),
            1,
            "the extra PONGs answered nothing later"
        );
        conn.ping();
        conn.pong();
        assert_eq!(conn.free_alias(), 0);
    }

    #[test]
    fn bindings_spill_past_two_keeping_every_alias() {
        let mut conn = idle_conn();
        let bind = |conn: &mut Conn, name: &str| {
            let alias = conn.free_alias();
            conn.subs[alias as usize] = Some(Sub::pending(
                RoomName::new(false, Text::from(name)),
                StartFrom::Live,
                1,
                1,
            ));
            alias
        };
        assert_eq!((bind(&mut conn, "a"), bind(&mut conn, "b")), (0, 1));
        // A third moves all three to a vector, exact, with the first two where they were.
        assert_eq!(bind(&mut conn, "c"), 2);
        let Bindings::Spilled(subs) = &conn.subs else {
            panic!("three bindings do not fit inline");
        };
        assert_eq!(subs.capacity(), 3);
        for (alias, name) in ["a", "b", "c"].into_iter().enumerate() {
            let room = RoomName::new(false, Text::from(name));
            assert_eq!(conn.alias_of(&room), Some(alias as u32));
        }
        // An unbound, retired alias is not handed out again until its PONG.
        conn.subs[1] = None;
        conn.retire(1);
        assert_eq!(bind(&mut conn, "d"), 3);
        assert_eq!(conn.bound(), 3);
        let bound: Vec<_> = std::mem::take(&mut conn.subs)
            .into_bound()
            .map(|s| s.room.name.clone())
            .collect();
        assert_eq!(bound, ["a", "c", "d"].map(Text::from));

        // A HELLO's slots: two or fewer go inline, free ones kept as slots; more stay a
        // vector with every slot, a free (retired) last one included.
        let sub = |name: &str| {
            Some(Sub::pending(
                RoomName::new(true, Text::from(name)),
                StartFrom::Live,
                1,
                1,
            ))
        };
        let two = Bindings::from(vec![None, sub("x")]);
        assert!(matches!(&two, Bindings::Inline([None, Some(_)])));
        let three = Bindings::from(vec![sub("x"), sub("y"), None]);
        assert_eq!(three.len(), 3);
        let mut conn = idle_conn();
        conn.subs = three;
        conn.retire(2);
        assert_eq!(
            conn.free_alias(),
            3,
            "the retired last slot stays out of use"
        );
    }

    #[test]
    fn a_bindings_compact_positions_read_back_exactly_and_overflow_explicitly() {
        let room = RoomName::new(false, Text::from("dm"));
        // A pending binding keeps the start it asked for in its epoch and cursor fields.
        let far = u64::MAX - 7;
        for from in [
            StartFrom::Live,
            StartFrom::Resume {
                epoch: 1_764_358_800_123,
                last_seq: far,
            },
            StartFrom::Join { epoch: 9, seq: 41 },
        ] {
            let sub = Sub::pending(room.clone(), from, 3, 4);
            assert_eq!(sub.start_from(), Some(from));
            assert_eq!((sub.position(), sub.acked()), (0, 0));
        }
        let mut sub = Sub::pending(room, StartFrom::Live, 1, 1);
        assert!(!sub.ack(5), "nothing processed: nothing to acknowledge");
        // Answered: the binding starts at sequence 2^40, beyond any 32-bit field.
        let start = 1u64 << 40;
        sub.mode = SubMode::Live;
        sub.set_position(start);
        assert_eq!(sub.start_from(), None);
        assert_eq!(sub.acked(), 0);
        assert!(
            sub.ack(start + 9),
            "an ACK past the position counts up to it"
        );
        assert_eq!(sub.acked(), start);
        sub.set_position(start + 100);
        assert_eq!(
            sub.acked(),
            start,
            "the position moves, the acknowledgement stays"
        );
        assert!(!sub.ack(start - 1) && sub.acked() == start);
        assert!(sub.ack(start + 60) && sub.acked() == start + 60);
        // The acknowledgement's distance at the field's limit still reads back exactly.
        let limit = start + 60 + u64::from(NO_ACK - 1);
        sub.set_position(limit);
        assert_eq!(sub.acked(), start + 60);
        // One further: the fallback, no acknowledgement held (never a wrapped value).
        sub.set_position(limit + 1);
        assert_eq!(sub.acked(), 0);
        assert!(!sub.ack(start + 60), "too far below the position to hold");
        assert_eq!(sub.acked(), 0);
        assert!(
            sub.ack(limit) && sub.acked() == limit,
            "a near ACK restates it"
        );
    }
}
