//! End-to-end: `pabal_cluster_engine_errors_total{kind}` counts each kind of engine error
//! under its own label, once per I/O backend. Real relay nodes on loopback; a real Redis
//! where Redis is the one failing (a connection killed, a script's error, too few
//! replicas, a stopped Redis: silent past `cluster.reply_timeout`), and where the peer is
//! not a Redis at all (nothing listening, an address that drops SYNs, a listener that
//! answers garbage), that peer.

#![allow(clippy::unwrap_used)] // reason: tests

use std::io::Write;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use pabal_codec::{ErrorCode, Event};
use pabal_relay::cluster::{ClusterConfig, EngineErrorKind};
use pabal_relay::io::BackendKind;
use pabal_testkit::blackhole::Blackhole;
use pabal_testkit::http::{get_anonymous, with_ops_routes};
use pabal_testkit::redis::{RedisServer, free_port};
use pabal_testkit::{Client, TestRelay, WAIT, per_backend};

/// A cluster node on `url`, not waiting for its engine to come up (it may never).
fn node_on(backend: BackendKind, url: String, tweak: impl FnOnce(&mut ClusterConfig)) -> TestRelay {
    let mut cluster = ClusterConfig {
        redis: vec![url],
        node_id: Some("errors".into()),
        ..ClusterConfig::default()
    };
    tweak(&mut cluster);
    TestRelay::start(backend, 2, |c| c.cluster = Some(cluster))
}

