//! Message passing between workers: the only way one core affects another.
//!
//! Each worker has one inbound crossbeam channel carrying batches (`Vec<CoreMsg>`): a worker
//! collects what it has for each peer during a loop tick and sends one batch per peer per
//! tick, then wakes the peer (the wakeup costs a syscall only when the peer has no wake
//! pending). Messages from one worker to another arrive in the order sent, and the routing
//! protocol relies on that: a room's owner sends a connection's PUBACK before the delivery
//! of the same message, and a subscription reply before the deliveries that follow it.
//!
//! A user's name travels as the directory's [`UserName`] handle, never as a `Text` cloned
//! out of it: the first clone of a name's `Text` makes its buffer shared, a 24-byte header
//! kept for as long as the name lives (one per connected user).
//!
//! Owns: the message vocabulary and its transport. Must not touch: room or connection state.

use std::sync::Arc;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use pabal_codec::{ErrorCode, LeftReason, Text};

use crate::idempotency::IdempotencyKey;
use crate::ids::{CoreId, Origin, RoomName, StoredRef, UserName};
use crate::io::Wakeup;
use crate::sender_name::SenderName;

/// Where a connection wants a room's stream to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// From now on (a new subscription).
    Live,
    /// After `last_seq` of `epoch` (the client's resume entry).
    Resume {
        /// The epoch the client's sequence belongs to.
        epoch: u64,
        /// The last sequence the client holds.
        last_seq: u64,
    },
    /// After the user's join point.
    Join {
        /// The room's epoch at the join.
        epoch: u64,
        /// The room's head at the join.
        seq: u64,
    },
}

/// A slice of a room's history sent to one connection.
#[derive(Debug, Default)]
pub struct Page {
    /// Sequences no longer kept: `from..=to`.
    pub gap: Option<(u64, u64)>,
    /// Messages, in order.
    pub msgs: Vec<StoredRef>,
    /// The page reaches the room's head as of when it was cut.
    pub complete: bool,
}

/// Where a client's publish came from: the connection, the alias it named, the binding of
/// that alias it was published on (the subscription request that bound it, so the PUBACK
/// moves the cursor of that binding only, never of a later one), and the client's message
/// id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishedBy {
    /// The publishing connection.
    pub origin: Origin,
    /// Its alias for the room.
    pub alias: u32,
    /// The alias's binding when published.
    pub binding: u64,
    /// The client's message id.
    pub msg_id: u64,
    /// Protocol v2: the connection's publisher (user and device, hashed); with `msg_id` it
    /// names the message across reconnects. 0: not recognised when repeated.
    pub publisher: u64,
}

