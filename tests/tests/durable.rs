//! End-to-end: durable state (`[storage] mode = "disk"`, PRODUCT.md item 4) over real
//! sockets, once per I/O backend. A relay started twice on the same directory keeps every
//! room's history, membership and epoch; a full disk refuses publishes with `storage_full`
//! and acknowledges nothing it did not store; space coming back ends the refusals.

#![allow(clippy::unwrap_used)] // reason: tests

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pabal_codec::{ErrorCode, Event};
use pabal_relay::config::{Config, FsyncPolicy, StorageMode};
use pabal_testkit::http::http;
use pabal_testkit::{Client, TestRelay, WAIT, per_backend};

const KEY: &str = "test-api-key-0123456789";

/// A directory for one test's logs, removed when dropped.
struct StateDir(PathBuf);

impl StateDir {
    fn new(test: &str) -> StateDir {
        let dir = std::env::temp_dir().join(format!("pabal-durable-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        StateDir(dir)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn disk(c: &mut Config, dir: &Path, fsync: FsyncPolicy) {
    c.storage.mode = StorageMode::Disk;
    c.storage.dir = dir.to_path_buf();
    c.storage.fsync = fsync;
    c.control.api_key = Some(KEY.into());
}

fn api(
    relay: &TestRelay,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    http(
        relay.handle().control_addr().unwrap(),
        method,
        path,
        Some(KEY),
        body,
    )
}

/// The `/metrics` text.
fn metrics_text(relay: &TestRelay) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(relay.handle().control_addr().unwrap()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

per_backend! {
    fn a_restart_keeps_history_membership_and_epoch(backend) {
        let dir = StateDir::new(&format!("restart-{backend:?}"));
        let relay = TestRelay::start(backend, 2, |c| disk(c, &dir.0, FsyncPolicy::Always));
        // Membership through the server API, acknowledged once stored.
        let (s, _) = api(&relay, "POST", "/v1/rooms/room:keep/members", Some(r#"{"users": ["reader", "writer", "quiet"]}"#));
        assert_eq!(s, 200);
        let mut r = Client::connect(relay.addr, "reader");
        let ra = r.join("room:keep");
        let epoch = r.session.room(ra).unwrap().epoch;
        let mut w = Client::connect(relay.addr, "writer");
        let wa = w.join("room:keep");
        for i in 1..=10u64 {
            assert_eq!(w.publish_acked(wa, format!("m{i}").into_bytes()), i);
        }
        assert_eq!(r.messages(ra, 10).last().unwrap().0, 10);
        let session = r.drop_link();
        // More than the relay reads back into memory at start: the resume below pages the
        // first of them from disk.
        for i in 11..=400u64 {
            assert_eq!(w.publish_acked(wa, format!("m{i}").into_bytes()), i);
        }
        drop(w);
        relay.stop();

        let relay = TestRelay::start(backend, 2, |c| disk(c, &dir.0, FsyncPolicy::Always));
        // The logs' metrics are on /metrics, one series per worker.
        for route in pabal_relay::metrics::routes() {
            relay.handle().add_route(route);
        }
        let (s, _) = api(&relay, "GET", "/metrics", None);
        assert_eq!(s, 200);
        let text = metrics_text(&relay);
        for worker in ["0", "1"] {
            let series = format!("pabal_storage_recovery_scanned_bytes{{worker=\"{worker}\"}}");
            assert!(text.contains(&series), "{series} missing in\n{text}");
        }
        // Nobody re-sends membership: the relay knows it.
        let (s, info) = api(&relay, "GET", "/v1/rooms/room:keep", None);
        assert_eq!(s, 200, "{info}");
        assert_eq!(info["members"], 3, "{info}");
        assert_eq!(info["last_seq"], 400, "{info}");
        assert_eq!(info["epoch"], epoch, "{info}");
        // History older than the in-memory tail, through the server API.
        let (s, hist) = api(&relay, "GET", "/v1/rooms/room:keep/messages?after=0&limit=3", None);
        assert_eq!(s, 200, "{hist}");
        let seqs: Vec<u64> = hist["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, vec![1, 2, 3], "{hist}");
        assert_eq!(hist["messages"][0]["text"], "m1");
        assert!(hist["gap"].is_null(), "{hist}");
        // The phone resumes where it was: same epoch, no gap, every message once, in order.
        let mut r = Client::connect_with(relay.addr, "reader", session);
        let got = r.messages(ra, 390);
        assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), (11..=400).collect::<Vec<_>>());
        assert!(got.iter().all(|(seq, body)| body == format!("m{seq}").as_bytes()));
        assert_eq!(r.session.room(ra).unwrap().epoch, epoch, "no epoch change");
        // New messages continue the sequence.
        let mut w = Client::connect(relay.addr, "writer");
        let wa = w.join("room:keep");
        assert_eq!(w.publish_acked(wa, &b"after"[..]), 401);
        assert_eq!(r.messages(ra, 1)[0].0, 401);
        let events: Vec<Event> = std::iter::from_fn(|| r.next_event(Duration::from_millis(100))).collect();
        assert!(!events.iter().any(|e| matches!(e, Event::Gap { .. } | Event::Bound { previous_epoch: Some(_), .. })), "{events:?}");
        // A removal is durable too.
        let (s, _) = api(&relay, "DELETE", "/v1/rooms/room:keep/members/quiet", None);
        assert_eq!(s, 200);
        relay.stop();
        let relay = TestRelay::start(backend, 2, |c| disk(c, &dir.0, FsyncPolicy::Always));
        let (_, info) = api(&relay, "GET", "/v1/rooms/room:keep", None);
        assert_eq!(info["members"], 2, "{info}");
        assert_eq!(info["last_seq"], 401, "{info}");
        assert_eq!(info["epoch"], epoch, "{info}");
        relay.stop();
    }

    fn a_full_disk_refuses_publishes_and_recovers(backend) {
        let dir = StateDir::new(&format!("full-{backend:?}"));
        let start = |dir: &Path| {
            TestRelay::start(backend, 1, |c| {
                disk(c, dir, FsyncPolicy::Interval);
                c.storage.segment_size = 1 << 20;
                c.storage.max_disk_bytes = 4 << 20;
                c.retention.max_messages = 1_000_000;
                c.retention.max_bytes = 1 << 30;
            })
        };
        let relay = start(&dir.0);
        let mut w = Client::connect(relay.addr, "writer");
        let wa = w.join("room:full");
        let mut r = Client::connect(relay.addr, "reader");
        r.join("room:full");
        drop(r);
        let body = vec![b'x'; 12 * 1024];
        let mut acked = 0u64;
        let refusal = loop {
            let id = w.publish(wa, body.clone());
            match w.wait_for(|e| matches!(e, Event::PubAck { msg_id, .. } if *msg_id == id) || matches!(e, Event::Error(_))) {
                Event::PubAck { seq, .. } => {
                    acked += 1;
                    assert_eq!(seq, acked);
                }
                Event::Error(e) => break e,
                _ => unreachable!(),
            }
            assert!(acked < 1000, "4 MiB never filled");
        };
        assert_eq!(refusal.code, ErrorCode::Overloaded);
        assert!(!refusal.fatal, "retryable: the connection goes on");
        assert_eq!(refusal.message.as_str(), "storage_full");
        // The server API gets 507; reads go on.
        let big = format!(r#"{{"sender": "app", "text": "{}"}}"#, "x".repeat(body.len()));
        let (s, b) = api(&relay, "POST", "/v1/rooms/room:full/messages", Some(&big));
        assert_eq!((s, b["error"]["code"].as_str()), (507, Some("storage_full")), "{b}");
        let (s, info) = api(&relay, "GET", "/v1/rooms/room:full", None);
        assert_eq!((s, info["last_seq"].as_u64()), (200, Some(acked)), "{info}");
        // A member connects and reads what was stored (no new membership to store).
        let mut r = Client::connect(relay.addr, "reader");
        let ra = r.join("room:full");
        assert_eq!(r.messages(ra, 3).iter().map(|m| m.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        // Space returns: retention now keeps 5 messages, whole segments go.
        let mut config = relay.handle().config().as_ref().clone();
        config.retention.max_messages = 5;
        relay.handle().reload(config).unwrap();
        let deadline = Instant::now() + WAIT;
        let seq = loop {
            assert!(Instant::now() < deadline, "publishes never taken again");
            let id = w.publish(wa, &b"again"[..]);
            match w.wait_for(|e| matches!(e, Event::PubAck { msg_id, .. } if *msg_id == id) || matches!(e, Event::Error(_))) {
                Event::PubAck { seq, .. } => break seq,
                Event::Error(e) => assert_eq!(e.message.as_str(), "storage_full"),
                _ => unreachable!(),
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(seq, acked + 1, "nothing refused took a sequence");
        drop((w, r));
        relay.stop();
        // Nothing was acknowledged that was not stored, and nothing refused was stored.
        let relay = start(&dir.0);
        let (_, info) = api(&relay, "GET", "/v1/rooms/room:full", None);
        assert_eq!(info["last_seq"].as_u64(), Some(acked + 1), "{info}");
        let (_, hist) = api(&relay, "GET", &format!("/v1/rooms/room:full/messages?after={acked}"), None);
        assert_eq!(hist["messages"][0]["text"], "again", "{hist}");
        relay.stop();
    }

    fn a_changed_worker_count_is_refused_naming_workers(backend) {
        let dir = StateDir::new(&format!("workers-{backend:?}"));
        let relay = TestRelay::start(backend, 2, |c| disk(c, &dir.0, FsyncPolicy::Never));
        relay.stop();
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            workers: 3,
            io_backend: backend,
            ..Config::default()
        };
        disk(&mut config, &dir.0, FsyncPolicy::Never);
        config.control.listen = "127.0.0.1:0".into();
        let err = pabal_relay::runtime::RelayHandle::start(config).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("workers = 3") && text.contains("2 workers"), "{text}");
    }
}
