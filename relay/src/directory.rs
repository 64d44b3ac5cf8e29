//! The membership directory: which rooms each user belongs to, which channels they follow
//! or blocked, and which workers hold their live connections.
//!
//! This is the one structure the workers share, because the app servers' social graph is
//! relay-wide. It is touched only when a connection opens or closes and when membership
//! changes, never per message: the hot path (publish, fan-out) runs on per-worker state and
//! message passing. It is sharded by user behind `parking_lot` locks so that a reconnect
//! storm on many cores does not serialise on one lock.
//!
//! Owns: membership and presence. Must not touch: sequences, history, connections' queues.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::RwLock;
use thiserror::Error;

use crate::ids::{CoreId, RoomName, UserName};

mod packed_join;
use packed_join::PackedJoin;

/// Where a member's stream starts: the room's epoch and last sequence when they joined. A
/// connection that binds the room without a resume entry replays from here (within
/// retention), so nothing published after the join is missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinPoint {
    /// The room's epoch at the join.
    pub epoch: u64,
    /// The room's head at the join.
    pub seq: u64,
    /// Which membership this is among the user's memberships of the room (assigned by the
    /// owner, increasing): a removal names the membership it ends, so a connection bound by
    /// a later membership is never unbound by a late message about an earlier one.
    pub serial: u64,
}

/// A user's rooms and their join points: an exact boxed slice kept sorted by room id (a
/// user belongs to a few rooms; a hash map would cost several times the entries it holds,
/// and a vector's capacity field 8 bytes more per user), searched by binary search; rooms
/// whose ids collide sit next to each other and are told apart by name. Each entry is 24
/// bytes: the room's shared name handle and its join point packed ([`PackedJoin`]; 32
/// bytes with the three fields whole).
#[derive(Debug, Default)]
struct RoomMap(Box<[(RoomName, PackedJoin)]>);

impl RoomMap {
    /// Where `room` is, or where it would go.
    fn find(&self, room: &RoomName) -> Result<usize, usize> {
        let start = self.0.partition_point(|(r, _)| r.id < room.id);
        self.0[start..]
            .iter()
            .take_while(|(r, _)| r.id == room.id)
            .position(|(r, _)| r == room)
            .map(|i| start + i)
            .ok_or(start)
    }

    fn get(&self, room: &RoomName) -> Option<JoinPoint> {
        self.find(room).ok().map(|i| self.0[i].1.unpack())
    }

    /// Joins and leaves only (never per message): each reallocates the exact slice.
    fn insert(&mut self, room: RoomName, join: JoinPoint) {
        let join = PackedJoin::pack(join);
        match self.find(&room) {
            Ok(i) => self.0[i].1 = join,
            Err(i) => {
                let mut rooms = std::mem::take(&mut self.0).into_vec();
                rooms.reserve_exact(1);
                rooms.insert(i, (room, join));
                self.0 = rooms.into_boxed_slice();
            }
        }
    }

