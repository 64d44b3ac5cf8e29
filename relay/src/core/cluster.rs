//! The owner's side of a cluster (`[cluster]`, see [`crate::cluster`]): publishes go to the
//! engine, which assigns their sequences; messages from the engine (script answers, the
//! room's channel, stream reads) enter the owner's history and fan-out strictly in sequence
//! order, holes read back from the stream first.
//!
//! # A room on a node
//! The first request for a room at its owner (a subscription, join, publish, server-API
//! call) opens it: the engine subscribes the room's channel, then reads the room's epoch,
//! head and recent tail. Requests for the room wait (bounded, `MAX_PARKED`) until it is
//! open, then run as on one relay. What the channel brings before that read is answered
//! waits for the answer too (bounded, `MAX_REORDER`), then follows the head it set: a
//! message published just after the read can be heard before its answer. When the last
//! connection on this node lets the room go, its channel is unsubscribed (its history
//! stays); the next request opens it again, and if the engine's head moved meanwhile the
//! requests wait until the owner has read what it missed from the stream (so a join point
//! is never taken from a stale head).
//!
//! # Order and holes
//! A message whose sequence follows the head is appended and fanned out; one after a hole
//! waits (bounded, `MAX_REORDER`: beyond it, it is read back with the hole) while the owner
//! reads the stream after its head (`Fill`), page by page. Only what the stream's retention
//! dropped becomes a jump of the head, which phones see as an exact GAP. A re-established
//! pub/sub connection makes the owner read the stream after its head before anything else.
//! This node's own publishes are recognised by their ticket whichever way they come back
//! first (script answer, channel, stream): the PUBACK always goes out before the delivery,
//! and the publishing connection never gets its own message. A script's answer reaches the
//! owner after what the channel carried before its copy (`cluster/copies.rs`); one that
//! came without its copy (`ordered: false`) resolves its publisher, and its message waits
//! for the stream. While the stream is read, only the read's entries are appended.
//!
//! # Removals in the room's order
//! A removal the room's channel, stream or open brings ([`RemovalMark`], placed after
//! message `n`) is applied once the head reaches `n`, before `n + 1` is appended: the
//! membership ends in the node's directory (remembered as ended, so an older read or
//! notice cannot bring it back) and the user's connections bound by it are unbound, as one
//! relay's owner removes a member.
//!
//! # The server API
//! A multi-room publish is a batch: each room opens (or waits for its room) and publishes
//! through the engine as a single API publish does; the batch is answered room by room once
//! every room has its answer. A history read reaching before this node's memory is read
//! from the stream (`stream_pages.rs`).
//!
//! # Membership
//! Memberships, blocks and join points are the engine's: see `cluster/members.rs` (HELLOs
//! wait for the user's rooms, changes go to the engine, notices bind and unbind).
//!
//! # Receipts
//! Markers are the engine's too: see `cluster/receipts.rs` (one batch per room per tick to
//! the engine, markers back from the room's channel, the server API's reads). This node's
//! own publishes (and only those) join the offline hand-off's windows, in `resolve`.
//!
//! # What Redis keeps, and loses
//! A room's history in Redis expires once nobody publishes to it: a publish now and then
//! carries the expiry (`cluster/history_expiry.rs`). A room whose sequence Redis gave
//! back below this owner's head (a failover that lost writes) is moved up to it
//! ([`Core::check_room_seq`], script `RAISE`), and every publish names that head
//! (`PublishRequest::owner_head`), so one Redis runs before the owner's read comes back
//! is given a sequence past it too.
//!
//! Owns: each room's open state, parked requests, the reorder buffer, removals waiting for
//! their place, publishes in flight
//! (`cluster.max_in_flight`), multi-room API publishes waiting for their rooms. Must not touch: the engine's connections (only
//! [`EngineCmd`]s out, [`EngineEvent`]s in), other workers (messages only).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use pabal_codec::{ErrorCode, Text};

use super::owner::PublishId;
use super::{COMPACT_BELOW, Core, ReplyTo};
use crate::cluster::{
    ClusterStats, EngineCmd, EngineEvent, EngineMessage, MAX_OPEN_TAIL, PublishRequest,
    RemovalMark, RepeatKey,
};
use crate::idempotency::IdempotencyKey;
use crate::ids::{RoomName, Stored, StoredRef};
use crate::mesh::{ControlOp, ControlRefusal, ControlReply, CoreMsg, Published, PublishedBy};
use crate::sender_name::SenderName;
use crate::stats::inc;

mod history_expiry;
mod members;
mod order;
mod receipts;

/// Requests waiting for one room to open; more are refused (`unavailable`).
const MAX_PARKED: usize = 4096;
/// Messages after a hole held per room; more are read back from the stream with the hole.
const MAX_REORDER: usize = 8192;
/// The message a publish refused for want of the engine carries (with `Overloaded`).
pub(super) const UNAVAILABLE: &str = "unavailable";

