//! Golden fixtures: the exact bytes of representative frames, in `testdata/*.bin`.
//!
//! For each fixture this test checks three things against each other:
//! 1. the bytes assembled here by hand, field by field, in the order and encoding of the
//!    layout tables in PROTOCOL.md (independently of the codec's encoder);
//! 2. what the codec encodes for the frame, and what it decodes from the file;
//! 3. the file committed under `testdata/`.
//!
//! And PROTOCOL.md's hex dumps, each marked `<!-- fixture: NAME -->`, must be the fixtures'
//! bytes exactly.
//!
//! The files are written once with `PABAL_BLESS=1 cargo test -p pabal-codec --test golden`;
//! a normal run only reads them and fails on any difference.

#![allow(clippy::unwrap_used)] // reason: a test fails loudly on the first surprise

mod util;

use std::path::PathBuf;

use bytes::Bytes;
use pabal_codec::{
    Ack, ClientFrame, Deliver, DeliverHeader, ErrorCode, ErrorFrame, Gap, GoAway, GoAwayReason,
    Hello, Left, LeftReason, Ping, Pong, PubAck, Publish, Read, Receipt, ReceiptEntry, ResumeEntry,
    ResumeList, Room, ServerFrame, Subscribe, Text, Unsubscribe, Welcome, room_id,
};
use util::*;

/// 2026-01-01T00:00:00Z in ms: the relay's epoch (its start time) in the examples.
const EPOCH: u64 = 1_767_225_600_000;
/// An older epoch: a channel whose owner restarted at another time.
const OLD_EPOCH: u64 = 1_766_000_000_000;
/// WELCOME's server time: the base of the first DELIVER's time delta.
const T0: u64 = EPOCH + 3_600_000;
const MESSAGE: &[u8] = b"see you at 7 tonight";
/// A phone's device id (version 2): drawn at random once per installation.
const DEVICE: u64 = 0x5eed_0fb0_b5ee_d001;

enum Frame {
    Client(ClientFrame),
    Server(ServerFrame),
}

impl Frame {
    fn encode(&self) -> Vec<u8> {
        match self {
            Frame::Client(f) => enc_client(f),
            Frame::Server(f) => enc_server(f),
        }
    }

    fn decodes_from(&self, bytes: &[u8]) -> bool {
        match self {
            Frame::Client(f) => dec_client(bytes) == Ok(Some(f.clone())),
            Frame::Server(f) => dec_server(bytes) == Ok(Some(f.clone())),
        }
    }
}

struct Fixture {
    name: &'static str,
    frame: Frame,
    /// The frame assembled by hand from PROTOCOL.md's layout table.
    by_hand: Vec<u8>,
}

/// Length prefix + body, from the body's parts.
fn frame(parts: &[&[u8]]) -> Vec<u8> {
    let body = parts.concat();
    let mut out = v(body.len() as u64);
    out.extend(body);
    out
}

fn text(s: &str) -> Vec<u8> {
    let mut out = v(s.len() as u64);
    out.extend_from_slice(s.as_bytes());
    out
}

fn le(id: u64) -> [u8; 8] {
    id.to_le_bytes()
}

fn zz(d: i64) -> Vec<u8> {
    v(((d << 1) ^ (d >> 63)) as u64)
}

fn hiking() -> u64 {
    room_id(false, "hiking-club")
}
fn family() -> u64 {
    room_id(false, "family")
}
fn coffee() -> u64 {
    room_id(true, "coffee-news")
}

/// WELCOME in protocol version `version`: the same fields, only the version byte differs.
fn welcome_fixture(name: &'static str, version: u8) -> Fixture {
    use pabal_codec::frame::kind::WELCOME;
    Fixture {
        name,
        frame: Frame::Server(ServerFrame::Welcome(Welcome {
            version,
            conn_id: 42,
            server_time_ms: T0,
            heartbeat_secs: 600,
            max_frame_len: 65536,
            user: Text::from("bob"),
        })),
        by_hand: frame(&[
            &[WELCOME, version],
            &v(42),
            &v(T0),
            &v(600),
            &v(65536),
            &text("bob"),
        ]),
    }
}

