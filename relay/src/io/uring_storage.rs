//! The durable log's jobs on the io_uring backend: group commits written and fdatasynced
//! through the worker's own ring, so a worker on io_uring needs no sync thread and its one
//! `io_uring_enter` per tick carries the disk I/O with the socket I/O.
//!
//! Owns: [`RingCommits`], the [`CommitExecutor`] the io_uring backend hands the worker
//! ([`super::Backend::storage_executor`]): the commit being run, its buffers until their
//! completions, the SQEs it wants pushed, and the checkpoint thread. Must not touch sockets,
//! the backend's connection state, or decide anything about the log: like
//! [`crate::storage::SyncThread`] it does what a [`Job`] says and reports what happened.
//!
//! # One commit, step by step
//! 1. One `WRITE` per chunk (one per segment the tick touched, nearly always one) at the
//!    offset the log chose, all submitted at once: they are positional and independent.
//! 2. A write whose CQE shows fewer bytes than asked is resubmitted for the rest; EINTR and
//!    EAGAIN resubmit the same. A failure ends the write stage with
//!    [`CommitError::Write`] once every write of the job has completed.
//! 3. Only when every write completed in full: one `FSYNC(DATASYNC)` per file the policy
//!    syncs and, when a segment was created, an `FSYNC` of the directory (opened with a
//!    plain, non-blocking `open`). Never `IO_LINK`ed behind the writes: a link breaks on a
//!    short write, and a sync that ran anyway would cover less than it claims.
//! 4. When the syncs complete: a [`Completion::Commit`], polled by the worker like the sync
//!    thread's, with the time the syncs took.
//!
//! Checkpoints (rare: once per `checkpoint_interval`; a temporary file, a rename, segment
//! deletions) stay on a checkpoint thread ([`crate::storage::commit::spawn_checkpointer`]),
//! started with the first one and woken through the worker's eventfd. A checkpoint waits
//! until every commit submitted before it has completed. Segment creation at a roll stays a
//! synchronous `open` on the worker (see [`crate::storage::log`]); its directory fsync goes
//! through the ring with the next sync.
//!
//! # Memory the kernel may touch
//! A write's SQE points into its chunk's buffer, which the running commit owns: the commit
//! is kept until every operation it submitted has posted its CQE (it counts them), and the
//! backend keeps this executor until its own operation count is zero (or leaks it, see the
//! backend's `Drop`). A `Vec`'s heap buffer does not move when the commit does.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use io_uring::{opcode, squeue, types};

use crate::storage::commit::{
    CheckpointJob, CommitBatch, CommitError, Waker, refused_checkpoint, spawn_checkpointer,
};
use crate::storage::{CommitExecutor, Completion, Job};

/// The most one `WRITE` asks for (the kernel writes at most about 2 GiB per call anyway).
const MAX_WRITE: usize = 1 << 30;
/// Set in an operation's index when it is a sync; the rest is the file's index (the
/// directory comes after the files).
const SYNC_BIT: u32 = 1 << 31;
/// The running commit's serial number travels in the generation bits of `user_data`.
const SERIAL_MASK: u32 = (1 << 24) - 1;

/// Where the running commit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Writing,
    Syncing,
}

/// The commit whose operations are on the ring.
#[derive(Debug)]
struct Running {
    batch: CommitBatch,
    serial: u32,
    stage: Stage,
    /// Bytes of each chunk written so far.
    written: Vec<usize>,
    /// Operations submitted whose CQE has not come.
    pending: usize,
    /// The first failure; the commit completes with it once nothing is pending.
    error: Option<CommitError>,
    /// When the syncs were submitted.
    sync_started: Option<Instant>,
    /// The directory being fsynced (kept open until its CQE).
    dir: Option<File>,
}

/// An SQE the executor wants on the ring: the entry and the (index, serial) its
/// `user_data` carries; the backend adds its op kind.
pub(super) type StorageSqe = (squeue::Entry, u32, u32);

