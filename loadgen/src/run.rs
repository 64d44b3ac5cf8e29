//! A whole run: membership set-up, worker threads, channel publishing through the API, the
//! live progress line, the drain, and the verdict.
//!
//! Owns: the timeline (ramp-up, settle, steady phase, drain), run isolation (the plan is
//! namespaced by the run id before anything connects), and putting the workers' results
//! together into a [`RunReport`]: the final comparison, the GAP judgement against the
//! relay's retention, and the account of every publish. Must not touch: sockets of phones
//! (the workers own them), report formatting (that is [`crate::report`]).
//!
//! Against several nodes (`--target A,B,C`), membership is set up through one node's server
//! API (membership lives in the cluster's engine, so it reaches every node), phones are
//! spread over the nodes ([`crate::targets`]), and one ledger judges them all: the verdict
//! does not depend on which node a message went through.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;

use crate::api::{ControlApi, Tokens};
use crate::fault::{self, NodeFault};
use crate::gaps::{Explained, GapSeen, Retention, RoomGaps};
use crate::ledger::{Conflict, Ledger, Msg};
use crate::metrics::{Counters, Metrics, Second, Summary, coarse_histogram};
use crate::payload::Header;
use crate::phone::{PhoneSettings, Shared, UplinkTimes, conflict_violation};
use crate::plan::{Plan, check_ids, fresh_run_id};
use crate::scenario::{EventKind, EventSpec, Scenario};
use crate::schedule::api_schedule;
use crate::targets::Targets;
use crate::verify::{FinalSummary, Kind, Thresholds, Violation, Violations, final_check};
use crate::worker::Worker;

/// Where the relay's retention limits come from, to judge GAPs.
#[derive(Debug, Clone)]
pub enum RetentionSource {
    /// Known beforehand (the scenario's `[verify] retention`, a test's relay).
    Known(Retention),
    /// Read per room from the relay's server API at the end of the run (`--control`, or
    /// the relay `--spawn-relay` started).
    Api(ControlApi),
    /// Nothing better: the relay's documented defaults.
    RelayDefaults,
}

impl RetentionSource {
    fn describe(&self) -> &'static str {
        match self {
            RetentionSource::Known(_) => "as configured in the scenario",
            RetentionSource::Api(_) => "read from the relay's server API",
            RetentionSource::RelayDefaults => {
                "the relay's defaults (not read from the relay: give --control, or [verify] \
                 retention)"
            }
        }
    }
}

/// Everything a run needs.
#[derive(Debug)]
pub struct RunConfig {
    /// Name for reports.
    pub name: String,
    /// The population.
    pub plan: Plan,
    /// The relay's client addresses (one, or a cluster's nodes).
    pub targets: Targets,
    /// Worker threads.
    pub threads: usize,
    /// Pause after the ramp-up before publishing starts.
    pub settle: Duration,
    /// Publishing phase.
    pub duration: Duration,
    /// Longest wait for phones to catch up after publishing stops.
    pub drain: Duration,
    /// Connection keeping.
    pub settings: PhoneSettings,
    /// Scenario events.
    pub events: Vec<EventSpec>,
    /// HELLO tokens.
    pub tokens: Tokens,
    /// The relay's server API (membership and channel publishing go through it when set).
    pub control: Option<ControlApi>,
    /// A node killed (and restarted) during the steady phase.
    pub fault: Option<NodeFault>,
    /// Print the live progress line on stderr.
    pub progress: bool,
    /// Keep every delivery in the report (tests).
    pub trace: bool,
    /// Spread phones over this many loopback source addresses (127.0.1.x); 1: the kernel's
    /// choice; 0: automatic (one per 2,000 phones against a loopback relay).
    pub source_ips: usize,
    /// Suffix of every room, channel and user name (run isolation); empty: none.
    pub run_id: String,
    /// The relay's retention, to judge GAPs.
    pub retention: RetentionSource,
    /// What the verdict tolerates at the end.
    pub thresholds: Thresholds,
}