fn fixtures() -> Vec<Fixture> {
    use pabal_codec::frame::kind::*;
    let ann = || Some(Text::from("ann"));
    vec![
        // --- client frames ---------------------------------------------------------------
        Fixture {
            name: "hello_resume",
            frame: Frame::Client(ClientFrame::Hello(Hello {
                version: 1,
                heartbeat_secs: 600,
                token: Bytes::from_static(b"bob"),
                device_id: None,
                resume: ResumeList::from_entries(&[
                    ResumeEntry {
                        room_id: hiking(),
                        epoch: EPOCH,
                        last_seq: 41,
                    },
                    ResumeEntry {
                        room_id: family(),
                        epoch: EPOCH,
                        last_seq: 7,
                    },
                    ResumeEntry {
                        room_id: coffee(),
                        epoch: OLD_EPOCH,
                        last_seq: 300,
                    },
                ]),
            })),
            by_hand: frame(&[
                &[HELLO | 0x20], // RESUME flag
                &[1],            // version
                &v(600),         // heartbeat asked for
                &text("bob"),    // token
                &v(2),           // epoch groups
                &v(EPOCH),
                &v(2),
                &le(hiking()),
                &v(41),
                &le(family()),
                &v(7),
                &v(OLD_EPOCH),
                &v(1),
                &le(coffee()),
                &v(300),
            ]),
        },
        Fixture {
            name: "hello",
            frame: Frame::Client(ClientFrame::Hello(Hello {
                version: 1,
                heartbeat_secs: 0,
                token: Bytes::from_static(b"ann"),
                device_id: None,
                resume: ResumeList::default(),
            })),
            by_hand: frame(&[&[HELLO, 1], &v(0), &text("ann")]),
        },
        Fixture {
            name: "hello_v2_device",
            frame: Frame::Client(ClientFrame::Hello(Hello {
                version: 2,
                heartbeat_secs: 600,
                token: Bytes::from_static(b"bob"),
                device_id: Some(DEVICE),
                resume: ResumeList::from_entries(&[ResumeEntry {
                    room_id: hiking(),
                    epoch: EPOCH,
                    last_seq: 41,
                }]),
            })),
            by_hand: frame(&[
                &[HELLO | 0x20 | 0x40], // RESUME and DEVICE flags
                &[2],                   // version
                &v(600),                // heartbeat asked for
                &text("bob"),           // token
                &le(DEVICE),            // device id
                &v(1),                  // epoch groups
                &v(EPOCH),
                &v(1),
                &le(hiking()),
                &v(41),
            ]),
        },
        Fixture {
            name: "subscribe",
            frame: Frame::Client(ClientFrame::Subscribe(Subscribe {
                room: false,
                name: Text::from("coffee-news"),
            })),
            by_hand: frame(&[&[SUBSCRIBE], &text("coffee-news")]),
        },
        Fixture {
            name: "unsubscribe_block",
            frame: Frame::Client(ClientFrame::Unsubscribe(Unsubscribe {
                alias: 3,
                block: true,
            })),
            by_hand: frame(&[&[UNSUBSCRIBE | 0x20], &v(3)]),
        },
        Fixture {
            name: "publish",
            frame: Frame::Client(ClientFrame::Publish(Publish {
                alias: 2,
                msg_id: Some(5),
                ack: None,
                payload: Bytes::from_static(MESSAGE),
            })),
            by_hand: frame(&[&[PUBLISH], &v(2), &v(5), MESSAGE]),
        },
        Fixture {
            name: "publish_with_ack",
            frame: Frame::Client(ClientFrame::Publish(Publish {
                alias: 2,
                msg_id: Some(6),
                ack: Some(43),
                payload: Bytes::from_static(b"ok!"),
            })),
            by_hand: frame(&[&[PUBLISH | 0x40], &v(2), &v(6), &v(43), b"ok!"]),
        },
        Fixture {
            name: "publish_ephemeral",
            frame: Frame::Client(ClientFrame::Publish(Publish {
                alias: 2,
                msg_id: None,
                ack: None,
                payload: Bytes::from_static(&[0x01]),
            })),
            by_hand: frame(&[&[PUBLISH | 0x20], &v(2), &[0x01]]),
        },
        Fixture {
            name: "ack",
            frame: Frame::Client(ClientFrame::Ack(Ack::from_pairs(&[(0, 42), (1, 1007)]))),
            by_hand: frame(&[&[ACK], &v(0), &v(42), &v(1), &v(1007)]),
        },
        Fixture {
            name: "ping",
            frame: Frame::Client(ClientFrame::Ping(Ping {
                interval_secs: None,
            })),
            by_hand: frame(&[&[PING]]),
        },
        Fixture {
            name: "ping_interval",
            frame: Frame::Client(ClientFrame::Ping(Ping {
                interval_secs: Some(1200),
            })),
            by_hand: frame(&[&[PING | 0x20], &v(1200)]),
        },
        Fixture {
            name: "pong",
            frame: Frame::Client(ClientFrame::Pong(Pong {
                interval_secs: None,
            })),
            by_hand: frame(&[&[PONG]]),
        },
        Fixture {
            name: "bye",
            frame: Frame::Client(ClientFrame::Bye),
            by_hand: frame(&[&[BYE]]),
        },
        // --- server frames ---------------------------------------------------------------
        welcome_fixture("welcome", 1),
        welcome_fixture("welcome_v2", 2),
        Fixture {
            name: "room",
            frame: Frame::Server(ServerFrame::Room(Room {
                alias: 2,
                channel: true,
                room_id: coffee(),
                epoch: EPOCH,
                cursor: 0,
                head: 120,
                name: Text::from("coffee-news"),
            })),
            by_hand: frame(&[
                &[ROOM | 0x20], // CHANNEL flag
                &v(2),
                &le(coffee()),
                &v(EPOCH),
                &v(0),
                &v(120),
                &text("coffee-news"),
            ]),
        },
        Fixture {
            name: "left",
            frame: Frame::Server(ServerFrame::Left(Left {
                alias: 1,
                reason: LeftReason::UnknownRoom,
            })),
            by_hand: frame(&[&[LEFT], &v(1), &v(3)]),
        },
        Fixture {
            name: "left_restarted",
            frame: Frame::Server(ServerFrame::Left(Left {
                alias: 0,
                reason: LeftReason::Restarted,
            })),
            by_hand: frame(&[&[LEFT], &v(0), &v(4)]),
        },
        Fixture {
            name: "puback",
            frame: Frame::Server(ServerFrame::PubAck(PubAck { msg_id: 5, seq: 42 })),
            by_hand: frame(&[&[PUBACK], &v(5), &v(42)]),
        },
        Fixture {
            name: "deliver_new_sender",
            frame: Frame::Server(ServerFrame::Deliver(Deliver {
                header: DeliverHeader {
                    alias: 0,
                    seq: None,
                    ephemeral: false,
                    sender_alias: 0,
                    new_sender: ann(),
                    ts_delta_ms: 1234,
                },
                payload: Bytes::from_static(MESSAGE),
            })),
            by_hand: frame(&[
                &[DELIVER | 0x40],
                &v(0),
                &v(0),
                &text("ann"),
                &zz(1234),
                MESSAGE,
            ]),
        },
        Fixture {
            name: "deliver_implicit",
            frame: Frame::Server(ServerFrame::Deliver(Deliver {
                header: DeliverHeader {
                    alias: 0,
                    seq: None,
                    ephemeral: false,
                    sender_alias: 0,
                    new_sender: None,
                    ts_delta_ms: 1234,
                },
                payload: Bytes::from_static(MESSAGE),
            })),
            by_hand: frame(&[&[DELIVER], &v(0), &v(0), &zz(1234), MESSAGE]),
        },
        Fixture {
            name: "deliver_seq",
            frame: Frame::Server(ServerFrame::Deliver(Deliver {
                header: DeliverHeader {
                    alias: 0,
                    seq: Some(44),
                    ephemeral: false,
                    sender_alias: 1,
                    new_sender: None,
                    ts_delta_ms: -20,
                },
                payload: Bytes::from_static(b"ok"),
            })),
            by_hand: frame(&[&[DELIVER | 0x20], &v(0), &v(44), &v(1), &zz(-20), b"ok"]),
        },
        Fixture {
            name: "deliver_ephemeral",
            frame: Frame::Server(ServerFrame::Deliver(Deliver {
                header: DeliverHeader {
                    alias: 0,
                    seq: None,
                    ephemeral: true,
                    sender_alias: 0,
                    new_sender: None,
                    ts_delta_ms: 0,
                },
                payload: Bytes::from_static(&[0x01]),
            })),
            by_hand: frame(&[&[DELIVER | 0x80], &v(0), &v(0), &zz(0), &[0x01]]),
        },
        Fixture {
            name: "gap",
            frame: Frame::Server(ServerFrame::Gap(Gap {
                alias: 1,
                from: 8,
                to: 1007,
            })),
            by_hand: frame(&[&[GAP], &v(1), &v(8), &v(1007)]),
        },
        Fixture {
            name: "error",
            frame: Frame::Server(ServerFrame::Error(ErrorFrame {
                code: ErrorCode::UnknownAlias,
                fatal: false,
                reference: 9,
                message: Text::from("alias 7 is not bound"),
            })),
            by_hand: frame(&[&[ERROR], &v(19), &v(9), &text("alias 7 is not bound")]),
        },
        Fixture {
            name: "error_fatal",
            frame: Frame::Server(ServerFrame::Error(ErrorFrame {
                code: ErrorCode::UnsupportedVersion,
                fatal: true,
                reference: 0,
                message: Text::from("speaks 1"),
            })),
            by_hand: frame(&[&[ERROR | 0x20], &v(3), &v(0), &text("speaks 1")]),
        },
        Fixture {
            name: "goaway",
            frame: Frame::Server(ServerFrame::GoAway(GoAway {
                reason: GoAwayReason::Shutdown,
                retry_after_ms: 17_250,
                message: Text::from("restart"),
            })),
            by_hand: frame(&[&[GOAWAY], &v(1), &v(17_250), &text("restart")]),
        },
        Fixture {
            name: "pong_interval",
            frame: Frame::Server(ServerFrame::Pong(Pong {
                interval_secs: Some(1200),
            })),
            by_hand: frame(&[&[PONG | 0x20], &v(1200)]),
        },
        // --- version 3: receipts -----------------------------------------------------------
        Fixture {
            name: "hello_v3",
            frame: Frame::Client(ClientFrame::Hello(Hello {
                version: 3,
                heartbeat_secs: 600,
                token: Bytes::from_static(b"bob"),
                device_id: Some(DEVICE),
                resume: ResumeList::default(),
            })),
            by_hand: frame(&[
                &[HELLO | 0x40], // DEVICE flag
                &[3],            // version
                &v(600),
                &text("bob"),
                &le(DEVICE),
            ]),
        },
        welcome_fixture("welcome_v3", 3),
        Fixture {
            name: "read",
            frame: Frame::Client(ClientFrame::Read(Read { alias: 0, seq: 42 })),
            by_hand: frame(&[&[READ], &v(0), &v(42)]),
        },
        Fixture {
            name: "receipt",
            frame: Frame::Server(ServerFrame::Receipt(Receipt {
                alias: 0,
                entries: vec![
                    ReceiptEntry {
                        member_alias: 2,
                        new_member: Some(Text::from("cat")),
                        delivered: 42,
                        read: 40,
                    },
                    ReceiptEntry {
                        member_alias: 0,
                        new_member: None,
                        delivered: 42,
                        read: 42,
                    },
                ],
            })),
            by_hand: frame(&[
                &[RECEIPT],
                &v(0),          // alias
                &v(2 << 1 | 1), // member slot 2, a name follows
                &text("cat"),   // the member
                &v(42),         // delivered up to
                &v(42 - 40),    // delivered - read
                &v(0 << 1),     // member slot 0, already defined
                &v(42),
                &v(0),
            ]),
        },
    ]
}

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

