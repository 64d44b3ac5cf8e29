//! The owner's cluster path without Redis (sans-IO): engine events fed by hand into one
//! worker, what it asks of the engine read back with [`Core::drain_engine`].

use super::*;
use crate::cluster::{
    ClusterConfig, ClusterStats, EngineCmd, EngineEvent, EngineMessage, FillPage, RemovalMark,
};
use crate::directory::JoinPoint;
use crate::ids::{RoomName, UserName};

pub(super) fn cluster_harness() -> Harness {
    let mut h = Harness::new(|c| c.cluster = Some(ClusterConfig::default()));
    h.core.attach_cluster(Arc::new(ClusterStats::default()));
    h
}

/// What the engine asked of the worker, less the membership commands, which
/// [`Harness::play_engine_membership`] answered.
pub(super) fn engine_cmds(h: &mut Harness) -> Vec<EngineCmd> {
    h.play_engine_membership();
    HELD.with(|held| std::mem::take(&mut *held.borrow_mut()))
}

thread_local! {
    /// The engine's memberships: user -> rooms and join points (one test per thread).
    pub(super) static MEMBERS: std::cell::RefCell<HashMap<Text, Vec<(RoomName, JoinPoint)>>> =
        Default::default();
    /// Commands for the engine other than membership, kept for [`engine_cmds`].
    static HELD: std::cell::RefCell<Vec<EngineCmd>> = Default::default();
    /// The epoch hints of the joins the engine answered, in order.
    pub(super) static JOIN_HINTS: std::cell::RefCell<Vec<u64>> = Default::default();
}

impl Harness {
    /// Plays the engine's membership side (and answers markers loads: none), as the scripts of `cluster/membership.rs` do
    /// in Redis: a user's rooms are read when a worker watches the user, and a change is
    /// answered and its notice sent back to the worker (which watches every user it holds
    /// a connection of). The join point is the owner's epoch and head.
    pub(super) fn play_engine_membership(&mut self) {
        use crate::cluster::membership::{Notice, UserRooms};
        use crate::cluster::{MemberChange, MemberOutcome};
        loop {
            let mut cmds = Vec::new();
            self.core.drain_engine(|c| cmds.push(c));
            let mut events = Vec::new();
            for cmd in cmds {
                match cmd {
                    EngineCmd::WatchUser { user, .. } => {
                        let rooms = MEMBERS.with(|m| m.borrow().get(&user).cloned());
                        let rooms = UserRooms {
                            rooms: rooms.unwrap_or_default(),
                            blocks: Vec::new(),
                        };
                        events.push(EngineEvent::UserLoaded { user, rooms });
                    }
                    EngineCmd::UnwatchUser { .. } | EngineCmd::Release { .. } => {}
                    // A room's markers, read when it opens: these tests' engine holds
                    // none (an empty answer changes nothing).
                    EngineCmd::LoadMarkers { .. } => {}
                    // One node here: every claim is under the cap.
                    EngineCmd::Claim { ticket, .. } => events.push(EngineEvent::Claimed {
                        ticket,
                        outcome: crate::cluster::ClaimOutcome::Granted,
                    }),
                    EngineCmd::Member(req) => {
                        let MemberChange::Join {
                            serial, epoch_hint, ..
                        } = req.change
                        else {
                            panic!("only joins in these tests: {req:?}");
                        };
                        JOIN_HINTS.with(|h| h.borrow_mut().push(epoch_hint));
                        let (epoch, seq) = self
                            .core
                            .owned
                            .get(&req.room)
                            .map_or((77, 0), |o| (o.epoch, o.head));
                        let join = JoinPoint { epoch, seq, serial };
                        MEMBERS.with(|m| {
                            m.borrow_mut()
                                .entry(req.user.clone())
                                .or_default()
                                .push((req.room.clone(), join));
                        });
                        events.push(EngineEvent::MemberDone {
                            ticket: req.ticket,
                            outcome: MemberOutcome::Joined { new: true, join },
                        });
                        events.push(EngineEvent::Notice {
                            user: req.user,
                            notice: Notice::Joined {
                                room: req.room,
                                join,
                            },
                        });
                    }
                    other => HELD.with(|held| held.borrow_mut().push(other)),
                }
            }
            if events.is_empty() {
                return;
            }
            for event in events {
                self.core.on_engine(self.now, event);
            }
            self.pump();
        }
    }
}

pub(super) fn feed(h: &mut Harness, event: EngineEvent) {
    h.core.on_engine(h.now, event);
    h.pump();
    h.play_engine_membership();
}

/// The room's sequence a stream read answers with a page that reaches the stream's end,
/// from a Redis that lost nothing: the page's last entry, or where it starts. (Past it,
/// the stream holds nothing more: what the sequence names beyond is a gap.)
pub(super) fn stream_end(after: u64, msgs: &[EngineMessage], marks: &[RemovalMark]) -> u64 {
    let last_msg = msgs.last().map_or(0, |m| m.seq);
    let last_mark = marks.last().map_or(0, |m| m.place().0);
    after.max(last_msg).max(last_mark)
}

