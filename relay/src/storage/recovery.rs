//! Recovery: rebuilds a worker log's state from its directory after a clean stop, a crash
//! or a kill -9.
//!
//! Owns: reading the newest usable checkpoint, scanning every segment written after it and
//! verifying every record's checksums and LSN continuity, truncating a torn tail, and
//! quarantining interior damage. Must not write records (the log starts a fresh segment
//! after recovery) or decide epochs (it reports the rooms that need a new one).
//!
//! The rule, from Kafka and Apache Iggy rather than from what cost NATS its acknowledged
//! records: damage at some point of a segment is a *torn tail* only when it is in the last
//! segment and no valid record follows it there; then, and only then, the segment is
//! truncated at the damage. Anything else is *interior damage*: the segment is moved into
//! `quarantine/` (kept for inspection), nothing after the damage is silently dropped, every
//! room that had records in it is reported so the core gives it a new epoch (its phones get
//! an exact gap notice), and an error is logged and counted. When a damaged record's header
//! is intact it names the one room that lost it; when the header itself is damaged the room
//! cannot be known, and every room of the log is reported.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::checkpoint;
use super::record::{self, HEADER_LEN, RecordError};
use super::segment::{self, QUARANTINE_DIR, SEGMENT_HEADER_LEN, SegmentHeader};
use super::state::{Applied, Location, LogState};
use super::{Lsn, RoomKey, StorageError};
use crate::ids::RoomName;

/// A segment moved aside because of interior damage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// Its id.
    pub segment: u64,
    /// Where it is now.
    pub path: PathBuf,
    /// Offset of the first damaged byte found.
    pub offset: u64,
    /// The damaged record's header was damaged too, so the room it belonged to is unknown
    /// and every room of the log was reported.
    pub room_unknown: bool,
}

/// A torn tail that was truncated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornTail {
    /// The segment.
    pub segment: u64,
    /// Where it now ends.
    pub offset: u64,
    /// Bytes dropped.
    pub dropped: u64,
}

/// What recovery did, for the log line, the metrics and the core.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Wall time it took.
    pub duration: Duration,
    /// The checkpoint it started from, if any.
    pub checkpoint: Option<PathBuf>,
    /// Checkpoints that could not be used, and why.
    pub refused_checkpoints: Vec<String>,
    /// Segments read.
    pub segments_scanned: u64,
    /// Bytes read.
    pub bytes_scanned: u64,
    /// Records applied.
    pub records: u64,
    /// The torn tail truncated, if there was one.
    pub torn_tail: Option<TornTail>,
    /// Segments quarantined.
    pub quarantined: Vec<Quarantined>,
    /// Rooms that lost records (damage, a sequence gap): each needs a new epoch.
    pub affected: Vec<RoomName>,
    /// Records lost whose room could not be named (their room's naming record was lost).
    pub unnamed_losses: u64,
}

/// A segment that stays in the log.
#[derive(Debug)]
pub struct RecoveredSegment {
    /// Its id.
    pub id: u64,
    /// Its file.
    pub file: Arc<File>,
    /// Its first LSN.
    pub first_lsn: Lsn,
    /// Its length after recovery.
    pub len: u64,
}

/// The state and segments rebuilt from a directory.
#[derive(Debug)]
pub struct Recovered {
    /// Rooms, keys and the next LSN.
    pub state: LogState,
    /// The segments kept, ascending.
    pub segments: Vec<RecoveredSegment>,
    /// What happened.
    pub report: RecoveryReport,
}

/// Where damage was found and what it tells.
struct Damage {
    offset: u64,
    /// The room of the damaged record when its header is intact.
    room: Option<RoomKey>,
}

