//! Per-worker counters: each worker writes only its own (relaxed atomics on its own cache
//! lines, no lock, no contention); readers sum them across workers when they scrape.
//!
//! Owns: the counters. Must not touch: anything else.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$m:meta])* $name:ident,)*) => {
        /// One worker's counters.
        #[derive(Debug, Default)]
        #[repr(align(128))]
        pub struct CoreStats {
            $($(#[$m])* pub $name: AtomicU64,)*
            /// The most bytes any one connection had queued at a flush (a high-water mark).
            pub queue_high_water: AtomicU64,
        }

        /// A summed copy of [`CoreStats`] (high-water marks take the maximum).
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $($(#[$m])* pub $name: u64,)*
            /// The most bytes any one connection had queued at a flush.
            pub queue_high_water: u64,
        }

        impl CoreStats {
            /// Adds this worker's values into `into`.
            pub fn add_to(&self, into: &mut StatsSnapshot) {
                $(into.$name += self.$name.load(Ordering::Relaxed);)*
                into.queue_high_water =
                    into.queue_high_water.max(self.queue_high_water.load(Ordering::Relaxed));
            }
        }
    };
}

counters! {
    /// Connections open now.
    connections,
    /// Connections accepted since start.
    accepted,
    /// Frames received from clients.
    frames_in,
    /// Messages accepted (sequenced) by rooms this worker owns.
    messages_in,
    /// Ephemeral events accepted.
    ephemeral_in,
    /// Messages written to connections (live and replayed).
    deliveries,
    /// Messages written from history (resume and catch-up).
    replayed,
    /// Bytes read from sockets.
    bytes_in,
    /// Bytes written to sockets.
    bytes_out,
    /// Connections currently lagging (fed from history).
    lagging,
    /// Times a connection started lagging.
    lag_events,
    /// GAP frames sent.
    gaps,
    /// Resume entries honoured in HELLO.
    resumes,
    /// Connections closed for a protocol error.
    protocol_errors,
    /// Connections closed by the heartbeat.
    heartbeat_timeouts,
    /// Sends submitted (one per connection per loop tick at most).
    sends,
    /// Publishes refused by the per-connection rate limit.
    rate_limited,
    /// Requests refused by another limit (payload, rooms, connections per user, ...).
    limit_refusals,
    /// Connections turned away with GOAWAY(overload) (connection cap or accept rate).
    overload_refusals,
    /// HELLOs refused for a bad or expired token.
    auth_failures,
}

/// Increments a counter.
#[inline]
pub fn inc(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Decrements a counter (gauges).
#[inline]
pub fn dec(counter: &AtomicU64, by: u64) {
    counter.fetch_sub(by, Ordering::Relaxed);
}
