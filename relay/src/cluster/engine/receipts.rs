//! The engine thread's side of receipts ([`crate::cluster::receipts`]): markers batches,
//! hand-off decisions, the server API's reads of markers and unread counts, and what waits
//! for the engine while it is down.
//!
//! While a room's shard has no command connection, a markers batch is kept coalesced (the
//! latest marker per member: markers only move forward, so nothing older is needed) and a
//! hand-off decision waits; both are sent when the connection is back. Both are bounded
//! ([`MAX_WAITING_ROOMS`], [`MAX_WAITING_CHECKS`]): past that, an update is dropped and
//! counted (the member's next ACK or READ carries the marker again). Reads for the server
//! API never wait: they fail at once (503 `unavailable`).
//!
//! Owns: the receipts' commands in flight and waiting. Must not touch: rooms' channels,
//! publishes or membership (the rest of the engine thread).

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use pabal_codec::Text;

use super::super::receipts::{self as r, HandoffCheck};
use super::super::resp::{Value, decimal};
use super::super::script;
use super::super::{EngineEvent, Topology};
use super::{Engine, Pending, encode_script};
use crate::core::Marker;
use crate::directory::JoinPoint;
use crate::ids::RoomName;
use crate::mesh::RoomUnread;

/// Rooms whose markers may wait for the engine at once, per engine thread.
const MAX_WAITING_ROOMS: usize = 65_536;
/// Members' markers of one room that may wait for the engine.
const MAX_WAITING_MEMBERS: usize = 100_000;
/// Hand-off decisions that may wait for the engine, per engine thread.
const MAX_WAITING_CHECKS: usize = 65_536;
/// A room's markers are loaded at open for at most this many members (more: learnt as
/// they move).
const MAX_LOADED_MARKERS: usize = 10_000;
/// A room's receipts are read for at most this many members (more: refused).
pub(in crate::cluster) const MAX_RECEIPTS_MEMBERS: usize = 100_000;

/// A receipts command on a command connection awaiting its reply.
pub(in crate::cluster) enum Step {
    /// A markers batch.
    Markers {
        room: RoomName,
        epoch: u64,
        markers: Vec<(Text, Marker)>,
    },
    /// A hand-off decision.
    Handoff(HandoffCheck),
    /// A room's markers for its owner.
    Load { room: RoomName },
    /// A room's receipts for the server API.
    Receipts { ticket: u64 },
    /// A user's rooms, first step of the unread counts.
    UserRooms { ticket: u64, user: Text },
    /// One room of a user's unread counts.
    RoomUnread {
        ticket: u64,
        room: RoomName,
        join: JoinPoint,
    },
}

/// A user's unread counts being gathered, room by room.
struct Gather {
    left: usize,
    rooms: Vec<RoomUnread>,
}

/// The engine thread's receipts state.
pub(in crate::cluster) struct EngineReceipts {
    markers_sha: Bytes,
    handoff_sha: Bytes,
    /// Markers waiting for their shard: room → (epoch, member → latest marker).
    waiting: HashMap<RoomName, (u64, HashMap<Text, Marker>)>,
    /// Hand-off decisions waiting for their shard.
    checks: Vec<HandoffCheck>,
    /// Unread counts being gathered, by ticket.
    gathers: HashMap<u64, Gather>,
}

impl Default for EngineReceipts {
    fn default() -> Self {
        EngineReceipts {
            markers_sha: script::sha1_hex(r::MARKERS),
            handoff_sha: script::sha1_hex(r::HANDOFF),
            waiting: HashMap::new(),
            checks: Vec::new(),
            gathers: HashMap::new(),
        }
    }
}

/// A room's key `suffix`.
fn room_key(room: &RoomName, suffix: &str) -> Vec<u8> {
    let mut k = Vec::new();
    script::key(&mut k, room, suffix);
    k
}

