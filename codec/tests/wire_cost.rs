//! The figures of PROTOCOL.md's "Bytes on the wire" section, computed: pabal's from real
//! frames, MQTT's from the packet layouts of the MQTT 3.1.1 and 5.0 specifications, NATS's
//! and XMPP's from the literal text of the protocol lines and stanzas, written out here.
//! If a number in the table changes, this test says so.
//!
//! Shared assumptions: a 20-byte chat body ("see you at 7 tonight"), an 11-character topic,
//! subject or room name ("hiking-club"), a 150-byte JWT, a 10-character MQTT client id.

#![allow(clippy::unwrap_used)] // reason: a test fails loudly on the first surprise

mod util;

use bytes::Bytes;
use pabal_codec::varint::len_u64;
use pabal_codec::{
    ClientFrame, Deliver, DeliverHeader, Hello, Ping, Pong, PubAck, Publish, ResumeEntry,
    ResumeList, ServerFrame, Text, Welcome,
};
use util::*;

const BODY: &str = "see you at 7 tonight";
const TOPIC: &str = "hiking-club";
const JWT_LEN: usize = 150;
const EPOCH: u64 = 1_767_225_600_000;

fn client_len(f: &ClientFrame) -> usize {
    enc_client(f).len()
}

fn server_len(f: &ServerFrame) -> usize {
    enc_server(f).len()
}

/// MQTT's "Remaining Length" is a 7-bit varint like ours.
fn mqtt_packet(remaining: usize) -> usize {
    1 + len_u64(remaining as u64) + remaining
}

fn deliver(new_sender: bool, ts_delta_ms: i64) -> usize {
    server_len(&ServerFrame::Deliver(Deliver {
        header: DeliverHeader {
            alias: 0,
            seq: None,
            ephemeral: false,
            sender_alias: 0,
            new_sender: new_sender.then(|| Text::from("ann")),
            ts_delta_ms,
        },
        payload: Bytes::from_static(BODY.as_bytes()),
    }))
}

#[test]
fn a_delivered_message() {
    assert_eq!(BODY.len(), 20);
    assert_eq!(TOPIC.len(), 11);
    // pabal: steady state with the previous DELIVER up to 8.191 s before; the first message
    // from a sender on this connection adds its id once.
    assert_eq!(
        deliver(false, 0),
        25,
        "under 64 ms the time delta is one byte"
    );
    assert_eq!(deliver(false, 63), 25);
    assert_eq!(deliver(false, 64), 26);
    assert_eq!(deliver(false, 1234), 26);
    assert_eq!(deliver(false, 8191), 26);
    assert_eq!(deliver(false, 8192), 27);
    assert_eq!(deliver(false, 1_048_575), 27, "up to 17.5 min");
    assert_eq!(deliver(false, 1_048_576), 28);
    assert_eq!(deliver(false, 134_217_727), 28, "up to 37 h");
    assert_eq!(deliver(true, 1234), 30);
    // Framing overhead over the body.
    assert_eq!(deliver(false, 1234) - BODY.len(), 6);

    // MQTT 3.1.1 PUBLISH: fixed header (1 + remaining length), topic (2 + 11), packet id (2,
    // QoS 1 only), payload.
    assert_eq!(mqtt_packet(2 + 11 + 20), 35, "QoS 0");
    assert_eq!(mqtt_packet(2 + 11 + 2 + 20), 37, "QoS 1");
    // MQTT 5 adds a property length (1 byte for no properties); a topic alias (property
    // 0x23, 3 bytes) lets later PUBLISHes send an empty topic.
    assert_eq!(mqtt_packet(2 + 11 + 1 + 20), 36, "QoS 0");
    assert_eq!(mqtt_packet(2 + 11 + 2 + 1 + 20), 38, "QoS 1");
    assert_eq!(mqtt_packet(2 + 2 + 1 + 3 + 20), 30, "QoS 1, topic alias");
    // The same formula gives LINKS.md's figures for a 29-byte body.
    assert_eq!(mqtt_packet(2 + 11 + 29), 44);
    assert_eq!(mqtt_packet(2 + 11 + 2 + 29), 46);
    assert_eq!(mqtt_packet(2 + 11 + 2 + 1 + 29), 47);
    assert_eq!(mqtt_packet(2 + 2 + 1 + 3 + 29), 39);

    // NATS: `MSG <subject> <sid> <#bytes>\r\n<payload>\r\n`, subscription id "1".
    let msg = format!("MSG {TOPIC} 1 {}\r\n{BODY}\r\n", BODY.len());
    assert_eq!(msg.len(), 44);
    assert_eq!(
        format!("MSG {TOPIC} 1 29\r\n{}\r\n", "x".repeat(29)).len(),
        53
    );

    // XMPP: a MUC groupchat message as delivered, without and with the stanza-id a server
    // adds for message archive management (XEP-0359).
    let xmpp = format!(
        "<message from='{TOPIC}@muc.example.com/ann' to='bob@example.com/phone' \
         type='groupchat' id='5'><body>{BODY}</body></message>"
    );
    assert_eq!(xmpp.len(), 142);
    let stanza_id = format!(
        "<stanza-id xmlns='urn:xmpp:sid:0' id='Xy3kPq9sLmN2' by='{TOPIC}@muc.example.com'/>"
    );
    assert_eq!(xmpp.len() + stanza_id.len(), 228);
}