/// The io_uring [`CommitExecutor`]. See the module docs.
pub struct RingCommits {
    name: String,
    waker: Option<Waker>,
    /// Jobs submitted and not started, in submission order.
    queue: VecDeque<Job>,
    running: Option<Running>,
    next_serial: u32,
    /// SQEs for the backend to push (their user_data is set by the backend).
    outgoing: Vec<StorageSqe>,
    done: Vec<Completion>,
    /// The last commit failed: a checkpoint must not claim what it did not write.
    failed_write: bool,
    checkpointer: Option<(Sender<CheckpointJob>, JoinHandle<()>)>,
    checkpoint_tx: Sender<Completion>,
    checkpoint_rx: Receiver<Completion>,
}

impl std::fmt::Debug for RingCommits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingCommits")
            .field("queued", &self.queue.len())
            .field("running", &self.running.is_some())
            .finish_non_exhaustive()
    }
}

impl RingCommits {
    /// An executor for the worker named `name`; `waker` wakes the worker's ring when a
    /// checkpoint completes.
    pub(super) fn new(name: String, waker: Option<Waker>) -> Self {
        let (checkpoint_tx, checkpoint_rx) = crossbeam_channel::unbounded();
        RingCommits {
            name,
            waker,
            queue: VecDeque::new(),
            running: None,
            next_serial: 0,
            outgoing: Vec::new(),
            done: Vec::new(),
            failed_write: false,
            checkpointer: None,
            checkpoint_tx,
            checkpoint_rx,
        }
    }

    /// Moves the SQEs waiting to be pushed into `out`.
    pub(super) fn take_sqes(&mut self, out: &mut Vec<StorageSqe>) {
        out.append(&mut self.outgoing);
    }

    /// Starts what the queue allows: the next commit when none runs, and the checkpoints
    /// submitted before it.
    fn advance(&mut self) {
        while self.running.is_none() {
            match self.queue.pop_front() {
                None => return,
                Some(Job::Checkpoint(job)) => self.checkpoint(job),
                Some(Job::Commit(batch)) => self.start(batch),
            }
        }
    }

    fn checkpoint(&mut self, job: CheckpointJob) {
        if self.failed_write {
            self.done.push(refused_checkpoint(job));
            return;
        }
        if self.checkpointer.is_none() {
            match spawn_checkpointer(&self.name, self.checkpoint_tx.clone(), self.waker.clone()) {
                Ok(c) => self.checkpointer = Some(c),
                Err(e) => {
                    self.done.push(Completion::Checkpoint {
                        job,
                        result: Err(e),
                    });
                    return;
                }
            }
        }
        if let Some((tx, _)) = &self.checkpointer
            && let Err(e) = tx.send(job)
        {
            let result = Err(io::Error::other("the checkpoint thread is gone"));
            self.done.push(Completion::Checkpoint {
                job: e.into_inner(),
                result,
            });
        }
    }

    fn start(&mut self, batch: CommitBatch) {
        self.next_serial = (self.next_serial + 1) & SERIAL_MASK;
        let mut run = Running {
            written: vec![0; batch.chunks.len()],
            batch,
            serial: self.next_serial,
            stage: Stage::Writing,
            pending: 0,
            error: None,
            sync_started: None,
            dir: None,
        };
        for i in 0..run.batch.chunks.len() {
            if !run.batch.chunks[i].data.is_empty() {
                self.write(&mut run, i);
            }
        }
        self.running = Some(run);
        self.step();
    }

    /// Queues the write of what is left of chunk `i`.
    fn write(&mut self, run: &mut Running, i: usize) {
        let chunk = &run.batch.chunks[i];
        let done = run.written[i];
        let rest = &chunk.data[done..];
        let len = rest.len().min(MAX_WRITE) as u32;
        let entry = opcode::Write::new(types::Fd(chunk.file.as_raw_fd()), rest.as_ptr(), len)
            .offset(chunk.offset + done as u64)
            .build();
        run.pending += 1;
        self.outgoing.push((entry, i as u32, run.serial));
    }

