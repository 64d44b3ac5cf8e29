//! Several relay nodes on one engine (`[cluster]`, Redis): every room's sequence is
//! assigned by the engine, so any phone on any node sees one order, and a node's death costs
//! its phones a reconnect.
//!
//! # How a message travels
//! A room still has one owner worker per node ([`crate::core`]). A publish reaching it goes
//! to the engine as one Lua script on the room's keys ([`script`]): the room's epoch (created
//! once in a meta hash), `HINCRBY` of its sequence, `XADD` to its capped stream
//! (`cluster.stream_max_len`), `PUBLISH` to its channel with epoch, sequence and the
//! publishing node's tag. The script's answer is the PUBACK's sequence. Every node where a
//! connection binds the room subscribes its channel; a message from the channel, or the
//! script's answer (handed over once its copy on the channel was read: [`copies`]), enters
//! the owner's history and the same per-worker fan-out as on one relay, strictly in
//! sequence order: a message after a hole waits while the owner reads the hole from the
//! stream (`XRANGE` by id: a message's is `<seq>-0`). The node's own publishes coming back
//! over pub/sub are recognised by their tag (`node/worker/ticket`). A removal from a room is
//! placed in the same order (stream id `<seq>-<n>`, and the channel: [`RemovalMark`]), and
//! every node applies it between the message before it and the next.
//!
//! # Engine I/O: on the worker's thread, its own poll nested in the worker's
//! Each worker has an engine ([`engine`]) with two pipelined connections (commands;
//! pub/sub) to each Redis it uses (the one Redis, or the shard masters of a Redis Cluster
//! its commands need, routed by hash slot: [`slots`]) driven by mio, and a RESP2 codec of
//! our own ([`resp`]: encode into a reused buffer, decode bounded). The engine's sockets
//! stay on its own mio poll, so the backends (io_uring and epoll) keep owning only client
//! sockets; by default (`cluster.engine_thread = false`) the worker runs the engine
//! itself: its backend watches the engine's poll descriptor
//! ([`crate::io::Backend::watch_readable`]), each tick turns the engine once without waiting
//! (answers read, timers, writes) and hands it the tick's commands before writing to the
//! phones, so a publish reaches Redis in the tick that read it and its answer is taken in
//! the tick Redis' reply wakes. With `engine_thread = true` the engine runs the same passes
//! on a thread of its own (`pabal-engine-N`), fed through a channel and a waker and
//! answering through a channel and the worker's eventfd: one thread hop each way. We chose
//! the worker's thread by measurement (README "A cluster on Redis"): on two cores at
//! 35,000-38,000 publishes/s the relay's own part of a publish's way (worker to engine,
//! engine back to the worker) fell from 107-151 µs to 56-97 µs on average, one thread
//! fewer per worker, for the same CPU per message; the tail there is set by the machine's
//! two cores either way. The thread stays an option (a node whose workers' own phones keep
//! them busy can give the engine a core of its own). The engine never blocks: its connects are
//! non-blocking, host names resolve on helper threads ([`engine::dial`]), and on the
//! worker's thread its event queue is drained by the worker after every pass.
//! In-flight publishes are bounded per worker
//! (`cluster.max_in_flight`): beyond it a publish is refused with `Overloaded`
//! `unavailable`, never queued.
//!
//! # Membership
//! Memberships, blocks and join points live in the engine too ([`membership`]): a change
//! is the room's script then the user's, and a notice on the user's channel reaches every
//! worker (on every node) that holds a connection of the user; a worker reads the user's
//! rooms and blocks when it starts watching them and whenever its pub/sub connection comes
//! back. The engine's side is `engine/members.rs`; the worker's is
//! `core/cluster/members.rs`.
//!
//! # Receipts and the offline hand-off
//! Members' delivered and read markers live in the engine ([`receipts`]): each owner sends
//! one script call per room per tick with its phones' coalesced ACKs and READs, the script
//! moves the markers forward and publishes the moved ones on the room's channel, and every
//! node's owner sends RECEIPTs from that. The server API's receipts and unread counts are
//! read there. A message's offline hand-off is decided by the node that sequenced it, by
//! one script that compares every member's markers and hand-off mark. The engine's
//! side is `engine/receipts.rs`; the worker's is `core/cluster/receipts.rs`.
//!
//! # A user across nodes
//! Each worker's count of each user's connections lives in the engine with a lease
//! ([`presence`]): presence, a user's rooms and a room's member count are read there by
//! the server API, and every HELLO claims its connection against
//! `limits.max_connections_per_user` on every node together. The engine's side is
//! `engine/presence.rs`.
//!
//! # Failure
//! A lost connection fails the publishes in flight on it (`Overloaded` `unavailable`: not
//! sequenced as far as the node knows; a retry that carries a v2 publish id or an
//! `Idempotency-Key` is answered from the room's window in the engine, on any node), and
//! the engine reconnects with backoff (50 ms doubling to `cluster.reconnect_max`). A
//! re-established pub/sub connection re-subscribes every channel and makes each owner read
//! what it missed from the stream before delivering anything newer. Live connections stay
//! up throughout; `/readyz` says 503 while any worker's engine is down.
//!
//! Owns: the engines, the wire format, the scripts and key names, the cluster's
//! metrics. Must not touch: connections or rooms (the owner worker's core applies what the
//! engine reports, see `core/cluster.rs`).

