//! Receipts at the core: delivered markers from ACKs (coalesced per (room, user) per tick,
//! monotonic, members only, never past the room's head).

use std::sync::atomic::Ordering;

use pabal_codec::Ack;

use super::*;

fn ack(h: &mut Harness, token: Token, alias: u32, seq: u64) {
    h.send(token, &ClientFrame::Ack(Ack::from_pairs(&[(alias, seq)])));
}

/// Ann with two phones in room `r`, Bob publishing three messages there.
fn two_devices(h: &mut Harness) -> (Token, u32, Token, u32, Token) {
    let phone = h.connect("ann", ClientSession::new());
    let tablet = h.connect("ann", ClientSession::new());
    let a1 = h.join(phone, "r");
    let a2 = h.join(tablet, "r");
    let bob = h.connect("bob", ClientSession::new());
    let b = h.join(bob, "r");
    for body in ["m1", "m2", "m3"] {
        h.publish(bob, b, body);
    }
    assert_eq!(h.messages(phone).len(), 3);
    assert_eq!(h.messages(tablet).len(), 3);
    (phone, a1, tablet, a2, bob)
}

fn delivered(h: &Harness, user: &str) -> u64 {
    h.core.delivered_up_to(&room_named("r"), user)
}

#[test]
fn acks_of_any_device_move_the_users_delivered_marker_forward_only() {
    let mut h = Harness::new(|_| {});
    let (phone, a1, tablet, a2, _) = two_devices(&mut h);
    assert_eq!(delivered(&h, "ann"), 0);
    ack(&mut h, phone, a1, 2);
    assert_eq!(delivered(&h, "ann"), 2);
    ack(&mut h, tablet, a2, 1);
    assert_eq!(
        delivered(&h, "ann"),
        2,
        "a lower ACK of another device moved it back"
    );
    ack(&mut h, tablet, a2, 3);
    assert_eq!(delivered(&h, "ann"), 3);
    assert_eq!(delivered(&h, "bob"), 0, "bob acknowledged nothing");
    assert_eq!(h.stats.markers_advanced.load(Ordering::Relaxed), 2);
}

