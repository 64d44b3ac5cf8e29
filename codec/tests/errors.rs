//! One test (at least) per `DecodeError` variant, each on hand-written bytes, and the wire
//! code each maps to.

#![allow(clippy::unwrap_used)] // reason: a test fails loudly on the first surprise

mod util;

use bytes::{Bytes, BytesMut};
use pabal_codec::frame::kind;
use pabal_codec::{ClientFrame, DecodeError, Decoder, ErrorCode, Framing, Limits, ServerFrame};
use util::*;

const SEQ: u8 = 0b001 << 5;
const NEW_SENDER: u8 = 0b010 << 5;
const EPHEMERAL: u8 = 0b100 << 5;

fn client_err(body: &[u8]) -> DecodeError {
    Decoder::default()
        .decode_client(&mut framed(body))
        .expect_err("must not decode")
}

fn server_err(body: &[u8]) -> DecodeError {
    Decoder::default()
        .decode_server(&mut framed(body))
        .expect_err("must not decode")
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

// ---------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------

#[test]
fn frame_too_large_is_reported_from_the_length_prefix_alone() {
    let decoder = Decoder::default();
    let max = Limits::default().max_frame_len;
    // Only the prefix has arrived: no body byte at all.
    let mut buf = BytesMut::from(&v(max as u64 + 1)[..]);
    let err = decoder.decode_client(&mut buf).unwrap_err();
    assert_eq!(
        err,
        DecodeError::FrameTooLarge {
            len: max as u64 + 1,
            max
        }
    );
    assert_eq!(err.code(), ErrorCode::FrameTooLarge);
    assert_eq!(buf.len(), 3, "nothing consumed");
    // The largest allowed length just waits for its body.
    assert_eq!(
        decoder.framing(&v(max as u64)),
        Ok(Framing::NeedMore(max)),
        "a full-size frame is fine"
    );
    // The same on the server side and with a custom limit; u64::MAX too.
    let small = Decoder::new(Limits {
        max_frame_len: 10,
        ..Limits::default()
    });
    assert_eq!(
        small.decode_server(&mut BytesMut::from(&v(11)[..])),
        Err(DecodeError::FrameTooLarge { len: 11, max: 10 })
    );
    assert_eq!(
        decoder.framing(&v(u64::MAX)),
        Err(DecodeError::FrameTooLarge { len: u64::MAX, max })
    );
}

#[test]
fn a_frame_of_exactly_the_limit_decodes() {
    let max = Limits::default().max_frame_len;
    // PUBLISH: type, alias 0, msg id 1, payload filling the rest.
    let mut body = vec![kind::PUBLISH, 0, 1];
    body.resize(max, 0xab);
    let f = Decoder::default()
        .decode_client(&mut framed(&body))
        .unwrap();
    let Some(ClientFrame::Publish(p)) = f else {
        panic!("{f:?}")
    };
    assert_eq!(p.payload.len(), max - 3);
}

#[test]
fn incomplete_frames_ask_for_more() {
    let d = Decoder::default();
    assert_eq!(d.framing(&[]), Ok(Framing::NeedMore(1)));
    assert_eq!(d.framing(&[0x80]), Ok(Framing::NeedMore(1)));
    assert_eq!(d.framing(&[0x05, 0x04]), Ok(Framing::NeedMore(4)));
    assert_eq!(
        d.framing(&[0x01, 0x08]),
        Ok(Framing::Ready { header: 1, body: 1 })
    );
    let mut buf = BytesMut::from(&[0x05, 0x04, 0x00][..]);
    assert_eq!(d.decode_client(&mut buf), Ok(None));
    assert_eq!(buf.len(), 3, "left untouched");
}

#[test]
fn empty_frame() {
    let mut buf = BytesMut::from(&[0x00][..]);
    assert_eq!(
        Decoder::default().decode_client(&mut buf),
        Err(DecodeError::EmptyFrame)
    );
    assert_eq!(DecodeError::EmptyFrame.code(), ErrorCode::Malformed);
    let mut buf = BytesMut::from(&[0x00][..]);
    assert_eq!(
        Decoder::default().decode_server(&mut buf),
        Err(DecodeError::EmptyFrame)
    );
    assert_eq!(
        ClientFrame::parse(Bytes::new(), &Limits::default()),
        Err(DecodeError::Truncated { field: "type" })
    );
}

#[test]
fn non_canonical_varints() {
    // In the length prefix: 1 written in two bytes.
    let mut buf = BytesMut::from(&[0x81, 0x00, 0x08][..]);
    assert_eq!(
        Decoder::default().decode_client(&mut buf),
        Err(DecodeError::NonCanonicalVarint)
    );
    // In a field: PUBLISH alias 2 written as 0x82 0x00.
    assert_eq!(
        client_err(&[kind::PUBLISH, 0x82, 0x00, 0x05]),
        DecodeError::NonCanonicalVarint
    );
    // In a PUBACK's sequence: zero written as 0x80 0x00.
    assert_eq!(
        server_err(&[kind::PUBACK, 0x05, 0x80, 0x00]),
        DecodeError::NonCanonicalVarint
    );
    assert_eq!(DecodeError::NonCanonicalVarint.code(), ErrorCode::Malformed);
}

#[test]
fn varint_overflow() {
    // A length prefix of 11 bytes.
    let mut buf = BytesMut::from(&[0xff; 11][..]);
    assert_eq!(
        Decoder::default().decode_client(&mut buf),
        Err(DecodeError::VarintOverflow)
    );
    // 2^64 in a field: ten bytes whose last carries more than one bit.
    let mut body = vec![kind::PUBACK];
    body.extend_from_slice(&[0x80; 9]);
    body.push(0x02);
    body.push(0x01);
    assert_eq!(server_err(&body), DecodeError::VarintOverflow);
    // u64::MAX itself is fine.
    let mut body = vec![kind::PUBACK];
    body.extend(v(u64::MAX));
    body.push(0x01);
    assert!(matches!(
        dec_server(&framed(&body)),
        Ok(Some(ServerFrame::PubAck(_)))
    ));
}

#[test]
fn out_of_range() {
    // An alias is a u32.
    let body = cat(&[&[kind::UNSUBSCRIBE], &v(1 << 32)]);
    assert_eq!(
        client_err(&body),
        DecodeError::OutOfRange {
            field: "alias",
            value: 1 << 32
        }
    );
    let body = cat(&[&[kind::PING | 0x20], &v(u64::from(u32::MAX) + 1)]);
    assert!(matches!(
        client_err(&body),
        DecodeError::OutOfRange {
            field: "interval",
            ..
        }
    ));
    let body = cat(&[&[kind::WELCOME, 1, 0, 0], &v(1 << 40), &[0, 1, b'u']]);
    assert!(matches!(
        server_err(&body),
        DecodeError::OutOfRange {
            field: "heartbeat",
            ..
        }
    ));
}

// ---------------------------------------------------------------------------------------
// Truncation and trailing bytes
// ---------------------------------------------------------------------------------------

#[test]
fn truncated_fields() {
    let t = |field| DecodeError::Truncated { field };
    assert_eq!(client_err(&[kind::HELLO]), t("version"));
    assert_eq!(client_err(&[kind::HELLO, 1]), t("heartbeat"));
    assert_eq!(client_err(&[kind::HELLO, 1, 0]), t("token"));
    // Token length 5, 2 bytes present.
    assert_eq!(client_err(&[kind::HELLO, 1, 0, 5, b'a', b'b']), t("token"));
    // Resume flag, one group, epoch 1, count 1, room id cut after 3 bytes.
    assert_eq!(
        client_err(&[kind::HELLO | 0x20, 1, 0, 0, 1, 1, 1, 9, 9, 9]),
        t("resume room id")
    );
    assert_eq!(
        client_err(&[kind::HELLO | 0x20, 1, 0, 0, 1, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8]),
        t("resume sequence")
    );
    assert_eq!(client_err(&[kind::SUBSCRIBE, 4, b'a']), t("name"));
    assert_eq!(client_err(&[kind::UNSUBSCRIBE]), t("alias"));
    assert_eq!(client_err(&[kind::PUBLISH]), t("alias"));
    assert_eq!(client_err(&[kind::PUBLISH, 2]), t("message id"));
    assert_eq!(client_err(&[kind::PUBLISH | 0x40, 2, 5]), t("ack sequence"));
    assert_eq!(client_err(&[kind::ACK, 2]), t("ack sequence"));
    assert_eq!(client_err(&[kind::PING | 0x20]), t("interval"));
    // A varint cut in the middle is truncation too, not a framing wait.
    assert_eq!(client_err(&[kind::PUBLISH, 0x80]), t("alias"));

    assert_eq!(server_err(&[kind::WELCOME, 1, 7, 0x80]), t("server time"));
    assert_eq!(server_err(&[kind::ROOM, 0, 1, 2, 3]), t("room id"));
    assert_eq!(
        server_err(&[kind::ROOM, 0, 1, 2, 3, 4, 5, 6, 7, 8, 1, 0, 0]),
        t("name")
    );
    assert_eq!(server_err(&[kind::LEFT, 0]), t("reason"));
    assert_eq!(server_err(&[kind::PUBACK, 5]), t("sequence"));
    assert_eq!(server_err(&[kind::DELIVER | SEQ, 0]), t("sequence"));
    assert_eq!(server_err(&[kind::DELIVER, 0]), t("sender alias"));
    assert_eq!(
        server_err(&[kind::DELIVER | NEW_SENDER, 0, 0, 3, b'a']),
        t("sender")
    );
    assert_eq!(server_err(&[kind::DELIVER, 0, 0]), t("time delta"));
    assert_eq!(server_err(&[kind::GAP, 0, 1]), t("gap end"));
    assert_eq!(server_err(&[kind::ERROR, 1, 0]), t("message"));
    assert_eq!(server_err(&[kind::GOAWAY, 1]), t("retry after"));
    assert_eq!(
        DecodeError::Truncated { field: "x" }.code(),
        ErrorCode::Malformed
    );
}

#[test]
fn trailing_bytes() {
    let tb = |frame, extra| DecodeError::TrailingBytes { frame, extra };
    assert_eq!(client_err(&[kind::HELLO, 1, 0, 0, 0xaa]), tb("HELLO", 1));
    assert_eq!(
        client_err(&[kind::SUBSCRIBE, 1, b'a', 0, 0]),
        tb("SUBSCRIBE", 2)
    );
    assert_eq!(client_err(&[kind::UNSUBSCRIBE, 1, 1]), tb("UNSUBSCRIBE", 1));
    assert_eq!(client_err(&[kind::PING, 0]), tb("PING", 1));
    assert_eq!(client_err(&[kind::PONG | 0x20, 30, 0]), tb("PONG", 1));
    assert_eq!(client_err(&[kind::BYE, 0]), tb("BYE", 1));
    assert_eq!(
        server_err(&[kind::WELCOME, 1, 0, 0, 0, 0, 1, b'u', 9]),
        tb("WELCOME", 1)
    );
    assert_eq!(server_err(&[kind::LEFT, 0, 0, 0]), tb("LEFT", 1));
    assert_eq!(server_err(&[kind::PUBACK, 1, 1, 1]), tb("PUBACK", 1));
    assert_eq!(server_err(&[kind::GAP, 0, 1, 1, 1]), tb("GAP", 1));
    assert_eq!(server_err(&[kind::ERROR, 1, 0, 0, 1]), tb("ERROR", 1));
    assert_eq!(server_err(&[kind::GOAWAY, 1, 0, 0, 1]), tb("GOAWAY", 1));
    assert_eq!(server_err(&[kind::PING, 0]), tb("PING", 1));
    // An ACK's pairs run to the end: an odd varint out is a truncated pair instead.
    assert_eq!(
        client_err(&[kind::ACK, 1, 1, 1]),
        DecodeError::Truncated {
            field: "ack sequence"
        }
    );
    // PUBLISH and DELIVER end in their payload: extra bytes are payload.
    let Ok(Some(ClientFrame::Publish(p))) = dec_client(&framed(&[kind::PUBLISH, 0, 1, 9, 9]))
    else {
        panic!()
    };
    assert_eq!(&p.payload[..], &[9, 9]);
}

// ---------------------------------------------------------------------------------------
// Types and flags
// ---------------------------------------------------------------------------------------

#[test]
fn unknown_frame_types() {
    for ty in [
        0x00,
        0x0a,
        0x0f,
        0x1f,
        kind::WELCOME,
        kind::DELIVER,
        kind::GOAWAY,
    ] {
        assert_eq!(
            client_err(&[ty]),
            DecodeError::UnknownFrameType(ty),
            "client {ty:#x}"
        );
    }
    for ty in [
        0x00,
        kind::HELLO,
        kind::PUBLISH,
        kind::ACK,
        kind::BYE,
        kind::READ,
        0x19,
        0x1f,
    ] {
        assert_eq!(
            server_err(&[ty]),
            DecodeError::UnknownFrameType(ty),
            "server {ty:#x}"
        );
    }
    // Flags do not change the type: 0xea is type 0x0a with all flags set.
    assert_eq!(client_err(&[0xea]), DecodeError::UnknownFrameType(0x0a));
    assert_eq!(
        DecodeError::UnknownFrameType(10).code(),
        ErrorCode::UnknownFrameType
    );
}

#[test]
fn undefined_flags() {
    let uf = |frame, flags| DecodeError::UndefinedFlags { frame, flags };
    assert_eq!(
        client_err(&[kind::HELLO | 0x40, 1, 0, 0]),
        uf("HELLO", 0b010)
    );
    assert_eq!(
        client_err(&[kind::SUBSCRIBE | 0x40, 1, b'a']),
        uf("SUBSCRIBE", 0b010)
    );
    assert_eq!(
        client_err(&[kind::UNSUBSCRIBE | 0x80, 0]),
        uf("UNSUBSCRIBE", 0b100)
    );
    assert_eq!(
        client_err(&[kind::PUBLISH | 0x80, 0, 1]),
        uf("PUBLISH", 0b100)
    );
    assert_eq!(client_err(&[kind::ACK | 0x20, 0, 0]), uf("ACK", 0b001));
    assert_eq!(client_err(&[kind::PING | 0x40]), uf("PING", 0b010));
    assert_eq!(client_err(&[kind::PONG | 0xc0]), uf("PONG", 0b110));
    assert_eq!(client_err(&[kind::BYE | 0xe0]), uf("BYE", 0b111));
    assert_eq!(server_err(&[kind::WELCOME | 0x20]), uf("WELCOME", 0b001));
    assert_eq!(server_err(&[kind::ROOM | 0x40]), uf("ROOM", 0b010));
    assert_eq!(server_err(&[kind::LEFT | 0x20]), uf("LEFT", 0b001));
    assert_eq!(server_err(&[kind::PUBACK | 0x20]), uf("PUBACK", 0b001));
    assert_eq!(server_err(&[kind::GAP | 0x20]), uf("GAP", 0b001));
    assert_eq!(server_err(&[kind::ERROR | 0x40]), uf("ERROR", 0b010));
    assert_eq!(server_err(&[kind::GOAWAY | 0x20]), uf("GOAWAY", 0b001));
    assert_eq!(server_err(&[kind::PING | 0x80]), uf("PING", 0b100));
    assert_eq!(
        DecodeError::UndefinedFlags {
            frame: "x",
            flags: 1
        }
        .code(),
        ErrorCode::Malformed
    );
}

// ---------------------------------------------------------------------------------------
// Field contents
// ---------------------------------------------------------------------------------------

#[test]
fn invalid_utf8() {
    let iu = |field| DecodeError::InvalidUtf8 { field };
    assert_eq!(client_err(&[kind::SUBSCRIBE, 2, 0xc3, 0x28]), iu("name"));
    assert_eq!(
        server_err(&[kind::WELCOME, 1, 0, 0, 0, 0, 1, 0xff]),
        iu("user")
    );
    assert_eq!(
        server_err(&[kind::DELIVER | NEW_SENDER, 0, 0, 1, 0x80, 0]),
        iu("sender")
    );
    assert_eq!(server_err(&[kind::ERROR, 1, 0, 1, 0xfe]), iu("message"));
    assert_eq!(
        server_err(&[kind::GOAWAY, 1, 0, 3, 0xed, 0xa0, 0x80]),
        iu("message")
    );
    // The token is bytes, not text.
    assert!(dec_client(&framed(&[kind::HELLO, 1, 0, 1, 0xff])).is_ok());
    assert_eq!(
        DecodeError::InvalidUtf8 { field: "x" }.code(),
        ErrorCode::Malformed
    );
}

#[test]
fn name_token_and_text_limits() {
    let limits = Limits::default();
    let long_name = |n: usize| cat(&[&v(n as u64), &vec![b'a'; n]]);
    // A name of exactly the limit is fine; one more byte is not.
    assert!(dec_client(&framed(&cat(&[&[kind::SUBSCRIBE], &long_name(255)]))).is_ok());
    let err = client_err(&cat(&[&[kind::SUBSCRIBE], &long_name(256)]));
    assert_eq!(
        err,
        DecodeError::TooLong {
            field: "name",
            len: 256,
            max: limits.max_name_len
        }
    );
    assert_eq!(err.code(), ErrorCode::LimitExceeded);
    // The length is checked before the bytes are looked for: a claimed length past the
    // limit is TooLong even when the body ends right after it.
    let err = client_err(&cat(&[&[kind::SUBSCRIBE], &v(1 << 40)]));
    assert_eq!(
        err,
        DecodeError::TooLong {
            field: "name",
            len: 1 << 40,
            max: 255
        }
    );

    let hello = |n: usize| cat(&[&[kind::HELLO, 1, 0], &v(n as u64), &vec![b't'; n]]);
    assert!(dec_client(&framed(&hello(8192))).is_ok());
    assert_eq!(
        client_err(&hello(8193)),
        DecodeError::TooLong {
            field: "token",
            len: 8193,
            max: limits.max_token_len
        }
    );
    let welcome = cat(&[&[kind::WELCOME, 1, 0, 0, 0, 0], &long_name(256)]);
    assert_eq!(
        server_err(&welcome),
        DecodeError::TooLong {
            field: "user",
            len: 256,
            max: 255
        }
    );
    let sender = cat(&[&[kind::DELIVER | NEW_SENDER, 0, 0], &long_name(256), &[0]]);
    assert_eq!(
        server_err(&sender),
        DecodeError::TooLong {
            field: "sender",
            len: 256,
            max: 255
        }
    );
    let error = |n: usize| cat(&[&[kind::ERROR, 1, 0], &v(n as u64), &vec![b'e'; n]]);
    assert!(dec_server(&framed(&error(1024))).is_ok());
    assert_eq!(
        server_err(&error(1025)),
        DecodeError::TooLong {
            field: "message",
            len: 1025,
            max: limits.max_text_len
        }
    );
}

fn resume_hello(groups: &[(u64, usize)]) -> Vec<u8> {
    let mut body = vec![kind::HELLO | 0x20, 1, 0, 0];
    varint(&mut body, groups.len() as u64);
    for &(epoch, count) in groups {
        varint(&mut body, epoch);
        varint(&mut body, count as u64);
        for i in 0..count {
            body.extend_from_slice(&(i as u64).to_le_bytes());
            body.push(0);
        }
    }
    body
}

#[test]
fn resume_limit() {
    let max = Limits::default().max_resume_entries;
    // At the limit, across several groups: fine.
    let ok = resume_hello(&[(1, 1000), (2, 1000), (3, max - 2000)]);
    let Ok(Some(ClientFrame::Hello(h))) = dec_client(&framed(&ok)) else {
        panic!()
    };
    assert_eq!(h.resume.len(), max);
    // One past it: refused as soon as the count is read, before the entries.
    let over = resume_hello(&[(1, 1000), (2, max - 999)]);
    let err = client_err(&over);
    assert_eq!(
        err,
        DecodeError::TooLong {
            field: "resume list",
            len: max as u64 + 1,
            max
        }
    );
    assert_eq!(err.code(), ErrorCode::LimitExceeded);
    let mut claim = vec![kind::HELLO | 0x20, 1, 0, 0, 1, 1];
    claim.extend(v(max as u64 + 1));
    assert!(matches!(
        client_err(&claim),
        DecodeError::TooLong {
            field: "resume list",
            ..
        }
    ));
}

#[test]
fn ack_limit() {
    let max = Limits::default().max_ack_entries;
    let ack = |n: usize| {
        let mut body = vec![kind::ACK];
        for i in 0..n {
            varint(&mut body, i as u64);
            varint(&mut body, 1000 + i as u64);
        }
        body
    };
    let Ok(Some(ClientFrame::Ack(a))) = dec_client(&framed(&ack(max))) else {
        panic!()
    };
    assert_eq!(a.len(), max);
    let err = client_err(&ack(max + 1));
    assert_eq!(
        err,
        DecodeError::TooLong {
            field: "ack pairs",
            len: max as u64 + 1,
            max
        }
    );
    assert_eq!(err.code(), ErrorCode::LimitExceeded);
}

#[test]
fn unsupported_version() {
    for version in [0u8, 4, 0xff] {
        let err = client_err(&[kind::HELLO, version, 0, 0]);
        assert_eq!(err, DecodeError::UnsupportedVersion { version });
        assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
    }
    // Only the version is read: whatever a later version puts after it (and in the flags)
    // is not judged by this decoder.
    assert_eq!(
        client_err(&[kind::HELLO | 0xe0, 4, 0xff, 0xff]),
        DecodeError::UnsupportedVersion { version: 4 }
    );
}

#[test]
fn the_device_flag_is_version_2_only() {
    // Version 1 defines only RESUME (0x20): a device id there is an undefined flag.
    assert_eq!(
        client_err(&[kind::HELLO | 0x40, 1, 0, 1, b'a', 1, 0, 0, 0, 0, 0, 0, 0]),
        DecodeError::UndefinedFlags {
            frame: "HELLO",
            flags: 0b010
        }
    );
    // Version 2 reads it; a truncated one is malformed.
    assert!(
        dec_client(&framed(&[
            kind::HELLO | 0x40,
            2,
            0,
            1,
            b'a',
            1,
            0,
            0,
            0,
            0,
            0,
            0,
            0
        ]))
        .is_ok()
    );
    assert!(matches!(
        client_err(&[kind::HELLO | 0x40, 2, 0, 1, b'a', 1, 0, 0]),
        DecodeError::Truncated { .. }
    ));
    // 0x80 stays undefined in version 2.
    assert!(matches!(
        client_err(&[kind::HELLO | 0x80, 2, 0, 1, b'a']),
        DecodeError::UndefinedFlags { .. }
    ));
}

#[test]
fn invalid_values() {
    let inv = |field, why| DecodeError::Invalid { field, why };
    // An ephemeral event has no sequence.
    assert_eq!(
        server_err(&[kind::DELIVER | EPHEMERAL | SEQ, 0, 5, 0, 0]),
        inv("DELIVER flags", "an ephemeral event has no sequence")
    );
    // GAP from 0, and GAP to < from.
    let gap = inv("GAP range", "empty or starts at 0");
    assert_eq!(server_err(&[kind::GAP, 0, 0, 4]), gap);
    assert_eq!(server_err(&[kind::GAP, 0, 5, 4]), gap);
    assert!(
        dec_server(&framed(&[kind::GAP, 0, 5, 5])).is_ok(),
        "a gap of one"
    );
    // ROOM head before its cursor.
    let room =
        |cursor: u8, head: u8| cat(&[&[kind::ROOM, 0], &[0; 8], &[1, cursor, head, 1, b'r']]);
    assert_eq!(
        server_err(&room(5, 4)),
        inv("ROOM head", "before the cursor")
    );
    assert!(dec_server(&framed(&room(5, 5))).is_ok());
    // Empty names.
    assert_eq!(client_err(&[kind::SUBSCRIBE, 0]), inv("name", "empty"));
    assert_eq!(
        server_err(&[kind::WELCOME, 1, 0, 0, 0, 0, 0]),
        inv("user", "empty")
    );
    assert_eq!(
        server_err(&[kind::DELIVER | NEW_SENDER, 0, 0, 0, 0]),
        inv("sender", "empty")
    );
    // The resume flag with nothing to resume, an empty group, an ACK without pairs.
    assert_eq!(
        client_err(&[kind::HELLO | 0x20, 1, 0, 0, 0]),
        inv("resume groups", "zero groups with the resume flag set")
    );
    assert_eq!(
        client_err(&[kind::HELLO | 0x20, 1, 0, 0, 1, 7, 0]),
        inv("resume count", "empty group")
    );
    assert_eq!(client_err(&[kind::ACK]), inv("ACK", "no pairs"));
    assert_eq!(inv("x", "y").code(), ErrorCode::Malformed);
}

#[test]
fn error_messages_name_the_problem() {
    assert_eq!(
        DecodeError::FrameTooLarge {
            len: 70000,
            max: 65536
        }
        .to_string(),
        "frame of 70000 bytes exceeds the limit of 65536"
    );
    assert_eq!(
        DecodeError::UnknownFrameType(0x1f).to_string(),
        "unknown frame type 0x1f"
    );
    assert_eq!(
        DecodeError::UndefinedFlags {
            frame: "BYE",
            flags: 0b101
        }
        .to_string(),
        "undefined flags 0b101 on BYE"
    );
}

#[test]
fn read_and_receipt_are_malformed_without_their_fields() {
    // READ: alias and sequence, nothing after.
    assert!(matches!(
        client_err(&[kind::READ, 0]),
        DecodeError::Truncated { .. }
    ));
    assert_eq!(
        client_err(&[kind::READ, 0, 5, 1]),
        DecodeError::TrailingBytes {
            frame: "READ",
            extra: 1
        }
    );
    assert_eq!(
        client_err(&[kind::READ | 0x20, 0, 5]),
        DecodeError::UndefinedFlags {
            frame: "READ",
            flags: 0b001
        }
    );
    // RECEIPT: at least one entry; read (delivered - unread) never below 0.
    assert_eq!(
        server_err(&[kind::RECEIPT, 0]),
        DecodeError::Invalid {
            field: "RECEIPT",
            why: "no entries"
        }
    );
    assert_eq!(
        server_err(&[kind::RECEIPT, 0, 0, 3, 4]),
        DecodeError::Invalid {
            field: "receipt unread",
            why: "read before sequence 0"
        }
    );
    assert!(matches!(
        server_err(&[kind::RECEIPT, 0, 0, 3]),
        DecodeError::Truncated { .. }
    ));
    // A member slot that defines a name carries one.
    assert!(matches!(
        server_err(&[kind::RECEIPT, 0, 1, 3]),
        DecodeError::Truncated { .. }
    ));
}
