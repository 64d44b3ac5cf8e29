//! A cluster node's receipts (`[cluster]`): markers live in the engine
//! ([`crate::cluster::receipts`]), so every node sees the acks and reads of phones on every
//! node.
//!
//! # Markers
//! Workers coalesce their connections' ACKs and READs per tick and send them to the
//! room's owner as on one relay ([`super::super::receipts`]). In cluster mode the owner does
//! not apply them itself: it gathers a tick's updates per room ([`Core::cluster_queue_markers`])
//! and sends one [`EngineCmd::Markers`] per room at the end of the tick
//! ([`Core::flush_marker_batches`], called when the tick's engine commands are drained),
//! one entry per member (the largest of each part). The engine moves the markers and
//! publishes those that moved on the room's channel; every node's owner of the room (this
//! one included) applies what the channel says ([`EngineEvent::Markers`]) and sends
//! RECEIPT frames as on one relay.
//!
//! # The server API
//! A room's receipts and a user's unread counts are read from the engine, the same on every
//! node; with the engine down they are refused `unavailable` (503).
//!
//! Owns: the tick's marker batches, the API reads waiting for the engine. Must not touch:
//! the markers the owner holds (applied in `core/receipts.rs`), the engine's connections.

use std::collections::HashMap;

use pabal_codec::Text;

use super::super::{Core, ReplyTo};
use crate::cluster::receipts::{MAX_RECEIPTS_MEMBERS, ReceiptsAnswer};
use crate::cluster::{EngineCmd, EngineEvent};
use crate::core::Marker;
use crate::ids::{RoomName, UserName};
use crate::mesh::{ControlRefusal, ControlReply, MarkerUpdate};

/// The owner's receipts state in cluster mode.
#[derive(Debug, Default)]
pub(in crate::core) struct ReceiptsSide {
    /// This tick's marker updates per room: the room's epoch and the updates.
    batches: HashMap<RoomName, (u64, Vec<(UserName, Marker)>)>,
    /// Server-API reads waiting for the engine, by ticket.
    api: HashMap<u64, ReplyTo>,
    next_ticket: u64,
}

/// Merges a room's updates into one per member (the largest of each part), sorted by user.
fn one_per_member(list: &mut Vec<(UserName, Marker)>) {
    list.sort_unstable_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    list.dedup_by(|later, kept| {
        if later.0 != kept.0 {
            return false;
        }
        kept.1.delivered = kept.1.delivered.max(later.1.delivered);
        kept.1.read = kept.1.read.max(later.1.read);
        true
    });
}

impl Core {
    /// The owner's marker updates from the workers (cluster mode): gathered per room until
    /// the end of the tick. Channels keep no markers; of two streams of a room, the later
    /// one's updates win.
    pub(in crate::core) fn cluster_queue_markers(&mut self, updates: Vec<MarkerUpdate>) {
        let Some(side) = self.cluster.as_deref_mut() else {
            return;
        };
        for u in updates.into_iter().filter(|u| !u.room.channel) {
            let (epoch, list) = side.receipts.batches.entry(u.room).or_default();
            if u.epoch < *epoch {
                continue;
            }
            if u.epoch > *epoch {
                *epoch = u.epoch;
                list.clear();
            }
            // The engine's batch shares the member's name record (no copy per member).
            list.push((u.user, u.marker));
        }
    }

    /// Sends the tick's marker updates: one engine command per room, one entry per member.
    pub(in crate::core) fn flush_marker_batches(&mut self) {
        let Some(side) = self.cluster.as_deref_mut() else {
            return;
        };
        if side.receipts.batches.is_empty() {
            return;
        }
        for (room, (epoch, mut markers)) in side.receipts.batches.drain() {
            one_per_member(&mut markers);
            side.out.push(EngineCmd::Markers {
                room,
                epoch,
                markers,
            });
        }
    }

