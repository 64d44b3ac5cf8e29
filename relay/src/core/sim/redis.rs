//! The cluster's engine as the simulation plays it: one Redis holding each room's epoch,
//! head, capped stream, window of repeat keys and channel, and for each node's worker what
//! its engine (`cluster/engine.rs`) has on its two connections: commands written and not yet
//! run, answers on their way back, subscriptions written, pushes on their way back. The
//! scheduler in `mod.rs` picks which of them moves next, and when a connection is lost, a
//! message leaves the stream, or a node dies.
//!
//! What it holds to, as Redis and the engine do: commands of one connection run in the order
//! written and are answered in that order; pushes of one connection arrive in the order
//! Redis sent them; the two connections keep no order between them. A lost command
//! connection fails the publishes on it (whether or not Redis ran them), and its opens and
//! stream reads go again on the next one; a lost pub/sub connection loses what was on its
//! way, its subscriptions, and a re-established one subscribes every channel again, then
//! tells the owner (`Resubscribed`) for every channel it had opened. A subscription is
//! confirmed before the room's open is written, so a message can be heard before the open's
//! answer. The stream is trimmed to the last `stream_max_len` entries (the strictest
//! `MAXLEN ~` could leave), and repeat keys of the last `window` sequences always answer.
//! This Redis loses no write, and fails a run whose owner raises, or names a head, past a
//! room's sequence; with `lose_writes` on it may lose a room's last writes in a failover,
//! and `RAISE` and a publish's owner head move the sequence up (`lossy.rs` holds that
//! model).
//!
//! Owns: test scaffolding only. Must not touch: anything outside tests.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use bytes::Bytes;
use pabal_codec::Text;

use crate::cluster::copies::Copies;
use crate::cluster::membership::{Notice, UserRooms};
use crate::cluster::{
    ClaimOutcome, EngineCmd, EngineEvent, EngineMessage, FillPage, MemberChange, MemberOutcome,
    RemovalMark, RepeatKey,
};
use crate::directory::JoinPoint;
use crate::ids::RoomName;

use super::lossy::{Losses, Reuse, raise_to};

/// The epoch of the simulation's rooms, as the engine holds them from the start (every
/// user's join point names it).
pub(super) const EPOCH: u64 = 1_767_225_600_000;

/// One run of a node: a restarted node is a new run, and no ticket of an earlier run is its.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Origin {
    node: usize,
    run: u64,
}

/// One stream entry.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    seq: u64,
    ts_ms: u64,
    origin: Origin,
    ticket: u64,
    sender: Text,
    payload: Bytes,
}

/// One stream entry: a message (id `<seq>-0`), or a removal placed after message `seq`
/// (id `<seq>-<sub>`).
#[derive(Debug, Clone)]
pub(super) enum Item {
    Msg(Entry),
    Mark(RemovalMark),
}

impl Item {
    /// Its stream id.
    pub(super) fn place(&self) -> (u64, u64) {
        match self {
            Item::Msg(e) => (e.seq, 0),
            Item::Mark(m) => m.place(),
        }
    }
}

/// One room as Redis holds it.
pub(super) struct Room {
    pub(super) name: RoomName,
    pub(super) head: u64,
    pub(super) stream: VecDeque<Item>,
    /// Every body ever sequenced, by sequence (index `seq - 1`): the truth phones are
    /// checked against, retention or not (a lost write's too, until its sequence is given
    /// again: `lossy.rs`).
    pub(super) bodies: Vec<Bytes>,
    /// Sequences `1..=trimmed` have left the stream.
    pub(super) trimmed: u64,
    /// Repeat key -> its sequence.
    pub(super) window: HashMap<(u8, u64, u64), u64>,
    /// What a failover that lost writes left (`lossy.rs`).
    pub(super) losses: Losses,
    /// Nodes whose pub/sub connection subscribes the room's channel.
    subscribers: BTreeSet<usize>,
    /// The last membership serial the room gave (`ROOM_JOIN`'s `j`).
    serial: u64,
    /// The room's last removals (`ROOM_LEAVE`'s sorted set, which `OPEN` returns).
    removals: VecDeque<RemovalMark>,
}

/// A command on a node's command connection, as Redis will run it.
#[derive(Debug)]
enum Written {
    Cmd(EngineCmd),
    /// The open's read, written once its channel's subscription was confirmed.
    Open {
        room: RoomName,
        tail: u64,
    },
    /// A watched user's rooms, read again after the user's channel was subscribed again.
    Load {
        user: Text,
    },
}

#[derive(Debug)]
enum SubWritten {
    Subscribe(RoomName),
    Unsubscribe(RoomName),
    /// A user's notice channel.
    SubscribeUser(Text),
    UnsubscribeUser(Text),
}

#[derive(Debug)]
enum Push {
    Message(RoomName, Entry),
    Removal(RoomName, RemovalMark),
    Confirmed(RoomName),
    /// A notice on a user's channel.
    Notice(Text, Notice),
    /// A user's channel is subscribed: the user is read next.
    UserConfirmed(Text),
}

/// A membership change as Redis ran it: the user, the room, and the join point that began
/// (`Ok`) or the head at which the membership ended (`Err`).
pub(super) type MembershipChange = (Text, u64, Result<JoinPoint, u64>);

