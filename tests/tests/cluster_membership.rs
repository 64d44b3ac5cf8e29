//! End-to-end: membership, blocks and join points live in the engine (Redis), so any node
//! authenticates any user and binds their rooms, and a change made through any node's
//! server API reaches the nodes holding the user's connections at once: joins, removals,
//! disconnects and channel blocks, even a change whose notice a node missed. Real relay
//! nodes on loopback and a real `redis-server`, once per I/O backend.

#![allow(clippy::unwrap_used)] // reason: tests

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;

use bytes::Bytes;
use pabal_codec::{ClientFrame, ErrorCode, Event, GoAwayReason, LeftReason, Unsubscribe};
use pabal_relay::cluster::ClusterConfig;
use pabal_relay::io::BackendKind;
use pabal_testkit::http::{KEY, http};
use pabal_testkit::redis::RedisServer;
use pabal_testkit::{Client, TestRelay, per_backend};
use serde_json::{Value, json};

/// A cluster node named `id` on `redis`, with two workers.
fn cluster_node(backend: BackendKind, redis: &RedisServer, id: &str) -> TestRelay {
    let cluster = ClusterConfig {
        redis: vec![redis.url()],
        node_id: Some(id.into()),
        ..ClusterConfig::default()
    };
    TestRelay::cluster_node(backend, cluster, |_| {})
}

fn nodes(backend: BackendKind, redis: &RedisServer, prefix: &str) -> Vec<TestRelay> {
    (1..=3)
        .map(|i| cluster_node(backend, redis, &format!("{prefix}{i}")))
        .collect()
}

/// A server-API call to `node`.
fn call(node: &TestRelay, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let addr = node.handle().control_addr().unwrap();
    http(addr, method, path, Some(KEY), body.as_deref())
}

/// Waits for the binding of `room` (a ROOM frame); its alias.
fn bound(client: &mut Client, room: &str) -> u32 {
    let id = pabal_codec::room_id(false, room);
    let channel_id = pabal_codec::room_id(true, room);
    match client.wait_for(
        |e| matches!(e, Event::Bound { room: r, .. } if r.room_id == id || r.room_id == channel_id),
    ) {
        Event::Bound { alias, .. } => alias,
        _ => unreachable!(),
    }
}

/// Waits for LEFT of `alias`; its reason.
fn left(client: &mut Client, alias: u32) -> LeftReason {
    match client.wait_for(|e| matches!(e, Event::Left { alias: a, .. } if *a == alias)) {
        Event::Left { reason, .. } => reason,
        _ => unreachable!(),
    }
}

fn payloads(msgs: Vec<(u64, Bytes)>) -> Vec<(u64, String)> {
    msgs.into_iter()
        .map(|(s, p)| (s, String::from_utf8_lossy(&p).into_owned()))
        .collect()
}

/// One command to Redis over `conn` (RESP by hand); the first line of the answer.
fn redis_command(conn: &mut BufReader<TcpStream>, args: &[&str]) -> String {
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    conn.get_mut().write_all(out.as_bytes()).unwrap();
    let mut line = String::new();
    conn.read_line(&mut line).unwrap();
    line
}

