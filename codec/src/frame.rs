//! Every frame of protocol v1, v2 and v3, in both directions: its layout, how it is written and how it
//! is parsed. PROTOCOL.md is the normative description; this module is its implementation,
//! and each frame's layout is written here exactly once.
//!
//! Owns: frame bodies (the bytes after the length prefix). Framing (the length prefix,
//! limits on whole frames, buffering) belongs to [`crate::decode`]; per-connection state
//! (aliases, cursors, sender tables) to [`crate::session`].

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, ErrorCode, GoAwayReason, LeftReason};
use crate::limits::Limits;
use crate::reader::Reader;
pub use crate::receipt::{Read, Receipt, ReceiptEntry};
use crate::text::{SenderId, Text};
use crate::varint::{len_u64, put_u64, unzigzag, zigzag};

/// The newest protocol version this crate speaks: what a client offers first.
pub const PROTOCOL_VERSION: u8 = 3;

/// Every protocol version this crate speaks, oldest first. Version 2 adds HELLO's device id
/// (PROTOCOL.md §5): a PUBLISH's `msg_id` then names the message across reconnects.
/// Version 3 adds receipts: READ from the client, RECEIPT from the relay.
pub const SUPPORTED_VERSIONS: [u8; 3] = [1, 2, 3];

/// Frame type codes: the low 5 bits of a frame's first body byte. The high 3 bits are flags
/// whose meaning depends on the type.
pub mod kind {
    /// Client: opens the session.
    pub const HELLO: u8 = 0x01;
    /// Client: subscribe to a channel or join a room by name.
    pub const SUBSCRIBE: u8 = 0x02;
    /// Client: unsubscribe (or leave, or block) by alias.
    pub const UNSUBSCRIBE: u8 = 0x03;
    /// Client: publish into a room or channel.
    pub const PUBLISH: u8 = 0x04;
    /// Client: cumulative acknowledgements of received sequences.
    pub const ACK: u8 = 0x05;
    /// Both: heartbeat request, optionally negotiating the interval.
    pub const PING: u8 = 0x06;
    /// Both: heartbeat answer.
    pub const PONG: u8 = 0x07;
    /// Client: closing the session on purpose.
    pub const BYE: u8 = 0x08;
    /// Client (version 3): the user read a room up to a sequence.
    pub const READ: u8 = 0x09;
    /// Server: the session is open.
    pub const WELCOME: u8 = 0x10;
    /// Server: an alias is bound to a room or channel.
    pub const ROOM: u8 = 0x11;
    /// Server: an alias is unbound.
    pub const LEFT: u8 = 0x12;
    /// Server: a publish was accepted, with its sequence.
    pub const PUBACK: u8 = 0x13;
    /// Server: a message.
    pub const DELIVER: u8 = 0x14;
    /// Server: a range of sequences that cannot be delivered.
    pub const GAP: u8 = 0x15;
    /// Server: an error.
    pub const ERROR: u8 = 0x16;
    /// Server: the connection is about to close; reconnect later.
    pub const GOAWAY: u8 = 0x17;
    /// Relay (version 3): members' delivered and read markers in one room.
    pub const RECEIPT: u8 = 0x18;
}

const TYPE_MASK: u8 = 0x1f;
const FLAG_SHIFT: u32 = 5;

/// Splits a frame's first body byte into its type and flag bits.
#[inline]
pub const fn split_type_byte(b: u8) -> (u8, u8) {
    (b & TYPE_MASK, b >> FLAG_SHIFT)
}

#[inline]
const fn type_byte(kind: u8, flags: u8) -> u8 {
    kind | (flags << FLAG_SHIFT)
}

fn check_flags(frame: &'static str, flags: u8, defined: u8) -> Result<(), DecodeError> {
    if flags & !defined != 0 {
        return Err(DecodeError::UndefinedFlags { frame, flags });
    }
    Ok(())
}

#[inline]
fn text_len(t: &Text) -> usize {
    bytes_len(t.as_bytes())
}

#[inline]
fn bytes_len(b: &[u8]) -> usize {
    len_u64(b.len() as u64) + b.len()
}

#[inline]
fn put_text(dst: &mut impl BufMut, t: &Text) {
    put_bytes(dst, t.as_bytes());
}

/// A length-prefixed string field from its (already validated) UTF-8 bytes.
#[inline]
fn put_bytes(dst: &mut impl BufMut, b: &[u8]) {
    put_u64(dst, b.len() as u64);
    dst.put_slice(b);
}

// ---------------------------------------------------------------------------------------
// Client frames
// ---------------------------------------------------------------------------------------

/// HELLO: the first frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The protocol version the client speaks (1, 2 or 3).
    pub version: u8,
    /// The heartbeat interval the client asks for, in seconds; 0 takes the relay's default.
    pub heartbeat_secs: u32,
    /// The credential: a signed token, or the bare user id where the relay runs without auth.
    pub token: Bytes,
    /// Version 2 only: the device's id, the same on every connection of this installation.
    /// With it, a PUBLISH's `msg_id` is the device's counter and names the message across
    /// reconnects: the relay answers a repeat with the original PUBACK (PROTOCOL.md §7).
    /// Must be `None` in a version-1 HELLO (the flag is undefined there).
    pub device_id: Option<u64>,
    /// Rooms the client knows, with the last sequence it holds of each. Entry `i` is bound to
    /// alias `i` for the new connection.
    pub resume: ResumeList,
}