mod config;
pub(crate) mod copies;
pub mod engine;
pub mod membership;
pub mod presence;
pub mod receipts;
pub mod resp;
pub mod script;
mod shard;
pub mod slots;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use bytes::Bytes;
use pabal_codec::Text;

pub use config::{
    ClusterConfig, EngineKind, RedisAddr, StreamEntry, Topology, WindowOrder, parse_redis_url,
    parse_sentinel_url,
};
pub use engine::EngineHandle;

use crate::ids::{RoomName, UserName};
use crate::stats::Histogram;
/// The stage histograms' snapshots ([`ClusterStats::stages`]) and their buckets' upper
/// bounds (µs).
pub use crate::stats::{BUCKETS, HistogramSnapshot};

/// The most tail messages an open reads ([`EngineCmd::Open`]'s `tail`); the engine's
/// bound on a reply's size counts on it.
pub const MAX_OPEN_TAIL: u64 = 4096;

/// A request from an owner worker to its engine.
#[derive(Debug)]
pub enum EngineCmd {
    /// Sequence, store and publish one message.
    Publish(PublishRequest),
    /// Subscribe the room's channel, then read its epoch, head and recent tail.
    Open {
        /// The room.
        room: RoomName,
        /// The epoch the room gets if the engine does not hold it.
        epoch_hint: u64,
        /// Messages of the tail to read, at most [`MAX_OPEN_TAIL`].
        tail: u64,
    },
    /// Move the room's sequence in `epoch` up to `head` if it is below (Redis lost
    /// writes this owner delivered: [`script::RAISE`]).
    Raise {
        /// The room.
        room: RoomName,
        /// The owner's epoch of the room.
        epoch: u64,
        /// The owner's head.
        head: u64,
    },
    /// Read the room's stream after `after`, up to `cluster.fill_batch` messages.
    Fill {
        /// The room.
        room: RoomName,
        /// The last sequence the owner holds.
        after: u64,
        /// The last removal after that message the owner applied (0: none): the page
        /// starts after it (stream id `<after>-<sub>`, exclusive).
        sub: u64,
    },
    /// Read one page of the room's stream after `after` (up to `cluster.fill_batch`
    /// messages) for a reader the owner's memory no longer covers: a phone resuming, or a
    /// binding lagging, past the node's in-memory history. Answered by
    /// [`EngineEvent::Read`] with the same `reader`.
    Read {
        /// The room.
        room: RoomName,
        /// The reader's position: the page starts after it.
        after: u64,
        /// Names the waiting reader at the owner.
        reader: u64,
    },
    /// Unsubscribe the room's channel (the owner evicted the room).
    Close {
        /// The room.
        room: RoomName,
    },
    /// Make a user a member of a room, or end the membership, on both sides in the engine,
    /// and publish the notice ([`membership`]).
    Member(MemberRequest),
    /// Subscribe the user's notice channel, then read the user's rooms and blocks
    /// ([`EngineEvent::UserLoaded`]); again whenever the subscription is re-established.
    WatchUser {
        /// The user.
        user: Text,
        /// At most this many rooms are read (more: refused).
        max_rooms: usize,
        /// At most this many blocks are read (more: refused).
        max_blocks: usize,
    },
    /// Unsubscribe the user's notice channel (the worker's last connection of the user
    /// closed).
    UnwatchUser {
        /// The user.
        user: Text,
    },
    /// Read the room's members (for a replacing `PUT .../members`).
    ReadMembers {
        /// Matches the answer ([`EngineEvent::MembersRead`]).
        ticket: u64,
        /// The room.
        room: RoomName,
        /// More members than this: refused.
        max: usize,
    },
    /// Publish a kick notice on the user's channel.
    Kick {
        /// Matches the answer ([`EngineEvent::Kicked`]).
        ticket: u64,
        /// The user.
        user: Text,
    },
    /// Move members' markers of a room forward in the engine and publish those that moved
    /// ([`receipts::MARKERS`]): one per room per owner tick. While the engine is down the
    /// engine keeps the latest marker per member (bounded) and sends it on recovery.
    Markers {
        /// The room.
        room: RoomName,
        /// The room's epoch the markers belong to.
        epoch: u64,
        /// One marker per member, the member named by its shared record (no copy).
        markers: Vec<(UserName, crate::core::Marker)>,
    },
    /// Read a room's markers (the room opened here, or its channel was resubscribed):
    /// answered by [`EngineEvent::Markers`] with every member's markers.
    LoadMarkers {
        /// The room.
        room: RoomName,
    },
    /// A hand-off window of this node's messages is due: the engine decides who is owed
    /// what ([`receipts::HANDOFF`]); answered by [`EngineEvent::HandoffOwed`]. Waits for the
    /// engine while it is down.
    Handoff(receipts::HandoffCheck),
    /// Read a room's members' markers (the server API's receipts).
    ReadReceipts {
        /// Matches the answer ([`EngineEvent::ReceiptsRead`]).
        ticket: u64,
        /// The room.
        room: RoomName,
    },
    /// Read a user's unread counts in every room of theirs.
    ReadUnread {
        /// Matches the answer ([`EngineEvent::UnreadRead`]).
        ticket: u64,
        /// The user.
        user: Text,
        /// At most this many rooms are read (more: refused).
        max_rooms: usize,
    },
    /// A HELLO of a watched user: count one more connection of theirs on this worker,
    /// unless the user holds `max` on every node together ([`presence::CLAIM`]).
    Claim {
        /// Matches the answer ([`EngineEvent::Claimed`]).
        ticket: u64,
        /// The user.
        user: Text,
        /// `limits.max_connections_per_user`.
        max: usize,
    },
    /// `closed` claimed connections of the user on this worker closed (one loop tick's).
    Release {
        /// The user.
        user: Text,
        /// How many.
        closed: u32,
    },
    /// Read what the server API asks ([`presence::Lookup`]).
    Lookup {
        /// Matches the answer ([`EngineEvent::LookedUp`]).
        ticket: u64,
        /// What to read.
        lookup: presence::Lookup,
    },
}