/// One channel as a node's engine holds it.
#[derive(Debug, Default)]
struct Channel {
    subscribed: bool,
    /// Its subscription is written and not yet confirmed.
    subscribing: bool,
    /// Its open's read was written at least once (a later confirmation is a
    /// resubscription).
    opened: bool,
    /// Opens waiting for the subscription (or the command connection): their tail lengths.
    opens: Vec<u64>,
}

/// One node's engine and connections.
#[derive(Default)]
struct Node {
    run: u64,
    cmd_up: bool,
    sub_up: bool,
    /// In order: commands written, each with Redis' answer once it ran (the answered ones
    /// are a prefix).
    inflight: VecDeque<(Written, Option<EngineEvent>)>,
    sub_out: VecDeque<SubWritten>,
    pushes: VecDeque<Push>,
    channels: BTreeMap<u64, (RoomName, Channel)>,
    /// Stream reads waiting for the command connection.
    reads_waiting: Vec<EngineCmd>,
    watched: BTreeSet<Text>,
    /// Users whose channel Redis holds subscribed on the node's pub/sub connection.
    user_subs: BTreeSet<Text>,
    /// Users whose read failed for want of the command connection: read again when it is
    /// back.
    reads_due: BTreeSet<Text>,
    /// Reads of a user's rooms out, and the notices heard meanwhile (they follow the read's
    /// answer, as the engine holds them).
    loads: BTreeMap<Text, (u32, Vec<Notice>)>,
    /// The engine's answered publishes and their copies (`cluster/copies.rs`, the
    /// engine's own): an answer reaches the worker once its copy was read.
    copies: Copies,
}

/// What can go wrong, chosen by the scheduler.
#[derive(Debug, Clone, Copy)]
pub(super) enum Fault {
    LoseCommands,
    LosePubSub,
    /// One message push of a room's channel lost while a later one of the room follows it
    /// (the owner sees the jump). A removal's push is never lost alone: Redis loses pushes
    /// only with their connection (`LosePubSub`), and a lost removal reveals no jump.
    DropPush,
    /// The answers waiting for their copies wait too long and go to the worker unordered
    /// (`copies.rs`, `COPY_WAIT`).
    CopiesLate,
    /// Redis loses the last `k` writes of room `room` (by index) and fails over: every
    /// node loses both connections (`lossy.rs`; only with `Engine::lose_writes`).
    LoseWrites {
        room: usize,
        k: u64,
    },
}

/// The model Redis and every node's engine.
pub(super) struct Engine {
    pub(super) rooms: Vec<Room>,
    /// (user, room id) -> the membership in force.
    members: HashMap<(Text, u64), JoinPoint>,
    /// Membership changes run since the scheduler last took them.
    pub(super) changes: Vec<MembershipChange>,
    nodes: Vec<Node>,
    stream_max_len: usize,
    fill_batch: usize,
    /// Redis may lose its last writes (`Fault::LoseWrites`), and `RAISE` and a publish's
    /// owner head move a room's sequence up for real (`lossy.rs`). Off, this Redis loses
    /// no write, and a raise or owner head past a room's sequence fails the run.
    pub(super) lose_writes: bool,
    /// Fault injection (with `lose_writes`): `RAISE` does nothing and a publish ignores
    /// its owner's head (Redis before the relay handled lost writes).
    pub(super) raise_ignored: bool,
    /// Publishes given a sequence a lost write had (`lossy.rs`), since the scheduler last
    /// took them.
    pub(super) reused: Vec<Reuse>,
    /// Removals placed at a room's sequence while a lost write's sequence is above it
    /// (`lossy.rs`): `(room id, user, place's sequence)`, since the scheduler last took
    /// them.
    pub(super) placed_below_lost: Vec<(u64, Text, u64)>,
    /// Fault injection: a re-established subscription does not tell the owner to read
    /// what it missed (what the engine would be without `Resubscribed`).
    pub(super) forget_resubscribed: bool,
    /// Fault injection: notices heard while a read of the user's rooms is out are handed
    /// over at once, before the read's answer (what the engine was before it held them).
    pub(super) notices_before_loads: bool,
    /// Fault injection: a publish's answer is handed over at once, ordered, before its
    /// copy (and what the channel carried before it) is read (the engine before it held
    /// answers for their copies).
    pub(super) answers_before_copies: bool,
    /// The model's clock for the engines' held answers (`Copies` waits in time).
    clock: std::time::Instant,
    /// `cluster.ordered_removals`: a removal is placed in its room's order.
    pub(super) ordered_removals: bool,
    /// Events an engine reports without Redis (a publish with no connection to go on, a
    /// subscription confirmed): `(node, event)`, handed over by the scheduler.
    pub(super) immediate: Vec<(usize, EngineEvent)>,
}

fn repeat_key(key: &RepeatKey) -> (u8, u64, u64) {
    match key {
        RepeatKey::Device { publisher, msg_id } => (0, *publisher, *msg_id),
        RepeatKey::Api(k) => {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            k.hash(&mut h);
            (1, h.finish(), 0)
        }
    }
}

