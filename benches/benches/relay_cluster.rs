//! What the cluster's engine costs, in three parts.
//!
//! 1. **Fan-out across nodes** (each backend in a process of its own): the shapes of
//!    `relay_fanout` (`channel-1000`, `rooms-100x100`; publishers are devices, 32-byte
//!    payloads carrying the intended send time) against one relay alone (memory mode), one
//!    node on Redis, and three nodes on that Redis, subscribers and publishers spread round
//!    robin over the nodes; every node one worker, unpinned. Each runs saturated (a window
//!    of unacknowledged publishes per publisher) for deliveries/s and messages/s, then open
//!    loop at **one rate for all three rows: half of the one-node-on-Redis saturated
//!    message rate**, for publish-to-delivery p50/p99 from each message's intended send time.
//!    The engine's added latency is the `1 node` row's minus the `alone` row's at that rate.
//!    Redis' CPU per message from `INFO cpu` over the saturated phase. A third shape,
//!    `rooms-12x1` (12 rooms of one publisher and one subscriber), is there for the
//!    engine's added latency: the big fan-outs' percentiles are dominated by the one reader
//!    thread that drains 1,000 sockets, which hides a millisecond.
//! 2. **One Redis shard's capacity through the script** (in the parent process, no relay):
//!    8 connections, 64 pipelined `EVALSHA` each, over 1,000 rooms, three connections
//!    subscribed to every room's channel; the script as the relay runs it (with and without
//!    a device's publish id), its forms for rolling upgrades, as an earlier commit ran it,
//!    and without its `XADD`, its `PUBLISH`, or both. Calls/s, Redis CPU per call (`INFO
//!    cpu`), the script's own time per call (`INFO commandstats`).
//! 3. **Redis' instructions per call of the same variants** (argument `instructions` only:
//!    minutes, under valgrind): a `redis-server` under callgrind, the count repeatable where
//!    calls/s swing from one minute to the next, with the calls over 1,000, 100 and 10
//!    rooms (each room's window of repeat keys small, about Redis' 128-key listpack
//!    limit, and past it).
//!
//! Redis is a private `redis-server` (`pabal_testkit::redis`: `appendonly yes`,
//! `appendfsync always`, the recommended production setting), flushed between rows.
//!
//! `cargo bench -p pabal-benches --bench relay_cluster` (`PABAL_BENCH_SECS` sets each
//! phase's length, default 3; an argument `fanout` or `capacity` runs only that part, and
//! `instructions` runs part 3, which the default leaves out;
//! `PABAL_BENCH_SHAPE=rooms-12x1` only that shape; `PABAL_BENCH_RATE=1000` paces every row
//! at that many messages/s instead of half the one-node rate; `PABAL_BENCH_APPENDFSYNC=no`
//! or `everysec` runs Redis without its `fsync` per write; `PABAL_BENCH_NODES=1,0` runs only
//! those rows, 0 the relay alone: the first row run sets the half-of-max rate;
//! `PABAL_BENCH_ENGINE_THREAD=1` runs each worker's engine on a thread of its own,
//! `cluster.engine_thread`, instead of the worker's). Every row prints the load generator's
//! own CPU per message ("loadgen run", its publishers' and reader's threads). Each Redis
//! row also prints the engine's stages over the paced phase (`ClusterStats::stages`: worker
//! -> engine thread, Redis' answer, engine thread -> worker), mean and the buckets holding
//! p50 and p99, and each shape one `added ...` line per Redis row: its p50 / p99 minus the
//! relay alone's at the same rate (`benches/scripts/cluster_latency.sh` gathers those).
//!
//! Placement ([`common::placement`]): unpinned by default, everything shares this machine's
//! cores (Redis, the nodes, the load), so on a small machine the Redis rows measure
//! contention as much as the engine. `PABAL_BENCH_REDIS_CPUS=1 PABAL_BENCH_RELAY_CPUS=0`
//! gives Redis core 1 to itself and puts the relay nodes and the load generator on core 0,
//! as production gives Redis a machine of its own; `PABAL_BENCH_LOAD_CPUS=1` then moves
//! the load generator's threads (publishers and reader, per thread, for each phase) to
//! core 1 beside Redis, leaving core 0 to the relay node (worker and engine thread). The
//! bench prints the placement the kernel reports. Print the load average next to any
//! figure you quote.

