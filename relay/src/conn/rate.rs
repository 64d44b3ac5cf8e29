//! The rate limits' token buckets: a connection's two ([`RateBuckets`]: publishes, and
//! SUBSCRIBE and UNSUBSCRIBE frames, levels only, on one [`Stamp`]) and a worker's own
//! ([`TokenBucket`]: accepts).
//!
//! Owns the refill and take arithmetic. Must not touch: the config (its rates come in as
//! [`BucketRates`] with each call) or the clock (times come in as arguments).

use std::time::Instant;

use super::Stamp;

/// Adds `elapsed_secs` worth of tokens at `rate` per second to `tokens`, up to `burst`,
/// then takes one if there is one: the new level and whether one was taken.
fn refill_and_take(tokens: f64, elapsed_secs: f64, rate: f64, burst: f64) -> (f64, bool) {
    let tokens = (tokens + elapsed_secs * rate).min(burst);
    if tokens >= 1.0 {
        (tokens - 1.0, true)
    } else {
        (tokens, false)
    }
}

/// A token bucket's rate and burst, as the config gives them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens per second.
    pub per_sec: f64,
    /// The most tokens held.
    pub burst: f64,
}

/// The limits of a connection's two buckets ([`RateBuckets`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketRates {
    /// Publishes (`limits.publish_rate`, `publish_burst`).
    pub publish: Rate,
    /// SUBSCRIBE and UNSUBSCRIBE frames (`limits.subscribe_rate`, `subscribe_burst`).
    pub subscribe: Rate,
}

impl From<&crate::config::LimitsConfig> for BucketRates {
    fn from(limits: &crate::config::LimitsConfig) -> Self {
        BucketRates {
            publish: Rate {
                per_sec: limits.publish_rate,
                burst: limits.publish_burst,
            },
            subscribe: Rate {
                per_sec: limits.subscribe_rate,
                burst: limits.subscribe_burst,
            },
        }
    }
}

/// Which of a connection's two buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// Publishes.
    Publish,
    /// SUBSCRIBE and UNSUBSCRIBE frames.
    Subscribe,
}

/// A connection's two token buckets' levels, without their rates and bursts: the caller
/// passes them ([`BucketRates`]) to each take. A connection's limits are the config's, the
/// same for every connection, so its record carries only the levels, an `f32` each, and
/// one [`Stamp`] for both: every take and settle refills both up to now, which gives each
/// the level it would have refilled on its own (a refill capped at the burst in two steps
/// is the one-step refill capped). 12 bytes for both; 16 with a stamp each, 48 with an
/// `f64` and an `Instant` each, 80 with the rates and bursts. A reload applies to every
/// connection at its next take. An `f32` holds a level exactly to a millionth of a token
/// for bursts up to 16; a burst so large that a token is below its precision (millions)
/// never runs dry, which is what such a burst means.
#[derive(Debug, Clone, Copy)]
pub struct RateBuckets {
    publish: f32,
    subscribe: f32,
    last: Stamp,
}

impl RateBuckets {
    /// Both buckets full.
    pub fn full(rates: BucketRates, now: Stamp) -> Self {
        RateBuckets {
            publish: rates.publish.burst as f32,
            subscribe: rates.subscribe.burst as f32,
            last: now,
        }
    }

    /// Takes one token from `bucket` if it has one, refilling both up to `now`.
    pub fn take(&mut self, bucket: Bucket, now: Stamp, rates: BucketRates) -> bool {
        self.settle(now, rates);
        let level = match bucket {
            Bucket::Publish => &mut self.publish,
            Bucket::Subscribe => &mut self.subscribe,
        };
        let taken = *level >= 1.0;
        if taken {
            *level -= 1.0;
        }
        taken
    }