impl Engine {
    /// Every one of `users` a member of every room from its first sequence.
    pub(super) fn new(
        rooms: &[RoomName],
        users: &[Text],
        nodes: usize,
        stream_max_len: usize,
        fill_batch: usize,
    ) -> Self {
        let from_the_start = JoinPoint {
            epoch: EPOCH,
            seq: 0,
            serial: 1,
        };
        Engine {
            members: users
                .iter()
                .flat_map(|u| {
                    rooms
                        .iter()
                        .map(move |r| ((u.clone(), r.id), from_the_start))
                })
                .collect(),
            changes: Vec::new(),
            rooms: rooms
                .iter()
                .map(|name| Room {
                    name: name.clone(),
                    head: 0,
                    stream: VecDeque::new(),
                    bodies: Vec::new(),
                    trimmed: 0,
                    window: HashMap::new(),
                    subscribers: BTreeSet::new(),
                    serial: 1,
                    removals: VecDeque::new(),
                    losses: Losses::default(),
                })
                .collect(),
            nodes: (0..nodes)
                .map(|_| Node {
                    cmd_up: true,
                    sub_up: true,
                    ..Node::default()
                })
                .collect(),
            stream_max_len,
            fill_batch,
            lose_writes: false,
            raise_ignored: false,
            reused: Vec::new(),
            placed_below_lost: Vec::new(),
            forget_resubscribed: false,
            notices_before_loads: false,
            answers_before_copies: false,
            ordered_removals: true,
            clock: std::time::Instant::now(),
            immediate: Vec::new(),
        }
    }

    pub(super) fn room(&self, id: u64) -> &Room {
        self.rooms
            .iter()
            .find(|r| r.name.id == id)
            .expect("a room of the simulation")
    }

    pub(super) fn room_mut(&mut self, id: u64) -> &mut Room {
        self.rooms
            .iter_mut()
            .find(|r| r.name.id == id)
            .expect("a room of the simulation")
    }

    /// The body Redis sequenced as `seq` of the room, whether or not the stream still
    /// holds it.
    pub(super) fn body(&self, room_id: u64, seq: u64) -> Option<Bytes> {
        let room = self.rooms.iter().find(|r| r.name.id == room_id)?;
        room.bodies
            .get(usize::try_from(seq).ok()?.checked_sub(1)?)
            .cloned()
    }

    pub(super) fn nodes_len(&self) -> usize {
        self.nodes.len()
    }

    pub(super) fn head(&self, room_id: u64) -> u64 {
        self.room(room_id).head
    }

    /// Sequences `1..=trimmed(room)` have left the stream.
    pub(super) fn trimmed(&self, room_id: u64) -> u64 {
        self.room(room_id).trimmed
    }

    /// Every body of every room, by room: (room name, bodies by sequence).
    pub(super) fn all_bodies(&self) -> impl Iterator<Item = (&RoomName, &[Bytes])> {
        self.rooms.iter().map(|r| (&r.name, &r.bodies[..]))
    }

    /// Whether `user` is a member of the room now.
    pub(super) fn is_member(&self, user: &Text, room_id: u64) -> bool {
        self.members.contains_key(&(user.clone(), room_id))
    }

    /// The user's rooms as the engine holds them.
    fn user_rooms(&self, user: &Text) -> UserRooms {
        UserRooms {
            rooms: self
                .rooms
                .iter()
                .filter_map(|r| {
                    let join = self.members.get(&(user.clone(), r.name.id))?;
                    Some((r.name.clone(), *join))
                })
                .collect(),
            blocks: Vec::new(),
        }
    }

    /// Runs a membership change (both of its scripts at once) and publishes its notice on
    /// the user's channel.
    fn change_member(&mut self, req: &crate::cluster::MemberRequest) -> EngineEvent {
        let key = (req.user.clone(), req.room.id);
        let head = self.room(req.room.id).head;
        let (outcome, notice) = match req.change {
            MemberChange::Join { serial, .. } => match self.members.get(&key) {
                Some(&join) => (MemberOutcome::Joined { new: false, join }, None),
                None => {
                    let room = self.room_mut(req.room.id);
                    room.losses.changed(head);
                    room.serial = (room.serial + 1).max(serial);
                    let join = JoinPoint {
                        epoch: EPOCH,
                        seq: head,
                        serial: room.serial,
                    };
                    self.members.insert(key, join);
                    self.changes.push((req.user.clone(), req.room.id, Ok(join)));
                    let room = req.room.clone();
                    (
                        MemberOutcome::Joined { new: true, join },
                        Some(Notice::Joined { room, join }),
                    )
                }
            },
            MemberChange::Leave { reason, block, .. } => match self.members.remove(&key) {
                Some(join) => {
                    self.room_mut(req.room.id).losses.changed(head);
                    self.changes
                        .push((req.user.clone(), req.room.id, Err(head)));
                    if !block && !req.room.channel && self.ordered_removals {
                        self.place_removal(req.room.id, &req.user, join, reason);
                    }
                    let notice = Notice::Left {
                        room: req.room.clone(),
                        join,
                        reason,
                        blocked: false,
                    };
                    let outcome = MemberOutcome::Left {
                        was: true,
                        block_refused: false,
                    };
                    (outcome, Some(notice))
                }
                None => {
                    let outcome = MemberOutcome::Left {
                        was: false,
                        block_refused: false,
                    };
                    (outcome, None)
                }
            },
        };
        if let Some(notice) = notice {
            for n in self.nodes.iter_mut().filter(|n| n.sub_up) {
                if n.user_subs.contains(&req.user) {
                    n.pushes
                        .push_back(Push::Notice(req.user.clone(), notice.clone()));
                }
            }
        }
        EngineEvent::MemberDone {
            ticket: req.ticket,
            outcome,
        }
    }

