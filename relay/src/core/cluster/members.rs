//! A cluster node's membership (`[cluster]`): the engine holds every membership, block and
//! join point ([`crate::cluster::membership`]); a node's directory holds those of the users
//! it has connections of, as a cache the engine's notices keep current.
//!
//! # A user on this worker
//! A worker watches a user's notice channel while it holds a connection of theirs (the
//! first HELLO subscribes it, the last close unsubscribes it). A HELLO waits until the
//! channel is subscribed and the user's rooms and blocks are read into the directory
//! (bounded by `auth.handshake_timeout`; with the engine down it is refused `Overloaded`
//! `unavailable`, fatal, so the phone reconnects), and then for its claim: the engine
//! counts the connection against `limits.max_connections_per_user` on every node together
//! (`cluster/presence.rs`) or refuses it (`LimitExceeded`, as on one relay). Closes are
//! handed to the engine once per user and loop tick. Every notice, and every read after a
//! resubscription, is applied to the directory and to this worker's connections of the
//! user exactly as a local membership change is (binding, LEFT, GOAWAY); after a read, the
//! connections' bindings are compared with what the engine holds, so a notice lost while
//! the pub/sub connection was down costs nothing.
//!
//! # A change made here
//! A join or leave (a phone's SUBSCRIBE or UNSUBSCRIBE, the server API's member calls) goes
//! to the engine; the engine's answer updates the owner's member set and answers the
//! requester, and the notice it published binds or unbinds the user's connections on every
//! node, this one included. Why not apply it locally first: the join point must come from
//! the engine's head (this node may trail it), and one path for every node keeps them
//! alike.
//!
//! The owner's member set of a room is not loaded from the engine when the room opens, as a
//! first design had it: a channel's subscribers are unbounded, and every node owning the
//! channel would hold all of them. It holds the changes made through this owner; a
//! replacing `PUT .../members`, the one call that needs them all, reads the engine's
//! (bounded, `MAX_SET_MEMBERS`) and refreshes it.
//!
//! Owns: watched users, HELLOs waiting for their user's load or their claim, closes not
//! yet handed to the engine, membership changes and lookups in flight.
//! Must not touch: the engine's connections (commands out, events in), other workers.

use std::collections::{HashMap, HashSet};

use pabal_codec::{ErrorCode, Hello, LeftReason, Text};

use super::super::Core;
use super::super::ReplyTo;
use super::history_expiry;
use crate::cluster::membership::{Notice, UserRooms};
use crate::cluster::presence::Lookup;
use crate::cluster::{
    ClaimOutcome, EngineCmd, EngineEvent, MemberChange, MemberOutcome, MemberRequest,
};
use crate::conn::Phase;
use crate::directory::{DirectoryError, JoinPoint};
use crate::ids::{Origin, RoomName, UserName};
use crate::io::Token;
use crate::mesh::{ControlRefusal, ControlReply};
use crate::stats::inc;

/// A replacing `PUT .../members` reads the room's members from the engine: at most this
/// many (more: refused `too_many_members`).
const MAX_SET_MEMBERS: usize = 100_000;

/// The message a HELLO refused for want of the engine carries (with `Overloaded`).
const UNAVAILABLE: &str = super::UNAVAILABLE;

/// A user whose notice channel this worker watches.
#[derive(Debug, Default)]
struct Watch {
    /// The user's rooms and blocks were read since the channel was subscribed.
    loaded: bool,
    /// HELLOs waiting for that read.
    parked: Vec<(Token, Hello)>,
    /// HELLOs whose claim ([`EngineCmd::Claim`]) is in flight.
    claiming: usize,
}

/// A HELLO waiting for its claim of one more connection of the user.
#[derive(Debug)]
struct Claim {
    token: Token,
    hello: Hello,
    user: Text,
}

/// Who waits for a membership change.
#[derive(Debug)]
enum Requester {
    /// A server-API member call (a batch of changes, answered once all are done).
    Api { batch: u64 },
    /// A phone's SUBSCRIBE (refusals go back to it) or UNSUBSCRIBE (nobody).
    Client { origin: Option<Origin> },
}

#[derive(Debug)]
struct PendingChange {
    room: RoomName,
    user: Text,
    requester: Requester,
}

