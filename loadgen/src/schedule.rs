//! A sender's open-loop schedule, and the random draws of timing the phones share.
//!
//! Owns: when each message is meant to be sent (Poisson or uniform arrivals, quiet periods,
//! the end of publishing), scenario drop times and backoff draws. Must not touch: sockets,
//! the link, the ledger. The intended send times it yields are what latency is measured
//! from (open loop: whatever the relay answers, the schedule goes on).

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::link::splitmix64;
use crate::plan::{QuietPlan, SendPlan};
use crate::scenario::Arrivals;

#[derive(Debug, Clone, Copy)]
struct Quiet {
    plan: QuietPlan,
    from: Instant,
    to: Instant,
}

/// A sender's open-loop schedule: the instants messages are meant to be sent, whatever the
/// relay does.
#[derive(Debug, Clone)]
pub struct Schedule {
    next: Option<Instant>,
    per_sec: f64,
    arrivals: Arrivals,
    remaining: Option<u64>,
    end: Instant,
    quiet: Option<Quiet>,
}

impl Schedule {
    /// The schedule of `plan` starting at `at` and ending at `end`.
    pub fn new(plan: &SendPlan, at: Instant, end: Instant, rng: &mut SmallRng) -> Schedule {
        let per_sec = plan.per_min / 60.0;
        let quiet = plan.quiet.map(|q| {
            let from = at + secs(rng.random::<f64>() * q.active_s[1]);
            Quiet {
                plan: q,
                from,
                to: from + secs(uniform(rng, q.quiet_s)),
            }
        });
        let mut s = Schedule {
            next: None,
            per_sec,
            arrivals: plan.arrivals,
            remaining: plan.max_count,
            end,
            quiet,
        };
        if per_sec > 0.0 && s.remaining != Some(0) {
            let first = match plan.arrivals {
                Arrivals::Poisson => at + s.gap(rng),
                Arrivals::Uniform => at + secs(rng.random::<f64>() / per_sec),
            };
            s.next = Some(first);
            s.place(rng);
        }
        s
    }

    fn gap(&self, rng: &mut SmallRng) -> Duration {
        gap(self.arrivals, self.per_sec, rng)
    }

    /// Moves `next` out of quiet periods and past the end.
    fn place(&mut self, rng: &mut SmallRng) {
        let Some(mut t) = self.next else { return };
        let (arrivals, per_sec) = (self.arrivals, self.per_sec);
        if let Some(q) = &mut self.quiet {
            loop {
                if t >= q.to {
                    q.from = q.to + secs(uniform(rng, q.plan.active_s));
                    q.to = q.from + secs(uniform(rng, q.plan.quiet_s));
                    continue;
                }
                if t >= q.from {
                    // Quiet: the phone does not write. Memoryless arrivals resume after it.
                    t = q.to + gap(arrivals, per_sec, rng);
                    continue;
                }
                break;
            }
        }
        self.next = (t < self.end).then_some(t);
    }

    /// When the next message is due.
    pub fn next(&self) -> Option<Instant> {
        self.next
    }

    /// Moves on to the message after the one due now.
    pub fn advance(&mut self, rng: &mut SmallRng) {
        if let Some(r) = &mut self.remaining {
            *r = r.saturating_sub(1);
            if *r == 0 {
                self.next = None;
                return;
            }
        }
        if let Some(t) = self.next {
            self.next = Some(t + self.gap(rng));
            self.place(rng);
        }
    }
}

fn gap(arrivals: Arrivals, per_sec: f64, rng: &mut SmallRng) -> Duration {
    match arrivals {
        Arrivals::Poisson => secs(-(1.0 - rng.random::<f64>()).ln() / per_sec),
        Arrivals::Uniform => secs(1.0 / per_sec),
    }
}

pub(crate) fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::from_secs(86_400 * 365))
}

fn uniform(rng: &mut SmallRng, range: [f64; 2]) -> f64 {
    range[0] + rng.random::<f64>() * (range[1] - range[0])
}

pub(crate) fn uniform_ms(rng: &mut SmallRng, range: [u64; 2]) -> Duration {
    Duration::from_millis(if range[1] > range[0] {
        rng.random_range(range[0]..=range[1])
    } else {
        range[0]
    })
}

/// Time to the next scenario drop of one phone, if drops are on.
pub(crate) fn drop_after(rng: &mut SmallRng, per_hour: f64) -> Option<Duration> {
    (per_hour > 0.0).then(|| secs(-(1.0 - rng.random::<f64>()).ln() * 3600.0 / per_hour))
}

/// A schedule for a publisher that does not connect (it publishes through the API).
pub fn api_schedule(plan: &SendPlan, seed: u64, at: Instant, end: Instant) -> (Schedule, SmallRng) {
    let mut rng = SmallRng::seed_from_u64(splitmix64(seed ^ 0x6170_6900));
    (Schedule::new(plan, at, end, &mut rng), rng)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn plan(per_min: f64, arrivals: Arrivals, quiet: Option<QuietPlan>) -> SendPlan {
        SendPlan {
            arrivals,
            quiet,
            ..SendPlan::to_rooms(&[0], per_min, 20)
        }
    }

    fn count(s: &mut Schedule, rng: &mut SmallRng) -> (usize, Vec<Instant>) {
        let mut times = Vec::new();
        while let Some(t) = s.next() {
            times.push(t);
            s.advance(rng);
        }
        (times.len(), times)
    }

    #[test]
    fn poisson_schedules_keep_their_rate_and_end() {
        let mut rng = SmallRng::seed_from_u64(1);
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs(10_000);
        let mut s = Schedule::new(&plan(60.0, Arrivals::Poisson, None), t0, end, &mut rng);
        let (n, times) = count(&mut s, &mut rng);
        assert!((9_500..10_500).contains(&n), "{n}");
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        assert!(times.iter().all(|&t| t >= t0 && t < end));
    }

    #[test]
    fn uniform_schedules_are_evenly_spaced_and_counted() {
        let mut rng = SmallRng::seed_from_u64(2);
        let t0 = Instant::now();
        let mut p = plan(600.0, Arrivals::Uniform, None);
        p.max_count = Some(5);
        let mut s = Schedule::new(&p, t0, t0 + Duration::from_secs(60), &mut rng);
        let (n, times) = count(&mut s, &mut rng);
        assert_eq!(n, 5);
        for w in times.windows(2) {
            assert_eq!(w[1] - w[0], Duration::from_millis(100));
        }
    }

    #[test]
    fn quiet_periods_silence_the_sender() {
        let mut rng = SmallRng::seed_from_u64(3);
        let t0 = Instant::now();
        let quiet = QuietPlan {
            quiet_s: [10.0, 10.0],
            active_s: [10.0, 10.0],
        };
        let mut s = Schedule::new(
            &plan(600.0, Arrivals::Poisson, Some(quiet)),
            t0,
            t0 + Duration::from_secs(1000),
            &mut rng,
        );
        let (n, _) = count(&mut s, &mut rng);
        // Half the time quiet: about half of 10,000.
        assert!((4_000..6_000).contains(&n), "{n}");
    }
}
