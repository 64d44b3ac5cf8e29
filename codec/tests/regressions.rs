//! Regression tests for codec bugs found while writing the spec, the fuzz targets and the
//! property tests. Each test names the bug it pins.

#![allow(clippy::unwrap_used)] // reason: a test fails loudly on the first surprise

use bytes::{Bytes, BytesMut};
use pabal_codec::frame::kind;
use pabal_codec::{
    ClientSession, DecodeError, Decoder, Deliver, DeliverHeader, Gap, Limits, PubAck, Room,
    ServerFrame, SessionError, Text, Welcome,
};

fn varint(dst: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        dst.push((v as u8) | 0x80);
        v >>= 7;
    }
    dst.push(v as u8);
}

fn framed(body: &[u8]) -> BytesMut {
    let mut out = Vec::new();
    varint(&mut out, body.len() as u64);
    out.extend_from_slice(body);
    BytesMut::from(&out[..])
}

/// Bug: `ResumeList::decode` summed the groups' entry counts with `+`, so a second group
/// claiming 2^64-1 entries overflowed (a panic with debug assertions, which fuzzers and tests
/// run with). The sum now saturates and the limit check reports it.
#[test]
fn resume_count_overflow_is_an_error_not_a_panic() {
    let mut body = vec![kind::HELLO | 0x20, 1, 0, 0];
    varint(&mut body, 2); // groups
    varint(&mut body, 9); // epoch
    varint(&mut body, 1); // count
    body.extend_from_slice(&7u64.to_le_bytes());
    varint(&mut body, 3); // last seq
    varint(&mut body, 9); // epoch
    varint(&mut body, u64::MAX); // count
    let err = Decoder::default()
        .decode_client(&mut framed(&body))
        .unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooLong {
            field: "resume list",
            len: u64::MAX,
            max: Limits::default().max_resume_entries,
        }
    );
}

/// Bug: HELLO checked its flag bits before its version, so a newer client's HELLO that sets a
/// flag v1 does not define was answered "malformed" instead of "unsupported version", and
/// version negotiation failed for exactly the clients it exists for. (Version 3 now, the
/// first one this decoder does not speak.)
#[test]
fn hello_version_is_checked_before_flags() {
    let body = [kind::HELLO | 0xe0, 4, 0, 0];
    let err = Decoder::default()
        .decode_client(&mut framed(&body))
        .unwrap_err();
    assert_eq!(err, DecodeError::UnsupportedVersion { version: 4 });
    assert_eq!(err.code(), pabal_codec::ErrorCode::UnsupportedVersion);
    // A v1 HELLO with an undefined flag is still malformed.
    let body = [kind::HELLO | 0x40, 1, 0, 0];
    let err = Decoder::default()
        .decode_client(&mut framed(&body))
        .unwrap_err();
    assert_eq!(
        err,
        DecodeError::UndefinedFlags {
            frame: "HELLO",
            flags: 0b010
        }
    );
}

fn welcomed_at_max_cursor() -> ClientSession {
    let mut s = ClientSession::new();
    s.apply(ServerFrame::Welcome(Welcome {
        version: 1,
        conn_id: 1,
        server_time_ms: 0,
        heartbeat_secs: 240,
        max_frame_len: 65536,
        user: Text::from("bob"),
    }))
    .unwrap();
    s.apply(ServerFrame::Room(Room {
        alias: 0,
        channel: false,
        room_id: 1,
        epoch: 1,
        cursor: u64::MAX,
        head: u64::MAX,
        name: Text::from("r"),
    }))
    .unwrap();
    s
}

/// Bug: `ClientSession::apply` computed `cursor + 1` unchecked, so a relay that set a cursor
/// of 2^64-1 (ROOM or GAP) made the next implicit DELIVER, GAP or PUBACK panic. There is no
/// sequence after 2^64-1: such frames are now a `SequenceBreak`.
#[test]
fn session_does_not_overflow_at_the_last_sequence() {
    let mut s = welcomed_at_max_cursor();
    let deliver = ServerFrame::Deliver(Deliver {
        header: DeliverHeader {
            alias: 0,
            seq: None,
            ephemeral: false,
            sender_alias: 0,
            new_sender: Some(Text::from("ann")),
            ts_delta_ms: 0,
        },
        payload: Bytes::new(),
    });
    assert_eq!(
        s.apply(deliver),
        Err(SessionError::SequenceBreak {
            alias: 0,
            cursor: u64::MAX,
            got: u64::MAX
        })
    );
    let gap = ServerFrame::Gap(Gap {
        alias: 0,
        from: 1,
        to: 2,
    });
    assert!(matches!(
        s.apply(gap),
        Err(SessionError::SequenceBreak { .. })
    ));

    let mut s = welcomed_at_max_cursor();
    let (msg_id, _) = s.publish(0, Bytes::from_static(b"x"), None);
    let ack = s.apply(ServerFrame::PubAck(PubAck { msg_id, seq: 5 }));
    assert!(ack.is_ok(), "a stale PUBACK is reported, not fatal");
    assert_eq!(s.room(0).unwrap().cursor, u64::MAX);
}