/// One room the client resumes: its id, the epoch its sequences belong to, and the last
/// sequence the client holds (0 if none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResumeEntry {
    /// The room's id, as given in ROOM.
    pub room_id: u64,
    /// The epoch of the room's stream that `last_seq` belongs to.
    pub epoch: u64,
    /// The last sequence the client holds.
    pub last_seq: u64,
}

/// HELLO's resume list, kept in its encoded form (validated when decoded) so that decoding a
/// HELLO never allocates per entry. Entries are grouped by epoch on the wire: most rooms
/// share one, so the epoch is written once per group.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ResumeList {
    raw: Bytes,
    entries: u32,
}

impl std::fmt::Debug for ResumeList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl ResumeList {
    /// Encodes entries in order, starting a new epoch group whenever the epoch changes.
    pub fn from_entries(entries: &[ResumeEntry]) -> Self {
        if entries.is_empty() {
            return ResumeList::default();
        }
        let mut groups: Vec<(u64, &[ResumeEntry])> = Vec::new();
        let mut start = 0;
        for i in 1..=entries.len() {
            if i == entries.len() || entries[i].epoch != entries[start].epoch {
                groups.push((entries[start].epoch, &entries[start..i]));
                start = i;
            }
        }
        let mut raw = BytesMut::new();
        put_u64(&mut raw, groups.len() as u64);
        for (epoch, group) in groups {
            put_u64(&mut raw, epoch);
            put_u64(&mut raw, group.len() as u64);
            for e in group {
                raw.put_u64_le(e.room_id);
                put_u64(&mut raw, e.last_seq);
            }
        }
        ResumeList {
            raw: raw.freeze(),
            entries: entries.len() as u32,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries as usize
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// The entries, in order (entry `i` gets alias `i`).
    pub fn iter(&self) -> ResumeIter<'_> {
        let mut reader = Reader::new(&self.raw, 0);
        // The list was validated (or built) already; an empty list has no group count.
        let groups_left = if self.raw.is_empty() {
            0
        } else {
            reader.varint("resume groups").unwrap_or(0)
        };
        ResumeIter {
            reader,
            groups_left,
            in_group: 0,
            epoch: 0,
        }
    }

    fn decode(reader: &mut Reader<'_>, limits: &Limits) -> Result<Self, DecodeError> {
        let start = reader.position();
        let groups = reader.varint("resume groups")?;
        if groups == 0 {
            return Err(DecodeError::Invalid {
                field: "resume groups",
                why: "zero groups with the resume flag set",
            });
        }
        let mut total: u64 = 0;
        for _ in 0..groups {
            reader.varint("resume epoch")?;
            let count = reader.varint("resume count")?;
            if count == 0 {
                return Err(DecodeError::Invalid {
                    field: "resume count",
                    why: "empty group",
                });
            }
            // Saturating: a later group's count may be anything up to 2^64-1.
            total = total.saturating_add(count);
            if total > limits.max_resume_entries as u64 {
                return Err(DecodeError::TooLong {
                    field: "resume list",
                    len: total,
                    max: limits.max_resume_entries,
                });
            }
            for _ in 0..count {
                reader.u64_le("resume room id")?;
                reader.varint("resume sequence")?;
            }
        }
        let end = reader.position();
        Ok(ResumeList {
            raw: reader.slice(start, end),
            entries: total as u32,
        })
    }

    fn encoded_len(&self) -> usize {
        self.raw.len()
    }
}

/// Iterator over a [`ResumeList`].
#[derive(Debug)]
pub struct ResumeIter<'a> {
    reader: Reader<'a>,
    groups_left: u64,
    in_group: u64,
    epoch: u64,
}

impl Iterator for ResumeIter<'_> {
    type Item = ResumeEntry;

    fn next(&mut self) -> Option<ResumeEntry> {
        while self.in_group == 0 {
            if self.groups_left == 0 {
                return None;
            }
            self.groups_left -= 1;
            self.epoch = self.reader.varint("resume epoch").ok()?;
            self.in_group = self.reader.varint("resume count").ok()?;
        }
        self.in_group -= 1;
        let room_id = self.reader.u64_le("resume room id").ok()?;
        let last_seq = self.reader.varint("resume sequence").ok()?;
        Some(ResumeEntry {
            room_id,
            epoch: self.epoch,
            last_seq,
        })
    }
}

/// SUBSCRIBE: subscribe to a channel, or join a room, by name. The relay answers with ROOM
/// (binding an alias) or ERROR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// `true`: join a room (only where the relay permits self-joins); `false`: a channel.
    pub room: bool,
    /// The room's or channel's name.
    pub name: Text,
}

