//! The cluster's families on `GET /metrics` (`pabal_cluster_*`, `[cluster]` only): what
//! the engines and the owners count in [`crate::cluster::ClusterStats`], read once
//! per scrape into a [`ClusterScrape`] and encoded.
//!
//! Owns: the cluster's metric names, help texts and labels. Must not touch: the counters
//! themselves (the engine counts them, `cluster/mod.rs`), the other families
//! (`metrics.rs`).

use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::histogram;
use crate::stats::HistogramSnapshot;

/// The cluster's metrics as read at scrape time (see [`crate::cluster::ClusterStats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterScrape {
    /// Replies read from the engine.
    pub round_trips: u64,
    /// Commands in flight to the engine, all workers.
    pub pipeline_depth: i64,
    /// Room channels subscribed, all workers.
    pub subscriptions: i64,
    /// Messages read back from streams to fill holes.
    pub holes_filled: u64,
    /// Rooms' sequences moved up after Redis lost writes.
    pub sequences_raised: u64,
    /// Removals applied in their rooms' order.
    pub removals_in_order: u64,
    /// Engine errors by kind (in [`crate::cluster::EngineErrorKind::ALL`]'s order).
    pub errors: [u64; 6],
    /// Publishes refused `unavailable`.
    pub refused: u64,
    /// Engine threads with both connections up.
    pub engines_up: i64,
    /// Engine threads.
    pub engines: i64,
    /// Membership changes run in the engine.
    pub member_changes: u64,
    /// Notices received on users' channels.
    pub notices: u64,
    /// Reads of a user's rooms and blocks.
    pub user_loads: u64,
    /// Users' channels subscribed, all workers.
    pub users_watched: i64,
    /// The engine's path by stage (µs): `[to_engine, publish_reply, to_worker]`, see
    /// [`crate::cluster::ClusterStats::stages`].
    pub stages: [HistogramSnapshot; 3],
    /// Markers script calls (one per room per owner tick with markers that moved).
    pub marker_batches: u64,
    /// Marker updates dropped while too many waited for the engine.
    pub markers_dropped: u64,
    /// Rooms whose markers wait for the engine.
    pub markers_waiting: i64,
    /// Commands sent again after a retry's or redirect's error, by kind (in
    /// [`crate::cluster::RetryKind::ALL`]'s order).
    pub retries: [u64; 5],
    /// Commands given up after too many retries and redirects.
    pub retries_given_up: u64,
}