/// A page of the room's stream read in epoch 77 after `after`, the room's sequence
/// [`stream_end`].
pub(super) fn stream_page(
    room: &RoomName,
    after: u64,
    msgs: Vec<EngineMessage>,
    marks: Vec<RemovalMark>,
    full: bool,
) -> EngineEvent {
    EngineEvent::Filled {
        room: room.clone(),
        page: FillPage {
            epoch: 77,
            room_seq: stream_end(after, &msgs, &marks),
            after,
            msgs,
            marks,
            full,
        },
    }
}

/// A page of the room's stream read in `epoch` after `after`: `msgs`, no removals, the
/// stream's end.
pub(super) fn filled(
    room: &RoomName,
    epoch: u64,
    after: u64,
    msgs: Vec<EngineMessage>,
) -> EngineEvent {
    let room_seq = stream_end(after, &msgs, &[]);
    filled_at(room, epoch, room_seq, after, msgs)
}

/// [`filled`], the room's sequence then `room_seq`.
fn filled_at(
    room: &RoomName,
    epoch: u64,
    room_seq: u64,
    after: u64,
    msgs: Vec<EngineMessage>,
) -> EngineEvent {
    EngineEvent::Filled {
        room: room.clone(),
        page: FillPage {
            epoch,
            room_seq,
            after,
            msgs,
            marks: Vec::new(),
            full: false,
        },
    }
}

/// A page of the room's stream read in epoch 77 after `after`, the room's sequence then
/// `room_seq`: messages `seqs`, no removals, the stream's end.
fn page_of(room: &RoomName, room_seq: u64, after: u64, seqs: &[u64]) -> EngineEvent {
    let msgs = seqs.iter().map(|&s| other(s, "x")).collect();
    filled_at(room, 77, room_seq, after, msgs)
}

/// A reader's page of the room's stream after `after`, the stream's end (not full) at
/// `last`: messages `seqs`.
fn read_page(room: &RoomName, after: u64, reader: u64, seqs: &[u64], last: u64) -> EngineEvent {
    EngineEvent::Read {
        room: room.clone(),
        after,
        reader,
        msgs: seqs.iter().map(|&s| other(s, "x")).collect(),
        full: false,
        last,
    }
}

/// Answers the stream reads the worker asks for (the owner's fills and its readers'
/// pages) from `stream`, the room's messages in the engine (epoch 77, bodies `m<seq>`),
/// until it asks for none; the room's sequence is the stream's last.
pub(super) fn answer_fills(h: &mut Harness, room: &RoomName, stream: &[u64]) {
    answer_reads(h, room, stream, stream.last().copied().unwrap_or(0));
}

/// [`answer_fills`], the room's sequence `room_seq` (past the stream's last where Redis
/// lost what a raise passed).
pub(super) fn answer_reads(h: &mut Harness, room: &RoomName, stream: &[u64], room_seq: u64) {
    let after_of = |after: u64| -> Vec<EngineMessage> {
        stream
            .iter()
            .filter(|&&s| s > after)
            .map(|&s| other(s, &format!("m{s}")))
            .collect()
    };
    // A worker that asks again and again for what the stream cannot give is stalled.
    for _ in 0..100 {
        let cmds = engine_cmds(h);
        if cmds.is_empty() {
            return;
        }
        for cmd in cmds {
            let event = match cmd {
                EngineCmd::Fill { after, .. } => EngineEvent::Filled {
                    room: room.clone(),
                    page: FillPage {
                        epoch: 77,
                        room_seq,
                        after,
                        msgs: after_of(after),
                        marks: Vec::new(),
                        full: false,
                    },
                },
                EngineCmd::Read { after, reader, .. } => EngineEvent::Read {
                    room: room.clone(),
                    after,
                    reader,
                    msgs: after_of(after),
                    full: false,
                    last: room_seq.max(after),
                },
                other => panic!("only stream reads expected: {other:?}"),
            };
            feed(h, event);
        }
    }
    panic!("the worker still asks for stream reads after 100 answers: stalled");
}

/// Where each stream read the worker asked for starts.
pub(super) fn fills_asked(h: &mut Harness) -> Vec<u64> {
    engine_cmds(h)
        .into_iter()
        .filter_map(|c| match c {
            EngineCmd::Fill { after, .. } => Some(after),
            _ => None,
        })
        .collect()
}

/// Another node's message.
pub(super) fn other(seq: u64, body: &str) -> EngineMessage {
    EngineMessage {
        seq,
        ts_ms: 1_767_225_600_000,
        ticket: None,
        sender: Text::from("carol"),
        payload: Bytes::copy_from_slice(body.as_bytes()),
    }
}

