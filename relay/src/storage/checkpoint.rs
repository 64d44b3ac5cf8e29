//! The checkpoint: the whole [`LogState`] (every room's epoch, head, first retained
//! sequence, extents, members and blocks) as of a position in the log, so recovery reads it
//! and scans only what was written after.
//!
//! Owns: the checkpoint file format and its atomic replacement (`checkpoint.tmp`, fsync,
//! `checkpoint` -> `checkpoint.prev`, `checkpoint.tmp` -> `checkpoint`, directory fsync).
//! Two generations are kept so a damaged newest one still leaves a usable older one. Must
//! not decide when to checkpoint (that is [`super::log`]).
//!
//! Format (little-endian): magic `PABALCKP`, version u16, reserved u16, worker u32, then the
//! position (segment id u64, offset u64, next LSN u64), the room count u32 and per room: key
//! u64, channel u8, name, epoch, head, first retained, extents (count u32, 7 x u64 each),
//! members (count u32, user, epoch, seq), blocks (count u32, user), and since version 2
//! receipts markers (count u32, user, delivered, read); texts are u16-length prefixed. A
//! crc32c of everything before it ends the file. Version 1 files (no markers) are read too.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use pabal_codec::Text;

use super::Lsn;
use super::record::{MAX_TEXT_LEN, Reader};
use super::state::{Extent, LogState, RoomState, StoredMarkers};
use crate::directory::JoinPoint;
use crate::ids::RoomName;

const MAGIC: &[u8; 8] = b"PABALCKP";
const VERSION: u16 = 2;
/// The oldest version this build reads (version 1: no receipts markers).
const OLDEST_VERSION: u16 = 1;
/// The newest checkpoint.
pub const FILE: &str = "checkpoint";
/// The one before it.
pub const PREV_FILE: &str = "checkpoint.prev";
const TMP_FILE: &str = "checkpoint.tmp";

/// Where the log continues after a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The segment the next record goes in (or is found in).
    pub segment: u64,
    /// Its offset there.
    pub offset: u64,
    /// Its LSN.
    pub lsn: Lsn,
}

fn put_text(out: &mut Vec<u8>, t: &str) {
    let len = t.len().min(MAX_TEXT_LEN);
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(&t.as_bytes()[..len]);
}

