//! The worker's state machine driven without sockets: bytes in through `on_bytes`, bytes out
//! captured by an in-memory [`Transport`], time set by hand, the client side resolved by the
//! codec's `ClientSession` (which refuses any lost, repeated or reordered sequence).

#![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pabal_codec::{ClientFrame, ClientSession, Decoder, ErrorCode, Event, Limits, Subscribe, Text};

use super::test_wire::TestWire;
use super::*;
use crate::directory::Directory;

mod cluster;
mod cluster_reopen;

struct Phone {
    session: ClientSession,
    inbox: BytesMut,
    events: Vec<Event>,
    /// A forged client's frames, unchecked (it has no session that knows its aliases).
    forged: Option<Vec<ServerFrame>>,
}

struct Harness {
    core: Core,
    wire: TestWire,
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
        let stats = Arc::new(CoreStats::default());
        let directory: Arc<dyn Membership> = Arc::new(Directory::new(1, 100));
        let now = Instant::now();
        let core = Core::new(
            0,
            1,
            Arc::new(config),
            directory.clone(),
            42,
            stats.clone(),
            Arc::new(Shared::default()),
            Clock::new(now, 1_767_225_600_000),
            now,
        );
        Harness {
            core,
            wire: TestWire::default(),
            phones: HashMap::new(),
            stalled: HashSet::new(),
            stats,
            now,
        }
    }

    fn send(&mut self, token: Token, frame: &ClientFrame) {
        let mut bytes = BytesMut::new();
        frame.encode(&mut bytes);
        self.core.on_bytes(self.now, token, &bytes);
        self.pump();
        // A cluster node's HELLO and joins wait for the engine (tests/cluster.rs).
        self.play_engine_membership();
    }

    /// Flushes and completes sends (except to stalled phones) until nothing moves.
    fn pump(&mut self) {
        let mut done = Vec::new();
        for _ in 0..1000 {
            self.core.flush(&mut self.wire);
            done.clear();
            self.wire
                .complete_all(|t| self.stalled.contains(&t), &mut done);
            if done.is_empty() {
                break;
            }
            for &(token, n) in &done {
                self.core.on_sent(self.now, token, n);
            }
        }
        self.read_all();
    }

    fn read_all(&mut self) {
        let decoder = Decoder::new(Limits::default());
        for (token, phone) in &mut self.phones {
            if let Some(bytes) = self.wire.take_written(*token) {
                phone.inbox.extend_from_slice(&bytes);
            }
            while let Some(frame) = decoder.decode_server(&mut phone.inbox).unwrap() {
                match &mut phone.forged {
                    Some(frames) => frames.push(frame),
                    None => phone.events.push(phone.session.apply(frame).unwrap()),
                }
            }
        }
    }

    fn connect(&mut self, user: &str, session: ClientSession) -> Token {
        let token = self
            .core
            .admit(self.now, "127.0.0.1:1".parse().unwrap())
            .unwrap();
        let mut session = session;
        let hello = session.hello(Bytes::copy_from_slice(user.as_bytes()), 0);
        self.phones.insert(
            token,
            Phone {
                session,
                inbox: BytesMut::new(),
                events: Vec::new(),
                forged: None,
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

    /// A client that writes its own HELLO (any resume entries it likes) and whose frames
    /// are collected raw.
    fn connect_forged(&mut self, user: &str, resume: &[pabal_codec::ResumeEntry]) -> Token {
        self.connect_forged_hello(pabal_codec::Hello {
            version: pabal_codec::PROTOCOL_VERSION,
            heartbeat_secs: 0,
            token: Bytes::copy_from_slice(user.as_bytes()),
            device_id: None,
            resume: pabal_codec::ResumeList::from_entries(resume),
        })
    }

    /// A forged client that sends exactly `hello`.
    fn connect_forged_hello(&mut self, hello: pabal_codec::Hello) -> Token {
        let token = self
            .core
            .admit(self.now, "127.0.0.1:1".parse().unwrap())
            .unwrap();
        self.phones.insert(
            token,
            Phone {
                session: ClientSession::new(),
                inbox: BytesMut::new(),
                events: Vec::new(),
                forged: Some(Vec::new()),
            },
        );
        self.send(token, &ClientFrame::Hello(hello));
        token
    }

    fn frames(&mut self, token: Token) -> Vec<ServerFrame> {
        let phone = self.phones.get_mut(&token).unwrap();
        std::mem::take(phone.forged.as_mut().unwrap())
    }

    /// The app server adds a member, as the server API does.
    fn app_join(&mut self, room: &str, user: &str) {
        self.core.handle(
            self.now,
            vec![CoreMsg::Join {
                room: RoomName::new(false, Text::from(room)),
                user: Text::from(user).into(),
                unblock: false,
                requester: None,
            }],
        );
        self.pump();
    }

    /// The app server removes a member, as the server API does.
    fn app_remove(&mut self, room: &str, user: &str) {
        self.core.handle(
            self.now,
            vec![CoreMsg::Leave {
                room: RoomName::new(false, Text::from(room)),
                user: Text::from(user).into(),
                block: false,
                reason: LeftReason::Removed,
            }],
        );
        self.pump();
    }

    fn tick(&mut self, by: Duration) {
        self.now += by;
        self.core.run_timers(self.now);
        self.pump();
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
    let token = h.core.admit(h.now, "127.0.0.1:1".parse().unwrap()).unwrap();
    h.phones.insert(
        token,
        Phone {
            session: ClientSession::new(),
            inbox: BytesMut::new(),
            events: Vec::new(),
            forged: None,
        },
    );
    h.send(token, &ClientFrame::Ping(pabal_codec::Ping::default()));
    let events = h.events(token);
    assert!(
        matches!(&events[..], [Event::Error(e)] if e.fatal && e.code == ErrorCode::ProtocolViolation),
        "{events:?}"
    );
    assert!(h.wire.half_closed(token), "flushed, then half-closed");
    // Its linger runs out: closed for good.
    h.now += Duration::from_secs(3);
    h.core.run_timers(h.now);
    h.core.flush(&mut h.wire);
    assert!(h.wire.closed(token));
}

/// ann publishes into group "g" (alias returned) where bob's socket has stopped draining,
/// under the given frame, payload, queue window and replay page sizes.
fn a_stalled_reader(
    max_frame_len: usize,
    max_payload: usize,
    window: usize,
    page: usize,
) -> (Harness, Token, u32, Token) {
    let mut h = Harness::new(|c| {
        c.connection.max_frame_len = max_frame_len;
        c.limits.max_payload = max_payload;
        c.connection.max_queued_bytes = window;
        c.connection.replay_page_bytes = page;
    });
    let ann = h.connect("ann", ClientSession::new());
    let bob = h.connect("bob", ClientSession::new());
    let a = h.join(ann, "g");
    h.join(bob, "g");
    h.events(bob);
    h.stalled.insert(bob);
    (h, ann, a, bob)
}

#[test]
fn a_stalled_phone_is_capped_then_caught_up_from_history() {
    const CAP: usize = 4096;
    // Bob's socket stops draining.
    let (mut h, ann, a, bob) = a_stalled_reader(1024, 512, CAP, 1024);
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
fn a_stalled_phone_never_queues_past_its_window() {
    // Messages that do not divide the window: before the window rule a queue took one more
    // message past the cap, and a page was written whole past it.
    const WINDOW: usize = 4096;
    let (mut h, ann, a, bob) = a_stalled_reader(2048, 1500, WINDOW, WINDOW);
    for i in 1..=200 {
        h.publish(ann, a, &format!("{i:03}:{}", "z".repeat(1100)));
        let high = h.stats.queue_high_water.load(Ordering::Relaxed) as usize;
        assert!(high <= WINDOW, "message {i}: a queue held {high} bytes");
    }
    assert!(h.stats.lag_events.load(Ordering::Relaxed) >= 1);
    // Draining: pages larger than what the window has room for are cut, never overfilled.
    h.stalled.clear();
    h.pump();
    let high = h.stats.queue_high_water.load(Ordering::Relaxed) as usize;
    assert!(high <= WINDOW, "catching up queued {high} bytes");
    let got = h.messages(bob);
    assert_eq!(got.len(), 200);
    for (i, (seq, body)) in got.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1);
        assert!(body.starts_with(format!("{seq:03}:").as_bytes()));
    }
    assert_eq!(h.stats.gaps.load(Ordering::Relaxed), 0);
    assert_eq!(h.stats.lagging.load(Ordering::Relaxed), 0);
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
    h.core.on_closed(h.now, bob);
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
    h.tick(Duration::from_secs(11));
    assert!(matches!(h.events(t)[..], [Event::Ping(_)]));
    h.tick(Duration::from_secs(6));
    // PROTOCOL.md §14: the heartbeat failure is announced (GOAWAY Timeout), then closed.
    let events = h.events(t);
    assert!(
        matches!(&events[..], [Event::GoAway(g)] if g.reason == pabal_codec::GoAwayReason::Timeout),
        "{events:?}"
    );
    assert!(h.wire.half_closed(t));
    h.tick(Duration::from_secs(3));
    assert!(h.wire.closed(t));
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
    h.core.on_closed(h.now, bob);
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

// ---------------------------------------------------------------------------------------
// Regressions from the outside review: each fails on the code before its fix.
// ---------------------------------------------------------------------------------------

fn room_named(name: &str) -> RoomName {
    RoomName::new(false, Text::from(name))
}

fn entry(name: &str, epoch: u64, last_seq: u64) -> pabal_codec::ResumeEntry {
    pabal_codec::ResumeEntry {
        room_id: pabal_codec::room_id(false, name),
        epoch,
        last_seq,
    }
}

fn delivered_seqs(frames: &[ServerFrame]) -> Vec<Option<u64>> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Deliver(d) => Some(d.header.seq),
            _ => None,
        })
        .collect()
}