/// UNSUBSCRIBE: leave the room or channel bound to `alias`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsubscribe {
    /// The alias to unbind.
    pub alias: u32,
    /// Also block the channel: the app server cannot subscribe the user to it again.
    pub block: bool,
}

/// PUBLISH: a message into the room or channel bound to `alias`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The target.
    pub alias: u32,
    /// The client's id for this message, echoed in PUBACK. `None`: an ephemeral event
    /// (typing indicator, ...), not sequenced, not stored, not acknowledged.
    pub msg_id: Option<u64>,
    /// An acknowledgement riding along: the client holds every sequence of `alias` up to
    /// this one.
    pub ack: Option<u64>,
    /// The message body, opaque to the relay.
    pub payload: Bytes,
}

/// ACK: cumulative acknowledgements, one `(alias, sequence)` pair per room.
#[derive(Clone, PartialEq, Eq)]
pub struct Ack {
    raw: Bytes,
    count: u32,
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Ack {
    /// Encodes pairs of (alias, last sequence held). At least one pair.
    pub fn from_pairs(pairs: &[(u32, u64)]) -> Self {
        let mut raw = BytesMut::new();
        for &(alias, seq) in pairs {
            put_u64(&mut raw, u64::from(alias));
            put_u64(&mut raw, seq);
        }
        Ack {
            raw: raw.freeze(),
            count: pairs.len() as u32,
        }
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether there are none (never true for a decoded frame).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        let mut reader = Reader::new(&self.raw, 0);
        std::iter::from_fn(move || {
            if reader.is_empty() {
                return None;
            }
            let alias = reader.varint_u32("ack alias").ok()?;
            let seq = reader.varint("ack sequence").ok()?;
            Some((alias, seq))
        })
    }
}

/// PING, in either direction. With an interval, the sender asks for (client) or announces
/// (relay) a new heartbeat interval in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ping {
    /// The heartbeat interval asked for, in seconds.
    pub interval_secs: Option<u32>,
}

/// PONG, in either direction. With an interval: the interval granted, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pong {
    /// The heartbeat interval granted, in seconds.
    pub interval_secs: Option<u32>,
}

/// A frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// HELLO.
    Hello(Hello),
    /// SUBSCRIBE.
    Subscribe(Subscribe),
    /// UNSUBSCRIBE.
    Unsubscribe(Unsubscribe),
    /// PUBLISH.
    Publish(Publish),
    /// ACK.
    Ack(Ack),
    /// PING.
    Ping(Ping),
    /// PONG.
    Pong(Pong),
    /// BYE.
    Bye,
    /// READ (version 3).
    Read(Read),
}

const HELLO_RESUME: u8 = 0b001;
/// Version 2: a device id (`u64le`) follows the token.
const HELLO_DEVICE: u8 = 0b010;
const SUBSCRIBE_ROOM: u8 = 0b001;
const UNSUBSCRIBE_BLOCK: u8 = 0b001;
const PUBLISH_EPHEMERAL: u8 = 0b001;
const PUBLISH_ACK: u8 = 0b010;
const PING_INTERVAL: u8 = 0b001;

