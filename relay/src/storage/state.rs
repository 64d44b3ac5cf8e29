//! The state a worker's log describes: per room its name, epoch, head, first retained
//! sequence, members with their join points and receipts markers, blocks, and the index of
//! where its messages lie (extents of consecutive sequences in one segment).
//!
//! Owns: [`LogState`] and the one function that changes it from a record, [`LogState::apply`],
//! used alike when appending and when recovering, so both always agree. Must not touch files.

use std::collections::{HashMap, HashSet, VecDeque};

use pabal_codec::Text;

use super::record::{Body, FLAG_COPY, Record};
use super::{Lsn, RoomKey};
use crate::directory::JoinPoint;
use crate::ids::RoomName;

/// An extent holds at most this many messages, so a read never decodes more than that many
/// records of the room to find one.
pub const EXTENT_MAX_RECORDS: u64 = 64;
/// An extent spans at most this many bytes of its segment (other rooms' records included),
/// so a read of one extent is one bounded `pread`.
pub const EXTENT_MAX_SPAN: u64 = 256 * 1024;

/// Consecutive messages of one room in one segment: `first_seq..=last_seq`, all within bytes
/// `start..end` of segment `segment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First sequence.
    pub first_seq: u64,
    /// Last sequence.
    pub last_seq: u64,
    /// The segment's id.
    pub segment: u64,
    /// Offset of the first message's record.
    pub start: u64,
    /// Offset just past the last message's record.
    pub end: u64,
    /// Payload bytes of its messages.
    pub payload_bytes: u64,
    /// Timestamp of its last message, ms since the Unix epoch.
    pub last_ts_ms: u64,
}

/// One room as the log knows it.
#[derive(Debug, Clone)]
pub struct RoomState {
    /// Its name.
    pub name: RoomName,
    /// Its current epoch (0 until an epoch record).
    pub epoch: u64,
    /// Its last sequence.
    pub head: u64,
    /// The first sequence still stored (`head + 1` when none is).
    pub first_retained: u64,
    /// Where its stored messages lie, by ascending sequence.
    pub extents: VecDeque<Extent>,
    /// Members (rooms) or subscribers (channels), with their join points.
    pub members: HashMap<Text, JoinPoint>,
    /// Users who blocked it (channels).
    pub blocked: HashSet<Text>,
    /// Members' receipts markers in the current epoch (members only).
    pub markers: HashMap<Text, StoredMarkers>,
}

/// A member's receipts markers as the log holds them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredMarkers {
    /// Delivered up to.
    pub delivered: u64,
    /// Read up to.
    pub read: u64,
}

impl RoomState {
    fn new(name: RoomName) -> Self {
        RoomState {
            name,
            epoch: 0,
            head: 0,
            first_retained: 1,
            extents: VecDeque::new(),
            members: HashMap::new(),
            blocked: HashSet::new(),
            markers: HashMap::new(),
        }
    }

    /// Payload bytes of the stored messages (at extent granularity).
    pub fn stored_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.payload_bytes).sum()
    }

    fn index(&mut self, seq: u64, at: Location, payload: u64, ts_ms: u64) {
        push_extent(&mut self.extents, seq, at, payload, ts_ms);
        if self.extents.len() == 1 && self.extents[0].first_seq == seq {
            self.first_retained = self.first_retained.min(seq).max(1);
        }
    }

    /// Replaces the extents covering `first..=last` by `copied` (a compaction run).
    fn replace(&mut self, first: u64, last: u64, copied: VecDeque<Extent>) {
        let mut kept: VecDeque<Extent> = self
            .extents
            .drain(..)
            .filter(|e| e.last_seq < first || e.first_seq > last)
            .collect();
        let at = kept
            .iter()
            .position(|e| e.first_seq > last)
            .unwrap_or(kept.len());
        for (i, e) in copied.into_iter().enumerate() {
            kept.insert(at + i, e);
        }
        self.extents = kept;
    }
}

