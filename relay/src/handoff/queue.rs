//! The sender's queue, sans-IO: hand-offs waiting for the app server, the batch in flight,
//! and when to try again. Time is an argument; the sender task reads the clock and does the
//! HTTP.
//!
//! The queue holds at most `queue_max` items, the batch in flight included (its items stay
//! at the front until the app server answers). When it is full, a new item pushes out the
//! **oldest queued one** (not in flight), counted in `dropped_queue_full`: when the app
//! server comes back after an outage, what reaches it first are the newest messages, the
//! ones a push is still worth sending for, and the app server learns of anything older
//! from the unread counts when the user opens the app. Refusing new items instead would
//! keep a stale backlog and lose the messages people are waiting for.
//!
//! A failed attempt puts its batch back (same items, same ids: at least once) and waits
//! `retry_initial * 2^(failures-1)`, capped at `retry_max`, each pause drawn uniformly from
//! its upper half (jitter, so many relays do not retry in step); a `Retry-After` the app
//! server sends lengthens the pause up to `retry_max`. A 4xx other than 408 and 429 refuses
//! the batch for good: its items are dropped (`dropped_refused`) and logged.
//!
//! Owns: the queue and the retry schedule. Must not touch: sockets, clocks, channels.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::HandoffConfig;
use super::{Handoff, HandoffStats, wire};
use crate::rng::SplitMix64;
use crate::stats::inc;

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the app server has the batch.
    Accepted,
    /// 5xx, 408, 429, a timeout or a connection error: try again later, not before
    /// `retry_after` if the app server said so.
    Retry {
        /// The app server's `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// Any other 4xx: the app server will never take it.
    Refused,
}

/// What a push did to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// Queued, and the oldest queued item was dropped to make room.
    DroppedOldest,
    /// Not queued: every held item is in flight and the queue is full.
    DroppedNew,
}

/// A batch to POST.
#[derive(Debug)]
pub struct Batch {
    /// The JSON body ([`wire::encode`]).
    pub body: Vec<u8>,
    /// Items in it.
    pub items: usize,
}

struct Queued {
    item: Handoff,
    at: Instant,
}

/// The bounded queue and its retry schedule.
pub struct Outbox {
    queue: VecDeque<Queued>,
    /// The first `in_flight` items of `queue` are the batch being sent.
    in_flight: usize,
    failures: u32,
    not_before: Option<Instant>,
    batch_max: usize,
    batch_interval: Duration,
    queue_max: usize,
    retry_initial: Duration,
    retry_max: Duration,
    rng: SplitMix64,
    stats: Arc<HandoffStats>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("queued", &self.queue.len())
            .field("in_flight", &self.in_flight)
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// An empty queue under `config`, counting into `stats`; `seed` seeds the jitter.
    pub fn new(config: &HandoffConfig, stats: Arc<HandoffStats>, seed: u64) -> Self {
        Outbox {
            queue: VecDeque::new(),
            in_flight: 0,
            failures: 0,
            not_before: None,
            batch_max: config.batch_max.max(1),
            batch_interval: config.batch_interval,
            queue_max: config.queue_max.max(1),
            retry_initial: config.retry_initial,
            retry_max: config.retry_max,
            rng: SplitMix64::new(seed),
            stats,
        }
    }

    /// Items held: queued plus in flight.
    pub fn held(&self) -> usize {
        self.queue.len()
    }

    /// Takes an item from a worker at `now`.
    pub fn push(&mut self, now: Instant, item: Handoff) -> Pushed {
        inc(&self.stats.enqueued, 1);
        let mut pushed = Pushed::Queued;
        if self.queue.len() >= self.queue_max {
            if self.queue.len() > self.in_flight {
                self.queue.remove(self.in_flight);
                pushed = Pushed::DroppedOldest;
            } else {
                pushed = Pushed::DroppedNew;
            }
            inc(&self.stats.dropped_queue_full, 1);
        }
        if pushed != Pushed::DroppedNew {
            self.queue.push_back(Queued { item, at: now });
        }
        self.publish_gauge();
        pushed
    }