/// Who waits for a publish's sequence.
#[derive(Debug)]
enum Publisher {
    /// A connection (PUBACK), with its v2 publish id.
    Client {
        by: PublishedBy,
        publish_id: Option<PublishId>,
    },
    /// The server API, with its `Idempotency-Key`.
    Api {
        reply: ReplyTo,
        key: Option<IdempotencyKey>,
    },
    /// One room of a multi-room server-API publish: the batch, the room's place in it,
    /// and the batch's `Idempotency-Key`.
    Batch {
        batch: u64,
        index: usize,
        key: Option<IdempotencyKey>,
    },
}

/// A multi-room server-API publish ([`ControlOp::PublishMany`]): each room goes to the
/// engine on its own, and the batch is answered once every room has its answer.
#[derive(Debug)]
struct Batch {
    reply: ReplyTo,
    sender: Text,
    payload: Bytes,
    key: Option<IdempotencyKey>,
    /// Each room and, once it has one, its answer, in the order asked.
    answers: Vec<(RoomName, Option<Result<Published, ControlRefusal>>)>,
    /// Rooms not answered yet.
    left: usize,
}

/// A request waiting for its room to open.
#[derive(Debug)]
enum Parked {
    Msg(CoreMsg),
    /// One room of a multi-room publish (see [`Batch`]).
    Batch {
        batch: u64,
        index: usize,
    },
}

/// What a request for a room does now.
enum Gate {
    /// The room is open: the request runs.
    Run,
    /// The room is opening: the request waits for it ([`Core::park`]).
    Park,
    /// Too many requests wait for the room already: refused (`unavailable`).
    Refuse,
}

/// A publish sent to the engine.
#[derive(Debug)]
struct PendingPublish {
    room: RoomName,
    publisher: Publisher,
    ts_ms: u64,
    sender: SenderName,
    payload: Bytes,
    /// It sets the room's history to expire (`cluster/history_expiry.rs`): with a
    /// repeat key (`Some(true)`: the window gets it too) or without.
    sets_expiry: Option<bool>,
}

/// Where a room's channel subscription stands on this node.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum SyncState {
    /// Subscribing and reading the room's state; requests wait.
    #[default]
    Opening,
    /// Subscribed and caught up: requests run.
    Open,
    /// Unsubscribed (no connection here binds it); its history may be behind, so the next
    /// request opens it again and reads what it missed from the stream.
    Closed,
}

/// A room's state on this node.
#[derive(Debug, Default)]
struct RoomSync {
    state: SyncState,
    /// Requests waiting for the room to open.
    parked: Vec<Parked>,
    /// Messages after a hole, by sequence.
    reorder: BTreeMap<u64, StoredRef>,
    /// A stream read is in flight.
    filling: bool,
    /// The owner's epoch of the room when that read was sent.
    fill_epoch: u64,
    /// The highest sequence waiting after a hole when that read was sent: the stream held
    /// everything up to it then, so a hole below it that the read does not fill was dropped
    /// by retention (a hole above it may only be newer than the read).
    fill_covers: u64,
    /// The last place of a removal held when that read was sent (heard, or named by an
    /// open's answer): Redis held it then.
    fill_marks_cover: (u64, u64),
    /// The channel was resubscribed while the room was opening: read the stream once open.
    resync: bool,
    /// Reopening a room whose history fell behind: it opens (and the waiting requests run,
    /// join points included) once its head reaches this.
    open_at: u64,
    /// The open was asked for and its answer ([`EngineEvent::Opened`]) not taken yet.
    awaiting_open: bool,
    /// The room reopened behind the engine while a stream read sent before was still out:
    /// that read's answer may stop short of `open_at` (it ran before the messages after
    /// it were published), and the room then reads again.
    stale_fill: bool,
    /// What the room's channel brought while `awaiting_open`, with their epochs, in the
    /// order heard (at most `MAX_REORDER`; more are read back from the stream): offered
    /// once the answer set the room's epoch and head.
    early: Vec<(u64, Heard)>,
    /// Removals known and placed after the head, by place (at most `MAX_REORDER`; more
    /// are read back from the stream): each is applied once the head reaches the message it
    /// follows, before the next one is appended.
    marks: BTreeMap<(u64, u64), RemovalMark>,
    /// The place of the last removal applied (`(0, 0)`: none this epoch): the next stream
    /// read starts after it when it follows the head's message.
    applied: (u64, u64),
    /// While a full page of the stream is applied, the last place it covers: removals held
    /// past it wait for the next page.
    apply_limit: Option<(u64, u64)>,
    /// This worker's messages whose publishers were answered from a script's answer that
    /// came unordered (`EngineEvent::Published { ordered: false }`): by sequence, with
    /// their tickets; each enters the room's order when the stream or the channel brings
    /// it, as the message resolved here (so its publisher is not sent it).
    answered: BTreeMap<u64, (u64, StoredRef)>,
}

/// What a room's channel carries, in its order.
#[derive(Debug)]
enum Heard {
    Message(EngineMessage),
    Removal(RemovalMark),
}

