//! The link's radio: the state machine of one phone's radio (3G RRC's IDLE/FACH/DCH, LTE's
//! idle/connected with paging, or a generic two-state model) as a function of time, and
//! how it admits an offer (the promotion to wait for, the FACH rate for small 3G bursts).
//!
//! Owns [`Radio`]'s arithmetic only. Must not touch the lanes' schedules, the NAT or the
//! handovers ([`super`], [`super::mobility`]); like the whole model it never reads a clock.

use std::time::{Duration, Instant};

use super::{Direction, RadioModel, RadioState, millis};

/// The radio model turned into durations.
#[derive(Debug, Clone)]
pub(super) enum RadioParams {
    None,
    Umts {
        idle_to_dch: Duration,
        fach_to_dch: Duration,
        dch_tail: Duration,
        fach_tail: Duration,
        /// Indexed by [`Direction::index`].
        fach_threshold: [usize; 2],
        fach_kbps: u32,
    },
    TwoState {
        promotion: Duration,
        tail: Duration,
        /// Paging cycle and the first paging occasion, for downlink data in idle (LTE).
        paging: Option<(Duration, Instant)>,
    },
}

#[derive(Debug, Clone)]
pub(super) struct Radio {
    pub(super) params: RadioParams,
    /// 3G: whether the last activity was on DCH (else FACH). Unused by the other models.
    pub(super) high: bool,
    /// End of the last (scheduled) transmission in either direction.
    pub(super) last_active: Instant,
    /// End of the latest promotion.
    pub(super) ready_at: Instant,
}

/// How the radio lets an offer through.
#[derive(Debug, Clone, Copy)]
pub(super) struct Admission {
    /// No segment starts before this.
    pub(super) floor: Instant,
    /// Send at this (FACH) rate instead of the link's.
    pub(super) fach_kbps: Option<u32>,
    /// Whether the transfer keeps the radio in its high state (DCH, connected).
    pub(super) high: bool,
    pub(super) promoted: bool,
}

impl Radio {
    pub(super) fn new(model: &RadioModel, paging_seed: u64, now: Instant) -> Self {
        let ms = millis;
        let params = match model {
            RadioModel::None => RadioParams::None,
            RadioModel::UmtsRrc(u) => RadioParams::Umts {
                idle_to_dch: ms(u.idle_to_dch_ms),
                fach_to_dch: ms(u.fach_to_dch_ms),
                dch_tail: ms(u.dch_tail_ms),
                fach_tail: ms(u.fach_tail_ms),
                fach_threshold: [u.fach_up_threshold_bytes, u.fach_down_threshold_bytes],
                fach_kbps: u.fach_kbps.max(1),
            },
            RadioModel::Lte(l) => RadioParams::TwoState {
                promotion: ms(l.promotion_ms),
                tail: ms(l.tail_ms),
                paging: (l.paging_cycle_ms > 0).then(|| {
                    (
                        ms(l.paging_cycle_ms),
                        now + ms(paging_seed % l.paging_cycle_ms),
                    )
                }),
            },
            RadioModel::Generic(g) => RadioParams::TwoState {
                promotion: ms(g.promotion_ms),
                tail: ms(g.idle_after_ms),
                paging: None,
            },
        };
        Self {
            params,
            high: true,
            last_active: now,
            ready_at: now,
        }
    }

    pub(super) fn state_at(&self, t: Instant) -> RadioState {
        let since = t.saturating_duration_since(self.last_active);
        match &self.params {
            RadioParams::None => RadioState::AlwaysOn,
            _ if self.ready_at > t => RadioState::Promoting {
                ready_at: self.ready_at,
            },
            RadioParams::Umts {
                dch_tail,
                fach_tail,
                ..
            } => {
                let dch_left = if self.high { *dch_tail } else { Duration::ZERO };
                if since < dch_left {
                    RadioState::Dch
                } else if since < dch_left + *fach_tail {
                    RadioState::Fach
                } else {
                    RadioState::Idle
                }
            }
            RadioParams::TwoState { tail, .. } => {
                if since < *tail {
                    RadioState::Connected
                } else {
                    RadioState::Idle
                }
            }
        }
    }

    /// Decides how a burst of `burst` bytes offered to `dir` at `now` gets through, starting
    /// a promotion if it needs one.
    pub(super) fn admit(&mut self, dir: Direction, now: Instant, burst: usize) -> Admission {
        let pass = |floor: Instant| Admission {
            floor,
            fach_kbps: None,
            high: true,
            promoted: false,
        };
        match self.state_at(now) {
            RadioState::AlwaysOn | RadioState::Dch | RadioState::Connected => pass(now),
            RadioState::Promoting { ready_at } => pass(ready_at),
            RadioState::Fach => match &self.params {
                RadioParams::Umts {
                    fach_to_dch,
                    fach_threshold,
                    fach_kbps,
                    ..
                } => {
                    if burst <= fach_threshold[dir.index()] {
                        Admission {
                            floor: now,
                            fach_kbps: Some(*fach_kbps),
                            high: false,
                            promoted: false,
                        }
                    } else {
                        self.ready_at = now + *fach_to_dch;
                        Admission {
                            promoted: true,
                            ..pass(self.ready_at)
                        }
                    }
                }
                _ => pass(now),
            },
            RadioState::Idle => {
                let (start, promotion) = match &self.params {
                    RadioParams::Umts { idle_to_dch, .. } => (now, *idle_to_dch),
                    RadioParams::TwoState {
                        promotion, paging, ..
                    } => {
                        let start = match (dir, paging) {
                            (Direction::Down, Some((cycle, first))) => {
                                next_occasion(now, *first, *cycle)
                            }
                            _ => now,
                        };
                        (start, *promotion)
                    }
                    RadioParams::None => (now, Duration::ZERO),
                };
                self.ready_at = start + promotion;
                Admission {
                    promoted: true,
                    ..pass(self.ready_at)
                }
            }
        }
    }

    /// Records a transfer that keeps the radio busy until `until`.
    pub(super) fn note_active(&mut self, until: Instant, high: bool) {
        self.last_active = self.last_active.max(until);
        // A FACH admission only happens when no DCH activity is pending, so it may lower it.
        self.high = high;
    }
}

/// The first instant `first + k * cycle` (k >= 0) at or after `now`.
pub(super) fn next_occasion(now: Instant, first: Instant, cycle: Duration) -> Instant {
    if now <= first || cycle.is_zero() {
        return first.max(now);
    }
    let since = (now - first).as_nanos();
    let cycle_ns = cycle.as_nanos();
    let k = since.div_ceil(cycle_ns);
    let offset = u64::try_from(k * cycle_ns).unwrap_or(u64::MAX);
    first + Duration::from_nanos(offset)
}
