//! [`Slab`]: the generational slab both backends keep their connections in, [`consume`],
//! which drops written bytes from the front of a send queue, [`ListPool`], the spare
//! send queues that let an idle connection hold none, and [`TokenIndex`], which finds a
//! connection's slot from the worker's token.
//!
//! Owns slot reuse and the generation check that keeps a stale event or completion (which
//! names a slot index and the generation it was issued under) from reaching a connection
//! that reused the slot. It knows nothing of sockets or of either backend; each backend
//! packs [`Key`]s into its own event tokens (mio tokens, io_uring `user_data`) with as many
//! generation bits as its encoding leaves.

use std::collections::{HashMap, VecDeque};
use std::io;

use bytes::{Buf, Bytes};

/// Names one occupant of a slot: the slot's index and its generation when the value was
/// inserted. The same index with another generation names another (or no) value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// The slot.
    pub index: u32,
    /// The slot's generation, masked to the slab's generation bits.
    pub generation: u32,
}

/// One chunk's slots, as two parallel vectors of [`CHUNK`] entries: the generations, and
/// the values. A slot as one struct (a `u32` generation beside the value) was padded to
/// the value's alignment: 8 bytes per slot for a connection record, where the generation
/// takes 4 kept apart.
#[derive(Debug)]
struct Chunk<T> {
    generations: Vec<u32>,
    values: Vec<Option<T>>,
}

impl<T> Chunk<T> {
    fn new() -> Self {
        Chunk {
            generations: Vec::with_capacity(CHUNK),
            values: Vec::with_capacity(CHUNK),
        }
    }

    fn len(&self) -> usize {
        self.values.len()
    }
}

/// Slots per chunk of a [`Slab`].
const CHUNK: usize = 128;

/// Values in reusable slots; freed slots are reused last-in first-out, each reuse under a
/// new generation.
///
/// The slots live in chunks of [`CHUNK`], each allocated once at its full size, not in one
/// vector: a vector grows by doubling, so at 10,000 connections its allocation held 16,384
/// connection records (and every doubling copied them all); chunks leave at most one
/// chunk's worth of spare slots, and a slot never moves.
#[derive(Debug)]
pub struct Slab<T> {
    chunks: Vec<Chunk<T>>,
    free: Vec<u32>,
    generation_mask: u32,
    len: usize,
}

impl<T> Slab<T> {
    /// An empty slab whose generations wrap after `generation_bits` bits (1 to 32).
    pub fn new(generation_bits: u32) -> Self {
        debug_assert!((1..=32).contains(&generation_bits));
        Self {
            chunks: Vec::new(),
            free: Vec::new(),
            generation_mask: u32::MAX >> (32 - generation_bits.clamp(1, 32)),
            len: 0,
        }
    }

