//! A cluster node killed with -9 stops counting its user's connections once its presence
//! lease runs out: until then its connection counts toward presence and toward
//! `limits.max_connections_per_user` on every node together; after it, only the survivor's
//! do, and a HELLO refused before is welcomed.
//! The real binary as the doomed node, on a private Redis; the survivor in this process,
//! once per I/O backend (the doomed node on the same one).

#![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

use std::time::{Duration, Instant};

use pabal_codec::{ErrorCode, Event};
use pabal_relay::cluster::ClusterConfig;
use pabal_relay::io::BackendKind;
use pabal_testkit::daemon::{Daemon, addr_in};
use pabal_testkit::http::{KEY, http};
use pabal_testkit::redis::RedisServer;
use pabal_testkit::{Client, TempDir, TestRelay, WAIT, per_backend};

const RELAY: &str = env!("CARGO_BIN_EXE_relay");

/// `GET /v1/users/{user}/presence` through `node`.
fn presence(node: &TestRelay, user: &str) -> serde_json::Value {
    let addr = node.handle().control_addr().unwrap();
    let (status, body) = http(
        addr,
        "GET",
        &format!("/v1/users/{user}/presence"),
        Some(KEY),
        None,
    );
    assert_eq!(status, 200, "{body}");
    body
}

per_backend! {
    fn a_killed_nodes_connections_stop_counting_after_its_lease(backend) {
        let Some(redis) = RedisServer::start("presence-kill9") else { return };
        let io = match backend {
            BackendKind::Epoll => "epoll",
            BackendKind::IoUring => "io_uring",
            BackendKind::Auto => "auto",
        };
        let dir = TempDir::new("presence-kill9");
        let config = dir.path("relay.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\nworkers = 2\npin_workers = false\n\
                 io_backend = \"{io}\"\n\
                 [log]\nlevel = \"info\"\n[control]\nlisten = \"\"\n\
                 [limits]\nmax_connections_per_user = 2\n\
                 [cluster]\nredis = [\"{}\"]\nnode_id = \"doomed\"\npresence_lease = \"1s\"\n",
                redis.url()
            ),
        )
        .unwrap();
        let mut doomed = Daemon::spawn(RELAY, &config, |_| {});
        let doomed_addr = addr_in(&doomed.wait_log("relay listening"));
        let survivor = TestRelay::cluster_node(
            backend,
            ClusterConfig {
                redis: vec![redis.url()],
                node_id: Some("survivor".into()),
                presence_lease: Duration::from_secs(1),
                ..ClusterConfig::default()
            },
            |c| c.limits.max_connections_per_user = 2,
        );
        // The doomed node's engine may still be starting: its HELLO is refused
        // `unavailable` until then.
        let deadline = Instant::now() + WAIT;
        let _phone = loop {
            let mut c = Client::connect_raw(doomed_addr, "ann", b"ann");
            match c.next_event(WAIT) {
                Some(Event::Welcome(_)) => break c,
                other => assert!(Instant::now() < deadline, "never welcomed: {other:?}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // A second connection on the survivor, which keeps the user's hash alive (renewing
        // its own entry) after the kill: only the doomed node's entry may expire.
        let _held = Client::connect(survivor.addr, "ann");
        let p = presence(&survivor, "ann");
        assert_eq!(p["connections"], 2, "{p}");
        assert_eq!(p["nodes"], serde_json::json!(["doomed", "survivor"]), "{p}");
        // At the cap on every node together: refused on the survivor.
        let mut refused = Client::connect_raw(survivor.addr, "ann", b"ann");
        match refused.next_event(WAIT) {
            Some(Event::Error(e)) => assert_eq!(e.code, ErrorCode::LimitExceeded, "{}", e.message),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // kill -9: nothing is cleaned up; the lease (renewed every third of it while the
        // node lived) runs out.
        doomed.signal(libc::SIGKILL);
        doomed.wait_exit();
        let deadline = Instant::now() + WAIT;
        loop {
            let p = presence(&survivor, "ann");
            if p["connections"] == 1 {
                assert_eq!(p["nodes"], serde_json::json!(["survivor"]), "{p}");
                break;
            }
            assert!(Instant::now() < deadline, "the killed node still counts: {p}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut welcomed = Client::connect_raw(survivor.addr, "ann", b"ann");
        match welcomed.next_event(WAIT) {
            Some(Event::Welcome(_)) => {}
            other => panic!("expected WELCOME once the lease ran out, got {other:?}"),
        }
        assert_eq!(presence(&survivor, "ann")["connections"], 2);
    }
}
