//! End-to-end: the delivery contract (PRODUCT.md items 1, 2, 3 and 5) over real sockets,
//! once per I/O backend. No message is silently lost, duplicated or reordered: every client
//! here runs on `ClientSession`, which refuses any such frame, and the tests check contents.

#![allow(clippy::unwrap_used)] // reason: tests

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pabal_codec::{ClientFrame, Event, Ping};
use pabal_testkit::{Client, TestRelay, WAIT, per_backend};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Publishes `count` numbered messages into `room` at about `rate` per second from its own
/// thread; returns the number published when done.
fn publisher(
    addr: SocketAddr,
    room: &'static str,
    count: u64,
    rate: u64,
    done: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut p = Client::connect(addr, "publisher");
        let alias = p.join(room);
        let gap = Duration::from_micros(1_000_000 / rate.max(1));
        for i in 1..=count {
            let seq = p.publish_acked(alias, format!("n{i}").into_bytes());
            assert_eq!(seq, i, "the publisher is the only writer");
            done.store(i, Ordering::SeqCst);
            std::thread::sleep(gap);
        }
    })
}

per_backend! {
    fn resume_after_random_cuts_loses_nothing(backend) {
        // Seeded: a failure names its seed and can be replayed with PABAL_SEED.
        let seed: u64 = std::env::var("PABAL_SEED").ok().and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        eprintln!("resume_after_random_cuts_loses_nothing: PABAL_SEED={seed}");
        let mut rng = SmallRng::seed_from_u64(seed);
        const TOTAL: u64 = 600;
        let relay = TestRelay::start(backend, 2, |c| c.retention.max_messages = 10_000);
        let done = Arc::new(AtomicU64::new(0));
        // The subscriber joins first, so it is owed every message from 1.
        let mut sub = Client::connect(relay.addr, "reader");
        let alias = sub.join("room:cuts");
        let writer = publisher(relay.addr, "room:cuts", TOTAL, 2_000, done.clone());
        let mut received: Vec<u64> = Vec::new();
        let mut cuts = 0;
        while received.last().copied() != Some(TOTAL) {
            // Read for a random while, then drop the link at a random point.
            let until = Instant::now() + Duration::from_millis(rng.random_range(0..40));
            while Instant::now() < until && received.last().copied() != Some(TOTAL) {
                match sub.next_event(Duration::from_millis(5)) {
                    Some(Event::Message { alias: a, seq: Some(seq), payload, .. }) if a == alias => {
                        assert_eq!(payload, Bytes::from(format!("n{seq}")));
                        received.push(seq);
                    }
                    Some(Event::Gap { from, to, .. }) => panic!("gap {from}..={to} within retention"),
                    Some(_) | None => {}
                }
            }
            if received.last().copied() == Some(TOTAL) {
                break;
            }
            let session = sub.drop_link();
            cuts += 1;
            if rng.random_bool(0.5) {
                std::thread::sleep(Duration::from_millis(rng.random_range(0..30)));
            }
            sub = Client::connect_with(relay.addr, "reader", session);
            // Resumed cleanly: alias 0 is the room again, no ROOM frame needed.
            assert_eq!(sub.session.room(alias).map(|r| r.room_id), Some(pabal_codec::room_id(false, "room:cuts")));
        }
        writer.join().unwrap();
        assert!(cuts >= 3, "seed {seed}: only {cuts} cuts");
        assert_eq!(received, (1..=TOTAL).collect::<Vec<_>>(), "seed {seed}: in order, once each");
        relay.stop();
    }

    fn a_stalled_reader_slows_nobody_and_stays_capped(backend) {
        const CAP: usize = 128 * 1024;
        let relay = TestRelay::start(backend, 2, |c| {
            c.connection.max_queued_bytes = CAP;
            c.retention.max_messages = 100_000;
            c.retention.max_bytes = 256 << 20;
        });
        let mut fast = Client::connect(relay.addr, "fast");
        let fast_alias = fast.join("room:slow");
        // The stalled reader keeps a tiny receive window so the relay's queue, not the
        // kernel, is what fills up.
        let mut slow = Client::connect_small_window(relay.addr, "slow", 4096);
        let slow_alias = slow.join("room:slow");
        let mut p = Client::connect(relay.addr, "writer");
        let alias = p.join("room:slow");
        const N: u64 = 4000;
        let payload = vec![b'x'; 3000];
        let stop = Arc::new(AtomicBool::new(false));
        for i in 1..=N {
            let mut body = format!("{i}:").into_bytes();
            body.extend_from_slice(&payload);
            p.publish(alias, body);
            if i % 200 == 0 {
                // Keep the fast reader draining while we publish.
                let got = fast.messages(fast_alias, 200);
                assert_eq!(got.first().unwrap().0, i - 199);
            }
        }
        stop.store(true, Ordering::SeqCst);
        let stats = relay.handle().stats();
        assert!(stats.lag_events >= 1, "the stalled reader should have started lagging: {stats:?}");
        assert!(
            stats.queue_high_water <= (CAP + 64 * 1024) as u64,
            "a connection's queue grew past its cap: {} > {}",
            stats.queue_high_water,
            CAP + 64 * 1024
        );
        // Now the slow reader wakes up and gets everything, in order, from history.
        let got = slow.messages(slow_alias, N as usize);
        for (i, (seq, body)) in got.iter().enumerate() {
            assert_eq!(*seq, i as u64 + 1);
            assert!(body.starts_with(format!("{seq}:").as_bytes()));
        }
        relay.stop();
    }

    fn stalled_phones_each_hold_one_window_and_lose_nothing(backend) {
        // Many phones stop reading; each costs the relay its window of queued bytes (the
        // relay's own gauge says so), not a copy of what it missed; once they read again,
        // history serves everything, in order, once.
        let phones: usize = std::env::var("PABAL_STALLED_PHONES").ok()
            .and_then(|s| s.parse().ok()).unwrap_or(2000);
        const WINDOW: usize = 8 * 1024;
        const N: u64 = 120;
        const PAYLOAD: usize = 1000;
        let relay = TestRelay::start(backend, 2, |c| {
            c.connection.max_queued_bytes = WINDOW;
            c.connection.replay_page_bytes = 4096;
            // A phone's link holds little in flight; loopback's autotuning would let each
            // stalled socket hold megabytes in the kernel before the relay's window fills.
            c.connection.send_buffer_bytes = 4096;
            c.retention.max_messages = 100_000;
            c.retention.max_bytes = 256 << 20;
        });
        let mut stalled: Vec<(Client, u32)> = (0..phones)
            .map(|i| {
                let mut c = Client::connect_small_window(relay.addr, &format!("phone{i}"), 4096);
                let alias = c.join("room:stalled");
                (c, alias)
            })
            .collect();
        let mut p = Client::connect(relay.addr, "writer");
        let alias = p.join("room:stalled");
        let body = |i: u64| {
            let mut b = format!("{i}:").into_bytes();
            b.resize(PAYLOAD, b'x');
            b
        };
        for i in 1..=N {
            assert_eq!(p.publish_acked(alias, body(i)), i);
        }
        // A PUBACK precedes the fan-out on the other worker: wait until every stalled phone
        // has fallen behind (each was sent far more than its window and socket hold).
        let deadline = Instant::now() + WAIT;
        let stats = loop {
            let stats = relay.handle().stats();
            if stats.lagging as usize == phones || Instant::now() > deadline {
                break stats;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(stats.lagging as usize, phones, "every stalled phone falls behind to its cursor");
        // Control frames (a PING, a PUBACK) are not held to the window; 64 bytes covers one.
        assert!(
            stats.queue_high_water <= (WINDOW + 64) as u64,
            "a stalled phone's queue grew past its window: {} > {}",
            stats.queue_high_water,
            WINDOW + 64
        );
        for (c, a) in &mut stalled {
            let got = c.messages(*a, N as usize);
            for (i, (seq, payload)) in got.iter().enumerate() {
                assert_eq!(*seq, i as u64 + 1);
                assert_eq!(payload[..], body(*seq)[..]);
            }
        }
        assert_eq!(relay.handle().stats().gaps, 0);
        relay.stop();
    }

    fn resume_past_retention_gets_the_exact_gap(backend) {
        let relay = TestRelay::start(backend, 2, |c| c.retention.max_messages = 10);
        let mut p = Client::connect(relay.addr, "writer");
        let alias = p.join("room:short");
        let mut r = Client::connect(relay.addr, "reader");
        let ra = r.join("room:short");
        for i in 1..=5 {
            p.publish_acked(alias, format!("{i}").into_bytes());
        }
        assert_eq!(r.messages(ra, 5).last().unwrap().0, 5);
        let session = r.drop_link();
        for i in 6..=35 {
            p.publish_acked(alias, format!("{i}").into_bytes());
        }
        // Kept: 26..=35. Missed while away: 6..=35. Lost to retention: 6..=25.
        let mut r = Client::connect_with(relay.addr, "reader", session);
        match r.wait_for(|e| matches!(e, Event::Gap { .. })) {
            Event::Gap { alias, from, to, .. } => assert_eq!((alias, from, to), (ra, 6, 25)),
            _ => unreachable!(),
        }
        let rest = r.messages(ra, 10);
        assert_eq!(rest.iter().map(|m| m.0).collect::<Vec<_>>(), (26..=35).collect::<Vec<_>>());
        relay.stop();
    }

    fn resume_across_a_restart_sees_a_new_epoch(backend) {
        let relay = TestRelay::start(backend, 2, |_| {});
        let mut r = Client::connect(relay.addr, "reader");
        let alias = r.join("room:epoch");
        let old_epoch = r.session.room(alias).unwrap().epoch;
        let mut p = Client::connect(relay.addr, "writer");
        let pa = p.join("room:epoch");
        p.publish_acked(pa, &b"before"[..]);
        r.messages(alias, 1);
        let session = r.drop_link();
        drop(p);
        relay.stop();
        // A new process: history was in memory only, so the stream restarts in a new epoch.
        std::thread::sleep(Duration::from_millis(5));
        let relay = TestRelay::start(backend, 2, |_| {});
        // The app server restores membership after a restart (here: the user rejoins).
        let mut again = Client::connect(relay.addr, "reader");
        again.join("room:epoch");
        drop(again);
        let mut p = Client::connect(relay.addr, "writer");
        let pa = p.join("room:epoch");
        p.publish_acked(pa, &b"after"[..]);
        let mut r = Client::connect_with(relay.addr, "reader", session);
        match r.wait_for(|e| matches!(e, Event::Bound { .. })) {
            Event::Bound { alias: a, room, previous_epoch, .. } => {
                assert_eq!(a, alias);
                assert_eq!(previous_epoch, Some(old_epoch));
                assert_ne!(room.epoch, old_epoch);
                assert_eq!(room.cursor, 0, "the new epoch's stream is replayed from its start");
            }
            _ => unreachable!(),
        }
        assert_eq!(r.messages(alias, 1), vec![(1, Bytes::from_static(b"after"))]);
        relay.stop();
    }

    fn a_silent_peer_is_detected_and_closed(backend) {
        let relay = TestRelay::start(backend, 1, |c| {
            c.heartbeat.min_interval = Duration::from_secs(1);
            c.heartbeat.interval = Duration::from_secs(1);
            c.heartbeat.timeout = Duration::from_secs(1);
        });
        let mut quiet = Client::connect(relay.addr, "quiet");
        let started = Instant::now();
        // It neither answers nor closes; the relay's PING goes unanswered.
        let events = quiet.until_closed();
        assert!(events.iter().any(|e| matches!(e, Event::Ping(_))), "{events:?}");
        let took = started.elapsed();
        assert!(took < WAIT, "took {took:?}");
        assert_eq!(relay.handle().stats().heartbeat_timeouts, 1);
        // A peer that answers stays.
        let mut alive = Client::connect(relay.addr, "alive");
        for _ in 0..3 {
            alive.wait_for(|e| matches!(e, Event::Ping(_)));
            alive.send(&ClientFrame::Pong(pabal_codec::Pong::default()));
        }
        assert_eq!(relay.handle().stats().heartbeat_timeouts, 1);
        relay.stop();
    }

    fn heartbeat_interval_is_negotiated_within_bounds(backend) {
        let relay = TestRelay::start(backend, 1, |_| {});
        let mut c = Client::connect(relay.addr, "phone");
        c.send(&ClientFrame::Ping(Ping { interval_secs: Some(5) }));
        match c.wait_for(|e| matches!(e, Event::Pong(_))) {
            Event::Pong(p) => assert_eq!(p.interval_secs, Some(30), "clamped to min_interval"),
            _ => unreachable!(),
        }
        c.send(&ClientFrame::Ping(Ping { interval_secs: Some(900) }));
        match c.wait_for(|e| matches!(e, Event::Pong(_))) {
            Event::Pong(p) => assert_eq!(p.interval_secs, Some(900)),
            _ => unreachable!(),
        }
        relay.stop();
    }

    fn ephemeral_events_are_not_sequenced_or_kept(backend) {
        let relay = TestRelay::start(backend, 2, |_| {});
        let mut a = Client::connect(relay.addr, "ann");
        let mut b = Client::connect(relay.addr, "bob");
        let aa = a.join("room:typing");
        let ba = b.join("room:typing");
        a.send(&ClientFrame::Publish(pabal_codec::Publish {
            alias: aa, msg_id: None, ack: None, payload: Bytes::from_static(b"typing"),
        }));
        match b.wait_for(|e| matches!(e, Event::Message { .. })) {
            Event::Message { seq, payload, .. } => {
                assert_eq!(seq, None);
                assert_eq!(payload, Bytes::from_static(b"typing"));
            }
            _ => unreachable!(),
        }
        // The next real message is still sequence 1.
        assert_eq!(a.publish_acked(aa, &b"hi"[..]), 1);
        assert_eq!(b.messages(ba, 1)[0].0, 1);
        relay.stop();
    }
}
