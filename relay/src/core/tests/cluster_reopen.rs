//! The owner's cluster path without Redis, continued: a room's opening, its reopening after
//! the node let it go, and the engine starting it again under a new epoch (what a phone
//! resuming through it sees). The harness and the engine's stand-ins are in `cluster.rs`.

use super::cluster::*;
use super::*;
use crate::cluster::{EngineCmd, EngineEvent, RemovalMark};
use crate::directory::JoinPoint;
use crate::ids::RoomName;

/// `user` a member of `room` in the engine from its first sequence (epoch 77).
fn member_from_the_start(room: &RoomName, user: &str) {
    MEMBERS.with(|m| {
        m.borrow_mut().entry(Text::from(user)).or_default().push((
            room.clone(),
            JoinPoint {
                epoch: 77,
                seq: 0,
                serial: 1,
            },
        ));
    });
}

/// `dm`, bob a member of it as the engine holds it (not made through this owner, which
/// would count him): `connect` makes his connection, whose HELLO opens the room.
fn bob_opening_dm(connect: impl FnOnce(&mut Harness) -> Token) -> (Harness, Token, RoomName) {
    let mut h = cluster_harness();
    let room = RoomName::new(false, Text::from("dm"));
    member_from_the_start(&room, "bob");
    let bob = connect(&mut h);
    assert!(
        matches!(engine_cmds(&mut h).as_slice(), [EngineCmd::Open { room: r, .. }] if *r == room),
        "the room opens first"
    );
    (h, bob, room)
}

/// bob's phone `bob` goes away (the room's channel closes on this node, its history
/// stays) and comes back resuming `dm` after `cursor` (the room opens again): the new
/// phone.
fn close_and_resume(h: &mut Harness, bob: Token, cursor: u64) -> Token {
    h.core.on_closed(h.now, bob);
    h.pump();
    assert!(
        engine_cmds(h)
            .iter()
            .any(|c| matches!(c, EngineCmd::Close { .. })),
        "the channel closes"
    );
    let phone = h.connect_forged("bob", &[entry("dm", 77, cursor)]);
    assert!(
        engine_cmds(h)
            .iter()
            .any(|c| matches!(c, EngineCmd::Open { .. })),
        "the room opens again"
    );
    phone
}

/// A phone resumes on a node that does not hold its room yet. The engine subscribes the
/// room's channel, then the OPEN script reads head 1; 2 and 3 are published (on another
/// node) right after it, and their copies on the pub/sub connection can reach the worker
/// before the OPEN's answer on the command connection (two connections: Redis writes and
/// the engine reads them in no set order), so the worker hears of 2 and 3 before it holds
/// the room. They must not be dropped: nothing later comes in a 1:1 room to reveal the
/// hole. (Found while chasing `cluster_kill`'s one failure, which it did not cause; not
/// seen from a real Redis.)
#[test]
fn messages_heard_before_the_open_answer_are_not_lost() {
    // Bob's phone saw 1 on the node that went away; it resumes here.
    let (mut h, phone, room) = bob_opening_dm(|h| h.connect_forged("bob", &[entry("dm", 77, 1)]));
    for seq in [2, 3] {
        hear(&mut h, &room, other(seq, &format!("m{seq}")));
    }
    answer_open(&mut h, &room, 1, vec![other(1, "m1")]);
    // Whatever the worker reads back from the stream, it gets what the stream holds.
    answer_fills(&mut h, &room, &[1, 2, 3]);
    let frames = h.frames(phone);
    let gaps = gaps(&frames);
    assert_eq!(gaps, vec![], "nothing was dropped by retention");
    assert_eq!(
        delivered(&frames),
        vec![&b"m2"[..], &b"m3"[..]],
        "2 and 3 were acknowledged to their publisher: {frames:?}"
    );
}

/// The same when the room reopens here (its last phone on this node went away, one came
/// back): a message heard before the open's answer waits for it, then follows the head.
#[test]
fn a_message_heard_while_a_room_reopens_is_kept() {
    let (mut h, bob, room) = bob_in_dm();
    // Bob's phone goes away and comes back; 1 arrives before the open's answer (head 0).
    let phone = close_and_resume(&mut h, bob, 0);
    hear(&mut h, &room, other(1, "m1"));
    answer_open(&mut h, &room, 0, Vec::new());
    answer_fills(&mut h, &room, &[1]);
    assert_eq!(delivered(&h.frames(phone)), vec![&b"m1"[..]]);
}