/// The ranges of the GAPs among `frames`, in order.
pub(super) fn gaps(frames: &[ServerFrame]) -> Vec<(u64, u64)> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Gap(g) => Some((g.from, g.to)),
            _ => None,
        })
        .collect()
}

/// The bodies of the DELIVERs among `frames`, in order.
pub(super) fn delivered(frames: &[ServerFrame]) -> Vec<&[u8]> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Deliver(d) => Some(&d.payload[..]),
            _ => None,
        })
        .collect()
}

pub(super) fn seqs(messages: Vec<(u64, Bytes)>) -> Vec<u64> {
    messages.into_iter().map(|(s, _)| s).collect()
}

/// `user` joins `dm`, which opens the room first (epoch 77, head 0): nothing binds until
/// the engine answers.
pub(super) fn open_dm(h: &mut Harness, token: Token) -> (RoomName, u32) {
    let subscribe = ClientFrame::Subscribe(Subscribe {
        room: true,
        name: Text::from("dm"),
    });
    h.send(token, &subscribe);
    let room = match engine_cmds(h).as_slice() {
        [EngineCmd::Open { room, .. }] => room.clone(),
        other => panic!("{other:?}"),
    };
    assert!(h.phones[&token].session.alias_of("dm").is_none());
    feed(
        h,
        EngineEvent::Opened {
            room: room.clone(),
            epoch: 77,
            seq: 0,
            tail: Vec::new(),
            marks: Vec::new(),
        },
    );
    let alias = h.phones[&token].session.alias_of("dm").unwrap();
    (room, alias)
}

/// bob alone in `dm`, opened at head 0; his events so far dropped.
pub(super) fn bob_in_dm() -> (Harness, Token, RoomName) {
    let mut h = cluster_harness();
    let bob = h.connect("bob", ClientSession::new());
    let (room, _) = open_dm(&mut h, bob);
    h.events(bob);
    (h, bob, room)
}

/// ann (with `session`) and bob in `dm`, opened; their events so far dropped.
pub(super) fn ann_and_bob(session: ClientSession) -> (Harness, Token, Token, RoomName, u32) {
    let mut h = cluster_harness();
    let ann = h.connect("ann", session);
    let bob = h.connect("bob", ClientSession::new());
    let (room, a) = open_dm(&mut h, ann);
    h.join(bob, "dm");
    h.events(ann);
    h.events(bob);
    (h, ann, bob, room, a)
}

/// `token` publishes; the engine answers `seq` (`repeated`: from its window); the PUBACK
/// must say `seq`. Returns the request the engine got.
fn publish_answered(
    h: &mut Harness,
    (token, alias): (Token, u32),
    seq: u64,
    repeated: bool,
) -> crate::cluster::PublishRequest {
    h.publish(token, alias, "body");
    let mut cmds = engine_cmds(h);
    let Some(EngineCmd::Publish(req)) = cmds.pop().filter(|_| cmds.is_empty()) else {
        panic!("one publish for the engine");
    };
    let (ticket, epoch) = (req.ticket, 77);
    feed(
        h,
        EngineEvent::Published {
            ticket,
            epoch,
            seq,
            repeated,
            ordered: true,
        },
    );
    let acks = h.events(token);
    assert!(
        matches!(acks.as_slice(), [Event::PubAck { seq: s, .. }] if *s == seq),
        "{acks:?}"
    );
    req
}

#[test]
fn engine_order_holes_filled_and_no_echo_to_the_publisher() {
    let (mut h, ann, bob, room, a) = ann_and_bob(ClientSession::new());
    // ann's publish goes to the engine, which makes it 3 (1 and 2 came from other nodes
    // and have not arrived here yet): the PUBACK at once, nothing delivered past the hole,
    // which is read from the stream.
    let ticket = publish_answered(&mut h, (ann, a), 3, false).ticket;
    assert!(h.messages(bob).is_empty());
    assert!(matches!(
        engine_cmds(&mut h).as_slice(),
        [EngineCmd::Fill { after: 0, .. }]
    ));
    // 2 over pub/sub: still after the hole.
    hear(&mut h, &room, other(2, "two"));
    assert!(h.messages(bob).is_empty());
    // The stream brings 1..=3; its 3 is ann's own, whose ticket the answer already used.
    let mine = EngineMessage {
        ticket: Some(ticket),
        ..other(3, "mine")
    };
    feed(
        &mut h,
        filled(&room, 77, 0, vec![other(1, "one"), other(2, "two"), mine]),
    );
    assert_eq!(seqs(h.messages(bob)), vec![1, 2, 3]);
    assert_eq!(
        seqs(h.messages(ann)),
        vec![1, 2],
        "the publisher is not sent its own message"
    );
    // Its echo over pub/sub changes nothing.
    feed(
        &mut h,
        EngineEvent::Message {
            room,
            epoch: 77,
            msg: other(3, "mine"),
        },
    );
    assert!(h.messages(bob).is_empty());
}

