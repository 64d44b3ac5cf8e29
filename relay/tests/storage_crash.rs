//! The storage engine against real process death and a real full disk, at the storage level
//! (the relay's core is not wired to it yet).
//!
//! - kill -9: a child process appends to a worker log with `fsync = "always"` through the
//!   sync-thread executor, printing every acknowledgement ("durable through") as it gets it;
//!   the parent kills it with SIGKILL at a seeded random point, recovers the log and checks
//!   every acknowledged message is there, in order, with its payload, same epoch, same
//!   members. Several rounds on the same directory: each child first recovers what the
//!   previous one left and continues the sequences.
//! - full disk: a child under a low `RLIMIT_FSIZE` (writes past it fail with EFBIG, the
//!   file-system-full path) appends until refused, checks reads still work and nothing
//!   unwritten was acknowledged, then raises the limit (space returns) and checks appends
//!   are taken again by themselves.
//!
//! The children are this test binary itself, re-run on an ignored test with an environment
//! variable naming the directory. Every wait is bounded: a hang fails the test.

#![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pabal_codec::Text;
use pabal_relay::ids::RoomName;
use pabal_relay::storage::{
    CommitExecutor, FsyncPolicy, LogOptions, StorageError, StorageEvent, SyncThread, WorkerLog,
};
use rand::{Rng, SeedableRng, rngs::SmallRng};

const ROOMS: u64 = 5;
const CHILD_DIR: &str = "PABAL_STORAGE_CHILD_DIR";
const CHILD_SEED: &str = "PABAL_STORAGE_CHILD_SEED";
const WAIT: Duration = Duration::from_secs(60);

fn opts() -> LogOptions {
    LogOptions {
        segment_size: 64 * 1024,
        fsync: FsyncPolicy::Always,
        fsync_interval: Duration::from_millis(10),
        max_disk_bytes: 0,
        checkpoint_interval: Duration::from_millis(200),
    }
}

fn room_name(r: u64) -> RoomName {
    RoomName::new(r % 2 == 1, Text::from(format!("room-{r}")))
}

fn payload(r: u64, seq: u64) -> Vec<u8> {
    let len = (r * 31 + seq * 17) % 300 + 1;
    (0..len)
        .map(|i| (seq.wrapping_mul(7) + r + i) as u8)
        .collect()
}

/// Runs this binary's ignored test `name` as a child with `dir` (and `seed`).
fn child(name: &str, dir: &Path, seed: u64) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            name,
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir)
        .env(CHILD_SEED, seed.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Rooms, their epochs and members as every child sets them up (once).
fn ensure_rooms(log: &mut WorkerLog) -> Vec<u64> {
    (0..ROOMS)
        .map(|r| {
            let key = log.room(&room_name(r));
            if log.state().rooms[&key].epoch == 0 {
                log.append_epoch(key, 1000 + r, 0).unwrap();
                log.append_join(key, &format!("user-{r}"), 1000 + r, 0)
                    .unwrap();
            }
            key
        })
        .collect()
}

/// The child of the kill -9 test: appends forever, printing acknowledgements.
#[test]
#[ignore = "the child half of kill_9_at_random_points_loses_nothing_acknowledged"]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let seed: u64 = std::env::var(CHILD_SEED).unwrap().parse().unwrap();
    let mut rng = SmallRng::seed_from_u64(seed);
    let (mut log, _) = WorkerLog::open(Path::new(&dir), 0, opts(), Instant::now()).unwrap();
    let keys = ensure_rooms(&mut log);
    let mut exec = SyncThread::spawn("crash-child", None).unwrap();
    // LSN -> (room, seq) of every message not yet acknowledged.
    let mut unacked: VecDeque<(u64, u64, u64)> = VecDeque::new();
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut done = Vec::new();
    let stdout = std::io::stdout();
    let mut go = String::new();
    loop {
        // One loop tick: a few publishes, then the end-of-tick job.
        for _ in 0..rng.random_range(1..40) {
            let r = rng.random_range(0..ROOMS);
            let key = keys[r as usize];
            let seq = log.state().rooms[&key].head + 1;
            let lsn = log
                .append_message(key, seq, seq, 0, "pub", &payload(r, seq), None)
                .unwrap();
            unacked.push_back((lsn, r, seq));
        }
        let now = Instant::now();
        while let Some(job) = log.poll_job(now) {
            exec.submit(job);
        }
        exec.wait(&mut done, Duration::from_millis(1));
        for c in done.drain(..) {
            log.on_completion(c, Instant::now());
        }
        while let Some(ev) = log.poll_event() {
            if let StorageEvent::Durable { through } = ev {
                while unacked.front().is_some_and(|(lsn, _, _)| *lsn <= through) {
                    let (_, r, seq) = unacked.pop_front().unwrap();
                    acked.insert(r, seq);
                }
                let mut line = String::from("ACK");
                for (r, seq) in &acked {
                    line.push_str(&format!(" {r}:{seq}"));
                }
                let mut out = stdout.lock();
                writeln!(out, "{line}").unwrap();
                out.flush().unwrap();
                // Lockstep: the parent answers, or kills us here, while what was appended
                // after this acknowledgement is still in memory or on its way to the disk.
                go.clear();
                if std::io::stdin().read_line(&mut go).unwrap() == 0 {
                    return;
                }
            }
        }
    }
}