#![allow(clippy::unwrap_used)] // reason: a benchmark driver fails loudly

mod common;

/// The daemon's allocator: the relay in this process allocates as it does in production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use common::fanout::{
    Outcome, Publisher, Reader, Scenario, channel_1000, device_of, rooms_100x100, run_phase,
};
use common::publish::backend_name;
use common::redis_capacity::{self, redis_cpu};
use common::{placement, sched};
use pabal_relay::cluster::{BUCKETS, ClusterConfig, HistogramSnapshot};
use pabal_relay::io::BackendKind;
use pabal_relay::runtime::RelayHandle;

use pabal_testkit::redis::RedisServer;

/// The rows of each shape: name, nodes (0: alone, no engine). The one-node row runs first:
/// its saturated rate sets the paced rate of all three.
const ROWS: [(&str, usize); 3] = [("1 node+redis", 1), ("alone", 0), ("3 nodes+redis", 3)];

/// 12 rooms, each one publisher and one subscriber: publish-to-deliver with no fan-out to
/// queue behind (12 publishers keep 3,072 publishes in flight when saturated, under a
/// node worker's `cluster.max_in_flight` of 4,096).
fn rooms_12x1() -> Scenario {
    let room = |k: usize| vec![(false, format!("room:pair{k}"))];
    Scenario {
        name: "rooms-12x1",
        publishers: (0..12).map(|k| (format!("w{k}"), room(k))).collect(),
        subscribers: (0..12).map(|k| (format!("r{k}"), room(k))).collect(),
    }
}

/// The load average (1, 5, 15 min), to print beside the figures.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Starts `nodes` relays (one alone when 0) and runs `scenario` saturated, then paced at
/// `paced_rate` messages/s (half of its own saturated rate when `None`). Returns both
/// outcomes, Redis' CPU µs per message of the saturated phase, and the engine's stages
/// over the paced phase.
fn one_row(
    backend: BackendKind,
    redis: &RedisServer,
    scenario: &Scenario,
    nodes: usize,
    secs: f64,
    paced_rate: Option<f64>,
) -> (Outcome, Outcome, f64, [HistogramSnapshot; 3], String) {
    redis.cli(&["FLUSHALL"]);
    let relays: Vec<RelayHandle> = (0..nodes.max(1))
        .map(|i| {
            let mut config = common::relay_config(backend);
            config.pin_workers = false;
            config.limits.max_rooms_per_user = 100;
            if nodes > 0 {
                config.cluster = Some(ClusterConfig {
                    redis: vec![redis.url()],
                    node_id: Some(format!("bench-{i}")),
                    // The saturated phases keep up to 3,072 publishes in flight on one
                    // worker; the default bound (4,096) refused some under a loaded machine.
                    max_in_flight: 65_536,
                    // `PABAL_BENCH_ENGINE_THREAD=1`: each worker's engine on a thread of
                    // its own (`cluster.engine_thread`) instead of the worker's thread.
                    engine_thread: std::env::var("PABAL_BENCH_ENGINE_THREAD")
                        .is_ok_and(|v| v == "1"),
                    ..ClusterConfig::default()
                });
            }
            RelayHandle::start(config).unwrap()
        })
        .collect();
    let addrs: Vec<_> = relays.iter().map(|r| r.local_addr()).collect();
    let mut readers: Vec<Reader> = scenario
        .subscribers
        .iter()
        .enumerate()
        .map(|(i, (user, rooms))| Reader::connect(addrs[i % addrs.len()], user, rooms))
        .collect();
    let mut publishers: Vec<_> = scenario
        .publishers
        .iter()
        .enumerate()
        .map(|(p, (user, rooms))| {
            let addr = addrs[p % addrs.len()];
            let s = common::pabal_device(addr, user, rooms, device_of(user));
            Publisher::new(s, (0..rooms.len() as u32).collect())
        })
        .collect();
    let before = redis_cpu(redis);
    let saturated = run_phase(&mut publishers, &mut readers, secs, None, false);
    let after = redis_cpu(redis);
    let cpu_per_msg = if nodes == 0 || saturated.messages == 0 {
        0.0
    } else {
        (after.0 - before.0) * 1e6 / saturated.messages as f64
    };
    let rate = paced_rate.unwrap_or(saturated.messages as f64 / saturated.secs / 2.0);
    let stages_before = engine_stages(&relays);
    let sched_before = sched::Snapshot::now(redis, placement::redis_pid(redis));
    let forks_before = redis_forks(redis);
    let depth =
        sched::DepthSampler::start(relays.iter().filter_map(|r| r.cluster().cloned()).collect());
    let paced = run_phase(&mut publishers, &mut readers, secs, Some(rate), false);
    let depth = depth.finish();
    let sched = sched::Snapshot::now(redis, placement::redis_pid(redis))
        .since(&sched_before, paced.messages);
    let forks = redis_forks(redis) - forks_before;
    let stages = engine_stages(&relays);
    let stages = std::array::from_fn(|k| minus(&stages[k], &stages_before[k]));
    drop(readers);
    drop(publishers);
    for relay in relays {
        relay.stop().unwrap();
    }
    (
        saturated,
        paced,
        cpu_per_msg,
        stages,
        format!("{sched} · {depth} · Redis forks (AOF rewrites) {forks}"),
    )
}