    fn remove(&mut self, room: &RoomName) -> Option<JoinPoint> {
        let i = self.find(room).ok()?;
        let mut rooms = std::mem::take(&mut self.0).into_vec();
        let (_, join) = rooms.remove(i);
        self.0 = rooms.into_boxed_slice();
        Some(join.unpack())
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The rooms with their join points unpacked.
    fn iter(&self) -> impl Iterator<Item = (&RoomName, JoinPoint)> {
        self.0.iter().map(|(r, j)| (r, j.unpack()))
    }
}

/// What few users have: channels blocked, live connections on more than one worker. Kept
/// in a map of its own beside the users' (a shard's [`Shard::rare`]), so a user's entry
/// holds no pointer to it (8 bytes in every user's bucket, about 13 per phone at the map's
/// load factor); an entry exists only while one of the two is not empty.
#[derive(Debug, Default)]
struct UserRare {
    /// Channels the user blocked.
    blocked: HashSet<RoomName>,
    /// Workers past the first holding the user's connections, each with at least one.
    other_cores: Vec<(u32, u32)>,
}

impl UserRare {
    fn is_empty(&self) -> bool {
        self.blocked.is_empty() && self.other_cores.is_empty()
    }
}

/// One user's entry. Every user with a live connection has one, so its size is paid per
/// phone (24 bytes): the rooms and the first worker's connections inline (a phone's user
/// is on one worker); what few users have is in the shard's [`Shard::rare`].
#[derive(Debug, Default)]
struct UserEntry {
    rooms: RoomMap,
    /// `(worker, connections)` of the first worker holding the user's live connections;
    /// connections 0 when the user has none (an `Option` took 8 bytes more).
    first: (u32, u32),
}

impl UserEntry {
    fn is_offline(&self) -> bool {
        self.first.1 == 0
    }
}

/// One shard of the directory: the users, and what few of them have beside their entry.
#[derive(Debug, Default)]
struct Shard {
    /// Keyed by the user's shared handle, searched with the name's `Text`.
    users: HashMap<UserName, UserEntry>,
    /// Blocks and further workers, by the same handle, for users who have either (an entry
    /// here only beside one in `users`).
    rare: HashMap<UserName, UserRare>,
    /// Users the workers of a cluster node watch, with how many workers do
    /// ([`Membership::hold`]): empty off a cluster.
    held: HashMap<UserName, u32>,
    /// Memberships a removal in a room's order ended ([`Membership::end`]): empty off a
    /// cluster.
    ended: Ended,
}

/// Memberships that ended by a removal placed in their room's order (a cluster node,
/// [`Membership::end`]), as `(user, room, serial)`: a read of the user's rooms, or a join
/// notice, that still names one ran before the removal reached the user's side in the
/// engine, and must not bring it back. The newest [`ENDED_MAX`] per shard are kept (the
/// user's side changes a few milliseconds after the room's; this covers minutes of
/// removals at thousands a second).
#[derive(Debug, Default)]
struct Ended {
    set: HashSet<(UserName, RoomName, u64)>,
    order: std::collections::VecDeque<(UserName, RoomName, u64)>,
}

/// Ended memberships remembered per directory shard.
const ENDED_MAX: usize = 4096;

impl Ended {
    fn insert(&mut self, user: &str, room: &RoomName, serial: u64) {
        let key = (UserName::new(user), room.clone(), serial);
        if !self.set.insert(key.clone()) {
            return;
        }
        self.order.push_back(key);
        if self.order.len() > ENDED_MAX
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
    }

    fn contains(&self, user: &str, room: &RoomName, serial: u64) -> bool {
        !self.set.is_empty()
            && self
                .set
                .contains(&(UserName::new(user), room.clone(), serial))
    }
}

impl Shard {
    fn forget_if_offline(&mut self, user: &str) {
        if self.held.contains_key(user) {
            return;
        }
        if self.users.get(user).is_some_and(UserEntry::is_offline) {
            self.users.remove(user);
            self.rare.remove(user);
        }
    }

    /// `user`'s entry, made if missing, and the handle it is keyed by (at HELLO and
    /// membership changes only: a lookup more than an entry API would take, for not making
    /// a record when the user has one).
    fn entry_of(&mut self, user: &str) -> (UserName, &mut UserEntry) {
        let handle = match self.users.get_key_value(user) {
            Some((handle, _)) => handle.clone(),
            None => {
                // One block holding a copy of the name's bytes (never a share of the
                // caller's buffer, which would keep that buffer for as long as the record
                // lives).
                let handle = UserName::new(user);
                self.users.insert(handle.clone(), UserEntry::default());
                handle
            }
        };
        let entry = self.users.entry(handle.clone()).or_default();
        (handle, entry)
    }

    fn other_cores(&self, user: &str) -> &[(u32, u32)] {
        self.rare
            .get(user)
            .map_or(&[], |r| r.other_cores.as_slice())
    }

    /// `(worker, connections)` of every worker holding the user's live connections.
    fn conns<'a>(&'a self, user: &str) -> impl Iterator<Item = &'a (u32, u32)> + 'a {
        let first = self.users.get(user).map(|e| &e.first);
        first
            .filter(|f| f.1 > 0)
            .into_iter()
            .chain(self.other_cores(user).iter())
    }

    fn conn_count(&self, user: &str) -> u32 {
        self.conns(user).map(|&(_, n)| n).sum()
    }

    fn cores(&self, user: &str) -> Vec<CoreId> {
        self.conns(user).map(|&(c, _)| c as CoreId).collect()
    }

    /// The user's rare part, made if missing (the user's entry exists).
    fn rare_of(&mut self, handle: &UserName) -> &mut UserRare {
        self.rare.entry(handle.clone()).or_default()
    }

    /// Drops `user`'s rare part once empty, and their entry once unused (no room, nothing
    /// rare, no live connection).
    fn drop_unused(&mut self, user: &str) {
        if self.rare.get(user).is_some_and(UserRare::is_empty) {
            self.rare.remove(user);
        }
        if !self.rare.contains_key(user)
            && self
                .users
                .get(user)
                .is_some_and(|e| e.rooms.is_empty() && e.is_offline())
        {
            self.users.remove(user);
        }
    }