fn room_cursor(frames: &[ServerFrame]) -> Option<u64> {
    frames.iter().find_map(|f| match f {
        ServerFrame::Room(r) => Some(r.cursor),
        _ => None,
    })
}

#[test]
fn a_resume_never_reads_before_the_join_point_whatever_epoch_it_names() {
    let mut h = Harness::new(|_| {});
    let ann = h.connect("ann", ClientSession::new());
    let a = h.join(ann, "club");
    for i in 1..=5 {
        h.publish(ann, a, &format!("before-{i}"));
    }
    // The app server adds mallory at seq 5; she forges resume entries from 0.
    h.app_join("club", "mallory");
    let epoch = h.core.owned[&room_named("club")].epoch;
    for forged in [epoch, 0, 1, epoch + 1] {
        let m = h.connect_forged("mallory", &[entry("club", forged, 0)]);
        let frames = h.frames(m);
        assert!(
            delivered_seqs(&frames).is_empty(),
            "epoch {forged}: history from before the join leaked: {frames:?}"
        );
        assert_eq!(room_cursor(&frames), Some(5), "epoch {forged}: {frames:?}");
        h.core.on_closed(h.now, m);
        h.phones.remove(&m);
    }
}

#[test]
fn a_member_removed_and_added_again_never_reads_what_was_published_in_between() {
    let mut h = Harness::new(|_| {});
    let ann = h.connect("ann", ClientSession::new());
    let a = h.join(ann, "club");
    let bob = h.connect("bob", ClientSession::new());
    h.join(bob, "club");
    for i in 1..=3 {
        h.publish(ann, a, &format!("m{i}"));
    }
    assert_eq!(h.messages(bob).len(), 3);
    h.app_remove("club", "bob");
    for i in 4..=6 {
        h.publish(ann, a, &format!("while-removed-{i}"));
    }
    h.app_join("club", "bob");
    assert!(h.messages(bob).is_empty());
    // Bob's phone resumes from 3, where it was when he was removed.
    h.core.on_closed(h.now, bob);
    h.phones.remove(&bob);
    let epoch = h.core.owned[&room_named("club")].epoch;
    let b = h.connect_forged("bob", &[entry("club", epoch, 3)]);
    let frames = h.frames(b);
    assert!(delivered_seqs(&frames).is_empty(), "{frames:?}");
    assert_eq!(room_cursor(&frames), Some(6), "{frames:?}");
}

