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
use pabal_testkit::http::{KEY, Reply, get, http, raw_http, request};
use pabal_testkit::{Client, TestRelay, per_backend};
use serde_json::json;

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

// ---------------------------------------------------------------------------------------
// Reloads that never lie (issue 10, item 4); drains, timeouts and retries (item 12).

#[test]
fn a_reload_rotates_the_api_key_inline_and_from_a_file() {
    let keys = keys(false);
    let relay = jwt_relay(BackendKind::Epoll, &keys, |_| {});
    let addr = relay.handle().control_addr().unwrap();
    let stats_with = |key: &str| {
        let req = format!(
            "GET /v1/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
        );
        raw_http(addr, req.as_bytes()).status
    };
    assert_eq!(stats_with(KEY), 200);
    // Inline.
    let new_key = "rotated-key-0123456789";
    let mut config = (*relay.handle().config()).clone();
    config.control.api_key = Some(new_key.into());
    let report = relay.handle().reload(config).unwrap();
    assert_eq!(report.live, ["control.api_key"], "{report:?}");
    assert_eq!((stats_with(KEY), stats_with(new_key)), (401, 200));
    // From a file: rewriting the file and reloading the same configuration rotates it.
    let dir = TempDir::new("apikey");
    let file = dir.0.join("api.key");
    std::fs::write(&file, "file-key-number-one-0123\n").unwrap();
    let mut config = (*relay.handle().config()).clone();
    config.control.api_key = None;
    config.control.api_key_file = Some(file.clone());
    relay.handle().reload(config.clone()).unwrap();
    assert_eq!(
        (stats_with(new_key), stats_with("file-key-number-one-0123")),
        (401, 200)
    );
    std::fs::write(&file, "file-key-number-two-0123\n").unwrap();
    let report = relay.handle().reload(config.clone()).unwrap();
    assert!(
        report
            .live
            .iter()
            .any(|f| f.starts_with("control.api_key_file")),
        "{report:?}"
    );
    assert_eq!(
        (
            stats_with("file-key-number-one-0123"),
            stats_with("file-key-number-two-0123")
        ),
        (401, 200)
    );
    // A key file that breaks the rule fails the reload and changes nothing.
    std::fs::write(&file, "short\n").unwrap();
    let err = relay.handle().reload(config).unwrap_err();
    assert!(
        format!("{err:#}").contains("control.api_key_file"),
        "{err:#}"
    );
    assert_eq!(stats_with("file-key-number-two-0123"), 200);
    relay.stop();
}

#[test]
fn a_reload_applies_max_rooms_per_user() {
    let keys = keys(false);
    let relay = jwt_relay(BackendKind::Epoll, &keys, |c| {
        c.limits.max_rooms_per_user = 1
    });
    let add = |room: &str| {
        let (s, b) = api(
            &relay,
            "POST",
            &format!("/v1/rooms/{room}/members"),
            Some(json!({"users": ["ann"]})),
        );
        assert_eq!(s, 200, "{b}");
        b["added"].as_array().unwrap().len()
    };
    assert_eq!(add("one"), 1);
    assert_eq!(
        add("two"),
        0,
        "the second room is refused at 1 room per user"
    );
    let mut config = (*relay.handle().config()).clone();
    config.limits.max_rooms_per_user = 2;
    let report = relay.handle().reload(config).unwrap();
    assert_eq!(report.live, ["limits.max_rooms_per_user"]);
    assert_eq!(add("two"), 1, "the raised limit is in force");
    assert_eq!(add("three"), 0);
    relay.stop();
}

/// Sets the leaf at `path` (dots; `[i]` picks an array element) of a TOML tree.
fn leaf_mut<'v>(root: &'v mut toml::Value, path: &[String]) -> &'v mut toml::Value {
    let mut v = root;
    for seg in path {
        v = match seg.parse::<usize>() {
            Ok(i) if v.is_array() => &mut v.as_array_mut().unwrap()[i],
            _ => v.get_mut(seg.as_str()).unwrap(),
        };
    }
    v
}

/// Every leaf of a TOML tree, as segment lists.
fn leaves(v: &toml::Value, path: Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        toml::Value::Table(t) => {
            for (k, child) in t {
                let mut p = path.clone();
                p.push(k.clone());
                leaves(child, p, out);
            }
        }
        toml::Value::Array(a) if a.iter().all(toml::Value::is_table) && !a.is_empty() => {
            for (i, child) in a.iter().enumerate() {
                let mut p = path.clone();
                p.push(i.to_string());
                leaves(child, p, out);
            }
        }
        _ => out.push(path),
    }
}