#[test]
fn kill_9_at_random_points_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SmallRng::seed_from_u64(0x5eed_0012);
    let mut acked: HashMap<u64, u64> = HashMap::new();
    for round in 0..5 {
        let kill_after = rng.random_range(5..300);
        let mut c = child("crash_child", dir.path(), rng.random());
        let mut lines = BufReader::new(c.stdout.take().unwrap()).lines();
        let mut stdin = c.stdin.take().unwrap();
        let started = Instant::now();
        let mut seen = 0;
        loop {
            assert!(started.elapsed() < WAIT, "round {round}: the child stalled");
            let line = lines.next().expect("child output").unwrap();
            // libtest may print "test crash_child ... " in front of the first line.
            let Some((_, rest)) = line.split_once("ACK") else {
                continue;
            };
            for pair in rest.split_whitespace() {
                let (r, seq) = pair.split_once(':').unwrap();
                acked.insert(r.parse().unwrap(), seq.parse().unwrap());
            }
            seen += 1;
            if seen == kill_after {
                break;
            }
            stdin.write_all(b"go\n").unwrap();
        }
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();

        let (mut log, report) = WorkerLog::open(dir.path(), 0, opts(), Instant::now()).unwrap();
        assert!(report.quarantined.is_empty(), "round {round}: {report:?}");
        assert!(report.affected.is_empty(), "round {round}: {report:?}");
        for r in 0..ROOMS {
            let key = log.room(&room_name(r));
            let room = log.state().rooms[&key].clone();
            assert_eq!(room.epoch, 1000 + r, "round {round}: the epoch survives");
            assert!(room.members.contains_key(&Text::from(format!("user-{r}"))));
            let want = acked.get(&r).copied().unwrap_or(0);
            assert!(
                room.head >= want,
                "round {round}: room {r} recovered head {} but {want} was acknowledged",
                room.head
            );
            let mut msgs = Vec::new();
            let page = log
                .read_page(key, 0, usize::MAX, usize::MAX, &mut msgs)
                .unwrap();
            assert!(page.complete && page.gap.is_none());
            let seqs: Vec<u64> = msgs.iter().map(|m| m.seq).collect();
            assert_eq!(
                seqs,
                (1..=room.head).collect::<Vec<_>>(),
                "round {round}: in order"
            );
            for m in &msgs {
                assert_eq!(
                    &m.payload[..],
                    &payload(r, m.seq)[..],
                    "room {r} seq {}",
                    m.seq
                );
            }
        }
        let mut exec = SyncThread::spawn("crash-parent", None).unwrap();
        log.begin_close();
        assert!(log.flush_blocking(&mut exec, WAIT));
    }
    assert!(
        acked.values().sum::<u64>() > 100,
        "the children got work done: {acked:?}"
    );
}

