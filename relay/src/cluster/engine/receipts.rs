//! The engine's side of receipts ([`crate::cluster::receipts`]): markers batches,
//! hand-off decisions, the server API's reads of markers and unread counts, and what waits
//! for the engine while it is down.
//!
//! While a room's shard has no command connection, a markers batch is kept coalesced (the
//! latest marker per member: markers only move forward, so nothing older is needed) and a
//! hand-off decision waits; both are sent when the connection is back. Both are bounded
//! ([`MAX_WAITING_MARKERS`] members' markers in all rooms, [`MAX_WAITING_CHECKS`]): past that, an update is dropped and
//! counted (the member's next ACK or READ carries the marker again). What Redis answers
//! `LOADING` (it restarted and is reading its data), `BUSY` or `TRYAGAIN` waits the same
//! way and goes again after a backoff (50 ms doubling to 1 s). Reads for the server API
//! never wait: they fail at once (503 `unavailable`).
//!
//! Owns: the receipts' commands in flight and waiting. Must not touch: rooms' channels,
//! publishes or membership (the rest of the engine).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pabal_codec::Text;

use super::super::receipts::{self as r, HANDOFF_PAGE, HandoffCheck, MAX_RECEIPTS_MEMBERS};
use super::super::resp::{self, Value, decimal};
use super::super::script::{self, Script};
use super::super::{EngineErrorKind, EngineEvent, Topology};
use super::{Engine, Pending, encode_script};
use crate::core::Marker;
use crate::directory::JoinPoint;
use crate::ids::{RoomName, UserName};
use crate::mesh::RoomUnread;

/// Members' markers that may wait for the engine at once, all rooms, per engine
/// (about 100 bytes each).
const MAX_WAITING_MARKERS: usize = 262_144;
/// Members' markers in one `MARKERS` call (a larger batch, such as what waited while the
/// engine was down, goes as several): bounds one script's run on Redis and the markers
/// message every node of the room parses.
const MAX_MARKERS_PER_CALL: usize = 1_024;
/// Hand-off decisions that may wait for the engine, per engine.
const MAX_WAITING_CHECKS: usize = 65_536;
/// A room's markers are loaded at open for at most this many members (more: learnt as
/// they move).
const MAX_LOADED_MARKERS: usize = 10_000;
/// The first wait before what Redis answered `LOADING` (or `BUSY`, `TRYAGAIN`) is sent
/// again (doubling up to [`RETRY_MAX`]).
const RETRY_MIN: Duration = Duration::from_millis(50);
/// The longest wait between two sends of what waits for a Redis still loading.
const RETRY_MAX: Duration = Duration::from_secs(1);

/// An error Redis answers for a while and then not (loading its data at start, a script
/// over its time limit, a slot mid-migration): what it refused waits and goes again.
pub(super) fn transient(error: &[u8]) -> bool {
    [&b"LOADING"[..], b"BUSY", b"TRYAGAIN"]
        .iter()
        .any(|kind| error.starts_with(kind))
}

/// A receipts command on a command connection awaiting its reply.
pub(in crate::cluster) enum Step {
    /// A markers batch.
    Markers {
        room: RoomName,
        epoch: u64,
        markers: Vec<(UserName, Marker)>,
    },
    /// A hand-off decision.
    Handoff(HandoffCheck),
    /// A room's markers for its owner.
    Load { room: RoomName },
    /// A room's receipts for the server API.
    Receipts { ticket: u64, room: RoomName },
    /// A user's rooms, first step of the unread counts.
    UserRooms {
        ticket: u64,
        user: Text,
        max_rooms: usize,
    },
    /// One room of a user's unread counts.
    RoomUnread {
        ticket: u64,
        room: RoomName,
        join: JoinPoint,
        user: Text,
    },
}

/// A user's unread counts being gathered, room by room.
struct Gather {
    left: usize,
    rooms: Vec<RoomUnread>,
}