/// A room reopening behind the engine waits until its head reaches what OPEN read. When a
/// stream read sent before the room was let go is still out, its answer can stop short of
/// that (it was read before the messages after it were published): the room reads again
/// instead of staying closed to its phones until another message comes.
#[test]
fn a_reopened_room_reads_again_past_an_older_read_that_stops_short() {
    let mut h = cluster_harness();
    let room = RoomName::new(false, Text::from("dm"));
    // bob, a member since before 1.
    member_from_the_start(&room, "bob");
    let bob = h.connect("bob", ClientSession::new());
    open_dm(&mut h, bob);
    let message = |seq| EngineEvent::Message {
        room: room.clone(),
        epoch: 77,
        msg: other(seq, &format!("m{seq}")),
    };
    feed(&mut h, message(1));
    // 3 comes before 2: a read of the stream after 1 goes out.
    feed(&mut h, message(3));
    assert!(matches!(
        engine_cmds(&mut h).as_slice(),
        [EngineCmd::Fill { after: 1, .. }]
    ));
    // bob's phone goes away before its answer and comes back resuming after 1; OPEN
    // reads head 6.
    let phone = close_and_resume(&mut h, bob, 1);
    answer_open(&mut h, &room, 6, Vec::new());
    // The older read answers with what the stream held when it ran.
    feed(
        &mut h,
        filled(&room, 77, 1, vec![other(2, "m2"), other(3, "m3")]),
    );
    assert!(
        matches!(
            engine_cmds(&mut h).as_slice(),
            [EngineCmd::Fill { after: 3, .. }]
        ),
        "read again from the head"
    );
    feed(
        &mut h,
        filled(
            &room,
            77,
            3,
            (4..=6).map(|s| other(s, &format!("m{s}"))).collect(),
        ),
    );
    let frames = h.frames(phone);
    assert_eq!(gaps(&frames), vec![]);
    assert_eq!(
        delivered(&frames),
        vec![&b"m2"[..], &b"m3"[..], &b"m4"[..], &b"m5"[..], &b"m6"[..]],
        "{frames:?}"
    );
}

/// A room let go and opening again is in use while a binding waits for its open, though
/// nothing is bound to it yet: the idle sweep must leave it (evicting it refused the waiting
/// binding `unavailable`, and the phone went without the room until it reconnected).
/// Found by the cluster simulation (`sim/redis.rs`).
#[test]
fn a_room_opening_again_is_not_evicted_while_a_binding_waits_for_it() {
    let (mut h, bob, room) = bob_opening_dm(|h| h.connect("bob", ClientSession::new()));
    answer_open(&mut h, &room, 0, Vec::new());
    let phone = close_and_resume(&mut h, bob, 0);
    // The room, empty and unbound, comes up in the idle sweep before its open is answered.
    h.tick(IDLE_ROOM_CHECK + Duration::from_secs(1));
    let cmds = engine_cmds(&mut h);
    assert!(
        !cmds.iter().any(|c| matches!(c, EngineCmd::Close { .. })),
        "{cmds:?}"
    );
    answer_open(&mut h, &room, 0, Vec::new());
    hear(&mut h, &room, other(1, "m1"));
    let frames = h.frames(phone);
    assert!(
        !frames.iter().any(|f| matches!(f, ServerFrame::Error(_))),
        "{frames:?}"
    );
    assert_eq!(delivered(&frames), vec![&b"m1"[..]]);
}

