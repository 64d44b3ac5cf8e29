//! [`WorkerLog`]: one worker's segmented append-only log, as a state machine that takes
//! time as an argument and hands its I/O out as jobs.
//!
//! Owns: the log's state ([`LogState`]), its segments, the append buffer, group commit
//! (what goes into a job, when to sync per policy, what is durable), full-disk handling and
//! when to checkpoint. Must not block on the disk on the hot path: appends only encode into
//! memory; [`WorkerLog::poll_job`] at the end of a tick hands out at most one commit (one
//! write per segment touched, per policy one fdatasync) for a [`CommitExecutor`] to run, and
//! [`WorkerLog::on_completion`] turns what comes back into [`StorageEvent`]s. The only
//! blocking calls on the worker are rare and short: creating a segment file when the log
//! rolls (an `open` and a `fallocate` reserving its size, so that a full file system is
//! met there, before an append is taken, and never as a failed write of records already
//! accepted; its directory fsync goes out with the next sync), and reading history pages
//! ([`super::read`]) and compaction copies ([`super::retention`]).
//!
//! One commit is in flight at a time: what is appended while the disk works on it goes
//! into the next, which is how the batch grows with the load (group commit).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::checkpoint::{self, Position};
use super::commit::{
    CheckpointJob, CommitBatch, CommitError, CommitExecutor, Completion, Job, WriteChunk,
};
use super::record::{self, Body, MAX_RECORD_LEN, MAX_TEXT_LEN, NewRecord};
use super::recovery::{self, RecoveryReport};
use super::segment::{self, SEGMENT_HEADER_LEN, SegmentHeader};
use super::state::{Location, LogState};
use super::{
    FsyncPolicy, FullCause, Lsn, RoomKey, StorageError, StorageEvent, StorageMetrics, micros,
};
use crate::config::StorageConfig;
use crate::ids::RoomName;

/// How a worker log behaves (from `[storage]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// A segment rolls once the next record would take it past this many bytes.
    pub segment_size: u64,
    /// When to fdatasync.
    pub fsync: FsyncPolicy,
    /// With `FsyncPolicy::Interval`, written data is synced within this long.
    pub fsync_interval: Duration,
    /// Refuse appends past this many bytes on disk; 0: only the file system limits.
    pub max_disk_bytes: u64,
    /// Write a checkpoint this often (and at a clean close).
    pub checkpoint_interval: Duration,
}

impl LogOptions {
    /// The options `[storage]` describes, for one of `workers` workers (the disk quota is
    /// shared evenly).
    pub fn from_config(c: &StorageConfig, workers: usize) -> Self {
        LogOptions {
            segment_size: c.segment_size,
            fsync: c.fsync,
            fsync_interval: c.fsync_interval,
            max_disk_bytes: c.max_disk_bytes / workers.max(1) as u64,
            checkpoint_interval: c.checkpoint_interval,
        }
    }
}

/// A segment of the log.
#[derive(Debug)]
pub(super) struct Segment {
    pub(super) file: Arc<File>,
    /// Bytes appended (written or not).
    pub(super) len: u64,
    /// Bytes written (readable back).
    pub(super) written: u64,
}

/// The commit in flight.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// The lowest segment it writes to.
    first_segment: u64,
    /// A retry of a batch that failed.
    retry: bool,
}

/// Why appends are refused until a held batch is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// No space on the file system.
    Full,
    /// Another write error.
    Io(io::ErrorKind),
}