/// One message between workers.
#[derive(Debug)]
pub enum CoreMsg {
    // ---- to a room's owner -----------------------------------------------------------
    /// A connection publishes a message.
    Publish {
        /// The room.
        room: RoomName,
        /// The publishing connection, alias, binding and message id.
        by: PublishedBy,
        /// The publishing user: the connection's name record, shared.
        sender: SenderName,
        /// The body.
        payload: Bytes,
    },
    /// A connection publishes an ephemeral event.
    Ephemeral {
        /// The room.
        room: RoomName,
        /// The publishing connection.
        origin: Origin,
        /// The publishing user: the connection's name record, shared.
        sender: SenderName,
        /// The body.
        payload: Bytes,
    },
    /// A connection binds the room; the owner checks membership, registers the worker's
    /// interest and answers [`CoreMsg::Subscribed`] or [`CoreMsg::NotMember`].
    Subscribe {
        /// The room.
        room: RoomName,
        /// The connection.
        origin: Origin,
        /// Its alias for the room.
        alias: u32,
        /// The connection's user.
        user: UserName,
        /// Where the stream asks to start; the owner never starts it before the user's
        /// join point, whatever the request says.
        from: StartFrom,
        /// The request's id, echoed in the answer: an answer for any other request than
        /// the one the alias waits for is stale and dropped.
        request: u64,
    },
    /// A catching-up connection asks for the next page after `after`.
    Fetch {
        /// The room.
        room: RoomName,
        /// The connection.
        origin: Origin,
        /// Its alias.
        alias: u32,
        /// The connection's user (still a member? the page never reaches before the join).
        user: UserName,
        /// The last sequence it has.
        after: u64,
        /// The subscription request the alias was bound by.
        request: u64,
    },
    /// Members' delivered and read markers moved (ACKs and READs of the users' connections
    /// on one worker in one tick: one update per (room, user), grouped by room; a hash
    /// collision in the worker's sort may split one, which the owner's forward-only markers
    /// make harmless).
    Markers(Vec<MarkerUpdate>),
    // ---- from a room's owner, about its members' markers ---------------------------------
    /// Members' markers that moved since the room's last update (a RECEIPT for the
    /// worker's version-3 connections bound to the room's stream `epoch`).
    Receipts {
        /// The room.
        room: RoomName,
        /// The room's stream.
        epoch: u64,
        /// Each member whose markers moved, with its markers now (shared by all workers).
        markers: Arc<[(Text, crate::core::Marker)]>,
    },
    /// A subscription of a connection on `core` ended.
    Unsubscribed {
        /// The room.
        room: RoomName,
        /// The worker.
        core: CoreId,
    },
    /// Add a member (a room) or subscriber (a channel).
    Join {
        /// The room.
        room: RoomName,
        /// The user.
        user: UserName,
        /// Clear a block (app server's explicit subscribe); clients cannot.
        unblock: bool,
        /// Who to tell if it is refused.
        requester: Option<Origin>,
    },
    /// Remove a member or subscriber.
    Leave {
        /// The room.
        room: RoomName,
        /// The user.
        user: UserName,
        /// Also block the channel.
        block: bool,
        /// Reported to the user's connections.
        reason: LeftReason,
    },

    // ---- from a room's owner to workers ------------------------------------------------
    /// A publish was accepted.
    Accepted {
        /// The publish.
        by: PublishedBy,
        /// The sequence given.
        seq: u64,
    },
    /// A publish was not accepted: the owner's log refused it (nothing was sequenced).
    NotAccepted {
        /// The publish.
        by: PublishedBy,
        /// `Overloaded` (retry) or `Internal`.
        code: ErrorCode,
        /// `storage_full` or `storage_failed`.
        message: String,
    },
    /// A request of a connection was refused.
    Refused {
        /// The connection.
        origin: Origin,
        /// Why.
        code: ErrorCode,
        /// The message id or alias concerned.
        reference: u64,
        /// Detail for the client.
        message: String,
    },
    /// A subscription is registered: the stream continues after `start`.
    Subscribed {
        /// The room.
        room: RoomName,
        /// The connection.
        origin: Origin,
        /// Its alias.
        alias: u32,
        /// The room's epoch.
        epoch: u64,
        /// The room's head when registered.
        head: u64,
        /// The cursor the connection's stream continues after.
        start: u64,
        /// The first page of catch-up, if any is needed.
        page: Page,
        /// The request answered.
        request: u64,
    },
    /// The next page for a catching-up connection.
    Paged {
        /// The room.
        room: RoomName,
        /// The connection.
        origin: Origin,
        /// Its alias.
        alias: u32,
        /// The page.
        page: Page,
        /// The subscription request the alias was bound by.
        request: u64,
    },
    /// The connection's user is not a member; the alias must be unbound.
    NotMember {
        /// The room.
        room: RoomName,
        /// The connection.
        origin: Origin,
        /// Its alias.
        alias: u32,
        /// The request answered.
        request: u64,
    },
    /// A new message of the room, for the worker's subscribed connections.
    Deliver {
        /// The room.
        room: RoomName,
        /// The message.
        msg: StoredRef,
    },
    /// An ephemeral event of the room.
    DeliverEphemeral {
        /// The room.
        room: RoomName,
        /// The publishing connection (not echoed).
        origin: Option<Origin>,
        /// The sender.
        sender: SenderName,
        /// The owner's clock.
        ts_ms: u64,
        /// The body.
        payload: Bytes,
    },
    /// The room's stream restarted in a new epoch (a cluster's engine lost the room and
    /// started it again): the connections bound to it here bind it again, so each is told
    /// the new epoch (a ROOM) before any of its messages.
    Restarted {
        /// The room.
        room: RoomName,
        /// The new epoch.
        epoch: u64,
    },
    /// A user joined: bind the room on their connections here.
    MemberJoined {
        /// The room.
        room: RoomName,
        /// The user.
        user: UserName,
        /// The membership: the room's epoch and head at the join, and its serial.
        join: crate::directory::JoinPoint,
    },
    /// A user left: unbind the room on their connections here.
    MemberLeft {
        /// The room.
        room: RoomName,
        /// The user.
        user: UserName,
        /// Why.
        reason: LeftReason,
        /// The serial of the membership that ended: only bindings made for it are unbound.
        serial: u64,
    },

