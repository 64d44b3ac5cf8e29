//! The durable log's families on `GET /metrics` (`pabal_storage_*`, disk mode only): each
//! worker's [`StorageMetrics`] with a `worker` label, and its power-of-two histograms
//! summed across workers.
//!
//! Owns: the storage metric names, help texts, the power-of-two histogram conversion.
//! Must not touch: the log's counters themselves (`storage/`), the other families
//! (`metrics.rs`).

use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::{Scrape, worker_label};
use crate::storage::{Log2Histogram, StorageMetrics};

type StorageField = fn(&StorageMetrics) -> u64;

/// The durable log's counters, with a `worker` label (disk mode only).
const STORAGE_COUNTERS: &[(&str, &str, StorageField)] = &[
    (
        "pabal_storage_written_bytes",
        "Record bytes written to the log.",
        |m| m.bytes_written,
    ),
    (
        "pabal_storage_written_records",
        "Records written to the log.",
        |m| m.records_written,
    ),
    (
        "pabal_storage_commits",
        "Group commits completed (one write per segment touched).",
        |m| m.batches,
    ),
    ("pabal_storage_fsyncs", "fdatasync calls completed.", |m| {
        m.syncs
    }),
    (
        "pabal_storage_full_refusals",
        "Appends refused with storage_full (quota or file system).",
        |m| m.full_refusals,
    ),
    (
        "pabal_storage_write_errors",
        "Writes that failed and were held for a retry.",
        |m| m.write_errors,
    ),
    ("pabal_storage_checkpoints", "Checkpoints written.", |m| {
        m.checkpoints
    }),
    (
        "pabal_storage_segments_deleted",
        "Segments deleted by retention.",
        |m| m.segments_deleted,
    ),
    (
        "pabal_storage_records_copied",
        "Messages copied forward by compaction.",
        |m| m.records_copied,
    ),
    (
        "pabal_storage_corrupt_reads",
        "Records that failed their checksum when read back.",
        |m| m.corrupt_reads,
    ),
];

/// The durable log's gauges, with a `worker` label (disk mode only).
const STORAGE_GAUGES: &[(&str, &str, StorageField)] = &[
    (
        "pabal_storage_disk_used_bytes",
        "Bytes the worker's log occupies: segments and checkpoint.",
        |m| m.disk_used_bytes,
    ),
    (
        "pabal_storage_segments",
        "Segments in the worker's log.",
        |m| m.segments,
    ),
    ("pabal_storage_rooms", "Rooms in the worker's log.", |m| {
        m.rooms
    }),
    (
        "pabal_storage_recovery_milliseconds",
        "How long the last recovery took.",
        |m| m.recovery_ms,
    ),
    (
        "pabal_storage_recovery_scanned_bytes",
        "Log bytes the last recovery scanned.",
        |m| m.recovery_bytes,
    ),
    (
        "pabal_storage_quarantined_segments",
        "Segments the last recovery quarantined (kept in quarantine/).",
        |m| m.quarantined_segments,
    ),
    (
        "pabal_storage_torn_tails_truncated",
        "Torn tails the last recovery truncated.",
        |m| m.torn_tails_truncated,
    ),
];

/// A power-of-two histogram summed across workers, as the encoder takes it.
fn log2_histogram(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    all: &[StorageMetrics],
    pick: fn(&StorageMetrics) -> &Log2Histogram,
    divisor: f64,
) -> fmt::Result {
    let mut total = Log2Histogram::default();
    for m in all {
        let h = pick(m);
        for (t, c) in total.buckets.iter_mut().zip(h.buckets.iter()) {
            *t += c;
        }
        total.count += h.count;
        total.sum = total.sum.saturating_add(h.sum);
    }
    let last = total.buckets.len() - 1;
    let buckets: Vec<(f64, u64)> = total
        .buckets
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let upper = if i == last {
                f64::INFINITY
            } else {
                Log2Histogram::bucket_upper(i) as f64 / divisor
            };
            (upper, c)
        })
        .collect();
    let mut metric = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    metric.encode_histogram::<NoLabelSet>(total.sum as f64 / divisor, total.count, &buckets, None)
}

impl Scrape {
    pub(super) fn encode_storage(&self, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
        if self.storage.is_empty() {
            return Ok(());
        }
        for &(name, help, field) in STORAGE_COUNTERS {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (w, s) in self.storage.iter().enumerate() {
                ConstCounter::new(field(s)).encode(m.encode_family(&worker_label(w))?)?;
            }
        }
        for &(name, help, field) in STORAGE_GAUGES {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (w, s) in self.storage.iter().enumerate() {
                ConstGauge::new(field(s)).encode(m.encode_family(&worker_label(w))?)?;
            }
        }
        log2_histogram(
            enc,
            "pabal_storage_fsync_seconds",
            "fdatasync latency per group commit (power-of-two microsecond buckets).",
            &self.storage,
            |m| &m.fsync_latency_us,
            1e6,
        )?;
        log2_histogram(
            enc,
            "pabal_storage_commit_batch_records",
            "Records per group commit.",
            &self.storage,
            |m| &m.batch_records,
            1.0,
        )
    }
}