#[test]
fn a_subscription_answer_for_an_earlier_membership_is_dropped() {
    let mut h = Harness::new(|_| {});
    let ann = h.connect("ann", ClientSession::new());
    let a = h.join(ann, "club");
    h.publish(ann, a, "m1");
    let bob = h.connect("bob", ClientSession::new());
    h.events(bob);
    // In one batch: bob joins, is removed, a message goes by, bob joins again. His first
    // binding request is still in flight when the second join happens.
    // Published from a connection that has gone since (its PUBACK reaches nobody).
    let origin = h.core.origin(u64::MAX);
    h.core.handle(
        h.now,
        vec![
            CoreMsg::Join {
                room: room_named("club"),
                user: Text::from("bob").into(),
                unblock: false,
                requester: None,
            },
            CoreMsg::Leave {
                room: room_named("club"),
                user: Text::from("bob").into(),
                block: false,
                reason: LeftReason::Removed,
            },
            CoreMsg::Publish {
                room: room_named("club"),
                by: crate::mesh::PublishedBy {
                    origin,
                    alias: a,
                    binding: 0,
                    msg_id: 99,
                    publisher: 0,
                },
                sender: Text::from("ann").into(),
                payload: Bytes::from_static(b"while-removed"),
            },
            CoreMsg::Join {
                room: room_named("club"),
                user: Text::from("bob").into(),
                unblock: false,
                requester: None,
            },
        ],
    );
    h.pump();
    let events = h.events(bob);
    assert!(
        !events.iter().any(|e| matches!(e, Event::Message { .. })),
        "{events:?}"
    );
    let bound: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Bound { room, .. } => Some(room.cursor),
            _ => None,
        })
        .collect();
    assert_eq!(bound, vec![2], "one binding, after the second join");
    // The stale answer gave its interest back: ann and bob are the room's only subscribers.
    assert_eq!(h.core.owned[&room_named("club")].interest, vec![2]);
    h.publish(ann, a, "m3");
    assert_eq!(h.messages(bob), vec![(3, Bytes::from_static(b"m3"))]);
}