/// A server-API member call waiting for its changes.
#[derive(Debug)]
struct Batch {
    reply: ReplyTo,
    room: RoomName,
    waiting: usize,
    failed: bool,
    added: Vec<Text>,
    removed: Vec<Text>,
    refused: Vec<(Text, String)>,
}

/// One worker's membership state in a cluster.
#[derive(Debug, Default)]
pub(in crate::core) struct MembersSide {
    watched: HashMap<Text, Watch>,
    pending: HashMap<u64, PendingChange>,
    batches: HashMap<u64, Batch>,
    kicks: HashMap<u64, ReplyTo>,
    /// Replacing member calls waiting for the room's members: answer, room, users wanted.
    sets: HashMap<u64, (ReplyTo, RoomName, Vec<Text>)>,
    /// HELLOs waiting for their claim, by ticket.
    claims: HashMap<u64, Claim>,
    /// Connections whose claim was granted, their HELLO running again.
    claimed: HashSet<Token>,
    /// Claimed connections closed this loop tick, per user (one write per user and tick).
    releases: HashMap<Text, u32>,
    /// Server-API lookups waiting for the engine, by ticket.
    lookups: HashMap<u64, ReplyTo>,
}

impl Core {
    fn members_side(&mut self) -> Option<&mut MembersSide> {
        Some(&mut self.cluster.as_deref_mut()?.members)
    }

    fn next_member_ticket(&mut self) -> u64 {
        let Some(side) = self.cluster.as_deref_mut() else {
            return 0;
        };
        side.next_ticket += 1;
        side.next_ticket
    }

    /// Queues `cmd` for this worker's engine.
    pub(in crate::core) fn push_engine(&mut self, cmd: EngineCmd) {
        if let Some(side) = self.cluster.as_deref_mut() {
            side.out.push(cmd);
        }
    }

    /// A HELLO of `user` passes once this worker holds the user's rooms from the engine
    /// and the engine counted the connection against `limits.max_connections_per_user`
    /// on every node together (its claim, `cluster/presence.rs`); until then it waits
    /// (`None`), and the user's channel is watched.
    pub(in crate::core) fn cluster_hello_gate(
        &mut self,
        token: Token,
        hello: Hello,
        user: &str,
    ) -> Option<Hello> {
        let max_conns = self.config.limits.max_connections_per_user;
        let (max_rooms, max_blocks) = (
            self.config.limits.max_rooms_per_user,
            self.config.limits.max_blocked_per_user,
        );
        let Some(side) = self.members_side() else {
            return Some(hello);
        };
        if side.claimed.remove(&token) {
            return Some(hello);
        }
        let new = !side.watched.contains_key(user);
        if new {
            // The user's rooms, once read, stay in this node's directory while this worker
            // watches them (`release`).
            self.directory.hold(user);
        }
        let Some(side) = self.members_side() else {
            return Some(hello);
        };
        let watch = side.watched.entry(Text::from(user)).or_default();
        if watch.loaded {
            watch.claiming += 1;
            let ticket = self.next_member_ticket();
            if let Some(side) = self.members_side() {
                let user = Text::from(user);
                side.claims.insert(
                    ticket,
                    Claim {
                        token,
                        hello,
                        user: user.clone(),
                    },
                );
                self.push_engine(EngineCmd::Claim {
                    ticket,
                    user,
                    max: max_conns,
                });
            }
            return None;
        }
        if watch.parked.len() >= max_conns {
            inc(&self.stats.limit_refusals, 1);
            self.fatal(
                token,
                ErrorCode::LimitExceeded,
                format!("the user already holds {max_conns} connections"),
            );
            return None;
        }
        watch.parked.push((token, hello));
        if new {
            self.push_engine(EngineCmd::WatchUser {
                user: Text::from(user),
                max_rooms,
                max_blocks,
            });
        }
        None
    }

