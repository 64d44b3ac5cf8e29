//! End-to-end: TLS (with 0-RTT), WebSocket, and the Rust client library against a real
//! relay on loopback, once per I/O backend.

#![allow(clippy::unwrap_used)] // reason: tests

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pabal_client::{Backoff, Client as RustClient, ClientConfig, ClientEvent, TlsOptions};
use pabal_codec::{
    ClientFrame, Decoder, ErrorCode, Limits, Ping, Publish, ServerFrame, Subscribe, Text,
};
use pabal_relay::config::Config;
use pabal_relay::io::BackendKind;
use pabal_testkit::http::{get_anonymous, with_ops_routes};
use pabal_testkit::pki::TestPki;
use pabal_testkit::ws::{WsClient, WsConn, WsFrame};
use pabal_testkit::{Client, TestRelay, WAIT, per_backend};
use rand::{Rng, SeedableRng};

fn tls_relay(backend: BackendKind, pki: &TestPki, tweak: impl FnOnce(&mut Config)) -> TestRelay {
    let (cert, key) = pki.issue();
    TestRelay::start(backend, 2, |c| {
        c.tls.cert_file = Some(cert);
        c.tls.key_file = Some(key);
        tweak(c);
    })
}

fn rust_client(relay: &TestRelay, user: &str, tls: Option<TlsOptions>) -> RustClient {
    let mut config = ClientConfig::new(relay.addr, user.to_string());
    config.tls = tls;
    config.backoff = Backoff::new(Duration::from_millis(5), Duration::from_millis(50));
    config.seed = Some(7);
    RustClient::new(config)
}

/// The next event matching `pred`, skipping others; panics after [`WAIT`].
fn wait(client: &mut RustClient, mut pred: impl FnMut(&ClientEvent) -> bool) -> ClientEvent {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(!left.is_zero(), "timed out waiting for an event");
        if let Some(e) = client.next_event(left).unwrap()
            && pred(&e)
        {
            return e;
        }
    }
}

fn connected(client: &mut RustClient) -> (bool, bool) {
    match wait(client, |e| matches!(e, ClientEvent::Connected { .. })) {
        ClientEvent::Connected {
            early_data,
            tls_resumed,
            ..
        } => (early_data, tls_resumed),
        _ => unreachable!(),
    }
}

fn bound(client: &mut RustClient) {
    wait(client, |e| matches!(e, ClientEvent::Bound { .. }));
}

fn message(client: &mut RustClient) -> (u64, Bytes) {
    match wait(client, |e| {
        matches!(e, ClientEvent::Message { seq: Some(_), .. })
    }) {
        ClientEvent::Message {
            seq: Some(seq),
            payload,
            ..
        } => (seq, payload),
        _ => unreachable!(),
    }
}

/// A raw TLS connection (rustls client), for what the client library never does.
fn raw_tls(
    relay: &TestRelay,
    tls: &TlsOptions,
    early: &[u8],
) -> (
    rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    bool,
) {
    let mut tcp = TcpStream::connect(relay.addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let mut conn =
        rustls::ClientConnection::new(tls.config.clone(), tls.server_name.clone()).unwrap();
    let mut sent_early = false;
    if !early.is_empty()
        && let Some(mut e) = conn.early_data()
    {
        e.write_all(early).unwrap();
        sent_early = true;
    }
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    assert_eq!(conn.alpn_protocol(), Some(&b"pabal/1"[..]), "ALPN pabal/1");
    (rustls::StreamOwned::new(conn, tcp), sent_early)
}

fn encode(frames: &[ClientFrame]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for f in frames {
        f.encode(&mut buf);
    }
    buf.to_vec()
}

fn hello(user: &str) -> ClientFrame {
    pabal_codec::ClientSession::new().hello(Bytes::copy_from_slice(user.as_bytes()), 0)
}

/// A resumed client's first flight: ClientHello and `early` as 0-RTT early data, as bytes
/// (to send, and to replay), and the client connection to finish the genuine handshake.
fn first_flight(tls: &TlsOptions, early: &[u8]) -> (rustls::ClientConnection, Vec<u8>) {
    let mut conn =
        rustls::ClientConnection::new(tls.config.clone(), tls.server_name.clone()).unwrap();
    conn.early_data()
        .expect("the client holds a ticket allowing early data")
        .write_all(early)
        .unwrap();
    let mut flight = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut flight).unwrap();
    }
    (conn, flight)
}