/// The engine's receipts state.
#[derive(Default)]
pub(in crate::cluster) struct EngineReceipts {
    /// Markers waiting for their shard.
    waiting: WaitingMarkers,
    /// Hand-off decisions waiting for their shard.
    checks: Vec<HandoffCheck>,
    /// Unread counts being gathered, by ticket.
    gathers: HashMap<u64, Gather>,
    /// When what waits is sent again although its connection is up (Redis answered it
    /// `LOADING`); `None`: not due.
    retry_at: Option<Instant>,
    /// The wait before the next such retry (0: [`RETRY_MIN`]).
    backoff: Duration,
}

/// Markers waiting for their shard, coalesced (the latest per member: markers only move
/// forward), at most [`MAX_WAITING_MARKERS`] in all.
#[derive(Default)]
struct WaitingMarkers {
    /// Room → (epoch, member → latest marker).
    rooms: HashMap<RoomName, (u64, HashMap<UserName, Marker>)>,
    /// Members' markers held, all rooms.
    held: usize,
}

impl WaitingMarkers {
    /// Merges a batch into what waits; `(whether the room started waiting, how many
    /// updates were dropped)`.
    fn keep(
        &mut self,
        room: RoomName,
        epoch: u64,
        markers: Vec<(UserName, Marker)>,
    ) -> (bool, u64) {
        let new_room = !self.rooms.contains_key(&room);
        if new_room && self.held >= MAX_WAITING_MARKERS {
            return (false, markers.len() as u64);
        }
        let (e, by_member) = self.rooms.entry(room).or_default();
        if epoch != *e {
            if epoch < *e {
                return (new_room, 0); // an older stream's markers
            }
            *e = epoch;
            self.held -= by_member.len();
            by_member.clear();
        }
        let mut dropped = 0;
        for (user, m) in markers {
            match by_member.get_mut(&user) {
                Some(cur) => {
                    cur.delivered = cur.delivered.max(m.delivered);
                    cur.read = cur.read.max(m.read);
                }
                None if self.held >= MAX_WAITING_MARKERS => dropped += 1,
                None => {
                    by_member.insert(user, m);
                    self.held += 1;
                }
            }
        }
        (new_room, dropped)
    }

    /// Everything that waits, by room (nothing waits after).
    fn take(&mut self) -> HashMap<RoomName, (u64, HashMap<UserName, Marker>)> {
        self.held = 0;
        std::mem::take(&mut self.rooms)
    }
}

/// Appends one [`r::MARKERS`] call (`EVAL` with the script after a NOSCRIPT, else
/// `EVALSHA`): `keys`, then `head` (epoch, channel, publish verb), then `user, delivered,
/// read` per member, written straight into `out` (a batch has any number of members).
fn encode_markers(
    out: &mut BytesMut,
    eval: bool,
    keys: [&[u8]; 4],
    head: [&[u8]; 3],
    markers: &[(UserName, Marker)],
) {
    let call: [&[u8]; 3] = if eval {
        [b"EVAL", r::MARKERS.text.as_bytes(), b"4"]
    } else {
        [b"EVALSHA", r::MARKERS.sha(), b"4"]
    };
    resp::push_array_len(
        out,
        call.len() + keys.len() + head.len() + 3 * markers.len(),
    );
    for arg in call.iter().chain(&keys).chain(&head) {
        resp::push_bulk(out, arg);
    }
    let mut d = [0; 20];
    for (user, m) in markers {
        resp::push_bulk(out, user.as_bytes());
        resp::push_bulk(out, decimal(m.delivered, &mut d));
        resp::push_bulk(out, decimal(m.read, &mut d));
    }
}

/// A room's key `suffix`.
fn room_key(room: &RoomName, suffix: &str) -> Vec<u8> {
    let mut k = Vec::new();
    script::key(&mut k, room, suffix);
    k
}

