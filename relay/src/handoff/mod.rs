//! Offline hand-off: telling the app server, through a signed webhook, that a member of a
//! room has not received some of its messages in time, so that it can send a push
//! notification. The relay never talks to APNs or FCM itself.
//!
//! The pieces, from a worker to the app server:
//!
//! - [`HandoffTx`]: what a worker holds. [`HandoffTx::offer`] hands one [`Handoff`] to a
//!   bounded channel with `try_send` and returns at once; a full channel drops the item and
//!   counts it (`pabal_handoff_dropped_total{reason="channel_full"}`). Workers never wait.
//! - [`queue::Outbox`]: the sans-IO queue on the sender's side: bounded by
//!   `handoff.queue_max` (drop the oldest queued item when full), batching by
//!   `batch_max`/`batch_interval`, exponential backoff with jitter; time is an argument.
//! - [`wire`]: the JSON body, each item's idempotency id, the HMAC-SHA256 signature.
//! - [`sender`]: the task on the control thread's tokio runtime (the only runtime in the
//!   process): an HTTP/1.1 client (hyper) that drains the channel into the outbox and POSTs
//!   batches, one at a time, at least once.
//! - [`config`]: `[handoff]`, its per-prefix rules and their validation.
//!
//! Owns: the channel, the queue, the HTTP client, the hand-off counters. Must not touch:
//! worker state (the owner's detection feeds [`HandoffTx`]), the control plane's listener.

pub mod config;
pub mod detect;
pub mod queue;
pub mod sender;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use pabal_codec::Text;

use crate::ids::RoomName;
use crate::stats::Histogram;

/// The most items the workers' channel to the sender holds: `handoff.queue_max`, up to
/// this. The sender drains the channel whenever it runs, so it fills only when the control
/// thread is stalled, or when a window of a large room hands off many members at once
/// (one per offline member); tokio's channel takes memory in small blocks as items arrive,
/// not for its whole bound up front.
pub const CHANNEL_MAX: usize = 65_536;

/// The channel's bound for `config`.
pub fn channel_capacity(config: &config::HandoffConfig) -> usize {
    config.queue_max.clamp(1, CHANNEL_MAX)
}

/// One hand-off: `user` has not received messages `first_seq..=last_seq` of `room` in time.
/// Names are shared [`Text`]s (a clone is a reference-count increment), so building one
/// allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    /// The room or channel.
    pub room: RoomName,
    /// The room's epoch (sequences restart in a new epoch).
    pub epoch: u64,
    /// The first undelivered sequence of the window.
    pub first_seq: u64,
    /// The last one (equal to `first_seq` for one message).
    pub last_seq: u64,
    /// The member who has not received them.
    pub user: Text,
    /// Who published `last_seq`.
    pub publisher: Text,
    /// When `last_seq` was accepted, ms since the Unix epoch.
    pub time_ms: u64,
}

/// The hand-off counters, shared by the sender (which writes nearly all of them) and the
/// workers (which write only `dropped_channel_full`, when the channel is full). Read by
/// `/metrics`.
#[derive(Debug, Default)]
pub struct HandoffStats {
    /// Items held by the sender now: queued plus in flight (gauge).
    pub queued: AtomicU64,
    /// Items the sender took from the channel.
    pub enqueued: AtomicU64,
    /// Items the app server accepted (2xx).
    pub sent: AtomicU64,
    /// Batches the app server accepted.
    pub batches: AtomicU64,
    /// Attempts that failed and will be retried (5xx, 408, 429, timeout, connection error).
    pub retried: AtomicU64,
    /// Items dropped because the queue was full (the oldest queued goes first).
    pub dropped_queue_full: AtomicU64,
    /// Items dropped because the worker-to-sender channel was full.
    pub dropped_channel_full: AtomicU64,
    /// Items the app server refused for good (a 4xx other than 408 and 429).
    pub dropped_refused: AtomicU64,
    /// Items offered after the sender stopped (shutdown).
    pub dropped_stopped: AtomicU64,
    /// From an item's arrival in the queue to the 2xx of the batch that carried it (the
    /// batch's oldest item), milliseconds.
    pub batch_latency_ms: Histogram,
}

/// A copy of [`HandoffStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HandoffSnapshot {
    /// See [`HandoffStats::queued`].
    pub queued: u64,
    /// See [`HandoffStats::enqueued`].
    pub enqueued: u64,
    /// See [`HandoffStats::sent`].
    pub sent: u64,
    /// See [`HandoffStats::batches`].
    pub batches: u64,
    /// See [`HandoffStats::retried`].
    pub retried: u64,
    /// See [`HandoffStats::dropped_queue_full`].
    pub dropped_queue_full: u64,
    /// See [`HandoffStats::dropped_channel_full`].
    pub dropped_channel_full: u64,
    /// See [`HandoffStats::dropped_refused`].
    pub dropped_refused: u64,
    /// See [`HandoffStats::dropped_stopped`].
    pub dropped_stopped: u64,
    /// See [`HandoffStats::batch_latency_ms`].
    pub batch_latency_ms: crate::stats::HistogramSnapshot,
}

impl HandoffStats {
    /// Reads every counter now.
    pub fn snapshot(&self) -> HandoffSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut batch_latency_ms = crate::stats::HistogramSnapshot::default();
        self.batch_latency_ms.add_to(&mut batch_latency_ms);
        HandoffSnapshot {
            queued: get(&self.queued),
            enqueued: get(&self.enqueued),
            sent: get(&self.sent),
            batches: get(&self.batches),
            retried: get(&self.retried),
            dropped_queue_full: get(&self.dropped_queue_full),
            dropped_channel_full: get(&self.dropped_channel_full),
            dropped_refused: get(&self.dropped_refused),
            dropped_stopped: get(&self.dropped_stopped),
            batch_latency_ms,
        }
    }
}

/// A worker's end of the channel to the sender. Cloned once per worker at start.
#[derive(Debug, Clone)]
pub struct HandoffTx {
    tx: tokio::sync::mpsc::Sender<Handoff>,
    stats: Arc<HandoffStats>,
}

/// The sender's end, taken once by the control thread.
#[derive(Debug)]
pub struct HandoffRx {
    pub(crate) rx: tokio::sync::mpsc::Receiver<Handoff>,
    pub(crate) stats: Arc<HandoffStats>,
}

/// A bounded channel of `capacity` items from the workers to the sender, and the counters
/// both ends write.
pub fn channel(capacity: usize) -> (HandoffTx, HandoffRx) {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
    let stats = Arc::new(HandoffStats::default());
    (
        HandoffTx {
            tx,
            stats: stats.clone(),
        },
        HandoffRx { rx, stats },
    )
}

impl HandoffTx {
    /// Hands `item` to the sender without waiting (no runtime needed): a full channel, or a
    /// stopped sender, drops it and counts it. Returns whether it was taken.
    pub fn offer(&self, item: Handoff) -> bool {
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                crate::stats::inc(&self.stats.dropped_channel_full, 1);
                false
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                crate::stats::inc(&self.stats.dropped_stopped, 1);
                false
            }
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<HandoffStats> {
        &self.stats
    }
}

impl HandoffRx {
    /// The counters.
    pub fn stats(&self) -> &Arc<HandoffStats> {
        &self.stats
    }
}