    fn add_conn(&mut self, handle: &UserName, core: CoreId) {
        let core = core as u32;
        let (_, entry) = self.entry_of(handle.as_str());
        if entry.first.1 == 0 {
            entry.first = (core, 1);
        } else if entry.first.0 == core {
            entry.first.1 += 1;
        } else {
            let rest = &mut self.rare_of(handle).other_cores;
            match rest.iter_mut().find(|(c, _)| *c == core) {
                Some((_, n)) => *n += 1,
                None => {
                    rest.reserve_exact(1);
                    rest.push((core, 1));
                }
            }
        }
    }

    fn remove_conn(&mut self, user: &str, core: CoreId) {
        let core = core as u32;
        let Some(entry) = self.users.get_mut(user) else {
            return;
        };
        if entry.first.1 > 0 && entry.first.0 == core {
            entry.first.1 -= 1;
            if entry.first.1 == 0 {
                entry.first = self
                    .rare
                    .get_mut(user)
                    .and_then(|r| r.other_cores.pop())
                    .unwrap_or_default();
            }
        } else if let Some(rare) = self.rare.get_mut(user)
            && let Some(i) = rare.other_cores.iter().position(|&(c, _)| c == core)
        {
            rare.other_cores[i].1 -= 1;
            if rare.other_cores[i].1 == 0 {
                rare.other_cores.swap_remove(i);
            }
        }
        self.drop_unused(user);
    }

    fn is_blocked(&self, user: &str, room: &RoomName) -> bool {
        self.rare
            .get(user)
            .is_some_and(|r| r.blocked.contains(room))
    }

    fn blocked_count(&self, user: &str) -> usize {
        self.rare.get(user).map_or(0, |r| r.blocked.len())
    }

    /// Unblocks `room`, dropping the user's rare part if that leaves it empty (never the
    /// user's entry: the caller holds its handle).
    fn unblock(&mut self, user: &str, room: &RoomName) {
        if let Some(rare) = self.rare.get_mut(user) {
            rare.blocked.remove(room);
            if rare.is_empty() {
                self.rare.remove(user);
            }
        }
    }
}

/// Why a membership change was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DirectoryError {
    /// The user blocked this channel.
    #[error("the user blocked {0}")]
    Blocked(String),
    /// The user already holds the maximum number of connections.
    #[error("the user already holds {max} connections")]
    TooManyConnections {
        /// The limit.
        max: usize,
    },
    /// The user already belongs to the maximum number of rooms.
    #[error("the user already belongs to {max} rooms and channels")]
    TooManyRooms {
        /// The limit.
        max: usize,
    },
    /// The user already blocks the maximum number of channels.
    #[error("the user already blocks {max} channels")]
    TooManyBlocks {
        /// The limit.
        max: usize,
    },
    /// The room's durable log did not take the change (`storage_full`: retry later, or
    /// `storage_failed`), so it was not made.
    #[error("{0}")]
    Storage(&'static str),
}

/// The outcome of removing a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The membership removed, if the user was a member.
    pub was: Option<JoinPoint>,
    /// Workers holding the user's live connections.
    pub cores: Vec<CoreId>,
    /// The block asked for was refused (the user blocks too many channels already); the
    /// user left all the same.
    pub block_refused: Option<DirectoryError>,
}

/// The outcome of adding a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    /// The user was not a member before.
    pub new: bool,
    /// The join point in force (the old one if the user was a member already).
    pub join: JoinPoint,
    /// Workers holding the user's live connections.
    pub cores: Vec<CoreId>,
    /// The directory's handle to the user's name, for the room's member set to share.
    pub user: UserName,
}