/// The cluster state of one worker.
#[derive(Debug)]
pub(super) struct ClusterSide {
    pub(super) out: Vec<EngineCmd>,
    rooms: HashMap<RoomName, RoomSync>,
    pending: HashMap<u64, PendingPublish>,
    next_ticket: u64,
    /// Multi-room API publishes waiting for some of their rooms, by id.
    batches: HashMap<u64, Batch>,
    next_batch: u64,
    /// Readers waiting for a page of a stream (see `stream_pages.rs`), by id.
    pub(super) readers: HashMap<u64, super::stream_pages::PageReader>,
    pub(super) next_reader: u64,
    stats: Arc<ClusterStats>,
    /// Membership in the engine (`cluster/members.rs`).
    members: members::MembersSide,
    /// Markers batches and receipts reads (`cluster/receipts.rs`).
    receipts: receipts::ReceiptsSide,
    /// When this worker's publishes last set each room's history to expire.
    history_expiry: history_expiry::HistoryExpiry,
}

impl Core {
    /// Makes this worker a cluster node's owner (`[cluster]`): its rooms are sequenced by
    /// the engine. The runtime carries [`Core::drain_engine`]'s commands to the worker's
    /// engine and feeds its events to [`Core::on_engine`].
    pub fn attach_cluster(&mut self, stats: Arc<ClusterStats>) {
        self.cluster = Some(Box::new(ClusterSide {
            out: Vec::new(),
            rooms: HashMap::new(),
            pending: HashMap::new(),
            // Tickets of an earlier run of a node with the same id never match.
            next_ticket: self.now_ms() << 20,
            batches: HashMap::new(),
            next_batch: 0,
            readers: HashMap::new(),
            next_reader: 0,
            stats,
            members: members::MembersSide::default(),
            receipts: receipts::ReceiptsSide::default(),
            history_expiry: history_expiry::HistoryExpiry::default(),
        }));
    }

    /// Hands the commands for the engine queued since the last call; whether there were any.
    pub fn drain_engine(&mut self, mut send: impl FnMut(EngineCmd)) -> bool {
        // The tick's marker updates: one command per room.
        self.flush_marker_batches();
        self.flush_releases();
        let Some(side) = self.cluster.as_deref_mut() else {
            return false;
        };
        let any = !side.out.is_empty();
        for cmd in side.out.drain(..) {
            send(cmd);
        }
        any
    }

    /// What the engine reports, at `now`.
    pub fn on_engine(&mut self, now: Instant, event: EngineEvent) {
        self.advance_to(now);
        match event {
            EngineEvent::Published {
                ticket,
                epoch,
                seq,
                repeated,
                ordered,
            } => {
                let Some(p) = self.take_pending(ticket) else {
                    return; // its message came back first and resolved it
                };
                if repeated {
                    // The engine's window knew it: the first publish's sequence, nothing new.
                    return self.resolve_repeat(p.publisher, seq);
                }
                // At or below the head: another message holds its sequence here (Redis
                // gave it again, having lost writes), or its own did without resolving it
                // (a fresh open's tail). `RAISE` tells which: it moves the room's
                // sequence only when it is below the head.
                self.check_room_seq(&p.room, epoch, seq.saturating_sub(1));
                let room = p.room.clone();
                let msg = self.resolve(p, seq);
                if ordered {
                    return self.cluster_offer(&room, epoch, msg, false);
                }
                // A removal placed before it may not be known yet: it enters the room's
                // order from the stream (or its copy, should that still come).
                let same_epoch = self.owned.get(&room).is_some_and(|o| o.epoch == epoch);
                if let Some(sync) = self.sync_mut(&room)
                    && same_epoch
                    && sync.answered.len() < MAX_REORDER
                {
                    sync.answered.insert(seq, (ticket, msg));
                }
                self.request_fill(&room);
            }
            EngineEvent::PublishFailed { ticket } => {
                if let Some(p) = self.take_pending(ticket) {
                    self.refuse_publisher(p.publisher);
                    // Redis may have run it all the same (a connection lost after the
                    // script, `WAIT` short of its replicas, whose copy the engine does not
                    // take): other nodes deliver it, and the stream says whether it is
                    // there, with no later message needed to reveal it.
                    if self
                        .sync_mut(&p.room)
                        .is_some_and(|s| s.state == SyncState::Open)
                    {
                        self.request_fill(&p.room);
                    }
                }
            }
            EngineEvent::Opened {
                room,
                epoch,
                seq,
                tail,
                marks,
            } => self.on_opened(room, epoch, seq, tail, marks),
            EngineEvent::OpenFailed { room } => {
                // Still opening: forgotten (its channel closed, what waited refused), so
                // the next request opens it again.
                if self
                    .sync_mut(&room)
                    .is_some_and(|s| s.state == SyncState::Opening)
                {
                    self.cluster_forget(&room);
                }
            }
            EngineEvent::Filled { room, page } => {
                // After the page: the head may have jumped to a message held from the
                // channel that Redis has since lost (`order.rs`, past what retention dropped).
                let (epoch, room_seq) = (page.epoch, page.room_seq);
                self.on_filled(&room, page);
                self.check_room_seq(&room, epoch, room_seq);
            }
            EngineEvent::RaiseFailed { room, epoch } => {
                // Not run (the connection lost again, Redis refusing): read the room
                // again, which asks again if its sequence is still behind.
                let open = self
                    .sync_mut(&room)
                    .is_some_and(|s| s.state == SyncState::Open);
                if open && self.owned.get(&room).is_some_and(|o| o.epoch == epoch) {
                    self.request_fill(&room);
                }
            }
            EngineEvent::Read {
                room,
                after,
                reader,
                msgs,
                full,
                last,
            } => self.on_stream_read(&room, after, reader, msgs, full, last),
            EngineEvent::Message { room, epoch, msg } => {
                self.on_channel(&room, epoch, Heard::Message(msg));
            }
            EngineEvent::Removal { room, epoch, mark } => {
                self.on_channel(&room, epoch, Heard::Removal(mark));
            }
            member @ (EngineEvent::MemberDone { .. }
            | EngineEvent::MemberFailed { .. }
            | EngineEvent::UserLoaded { .. }
            | EngineEvent::UserLoadFailed { .. }
            | EngineEvent::Notice { .. }
            | EngineEvent::MembersRead { .. }
            | EngineEvent::Kicked { .. }
            | EngineEvent::Claimed { .. }
            | EngineEvent::LookedUp { .. }) => self.on_member_event(member),
            receipts @ (EngineEvent::Markers { .. }
            | EngineEvent::HandoffOwed { .. }
            | EngineEvent::ReceiptsRead { .. }
            | EngineEvent::UnreadRead { .. }) => self.on_receipts_event(receipts),
            EngineEvent::Resubscribed { room } => {
                // Markers that moved while the channel was down were not heard here.
                self.cluster_load_markers(&room);
                let Some(sync) = self.sync_mut(&room) else {
                    return;
                };
                if sync.awaiting_open || sync.state == SyncState::Closed {
                    // Read once the open's answer set the head.
                    sync.resync = true;
                    return;
                }
                // A read already out may have run before the channel was lost: what was
                // published after it and not heard is read once it is answered.
                if sync.filling {
                    sync.stale_fill = true;
                }
                self.request_fill(&room);
            }
        }
    }

