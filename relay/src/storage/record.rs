//! The on-disk record: one entry of a worker's log, length-prefixed, little-endian, with two
//! crc32c checksums (one over the fixed header, one over the body).
//!
//! Owns: encoding and decoding records, and the [`Body`] kinds. Must not touch files: it
//! reads and writes byte slices only. Decoding never panics and never trusts a length before
//! the header checksum has vouched for it.
//!
//! Layout (version 1, every integer little-endian):
//!
//! ```text
//! offset size field
//!  0     4    len          whole record, header included (HEADER_LEN ..= MAX_RECORD_LEN)
//!  4     4    header_crc   crc32c of bytes 0..4 and 8..40
//!  8     4    body_crc     crc32c of bytes 40..len
//! 12     1    kind         Body's tag
//! 13     1    flags        HAS_NAME | CHANNEL | COPY | PUBLISH_ID
//! 14     2    reserved     zero
//! 16     8    lsn          the log sequence number: consecutive within a worker's log
//! 24     8    key          the room's key in this log (its 64-bit id unless that collides)
//! 32     8    seq          message: its sequence; epoch: the head the epoch starts after;
//!                          join: the join point's sequence; copy end: the last copied seq;
//!                          markers: the member's delivered marker
//! 40     ..   body         [name: u16 len + UTF-8, when HAS_NAME] then the kind's fields
//! ```
//!
//! A message's fields: ts_ms u64, flags u8, [publisher u64, msg_id u64 when PUBLISH_ID: its
//! publish id, protocol v2], sender (u16 len + UTF-8), payload (the rest). A log written
//! before PUBLISH_ID existed reads the same: the flag is clear in all its records.
//! A member's markers (receipts): epoch u64, read u64, user (u16 len + UTF-8); a log
//! written before they existed simply has none.
//!
//! Why two checksums: when only the body is damaged, the header still names the record's
//! room and length exactly, so recovery knows which room lost what and where the next
//! record starts. A damaged header names nothing; recovery then resynchronises on the next
//! record whose header checks out. crc32c rather than xxh3: it is computed by one CPU
//! instruction per 8 bytes (SSE4.2, ARMv8 CRC), it is what Kafka, ext4 and iSCSI use for
//! the same job, and as an error-detecting code it guarantees to catch every burst of up to
//! 32 bits, which a general-purpose hash does not promise.

use thiserror::Error;

/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 40;
/// The largest record accepted: a length above it is damage, not a record.
pub const MAX_RECORD_LEN: usize = 1 << 20;
/// Longest name, user id or sender stored (they are u16-length-prefixed).
pub const MAX_TEXT_LEN: usize = u16::MAX as usize;

/// The record carries its room's name (the room's first record in this segment).
pub const FLAG_HAS_NAME: u8 = 0x01;
/// The named room is a broadcast channel.
pub const FLAG_CHANNEL: u8 = 0x02;
/// A message copied forward by compaction (the same message, at a new place).
pub const FLAG_COPY: u8 = 0x04;
/// A message carries its publish id (derived from [`Body::Message`]'s `publish_id`).
pub const FLAG_PUBLISH_ID: u8 = 0x08;
const KNOWN_FLAGS: u8 = FLAG_HAS_NAME | FLAG_CHANNEL | FLAG_COPY | FLAG_PUBLISH_ID;

const KIND_MESSAGE: u8 = 1;
const KIND_EPOCH: u8 = 2;
const KIND_JOIN: u8 = 3;
const KIND_LEAVE: u8 = 4;
const KIND_BLOCK: u8 = 5;
const KIND_COPY_END: u8 = 6;
const KIND_DROP: u8 = 7;
const KIND_MARKERS: u8 = 8;

