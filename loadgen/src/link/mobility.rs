//! The link's handover schedule: when each handover stalls both directions and which one
//! drops the connection, drawn per handover from the seed alone (never from traffic), so it
//! can be looked ahead without mutation.
//!
//! Owns [`Mobility`]'s arithmetic only. Must not touch the lanes, the radio or the NAT
//! ([`super`], [`super::radio`]); like the whole model it never reads a clock.

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::Exp1;

use super::{HandoverModel, MAX_SECS, millis, splitmix64};

/// The handover schedule. Handover `k` is drawn from its own RNG seeded by `(seed, k)`, so the
/// schedule depends on the seed alone, never on traffic, and can be looked ahead without
/// mutation. The next handover and the next dropping one are cached, so the queries the event
/// loop makes on every wake-up cost no draws.
#[derive(Debug, Clone)]
pub(super) struct Mobility {
    pub(super) seed: u64,
    pub(super) mean_interval_s: f64,
    pub(super) stall_min: Duration,
    pub(super) stall_span: Duration,
    pub(super) drop_probability: f64,
    /// Index of `head`.
    pub(super) head_k: u64,
    /// The first handover not known to be over.
    pub(super) head: Handover,
    /// The start of the first dropping handover already passed.
    pub(super) first_drop: Option<Instant>,
    /// The first dropping handover among the `DROP_LOOKAHEAD` from `head` on, if any.
    pub(super) next_drop: Option<Instant>,
    /// The start of the last handover that lookahead examined.
    pub(super) horizon: Instant,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Handover {
    pub(super) start: Instant,
    pub(super) end: Instant,
    pub(super) drops: bool,
}

/// How many handovers ahead the next drop is looked for.
pub(super) const DROP_LOOKAHEAD: usize = 64;

impl Mobility {
    pub(super) fn new(h: &HandoverModel, seed: u64, now: Instant) -> Self {
        let (lo, hi) = (
            h.stall_min_ms.min(h.stall_max_ms),
            h.stall_min_ms.max(h.stall_max_ms),
        );
        let drop_probability = if h.drop_probability.is_finite() {
            h.drop_probability.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let mut m = Self {
            seed,
            mean_interval_s: h.mean_interval_s.clamp(1, MAX_SECS) as f64,
            stall_min: millis(lo),
            stall_span: millis(hi) - millis(lo),
            drop_probability,
            head_k: 0,
            head: Handover {
                start: now,
                end: now,
                drops: false,
            },
            first_drop: None,
            next_drop: None,
            horizon: now,
        };
        m.head = m.handover(0, now);
        m.look_ahead();
        m
    }

    /// Handover `k`, the one after a handover (or creation) at `base`.
    pub(super) fn handover(&self, k: u64, base: Instant) -> Handover {
        let mut rng = SmallRng::seed_from_u64(splitmix64(self.seed.wrapping_add(k)));
        let gap: f64 = rng.sample(Exp1);
        let stall_draw: f64 = rng.random();
        let drop_draw: f64 = rng.random();
        // Exp1 from 53 random bits stays below ~40, so the product is far from overflow.
        let start = base + Duration::from_secs_f64(gap * self.mean_interval_s);
        let stall = self.stall_min + self.stall_span.mul_f64(stall_draw);
        Handover {
            start,
            end: start + stall,
            drops: drop_draw < self.drop_probability,
        }
    }

    /// Handovers from `head` on, in order of start.
    pub(super) fn upcoming(&self) -> impl Iterator<Item = Handover> + '_ {
        let mut k = self.head_k;
        let mut next = Some(self.head);
        std::iter::from_fn(move || {
            let h = next?;
            k += 1;
            next = Some(self.handover(k, h.start));
            Some(h)
        })
    }

    pub(super) fn look_ahead(&mut self) {
        self.next_drop = None;
        self.horizon = self.head.start;
        if self.first_drop.is_some() || self.drop_probability <= 0.0 {
            return;
        }
        let mut horizon = self.head.start;
        let mut next_drop = None;
        for h in self.upcoming().take(DROP_LOOKAHEAD) {
            horizon = h.start;
            if h.drops {
                next_drop = Some(h.start);
                break;
            }
        }
        self.horizon = horizon;
        self.next_drop = next_drop;
    }

    /// Forgets handovers over by `now`, remembering the first drop among them.
    pub(super) fn advance(&mut self, now: Instant) {
        let mut moved = false;
        while self.head.end <= now {
            if self.head.drops && self.first_drop.is_none() {
                self.first_drop = Some(self.head.start);
            }
            self.head_k += 1;
            self.head = self.handover(self.head_k, self.head.start);
            moved = true;
        }
        if moved {
            self.look_ahead();
        }
    }

    /// The start of the first dropping handover at or before `now`.
    pub(super) fn drop_at(&self, now: Instant) -> Option<Instant> {
        if let Some(at) = self.first_drop {
            return (at <= now).then_some(at);
        }
        if self.drop_probability <= 0.0 {
            return None;
        }
        match self.next_drop {
            Some(at) => (at <= now).then_some(at),
            None if now < self.horizon => None,
            // Asked about a time past the lookahead without advancing: walk there.
            None => self
                .upcoming()
                .take_while(|h| h.start <= now)
                .find(|h| h.drops)
                .map(|h| h.start),
        }
    }

    /// The start of the next dropping handover after `now` or, when none is within the
    /// lookahead, the last handover examined (a spurious wake-up).
    pub(super) fn next_drop_after(&self, now: Instant) -> Option<Instant> {
        if self.first_drop.is_some() || self.drop_probability <= 0.0 {
            return None;
        }
        match self.next_drop {
            Some(at) if at > now => Some(at),
            None if self.horizon > now => Some(self.horizon),
            // Asked about a time past the lookahead without advancing: look from there.
            _ => {
                let mut last = None;
                for h in self
                    .upcoming()
                    .filter(|h| h.start > now)
                    .take(DROP_LOOKAHEAD)
                {
                    last = Some(h.start);
                    if h.drops {
                        break;
                    }
                }
                last
            }
        }
    }

    /// The earliest start at or after `start` of an interval `len` long (an instant when
    /// `len` is zero) that no handover stall overlaps.
    pub(super) fn clear_of(&self, mut start: Instant, len: Duration) -> Instant {
        for h in self.upcoming() {
            if h.end <= start {
                continue;
            }
            let overlaps = h.start <= start || h.start < start + len;
            if overlaps {
                start = h.end;
            } else {
                break;
            }
        }
        start
    }
}