#[test]
fn a_fatal_error_is_the_last_frame_even_after_a_publish_in_the_same_read() {
    let mut h = Harness::new(|_| {});
    let ann = h.connect("ann", ClientSession::new());
    let a = h.join(ann, "r");
    h.events(ann);
    let phone = h.phones.get_mut(&ann).unwrap();
    let (_, publish) = phone.session.publish(a, Bytes::from_static(b"hello"), None);
    let mut bytes = BytesMut::new();
    publish.encode(&mut bytes);
    bytes.extend_from_slice(&[0x01, 0x1f]); // a frame of an unknown type
    h.core.on_bytes(h.now, ann, &bytes);
    h.pump();
    let events = h.events(ann);
    assert!(
        matches!(&events[..], [Event::PubAck { seq: 1, .. }, Event::Error(e)] if e.fatal),
        "{events:?}"
    );
    assert!(h.wire.half_closed(ann));
}

#[test]
fn nothing_is_written_to_a_connection_once_it_is_closing() {
    let mut h = Harness::new(|_| {});
    let ann = h.connect("ann", ClientSession::new());
    let a = h.join(ann, "r");
    let bob = h.connect("bob", ClientSession::new());
    h.join(bob, "r");
    h.send(bob, &ClientFrame::Bye);
    assert!(h.wire.half_closed(bob));
    for i in 0..3 {
        h.publish(ann, a, &format!("m{i}"));
    }
    h.core.handle(
        h.now,
        vec![CoreMsg::DeliverEphemeral {
            room: room_named("r"),
            origin: None,
            sender: Text::from("ann").into(),
            ts_ms: 0,
            payload: Bytes::from_static(b"typing"),
        }],
    );
    h.pump();
    assert_eq!(h.wire.sends_after_end(), 0, "sends after the half-close");
}

#[test]
fn an_answered_ping_rearms_the_heartbeat_at_the_granted_interval() {
    let mut h = Harness::new(|c| {
        c.heartbeat.min_interval = Duration::from_secs(1);
        c.heartbeat.interval = Duration::from_secs(10);
        c.heartbeat.timeout = Duration::from_secs(30);
    });
    let t = h.connect("phone", ClientSession::new());
    h.events(t);
    h.tick(Duration::from_secs(11));
    assert!(matches!(h.events(t)[..], [Event::Ping(_)]));
    h.send(t, &ClientFrame::Pong(pabal_codec::Pong::default()));
    h.tick(Duration::from_secs(9));
    assert!(h.events(t).is_empty(), "pinged before the interval");
    h.tick(Duration::from_secs(2));
    assert!(
        matches!(h.events(t)[..], [Event::Ping(_)]),
        "no ping one interval after the answer"
    );
    // One timer chain per connection: once the superseded deadlines have passed, one entry.
    h.send(t, &ClientFrame::Pong(pabal_codec::Pong::default()));
    for _ in 0..10 {
        h.tick(Duration::from_secs(11));
        h.send(t, &ClientFrame::Pong(pabal_codec::Pong::default()));
    }
    h.tick(Duration::from_secs(31));
    assert_eq!(h.core.timers.len(), 1, "{:?}", h.core.timers);
}

#[test]
fn a_refused_join_creates_no_room_and_client_created_rooms_are_capped() {
    let mut h = Harness::new(|c| c.limits.max_rooms = 2);
    let ann = h.connect("ann", ClientSession::new());
    // A blocked channel: the refused subscribe leaves nothing behind.
    let news = RoomName::new(true, Text::from("news"));
    h.core.directory.remove("ann", &news, true);
    h.send(
        ann,
        &ClientFrame::Subscribe(Subscribe {
            room: false,
            name: Text::from("news"),
        }),
    );
    assert!(matches!(&h.events(ann)[..], [Event::Error(e)] if e.code == ErrorCode::NotPermitted));
    assert!(!h.core.owned.contains_key(&news));
    // Two rooms fit; a client cannot make the relay hold a third.
    h.join(ann, "a");
    h.join(ann, "b");
    h.events(ann);
    h.send(
        ann,
        &ClientFrame::Subscribe(Subscribe {
            room: true,
            name: Text::from("c"),
        }),
    );
    assert!(matches!(&h.events(ann)[..], [Event::Error(e)] if e.code == ErrorCode::LimitExceeded));
    assert_eq!(h.core.owned.len(), 2);
    assert_eq!(h.stats.rooms.load(Ordering::Relaxed), 2);
}