    /// When [`Outbox::poll_batch`] will next have something (`None`: not before a push or
    /// the answer to the batch in flight).
    pub fn deadline(&self) -> Option<Instant> {
        if self.in_flight > 0 {
            return None;
        }
        let oldest = self.queue.front()?;
        if let Some(at) = self.not_before {
            return Some(at);
        }
        if self.queue.len() >= self.batch_max {
            return Some(oldest.at);
        }
        Some(oldest.at + self.batch_interval)
    }

    /// The next batch to send at `now`, if one is due: `batch_max` items are queued, or
    /// the oldest has waited `batch_interval`, or a retry's pause is over. At most one
    /// batch is in flight.
    pub fn poll_batch(&mut self, now: Instant) -> Option<Batch> {
        if self.deadline().is_none_or(|at| at > now) {
            return None;
        }
        self.not_before = None;
        let n = self.queue.len().min(self.batch_max);
        self.in_flight = n;
        let body = wire::encode(self.queue.iter().take(n).map(|q| &q.item));
        Some(Batch { body, items: n })
    }

    /// The answer to the batch in flight, at `now`.
    pub fn on_answer(&mut self, now: Instant, outcome: Outcome) {
        let n = self.in_flight;
        self.in_flight = 0;
        if n == 0 {
            return;
        }
        match outcome {
            Outcome::Accepted => {
                if let Some(oldest) = self.queue.front() {
                    let waited = now.saturating_duration_since(oldest.at);
                    self.stats
                        .batch_latency_ms
                        .record(waited.as_millis() as u64, 1);
                }
                self.queue.drain(..n);
                self.failures = 0;
                inc(&self.stats.sent, n as u64);
                inc(&self.stats.batches, 1);
            }
            Outcome::Refused => {
                self.queue.drain(..n);
                self.failures = 0;
                inc(&self.stats.dropped_refused, n as u64);
            }
            Outcome::Retry { retry_after } => {
                self.failures = self.failures.saturating_add(1);
                let pause = self
                    .backoff()
                    .max(retry_after.unwrap_or_default().min(self.retry_max));
                self.not_before = Some(now + pause);
                inc(&self.stats.retried, 1);
            }
        }
        self.publish_gauge();
    }

    /// The pause after the current run of failures: uniform in the upper half of
    /// `retry_initial * 2^(failures-1)`, capped at `retry_max`.
    fn backoff(&mut self) -> Duration {
        let doublings = self.failures.saturating_sub(1).min(30);
        let ceiling = self
            .retry_initial
            .saturating_mul(1 << doublings)
            .min(self.retry_max);
        let half = ceiling / 2;
        let spread = (ceiling - half).as_micros() as u64;
        half + Duration::from_micros(self.rng.below(spread + 1))
    }