/// A phone resumes after 9 on a node that holds only 12 and 13, so its binding waits for a
/// read of the stream; meanwhile it publishes again a message whose PUBACK it never saw,
/// and the engine's window answers the repeat with 10. The phone's cursor moves to 10 with
/// that PUBACK (PROTOCOL.md §9, a contiguous own sequence), so the relay must not send 10
/// back, nor number 11 as if the cursor were still 9 (the phone would take 10's body for
/// 11's). Found by the cluster simulation (`sim/redis.rs`).
#[test]
fn a_repeat_answered_while_a_resumed_binding_waits_moves_its_cursor_as_the_phones() {
    let (mut h, phone, room) = bob_opening_dm(|h| h.connect_forged("bob", &[entry("dm", 77, 9)]));
    answer_open(&mut h, &room, 13, vec![other(12, "m12"), other(13, "m13")]);
    let reader = match engine_cmds(&mut h).as_slice() {
        [
            ..,
            EngineCmd::Read {
                after: 9, reader, ..
            },
        ] => *reader,
        other => panic!("the binding reads the stream after 9: {other:?}"),
    };
    let publish = ClientFrame::Publish(pabal_codec::Publish {
        alias: 0,
        msg_id: Some(5),
        ack: None,
        payload: Bytes::from_static(b"m10"),
    });
    h.send(phone, &publish);
    let ticket = match engine_cmds(&mut h).as_slice() {
        [EngineCmd::Publish(req)] => req.ticket,
        other => panic!("{other:?}"),
    };
    feed(
        &mut h,
        EngineEvent::Published {
            ticket,
            epoch: 77,
            seq: 10,
            repeated: true,
            ordered: true,
        },
    );
    feed(
        &mut h,
        EngineEvent::Read {
            room: room.clone(),
            after: 9,
            reader,
            msgs: (10..=13).map(|s| other(s, &format!("m{s}"))).collect(),
            full: false,
            last: 13,
        },
    );
    let frames = h.frames(phone);
    let acked = frames
        .iter()
        .position(|f| matches!(f, ServerFrame::PubAck(a) if a.seq == 10));
    let first_deliver = frames
        .iter()
        .position(|f| matches!(f, ServerFrame::Deliver(_)));
    assert!(acked < first_deliver, "the PUBACK first: {frames:?}");
    assert_eq!(
        delivered(&frames),
        vec![&b"m11"[..], &b"m12"[..], &b"m13"[..]],
        "{frames:?}"
    );
    // The first DELIVER names no sequence: cursor + 1, the cursor being 10 on both sides.
    assert_eq!(delivered_seqs(&frames).first(), Some(&None), "{frames:?}");
}

/// A notice that another membership of bob's ended (serial 9; the one in force is serial 1)
/// reaches a worker after it read bob's rooms, which showed the later membership (the engine holds a user's notices behind such a read): it is old news and
/// must not end the membership in force. Found by the cluster simulation.
#[test]
fn a_notice_that_an_earlier_membership_ended_leaves_the_one_in_force() {
    use crate::cluster::membership::Notice;
    let (mut h, bob, room) = bob_opening_dm(|h| h.connect("bob", ClientSession::new()));
    answer_open(&mut h, &room, 0, Vec::new());
    let alias = h.phones[&bob]
        .session
        .alias_of("dm")
        .expect("bound from the HELLO");
    let ended = JoinPoint {
        epoch: 77,
        seq: 0,
        serial: 9,
    };
    feed(
        &mut h,
        EngineEvent::Notice {
            user: Text::from("bob"),
            notice: Notice::Left {
                room: room.clone(),
                join: ended,
                reason: LeftReason::Removed,
                blocked: false,
            },
        },
    );
    let events = h.events(bob);
    assert!(
        !events.iter().any(|e| matches!(e, Event::Left { .. })),
        "{events:?}"
    );
    hear(&mut h, &room, other(1, "m1"));
    assert_eq!(seqs(h.messages(bob)), vec![1]);
    assert_eq!(h.phones[&bob].session.alias_of("dm"), Some(alias));
    // The node still holds the membership: bob's next phone here binds dm from it.
    let tablet = h.connect("bob", ClientSession::new());
    assert!(
        h.phones[&tablet].session.alias_of("dm").is_some(),
        "{:?}",
        h.events(tablet)
    );
}

/// A join's epoch hint is what the engine starts the room's stream under if it lost the
/// room (its sequences start again at 1 there): never the epoch the owner holds, or every
/// node would take the new messages for ones it had already delivered. Found by review.
#[test]
fn a_join_hints_a_fresh_epoch_even_at_the_rooms_owner() {
    let (h, _ann, _bob, room, _) = ann_and_bob(ClientSession::new());
    assert_eq!(h.core.owned[&room].epoch, 77);
    let hints = JOIN_HINTS.with(|h| std::mem::take(&mut *h.borrow_mut()));
    assert!(!hints.is_empty(), "bob's join went to the engine");
    assert!(hints.iter().all(|&e| e > 77), "{hints:?}");
}

