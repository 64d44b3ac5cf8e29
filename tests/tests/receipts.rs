//! End-to-end: receipts and unread counts (issue #15 items 2 and 3), once per I/O backend,
//! on two workers: a user with two devices, ACKs on one move the user's delivered marker,
//! READ on the other moves the read marker, the room's other members get RECEIPT frames,
//! and the server API's unread counts (per room and in total) and a room's markers follow.
//! With disk storage, markers survive a restart and a change of the worker count.

#![allow(clippy::unwrap_used)] // reason: tests

use std::time::{Duration, Instant};

use pabal_codec::{Ack, ClientFrame, Event, Read};
use pabal_relay::config::{FsyncPolicy, StorageMode};
use pabal_testkit::http::http;
use pabal_testkit::{Client, TestRelay, WAIT, per_backend};
use serde_json::Value;

fn get(relay: &TestRelay, path: &str) -> Value {
    let addr = relay.handle().control_addr().unwrap();
    let (status, body) = http(addr, "GET", path, None, None);
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// Polls `path` until `done` holds of its answer (markers reach the owner asynchronously).
fn until(relay: &TestRelay, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let body = get(relay, path);
        if done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{what} never held: {body}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `user`'s markers in `GET /v1/rooms/{room}/receipts`: (delivered, read).
fn markers_of(body: &Value, user: &str) -> (u64, u64) {
    let m = body["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user"] == user)
        .unwrap_or_else(|| panic!("{user} is not listed: {body}"));
    (
        m["delivered_up_to"].as_u64().unwrap(),
        m["read_up_to"].as_u64().unwrap(),
    )
}

/// Waits for a RECEIPT naming `user` with these markers.
fn receipt_for(client: &mut Client, user: &str, delivered: u64, read: u64) {
    client.wait_for(|e| {
        matches!(e, Event::Receipt { members, .. }
            if members.iter().any(|m| m.user.as_str() == user && m.delivered == delivered && m.read == read))
    });
}

fn unread(body: &Value, room: &str) -> u64 {
    body["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == room)
        .unwrap_or_else(|| panic!("{room} is not listed: {body}"))["unread"]
        .as_u64()
        .unwrap()
}

per_backend! {
    fn receipts_and_unread_counts_follow_acks_and_reads_across_two_devices(backend) {
        let relay = TestRelay::start(backend, 2, |c| {
            c.receipts.interval = Duration::from_millis(20);
        });
        let mut phone = Client::connect(relay.addr, "ann");
        let mut tablet = Client::connect(relay.addr, "ann");
        let mut bob = Client::connect(relay.addr, "bob");
        let mut cat = Client::connect(relay.addr, "cat");
        let p = phone.join("r");
        let t = tablet.wait_for(|e| matches!(e, Event::Bound { .. }));
        let Event::Bound { alias: t, .. } = t else { unreachable!() };
        let b = bob.join("r");
        cat.join("r");
        for i in 0..3 {
            bob.publish_acked(b, format!("m{i}"));
        }
        assert_eq!(phone.messages(p, 3).len(), 3);
        assert_eq!(tablet.messages(t, 3).len(), 3);
        let body = get(&relay, "/v1/users/ann/unread");
        assert_eq!((unread(&body, "r"), body["total"].as_u64()), (3, Some(3)), "{body}");

        // The phone acknowledges: ann's delivered marker moves, for both devices.
        phone.send(&ClientFrame::Ack(Ack::from_pairs(&[(p, 3)])));
        let receipts = until(&relay, "/v1/rooms/r/receipts", "ann delivered 3", |b| {
            markers_of(b, "ann") == (3, 0)
        });
        assert_eq!(markers_of(&receipts, "cat"), (0, 0), "{receipts}");
        receipt_for(&mut bob, "ann", 3, 0);
        receipt_for(&mut cat, "ann", 3, 0);
        receipt_for(&mut tablet, "ann", 3, 0);
        // Delivered is not read.
        assert_eq!(unread(&get(&relay, "/v1/users/ann/unread"), "r"), 3);

        // The tablet reads up to 2: one unread left, and everyone hears it.
        tablet.send(&ClientFrame::Read(Read { alias: t, seq: 2 }));
        until(&relay, "/v1/users/ann/unread", "ann's unread 1", |b| unread(b, "r") == 1);
        receipt_for(&mut bob, "ann", 3, 2);
        receipt_for(&mut phone, "ann", 3, 2);

        // A second room adds to the total; a room ann is not in does not.
        let s = bob.join("s");
        let body = get(&relay, "/v1/users/bob/unread");
        assert_eq!(body["total"].as_u64(), Some(3), "bob read nothing: {body}");
        tablet.join("s");
        phone.wait_for(|e| matches!(e, Event::Bound { .. }));
        bob.publish_acked(s, "x");
        bob.publish_acked(s, "y");
        cat.join("t");
        let body = until(&relay, "/v1/users/ann/unread", "ann's total 3", |b| {
            b["total"].as_u64() == Some(3)
        });
        assert_eq!((unread(&body, "r"), unread(&body, "s")), (1, 2), "{body}");
        assert_eq!(body["rooms"].as_array().unwrap().len(), 2, "{body}");

        // Reading everything clears the badge.
        tablet.send(&ClientFrame::Read(Read { alias: t, seq: 3 }));
        let s_alias = tablet.session.alias_of("s").unwrap();
        tablet.send(&ClientFrame::Read(Read { alias: s_alias, seq: 2 }));
        until(&relay, "/v1/users/ann/unread", "ann's total 0", |b| {
            b["total"].as_u64() == Some(0)
        });
    }

    fn markers_survive_a_restart_and_a_changed_worker_count_with_disk_storage(backend) {
        let dir = pabal_testkit::TempDir::new("receipts-durable");
        let start = |workers: usize| {
            TestRelay::start(backend, workers, |c| {
                c.storage.mode = StorageMode::Disk;
                c.storage.dir = dir.path("state");
                c.storage.fsync = FsyncPolicy::Always;
                c.receipts.interval = Duration::from_millis(20);
            })
        };
        let relay = start(2);
        let mut ann = Client::connect(relay.addr, "ann");
        let mut bob = Client::connect(relay.addr, "bob");
        let a = ann.join("r");
        let b = bob.join("r");
        for i in 0..3 {
            bob.publish_acked(b, format!("m{i}"));
        }
        assert_eq!(ann.messages(a, 3).len(), 3);
        ann.send(&ClientFrame::Ack(Ack::from_pairs(&[(a, 3)])));
        ann.send(&ClientFrame::Read(Read { alias: a, seq: 2 }));
        // A RECEIPT leaves the owner only once the markers it reports are stored.
        receipt_for(&mut bob, "ann", 3, 2);
        drop((ann, bob));
        relay.stop();

        for workers in [2, 3] {
            let relay = start(workers);
            let body = get(&relay, "/v1/rooms/r/receipts");
            assert_eq!(markers_of(&body, "ann"), (3, 2), "{workers} workers: {body}");
            assert_eq!(markers_of(&body, "bob"), (0, 0), "{workers} workers: {body}");
            let body = get(&relay, "/v1/users/ann/unread");
            assert_eq!(unread(&body, "r"), 1, "{workers} workers: {body}");
            relay.stop();
        }
    }
}
