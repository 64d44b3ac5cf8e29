//! The engine's side of membership ([`crate::cluster::membership`]): the two-step
//! membership changes, users' notice channels and the loads of a user's rooms.
//!
//! Owns: the users' channels' subscriptions and the membership commands in flight. Must
//! not touch: rooms' channels or publishes (the rest of the engine).

use std::sync::atomic::Ordering;

use bytes::Bytes;
use pabal_codec::Text;

use super::super::RedisAddr;
use super::super::membership as m;
use super::super::presence::{self as p, Lookup};
use super::super::resp::{self, Value};
use super::super::script::Script;
use super::super::slots::SlotMap;
use super::super::{
    ClaimOutcome, EngineCmd, EngineErrorKind, EngineEvent, MemberChange, MemberOutcome,
    MemberRequest, Topology,
};
use super::{Engine, MAX_HOPS, Pending, SubState, encode_script};
use crate::ids::RoomName;

/// A user's notice channel on this engine.
pub(super) struct UserWatch {
    pub(super) user: Text,
    pub(super) state: SubState,
    /// The shard it is (to be) subscribed on (its key's); `None` before the map is known.
    pub(super) shard: Option<usize>,
    max_rooms: usize,
    max_blocks: usize,
    /// This worker's connections of the user counted in the engine (claims in flight
    /// included): what its presence entry says (`presence.rs`).
    pub(super) conns: u32,
    /// Reads of the user's rooms ([`Step::Load`]) sent and not answered yet.
    loads: u32,
    /// Notices heard while a read was out, in order: the read may have run before their
    /// changes (its answer, on the command connection, can come after them, on the pub/sub
    /// connection), so they follow its answer instead of being undone by it. Past
    /// [`MAX_HELD_NOTICES`] they are dropped and the user is read again instead.
    held: Vec<m::Notice>,
    /// Held notices were dropped: read the user again once the reads out are answered.
    reread: bool,
    /// A read failed for want of the command connection: read again once it is back (a
    /// read after a resubscription repairs what notices were lost; the worker keeps its
    /// cache meanwhile, so without this a lost notice would stay lost).
    read_due: bool,
}

/// Sends of a [`Step::Raise`] Redis did not run before the owner is told (each after the
/// longest retry backoff).
const RAISE_TRIES: u8 = 3;

/// Notices one user's channel may hold while a read of the user's rooms is out.
const MAX_HELD_NOTICES: usize = 256;

/// A membership command (or presence's, or a room's sequence raised: scripts answered
/// the same way) on the command connection awaiting its reply. Each carries what
/// it takes to send it again: a step answered `MOVED` or `ASK` goes where Redis said, one
/// answered `TRYAGAIN` (a slot mid-migration) goes again after a short backoff, both
/// bounded by the engine's `MAX_HOPS`.
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
    /// The undo of a refused join's room side (at join point `join`).
    Undo { req: MemberRequest, join: Bytes },
    /// The read of a user's rooms and blocks.
    Load { user: Text },
    /// A kick notice.
    Kick { ticket: u64, user: Text },
    /// The read of a room's members.
    ReadMembers {
        ticket: u64,
        room: RoomName,
        max: usize,
    },
    /// A HELLO's claim of one more connection of the user (`presence.rs`).
    Claim { ticket: u64, user: Text, max: usize },
    /// This worker's count of the user written, and its lease renewed (`presence.rs`).
    SetPresence { user: Text },
    /// A server-API read (`presence.rs`).
    Lookup { ticket: u64, lookup: Lookup },
    /// A room's sequence moved up to its owner's head (`script::RAISE`), sent `tries`
    /// times before.
    Raise {
        room: RoomName,
        epoch: u64,
        head: u64,
        tries: u8,
    },
}

