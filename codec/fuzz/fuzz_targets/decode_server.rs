//! Frames the relay sends, as a client decodes them: fed whole and cut into reads at several
//! points taken from the input's header; must never panic, must not depend on the cuts, and
//! every accepted frame must re-encode to exactly its bytes (`common::decode_server`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| common::decode_server(data));