impl RunConfig {
    /// The run a (scaled) scenario describes, against `targets`.
    pub fn from_scenario(s: &Scenario, targets: Targets) -> anyhow::Result<RunConfig> {
        let plan = Plan::generate(s)?;
        check_ids(&plan)?;
        let p = &s.population;
        Ok(RunConfig {
            name: s.name.clone(),
            plan,
            targets,
            threads: 1,
            settle: Duration::from_secs_f64(s.settle_s),
            duration: Duration::from_secs_f64(s.duration_s),
            drain: Duration::from_secs_f64(s.drain_s),
            settings: PhoneSettings {
                heartbeat_s: p.heartbeat_s,
                probe_after: Duration::from_secs_f64(p.probe_after_s),
                probe_timeout: Duration::from_secs_f64(p.probe_timeout_s),
                handshake_timeout: Duration::from_secs_f64(p.handshake_timeout_s),
                rcvbuf: p.rcvbuf_bytes,
                ack_interval: (p.ack_interval_s > 0.0)
                    .then(|| Duration::from_secs_f64(p.ack_interval_s)),
                idle_threshold: Duration::from_secs_f64(s.measure.idle_threshold_s),
                drops_per_hour: s.drops.per_hour,
                drop_backoff_ms: s.drops.backoff_ms,
            },
            events: s.events.clone(),
            tokens: Tokens::UserId,
            control: None,
            fault: None,
            progress: true,
            trace: false,
            source_ips: 0,
            run_id: fresh_run_id(),
            retention: s
                .verify
                .retention
                .map_or(RetentionSource::RelayDefaults, RetentionSource::Known),
            thresholds: s.verify.thresholds(),
        })
    }
}

/// One second of the whole run.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct SecondPoint {
    /// Seconds since the start.
    pub sec: u32,
    /// Deliveries this second.
    pub deliveries: u64,
    /// Publishes this second.
    pub published: u64,
    /// End-to-end latency of this second's live deliveries, ms.
    pub latency: Summary,
    /// What the relay added to them, ms.
    pub relay_added: Summary,
    /// Phones connected at its end.
    pub connected: u64,
    /// loadgen's own lag this second, ms: if it grows, loadgen is the bottleneck.
    pub loadgen_lag: Summary,
    /// Connections lost this second (handovers, scenario drops, keepalive, relay closes).
    pub drops: u64,
    /// GOAWAYs this second.
    pub goaways: u64,
}

/// Something that happened at a moment of the run, for the report and the chart.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EventMark {
    /// Seconds since the start.
    pub at_s: f64,
    /// What.
    pub label: String,
}

/// Every publish, accounted for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PublishAccount {
    /// Written (phones) or sent (API).
    pub published: u64,
    /// Acknowledged with a sequence.
    pub acked: u64,
    /// Refused with an error code.
    pub refused: u64,
    /// Without PUBACK when their connection ended: the client cannot know (PROTOCOL.md §12).
    pub lost_with_connection: u64,
    /// Without PUBACK after the drain on a live, quiet connection: violations.
    pub never_acked: u64,
    /// Without PUBACK at the end on a phone that was not judged.
    pub unacked_not_judged: u64,
}

impl PublishAccount {
    /// Publishes in none of the other categories (0 when everything adds up).
    pub fn unaccounted(&self) -> i64 {
        self.published as i64
            - (self.acked
                + self.refused
                + self.lost_with_connection
                + self.never_acked
                + self.unacked_not_judged) as i64
    }
}

/// What the GAPs of a run were, judged against the relay's retention.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GapSummary {
    /// GAP frames received.
    pub gaps: u64,
    /// Explained by the count limit.
    pub by_count: u64,
    /// By the byte limit.
    pub by_bytes: u64,
    /// By the age limit.
    pub by_age: u64,
    /// By an epoch change.
    pub by_epoch: u64,
    /// Explained by nothing: violations.
    pub unexplained: u64,
    /// Where the retention limits came from.
    pub retention_source: String,
}

/// Phases of the run, in seconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Timeline {
    /// Ramp-up.
    pub ramp_s: f64,
    /// Settle.
    pub settle_s: f64,
    /// Publishing.
    pub steady_s: f64,
    /// Drain actually used.
    pub drain_s: f64,
    /// From the first connection to the stop.
    pub total_s: f64,
}