impl ClientFrame {
    /// The frame's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            ClientFrame::Hello(_) => "HELLO",
            ClientFrame::Subscribe(_) => "SUBSCRIBE",
            ClientFrame::Unsubscribe(_) => "UNSUBSCRIBE",
            ClientFrame::Publish(_) => "PUBLISH",
            ClientFrame::Ack(_) => "ACK",
            ClientFrame::Ping(_) => "PING",
            ClientFrame::Pong(_) => "PONG",
            ClientFrame::Bye => "BYE",
            ClientFrame::Read(_) => "READ",
        }
    }

    /// Length of the body (type byte included, length prefix excluded).
    pub fn body_len(&self) -> usize {
        1 + match self {
            ClientFrame::Hello(h) => {
                1 + len_u64(u64::from(h.heartbeat_secs))
                    + len_u64(h.token.len() as u64)
                    + h.token.len()
                    + h.device_id.map_or(0, |_| 8)
                    + h.resume.encoded_len()
            }
            ClientFrame::Subscribe(s) => text_len(&s.name),
            ClientFrame::Unsubscribe(u) => len_u64(u64::from(u.alias)),
            ClientFrame::Publish(p) => {
                len_u64(u64::from(p.alias))
                    + p.msg_id.map_or(0, len_u64)
                    + p.ack.map_or(0, len_u64)
                    + p.payload.len()
            }
            ClientFrame::Ack(a) => a.raw.len(),
            ClientFrame::Ping(p) => p.interval_secs.map_or(0, |i| len_u64(u64::from(i))),
            ClientFrame::Pong(p) => p.interval_secs.map_or(0, |i| len_u64(u64::from(i))),
            ClientFrame::Bye => 0,
            ClientFrame::Read(r) => r.fields_len(),
        }
    }

    /// Length of the whole frame on the wire.
    pub fn encoded_len(&self) -> usize {
        let body = self.body_len();
        len_u64(body as u64) + body
    }

    /// Appends the frame (length prefix and body) to `dst`.
    pub fn encode(&self, dst: &mut impl BufMut) {
        put_u64(dst, self.body_len() as u64);
        match self {
            ClientFrame::Hello(h) => {
                let mut flags = if h.resume.is_empty() { 0 } else { HELLO_RESUME };
                if h.device_id.is_some() {
                    flags |= HELLO_DEVICE;
                }
                dst.put_u8(type_byte(kind::HELLO, flags));
                dst.put_u8(h.version);
                put_u64(dst, u64::from(h.heartbeat_secs));
                put_u64(dst, h.token.len() as u64);
                dst.put_slice(&h.token);
                if let Some(device) = h.device_id {
                    dst.put_u64_le(device);
                }
                dst.put_slice(&h.resume.raw);
            }
            ClientFrame::Subscribe(s) => {
                let flags = if s.room { SUBSCRIBE_ROOM } else { 0 };
                dst.put_u8(type_byte(kind::SUBSCRIBE, flags));
                put_text(dst, &s.name);
            }
            ClientFrame::Unsubscribe(u) => {
                let flags = if u.block { UNSUBSCRIBE_BLOCK } else { 0 };
                dst.put_u8(type_byte(kind::UNSUBSCRIBE, flags));
                put_u64(dst, u64::from(u.alias));
            }
            ClientFrame::Publish(p) => {
                let mut flags = 0;
                if p.msg_id.is_none() {
                    flags |= PUBLISH_EPHEMERAL;
                }
                if p.ack.is_some() {
                    flags |= PUBLISH_ACK;
                }
                dst.put_u8(type_byte(kind::PUBLISH, flags));
                put_u64(dst, u64::from(p.alias));
                if let Some(id) = p.msg_id {
                    put_u64(dst, id);
                }
                if let Some(ack) = p.ack {
                    put_u64(dst, ack);
                }
                dst.put_slice(&p.payload);
            }
            ClientFrame::Ack(a) => {
                dst.put_u8(type_byte(kind::ACK, 0));
                dst.put_slice(&a.raw);
            }
            ClientFrame::Ping(p) => put_interval(dst, kind::PING, p.interval_secs),
            ClientFrame::Pong(p) => put_interval(dst, kind::PONG, p.interval_secs),
            ClientFrame::Bye => dst.put_u8(type_byte(kind::BYE, 0)),
            ClientFrame::Read(r) => {
                dst.put_u8(type_byte(kind::READ, 0));
                r.put_fields(dst);
            }
        }
    }

    /// Parses one body (the bytes after the length prefix). Payloads and names are slices of
    /// `body`.
    pub fn parse(body: Bytes, limits: &Limits) -> Result<Self, DecodeError> {
        let mut r = Reader::new(&body, 0);
        let (ty, flags) = split_type_byte(r.u8("type")?);
        let frame = match ty {
            kind::HELLO => {
                // The version comes before the flags: another version may define other
                // flags, and its HELLO must be answered "unsupported version", not "malformed".
                let version = r.u8("version")?;
                let defined = match version {
                    1 => HELLO_RESUME,
                    2 | 3 => HELLO_RESUME | HELLO_DEVICE,
                    _ => return Err(DecodeError::UnsupportedVersion { version }),
                };
                check_flags("HELLO", flags, defined)?;
                let heartbeat_secs = r.varint_u32("heartbeat")?;
                let token = r.len_prefixed("token", limits.max_token_len)?;
                let device_id = if flags & HELLO_DEVICE != 0 {
                    Some(r.u64_le("device id")?)
                } else {
                    None
                };
                let resume = if flags & HELLO_RESUME != 0 {
                    ResumeList::decode(&mut r, limits)?
                } else {
                    ResumeList::default()
                };
                r.finish("HELLO")?;
                ClientFrame::Hello(Hello {
                    version,
                    heartbeat_secs,
                    token,
                    device_id,
                    resume,
                })
            }
            kind::SUBSCRIBE => {
                check_flags("SUBSCRIBE", flags, SUBSCRIBE_ROOM)?;
                let name = r.name("name", limits.max_name_len)?;
                r.finish("SUBSCRIBE")?;
                ClientFrame::Subscribe(Subscribe {
                    room: flags & SUBSCRIBE_ROOM != 0,
                    name,
                })
            }
            kind::UNSUBSCRIBE => {
                check_flags("UNSUBSCRIBE", flags, UNSUBSCRIBE_BLOCK)?;
                let alias = r.varint_u32("alias")?;
                r.finish("UNSUBSCRIBE")?;
                ClientFrame::Unsubscribe(Unsubscribe {
                    alias,
                    block: flags & UNSUBSCRIBE_BLOCK != 0,
                })
            }
            kind::PUBLISH => {
                check_flags("PUBLISH", flags, PUBLISH_EPHEMERAL | PUBLISH_ACK)?;
                let alias = r.varint_u32("alias")?;
                let msg_id = if flags & PUBLISH_EPHEMERAL != 0 {
                    None
                } else {
                    Some(r.varint("message id")?)
                };
                let ack = if flags & PUBLISH_ACK != 0 {
                    Some(r.varint("ack sequence")?)
                } else {
                    None
                };
                ClientFrame::Publish(Publish {
                    alias,
                    msg_id,
                    ack,
                    payload: r.rest(),
                })
            }
            kind::ACK => {
                check_flags("ACK", flags, 0)?;
                let start = r.position();
                let mut count: u64 = 0;
                while !r.is_empty() {
                    r.varint_u32("ack alias")?;
                    r.varint("ack sequence")?;
                    count += 1;
                    if count > limits.max_ack_entries as u64 {
                        return Err(DecodeError::TooLong {
                            field: "ack pairs",
                            len: count,
                            max: limits.max_ack_entries,
                        });
                    }
                }
                if count == 0 {
                    return Err(DecodeError::Invalid {
                        field: "ACK",
                        why: "no pairs",
                    });
                }
                ClientFrame::Ack(Ack {
                    raw: body.slice(start..),
                    count: count as u32,
                })
            }
            kind::PING => ClientFrame::Ping(Ping {
                interval_secs: parse_interval(&mut r, "PING", flags)?,
            }),
            kind::PONG => ClientFrame::Pong(Pong {
                interval_secs: parse_interval(&mut r, "PONG", flags)?,
            }),
            kind::BYE => {
                check_flags("BYE", flags, 0)?;
                r.finish("BYE")?;
                ClientFrame::Bye
            }
            kind::READ => {
                check_flags("READ", flags, 0)?;
                ClientFrame::Read(Read::parse_fields(&mut r)?)
            }
            other => return Err(DecodeError::UnknownFrameType(other)),
        };
        Ok(frame)
    }
}

