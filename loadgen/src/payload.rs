//! The measurement header every message payload starts with, and the checksum that covers
//! the whole payload.
//!
//! Owns: the layout below, and nothing else. A payload is the header followed by padding up
//! to the configured size:
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 2 | magic `"pg"` |
//! | 2 | 1 | flags: bit 0 = the sender's link had been idle past the threshold |
//! | 3 | 1 | reserved, 0 |
//! | 4 | 8 | intended send time, ns since the run started (little-endian) |
//! | 12 | 4 | sender index (little-endian) |
//! | 16 | 4 | the sender's message counter, from 1 (little-endian) |
//! | 20 | 4 | checksum: FNV-1a (32-bit) of the whole payload with these 4 bytes as zeros |
//! | 24 | ... | padding: bytes derived from (sender, counter) |
//!
//! The checksum covers every byte, header and padding, so a relay (or anything between it
//! and a phone) that changes any byte of a message is caught: FNV-1a tells apart any two
//! payloads of the same length that differ in one byte. The padding is not zeros but a
//! sequence drawn from the sender and counter, so a payload that is cut and spliced from
//! another message does not pass either.
//!
//! The time is the instant the open-loop schedule meant the message to be sent, not the
//! instant it was written: latency measured from it includes any delay on the sending side
//! (no coordinated omission).

use bytes::{BufMut, Bytes, BytesMut};

use crate::link::splitmix64;

/// Length of the header; the smallest payload loadgen sends.
pub const HEADER_LEN: usize = 24;
const MAGIC: [u8; 2] = *b"pg";
const CHECKSUM_AT: usize = 20;
/// Flag: the sender's link had carried nothing for the idle threshold before this message.
pub const FLAG_SENDER_IDLE: u8 = 0b1;

/// The decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Intended send time, ns since the run started.
    pub intended_ns: u64,
    /// The sender's index (phones and channel publishers).
    pub sender: u32,
    /// The sender's counter: its n-th message, from 1.
    pub counter: u32,
    /// [`FLAG_SENDER_IDLE`] and friends.
    pub flags: u8,
}

/// Why a payload is not a well-formed loadgen message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Shorter than the header, or without the magic: not one of loadgen's.
    #[error("not a loadgen payload ({len} bytes, no \"pg\" header)")]
    Foreign {
        /// Its length.
        len: usize,
    },
    /// The header parses but the checksum does not match: some byte was changed.
    #[error(
        "checksum mismatch: sender {sender} #{counter}, {len} bytes, carried {carried:#010x}, \
         computed {computed:#010x}"
    )]
    Corrupted {
        /// The sender the header names (itself possibly corrupted).
        sender: u32,
        /// The counter the header names.
        counter: u32,
        /// Payload length.
        len: usize,
        /// The checksum in the payload.
        carried: u32,
        /// The checksum of what arrived.
        computed: u32,
    },
}

/// FNV-1a, 32-bit, over `bytes` with the checksum field counted as zeros.
fn checksum(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for (i, &b) in bytes.iter().enumerate() {
        let b = if (CHECKSUM_AT..CHECKSUM_AT + 4).contains(&i) {
            0
        } else {
            b
        };
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

impl Header {
    /// A payload of `len` bytes (at least [`HEADER_LEN`]): this header, the padding, and the
    /// checksum over both.
    pub fn payload(&self, len: usize) -> Bytes {
        let len = len.max(HEADER_LEN);
        let mut buf = BytesMut::with_capacity(len);
        buf.put_slice(&MAGIC);
        buf.put_u8(self.flags);
        buf.put_u8(0);
        buf.put_u64_le(self.intended_ns);
        buf.put_u32_le(self.sender);
        buf.put_u32_le(self.counter);
        buf.put_u32_le(0);
        let mut state = (u64::from(self.sender) << 32) | u64::from(self.counter);
        while buf.len() < len {
            state = splitmix64(state);
            let n = (len - buf.len()).min(8);
            buf.put_slice(&state.to_le_bytes()[..n]);
        }
        let sum = checksum(&buf);
        buf[CHECKSUM_AT..CHECKSUM_AT + 4].copy_from_slice(&sum.to_le_bytes());
        buf.freeze()
    }

    /// The header of a payload, once its checksum has been verified.
    pub fn parse(payload: &[u8]) -> Result<Header, PayloadError> {
        let foreign = PayloadError::Foreign { len: payload.len() };
        let head = payload.get(..HEADER_LEN).ok_or(foreign)?;
        if head[..2] != MAGIC {
            return Err(foreign);
        }
        let u32_at =
            |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let mut ns = [0u8; 8];
        ns.copy_from_slice(&head[4..12]);
        let header = Header {
            intended_ns: u64::from_le_bytes(ns),
            sender: u32_at(12),
            counter: u32_at(16),
            flags: head[2],
        };
        let carried = u32_at(CHECKSUM_AT);
        let computed = checksum(payload);
        if carried != computed {
            return Err(PayloadError::Corrupted {
                sender: header.sender,
                counter: header.counter,
                len: payload.len(),
                carried,
                computed,
            });
        }
        Ok(header)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            intended_ns: 123_456_789_012,
            sender: 77,
            counter: 9,
            flags: FLAG_SENDER_IDLE,
        }
    }

    #[test]
    fn round_trips_and_pads() {
        let h = header();
        let p = h.payload(64);
        assert_eq!(p.len(), 64);
        assert_eq!(Header::parse(&p), Ok(h));
        assert_eq!(h.payload(3).len(), HEADER_LEN);
        assert_eq!(Header::parse(&h.payload(3)), Ok(h));
    }

    #[test]
    fn foreign_payloads_are_refused() {
        assert!(matches!(
            Header::parse(b"hello"),
            Err(PayloadError::Foreign { len: 5 })
        ));
        assert!(matches!(
            Header::parse(&[0u8; 40]),
            Err(PayloadError::Foreign { .. })
        ));
    }

    /// Every single byte of the payload is covered: header, checksum field and padding.
    #[test]
    fn any_changed_byte_is_caught() {
        let p = header().payload(200);
        for i in 2..p.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = p.to_vec();
                bad[i] ^= flip;
                assert!(
                    matches!(Header::parse(&bad), Err(PayloadError::Corrupted { .. })),
                    "byte {i} ^ {flip:#x} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn padding_depends_on_the_message() {
        let a = header().payload(64);
        let b = Header {
            counter: 10,
            ..header()
        }
        .payload(64);
        assert_ne!(a[HEADER_LEN..], b[HEADER_LEN..]);
    }
}
