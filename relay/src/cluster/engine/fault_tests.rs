//! The engine against Redis faults found in review (s16): a shard leaving the slot map
//! with answers held for their copies, a subscription refused, publishes of a room
//! answered unrun. Each drives a real engine on the test's thread (inline driver), some
//! against a fake Redis on a thread of the test's own; none needs a redis-server.

#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests fail loudly on purpose

use std::sync::Arc;

use bytes::Bytes;

use super::super::resp::Value;
use super::super::slots::SlotMap;
use super::super::{ClusterConfig, ClusterStats, EngineEvent, RedisAddr, Topology};
use super::{Driver, Engine, EngineHandle};

fn engine_of(handle: &mut EngineHandle) -> &mut Engine {
    match &mut handle.driver {
        Driver::Inline { engine, .. } => engine,
        Driver::Thread { .. } => unreachable!("spawned on the test's thread"),
    }
}

fn spawn(config: &ClusterConfig) -> (EngineHandle, Arc<ClusterStats>) {
    let stats = Arc::new(ClusterStats::default());
    let handle = EngineHandle::spawn(0, config, "t", Box::new(|| {}), stats.clone())
        .expect("the engine starts");
    (handle, stats)
}

/// A `CLUSTER SLOTS` answer: each range served by 127.0.0.1 at its port.
fn slots_reply(ranges: &[(i64, i64, u16)]) -> Value {
    Value::Array(Some(
        ranges
            .iter()
            .map(|&(a, b, port)| {
                Value::Array(Some(vec![
                    Value::Int(a),
                    Value::Int(b),
                    Value::Array(Some(vec![
                        Value::Bulk(Some(Bytes::from_static(b"127.0.0.1"))),
                        Value::Int(i64::from(port)),
                    ])),
                ]))
            })
            .collect(),
    ))
}

/// A publish Redis answered whose copy had not been read when a new slot map dropped its
/// shard (a failover, a resharding) reaches the worker, unordered, as when the shard's
/// pub/sub connection is lost; before, it went with the shard and the worker never heard
/// of the publish.
#[test]
fn an_answer_waiting_for_its_copy_survives_its_shard_leaving_the_map() {
    let config = ClusterConfig {
        topology: Topology::Cluster,
        // Nothing listens there: no connection comes up, the maps are applied by hand.
        redis: vec!["redis://127.0.0.1:1".into()],
        ..ClusterConfig::default()
    };
    let (mut handle, _stats) = spawn(&config);
    let e = engine_of(&mut handle);
    let seed = RedisAddr {
        host: "127.0.0.1".into(),
        port: 1,
    };
    let two = SlotMap::from_cluster_slots(&slots_reply(&[(0, 8000, 1), (8001, 16383, 2)]), &seed)
        .unwrap();
    e.apply_map(two);
    assert_eq!(e.shards.len(), 2);
    // Shard 1 answered publish 7; its copy has not been read.
    let answer = EngineEvent::Published {
        ticket: 7,
        epoch: 1,
        seq: 1,
        repeated: false,
        ordered: true,
    };
    e.shards[1].copies.answered(7);
    e.shards[1].copies.ready(7, answer, e.woke, &mut e.out);
    assert!(e.out.is_empty(), "held for its copy: {:?}", e.out);
    // Its slots moved to the other shard.
    let one = SlotMap::from_cluster_slots(&slots_reply(&[(0, 16383, 1)]), &seed).unwrap();
    e.apply_map(one);
    assert!(
        matches!(
            e.out.as_slice(),
            [EngineEvent::Published {
                ticket: 7,
                seq: 1,
                ordered: false,
                ..
            }]
        ),
        "publish 7's answer, unordered: {:?}",
        e.out
    );
}
