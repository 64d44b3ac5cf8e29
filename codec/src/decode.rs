//! Framing: splitting complete frames off a read buffer without copying them.
//!
//! Owns: the length prefix and the frame-size limit. A frame is a varint body length
//! followed by the body; the body starts with the type byte. [`Decoder`] never looks at
//! more than one frame at a time and never buffers anything itself: the caller owns the
//! read buffer, appends to it what the socket gave, and asks for frames.

use bytes::{Bytes, BytesMut};

use crate::error::DecodeError;
use crate::frame::{ClientFrame, ServerFrame};
use crate::limits::Limits;
use crate::varint::{self, Partial};

/// Splits frames off a read buffer and parses them, zero-copy: payloads and strings in the
/// returned frames are slices of the buffer's memory.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    limits: Limits,
}

/// Result of looking for the next frame in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// A whole frame: its length prefix takes `header` bytes and its body `body`.
    Ready { header: usize, body: usize },
    /// Not a whole frame yet; at least this many more bytes are needed.
    NeedMore(usize),
}

impl Decoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Decoder { limits }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Looks at the start of `buf` for a complete frame. An oversized length is an error as
    /// soon as the prefix is read, before the body arrives.
    pub fn framing(&self, buf: &[u8]) -> Result<Framing, DecodeError> {
        match varint::get_u64(buf)? {
            Partial::NeedMore => Ok(Framing::NeedMore(1)),
            Partial::Done(0, _) => Err(DecodeError::EmptyFrame),
            Partial::Done(len, header) => {
                if len > self.limits.max_frame_len as u64 {
                    return Err(DecodeError::FrameTooLarge {
                        len,
                        max: self.limits.max_frame_len,
                    });
                }
                let body = len as usize;
                let have = buf.len() - header;
                if have < body {
                    Ok(Framing::NeedMore(body - have))
                } else {
                    Ok(Framing::Ready { header, body })
                }
            }
        }
    }

    /// Splits the next complete frame's body off the front of `buf`, or `None` if the
    /// buffer does not hold a whole frame yet (the buffer is then left untouched).
    pub fn next_body(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, DecodeError> {
        match self.framing(buf)? {
            Framing::NeedMore(_) => Ok(None),
            Framing::Ready { header, body } => {
                let mut frame = buf.split_to(header + body);
                let _ = frame.split_to(header);
                Ok(Some(frame.freeze()))
            }
        }
    }

    /// The next frame a client sent, if `buf` holds a whole one.
    pub fn decode_client(&self, buf: &mut BytesMut) -> Result<Option<ClientFrame>, DecodeError> {
        match self.next_body(buf)? {
            Some(body) => ClientFrame::parse(body, &self.limits).map(Some),
            None => Ok(None),
        }
    }

    /// The next frame the relay sent, if `buf` holds a whole one.
    pub fn decode_server(&self, buf: &mut BytesMut) -> Result<Option<ServerFrame>, DecodeError> {
        match self.next_body(buf)? {
            Some(body) => ServerFrame::parse(body, &self.limits).map(Some),
            None => Ok(None),
        }
    }
}
