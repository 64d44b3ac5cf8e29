//! Against a relay that requires tokens: phones present HS256 JWTs loadgen mints, membership
//! is set up through the server API, and channel broadcasts are published through it.

#![allow(clippy::unwrap_used, reason = "tests")]

mod common;

use std::path::PathBuf;

use pabal_loadgen::api::{ControlApi, Tokens};
use pabal_loadgen::plan::Bucket;
use pabal_loadgen::report;
use pabal_loadgen::run::{RunConfig, run};
use pabal_loadgen::scenario::Scenario;
use pabal_loadgen::targets::Targets;
use pabal_relay::auth::{JwtConfig, KeyAlgorithm, KeyConfig};
use pabal_relay::config::AuthMode;
use pabal_relay::io::BackendKind;
use pabal_testkit::TestRelay;

const SCENARIO: &str = r#"
name = "jwt-api"
seed = 5
duration_s = 4
drain_s = 6
settle_s = 1

[population]
phones = 40
profiles = "lte:50,hspa:50"
connect_rate = 200

[chat]
direct_per_phone = 1
groups_per_phone = 1
group_size = { distribution = "uniform", min = 3, max = 8 }
msgs_per_min = 30

[[channel]]
name = "brand-test"
subscribers = 30
msgs_per_min = 60
"#;

fn temp_file(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("pabal-loadgen-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn tokens_and_the_server_api_drive_a_relay_that_requires_them() {
    let secret = temp_file("jwt.secret", "loadgen-test-secret-0123456789abcdef\n");
    let key = "loadgen-test-api-key-0123456789";
    let secret_for_relay = secret.clone();
    let relay = TestRelay::start(BackendKind::Epoll, 1, move |c| {
        c.auth.mode = AuthMode::Jwt;
        c.auth.jwt = Some(JwtConfig {
            leeway: 30,
            keys: vec![KeyConfig {
                kid: None,
                algorithm: KeyAlgorithm::Hs256,
                default: false,
                secret_file: Some(secret_for_relay),
                public_key_file: None,
            }],
        });
        c.control.api_key = Some(key.into());
    });
    let control = relay.control_addr().expect("the control API listens");
    let scenario = Scenario::parse(SCENARIO).unwrap();
    let mut config = RunConfig::from_scenario(&scenario, Targets::one(relay.local_addr())).unwrap();
    config.progress = false;
    config.tokens = Tokens::from_secret_file(&secret).unwrap();
    config.control = Some(ControlApi::new(&format!("http://{control}"), Some(key.into())).unwrap());
    let report = run(config).unwrap();
    let _ = std::fs::remove_file(&secret);
    let table = report::table(&report);
    eprintln!("{table}");
    assert!(report.passed(), "{table}");
    let stats = relay.stats();
    assert_eq!(stats.auth_failures, 0, "{stats:?}");
    assert!(report.api.acked >= 3, "API broadcasts: {:?}", report.api);
    let channel = report.metrics.e2e.by_bucket[Bucket::Channel.index()].len();
    assert!(
        channel >= 30,
        "broadcasts reached the subscribers: {channel}"
    );
    assert!(
        report.metrics.counters.acked > 10,
        "phones published in their rooms"
    );
    assert_eq!(
        report.summary.never_bound, 0,
        "every membership came from the API"
    );
    assert_eq!(report.summary.caught_up, report.summary.pairs);
    relay.stop();
}