#[test]
fn every_config_field_reloads_live_or_says_it_needs_a_restart() {
    use pabal_relay::config::Config;
    let keys = keys(true);
    let dir = TempDir::new("walk");
    let key_files = [dir.0.join("one.key"), dir.0.join("two.key")];
    std::fs::write(&key_files[0], "walk-key-number-one-0123").unwrap();
    std::fs::write(&key_files[1], "walk-key-number-two-0123").unwrap();
    let relay = jwt_relay(BackendKind::Epoll, &keys, |c| {
        c.control.api_key = None;
        c.control.api_key_file = Some(key_files[0].clone());
        c.retention
            .overrides
            .push(pabal_relay::config::RetentionOverride {
                prefix: "brand:".into(),
                max_messages: Some(10),
                max_bytes: Some(1 << 20),
                max_age: Some(Duration::from_secs(60)),
            });
        // [handoff] on (nothing listens there; nothing is handed off in this test), with
        // a rule, so that its every field is walked.
        c.handoff.url = "http://127.0.0.1:7797/hooks".into();
        c.handoff.secret_file = Some(key_files[0].clone());
        c.handoff.rooms.push(pabal_relay::config::HandoffRule {
            prefix: "dm:".into(),
            enabled: true,
            delay: Some(Duration::from_secs(5)),
        });
    });
    let base = (*relay.handle().config()).clone();
    let base_value = toml::Value::try_from(&base).unwrap();
    let mut paths = Vec::new();
    leaves(&base_value, Vec::new(), &mut paths);
    // Every optional field is present, so every leaf is walked.
    let text = toml::to_string(&base_value).unwrap();
    for field in [
        "api_key_file",
        "jwt",
        "override",
        "kid",
        "secret_file",
        "public_key_file",
    ] {
        assert!(
            text.contains(field),
            "{field} is not in the walked configuration"
        );
    }
    let strings = [
        "interval",
        "never",
        "disk",
        "127.0.0.1:7799",
        "127.0.0.1:7798",
        "json",
        "text",
        "debug",
        "info",
        "epoll",
        "io_uring",
        "auto",
        "jwt",
        "none",
        "hs256",
        "eddsa",
        "other-kid",
        "other:",
        "http://127.0.0.1:7796/hooks",
    ];
    let mut classified = 0;
    for path in &paths {
        let dotted = path.join(".");
        let original = leaf_mut(&mut base_value.clone(), path).clone();
        let mut candidates: Vec<toml::Value> = match &original {
            // The last: a quota of bytes (`storage.max_disk_bytes` of 0 has no small
            // neighbour that validates).
            toml::Value::Integer(i) => {
                vec![
                    (i - 1).into(),
                    (i + 1).into(),
                    (i * 2).into(),
                    (i + (1 << 30)).into(),
                ]
            }
            toml::Value::Float(f) => vec![(f * 2.0).into(), (f / 2.0).into()],
            toml::Value::Boolean(b) => vec![(!b).into()],
            toml::Value::String(s)
                if s.ends_with('s')
                    && s[..s.len() - 1]
                        .chars()
                        .all(|c| c.is_ascii_digit() || c == 'm') =>
            {
                vec![
                    "7s".into(),
                    "11s".into(),
                    "250ms".into(),
                    "90s".into(),
                    "3600s".into(),
                ]
            }
            toml::Value::String(s) if std::path::Path::new(s).is_file() => {
                // The same file under another path, and for the API key another key.
                let copy = dir.0.join(format!("copy-{}", path.join("-")));
                std::fs::copy(s, &copy).unwrap();
                let other = if s.ends_with("one.key") {
                    &key_files[1]
                } else {
                    &key_files[0]
                };
                vec![
                    toml::Value::from(copy.display().to_string()),
                    toml::Value::from(other.display().to_string()),
                ]
            }
            toml::Value::String(_) => strings.iter().map(|s| toml::Value::from(*s)).collect(),
            toml::Value::Array(a) if a.is_empty() => {
                vec![toml::Value::Array(vec!["https://chat.example".into()])]
            }
            toml::Value::Array(_) => vec![toml::Value::Array(Vec::new())],
            other => panic!("{dotted}: no way to perturb {other:?}"),
        };
        candidates.retain(|c| *c != original);
        let perturbed = candidates.into_iter().find_map(|candidate| {
            let mut v = base_value.clone();
            *leaf_mut(&mut v, path) = candidate;
            let config: Config = v.try_into().ok()?;
            config.validate().ok()?;
            config.check_files().ok()?;
            Some(config)
        });
        let Some(perturbed) = perturbed else {
            // A key's algorithm cannot change alone (its key file is of the other kind), nor
            // can a second key become the default (one default at most), nor can auth.mode
            // (keys are set, so it is "jwt").
            assert!(
                ["auth.mode"].contains(&dotted.as_str())
                    || path
                        .last()
                        .is_some_and(|l| l == "algorithm" || l == "default"),
                "{dotted}: no valid perturbation"
            );
            assert!(pabal_relay::reload::classify(&dotted).is_some(), "{dotted}");
            continue;
        };
        let report = relay
            .handle()
            .reload(perturbed.clone())
            .unwrap_or_else(|e| panic!("{dotted}: {e:#}"));
        let in_force = toml::Value::try_from(&*relay.handle().config()).unwrap();
        let wanted = toml::Value::try_from(&perturbed).unwrap();
        let covers = |field: &String| {
            pabal_relay::reload::covers(field, &dotted) || dotted.starts_with(&format!("{field}."))
        };
        let live = report.live.iter().any(covers);
        let restart = report.needs_restart.iter().any(covers);
        assert!(
            live != restart,
            "{dotted}: live {live}, restart {restart}: {report:?}"
        );
        if live {
            assert_eq!(
                leaf_mut(&mut in_force.clone(), path),
                leaf_mut(&mut wanted.clone(), path),
                "{dotted} reported live but not in force"
            );
        } else {
            assert_eq!(
                leaf_mut(&mut in_force.clone(), path),
                &original,
                "{dotted} needs a restart but its running value changed"
            );
        }
        // Back to the base for the next field.
        let back = relay.handle().reload(base.clone()).unwrap();
        assert!(
            back.needs_restart.is_empty() || restart,
            "{dotted}: {back:?}"
        );
        classified += 1;
    }
    assert!(classified >= 50, "only {classified} fields walked");
    relay.stop();
}