    /// Queues the syncs the batch asks for, or finishes it when it asks for none.
    fn sync(&mut self, run: &mut Running) {
        run.stage = Stage::Syncing;
        let files = run.batch.sync.len() as u32;
        for (j, file) in run.batch.sync.iter().enumerate() {
            let entry = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            run.pending += 1;
            self.outgoing.push((entry, SYNC_BIT | j as u32, run.serial));
        }
        if let Some(dir) = &run.batch.sync_dir {
            match File::open(dir) {
                Ok(d) => {
                    let entry = opcode::Fsync::new(types::Fd(d.as_raw_fd())).build();
                    run.dir = Some(d);
                    run.pending += 1;
                    self.outgoing.push((entry, SYNC_BIT | files, run.serial));
                }
                Err(e) => {
                    run.error.get_or_insert(CommitError::Sync(e));
                }
            }
        }
        run.sync_started = Some(Instant::now());
    }

    /// Moves the running commit on once nothing of it is pending.
    fn step(&mut self) {
        let Some(mut run) = self.running.take() else {
            return;
        };
        if run.pending > 0 {
            self.running = Some(run);
            return;
        }
        if run.stage == Stage::Writing && run.error.is_none() {
            let syncs = !run.batch.sync.is_empty() || run.batch.sync_dir.is_some();
            if syncs {
                self.sync(&mut run);
                if run.pending > 0 {
                    self.running = Some(run);
                    return;
                }
            }
        }
        let result = match run.error.take() {
            Some(e) => Err(e),
            None => Ok(run.sync_started.map(|t| t.elapsed())),
        };
        self.failed_write = result.is_err();
        self.done.push(Completion::Commit {
            batch: run.batch,
            result,
        });
        self.advance();
    }

    /// Takes the CQE of one of this executor's operations (`index` and `serial` from its
    /// `user_data`, `res` its result).
    pub(super) fn on_cqe(&mut self, index: u32, serial: u32, res: i32) {
        let Some(mut run) = self.running.take_if(|r| r.serial == serial) else {
            tracing::error!(index, serial, "storage completion for no running commit");
            return;
        };
        run.pending = run.pending.saturating_sub(1);
        if index & SYNC_BIT != 0 {
            if res < 0 && run.error.is_none() {
                run.error = Some(CommitError::Sync(io::Error::from_raw_os_error(-res)));
            }
        } else {
            let i = index as usize;
            match res {
                r if r == -libc::EINTR || r == -libc::EAGAIN => {
                    if run.error.is_none() {
                        self.write(&mut run, i);
                    }
                }
                r if r < 0 => {
                    let e = io::Error::from_raw_os_error(-r);
                    run.error.get_or_insert(CommitError::Write(e));
                }
                0 => {
                    let e = io::Error::new(io::ErrorKind::WriteZero, "write wrote nothing");
                    run.error.get_or_insert(CommitError::Write(e));
                }
                n => {
                    run.written[i] += n as usize;
                    let short = run.written[i] < run.batch.chunks[i].data.len();
                    if short && run.error.is_none() {
                        // The rest, at the offset after what was written.
                        self.write(&mut run, i);
                    }
                }
            }
        }
        self.running = Some(run);
        self.step();
    }
}

impl CommitExecutor for RingCommits {
    fn submit(&mut self, job: Job) {
        self.queue.push_back(job);
        self.advance();
    }

    fn poll(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
        out.extend(self.checkpoint_rx.try_iter());
    }

    /// The ring is driven by the backend's poll, not here: this returns what is ready, and
    /// waits (up to `timeout`) only for a checkpoint when no commit is on the ring. Callers
    /// that must wait for a commit poll the backend (see the runtime's shutdown).
    fn wait(&mut self, out: &mut Vec<Completion>, timeout: Duration) {
        self.poll(out);
        if out.is_empty()
            && self.running.is_none()
            && self.checkpointer.is_some()
            && let Ok(c) = self.checkpoint_rx.recv_timeout(timeout)
        {
            out.push(c);
        }
    }
}

