//! Three relay nodes (child processes of the `relay` binary) on one real Redis, phones spread
//! over them, one node killed with SIGKILL in the middle of the publishing and started again
//! a little later: its phones reconnect to the other nodes and resume there, and the one
//! ledger over all nodes finds nothing lost, nothing twice, nothing out of order.
//!
//! Membership lives in Redis: the run sets every room's members and every channel's
//! subscribers through node 1's server API only, and phones bind them on whichever node they
//! reach. The killed node comes back with nothing of its own, and phones dropped often
//! (`rotate`: each reconnect goes to the next node) resume on it after its restart as on any
//! other node. (Before membership moved into Redis, a restarted node got its memberships
//! again with join points at the rooms' heads, and phones resuming there from older cursors
//! were clamped to them: loadgen's "cursor jump on ROOM".)
//!
//! Needs `redis-server` (`.ci/install-redis.sh`) and the `relay` binary next to the test's
//! (`cargo test --workspace` builds it; alone: `cargo build -p pabal-relay --bin relay`);
//! without either it skips, and fails under `CI=true`.
//!
//! Each node's log goes to a file (`<node id>.log`): in a temporary folder, or under the one
//! `PABAL_LOADGEN_NODE_LOGS` names (kept); a failing test prints each node's last lines and
//! keeps the files, so a race seen once in CI leaves what the nodes said. `RUST_LOG` (for
//! example `pabal_relay::core::cluster=debug`) reaches the nodes.

#![allow(clippy::unwrap_used, reason = "tests")]

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pabal_loadgen::api::ControlApi;
use pabal_loadgen::fault::NodeFault;
use pabal_loadgen::report;
use pabal_loadgen::run::{RetentionSource, RunConfig, run};
use pabal_loadgen::scenario::Scenario;
use pabal_loadgen::spawn::{ClusterNode, NODE_LOGS_ENV, SpawnOptions, SpawnedRelay};
use pabal_loadgen::targets::{TargetPolicy, Targets};
use pabal_relay::io::BackendKind;
use pabal_testkit::TempDir;
use pabal_testkit::per_backend;
use pabal_testkit::redis::RedisServer;

const SCENARIO: &str = r#"
name = "cluster-kill"
seed = 23
duration_s = 8
drain_s = 20
settle_s = 1

[population]
phones = 60
profiles = "lte"
connect_rate = 200
probe_after_s = 5

[chat]
direct_per_phone = 1
groups_per_phone = 1
group_size = { distribution = "zipf", min = 3, max = 12, exponent = 1.2 }
msgs_per_min = 40
group_share = 0.5

# A dropped phone comes back within half a second: node 2's phones find it dead and move
# on well before it returns (see the module docs of pabal_loadgen::fault).
[drops]
backoff_ms = [100, 500]

[[channel]]
name = "notice"
subscribers = 30
msgs_per_min = 120
"#;

/// Whether the `relay` binary is where loadgen looks for it (next to this test's directory).
fn relay_binary_present() -> bool {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    [dir.join("relay"), dir.join("../relay")]
        .iter()
        .any(|p| p.is_file())
}

fn backend_name(backend: BackendKind) -> &'static str {
    match backend {
        BackendKind::IoUring => "io_uring",
        _ => "epoll",
    }
}

/// Lines of each node's log a failing test prints.
const LOG_LINES: usize = 200;

/// The nodes' logs of one test: a folder of `<node id>.log` files, under
/// `PABAL_LOADGEN_NODE_LOGS` if set, else temporary. A test failing (panicking) while this
/// lives prints where they are and each one's last [`LOG_LINES`] lines, and keeps them.
struct NodeLogs {
    dir: PathBuf,
    temp: Option<TempDir>,
}

impl NodeLogs {
    fn new(test: &str) -> NodeLogs {
        match std::env::var_os(NODE_LOGS_ENV) {
            Some(dir) => NodeLogs {
                dir: PathBuf::from(dir).join(test),
                temp: None,
            },
            None => {
                let temp = TempDir::new(test);
                NodeLogs {
                    dir: temp.path(""),
                    temp: Some(temp),
                }
            }
        }
    }
}

impl Drop for NodeLogs {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        // Kept for whoever looks into the failure.
        std::mem::forget(self.temp.take());
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        logs.sort();
        eprintln!("the nodes' logs are in {}", self.dir.display());
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(LOG_LINES);
            eprintln!(
                "----- {} (its last {} of {} lines) -----",
                log.display(),
                lines.len() - from,
                lines.len()
            );
            for line in &lines[from..] {
                eprintln!("{line}");
            }
        }
    }
}

