//! The worker's state machine driven without sockets: bytes in through `on_bytes`, bytes out
//! captured by an in-memory [`Transport`], time set by hand, the client side resolved by the
//! codec's `ClientSession` (which refuses any lost, repeated or reordered sequence).

#![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pabal_codec::{ClientFrame, ClientSession, Decoder, ErrorCode, Event, Limits, Subscribe, Text};

use super::*;
use crate::io::Wakeup;
use crate::mesh::Mesh;

/// What the worker handed to "the sockets".
#[derive(Default)]
struct Wire {
    written: HashMap<Token, BytesMut>,
    in_flight: HashMap<Token, usize>,
    closed: HashSet<Token>,
    half_closed: HashSet<Token>,
}

impl Transport for Wire {
    fn send(&mut self, token: Token, bufs: &mut VecDeque<Bytes>) {
        let out = self.written.entry(token).or_default();
        let mut n = 0;
        for b in bufs.drain(..) {
            n += b.len();
            out.extend_from_slice(&b);
        }
        assert!(
            self.in_flight.insert(token, n).is_none(),
            "two batches in flight"
        );
    }
    fn set_reading(&mut self, _: Token, _: bool) {}
    fn shutdown_write(&mut self, token: Token) {
        self.half_closed.insert(token);
    }
    fn close(&mut self, token: Token) {
        self.closed.insert(token);
    }
    fn close_listeners(&mut self) {}
}

struct Phone {
    session: ClientSession,
    inbox: BytesMut,
    events: Vec<Event>,
}

struct Harness {
    core: Core,
    wire: Wire,
    phones: HashMap<Token, Phone>,
    stalled: HashSet<Token>,
    stats: Arc<CoreStats>,
    now: Instant,
}

impl Harness {
    fn new(tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::default();
        config.limits.publish_rate = 1e9;
        config.limits.publish_burst = 1e9;
        tweak(&mut config);
        config.validate().unwrap();
        let (senders, _receivers) = Mesh::channels(1);
        let mesh = Mesh::new(senders, vec![Wakeup::new().unwrap()]);
        let stats = Arc::new(CoreStats::default());
        let directory = Arc::new(Directory::new(1, 100));
        let core = Core::new(
            0,
            Arc::new(config),
            directory,
            mesh,
            42,
            stats.clone(),
            Arc::new(Shared::default()),
        );
        Harness {
            core,
            wire: Wire::default(),
            phones: HashMap::new(),
            stalled: HashSet::new(),
            stats,
            now: Instant::now(),
        }
    }

    fn send(&mut self, token: Token, frame: &ClientFrame) {
        let mut bytes = BytesMut::new();
        frame.encode(&mut bytes);
        self.core.set_now(self.now);
        self.core.on_bytes(token, &bytes);
        self.pump();
    }

    /// Flushes and completes sends (except to stalled phones) until nothing moves.
    fn pump(&mut self) {
        for _ in 0..1000 {
            self.core.set_now(self.now);
            self.core.flush(&mut self.wire);
            let done: Vec<(Token, usize)> = self
                .wire
                .in_flight
                .iter()
                .filter(|(t, _)| !self.stalled.contains(t))
                .map(|(t, n)| (*t, *n))
                .collect();
            if done.is_empty() {
                break;
            }
            for (token, n) in done {
                self.wire.in_flight.remove(&token);
                self.core.on_sent(token, n);
            }
        }
        self.read_all();
    }

    fn read_all(&mut self) {
        let decoder = Decoder::new(Limits::default());
        for (token, phone) in &mut self.phones {
            if let Some(bytes) = self.wire.written.get_mut(token) {
                phone.inbox.extend_from_slice(&bytes.split());
            }
            while let Some(frame) = decoder.decode_server(&mut phone.inbox).unwrap() {
                phone.events.push(phone.session.apply(frame).unwrap());
            }
        }
    }

