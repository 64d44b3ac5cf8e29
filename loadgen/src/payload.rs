//! The measurement header every message payload starts with.
//!
//! Owns: the layout below, and nothing else. A payload is the header followed by zero
//! padding up to the configured size:
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 2 | magic `"pg"` |
//! | 2 | 1 | flags: bit 0 = the sender's link had been idle past the threshold |
//! | 3 | 1 | reserved, 0 |
//! | 4 | 8 | intended send time, ns since the run started (little-endian) |
//! | 12 | 4 | sender index (little-endian) |
//! | 16 | 4 | the sender's message counter, from 1 (little-endian) |
//!
//! The time is the instant the open-loop schedule meant the message to be sent, not the
//! instant it was written: latency measured from it includes any delay on the sending side
//! (no coordinated omission).

use bytes::{BufMut, Bytes, BytesMut};

/// Length of the header; the smallest payload loadgen sends.
pub const HEADER_LEN: usize = 20;
const MAGIC: [u8; 2] = *b"pg";
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

impl Header {
    /// A payload of `len` bytes (at least [`HEADER_LEN`]): this header, then zeros.
    pub fn payload(&self, len: usize) -> Bytes {
        let mut buf = BytesMut::with_capacity(len.max(HEADER_LEN));
        buf.put_slice(&MAGIC);
        buf.put_u8(self.flags);
        buf.put_u8(0);
        buf.put_u64_le(self.intended_ns);
        buf.put_u32_le(self.sender);
        buf.put_u32_le(self.counter);
        buf.resize(len.max(HEADER_LEN), 0);
        buf.freeze()
    }

    /// The header of a payload, or `None` if it is not one of loadgen's.
    pub fn parse(payload: &[u8]) -> Option<Header> {
        let head = payload.get(..HEADER_LEN)?;
        if head[..2] != MAGIC {
            return None;
        }
        let u32_at =
            |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let mut ns = [0u8; 8];
        ns.copy_from_slice(&head[4..12]);
        Some(Header {
            intended_ns: u64::from_le_bytes(ns),
            sender: u32_at(12),
            counter: u32_at(16),
            flags: head[2],
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_pads() {
        let h = Header {
            intended_ns: 123_456_789_012,
            sender: 77,
            counter: 9,
            flags: FLAG_SENDER_IDLE,
        };
        let p = h.payload(64);
        assert_eq!(p.len(), 64);
        assert_eq!(Header::parse(&p), Some(h));
        assert_eq!(h.payload(3).len(), HEADER_LEN);
    }

    #[test]
    fn foreign_payloads_are_refused() {
        assert_eq!(Header::parse(b"hello"), None);
        assert_eq!(Header::parse(&[0u8; 40]), None);
    }
}