    /// Stores `value` and returns its key. Fails only when every `u32` index is taken.
    pub fn insert(&mut self, value: T) -> io::Result<Key> {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                let index = u32::try_from(self.slot_count())
                    .map_err(|_| io::Error::other("too many connections for one worker"))?;
                if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
                    self.chunks.push(Chunk::new());
                }
                if let Some(chunk) = self.chunks.last_mut() {
                    chunk.generations.push(0);
                    chunk.values.push(None);
                }
                index
            }
        };
        // The slot was just found free or made.
        let (generation, slot) = self
            .slot_mut(index)
            .ok_or_else(|| io::Error::other("a free slab slot is missing"))?;
        *slot = Some(value);
        let generation = *generation;
        self.len += 1;
        Ok(Key { index, generation })
    }

    /// Slots ever allocated.
    fn slot_count(&self) -> usize {
        self.chunks
            .last()
            .map_or(0, |last| (self.chunks.len() - 1) * CHUNK + last.len())
    }

    /// Slot `index`: its generation and its value.
    fn slot_mut(&mut self, index: u32) -> Option<(&mut u32, &mut Option<T>)> {
        let index = index as usize;
        let chunk = self.chunks.get_mut(index / CHUNK)?;
        let generation = chunk.generations.get_mut(index % CHUNK)?;
        let value = chunk.values.get_mut(index % CHUNK)?;
        Some((generation, value))
    }

    /// The value `key` names, if it is still there.
    pub fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        let (generation, value) = self.slot_mut(key.index)?;
        if *generation != key.generation {
            return None;
        }
        value.as_mut()
    }

    /// Whatever occupies slot `index` now, with its key.
    pub fn at_mut(&mut self, index: u32) -> Option<(Key, &mut T)> {
        let (generation, value) = self.slot_mut(index)?;
        let key = Key {
            index,
            generation: *generation,
        };
        value.as_mut().map(|value| (key, value))
    }

    /// Takes the value out of slot `index` and frees the slot under a new generation, so
    /// that keys naming the old value no longer resolve.
    pub fn remove_at(&mut self, index: u32) -> Option<T> {
        let mask = self.generation_mask;
        let (generation, slot) = self.slot_mut(index)?;
        let value = slot.take()?;
        *generation = generation.wrapping_add(1) & mask;
        self.free.push(index);
        self.len -= 1;
        Some(value)
    }

    /// Takes out the value `key` names, if it is still there (see [`Self::remove_at`]).
    pub fn remove(&mut self, key: Key) -> Option<T> {
        self.get_mut(key)?;
        self.remove_at(key.index)
    }

    /// Values held now.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no value is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every value held, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.chunks
            .iter()
            .flat_map(|chunk| &chunk.values)
            .filter_map(Option::as_ref)
    }

    /// Every value held, in slot order, with its key.
    pub fn iter_keyed(&self) -> impl Iterator<Item = (Key, &T)> + '_ {
        self.chunks
            .iter()
            .flat_map(|chunk| chunk.generations.iter().zip(&chunk.values))
            .zip(0u32..)
            .filter_map(|((&generation, value), index)| {
                value
                    .as_ref()
                    .map(|value| (Key { index, generation }, value))
            })
    }

    /// Every value held, in slot order, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> + '_ {
        self.chunks
            .iter_mut()
            .flat_map(|chunk| &mut chunk.values)
            .filter_map(Option::as_mut)
    }

    /// Every value held, in slot order, mutably, with its key.
    pub fn iter_mut_keyed(&mut self) -> impl Iterator<Item = (Key, &mut T)> + '_ {
        self.chunks
            .iter_mut()
            .flat_map(|chunk| chunk.generations.iter().zip(&mut chunk.values))
            .zip(0u32..)
            .filter_map(|((&generation, value), index)| {
                value
                    .as_mut()
                    .map(|value| (Key { index, generation }, value))
            })
    }

    /// Slots ever allocated (occupied or free): every index below it may be passed to
    /// [`Self::at_mut`] and [`Self::remove_at`].
    pub fn slots(&self) -> u32 {
        // `insert` never lets the length pass u32::MAX + 1; saturate rather than wrap.
        u32::try_from(self.slot_count()).unwrap_or(u32::MAX)
    }

    /// Slots allocated, used or spare (tests check the spare ones are few).
    #[cfg(test)]
    fn allocated_slots(&self) -> usize {
        self.chunks.iter().map(|c| c.values.capacity()).sum()
    }

    /// Bytes the slab's chunks hold per slot (tests check a slot's overhead).
    #[cfg(test)]
    fn bytes_per_slot(&self) -> usize {
        let chunk_bytes = |c: &Chunk<T>| {
            c.values.capacity() * std::mem::size_of::<Option<T>>()
                + c.generations.capacity() * std::mem::size_of::<u32>()
        };
        self.chunks.iter().map(chunk_bytes).sum::<usize>() / self.allocated_slots().max(1)
    }

    /// Takes every value out (teardown), leaving the slab empty.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.free.clear();
        self.len = 0;
        self.chunks
            .drain(..)
            .flat_map(|chunk| chunk.values)
            .flatten()
    }
}

/// Drops the first `n` bytes (what a write took) from the front of a send queue, and any
/// empty buffers left at its front.
pub fn consume(out: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = out.front_mut() else { return };
        if n >= front.len() {
            n -= front.len();
            out.pop_front();
        } else {
            front.advance(n);
            n = 0;
        }
    }
    while out.front().is_some_and(Bytes::is_empty) {
        out.pop_front();
    }
}

/// Spare send queues kept by one backend.
const LIST_POOL_MAX: usize = 256;
/// Queues with room for more buffers than this are freed rather than pooled.
const LIST_POOL_CAPACITY_MAX: usize = 64;