#[test]
fn a_publish_and_its_ack() {
    let publish = |msg_id: u64| {
        client_len(&ClientFrame::Publish(Publish {
            alias: 2,
            msg_id: Some(msg_id),
            ack: None,
            payload: Bytes::from_static(BODY.as_bytes()),
        }))
    };
    assert_eq!(publish(5), 24);
    assert_eq!(publish(200), 25, "message ids past 127 take 2 bytes");
    let puback = |msg_id, seq| server_len(&ServerFrame::PubAck(PubAck { msg_id, seq }));
    assert_eq!(puback(5, 42), 4);
    assert_eq!(puback(200, 5000), 6);
    // A cumulative ACK riding on a PUBLISH costs the sequence's varint.
    let riding = client_len(&ClientFrame::Publish(Publish {
        alias: 2,
        msg_id: Some(5),
        ack: Some(5000),
        payload: Bytes::from_static(BODY.as_bytes()),
    }));
    assert_eq!(riding - publish(5), 2);
    // ...or a standalone ACK of one room.
    let ack = client_len(&ClientFrame::Ack(pabal_codec::Ack::from_pairs(&[(
        0, 5000,
    )])));
    assert_eq!(ack, 5);

    // MQTT PUBACK: fixed header 2 + packet id 2 (MQTT 5 may omit reason code and properties).
    assert_eq!(mqtt_packet(2), 4);
    // NATS: `PUB <subject> <#bytes>\r\n<payload>\r\n`; core NATS does not acknowledge.
    let pub_line = format!("PUB {TOPIC} {}\r\n{BODY}\r\n", BODY.len());
    assert_eq!(pub_line.len(), 42);
    assert_eq!(
        format!("PUB {TOPIC} 29\r\n{}\r\n", "x".repeat(29)).len(),
        51
    );
    assert_eq!("+OK\r\n".len(), 5, "verbose mode's acknowledgement");
    // XMPP: the groupchat message as sent, and a stream-management request and answer
    // (XEP-0198).
    let xmpp = format!(
        "<message to='{TOPIC}@muc.example.com' type='groupchat' id='5'><body>{BODY}</body></message>"
    );
    assert_eq!(xmpp.len(), 109);
    assert_eq!("<r xmlns='urn:xmpp:sm:3'/>".len(), 26);
    assert_eq!("<a xmlns='urn:xmpp:sm:3' h='42'/>".len(), 33);
}