/// Everything a run found.
#[derive(Debug)]
pub struct RunReport {
    /// The scenario's name.
    pub name: String,
    /// Phones (channel publishers included).
    pub phones: usize,
    /// Rooms per fan-out bucket.
    pub rooms: BTreeMap<&'static str, usize>,
    /// Worker threads.
    pub threads: usize,
    /// Link profile names, in the order of the per-profile histograms.
    pub profiles: Vec<String>,
    /// Phones per profile.
    pub phones_per_profile: Vec<usize>,
    /// Phases.
    pub timeline: Timeline,
    /// Measurements.
    pub metrics: Metrics,
    /// Channel publishes through the API.
    pub api: Counters,
    /// What went wrong.
    pub violations: Violations,
    /// The final comparison.
    pub summary: FinalSummary,
    /// Second by second.
    pub series: Vec<SecondPoint>,
    /// Scenario events, for the report and the chart.
    pub events: Vec<EventMark>,
    /// The run id every name was suffixed with.
    pub run_id: String,
    /// Every publish, accounted for.
    pub publishes: PublishAccount,
    /// The GAPs, judged.
    pub gap_summary: GapSummary,
}

impl RunReport {
    /// No violation of the delivery contract was seen.
    pub fn passed(&self) -> bool {
        self.violations.total() == 0
    }
}

/// Sets every room's members (and every channel's subscribers) through `api`.
fn setup_membership(plan: &Plan, api: &ControlApi) -> anyhow::Result<()> {
    let mut members: Vec<Vec<&str>> = vec![Vec::new(); plan.rooms.len()];
    for p in &plan.phones {
        if p.publisher {
            continue;
        }
        for &r in &p.rooms {
            members[r as usize].push(p.user.as_str());
        }
    }
    for (room, users) in plan.rooms.iter().zip(&members) {
        for chunk in users.chunks(1000) {
            if room.channel {
                api.add_channel_subscribers(&room.name, chunk)
            } else {
                api.add_room_members(&room.name, chunk)
            }
            .with_context(|| format!("setting up {}", room.name))?;
        }
    }
    Ok(())
}

/// Publishes the channel publishers' messages through the control API, on their schedules.
fn api_publisher(
    shared: &Shared,
    api: &ControlApi,
    publishers: &[u32],
) -> (Counters, Vec<Conflict>) {
    let mut counters = Counters::default();
    let mut conflicts = Vec::new();
    let mut scheds: Vec<_> = publishers
        .iter()
        .filter_map(|&i| {
            let p = &shared.plan.phones[i as usize];
            let send = p.send.as_ref()?;
            let (s, rng) = api_schedule(send, p.seed, shared.steady_start, shared.publish_end);
            Some((i, s, rng, 0u32))
        })
        .collect();
    loop {
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let Some((k, at)) = scheds
            .iter()
            .enumerate()
            .filter_map(|(k, s)| s.1.next().map(|t| (k, t)))
            .min_by_key(|(_, t)| *t)
        else {
            break;
        };
        let now = Instant::now();
        if at > now {
            std::thread::sleep((at - now).min(Duration::from_millis(100)));
            continue;
        }
        let (idx, sched, rng, counter) = &mut scheds[k];
        sched.advance(rng);
        *counter += 1;
        let phone = &shared.plan.phones[*idx as usize];
        let Some(send) = &phone.send else { continue };
        let Some(&room) = send.groups.first() else {
            continue;
        };
        let intended_ns = shared.since_start(at);
        let payload = Header {
            intended_ns,
            sender: *idx,
            counter: *counter,
            flags: 0,
        }
        .payload(send.payload_bytes);
        counters.published += 1;
        // No uplink: the app server is in the data centre.
        shared.uplink.store(*idx, *counter, 0);
        let name = &shared.plan.rooms[room as usize].name;
        match api.publish_channel(name, &phone.user, &payload) {
            Ok(seq) => {
                counters.acked += 1;
                let msg = Msg {
                    sender: *idx,
                    counter: *counter,
                };
                let ms = u32::try_from(intended_ns / 1_000_000).unwrap_or(u32::MAX);
                shared.ledger.ack(room, seq, msg, ms, &mut conflicts);
            }
            Err(e) => {
                counters.refused += 1;
                tracing::warn!("API publish to {name} failed: {e:#}");
            }
        }
    }
    (counters, conflicts)
}