#[test]
fn mutations_are_refused_while_draining_and_reads_still_work() {
    let relay = TestRelay::start(BackendKind::Epoll, 1, |c| {
        c.control.api_key = Some(KEY.into());
        c.shutdown.grace = Duration::from_secs(8);
        c.shutdown.reconnect_spread = Duration::from_secs(2);
    });
    let addr = relay.handle().control_addr().unwrap();
    // A member that stops reading keeps the drain going (its queue never empties) until
    // the grace runs out, so the worker is there to answer reads.
    let ann = Client::connect_small_window(relay.addr, "ann", 4096);
    let put = request("PUT", "/v1/rooms/r/members", None, r#"{"users": ["ann"]}"#);
    assert_eq!(raw_http(addr, &put).status, 200);
    let big = json!({"sender": "s", "text": "x".repeat(15_000)}).to_string();
    for _ in 0..300 {
        let r = raw_http(addr, &request("POST", "/v1/rooms/r/messages", None, &big));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    relay.begin_shutdown();
    let publish = request(
        "POST",
        "/v1/rooms/r/messages",
        None,
        r#"{"sender": "s", "text": "t"}"#,
    );
    for req in [
        publish,
        request(
            "POST",
            "/v1/messages",
            None,
            r#"{"rooms": ["r"], "sender": "s", "text": "t"}"#,
        ),
        put,
        request("DELETE", "/v1/rooms/r/members/ann", None, ""),
        request("POST", "/v1/users/ann/disconnect", None, ""),
    ] {
        let reply = raw_http(addr, &req);
        assert_eq!(reply.status, 503, "{}", reply.body);
        assert_eq!(reply.json()["error"]["code"], "draining", "{}", reply.body);
        assert_eq!(reply.header("retry-after"), Some("10"), "grace + spread");
    }
    let stats = get(addr, "/v1/stats");
    assert_eq!(stats.status, 200, "{}", stats.body);
    let info = get(addr, "/v1/rooms/r");
    assert_eq!(
        (info.status, info.json()["last_seq"].as_u64()),
        (200, Some(300)),
        "{}",
        info.body
    );
    drop(ann);
    relay.join();
}

/// A room name owned by `worker` of `workers`.
fn room_owned_by(worker: usize, workers: usize, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|n| {
            pabal_relay::ids::RoomName::new(false, pabal_codec::Text::from(n.as_str()))
                .owner(workers)
                == worker
        })
        .unwrap()
}

#[test]
fn a_timed_out_publish_answers_504_and_its_retry_publishes_nothing_twice() {
    let keys = keys(false);
    let relay = jwt_relay(BackendKind::Epoll, &keys, |c| {
        c.control.reply_timeout = Duration::from_millis(200);
    });
    let addr = relay.handle().control_addr().unwrap();
    let room = room_owned_by(1, 2, "slow-");
    let path = format!("/v1/rooms/{room}/messages");
    let body = r#"{"sender": "s", "text": "once"}"#;
    // The owner is wedged for far longer than the reply timeout: the call times out, but
    // the owner still publishes once it runs again.
    relay.handle().stall_worker(1, Duration::from_millis(1500));
    let first = raw_http(addr, &request("POST", &path, Some("order-42"), body));
    assert_eq!(first.status, 504, "{}", first.body);
    assert!(first.body.contains("may still complete"), "{}", first.body);
    let until = std::time::Instant::now() + pabal_testkit::WAIT;
    let retry = loop {
        let r = raw_http(addr, &request("POST", &path, Some("order-42"), body));
        if r.status == 200 || std::time::Instant::now() > until {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(retry.status, 200, "{}", retry.body);
    assert_eq!(
        retry.json(),
        json!({"seq": 1, "repeated": true}),
        "{}",
        retry.body
    );
    let again = raw_http(addr, &request("POST", &path, Some("order-42"), body));
    assert_eq!(again.json(), json!({"seq": 1, "repeated": true}));
    let fresh = raw_http(addr, &request("POST", &path, Some("order-43"), body));
    assert_eq!(fresh.json(), json!({"seq": 2, "repeated": false}));
    let info = get(addr, &format!("/v1/rooms/{room}"));
    assert_eq!(info.json()["last_seq"], 2, "published once per key");
    relay.stop();
}

#[test]
fn publish_many_answers_per_room_and_a_retry_completes_only_what_is_missing() {
    let keys = keys(false);
    let relay = jwt_relay(BackendKind::Epoll, &keys, |c| {
        c.control.reply_timeout = Duration::from_millis(200);
    });
    let addr = relay.handle().control_addr().unwrap();
    let fast = room_owned_by(0, 2, "fast-");
    let slow = room_owned_by(1, 2, "slow-");
    let body = json!({"rooms": [fast, slow], "sender": "s", "text": "hi"}).to_string();
    relay.handle().stall_worker(1, Duration::from_millis(1500));
    let first = raw_http(
        addr,
        &request("POST", "/v1/messages", Some("batch-1"), &body),
    );
    assert_eq!(first.status, 200, "{}", first.body);
    let status_of = |reply: &Reply, room: &str| {
        reply.json()["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == room)
            .cloned()
            .unwrap_or_else(|| panic!("no result for {room}: {}", reply.body))
    };
    assert_eq!(status_of(&first, &fast)["status"], "published");
    assert_eq!(status_of(&first, &fast)["seq"], 1);
    assert_eq!(status_of(&first, &slow)["status"], "unknown");
    let until = std::time::Instant::now() + pabal_testkit::WAIT;
    let retry = loop {
        let r = raw_http(
            addr,
            &request("POST", "/v1/messages", Some("batch-1"), &body),
        );
        if status_of(&r, &slow)["status"] == "published" || std::time::Instant::now() > until {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for room in [&fast, &slow] {
        let r = status_of(&retry, room);
        assert_eq!(
            (
                r["status"].as_str(),
                r["seq"].as_u64(),
                r["repeated"].as_bool()
            ),
            (Some("published"), Some(1), Some(true)),
            "{room}: {r}"
        );
        assert_eq!(
            get(addr, &format!("/v1/rooms/{room}")).json()["last_seq"],
            1
        );
    }
    relay.stop();
}

#[test]
fn a_file_valid_only_with_a_restart_field_changed_is_refused_whole() {
    let keys = keys(false);
    let relay = jwt_relay(BackendKind::Epoll, &keys, |_| {});
    let mut config = (*relay.handle().config()).clone();
    config.auth.mode = AuthMode::None;
    config.auth.jwt = None;
    config.limits.publish_rate = 5.0;
    let err = relay.handle().reload(config).unwrap_err();
    assert!(format!("{err:#}").contains("auth.mode"), "{err:#}");
    let running = relay.handle().config();
    assert!(running.auth.jwt.is_some(), "the token keys stay");
    assert_eq!(running.limits.publish_rate, 1e9, "nothing was reloaded");
    Client::connect_token(relay.addr, "ann", &token("ann"));
    relay.stop();
}