/// Where a record lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// The segment's id.
    pub segment: u64,
    /// The record's offset in it.
    pub offset: u64,
    /// The record's length.
    pub len: u64,
}

fn push_extent(extents: &mut VecDeque<Extent>, seq: u64, at: Location, payload: u64, ts: u64) {
    let end = at.offset + at.len;
    if let Some(last) = extents.back_mut()
        && last.segment == at.segment
        && last.last_seq + 1 == seq
        && seq - last.first_seq < EXTENT_MAX_RECORDS
        && end - last.start <= EXTENT_MAX_SPAN
        && at.offset >= last.end
    {
        last.last_seq = seq;
        last.end = end;
        last.payload_bytes += payload;
        last.last_ts_ms = ts;
        return;
    }
    extents.push_back(Extent {
        first_seq: seq,
        last_seq: seq,
        segment: at.segment,
        start: at.offset,
        end,
        payload_bytes: payload,
        last_ts_ms: ts,
    });
}

/// What applying a record found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The record changed the state as it says.
    Done,
    /// A message whose sequence does not follow its room's head: messages in between were
    /// lost (recovery reports the room). It was applied as the new head.
    Gap(RoomKey),
    /// A record of a room the log does not know and which does not name it: its room's
    /// earlier records were lost. Not applied.
    Orphan(RoomKey),
}

/// A worker log's rooms, keys and next LSN.
#[derive(Debug, Default, Clone)]
pub struct LogState {
    /// Rooms by key.
    pub rooms: HashMap<RoomKey, RoomState>,
    /// Keys by name.
    pub keys: HashMap<RoomName, RoomKey>,
    /// The LSN the next record gets.
    pub next_lsn: Lsn,
    /// A compaction run being read back: its room and the extents of its copies so far.
    copy_run: Option<(RoomKey, VecDeque<Extent>)>,
}

impl LogState {
    /// An empty log.
    pub fn new() -> Self {
        LogState {
            next_lsn: 1,
            ..LogState::default()
        }
    }

    /// The key of `name`, assigning one (its id, or the next free value) if it has none.
    /// Returns whether the room is new.
    pub fn key_for(&mut self, name: &RoomName) -> (RoomKey, bool) {
        if let Some(&key) = self.keys.get(name) {
            return (key, false);
        }
        let mut key = name.id;
        while self.rooms.contains_key(&key) {
            key = key.wrapping_add(1);
        }
        self.insert_room(key, name.clone());
        (key, true)
    }

    fn insert_room(&mut self, key: RoomKey, name: RoomName) {
        self.keys.insert(name.clone(), key);
        self.rooms.insert(key, RoomState::new(name));
    }