impl Engine {
    /// Sends a markers batch (`eval` after a NOSCRIPT; `target`: a shard an `ASK` named);
    /// keeps it while the shard is down.
    pub(super) fn send_markers(
        &mut self,
        room: RoomName,
        epoch: u64,
        markers: Vec<(Text, Marker)>,
        (eval, target, hops): (bool, Option<usize>, u8),
    ) {
        if markers.is_empty() {
            return;
        }
        let meta = room_key(&room, "m");
        let shard = target.or_else(|| self.route(&meta));
        let verb: &[u8] = match self.topology {
            Topology::Single | Topology::Sentinel => b"PUBLISH",
            Topology::Cluster => b"SPUBLISH",
        };
        let sha = self.receipts.markers_sha.clone();
        let Some(conn) = self.cmd_conn(shard) else {
            return self.keep_markers(room, epoch, markers);
        };
        let (members, keys, channel) = (
            room_key(&room, "u"),
            room_key(&room, "k"),
            room_key(&room, "c"),
        );
        let mut d = [0; 20];
        let mut nums: Vec<[[u8; 20]; 2]> = vec![[[0; 20]; 2]; markers.len()];
        let mut args: Vec<&[u8]> = Vec::with_capacity(3 + 3 * markers.len());
        args.push(decimal(epoch, &mut d));
        args.push(&channel);
        args.push(verb);
        for ((user, m), digits) in markers.iter().zip(nums.iter_mut()) {
            let [dd, rd] = digits;
            args.push(user.as_bytes());
            args.push(decimal(m.delivered, dd));
            args.push(decimal(m.read, rd));
        }
        encode_script(
            &mut conn.wbuf,
            (r::MARKERS, &sha, eval),
            &[&meta, &members, &keys],
            &args,
        );
        self.stats.marker_batches.fetch_add(1, Ordering::Relaxed);
        self.push_receipts_pending(
            shard,
            Step::Markers {
                room,
                epoch,
                markers,
            },
            hops,
        );
    }

    /// Keeps a batch that could not be sent: merged into what waits for the room (the
    /// latest marker per member), bounded.
    fn keep_markers(&mut self, room: RoomName, epoch: u64, markers: Vec<(Text, Marker)>) {
        let waiting = &mut self.receipts.waiting;
        if !waiting.contains_key(&room) && waiting.len() >= MAX_WAITING_ROOMS {
            self.stats
                .markers_dropped
                .fetch_add(markers.len() as u64, Ordering::Relaxed);
            return;
        }
        if !waiting.contains_key(&room) {
            self.stats.markers_waiting.fetch_add(1, Ordering::Relaxed);
        }
        let (e, by_member) = waiting.entry(room).or_default();
        if epoch != *e {
            if epoch < *e {
                return; // an older stream's markers
            }
            *e = epoch;
            by_member.clear();
        }
        for (user, m) in markers {
            let full = by_member.len() >= MAX_WAITING_MEMBERS;
            match by_member.get_mut(&user) {
                Some(cur) => {
                    cur.delivered = cur.delivered.max(m.delivered);
                    cur.read = cur.read.max(m.read);
                }
                None if full => {
                    self.stats.markers_dropped.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    by_member.insert(user, m);
                }
            }
        }
    }

    /// Sends a hand-off decision; it waits while the room's shard is down.
    pub(super) fn send_handoff(
        &mut self,
        check: HandoffCheck,
        (eval, target, hops): (bool, Option<usize>, u8),
    ) {
        let meta = room_key(&check.room, "m");
        let shard = target.or_else(|| self.route(&meta));
        let sha = self.receipts.handoff_sha.clone();
        let Some(conn) = self.cmd_conn(shard) else {
            if self.receipts.checks.len() < MAX_WAITING_CHECKS {
                self.receipts.checks.push(check);
            } else {
                tracing::warn!(worker = self.worker, room = %check.room.name, "a hand-off decision was dropped: too many wait for the engine");
            }
            return;
        };
        let (members, keys, handed) = (
            room_key(&check.room, "u"),
            room_key(&check.room, "k"),
            room_key(&check.room, "h"),
        );
        let (mut d1, mut d2, mut d3) = ([0; 20], [0; 20], [0; 20]);
        let other = check.other.as_ref().map_or(0, |o| o.seq);
        encode_script(
            &mut conn.wbuf,
            (r::HANDOFF, &sha, eval),
            &[&meta, &members, &keys, &handed],
            &[
                decimal(check.epoch, &mut d1),
                decimal(check.last.seq, &mut d2),
                check.last.publisher.as_bytes(),
                decimal(other, &mut d3),
            ],
        );
        self.push_receipts_pending(shard, Step::Handoff(check), hops);
    }

    /// Reads a room's markers for its owner (nothing while the engine is down: the room's
    /// next open or resubscription reads them).
    pub(super) fn send_load_markers(&mut self, room: RoomName) {
        let meta = room_key(&room, "m");
        let shard = self.route(&meta);
        let Some(conn) = self.cmd_conn(shard) else {
            return;
        };
        let mut d = [0; 20];
        encode_script(
            &mut conn.wbuf,
            (r::LOAD_MARKERS, &Bytes::new(), true),
            &[&meta, &room_key(&room, "k")],
            &[decimal(MAX_LOADED_MARKERS as u64, &mut d)],
        );
        self.push_receipts_pending(shard, Step::Load { room }, 0);
    }

