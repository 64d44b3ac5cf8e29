//! End-to-end: a user across the nodes of a cluster. Presence counts a phone on any node,
//! `limits.max_connections_per_user` holds on every node together, a user's rooms and a
//! room's member count are the engine's (whichever node made the change, connected or
//! not), and a membership change meeting a slot that moved (`MOVED`) or a slot mid-migration
//! (`TRYAGAIN`) succeeds without the caller retrying. Real relay nodes on loopback and a
//! real `redis-server` (a three-shard Redis Cluster for the slot moves), once per I/O
//! backend.

#![allow(clippy::unwrap_used)] // reason: tests

use std::time::Instant;

use pabal_codec::{ErrorCode, Event};
use pabal_relay::cluster::{ClusterConfig, Topology};
use pabal_relay::io::BackendKind;
use pabal_testkit::http::{KEY, http};
use pabal_testkit::redis::{RedisCluster, RedisServer};
use pabal_testkit::{Client, TestRelay, WAIT, per_backend};
use serde_json::{Value, json};

/// A cluster node named `id` on `redis` (two workers), at most `max_conns` connections
/// per user.
fn node(backend: BackendKind, redis: &RedisServer, id: &str, max_conns: usize) -> TestRelay {
    let cluster = ClusterConfig {
        redis: vec![redis.url()],
        node_id: Some(id.into()),
        ..ClusterConfig::default()
    };
    TestRelay::cluster_node(backend, cluster, |c| {
        c.limits.max_connections_per_user = max_conns;
    })
}

/// A node named `id` on the three-shard `cluster`, given its first master as seed.
fn sharded_node(backend: BackendKind, cluster: &RedisCluster, id: &str) -> TestRelay {
    let config = ClusterConfig {
        topology: Topology::Cluster,
        redis: vec![cluster.urls()[0].clone()],
        node_id: Some(id.into()),
        ..ClusterConfig::default()
    };
    TestRelay::cluster_node(backend, config, |_| {})
}

/// A server-API call to `node`.
fn call(node: &TestRelay, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let addr = node.handle().control_addr().unwrap();
    http(addr, method, path, Some(KEY), body.as_deref())
}

/// `GET /v1/users/{user}/presence` through `node`.
fn presence(node: &TestRelay, user: &str) -> Value {
    let (status, body) = call(node, "GET", &format!("/v1/users/{user}/presence"), None);
    assert_eq!(status, 200, "{body}");
    body
}