    fn sync_mut(&mut self, room: &RoomName) -> Option<&mut RoomSync> {
        self.cluster.as_deref_mut()?.rooms.get_mut(room)
    }

    fn take_pending(&mut self, ticket: u64) -> Option<PendingPublish> {
        self.cluster.as_deref_mut()?.pending.remove(&ticket)
    }

    /// In cluster mode, lets a message through to its handler, or takes it: a publish of
    /// an open room goes to the engine; anything for a room not open yet waits for it.
    pub(super) fn cluster_gate(&mut self, msg: CoreMsg) -> Option<CoreMsg> {
        if self.cluster.is_none() {
            return Some(msg);
        }
        let room = match &msg {
            CoreMsg::Publish { room, .. }
            | CoreMsg::Ephemeral { room, .. }
            | CoreMsg::Subscribe { room, .. }
            | CoreMsg::Fetch { room, .. }
            | CoreMsg::Join { room, .. } => room,
            CoreMsg::Control { op, .. } => match op {
                ControlOp::Publish { room, .. }
                | ControlOp::Members { room, .. }
                | ControlOp::Info { room, .. }
                | ControlOp::History { room, .. } => room,
                // Markers live in the engine: read there, the same on every node.
                ControlOp::Receipts { .. } | ControlOp::UnreadEverywhere { .. } => {
                    if let CoreMsg::Control { op, reply } = msg {
                        match op {
                            ControlOp::Receipts { room } => self.cluster_read_receipts(room, reply),
                            ControlOp::UnreadEverywhere { user } => {
                                self.cluster_read_unread(user, reply);
                            }
                            _ => {}
                        }
                    }
                    return None;
                }
                ControlOp::Unread { .. } => return Some(msg),
                ControlOp::PublishMany { .. } => {
                    if let CoreMsg::Control {
                        op:
                            ControlOp::PublishMany {
                                rooms,
                                sender,
                                payload,
                                key,
                            },
                        reply,
                    } = msg
                    {
                        self.cluster_publish_many(rooms, sender, payload, key, reply);
                    }
                    return None;
                }
                ControlOp::Kick { .. } => return Some(msg),
                ControlOp::Lookup(_) => {
                    if let CoreMsg::Control {
                        op: ControlOp::Lookup(lookup),
                        reply,
                    } = msg
                    {
                        self.cluster_lookup(lookup, reply);
                    }
                    return None;
                }
                ControlOp::KickEverywhere { .. } => {
                    if let CoreMsg::Control {
                        op: ControlOp::KickEverywhere { user },
                        reply,
                    } = msg
                    {
                        self.cluster_kick(user, reply);
                    }
                    return None;
                }
            },
            _ => return Some(msg),
        };
        match self.gate(room) {
            Gate::Run => {}
            Gate::Park => {
                let room = room.clone();
                self.park(&room, Parked::Msg(msg));
                return None;
            }
            Gate::Refuse => {
                self.refuse_parked(msg);
                return None;
            }
        }
        // A client's publish goes on to `publish_once_from` (owner.rs), which checks the
        // window of publish ids and hands it to the engine.
        match msg {
            CoreMsg::Control {
                op:
                    ControlOp::Publish {
                        room,
                        sender,
                        payload,
                        ephemeral: false,
                        key,
                    },
                reply,
            } => {
                if let Some(seq) = self.repeated_key(&room, key.as_ref()) {
                    self.reply(
                        reply,
                        ControlReply::Published(Some(Published::Repeat { seq })),
                    );
                } else {
                    self.cluster_publish(
                        room,
                        Publisher::Api { reply, key },
                        sender.into(),
                        payload,
                    );
                }
                None
            }
            CoreMsg::Control {
                op:
                    ControlOp::Members {
                        room,
                        add,
                        remove,
                        set,
                    },
                reply,
            } => {
                self.cluster_members(room, add, remove, set, reply);
                None
            }
            CoreMsg::Control {
                op: ControlOp::History { room, after, limit },
                reply,
            } if self.needs_stream(&room, after) => {
                self.read_history_stream(&room, after, limit, reply);
                None
            }
            other => Some(other),
        }
    }