/// Runs the load and returns what it found. Fails only when the run cannot take place (no
/// relay, a bad set-up); violations of the delivery contract are in the report.
pub fn run(config: RunConfig) -> anyhow::Result<RunReport> {
    let RunConfig {
        name,
        mut plan,
        targets,
        threads,
        settle,
        duration,
        drain,
        settings,
        events,
        tokens,
        control,
        fault,
        progress,
        trace,
        source_ips,
        run_id,
        retention,
        thresholds,
    } = config;
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    if !tokens.self_join() && control.is_none() {
        bail!("with tokens, membership is set up through the server API: give --control");
    }
    plan.namespace(&run_id)?;
    if let Some(api) = &control {
        if progress {
            eprintln!(
                "setting up {} rooms and channels through the server API...",
                plan.rooms.len()
            );
        }
        setup_membership(&plan, api)?;
    }
    let api_publishers: Vec<u32> = if control.is_some() {
        (0..plan.phones.len() as u32)
            .filter(|&i| plan.phones[i as usize].publisher)
            .collect()
    } else {
        Vec::new()
    };
    // Past a few thousand connections from one address to one port, every connect() makes
    // the kernel scan for a free ephemeral port (about 1 ms each at 15,000): spread phones
    // over loopback source addresses instead, about 2,000 each.
    let source_ips = match source_ips {
        0 if targets.all_loopback() => plan.phones.len().div_ceil(2000).clamp(1, 250),
        0 => 1,
        n => n,
    };
    let source_ips: Vec<IpAddr> = if source_ips > 1 && targets.all_loopback() {
        (0..source_ips.min(250))
            .map(|k| IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1 + k as u8)))
            .collect()
    } else {
        Vec::new()
    };
    let ramp = Duration::from_secs_f64(plan.ramp_s());
    let start = Instant::now() + Duration::from_millis(50);
    let steady_start = start + ramp + settle;
    let publish_end = steady_start + duration;
    let profiles = plan.profile_names();
    let mut phones_per_profile = vec![0; profiles.len()];
    let mut rooms = BTreeMap::new();
    for p in &plan.phones {
        phones_per_profile[p.profile] += 1;
    }
    for r in &plan.rooms {
        *rooms.entry(r.bucket.label()).or_insert(0) += 1;
    }
    let phone_count = plan.phones.len();
    let shared = Arc::new(Shared {
        ledger: Ledger::new(plan.rooms.len(), plan.phones.len()),
        uplink: UplinkTimes::new(&plan),
        plan,
        start,
        steady_start,
        publish_end,
        targets,
        tokens,
        settings,
        source_ips,
        stop: AtomicBool::new(false),
    });
    let mut assignment: Vec<Vec<u32>> = vec![Vec::new(); threads];
    for i in 0..phone_count as u32 {
        if !api_publishers.contains(&i) {
            assignment[i as usize % threads].push(i);
        }
    }
    let (tx, rx) = mpsc::channel::<Second>();
    let mut handles = Vec::new();
    for (k, phones) in assignment.iter().enumerate() {
        let worker = Worker::new(k, phones, shared.clone(), &events, trace, tx.clone())
            .context("cannot create a poll instance")?;
        let handle = std::thread::Builder::new()
            .name(format!("loadgen-{k}"))
            .spawn(move || worker.run())
            .context("cannot start a worker thread")?;
        handles.push(handle);
    }
    drop(tx);
    let api_done = Arc::new(AtomicBool::new(api_publishers.is_empty()));
    let api_handle = match &control {
        Some(api) if !api_publishers.is_empty() => {
            let (shared, api, done) = (shared.clone(), api.clone(), api_done.clone());
            let publishers = api_publishers.clone();
            Some(
                std::thread::Builder::new()
                    .name("loadgen-api".into())
                    .spawn(move || {
                        let c = api_publisher(&shared, &api, &publishers);
                        done.store(true, Ordering::Release);
                        c
                    })
                    .context("cannot start the API publisher")?,
            )
        }
        _ => None,
    };
    let fault_handle = match fault {
        Some(f) => {
            let shared = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("loadgen-fault".into())
                    .spawn(move || fault::play(&f, &shared))
                    .context("cannot start the fault thread")?,
            )
        }
        None => None,
    };

    // The main thread: seconds in, progress out, and the decision to stop.
    let connectable = phone_count - api_publishers.len();
    struct Pending {
        workers: usize,
        e2e: Histogram<u64>,
        relay: Histogram<u64>,
        lag: Histogram<u64>,
        seconds: Vec<Second>,
    }
    let mut pending: BTreeMap<u32, Pending> = BTreeMap::new();
    let mut series = Vec::new();
    let mut last = Counters::default();
    let mut stop_reason = "drain deadline";
    let drain_deadline = publish_end + drain;
    let mut drain_used = drain;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(second) => {
                let entry = pending.entry(second.sec).or_insert_with(|| Pending {
                    workers: 0,
                    e2e: coarse_histogram(),
                    relay: coarse_histogram(),
                    lag: coarse_histogram(),
                    seconds: Vec::new(),
                });
                entry.workers += 1;
                let _ = entry.e2e.add(&second.e2e);
                let _ = entry.relay.add(&second.relay);
                let _ = entry.lag.add(&second.lag);
                entry.seconds.push(second);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        while let Some(entry) = pending.first_entry() {
            if entry.get().workers < threads {
                break;
            }
            let (sec, p) = entry.remove_entry();
            let mut counters = Counters::default();
            let (mut violations, mut connected, mut settled) = (0, 0, true);
            for s in &p.seconds {
                counters.add(&s.counters);
                violations += s.violations;
                connected += s.connected;
                settled &= s.settled;
            }
            let point = SecondPoint {
                sec,
                deliveries: counters.delivered - last.delivered,
                published: counters.published - last.published,
                latency: Summary::of(&p.e2e),
                relay_added: Summary::of(&p.relay),
                connected,
                loadgen_lag: Summary::of(&p.lag),
                drops: counters.drops_total() - last.drops_total(),
                goaways: counters.goaway_total() - last.goaway_total(),
            };
            if progress {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(
                    err,
                    "[{sec:>4}s] conn {connected:>6}/{connectable}  pub {:>6}/s  deliv {:>7}/s  \
                     p50 {:>7}  p99 {:>7}  relay+ p99 {:>6}  lag p99 {:>6}  gaps {}  goaway {}  \
                     drops {}  viol {violations}",
                    point.published,
                    point.deliveries,
                    fmt_ms(point.latency.p50),
                    fmt_ms(point.latency.p99),
                    fmt_ms(point.relay_added.p99),
                    fmt_ms(point.loadgen_lag.p99),
                    counters.gaps,
                    counters.goaway_total(),
                    counters.drops_total(),
                );
            }
            series.push(point);
            last = counters;
            let second_end = start + Duration::from_secs(u64::from(sec) + 1);
            if settled
                && second_end >= publish_end + Duration::from_secs(1)
                && api_done.load(Ordering::Acquire)
            {
                stop_reason = "every phone caught up";
                drain_used = second_end.saturating_duration_since(publish_end);
                shared.stop.store(true, Ordering::Release);
            }
        }
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        if Instant::now() >= drain_deadline {
            shared.stop.store(true, Ordering::Release);
            break;
        }
    }
    shared.stop.store(true, Ordering::Release);
    let stopped = Instant::now();
    let mut metrics = Metrics::new(profiles.len(), trace);
    let mut violations = Violations::default();
    let mut ends = Vec::new();
    let mut gaps = Vec::new();
    for handle in handles {
        let result = handle
            .join()
            .map_err(|_| anyhow::anyhow!("a worker thread panicked"))?
            .context("a worker's event loop failed")?;
        metrics.merge(result.metrics);
        violations.merge(result.violations);
        ends.extend(result.ends);
        gaps.extend(result.gaps);
    }
    let (api_counters, api_conflicts) = match api_handle {
        Some(h) => h
            .join()
            .map_err(|_| anyhow::anyhow!("the API publisher panicked"))?,
        None => (Counters::default(), Vec::new()),
    };
    let fault_marks = match fault_handle {
        Some(h) => h
            .join()
            .map_err(|_| anyhow::anyhow!("the fault thread panicked"))?
            .context("the node fault")?,
        None => Vec::new(),
    };
    if metrics.counters.welcomes == 0 && connectable > 0 {
        bail!(
            "no phone got a WELCOME from {} ({} connection attempts, {} failed): is a \
             relay running there, and does it accept these tokens?",
            shared.targets,
            metrics.counters.connects,
            metrics.counters.connect_failures
        );
    }
    let plan = &shared.plan;
    for c in api_conflicts.iter().chain(&shared.ledger.finish()) {
        violations.add(conflict_violation(c, plan), 1);
    }
    let gap_summary = judge_gaps(&shared.ledger, plan, &gaps, &retention, &mut violations);
    let summary = final_check(
        |r| shared.ledger.last_acked(r),
        &ends,
        |r| plan.rooms[r as usize].name.clone(),
        &thresholds,
        &mut violations,
    );
    let c = &metrics.counters;
    let publishes = PublishAccount {
        published: c.published + api_counters.published,
        acked: c.acked + api_counters.acked,
        refused: c.refused + api_counters.refused,
        lost_with_connection: c.unacked_at_close,
        never_acked: summary.unacked_quiet,
        unacked_not_judged: summary.unacked_not_judged,
    };
    if publishes.unaccounted() != 0 {
        violations.add(
            Violation {
                kind: Kind::UnackedPublish,
                phone: None,
                room: None,
                detail: format!(
                    "{} publishes unaccounted for: {publishes:?}",
                    publishes.unaccounted()
                ),
            },
            publishes.unaccounted().unsigned_abs(),
        );
    }
    if progress {
        eprintln!("stopped: {stop_reason}");
    }
    let steady_s = (steady_start - start).as_secs_f64();
    let mut events: Vec<EventMark> = events
        .iter()
        .map(|e| EventMark {
            at_s: steady_s + e.at_s,
            label: match e.kind {
                EventKind::Drop => format!("drop {:.0}%", e.share * 100.0),
            },
        })
        .chain(fault_marks)
        .collect();
    events.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    Ok(RunReport {
        name,
        phones: phone_count,
        rooms,
        threads,
        profiles,
        phones_per_profile,
        timeline: Timeline {
            ramp_s: ramp.as_secs_f64(),
            settle_s: settle.as_secs_f64(),
            steady_s: duration.as_secs_f64(),
            drain_s: drain_used.as_secs_f64(),
            total_s: stopped.saturating_duration_since(start).as_secs_f64(),
        },
        metrics,
        api: api_counters,
        violations,
        summary,
        series,
        events,
        run_id,
        publishes,
        gap_summary,
    })
}

