//! The room owner: the rooms this worker owns. Sequencing and history, membership changes
//! (join points), answers to subscription and page requests (never before a user's join
//! point), ephemeral broadcast, and eviction of rooms nobody uses.
//!
//! Owns: [`OwnedRoom`]s. Must not touch: connections (it answers their workers with
//! messages, even when the connection is on this worker).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use pabal_codec::LeftReason;

use super::stream_pages::PageReader;
use super::*;
use crate::directory::DirectoryError;
use crate::history::History;
use crate::ids::{Origin, RoomName, Stored, StoredRef, UserName};
use crate::mesh::{CoreMsg, Page, PublishedBy, StartFrom};
use crate::stats::inc;

/// A message's publish id (protocol v2): the connection's publisher (user and device) and
/// the client's msg_id.
pub(super) type PublishId = (u64, u64);

/// A room's window of recent publish ids, bounded by `limits.publish_ids` and
/// `limits.publish_id_max_age`.
pub(super) type PublishIds = crate::idempotency::IdempotencyWindow<u64, PublishId>;

/// Up to this many workers, a room's [`Interest`] holds its counts inline.
const INTEREST_INLINE: usize = 4;

/// Subscribed connections per worker, for one owned room (indexed by worker, through
/// `Deref` to a slice): inline up to [`INTEREST_INLINE`] workers, boxed past them. The
/// vector it was cost every room a heap block of a few bytes (about 16 bytes per phone
/// in 1:1 rooms on one worker) for the same 24 bytes in the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Interest {
    /// `counts[..len]`.
    Inline {
        len: u32,
        counts: [u32; INTEREST_INLINE],
    },
    /// More workers than fit inline.
    Boxed(Box<[u32]>),
}

impl Interest {
    /// No connection subscribed on any of `cores` workers.
    pub(super) fn new(cores: usize) -> Self {
        if cores <= INTEREST_INLINE {
            Interest::Inline {
                len: cores as u32,
                counts: [0; INTEREST_INLINE],
            }
        } else {
            Interest::Boxed(vec![0; cores].into_boxed_slice())
        }
    }
}

impl Default for Interest {
    fn default() -> Self {
        Interest::new(0)
    }
}

impl std::ops::Deref for Interest {
    type Target = [u32];

    fn deref(&self) -> &[u32] {
        match self {
            Interest::Inline { len, counts } => &counts[..*len as usize],
            Interest::Boxed(counts) => counts,
        }
    }
}

impl std::ops::DerefMut for Interest {
    fn deref_mut(&mut self) -> &mut [u32] {
        match self {
            Interest::Inline { len, counts } => &mut counts[..*len as usize],
            Interest::Boxed(counts) => counts,
        }
    }
}

impl PartialEq<Vec<u32>> for Interest {
    fn eq(&self, other: &Vec<u32>) -> bool {
        **self == other[..]
    }
}

/// A room this worker owns: what every room holds, inline (80 bytes, one per 1:1 room,
/// i.e. per two phones); what only a used room holds lives in one [`RoomState`] box.
#[derive(Debug)]
pub(super) struct OwnedRoom {
    pub(super) epoch: u64,
    pub(super) head: u64,
    /// Subscribed connections per worker.
    pub(super) interest: Interest,
    /// Members (rooms) or subscribers (channels); the directory holds the same facts by
    /// user, and every change to both goes through this owner.
    pub(super) members: super::members::MemberSet,
    /// Its key in the worker's log (disk mode; 0 until its first record).
    pub(super) key: crate::storage::RoomKey,
    /// History, windows of keys and publish ids, receipts, hand-offs: made on first use
    /// (an idle room that never had a message has none), dropped when all are empty.
    /// Through the methods below, or directly where another field is borrowed beside it.
    pub(super) state: Option<Box<RoomState>>,
    /// In the worker's queue of idle rooms to check for eviction.
    pub(super) idle_queued: bool,
    /// The log holds the room's current epoch (disk mode).
    pub(super) epoch_stored: bool,
}