/// What a record says. Borrowed from the buffer it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'a> {
    /// A message accepted into the room; the header's `seq` is its sequence.
    Message {
        /// Accepted at, ms since the Unix epoch.
        ts_ms: u64,
        /// The core's flags for the message.
        flags: u8,
        /// Who published it.
        sender: &'a str,
        /// The payload, as published.
        payload: &'a [u8],
        /// Protocol v2: the publish id (publisher, msg_id) the room recognises repeats by.
        publish_id: Option<(u64, u64)>,
    },
    /// The room starts a new stream: epoch `epoch`, sequences after the header's `seq`.
    Epoch {
        /// The new epoch.
        epoch: u64,
    },
    /// `user` joined (or subscribed to) the room; join point (`epoch`, header `seq`).
    Join {
        /// The room's epoch at the join.
        epoch: u64,
        /// The member.
        user: &'a str,
    },
    /// `user` left (or was removed from) the room.
    Leave {
        /// The former member.
        user: &'a str,
    },
    /// `user` blocked (or unblocked) the channel.
    Block {
        /// Blocked (true) or unblocked (false).
        blocked: bool,
        /// The user.
        user: &'a str,
    },
    /// Closes a compaction run: the room's messages `first_seq..=` header `seq` were copied
    /// forward just before this record and replace the older copies.
    CopyEnd {
        /// First sequence copied.
        first_seq: u64,
    },
    /// The room was dropped: forget its state and history.
    Drop,
    /// A member's receipts markers in the room's stream `epoch`: delivered up to the
    /// header's `seq`, read up to `read` (cumulative: the highest stands).
    Markers {
        /// The stream the sequences belong to.
        epoch: u64,
        /// Read up to.
        read: u64,
        /// The member.
        user: &'a str,
    },
}

impl Body<'_> {
    /// The header flags the body implies.
    fn flags(&self) -> u8 {
        match self {
            Body::Message {
                publish_id: Some(_),
                ..
            } => FLAG_PUBLISH_ID,
            _ => 0,
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Body::Message { .. } => KIND_MESSAGE,
            Body::Epoch { .. } => KIND_EPOCH,
            Body::Join { .. } => KIND_JOIN,
            Body::Leave { .. } => KIND_LEAVE,
            Body::Block { .. } => KIND_BLOCK,
            Body::CopyEnd { .. } => KIND_COPY_END,
            Body::Drop => KIND_DROP,
            Body::Markers { .. } => KIND_MARKERS,
        }
    }
}

/// The fixed header, once its checksum has been verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Whole record length.
    pub len: u32,
    /// Checksum of the body.
    pub body_crc: u32,
    /// Body kind tag.
    pub kind: u8,
    /// `FLAG_*`.
    pub flags: u8,
    /// Log sequence number.
    pub lsn: u64,
    /// Room key.
    pub key: u64,
    /// Sequence (meaning depends on the kind).
    pub seq: u64,
}

/// A decoded record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// The verified header.
    pub header: Header,
    /// The room's name and whether it is a channel, when the record carries it.
    pub name: Option<(bool, &'a str)>,
    /// What it says.
    pub body: Body<'a>,
}

/// Why bytes are not a record. Damage, never a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RecordError {
    /// The header does not check out: its length and room cannot be trusted.
    #[error("record header damaged")]
    BadHeader,
    /// The header checks out but the body does not: the record's room and length are known.
    #[error("record body damaged (lsn {}, room key {:#x})", .0.lsn, .0.key)]
    BadBody(Header),
}

/// A record to append. Texts longer than [`MAX_TEXT_LEN`] must be refused by the caller.
#[derive(Debug, Clone, Copy)]
pub struct NewRecord<'a> {
    /// Its log sequence number.
    pub lsn: u64,
    /// The room key.
    pub key: u64,
    /// The header's sequence field.
    pub seq: u64,
    /// `FLAG_COPY` or 0 (name flags are derived from `name`).
    pub flags: u8,
    /// The room's name, to carry in this record.
    pub name: Option<(bool, &'a str)>,
    /// What it says.
    pub body: Body<'a>,
}

impl<'a> NewRecord<'a> {
    /// The record as it will decode, given its encoded length (for applying it to the
    /// state without decoding what was just encoded).
    pub fn as_record(&self, len: usize) -> Record<'a> {
        let mut flags = (self.flags & FLAG_COPY) | self.body.flags();
        if let Some((channel, _)) = self.name {
            flags |= FLAG_HAS_NAME | if channel { FLAG_CHANNEL } else { 0 };
        }
        Record {
            header: Header {
                len: len as u32,
                body_crc: 0,
                kind: self.body.kind(),
                flags,
                lsn: self.lsn,
                key: self.key,
                seq: self.seq,
            },
            name: self.name,
            body: self.body,
        }
    }
}