#[test]
fn unused_rooms_are_evicted_once_retention_has_dropped_their_history() {
    let mut h = Harness::new(|c| c.retention.max_age = Duration::from_secs(90));
    let ann = h.connect("ann", ClientSession::new());
    let a = h.join(ann, "tmp");
    h.publish(ann, a, "m1");
    let first_epoch = h.core.owned[&room_named("tmp")].epoch;
    h.send(
        ann,
        &ClientFrame::Unsubscribe(pabal_codec::Unsubscribe {
            alias: a,
            block: false,
        }),
    );
    // Unused, but its message is retained: kept.
    h.tick(Duration::from_secs(61));
    assert!(h.core.owned.contains_key(&room_named("tmp")));
    // Retention drops the message: evicted at the next check.
    h.tick(Duration::from_secs(61));
    assert!(!h.core.owned.contains_key(&room_named("tmp")));
    assert_eq!(h.stats.rooms_evicted.load(Ordering::Relaxed), 1);
    assert_eq!(h.stats.rooms.load(Ordering::Relaxed), 0);
    // Created again, it starts a new stream in a new epoch.
    h.join(ann, "tmp");
    assert_ne!(h.core.owned[&room_named("tmp")].epoch, first_epoch);
}

#[test]
fn subscribes_are_rate_limited_and_blocks_are_capped() {
    let mut h = Harness::new(|c| {
        c.limits.subscribe_burst = 3.0;
        c.limits.subscribe_rate = 1.0;
        c.limits.max_blocked_per_user = 1;
    });
    let ann = h.connect("ann", ClientSession::new());
    for name in ["c1", "c2", "c3", "c4", "c5"] {
        h.send(
            ann,
            &ClientFrame::Subscribe(Subscribe {
                room: false,
                name: Text::from(name),
            }),
        );
    }
    let events = h.events(ann);
    let refused = events
        .iter()
        .filter(|e| matches!(e, Event::Error(e) if e.code == ErrorCode::RateLimited))
        .count();
    assert_eq!(refused, 2, "{events:?}");
    assert_eq!(h.stats.subscribe_rate_limited.load(Ordering::Relaxed), 2);
    // The first block takes; the second is over the cap: left, but not blocked.
    h.now += Duration::from_secs(10);
    let mut reasons = Vec::new();
    for name in ["c1", "c2"] {
        let alias = h.phones[&ann].session.alias_of(name).unwrap();
        h.send(
            ann,
            &ClientFrame::Unsubscribe(pabal_codec::Unsubscribe { alias, block: true }),
        );
        reasons.extend(h.events(ann).into_iter().filter_map(|e| match e {
            Event::Left { reason, .. } => Some(reason),
            _ => None,
        }));
    }
    assert_eq!(reasons, vec![LeftReason::Blocked, LeftReason::Unsubscribed]);
    assert_eq!(h.stats.limit_refusals.load(Ordering::Relaxed), 1);
}

#[test]
fn room_maps_do_not_hash_by_the_public_room_id() {
    use std::hash::BuildHasher;
    let hasher = std::collections::hash_map::RandomState::new();
    let a = room_named("a");
    // Another name forced onto the same 64-bit id, as a collision would be.
    let b = RoomName::with_id(a.id, false, Text::from("b"));
    assert_ne!(hasher.hash_one(&a), hasher.hash_one(&b));
    assert_ne!(a, b);
}

#[test]
fn rooms_past_the_connection_limit_are_refused_with_a_typed_error() {
    let mut h = Harness::new(|c| {
        c.connection.max_rooms = 2;
        c.limits.max_rooms_per_user = 2;
    });
    // The directory allows more (as after a reload that lowered the connection limit).
    let ann = h.connect("ann", ClientSession::new());
    h.join(ann, "r1");
    h.join(ann, "r2");
    h.events(ann);
    h.app_join("r3", "ann");
    let events = h.events(ann);
    assert!(
        matches!(&events[..], [Event::Error(e)]
            if e.code == ErrorCode::LimitExceeded && !e.fatal
                && e.reference == pabal_codec::room_id(false, "r3")),
        "{events:?}"
    );
    // A new connection binds two and is told about the third.
    let session = h.phones.remove(&ann).unwrap().session;
    h.core.on_closed(h.now, ann);
    let ann = h.connect("ann", session);
    let events = h.events(ann);
    let errors = events
        .iter()
        .filter(|e| matches!(e, Event::Error(e) if e.code == ErrorCode::LimitExceeded))
        .count();
    assert_eq!(errors, 1, "{events:?}");
    assert_eq!(h.stats.limit_refusals.load(Ordering::Relaxed), 2);
}

