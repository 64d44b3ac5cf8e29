//! Identities shared by every part of the relay: room and user names, cores, connection
//! origins.
//!
//! Owns: the types only. Must not hold state (a room's or user's shared name record is a
//! value, freed with its last handle; there is no interner).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arcstr::ArcStr;
use bytes::Bytes;
use pabal_codec::{Text, room_id};

/// `Debug` and `Display` for a name type with an `as_str`: written as the name (quoted by
/// `Debug`, as a `str` is), so logs and test failures read the same whichever form holds it.
macro_rules! fmt_as_str {
    ($name:ty) => {
        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Debug::fmt(self.as_str(), f)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use fmt_as_str;

/// Index of a worker (one per core).
pub type CoreId = usize;

/// What names a room: its kind, its name and the 64-bit id derived from both. One record
/// per room, shared by every [`RoomName`] that names it: 32 bytes in its reference-counted
/// block, and the name's bytes in an exact block of their own (a `Text` took 32 bytes of
/// the record and the bytes' block: 64 and 16 bytes for a 1:1 room's name, 48 and 16 now).
#[derive(Debug)]
pub struct RoomRecord {
    /// `room_id(channel, name)`.
    pub id: u64,
    /// A broadcast channel rather than a room.
    pub channel: bool,
    /// The name.
    pub name: RoomText,
}

/// A room's name in its record: the bytes in an exact boxed `str` (a frame or a record
/// that carries the name as a `Text` copies it, see [`RoomText::text`]).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RoomText(Box<str>);

impl RoomText {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name, as a `Text`: a copy (for a frame or a stored record; never per delivery).
    pub fn text(&self) -> Text {
        Text::from(self.as_str())
    }
}

impl std::ops::Deref for RoomText {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

fmt_as_str!(RoomText);

impl PartialEq<Text> for RoomText {
    fn eq(&self, other: &Text) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<str> for RoomText {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
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
    /// Names a room (`channel = false`) or channel: a record holding a copy of the name.
    pub fn new(channel: bool, name: impl std::borrow::Borrow<str>) -> Self {
        let name: &str = name.borrow();
        RoomName(Arc::new(RoomRecord {
            id: room_id(channel, name),
            channel,
            name: RoomText(name.into()),
        }))
    }

    /// A name with the given id instead of the one derived from it: what an id collision
    /// (which anyone can make on purpose) looks like, for tests of collision handling.
    #[cfg(test)]
    pub(crate) fn with_id(id: u64, channel: bool, name: Text) -> Self {
        RoomName(Arc::new(RoomRecord {
            id,
            channel,
            name: RoomText(name.as_str().into()),
        }))
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

/// A user's name as a shared handle (8 bytes): one record per connected user, made at HELLO
/// and shared by the connection's record, the worker's user → connections map, the
/// directory's key and the member sets of the user's rooms (each held a 32-byte `Text`
/// before, about 150 bytes per idle phone with the maps' load factor). The record is one
/// heap block holding the reference count, the length and the name's bytes (32 bytes for a
/// name of up to 16 bytes; an `Arc` of a `Text` took a 48-byte block and the bytes' own
/// block, 64 bytes). Cloned by reference count, read through `Deref` as the name's `str`
/// (so `&user` passes where a `&str` is asked for). Two handles made apart for the same
/// name are equal; the directory hands out its own (see `Added::user`) so that a room's
/// member set shares the connection's. No interner: the record is freed with its last
/// handle.
///
/// Compares and hashes as the name (exact; the same record is equal without comparing
/// bytes), so a map keyed by it is searched with a `&str`.
#[derive(Clone)]
pub struct UserName(ArcStr);

impl UserName {
    /// A handle to a new record holding a copy of `name`.
    pub fn new(name: &str) -> Self {
        UserName(ArcStr::from(name))
    }

    /// The name, as a `Text`: a copy of the bytes (for a frame or a record that carries the
    /// name; never per delivery).
    pub fn text(&self) -> Text {
        Text::from(self.as_str())
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// Whether both handles share one record.
    pub fn same_record(&self, other: &UserName) -> bool {
        ArcStr::ptr_eq(&self.0, &other.0)
    }
}

impl std::ops::Deref for UserName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for UserName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

fmt_as_str!(UserName);

impl PartialEq for UserName {
    fn eq(&self, other: &Self) -> bool {
        self.same_record(other) || self.as_str() == other.as_str()
    }
}

impl Eq for UserName {}

impl PartialEq<Text> for UserName {
    fn eq(&self, other: &Text) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<str> for UserName {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl Hash for UserName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As the `str` hashes (`Borrow<str>` requires equal hashes).
        self.as_str().hash(state);
    }
}

impl From<&Text> for UserName {
    fn from(name: &Text) -> Self {
        UserName::new(name.as_str())
    }
}

impl From<Text> for UserName {
    fn from(name: Text) -> Self {
        UserName::new(name.as_str())
    }
}

impl From<&str> for UserName {
    fn from(name: &str) -> Self {
        UserName::new(name)
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
    /// Who published it: the publishing connection's name record, shared (a local
    /// publish), or the bytes it arrived in.
    pub sender: crate::sender_name::SenderName,
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

    #[test]
    fn a_user_name_is_a_shared_handle_found_by_its_text() {
        assert_eq!(std::mem::size_of::<UserName>(), 8);
        assert_eq!(std::mem::size_of::<Option<UserName>>(), 8);
        let ann = UserName::from("ann");
        let copy = ann.clone();
        assert!(copy.same_record(&ann), "a clone shares the record");
        let again = UserName::from("ann");
        assert!(!again.same_record(&ann));
        assert_eq!(again, ann, "equal by name, whatever the record");
        assert_ne!(UserName::from("bob"), ann);
        assert_eq!(ann, Text::from("ann"));
        // A map keyed by handles is searched with the name (equal hashes).
        let map: std::collections::HashMap<UserName, u32> = [(ann.clone(), 7)].into();
        assert_eq!(map.get("ann"), Some(&7));
        assert_eq!(map.get(Text::from("ann").as_str()), Some(&7));
        assert_eq!(map.get("bob"), None);
        let (key, _) = map.get_key_value("ann").expect("found by its name");
        assert!(key.same_record(&ann));
        // One record, counted: the handle, its clone and the map's key; no interner
        // keeps another.
        assert_eq!(ArcStr::strong_count(&ann.0), Some(3));
        drop(map);
        assert_eq!(ArcStr::strong_count(&ann.0), Some(2));
        // A frame's `Text` is a copy, not a share of the record.
        assert_eq!(ann.text().as_str(), "ann");
        assert_eq!(ArcStr::strong_count(&ann.0), Some(2));
    }
}