/// The child of the full-disk test. Exits 0 when every check passed.
#[test]
#[ignore = "the child half of a_full_file_system_refuses_appends_and_recovers_by_itself"]
fn full_disk_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    const LIMIT: u64 = 48 * 1024;
    pabal_testkit::daemon::limit_file_size_of_this_process(LIMIT);
    let mut o = opts();
    o.segment_size = 1 << 20; // one segment: the file limit is what runs out
    o.checkpoint_interval = Duration::from_secs(3600);
    let (mut log, _) = WorkerLog::open(Path::new(&dir), 0, o, Instant::now()).unwrap();
    let keys = ensure_rooms(&mut log);
    let key = keys[0];
    let mut exec = SyncThread::spawn("full-child", None).unwrap();
    let mut events = Vec::new();
    let pump = |log: &mut WorkerLog, exec: &mut SyncThread, events: &mut Vec<StorageEvent>| {
        let _ = log.flush_blocking(exec, Duration::from_millis(200));
        events.extend(std::iter::from_fn(|| log.poll_event()));
    };
    // Fill the file until the write fails and appends are refused.
    let refused = loop {
        let seq = log.state().rooms[&key].head + 1;
        match log.append_message(key, seq, seq, 0, "pub", &payload(0, seq), None) {
            Ok(_) => pump(&mut log, &mut exec, &mut events),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(refused, StorageError::StorageFull { .. }) && refused.is_retryable(),
        "{refused}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, StorageEvent::Full { .. })),
        "{events:?}"
    );
    let head = log.state().rooms[&key].head;
    let acked = log.ack_lsn();
    assert!(
        acked + 1 < log.next_lsn(),
        "the held batch is not acknowledged"
    );
    // Reads keep working.
    let mut msgs = Vec::new();
    log.read_page(key, 0, usize::MAX, usize::MAX, &mut msgs)
        .unwrap();
    assert!(!msgs.is_empty());
    // Still refused while the file system is full, however often the log retries.
    std::thread::sleep(Duration::from_millis(50));
    pump(&mut log, &mut exec, &mut events);
    assert_eq!(log.ack_lsn(), acked);
    // Space returns.
    // SAFETY: as above.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
    }
    let started = Instant::now();
    while log.ack_lsn() + 1 < log.next_lsn() {
        assert!(started.elapsed() < WAIT, "the held batch was never written");
        pump(&mut log, &mut exec, &mut events);
    }
    assert!(events.contains(&StorageEvent::Available), "{events:?}");
    let seq = log.state().rooms[&key].head + 1;
    log.append_message(key, seq, seq, 0, "pub", &payload(0, seq), None)
        .expect("appends are taken again");
    log.begin_close();
    assert!(log.flush_blocking(&mut exec, WAIT));
    println!("FULL-OK head={} refused_at={head}", seq);
}

#[test]
fn a_full_file_system_refuses_appends_and_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = child("full_disk_child", dir.path(), 0);
    let lines: Vec<String> = BufReader::new(c.stdout.take().unwrap())
        .lines()
        .map(|l| l.unwrap())
        .collect();
    let status = c.wait().unwrap();
    assert!(status.success(), "child failed: {lines:?}");
    let ok = lines
        .iter()
        .find_map(|l| l.split_once("FULL-OK head=").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no result line: {lines:?}"));
    let head: u64 = ok.split_whitespace().next().unwrap().parse().unwrap();
    // Everything the child was told is stored is there after a restart, in order.
    let (mut log, report) = WorkerLog::open(dir.path(), 0, opts(), Instant::now()).unwrap();
    assert!(
        report.affected.is_empty() && report.quarantined.is_empty(),
        "{report:?}"
    );
    let key = log.room(&room_name(0));
    assert_eq!(log.state().rooms[&key].head, head);
    let mut msgs = Vec::new();
    log.read_page(key, 0, usize::MAX, usize::MAX, &mut msgs)
        .unwrap();
    assert_eq!(msgs.len() as u64, head);
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m.seq, i as u64 + 1);
        assert_eq!(&m.payload[..], &payload(0, m.seq)[..]);
    }
}