/// How many times Redis has forked (`total_forks`: AOF rewrites and snapshots). A fork's
/// child shares Redis' CPUs, so a rewrite in the paced phase on a pinned Redis is a stall
/// the engine did not cause.
fn redis_forks(redis: &RedisServer) -> u64 {
    redis_capacity::info_field(&redis.cli(&["INFO", "stats"]), "total_forks", None) as u64
}

/// The engine's stage histograms (`ClusterStats::stages`), every node together.
fn engine_stages(relays: &[RelayHandle]) -> [HistogramSnapshot; 3] {
    let mut sum = [HistogramSnapshot::default(); 3];
    for stats in relays.iter().filter_map(|r| r.cluster()) {
        for (into, h) in sum.iter_mut().zip(stats.stages()) {
            for (c, n) in into.counts.iter_mut().zip(h.counts) {
                *c += n;
            }
            into.sum += h.sum;
        }
    }
    sum
}

fn minus(after: &HistogramSnapshot, before: &HistogramSnapshot) -> HistogramSnapshot {
    let mut d = *after;
    for (c, b) in d.counts.iter_mut().zip(before.counts) {
        *c -= b;
    }
    d.sum -= before.sum;
    d
}

/// `mean (p50 <= bound, p99 <= bound)` in µs, the quantiles as their bucket's upper bound.
fn stage_text(h: &HistogramSnapshot) -> String {
    let n = h.count();
    if n == 0 {
        return "-".into();
    }
    let bound = |q: f64| {
        let want = (n as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, c) in h.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return BUCKETS.get(i).map_or("inf".into(), |b| b.to_string());
            }
        }
        "inf".into()
    };
    format!(
        "{:.0} ({} / {})",
        h.sum as f64 / n as f64,
        bound(0.5),
        bound(0.99)
    )
}

/// The rows `PABAL_BENCH_NODES` asks for (a list of node counts, `0` the relay alone), in
/// [`ROWS`]' order; all of them when unset.
fn rows() -> Vec<(&'static str, usize)> {
    let Ok(list) = std::env::var("PABAL_BENCH_NODES") else {
        return ROWS.to_vec();
    };
    let wanted: Vec<usize> = list
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .unwrap_or_else(|_| panic!("PABAL_BENCH_NODES={list:?}: expected e.g. 1,0"))
        })
        .collect();
    let rows: Vec<_> = ROWS
        .into_iter()
        .filter(|(_, n)| wanted.contains(n))
        .collect();
    assert!(
        !rows.is_empty(),
        "PABAL_BENCH_NODES={list:?}: no row (0, 1 or 3)"
    );
    rows
}

