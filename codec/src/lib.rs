//! pabal's wire protocol, versions 1, 2 and 3: a sans-IO, zero-copy codec.
//!
//! [`PROTOCOL.md`](https://example.invalid/pabal/codec/PROTOCOL.md) (next to this crate's
//! manifest) is the normative specification; this crate implements it.
//!
//! - [`decode::Decoder`] splits frames off a read buffer (`BytesMut`) without copying: the
//!   payloads and strings of the frames it returns are slices of that buffer.
//! - [`frame`] holds every frame of both directions, with `encode` and `parse`.
//! - [`frame::DeliverHeader`] is the per-recipient part of a delivery: a relay writes one
//!   small header per connection and shares the payload's `Bytes` among all recipients.
//! - [`session`] tracks the per-connection state that keeps frames small (aliases, implicit
//!   sequences, sender aliases, time deltas), for the relay and for clients.
//!
//! Owns: bytes and frames. Must not touch: sockets, threads, clocks, allocation sized by a
//! peer before a limit check. Every malformed input is a typed [`error::DecodeError`].

#![forbid(unsafe_code)]

pub mod decode;
pub mod error;
pub mod frame;
pub mod limits;
mod reader;
pub mod receipt;
pub mod session;
pub mod text;
pub mod varint;

pub use decode::{Decoder, Framing};
pub use error::{DecodeError, ErrorCode, GoAwayReason, LeftReason, SessionError};
pub use frame::{
    Ack, ClientFrame, Deliver, DeliverHeader, ErrorFrame, Gap, GoAway, Hello, Left,
    PROTOCOL_VERSION, Ping, Pong, PubAck, Publish, Read, Receipt, ReceiptEntry, ResumeEntry,
    ResumeList, Room, SUPPORTED_VERSIONS, ServerFrame, Subscribe, Unsubscribe, Welcome,
};
pub use limits::Limits;
pub use session::{
    ClientSession, DeliverContext, Event, MemberMarkers, RoomState, SenderAliases, room_id,
};
pub use text::{SenderId, Text};
