//! Re-homing rooms when the worker count changes: a room's owner is chosen by its id modulo
//! the worker count ([`crate::ids::RoomName::owner`]), so after a change most rooms belong
//! to another worker than the one whose log holds them.
//!
//! Owns: the one-off migration at start, before any worker runs, from the logs of the old
//! count to logs of the new one, and its crash-safe install. Must not touch anything but
//! `[storage] dir`.
//!
//! # Copy forward, not a legacy log
//! Every room's live state is copied into its new owner's log: its epoch (as an epoch
//! record at the first retained sequence), every retained message with its sequence,
//! timestamp, sender and flags, its members with their join points and its blocks. So
//! after the change each room lives in exactly one log, the one its owner appends to, and
//! recovery, paging, retention and checkpoints stay what they are: one log per worker, no
//! read-only second source to consult, merge or age out. The price is one read and one
//! write of what retention keeps, once, at the first start with the new count (bounded by
//! `max_disk_bytes`; a restart that does not change the count costs nothing).
//!
//! # Crash safety
//! The new logs are built under `rehome.tmp/` and synced with a checkpoint each; renaming
//! it to `rehome.ready/` is the commit point. Install: the old `worker-N` directories move
//! to `rehome.old/`, the marker `rehome.installing` is created, the new ones move in, then
//! `rehome.old/`, `rehome.ready/` and the marker go. A start that finds `rehome.tmp/`
//! throws it away and begins again (the old logs are untouched); one that finds
//! `rehome.ready/` or the marker finishes the install.
//!
//! Rooms that lost records to damage in an old log (see [`super::recovery`]) start a new
//! epoch in the new log, as they would have on their old worker, so phones get an exact gap.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::commit::InlineExecutor;
use super::log::{LogOptions, WorkerLog};
use super::segment;
use super::{RoomKey, StorageError, StoredMessage};
use crate::ids::RoomName;

/// Where the new logs are built.
const TMP_DIR: &str = "rehome.tmp";
/// The new logs, complete and synced: the commit point.
const READY_DIR: &str = "rehome.ready";
/// The old logs, while the new ones move in.
const OLD_DIR: &str = "rehome.old";
/// Present while the new logs move in (every old one has moved out).
const INSTALLING: &str = "rehome.installing";
/// Messages copied per page (and per group commit of the new log).
const PAGE_MSGS: usize = 4096;
/// Payload bytes copied per page.
const PAGE_BYTES: usize = 8 << 20;
/// How long one flush of a new log may take.
const FLUSH_LIMIT: Duration = Duration::from_secs(120);

/// What a re-homing did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RehomeReport {
    /// The worker count the logs were written with.
    pub from_workers: usize,
    /// The worker count they are now for.
    pub to_workers: usize,
    /// Rooms copied.
    pub rooms: u64,
    /// Rooms that moved to another worker.
    pub moved: u64,
    /// Messages copied.
    pub messages: u64,
    /// Rooms given a new epoch because their old log lost records.
    pub new_epochs: u64,
}

