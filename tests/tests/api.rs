//! End-to-end: what the app servers in front get (issue "App servers in front"): signed
//! tokens, the server API, membership pushed to live connections, and every limit.

#![allow(clippy::unwrap_used)] // reason: tests

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use pabal_codec::{ErrorCode, Event, GoAwayReason, LeftReason};
use pabal_relay::auth::{JwtConfig, KeyAlgorithm, KeyConfig};
use pabal_relay::config::{AuthMode, Config};
use pabal_relay::io::BackendKind;
use pabal_tests::{Client, TestRelay, http, per_backend};
use serde_json::json;

const KEY: &str = "test-api-key-0123456789";
const SECRET_A: &[u8] = b"an-hs256-secret-of-at-least-32-bytes!!";
const SECRET_B: &[u8] = b"another-hs256-secret-of-32-bytes-or-more";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../relay/tests/data")
}

struct Keys {
    _dir: TempDir,
    config: JwtConfig,
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "pabal-api-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// HS256 keys "a" (and optionally "b"), plus the EdDSA test key "ed".
fn keys(with_b: bool) -> Keys {
    let dir = TempDir::new("keys");
    let a = dir.0.join("a.secret");
    std::fs::write(&a, SECRET_A).unwrap();
    let mut keys = vec![
        KeyConfig {
            kid: Some("a".into()),
            algorithm: KeyAlgorithm::Hs256,
            default: true,
            secret_file: Some(a),
            public_key_file: None,
        },
        KeyConfig {
            kid: Some("ed".into()),
            algorithm: KeyAlgorithm::EdDsa,
            default: false,
            secret_file: None,
            public_key_file: Some(data_dir().join("jwt-test-ed25519-a.pub.pem")),
        },
    ];
    if with_b {
        let b = dir.0.join("b.secret");
        std::fs::write(&b, SECRET_B).unwrap();
        keys.push(KeyConfig {
            kid: Some("b".into()),
            algorithm: KeyAlgorithm::Hs256,
            default: false,
            secret_file: Some(b),
            public_key_file: None,
        });
    }
    Keys {
        _dir: dir,
        config: JwtConfig { leeway: 5, keys },
    }
}

fn hs256(kid: &str, secret: &[u8], claims: serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.into());
    encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap()
}

fn token(user: &str) -> String {
    hs256(
        "a",
        SECRET_A,
        json!({"sub": user, "exp": now() + 600, "chn": ["news:*"]}),
    )
}

fn jwt_relay(backend: BackendKind, keys: &Keys, tweak: impl FnOnce(&mut Config)) -> TestRelay {
    let jwt = keys.config.clone();
    TestRelay::start(backend, 2, move |c| {
        c.auth.mode = AuthMode::Jwt;
        c.auth.jwt = Some(jwt);
        c.control.api_key = Some(KEY.into());
        tweak(c);
    })
}

fn api(
    relay: &TestRelay,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let body = body.map(|b| b.to_string());
    http(
        relay.handle().control_addr().unwrap(),
        method,
        path,
        Some(KEY),
        body.as_deref(),
    )
}

/// Expects the relay to refuse the HELLO with a fatal ERROR of `code`, then close.
fn refused(relay: &TestRelay, token: &[u8], code: ErrorCode) {
    let mut c = Client::connect_raw(relay.addr, "who", token);
    let events = c.until_closed();
    let err = events.iter().find_map(|e| match e {
        Event::Error(e) => Some(e.clone()),
        _ => None,
    });
    let err = err.unwrap_or_else(|| {
        panic!(
            "no ERROR for {:?}: {events:?}",
            String::from_utf8_lossy(token)
        )
    });
    assert_eq!(err.code, code, "{}", err.message);
    assert!(err.fatal);
    assert!(!events.iter().any(|e| matches!(e, Event::Welcome(_))));
}

