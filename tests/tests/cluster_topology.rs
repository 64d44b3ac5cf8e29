//! End-to-end: relay nodes on a three-shard Redis Cluster (`cluster.topology =
//! "cluster"`, one seed address), once per I/O backend. Rooms land on the shard of their
//! hash slot (checked through the cluster's own slot map), every node's phones see one
//! order of every room, a shard's lost pub/sub connections are repaired from the stream,
//! and a slot that moved is followed (`MOVED`).

#![allow(clippy::unwrap_used)] // reason: tests

use bytes::Bytes;
use pabal_codec::ClientSession;
use pabal_relay::cluster::{ClusterConfig, Topology};
use pabal_relay::io::BackendKind;
use pabal_testkit::redis::{RedisCluster, filled_despite_killed_subscriptions};
use pabal_testkit::{Client, TestRelay, per_backend};

/// A node on `cluster`, given only its first master as seed: the rest comes from the
/// slot map.
fn node(backend: BackendKind, cluster: &RedisCluster, id: &str) -> TestRelay {
    let config = ClusterConfig {
        topology: Topology::Cluster,
        redis: vec![cluster.urls()[0].clone()],
        node_id: Some(id.into()),
        ..ClusterConfig::default()
    };
    TestRelay::cluster_node(backend, config, |c| c.retention.max_messages = 10_000)
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
}
