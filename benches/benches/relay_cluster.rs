//! What the cluster's engine costs: acknowledged publishes per second and publish-to-PUBACK
//! latency for one relay alone (memory mode), one node on Redis, and three nodes on one
//! Redis (publishers spread over the nodes), and Redis' own CPU per publish.
//!
//! Each relay node has one worker; Redis is a private `redis-server`
//! (`pabal_testkit::redis`: `appendonly yes`, `appendfsync always`, the recommended
//! production setting) in a temporary directory under `TMPDIR`. 16 publisher connections,
//! each in its own room; each case runs saturated (64 unacknowledged publishes each) for the
//! rate, then paced at half that rate for the percentiles. Redis' CPU per publish is read
//! from `INFO commandstats` (the publish script's `usec_per_call`) and `INFO cpu`
//! (`used_cpu_user + used_cpu_sys` over the saturated phase, divided by its publishes).
//!
//! `cargo bench -p pabal-benches --bench relay_cluster` (`PABAL_BENCH_SECS` sets each
//! phase's length, default 3). Everything shares this machine's cores: on a small machine
//! the three-node row measures contention as much as the engine.

#![allow(clippy::unwrap_used)] // reason: a benchmark driver fails loudly

mod common;

use common::publish::{backend_name, phase};
use pabal_relay::cluster::ClusterConfig;
use pabal_relay::runtime::RelayHandle;
use pabal_testkit::redis::RedisServer;

/// A field of an `INFO` answer (`name:value` lines), or of a `k=v,...` value.
fn info_field(info: &str, line: &str, key: Option<&str>) -> f64 {
    let Some(value) = info
        .lines()
        .find_map(|l| l.trim().strip_prefix(line)?.strip_prefix(':'))
    else {
        return 0.0;
    };
    match key {
        None => value.trim().parse().unwrap_or(0.0),
        Some(k) => value
            .split(',')
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0),
    }
}

/// Redis' CPU seconds so far and the publish script's calls and microseconds.
fn redis_cpu(redis: &RedisServer) -> (f64, f64, f64) {
    let cpu = redis.cli(&["INFO", "cpu"]);
    let stats = redis.cli(&["INFO", "commandstats"]);
    let script = |k| {
        info_field(&stats, "cmdstat_evalsha", Some(k)) + info_field(&stats, "cmdstat_eval", Some(k))
    };
    (
        info_field(&cpu, "used_cpu_user", None) + info_field(&cpu, "used_cpu_sys", None),
        script("calls"),
        script("usec"),
    )
}

fn main() {
    let secs: f64 = std::env::var("PABAL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let Some(backend) = common::child_backend() else {
        println!(
            "{:<8} {:<14} {:>14} | {:>10} {:>8} {:>8} {:>8} | {:>13} {:>13}",
            "backend",
            "shape",
            "acked/s (sat)",
            "paced/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "script us/pub",
            "redis us/pub"
        );
        common::run_each_backend_in_its_own_process(&[]);
        return;
    };
    let Some(redis) = RedisServer::start("bench") else {
        return;
    };
    for (round, (shape, nodes)) in [("alone", 0usize), ("1 node+redis", 1), ("3 nodes+redis", 3)]
        .into_iter()
        .enumerate()
    {
        let relays: Vec<RelayHandle> = (0..nodes.max(1))
            .map(|i| {
                let mut config = common::relay_config(backend);
                config.pin_workers = false;
                if nodes > 0 {
                    config.cluster = Some(ClusterConfig {
                        redis: vec![redis.url()],
                        node_id: Some(format!("bench-{round}-{i}")),
                        ..ClusterConfig::default()
                    });
                }
                RelayHandle::start(config).unwrap()
            })
            .collect();
        let addrs: Vec<_> = relays.iter().map(|r| r.local_addr()).collect();
        let before = redis_cpu(&redis);
        let sat = phase(&addrs, 32, secs, None, round * 2);
        let after = redis_cpu(&redis);
        let rate = sat.rate();
        let paced = phase(&addrs, 32, secs, Some(rate / 2.0), round * 2 + 1);
        let per_pub = |d: f64| {
            if nodes == 0 || sat.acked == 0 {
                0.0
            } else {
                d / sat.acked as f64
            }
        };
        println!(
            "{:<8} {:<14} {:>14.0} | {:>10.0} {:>8.2} {:>8.2} {:>8.2} | {:>13.1} {:>13.1}",
            backend_name(backend),
            shape,
            rate,
            paced.rate(),
            paced.ms(0.5),
            paced.ms(0.99),
            paced.max_ms(),
            if after.1 > before.1 {
                (after.2 - before.2) / (after.1 - before.1)
            } else {
                0.0
            },
            per_pub((after.0 - before.0) * 1e6),
        );
        for relay in relays {
            relay.stop().unwrap();
        }
    }
}