    /// Reads `room`'s markers from the engine (it opened here, or its channel came back):
    /// what moved while this node was not listening reaches its phones' RECEIPTs.
    pub(in crate::core) fn cluster_load_markers(&mut self, room: &RoomName) {
        if room.channel {
            return;
        }
        if let Some(side) = self.cluster.as_deref_mut() {
            side.out.push(EngineCmd::LoadMarkers { room: room.clone() });
        }
    }

    /// Remembers `reply` for an engine read; its ticket.
    fn wait_for_engine(&mut self, reply: ReplyTo) -> Option<u64> {
        let side = self.cluster.as_deref_mut()?;
        let ticket = side.receipts.next_ticket;
        side.receipts.next_ticket += 1;
        side.receipts.api.insert(ticket, reply);
        Some(ticket)
    }

    /// The server API's receipts of `room`, read from the engine.
    pub(in crate::core) fn cluster_read_receipts(&mut self, room: RoomName, reply: ReplyTo) {
        if let Some(ticket) = self.wait_for_engine(reply)
            && let Some(side) = self.cluster.as_deref_mut()
        {
            side.out.push(EngineCmd::ReadReceipts { ticket, room });
        }
    }

    /// The server API's unread counts of `user` in every room of theirs, read from the
    /// engine.
    pub(in crate::core) fn cluster_read_unread(&mut self, user: Text, reply: ReplyTo) {
        let max_rooms = self.config.limits.max_rooms_per_user;
        if let Some(ticket) = self.wait_for_engine(reply)
            && let Some(side) = self.cluster.as_deref_mut()
        {
            side.out.push(EngineCmd::ReadUnread {
                ticket,
                user,
                max_rooms,
            });
        }
    }

    /// What the engine reports about receipts.
    pub(in crate::core) fn on_receipts_event(&mut self, event: EngineEvent) {
        let (ticket, answer) = match event {
            EngineEvent::Markers {
                room,
                epoch,
                markers,
            } => return self.apply_engine_markers(&room, epoch, markers),
            EngineEvent::HandoffOwed { check, owed } => return self.handoffs_owed(&check, owed),
            EngineEvent::ReceiptsRead { ticket, answer } => {
                let answer = match answer {
                    Ok(ReceiptsAnswer::Room(r)) => ControlReply::Receipts(Some(r)),
                    Ok(ReceiptsAnswer::NoRoom) => ControlReply::Receipts(None),
                    Ok(ReceiptsAnswer::Full(members)) => {
                        ControlReply::Refused(ControlRefusal::TooManyMembers {
                            members,
                            max: MAX_RECEIPTS_MEMBERS,
                        })
                    }
                    Err(()) => ControlReply::Refused(ControlRefusal::Unavailable),
                };
                (ticket, answer)
            }
            EngineEvent::UnreadRead { ticket, answer } => {
                let answer = match answer {
                    Ok(rooms) => ControlReply::Unread(rooms),
                    Err(over_cap) => {
                        if let Some(n) = over_cap {
                            tracing::warn!(
                                rooms = n,
                                "a user has more rooms than limits.max_rooms_per_user: unread counts refused"
                            );
                        }
                        ControlReply::Refused(ControlRefusal::Unavailable)
                    }
                };
                (ticket, answer)
            }
            other => return tracing::error!(?other, "not a receipts event"),
        };
        if let Some(reply) = self
            .cluster
            .as_deref_mut()
            .and_then(|side| side.receipts.api.remove(&ticket))
        {
            self.reply(reply, answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rooms_updates_merge_into_one_per_member() {
        let m = |delivered, read| Marker { delivered, read };
        let mut list = vec![
            (UserName::from("bob"), m(5, 0)),
            (UserName::from("ann"), m(3, 1)),
            (UserName::from("bob"), m(2, 2)),
            (UserName::from("ann"), m(4, 0)),
        ];
        one_per_member(&mut list);
        assert_eq!(
            list,
            vec![
                (UserName::from("ann"), m(4, 1)),
                (UserName::from("bob"), m(5, 2))
            ]
        );
    }
}
