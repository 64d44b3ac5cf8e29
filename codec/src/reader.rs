//! A bounded reader over one frame body: every read checks the remaining length first and
//! every byte-string field is a zero-copy slice of the body.
//!
//! Owns: field-level parsing. Touches nothing outside the body it was given.

use bytes::Bytes;

use crate::error::DecodeError;
use crate::text::Text;
use crate::varint::{self, Partial};

#[derive(Debug)]
pub(crate) struct Reader<'a> {
    body: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(body: &'a Bytes, pos: usize) -> Self {
        Reader { body, pos }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.body.len() - self.pos
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        let byte = *self
            .body
            .get(self.pos)
            .ok_or(DecodeError::Truncated { field })?;
        self.pos += 1;
        Ok(byte)
    }

    pub(crate) fn varint(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        match varint::get_u64(&self.body[self.pos..])? {
            Partial::Done(v, n) => {
                self.pos += n;
                Ok(v)
            }
            Partial::NeedMore => Err(DecodeError::Truncated { field }),
        }
    }

    pub(crate) fn varint_u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let v = self.varint(field)?;
        u32::try_from(v).map_err(|_| DecodeError::OutOfRange { field, value: v })
    }

    pub(crate) fn u64_le(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let end = self.pos + 8;
        let raw = self
            .body
            .get(self.pos..end)
            .ok_or(DecodeError::Truncated { field })?;
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(raw);
        self.pos = end;
        Ok(u64::from_le_bytes(bytes))
    }

    /// A varint length followed by that many bytes; the length is checked against `max` and
    /// the remaining body before anything is sliced.
    pub(crate) fn len_prefixed(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<Bytes, DecodeError> {
        let len = self.varint(field)?;
        if len > max as u64 {
            return Err(DecodeError::TooLong { field, len, max });
        }
        let len = len as usize;
        if len > self.remaining() {
            return Err(DecodeError::Truncated { field });
        }
        let out = self.body.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    pub(crate) fn text(&mut self, field: &'static str, max: usize) -> Result<Text, DecodeError> {
        let raw = self.len_prefixed(field, max)?;
        Text::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8 { field })
    }

    /// A non-empty name.
    pub(crate) fn name(&mut self, field: &'static str, max: usize) -> Result<Text, DecodeError> {
        let text = self.text(field, max)?;
        if text.is_empty() {
            return Err(DecodeError::Invalid {
                field,
                why: "empty",
            });
        }
        Ok(text)
    }

    /// A slice of the body between two positions already read.
    pub(crate) fn slice(&self, start: usize, end: usize) -> Bytes {
        self.body.slice(start..end)
    }

    /// Everything left: an open-ended tail such as a payload.
    pub(crate) fn rest(&mut self) -> Bytes {
        let out = self.body.slice(self.pos..);
        self.pos = self.body.len();
        out
    }

    pub(crate) fn finish(&self, frame: &'static str) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes { frame, extra }),
        }
    }
}
