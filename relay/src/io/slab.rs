//! [`Slab`]: the generational slab both backends keep their connections in, [`consume`],
//! which drops written bytes from the front of a send queue, and [`ListPool`], the spare
//! send queues that let an idle connection hold none.
//!
//! Owns slot reuse and the generation check that keeps a stale event or completion (which
//! names a slot index and the generation it was issued under) from reaching a connection
//! that reused the slot. It knows nothing of sockets or of either backend; each backend
//! packs [`Key`]s into its own event tokens (mio tokens, io_uring `user_data`) with as many
//! generation bits as its encoding leaves.

use std::collections::VecDeque;
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

#[derive(Debug)]
struct Slot<T> {
    generation: u32,
    value: Option<T>,
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
    chunks: Vec<Vec<Slot<T>>>,
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
                    self.chunks.push(Vec::with_capacity(CHUNK));
                }
                if let Some(chunk) = self.chunks.last_mut() {
                    chunk.push(Slot {
                        generation: 0,
                        value: None,
                    });
                }
                index
            }
        };
        // The slot was just found free or made.
        let slot = self
            .slot_mut(index)
            .ok_or_else(|| io::Error::other("a free slab slot is missing"))?;
        slot.value = Some(value);
        let generation = slot.generation;
        self.len += 1;
        Ok(Key { index, generation })
    }

    /// Slots ever allocated.
    fn slot_count(&self) -> usize {
        self.chunks
            .last()
            .map_or(0, |last| (self.chunks.len() - 1) * CHUNK + last.len())
    }

    fn slot_mut(&mut self, index: u32) -> Option<&mut Slot<T>> {
        let index = index as usize;
        self.chunks.get_mut(index / CHUNK)?.get_mut(index % CHUNK)
    }

    /// The value `key` names, if it is still there.
    pub fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        let slot = self.slot_mut(key.index)?;
        if slot.generation != key.generation {
            return None;
        }
        slot.value.as_mut()
    }

    /// Whatever occupies slot `index` now, with its key.
    pub fn at_mut(&mut self, index: u32) -> Option<(Key, &mut T)> {
        let slot = self.slot_mut(index)?;
        let key = Key {
            index,
            generation: slot.generation,
        };
        slot.value.as_mut().map(|value| (key, value))
    }

    /// Takes the value out of slot `index` and frees the slot under a new generation, so
    /// that keys naming the old value no longer resolve.
    pub fn remove_at(&mut self, index: u32) -> Option<T> {
        let mask = self.generation_mask;
        let slot = self.slot_mut(index)?;
        let value = slot.value.take()?;
        slot.generation = slot.generation.wrapping_add(1) & mask;
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
            .flatten()
            .filter_map(|slot| slot.value.as_ref())
    }

    /// Every value held, in slot order, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> + '_ {
        self.chunks
            .iter_mut()
            .flatten()
            .filter_map(|slot| slot.value.as_mut())
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
        self.chunks.iter().map(Vec::capacity).sum()
    }

    /// Takes every value out (teardown), leaving the slab empty.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.free.clear();
        self.len = 0;
        self.chunks
            .drain(..)
            .flatten()
            .filter_map(|slot| slot.value)
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use super::*;

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
