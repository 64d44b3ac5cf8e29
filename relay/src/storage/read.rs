//! Reading history back: a page of a room's messages after a sequence, found through the
//! room's extents, read with one bounded `pread` per extent.
//!
//! Owns: [`StoredMessage`] and [`WorkerLog::read_page`]. Never loads a whole room: a page
//! reads only the extents it returns messages from, each at most
//! [`super::state::EXTENT_MAX_SPAN`] bytes. Must not change the log. Reads verify every
//! record's checksums; damage is an error naming the place, never a wrong message.

use bytes::Bytes;
use pabal_codec::Text;

use super::record::{self, Body};
use super::segment;
use super::{RoomKey, StorageError, WorkerLog};
use crate::history::PageInfo;

/// A message read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its sequence.
    pub seq: u64,
    /// Accepted at, ms since the Unix epoch.
    pub ts_ms: u64,
    /// The core's flags.
    pub flags: u8,
    /// Who published it.
    pub sender: Text,
    /// Its payload.
    pub payload: Bytes,
    /// Its publish id (protocol v2), if it had one.
    pub publish_id: Option<(u64, u64)>,
}

impl WorkerLog {
    /// Appends to `out` the room's messages after `after`, up to about `max_bytes` of
    /// payload and `max_msgs` messages (at least one when there is one), as
    /// [`crate::history::History::page`] does, and reports the range lost to retention.
    /// Only written records are read: the page ends early (not `complete`) before a record
    /// still on its way to the disk.
    pub fn read_page(
        &mut self,
        key: RoomKey,
        after: u64,
        max_bytes: usize,
        max_msgs: usize,
        out: &mut Vec<StoredMessage>,
    ) -> Result<PageInfo, StorageError> {
        let room = self.room_state(key)?;
        let (head, first) = (room.head, room.first_retained);
        if after >= head {
            return Ok(PageInfo {
                gap: None,
                complete: true,
            });
        }
        let gap = (after + 1 < first).then(|| (after + 1, (first - 1).min(head)));
        let mut next = (after + 1).max(first);
        let (mut taken, mut bytes) = (0usize, 0usize);
        let start = room.extents.partition_point(|e| e.last_seq < next);
        let extents: Vec<_> = room.extents.range(start..).copied().collect();
        let mut buf = std::mem::take(&mut self.scratch);
        let result = (|| {
            for e in extents {
                if (bytes >= max_bytes || taken >= max_msgs) && taken > 0 {
                    break;
                }
                let seg = self.segments.get(&e.segment).ok_or(StorageError::Corrupt {
                    segment: e.segment,
                    offset: e.start,
                })?;
                let end = e.end.min(seg.written);
                if end <= e.start {
                    break;
                }
                buf.clear();
                buf.resize((end - e.start) as usize, 0);
                let n = segment::read_at(&seg.file, e.start, &mut buf)
                    .map_err(|err| StorageError::io(segment::path(&self.dir, e.segment), err))?;
                buf.truncate(n);
                let mut at = 0;
                while at < buf.len() && next <= e.last_seq {
                    let rec = match record::decode(&buf[at..]) {
                        Ok(Some(rec)) => rec,
                        Ok(None) => break,
                        Err(_) => {
                            self.metrics.corrupt_reads += 1;
                            return Err(StorageError::Corrupt {
                                segment: e.segment,
                                offset: e.start + at as u64,
                            });
                        }
                    };
                    at += rec.header.len as usize;
                    let Body::Message {
                        ts_ms,
                        flags,
                        sender,
                        payload,
                        publish_id,
                    } = rec.body
                    else {
                        continue;
                    };
                    if rec.header.key != key || rec.header.seq != next {
                        continue;
                    }
                    if (bytes >= max_bytes || taken >= max_msgs) && taken > 0 {
                        break;
                    }
                    out.push(StoredMessage {
                        seq: next,
                        ts_ms,
                        flags,
                        sender: Text::from(sender),
                        payload: Bytes::copy_from_slice(payload),
                        publish_id,
                    });
                    taken += 1;
                    bytes += payload.len() + 16;
                    next += 1;
                }
                if next <= e.last_seq {
                    // Stopped inside this extent (limits, or not written yet).
                    break;
                }
            }
            Ok(())
        })();
        self.scratch = buf;
        result?;
        Ok(PageInfo {
            gap,
            complete: next > head,
        })
    }
}