#[test]
fn a_resume_from_before_a_restart_is_told_restarted_not_unknown() {
    let mut h = Harness::new(|c| c.connection.restart_grace = Duration::from_secs(600));
    // The harness relay's boot epoch is 42: epoch 41 is an earlier run.
    let t = h.connect_forged("ann", &[entry("club", 41, 7), entry("other", 43, 1)]);
    let frames = h.frames(t);
    let left: Vec<(u32, LeftReason)> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Left(l) => Some((l.alias, l.reason)),
            _ => None,
        })
        .collect();
    assert_eq!(
        left,
        vec![(0, LeftReason::Restarted), (1, LeftReason::UnknownRoom)]
    );
    // Past the grace period the app server has had its chance: unknown means unknown.
    h.tick(Duration::from_secs(601));
    let t = h.connect_forged("ann", &[entry("club", 41, 7)]);
    let frames = h.frames(t);
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, ServerFrame::Left(l) if l.reason == LeftReason::UnknownRoom)),
        "{frames:?}"
    );
}

#[test]
fn a_room_named_twice_in_a_resume_binds_once() {
    let mut h = Harness::new(|_| {});
    h.app_join("club", "ann");
    let epoch = h.core.owned[&room_named("club")].epoch;
    let t = h.connect_forged("ann", &[entry("club", epoch, 0), entry("club", epoch, 0)]);
    let frames = h.frames(t);
    let left: Vec<u32> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Left(l) if l.reason == LeftReason::UnknownRoom => Some(l.alias),
            _ => None,
        })
        .collect();
    assert_eq!(left, vec![1], "{frames:?}");
    assert_eq!(h.core.owned[&room_named("club")].interest, vec![1]);
}

#[test]
fn an_ack_counts_only_up_to_what_was_sent() {
    let mut h = Harness::new(|_| {});
    let ann = h.connect("ann", ClientSession::new());
    let a = h.join(ann, "r");
    let bob = h.connect("bob", ClientSession::new());
    let b = h.join(bob, "r");
    h.publish(ann, a, "m1");
    h.send(
        bob,
        &ClientFrame::Ack(pabal_codec::Ack::from_pairs(&[(b, 1000), (77, 5)])),
    );
    let conn = h.core.conn(bob).unwrap();
    assert_eq!(conn.subs[b as usize].as_ref().unwrap().acked(), 1);
}

#[test]
fn an_unbound_alias_is_not_reused_until_the_client_answers_a_ping() {
    // Found by the simulator: a PUBLISH the client sent on alias 0 for room r1 just before
    // the relay unbound it must not land in another room the relay bound to alias 0 since.
    let mut h = Harness::new(|_| {});
    let ann = h.connect("ann", ClientSession::new());
    h.app_join("r1", "ann");
    assert_eq!(h.phones[&ann].session.alias_of("r1"), Some(0));
    h.app_remove("r1", "ann");
    let events = h.events(ann);
    assert!(
        matches!(
            &events[..],
            [.., Event::Left { alias: 0, .. }, Event::Ping(_)]
        ),
        "{events:?}"
    );
    // Not answered yet: a new room gets another alias, and a late publish on 0 is refused.
    h.app_join("r2", "ann");
    assert_eq!(h.phones[&ann].session.alias_of("r2"), Some(1));
    let late = ClientFrame::Publish(pabal_codec::Publish {
        alias: 0,
        msg_id: Some(77),
        ack: None,
        payload: Bytes::from_static(b"for r1"),
    });
    h.phones.get_mut(&ann).unwrap().forged = Some(Vec::new());
    h.send(ann, &late);
    let frames = h.frames(ann);
    assert!(
        matches!(&frames[..], [ServerFrame::Error(e)] if e.code == ErrorCode::UnknownAlias && e.reference == 77),
        "{frames:?}"
    );
    assert_eq!(
        h.core.owned[&room_named("r2")].head,
        0,
        "nothing reached r2"
    );
    // Answered: alias 0 is free again.
    h.send(ann, &ClientFrame::Pong(pabal_codec::Pong::default()));
    h.app_join("r3", "ann");
    let frames = h.frames(ann);
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, ServerFrame::Room(r) if r.alias == 0 && r.name.as_str() == "r3")),
        "{frames:?}"
    );
}

#[test]
fn a_late_removal_of_an_earlier_membership_leaves_the_current_binding_alone() {
    // Found by the simulator (seed 37941): a phone reconnected and bound a room from the
    // directory, which already held its new membership, while the owner's message about
    // the end of its previous membership was still on its way.
    let mut h = Harness::new(|_| {});
    let bob = h.connect("bob", ClientSession::new());
    h.app_join("club", "bob");
    let serial = h
        .core
        .directory
        .join_point("bob", &room_named("club"))
        .unwrap()
        .serial;
    h.events(bob);
    let late = |serial| CoreMsg::MemberLeft {
        room: room_named("club"),
        user: Text::from("bob").into(),
        reason: LeftReason::Removed,
        serial,
    };
    h.core.handle(h.now, vec![late(serial - 1)]);
    h.pump();
    assert!(h.events(bob).is_empty(), "unbound by a stale removal");
    h.core.handle(h.now, vec![late(serial)]);
    h.pump();
    assert!(matches!(
        &h.events(bob)[..],
        [Event::Left { .. }, Event::Ping(_)]
    ));
}

