//! What an idle phone costs its worker: exact lists, compact records, and names shared
//! rather than copied (each guard fails if a representation grows back).

use super::*;

/// Ann and Bob, one connection each, both joined to room "dm"; each JOIN carries its own
/// copy of the name, sliced out of its frame.
fn two_phones_in_a_room(h: &mut Harness) -> (Token, Token) {
    let ann = h.connect("ann", ClientSession::new());
    let bob = h.connect("bob", ClientSession::new());
    h.join(ann, "dm");
    h.join(bob, "dm");
    h.events(ann);
    h.events(bob);
    (ann, bob)
}

#[test]
fn an_idle_phone_costs_its_worker_exact_lists_and_a_compact_room() {
    let mut h = Harness::new(|_| {});
    two_phones_in_a_room(&mut h);
    let dm = room_named("dm");
    // One connection of a user, its token in the map's bucket (a one-token vector was a
    // heap block of its own), no list of further ones; two subscribers of a 1:1 room: no
    // spare slots (a vector's doubling gave four).
    assert_eq!(h.core.users.tokens("ann").len(), 1);
    assert_eq!(h.core.users.users_with_more(), 0);
    assert_eq!(h.core.local[&dm].capacity(), 2);
    // A room made by a join has its member at once: it is never queued for an eviction
    // check (each entry was 64 bytes, one per two phones).
    assert!(h.core.idle_rooms.is_empty());
    let owned = &h.core.owned[&dm];
    assert_eq!(owned.members.len(), 2);
    assert!(owned.members.contains("bob"));
    // The room record each owned room costs (one per two phones in 1:1 chats); it was 192
    // bytes with a hash set of members, 168 with a member vector, 184 with receipts'
    // markers and hand-off windows, 80 with its history and every rarely used part in one
    // box made on first use (`RoomState`) and its members an exact boxed slice.
    // Its per-worker interest counts inline (a vector was a heap block per room).
    assert!(matches!(
        owned.interest,
        super::owner::Interest::Inline { len: 1, .. }
    ));
    assert_eq!(owned.interest, vec![2]);
    assert_eq!(
        super::owner::Interest::new(6).len(),
        6,
        "past four workers, boxed"
    );
    let record = std::mem::size_of::<super::owner::OwnedRoom>();
    assert!(record <= 80, "the owned room record grew to {record} bytes");
    // An idle room that never had a message holds nothing beyond its record: no history,
    // no windows, no markers (104 bytes of the record held them, empty).
    assert!(owned.state().is_none(), "an idle room made its state box");
    assert!(owned.history().is_empty());
    // And the owner's map holds it boxed: its spare buckets (up to half the map) cost a
    // pointer each, not a record.
    fn value_bytes<K, V>(_: &HashMap<K, V>) -> usize {
        std::mem::size_of::<V>()
    }
    assert_eq!(value_bytes(&h.core.owned), 8);
    // Each connection's deadline in the timer heap: ms since the clock's base and the
    // token (an `Instant` made it 24 bytes).
    fn entry_bytes<T: Ord>(_: &std::collections::BinaryHeap<T>) -> usize {
        std::mem::size_of::<T>()
    }
    assert_eq!(entry_bytes(&h.core.timers), 16);
}

#[test]
fn a_rooms_name_is_one_record_shared_by_its_owner_the_directory_the_worker_and_bindings() {
    // A room's name was a 48-byte value (id, kind, a 32-byte `Text`) copied into the
    // directory, the owner's map, the worker's subscriber lists and every binding; it is an
    // 8-byte handle to one shared record now.
    assert_eq!(std::mem::size_of::<RoomName>(), 8);
    let mut h = Harness::new(|_| {});
    let (ann, bob) = two_phones_in_a_room(&mut h);
    let dm = room_named("dm");
    let (owners, _) = h.core.owned.get_key_value(&dm).unwrap();
    let owners = owners.clone();
    assert!(!owners.same_record(&dm), "a lookup key is another record");
    let (local, _) = h.core.local.get_key_value(&dm).unwrap();
    assert!(
        local.same_record(&owners),
        "the worker's list shares the owner's name"
    );
    for token in [ann, bob] {
        let conn = h.core.conn(token).unwrap();
        let sub = conn.subs[0].as_ref().unwrap();
        assert_eq!(sub.room, dm);
        assert!(
            sub.room.same_record(&owners),
            "a binding shares the owner's name"
        );
    }
    for user in ["ann", "bob"] {
        let user = Text::from(user);
        // What the directory holds for each member (a connect lists it; undone at once).
        let (_, rooms) = h
            .core
            .directory
            .connect(user.as_str(), 0, usize::MAX)
            .unwrap();
        h.core.directory.disconnect(user.as_str(), 0);
        assert_eq!(rooms.len(), 1);
        assert!(
            rooms[0].0.same_record(&owners),
            "the directory's entry for {user} shares the owner's name"
        );
    }
}