/// Bytes [`encode`] writes for `rec`.
pub fn encoded_len(rec: &NewRecord<'_>) -> usize {
    let name = rec.name.map_or(0, |(_, n)| 2 + n.len());
    let body = match rec.body {
        Body::Message {
            sender,
            payload,
            publish_id,
            ..
        } => 8 + 1 + publish_id.map_or(0, |_| 16) + 2 + sender.len() + payload.len(),
        Body::Epoch { .. } | Body::CopyEnd { .. } => 8,
        Body::Join { user, .. } => 8 + 2 + user.len(),
        Body::Leave { user } => 2 + user.len(),
        Body::Block { user, .. } => 1 + 2 + user.len(),
        Body::Drop => 0,
        Body::Markers { user, .. } => 16 + 2 + user.len(),
    };
    HEADER_LEN + name + body
}

/// Appends `rec` to `out`; returns its length. The caller keeps texts within
/// [`MAX_TEXT_LEN`] and the whole within [`MAX_RECORD_LEN`] (see [`encoded_len`]).
pub fn encode(rec: &NewRecord<'_>, out: &mut Vec<u8>) -> usize {
    fn text(out: &mut Vec<u8>, t: &str) {
        let len = t.len().min(MAX_TEXT_LEN);
        out.extend_from_slice(&(len as u16).to_le_bytes());
        out.extend_from_slice(&t.as_bytes()[..len]);
    }
    let start = out.len();
    let mut flags = (rec.flags & FLAG_COPY) | rec.body.flags();
    if let Some((channel, _)) = rec.name {
        flags |= FLAG_HAS_NAME;
        if channel {
            flags |= FLAG_CHANNEL;
        }
    }
    out.extend_from_slice(&[0u8; 12]);
    out.push(rec.body.kind());
    out.push(flags);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&rec.lsn.to_le_bytes());
    out.extend_from_slice(&rec.key.to_le_bytes());
    out.extend_from_slice(&rec.seq.to_le_bytes());
    if let Some((_, name)) = rec.name {
        text(out, name);
    }
    match rec.body {
        Body::Message {
            ts_ms,
            flags,
            sender,
            payload,
            publish_id,
        } => {
            out.extend_from_slice(&ts_ms.to_le_bytes());
            out.push(flags);
            if let Some((publisher, msg_id)) = publish_id {
                out.extend_from_slice(&publisher.to_le_bytes());
                out.extend_from_slice(&msg_id.to_le_bytes());
            }
            text(out, sender);
            out.extend_from_slice(payload);
        }
        Body::Epoch { epoch } => out.extend_from_slice(&epoch.to_le_bytes()),
        Body::Join { epoch, user } => {
            out.extend_from_slice(&epoch.to_le_bytes());
            text(out, user);
        }
        Body::Leave { user } => text(out, user),
        Body::Block { blocked, user } => {
            out.push(u8::from(blocked));
            text(out, user);
        }
        Body::CopyEnd { first_seq } => out.extend_from_slice(&first_seq.to_le_bytes()),
        Body::Drop => {}
        Body::Markers { epoch, read, user } => {
            out.extend_from_slice(&epoch.to_le_bytes());
            out.extend_from_slice(&read.to_le_bytes());
            text(out, user);
        }
    }
    let len = out.len() - start;
    let rec_bytes = &mut out[start..];
    rec_bytes[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    let body_crc = crc32c::crc32c(&rec_bytes[HEADER_LEN..]);
    rec_bytes[8..12].copy_from_slice(&body_crc.to_le_bytes());
    let header_crc = header_crc(rec_bytes);
    rec_bytes[4..8].copy_from_slice(&header_crc.to_le_bytes());
    len
}

fn header_crc(bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&bytes[0..4]), &bytes[8..HEADER_LEN])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