    /// Refills both up to `now` without taking a token: keeps the stamp young (see
    /// [`Stamp`]) on a connection that sends nothing for weeks.
    pub fn settle(&mut self, now: Stamp, rates: BucketRates) {
        let elapsed = f64::from(now.since(self.last)) / 1000.0;
        self.last = now;
        for (level, rate) in [
            (&mut self.publish, rates.publish),
            (&mut self.subscribe, rates.subscribe),
        ] {
            *level = (f64::from(*level) + elapsed * rate.per_sec).min(rate.burst) as f32;
        }
    }
}

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            tokens: burst,
            last: now,
            rate,
            burst,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let taken;
        (self.tokens, taken) = refill_and_take(self.tokens, elapsed, self.rate, self.burst);
        taken
    }

    /// Changes the rate and burst (a reload), keeping the tokens already earned.
    pub fn reconfigure(&mut self, rate: f64, burst: f64) {
        self.rate = rate;
        self.burst = burst;
        self.tokens = self.tokens.min(burst);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use std::time::Duration;

    use super::*;

    fn rates(publish: (f64, f64), subscribe: (f64, f64)) -> BucketRates {
        let rate = |(per_sec, burst)| Rate { per_sec, burst };
        BucketRates {
            publish: rate(publish),
            subscribe: rate(subscribe),
        }
    }

    #[test]
    fn a_connections_tokens_follow_the_limits_passed_to_each_take() {
        let t0 = Stamp(u32::MAX - 5_000); // the worker's clock wraps in between
        let after = |d: Duration| Stamp(t0.0.wrapping_add(d.as_millis() as u32));
        let limits = |rate, burst| rates((rate, burst), (1.0, 1.0));
        let mut t = RateBuckets::full(limits(10.0, 3.0), t0);
        let mut take = |at, l| t.take(Bucket::Publish, at, l);
        assert!(take(t0, limits(10.0, 3.0)) && take(t0, limits(10.0, 3.0)));
        // A reload lowers the burst to 1: the one token left is all there is.
        assert!(take(t0, limits(10.0, 1.0)));
        assert!(!take(t0, limits(10.0, 1.0)));
        let later = after(Duration::from_secs(60));
        assert!(
            take(later, limits(10.0, 1.0)),
            "refilled up to the new burst"
        );
        assert!(!take(later, limits(10.0, 1.0)), "and no further");
        // A raised rate refills faster.
        assert!(!take(
            after(Duration::from_millis(60_005)),
            limits(100.0, 1.0)
        ));
        assert!(take(
            after(Duration::from_millis(60_012)),
            limits(100.0, 1.0)
        ));
        // Settling refills without taking: still empty until a token's worth of time.
        t.settle(after(Duration::from_millis(60_015)), limits(100.0, 1.0));
        let mut take = |at, l| t.take(Bucket::Publish, at, l);
        assert!(!take(
            after(Duration::from_millis(60_015)),
            limits(100.0, 1.0)
        ));
        assert!(take(
            after(Duration::from_millis(60_030)),
            limits(100.0, 1.0)
        ));
    }

    #[test]
    fn two_buckets_on_one_stamp_refill_as_if_each_had_its_own() {
        // Publishes: 10/s, burst 2; subscribes: 1/s, burst 3.
        let r = rates((10.0, 2.0), (1.0, 3.0));
        let t0 = Stamp(0);
        let at = |ms: u32| Stamp(ms);
        let mut both = RateBuckets::full(r, t0);
        // Each bucket alone, as two stamps kept them.
        let (mut publish, mut subscribe) = (RateBuckets::full(r, t0), RateBuckets::full(r, t0));
        let steps = [
            (Bucket::Subscribe, 0),
            (Bucket::Subscribe, 0),
            (Bucket::Subscribe, 0),
            (Bucket::Subscribe, 0), // empty
            (Bucket::Publish, 50),  // refills the subscribes' 0.05 too, takes nothing of it
            (Bucket::Publish, 60),
            (Bucket::Publish, 70), // empty: 0.2 of a token since 50
            (Bucket::Subscribe, 990),
            (Bucket::Subscribe, 1_000), // one token since 0, refilled in steps
            (Bucket::Publish, 1_000),
            (Bucket::Subscribe, 5_000), // capped at the burst of 3
            (Bucket::Subscribe, 5_000),
            (Bucket::Subscribe, 5_000),
            (Bucket::Subscribe, 5_000),
        ];
        let mut taken = Vec::new();
        for (bucket, ms) in steps {
            let alone = match bucket {
                Bucket::Publish => &mut publish,
                Bucket::Subscribe => &mut subscribe,
            };
            let expected = alone.take(bucket, at(ms), r);
            assert_eq!(
                both.take(bucket, at(ms), r),
                expected,
                "{bucket:?} at {ms} ms"
            );
            taken.push(expected);
        }
        assert_eq!(
            taken,
            [
                true, true, true, false, true, true, false, false, true, true, true, true, true,
                false
            ]
        );
    }

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 3.0, t0);
        assert!(b.take(t0) && b.take(t0) && b.take(t0));
        assert!(!b.take(t0), "burst spent");
        assert!(
            b.take(t0 + Duration::from_millis(100)),
            "one token per 100 ms"
        );
        assert!(!b.take(t0 + Duration::from_millis(150)));
        // Idle for long: never more than the burst.
        let later = t0 + Duration::from_secs(60);
        assert!(b.take(later) && b.take(later) && b.take(later));
        assert!(!b.take(later));
    }
}