impl ClusterScrape {
    pub(super) fn of(c: &crate::cluster::ClusterStats) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        ClusterScrape {
            round_trips: c.round_trips.load(Relaxed),
            pipeline_depth: c.pipeline_depth.load(Relaxed),
            subscriptions: c.subscriptions.load(Relaxed),
            holes_filled: c.holes_filled.load(Relaxed),
            sequences_raised: c.sequences_raised.load(Relaxed),
            removals_in_order: c.removals_in_order.load(Relaxed),
            errors: crate::cluster::EngineErrorKind::ALL.map(|k| c.errors_of(k)),
            refused: c.refused.load(Relaxed),
            engines_up: c.engines_up.load(Relaxed),
            engines: c.engines.load(Relaxed),
            member_changes: c.member_changes.load(Relaxed),
            notices: c.notices.load(Relaxed),
            user_loads: c.user_loads.load(Relaxed),
            users_watched: c.users_watched.load(Relaxed),
            stages: c.stages(),
            marker_batches: c.marker_batches.load(Relaxed),
            markers_dropped: c.markers_dropped.load(Relaxed),
            markers_waiting: c.markers_waiting.load(Relaxed),
            retries: crate::cluster::RetryKind::ALL.map(|k| c.retries_of(k)),
            retries_given_up: c.retries_given_up.load(Relaxed),
        }
    }

    pub(super) fn encode(&self, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
        for (name, help, v) in [
            (
                "pabal_cluster_engine_round_trips",
                "Replies read from the engine (Redis).",
                self.round_trips,
            ),
            (
                "pabal_cluster_holes_filled",
                "Messages read back from a room's stream to fill a hole (a sequence jump or a lost subscription).",
                self.holes_filled,
            ),
            (
                "pabal_cluster_sequences_raised",
                "Rooms whose sequence Redis gave back below what this node delivered (it lost writes: a failover to a replica behind, a restart from an AOF not synced) and the node moved up again; what was lost is a gap.",
                self.sequences_raised,
            ),
            (
                "pabal_cluster_removals_in_order",
                "Removals from rooms applied in the room's own order (after the message before them, before the next) that ended a membership this node held.",
                self.removals_in_order,
            ),
            (
                "pabal_cluster_publishes_refused",
                "Publishes refused `unavailable` (engine down, or cluster.max_in_flight reached).",
                self.refused,
            ),
            (
                "pabal_cluster_member_changes",
                "Membership changes (joins, leaves, blocks) run in the engine.",
                self.member_changes,
            ),
            (
                "pabal_cluster_notices",
                "Notices received on users' channels (joins, leaves, disconnects).",
                self.notices,
            ),
            (
                "pabal_cluster_user_loads",
                "Reads of a user's rooms and blocks from the engine (a first connection on a worker, a resubscription).",
                self.user_loads,
            ),
            (
                "pabal_cluster_marker_batches",
                "Receipts' marker updates sent to the engine (one script call per room per owner tick).",
                self.marker_batches,
            ),
            (
                "pabal_cluster_markers_dropped",
                "Marker updates dropped because too many waited for the engine while it was down.",
                self.markers_dropped,
            ),
            (
                "pabal_cluster_engine_retries_given_up",
                "Engine commands given up after too many retries and redirects together (refused unavailable).",
                self.retries_given_up,
            ),
        ] {
            let c = ConstCounter::new(v);
            c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let mut m = enc.encode_descriptor(
            "pabal_cluster_engine_retries",
            "Engine commands Redis answered with an error that sends them again, by kind: \
             tryagain, loading, busy (sent again after a backoff), ask, moved (sent where \
             Redis said).",
            None,
            MetricType::Counter,
        )?;
        for (kind, n) in crate::cluster::RetryKind::ALL.iter().zip(self.retries) {
            ConstCounter::new(n).encode(m.encode_family(&[("kind", kind.label())])?)?;
        }
        let mut m = enc.encode_descriptor(
            "pabal_cluster_engine_errors",
            "Engine errors, by kind: refused (a connection refused), timeout (a connection \
             or the topology's answer past cluster.connect_timeout), connection_lost (closed, \
             reset, or not made otherwise), protocol (an answer the engine cannot read), \
             error_reply (Redis answered a command with an error: a script's error, \
             READONLY, OOM, a subscription refused, redirected too often), replicas (WAIT \
             answered with too few replicas).",
            None,
            MetricType::Counter,
        )?;
        for (kind, n) in crate::cluster::EngineErrorKind::ALL.iter().zip(self.errors) {
            ConstCounter::new(n).encode(m.encode_family(&[("kind", kind.label())])?)?;
        }
        for (name, help, v) in [
            (
                "pabal_cluster_pipeline_depth",
                "Commands sent to the engine and not answered yet, all workers.",
                self.pipeline_depth,
            ),
            (
                "pabal_cluster_subscriptions",
                "Room channels subscribed on the engine, all workers.",
                self.subscriptions,
            ),
            (
                "pabal_cluster_engines_up",
                "Engine threads with both connections up (one per worker).",
                self.engines_up,
            ),
            (
                "pabal_cluster_engines",
                "Engine threads (one per worker).",
                self.engines,
            ),
            (
                "pabal_cluster_users_watched",
                "Users' notice channels subscribed on the engine, all workers.",
                self.users_watched,
            ),
            (
                "pabal_cluster_markers_waiting",
                "Rooms whose receipts' markers wait for the engine (down), all workers.",
                self.markers_waiting,
            ),
        ] {
            let g = ConstGauge::new(v);
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let [to_engine, publish_reply, to_worker] = &self.stages;
        for (name, help, h) in [
            (
                "pabal_cluster_to_engine_seconds",
                "From the start of the worker's tick that queued a command until its engine took it.",
                to_engine,
            ),
            (
                "pabal_cluster_publish_reply_seconds",
                "A publish written to Redis until its answer was read (Redis' appendfsync included).",
                publish_reply,
            ),
            (
                "pabal_cluster_to_worker_seconds",
                "An answer or message read by an engine until its worker took it.",
                to_worker,
            ),
        ] {
            histogram(enc, name, help, h, 1e6)?;
        }
        Ok(())
    }
}
