//! A cluster node's removals in their rooms' order (`core/cluster.rs`): a removal the
//! room's channel or stream places after message `n` unbinds the user's phones before
//! message `n + 1` reaches them, and a read or notice older than it does not bring the
//! membership back.

use super::cluster::{ann_and_bob, engine_cmds, feed, hear, other, stream_page};
use super::*;
use crate::cluster::{EngineCmd, EngineEvent, RemovalMark};
use crate::directory::JoinPoint;
use crate::ids::RoomName;

/// bob's membership of `room` as this node's directory holds it.
fn bobs_join(h: &Harness, room: &RoomName) -> JoinPoint {
    h.core.directory.join_point("bob", room).unwrap()
}

/// bob's removal placed after message `seq` (the `sub`-th there).
fn bob_removed(join: JoinPoint, seq: u64, sub: u64) -> RemovalMark {
    RemovalMark {
        seq,
        sub,
        user: Text::from("bob"),
        join,
        reason: LeftReason::Removed,
    }
}

/// A later membership of bob's than `first` (a room numbers its memberships in order).
fn later_than(first: JoinPoint) -> JoinPoint {
    JoinPoint {
        seq: 5,
        serial: first.serial + 10,
        ..first
    }
}

/// bob's `notice`, heard on his user channel.
fn bobs_notice(h: &mut Harness, notice: crate::cluster::membership::Notice) {
    let user = Text::from("bob");
    feed(h, EngineEvent::Notice { user, notice });
}

fn removal(h: &mut Harness, room: &RoomName, mark: RemovalMark) {
    let room = room.clone();
    feed(
        h,
        EngineEvent::Removal {
            room,
            epoch: 77,
            mark,
        },
    );
}

/// The LEFT reasons among `events`.
fn lefts(events: &[Event]) -> Vec<LeftReason> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Left { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect()
}

/// bob's phone got the messages `seqs` (nothing published after his removal), then LEFT.
fn removed_after(h: &mut Harness, bob: Token, got: &[u64]) {
    let events = h.events(bob);
    assert_eq!(seqs(&events), got, "nothing published after the removal");
    assert_eq!(lefts(&events), vec![LeftReason::Removed]);
}

/// The one stream read the worker asks for: where it starts, `(after, sub)`.
fn fill_asked(h: &mut Harness) -> (u64, u64) {
    match engine_cmds(h).as_slice() {
        [EngineCmd::Fill { after, sub, .. }] => (*after, *sub),
        other => panic!("one stream read, not {other:?}"),
    }
}

fn seqs(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message { seq, .. } => *seq,
            _ => None,
        })
        .collect()
}

/// ann and bob in `dm`; message 1, then bob's removal after it, come over the channel.
fn bob_removed_after_one() -> (Harness, Token, Token, RoomName, JoinPoint) {
    let (mut h, ann, bob, room, _) = ann_and_bob(ClientSession::new());
    let join = bobs_join(&h, &room);
    hear(&mut h, &room, other(1, "one"));
    removal(&mut h, &room, bob_removed(join, 1, 1));
    (h, ann, bob, room, join)
}

#[test]
fn a_removal_unbinds_the_user_between_the_message_before_it_and_the_one_after() {
    let (mut h, ann, bob, room, _) = bob_removed_after_one();
    hear(&mut h, &room, other(2, "two"));
    removed_after(&mut h, bob, &[1]);
    assert_eq!(seqs(&h.events(ann)), vec![1, 2]);
    assert_eq!(h.core.directory.join_point("bob", &room), None);
    assert!(engine_cmds(&mut h).is_empty(), "no hole: nothing to read");
}

