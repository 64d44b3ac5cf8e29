//! What one phase of a fan-out bench cost, counted rather than timed: the relay's own
//! deliveries (always: `relay_fanout`'s "relay sent/s" column) and, with
//! `PABAL_BENCH_COUNTS=1`, every thread of this process (the relay's worker and the load
//! generator's publisher and reader) by the kernel's `/proc/self/task/<tid>/schedstat`
//! (time run, time waited for a core, times run), and the relay's counters per tick
//! (sends, bytes, catch-up from history). They say whose core was the limit: a worker that
//! ran for the whole phase is the bottleneck; a reader that did is, and what the relay
//! sent beyond what it read waits in the sockets' buffers, uncounted by the reader.
//!
//! Owns: reading those counters and the line that reports them. Must not touch: the relay
//! (it only reads its counters) or any other process.

use std::collections::HashMap;
use std::time::Instant;

use pabal_relay::runtime::RelayHandle;

use super::sched::{Counts, comm, schedstat, tasks};

/// Whether `PABAL_BENCH_COUNTS=1` asks for the counts.
pub fn enabled() -> bool {
    std::env::var("PABAL_BENCH_COUNTS").is_ok_and(|v| v == "1")
}

/// The relay's counters this report reads (summed over its workers).
#[derive(Clone, Copy)]
struct RelayCounts {
    ticks: u64,
    sends: u64,
    deliveries: u64,
    replayed: u64,
    bytes_in: u64,
    bytes_out: u64,
    lag_events: u64,
    lagging: u64,
}

/// Every thread of this process and the relay's counters, at one instant.
pub struct Snapshot {
    at: Instant,
    threads: HashMap<u32, (String, Counts)>,
    stats: RelayCounts,
}

impl Snapshot {
    /// Now: this process's threads and `relay`'s counters.
    pub fn now(relay: &RelayHandle) -> Snapshot {
        let s = relay.stats();
        let stats = RelayCounts {
            ticks: s.ticks,
            sends: s.sends,
            deliveries: s.deliveries,
            replayed: s.replayed,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            lag_events: s.lag_events,
            lagging: s.lagging,
        };
        let me = std::process::id();
        let mut threads = HashMap::new();
        for tid in tasks(me) {
            // The main thread runs the publishers (`fanout::run_phase`).
            let name = if tid == me {
                "publisher".to_owned()
            } else {
                comm(me, tid)
            };
            if let Some(c) = schedstat(me, tid) {
                threads.insert(tid, (name, c));
            }
        }
        Snapshot {
            at: Instant::now(),
            threads,
            stats,
        }
    }

    /// Messages the relay wrote to connections per second between `before` and this
    /// snapshot (its `deliveries` counter: live and from history).
    pub fn deliveries_per_sec_since(&self, before: &Snapshot) -> f64 {
        let secs = self.at.duration_since(before.at).as_secs_f64();
        (self.stats.deliveries - before.stats.deliveries) as f64 / secs.max(1e-9)
    }

    /// What happened between `before` and this snapshot, as lines: each thread that ran
    /// for at least 1% of the interval (its share of the interval run, and waited for a
    /// core), then the relay's counters per second and per tick.
    pub fn since(&self, before: &Snapshot) -> String {
        let ns = self.at.duration_since(before.at).as_nanos().max(1) as f64;
        let mut lines = Vec::new();
        let mut threads: Vec<_> = self
            .threads
            .iter()
            .map(|(tid, (name, (run, wait, slices)))| {
                // A thread started since `before` (the phase's reader) counts from zero.
                let (run0, wait0, slices0) = before.threads.get(tid).map_or((0, 0, 0), |t| t.1);
                (name, run - run0, wait - wait0, slices - slices0)
            })
            .filter(|&(_, run, _, _)| run as f64 >= ns / 100.0)
            .collect();
        threads.sort_by(|a, b| a.0.cmp(b.0));
        for (name, run, wait, slices) in threads {
            lines.push(format!(
                "  {name:<16} ran {:>5.1}% waited {:>5.1}% of {:.2} s, {slices} times",
                run as f64 * 100.0 / ns,
                wait as f64 * 100.0 / ns,
                ns / 1e9
            ));
        }
        let (a, b) = (&self.stats, &before.stats);
        let secs = ns / 1e9;
        let ticks = (a.ticks - b.ticks).max(1) as f64;
        let sends = (a.sends - b.sends).max(1) as f64;
        lines.push(format!(
            "  relay: {:.0} ticks/s, {:.0} sends/tick of {:.0} B, {:.2} M deliveries/s \
             ({:.2} M/s from history), {:.0} B in/tick, {} lag events, {} lagging at end",
            ticks / secs,
            sends / ticks,
            (a.bytes_out - b.bytes_out) as f64 / sends,
            (a.deliveries - b.deliveries) as f64 / secs / 1e6,
            (a.replayed - b.replayed) as f64 / secs / 1e6,
            (a.bytes_in - b.bytes_in) as f64 / ticks,
            a.lag_events - b.lag_events,
            a.lagging,
        ));
        lines.join("\n")
    }
}