#[test]
fn a_resubscribed_channel_is_caught_up_from_the_stream() {
    let (mut h, bob, room) = bob_in_dm();
    // The pub/sub connection came back: whatever was published meanwhile is read first.
    feed(&mut h, EngineEvent::Resubscribed { room: room.clone() });
    assert!(matches!(
        engine_cmds(&mut h).as_slice(),
        [EngineCmd::Fill { after: 0, .. }]
    ));
    feed(
        &mut h,
        stream_page(
            &room,
            0,
            vec![other(1, "one"), other(2, "two")],
            Vec::new(),
            false,
        ),
    );
    assert_eq!(seqs(h.messages(bob)), vec![1, 2]);
}

/// The read after a resubscription (a failover took the connection) answers the room's
/// sequence below what this owner delivered, in the same epoch: Redis lost writes, and
/// would give their sequences again. The owner asks the engine to move it up to its head
/// (`script::RAISE`); a read answering it at or past the head asks nothing.
#[test]
fn a_read_answering_the_rooms_sequence_below_the_head_raises_it() {
    let (mut h, bob, room) = bob_in_dm();
    let page = |room_seq, after, seqs: &[u64]| page_of(&room, room_seq, after, seqs);
    feed(&mut h, EngineEvent::Resubscribed { room: room.clone() });
    engine_cmds(&mut h);
    feed(&mut h, page(5, 0, &[1, 2, 3, 4, 5]));
    assert_eq!(seqs(h.messages(bob)), vec![1, 2, 3, 4, 5]);
    assert_eq!(raises(engine_cmds(&mut h)), vec![]);
    // The new master lacks 3..=5.
    feed(&mut h, EngineEvent::Resubscribed { room: room.clone() });
    assert!(matches!(
        engine_cmds(&mut h).as_slice(),
        [EngineCmd::Fill { after: 5, .. }]
    ));
    feed(&mut h, page(2, 5, &[]));
    assert_eq!(raises(engine_cmds(&mut h)), vec![(77, 5)]);
    // Moved up: the next message is 6, delivered at once.
    hear(&mut h, &room, other(6, "six"));
    assert_eq!(seqs(h.messages(bob)), vec![6]);
    feed(&mut h, EngineEvent::Resubscribed { room: room.clone() });
    engine_cmds(&mut h);
    feed(&mut h, page(6, 6, &[]));
    assert_eq!(raises(engine_cmds(&mut h)), vec![]);
}

/// The raises `cmds` asks for: (epoch, head).
fn raises(cmds: Vec<EngineCmd>) -> Vec<(u64, u64)> {
    cmds.into_iter()
        .filter_map(|c| match c {
            EngineCmd::Raise { epoch, head, .. } => Some((epoch, head)),
            _ => None,
        })
        .collect()
}

/// A message held after a hole (heard before a failover that lost it) becomes the head
/// once the read answers nothing between: past the room's sequence that read answered.
/// The owner compares after applying the page, so it asks for the raise (to 7). Found by
/// review: the check ran before the page, and the new master's 6 and 7 were dropped.
#[test]
fn a_held_message_past_the_rooms_sequence_is_raised_to() {
    let (mut h, bob, room) = bob_in_dm();
    for s in 1..=5 {
        hear(&mut h, &room, other(s, "old"));
    }
    assert_eq!(seqs(h.messages(bob)), vec![1, 2, 3, 4, 5]);
    engine_cmds(&mut h);
    // 6 lost on pub/sub, 7 heard: a hole, read from the stream.
    hear(&mut h, &room, other(7, "seven"));
    assert!(matches!(
        engine_cmds(&mut h).as_slice(),
        [EngineCmd::Fill { after: 5, .. }]
    ));
    // A failover lost 6 and 7: the read answers the room's sequence 5, nothing after.
    feed(&mut h, page_of(&room, 5, 5, &[]));
    assert_eq!(raises(engine_cmds(&mut h)), vec![(77, 7)]);
}

/// A publish names the owner's head once it holds one, so that Redis answers past it
/// even when it lost writes nobody read back yet (`script::PUBLISH`).
#[test]
fn a_publish_carries_its_owners_head_once_it_holds_one() {
    let (mut h, ann, bob, room, a) = ann_and_bob(ClientSession::new());
    let owner_head = |h: &mut Harness| {
        h.publish(ann, a, "hi");
        match engine_cmds(h).pop() {
            Some(EngineCmd::Publish(req)) => req.owner_head,
            other => panic!("{other:?}"),
        }
    };
    engine_cmds(&mut h);
    assert_eq!(owner_head(&mut h), None, "no message yet");
    for s in 1..=5 {
        hear(&mut h, &room, other(s, "old"));
    }
    h.events(ann);
    h.events(bob);
    assert_eq!(owner_head(&mut h), Some((77, 5)));
}

