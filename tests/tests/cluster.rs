//! End-to-end: relay nodes on one Redis (`[cluster]`), each a real relay on loopback, once
//! per I/O backend. Every node's phones must see one order of every room with no hole and
//! no duplicate (`ClientSession` refuses a duplicate or a reordering; the tests refuse a
//! GAP), whatever happens to the engine connections or to Redis itself, a failover that
//! lost acknowledged writes included (the room's sequence is moved past what the nodes
//! delivered).
//!
//! Phones join rooms themselves (`room:` rooms are open to join); membership lives in the
//! engine, so a phone that joined on one node binds the room on any other
//! (`cluster_membership.rs` tests membership across nodes).

#![allow(clippy::unwrap_used)] // reason: tests

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pabal_codec::{ClientSession, ErrorCode, Event};
use pabal_relay::cluster::ClusterConfig;
use pabal_relay::io::BackendKind;
use pabal_testkit::redis::{
    RedisServer, filled_despite_killed_subscriptions, opens_answered_despite_killed_commands,
};
use pabal_testkit::{Client, TestRelay, WAIT, per_backend};

/// A cluster node on `redis`: two workers, named `id`.
fn node(backend: BackendKind, redis: &RedisServer, id: &str) -> TestRelay {
    let cluster = ClusterConfig {
        redis: vec![redis.url()],
        node_id: Some(id.into()),
        ..ClusterConfig::default()
    };
    TestRelay::cluster_node(backend, cluster, |c| c.retention.max_messages = 10_000)
}

/// Two nodes that delivered a room's messages 1..=5, which Redis then lost: what a
/// failover to a replica three writes behind leaves (the room's sequence at 2, its stream
/// without 3..=5 and its last ID back at 2-0, its window without their keys).
struct LostWrites {
    nodes: [TestRelay; 2],
    /// On the second node.
    reader: (Client, u32),
    /// On the first node.
    publisher: (Client, u32),
    /// The room's meta hash.
    meta: String,
}

impl LostWrites {
    fn new(backend: BackendKind, redis: &RedisServer, room: &str, ids: [&str; 2]) -> Self {
        let nodes = ids.map(|id| node(backend, redis, id));
        let mut reader = Client::connect(nodes[1].addr, "reader");
        let alias = reader.join(room);
        let mut p = Client::connect(nodes[0].addr, "alice");
        let pa = p.join(room);
        for seq in 1..=5 {
            assert_eq!(p.publish_acked(pa, format!("m-{seq}").into_bytes()), seq);
        }
        assert_eq!(seqs(reader.messages(alias, 5)), vec![1, 2, 3, 4, 5]);
        let (meta, stream) = (
            format!("pabal:{{r:{room}}}:m"),
            format!("pabal:{{r:{room}}}:s"),
        );
        let window = format!("pabal:{{r:{room}}}:i");
        redis.cli(&["HSET", &meta, "s", "2"]);
        redis.cli(&["XDEL", &stream, "3-0", "4-0", "5-0"]);
        redis.cli(&["XSETID", &stream, "2-0"]);
        redis.cli(&["ZREMRANGEBYSCORE", &window, "-5", "-3"]);
        LostWrites {
            nodes,
            reader: (reader, alias),
            publisher: (p, pa),
            meta,
        }
    }

    /// Raises of a room's sequence, on both nodes.
    fn raised(&self) -> u64 {
        let raised = |n: &TestRelay| {
            n.cluster()
                .unwrap()
                .sequences_raised
                .load(Ordering::Relaxed)
        };
        self.nodes.iter().map(raised).sum()
    }

    /// The next message is acknowledged as 6 and reaches the reader on the other node.
    fn sixth_reaches_the_other_node(&mut self) {
        let ((p, pa), (reader, alias)) = (&mut self.publisher, &mut self.reader);
        assert_eq!(p.publish_acked(*pa, &b"m-6"[..]), 6);
        assert_eq!(seqs(reader.messages(*alias, 1)), vec![6]);
    }
}

fn seqs(msgs: Vec<(u64, Bytes)>) -> Vec<u64> {
    msgs.into_iter().map(|(s, _)| s).collect()
}

