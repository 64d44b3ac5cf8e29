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
            /// Time from a message's acceptance by its room's owner to the loop tick that
            /// queues it for a connection's send, per delivery.
            pub publish_to_send: Histogram,
            /// Connections written per fan-out of one message on one worker.
            pub fanout_batch: Histogram,
            /// The worker's durable log's metrics (disk mode), copied once a second by the
            /// worker; read by scrapes only, so the lock is never contended per message.
            pub storage: parking_lot::Mutex<Option<crate::storage::StorageMetrics>>,
        }

        /// A summed copy of [`CoreStats`] (high-water marks take the maximum).
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        pub struct StatsSnapshot {
            $($(#[$m])* pub $name: u64,)*
            /// The most bytes any one connection had queued at a flush.
            pub queue_high_water: u64,
            /// See [`CoreStats::publish_to_send`] (microseconds).
            pub publish_to_send: HistogramSnapshot,
            /// See [`CoreStats::fanout_batch`] (connections).
            pub fanout_batch: HistogramSnapshot,
        }

        impl CoreStats {
            /// Adds this worker's values into `into`.
            pub fn add_to(&self, into: &mut StatsSnapshot) {
                $(into.$name += self.$name.load(Ordering::Relaxed);)*
                into.queue_high_water =
                    into.queue_high_water.max(self.queue_high_water.load(Ordering::Relaxed));
                self.publish_to_send.add_to(&mut into.publish_to_send);
                self.fanout_batch.add_to(&mut into.fanout_batch);
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
    /// Offline hand-offs found by rooms this worker owns (members who did not ack in time).
    handoffs_detected,
    /// Publishes recognised as repeats (protocol v2) and answered with the original PUBACK.
    publishes_repeated,
    /// Times a member's delivered or read marker advanced at its room's owner.
    markers_advanced,
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
    /// Bytes queued for connections, summed once a second (a gauge).
    queued_bytes,
    /// Liveness probes answered (the watchdog's sequence number last seen).
    probe_ack,
    /// Loop iterations.
    ticks,
    /// Publishes refused by the per-connection rate limit.
    rate_limited,
    /// Requests refused by another limit (payload, rooms, connections per user, ...).
    limit_refusals,
    /// Connections turned away with GOAWAY(overload) (connection cap or accept rate).
    overload_refusals,
    /// HELLOs refused for a bad or expired token.
    auth_failures,
    /// SUBSCRIBE/UNSUBSCRIBE frames refused by the per-connection rate limit.
    subscribe_rate_limited,
    /// Rooms and channels this worker owns (a gauge).
    rooms,
    /// Owned rooms evicted: no members, no subscribers, no retained history.
    rooms_evicted,
    /// Accept attempts that failed and paused accepting (EMFILE, ENFILE, ENOBUFS, ENOMEM);
    /// copied from the backend each loop tick.
    accept_failures,
    /// Episodes of paused accepting (one per run of failures; see `io::accept`).
    accept_pauses,
    // The transport layers' counters (`transport::Layers`): TLS and WebSocket.
    /// TLS handshakes completed.
    tls_handshakes,
    /// TLS handshakes that resumed a session (a ticket).
    tls_resumptions,
    /// TLS handshakes that failed: the client refused or lacks ALPN `pabal/1`.
    tls_failed_alpn,
    /// TLS handshakes that failed: the peer sent an alert.
    tls_failed_peer_alert,
    /// TLS handshakes that failed: a malformed, unexpected or undecryptable message.
    tls_failed_bad_message,
    /// TLS handshakes that failed: nothing in common (versions, suites, groups).
    tls_failed_incompatible,
    /// TLS handshakes that failed for another reason rustls gives.
    tls_failed_other,
    /// TLS handshakes the peer or the handshake deadline ended before they finished.
    tls_failed_incomplete,
    /// 0-RTT early data accepted (the HELLO rode in the first flight).
    tls_early_accepted,
    /// 0-RTT early data offered but rejected (ticket unknown or already used: a replay).
    tls_early_rejected,
    /// Connections ended for early data other than one HELLO.
    tls_early_refused,
    /// WebSocket upgrades completed.
    ws_upgrades,
    /// WebSocket upgrades refused: not an HTTP/1.1 GET, bad Sec-WebSocket-Key (400).
    ws_refused_bad_request,
    /// WebSocket upgrades refused: not a WebSocket upgrade or not version 13 (426).
    ws_refused_not_websocket,
    /// WebSocket upgrades refused: the request was too large (431).
    ws_refused_too_large,
    /// WebSocket upgrades refused: the Origin is not in `websocket.allowed_origins` (403).
    ws_refused_origin,
}

/// Upper bounds of the histogram buckets (microseconds for latency, a count for batches);
/// the last bucket is unbounded.
pub const BUCKETS: [u64; 18] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
    250_000, 1_000_000,
];

/// A fixed-bucket histogram written by one worker with relaxed atomics.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum: AtomicU64,
}

impl Histogram {
    /// Records `n` observations of `value`.
    #[inline]
    pub fn record(&self, value: u64, n: u64) {
        let i = BUCKETS.partition_point(|&b| b < value);
        self.counts[i].fetch_add(n, Ordering::Relaxed);
        self.sum
            .fetch_add(value.saturating_mul(n), Ordering::Relaxed);
    }

    pub(crate) fn add_to(&self, into: &mut HistogramSnapshot) {
        for (i, c) in self.counts.iter().enumerate() {
            into.counts[i] += c.load(Ordering::Relaxed);
        }
        into.sum += self.sum.load(Ordering::Relaxed);
    }
}

/// Summed bucket counts: `counts[i]` observations were `<= BUCKETS[i]` (and above the
/// previous bound); the last entry counts those above every bound.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HistogramSnapshot {
    /// Per bucket (not cumulative).
    pub counts: [u64; BUCKETS.len() + 1],
    /// Sum of all observed values.
    pub sum: u64,
}

impl HistogramSnapshot {
    /// Observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_by_upper_bound() {
        let h = Histogram::default();
        h.record(0, 1);
        h.record(1, 1);
        h.record(3, 2);
        h.record(2_000_000, 1);
        let mut snap = HistogramSnapshot::default();
        h.add_to(&mut snap);
        assert_eq!(snap.counts[0], 2, "0 and 1 are <= 1");
        assert_eq!(snap.counts[2], 2, "3 is <= 5");
        assert_eq!(snap.counts[BUCKETS.len()], 1, "above every bound");
        assert_eq!(snap.count(), 5);
        assert_eq!(snap.sum, 1 + 6 + 2_000_000);
    }
}