    /// A claim was answered: the HELLO runs again (and passes), or is refused as on one
    /// relay past the cap, or `unavailable` without the engine.
    fn on_claimed(&mut self, ticket: u64, outcome: ClaimOutcome) {
        let max_conns = self.config.limits.max_connections_per_user;
        let Some(side) = self.members_side() else {
            return;
        };
        let Some(Claim { token, hello, user }) = side.claims.remove(&ticket) else {
            return;
        };
        if let Some(w) = side.watched.get_mut(&user) {
            w.claiming = w.claiming.saturating_sub(1);
        }
        let waiting = self
            .conn(token)
            .is_some_and(|c| c.phase() == Phase::Handshake);
        match outcome {
            ClaimOutcome::Granted if waiting => {
                if let Some(side) = self.members_side() {
                    side.claimed.insert(token);
                }
                self.on_hello(token, hello);
            }
            // The connection went while its claim was in flight: it counts no more.
            ClaimOutcome::Granted => self.cluster_release(user.as_str()),
            ClaimOutcome::Refused { connections } => {
                if waiting {
                    inc(&self.stats.limit_refusals, 1);
                    let held = DirectoryError::TooManyConnections { max: max_conns };
                    tracing::debug!(%user, connections, "a HELLO past the cap on every node");
                    self.fatal(token, ErrorCode::LimitExceeded, held.to_string());
                }
            }
            ClaimOutcome::Failed => {
                if waiting {
                    self.fatal(token, ErrorCode::Overloaded, UNAVAILABLE.to_owned());
                }
            }
        }
        self.unwatch_if_unused(user.as_str());
    }

    /// A connection of `user` whose claim counted closed (or was refused after it): one
    /// less in the engine, written once per user at the end of the loop tick.
    pub(in crate::core) fn cluster_release(&mut self, user: &str) {
        if let Some(side) = self.members_side() {
            match side.releases.get_mut(user) {
                Some(n) => *n += 1,
                None => {
                    side.releases.insert(Text::from(user), 1);
                }
            }
        }
    }

    /// Hands the loop tick's releases to the engine, one command per user.
    pub(in crate::core) fn flush_releases(&mut self) {
        let Some(side) = self.cluster.as_deref_mut() else {
            return;
        };
        if side.members.releases.is_empty() {
            return;
        }
        for (user, closed) in side.members.releases.drain() {
            side.out.push(EngineCmd::Release { user, closed });
        }
    }

    /// A server-API read from the engine ([`crate::mesh::ControlOp::Lookup`]).
    pub(in crate::core) fn cluster_lookup(&mut self, lookup: Lookup, reply: ReplyTo) {
        let ticket = self.next_member_ticket();
        if let Some(side) = self.members_side() {
            side.lookups.insert(ticket, reply);
        }
        self.push_engine(EngineCmd::Lookup { ticket, lookup });
    }

    /// This worker's last connection of `user` closed: the channel is no longer watched
    /// here, and the node forgets the user's membership if no worker holds a connection.
    pub(in crate::core) fn cluster_user_gone(&mut self, user: &str) {
        let Some(side) = self.members_side() else {
            return;
        };
        if side.watched.get(user).is_some_and(|w| w.claiming > 0) {
            // HELLOs wait for their claims: the user's rooms, read for them, stay.
            return;
        }
        if side.watched.get(user).is_some_and(|w| w.parked.is_empty()) {
            side.watched.remove(user);
            // The unwatch deletes the worker's entry; a release after it would count
            // against a next watch of the user.
            side.releases.remove(user);
            self.push_engine(EngineCmd::UnwatchUser {
                user: Text::from(user),
            });
            // Another worker of this node may watch the user still (a HELLO there waiting
            // for its claim, its rooms read into this node's directory): the directory
            // forgets them only once no worker does.
            self.directory.release(user);
        } else {
            self.directory.forget_if_offline(user);
        }
    }

    /// Stops watching `user` if this worker holds no connection of theirs and no HELLO.
    fn unwatch_if_unused(&mut self, user: &str) {
        if self.users.contains(user) {
            return;
        }
        self.cluster_user_gone(user);
    }