/// What a step sends.
enum Command {
    /// `EVALSHA <sha> <keys> <args>` (`EVAL <script> ...` after a NOSCRIPT).
    Script(&'static Script, Vec<Vec<u8>>, Vec<Vec<u8>>),
    /// A plain command, verb first.
    Plain(Vec<Vec<u8>>),
}

/// The user's script of a change (`join`: the join point the room's script gave).
fn user_command(req: &MemberRequest, join: Option<&Bytes>) -> Command {
    let d = |n: u64| n.to_string().into_bytes();
    let keys = vec![m::user_key(&req.user, "r"), m::user_key(&req.user, "b")];
    let field = m::room_field(&req.room);
    let channel = m::notice_channel(&req.user).to_vec();
    let flag = |on: bool| if on { b"1".to_vec() } else { b"0".to_vec() };
    match req.change {
        MemberChange::Join {
            unblock, max_rooms, ..
        } => Command::Script(
            &m::USER_JOIN,
            keys,
            vec![
                field,
                join.map(|j| j.to_vec()).unwrap_or_default(),
                flag(unblock),
                d(max_rooms as u64),
                channel,
            ],
        ),
        MemberChange::Leave {
            block,
            reason,
            max_blocks,
            ..
        } => Command::Script(
            &m::USER_LEAVE,
            keys,
            vec![
                field,
                flag(block),
                d(max_blocks as u64),
                channel,
                m::reason_code(reason).as_bytes().to_vec(),
            ],
        ),
    }
}

impl Engine {
    pub(super) fn on_member_cmd(&mut self, cmd: EngineCmd) {
        match cmd {
            EngineCmd::Member(req) => self.send_step(Step::Room(req), None, 0),
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
                    conns: 0,
                    loads: 0,
                    held: Vec::new(),
                    reread: false,
                    read_due: false,
                });
                match w.state {
                    // Already subscribed (a connection raced its unwatch): read again.
                    SubState::Subscribed => self.send_load(user),
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
                    if w.conns > 0 {
                        // The worker's last connection of the user closed: its entry goes.
                        self.send_step(Step::SetPresence { user }, None, 0);
                    }
                }
            }
            EngineCmd::Kick { ticket, user } => {
                self.send_step(Step::Kick { ticket, user }, None, 0)
            }
            EngineCmd::ReadMembers { ticket, room, max } => {
                self.send_step(Step::ReadMembers { ticket, room, max }, None, 0)
            }
            cmd @ (EngineCmd::Claim { .. }
            | EngineCmd::Release { .. }
            | EngineCmd::Lookup { .. }) => self.on_presence_cmd(cmd),
            other => tracing::error!(?other, "not a membership command"),
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
                && let Some(sub) =
                    (self.shards.get_mut(want)).and_then(|s| s.sub_for_subscribing(self.woke))
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
            let now_at = super::renumbered(w.shard, before, map);
            if now_at.is_none() {
                if w.state == SubState::Subscribed {
                    self.stats.users_watched.fetch_sub(1, Ordering::Relaxed);
                }
                w.state = SubState::Idle;
            }
            w.shard = now_at;
        }
    }

    /// Sends `step`'s command to the shard of its key; fails the step when that shard's
    /// command connection is down.
    pub(super) fn send_step(&mut self, step: Step, target: Option<usize>, hops: u8) {
        self.send_step_as(step, false, target, hops);
    }

    /// [`Engine::send_step`] to `target` (a shard an `ASK` named) if one is given, a
    /// script with its text when `eval` (after a NOSCRIPT or an `ASKING`).
    pub(super) fn send_step_as(&mut self, step: Step, eval: bool, target: Option<usize>, hops: u8) {
        let Some(command) = self.command_of(&step) else {
            return; // nothing to send any more (the user is no longer watched)
        };
        let key = match &command {
            Command::Script(_, keys, _) => keys.first(),
            Command::Plain(parts) => parts.get(1),
        };
        let i = target.or_else(|| key.and_then(|k| self.route(k)));
        let Some(conn) = i
            .and_then(|i| self.shards.get_mut(i))
            .and_then(|s| s.cmd.as_mut())
        else {
            return self.fail_member_step(step);
        };
        match &command {
            Command::Script(script, keys, args) => {
                let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
                let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
                encode_script(
                    &mut conn.wbuf,
                    (script.text, script.sha(), eval),
                    &keys,
                    &args,
                );
            }
            Command::Plain(parts) => resp::encode(&mut conn.wbuf, parts.iter().map(Vec::as_slice)),
        }
        self.stats.pipeline_depth.fetch_add(1, Ordering::Relaxed);
        if matches!(step, Step::Load { .. }) {
            self.stats.user_loads.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(shard) = i.and_then(|i| self.shards.get_mut(i)) {
            shard.inflight.push_back((Pending::Members(step), hops));
        }
    }

    /// The command `step` sends; `None` when there is nothing to send.
    fn command_of(&self, step: &Step) -> Option<Command> {
        let d = |n: u64| n.to_string().into_bytes();
        let room_key = |room: &RoomName, suffix: &str| {
            let mut k = Vec::new();
            super::script::key(&mut k, room, suffix);
            k
        };
        Some(match step {
            Step::Room(req) => {
                let (meta, members) = (room_key(&req.room, "m"), room_key(&req.room, "u"));
                let user = req.user.as_bytes().to_vec();
                match req.change {
                    MemberChange::Join {
                        epoch_hint, serial, ..
                    } => Command::Script(
                        &m::ROOM_JOIN,
                        vec![meta, members, room_key(&req.room, "d")],
                        vec![d(epoch_hint), user, d(serial)],
                    ),
                    MemberChange::Leave {
                        block,
                        reason,
                        expire_ms,
                        ..
                    } => {
                        // A leave that blocks takes effect by its notice: only the user's
                        // side knows whether the block is refused (and the LEFT says so). So
                        // does a channel's: its subscribers come and go all the time, and a
                        // mark each would take its stream's retention (`MAXLEN` counts
                        // entries) and every node's share of its channel.
                        let mark = if block || req.room.channel || !self.config.ordered_removals {
                            ""
                        } else {
                            m::reason_code(reason)
                        };
                        let verb: &[u8] = match self.topology {
                            Topology::Single | Topology::Sentinel => b"PUBLISH",
                            Topology::Cluster => b"SPUBLISH",
                        };
                        Command::Script(
                            &m::ROOM_LEAVE,
                            vec![
                                members,
                                room_key(&req.room, "k"),
                                room_key(&req.room, "d"),
                                meta,
                                room_key(&req.room, "s"),
                                room_key(&req.room, "x"),
                            ],
                            vec![
                                user,
                                mark.as_bytes().to_vec(),
                                room_key(&req.room, "c"),
                                verb.to_vec(),
                                self.config.stream_max_len.to_string().into_bytes(),
                                expire_ms.map(d).unwrap_or_default(),
                            ],
                        )
                    }
                }
            }
            Step::UserJoin { req, join, .. } => user_command(req, Some(join)),
            Step::UserLeave { req, .. } => user_command(req, None),
            Step::Undo { req, join } => Command::Script(
                &m::ROOM_UNDO,
                vec![room_key(&req.room, "u"), room_key(&req.room, "d")],
                vec![req.user.as_bytes().to_vec(), join.to_vec()],
            ),
            Step::Load { user } => {
                let w = self.users.get(&m::notice_channel(user))?;
                Command::Script(
                    &m::LOAD_USER,
                    vec![m::user_key(user, "r"), m::user_key(user, "b")],
                    vec![d(w.max_rooms as u64), d(w.max_blocks as u64)],
                )
            }
            Step::Kick { user, .. } => Command::Plain(vec![
                b"PUBLISH".to_vec(),
                m::notice_channel(user).to_vec(),
                b"K".to_vec(),
            ]),
            Step::ReadMembers { room, max, .. } => Command::Script(
                &m::READ_MEMBERS,
                vec![room_key(room, "u")],
                vec![d(*max as u64)],
            ),
            Step::Claim { user, max, .. } => Command::Script(
                &p::CLAIM,
                vec![p::presence_key(user)],
                vec![
                    self.presence.field.clone(),
                    d(*max as u64),
                    d(self.presence.lease_ms),
                ],
            ),
            Step::SetPresence { user } => {
                let conns = self
                    .users
                    .get(&m::notice_channel(user))
                    .map_or(0, |w| w.conns);
                Command::Script(
                    &p::SET,
                    vec![p::presence_key(user)],
                    vec![
                        self.presence.field.clone(),
                        d(u64::from(conns)),
                        d(self.presence.lease_ms),
                    ],
                )
            }
            Step::Raise {
                room, epoch, head, ..
            } => Command::Script(
                &super::super::script::RAISE,
                vec![
                    room_key(room, "m"),
                    room_key(room, "s"),
                    room_key(room, "i"),
                ],
                vec![d(*epoch), d(*head)],
            ),
            Step::Lookup { lookup, .. } => match lookup {
                Lookup::Presence { .. } => Command::Script(&p::READ, vec![lookup.key()], vec![]),
                Lookup::Rooms { .. } => Command::Plain(vec![b"HKEYS".to_vec(), lookup.key()]),
                Lookup::MemberCount { .. } => Command::Plain(vec![b"HLEN".to_vec(), lookup.key()]),
            },
        })
    }
    /// A membership step's reply.
    pub(super) fn on_member_reply(&mut self, step: Step, reply: Value, hops: u8) {
        if let Value::Error(e) = &reply
            && e.starts_with(b"NOSCRIPT")
        {
            // Redis does not hold the script (restarted, flushed, failed over): its text
            // goes once, and Redis holds it for every later call. An `ASK`'s resend is
            // sent with its text already, so this comes from the shard of the step's key.
            return self.send_step_as(step, true, None, hops);
        }
        if let Value::Error(e) = &reply
            && super::receipts::transient(e)
            && hops < MAX_HOPS
        {
            // The slot is mid-migration and the step's keys are split between its two
            // shards for a moment, or Redis is still loading its data: sent again
            // shortly.
            return self.retry_later(Pending::Members(step), hops + 1);
        }
        if let Value::Error(e) = &reply {
            self.stats.count_error(EngineErrorKind::ErrorReply);
            if super::receipts::transient(e) {
                // Its redirects and retries are spent.
                self.stats.retries_given_up.fetch_add(1, Ordering::Relaxed);
            }
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
                        Some((room_new, join)) => self.send_step(
                            Step::UserJoin {
                                req,
                                join,
                                room_new,
                            },
                            None,
                            0,
                        ),
                        None => self.malformed(Step::Room(req), &reply),
                    }
                }
                MemberChange::Leave { .. } => match reply.bytes() {
                    Some(was) => {
                        let was = !was.is_empty();
                        self.send_step(Step::UserLeave { req, was }, None, 0);
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
                        // Whether or not the room's side was new: a room membership the
                        // user's side refused is one an earlier refusal left when its undo
                        // was lost (its connection failed, or its node died), and the
                        // retry takes it back (`ROOM_UNDO` only if it is still this one).
                        let undo = Step::Undo {
                            req: req.clone(),
                            join: join.clone(),
                        };
                        self.send_step(undo, None, 0);
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
            Step::Undo { .. } => {}
            Step::Load { user } => {
                let event = match m::parse_user_rooms(&reply) {
                    Ok(rooms) => EngineEvent::UserLoaded {
                        user: user.clone(),
                        rooms,
                    },
                    Err(Some(n)) => EngineEvent::UserLoadFailed {
                        user: user.clone(),
                        over_cap: Some(n),
                    },
                    Err(None) => return self.malformed(Step::Load { user }, &reply),
                };
                self.out.push(event);
                self.load_answered(&user);
            }
            Step::Kick { ticket, .. } => self.out.push(EngineEvent::Kicked { ticket, ok: true }),
            Step::ReadMembers { ticket, room, max } => {
                let members = m::parse_members(&reply);
                if members == Err(None) {
                    return self.malformed(Step::ReadMembers { ticket, room, max }, &reply);
                }
                self.out.push(EngineEvent::MembersRead { ticket, members });
            }
            step @ (Step::Claim { .. } | Step::SetPresence { .. } | Step::Lookup { .. }) => {
                self.on_presence_reply(step, &reply)
            }
            Step::Raise {
                room, epoch, head, ..
            } => {
                if reply.int() == Some(1) {
                    self.stats.sequences_raised.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(worker = self.worker, room = %room.name, epoch, head, "Redis lost writes of the room (its sequence was below what this node delivered): moved it up; what was lost is a gap");
                }
            }
        }
    }

    fn malformed(&mut self, step: Step, reply: &Value) {
        self.stats.count_error(EngineErrorKind::Protocol);
        tracing::warn!(worker = self.worker, reply = ?reply, "a malformed answer to a membership command");
        self.fail_member_step(step);
    }

    /// Users whose read failed for want of the command connection, on a shard whose
    /// command connection is back: read again (after a dial).
    pub(super) fn send_reads_due(&mut self) {
        let due: Vec<Text> = self
            .users
            .values_mut()
            .filter(|w| {
                w.read_due
                    && w.state == SubState::Subscribed
                    && w.shard
                        .and_then(|i| self.shards.get(i))
                        .is_some_and(|s| s.cmd.is_some())
            })
            .map(|w| {
                w.read_due = false;
                w.user.clone()
            })
            .collect();
        for user in due {
            self.send_load(user);
        }
    }

    /// Reads the user's rooms (and holds the user's notices until the answer).
    fn send_load(&mut self, user: Text) {
        if let Some(w) = self.users.get_mut(&m::notice_channel(&user)) {
            w.loads += 1;
        }
        self.send_step(Step::Load { user }, None, 0);
    }

    /// A read of the user's rooms was answered (or failed): once none is out, the notices
    /// heard meanwhile follow its answer, in order, or the user is read again if some were
    /// dropped.
    fn load_answered(&mut self, user: &Text) {
        let Some(w) = self.users.get_mut(&m::notice_channel(user)) else {
            return;
        };
        w.loads = w.loads.saturating_sub(1);
        if w.loads > 0 {
            return;
        }
        if std::mem::take(&mut w.reread) {
            return self.send_load(user.clone());
        }
        for notice in std::mem::take(&mut w.held) {
            self.out.push(EngineEvent::Notice {
                user: user.clone(),
                notice,
            });
        }
    }

    /// A step that will not be answered (the connection failed, or the answer was bad).
    pub(super) fn fail_member_step(&mut self, step: Step) {
        let event = match step {
            Step::Room(req) | Step::UserJoin { req, .. } | Step::UserLeave { req, .. } => {
                EngineEvent::MemberFailed { ticket: req.ticket }
            }
            Step::Undo { .. } | Step::SetPresence { .. } => return,
            // Sent again after the longest backoff, a few times (a connection lost again
            // in a failover, `READONLY` from a master just demoted); then the owner reads
            // the room again, which asks again if it is still behind.
            Step::Raise {
                room,
                epoch,
                head,
                tries,
            } if tries < RAISE_TRIES => {
                let again = Step::Raise {
                    room,
                    epoch,
                    head,
                    tries: tries + 1,
                };
                return self.retry_later(Pending::Members(again), MAX_HOPS);
            }
            Step::Raise { room, epoch, .. } => EngineEvent::RaiseFailed { room, epoch },
            Step::Load { user } => {
                self.out.push(EngineEvent::UserLoadFailed {
                    user: user.clone(),
                    over_cap: None,
                });
                if let Some(w) = self.users.get_mut(&m::notice_channel(&user)) {
                    w.read_due = true;
                }
                return self.load_answered(&user);
            }
            Step::Kick { ticket, .. } => EngineEvent::Kicked { ticket, ok: false },
            Step::ReadMembers { ticket, .. } => EngineEvent::MembersRead {
                ticket,
                members: Err(None),
            },
            Step::Claim { ticket, user, .. } => {
                self.claim_undone(&user);
                EngineEvent::Claimed {
                    ticket,
                    outcome: ClaimOutcome::Failed,
                }
            }
            Step::Lookup { ticket, .. } => EngineEvent::LookedUp {
                ticket,
                answer: None,
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
                    Some(notice) if w.loads > 0 => {
                        if w.held.len() < MAX_HELD_NOTICES {
                            w.held.push(notice);
                        } else {
                            w.held.clear();
                            w.reread = true;
                        }
                    }
                    Some(notice) => self.out.push(EngineEvent::Notice {
                        user: w.user.clone(),
                        notice,
                    }),
                    None => {
                        self.stats.count_error(EngineErrorKind::Protocol);
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
                let user = w.user.clone();
                self.send_load(user);
            }
            _ => {}
        }
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use super::*;
    use crate::cluster::ClusterConfig;
    use crate::cluster::engine::{Driver, EngineHandle};
    use crate::cluster::membership::Notice;
    use std::sync::Arc;

    /// An engine on the test's thread whose Redis does not answer (nothing listens on port
    /// 1): its steps fail as with the command connection down.
    fn engine_down() -> EngineHandle {
        let config = ClusterConfig {
            redis: vec!["redis://127.0.0.1:1".into()],
            ..ClusterConfig::default()
        };
        let stats = Arc::new(super::super::super::ClusterStats::default());
        EngineHandle::spawn(0, &config, 16 << 10, "t", Box::new(|| {}), stats).unwrap()
    }

    fn engine_of(handle: &mut EngineHandle) -> &mut Engine {
        match &mut handle.driver {
            Driver::Inline { engine, .. } => engine,
            Driver::Thread { .. } => unreachable!("spawned on the test's thread"),
        }
    }

    /// An engine whose Redis does not answer, with ann's channel watched and subscribed:
    /// the engine, ann, and her channel.
    fn ann_watched() -> (EngineHandle, Text, Bytes) {
        let mut handle = engine_down();
        let user = Text::from("ann");
        let ch = m::notice_channel(&user);
        engine_of(&mut handle).users.insert(
            ch.clone(),
            UserWatch {
                user: user.clone(),
                state: SubState::Subscribed,
                shard: Some(0),
                max_rooms: 100,
                max_blocks: 100,
                conns: 0,
                loads: 0,
                held: Vec::new(),
                reread: false,
                read_due: false,
            },
        );
        (handle, user, ch)
    }

    /// A notice heard while a read of the user is out follows the read's answer: the read
    /// may have run before the notice's change (two connections, no order between them).
    #[test]
    fn a_notice_heard_while_a_read_of_the_user_is_out_follows_its_answer() {
        let (mut handle, ann, ch) = ann_watched();
        let e = engine_of(&mut handle);
        e.users.get_mut(&ch).unwrap().loads = 1;
        let notice = Value::Bulk(Some(Bytes::from_static(b"J 7:3:99 r:dm")));
        assert!(e.on_user_push(b"message", &ch, &notice));
        assert!(e.out.is_empty(), "held: {:?}", e.out);
        let rooms = Value::Array(Some(vec![
            Value::Bulk(Some(Bytes::from_static(b"ok"))),
            Value::Array(Some(Vec::new())),
            Value::Array(Some(Vec::new())),
        ]));
        e.on_member_reply(Step::Load { user: ann.clone() }, rooms, 0);
        assert!(
            matches!(
                e.out.as_slice(),
                [
                    EngineEvent::UserLoaded { .. },
                    EngineEvent::Notice {
                        notice: Notice::Joined { .. },
                        ..
                    }
                ]
            ),
            "{:?}",
            e.out
        );
        // With no read out, a notice goes at once.
        e.out.clear();
        assert!(e.on_user_push(b"message", &ch, &notice));
        assert!(matches!(e.out.as_slice(), [EngineEvent::Notice { .. }]));
    }

    /// A read that fails for want of the command connection is marked to go again once the
    /// connection is back (and not before).
    #[test]
    fn a_read_that_found_no_command_connection_is_due_again() {
        let (mut handle, ann, ch) = ann_watched();
        let e = engine_of(&mut handle);
        e.send_load(ann);
        assert!(
            matches!(
                e.out.as_slice(),
                [EngineEvent::UserLoadFailed { over_cap: None, .. }]
            ),
            "{:?}",
            e.out
        );
        let w = &e.users[&ch];
        assert!(w.read_due && w.loads == 0);
        e.out.clear();
        e.send_reads_due();
        assert!(
            e.out.is_empty(),
            "still no connection: nothing sent, nothing failed"
        );
        assert!(e.users[&ch].read_due);
    }
}
