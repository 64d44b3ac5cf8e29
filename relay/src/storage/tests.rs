//! The storage engine as a whole, on real files in a temporary directory: group commit and
//! the durability events per policy, reopen and recovery (checkpoint, scan, torn tail,
//! interior damage), reads, retention and compaction, full disk by quota.

#![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

use std::path::Path;
use std::time::{Duration, Instant};

use pabal_codec::Text;

use super::commit::{Completion, run_commit};
use super::record::{self, HEADER_LEN};
use super::segment::{self, QUARANTINE_DIR, SEGMENT_HEADER_LEN};
use super::*;
use crate::config::Retention;
use crate::directory::JoinPoint;
use crate::ids::RoomName;

fn opts(segment_size: u64, fsync: FsyncPolicy) -> LogOptions {
    LogOptions {
        segment_size,
        fsync,
        fsync_interval: Duration::from_millis(10),
        max_disk_bytes: 0,
        checkpoint_interval: Duration::from_secs(3600),
    }
}

fn open(root: &Path, o: LogOptions) -> (WorkerLog, RecoveryReport) {
    WorkerLog::open(root, 0, o, Instant::now()).unwrap()
}

fn room(n: &str) -> RoomName {
    RoomName::new(false, Text::from(n))
}

fn payload(key: RoomKey, seq: u64) -> Vec<u8> {
    let len = ((key % 97) * 7 + seq * 13) % 200 + 1;
    (0..len)
        .map(|i| (seq as u8).wrapping_add(i as u8))
        .collect()
}

/// Appends the room's next message (payload derived from room and sequence).
fn publish(log: &mut WorkerLog, key: RoomKey) -> Result<Lsn, StorageError> {
    let seq = log.state().rooms[&key].head + 1;
    log.append_message(key, seq, 1_000 + seq, 0, "sender", &payload(key, seq), None)
}

fn flush(log: &mut WorkerLog) {
    let mut exec = InlineExecutor::default();
    assert!(log.flush_blocking(&mut exec, Duration::from_secs(10)));
}

fn read_all(log: &mut WorkerLog, key: RoomKey) -> Vec<StoredMessage> {
    let mut out = Vec::new();
    let info = log
        .read_page(key, 0, usize::MAX, usize::MAX, &mut out)
        .unwrap();
    assert!(info.complete);
    out
}

fn assert_intact(msgs: &[StoredMessage], key: RoomKey, seqs: std::ops::RangeInclusive<u64>) {
    let got: Vec<u64> = msgs.iter().map(|m| m.seq).collect();
    assert_eq!(got, seqs.collect::<Vec<_>>());
    for m in msgs {
        assert_eq!(&m.payload[..], &payload(key, m.seq)[..], "seq {}", m.seq);
        assert_eq!((m.ts_ms, m.sender.as_str()), (1_000 + m.seq, "sender"));
    }
}

fn events(log: &mut WorkerLog) -> Vec<StorageEvent> {
    std::iter::from_fn(|| log.poll_event()).collect()
}

#[test]
fn a_tick_is_one_write_and_one_sync_and_durable_only_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), opts(1 << 20, FsyncPolicy::Always));
    let key = log.room(&room("r"));
    log.append_epoch(key, 5, 0).unwrap();
    for _ in 0..100 {
        publish(&mut log, key).unwrap();
    }
    let now = Instant::now();
    let Some(Job::Commit(batch)) = log.poll_job(now) else {
        panic!("a commit")
    };
    assert_eq!(
        (batch.chunks.len(), batch.records, batch.sync.len()),
        (1, 101, 1)
    );
    // One commit in flight at a time: what comes now waits for the next.
    publish(&mut log, key).unwrap();
    assert!(log.poll_job(now).is_none());
    assert_eq!(log.ack_lsn(), 0);
    assert!(
        events(&mut log).is_empty(),
        "nothing durable before the sync"
    );
    let result = run_commit(&batch);
    log.on_completion(Completion::Commit { batch, result }, now);
    assert_eq!(
        events(&mut log),
        vec![StorageEvent::Durable { through: 101 }]
    );
    assert_eq!((log.written_lsn(), log.synced_lsn()), (101, 101));
    let m = log.metrics();
    assert_eq!((m.batches, m.records_written, m.syncs), (1, 101, 1));
    assert_eq!(m.batch_records.max, 101);
    assert_eq!(m.fsync_latency_us.count, 1);
    // The held record goes out in the next tick.
    let Some(Job::Commit(batch)) = log.poll_job(now) else {
        panic!("a commit")
    };
    assert_eq!(batch.records, 1);
}