/// A membership change for the engine.
#[derive(Debug, Clone)]
pub struct MemberRequest {
    /// Matches the answer to the request.
    pub ticket: u64,
    /// The room.
    pub room: RoomName,
    /// The user.
    pub user: Text,
    /// Join or leave.
    pub change: MemberChange,
}

/// What a [`MemberRequest`] does.
#[derive(Debug, Clone, Copy)]
pub enum MemberChange {
    /// Join (a no-op answering the join point in force for a member already).
    Join {
        /// The room's epoch if the engine does not hold it.
        epoch_hint: u64,
        /// The new membership's serial.
        serial: u64,
        /// Unblock a blocked channel (else a blocked channel refuses).
        unblock: bool,
        /// `limits.max_rooms_per_user`.
        max_rooms: usize,
    },
    /// Leave, optionally blocking the channel.
    Leave {
        /// Block the channel too.
        block: bool,
        /// What the user's connections are told.
        reason: pabal_codec::LeftReason,
        /// `limits.max_blocked_per_user`.
        max_blocks: usize,
        /// A removal placed in the room's stream sets the room's history (its stream and
        /// last removals) to expire this long (ms) after it; `None`: leaves it.
        expire_ms: Option<u64>,
    },
}

/// What a [`MemberRequest`] came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberOutcome {
    /// The user is a member at `join`; `new` if they were not before (on either side).
    Joined {
        /// New to the room.
        new: bool,
        /// The join point in force.
        join: crate::directory::JoinPoint,
    },
    /// The join was refused: the channel is blocked (`blocked`), or the user belongs to
    /// `limits.max_rooms_per_user` rooms already.
    JoinRefused {
        /// Blocked rather than full.
        blocked: bool,
    },
    /// The user left.
    Left {
        /// Whether the user was a member (on either side).
        was: bool,
        /// A block was asked and refused (too many blocks); left all the same.
        block_refused: bool,
    },
}