/// This owner's own publish answered at or below its head (Redis lost writes and gives
/// their sequences again): the owner asks for the raise to its head. Found by review.
#[test]
fn an_own_publish_answered_at_or_below_the_head_asks_for_a_raise() {
    let (mut h, ann, bob, room, a) = ann_and_bob(ClientSession::new());
    for s in 1..=5 {
        hear(&mut h, &room, other(s, "old"));
    }
    h.events(ann);
    h.events(bob);
    engine_cmds(&mut h);
    h.publish(ann, a, "reused");
    let mut cmds = engine_cmds(&mut h);
    let Some(EngineCmd::Publish(req)) = cmds.pop() else {
        panic!("{cmds:?}");
    };
    let answered = |seq| EngineEvent::Published {
        ticket: req.ticket,
        epoch: 77,
        seq,
        repeated: false,
        ordered: true,
    };
    feed(&mut h, answered(3));
    assert_eq!(raises(engine_cmds(&mut h)), vec![(77, 5)]);
}

#[test]
fn publishes_past_the_in_flight_bound_are_refused_unavailable() {
    let mut h = Harness::new(|c| {
        c.cluster = Some(ClusterConfig {
            max_in_flight: 1,
            ..ClusterConfig::default()
        })
    });
    h.core.attach_cluster(Arc::new(ClusterStats::default()));
    let ann = h.connect("ann", ClientSession::new());
    let (_, a) = open_dm(&mut h, ann);
    h.events(ann);
    h.publish(ann, a, "one");
    h.publish(ann, a, "two");
    let refused: Vec<_> = h
        .events(ann)
        .into_iter()
        .filter_map(|e| match e {
            Event::Error(e) => Some((e.code, e.fatal, e.message.as_str().to_owned())),
            _ => None,
        })
        .collect();
    assert_eq!(
        refused,
        vec![(ErrorCode::Overloaded, false, "unavailable".to_owned())]
    );
    assert_eq!(
        engine_cmds(&mut h).len(),
        1,
        "one publish in flight, not queued"
    );
}

#[test]
fn only_what_the_stream_dropped_becomes_a_gap() {
    let (mut h, bob, room) = bob_in_dm();
    let message = |seq| EngineEvent::Message {
        room: room.clone(),
        epoch: 77,
        msg: other(seq, "x"),
    };
    let filled =
        |after, seqs: &[u64]| page_of(&room, seqs.last().map_or(after, |&s| s), after, seqs);
    // 5 arrives; the stream, read after it, starts at 4: retention dropped 1..=3.
    feed(&mut h, message(5));
    assert!(matches!(
        engine_cmds(&mut h).as_slice(),
        [EngineCmd::Fill { after: 0, .. }]
    ));
    feed(&mut h, filled(0, &[4, 5]));
    // bob's binding, behind the node's memory now, reads its next page from the stream,
    // which tells it the same.
    let reader = match engine_cmds(&mut h).as_slice() {
        [
            EngineCmd::Read {
                after: 0, reader, ..
            },
        ] => *reader,
        other => panic!("{other:?}"),
    };
    feed(&mut h, read_page(&room, 0, reader, &[4, 5], 5));
    let events = h.events(bob);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Gap { from: 1, to: 3, .. })),
        "{events:?}"
    );
    // 7 arrives and a read is sent; 9 arrives before its answer, which ends at 7: 8 may be
    // newer than that read, so it is read again, not skipped.
    feed(&mut h, message(7));
    assert!(matches!(
        engine_cmds(&mut h).as_slice(),
        [EngineCmd::Fill { after: 5, .. }]
    ));
    feed(&mut h, message(9));
    feed(&mut h, filled(5, &[6, 7]));
    assert!(matches!(
        engine_cmds(&mut h).as_slice(),
        [EngineCmd::Fill { after: 7, .. }]
    ));
    feed(&mut h, filled(7, &[8, 9]));
    let events = h.events(bob);
    assert!(
        !events.iter().any(|e| matches!(e, Event::Gap { .. })),
        "{events:?}"
    );
    let seqs: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Message { seq: Some(s), .. } => Some(*s),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, vec![6, 7, 8, 9]);
    // A catch-up read sent before anything waited (a resubscription) finds nothing; 12
    // arrives meanwhile: 10 and 11 may be newer than the read, so it is read again.
    feed(&mut h, EngineEvent::Resubscribed { room: room.clone() });
    assert!(matches!(
        engine_cmds(&mut h).as_slice(),
        [EngineCmd::Fill { after: 9, .. }]
    ));
    feed(&mut h, message(12));
    feed(&mut h, filled(9, &[]));
    assert!(matches!(
        engine_cmds(&mut h).as_slice(),
        [EngineCmd::Fill { after: 9, .. }]
    ));
    feed(&mut h, filled(9, &[10, 11, 12]));
    let events = h.events(bob);
    assert!(
        !events.iter().any(|e| matches!(e, Event::Gap { .. })),
        "{events:?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Message { .. }))
            .count(),
        3
    );
}