/// What a worker's core asks of the membership directory: on connect and disconnect, on
/// membership changes and when a connection binds a room; never per message. The relay's
/// [`Directory`] is one (sharded, behind locks no worker holds across a call); a durable or
/// clustered directory, or a simulation's, is another.
pub trait Membership: Send + Sync + std::fmt::Debug {
    /// A connection of `user` opened on `core`: records it and returns the directory's
    /// handle to the user's name (for the connection and the worker's maps to share) and
    /// the user's rooms with their join points, refused past `max_conns` connections.
    fn connect(
        &self,
        user: &str,
        core: CoreId,
        max_conns: usize,
    ) -> Result<(UserName, Vec<(RoomName, JoinPoint)>), DirectoryError>;
    /// A connection of `user` on `core` closed.
    fn disconnect(&self, user: &str, core: CoreId);
    /// Adds `user` to `room` at `join`: a no-op that reports the join point in force if the
    /// user is a member already; a blocked channel stays blocked unless `unblock`.
    fn add(
        &self,
        user: &str,
        room: &RoomName,
        join: JoinPoint,
        unblock: bool,
    ) -> Result<Added, DirectoryError>;
    /// Removes `user` from `room`, optionally blocking it (refused past the per-user cap on
    /// blocks: the user leaves all the same).
    fn remove(&self, user: &str, room: &RoomName, block: bool) -> Removed;
    /// A removal placed in `room`'s order (a cluster node, `core/cluster/order.rs`) ended
    /// `user`'s membership `serial`: it is removed if in force, and remembered as ended
    /// ([`Membership::ended`]) whether or not this directory held it.
    fn end(&self, user: &str, room: &RoomName, serial: u64) -> Removed;
    /// Whether `user`'s membership `serial` of `room` ended by a removal in the room's
    /// order ([`Membership::end`]): a read or notice naming it is older than the removal.
    fn ended(&self, user: &str, room: &RoomName, serial: u64) -> bool;
    /// Where `user`'s stream of `room` starts, if the user belongs to it.
    fn join_point(&self, user: &str, room: &RoomName) -> Option<JoinPoint>;
    /// Whether `user` blocked `room` (a channel).
    fn is_blocked(&self, user: &str, room: &RoomName) -> bool;
    /// Sets how many channels one user may block.
    fn set_max_blocked_per_user(&self, max: usize);
    /// `user`'s rooms with their join points, and the channels they blocked (a cluster
    /// node compares them with the engine's, see `core/cluster/members.rs`).
    fn snapshot(&self, user: &str) -> (Vec<(RoomName, JoinPoint)>, Vec<RoomName>);
    /// Drops everything held for `user` unless they have a live connection or a worker
    /// holds them (a cluster node holds a user's membership only while it holds a
    /// connection of theirs or waits to: the engine holds it for good).
    fn forget_if_offline(&self, user: &str);
    /// A worker of a cluster node watches `user` (their rooms are read into this directory
    /// for its HELLOs, and kept current by notices): what is held for them stays, connected
    /// or not, until every worker that holds them has released them.
    fn hold(&self, user: &str);
    /// The worker no longer watches `user`; then [`Membership::forget_if_offline`].
    fn release(&self, user: &str);
}

/// The relay-wide membership directory.
#[derive(Debug)]
pub struct Directory {
    shards: Box<[RwLock<Shard>]>,
    /// Picks a user's shard: keyed (randomly seeded SipHash), so no client can choose user
    /// ids that all land on one shard's lock.
    shard_of: std::collections::hash_map::RandomState,
    max_rooms_per_user: AtomicUsize,
    max_blocked_per_user: AtomicUsize,
}

impl Directory {
    /// An empty directory; each user may belong to at most `max_rooms_per_user` rooms (and
    /// block up to 1000 channels until [`Directory::set_max_blocked_per_user`]).
    pub fn new(shards: usize, max_rooms_per_user: usize) -> Self {
        let shards = shards.clamp(1, 1024).next_power_of_two();
        Directory {
            shards: (0..shards).map(|_| RwLock::new(Shard::default())).collect(),
            shard_of: std::collections::hash_map::RandomState::new(),
            max_rooms_per_user: AtomicUsize::new(max_rooms_per_user),
            max_blocked_per_user: AtomicUsize::new(1000),
        }
    }

    /// Changes the rooms-per-user limit (a reload): later joins are checked against it;
    /// a user above a lowered limit keeps their rooms but joins no more.
    pub fn set_max_rooms_per_user(&self, max: usize) {
        self.max_rooms_per_user.store(max, Ordering::Relaxed);
    }

    fn shard(&self, user: &str) -> &RwLock<Shard> {
        use std::hash::BuildHasher;
        let h = self.shard_of.hash_one(user.as_bytes());
        &self.shards[(h as usize) & (self.shards.len() - 1)]
    }

    /// Workers holding `user`'s live connections.
    pub fn cores_of(&self, user: &str) -> Vec<CoreId> {
        self.shard(user).read().cores(user)
    }

    /// The rooms and channels `user` belongs to.
    pub fn rooms_of(&self, user: &str) -> Vec<RoomName> {
        self.shard(user)
            .read()
            .users
            .get(user)
            .map(|e| e.rooms.iter().map(|(r, _)| r.clone()).collect())
            .unwrap_or_default()
    }
}

