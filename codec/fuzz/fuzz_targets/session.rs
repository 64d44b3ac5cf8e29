//! Decoded server frames fed into `ClientSession::apply`, whole and cut into reads at several
//! points: whatever a relay sends, the client's session state machine returns an event or an
//! error, never panics, keeps its cursors where the events say, and ends the same however
//! the stream was cut (`common::session`, which documents the input format).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| common::session(data));