/// Judges every GAP phones received against the relay's retention (see [`crate::gaps`]).
fn judge_gaps(
    ledger: &Ledger,
    plan: &Plan,
    gaps: &[GapSeen],
    source: &RetentionSource,
    violations: &mut Violations,
) -> GapSummary {
    let mut s = GapSummary {
        gaps: gaps.len() as u64,
        retention_source: source.describe().to_string(),
        ..GapSummary::default()
    };
    let size_of = |sender: u32| {
        plan.phones
            .get(sender as usize)
            .and_then(|p| p.send.as_ref())
            .map_or(0, |s| s.payload_bytes as u64)
    };
    let max_size = (0..plan.phones.len() as u32)
        .map(size_of)
        .max()
        .unwrap_or(0);
    let mut by_room: BTreeMap<u32, Vec<&GapSeen>> = BTreeMap::new();
    for g in gaps {
        by_room.entry(g.room).or_default().push(g);
    }
    for (room, room_gaps) in by_room {
        let Some(info) = plan.rooms.get(room as usize) else {
            continue;
        };
        let retention = match source {
            RetentionSource::Known(r) => *r,
            RetentionSource::RelayDefaults => Retention::RELAY_DEFAULT,
            RetentionSource::Api(api) => match api.retention(&info.name, info.channel) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(
                        "{e:#}: judging {}'s GAPs by the relay's defaults",
                        info.name
                    );
                    Retention::RELAY_DEFAULT
                }
            },
        };
        let judge = RoomGaps::new(&ledger.snapshot(room), size_of, max_size);
        for g in room_gaps {
            match judge.judge(g, &retention) {
                Explained::Count => s.by_count += 1,
                Explained::Bytes => s.by_bytes += 1,
                Explained::Age => s.by_age += 1,
                Explained::Epoch => s.by_epoch += 1,
                Explained::Unexplained(detail) => {
                    s.unexplained += 1;
                    violations.add(
                        Violation {
                            kind: Kind::UnexplainedGap,
                            phone: plan
                                .phones
                                .get(g.phone as usize)
                                .map(|p| format!("{} ({})", g.phone, p.user)),
                            room: Some(info.name.clone()),
                            detail,
                        },
                        g.to - g.from + 1,
                    );
                }
            }
        }
    }
    s
}

/// Milliseconds for the progress line: `2.5ms`, `312ms`, `1.25s`.
pub fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2}s", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.0}ms")
    } else {
        format!("{ms:.1}ms")
    }
}
