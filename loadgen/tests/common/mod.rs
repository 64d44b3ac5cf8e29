//! Shared helpers for loadgen's end-to-end tests: a run configuration for a hand-made plan
//! (the relay itself is `pabal_testkit::TestRelay`). Every run is bounded by its own
//! timeline (duration plus drain), so a stuck relay fails a test instead of hanging it.

#![allow(dead_code, reason = "each test binary uses a subset")]
#![allow(clippy::unwrap_used, reason = "test helpers fail loudly")]

pub mod proxy;

use std::net::SocketAddr;
use std::time::Duration;

use pabal_loadgen::api::Tokens;
use pabal_loadgen::gaps::Retention;
use pabal_loadgen::link::LinkProfile;
use pabal_loadgen::phone::PhoneSettings;
use pabal_loadgen::plan::{Plan, PlanBuilder, SendPlan, fresh_run_id};
use pabal_loadgen::run::{RetentionSource, RunConfig};
use pabal_loadgen::scenario::Arrivals;
use pabal_loadgen::targets::Targets;
use pabal_loadgen::verify::Thresholds;
use pabal_relay::config::Config;

/// A quiet, traced run of `plan` against `target`.
pub fn config(plan: Plan, target: SocketAddr, duration_s: f64, drain_s: f64) -> RunConfig {
    RunConfig {
        name: "test".into(),
        plan,
        targets: Targets::one(target),
        threads: 1,
        settle: Duration::from_millis(1000),
        duration: Duration::from_secs_f64(duration_s),
        drain: Duration::from_secs_f64(drain_s),
        settings: PhoneSettings::default(),
        events: Vec::new(),
        tokens: Tokens::UserId,
        control: None,
        fault: None,
        progress: false,
        trace: true,
        source_ips: 1,
        run_id: fresh_run_id(),
        retention: RetentionSource::Known(retention(&Config::default())),
        thresholds: Thresholds::default(),
    }
}

/// The retention of a relay configuration, as loadgen judges GAPs by it.
pub fn retention(c: &Config) -> Retention {
    Retention {
        max_messages: c.retention.max_messages as u64,
        max_bytes: c.retention.max_bytes as u64,
        max_age_s: c.retention.max_age.as_secs(),
    }
}

/// The median of some values.
pub fn median(mut v: Vec<u64>) -> u64 {
    assert!(!v.is_empty(), "no samples");
    v.sort_unstable();
    v[v.len() / 2]
}

/// Adds an unshaped phone named "sender" that publishes `per_min` 64-byte messages a
/// minute into `room`, evenly spaced; returns its index.
pub fn uniform_sender(b: &mut PlanBuilder, room: u32, per_min: f64) -> u32 {
    let mut send = SendPlan::to_rooms(&[room], per_min, 64);
    send.arrivals = Arrivals::Uniform;
    b.phone(
        "sender",
        LinkProfile::unshaped("unshaped"),
        &[room],
        Some(send),
    )
}
