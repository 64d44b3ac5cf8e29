//! Shared helpers for the codec's integration tests: proptest strategies for every frame of
//! both directions, and small byte-building helpers for hand-written frames.
//!
//! Each test crate uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)] // reason: every test file compiles this module and uses a part of it

use bytes::{Bytes, BytesMut};
use pabal_codec::{
    Ack, ClientFrame, DecodeError, Decoder, Deliver, DeliverHeader, ErrorCode, ErrorFrame, Gap,
    GoAway, GoAwayReason, Hello, Left, LeftReason, PROTOCOL_VERSION, Ping, Pong, PubAck, Publish,
    Read, Receipt, ReceiptEntry, ResumeEntry, ResumeList, Room, ServerFrame, Subscribe, Text,
    Unsubscribe, Welcome,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// Byte helpers
// ---------------------------------------------------------------------------------------

/// Appends `v` as an unsigned LEB128 varint (written independently of the codec's own).
pub fn varint(dst: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        dst.push((v as u8) | 0x80);
        v >>= 7;
    }
    dst.push(v as u8);
}

/// A varint as a vector.
pub fn v(value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    varint(&mut out, value);
    out
}

/// A body with its length prefix, as a read buffer.
pub fn framed(body: &[u8]) -> BytesMut {
    let mut out = v(body.len() as u64);
    out.extend_from_slice(body);
    BytesMut::from(&out[..])
}

/// Encodes a client frame on its own.
pub fn enc_client(f: &ClientFrame) -> Vec<u8> {
    let mut out = Vec::new();
    f.encode(&mut out);
    out
}

/// Encodes a server frame on its own.
pub fn enc_server(f: &ServerFrame) -> Vec<u8> {
    let mut out = Vec::new();
    f.encode(&mut out);
    out
}

/// Decodes one client frame from a whole frame (prefix included).
pub fn dec_client(bytes: &[u8]) -> Result<Option<ClientFrame>, DecodeError> {
    Decoder::default().decode_client(&mut BytesMut::from(bytes))
}

/// Decodes one server frame from a whole frame (prefix included).
pub fn dec_server(bytes: &[u8]) -> Result<Option<ServerFrame>, DecodeError> {
    Decoder::default().decode_server(&mut BytesMut::from(bytes))
}

/// Hex, two digits a byte, space-separated.
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Which decoder to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Frames a client sends (the relay's decoder).
    Client,
    /// Frames the relay sends (a client's decoder).
    Server,
}

/// What a decoder produced, in order: frames, then at most one error (the connection is
/// dead after it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    Client(ClientFrame),
    Server(ServerFrame),
    Err(DecodeError),
}

/// Drains every complete frame from `buf`; pushes them (and a first error) onto `out`.
/// Returns `false` once an error was seen.
pub fn drain(side: Side, decoder: &Decoder, buf: &mut BytesMut, out: &mut Vec<Out>) -> bool {
    loop {
        let next = match side {
            Side::Client => decoder.decode_client(buf).map(|f| f.map(Out::Client)),
            Side::Server => decoder.decode_server(buf).map(|f| f.map(Out::Server)),
        };
        match next {
            Ok(Some(frame)) => out.push(frame),
            Ok(None) => return true,
            Err(e) => {
                out.push(Out::Err(e));
                return false;
            }
        }
    }
}

/// Feeds `input` in chunks cut at `cuts` (sorted positions), draining after each chunk.
/// Returns what came out and the bytes left in the buffer (when no error occurred).
pub fn feed_chunked(side: Side, input: &[u8], cuts: &[usize]) -> (Vec<Out>, Option<usize>) {
    let decoder = Decoder::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut start = 0;
    for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
        let cut = cut.clamp(start, input.len());
        buf.extend_from_slice(&input[start..cut]);
        start = cut;
        if !drain(side, &decoder, &mut buf, &mut out) {
            return (out, None);
        }
    }
    (out, Some(buf.len()))
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

/// Every varint length boundary: 2^(7k) - 1 and 2^(7k) for k = 1..=9, plus the extremes.
pub fn varint_boundaries() -> Vec<u64> {
    let mut out = vec![0, 1, u64::MAX, u64::MAX - 1];
    for k in 1..=9u32 {
        let p = 1u64 << (7 * k);
        out.extend([p - 1, p]);
    }
    out.push(1u64 << 63);
    out
}

/// A u64 that is often on a varint length boundary.
pub fn any_varint() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => prop::sample::select(varint_boundaries()),
        3 => 0u64..300,
        2 => any::<u64>(),
    ]
}