/// One worker's durable log. See the module docs.
#[derive(Debug)]
pub struct WorkerLog {
    pub(super) dir: PathBuf,
    worker: u32,
    pub(super) opts: LogOptions,
    pub(super) state: LogState,
    pub(super) segments: BTreeMap<u64, Segment>,
    pub(super) active: u64,
    /// Rooms whose name the active segment already carries.
    named: HashSet<RoomKey>,
    pending: Vec<WriteChunk>,
    pending_records: u64,
    in_flight: Option<InFlight>,
    /// A batch whose write failed, retried at `retry_at`.
    held: Option<(CommitBatch, Held)>,
    retry_at: Instant,
    retry_backoff: Duration,
    quota_full: bool,
    /// The last roll found the file system full: appends that need a new segment are
    /// refused until one can be created.
    fs_full: bool,
    failed: Option<String>,
    /// Segments written since the last sync.
    unsynced: Vec<(u64, Arc<File>)>,
    /// When the oldest unsynced write completed.
    unsynced_since: Option<Instant>,
    /// A segment was created since the directory was last synced.
    dir_unsynced: bool,
    written_lsn: Lsn,
    synced_lsn: Lsn,
    acked_lsn: Lsn,
    events: VecDeque<StorageEvent>,
    pub(super) metrics: StorageMetrics,
    spare_bufs: Vec<Vec<u8>>,
    spare_batches: Vec<CommitBatch>,
    /// The position of the checkpoint being written.
    checkpoint_in_flight: Option<Position>,
    /// The state changed since the last checkpoint was taken (appends, retention).
    pub(super) state_dirty: bool,
    /// Segments no room needs wait for a checkpoint to be deleted.
    pub(super) releasable: bool,
    /// Force a sync and a checkpoint as soon as possible (a clean close).
    closing: bool,
    last_checkpoint: Instant,
    /// The newest durable checkpoint's position.
    checkpoint_pos: Position,
    checkpoint_bytes: u64,
    /// Segments retention no longer needs, deleted with the next checkpoint.
    to_delete: Vec<(u64, u64)>,
    pub(super) scratch: Vec<u8>,
}

fn is_space_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG)
    )
}

impl WorkerLog {
    /// Opens (recovering) worker `worker`'s log under `root` (its directory is
    /// `root/worker-N`). Blocking: recovery reads what the checkpoint does not cover, a new
    /// segment is started and a checkpoint written before this returns.
    pub fn open(
        root: &Path,
        worker: u32,
        opts: LogOptions,
        now: Instant,
    ) -> Result<(WorkerLog, RecoveryReport), StorageError> {
        let dir = root.join(format!("worker-{worker}"));
        let rec = recovery::recover(&dir, worker)?;
        let mut segments = BTreeMap::new();
        for s in rec.segments {
            // Make what recovery read durable before a checkpoint claims it.
            s.file
                .sync_data()
                .map_err(|e| StorageError::io(segment::path(&dir, s.id), e))?;
            segments.insert(
                s.id,
                Segment {
                    file: s.file,
                    len: s.len,
                    written: s.len,
                },
            );
        }
        // A fresh segment after every start: nothing is ever appended behind a tail that
        // recovery truncated or a run that crashed.
        let active = segments.keys().next_back().map_or(1, |id| id + 1);
        let header = SegmentHeader {
            worker,
            id: active,
            first_lsn: rec.state.next_lsn,
        };
        let file = segment::create_reserved(&dir, active, opts.segment_size)?;
        let path = segment::path(&dir, active);
        std::os::unix::fs::FileExt::write_all_at(&file, &header.encode(), 0)
            .and_then(|()| file.sync_all())
            .and_then(|()| segment::sync_dir(&dir))
            .map_err(|e| StorageError::io(&path, e))?;
        segments.insert(
            active,
            Segment {
                file: Arc::new(file),
                len: SEGMENT_HEADER_LEN,
                written: SEGMENT_HEADER_LEN,
            },
        );
        let next = rec.state.next_lsn;
        let mut metrics = StorageMetrics {
            recovery_ms: rec.report.duration.as_millis() as u64,
            recovery_bytes: rec.report.bytes_scanned,
            quarantined_segments: rec.report.quarantined.len() as u64,
            torn_tails_truncated: u64::from(rec.report.torn_tail.is_some()),
            segments_created: 1,
            ..StorageMetrics::default()
        };
        let pos = Position {
            segment: active,
            offset: SEGMENT_HEADER_LEN,
            lsn: next,
        };
        let mut bytes = Vec::new();
        checkpoint::encode(worker, pos, &rec.state, &mut bytes);
        checkpoint::write(&dir, &bytes).map_err(|e| StorageError::io(&dir, e))?;
        metrics.checkpoints = 1;
        let mut log = WorkerLog {
            dir,
            worker,
            opts,
            state: rec.state,
            segments,
            active,
            named: HashSet::new(),
            pending: Vec::new(),
            pending_records: 0,
            in_flight: None,
            held: None,
            retry_at: now,
            retry_backoff: Duration::ZERO,
            quota_full: false,
            fs_full: false,
            failed: None,
            unsynced: Vec::new(),
            unsynced_since: None,
            dir_unsynced: false,
            written_lsn: next - 1,
            synced_lsn: next - 1,
            acked_lsn: next - 1,
            events: VecDeque::new(),
            metrics,
            spare_bufs: Vec::new(),
            spare_batches: Vec::new(),
            checkpoint_in_flight: None,
            state_dirty: false,
            releasable: false,
            closing: false,
            last_checkpoint: now,
            checkpoint_pos: pos,
            checkpoint_bytes: bytes.len() as u64,
            to_delete: Vec::new(),
            scratch: bytes,
        };
        log.refresh_gauges();
        Ok((log, rec.report))
    }