#[test]
fn ping_and_pong() {
    assert_eq!(client_len(&ClientFrame::Ping(Ping::default())), 2);
    assert_eq!(server_len(&ServerFrame::Pong(Pong::default())), 2);
    // Asking for a 20-minute interval.
    assert_eq!(
        client_len(&ClientFrame::Ping(Ping {
            interval_secs: Some(1200)
        })),
        4
    );
    // MQTT PINGREQ / PINGRESP.
    assert_eq!(mqtt_packet(0), 2);
    // NATS.
    assert_eq!("PING\r\n".len() + "PONG\r\n".len(), 12);
    // XMPP ping (XEP-0199) and its answer; a whitespace keepalive is 1 byte, unanswered.
    let ping = "<iq to='example.com' id='p1' type='get'><ping xmlns='urn:xmpp:ping'/></iq>";
    let pong = "<iq from='example.com' to='bob@example.com/phone' id='p1' type='result'/>";
    assert_eq!((ping.len(), pong.len()), (74, 73));
}

fn hello(entries: &[ResumeEntry]) -> usize {
    client_len(&ClientFrame::Hello(Hello {
        version: 1,
        heartbeat_secs: 0,
        token: Bytes::from(vec![b'j'; JWT_LEN]),
        device_id: None,
        resume: ResumeList::from_entries(entries),
    }))
}

#[test]
fn connect_with_a_150_byte_jwt() {
    // pabal: HELLO up, WELCOME down (connection id from core 3, a user id of 3 bytes).
    assert_eq!(hello(&[]), 157);
    // Version 2 with a device id (exactly-once publish): 8 bytes more, once per connection.
    let hello_v2 = client_len(&ClientFrame::Hello(Hello {
        version: 2,
        heartbeat_secs: 0,
        token: Bytes::from(vec![b'j'; JWT_LEN]),
        device_id: Some(u64::MAX),
        resume: ResumeList::default(),
    }));
    assert_eq!(hello_v2, 165);
    let welcome = server_len(&ServerFrame::Welcome(Welcome {
        version: 1,
        conn_id: (3 << 48) | 12_345,
        server_time_ms: EPOCH + 3_600_000,
        heartbeat_secs: 240,
        max_frame_len: 65_536,
        user: Text::from("ann"),
    }));
    assert_eq!(welcome, 26);

    // MQTT 3.1.1 CONNECT: variable header 10 ("MQTT" 2+4, level, flags, keep alive 2);
    // payload: client id 2+10, the JWT as user name 2+150. CONNACK 4.
    let variable = 2 + 4 + 1 + 1 + 2;
    let payload = (2 + 10) + (2 + JWT_LEN);
    assert_eq!(mqtt_packet(variable + payload), 177);
    assert_eq!(
        mqtt_packet(variable + payload + 2),
        179,
        "JWT as password, empty user name"
    );
    assert_eq!(mqtt_packet(2), 4, "CONNACK");
    // MQTT 5: + property length and a Session Expiry Interval (1 + 4) for a resumable
    // session. CONNACK: flags, reason, property length = 5 at the least.
    assert_eq!(mqtt_packet(variable + 1 + 5 + payload), 183);
    assert_eq!(mqtt_packet(3), 5);

    // NATS: the server's INFO first, then CONNECT and the PING clients send to learn that
    // CONNECT was accepted, then PONG.
    let info = "INFO {\"server_id\":\"NDJWE4HCYBOPHXRXUNNGRI3KD64VM7JEM5JQGBN7BHUXOHYV4XGWDSOE\",\
        \"server_name\":\"relay-1\",\"version\":\"2.10.22\",\"proto\":1,\"go\":\"go1.23.4\",\
        \"host\":\"0.0.0.0\",\"port\":4222,\"headers\":true,\"auth_required\":true,\
        \"tls_required\":true,\"max_payload\":1048576,\"client_id\":42,\
        \"client_ip\":\"203.0.113.7\"}\r\n";
    assert_eq!(info.len(), 297);
    let connect = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"tls_required\":true,\
         \"auth_token\":\"{}\",\"lang\":\"go\",\"version\":\"1.37.0\",\"protocol\":1,\
         \"headers\":true,\"no_responders\":true}}\r\n",
        "j".repeat(JWT_LEN)
    );
    assert_eq!(connect.len(), 310);

    // XMPP over direct TLS (XEP-0368): stream header, SASL PLAIN with the token as the
    // password, stream restart, resource binding. 4 round trips.
    let open = "<?xml version='1.0'?><stream:stream to='example.com' xmlns='jabber:client' \
                xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";
    let plain = {
        let raw = [&b"\0ann\0"[..], &[b'j'; JWT_LEN]].concat();
        base64_len(raw.len())
    };
    let auth =
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'></auth>".len() + plain;
    let bind = "<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
                <resource>phone</resource></bind></iq>";
    let up = open.len() + auth + open.len() + bind.len();
    assert_eq!(up, 662);
    let features1 = "<?xml version='1.0'?><stream:stream from='example.com' id='c2s_4f8a2b1e9d' \
        xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>\
        <stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>\
        <mechanism>PLAIN</mechanism></mechanisms></stream:features>";
    let success = "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>";
    let features2 = "<?xml version='1.0'?><stream:stream from='example.com' id='c2s_7c1d3e5f2a' \
        xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>\
        <stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>\
        <sm xmlns='urn:xmpp:sm:3'/></stream:features>";
    let bound = "<iq type='result' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
                 <jid>ann@example.com/phone</jid></bind></iq>";
    let down = features1.len() + success.len() + features2.len() + bound.len();
    assert_eq!(down, 725);
}

fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

#[test]
fn resume_of_100_rooms() {
    // pabal: one epoch group (a relay start time in ms: 6 bytes), 100 rooms whose last
    // sequences are between 128 and 16,383 (2 bytes each): 8 + 2 bytes a room.
    let entries: Vec<ResumeEntry> = (0..100)
        .map(|i| ResumeEntry {
            room_id: 0x1234_5678 * i,
            epoch: EPOCH,
            last_seq: 1000 + i,
        })
        .collect();
    assert_eq!(hello(&entries), 1165);
    assert_eq!(
        hello(&entries) - hello(&[]),
        1 + 6 + 1 + 100 * 10,
        "the list itself: 1,008 B"
    );
    let short: Vec<ResumeEntry> = entries
        .iter()
        .map(|e| ResumeEntry {
            last_seq: 100,
            ..*e
        })
        .collect();
    assert_eq!(hello(&short) - hello(&[]), 1 + 6 + 1 + 100 * 9);
    // A second epoch group costs its epoch and count once.
    let mut two = entries.clone();
    for e in &mut two[50..] {
        e.epoch = EPOCH + 1;
    }
    assert_eq!(hello(&two) - hello(&entries), 6 + 1);
    // Down: nothing per cleanly resumed room (the missed messages themselves follow).

    // MQTT, clean session: one SUBSCRIBE of 100 topic filters (2 + 11 + options 1 each)
    // after a packet id, and its SUBACK (a return code per filter). MQTT 5 adds a property
    // length to both.
    assert_eq!(mqtt_packet(2 + 100 * (2 + 11 + 1)), 1405);
    assert_eq!(mqtt_packet(2 + 100), 104);
    assert_eq!(mqtt_packet(2 + 1 + 100 * (2 + 11 + 1)), 1406);
    assert_eq!(mqtt_packet(2 + 1 + 100), 105);

    // NATS: `SUB <subject> <sid>\r\n` for sids 1..=100.
    let subs: usize = (1..=100)
        .map(|sid| format!("SUB {TOPIC} {sid}\r\n").len())
        .sum();
    assert_eq!(subs, 1992);

    // XMPP: stream-management resumption (XEP-0198), or one MUC join presence per room.
    let resume = "<resume xmlns='urn:xmpp:sm:3' h='42' \
                  previd='g2gCZAAOZWphYmJlcmRAbG9jYWxob3N0aANiAAGGoG0AAAAIc2Vzc2lvbjE='/>";
    let resumed = "<resumed xmlns='urn:xmpp:sm:3' h='17' \
                   previd='g2gCZAAOZWphYmJlcmRAbG9jYWxob3N0aANiAAGGoG0AAAAIc2Vzc2lvbjE='/>";
    assert_eq!((resume.len(), resumed.len()), (108, 109));
    let join = format!(
        "<presence to='{TOPIC}@muc.example.com/ann'><x xmlns='http://jabber.org/protocol/muc'>\
         <history since='2026-01-01T00:00:00Z'/></x></presence>"
    );
    assert_eq!(join.len(), 143);
}

