//! The frames protocol version 3 adds (PROTOCOL.md §5, §12): READ (client → relay), the
//! user read a room up to a sequence; RECEIPT (relay → client), members' delivered and read
//! markers in one room. Their layout is written here once; [`crate::frame`] dispatches to it.
//!
//! Owns: the bodies of READ and RECEIPT. Must not touch: framing, per-connection state
//! (RECEIPT's member references live in the connection's sender table, [`crate::session`]).

use bytes::BufMut;

use crate::error::DecodeError;
use crate::limits::Limits;
use crate::reader::Reader;
use crate::text::Text;
use crate::varint::{len_u64, put_u64};

/// READ (version 3): the user read every message of `alias` up to `seq` (cumulative).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    /// The room.
    pub alias: u32,
    /// Read up to this sequence.
    pub seq: u64,
}

impl Read {
    pub(crate) fn fields_len(&self) -> usize {
        len_u64(u64::from(self.alias)) + len_u64(self.seq)
    }

    pub(crate) fn put_fields(&self, dst: &mut impl BufMut) {
        put_u64(dst, u64::from(self.alias));
        put_u64(dst, self.seq);
    }

    pub(crate) fn parse_fields(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let alias = r.varint_u32("alias")?;
        let seq = r.varint("read sequence")?;
        r.finish("READ")?;
        Ok(Read { alias, seq })
    }
}

/// One member's markers in a RECEIPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptEntry {
    /// The member's slot in the connection's sender table (PROTOCOL.md §10).
    pub member_alias: u32,
    /// The member's user id when this entry (re)defines the slot.
    pub new_member: Option<Text>,
    /// Delivered to one of the member's connections up to this sequence.
    pub delivered: u64,
    /// Read up to this sequence (never past `delivered`).
    pub read: u64,
}

impl ReceiptEntry {
    /// The `member` field: the slot, shifted left, with the low bit set when a name follows.
    fn member_field(&self) -> u64 {
        (u64::from(self.member_alias) << 1) | u64::from(self.new_member.is_some())
    }

    /// Its length within a RECEIPT's body.
    pub fn encoded_len(&self) -> usize {
        len_u64(self.member_field())
            + self
                .new_member
                .as_ref()
                .map_or(0, |t| len_u64(t.len() as u64) + t.len())
            + len_u64(self.delivered)
            + len_u64(self.delivered.saturating_sub(self.read))
    }
}

/// RECEIPT (version 3): for one room, members' delivered and read markers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The room.
    pub alias: u32,
    /// At least one.
    pub entries: Vec<ReceiptEntry>,
}

impl Receipt {
    pub(crate) fn fields_len(&self) -> usize {
        len_u64(u64::from(self.alias))
            + self
                .entries
                .iter()
                .map(ReceiptEntry::encoded_len)
                .sum::<usize>()
    }

    pub(crate) fn put_fields(&self, dst: &mut impl BufMut) {
        put_u64(dst, u64::from(self.alias));
        for e in &self.entries {
            put_u64(dst, e.member_field());
            if let Some(name) = &e.new_member {
                put_u64(dst, name.len() as u64);
                dst.put_slice(name.as_bytes());
            }
            put_u64(dst, e.delivered);
            put_u64(dst, e.delivered.saturating_sub(e.read));
        }
    }

    pub(crate) fn parse_fields(r: &mut Reader<'_>, limits: &Limits) -> Result<Self, DecodeError> {
        let alias = r.varint_u32("alias")?;
        let mut entries = Vec::new();
        while !r.is_empty() {
            let member = r.varint("receipt member")?;
            let member_alias = u32::try_from(member >> 1).map_err(|_| DecodeError::Invalid {
                field: "receipt member",
                why: "slot past 2^32",
            })?;
            let new_member = if member & 1 != 0 {
                Some(r.name("receipt member name", limits.max_name_len)?)
            } else {
                None
            };
            let delivered = r.varint("receipt delivered")?;
            let unread = r.varint("receipt unread")?;
            let read = delivered.checked_sub(unread).ok_or(DecodeError::Invalid {
                field: "receipt unread",
                why: "read before sequence 0",
            })?;
            entries.push(ReceiptEntry {
                member_alias,
                new_member,
                delivered,
                read,
            });
        }
        if entries.is_empty() {
            return Err(DecodeError::Invalid {
                field: "RECEIPT",
                why: "no entries",
            });
        }
        Ok(Receipt { alias, entries })
    }
}