#[test]
fn fixtures_match_the_layout_tables_the_codec_and_the_files() {
    let bless = std::env::var_os("PABAL_BLESS").is_some_and(|v| v == "1");
    let mut failures = Vec::new();
    for f in fixtures() {
        let encoded = f.frame.encode();
        assert_eq!(
            hex(&encoded),
            hex(&f.by_hand),
            "{}: the codec's encoding differs from PROTOCOL.md's table",
            f.name
        );
        assert!(
            f.frame.decodes_from(&encoded),
            "{}: does not decode back",
            f.name
        );
        let path = testdata().join(format!("{}.bin", f.name));
        if bless {
            std::fs::create_dir_all(testdata()).unwrap();
            std::fs::write(&path, &encoded).unwrap();
            continue;
        }
        match std::fs::read(&path) {
            Ok(file) if file == encoded => {
                assert!(
                    f.frame.decodes_from(&file),
                    "{}: file does not decode",
                    f.name
                )
            }
            Ok(file) => failures.push(format!(
                "{}: file differs\n  file:  {}\n  codec: {}",
                f.name,
                hex(&file),
                hex(&encoded)
            )),
            Err(e) => failures.push(format!("{}: {e} (run with PABAL_BLESS=1 once)", f.name)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// No stray fixture files: every `.bin` under testdata/ is one the test knows.
#[test]
fn every_file_is_a_known_fixture() {
    let known: Vec<String> = fixtures()
        .iter()
        .map(|f| format!("{}.bin", f.name))
        .collect();
    for entry in std::fs::read_dir(testdata()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(known.contains(&name), "unknown fixture {name}");
    }
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(testdata().join(format!("{name}.bin"))).unwrap()
}

/// The worked example of PROTOCOL.md, field by field, from the files.
#[test]
fn worked_example_fields() {
    let publish = read("publish");
    assert_eq!(publish.len(), 24);
    assert_eq!(&publish[..4], &[0x17, 0x04, 0x02, 0x05]);
    let Ok(Some(ClientFrame::Publish(p))) = dec_client(&publish) else {
        panic!()
    };
    assert_eq!((p.alias, p.msg_id, p.ack), (2, Some(5), None));
    assert_eq!(&p.payload[..], MESSAGE);

    let first = read("deliver_new_sender");
    assert_eq!(first.len(), 30);
    assert_eq!(
        &first[..10],
        &[0x1d, 0x54, 0x00, 0x00, 0x03, b'a', b'n', b'n', 0xa4, 0x13]
    );
    let Ok(Some(ServerFrame::Deliver(d))) = dec_server(&first) else {
        panic!()
    };
    assert_eq!(d.header.new_sender.as_ref().map(Text::as_str), Some("ann"));
    assert_eq!(
        (d.header.alias, d.header.seq, d.header.sender_alias),
        (0, None, 0)
    );
    assert_eq!(d.header.ts_delta_ms, 1234);
    assert_eq!(&d.payload[..], MESSAGE);

    let steady = read("deliver_implicit");
    assert_eq!(steady.len(), 26);
    assert_eq!(&steady[..6], &[0x19, 0x14, 0x00, 0x00, 0xa4, 0x13]);

    let puback = read("puback");
    assert_eq!(puback, [0x03, 0x13, 0x05, 0x2a]);

    // The client side resolves the fixtures as the example tells: after WELCOME and a
    // resume of hiking-club at 41, both DELIVERs are sequence 42 and 43 from "ann", 1234 ms
    // apart.
    let mut s = pabal_codec::ClientSession::new();
    let ClientFrame::Hello(h) = s.hello(Bytes::from_static(b"bob"), 600) else {
        panic!()
    };
    assert!(h.resume.is_empty());
    let Ok(Some(welcome)) = dec_server(&read("welcome")) else {
        panic!()
    };
    s.apply(welcome).unwrap();
    s.apply(ServerFrame::Room(Room {
        alias: 0,
        channel: false,
        room_id: hiking(),
        epoch: EPOCH,
        cursor: 41,
        head: 41,
        name: Text::from("hiking-club"),
    }))
    .unwrap();
    for (file, seq, ts) in [
        ("deliver_new_sender", 42, T0 + 1234),
        ("deliver_implicit", 43, T0 + 2468),
    ] {
        let Ok(Some(frame)) = dec_server(&read(file)) else {
            panic!()
        };
        match s.apply(frame).unwrap() {
            pabal_codec::Event::Message {
                seq: got,
                sender,
                ts_ms,
                payload,
                ..
            } => {
                assert_eq!(got, Some(seq));
                assert_eq!(sender.as_str(), "ann");
                assert_eq!(ts_ms, ts);
                assert_eq!(&payload[..], MESSAGE);
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Each fixture's decoded values, spelled out (the equality check above covers them too;
/// these read as the documentation of what the files hold).
#[test]
fn fixture_field_values() {
    let Ok(Some(ClientFrame::Hello(h))) = dec_client(&read("hello_resume")) else {
        panic!()
    };
    assert_eq!(
        (h.version, h.heartbeat_secs, &h.token[..]),
        (1, 600, &b"bob"[..])
    );
    let entries: Vec<_> = h.resume.iter().collect();
    assert_eq!(entries.len(), 3);
    assert_eq!(
        (entries[0].room_id, entries[0].epoch, entries[0].last_seq),
        (hiking(), EPOCH, 41)
    );
    assert_eq!(
        (entries[2].room_id, entries[2].epoch, entries[2].last_seq),
        (coffee(), OLD_EPOCH, 300)
    );

    let Ok(Some(ServerFrame::Welcome(w))) = dec_server(&read("welcome")) else {
        panic!()
    };
    assert_eq!((w.version, w.conn_id, w.server_time_ms), (1, 42, T0));
    assert_eq!(
        (w.heartbeat_secs, w.max_frame_len, w.user.as_str()),
        (600, 65536, "bob")
    );

    let Ok(Some(ServerFrame::Room(r))) = dec_server(&read("room")) else {
        panic!()
    };
    assert!(r.channel);
    assert_eq!(
        (r.alias, r.room_id, r.epoch, r.cursor, r.head),
        (2, coffee(), EPOCH, 0, 120)
    );
    assert_eq!(r.name.as_str(), "coffee-news");

    let Ok(Some(ServerFrame::Gap(g))) = dec_server(&read("gap")) else {
        panic!()
    };
    assert_eq!((g.alias, g.from, g.to), (1, 8, 1007));

    let Ok(Some(ServerFrame::Error(e))) = dec_server(&read("error")) else {
        panic!()
    };
    assert_eq!(
        (e.code, e.fatal, e.reference),
        (ErrorCode::UnknownAlias, false, 9)
    );
    let Ok(Some(ServerFrame::Error(e))) = dec_server(&read("error_fatal")) else {
        panic!()
    };
    assert_eq!((e.code, e.fatal), (ErrorCode::UnsupportedVersion, true));

    let Ok(Some(ServerFrame::GoAway(g))) = dec_server(&read("goaway")) else {
        panic!()
    };
    assert_eq!(
        (g.reason, g.retry_after_ms),
        (GoAwayReason::Shutdown, 17_250)
    );

    let Ok(Some(ServerFrame::Left(l))) = dec_server(&read("left")) else {
        panic!()
    };
    assert_eq!((l.alias, l.reason), (1, LeftReason::UnknownRoom));
    let Ok(Some(ServerFrame::Left(l))) = dec_server(&read("left_restarted")) else {
        panic!()
    };
    assert_eq!((l.alias, l.reason), (0, LeftReason::Restarted));

    let Ok(Some(ServerFrame::Ping(p))) = dec_server(&read("ping")) else {
        panic!()
    };
    assert_eq!(
        p.interval_secs, None,
        "PING is the same bytes in both directions"
    );
    let Ok(Some(ClientFrame::Ping(p))) = dec_client(&read("ping_interval")) else {
        panic!()
    };
    assert_eq!(p.interval_secs, Some(1200));

    let Ok(Some(ServerFrame::Deliver(d))) = dec_server(&read("deliver_seq")) else {
        panic!()
    };
    assert_eq!(
        (d.header.seq, d.header.sender_alias, d.header.ts_delta_ms),
        (Some(44), 1, -20)
    );
    let Ok(Some(ServerFrame::Deliver(d))) = dec_server(&read("deliver_ephemeral")) else {
        panic!()
    };
    assert!(d.header.ephemeral);
    assert_eq!(d.header.seq, None);
}

/// Hex dumps in PROTOCOL.md marked `<!-- fixture: NAME -->` are the fixtures' bytes. A dump
/// is the next fenced block; each line is an offset, then two-digit hex bytes, then an
/// optional `|ascii|` column.
#[test]
fn protocol_md_hex_dumps_are_the_fixtures() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("PROTOCOL.md");
    let doc = std::fs::read_to_string(&path).expect("codec/PROTOCOL.md");
    let mut seen = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- fixture: ")
            .and_then(|r| r.strip_suffix(" -->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.starts_with("```"),
            "{name}: marker not followed by a fenced block"
        );
        let mut bytes = Vec::new();
        for l in lines.by_ref() {
            if l.starts_with("```") {
                break;
            }
            for tok in l.split_whitespace().skip(1) {
                if tok.starts_with('|') {
                    break;
                }
                assert_eq!(tok.len(), 2, "{name}: bad hex token {tok:?}");
                bytes.push(u8::from_str_radix(tok, 16).expect("hex"));
            }
        }
        assert_eq!(
            hex(&bytes),
            hex(&read(name)),
            "PROTOCOL.md's dump of {name}"
        );
        seen.push(name.to_string());
    }
    for required in [
        "publish",
        "deliver_new_sender",
        "deliver_implicit",
        "puback",
    ] {
        assert!(
            seen.iter().any(|s| s == required),
            "PROTOCOL.md lacks the {required} dump"
        );
    }
}

/// Generates the hex dumps for PROTOCOL.md (run with `--ignored --nocapture`).
#[test]
#[ignore = "prints PROTOCOL.md's hex dumps"]
fn print_hex_dumps() {
    for f in fixtures() {
        let bytes = f.frame.encode();
        println!("<!-- fixture: {} -->\n```text", f.name);
        for (i, chunk) in bytes.chunks(16).enumerate() {
            let hexes: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            let ascii: String = chunk
                .iter()
                .map(|&b| {
                    if (0x20..0x7f).contains(&b) {
                        b as char
                    } else {
                        '.'
                    }
                })
                .collect();
            println!("{:04x}  {:<47}  |{ascii}|", i * 16, hexes.join(" "));
        }
        println!("```\n");
    }
}

/// The room id test vectors of PROTOCOL.md ("Room ids").
#[test]
fn room_id_test_vectors() {
    assert_eq!(room_id(false, ""), 0xaf63_ef4c_8602_0cd5);
    assert_eq!(room_id(false, "hiking-club"), 0x631e_d6d8_da58_e40c);
    assert_eq!(room_id(true, "coffee-news"), 0x2281_d104_ec84_e802);
    assert_eq!(
        room_id(false, "hiking-club").to_le_bytes(),
        [0x0c, 0xe4, 0x58, 0xda, 0xd8, 0xd6, 0x1e, 0x63]
    );
}