#[test]
fn a_users_name_is_one_record_shared_by_the_connection_the_worker_the_directory_and_rooms() {
    // A user's name was a 32-byte `Text` in the connection's record, the worker's user map,
    // the directory's key and every member set (about 150 bytes per idle phone); it is an
    // 8-byte handle to one record now, the directory's.
    assert_eq!(std::mem::size_of::<Option<crate::ids::UserName>>(), 8);
    let mut h = Harness::new(|_| {});
    let (ann, bob) = two_phones_in_a_room(&mut h);
    let dm = room_named("dm");
    for (token, name) in [(ann, "ann"), (bob, "bob")] {
        let name = Text::from(name);
        let user = h.core.conn(token).unwrap().user.clone().unwrap();
        assert_eq!(user, name);
        let key = h.core.users.handle(name.as_str()).unwrap();
        assert!(
            key.same_record(&user),
            "the worker's map shares {name}'s record"
        );
        assert_eq!(h.core.users.tokens(name.as_str()), [token]);
        let super::members::MemberSet::Few(members) = &h.core.owned[&dm].members else {
            panic!("a 1:1 room's members are a vector");
        };
        let member = members.iter().find(|m| **m == name).unwrap();
        assert!(
            member.same_record(&user),
            "the room's member set shares {name}'s record"
        );
        // The directory's: what it hands a join (undone at once) and a connection.
        let join = crate::directory::JoinPoint {
            epoch: 1,
            seq: 0,
            serial: 1,
        };
        let added = h
            .core
            .directory
            .add(name.as_str(), &room_named("other"), join, false);
        let added = added.unwrap();
        assert!(
            added.user.same_record(&user),
            "the directory keys {name} by the record"
        );
        h.core
            .directory
            .remove(name.as_str(), &room_named("other"), false);
    }
    // A second connection of ann's shares the record; the name stays the same user's.
    let again = h.connect("ann", ClientSession::new());
    let first = h.core.conn(ann).unwrap().user.clone().unwrap();
    let second = h.core.conn(again).unwrap().user.clone().unwrap();
    assert!(second.same_record(&first));
    assert_eq!(
        h.core.users.tokens("ann"),
        [ann, again],
        "one user, both connections"
    );
}

#[test]
fn a_connections_32_bit_stamps_keep_heartbeats_and_rate_limits_across_the_clocks_wrap() {
    // A connection's record keeps its times as 32-bit ms stamps from the worker's base
    // (4 bytes each instead of an `Instant`'s 16): they wrap every 49.7 days of uptime.
    let mut h = Harness::new(|c| {
        c.heartbeat.min_interval = Duration::from_secs(1);
        c.heartbeat.interval = Duration::from_secs(10);
        c.heartbeat.timeout = Duration::from_secs(5);
        c.limits.publish_rate = 1.0;
        c.limits.publish_burst = 2.0;
    });
    // Five seconds before the stamps wrap.
    h.now += Duration::from_millis((1 << 32) - 5_000);
    let quiet = h.connect("quiet", ClientSession::new());
    let talker = h.connect("talker", ClientSession::new());
    let alias = h.join(talker, "r");
    h.events(quiet);
    // Publishes three at once: how many of them the rate limit refused so far.
    let three = |h: &mut Harness| {
        h.events(talker);
        for body in ["m1", "m2", "m3"] {
            h.publish(talker, alias, body);
        }
        h.stats.rate_limited.load(Ordering::Relaxed)
    };
    assert_eq!(three(&mut h), 1, "burst of 2");
    // Across the wrap: the heartbeat is due an interval after the last byte, not 49 days.
    h.tick(Duration::from_secs(9));
    assert!(h.events(quiet).is_empty(), "pinged before the interval");
    h.tick(Duration::from_secs(2));
    assert!(matches!(h.events(quiet)[..], [Event::Ping(_)]));
    // The bucket refilled by the time that passed across the wrap (and no more).
    assert_eq!(three(&mut h), 2, "refilled to the burst");
    h.tick(Duration::from_secs(6));
    let events = h.events(quiet);
    assert!(
        matches!(&events[..], [Event::GoAway(g)] if g.reason == pabal_codec::GoAwayReason::Timeout),
        "{events:?}"
    );
}