/// The engine lost the room and a join started it again under a new epoch (100) before
/// any message of it reached this node. dave's join point is in that later epoch, so
/// nothing the owner holds of the older one is his (before, his floor was 0 and he got
/// it all). When the new epoch's first message comes, ann and bob, bound at 3 in the old
/// one, are bound again (a ROOM with the new epoch) and get it (before, it was at or below
/// their cursors and skipped without a word).
#[test]
fn a_room_the_engine_started_again_is_bound_again_in_its_new_epoch() {
    use crate::cluster::membership::Notice;
    let (mut h, ann, bob, room, _) = ann_and_bob(ClientSession::new());
    for seq in 1..=3 {
        hear(&mut h, &room, other(seq, "old"));
    }
    assert_eq!(h.messages(bob).len(), 3);
    h.events(ann);
    let dave = h.connect("dave", ClientSession::new());
    h.events(dave);
    let join = JoinPoint {
        epoch: 100,
        seq: 0,
        serial: 5,
    };
    let notice = Notice::Joined {
        room: room.clone(),
        join,
    };
    let user = Text::from("dave");
    feed(&mut h, EngineEvent::Notice { user, notice });
    let events = h.events(dave);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Bound { room, .. } if room.cursor == 3)),
        "bound at the owner's head: {events:?}"
    );
    assert!(
        !events.iter().any(|e| matches!(e, Event::Message { .. })),
        "{events:?}"
    );
    let msg = other(1, "new");
    feed(
        &mut h,
        EngineEvent::Message {
            room: room.clone(),
            epoch: 100,
            msg,
        },
    );
    for phone in [ann, bob, dave] {
        let events = h.events(phone);
        assert!(
            events.iter().any(|e| matches!(e,
                Event::Bound { room, .. } if room.epoch == 100 && room.cursor == 0)),
            "told of the new epoch: {events:?}"
        );
        let got: Vec<(u64, &[u8])> = events
            .iter()
            .filter_map(|e| match e {
                Event::Message {
                    seq: Some(s),
                    payload,
                    ..
                } => Some((*s, &payload[..])),
                _ => None,
            })
            .collect();
        assert_eq!(got, vec![(1, &b"new"[..])], "{events:?}");
    }
}

/// A stream read is out when the pub/sub connection comes back, and it ran before the
/// connection was lost: 3, published while it was down, is in neither its page nor the
/// channel. The stream is read again once the read is answered (before, nothing read it
/// until a later message revealed the hole: never, in a room that went quiet). Found by
/// review.
#[test]
fn a_resubscription_while_a_read_is_out_reads_again_after_it() {
    let (mut h, _ann, bob, room, _) = ann_and_bob(ClientSession::new());
    hear(&mut h, &room, other(2, "two"));
    assert_eq!(fills_asked(&mut h), vec![0]);
    feed(&mut h, EngineEvent::Resubscribed { room: room.clone() });
    assert!(fills_asked(&mut h).is_empty(), "one read at a time");
    let page = filled(&room, 77, 0, vec![other(1, "one"), other(2, "two")]);
    feed(&mut h, page);
    assert_eq!(seqs(h.messages(bob)), vec![1, 2]);
    assert_eq!(
        fills_asked(&mut h),
        vec![2],
        "read again after the resubscription"
    );
}

/// A stream read is out when the room's channel brings a new epoch's first message (the
/// engine started the room again). The read ran before: its page (epoch 77, the old
/// stream's 2..=5) is passed over, not appended as the new epoch's, and the new stream is
/// read from its start. Found by review.
#[test]
fn a_page_read_before_the_engine_started_the_room_again_is_passed_over() {
    let (mut h, _ann, bob, room, _) = ann_and_bob(ClientSession::new());
    hear(&mut h, &room, other(1, "old1"));
    hear(&mut h, &room, other(3, "old3"));
    assert_eq!(fills_asked(&mut h), vec![1]);
    h.events(bob);
    let new = |seq, body| EngineEvent::Message {
        room: room.clone(),
        epoch: 78,
        msg: other(seq, body),
    };
    feed(&mut h, new(1, "new1"));
    let old_page = filled(&room, 77, 1, (2..=5).map(|s| other(s, "old")).collect());
    feed(&mut h, old_page);
    assert_eq!(h.core.owned[&room].epoch, 78);
    assert_eq!(
        fills_asked(&mut h),
        vec![0],
        "the new stream, from its start"
    );
    let new_page = filled(&room, 78, 0, vec![other(1, "new1"), other(2, "new2")]);
    feed(&mut h, new_page);
    let got: Vec<(u64, Bytes)> = h.messages(bob);
    assert_eq!(
        got,
        vec![(1, Bytes::from("new1")), (2, Bytes::from("new2"))]
    );
}