/// Verifies and returns the header at the start of `buf`: `Ok(None)` when fewer than
/// [`HEADER_LEN`] bytes are there (the caller needs more, or the log ends torn).
pub fn decode_header(buf: &[u8]) -> Result<Option<Header>, RecordError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32_at(buf, 0);
    if u32_at(buf, 4) != header_crc(buf)
        || !(HEADER_LEN..=MAX_RECORD_LEN).contains(&(len as usize))
        || !(KIND_MESSAGE..=KIND_MARKERS).contains(&buf[12])
        || buf[13] & !KNOWN_FLAGS != 0
        || buf[14] != 0
        || buf[15] != 0
    {
        return Err(RecordError::BadHeader);
    }
    Ok(Some(Header {
        len,
        body_crc: u32_at(buf, 8),
        kind: buf[12],
        flags: buf[13],
        lsn: u64_at(buf, 16),
        key: u64_at(buf, 24),
        seq: u64_at(buf, 32),
    }))
}

/// Decodes the record at the start of `buf`: `Ok(None)` when `buf` holds only part of it.
pub fn decode(buf: &[u8]) -> Result<Option<Record<'_>>, RecordError> {
    let Some(header) = decode_header(buf)? else {
        return Ok(None);
    };
    let len = header.len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[HEADER_LEN..len];
    if crc32c::crc32c(body) != header.body_crc {
        return Err(RecordError::BadBody(header));
    }
    // A body that checks out but does not parse was written by something else: damage.
    parse_body(header, body)
        .map(Some)
        .ok_or(RecordError::BadBody(header))
}

/// A bounded reader over bytes read back from disk: every read checks the remaining length
/// first and says `None` rather than panicking.
#[derive(Debug)]
pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    pub(super) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub(super) fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32_at(b, 0))
    }
    pub(super) fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64_at(b, 0))
    }
    pub(super) fn text(&mut self) -> Option<&'a str> {
        let len = self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))?;
        std::str::from_utf8(self.take(len as usize)?).ok()
    }
}