#[test]
fn interval_and_never_acknowledge_once_written_and_interval_syncs_later() {
    for policy in [FsyncPolicy::Interval, FsyncPolicy::Never] {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = open(dir.path(), opts(1 << 20, policy));
        let key = log.room(&room("r"));
        log.append_epoch(key, 5, 0).unwrap();
        let t0 = Instant::now();
        let Some(Job::Commit(batch)) = log.poll_job(t0) else {
            panic!("a commit")
        };
        assert!(
            batch.sync.is_empty() && batch.sync_dir.is_none(),
            "{policy:?}"
        );
        let result = run_commit(&batch);
        log.on_completion(Completion::Commit { batch, result }, t0);
        assert_eq!(events(&mut log), vec![StorageEvent::Durable { through: 1 }]);
        assert_eq!(log.synced_lsn(), 0);
        assert!(log.poll_job(t0 + Duration::from_millis(5)).is_none());
        let later = log.poll_job(t0 + Duration::from_millis(10));
        match policy {
            FsyncPolicy::Interval => {
                let Some(Job::Commit(batch)) = later else {
                    panic!("a sync is due")
                };
                assert_eq!((batch.records, batch.sync.len()), (0, 1));
                let result = run_commit(&batch);
                log.on_completion(Completion::Commit { batch, result }, t0);
                assert_eq!(log.synced_lsn(), 1);
            }
            _ => assert!(later.is_none(), "never syncs by itself"),
        }
    }
}

#[test]
fn reopen_recovers_history_membership_blocks_and_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(16 * 1024, FsyncPolicy::Always);
    let (mut log, _) = open(dir.path(), o);
    let a = log.room(&room("dm:1:2"));
    let c = log.room(&RoomName::new(true, Text::from("news")));
    log.append_epoch(a, 11, 0).unwrap();
    log.append_epoch(c, 12, 0).unwrap();
    log.append_join(a, "ann", 11, 0).unwrap();
    log.append_join(a, "bob", 11, 0).unwrap();
    log.append_join(c, "ann", 12, 0).unwrap();
    for _ in 0..300 {
        publish(&mut log, a).unwrap();
        publish(&mut log, c).unwrap();
    }
    log.append_leave(a, "bob").unwrap();
    log.append_block(c, "bob", true).unwrap();
    flush(&mut log);
    let before = log.metrics();
    assert!(before.segments_created > 2, "the log rolled: {before:?}");
    drop(log); // as a crash after the sync: no clean close

    for clean in [false, true] {
        let (mut log, report) = open(dir.path(), o);
        assert!(report.quarantined.is_empty() && report.torn_tail.is_none());
        assert!(report.affected.is_empty(), "{:?}", report.affected);
        let a = log.room(&room("dm:1:2"));
        let c = log.room(&RoomName::new(true, Text::from("news")));
        let s = &log.state().rooms[&a];
        assert_eq!((s.epoch, s.head, s.first_retained), (11, 300, 1));
        assert_eq!(s.members.len(), 1);
        assert_eq!(
            s.members[&Text::from("ann")],
            JoinPoint {
                epoch: 11,
                seq: 0,
                serial: 0
            }
        );
        let s = &log.state().rooms[&c];
        assert_eq!((s.epoch, s.head), (12, 300));
        assert!(s.blocked.contains(&Text::from("bob")));
        assert_intact(&read_all(&mut log, a), a, 1..=300);
        assert_intact(&read_all(&mut log, c), c, 1..=300);
        if clean {
            // The second open started from the close's checkpoint and scanned nothing.
            assert!(report.checkpoint.is_some());
            assert_eq!(report.records, 0);
        }
        log.begin_close();
        flush(&mut log);
        assert!(log.is_closed());
    }
}