    /// `ROOM_LEAVE`'s mark: a removal entry after the room's head, and its push to every
    /// subscriber of the room's channel.
    fn place_removal(
        &mut self,
        room_id: u64,
        user: &Text,
        join: JoinPoint,
        reason: pabal_codec::LeftReason,
    ) {
        let lose_writes = self.lose_writes;
        let room = self.room_mut(room_id);
        let head = room.head;
        if lose_writes && room.bodies.len() as u64 > head {
            self.placed_below_lost.push((room_id, user.clone(), head));
        }
        let room = self.room_mut(room_id);
        let sub = match room.stream.back().map(Item::place) {
            Some((seq, sub)) if seq == head => sub + 1,
            _ => 1,
        };
        let mark = RemovalMark {
            seq: head,
            sub,
            user: user.clone(),
            join,
            reason,
        };
        room.stream.push_back(Item::Mark(mark.clone()));
        room.removals.push_back(mark.clone());
        if room.removals.len() > crate::cluster::membership::REMOVALS_KEPT {
            room.removals.pop_front();
        }
        let (name, subscribers) = (room.name.clone(), room.subscribers.clone());
        for s in subscribers {
            self.nodes[s]
                .pushes
                .push_back(Push::Removal(name.clone(), mark.clone()));
        }
    }

    // ---- what a node's worker hands its engine -------------------------------------------

    /// The worker of `node` hands its engine a command.
    pub(super) fn submit(&mut self, node: usize, cmd: EngineCmd) {
        if let EngineCmd::Raise { room, epoch, head } = &cmd {
            // Run at once, answering nothing (`script::RAISE`): without lost writes, a
            // room's sequence is never below an owner's head, and a raise changes nothing.
            if self.lose_writes {
                self.raise(room.id, *epoch, *head);
            } else {
                no_write_lost(room, *head, self.room(room.id).head);
            }
            return;
        }
        let n = &mut self.nodes[node];
        match cmd {
            EngineCmd::Open { room, tail, .. } => {
                let sub_up = n.sub_up;
                let (_, c) = n
                    .channels
                    .entry(room.id)
                    .or_insert_with(|| (room.clone(), Channel::default()));
                c.opens.push(tail);
                let subscribed = c.subscribed;
                // An idle channel is subscribed; its opens wait for the confirmation.
                let subscribe = !subscribed && !c.subscribing && sub_up;
                c.subscribing |= subscribe;
                if subscribed {
                    self.send_opens(node, room.id);
                } else if subscribe {
                    n.sub_out.push_back(SubWritten::Subscribe(room));
                }
            }
            EngineCmd::Close { room } => {
                if n.channels.remove(&room.id).is_some() && n.sub_up {
                    n.sub_out.push_back(SubWritten::Unsubscribe(room));
                }
            }
            EngineCmd::Publish(req) if !n.cmd_up => {
                self.immediate
                    .push((node, EngineEvent::PublishFailed { ticket: req.ticket }));
            }
            cmd @ (EngineCmd::Fill { .. } | EngineCmd::Read { .. }) if !n.cmd_up => {
                n.reads_waiting.push(cmd);
            }
            // The user's channel is subscribed, then the user read (after the confirmation:
            // a change after the read comes as a notice).
            EngineCmd::WatchUser { user, .. } => {
                n.watched.insert(user.clone());
                if n.sub_up {
                    n.sub_out.push_back(SubWritten::SubscribeUser(user));
                } else if !n.cmd_up {
                    let failed = EngineEvent::UserLoadFailed {
                        user,
                        over_cap: None,
                    };
                    self.immediate.push((node, failed));
                }
            }
            EngineCmd::UnwatchUser { user } => {
                n.watched.remove(&user);
                n.loads.remove(&user);
                if n.sub_up {
                    n.sub_out.push_back(SubWritten::UnsubscribeUser(user));
                }
            }
            // Markers moved (the simulation's phones read no receipts) and connections
            // released: nothing a phone here sees.
            EngineCmd::Markers { .. } | EngineCmd::Release { .. } => {}
            cmd => self.write(node, Written::Cmd(cmd)),
        }
    }

    /// Writes a command on the node's command connection; with none, it fails or waits as
    /// the engine's `give_up` says.
    fn write(&mut self, node: usize, w: Written) {
        if self.nodes[node].cmd_up {
            self.nodes[node].inflight.push_back((w, None));
        } else {
            self.give_up(node, w);
        }
    }

    /// Reads the user's rooms: notices for the user wait for the answer.
    fn write_load(&mut self, node: usize, user: Text) {
        self.nodes[node].loads.entry(user.clone()).or_default().0 += 1;
        self.write(node, Written::Load { user });
    }