/// Publish-to-delivery at quantile `q`, ms.
fn quantile_ms(o: &Outcome, q: f64) -> f64 {
    o.latency.value_at_quantile(q) as f64 / 1000.0
}

fn fanout(backend: BackendKind, secs: f64) {
    // `PABAL_BENCH_APPENDFSYNC=everysec` (or `no`): Redis' own fsync per write out of the
    // rows, to tell what the engine adds from what `appendfsync always` costs this disk.
    let fsync = std::env::var("PABAL_BENCH_APPENDFSYNC").unwrap_or_else(|_| "always".into());
    let Some(redis) = RedisServer::start_with("bench-fanout", &["--appendfsync", &fsync]) else {
        return;
    };
    // Before any relay or load thread starts: they inherit this process's CPUs.
    println!("{}", placement::apply(&redis));
    let shape = std::env::var("PABAL_BENCH_SHAPE").ok();
    let fixed_rate: Option<f64> = std::env::var("PABAL_BENCH_RATE")
        .ok()
        .and_then(|r| r.parse().ok());
    let rows = rows();
    for scenario in [rooms_12x1(), channel_1000(), rooms_100x100()] {
        if shape.as_deref().is_some_and(|s| s != scenario.name) {
            continue;
        }
        let mut paced_rate = fixed_rate;
        // (nodes, p50, p99) of each row at the paced rate, for the engine's added latency.
        let mut paced_rows: Vec<(usize, f64, f64)> = Vec::new();
        for &(shape, nodes) in &rows {
            let (sat, paced, cpu, stages, sched) =
                one_row(backend, &redis, &scenario, nodes, secs, paced_rate);
            let msg_rate = sat.messages as f64 / sat.secs;
            let rate = *paced_rate.get_or_insert(msg_rate / 2.0);
            let q = quantile_ms;
            paced_rows.push((nodes, q(&paced, 0.5), q(&paced, 0.99)));
            println!(
                "{:<8} {:<13} {:<13} {:>11.0} {:>9.0} | {:>8.0} {:>11.0} {:>7.2} {:>7.2} {:>8.2} | \
                 {:>9.1}  load {}  loadgen run {:.1} µs/msg",
                backend_name(backend),
                scenario.name,
                shape,
                sat.deliveries as f64 / sat.secs,
                msg_rate,
                rate,
                paced.deliveries as f64 / paced.secs,
                q(&paced, 0.5),
                q(&paced, 0.99),
                paced.latency.max() as f64 / 1000.0,
                cpu,
                load_average(),
                paced.load_run_ns as f64 / 1e3 / paced.messages.max(1) as f64,
            );
            if nodes > 0 {
                let [to_engine, reply, to_worker] = &stages;
                println!(
                    "         stages at that rate, mean µs (p50 / p99 bucket bounds): worker -> \
                     engine {} · Redis answer (appendfsync {fsync}) {} · engine -> worker {}",
                    stage_text(to_engine),
                    stage_text(reply),
                    stage_text(to_worker),
                );
                println!("         {sched}");
            }
        }
        print_added(backend, scenario.name, paced_rate, fixed_rate, &paced_rows);
    }
}

/// One line per Redis row: its p50 and p99 at the paced rate minus the relay alone's (the
/// engine's added latency), as `key=value` fields (`benches/scripts/cluster_latency.sh`
/// reads them). Nothing without an `alone` row.
fn print_added(
    backend: BackendKind,
    shape: &str,
    rate: Option<f64>,
    fixed_rate: Option<f64>,
    rows: &[(usize, f64, f64)],
) {
    let Some(&(_, alone50, alone99)) = rows.iter().find(|r| r.0 == 0) else {
        return;
    };
    let pace = if fixed_rate.is_some() {
        "fixed"
    } else {
        "half-of-max"
    };
    for &(nodes, p50, p99) in rows.iter().filter(|r| r.0 > 0) {
        println!(
            "added backend={} shape={shape} nodes={nodes} pace={pace} rate={:.0} \
             alone_p50={alone50:.2} alone_p99={alone99:.2} p50={p50:.2} p99={p99:.2} \
             added_p50={:+.2} added_p99={:+.2} load={}",
            backend_name(backend),
            rate.unwrap_or(0.0),
            p50 - alone50,
            p99 - alone99,
            load_average().split(' ').next().unwrap_or("?"),
        );
    }
}