/// A backend's spare send queues. `send` swaps the worker's batch with the connection's
/// queue, so the worker gets the queue back as its next (allocated) list; a connection
/// whose batch is written gives its emptied queue here rather than keeping it while idle,
/// and takes one from here for its next batch. Nothing is allocated per send once the
/// pool and the worker's own pool hold enough queues.
#[derive(Debug, Default)]
pub struct ListPool(Vec<VecDeque<Bytes>>);

impl ListPool {
    /// A spare queue (empty, allocated), or an unallocated one when there is none.
    pub fn take(&mut self) -> VecDeque<Bytes> {
        self.0.pop().unwrap_or_default()
    }

    /// Takes back a queue whose buffers were written (or are dropped), keeping its
    /// allocation while the pool has room.
    pub fn give(&mut self, mut list: VecDeque<Bytes>) {
        list.clear();
        if list.capacity() > 0
            && list.capacity() <= LIST_POOL_CAPACITY_MAX
            && self.0.len() < LIST_POOL_MAX
        {
            self.0.push(list);
        }
    }

    /// Spare queues held.
    #[cfg(test)]
    pub fn spare(&self) -> usize {
        self.0.len()
    }
}

/// The worker's token of a connection (see `io::Token`).
type Token = u64;

/// Below this many slots the dense part of a [`TokenIndex`] may always grow; past it, only
/// to twice the connections indexed (a token whose low half is further out goes to the
/// map).
const DENSE_FREE: usize = 1024;

/// Entries per chunk of a [`TokenIndex`]'s dense part (8 KiB: a small block for the
/// allocator, made once and never moved).
const INDEX_CHUNK: usize = 1024;

/// One chunk of a [`TokenIndex`]'s dense part: [`INDEX_CHUNK`] entries, allocated once at
/// their full size, and how many of them are taken (a chunk left empty at the end is freed
/// whole, with no scan).
#[derive(Debug)]
struct IndexChunk {
    /// By the token's low half within the chunk: `(high half, slot + 1)`, `(0, 0)` when empty.
    entries: Box<[(u32, u32)]>,
    /// Entries taken.
    live: u32,
}

impl IndexChunk {
    fn new() -> Self {
        IndexChunk {
            entries: vec![(0, 0); INDEX_CHUNK].into_boxed_slice(),
            live: 0,
        }
    }
}

/// A backend's connections by the worker's token: the slot each token's connection is in.
///
/// The worker's tokens are its own slab keys (the slot in the low 32 bits, a generation in
/// the high), so their low halves are dense: the index is an array indexed by the low half
/// holding (high half, slot + 1), 8 bytes per entry, where a hash map spent 16 bytes a
/// bucket and held up to twice the buckets it had entries (28 bytes per idle phone at
/// 10,000). The array is a list of chunks of [`INDEX_CHUNK`] entries, each allocated once
/// and never moved, like the [`Slab`]'s: a vector grown by doubling held up to twice the
/// entries in use (16,384 at 10,000 connections), and every doubling copied it and freed
/// the old block, whose pages the allocator keeps resident for a while (112 KiB freed that
/// way while 10,000 phones connected). The backend contract does not promise dense tokens,
/// so a token whose low half is far past the connections indexed, or whose entry is taken
/// by another live token (a slot the worker reused before the backend let the old
/// connection go), goes to a hash map instead: any token works, dense ones cost least.
/// Empty chunks at the end are freed as they empty, all but one (so a connection coming
/// and going at a chunk's edge does not free and allocate a chunk each time).
#[derive(Debug, Default)]
pub struct TokenIndex {
    /// The dense part, by the token's low half ([`INDEX_CHUNK`] entries a chunk).
    dense: Vec<IndexChunk>,
    /// Tokens the dense part does not hold.
    sparse: HashMap<Token, u32>,
    /// Entries in `dense`.
    dense_len: usize,
}

impl TokenIndex {
    /// The dense entry for the low half `lo`, if its chunk is allocated.
    fn entry(&self, lo: usize) -> Option<(u32, u32)> {
        let chunk = self.dense.get(lo / INDEX_CHUNK)?;
        chunk.entries.get(lo % INDEX_CHUNK).copied()
    }