/// What a room holds only once it is used that way: one box for all of it, so that a room
/// without messages, keys, publish ids, markers or hand-offs (an idle 1:1 room) pays 8
/// bytes for the lot (inline they took 104 of the room's record).
#[derive(Debug, Default)]
pub(super) struct RoomState {
    /// Retained messages; made at the room's first message, under the retention the
    /// configuration gives the room's name then (a reload sets every history's).
    pub(super) history: Option<History>,
    /// The server API's recent `Idempotency-Key`s and the sequences they got.
    pub(super) idempotency: Option<Box<crate::idempotency::IdempotencyWindow<u64>>>,
    /// Protocol v2: the publish ids of recent messages and the sequences they got (see
    /// [`Core::publish_once_from`]); allocated at the room's first such publish.
    pub(super) publish_ids: Option<Box<PublishIds>>,
    /// Its members' delivered and read markers (see [`super::receipts`]); allocated at the
    /// room's first marker.
    pub(super) receipts: Option<Box<super::receipts::RoomMarkers>>,
    /// Offline hand-off: windows of recent messages waiting for their delay (see
    /// [`super::handoff`]); absent while none is pending.
    pub(super) handoffs: Option<Box<crate::handoff::detect::RoomWindows>>,
}

impl RoomState {
    /// Holds nothing: no message, no key, no publish id, no marker, no hand-off.
    fn is_empty(&self) -> bool {
        self.history.as_ref().is_none_or(History::is_empty)
            && self.idempotency.is_none()
            && self.publish_ids.is_none()
            && self.receipts.is_none()
            && self.handoffs.is_none()
    }
}

/// The history of a room that has none: empty, so every read of it is an empty read.
static NO_HISTORY: History = History::new(crate::config::Retention {
    max_messages: 0,
    max_bytes: 0,
    max_age: std::time::Duration::ZERO,
});

impl OwnedRoom {
    /// A room with no member, no subscribed connection and nothing else held yet.
    pub(super) fn new(epoch: u64, cores: usize) -> Self {
        OwnedRoom {
            epoch,
            head: 0,
            interest: Interest::new(cores),
            members: super::members::MemberSet::default(),
            key: 0,
            state: None,
            idle_queued: false,
            epoch_stored: false,
        }
    }

    /// No members, no subscribed connection anywhere: only retained history keeps it.
    pub(super) fn unused(&self) -> bool {
        self.members.is_empty() && self.interest.iter().all(|&n| n == 0)
    }

    /// The room's retained messages (empty if it never had any).
    pub(super) fn history(&self) -> &History {
        self.state
            .as_ref()
            .and_then(|s| s.history.as_ref())
            .unwrap_or(&NO_HISTORY)
    }

    /// The room's retained messages, if it has a history to change.
    pub(super) fn history_mut(&mut self) -> Option<&mut History> {
        self.state.as_mut()?.history.as_mut()
    }

    /// Drops retained messages past the room's retention.
    pub(super) fn evict_expired(&mut self, now_ms: u64) {
        if let Some(history) = self.history_mut() {
            history.evict_expired(now_ms);
        }
    }

    /// Drops the room's retained messages (a new stream, or a gap).
    pub(super) fn clear_history(&mut self) {
        if let Some(history) = self.history_mut() {
            history.clear();
        }
    }

    /// The room's history, made (under `retention`) if it has none: for appending.
    pub(super) fn history_to_append(
        &mut self,
        retention: impl FnOnce() -> crate::config::Retention,
    ) -> &mut History {
        self.state_mut()
            .history
            .get_or_insert_with(|| History::new(retention()))
    }

    /// What the room holds beyond its record, if anything.
    pub(super) fn state(&self) -> Option<&RoomState> {
        self.state.as_deref()
    }

    /// What the room holds beyond its record, to change in place (`None`: nothing held).
    pub(super) fn state_if_any(&mut self) -> Option<&mut RoomState> {
        self.state.as_deref_mut()
    }

    /// What the room holds beyond its record, made empty if it holds nothing yet.
    pub(super) fn state_mut(&mut self) -> &mut RoomState {
        self.state.get_or_insert_default()
    }