    // ---- control plane -------------------------------------------------------------------
    /// A request from the server API; the reply goes back on `reply`.
    Control {
        /// What to do.
        op: ControlOp,
        /// Where the answer goes (the control plane awaits it; sending needs no runtime).
        reply: tokio::sync::oneshot::Sender<ControlReply>,
    },

    // ---- lifecycle ---------------------------------------------------------------------
    /// Begin a graceful shutdown: stop accepting and reading, then fence.
    Drain,
    /// Shutdown fence: every message the sender sent before this has been delivered.
    Fence {
        /// Round 1: no more publishes will be sent; round 2: no more deliveries.
        round: u8,
    },
    /// Stop now: close every connection and leave the loop.
    Stop,
    /// Liveness probe from the watchdog: answer by storing `seq` in `stats.probe_ack`.
    Probe {
        /// The watchdog's sequence number.
        seq: u64,
    },
    /// A new configuration: apply what can change live (limits, heartbeat, retention,
    /// replay sizes); the rest needs a restart.
    Reload(std::sync::Arc<crate::config::Config>),
}

/// A server-API request, executed by the room's owner (or by every worker holding a user).
#[derive(Debug)]
pub enum ControlOp {
    /// Publish one message as `sender`.
    Publish {
        /// The room or channel.
        room: RoomName,
        /// Shown as the sender.
        sender: Text,
        /// The body.
        payload: Bytes,
        /// Not sequenced, not stored.
        ephemeral: bool,
        /// The caller's `Idempotency-Key`: a key the room saw recently returns the first
        /// sequence and publishes nothing.
        key: Option<IdempotencyKey>,
    },
    /// Publish one message into several rooms owned by this worker; each room is answered
    /// on its own.
    PublishMany {
        /// The rooms.
        rooms: Vec<RoomName>,
        /// Shown as the sender.
        sender: Text,
        /// The body.
        payload: Bytes,
        /// The caller's `Idempotency-Key`, remembered by each room.
        key: Option<IdempotencyKey>,
    },
    /// Change membership (rooms) or subscriptions (channels).
    Members {
        /// The room or channel.
        room: RoomName,
        /// Users to add.
        add: Vec<Text>,
        /// Users to remove.
        remove: Vec<Text>,
        /// Replace the member set with `add` (everyone else is removed).
        set: bool,
    },
    /// Describe a room.
    Info {
        /// The room or channel.
        room: RoomName,
    },
    /// Read history after a sequence.
    History {
        /// The room or channel.
        room: RoomName,
        /// Messages after this sequence.
        after: u64,
        /// At most this many.
        limit: usize,
    },
    /// Close every connection of a user on this worker (GOAWAY kicked).
    Kick {
        /// The user.
        user: Text,
    },
    /// With `[cluster]`: publish a disconnect notice on the user's channel, so every node
    /// closes the user's connections (answered `Kicked` with 0 once published). Alone, the
    /// same as `Kick`.
    KickEverywhere {
        /// The user.
        user: Text,
    },
    /// A user's unread counts in the rooms of theirs this worker owns.
    Unread {
        /// The user.
        user: Text,
        /// The user's rooms owned by this worker.
        rooms: Vec<RoomName>,
    },
    /// With `[cluster]`: a user's unread counts in every room of theirs, read from the
    /// engine (sent to the worker owning the user's id as a room name). Alone, the rooms
    /// of the user's this worker owns.
    UnreadEverywhere {
        /// The user.
        user: Text,
    },
    /// A room's members' delivered and read markers.
    Receipts {
        /// The room.
        room: RoomName,
    },
    /// A read answered from the engine (a cluster node only): a user's presence or rooms,
    /// a room's member count, on every node together.
    Lookup(crate::cluster::presence::Lookup),
}