/// A publish for the engine.
#[derive(Debug)]
pub struct PublishRequest {
    /// Matches the answer to the request.
    pub ticket: u64,
    /// The room.
    pub room: RoomName,
    /// The epoch the room gets if the engine does not hold it (it lost it, or never had it).
    pub epoch_hint: u64,
    /// When the owner took it, ms since the Unix epoch.
    pub ts_ms: u64,
    /// Shown as the sender: the publishing connection's name record, shared (or the
    /// server API's name).
    pub sender: crate::sender_name::SenderName,
    /// The body.
    pub payload: Bytes,
    /// What names the message across retries (a v2 publish id or an `Idempotency-Key`):
    /// a repeat the room's window in the engine remembers is answered with the first
    /// sequence and publishes nothing, whichever node it reaches.
    pub repeat: Option<RepeatKey>,
    /// The room's last sequences whose repeat keys the engine keeps:
    /// `max(limits.publish_ids, control.idempotency_keys)`, for every publish, with a key
    /// or not (any publish may be the one that trims the window).
    pub window: usize,
    /// Sets the room's history (its stream and window) to expire this long (ms) after
    /// the publish; `None`: leaves it (see `core/cluster/history_expiry.rs`).
    pub expire_ms: Option<u64>,
    /// The owner's `(epoch, head)` for the room, when it holds one: in that epoch the
    /// sequence given is past the head, whatever Redis lost ([`script::PUBLISH`]).
    pub owner_head: Option<(u64, u64)>,
}

/// What names a publish across retries.
#[derive(Debug, Clone, Copy)]
pub enum RepeatKey {
    /// A protocol-v2 publish id: the connection's publisher (user and device) and msg_id.
    Device {
        /// The publisher (user and device, hashed).
        publisher: u64,
        /// The client's msg_id.
        msg_id: u64,
    },
    /// The server API's `Idempotency-Key`.
    Api(crate::idempotency::IdempotencyKey),
}

/// One message as the engine holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineMessage {
    /// Its sequence in the room.
    pub seq: u64,
    /// When its owner took it, ms since the Unix epoch.
    pub ts_ms: u64,
    /// This worker's ticket when this worker published it (its tag names this node and
    /// worker); `None` for everyone else's.
    pub ticket: Option<u64>,
    /// Who published it.
    pub sender: Text,
    /// The body.
    pub payload: Bytes,
}

/// A member's removal in the room's own order ([`membership::ROOM_LEAVE`]): it came after
/// message `seq` (the room's head when the removal ran) and before `seq + 1`, the `sub`-th
/// removal there (its stream id is `<seq>-<sub>`, `sub` ≥ 1, where a message's is
/// `<seq>-0`). Every node applies it in that place, so no node delivers a message
/// published after it to the user's phones, whichever node sequenced that message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovalMark {
    /// The message it follows.
    pub seq: u64,
    /// Its place among the removals after that message (from 1).
    pub sub: u64,
    /// Who was removed.
    pub user: Text,
    /// The membership that ended.
    pub join: crate::directory::JoinPoint,
    /// What the user's connections are told.
    pub reason: pabal_codec::LeftReason,
}

impl RemovalMark {
    /// Its place in the room's order.
    pub fn place(&self) -> (u64, u64) {
        (self.seq, self.sub)
    }
}