impl Membership for Directory {
    /// Sets how many channels one user may block (applies to later blocks).
    fn set_max_blocked_per_user(&self, max: usize) {
        self.max_blocked_per_user.store(max, Ordering::Relaxed);
    }

    /// A connection of `user` opened on `core`: records it and returns the user's rooms, in
    /// one step, so a concurrent join either shows up in the list or reaches this core.
    /// Refused (and not recorded) if the user already holds `max_conns` connections.
    fn connect(
        &self,
        user: &str,
        core: CoreId,
        max_conns: usize,
    ) -> Result<(UserName, Vec<(RoomName, JoinPoint)>), DirectoryError> {
        let mut shard = self.shard(user).write();
        let (handle, _) = shard.entry_of(user);
        if shard.conn_count(user) as usize >= max_conns {
            shard.drop_unused(user);
            return Err(DirectoryError::TooManyConnections { max: max_conns });
        }
        shard.add_conn(&handle, core);
        let mut rooms: Vec<(RoomName, JoinPoint)> = shard
            .users
            .get(user)
            .map(|e| e.rooms.iter().map(|(r, j)| (r.clone(), j)).collect())
            .unwrap_or_default();
        // In a stable order (by kind and name), so a user's rooms get the same aliases on
        // every connection and every run.
        rooms.sort_unstable_by(|(a, _), (b, _)| (a.channel, &a.name).cmp(&(b.channel, &b.name)));
        Ok((handle, rooms))
    }

    /// A connection of `user` on `core` closed.
    fn disconnect(&self, user: &str, core: CoreId) {
        self.shard(user).write().remove_conn(user, core);
    }

    /// Adds `user` to `room` (a no-op that reports the existing join point if already a
    /// member). A blocked channel stays blocked unless `unblock`.
    fn add(
        &self,
        user: &str,
        room: &RoomName,
        join: JoinPoint,
        unblock: bool,
    ) -> Result<Added, DirectoryError> {
        let mut shard = self.shard(user).write();
        let (handle, _) = shard.entry_of(user);
        if shard.is_blocked(user, room) {
            if !unblock {
                return Err(DirectoryError::Blocked(room.name.to_string()));
            }
            shard.unblock(user, room);
        }
        let cores = shard.cores(user);
        let max_rooms = self.max_rooms_per_user.load(Ordering::Relaxed);
        let (_, entry) = shard.entry_of(user);
        if let Some(existing) = entry.rooms.get(room) {
            return Ok(Added {
                new: false,
                join: existing,
                cores,
                user: handle,
            });
        }
        if entry.rooms.len() >= max_rooms {
            shard.drop_unused(user);
            return Err(DirectoryError::TooManyRooms { max: max_rooms });
        }
        entry.rooms.insert(room.clone(), join);
        Ok(Added {
            new: true,
            join,
            cores,
            user: handle,
        })
    }

    /// Removes `user` from `room`, optionally blocking it (refused past the per-user cap on
    /// blocks: the user leaves all the same).
    fn remove(&self, user: &str, room: &RoomName, block: bool) -> Removed {
        let max_blocked = self.max_blocked_per_user.load(Ordering::Relaxed);
        let mut shard = self.shard(user).write();
        let (handle, entry) = shard.entry_of(user);
        let was = entry.rooms.remove(room);
        let mut block_refused = None;
        if block && !shard.is_blocked(user, room) {
            if shard.blocked_count(user) >= max_blocked {
                block_refused = Some(DirectoryError::TooManyBlocks { max: max_blocked });
            } else {
                shard.rare_of(&handle).blocked.insert(room.clone());
            }
        }
        let cores = shard.cores(user);
        shard.drop_unused(user);
        Removed {
            was,
            cores,
            block_refused,
        }
    }

    fn end(&self, user: &str, room: &RoomName, serial: u64) -> Removed {
        let mut shard = self.shard(user).write();
        shard.ended.insert(user, room, serial);
        let in_force = shard
            .users
            .get(user)
            .and_then(|e| e.rooms.get(room))
            .is_some_and(|j| j.serial == serial);
        let was = if in_force {
            shard.users.get_mut(user).and_then(|e| e.rooms.remove(room))
        } else {
            None
        };
        let cores = if was.is_some() {
            shard.cores(user)
        } else {
            Vec::new()
        };
        shard.drop_unused(user);
        Removed {
            was,
            cores,
            block_refused: None,
        }
    }

