//! Per-connection protocol state, for both ends of a connection.
//!
//! Three things in protocol v1 depend on what came before on the same connection, to keep
//! frames small: room aliases (bound by ROOM or by HELLO's resume list), implicit sequences
//! (a DELIVER without a sequence carries `cursor + 1`), and sender aliases and time deltas in
//! DELIVER. [`DeliverContext`] is the relay's side (it builds per-recipient headers);
//! [`ClientSession`] is the client's side (it resolves frames into complete events and
//! checks every rule, so a client built on it cannot silently lose or repeat a message).
//!
//! Owns: that state and its rules. Touches no I/O and reads no clock: times come in as
//! arguments.

use std::collections::HashMap;

use bytes::Bytes;

use crate::error::{LeftReason, SessionError};
use crate::frame::{
    ClientFrame, DeliverHeader, ErrorFrame, GoAway, Hello, PROTOCOL_VERSION, Ping, Pong, Publish,
    Read, Receipt, ReceiptEntry, ResumeEntry, ResumeList, ServerFrame, Welcome,
};
use crate::text::{SenderId, Text};

/// The stable id of a room or channel: FNV-1a (64-bit) over a kind byte (`r` for a room,
/// `c` for a channel) followed by the name's UTF-8 bytes. Stable across restarts and
/// versions, so a client can resume by id. Collisions only matter within one user's own
/// rooms, where the relay resolves ids.
pub fn room_id(channel: bool, name: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let kind = if channel { b'c' } else { b'r' };
    for &byte in std::iter::once(&kind).chain(name.as_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    hash
}

/// The relay's table of sender aliases for one connection: a bounded set of user ids, each
/// with a small number. When full, the oldest slot is reused (and redefined on the wire).
///
/// The bound is passed to each [`SenderAliases::alias`] (it is the relay's config, the same
/// for every connection), and the table is made on the first sender: a connection that has
/// been sent nothing holds 8 bytes here (a vector, its bound and its hand took 32 of every
/// connection's record). A slot keeps the sender's id as the relay holds it (`S`, see
/// [`SenderId`]): a clone of a shared handle, never a copy of the name.
#[derive(Debug, Clone)]
pub struct SenderAliases<S = Text> {
    table: Option<Box<SenderTable<S>>>,
}

impl<S> Default for SenderAliases<S> {
    fn default() -> Self {
        SenderAliases { table: None }
    }
}

/// A [`SenderAliases`] table once it has a sender.
#[derive(Debug, Clone)]
struct SenderTable<S> {
    slots: Vec<S>,
    /// The slot reused next once full.
    hand: u32,
}

impl<S> Default for SenderTable<S> {
    fn default() -> Self {
        SenderTable {
            slots: Vec::new(),
            hand: 0,
        }
    }
}

impl<S: SenderId> SenderAliases<S> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The alias for `sender`, and whether it must be (re)defined in this frame, in a table
    /// of at most `capacity` (at least 1) senders. A table never shrinks: after a lower
    /// bound (a reload), its slots past the bound stay defined and are reused in turn with
    /// the rest.
    pub fn alias(&mut self, sender: &S, capacity: usize) -> (u32, bool) {
        let table = self.table.get_or_insert_default();
        if let Some(i) = table
            .slots
            .iter()
            .position(|s| s.same(sender) || s.as_bytes() == sender.as_bytes())
        {
            return (i as u32, false);
        }
        if table.slots.len() < capacity.max(1) && table.slots.len() < u32::MAX as usize {
            table.slots.push(sender.clone());
            return ((table.slots.len() - 1) as u32, true);
        }
        // Full: at least one slot (the bound is at least 1), each below `u32::MAX`.
        let slot = table.hand as usize % table.slots.len();
        table.hand = ((slot + 1) % table.slots.len()) as u32;
        table.slots[slot] = sender.clone();
        (slot as u32, true)
    }

    /// Whether the table has been made (it is on the first sender).
    pub fn is_made(&self) -> bool {
        self.table.is_some()
    }
}

/// The relay's per-connection state for building DELIVER headers, with senders' ids held
/// as `S` (see [`SenderId`]).
#[derive(Debug, Clone)]
pub struct DeliverContext<S = Text> {
    last_ts_ms: u64,
    senders: SenderAliases<S>,
}

impl<S: SenderId> DeliverContext<S> {
    /// Starts from the `server_time_ms` sent in WELCOME.
    pub fn new(welcome_time_ms: u64) -> Self {
        DeliverContext {
            last_ts_ms: welcome_time_ms,
            senders: SenderAliases::new(),
        }
    }

    /// The sender table (made on the first sender: see [`SenderAliases`]).
    pub fn senders(&self) -> &SenderAliases<S> {
        &self.senders
    }

    /// The header for one delivery to this connection. `seq` is `None` for an ephemeral
    /// event; `cursor` is the last sequence of this alias the connection has been given
    /// (frames already queued to it count); the sender table holds at most
    /// `sender_capacity` senders (see [`SenderAliases::alias`]).
    pub fn header(
        &mut self,
        alias: u32,
        seq: Option<u64>,
        cursor: u64,
        sender: &S,
        ts_ms: u64,
        sender_capacity: usize,
    ) -> DeliverHeader<S> {
        let (sender_alias, new) = self.senders.alias(sender, sender_capacity);
        let ts_delta_ms = ts_ms as i64 - self.last_ts_ms as i64;
        self.last_ts_ms = ts_ms;
        DeliverHeader {
            alias,
            seq: seq.filter(|&s| Some(s) != cursor.checked_add(1)),
            ephemeral: seq.is_none(),
            sender_alias,
            new_sender: new.then(|| sender.clone()),
            ts_delta_ms,
        }
    }
}

impl<S: SenderId> DeliverContext<S> {
    /// A RECEIPT entry (version 3) for `member`'s markers: the member is named by its slot
    /// in this connection's sender table (PROTOCOL.md §10, at most `sender_capacity`
    /// senders), defined by the entry if needed.
    pub fn receipt_entry(
        &mut self,
        member: &S,
        delivered: u64,
        read: u64,
        sender_capacity: usize,
    ) -> ReceiptEntry {
        let (member_alias, new) = self.senders.alias(member, sender_capacity);
        ReceiptEntry {
            member_alias,
            new_member: new.then(|| member.to_text()),
            delivered,
            read: read.min(delivered),
        }
    }
}