    /// What the engine reports about membership.
    pub(in crate::core) fn on_member_event(&mut self, event: EngineEvent) {
        match event {
            EngineEvent::UserLoaded { user, rooms } => self.on_user_loaded(user.as_str(), rooms),
            EngineEvent::UserLoadFailed { user, over_cap } => {
                self.on_user_load_failed(user.as_str(), over_cap)
            }
            EngineEvent::Notice { user, notice } => self.on_notice(user.as_str(), notice),
            EngineEvent::MembersRead { ticket, members } => self.on_members_read(ticket, members),
            EngineEvent::MemberDone { ticket, outcome } => self.on_member_done(ticket, outcome),
            EngineEvent::MemberFailed { ticket } => self.on_member_failed(ticket),
            EngineEvent::Kicked { ticket, ok } => {
                let Some(reply) = self.members_side().and_then(|s| s.kicks.remove(&ticket)) else {
                    return;
                };
                let answer = if ok {
                    ControlReply::Kicked { connections: 0 }
                } else {
                    ControlReply::Refused(ControlRefusal::Unavailable)
                };
                self.reply(reply, answer);
            }
            EngineEvent::Claimed { ticket, outcome } => self.on_claimed(ticket, outcome),
            EngineEvent::LookedUp { ticket, answer } => {
                let Some(reply) = self.members_side().and_then(|s| s.lookups.remove(&ticket))
                else {
                    return;
                };
                let answer = match answer {
                    Some(found) => ControlReply::LookedUp(found),
                    None => ControlReply::Refused(ControlRefusal::Unavailable),
                };
                self.reply(reply, answer);
            }
            other => tracing::error!(?other, "not a membership event"),
        }
    }

    fn on_user_loaded(&mut self, user: &str, mut engine: UserRooms) {
        // A membership a removal in its room's order already ended here: this read ran
        // before the removal reached the user's side in the engine.
        engine
            .rooms
            .retain(|(room, join)| !self.directory.ended(user, room, join.serial));
        let Some(watch) = self.members_side().and_then(|s| s.watched.get_mut(user)) else {
            return self.directory.forget_if_offline(user);
        };
        watch.loaded = true;
        let claiming = watch.claiming > 0;
        let parked: Vec<(Token, Hello)> = std::mem::take(&mut watch.parked)
            .into_iter()
            .filter(|&(t, _)| self.conn(t).is_some_and(|c| c.phase() == Phase::Handshake))
            .collect();
        // A read for a watch about to end (no connection, no HELLO of the user here any
        // more) is not applied: it may be older than a change another worker of this node
        // applied to their common directory since, and with the watch ended no notice would
        // follow it here to put that back (the workers that keep the user keep it current).
        if self.users.contains(user) || !parked.is_empty() || claiming {
            self.sync_directory(user, &engine);
            self.sync_connections(user, &engine);
        }
        for (token, hello) in parked {
            self.on_hello(token, hello);
        }
        self.unwatch_if_unused(user);
    }

    fn on_user_load_failed(&mut self, user: &str, over_cap: Option<u64>) {
        let Some(watch) = self.members_side().and_then(|s| s.watched.get_mut(user)) else {
            return;
        };
        if watch.loaded {
            // A reread after a resubscription: the cache stands until the next one.
            tracing::warn!(%user, "could not reread a user's rooms from the engine");
            return;
        }
        let parked = std::mem::take(&mut watch.parked);
        for (token, _) in parked {
            match over_cap {
                Some(n) => {
                    inc(&self.stats.limit_refusals, 1);
                    self.fatal(
                        token,
                        ErrorCode::LimitExceeded,
                        format!("the user has {n} rooms or blocks, more than this relay loads"),
                    );
                }
                None => self.fatal(token, ErrorCode::Overloaded, UNAVAILABLE.to_owned()),
            }
        }
        if let Some(side) = self.members_side()
            && side.watched.remove(user).is_some()
        {
            self.directory.release(user);
        }
        self.push_engine(EngineCmd::UnwatchUser {
            user: Text::from(user),
        });
    }

    /// Makes the directory's entry of `user` what the engine holds.
    fn sync_directory(&mut self, user: &str, engine: &UserRooms) {
        let (cached, blocked) = self.directory.snapshot(user);
        let held: HashMap<&RoomName, JoinPoint> =
            engine.rooms.iter().map(|(r, j)| (r, *j)).collect();
        let blocks: HashSet<&RoomName> = engine.blocks.iter().collect();
        for (room, join) in &cached {
            if held.get(room) != Some(join) {
                self.directory.remove(user, room, false);
            }
        }
        for room in &blocked {
            if !blocks.contains(room) {
                // Unblocked meanwhile: `add` unblocks; the membership goes unless held.
                let _ = self.directory.add(
                    user,
                    room,
                    JoinPoint {
                        epoch: 0,
                        seq: 0,
                        serial: 0,
                    },
                    true,
                );
                self.directory.remove(user, room, false);
            }
        }
        for room in &engine.blocks {
            self.directory.remove(user, room, true);
        }
        for (room, join) in &engine.rooms {
            let _ = self.directory.add(user, room, *join, true);
        }
    }

