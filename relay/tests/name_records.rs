//! The heap blocks of a user's and a room's shared name record, counted by a wrapper around
//! the system allocator (every idle phone holds one user record, and one 1:1 room record
//! per two phones: a block more, or a larger one, is paid per phone).
//!
//! One test function: the counter is process-wide, and tests of one binary run on
//! several threads.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use pabal_codec::Text;
use pabal_relay::ids::{RoomName, UserName};

struct Counting;

static BLOCKS: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        BLOCKS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout (above).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Blocks and bytes asked for while `make` runs (what it returns is kept alive until the
/// count is taken).
fn counted<T>(make: impl FnOnce() -> T) -> (T, usize, usize) {
    let (blocks, bytes) = (
        BLOCKS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    let made = make();
    let blocks = BLOCKS.load(Ordering::Relaxed) - blocks;
    let bytes = BYTES.load(Ordering::Relaxed) - bytes;
    (made, blocks, bytes)
}

#[test]
fn a_name_record_is_one_block_holding_its_counts_and_bytes() {
    // A 12-byte user id: one block of the count, the length and the bytes (an `Arc` of a
    // `Text` was a 48-byte block and the bytes' own block).
    let (user, blocks, bytes) = counted(|| UserName::new("u-0123456789"));
    assert_eq!(
        (blocks, bytes),
        (1, 16 + 12),
        "a user's name record: one block"
    );
    // A clone and a lookup by the name allocate nothing.
    let (copy, blocks, _) = counted(|| user.clone());
    assert_eq!(blocks, 0);
    assert!(copy.same_record(&user) && copy == user);
    assert_eq!(&*user, "u-0123456789");

    // A 1:1 room's name (`dm:` and 9 digits): the record with its id and kind, and the
    // name's bytes (a `Text` in the record took 32 bytes of it and a block of its own).
    let name = Text::from("dm:012345678");
    let (room, blocks, bytes) = counted(|| RoomName::new(false, name.as_str()));
    assert!(
        (blocks, bytes) == (2, 16 + 32 + 12),
        "a room's name record: {blocks} blocks, {bytes} bytes"
    );
    assert_eq!(room.name.as_str(), "dm:012345678");
    let (_, blocks, _) = counted(|| room.clone());
    assert_eq!(blocks, 0);
}
