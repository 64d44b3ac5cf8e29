//! End-to-end: where a cluster node's engine runs (`cluster.engine_thread`). By default each
//! worker runs its engine itself, the Redis connections on the worker's own poll (the other
//! cluster tests run that way); with `engine_thread = true` each worker has a thread of its
//! own for it. Both must keep the same contract: this file runs the cluster's delivery tests
//! with the engine on its own thread, and checks which threads each placement starts and
//! that a node whose engine runs on its worker is woken by Redis' answers alone.
//!
//! The tests here take one lock: the thread count is the process's, and a test starting
//! engine threads beside it would change it.

#![allow(clippy::unwrap_used)] // reason: tests

use std::sync::Mutex;

use pabal_relay::cluster::ClusterConfig;
use pabal_relay::io::BackendKind;
use pabal_testkit::redis::{
    RedisServer, filled_despite_killed_subscriptions, opens_answered_despite_killed_commands,
};
use pabal_testkit::{Client, TestRelay, per_backend};

/// Held by every test of this file (see the module doc).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A cluster node on `redis`, two workers, named `id`, its engines on threads of their own
/// when `engine_thread`.
fn node(backend: BackendKind, redis: &RedisServer, id: &str, engine_thread: bool) -> TestRelay {
    let cluster = ClusterConfig {
        redis: vec![redis.url()],
        node_id: Some(id.into()),
        engine_thread,
        ..ClusterConfig::default()
    };
    TestRelay::cluster_node(backend, cluster, |c| c.retention.max_messages = 10_000)
}

/// This process's threads named `pabal-engine-*`.
fn engine_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("pabal-engine"))
        .count()
}

per_backend! {
    fn each_placement_starts_the_threads_it_says_and_answers_publishes(backend) {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let Some(redis) = RedisServer::start("engine-placement") else { return };
        let before = engine_threads();
        // On the workers: no thread, and every publish is acknowledged with its sequence:
        // nothing but Redis' answer (seen by the worker's backend watching the engine's
        // poll) wakes the worker between one publish and the next.
        let inline = node(backend, &redis, "inline", false);
        assert_eq!(engine_threads(), before, "an engine on its worker starts no thread");
        let mut p = Client::connect(inline.addr, "alice");
        let alias = p.join("room:placement");
        for i in 1..=50u64 {
            let seq = p.publish_acked(alias, format!("m{i}").into_bytes());
            assert_eq!(seq, i, "PUBACK {i} carries Redis' sequence");
        }
        drop(p);
        drop(inline);
        // On threads of their own: one per worker, gone with the node.
        let threaded = node(backend, &redis, "threaded", true);
        assert_eq!(engine_threads(), before + 2, "one engine thread per worker");
        let mut p = Client::connect(threaded.addr, "bob");
        let alias = p.join("room:placement");
        let seq = p.publish_acked(alias, &b"after"[..]);
        assert_eq!(seq, 51, "the next sequence, from either placement");
        drop(p);
        drop(threaded);
        assert_eq!(engine_threads(), before, "the engine threads end with their node");
    }

    fn three_nodes_see_one_order_with_engine_threads(backend) {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let Some(redis) = RedisServer::start("placement-order") else { return };
        // One node with its engines on threads, two on their workers: one order for all.
        let nodes = [
            node(backend, &redis, "t1", true),
            node(backend, &redis, "w2", false),
            node(backend, &redis, "t3", true),
        ];
        let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
        Client::one_order_on_every_node(&addrs, "room:placement-order", 150);
    }

    fn lost_subscriptions_are_filled_with_engine_threads(backend) {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let Some(redis) = RedisServer::start("placement-kill") else { return };
        let (a, b) = (node(backend, &redis, "ta", true), node(backend, &redis, "tb", true));
        filled_despite_killed_subscriptions(a.addr, b.addr, "room:placement-kill", redis.port, 400);
    }

    fn opens_in_flight_are_answered_with_engine_threads(backend) {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let Some(redis) = RedisServer::start("placement-cmd-kill") else { return };
        let a = node(backend, &redis, "tk", true);
        let channels: Vec<String> = (0..64).map(|i| format!("news:placement-{i}")).collect();
        opens_answered_despite_killed_commands(&a, &redis, &channels);
    }
}
