//! The engine thread's side of membership ([`crate::cluster::membership`]): the two-step
//! membership changes, users' notice channels and the loads of a user's rooms.
//!
//! Owns: the users' channels' subscriptions and the membership commands in flight. Must
//! not touch: rooms' channels or publishes (the rest of the engine thread).

use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use pabal_codec::Text;

use super::super::RedisAddr;
use super::super::membership as m;
use super::super::resp::{self, Value, decimal};
use super::super::slots::SlotMap;
use super::super::{EngineCmd, EngineEvent, MemberChange, MemberOutcome, MemberRequest};
use super::{Engine, Pending, SubState, encode_script};

/// A user's notice channel on this engine thread.
pub(super) struct UserWatch {
    user: Text,
    pub(super) state: SubState,
    /// The shard it is (to be) subscribed on (its key's); `None` before the map is known.
    pub(super) shard: Option<usize>,
    max_rooms: usize,
    max_blocks: usize,
}

/// A membership command on the command connection awaiting its reply.
pub(in crate::cluster) enum Step {
    /// The room's script of a change ran (or failed).
    Room(MemberRequest),
    /// The user's script of a join, after the room's gave `join` (`room_new`: new there).
    UserJoin {
        req: MemberRequest,
        join: Bytes,
        room_new: bool,
    },
    /// The user's script of a leave, after the room's removed `was` (empty: nothing).
    UserLeave { req: MemberRequest, was: bool },
    /// The undo of a refused join's room side.
    Undo,
    /// The read of a user's rooms and blocks.
    Load { user: Text },
    /// A kick notice.
    Kick { ticket: u64 },
    /// The read of a room's members.
    ReadMembers { ticket: u64 },
}

/// `EVAL <script> <keys> <args>`: membership changes are rare, so the script's text is
/// sent each time (Redis caches it compiled by its SHA).
fn eval(out: &mut BytesMut, script: &str, keys: &[&[u8]], args: &[&[u8]]) {
    encode_script(out, (script, &Bytes::new(), true), keys, args);
}

impl Engine {
    pub(super) fn on_member_cmd(&mut self, cmd: EngineCmd) {
        match cmd {
            EngineCmd::Member(req) => self.send_member_room(req),
            EngineCmd::WatchUser {
                user,
                max_rooms,
                max_blocks,
            } => {
                let ch = m::notice_channel(&user);
                let shard = self.route(&ch);
                let sub_up = self.sub_up(shard);
                let cmd_up = self.cmd_up(shard);
                let w = self.users.entry(ch.clone()).or_insert(UserWatch {
                    user: user.clone(),
                    state: SubState::Idle,
                    shard,
                    max_rooms,
                    max_blocks,
                });
                match w.state {
                    // Already subscribed (a connection raced its unwatch): read again.
                    SubState::Subscribed => self.send_load(&ch),
                    SubState::Subscribing => {}
                    SubState::Idle if sub_up => self.route_users(),
                    // The engine is down: refused now (the phone retries).
                    SubState::Idle if !cmd_up => self.out.push(EngineEvent::UserLoadFailed {
                        user,
                        over_cap: None,
                    }),
                    // Only the pub/sub connection is down (reconnecting): the channel is
                    // subscribed, and the user read, when it is back.
                    SubState::Idle => {}
                }
            }
            EngineCmd::UnwatchUser { user } => {
                let ch = m::notice_channel(&user);
                if let Some(w) = self.users.remove(&ch) {
                    if w.state == SubState::Subscribed {
                        self.stats.users_watched.fetch_sub(1, Ordering::Relaxed);
                    }
                    if w.state != SubState::Idle
                        && let Some(sub) = w
                            .shard
                            .and_then(|i| self.shards.get_mut(i))
                            .and_then(|s| s.sub.as_mut())
                    {
                        resp::encode(&mut sub.wbuf, [&b"UNSUBSCRIBE"[..], &ch[..]].into_iter());
                    }
                }
            }
            EngineCmd::Kick { ticket, user } => {
                let ch = m::notice_channel(&user);
                let Some((i, conn)) = self.cmd_for(&ch) else {
                    return self.out.push(EngineEvent::Kicked { ticket, ok: false });
                };
                resp::encode(
                    &mut conn.wbuf,
                    [&b"PUBLISH"[..], &ch[..], &b"K"[..]].into_iter(),
                );
                self.push_member_pending(i, Step::Kick { ticket });
            }
            EngineCmd::ReadMembers { ticket, room, max } => {
                let mut members = Vec::new();
                super::script::key(&mut members, &room, "u");
                let Some((i, conn)) = self.cmd_for(&members) else {
                    return self.out.push(EngineEvent::MembersRead {
                        ticket,
                        members: Err(None),
                    });
                };
                let mut d = [0; 20];
                eval(
                    &mut conn.wbuf,
                    m::READ_MEMBERS,
                    &[&members],
                    &[decimal(max as u64, &mut d)],
                );
                self.push_member_pending(i, Step::ReadMembers { ticket });
            }
            other => tracing::error!(?other, "not a membership command"),
        }
    }