per_backend! {
    fn a_member_made_through_one_node_binds_on_the_others_from_its_join_point(backend) {
        let Some(redis) = RedisServer::start("members-join") else { return };
        let n = nodes(backend, &redis, "j");
        const ROOM: &str = "group:cm-join";
        let mut alice = Client::connect(n[0].addr, "alice");
        let a = alice.join(ROOM);
        for i in 1..=3 {
            alice.publish_acked(a, format!("before-{i}").into_bytes());
        }
        // Bob is online on node 2 (a user node 2 has never seen a membership of).
        let mut bob_live = Client::connect(n[1].addr, "bob");
        let (s, b) = call(&n[0], "POST", &format!("/v1/rooms/{ROOM}/members"), Some(json!({"users": ["bob"]})));
        assert_eq!((s, &b["added"]), (200, &json!(["bob"])), "{b}");
        // The join reached node 2 at once: its phone binds the room.
        let alias = bound(&mut bob_live, ROOM);
        for i in 1..=2 {
            alice.publish_acked(a, format!("after-{i}").into_bytes());
        }
        let expected = vec![(4, "after-1".to_string()), (5, "after-2".to_string())];
        assert_eq!(payloads(bob_live.messages(alias, 2)), expected, "from the join point on, nothing before");
        // A phone of bob's on node 3, which holds nothing of bob's: it reads bob's rooms
        // and join points from the engine at HELLO.
        let mut bob_fresh = Client::connect(n[2].addr, "bob");
        let alias = bound(&mut bob_fresh, ROOM);
        assert_eq!(payloads(bob_fresh.messages(alias, 2)), expected, "replayed from the join point");
        // Adding again through another node is no change.
        let (s, b) = call(&n[1], "POST", &format!("/v1/rooms/{ROOM}/members"), Some(json!({"users": ["bob"]})));
        assert_eq!((s, &b["added"]), (200, &json!([])), "{b}");
    }

    fn a_removal_through_one_node_unbinds_the_phone_on_another(backend) {
        let Some(redis) = RedisServer::start("members-remove") else { return };
        let n = nodes(backend, &redis, "r");
        const ROOM: &str = "group:cm-remove";
        let mut bob = Client::connect(n[2].addr, "bob");
        let (s, _) = call(&n[0], "POST", &format!("/v1/rooms/{ROOM}/members"), Some(json!({"users": ["bob"]})));
        assert_eq!(s, 200);
        let alias = bound(&mut bob, ROOM);
        let mut alice = Client::connect(n[0].addr, "alice");
        let a = alice.join(ROOM);
        alice.publish_acked(a, &b"while-member"[..]);
        assert_eq!(payloads(bob.messages(alias, 1)), vec![(1, "while-member".to_string())]);
        let (s, b) = call(&n[1], "DELETE", &format!("/v1/rooms/{ROOM}/members/bob"), None);
        assert_eq!((s, &b["removed"]), (200, &json!(["bob"])), "{b}");
        assert_eq!(left(&mut bob, alias), LeftReason::Removed, "the removal reached node 3");
        alice.publish_acked(a, &b"after-removal"[..]);
        // Made a member again: bound from the new join point, which is after the message
        // published while removed.
        let (s, _) = call(&n[1], "POST", &format!("/v1/rooms/{ROOM}/members"), Some(json!({"users": ["bob"]})));
        assert_eq!(s, 200);
        let again = bound(&mut bob, ROOM);
        alice.publish_acked(a, &b"back"[..]);
        let got = payloads(bob.messages(again, 1));
        assert_eq!(got, vec![(3, "back".to_string())], "nothing from while bob was removed");
    }

    fn a_removal_takes_effect_on_every_node_at_its_place_in_the_rooms_order(backend) {
        let Some(redis) = RedisServer::start("members-order") else { return };
        let n = nodes(backend, &redis, "o");
        const ROOM: &str = "group:cm-order";
        let mut bob = Client::connect(n[2].addr, "bob");
        let (s, _) = call(&n[0], "POST", &format!("/v1/rooms/{ROOM}/members"), Some(json!({"users": ["bob"]})));
        assert_eq!(s, 200);
        let alias = bound(&mut bob, ROOM);
        // Two publishers on node 1 keep the room busy while node 2 removes bob.
        let publishers: Vec<_> = ["alice", "carol"]
            .into_iter()
            .map(|tag| {
                let addr = n[0].addr;
                std::thread::spawn(move || Client::publish_all(addr, ROOM, tag, 30))
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (s, b) = call(&n[1], "DELETE", &format!("/v1/rooms/{ROOM}/members/bob"), None);
        assert_eq!((s, &b["removed"]), (200, &json!(["bob"])), "{b}");
        for p in publishers {
            assert_eq!(p.join().unwrap().len(), 30);
        }
        // The removal's place in the room's stream: `<seq>-1`, after message `seq`.
        let stream = redis.cli(&["XRANGE", &format!("pabal:{{r:{ROOM}}}:s"), "-", "+"]);
        let place: Vec<(u64, u64)> = stream
            .lines()
            .filter_map(|l| {
                let (seq, sub) = l.trim().split_once('-')?;
                Some((seq.parse().ok()?, sub.parse().ok()?))
            })
            .filter(|&(_, sub)| sub > 0)
            .collect();
        let [(removed_after, 1)] = place[..] else {
            panic!("one removal in the stream: {place:?}\n{stream}");
        };
        // bob's phone on node 3 got every message up to it, then LEFT, and nothing after.
        let mut seqs = Vec::new();
        loop {
            match bob.wait_for(|e| matches!(e, Event::Message { .. } | Event::Left { .. })) {
                Event::Message { seq: Some(seq), .. } => seqs.push(seq),
                Event::Left { alias: a, reason, .. } => {
                    assert_eq!((a, reason), (alias, LeftReason::Removed));
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seqs, (1..=removed_after).collect::<Vec<_>>(), "up to the removal, not past it");
        let metrics = pabal_testkit::http::get_anonymous(pabal_testkit::http::with_ops_routes(&n[2]), "/metrics").body;
        assert!(
            metrics.lines().any(|l| l.starts_with("pabal_cluster_removals_in_order_total ") && !l.ends_with(" 0")),
            "node 3 applied the removal in the room's order: {metrics}"
        );
        // A channel's unsubscribe goes by its notice: no mark in the channel's stream.
        const NEWS: &str = "cm-order-news";
        let c = bob.subscribe(NEWS);
        let mut brand = Client::connect(n[0].addr, "brand");
        let b = brand.subscribe(NEWS);
        brand.publish_acked(b, &b"news"[..]);
        bob.send(&ClientFrame::Unsubscribe(Unsubscribe { alias: c, block: false }));
        assert_eq!(left(&mut bob, c), LeftReason::Unsubscribed);
        let stream = redis.cli(&["XRANGE", &format!("pabal:{{c:{NEWS}}}:s"), "-", "+"]);
        assert!(stream.lines().any(|l| l.trim() == "1-0"), "{stream}");
        assert!(!stream.lines().any(|l| l.trim().starts_with("1-") && l.trim() != "1-0"), "{stream}");
        assert_eq!(redis.cli(&["EXISTS", &format!("pabal:{{c:{NEWS}}}:x")]).trim(), "0");
    }

    fn a_disconnect_through_one_node_closes_the_users_connections_on_every_node(backend) {
        let Some(redis) = RedisServer::start("members-kick") else { return };
        let n = nodes(backend, &redis, "k");
        let mut bobs: Vec<Client> = n.iter().map(|node| Client::connect(node.addr, "bob")).collect();
        let mut carol = Client::connect(n[0].addr, "carol");
        let (s, _) = call(&n[1], "POST", "/v1/users/bob/disconnect", None);
        assert_eq!(s, 200);
        for (i, bob) in bobs.iter_mut().enumerate() {
            let events = bob.until_closed();
            assert!(
                events.iter().any(|e| matches!(e, Event::GoAway(g) if g.reason == GoAwayReason::Kicked)),
                "node {}: {events:?}",
                i + 1
            );
        }
        // Nobody else is touched.
        let c = carol.join("group:cm-kick");
        carol.publish_acked(c, &b"still here"[..]);
    }

    fn a_channel_block_through_one_node_is_honoured_on_every_node(backend) {
        let Some(redis) = RedisServer::start("members-block") else { return };
        let n = nodes(backend, &redis, "b");
        const NEWS: &str = "cm-news";
        let mut bob1 = Client::connect(n[0].addr, "bob");
        let mut bob2 = Client::connect(n[1].addr, "bob");
        let a1 = bob1.subscribe(NEWS);
        // The subscription reached bob's other phone, on node 2.
        let a2 = bound(&mut bob2, NEWS);
        bob1.send(&ClientFrame::Unsubscribe(Unsubscribe { alias: a1, block: true }));
        assert_eq!(left(&mut bob1, a1), LeftReason::Blocked);
        assert_eq!(left(&mut bob2, a2), LeftReason::Blocked, "the block reached node 2");
        // Node 3 reads the block at HELLO: bob's phone there may not subscribe.
        let mut bob3 = Client::connect(n[2].addr, "bob");
        bob3.send(&ClientFrame::Subscribe(pabal_codec::Subscribe { room: false, name: NEWS.into() }));
        match bob3.wait_for(|e| matches!(e, Event::Error(_) | Event::Bound { .. })) {
            Event::Error(e) => assert_eq!(e.code, ErrorCode::NotPermitted, "{e:?}"),
            other => panic!("a blocked channel was bound on node 3: {other:?}"),
        }
        // Nor may the app server, through any node.
        for node in &n {
            let (s, b) = call(node, "POST", &format!("/v1/channels/{NEWS}/subscribers"), Some(json!({"users": ["bob"]})));
            assert_eq!(s, 200);
            assert_eq!(b["added"], json!([]), "{b}");
            assert_eq!(b["refused"][0]["user"], json!("bob"), "{b}");
        }
    }

    fn a_notice_missed_while_the_pubsub_connection_was_down_is_recovered(backend) {
        let Some(redis) = RedisServer::start("members-missed") else { return };
        let n = nodes(backend, &redis, "m");
        const STAY: &str = "group:cm-stay";
        const GONE: &str = "group:cm-gone";
        const NEW: &str = "group:cm-new";
        let (s, _) = call(&n[0], "POST", &format!("/v1/rooms/{GONE}/members"), Some(json!({"users": ["bob"]})));
        assert_eq!(s, 200);
        let (s, _) = call(&n[0], "POST", &format!("/v1/rooms/{STAY}/members"), Some(json!({"users": ["bob"]})));
        assert_eq!(s, 200);
        let mut bob = Client::connect(n[1].addr, "bob");
        let gone = bound(&mut bob, GONE);
        bound(&mut bob, STAY);
        // The changes below go through node 3, whose engine must not need its pub/sub
        // connection for them: it holds both rooms open already.
        for room in [GONE, NEW] {
            call(&n[2], "GET", &format!("/v1/rooms/{room}"), None);
        }
        // Every pub/sub connection goes, and none may come back (Redis takes no new
        // connection past `maxclients`) until the changes are made: their notices reach
        // nobody.
        let mut admin = BufReader::new(TcpStream::connect(("127.0.0.1", redis.port)).unwrap());
        assert_eq!(redis_command(&mut admin, &["CONFIG", "SET", "maxclients", "1"]), "+OK\r\n");
        let killed = redis_command(&mut admin, &["CLIENT", "KILL", "TYPE", "pubsub"]);
        assert!(killed.starts_with(':') && killed.trim() != ":0", "{killed}");
        let (s, b) = call(&n[2], "DELETE", &format!("/v1/rooms/{GONE}/members/bob"), None);
        assert_eq!((s, &b["removed"]), (200, &json!(["bob"])), "{b}");
        let (s, b) = call(&n[2], "POST", &format!("/v1/rooms/{NEW}/members"), Some(json!({"users": ["bob"]})));
        assert_eq!((s, &b["added"]), (200, &json!(["bob"])), "{b}");
        assert_eq!(redis_command(&mut admin, &["CONFIG", "SET", "maxclients", "10000"]), "+OK\r\n");
        // Node 2 subscribes again, reads bob's rooms and applies what it missed.
        let new = bound(&mut bob, NEW);
        assert_eq!(left(&mut bob, gone), LeftReason::Removed);
        let mut alice = Client::connect(n[0].addr, "alice");
        let a = alice.join(NEW);
        alice.publish_acked(a, &b"hello"[..]);
        assert_eq!(payloads(bob.messages(new, 1)), vec![(1, "hello".to_string())]);
        let metrics = pabal_testkit::http::get_anonymous(pabal_testkit::http::with_ops_routes(&n[1]), "/metrics").body;
        assert!(metrics.contains("pabal_cluster_user_loads_total"), "{metrics}");
    }
    fn a_hello_is_refused_unavailable_while_the_engine_is_down_and_taken_when_it_is_back(backend) {
        let Some(mut redis) = RedisServer::start("members-down") else { return };
        let node = cluster_node(backend, &redis, "d1");
        let ops = pabal_testkit::http::with_ops_routes(&node);
        let engines_up = || -> Option<(u64, u64)> {
            let metrics = pabal_testkit::http::get_anonymous(ops, "/metrics").body;
            let value = |name: &str| {
                metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            };
            Some((value("pabal_cluster_engines_up")?, value("pabal_cluster_engines")?))
        };
        let wait_until = |pred: &dyn Fn((u64, u64)) -> bool, what: &str| {
            let deadline = std::time::Instant::now() + pabal_testkit::WAIT;
            while !engines_up().is_some_and(pred) {
                assert!(std::time::Instant::now() < deadline, "{what}: {:?}", engines_up());
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        };
        wait_until(&|(up, all)| all > 0 && up == all, "the engines never came up");
        redis.kill();
        wait_until(&|(up, _)| up == 0, "the engines never noticed Redis going");
        // The user's rooms cannot be read: the HELLO is refused, retryable, and the
        // connection closed rather than left waiting.
        let mut bob = Client::connect_raw(node.addr, "bob", b"bob");
        let events = bob.until_closed();
        assert!(
            events.iter().any(|e| matches!(e, Event::Error(err)
                if err.fatal && err.code == ErrorCode::Overloaded && err.message.as_str() == "unavailable")),
            "{events:?}"
        );
        redis.restart();
        wait_until(&|(up, all)| up == all, "the engines never came back");
        let mut bob = Client::connect(node.addr, "bob");
        bob.join("group:cm-back");
    }
    fn a_replacing_member_call_through_one_node_sees_members_added_through_another(backend) {
        let Some(redis) = RedisServer::start("members-set") else { return };
        let n = nodes(backend, &redis, "s");
        const ROOM: &str = "group:cm-set";
        let path = format!("/v1/rooms/{ROOM}/members");
        let mut bob = Client::connect(n[2].addr, "bob");
        let (s, b) = call(&n[0], "POST", &path, Some(json!({"users": ["bob", "carol"]})));
        assert_eq!((s, &b["added"]), (200, &json!(["bob", "carol"])), "{b}");
        let alias = bound(&mut bob, ROOM);
        // Node 2's owner has seen none of these joins: the replacement reads the engine's.
        let (s, b) = call(&n[1], "PUT", &path, Some(json!({"users": ["carol", "dave"]})));
        assert_eq!(s, 200, "{b}");
        assert_eq!((&b["added"], &b["removed"], &b["count"]), (&json!(["dave"]), &json!(["bob"]), &json!(2)), "{b}");
        assert_eq!(left(&mut bob, alias), LeftReason::Removed);
    }

    fn a_change_half_done_in_the_engine_is_completed_by_its_retry(backend) {
        let Some(redis) = RedisServer::start("members-half") else { return };
        let n = nodes(backend, &redis, "h");
        const ROOM: &str = "group:cm-half";
        let path = format!("/v1/rooms/{ROOM}/members");
        let mut alice = Client::connect(n[0].addr, "alice");
        let a = alice.join(ROOM);
        alice.publish_acked(a, &b"first"[..]);
        alice.publish_acked(a, &b"second"[..]);
        let mut bob = Client::connect(n[1].addr, "bob");
        // A join whose node died between the room's script and the user's: the room's
        // member hash holds bob (joined after 1), bob's own rooms do not.
        let epoch = redis.cli(&["HGET", &format!("pabal:{{r:{ROOM}}}:m"), "e"]);
        let join = format!("{}:1:7", epoch.trim());
        redis.cli(&["HSET", &format!("pabal:{{r:{ROOM}}}:u"), "bob", &join]);
        // The app server's retry completes it: bob's phones bind from that join point.
        let (s, b) = call(&n[2], "POST", &path, Some(json!({"users": ["bob"]})));
        assert_eq!((s, &b["added"]), (200, &json!(["bob"])), "{b}");
        let alias = bound(&mut bob, ROOM);
        assert_eq!(payloads(bob.messages(alias, 1)), vec![(2, "second".to_string())]);
        // A removal half done the same way (the room's side only): the retry removes bob
        // from his own rooms and unbinds his phones.
        redis.cli(&["HDEL", &format!("pabal:{{r:{ROOM}}}:u"), "bob"]);
        let (s, b) = call(&n[2], "DELETE", &format!("{path}/bob"), None);
        assert_eq!((s, &b["removed"]), (200, &json!(["bob"])), "{b}");
        assert_eq!(left(&mut bob, alias), LeftReason::Removed);
    }

    fn a_join_the_users_side_refuses_takes_the_room_side_back_even_left_from_before(backend) {
        let Some(redis) = RedisServer::start("members-undo") else { return };
        let cluster = ClusterConfig {
            redis: vec![redis.url()],
            node_id: Some("u1".into()),
            ..ClusterConfig::default()
        };
        let node = TestRelay::cluster_node(backend, cluster, |c| c.limits.max_rooms_per_user = 1);
        let path = |room: &str| format!("/v1/rooms/{room}/members");
        let (s, b) = call(&node, "POST", &path("group:undo-a"), Some(json!({"users": ["carol"]})));
        assert_eq!(s, 200, "{b}");
        // A refused join whose undo was lost (its connection failed, or its node died):
        // the room's member hash holds carol, her own rooms do not. Before, a retry found
        // her a member of the room already and undid nothing: she stayed in its member
        // hash (and hand-off index) for good.
        const B: &str = "group:undo-b";
        let members = format!("pabal:{{r:{B}}}:u");
        redis.cli(&["HSET", &members, "carol", "1767225600000:0:7"]);
        let (s, b) = call(&node, "POST", &path(B), Some(json!({"users": ["carol"]})));
        assert_eq!((s, &b["refused"][0]["user"]), (200, &json!("carol")), "over her cap: {b}");
        // The undo follows the answer on the engine's connection.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while redis.cli(&["HEXISTS", &members, "carol"]).trim() != "0" {
            assert!(std::time::Instant::now() < deadline, "carol is still in {B}'s members");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
