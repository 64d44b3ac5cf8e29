//! Receipts: per (user, room) cumulative markers, kept by the room's owner. *Delivered up
//! to* follows the ACKs of any of the user's connections (PROTOCOL.md §12); *read up to*
//! follows the user's READ frames (protocol v3).
//!
//! The path of a marker: a connection's worker notes each binding whose ACK moved its
//! `acked`, and each READ, in [`PendingMarkers`]; at the end of the tick
//! ([`Core::send_pending_markers`], called by [`Core::flush`]) it sorts them by (room id,
//! hash of the user id) and merges, so that however many ACKs and READs (and connections of
//! the user on this worker) arrived, the room's owner gets one update per (room, user) per
//! tick (two only on a hash collision, harmless since markers only move forward), all
//! of them in one [`CoreMsg::Markers`] per owner. The owner keeps the markers of its room's members in
//! [`RoomMarkers`] (boxed in the room and absent until the room's first marker, so a room
//! without receipts costs one pointer), monotonic, never past the room's head, only for
//! members of a room (channels keep none), and dropped when the member leaves. Whenever a
//! marker advances, the owner calls [`Core::markers_advanced`]: the one place that learns
//! it (receipt frames to members, the log, the offline hand-off hang off it).
//!
//! RECEIPT frames (protocol v3): a room whose markers moved is queued once; at most every
//! `receipts.interval` the owner sends the members' markers that moved since the last time
//! ([`CoreMsg::Receipts`], one per worker with subscribed connections), and each worker
//! writes one RECEIPT to each of its version-3 connections bound to the room. In disk mode
//! the same update first appends one Markers record per moved member to the owner's log
//! ([`Core::store_markers`]); the RECEIPT is held until it is durable. The server API's
//! unread counts and a room's markers ([`Core::unread_of`], [`Core::receipts_of`]) are read
//! here too.
//!
//! Per-member cost at the owner: one map entry, the user id's `Text` (a shared handle, 32
//! bytes) and a [`Marker`] with its "moved" flag (24 bytes), about 64 bytes with the map's
//! overhead.
//!
//! Owns: the markers, the coalescing of ACKs and READs into marker updates, RECEIPT
//! frames. Must not touch: connections' bindings (it reads what the client frame handler
//! hands it), history.

use std::collections::HashMap;
use std::sync::Arc;

use pabal_codec::{Receipt, ServerFrame, Text};

use super::*;
use crate::ids::{RoomName, UserName};
use crate::io::Token;
use crate::mesh::{CoreMsg, MarkerUpdate, RoomReceipts, RoomUnread};

/// One member's cumulative markers in a room's current epoch (0: nothing yet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Marker {
    /// Every message up to this sequence reached one of the user's connections, which
    /// acknowledged it. Never below `read`: what was read was delivered.
    pub delivered: u64,
    /// The user read every message up to this sequence.
    pub read: u64,
}

impl Marker {
    /// This marker moved forward by `update` (each part at most to `head`); whether it
    /// moved.
    fn advance(&mut self, update: Marker, head: u64) -> bool {
        let before = *self;
        self.read = self.read.max(update.read.min(head));
        self.delivered = self
            .delivered
            .max(update.delivered.min(head))
            .max(self.read);
        *self != before
    }
}

/// One member's markers at the owner.
#[derive(Debug, Default)]
struct Entry {
    marker: Marker,
    /// Moved since the room's last RECEIPT update (listed in `RoomMarkers::moved`).
    moved: bool,
    /// The read marker as of the last update that went out.
    sent_read: u64,
}

/// The markers of one owned room's members.
#[derive(Debug, Default)]
pub(super) struct RoomMarkers {
    by_member: HashMap<Text, Entry>,
    /// Members whose markers moved since the last RECEIPT update, in order (sharing the
    /// keys of `by_member`).
    moved: Vec<Text>,
    /// In the worker's queue of rooms due a RECEIPT update.
    queued: bool,
}

impl RoomMarkers {
    /// The markers restored from the log (disk mode), `None` when there are none.
    pub(super) fn restored(markers: impl Iterator<Item = (Text, Marker)>) -> Option<Box<Self>> {
        let by_member: HashMap<Text, Entry> = markers
            .map(|(user, marker)| {
                let (moved, sent_read) = (false, marker.read);
                (
                    user,
                    Entry {
                        marker,
                        moved,
                        sent_read,
                    },
                )
            })
            .collect();
        (!by_member.is_empty()).then(|| {
            Box::new(RoomMarkers {
                by_member,
                ..RoomMarkers::default()
            })
        })
    }

