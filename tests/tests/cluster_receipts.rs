//! End-to-end: receipts' markers and the offline hand-off across cluster nodes. Markers
//! live in the engine (Redis), so a phone acking or reading on one node moves the marker a
//! phone on another node sees in its RECEIPT, every node answers the same unread counts
//! and receipts, and exactly one node decides each message's hand-off from every node's
//! acks. Real relay nodes on loopback and a real `redis-server`, once per I/O backend.

#![allow(clippy::unwrap_used)] // reason: tests

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pabal_codec::{Ack, ClientFrame, Event, Read as ReadFrame};
use pabal_relay::cluster::{ClusterConfig, Topology};
use pabal_relay::config::Config;
use pabal_relay::io::BackendKind;
use pabal_testkit::http::{KEY, http};
use pabal_testkit::redis::{RedisCluster, RedisServer};
use pabal_testkit::{Client, TestRelay, WAIT, per_backend};
use serde_json::{Value, json};

/// Three cluster nodes on `redis`, `tweak` applied to each one's configuration.
fn nodes(
    backend: BackendKind,
    redis: &RedisServer,
    prefix: &str,
    tweak: impl Fn(&mut Config),
) -> Vec<TestRelay> {
    let engine = ClusterConfig {
        redis: vec![redis.url()],
        ..ClusterConfig::default()
    };
    nodes_on(backend, &engine, prefix, tweak)
}

/// Three cluster nodes on `engine` (its `node_id` set per node).
fn nodes_on(
    backend: BackendKind,
    engine: &ClusterConfig,
    prefix: &str,
    tweak: impl Fn(&mut Config),
) -> Vec<TestRelay> {
    (1..=3)
        .map(|i| {
            let cluster = ClusterConfig {
                node_id: Some(format!("{prefix}{i}")),
                ..engine.clone()
            };
            TestRelay::cluster_node(backend, cluster, |c| {
                c.receipts.interval = Duration::from_millis(20);
                tweak(c);
            })
        })
        .collect()
}

/// A server-API call to `node`.
fn call(node: &TestRelay, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let addr = node.handle().control_addr().unwrap();
    http(addr, method, path, Some(KEY), body.as_deref())
}