/// Runs the log's jobs to completion and hands the core what came back, as the runtime
/// does at the end and the start of a tick.
fn commit(h: &mut Harness, exec: &mut crate::storage::InlineExecutor) {
    use crate::storage::CommitExecutor;
    while let Some(job) = h.core.poll_storage_job(h.now) {
        exec.submit(job);
    }
    let mut done = Vec::new();
    exec.poll(&mut done);
    for c in done {
        h.core.on_storage_completion(h.now, c);
    }
    h.pump();
}

#[test]
fn in_disk_mode_nothing_leaves_before_the_log_says_it_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(|c| {
        c.storage.mode = crate::config::StorageMode::Disk;
        c.storage.dir = dir.path().to_path_buf();
    });
    let opts = crate::storage::LogOptions::from_config(&h.core.config().storage, 1);
    let (log, report) = crate::storage::WorkerLog::open(dir.path(), 0, opts, h.now).unwrap();
    h.core.attach_storage(log, &report, h.now).unwrap();
    let mut exec = crate::storage::InlineExecutor::default();
    let ann = h.connect("ann", ClientSession::new());
    let bob = h.connect("bob", ClientSession::new());
    let subscribe = ClientFrame::Subscribe(Subscribe {
        room: true,
        name: Text::from("dm"),
    });
    h.send(ann, &subscribe);
    // The join (and the room's epoch) is appended: the answer waits for the commit.
    assert!(
        !h.events(ann)
            .iter()
            .any(|e| matches!(e, Event::Bound { .. })),
        "bound before the join was stored"
    );
    commit(&mut h, &mut exec);
    assert!(
        h.events(ann)
            .iter()
            .any(|e| matches!(e, Event::Bound { .. }))
    );
    let a = h.phones[&ann].session.alias_of("dm").unwrap();
    h.send(bob, &subscribe);
    commit(&mut h, &mut exec);
    h.events(bob);
    h.publish(ann, a, "hello");
    assert!(
        h.events(ann).is_empty(),
        "a PUBACK before the message was stored"
    );
    assert!(
        h.messages(bob).is_empty(),
        "delivered before the message was stored"
    );
    commit(&mut h, &mut exec);
    assert!(
        h.events(ann)
            .iter()
            .any(|e| matches!(e, Event::PubAck { seq: 1, .. }))
    );
    assert_eq!(h.messages(bob), vec![(1, Bytes::from_static(b"hello"))]);
}

// ---- Protocol v2: idempotent publish across reconnects ---------------------------------

/// Publishes `body` on `token` with the given `msg_id` (a republish keeps it in an
/// idempotent session) and returns the sequences of the PUBACKs that came back.
fn republish(h: &mut Harness, token: Token, room: &str, msg_id: u64, body: &str) -> Vec<u64> {
    let phone = h.phones.get_mut(&token).unwrap();
    let alias = phone.session.alias_of(room).unwrap();
    let (id, frame) =
        phone
            .session
            .republish(alias, msg_id, Bytes::copy_from_slice(body.as_bytes()), None);
    assert_eq!(id, msg_id, "an idempotent session keeps the id");
    h.send(token, &frame);
    h.events(token)
        .into_iter()
        .filter_map(|e| match e {
            Event::PubAck { seq, .. } => Some(seq),
            _ => None,
        })
        .collect()
}

/// Ann (a device) and bob in "dm"; returns (ann, bob, ann's session as it was before
/// anything was published: what her phone holds after a PUBACK was lost).
fn device_and_reader(h: &mut Harness) -> (Token, Token, ClientSession) {
    let ann = h.connect("ann", ClientSession::with_device(0xa11ce, 0));
    let bob = h.connect("bob", ClientSession::new());
    h.join(ann, "dm");
    h.join(bob, "dm");
    h.events(ann);
    h.events(bob);
    let before = h.phones[&ann].session.clone();
    (ann, bob, before)
}