/// The engine started the room again under a lower epoch (a node whose clock is behind):
/// its messages were dropped here for as long as the room stayed open. A message of a
/// lower epoch now asks the stream which epoch is the room's, and the owner follows it.
/// Found by review.
#[test]
fn a_room_the_engine_started_again_under_a_lower_epoch_follows_it() {
    let (mut h, _ann, bob, room, _) = ann_and_bob(ClientSession::new());
    hear(&mut h, &room, other(1, "old"));
    assert_eq!(seqs(h.messages(bob)), vec![1]);
    feed(
        &mut h,
        EngineEvent::Message {
            room: room.clone(),
            epoch: 76,
            msg: other(1, "lower"),
        },
    );
    let asked = fills_asked(&mut h);
    assert_eq!(asked, vec![1], "the stream is asked");
    let page = filled(&room, 76, 1, Vec::new());
    feed(&mut h, page);
    assert_eq!(h.core.owned[&room].epoch, 76);
    let page = filled(&room, 76, 0, vec![other(1, "lower")]);
    feed(&mut h, page);
    let events = h.events(bob);
    assert!(
        events.iter().any(|e| matches!(e,
            Event::Bound { room, .. } if room.epoch == 76 && room.cursor == 0)),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| matches!(e, Event::Message { seq: Some(1), payload, .. } if &payload[..] == b"lower")),
        "{events:?}"
    );
}

/// A publish the engine fails may have run in Redis all the same (`WAIT` short of its
/// replicas: the engine does not take its copy, and other nodes deliver it): the owner
/// reads the stream at once. Before, the message reached this node's phones only when a
/// later message revealed the hole: never, in a room that went quiet. Found by review.
#[test]
fn a_failed_publish_that_redis_ran_reaches_this_nodes_phones_from_the_stream() {
    let (mut h, ann, bob, room, a) = ann_and_bob(ClientSession::new());
    h.publish(ann, a, "maybe");
    let Some(EngineCmd::Publish(req)) = engine_cmds(&mut h).pop() else {
        panic!("a publish for the engine");
    };
    feed(&mut h, EngineEvent::PublishFailed { ticket: req.ticket });
    assert!(
        matches!(h.events(ann).as_slice(), [Event::Error(_)]),
        "refused, retryable"
    );
    let asked = fills_asked(&mut h);
    assert_eq!(asked, vec![0], "the stream is read");
    let page = filled(&room, 77, 0, vec![other(1, "maybe")]);
    feed(&mut h, page);
    assert_eq!(seqs(h.messages(bob)), vec![1]);
}

/// A room reopening behind the engine (requests wait for its head to reach the open's)
/// when the engine starts it again in a new epoch: the old stream's head will never be
/// reached, so the waiting requests run once the room follows the new epoch (they waited
/// for good before).
#[test]
fn a_room_reopening_when_the_engine_starts_it_again_lets_its_requests_run() {
    let mut h = cluster_harness();
    let room = RoomName::new(false, Text::from("dm"));
    member_from_the_start(&room, "bob");
    let bob = h.connect("bob", ClientSession::new());
    open_dm(&mut h, bob);
    hear(&mut h, &room, other(1, "m1"));
    // bob's phone goes away and comes back resuming after 1; OPEN reads head 6: the
    // binding waits for the read of 2 to 6.
    let phone = close_and_resume(&mut h, bob, 1);
    answer_open(&mut h, &room, 6, Vec::new());
    assert!(matches!(
        engine_cmds(&mut h).as_slice(),
        [EngineCmd::Fill { after: 1, .. }]
    ));
    let new = EngineEvent::Message {
        room: room.clone(),
        epoch: 78,
        msg: other(1, "new1"),
    };
    feed(&mut h, new);
    // The read of the old stream answers (after the restart, in the new epoch): where it
    // started is the old stream's, so it is passed over and the new stream read.
    let stale = filled(&room, 78, 1, vec![other(2, "new2")]);
    feed(&mut h, stale);
    assert!(matches!(
        engine_cmds(&mut h).as_slice(),
        [EngineCmd::Fill { after: 0, .. }]
    ));
    let page = filled(&room, 78, 0, vec![other(1, "new1"), other(2, "new2")]);
    feed(&mut h, page);
    let frames = h.frames(phone);
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, ServerFrame::Room(r) if r.epoch == 78)),
        "bound in the new epoch: {frames:?}"
    );
    assert_eq!(
        delivered(&frames),
        vec![&b"new1"[..], &b"new2"[..]],
        "{frames:?}"
    );
}