/// A u32 that is often on a varint length boundary.
pub fn any_varint_u32() -> impl Strategy<Value = u32> {
    let bounds: Vec<u32> = varint_boundaries()
        .into_iter()
        .filter_map(|b| u32::try_from(b).ok())
        .chain([u32::MAX])
        .collect();
    prop_oneof![
        3 => prop::sample::select(bounds),
        3 => 0u32..300,
        2 => any::<u32>(),
    ]
}

/// A sequence number that is at least 1.
pub fn any_seq() -> impl Strategy<Value = u64> {
    any_varint().prop_map(|s| s.max(1))
}

/// An i64 time delta: small ones, boundaries of the zigzag lengths, extremes.
pub fn any_delta() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => -100_000i64..100_000,
        1 => prop::sample::select(vec![0, -1, 1, -64, 63, 64, -65, 8191, -8192, 8192, i64::MIN, i64::MAX]),
        1 => any::<i64>(),
    ]
}

/// A non-empty name within the default limit (255 bytes), often non-ASCII, sometimes at the
/// limit exactly.
pub fn any_name() -> impl Strategy<Value = Text> {
    prop_oneof![
        4 => "[a-z0-9_.:-]{1,24}".prop_map(Text::from),
        2 => "\\PC{1,32}".prop_map(Text::from),
        1 => Just(Text::from("n".repeat(255))),
        1 => Just(Text::from("é".repeat(127))), // 254 bytes in 2-byte characters
    ]
}

/// A possibly empty human-readable text within the default limit (1 KiB).
pub fn any_text() -> impl Strategy<Value = Text> {
    prop_oneof![
        4 => "\\PC{0,40}".prop_map(Text::from),
        1 => Just(Text::from("m".repeat(1024))),
    ]
}

/// Bytes, mostly short, sometimes long (past a 2-byte length prefix).
pub fn any_payload() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        6 => prop::collection::vec(any::<u8>(), 0..64),
        2 => prop::collection::vec(any::<u8>(), 100..200),
        1 => prop::collection::vec(any::<u8>(), 16_000..17_000),
    ]
    .prop_map(Bytes::from)
}

/// A token within the default limit (8 KiB).
pub fn any_token() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..200),
        1 => Just(vec![b't'; 8 * 1024]),
    ]
    .prop_map(Bytes::from)
}

/// Resume entries whose epochs come from a small set, so that runs (groups) of several
/// lengths and repeated non-adjacent epochs both occur.
pub fn any_resume_entries() -> impl Strategy<Value = Vec<ResumeEntry>> {
    let epochs = prop::sample::select(vec![0u64, 1, 127, 128, 1_767_225_600_000, u64::MAX]);
    prop::collection::vec(
        (any::<u64>(), epochs, any_varint()).prop_map(|(room_id, epoch, last_seq)| ResumeEntry {
            room_id,
            epoch,
            last_seq,
        }),
        0..24,
    )
}

/// Ack pairs, at least one.
pub fn any_ack_pairs() -> impl Strategy<Value = Vec<(u32, u64)>> {
    prop::collection::vec((any_varint_u32(), any_varint()), 1..40)
}

/// Every client frame, every flag combination.
pub fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        1 => (any_varint_u32(), any_token(), prop::option::of(any::<u64>()), any_resume_entries()).prop_map(|(hb, token, device_id, entries)| {
            ClientFrame::Hello(Hello {
                // Version 1 defines no device id.
                version: if device_id.is_some() { PROTOCOL_VERSION } else { 1 },
                heartbeat_secs: hb,
                token,
                device_id,
                resume: ResumeList::from_entries(&entries),
            })
        }),
        1 => (any::<bool>(), any_name())
            .prop_map(|(room, name)| ClientFrame::Subscribe(Subscribe { room, name })),
        1 => (any_varint_u32(), any::<bool>())
            .prop_map(|(alias, block)| ClientFrame::Unsubscribe(Unsubscribe { alias, block })),
        4 => (
            any_varint_u32(),
            prop::option::of(any_varint()),
            prop::option::of(any_varint()),
            any_payload()
        )
            .prop_map(|(alias, msg_id, ack, payload)| {
                ClientFrame::Publish(Publish { alias, msg_id, ack, payload })
            }),
        2 => any_ack_pairs().prop_map(|pairs| ClientFrame::Ack(Ack::from_pairs(&pairs))),
        1 => prop::option::of(any_varint_u32())
            .prop_map(|interval_secs| ClientFrame::Ping(Ping { interval_secs })),
        1 => prop::option::of(any_varint_u32())
            .prop_map(|interval_secs| ClientFrame::Pong(Pong { interval_secs })),
        1 => Just(ClientFrame::Bye),
        1 => (any_varint_u32(), any_varint())
            .prop_map(|(alias, seq)| ClientFrame::Read(Read { alias, seq })),]
}

