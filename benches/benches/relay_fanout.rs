//! Relay fan-out throughput and latency, end to end over loopback TCP, for each I/O backend.
//!
//! Not a criterion bench: a server's deliveries per second are measured by running it, not by
//! timing a function. The relay runs in-process on one worker pinned to core 0; the load
//! (publishers and one reader thread for every subscriber socket) runs pinned to core 1, so
//! on a 2-core machine the relay has exactly one core.
//!
//! Scenarios (32-byte payloads carrying the intended send time):
//! - `channel-1000`: one publisher, one channel, 1,000 subscriber connections;
//! - `rooms-100x100`: 100 rooms of 100 members each (1,000 connections, each a member of
//!   about 10 rooms), 10 publishers.
//!
//! Each scenario runs twice: saturated (publishers keep a window of unacknowledged publishes
//! full) for the deliveries per second, then open-loop at half that message rate for the
//! latency percentiles, measured from each message's intended send time (no coordinated
//! omission).
//!
//! Publishers are devices (protocol v2, a device id in HELLO), so every publish carries a
//! publish id and the room's owner checks and records it: the cost of exactly-once publish
//! is in the figures. Their msg_ids keep counting across phases, as a device's do.
//!
//! Subscribers speak protocol v3 but by default acknowledge nothing, so no receipt work is
//! measured. With `PABAL_BENCH_ACK=1` each subscriber sends, after every batch it reads from
//! its socket, one cumulative ACK of every room it got messages in (as `pabal-client` does):
//! the relay then keeps delivered markers per (user, room) and sends RECEIPT updates to the
//! v3 subscribers (`receipts.interval`, 1 s), and the rows are marked `+ack`.
//!
//! Two columns count the saturated phase's deliveries: "deliv/s max" what the subscribers
//! read during it, "relay sent/s" what the relay wrote to their sockets (its own counter).
//! They differ when the reader falls behind: it runs on the load's core beside the
//! publisher, and here it costs about as much per delivery as the relay (~0.1 µs), so on
//! two cores both threads run the whole phase and the reader's figure is the lower of two
//! near-equal capacities; what the relay sent beyond it waits in the socket buffers
//! (read in the half second after the phase: none is lost). Compare backends on both.
//! `PABAL_BENCH_COUNTS=1` prints (stderr) what each thread ran and waited for a core in
//! the saturated phase, and the relay's ticks and sends (`common::phase_counts`).
//!
//! `cargo bench -p pabal-benches --bench relay_fanout` (`PABAL_BENCH_SECS` sets each phase's
//! length, default 5; a scenario name as argument runs only that one; `PABAL_BENCH_RATE=N`
//! paces both backends at N messages/s instead of half of each one's own max, which paces
//! the faster backend harder;
//! `PABAL_BENCH_HANDOFF=1` turns the offline hand-off on, with a 1 s delay and an app server
//! that refuses every connection: no subscriber acks, so every member of every room is
//! handed off every window, the detection's worst case). Each backend runs in
//! a process of its own, so neither inherits the other's heap.

#![allow(clippy::unwrap_used)] // reason: a benchmark driver fails loudly

mod common;

/// The daemon's allocator: the relay in this process allocates as it does in production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

use common::fanout::{
    Outcome, Publisher, Reader, Scenario, channel_1000, device_of, rooms_100x100, run_phase_with,
};
use common::phase_counts;
use pabal_relay::io::BackendKind;
use pabal_relay::runtime::RelayHandle;

