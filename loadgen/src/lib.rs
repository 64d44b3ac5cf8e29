//! pabal-loadgen: virtual phones on emulated mobile links, driving a pabal relay, with
//! delivery verification.
//!
//! Sans-IO pieces, testable on their own:
//! - [`link`]: the link model (bandwidth, delay, jitter, loss as RTO stalls, 3G/LTE radio
//!   states, carrier NAT expiry, handovers) that the event loop consults for every byte;
//! - [`profiles`]: the named link profiles and weighted profile mixes;
//! - [`scenario`]: scenario files (TOML) and `--scale`;
//! - [`plan`]: the concrete population a scenario and seed describe;
//! - [`payload`]: the measurement header and checksum every message carries;
//! - [`schedule`]: open-loop send schedules and drop/backoff draws;
//! - [`ledger`]: what the relay acknowledged under each sequence, checked against what
//!   phones received;
//! - [`gaps`]: whether a GAP was allowed (retention or an epoch change);
//! - [`verify`]: the kinds of violation, thresholds, and the final verdict;
//! - [`metrics`]: histograms and counters; [`uplink`]: each message's time in its
//!   sender's uplink;
//! - [`report`]: the table and JSON; [`chart`]: the SVG; [`shard`]: `--shard i/n` and
//!   `--merge`, one population over several loadgen processes and their one verdict.
//!
//! With I/O:
//! - [`phone`]: one virtual phone (socket, link, session, schedule);
//! - [`worker`]: one thread's mio event loop over many phones;
//! - [`run`]: a whole run; [`api`]: tokens and the relay's server API; [`spawn`]: child
//!   relays for `--spawn-relay` (one, or a cluster's nodes); [`fault`]: a node killed and
//!   restarted mid-run;
//! - [`targets`]: the relay addresses phones are spread over, and when a phone moves on;
//! - [`tls_reconnect`]: `--tls-reconnect`, what a reconnect costs over TLS (fresh, resumed,
//!   0-RTT) on each link profile.
//!
//! The sources of every profile value are in `loadgen/LINKS.md`; how to run it, in
//! `loadgen/README.md`.
#![forbid(unsafe_code)]

pub mod api;
pub mod chart;
pub mod fault;
pub mod gaps;
pub mod ledger;
pub mod link;
pub mod metrics;
pub mod payload;
pub mod phone;
pub mod plan;
pub mod profiles;
pub mod report;
pub mod run;
pub mod scenario;
pub mod schedule;
pub mod shard;
pub mod spawn;
pub mod targets;
pub mod tls_reconnect;
pub mod uplink;
pub mod verify;
pub mod worker;