    fn push_member_pending(&mut self, i: usize, step: Step) {
        self.stats.pipeline_depth.fetch_add(1, Ordering::Relaxed);
        if let Some(shard) = self.shards.get_mut(i) {
            shard.inflight.push_back((Pending::Members(step), 0));
        }
    }

    /// Whether shard `i`'s pub/sub connection is up.
    fn sub_up(&self, i: Option<usize>) -> bool {
        i.and_then(|i| self.shards.get(i))
            .is_some_and(|s| s.sub.is_some())
    }

    /// Whether shard `i`'s command connection is up.
    fn cmd_up(&self, i: Option<usize>) -> bool {
        i.and_then(|i| self.shards.get(i))
            .is_some_and(|s| s.cmd.is_some())
    }

    /// The command connection of the shard serving `key`, with its number.
    fn cmd_for(&mut self, key: &[u8]) -> Option<(usize, &mut super::Conn)> {
        let i = self.route(key)?;
        Some((i, self.shards.get_mut(i)?.cmd.as_mut()?))
    }

    /// Moves every user's channel to the shard of its key and subscribes those not
    /// subscribed where that shard's pub/sub connection is up (plain pub/sub: notices are
    /// `PUBLISH`ed, which a Redis Cluster carries to every node).
    pub(super) fn route_users(&mut self) {
        let Some(map) = self.map.as_ref() else {
            return;
        };
        for (ch, w) in self.users.iter_mut() {
            let want = map.shard_of_key(ch);
            if w.shard != Some(want) {
                if let Some(old) = w.shard
                    && w.state != SubState::Idle
                    && let Some(sub) = self.shards.get_mut(old).and_then(|s| s.sub.as_mut())
                {
                    resp::encode(&mut sub.wbuf, [&b"UNSUBSCRIBE"[..], &ch[..]].into_iter());
                }
                if w.state == SubState::Subscribed {
                    self.stats.users_watched.fetch_sub(1, Ordering::Relaxed);
                }
                w.state = SubState::Idle;
                w.shard = Some(want);
            }
            if w.state == SubState::Idle
                && let Some(sub) = self.shards.get_mut(want).and_then(|s| s.sub.as_mut())
            {
                resp::encode(&mut sub.wbuf, [&b"SUBSCRIBE"[..], &ch[..]].into_iter());
                w.state = SubState::Subscribing;
            }
        }
    }

    /// The shards were renumbered (`before`: their addresses until now): users' channels
    /// follow; those of a gone shard lost their subscription with it.
    pub(super) fn renumber_users(&mut self, before: &[RedisAddr], map: &SlotMap) {
        for w in self.users.values_mut() {
            let addr = w.shard.and_then(|i| before.get(i));
            let now_at = addr.and_then(|a| map.shards.iter().position(|m| m == a));
            if now_at.is_none() {
                if w.state == SubState::Subscribed {
                    self.stats.users_watched.fetch_sub(1, Ordering::Relaxed);
                }
                w.state = SubState::Idle;
            }
            w.shard = now_at;
        }
    }

    fn send_member_room(&mut self, req: MemberRequest) {
        let (mut meta, mut members) = (Vec::new(), Vec::new());
        super::script::key(&mut meta, &req.room, "m");
        super::script::key(&mut members, &req.room, "u");
        let Some((i, conn)) = self.cmd_for(&meta) else {
            return self
                .out
                .push(EngineEvent::MemberFailed { ticket: req.ticket });
        };
        let (meta, members) = (&meta, &members);
        let user = req.user.as_bytes();
        match req.change {
            MemberChange::Join {
                epoch_hint, serial, ..
            } => {
                let (mut d1, mut d2) = ([0; 20], [0; 20]);
                eval(
                    &mut conn.wbuf,
                    m::ROOM_JOIN,
                    &[meta, members],
                    &[decimal(epoch_hint, &mut d1), user, decimal(serial, &mut d2)],
                );
            }
            MemberChange::Leave { .. } => {
                eval(&mut conn.wbuf, m::ROOM_LEAVE, &[members], &[user]);
            }
        }
        self.push_member_pending(i, Step::Room(req));
    }