    /// The server API's read of a room's markers (fails at once while the engine is down).
    pub(super) fn send_read_receipts(&mut self, ticket: u64, room: &RoomName) {
        let meta = room_key(room, "m");
        let shard = self.route(&meta);
        let Some(conn) = self.cmd_conn(shard) else {
            return self.out.push(EngineEvent::ReceiptsRead {
                ticket,
                answer: Err(()),
            });
        };
        let mut d = [0; 20];
        encode_script(
            &mut conn.wbuf,
            (r::READ_RECEIPTS, &Bytes::new(), true),
            &[&meta, &room_key(room, "u"), &room_key(room, "k")],
            &[decimal(MAX_RECEIPTS_MEMBERS as u64, &mut d)],
        );
        self.push_receipts_pending(shard, Step::Receipts { ticket }, 0);
    }

    /// The server API's unread counts of `user`: the user's rooms, then each room's head
    /// and marker on its own shard.
    pub(super) fn send_read_unread(&mut self, ticket: u64, user: &Text, max_rooms: usize) {
        let rooms = super::super::membership::user_key(user, "r");
        let shard = self.route(&rooms);
        let Some(conn) = self.cmd_conn(shard) else {
            return self.out.push(EngineEvent::UnreadRead {
                ticket,
                answer: Err(None),
            });
        };
        let mut d = [0; 20];
        encode_script(
            &mut conn.wbuf,
            (r::USER_ROOMS, &Bytes::new(), true),
            &[&rooms],
            &[decimal(max_rooms as u64, &mut d)],
        );
        let user = user.clone();
        self.push_receipts_pending(shard, Step::UserRooms { ticket, user }, 0);
    }

    /// Shard `shard`'s command connection, if it is up.
    fn cmd_conn(&mut self, shard: Option<usize>) -> Option<&mut super::Conn> {
        shard
            .and_then(|i| self.shards.get_mut(i))
            .and_then(|s| s.cmd.as_mut())
    }

    fn push_receipts_pending(&mut self, shard: Option<usize>, step: Step, hops: u8) {
        self.stats.pipeline_depth.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = shard.and_then(|i| self.shards.get_mut(i)) {
            s.inflight.push_back((Pending::Receipts(step), hops));
        }
    }

    /// A command connection came up: what waited for the engine is sent (what still has
    /// no connection waits again).
    pub(super) fn send_receipts_waiting(&mut self) {
        let waiting = std::mem::take(&mut self.receipts.waiting);
        self.stats
            .markers_waiting
            .fetch_sub(waiting.len() as i64, Ordering::Relaxed);
        for (room, (epoch, by_member)) in waiting {
            self.send_markers(
                room,
                epoch,
                by_member.into_iter().collect(),
                (false, None, 0),
            );
        }
        for check in std::mem::take(&mut self.receipts.checks) {
            self.send_handoff(check, (false, None, 0));
        }
    }

    /// A receipts command that will get no reply (its connection failed): markers and
    /// hand-off decisions wait for the next connection; reads fail.
    pub(super) fn receipts_give_up(&mut self, step: Step) {
        match step {
            Step::Markers {
                room,
                epoch,
                markers,
            } => self.keep_markers(room, epoch, markers),
            Step::Handoff(check) => {
                if self.receipts.checks.len() < MAX_WAITING_CHECKS {
                    self.receipts.checks.push(check);
                }
            }
            Step::Receipts { ticket } => self.out.push(EngineEvent::ReceiptsRead {
                ticket,
                answer: Err(()),
            }),
            Step::Load { .. } => {}
            Step::UserRooms { ticket, .. } => self.fail_gather(ticket, false),
            Step::RoomUnread { ticket, .. } => self.fail_gather(ticket, true),
        }
    }

    /// Sends a redirected (or NOSCRIPT-answered) receipts command again.
    pub(super) fn receipts_resend(
        &mut self,
        step: Step,
        eval: bool,
        target: Option<usize>,
        hops: u8,
    ) {
        match step {
            Step::Markers {
                room,
                epoch,
                markers,
            } => self.send_markers(room, epoch, markers, (eval, target, hops)),
            Step::Handoff(check) => self.send_handoff(check, (eval, target, hops)),
            // Reads are not re-routed: the API call fails, and its retry routes again.
            other => self.receipts_give_up(other),
        }
    }