    /// Whether a request for `room` runs now, waits for the room to open, or is refused;
    /// a room not held here (or unsubscribed since) starts opening: the engine subscribes
    /// its channel and reads its state first.
    fn gate(&mut self, room: &RoomName) -> Gate {
        let Some(side) = self.cluster.as_deref() else {
            return Gate::Run;
        };
        match side.rooms.get(room).map(|s| (s.state, s.parked.len())) {
            Some((SyncState::Open, _)) => Gate::Run,
            Some((SyncState::Opening, n)) if n < MAX_PARKED => Gate::Park,
            Some((SyncState::Opening, _)) => Gate::Refuse,
            _ => {
                let tail = (self.config.retention_for(room.name.as_str()).max_messages as u64)
                    .min(self.config.cluster.as_ref().map_or(0, |c| c.stream_max_len))
                    .min(MAX_OPEN_TAIL);
                let epoch_hint = self.fresh_epoch();
                let Some(side) = self.cluster.as_deref_mut() else {
                    return Gate::Run;
                };
                let sync = side.rooms.entry(room.clone()).or_default();
                sync.state = SyncState::Opening;
                sync.awaiting_open = true;
                side.out.push(EngineCmd::Open {
                    room: room.clone(),
                    epoch_hint,
                    tail,
                });
                Gate::Park
            }
        }
    }

    /// Makes `request` wait for `room` to open (after [`Gate::Park`]).
    fn park(&mut self, room: &RoomName, request: Parked) {
        if let Some(sync) = self.sync_mut(room) {
            sync.parked.push(request);
        }
    }

    /// A multi-room server-API publish: each room goes to the engine as a single API
    /// publish does (its own sequence, its own window of keys), and the batch is answered
    /// room by room once all have an answer, as on one relay.
    fn cluster_publish_many(
        &mut self,
        rooms: Vec<RoomName>,
        sender: Text,
        payload: Bytes,
        key: Option<IdempotencyKey>,
        reply: ReplyTo,
    ) {
        if self.shutdown.draining {
            // As on one relay: accepted after the shutdown fences, it would reach nobody.
            return self.reply(reply, ControlReply::Refused(ControlRefusal::Draining));
        }
        let Some(side) = self.cluster.as_deref_mut() else {
            return;
        };
        let (batch, count) = (side.next_batch, rooms.len());
        side.next_batch += 1;
        if count == 0 {
            return self.reply(reply, ControlReply::PublishedMany(Vec::new()));
        }
        side.batches.insert(
            batch,
            Batch {
                reply,
                sender,
                payload,
                key,
                answers: rooms.into_iter().map(|room| (room, None)).collect(),
                left: count,
            },
        );
        for index in 0..count {
            let Some(room) = self
                .cluster
                .as_deref()
                .and_then(|side| side.batches.get(&batch))
                .and_then(|b| b.answers.get(index))
                .map(|(room, _)| room.clone())
            else {
                return;
            };
            match self.gate(&room) {
                Gate::Run => self.publish_batch_room(batch, index),
                Gate::Park => self.park(&room, Parked::Batch { batch, index }),
                Gate::Refuse => self.refuse_parked_room(batch, index),
            }
        }
    }

    /// One room of a batch, its room open: a key the room saw recently answers with the
    /// first sequence; otherwise the room's publish goes to the engine.
    fn publish_batch_room(&mut self, batch: u64, index: usize) {
        let Some((room, sender, payload, key)) = self
            .cluster
            .as_deref()
            .and_then(|side| side.batches.get(&batch))
            .and_then(|b| {
                let (room, _) = b.answers.get(index)?;
                Some((room.clone(), b.sender.clone(), b.payload.clone(), b.key))
            })
        else {
            return;
        };
        if let Some(seq) = self.repeated_key(&room, key.as_ref()) {
            return self.answer_batch(batch, index, Ok(Published::Repeat { seq }));
        }
        let publisher = Publisher::Batch { batch, index, key };
        self.cluster_publish(room, publisher, sender.into(), payload);
    }

    /// Room `index` of `batch` has its answer; the batch is answered once all have one.
    fn answer_batch(
        &mut self,
        batch: u64,
        index: usize,
        answer: Result<Published, ControlRefusal>,
    ) {
        let Some(side) = self.cluster.as_deref_mut() else {
            return;
        };
        let Some(b) = side.batches.get_mut(&batch) else {
            return;
        };
        if let Some((_, slot @ None)) = b.answers.get_mut(index) {
            *slot = Some(answer);
            b.left -= 1;
        }
        if b.left > 0 {
            return;
        }
        let Some(b) = side.batches.remove(&batch) else {
            return;
        };
        let answers = b
            .answers
            .into_iter()
            .map(|(room, answer)| (room, answer.unwrap_or(Err(ControlRefusal::Unavailable))))
            .collect();
        self.reply(b.reply, ControlReply::PublishedMany(answers));
    }