fn parse_body(header: Header, body: &[u8]) -> Option<Record<'_>> {
    let mut r = Reader(body);
    let name = if header.flags & FLAG_HAS_NAME != 0 {
        Some((header.flags & FLAG_CHANNEL != 0, r.text()?))
    } else {
        None
    };
    let body = match header.kind {
        KIND_MESSAGE => Body::Message {
            ts_ms: r.u64()?,
            flags: r.u8()?,
            publish_id: if header.flags & FLAG_PUBLISH_ID != 0 {
                Some((r.u64()?, r.u64()?))
            } else {
                None
            },
            sender: r.text()?,
            payload: std::mem::take(&mut r.0),
        },
        // Only a message carries a publish id.
        _ if header.flags & FLAG_PUBLISH_ID != 0 => return None,
        KIND_EPOCH => Body::Epoch { epoch: r.u64()? },
        KIND_JOIN => Body::Join {
            epoch: r.u64()?,
            user: r.text()?,
        },
        KIND_LEAVE => Body::Leave { user: r.text()? },
        KIND_BLOCK => Body::Block {
            blocked: match r.u8()? {
                0 => false,
                1 => true,
                _ => return None,
            },
            user: r.text()?,
        },
        KIND_COPY_END => Body::CopyEnd {
            first_seq: r.u64()?,
        },
        KIND_DROP => Body::Drop,
        KIND_MARKERS => Body::Markers {
            epoch: r.u64()?,
            read: r.u64()?,
            user: r.text()?,
        },
        _ => return None,
    };
    r.0.is_empty().then_some(Record { header, name, body })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    use super::*;

    fn samples() -> Vec<NewRecord<'static>> {
        let body = [
            Body::Message {
                ts_ms: 1_700_000_000_000,
                flags: 3,
                sender: "alice",
                payload: b"hello world",
                publish_id: None,
            },
            Body::Message {
                ts_ms: 1_700_000_000_001,
                flags: 0,
                sender: "bob",
                payload: b"exactly once",
                publish_id: Some((0xfeed_f00d, 42)),
            },
            Body::Epoch { epoch: 42 },
            Body::Join {
                epoch: 7,
                user: "bob",
            },
            Body::Leave { user: "bob" },
            Body::Block {
                blocked: true,
                user: "carol",
            },
            Body::CopyEnd { first_seq: 5 },
            Body::Drop,
            Body::Markers {
                epoch: 7,
                read: 40,
                user: "dave",
            },
        ];
        body.iter()
            .enumerate()
            .map(|(i, b)| NewRecord {
                lsn: i as u64 + 1,
                key: 0xdead_beef,
                seq: 9,
                flags: if i == 0 { FLAG_COPY } else { 0 },
                name: (i % 2 == 0).then_some((i % 4 == 0, "room:é")),
                body: *b,
            })
            .collect()
    }

    #[test]
    fn every_kind_round_trips() {
        for rec in samples() {
            let mut out = vec![0xAA]; // records append after what is there
            let len = encode(&rec, &mut out);
            assert_eq!(len, encoded_len(&rec));
            let got = decode(&out[1..]).unwrap().unwrap();
            assert_eq!(got.header.len as usize, len);
            assert_eq!(
                (got.header.lsn, got.header.key, got.header.seq),
                (rec.lsn, rec.key, 9)
            );
            assert_eq!(got.name, rec.name);
            assert_eq!(got.body, rec.body);
            assert_eq!(got.header.flags & FLAG_COPY, rec.flags);
            // Every strict prefix is "need more", never an error or a record.
            for cut in 0..len {
                assert_eq!(decode(&out[1..1 + cut]), Ok(None), "cut at {cut}");
            }
        }
    }

    #[test]
    fn a_flipped_body_byte_names_the_room_and_a_flipped_header_byte_names_nothing() {
        let rec = samples()[0];
        let mut out = Vec::new();
        encode(&rec, &mut out);
        for at in 0..out.len() {
            let mut bad = out.clone();
            bad[at] ^= 0x10;
            match decode(&bad) {
                Err(RecordError::BadBody(h)) => {
                    assert!(at >= HEADER_LEN, "{at}");
                    assert_eq!((h.key, h.lsn), (rec.key, rec.lsn));
                }
                Err(RecordError::BadHeader) => assert!(at < HEADER_LEN, "{at}"),
                other => panic!("flip at {at} gave {other:?}"),
            }
        }
    }

    #[test]
    fn random_and_damaged_bytes_never_panic_nor_forge_a_record() {
        let mut rng = SmallRng::seed_from_u64(12);
        let mut valid = Vec::new();
        let mut originals = Vec::new();
        for rec in samples() {
            let start = valid.len();
            encode(&rec, &mut valid);
            originals.push(valid[start..].to_vec());
        }
        let (mut random_accepted, mut damaged_accepted) = (0, 0);
        for round in 0..20_000 {
            let random = round % 2 == 0;
            let buf: Vec<u8> = if random {
                (0..rng.random_range(0..200))
                    .map(|_| rng.random())
                    .collect()
            } else {
                // Valid records with random damage: overwritten bytes, then truncation.
                let mut b = valid.clone();
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..b.len());
                    b[at] = rng.random();
                }
                b.truncate(rng.random_range(0..=b.len()));
                b
            };
            // Walk the buffer as recovery would: decode, skip by the verified length.
            let mut at = 0;
            while at < buf.len() {
                match decode(&buf[at..]) {
                    Ok(Some(r)) => {
                        let bytes = &buf[at..at + r.header.len as usize];
                        if random {
                            random_accepted += 1;
                        } else {
                            damaged_accepted += 1;
                            assert!(originals.iter().any(|o| o == bytes), "forged at {at}");
                        }
                        at += r.header.len as usize;
                    }
                    Ok(None) => break,
                    Err(RecordError::BadBody(h)) => at += h.len as usize,
                    Err(RecordError::BadHeader) => at += 1,
                }
            }
        }
        assert_eq!(random_accepted, 0);
        // The undamaged records of the damaged half still decode.
        assert!(damaged_accepted > 10_000, "{damaged_accepted}");
    }
}
