//! Server-API operations as the worker that owns a room (or holds a user's connections)
//! executes them: publish, membership changes, room info, history reads, kicks, unread
//! counts and receipts (computed in [`super::receipts`]).
//!
//! Owns: turning a [`ControlOp`] into core actions and a [`ControlReply`]. Must not touch:
//! HTTP (that is `control.rs`), sockets, other workers' state (only messages).

use std::collections::HashSet;

use bytes::Bytes;
use pabal_codec::{GoAway, GoAwayReason, LeftReason, ServerFrame, Text};

use super::Core;
use crate::directory::DirectoryError;
use crate::idempotency::IdempotencyKey;
use crate::ids::RoomName;
use crate::mesh::{ControlOp, ControlRefusal, ControlReply, Published, RoomInfo};
use crate::sender_name::SenderName;
use crate::stats::inc;

impl ControlOp {
    /// Whether the operation changes state (refused while draining); reads are not.
    fn mutates(&self) -> bool {
        match self {
            ControlOp::Publish { .. }
            | ControlOp::PublishMany { .. }
            | ControlOp::Members { .. }
            | ControlOp::Kick { .. }
            | ControlOp::KickEverywhere { .. } => true,
            ControlOp::Info { .. }
            | ControlOp::History { .. }
            | ControlOp::Unread { .. }
            | ControlOp::UnreadEverywhere { .. }
            | ControlOp::Receipts { .. }
            | ControlOp::Lookup(_) => false,
        }
    }
}

impl Core {
    /// Closes this worker's connections of `user` not closing already (GOAWAY kicked);
    /// how many.
    pub(super) fn kick_local(&mut self, user: &str) -> usize {
        let tokens = self.tokens_of(user);
        let mut kicked = 0;
        for token in tokens {
            if self
                .conn(token)
                .is_none_or(|c| c.phase() == crate::conn::Phase::Closing)
            {
                continue;
            }
            self.write(
                token,
                &ServerFrame::GoAway(GoAway {
                    reason: GoAwayReason::Kicked,
                    retry_after_ms: 0,
                    message: Text::from_static("disconnected by the app server"),
                }),
            );
            self.begin_close(token);
            kicked += 1;
        }
        kicked
    }

    /// Publishes as the server API, once per `key`: a key this room recorded within
    /// `control.idempotency_max_age` answers with the first sequence and publishes nothing.
    fn publish_once(
        &mut self,
        room: RoomName,
        sender: SenderName,
        payload: Bytes,
        key: Option<IdempotencyKey>,
    ) -> Result<Published, ControlRefusal> {
        if let Some(seq) = self.repeated_key(&room, key.as_ref()) {
            return Ok(Published::Repeat { seq });
        }
        let seq = self
            .accept_publish(room.clone(), None, sender, payload, None)
            .map_err(|e| {
                tracing::debug!(error = %e, "server-API publish refused by storage");
                super::durable::refusal_of(&e)
            })?;
        if let Some(key) = key {
            self.remember_key(&room, key, seq);
        }
        Ok(Published::New { seq })
    }

    /// The sequence an `Idempotency-Key` got in this room within
    /// `control.idempotency_max_age`, if it was seen.
    pub(super) fn repeated_key(
        &mut self,
        room: &RoomName,
        key: Option<&IdempotencyKey>,
    ) -> Option<u64> {
        let (now, max_age) = (self.now, self.config.control.idempotency_max_age);
        self.owned_room(room)
            .state_if_any()?
            .idempotency
            .as_mut()?
            .get(key?, now, max_age)
    }

    /// Records that `key` published `seq` in the room.
    pub(super) fn remember_key(&mut self, room: &RoomName, key: IdempotencyKey, seq: u64) {
        let (now, max_keys, max_age) = (
            self.now,
            self.config.control.idempotency_keys,
            self.config.control.idempotency_max_age,
        );
        self.owned_room(room)
            .state_mut()
            .idempotency
            .get_or_insert_with(|| Box::new(crate::idempotency::IdempotencyWindow::new()))
            .record(key, seq, now, max_keys, max_age);
    }

