//! A cluster node killed with -9 under publishes (the real binary, `[cluster]` on a
//! private Redis): its phone resumes on another node (in this process) and loses nothing,
//! duplicates nothing.
//!
//! Membership lives on each node in this version, so the phone's user joins the room on
//! the surviving node too (from a second connection) before anything is published.

#![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

use std::time::{Duration, Instant};

use bytes::Bytes;
use pabal_codec::Event;
use pabal_relay::cluster::ClusterConfig;
use pabal_testkit::daemon::{Daemon, addr_in};
use pabal_testkit::redis::RedisServer;
use pabal_testkit::{Client, TempDir, TestRelay, WAIT};

const RELAY: &str = env!("CARGO_BIN_EXE_relay");
const ROOM: &str = "room:cluster-kill9";
const COUNT: u64 = 400;

#[test]
fn a_killed_nodes_phone_resumes_on_another_node_losing_nothing() {
    let Some(redis) = RedisServer::start("kill9") else {
        return;
    };
    let dir = TempDir::new("cluster-kill9");
    let config = dir.path("relay.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nworkers = 2\npin_workers = false\n\
             [log]\nlevel = \"info\"\n[control]\nlisten = \"\"\n\
             [limits]\npublish_rate = 1e9\npublish_burst = 1e9\n\
             [cluster]\nredis = [\"{}\"]\nnode_id = \"doomed\"\n",
            redis.url()
        ),
    )
    .unwrap();
    let mut doomed = Daemon::spawn(RELAY, &config, |_| {});
    let a = addr_in(&doomed.wait_log("relay listening"));
    let b = TestRelay::start(pabal_relay::io::BackendKind::Epoll, 2, |c| {
        c.cluster = Some(ClusterConfig {
            redis: vec![redis.url()],
            node_id: Some("survivor".into()),
            ..ClusterConfig::default()
        });
    });
    let mut reader = Client::connect(a, "reader");
    let alias = reader.join(ROOM);
    Client::connect(b.addr, "reader").join(ROOM);
    let addr = b.addr;
    let writer = std::thread::spawn(move || {
        let mut p = Client::connect(addr, "alice");
        let pa = p.join(ROOM);
        for i in 1..=COUNT {
            assert_eq!(p.publish_acked(pa, format!("m{i}").into_bytes()), i);
        }
    });
    let mut before: Vec<u64> = reader
        .messages(alias, 40)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(before, (1..=40).collect::<Vec<_>>());
    // kill -9 under the publishes: the phone's link dies with its node.
    doomed.signal(libc::SIGKILL);
    doomed.wait_exit();
    // What the phone had already taken in counts as read (its session's cursor is there).
    while let Some(event) = reader.next_event(Duration::ZERO) {
        if let Event::Message {
            alias: a,
            seq: Some(seq),
            ..
        } = event
            && a == alias
        {
            before.push(seq);
        }
    }
    let last_read = *before.last().unwrap();
    let session = reader.drop_link();
    let mut reader = Client::connect_with(b.addr, "reader", session);
    writer.join().unwrap();
    let mut after = Vec::new();
    let deadline = Instant::now() + WAIT;
    while after.last().copied() != Some(COUNT) {
        assert!(Instant::now() < deadline, "stuck after {:?}", after.last());
        match reader.next_event(Duration::from_millis(100)) {
            Some(Event::Message {
                alias: a,
                seq: Some(seq),
                payload,
                ..
            }) if a == alias => {
                assert_eq!(payload, Bytes::from(format!("m{seq}")));
                after.push(seq);
            }
            Some(Event::Gap { from, to, .. }) => panic!("gap {from}..={to} after the kill"),
            _ => {}
        }
    }
    assert_eq!(
        after,
        (last_read + 1..=COUNT).collect::<Vec<_>>(),
        "every message after the last one read, once, in order"
    );
}