    /// A room of a batch that could not wait for its room to open.
    fn refuse_parked_room(&mut self, batch: u64, index: usize) {
        if let Some(side) = self.cluster.as_deref() {
            side.stats.refused.fetch_add(1, Ordering::Relaxed);
        }
        self.answer_batch(batch, index, Err(ControlRefusal::Unavailable));
    }

    /// A client's publish (its publish id not seen recently) goes to the engine.
    pub(super) fn cluster_publish_client(
        &mut self,
        room: RoomName,
        by: PublishedBy,
        sender: SenderName,
        payload: Bytes,
        publish_id: Option<PublishId>,
    ) {
        self.cluster_publish(room, Publisher::Client { by, publish_id }, sender, payload);
    }

    fn cluster_publish(
        &mut self,
        room: RoomName,
        publisher: Publisher,
        sender: SenderName,
        payload: Bytes,
    ) {
        let payload = if payload.len() < COMPACT_BELOW {
            Bytes::copy_from_slice(&payload)
        } else {
            payload
        };
        let (epoch_hint, ts_ms) = (self.fresh_epoch(), self.now_ms());
        let max = self.config.cluster.as_ref().map_or(0, |c| c.max_in_flight);
        let repeat = match &publisher {
            Publisher::Client {
                publish_id: Some((publisher, msg_id)),
                ..
            } => Some(RepeatKey::Device {
                publisher: *publisher,
                msg_id: *msg_id,
            }),
            Publisher::Api { key: Some(key), .. } | Publisher::Batch { key: Some(key), .. } => {
                Some(RepeatKey::Api(*key))
            }
            _ => None,
        };
        // One window per room holds both kinds of key, and any publish may be the one
        // that trims it: every publish names the same span.
        let window = self
            .config
            .limits
            .publish_ids
            .max(self.config.control.idempotency_keys);
        let span = self.history_span(&room);
        // Redis' answer is past what this owner delivered, even from a Redis that lost
        // writes and was not read again yet (`script::PUBLISH`).
        let owner_head = self
            .owned
            .get(&room)
            .filter(|o| o.epoch != 0 && o.head != 0)
            .map(|o| (o.epoch, o.head));
        let Some(side) = self.cluster.as_deref_mut() else {
            return;
        };
        if side.pending.len() >= max {
            side.stats.refused.fetch_add(1, Ordering::Relaxed);
            return self.refuse_publisher(publisher);
        }
        let ticket = side.next_ticket;
        side.next_ticket += 1;
        let keyed = repeat.is_some();
        let expire_ms = span.and_then(|span| side.history_expiry.due(&room, ts_ms, span, keyed));
        side.out.push(EngineCmd::Publish(PublishRequest {
            ticket,
            room: room.clone(),
            epoch_hint,
            ts_ms,
            sender: sender.clone(),
            payload: payload.clone(),
            repeat,
            window,
            expire_ms,
            owner_head,
        }));
        side.pending.insert(
            ticket,
            PendingPublish {
                room,
                publisher,
                ts_ms,
                sender,
                payload,
                sets_expiry: expire_ms.map(|_| keyed),
            },
        );
    }

    /// The engine says `room`'s sequence in `epoch` is `room_seq`: below the head this
    /// owner holds in the same epoch, Redis lost writes it had acknowledged (a failover
    /// to a replica behind, a restart from an AOF synced once a second), and would give
    /// their sequences again, to new messages every node that delivered the lost ones
    /// would drop. The engine moves it up to the head ([`crate::cluster::script::RAISE`]):
    /// what was lost becomes a gap.
    pub(super) fn check_room_seq(&mut self, room: &RoomName, epoch: u64, room_seq: u64) {
        let Some(owned) = self.owned.get(room) else {
            return;
        };
        if owned.epoch != epoch || room_seq >= owned.head {
            return;
        }
        let head = owned.head;
        self.push_engine(EngineCmd::Raise {
            room: room.clone(),
            epoch,
            head,
        });
    }

    /// What `room`'s history in Redis is kept for (`cluster/history_expiry.rs`): the
    /// messages a read may serve (`retention.max_age`), the repeat keys a retry may name
    /// (`limits.publish_id_max_age`, `control.idempotency_max_age`).
    /// `None` with `cluster.expire_history = false`: the history never expires.
    pub(super) fn history_span(&self, room: &RoomName) -> Option<std::time::Duration> {
        self.config.cluster.as_ref().filter(|c| c.expire_history)?;
        let span = self
            .config
            .retention_for(room.name.as_str())
            .max_age
            .max(self.config.limits.publish_id_max_age)
            .max(self.config.control.idempotency_max_age);
        Some(span)
    }