impl Engine {
    /// Sends a markers batch (`eval` after a NOSCRIPT; `target`: a shard an `ASK` named),
    /// as several calls of at most [`MAX_MARKERS_PER_CALL`] members; keeps it while the
    /// shard is down.
    pub(super) fn send_markers(
        &mut self,
        room: RoomName,
        epoch: u64,
        mut markers: Vec<(UserName, Marker)>,
        (eval, target, hops): (bool, Option<usize>, u8),
    ) {
        while markers.len() > MAX_MARKERS_PER_CALL {
            let rest = markers.split_off(MAX_MARKERS_PER_CALL);
            self.send_markers(room.clone(), epoch, markers, (eval, target, hops));
            markers = rest;
        }
        if markers.is_empty() {
            return;
        }
        let verb: &[u8] = match self.topology {
            Topology::Single | Topology::Sentinel => b"PUBLISH",
            Topology::Cluster => b"SPUBLISH",
        };
        // Key names in the engine's scratch (no allocation per room per tick).
        let [meta, members, keys, channel, index, _] = &mut self.keys;
        script::key(meta, &room, "m");
        let shard = target.or_else(|| self.map.as_ref().map(|m| m.shard_of_key(meta)));
        let Some(conn) = shard
            .and_then(|i| self.shards.get_mut(i))
            .and_then(|s| s.cmd.as_mut())
        else {
            return self.keep_markers(room, epoch, markers);
        };
        script::key(members, &room, "u");
        script::key(keys, &room, "k");
        script::key(index, &room, "d");
        script::key(channel, &room, "c");
        let mut d = [0; 20];
        encode_markers(
            &mut conn.wbuf,
            eval,
            [meta, members, keys, index],
            [decimal(epoch, &mut d), channel, verb],
            &markers,
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

    /// Keeps a batch that could not be sent: merged into what waits (the latest marker per
    /// member), bounded ([`MAX_WAITING_MARKERS`]).
    fn keep_markers(&mut self, room: RoomName, epoch: u64, markers: Vec<(UserName, Marker)>) {
        let (new_room, dropped) = self.receipts.waiting.keep(room, epoch, markers);
        if new_room {
            self.stats.markers_waiting.fetch_add(1, Ordering::Relaxed);
        }
        if dropped > 0 {
            self.stats
                .markers_dropped
                .fetch_add(dropped, Ordering::Relaxed);
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
        let Some(conn) = self.cmd_conn(shard) else {
            if self.receipts.checks.len() < MAX_WAITING_CHECKS {
                self.receipts.checks.push(check);
            } else {
                tracing::warn!(worker = self.worker, room = %check.room.name, "a hand-off decision was dropped: too many wait for the engine");
            }
            return;
        };
        let (members, keys, handed, index) = (
            room_key(&check.room, "u"),
            room_key(&check.room, "k"),
            room_key(&check.room, "h"),
            room_key(&check.room, "d"),
        );
        let (mut d1, mut d2, mut d3, mut d4) = ([0; 20], [0; 20], [0; 20], [0; 20]);
        let other = check.other.as_ref().map_or(0, |o| o.seq);
        encode_script(
            &mut conn.wbuf,
            (r::HANDOFF.text, r::HANDOFF.sha(), eval),
            &[&meta, &members, &keys, &handed, &index],
            &[
                decimal(check.epoch, &mut d1),
                decimal(check.last.seq, &mut d2),
                check.last.publisher.as_bytes(),
                decimal(other, &mut d3),
                decimal(HANDOFF_PAGE as u64, &mut d4),
            ],
        );
        self.push_receipts_pending(shard, Step::Handoff(check), hops);
    }

    /// Reads a room's markers for its owner (nothing while the engine is down: the room's
    /// next open or resubscription reads them).
    pub(super) fn send_load_markers(&mut self, room: RoomName) {
        self.send_read(Step::Load { room }, (false, None, 0));
    }

    /// The server API's read of a room's markers (fails at once while the engine is down).
    pub(super) fn send_read_receipts(&mut self, ticket: u64, room: &RoomName) {
        let room = room.clone();
        self.send_read(Step::Receipts { ticket, room }, (false, None, 0));
    }

    /// The server API's unread counts of `user`: the user's rooms, then each room's head
    /// and marker on its own shard.
    pub(super) fn send_read_unread(&mut self, ticket: u64, user: &Text, max_rooms: usize) {
        let user = user.clone();
        let step = Step::UserRooms {
            ticket,
            user,
            max_rooms,
        };
        self.send_read(step, (false, None, 0));
    }

    /// Sends one of the reads (`eval`: with the script's text, after a NOSCRIPT; `target`:
    /// a shard an `ASK` named); while its shard is down it fails at once
    /// ([`Engine::receipts_give_up`]).
    fn send_read(&mut self, step: Step, (eval, target, hops): (bool, Option<usize>, u8)) {
        let mut d = [0; 20];
        let (script, keys, arg): (&Script, Vec<Vec<u8>>, &[u8]) = match &step {
            Step::Load { room } => (
                &r::LOAD_MARKERS,
                vec![room_key(room, "m"), room_key(room, "k")],
                decimal(MAX_LOADED_MARKERS as u64, &mut d),
            ),
            Step::Receipts { room, .. } => (
                &r::READ_RECEIPTS,
                vec![
                    room_key(room, "m"),
                    room_key(room, "u"),
                    room_key(room, "k"),
                ],
                decimal(MAX_RECEIPTS_MEMBERS as u64, &mut d),
            ),
            Step::UserRooms {
                user, max_rooms, ..
            } => (
                &r::USER_ROOMS,
                vec![super::super::membership::user_key(user, "r")],
                decimal(*max_rooms as u64, &mut d),
            ),
            Step::RoomUnread { room, user, .. } => (
                &r::ROOM_UNREAD,
                vec![room_key(room, "m"), room_key(room, "k")],
                user.as_bytes(),
            ),
            Step::Markers { .. } | Step::Handoff(_) => {
                return self.receipts_resend(step, eval, target, hops);
            }
        };
        let shard = target.or_else(|| keys.first().and_then(|k| self.route(k)));
        let Some(conn) = self.cmd_conn(shard) else {
            return self.receipts_give_up(step);
        };
        let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        encode_script(
            &mut conn.wbuf,
            (script.text, script.sha(), eval),
            &keys,
            &[arg],
        );
        self.push_receipts_pending(shard, step, hops);
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

    /// Has what waits sent again after a backoff (doubling from [`RETRY_MIN`] to
    /// [`RETRY_MAX`], reset by a markers call Redis ran).
    fn retry_waiting_later(&mut self) {
        if self.receipts.retry_at.is_none() {
            let wait = self.receipts.backoff.max(RETRY_MIN);
            self.receipts.retry_at = Some(self.woke + wait);
            self.receipts.backoff = (wait * 2).min(RETRY_MAX);
        }
    }

    /// Sends what waits if its retry is due (`now`); when it is due next.
    pub(super) fn receipts_timer(&mut self, now: Instant) -> Option<Instant> {
        if self.receipts.retry_at.is_some_and(|at| at <= now) {
            self.receipts.retry_at = None;
            self.send_receipts_waiting();
        }
        self.receipts.retry_at
    }

    /// A command connection came up: what waited for the engine is sent (what still has
    /// no connection waits again).
    pub(super) fn send_receipts_waiting(&mut self) {
        let waiting = self.receipts.waiting.take();
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
            Step::Receipts { ticket, .. } => self.out.push(EngineEvent::ReceiptsRead {
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
            read => self.send_read(read, (eval, target, hops)),
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
            if transient(e) && matches!(step, Step::Markers { .. } | Step::Handoff(_)) {
                // Not refused for what it is (Redis is loading its data, say): it waits,
                // coalesced and bounded as while the connection is down, and goes again.
                self.receipts_give_up(step);
                return self.retry_waiting_later();
            }
            self.stats.count_error(EngineErrorKind::ErrorReply);
            tracing::warn!(worker = self.worker, error = %String::from_utf8_lossy(e), "the engine refused a receipts command");
            return match step {
                // Refused, not lost: a marker is sent again with the member's next ACK or
                // READ; a refused hand-off decision is not retried.
                Step::Markers { .. } | Step::Handoff(_) | Step::Load { .. } => {}
                other => self.receipts_give_up(other),
            };
        }
        match step {
            Step::Markers { .. } => self.receipts.backoff = Duration::ZERO,
            Step::Handoff(check) => match r::parse_handoff(&reply) {
                Some(page) => {
                    if page.more {
                        // Those this page moved are no longer behind: the next call reads
                        // the next page.
                        self.send_handoff(check.clone(), (false, None, 0));
                    }
                    let owed = page.owed;
                    self.out.push(EngineEvent::HandoffOwed { check, owed });
                }
                None => {
                    self.stats.count_error(EngineErrorKind::Protocol);
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
            Step::Receipts { ticket, .. } => {
                let answer = r::parse_receipts(&reply).ok_or(());
                self.out.push(EngineEvent::ReceiptsRead { ticket, answer });
            }
            Step::UserRooms { ticket, user, .. } => self.on_user_rooms(ticket, &user, &reply),
            Step::RoomUnread {
                ticket, room, join, ..
            } => {
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
            let user = user.clone();
            let step = Step::RoomUnread {
                ticket,
                room,
                join,
                user,
            };
            self.send_read(step, (false, None, 0));
            if !self.receipts.gathers.contains_key(&ticket) {
                return; // failed (a shard is down), answered once
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests
mod tests {
    use super::*;

    fn member(i: usize) -> (UserName, Marker) {
        let m = Marker {
            delivered: i as u64 + 1,
            read: i as u64,
        };
        (UserName::from(format!("user{i}").as_str()), m)
    }

    #[test]
    fn a_markers_call_of_any_number_of_members_is_one_command() {
        // Four members or more overflowed the fixed argument list of `encode_script`
        // (a panic in the engine): a room's tick, or what waited while Redis was down.
        let markers: Vec<_> = (0..MAX_MARKERS_PER_CALL).map(member).collect();
        let mut out = BytesMut::new();
        encode_markers(
            &mut out,
            false,
            [
                b"pabal:{r:x}:m",
                b"pabal:{r:x}:u",
                b"pabal:{r:x}:k",
                b"pabal:{r:x}:d",
            ],
            [b"7", b"pabal:{r:x}:c", b"PUBLISH"],
            &markers,
        );
        let Some(Value::Array(Some(args))) = resp::decode(&mut out).unwrap() else {
            panic!("not one command");
        };
        assert!(out.is_empty(), "one command, nothing after it");
        assert_eq!(args.len(), 10 + 3 * markers.len());
        let text = |v: &Value| String::from_utf8(v.bytes().unwrap().to_vec()).unwrap();
        assert_eq!(text(&args[0]), "EVALSHA");
        assert_eq!(text(&args[1]), r::MARKERS.sha().escape_ascii().to_string());
        assert_eq!(text(&args[2]), "4");
        assert_eq!(text(&args[7]), "7");
        let last = &args[args.len() - 3..];
        assert_eq!(
            last.iter().map(text).collect::<Vec<_>>(),
            [
                format!("user{}", MAX_MARKERS_PER_CALL - 1),
                MAX_MARKERS_PER_CALL.to_string(),
                (MAX_MARKERS_PER_CALL - 1).to_string()
            ]
        );
    }

    #[test]
    fn markers_waiting_for_the_engine_are_bounded_in_all_rooms_together() {
        // Many rooms of a few members each, more than the bound in all.
        let (rooms, per_room) = (30_000, 10);
        let mut waiting = WaitingMarkers::default();
        let (mut started, mut dropped) = (0, 0);
        for r in 0..rooms {
            let room = RoomName::new(false, Text::from(format!("room{r}").as_str()));
            let (new_room, d) = waiting.keep(room, 7, (0..per_room).map(member).collect());
            started += usize::from(new_room);
            dropped += d;
        }
        let held: usize = waiting.rooms.values().map(|(_, m)| m.len()).sum();
        assert_eq!(held, MAX_WAITING_MARKERS);
        assert_eq!(waiting.held, MAX_WAITING_MARKERS);
        assert_eq!(dropped as usize, rooms * per_room - MAX_WAITING_MARKERS);
        assert_eq!(started, waiting.rooms.len());
        // A room's later stream replaces its earlier one's markers, and frees their room.
        let first = RoomName::new(false, Text::from("room0"));
        let (new_room, d) = waiting.keep(first.clone(), 8, vec![member(0)]);
        assert_eq!((new_room, d), (false, 0));
        assert_eq!(waiting.held, MAX_WAITING_MARKERS - per_room + 1);
        // An update of a member already waiting is merged, never dropped.
        let (_, d) = waiting.keep(first, 8, vec![member(0)]);
        assert_eq!(d, 0);
        assert_eq!(waiting.take().len(), started);
        assert_eq!(waiting.held, 0);
    }
}