/// One member's marker update from a connection's worker (0: no news for that part).
#[derive(Debug, Clone)]
pub struct MarkerUpdate {
    /// The room.
    pub room: RoomName,
    /// The member.
    pub user: UserName,
    /// The room's stream the sequences belong to.
    pub epoch: u64,
    /// Acknowledged (delivered) and read up to.
    pub marker: crate::core::Marker,
}

/// A user's unread count in one room (`GET /v1/users/{user}/unread`).
#[derive(Debug, Clone)]
pub struct RoomUnread {
    /// The room.
    pub room: RoomName,
    /// Its last sequence.
    pub head: u64,
    /// The room's head when the user joined (in the current epoch; 0 otherwise): what came
    /// before was never the user's.
    pub joined_at: u64,
    /// The user's markers.
    pub marker: crate::core::Marker,
    /// Messages after both the read marker and the join point: `head - max(read,
    /// joined_at)`.
    pub unread: u64,
}

/// A room's members' markers (`GET /v1/rooms/{room}/receipts`).
#[derive(Debug, Clone)]
pub struct RoomReceipts {
    /// The last sequence.
    pub head: u64,
    /// The stream's epoch.
    pub epoch: u64,
    /// Every member, by user id: (user, join point, markers).
    pub members: Vec<(Text, u64, crate::core::Marker)>,
}

/// What a room looks like to the server API.
#[derive(Debug, Clone)]
pub struct RoomInfo {
    /// Members (rooms) or subscribers (channels).
    pub members: usize,
    /// The last sequence.
    pub head: u64,
    /// The stream's epoch.
    pub epoch: u64,
    /// Messages in history.
    pub retained_messages: usize,
    /// Payload bytes in history.
    pub retained_bytes: usize,
    /// The oldest sequence in history.
    pub first_seq: Option<u64>,
    /// The limits that apply.
    pub retention: crate::config::Retention,
}

/// How one room took a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Sequenced now.
    New {
        /// The sequence given.
        seq: u64,
    },
    /// The `Idempotency-Key` was seen: nothing was published again.
    Repeat {
        /// The sequence the first request got.
        seq: u64,
    },
}

impl Published {
    /// The message's sequence, new or original.
    pub fn seq(self) -> u64 {
        match self {
            Published::New { seq } | Published::Repeat { seq } => seq,
        }
    }
}

