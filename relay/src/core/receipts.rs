//! Receipts: per (user, room) cumulative markers, kept by the room's owner. *Delivered up
//! to* follows the ACKs of any of the user's connections (PROTOCOL.md §12); *read up to*
//! follows the user's READ frames (protocol v3).
//!
//! The path of a marker: a connection's worker notes each ACK that moves a binding's
//! `acked` in [`PendingMarkers`], keyed by (room, user), so that however many ACKs (and
//! connections of the user on this worker) arrive in one loop tick, the room's owner gets
//! at most one [`CoreMsg::Markers`] per (room, user) per tick ([`Core::send_pending_markers`],
//! called by [`Core::flush`]). The owner keeps the markers of its room's members in
//! [`RoomMarkers`] (boxed in the room and absent until the room's first marker, so a room
//! without receipts costs one pointer), monotonic, never past the room's head, only for
//! members of a room (channels keep none), and dropped when the member leaves. Whenever a
//! marker advances, the owner calls [`Core::markers_advanced`]: the one place that learns
//! it (receipt frames to members, the log, the offline hand-off hang off it).
//!
//! Per-member cost at the owner: one map entry, the user id's `Text` (a shared handle, 32
//! bytes) and a [`Marker`] (16 bytes), about 64 bytes with the map's overhead.
//!
//! Owns: the markers and the coalescing of ACKs into marker updates. Must not touch:
//! connections' bindings (it reads what the client frame handler hands it), history.

use std::collections::HashMap;

use pabal_codec::Text;

use super::*;
use crate::ids::RoomName;
use crate::mesh::CoreMsg;

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

/// The markers of one owned room's members.
#[derive(Debug, Default)]
pub(super) struct RoomMarkers {
    by_member: HashMap<Text, Marker>,
}

impl RoomMarkers {
    pub(super) fn get(&self, user: &Text) -> Option<Marker> {
        self.by_member.get(user).copied()
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_member.len()
    }
}

/// Marker updates a worker has noted this loop tick, one per (room, user), for the rooms'
/// owners.
#[derive(Debug, Default)]
pub(super) struct PendingMarkers {
    updates: HashMap<(RoomName, Text), (u64, Marker)>,
}

impl PendingMarkers {
    /// Notes that `user`'s connection acknowledged (`delivered`) or read (`read`) up to a
    /// sequence of `room`'s stream `epoch`; merged with what is noted already.
    pub(super) fn note(&mut self, room: &RoomName, user: &Text, epoch: u64, update: Marker) {
        let entry = self
            .updates
            .entry((room.clone(), user.clone()))
            .or_insert((epoch, Marker::default()));
        if entry.0 != epoch {
            // A binding of another stream of the room: the later one stands.
            *entry = (epoch, Marker::default());
        }
        entry.1.read = entry.1.read.max(update.read);
        entry.1.delivered = entry.1.delivered.max(update.delivered);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.updates.is_empty()
    }
}

impl Core {
    /// A connection's binding of `room` (stream `epoch`) moved its acknowledged sequence to
    /// `acked`: the user's delivered marker may advance (sent to the owner at the end of the
    /// tick, coalesced). Channels keep no markers.
    pub(super) fn note_acked(&mut self, room: &RoomName, user: &Text, epoch: u64, acked: u64) {
        if room.channel {
            return;
        }
        let update = Marker {
            delivered: acked,
            read: 0,
        };
        self.pending_markers.note(room, user, epoch, update);
    }

    /// Sends the marker updates noted this tick to the rooms' owners: one message per
    /// (room, user).
    pub(super) fn send_pending_markers(&mut self) {
        if self.pending_markers.is_empty() {
            return;
        }
        let mut updates = std::mem::take(&mut self.pending_markers.updates);
        for ((room, user), (epoch, marker)) in updates.drain() {
            let owner = room.owner(self.cores);
            self.send_to(
                owner,
                CoreMsg::Markers {
                    room,
                    user,
                    epoch,
                    delivered: marker.delivered,
                    read: marker.read,
                },
            );
        }
        // The map keeps its capacity for the next tick.
        self.pending_markers.updates = updates;
    }

    /// The owner applies a member's marker update: only for a member of the room, only in
    /// the room's current stream, never past the head, never backwards.
    pub(super) fn on_markers(&mut self, room: &RoomName, user: &Text, epoch: u64, update: Marker) {
        let Some(owned) = self.owned.get_mut(room) else {
            return;
        };
        if room.channel || owned.epoch != epoch || !owned.members.contains(user) {
            return;
        }
        let head = owned.head;
        let markers = owned.receipts.get_or_insert_with(Box::default);
        let marker = markers.by_member.entry(user.clone()).or_default();
        let was = *marker;
        if marker.advance(update, head) {
            let now = *marker;
            self.markers_advanced(room, user, was, now);
        }
    }

    /// The hook where the owner learns that `user`'s markers in `room` moved from `was` to
    /// `now` (at least one part advanced).
    pub(super) fn markers_advanced(
        &mut self,
        room: &RoomName,
        user: &Text,
        was: Marker,
        now: Marker,
    ) {
        inc(&self.stats.markers_advanced, 1);
        tracing::trace!(room = %room.name, %user, ?was, ?now, "markers advanced");
    }

    /// The owner forgets a member's markers (the user left the room).
    pub(super) fn forget_markers(&mut self, room: &RoomName, user: &Text) {
        if let Some(owned) = self.owned.get_mut(room)
            && let Some(markers) = owned.receipts.as_mut()
        {
            markers.by_member.remove(user);
            if markers.by_member.is_empty() {
                owned.receipts = None;
            }
        }
    }

    /// `user`'s markers in owned `room` (all 0 when the user has none, is not a member, or
    /// the room is not owned here). Messages at or before the user's join point were
    /// never the user's: a marker below it means none since the join.
    #[cfg_attr(not(test), allow(dead_code))] // reason: the offline hand-off and the receipts API call it
    pub fn markers(&self, room: &RoomName, user: &Text) -> Marker {
        self.owned
            .get(room)
            .and_then(|o| o.receipts.as_ref()?.get(user))
            .unwrap_or_default()
    }

    /// Every message of owned `room` up to the returned sequence was delivered to (and
    /// acknowledged by) a connection of `user` (see [`Core::markers`]).
    #[cfg_attr(not(test), allow(dead_code))] // reason: the offline hand-off and the receipts API call it
    pub fn delivered_up_to(&self, room: &RoomName, user: &Text) -> u64 {
        self.markers(room, user).delivered
    }
}
