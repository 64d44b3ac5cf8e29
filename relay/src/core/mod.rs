//! One worker's state machine: its connections, the rooms it owns, and the routing between
//! them. Sans-IO: time comes in as an argument of every event ([`Core::admit`],
//! [`Core::on_bytes`], [`Core::on_sent`], [`Core::on_closed`], [`Core::handle`],
//! [`Core::run_timers`]); nothing inside reads a clock, touches a socket, sends to another
//! worker or sleeps. What it wants done leaves as outputs the runtime carries out: socket
//! operations through a [`Transport`] when [`Core::flush`] hands over what it queued,
//! message batches for other workers from [`Core::drain_mesh`], and server-API answers from
//! [`Core::drain_replies`]. The same core runs under the real runtime, the in-memory test
//! harness (`tests.rs`) and the deterministic multi-worker simulator (`sim.rs`).
//!
//! # Roles
//! - [`client`]: what a connection's frames do (HELLO, SUBSCRIBE, PUBLISH, ...).
//! - [`owner`]: the rooms this worker owns: sequencing, history, membership, join points.
//! - [`delivery`]: writing messages to this worker's connections: fan-out, catch-up, GAPs.
//! - [`control`]: server-API operations.
//! - [`receipts`]: per (user, room) delivered and read markers.
//! - [`handoff`]: offline hand-offs: members who did not receive messages in time.
//! - [`lifecycle`]: admitting and closing connections, timers, reloads, the shutdown drain.
//! - [`cluster`]: with `[cluster]`, the owner's publishes sequenced by the engine and the
//!   engine's messages fed in order into the same fan-out.
//!
//! # Routing
//! Every room has one owner worker (by hash of its id). The owner assigns sequences, keeps
//! history, and knows which workers hold subscribed connections (a count per worker). A
//! publish travels to the owner; the owner sends the PUBACK to the publisher's worker and
//! then one delivery per interested worker; each worker fans out to its own connections,
//! encoding one small header per connection in front of the one shared payload.
//!
//! # No loss, no duplicate, at every seam
//! A connection binds a room by asking the owner ([`CoreMsg::Subscribe`]); until the answer
//! to that very request comes, live deliveries for it are ignored, and the answer carries
//! everything after the requested start (never before the user's join point) up to the head
//! as of the answer (or the first page of it). Because messages between two workers keep
//! their order, every delivery after the answer has a higher sequence. A connection whose
//! queue reaches its cap stops taking live deliveries and catches up page by page from
//! history as it drains, then goes live the same way. Only history that retention already
//! dropped becomes a GAP.
//!
//! Owns: connections, owned rooms, local subscriptions, timers. Must not touch: sockets,
//! clocks, threads or channels (only outputs), other workers' state (only messages), the
//! membership directory beyond [`Membership`] calls.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pabal_codec::{Decoder, ErrorCode, ErrorFrame, LeftReason, Limits, ServerFrame, Text};

use crate::config::Config;
use crate::conn::{Conn, Phase, Stamp, TokenBucket};
use crate::directory::{DirectoryError, Membership};
use crate::ids::{CoreId, Origin, RoomName};
use crate::io::Token;
pub use crate::io::Transport;
use crate::io::slab::{Key, Slab};
use crate::mesh::{ControlReply, CoreMsg};
use crate::sender_name::SenderName;
use crate::stats::{CoreStats, inc};

/// Payloads shorter than this are copied out of the publisher's read buffer when accepted,
/// so that history never pins a whole receive buffer for a few bytes.
const COMPACT_BELOW: usize = 4096;
/// How long a closing connection may take to send its EOF after our half-close.
const LINGER: Duration = Duration::from_secs(2);
/// Ephemeral events held per lagging connection.
const EPHEMERAL_BACKLOG: usize = 64;
/// How long a room without members or subscribers waits before it is checked for eviction
/// (and rechecked while retention still holds messages of it).
const IDLE_ROOM_CHECK: Duration = Duration::from_secs(60);

/// What all workers share: counted or swapped per connection or per reload, never touched
/// per message.
#[derive(Debug, Default)]
pub struct Shared {
    /// Connections open on the whole relay.
    pub connections: AtomicUsize,
    /// The token verifier (`None` without auth); swapped on reload.
    pub verifier: parking_lot::RwLock<Option<Arc<crate::auth::Verifier>>>,
}

