//! Executing the log's I/O: the [`Job`]s a [`super::WorkerLog`] hands out (a group commit, a
//! checkpoint) and the [`Completion`]s that go back to it.
//!
//! Owns: the [`CommitExecutor`] trait and [`SyncThread`], the blocking executor the epoll
//! backend uses: a per-worker commit thread (writes and fdatasyncs, in submission order) and
//! a checkpoint thread (so a checkpoint never delays a commit), both answering through a
//! channel and a waker, so the event loop never blocks on the disk. The io_uring backend
//! implements the same trait on the worker's own ring (`crate::io::uring_storage`). Must
//! not decide anything: it does what the job says and reports what happened, including
//! partial failure.
//!
//! A commit job's writes are positional (`pwrite` at the offsets the log chose), so a job
//! that failed half-way (ENOSPC) is retried whole: rewriting bytes already written is
//! harmless. The sync comes only after every write of the job completed in full: a sync is
//! never chained behind a write that could have been short.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::Lsn;

/// Bytes to write at an offset of a segment.
#[derive(Debug)]
pub struct WriteChunk {
    /// The segment's id.
    pub segment: u64,
    /// The segment's file.
    pub file: Arc<File>,
    /// Where the bytes go.
    pub offset: u64,
    /// The records (and, for a new segment, its header first).
    pub data: Vec<u8>,
}

/// One group commit: everything appended during a tick (and held since), in one write per
/// segment touched, then per policy one fdatasync per file and the directory.
#[derive(Debug, Default)]
pub struct CommitBatch {
    /// The writes, in log order.
    pub chunks: Vec<WriteChunk>,
    /// Files to fdatasync once every write completed (empty: no sync).
    pub sync: Vec<Arc<File>>,
    /// A directory to fsync after the files (a segment was created in it).
    pub sync_dir: Option<PathBuf>,
    /// Records written by this batch.
    pub records: u64,
    /// The LSN of its last record (0 for a sync-only batch).
    pub last_lsn: Lsn,
}

impl CommitBatch {
    /// Bytes it writes.
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.data.len() as u64).sum()
    }
}

/// Writing a checkpoint, after making the log it covers durable, then deleting segments
/// it made unnecessary.
#[derive(Debug)]
pub struct CheckpointJob {
    /// The worker's directory.
    pub dir: PathBuf,
    /// The checkpoint's bytes.
    pub bytes: Vec<u8>,
    /// Segment files to fdatasync first (everything the checkpoint covers).
    pub sync: Vec<Arc<File>>,
    /// Segment files to delete once the checkpoint is durable.
    pub delete: Vec<PathBuf>,
    /// The first LSN the checkpoint does not cover.
    pub lsn: Lsn,
}

/// Work for an executor.
#[derive(Debug)]
pub enum Job {
    /// A group commit.
    Commit(CommitBatch),
    /// A checkpoint (runs after every commit submitted before it has been written).
    Checkpoint(CheckpointJob),
}

/// Which step of a commit failed.
#[derive(Debug)]
pub enum CommitError {
    /// A write: nothing of the batch may be considered written; retry it whole.
    Write(io::Error),
    /// An fdatasync: the kernel may have dropped the dirty pages, so data written since the
    /// last good sync cannot be trusted.
    Sync(io::Error),
}

/// What came of a job. The job comes back so its buffers are reused (or retried).
#[derive(Debug)]
pub enum Completion {
    /// A group commit.
    Commit {
        /// The batch.
        batch: CommitBatch,
        /// How long its fdatasyncs took (None when it had none), or what failed.
        result: Result<Option<Duration>, CommitError>,
    },
    /// A checkpoint.
    Checkpoint {
        /// The job.
        job: CheckpointJob,
        /// Whether the checkpoint is durable (and the deletions done).
        result: io::Result<()>,
    },
}

/// Something that performs jobs without blocking the caller and reports their completion.
/// Jobs complete in submission order.
pub trait CommitExecutor {
    /// Starts `job`; never blocks on the disk.
    fn submit(&mut self, job: Job);
    /// Appends to `out` the completions ready now; never blocks.
    fn poll(&mut self, out: &mut Vec<Completion>);
    /// Like [`CommitExecutor::poll`], but waits up to `timeout` for at least one (shutdown,
    /// tests, benchmarks).
    fn wait(&mut self, out: &mut Vec<Completion>, timeout: Duration);
}

/// Runs one commit batch with blocking calls.
pub fn run_commit(batch: &CommitBatch) -> Result<Option<Duration>, CommitError> {
    for chunk in &batch.chunks {
        chunk
            .file
            .write_all_at(&chunk.data, chunk.offset)
            .map_err(CommitError::Write)?;
    }
    if batch.sync.is_empty() && batch.sync_dir.is_none() {
        return Ok(None);
    }
    let started = Instant::now();
    for file in &batch.sync {
        file.sync_data().map_err(CommitError::Sync)?;
    }
    if let Some(dir) = &batch.sync_dir {
        super::segment::sync_dir(dir).map_err(CommitError::Sync)?;
    }
    Ok(Some(started.elapsed()))
}