    /// Entries the dense part has allocated.
    fn dense_slots(&self) -> usize {
        self.dense.len() * INDEX_CHUNK
    }

    /// The slot of `token`'s connection.
    pub fn get(&self, token: Token) -> Option<u32> {
        let (lo, hi) = (token as u32 as usize, (token >> 32) as u32);
        match self.entry(lo) {
            Some((h, slot)) if slot != 0 && h == hi => Some(slot - 1),
            _ if self.sparse.is_empty() => None,
            _ => self.sparse.get(&token).copied(),
        }
    }

    /// Whether `token` is indexed.
    pub fn contains(&self, token: Token) -> bool {
        self.get(token).is_some()
    }

    /// Whether an accepted connection must be refused because the sink handed out a token
    /// that is still live (a bug on the sink's side, logged here for both backends).
    pub fn refuses_reuse(&self, token: Token) -> bool {
        let live = self.contains(token);
        if live {
            tracing::error!(
                token,
                "sink reused a live token; refusing the new connection"
            );
        }
        live
    }

    /// Indexes `token` at `slot` (a token indexed already moves to `slot`).
    pub fn insert(&mut self, token: Token, slot: u32) {
        self.remove(token);
        let (lo, hi) = (token as u32 as usize, (token >> 32) as u32);
        let bound = DENSE_FREE.max(2 * (self.len() + 1));
        let fits = lo < self.dense_slots() || lo < bound;
        // `slot + 1` must not wrap (slabs stop far below `u32::MAX` slots).
        if fits && slot < u32::MAX {
            while self.dense.len() <= lo / INDEX_CHUNK {
                self.dense.push(IndexChunk::new());
            }
            if let Some(chunk) = self.dense.get_mut(lo / INDEX_CHUNK)
                && let Some(entry) = chunk.entries.get_mut(lo % INDEX_CHUNK)
                && entry.1 == 0
            {
                *entry = (hi, slot + 1);
                chunk.live += 1;
                self.dense_len += 1;
                return;
            }
        }
        self.sparse.insert(token, slot);
    }

    /// Forgets `token`; returns its slot.
    pub fn remove(&mut self, token: Token) -> Option<u32> {
        let (lo, hi) = (token as u32 as usize, (token >> 32) as u32);
        if let Some(chunk) = self.dense.get_mut(lo / INDEX_CHUNK)
            && let Some(entry) = chunk.entries.get_mut(lo % INDEX_CHUNK)
            && entry.1 != 0
            && entry.0 == hi
        {
            let slot = entry.1 - 1;
            *entry = (0, 0);
            chunk.live -= 1;
            self.dense_len -= 1;
            self.trim();
            return Some(slot);
        }
        let slot = self.sparse.remove(&token);
        if self.sparse.is_empty() && self.sparse.capacity() > 0 {
            self.sparse = HashMap::new();
        }
        slot
    }