fn put_interval(dst: &mut impl BufMut, kind: u8, interval: Option<u32>) {
    match interval {
        Some(secs) => {
            dst.put_u8(type_byte(kind, PING_INTERVAL));
            put_u64(dst, u64::from(secs));
        }
        None => dst.put_u8(type_byte(kind, 0)),
    }
}

fn parse_interval(
    r: &mut Reader<'_>,
    frame: &'static str,
    flags: u8,
) -> Result<Option<u32>, DecodeError> {
    check_flags(frame, flags, PING_INTERVAL)?;
    let interval = if flags & PING_INTERVAL != 0 {
        Some(r.varint_u32("interval")?)
    } else {
        None
    };
    r.finish(frame)?;
    Ok(interval)
}

// ---------------------------------------------------------------------------------------
// Server frames
// ---------------------------------------------------------------------------------------

/// WELCOME: the relay accepted the HELLO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The version the session speaks.
    pub version: u8,
    /// The relay's id for this connection (for logs and support).
    pub conn_id: u64,
    /// The relay's clock, ms since the Unix epoch: the base of DELIVER's time deltas.
    pub server_time_ms: u64,
    /// The heartbeat interval granted, in seconds.
    pub heartbeat_secs: u32,
    /// The largest frame body the relay accepts from this client.
    pub max_frame_len: u32,
    /// The user the connection is authenticated as.
    pub user: Text,
}

/// ROOM: binds `alias` to a room or channel for the rest of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    /// The alias later frames use.
    pub alias: u32,
    /// A broadcast channel (`true`) or a room.
    pub channel: bool,
    /// The room's stable id, used in resume lists.
    pub room_id: u64,
    /// The epoch of the room's sequence numbers.
    pub epoch: u64,
    /// The sequence the stream continues after: the next DELIVER without an explicit
    /// sequence carries `cursor + 1`.
    pub cursor: u64,
    /// The room's latest sequence; `head - cursor` messages are on their way.
    pub head: u64,
    /// The room's or channel's name.
    pub name: Text,
}

/// LEFT: `alias` is unbound; nothing more arrives for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Left {
    /// The alias.
    pub alias: u32,
    /// Why.
    pub reason: LeftReason,
}

/// PUBACK: the publish with `msg_id` was accepted as sequence `seq` of its room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PubAck {
    /// The client's message id.
    pub msg_id: u64,
    /// The sequence the relay gave it.
    pub seq: u64,
}

/// The per-recipient part of a DELIVER: everything but the payload. The relay builds one
/// per connection and sends it ahead of the payload that all recipients share. The sender's
/// id is a [`Text`] as decoded, or the relay's own form of it ([`SenderId`]) as built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliverHeader<S = Text> {
    /// The room's alias on this connection.
    pub alias: u32,
    /// The sequence, when it is not `cursor + 1` (see [`Room::cursor`]). Always `None` for
    /// ephemeral events.
    pub seq: Option<u64>,
    /// Not sequenced, not stored: a typing indicator or the like.
    pub ephemeral: bool,
    /// The sender's alias on this connection.
    pub sender_alias: u32,
    /// The sender's user id, when this frame (re)defines `sender_alias`.
    pub new_sender: Option<S>,
    /// The relay's acceptance time minus the previous DELIVER's (or WELCOME's), in ms.
    pub ts_delta_ms: i64,
}

