//! A whole run: membership set-up, worker threads, channel publishing through the API, the
//! live progress line, the drain, and the verdict.
//!
//! Owns: the timeline (ramp-up, settle, steady phase, drain) and putting the workers'
//! results together into a [`RunReport`]. Must not touch: sockets of phones (the workers own
//! them), report formatting (that is [`crate::report`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;

use crate::api::{ControlApi, Tokens};
use crate::metrics::{Counters, Metrics, Second, Summary, coarse_histogram};
use crate::payload::Header;
use crate::phone::{PhoneSettings, Shared, UplinkTimes, api_schedule};
use crate::plan::{Plan, check_ids};
use crate::scenario::{EventSpec, Scenario};
use crate::verify::{FinalSummary, Ledger, Source, Violations, final_check};
use crate::worker::Worker;

/// Everything a run needs.
#[derive(Debug)]
pub struct RunConfig {
    /// Name for reports.
    pub name: String,
    /// The population.
    pub plan: Plan,
    /// The relay's client address.
    pub target: SocketAddr,
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
    /// Print the live progress line on stderr.
    pub progress: bool,
    /// Keep every delivery in the report (tests).
    pub trace: bool,
    /// Spread phones over this many loopback source addresses (127.0.1.x); 1: the kernel's
    /// choice; 0: automatic (one per 2,000 phones against a loopback relay).
    pub source_ips: usize,
}

impl RunConfig {
    /// The run a (scaled) scenario describes, against `target`.
    pub fn from_scenario(s: &Scenario, target: SocketAddr) -> anyhow::Result<RunConfig> {
        let plan = Plan::generate(s)?;
        check_ids(&plan)?;
        let p = &s.population;
        Ok(RunConfig {
            name: s.name.clone(),
            plan,
            target,
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
            progress: true,
            trace: false,
            source_ips: 0,
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
}

impl RunReport {
    /// No violation of the delivery contract was seen.
    pub fn passed(&self) -> bool {
        self.violations.total() == 0
    }
}

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
fn api_publisher(shared: &Shared, api: &ControlApi, publishers: &[u32]) -> Counters {
    let mut counters = Counters::default();
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
        let payload = Header {
            intended_ns: shared.since_start(at),
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
                if let Err(c) = shared.ledger.record(room, seq, *idx, *counter, Source::Ack) {
                    tracing::error!("API publish: {c}");
                }
            }
            Err(e) => {
                counters.refused += 1;
                tracing::warn!("API publish to {name} failed: {e:#}");
            }
        }
    }
    counters
}

/// Runs the load and returns what it found. Fails only when the run cannot take place (no
/// relay, a bad set-up); violations of the delivery contract are in the report.
pub fn run(config: RunConfig) -> anyhow::Result<RunReport> {
    let RunConfig {
        name,
        plan,
        target,
        threads,
        settle,
        duration,
        drain,
        settings,
        events,
        tokens,
        control,
        progress,
        trace,
        source_ips,
    } = config;
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    if !tokens.self_join() && control.is_none() {
        bail!("with tokens, membership is set up through the server API: give --control");
    }
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
        0 if target.ip().is_loopback() => plan.phones.len().div_ceil(2000).clamp(1, 250),
        0 => 1,
        n => n,
    };
    let source_ips: Vec<IpAddr> = if source_ips > 1 && target.ip().is_loopback() {
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
        target,
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

    // The main thread: seconds in, progress out, and the decision to stop.
    let connectable = phone_count - api_publishers.len();
    type Pending = (usize, Histogram<u64>, Histogram<u64>, Vec<Second>);
    let mut pending: BTreeMap<u32, Pending> = BTreeMap::new();
    let mut series = Vec::new();
    let mut last = Counters::default();
    let mut stop_reason = "drain deadline";
    let drain_deadline = publish_end + drain;
    let mut drain_used = drain;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(second) => {
                let entry = pending
                    .entry(second.sec)
                    .or_insert_with(|| (0, coarse_histogram(), coarse_histogram(), Vec::new()));
                entry.0 += 1;
                let _ = entry.1.add(&second.e2e);
                let _ = entry.2.add(&second.relay);
                entry.3.push(second);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        while let Some(entry) = pending.first_entry() {
            if entry.get().0 < threads {
                break;
            }
            let (sec, (_, hist, relay_hist, seconds)) = entry.remove_entry();
            let mut counters = Counters::default();
            let (mut violations, mut connected, mut settled) = (0, 0, true);
            for s in &seconds {
                counters.add(&s.counters);
                violations += s.violations;
                connected += s.connected;
                settled &= s.settled;
            }
            let point = SecondPoint {
                sec,
                deliveries: counters.delivered - last.delivered,
                published: counters.published - last.published,
                latency: Summary::of(&hist),
                relay_added: Summary::of(&relay_hist),
                connected,
            };
            if progress {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(
                    err,
                    "[{sec:>4}s] conn {connected:>6}/{connectable}  pub {:>6}/s  deliv {:>7}/s  \
                     p50 {:>7}  p99 {:>7}  relay+ p99 {:>6}  gaps {}  goaway {}  drops {}  \
                     viol {violations}",
                    point.published,
                    point.deliveries,
                    fmt_ms(point.latency.p50),
                    fmt_ms(point.latency.p99),
                    fmt_ms(point.relay_added.p99),
                    counters.gaps,
                    counters.goaway_total(),
                    counters.link_drops + counters.scripted_drops + counters.keepalive_timeouts,
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
    for handle in handles {
        let result = handle
            .join()
            .map_err(|_| anyhow::anyhow!("a worker thread panicked"))?
            .context("a worker's event loop failed")?;
        metrics.merge(result.metrics);
        violations.merge(result.violations);
        ends.extend(result.ends);
    }
    let api_counters = match api_handle {
        Some(h) => h
            .join()
            .map_err(|_| anyhow::anyhow!("the API publisher panicked"))?,
        None => Counters::default(),
    };
    if metrics.counters.welcomes == 0 && connectable > 0 {
        bail!(
            "no phone got a WELCOME from {target} ({} connection attempts, {} failed): is a \
             relay running there, and does it accept these tokens?",
            metrics.counters.connects,
            metrics.counters.connect_failures
        );
    }
    let plan = &shared.plan;
    let summary = final_check(
        &shared.ledger,
        &ends,
        |r| plan.rooms[r as usize].name.clone(),
        &mut violations,
    );
    if progress {
        eprintln!("stopped: {stop_reason}");
    }
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
    })
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