impl Drop for RingCommits {
    fn drop(&mut self) {
        // Closing the channel ends the checkpoint thread after what it holds.
        if let Some((tx, thread)) = self.checkpointer.take() {
            drop(tx);
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose
mod tests {
    use std::fs::OpenOptions;
    use std::net::{SocketAddr, TcpStream};
    use std::os::unix::fs::FileExt;
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::io::probe::{self, BackendOptions};
    use crate::io::uring::UringBackend;
    use crate::io::{Backend, CloseReason, EventSink, Token};
    use crate::storage::commit::WriteChunk;

    struct Nothing;

    impl EventSink for Nothing {
        fn accepted(&mut self, _: &TcpStream, _: SocketAddr) -> Option<Token> {
            None
        }
        fn received(&mut self, _: Token, _: &[u8]) {}
        fn sent(&mut self, _: Token, _: usize) {}
        fn closed(&mut self, _: Token, _: CloseReason) {}
        fn woken(&mut self) {}
    }

    fn ring() -> Option<UringBackend> {
        let opts = BackendOptions::default();
        if let Err(e) = probe::probe_uring(&opts) {
            pabal_testkit::skip(format_args!("io_uring unavailable: {e}"));
            return None;
        }
        Some(UringBackend::new(&opts).expect("io_uring backend"))
    }

    /// A batch of one record, `data` at `offset` of `file`, which it syncs when `sync`.
    fn one_record(file: &Arc<File>, offset: u64, data: Vec<u8>, sync: bool) -> CommitBatch {
        CommitBatch {
            chunks: vec![WriteChunk {
                segment: 1,
                file: file.clone(),
                offset,
                data,
            }],
            sync: if sync { vec![file.clone()] } else { Vec::new() },
            records: 1,
            last_lsn: 1,
            ..CommitBatch::default()
        }
    }

    /// Runs a group commit to its completion: how long its syncs took, or what failed.
    fn commit(
        backend: &mut UringBackend,
        batch: CommitBatch,
    ) -> Result<Option<Duration>, CommitError> {
        let Completion::Commit { result, .. } = run(backend, Job::Commit(batch)) else {
            panic!("not a commit");
        };
        result
    }

    /// Whether `result` is a failed write with `errno`.
    fn write_failed_with(result: &Result<Option<Duration>, CommitError>, errno: i32) -> bool {
        matches!(result, Err(CommitError::Write(e)) if e.raw_os_error() == Some(errno))
    }

    fn file(path: &Path, writable: bool) -> Arc<File> {
        let f = OpenOptions::new()
            .read(true)
            .write(writable)
            .create(writable)
            .truncate(false)
            .open(path)
            .unwrap();
        Arc::new(f)
    }

    /// Submits `job` to the backend's executor and polls the ring until it completes.
    fn run(backend: &mut UringBackend, job: Job) -> Completion {
        backend.storage_executor().unwrap().submit(job);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while out.is_empty() {
            assert!(Instant::now() < deadline, "no completion");
            backend
                .poll(Some(Duration::from_millis(20)), &mut Nothing)
                .unwrap();
            backend.storage_executor().unwrap().poll(&mut out);
        }
        assert_eq!(out.len(), 1);
        out.pop().unwrap()
    }

    #[test]
    fn the_ring_writes_every_chunk_whole_then_syncs_and_reports() {
        let Some(mut backend) = ring() else { return };
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            file(&dir.path().join("a"), true),
            file(&dir.path().join("b"), true),
        );
        // Larger than a page cache chunk, at an offset: the write is positional.
        let big: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        let batch = CommitBatch {
            chunks: vec![
                WriteChunk {
                    segment: 1,
                    file: a.clone(),
                    offset: 100,
                    data: b"hello".to_vec(),
                },
                WriteChunk {
                    segment: 2,
                    file: b.clone(),
                    offset: 0,
                    data: big.clone(),
                },
            ],
            sync: vec![a.clone(), b.clone()],
            sync_dir: Some(dir.path().to_path_buf()),
            records: 2,
            last_lsn: 2,
        };
        let Completion::Commit { batch, result } = run(&mut backend, Job::Commit(batch)) else {
            panic!("not a commit");
        };
        assert!(matches!(result, Ok(Some(_))), "{result:?}");
        assert_eq!(batch.chunks.len(), 2, "the batch comes back for reuse");
        let mut got = vec![0u8; 5];
        a.read_exact_at(&mut got, 100).unwrap();
        assert_eq!(got, b"hello");
        let mut got = vec![0u8; big.len()];
        b.read_exact_at(&mut got, 0).unwrap();
        assert!(got == big);
        // A batch without syncs reports none.
        let result = commit(&mut backend, one_record(&a, 105, b"!".to_vec(), false));
        assert!(matches!(result, Ok(None)), "{result:?}");
    }

    #[test]
    fn a_failed_write_is_reported_without_a_sync_and_refuses_the_next_checkpoint() {
        let Some(mut backend) = ring() else { return };
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ro"), b"").unwrap();
        let read_only = file(&dir.path().join("ro"), false);
        let result = commit(
            &mut backend,
            one_record(&read_only, 0, b"lost".to_vec(), true),
        );
        assert!(write_failed_with(&result, libc::EBADF), "{result:?}");
        let job = CheckpointJob {
            dir: dir.path().to_path_buf(),
            bytes: b"state".to_vec(),
            sync: Vec::new(),
            delete: Vec::new(),
            lsn: 2,
        };
        let Completion::Checkpoint { result, .. } = run(&mut backend, Job::Checkpoint(job)) else {
            panic!("not a checkpoint");
        };
        assert!(
            result.is_err(),
            "a checkpoint must not cover a failed write"
        );
        assert!(!dir.path().join(crate::storage::checkpoint::FILE).exists());
    }

    #[test]
    fn a_checkpoint_after_a_good_commit_runs_on_its_thread_and_wakes_the_ring() {
        let Some(mut backend) = ring() else { return };
        let dir = tempfile::tempdir().unwrap();
        let seg = file(&dir.path().join("seg"), true);
        let result = commit(&mut backend, one_record(&seg, 0, b"record".to_vec(), false));
        assert!(result.is_ok(), "{result:?}");
        let job = CheckpointJob {
            dir: dir.path().to_path_buf(),
            bytes: b"state".to_vec(),
            sync: vec![seg],
            delete: Vec::new(),
            lsn: 2,
        };
        let Completion::Checkpoint { result, .. } = run(&mut backend, Job::Checkpoint(job)) else {
            panic!("not a checkpoint");
        };
        result.unwrap();
        let written = std::fs::read(dir.path().join(crate::storage::checkpoint::FILE)).unwrap();
        assert_eq!(written, b"state");
    }

    /// The child half's environment: where it writes.
    const CHILD_DIR: &str = "PABAL_URING_SHORT_WRITE_DIR";
    /// The child's file size limit: an 8 KiB chunk at offset 0 is written short.
    const LIMIT: u64 = 6000;

    #[test]
    fn a_short_write_is_resubmitted_for_the_rest_and_no_sync_follows_its_failure() {
        if ring().is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "io::uring_storage::tests::short_write_child",
                "--include-ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}\n{err}");
        assert!(text.contains("short-write-child: ok"), "{text}\n{err}");
    }

    /// Under `RLIMIT_FSIZE` = [`LIMIT`], the first `WRITE` of an 8 KiB chunk writes
    /// [`LIMIT`] bytes (short); the executor asks for the rest at offset [`LIMIT`], which
    /// fails with EFBIG: the commit fails as a write, with no sync after it. An executor
    /// that took the short write for the whole would sync and report success.
    #[test]
    #[ignore = "the child half of a_short_write_is_resubmitted_for_the_rest_and_no_sync_follows_its_failure"]
    fn short_write_child() {
        let Ok(dir) = std::env::var(CHILD_DIR) else {
            return;
        };
        pabal_testkit::daemon::limit_file_size_of_this_process(LIMIT);
        let mut backend = UringBackend::new(&BackendOptions::default()).unwrap();
        let seg = file(&Path::new(&dir).join("seg"), true);
        let result = commit(&mut backend, one_record(&seg, 0, vec![7u8; 8192], true));
        assert!(write_failed_with(&result, libc::EFBIG), "{result:?}");
        assert_eq!(
            seg.metadata().unwrap().len(),
            LIMIT,
            "the short write's bytes"
        );
        println!("short-write-child: ok");
    }
}