#[test]
fn tokens_are_checked() {
    let keys = keys(false);
    let relay = jwt_relay(BackendKind::Epoll, &keys, |_| {});
    // Valid: HS256 and EdDSA.
    Client::connect_token(relay.addr, "ann", &token("ann"));
    let ed_key = std::fs::read(data_dir().join("jwt-test-ed25519-a.key.pem")).unwrap();
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("ed".into());
    let ed = encode(
        &header,
        &json!({"sub": "eve", "exp": now() + 60}),
        &EncodingKey::from_ed_pem(&ed_key).unwrap(),
    )
    .unwrap();
    Client::connect_token(relay.addr, "eve", &ed);
    // Expired (past the 5 s leeway) and not yet valid.
    refused(
        &relay,
        hs256("a", SECRET_A, json!({"sub": "x", "exp": now() - 60})).as_bytes(),
        ErrorCode::TokenExpired,
    );
    refused(
        &relay,
        hs256(
            "a",
            SECRET_A,
            json!({"sub": "x", "exp": now() + 600, "nbf": now() + 300}),
        )
        .as_bytes(),
        ErrorCode::TokenExpired,
    );
    // Wrongly signed, wrong algorithm (an HS256 token claiming the EdDSA key), malformed.
    refused(
        &relay,
        hs256("a", SECRET_B, json!({"sub": "x", "exp": now() + 60})).as_bytes(),
        ErrorCode::AuthFailed,
    );
    refused(
        &relay,
        hs256("ed", SECRET_A, json!({"sub": "x", "exp": now() + 60})).as_bytes(),
        ErrorCode::AuthFailed,
    );
    refused(&relay, b"not.a.jwt", ErrorCode::AuthFailed);
    refused(&relay, b"garbage", ErrorCode::AuthFailed);
    let stats = relay.handle().stats();
    assert_eq!(stats.auth_failures, 6);
    relay.stop();
}

