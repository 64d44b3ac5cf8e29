//! Runs are isolated: two runs against one relay (whose memberships and history outlive
//! them) never see each other's rooms, users or messages, because every name carries the
//! run's id. A run that reuses an earlier run's id (what every run did before run ids) is
//! not clean. Both backends where available.

#![allow(clippy::unwrap_used, reason = "tests")]

mod common;

use pabal_loadgen::report;
use pabal_loadgen::run::{RunConfig, RunReport, run};
use pabal_loadgen::scenario::Scenario;
use pabal_loadgen::targets::Targets;
use pabal_testkit::TestRelay;

const SCENARIO: &str = r#"
duration_s = 2
drain_s = 3
settle_s = 1

[population]
phones = 30
profiles = "unshaped"
connect_rate = 200

[chat]
direct_per_phone = 1
groups_per_phone = 1
group_size = { distribution = "fixed", min = 5, max = 5 }
msgs_per_min = 60
"#;

fn run_once(addr: std::net::SocketAddr, seed: u64, run_id: Option<&str>) -> RunReport {
    let mut scenario = Scenario::parse(SCENARIO).unwrap();
    scenario.seed = seed;
    let mut config = RunConfig::from_scenario(&scenario, Targets::one(addr)).unwrap();
    config.progress = false;
    if let Some(id) = run_id {
        config.run_id = id.to_string();
    }
    run(config).unwrap()
}

#[test]
fn repeated_runs_against_one_relay_do_not_see_each_other() {
    for backend in pabal_testkit::backends() {
        let relay = TestRelay::start(backend, 1, |_| {});
        let first = run_once(relay.local_addr(), 1, None);
        assert!(first.passed(), "{}", report::table(&first));
        let second = run_once(relay.local_addr(), 2, None);
        assert_ne!(first.run_id, second.run_id);
        assert!(second.passed(), "{}", report::table(&second));
        // The same names again: the relay still holds the first run's memberships.
        let reused = run_once(relay.local_addr(), 2, Some(&first.run_id));
        eprintln!("{backend:?}, names reused:\n{}", report::table(&reused));
        assert!(
            !reused.passed(),
            "a run reusing names passed:\n{}",
            report::table(&reused)
        );
        relay.stop();
    }
}