    pub(super) fn get(&self, user: &str) -> Option<Marker> {
        self.by_member.get(user).map(|e| e.marker)
    }

    /// Moves `user`'s markers by `update` (at most to `head`), listing the member as moved
    /// since the last RECEIPT update; `(was, now)` if they moved. A member without an
    /// entry gets one only if `admit`.
    fn advance_member(
        &mut self,
        user: &str,
        update: Marker,
        head: u64,
        admit: bool,
    ) -> Option<(Marker, Marker)> {
        let entry = match self.by_member.get_mut(user) {
            Some(entry) => entry,
            // The member's first marker: its key is a copy of the name (once per member's
            // entry; the RECEIPT updates share it).
            None if admit => self.by_member.entry(Text::from(user)).or_default(),
            None => return None,
        };
        let was = entry.marker;
        if !entry.marker.advance(update, head) {
            return None;
        }
        let now = entry.marker;
        if !entry.moved {
            entry.moved = true;
            if let Some((key, _)) = self.by_member.get_key_value(user) {
                self.moved.push(key.clone());
            }
        }
        Some((was, now))
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_member.len()
    }
}

/// Marker updates a worker has noted this loop tick, for the rooms' owners. ACKs are noted
/// as the bindings they moved (no hashing per ACK: the binding holds the room, the user and
/// the sequence); READs, which are rare, with their values.
#[derive(Debug, Default)]
pub(super) struct PendingMarkers {
    /// Bindings (connection, alias) whose acknowledged sequence moved, in order, repeats
    /// included (removed when sent).
    acked: Vec<(Token, u32)>,
    /// READs: room, user, the room's stream and the sequence.
    reads: Vec<MarkerUpdate>,
    /// Scratch for sorting a tick's updates by [`sort_key`] (kept for its capacity).
    keyed: Vec<((u64, u64, u64), MarkerUpdate)>,
}

impl PendingMarkers {
    pub(super) fn is_empty(&self) -> bool {
        self.acked.is_empty() && self.reads.is_empty()
    }
}

/// The key updates are sorted by: the room's id, a hash of the user id, the stream. Plain
/// integers, so sorting a tick's updates compares no strings (comparing the room names and
/// user ids themselves was a third of the receipts' cost on the fan-out bench). Updates of
/// one (room, user) get equal keys, so they are adjacent; a hash collision can put another
/// (room, user) between them, which only costs the owner a second, harmless update (markers
/// only move forward) or a second run of the room.
fn sort_key(u: &MarkerUpdate) -> (u64, u64, u64) {
    // Any stable 64-bit hash of the user id does; the room ids' FNV-1a is one.
    (
        u.room.id,
        pabal_codec::room_id(false, u.user.as_str()),
        u.epoch,
    )
}

impl Core {
    /// A connection's binding `alias` moved its acknowledged sequence: the user's delivered
    /// marker may advance (sent to the owner at the end of the tick, coalesced). Channels
    /// keep no markers.
    pub(super) fn note_acked(&mut self, token: Token, alias: u32, channel: bool) {
        if !channel {
            self.pending_markers.acked.push((token, alias));
        }
    }

    /// A READ on a binding of `room` (stream `epoch`) up to `read`: the user's read marker
    /// may advance (sent to the owner at the end of the tick, coalesced).
    pub(super) fn note_read(&mut self, room: &RoomName, user: &UserName, epoch: u64, read: u64) {
        if room.channel {
            return;
        }
        self.pending_markers.reads.push(MarkerUpdate {
            room: room.clone(),
            user: user.clone(),
            epoch,
            marker: Marker { delivered: 0, read },
        });
    }

