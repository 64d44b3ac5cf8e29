//! When this worker's publishes set a room's history to expire in Redis (`[cluster]`,
//! `cluster.expire_history`).
//!
//! A room's history in Redis (its stream, its window of repeat keys, its last removals)
//! is worth keeping only as long as the relay may still serve or need it: messages no
//! older than the room's `retention.max_age` (a read drops older ones), repeat keys no
//! older than `limits.publish_id_max_age` or `control.idempotency_max_age`. The longest
//! of the three is the room's *span*. A publish sets the history to expire
//! [`expiry_ms`] after it, 3/2 of its span; a room nobody publishes to any more then
//! gives its history's memory back to Redis, its meta hash (epoch, sequence) and members
//! kept: its next message takes the next sequence, and a read from before it gets an
//! exact GAP, as for what the stream's length dropped.
//!
//! Setting it costs Redis two calls, so a worker sets it on a room's publish only once
//! its last setting that Redis ran is a quarter of the span old (or unknown): every message
//! then lives at least 5/4 of its span (the last setting before it was at most a quarter
//! old and gave 3/2), a quarter of margin for the clocks, and any later setting by any
//! node only moves the expiry later, every node of a cluster having the same retention. A
//! setting counts once its publish is answered (not when sent: a publish Redis did not
//! run set nothing). The script sets the window's expiry only if the window exists then:
//! a publish with a repeat key (which makes the window) sets it again if the last setting
//! came with none, so a window made after it is not kept for good.
//!
//! Owns: the rooms' last settings on this worker, bounded by [`TRACKED_MAX`]. Must not
//! touch: the scripts (`cluster/script.rs`), the engine.

use std::collections::HashMap;
use std::time::Duration;

use crate::ids::RoomName;

/// Rooms whose last setting a worker remembers; past it, it forgets them all (each then
/// sets its expiry on its next publish again: two calls of Redis more, once a room).
pub(super) const TRACKED_MAX: usize = 65_536;

/// The shortest expiry set (a span shorter than a second, as a test may configure, still
/// keeps the history that long).
const EXPIRY_MIN: Duration = Duration::from_secs(1);

/// Past this expiry, none is set: the history is kept for good (Redis refuses an expiry
/// whose deadline overflows its clock, after the message was stored and published).
const EXPIRY_MAX: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// How long (ms) after a publish that sets it a room's history expires: 3/2 of `span`, at
/// least [`EXPIRY_MIN`]; `None` past [`EXPIRY_MAX`] (kept for good).
pub(super) fn expiry_ms(span: Duration) -> Option<u64> {
    let expiry = span.saturating_add(span / 2).max(EXPIRY_MIN);
    (expiry <= EXPIRY_MAX).then_some(expiry.as_millis() as u64)
}

/// A room's last setting this worker made.
#[derive(Debug, Clone, Copy)]
struct Setting {
    /// When the publish that set it was taken (ms since the Unix epoch).
    at_ms: u64,
    /// It came with a repeat key: the window existed, and got its expiry too.
    window: bool,
}

/// The last settings of this worker's rooms.
#[derive(Debug, Default)]
pub(super) struct HistoryExpiry {
    set_at: HashMap<RoomName, Setting>,
}

impl HistoryExpiry {
    /// The expiry (ms) a publish of `room` taken at `now_ms` (`keyed`: with a repeat key)
    /// sets, if its last setting is a quarter of `span` old, unknown, or came with no
    /// window while this one makes it; `None`: it leaves it.
    pub(super) fn due(
        &self,
        room: &RoomName,
        now_ms: u64,
        span: Duration,
        keyed: bool,
    ) -> Option<u64> {
        let quarter = (span / 4).as_millis() as u64;
        match self.set_at.get(room) {
            Some(last)
                if now_ms.saturating_sub(last.at_ms) < quarter && (last.window || !keyed) =>
            {
                None
            }
            _ => expiry_ms(span),
        }
    }