/// One member's markers, resolved from a RECEIPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberMarkers {
    /// The member's user id.
    pub user: Text,
    /// Delivered to one of the member's connections up to this sequence.
    pub delivered: u64,
    /// Read up to this sequence.
    pub read: u64,
}

/// What the client knows of one bound alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomState {
    /// The room's id.
    pub room_id: u64,
    /// Its name, once a ROOM frame (this connection or an earlier one) gave it.
    pub name: Option<Text>,
    /// Whether it is a channel, once known.
    pub channel: Option<bool>,
    /// The epoch of its sequences.
    pub epoch: u64,
    /// The last sequence received (or acknowledged as the client's own, or skipped by GAP).
    pub cursor: u64,
}

/// The sequences of one room this connection published and got PUBACKs for: the relay
/// skips them instead of echoing them, on every binding of the room (PROTOCOL.md §9). Kept
/// per room, not per alias, for the life of the connection (a new epoch forgets them): a
/// later binding may start below one the cursor has passed (on a cluster, a removal and a
/// rejoin whose join point Redis took before the publish ran).
#[derive(Debug, Clone, Default)]
struct OwnSeqs {
    epoch: u64,
    /// Runs of consecutive sequences `(first, last)`, ascending, apart; at most
    /// [`MAX_OWN_RUNS`], the oldest dropped first.
    runs: Vec<(u64, u64)>,
}

/// Runs of own sequences one room keeps. Past it the oldest go: a rebinding below one of
/// them then meets a DELIVER the session refuses (`SequenceBreak`), and the next
/// connection resumes without loss.
const MAX_OWN_RUNS: usize = 1024;

impl OwnSeqs {
    /// The last of the run that holds `seq`, if one does.
    fn run_end(&self, seq: u64) -> Option<u64> {
        let i = self.runs.partition_point(|&(_, last)| last < seq);
        self.runs
            .get(i)
            .filter(|&&(first, _)| first <= seq)
            .map(|&(_, last)| last)
    }

    /// Whether every sequence of `from..=to` is one of them (runs are maximal, so one run
    /// holds them all).
    fn covers(&self, from: u64, to: u64) -> bool {
        self.run_end(from).is_some_and(|last| to <= last)
    }

    fn insert(&mut self, seq: u64) {
        let i = self.runs.partition_point(|&(_, last)| last < seq);
        if self.runs.get(i).is_some_and(|&(first, _)| first <= seq) {
            return;
        }
        let joins_before = i > 0 && self.runs[i - 1].1 + 1 == seq;
        let joins_after = self.runs.get(i).is_some_and(|&(first, _)| first == seq + 1);
        match (joins_before, joins_after) {
            (true, true) => {
                self.runs[i - 1].1 = self.runs[i].1;
                self.runs.remove(i);
            }
            (true, false) => self.runs[i - 1].1 = seq,
            (false, true) => self.runs[i].0 = seq,
            (false, false) => {
                self.runs.insert(i, (seq, seq));
                if self.runs.len() > MAX_OWN_RUNS {
                    self.runs.remove(0);
                }
            }
        }
    }
}

/// The last sequence of `room` the client holds: its cursor, passed by the client's own
/// acknowledged sequences directly after it (their PUBACKs stood in for their delivery).
/// The cursor itself stops below them when a PUBACK came before the DELIVERs of the
/// sequences under it (on a cluster, another node's message still on its way to this
/// one); the next connection resumes from this instead (PROTOCOL.md §9).
fn held_of(room: &RoomState, own: Option<&OwnSeqs>) -> u64 {
    own.filter(|o| o.epoch == room.epoch)
        .and_then(|o| o.run_end(room.cursor.checked_add(1)?))
        .unwrap_or(room.cursor)
}

/// A server frame resolved against the session: every alias, implicit sequence, sender and
/// time made explicit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The session is open.
    Welcome(Welcome),
    /// An alias was bound (joined, subscribed, or rebound after an epoch change).
    Bound {
        /// The alias.
        alias: u32,
        /// Its state now.
        room: RoomState,
        /// The head sequence the relay announced.
        head: u64,
        /// The epoch the client held before, if this ROOM changed it: everything after the
        /// old cursor in the old epoch is lost to this connection.
        previous_epoch: Option<u64>,
    },
    /// An alias was unbound.
    Left {
        /// The alias.
        alias: u32,
        /// The room it was bound to.
        room_id: u64,
        /// Why.
        reason: LeftReason,
    },
    /// A message (or an ephemeral event when `seq` is `None`).
    Message {
        /// The alias.
        alias: u32,
        /// The room.
        room_id: u64,
        /// Its sequence; `None` for an ephemeral event.
        seq: Option<u64>,
        /// Who sent it.
        sender: Text,
        /// When the relay accepted it, ms since the Unix epoch.
        ts_ms: u64,
        /// The body.
        payload: Bytes,
    },
    /// Sequences `from..=to` of the room will not be delivered.
    Gap {
        /// The alias.
        alias: u32,
        /// The room.
        room_id: u64,
        /// First missing.
        from: u64,
        /// Last missing.
        to: u64,
    },
    /// One of the client's publishes was accepted.
    PubAck {
        /// The alias it was published to.
        alias: u32,
        /// The client's message id.
        msg_id: u64,
        /// Its sequence.
        seq: u64,
    },
    /// PING from the relay: answer with PONG.
    Ping(Ping),
    /// PONG from the relay.
    Pong(Pong),
    /// ERROR from the relay.
    Error(ErrorFrame),
    /// GOAWAY from the relay.
    GoAway(GoAway),
    /// Version 3: members' delivered and read markers in a room (RECEIPT).
    Receipt {
        /// The alias.
        alias: u32,
        /// The room.
        room_id: u64,
        /// The members whose markers moved, with their markers now.
        members: Vec<MemberMarkers>,
    },
}