    /// Sends the marker updates noted this tick to the rooms' owners: at most one update per
    /// (room, user), in one message per owner.
    pub(super) fn send_pending_markers(&mut self) {
        if self.pending_markers.is_empty() {
            return;
        }
        let mut acked = std::mem::take(&mut self.pending_markers.acked);
        let mut updates = std::mem::take(&mut self.pending_markers.reads);
        acked.sort_unstable();
        acked.dedup();
        for &(token, alias) in &acked {
            let Some(conn) = conn_in(&mut self.conns, token) else {
                continue;
            };
            let (Some(Some(sub)), Some(user)) = (conn.subs.get(alias as usize), &conn.user) else {
                continue;
            };
            if sub.is_pending() {
                // Rebound in this tick after the ACK: nothing acknowledged on it, and its
                // `epoch` holds the start it asked for, not a stream's.
                continue;
            }
            updates.push(MarkerUpdate {
                room: sub.room.clone(),
                user: user.clone(),
                epoch: sub.epoch,
                marker: Marker {
                    delivered: sub.acked(),
                    read: 0,
                },
            });
        }
        acked.clear();
        // The list keeps its capacity for the next tick.
        self.pending_markers.acked = acked;
        // One update per (room, user): merge neighbours (a user's devices on this worker, an
        // ACK and a READ); of two streams of a room, the later binding's (higher epoch) wins.
        let mut keyed = std::mem::take(&mut self.pending_markers.keyed);
        keyed.extend(updates.drain(..).map(|u| (sort_key(&u), u)));
        // The list keeps its capacity for the next tick's READs.
        self.pending_markers.reads = updates;
        keyed.sort_unstable_by_key(|(key, _)| *key);
        let mut by_owner: Vec<Vec<MarkerUpdate>> = (0..self.cores).map(|_| Vec::new()).collect();
        for (_, u) in keyed.drain(..) {
            let owner = u.room.owner(self.cores);
            let list = &mut by_owner[owner];
            match list.last_mut() {
                Some(last)
                    if last.room.id == u.room.id
                        && last.room.name == u.room.name
                        && last.user == u.user =>
                {
                    if u.epoch != last.epoch {
                        *last = u;
                    } else {
                        last.marker.delivered = last.marker.delivered.max(u.marker.delivered);
                        last.marker.read = last.marker.read.max(u.marker.read);
                    }
                }
                _ => list.push(u),
            }
        }
        self.pending_markers.keyed = keyed;
        for (owner, updates) in by_owner.into_iter().enumerate() {
            if !updates.is_empty() {
                self.send_to(owner, CoreMsg::Markers(updates));
            }
        }
    }

    /// The owner applies members' marker updates (grouped by room): only for members of the
    /// room, only in the room's current stream, never past the head, never backwards.
    pub(super) fn on_markers(&mut self, updates: Vec<MarkerUpdate>) {
        if self.cluster.is_some() {
            // The markers are the engine's: they go there, one batch per room per tick, and
            // come back through the room's channel (`core/cluster/receipts.rs`).
            return self.cluster_queue_markers(updates);
        }
        let due = self.now + self.config.receipts.interval;
        let mut advanced = Vec::new();
        let mut runs = updates.into_iter().peekable();
        while let Some(first) = runs.next() {
            let room = first.room.clone();
            let Some(owned) = self.owned.get_mut(&room).filter(|_| !room.channel) else {
                while runs.next_if(|u| u.room.name == room.name).is_some() {}
                continue;
            };
            let (head, epoch) = (owned.head, owned.epoch);
            let markers =
                (owned.state.get_or_insert_default().receipts).get_or_insert_with(Box::default);
            let mut u = Some(first);
            while let Some(MarkerUpdate {
                user,
                epoch: e,
                marker: update,
                ..
            }) = u.take()
            {
                if e == epoch {
                    // A user with an entry is a member (leaving removes it).
                    let admit = owned.members.contains(&user);
                    if let Some((was, now)) = markers.advance_member(&user, update, head, admit) {
                        advanced.push((user, was, now));
                    }
                }
                u = runs.next_if(|n| n.room.name == room.name && n.room.id == room.id);
            }
            if !advanced.is_empty() && !markers.queued {
                markers.queued = true;
                self.receipts_due.push_back((due, room.clone()));
            }
            if markers.by_member.is_empty() {
                owned.drop_receipts();
            }
            for (user, was, now) in advanced.drain(..) {
                self.markers_advanced(&room, &user, was, now);
            }
        }
    }

    /// Markers the engine moved (cluster mode, from the room's channel): taken as they are
    /// (the engine admits members only and never passes its head, which this node's may
    /// trail), RECEIPT updates queued as for local ones.
    pub(super) fn apply_engine_markers(
        &mut self,
        room: &RoomName,
        epoch: u64,
        markers: Vec<(Text, Marker)>,
    ) {
        let due = self.now + self.config.receipts.interval;
        let Some(owned) = self
            .owned
            .get_mut(room)
            .filter(|o| !room.channel && o.epoch == epoch)
        else {
            return;
        };
        let held = owned.state_mut().receipts.get_or_insert_with(Box::default);
        let mut advanced = Vec::new();
        for (user, update) in markers {
            if let Some((was, now)) = held.advance_member(user.as_str(), update, u64::MAX, true) {
                advanced.push((user, was, now));
            }
        }
        if !advanced.is_empty() && !held.queued {
            held.queued = true;
            self.receipts_due.push_back((due, room.clone()));
        }
        if held.by_member.is_empty() {
            owned.drop_receipts();
        }
        for (user, was, now) in advanced {
            self.markers_advanced(room, user.as_str(), was, now);
        }
    }