/// Redis lost 2..=4 and a raise moved the room's sequence past them (another node held
/// them), then 5 was published: the stream holds 1 and 5, the sequence says 5. A phone
/// resuming after 0 opens the room here: the open's tail is 1 and 5, with a hole. What
/// the worker keeps in memory must still follow the head without a break (a message
/// appended after a break tripped `History::push`'s order), and the phone gets 1, an
/// exact GAP over what Redis lost, then 5 and what follows.
#[test]
fn an_open_whose_tail_has_a_hole_keeps_memory_in_order() {
    let (mut h, phone, room) = bob_opening_dm(|h| h.connect_forged("bob", &[entry("dm", 77, 0)]));
    answer_open(&mut h, &room, 5, vec![other(1, "m1"), other(5, "m5")]);
    answer_fills(&mut h, &room, &[1, 5]);
    hear(&mut h, &room, other(6, "m6"));
    answer_fills(&mut h, &room, &[1, 5, 6]);
    let frames = h.frames(phone);
    assert_eq!(gaps(&frames), vec![(2, 4)], "{frames:?}");
    assert_eq!(
        delivered(&frames),
        vec![&b"m1"[..], &b"m5"[..], &b"m6"[..]],
        "{frames:?}"
    );
}

/// The same loss seen by an open whose tail ends below the room's sequence: Redis lost
/// 4..=5 after a raise to 5, so the stream ends at 3 and the sequence is 5. Memory keeps
/// nothing before the head, and the next message appends after it.
#[test]
fn an_open_whose_tail_ends_below_the_rooms_sequence_appends_after_it() {
    let (mut h, phone, room) = bob_opening_dm(|h| h.connect_forged("bob", &[entry("dm", 77, 3)]));
    let tail = (1..=3).map(|s| other(s, &format!("m{s}"))).collect();
    answer_open(&mut h, &room, 5, tail);
    answer_reads(&mut h, &room, &[1, 2, 3], 5);
    hear(&mut h, &room, other(6, "m6"));
    answer_fills(&mut h, &room, &[1, 2, 3, 6]);
    let frames = h.frames(phone);
    assert_eq!(gaps(&frames), vec![(4, 5)], "{frames:?}");
    assert_eq!(delivered(&frames), vec![&b"m6"[..]], "{frames:?}");
}

/// A room reopening behind the engine waits until its head reaches what OPEN read (5).
/// Redis lost 4..=5 since (a failover, no raise yet): the read reaches the stream's end
/// at 3. The reopening ends there and the phone binds; nothing waits for what Redis lost
/// (before, the room stayed closed to its phones on this node).
#[test]
fn a_reopening_whose_target_redis_lost_since_ends_at_the_streams_end() {
    let (mut h, bob, room) = bob_in_dm();
    hear(&mut h, &room, other(1, "m1"));
    let phone = close_and_resume(&mut h, bob, 1);
    answer_open(&mut h, &room, 5, Vec::new());
    answer_fills(&mut h, &room, &[1, 2, 3]);
    let frames = h.frames(phone);
    assert_eq!(
        delivered(&frames),
        vec![&b"m2"[..], &b"m3"[..]],
        "{frames:?}"
    );
}

/// A room reopening behind the engine: the open read the sequence 10 and named a removal
/// placed after 10 (the room's last removals). Redis then lost 9, 10 and the removal (a
/// failover): the read after the head reaches the stream's end at 8. The removal will
/// never be read back; the owner drops it rather than read the stream again on every turn
/// (and apply it once a new message took sequence 10). Found by review.
#[test]
fn a_removal_redis_lost_with_the_writes_before_it_is_not_waited_for() {
    let (mut h, bob, room) = bob_in_dm();
    hear(&mut h, &room, other(1, "m1"));
    let phone = close_and_resume(&mut h, bob, 1);
    let carol_removed = RemovalMark {
        seq: 10,
        sub: 1,
        user: Text::from("carol"),
        join: JoinPoint {
            epoch: 77,
            seq: 0,
            serial: 1,
        },
        reason: pabal_codec::LeftReason::Removed,
    };
    feed(
        &mut h,
        EngineEvent::Opened {
            room: room.clone(),
            epoch: 77,
            seq: 10,
            tail: Vec::new(),
            marks: vec![carol_removed],
        },
    );
    assert_eq!(fills_asked(&mut h), vec![1]);
    let stream: Vec<u64> = (2..=8).collect();
    let msgs = stream.iter().map(|&s| other(s, &format!("m{s}"))).collect();
    feed(&mut h, stream_page(&room, 1, msgs, Vec::new(), false));
    assert_eq!(
        fills_asked(&mut h),
        Vec::<u64>::new(),
        "nothing left to read"
    );
    let frames = h.frames(phone);
    assert_eq!(delivered(&frames).len(), 7, "2..=8: {frames:?}");
}
