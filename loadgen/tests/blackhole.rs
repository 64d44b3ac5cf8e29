//! A connection the carrier NAT silently forgets: the relay's heartbeat notices it and
//! closes it, the phone's own keepalive notices it too, reconnects with its resume list, and
//! ends with everything the relay acknowledged.

#![allow(clippy::unwrap_used, reason = "tests")]

mod common;

use std::time::Duration;

use pabal_loadgen::link::LinkProfile;
use pabal_loadgen::plan::PlanBuilder;
use pabal_loadgen::run::run;
use pabal_relay::io::BackendKind;
use pabal_testkit::TestRelay;

#[test]
fn a_blackholed_phone_is_noticed_and_resumes_without_loss() {
    let relay = TestRelay::start(BackendKind::Epoll, 1, |c| {
        c.heartbeat.interval = Duration::from_secs(1);
        c.heartbeat.min_interval = Duration::from_secs(1);
        c.heartbeat.timeout = Duration::from_secs(1);
    });
    let mut b = PlanBuilder::new();
    let room = b.room("nat", false);
    // A message every 3 s: longer than the NAT's 2 s idle timeout, so the flow expires
    // between messages.
    common::uniform_sender(&mut b, room, 20.0);
    let nat = LinkProfile {
        nat_idle_timeout_s: Some(2),
        ..LinkProfile::unshaped("nat2s")
    };
    let phone = b.phone("sleeper", nat, &[room], None);
    // It asks for a 4 s heartbeat (a battery saver that guessed its NAT wrong), so the
    // relay's pings come after the NAT has forgotten the flow.
    b.heartbeat(phone, 4);
    let mut config = common::config(b.build(), relay.local_addr(), 12.0, 10.0);
    config.settings.probe_after = Duration::from_secs(1);
    config.settings.probe_timeout = Duration::from_secs(1);
    config.settings.ack_interval = None;
    config.settings.drop_backoff_ms = [100, 300];
    let report = run(config).unwrap();
    let table = pabal_loadgen::report::table(&report);
    eprintln!("{table}");
    let stats = relay.stats();
    assert!(
        stats.heartbeat_timeouts >= 1,
        "the relay's heartbeat closed no connection: {stats:?}"
    );
    let c = &report.metrics.counters;
    assert!(c.blackholes >= 1, "the NAT never expired");
    assert!(c.keepalive_timeouts >= 1, "the phone never noticed");
    assert!(
        c.reconnects >= 1 && !report.metrics.resume.is_empty(),
        "no resume"
    );
    assert!(c.delivered_resumed >= 1, "nothing was replayed on resume");
    assert!(report.passed(), "{table}");
    let s = &report.summary;
    assert_eq!(
        (s.silent_loss_pairs, s.caught_up, s.pairs),
        (0, 2, 2),
        "both phones end caught up: {s:?}"
    );
    assert!(c.acked >= 3, "{c:?}");
    relay.stop();
}