    /// Makes this worker's connections of `user` bind what the engine holds: bindings of
    /// memberships that ended go (LEFT removed), memberships not bound yet are bound.
    fn sync_connections(&mut self, user: &str, engine: &UserRooms) {
        let held: HashMap<&RoomName, u64> =
            engine.rooms.iter().map(|(r, j)| (r, j.serial)).collect();
        let tokens = self.tokens_of(user);
        for token in tokens {
            let Some(conn) = self.conn(token) else {
                continue;
            };
            let ended: Vec<u32> = conn
                .subs
                .iter()
                .enumerate()
                .filter_map(|(alias, sub)| {
                    let sub = sub.as_ref()?;
                    (held.get(&sub.room) != Some(&sub.membership)).then_some(alias as u32)
                })
                .collect();
            for alias in ended {
                self.unbind(token, alias, LeftReason::Removed);
            }
        }
        let handle = UserName::from(user);
        for (room, join) in &engine.rooms {
            self.on_member_joined(room.clone(), handle.clone(), *join);
        }
    }

    fn on_notice(&mut self, user: &str, notice: Notice) {
        match notice {
            Notice::Joined { room, join } => {
                if self.directory.ended(user, &room, join.serial) {
                    // Heard after its removal's place in the room's order was applied
                    // here (two connections, or two shards): old news.
                    return;
                }
                match self.directory.join_point(user, &room) {
                    Some(j) if j == join => {}
                    // A later membership is in force (a room numbers its memberships in
                    // order): this notice was heard here after another worker of the node
                    // applied the later one to their common directory. Old news.
                    Some(later) if later.serial > join.serial => return,
                    Some(old) => {
                        // Ended (and remembered so: see `Notice::Left`).
                        self.directory.end(user, &room, old.serial);
                        self.on_member_left(
                            room.clone(),
                            UserName::from(user),
                            LeftReason::Removed,
                            old.serial,
                        );
                    }
                    None => {}
                }
                // The directory's handle, as the workers' messages carry it.
                let handle = match self.directory.add(user, &room, join, true) {
                    Ok(added) => added.user,
                    Err(_) => UserName::from(user),
                };
                self.on_member_joined(room, handle, join);
            }
            Notice::Left {
                room,
                join,
                reason,
                blocked,
            } => {
                // About a membership other than the one in force (a later one began: a
                // notice held behind a read of the user that showed it, or one heard late):
                // old news, which must not end the later membership. Serial 0: only a block.
                let current = self.directory.join_point(user, &room);
                if join.serial != 0 && current.is_some_and(|c| c.serial != join.serial) {
                    return;
                }
                if join.serial != 0 {
                    // Remembered as ended, so that its JOINED notice, heard late by another
                    // worker of this node watching the user, cannot bring it back.
                    self.directory.end(user, &room, join.serial);
                }
                self.directory.remove(user, &room, blocked);
                self.on_member_left(room, UserName::from(user), reason, join.serial);
            }
            Notice::Kick => {
                self.kick_local(user);
            }
        }
    }

    /// A phone's SUBSCRIBE (or an unblocking join) at the room's owner: the engine joins the
    /// user; refusals go back to the phone, the binding comes with the notice.
    pub(in crate::core) fn cluster_join(
        &mut self,
        room: RoomName,
        user: Text,
        unblock: bool,
        origin: Option<Origin>,
    ) {
        self.send_member_change(
            room,
            user,
            Requester::Client { origin },
            Some(unblock),
            None,
        );
    }

    /// A phone's UNSUBSCRIBE at the room's owner: the engine ends the membership (and
    /// blocks the channel); the notice unbinds the user's connections.
    pub(in crate::core) fn cluster_leave(
        &mut self,
        room: RoomName,
        user: Text,
        block: bool,
        reason: LeftReason,
    ) {
        self.send_member_change(
            room,
            user,
            Requester::Client { origin: None },
            None,
            Some((block, reason)),
        );
    }

