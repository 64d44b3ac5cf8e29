//! The io_uring backend's provided-buffer ring ([`BufRing`]): the memory its multishot
//! receives fill, which of its buffers are posted to the kernel, and in which ring order
//! (a bundle receive names only its first buffer; the mirror says which follow).
//!
//! Owns two anonymous mappings (the ring's entries and the buffers), the choice of the
//! buffers posted and the mirror of their order; it must not touch the ring itself (registration and completions are
//! [`super::uring`]'s) and never looks inside the bytes.

use std::io;
use std::mem;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU16, Ordering};

use super::wakeup::syscall;

/// An anonymous private mapping: page-aligned, as the buffer ring requires.
struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mmap {
    fn anon(len: usize) -> io::Result<Self> {
        // SAFETY: an anonymous mapping at an address of the kernel's choosing: no fd, no
        // existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null pointer"))?;
        Ok(Self { ptr, len })
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping we created and nothing else unmaps.
        let _ = syscall!(unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) });
    }
}

/// `struct io_uring_buf`: one entry of a provided-buffer ring. The `resv` field of entry 0
/// is the ring's tail, which only userspace writes.
#[repr(C)]
struct RawBuf {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}
const _: () = assert!(mem::size_of::<RawBuf>() == 16);
const TAIL_OFFSET: usize = 14;

/// Buffers kept posted in the provided-buffer ring at first; doubled (up to the ring's
/// `count`) each time a receive finds it empty.
///
/// Eight: the kernel takes posted buffers in ring order, so every buffer of the window is
/// written in turn however few receives are in flight, and each costs at least a resident
/// page. With 64 posted, a worker of idle phones held 256 KiB of buffer pages (their HELLOs
/// and joins touched each in turn), about 30 bytes of RSS per phone at 10,000 more than
/// epoll, whose one 64 KiB read buffer their small reads touch a page of. Eight cost 32
/// KiB; a busy worker reaches 64 after three receives that find the ring empty (each one
/// completion and a re-arm), as before.
const POSTED_AT_FIRST: u16 = 8;

/// The provided-buffer ring: `count` buffers of `size` bytes, of which only a window of
/// `target` is posted to the kernel at rest; the rest wait in `spare`.
///
/// Why a window: the kernel takes posted buffers in ring order, so with all `count` posted
/// every one of them was written to in turn (its first page at least: 4 MiB of resident
/// memory per worker for 1,024 buffers of 16 KiB, connections or not). Here a buffer coming
/// back goes on top of `spare` and the ring is topped up from the top, so the same few
/// buffers keep cycling and the others are never touched. When a receive finds the ring
/// empty (ENOBUFS) the window doubles, so a busy worker posts what its bursts need.
pub(super) struct BufRing {
    entries: Mmap,
    data: Mmap,
    count: u16,
    size: u32,
    /// Our copy of the tail (the kernel only reads it).
    tail: u16,
    /// Buffers published and not yet taken by the kernel.
    posted: u16,
    /// How many buffers to keep posted.
    target: u16,
    /// Buffers neither posted nor lent to the sink, the most recently returned last.
    spare: Vec<u16>,
    /// The ring's order, mirrored: the buffer id we wrote into each slot (index: slot).
    /// A bundle receive consumes consecutive slots from the kernel's head and names only
    /// the first buffer; this says which ones follow it.
    slot_bid: Box<[u16]>,
    /// The slot each buffer was last written into (index: buffer id).
    bid_slot: Box<[u16]>,
    /// Whether each buffer sits in the ring (written, not yet handed back by a
    /// completion): a completion naming one that does not is refused, not trusted.
    in_ring: Box<[bool]>,
    /// Bundles that ran past the ring's last slot into its first (tests show that the
    /// wrap was exercised).
    #[cfg(test)]
    pub(super) wrapped: u64,
}

impl BufRing {
    pub(super) fn new(count: u16, size: u32) -> io::Result<Self> {
        let entries = Mmap::anon(usize::from(count) * mem::size_of::<RawBuf>())?;
        let data = Mmap::anon(usize::from(count) * size as usize)?;
        let mut ring = Self {
            entries,
            data,
            count,
            size,
            tail: 0,
            posted: 0,
            target: POSTED_AT_FIRST.min(count),
            // Buffer 0 on top: the first posted are the first in memory.
            spare: (0..count).rev().collect(),
            slot_bid: vec![0; usize::from(count)].into_boxed_slice(),
            bid_slot: vec![0; usize::from(count)].into_boxed_slice(),
            in_ring: vec![false; usize::from(count)].into_boxed_slice(),
            #[cfg(test)]
            wrapped: 0,
        };
        ring.top_up();
        Ok(ring)
    }

    /// Posts spare buffers, most recently returned first, until `target` are posted.
    fn top_up(&mut self) {
        let mut added = false;
        while self.posted < self.target {
            let Some(bid) = self.spare.pop() else { break };
            self.put(bid);
            self.posted += 1;
            added = true;
        }
        if added {
            self.publish();
        }
    }

    /// A receive found no buffer posted: post twice as many from now on.
    pub(super) fn ran_dry(&mut self) {
        self.target = self.target.saturating_mul(2).min(self.count);
        self.top_up();
    }