/// Shutdown progress.
#[derive(Debug, Default)]
struct Shutdown {
    draining: bool,
    fences: [usize; 2],
    goaways_sent: bool,
    deadline: Option<Instant>,
    stop: bool,
}

/// Wall-clock milliseconds derived from the monotonic clock: the caller tells the core, once,
/// which wall-clock time an instant stands for.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
    base_unix_ms: u64,
}

impl Clock {
    /// `base` (a monotonic instant) is `base_unix_ms` ms since the Unix epoch.
    pub fn new(base: Instant, base_unix_ms: u64) -> Self {
        Clock { base, base_unix_ms }
    }

    pub(super) fn unix_ms(&self, now: Instant) -> u64 {
        self.base_unix_ms + now.saturating_duration_since(self.base).as_millis() as u64
    }

    /// `t` as a connection's record keeps it: ms since the base, modulo 2^32 (see
    /// [`Stamp`]).
    pub(super) fn stamp(&self, t: Instant) -> Stamp {
        // Truncating to 32 bits is the modulo.
        Stamp(t.saturating_duration_since(self.base).as_millis() as u32)
    }

    /// A deadline as the timer heap keeps it: whole ms since the base, rounded up, so the
    /// entry is not due before the deadline is.
    pub(super) fn deadline_ms(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.base);
        since.as_millis() as u64 + u64::from(!since.subsec_nanos().is_multiple_of(1_000_000))
    }

    /// Whole ms from the base to `now`, rounded down: a heap entry at or below it is due.
    pub(super) fn elapsed_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_millis() as u64
    }

    /// The instant `ms` whole milliseconds after the base.
    pub(super) fn at_ms(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    /// The instant a past stamp stands for (at most `now`), on a whole millisecond: its
    /// stamp is the same stamp again, so a deadline computed from it and checked against it
    /// agree.
    pub(super) fn instant_of(&self, stamp: Stamp, now: Instant) -> Instant {
        let now_ms = now.saturating_duration_since(self.base).as_millis();
        let ms = now_ms.saturating_sub(u128::from(self.stamp(now).since(stamp)));
        self.base + Duration::from_millis(ms as u64)
    }
}

/// Where a server-API answer goes (the control plane awaits it).
pub type ReplyTo = tokio::sync::oneshot::Sender<ControlReply>;

/// One worker's state.
#[derive(Debug)]
pub struct Core {
    id: CoreId,
    cores: usize,
    config: Arc<Config>,
    decoder: Decoder,
    directory: Arc<dyn Membership>,
    /// Messages for each worker (this one's own are handled within the tick).
    outbox: Vec<Vec<CoreMsg>>,
    /// Server-API answers to hand back.
    replies: Vec<(ReplyTo, ControlReply)>,
    /// This worker's connections; a connection's token is its slab key (generation in the
    /// high 32 bits, slot in the low), so a stale token never reaches a slot's next occupant.
    conns: Slab<Conn>,
    next_conn_id: u64,
    dirty: Vec<Token>,
    to_close: Vec<Token>,
    close_listeners: bool,
    /// Boxed: a hash map keeps up to twice its entries in buckets, and a bucket of a boxed
    /// record costs a pointer, not the whole record.
    owned: HashMap<RoomName, Box<OwnedRoom>>,
    /// Each room's subscribed bindings on this worker (its fan-out list).
    local: HashMap<RoomName, FanOut>,
    /// The users' connections here, keyed by the user's shared handle (the directory's),
    /// searched with the name.
    users: UserConns,
    /// Connections' deadlines, ms since the clock's base ([`Clock::deadline_ms`]): 16 bytes
    /// an entry (24 with an `Instant`), one or two entries per connection; grown a quarter
    /// at a time and shrunk when mostly empty, not doubled (`Core::arm`, `run_timers`).
    timers: BinaryHeap<Reverse<(u64, Token)>>,
    /// Owned rooms that became unused, oldest first, with when to check them.
    idle_rooms: VecDeque<(Instant, RoomName)>,
    /// The next subscription request's id (answers are matched per request).
    next_request: u64,
    /// When this worker started (for `connection.restart_grace`).
    booted: Instant,
    /// The last epoch given to a room created here.
    last_epoch: u64,
    /// The last membership serial given here.
    last_serial: u64,
    epoch: u64,
    clock: Clock,
    now: Instant,
    shutdown: Shutdown,
    stats: Arc<CoreStats>,
    rng: crate::rng::SplitMix64,
    /// State shared by all workers (touched per connection, never per message).
    shared: Arc<Shared>,
    accept_bucket: TokenBucket,
    /// The worker's durable log and the outputs waiting on it (disk mode only).
    storage: Option<Box<durable::Durability>>,
    /// The worker's one read buffer: received bytes are decoded here; a connection keeps
    /// bytes of its own only for a partial frame ([`Conn::rbuf`]).
    read_scratch: BytesMut,
    /// The engine's side of the owner (`[cluster]` only).
    cluster: Option<Box<cluster::ClusterSide>>,
    /// Marker updates from this tick's ACKs and READs, for the rooms' owners.
    pending_markers: receipts::PendingMarkers,
    /// Offline hand-off: rooms' windows due, hand-offs found ([`handoff`]).
    handoff: handoff::Detection,
    /// Owned rooms whose members' markers moved, oldest first, with when their RECEIPT
    /// update is due.
    receipts_due: VecDeque<(Instant, RoomName)>,
}