/// Rebuilds the log in `dir` (created if missing) for `worker`.
pub fn recover(dir: &Path, worker: u32) -> Result<Recovered, StorageError> {
    let started = Instant::now();
    std::fs::create_dir_all(dir.join(QUARANTINE_DIR)).map_err(|e| StorageError::io(dir, e))?;
    let mut report = RecoveryReport::default();
    let ids = segment::list(dir)?;
    let (ckpt, refused) = checkpoint::load(dir, worker);
    report.refused_checkpoints = refused;
    let (mut state, start) = match ckpt {
        Some((path, pos, state)) if ids.contains(&pos.segment) => {
            report.checkpoint = Some(path);
            (state, Some(pos))
        }
        Some((path, pos, _)) => {
            report.refused_checkpoints.push(format!(
                "{}: names segment {:#x}, which is missing",
                path.display(),
                pos.segment
            ));
            (LogState::new(), None)
        }
        None => (LogState::new(), None),
    };
    // Extents into segments retention deleted since this checkpoint (an older generation
    // was used) are gone: those messages were past retention already.
    let mut referenced = BTreeSet::new();
    for room in state.rooms.values() {
        referenced.extend(room.extents.iter().map(|e| e.segment));
    }
    for gone in referenced.into_iter().filter(|s| !ids.contains(s)) {
        state.forget_segment(gone);
    }

    let mut affected: BTreeSet<RoomKey> = BTreeSet::new();
    let mut all_rooms = false;
    let mut kept = Vec::new();
    let mut buf = Vec::new();
    let scan: Vec<u64> = ids
        .iter()
        .copied()
        .filter(|&id| start.is_none_or(|p| id >= p.segment))
        .collect();
    // Segments before the checkpoint's are kept as they are (the checkpoint covers them).
    for &id in ids
        .iter()
        .filter(|&&id| start.is_some_and(|p| id < p.segment))
    {
        kept.push(open_kept(dir, id)?);
    }
    for (i, &id) in scan.iter().enumerate() {
        let last = i + 1 == scan.len();
        let path = segment::path(dir, id);
        let file = segment::open(dir, id)?;
        buf.clear();
        let len = file
            .metadata()
            .map_err(|e| StorageError::io(&path, e))?
            .len();
        buf.resize(len as usize, 0);
        let got = segment::read_at(&file, 0, &mut buf).map_err(|e| StorageError::io(&path, e))?;
        buf.truncate(got);
        report.segments_scanned += 1;
        report.bytes_scanned += got as u64;

        let header = match SegmentHeader::decode(&buf) {
            Ok(h) if h.worker != worker || h.id != id => {
                return Err(StorageError::Layout {
                    path,
                    why: format!("header says worker {} segment {:#x}", h.worker, h.id),
                });
            }
            Ok(h) => Some(h),
            Err(_) => None,
        };
        let from = match (start, header) {
            (Some(p), Some(_)) if p.segment == id => p.offset,
            _ => SEGMENT_HEADER_LEN,
        };
        let damage = match header {
            None => Some(Damage {
                offset: 0,
                room: None,
            }),
            Some(h) => {
                if from == SEGMENT_HEADER_LEN && h.first_lsn != state.next_lsn && state.next_lsn > 1
                {
                    // Records between the previous segment and this one are missing.
                    if h.first_lsn > state.next_lsn {
                        tracing::error!(
                            segment = id,
                            expected = state.next_lsn,
                            found = h.first_lsn,
                            "storage: log records missing before segment; every room gets a new epoch"
                        );
                        all_rooms = true;
                    }
                }
                if from == SEGMENT_HEADER_LEN {
                    state.next_lsn = state.next_lsn.max(h.first_lsn);
                }
                scan_records(&buf, id, from, &mut state, &mut affected, &mut report)
            }
        };
        let Some(damage) = damage else {
            kept.push(RecoveredSegment {
                id,
                file: Arc::new(file),
                first_lsn: header.map_or(0, |h| h.first_lsn),
                len: got as u64,
            });
            continue;
        };
        let valid_after = next_valid(&buf, damage.offset as usize + 1);
        // Damage before the checkpoint's position is never a torn tail: the checkpoint
        // proves those records were written.
        let before_checkpoint = start.is_some_and(|p| p.segment == id && damage.offset < p.offset);
        if last && valid_after.is_none() && !before_checkpoint {
            // A torn tail: the write that was cut short. Nothing valid follows.
            if damage.offset < SEGMENT_HEADER_LEN {
                drop(file);
                std::fs::remove_file(&path).map_err(|e| StorageError::io(&path, e))?;
                segment::sync_dir(dir).map_err(|e| StorageError::io(dir, e))?;
            } else {
                file.set_len(damage.offset)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| StorageError::io(&path, e))?;
                kept.push(RecoveredSegment {
                    id,
                    file: Arc::new(file),
                    first_lsn: header.map_or(0, |h| h.first_lsn),
                    len: damage.offset,
                });
            }
            tracing::warn!(
                segment = id,
                offset = damage.offset,
                dropped = got as u64 - damage.offset,
                "storage: truncated a torn tail (an unacknowledged write cut short)"
            );
            report.torn_tail = Some(TornTail {
                segment: id,
                offset: damage.offset,
                dropped: got as u64 - damage.offset,
            });
            break;
        }
        // Interior damage: quarantine the whole segment, report every room it touched.
        match damage.room {
            Some(key) => {
                affected.insert(key);
            }
            None => all_rooms = true,
        }
        let mut at = damage.offset as usize + 1;
        while let Some((offset, key, lsn)) = next_valid(&buf, at) {
            affected.insert(key);
            state.next_lsn = state.next_lsn.max(lsn + 1);
            at = offset + 1;
        }
        affected.extend(state.forget_segment(id));
        drop(file);
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let aside = dir
            .join(QUARANTINE_DIR)
            .join(format!("{}.{stamp}", segment::file_name(id)));
        std::fs::rename(&path, &aside)
            .and_then(|()| segment::sync_dir(dir))
            .and_then(|()| segment::sync_dir(&dir.join(QUARANTINE_DIR)))
            .map_err(|e| StorageError::io(&path, e))?;
        tracing::error!(
            segment = id,
            offset = damage.offset,
            moved_to = %aside.display(),
            room_unknown = damage.room.is_none(),
            "storage: interior damage in the log; segment quarantined, its rooms get a new epoch"
        );
        report.quarantined.push(Quarantined {
            segment: id,
            path: aside,
            offset: damage.offset,
            room_unknown: damage.room.is_none(),
        });
    }
    if all_rooms {
        affected.extend(state.rooms.keys().copied());
    }
    for key in affected {
        match state.rooms.get(&key) {
            Some(room) => report.affected.push(room.name.clone()),
            None => report.unnamed_losses += 1,
        }
    }
    report.affected.sort_by(|a, b| a.name.cmp(&b.name));
    kept.sort_by_key(|s| s.id);
    report.duration = started.elapsed();
    tracing::info!(
        ms = report.duration.as_millis() as u64,
        bytes = report.bytes_scanned,
        records = report.records,
        rooms = state.rooms.len(),
        from_checkpoint = report.checkpoint.is_some(),
        quarantined = report.quarantined.len(),
        torn_tail = report.torn_tail.is_some(),
        "storage: recovered"
    );
    Ok(Recovered {
        state,
        segments: kept,
        report,
    })
}