/// What an engine reports to its worker.
#[derive(Debug)]
pub enum EngineEvent {
    /// The script ran: the message has this sequence.
    Published {
        /// The request's ticket.
        ticket: u64,
        /// The room's epoch.
        epoch: u64,
        /// The sequence the engine assigned.
        seq: u64,
        /// The repeat key was in the room's window: `seq` is the first publish's, and
        /// nothing was published now.
        repeated: bool,
        /// Everything the room's channel carried before this message's copy was handed
        /// over first (the engine holds an answer until its copy is read), so a removal
        /// placed before it is known: the message may enter the room's order from this
        /// answer. `false` when the copy did not come (the pub/sub connection was lost,
        /// or it took too long): the message enters from the stream instead.
        ordered: bool,
    },
    /// The publish did not reach the engine (or the engine refused it); not sequenced as
    /// far as this node knows.
    PublishFailed {
        /// The request's ticket.
        ticket: u64,
    },
    /// The room's channel is subscribed; this is its state after the subscription.
    Opened {
        /// The room.
        room: RoomName,
        /// Its epoch.
        epoch: u64,
        /// Its head.
        seq: u64,
        /// Its most recent messages, ascending (what retention left of the asked tail).
        tail: Vec<EngineMessage>,
        /// The removals placed among them (in the same span of the stream), ascending.
        marks: Vec<RemovalMark>,
    },
    /// The room's open cannot be answered: its shard could not be connected to (the dial
    /// failed or timed out). What waits for the room is refused `unavailable`; the next
    /// request opens it again.
    OpenFailed {
        /// The room.
        room: RoomName,
    },
    /// Messages of the stream after the page's `after`, ascending (a page of at most
    /// `cluster.fill_batch`).
    Filled {
        /// The room.
        room: RoomName,
        /// The page.
        page: FillPage,
    },
    /// An [`EngineCmd::Raise`] Redis did not run (its connection lost, an error
    /// answered): the owner reads the room again, which asks again if it is behind.
    RaiseFailed {
        /// The room.
        room: RoomName,
        /// The epoch it was asked in.
        epoch: u64,
    },
    /// A page of the stream for a reader ([`EngineCmd::Read`]), ascending (at most
    /// `cluster.fill_batch`). While the command connection is down the read waits for
    /// the next one, like a fill.
    Read {
        /// The room.
        room: RoomName,
        /// The request's start.
        after: u64,
        /// The waiting reader.
        reader: u64,
        /// What the stream holds after `after`.
        msgs: Vec<EngineMessage>,
        /// The page holds `cluster.fill_batch` entries (messages and removals): the
        /// stream may hold more.
        full: bool,
        /// The sequence of the page's last entry, message or removal (`after` when
        /// empty): the next page starts after it.
        last: u64,
    },
    /// A message from the room's channel.
    Message {
        /// The room.
        room: RoomName,
        /// The room's epoch as the message names it.
        epoch: u64,
        /// The message.
        msg: EngineMessage,
    },
    /// A removal from the room's channel, in its order among the messages.
    Removal {
        /// The room.
        room: RoomName,
        /// The room's epoch as the removal names it.
        epoch: u64,
        /// The removal.
        mark: RemovalMark,
    },
    /// The pub/sub connection came back and the room's channel is subscribed again: what
    /// was published meanwhile must be read from the stream.
    Resubscribed {
        /// The room.
        room: RoomName,
    },
    /// A membership change ran on both sides.
    MemberDone {
        /// The request's ticket.
        ticket: u64,
        /// What it came to.
        outcome: MemberOutcome,
    },
    /// A membership change did not reach the engine, or not both sides of it (a retry
    /// repairs it, see [`membership`]).
    MemberFailed {
        /// The request's ticket.
        ticket: u64,
    },
    /// The user's notice channel is subscribed (again) and this is what the engine holds.
    UserLoaded {
        /// The user.
        user: Text,
        /// Rooms and blocks.
        rooms: membership::UserRooms,
    },
    /// The user's rooms could not be read: the engine is down (`over_cap: None`), or the
    /// user has more rooms or blocks than this node may load (`Some(count)`).
    UserLoadFailed {
        /// The user.
        user: Text,
        /// How many, when a cap refused the load.
        over_cap: Option<u64>,
    },
    /// A notice on the user's channel.
    Notice {
        /// The user.
        user: Text,
        /// The change.
        notice: membership::Notice,
    },
    /// The room's members as the engine holds them: `Err(Some(count))` past the cap asked,
    /// `Err(None)` when the engine could not be read.
    MembersRead {
        /// The request's ticket.
        ticket: u64,
        /// The members.
        members: Result<Vec<Text>, Option<u64>>,
    },
    /// A kick notice was published (`ok`), or could not be.
    Kicked {
        /// The request's ticket.
        ticket: u64,
        /// Published.
        ok: bool,
    },
    /// Members' markers of a room moved in the engine (published on the room's channel by
    /// whichever node moved them), or were read for [`EngineCmd::LoadMarkers`].
    Markers {
        /// The room.
        room: RoomName,
        /// The room's epoch.
        epoch: u64,
        /// The markers that moved, as the engine holds them now.
        markers: Vec<(Text, crate::core::Marker)>,
    },
    /// The engine decided a due hand-off window: these members are owed `(first, last)`.
    HandoffOwed {
        /// The window.
        check: receipts::HandoffCheck,
        /// `(user, first sequence, last sequence)` per member handed off.
        owed: Vec<(Text, u64, u64)>,
    },
    /// A room's markers as the engine holds them; `Err` when the engine could not be read.
    ReceiptsRead {
        /// The request's ticket.
        ticket: u64,
        /// The answer.
        answer: Result<receipts::ReceiptsAnswer, ()>,
    },
    /// A user's unread counts; `Err(Some(count))` past the cap on rooms, `Err(None)` when
    /// the engine could not be read.
    UnreadRead {
        /// The request's ticket.
        ticket: u64,
        /// The rooms (those the engine holds).
        answer: Result<Vec<crate::mesh::RoomUnread>, Option<u64>>,
    },
    /// A HELLO's claim ([`EngineCmd::Claim`]) was answered.
    Claimed {
        /// The request's ticket.
        ticket: u64,
        /// What it came to.
        outcome: ClaimOutcome,
    },
    /// A lookup's answer; `None` when the engine could not be read.
    LookedUp {
        /// The request's ticket.
        ticket: u64,
        /// The answer.
        answer: Option<presence::LookupAnswer>,
    },
}