/// Asks `node` until `user`'s presence satisfies `done`; the answer that did.
fn presence_until(node: &TestRelay, user: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let p = presence(node, user);
        if done(&p) {
            return p;
        }
        assert!(Instant::now() < deadline, "presence stuck at {p}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A HELLO as `user` to `addr`: whether it was welcomed (`Some(client)`) or refused with
/// `LimitExceeded` (`None`); anything else fails the test.
fn hello(addr: std::net::SocketAddr, user: &str) -> Option<Client> {
    let mut c = Client::connect_raw(addr, user, user.as_bytes());
    match c.next_event(WAIT) {
        Some(Event::Welcome(_)) => Some(c),
        Some(Event::Error(e)) => {
            assert_eq!(e.code, ErrorCode::LimitExceeded, "{}", e.message);
            assert!(e.fatal);
            None
        }
        other => panic!("{user}: expected WELCOME or ERROR, got {other:?}"),
    }
}

per_backend! {
    fn a_phone_on_one_node_makes_its_user_present_through_another(backend) {
        let Some(redis) = RedisServer::start("presence-across") else { return };
        let (a, b) = (node(backend, &redis, "pa", 16), node(backend, &redis, "pb", 16));
        assert_eq!(presence(&a, "ann")["online"], false);
        let phone = Client::connect(b.addr, "ann");
        let second = Client::connect(b.addr, "ann");
        // Through node a, which holds no connection of ann's.
        let p = presence(&a, "ann");
        assert_eq!(p["online"], true, "{p}");
        assert_eq!(p["connections"], 2, "{p}");
        assert_eq!(p["nodes"], json!(["pb"]), "{p}");
        let third = Client::connect(a.addr, "ann");
        let p = presence(&b, "ann");
        assert_eq!(p["connections"], 3, "{p}");
        assert_eq!(p["nodes"], json!(["pa", "pb"]), "{p}");
        // Closed phones stop counting once their node has seen them go.
        drop((phone, second));
        presence_until(&a, "ann", |p| p["connections"] == 1);
        drop(third);
        let p = presence_until(&b, "ann", |p| p["online"] == false);
        assert_eq!(p["nodes"], json!([]), "{p}");
    }

    fn a_hello_past_the_cap_on_every_node_together_is_refused(backend) {
        let Some(redis) = RedisServer::start("presence-cap") else { return };
        let (a, b) = (node(backend, &redis, "ca", 2), node(backend, &redis, "cb", 2));
        // One connection on each node: two in all, the cap, though each node holds one.
        let first = hello(a.addr, "ann").expect("the first is welcomed");
        let _second = hello(b.addr, "ann").expect("the second is welcomed");
        assert!(hello(a.addr, "ann").is_none(), "a third on node a is refused");
        assert!(hello(b.addr, "ann").is_none(), "a third on node b is refused");
        // Another user is not held back by ann's.
        let _bob = hello(a.addr, "bob").expect("bob is welcomed");
        // Once node a has seen one go, there is room for one more, on either node.
        drop(first);
        presence_until(&b, "ann", |p| p["connections"] == 1);
        let _third = hello(b.addr, "ann").expect("room again after a close");
        assert!(hello(a.addr, "ann").is_none(), "at the cap again");
    }

    fn a_rooms_member_count_and_a_users_rooms_are_the_same_on_every_node(backend) {
        let Some(redis) = RedisServer::start("presence-members") else { return };
        let (a, b) = (node(backend, &redis, "ma", 16), node(backend, &redis, "mb", 16));
        let (status, body) = call(&a, "POST", "/v1/rooms/club/members", Some(json!({"users": ["ann"]})));
        assert_eq!(status, 200, "{body}");
        let (status, body) = call(&b, "POST", "/v1/rooms/club/members", Some(json!({"users": ["bob", "cy"]})));
        assert_eq!(status, 200, "{body}");
        let (status, body) = call(&b, "POST", "/v1/channels/news/subscribers", Some(json!({"users": ["ann"]})));
        assert_eq!(status, 200, "{body}");
        for n in [&a, &b] {
            let (status, info) = call(n, "GET", "/v1/rooms/club", None);
            assert_eq!(status, 200, "{info}");
            assert_eq!(info["members"], 3, "{info}");
            // Nobody is connected: the rooms are the engine's, not a node's directory's.
            let (status, rooms) = call(n, "GET", "/v1/users/ann/rooms", None);
            assert_eq!(status, 200, "{rooms}");
            let mut rooms: Vec<(String, String)> = rooms["rooms"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| (r["kind"].as_str().unwrap().to_owned(), r["name"].as_str().unwrap().to_owned()))
                .collect();
            rooms.sort();
            assert_eq!(
                rooms,
                vec![("channel".to_owned(), "news".to_owned()), ("room".to_owned(), "club".to_owned())]
            );
        }
        let (status, body) = call(&a, "DELETE", "/v1/rooms/club/members/cy", None);
        assert_eq!(status, 200, "{body}");
        let (_, info) = call(&b, "GET", "/v1/rooms/club", None);
        assert_eq!(info["members"], 2, "{info}");
    }

    fn a_membership_change_meeting_a_moved_slot_succeeds_without_a_retry(backend) {
        let Some(cluster) = RedisCluster::start("presence-moved", 3) else { return };
        let n = sharded_node(backend, &cluster, "mv");
        let room = "moving-club";
        // A change is the room's script, then the user's: the user's (empty) slot moves
        // behind the node's back, so its stale map sends the user's script to the old
        // shard, which answers MOVED. (The room's slot is met first by the room's open,
        // which follows MOVED already.)
        let user_key = "pabal:{u:ann}:r";
        let slot = cluster.slot(user_key);
        assert_ne!(slot, cluster.slot(&format!("pabal:{{r:{room}}}:m")));
        let from = cluster.owner_of(slot);
        let to = (from + 1) % cluster.nodes.len();
        // Moved the way a reshard moves it (IMPORTING first: the new owner's claim then
        // carries a bumped config epoch). A bare SETSLOT NODE on every node raced the
        // cluster's gossip: the old owner's claim, at a higher epoch, could win back one
        // node's view, and the two shards answered MOVED to each other (1 run in ~15).
        cluster.migrate(slot, from, to);
        let path = format!("/v1/rooms/{room}/members");
        let (status, body) = call(&n, "POST", &path, Some(json!({"users": ["ann"]})));
        assert_eq!(status, 200, "the first call succeeds: {body}");
        assert_eq!(body["added"], json!(["ann"]), "{body}");
        assert_eq!(cluster.nodes[to].cli(&["HLEN", user_key]).trim(), "1");
        assert_eq!(cluster.keys_in_slot(from, slot), 0, "nothing written on the old shard");
        let (_, rooms) = call(&n, "GET", "/v1/users/ann/rooms", None);
        assert_eq!(rooms["rooms"], json!([{"name": room, "kind": "room"}]), "{rooms}");
    }
    fn a_membership_change_meeting_tryagain_mid_migration_succeeds_without_a_retry(backend) {
        let Some(cluster) = RedisCluster::start("presence-tryagain", 3) else { return };
        let n = sharded_node(backend, &cluster, "ta");
        // ann belongs to one room: her rooms hash exists, her blocks set does not.
        let (status, body) = call(&n, "POST", "/v1/rooms/first/members", Some(json!({"users": ["ann"]})));
        assert_eq!(status, 200, "{body}");
        let slot = cluster.slot("pabal:{u:ann}:r");
        assert_ne!(slot, cluster.slot("pabal:{r:second}:m"));
        let from = cluster.owner_of(slot);
        let to = (from + 1) % cluster.nodes.len();
        // The user's slot starts migrating, its keys still on the old shard: a script on
        // both of the user's keys, one there and one missing, is answered TRYAGAIN.
        let id = |s: usize| cluster.nodes[s].cli(&["CLUSTER", "MYID"]).trim().to_owned();
        let (from_id, to_id) = (id(from), id(to));
        let slot_text = slot.to_string();
        assert_eq!(cluster.nodes[to].cli(&["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &from_id]).trim(), "OK");
        assert_eq!(cluster.nodes[from].cli(&["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &to_id]).trim(), "OK");
        let tryagains = || -> u64 {
            cluster.nodes[from]
                .cli(&["INFO", "errorstats"])
                .lines()
                .find_map(|l| l.strip_prefix("errorstat_TRYAGAIN:count="))
                .and_then(|c| c.trim().parse().ok())
                .unwrap_or(0)
        };
        let control = n.handle().control_addr().unwrap();
        let join = std::thread::spawn(move || {
            let body = json!({"users": ["ann"]}).to_string();
            http(control, "POST", "/v1/rooms/second/members", Some(KEY), Some(&body))
        });
        // Once the user's script met TRYAGAIN, the migration completes (keys moved, the
        // slot handed over); the step, sent again, follows it.
        let deadline = Instant::now() + WAIT;
        while tryagains() == 0 {
            assert!(Instant::now() < deadline, "the user's script never met TRYAGAIN");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        cluster.migrate(slot, from, to);
        let (status, body) = join.join().unwrap();
        assert_eq!(status, 200, "the call succeeds: {body}");
        assert_eq!(body["added"], json!(["ann"]), "{body}");
        assert_eq!(cluster.nodes[to].cli(&["HLEN", "pabal:{u:ann}:r"]).trim(), "2");
    }
}
