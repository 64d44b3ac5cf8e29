//! End-to-end: exactly-once publish across reconnects (protocol v2, PROTOCOL.md §12) over
//! real sockets, once per I/O backend. A phone (a device session) is cut at seeded random
//! points between its PUBLISH and the PUBACK and publishes again with the same msg_id on
//! its next connection: every message reaches the room once, under the one sequence its
//! PUBACKs name. With disk storage, the window of publish ids survives a restart.

#![allow(clippy::unwrap_used)] // reason: tests

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use pabal_codec::{ClientSession, Event};
use pabal_relay::config::{Config, FsyncPolicy, StorageMode};
use pabal_testkit::{Client, TestRelay, per_backend};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const ROOM: &str = "room:once";

/// Publishes `body` with `msg_id` again (same id: the session is a device's) on a fresh
/// connection, and waits for its PUBACK's sequence.
fn republish(w: &mut Client, msg_id: u64, body: &[u8]) -> u64 {
    let alias = w.session.alias_of(ROOM).unwrap();
    let (id, frame) = w
        .session
        .republish(alias, msg_id, Bytes::copy_from_slice(body), None);
    assert_eq!(id, msg_id, "a device session keeps the id");
    w.send(&frame);
    puback(w, msg_id)
}

fn puback(w: &mut Client, id: u64) -> u64 {
    match w.wait_for(|e| matches!(e, Event::PubAck { msg_id, .. } if *msg_id == id)) {
        Event::PubAck { seq, .. } => seq,
        _ => unreachable!(),
    }
}

/// Where the link drops.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// Right after the PUBLISH was written (the relay may not have read it yet).
    AfterWrite,
    /// After a short random pause: the relay has probably accepted it.
    AfterPause(u64),
    /// After the PUBACK arrived, which the phone then never processed (it was lost with
    /// the link): the relay surely accepted the message.
    PubAckLost,
}

per_backend! {
    fn a_publisher_cut_between_publish_and_puback_gets_each_message_in_once(backend) {
        let seed = std::env::var("PABAL_ONCE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
        let mut rng = SmallRng::seed_from_u64(seed);
        let relay = TestRelay::start(backend, 2, |_| {});
        let mut reader = Client::connect(relay.addr, "reader");
        let ra = reader.join(ROOM);
        let mut w = Client::connect_with(relay.addr, "writer", ClientSession::with_device(rng.random(), 0));
        let mut alias = w.join(ROOM);
        const N: usize = 30;
        let mut acked = Vec::with_capacity(N);
        for i in 0..N {
            let body = format!("m{i}").into_bytes();
            let cut = match rng.random_range(0..3) {
                0 => Cut::AfterWrite,
                1 => Cut::AfterPause(rng.random_range(0..3)),
                _ => Cut::PubAckLost,
            };
            let msg_id = w.publish(alias, body.clone());
            let session = match cut {
                Cut::AfterWrite => w.drop_link(),
                Cut::AfterPause(ms) => {
                    std::thread::sleep(Duration::from_millis(ms));
                    w.drop_link()
                }
                Cut::PubAckLost => {
                    let before = w.session.clone();
                    let first = puback(&mut w, msg_id);
                    drop(w.drop_link());
                    acked.push((i, first));
                    before
                }
            };
            w = Client::connect_with(relay.addr, "writer", session);
            let seq = republish(&mut w, msg_id, &body);
            if let Cut::PubAckLost = cut {
                assert_eq!(acked.pop().unwrap(), (i, seq), "seed {seed}: {cut:?}: the original PUBACK");
            }
            acked.push((i, seq));
            alias = w.session.alias_of(ROOM).unwrap();
        }
        // The reader got each message once, in order, under the sequence its PUBACK named.
        let got = reader.messages(ra, N);
        let want: Vec<(u64, Bytes)> = acked
            .iter()
            .map(|&(i, seq)| (seq, Bytes::from(format!("m{i}").into_bytes())))
            .collect();
        assert_eq!(got, want, "seed {seed}");
        assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), (1..=N as u64).collect::<Vec<_>>());
        // And nothing more.
        reader.ping();
        let extra: Vec<Event> = std::iter::from_fn(|| reader.next_event(Duration::from_millis(100))).collect();
        assert!(!extra.iter().any(|e| matches!(e, Event::Message { .. })), "seed {seed}: {extra:?}");
    }

    fn a_restart_with_disk_storage_keeps_the_window_of_publish_ids(backend) {
        let dir = std::env::temp_dir().join(format!("pabal-once-{backend:?}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let disk = |c: &mut Config, dir: &PathBuf| {
            c.storage.mode = StorageMode::Disk;
            c.storage.dir = dir.clone();
            c.storage.fsync = FsyncPolicy::Always;
        };
        let relay = TestRelay::start(backend, 2, |c| disk(c, &dir));
        let mut w = Client::connect_with(relay.addr, "writer", ClientSession::with_device(0xd15c, 0));
        let wa = w.join(ROOM);
        let msg_id = w.publish(wa, &b"once"[..]);
        // What the phone holds: the message sent, its PUBACK not seen yet.
        let before = w.session.clone();
        assert_eq!(puback(&mut w, msg_id), 1);
        drop(w.drop_link());
        relay.stop();

        // The PUBACK was lost with the link, and the relay restarted meanwhile.
        let relay = TestRelay::start(backend, 2, |c| disk(c, &dir));
        let mut w = Client::connect_with(relay.addr, "writer", before);
        assert_eq!(republish(&mut w, msg_id, b"once"), 1, "the original sequence");
        let wa = w.session.alias_of(ROOM).unwrap();
        assert_eq!(w.publish_acked(wa, &b"next"[..]), 2, "nothing was stored twice");
        let mut reader = Client::connect(relay.addr, "reader");
        let ra = reader.join(ROOM);
        reader.ping();
        let events: Vec<Event> = std::iter::from_fn(|| reader.next_event(Duration::from_millis(100))).collect();
        assert!(!events.iter().any(|e| matches!(e, Event::Message { .. })), "a new member reads nothing old: {events:?}");
        assert_eq!(w.publish_acked(wa, &b"last"[..]), 3);
        assert_eq!(reader.messages(ra, 1), vec![(3, Bytes::from_static(b"last"))]);
        relay.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