    /// A publish the engine did not take: `Overloaded` `unavailable` (retryable).
    fn refuse_publisher(&mut self, publisher: Publisher) {
        match publisher {
            Publisher::Client { by, .. } => self.send_to(
                by.origin.core,
                CoreMsg::NotAccepted {
                    by,
                    code: ErrorCode::Overloaded,
                    message: UNAVAILABLE.to_owned(),
                },
            ),
            Publisher::Api { reply, .. } => {
                self.reply(reply, ControlReply::Refused(ControlRefusal::Unavailable));
            }
            Publisher::Batch { batch, index, .. } => {
                self.answer_batch(batch, index, Err(ControlRefusal::Unavailable));
            }
        }
    }

    /// A repeat the engine's window recognised: the publisher gets the first sequence.
    fn resolve_repeat(&mut self, publisher: Publisher, seq: u64) {
        inc(&self.stats.publishes_repeated, 1);
        match publisher {
            Publisher::Client { by, .. } => {
                self.send_to(by.origin.core, CoreMsg::Accepted { by, seq });
            }
            Publisher::Api { reply, .. } => {
                self.reply(
                    reply,
                    ControlReply::Published(Some(Published::Repeat { seq })),
                );
            }
            Publisher::Batch { batch, index, .. } => {
                self.answer_batch(batch, index, Ok(Published::Repeat { seq }));
            }
        }
    }

    /// A request that could not wait for its room to open.
    fn refuse_parked(&mut self, msg: CoreMsg) {
        if let Some(side) = self.cluster.as_deref() {
            side.stats.refused.fetch_add(1, Ordering::Relaxed);
        }
        match msg {
            CoreMsg::Publish { by, .. } => self.refuse_publisher(Publisher::Client {
                by,
                publish_id: None,
            }),
            CoreMsg::Control { reply, .. } => {
                self.reply(reply, ControlReply::Refused(ControlRefusal::Unavailable));
            }
            CoreMsg::Subscribe { origin, .. }
            | CoreMsg::Fetch { origin, .. }
            | CoreMsg::Join {
                requester: Some(origin),
                ..
            } => self.refuse_origin(origin, ErrorCode::Overloaded, UNAVAILABLE.to_owned()),
            other => tracing::debug!(?other, "dropped: its room could not open in time"),
        }
    }

    /// The publisher learns the sequence (PUBACK, or the server API's answer) and the
    /// room remembers its publish id or key; returns the message as history holds it.
    fn resolve(&mut self, p: PendingPublish, seq: u64) -> StoredRef {
        let (now, max_ids, max_age) = (
            self.now,
            self.config.limits.publish_ids,
            self.config.limits.publish_id_max_age,
        );
        // This node sequenced it: this node decides its offline hand-off.
        self.note_own_for_handoff(&p.room, seq, p.ts_ms, &p.sender);
        if let Some(keyed) = p.sets_expiry
            && let Some(side) = self.cluster.as_deref_mut()
        {
            side.history_expiry.set(&p.room, p.ts_ms, keyed);
        }
        let origin = match p.publisher {
            Publisher::Client { by, publish_id } => {
                if let (Some(id), Some(owned)) = (publish_id, self.owned.get_mut(&p.room)) {
                    owned
                        .state_mut()
                        .publish_ids
                        .get_or_insert_default()
                        .record(id, seq, now, max_ids, max_age);
                }
                self.send_to(by.origin.core, CoreMsg::Accepted { by, seq });
                Some(by.origin)
            }
            Publisher::Api { reply, key } => {
                if let Some(key) = key {
                    self.remember_key(&p.room, key, seq);
                }
                self.reply(reply, ControlReply::Published(Some(Published::New { seq })));
                None
            }
            Publisher::Batch { batch, index, key } => {
                if let Some(key) = key {
                    self.remember_key(&p.room, key, seq);
                }
                self.answer_batch(batch, index, Ok(Published::New { seq }));
                None
            }
        };
        Arc::new(Stored {
            seq,
            ts_ms: p.ts_ms,
            accepted_at: self.now,
            sender: p.sender,
            origin,
            payload: p.payload,
        })
    }

