//! One loadgen thread: many phones on one mio `Poll`, a timer heap, and per-second reports.
//!
//! Owns: the event loop (readiness events and timers to [`Phone::step`]), scenario events
//! that hit many phones at once, and the second-by-second series it sends to the main thread.
//! Must not touch: other workers' phones (everything shared goes through [`Shared`]).
//!
//! Timers: each phone has at most one live entry in a binary heap, the instant
//! [`Phone::next_wake`] asked for; an entry whose instant no longer matches the phone's is
//! stale and skipped. How late loadgen gets to a phone after its timer was due or its socket
//! became ready is recorded (`timer_lag`, "loadgen lag" in reports): when loadgen itself is
//! overloaded, that histogram says so before any latency figure can be trusted.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::ErrorKind;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};

use crate::gaps::GapSeen;
use crate::metrics::{Metrics, Second, coarse_histogram, record_ns};
use crate::phone::{Ctx, Phone, Shared};
use crate::scenario::EventSpec;
use crate::verify::{PhoneEnd, Violations};

/// Shortest sleep between two steps of one phone: guards against a phone that keeps asking
/// to be called "now" without making progress.
const MIN_GAP: Duration = Duration::from_micros(200);
/// Longest the loop sleeps without checking the stop flag.
const MAX_SLEEP: Duration = Duration::from_millis(100);

/// What a worker hands back when the run ends.
#[derive(Debug)]
pub struct WorkerResult {
    /// Its measurements.
    pub metrics: Metrics,
    /// What it found wrong along the way.
    pub violations: Violations,
    /// Its phones at the end.
    pub ends: Vec<PhoneEnd>,
    /// GAPs its phones received.
    pub gaps: Vec<GapSeen>,
}

/// One event-loop thread and its phones.
#[derive(Debug)]
pub struct Worker {
    id: usize,
    poll: Poll,
    phones: Vec<Phone>,
    heap: BinaryHeap<Reverse<(Instant, u32)>>,
    /// Phones to step, with the instant they became due (timer) or ready (socket).
    dirty: Vec<(u32, Instant)>,
    shared: Arc<Shared>,
    metrics: Metrics,
    violations: Violations,
    second: hdrhistogram::Histogram<u64>,
    second_relay: hdrhistogram::Histogram<u64>,
    second_lag: hdrhistogram::Histogram<u64>,
    gaps: Vec<GapSeen>,
    sec: u32,
    scratch: Vec<u8>,
    connected: u64,
    events: Vec<(Instant, EventSpec)>,
    tx: Sender<Second>,
}

impl Worker {
    /// A worker for the phones `phones` (global indices), reporting seconds on `tx`.
    pub fn new(
        id: usize,
        phones: &[u32],
        shared: Arc<Shared>,
        events: &[EventSpec],
        trace: bool,
        tx: Sender<Second>,
    ) -> std::io::Result<Worker> {
        let poll = Poll::new()?;
        let mut list = Vec::with_capacity(phones.len());
        let mut heap = BinaryHeap::with_capacity(phones.len());
        for (local, &idx) in phones.iter().enumerate() {
            let first =
                shared.start + Duration::from_secs_f64(shared.plan.connect_offset_s(idx as usize));
            let mut phone = Phone::new(&shared, idx, Token(local), first);
            phone.scheduled = Some(first);
            heap.push(Reverse((first, local as u32)));
            list.push(phone);
        }
        let mut events: Vec<(Instant, EventSpec)> = events
            .iter()
            .map(|e| {
                (
                    shared.steady_start + Duration::from_secs_f64(e.at_s),
                    e.clone(),
                )
            })
            .collect();
        events.sort_by_key(|(t, _)| *t);
        events.reverse();
        Ok(Worker {
            id,
            poll,
            metrics: Metrics::new(shared.plan.profiles.len(), trace),
            phones: list,
            heap,
            dirty: Vec::new(),
            shared,
            violations: Violations::default(),
            second: coarse_histogram(),
            second_relay: coarse_histogram(),
            second_lag: coarse_histogram(),
            gaps: Vec::new(),
            sec: 0,
            scratch: vec![0; 64 * 1024],
            connected: 0,
            events,
            tx,
        })
    }

