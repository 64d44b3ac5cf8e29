//! How long this machine takes each CPU away from a running thread: the floor under every
//! tail latency measured on it.
//!
//! One thread pinned to each online CPU reads the monotonic clock in a loop for
//! `PABAL_BENCH_SECS` (default 10) and counts every gap between two reads of 10 µs or more:
//! time the thread, runnable and alone on its CPU, did not run (a hypervisor that runs
//! another guest on the physical core, interrupts, the kernel's own work). Per CPU: the
//! gaps in buckets, the longest, the share of time lost, and pauses of 1 ms or more per
//! second. Run it on an otherwise idle machine, before and after a latency run
//! (`benches/scripts/cluster_latency.sh` does): a p99 of a message path that crosses
//! several threads cannot be told apart from pauses that happen tens of times a second.
//!
//! `cargo bench -p pabal-benches --bench machine_pauses`
//!
//! Owns: the pinned spinning threads and their table. Must not touch: anything else (no
//! relay, no sockets).

#![allow(clippy::unwrap_used)] // reason: a benchmark driver fails loudly

use std::time::{Duration, Instant};

/// Upper bounds of the gap buckets, µs (the last holds everything longer).
const BOUNDS_US: [u64; 6] = [50, 100, 500, 1_000, 5_000, 10_000];
/// Gaps shorter than this are the loop itself and the clock read, not pauses.
const FLOOR: Duration = Duration::from_micros(10);

/// What one CPU's thread saw.
struct Pauses {
    cpu: usize,
    /// Gaps per bucket: [10-50 µs, 50-100, 100-500, 0.5-1 ms, 1-5, 5-10, >= 10 ms].
    buckets: [u64; BOUNDS_US.len() + 1],
    longest: Duration,
    lost: Duration,
    ran: Duration,
}

/// Spins on `cpu` for `secs`, counting the gaps.
fn spin(cpu: core_affinity::CoreId, secs: f64) -> Pauses {
    assert!(
        core_affinity::set_for_current(cpu),
        "could not pin a thread to CPU {}",
        cpu.id
    );
    let mut p = Pauses {
        cpu: cpu.id,
        buckets: [0; BOUNDS_US.len() + 1],
        longest: Duration::ZERO,
        lost: Duration::ZERO,
        ran: Duration::ZERO,
    };
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut prev = start;
    while prev < end {
        let now = Instant::now();
        let gap = now - prev;
        prev = now;
        if gap < FLOOR {
            continue;
        }
        p.lost += gap;
        p.longest = p.longest.max(gap);
        let us = gap.as_micros() as u64;
        let bucket = BOUNDS_US
            .iter()
            .position(|&b| us < b)
            .unwrap_or(BOUNDS_US.len());
        p.buckets[bucket] += 1;
    }
    p.ran = prev - start;
    p
}

fn main() {
    let secs: f64 = std::env::var("PABAL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let cpus = core_affinity::get_core_ids().unwrap();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "pauses of a thread spinning alone on each CPU, {secs} s, load average {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let results: Vec<Pauses> = std::thread::scope(|scope| {
        let spinners: Vec<_> = cpus
            .iter()
            .map(|&cpu| scope.spawn(move || spin(cpu, secs)))
            .collect();
        spinners.into_iter().map(|h| h.join().unwrap()).collect()
    });
    println!(
        "{:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8} {:>12}",
        "cpu",
        "10-50us",
        "50-100us",
        "0.1-0.5ms",
        "0.5-1ms",
        "1-5ms",
        "5-10ms",
        ">=10ms",
        "longest ms",
        "lost %",
        ">=1ms per s"
    );
    for p in &results {
        let b = &p.buckets;
        let ran = p.ran.as_secs_f64().max(1e-9);
        println!(
            "{:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10.2} {:>8.2} {:>12.1}",
            p.cpu,
            b[0],
            b[1],
            b[2],
            b[3],
            b[4],
            b[5],
            b[6],
            p.longest.as_secs_f64() * 1e3,
            p.lost.as_secs_f64() / ran * 100.0,
            (b[4] + b[5] + b[6]) as f64 / ran,
        );
    }
}