/// A page of a room's stream read for its owner ([`EngineEvent::Filled`]).
#[derive(Debug)]
pub struct FillPage {
    /// The room's epoch in the engine when the page was read (`0`: it held none): a page
    /// of another epoch than the owner's is not its stream's.
    pub epoch: u64,
    /// The room's sequence in the engine, read in the same script as the page: below the
    /// owner's head in the same epoch, Redis lost writes ([`script::RAISE`]).
    pub room_seq: u64,
    /// The request's start: the page holds what comes after it.
    pub after: u64,
    /// What the stream holds after `after`.
    pub msgs: Vec<EngineMessage>,
    /// The removals placed after `after` in the same span (those after the head's message
    /// included), ascending.
    pub marks: Vec<RemovalMark>,
    /// The page holds `cluster.fill_batch` entries (messages and removals): the stream may
    /// hold more.
    pub full: bool,
}

/// What a HELLO's claim came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// Counted: the session may open.
    Granted,
    /// The user holds this many connections on every node together, the cap already.
    Refused {
        /// Live connections counted.
        connections: u64,
    },
    /// The engine could not be asked (or did not answer).
    Failed,
}

/// The cluster's metrics, shared by the engines and the owners (counted per batch
/// or per event, never locked).
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Replies read from the engine (round trips of pipelined commands).
    pub round_trips: AtomicU64,
    /// Commands sent and not answered yet, all workers together.
    pub pipeline_depth: AtomicI64,
    /// Channels subscribed, all workers together.
    pub subscriptions: AtomicI64,
    /// Messages read from a stream to fill a hole (a sequence jump or a lost subscription).
    pub holes_filled: AtomicU64,
    /// Rooms whose sequence went back below what this node delivered (Redis lost writes)
    /// and was moved up again ([`script::RAISE`]).
    pub sequences_raised: AtomicU64,
    /// Removals applied in their rooms' order (`membership::ROOM_LEAVE`'s marks) that ended
    /// a membership this node held, all workers together.
    pub removals_in_order: AtomicU64,
    /// Engine errors by kind ([`EngineErrorKind`] as index): connections refused, timed
    /// out or lost, malformed answers, commands Redis answered with an error, too few
    /// replicas.
    pub errors: [AtomicU64; EngineErrorKind::ALL.len()],
    /// Publishes refused because the engine was unavailable or `cluster.max_in_flight` was
    /// reached.
    pub refused: AtomicU64,
    /// Engine threads with both connections up.
    pub engines_up: AtomicI64,
    /// Engine threads running.
    pub engines: AtomicI64,
    /// Membership changes (joins, leaves, blocks) run in the engine.
    pub member_changes: AtomicU64,
    /// Notices received on users' channels (joins, leaves, kicks).
    pub notices: AtomicU64,
    /// Loads of a user's rooms and blocks (at a first connection, after a resubscription).
    pub user_loads: AtomicU64,
    /// Users' notice channels subscribed, all workers together.
    pub users_watched: AtomicI64,
    /// The engine's path by stage, in µs (see ARCHITECTURE.md's cluster section): a
    /// command, from the start of the worker's tick that queued it (just after the poll
    /// that read its frame), until its engine took it off the channel.
    pub to_engine_us: Histogram,
    /// A publish written to Redis until its answer was read (Redis' own time, its
    /// `appendfsync` included, and the loopback both ways).
    pub publish_reply_us: Histogram,
    /// An answer or message read by the engine until its worker took the event.
    pub to_worker_us: Histogram,
    /// Markers script calls (one per room per owner tick with markers that moved).
    pub marker_batches: AtomicU64,
    /// Marker updates dropped because too many rooms' markers waited for the engine.
    pub markers_dropped: AtomicU64,
    /// Rooms whose markers wait for the engine (down), all workers together.
    pub markers_waiting: AtomicI64,
    /// Commands Redis answered with an error that sends them again, by kind
    /// ([`RetryKind`] as index): `TRYAGAIN`, `LOADING`, `BUSY` (sent again after a
    /// backoff), `ASK`, `MOVED` (sent where Redis said), on command and pub/sub
    /// connections.
    pub retries: [AtomicU64; RetryKind::ALL.len()],
    /// Commands given up after too many retries and redirects together (a publish or
    /// membership step refused `unavailable`, an open answered `OpenFailed`).
    pub retries_given_up: AtomicU64,
}