#[test]
fn a_removal_heard_before_the_message_it_follows_waits_for_it() {
    let (mut h, _ann, bob, room, _) = ann_and_bob(ClientSession::new());
    let join = bobs_join(&h, &room);
    // The removal after 1 reveals that 1 is missing: the stream is read, and what the
    // channel brings meanwhile waits for it. The read ran before the removal was placed
    // (its answer shows 1 alone): the removal heard is applied once 1 is appended, before
    // 2 waiting behind it.
    removal(&mut h, &room, bob_removed(join, 1, 1));
    assert!(h.events(bob).is_empty(), "applied only after message 1");
    assert_eq!(fill_asked(&mut h), (0, 0));
    hear(&mut h, &room, other(2, "two"));
    feed(
        &mut h,
        stream_page(&room, 0, vec![other(1, "one")], Vec::new(), false),
    );
    removed_after(&mut h, bob, &[1]);
}

#[test]
fn while_the_stream_is_read_page_by_page_the_channel_waits_for_the_last_page() {
    let (mut h, _ann, bob, room, _) = ann_and_bob(ClientSession::new());
    let join = bobs_join(&h, &room);
    hear(&mut h, &room, other(1, "one"));
    assert_eq!(seqs(&h.events(bob)), vec![1]);
    // The pub/sub connection came back: the stream after the head is read. 2 comes on the
    // new subscription, but bob's removal after 1 was published while the connection was
    // down: 2 waits for the stream, whose first page (full) holds another removal there.
    feed(&mut h, EngineEvent::Resubscribed { room: room.clone() });
    assert_eq!(fill_asked(&mut h), (1, 0));
    hear(&mut h, &room, other(2, "two"));
    assert!(h.events(bob).is_empty(), "2 waits for the stream");
    let dave = RemovalMark {
        user: Text::from("dave"),
        ..bob_removed(join, 1, 1)
    };
    let page = |msgs, marks, full| stream_page(&room, 1, msgs, marks, full);
    feed(&mut h, page(Vec::new(), vec![dave], true));
    assert_eq!(
        fill_asked(&mut h),
        (1, 1),
        "the next page, after the removal read"
    );
    assert!(
        h.events(bob).is_empty(),
        "2 waits for the rest of the stream"
    );
    let rest = vec![bob_removed(join, 1, 2)];
    feed(&mut h, page(vec![other(2, "two")], rest, false));
    removed_after(&mut h, bob, &[]);
}

#[test]
fn an_answer_that_came_without_its_copy_enters_from_the_stream() {
    let (mut h, ann, bob, room, a) = ann_and_bob(ClientSession::new());
    let join = bobs_join(&h, &room);
    h.publish(ann, a, "mine");
    let Some(EngineCmd::Publish(req)) = engine_cmds(&mut h).pop() else {
        panic!("a publish for the engine");
    };
    // Its copy did not come in time (the pub/sub connection was lost): the PUBACK goes,
    // the message waits for the stream, where a removal of bob comes before it.
    feed(
        &mut h,
        EngineEvent::Published {
            ticket: req.ticket,
            epoch: 77,
            seq: 1,
            repeated: false,
            ordered: false,
        },
    );
    assert!(
        matches!(h.events(ann).as_slice(), [Event::PubAck { seq: 1, .. }]),
        "the PUBACK at once"
    );
    assert!(h.events(bob).is_empty());
    assert_eq!(fill_asked(&mut h).0, 0);
    let mut mine = other(1, "mine");
    mine.ticket = Some(req.ticket);
    feed(
        &mut h,
        stream_page(&room, 0, vec![mine], vec![bob_removed(join, 0, 1)], false),
    );
    removed_after(&mut h, bob, &[]);
    assert!(h.events(ann).is_empty(), "not sent her own message");
    assert_eq!(h.core.owned[&room].head, 1);
}

#[test]
fn a_read_or_notice_older_than_a_removal_does_not_bring_the_membership_back() {
    use crate::cluster::membership::{Notice, UserRooms};
    let (mut h, _ann, bob, room, join) = bob_removed_after_one();
    assert_eq!(lefts(&h.events(bob)), vec![LeftReason::Removed]);
    // A read of bob's rooms that ran before the removal reached his side in Redis, and the
    // notice of the join it ended, heard late: neither binds the room again.
    let rooms = UserRooms {
        rooms: vec![(room.clone(), join)],
        blocks: Vec::new(),
    };
    let user = Text::from("bob");
    feed(
        &mut h,
        EngineEvent::UserLoaded {
            user: user.clone(),
            rooms,
        },
    );
    let notice = Notice::Joined {
        room: room.clone(),
        join,
    };
    feed(&mut h, EngineEvent::Notice { user, notice });
    hear(&mut h, &room, other(2, "two"));
    assert!(h.events(bob).is_empty(), "not bound again");
    assert_eq!(h.core.directory.join_point("bob", &room), None);
    assert!(h.phones[&bob].session.alias_of("dm").is_none());
}