const DELIVER_SEQ: u8 = 0b001;
const DELIVER_NEW_SENDER: u8 = 0b010;
const DELIVER_EPHEMERAL: u8 = 0b100;

impl<S: SenderId> DeliverHeader<S> {
    fn fields_len(&self) -> usize {
        1 + len_u64(u64::from(self.alias))
            + self.seq.map_or(0, len_u64)
            + len_u64(u64::from(self.sender_alias))
            + self
                .new_sender
                .as_ref()
                .map_or(0, |s| bytes_len(s.as_bytes()))
            + len_u64(zigzag(self.ts_delta_ms))
    }

    /// Bytes the length prefix and header take in front of a payload of `payload_len`.
    pub fn prefix_len(&self, payload_len: usize) -> usize {
        let body = self.fields_len() + payload_len;
        len_u64(body as u64) + self.fields_len()
    }

    /// Writes the length prefix and the header for a payload of `payload_len` bytes; the
    /// caller appends (or sends after it) exactly that payload.
    pub fn encode_prefix(&self, payload_len: usize, dst: &mut impl BufMut) {
        put_u64(dst, (self.fields_len() + payload_len) as u64);
        let mut flags = 0;
        if self.seq.is_some() {
            flags |= DELIVER_SEQ;
        }
        if self.new_sender.is_some() {
            flags |= DELIVER_NEW_SENDER;
        }
        if self.ephemeral {
            flags |= DELIVER_EPHEMERAL;
        }
        dst.put_u8(type_byte(kind::DELIVER, flags));
        put_u64(dst, u64::from(self.alias));
        if let Some(seq) = self.seq {
            put_u64(dst, seq);
        }
        put_u64(dst, u64::from(self.sender_alias));
        if let Some(sender) = &self.new_sender {
            put_bytes(dst, sender.as_bytes());
        }
        put_u64(dst, zigzag(self.ts_delta_ms));
    }
}

/// DELIVER: a message (or an ephemeral event) of a room or channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deliver {
    /// Everything but the payload.
    pub header: DeliverHeader,
    /// The message body exactly as published.
    pub payload: Bytes,
}

/// GAP: sequences `from..=to` of `alias` will never be delivered on this connection (they
/// are past retention, or belong to a lost epoch); fetch them from the app server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The alias.
    pub alias: u32,
    /// First missing sequence (always the stream's `cursor + 1`).
    pub from: u64,
    /// Last missing sequence; the stream continues after it.
    pub to: u64,
}

/// ERROR: something the client did was refused, or the relay failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// What went wrong.
    pub code: ErrorCode,
    /// The relay closes the connection after this frame.
    pub fatal: bool,
    /// What the error refers to: the message id of a refused PUBLISH, the alias of a refused
    /// UNSUBSCRIBE, 0 where nothing applies.
    pub reference: u64,
    /// Human-readable detail (for a refused SUBSCRIBE, it names the channel).
    pub message: Text,
}

/// GOAWAY: the relay will close the connection; reconnect after `retry_after_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoAway {
    /// Why.
    pub reason: GoAwayReason,
    /// How long to wait before reconnecting (already spread with jitter by the relay).
    pub retry_after_ms: u64,
    /// Human-readable detail.
    pub message: Text,
}

/// A frame the relay sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// WELCOME.
    Welcome(Welcome),
    /// ROOM.
    Room(Room),
    /// LEFT.
    Left(Left),
    /// PUBACK.
    PubAck(PubAck),
    /// DELIVER.
    Deliver(Deliver),
    /// GAP.
    Gap(Gap),
    /// ERROR.
    Error(ErrorFrame),
    /// GOAWAY.
    GoAway(GoAway),
    /// PING.
    Ping(Ping),
    /// PONG.
    Pong(Pong),
    /// RECEIPT (version 3).
    Receipt(Receipt),
}

const ROOM_CHANNEL: u8 = 0b001;
const ERROR_FATAL: u8 = 0b001;