#[test]
fn pages_are_bounded_and_report_what_retention_took() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), opts(1 << 20, FsyncPolicy::Never));
    let key = log.room(&room("r"));
    log.append_epoch(key, 1, 0).unwrap();
    for _ in 0..200 {
        publish(&mut log, key).unwrap();
    }
    flush(&mut log);
    let mut out = Vec::new();
    let info = log.read_page(key, 10, 500, usize::MAX, &mut out).unwrap();
    assert!(!info.complete && info.gap.is_none());
    assert!(out.len() >= 2 && out.len() < 10, "{}", out.len());
    assert_intact(&out, key, 11..=10 + out.len() as u64);
    let mut out = Vec::new();
    let info = log.read_page(key, 0, usize::MAX, 3, &mut out).unwrap();
    assert_eq!((out.len(), info.complete), (3, false));
    let policy = |_: &RoomName| Retention {
        max_messages: 50,
        max_bytes: usize::MAX,
        max_age: Duration::from_secs(3600),
    };
    let done = log.apply_retention(2_000, &policy);
    assert_eq!(done.rooms_trimmed, 1);
    let mut out = Vec::new();
    let info = log
        .read_page(key, 100, usize::MAX, usize::MAX, &mut out)
        .unwrap();
    assert_eq!(info.gap, Some((101, 150)));
    assert_intact(&out, key, 151..=200);
    // A record not written yet is not read: the page stops before it.
    publish(&mut log, key).unwrap();
    let mut out = Vec::new();
    let info = log
        .read_page(key, 199, usize::MAX, usize::MAX, &mut out)
        .unwrap();
    assert_eq!((out.len(), info.complete), (1, false));
}

/// Offsets of the records in a segment file.
fn record_offsets(bytes: &[u8]) -> Vec<(usize, RoomKey)> {
    let mut at = SEGMENT_HEADER_LEN as usize;
    let mut out = Vec::new();
    while let Ok(Some(r)) = record::decode(&bytes[at..]) {
        out.push((at, r.header.key));
        at += r.header.len as usize;
    }
    out
}

#[test]
fn a_torn_tail_is_truncated_silently_and_appends_go_on() {
    for cut in [7usize, HEADER_LEN + 3] {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(1 << 20, FsyncPolicy::Always);
        let (mut log, _) = open(dir.path(), o);
        let key = log.room(&room("r"));
        log.append_epoch(key, 1, 0).unwrap();
        for _ in 0..20 {
            publish(&mut log, key).unwrap();
        }
        flush(&mut log);
        drop(log);
        // The last write was cut short: part of its last record, then zeros (as a file
        // system may leave after a crash).
        let path = segment::path(&dir.path().join("worker-0"), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = record_offsets(&bytes).last().unwrap().0;
        bytes.truncate(last + cut);
        bytes.extend_from_slice(&[0u8; 300]);
        std::fs::write(&path, &bytes).unwrap();

        let (mut log, report) = open(dir.path(), o);
        let torn = report.torn_tail.unwrap();
        assert_eq!((torn.segment, torn.offset), (1, last as u64));
        assert!(report.quarantined.is_empty() && report.affected.is_empty());
        assert_eq!(log.state().rooms[&key].head, 19);
        assert_intact(&read_all(&mut log, key), key, 1..=19);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), last as u64);
        // The sequence goes on from what survived.
        publish(&mut log, key).unwrap();
        flush(&mut log);
        drop(log);
        let (mut log, report) = open(dir.path(), o);
        assert!(report.torn_tail.is_none());
        assert_intact(&read_all(&mut log, key), key, 1..=20);
    }
}