/// Two workers of one node watch bob and share the node's directory, each hearing his
/// notices on its own pub/sub connection. One applies that his membership ended and a later
/// one began; the other, lagging, hears the first membership's JOINED only then. Applied,
/// it ended the later membership and bound the room again from the earlier join point (or,
/// with no later one, brought the ended membership back). Found by the cluster simulation
/// (seed 447065).
#[test]
fn a_join_notice_heard_late_neither_revives_its_ended_membership_nor_ends_a_later_one() {
    use crate::cluster::membership::Notice;
    let (mut h, _ann, bob, room, _) = ann_and_bob(ClientSession::new());
    let first = bobs_join(&h, &room);
    let notice = bobs_notice;
    let joined = |join| Notice::Joined {
        room: room.clone(),
        join,
    };
    let left = Notice::Left {
        room: room.clone(),
        join: first,
        reason: LeftReason::Removed,
        blocked: false,
    };
    notice(&mut h, left);
    assert_eq!(lefts(&h.events(bob)), vec![LeftReason::Removed]);
    notice(&mut h, joined(first));
    assert_eq!(h.core.directory.join_point("bob", &room), None);
    assert!(h.events(bob).is_empty(), "the ended membership stays ended");
    let later = later_than(first);
    notice(&mut h, joined(later));
    assert!(h.phones[&bob].session.alias_of("dm").is_some());
    h.events(bob);
    notice(&mut h, joined(first));
    assert_eq!(h.core.directory.join_point("bob", &room), Some(later));
    assert!(
        lefts(&h.events(bob)).is_empty(),
        "the later membership stays"
    );
}

/// A read of bob's rooms shows a later membership before this worker heard any notice of
/// it: the earlier membership's JOINED, heard after the read, is older than what is in
/// force (a room numbers its memberships in order) and leaves it.
#[test]
fn a_join_notice_older_than_the_membership_in_force_leaves_it() {
    use crate::cluster::membership::{Notice, UserRooms};
    let (mut h, _ann, bob, room, _) = ann_and_bob(ClientSession::new());
    let first = bobs_join(&h, &room);
    let later = later_than(first);
    let rooms = UserRooms {
        rooms: vec![(room.clone(), later)],
        blocks: Vec::new(),
    };
    let user = Text::from("bob");
    feed(&mut h, EngineEvent::UserLoaded { user, rooms });
    assert_eq!(h.core.directory.join_point("bob", &room), Some(later));
    h.events(bob);
    let notice = Notice::Joined {
        room: room.clone(),
        join: first,
    };
    bobs_notice(&mut h, notice);
    assert_eq!(h.core.directory.join_point("bob", &room), Some(later));
    assert!(
        lefts(&h.events(bob)).is_empty(),
        "the later membership stays"
    );
}

/// A removal after 1 placed while the pub/sub connection was down (bob's, (1,1)), then
/// another right after it (dave's, (1,2)) heard on the new subscription while the stream is
/// read. The read brings both. The one heard was applied at once (1 is the head), and the
/// stream's earlier one was then passed over as if applied: bob got 2. Heard while the
/// stream is read, a removal now waits for the read. Found by review.
#[test]
fn a_removal_heard_while_the_stream_is_read_waits_for_an_earlier_one_it_brings() {
    let (mut h, _ann, bob, room, _) = ann_and_bob(ClientSession::new());
    let join = bobs_join(&h, &room);
    let dave = RemovalMark {
        user: Text::from("dave"),
        ..bob_removed(join, 1, 2)
    };
    hear(&mut h, &room, other(1, "one"));
    assert_eq!(seqs(&h.events(bob)), vec![1]);
    feed(&mut h, EngineEvent::Resubscribed { room: room.clone() });
    assert_eq!(fill_asked(&mut h), (1, 0));
    removal(&mut h, &room, dave.clone());
    let page = stream_page(
        &room,
        1,
        vec![other(2, "two")],
        vec![bob_removed(join, 1, 1), dave],
        false,
    );
    feed(&mut h, page);
    removed_after(&mut h, bob, &[]);
}