    fn ended(&self, user: &str, room: &RoomName, serial: u64) -> bool {
        self.shard(user).read().ended.contains(user, room, serial)
    }

    /// Where `user`'s stream of `room` starts, if the user belongs to it.
    fn join_point(&self, user: &str, room: &RoomName) -> Option<JoinPoint> {
        self.shard(user)
            .read()
            .users
            .get(user)
            .and_then(|e| e.rooms.get(room))
    }

    /// Whether `user` blocked `room`.
    fn is_blocked(&self, user: &str, room: &RoomName) -> bool {
        self.shard(user).read().is_blocked(user, room)
    }

    fn snapshot(&self, user: &str) -> (Vec<(RoomName, JoinPoint)>, Vec<RoomName>) {
        let shard = self.shard(user).read();
        let rooms = shard
            .users
            .get(user)
            .map(|e| e.rooms.iter().map(|(r, j)| (r.clone(), j)).collect())
            .unwrap_or_default();
        let blocks = shard
            .rare
            .get(user)
            .map(|r| r.blocked.iter().cloned().collect())
            .unwrap_or_default();
        (rooms, blocks)
    }

    fn forget_if_offline(&self, user: &str) {
        self.shard(user).write().forget_if_offline(user);
    }

    fn hold(&self, user: &str) {
        let mut shard = self.shard(user).write();
        match shard.held.get_mut(user) {
            Some(n) => *n += 1,
            None => {
                shard.held.insert(UserName::new(user), 1);
            }
        }
    }