#[test]
fn a_users_connections_on_a_worker_are_one_token_in_the_bucket_and_more_in_a_list() {
    // The worker's map of first connections holds one entry per connected user: the
    // handle and a token (with a one-token-or-list enum it was 24 bytes).
    let mut conns = UserConns::default();
    assert_eq!(
        conns.first_entry_bytes(),
        16,
        "a handle and a token, no more"
    );
    let ann = crate::ids::UserName::from("ann");
    let bob = crate::ids::UserName::from("bob");
    conns.add(&ann, 7);
    conns.add(&bob, 8);
    assert_eq!(conns.users_with_more(), 0, "one connection each: no list");
    conns.add(&ann, 9);
    conns.add(&ann, 11);
    assert_eq!(conns.tokens("ann"), [7, 9, 11]);
    assert_eq!(conns.users_with_more(), 1);
    assert!(!conns.remove("ann", 9) && !conns.remove("ann", 4));
    assert_eq!(conns.tokens("ann"), [7, 11]);
    assert!(!conns.remove("ann", 7), "one left");
    assert_eq!(conns.tokens("ann"), [11], "the next one moved up");
    assert_eq!(
        conns.users_with_more(),
        0,
        "the list is gone with its last token"
    );
    assert!(!conns.remove("ann", 4), "another token leaves it alone");
    assert!(!conns.remove("eve", 4), "an unknown user too");
    assert!(conns.remove("ann", 11), "none left");
    assert!(!conns.contains("ann") && conns.tokens("ann").is_empty());
    assert!(conns.contains("bob"));
}

#[test]
fn a_rooms_state_box_is_made_by_its_first_message_and_dropped_when_emptied() {
    let mut h = Harness::new(|c| c.retention.max_age = Duration::from_secs(60));
    let (ann, bob) = two_phones_in_a_room(&mut h);
    let dm = room_named("dm");
    assert!(h.core.owned[&dm].state().is_none());
    h.publish(ann, 0, "hello");
    h.events(ann);
    h.events(bob);
    let owned = &h.core.owned[&dm];
    assert_eq!(owned.history().len(), 1, "the message is retained");
    assert_eq!(
        owned.history().first_seq(),
        Some(1),
        "in the state box made for it"
    );
    assert!(owned.state().is_some());
    // Both leave: the room is unused; once retention has dropped the message, the
    // eviction check finds nothing held and the room goes.
    h.app_remove("dm", "ann");
    h.app_remove("dm", "bob");
    h.tick(Duration::from_secs(120));
    assert!(
        !h.core.owned.contains_key(&dm),
        "the room whose history expired is evicted"
    );
}

#[test]
fn an_emptied_state_box_is_dropped_while_the_room_stays() {
    let mut h = Harness::new(|_| {});
    two_phones_in_a_room(&mut h);
    let dm = room_named("dm");
    let owned = h.core.owned.get_mut(&dm).unwrap();
    owned.state_mut();
    assert!(owned.state().is_some());
    owned.shed_empty_state();
    assert!(owned.state().is_none(), "an empty box is not kept");
    owned.state_mut().idempotency = Some(Box::default());
    owned.shed_empty_state();
    assert!(owned.state().is_some(), "a box holding a window stays");
}

#[test]
fn a_long_subscriber_list_grows_by_an_eighth_not_by_doubling() {
    // A channel's subscribers on a worker: doubling left 16,384 slots for 10,000 (26 bytes
    // per phone of spare capacity).
    let mut list = Vec::new();
    for i in 0..10_000u64 {
        super::push_compact(&mut list, (i, 0u32));
        if list.len() <= super::EXACT_LIST {
            assert_eq!(list.capacity(), list.len(), "a short list is exact");
        }
    }
    let spare = list.capacity() - list.len();
    assert!(
        spare <= list.len() / 8,
        "{spare} spare slots for {} entries",
        list.len()
    );
}