fn capacity(secs: f64) {
    let Some(redis) = RedisServer::start("bench-capacity") else {
        return;
    };
    println!("{}", placement::apply(&redis));
    println!(
        "\none Redis shard through the publish script (8 connections x 64 pipelined EVALSHA, \
         1,000 rooms, 3 subscribers per channel)"
    );
    println!(
        "{:<48} {:>10} {:>15} {:>15} {:>18}",
        "variant", "calls/s", "redis CPU us", "script us/call", "1 core at that CPU"
    );
    for variant in redis_capacity::variants() {
        let c = redis_capacity::measure(&redis, &variant, secs);
        println!(
            "{:<48} {:>10.0} {:>15.2} {:>15.2} {:>16.0}/s  load {}",
            variant.name,
            c.per_s,
            c.cpu_us,
            c.script_us,
            1e6 / c.cpu_us.max(0.001),
            load_average(),
        );
    }
}

/// Redis' instructions per call of each variant ([`redis_capacity::instructions`]): the
/// figure that holds still on a machine whose calls/s do not. Three spreads of the calls:
/// over 1,000 rooms (each room's window of repeat keys 5-15 keys over the counted calls),
/// 100 rooms (51-154: Redis' listpack, turned into a skiplist past 128) and 10 rooms
/// (512-1,536: a skiplist, trimmed back to the window's 1,000 sequences every 64).
fn instructions() {
    if !redis_capacity::valgrind_available() {
        println!("\ninstructions: valgrind is not installed here (apt-get install valgrind)");
        return;
    }
    const ROOMS: [usize; 3] = [1000, 100, 10];
    println!(
        "\nRedis' own instructions per publish-script call (callgrind, one connection x 64 \
         pipelined EVALSHA, 3 subscribers per channel, no persistence), by rooms the calls \
         go round"
    );
    println!(
        "{:<42} {:>22} {:>22} {:>22}",
        "variant", "1,000 rooms", "100 rooms", "10 rooms"
    );
    let variants = redis_capacity::variants();
    let first = ROOMS.map(|rooms| redis_capacity::instructions(&variants[0], rooms));
    print!("{:<42}", variants[0].name);
    for n in first {
        print!(" {n:>22.0}");
    }
    println!();
    for variant in &variants[1..] {
        print!("{:<42}", variant.name);
        for (rooms, first) in ROOMS.into_iter().zip(first) {
            let n = redis_capacity::instructions(variant, rooms);
            print!(" {:>13.0} ({:+5.1}%)", n, (n / first - 1.0) * 100.0);
        }
        println!();
    }
    println!("(in brackets: against the first row, in the same column)");
}

fn main() {
    let secs: f64 = std::env::var("PABAL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let part: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wants = |p: &str| part.as_deref().is_none_or(|w| w == p);
    let Some(backend) = common::child_backend() else {
        if wants("fanout") {
            println!(
                "{:<8} {:<13} {:<13} {:>11} {:>9} | {:>8} {:>11} {:>7} {:>7} {:>8} | {:>9}",
                "backend",
                "shape",
                "nodes",
                "deliv/s max",
                "msg/s max",
                "paced/s",
                "deliv/s@pace",
                "p50 ms",
                "p99 ms",
                "max ms",
                "redis us/msg"
            );
            common::run_each_backend_in_its_own_process(&["fanout".to_string()]);
        }
        if wants("capacity") {
            capacity(secs);
        }
        if part.as_deref() == Some("instructions") {
            instructions();
        }
        return;
    };
    fanout(backend, secs);
}
