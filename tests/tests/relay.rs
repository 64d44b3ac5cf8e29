//! End-to-end: the relay's core promises over real loopback sockets, once per I/O backend.

#![allow(clippy::unwrap_used)] // reason: tests

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use pabal_codec::{ErrorCode, Event, GoAwayReason};
use pabal_testkit::{Client, TestRelay, per_backend};

per_backend! {
    fn two_users_chat_in_a_room(backend) {
        let relay = TestRelay::start(backend, 2, |_| {});
        let mut ann = Client::connect(relay.addr, "ann");
        let mut bob = Client::connect(relay.addr, "bob");
        let a = ann.join("dm:ann:bob");
        let b = bob.join("dm:ann:bob");
        let mut expected_seq = 0;
        for round in 0..20u64 {
            let (from, to, from_alias, to_alias) = if round % 2 == 0 {
                (&mut ann, &mut bob, a, b)
            } else {
                (&mut bob, &mut ann, b, a)
            };
            let text = format!("message {round} from {}", from.user);
            let seq = from.publish_acked(from_alias, text.clone().into_bytes());
            expected_seq += 1;
            assert_eq!(seq, expected_seq, "sequences are contiguous and acked");
            let got = to.messages(to_alias, 1);
            assert_eq!(got, vec![(seq, Bytes::from(text))]);
        }
        // Neither side got its own messages echoed back.
        assert!(ann.next_event(Duration::from_millis(100)).is_none());
        assert!(bob.next_event(Duration::from_millis(100)).is_none());
        relay.stop();
    }

    fn a_thousand_subscribers_get_a_thousand_broadcasts(backend) {
        const SUBSCRIBERS: usize = 1000;
        const BROADCASTS: usize = 1000;
        let relay = TestRelay::start(backend, 2, |_| {});
        let mut subs: Vec<(Client, u32)> = (0..SUBSCRIBERS)
            .map(|i| {
                let mut c = Client::connect(relay.addr, &format!("fan{i}"));
                let alias = c.subscribe("brand:news");
                (c, alias)
            })
            .collect();
        let mut publisher = Client::connect(relay.addr, "brand");
        let alias = publisher.subscribe("brand:news");
        for i in 0..BROADCASTS {
            publisher.publish(alias, format!("broadcast {i:04}").into_bytes());
        }
        for i in 0..BROADCASTS {
            let ev = publisher.wait_for(|e| matches!(e, Event::PubAck { .. }));
            let Event::PubAck { seq, .. } = ev else { unreachable!() };
            assert_eq!(seq, i as u64 + 1);
        }
        for (client, alias) in &mut subs {
            // ClientSession already refuses any skipped or repeated sequence; check the
            // content too.
            let got = client.messages(*alias, BROADCASTS);
            for (i, (seq, payload)) in got.iter().enumerate() {
                assert_eq!(*seq, i as u64 + 1);
                assert_eq!(payload, format!("broadcast {i:04}").as_bytes());
            }
        }
        relay.stop();
    }

    fn one_total_order_across_cores(backend) {
        const MEMBERS: usize = 12;
        const PER_MEMBER: usize = 50;
        let relay = TestRelay::start(backend, 4, |_| {});
        let mut members: Vec<(Client, u32)> = (0..MEMBERS)
            .map(|i| {
                let mut c = Client::connect(relay.addr, &format!("m{i}"));
                let alias = c.join("group:order");
                (c, alias)
            })
            .collect();
        let workers: HashSet<u64> = members.iter().map(|(c, _)| c.worker()).collect();
        assert!(workers.len() >= 2, "members should spread over workers: {workers:?}");
        // Everyone publishes at once, interleaved.
        for i in 0..PER_MEMBER {
            for (c, alias) in &mut members {
                let text = format!("{}:{i}", c.user);
                c.publish(*alias, text.into_bytes());
            }
        }
        let total = MEMBERS * PER_MEMBER;
        let mut reference: Option<Vec<(u64, Bytes)>> = None;
        for (c, alias) in &mut members {
            // Each member sees everyone else's messages; its own arrive as PUBACKs.
            let mut own = Vec::new();
            while own.len() < PER_MEMBER {
                if let Event::PubAck { seq, .. } = c.wait_for(|e| matches!(e, Event::PubAck { .. })) {
                    own.push(seq);
                }
            }
            let others = c.messages(*alias, total - PER_MEMBER);
            let mut all: Vec<(u64, Bytes)> = others;
            for (i, seq) in own.iter().enumerate() {
                all.push((*seq, Bytes::from(format!("{}:{i}", c.user))));
            }
            all.sort_by_key(|(s, _)| *s);
            let seqs: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
            assert_eq!(seqs, (1..=total as u64).collect::<Vec<_>>());
            // Per sender, messages keep their publish order.
            for m in (0..MEMBERS).map(|i| format!("m{i}")) {
                let idx: Vec<usize> = all
                    .iter()
                    .filter_map(|(_, p)| {
                        let p = std::str::from_utf8(p).unwrap();
                        let (who, i) = p.split_once(':').unwrap();
                        (who == m).then(|| i.parse().unwrap())
                    })
                    .collect();
                assert_eq!(idx, (0..PER_MEMBER).collect::<Vec<_>>(), "order of {m}");
            }
            match &reference {
                None => reference = Some(all),
                Some(r) => assert_eq!(r, &all, "{} sees another order", c.user),
            }
        }
        relay.stop();
    }

    fn garbage_closes_only_the_sender(backend) {
        let relay = TestRelay::start(backend, 2, |_| {});
        let mut ann = Client::connect(relay.addr, "ann");
        let mut bob = Client::connect(relay.addr, "bob");
        let a = ann.join("room:g");
        let b = bob.join("room:g");
        // A frame of an unknown type, then noise.
        let mut evil = Client::connect(relay.addr, "mallory");
        evil.send_raw(&[0x02, 0x1f, 0x00, 0xff, 0xff, 0xff, 0xff]).unwrap();
        let events = evil.until_closed();
        let err = events.iter().find_map(|e| match e {
            Event::Error(err) => Some(err.clone()),
            _ => None,
        });
        let err = err.expect("an ERROR before the close");
        assert!(err.fatal);
        assert_eq!(err.code, ErrorCode::UnknownFrameType);
        // An oversized frame, from another connection: refused from the prefix alone.
        let mut big = Client::connect(relay.addr, "mallory2");
        big.send_raw(&[0xff, 0xff, 0xff, 0x7f]).unwrap();
        let events = big.until_closed();
        assert!(events.iter().any(|e| matches!(e, Event::Error(err) if err.code == ErrorCode::FrameTooLarge)));
        // A raw connection that never says HELLO properly.
        let mut raw = std::net::TcpStream::connect(relay.addr).unwrap();
        std::io::Write::write_all(&mut raw, b"GET / HTTP/1.1\r\n\r\n").unwrap();
        // The others carry on.
        let seq = ann.publish_acked(a, &b"still here"[..]);
        assert_eq!(bob.messages(b, 1), vec![(seq, Bytes::from_static(b"still here"))]);
        relay.stop();
    }

    fn shutdown_drains_then_goes_away(backend) {
        let relay = TestRelay::start(backend, 2, |c| {
            c.shutdown.reconnect_spread = Duration::from_secs(5);
        });
        let mut subs: Vec<(Client, u32)> = (0..8)
            .map(|i| {
                let mut c = Client::connect(relay.addr, &format!("s{i}"));
                let alias = c.join("room:drain");
                (c, alias)
            })
            .collect();
        let mut publisher = Client::connect(relay.addr, "pub");
        let alias = publisher.join("room:drain");
        let mut acked = Vec::new();
        for i in 0..200 {
            acked.push(publisher.publish_acked(alias, format!("m{i}").into_bytes()));
        }
        relay.begin_shutdown();
        for (c, alias) in &mut subs {
            let events = c.until_closed();
            let mut seqs = Vec::new();
            let mut goaway_at = None;
            for (i, e) in events.iter().enumerate() {
                match e {
                    Event::Message { alias: a, seq: Some(s), .. } if a == alias => {
                        assert!(goaway_at.is_none(), "a message after GOAWAY");
                        seqs.push(*s);
                    }
                    Event::GoAway(g) => {
                        assert_eq!(g.reason, GoAwayReason::Shutdown);
                        assert!(g.retry_after_ms < 5_000);
                        goaway_at = Some(i);
                    }
                    _ => {}
                }
            }
            assert!(goaway_at.is_some(), "{}: no GOAWAY", c.user);
            assert_eq!(seqs, acked, "{}: every acked message precedes GOAWAY", c.user);
        }
        relay.join();
    }
}