    fn publish_gauge(&self) {
        self.stats.queued.store(
            self.queue.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use super::*;
    use crate::ids::RoomName;
    use pabal_codec::Text;

    fn item(seq: u64) -> Handoff {
        Handoff {
            room: RoomName::new(false, Text::from_static("group:1")),
            epoch: 1,
            first_seq: seq,
            last_seq: seq,
            user: Text::from_static("bob"),
            publisher: Text::from_static("ann"),
            time_ms: seq,
        }
    }

    fn outbox(batch_max: usize, queue_max: usize) -> Outbox {
        let config = HandoffConfig {
            batch_max,
            queue_max,
            batch_interval: Duration::from_secs(1),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(8),
            ..HandoffConfig::default()
        };
        Outbox::new(&config, Arc::default(), 1)
    }

    fn seqs(batch: &Batch) -> Vec<u64> {
        let v: serde_json::Value = serde_json::from_slice(&batch.body).unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["first_seq"].as_u64().unwrap())
            .collect()
    }

    #[test]
    fn a_full_batch_goes_at_once_and_a_partial_one_after_the_interval() {
        let t0 = Instant::now();
        let mut o = outbox(3, 100);
        for s in 1..=4 {
            o.push(t0, item(s));
        }
        let b = o.poll_batch(t0).unwrap();
        assert_eq!(seqs(&b), [1, 2, 3]);
        assert!(o.poll_batch(t0).is_none(), "one batch in flight at a time");
        o.on_answer(t0, Outcome::Accepted);
        assert_eq!(o.deadline(), Some(t0 + Duration::from_secs(1)));
        assert!(o.poll_batch(t0 + Duration::from_millis(999)).is_none());
        let b = o.poll_batch(t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(seqs(&b), [4]);
        o.on_answer(t0, Outcome::Accepted);
        assert_eq!(o.held(), 0);
        assert_eq!(o.deadline(), None);
        let s = o.stats.snapshot();
        assert_eq!((s.sent, s.batches, s.queued), (4, 2, 0));
    }

    #[test]
    fn a_failed_batch_is_resent_whole_after_a_growing_jittered_pause() {
        let t0 = Instant::now();
        let mut o = outbox(2, 100);
        o.push(t0, item(1));
        o.push(t0, item(2));
        let first = o.poll_batch(t0).unwrap();
        let mut now = t0;
        let mut pauses = Vec::new();
        for _ in 0..6 {
            o.on_answer(now, Outcome::Retry { retry_after: None });
            let at = o.deadline().unwrap();
            pauses.push(at - now);
            assert!(o.poll_batch(at - Duration::from_micros(1)).is_none());
            now = at;
            let again = o.poll_batch(now).unwrap();
            assert_eq!(again.body, first.body, "same items, same ids");
        }
        // Ceilings 1, 2, 4, 8, 8, 8 s; each pause in the upper half of its ceiling.
        for (pause, ceiling) in pauses.iter().zip([1, 2, 4, 8, 8, 8]) {
            let ceiling = Duration::from_secs(ceiling);
            assert!(
                *pause >= ceiling / 2 && *pause <= ceiling,
                "{pause:?} {ceiling:?}"
            );
        }
        o.on_answer(
            now,
            Outcome::Retry {
                retry_after: Some(Duration::from_secs(60)),
            },
        );
        assert_eq!(o.deadline(), Some(now + Duration::from_secs(8)), "capped");
        assert_eq!(o.stats.snapshot().retried, 7);
        now += Duration::from_secs(8);
        o.poll_batch(now).unwrap();
        o.on_answer(now, Outcome::Refused);
        let s = o.stats.snapshot();
        assert_eq!((s.dropped_refused, s.sent, s.queued), (2, 0, 0));
    }

    #[test]
    fn a_full_queue_drops_its_oldest_queued_item_never_one_in_flight() {
        let t0 = Instant::now();
        let mut o = outbox(2, 3);
        for s in 1..=3 {
            assert_eq!(o.push(t0, item(s)), Pushed::Queued);
        }
        assert_eq!(seqs(&o.poll_batch(t0).unwrap()), [1, 2]);
        assert_eq!(o.push(t0, item(4)), Pushed::DroppedOldest, "3 goes");
        assert_eq!(o.push(t0, item(5)), Pushed::DroppedOldest, "4 goes");
        assert_eq!(o.held(), 3);
        o.on_answer(t0, Outcome::Retry { retry_after: None });
        // Between attempts nothing is in flight: the failed (oldest) items go first.
        assert_eq!(o.push(t0, item(6)), Pushed::DroppedOldest, "1 goes");
        let at = o.deadline().unwrap();
        assert_eq!(seqs(&o.poll_batch(at).unwrap()), [2, 5]);
        let s = o.stats.snapshot();
        assert_eq!((s.enqueued, s.dropped_queue_full, s.queued), (6, 3, 3));

        let mut o = outbox(2, 2);
        o.push(t0, item(1));
        o.push(t0, item(2));
        o.poll_batch(t0).unwrap();
        assert_eq!(
            o.push(t0, item(3)),
            Pushed::DroppedNew,
            "all held are in flight"
        );
        assert_eq!(o.held(), 2);
    }

    #[test]
    fn a_queued_item_stays_small() {
        // The bound relay.default.toml and README.md state ("about 160 bytes each").
        let size = std::mem::size_of::<Queued>();
        assert!(size <= 160, "{size}");
    }
}
