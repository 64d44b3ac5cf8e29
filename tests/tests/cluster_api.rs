//! End-to-end: the server API of a cluster node answers as one relay does. A multi-room
//! publish (`POST /v1/messages`) sequences every room through the engine (Redis' own
//! sequences, each room's window of `Idempotency-Key`s), and a history read
//! (`GET /v1/rooms/{room}/messages`) past a node's memory reads the room's stream, with a
//! gap for exactly what the stream's retention dropped; a stream read Redis answers `BUSY`
//! (a script past `busy-reply-threshold`) is sent again on its own timer until Redis
//! answers, past the retries an open or a membership step gets, and its reader answered in
//! full; a room nobody publishes to gives its history back to Redis once the ages the
//! relay serves it by are past. Real relay nodes on loopback and a real `redis-server`, once per I/O backend.

#![allow(clippy::unwrap_used)] // reason: tests

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pabal_relay::cluster::{ClusterConfig, EngineErrorKind, RetryKind};
use pabal_relay::config::Config;
use pabal_relay::io::BackendKind;
use pabal_testkit::http::{Reply, get, raw_http, request};
use pabal_testkit::redis::RedisServer;
use pabal_testkit::{Client, TestRelay, WAIT, per_backend};
use serde_json::{Value, json};

/// Messages a node keeps in memory per room: far fewer than the tests publish.
const MEMORY: usize = 8;
/// Messages per stream page: a read past memory takes several.
const PAGE: usize = 4;

/// A cluster node named `id` on `redis` (two workers) whose stream keeps about `stream`
/// messages; ready once its engine is up.
fn node(backend: BackendKind, redis: &RedisServer, id: &str, stream: u64) -> TestRelay {
    node_with(backend, redis, id, stream, |_| {}, |_| {})
}

/// [`node`] whose idle connections to Redis are sent a `PING` every `ping` (its
/// `cluster.reply_timeout`).
fn node_pinged(
    backend: BackendKind,
    redis: &RedisServer,
    id: &str,
    stream: u64,
    ping: Duration,
) -> TestRelay {
    node_with(
        backend,
        redis,
        id,
        stream,
        |c| c.reply_timeout = ping,
        |_| {},
    )
}

/// [`node`] with `cluster` and `config` changed as the test needs.
fn node_with(
    backend: BackendKind,
    redis: &RedisServer,
    id: &str,
    stream: u64,
    cluster: impl FnOnce(&mut ClusterConfig),
    config: impl FnOnce(&mut Config),
) -> TestRelay {
    let mut section = ClusterConfig {
        redis: vec![redis.url()],
        node_id: Some(id.into()),
        stream_max_len: stream,
        fill_batch: PAGE,
        ..ClusterConfig::default()
    };
    cluster(&mut section);
    TestRelay::cluster_node(backend, section, |c| {
        c.retention.max_messages = MEMORY;
        // A history read may wait out a busy script.
        c.control.reply_timeout = Duration::from_secs(60);
        config(c);
    })
}

fn control(node: &TestRelay) -> SocketAddr {
    node.handle().control_addr().unwrap()
}

/// `POST /v1/messages` to `addr` for `rooms` with `key` as its `Idempotency-Key`.
fn publish_many(addr: SocketAddr, rooms: &[&str], text: &str, key: &str) -> Reply {
    let body = json!({"rooms": rooms, "sender": "server", "text": text}).to_string();
    let reply = raw_http(addr, &request("POST", "/v1/messages", Some(key), &body));
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply
}