impl ServerFrame {
    /// The frame's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            ServerFrame::Welcome(_) => "WELCOME",
            ServerFrame::Room(_) => "ROOM",
            ServerFrame::Left(_) => "LEFT",
            ServerFrame::PubAck(_) => "PUBACK",
            ServerFrame::Deliver(_) => "DELIVER",
            ServerFrame::Gap(_) => "GAP",
            ServerFrame::Error(_) => "ERROR",
            ServerFrame::GoAway(_) => "GOAWAY",
            ServerFrame::Ping(_) => "PING",
            ServerFrame::Pong(_) => "PONG",
            ServerFrame::Receipt(_) => "RECEIPT",
        }
    }

    /// Length of the body (type byte included, length prefix excluded).
    pub fn body_len(&self) -> usize {
        match self {
            ServerFrame::Welcome(w) => {
                2 + len_u64(w.conn_id)
                    + len_u64(w.server_time_ms)
                    + len_u64(u64::from(w.heartbeat_secs))
                    + len_u64(u64::from(w.max_frame_len))
                    + text_len(&w.user)
            }
            ServerFrame::Room(r) => {
                1 + len_u64(u64::from(r.alias))
                    + 8
                    + len_u64(r.epoch)
                    + len_u64(r.cursor)
                    + len_u64(r.head)
                    + text_len(&r.name)
            }
            ServerFrame::Left(l) => 1 + len_u64(u64::from(l.alias)) + len_u64(l.reason.to_wire()),
            ServerFrame::PubAck(p) => 1 + len_u64(p.msg_id) + len_u64(p.seq),
            ServerFrame::Deliver(d) => d.header.fields_len() + d.payload.len(),
            ServerFrame::Gap(g) => {
                1 + len_u64(u64::from(g.alias)) + len_u64(g.from) + len_u64(g.to)
            }
            ServerFrame::Error(e) => {
                1 + len_u64(e.code.to_wire()) + len_u64(e.reference) + text_len(&e.message)
            }
            ServerFrame::GoAway(g) => {
                1 + len_u64(g.reason.to_wire()) + len_u64(g.retry_after_ms) + text_len(&g.message)
            }
            ServerFrame::Ping(p) => 1 + p.interval_secs.map_or(0, |i| len_u64(u64::from(i))),
            ServerFrame::Pong(p) => 1 + p.interval_secs.map_or(0, |i| len_u64(u64::from(i))),
            ServerFrame::Receipt(r) => 1 + r.fields_len(),
        }
    }

    /// Length of the whole frame on the wire.
    pub fn encoded_len(&self) -> usize {
        let body = self.body_len();
        len_u64(body as u64) + body
    }

    /// Appends the frame (length prefix and body) to `dst`.
    pub fn encode(&self, dst: &mut impl BufMut) {
        if let ServerFrame::Deliver(d) = self {
            d.header.encode_prefix(d.payload.len(), dst);
            dst.put_slice(&d.payload);
            return;
        }
        put_u64(dst, self.body_len() as u64);
        match self {
            ServerFrame::Welcome(w) => {
                dst.put_u8(type_byte(kind::WELCOME, 0));
                dst.put_u8(w.version);
                put_u64(dst, w.conn_id);
                put_u64(dst, w.server_time_ms);
                put_u64(dst, u64::from(w.heartbeat_secs));
                put_u64(dst, u64::from(w.max_frame_len));
                put_text(dst, &w.user);
            }
            ServerFrame::Room(r) => {
                let flags = if r.channel { ROOM_CHANNEL } else { 0 };
                dst.put_u8(type_byte(kind::ROOM, flags));
                put_u64(dst, u64::from(r.alias));
                dst.put_u64_le(r.room_id);
                put_u64(dst, r.epoch);
                put_u64(dst, r.cursor);
                put_u64(dst, r.head);
                put_text(dst, &r.name);
            }
            ServerFrame::Left(l) => {
                dst.put_u8(type_byte(kind::LEFT, 0));
                put_u64(dst, u64::from(l.alias));
                put_u64(dst, l.reason.to_wire());
            }
            ServerFrame::PubAck(p) => {
                dst.put_u8(type_byte(kind::PUBACK, 0));
                put_u64(dst, p.msg_id);
                put_u64(dst, p.seq);
            }
            ServerFrame::Gap(g) => {
                dst.put_u8(type_byte(kind::GAP, 0));
                put_u64(dst, u64::from(g.alias));
                put_u64(dst, g.from);
                put_u64(dst, g.to);
            }
            ServerFrame::Error(e) => {
                let flags = if e.fatal { ERROR_FATAL } else { 0 };
                dst.put_u8(type_byte(kind::ERROR, flags));
                put_u64(dst, e.code.to_wire());
                put_u64(dst, e.reference);
                put_text(dst, &e.message);
            }
            ServerFrame::GoAway(g) => {
                dst.put_u8(type_byte(kind::GOAWAY, 0));
                put_u64(dst, g.reason.to_wire());
                put_u64(dst, g.retry_after_ms);
                put_text(dst, &g.message);
            }
            ServerFrame::Ping(p) => put_interval(dst, kind::PING, p.interval_secs),
            ServerFrame::Pong(p) => put_interval(dst, kind::PONG, p.interval_secs),
            ServerFrame::Receipt(r) => {
                dst.put_u8(type_byte(kind::RECEIPT, 0));
                r.put_fields(dst);
            }
            ServerFrame::Deliver(_) => {}
        }
    }

    /// Parses one body (the bytes after the length prefix). Payloads and strings are slices
    /// of `body`.
    pub fn parse(body: Bytes, limits: &Limits) -> Result<Self, DecodeError> {
        let mut r = Reader::new(&body, 0);
        let (ty, flags) = split_type_byte(r.u8("type")?);
        let frame = match ty {
            kind::WELCOME => {
                check_flags("WELCOME", flags, 0)?;
                let version = r.u8("version")?;
                let conn_id = r.varint("connection id")?;
                let server_time_ms = r.varint("server time")?;
                let heartbeat_secs = r.varint_u32("heartbeat")?;
                let max_frame_len = r.varint_u32("max frame length")?;
                let user = r.name("user", limits.max_name_len)?;
                r.finish("WELCOME")?;
                ServerFrame::Welcome(Welcome {
                    version,
                    conn_id,
                    server_time_ms,
                    heartbeat_secs,
                    max_frame_len,
                    user,
                })
            }
            kind::ROOM => {
                check_flags("ROOM", flags, ROOM_CHANNEL)?;
                let alias = r.varint_u32("alias")?;
                let room_id = r.u64_le("room id")?;
                let epoch = r.varint("epoch")?;
                let cursor = r.varint("cursor")?;
                let head = r.varint("head")?;
                if head < cursor {
                    return Err(DecodeError::Invalid {
                        field: "ROOM head",
                        why: "before the cursor",
                    });
                }
                let name = r.name("name", limits.max_name_len)?;
                r.finish("ROOM")?;
                ServerFrame::Room(Room {
                    alias,
                    channel: flags & ROOM_CHANNEL != 0,
                    room_id,
                    epoch,
                    cursor,
                    head,
                    name,
                })
            }
            kind::LEFT => {
                check_flags("LEFT", flags, 0)?;
                let alias = r.varint_u32("alias")?;
                let reason = LeftReason::from_wire(r.varint("reason")?);
                r.finish("LEFT")?;
                ServerFrame::Left(Left { alias, reason })
            }
            kind::PUBACK => {
                check_flags("PUBACK", flags, 0)?;
                let msg_id = r.varint("message id")?;
                let seq = r.varint("sequence")?;
                r.finish("PUBACK")?;
                ServerFrame::PubAck(PubAck { msg_id, seq })
            }
            kind::DELIVER => {
                check_flags(
                    "DELIVER",
                    flags,
                    DELIVER_SEQ | DELIVER_NEW_SENDER | DELIVER_EPHEMERAL,
                )?;
                let ephemeral = flags & DELIVER_EPHEMERAL != 0;
                if ephemeral && flags & DELIVER_SEQ != 0 {
                    return Err(DecodeError::Invalid {
                        field: "DELIVER flags",
                        why: "an ephemeral event has no sequence",
                    });
                }
                let alias = r.varint_u32("alias")?;
                let seq = if flags & DELIVER_SEQ != 0 {
                    Some(r.varint("sequence")?)
                } else {
                    None
                };
                let sender_alias = r.varint_u32("sender alias")?;
                let new_sender = if flags & DELIVER_NEW_SENDER != 0 {
                    Some(r.name("sender", limits.max_name_len)?)
                } else {
                    None
                };
                let ts_delta_ms = unzigzag(r.varint("time delta")?);
                ServerFrame::Deliver(Deliver {
                    header: DeliverHeader {
                        alias,
                        seq,
                        ephemeral,
                        sender_alias,
                        new_sender,
                        ts_delta_ms,
                    },
                    payload: r.rest(),
                })
            }
            kind::GAP => {
                check_flags("GAP", flags, 0)?;
                let alias = r.varint_u32("alias")?;
                let from = r.varint("gap start")?;
                let to = r.varint("gap end")?;
                if from == 0 || to < from {
                    return Err(DecodeError::Invalid {
                        field: "GAP range",
                        why: "empty or starts at 0",
                    });
                }
                r.finish("GAP")?;
                ServerFrame::Gap(Gap { alias, from, to })
            }
            kind::ERROR => {
                check_flags("ERROR", flags, ERROR_FATAL)?;
                let code = ErrorCode::from_wire(r.varint("code")?);
                let reference = r.varint("reference")?;
                let message = r.text("message", limits.max_text_len)?;
                r.finish("ERROR")?;
                ServerFrame::Error(ErrorFrame {
                    code,
                    fatal: flags & ERROR_FATAL != 0,
                    reference,
                    message,
                })
            }
            kind::GOAWAY => {
                check_flags("GOAWAY", flags, 0)?;
                let reason = GoAwayReason::from_wire(r.varint("reason")?);
                let retry_after_ms = r.varint("retry after")?;
                let message = r.text("message", limits.max_text_len)?;
                r.finish("GOAWAY")?;
                ServerFrame::GoAway(GoAway {
                    reason,
                    retry_after_ms,
                    message,
                })
            }
            kind::PING => ServerFrame::Ping(Ping {
                interval_secs: parse_interval(&mut r, "PING", flags)?,
            }),
            kind::PONG => ServerFrame::Pong(Pong {
                interval_secs: parse_interval(&mut r, "PONG", flags)?,
            }),
            kind::RECEIPT => {
                check_flags("RECEIPT", flags, 0)?;
                ServerFrame::Receipt(Receipt::parse_fields(&mut r, limits)?)
            }
            other => return Err(DecodeError::UnknownFrameType(other)),
        };
        Ok(frame)
    }
}
