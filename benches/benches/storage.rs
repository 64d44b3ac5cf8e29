//! The storage engine on its own: acknowledged appends per second and append-to-durable
//! latency for each fsync policy and payload size, and recovery time per GB.
//!
//! Not a criterion bench: group commit is measured by running a worker's loop, not by timing
//! a function. One simulated worker (this thread) appends into a `WorkerLog` and runs its
//! jobs on the per-worker sync thread, exactly as the epoll backend would:
//! - **saturated**: 1,000 publishers, each waiting for its acknowledgement before publishing
//!   again (the relay's PUBACK); acknowledged appends per second and latency percentiles;
//! - **open loop** (`always` only): at 25,000/s (half the 50,000/s target) and at half the
//!   saturated rate, latency measured from each append's intended time (no coordinated
//!   omission);
//! - **recovery**: a log of `PABAL_BENCH_RECOVERY_MB` (default 256) of 1 KB messages,
//!   reopened with a warm page cache and with the segments dropped from it
//!   (`POSIX_FADV_DONTNEED`); the time is extrapolated linearly to 1 GB.
//!
//! `cargo bench -p pabal-benches --bench storage` (`PABAL_BENCH_SECS` sets each phase's
//! length, default 3; `PABAL_BENCH_DIR` where the logs go, default the system temp dir,
//! which must be a real disk for the fsync figures to mean anything).

#![allow(clippy::unwrap_used)] // reason: a benchmark driver fails loudly

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use pabal_codec::Text;
use pabal_relay::ids::RoomName;
use pabal_relay::storage::{
    CommitExecutor, FsyncPolicy, LogOptions, StorageEvent, SyncThread, WorkerLog,
};

const PUBLISHERS: usize = 1000;
const ROOMS: usize = 100;

fn opts(fsync: FsyncPolicy) -> LogOptions {
    LogOptions {
        segment_size: 64 << 20,
        fsync,
        fsync_interval: Duration::from_millis(10),
        max_disk_bytes: 0,
        checkpoint_interval: Duration::from_secs(60),
    }
}