/// Runs one checkpoint job with blocking calls.
pub fn run_checkpoint(job: &CheckpointJob) -> io::Result<()> {
    for file in &job.sync {
        file.sync_data()?;
    }
    super::checkpoint::write(&job.dir, &job.bytes)?;
    if !job.delete.is_empty() {
        for path in &job.delete {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        super::segment::sync_dir(&job.dir)?;
    }
    Ok(())
}

/// Called after a completion is queued, to wake the worker's event loop (its eventfd).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// The blocking executor: a commit thread and a checkpoint thread per worker.
pub struct SyncThread {
    jobs: Option<Sender<Job>>,
    done: Receiver<Completion>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for SyncThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncThread")
            .field("threads", &self.threads.len())
            .finish()
    }
}

/// Starts a worker's checkpoint thread, named `{name}-ckpt`: it runs the checkpoint jobs
/// sent to the returned channel in order and sends each completion to `done`, then runs
/// `waker`. It ends once the channel closes, after finishing what it holds. Shared by
/// [`SyncThread`] and the io_uring executor, so a checkpoint never delays a commit on either.
pub fn spawn_checkpointer(
    name: &str,
    done: Sender<Completion>,
    waker: Option<Waker>,
) -> io::Result<(Sender<CheckpointJob>, JoinHandle<()>)> {
    let (jobs, job_rx) = crossbeam_channel::unbounded::<CheckpointJob>();
    let thread = std::thread::Builder::new()
        .name(format!("{name}-ckpt"))
        .spawn(move || {
            for job in job_rx {
                let result = run_checkpoint(&job);
                notify(&done, Completion::Checkpoint { job, result }, &waker);
            }
        })?;
    Ok((jobs, thread))
}

/// Queues a completion and wakes the worker.
fn notify(tx: &Sender<Completion>, c: Completion, waker: &Option<Waker>) {
    let _ = tx.send(c);
    if let Some(w) = waker {
        w();
    }
}

impl SyncThread {
    /// Starts the threads, named after `name` (the worker). `waker` runs after every
    /// completion.
    pub fn spawn(name: &str, waker: Option<Waker>) -> io::Result<Self> {
        let (jobs, job_rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done) = crossbeam_channel::unbounded();
        let (ckpt_tx, checkpointer) = spawn_checkpointer(name, done_tx.clone(), waker.clone())?;
        let committer = std::thread::Builder::new()
            .name(format!("{name}-sync"))
            .spawn(move || {
                // A failed write leaves the log short of what a later checkpoint would
                // cover, until the batch is retried and succeeds.
                let mut failed_write = false;
                for job in job_rx {
                    match job {
                        Job::Commit(batch) => {
                            let result = run_commit(&batch);
                            failed_write = result.is_err();
                            notify(&done_tx, Completion::Commit { batch, result }, &waker);
                        }
                        Job::Checkpoint(job) if failed_write => {
                            notify(&done_tx, refused_checkpoint(job), &waker);
                        }
                        Job::Checkpoint(job) => {
                            let _ = ckpt_tx.send(job);
                        }
                    }
                }
            })?;
        Ok(SyncThread {
            jobs: Some(jobs),
            done,
            threads: vec![committer, checkpointer],
        })
    }
}

/// The answer to a checkpoint submitted after a commit whose write failed: the log on disk
/// is short of what it would cover until the batch is retried and succeeds.
pub fn refused_checkpoint(job: CheckpointJob) -> Completion {
    Completion::Checkpoint {
        job,
        result: Err(io::Error::other("an earlier write failed")),
    }
}

impl CommitExecutor for SyncThread {
    fn submit(&mut self, job: Job) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(job);
        }
    }

    fn poll(&mut self, out: &mut Vec<Completion>) {
        out.extend(self.done.try_iter());
    }

    fn wait(&mut self, out: &mut Vec<Completion>, timeout: Duration) {
        if let Ok(c) = self.done.recv_timeout(timeout) {
            out.push(c);
        }
        self.poll(out);
    }
}

impl Drop for SyncThread {
    fn drop(&mut self) {
        // Closing the job channel ends the commit thread, whose end closes the checkpoint
        // thread's channel; both finish what they hold first.
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs each job on the caller's thread as it is submitted (blocking). For tools, tests and
/// as a baseline in benchmarks; a worker's event loop uses [`SyncThread`] or the ring.
#[derive(Debug, Default)]
pub struct InlineExecutor {
    done: Vec<Completion>,
    failed_write: bool,
}

impl CommitExecutor for InlineExecutor {
    fn submit(&mut self, job: Job) {
        let c = match job {
            Job::Commit(batch) => {
                let result = run_commit(&batch);
                self.failed_write = result.is_err();
                Completion::Commit { batch, result }
            }
            Job::Checkpoint(job) if self.failed_write => refused_checkpoint(job),
            Job::Checkpoint(job) => {
                let result = run_checkpoint(&job);
                Completion::Checkpoint { job, result }
            }
        };
        self.done.push(c);
    }

    fn poll(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
    }

    fn wait(&mut self, out: &mut Vec<Completion>, _timeout: Duration) {
        self.poll(out);
    }
}
