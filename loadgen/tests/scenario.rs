//! A short scenario (200 phones on mixed links, chats, groups, a channel, quiet phones and
//! drops) against a real relay: zero silent loss, duplicates or reorders, and a report.

#![allow(clippy::unwrap_used, reason = "tests")]

mod common;

use pabal_loadgen::report;
use pabal_loadgen::run::{RunConfig, run};
use pabal_loadgen::scenario::Scenario;
use pabal_loadgen::targets::Targets;
use pabal_relay::io::BackendKind;
use pabal_testkit::TestRelay;

const SCENARIO: &str = r#"
name = "e2e-short"
seed = 11
duration_s = 8
drain_s = 8
settle_s = 1

[population]
phones = 200
profiles = "3g:40,hspa:20,lte:30,3g-slow:10"
connect_rate = 200
probe_after_s = 5

[chat]
direct_per_phone = 2
groups_per_phone = 1
group_size = { distribution = "zipf", min = 3, max = 30, exponent = 1.2 }
msgs_per_min = 6
group_share = 0.4

[idle]
share = 0.2
quiet_s = [2, 4]
active_s = [2, 4]

[drops]
per_hour = 120
backoff_ms = [200, 1500]

[[channel]]
name = "notice"
subscribers = 100
msgs_per_min = 30
"#;

#[test]
fn a_short_mixed_scenario_ends_without_violations() {
    let relay = TestRelay::start(BackendKind::Epoll, 1, |_| {});
    let scenario = Scenario::parse(SCENARIO).unwrap();
    let mut config = RunConfig::from_scenario(&scenario, Targets::one(relay.local_addr())).unwrap();
    config.progress = false;
    let report = run(config).unwrap();
    let table = report::table(&report);
    eprintln!("{table}");
    assert!(report.passed(), "{table}");
    let c = &report.metrics.counters;
    assert!(c.delivered > 500, "{c:?}");
    assert!(c.acked > 100, "{c:?}");
    assert!(
        c.scripted_drops > 0 && c.reconnects > 0,
        "drops were exercised: {c:?}"
    );
    assert_eq!(report.summary.silent_loss_pairs, 0);
    assert!(report.summary.pairs >= 200, "{:?}", report.summary);
    assert!(report.metrics.e2e.all.len() > 500);
    assert!(table.contains("RESULT: PASS"));
    let json = report::to_json(&report);
    assert_eq!(json["passed"], true);
    assert!(json["series"].as_array().is_some_and(|s| !s.is_empty()));
    assert!(
        json["latency_ms"]["relay_added"]["all"]["count"]
            .as_u64()
            .unwrap()
            > 0
    );
    let svg = report::to_svg(&report);
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline"),
        "{svg}"
    );
    relay.stop();
}
