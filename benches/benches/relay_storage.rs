//! Acknowledged publishes per second and publish-to-PUBACK latency through the relay, per
//! storage mode: memory, and disk with `fsync = "never"`, `"interval"` and `"always"`, for
//! 32 B and 1 KiB payloads, in one run so the ratios compare like with like.
//!
//! One worker, on each I/O backend, each in a process of its own (epoll: the log's jobs on a
//! sync thread; io_uring: written and synced through the worker's ring), 16
//! publisher connections, each in its own room and nobody else subscribed, so what is measured is sequencing, the log and the PUBACK path. Each case
//! runs twice: saturated (each publisher keeps 64 publishes unacknowledged) for the
//! acknowledged rate, then open-loop at half that rate for the latency percentiles,
//! measured from each publish's intended send time (no coordinated omission).
//!
//! `cargo bench -p pabal-benches --bench relay_storage` (`PABAL_BENCH_SECS` sets each
//! phase's length, default 3; `PABAL_STORAGE_PACED` paces the latency phase at that many
//! publishes/s instead of half the saturated rate, e.g. 25000 for half of the 50,000/s
//! target). The logs go to a temporary directory under `TMPDIR`: point it
//! at the disk you want to measure (a tmpfs makes every fsync free).

#![allow(clippy::unwrap_used)] // reason: a benchmark driver fails loudly

mod common;

use common::publish::{backend_name, phase};

use pabal_relay::config::{FsyncPolicy, StorageMode};
use pabal_relay::runtime::RelayHandle;

fn main() {
    let secs: f64 = std::env::var("PABAL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let fixed_pace: Option<f64> = std::env::var("PABAL_STORAGE_PACED")
        .ok()
        .and_then(|s| s.parse().ok());
    let modes: [(&str, Option<FsyncPolicy>); 4] = [
        ("memory", None),
        ("never", Some(FsyncPolicy::Never)),
        ("interval", Some(FsyncPolicy::Interval)),
        ("always", Some(FsyncPolicy::Always)),
    ];
    let Some(backend) = common::child_backend() else {
        println!(
            "{:<8} {:<9} {:>7} {:>14} | {:>10} {:>9} {:>9} {:>9}",
            "backend", "mode", "payload", "acked/s (sat)", "paced/s", "p50 ms", "p99 ms", "max ms"
        );
        common::run_each_backend_in_its_own_process(&[]);
        return;
    };
    for payload in [32usize, 1024] {
        for (round, (name, fsync)) in modes.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let mut config = common::relay_config(backend);
            if let Some(fsync) = fsync {
                config.storage.mode = StorageMode::Disk;
                config.storage.dir = dir.path().to_path_buf();
                config.storage.fsync = *fsync;
            }
            let relay = RelayHandle::start(config).unwrap();
            let addr = relay.local_addr();
            let sat = phase(&[addr], payload, secs, None, round * 2);
            let rate = sat.rate();
            let paced = phase(
                &[addr],
                payload,
                secs,
                Some(fixed_pace.unwrap_or(rate / 2.0)),
                round * 2 + 1,
            );
            println!(
                "{:<8} {:<9} {:>7} {:>14.0} | {:>10.0} {:>9.2} {:>9.2} {:>9.2}",
                backend_name(backend),
                name,
                payload,
                rate,
                paced.rate(),
                paced.ms(0.5),
                paced.ms(0.99),
                paced.max_ms(),
            );
            relay.stop().unwrap();
        }
    }
}