/// A segment the checkpoint covers, kept without being scanned.
fn open_kept(dir: &Path, id: u64) -> Result<RecoveredSegment, StorageError> {
    let file = segment::open(dir, id)?;
    let path = segment::path(dir, id);
    let len = file
        .metadata()
        .map_err(|e| StorageError::io(&path, e))?
        .len();
    let mut b = [0u8; SEGMENT_HEADER_LEN as usize];
    let n = segment::read_at(&file, 0, &mut b).map_err(|e| StorageError::io(&path, e))?;
    let first_lsn = SegmentHeader::decode(&b[..n]).map_or(0, |h| h.first_lsn);
    Ok(RecoveredSegment {
        id,
        file: Arc::new(file),
        first_lsn,
        len,
    })
}

/// Applies the records of `buf` from `from` on; returns where damage starts, if anywhere
/// (a record that is incomplete at the end of the file counts as damage there).
fn scan_records(
    buf: &[u8],
    segment: u64,
    from: u64,
    state: &mut LogState,
    affected: &mut BTreeSet<RoomKey>,
    report: &mut RecoveryReport,
) -> Option<Damage> {
    let mut at = from as usize;
    while at < buf.len() {
        let rec = match record::decode(&buf[at..]) {
            Ok(Some(rec)) => rec,
            Ok(None) => {
                // Cut short by the end of the file: its header (if whole) names the room.
                let room = record::decode_header(&buf[at..])
                    .ok()
                    .flatten()
                    .map(|h| h.key);
                return Some(Damage {
                    offset: at as u64,
                    room,
                });
            }
            Err(RecordError::BadBody(h)) => {
                return Some(Damage {
                    offset: at as u64,
                    room: Some(h.key),
                });
            }
            Err(RecordError::BadHeader) => {
                return Some(Damage {
                    offset: at as u64,
                    room: None,
                });
            }
        };
        if rec.header.lsn != state.next_lsn {
            // A whole record, but not the next one: what should be here was lost.
            return Some(Damage {
                offset: at as u64,
                room: None,
            });
        }
        let len = rec.header.len as usize;
        let loc = Location {
            segment,
            offset: at as u64,
            len: len as u64,
        };
        match state.apply(&rec, loc) {
            Applied::Done => {}
            Applied::Gap(key) | Applied::Orphan(key) => {
                affected.insert(key);
            }
        }
        report.records += 1;
        at += len;
    }
    None
}

/// The first position at or after `from` where a whole valid record starts:
/// `(offset, room key, lsn)`.
fn next_valid(buf: &[u8], from: usize) -> Option<(usize, RoomKey, Lsn)> {
    let end = buf.len().checked_sub(HEADER_LEN)?;
    (from..=end).find_map(|p| match record::decode(&buf[p..]) {
        Ok(Some(r)) => Some((p, r.header.key, r.header.lsn)),
        _ => None,
    })
}
