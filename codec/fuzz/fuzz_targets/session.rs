//! Decoded server frames fed into `ClientSession::apply`: whatever a relay sends, the
//! client's session state machine returns an event or an error, never panics, and keeps its
//! cursors where the events say.
//!
//! Input: byte 0 picks options (bit 0: start already welcomed with three rooms bound; bit 1:
//! publish before every frame, so PUBACKs find messages in flight); byte 1 picks the chunk
//! split; the rest is the relay's byte stream.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use pabal_codec::{ClientSession, Decoder, Event, Room, ServerFrame, Text, Welcome, room_id};

#[path = "common.rs"]
mod common;

fn primed() -> ClientSession {
    let mut s = ClientSession::new();
    let _ = s.apply(ServerFrame::Welcome(Welcome {
        version: 1,
        conn_id: 1,
        server_time_ms: 1_767_225_600_000,
        heartbeat_secs: 240,
        max_frame_len: 65536,
        user: Text::from_static("bob"),
    }));
    for (alias, name, cursor) in [(0u32, "a", 0u64), (1, "b", 10), (2, "c", 127)] {
        let _ = s.apply(ServerFrame::Room(Room {
            alias,
            channel: alias == 2,
            room_id: room_id(alias == 2, name),
            epoch: 7,
            cursor,
            head: cursor + 5,
            name: Text::from(name),
        }));
    }
    s
}

/// A new connection: HELLO must be a valid, decodable frame whatever the session went
/// through.
fn reconnect(s: &mut ClientSession) {
    let hello = s.hello(Bytes::from_static(b"bob"), 0);
    let mut buf = BytesMut::new();
    hello.encode(&mut buf);
    let back = Decoder::new(pabal_codec::Limits {
        max_resume_entries: usize::MAX,
        ..Default::default()
    })
    .decode_client(&mut buf);
    assert_eq!(back, Ok(Some(hello)));
}

fuzz_target!(|data: &[u8]| {
    let Some((&options, rest)) = data.split_first() else {
        return;
    };
    let Some((input, cut)) = common::split(rest) else {
        return;
    };
    let mut session = if options & 1 != 0 {
        primed()
    } else {
        ClientSession::new()
    };
    let publish_each = options & 2 != 0;
    let frames: Vec<Result<ServerFrame, _>> = common::run(&Decoder::default(), input, &[cut]);
    for (i, frame) in frames.into_iter().enumerate() {
        let Ok(frame) = frame else { break };
        if publish_each {
            let _ = session.publish(i as u32 % 4, Bytes::from_static(b"x"), None);
        }
        match session.apply(frame) {
            Ok(Event::Message {
                alias,
                seq: Some(seq),
                ..
            }) => {
                assert_eq!(session.room(alias).map(|r| r.cursor), Some(seq));
            }
            Ok(Event::Gap { alias, to, .. }) => {
                assert_eq!(session.room(alias).map(|r| r.cursor), Some(to));
            }
            Ok(Event::Bound { alias, room, .. }) => {
                assert_eq!(session.room(alias), Some(&room));
            }
            Ok(Event::Left { alias, .. }) => assert!(session.room(alias).is_none()),
            Ok(Event::GoAway(_)) | Err(_) => reconnect(&mut session),
            Ok(_) => {}
        }
    }
});