    /// Writes buffer `bid` into the slot at our (unpublished) tail.
    fn put(&mut self, bid: u16) {
        debug_assert!(bid < self.count);
        let slot = usize::from(self.tail & (self.count - 1));
        self.slot_bid[slot] = bid;
        self.bid_slot[usize::from(bid)] = slot as u16;
        self.in_ring[usize::from(bid)] = true;
        let addr = self.data.ptr.as_ptr() as u64 + u64::from(bid) * u64::from(self.size);
        let entry = self
            .entries
            .ptr
            .as_ptr()
            .cast::<RawBuf>()
            .wrapping_add(slot);
        // SAFETY: `slot < count`, so `entry` lies in the entries mapping and is aligned (the
        // mapping is page-aligned, entries are 16 bytes). The kernel reads only entries
        // between its head and the published tail; this one is at the tail, so nothing reads
        // it now. We write the three fields one by one and never `resv`, which in entry 0 is
        // the tail the kernel may be reading.
        unsafe {
            (&raw mut (*entry).addr).write(addr);
            (&raw mut (*entry).len).write(self.size);
            (&raw mut (*entry).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// The address of the entries, which the ring is registered with (page-aligned,
    /// `count` entries), and their count.
    pub(super) fn entries(&self) -> (u64, u16) {
        (self.entries.ptr.as_ptr() as u64, self.count)
    }

    /// Makes the entries written by `put` visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail is the u16 at offset 14 of the page-aligned entries mapping
        // (in bounds, 2-aligned). It is only ever accessed atomically: by us here and by the
        // kernel with an acquire load.
        let tail = unsafe {
            AtomicU16::from_ptr(self.entries.ptr.as_ptr().add(TAIL_OFFSET).cast::<u16>())
        };
        tail.store(self.tail, Ordering::Release);
    }

    /// The `i`-th buffer of a completion whose first buffer is `first`, and how many bytes
    /// the kernel could put in it: the buffer in the `i`-th slot after `first`'s, where the
    /// kernel took it from, and that slot's length (the kernel shortens a bundle's first
    /// entry to what the socket holds). `None` if that slot does not hold a buffer we
    /// posted and have not had back (a completion we cannot trust).
    pub(super) fn nth_after(&self, first: u16, i: u16) -> Option<(u16, usize)> {
        if first >= self.count || i >= self.count || !self.in_ring[usize::from(first)] {
            return None;
        }
        let slot = self.bid_slot[usize::from(first)].wrapping_add(i) & (self.count - 1);
        let bid = self.slot_bid[usize::from(slot)];
        if !self.in_ring[usize::from(bid)] {
            return None;
        }
        let entry = self
            .entries
            .ptr
            .as_ptr()
            .cast::<RawBuf>()
            .wrapping_add(usize::from(slot));
        // SAFETY: `slot < count`: in the entries mapping, aligned (see `put`). The kernel
        // writes an entry's `len` only while it maps the entry for a receive, before the
        // completion that hands it back; this one has been handed back, so nothing writes
        // it now. A volatile read: the kernel wrote it, not this thread.
        let len = unsafe { (&raw const (*entry).len).read_volatile() };
        Some((bid, (len as usize).min(self.size as usize)))
    }

    /// How many buffers, from `first` on in ring order, a bundle receive of `bytes` filled
    /// (as the kernel counts them: each to its slot's length, the last partly). `None` if
    /// the completion names buffers we cannot account for.
    pub(super) fn bundle_len(&self, first: u16, bytes: usize) -> Option<usize> {
        let mut left = bytes;
        let mut n: u16 = 0;
        while left > 0 {
            let (_, len) = self.nth_after(first, n)?;
            if len == 0 {
                return None;
            }
            left = left.saturating_sub(len);
            n += 1;
        }
        Some(usize::from(n))
    }

    /// Takes back the `n` buffers from `first` on in ring order, which a completion handed
    /// us (the kernel took them from the posted ones), and tops the ring up once. Returns
    /// `false`, and takes back nothing, if any of them is not in the ring.
    pub(super) fn release(&mut self, first: u16, n: usize) -> bool {
        let Ok(n) = u16::try_from(n) else {
            return false;
        };
        if n == 0 {
            return true;
        }
        if (0..n).any(|i| self.nth_after(first, i).is_none()) {
            return false;
        }
        #[cfg(test)]
        {
            let start = self.bid_slot[usize::from(first)];
            if u32::from(start) + u32::from(n) > u32::from(self.count) {
                self.wrapped += 1;
            }
        }
        // Every slot is read before the first top-up rewrites any of them.
        let slot = self.bid_slot[usize::from(first)];
        for i in 0..n {
            let bid = self.slot_bid[usize::from(slot.wrapping_add(i) & (self.count - 1))];
            self.in_ring[usize::from(bid)] = false;
            self.posted = self.posted.saturating_sub(1);
            self.spare.push(bid);
        }
        self.top_up();
        true
    }

    /// Pages of buffer memory that are resident (`mincore`), for tests.
    #[cfg(test)]
    pub(super) fn resident_pages(&self) -> usize {
        let page = 4096;
        let mut vec = vec![0u8; self.data.len.div_ceil(page)];
        // SAFETY: `data` is our mapping, page-aligned, `len` bytes; `vec` has one byte per
        // page of it.
        let res = unsafe {
            libc::mincore(
                self.data.ptr.as_ptr().cast(),
                self.data.len,
                vec.as_mut_ptr(),
            )
        };
        assert_eq!(res, 0, "mincore: {}", io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    /// The first `len` bytes of buffer `bid`, which a completion has just handed us.
    pub(super) fn slice(&self, bid: u16, len: usize) -> Option<&[u8]> {
        if bid >= self.count || len > self.size as usize {
            return None;
        }
        let offset = usize::from(bid) * self.size as usize;
        // SAFETY: in bounds (checked above). The kernel wrote these bytes before posting the
        // completion that named `bid`, and it does not touch buffer `bid` again until we
        // `release` it, which happens only after the returned slice is dead.
        Some(unsafe { std::slice::from_raw_parts(self.data.ptr.as_ptr().add(offset), len) })
    }
}
