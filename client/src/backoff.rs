//! Reconnect delays: full-jitter exponential backoff (a delay drawn uniformly from zero to
//! `min(cap, base * 2^attempt)`), so a relay restart does not bring every phone back at
//! the same instant.
//!
//! Owns: the attempt count and the arithmetic. Must not touch: sockets or clocks (the
//! caller sleeps).

use std::time::Duration;

use rand::Rng;

/// Full-jitter exponential backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first ceiling.
    pub base: Duration,
    /// The largest ceiling.
    pub cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, doubling up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, drawn uniformly from zero to the ceiling; raises the ceiling.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ms = ceiling.as_millis().min(u128::from(u64::MAX)) as u64;
        Duration::from_millis(rng.random_range(0..=ms))
    }

    /// A connection worked: start again from `base`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn ceilings_double_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut rng = SmallRng::seed_from_u64(7);
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            ceilings.push(b.ceiling().as_millis());
            let d = b.next_delay(&mut rng);
            assert!(d <= Duration::from_secs(1));
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn delays_are_spread_not_fixed() {
        let mut rng = SmallRng::seed_from_u64(1);
        let delays: std::collections::HashSet<_> = (0..20)
            .map(|_| {
                Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next_delay(&mut rng)
            })
            .collect();
        assert!(
            delays.len() > 10,
            "full jitter draws different delays: {delays:?}"
        );
    }
}