/// Sends a captured first flight on a new connection and waits for the relay's answer
/// (its ServerHello), so the relay has decided about the early data.
fn replay(relay: &TestRelay, flight: &[u8]) -> TcpStream {
    let mut tcp = TcpStream::connect(relay.addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.write_all(flight).unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(
        tcp.read(&mut byte).unwrap(),
        1,
        "the relay answers the replayed flight"
    );
    assert_eq!(byte[0], 0x16, "a TLS handshake record");
    tcp
}

/// Sends a first flight genuinely and finishes the handshake.
fn genuine(
    relay: &TestRelay,
    conn: rustls::ClientConnection,
    flight: &[u8],
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut tcp = TcpStream::connect(relay.addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.write_all(flight).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap();
    }
    stream
}

/// Reads frames until one matches `pred` (the connection must stay open until then).
fn frame_where(
    stream: &mut impl Read,
    rbuf: &mut BytesMut,
    mut pred: impl FnMut(&ServerFrame) -> bool,
) -> ServerFrame {
    let decoder = Decoder::new(Limits::default());
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(f) = decoder.decode_server(rbuf).unwrap() {
            if pred(&f) {
                return f;
            }
        }
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "the relay closed the connection");
        rbuf.extend_from_slice(&chunk[..n]);
    }
}