    /// The worker's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The rooms, their epochs, heads, members and blocks as stored.
    pub fn state(&self) -> &LogState {
        &self.state
    }

    /// The key of `name` in this log, creating the room (in memory: it becomes durable with
    /// its first record) if needed.
    pub fn room(&mut self, name: &RoomName) -> RoomKey {
        self.state.key_for(name).0
    }

    /// The LSN the next record gets.
    pub fn next_lsn(&self) -> Lsn {
        self.state.next_lsn
    }

    /// Every record up to this LSN is written to its file.
    pub fn written_lsn(&self) -> Lsn {
        self.written_lsn
    }

    /// Every record up to this LSN is fdatasynced.
    pub fn synced_lsn(&self) -> Lsn {
        self.synced_lsn
    }

    /// Every record up to this LSN may be acknowledged under the fsync policy: synced for
    /// `always`, written for `interval` and `never` (see the module docs of `storage`).
    pub fn ack_lsn(&self) -> Lsn {
        self.acked_lsn
    }

    /// The metrics, with the gauges current.
    pub fn metrics(&self) -> StorageMetrics {
        self.metrics
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<StorageEvent> {
        self.events.pop_front()
    }

    /// Appends a message; `seq` must follow the room's head.
    #[allow(clippy::too_many_arguments)] // reason: the fields of one record, unpacked
    pub fn append_message(
        &mut self,
        key: RoomKey,
        seq: u64,
        ts_ms: u64,
        flags: u8,
        sender: &str,
        payload: &[u8],
        publish_id: Option<(u64, u64)>,
    ) -> Result<Lsn, StorageError> {
        let head = self.room_state(key)?.head;
        if seq != head + 1 {
            return Err(StorageError::Sequence { key, head, seq });
        }
        let body = Body::Message {
            ts_ms,
            flags,
            sender,
            payload,
            publish_id,
        };
        self.append(key, seq, 0, body)
    }

    /// Starts a new stream of the room: epoch `epoch`, sequences after `head`. Forgets the
    /// previous epoch's history.
    pub fn append_epoch(
        &mut self,
        key: RoomKey,
        epoch: u64,
        head: u64,
    ) -> Result<Lsn, StorageError> {
        self.append(key, head, 0, Body::Epoch { epoch })
    }

    /// Records that `user` joined (or subscribed to) the room at (`epoch`, `seq`).
    pub fn append_join(
        &mut self,
        key: RoomKey,
        user: &str,
        epoch: u64,
        seq: u64,
    ) -> Result<Lsn, StorageError> {
        self.append(key, seq, 0, Body::Join { epoch, user })
    }

    /// Records that `user` left (or was removed from) the room.
    pub fn append_leave(&mut self, key: RoomKey, user: &str) -> Result<Lsn, StorageError> {
        self.append(key, 0, 0, Body::Leave { user })
    }

    /// Records that `user` blocked (or unblocked) the channel.
    pub fn append_block(
        &mut self,
        key: RoomKey,
        user: &str,
        blocked: bool,
    ) -> Result<Lsn, StorageError> {
        self.append(key, 0, 0, Body::Block { blocked, user })
    }

    /// Records `user`'s receipts markers in the room's stream `epoch`: delivered up to
    /// `delivered`, read up to `read`.
    pub fn append_markers(
        &mut self,
        key: RoomKey,
        user: &str,
        epoch: u64,
        delivered: u64,
        read: u64,
    ) -> Result<Lsn, StorageError> {
        self.append(key, delivered, 0, Body::Markers { epoch, read, user })
    }

    /// Drops the room: its state and history are forgotten.
    pub fn append_drop(&mut self, key: RoomKey) -> Result<Lsn, StorageError> {
        let lsn = self.append(key, 0, 0, Body::Drop)?;
        self.named.remove(&key);
        Ok(lsn)
    }

    pub(super) fn room_state(
        &self,
        key: RoomKey,
    ) -> Result<&super::state::RoomState, StorageError> {
        self.state
            .rooms
            .get(&key)
            .ok_or(StorageError::UnknownRoom(key))
    }

    /// Whether appends are taken now, and if not why.
    fn check_writable(&mut self) -> Result<(), StorageError> {
        if let Some(why) = &self.failed {
            return Err(StorageError::Failed(why.clone()));
        }
        match self.held {
            Some((_, Held::Full)) => {
                self.metrics.full_refusals += 1;
                Err(StorageError::StorageFull {
                    cause: FullCause::FileSystem,
                })
            }
            Some((_, Held::Io(kind))) => Err(StorageError::io(&self.dir, kind.into())),
            None => Ok(()),
        }
    }

    pub(super) fn append(
        &mut self,
        key: RoomKey,
        seq: u64,
        flags: u8,
        body: Body<'_>,
    ) -> Result<Lsn, StorageError> {
        self.check_writable()?;
        let room = self
            .state
            .rooms
            .get(&key)
            .ok_or(StorageError::UnknownRoom(key))?;
        let text_len = match body {
            Body::Message { sender: t, .. }
            | Body::Join { user: t, .. }
            | Body::Leave { user: t }
            | Body::Block { user: t, .. }
            | Body::Markers { user: t, .. } => t.len(),
            _ => 0,
        };
        for (what, len) in [("room name", room.name.name.len()), ("user id", text_len)] {
            if len > MAX_TEXT_LEN {
                return Err(StorageError::TooLong {
                    what,
                    len,
                    max: MAX_TEXT_LEN,
                });
            }
        }
        let plain = NewRecord {
            lsn: self.state.next_lsn,
            key,
            seq,
            flags,
            name: None,
            body,
        };
        let plain_len = record::encoded_len(&plain);
        let named_len = plain_len + 2 + room.name.name.len();
        if named_len > MAX_RECORD_LEN {
            return Err(StorageError::TooLong {
                what: "record",
                len: named_len,
                max: MAX_RECORD_LEN,
            });
        }
        let active_len = self.segments.get(&self.active).map_or(0, |s| s.len);
        let rolls = active_len > SEGMENT_HEADER_LEN
            && active_len + named_len as u64 > self.opts.segment_size;
        // A room's first record in a segment carries its name.
        let named = rolls || !self.named.contains(&key);
        let len = if named { named_len } else { plain_len };
        let needed = len as u64 + if rolls { SEGMENT_HEADER_LEN } else { 0 };
        if self.opts.max_disk_bytes > 0 && self.disk_used() + needed > self.opts.max_disk_bytes {
            self.metrics.full_refusals += 1;
            if !self.quota_full {
                self.quota_full = true;
                self.events.push_back(StorageEvent::Full {
                    cause: FullCause::Quota,
                });
            }
            return Err(StorageError::StorageFull {
                cause: FullCause::Quota,
            });
        }
        if rolls {
            self.roll()?;
        }
        let active = self.active;
        let seg = self
            .segments
            .get_mut(&active)
            .ok_or(StorageError::UnknownRoom(key))?;
        let offset = seg.len;
        seg.len += len as u64;
        if self.pending.last().is_none_or(|c| c.segment != active) {
            let data = self.spare_bufs.pop().unwrap_or_default();
            self.pending.push(WriteChunk {
                segment: active,
                file: seg.file.clone(),
                offset,
                data,
            });
        }
        let chunk = self
            .pending
            .last_mut()
            .ok_or(StorageError::UnknownRoom(key))?;
        let name = self
            .state
            .rooms
            .get(&key)
            .filter(|_| named)
            .map(|r| (r.name.channel, r.name.name.as_str()));
        record::encode(&NewRecord { name, ..plain }, &mut chunk.data);
        let at = Location {
            segment: active,
            offset,
            len: len as u64,
        };
        self.state.apply(&plain.as_record(len), at);
        self.state_dirty = true;
        self.named.insert(key);
        self.pending_records += 1;
        if self.quota_full {
            self.quota_full = false;
            self.events.push_back(StorageEvent::Available);
        }
        Ok(plain.lsn)
    }

    /// Starts the next segment: creates its file with its whole size reserved on disk (its
    /// header goes out with its first write, its name is made durable by the next directory
    /// sync). A file system without room for it refuses the append that needed it, before
    /// anything is taken (nothing already accepted waits on the space), and the next roll
    /// tries again, so appends resume by themselves once space returns.
    fn roll(&mut self) -> Result<(), StorageError> {
        let id = self.active + 1;
        let file = match segment::create_reserved(&self.dir, id, self.opts.segment_size) {
            Ok(f) => Arc::new(f),
            Err(StorageError::Io { source, .. }) if is_space_error(&source) => {
                self.metrics.full_refusals += 1;
                if !self.fs_full {
                    self.fs_full = true;
                    self.events.push_back(StorageEvent::Full {
                        cause: FullCause::FileSystem,
                    });
                }
                return Err(StorageError::StorageFull {
                    cause: FullCause::FileSystem,
                });
            }
            Err(e) => return Err(e),
        };
        if self.fs_full {
            self.fs_full = false;
            self.events.push_back(StorageEvent::Available);
        }
        let header = SegmentHeader {
            worker: self.worker,
            id,
            first_lsn: self.state.next_lsn,
        };
        let mut data = self.spare_bufs.pop().unwrap_or_default();
        data.extend_from_slice(&header.encode());
        self.pending.push(WriteChunk {
            segment: id,
            file: file.clone(),
            offset: 0,
            data,
        });
        self.segments.insert(
            id,
            Segment {
                file,
                len: SEGMENT_HEADER_LEN,
                written: 0,
            },
        );
        self.active = id;
        self.named.clear();
        self.dir_unsynced = true;
        self.metrics.segments_created += 1;
        self.refresh_gauges();
        Ok(())
    }

    /// Bytes the log occupies: segments (appended, written or not) and the checkpoint.
    pub fn disk_used(&self) -> u64 {
        self.segments.values().map(|s| s.len).sum::<u64>() + self.checkpoint_bytes
    }

    pub(super) fn refresh_gauges(&mut self) {
        self.metrics.disk_used_bytes = self.disk_used();
        self.metrics.segments = self.segments.len() as u64;
        self.metrics.rooms = self.state.rooms.len() as u64;
    }

    /// When the log next needs [`WorkerLog::poll_job`] called although nothing was
    /// appended: a sync due under `interval`, a retry after a failed write, a checkpoint.
    /// `None` when nothing is due: while a commit is in flight its completion (which wakes
    /// the worker) comes first, and a checkpoint is due only when there is something to
    /// checkpoint, so an idle log never asks its worker to wake.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.failed.is_some() || self.in_flight.is_some() {
            return None;
        }
        let mut at: Option<Instant> = None;
        let mut due = |t: Instant| at = Some(at.map_or(t, |a: Instant| a.min(t)));
        if self.checkpoint_in_flight.is_none()
            && (self.state_dirty || self.releasable || !self.to_delete.is_empty() || self.closing)
        {
            due(self.last_checkpoint + self.opts.checkpoint_interval);
        }
        if self.held.is_some() {
            due(self.retry_at);
        }
        if self.quota_full && self.releasable && self.checkpoint_in_flight.is_none() {
            // Deleting what retention released is the way out of a full quota: now.
            due(self.last_checkpoint);
        }
        if let (FsyncPolicy::Interval, Some(since)) = (self.opts.fsync, self.unsynced_since) {
            due(since + self.opts.fsync_interval);
        }
        at
    }

    /// Asks for a final sync and checkpoint (a clean shutdown): [`WorkerLog::poll_job`]
    /// hands them out as soon as it can; [`WorkerLog::is_closed`] says when they are done.
    pub fn begin_close(&mut self) {
        self.closing = true;
    }

    /// After [`WorkerLog::begin_close`]: everything appended is synced and a checkpoint
    /// covering it is on disk (or the log failed and nothing more can be done).
    pub fn is_closed(&self) -> bool {
        self.failed.is_some()
            || (self.closing
                && self.pending.is_empty()
                && self.in_flight.is_none()
                && self.held.is_none()
                && self.checkpoint_in_flight.is_none()
                && !self.state_dirty
                && self.synced_lsn + 1 == self.state.next_lsn
                && self.checkpoint_pos.lsn == self.state.next_lsn)
    }

    /// The next job for the executor, if one is due. Call at the end of every loop tick
    /// (and at [`WorkerLog::next_deadline`]) until it returns `None`.
    pub fn poll_job(&mut self, now: Instant) -> Option<Job> {
        if self.failed.is_some() {
            return None;
        }
        if self.in_flight.is_none() {
            if let Some((batch, _)) = self.held.take_if(|_| now >= self.retry_at) {
                self.in_flight = Some(InFlight {
                    first_segment: batch.chunks.first().map_or(self.active, |c| c.segment),
                    retry: true,
                });
                return Some(Job::Commit(batch));
            }
            if self.held.is_none()
                && let Some(batch) = self.take_batch(now)
            {
                return Some(Job::Commit(batch));
            }
        }
        // Over quota, deleting what retention released is the way out: do not wait.
        let checkpoint_due = self.closing
            || (self.quota_full && self.releasable)
            || now >= self.last_checkpoint + self.opts.checkpoint_interval;
        if checkpoint_due
            && self.checkpoint_in_flight.is_none()
            && self.pending.is_empty()
            && self.held.is_none()
            && (self.state_dirty || self.releasable || !self.to_delete.is_empty())
        {
            return Some(Job::Checkpoint(self.checkpoint_job(now)));
        }
        None
    }

    /// The pending writes as one batch, with the sync the policy wants now.
    fn take_batch(&mut self, now: Instant) -> Option<CommitBatch> {
        let unsynced = !self.unsynced.is_empty() || self.dir_unsynced;
        let sync = match self.opts.fsync {
            _ if self.closing => !self.pending.is_empty() || unsynced,
            FsyncPolicy::Always => !self.pending.is_empty(),
            FsyncPolicy::Interval => self
                .unsynced_since
                .is_some_and(|t| now >= t + self.opts.fsync_interval),
            FsyncPolicy::Never => false,
        };
        if self.pending.is_empty() && !sync {
            return None;
        }
        let mut batch = self.spare_batches.pop().unwrap_or_default();
        batch.chunks.append(&mut self.pending);
        batch.records = std::mem::take(&mut self.pending_records);
        batch.last_lsn = if batch.records > 0 {
            self.state.next_lsn - 1
        } else {
            0
        };
        if sync {
            batch
                .sync
                .extend(self.unsynced.iter().map(|(_, f)| f.clone()));
            for c in &batch.chunks {
                if !self.unsynced.iter().any(|(id, _)| *id == c.segment)
                    && !batch.sync.iter().any(|f| Arc::ptr_eq(f, &c.file))
                {
                    batch.sync.push(c.file.clone());
                }
            }
            if self.dir_unsynced {
                batch.sync_dir = Some(self.dir.clone());
            }
        }
        self.in_flight = Some(InFlight {
            first_segment: batch.chunks.first().map_or(self.active, |c| c.segment),
            retry: false,
        });
        Some(batch)
    }

    /// Takes back what an executor did with a job.
    pub fn on_completion(&mut self, completion: Completion, now: Instant) {
        match completion {
            Completion::Commit { batch, result } => self.on_commit(batch, result, now),
            Completion::Checkpoint { job, result } => self.on_checkpoint(job, result, now),
        }
    }

    fn on_commit(
        &mut self,
        mut batch: CommitBatch,
        result: Result<Option<Duration>, CommitError>,
        now: Instant,
    ) {
        let flight = self.in_flight.take();
        match result {
            Ok(fsync) => {
                if flight.is_some_and(|f| f.retry) {
                    self.retry_backoff = Duration::ZERO;
                    self.events.push_back(StorageEvent::Available);
                }
                if batch.last_lsn > 0 {
                    self.written_lsn = self.written_lsn.max(batch.last_lsn);
                }
                self.metrics.bytes_written += batch.bytes();
                self.metrics.records_written += batch.records;
                if batch.records > 0 {
                    self.metrics.batches += 1;
                    self.metrics.batch_records.record(batch.records);
                }
                for c in &batch.chunks {
                    if let Some(seg) = self.segments.get_mut(&c.segment) {
                        seg.written = seg.written.max(c.offset + c.data.len() as u64);
                    }
                }
                if let Some(took) = fsync {
                    self.metrics.syncs += batch.sync.len() as u64;
                    self.metrics.fsync_latency_us.record(micros(took));
                    self.synced_lsn = self.written_lsn;
                    self.unsynced.clear();
                    self.unsynced_since = None;
                    if batch.sync_dir.is_some() {
                        self.dir_unsynced = false;
                    }
                } else {
                    for c in &batch.chunks {
                        if !self.unsynced.iter().any(|(id, _)| *id == c.segment) {
                            self.unsynced.push((c.segment, c.file.clone()));
                        }
                    }
                    if !batch.chunks.is_empty() {
                        self.unsynced_since.get_or_insert(now);
                    }
                }
                let ack = match self.opts.fsync {
                    FsyncPolicy::Always => self.synced_lsn,
                    FsyncPolicy::Interval | FsyncPolicy::Never => self.written_lsn,
                };
                if ack > self.acked_lsn {
                    self.acked_lsn = ack;
                    self.events
                        .push_back(StorageEvent::Durable { through: ack });
                }
                for mut c in batch.chunks.drain(..) {
                    c.data.clear();
                    self.spare_bufs.push(c.data);
                }
                batch.sync.clear();
                batch.sync_dir = None;
                self.spare_batches.push(batch);
            }
            Err(CommitError::Write(e)) => {
                self.metrics.write_errors += 1;
                let held = if is_space_error(&e) {
                    Held::Full
                } else {
                    Held::Io(e.kind())
                };
                let first = self.held.is_none() && !flight.is_some_and(|f| f.retry);
                if first {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "storage: write failed; appends refused until it succeeds");
                    if held == Held::Full {
                        self.events.push_back(StorageEvent::Full {
                            cause: FullCause::FileSystem,
                        });
                    }
                }
                self.retry_backoff = (self.retry_backoff * 2)
                    .clamp(Duration::from_millis(10), Duration::from_secs(1));
                self.retry_at = now + self.retry_backoff;
                self.held = Some((batch, held));
            }
            Err(CommitError::Sync(e)) => {
                let reason = format!("fdatasync in {}: {e}", self.dir.display());
                tracing::error!(%reason, "storage: sync failed; the log refuses appends until the relay restarts");
                self.events.push_back(StorageEvent::Failed {
                    reason: reason.clone(),
                });
                self.failed = Some(reason);
            }
        }
        self.refresh_gauges();
    }

    /// A checkpoint of the state as of now (everything appended is in a submitted batch),
    /// with the segments it makes deletable.
    fn checkpoint_job(&mut self, now: Instant) -> CheckpointJob {
        let pos = Position {
            segment: self.active,
            offset: self
                .segments
                .get(&self.active)
                .map_or(SEGMENT_HEADER_LEN, |s| s.len),
            lsn: self.state.next_lsn,
        };
        let mut bytes = std::mem::take(&mut self.scratch);
        checkpoint::encode(self.worker, pos, &self.state, &mut bytes);
        // Deletable: older than the newest durable checkpoint's segment (so both it and
        // this one cover it) and holding no retained message.
        let referenced: HashSet<u64> = self
            .state
            .rooms
            .values()
            .flat_map(|r| r.extents.iter().map(|e| e.segment))
            .collect();
        let unreferenced: Vec<u64> = self
            .segments
            .keys()
            .copied()
            .filter(|id| *id != self.active && !referenced.contains(id))
            .collect();
        let (deletable, later): (Vec<u64>, Vec<u64>) = unreferenced
            .into_iter()
            .partition(|&id| id < self.checkpoint_pos.segment);
        // The rest become deletable with the checkpoint after this one.
        self.releasable = !later.is_empty();
        for id in deletable {
            if let Some(seg) = self.segments.remove(&id) {
                self.to_delete.push((id, seg.len));
            }
            self.unsynced.retain(|(s, _)| *s != id);
        }
        // Everything the checkpoint covers must be on disk before it is.
        let floor = self
            .unsynced
            .iter()
            .map(|(id, _)| *id)
            .chain(self.in_flight.map(|f| f.first_segment))
            .chain([self.active])
            .min()
            .unwrap_or(self.active);
        let sync = self
            .segments
            .range(floor..)
            .map(|(_, s)| s.file.clone())
            .collect();
        self.checkpoint_in_flight = Some(pos);
        self.state_dirty = false;
        self.last_checkpoint = now;
        CheckpointJob {
            dir: self.dir.clone(),
            bytes,
            sync,
            delete: self
                .to_delete
                .iter()
                .map(|(id, _)| segment::path(&self.dir, *id))
                .collect(),
            lsn: pos.lsn,
        }
    }

    fn on_checkpoint(&mut self, job: CheckpointJob, result: io::Result<()>, now: Instant) {
        match result {
            Ok(()) => {
                self.metrics.checkpoints += 1;
                self.metrics.segments_deleted += self.to_delete.len() as u64;
                self.to_delete.clear();
                self.checkpoint_bytes = job.bytes.len() as u64;
                if let Some(pos) = self.checkpoint_in_flight.take() {
                    self.checkpoint_pos = pos;
                }
                self.events
                    .push_back(StorageEvent::Checkpointed { lsn: job.lsn });
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "storage: checkpoint failed; retried later");
                self.checkpoint_in_flight = None;
                self.state_dirty = true;
                self.last_checkpoint = now;
            }
        }
        self.scratch = job.bytes;
        self.refresh_gauges();
    }

    /// Runs the log against `exec` until nothing is in flight and every append is
    /// acknowledged, or `timeout` passes. Blocking: for shutdown, tests and benchmarks.
    pub fn flush_blocking(&mut self, exec: &mut dyn CommitExecutor, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut done = Vec::new();
        loop {
            let now = Instant::now();
            while let Some(job) = self.poll_job(now) {
                exec.submit(job);
            }
            let settled = self.in_flight.is_none()
                && self.pending.is_empty()
                && self.checkpoint_in_flight.is_none()
                && (self.failed.is_some()
                    || self.held.is_some()
                    || self.acked_lsn + 1 == self.state.next_lsn);
            if settled && (!self.closing || self.is_closed()) {
                return true;
            }
            if now >= deadline {
                return false;
            }
            exec.wait(&mut done, Duration::from_millis(20).min(deadline - now));
            for c in done.drain(..) {
                self.on_completion(c, Instant::now());
            }
        }
    }
}