/// Writes rooms a and b until the log has rolled, then b and c: segment 1 holds only a and b.
fn two_phase_log(dir: &Path, o: LogOptions) -> (RoomKey, RoomKey, RoomKey, u64) {
    let (mut log, _) = open(dir, o);
    let (a, b, c) = (
        log.room(&room("a")),
        log.room(&room("b")),
        log.room(&room("c")),
    );
    for k in [a, b, c] {
        log.append_epoch(k, 3, 0).unwrap();
    }
    while log.metrics().segments_created < 2 {
        publish(&mut log, a).unwrap();
        publish(&mut log, b).unwrap();
    }
    let b_split = log.state().rooms[&b].head;
    for _ in 0..150 {
        publish(&mut log, b).unwrap();
        publish(&mut log, c).unwrap();
    }
    flush(&mut log);
    (a, b, c, b_split)
}

#[test]
fn a_flipped_byte_mid_log_quarantines_its_segment_and_loses_nothing_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(8 * 1024, FsyncPolicy::Always);
    let (a, b, c, _) = two_phase_log(dir.path(), o);
    let wdir = dir.path().join("worker-0");
    let path = segment::path(&wdir, 1);
    let mut bytes = std::fs::read(&path).unwrap();
    let recs = record_offsets(&bytes);
    let (at, _) = recs[recs.len() / 2];
    let (next, _) = recs[recs.len() / 2 + 1];
    bytes[next - 1] ^= 0x40; // the last payload byte of a record in the middle
    std::fs::write(&path, &bytes).unwrap();

    let (mut log, report) = open(dir.path(), o);
    assert!(report.torn_tail.is_none());
    assert_eq!(report.quarantined.len(), 1);
    let q = &report.quarantined[0];
    assert_eq!((q.segment, q.offset, q.room_unknown), (1, at as u64, false));
    assert!(
        q.path.starts_with(wdir.join(QUARANTINE_DIR)) && q.path.exists(),
        "kept aside"
    );
    assert!(!path.exists());
    let affected: Vec<&str> = report.affected.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        affected,
        vec!["a", "b"],
        "exactly the rooms in that segment"
    );
    assert_eq!(log.metrics().quarantined_segments, 1);
    // Nothing after the damaged segment is lost: c entirely, b from its first record
    // after segment 1 on.
    assert_intact(&read_all(&mut log, c), c, 1..=150);
    let b_msgs = read_all(&mut log, b);
    let b_first = log.state().rooms[&b].first_retained;
    assert_intact(&b_msgs, b, b_first..=log.state().rooms[&b].head);
    assert_eq!(log.state().rooms[&b].head, b_msgs.last().unwrap().seq);
    assert!(log.state().rooms[&b].head > b_first);
    assert!(read_all(&mut log, a).is_empty());
}

#[test]
fn interior_damage_in_the_last_segment_is_quarantined_not_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(1 << 20, FsyncPolicy::Always);
    let (mut log, _) = open(dir.path(), o);
    let (a, b) = (log.room(&room("a")), log.room(&room("b")));
    log.append_epoch(a, 1, 0).unwrap();
    log.append_epoch(b, 1, 0).unwrap();
    for _ in 0..20 {
        publish(&mut log, a).unwrap();
    }
    for _ in 0..20 {
        publish(&mut log, b).unwrap();
    }
    flush(&mut log);
    drop(log);
    let path = segment::path(&dir.path().join("worker-0"), 1);
    let mut bytes = std::fs::read(&path).unwrap();
    let recs = record_offsets(&bytes);
    // Damage the header of a record of room a: the room cannot be read from it.
    bytes[recs[5].0 + 20] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let (_, report) = open(dir.path(), o);
    assert!(
        report.torn_tail.is_none(),
        "valid records follow: not a torn tail"
    );
    assert_eq!(report.quarantined.len(), 1);
    assert!(report.quarantined[0].room_unknown);
    assert_eq!(
        report.affected.len(),
        2,
        "unknown room: every room reported"
    );
}