/// The sum over workers of an OpenMetrics counter (`name` without `_total`) whose labels
/// include `label` (`""`: every series).
fn counter(metrics: &str, name: &str, label: &str) -> u64 {
    let prefix = format!("{name}_total{{");
    metrics
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Scrapes `/metrics` until `cond` holds (counters land when the worker handles the
/// event); panics after [`WAIT`] with the last scrape.
fn metrics_until(ops: std::net::SocketAddr, cond: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let body = get_anonymous(ops, "/metrics").body;
        if cond(&body) {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics never got there:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every frame until the relay closes the stream.
fn frames_until_closed(stream: &mut impl Read) -> Vec<ServerFrame> {
    let decoder = Decoder::new(Limits::default());
    let mut rbuf = BytesMut::new();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(f) = decoder.decode_server(&mut rbuf).unwrap() {
            out.push(f);
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return out,
            Ok(n) => rbuf.extend_from_slice(&chunk[..n]),
        }
    }
}

per_backend! {
    fn tls_chat_between_two_rust_clients(backend) {
        let pki = TestPki::new();
        let relay = tls_relay(backend, &pki, |_| {});
        assert!(relay.handle().tls());
        let tls = pki.client();
        let mut ann = rust_client(&relay, "ann", Some(tls.clone()));
        let mut bob = rust_client(&relay, "bob", Some(tls));
        ann.connect().unwrap();
        bob.connect().unwrap();
        ann.join("dm:ann:bob").unwrap();
        bob.join("dm:ann:bob").unwrap();
        bound(&mut ann);
        bound(&mut bob);
        for i in 0..20u64 {
            let text = format!("hello {i}");
            ann.publish("dm:ann:bob", text.clone()).unwrap();
            let (seq, payload) = message(&mut bob);
            assert_eq!((seq, payload), (i + 1, Bytes::from(text)));
        }
        // A plain-TCP client on the TLS port gets no WELCOME.
        let mut plain = TcpStream::connect(relay.addr).unwrap();
        plain.write_all(&encode(&[hello("eve")])).unwrap();
        plain.set_read_timeout(Some(WAIT)).unwrap();
        let frames = frames_until_closed(&mut PlainGarbage(&mut plain));
        assert!(frames.is_empty(), "no protocol frame over a non-TLS stream: {frames:?}");
        relay.stop();
    }

    fn certificate_reload_keeps_connections_and_serves_the_new_one(backend) {
        let pki = TestPki::new();
        let (cert, key) = pki.issue();
        let relay = TestRelay::start(backend, 2, |c| {
            c.tls.cert_file = Some(cert.clone());
            c.tls.key_file = Some(key.clone());
        });
        let mut ann = rust_client(&relay, "ann", Some(pki.client()));
        ann.connect().unwrap();
        ann.join("room:r").unwrap();
        bound(&mut ann);
        // Renew with a certificate from another CA, same paths, then SIGHUP's path.
        let other = TestPki::new();
        let (new_cert, new_key) = other.issue();
        std::fs::copy(new_cert, &cert).unwrap();
        std::fs::copy(new_key, &key).unwrap();
        let config = relay.handle().config();
        let report = relay.handle().reload((*config).clone()).unwrap();
        assert!(report.needs_restart.is_empty(), "{report:?}");
        // The open connection still works.
        ann.publish("room:r", "after reload").unwrap();
        wait(&mut ann, |e| matches!(e, ClientEvent::Published { .. }));
        // New handshakes present the new certificate: the old CA no longer verifies it.
        let mut old_trust = rust_client(&relay, "bob", Some(pki.client()));
        assert!(matches!(old_trust.connect(), Err(pabal_client::ClientError::Io(_) | pabal_client::ClientError::Tls(_))));
        let mut new_trust = rust_client(&relay, "bob", Some(other.client()));
        new_trust.connect().unwrap();
        new_trust.join("room:r").unwrap();
        bound(&mut new_trust);
        // The connection opened before the reload still delivers, to the new one too.
        ann.publish("room:r", "still here").unwrap();
        let (seq, payload) = message(&mut new_trust);
        assert_eq!((seq, &payload[..]), (2, &b"still here"[..]));
        // A reload whose certificate does not load changes nothing.
        std::fs::write(&cert, "not a certificate").unwrap();
        let err = relay.handle().reload((*config).clone()).unwrap_err();
        assert!(format!("{err:#}").contains("tls.cert_file"), "{err:#}");
        let mut again = rust_client(&relay, "cy", Some(other.client()));
        again.connect().unwrap();
        relay.stop();
    }

    fn zero_rtt_hello_is_accepted_and_resumes_missed_messages(backend) {
        let pki = TestPki::new();
        let relay = tls_relay(backend, &pki, |_| {});
        let tls = pki.client();
        let mut ann = rust_client(&relay, "ann", Some(tls.clone()));
        ann.connect().unwrap();
        assert_eq!(connected(&mut ann), (false, false), "first connection: full handshake");
        ann.join("room:z").unwrap();
        bound(&mut ann);
        let mut pub_client = rust_client(&relay, "cy", Some(tls.clone()));
        pub_client.connect().unwrap();
        pub_client.join("room:z").unwrap();
        bound(&mut pub_client);
        pub_client.publish("room:z", "one").unwrap();
        assert_eq!(message(&mut ann).0, 1);
        ann.cut();
        for text in ["two", "three"] {
            pub_client.publish("room:z", text).unwrap();
            wait(&mut pub_client, |e| matches!(e, ClientEvent::Published { .. }));
        }
        // The reconnect resumes the TLS session and sends HELLO as early data.
        assert_eq!(connected(&mut ann), (true, true), "0-RTT resume");
        assert_eq!(message(&mut ann), (2, Bytes::from("two")));
        assert_eq!(message(&mut ann), (3, Bytes::from("three")));
        relay.stop();
    }

    fn zero_rtt_anything_but_hello_is_refused(backend) {
        let pki = TestPki::new();
        let relay = tls_relay(backend, &pki, |_| {});
        let tls = pki.client();
        // A full handshake to get a ticket.
        let (mut first, _) = raw_tls(&relay, &tls, &[]);
        first.write_all(&encode(&[hello("ann")])).unwrap();
        let decoder = Decoder::new(Limits::default());
        let mut rbuf = BytesMut::new();
        let mut chunk = [0u8; 4096];
        while decoder.decode_server(&mut rbuf).unwrap().is_none() {
            let n = first.read(&mut chunk).unwrap();
            rbuf.extend_from_slice(&chunk[..n]);
        }
        drop(first);
        // Early data with a SUBSCRIBE after the HELLO: refused with a fatal ERROR.
        let subscribe = ClientFrame::Subscribe(Subscribe { room: true, name: Text::from("room:x") });
        let (mut second, sent_early) = raw_tls(&relay, &tls, &encode(&[hello("ann"), subscribe]));
        assert!(sent_early, "the client had a ticket allowing early data");
        assert!(second.conn.is_early_data_accepted(), "the relay accepted 0-RTT at the TLS level");
        let frames = frames_until_closed(&mut second);
        match frames.as_slice() {
            [ServerFrame::Error(e)] => {
                assert_eq!(e.code, ErrorCode::ProtocolViolation);
                assert!(e.fatal);
                assert!(e.message.as_str().contains("early data"), "{}", e.message.as_str());
            }
            other => panic!("expected one fatal ERROR and a close, got {other:?}"),
        }
        // A PING alone in early data: refused too.
        let (mut third, _) = raw_tls(&relay, &tls, &encode(&[ClientFrame::Ping(Ping::default())]));
        let frames = frames_until_closed(&mut third);
        assert!(matches!(frames.as_slice(), [ServerFrame::Error(e)] if e.code == ErrorCode::ProtocolViolation), "{frames:?}");
        // Nothing of it reached the core: the relay has no connection left open.
        relay.stop();
    }

    fn replayed_early_data_does_no_harm(backend) {
        let pki = TestPki::new();
        let relay = tls_relay(backend, &pki, |_| {});
        let ops = with_ops_routes(&relay);
        let early = |m: &str, result: &str| counter(m, "pabal_tls_early_data", &format!("result=\"{result}\""));
        let mut bob = rust_client(&relay, "bob", Some(pki.client()));
        bob.connect().unwrap();
        bob.join("room:replay").unwrap();
        bound(&mut bob);
        // Ann's full handshake leaves her tickets (read up to the WELCOME: they come first).
        let tls = pki.client();
        let (mut first, _) = raw_tls(&relay, &tls, &[]);
        first.write_all(&encode(&[hello("ann")])).unwrap();
        let mut rbuf = BytesMut::new();
        frame_where(&mut first, &mut rbuf, |f| matches!(f, ServerFrame::Welcome(_)));
        drop(first);
        let ping = encode(&[ClientFrame::Ping(Ping::default())]);
        let pong = |f: &ServerFrame| matches!(f, ServerFrame::Pong(_));

        // 1. The genuine first flight, then its replay: the ticket was used, so the replay's
        // early data is rejected (the relay answers with a full handshake nobody finishes).
        let (conn, flight) = first_flight(&tls, &encode(&[hello("ann")]));
        let mut ann = genuine(&relay, conn, &flight);
        assert!(ann.conn.is_early_data_accepted(), "the genuine 0-RTT HELLO is taken");
        let mut ann_buf = BytesMut::new();
        frame_where(&mut ann, &mut ann_buf, |f| matches!(f, ServerFrame::Welcome(_)));
        drop(replay(&relay, &flight));
        let m = metrics_until(ops, |m| early(m, "rejected") == 1);
        assert_eq!(early(&m, "accepted"), 1, "only the genuine early data was taken:\n{m}");

        // 2. The replay outruns the genuine flight: it takes the ticket, and its HELLO binds
        // only its own connection (answered under keys the replayer lacks). The genuine client
        // falls back to a full handshake, sends its HELLO again and is served; the connection
        // ann already had is untouched.
        let (conn, flight) = first_flight(&tls, &encode(&[hello("ann")]));
        let replayed = replay(&relay, &flight);
        metrics_until(ops, |m| early(m, "accepted") == 2);
        let mut late = genuine(&relay, conn, &flight);
        assert!(!late.conn.is_early_data_accepted(), "the ticket went to the replay");
        late.write_all(&encode(&[hello("ann")])).unwrap();
        let mut late_buf = BytesMut::new();
        frame_where(&mut late, &mut late_buf, |f| matches!(f, ServerFrame::Welcome(_)));
        metrics_until(ops, |m| early(m, "rejected") == 2);
        ann.write_all(&ping).unwrap();
        frame_where(&mut ann, &mut ann_buf, pong);
        late.write_all(&ping).unwrap();
        frame_where(&mut late, &mut late_buf, pong);
        drop(replayed);

        // 3. A first flight carrying a JOIN and a PUBLISH after the HELLO: the genuine
        // connection is refused, the replay's early data is rejected, and nothing is published.
        let publish = ClientFrame::Publish(Publish {
            alias: 1,
            msg_id: Some(1),
            ack: None,
            payload: Bytes::from_static(b"twice?"),
        });
        let join = ClientFrame::Subscribe(Subscribe { room: true, name: Text::from("room:replay") });
        let (conn, flight) = first_flight(&tls, &encode(&[hello("ann"), join, publish]));
        let mut refused = genuine(&relay, conn, &flight);
        let frames = frames_until_closed(&mut refused);
        assert!(
            matches!(frames.as_slice(), [ServerFrame::Error(e)] if e.fatal && e.code == ErrorCode::ProtocolViolation),
            "{frames:?}"
        );
        drop(replay(&relay, &flight));
        let m = metrics_until(ops, |m| early(m, "rejected") == 3);
        assert_eq!(early(&m, "refused"), 1, "{m}");
        assert_eq!(early(&m, "accepted"), 3, "{m}");
        // The room's first message is bob's: no publish came from any replay.
        let id = bob.publish("room:replay", "first").unwrap();
        let published = wait(&mut bob, |e| matches!(e, ClientEvent::Published { .. }));
        assert!(matches!(published, ClientEvent::Published { id: i, seq: 1 } if i == id), "{published:?}");
        relay.stop();
    }

    fn tls_and_websocket_metrics_count_outcomes(backend) {
        let pki = TestPki::new();
        let relay = tls_relay(backend, &pki, |_| {});
        let ops = with_ops_routes(&relay);
        // A fresh handshake, then a 0-RTT resumption.
        let mut ann = rust_client(&relay, "ann", Some(pki.client()));
        ann.connect().unwrap();
        assert_eq!(connected(&mut ann), (false, false));
        ann.cut();
        assert_eq!(connected(&mut ann), (true, true));
        // Plaintext on the TLS port: a bad message. A client without pabal/1: alpn.
        let mut plain = TcpStream::connect(relay.addr).unwrap();
        plain.write_all(&encode(&[hello("eve")])).unwrap();
        plain.set_read_timeout(Some(WAIT)).unwrap();
        frames_until_closed(&mut PlainGarbage(&mut plain));
        let mut other = (*pki.client().config).clone();
        other.alpn_protocols = vec![b"h2".to_vec()];
        let mut wrong = pki.client();
        wrong.config = std::sync::Arc::new(other);
        let mut alpn = rust_client(&relay, "eve", Some(wrong));
        assert!(alpn.connect().is_err(), "no pabal/1, no connection");
        // A TCP connection closed before its ClientHello: incomplete.
        drop(TcpStream::connect(relay.addr).unwrap());
        let m = metrics_until(ops, |m| {
            counter(m, "pabal_tls_handshake_failures", "reason=\"incomplete\"") >= 1
                && counter(m, "pabal_tls_handshakes", "") == 2
        });
        assert_eq!(counter(&m, "pabal_tls_resumptions", ""), 1, "{m}");
        assert_eq!(counter(&m, "pabal_tls_early_data", "result=\"accepted\""), 1, "{m}");
        assert_eq!(counter(&m, "pabal_tls_early_data", "result=\"rejected\""), 0, "{m}");
        assert_eq!(counter(&m, "pabal_tls_handshake_failures", "reason=\"bad_message\""), 1, "{m}");
        assert_eq!(counter(&m, "pabal_tls_handshake_failures", "reason=\"alpn\""), 1, "{m}");
        relay.stop();

        let relay = TestRelay::start(backend, 2, |c| {
            c.websocket.listen = "127.0.0.1:0".into();
            c.websocket.allowed_origins = vec!["https://app.example".into()];
        });
        let ops = with_ops_routes(&relay);
        let ws_addr = relay.handle().websocket_addr().unwrap();
        let _ok = WsClient::connect(ws_addr, "ann", Some("https://app.example"));
        let (_, status) = WsConn::open(ws_addr, Some("https://evil.example"));
        assert!(status.contains(" 403 "), "{status}");
        let mut get = TcpStream::connect(ws_addr).unwrap();
        get.write_all(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n").unwrap();
        get.set_read_timeout(Some(WAIT)).unwrap();
        let mut answer = String::new();
        let _ = get.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
        let m = metrics_until(ops, |m| counter(m, "pabal_websocket_refusals", "") == 2);
        assert_eq!(counter(&m, "pabal_websocket_upgrades", ""), 1, "{m}");
        assert_eq!(counter(&m, "pabal_websocket_refusals", "reason=\"origin\""), 1, "{m}");
        assert_eq!(counter(&m, "pabal_websocket_refusals", "reason=\"not_websocket\""), 1, "{m}");
        relay.stop();
    }

    fn websocket_chat_and_a_tcp_client_in_the_same_room(backend) {
        let relay = TestRelay::start(backend, 2, |c| {
            c.websocket.listen = "127.0.0.1:0".into();
            c.websocket.allowed_origins = vec!["https://app.example".into()];
        });
        let ws_addr = relay.handle().websocket_addr().unwrap();
        let mut ann = WsClient::connect(ws_addr, "ann", Some("https://app.example"));
        let mut bob = WsClient::connect(ws_addr, "bob", None);
        let mut cy = Client::connect(relay.addr, "cy");
        let a = ann.join("room:mixed");
        let b = bob.join("room:mixed");
        let c = cy.join("room:mixed");
        let seq = ann.publish_acked(a, b"from the browser");
        assert_eq!(bob.message(), (seq, Bytes::from("from the browser")));
        assert_eq!(cy.messages(c, 1), vec![(seq, Bytes::from("from the browser"))]);
        let seq = cy.publish_acked(c, "from tcp");
        assert_eq!(ann.message(), (seq, Bytes::from("from tcp")));
        assert_eq!(bob.message(), (seq, Bytes::from("from tcp")));
        let seq = bob.publish_acked(b, b"x".repeat(10_000).as_slice());
        assert_eq!(ann.message().0, seq);
        // A WebSocket ping is answered with a pong.
        ann.conn.send_frame(0x9, b"hb");
        assert_eq!(ann.conn.next_frame(WAIT), Some(WsFrame::Pong(b"hb".to_vec())));
        relay.stop();
    }

    fn websocket_refuses_foreign_origins_text_and_oversized_messages(backend) {
        let relay = TestRelay::start(backend, 1, |c| {
            c.websocket.listen = "127.0.0.1:0".into();
            c.websocket.allowed_origins = vec!["https://app.example".into()];
        });
        let ws_addr = relay.handle().websocket_addr().unwrap();
        let (_, status) = WsConn::open(ws_addr, Some("https://evil.example"));
        assert!(status.contains(" 403 "), "{status}");
        let mut text = WsClient::connect(ws_addr, "ann", None);
        text.conn.send_frame(0x1, b"hello");
        assert_eq!(text.conn.next_frame(WAIT), Some(WsFrame::Close(1003)));
        let mut big = WsClient::connect(ws_addr, "bob", None);
        big.conn.send_frame(0x2, &vec![0u8; 64 * 1024 + 11]);
        assert_eq!(big.conn.next_frame(WAIT), Some(WsFrame::Close(1009)));
        relay.stop();
    }

    fn wss_chat_over_tls(backend) {
        let pki = TestPki::new();
        let relay = tls_relay(backend, &pki, |c| c.websocket.listen = "127.0.0.1:0".into());
        let ws_addr = relay.handle().websocket_addr().unwrap();
        let tls = pki.client();
        let tcp = TcpStream::connect(ws_addr).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let conn = rustls::ClientConnection::new(tls.config.clone(), tls.server_name.clone()).unwrap();
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        stream.write_all(b"GET / HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
            Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        // HELLO in one masked binary message; WELCOME back in a binary message.
        let hello = encode(&[hello("ann")]);
        let mut frame = vec![0x82, 0x80 | hello.len() as u8, 0, 0, 0, 0];
        frame.extend_from_slice(&hello);
        stream.write_all(&frame).unwrap();
        let mut hdr = [0u8; 2];
        stream.read_exact(&mut hdr).unwrap();
        assert_eq!(hdr[0], 0x82, "a binary message");
        let mut body = vec![0u8; (hdr[1] & 0x7f) as usize];
        stream.read_exact(&mut body).unwrap();
        let mut rbuf = BytesMut::from(&body[..]);
        let welcome = Decoder::new(Limits::default()).decode_server(&mut rbuf).unwrap();
        assert!(matches!(welcome, Some(ServerFrame::Welcome(_))), "{welcome:?}");
        relay.stop();
    }

    fn rust_client_under_random_cuts_loses_nothing(backend) {
        const MESSAGES: u64 = 300;
        let pki = TestPki::new();
        let relay = tls_relay(backend, &pki, |_| {});
        let tls = pki.client();
        let mut reader = rust_client(&relay, "ann", Some(tls.clone()));
        reader.connect().unwrap();
        reader.join("room:cuts").unwrap();
        bound(&mut reader);
        let mut writer = rust_client(&relay, "bob", Some(tls));
        writer.connect().unwrap();
        writer.join("room:cuts").unwrap();
        bound(&mut writer);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(0x5eed);
        let mut received = Vec::new();
        let mut published = 0u64;
        let mut acked = 0u64;
        while received.len() < MESSAGES as usize {
            // The writer publishes in bursts, and is cut now and then too.
            while published < MESSAGES && published < acked + 20 {
                published += 1;
                writer.publish("room:cuts", published.to_string()).unwrap();
            }
            if rng.random_ratio(1, 8) {
                writer.cut();
            }
            while let Some(e) = writer.next_event(Duration::from_millis(1)).unwrap() {
                if matches!(e, ClientEvent::Published { .. }) {
                    acked += 1;
                }
            }
            while let Some(e) = reader.next_event(Duration::from_millis(5)).unwrap() {
                if let ClientEvent::Message { seq: Some(seq), .. } = e {
                    received.push(seq);
                    // Cut mid-stream: frames already on the wire are lost with the link.
                    if rng.random_ratio(1, 15) {
                        reader.cut();
                    }
                }
            }
        }
        let expected: Vec<u64> = (1..=received.len() as u64).collect();
        assert_eq!(received, expected, "every sequence once, in order, across cuts");
        assert!(reader.connects() > 5, "the test really cut: {}", reader.connects());
        relay.stop();
    }
}

/// Reads a TLS listener's answer to plaintext and treats it as pabal bytes (it is an alert,
/// which must not decode as frames; any decode error counts as "no frames").
struct PlainGarbage<'a>(&'a mut TcpStream);

impl Read for PlainGarbage<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        // A TLS alert record starts 0x15 0x03: a pabal length of 21 with type 0x03
        // (UNSUBSCRIBE), a client type the server decoder refuses; count it as nothing.
        if n > 0 && buf[0] == 0x15 {
            return Ok(0);
        }
        Ok(n)
    }
}

#[test]
fn bad_certificates_are_refused_at_start_naming_the_field() {
    let pki = TestPki::new();
    let base = |c: &mut Config| {
        c.listen = "127.0.0.1:0".parse().unwrap();
        c.control.listen = String::new();
        c.workers = 1;
    };
    let start = |tweak: &dyn Fn(&mut Config)| {
        let mut c = Config::default();
        base(&mut c);
        tweak(&mut c);
        pabal_relay::runtime::RelayHandle::start(c)
            .map(|_| ())
            .unwrap_err()
    };
    let (cert, key) = pki.issue_years(2000, 2001);
    let err = format!(
        "{:#}",
        start(&|c| {
            c.tls.cert_file = Some(cert.clone());
            c.tls.key_file = Some(key.clone());
        })
    );
    assert!(
        err.contains("tls.cert_file") && err.contains("expired"),
        "{err}"
    );
    let missing = pki.path("missing.pem");
    let err = format!(
        "{:#}",
        start(&|c| {
            c.tls.cert_file = Some(missing.clone());
            c.tls.key_file = Some(key.clone());
        })
    );
    assert!(
        err.contains("tls.cert_file") && err.contains("missing.pem"),
        "{err}"
    );
    let (cert, _) = pki.issue();
    let other = TestPki::new();
    let (_, other_key) = other.issue();
    let err = format!(
        "{:#}",
        start(&|c| {
            c.tls.cert_file = Some(cert.clone());
            c.tls.key_file = Some(other_key.clone());
        })
    );
    assert!(
        err.contains("tls.key_file") && err.contains("does not match"),
        "{err}"
    );
    let err = format!("{:#}", start(&|c| c.tls.cert_file = Some(cert.clone())));
    assert!(err.contains("tls.key_file"), "{err}");
    // --check-config loads the file the same way.
    let toml = format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        pki.issue_years(2000, 2001).0,
        key
    );
    let err = Config::from_toml(&toml).unwrap_err().to_string();
    assert!(
        err.contains("tls.cert_file") && err.contains("expired"),
        "{err}"
    );
}
