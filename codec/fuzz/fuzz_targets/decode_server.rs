//! Frames the relay sends, as a client decodes them: fed in two chunks split at a position
//! taken from the first byte; must never panic, must not depend on the split, and every
//! accepted frame must re-encode to exactly its bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pabal_codec::ServerFrame;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    common::decode_in_two::<ServerFrame>(data);
});