/// Waits until `node` counted an engine error of `kind`; panics after [`WAIT`].
fn counts(node: &TestRelay, kind: EngineErrorKind) {
    let stats = node.cluster().unwrap().clone();
    let deadline = Instant::now() + WAIT;
    while stats.errors_of(kind) == 0 {
        assert!(
            Instant::now() < deadline,
            "no {} error counted",
            kind.label()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `pabal_cluster_engine_errors_total{kind}` on `node`'s `/metrics`, for every kind.
fn scraped(node: &TestRelay) -> Vec<(&'static str, u64)> {
    let metrics = get_anonymous(with_ops_routes(node), "/metrics").body;
    EngineErrorKind::ALL
        .iter()
        .map(|k| {
            let prefix = format!(
                "pabal_cluster_engine_errors_total{{kind=\"{}\"}} ",
                k.label()
            );
            let n = metrics
                .lines()
                .find_map(|l| l.strip_prefix(prefix.as_str())?.trim().parse().ok())
                .unwrap_or_else(|| panic!("{prefix} missing: {metrics}"));
            (k.label(), n)
        })
        .collect()
}

/// The one kind counted on `node` (every other kind zero), scraped.
fn only(node: &TestRelay, kind: EngineErrorKind) {
    counts(node, kind);
    for (label, n) in scraped(node) {
        if label == kind.label() {
            assert!(n >= 1, "{label}: {n}");
        } else {
            assert_eq!(n, 0, "{label} counted where only {} was due", kind.label());
        }
    }
}

/// A publish `p` sends to `alias` is refused `unavailable` (typed, retryable).
fn refused_unavailable(p: &mut Client, alias: u32) {
    let id = p.publish(alias, &b"refused"[..]);
    match p.wait_for(|e| {
        matches!(e, Event::Error(err) if err.reference == id)
            || matches!(e, Event::PubAck { msg_id, .. } if *msg_id == id)
    }) {
        Event::Error(err) => {
            assert_eq!(err.code, ErrorCode::Overloaded, "{err:?}");
            assert!(!err.fatal);
        }
        other => panic!("acknowledged: {other:?}"),
    }
}

per_backend! {
    fn a_connection_refused_counts_as_refused(backend) {
        // Nothing listens on the port.
        let node = node_on(backend, format!("redis://127.0.0.1:{}", free_port()), |_| {});
        only(&node, EngineErrorKind::Refused);
    }

    fn a_connect_past_its_timeout_counts_as_timeout(backend) {
        let hole = Blackhole::start();
        let node = node_on(backend, format!("redis://127.0.0.1:{}", hole.port), |c| {
            c.connect_timeout = Duration::from_millis(200);
        });
        only(&node, EngineErrorKind::Timeout);
    }

    fn an_answer_that_is_not_resp_counts_as_protocol(backend) {
        // A listener that greets every connection with a line no RESP type starts with.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let _ = conn.write_all(b"?not redis\r\n");
                // Held open: the engine, not the peer, ends it.
                std::mem::forget(conn);
            }
        });
        let node = node_on(backend, format!("redis://127.0.0.1:{port}"), |_| {});
        only(&node, EngineErrorKind::Protocol);
    }

    fn a_killed_connection_counts_as_connection_lost(backend) {
        let Some(redis) = RedisServer::start("errors-lost") else { return };
        let node = node_on(backend, redis.url(), |_| {});
        node.wait_for_engine();
        // Both of its connections (neither subscribed to anything yet).
        redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
        only(&node, EngineErrorKind::ConnectionLost);
    }

    fn a_scripts_error_counts_as_error_reply(backend) {
        const ROOM: &str = "room:errors-script";
        let Some(redis) = RedisServer::start("errors-script") else { return };
        let node = node_on(backend, redis.url(), |_| {});
        node.wait_for_engine();
        let mut p = Client::connect(node.addr, "alice");
        let alias = p.join(ROOM);
        assert_eq!(p.publish_acked(alias, &b"first"[..]), 1);
        // The room's meta hash made a string: the publish script's HINCRBY on it fails.
        let meta = format!("pabal:{{r:{ROOM}}}:m");
        redis.cli(&["DEL", &meta]);
        redis.cli(&["SET", &meta, "not a hash"]);
        refused_unavailable(&mut p, alias);
        only(&node, EngineErrorKind::ErrorReply);
    }

    fn a_stopped_redis_counts_as_timeout_and_the_node_recovers_once_it_runs(backend) {
        const ROOM: &str = "room:errors-stopped";
        let Some(redis) = RedisServer::start("errors-stopped") else { return };
        let node = node_on(backend, redis.url(), |c| {
            c.reply_timeout = Duration::from_millis(300);
        });
        node.wait_for_engine();
        let ops = with_ops_routes(&node);
        let mut p = Client::connect(node.addr, "alice");
        let alias = p.join(ROOM);
        assert_eq!(p.publish_acked(alias, &b"first"[..]), 1);
        // Stopped: the connections stay open and nothing answers. The publish in flight
        // is refused once cluster.reply_timeout passed, and the node is not ready.
        redis.pause();
        refused_unavailable(&mut p, alias);
        counts(&node, EngineErrorKind::Timeout);
        let deadline = Instant::now() + WAIT;
        while get_anonymous(ops, "/readyz").status != 503 {
            assert!(Instant::now() < deadline, "/readyz never said the engine is down");
            std::thread::sleep(Duration::from_millis(20));
        }
        redis.resume();
        let deadline = Instant::now() + WAIT;
        while get_anonymous(ops, "/readyz").status != 200 {
            assert!(Instant::now() < deadline, "/readyz never recovered");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Taken again (the refused one may have run: Redis read it before the close).
        let deadline = Instant::now() + WAIT;
        while p.publish_or_unavailable(alias, &b"after"[..]).is_none() {
            assert!(Instant::now() < deadline, "publishes never recovered");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn too_few_replicas_count_as_replicas(backend) {
        const ROOM: &str = "room:errors-replicas";
        // One Redis, no replica: WAIT 1 answers 0 after its timeout.
        let Some(redis) = RedisServer::start("errors-replicas") else { return };
        let node = node_on(backend, redis.url(), |c| {
            c.wait_replicas = 1;
            c.wait_timeout = Duration::from_millis(50);
        });
        node.wait_for_engine();
        let mut p = Client::connect(node.addr, "alice");
        let alias = p.join(ROOM);
        refused_unavailable(&mut p, alias);
        only(&node, EngineErrorKind::Replicas);
    }
}