    /// Tokens indexed.
    pub fn len(&self) -> usize {
        self.dense_len + self.sparse.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Frees the empty chunks at the end of the dense part but the last of them: a chunk
    /// is freed only once the one before it is empty too.
    fn trim(&mut self) {
        while let [.., before, last] = self.dense.as_slice()
            && before.live == 0
            && last.live == 0
        {
            self.dense.pop();
        }
    }

    /// Entries the dense part has allocated (tests check the spare ones are few).
    #[cfg(test)]
    fn allocated_entries(&self) -> usize {
        self.dense.iter().map(|chunk| chunk.entries.len()).sum()
    }

    /// Where the dense entry for the low half `lo` lives (tests check entries never move).
    #[cfg(test)]
    fn entry_address(&self, lo: usize) -> Option<*const (u32, u32)> {
        let chunk = self.dense.get(lo / INDEX_CHUNK)?;
        chunk.entries.get(lo % INDEX_CHUNK).map(std::ptr::from_ref)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn a_token_index_finds_dense_and_sparse_tokens_and_forgets_them() {
        let mut index = TokenIndex::default();
        let token = |generation: u64, slot: u64| (generation << 32) | slot;
        // The worker's tokens: dense slots, generations in the high half.
        for slot in 0..5000 {
            index.insert(token(3, slot), slot as u32 + 10);
        }
        assert_eq!(index.len(), 5000);
        assert!(index.sparse.is_empty(), "dense tokens take no map bucket");
        assert_eq!(index.get(token(3, 42)), Some(52));
        assert_eq!(
            index.get(token(4, 42)),
            None,
            "another generation is another token"
        );
        // The same slot under a new generation while the old one is still held: both found.
        index.insert(token(4, 42), 7);
        assert_eq!(
            (index.get(token(3, 42)), index.get(token(4, 42))),
            (Some(52), Some(7))
        );
        // Any token works: one far past the dense part goes to the map.
        index.insert(u64::MAX, 1);
        index.insert(1 << 31, 2);
        assert_eq!(
            (index.get(u64::MAX), index.get(1 << 31)),
            (Some(1), Some(2))
        );
        assert!(
            index.dense_slots() < 20_000,
            "a stray token does not size the dense part"
        );
        assert_eq!(index.remove(token(3, 42)), Some(52));
        assert_eq!(index.get(token(3, 42)), None);
        assert_eq!(
            index.get(token(4, 42)),
            Some(7),
            "the other generation stays"
        );
        for t in [token(4, 42), u64::MAX, 1 << 31] {
            assert!(index.remove(t).is_some());
            assert!(index.remove(t).is_none(), "removed once");
        }
        // Churn: emptied chunks at the end go back (all but one).
        for slot in 100..5000 {
            assert!(index.remove(token(3, slot)).is_some());
        }
        assert_eq!(index.len(), 99, "slots 0 to 99 but 42");
        assert!(
            index.allocated_entries() <= 2 * INDEX_CHUNK,
            "{}",
            index.allocated_entries()
        );
        assert!(
            (0..100)
                .filter(|&slot| slot != 42)
                .all(|slot| index.get(token(3, slot)) == Some(slot as u32 + 10))
        );
        assert!(
            index.sparse.capacity() == 0,
            "the emptied map freed its buckets"
        );
    }

    #[test]
    fn a_token_index_grows_by_chunks_and_its_entries_never_move() {
        let mut index = TokenIndex::default();
        let token = |generation: u64, slot: u64| (generation << 32) | slot;
        index.insert(token(1, 0), 0);
        let first_at = index.entry_address(0).unwrap();
        for slot in 1..10_000 {
            index.insert(token(1, slot), slot as u32);
        }
        // A vector doubling up to the connections held 16,384 entries for 10,000 tokens by
        // now, and had copied (and freed) its block at each doubling.
        assert!(
            index.allocated_entries() <= 10_000 + INDEX_CHUNK,
            "{} entries allocated for 10,000 tokens",
            index.allocated_entries()
        );
        assert_eq!(index.entry_address(0), Some(first_at), "an entry moved");
        assert!(index.sparse.is_empty(), "dense tokens take no map bucket");
        assert!((0..10_000).all(|slot| index.get(token(1, slot)) == Some(slot as u32)));
        // A connection coming and going at a chunk's edge keeps the chunk: the empty one
        // after the last used chunk stays.
        let chunks = index.dense.len();
        for _ in 0..3 {
            index.insert(token(2, 10_240), 1);
            assert_eq!(index.dense.len(), chunks + 1);
            assert_eq!(index.remove(token(2, 10_240)), Some(1));
            assert_eq!(index.dense.len(), chunks + 1, "the spare chunk is kept");
        }
        // Emptied from the end, chunks go back but one.
        for slot in (1_000..10_000).rev() {
            assert_eq!(index.remove(token(1, slot)), Some(slot as u32));
        }
        assert_eq!(index.dense.len(), 2, "the used chunk and one spare");
        assert_eq!(index.entry_address(0), Some(first_at));
        assert_eq!(index.len(), 1_000);
    }

    #[test]
    fn a_reused_slot_does_not_answer_an_old_key() {
        let mut slab = Slab::new(24);
        let a = slab.insert("a").unwrap();
        let b = slab.insert("b").unwrap();
        assert_eq!((a.index, b.index), (0, 1));
        assert_eq!(slab.remove_at(a.index), Some("a"));
        assert_eq!(slab.remove_at(a.index), None, "already free");
        assert!(slab.get_mut(a).is_none());
        let c = slab.insert("c").unwrap();
        assert_eq!(c.index, a.index, "the free slot is reused");
        assert_ne!(c.generation, a.generation);
        assert!(slab.get_mut(a).is_none(), "the old key names nothing");
        assert_eq!(slab.get_mut(c), Some(&mut "c"));
        assert_eq!(slab.at_mut(c.index).map(|(k, v)| (k, *v)), Some((c, "c")));
        assert_eq!(slab.slots(), 2);
        let mut rest: Vec<&str> = slab.drain().collect();
        rest.sort_unstable();
        assert_eq!(rest, ["b", "c"]);
        assert_eq!(slab.slots(), 0);
    }

    #[test]
    fn slots_grow_by_chunks_and_never_move() {
        let mut slab = Slab::new(24);
        let first = slab.insert(0usize).unwrap();
        let first_at: *const usize = slab.get_mut(first).unwrap();
        let keys: Vec<Key> = (1..1100).map(|i| slab.insert(i).unwrap()).collect();
        // A vector would hold 2,048 slots for 1,100 values by now, and have moved them.
        assert!(
            slab.allocated_slots() <= 1100 + CHUNK,
            "{} slots allocated for 1,100 values",
            slab.allocated_slots()
        );
        assert_eq!(slab.slots(), 1100);
        assert!(
            std::ptr::eq(first_at, slab.get_mut(first).unwrap()),
            "a slot moved"
        );
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(slab.get_mut(*key), Some(&mut (i + 1)));
        }
        // Free slots across chunks are reused, last freed first.
        assert_eq!(slab.remove_at(130), Some(130));
        assert_eq!(slab.remove_at(1099), Some(1099));
        assert_eq!(slab.insert(7).unwrap().index, 1099);
        assert_eq!(slab.insert(8).unwrap().index, 130);
        assert_eq!(slab.iter().count(), 1100);
        assert_eq!(slab.len(), 1100);
        assert_eq!(slab.drain().count(), 1100);
        assert_eq!((slab.slots(), slab.allocated_slots()), (0, 0));
    }

    #[test]
    fn a_slot_costs_its_value_and_a_4_byte_generation() {
        // A record like a connection's: 8-byte aligned, with a niche (its `Option` is free).
        struct Record {
            _handle: Box<u64>,
            _rest: [u32; 51],
        }
        assert_eq!(std::mem::size_of::<Option<Record>>(), 216);
        let mut slab = Slab::new(32);
        let keys: Vec<Key> = (0..CHUNK)
            .map(|_| {
                slab.insert(Record {
                    _handle: Box::new(0),
                    _rest: [0; 51],
                })
                .unwrap()
            })
            .collect();
        // The generation beside the value padded each slot to 224 bytes.
        assert_eq!(slab.bytes_per_slot(), 216 + 4);
        // Keys read back from the parallel generations, before and after a reuse.
        let seen: Vec<Key> = slab.iter_keyed().map(|(key, _)| key).collect();
        assert_eq!(seen, keys);
        slab.remove(keys[5]).unwrap();
        let again = slab.insert(Record {
            _handle: Box::new(1),
            _rest: [1; 51],
        });
        let again = again.unwrap();
        assert_eq!((again.index, again.generation), (5, 1));
        let (key, record) = slab.iter_mut_keyed().nth(5).unwrap();
        assert_eq!((key, *record._handle), (again, 1));
        assert!(slab.get_mut(keys[5]).is_none());
    }

    #[test]
    fn generations_wrap_within_their_bits() {
        let mut slab = Slab::new(2);
        let mut seen = Vec::new();
        for _ in 0..5 {
            let key = slab.insert(()).unwrap();
            seen.push(key.generation);
            slab.remove_at(key.index);
        }
        assert_eq!(seen, [0, 1, 2, 3, 0]);
    }

    #[test]
    fn consume_drops_written_bytes_and_empty_fronts() {
        let mut q: VecDeque<Bytes> = [
            Bytes::from_static(b"abc"),
            Bytes::new(),
            Bytes::from_static(b"de"),
        ]
        .into();
        consume(&mut q, 2);
        assert_eq!(q[0], Bytes::from_static(b"c"));
        consume(&mut q, 1);
        assert_eq!(q.len(), 1, "the empty buffer after it goes too");
        consume(&mut q, 5);
        assert!(q.is_empty());
    }
}
