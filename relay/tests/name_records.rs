//! The heap blocks of a user's and a room's shared name record, counted by dhat's heap
//! profiler in testing mode (every idle phone holds one user record, and one 1:1 room record
//! per two phones: a block more, or a larger one, is paid per phone).
//!
//! One test function: dhat allows one profiler at a time in a process, and tests of one
//! binary run on several threads.

use pabal_codec::Text;
use pabal_relay::ids::{RoomName, UserName};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Blocks and bytes asked for while `make` runs (what it returns is kept alive until the
/// count is taken).
fn counted<T>(make: impl FnOnce() -> T) -> (T, u64, u64) {
    let before = dhat::HeapStats::get();
    let made = make();
    let after = dhat::HeapStats::get();
    (
        made,
        after.total_blocks - before.total_blocks,
        after.total_bytes - before.total_bytes,
    )
}

#[test]
fn a_name_record_is_one_block_holding_its_counts_and_bytes() {
    let _profiler = dhat::Profiler::builder().testing().build();
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
