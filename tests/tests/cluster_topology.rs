//! End-to-end: relay nodes on a three-shard Redis Cluster (`cluster.topology =
//! "cluster"`, one seed address), once per I/O backend. Rooms land on the shard of their
//! hash slot (checked through the cluster's own slot map), every node's phones see one
//! order of every room, a shard's lost pub/sub connections are repaired from the stream,
//! and a slot that moved is followed (`MOVED`), publishes meeting `TRYAGAIN` mid-migration
//! included. A node connects only to the shards its rooms and users live on, and a shard
//! whose address drops SYNs holds up no other shard's publishes.

#![allow(clippy::unwrap_used)] // reason: tests

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pabal_codec::{ClientFrame, ClientSession, Event, Subscribe, Text};
use pabal_relay::cluster::{ClusterConfig, RetryKind, Topology};
use pabal_relay::io::BackendKind;
use pabal_testkit::blackhole::Blackhole;
use pabal_testkit::http::{get_anonymous, request, with_ops_routes};
use pabal_testkit::redis::{
    RedisCluster, filled_despite_killed_subscriptions, opens_answered_despite_killed_commands,
};
use pabal_testkit::{Client, TestRelay, WAIT, per_backend};

/// A node on `cluster`, given only its first master as seed: the rest comes from the
/// slot map.
fn node(backend: BackendKind, cluster: &RedisCluster, id: &str) -> TestRelay {
    node_with(backend, cluster, id, |_| {})
}

/// [`node`] with `tweak` applied to its `[cluster]` section.
fn node_with(
    backend: BackendKind,
    cluster: &RedisCluster,
    id: &str,
    tweak: impl FnOnce(&mut ClusterConfig),
) -> TestRelay {
    let mut config = ClusterConfig {
        topology: Topology::Cluster,
        redis: vec![cluster.urls()[0].clone()],
        node_id: Some(id.into()),
        ..ClusterConfig::default()
    };
    tweak(&mut config);
    TestRelay::cluster_node(backend, config, |c| {
        c.retention.max_messages = 10_000;
        // A publish's answer may wait for a whole connect_timeout (below).
        c.control.reply_timeout = Duration::from_secs(60);
    })
}

/// A user name starting with `prefix` whose keys (`pabal:{u:<name>}:*`) live on shard
/// `shard`.
fn user_on(cluster: &RedisCluster, prefix: &str, shard: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|u| cluster.owner_of(cluster.slot(&format!("pabal:{{u:{u}}}:r"))) == shard)
        .unwrap()
}

/// The clients shard `n` has, other than the `redis-cli` asking (`CLIENT LIST`).
fn clients_of(cluster: &RedisCluster, n: usize) -> usize {
    cluster.nodes[n]
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter(|l| l.starts_with("id=") && !l.contains("cmd=client|list"))
        .count()
}

/// The meta key of `room`, which every key of the room shares the slot of.
fn meta_key(room: &str) -> String {
    format!("pabal:{{r:{room}}}:m")
}

/// One room name per shard: (name, slot, shard).
fn one_room_per_shard(cluster: &RedisCluster, prefix: &str) -> Vec<(String, u16, usize)> {
    let mut rooms: Vec<(String, u16, usize)> = Vec::new();
    for i in 0.. {
        if rooms.len() == cluster.nodes.len() {
            break;
        }
        let name = format!("room:{prefix}-{i}");
        let slot = cluster.slot(&meta_key(&name));
        let shard = cluster.owner_of(slot);
        if !rooms.iter().any(|r| r.2 == shard) {
            rooms.push((name, slot, shard));
        }
    }
    rooms
}

/// Asserts that `room`'s keys are on `shard` and on no other (Redis' own slot map).
fn keys_only_on(cluster: &RedisCluster, slot: u16, shard: usize) {
    for n in 0..cluster.nodes.len() {
        let keys = cluster.keys_in_slot(n, slot);
        if n == shard {
            assert!(keys > 0, "slot {slot}: no key on its shard {n}");
        } else {
            assert_eq!(
                keys, 0,
                "slot {slot}: keys on shard {n}, not its owner {shard}"
            );
        }
    }
}