    /// Forgets the room's markers (none left), and the state box if that emptied it.
    pub(super) fn drop_receipts(&mut self) {
        if let Some(state) = self.state_if_any() {
            state.receipts = None;
        }
        self.shed_empty_state();
    }

    /// Drops the state box once it holds nothing (its history emptied by retention, its
    /// windows and markers gone): a room back to idle costs its record alone again.
    pub(super) fn shed_empty_state(&mut self) {
        if self.state.as_ref().is_some_and(|s| s.is_empty()) {
            self.state = None;
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Fault injection for the simulator's own test: the owner forgets the join point when
    /// answering a subscription, as the relay did before the outside review.
    pub(super) static SKIP_JOIN_CLAMP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Core {
    /// An owned room, created (in a fresh epoch) if this worker does not hold it.
    pub(super) fn owned_room(&mut self, room: &RoomName) -> &mut OwnedRoom {
        if !self.owned.contains_key(room) {
            let epoch = self.fresh_epoch();
            self.create_room(room, epoch);
        }
        let Some(owned) = self.owned.get_mut(room) else {
            unreachable!("created above")
        };
        owned
    }

    /// This worker's handle of `room` if it owns the room, else `room` itself: what to store
    /// wherever the room's name is kept, so every copy shares the owner's one record.
    pub(super) fn owners_name(&self, room: &RoomName) -> RoomName {
        self.owned
            .get_key_value(room)
            .map_or_else(|| room.clone(), |(known, _)| known.clone())
    }

    /// Takes ownership of `room` with `record`.
    fn hold_room(&mut self, room: RoomName, record: OwnedRoom) {
        self.owned.insert(room, Box::new(record));
    }

    /// Creates `room` and queues it for an eviction check: it is unused until someone joins
    /// or subscribes.
    pub(super) fn create_room(&mut self, room: &RoomName, epoch: u64) {
        self.create_room_unqueued(room, epoch);
        self.note_if_unused(room);
    }

    /// Creates `room` without queuing it for an eviction check: for a join, which puts its
    /// member in at once (and queues the room itself if it fails), so that a room made by a
    /// join costs no entry in the queue of idle rooms (64 bytes each, and the queue keeps
    /// its high-water capacity).
    fn create_room_unqueued(&mut self, room: &RoomName, epoch: u64) {
        self.hold_room(room.clone(), OwnedRoom::new(epoch, self.cores));
        self.stats
            .rooms
            .store(self.owned.len() as u64, Ordering::Relaxed);
    }

    /// The epoch of a room created now: unique on this worker and never below the boot
    /// epoch, so a room evicted and created again never reuses the sequences of an earlier
    /// stream under the same epoch, and epochs from an earlier run of the relay stay below
    /// every epoch of this one.
    pub(super) fn fresh_epoch(&mut self) -> u64 {
        let epoch = self.now_ms().max(self.epoch).max(self.last_epoch + 1);
        self.last_epoch = epoch;
        epoch
    }

    /// A membership serial: increasing on this worker across restarts too (never below the
    /// clock in microseconds), so no two memberships of a room share one.
    pub(super) fn fresh_serial(&mut self) -> u64 {
        let serial = (self.now_ms() * 1000).max(self.last_serial + 1);
        self.last_serial = serial;
        serial
    }

    /// Queues an owned room for an eviction check if nothing but history keeps it.
    pub(super) fn note_if_unused(&mut self, room: &RoomName) {
        let due = self.now + IDLE_ROOM_CHECK;
        if let Some(owned) = self.owned.get_mut(room)
            && owned.unused()
            && !owned.idle_queued
        {
            owned.idle_queued = true;
            self.idle_rooms.push_back((due, room.clone()));
        }
    }

    /// Evicts owned rooms that have had no members and no subscribers since their check
    /// was queued and whose retention has dropped every message; rooms still holding
    /// history are checked again later. Bounded: rooms nobody uses do not accumulate.
    pub(super) fn evict_idle_rooms(&mut self) {
        let now = self.now;
        let now_ms = self.now_ms();
        let mut evicted = 0;
        while let Some((due, _)) = self.idle_rooms.front() {
            if *due > now {
                break;
            }
            let Some((_, room)) = self.idle_rooms.pop_front() else {
                break;
            };
            // On a cluster, a room reopening (requests waiting for its open, a stream read
            // out) is in use although nothing is bound to it yet: checked again later.
            let settled = self.cluster_settled(&room);
            let Some(owned) = self.owned.get_mut(&room) else {
                continue;
            };
            if !settled {
                self.idle_rooms.push_back((now + IDLE_ROOM_CHECK, room));
                continue;
            }
            owned.idle_queued = false;
            if !owned.unused() {
                continue;
            }
            owned.evict_expired(now_ms);
            owned.shed_empty_state();
            // In disk mode the log forgets the room too (it comes back in a new epoch, as
            // in memory mode); if the log refuses, the room stays and is checked later.
            if owned.history().is_empty() && self.store_drop(&room) {
                self.owned.remove(&room);
                self.cluster_forget(&room);
                evicted += 1;
            } else if let Some(owned) = self.owned.get_mut(&room) {
                owned.idle_queued = true;
                self.idle_rooms.push_back((now + IDLE_ROOM_CHECK, room));
            }
        }
        if evicted > 0 {
            inc(&self.stats.rooms_evicted, evicted);
            self.stats
                .rooms
                .store(self.owned.len() as u64, Ordering::Relaxed);
        }
    }

    /// The floor of `user`'s stream of an owned room: the user's join point in the room's
    /// current epoch (everything of a later epoch was published after the join), or `None`
    /// when the user is not a member. Every start (resume, join, page) is clamped to it.
    /// A join in a later epoch than the owner holds (a cluster's engine lost the room and
    /// the join started it again) is past everything the owner holds: its head.
    pub(super) fn join_floor(&self, user: &str, room: &RoomName, owned_epoch: u64) -> Option<u64> {
        let join = self.directory.join_point(user, room)?;
        Some(match join.epoch.cmp(&owned_epoch) {
            std::cmp::Ordering::Equal => join.seq,
            std::cmp::Ordering::Less => 0,
            std::cmp::Ordering::Greater => self.owned.get(room).map_or(0, |o| o.head),
        })
    }

    /// The owner answers a connection binding one of its rooms: the stream starts where the
    /// request asks, but never before the user's join point, whatever epoch the request
    /// names (so no resume entry can read what was published before the user joined or
    /// while they were removed).
    pub(super) fn on_subscribe_request(
        &mut self,
        room: RoomName,
        origin: Origin,
        alias: u32,
        user: &str,
        from: StartFrom,
        request: u64,
    ) {
        let epoch = self.owned.get(&room).map_or(self.epoch, |o| o.epoch);
        let Some(floor) = self.join_floor(user, &room, epoch) else {
            return self.not_member(room, origin, alias, request);
        };
        // A cluster node may trail the engine: a phone resuming here from another node can
        // have seen messages this node has not received yet. Its cursor then stands (a live
        // message at or below it is not sent again); alone, a relay's head is the room's, and
        // a cursor past it is clamped.
        let trails_engine = self.cluster.is_some();
        let owned = self.owned_room(&room);
        owned.interest[origin.core] += 1;
        let asked = match from {
            StartFrom::Live => owned.head,
            StartFrom::Resume { epoch, last_seq: s } | StartFrom::Join { epoch, seq: s } => {
                if epoch != owned.epoch {
                    0
                } else if trails_engine {
                    s
                } else {
                    s.min(owned.head)
                }
            }
        };
        #[cfg(test)]
        let floor = if SKIP_JOIN_CLAMP.with(std::cell::Cell::get) {
            0
        } else {
            floor
        };
        // A join point past a trailing node's head stands too: what the node has not
        // received yet up to it was published before the join.
        let start = if trails_engine {
            asked.max(floor)
        } else {
            asked.max(floor.min(owned.head))
        };
        let reader = PageReader::Subscribe {
            origin,
            alias,
            request,
            start,
        };
        self.answer_page(&room, start, reader);
    }

    /// The owner answers a page request of a catching-up connection, from no earlier than
    /// the user's join point; a user no longer a member gets the alias unbound.
    pub(super) fn on_fetch(
        &mut self,
        room: RoomName,
        origin: Origin,
        alias: u32,
        user: &str,
        after: u64,
        request: u64,
    ) {
        let trails_engine = self.cluster.is_some();
        let floor = self.owned.get(&room).and_then(|o| {
            let floor = self.join_floor(user, &room, o.epoch)?;
            Some(if trails_engine {
                floor
            } else {
                floor.min(o.head)
            })
        });
        let Some(floor) = floor else {
            return self.not_member(room, origin, alias, request);
        };
        let reader = PageReader::Fetch {
            origin,
            alias,
            request,
        };
        self.answer_page(&room, after.max(floor), reader);
    }

    pub(super) fn not_member(&mut self, room: RoomName, origin: Origin, alias: u32, request: u64) {
        self.send_to(
            origin.core,
            CoreMsg::NotMember {
                room,
                origin,
                alias,
                request,
            },
        );
    }

    /// A page of an owned room's history after `after`, within retention, with the room's
    /// epoch and head as of the cut.
    pub(super) fn cut_page(&mut self, room: &RoomName, after: u64) -> Option<(Page, u64, u64)> {
        let page_bytes = self.config.connection.replay_page_bytes;
        let (msgs, info, epoch, head) = self.read_history(room, after, page_bytes, usize::MAX)?;
        let page = Page {
            gap: info.gap,
            msgs,
            complete: info.complete,
        };
        Some((page, epoch, head))
    }

    /// Messages of an owned room after `after` (up to about `max_bytes` and `max_msgs`),
    /// with the room's epoch and head: from memory, or, for what lies before the in-memory
    /// tail, from the log (disk mode) one page at a time, never loading the whole room.
    pub(super) fn read_history(
        &mut self,
        room: &RoomName,
        after: u64,
        max_bytes: usize,
        max_msgs: usize,
    ) -> Option<(Vec<StoredRef>, crate::history::PageInfo, u64, u64)> {
        let now_ms = self.now_ms();
        let owned = self.owned.get_mut(room)?;
        owned.evict_expired(now_ms);
        let (epoch, head) = (owned.epoch, owned.head);
        let mem_first = owned.history().first_seq().unwrap_or(head + 1);
        if self.durable()
            && after < head
            && after + 1 < mem_first
            && let Some((msgs, info)) =
                self.disk_page(room, after, (mem_first, head), max_bytes, max_msgs)
        {
            return Some((msgs, info, epoch, head));
        }
        let owned = self.owned.get_mut(room)?;
        let mut msgs = Vec::new();
        let info = owned
            .history()
            .page(after, head, max_bytes, max_msgs, &mut msgs);
        Some((msgs, info, epoch, head))
    }

    /// The owner adds a member: records the join point (the room's head now, so the new
    /// member's connections replay anything published after it) and tells the workers that
    /// hold the user's connections. Returns whether the user is new to the room.
    pub(super) fn join_member(
        &mut self,
        room: &RoomName,
        user: &str,
        unblock: bool,
    ) -> Result<bool, DirectoryError> {
        // The directory and the workers keep the owner's handle of the room (one shared
        // record), not the one this request carried.
        let room = &self.owners_name(room);
        // A refused join creates nothing: the room exists only once someone is in it.
        let serial = self.fresh_serial();
        let join = match self.owned.get(room) {
            Some(owned) => crate::directory::JoinPoint {
                epoch: owned.epoch,
                seq: owned.head,
                serial,
            },
            None => crate::directory::JoinPoint {
                epoch: self.fresh_epoch(),
                seq: 0,
                serial,
            },
        };
        let was_blocked = unblock && self.directory.is_blocked(user, room);
        let added = self.directory.add(user, room, join, unblock)?;
        if !self.owned.contains_key(room) {
            self.create_room_unqueued(room, join.epoch);
        }
        if (added.new || was_blocked)
            && let Err(e) = self.store_join(room, user, added.join, was_blocked)
        {
            // No member goes in: a room this join made waits for its eviction check.
            self.note_if_unused(room);
            // Not stored, so not done: undo the directory's side.
            if added.new {
                self.directory.remove(user, room, was_blocked);
            } else if was_blocked {
                self.directory.remove(user, room, true);
                let _ = self.directory.add(user, room, added.join, false);
            }
            return Err(DirectoryError::Storage(super::durable::error_of(&e).1));
        }
        if let Some(owned) = self.owned.get_mut(room) {
            owned.members.insert(added.user.clone());
        }
        if added.new {
            for core in added.cores {
                self.send_to(
                    core,
                    CoreMsg::MemberJoined {
                        room: room.clone(),
                        user: added.user.clone(),
                        join,
                    },
                );
            }
        }
        Ok(added.new)
    }

    /// The owner removes a member and unbinds the room on the user's connections. Deliveries
    /// from this owner after this point never reach them (messages between two workers keep
    /// their order). Returns whether the user was a member.
    pub(super) fn leave_member(
        &mut self,
        room: &RoomName,
        user: &str,
        block: bool,
        reason: LeftReason,
    ) -> bool {
        let member = self
            .owned
            .get(room)
            .is_some_and(|o| o.members.contains(user));
        let block = block && !self.directory.is_blocked(user, room);
        if let Err(e) = self.store_leave(room, user, member, block) {
            // Not stored, so not done: the user stays (the server API reports it).
            inc(&self.stats.limit_refusals, 1);
            tracing::warn!(%user, room = %room.name, "leave not stored: {e}");
            return false;
        }
        let crate::directory::Removed {
            was,
            cores,
            block_refused,
        } = self.directory.remove(user, room, block);
        let reason = match block_refused {
            Some(e) => {
                // Left all the same, but not blocked: the LEFT says so.
                inc(&self.stats.limit_refusals, 1);
                tracing::debug!(%user, room = %room.name, "block refused: {e}");
                LeftReason::Unsubscribed
            }
            None => reason,
        };
        // The member set's handle to the name, for the workers' messages.
        let handle = self
            .owned
            .get_mut(room)
            .and_then(|owned| owned.members.remove(user))
            .unwrap_or_else(|| UserName::from(user));
        self.forget_markers(room, user);
        self.note_if_unused(room);
        if let Some(join) = was {
            for core in cores {
                self.send_to(
                    core,
                    CoreMsg::MemberLeft {
                        room: room.clone(),
                        user: handle.clone(),
                        reason,
                        serial: join.serial,
                    },
                );
            }
        }
        was.is_some()
    }

    /// The owner passes an ephemeral event to every interested worker: no sequence, no
    /// history.
    pub(super) fn broadcast_ephemeral(
        &mut self,
        room: &RoomName,
        origin: Option<Origin>,
        sender: SenderName,
        payload: Bytes,
    ) {
        let ts_ms = self.now_ms();
        let interest = std::mem::take(&mut self.owned_room(room).interest);
        for (core, &n) in interest.iter().enumerate() {
            if n > 0 {
                self.send_to(
                    core,
                    CoreMsg::DeliverEphemeral {
                        room: room.clone(),
                        origin,
                        sender: sender.clone(),
                        ts_ms,
                        payload: payload.clone(),
                    },
                );
            }
        }
        if let Some(owned) = self.owned.get_mut(room) {
            owned.interest = interest;
        }
    }

    /// The owner takes a client's publish, once per publish id: a repeat of a message the
    /// room remembers (`limits.publish_ids`, `limits.publish_id_max_age`) is answered with
    /// the original sequence, and nothing is stored or delivered again (PROTOCOL.md §12).
    /// The answer goes through [`Core::send_to`] like any PUBACK, so in disk mode it never
    /// overtakes the original's durability.
    pub(super) fn publish_once_from(
        &mut self,
        room: RoomName,
        by: PublishedBy,
        sender: SenderName,
        payload: Bytes,
    ) -> Result<(), crate::storage::StorageError> {
        let (now, max_ids, max_age) = (
            self.now,
            self.config.limits.publish_ids,
            self.config.limits.publish_id_max_age,
        );
        let id = (by.publisher != 0 && max_ids > 0).then_some((by.publisher, by.msg_id));
        if let Some(id) = id
            && let Some(seq) = self.owned.get_mut(&room).and_then(|o| {
                o.state_if_any()?
                    .publish_ids
                    .as_mut()?
                    .get(&id, now, max_age)
            })
        {
            inc(&self.stats.publishes_repeated, 1);
            self.send_to(by.origin.core, CoreMsg::Accepted { by, seq });
            return Ok(());
        }
        if self.cluster.is_some() {
            // Sequenced by the engine; the PUBACK follows its answer (core/cluster.rs).
            self.cluster_publish_client(room, by, sender, payload, id);
            return Ok(());
        }
        self.accept_publish(room, Some(by), sender, payload, id)
            .map(|_| ())
    }

    /// The owner accepts a message: sequence, log (disk mode), the room's window of publish
    /// ids (`publish_id`, protocol v2), history, PUBACK, then one delivery per interested
    /// worker. Refused, with nothing sequenced, when the log does
    /// not take it (full disk).
    pub(super) fn accept_publish(
        &mut self,
        room: RoomName,
        from: Option<PublishedBy>,
        sender: SenderName,
        payload: Bytes,
        publish_id: Option<PublishId>,
    ) -> Result<u64, crate::storage::StorageError> {
        let now_ms = self.now_ms();
        let now = self.now;
        // Small payloads are slices of a large receive buffer: give history its own copy
        // once, so a retained 20-byte message does not pin that buffer.
        let payload = if payload.len() < COMPACT_BELOW {
            Bytes::copy_from_slice(&payload)
        } else {
            payload
        };
        let seq = self.owned_room(&room).head + 1;
        self.store_message(&room, seq, now_ms, sender.as_str(), &payload, publish_id)?;
        let (max_ids, max_age) = (
            self.config.limits.publish_ids,
            self.config.limits.publish_id_max_age,
        );
        let owned = self.owned_room(&room);
        owned.head = seq;
        if let Some(id) = publish_id {
            // Remembered once stored, so a repeat is answered with this sequence.
            owned
                .state_mut()
                .publish_ids
                .get_or_insert_default()
                .record(id, seq, now, max_ids, max_age);
        }
        let msg = Arc::new(Stored {
            seq,
            ts_ms: now_ms,
            accepted_at: now,
            sender,
            origin: from.map(|by| by.origin),
            payload,
        });
        if let Some(by) = from {
            // The PUBACK goes first: the publisher's worker must see it before the delivery.
            self.send_to(by.origin.core, CoreMsg::Accepted { by, seq });
        }
        self.append_and_fan_out(&room, msg);
        Ok(seq)
    }

    /// Appends an accepted message to its room's history (the head becomes its sequence)
    /// and sends one delivery per interested worker.
    pub(super) fn append_and_fan_out(&mut self, room: &RoomName, msg: StoredRef) {
        let now_ms = self.now_ms();
        let config = &self.config;
        let Some(owned) = self.owned.get_mut(room) else {
            return;
        };
        owned.head = msg.seq;
        owned
            .history_to_append(|| config.retention_for(room.name.as_str()))
            .push(msg.clone(), now_ms);
        let interest = std::mem::take(&mut owned.interest);
        inc(&self.stats.messages_in, 1);
        for (core, &n) in interest.iter().enumerate() {
            if n > 0 {
                self.send_to(
                    core,
                    CoreMsg::Deliver {
                        room: room.clone(),
                        msg: msg.clone(),
                    },
                );
            }
        }
        if let Some(owned) = self.owned.get_mut(room) {
            owned.interest = interest;
        }
        self.note_for_handoff(room, msg.seq, msg.ts_ms, &msg.sender);
    }
}