#[test]
fn a_v2_publish_repeated_after_a_cut_gets_its_original_sequence_and_is_delivered_once() {
    let mut h = Harness::new(|_| {});
    let (ann, bob, before) = device_and_reader(&mut h);
    assert_eq!(republish(&mut h, ann, "dm", 1, "hello"), vec![1]);
    assert_eq!(h.messages(bob), vec![(1, Bytes::from_static(b"hello"))]);
    // The link drops before ann's phone saw the PUBACK: it reconnects and publishes again,
    // with the same message id.
    h.core.on_closed(h.now, ann);
    let ann = h.connect("ann", before);
    assert_eq!(
        republish(&mut h, ann, "dm", 1, "hello"),
        vec![1],
        "the original PUBACK"
    );
    assert!(h.messages(bob).is_empty(), "delivered once");
    assert_eq!(h.stats.publishes_repeated.load(Ordering::Relaxed), 1);
    // The next message is a new one.
    assert_eq!(republish(&mut h, ann, "dm", 2, "again"), vec![2]);
    assert_eq!(h.messages(bob), vec![(2, Bytes::from_static(b"again"))]);
}

#[test]
fn publish_ids_are_per_user_and_device_and_need_a_device() {
    let mut h = Harness::new(|_| {});
    let (ann, bob, _) = device_and_reader(&mut h);
    assert_eq!(republish(&mut h, ann, "dm", 1, "ann's"), vec![1]);
    // Bob's own device counts from 1 too: his msg_id 1 is another message.
    let bob_phone = h.connect("bob", ClientSession::with_device(0xa11ce, 0));
    h.events(bob_phone);
    assert_eq!(republish(&mut h, bob_phone, "dm", 1, "bob's"), vec![2]);
    // Ann's second device, with the same msg_id: another message.
    let ann_tablet = h.connect("ann", ClientSession::with_device(0x7ab, 0));
    h.events(ann_tablet);
    assert_eq!(republish(&mut h, ann_tablet, "dm", 1, "tablet"), vec![3]);
    // Without a device id (a v2 HELLO without DEVICE, like every v1 HELLO) ids are per
    // connection: the same msg_id on another connection is a new message.
    let plain = h.connect("cat", ClientSession::new());
    h.app_join("dm", "cat");
    h.events(plain);
    h.messages(bob);
    let alias = h.phones[&plain].session.alias_of("dm").unwrap();
    for want in [4, 5] {
        let (_, frame) = h.phones.get_mut(&plain).unwrap().session.publish(
            alias,
            Bytes::from_static(b"x"),
            None,
        );
        let frame = match frame {
            ClientFrame::Publish(mut p) => {
                p.msg_id = Some(1);
                ClientFrame::Publish(p)
            }
            other => other,
        };
        // The session expects the id it gave out; answer it by hand.
        h.core.on_bytes(h.now, plain, &{
            let mut b = BytesMut::new();
            frame.encode(&mut b);
            b
        });
        h.core.flush(&mut h.wire);
        let written = h.wire.take_written(plain).unwrap();
        h.wire.complete(plain);
        h.core.on_sent(h.now, plain, written.len());
        let mut buf = written;
        let frame = Decoder::new(Limits::default())
            .decode_server(&mut buf)
            .unwrap()
            .unwrap();
        assert!(
            matches!(frame, ServerFrame::PubAck(p) if p.msg_id == 1 && p.seq == want),
            "{frame:?}"
        );
    }
    assert_eq!(h.stats.publishes_repeated.load(Ordering::Relaxed), 0);
}

#[test]
fn past_the_window_a_repeat_is_a_new_message() {
    let mut h = Harness::new(|c| {
        c.limits.publish_ids = 2;
        c.limits.publish_id_max_age = Duration::from_secs(60);
    });
    let (ann, bob, _) = device_and_reader(&mut h);
    for (id, seq) in [(1, 1), (2, 2), (3, 3)] {
        assert_eq!(republish(&mut h, ann, "dm", id, "m"), vec![seq]);
    }
    h.messages(bob);
    // The window holds the 2 most recent: 1 was pushed out, 3 is remembered.
    assert_eq!(republish(&mut h, ann, "dm", 3, "m"), vec![3]);
    assert_eq!(republish(&mut h, ann, "dm", 1, "m"), vec![4]);
    assert_eq!(h.messages(bob).len(), 1);
    // And by age: a minute later 4 is forgotten too.
    h.tick(Duration::from_secs(59));
    assert_eq!(republish(&mut h, ann, "dm", 1, "m"), vec![4]);
    h.tick(Duration::from_secs(1));
    assert_eq!(republish(&mut h, ann, "dm", 1, "m"), vec![5]);
}

#[test]
fn a_session_speaks_the_version_of_its_hello() {
    let mut h = Harness::new(|_| {});
    for version in [1u8, 2] {
        let token = h.connect_forged_hello(pabal_codec::Hello {
            version,
            heartbeat_secs: 0,
            token: Bytes::from_static(b"ann"),
            device_id: None,
            resume: pabal_codec::ResumeList::default(),
        });
        let frames = h.frames(token);
        assert!(
            matches!(frames.first(), Some(ServerFrame::Welcome(w)) if w.version == version),
            "{frames:?}"
        );
    }
}

mod handoff;
mod memory;
mod receipts;
mod removals;