fn io_err(path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// The worker indices whose logs `dir` holds (`worker-N` directories).
fn stored_workers(dir: &Path) -> Result<Vec<usize>, StorageError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        if let Some(n) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("worker-"))
            .and_then(|n| n.parse::<usize>().ok())
        {
            found.push(n);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// Makes the logs under `root` the logs of `workers` workers, re-homing every room to the
/// worker that owns it under that count, if they were written with another count (or
/// finishes a re-homing a crash interrupted). Blocking; run before the workers start.
/// `None` when there was nothing to do.
pub fn rehome(
    root: &Path,
    workers: usize,
    opts: LogOptions,
) -> Result<Option<RehomeReport>, StorageError> {
    if root.join(INSTALLING).exists() || root.join(READY_DIR).exists() {
        install(root)?;
    }
    let tmp = root.join(TMP_DIR);
    if tmp.exists() {
        // An attempt that did not reach its commit point: the old logs are intact.
        fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    let stored = stored_workers(root)?;
    let from = stored.last().map_or(0, |n| n + 1);
    if from == 0 || from == workers {
        return Ok(None);
    }
    let report = build(root, &stored, workers, opts)?;
    let ready = root.join(READY_DIR);
    fs::rename(&tmp, &ready).map_err(|e| io_err(&ready, e))?;
    segment::sync_dir(root).map_err(|e| io_err(root, e))?;
    install(root)?;
    Ok(Some(report))
}

/// Builds the new logs under `rehome.tmp/` from the old ones (`stored`).
fn build(
    root: &Path,
    stored: &[usize],
    workers: usize,
    opts: LogOptions,
) -> Result<RehomeReport, StorageError> {
    let tmp = root.join(TMP_DIR);
    fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    let now = Instant::now();
    let mut exec = InlineExecutor::default();
    let mut new_logs = Vec::with_capacity(workers);
    for w in 0..workers {
        new_logs.push(WorkerLog::open(&tmp, w as u32, opts, now)?.0);
    }
    let mut report = RehomeReport {
        from_workers: stored.last().map_or(0, |n| n + 1),
        to_workers: workers,
        ..RehomeReport::default()
    };
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut page = Vec::new();
    for &old_worker in stored {
        let (mut old, recovered) = WorkerLog::open(root, old_worker as u32, opts, now)?;
        let mut rooms: Vec<(RoomKey, RoomName)> = old
            .state()
            .rooms
            .iter()
            .map(|(k, r)| (*k, r.name.clone()))
            .collect();
        rooms.sort_by_key(|(k, _)| *k);
        for (old_key, name) in rooms {
            let owner = name.owner(workers);
            let new = &mut new_logs[owner];
            let damaged = recovered.affected.contains(&name);
            report.messages += copy_room(&mut old, old_key, new, &mut exec, &mut page)?;
            if damaged {
                // As the old worker would have at its start: a new stream, an exact gap.
                let key = new.room(&name);
                let rs = new.room_state(key)?;
                let (epoch, head) = (rs.epoch, rs.head);
                new.append_epoch(key, now_ms.max(epoch + 1), head)?;
                report.new_epochs += 1;
            }
            report.rooms += 1;
            report.moved += u64::from(owner != old_worker);
        }
    }
    for (w, mut log) in new_logs.into_iter().enumerate() {
        log.begin_close();
        if !log.flush_blocking(&mut exec, FLUSH_LIMIT) || log.ack_lsn() + 1 != log.next_lsn() {
            return Err(StorageError::Failed(format!(
                "re-homing: worker {w}'s new log could not be written"
            )));
        }
    }
    segment::sync_dir(&tmp).map_err(|e| io_err(&tmp, e))?;
    Ok(report)
}

/// Copies one room (state, retained messages, members, blocks, receipts markers) from
/// `old` into `new`;
/// returns the messages copied.
fn copy_room(
    old: &mut WorkerLog,
    old_key: RoomKey,
    new: &mut WorkerLog,
    exec: &mut InlineExecutor,
    page: &mut Vec<StoredMessage>,
) -> Result<u64, StorageError> {
    let rs = old.room_state(old_key)?.clone();
    let key = new.room(&rs.name);
    if rs.epoch != 0 {
        new.append_epoch(key, rs.epoch, rs.first_retained.saturating_sub(1))?;
    }
    let mut copied = 0;
    let mut after = rs.first_retained.saturating_sub(1);
    while after < rs.head {
        page.clear();
        old.read_page(old_key, after, PAGE_BYTES, PAGE_MSGS, page)?;
        let Some(last) = page.last() else {
            break;
        };
        after = last.seq;
        for m in page.drain(..) {
            new.append_message(
                key,
                m.seq,
                m.ts_ms,
                m.flags,
                m.sender.as_str(),
                &m.payload,
                m.publish_id,
            )?;
            copied += 1;
        }
        flush(new, exec)?;
    }
    let head = new.room_state(key)?.head;
    if head != rs.head {
        return Err(StorageError::Layout {
            path: old.dir().to_path_buf(),
            why: format!(
                "re-homing room {}: its messages end at {head}, its head is {}",
                rs.name.name, rs.head
            ),
        });
    }
    for (user, join) in &rs.members {
        new.append_join(key, user.as_str(), join.epoch, join.seq)?;
    }
    for user in &rs.blocked {
        new.append_block(key, user.as_str(), true)?;
    }
    for (user, m) in &rs.markers {
        new.append_markers(key, user.as_str(), rs.epoch, m.delivered, m.read)?;
    }
    flush(new, exec)?;
    Ok(copied)
}

/// Writes what `log` holds in memory.
fn flush(log: &mut WorkerLog, exec: &mut InlineExecutor) -> Result<(), StorageError> {
    if log.flush_blocking(exec, FLUSH_LIMIT) && log.ack_lsn() + 1 == log.next_lsn() {
        Ok(())
    } else {
        Err(StorageError::Failed(format!(
            "re-homing: {} could not be written",
            log.dir().display()
        )))
    }
}

/// Moves the new logs (`rehome.ready/`) in place of the old ones; resumable.
fn install(root: &Path) -> Result<(), StorageError> {
    let ready = root.join(READY_DIR);
    let old = root.join(OLD_DIR);
    let marker = root.join(INSTALLING);
    let sync = || segment::sync_dir(root).map_err(|e| io_err(root, e));
    if !marker.exists() {
        // Every `worker-N` here is an old log.
        fs::create_dir_all(&old).map_err(|e| io_err(&old, e))?;
        for n in stored_workers(root)? {
            let from = worker_dir(root, n);
            let to = worker_dir(&old, n);
            if to.exists() {
                fs::remove_dir_all(&to).map_err(|e| io_err(&to, e))?;
            }
            fs::rename(&from, &to).map_err(|e| io_err(&from, e))?;
        }
        sync()?;
        fs::File::create(&marker).map_err(|e| io_err(&marker, e))?;
        sync()?;
    }
    // Every `worker-N` here is a new log; move in the rest.
    for n in stored_workers(&ready)? {
        let from = worker_dir(&ready, n);
        let to = worker_dir(root, n);
        fs::rename(&from, &to).map_err(|e| io_err(&from, e))?;
    }
    sync()?;
    for dir in [&ready, &old] {
        match fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(dir, e)),
        }
    }
    sync()?;
    fs::remove_file(&marker).map_err(|e| io_err(&marker, e))?;
    sync()
}

