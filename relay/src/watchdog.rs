//! Liveness: the watchdog thread, systemd notifications, and what `/healthz` reads.
//!
//! Every period the watchdog thread checks that each worker answered the previous liveness
//! probe (a [`crate::mesh::CoreMsg::Probe`] through the worker's own inbox, answered by its
//! loop), and so did the control plane (the probe goes to its runtime, which answers it
//! between requests: [`crate::control::ControlPlane::probe`]), then sends the next one.
//! Only when every one answered does it send systemd `WATCHDOG=1`; a wedged worker (a loop
//! stuck in a syscall, a livelock, a deadlock) or a wedged or dead control plane (where
//! `/healthz`, `/metrics` and the server API live) stops the pings, is logged by name, and
//! systemd restarts the relay after `WatchdogSec=`. Components are numbered: the workers
//! by index, then the control plane ([`component_name`]). The
//! same thread keeps `STATUS=` current ("N connections, M msg/s in, backend io_uring").
//!
//! The decision is sans-IO ([`verdict`], [`Liveness`]: acknowledgements and time in, a
//! decision out); the thread ([`Watchdog`]) only adds the clock and the notifier, which
//! tests replace with a closure.
//!
//! Owns: the probe sequence, the ping decision, the liveness record, sd_notify. Must not
//! touch: worker state (it sees only the acknowledgement counters and summed stats).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};
pub use sd_notify::NotifyState;

use crate::runtime::Relay;