/// A DELIVER header, every valid flag combination (an ephemeral event has no sequence).
pub fn any_deliver_header() -> impl Strategy<Value = DeliverHeader> {
    (
        any_varint_u32(),
        any::<bool>(),
        prop::option::of(any_seq()),
        any_varint_u32(),
        prop::option::of(any_name()),
        any_delta(),
    )
        .prop_map(
            |(alias, ephemeral, seq, sender_alias, new_sender, ts_delta_ms)| DeliverHeader {
                alias,
                seq: if ephemeral { None } else { seq },
                ephemeral,
                sender_alias,
                new_sender,
                ts_delta_ms,
            },
        )
}

/// Every server frame, every flag combination.
pub fn server_frame() -> impl Strategy<Value = ServerFrame> {
    prop_oneof![
        1 => (
            any::<u8>(),
            any_varint(),
            any_varint(),
            any_varint_u32(),
            any_varint_u32(),
            any_name()
        )
            .prop_map(|(version, conn_id, server_time_ms, heartbeat_secs, max_frame_len, user)| {
                ServerFrame::Welcome(Welcome {
                    version,
                    conn_id,
                    server_time_ms,
                    heartbeat_secs,
                    max_frame_len,
                    user,
                })
            }),
        2 => (
            any_varint_u32(),
            any::<bool>(),
            any::<u64>(),
            any_varint(),
            any_varint(),
            any_varint(),
            any_name()
        )
            .prop_map(|(alias, channel, room_id, epoch, a, b, name)| {
                ServerFrame::Room(Room {
                    alias,
                    channel,
                    room_id,
                    epoch,
                    cursor: a.min(b),
                    head: a.max(b),
                    name,
                })
            }),
        1 => (any_varint_u32(), any_varint()).prop_map(|(alias, reason)| {
            ServerFrame::Left(Left { alias, reason: LeftReason::from_wire(reason) })
        }),
        1 => (any_varint(), any_varint())
            .prop_map(|(msg_id, seq)| ServerFrame::PubAck(PubAck { msg_id, seq })),
        5 => (any_deliver_header(), any_payload())
            .prop_map(|(header, payload)| ServerFrame::Deliver(Deliver { header, payload })),
        1 => (any_varint_u32(), any_seq(), any_seq()).prop_map(|(alias, a, b)| {
            ServerFrame::Gap(Gap { alias, from: a.min(b), to: a.max(b) })
        }),
        1 => (any_varint(), any::<bool>(), any_varint(), any_text()).prop_map(
            |(code, fatal, reference, message)| {
                ServerFrame::Error(ErrorFrame {
                    code: ErrorCode::from_wire(code),
                    fatal,
                    reference,
                    message,
                })
            }
        ),
        1 => (any_varint(), any_varint(), any_text()).prop_map(|(reason, retry_after_ms, message)| {
            ServerFrame::GoAway(GoAway {
                reason: GoAwayReason::from_wire(reason),
                retry_after_ms,
                message,
            })
        }),
        1 => prop::option::of(any_varint_u32())
            .prop_map(|interval_secs| ServerFrame::Ping(Ping { interval_secs })),
        1 => prop::option::of(any_varint_u32())
            .prop_map(|interval_secs| ServerFrame::Pong(Pong { interval_secs })),
        2 => (any_varint_u32(), any_receipt_entries())
            .prop_map(|(alias, entries)| ServerFrame::Receipt(Receipt { alias, entries })),]
}

/// RECEIPT entries, at least one, with and without member names (read never past delivered).
pub fn any_receipt_entries() -> impl Strategy<Value = Vec<ReceiptEntry>> {
    prop::collection::vec(
        (
            any_varint_u32(),
            prop::option::of(any_name()),
            any_varint(),
            any_varint(),
        )
            .prop_map(|(member_alias, new_member, a, b)| ReceiptEntry {
                member_alias,
                new_member,
                delivered: a.max(b),
                read: a.min(b),
            }),
        1..8,
    )
}
