//! Shared helpers for loadgen's end-to-end tests: an in-process relay on an ephemeral
//! loopback port, and a run configuration for a hand-made plan. Every run is bounded by its
//! own timeline (duration plus drain), so a stuck relay fails a test instead of hanging it.

#![allow(dead_code, reason = "each test binary uses a subset")]
#![allow(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::net::SocketAddr;
use std::time::Duration;

use pabal_loadgen::api::Tokens;
use pabal_loadgen::phone::PhoneSettings;
use pabal_loadgen::plan::Plan;
use pabal_loadgen::run::RunConfig;
use pabal_relay::config::Config;
use pabal_relay::io::BackendKind;
use pabal_relay::runtime::RelayHandle;

/// A one-worker relay on 127.0.0.1:0 (epoll: available everywhere), with `tweak` applied.
pub fn relay(tweak: impl FnOnce(&mut Config)) -> RelayHandle {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers: 1,
        pin_workers: false,
        io_backend: BackendKind::Epoll,
        ..Config::default()
    };
    config.control.listen = String::new();
    config.log.level = "warn".into();
    tweak(&mut config);
    RelayHandle::start(config).expect("relay starts")
}

/// A quiet, traced run of `plan` against `target`.
pub fn config(plan: Plan, target: SocketAddr, duration_s: f64, drain_s: f64) -> RunConfig {
    RunConfig {
        name: "test".into(),
        plan,
        target,
        threads: 1,
        settle: Duration::from_millis(1000),
        duration: Duration::from_secs_f64(duration_s),
        drain: Duration::from_secs_f64(drain_s),
        settings: PhoneSettings::default(),
        events: Vec::new(),
        tokens: Tokens::UserId,
        control: None,
        progress: false,
        trace: true,
        source_ips: 1,
    }
}

/// The median of some values.
pub fn median(mut v: Vec<u64>) -> u64 {
    assert!(!v.is_empty(), "no samples");
    v.sort_unstable();
    v[v.len() / 2]
}