/// An error Redis answers that sends the command again (a retry or a redirect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryKind {
    /// A slot mid-migration with a multi-key command's keys split between two shards.
    TryAgain,
    /// Redis is loading its data (just restarted).
    Loading,
    /// A script runs past its time limit.
    Busy,
    /// A slot mid-migration: the key is on the importing shard.
    Ask,
    /// The slot lives on another shard.
    Moved,
}

impl RetryKind {
    /// Every kind, in the order of [`ClusterStats::retries`].
    pub const ALL: [RetryKind; 5] = [
        RetryKind::TryAgain,
        RetryKind::Loading,
        RetryKind::Busy,
        RetryKind::Ask,
        RetryKind::Moved,
    ];

    /// The kind of the error Redis answered (`error`: the error line), if it is one.
    pub fn of(error: &[u8]) -> Option<RetryKind> {
        let kinds: [(&[u8], RetryKind); 5] = [
            (b"TRYAGAIN", RetryKind::TryAgain),
            (b"LOADING", RetryKind::Loading),
            (b"BUSY", RetryKind::Busy),
            (b"ASK ", RetryKind::Ask),
            (b"MOVED ", RetryKind::Moved),
        ];
        kinds
            .into_iter()
            .find(|(prefix, _)| error.starts_with(prefix))
            .map(|(_, kind)| kind)
    }

    /// Its metric label.
    pub fn label(self) -> &'static str {
        match self {
            RetryKind::TryAgain => "tryagain",
            RetryKind::Loading => "loading",
            RetryKind::Busy => "busy",
            RetryKind::Ask => "ask",
            RetryKind::Moved => "moved",
        }
    }
}

/// What an engine error was (`pabal_cluster_engine_errors_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineErrorKind {
    /// A connection to Redis (or a sentinel, a seed) was refused: nothing listens there.
    Refused,
    /// A connection, or an answer to the slot map's or master's question, took longer
    /// than `cluster.connect_timeout`.
    Timeout,
    /// A connection closed, was reset or could not be made otherwise (a name that does not
    /// resolve): what was in flight on it is failed or waits for the next one.
    ConnectionLost,
    /// An answer the engine cannot read: malformed RESP, one nobody asked for, a reply or
    /// a message of the wrong shape (the connection is reset where it carried it).
    Protocol,
    /// Redis answered a command with an error that is not a retry's or redirect's: a
    /// script's error, `READONLY`, `OOM`, a subscription refused, a command redirected or
    /// retried too often.
    ErrorReply,
    /// `WAIT` answered with fewer replicas than `cluster.wait_replicas` (the publishes it
    /// held are refused `unavailable`).
    Replicas,
}

impl EngineErrorKind {
    /// Every kind, in the order of [`ClusterStats::errors`].
    pub const ALL: [EngineErrorKind; 6] = [
        EngineErrorKind::Refused,
        EngineErrorKind::Timeout,
        EngineErrorKind::ConnectionLost,
        EngineErrorKind::Protocol,
        EngineErrorKind::ErrorReply,
        EngineErrorKind::Replicas,
    ];