    /// Sends the user's script of a change whose room side answered.
    fn send_member_user(&mut self, step: Step) {
        let (req, join_or_empty) = match &step {
            Step::UserJoin { req, join, .. } => (req, join.clone()),
            Step::UserLeave { req, .. } => (req, Bytes::new()),
            _ => return,
        };
        let rooms = m::user_key(&req.user, "r");
        let Some(i) = self.route(&rooms).filter(|&i| self.cmd_up(Some(i))) else {
            return self.fail_member_step(step);
        };
        let Some(conn) = self.shards.get_mut(i).and_then(|s| s.cmd.as_mut()) else {
            return self.fail_member_step(step);
        };
        let blocks = m::user_key(&req.user, "b");
        let field = m::room_field(&req.room);
        let channel = m::notice_channel(&req.user);
        let mut d = [0; 20];
        match req.change {
            MemberChange::Join {
                unblock, max_rooms, ..
            } => eval(
                &mut conn.wbuf,
                m::USER_JOIN,
                &[&rooms, &blocks],
                &[
                    &field,
                    &join_or_empty,
                    if unblock { b"1" } else { b"0" },
                    decimal(max_rooms as u64, &mut d),
                    &channel,
                ],
            ),
            MemberChange::Leave {
                block,
                reason,
                max_blocks,
            } => eval(
                &mut conn.wbuf,
                m::USER_LEAVE,
                &[&rooms, &blocks],
                &[
                    &field,
                    if block { b"1" } else { b"0" },
                    decimal(max_blocks as u64, &mut d),
                    &channel,
                    m::reason_code(reason).as_bytes(),
                ],
            ),
        }
        self.push_member_pending(i, step);
    }

    /// Reads the rooms and blocks of the user whose channel `ch` is subscribed.
    fn send_load(&mut self, ch: &Bytes) {
        let Some(w) = self.users.get(ch) else { return };
        let user = w.user.clone();
        let (max_rooms, max_blocks) = (w.max_rooms as u64, w.max_blocks as u64);
        let rooms = m::user_key(&user, "r");
        let Some((i, conn)) = self.cmd_for(&rooms) else {
            return self.out.push(EngineEvent::UserLoadFailed {
                user,
                over_cap: None,
            });
        };
        let (mut d1, mut d2) = ([0; 20], [0; 20]);
        eval(
            &mut conn.wbuf,
            m::LOAD_USER,
            &[&rooms, &m::user_key(&user, "b")],
            &[decimal(max_rooms, &mut d1), decimal(max_blocks, &mut d2)],
        );
        self.stats.user_loads.fetch_add(1, Ordering::Relaxed);
        self.push_member_pending(i, Step::Load { user });
    }

    /// A membership step's reply.
    pub(super) fn on_member_reply(&mut self, step: Step, reply: Value) {
        if let Value::Error(e) = &reply {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(worker = self.worker, error = %String::from_utf8_lossy(e), "the engine refused a membership command");
            return self.fail_member_step(step);
        }
        match step {
            Step::Room(req) => match req.change {
                MemberChange::Join { .. } => {
                    let parsed = reply.array().and_then(|a| {
                        let new = a.first()?.int()? == 1;
                        let join = a.get(1)?.bytes()?.clone();
                        m::parse_join_point(&join)?;
                        Some((new, join))
                    });
                    match parsed {
                        Some((room_new, join)) => self.send_member_user(Step::UserJoin {
                            req,
                            join,
                            room_new,
                        }),
                        None => self.malformed(Step::Room(req), &reply),
                    }
                }
                MemberChange::Leave { .. } => match reply.bytes() {
                    Some(was) => {
                        let was = !was.is_empty();
                        self.send_member_user(Step::UserLeave { req, was });
                    }
                    None => self.malformed(Step::Room(req), &reply),
                },
            },
            Step::UserJoin {
                req,
                join,
                room_new,
            } => {
                let answer = reply.bytes().map(|b| &b[..]);
                let outcome = match (answer, m::parse_join_point(&join)) {
                    (Some(b"new" | b"same"), Some(jp)) => MemberOutcome::Joined {
                        new: room_new || answer == Some(b"new"),
                        join: jp,
                    },
                    (Some(refused @ (b"blocked" | b"full")), _) => {
                        let blocked = refused == b"blocked";
                        if room_new {
                            self.send_undo(&req, &join);
                        }
                        MemberOutcome::JoinRefused { blocked }
                    }
                    _ => {
                        return self.malformed(
                            Step::UserJoin {
                                req,
                                join,
                                room_new,
                            },
                            &reply,
                        );
                    }
                };
                self.stats.member_changes.fetch_add(1, Ordering::Relaxed);
                self.out.push(EngineEvent::MemberDone {
                    ticket: req.ticket,
                    outcome,
                });
            }
            Step::UserLeave { req, was } => {
                let parsed = reply.array().and_then(|a| {
                    let user_was = !a.first()?.bytes()?.is_empty();
                    Some((user_was, a.get(1)?.int()?))
                });
                let Some((user_was, block)) = parsed else {
                    return self.malformed(Step::UserLeave { req, was }, &reply);
                };
                self.stats.member_changes.fetch_add(1, Ordering::Relaxed);
                self.out.push(EngineEvent::MemberDone {
                    ticket: req.ticket,
                    outcome: MemberOutcome::Left {
                        was: was || user_was,
                        block_refused: block == 2,
                    },
                });
            }
            Step::Undo => {}
            Step::Load { user } => {
                let event = match m::parse_user_rooms(&reply) {
                    Ok(rooms) => EngineEvent::UserLoaded { user, rooms },
                    Err(Some(n)) => EngineEvent::UserLoadFailed {
                        user,
                        over_cap: Some(n),
                    },
                    Err(None) => return self.malformed(Step::Load { user }, &reply),
                };
                self.out.push(event);
            }
            Step::Kick { ticket } => self.out.push(EngineEvent::Kicked { ticket, ok: true }),
            Step::ReadMembers { ticket } => {
                let members = m::parse_members(&reply);
                if members == Err(None) {
                    return self.malformed(Step::ReadMembers { ticket }, &reply);
                }
                self.out.push(EngineEvent::MembersRead { ticket, members });
            }
        }
    }