    fn on_opened(
        &mut self,
        room: RoomName,
        epoch: u64,
        seq: u64,
        tail: Vec<EngineMessage>,
        marks: Vec<RemovalMark>,
    ) {
        let now_ms = self.now_ms();
        self.cluster_load_markers(&room);
        if !self.owned.contains_key(&room) {
            self.create_room(&room, epoch);
        }
        let now = self.now;
        let mut refill = false;
        let mut fresh = false;
        let config = &self.config;
        let mut restarted = Vec::new();
        if let Some(owned) = self.owned.get_mut(&room) {
            if owned.epoch != epoch || owned.head == 0 {
                fresh = true;
                if owned.epoch != epoch {
                    // Reopened in a new epoch: the workers binding the room bind it again.
                    restarted = (0..owned.interest.len())
                        .filter(|&c| owned.interest[c] > 0)
                        .collect();
                }
                owned.epoch = epoch;
                owned.clear_history();
                let mut last = None;
                for m in tail.into_iter().filter(|m| m.seq <= seq) {
                    if last.is_some_and(|l: u64| l + 1 != m.seq) {
                        owned.clear_history();
                    }
                    last = Some(m.seq);
                    owned
                        .history_to_append(|| config.retention_for(room.name.as_str()))
                        .push(stored(m, now), now_ms);
                }
                if last.is_some_and(|l| l != seq) {
                    // The stream ends below the room's sequence: Redis lost what was
                    // between and a raise moved the sequence past it. Memory holds only
                    // what follows the head; readers before it go to the stream.
                    owned.clear_history();
                }
                owned.head = seq;
            } else {
                refill = seq > owned.head;
            }
        }
        self.check_room_seq(&room, epoch, seq);
        for core in restarted {
            let room = room.clone();
            self.send_to(core, CoreMsg::Restarted { room, epoch });
        }
        let Some(sync) = self.sync_mut(&room) else {
            return;
        };
        sync.awaiting_open = false;
        if fresh {
            sync.marks.clear();
            sync.answered.clear();
            sync.applied = (0, 0);
        }
        let early = std::mem::take(&mut sync.early);
        if refill {
            // Reopened behind the engine: catch up from the stream before anything runs
            // (the removals among the tail come with it, in their places).
            sync.open_at = seq;
            sync.resync = false;
            sync.stale_fill = sync.filling;
            // The room's removals the answer named wait for their places (the read may
            // not bring those retention dropped).
            for mark in marks {
                if mark.place() > sync.applied && sync.marks.len() < MAX_REORDER {
                    sync.marks.insert(mark.place(), mark);
                }
            }
            self.request_fill(&room);
            return self.offer_early(&room, early);
        }
        let resync = std::mem::take(&mut sync.resync);
        // The removals among the tail (all at or before the head the answer set) end
        // their memberships here before any waiting request runs.
        for mark in marks {
            self.offer_mark(&room, epoch, mark, true);
        }
        if resync {
            // The channel was lost meanwhile: the stream first (what it brought waits).
            self.request_fill(&room);
        }
        // What the channel brought meanwhile follows the head the answer set (a hole
        // before it is read from the stream), before the waiting requests run.
        self.offer_early(&room, early);
        self.finish_open(&room);
    }

    /// Offers what the channel brought while the room's open was not answered yet.
    fn offer_early(&mut self, room: &RoomName, early: Vec<(u64, Heard)>) {
        for (epoch, heard) in early {
            match heard {
                Heard::Message(msg) => self.offer_engine_msg(room, epoch, msg, false),
                Heard::Removal(mark) => self.offer_mark(room, epoch, mark, false),
            }
        }
    }

    /// The room is open: the requests that waited run, in order.
    fn finish_open(&mut self, room: &RoomName) {
        let Some(sync) = self.sync_mut(room) else {
            return;
        };
        sync.state = SyncState::Open;
        sync.open_at = 0;
        for request in std::mem::take(&mut sync.parked) {
            match request {
                Parked::Msg(msg) => self.handle_one(msg),
                Parked::Batch { batch, index } => self.publish_batch_room(batch, index),
            }
        }
    }

    /// The last connection on this node bound to `room` let it go: its channel is
    /// unsubscribed (the room's history stays; the next request reopens it and reads what
    /// was published meanwhile from the stream).
    pub(super) fn cluster_release_if_unwatched(&mut self, room: &RoomName) {
        if !self
            .owned
            .get(room)
            .is_some_and(|o| o.interest.iter().all(|&n| n == 0))
        {
            return;
        }
        if let Some(side) = self.cluster.as_deref_mut()
            && let Some(sync) = side.rooms.get_mut(room)
            && sync.state == SyncState::Open
        {
            sync.state = SyncState::Closed;
            sync.reorder.clear();
            sync.answered.clear();
            side.out.push(EngineCmd::Close { room: room.clone() });
        }
    }

    /// Nothing of `room` is under way with the engine: no open asked for or requests
    /// waiting for one, no stream read out (always, off a cluster). The owner evicts only
    /// such a room.
    pub(super) fn cluster_settled(&self, room: &RoomName) -> bool {
        self.cluster
            .as_deref()
            .and_then(|side| side.rooms.get(room))
            .is_none_or(|s| {
                s.state != SyncState::Opening
                    && s.parked.is_empty()
                    && !s.awaiting_open
                    && !s.filling
            })
    }

    /// The owner evicted `room`: its channel is no longer needed here.
    pub(super) fn cluster_forget(&mut self, room: &RoomName) {
        let Some(side) = self.cluster.as_deref_mut() else {
            return;
        };
        let Some(sync) = side.rooms.remove(room) else {
            return;
        };
        side.out.push(EngineCmd::Close { room: room.clone() });
        // Whatever still waited for the room is refused, so no batch waits for it forever.
        for request in sync.parked {
            match request {
                Parked::Msg(msg) => self.refuse_parked(msg),
                Parked::Batch { batch, index } => self.refuse_parked_room(batch, index),
            }
        }
    }
}

/// A message from the engine as history holds it (`accepted_at`: when it arrived here).
pub(super) fn stored(m: EngineMessage, now: Instant) -> StoredRef {
    Arc::new(Stored {
        seq: m.seq,
        ts_ms: m.ts_ms,
        accepted_at: now,
        sender: SenderName::Wire(m.sender),
        origin: None,
        payload: m.payload,
    })
}