#[test]
fn a_repeat_the_engine_knows_is_answered_with_the_first_sequence() {
    let (mut h, ann, bob, _, a) = ann_and_bob(ClientSession::with_device(7, 0));
    // The publish id travels to the engine, which keeps the room's window of them; another
    // node took it first (a retry after `unavailable`): its sequence, nothing new.
    let req = publish_answered(&mut h, (ann, a), 1, true);
    assert!(matches!(
        req.repeat,
        Some(crate::cluster::RepeatKey::Device { msg_id: 1, .. })
    ));
    assert!(
        h.messages(bob).is_empty(),
        "a repeat is not delivered again"
    );
    assert_eq!(
        h.stats
            .publishes_repeated
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn a_phone_ahead_of_this_node_is_not_sent_again_what_it_saw_on_another() {
    let (mut h, _ann, bob, room, _) = ann_and_bob(ClientSession::new());
    let live = |h: &mut Harness, seq: u64, body: &str| {
        feed(
            h,
            EngineEvent::Message {
                room: room.clone(),
                epoch: 77,
                msg: other(seq, body),
            },
        )
    };
    live(&mut h, 1, "one");
    assert_eq!(seqs(h.messages(bob)), vec![1]);
    // Bob's other phone read up to 3 on another node, which went away; this node has only
    // 1 so far. It resumes here from 3.
    let phone = h.connect_forged("bob", &[entry("dm", 77, 3)]);
    live(&mut h, 2, "two");
    live(&mut h, 3, "three");
    live(&mut h, 4, "four");
    let frames = h.frames(phone);
    assert!(
        !frames.iter().any(|f| matches!(f, ServerFrame::Room(_))),
        "no ROOM rewinding its cursor: {frames:?}"
    );
    let bodies = delivered(&frames);
    assert_eq!(
        bodies,
        vec![&b"four"[..]],
        "2 and 3 were seen on the other node"
    );
}

#[test]
fn a_resume_past_the_nodes_memory_reads_the_stream_one_page_at_a_time() {
    let mut h = Harness::new(|c| {
        c.cluster = Some(ClusterConfig {
            fill_batch: 2,
            ..ClusterConfig::default()
        });
        c.retention.max_messages = 3;
    });
    h.core.attach_cluster(Arc::new(ClusterStats::default()));
    let bob = h.connect("bob", ClientSession::new());
    let (room, _) = open_dm(&mut h, bob);
    for seq in 1..=10 {
        hear(&mut h, &room, other(seq, &format!("m{seq}")));
    }
    assert!(engine_cmds(&mut h).is_empty());
    // The node remembers 8..=10; bob's other phone resumes from 2.
    let phone = h.connect_forged("bob", &[entry("dm", 77, 2)]);
    let answer = |h: &mut Harness, after: u64, msgs: &[u64]| {
        let reader = match engine_cmds(h).as_slice() {
            [
                EngineCmd::Read {
                    after: a, reader, ..
                },
            ] if *a == after => *reader,
            other => panic!("one page read after {after} in flight, not {other:?}"),
        };
        feed(
            h,
            EngineEvent::Read {
                room: room.clone(),
                after,
                reader,
                msgs: msgs.iter().map(|&s| other(s, &format!("m{s}"))).collect(),
                full: msgs.len() >= 2,
                last: msgs.last().copied().unwrap_or(after),
            },
        );
    };
    // The stream no longer holds 3; it pages 4..=7 two at a time, each page asked for only
    // once the one before is written.
    answer(&mut h, 2, &[4, 5]);
    answer(&mut h, 5, &[6, 7]);
    // From 8 on, the node's memory answers.
    assert!(engine_cmds(&mut h).is_empty());
    let frames = h.frames(phone);
    let gaps = gaps(&frames);
    assert_eq!(
        gaps,
        vec![(3, 3)],
        "a GAP for exactly what the stream dropped"
    );
    let bodies = delivered(&frames);
    let want: Vec<String> = (4..=10).map(|s| format!("m{s}")).collect();
    assert_eq!(
        bodies,
        want.iter().map(|s| s.as_bytes()).collect::<Vec<_>>()
    );
}

#[test]
fn a_multi_room_api_publish_answers_each_room_on_its_own() {
    use crate::mesh::{ControlOp, ControlRefusal, ControlReply, CoreMsg, Published};
    let mut h = cluster_harness();
    let rooms = [
        RoomName::new(false, Text::from("one")),
        RoomName::new(false, Text::from("two")),
    ];
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let op = ControlOp::PublishMany {
        rooms: rooms.to_vec(),
        sender: Text::from("server"),
        payload: Bytes::from_static(b"hi"),
        key: None,
    };
    h.core
        .handle(h.now, vec![CoreMsg::Control { op, reply: tx }]);
    // Each room opens first (its head in the engine: 4).
    let opened: Vec<RoomName> = engine_cmds(&mut h)
        .into_iter()
        .filter_map(|c| match c {
            EngineCmd::Open { room, .. } => Some(room),
            _ => None,
        })
        .collect();
    assert_eq!(opened, rooms.to_vec());
    for room in &rooms {
        let (room, epoch, seq, tail) = (room.clone(), 77, 4, Vec::new());
        feed(
            &mut h,
            EngineEvent::Opened {
                room,
                epoch,
                seq,
                tail,
                marks: Vec::new(),
            },
        );
    }
    // Then each room's publish goes to the engine on its own.
    let tickets: Vec<(RoomName, u64)> = engine_cmds(&mut h)
        .into_iter()
        .filter_map(|c| match c {
            EngineCmd::Publish(req) => Some((req.room, req.ticket)),
            _ => None,
        })
        .collect();
    assert_eq!(tickets.len(), 2, "{tickets:?}");
    assert_eq!(tickets[0].0, rooms[0]);
    let answered = |h: &mut Harness| {
        let mut got = Vec::new();
        h.core.drain_replies(|to, answer| got.push((to, answer)));
        for (to, answer) in got {
            let _ = to.send(answer);
        }
    };
    let (ticket, epoch, seq, repeated) = (tickets[0].1, 77, 5, false);
    feed(
        &mut h,
        EngineEvent::Published {
            ticket,
            epoch,
            seq,
            repeated,
            ordered: true,
        },
    );
    answered(&mut h);
    assert!(
        rx.try_recv().is_err(),
        "answered before every room has its answer"
    );
    // The second room's publish fails in the engine: that room alone is refused.
    feed(
        &mut h,
        EngineEvent::PublishFailed {
            ticket: tickets[1].1,
        },
    );
    answered(&mut h);
    match rx.try_recv() {
        Ok(ControlReply::PublishedMany(answers)) => assert!(
            matches!(
                answers.as_slice(),
                [
                    (one, Ok(Published::New { seq: 5 })),
                    (two, Err(ControlRefusal::Unavailable)),
                ] if *one == rooms[0] && *two == rooms[1]
            ),
            "{answers:?}"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_ticks_acks_and_reads_reach_the_engine_as_one_batch_per_room_and_come_back_from_it() {
    let (mut h, ann, bob, room, a) = ann_and_bob(ClientSession::new());
    for seq in 1..=3 {
        hear(&mut h, &room, other(seq, "m"));
    }
    assert_eq!(seqs(h.messages(bob)).len(), 3);
    let b = h.phones[&bob].session.alias_of("dm").unwrap();
    // Within one tick: two ACKs and a READ of ann's, an ACK of bob's.
    for (token, frame) in [
        (
            ann,
            ClientFrame::Ack(pabal_codec::Ack::from_pairs(&[(a, 1)])),
        ),
        (
            ann,
            ClientFrame::Ack(pabal_codec::Ack::from_pairs(&[(a, 3)])),
        ),
        (
            ann,
            ClientFrame::Read(pabal_codec::Read { alias: a, seq: 2 }),
        ),
        (
            bob,
            ClientFrame::Ack(pabal_codec::Ack::from_pairs(&[(b, 2)])),
        ),
    ] {
        let mut bytes = BytesMut::new();
        frame.encode(&mut bytes);
        h.core.on_bytes(h.now, token, &bytes);
    }
    let m = |delivered, read| Marker { delivered, read };
    // The same tick, ann's phone on another worker: that worker's update for ann reaches
    // the owner separately, and is merged into ann's one entry.
    h.core.handle(
        h.now,
        vec![CoreMsg::Markers(vec![crate::mesh::MarkerUpdate {
            room: room.clone(),
            user: "ann".into(),
            epoch: 77,
            marker: m(1, 3),
        }])],
    );
    h.pump();
    match engine_cmds(&mut h).as_slice() {
        [
            EngineCmd::Markers {
                room: r,
                epoch: 77,
                markers,
            },
        ] => {
            assert_eq!(r, &room);
            assert_eq!(
                markers,
                &vec![
                    (UserName::from("ann"), m(3, 3)),
                    (UserName::from("bob"), m(2, 0))
                ],
                "one entry per member, the latest of each part (from every worker)"
            );
            // Bob's entry is his connection's own name record, shared: the batch copies
            // no member's name.
            let bobs = h.core.conn(bob).unwrap().user.clone().unwrap();
            assert!(markers[1].0.same_record(&bobs), "bob's name was copied");
        }
        other => panic!("one markers batch for the room: {other:?}"),
    }
    assert_eq!(
        h.core.markers(&room, "bob"),
        Marker::default(),
        "the markers are the engine's: applied when its channel says they moved"
    );
    // The engine's channel says bob's moved (through any node): a RECEIPT for ann.
    feed(
        &mut h,
        EngineEvent::Markers {
            room: room.clone(),
            epoch: 77,
            markers: vec![(Text::from("bob"), m(2, 0))],
        },
    );
    assert_eq!(h.core.markers(&room, "bob"), m(2, 0));
    h.tick(h.core.config.receipts.interval);
    let receipts: Vec<Event> = h
        .events(ann)
        .into_iter()
        .filter(|e| matches!(e, Event::Receipt { .. }))
        .collect();
    assert!(
        matches!(receipts.as_slice(), [Event::Receipt { members, .. }]
            if members.iter().any(|e| e.user.as_str() == "bob" && e.delivered == 2)),
        "{receipts:?}"
    );
    // Nothing moved since: no batch.
    h.pump();
    assert!(engine_cmds(&mut h).is_empty());
}

/// The engine answers the room's open: epoch 77, head `seq`, the stream's last messages.
pub(super) fn answer_open(h: &mut Harness, room: &RoomName, seq: u64, tail: Vec<EngineMessage>) {
    let (room, epoch) = (room.clone(), 77);
    feed(
        h,
        EngineEvent::Opened {
            room,
            epoch,
            seq,
            tail,
            marks: Vec::new(),
        },
    );
}

/// The room's channel brings `msg` (epoch 77).
pub(super) fn hear(h: &mut Harness, room: &RoomName, msg: EngineMessage) {
    let (room, epoch) = (room.clone(), 77);
    feed(h, EngineEvent::Message { room, epoch, msg });
}

/// Redis lost 2..=4 and a raise on another node moved the room's sequence past them. The
/// read after a resubscription reaches the stream's end at 1 and answers the sequence 4:
/// no entry will ever come for 2..=4 (the script reads the page and the sequence at
/// once), so they are a gap at once and the room goes on; waiting for them stalled the
/// room on this node.
#[test]
fn what_the_rooms_sequence_names_past_the_streams_end_is_a_gap() {
    let (mut h, bob, room) = bob_in_dm();
    feed(&mut h, EngineEvent::Resubscribed { room: room.clone() });
    assert_eq!(fills_asked(&mut h), vec![0]);
    feed(&mut h, page_of(&room, 4, 0, &[1]));
    assert_eq!(
        fills_asked(&mut h),
        Vec::<u64>::new(),
        "nothing left to wait for"
    );
    assert_eq!(
        h.core.owned.get(&room).map(|o| o.head),
        Some(4),
        "the head is past the gap before anything else comes"
    );
    hear(&mut h, &room, other(5, "m5"));
    answer_reads(&mut h, &room, &[1, 5], 5);
    let events = h.events(bob);
    let got = sequences_and_gaps(&events);
    assert_eq!(got, vec![(1, 1), (2, 4), (5, 5)], "{events:?}");
}

/// A reader's page from the stream with a hole in its middle (what Redis lost, raised
/// past: 1, 2, then 5): the page ends at the hole and the next one starts with its gap; a
/// phone is never sent 5 right after 2.
#[test]
fn a_stream_page_with_a_hole_in_its_middle_ends_at_it() {
    let (mut h, bob, room) = bob_in_dm();
    // The owner holds 5 only (its read of the stream starts there).
    hear(&mut h, &room, other(5, "x"));
    assert_eq!(fills_asked(&mut h), vec![0]);
    feed(&mut h, page_of(&room, 5, 0, &[5]));
    let read = |h: &mut Harness| match engine_cmds(h).as_slice() {
        [EngineCmd::Read { after, reader, .. }] => (*after, *reader),
        other => panic!("{other:?}"),
    };
    let (after, reader) = read(&mut h);
    assert_eq!(after, 0);
    feed(&mut h, read_page(&room, 0, reader, &[1, 2, 5], 5));
    let (after, reader) = read(&mut h);
    assert_eq!(after, 2, "the next page starts after the hole's start");
    feed(&mut h, read_page(&room, 2, reader, &[5], 5));
    let events = h.events(bob);
    let got = sequences_and_gaps(&events);
    assert_eq!(got, vec![(1, 1), (2, 2), (3, 4), (5, 5)], "{events:?}");
}

/// What a phone's events say of the room's order: `(seq, seq)` for a message, `(from,
/// to)` for a GAP, in order.
fn sequences_and_gaps(events: &[Event]) -> Vec<(u64, u64)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message { seq: Some(s), .. } => Some((*s, *s)),
            Event::Gap { from, to, .. } => Some((*from, *to)),
            _ => None,
        })
        .collect()
}