fn secs() -> Duration {
    let s = std::env::var("PABAL_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(s)
}

fn bench_dir() -> tempfile::TempDir {
    match std::env::var("PABAL_BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).unwrap(),
        Err(_) => tempfile::tempdir().unwrap(),
    }
}

/// `n` rooms, each started in epoch 1; their keys.
fn rooms(log: &mut WorkerLog, n: usize) -> Vec<u64> {
    (0..n)
        .map(|r| {
            let key = log.room(&RoomName::new(false, Text::from(format!("room-{r}"))));
            log.append_epoch(key, 1, 0).unwrap();
            key
        })
        .collect()
}

struct Run {
    acked: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
    batches: u64,
    mean_batch: f64,
    fsync_p99_us: u64,
}

/// One worker loop. `rate`: None = saturated closed loop, Some(r) = open loop at r/s.
fn run(fsync: FsyncPolicy, payload_len: usize, rate: Option<f64>, dur: Duration) -> Run {
    let dir = bench_dir();
    let (mut log, _) = WorkerLog::open(dir.path(), 0, opts(fsync), Instant::now()).unwrap();
    let keys = rooms(&mut log, ROOMS);
    let mut exec = SyncThread::spawn("bench", None).unwrap();
    assert!(log.flush_blocking(&mut exec, Duration::from_secs(10)));
    let payload = vec![7u8; payload_len];
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    // (lsn, intended time) of appends not yet acknowledged.
    let mut waiting: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut free = PUBLISHERS;
    let mut done = Vec::new();
    let started = Instant::now();
    let mut sent = 0u64;
    let mut acked = 0u64;
    let mut next_room = 0;
    let start_metrics = log.metrics();
    loop {
        let now = Instant::now();
        let elapsed = now - started;
        if elapsed >= dur {
            break;
        }
        // The tick's publishes.
        let due = match rate {
            None => std::mem::take(&mut free) as u64,
            Some(r) => ((elapsed.as_secs_f64() * r) as u64).saturating_sub(sent),
        };
        for i in 0..due {
            let key = keys[next_room];
            next_room = (next_room + 1) % ROOMS;
            let seq = log.state().rooms[&key].head + 1;
            let lsn = log
                .append_message(key, seq, 0, 0, "publisher", &payload, None)
                .unwrap();
            let intended = match rate {
                None => now,
                Some(r) => started + Duration::from_secs_f64((sent + i) as f64 / r),
            };
            waiting.push_back((lsn, intended));
        }
        sent += due;
        // End of tick.
        while let Some(job) = log.poll_job(now) {
            exec.submit(job);
        }
        exec.poll(&mut done);
        if done.is_empty() {
            // Block as an event loop would: until a completion wakes it or, in the open
            // loop, the next publish is due.
            let until = match rate {
                None if free == 0 => Duration::from_millis(5),
                None => Duration::ZERO,
                Some(r) => {
                    let next = started + Duration::from_secs_f64((sent + 1) as f64 / r);
                    next.saturating_duration_since(Instant::now())
                }
            };
            if !until.is_zero() {
                exec.wait(&mut done, until);
            }
        }
        let got = Instant::now();
        for c in done.drain(..) {
            log.on_completion(c, got);
        }
        while let Some(ev) = log.poll_event() {
            if let StorageEvent::Durable { through } = ev {
                while waiting.front().is_some_and(|(lsn, _)| *lsn <= through) {
                    let (_, t) = waiting.pop_front().unwrap();
                    latency_us.saturating_record((got - t).as_micros() as u64);
                    acked += 1;
                    free += 1;
                }
            }
        }
    }
    let elapsed = started.elapsed();
    let m = log.metrics();
    let batches = m.batches - start_metrics.batches;
    Run {
        acked,
        elapsed,
        latency_us,
        batches,
        mean_batch: (m.records_written - start_metrics.records_written) as f64
            / batches.max(1) as f64,
        fsync_p99_us: m.fsync_latency_us.quantile_upper(0.99),
    }
}

fn report(label: &str, r: &Run) {
    println!(
        "{label:<34} {:>10.0} acked/s   p50 {:>7} us  p99 {:>7} us  p99.9 {:>7} us   \
         {:>7} batches, {:>6.1} records/batch, fsync p99 <= {} us",
        r.acked as f64 / r.elapsed.as_secs_f64(),
        r.latency_us.value_at_quantile(0.5),
        r.latency_us.value_at_quantile(0.99),
        r.latency_us.value_at_quantile(0.999),
        r.batches,
        r.mean_batch,
        r.fsync_p99_us,
    );
}

fn drop_from_page_cache(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "seg") {
            let f = std::fs::File::open(&path).unwrap();
            // SAFETY: advice on a file descriptor we own, no memory involved.
            unsafe {
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}

fn recovery() {
    let mb: u64 = std::env::var("PABAL_BENCH_RECOVERY_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let dir = bench_dir();
    let (mut log, _) =
        WorkerLog::open(dir.path(), 0, opts(FsyncPolicy::Never), Instant::now()).unwrap();
    let keys = rooms(&mut log, 1000);
    let mut exec = SyncThread::spawn("bench-recovery", None).unwrap();
    let payload = vec![3u8; 1024];
    let mut i = 0;
    while log.disk_used() < mb << 20 {
        for _ in 0..1000 {
            let key = keys[i % keys.len()];
            i += 1;
            let seq = log.state().rooms[&key].head + 1;
            log.append_message(key, seq, 0, 0, "publisher", &payload, None)
                .unwrap();
        }
        assert!(log.flush_blocking(&mut exec, Duration::from_secs(30)));
    }
    // Synced but no final checkpoint: as after a kill -9, recovery scans everything
    // written since the open's checkpoint.
    let mut exec_sync = SyncThread::spawn("bench-recovery-sync", None).unwrap();
    log.begin_close();
    let _ = log.flush_blocking(&mut exec_sync, Duration::from_secs(60));
    let worker_dir = log.dir().to_path_buf();
    drop(log);
    // The close checkpointed; remove it so the scan covers the whole log.
    for f in ["checkpoint", "checkpoint.prev"] {
        let _ = std::fs::remove_file(worker_dir.join(f));
    }
    for (label, cold) in [
        ("warm page cache", false),
        ("segments dropped from cache", true),
    ] {
        if cold {
            drop_from_page_cache(&worker_dir);
        }
        let (log, report) =
            WorkerLog::open(dir.path(), 0, opts(FsyncPolicy::Never), Instant::now()).unwrap();
        let secs = report.duration.as_secs_f64();
        let gb = report.bytes_scanned as f64 / (1u64 << 30) as f64;
        println!(
            "recovery, {label:<28} {:>6} MiB, {:>8} records in {:>7.3} s  => {:>6.2} s per GB (extrapolated)",
            report.bytes_scanned >> 20,
            report.records,
            secs,
            secs / gb
        );
        drop(log);
        for f in ["checkpoint", "checkpoint.prev"] {
            let _ = std::fs::remove_file(worker_dir.join(f));
        }
    }
}

fn main() {
    let dur = secs();
    println!("storage: one worker, {PUBLISHERS} publishers over {ROOMS} rooms, {dur:?} per run");
    let mut always_rate = [0.0f64; 2];
    for (i, payload) in [32usize, 1024].into_iter().enumerate() {
        for fsync in [
            FsyncPolicy::Never,
            FsyncPolicy::Interval,
            FsyncPolicy::Always,
        ] {
            let r = run(fsync, payload, None, dur);
            report(&format!("{fsync:?} {payload} B saturated"), &r);
            if fsync == FsyncPolicy::Always {
                always_rate[i] = r.acked as f64 / r.elapsed.as_secs_f64();
            }
        }
        // Half the target (50,000/s), then half of what was measured.
        for rate in [25_000.0, always_rate[i] / 2.0] {
            let r = run(FsyncPolicy::Always, payload, Some(rate), dur);
            report(&format!("Always {payload} B open loop {rate:.0}/s"), &r);
        }
    }
    recovery();
}