/// The largest DELIVER header: why a relay must keep PUBLISH payloads 288 bytes under its
/// frame limit (PROTOCOL.md, "Limits").
#[test]
fn largest_deliver_header() {
    let header = DeliverHeader {
        alias: u32::MAX,
        seq: Some(u64::MAX),
        ephemeral: false,
        sender_alias: u32::MAX,
        new_sender: Some(Text::from("s".repeat(255))),
        ts_delta_ms: i64::MIN,
    };
    let payload = 65_536 - 288;
    // The prefix is the 3-byte length of a 65,536-byte body, then the 288-byte header.
    assert_eq!(header.prefix_len(payload), 3 + 288);
    let mut out = Vec::new();
    header.encode_prefix(payload, &mut out);
    out.resize(out.len() + payload, 0);
    assert!(
        dec_server(&out).unwrap().is_some(),
        "fits the default limit exactly"
    );
    // The smallest PUBLISH header is 2 bytes (ephemeral, alias < 128); non-ephemeral 3.
    let smallest = client_len(&ClientFrame::Publish(Publish {
        alias: 0,
        msg_id: None,
        ack: None,
        payload: Bytes::new(),
    }));
    assert_eq!(smallest, 1 + 2);
}

/// Protocol v3's receipts: READ up, RECEIPT down (PROTOCOL.md §16, "pabal v3").
#[test]
fn receipts() {
    use pabal_codec::{Read, Receipt, ReceiptEntry};
    let read = |seq| client_len(&ClientFrame::Read(Read { alias: 0, seq }));
    assert_eq!(read(42), 4);
    assert_eq!(read(5000), 5);
    let entry = |slot: u32, name: Option<&str>| ReceiptEntry {
        member_alias: slot,
        new_member: name.map(Text::from),
        delivered: 5000,
        read: 5000,
    };
    let receipt = |entries: Vec<ReceiptEntry>| {
        server_len(&ServerFrame::Receipt(Receipt { alias: 0, entries }))
    };
    // One member whose slot is defined (a sender of the room, usually).
    assert_eq!(receipt(vec![entry(0, None)]), 7);
    // The first time a member is named on the connection: + its id ("ann").
    assert_eq!(receipt(vec![entry(0, Some("ann"))]), 11);
    // Every member of a 5-member group in one update: 4 B each + 3 B.
    assert_eq!(receipt((0..5).map(|s| entry(s, None)).collect()), 23);
    // Read 2 behind delivered costs no more than caught up.
    let behind = ReceiptEntry {
        read: 4998,
        ..entry(0, None)
    };
    assert_eq!(receipt(vec![behind]), 7);
    // XMPP chat markers (XEP-0333): a `displayed` marker as sent to the room and as each
    // occupant gets it.
    let sent = format!(
        "<message to='{TOPIC}@muc.example.com' type='groupchat' id='6'><displayed xmlns='urn:xmpp:chat-markers:0' id='5'/></message>"
    );
    assert_eq!(sent.len(), 127);
    let got = format!(
        "<message from='{TOPIC}@muc.example.com/ann' to='bob@example.com/phone' type='groupchat' id='6'><displayed xmlns='urn:xmpp:chat-markers:0' id='5'/></message>"
    );
    assert_eq!(got.len(), 160);
}
