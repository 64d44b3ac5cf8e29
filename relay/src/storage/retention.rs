//! Retention on disk: trims each room to its count, byte and age limits (per name prefix,
//! the same [`Retention`] the in-memory history uses), lets whole segments go once no room
//! keeps anything in them, and copies a cold room's live tail forward when it alone pins an
//! old segment.
//!
//! Owns: [`WorkerLog::apply_retention`] and the compaction it may run. Must not delete files
//! itself: a segment becomes deletable here, and is deleted with the next checkpoint, once
//! two generations of checkpoint cover it (see [`super::log`]).
//!
//! Granularity: trimming by count is exact; by bytes and age it drops whole extents (at
//! most [`super::state::EXTENT_MAX_RECORDS`] messages), so the disk may keep a little more
//! than the limits, never less.

use std::collections::HashMap;

use super::record::{Body, FLAG_COPY};
use super::state::RoomState;
use super::{RoomKey, StorageError, StoredMessage, WorkerLog};
use crate::config::Retention;
use crate::ids::RoomName;

/// What one retention pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// Rooms whose first retained sequence moved.
    pub rooms_trimmed: u64,
    /// Rooms whose live tail was copied forward.
    pub rooms_copied: u64,
    /// Messages copied.
    pub records_copied: u64,
    /// Segments no room keeps anything in any more (deleted with the next checkpoint).
    pub segments_released: u64,
}

/// A room whose retained history is at most this fraction of a segment is cold enough to
/// be copied forward rather than pin an old segment.
const COLD_ROOM_FRACTION: u64 = 16;
/// At most this fraction of a segment is copied forward per pass.
const COPY_BUDGET_FRACTION: u64 = 4;

fn trim(room: &mut RoomState, r: Retention, now_ms: u64) -> bool {
    let before = room.first_retained;
    let mut first = room.first_retained;
    if room.head >= r.max_messages as u64 {
        first = first.max(room.head + 1 - r.max_messages as u64);
    }
    let max_age = r.max_age.as_millis() as u64;
    while room
        .extents
        .front()
        .is_some_and(|e| e.last_seq < first || e.last_ts_ms.saturating_add(max_age) < now_ms)
    {
        room.extents.pop_front();
    }
    let mut bytes = room.stored_bytes();
    while let Some(e) = room.extents.front().copied() {
        if room.extents.len() > 1 && bytes - e.payload_bytes >= r.max_bytes as u64 {
            bytes -= e.payload_bytes;
            room.extents.pop_front();
        } else {
            break;
        }
    }
    room.first_retained = match room.extents.front() {
        Some(e) => first.max(e.first_seq),
        None => room.head + 1,
    };
    room.first_retained != before
}

impl WorkerLog {
    /// Trims every room per `policy` at `now_ms` (ms since the Unix epoch), then, if the
    /// oldest segment is pinned only by cold rooms, copies their live tails forward.
    /// Call every few seconds; the work is proportional to the rooms and their extents.
    pub fn apply_retention(
        &mut self,
        now_ms: u64,
        policy: &dyn Fn(&RoomName) -> Retention,
    ) -> RetentionOutcome {
        let mut out = RetentionOutcome::default();
        for room in self.state.rooms.values_mut() {
            if trim(room, policy(&room.name), now_ms) {
                out.rooms_trimmed += 1;
            }
        }
        if out.rooms_trimmed > 0 {
            self.state_dirty = true;
        }
        // Who keeps what where.
        let mut pins: HashMap<u64, Vec<RoomKey>> = HashMap::new();
        for (&key, room) in &self.state.rooms {
            for e in &room.extents {
                let rooms = pins.entry(e.segment).or_default();
                if rooms.last() != Some(&key) {
                    rooms.push(key);
                }
            }
        }
        out.segments_released = self
            .segments
            .keys()
            .filter(|&&id| id != self.active && !pins.contains_key(&id))
            .count() as u64;
        if out.segments_released > 0 {
            self.releasable = true;
        }
        // The oldest segment, if cold rooms alone keep it, and older than the previous one
        // (there is a newer closed segment): copy those rooms forward.
        let Some((&oldest, _)) = self.segments.iter().next() else {
            return out;
        };
        let Some(rooms) = pins.get(&oldest).filter(|_| self.segments.len() >= 3) else {
            return out;
        };
        let cold = self.opts.segment_size / COLD_ROOM_FRACTION;
        let budget = self.opts.segment_size / COPY_BUDGET_FRACTION;
        let sizes: Vec<u64> = rooms
            .iter()
            .map(|k| {
                self.state
                    .rooms
                    .get(k)
                    .map_or(u64::MAX, RoomState::stored_bytes)
            })
            .collect();
        if sizes.iter().any(|&b| b > cold) || sizes.iter().sum::<u64>() > budget {
            return out;
        }
        for key in rooms.clone() {
            match self.copy_forward(key) {
                Ok(n) if n > 0 => {
                    out.rooms_copied += 1;
                    out.records_copied += n;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "storage: compaction skipped a room");
                    break;
                }
            }
        }
        self.metrics.records_copied += out.records_copied;
        out
    }

    /// Copies the room's whole retained history to the end of the log (one run of copies
    /// closed by a `CopyEnd`, applied as one on recovery). Returns the messages copied; 0
    /// when its tail is not all written yet.
    fn copy_forward(&mut self, key: RoomKey) -> Result<u64, StorageError> {
        let room = self.room_state(key)?;
        let (first, head) = (room.first_retained, room.head);
        if first > head {
            return Ok(0);
        }
        let mut msgs: Vec<StoredMessage> = Vec::new();
        let page = self.read_page(key, first - 1, usize::MAX, usize::MAX, &mut msgs)?;
        if !page.complete || msgs.first().is_none_or(|m| m.seq != first) {
            return Ok(0);
        }
        for m in &msgs {
            let body = Body::Message {
                ts_ms: m.ts_ms,
                flags: m.flags,
                sender: m.sender.as_str(),
                payload: &m.payload,
                publish_id: m.publish_id,
            };
            self.append(key, m.seq, FLAG_COPY, body)?;
        }
        self.append(key, head, 0, Body::CopyEnd { first_seq: first })?;
        Ok(msgs.len() as u64)
    }
}