    /// The unread counts `ticket` failed (`started`: a room's step, after the gather began;
    /// answered once, at the first failure).
    fn fail_gather(&mut self, ticket: u64, started: bool) {
        if self.receipts.gathers.remove(&ticket).is_none() && started {
            return; // answered already
        }
        self.out.push(EngineEvent::UnreadRead {
            ticket,
            answer: Err(None),
        });
    }

    /// A receipts command's reply.
    pub(super) fn on_receipts_reply(&mut self, i: usize, step: Step, hops: u8, reply: Value) {
        if let Value::Error(e) = &reply {
            if e.starts_with(b"NOSCRIPT") {
                return self.receipts_resend(step, true, Some(i), hops);
            }
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(worker = self.worker, error = %String::from_utf8_lossy(e), "the engine refused a receipts command");
            return match step {
                // Refused, not lost: a marker is sent again with the member's next ACK or
                // READ; a refused hand-off decision is not retried.
                Step::Markers { .. } | Step::Handoff(_) | Step::Load { .. } => {}
                other => self.receipts_give_up(other),
            };
        }
        match step {
            Step::Markers { .. } => {}
            Step::Handoff(check) => match r::parse_owed(&reply) {
                Some(owed) => self.out.push(EngineEvent::HandoffOwed { check, owed }),
                None => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(worker = self.worker, reply = ?reply, "a malformed answer to a hand-off decision");
                }
            },
            Step::Load { room } => {
                if let Some((epoch, markers)) = r::parse_loaded_markers(&reply) {
                    self.out.push(EngineEvent::Markers {
                        room,
                        epoch,
                        markers,
                    });
                }
            }
            Step::Receipts { ticket } => {
                let answer = r::parse_receipts(&reply).ok_or(());
                self.out.push(EngineEvent::ReceiptsRead { ticket, answer });
            }
            Step::UserRooms { ticket, user } => self.on_user_rooms(ticket, &user, &reply),
            Step::RoomUnread { ticket, room, join } => {
                let Some(parsed) = r::parse_room_unread(&reply, room, join) else {
                    return self.fail_gather(ticket, true);
                };
                let Some(g) = self.receipts.gathers.get_mut(&ticket) else {
                    return; // failed already
                };
                g.rooms.extend(parsed);
                g.left -= 1;
                if g.left == 0
                    && let Some(g) = self.receipts.gathers.remove(&ticket)
                {
                    self.out.push(EngineEvent::UnreadRead {
                        ticket,
                        answer: Ok(g.rooms),
                    });
                }
            }
        }
    }

    /// The user's rooms were read: each room (not channels) is read on its shard.
    fn on_user_rooms(&mut self, ticket: u64, user: &Text, reply: &Value) {
        let a = reply.array().unwrap_or_default();
        let pairs = match a.first().and_then(Value::bytes).map(|b| &b[..]) {
            Some(b"full") => {
                let n = a.get(1).and_then(Value::int).unwrap_or(0) as u64;
                return self.out.push(EngineEvent::UnreadRead {
                    ticket,
                    answer: Err(Some(n)),
                });
            }
            Some(b"ok") => a.get(1).and_then(Value::array).unwrap_or_default(),
            _ => return self.fail_gather(ticket, false),
        };
        let rooms: Vec<(RoomName, JoinPoint)> = pairs
            .chunks_exact(2)
            .filter_map(|p| {
                let room = super::super::membership::parse_field(p[0].bytes()?)?;
                let join = super::super::membership::parse_join_point(p[1].bytes()?)?;
                (!room.channel).then_some((room, join))
            })
            .collect();
        if rooms.is_empty() {
            return self.out.push(EngineEvent::UnreadRead {
                ticket,
                answer: Ok(Vec::new()),
            });
        }
        self.receipts.gathers.insert(
            ticket,
            Gather {
                left: rooms.len(),
                rooms: Vec::with_capacity(rooms.len()),
            },
        );
        for (room, join) in rooms {
            let meta = room_key(&room, "m");
            let shard = self.route(&meta);
            let Some(conn) = self.cmd_conn(shard) else {
                return self.fail_gather(ticket, true);
            };
            encode_script(
                &mut conn.wbuf,
                (r::ROOM_UNREAD, &Bytes::new(), true),
                &[&meta, &room_key(&room, "k")],
                &[user.as_bytes()],
            );
            self.push_receipts_pending(shard, Step::RoomUnread { ticket, room, join }, 0);
        }
    }
}