per_backend! {
    fn three_nodes_see_one_order(backend) {
        let Some(redis) = RedisServer::start("three-nodes") else { return };
        let nodes: Vec<TestRelay> =
            ["n1", "n2", "n3"].iter().map(|id| node(backend, &redis, id)).collect();
        // A reader on every node, owed every message; publishers on two nodes at once:
        // the engine orders them.
        let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
        Client::one_order_on_every_node(&addrs, "room:cluster-order", 150);
        drop(nodes);
    }

    fn lost_subscriptions_are_filled_from_the_stream(backend) {
        let Some(redis) = RedisServer::start("client-kill") else { return };
        let (a, b) = (node(backend, &redis, "na"), node(backend, &redis, "nb"));
        let kills = filled_despite_killed_subscriptions(a.addr, b.addr, "room:cluster-kill", redis.port, 400);
        eprintln!(
            "killed {kills} pub/sub connections; holes filled: {}",
            b.cluster().unwrap().holes_filled.load(Ordering::Relaxed)
        );
    }

    fn a_failover_that_lost_writes_is_moved_past_what_the_nodes_delivered(backend) {
        let Some(redis) = RedisServer::start("lost-writes") else { return };
        let mut lost = LostWrites::new(backend, &redis, "room:cluster-lost-writes", ["la", "lb"]);
        // The failover took their connections: each node reads its open rooms again, and
        // its owner, holding 5, moves the room's sequence up to it.
        redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        let deadline = Instant::now() + WAIT;
        while lost.raised() == 0 {
            assert!(Instant::now() < deadline, "no node moved the room's sequence up");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(redis.cli(&["HGET", &lost.meta, "s"]).trim(), "5");
        // The next message takes 6 (before, 3: both nodes dropped it as delivered).
        lost.sixth_reaches_the_other_node();
    }

    fn a_publish_run_before_the_nodes_read_again_goes_past_what_they_delivered(backend) {
        let Some(redis) = RedisServer::start("lost-writes-publish") else { return };
        let mut lost =
            LostWrites::new(backend, &redis, "room:cluster-lost-writes-publish", ["wa", "wb"]);
        // No node has read the room again (their connections stay up): the next publish is
        // the first thing Redis runs for it, and carries its owner's head. It takes 6
        // (before, 3: both nodes dropped it as delivered).
        lost.sixth_reaches_the_other_node();
        assert_eq!(redis.cli(&["HGET", &lost.meta, "s"]).trim(), "6");
        assert_eq!(lost.raised(), 0, "the publish needed no raise");
    }

    fn redis_restart_refuses_then_recovers(backend) {
        let Some(mut redis) = RedisServer::start("restart") else { return };
        let (a, b) = (node(backend, &redis, "ra"), node(backend, &redis, "rb"));
        let ops = pabal_testkit::http::with_ops_routes(&a);
        const ROOM: &str = "room:cluster-restart";
        let mut reader = Client::connect(b.addr, "reader");
        let alias = reader.join(ROOM);
        let mut p = Client::connect(a.addr, "alice");
        let pa = p.join(ROOM);
        let mut acked = Vec::new();
        for i in 0..20 {
            acked.push(p.publish_acked(pa, format!("before-{i}").into_bytes()));
        }
        assert_eq!(pabal_testkit::http::get_anonymous(ops, "/readyz").status, 200);
        redis.kill();
        // Refused, typed and retryable, while Redis is down; the connection stays up.
        let id = p.publish(pa, &b"while-down"[..]);
        match p.wait_for(|e| matches!(e, Event::Error(err) if err.reference == id)
            || matches!(e, Event::PubAck { msg_id, .. } if *msg_id == id))
        {
            Event::Error(err) => {
                assert_eq!(err.code, ErrorCode::Overloaded);
                assert!(!err.fatal);
                assert_eq!(err.message.as_str(), "unavailable");
            }
            other => panic!("a publish was acknowledged with Redis down: {other:?}"),
        }
        let deadline = Instant::now() + WAIT;
        while pabal_testkit::http::get_anonymous(ops, "/readyz").status != 503 {
            assert!(Instant::now() < deadline, "/readyz never said the engine is down");
            std::thread::sleep(Duration::from_millis(20));
        }
        redis.restart();
        // The engine reconnects by itself: publishes are taken again.
        let deadline = Instant::now() + WAIT;
        let mut i = 0;
        while acked.len() < 40 {
            assert!(Instant::now() < deadline, "publishes never recovered");
            match p.publish_or_unavailable(pa, format!("after-{i}").into_bytes()) {
                Some(seq) => acked.push(seq),
                None => std::thread::sleep(Duration::from_millis(20)),
            }
            i += 1;
        }
        let deadline = Instant::now() + WAIT;
        while pabal_testkit::http::get_anonymous(ops, "/readyz").status != 200 {
            assert!(Instant::now() < deadline, "/readyz never recovered");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The engine's failures and recovery show in /metrics.
        let metrics = pabal_testkit::http::get_anonymous(ops, "/metrics").body;
        let value = |name: &str| -> f64 {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} missing from /metrics"))
        };
        // Redis killed: its connections lost (a reconnect refused meanwhile counts as
        // `refused`, if one came before the restart: `cluster_errors.rs` tests each kind).
        assert!(value("pabal_cluster_engine_errors_total{kind=\"connection_lost\"}") > 0.0);
        assert!(value("pabal_cluster_publishes_refused_total") > 0.0);
        assert!(value("pabal_cluster_engine_round_trips_total") > 0.0);
        // The engine's path by stage: every publish acknowledged went through all three.
        for stage in ["to_engine", "publish_reply", "to_worker"] {
            let n = value(&format!("pabal_cluster_{stage}_seconds_count"));
            assert!(n >= 40.0, "pabal_cluster_{stage}_seconds_count {n}");
        }
        assert_eq!(value("pabal_cluster_engines_up"), value("pabal_cluster_engines"));
        // Nothing acknowledged was lost (appendfsync always), and the reader on the other
        // node, whose connection stayed up, has all of it in one unbroken order.
        let last = *acked.iter().max().unwrap();
        assert!(acked.windows(2).all(|w| w[0] < w[1]), "{acked:?}");
        let got = reader.read_through(alias, last);
        for seq in &acked[..20] {
            assert!(got[seq].starts_with(b"before-"));
        }
    }

    fn phones_resume_on_another_node(backend) {
        let Some(redis) = RedisServer::start("resume") else { return };
        let (a, b) = (node(backend, &redis, "sa"), node(backend, &redis, "sb"));
        const ROOM: &str = "room:cluster-resume";
        const COUNT: usize = 300;
        let mut reader = Client::connect(a.addr, "reader");
        let alias = reader.join(ROOM);
        let addr = b.addr;
        let writer = std::thread::spawn(move || Client::publish_all(addr, ROOM, "alice", COUNT));
        let before: Vec<u64> = reader.messages(alias, 50).into_iter().map(|(s, _)| s).collect();
        assert_eq!(before, (1..=50).collect::<Vec<_>>());
        // Node a goes away under the publishes; its phone resumes on node b.
        let session = reader.drop_link();
        drop(a);
        let mut reader = Client::connect_with(b.addr, "reader", session);
        assert_eq!(writer.join().unwrap().len(), COUNT);
        let mut after = Vec::new();
        let deadline = Instant::now() + WAIT;
        while after.last().copied() != Some(COUNT as u64) {
            assert!(Instant::now() < deadline, "stuck after {:?}", after.last());
            match reader.next_event(Duration::from_millis(100)) {
                Some(Event::Message { alias: a, seq: Some(seq), payload, .. }) if a == alias => {
                    assert_eq!(payload, Bytes::from(format!("alice-{}", seq - 1)));
                    after.push(seq);
                }
                Some(Event::Gap { from, to, .. }) => panic!("gap {from}..={to} after the resume"),
                _ => {}
            }
        }
        assert_eq!(after, (51..=COUNT as u64).collect::<Vec<_>>(), "resumed on node b with no seam");
    }

    fn a_room_nobody_binds_is_unsubscribed_and_caught_up_when_bound_again(backend) {
        let Some(redis) = RedisServer::start("release") else { return };
        let (a, b) = (node(backend, &redis, "ua"), node(backend, &redis, "ub"));
        const ROOM: &str = "room:cluster-release";
        let channel = format!("pabal:{{r:{ROOM}}}:c");
        let subscribers = || -> u64 {
            let out = redis.cli(&["PUBSUB", "NUMSUB", &channel]);
            out.lines().nth(1).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
        };
        let wait_for = |n: u64| {
            let deadline = Instant::now() + WAIT;
            while subscribers() != n {
                assert!(Instant::now() < deadline, "{channel}: {} subscribers, not {n}", subscribers());
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        let mut reader = Client::connect(b.addr, "reader");
        let alias = reader.join(ROOM);
        wait_for(1);
        // The last connection on node b lets the room go: node b unsubscribes.
        let session = reader.drop_link();
        wait_for(0);
        // Published meanwhile through node a; node b hears none of it.
        let seqs = Client::publish_all(a.addr, ROOM, "alice", 10);
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
        // (The publisher has gone too, so node a has let the room go as well.)
        wait_for(0);
        // Bound again on node b: it subscribes again and reads what it missed.
        let mut reader = Client::connect_with(b.addr, "reader", session);
        let got = reader.read_through(alias, 10);
        assert_eq!(got[&10], Bytes::from_static(b"alice-9"));
        wait_for(1);
    }

    fn a_repeated_publish_id_is_sequenced_once_whichever_node_it_reaches(backend) {
        let Some(redis) = RedisServer::start("repeat") else { return };
        let (a, b) = (node(backend, &redis, "pa"), node(backend, &redis, "pb"));
        const ROOM: &str = "room:cluster-repeat";
        let mut reader = Client::connect(a.addr, "reader");
        let alias = reader.join(ROOM);
        let mut first = Client::connect_with(a.addr, "alice", ClientSession::with_device(42, 0));
        let fa = first.join(ROOM);
        let seq = first.publish_acked(fa, &b"hello"[..]);
        // The same device retries its message (same msg_id: its counter restarts from the
        // same persisted value) through the other node, as after an `unavailable`.
        let mut retry = Client::connect_with(b.addr, "alice", ClientSession::with_device(42, 0));
        let rb = retry.join(ROOM);
        assert_eq!(retry.publish_acked(rb, &b"hello"[..]), seq, "the first sequence, again");
        let next = first.publish_acked(fa, &b"next"[..]);
        assert_eq!(next, seq + 1, "the repeat took no sequence");
        let got = reader.read_through(alias, next);
        assert_eq!(got.len(), 2, "delivered once: {got:?}");
        // Messages without a publish id, one of them the room's 64th (a publish that trims
        // the window): the window still spans the room's last `limits.publish_ids`
        // sequences, so the first message is still a repeat.
        let mut bob = Client::connect(b.addr, "bob");
        let bb = bob.join(ROOM);
        let last = (0..70).fold(next, |_, i| bob.publish_acked(bb, format!("b{i}").into_bytes()));
        assert_eq!(last, next + 70);
        let mut again = Client::connect_with(b.addr, "alice", ClientSession::with_device(42, 0));
        let ra = again.join(ROOM);
        assert_eq!(
            again.publish_acked(ra, &b"hello"[..]),
            seq,
            "still the first sequence after the room's 64th message"
        );
    }

    fn a_publish_answered_is_handed_to_its_worker_once_not_again_with_its_copy(backend) {
        let Some(redis) = RedisServer::start("own-copy") else { return };
        let (a, b) = (node(backend, &redis, "oa"), node(backend, &redis, "ob"));
        const ROOM: &str = "room:cluster-own-copy";
        const COUNT: u64 = 100;
        let mut reader = Client::connect(a.addr, "reader");
        let alias = reader.join(ROOM);
        let mut p = Client::connect(a.addr, "alice");
        let pa = p.join(ROOM);
        let stats = a.cluster().unwrap().clone();
        let handed = || stats.stages()[2].count();
        let before = handed();
        for i in 0..COUNT {
            assert_eq!(p.publish_acked(pa, format!("m{i}").into_bytes()), i + 1);
        }
        // One publish through node b: node a's pub/sub connection carries it after every
        // copy of node a's own publishes, so once it is delivered they have all been read.
        assert_eq!(Client::publish_all(b.addr, ROOM, "bob", 1), vec![COUNT + 1]);
        let got = reader.read_through(alias, COUNT + 1);
        assert_eq!(got.len() as u64, COUNT + 1, "each delivered once, in order");
        // Each publish's answer is an event for its worker; its copy on the room's channel
        // was one more (a duplicate the worker dropped, after a wake-up of its own).
        let events = handed() - before;
        assert!(
            events < 2 * COUNT,
            "{events} events for {COUNT} publishes: their channel copies were handed over too"
        );
    }

    fn every_open_in_flight_when_the_command_connection_drops_is_answered(backend) {
        let Some(redis) = RedisServer::start("cmd-kill") else { return };
        let a = node(backend, &redis, "ck");
        let channels: Vec<String> = (0..64).map(|i| format!("news:cmd-kill-{i}")).collect();
        opens_answered_despite_killed_commands(&a, &redis, &channels);
    }
}