    /// A read of the user's rooms was answered or failed: once none is out, the notices
    /// heard meanwhile follow.
    fn load_answered(&mut self, node: usize, user: &Text) -> Vec<EngineEvent> {
        let loads = &mut self.nodes[node].loads;
        let Some((out, held)) = loads.get_mut(user) else {
            return Vec::new();
        };
        *out -= 1;
        if *out > 0 {
            return Vec::new();
        }
        let held = std::mem::take(held);
        loads.remove(user);
        held.into_iter()
            .map(|notice| EngineEvent::Notice {
                user: user.clone(),
                notice,
            })
            .collect()
    }

    /// A command that will get no answer: a publish fails, an open or stream read waits for
    /// the next connection, a user's load or a claim fails.
    fn give_up(&mut self, node: usize, w: Written) {
        let n = &mut self.nodes[node];
        let event = match w {
            Written::Cmd(EngineCmd::Publish(req)) => {
                EngineEvent::PublishFailed { ticket: req.ticket }
            }
            Written::Open { room, tail } => {
                if let Some((_, c)) = n.channels.get_mut(&room.id) {
                    c.opens.push(tail);
                }
                return;
            }
            Written::Cmd(cmd @ (EngineCmd::Fill { .. } | EngineCmd::Read { .. })) => {
                n.reads_waiting.push(cmd);
                return;
            }
            Written::Load { user } => {
                if n.watched.contains(&user) {
                    n.reads_due.insert(user.clone());
                }
                let failed = EngineEvent::UserLoadFailed {
                    user: user.clone(),
                    over_cap: None,
                };
                self.immediate.push((node, failed));
                for notice in self.load_answered(node, &user) {
                    self.immediate.push((node, notice));
                }
                return;
            }
            Written::Cmd(EngineCmd::Claim { ticket, .. }) => EngineEvent::Claimed {
                ticket,
                outcome: ClaimOutcome::Failed,
            },
            Written::Cmd(EngineCmd::Member(req)) => {
                EngineEvent::MemberFailed { ticket: req.ticket }
            }
            // A room's markers, read when it opens: an empty answer changes nothing.
            Written::Cmd(EngineCmd::LoadMarkers { .. }) => return,
            Written::Cmd(other) => panic!("not in this simulation: {other:?}"),
        };
        self.immediate.push((node, event));
    }

    /// The channel's subscription is confirmed: its waiting opens are written (once the
    /// command connection is up).
    fn send_opens(&mut self, node: usize, room_id: u64) {
        if !self.nodes[node].cmd_up {
            return;
        }
        let Some((room, c)) = self.nodes[node].channels.get_mut(&room_id) else {
            return;
        };
        c.opened = true;
        let room = room.clone();
        for tail in std::mem::take(&mut c.opens) {
            self.write(
                node,
                Written::Open {
                    room: room.clone(),
                    tail,
                },
            );
        }
    }

    // ---- Redis ---------------------------------------------------------------------------