    /// The kind of a connection's (or a discovery's) failure: refused and timed out by
    /// their I/O kind, malformed answers as `InvalidData`, errors Redis answered as
    /// [`RedisAnswered`]; anything else lost the connection.
    pub fn of_io(e: &std::io::Error) -> EngineErrorKind {
        match e.kind() {
            std::io::ErrorKind::ConnectionRefused => EngineErrorKind::Refused,
            std::io::ErrorKind::TimedOut => EngineErrorKind::Timeout,
            std::io::ErrorKind::InvalidData => EngineErrorKind::Protocol,
            _ if e.get_ref().is_some_and(|r| r.is::<RedisAnswered>()) => {
                EngineErrorKind::ErrorReply
            }
            _ => EngineErrorKind::ConnectionLost,
        }
    }

    /// Its metric label.
    pub fn label(self) -> &'static str {
        match self {
            EngineErrorKind::Refused => "refused",
            EngineErrorKind::Timeout => "timeout",
            EngineErrorKind::ConnectionLost => "connection_lost",
            EngineErrorKind::Protocol => "protocol",
            EngineErrorKind::ErrorReply => "error_reply",
            EngineErrorKind::Replicas => "replicas",
        }
    }
}

/// An error Redis answered where the engine needed an answer to go on (the slot map's or
/// the master's question), carried in an `io::Error` so that it counts as
/// [`EngineErrorKind::ErrorReply`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RedisAnswered(pub String);

impl RedisAnswered {
    /// `what` as an `io::Error`.
    pub fn io(what: impl Into<String>) -> std::io::Error {
        std::io::Error::other(RedisAnswered(what.into()))
    }
}

/// A malformed or unexpected answer, as an `io::Error` (counted
/// [`EngineErrorKind::Protocol`]).
pub(crate) fn malformed(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

impl ClusterStats {
    /// Counts one engine error of `kind`.
    pub fn count_error(&self, kind: EngineErrorKind) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// [`ClusterStats::errors`] of `kind` so far.
    pub fn errors_of(&self, kind: EngineErrorKind) -> u64 {
        self.errors[kind as usize].load(Ordering::Relaxed)
    }

    /// The engine's path by stage so far, every worker together: `[to_engine_us,
    /// publish_reply_us, to_worker_us]`.
    pub fn stages(&self) -> [HistogramSnapshot; 3] {
        let mut out = [HistogramSnapshot::default(); 3];
        for (h, into) in [
            &self.to_engine_us,
            &self.publish_reply_us,
            &self.to_worker_us,
        ]
        .into_iter()
        .zip(out.iter_mut())
        {
            h.add_to(into);
        }
        out
    }

    /// Counts `error` in [`ClusterStats::retries`] if it is a retry's or redirect's.
    pub fn count_retry(&self, error: &[u8]) {
        if let Some(kind) = RetryKind::of(error) {
            self.retries[kind as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// [`ClusterStats::retries`] of `kind` so far.
    pub fn retries_of(&self, kind: RetryKind) -> u64 {
        self.retries[kind as usize].load(Ordering::Relaxed)
    }

    /// Whether every engine has its connections up.
    pub fn healthy(&self) -> bool {
        self.engines_up.load(Ordering::Relaxed) >= self.engines.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn engine_errors_are_counted_by_their_kind() {
        let cases = [
            (io::Error::from(io::ErrorKind::ConnectionRefused), "refused"),
            (io::Error::from(io::ErrorKind::TimedOut), "timeout"),
            (malformed("a reply nobody asked for"), "protocol"),
            (RedisAnswered::io("ERR no such master"), "error_reply"),
            (
                io::Error::from(io::ErrorKind::UnexpectedEof),
                "connection_lost",
            ),
            (
                io::Error::from(io::ErrorKind::ConnectionReset),
                "connection_lost",
            ),
            (
                io::Error::other("the address resolves to nothing"),
                "connection_lost",
            ),
        ];
        let stats = ClusterStats::default();
        for (e, label) in &cases {
            let kind = EngineErrorKind::of_io(e);
            assert_eq!(kind.label(), *label, "{e}");
            stats.count_error(kind);
        }
        let counted: Vec<(&str, u64)> = EngineErrorKind::ALL
            .iter()
            .map(|&k| (k.label(), stats.errors_of(k)))
            .collect();
        assert_eq!(
            counted,
            [
                ("refused", 1),
                ("timeout", 1),
                ("connection_lost", 3),
                ("protocol", 1),
                ("error_reply", 1),
                ("replicas", 0),
            ]
        );
    }
}