    /// Executes a server-API request.
    pub(super) fn control(&mut self, op: ControlOp) -> ControlReply {
        if self.shutdown.draining && op.mutates() {
            // Accepted after the shutdown fences, it would reach nobody before GOAWAY.
            return ControlReply::Refused(ControlRefusal::Draining);
        }
        match op {
            ControlOp::Publish {
                room,
                sender,
                payload,
                ephemeral,
                key,
            } => {
                if ephemeral {
                    self.broadcast_ephemeral(&room, None, sender.into(), payload);
                    return ControlReply::Published(None);
                }
                match self.publish_once(room, sender.into(), payload, key) {
                    Ok(done) => ControlReply::Published(Some(done)),
                    Err(why) => ControlReply::Refused(why),
                }
            }
            ControlOp::PublishMany {
                rooms,
                sender,
                payload,
                key,
            } => {
                let sender = SenderName::from(sender);
                let mut out = Vec::with_capacity(rooms.len());
                for room in rooms {
                    let done =
                        self.publish_once(room.clone(), sender.clone(), payload.clone(), key);
                    out.push((room, done));
                }
                ControlReply::PublishedMany(out)
            }
            ControlOp::Members {
                room,
                add,
                remove,
                set,
            } => {
                let current: HashSet<Text> = self.owned_room(&room).members.to_set();
                let (add, remove): (Vec<Text>, Vec<Text>) = if set {
                    let wanted: HashSet<Text> = add.into_iter().collect();
                    (
                        wanted.difference(&current).cloned().collect(),
                        current.difference(&wanted).cloned().collect(),
                    )
                } else {
                    (add, remove)
                };
                let mut added = Vec::new();
                let mut refused = Vec::new();
                let mut removed = Vec::new();
                for user in remove {
                    if self.leave_member(&room, user.as_str(), false, LeftReason::Removed) {
                        removed.push(user);
                    }
                }
                for user in add {
                    match self.join_member(&room, user.as_str(), false) {
                        Ok(true) => added.push(user),
                        Ok(false) => {}
                        Err(e) => {
                            if !matches!(e, DirectoryError::Blocked(_)) {
                                inc(&self.stats.limit_refusals, 1);
                            }
                            refused.push((user, e.to_string()));
                        }
                    }
                }
                let count = self.owned.get(&room).map_or(0, |o| o.members.len());
                ControlReply::Members {
                    added,
                    removed,
                    refused,
                    count,
                }
            }
            ControlOp::Info { room } => {
                let retention = self.config.retention_for(room.name.as_str());
                let now_ms = self.now_ms();
                ControlReply::Info(self.owned.get_mut(&room).map(|o| {
                    o.evict_expired(now_ms);
                    RoomInfo {
                        members: o.members.len(),
                        head: o.head,
                        epoch: o.epoch,
                        retained_messages: o.history().len(),
                        retained_bytes: o.history().bytes(),
                        first_seq: o.history().first_seq(),
                        retention,
                    }
                }))
            }
            ControlOp::History { room, after, limit } => {
                match self.read_history(&room, after, usize::MAX, limit.max(1)) {
                    Some((msgs, info, epoch, head)) => ControlReply::History {
                        msgs,
                        gap: info.gap,
                        head,
                        epoch,
                    },
                    None => ControlReply::Info(None),
                }
            }
            ControlOp::Kick { user } | ControlOp::KickEverywhere { user } => ControlReply::Kicked {
                connections: self.kick_local(user.as_str()),
            },
            ControlOp::Unread { user, rooms } => {
                ControlReply::Unread(self.unread_of(user.as_str(), rooms))
            }
            ControlOp::UnreadEverywhere { user } => {
                // Alone (never sent so by the server API): the rooms owned here.
                let rooms = self.owned.keys().filter(|r| !r.channel).cloned().collect();
                ControlReply::Unread(self.unread_of(user.as_str(), rooms))
            }
            ControlOp::Receipts { room } => ControlReply::Receipts(self.receipts_of(&room)),
            // Only a cluster node has an engine to read (`core/cluster/members.rs` takes it
            // there); the server API asks one only then.
            ControlOp::Lookup(_) => ControlReply::Refused(ControlRefusal::Unavailable),
        }
    }
}