/// The client's side of a connection: builds HELLO and PUBLISH, and resolves everything the
/// relay sends. It survives reconnects: [`ClientSession::hello`] turns the rooms it knows
/// into the next connection's resume list.
#[derive(Debug, Clone, Default)]
pub struct ClientSession {
    welcomed: bool,
    last_ts_ms: u64,
    rooms: HashMap<u32, RoomState>,
    senders: HashMap<u32, Text>,
    /// Publishes awaiting their PUBACK: alias and room id.
    in_flight: HashMap<u64, (u32, u64)>,
    /// This connection's own acknowledged sequences, by room id.
    own: HashMap<u64, OwnSeqs>,
    /// The epoch of each room's stream as last bound on this connection.
    epochs: HashMap<u64, u64>,
    next_msg_id: u64,
    names: HashMap<u64, (Text, bool)>,
    /// The device id sent in a version-2 HELLO: with it, message ids survive reconnects.
    device_id: Option<u64>,
    /// How many versions below [`PROTOCOL_VERSION`] relays' refusals brought the next HELLO
    /// (a relay answering `UnsupportedVersion` makes it offer the next older one).
    fallbacks: u8,
    /// The version of the current connection's session (its WELCOME's), 0 before it.
    session_version: u8,
    /// Rooms unbound by LEFT `Restarted` (§6): the relay restarted and does not know them
    /// for this user yet. Kept, with their cursors, for the next HELLO's resume list, until
    /// a ROOM binds them again. At most one entry per room the session knew.
    parked: Vec<RoomState>,
}

impl ClientSession {
    /// The user a sender alias names (§10): a frame that (re)defines the alias sets it
    /// first; an alias never defined is the relay's error.
    fn resolve_sender(
        senders: &mut HashMap<u32, Text>,
        alias: u32,
        defined: Option<Text>,
    ) -> Result<Text, SessionError> {
        if let Some(user) = defined {
            senders.insert(alias, user);
        }
        senders
            .get(&alias)
            .cloned()
            .ok_or(SessionError::UnknownSender(alias))
    }

    /// A session that knows no rooms yet.
    pub fn new() -> Self {
        ClientSession::default()
    }

    /// A session of a device (PROTOCOL.md §5, version 2): `device_id` is drawn at random
    /// once per installation and kept, and `next_msg_id` is the device's message counter
    /// as persisted (0 on a new installation). Message ids then name messages across
    /// reconnects, so [`ClientSession::republish`] keeps them and the relay answers a
    /// repeat with the original PUBACK instead of storing the message twice.
    pub fn with_device(device_id: u64, next_msg_id: u64) -> Self {
        ClientSession {
            device_id: Some(device_id),
            next_msg_id,
            ..ClientSession::default()
        }
    }

    /// The protocol version the next HELLO offers.
    pub fn version(&self) -> u8 {
        PROTOCOL_VERSION.saturating_sub(self.fallbacks).max(1)
    }

    /// The last message id given out: persist it with the device id, so that a restarted
    /// app does not reuse an id the relay may still remember.
    pub fn last_msg_id(&self) -> u64 {
        self.next_msg_id
    }

    /// Whether a repeated publish keeps its message id and is recognised by the relay: a
    /// version-2 session with a device id.
    pub fn idempotent(&self) -> bool {
        self.device_id.is_some() && self.version() >= 2
    }

    /// The relay answered HELLO with ERROR `UnsupportedVersion`: offer the next older
    /// version (3, then 2, then 1) from the next HELLO on. Returns whether that is a change
    /// (a version-1 refusal is final).
    pub fn refused_version(&mut self) -> bool {
        let changed = self.version() > 1;
        if changed {
            self.fallbacks += 1;
        }
        changed
    }

    /// A READ (version 3): the user read every message of `alias` up to `seq`. `None` when
    /// the current session speaks an older version (it has no READ).
    pub fn read(&self, alias: u32, seq: u64) -> Option<ClientFrame> {
        (self.session_version >= 3).then_some(ClientFrame::Read(Read { alias, seq }))
    }

    /// Starts a (new) connection: forgets the previous connection's aliases and builds a
    /// HELLO whose resume list holds every room the session knows, in alias order. Entry `i`
    /// becomes alias `i`.
    pub fn hello(&mut self, token: Bytes, heartbeat_secs: u32) -> ClientFrame {
        let mut known: Vec<(u32, RoomState)> = self.rooms.drain().collect();
        known.sort_by_key(|(alias, _)| *alias);
        // Rooms parked by LEFT `Restarted` follow the bound ones (a room bound again since
        // is no longer parked).
        known.extend(self.parked.drain(..).map(|room| (u32::MAX, room)));
        // The next connection resumes after the client's own sequences that follow each
        // cursor: it holds them, and this connection's record of them ends here.
        for (_, room) in &mut known {
            room.cursor = held_of(room, self.own.get(&room.room_id));
        }
        let entries: Vec<ResumeEntry> = known
            .iter()
            .map(|(_, r)| ResumeEntry {
                room_id: r.room_id,
                epoch: r.epoch,
                last_seq: r.cursor,
            })
            .collect();
        self.own.clear();
        self.epochs.clear();
        for (i, (_, room)) in known.into_iter().enumerate() {
            self.epochs.insert(room.room_id, room.epoch);
            self.rooms.insert(i as u32, room);
        }
        self.welcomed = false;
        self.session_version = 0;
        self.senders.clear();
        self.in_flight.clear();
        let version = self.version();
        ClientFrame::Hello(Hello {
            version,
            heartbeat_secs,
            token,
            device_id: self.device_id.filter(|_| version >= 2),
            resume: ResumeList::from_entries(&entries),
        })
    }

    /// A PUBLISH of `payload` to `alias`, with a fresh message id (returned). When its
    /// PUBACK arrives, the room's cursor advances to the acknowledged sequence if that is
    /// the next one and the alias is still bound to the same room; otherwise the sequence
    /// is remembered as the client's own, which the relay may later skip.
    pub fn publish(&mut self, alias: u32, payload: Bytes, ack: Option<u64>) -> (u64, ClientFrame) {
        self.next_msg_id += 1;
        let msg_id = self.next_msg_id;
        self.publish_with_id(alias, msg_id, payload, ack)
    }

    /// A PUBLISH of a message sent before as `msg_id` whose PUBACK never came (the
    /// connection ended). In an [idempotent](ClientSession::idempotent) session it keeps
    /// `msg_id`, so the relay recognises it and answers with the original sequence if it
    /// had accepted it; otherwise it gets a fresh id (version 1: ids are per connection).
    pub fn republish(
        &mut self,
        alias: u32,
        msg_id: u64,
        payload: Bytes,
        ack: Option<u64>,
    ) -> (u64, ClientFrame) {
        if self.idempotent() && msg_id != 0 {
            self.publish_with_id(alias, msg_id, payload, ack)
        } else {
            self.publish(alias, payload, ack)
        }
    }