#[test]
fn a_rotated_key_works_without_dropping_connections() {
    let old = keys(false);
    let relay = jwt_relay(BackendKind::Epoll, &old, |_| {});
    let mut ann = Client::connect_token(relay.addr, "ann", &token("ann"));
    let a = ann.subscribe("news:today");
    // Rotate: add key "b", drop key "a".
    let new = keys(true);
    let mut config = (*relay.handle().config()).clone();
    let mut jwt = new.config.clone();
    jwt.keys.retain(|k| k.kid.as_deref() != Some("a"));
    jwt.keys[0].default = true;
    config.auth.jwt = Some(jwt);
    let report = relay.handle().reload(config).unwrap();
    assert!(report.needs_restart.is_empty(), "{report:?}");
    // New tokens with the new key work; tokens with the old key no longer do.
    let b_token = hs256(
        "b",
        SECRET_B,
        json!({"sub": "bob", "exp": now() + 600, "chn": ["news:*"]}),
    );
    let mut bob = Client::connect_token(relay.addr, "bob", &b_token);
    refused(&relay, token("carl").as_bytes(), ErrorCode::AuthFailed);
    // Ann's connection, authenticated with the old key, is still there and still served.
    let (status, body) = api(
        &relay,
        "POST",
        "/v1/channels/news:today/messages",
        Some(json!({"sender": "news", "text": "still on"})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(ann.messages(a, 1)[0].1, Bytes::from_static(b"still on"));
    let _ = bob.subscribe("news:today");
    relay.stop();
}

per_backend! {
    fn members_added_and_removed_through_the_api(backend) {
        let keys = keys(false);
        let relay = jwt_relay(backend, &keys, |_| {});
        // One user on two connections (phone and desktop), plus a bystander.
        let mut phone = Client::connect_token(relay.addr, "ann", &token("ann"));
        let mut desk = Client::connect_token(relay.addr, "ann", &token("ann"));
        let mut bob = Client::connect_token(relay.addr, "bob", &token("bob"));
        let (s, b) = api(&relay, "POST", "/v1/rooms/group:1/members", Some(json!({"users": ["ann", "bob"]})));
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["count"], 2);
        let mut aliases = Vec::new();
        for c in [&mut phone, &mut desk, &mut bob] {
            match c.wait_for(|e| matches!(e, Event::Bound { .. })) {
                Event::Bound { alias, room, .. } => {
                    assert_eq!(room.name.unwrap().as_str(), "group:1");
                    aliases.push(alias);
                }
                _ => unreachable!(),
            }
        }
        let (s, b) = api(&relay, "POST", "/v1/rooms/group:1/messages", Some(json!({"sender": "system", "text": "welcome"})));
        assert_eq!((s, b["seq"].as_u64()), (200, Some(1)), "{b}");
        for (c, alias) in [&mut phone, &mut desk, &mut bob].into_iter().zip(&aliases) {
            assert_eq!(c.messages(*alias, 1), vec![(1, Bytes::from_static(b"welcome"))]);
        }
        // Remove ann: both her connections are told, and message 2 never reaches them.
        let (s, b) = api(&relay, "DELETE", "/v1/rooms/group:1/members/ann", None);
        assert_eq!((s, b["count"].as_u64()), (200, Some(1)), "{b}");
        for c in [&mut phone, &mut desk] {
            match c.wait_for(|e| matches!(e, Event::Left { .. })) {
                Event::Left { reason, .. } => assert_eq!(reason, LeftReason::Removed),
                _ => unreachable!(),
            }
        }
        api(&relay, "POST", "/v1/rooms/group:1/messages", Some(json!({"sender": "system", "text": "secret"})));
        assert_eq!(bob.messages(aliases[2], 1)[0].0, 2);
        // Re-add ann: her new binding starts after message 2 (it was published while she was
        // out), so the first thing she may get is message 3. Deliveries from the room's owner
        // keep their order, so had message 2 reached her it would come before this binding.
        api(&relay, "PUT", "/v1/rooms/group:1/members", Some(json!({"users": ["ann", "bob"]})));
        for c in [&mut phone, &mut desk] {
            let bound = c.wait_for(|e| matches!(e, Event::Bound { .. } | Event::Message { .. }));
            assert!(matches!(bound, Event::Bound { .. }), "{bound:?}");
        }
        api(&relay, "POST", "/v1/rooms/group:1/messages", Some(json!({"sender": "system", "text": "back"})));
        for c in [&mut phone, &mut desk] {
            let alias = c.session.alias_of("group:1").unwrap();
            assert_eq!(c.messages(alias, 1), vec![(3, Bytes::from_static(b"back"))]);
        }
        relay.stop();
    }
}

#[test]
fn the_api_refuses_without_the_key_and_explains_bad_requests() {
    let keys = keys(false);
    let relay = jwt_relay(BackendKind::Epoll, &keys, |_| {});
    let addr = relay.handle().control_addr().unwrap();
    let (s, b) = http(addr, "GET", "/v1/stats", None, None);
    assert_eq!(s, 401, "{b}");
    let (s, _) = http(addr, "GET", "/v1/stats", Some("wrong-key-wrong-key"), None);
    assert_eq!(s, 401);
    for (body, needle) in [
        ("{not json", "invalid JSON"),
        (r#"{"sender": "s"}"#, "exactly one of"),
        (
            r#"{"sender": "s", "text": "t", "extra": 1}"#,
            "unknown field",
        ),
        (r#"{"sender": "", "text": "t"}"#, "sender"),
        (r#"{"sender": "s", "data": "***"}"#, "base64"),
    ] {
        let (s, b) = http(addr, "POST", "/v1/rooms/r/messages", Some(KEY), Some(body));
        assert_eq!(s, 400, "{body}: {b}");
        let message = b["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{body}: {message}");
    }
    let (s, b) = http(addr, "GET", "/v1/rooms/nowhere", Some(KEY), None);
    assert_eq!(s, 404, "{b}");
    let (s, b) = api(&relay, "GET", "/v1/stats", None);
    assert_eq!(s, 200);
    assert_eq!(b["backend"], "epoll");
    relay.stop();
}

#[test]
fn room_info_and_history() {
    let keys = keys(false);
    let relay = jwt_relay(BackendKind::Epoll, &keys, |c| c.retention.max_messages = 3);
    api(
        &relay,
        "PUT",
        "/v1/rooms/r/members",
        Some(json!({"users": ["a", "b"]})),
    );
    for i in 1..=5 {
        api(
            &relay,
            "POST",
            "/v1/rooms/r/messages",
            Some(json!({"sender": "a", "text": format!("m{i}")})),
        );
    }
    let (s, b) = api(&relay, "GET", "/v1/rooms/r", None);
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (b["members"].as_u64(), b["last_seq"].as_u64()),
        (Some(2), Some(5))
    );
    assert_eq!(b["retained"]["first_seq"], 3);
    let (s, b) = api(&relay, "GET", "/v1/rooms/r/messages?after=1&limit=2", None);
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["gap"], json!({"from": 2, "to": 2}));
    let texts: Vec<&str> = b["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, vec!["m3", "m4"]);
    // One message into many rooms and channels in one call.
    let (s, b) = api(
        &relay,
        "POST",
        "/v1/messages",
        Some(json!({"rooms": ["r", "r2"], "channels": ["c"], "sender": "sys", "text": "all"})),
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["results"].as_array().unwrap().len(), 3);
    relay.stop();
}

#[test]
fn every_limit_is_enforced_and_reported() {
    let keys = keys(false);
    let relay = jwt_relay(BackendKind::Epoll, &keys, |c| {
        c.workers = 1;
        c.limits.max_connections_per_user = 1;
        c.limits.max_rooms_per_user = 1;
        c.limits.publish_rate = 1.0;
        c.limits.publish_burst = 2.0;
        c.limits.max_payload = 100;
        c.auth.handshake_timeout = Duration::from_millis(500);
    });
    let mut ann = Client::connect_token(relay.addr, "ann", &token("ann"));
    // Connections per user.
    refused(&relay, token("ann").as_bytes(), ErrorCode::LimitExceeded);
    // Rooms per user: the second subscription is refused.
    ann.subscribe("news:1");
    ann.send(&pabal_codec::ClientFrame::Subscribe(
        pabal_codec::Subscribe {
            room: false,
            name: "news:2".into(),
        },
    ));
    match ann.wait_for(|e| matches!(e, Event::Error(_))) {
        Event::Error(e) => assert_eq!(e.code, ErrorCode::LimitExceeded, "{}", e.message),
        _ => unreachable!(),
    }
    // Channel publish needs `pub` in the token.
    let alias = ann.session.alias_of("news:1").unwrap();
    ann.publish(alias, &b"hi"[..]);
    match ann.wait_for(|e| matches!(e, Event::Error(_))) {
        Event::Error(e) => assert_eq!(e.code, ErrorCode::NotPermitted, "{}", e.message),
        _ => unreachable!(),
    }
    drop(ann);
    // Payload size and publish rate, on a room the user may publish to.
    let bob_token = hs256(
        "a",
        SECRET_A,
        json!({"sub": "bob", "exp": now() + 600, "chn": ["talk"], "pub": ["talk"]}),
    );
    let mut bob = Client::connect_token(relay.addr, "bob", &bob_token);
    let talk = bob.subscribe("talk");
    let id = bob.publish(talk, vec![b'x'; 101]);
    match bob.wait_for(|e| matches!(e, Event::Error(_))) {
        Event::Error(e) => assert_eq!((e.code, e.reference), (ErrorCode::PayloadTooLarge, id)),
        _ => unreachable!(),
    }
    // The rate limiter (burst 2, 1/s; the refused oversize publish was not charged): of five
    // publishes sent back to back, the first two pass and later ones are refused.
    let ids: Vec<u64> = (0..5)
        .map(|i| bob.publish(talk, format!("{i}").into_bytes()))
        .collect();
    let mut acked = 0;
    let mut limited = Vec::new();
    while acked + limited.len() < ids.len() {
        match bob.wait_for(|e| matches!(e, Event::Error(_) | Event::PubAck { .. })) {
            Event::PubAck { .. } => acked += 1,
            Event::Error(e) => {
                assert_eq!(e.code, ErrorCode::RateLimited, "{}", e.message);
                limited.push(e.reference);
            }
            _ => unreachable!(),
        }
    }
    assert!(acked >= 2, "the burst passes");
    assert!(
        !limited.is_empty() && limited.iter().all(|id| ids[2..].contains(id)),
        "{limited:?}"
    );
    // A service token (a trusted app server) is exempt from the publish rate limit.
    let svc_token = hs256(
        "a",
        SECRET_A,
        json!({"sub": "app-server", "exp": now() + 60, "svc": true}),
    );
    let mut svc = Client::connect_token(relay.addr, "app-server", &svc_token);
    let ops = svc.join("ops");
    for i in 0..10 {
        assert_eq!(svc.publish_acked(ops, format!("{i}").into_bytes()), i + 1);
    }
    // Handshake deadline: a connection that never says HELLO gets GOAWAY.
    let mut silent = std::net::TcpStream::connect(relay.addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = BytesBuf::default();
    let goaway = buf.read_frame(&mut silent);
    assert!(
        matches!(goaway, pabal_codec::ServerFrame::GoAway(g) if g.reason == GoAwayReason::HandshakeTimeout)
    );
    let (_, stats) = api(&relay, "GET", "/v1/stats", None);
    let total = &stats["total"];
    assert!(total["limit_refusals"].as_u64().unwrap() >= 3, "{total}");
    assert!(total["rate_limited"].as_u64().unwrap() >= 1, "{total}");
    relay.stop();
}

#[test]
fn connection_caps_shed_load_with_a_retry_hint() {
    let keys = keys(false);
    let relay = jwt_relay(BackendKind::Epoll, &keys, |c| {
        c.workers = 1;
        c.limits.max_connections = 2;
        c.shutdown.reconnect_spread = Duration::from_secs(10);
    });
    let _a = Client::connect_token(relay.addr, "a", &token("a"));
    let _b = Client::connect_token(relay.addr, "b", &token("b"));
    let mut third = std::net::TcpStream::connect(relay.addr).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let frame = BytesBuf::default().read_frame(&mut third);
    match frame {
        pabal_codec::ServerFrame::GoAway(g) => {
            assert_eq!(g.reason, GoAwayReason::Overload);
            assert!(
                (1000..11_000).contains(&g.retry_after_ms),
                "{}",
                g.retry_after_ms
            );
        }
        other => panic!("expected GOAWAY, got {other:?}"),
    }
    assert_eq!(relay.handle().stats().overload_refusals, 1);
    relay.stop();

    // The accept rate: one new connection per second; the second at once is shed.
    let relay = jwt_relay(BackendKind::Epoll, &keys, |c| {
        c.workers = 1;
        c.limits.new_connections_per_second = 1.0;
    });
    let _a = Client::connect_token(relay.addr, "a", &token("a"));
    let mut next = std::net::TcpStream::connect(relay.addr).unwrap();
    next.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(
        matches!(BytesBuf::default().read_frame(&mut next), pabal_codec::ServerFrame::GoAway(g) if g.reason == GoAwayReason::Overload)
    );
    relay.stop();
}

/// Reads one server frame from a raw stream.
#[derive(Default)]
struct BytesBuf(bytes::BytesMut);

impl BytesBuf {
    fn read_frame(&mut self, stream: &mut std::net::TcpStream) -> pabal_codec::ServerFrame {
        use std::io::Read;
        let decoder = pabal_codec::Decoder::default();
        loop {
            if let Some(frame) = decoder.decode_server(&mut self.0).unwrap() {
                return frame;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).unwrap();
            assert!(n > 0, "closed before a frame");
            self.0.extend_from_slice(&chunk[..n]);
        }
    }
}