/// A connection's token for its slab key, and back.
pub(super) fn token_of(key: Key) -> Token {
    (u64::from(key.generation) << 32) | u64::from(key.index)
}

fn key_of(token: Token) -> Key {
    Key {
        index: token as u32,
        generation: (token >> 32) as u32,
    }
}

/// The ERROR code of a refused join.
pub(super) fn join_refusal_code(e: &DirectoryError) -> ErrorCode {
    match e {
        DirectoryError::Blocked(_) => ErrorCode::NotPermitted,
        DirectoryError::Storage("storage_full") => ErrorCode::Overloaded,
        DirectoryError::Storage(_) => ErrorCode::Internal,
        _ => ErrorCode::LimitExceeded,
    }
}

/// Below this many entries, [`push_compact`] grows a list one entry at a time.
const EXACT_LIST: usize = 8;

/// Grown past [`EXACT_LIST`], a list gets this fraction of its length in spare slots.
const GROWTH_DIVISOR: usize = 8;

/// The timer heap grows by a quarter of its entries and this many more (see `Core::arm`).
const TIMER_HEAP_STEP: usize = 64;

/// Pushes onto a list that is usually short (a user's connections on this worker, a 1:1
/// room's subscribers here): while it is short it gets no spare capacity, which a vector's
/// doubling would give it (four slots for one entry) in every idle phone's lists. A long
/// one (a channel's subscribers) grows by an eighth, still amortised constant time per
/// push, with at most an eighth spare where doubling left up to half of it unused (a
/// 10,000-subscriber list held 16,384 slots).
pub(super) fn push_compact<T>(list: &mut Vec<T>, item: T) {
    if list.len() < EXACT_LIST {
        list.reserve_exact(1);
    } else if list.len() == list.capacity() {
        list.reserve_exact(list.len() / GROWTH_DIVISOR);
    }
    list.push(item);
}

/// One subscribed binding in a room's fan-out list on a worker: the connection's token in
/// its two 32-bit halves and the binding's alias, 12 bytes aligned to 4 (a `(Token, u32)`
/// pair took 16 with its padding: a 1:1 room's two subscribers were a 32-byte block, 24
/// now, and a 10,000-subscriber channel's list 160 KB, 120 now).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Subscriber {
    /// The token's low half (the slab slot) and high half (its generation).
    token: [u32; 2],
    alias: u32,
}

impl Subscriber {
    pub(super) fn new(token: Token, alias: u32) -> Self {
        Subscriber {
            token: [token as u32, (token >> 32) as u32],
            alias,
        }
    }

    pub(super) fn token(self) -> Token {
        u64::from(self.token[0]) | (u64::from(self.token[1]) << 32)
    }

    /// The token and the alias.
    pub(super) fn parts(self) -> (Token, u32) {
        (self.token(), self.alias)
    }
}

/// A room's subscribed bindings on a worker (its fan-out list): while short (at most
/// [`EXACT_LIST`]: a 1:1 room's two) an exact boxed slice, 16 bytes in the map's bucket (a
/// vector's 24 put 8 bytes more in every bucket, about 6.5 per idle phone at the map's
/// load factor); longer (a channel's), a boxed vector grown by [`push_compact`]. Changed
/// at each bind and unbind, never per message; read per message as a slice.
#[derive(Debug)]
pub(super) enum FanOut {
    /// At most [`EXACT_LIST`] entries, no spare slot.
    Short(Box<[Subscriber]>),
    /// More: grown by an eighth at a time.
    #[allow(clippy::box_collection)]
    // reason: the box keeps the enum at a boxed slice's 16 bytes, not a vector's 24
    Long(Box<Vec<Subscriber>>),
}