    /// The hook where the owner learns that `user`'s markers in `room` moved from `was` to
    /// `now` (at least one part advanced; the room's next RECEIPT update is queued
    /// already).
    pub(super) fn markers_advanced(
        &mut self,
        room: &RoomName,
        user: &str,
        was: Marker,
        now: Marker,
    ) {
        inc(&self.stats.markers_advanced, 1);
        tracing::trace!(room = %room.name, %user, ?was, ?now, "markers advanced");
    }

    /// When the next RECEIPT update is due.
    pub(super) fn receipts_deadline(&self) -> Option<Instant> {
        self.receipts_due.front().map(|(at, _)| *at)
    }

    /// Sends the RECEIPT updates that are due: per room, the markers that moved since its
    /// last update, to every worker with connections subscribed to it. In a room of more
    /// than `receipts.delivered_max_members` members, a member whose read marker did not
    /// move is left out (its delivered marker rides along with its next read move): ACKs
    /// move delivered markers at machine rate, and a large group would otherwise get every
    /// member's every ACK; reads are the user's own acts.
    pub(super) fn send_due_receipts(&mut self) {
        while let Some(&(due, _)) = self.receipts_due.front() {
            if due > self.now {
                break;
            }
            let Some((_, room)) = self.receipts_due.pop_front() else {
                break;
            };
            let Some(owned) = self.owned.get_mut(&room) else {
                continue;
            };
            let Some(markers) = owned.state.as_mut().and_then(|s| s.receipts.as_mut()) else {
                continue;
            };
            markers.queued = false;
            let epoch = owned.epoch;
            let all = owned.members.len() <= self.config.receipts.delivered_max_members;
            let RoomMarkers {
                by_member, moved, ..
            } = &mut **markers;
            let mut read_moved = Vec::new();
            let moved: Vec<(Text, Marker)> = moved
                .drain(..)
                .filter_map(|user| {
                    let entry = by_member.get_mut(&user)?;
                    entry.moved = false;
                    read_moved.push(entry.marker.read != entry.sent_read);
                    entry.sent_read = entry.marker.read;
                    Some((user, entry.marker))
                })
                .collect();
            if moved.is_empty() {
                continue;
            }
            // Durable where storage is: one record per moved member per interval.
            self.store_markers(&room, epoch, &moved);
            let moved: Arc<[(Text, Marker)]> = if all {
                moved.into()
            } else {
                moved
                    .into_iter()
                    .zip(read_moved)
                    .filter_map(|(m, read)| read.then_some(m))
                    .collect()
            };
            let Some(owned) = self.owned.get(&room).filter(|_| !moved.is_empty()) else {
                continue;
            };
            let cores: Vec<CoreId> = (0..self.cores)
                .filter(|&core| owned.interest[core] > 0)
                .collect();
            for core in cores {
                self.send_to(
                    core,
                    CoreMsg::Receipts {
                        room: room.clone(),
                        epoch,
                        markers: moved.clone(),
                    },
                );
            }
        }
    }