/// Three cluster nodes on `redis` and a run of `scenario` over them (`policy`), memberships
/// set through every node's server API, their logs in `logs`; the nodes, for a fault.
fn three_nodes(
    backend: BackendKind,
    redis: &RedisServer,
    scenario: &str,
    policy: TargetPolicy,
    logs: &NodeLogs,
) -> (Vec<Arc<Mutex<SpawnedRelay>>>, Vec<ControlApi>, RunConfig) {
    let nodes: Vec<Arc<Mutex<SpawnedRelay>>> = (1..=3)
        .map(|k| {
            let options = SpawnOptions {
                workers: 1,
                cluster: Some(ClusterNode {
                    redis: redis.url(),
                    node_id: format!("kill-test-{k}"),
                }),
                io_backend: Some(backend_name(backend).into()),
                log_dir: Some(logs.dir.clone()),
                ..SpawnOptions::default()
            };
            Arc::new(Mutex::new(SpawnedRelay::start(&options).unwrap()))
        })
        .collect();
    let (addrs, apis): (Vec<_>, Vec<_>) = nodes
        .iter()
        .map(|n| {
            let n = n.lock().unwrap();
            let api = ControlApi::new(&format!("http://{}", n.control), None).unwrap();
            (n.addr, api)
        })
        .unzip();
    let scenario = Scenario::parse(scenario).unwrap();
    let targets = Targets::new(addrs, policy).unwrap();
    let mut config = RunConfig::from_scenario(&scenario, targets).unwrap();
    config.progress = false;
    config.control = Some(apis[0].clone());
    config.retention = RetentionSource::Api(apis[0].clone());
    (nodes, apis, config)
}

fn ready() -> bool {
    if relay_binary_present() {
        return true;
    }
    pabal_testkit::skip(
        "no relay binary next to the test (cargo build -p pabal-relay --bin relay)",
    );
    false
}

per_backend! {
    fn a_node_killed_mid_run_loses_nothing(backend) {
        if !ready() {
            return;
        }
        let Some(redis) = RedisServer::start("loadgen-kill") else { return };
        let logs = NodeLogs::new(&format!("cluster-kill-{}", backend_name(backend)));
        // Dropped often and moving on at every reconnect: after node 2's restart phones come
        // back to it from cursors it never served.
        let scenario = SCENARIO.replace("[drops]\n", "[drops]\nper_hour = 900\n");
        let (nodes, _apis, mut config) =
            three_nodes(backend, &redis, &scenario, TargetPolicy::Rotate, &logs);
        config.fault = Some(NodeFault {
            node: nodes[1].clone(),
            label: "node 2".into(),
            kill_at_s: 2.0,
            down_s: Some(3.0),
        });
        let connecting = config.plan.phones.iter().filter(|p| !p.publisher).count() as u64;
        let report = run(config).unwrap();
        let table = report::table(&report);
        eprintln!("{table}");
        let labels: Vec<&str> = report.events.iter().map(|e| e.label.as_str()).collect();
        assert!(labels.contains(&"kill -9 node 2"), "{labels:?}");
        assert!(labels.contains(&"restart node 2"), "{labels:?}");
        let c = &report.metrics.counters;
        // A third of the phones were on node 2: each lost its connection, found node 2
        // refusing, and came back on another node.
        assert!(c.reconnects >= connecting / 3, "{c:?}");
        assert!(c.connect_failures > 0, "node 2 refused while it was down: {c:?}");
        assert!(c.acked > 100 && c.delivered > 300, "{c:?}");
        assert!(report.api.acked > 0, "channel publishes went through node 1: {:?}", report.api);
        assert_eq!(report.summary.silent_loss_pairs, 0, "{table}");
        assert!(report.summary.pairs as u64 >= connecting, "{:?}", report.summary);
        assert!(report.passed(), "{table}");
        assert_eq!(report.publishes.unaccounted(), 0, "{:?}", report.publishes);
    }

    fn every_reconnect_on_another_node_loses_nothing(backend) {
        if !ready() {
            return;
        }
        let Some(redis) = RedisServer::start("loadgen-rotate") else { return };
        let logs = NodeLogs::new(&format!("cluster-rotate-{}", backend_name(backend)));
        // Dropped often: every phone resumes several times, each time on the next node.
        let scenario = SCENARIO.replace("[drops]\n", "[drops]\nper_hour = 900\n");
        let (_nodes, _apis, config) =
            three_nodes(backend, &redis, &scenario, TargetPolicy::Rotate, &logs);
        let connecting = config.plan.phones.iter().filter(|p| !p.publisher).count() as u64;
        let report = run(config).unwrap();
        let table = report::table(&report);
        eprintln!("{table}");
        let c = &report.metrics.counters;
        assert!(c.scripted_drops >= connecting, "{c:?}");
        assert!(c.reconnects >= connecting, "{c:?}");
        assert_eq!(report.summary.silent_loss_pairs, 0, "{table}");
        assert!(report.passed(), "{table}");
    }
}