impl Default for FanOut {
    fn default() -> Self {
        FanOut::Short(Box::default())
    }
}

impl FanOut {
    /// The entries.
    pub(super) fn as_slice(&self) -> &[Subscriber] {
        match self {
            FanOut::Short(list) => list,
            FanOut::Long(list) => list,
        }
    }

    /// The entries, in no particular order.
    pub(super) fn iter(&self) -> std::slice::Iter<'_, Subscriber> {
        self.as_slice().iter()
    }

    /// Slots held, spare ones included.
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        match self {
            FanOut::Short(list) => list.len(),
            FanOut::Long(list) => list.capacity(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    /// Adds an entry; past [`EXACT_LIST`] the list becomes a growing vector.
    pub(super) fn push(&mut self, sub: Subscriber) {
        match self {
            FanOut::Short(list) => {
                let mut grown = std::mem::take(list).into_vec();
                if grown.len() < EXACT_LIST {
                    grown.reserve_exact(1);
                    grown.push(sub);
                    *list = grown.into_boxed_slice();
                } else {
                    push_compact(&mut grown, sub);
                    *self = FanOut::Long(Box::new(grown));
                }
            }
            FanOut::Long(list) => push_compact(list, sub),
        }
    }

    /// Removes the entry of `token` (a connection binds a room once); a long list that
    /// falls to half the short size becomes an exact slice again.
    pub(super) fn remove_token(&mut self, token: Token) {
        let Some(i) = self.iter().position(|s| s.token() == token) else {
            return;
        };
        match self {
            FanOut::Short(list) => {
                let mut left = std::mem::take(list).into_vec();
                left.swap_remove(i);
                *list = left.into_boxed_slice();
            }
            FanOut::Long(list) => {
                list.swap_remove(i);
                if list.len() <= EXACT_LIST / 2 {
                    *self = FanOut::Short(std::mem::take(&mut **list).into_boxed_slice());
                }
            }
        }
    }
}

/// A worker's users and their connections here: each user's first connection in one map
/// (16 bytes a bucket, the user's handle and a token: a phone's user has one connection),
/// the further ones of a user connected from several devices in another, empty while
/// every user has one. A map of the handle to a one-token-or-list enum took 24 bytes a
/// bucket (about 13 bytes more per idle phone at the map's load factor).
#[derive(Debug, Default)]
pub(super) struct UserConns {
    /// Each user's first connection on this worker.
    first: HashMap<crate::ids::UserName, Token>,
    /// The connections after the first, in the order they came; exact lists (changed at
    /// each connect and close of such a user, never per message).
    more: HashMap<crate::ids::UserName, Vec<Token>>,
}

impl UserConns {
    /// Adds a connection of `user` (the directory's handle, shared).
    pub(super) fn add(&mut self, user: &crate::ids::UserName, token: Token) {
        if !self.first.contains_key(user.as_str()) {
            self.first.insert(user.clone(), token);
            return;
        }
        let list = match self.more.get_mut(user.as_str()) {
            Some(list) => list,
            None => self.more.entry(user.clone()).or_default(),
        };
        list.reserve_exact(1);
        list.push(token);
    }

    /// Removes a connection of `user`; true if it was the user's last one here (the user's
    /// entry is gone then).
    pub(super) fn remove(&mut self, user: &str, token: Token) -> bool {
        let Some(first) = self.first.get_mut(user) else {
            return false;
        };
        let more = self.more.get_mut(user);
        if *first == token {
            let Some(list) = more else {
                self.first.remove(user);
                return true;
            };
            // The next one moves up (the list is never left empty).
            *first = list.remove(0);
            if list.is_empty() {
                self.more.remove(user);
            }
        } else if let Some(list) = more
            && let Some(i) = list.iter().position(|&t| t == token)
        {
            list.remove(i);
            if list.is_empty() {
                self.more.remove(user);
            } else {
                list.shrink_to_fit();
            }
        }
        false
    }

    /// The user's connections here, first to last.
    pub(super) fn tokens(&self, user: &str) -> Vec<Token> {
        let Some(&first) = self.first.get(user) else {
            return Vec::new();
        };
        let more = self.more.get(user).map_or(&[][..], Vec::as_slice);
        std::iter::once(first).chain(more.iter().copied()).collect()
    }

    /// Whether the user has a connection here.
    pub(super) fn contains(&self, user: &str) -> bool {
        self.first.contains_key(user)
    }

    /// The handle the user is keyed by (for tests of sharing).
    #[cfg(test)]
    pub(super) fn handle(&self, user: &str) -> Option<&crate::ids::UserName> {
        self.first.get_key_value(user).map(|(k, _)| k)
    }

    /// How many users have further connections here (for tests).
    #[cfg(test)]
    pub(super) fn users_with_more(&self) -> usize {
        self.more.len()
    }

    /// The bytes of one entry of the first connections' map, bucket size (for the guard).
    #[cfg(test)]
    pub(super) fn first_entry_bytes(&self) -> usize {
        std::mem::size_of::<(crate::ids::UserName, Token)>()
    }
}

/// The live connection for `token` in a slab (for methods that borrow other fields of the
/// core at the same time).
pub(super) fn conn_in(conns: &mut Slab<Conn>, token: Token) -> Option<&mut Conn> {
    conns.get_mut(key_of(token))
}

impl Core {
    /// The user's connections on this worker, copied out (the caller goes on to change the
    /// core while it walks them).
    pub(super) fn tokens_of(&self, user: &str) -> Vec<Token> {
        self.users.tokens(user)
    }

    /// A worker's state: worker `id` of `cores`. `epoch` is the relay's boot epoch: rooms
    /// created in this process get epochs from it on. `clock` tells the wall-clock time of
    /// `now`, the worker's start.
    #[allow(clippy::too_many_arguments)] // reason: everything a worker is made of, once
    pub fn new(
        id: CoreId,
        cores: usize,
        config: Arc<Config>,
        directory: Arc<dyn Membership>,
        epoch: u64,
        stats: Arc<CoreStats>,
        shared: Arc<Shared>,
        clock: Clock,
        now: Instant,
    ) -> Self {
        let accept_rate = config.limits.new_connections_per_second / cores as f64;
        let limits = Limits {
            max_frame_len: config.connection.max_frame_len,
            ..Limits::default()
        };
        directory.set_max_blocked_per_user(config.limits.max_blocked_per_user);
        let config_handoff_on = config.handoff.enabled();
        Core {
            id,
            cores,
            decoder: Decoder::new(limits),
            config,
            directory,
            outbox: (0..cores).map(|_| Vec::new()).collect(),
            replies: Vec::new(),
            conns: Slab::new(32),
            next_conn_id: 0,
            dirty: Vec::new(),
            to_close: Vec::new(),
            close_listeners: false,
            owned: HashMap::new(),
            local: HashMap::new(),
            users: UserConns::default(),
            timers: BinaryHeap::new(),
            idle_rooms: VecDeque::new(),
            next_request: 0,
            booted: now,
            last_epoch: 0,
            last_serial: 0,
            epoch,
            clock,
            now,
            shutdown: Shutdown::default(),
            stats,
            rng: crate::rng::SplitMix64::new(
                0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9),
            ),
            shared,
            accept_bucket: TokenBucket::new(accept_rate, accept_rate.max(1.0), now),
            storage: None,
            read_scratch: BytesMut::new(),
            cluster: None,
            pending_markers: receipts::PendingMarkers::default(),
            handoff: handoff::Detection::new(config_handoff_on),
            receipts_due: VecDeque::new(),
        }
    }

    /// Counts a loop iteration.
    pub fn tick(&self) {
        inc(&self.stats.ticks, 1);
    }

    /// Moves the worker's time forward to `now` (never back).
    pub(super) fn advance_to(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    pub(super) fn now_ms(&self) -> u64 {
        self.clock.unix_ms(self.now)
    }

    pub(super) fn random(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// The configuration in force on this worker.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Whether new connections are taken (not once draining).
    pub fn accepting(&self) -> bool {
        !self.shutdown.draining
    }

    /// Connections open on this worker.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The worker has finished its shutdown and its loop should end.
    pub fn finished(&self) -> bool {
        self.shutdown.stop || (self.shutdown.goaways_sent && self.conns.is_empty())
    }

    /// How long the loop may sleep before a timer is due.
    pub fn next_timeout(&self) -> Option<Duration> {
        let mut next = self
            .timers
            .peek()
            .map(|Reverse((at, _))| self.clock.at_ms(*at));
        for deadline in [
            self.shutdown.deadline,
            self.storage_deadline(),
            self.handoff.next_due(),
            self.receipts_deadline(),
        ]
        .into_iter()
        .flatten()
        {
            next = Some(next.map_or(deadline, |n| n.min(deadline)));
        }
        next.map(|at| at.saturating_duration_since(self.now))
    }

    /// Every connection's token, in slot order (the record does not keep its own: the slab
    /// key is the token).
    pub(super) fn tokens(&self) -> Vec<Token> {
        self.conns
            .iter_keyed()
            .map(|(key, _)| token_of(key))
            .collect()
    }

    pub(super) fn conn(&mut self, token: Token) -> Option<&mut Conn> {
        conn_in(&mut self.conns, token)
    }

    pub(super) fn origin(&self, token: Token) -> Origin {
        Origin {
            core: self.id,
            token,
        }
    }

    pub(super) fn send_to_owner(&mut self, room: &RoomName, msg: CoreMsg) {
        let owner = room.owner(self.cores);
        self.send_to(owner, msg);
    }

    pub(super) fn mark_dirty(dirty: &mut Vec<Token>, token: Token, conn: &mut Conn) {
        if !conn.dirty() {
            conn.set_dirty(true);
            dirty.push(token);
        }
    }

    pub(super) fn write(&mut self, token: Token, frame: &ServerFrame) {
        let Core { conns, dirty, .. } = self;
        if let Some(conn) = conn_in(conns, token) {
            conn.write(frame);
            Self::mark_dirty(dirty, token, conn);
        }
    }

    /// Makes `at` the connection's deadline if it is sooner than the one in force. Each
    /// connection has one deadline ([`Conn::timer_at`]); heap entries for other times are
    /// stale and skipped, so a connection never carries two timer chains.
    pub(super) fn arm(&mut self, token: Token, at: Instant) {
        let Some(conn) = conn_in(&mut self.conns, token) else {
            return;
        };
        let at_ms = self.clock.deadline_ms(at);
        // Truncating to 32 bits is the modulo (see `Stamp`).
        let (now, at_stamp) = (self.clock.stamp(self.now), Stamp(at_ms as u32));
        // Deadlines are compared by their distance from now (a stamp wraps; deadlines lie
        // within a day of now).
        let from_now = |t: Stamp| t.since(now) as i32;
        if conn
            .timer_at()
            .is_none_or(|t| from_now(at_stamp) < from_now(t))
        {
            conn.set_timer_at(Some(at_stamp));
            if self.timers.len() == self.timers.capacity() {
                // A quarter more, not double: the heap holds about one entry per
                // connection, and doubling left up to half of it spare (16 bytes an entry).
                self.timers
                    .reserve_exact(self.timers.len() / 4 + TIMER_HEAP_STEP);
            }
            self.timers.push(Reverse((at_ms, token)));
        }
    }

    // ---------------------------------------------------------------------------------
    // Connection lifecycle
    // ---------------------------------------------------------------------------------

    /// Refuses a request of the connection at `origin` (a non-fatal ERROR, through its
    /// worker).
    pub(super) fn refuse_origin(&mut self, origin: Origin, code: ErrorCode, message: String) {
        self.send_to(
            origin.core,
            CoreMsg::Refused {
                origin,
                code,
                reference: 0,
                message,
            },
        );
    }

    pub(super) fn refuse(
        &mut self,
        token: Token,
        code: ErrorCode,
        reference: u64,
        message: String,
    ) {
        self.write(
            token,
            &ServerFrame::Error(ErrorFrame {
                code,
                fatal: false,
                reference,
                message: Text::from(message),
            }),
        );
    }

    // ---------------------------------------------------------------------------------
    // Frames from clients
    // ---------------------------------------------------------------------------------

    // ---------------------------------------------------------------------------------
    // Messages from workers
    // ---------------------------------------------------------------------------------

    /// Handles a batch from another worker (or from the control plane) at `now`.
    pub fn handle(&mut self, now: Instant, batch: Vec<CoreMsg>) {
        self.advance_to(now);
        for msg in batch {
            self.handle_one(msg);
        }
    }

    pub(super) fn handle_one(&mut self, msg: CoreMsg) {
        let Some(msg) = self.cluster_gate(msg) else {
            return;
        };
        match msg {
            CoreMsg::Publish {
                room,
                by,
                sender,
                payload,
            } => {
                if let Err(e) = self.publish_once_from(room, by, sender, payload) {
                    let (code, message) = durable::error_of(&e);
                    tracing::debug!(error = %e, "publish refused by storage");
                    self.send_to(
                        by.origin.core,
                        CoreMsg::NotAccepted {
                            by,
                            code,
                            message: message.to_owned(),
                        },
                    );
                }
            }
            CoreMsg::Ephemeral {
                room,
                origin,
                sender,
                payload,
            } => {
                inc(&self.stats.ephemeral_in, 1);
                self.broadcast_ephemeral(&room, Some(origin), sender, payload);
            }
            CoreMsg::Subscribe {
                room,
                origin,
                alias,
                user,
                from,
                request,
            } => self.on_subscribe_request(room, origin, alias, &user, from, request),
            CoreMsg::Fetch {
                room,
                origin,
                alias,
                user,
                after,
                request,
            } => self.on_fetch(room, origin, alias, &user, after, request),
            CoreMsg::Unsubscribed { room, core } => {
                if let Some(owned) = self.owned.get_mut(&room) {
                    owned.interest[core] = owned.interest[core].saturating_sub(1);
                }
                self.note_if_unused(&room);
                self.cluster_release_if_unwatched(&room);
            }
            CoreMsg::Join {
                room,
                user,
                unblock,
                requester,
            } => {
                let cap = self.config.limits.max_rooms.div_ceil(self.cores);
                if let Some(origin) = requester
                    && !self.owned.contains_key(&room)
                    && self.owned.len() >= cap
                {
                    // A client may not make the relay hold ever more rooms by subscribing.
                    inc(&self.stats.limit_refusals, 1);
                    return self.send_to(
                        origin.core,
                        CoreMsg::Refused {
                            origin,
                            code: ErrorCode::LimitExceeded,
                            reference: 0,
                            message: format!(
                                "{}: the relay holds as many rooms as it may",
                                room.name
                            ),
                        },
                    );
                }
                if self.cluster.is_some() {
                    // Joined in the engine: core/cluster/members.rs.
                    // A copy of the name's bytes: a clone of the handle's `Text` would make its
                    // buffer shared (a header kept for as long as the user is connected).
                    let user = Text::from(user.as_str());
                    return self.cluster_join(room, user, unblock, requester);
                }
                if let Err(e) = self.join_member(&room, &user, unblock) {
                    if !matches!(e, DirectoryError::Blocked(_)) {
                        inc(&self.stats.limit_refusals, 1);
                    }
                    if let Some(origin) = requester {
                        let message = format!("{}: {e}", room.name);
                        self.refuse_origin(origin, join_refusal_code(&e), message);
                    }
                }
            }
            CoreMsg::Leave {
                room,
                user,
                block,
                reason,
            } => {
                if self.cluster.is_some() {
                    self.cluster_leave(room, Text::from(user.as_str()), block, reason);
                } else {
                    self.leave_member(&room, &user, block, reason);
                }
            }
            CoreMsg::Control { op, reply } => {
                let answer = self.control(op);
                self.reply(reply, answer);
            }
            CoreMsg::Markers(updates) => self.on_markers(updates),
            CoreMsg::Receipts {
                room,
                epoch,
                markers,
            } => self.on_receipts(&room, epoch, &markers),
            CoreMsg::Accepted { by, seq } => self.on_accepted(by, seq),
            CoreMsg::NotAccepted { by, code, message } => self.on_not_accepted(by, code, message),
            CoreMsg::Refused {
                origin,
                code,
                reference,
                message,
            } => self.refuse(origin.token, code, reference, message),
            CoreMsg::Subscribed {
                room,
                origin,
                alias,
                epoch,
                head,
                start,
                page,
                request,
            } => self.on_subscribed(room, origin.token, alias, epoch, head, start, page, request),
            CoreMsg::Paged {
                room,
                origin,
                alias,
                page,
                request,
            } => self.on_paged(&room, origin.token, alias, page, request),
            CoreMsg::NotMember {
                room,
                origin,
                alias,
                request,
            } => {
                let token = origin.token;
                if let Some(conn) = self.conn(token)
                    && conn
                        .sub_for(alias, &room)
                        .is_some_and(|s| s.request == request)
                {
                    self.unbind(token, alias, LeftReason::Removed);
                }
            }
            CoreMsg::Deliver { room, msg } => self.fan_out(&room, &msg),
            CoreMsg::DeliverEphemeral {
                room,
                origin,
                sender,
                ts_ms,
                payload,
            } => self.fan_out_ephemeral(&room, origin, &sender, ts_ms, &payload),
            CoreMsg::MemberJoined { room, user, join } => self.on_member_joined(room, user, join),
            CoreMsg::MemberLeft {
                room,
                user,
                reason,
                serial,
            } => self.on_member_left(room, user, reason, serial),
            CoreMsg::Restarted { room, epoch } => self.on_restarted(&room, epoch),
            CoreMsg::Drain => self.begin_drain(),
            CoreMsg::Fence { round } => self.on_fence(round),
            CoreMsg::Probe { seq } => {
                self.stats.probe_ack.store(seq, Ordering::Relaxed);
            }
            CoreMsg::Reload(config) => self.reload(config),
            CoreMsg::Stop => {
                self.shutdown.stop = true;
                let tokens: Vec<Token> = self.tokens();
                for token in tokens {
                    self.close_now(token);
                }
                self.close_listeners = true;
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // Shutdown
    // ---------------------------------------------------------------------------------

    // ---------------------------------------------------------------------------------
    // Timers
    // ---------------------------------------------------------------------------------

    // ---------------------------------------------------------------------------------
    // Flush
    // ---------------------------------------------------------------------------------

    /// Hands what the connections have queued this tick to the sockets: at most one send
    /// per connection with output, reading paused or resumed, half-closes and closes.
    /// Messages this worker sent itself are handled first, in order, until none are left;
    /// messages for other workers stay for [`Core::drain_mesh`].
    pub fn flush<T: Transport + ?Sized>(&mut self, transport: &mut T) {
        self.send_pending_markers();
        loop {
            let own = std::mem::take(&mut self.outbox[self.id]);
            if own.is_empty() {
                break;
            }
            for msg in own {
                self.handle_one(msg);
            }
        }
        if std::mem::take(&mut self.close_listeners) {
            transport.close_listeners();
        }
        for token in self.to_close.drain(..) {
            transport.close(token);
        }
        let cap = self.config.connection.max_queued_bytes;
        for token in std::mem::take(&mut self.dirty) {
            let Some(conn) = conn_in(&mut self.conns, token) else {
                continue;
            };
            conn.set_dirty(false);
            // Backpressure on input: a client that does not read its replies stops being
            // read until its queue drains.
            let want_reading = conn.reading() && conn.queued() < cap && !self.shutdown.draining;
            if want_reading != conn.backend_reading() {
                transport.set_reading(token, want_reading);
                conn.set_backend_reading(want_reading);
            }
            let queued = conn.queued() as u64;
            if queued
                > self
                    .stats
                    .queue_high_water
                    .load(std::sync::atomic::Ordering::Relaxed)
            {
                self.stats
                    .queue_high_water
                    .fetch_max(queued, std::sync::atomic::Ordering::Relaxed);
            }
            if conn.retire_ping_due() && conn.writable() {
                // After LEFTs: the PONG tells when the client can no longer name the
                // retired aliases for their old rooms.
                conn.ping();
            }
            if !conn.sending() && conn.has_output() {
                let bytes = conn.take_batch();
                inc(&self.stats.bytes_out, bytes as u64);
                inc(&self.stats.sends, 1);
                transport.send(token, conn.batch());
            }
            if conn.phase() == Phase::Closing
                && !conn.sending()
                && !conn.has_output()
                && !conn.shut()
            {
                conn.set_shut(true);
                transport.shutdown_write(token);
            }
        }
    }

    /// Hands each worker the batch of messages queued for it (one batch per worker per
    /// tick, in the order queued). Call after [`Core::flush`].
    pub fn drain_mesh(&mut self, mut send: impl FnMut(CoreId, Vec<CoreMsg>)) {
        for core in 0..self.cores {
            if core != self.id && !self.outbox[core].is_empty() {
                send(core, std::mem::take(&mut self.outbox[core]));
            }
        }
    }

    /// Hands back the server-API answers computed since the last call.
    pub fn drain_replies(&mut self, mut reply: impl FnMut(ReplyTo, ControlReply)) {
        for (to, answer) in self.replies.drain(..) {
            reply(to, answer);
        }
    }
}

mod client;
mod cluster;
mod control;
mod delivery;
mod durable;
mod handoff;
mod lifecycle;
mod members;
mod owner;
mod receipts;
mod stream_pages;

#[cfg(test)]
mod sim;
#[cfg(any(test, feature = "test-hooks"))]
pub(crate) mod test_wire;
#[cfg(test)]
mod tests;

use delivery::room_frame;
use owner::OwnedRoom;
pub use receipts::Marker;