    /// Writes a room's markers update to this worker's version-3 connections bound to the
    /// room's stream `epoch`: one RECEIPT each (more only past the frame size limit),
    /// naming members through the connection's sender table. A connection whose queue is
    /// full misses the update (the server API has the markers).
    pub(super) fn on_receipts(&mut self, room: &RoomName, epoch: u64, markers: &[(Text, Marker)]) {
        let window = self.config.connection.max_queued_bytes;
        let sender_aliases = self.config.connection.sender_aliases;
        // Room for the length prefix, the type byte and the alias.
        let max_body = self.config.connection.max_frame_len.saturating_sub(16);
        let Core {
            local,
            conns,
            dirty,
            ..
        } = self;
        let Some(subs) = local.get(room) else { return };
        for (token, alias) in subs.iter().map(|s| s.parts()) {
            let Some(conn) = conn_in(conns, token).filter(|c| c.is_open() && c.receipts()) else {
                continue;
            };
            match conn.subs.get(alias as usize) {
                Some(Some(sub)) if !sub.is_pending() && sub.epoch == epoch => {}
                _ => continue,
            }
            let mut frame = Receipt {
                alias,
                entries: Vec::new(),
            };
            let mut len = 0;
            for (user, m) in markers {
                // The table's slot shares the name's buffer (a reference count).
                let member = SenderName::Wire(user.clone());
                let entry = conn
                    .ctx
                    .receipt_entry(&member, m.delivered, m.read, sender_aliases);
                let entry_len = entry.encoded_len();
                if len + entry_len > max_body && !frame.entries.is_empty() {
                    write_receipt(conn, &mut frame, window);
                    len = 0;
                }
                len += entry_len;
                frame.entries.push(entry);
            }
            write_receipt(conn, &mut frame, window);
            Self::mark_dirty(dirty, token, conn);
        }
    }

    /// The owner forgets a member's markers (the user left the room).
    pub(super) fn forget_markers(&mut self, room: &RoomName, user: &str) {
        if let Some(owned) = self.owned.get_mut(room)
            && let Some(markers) = owned.state_if_any().and_then(|s| s.receipts.as_mut())
        {
            markers.by_member.remove(user);
            if markers.by_member.is_empty() {
                owned.drop_receipts();
            }
        }
    }

    /// The server API's unread counts of `user` in `rooms` (owned here; rooms the user is
    /// not a member of, or channels, are left out): the messages after both the user's
    /// read marker and join point.
    pub(super) fn unread_of(&self, user: &str, rooms: Vec<RoomName>) -> Vec<RoomUnread> {
        let mut out = Vec::with_capacity(rooms.len());
        for room in rooms {
            let Some(owned) = self.owned.get(&room).filter(|_| !room.channel) else {
                continue;
            };
            let Some(joined_at) = self.join_floor(user, &room, owned.epoch) else {
                continue;
            };
            let joined_at = joined_at.min(owned.head);
            let marker = self.markers(&room, user);
            let unread = owned.head - marker.read.max(joined_at).min(owned.head);
            out.push(RoomUnread {
                head: owned.head,
                room,
                joined_at,
                marker,
                unread,
            });
        }
        out
    }

    /// The server API's view of an owned room's markers: every member with its join point
    /// and markers, by user id; `None` for a room not held here.
    pub(super) fn receipts_of(&self, room: &RoomName) -> Option<RoomReceipts> {
        let owned = self.owned.get(room)?;
        let mut members: Vec<(Text, u64, Marker)> = owned
            .members
            .iter()
            .map(|user| {
                let joined_at = self
                    .join_floor(user, room, owned.epoch)
                    .unwrap_or(0)
                    .min(owned.head);
                let marker = owned
                    .state()
                    .and_then(|s| s.receipts.as_ref()?.get(user))
                    .unwrap_or_default();
                (user.text(), joined_at, marker)
            })
            .collect();
        members.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        Some(RoomReceipts {
            head: owned.head,
            epoch: owned.epoch,
            members,
        })
    }

    /// `user`'s markers in owned `room` (all 0 when the user has none, is not a member, or
    /// the room is not owned here). Messages at or before the user's join point were
    /// never the user's: a marker below it means none since the join.
    pub fn markers(&self, room: &RoomName, user: &str) -> Marker {
        self.owned
            .get(room)
            .and_then(|o| o.state()?.receipts.as_ref()?.get(user))
            .unwrap_or_default()
    }

    /// Every message of owned `room` up to the returned sequence was delivered to (and
    /// acknowledged by) a connection of `user` (see [`Core::markers`]).
    #[cfg_attr(not(test), allow(dead_code))] // reason: the offline hand-off and the receipts API call it
    pub fn delivered_up_to(&self, room: &RoomName, user: &str) -> u64 {
        self.markers(room, user).delivered
    }
}

/// Queues `frame` (its entries taken) on `conn` unless the connection's window is full.
fn write_receipt(conn: &mut crate::conn::Conn, frame: &mut Receipt, window: usize) {
    let entries = std::mem::take(&mut frame.entries);
    if entries.is_empty() {
        return;
    }
    let frame = ServerFrame::Receipt(Receipt {
        alias: frame.alias,
        entries,
    });
    if conn.window_allows(frame.encoded_len(), window) {
        conn.write(&frame);
    }
}
