//! Identities shared by every part of the relay: room names, cores, connection origins.
//!
//! Owns: the types only. Must not hold state (a room's shared name record is a value,
//! freed with its last handle).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytes::Bytes;
use pabal_codec::{Text, room_id};

/// Index of a worker (one per core).
pub type CoreId = usize;

/// What names a room: its kind, its name and the 64-bit id derived from both. One record
/// per room, shared by every [`RoomName`] that names it.
#[derive(Debug)]
pub struct RoomRecord {
    /// `room_id(channel, name)`.
    pub id: u64,
    /// A broadcast channel rather than a room.
    pub channel: bool,
    /// The name.
    pub name: Text,
}

/// A room or a channel, by kind and name: a shared handle (8 bytes) to one [`RoomRecord`],
/// cloned by reference count, read through `Deref` (`room.id`, `room.channel`,
/// `room.name`). The directory, the owner's map, the worker's subscriber lists and every
/// binding hold clones of the same record (the owner's: see `join_member`), so a room's
/// name is stored once, not once per member and binding (it was 48 bytes in each place).
/// No interner: the record lives as long as something names the room and is freed with
/// the last handle.
///
/// Compares by kind and name (exact; the same record is equal without comparing bytes), so
/// an id collision can never merge two rooms, and hashes by kind and name too: the 64-bit
/// id is FNV-1a, which anyone can collide on purpose, so keying maps by it would let a
/// client degrade a worker's room maps; hashed by name, the maps' keyed hasher (std's
/// randomly seeded SipHash) decides.
#[derive(Clone)]
pub struct RoomName(Arc<RoomRecord>);

impl RoomName {
    /// Names a room (`channel = false`) or channel.
    pub fn new(channel: bool, name: Text) -> Self {
        RoomName(Arc::new(RoomRecord {
            id: room_id(channel, name.as_str()),
            channel,
            name,
        }))
    }

    /// A name with the given id instead of the one derived from it: what an id collision
    /// (which anyone can make on purpose) looks like, for tests of collision handling.
    #[cfg(test)]
    pub(crate) fn with_id(id: u64, channel: bool, name: Text) -> Self {
        RoomName(Arc::new(RoomRecord { id, channel, name }))
    }

    /// The worker that owns this room: assigns its sequences and keeps its history.
    pub fn owner(&self, cores: usize) -> CoreId {
        // The id is FNV-1a; fold the high half in so the low bits are well mixed.
        ((self.id ^ (self.id >> 32)) % cores as u64) as CoreId
    }

    /// Whether both handles share one record (then they are equal without comparing).
    pub fn same_record(&self, other: &RoomName) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::ops::Deref for RoomName {
    type Target = RoomRecord;

    fn deref(&self) -> &RoomRecord {
        &self.0
    }
}

impl std::fmt::Debug for RoomName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomName")
            .field("id", &self.id)
            .field("channel", &self.channel)
            .field("name", &self.name)
            .finish()
    }
}

impl PartialEq for RoomName {
    fn eq(&self, other: &Self) -> bool {
        self.same_record(other)
            || (self.id == other.id && self.channel == other.channel && self.name == other.name)
    }
}

impl Eq for RoomName {}

impl Hash for RoomName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u8(u8::from(self.channel));
        state.write(self.name.as_bytes());
    }
}

/// A connection, relay-wide: the worker that holds it and its token there. Tokens carry a
/// generation, so an origin never names a later connection that reused the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    /// The worker.
    pub core: CoreId,
    /// The connection's token on that worker.
    pub token: u64,
}

/// A message accepted into a room: what history keeps and what every recipient's frame is
/// built from. Shared by reference count between history and the workers delivering it.
#[derive(Debug)]
pub struct Stored {
    /// Its sequence in the room.
    pub seq: u64,
    /// When the owner accepted it, ms since the Unix epoch.
    pub ts_ms: u64,
    /// When the owner accepted it, on the monotonic clock (for the relay's own latency).
    pub accepted_at: std::time::Instant,
    /// Who published it.
    pub sender: Text,
    /// The connection that published it (never echoed back to it); `None` for the server API.
    pub origin: Option<Origin>,
    /// The body, exactly as published.
    pub payload: Bytes,
}

/// A shared [`Stored`].
pub type StoredRef = Arc<Stored>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_name_is_a_shared_handle_that_compares_by_kind_and_name() {
        assert_eq!(std::mem::size_of::<RoomName>(), 8);
        assert_eq!(std::mem::size_of::<Option<RoomName>>(), 8);
        let a = RoomName::new(false, Text::from("dm:1"));
        let copy = a.clone();
        assert!(copy.same_record(&a), "a clone shares the record");
        // Another record with the same kind and name is the same room, in maps too.
        let again = RoomName::new(false, Text::from("dm:1"));
        assert!(!again.same_record(&a));
        assert_eq!(again, a);
        let set: std::collections::HashSet<RoomName> = [a.clone()].into_iter().collect();
        assert!(set.contains(&again));
        // The kind is part of the name; an id collision never merges two rooms.
        assert_ne!(RoomName::new(true, Text::from("dm:1")), a);
        assert_ne!(RoomName::with_id(a.id, false, Text::from("dm:2")), a);
        assert_eq!(
            (a.id, a.channel, a.name.as_str()),
            (room_id(false, "dm:1"), false, "dm:1")
        );
    }
}