fn run(backend: BackendKind, scenario: &Scenario, secs: f64, ack: bool) {
    let mut config = common::relay_config(backend);
    config.limits.max_rooms_per_user = 100;
    if std::env::var_os("PABAL_BENCH_HANDOFF").is_some() {
        // The sender runs on the control thread. Port 9 (discard) on loopback: nothing
        // listens, every POST is retried.
        config.control.listen = "127.0.0.1:0".into();
        config.handoff.url = "http://127.0.0.1:9/hooks".into();
        config.handoff.secret = Some("bench-handoff-secret-0123".into());
        config.handoff.delay = Duration::from_secs(1);
    }
    let relay = RelayHandle::start(config).unwrap();
    let addr = relay.local_addr();
    if let Some(core) = core_affinity::get_core_ids().and_then(|ids| ids.get(1).copied()) {
        core_affinity::set_for_current(core);
    }
    let mut readers: Vec<Reader> = scenario
        .subscribers
        .iter()
        .map(|(user, rooms)| Reader::connect(addr, user, rooms))
        .collect();
    let mut publishers: Vec<Publisher> = scenario
        .publishers
        .iter()
        .map(|(user, rooms)| {
            let s = common::pabal_device(addr, user, rooms, device_of(user));
            Publisher::new(s, (0..rooms.len() as u32).collect())
        })
        .collect();
    // The relay's own count of what it wrote to the sockets, over the phase alone: the
    // reader's count is capped by the load generator's core (see the module docs).
    let before = phase_counts::Snapshot::now(&relay);
    let mut after = None;
    let saturated = run_phase_with(&mut publishers, &mut readers, secs, None, ack, &mut || {
        after = Some(phase_counts::Snapshot::now(&relay));
    });
    let after = after.unwrap();
    if phase_counts::enabled() {
        report_counts(scenario, &saturated, &before, &after);
    }
    let relay_rate = after.deliveries_per_sec_since(&before);
    let msg_rate = saturated.messages as f64 / saturated.secs;
    // `PABAL_BENCH_RATE`: one paced rate for both backends (half of each one's own max
    // paces the faster one harder, and its p99 with it).
    let paced_rate = std::env::var("PABAL_BENCH_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(msg_rate / 2.0);
    let paced = run_phase_with(
        &mut publishers,
        &mut readers,
        secs,
        Some(paced_rate),
        ack,
        &mut || {},
    );
    let name = if ack {
        format!("{}+ack", scenario.name)
    } else {
        scenario.name.to_string()
    };
    let per_s = |o: &Outcome| o.deliveries as f64 / o.secs;
    let q = |o: &Outcome, p: f64| o.latency.value_at_quantile(p) as f64 / 1000.0;
    println!(
        "{:<9} {:<14} {:>12.0} {:>12.0} {:>10.0} | {:>8.0} {:>11.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
        relay.backend(),
        name,
        per_s(&saturated),
        relay_rate,
        msg_rate,
        paced_rate,
        per_s(&paced),
        q(&paced, 0.5),
        q(&paced, 0.99),
        q(&paced, 0.999),
        paced.latency.max() as f64 / 1000.0,
    );
    drop(readers);
    drop(publishers);
    relay.stop().unwrap();
}

/// `PABAL_BENCH_COUNTS=1`: what the saturated phase cost (stderr), so that a difference
/// between the backends can be traced to the relay's core or the load generator's.
fn report_counts(
    scenario: &Scenario,
    o: &Outcome,
    before: &phase_counts::Snapshot,
    after: &phase_counts::Snapshot,
) {
    // Each publisher spreads its messages evenly over its rooms: the mean fan-out.
    let fanouts: Vec<usize> = scenario
        .publishers
        .iter()
        .flat_map(|(_, rooms)| rooms.iter())
        .map(|room| {
            scenario
                .subscribers
                .iter()
                .filter(|(_, bound)| bound.contains(room))
                .count()
        })
        .collect();
    let fanout = fanouts.iter().sum::<usize>() as f64 / fanouts.len().max(1) as f64;
    eprintln!(
        "counts {} saturated: published x fan-out {:.2} M/s, read {:.2} M/s in the phase, \
         {:.2} M/s with the 0.5 s after it; {:.1} deliveries per read",
        scenario.name,
        o.messages as f64 * fanout / o.secs / 1e6,
        o.deliveries as f64 / o.secs / 1e6,
        o.delivered_by_stop as f64 / o.secs / 1e6,
        o.delivered_by_stop as f64 / o.reads.max(1) as f64,
    );
    eprintln!("{}", after.since(before));
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects scenarios by name.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let secs: f64 = std::env::var("PABAL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let ack = std::env::var("PABAL_BENCH_ACK").is_ok_and(|v| v == "1");
    let Some(backend) = common::child_backend() else {
        println!(
            "{:<9} {:<14} {:>12} {:>12} {:>10} | {:>8} {:>11} {:>8} {:>8} {:>8} {:>8}",
            "backend",
            "scenario",
            "deliv/s max",
            "relay sent/s",
            "msg/s max",
            "paced/s",
            "deliv/s@pace",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms"
        );
        common::run_each_backend_in_its_own_process(&filter.into_iter().collect::<Vec<_>>());
        return;
    };
    for scenario in [channel_1000(), rooms_100x100()] {
        if filter
            .as_deref()
            .is_some_and(|f| !scenario.name.contains(f))
        {
            continue;
        }
        run(backend, &scenario, secs, ack);
    }
}
