//! pabal-loadgen: virtual phones on emulated mobile links, driving a pabal relay.
//!
//! The library holds loadgen's pieces that need no I/O, so they can be tested on their own:
//! - [`link`]: the sans-IO link model (bandwidth, delay, jitter, loss as RTO stalls, 3G/LTE
//!   radio states, carrier NAT expiry, handovers) that the event loop consults for every byte;
//! - [`profiles`]: the named link profiles (gprs, 3g-slow, 3g, hspa, lte, unshaped), TOML
//!   loading, and weighted profile mixes for a population of phones.
//!
//! The sources of every profile value are in `loadgen/LINKS.md`.
#![forbid(unsafe_code)]

pub mod link;
pub mod profiles;