#[test]
fn the_quota_refuses_appends_keeps_reads_and_lifts_when_retention_frees_space() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(8 * 1024, FsyncPolicy::Always);
    o.max_disk_bytes = 64 * 1024;
    let (mut log, _) = open(dir.path(), o);
    let key = log.room(&room("r"));
    log.append_epoch(key, 1, 0).unwrap();
    let refused = loop {
        match publish(&mut log, key) {
            Ok(_) => {}
            Err(e) => break e,
        }
        flush(&mut log);
    };
    assert!(
        matches!(
            refused,
            StorageError::StorageFull {
                cause: FullCause::Quota
            }
        ),
        "{refused}"
    );
    assert!(refused.is_retryable());
    assert!(log.disk_used() <= o.max_disk_bytes);
    assert!(events(&mut log).contains(&StorageEvent::Full {
        cause: FullCause::Quota
    }));
    let head = log.state().rooms[&key].head;
    assert_eq!(
        log.ack_lsn() + 1,
        log.next_lsn(),
        "everything taken was stored"
    );
    assert_intact(&read_all(&mut log, key), key, 1..=head);
    // Retention lets old segments go; over quota, the log checkpoints at once (twice: two
    // generations must cover a segment) and deletes them, and appends are taken again.
    let policy = |_: &RoomName| Retention {
        max_messages: 5,
        max_bytes: usize::MAX,
        max_age: Duration::from_secs(3600),
    };
    let done = log.apply_retention(0, &policy);
    assert!(done.segments_released >= 4, "{done:?}");
    flush(&mut log);
    assert!(log.metrics().segments_deleted >= 4, "{:?}", log.metrics());
    publish(&mut log, key).unwrap();
    flush(&mut log);
    assert!(events(&mut log).contains(&StorageEvent::Available));
    assert_intact(&read_all(&mut log, key)[..], key, head - 4..=head + 1);
}

#[test]
fn a_cold_room_pinning_an_old_segment_is_copied_forward_and_the_segment_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(8 * 1024, FsyncPolicy::Never);
    let (mut log, _) = open(dir.path(), o);
    let (hot, cold) = (log.room(&room("hot")), log.room(&room("cold")));
    log.append_epoch(hot, 1, 0).unwrap();
    log.append_epoch(cold, 1, 0).unwrap();
    publish(&mut log, cold).unwrap();
    publish(&mut log, cold).unwrap();
    while log.metrics().segments_created < 6 {
        publish(&mut log, hot).unwrap();
    }
    flush(&mut log);
    let policy = |_: &RoomName| Retention {
        max_messages: 10,
        max_bytes: usize::MAX,
        max_age: Duration::from_secs(3600),
    };
    let done = log.apply_retention(0, &policy);
    assert_eq!((done.rooms_copied, done.records_copied), (1, 2), "{done:?}");
    assert!(
        log.state().rooms[&cold]
            .extents
            .iter()
            .all(|e| e.segment == 6)
    );
    for _ in 0..2 {
        log.begin_close();
        flush(&mut log);
        publish(&mut log, hot).unwrap();
    }
    flush(&mut log);
    let wdir = dir.path().join("worker-0");
    assert!(
        !segment::path(&wdir, 1).exists(),
        "the segment the cold room pinned is gone"
    );
    assert_intact(&read_all(&mut log, cold), cold, 1..=2);
    drop(log);
    // Recovery applies the copy run: the cold room reads from its copies.
    let (mut log, report) = open(dir.path(), o);
    assert!(report.affected.is_empty() && report.quarantined.is_empty());
    assert_intact(&read_all(&mut log, cold), cold, 1..=2);
}

#[test]
fn a_sequence_that_does_not_follow_and_oversized_texts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), opts(1 << 20, FsyncPolicy::Never));
    let key = log.room(&room("r"));
    assert!(matches!(
        log.append_message(key, 2, 0, 0, "s", b"x", None),
        Err(StorageError::Sequence {
            head: 0,
            seq: 2,
            ..
        })
    ));
    let long = "x".repeat(70_000);
    assert!(matches!(
        log.append_join(key, &long, 1, 0),
        Err(StorageError::TooLong { .. })
    ));
    assert!(matches!(
        log.append_leave(key ^ 1, "u"),
        Err(StorageError::UnknownRoom(_))
    ));
    assert_eq!(log.next_lsn(), 1, "nothing was appended");
}