fn worker_dir(root: &Path, n: usize) -> PathBuf {
    root.join(format!("worker-{n}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use pabal_codec::Text;

    use super::*;
    use crate::config::FsyncPolicy;

    fn opts() -> LogOptions {
        LogOptions {
            segment_size: 1 << 20,
            fsync: FsyncPolicy::Always,
            fsync_interval: Duration::from_millis(10),
            max_disk_bytes: 0,
            checkpoint_interval: Duration::from_secs(3600),
        }
    }

    fn name(i: u64) -> RoomName {
        RoomName::new(false, Text::from(format!("room:{i}").as_str()))
    }

    /// Twelve rooms in the logs of two workers, each in its owner's: epoch 100 + i, i + 2
    /// messages, one member.
    fn write_two_workers(root: &Path) {
        let mut exec = InlineExecutor::default();
        for w in 0..2u32 {
            let (mut log, _) = WorkerLog::open(root, w, opts(), Instant::now()).unwrap();
            for i in (0..12).filter(|i| name(*i).owner(2) == w as usize) {
                let key = log.room(&name(i));
                log.append_epoch(key, 100 + i, 0).unwrap();
                for seq in 1..=i + 2 {
                    let body = format!("{i}/{seq}");
                    log.append_message(key, seq, 1000 + seq, 0, "u", body.as_bytes(), None)
                        .unwrap();
                }
                log.append_join(key, "member", 100 + i, 1).unwrap();
            }
            log.begin_close();
            assert!(log.flush_blocking(&mut exec, Duration::from_secs(10)));
        }
    }

    /// Every room is in the log of its owner under `workers`, whole.
    fn check(root: &Path, workers: usize) {
        assert_eq!(
            stored_workers(root).unwrap(),
            (0..workers).collect::<Vec<_>>()
        );
        for dir in [TMP_DIR, READY_DIR, OLD_DIR, INSTALLING] {
            assert!(!root.join(dir).exists(), "{dir} left behind");
        }
        let mut logs: Vec<WorkerLog> = (0..workers)
            .map(|w| {
                WorkerLog::open(root, w as u32, opts(), Instant::now())
                    .unwrap()
                    .0
            })
            .collect();
        for i in 0..12 {
            let owner = name(i).owner(workers);
            for (w, log) in logs.iter_mut().enumerate() {
                let key = log.state().keys.get(&name(i)).copied();
                if w != owner {
                    assert_eq!(key, None, "room {i} also in worker {w}");
                    continue;
                }
                let key = key.unwrap();
                let rs = log.state().rooms[&key].clone();
                assert_eq!((rs.epoch, rs.head), (100 + i, i + 2), "room {i}");
                assert_eq!(rs.members[&Text::from("member")].epoch, 100 + i);
                let mut page = Vec::new();
                log.read_page(key, 0, usize::MAX, usize::MAX, &mut page)
                    .unwrap();
                let got: Vec<(u64, u64, Vec<u8>)> = page
                    .iter()
                    .map(|m| (m.seq, m.ts_ms, m.payload.to_vec()))
                    .collect();
                let want: Vec<(u64, u64, Vec<u8>)> = (1..=i + 2)
                    .map(|s| (s, 1000 + s, format!("{i}/{s}").into_bytes()))
                    .collect();
                assert_eq!(got, want, "room {i}");
            }
        }
    }

    #[test]
    fn rooms_move_to_their_new_owners_and_a_same_count_start_does_nothing() {
        let dir = tempfile::tempdir().unwrap();
        write_two_workers(dir.path());
        let report = rehome(dir.path(), 3, opts()).unwrap().unwrap();
        assert_eq!(
            (report.from_workers, report.to_workers, report.rooms),
            (2, 3, 12)
        );
        assert_eq!(report.messages, (0..12).map(|i| i + 2).sum::<u64>());
        assert!(report.moved > 0);
        check(dir.path(), 3);
        assert_eq!(rehome(dir.path(), 3, opts()).unwrap(), None);
        rehome(dir.path(), 1, opts()).unwrap().unwrap();
        check(dir.path(), 1);
    }

    #[test]
    fn an_attempt_cut_before_its_commit_point_is_redone_and_an_install_cut_is_finished() {
        // Cut while building: the half-built logs are thrown away, the old ones used.
        let dir = tempfile::tempdir().unwrap();
        write_two_workers(dir.path());
        fs::create_dir_all(dir.path().join(TMP_DIR).join("worker-0")).unwrap();
        fs::write(dir.path().join(TMP_DIR).join("worker-0").join("junk"), b"x").unwrap();
        rehome(dir.path(), 3, opts()).unwrap().unwrap();
        check(dir.path(), 3);
        // Cut during the install: the new logs are ready, one old log has moved out.
        let dir = tempfile::tempdir().unwrap();
        write_two_workers(dir.path());
        let stored = stored_workers(dir.path()).unwrap();
        build(dir.path(), &stored, 3, opts()).unwrap();
        fs::rename(dir.path().join(TMP_DIR), dir.path().join(READY_DIR)).unwrap();
        fs::create_dir_all(dir.path().join(OLD_DIR)).unwrap();
        fs::rename(
            worker_dir(dir.path(), 0),
            worker_dir(&dir.path().join(OLD_DIR), 0),
        )
        .unwrap();
        assert_eq!(
            rehome(dir.path(), 3, opts()).unwrap(),
            None,
            "finished, not redone"
        );
        check(dir.path(), 3);
        // Cut later: the marker is there and two new logs have moved in.
        let dir = tempfile::tempdir().unwrap();
        write_two_workers(dir.path());
        let stored = stored_workers(dir.path()).unwrap();
        build(dir.path(), &stored, 3, opts()).unwrap();
        let (root, ready, old) = (
            dir.path(),
            dir.path().join(READY_DIR),
            dir.path().join(OLD_DIR),
        );
        fs::rename(root.join(TMP_DIR), &ready).unwrap();
        fs::create_dir_all(&old).unwrap();
        for n in 0..2 {
            fs::rename(worker_dir(root, n), worker_dir(&old, n)).unwrap();
        }
        fs::File::create(root.join(INSTALLING)).unwrap();
        for n in 0..2 {
            fs::rename(worker_dir(&ready, n), worker_dir(root, n)).unwrap();
        }
        assert_eq!(
            rehome(root, 3, opts()).unwrap(),
            None,
            "finished, not redone"
        );
        check(root, 3);
    }
}