    fn malformed(&mut self, step: Step, reply: &Value) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(worker = self.worker, reply = ?reply, "a malformed answer to a membership command");
        self.fail_member_step(step);
    }

    fn send_undo(&mut self, req: &MemberRequest, join: &Bytes) {
        let mut members = Vec::new();
        super::script::key(&mut members, &req.room, "u");
        let Some((i, conn)) = self.cmd_for(&members) else {
            return;
        };
        eval(
            &mut conn.wbuf,
            m::ROOM_UNDO,
            &[&members],
            &[req.user.as_bytes(), join],
        );
        self.push_member_pending(i, Step::Undo);
    }

    /// A step that will not be answered (the connection failed, or the answer was bad).
    pub(super) fn fail_member_step(&mut self, step: Step) {
        let event = match step {
            Step::Room(req) | Step::UserJoin { req, .. } | Step::UserLeave { req, .. } => {
                EngineEvent::MemberFailed { ticket: req.ticket }
            }
            Step::Undo => return,
            Step::Load { user } => EngineEvent::UserLoadFailed {
                user,
                over_cap: None,
            },
            Step::Kick { ticket } => EngineEvent::Kicked { ticket, ok: false },
            Step::ReadMembers { ticket } => EngineEvent::MembersRead {
                ticket,
                members: Err(None),
            },
        };
        self.out.push(event);
    }

    /// Shard `i`'s pub/sub connection failed: its users' channels wait for the next one.
    pub(super) fn users_down(&mut self, i: usize) {
        let mut confirmed = 0;
        for w in self.users.values_mut().filter(|w| w.shard == Some(i)) {
            confirmed += i64::from(w.state == SubState::Subscribed);
            w.state = SubState::Idle;
        }
        self.stats
            .users_watched
            .fetch_sub(confirmed, Ordering::Relaxed);
    }

    /// A push on a user's channel; false when `ch` is not one.
    pub(super) fn on_user_push(&mut self, kind: &[u8], ch: &Bytes, body: &Value) -> bool {
        let Some(w) = self.users.get_mut(&ch[..]) else {
            return false;
        };
        match kind {
            b"message" => {
                self.stats.notices.fetch_add(1, Ordering::Relaxed);
                match body.bytes().and_then(|b| m::parse_notice(b)) {
                    Some(notice) => self.out.push(EngineEvent::Notice {
                        user: w.user.clone(),
                        notice,
                    }),
                    None => {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(worker = self.worker, "a malformed notice was dropped");
                    }
                }
            }
            b"subscribe" => {
                if w.state != SubState::Subscribed {
                    w.state = SubState::Subscribed;
                    self.stats.users_watched.fetch_add(1, Ordering::Relaxed);
                }
                // Subscribed before the read: a change after the read comes as a notice.
                let ch = ch.clone();
                self.send_load(&ch);
            }
            _ => {}
        }
        true
    }
}