    /// Applies one record found at `at`. The record's LSN becomes the last one applied.
    pub fn apply(&mut self, rec: &Record<'_>, at: Location) -> Applied {
        let h = rec.header;
        self.next_lsn = h.lsn + 1;
        let key = h.key;
        if let Some((channel, name)) = rec.name
            && !self.rooms.contains_key(&key)
        {
            let name = RoomName::new(channel, Text::from(name));
            // The name may be known under another key only if that room was dropped and
            // this is a new one: the record's key wins.
            if let Some(old) = self.keys.remove(&name) {
                self.rooms.remove(&old);
            }
            self.insert_room(key, name);
        }
        if matches!(rec.body, Body::Drop) {
            if let Some(room) = self.rooms.remove(&key) {
                self.keys.remove(&room.name);
            }
            return Applied::Done;
        }
        let Some(room) = self.rooms.get_mut(&key) else {
            return Applied::Orphan(key);
        };
        match rec.body {
            Body::Message { ts_ms, payload, .. } if h.flags & FLAG_COPY != 0 => {
                let run = match &mut self.copy_run {
                    Some((k, run)) if *k == key => run,
                    _ => &mut self.copy_run.insert((key, VecDeque::new())).1,
                };
                push_extent(run, h.seq, at, payload.len() as u64, ts_ms);
            }
            Body::Message { ts_ms, payload, .. } => {
                let gap = h.seq != room.head + 1;
                room.head = h.seq;
                if gap {
                    // What was stored before the gap no longer leads up to the head.
                    room.extents.clear();
                    room.first_retained = h.seq;
                }
                room.index(h.seq, at, payload.len() as u64, ts_ms);
                if gap {
                    return Applied::Gap(key);
                }
            }
            Body::CopyEnd { first_seq } => {
                if let Some((k, run)) = self.copy_run.take()
                    && k == key
                {
                    room.replace(first_seq, h.seq, run);
                }
            }
            Body::Epoch { epoch } => {
                room.epoch = epoch;
                room.head = h.seq;
                room.first_retained = h.seq + 1;
                room.extents.clear();
                room.markers.clear();
            }
            Body::Join { epoch, user } => {
                // Serial 0: see the checkpoint's reader.
                let join = JoinPoint {
                    epoch,
                    seq: h.seq,
                    serial: 0,
                };
                room.members.insert(Text::from(user), join);
            }
            Body::Leave { user } => {
                // By `Text`, not `&str`: `Text` hashes as bytes, `str` does not.
                let user = Text::from(user);
                room.members.remove(&user);
                room.markers.remove(&user);
            }
            Body::Markers { epoch, read, user } => {
                let user = Text::from(user);
                if epoch == room.epoch && room.members.contains_key(&user) {
                    let m = room.markers.entry(user).or_default();
                    m.delivered = m.delivered.max(h.seq);
                    m.read = m.read.max(read);
                }
            }
            Body::Block { blocked, user } => {
                if blocked {
                    room.blocked.insert(Text::from(user));
                } else {
                    room.blocked.remove(&Text::from(user));
                }
            }
            Body::Drop => {}
        }
        Applied::Done
    }

