//! pabal's relay: a thread-per-core daemon that holds phones' persistent connections and fans
//! messages out to rooms and channels.
//!
//! - [`runtime`] starts one worker per core, each with its own I/O backend ([`io`]) and its
//!   own [`core::Core`] state machine, connected by message passing ([`mesh`]).
//! - [`core`] is sans-IO: routing, sequencing, history, resume, backpressure, heartbeats.
//! - [`transport`] layers TLS and WebSocket between a backend and the core, per listener.
//! - [`config`] is the TOML configuration with documented defaults; [`auth`] checks tokens.
//! - [`storage`] is the durable state: one segmented log per worker, group commit per tick,
//!   checkpointed recovery that truncates only a torn tail and quarantines interior damage.
//!
//! See ARCHITECTURE.md at the repository root for the threads and the path of one message.

#![warn(missing_docs)]

pub mod auth;
pub mod cluster;
pub mod config;
pub(crate) mod conn;
pub(crate) mod control;
pub(crate) mod core;
pub(crate) mod directory;
pub mod handoff;
pub(crate) mod history;
pub(crate) mod idempotency;
pub mod ids;
pub mod io;
pub(crate) mod mesh;
pub mod metrics;
pub mod reload;
pub mod rng;
pub mod runtime;
pub mod sender_name;
pub(crate) mod stats;
pub mod storage;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;
pub(crate) mod transport;
pub mod watchdog;
