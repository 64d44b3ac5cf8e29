//! The verifier against a relay behind a proxy that breaks the delivery contract on purpose
//! (`common::proxy`, seeded): each misbehaviour must fail the run with the violation that
//! names it, and nothing else; a clean proxy must pass. Each case runs against the relay's
//! epoll backend and, where the kernel allows it, io_uring.

#![allow(clippy::unwrap_used, reason = "tests")]

mod common;

use common::proxy::{Misbehaviour, Proxy};
use pabal_loadgen::report;
use pabal_loadgen::run::{RunConfig, RunReport, run};
use pabal_loadgen::scenario::Scenario;
use pabal_loadgen::targets::Targets;
use pabal_loadgen::verify::Kind;
use pabal_relay::io::BackendKind;
use pabal_testkit::TestRelay;

/// 16 phones on unshaped links in 4 groups of 8, each sending 2 messages a second: enough
/// traffic for every misbehaviour to find its frames within 3 s.
const SCENARIO: &str = r#"
name = "proxy"
seed = 21
duration_s = 3
drain_s = 3
settle_s = 1

[population]
phones = 16
profiles = "unshaped"
connect_rate = 100

[chat]
direct_per_phone = 0
groups_per_phone = 2
group_size = { distribution = "fixed", min = 8, max = 8 }
msgs_per_min = 120
"#;

fn run_behind(backend: BackendKind, mode: Misbehaviour, seed: u64) -> (RunReport, Proxy) {
    let relay = TestRelay::start(backend, 1, |_| {});
    let proxy = Proxy::start(relay.local_addr(), mode, seed, 3);
    let scenario = Scenario::parse(SCENARIO).unwrap();
    let mut config = RunConfig::from_scenario(&scenario, Targets::one(proxy.addr())).unwrap();
    config.progress = false;
    config.retention = pabal_loadgen::run::RetentionSource::Known(common::retention(
        &pabal_relay::config::Config::default(),
    ));
    let report = run(config).unwrap();
    relay.stop();
    (report, proxy)
}

/// Runs `mode` on every backend: the proxy must have misbehaved, and the run must fail with
/// `kind` and no other violation.
fn fails_with(mode: Misbehaviour, kind: Kind) {
    for backend in pabal_testkit::backends() {
        let (report, proxy) = run_behind(backend, mode, 7);
        let table = report::table(&report);
        eprintln!("{backend:?} {mode:?}:\n{table}");
        assert!(proxy.acted() > 0, "{mode:?}: the proxy never misbehaved");
        assert!(!report.passed(), "{mode:?} passed:\n{table}");
        let kinds: Vec<Kind> = report.violations.counts.keys().copied().collect();
        assert_eq!(kinds, vec![kind], "{mode:?} on {backend:?}:\n{table}");
        assert!(table.contains(kind.label()), "{table}");
    }
}

#[test]
fn a_clean_proxy_passes() {
    for backend in pabal_testkit::backends() {
        let (report, proxy) = run_behind(backend, Misbehaviour::Clean, 7);
        let table = report::table(&report);
        assert!(report.passed(), "{backend:?}:\n{table}");
        assert!(proxy.frames() > 500, "{} frames", proxy.frames());
        let s = &report.summary;
        assert_eq!(s.phones_judged, 16, "{table}");
        assert_eq!(s.caught_up, s.pairs);
        let p = &report.publishes;
        assert!(p.acked > 50, "{p:?}");
        assert_eq!(p.unaccounted(), 0, "{p:?}");
    }
}

#[test]
fn swallowed_publishes_are_never_acknowledged() {
    fails_with(Misbehaviour::SwallowPublishes, Kind::UnackedPublish);
}

#[test]
fn a_changed_payload_byte_is_a_corrupted_payload() {
    fails_with(Misbehaviour::CorruptPayloads, Kind::Corrupted);
}

#[test]
fn swapped_deliveries_are_reordered() {
    fails_with(Misbehaviour::Reorder, Kind::Reordered);
}

#[test]
fn a_delivery_sent_twice_is_a_duplicate() {
    fails_with(Misbehaviour::Duplicate, Kind::Duplicate);
}

#[test]
fn a_gap_over_retained_messages_is_unexplained() {
    fails_with(Misbehaviour::ForgeGaps, Kind::UnexplainedGap);
}

#[test]
fn swallowed_subscriptions_are_never_bound() {
    fails_with(Misbehaviour::SwallowSubscriptions, Kind::NeverBound);
}

#[test]
fn refused_connections_are_never_welcomed() {
    fails_with(Misbehaviour::RefuseConnections, Kind::NeverWelcomed);
}