#[test]
fn acks_within_one_tick_reach_the_owner_as_one_update_per_room_and_user() {
    let mut h = Harness::new(|_| {});
    let (phone, a1, tablet, a2, _) = two_devices(&mut h);
    // Four ACKs from two connections of one user, read in one tick, before any flush.
    for (token, alias, seq) in [
        (phone, a1, 1),
        (phone, a1, 2),
        (tablet, a2, 1),
        (tablet, a2, 3),
    ] {
        let mut bytes = BytesMut::new();
        ClientFrame::Ack(Ack::from_pairs(&[(alias, seq)])).encode(&mut bytes);
        h.core.on_bytes(h.now, token, &bytes);
    }
    h.core.send_pending_markers();
    let updates: Vec<Vec<(String, u64)>> = h.core.outbox[0]
        .iter()
        .filter_map(|m| match m {
            CoreMsg::Markers(updates) => Some(
                updates
                    .iter()
                    .map(|u| (u.user.to_string(), u.marker.delivered))
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    assert_eq!(
        updates,
        vec![vec![("ann".to_string(), 3)]],
        "one message, one update"
    );
    h.pump();
    assert_eq!(delivered(&h, "ann"), 3);
    assert_eq!(h.stats.markers_advanced.load(Ordering::Relaxed), 1);
}

#[test]
fn marker_updates_carry_the_users_handle_not_a_copy_of_the_name() {
    // An ACK's and a READ's update to the owner named the user with a `Text` taken out of
    // the name's record: the first such clone made the name's buffer shared (a 24-byte
    // header per connected user, kept as long as the user stayed). They carry the
    // connection's handle: a reference count, no copy, no header.
    let mut h = Harness::new(|_| {});
    let (phone, a1, _, _, _) = two_devices(&mut h);
    let handle = h.core.conn(phone).unwrap().user.clone().unwrap();
    for frame in [
        ClientFrame::Ack(Ack::from_pairs(&[(a1, 2)])),
        ClientFrame::Read(pabal_codec::Read { alias: a1, seq: 1 }),
    ] {
        let mut bytes = BytesMut::new();
        frame.encode(&mut bytes);
        h.core.on_bytes(h.now, phone, &bytes);
        h.core.send_pending_markers();
        let updates: Vec<&crate::mesh::MarkerUpdate> = h.core.outbox[0]
            .iter()
            .filter_map(|m| match m {
                CoreMsg::Markers(updates) => Some(updates.iter()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(updates.len(), 1, "{frame:?}");
        assert!(
            updates[0].user.same_record(&handle),
            "{frame:?}: the update carries another record of the name"
        );
        h.pump();
    }
    assert_eq!(delivered(&h, "ann"), 2);
}

#[test]
fn markers_are_kept_for_members_only_never_past_the_head_and_forgotten_on_leave() {
    let mut h = Harness::new(|_| {});
    let (phone, a1, _, _, _) = two_devices(&mut h);
    let room = room_named("r");
    let epoch = h.core.owned[&room].epoch;
    let update = |user: &str, epoch: u64, delivered: u64, read: u64| {
        CoreMsg::Markers(vec![crate::mesh::MarkerUpdate {
            room: room.clone(),
            user: user.into(),
            epoch,
            marker: Marker { delivered, read },
        }])
    };
    // Past the head (3): clamped to it; read implies delivered.
    h.core.handle(h.now, vec![update("bob", epoch, 1000, 2)]);
    let bob = |h: &Harness| {
        let m = h.core.markers(&room_named("r"), "bob");
        (m.delivered, m.read)
    };
    assert_eq!(bob(&h), (3, 2));
    h.core.handle(h.now, vec![update("bob", epoch, 0, 3)]);
    assert_eq!(bob(&h), (3, 3));
    // Not a member: nothing is kept.
    h.core.handle(h.now, vec![update("eve", epoch, 2, 0)]);
    assert_eq!(h.core.markers(&room, "eve"), Marker::default());
    // Another stream of the room: not this one's sequences.
    h.core.handle(h.now, vec![update("ann", epoch + 1, 2, 0)]);
    assert_eq!(delivered(&h, "ann"), 0);
    ack(&mut h, phone, a1, 3);
    assert_eq!(delivered(&h, "ann"), 3);
    assert_eq!(
        h.core.owned[&room]
            .state()
            .unwrap()
            .receipts
            .as_ref()
            .unwrap()
            .len(),
        2
    );
    h.app_remove("r", "ann");
    assert_eq!(delivered(&h, "ann"), 0, "a former member's marker is kept");
    h.app_remove("r", "bob");
    assert!(
        h.core.owned[&room]
            .state()
            .is_none_or(|s| s.receipts.is_none()),
        "a room whose members have no markers still holds their record"
    );
}

/// The RECEIPT updates a phone got: (member, delivered, read) per entry.
fn receipts(h: &mut Harness, token: Token) -> Vec<Vec<(String, u64, u64)>> {
    h.events(token)
        .into_iter()
        .filter_map(|e| match e {
            Event::Receipt { members, .. } => Some(
                members
                    .into_iter()
                    .map(|m| (m.user.to_string(), m.delivered, m.read))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

#[test]
fn members_get_one_receipt_per_interval_with_the_markers_that_moved() {
    let mut h = Harness::new(|c| c.receipts.interval = Duration::from_secs(1));
    let (phone, a1, tablet, a2, bob) = two_devices(&mut h);
    // No ACK or READ yet: no marker moved, nothing is sent.
    h.tick(Duration::from_secs(2));
    assert!(receipts(&mut h, bob).is_empty());
    ack(&mut h, phone, a1, 1);
    ack(&mut h, phone, a1, 2);
    h.send(
        tablet,
        &ClientFrame::Read(pabal_codec::Read { alias: a2, seq: 1 }),
    );
    assert!(
        receipts(&mut h, bob).is_empty(),
        "a receipt went out before the interval"
    );
    h.tick(Duration::from_secs(1));
    let expected = vec![vec![("ann".to_string(), 2, 1)]];
    assert_eq!(receipts(&mut h, bob), expected, "three moves, one update");
    assert_eq!(
        receipts(&mut h, phone),
        expected,
        "the user's own devices hear too"
    );
    assert_eq!(receipts(&mut h, tablet), expected);
    // Read moves delivered along; a READ past what was sent counts up to it.
    h.send(
        tablet,
        &ClientFrame::Read(pabal_codec::Read { alias: a2, seq: 99 }),
    );
    h.tick(Duration::from_secs(1));
    assert_eq!(receipts(&mut h, bob), vec![vec![("ann".to_string(), 3, 3)]]);
    let room = room_named("r");
    assert_eq!(
        h.core.markers(&room, "ann"),
        Marker {
            delivered: 3,
            read: 3
        }
    );
    // Nothing moved: nothing more.
    h.tick(Duration::from_secs(5));
    assert!(receipts(&mut h, bob).is_empty());
}

#[test]
fn a_version_2_session_gets_no_receipt_and_may_not_send_read() {
    let mut h = Harness::new(|c| c.receipts.interval = Duration::from_secs(1));
    let (phone, a1, _, _, _) = two_devices(&mut h);
    let mut old = ClientSession::new();
    assert!(old.refused_version());
    let dan = h.connect("dan", old);
    h.app_join("r", "dan");
    let d = h.phones[&dan].session.alias_of("r").unwrap();
    h.events(dan);
    ack(&mut h, phone, a1, 3);
    h.tick(Duration::from_secs(1));
    assert!(receipts(&mut h, dan).is_empty());
    // READ is an unknown frame type before version 3, as it always was.
    h.send(
        dan,
        &ClientFrame::Read(pabal_codec::Read { alias: d, seq: 3 }),
    );
    let errors: Vec<_> = h
        .events(dan)
        .into_iter()
        .filter_map(|e| match e {
            Event::Error(e) => Some((e.code, e.fatal)),
            _ => None,
        })
        .collect();
    assert_eq!(errors, vec![(ErrorCode::UnknownFrameType, true)]);
    let dan = h.core.markers(&room_named("r"), "dan");
    assert_eq!(dan.read, 0);
}

#[test]
fn unread_counts_start_at_the_join_point_and_follow_the_read_marker() {
    let mut h = Harness::new(|c| c.receipts.interval = Duration::from_secs(1));
    let (phone, a1, _, _, bob) = two_devices(&mut h);
    let b = h.phones[&bob].session.alias_of("r").unwrap();
    // Dan joins after three messages: they were never his.
    h.app_join("r", "dan");
    h.publish(bob, b, "m4");
    let room = room_named("r");
    let unread = |h: &Harness, user: &str| -> Vec<(u64, u64, u64)> {
        h.core
            .unread_of(Text::from(user).as_str(), vec![room.clone()])
            .into_iter()
            .map(|u| (u.head, u.joined_at, u.unread))
            .collect()
    };
    assert_eq!(unread(&h, "dan"), vec![(4, 3, 1)]);
    assert_eq!(unread(&h, "ann"), vec![(4, 0, 4)]);
    h.send(
        phone,
        &ClientFrame::Read(pabal_codec::Read { alias: a1, seq: 3 }),
    );
    assert_eq!(unread(&h, "ann"), vec![(4, 0, 1)]);
    assert_eq!(unread(&h, "eve"), vec![], "not a member: no count");
    // The room's markers for the server API: every member, by user id.
    let r = h.core.receipts_of(&room).unwrap();
    let members: Vec<(String, u64, u64, u64)> = r
        .members
        .iter()
        .map(|(u, joined, m)| (u.to_string(), *joined, m.delivered, m.read))
        .collect();
    assert_eq!(
        members,
        vec![
            ("ann".to_string(), 0, 3, 3),
            ("bob".to_string(), 0, 0, 0),
            ("dan".to_string(), 3, 0, 0),
        ]
    );
}

#[test]
fn a_large_room_hears_read_moves_only_with_the_delivered_marker_alongside() {
    let mut h = Harness::new(|c| {
        c.receipts.interval = Duration::from_secs(1);
        c.receipts.delivered_max_members = 2;
    });
    // Three members (ann, bob, cat): above the limit.
    let (phone, a1, _, _, bob) = two_devices(&mut h);
    let cat = h.connect("cat", ClientSession::new());
    h.join(cat, "r");
    ack(&mut h, phone, a1, 3);
    h.tick(Duration::from_secs(1));
    assert!(
        receipts(&mut h, bob).is_empty(),
        "a delivered move went out"
    );
    assert_eq!(delivered(&h, "ann"), 3, "the marker is kept all the same");
    h.send(
        phone,
        &ClientFrame::Read(pabal_codec::Read { alias: a1, seq: 1 }),
    );
    h.tick(Duration::from_secs(1));
    assert_eq!(receipts(&mut h, bob), vec![vec![("ann".to_string(), 3, 1)]]);
}