#[test]
fn the_workers_messages_carry_the_users_handle_not_a_text_of_it() {
    // A `Text` cloned out of the user's handle made the name's buffer shared: a 24-byte
    // header per connected user, for as long as the user stayed. The JOIN a SUBSCRIBE
    // sends, the owner's MEMBER JOINED and the binding's SUBSCRIBE carry the handle.
    let mut h = Harness::new(|_| {});
    let ann = h.connect("ann", ClientSession::new());
    h.events(ann);
    let handle = h.core.conn(ann).unwrap().user.clone().unwrap();
    h.core.on_subscribe(ann, false, Text::from("news"));
    let mut sent = std::mem::take(&mut h.core.outbox[0]);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let [msg] = &sent[..] else {
            panic!("one message at a time: {sent:?}")
        };
        let user = match msg {
            CoreMsg::Join { user, .. } => ("join", user),
            CoreMsg::MemberJoined { user, .. } => ("member joined", user),
            CoreMsg::Subscribe { user, .. } => ("subscribe", user),
            other => panic!("unexpected {other:?}"),
        };
        assert!(
            user.1.same_record(&handle),
            "{} carries another record",
            user.0
        );
        seen.push(user.0);
        h.core.handle(h.now, sent);
        sent = std::mem::take(&mut h.core.outbox[0]);
    }
    assert_eq!(seen, ["join", "member joined", "subscribe"]);
}

#[test]
fn a_room_frame_names_the_room_with_a_copy_not_a_clone_of_its_record() {
    // A clone of the room record's `Text` made the name's buffer shared: a 24-byte header
    // per 1:1 room for as long as the room lived. The record holds the bytes in a boxed
    // `str` now (nothing to share); the frame's `Text` is a copy.
    let mut h = Harness::new(|_| {});
    let (ann, _) = two_phones_in_a_room(&mut h);
    let conn = h.core.conn(ann).unwrap();
    let sub = conn.subs[0].as_ref().unwrap();
    let ServerFrame::Room(room) = super::delivery::room_frame(0, sub, 0) else {
        panic!("not a ROOM frame")
    };
    assert!(sub.room.name == room.name, "the frame names the room");
}

#[test]
fn the_timer_heap_holds_one_entry_per_phone_without_a_doubled_capacity() {
    let mut h = Harness::new(|_| {});
    let phones: Vec<Token> = (0..1_100)
        .map(|i| h.connect(&format!("p{i}"), ClientSession::new()))
        .collect();
    let (len, capacity) = (h.core.timers.len(), h.core.timers.capacity());
    assert!(len >= phones.len(), "one deadline per phone: {len}");
    // A doubling heap held 2,048 entries' room for 1,100 (16 bytes each).
    assert!(
        capacity <= len + len / 4 + TIMER_HEAP_STEP,
        "{capacity} entries' room for {len}"
    );
    // Most phones go; once their deadlines have passed the heap gives the room back.
    for &token in &phones[100..] {
        h.core.on_closed(h.now, token);
    }
    h.tick(Duration::from_secs(3600));
    let (len, capacity) = (h.core.timers.len(), h.core.timers.capacity());
    assert!(len <= 2 * 100, "only the phones left have deadlines: {len}");
    assert!(
        capacity <= len + len / 4 + TIMER_HEAP_STEP,
        "{capacity} entries' room for {len} after the storm"
    );
}

#[test]
fn an_idle_phone_holds_no_sender_table_until_its_first_delivery() {
    // The DELIVER state's sender table (a vector, its bound and hand: 32 bytes of every
    // record) is made on the first sender.
    let mut h = Harness::new(|_| {});
    let (ann, bob) = two_phones_in_a_room(&mut h);
    for token in [ann, bob] {
        assert!(!h.core.conn(token).unwrap().ctx.senders().is_made());
    }
    h.publish(ann, 0, "hi");
    let got = h.events(bob);
    assert!(
        got.iter().any(|e| matches!(e, Event::Message { .. })),
        "{got:?}"
    );
    assert!(h.core.conn(bob).unwrap().ctx.senders().is_made());
    assert!(
        !h.core.conn(ann).unwrap().ctx.senders().is_made(),
        "the publisher got a PUBACK, not a DELIVER"
    );
}