    /// The nodes for which `has` holds.
    fn nodes_where(&self, has: impl Fn(&Node) -> bool) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| has(&self.nodes[i]))
            .collect()
    }

    /// Nodes with a command Redis has not run yet.
    pub(super) fn runnable(&self) -> Vec<usize> {
        self.nodes_where(|n| n.inflight.iter().any(|(_, a)| a.is_none()))
    }

    /// Nodes with a subscription change Redis has not run yet.
    pub(super) fn subscribing(&self) -> Vec<usize> {
        self.nodes_where(|n| !n.sub_out.is_empty())
    }

    /// Nodes with an answer on its way.
    pub(super) fn answering(&self) -> Vec<usize> {
        self.nodes_where(|n| n.inflight.front().is_some_and(|(_, a)| a.is_some()))
    }

    /// Nodes with a push on its way.
    pub(super) fn pushing(&self) -> Vec<usize> {
        self.nodes_where(|n| !n.pushes.is_empty())
    }

    /// Nodes with a connection down.
    pub(super) fn down(&self) -> Vec<usize> {
        self.nodes_where(|n| !n.cmd_up || !n.sub_up)
    }

    /// Redis runs the node's next command; returns what it was, for the trace.
    pub(super) fn run_command(&mut self, node: usize) -> Option<String> {
        let i = self.nodes[node]
            .inflight
            .iter()
            .position(|(_, a)| a.is_none())?;
        let (written, _) = self.nodes[node].inflight.remove(i)?;
        let what = format!("{written:?}");
        let answer = self.run(node, &written);
        self.nodes[node].inflight.insert(i, (written, Some(answer)));
        Some(what)
    }

    /// What Redis answers `written` from `node`, having run it.
    fn run(&mut self, node: usize, written: &Written) -> EngineEvent {
        let origin = Origin {
            node,
            run: self.nodes[node].run,
        };
        match written {
            Written::Cmd(EngineCmd::Publish(req)) => {
                let key = req.repeat.as_ref().map(repeat_key);
                let window = req.window.max(1) as u64;
                let (lossy, ignored) = (self.lose_writes, self.raise_ignored);
                let room = self.room_mut(req.room.id);
                // `script::PUBLISH` gives a sequence past the owner's head (raising the
                // room to it first, where Redis lost writes).
                if let Some((EPOCH, head)) = req.owner_head {
                    if !lossy {
                        no_write_lost(&req.room, head, room.head);
                    } else if !ignored {
                        raise_to(room, head);
                    }
                }
                if let Some(&first) = key.as_ref().and_then(|k| room.window.get(k)) {
                    EngineEvent::Published {
                        ticket: req.ticket,
                        epoch: EPOCH,
                        seq: first,
                        repeated: true,
                        ordered: true,
                    }
                } else {
                    room.head += 1;
                    let seq = room.head;
                    if let Some(k) = key {
                        room.window.insert(k, seq);
                    }
                    if seq.is_multiple_of(crate::cluster::script::TRIM_EVERY) {
                        room.window.retain(|_, s| *s + window > seq);
                    }
                    let entry = Entry {
                        seq,
                        ts_ms: req.ts_ms,
                        origin,
                        ticket: req.ticket,
                        sender: req.sender.text(),
                        payload: req.payload.clone(),
                    };
                    // A sequence a lost write had: its body stays the truth until the
                    // scheduler judged who may hold it (`lossy.rs`).
                    let reused = usize::try_from(seq).unwrap() <= room.bodies.len();
                    if !reused {
                        room.bodies.push(req.payload.clone());
                    }
                    room.stream.push_back(Item::Msg(entry.clone()));
                    let (name, subscribers) = (room.name.clone(), room.subscribers.clone());
                    for s in subscribers {
                        self.nodes[s]
                            .pushes
                            .push_back(Push::Message(name.clone(), entry.clone()));
                    }
                    if reused {
                        self.reused.push(Reuse {
                            room: req.room.id,
                            seq,
                            body: req.payload.clone(),
                            owner_head: req.owner_head,
                            node,
                        });
                    }
                    EngineEvent::Published {
                        ticket: req.ticket,
                        epoch: EPOCH,
                        seq,
                        repeated: false,
                        ordered: true,
                    }
                }
            }
            Written::Open { room, tail } => {
                let r = self.room(room.id);
                let from = r.head.saturating_sub(*tail);
                let mut span = self.span(node, room.id, (from, 0), usize::MAX);
                span.marks
                    .extend(self.room(room.id).removals.iter().cloned());
                span.marks.sort_by_key(RemovalMark::place);
                span.marks.dedup_by_key(|m| m.place());
                EngineEvent::Opened {
                    room: room.clone(),
                    epoch: EPOCH,
                    seq: self.room(room.id).head,
                    tail: span.msgs,
                    marks: span.marks,
                }
            }
            Written::Cmd(EngineCmd::Fill { room, after, sub }) => {
                let span = self.fill_span(node, room.id, (*after, *sub));
                EngineEvent::Filled {
                    room: room.clone(),
                    page: FillPage {
                        epoch: EPOCH,
                        room_seq: self.room(room.id).head,
                        after: *after,
                        msgs: span.msgs,
                        marks: span.marks,
                        full: span.entries >= self.fill_batch,
                    },
                }
            }
            Written::Cmd(EngineCmd::Read {
                room,
                after,
                reader,
            }) => {
                let span = self.span(node, room.id, (*after, u64::MAX), self.fill_batch);
                EngineEvent::Read {
                    room: room.clone(),
                    after: *after,
                    reader: *reader,
                    msgs: span.msgs,
                    full: span.entries >= self.fill_batch,
                    last: span.last.max(*after),
                }
            }
            Written::Load { user } => EngineEvent::UserLoaded {
                user: user.clone(),
                rooms: self.user_rooms(user),
            },
            Written::Cmd(EngineCmd::Claim { ticket, .. }) => EngineEvent::Claimed {
                ticket: *ticket,
                outcome: ClaimOutcome::Granted,
            },
            Written::Cmd(EngineCmd::Member(req)) => self.change_member(req),
            Written::Cmd(EngineCmd::LoadMarkers { room }) => EngineEvent::Markers {
                room: room.clone(),
                epoch: EPOCH,
                markers: Vec::new(),
            },
            Written::Cmd(other) => panic!("not in this simulation: {other:?}"),
        }
    }

    /// `FILL`'s page (`script::FILL`): the stream's entries after `after`, at most a
    /// batch, with the room's last removals the stream no longer holds between `after`
    /// and the page's first entry (retention dropped them), as `script::parse_fill`
    /// merges them.
    fn fill_span(
        &self,
        node: usize,
        room_id: u64,
        after: (u64, u64),
    ) -> crate::cluster::script::StreamSpan {
        let mut span = self.span(node, room_id, after, self.fill_batch);
        let room = self.room(room_id);
        let trimmed = room.stream.front().is_none_or(|oldest| {
            let o = oldest.place();
            o > after && o != (after.0, after.1 + 1)
        });
        if trimmed {
            let first = span.first_place();
            span.marks.extend(
                room.removals
                    .iter()
                    .filter(|m| m.seq >= after.0)
                    .take(self.fill_batch)
                    .filter(|m| m.place() > after && m.place() < first)
                    .cloned(),
            );
            span.marks.sort_by_key(RemovalMark::place);
            span.marks.dedup_by_key(|m| m.place());
        }
        span
    }

    /// The stream's entries after the id `after` (exclusive, `XRANGE (<seq>-<sub>`), at
    /// most `max`, as the node's engine reports them (its own run's tickets named).
    fn span(
        &self,
        node: usize,
        room_id: u64,
        after: (u64, u64),
        max: usize,
    ) -> crate::cluster::script::StreamSpan {
        let origin = Origin {
            node,
            run: self.nodes[node].run,
        };
        let mut span = crate::cluster::script::StreamSpan::default();
        for item in self
            .room(room_id)
            .stream
            .iter()
            .filter(|i| i.place() > after)
            .take(max)
        {
            span.entries += 1;
            span.last = item.place().0;
            match item {
                Item::Msg(e) => span.msgs.push(message(e, origin)),
                Item::Mark(m) => span.marks.push(m.clone()),
            }
        }
        span
    }

    /// Redis runs the node's next subscription change.
    pub(super) fn run_subscription(&mut self, node: usize) -> Option<String> {
        let s = self.nodes[node].sub_out.pop_front()?;
        let what = format!("{s:?}");
        match s {
            SubWritten::Subscribe(room) => {
                self.room_mut(room.id).subscribers.insert(node);
                self.nodes[node].pushes.push_back(Push::Confirmed(room));
            }
            SubWritten::Unsubscribe(room) => {
                self.room_mut(room.id).subscribers.remove(&node);
            }
            SubWritten::SubscribeUser(user) => {
                self.nodes[node].user_subs.insert(user.clone());
                self.nodes[node].pushes.push_back(Push::UserConfirmed(user));
            }
            SubWritten::UnsubscribeUser(user) => {
                self.nodes[node].user_subs.remove(&user);
            }
        }
        Some(what)
    }

    /// The node's next answer reaches its engine: what the engine hands its worker.
    pub(super) fn answer(&mut self, node: usize) -> Vec<EngineEvent> {
        let n = &mut self.nodes[node];
        if n.inflight.front().is_none_or(|(_, a)| a.is_none()) {
            return Vec::new();
        }
        let Some((written, Some(answer))) = n.inflight.pop_front() else {
            return Vec::new();
        };
        let mut events = Vec::new();
        match answer {
            EngineEvent::Published {
                ticket, repeated, ..
            } if !self.answers_before_copies => {
                let copies = &mut self.nodes[node].copies;
                if !repeated {
                    copies.answered(ticket);
                }
                copies.ready(ticket, answer, self.clock, &mut events);
            }
            answer => events.push(answer),
        }
        if let Written::Load { user } = &written {
            events.extend(self.load_answered(node, user));
        }
        events
    }

    /// The node's next push reaches its engine: what the engine hands its worker, if
    /// anything.
    pub(super) fn push(&mut self, node: usize) -> Vec<EngineEvent> {
        let origin = Origin {
            node,
            run: self.nodes[node].run,
        };
        let Some(push) = self.nodes[node].pushes.pop_front() else {
            return Vec::new();
        };
        match push {
            Push::Message(room, entry) => {
                let msg = message(&entry, origin);
                let mut events = Vec::new();
                // This engine's own publish whose answer came first: released by it.
                let answered = msg.ticket.is_some_and(|t| {
                    !self.answers_before_copies && self.nodes[node].copies.copy_read(t, &mut events)
                });
                if !answered && self.nodes[node].channels.contains_key(&room.id) {
                    events.push(EngineEvent::Message {
                        room,
                        epoch: EPOCH,
                        msg,
                    });
                }
                events
            }
            Push::Removal(room, mark) => match self.nodes[node].channels.get(&room.id) {
                None => Vec::new(),
                Some(_) => vec![EngineEvent::Removal {
                    room,
                    epoch: EPOCH,
                    mark,
                }],
            },
            Push::UserConfirmed(user) => {
                if self.nodes[node].watched.contains(&user) {
                    self.write_load(node, user);
                }
                Vec::new()
            }
            Push::Notice(user, notice) => {
                let n = &mut self.nodes[node];
                if !n.watched.contains(&user) {
                    Vec::new()
                } else if let Some((_, held)) = n
                    .loads
                    .get_mut(&user)
                    .filter(|_| !self.notices_before_loads)
                {
                    held.push(notice);
                    Vec::new()
                } else {
                    vec![EngineEvent::Notice { user, notice }]
                }
            }
            Push::Confirmed(room) => {
                let Some((_, c)) = self.nodes[node].channels.get_mut(&room.id) else {
                    return Vec::new();
                };
                c.subscribed = true;
                c.subscribing = false;
                let again = c.opened && c.opens.is_empty() && !self.forget_resubscribed;
                self.send_opens(node, room.id);
                if again {
                    vec![EngineEvent::Resubscribed { room }]
                } else {
                    Vec::new()
                }
            }
        }
    }

    // ---- faults --------------------------------------------------------------------------

    /// Something goes wrong with the node's engine; returns whether it could.
    pub(super) fn fault(&mut self, node: usize, fault: Fault) -> bool {
        match fault {
            Fault::LoseCommands => {
                if !self.nodes[node].cmd_up {
                    return false;
                }
                self.nodes[node].cmd_up = false;
                let inflight = std::mem::take(&mut self.nodes[node].inflight);
                for (w, _) in inflight {
                    self.give_up(node, w);
                }
                true
            }
            Fault::LosePubSub => {
                let n = &mut self.nodes[node];
                if !n.sub_up {
                    return false;
                }
                n.sub_up = false;
                n.pushes.clear();
                let mut released = Vec::new();
                n.copies.lost(&mut released);
                self.immediate
                    .extend(released.into_iter().map(|e| (node, e)));
                let n = &mut self.nodes[node];
                n.sub_out.clear();
                n.user_subs.clear();
                for (_, c) in n.channels.values_mut() {
                    c.subscribed = false;
                    c.subscribing = false;
                }
                for room in &mut self.rooms {
                    room.subscribers.remove(&node);
                }
                true
            }
            Fault::DropPush => {
                let pushes = &self.nodes[node].pushes;
                let dropped = (0..pushes.len()).find(|&i| {
                    let Push::Message(room, _) = &pushes[i] else {
                        return false;
                    };
                    pushes
                        .iter()
                        .skip(i + 1)
                        .any(|p| matches!(p, Push::Message(r, _) if r.id == room.id))
                });
                dropped
                    .and_then(|i| self.nodes[node].pushes.remove(i))
                    .is_some()
            }
            Fault::LoseWrites { room, k } => {
                self.fail_over(room, k);
                true
            }
            Fault::CopiesLate => {
                let late = self.clock + crate::cluster::copies::COPY_WAIT;
                let mut released = Vec::new();
                self.nodes[node].copies.expire(late, &mut released);
                let any = !released.is_empty();
                self.immediate
                    .extend(released.into_iter().map(|e| (node, e)));
                any
            }
        }
    }

    /// The node's lost connections come back: stream reads and opens go again, channels
    /// and users are subscribed again.
    pub(super) fn reconnect(&mut self, node: usize) {
        if !self.nodes[node].cmd_up {
            self.nodes[node].cmd_up = true;
            for cmd in std::mem::take(&mut self.nodes[node].reads_waiting) {
                self.write(node, Written::Cmd(cmd));
            }
            let subscribed: Vec<u64> = self.nodes[node]
                .channels
                .iter()
                .filter(|(_, (_, c))| c.subscribed)
                .map(|(&id, _)| id)
                .collect();
            for id in subscribed {
                self.send_opens(node, id);
            }
            let n = &mut self.nodes[node];
            let due: Vec<Text> = std::mem::take(&mut n.reads_due)
                .into_iter()
                .filter(|u| n.watched.contains(u) && n.user_subs.contains(u))
                .collect();
            for user in due {
                self.write_load(node, user);
            }
        }
        if !self.nodes[node].sub_up {
            let n = &mut self.nodes[node];
            n.sub_up = true;
            let mut rooms: Vec<RoomName> = n
                .channels
                .values_mut()
                .map(|(r, c)| {
                    c.subscribing = true;
                    r.clone()
                })
                .collect();
            rooms.sort_by_key(|r| r.id);
            for room in rooms {
                n.sub_out.push_back(SubWritten::Subscribe(room));
            }
            for user in &n.watched {
                n.sub_out.push_back(SubWritten::SubscribeUser(user.clone()));
            }
        }
    }

    /// The stream keeps only its last `stream_max_len` entries (what `XTRIM MAXLEN ~` may
    /// leave at the strictest). Returns how many left.
    pub(super) fn trim(&mut self, room_index: usize) -> usize {
        let max = self.stream_max_len;
        let i = room_index % self.rooms.len();
        let room = &mut self.rooms[i];
        let mut n = 0;
        while room.stream.len() > max {
            if let Some(Item::Msg(e)) = room.stream.pop_front() {
                room.trimmed = e.seq;
            }
            n += 1;
        }
        n
    }

    /// The node is killed and started again: everything its engine had is gone (what Redis
    /// ran stays), and its tickets are no longer anyone's.
    pub(super) fn restart(&mut self, node: usize) {
        let run = self.nodes[node].run + 1;
        self.nodes[node] = Node {
            run,
            cmd_up: true,
            sub_up: true,
            ..Node::default()
        };
        for room in &mut self.rooms {
            room.subscribers.remove(&node);
        }
    }

    /// Nothing moves: no command, answer, subscription or push on its way, every
    /// connection up.
    pub(super) fn settled(&self) -> bool {
        self.runnable().is_empty()
            && self.answering().is_empty()
            && self.subscribing().is_empty()
            && self.pushing().is_empty()
            && self.down().is_empty()
            && self.immediate.is_empty()
    }
}

fn message(e: &Entry, to: Origin) -> EngineMessage {
    EngineMessage {
        seq: e.seq,
        ts_ms: e.ts_ms,
        ticket: (e.origin == to).then_some(e.ticket),
        sender: e.sender.clone(),
        payload: e.payload.clone(),
    }
}

/// This Redis loses no write, so an owner's head (what it asks a raise to, or names in a
/// publish) is never past the room's sequence `at`; past it, the owner holds a sequence
/// Redis never gave.
fn no_write_lost(room: &RoomName, head: u64, at: u64) {
    assert!(
        head <= at,
        "{room:?}'s owner holds {head}, past the room's sequence {at}: no write was lost"
    );
}