    fn connect(&mut self, user: &str, session: ClientSession) -> Token {
        self.core.set_now(self.now);
        let token = self.core.admit("127.0.0.1:1".parse().unwrap());
        let mut session = session;
        let hello = session.hello(Bytes::copy_from_slice(user.as_bytes()), 0);
        self.phones.insert(
            token,
            Phone {
                session,
                inbox: BytesMut::new(),
                events: Vec::new(),
            },
        );
        self.send(token, &hello);
        let events = &mut self.phones.get_mut(&token).unwrap().events;
        assert!(
            matches!(events.first(), Some(Event::Welcome(_))),
            "{events:?}"
        );
        events.remove(0);
        token
    }

    fn join(&mut self, token: Token, room: &str) -> u32 {
        let frame = ClientFrame::Subscribe(Subscribe {
            room: true,
            name: Text::from(room),
        });
        self.send(token, &frame);
        self.phones[&token].session.alias_of(room).unwrap()
    }

    fn publish(&mut self, token: Token, alias: u32, body: &str) {
        let phone = self.phones.get_mut(&token).unwrap();
        let (_, frame) =
            phone
                .session
                .publish(alias, Bytes::copy_from_slice(body.as_bytes()), None);
        self.send(token, &frame);
    }

    fn events(&mut self, token: Token) -> Vec<Event> {
        std::mem::take(&mut self.phones.get_mut(&token).unwrap().events)
    }

    fn messages(&mut self, token: Token) -> Vec<(u64, Bytes)> {
        self.events(token)
            .into_iter()
            .filter_map(|e| match e {
                Event::Message {
                    seq: Some(s),
                    payload,
                    ..
                } => Some((s, payload)),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn two_phones_chat_through_one_worker() {
    let mut h = Harness::new(|_| {});
    let ann = h.connect("ann", ClientSession::new());
    let bob = h.connect("bob", ClientSession::new());
    let a = h.join(ann, "dm");
    h.join(bob, "dm");
    h.events(ann);
    h.publish(ann, a, "hello");
    let acks: Vec<u64> = h
        .events(ann)
        .into_iter()
        .filter_map(|e| match e {
            Event::PubAck { seq, .. } => Some(seq),
            Event::Message { .. } => panic!("the publisher got its own message back"),
            _ => None,
        })
        .collect();
    assert_eq!(acks, vec![1]);
    assert_eq!(h.messages(bob), vec![(1, Bytes::from_static(b"hello"))]);
}

#[test]
fn anything_before_hello_is_a_fatal_protocol_error() {
    let mut h = Harness::new(|_| {});
    h.core.set_now(h.now);
    let token = h.core.admit("127.0.0.1:1".parse().unwrap());
    h.phones.insert(
        token,
        Phone {
            session: ClientSession::new(),
            inbox: BytesMut::new(),
            events: Vec::new(),
        },
    );
    h.send(token, &ClientFrame::Ping(pabal_codec::Ping::default()));
    let events = h.events(token);
    assert!(
        matches!(&events[..], [Event::Error(e)] if e.fatal && e.code == ErrorCode::ProtocolViolation),
        "{events:?}"
    );
    assert!(
        h.wire.half_closed.contains(&token),
        "flushed, then half-closed"
    );
    // Its linger runs out: closed for good.
    h.now += Duration::from_secs(3);
    h.core.set_now(h.now);
    h.core.run_timers();
    h.core.flush(&mut h.wire);
    assert!(h.wire.closed.contains(&token));
}

#[test]
fn a_stalled_phone_is_capped_then_caught_up_from_history() {
    const CAP: usize = 4096;
    let mut h = Harness::new(|c| {
        c.connection.max_frame_len = 1024;
        c.limits.max_payload = 512;
        c.connection.max_queued_bytes = CAP;
        c.connection.replay_page_bytes = 1024;
    });
    let ann = h.connect("ann", ClientSession::new());
    let bob = h.connect("bob", ClientSession::new());
    let a = h.join(ann, "g");
    h.join(bob, "g");
    h.events(bob);
    // Bob's socket stops draining.
    h.stalled.insert(bob);
    for i in 1..=300 {
        h.publish(ann, a, &format!("{i:03}:{}", "x".repeat(96)));
    }
    assert!(h.stats.lag_events.load(Ordering::Relaxed) >= 1);
    let high = h.stats.queue_high_water.load(Ordering::Relaxed) as usize;
    assert!(high <= CAP + 1024, "queue grew to {high}");
    // The socket drains again: everything arrives, in order, none twice, no gap.
    h.stalled.clear();
    h.pump();
    let got = h.messages(bob);
    assert_eq!(got.len(), 300);
    for (i, (seq, body)) in got.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1);
        assert!(body.starts_with(format!("{seq:03}:").as_bytes()));
    }
    assert_eq!(h.stats.gaps.load(Ordering::Relaxed), 0);
    assert_eq!(
        h.stats.lagging.load(Ordering::Relaxed),
        0,
        "caught up and live again"
    );
}

#[test]
fn a_reconnecting_phone_resumes_without_a_seam() {
    let mut h = Harness::new(|_| {});
    let ann = h.connect("ann", ClientSession::new());
    let bob = h.connect("bob", ClientSession::new());
    let a = h.join(ann, "r");
    h.join(bob, "r");
    for i in 1..=3 {
        h.publish(ann, a, &format!("m{i}"));
    }
    assert_eq!(h.messages(bob).len(), 3);
    // Bob's link drops; two messages go by; he comes back with his session.
    let session = h.phones.remove(&bob).unwrap().session;
    h.core.on_closed(bob);
    for i in 4..=5 {
        h.publish(ann, a, &format!("m{i}"));
    }
    let bob = h.connect("bob", session);
    let events = h.events(bob);
    assert!(
        !events.iter().any(|e| matches!(e, Event::Bound { .. })),
        "a clean resume needs no ROOM"
    );
    let seqs: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Message { seq, .. } => *seq,
            _ => None,
        })
        .collect();
    assert_eq!(seqs, vec![4, 5]);
    h.publish(ann, a, "m6");
    assert_eq!(h.messages(bob), vec![(6, Bytes::from_static(b"m6"))]);
}

