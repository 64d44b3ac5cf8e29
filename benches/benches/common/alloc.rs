//! The allocator a memory bench measures under: the relay's own (mimalloc, as
//! `relay/src/main.rs` ships it), or glibc's for tools that only see the system allocator
//! (valgrind's massif). A bench opts in with `#[global_allocator] static A: BenchAlloc`.
//!
//! Owns: the choice (made once, at the process's first allocation, from
//! `PABAL_BENCH_ALLOCATOR`: `glibc` for the system allocator, anything else or unset for
//! mimalloc) and the count of mimalloc's bytes in use. Must not touch the relay.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use mimalloc::MiMalloc;

/// The environment variable that picks the allocator (read once, at the process's first
/// allocation).
const ALLOCATOR_VAR: &std::ffi::CStr = c"PABAL_BENCH_ALLOCATOR";

const UNDECIDED: u8 = 0;
const MIMALLOC: u8 = 1;
const GLIBC: u8 = 2;

/// Which allocator this process runs on: decided at its first allocation and never changed
/// after (a block is always freed by the allocator that made it).
static CHOICE: AtomicU8 = AtomicU8::new(UNDECIDED);

/// mimalloc's bytes in use: the usable size of every live block (its size class, what the
/// allocator set aside for it), so rounding to size classes counts as it costs.
static MI_IN_USE: AtomicUsize = AtomicUsize::new(0);

/// mimalloc (counted) or glibc's malloc, per [`ALLOCATOR_VAR`].
pub struct BenchAlloc;

fn choice() -> u8 {
    let chosen = CHOICE.load(Ordering::Relaxed);
    if chosen != UNDECIDED {
        return chosen;
    }
    // SAFETY: `getenv` reads the environment without allocating; the first allocation
    // happens on the main thread before any other thread exists, so nothing sets the
    // environment concurrently.
    let var = unsafe { libc::getenv(ALLOCATOR_VAR.as_ptr()) };
    // SAFETY: a non-null `getenv` result is a NUL-terminated string that lives as long as
    // the environment is not changed.
    let glibc = !var.is_null() && unsafe { std::ffi::CStr::from_ptr(var) }.to_bytes() == b"glibc";
    let want = if glibc { GLIBC } else { MIMALLOC };
    match CHOICE.compare_exchange(UNDECIDED, want, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => want,
        Err(other) => other,
    }
}

fn count_in(ptr: *mut u8) -> *mut u8 {
    if !ptr.is_null() {
        // SAFETY: `ptr` is a live block mimalloc just handed out.
        MI_IN_USE.fetch_add(unsafe { MiMalloc.usable_size(ptr) }, Ordering::Relaxed);
    }
    ptr
}

fn count_out(ptr: *mut u8) {
    // SAFETY: `ptr` is a live block of mimalloc's, about to be freed or reallocated.
    let size = unsafe { MiMalloc.usable_size(ptr) };
    MI_IN_USE.fetch_sub(size, Ordering::Relaxed);
    note_large_free(size);
}

/// Blocks at least this large are noted when freed while tracing is on.
const LARGE_FREE: usize = 16 * 1024;
/// Frees noted at most (the rest are counted in sizes only).
const LARGE_FREES: usize = 256;

/// Whether large frees are noted now ([`trace_large_frees`]). Off while one is being noted:
/// noting allocates, and frees of its own must not be noted (nor recurse).
static TRACE_LARGE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Each large block freed while tracing: its usable size and where it was freed.
static LARGE_FREED: std::sync::Mutex<Vec<(usize, std::backtrace::Backtrace)>> =
    std::sync::Mutex::new(Vec::new());

/// Notes a block of `size` usable bytes being freed, with the stack that frees it, when it
/// is large and tracing is on (a diagnostic: capturing the stack takes memory and time).
fn note_large_free(size: usize) {
    if size < LARGE_FREE || !TRACE_LARGE.swap(false, Ordering::Relaxed) {
        return;
    }
    let mut freed = LARGE_FREED.lock().unwrap_or_else(|e| e.into_inner());
    if freed.len() < LARGE_FREES {
        freed.push((size, std::backtrace::Backtrace::force_capture()));
    }
    drop(freed);
    TRACE_LARGE.store(true, Ordering::Relaxed);
}

/// Starts (or stops) noting the large blocks freed, with the stacks that free them.
pub fn trace_large_frees(on: bool) {
    TRACE_LARGE.store(on, Ordering::Relaxed);
}

/// Prints each large block freed while tracing (and forgets them): its size and the
/// relay's innermost source lines on the stack that freed it.
pub fn print_large_frees() {
    let freed = std::mem::take(&mut *LARGE_FREED.lock().unwrap_or_else(|e| e.into_inner()));
    let total: usize = freed.iter().map(|(size, _)| size).sum();
    eprintln!("{} large blocks freed, {} KiB:", freed.len(), total >> 10);
    for (size, stack) in freed {
        let text = stack.to_string();
        let frames: Vec<&str> = text
            .lines()
            .filter_map(|l| l.find("relay/src/").map(|at| &l[at..]))
            .take(4)
            .collect();
        eprintln!("  {size:>7} B freed at {}", frames.join(" < "));
    }
}

// SAFETY: every call forwards to the one allocator chosen for the process (never changed
// after the first allocation), with the caller's layout and pointer unchanged.
unsafe impl GlobalAlloc for BenchAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if choice() == GLIBC {
            // SAFETY: the caller's contract, forwarded.
            return unsafe { System.alloc(layout) };
        }
        // SAFETY: the caller's contract, forwarded.
        count_in(unsafe { MiMalloc.alloc(layout) })
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if choice() == GLIBC {
            // SAFETY: the caller's contract, forwarded.
            return unsafe { System.alloc_zeroed(layout) };
        }
        // SAFETY: the caller's contract, forwarded.
        count_in(unsafe { MiMalloc.alloc_zeroed(layout) })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if choice() == GLIBC {
            // SAFETY: the caller's contract, forwarded (the block is glibc's).
            return unsafe { System.dealloc(ptr, layout) };
        }
        count_out(ptr);
        // SAFETY: the caller's contract, forwarded (the block is mimalloc's).
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if choice() == GLIBC {
            // SAFETY: the caller's contract, forwarded (the block is glibc's).
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: `ptr` is mimalloc's live block (the caller's contract).
        let old = unsafe { MiMalloc.usable_size(ptr) };
        // SAFETY: the caller's contract, forwarded.
        let new = unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            if new != ptr {
                note_large_free(old);
            }
            MI_IN_USE.fetch_sub(old, Ordering::Relaxed);
            count_in(new);
        }
        new
    }
}

/// The allocator this process runs on, by name ("mimalloc", or "glibc" for the system
/// allocator: also the answer in a bench that does not install [`BenchAlloc`]).
pub fn allocator_name() -> &'static str {
    if CHOICE.load(Ordering::Relaxed) == MIMALLOC {
        "mimalloc"
    } else {
        "glibc"
    }
}

/// Bytes this process's allocator has handed out and not had back. Under mimalloc: the
/// usable sizes of its live blocks, counted by [`BenchAlloc`] (mimalloc's own statistics
/// are compiled out of its release build: `MI_STAT` 0). Under glibc: `mallinfo2` (the main
/// arena and the threads' arenas, plus mmapped chunks, its per-block headers included).
pub fn heap_in_use() -> u64 {
    if CHOICE.load(Ordering::Relaxed) == MIMALLOC {
        return MI_IN_USE.load(Ordering::Relaxed) as u64;
    }
    // SAFETY: `mallinfo2` only reads the allocator's counters and returns them by value.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as u64
}
