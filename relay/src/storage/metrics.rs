//! Storage metrics: plain counters, gauges and fixed-size histograms in one `Copy` struct,
//! written only by the worker that owns the log, which the core copies into its stats.
//!
//! Owns: the numbers and their arithmetic. Must not allocate or lock.

/// A histogram with power-of-two buckets: bucket 0 counts zeros, bucket `i` counts values
/// in `2^(i-1) ..= 2^i - 1`, the last bucket everything larger. Fixed size, no allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Log2Histogram {
    /// Counts per bucket.
    pub buckets: [u64; 32],
    /// Values recorded.
    pub count: u64,
    /// Their sum (saturating).
    pub sum: u64,
    /// The largest value recorded.
    pub max: u64,
}

impl Log2Histogram {
    /// Counts one value.
    pub fn record(&mut self, value: u64) {
        let bucket = (64 - value.leading_zeros() as usize).min(31);
        self.buckets[bucket] += 1;
        self.count += 1;
        self.sum = self.sum.saturating_add(value);
        self.max = self.max.max(value);
    }

    /// The upper bound of bucket `i` (inclusive).
    pub fn bucket_upper(i: usize) -> u64 {
        if i == 0 { 0 } else { (1u64 << i.min(63)) - 1 }
    }

    /// An upper bound for the `q` quantile (0.0..=1.0): the top of the bucket it falls in.
    pub fn quantile_upper(&self, q: f64) -> u64 {
        let target = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Self::bucket_upper(i).min(self.max);
            }
        }
        self.max
    }
}

/// Everything a worker's log counts. Counters only grow; gauges say "now".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageMetrics {
    /// Record bytes written to segment files (counter).
    pub bytes_written: u64,
    /// Records written (counter).
    pub records_written: u64,
    /// Group commits completed: one write (or two across a segment roll) each (counter).
    pub batches: u64,
    /// Records per group commit.
    pub batch_records: Log2Histogram,
    /// fdatasync calls completed (counter).
    pub syncs: u64,
    /// fdatasync latency, microseconds.
    pub fsync_latency_us: Log2Histogram,
    /// Appends refused with `StorageFull` (counter).
    pub full_refusals: u64,
    /// Writes that failed and were held for a retry (counter).
    pub write_errors: u64,
    /// Segments created (counter).
    pub segments_created: u64,
    /// Segments deleted by retention (counter).
    pub segments_deleted: u64,
    /// Messages copied forward by compaction (counter).
    pub records_copied: u64,
    /// Checkpoints written (counter).
    pub checkpoints: u64,
    /// Records that failed their checksum when read back (counter).
    pub corrupt_reads: u64,
    /// How long the last recovery took, milliseconds (gauge).
    pub recovery_ms: u64,
    /// Log bytes the last recovery scanned (gauge).
    pub recovery_bytes: u64,
    /// Segments the last recovery quarantined (gauge; the files stay in `quarantine/`).
    pub quarantined_segments: u64,
    /// Torn tails the last recovery truncated (gauge).
    pub torn_tails_truncated: u64,
    /// Bytes the log occupies on disk: segments and checkpoint (gauge).
    pub disk_used_bytes: u64,
    /// Segments in the log (gauge).
    pub segments: u64,
    /// Rooms in the log (gauge).
    pub rooms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_and_quantiles_bound_from_above() {
        let mut h = Log2Histogram::default();
        for v in [0, 1, 2, 3, 4, 1000, 1000, 1000, 1000, 1_000_000] {
            h.record(v);
        }
        assert_eq!(h.buckets[0], 1);
        assert_eq!(h.buckets[1], 1);
        assert_eq!(h.buckets[2], 2);
        assert_eq!(h.buckets[10], 4); // 512..=1023
        assert_eq!(h.count, 10);
        assert_eq!(h.max, 1_000_000);
        assert_eq!(h.quantile_upper(0.5), 7);
        assert_eq!(h.quantile_upper(0.6), 1023);
        assert_eq!(h.quantile_upper(1.0), 1_000_000);
        h.record(u64::MAX);
        assert_eq!(h.buckets[31], 1);
    }
}
