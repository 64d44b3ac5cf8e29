//! Offline hand-off at the room's owner: one hand-off per member per window of messages the
//! member's connections did not acknowledge within the delay; none for a member that acks,
//! none for the publisher's own messages, none for channels by default.

use std::time::Duration;

use pabal_codec::Ack;

use super::*;
use crate::handoff::Handoff;

const DELAY: Duration = Duration::from_secs(10);

fn harness(tweak: impl FnOnce(&mut Config)) -> Harness {
    Harness::new(|c| {
        c.handoff.url = "http://127.0.0.1:9/hooks".into();
        c.handoff.secret = Some("handoff-secret-0123456789".into());
        c.handoff.delay = DELAY;
        tweak(c);
    })
}

fn handoffs(h: &mut Harness) -> Vec<(String, u64, u64, String)> {
    let mut out: Vec<Handoff> = Vec::new();
    h.core.drain_handoffs(|x| out.push(x));
    let mut v: Vec<_> = out
        .into_iter()
        .map(|x| {
            (
                x.user.to_string(),
                x.first_seq,
                x.last_seq,
                x.publisher.to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

fn ack(h: &mut Harness, token: Token, alias: u32, seq: u64) {
    h.send(token, &ClientFrame::Ack(Ack::from_pairs(&[(alias, seq)])));
}

fn windows(h: &Harness, room: &str) -> usize {
    h.core.owned[&room_named(room)]
        .state()
        .and_then(|s| s.handoffs.as_ref())
        .map_or(0, |w| w.len())
}

#[test]
fn an_offline_member_gets_exactly_one_handoff_per_window() {
    let mut h = harness(|_| {});
    let ann = h.connect("ann", ClientSession::new());
    let a = h.join(ann, "r");
    h.app_join("r", "bob"); // bob has no connection at all
    h.publish(ann, a, "m1");
    h.tick(Duration::from_secs(3));
    h.publish(ann, a, "m2");
    h.publish(ann, a, "m3");
    h.tick(DELAY - Duration::from_millis(1));
    assert_eq!(
        handoffs(&mut h),
        [],
        "not before the delay after the last message"
    );
    h.tick(Duration::from_millis(1));
    assert_eq!(
        handoffs(&mut h),
        [("bob".into(), 1, 3, "ann".into())],
        "one hand-off for the window, none for the publisher"
    );
    h.tick(DELAY * 3);
    assert_eq!(handoffs(&mut h), [], "a window is handed off once");
    assert_eq!(windows(&h, "r"), 0);
    assert!(
        h.core.owned[&room_named("r")]
            .state()
            .is_none_or(|s| s.handoffs.is_none())
    );
    // The next message opens the next window.
    h.publish(ann, a, "m4");
    h.tick(DELAY);
    assert_eq!(handoffs(&mut h), [("bob".into(), 4, 4, "ann".into())]);
    assert_eq!(h.stats.handoffs_detected.load(Ordering::Relaxed), 2);
}

#[test]
fn a_member_that_acks_in_time_gets_none_and_one_that_does_not_gets_one() {
    let mut h = harness(|_| {});
    let ann = h.connect("ann", ClientSession::new());
    let a = h.join(ann, "r");
    let bob = h.connect("bob", ClientSession::new());
    let b = h.join(bob, "r");
    let cy = h.connect("cy", ClientSession::new());
    h.join(cy, "r");
    h.publish(ann, a, "m1");
    h.publish(ann, a, "m2");
    assert_eq!(h.messages(bob).len(), 2);
    assert_eq!(h.messages(cy).len(), 2, "cy receives but never acks");
    h.tick(Duration::from_secs(1));
    ack(&mut h, bob, b, 2);
    h.tick(DELAY);
    assert_eq!(handoffs(&mut h), [("cy".into(), 1, 2, "ann".into())]);
}

#[test]
fn a_member_who_acked_part_of_a_window_is_handed_off_the_rest() {
    let mut h = harness(|_| {});
    let ann = h.connect("ann", ClientSession::new());
    let a = h.join(ann, "r");
    let bob = h.connect("bob", ClientSession::new());
    let b = h.join(bob, "r");
    for body in ["m1", "m2", "m3"] {
        h.publish(ann, a, body);
    }
    ack(&mut h, bob, b, 1);
    h.publish(bob, b, "from bob");
    h.tick(DELAY);
    assert_eq!(
        handoffs(&mut h),
        [
            // Ann acked nothing: her range starts at the window's first message (her own;
            // the range is what she has not acknowledged), and ends with bob's.
            ("ann".into(), 1, 4, "bob".into()),
            ("bob".into(), 2, 3, "ann".into()),
        ],
        "bob's own message is not handed off to him"
    );
}

#[test]
fn a_member_who_joined_mid_window_is_owed_only_what_came_after() {
    let mut h = harness(|_| {});
    let ann = h.connect("ann", ClientSession::new());
    let a = h.join(ann, "r");
    h.publish(ann, a, "m1");
    h.publish(ann, a, "m2");
    h.app_join("r", "dee");
    h.publish(ann, a, "m3");
    h.tick(DELAY);
    assert_eq!(handoffs(&mut h), [("dee".into(), 3, 3, "ann".into())]);
}

#[test]
fn channels_and_rooms_ruled_off_fire_none_and_a_rule_sets_its_own_delay() {
    let mut h = harness(|c| {
        c.handoff.rooms = vec![
            crate::config::HandoffRule {
                prefix: "open:".into(),
                enabled: false,
                delay: None,
            },
            crate::config::HandoffRule {
                prefix: "dm:".into(),
                enabled: true,
                delay: Some(Duration::from_secs(2)),
            },
        ];
    });
    let ann = h.connect("ann", ClientSession::new());
    h.app_join("open:1", "bob");
    h.app_join("dm:1", "bob");
    let open = h.join(ann, "open:1");
    let dm = h.join(ann, "dm:1");
    h.publish(ann, open, "hi all");
    h.publish(ann, dm, "hi bob");
    assert_eq!(windows(&h, "open:1"), 0, "ruled off: no window at all");
    h.tick(Duration::from_secs(2));
    assert_eq!(handoffs(&mut h), [("bob".into(), 1, 1, "ann".into())]);
    h.tick(DELAY);
    assert_eq!(handoffs(&mut h), []);
    // A channel: its publisher is the app server; subscribers are never handed off.
    h.core.handle(
        h.now,
        vec![CoreMsg::Join {
            room: RoomName::new(true, Text::from("brand:acme")),
            user: Text::from("bob").into(),
            unblock: false,
            requester: None,
        }],
    );
    let brand = RoomName::new(true, Text::from("brand:acme"));
    h.core
        .accept_publish(
            brand.clone(),
            None,
            Text::from("acme").into(),
            Bytes::from_static(b"sale"),
            None,
        )
        .unwrap();
    assert!(
        h.core.owned[&brand]
            .state()
            .is_none_or(|s| s.handoffs.is_none())
    );
    h.tick(DELAY * 2);
    assert_eq!(handoffs(&mut h), []);
}

#[test]
fn a_busy_room_holds_at_most_three_windows() {
    let mut h = harness(|_| {});
    let ann = h.connect("ann", ClientSession::new());
    let a = h.join(ann, "r");
    h.app_join("r", "bob");
    let mut handed = Vec::new();
    // A message every 500 ms for 100 s: 200 messages, bob offline throughout.
    for _ in 0..200 {
        h.publish(ann, a, "m");
        assert!(windows(&h, "r") <= 3, "{} windows", windows(&h, "r"));
        h.tick(Duration::from_millis(500));
        handed.extend(handoffs(&mut h));
    }
    h.tick(DELAY * 2);
    handed.extend(handoffs(&mut h));
    // One hand-off per window of DELAY: every message covered once, in order, no overlap.
    assert_eq!(handed.len(), 10, "{handed:?}");
    let mut next = 1;
    for (user, first, last, _) in &handed {
        assert_eq!(user, "bob");
        assert_eq!(*first, next);
        next = last + 1;
    }
    assert_eq!(next, 201);
}

#[test]
fn nothing_is_tracked_while_handoff_is_off() {
    let mut h = Harness::new(|_| {});
    let ann = h.connect("ann", ClientSession::new());
    let a = h.join(ann, "r");
    h.app_join("r", "bob");
    h.publish(ann, a, "m1");
    assert!(
        h.core.owned[&room_named("r")]
            .state()
            .is_none_or(|s| s.handoffs.is_none())
    );
    h.tick(DELAY * 2);
    assert_eq!(handoffs(&mut h), []);
}