    /// A publish of `room` taken at `at_ms` (`keyed`: with a repeat key) that set its
    /// expiry was answered: Redis ran it.
    pub(super) fn set(&mut self, room: &RoomName, at_ms: u64, keyed: bool) {
        if self.set_at.len() >= TRACKED_MAX && !self.set_at.contains_key(room) {
            self.set_at.clear();
        }
        let last = self.set_at.entry(room.clone()).or_insert(Setting {
            at_ms,
            window: keyed,
        });
        if at_ms >= last.at_ms {
            // The newest setting says whether the window had one then.
            *last = Setting {
                at_ms,
                window: keyed || last.window,
            };
        }
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
        let due = |e: &HistoryExpiry, at| e.due(&r, at, SPAN, false);
        assert_eq!(due(&e, 10_000), Some(6_000_000), "unknown: 3/2 of it");
        // Sent but not answered yet: the next publish sets it too.
        assert_eq!(due(&e, 10_001), Some(6_000_000));
        e.set(&r, 10_000, false);
        assert_eq!(due(&e, 10_001), None);
        assert_eq!(due(&e, 10_000 + 999_999), None);
        assert_eq!(due(&e, 10_000 + 1_000_000), Some(6_000_000));
        // An answer of an older setting does not move it back.
        e.set(&r, 5_000, false);
        assert_eq!(due(&e, 10_000 + 999_999), None);
    }

    /// A setting that came with no repeat key may have found no window: the first keyed
    /// publish after it (which makes the window) sets it again. Found by review: a window
    /// made after the last setting was kept for good.
    #[test]
    fn a_keyed_publish_after_a_setting_without_a_window_sets_it_again() {
        let mut e = HistoryExpiry::default();
        let r = room("a");
        e.set(&r, 10_000, false);
        assert_eq!(e.due(&r, 10_001, SPAN, false), None);
        assert_eq!(e.due(&r, 10_001, SPAN, true), Some(6_000_000));
        e.set(&r, 10_001, true);
        assert_eq!(e.due(&r, 10_002, SPAN, true), None);
        // A later setting without a key keeps what the window got.
        e.set(&r, 10_003, false);
        assert_eq!(e.due(&r, 10_004, SPAN, true), None);
    }

    /// Ages past what Redis can count set no expiry, and a span under a second a second's.
    /// Found by review: a huge retention panicked, or made every publish fail in Redis.
    #[test]
    fn extreme_spans_are_clamped() {
        assert_eq!(expiry_ms(Duration::MAX), None);
        assert_eq!(expiry_ms(Duration::from_secs(200 * 365 * 24 * 3600)), None);
        assert_eq!(expiry_ms(Duration::ZERO), Some(1_000));
        assert_eq!(expiry_ms(Duration::from_millis(1)), Some(1_000));
        let e = HistoryExpiry::default();
        assert_eq!(e.due(&room("a"), 1, Duration::MAX, true), None);
    }

    /// Every message lives 5/4 of its span at least, whatever the times of the publishes:
    /// its history's expiry (the latest setting's) is never before the message's time
    /// plus that.
    #[test]
    fn every_message_outlives_its_span() {
        let mut e = HistoryExpiry::default();
        let r = room("a");
        let mut expires_at = 0u64;
        let mut t = 0u64;
        for step in 0..2_000u64 {
            // Publishes 1 ms to 1,500 s apart (a quarter of the span is 1,000 s).
            t += 1 + (step * 7_919) % 1_500_000;
            if let Some(ms) = e.due(&r, t, SPAN, false) {
                expires_at = t + ms;
                e.set(&r, t, false);
            }
            assert!(expires_at >= t + SPAN.as_millis() as u64 * 5 / 4, "at {t}");
        }
    }

    #[test]
    fn past_its_bound_it_forgets_every_room() {
        let mut e = HistoryExpiry::default();
        for i in 0..TRACKED_MAX {
            e.set(&room(&format!("r{i}")), 1, false);
        }
        assert_eq!(e.len(), TRACKED_MAX);
        e.set(&room("r0"), 2, false);
        assert_eq!(e.len(), TRACKED_MAX, "a room remembered already");
        e.set(&room("one more"), 2, false);
        assert_eq!(e.len(), 1);
        assert_eq!(e.due(&room("r1"), 3, SPAN, false), Some(6_000_000));
    }
}
