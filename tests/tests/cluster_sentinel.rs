//! End-to-end: relay nodes on one Redis master behind Sentinel (`cluster.topology =
//! "sentinel"`, `sentinel://` seeds), once per I/O backend. The master is killed; the
//! sentinel promotes its replica; the nodes ask the sentinel again, publishes are refused
//! `unavailable` meanwhile and taken again after, and a phone on the other node sees one
//! unbroken order. A sentinel that stops answering while the engine asks it again holds
//! up nothing else on the engine. With `cluster.wait_replicas = 1` a publish is
//! acknowledged once the replica holds it, and refused `unavailable` while it is down.

#![allow(clippy::unwrap_used)] // reason: tests

use std::time::{Duration, Instant};

use pabal_relay::cluster::{ClusterConfig, Topology};
use pabal_relay::io::BackendKind;
use pabal_testkit::redis::RedisSentinel;
use pabal_testkit::{Client, TestRelay, WAIT, per_backend};

fn node(backend: BackendKind, sentinel: &RedisSentinel, id: &str) -> TestRelay {
    node_with(backend, sentinel, id, |_| {})
}

fn node_with(
    backend: BackendKind,
    sentinel: &RedisSentinel,
    id: &str,
    tweak: impl FnOnce(&mut ClusterConfig),
) -> TestRelay {
    let mut cluster = ClusterConfig {
        topology: Topology::Sentinel,
        redis: vec![sentinel.url()],
        node_id: Some(id.into()),
        ..ClusterConfig::default()
    };
    tweak(&mut cluster);
    TestRelay::cluster_node(backend, cluster, |_| {})
}

/// Long enough that only an engine waiting on the silent sentinel delays a publish
/// by it (the client gives up after `WAIT`, 20 s).
const SILENT_TIMEOUT: Duration = Duration::from_secs(30);

per_backend! {
    fn a_failover_behind_sentinel_is_followed(backend) {
        let Some(mut sentinel) = RedisSentinel::start("failover") else { return };
        let (a, b) = (node(backend, &sentinel, "fa"), node(backend, &sentinel, "fb"));
        const ROOM: &str = "room:cluster-sentinel";
        let mut reader = Client::connect(b.addr, "reader");
        let alias = reader.join(ROOM);
        let mut p = Client::connect(a.addr, "alice");
        let pa = p.join(ROOM);
        let mut acked: Vec<u64> = (0..10)
            .map(|i| p.publish_acked(pa, format!("before-{i}").into_bytes()))
            .collect();
        assert_eq!(acked, (1..=10).collect::<Vec<_>>());
        // The replica holds all of it before the master dies (replication is asynchronous:
        // what it had not received would be lost with the master).
        let meta = format!("pabal:{{r:{ROOM}}}:m");
        let deadline = Instant::now() + WAIT;
        while sentinel.replica.cli(&["HGET", &meta, "s"]).trim() != "10" {
            assert!(Instant::now() < deadline, "the replica never caught up");
            std::thread::sleep(Duration::from_millis(20));
        }
        let old = sentinel.master.port;
        sentinel.master.kill();
        // Publishes are refused (typed, retryable) until the nodes follow the sentinel to
        // the promoted replica; then they are taken again.
        let deadline = Instant::now() + WAIT * 2;
        let mut refused = 0;
        let mut i = 0;
        while acked.len() < 20 {
            assert!(Instant::now() < deadline, "publishes never recovered after the failover");
            match p.publish_or_unavailable(pa, format!("after-{i}").into_bytes()) {
                Some(seq) => acked.push(seq),
                None => {
                    refused += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            i += 1;
        }
        assert_ne!(sentinel.master_port(), Some(old), "the sentinel promoted the replica");
        assert!(refused > 0, "publishes were refused while the master was gone");
        assert!(acked.windows(2).all(|w| w[0] < w[1]), "{acked:?}");
        // The phone on the other node, whose connection stayed up, has it all in order.
        let last = *acked.last().unwrap();
        let got = reader.read_through(alias, last);
        for seq in &acked {
            assert!(got.contains_key(seq));
        }
    }

    fn a_silent_sentinel_holds_up_no_publish(backend) {
        let Some(sentinel) = RedisSentinel::start("silent") else { return };
        let a = node_with(backend, &sentinel, "sa", |c| c.connect_timeout = SILENT_TIMEOUT);
        const ROOM: &str = "room:cluster-sentinel-silent";
        let mut p = Client::connect(a.addr, "alice");
        let pa = p.join(ROOM);
        assert_eq!(p.publish_acked(pa, &b"before"[..]), 1);
        // The sentinel accepts connections but answers nothing; the node's pub/sub
        // connection to the master is cut, so its engine asks the sentinel again (and
        // gets no answer before SILENT_TIMEOUT). The command connection is up meanwhile:
        // publishes must keep being answered (they waited the whole timeout while the
        // sentinel was asked on a blocking connection).
        sentinel.pause();
        sentinel.master.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        let started = Instant::now();
        for i in 0..10u64 {
            let seq = p.publish_acked(pa, format!("during-{i}").into_bytes());
            assert_eq!(seq, i + 2);
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            started.elapsed() < SILENT_TIMEOUT,
            "publishes waited for the silent sentinel"
        );
        sentinel.resume();
    }

    fn acknowledgements_wait_for_the_replica(backend) {
        let Some(mut sentinel) = RedisSentinel::start("wait") else { return };
        let a = node_with(backend, &sentinel, "wa", |c| {
            c.wait_replicas = 1;
            c.wait_timeout = Duration::from_millis(500);
        });
        const ROOM: &str = "room:cluster-sentinel-wait";
        let mut p = Client::connect(a.addr, "alice");
        let pa = p.join(ROOM);
        for i in 1..=5u64 {
            assert_eq!(p.publish_acked(pa, format!("held-{i}").into_bytes()), i);
        }
        // Every acknowledged publish is on the replica already (WAIT said so): no waiting.
        let meta = format!("pabal:{{r:{ROOM}}}:m");
        assert_eq!(sentinel.replica.cli(&["HGET", &meta, "s"]).trim(), "5");
        sentinel.replica.kill();
        // The master runs the script, but no replica acknowledges it: refused, retryable.
        assert_eq!(p.publish_or_unavailable(pa, &b"unreplicated"[..]), None);
        assert_eq!(p.publish_or_unavailable(pa, &b"unreplicated-2"[..]), None);
    }
}