    /// Runs until the shared stop flag is set.
    pub fn run(mut self) -> std::io::Result<WorkerResult> {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            if self.shared.stop.load(Ordering::Acquire) {
                break;
            }
            let mut deadline = now + MAX_SLEEP;
            if let Some(Reverse((t, _))) = self.heap.peek() {
                deadline = deadline.min(*t);
            }
            deadline =
                deadline.min(self.shared.start + Duration::from_secs(u64::from(self.sec) + 1));
            if let Some((t, _)) = self.events.last() {
                deadline = deadline.min(*t);
            }
            let timeout = deadline.saturating_duration_since(now);
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let polled = Instant::now();
            for ev in events.iter() {
                let i = ev.token().0;
                if let Some(p) = self.phones.get_mut(i) {
                    let err = ev.is_error();
                    p.ready(
                        ev.is_readable() || ev.is_read_closed() || err,
                        ev.is_writable() || ev.is_write_closed() || err,
                    );
                    if !p.dirty {
                        p.dirty = true;
                        self.dirty.push((i as u32, polled));
                    }
                }
            }
            while let Some(&Reverse((t, i))) = self.heap.peek() {
                if t > polled {
                    break;
                }
                self.heap.pop();
                let p = &mut self.phones[i as usize];
                if p.scheduled == Some(t) {
                    p.scheduled = None;
                    if !p.dirty {
                        p.dirty = true;
                        self.dirty.push((i, t));
                    }
                }
            }
            while self.events.last().is_some_and(|(t, _)| *t <= polled) {
                if let Some((_, e)) = self.events.pop() {
                    self.apply_event(&e);
                }
            }
            let mut dirty = std::mem::take(&mut self.dirty);
            for &(i, due) in &dirty {
                // Each phone reads the clock when its turn comes: what loadgen itself takes
                // to get there shows as lag, and is never hidden from the latencies.
                let now = Instant::now();
                let lag = now.saturating_duration_since(due).as_nanos() as u64;
                record_ns(&mut self.metrics.timer_lag, lag);
                record_ns(&mut self.second_lag, lag);
                self.step(i as usize, now);
            }
            dirty.clear();
            self.dirty = dirty;
            let now = Instant::now();
            self.report_seconds(now);
        }
        let now = Instant::now();
        let ends = self
            .phones
            .iter()
            .map(|p| p.end(now, &self.shared))
            .collect();
        Ok(WorkerResult {
            metrics: self.metrics,
            violations: self.violations,
            ends,
            gaps: self.gaps,
        })
    }

    fn ctx_step(&mut self, i: usize, now: Instant, f: impl FnOnce(&mut Phone, &mut Ctx<'_>)) {
        let Worker {
            poll,
            phones,
            heap,
            shared,
            metrics,
            violations,
            second,
            second_relay,
            scratch,
            connected,
            gaps,
            ..
        } = self;
        let mut ctx = Ctx {
            shared,
            registry: poll.registry(),
            metrics,
            violations,
            second,
            second_relay,
            scratch,
            connected,
            gaps,
            now,
        };
        let p = &mut phones[i];
        p.dirty = false;
        f(p, &mut ctx);
        let next = p.next_wake(now, shared).map(|t| t.max(now + MIN_GAP));
        if next != p.scheduled {
            if let Some(t) = next {
                heap.push(Reverse((t, i as u32)));
            }
            p.scheduled = next;
        }
    }

    fn step(&mut self, i: usize, now: Instant) {
        self.ctx_step(i, now, |p, ctx| p.step(ctx));
    }

    fn apply_event(&mut self, e: &EventSpec) {
        match e.kind {
            crate::scenario::EventKind::Drop => {
                for i in 0..self.phones.len() {
                    if self.phones[i].draw(e.share) {
                        let backoff = e.backoff_ms;
                        let now = Instant::now();
                        self.ctx_step(i, now, |p, ctx| p.force_drop(ctx, backoff));
                    }
                }
            }
        }
    }

    fn report_seconds(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.shared.start).as_secs();
        let current = u32::try_from(elapsed).unwrap_or(u32::MAX);
        while self.sec < current {
            let settled = now >= self.shared.publish_end
                && self.phones.iter().all(|p| p.settled(&self.shared.ledger));
            let second = Second {
                worker: self.id,
                sec: self.sec,
                e2e: std::mem::replace(&mut self.second, coarse_histogram()),
                relay: std::mem::replace(&mut self.second_relay, coarse_histogram()),
                lag: std::mem::replace(&mut self.second_lag, coarse_histogram()),
                counters: self.metrics.counters.clone(),
                violations: self.violations.total(),
                connected: self.connected,
                settled,
            };
            // The main thread may be gone (it failed); keep running until told to stop.
            let _ = self.tx.send(second);
            self.sec += 1;
        }
    }
}