    /// The server API's member call at the room's owner (the room is open): every change
    /// goes to the engine; the answer comes once all are done. A replacing call (`set`)
    /// first reads the room's members from the engine (changes made through other nodes
    /// are not in this owner's member set).
    pub(in crate::core) fn cluster_members(
        &mut self,
        room: RoomName,
        add: Vec<Text>,
        remove: Vec<Text>,
        set: bool,
        reply: ReplyTo,
    ) {
        if set {
            let ticket = self.next_member_ticket();
            if let Some(side) = self.members_side() {
                side.sets.insert(ticket, (reply, room.clone(), add));
            }
            return self.push_engine(EngineCmd::ReadMembers {
                ticket,
                room,
                max: MAX_SET_MEMBERS,
            });
        }
        self.run_member_batch(room, add, remove, reply);
    }

    /// A replacing member call's read of the room's members came back: the owner's member
    /// set becomes what the engine holds, and the difference is applied.
    fn on_members_read(&mut self, ticket: u64, members: Result<Vec<Text>, Option<u64>>) {
        let Some((reply, room, wanted)) = self.members_side().and_then(|s| s.sets.remove(&ticket))
        else {
            return;
        };
        let current = match members {
            Ok(current) => current,
            Err(Some(members)) => {
                let why = ControlRefusal::TooManyMembers {
                    members,
                    max: MAX_SET_MEMBERS,
                };
                return self.reply(reply, ControlReply::Refused(why));
            }
            Err(None) => {
                return self.reply(reply, ControlReply::Refused(ControlRefusal::Unavailable));
            }
        };
        let current: HashSet<Text> = current.into_iter().collect();
        if let Some(owned) = self.owned.get_mut(&room) {
            owned.members = super::super::members::MemberSet::default();
            for user in &current {
                owned.members.insert(user.clone());
            }
        }
        let wanted: HashSet<Text> = wanted.into_iter().collect();
        let add = wanted.difference(&current).cloned().collect();
        let remove = current.difference(&wanted).cloned().collect();
        self.run_member_batch(room, add, remove, reply);
    }

    fn run_member_batch(
        &mut self,
        room: RoomName,
        add: Vec<Text>,
        remove: Vec<Text>,
        reply: ReplyTo,
    ) {
        let batch = self.next_member_ticket();
        let waiting = add.len() + remove.len();
        if waiting == 0 {
            let count = self.owned.get(&room).map_or(0, |o| o.members.len());
            return self.reply(
                reply,
                ControlReply::Members {
                    added: Vec::new(),
                    removed: Vec::new(),
                    refused: Vec::new(),
                    count,
                },
            );
        }
        if let Some(side) = self.members_side() {
            side.batches.insert(
                batch,
                Batch {
                    reply,
                    room: room.clone(),
                    waiting,
                    failed: false,
                    added: Vec::new(),
                    removed: Vec::new(),
                    refused: Vec::new(),
                },
            );
        }
        for user in remove {
            let requester = Requester::Api { batch };
            let leave = Some((false, LeftReason::Removed));
            self.send_member_change(room.clone(), user, requester, None, leave);
        }
        for user in add {
            let requester = Requester::Api { batch };
            self.send_member_change(room.clone(), user, requester, Some(false), None);
        }
    }

    /// The server API's disconnect: a kick notice for every node.
    pub(in crate::core) fn cluster_kick(&mut self, user: Text, reply: ReplyTo) {
        let ticket = self.next_member_ticket();
        if let Some(side) = self.members_side() {
            side.kicks.insert(ticket, reply);
        }
        self.push_engine(EngineCmd::Kick { ticket, user });
    }