/// The answer for `room` in a multi-room publish's results: (status, seq, repeated).
fn result_of(reply: &Reply, room: &str) -> (String, Option<u64>, Option<bool>) {
    let json = reply.json();
    let r = json["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == room)
        .cloned()
        .unwrap_or_else(|| panic!("no result for {room}: {}", reply.body));
    (
        r["status"].as_str().unwrap_or_default().to_owned(),
        r["seq"].as_u64(),
        r["repeated"].as_bool(),
    )
}

/// `GET /v1/rooms/{room}/messages?after=..&limit=..` through `addr`: the sequences, the gap
/// (`from`, `to`) and `last_seq`.
fn history(
    addr: SocketAddr,
    room: &str,
    after: u64,
    limit: usize,
) -> (Vec<u64>, Option<(u64, u64)>, u64) {
    let reply = get(
        addr,
        &format!("/v1/rooms/{room}/messages?after={after}&limit={limit}"),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let json = reply.json();
    let seqs = json["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let seq = m["seq"].as_u64().unwrap();
            assert_eq!(m["text"], format!("m-{seq}"), "{m}");
            seq
        })
        .collect();
    let gap = match &json["gap"] {
        Value::Null => None,
        g => Some((g["from"].as_u64().unwrap(), g["to"].as_u64().unwrap())),
    };
    (seqs, gap, json["last_seq"].as_u64().unwrap())
}

/// The first sequence `room`'s stream still holds.
fn stream_first(redis: &RedisServer, room: &str) -> u64 {
    let key = format!("pabal:{{r:{room}}}:s");
    let out = redis.cli(&["XRANGE", &key, "-", "+", "COUNT", "1"]);
    let id = out.lines().next().unwrap_or_default();
    id.strip_suffix("-0")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{key} holds no entry: {out:?}"))
}

/// BUSY answers to one read that prove it went on past the retries an open or a
/// membership step gets: five (100 ms doubling), the sixth gives those up, and the read is
/// sent again after the longest wait.
const PAST_RETRIES: u64 = 7;

/// A script that keeps Redis busy until `SCRIPT KILL` (at most a minute; it writes nothing,
/// so it may be killed): Redis answers `BUSY` to everything else once it has run
/// `busy-reply-threshold`.
const BUSY_SCRIPT: &str = "local t = redis.call('TIME') \
     local from = tonumber(t[1]) \
     while tonumber(redis.call('TIME')[1]) - from < 60 do end \
     return 1";

fn texts(msgs: Vec<(u64, Bytes)>) -> Vec<(u64, String)> {
    msgs.into_iter()
        .map(|(s, p)| (s, String::from_utf8_lossy(&p).into_owned()))
        .collect()
}

per_backend! {
    fn a_multi_room_publish_is_sequenced_by_the_engine_in_every_room(backend) {
        let Some(redis) = RedisServer::start("api-many") else { return };
        let (a, b) = (
            node(backend, &redis, "ma", 10_000),
            node(backend, &redis, "mb", 10_000),
        );
        const BUSY: &str = "room:cluster-many-busy";
        const QUIET: &str = "room:cluster-many-quiet";
        // A reader on node b in both rooms.
        let mut bob = Client::connect(b.addr, "bob");
        let (busy, quiet) = (bob.join(BUSY), bob.join(QUIET));
        // The busy room's sequence in Redis is ahead of anything node a has seen: three
        // messages published through node b.
        let seqs = Client::publish_all(b.addr, BUSY, "carol", 3);
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(bob.messages(busy, 3).len(), 3);

        let first = publish_many(control(&a), &[BUSY, QUIET], "hello", "batch-1");
        assert_eq!(result_of(&first, BUSY), ("published".into(), Some(4), Some(false)), "{}", first.body);
        assert_eq!(result_of(&first, QUIET), ("published".into(), Some(1), Some(false)), "{}", first.body);
        assert_eq!(texts(bob.messages(busy, 1)), vec![(4, "hello".into())]);
        assert_eq!(texts(bob.messages(quiet, 1)), vec![(1, "hello".into())]);

        // The same key again, through the other node: every room answers its first
        // sequence and publishes nothing.
        for addr in [control(&b), control(&a)] {
            let again = publish_many(addr, &[BUSY, QUIET], "hello", "batch-1");
            assert_eq!(result_of(&again, BUSY), ("published".into(), Some(4), Some(true)), "{}", again.body);
            assert_eq!(result_of(&again, QUIET), ("published".into(), Some(1), Some(true)), "{}", again.body);
        }
        // A new key publishes again; the reader's next messages are those, not repeats.
        let next = publish_many(control(&b), &[QUIET, BUSY], "next", "batch-2");
        assert_eq!(result_of(&next, BUSY).1, Some(5));
        assert_eq!(result_of(&next, QUIET).1, Some(2));
        assert_eq!(texts(bob.messages(busy, 1)), vec![(5, "next".into())]);
        assert_eq!(texts(bob.messages(quiet, 1)), vec![(2, "next".into())]);
    }

    fn a_history_read_past_the_nodes_memory_comes_from_the_stream(backend) {
        let Some(redis) = RedisServer::start("api-history") else { return };
        const ROOM: &str = "room:cluster-api-history";
        const COUNT: u64 = 40;
        let (a, b) = (
            node(backend, &redis, "ha", 10_000),
            node(backend, &redis, "hb", 10_000),
        );
        let mut p = Client::connect(a.addr, "alice");
        let pa = p.join(ROOM);
        for seq in 1..=COUNT {
            assert_eq!(p.publish_acked(pa, format!("m-{seq}").into_bytes()), seq);
        }
        // Node b holds the last MEMORY messages in memory (once its engine has the room);
        // everything before comes from the stream, page after page, then from memory.
        let (seqs, gap, last) = history(control(&b), ROOM, 0, 100);
        assert_eq!((gap, last), (None, COUNT), "nothing was dropped");
        assert_eq!(seqs, (1..=COUNT).collect::<Vec<_>>());
        // Bounded by `limit`, from `after`.
        let (seqs, gap, _) = history(control(&b), ROOM, 5, 10);
        assert_eq!(gap, None);
        assert_eq!(seqs, (6..=15).collect::<Vec<_>>());
        // Across the edge of memory.
        let edge = COUNT - MEMORY as u64;
        let (seqs, _, _) = history(control(&b), ROOM, edge - 3, 6);
        assert_eq!(seqs, (edge - 2..=edge + 3).collect::<Vec<_>>());
    }

    fn a_history_read_reports_what_the_streams_retention_dropped(backend) {
        let Some(redis) = RedisServer::start("api-history-gap") else { return };
        const ROOM: &str = "room:cluster-api-history-gap";
        const COUNT: u64 = 400;
        // The stream keeps about 100 messages (`XADD MAXLEN ~` trims whole nodes).
        let (a, b) = (
            node(backend, &redis, "ga", 100),
            node(backend, &redis, "gb", 100),
        );
        let seqs = Client::publish_all(a.addr, ROOM, "alice", COUNT as usize);
        assert_eq!(seqs.last(), Some(&COUNT));
        let first = stream_first(&redis, ROOM);
        assert!(first > 6, "retention has not trimmed the stream: it starts at {first}");
        assert!(first + 20 < COUNT - MEMORY as u64, "the stream reaches before node b's memory");
        let reply = get(control(&b), &format!("/v1/rooms/{ROOM}/messages?after=5&limit=1000"));
        assert_eq!(reply.status, 200, "{}", reply.body);
        let json = reply.json();
        assert_eq!(json["gap"], json!({"from": 6, "to": first - 1}), "exactly what retention dropped");
        let got: Vec<u64> = json["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        assert_eq!(got, (first..=COUNT).collect::<Vec<_>>(), "every message the stream holds");
        assert_eq!(json["last_seq"], COUNT);
    }

    fn a_room_nobody_publishes_to_gives_its_history_back_to_redis(backend) {
        let Some(redis) = RedisServer::start("history-expiry") else { return };
        const ROOM: &str = "room:cluster-history-expiry";
        let (stream, meta) = (format!("pabal:{{r:{ROOM}}}:s"), format!("pabal:{{r:{ROOM}}}:m"));
        // Node a serves its rooms' history for a second (a read's `retention.max_age`,
        // a repeat key's ages): its publishes set the room's history to expire 1.5 s
        // after them.
        let second = Duration::from_secs(1);
        let a = node_with(backend, &redis, "xa", 1000, |_| {}, |c| {
            c.retention.max_age = second;
            c.limits.publish_id_max_age = second;
            c.control.idempotency_max_age = second;
        });
        let mut p = Client::connect(a.addr, "alice");
        let pa = p.join(ROOM);
        for seq in 1..=3 {
            assert_eq!(p.publish_acked(pa, format!("m-{seq}").into_bytes()), seq);
        }
        let ttl: i64 = redis.cli(&["PTTL", &stream]).trim().parse().unwrap();
        assert!(ttl != -1 && ttl <= 1500, "the stream's expiry: {ttl} ms");
        // Nobody publishes for that long: Redis drops the history, the meta hash stays.
        let deadline = Instant::now() + WAIT;
        while redis.cli(&["EXISTS", &stream]).trim() != "0" {
            assert!(Instant::now() < deadline, "the stream never expired");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(redis.cli(&["HGET", &meta, "s"]).trim(), "3");
        // The next message takes the next sequence, and a node that never held the room
        // reads it with an exact gap for what expired.
        assert_eq!(p.publish_acked(pa, &b"m-4"[..]), 4);
        let b = node(backend, &redis, "xb", 1000);
        assert_eq!(history(control(&b), ROOM, 0, 100), (vec![4], Some((1, 3)), 4));
        // With `cluster.expire_history = false` (a rolling upgrade from a version that
        // never renews an expiry), a node sets none.
        let c = node_with(backend, &redis, "xc", 1000, |k| k.expire_history = false, |c| {
            c.retention.max_age = second;
        });
        const KEPT: &str = "room:cluster-history-kept";
        assert_eq!(Client::publish_all(c.addr, KEPT, "carol", 2), vec![1, 2]);
        let kept = format!("pabal:{{r:{KEPT}}}:s");
        assert_eq!(redis.cli(&["PTTL", &kept]).trim(), "-1");
    }

    fn a_stream_read_answered_busy_is_sent_again_until_redis_answers(backend) {
        let Some(redis) = RedisServer::start("busy-read") else { return };
        const ROOM: &str = "room:cluster-busy-read";
        const COUNT: u64 = 40;
        // Node b's idle connections are pinged often, so that its pub/sub connection's
        // PING meets BUSY too (an answer, not an error).
        let ping = Duration::from_secs(1);
        let (a, b) = (
            node(backend, &redis, "ba", 10_000),
            node_pinged(backend, &redis, "bb", 10_000, ping),
        );
        let mut p = Client::connect(a.addr, "alice");
        let pa = p.join(ROOM);
        for seq in 1..=COUNT {
            assert_eq!(p.publish_acked(pa, format!("m-{seq}").into_bytes()), seq);
        }
        // Node b opens the room (its first read): from now on a read of it is only stream
        // reads (XRANGE), nothing else.
        let (seqs, gap, _) = history(control(&b), ROOM, 0, 1000);
        assert_eq!((seqs, gap), ((1..=COUNT).collect::<Vec<_>>(), None));
        let stats = b.cluster().unwrap().clone();
        let busy_before = stats.retries_of(RetryKind::Busy);
        let given_up_before = stats.retries_given_up.load(Ordering::Relaxed);
        redis.cli(&["CONFIG", "SET", "busy-reply-threshold", "10"]);
        std::thread::scope(|s| {
            let running = s.spawn(|| redis.cli(&["EVAL", BUSY_SCRIPT, "0"]));
            let deadline = Instant::now() + WAIT;
            while !redis.try_cli(&["GET", "x"]).is_some_and(|r| r.starts_with("BUSY")) {
                assert!(Instant::now() < deadline, "Redis never answered BUSY");
                std::thread::sleep(Duration::from_millis(5));
            }
            // The read meets BUSY (counted on node b, which sends nothing else), again and
            // again, past the retries anything else gets.
            let read = s.spawn(|| history(control(&b), ROOM, 0, 1000));
            let deadline = Instant::now() + WAIT;
            while stats.retries_of(RetryKind::Busy) < busy_before + PAST_RETRIES {
                assert!(Instant::now() < deadline, "the read stopped meeting BUSY");
                assert!(!read.is_finished(), "answered while Redis was busy");
                std::thread::sleep(Duration::from_millis(5));
            }
            redis.cli(&["SCRIPT", "KILL"]);
            assert!(running.join().unwrap().contains("killed"), "the script ran until killed");
            // Answered once Redis is: every message, in order, no gap.
            let (seqs, gap, _) = read.join().unwrap();
            assert_eq!((seqs, gap), ((1..=COUNT).collect::<Vec<_>>(), None));
        });
        assert_eq!(stats.retries_given_up.load(Ordering::Relaxed), given_up_before);
        // BUSY was an answer (to the read, to the PINGs): no connection was reset for it,
        // none read as malformed, none counted as an error reply.
        for kind in EngineErrorKind::ALL {
            assert_eq!(stats.errors_of(kind), 0, "{} counted", kind.label());
        }
        // And the room goes on through both nodes.
        let mut bob = Client::connect(b.addr, "bob");
        let pb = bob.join(ROOM);
        assert_eq!(bob.publish_acked(pb, &b"m-41"[..]), COUNT + 1);
    }
}
