//! When this worker's publishes set a room's history to expire in Redis (`[cluster]`).
//!
//! A room's history in Redis (its stream, its window of repeat keys, its last removals)
//! is worth keeping only as long as the relay may still serve or need it: messages no
//! older than the room's `retention.max_age` (a read drops older ones), repeat keys no
//! older than `limits.publish_id_max_age` or `control.idempotency_max_age`. The longest
//! of the three is the room's *span*. A publish sets the history to expire
//! [`expiry_of`] its span after it, 5/4 of it; a room nobody publishes to any more then
//! gives its history's memory back to Redis, its meta hash (epoch, sequence) and members
//! kept: its next message takes the next sequence, and a read from before it gets an
//! exact GAP, as for what the stream's length dropped.
//!
//! Setting it costs Redis two calls, so a worker sets it on a room's publish only once
//! its last setting that Redis ran is a quarter of the span old (or unknown): every message
//! then lives at least its span (the last setting before it was at most a quarter old
//! and gave 5/4), and any later setting by any node only moves the expiry later, every
//! node of a cluster having the same retention. A setting counts once its publish is
//! answered (not when sent: a publish Redis did not run set nothing).
//!
//! Owns: the rooms' last settings on this worker, bounded by [`TRACKED_MAX`]. Must not
//! touch: the scripts (`cluster/script.rs`), the engine.

use std::collections::HashMap;
use std::time::Duration;

use crate::ids::RoomName;

/// Rooms whose last setting a worker remembers; past it, it forgets them all (each then
/// sets its expiry on its next publish again: two calls of Redis more, once a room).
pub(super) const TRACKED_MAX: usize = 65_536;

/// How long after a publish that sets it a room's history expires: 5/4 of `span`.
pub(super) fn expiry_of(span: Duration) -> Duration {
    span + span / 4
}

/// The last settings of this worker's rooms.
#[derive(Debug, Default)]
pub(super) struct HistoryExpiry {
    /// Room → when the publish that last set its expiry was taken (ms since the Unix
    /// epoch).
    set_at: HashMap<RoomName, u64>,
}

impl HistoryExpiry {
    /// The expiry (ms) a publish of `room` taken at `now_ms` sets, if its last setting is
    /// a quarter of `span` old or unknown; `None`: it leaves it.
    pub(super) fn due(&self, room: &RoomName, now_ms: u64, span: Duration) -> Option<u64> {
        let quarter = (span / 4).as_millis() as u64;
        match self.set_at.get(room) {
            Some(&at) if now_ms.saturating_sub(at) < quarter => None,
            _ => Some(expiry_of(span).as_millis() as u64),
        }
    }

    /// A publish of `room` taken at `at_ms` that set its expiry was answered: Redis ran it.
    pub(super) fn set(&mut self, room: &RoomName, at_ms: u64) {
        if self.set_at.len() >= TRACKED_MAX && !self.set_at.contains_key(room) {
            self.set_at.clear();
        }
        let last = self.set_at.entry(room.clone()).or_insert(at_ms);
        *last = (*last).max(at_ms);
    }

    /// Rooms remembered.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.set_at.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPAN: Duration = Duration::from_secs(4000);

    fn room(name: &str) -> RoomName {
        RoomName::new(false, pabal_codec::Text::from(name))
    }

    #[test]
    fn a_room_sets_its_expiry_again_once_its_last_setting_is_a_quarter_of_the_span_old() {
        let mut e = HistoryExpiry::default();
        let r = room("a");
        assert_eq!(
            e.due(&r, 10_000, SPAN),
            Some(5_000_000),
            "unknown: set, 5/4 of it"
        );
        // Sent but not answered yet: the next publish sets it too.
        assert_eq!(e.due(&r, 10_001, SPAN), Some(5_000_000));
        e.set(&r, 10_000);
        assert_eq!(e.due(&r, 10_001, SPAN), None);
        assert_eq!(e.due(&r, 10_000 + 999_999, SPAN), None);
        assert_eq!(e.due(&r, 10_000 + 1_000_000, SPAN), Some(5_000_000));
        // An answer of an older setting does not move it back.
        e.set(&r, 5_000);
        assert_eq!(e.due(&r, 10_000 + 999_999, SPAN), None);
    }

    /// Every message lives its span at least, whatever the times of the publishes: its
    /// history's expiry (the latest setting's) is never before the message's time plus
    /// the span.
    #[test]
    fn every_message_outlives_its_span() {
        let mut e = HistoryExpiry::default();
        let r = room("a");
        let mut expires_at = 0u64;
        let mut t = 0u64;
        for step in 0..2_000u64 {
            // Publishes 1 ms to 1,500 s apart (a quarter of the span is 1,000 s).
            t += 1 + (step * 7_919) % 1_500_000;
            if let Some(ms) = e.due(&r, t, SPAN) {
                expires_at = t + ms;
                e.set(&r, t);
            }
            assert!(expires_at >= t + SPAN.as_millis() as u64, "at {t}");
        }
    }

    #[test]
    fn past_its_bound_it_forgets_every_room() {
        let mut e = HistoryExpiry::default();
        for i in 0..TRACKED_MAX {
            e.set(&room(&format!("r{i}")), 1);
        }
        assert_eq!(e.len(), TRACKED_MAX);
        e.set(&room("r0"), 2);
        assert_eq!(e.len(), TRACKED_MAX, "a room remembered already");
        e.set(&room("one more"), 2);
        assert_eq!(e.len(), 1);
        assert_eq!(e.due(&room("r1"), 3, SPAN), Some(5_000_000));
    }
}