/// Where notifications go: systemd in production ([`systemd`]), a collector in tests.
pub type Notifier = Box<dyn FnMut(&[NotifyState<'_>]) + Send>;

/// Sends to systemd's `NOTIFY_SOCKET`; a no-op when the variable is unset (not under
/// systemd, or `Type=` is not `notify`).
pub fn systemd() -> Notifier {
    Box::new(notify)
}

/// Sends `states` to systemd now (a no-op without `NOTIFY_SOCKET`); a failure is logged at
/// debug level and otherwise ignored: the relay serves on without the service manager.
pub fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

/// `RELOADING=1` with `MONOTONIC_USEC=` (systemd 253 and later match the reload to the
/// READY=1 that ends it by this timestamp).
pub fn notify_reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// The probe sequence, process-wide: every prober (the watchdog, `/healthz` without it)
/// takes the next number and broadcasts under this lock, so each worker receives probes in
/// increasing order and "acknowledged >= n" means "answered probe n".
static PROBE_SEQ: parking_lot::Mutex<u64> = parking_lot::Mutex::new(0);

/// Sends the next liveness probe to every worker and the control plane, and returns its
/// sequence.
pub fn send_probe(relay: &Relay) -> u64 {
    let mut seq = PROBE_SEQ.lock();
    *seq += 1;
    relay.probe(*seq);
    if let Some(control) = relay.control_plane() {
        control.probe(*seq);
    }
    *seq
}

/// The last probe each component answered: the workers by index, then the control plane
/// if it runs.
pub fn probe_acks(relay: &Relay) -> Vec<u64> {
    let mut acks = relay.probe_acks();
    if let Some(control) = relay.control_plane() {
        acks.push(control.probe_ack());
    }
    acks
}

/// "worker 1", or "the control plane" for the component after the last worker.
pub fn component_name(component: usize, workers: usize) -> String {
    if component < workers {
        format!("worker {component}")
    } else {
        "the control plane".to_string()
    }
}

/// Probes every component and waits up to `deadline` for all answers: `Err` lists the
/// components that did not answer. For `/healthz` when no watchdog thread runs.
pub fn probe_now(relay: &Relay, deadline: Duration) -> Result<(), Vec<usize>> {
    let seq = send_probe(relay);
    let until = Instant::now() + deadline;
    loop {
        match verdict(Some(seq), &probe_acks(relay)) {
            Verdict::Alive => return Ok(()),
            Verdict::Wedged { workers, .. } if Instant::now() >= until => return Err(workers),
            Verdict::Wedged { .. } => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// What the watchdog does after one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every worker answered the previous probe (or none was sent yet): ping.
    Alive,
    /// These workers have not answered probe `seq`: withhold the ping.
    Wedged {
        /// The unanswered probe.
        seq: u64,
        /// The workers that did not answer it, by index.
        workers: Vec<usize>,
    },
}

/// Decides from the last probe each worker answered (`acks`, as
/// [`Relay::probe_acks`] gives them) whether every worker answered probe `sent`.
pub fn verdict(sent: Option<u64>, acks: &[u64]) -> Verdict {
    let Some(seq) = sent else {
        return Verdict::Alive;
    };
    let workers: Vec<usize> = acks
        .iter()
        .enumerate()
        .filter(|&(_, &ack)| ack < seq)
        .map(|(worker, _)| worker)
        .collect();
    if workers.is_empty() {
        Verdict::Alive
    } else {
        Verdict::Wedged { seq, workers }
    }
}

/// When each worker was last seen answering a probe; what `/healthz` reads while the
/// watchdog runs. Written once per period by the watchdog thread, read per health check:
/// a mutex off the hot path.
#[derive(Debug)]
pub struct Liveness {
    answered: parking_lot::Mutex<Vec<Instant>>,
    stale_after: Duration,
}

impl Liveness {
    /// Every worker counts as having answered at `now` (the relay just started them all);
    /// a worker silent for longer than `stale_after` is reported stuck.
    pub fn new(workers: usize, now: Instant, stale_after: Duration) -> Self {
        Liveness {
            answered: parking_lot::Mutex::new(vec![now; workers]),
            stale_after,
        }
    }

    /// Records that the workers whose acknowledgement reached `seq` answered by `now`.
    pub fn record(&self, seq: u64, acks: &[u64], now: Instant) {
        let mut answered = self.answered.lock();
        for (last, &ack) in answered.iter_mut().zip(acks) {
            if ack >= seq {
                *last = now;
            }
        }
    }

    /// How long each worker has been silent at `now`.
    pub fn silences(&self, now: Instant) -> Vec<Duration> {
        self.answered
            .lock()
            .iter()
            .map(|&t| now.saturating_duration_since(t))
            .collect()
    }

    /// `Err` lists the workers silent for longer than the staleness bound, with how long.
    pub fn check(&self, now: Instant) -> Result<(), Vec<(usize, Duration)>> {
        let stuck: Vec<(usize, Duration)> = self
            .silences(now)
            .into_iter()
            .enumerate()
            .filter(|&(_, silent)| silent > self.stale_after)
            .collect();
        if stuck.is_empty() { Ok(()) } else { Err(stuck) }
    }

    /// The staleness bound.
    pub fn stale_after(&self) -> Duration {
        self.stale_after
    }
}

/// The watchdog's timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchdogConfig {
    /// Probe (and ping) period. Under systemd, half of `WatchdogSec=`.
    pub period: Duration,
    /// How often `STATUS=` is refreshed.
    pub status_every: Duration,
}

impl WatchdogConfig {
    /// Without a systemd watchdog, workers are still probed this often (for `/healthz`).
    pub const DEFAULT_PERIOD: Duration = Duration::from_secs(5);

    /// Half of systemd's `WATCHDOG_USEC` when set (sd_watchdog_enabled(3) asks for a ping
    /// at least that often), otherwise [`Self::DEFAULT_PERIOD`]. The second value says
    /// whether systemd expects pings.
    pub fn from_env() -> (Self, bool) {
        let systemd = sd_notify::watchdog_enabled();
        let period = systemd.map_or(Self::DEFAULT_PERIOD, |w| {
            (w / 2).max(Duration::from_millis(10))
        });
        let config = WatchdogConfig {
            period,
            status_every: Duration::from_secs(5),
        };
        (config, systemd.is_some())
    }

    /// How long a worker may stay silent before `/healthz` reports it: two missed periods
    /// and a second of slack for scheduling.
    pub fn stale_after(&self) -> Duration {
        self.period * 2 + Duration::from_secs(1)
    }
}

/// The running watchdog thread.
#[derive(Debug)]
pub struct Watchdog {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    liveness: Arc<Liveness>,
}

impl Watchdog {
    /// Starts the thread: it probes every `config.period` and sends `WATCHDOG=1` and
    /// `STATUS=` through `notifier`. It stops by itself once the relay drains.
    pub fn spawn(
        relay: Arc<Relay>,
        config: WatchdogConfig,
        notifier: Notifier,
    ) -> std::io::Result<Watchdog> {
        let liveness = Arc::new(Liveness::new(
            probe_acks(&relay).len(),
            Instant::now(),
            config.stale_after(),
        ));
        let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("pabal-watchdog".into())
            .spawn({
                let liveness = liveness.clone();
                move || run(&relay, config, &liveness, &stopped, notifier)
            })?;
        Ok(Watchdog {
            stop: Some(stop),
            thread: Some(thread),
            liveness,
        })
    }

    /// What `/healthz` reads.
    pub fn liveness(&self) -> Arc<Liveness> {
        self.liveness.clone()
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shut();
    }
}

fn run(
    relay: &Relay,
    config: WatchdogConfig,
    liveness: &Liveness,
    stopped: &crossbeam_channel::Receiver<()>,
    mut notifier: Notifier,
) {
    let mut status = StatusLine::new(relay, Instant::now());
    let mut sent = Some(send_probe(relay));
    let mut wedged: Vec<usize> = Vec::new();
    let start = Instant::now();
    let mut next_probe = start + config.period;
    let mut next_status = start;
    loop {
        let wake = next_probe.min(next_status);
        match stopped.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        if relay.is_draining() {
            // Workers finish and stop answering; STOPPING=1 has told systemd already.
            return;
        }
        let now = Instant::now();
        if now >= next_probe {
            let acks = probe_acks(relay);
            if let Some(seq) = sent {
                liveness.record(seq, &acks, now);
            }
            match verdict(sent, &acks) {
                Verdict::Alive => {
                    if !wedged.is_empty() {
                        tracing::info!(
                            components = ?wedged,
                            "every worker and the control plane answer liveness probes \
                             again; WATCHDOG=1 resumes"
                        );
                        wedged.clear();
                    }
                    notifier(&[NotifyState::Watchdog]);
                }
                Verdict::Wedged { seq, workers } => {
                    let silences = liveness.silences(now);
                    for &component in &workers {
                        let silent = silences.get(component).copied().unwrap_or_default();
                        tracing::warn!(
                            component,
                            probe = seq,
                            "{} has not answered a liveness probe for {:.1} s; withholding \
                             WATCHDOG=1",
                            component_name(component, relay.workers()),
                            silent.as_secs_f64()
                        );
                    }
                    wedged = workers;
                }
            }
            sent = Some(send_probe(relay));
            next_probe = now + config.period;
        }
        if now >= next_status {
            let line = status.update(relay, now, &wedged);
            notifier(&[NotifyState::Status(&line)]);
            next_status = now + config.status_every;
        }
    }
}

/// Builds the `STATUS=` line from the summed counters, with rates since the last one.
#[derive(Debug)]
struct StatusLine {
    at: Instant,
    messages_in: u64,
    deliveries: u64,
}

impl StatusLine {
    fn new(relay: &Relay, now: Instant) -> Self {
        let s = relay.stats();
        StatusLine {
            at: now,
            messages_in: s.messages_in,
            deliveries: s.deliveries,
        }
    }

    fn update(&mut self, relay: &Relay, now: Instant, wedged: &[usize]) -> String {
        let s = relay.stats();
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        let rate = |now: u64, before: u64| {
            if secs > 0.0 {
                now.saturating_sub(before) as f64 / secs
            } else {
                0.0
            }
        };
        let workers: Vec<usize> = wedged
            .iter()
            .copied()
            .filter(|&c| c < relay.workers())
            .collect();
        let mut line = status_line(
            s.connections,
            rate(s.messages_in, self.messages_in),
            rate(s.deliveries, self.deliveries),
            relay.backend(),
            &workers,
        );
        if workers.len() < wedged.len() {
            line.push_str("; control plane not answering");
        }
        self.at = now;
        self.messages_in = s.messages_in;
        self.deliveries = s.deliveries;
        line
    }
}

/// "1234 connections, 56 msg/s in, 789 deliveries/s, backend io_uring", plus the wedged
/// workers if any.
pub fn status_line(
    connections: u64,
    msgs_per_s: f64,
    deliveries_per_s: f64,
    backend: &str,
    wedged: &[usize],
) -> String {
    let mut line = format!(
        "{connections} connections, {msgs_per_s:.0} msg/s in, {deliveries_per_s:.0} \
         deliveries/s, backend {backend}"
    );
    if !wedged.is_empty() {
        let list: Vec<String> = wedged.iter().map(usize::to_string).collect();
        line.push_str(&format!("; worker {} not answering", list.join(", ")));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_probe_yet_means_alive() {
        assert_eq!(verdict(None, &[0, 0]), Verdict::Alive);
    }

    #[test]
    fn all_answered_means_ping() {
        assert_eq!(
            verdict(Some(7), &[7, 9]),
            Verdict::Alive,
            "later probes count too"
        );
    }

    #[test]
    fn a_silent_worker_withholds_the_ping_and_is_named() {
        assert_eq!(
            verdict(Some(7), &[7, 6, 7, 2]),
            Verdict::Wedged {
                seq: 7,
                workers: vec![1, 3]
            }
        );
    }

    #[test]
    fn liveness_reports_only_workers_silent_past_the_bound() {
        let t0 = Instant::now();
        let live = Liveness::new(3, t0, Duration::from_secs(2));
        live.record(1, &[1, 0, 1], t0 + Duration::from_secs(1));
        live.record(2, &[2, 0, 1], t0 + Duration::from_secs(2));
        assert_eq!(live.check(t0 + Duration::from_secs(2)), Ok(()));
        assert_eq!(
            live.check(t0 + Duration::from_millis(3500)),
            Err(vec![
                (1, Duration::from_millis(3500)),
                (2, Duration::from_millis(2500))
            ])
        );
        live.record(3, &[3, 3, 3], t0 + Duration::from_secs(4));
        assert_eq!(live.check(t0 + Duration::from_secs(4)), Ok(()));
    }

    #[test]
    fn health_allows_two_missed_periods() {
        let c = WatchdogConfig {
            period: Duration::from_secs(15),
            status_every: Duration::from_secs(5),
        };
        assert_eq!(c.stale_after(), Duration::from_secs(31));
    }

    #[test]
    fn status_line_reads_well() {
        assert_eq!(
            status_line(1234, 56.4, 789.0, "io_uring", &[]),
            "1234 connections, 56 msg/s in, 789 deliveries/s, backend io_uring"
        );
        assert_eq!(
            status_line(0, 0.0, 0.0, "epoll", &[1, 3]),
            "0 connections, 0 msg/s in, 0 deliveries/s, backend epoll; worker 1, 3 not answering"
        );
    }
}