#[test]
fn a_messages_sender_is_the_publishers_name_record_in_history_and_sender_tables() {
    // A publish copied the user's name into a `Text` (a block per message, kept in
    // history, and a second one once a recipient's sender table shared it); the message
    // carries the connection's record now, and its entry is no larger.
    assert_eq!(std::mem::size_of::<crate::ids::Stored>(), 120);
    let mut h = Harness::new(|_| {});
    let (ann, bob) = two_phones_in_a_room(&mut h);
    h.publish(ann, 0, "hi");
    h.publish(ann, 0, "again");
    assert_eq!(h.messages(bob).len(), 2);
    let anns = h.core.conn(ann).unwrap().user.clone().unwrap();
    let dm = room_named("dm");
    let mut kept = Vec::new();
    h.core.owned[&dm]
        .history()
        .page(0, 2, usize::MAX, usize::MAX, &mut kept);
    assert_eq!(kept.len(), 2);
    for msg in &kept {
        assert!(
            matches!(&msg.sender, crate::sender_name::SenderName::User(u) if u.same_record(&anns)),
            "the sender was copied: {:?}",
            msg.sender
        );
    }
    // Bob's connection defined ann's alias once, with her record, and finds it by it.
    let mut ctx = h.core.conn(bob).unwrap().ctx.clone();
    let header = ctx.header(
        0,
        Some(3),
        2,
        &crate::sender_name::SenderName::User(anns),
        0,
        64,
    );
    assert!(
        header.new_sender.is_none(),
        "ann's alias is defined already"
    );
}

#[test]
fn a_connection_id_is_given_at_welcome_not_kept_from_the_accept() {
    // The record keeps no id: WELCOME's is the worker's next, so a connection that never
    // says HELLO takes none, and ids stay distinct.
    let mut h = Harness::new(|_| {});
    let welcome_id = |h: &mut Harness, user: &str| {
        let token = h.connect_forged(user, &[]);
        match h.frames(token).first() {
            Some(ServerFrame::Welcome(w)) => w.conn_id,
            other => panic!("no WELCOME: {other:?}"),
        }
    };
    let first = welcome_id(&mut h, "ann");
    let silent = h.core.admit(h.now, "127.0.0.1:1".parse().unwrap());
    assert!(silent.is_some());
    let second = welcome_id(&mut h, "bob");
    assert_eq!(second, first + 1, "the silent connection took no id");
    assert_eq!(first >> 48, 0, "worker 0's ids");
}

#[test]
fn a_fan_out_entry_is_12_bytes_and_keeps_the_whole_token() {
    // A `(Token, u32)` pair was 16 bytes with its padding, in every room's list.
    assert_eq!(std::mem::size_of::<Subscriber>(), 12);
    // Both halves of the token come back, the generation's high bits included.
    for token in [0, 1, u64::from(u32::MAX), (7 << 32) | 3, u64::MAX] {
        assert_eq!(Subscriber::new(token, 9).parts(), (token, 9));
    }
    let mut h = Harness::new(|_| {});
    let (ann, bob) = two_phones_in_a_room(&mut h);
    let mut listed: Vec<(Token, u32)> = h.core.local[&room_named("dm")]
        .iter()
        .map(|s| s.parts())
        .collect();
    listed.sort_unstable();
    let mut expected = [(ann, 0), (bob, 0)];
    expected.sort_unstable();
    assert_eq!(listed, expected);
    // Unbinding finds the entry by its token.
    h.core.unsubscribe_local(&room_named("dm"), ann);
    let left: Vec<Token> = h.core.local[&room_named("dm")]
        .iter()
        .map(|s| s.token())
        .collect();
    assert_eq!(left, [bob]);
}

#[test]
fn a_short_fan_out_list_is_an_exact_slice_and_a_long_one_grows_by_an_eighth() {
    // In the worker's map of rooms, each bucket holds the list: a boxed slice's 16 bytes,
    // not a vector's 24.
    assert_eq!(std::mem::size_of::<FanOut>(), 16);
    let mut list = FanOut::default();
    for t in 0..8u64 {
        list.push(Subscriber::new(t, 0));
        assert!(matches!(list, FanOut::Short(_)), "{} entries", t + 1);
        assert_eq!(list.capacity(), t as usize + 1, "no spare slot");
    }
    for t in 8..100u64 {
        list.push(Subscriber::new(t, 0));
    }
    assert!(matches!(list, FanOut::Long(_)));
    assert!(list.capacity() - 100 <= 100 / 8, "an eighth spare at most");
    list.remove_token(4_000);
    assert_eq!(list.iter().count(), 100, "an unknown token leaves it alone");
    for t in 0..96u64 {
        list.remove_token(t);
    }
    assert!(
        matches!(list, FanOut::Short(_)) && list.capacity() == 4,
        "back to an exact slice at half the short size"
    );
    let mut left: Vec<Token> = list.iter().map(|s| s.token()).collect();
    left.sort_unstable();
    assert_eq!(left, [96, 97, 98, 99]);
    for t in 96..100u64 {
        list.remove_token(t);
    }
    assert!(list.is_empty());
}
