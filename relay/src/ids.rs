//! Identities shared by every part of the relay: room names, cores, connection origins.
//!
//! Owns: the types only. Must not hold state.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytes::Bytes;
use pabal_codec::{Text, room_id};

/// Index of a worker (one per core).
pub type CoreId = usize;

/// A room or a channel, by kind and name. Compares by kind and name (exact), so an id
/// collision can never merge two rooms, and hashes by kind and name too: the 64-bit id is
/// FNV-1a, which anyone can collide on purpose, so keying maps by it would let a client
/// degrade a worker's room maps; hashed by name, the maps' keyed hasher (std's randomly
/// seeded SipHash) decides.
#[derive(Clone, Debug)]
pub struct RoomName {
    /// `room_id(channel, name)`.
    pub id: u64,
    /// A broadcast channel rather than a room.
    pub channel: bool,
    /// The name.
    pub name: Text,
}

impl RoomName {
    /// Names a room (`channel = false`) or channel.
    pub fn new(channel: bool, name: Text) -> Self {
        RoomName {
            id: room_id(channel, name.as_str()),
            channel,
            name,
        }
    }

    /// The worker that owns this room: assigns its sequences and keeps its history.
    pub fn owner(&self, cores: usize) -> CoreId {
        // The id is FNV-1a; fold the high half in so the low bits are well mixed.
        ((self.id ^ (self.id >> 32)) % cores as u64) as CoreId
    }
}

impl PartialEq for RoomName {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.channel == other.channel && self.name == other.name
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