#[test]
fn a_silent_phone_is_pinged_then_closed() {
    let mut h = Harness::new(|c| {
        c.heartbeat.min_interval = Duration::from_secs(1);
        c.heartbeat.interval = Duration::from_secs(10);
        c.heartbeat.timeout = Duration::from_secs(5);
    });
    let t = h.connect("quiet", ClientSession::new());
    h.events(t);
    h.now += Duration::from_secs(11);
    h.core.set_now(h.now);
    h.core.run_timers();
    h.pump();
    assert!(matches!(h.events(t)[..], [Event::Ping(_)]));
    h.now += Duration::from_secs(6);
    h.core.set_now(h.now);
    h.core.run_timers();
    h.core.flush(&mut h.wire);
    assert!(h.wire.closed.contains(&t));
    assert_eq!(h.stats.heartbeat_timeouts.load(Ordering::Relaxed), 1);
}

#[test]
fn resuming_many_long_gaps_stays_within_the_cap() {
    const CAP: usize = 8192;
    let mut h = Harness::new(|c| {
        c.connection.max_frame_len = 1024;
        c.limits.max_payload = 512;
        c.connection.max_queued_bytes = CAP;
        c.connection.replay_page_bytes = 2048;
    });
    let ann = h.connect("ann", ClientSession::new());
    let bob = h.connect("bob", ClientSession::new());
    let rooms: Vec<u32> = (0..20).map(|r| h.join(ann, &format!("r{r}"))).collect();
    for r in 0..20 {
        h.join(bob, &format!("r{r}"));
    }
    h.events(bob);
    let session = h.phones.remove(&bob).unwrap().session;
    h.core.on_closed(bob);
    // While bob is away, 20 rooms x 40 messages of ~200 bytes: 160 KB to catch up on.
    for i in 0..40 {
        for &alias in &rooms {
            h.publish(ann, alias, &format!("{i:02}:{}", "y".repeat(200)));
        }
    }
    h.stats.queue_high_water.store(0, Ordering::Relaxed);
    let bob = h.connect("bob", session);
    let high = h.stats.queue_high_water.load(Ordering::Relaxed) as usize;
    assert!(high <= CAP + 2048 + 1024, "resume queued {high} bytes");
    let got = h.messages(bob);
    assert_eq!(got.len(), 800, "every missed message arrives");
    assert_eq!(h.stats.gaps.load(Ordering::Relaxed), 0);
}