/// Polls `GET path` on `node` until `done` holds of its answer (markers reach the engine
/// asynchronously).
fn until(node: &TestRelay, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = call(node, "GET", path, None);
        if status == 200 && done(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never held: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `user`'s markers in `GET /v1/rooms/{room}/receipts`: (delivered, read).
fn markers_of(body: &Value, user: &str) -> Option<(u64, u64)> {
    let m = body["members"]
        .as_array()?
        .iter()
        .find(|m| m["user"] == user)?;
    Some((m["delivered_up_to"].as_u64()?, m["read_up_to"].as_u64()?))
}

/// `(unread in room, total)` of a `GET /v1/users/{user}/unread` answer.
fn unread(body: &Value, room: &str) -> Option<(u64, u64)> {
    let r = body["rooms"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == room)?;
    Some((r["unread"].as_u64()?, body["total"].as_u64()?))
}

/// Waits for a RECEIPT naming `user` with these markers.
fn receipt_for(client: &mut Client, user: &str, delivered: u64, read: u64) {
    client.wait_for(|e| {
        matches!(e, Event::Receipt { members, .. }
            if members.iter().any(|m| m.user.as_str() == user && m.delivered == delivered && m.read == read))
    });
}

/// Waits for message `seq` on `alias`.
fn receive(client: &mut Client, alias: u32, seq: u64) {
    client.wait_for(
        |e| matches!(e, Event::Message { alias: a, seq: Some(s), .. } if *a == alias && *s == seq),
    );
}

/// ann on node 1 (a version-3 phone: RECEIPT frames) and bob on node 2 join `room`; ann
/// publishes 1..=3 and bob receives them. Their phones and aliases.
fn ann_and_bob(n: &[TestRelay], room: &str) -> ((Client, u32), (Client, u32)) {
    let mut ann = Client::connect(n[0].addr, "ann");
    let a = ann.join(room);
    let mut bob = Client::connect(n[1].addr, "bob");
    let b = bob.join(room);
    for i in 1..=3 {
        assert_eq!(ann.publish_acked(a, format!("m{i}")), i);
    }
    receive(&mut bob, b, 3);
    ((ann, a), (bob, b))
}

/// bob (on node 2, alias `b`) acks 3 and reads 2 while Redis is down; waits until node
/// 2 keeps them for the engine. Node 2's cluster stats.
fn acks_3_reads_2_kept_on_node_2(
    n: &[TestRelay],
    bob: &mut Client,
    b: u32,
) -> std::sync::Arc<pabal_relay::cluster::ClusterStats> {
    bob.send(&ClientFrame::Ack(Ack::from_pairs(&[(b, 3)])));
    bob.send(&ClientFrame::Read(ReadFrame { alias: b, seq: 2 }));
    let stats = n[1].cluster().unwrap().clone();
    let deadline = Instant::now() + WAIT;
    while stats
        .markers_waiting
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "bob's markers never waited for the engine"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    stats
}

/// Every node reads bob's markers (3, 2) in `room`, and ann's phone hears them.
fn bobs_3_2_reach_every_node_and_ann(n: &[TestRelay], room: &str, ann: &mut Client) {
    let receipts = format!("/v1/rooms/{room}/receipts");
    for node in n {
        until(
            node,
            &receipts,
            "bob's markers (3, 2) after recovery",
            |b| markers_of(b, "bob") == Some((3, 2)),
        );
    }
    receipt_for(ann, "bob", 3, 2);
}

/// One hand-off item: `(user, first_seq, last_seq, publisher)`.
type Item = (String, u64, u64, String);

/// The app server of the hand-off: answers 200 to every request and reports each
/// request's items as `(user, first_seq, last_seq, publisher)`.
fn app_server() -> (String, mpsc::Receiver<Vec<Item>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks/pabal", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let tx = tx.clone();
            std::thread::spawn(move || serve(stream, &tx));
        }
    });
    (url, rx)
}

