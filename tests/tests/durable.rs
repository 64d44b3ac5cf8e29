//! End-to-end: durable state (`[storage] mode = "disk"`, PRODUCT.md item 4) over real
//! sockets, once per I/O backend. A relay started twice on the same directory keeps every
//! room's history, membership and epoch; a full disk (the quota, or a real file system that
//! is full: a small tmpfs mounted by the test) refuses publishes with `storage_full`, keeps
//! delivering what it stored and acknowledges nothing it did not store; space coming back
//! ends the refusals.

#![allow(clippy::unwrap_used)] // reason: tests

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pabal_codec::{ErrorCode, Event};
use pabal_relay::config::{Config, FsyncPolicy, StorageMode};
use pabal_testkit::http::http;
use pabal_testkit::{Client, TestRelay, WAIT, per_backend, skip};

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

/// A tmpfs of a few MiB mounted for one test (a real file system that fills up),
/// unmounted and its mount point removed when dropped.
struct SmallFs(PathBuf);

impl SmallFs {
    /// `None` (after a skip line, a failure under CI) where mounting is not allowed.
    fn mount(test: &str, bytes: u64) -> Option<SmallFs> {
        let dir = std::env::temp_dir().join(format!("pabal-smallfs-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallFs(dir)),
            other => {
                let _ = std::fs::remove_dir(&dir);
                skip(format_args!("cannot mount a small tmpfs here: {other:?}"));
                None
            }
        }
    }

    /// Writes a file until the file system has no space left.
    fn fill(&self, name: &str) -> PathBuf {
        let path = self.0.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(n) if n == chunk.len() => {}
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
                    return path;
                }
            }
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Publishes `body` and waits for its PUBACK (`Ok(seq)`) or an ERROR (`Err`).
fn publish_or_refusal(
    w: &mut Client,
    alias: u32,
    body: &[u8],
) -> Result<u64, pabal_codec::ErrorFrame> {
    let id = w.publish(alias, body.to_vec());
    match w.wait_for(|e| {
        matches!(e, Event::PubAck { msg_id, .. } if *msg_id == id) || matches!(e, Event::Error(_))
    }) {
        Event::PubAck { seq, .. } => Ok(seq),
        Event::Error(e) => Err(e),
        _ => unreachable!(),
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

    fn a_changed_worker_count_rehomes_every_room(backend) {
        let dir = StateDir::new(&format!("workers-{backend:?}"));
        let start = |workers: usize| TestRelay::start(backend, workers, |c| disk(c, &dir.0, FsyncPolicy::Always));
        let relay = start(2);
        let mut w = Client::connect(relay.addr, "writer");
        let mut r = Client::connect(relay.addr, "reader");
        // Enough rooms that both workers own some, and that each count moves some.
        let mut rooms = Vec::new();
        for i in 0..12u64 {
            let room = format!("room:move-{i}");
            let (s, _) = api(&relay, "POST", &format!("/v1/rooms/{room}/members"), Some(r#"{"users": ["reader", "writer"]}"#));
            assert_eq!(s, 200);
            let wa = w.join(&room);
            let ra = r.join(&room);
            let n = 3 + i;
            for k in 1..=n {
                assert_eq!(w.publish_acked(wa, format!("{room}/{k}").into_bytes()), k);
            }
            assert_eq!(r.messages(ra, n as usize).last().unwrap().0, n);
            let epoch = r.session.room(ra).unwrap().epoch;
            rooms.push((room, ra, epoch, n));
        }
        let session = r.drop_link();
        drop(w);
        relay.stop();
        // Every acknowledged message is there with its sequence, every room with its epoch
        // and members, whichever worker owns it now.
        let check = |relay: &TestRelay| {
            for (room, _, epoch, n) in &rooms {
                let (s, info) = api(relay, "GET", &format!("/v1/rooms/{room}"), None);
                assert_eq!(s, 200, "{room}: {info}");
                assert_eq!(info["last_seq"], *n, "{room}: {info}");
                assert_eq!(info["epoch"], *epoch, "{room}: {info}");
                assert_eq!(info["members"], 2, "{room}: {info}");
                let (s, hist) = api(relay, "GET", &format!("/v1/rooms/{room}/messages?after=0&limit=100"), None);
                assert_eq!(s, 200, "{hist}");
                let got: Vec<(u64, String)> = hist["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| (m["seq"].as_u64().unwrap(), m["text"].as_str().unwrap().to_owned()))
                    .collect();
                let want: Vec<(u64, String)> = (1..=*n).map(|k| (k, format!("{room}/{k}"))).collect();
                assert_eq!(got, want, "{room}");
            }
        };
        for workers in [1, 3] {
            let relay = start(workers);
            check(&relay);
            relay.stop();
        }
        // The same count again: nothing to re-home, the same answers.
        let relay = start(3);
        check(&relay);
        // The phone resumes across the changes with no gap and no epoch change, and each
        // room's sequence continues on its new owner.
        let mut r = Client::connect_with(relay.addr, "reader", session);
        let mut w = Client::connect(relay.addr, "writer");
        for (room, ra, epoch, n) in &rooms {
            let wa = w.join(room);
            assert_eq!(w.publish_acked(wa, format!("{room}/next").into_bytes()), n + 1);
            assert_eq!(r.messages(*ra, 1)[0].0, n + 1, "{room}");
            assert_eq!(r.session.room(*ra).unwrap().epoch, *epoch, "{room}");
        }
        let events: Vec<Event> = std::iter::from_fn(|| r.next_event(Duration::from_millis(100))).collect();
        assert!(!events.iter().any(|e| matches!(e, Event::Gap { .. } | Event::Bound { previous_epoch: Some(_), .. })), "{events:?}");
        relay.stop();
    }

    fn a_full_file_system_refuses_publishes_keeps_delivering_and_recovers(backend) {
        let Some(fs) = SmallFs::mount(&format!("full-{backend:?}"), 8 << 20) else {
            return;
        };
        let dir = fs.0.join("state");
        let start = |dir: &Path| {
            TestRelay::start(backend, 1, |c| {
                disk(c, dir, FsyncPolicy::Always);
                c.storage.segment_size = 1 << 20;
                c.retention.max_messages = 1_000_000;
                c.retention.max_bytes = 1 << 30;
            })
        };
        let relay = start(&dir);
        let mut w = Client::connect(relay.addr, "writer");
        let wa = w.join("room:fs");
        let mut r = Client::connect(relay.addr, "reader");
        let ra = r.join("room:fs");
        // A phone that joins and goes away; it comes back while the disk is full.
        let mut late = Client::connect(relay.addr, "late");
        let la = late.join("room:fs");
        let late_session = late.drop_link();
        // Nothing is left on the file system but what the log holds (its open segment).
        let filler = fs.fill("filler");
        let body = vec![b'x'; 8 * 1024];
        let mut acked = 0u64;
        let refusal = loop {
            match publish_or_refusal(&mut w, wa, &body) {
                Ok(seq) => {
                    acked += 1;
                    assert_eq!(seq, acked);
                    // Delivered as it is stored: nothing waits on the space that is missing.
                    assert_eq!(r.messages(ra, 1)[0].0, seq);
                }
                Err(e) => break e,
            }
            assert!(acked < 1000, "the file system never filled");
        };
        assert!(acked > 0, "the open segment takes messages on a full file system");
        assert_eq!(refusal.code, ErrorCode::Overloaded);
        assert!(!refusal.fatal, "retryable: the connection goes on");
        assert_eq!(refusal.message.as_str(), "storage_full");
        // Refused again, and by the server API (507); the connections stay served: reads
        // answer at once, and a phone that comes back resumes with what was stored.
        let err = publish_or_refusal(&mut w, wa, &body).unwrap_err();
        assert_eq!(err.message.as_str(), "storage_full");
        let big = format!(r#"{{"sender": "app", "text": "{}"}}"#, "x".repeat(body.len()));
        let (s, b) = api(&relay, "POST", "/v1/rooms/room:fs/messages", Some(&big));
        assert_eq!((s, b["error"]["code"].as_str()), (507, Some("storage_full")), "{b}");
        let (s, info) = api(&relay, "GET", "/v1/rooms/room:fs", None);
        assert_eq!((s, info["last_seq"].as_u64()), (200, Some(acked)), "{info}");
        let (s, hist) = api(&relay, "GET", "/v1/rooms/room:fs/messages?after=0&limit=3", None);
        assert_eq!(s, 200, "{hist}");
        assert_eq!(hist["messages"].as_array().map(Vec::len), Some(3), "{hist}");
        let mut late = Client::connect_with(relay.addr, "late", late_session);
        let got = late.messages(la, acked as usize);
        assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), (1..=acked).collect::<Vec<_>>());
        // Space returns: publishes are taken again by themselves, with the next sequence.
        std::fs::remove_file(&filler).unwrap();
        let deadline = Instant::now() + WAIT;
        let seq = loop {
            assert!(Instant::now() < deadline, "publishes never taken again");
            match publish_or_refusal(&mut w, wa, &b"again"[..]) {
                Ok(seq) => break seq,
                Err(e) => assert_eq!(e.message.as_str(), "storage_full"),
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(seq, acked + 1, "nothing refused took a sequence");
        assert_eq!(r.messages(ra, 1)[0].0, seq);
        assert_eq!(late.messages(la, 1)[0].0, seq);
        drop((w, r, late));
        relay.stop();
        // Nothing was acknowledged that was not stored, and nothing refused was stored.
        let relay = start(&dir);
        let (_, info) = api(&relay, "GET", "/v1/rooms/room:fs", None);
        assert_eq!(info["last_seq"].as_u64(), Some(acked + 1), "{info}");
        let (_, hist) = api(&relay, "GET", &format!("/v1/rooms/room:fs/messages?after={acked}"), None);
        assert_eq!(hist["messages"][0]["text"], "again", "{hist}");
        relay.stop();
    }
}