    fn release(&self, user: &str) {
        let mut shard = self.shard(user).write();
        if let Some(n) = shard.held.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                shard.held.remove(user);
            }
        }
        shard.forget_if_offline(user);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use super::*;
    use pabal_codec::Text;

    fn room(name: &str) -> RoomName {
        RoomName::new(false, Text::from(name))
    }

    const J: JoinPoint = JoinPoint {
        epoch: 1,
        seq: 0,
        serial: 1,
    };

    #[test]
    fn connect_sees_rooms_and_joins_see_connections() {
        let d = Directory::new(4, 10);
        let ann = "ann";
        let first = d.add(ann, &room("a"), J, false).unwrap();
        assert!(first.cores.is_empty());
        let (handle, rooms) = d.connect(ann, 3, 4).unwrap();
        assert_eq!(rooms, vec![(room("a"), J)]);
        // One record for the user: the handle the join made is the one a connection gets.
        assert!(handle.same_record(&first.user) && *handle == *ann);
        let added = d.add(ann, &room("b"), J, false).unwrap();
        assert_eq!((added.new, added.cores), (true, vec![3]));
        d.disconnect(ann, 3);
        assert!(d.cores_of(ann).is_empty());
        assert!(d.join_point(ann, &room("b")).is_some());
    }

    #[test]
    fn a_user_entry_is_compact_and_counts_connections_per_worker() {
        // Every user with a live connection costs one entry (in a hash map, so about
        // 1.6 times this with the key): it was 96 bytes with an unboxed blocked set and a
        // vector of workers (and that vector's heap block), 72 with the rooms and other
        // workers in vectors inline, 48 with the first worker's count in an `Option`, 40
        // with blocks and further workers in two boxes, 32 with one box, 24 with them in
        // the shard's map of rare parts.
        let entry = std::mem::size_of::<UserEntry>();
        assert!(entry <= 24, "the user entry grew to {entry} bytes");
        let d = Directory::new(1, 10);
        let ann = "ann";
        for core in [2, 5, 2, 7] {
            d.connect(ann, core, 4).unwrap();
        }
        assert_eq!(
            d.connect(ann, 9, 4),
            Err(DirectoryError::TooManyConnections { max: 4 }),
            "the cap counts every worker's connections"
        );
        let sorted = |mut v: Vec<CoreId>| {
            v.sort_unstable();
            v
        };
        assert_eq!(sorted(d.cores_of(ann)), vec![2, 5, 7]);
        d.disconnect(ann, 2);
        assert_eq!(
            sorted(d.cores_of(ann)),
            vec![2, 5, 7],
            "one of two left on 2"
        );
        d.disconnect(ann, 2);
        assert_eq!(sorted(d.cores_of(ann)), vec![5, 7]);
        d.disconnect(ann, 9);
        assert_eq!(sorted(d.cores_of(ann)), vec![5, 7], "no connection on 9");
        d.disconnect(ann, 7);
        assert_eq!(d.cores_of(ann), vec![5]);
        assert!(
            d.shards[0].read().rare.is_empty(),
            "one worker left: the rare part of further workers is dropped"
        );
        d.disconnect(ann, 5);
        assert!(d.cores_of(ann).is_empty());
        assert!(
            d.shards[0].read().users.is_empty(),
            "the unused entry is dropped"
        );
    }

    #[test]
    fn blocking_sticks_until_unblocked() {
        let d = Directory::new(1, 10);
        let ann = "ann";
        let ch = RoomName::new(true, Text::from("news"));
        d.add(ann, &ch, J, false).unwrap();
        assert!(d.remove(ann, &ch, true).was.is_some());
        assert!(matches!(
            d.add(ann, &ch, J, false),
            Err(DirectoryError::Blocked(_))
        ));
        assert!(d.add(ann, &ch, J, true).unwrap().new);
        assert!(
            d.shards[0].read().rare.is_empty(),
            "nothing blocked, one worker: no rare part"
        );
    }

    #[test]
    fn rooms_per_user_are_capped() {
        let d = Directory::new(1, 2);
        let ann = "ann";
        d.add(ann, &room("a"), J, false).unwrap();
        d.add(ann, &room("b"), J, false).unwrap();
        assert_eq!(
            d.add(ann, &room("c"), J, false),
            Err(DirectoryError::TooManyRooms { max: 2 })
        );
        // Re-adding an existing room is fine at the cap.
        assert!(!d.add(ann, &room("a"), J, false).unwrap().new);
    }

    #[test]
    fn blocks_per_user_are_capped_and_the_user_still_leaves() {
        let d = Directory::new(1, 10);
        d.set_max_blocked_per_user(2);
        let ann = "ann";
        let ch = |n: &str| RoomName::new(true, Text::from(n));
        for n in ["a", "b"] {
            assert_eq!(d.remove(ann, &ch(n), true).block_refused, None);
        }
        d.add(ann, &ch("c"), J, false).unwrap();
        let removed = d.remove(ann, &ch("c"), true);
        assert!(removed.was.is_some(), "left all the same");
        assert_eq!(
            removed.block_refused,
            Some(DirectoryError::TooManyBlocks { max: 2 })
        );
        assert!(d.add(ann, &ch("c"), J, false).unwrap().new, "not blocked");
        // Blocking what is already blocked is no new block.
        assert_eq!(d.remove(ann, &ch("a"), true).block_refused, None);
    }

    #[test]
    fn join_points_are_per_membership() {
        let d = Directory::new(1, 10);
        let ann = "ann";
        let jp = |seq, serial| JoinPoint {
            epoch: 7,
            seq,
            serial,
        };
        assert_eq!(d.join_point(ann, &room("a")), None);
        d.add(ann, &room("a"), jp(3, 1), false).unwrap();
        assert_eq!(d.join_point(ann, &room("a")), Some(jp(3, 1)));
        d.remove(ann, &room("a"), false);
        d.add(ann, &room("a"), jp(9, 2), false).unwrap();
        assert_eq!(d.join_point(ann, &room("a")), Some(jp(9, 2)));
    }

    #[test]
    fn a_phones_two_rooms_are_a_48_byte_block_and_read_back_exactly() {
        // (room, join point) entries of 24 bytes: two rooms a 48-byte block (64 with the
        // join points' three fields whole).
        let entry = std::mem::size_of::<(RoomName, PackedJoin)>();
        assert!(entry <= 24, "a room entry grew to {entry} bytes");
        let d = Directory::new(1, 10);
        let ann = "ann";
        let now_ms = 1_795_000_000_000;
        let joins = [
            // What the owner gives: packed inline.
            JoinPoint {
                epoch: now_ms,
                seq: 0,
                serial: now_ms * 1000 + 3,
            },
            // A head too far for the inline form beside a serial: boxed, as exact.
            JoinPoint {
                epoch: now_ms - 86_400_000,
                seq: 1 << 40,
                serial: now_ms * 1000 + 4,
            },
            // Restored from a durable log: no serial.
            JoinPoint {
                epoch: now_ms,
                seq: 77,
                serial: 0,
            },
        ];
        let rooms: Vec<RoomName> = (0..joins.len()).map(|i| room(&format!("r{i}"))).collect();
        for (r, j) in rooms.iter().zip(joins) {
            d.add(ann, r, j, false).unwrap();
        }
        for (r, j) in rooms.iter().zip(joins) {
            assert_eq!(d.join_point(ann, r), Some(j));
        }
        let (_, mut connected) = d.connect(ann, 0, 1).unwrap();
        connected.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        assert_eq!(
            connected,
            rooms.iter().cloned().zip(joins).collect::<Vec<_>>()
        );
        assert_eq!(d.remove(ann, &rooms[1], false).was, Some(joins[1]));
        let boxed = d.shards[0].read().users[ann]
            .rooms
            .0
            .iter()
            .filter(|(_, j)| j.is_boxed())
            .count();
        assert_eq!(boxed, 0, "the owner's join points are inline");
    }

    #[test]
    fn a_blocking_user_offline_and_in_no_room_is_kept_until_nothing_is_left() {
        let d = Directory::new(1, 10);
        let ann = "ann";
        let ch = RoomName::new(true, Text::from("news"));
        assert_eq!(d.remove(ann, &ch, true).block_refused, None);
        assert!(d.is_blocked(ann, &ch), "the block is kept while offline");
        assert_eq!(d.snapshot(ann).1, vec![ch.clone()]);
        // Unblocking by a join keeps the user's entry (its handle is the one returned).
        let added = d.add(ann, &ch, J, true).unwrap();
        assert!(added.new && !d.is_blocked(ann, &ch));
        {
            let shard = d.shards[0].read();
            assert!(shard.rare.is_empty(), "nothing rare left");
            let (key, _) = shard.users.get_key_value(ann).unwrap();
            assert!(key.same_record(&added.user));
        }
        d.remove(ann, &ch, false);
        let shard = d.shards[0].read();
        assert!(shard.users.is_empty() && shard.rare.is_empty());
    }

    #[test]
    fn forgetting_an_offline_user_drops_their_rare_part_too() {
        let d = Directory::new(1, 10);
        let ann = "ann";
        let ch = RoomName::new(true, Text::from("news"));
        d.remove(ann, &ch, true);
        d.forget_if_offline(ann);
        let shard = d.shards[0].read();
        assert!(shard.users.is_empty() && shard.rare.is_empty());
    }

    #[test]
    fn a_user_held_by_a_worker_is_kept_until_every_holder_releases_them() {
        let d = Directory::new(1, 10);
        let ann = "ann";
        let dm = room("dm");
        // Two workers of one node watch ann (a HELLO on each, neither through yet).
        d.hold(ann);
        d.hold(ann);
        d.add(ann, &dm, J, false).unwrap();
        d.release(ann);
        assert_eq!(
            d.join_point(ann, &dm),
            Some(J),
            "the other worker holds ann"
        );
        d.forget_if_offline(ann);
        assert_eq!(d.join_point(ann, &dm), Some(J), "held: not forgotten");
        d.release(ann);
        assert_eq!(d.join_point(ann, &dm), None, "nobody holds ann, offline");
        let shard = d.shards[0].read();
        assert!(shard.users.is_empty() && shard.held.is_empty());
    }

    #[test]
    fn a_membership_a_removal_ended_stays_ended_and_the_record_is_bounded() {
        let d = Directory::new(1, 10);
        let (ann, dm) = ("ann", room("dm"));
        d.connect(ann, 3, 4).unwrap();
        d.add(ann, &dm, J, false).unwrap();
        // A removal of an earlier membership leaves the one in force.
        let earlier = d.end(ann, &dm, J.serial + 1);
        assert_eq!((earlier.was, d.join_point(ann, &dm)), (None, Some(J)));
        let ended = d.end(ann, &dm, J.serial);
        assert_eq!((ended.was, ended.cores), (Some(J), vec![3]));
        assert_eq!(d.join_point(ann, &dm), None);
        assert!(d.ended(ann, &dm, J.serial) && !d.ended(ann, &room("other"), J.serial));
        // Remembered whether or not the directory held the user, the newest ENDED_MAX.
        for serial in 0..ENDED_MAX as u64 {
            d.end("bob", &dm, 1_000 + serial);
        }
        assert!(!d.ended(ann, &dm, J.serial), "the oldest went");
        assert!(d.ended("bob", &dm, 1_000 + ENDED_MAX as u64 - 1));
        assert_eq!(d.shards[0].read().ended.order.len(), ENDED_MAX);
    }

    #[test]
    fn unused_entries_are_dropped() {
        let d = Directory::new(1, 2);
        let ann = "ann";
        d.connect(ann, 0, 1).unwrap();
        assert_eq!(
            d.connect(ann, 1, 1),
            Err(DirectoryError::TooManyConnections { max: 1 })
        );
        d.disconnect(ann, 0);
        assert!(d.shards[0].read().users.is_empty());
    }
}