/// Why a worker refused a server-API operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ControlRefusal {
    /// The worker has begun a graceful shutdown: no more mutations.
    Draining,
    /// The room's log is out of space (`[storage] max_disk_bytes` or the file system):
    /// nothing was stored; retry later (HTTP 507 `storage_full`).
    StorageFull,
    /// The room's log failed (an fsync error) and refuses writes until the relay restarts
    /// (HTTP 503 `storage_failed`).
    StorageFailed,
    /// The cluster's engine (Redis) cannot be reached, or the worker has as many publishes
    /// in flight to it as it may: nothing was sequenced; retry later (HTTP 503
    /// `unavailable`).
    Unavailable,
    /// A replacing member call (`PUT`) in a cluster reads the room's members from the
    /// engine; the room has more than it reads (HTTP 413 `too_many_members`: add and
    /// remove instead).
    TooManyMembers {
        /// How many the room has.
        members: u64,
        /// How many a replacing call reads.
        max: usize,
    },
}

/// The answer to a [`ControlOp`].
#[derive(Debug)]
pub enum ControlReply {
    /// Published (`None` for an ephemeral event).
    Published(Option<Published>),
    /// One answer per room of a [`ControlOp::PublishMany`], in the order asked.
    PublishedMany(Vec<(RoomName, Result<Published, ControlRefusal>)>),
    /// Refused as a whole.
    Refused(ControlRefusal),
    /// Membership changed.
    Members {
        /// Users added.
        added: Vec<Text>,
        /// Users removed.
        removed: Vec<Text>,
        /// Users that could not be added, with the reason.
        refused: Vec<(Text, String)>,
        /// Members now.
        count: usize,
    },
    /// A room's description; `None` if the room does not exist.
    Info(Option<RoomInfo>),
    /// History.
    History {
        /// Messages, in order.
        msgs: Vec<StoredRef>,
        /// Sequences after `after` that are no longer kept.
        gap: Option<(u64, u64)>,
        /// The last sequence.
        head: u64,
        /// The epoch.
        epoch: u64,
    },
    /// Connections closed.
    Kicked {
        /// How many.
        connections: usize,
    },
    /// A user's unread counts, one per room asked that the user is a member of.
    Unread(Vec<RoomUnread>),
    /// A room's markers; `None` if the worker does not hold the room.
    Receipts(Option<RoomReceipts>),
    /// A [`ControlOp::Lookup`]'s answer.
    LookedUp(crate::cluster::presence::LookupAnswer),
}

/// The sending end of a worker's inbox.
pub type Outlet = Sender<Vec<CoreMsg>>;
/// A worker's inbox: batches of messages from every worker, itself included.
pub type Inbox = Receiver<Vec<CoreMsg>>;

/// Senders to every worker plus their wakeups. Cloned into each worker.
#[derive(Debug, Clone)]
pub struct Mesh {
    senders: Arc<[Sender<Vec<CoreMsg>>]>,
    wakeups: Arc<[Wakeup]>,
}

impl Mesh {
    /// Channels for `cores` workers: the mesh-to-be's senders and each worker's receiver.
    pub fn channels(cores: usize) -> (Vec<Outlet>, Vec<Inbox>) {
        (0..cores).map(|_| crossbeam_channel::unbounded()).unzip()
    }

    /// Assembles the mesh once every worker has reported its wakeup.
    pub fn new(senders: Vec<Sender<Vec<CoreMsg>>>, wakeups: Vec<Wakeup>) -> Self {
        Mesh {
            senders: senders.into(),
            wakeups: wakeups.into(),
        }
    }

    /// Workers in the mesh.
    pub fn cores(&self) -> usize {
        self.senders.len()
    }

    /// Sends a batch to a worker and wakes it. A worker that has exited drops the batch.
    pub fn send(&self, to: CoreId, batch: Vec<CoreMsg>) {
        if batch.is_empty() {
            return;
        }
        if self.senders[to].send(batch).is_ok() {
            self.wakeups[to].wake();
        }
    }

    /// Batches waiting in a worker's inbox.
    pub fn inbox_depth(&self, core: CoreId) -> usize {
        self.senders[core].len()
    }

    /// Sends one message to every worker.
    pub fn broadcast(&self, make: impl Fn() -> CoreMsg) {
        for core in 0..self.cores() {
            self.send(core, vec![make()]);
        }
    }
}
