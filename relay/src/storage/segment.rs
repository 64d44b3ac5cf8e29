//! Segment files: a worker's log is a directory of files named by segment id, each opening
//! with a versioned header and then holding records back to back.
//!
//! Owns: the segment header, file names, creating, listing and opening segments, and the
//! directory fsync that makes a new file's name durable. Must not interpret records (that is
//! [`super::record`]) or decide when to roll (that is [`super::log`]).
//!
//! Header (40 bytes, little-endian): magic `PABALSEG`, version u16, reserved u16, worker
//! u32, segment id u64, first LSN u64, crc32c of the preceding 32 bytes u32, reserved u32.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{Lsn, StorageError};

/// Bytes of the segment header; the first record starts here.
pub const SEGMENT_HEADER_LEN: u64 = 40;
/// The format version this build writes and reads.
pub const SEGMENT_VERSION: u16 = 1;
const MAGIC: &[u8; 8] = b"PABALSEG";
/// Where quarantined segments are moved, inside a worker's directory.
pub const QUARANTINE_DIR: &str = "quarantine";

/// What a segment's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The worker whose log it belongs to.
    pub worker: u32,
    /// Its id (the order of segments in the log).
    pub id: u64,
    /// The LSN of its first record.
    pub first_lsn: Lsn,
}

impl SegmentHeader {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN as usize] {
        let mut b = [0u8; SEGMENT_HEADER_LEN as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..10].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.worker.to_le_bytes());
        b[16..24].copy_from_slice(&self.id.to_le_bytes());
        b[24..32].copy_from_slice(&self.first_lsn.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads a header: `Err` says why it is not one of ours.
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < SEGMENT_HEADER_LEN as usize {
            return Err("shorter than a segment header".into());
        }
        if &b[0..8] != MAGIC {
            return Err("not a segment (bad magic)".into());
        }
        let crc = u32::from_le_bytes([b[32], b[33], b[34], b[35]]);
        if crc != crc32c::crc32c(&b[0..32]) {
            return Err("segment header checksum mismatch".into());
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != SEGMENT_VERSION {
            return Err(format!(
                "segment format version {version}; this build reads {SEGMENT_VERSION}"
            ));
        }
        let u64_at = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(x)
        };
        Ok(SegmentHeader {
            worker: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
            id: u64_at(16),
            first_lsn: u64_at(24),
        })
    }
}

/// A segment's file name.
pub fn file_name(id: u64) -> String {
    format!("{id:016x}.seg")
}

/// A segment's path in a worker's directory.
pub fn path(dir: &Path, id: u64) -> PathBuf {
    dir.join(file_name(id))
}

/// The id a segment file name encodes, if it is one.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

/// The segment ids in `dir`, ascending.
pub fn list(dir: &Path) -> Result<Vec<u64>, StorageError> {
    let mut ids = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| StorageError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io(dir, e))?;
        if let Some(id) = entry.file_name().to_str().and_then(parse_file_name) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Creates segment `id` (it must not exist) open for reading and writing. The header is
/// not written here: it travels with the segment's first write.
pub fn create(dir: &Path, id: u64) -> Result<File, StorageError> {
    let p = path(dir, id);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .map_err(|e| StorageError::io(p, e))
}

/// Creates segment `id` like [`create`] and reserves `size` bytes of disk for it
/// (`fallocate` with `FALLOC_FL_KEEP_SIZE`: blocks allocated, the file's length unchanged,
/// so recovery reads it as before). The log never writes a segment past its size, so once
/// a segment exists its writes do not run out of space: a full file system shows at the
/// roll, before the append that would need the space is taken, never as a failed write
/// of records already accepted. On a file system that cannot reserve (`EOPNOTSUPP`) the
/// segment is created without. A failed reservation removes the file.
pub fn create_reserved(dir: &Path, id: u64, size: u64) -> Result<File, StorageError> {
    let file = create(dir, id)?;
    let e = match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::KEEP_SIZE, 0, size) {
        Ok(()) => return Ok(file),
        Err(e) => io::Error::from(e),
    };
    if matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    ) {
        return Ok(file);
    }
    let p = path(dir, id);
    drop(file);
    let _ = std::fs::remove_file(&p);
    Err(StorageError::io(p, e))
}

/// Opens an existing segment for reading and writing.
pub fn open(dir: &Path, id: u64) -> Result<File, StorageError> {
    let p = path(dir, id);
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .map_err(|e| StorageError::io(p, e))
}

/// Makes the names in `dir` durable (a new segment, a rename, a deletion).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads up to `buf.len()` bytes at `offset`; returns how many (fewer at end of file).
pub fn read_at(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn a_created_segment_has_its_size_reserved_but_reads_as_empty() {
        use std::os::unix::fs::MetadataExt;
        // tmpfs reserves (as ext4, xfs and btrfs do); /dev/shm is one on Linux.
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let file = create_reserved(dir.path(), 7, 1 << 20).unwrap();
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), 0, "recovery sees only what was written");
        assert!(meta.blocks() * 512 >= 1 << 20, "{} blocks", meta.blocks());
        assert!(matches!(
            create_reserved(dir.path(), 7, 1 << 20),
            Err(StorageError::Io { .. })
        ));
    }

    #[test]
    fn header_round_trips_and_refuses_damage() {
        let h = SegmentHeader {
            worker: 3,
            id: 17,
            first_lsn: 1234,
        };
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        for at in 0..36 {
            let mut bad = b;
            bad[at] ^= 1;
            assert!(SegmentHeader::decode(&bad).is_err(), "{at}");
        }
        assert!(SegmentHeader::decode(&b[..39]).is_err());
    }

    #[test]
    fn names_sort_as_ids_and_others_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        for id in [10u64, 2, 0xff] {
            create(dir.path(), id).unwrap();
        }
        std::fs::write(dir.path().join("checkpoint"), b"x").unwrap();
        std::fs::write(dir.path().join("zz.seg"), b"x").unwrap();
        assert_eq!(list(dir.path()).unwrap(), vec![2, 10, 0xff]);
        assert!(create(dir.path(), 2).is_err(), "never reopened as new");
        assert_eq!(parse_file_name(&file_name(u64::MAX)), Some(u64::MAX));
    }
}
