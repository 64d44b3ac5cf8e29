//! Durable state: one segmented, append-only log per worker holding the history, epochs and
//! membership of the rooms that worker owns, interleaved, with group commit per loop tick,
//! checkpointed recovery and paged reads.
//!
//! Owns: everything under `[storage] dir` (one directory per worker: segment files, the
//! checkpoint, quarantined segments). Must not touch: connections, cores or the directory of
//! users; the core calls it with rooms and sequences it has already decided, and decides
//! itself what to acknowledge from the [`StorageEvent`]s it gets back.
//!
//! The parts, by concern:
//! - [`record`]: the record format (length-prefixed, two crc32c checksums, versioned).
//! - [`segment`]: segment files, their header, naming, directory fsync.
//! - [`state`]: the per-room index (extents of sequences in segments) and the durable facts
//!   (epoch, head, members with join points, blocks), and how a record changes them.
//! - [`log`]: [`WorkerLog`], the sans-IO heart: appends during a tick into one buffer, hands
//!   out one [`Job`] at the end of it, takes [`Completion`]s back as events.
//! - [`commit`]: the [`CommitExecutor`] trait and [`SyncThread`], the blocking executor (a
//!   per-worker thread, so the event loop never waits on fsync), which the epoll backend
//!   uses; the io_uring backend runs the same jobs through the worker's own ring
//!   (`crate::io::uring_storage`).
//! - [`recovery`]: checkpoint, then a forward scan verifying every checksum; truncates only
//!   a torn tail and quarantines interior damage.
//! - [`checkpoint`]: the checkpoint file (the whole per-room index and membership).
//! - [`read`]: history pages read back from segments through the index.
//! - [`retention`]: trimming rooms, deleting whole segments, copying cold rooms forward.
//! - [`rehome`]: at a start with another worker count, every room copied into the log of
//!   its new owner.
//! - [`metrics`]: plain counters and histograms the core copies into its stats.
//!
//! Membership, subscriptions (channel membership), blocks and room epochs are records in the
//! same log rather than a second store: they share its group commit (a membership change is
//! acknowledged under the same policy as a message, with no second fsync), its recovery and
//! its checkpoint, and there is no second file format to keep consistent with the first.
//!
//! What an acknowledgement means per `[storage] fsync` ([`WorkerLog::ack_lsn`]):
//! - `always`: the record was written and `fdatasync`ed (and the directory fsynced when its
//!   segment was new) before it is reported durable. Survives kill -9 and power loss.
//! - `interval`: written to the file (the kernel's page cache) before it is reported; synced
//!   within `fsync_interval`. Survives kill -9; a power loss loses at most the last interval.
//! - `never`: written before it is reported; the kernel writes back when it likes. Survives
//!   kill -9, not power loss.

pub mod checkpoint;
pub mod commit;
pub mod log;
pub mod metrics;
pub mod read;
pub mod record;
pub mod recovery;
pub mod rehome;
pub mod retention;
pub mod segment;
pub mod state;

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

pub use commit::{CommitExecutor, Completion, InlineExecutor, Job, SyncThread};
pub use log::{LogOptions, WorkerLog};
pub use metrics::{Log2Histogram, StorageMetrics};
pub use read::StoredMessage;
pub use recovery::{Quarantined, RecoveryReport};

pub use crate::config::FsyncPolicy;

/// A log sequence number: consecutive per worker log, starting at 1; 0 means "none".
pub type Lsn = u64;

/// A room's key in one worker's log: its 64-bit id, or, when that id is already taken by
/// another name in this log (ids are FNV-1a and can be collided on purpose), the next free
/// value. Records carry the key; the name travels with a room's first record in each
/// segment and in the checkpoint, so recovery maps keys back to names.
pub type RoomKey = u64;

/// Why appends are refused for lack of space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullCause {
    /// Appending would take the log past `[storage] max_disk_bytes`.
    Quota,
    /// The file system refused a write (ENOSPC, EDQUOT, or EFBIG from `RLIMIT_FSIZE`).
    FileSystem,
}

/// What went wrong in storage.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StorageError {
    /// No space: the append was not taken. Retryable: appends succeed again by themselves
    /// once space returns (retention, an operator, a larger quota). Reads keep working.
    #[error("storage full ({cause:?}); retry later")]
    StorageFull {
        /// Quota or file system.
        cause: FullCause,
    },
    /// An fsync failed: the kernel may have dropped the dirty pages, so nothing written
    /// since the last good sync can be trusted or retried. The log refuses every append
    /// until the relay restarts and recovers from what is on disk.
    #[error("storage failed and refuses appends until restart: {0}")]
    Failed(String),
    /// A file operation failed.
    #[error("storage i/o on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A name, user id, sender or payload is longer than a record can hold.
    #[error("{what} is {len} bytes, at most {max} can be stored")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A message's sequence does not follow its room's head (a bug in the caller).
    #[error("room {key:#x}: sequence {seq} does not follow head {head}")]
    Sequence {
        /// The room.
        key: RoomKey,
        /// The head stored.
        head: u64,
        /// The sequence offered.
        seq: u64,
    },
    /// No room with this key in the log.
    #[error("no room with key {0:#x} in this log")]
    UnknownRoom(RoomKey),
    /// A record read back from disk failed its checksum (damage after recovery, or in a
    /// part of the log recovery did not scan because a checkpoint covered it).
    #[error("damaged record in segment {segment:#x} at offset {offset}")]
    Corrupt {
        /// The segment's id.
        segment: u64,
        /// Where the record starts.
        offset: u64,
    },
    /// The directory holds something this version cannot read (another format version, a
    /// segment of another worker).
    #[error("storage directory {path}: {why}")]
    Layout {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

impl StorageError {
    /// Whether the same append may succeed later without a restart.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StorageError::StorageFull { .. })
    }

    fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StorageError::Io {
            path: path.into(),
            source,
        }
    }
}

/// What the log tells its worker, polled with [`WorkerLog::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageEvent {
    /// Every record with an LSN up to `through` is stored per the fsync policy: the core
    /// may now send the PUBACKs and deliveries (or membership answers) it held for them.
    Durable {
        /// The highest LSN now acknowledged.
        through: Lsn,
    },
    /// Appends are refused with [`StorageError::StorageFull`] from now on.
    Full {
        /// Why.
        cause: FullCause,
    },
    /// Space is back: appends are taken again (and what was held got written).
    Available,
    /// An fsync failed; see [`StorageError::Failed`].
    Failed {
        /// The error, for the log line.
        reason: String,
    },
    /// A checkpoint covering every record before `lsn` is on disk.
    Checkpointed {
        /// The first LSN not covered.
        lsn: Lsn,
    },
}

/// A duration as whole microseconds, saturating (for histograms).
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