    /// Forgets every stored message of rooms in segment `segment` (it was quarantined or
    /// vanished); returns the keys of the rooms that lost some.
    pub fn forget_segment(&mut self, segment: u64) -> Vec<RoomKey> {
        let mut hit = Vec::new();
        for (&key, room) in &mut self.rooms {
            if room.extents.iter().any(|e| e.segment == segment) {
                hit.push(key);
                // Keep only what follows the last extent in that segment: history must
                // stay a contiguous run up to the head.
                if let Some(pos) = room.extents.iter().rposition(|e| e.segment == segment) {
                    room.extents.drain(..=pos);
                }
                room.first_retained = room.extents.front().map_or(room.head + 1, |e| e.first_seq);
            }
        }
        hit.sort_unstable();
        hit
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use super::*;
    use crate::storage::record::{Header, Record};

    fn rec<'a>(
        lsn: u64,
        key: u64,
        seq: u64,
        flags: u8,
        name: Option<&'a str>,
        body: Body<'a>,
    ) -> Record<'a> {
        Record {
            header: Header {
                len: 100,
                body_crc: 0,
                kind: 0,
                flags,
                lsn,
                key,
                seq,
            },
            name: name.map(|n| (false, n)),
            body,
        }
    }

    fn msg(seq: u64) -> Body<'static> {
        Body::Message {
            ts_ms: seq,
            flags: 0,
            sender: "s",
            payload: b"0123456789",
            publish_id: None,
        }
    }

    fn at(segment: u64, offset: u64) -> Location {
        Location {
            segment,
            offset,
            len: 100,
        }
    }

    #[test]
    fn messages_extend_extents_until_a_bound_or_a_new_segment() {
        let mut s = LogState::new();
        s.apply(
            &rec(1, 7, 0, 0, Some("r"), Body::Epoch { epoch: 5 }),
            at(1, 40),
        );
        for seq in 1..=70 {
            s.apply(
                &rec(seq + 1, 7, seq, 0, None, msg(seq)),
                at(1, 40 + seq * 100),
            );
        }
        s.apply(&rec(72, 7, 71, 0, None, msg(71)), at(2, 40));
        let room = &s.rooms[&7];
        assert_eq!((room.epoch, room.head, room.first_retained), (5, 71, 1));
        let spans: Vec<_> = room
            .extents
            .iter()
            .map(|e| (e.first_seq, e.last_seq, e.segment))
            .collect();
        assert_eq!(spans, vec![(1, 64, 1), (65, 70, 1), (71, 71, 2)]);
        assert_eq!(room.stored_bytes(), 710);
        assert_eq!(s.next_lsn, 73);
    }

    #[test]
    fn a_copy_run_replaces_the_old_extents_only_once_it_ends() {
        let mut s = LogState::new();
        s.apply(
            &rec(1, 7, 0, 0, Some("r"), Body::Epoch { epoch: 5 }),
            at(1, 40),
        );
        for seq in 1..=3 {
            s.apply(
                &rec(seq + 1, 7, seq, 0, None, msg(seq)),
                at(1, 40 + seq * 100),
            );
        }
        for seq in 1..=3 {
            s.apply(
                &rec(seq + 4, 7, seq, FLAG_COPY, Some("r"), msg(seq)),
                at(9, seq * 100),
            );
            assert_eq!(s.rooms[&7].extents[0].segment, 1, "not before the end");
        }
        s.apply(
            &rec(8, 7, 3, 0, None, Body::CopyEnd { first_seq: 1 }),
            at(9, 400),
        );
        let room = &s.rooms[&7];
        assert_eq!(room.extents.len(), 1);
        assert_eq!(
            (
                room.extents[0].segment,
                room.extents[0].first_seq,
                room.head
            ),
            (9, 1, 3)
        );
    }

    #[test]
    fn gaps_orphans_membership_and_drop() {
        let mut s = LogState::new();
        assert_eq!(
            s.apply(&rec(1, 9, 4, 0, None, msg(4)), at(1, 40)),
            Applied::Orphan(9)
        );
        s.apply(
            &rec(2, 7, 0, 0, Some("r"), Body::Epoch { epoch: 5 }),
            at(1, 40),
        );
        assert_eq!(
            s.apply(&rec(3, 7, 1, 0, None, msg(1)), at(1, 140)),
            Applied::Done
        );
        assert_eq!(
            s.apply(&rec(4, 7, 3, 0, None, msg(3)), at(1, 240)),
            Applied::Gap(7)
        );
        assert_eq!(s.rooms[&7].first_retained, 3);
        s.apply(
            &rec(
                5,
                7,
                3,
                0,
                None,
                Body::Join {
                    epoch: 5,
                    user: "ann",
                },
            ),
            at(1, 340),
        );
        s.apply(
            &rec(
                6,
                7,
                0,
                0,
                None,
                Body::Block {
                    blocked: true,
                    user: "bo",
                },
            ),
            at(1, 440),
        );
        assert_eq!(
            s.rooms[&7].members[&Text::from("ann")],
            JoinPoint {
                epoch: 5,
                seq: 3,
                serial: 0
            }
        );
        assert!(s.rooms[&7].blocked.contains(&Text::from("bo")));
        s.apply(
            &rec(7, 7, 0, 0, None, Body::Leave { user: "ann" }),
            at(1, 540),
        );
        assert!(s.rooms[&7].members.is_empty());
        s.apply(&rec(8, 7, 0, 0, None, Body::Drop), at(1, 640));
        assert!(s.rooms.is_empty() && s.keys.is_empty());
    }

    #[test]
    fn colliding_ids_get_distinct_keys() {
        let mut s = LogState::new();
        let a = RoomName::new(false, Text::from("a"));
        // As if b collided with a on purpose.
        let b = RoomName::with_id(a.id, false, Text::from("b"));
        let (ka, new_a) = s.key_for(&a);
        let (kb, new_b) = s.key_for(&b);
        assert!(new_a && new_b && ka != kb);
        assert_eq!(s.key_for(&b), (kb, false));
    }
}