    fn publish_with_id(
        &mut self,
        alias: u32,
        msg_id: u64,
        payload: Bytes,
        ack: Option<u64>,
    ) -> (u64, ClientFrame) {
        let room_id = self.rooms.get(&alias).map_or(0, |r| r.room_id);
        self.in_flight.insert(msg_id, (alias, room_id));
        let frame = ClientFrame::Publish(Publish {
            alias,
            msg_id: Some(msg_id),
            ack,
            payload,
        });
        (msg_id, frame)
    }

    /// The state of one alias.
    pub fn room(&self, alias: u32) -> Option<&RoomState> {
        self.rooms.get(&alias)
    }

    /// The last sequence the client holds of the room bound to `alias`: its cursor,
    /// passed by the client's own acknowledged sequences directly after it, which is
    /// where the next connection resumes.
    pub fn held(&self, alias: u32) -> Option<u64> {
        let room = self.rooms.get(&alias)?;
        Some(held_of(room, self.own.get(&room.room_id)))
    }

    /// Every bound alias.
    pub fn rooms(&self) -> impl Iterator<Item = (u32, &RoomState)> {
        self.rooms.iter().map(|(a, r)| (*a, r))
    }

    /// Rooms unbound by LEFT `Restarted` and kept for the next resume (§6), with their
    /// cursors.
    pub fn parked(&self) -> impl Iterator<Item = &RoomState> {
        self.parked.iter()
    }

    /// The alias bound to a room or channel name, if any.
    pub fn alias_of(&self, name: &str) -> Option<u32> {
        self.rooms
            .iter()
            .find(|(_, r)| r.name.as_ref().is_some_and(|n| n.as_str() == name))
            .map(|(a, _)| *a)
    }

    /// Publishes not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Resolves one frame from the relay, checking the protocol's rules.
    pub fn apply(&mut self, frame: ServerFrame) -> Result<Event, SessionError> {
        if !self.welcomed
            && !matches!(
                frame,
                ServerFrame::Welcome(_) | ServerFrame::Error(_) | ServerFrame::GoAway(_)
            )
        {
            return Err(SessionError::BeforeWelcome(frame.name()));
        }
        Ok(match frame {
            ServerFrame::Welcome(w) => {
                self.welcomed = true;
                self.session_version = w.version;
                self.last_ts_ms = w.server_time_ms;
                Event::Welcome(w)
            }
            ServerFrame::Room(r) => {
                let previous_epoch = self
                    .rooms
                    .get(&r.alias)
                    .filter(|old| old.room_id == r.room_id && old.epoch != r.epoch)
                    .map(|old| old.epoch);
                self.names.insert(r.room_id, (r.name.clone(), r.channel));
                let room = RoomState {
                    room_id: r.room_id,
                    name: Some(r.name),
                    channel: Some(r.channel),
                    epoch: r.epoch,
                    cursor: r.cursor,
                };
                // Own sequences above the new cursor stay (the relay skips them on the new
                // binding too); a new epoch makes them meaningless.
                self.epochs.insert(r.room_id, r.epoch);
                if self
                    .own
                    .get(&r.room_id)
                    .is_some_and(|own| own.epoch != r.epoch)
                {
                    self.own.remove(&r.room_id);
                }
                self.parked.retain(|p| p.room_id != r.room_id);
                self.rooms.insert(r.alias, room.clone());
                Event::Bound {
                    alias: r.alias,
                    room,
                    head: r.head,
                    previous_epoch,
                }
            }
            ServerFrame::Left(l) => {
                let room = self
                    .rooms
                    .remove(&l.alias)
                    .ok_or(SessionError::UnknownAlias(l.alias))?;
                if l.reason == LeftReason::Restarted
                    && !self.parked.iter().any(|p| p.room_id == room.room_id)
                {
                    self.parked.push(room.clone());
                }
                Event::Left {
                    alias: l.alias,
                    room_id: room.room_id,
                    reason: l.reason,
                }
            }
            ServerFrame::PubAck(p) => {
                let (alias, room_id) = self
                    .in_flight
                    .remove(&p.msg_id)
                    .ok_or(SessionError::UnknownMessageId(p.msg_id))?;
                // The sequence belongs to the room's stream as last bound on this connection
                // (a relay sends a ROOM before the PUBACKs that follow it). The cursor moves
                // only while the alias is still bound to that room (an alias may be rebound
                // in the meantime), and the sequence is the room's own either way.
                let epoch = self.epochs.get(&room_id).copied().unwrap_or(0);
                let bound = self.rooms.get_mut(&alias).filter(|r| r.room_id == room_id);
                // Checked: there is no sequence after 2^64-1 (a relay may claim that cursor).
                if let Some(room) = bound
                    && Some(p.seq) == room.cursor.checked_add(1)
                {
                    room.cursor = p.seq;
                }
                // Own either way: a later binding of the room may start below it.
                let own = self.own.entry(room_id).or_default();
                if own.epoch != epoch {
                    *own = OwnSeqs {
                        epoch,
                        runs: Vec::new(),
                    };
                }
                own.insert(p.seq);
                Event::PubAck {
                    alias,
                    msg_id: p.msg_id,
                    seq: p.seq,
                }
            }
            ServerFrame::Deliver(d) => {
                let h = d.header;
                let room = self
                    .rooms
                    .get_mut(&h.alias)
                    .ok_or(SessionError::UnknownAlias(h.alias))?;
                let sender = Self::resolve_sender(&mut self.senders, h.sender_alias, h.new_sender)?;
                let ts = (self.last_ts_ms as i64)
                    .saturating_add(h.ts_delta_ms)
                    .max(0) as u64;
                self.last_ts_ms = ts;
                let seq = if h.ephemeral {
                    None
                } else {
                    // Saturating: after a cursor of 2^64-1 an implicit sequence has nowhere to
                    // go, and `seq <= cursor` below refuses it.
                    let next = room.cursor.saturating_add(1);
                    let seq = h.seq.unwrap_or(next);
                    // Only the client's own acknowledged messages may be skipped silently (one
                    // look-up however far the sequence jumps).
                    let own = self
                        .own
                        .get(&room.room_id)
                        .filter(|o| o.epoch == room.epoch);
                    let skipped_all_own =
                        seq == next || own.is_some_and(|o| o.covers(next, seq.saturating_sub(1)));
                    if seq <= room.cursor || !skipped_all_own {
                        return Err(SessionError::SequenceBreak {
                            alias: h.alias,
                            cursor: room.cursor,
                            got: seq,
                        });
                    }
                    room.cursor = seq;
                    Some(seq)
                };
                Event::Message {
                    alias: h.alias,
                    room_id: room.room_id,
                    seq,
                    sender,
                    ts_ms: ts,
                    payload: d.payload,
                }
            }
            ServerFrame::Gap(g) => {
                let room = self
                    .rooms
                    .get_mut(&g.alias)
                    .ok_or(SessionError::UnknownAlias(g.alias))?;
                if Some(g.from) != room.cursor.checked_add(1) {
                    return Err(SessionError::SequenceBreak {
                        alias: g.alias,
                        cursor: room.cursor,
                        got: g.from,
                    });
                }
                room.cursor = g.to;
                Event::Gap {
                    alias: g.alias,
                    room_id: room.room_id,
                    from: g.from,
                    to: g.to,
                }
            }
            ServerFrame::Ping(p) => Event::Ping(p),
            ServerFrame::Pong(p) => Event::Pong(p),
            ServerFrame::Error(e) => Event::Error(e),
            ServerFrame::GoAway(g) => Event::GoAway(g),
            ServerFrame::Receipt(r) => self.apply_receipt(r)?,
        })
    }