    fn send_member_change(
        &mut self,
        room: RoomName,
        user: Text,
        requester: Requester,
        join: Option<bool>,
        leave: Option<(bool, LeftReason)>,
    ) {
        let change = match (join, leave) {
            (Some(unblock), _) => {
                // A fresh epoch even when this worker owns the room: the hint is taken
                // only where the engine holds no epoch of the room (it lost the room), and
                // the room's sequences start again there, so the owner's epoch would give
                // them again under the same epoch, and every node would drop them as
                // already delivered.
                MemberChange::Join {
                    epoch_hint: self.fresh_epoch(),
                    serial: self.fresh_serial(),
                    unblock,
                    max_rooms: self.config.limits.max_rooms_per_user,
                }
            }
            (None, Some((block, reason))) => MemberChange::Leave {
                block,
                reason,
                max_blocks: self.config.limits.max_blocked_per_user,
                // A removal placed in the room's stream sets its history to expire as a
                // publish does (removals are few: each one sets it).
                expire_ms: self.history_span(&room).and_then(history_expiry::expiry_ms),
            },
            (None, None) => return,
        };
        let ticket = self.next_member_ticket();
        self.push_engine(EngineCmd::Member(MemberRequest {
            ticket,
            room: room.clone(),
            user: user.clone(),
            change,
        }));
        if let Some(side) = self.members_side() {
            side.pending.insert(
                ticket,
                PendingChange {
                    room,
                    user,
                    requester,
                },
            );
        }
    }

    fn on_member_done(&mut self, ticket: u64, outcome: MemberOutcome) {
        let Some(p) = self.members_side().and_then(|s| s.pending.remove(&ticket)) else {
            return;
        };
        let PendingChange {
            room,
            user,
            requester,
        } = p;
        let api_result = match outcome {
            MemberOutcome::Joined { new, .. } => {
                if let Some(owned) = self.owned.get_mut(&room) {
                    owned.members.insert(user.clone());
                }
                new.then_some(Ok(true))
            }
            MemberOutcome::JoinRefused { blocked } => {
                self.note_if_unused(&room);
                let e = if blocked {
                    DirectoryError::Blocked(room.name.to_string())
                } else {
                    inc(&self.stats.limit_refusals, 1);
                    DirectoryError::TooManyRooms {
                        max: self.config.limits.max_rooms_per_user,
                    }
                };
                if let Requester::Client {
                    origin: Some(origin),
                } = requester
                {
                    let message = format!("{}: {e}", room.name);
                    self.refuse_origin(origin, super::super::join_refusal_code(&e), message);
                }
                Some(Err(e.to_string()))
            }
            MemberOutcome::Left { was, block_refused } => {
                if block_refused {
                    inc(&self.stats.limit_refusals, 1);
                }
                if let Some(owned) = self.owned.get_mut(&room) {
                    owned.members.remove(user.as_str());
                }
                self.forget_markers(&room, user.as_str());
                self.note_if_unused(&room);
                was.then_some(Ok(false))
            }
        };
        if let Requester::Api { batch } = requester {
            self.batch_step(batch, user, api_result, false);
        }
    }

    fn on_member_failed(&mut self, ticket: u64) {
        let Some(p) = self.members_side().and_then(|s| s.pending.remove(&ticket)) else {
            return;
        };
        match p.requester {
            Requester::Api { batch } => self.batch_step(batch, p.user, None, true),
            Requester::Client {
                origin: Some(origin),
            } => self.refuse_origin(origin, ErrorCode::Overloaded, UNAVAILABLE.to_owned()),
            Requester::Client { origin: None } => {
                tracing::warn!(user = %p.user, room = %p.room.name, "a leave did not reach the engine");
            }
        }
    }

    /// One change of a server-API batch is done: `Ok(true)` added, `Ok(false)` removed,
    /// `Err` refused, `None` nothing changed; `failed`: it did not reach the engine.
    fn batch_step(
        &mut self,
        batch: u64,
        user: Text,
        result: Option<Result<bool, String>>,
        failed: bool,
    ) {
        let Some(side) = self.members_side() else {
            return;
        };
        let Some(b) = side.batches.get_mut(&batch) else {
            return;
        };
        b.failed |= failed;
        match result {
            Some(Ok(true)) => b.added.push(user),
            Some(Ok(false)) => b.removed.push(user),
            Some(Err(why)) => b.refused.push((user, why)),
            None => {}
        }
        b.waiting -= 1;
        if b.waiting > 0 {
            return;
        }
        let Some(b) = side.batches.remove(&batch) else {
            return;
        };
        let answer = if b.failed {
            // Some changes may be done, some not: a retry (idempotent) completes them.
            ControlReply::Refused(ControlRefusal::Unavailable)
        } else {
            ControlReply::Members {
                added: b.added,
                removed: b.removed,
                refused: b.refused,
                count: self.owned.get(&b.room).map_or(0, |o| o.members.len()),
            }
        };
        self.reply(b.reply, answer);
    }
}