fn serve(stream: TcpStream, tx: &mpsc::Sender<Vec<Item>>) {
    let mut out = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut len = 0;
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        while {
            line.clear();
            reader.read_line(&mut line).unwrap();
            !line.trim_end().is_empty()
        } {
            if let Some((n, v)) = line.split_once(':')
                && n.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        let items = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["user"].as_str().unwrap().to_string(),
                    i["first_seq"].as_u64().unwrap(),
                    i["last_seq"].as_u64().unwrap(),
                    i["publisher"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let _ = tx.send(items);
        if out
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .is_err()
        {
            return;
        }
    }
}

/// The hand-off's delay: long enough that an ACK sent as soon as a message arrives on
/// loopback reaches the engine well before it (the ACK is tested, not its speed).
const DELAY: Duration = Duration::from_secs(3);

per_backend! {
    fn an_ack_and_a_read_on_one_node_reach_receipts_and_unread_counts_on_every_node(backend) {
        let Some(redis) = RedisServer::start("receipts-markers") else { return };
        let n = nodes(backend, &redis, "m", |_| {});
        const ROOM: &str = "group:cr-markers";
        let ((mut ann, _), (mut bob, b)) = ann_and_bob(&n, ROOM);
        // Every node (node 3 holds no phone of bob's) counts bob's three unread.
        for node in &n {
            let body = until(node, "/v1/users/bob/unread", "bob's 3 unread", |b| {
                unread(b, ROOM) == Some((3, 3))
            });
            assert_eq!(body["rooms"].as_array().unwrap().len(), 1, "{body}");
        }

        // bob acknowledges on node 2: ann's phone on node 1 hears it.
        bob.send(&ClientFrame::Ack(Ack::from_pairs(&[(b, 3)])));
        receipt_for(&mut ann, "bob", 3, 0);
        // bob reads up to 2 on node 2: ann hears it, and every node counts one unread.
        bob.send(&ClientFrame::Read(ReadFrame { alias: b, seq: 2 }));
        receipt_for(&mut ann, "bob", 3, 2);
        for node in &n {
            until(node, "/v1/users/bob/unread", "bob's 1 unread", |b| {
                unread(b, ROOM) == Some((1, 1))
            });
            let path = format!("/v1/rooms/{ROOM}/receipts");
            let body = until(node, &path, "bob's markers (3, 2)", |b| {
                markers_of(b, "bob") == Some((3, 2))
            });
            assert_eq!(markers_of(&body, "ann"), Some((0, 0)), "{body}");
            assert_eq!(body["last_seq"], 3, "{body}");
        }
        // A room the engine does not hold is not found, on any node.
        let (s, _) = call(&n[2], "GET", "/v1/rooms/group:cr-none/receipts", None);
        assert_eq!(s, 404);
    }

    fn markers_move_across_nodes_on_a_redis_cluster_and_go_with_a_leave(backend) {
        let Some(redis) = RedisCluster::start("receipts-rc", 3) else { return };
        let engine = ClusterConfig {
            topology: Topology::Cluster,
            redis: vec![redis.urls()[0].clone()],
            ..ClusterConfig::default()
        };
        let n = nodes_on(backend, &engine, "c", |_| {});
        const ROOM: &str = "group:cr-sharded";
        let ((mut ann, _), (mut bob, b)) = ann_and_bob(&n, ROOM);
        // The markers script and its sharded publish on the room's shard.
        bob.send(&ClientFrame::Ack(Ack::from_pairs(&[(b, 3)])));
        receipt_for(&mut ann, "bob", 3, 0);
        let receipts = format!("/v1/rooms/{ROOM}/receipts");
        until(&n[2], &receipts, "bob's markers (3, 0)", |b| markers_of(b, "bob") == Some((3, 0)));
        // A leave takes bob's markers with it: back in the room, bob starts again at 0.
        let (s, body) = call(&n[2], "DELETE", &format!("/v1/rooms/{ROOM}/members/bob"), None);
        assert_eq!(s, 200, "{body}");
        let (s, body) = call(&n[2], "POST", &format!("/v1/rooms/{ROOM}/members"), Some(json!({"users": ["bob"]})));
        assert_eq!(s, 200, "{body}");
        let body = until(&n[0], &receipts, "bob a member again", |b| markers_of(b, "bob").is_some());
        assert_eq!(markers_of(&body, "bob"), Some((0, 0)), "{body}");
    }

    fn many_members_markers_kept_while_redis_is_down_reach_it_in_one_batch(backend) {
        // What waits while Redis is down goes as one batch per room on recovery: more than
        // three members in it once overflowed the script call's argument list (a panic on
        // the engine, and its node's engine gone).
        let Some(mut redis) = RedisServer::start("receipts-many") else { return };
        let n = nodes(backend, &redis, "m", |_| {});
        const ROOM: &str = "group:cr-many";
        let ((mut ann, _), (mut bob, b)) = ann_and_bob(&n, ROOM);
        let mut others: Vec<(Client, u32)> = ["cy", "dee", "eve", "fay"]
            .into_iter()
            .map(|user| {
                let mut c = Client::connect(n[1].addr, user);
                let alias = c.join(ROOM);
                (c, alias)
            })
            .collect();
        redis.kill();
        let stats = n[1].cluster().unwrap().clone();
        let deadline = Instant::now() + WAIT;
        // Each phone's ACK is kept on node 2 until Redis is back.
        bob.send(&ClientFrame::Ack(Ack::from_pairs(&[(b, 3)])));
        for (c, alias) in &mut others {
            c.send(&ClientFrame::Ack(Ack::from_pairs(&[(*alias, 3)])));
        }
        while stats.markers_waiting.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "the markers never waited for the engine");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Let every phone's ACK reach the waiting batch (a later one would only make the
        // batch smaller: the test would pass without catching the overflow, never fail).
        std::thread::sleep(Duration::from_millis(300));
        redis.restart();
        let receipts = format!("/v1/rooms/{ROOM}/receipts");
        for node in &n {
            until(node, &receipts, "every member's markers after recovery", |body| {
                ["bob", "cy", "dee", "eve", "fay"]
                    .iter()
                    .all(|u| markers_of(body, u) == Some((3, 0)))
            });
        }
        receipt_for(&mut ann, "fay", 3, 0);
    }

    fn markers_moved_while_redis_is_down_reach_it_when_it_is_back(backend) {
        let Some(mut redis) = RedisServer::start("receipts-down") else { return };
        let n = nodes(backend, &redis, "d", |_| {});
        const ROOM: &str = "group:cr-down";
        let ((mut ann, _), (mut bob, b)) = ann_and_bob(&n, ROOM);
        redis.kill();
        // The server API's reads are refused, retryable, on every node.
        let receipts = format!("/v1/rooms/{ROOM}/receipts");
        for node in &n {
            for path in [receipts.as_str(), "/v1/users/bob/unread"] {
                let deadline = Instant::now() + WAIT;
                loop {
                    let (status, body) = call(node, "GET", path, None);
                    if status == 503 {
                        assert_eq!(body["error"]["code"], "unavailable", "{body}");
                        break;
                    }
                    assert!(Instant::now() < deadline, "{path} never refused: {status} {body}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        // bob acks and reads on node 2 meanwhile: kept there, coalesced, until Redis is back.
        bob.send(&ClientFrame::Ack(Ack::from_pairs(&[(b, 1)])));
        let stats = acks_3_reads_2_kept_on_node_2(&n, &mut bob, b);
        redis.restart();
        // Sent on recovery: every node reads them, and ann's phone on node 1 hears them.
        bobs_3_2_reach_every_node_and_ann(&n, ROOM, &mut ann);
        assert_eq!(stats.markers_waiting.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    fn markers_redis_answers_loading_wait_and_reach_it_once_it_has_loaded(backend) {
        // A restarted Redis answers LOADING until it has read its data back; an engine
        // reconnecting meanwhile sent the markers that waited for it, and a markers call
        // answered LOADING was dropped (`markers_moved_while_redis_is_down_...` failed
        // about 1 run in 6 on a loaded machine, where Redis answered LOADING).
        let Some(mut redis) = RedisServer::start("receipts-loading") else { return };
        let engine = ClusterConfig {
            redis: vec![redis.url()],
            reconnect_max: Duration::from_millis(50),
            ..ClusterConfig::default()
        };
        let n = nodes_on(backend, &engine, "l", |_| {});
        const ROOM: &str = "group:cr-loading";
        let ((mut ann, _), (mut bob, b)) = ann_and_bob(&n, ROOM);
        // Enough data that reading it back takes Redis a while (half a million keys).
        let fill = "for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'fill:' .. i, i) end return 1";
        assert_eq!(redis.cli(&["EVAL", fill, "0", "500000"]).trim(), "1");
        redis.kill();
        acks_3_reads_2_kept_on_node_2(&n, &mut bob, b);
        // The engines reconnect within 50 ms of Redis listening, while it loads.
        redis.restart();
        let loading = redis.cli(&["INFO", "errorstats"]);
        bobs_3_2_reach_every_node_and_ann(&n, ROOM, &mut ann);
        assert!(loading.contains("errorstat_LOADING"), "Redis never answered LOADING: {loading}");
    }

    fn a_window_with_more_members_behind_than_a_page_holds_is_handed_off_to_every_one(backend) {
        // 1,500 members offline: the hand-off decision reads at most 1,000 members a call
        // (`receipts::HANDOFF_PAGE`), so the engine asks again for the rest.
        let Some(redis) = RedisServer::start("receipts-pages") else { return };
        let (url, requests) = app_server();
        let n = nodes(backend, &redis, "p", |c| {
            c.handoff.url = url.clone();
            c.handoff.secret = Some("handoff-test-secret-0123".into());
            c.handoff.delay = Duration::from_millis(300);
            c.handoff.batch_interval = Duration::from_millis(100);
            c.handoff.batch_max = 10_000;
            c.handoff.queue_max = 10_000;
        });
        const ROOM: &str = "group:cr-pages";
        let offline: Vec<String> = (0..1500).map(|i| format!("off{i:04}")).collect();
        let (s, body) = call(&n[2], "POST", &format!("/v1/rooms/{ROOM}/members"), Some(json!({ "users": offline })));
        assert_eq!(s, 200, "{body}");
        let mut ann = Client::connect(n[0].addr, "ann");
        let a = ann.join(ROOM);
        assert_eq!(ann.publish_acked(a, "to everyone"), 1);
        let mut owed = std::collections::BTreeSet::new();
        while owed.len() < offline.len() {
            let items = requests.recv_timeout(WAIT * 2).expect("not every member was handed off");
            for (user, first, last, publisher) in items {
                assert_eq!((first, last, publisher.as_str()), (1, 1, "ann"), "{user}");
                assert!(owed.insert(user.clone()), "{user} handed off twice");
            }
        }
        assert_eq!(owed, offline.iter().cloned().collect());
    }

    fn a_message_is_handed_off_by_one_node_never_to_a_member_who_acked_on_another(backend) {
        let Some(redis) = RedisServer::start("receipts-handoff") else { return };
        let (url, requests) = app_server();
        let n = nodes(backend, &redis, "h", |c| {
            c.handoff.url = url.clone();
            c.handoff.secret = Some("handoff-test-secret-0123".into());
            c.handoff.delay = DELAY;
            c.handoff.batch_interval = Duration::from_millis(100);
        });
        const ROOM: &str = "group:cr-handoff";
        // cy is a member with no connection on any node.
        let (s, body) = call(&n[2], "POST", &format!("/v1/rooms/{ROOM}/members"), Some(json!({"users": ["cy"]})));
        assert_eq!(s, 200, "{body}");
        // Every node holds the room open: a phone on each.
        let mut ann = Client::connect(n[0].addr, "ann");
        let a = ann.join(ROOM);
        let mut bob = Client::connect(n[1].addr, "bob");
        let b = bob.join(ROOM);
        let mut dee = Client::connect(n[2].addr, "dee");
        let d = dee.join(ROOM);
        let next = || requests.recv_timeout(WAIT + DELAY).expect("no hand-off came");

        // Node 1 publishes; bob (node 2) and dee (node 3) ack. Only cy is owed, once, by
        // node 1 alone.
        for seq in 1..=2 {
            assert_eq!(ann.publish_acked(a, format!("m{seq}")), seq);
        }
        receive(&mut bob, b, 2);
        bob.send(&ClientFrame::Ack(Ack::from_pairs(&[(b, 2)])));
        receive(&mut dee, d, 2);
        dee.send(&ClientFrame::Ack(Ack::from_pairs(&[(d, 2)])));
        assert_eq!(next(), [("cy".to_string(), 1, 2, "ann".to_string())]);

        // Node 2 publishes next; ann acks on node 1, dee does not. The request after the
        // first window's is this one: no node handed off the first window again, and cy's
        // hand-off starts after what cy was handed off already.
        assert_eq!(bob.publish_acked(b, "m3"), 3);
        receive(&mut ann, a, 3);
        ann.send(&ClientFrame::Ack(Ack::from_pairs(&[(a, 3)])));
        receive(&mut dee, d, 3);
        let mut second = next();
        second.sort();
        assert_eq!(
            second,
            [
                ("cy".to_string(), 3, 3, "bob".to_string()),
                ("dee".to_string(), 3, 3, "bob".to_string()),
            ]
        );
    }
}