    /// RECEIPT: members named by sender-table slots (an entry may define its slot, as a
    /// DELIVER's NEW_SENDER does), for a bound alias.
    fn apply_receipt(&mut self, r: Receipt) -> Result<Event, SessionError> {
        let room_id = self
            .rooms
            .get(&r.alias)
            .ok_or(SessionError::UnknownAlias(r.alias))?
            .room_id;
        let mut members = Vec::with_capacity(r.entries.len());
        for e in r.entries {
            let user = Self::resolve_sender(&mut self.senders, e.member_alias, e.new_member)?;
            members.push(MemberMarkers {
                user,
                delivered: e.delivered,
                read: e.read,
            });
        }
        Ok(Event::Receipt {
            alias: r.alias,
            room_id,
            members,
        })
    }

    /// The name of a room the session has seen, by id.
    pub fn name_of(&self, room_id: u64) -> Option<&Text> {
        self.names.get(&room_id).map(|(n, _)| n)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests allow it locally (workspace lint policy)
mod tests {
    use super::*;
    use crate::frame::{Deliver, Gap, Left, PubAck, Room};

    fn welcome(t: u64) -> ServerFrame {
        ServerFrame::Welcome(Welcome {
            version: 1,
            conn_id: 7,
            server_time_ms: t,
            heartbeat_secs: 30,
            max_frame_len: 65536,
            user: Text::from("bob"),
        })
    }

    fn room(alias: u32, cursor: u64) -> ServerFrame {
        ServerFrame::Room(Room {
            alias,
            channel: false,
            room_id: room_id(false, "r1"),
            epoch: 5,
            cursor,
            head: cursor,
            name: Text::from("r1"),
        })
    }

    /// The relay side builds headers; the client side resolves them back.
    #[test]
    fn implicit_sequences_senders_and_times_round_trip() {
        let mut relay = DeliverContext::new(1_000);
        let mut client = ClientSession::new();
        client.apply(welcome(1_000)).unwrap();
        client.apply(room(0, 10)).unwrap();
        let senders = [
            Text::from("ann"),
            Text::from("cat"),
            Text::from("dan"),
            Text::from("ann"),
        ];
        let mut cursor = 10;
        for (i, s) in senders.iter().enumerate() {
            let seq = 11 + i as u64;
            let ts = 1_000 + 250 * i as u64;
            let header = relay.header(0, Some(seq), cursor, s, ts, 2);
            assert_eq!(header.seq, None, "contiguous sequences are implicit");
            cursor = seq;
            let ev = client
                .apply(ServerFrame::Deliver(Deliver {
                    header,
                    payload: Bytes::from_static(b"hi"),
                }))
                .unwrap();
            match ev {
                Event::Message {
                    seq: got,
                    sender,
                    ts_ms,
                    ..
                } => {
                    assert_eq!(got, Some(seq));
                    assert_eq!(&sender, s);
                    assert_eq!(ts_ms, ts);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn a_sender_table_is_made_on_the_first_sender_and_bounded_by_the_capacity_passed() {
        // Nothing sent: no table, and the context is a time and a pointer.
        let mut relay = DeliverContext::new(0);
        assert!(!relay.senders().is_made());
        assert_eq!(std::mem::size_of::<DeliverContext>(), 16);
        let name = |n: &str| Text::from(n);
        let alias = |relay: &mut DeliverContext, n: &str, capacity: usize| {
            let h = relay.header(0, None, 0, &name(n), 0, capacity);
            (h.sender_alias, h.new_sender.is_some())
        };
        assert_eq!(alias(&mut relay, "ann", 2), (0, true));
        assert!(relay.senders().is_made());
        assert_eq!(alias(&mut relay, "bob", 2), (1, true));
        assert_eq!(alias(&mut relay, "ann", 2), (0, false));
        // Full at 2: the oldest slot is redefined, then the next.
        assert_eq!(alias(&mut relay, "cat", 2), (0, true));
        assert_eq!(alias(&mut relay, "dan", 2), (1, true));
        assert_eq!(alias(&mut relay, "eve", 2), (0, true));
        // A raised bound grows the table; a lowered one never shrinks it: the slots past
        // it stay defined and are reused in turn, none beyond them made.
        assert_eq!(alias(&mut relay, "fay", 3), (2, true));
        assert_eq!(alias(&mut relay, "fay", 1), (2, false));
        let reused: Vec<_> = ["gus", "hal", "ida", "jon"]
            .into_iter()
            .map(|n| alias(&mut relay, n, 1))
            .collect();
        assert_eq!(reused, [(1, true), (2, true), (0, true), (1, true)]);
        // A bound of 0 is 1.
        let mut one = DeliverContext::new(0);
        assert_eq!(alias(&mut one, "ann", 0), (0, true));
        assert_eq!(alias(&mut one, "bob", 0), (0, true));
    }

    /// A relay's own form of a sender's id: a shared handle.
    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Handle(std::sync::Arc<str>);

    impl SenderId for Handle {
        fn as_bytes(&self) -> &[u8] {
            self.0.as_bytes()
        }
        fn same(&self, other: &Self) -> bool {
            std::sync::Arc::ptr_eq(&self.0, &other.0)
        }
        fn to_text(&self) -> Text {
            Text::from(&*self.0)
        }
    }

    #[test]
    fn a_relays_own_sender_form_is_kept_by_handle_and_encodes_as_text() {
        let ann = Handle(std::sync::Arc::from("ann"));
        let mut own = DeliverContext::<Handle>::new(1_000);
        let mut text = DeliverContext::new(1_000);
        let header = own.header(0, Some(11), 10, &ann, 1_250, 4);
        // The table's slot and the header hold the handle: no copy of the name.
        assert_eq!(std::sync::Arc::strong_count(&ann.0), 3);
        let same = text.header(0, Some(11), 10, &Text::from("ann"), 1_250, 4);
        let (mut a, mut b) = (bytes::BytesMut::new(), bytes::BytesMut::new());
        header.encode_prefix(2, &mut a);
        same.encode_prefix(2, &mut b);
        assert_eq!((a, header.prefix_len(2)), (b, same.prefix_len(2)));
        drop(header);
        // Found again by the same handle, and by the name from another one.
        assert!(own.header(0, None, 11, &ann, 1_250, 4).new_sender.is_none());
        let other = Handle(std::sync::Arc::from("ann"));
        assert!(
            own.header(0, None, 11, &other, 1_250, 4)
                .new_sender
                .is_none()
        );
        // A RECEIPT entry that defines a member writes its name.
        let entry = own.receipt_entry(&Handle(std::sync::Arc::from("bob")), 3, 1, 4);
        assert_eq!(entry.new_member, Some(Text::from("bob")));
    }

    #[test]
    fn a_skip_is_refused_unless_it_is_the_clients_own_message() {
        let mut client = ClientSession::new();
        client.apply(welcome(0)).unwrap();
        client.apply(room(0, 3)).unwrap();
        let mut relay = DeliverContext::new(0);
        let sender = Text::from("x");
        // Skipping 4 silently is a loss.
        let header = relay.header(0, Some(5), 3, &sender, 0, 8);
        assert_eq!(header.seq, Some(5));
        let err = client
            .apply(ServerFrame::Deliver(Deliver {
                header: header.clone(),
                payload: Bytes::new(),
            }))
            .unwrap_err();
        assert_eq!(
            err,
            SessionError::SequenceBreak {
                alias: 0,
                cursor: 3,
                got: 5
            }
        );
        // Our own message 4, acknowledged while we lag, may be skipped.
        let (msg_id, _) = client.publish(0, Bytes::from_static(b"me"), None);
        // Pretend we are behind: the ack for 4 arrives with cursor 3, so it is recorded.
        client
            .apply(ServerFrame::PubAck(PubAck { msg_id, seq: 4 }))
            .unwrap();
        assert_eq!(
            client.room(0).unwrap().cursor,
            4,
            "contiguous own message advances"
        );
        let ev = client.apply(ServerFrame::Deliver(Deliver {
            header,
            payload: Bytes::new(),
        }));
        assert!(matches!(ev, Ok(Event::Message { seq: Some(5), .. })));
    }

    /// loadgen's `cluster_kill` (phone 48, `dm-11`): the PUBACK of the client's 2 came
    /// before the DELIVER of 1 (another node's message, on its way to the client's node),
    /// then its PUBACK of 3, and nothing later came in the 1:1 room. While the connection
    /// lives the cursor follows the relay's numbering (1: the relay numbers a GAP after it
    /// from there); the client holds 1..=3, and the next connection resumes after 3.
    #[test]
    fn the_next_connection_resumes_past_own_sequences_right_after_the_cursor() {
        let mut client = ClientSession::new();
        client.apply(welcome(0)).unwrap();
        client.apply(room(0, 0)).unwrap();
        let mut relay = DeliverContext::new(0);
        let sender = Text::from("x");
        let (two, _) = client.publish(0, Bytes::from_static(b"2"), None);
        let (three, _) = client.publish(0, Bytes::from_static(b"3"), None);
        let puback = |msg_id, seq| ServerFrame::PubAck(PubAck { msg_id, seq });
        client.apply(puback(two, 2)).unwrap();
        let header = relay.header(0, Some(1), 0, &sender, 0, 8);
        let ev = client.apply(ServerFrame::Deliver(Deliver {
            header,
            payload: Bytes::new(),
        }));
        assert!(matches!(ev, Ok(Event::Message { seq: Some(1), .. })));
        client.apply(puback(three, 3)).unwrap();
        assert_eq!(client.room(0).unwrap().cursor, 1, "the relay's numbering");
        assert_eq!(client.held(0), Some(3), "1, then its own 2 and 3");
        // The relay's GAP after a skipped own message starts at the cursor it numbers from.
        let mut lagging = client.clone();
        lagging
            .apply(ServerFrame::Gap(Gap {
                alias: 0,
                from: 2,
                to: 9,
            }))
            .unwrap();
        assert_eq!(lagging.held(0), Some(9));
        let hello = hello_of(client.hello(Bytes::from_static(b"t"), 0));
        assert_eq!(
            hello.resume.iter().map(|e| e.last_seq).collect::<Vec<_>>(),
            vec![3],
            "the next connection resumes after the client's own 3"
        );
        assert_eq!(client.room(0).unwrap().cursor, 3);
        // An own sequence after a hole stays above it: 5 with 4 not held.
        client.apply(welcome(0)).unwrap();
        client.apply(room(0, 3)).unwrap();
        let (five, _) = client.publish(0, Bytes::from_static(b"5"), None);
        client.apply(puback(five, 5)).unwrap();
        assert_eq!(client.held(0), Some(3));
        let hello = hello_of(client.hello(Bytes::from_static(b"t"), 0));
        assert_eq!(
            hello.resume.iter().map(|e| e.last_seq).collect::<Vec<_>>(),
            vec![3]
        );
    }

    /// On a cluster, a rejoin's join point (10) can lie below an own sequence whose
    /// PUBACK moved the cursor on the old binding (11: the publish reached Redis after the
    /// rejoin, the LEFT of the old membership reached the client's node after its PUBACK).
    /// The relay skips 11 on the new binding as the connection's own; the client must
    /// know it for its own there too. Found by the cluster simulation.
    #[test]
    fn own_sequences_passed_by_their_pubacks_stay_own_for_a_rebinding_below_them() {
        let mut client = ClientSession::new();
        client.apply(welcome(0)).unwrap();
        client.apply(room(0, 9)).unwrap();
        let (ten, _) = client.publish(0, Bytes::from_static(b"10"), None);
        let (eleven, _) = client.publish(0, Bytes::from_static(b"11"), None);
        let puback = |msg_id, seq| ServerFrame::PubAck(PubAck { msg_id, seq });
        client.apply(puback(ten, 10)).unwrap();
        client.apply(puback(eleven, 11)).unwrap();
        assert_eq!(
            client.room(0).unwrap().cursor,
            11,
            "contiguous own messages"
        );
        client
            .apply(ServerFrame::Left(Left {
                alias: 0,
                reason: LeftReason::Removed,
            }))
            .unwrap();
        // The relay's DELIVER of `seq` on alias 1, with its cursor at `cursor`.
        let mut relay = DeliverContext::new(0);
        let mut deliver = |client: &mut ClientSession, seq, cursor| {
            let header = relay.header(1, Some(seq), cursor, &Text::from("x"), 0, 8);
            client.apply(ServerFrame::Deliver(Deliver {
                header,
                payload: Bytes::new(),
            }))
        };
        // The rejoin binds from 10; the relay skips the own 11.
        client.apply(room(1, 10)).unwrap();
        let ev = deliver(&mut client, 12, 10);
        assert!(
            matches!(ev, Ok(Event::Message { seq: Some(12), .. })),
            "{ev:?}"
        );
        // Passed by a delivery too, they stay the connection's own: a later binding from 10
        // (another rejoin) skips 11 again.
        client.apply(room(1, 10)).unwrap();
        let ev = deliver(&mut client, 12, 10);
        assert!(
            matches!(ev, Ok(Event::Message { seq: Some(12), .. })),
            "{ev:?}"
        );
        // A skip over anything else is refused, however far it jumps (one look-up).
        let ev = deliver(&mut client, u64::MAX, 12);
        assert!(
            matches!(ev, Err(SessionError::SequenceBreak { .. })),
            "{ev:?}"
        );
    }

    #[test]
    fn own_sequences_are_kept_as_runs_the_oldest_dropped_past_the_bound() {
        let mut own = OwnSeqs::default();
        for seq in [5, 7, 6, 9, 3, 4] {
            own.insert(seq);
        }
        assert_eq!(own.runs, vec![(3, 7), (9, 9)]);
        assert!(own.covers(3, 7) && !own.covers(7, 9) && own.covers(9, 9) && !own.covers(8, 8));
        assert_eq!((own.run_end(4), own.run_end(8)), (Some(7), None));
        own.insert(8);
        assert_eq!(own.runs, vec![(3, 9)]);
        let mut many = OwnSeqs::default();
        for i in 0..=MAX_OWN_RUNS as u64 {
            many.insert(2 * i + 1);
        }
        assert_eq!(many.runs.len(), MAX_OWN_RUNS);
        assert!(
            !many.covers(1, 1) && many.covers(3, 3),
            "the oldest run went"
        );
    }

    fn hello_of(frame: ClientFrame) -> Hello {
        match frame {
            ClientFrame::Hello(h) => h,
            other => panic!("not a HELLO: {other:?}"),
        }
    }

    fn msg_id_of(frame: &ClientFrame) -> Option<u64> {
        match frame {
            ClientFrame::Publish(p) => p.msg_id,
            _ => None,
        }
    }

    #[test]
    fn a_device_session_offers_v3_keeps_ids_across_reconnects_and_falls_back_to_v2_then_v1() {
        let mut client = ClientSession::with_device(0xfeed, 41);
        let hello = hello_of(client.hello(Bytes::from_static(b"t"), 0));
        assert_eq!((hello.version, hello.device_id), (3, Some(0xfeed)));
        // A relay that speaks versions 1 and 2 only.
        assert!(client.refused_version());
        let hello = hello_of(client.hello(Bytes::from_static(b"t"), 0));
        assert_eq!((hello.version, hello.device_id), (2, Some(0xfeed)));
        client.apply(welcome(0)).unwrap();
        client.apply(room(0, 3)).unwrap();
        let (id, _) = client.publish(0, Bytes::from_static(b"m"), None);
        assert_eq!(id, 42, "the counter continues from the persisted one");
        assert_eq!(client.last_msg_id(), 42);
        // The link dropped before the PUBACK: the next connection sends the same id.
        client.hello(Bytes::from_static(b"t"), 0);
        client.apply(welcome(0)).unwrap();
        let (again, frame) = client.republish(0, id, Bytes::from_static(b"m"), None);
        assert_eq!((again, msg_id_of(&frame)), (42, Some(42)));
        // A relay that speaks only version 1: the next HELLO is version 1, without the
        // device id, and a republish takes a fresh id there.
        assert!(client.refused_version());
        assert!(!client.refused_version(), "a version-1 refusal is final");
        let hello = hello_of(client.hello(Bytes::from_static(b"t"), 0));
        assert_eq!((hello.version, hello.device_id), (1, None));
        client.apply(welcome(0)).unwrap();
        let (fresh, _) = client.republish(0, id, Bytes::from_static(b"m"), None);
        assert_eq!(fresh, 43);
    }

    #[test]
    fn a_session_without_a_device_republishes_with_fresh_ids() {
        let mut client = ClientSession::new();
        let hello = hello_of(client.hello(Bytes::from_static(b"t"), 0));
        assert_eq!((hello.version, hello.device_id), (3, None));
        client.apply(welcome(0)).unwrap();
        client.apply(room(0, 3)).unwrap();
        let (id, _) = client.publish(0, Bytes::from_static(b"m"), None);
        let (again, _) = client.republish(0, id, Bytes::from_static(b"m"), None);
        assert_ne!(again, id);
    }

    #[test]
    fn gaps_must_start_at_the_cursor() {
        let mut client = ClientSession::new();
        client.apply(welcome(0)).unwrap();
        client.apply(room(0, 3)).unwrap();
        assert!(
            client
                .apply(ServerFrame::Gap(Gap {
                    alias: 0,
                    from: 5,
                    to: 9
                }))
                .is_err()
        );
        client
            .apply(ServerFrame::Gap(Gap {
                alias: 0,
                from: 4,
                to: 9,
            }))
            .unwrap();
        assert_eq!(client.room(0).unwrap().cursor, 9);
    }

    #[test]
    fn hello_resumes_known_rooms_in_alias_order() {
        let mut client = ClientSession::new();
        client.apply(welcome(0)).unwrap();
        client.apply(room(3, 42)).unwrap();
        let hello = hello_of(client.hello(Bytes::from_static(b"t"), 0));
        let entries: Vec<_> = hello.resume.iter().collect();
        assert_eq!(
            entries,
            vec![ResumeEntry {
                room_id: room_id(false, "r1"),
                epoch: 5,
                last_seq: 42
            }]
        );
        assert_eq!(client.room(0).unwrap().cursor, 42, "entry 0 is alias 0");
        assert!(client.room(3).is_none());
    }

    #[test]
    fn a_room_left_because_the_relay_restarted_is_resumed_again_until_bound() {
        let mut client = ClientSession::new();
        client.apply(welcome(0)).unwrap();
        client.apply(room(0, 42)).unwrap();
        client
            .apply(ServerFrame::Left(Left {
                alias: 0,
                reason: LeftReason::Restarted,
            }))
            .unwrap();
        assert!(client.room(0).is_none(), "the alias is unbound");
        assert_eq!(client.parked().map(|r| r.cursor).collect::<Vec<_>>(), [42]);
        // The next HELLO resumes it with its cursor, as alias 0 again.
        let hello = hello_of(client.hello(Bytes::from_static(b"t"), 0));
        let entries: Vec<_> = hello.resume.iter().collect();
        assert_eq!(
            entries,
            vec![ResumeEntry {
                room_id: room_id(false, "r1"),
                epoch: 5,
                last_seq: 42
            }]
        );
        assert_eq!(client.parked().count(), 0, "bound again by the resume list");
        // Any other reason drops the room for good.
        client.apply(welcome(0)).unwrap();
        client
            .apply(ServerFrame::Left(Left {
                alias: 0,
                reason: LeftReason::UnknownRoom,
            }))
            .unwrap();
        let hello = hello_of(client.hello(Bytes::from_static(b"t"), 0));
        assert_eq!(hello.resume.iter().count(), 0);
        assert_eq!(client.parked().count(), 0);
    }

    #[test]
    fn frames_before_welcome_are_refused() {
        let mut client = ClientSession::new();
        assert_eq!(
            client.apply(room(0, 0)),
            Err(SessionError::BeforeWelcome("ROOM"))
        );
    }

    #[test]
    fn room_ids_are_stable_and_kind_separated() {
        assert_eq!(room_id(false, "general"), room_id(false, "general"));
        assert_ne!(room_id(false, "general"), room_id(true, "general"));
        // Pinned so a change of algorithm cannot slip in unnoticed: FNV-1a-64 of the single
        // byte "r", computed independently (the same routine gives the published test
        // vector 0xaf63dc4c8601ec8c for "a").
        assert_eq!(room_id(false, ""), 0xaf63_ef4c_8602_0cd5);
    }

    #[test]
    fn receipts_name_members_through_the_sender_table_and_read_needs_version_3() {
        let mut relay = DeliverContext::new(0);
        let mut client = ClientSession::new();
        client.hello(Bytes::from_static(b"t"), 0);
        let welcome_v = |version| {
            ServerFrame::Welcome(Welcome {
                version,
                conn_id: 7,
                server_time_ms: 0,
                heartbeat_secs: 30,
                max_frame_len: 65536,
                user: Text::from("bob"),
            })
        };
        client.apply(welcome_v(3)).unwrap();
        client.apply(room(0, 3)).unwrap();
        assert_eq!(
            client.read(0, 3),
            Some(ClientFrame::Read(Read { alias: 0, seq: 3 }))
        );
        // A sender slot defined by a DELIVER names the same user in a RECEIPT, and back.
        let header = relay.header(0, Some(4), 3, &Text::from("ann"), 0, 2);
        client
            .apply(ServerFrame::Deliver(Deliver {
                header,
                payload: Bytes::new(),
            }))
            .unwrap();
        let entries = vec![
            relay.receipt_entry(&Text::from("ann"), 4, 4, 2),
            relay.receipt_entry(&Text::from("cat"), 4, 9, 2),
        ];
        assert_eq!(entries[0].new_member, None, "ann's slot is defined already");
        assert_eq!(entries[1].read, 4, "read never past delivered");
        let ev = client
            .apply(ServerFrame::Receipt(Receipt { alias: 0, entries }))
            .unwrap();
        let Event::Receipt { members, .. } = ev else {
            panic!("{ev:?}")
        };
        let got: Vec<(&str, u64, u64)> = members
            .iter()
            .map(|m| (m.user.as_str(), m.delivered, m.read))
            .collect();
        assert_eq!(got, vec![("ann", 4, 4), ("cat", 4, 4)]);
        // An undefined slot, an unbound alias: refused.
        let stray = |alias, member_alias| {
            ServerFrame::Receipt(Receipt {
                alias,
                entries: vec![ReceiptEntry {
                    member_alias,
                    new_member: None,
                    delivered: 1,
                    read: 1,
                }],
            })
        };
        assert_eq!(
            client.apply(stray(0, 9)),
            Err(SessionError::UnknownSender(9))
        );
        assert_eq!(
            client.apply(stray(5, 0)),
            Err(SessionError::UnknownAlias(5))
        );
        // A version-2 session has no READ.
        client.hello(Bytes::from_static(b"t"), 0);
        client.apply(welcome_v(2)).unwrap();
        assert_eq!(client.read(0, 3), None);
    }
}