/// Long enough that only an engine waiting on the blackholed shard's connect delays
/// another shard's publish by it (the client gives up after `WAIT`, 20 s).
const SILENT_TIMEOUT: Duration = Duration::from_secs(30);

per_backend! {
    fn rooms_on_every_shard_keep_one_order_on_every_node(backend) {
        let Some(cluster) = RedisCluster::start("shards", 3) else { return };
        let nodes: Vec<TestRelay> =
            ["c1", "c2", "c3"].iter().map(|id| node(backend, &cluster, id)).collect();
        let rooms = one_room_per_shard(&cluster, "spread");
        let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
        for (room, slot, shard) in &rooms {
            Client::one_order_on_every_node(&addrs, room, 60);
            keys_only_on(&cluster, *slot, *shard);
        }
        let shards: std::collections::BTreeSet<usize> = rooms.iter().map(|r| r.2).collect();
        assert_eq!(shards.len(), 3, "the rooms spread over all three shards");
    }

    fn a_shards_lost_subscriptions_are_filled_from_the_stream(backend) {
        let Some(cluster) = RedisCluster::start("shard-kill", 3) else { return };
        let (a, b) = (node(backend, &cluster, "ka"), node(backend, &cluster, "kb"));
        let (room, _, shard) = one_room_per_shard(&cluster, "kill").swap_remove(1);
        filled_despite_killed_subscriptions(a.addr, b.addr, &room, cluster.nodes[shard].port, 300);
    }

    fn a_moved_slot_is_followed(backend) {
        let Some(cluster) = RedisCluster::start("moved", 3) else { return };
        let (a, b) = (node(backend, &cluster, "ma"), node(backend, &cluster, "mb"));
        // Both nodes read the slot map; then the (empty) slot of a room moves to another
        // shard behind their backs: their first command and subscription for the room
        // are answered MOVED.
        let (room, slot, from) = one_room_per_shard(&cluster, "moved").swap_remove(0);
        let to = (from + 1) % cluster.nodes.len();
        // As a reshard moves it (see `RedisCluster::migrate`: a bare SETSLOT NODE races
        // the cluster's gossip).
        cluster.migrate(slot, from, to);
        assert_eq!(cluster.owner_of(slot), to);
        let mut reader = Client::connect(b.addr, "reader");
        let alias = reader.join(&room);
        let seqs = Client::publish_all(a.addr, &room, "alice", 20);
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
        let got = reader.read_through(alias, 20);
        assert_eq!(got[&20], Bytes::from_static(b"alice-19"));
        keys_only_on(&cluster, slot, to);
    }

    fn a_slot_migrated_under_a_live_room_is_followed(backend) {
        let Some(cluster) = RedisCluster::start("migrate", 3) else { return };
        let (a, b) = (node(backend, &cluster, "ga"), node(backend, &cluster, "gb"));
        let (room, slot, from) = one_room_per_shard(&cluster, "migrate").swap_remove(0);
        let to = (from + 1) % cluster.nodes.len();
        let mut reader = Client::connect(b.addr, "reader");
        let alias = reader.join(&room);
        // A device with publish ids: the room's window key exists from the first publish,
        // so mid-migration every key of the script is on one side (a key missing on the
        // importing shard would make Redis answer TRYAGAIN, refused `unavailable`).
        let mut p = Client::connect_with(a.addr, "alice", ClientSession::with_device(42, 0));
        let pa = p.join(&room);
        for i in 1..=10u64 {
            assert_eq!(p.publish_acked(pa, format!("alice-{}", i - 1).into_bytes()), i);
        }
        // The live room's slot moves to another shard, keys and all, as `redis-cli
        // --cluster reshard` does it: both nodes' engines hold a stale map and a
        // subscription on the old shard.
        // Mid-migration the keys are on the importing shard, which the old one points to
        // with ASK: the publishes follow it (ASKING).
        cluster.begin_migration(slot, from, to);
        for i in 11..=20u64 {
            assert_eq!(p.publish_acked(pa, format!("alice-{}", i - 1).into_bytes()), i);
        }
        cluster.finish_migration(slot, to);
        assert_eq!(cluster.owner_of(slot), to);
        for i in 21..=30u64 {
            assert_eq!(p.publish_acked(pa, format!("alice-{}", i - 1).into_bytes()), i);
        }
        let got = reader.read_through(alias, 30);
        assert_eq!(got[&30], Bytes::from_static(b"alice-29"));
        keys_only_on(&cluster, slot, to);
    }

    fn a_node_connects_only_to_the_shards_its_rooms_and_users_live_on(backend) {
        let Some(cluster) = RedisCluster::start("lazy", 3) else { return };
        // Not the seed's shard: the seed is asked for the slot map (on a connection of
        // its own, closed once answered).
        let (room, _, shard) = one_room_per_shard(&cluster, "lazy").swap_remove(1);
        assert_ne!(shard, 0);
        let (reader_name, writer) = (user_on(&cluster, "r", shard), user_on(&cluster, "w", shard));
        let a = node(backend, &cluster, "la");
        let mut reader = Client::connect(a.addr, &reader_name);
        let alias = reader.join(&room);
        let seqs = Client::publish_all(a.addr, &room, &writer, 10);
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
        reader.read_through(alias, 10);
        assert!(clients_of(&cluster, shard) >= 2, "the node's commands and pub/sub on its shard");
        // Every engine used to connect to every shard up front.
        let deadline = Instant::now() + WAIT;
        for other in (0..3).filter(|&n| n != shard) {
            while clients_of(&cluster, other) > 0 {
                assert!(
                    Instant::now() < deadline,
                    "shard {other} holds the node's connections: {}",
                    cluster.nodes[other].cli(&["CLIENT", "LIST"])
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        assert!(clients_of(&cluster, shard) >= 2, "still connected");
    }

    fn a_shard_no_longer_needed_is_let_go_and_dialed_again_on_its_next_need(backend) {
        let Some(cluster) = RedisCluster::start("idle", 3) else { return };
        // Not the seed's shard (asked for the slot map on a connection of its own).
        let (room, _, shard) =
            one_room_per_shard(&cluster, "idle").into_iter().find(|r| r.2 == 1).unwrap();
        let user = user_on(&cluster, "u", shard);
        let a = node_with(backend, &cluster, "ia", |c| c.shard_idle = Duration::from_secs(1));
        let mut phone = Client::connect(a.addr, &user);
        let alias = phone.join(&room);
        assert_eq!(phone.publish_acked(alias, &b"first"[..]), 1);
        assert!(clients_of(&cluster, shard) >= 2, "the node's commands and pub/sub");
        // The last phone goes: the room and the user are let go, and with them every
        // reason to hold the shard's connections.
        let session = phone.drop_link();
        let deadline = Instant::now() + WAIT;
        while clients_of(&cluster, shard) > 0 {
            assert!(
                Instant::now() < deadline,
                "shard {shard} still holds the node's connections: {}",
                cluster.nodes[shard].cli(&["CLIENT", "LIST"])
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Needed again: dialed again, and nothing was lost meanwhile.
        assert_eq!(Client::publish_all(a.addr, &room, "other", 1), vec![2]);
        let mut phone = Client::connect_with(a.addr, &user, session);
        let got = phone.messages(alias, 1);
        assert_eq!(got, vec![(2, Bytes::from_static(b"other-0"))]);
        assert!(clients_of(&cluster, shard) >= 2, "connected again");
    }

    fn a_shard_whose_address_drops_syns_holds_up_no_other_shards_publishes(backend) {
        let Some(cluster) = RedisCluster::start("blackhole", 3) else { return };
        let rooms = one_room_per_shard(&cluster, "syn");
        let on = |s: usize| rooms.iter().find(|r| r.2 == s).unwrap().0.clone();
        let (live_room, dead_room) = (on(1), on(2));
        let user = user_on(&cluster, "alice", 1);
        // Shard 2 announces an address whose SYNs are dropped: the slot map names it, and
        // a connect to it neither succeeds nor is refused before SILENT_TIMEOUT.
        let hole = Blackhole::start();
        let port = hole.port.to_string();
        cluster.nodes[2].cli(&["CONFIG", "SET", "cluster-announce-port", &port]);
        let deadline = Instant::now() + WAIT;
        while !cluster.nodes[0].cli(&["CLUSTER", "SLOTS"]).lines().any(|l| l.trim() == port) {
            assert!(Instant::now() < deadline, "the seed never named the new port");
            std::thread::sleep(Duration::from_millis(20));
        }
        let a = node_with(backend, &cluster, "bh", |c| c.connect_timeout = SILENT_TIMEOUT);
        let mut p = Client::connect(a.addr, &user);
        let live = p.join(&live_room);
        assert_eq!(p.publish_acked(live, &b"before"[..]), 1);
        // A publish to the blackholed shard's room makes the engine dial it. (Read with
        // a timeout past SILENT_TIMEOUT: the testkit's HTTP client gives up after WAIT.)
        let control = a.handle().control_addr().unwrap();
        let path = format!("/v1/rooms/{dead_room}/messages");
        let stuck = std::thread::spawn(move || {
            let body = r#"{"sender":"server","text":"into the void"}"#;
            let mut stream = std::net::TcpStream::connect(control).unwrap();
            stream.set_read_timeout(Some(SILENT_TIMEOUT * 2)).unwrap();
            stream.write_all(&request("POST", &path, None, body)).unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            answer
        });
        // The engine dials it: the node is not ready while a shard it uses is down.
        let stats = a.cluster().unwrap().clone();
        let deadline = Instant::now() + WAIT;
        while stats.healthy() {
            assert!(Instant::now() < deadline, "the blackholed shard was never dialed");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Meanwhile the other shard's publishes are answered (they waited the whole
        // connect while the engine connected blocking).
        let started = Instant::now();
        for i in 0..10u64 {
            assert_eq!(p.publish_acked(live, format!("during-{i}").into_bytes()), i + 2);
        }
        assert!(started.elapsed() < SILENT_TIMEOUT, "publishes waited for the blackholed shard");
        // The blackholed shard's publish is refused, typed and retryable, once its connect
        // is given up: not hung.
        let answer = stuck.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("unavailable"), "{answer}");
        // And the live shard still answers.
        assert_eq!(p.publish_acked(live, &b"after"[..]), 12);
    }

    fn a_publish_meeting_tryagain_mid_migration_is_acknowledged_in_order(backend) {
        let Some(cluster) = RedisCluster::start("tryagain", 3) else { return };
        let (a, b) = (node(backend, &cluster, "ta"), node(backend, &cluster, "tb"));
        let (room, slot, from) = one_room_per_shard(&cluster, "tryagain").swap_remove(0);
        let to = (from + 1) % cluster.nodes.len();
        let mut reader = Client::connect(b.addr, "reader");
        let alias = reader.join(&room);
        // No device, no publish ids: the room's window key never exists, so once the
        // room's keys moved mid-migration the script (declaring all three) meets a key
        // missing on the importing shard: TRYAGAIN until the slot is handed over.
        let mut p = Client::connect(a.addr, "alice");
        let pa = p.join(&room);
        for i in 1..=10u64 {
            assert_eq!(p.publish_acked(pa, format!("m-{i}").into_bytes()), i);
        }
        cluster.begin_migration(slot, from, to);
        // Ten publishes at once: the first meets TRYAGAIN, the rest must not overtake it.
        let ids: Vec<u64> = (11..=20u64)
            .map(|i| p.publish(pa, format!("m-{i}").into_bytes()))
            .collect();
        let deadline = Instant::now() + WAIT;
        while tryagains(&cluster, to) == 0 {
            assert!(Instant::now() < deadline, "no publish met TRYAGAIN");
            std::thread::sleep(Duration::from_millis(2));
        }
        cluster.finish_migration(slot, to);
        // Acknowledged without the phone's retry, in the order sent.
        let seqs: Vec<u64> = ids
            .iter()
            .map(|&id| {
                match p.wait_for(|e| {
                    matches!(e, Event::PubAck { msg_id, .. } if *msg_id == id)
                        || matches!(e, Event::Error(err) if err.reference == id)
                }) {
                    Event::PubAck { seq, .. } => seq,
                    other => panic!("publish {id} refused: {other:?}"),
                }
            })
            .collect();
        assert_eq!(seqs, (11..=20).collect::<Vec<_>>());
        let got = reader.read_through(alias, 20);
        for (seq, payload) in got {
            assert_eq!(payload, Bytes::from(format!("m-{seq}")), "the order sent");
        }
        keys_only_on(&cluster, slot, to);
    }

    fn every_open_in_flight_when_a_shards_command_connection_drops_is_answered(backend) {
        let Some(cluster) = RedisCluster::start("cmd-kill", 3) else { return };
        let a = node(backend, &cluster, "ck");
        // Channels on shard 1 (not the seed): opens on its command connection.
        let channels: Vec<String> = (0..)
            .map(|i| format!("news:cmd-kill-{i}"))
            .filter(|c| cluster.owner_of(cluster.slot(&format!("pabal:{{c:{c}}}:m"))) == 1)
            .take(64)
            .collect();
        let bound = opens_answered_despite_killed_commands(&a, &cluster.nodes[1], &channels);
        eprintln!("bound {bound} of {}", channels.len());
    }

    fn an_open_meeting_tryagain_mid_migration_is_retried_without_resetting_its_connection(backend) {
        let Some(MidMigration { cluster, b, mut bob, moving, slot, to, before, .. }) =
            open_mid_migration(backend, "open-tryagain")
        else {
            return;
        };
        cluster.finish_migration(slot, to);
        // Bound once the slot is handed over; or, where handing it over took longer than
        // the open's retries (five redirects and retries together, about a second: a
        // loaded machine), refused typed and retryable, and the phone's retry binds.
        match bob.wait_for(|e| matches!(e, Event::Bound { .. } | Event::Error(_))) {
            Event::Bound { room, .. } => {
                assert_eq!(room.name.as_ref().map(|n| n.as_str()), Some(moving.as_str()));
            }
            Event::Error(e) => {
                assert_eq!(e.code, pabal_codec::ErrorCode::Overloaded, "{e:?}");
                assert!(!e.fatal, "{e:?}");
                bob.subscribe(&moving);
            }
            _ => unreachable!(),
        }
        // The TRYAGAIN was an answer, not a broken connection: the command connections
        // to the importing shard are the ones from before (each reset failed whatever
        // else was in flight on it).
        let after = command_clients(&cluster, to);
        for id in &before {
            assert!(after.contains(id), "command connection {id} was reset: {after:?}");
        }
        // Counted by kind: the ASK that sent the open to the importing shard, the
        // TRYAGAIN it met there.
        let stats = b.cluster().unwrap().clone();
        assert!(stats.retries_of(RetryKind::Ask) >= 1);
        assert!(stats.retries_of(RetryKind::TryAgain) >= 1);
        let metrics = get_anonymous(with_ops_routes(&b), "/metrics").body;
        let tryagain = metrics
            .lines()
            .find_map(|l| l.strip_prefix("pabal_cluster_engine_retries_total{kind=\"tryagain\"} "))
            .and_then(|n| n.trim().parse::<u64>().ok());
        assert!(tryagain.is_some_and(|n| n >= 1), "{metrics}");
        // And the channel works through both nodes.
        let seqs = Client::publish_all(b.addr, &moving, "bob", 3);
        assert_eq!(seqs, vec![1, 2, 3]);
    }

    fn an_open_meeting_tryagain_past_its_retries_is_refused_typed_and_opened_by_the_next_bind(backend) {
        let Some(MidMigration { cluster, b, mut bob, moving, slot, to, .. }) =
            open_mid_migration(backend, "open-given-up")
        else {
            return;
        };
        // The migration stays half done: the open meets TRYAGAIN at every try, and after
        // five redirects and retries together it is given up, refused typed and
        // retryable (it was left waiting).
        match bob.wait_for(|e| matches!(e, Event::Bound { .. } | Event::Error(_))) {
            Event::Error(e) => {
                assert_eq!(e.code, pabal_codec::ErrorCode::Overloaded, "{e:?}");
                assert!(!e.fatal, "{e:?}");
            }
            other => panic!("bound mid-migration: {other:?}"),
        }
        let stats = b.cluster().unwrap().clone();
        assert!(stats.retries_given_up.load(Ordering::Relaxed) >= 1);
        // Once the slot is handed over, the phone's retry opens it.
        cluster.finish_migration(slot, to);
        bob.subscribe(&moving);
        assert_eq!(Client::publish_all(b.addr, &moving, "bob", 1), vec![1]);
    }
}

/// The meta key of channel `name`.
fn channel_meta(name: &str) -> String {
    format!("pabal:{{c:{name}}}:m")
}

/// Shard `n`'s command connections (not pub/sub, not the `redis-cli` asking): their ids.
fn command_clients(cluster: &RedisCluster, n: usize) -> Vec<String> {
    cluster.nodes[n]
        .cli(&["CLIENT", "LIST", "TYPE", "normal"])
        .lines()
        .filter(|l| l.starts_with("id=") && !l.contains("cmd=client|list"))
        .filter_map(|l| l.split(' ').next().map(str::to_owned))
        .collect()
}

/// How many commands shard `n` answered `TRYAGAIN` so far.
fn tryagains(cluster: &RedisCluster, n: usize) -> u64 {
    cluster.nodes[n]
        .cli(&["INFO", "errorstats"])
        .lines()
        .find_map(|l| l.strip_prefix("errorstat_TRYAGAIN:count="))
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or(0)
}

/// Two nodes on a three-shard cluster with a channel's slot half migrated (keys moved,
/// not handed over) and node b's phone's open of that channel sent into it and answered
/// `TRYAGAIN` at least once.
struct MidMigration {
    cluster: RedisCluster,
    /// Node a, which opened the channel before the migration.
    _a: TestRelay,
    _alice: Client,
    b: TestRelay,
    /// Node b's phone, whose SUBSCRIBE of `moving` waits for its open.
    bob: Client,
    moving: String,
    slot: u16,
    /// The importing shard.
    to: usize,
    /// The importing shard's command connections before the migration.
    before: Vec<String>,
}

fn open_mid_migration(backend: BackendKind, name: &str) -> Option<MidMigration> {
    let cluster = RedisCluster::start(name, 3)?;
    let (a, b) = (node(backend, &cluster, "oa"), node(backend, &cluster, "ob"));
    let (from, to) = (1, 2);
    let channel_on = |shard: usize, prefix: &str| -> String {
        (0..)
            .map(|i| format!("news:{prefix}-{i}"))
            .find(|c| cluster.owner_of(cluster.slot(&channel_meta(c))) == shard)
            .unwrap()
    };
    let (moving, other) = (channel_on(from, "moving"), channel_on(to, "other"));
    let slot = cluster.slot(&channel_meta(&moving));
    // Node a opens the channel: its meta hash (the epoch) exists from now on, its stream
    // not (nothing published), so mid-migration OPEN (declaring both) finds one key on
    // the importing shard and not the other: TRYAGAIN.
    let mut alice = Client::connect(a.addr, "alice");
    alice.subscribe(&moving);
    // Node b's command connection to the importing shard, in use before.
    let mut bob = Client::connect(b.addr, "bob");
    bob.subscribe(&other);
    let before = command_clients(&cluster, to);
    assert!(!before.is_empty());
    let tryagains_before = tryagains(&cluster, to);
    cluster.begin_migration(slot, from, to);
    bob.send(&ClientFrame::Subscribe(Subscribe {
        room: false,
        name: Text::from(moving.as_str()),
    }));
    let deadline = Instant::now() + WAIT;
    while tryagains(&cluster, to) == tryagains_before {
        assert!(Instant::now() < deadline, "the open never met TRYAGAIN");
        std::thread::sleep(Duration::from_millis(2));
    }
    Some(MidMigration {
        cluster,
        _a: a,
        _alice: alice,
        b,
        bob,
        moving,
        slot,
        to,
        before,
    })
}