/// The same with 1 not here yet: dave's removal after 1 is heard and held, and the read
/// brings 1, bob's removal and dave's. Applying the held one when 1 was appended passed
/// over bob's. Found by review.
#[test]
fn a_held_removal_waits_for_an_earlier_one_the_stream_brings_at_the_same_message() {
    let (mut h, _ann, bob, room, _) = ann_and_bob(ClientSession::new());
    let join = bobs_join(&h, &room);
    let dave = RemovalMark {
        user: Text::from("dave"),
        ..bob_removed(join, 1, 2)
    };
    feed(&mut h, EngineEvent::Resubscribed { room: room.clone() });
    assert_eq!(fill_asked(&mut h), (0, 0));
    removal(&mut h, &room, dave.clone());
    let page = stream_page(
        &room,
        0,
        vec![other(1, "one")],
        vec![bob_removed(join, 1, 1), dave],
        false,
    );
    feed(&mut h, page);
    hear(&mut h, &room, other(2, "two"));
    removed_after(&mut h, bob, &[1]);
}

/// A removal heard while a read is out, placed after the head's message and not in the
/// read (it was placed after the read ran): applied once the read is complete, before the
/// message after it.
#[test]
fn a_removal_heard_while_the_stream_is_read_is_applied_when_the_read_completes() {
    let (mut h, _ann, bob, room, _) = ann_and_bob(ClientSession::new());
    let join = bobs_join(&h, &room);
    hear(&mut h, &room, other(1, "one"));
    assert_eq!(seqs(&h.events(bob)), vec![1]);
    feed(&mut h, EngineEvent::Resubscribed { room: room.clone() });
    assert_eq!(fill_asked(&mut h), (1, 0));
    removal(&mut h, &room, bob_removed(join, 1, 1));
    assert!(h.events(bob).is_empty(), "waits for the read");
    hear(&mut h, &room, other(2, "two"));
    let page = stream_page(&room, 1, Vec::new(), Vec::new(), false);
    feed(&mut h, page);
    removed_after(&mut h, bob, &[]);
}

/// A removal heard while the stream is read page by page waits past a full page, whose
/// next page may hold an earlier one at the same message: erin's removal (1,1) fills the
/// first page, dave's (1,3) is heard meanwhile, and bob's (1,2) is in the second page.
#[test]
fn a_removal_heard_while_the_stream_is_read_waits_past_a_full_page() {
    let (mut h, _ann, bob, room, _) = ann_and_bob(ClientSession::new());
    let join = bobs_join(&h, &room);
    let someone = |user: &str, sub| RemovalMark {
        user: Text::from(user),
        ..bob_removed(join, 1, sub)
    };
    hear(&mut h, &room, other(1, "one"));
    assert_eq!(seqs(&h.events(bob)), vec![1]);
    feed(&mut h, EngineEvent::Resubscribed { room: room.clone() });
    assert_eq!(fill_asked(&mut h), (1, 0));
    removal(&mut h, &room, someone("dave", 3));
    let page = |msgs, marks, full| stream_page(&room, 1, msgs, marks, full);
    feed(&mut h, page(Vec::new(), vec![someone("erin", 1)], true));
    assert_eq!(fill_asked(&mut h), (1, 1));
    let rest = vec![bob_removed(join, 1, 2), someone("dave", 3)];
    feed(&mut h, page(vec![other(2, "two")], rest, false));
    removed_after(&mut h, bob, &[]);
}
