//! The engine's scripts as Redis runs them.
//!
//! End-to-end (real relay nodes on loopback, a real `redis-server` watched with `MONITOR`,
//! once per I/O backend): every command a script runs touches only keys its call declared
//! in `KEYS` (what Redis Cluster routes by and ACL key patterns check); every script goes
//! by its SHA (`EVALSHA`), its text only after Redis answered `NOSCRIPT`; and a `SCRIPT
//! FLUSH` in the middle of a run costs one resend per script, no failed call.
//!
//! Against a real `redis-server` alone: the offline hand-off's index on a large room reads
//! only the members behind the window (a page at a time), and a room from before the
//! index is indexed once, on first use.

#![allow(clippy::unwrap_used)] // reason: tests

mod against_redis;
mod end_to_end;