fn put_u64s(out: &mut Vec<u8>, values: &[u64]) {
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Serialises `state` as of `pos` into `out` (cleared first).
pub fn encode(worker: u32, pos: Position, state: &LogState, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&worker.to_le_bytes());
    put_u64s(out, &[pos.segment, pos.offset, pos.lsn]);
    out.extend_from_slice(&(state.rooms.len() as u32).to_le_bytes());
    for (&key, room) in &state.rooms {
        put_u64s(out, &[key]);
        out.push(u8::from(room.name.channel));
        put_text(out, room.name.name.as_str());
        put_u64s(out, &[room.epoch, room.head, room.first_retained]);
        out.extend_from_slice(&(room.extents.len() as u32).to_le_bytes());
        for e in &room.extents {
            put_u64s(
                out,
                &[
                    e.first_seq,
                    e.last_seq,
                    e.segment,
                    e.start,
                    e.end,
                    e.payload_bytes,
                    e.last_ts_ms,
                ],
            );
        }
        out.extend_from_slice(&(room.members.len() as u32).to_le_bytes());
        for (user, join) in &room.members {
            put_text(out, user.as_str());
            put_u64s(out, &[join.epoch, join.seq]);
        }
        out.extend_from_slice(&(room.blocked.len() as u32).to_le_bytes());
        for user in &room.blocked {
            put_text(out, user.as_str());
        }
        out.extend_from_slice(&(room.markers.len() as u32).to_le_bytes());
        for (user, m) in &room.markers {
            put_text(out, user.as_str());
            put_u64s(out, &[m.delivered, m.read]);
        }
    }
    let crc = crc32c::crc32c(out);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// A count read from disk, refused when even `min_each` bytes per item cannot fit in what
/// is left (so damage never makes us reserve memory for a huge count).
fn count(r: &mut Reader<'_>, min_each: usize) -> Option<usize> {
    let n = r.u32()? as usize;
    (n.checked_mul(min_each)? <= r.0.len()).then_some(n)
}

/// Reads a checkpoint written by `worker`. `Err` says why it cannot be used.
pub fn decode(bytes: &[u8], worker: u32) -> Result<(Position, LogState), String> {
    if bytes.len() < 4 {
        return Err("too short".into());
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err("checksum mismatch".into());
    }
    let mut r = Reader(body);
    if r.take(8) != Some(MAGIC.as_slice()) {
        return Err("not a checkpoint (bad magic)".into());
    }
    let version = r.take(4).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let Some(version) = version.filter(|v| (OLDEST_VERSION..=VERSION).contains(v)) else {
        return Err(format!(
            "version {version:?}; this build reads {OLDEST_VERSION} to {VERSION}"
        ));
    };
    match r.u32() {
        Some(w) if w == worker => {}
        other => return Err(format!("written by worker {other:?}, not {worker}")),
    }
    parse_state(&mut r, version).ok_or_else(|| "malformed".to_string())
}

fn parse_state(r: &mut Reader<'_>, version: u16) -> Option<(Position, LogState)> {
    let pos = Position {
        segment: r.u64()?,
        offset: r.u64()?,
        lsn: r.u64()?,
    };
    let mut state = LogState::new();
    state.next_lsn = pos.lsn;
    for _ in 0..count(r, 45)? {
        let key = r.u64()?;
        let channel = r.u8()? != 0;
        let name = RoomName::new(channel, Text::from(r.text()?));
        let mut room = RoomState {
            name: name.clone(),
            epoch: r.u64()?,
            head: r.u64()?,
            first_retained: r.u64()?,
            extents: VecDeque::new(),
            members: HashMap::new(),
            blocked: HashSet::new(),
            markers: HashMap::new(),
        };
        for _ in 0..count(r, 56)? {
            room.extents.push_back(Extent {
                first_seq: r.u64()?,
                last_seq: r.u64()?,
                segment: r.u64()?,
                start: r.u64()?,
                end: r.u64()?,
                payload_bytes: r.u64()?,
                last_ts_ms: r.u64()?,
            });
        }
        for _ in 0..count(r, 18)? {
            let user = Text::from(r.text()?);
            let join = JoinPoint {
                epoch: r.u64()?,
                seq: r.u64()?,
                // A recovered membership is the only one of its user and room in this run
                // (no removal of an earlier one can be in flight after a restart).
                serial: 0,
            };
            room.members.insert(user, join);
        }
        for _ in 0..count(r, 2)? {
            room.blocked.insert(Text::from(r.text()?));
        }
        if version >= 2 {
            for _ in 0..count(r, 18)? {
                let user = Text::from(r.text()?);
                let m = StoredMarkers {
                    delivered: r.u64()?,
                    read: r.u64()?,
                };
                room.markers.insert(user, m);
            }
        }
        if state.rooms.insert(key, room).is_some() || state.keys.insert(name, key).is_some() {
            return None;
        }
    }
    r.0.is_empty().then_some((pos, state))
}

/// Writes `bytes` as the newest checkpoint in `dir`, keeping the previous one, durably:
/// when this returns `Ok`, a crash at any point leaves a complete checkpoint readable.
pub fn write(dir: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(TMP_FILE);
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    let newest = dir.join(FILE);
    match fs::rename(&newest, dir.join(PREV_FILE)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    fs::rename(&tmp, &newest)?;
    super::segment::sync_dir(dir)
}

/// The newest usable checkpoint in `dir`, trying `checkpoint` then `checkpoint.prev`, with
/// the reasons the ones skipped were refused (for the log).
pub fn load(dir: &Path, worker: u32) -> (Option<(PathBuf, Position, LogState)>, Vec<String>) {
    let mut refused = Vec::new();
    for name in [FILE, PREV_FILE] {
        let path = dir.join(name);
        match fs::read(&path) {
            Ok(bytes) => match decode(&bytes, worker) {
                Ok((pos, state)) => return (Some((path, pos, state)), refused),
                Err(why) => refused.push(format!("{}: {why}", path.display())),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => refused.push(format!("{}: {e}", path.display())),
        }
    }
    (None, refused)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    use super::*;

    fn sample() -> LogState {
        let mut s = LogState::new();
        for (i, name) in ["dm:1:2", "brand:x", "é"].iter().enumerate() {
            let (key, _) = s.key_for(&RoomName::new(i == 1, Text::from(*name)));
            let room = s.rooms.get_mut(&key).unwrap();
            room.epoch = 77 + i as u64;
            room.head = 10;
            room.first_retained = 4;
            room.extents.push_back(Extent {
                first_seq: 4,
                last_seq: 10,
                segment: 2,
                start: 40,
                end: 900,
                payload_bytes: 70,
                last_ts_ms: 123,
            });
            room.members.insert(
                Text::from("ann"),
                JoinPoint {
                    epoch: 77,
                    seq: 3,
                    serial: 0,
                },
            );
            room.blocked.insert(Text::from("bo"));
            room.markers.insert(
                Text::from("ann"),
                StoredMarkers {
                    delivered: 9,
                    read: 7,
                },
            );
        }
        s.next_lsn = 99;
        s
    }

    #[test]
    fn round_trips_and_is_replaced_atomically_keeping_the_previous() {
        let dir = tempfile::tempdir().unwrap();
        let state = sample();
        let pos = Position {
            segment: 2,
            offset: 900,
            lsn: 99,
        };
        let mut bytes = Vec::new();
        encode(4, pos, &state, &mut bytes);
        write(dir.path(), &bytes).unwrap();
        let (got, refused) = load(dir.path(), 4);
        let (_, got_pos, got_state) = got.unwrap();
        assert!(refused.is_empty());
        assert_eq!(got_pos, pos);
        assert_eq!(got_state.rooms.len(), 3);
        for (key, room) in &state.rooms {
            let g = &got_state.rooms[key];
            assert_eq!(
                (g.epoch, g.head, g.first_retained),
                (room.epoch, room.head, room.first_retained)
            );
            assert_eq!(g.extents, room.extents);
            assert_eq!(g.members, room.members);
            assert_eq!(g.blocked, room.blocked);
            assert_eq!(g.markers, room.markers);
            assert_eq!(got_state.keys[&room.name], *key);
        }
        // A second write keeps the first as .prev; damage the newest: the previous is used.
        let newer = Position { lsn: 150, ..pos };
        encode(4, newer, &state, &mut bytes);
        write(dir.path(), &bytes).unwrap();
        let mut damaged = fs::read(dir.path().join(FILE)).unwrap();
        damaged[30] ^= 0xff;
        fs::write(dir.path().join(FILE), damaged).unwrap();
        let (got, refused) = load(dir.path(), 4);
        assert_eq!(got.unwrap().1, pos);
        assert_eq!(refused.len(), 1, "{refused:?}");
        // Another worker's checkpoint is refused.
        assert!(load(dir.path(), 5).0.is_none());
    }

    #[test]
    fn random_damage_never_panics() {
        let mut bytes = Vec::new();
        encode(
            0,
            Position {
                segment: 1,
                offset: 40,
                lsn: 1,
            },
            &sample(),
            &mut bytes,
        );
        let mut rng = SmallRng::seed_from_u64(7);
        for _ in 0..5000 {
            let mut b = bytes.clone();
            let at = rng.random_range(0..b.len());
            b[at] = rng.random();
            b.truncate(rng.random_range(0..=b.len()));
            // Checksummed, so damage is refused; the parser must also survive a body whose
            // checksum was recomputed over garbage.
            let _ = decode(&b, 0);
            if b.len() > 4 {
                let n = b.len() - 4;
                let crc = crc32c::crc32c(&b[..n]).to_le_bytes();
                b[n..].copy_from_slice(&crc);
                let _ = decode(&b, 0);
            }
        }
    }

    /// A checkpoint written before receipts (version 1: no markers section) still loads.
    #[test]
    fn a_version_1_checkpoint_is_read_without_markers() {
        let mut state = sample();
        for room in state.rooms.values_mut() {
            room.markers.clear();
        }
        let pos = Position {
            segment: 2,
            offset: 900,
            lsn: 99,
        };
        let mut v2 = Vec::new();
        encode(4, pos, &state, &mut v2);
        // Version 1 is version 2 without the (here empty) markers count of each room.
        let mut v1 = v2[..v2.len() - 4].to_vec();
        v1[8..10].copy_from_slice(&1u16.to_le_bytes());
        let mut at = 0;
        let mut cut = Vec::new();
        // Each room's markers count (u32 0) directly follows its last block "bo" (02 00 b o).
        while let Some(i) = v1[at..]
            .windows(6)
            .position(|w| w == [2, 0, b'b', b'o', 0, 0])
        {
            cut.push(at + i + 4);
            at += i + 6;
        }
        assert_eq!(cut.len(), 3);
        for &i in cut.iter().rev() {
            v1.drain(i..i + 4);
        }
        let crc = crc32c::crc32c(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        let (got_pos, got) = decode(&v1, 4).unwrap();
        assert_eq!(got_pos, pos);
        assert_eq!(got.rooms.len(), 3);
        assert!(got.rooms.values().all(|r| r.markers.is_empty()));
    }
}
