//! GAPs against a real relay: a phone away while its room outgrows a retention of 3
//! messages gets GAPs on resume. Judged by the retention the relay's server API reports,
//! they are explained and the run passes; judged as if the relay kept 1,000 messages, the
//! very same GAPs are unexplained and the run fails. Both backends where available.

#![allow(clippy::unwrap_used, reason = "tests")]

mod common;

use pabal_loadgen::api::ControlApi;
use pabal_loadgen::gaps::Retention;
use pabal_loadgen::link::{HandoverModel, LinkProfile};
use pabal_loadgen::plan::PlanBuilder;
use pabal_loadgen::report;
use pabal_loadgen::run::{RetentionSource, RunReport, run};
use pabal_loadgen::verify::Kind;
use pabal_relay::io::BackendKind;
use pabal_testkit::TestRelay;

/// A sender publishing 10 messages a second, and a receiver whose link drops about every
/// second and comes back a second later: each resume finds more than 3 messages it missed.
fn run_with(backend: BackendKind, judge_by: Option<Retention>) -> RunReport {
    let relay = TestRelay::start(backend, 1, |c| {
        c.retention.max_messages = 3;
    });
    let mut b = PlanBuilder::new();
    let room = b.room("short-memory", false);
    common::uniform_sender(&mut b, room, 600.0);
    let flaky = LinkProfile {
        handover: Some(HandoverModel {
            mean_interval_s: 1,
            stall_min_ms: 0,
            stall_max_ms: 0,
            drop_probability: 1.0,
        }),
        ..LinkProfile::unshaped("flaky")
    };
    b.phone("away", flaky, &[room], None);
    let mut config = common::config(b.build(), relay.local_addr(), 5.0, 5.0);
    config.settings.drop_backoff_ms = [900, 1100];
    config.retention = match judge_by {
        Some(r) => RetentionSource::Known(r),
        None => {
            let url = format!("http://{}", relay.control_addr().unwrap());
            RetentionSource::Api(ControlApi::new(&url, None).unwrap())
        }
    };
    let report = run(config).unwrap();
    relay.stop();
    report
}

#[test]
fn gaps_that_retention_explains_pass_and_the_same_gaps_unexplained_fail() {
    for backend in pabal_testkit::backends() {
        let report = run_with(backend, None);
        let table = report::table(&report);
        eprintln!("{backend:?}, retention read from the API:\n{table}");
        let g = &report.gap_summary;
        assert!(g.gaps >= 1, "no GAP: the test exercised nothing\n{table}");
        assert_eq!(g.by_count, g.gaps, "{g:?}");
        assert!(g.retention_source.contains("server API"), "{g:?}");
        assert!(report.passed(), "{table}");

        let report = run_with(backend, Some(Retention::RELAY_DEFAULT));
        let table = report::table(&report);
        assert!(report.gap_summary.gaps >= 1, "{table}");
        assert_eq!(
            report.gap_summary.unexplained, report.gap_summary.gaps,
            "{table}"
        );
        let kinds: Vec<Kind> = report.violations.counts.keys().copied().collect();
        assert_eq!(kinds, vec![Kind::UnexplainedGap], "{table}");
    }
}
