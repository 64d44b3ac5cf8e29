//! Detection, sans-IO: which members of a room have not received its messages in time.
//!
//! A room's owner does not keep a timer per message per member. It keeps, per room, a
//! short queue of **windows**: a window opens with a message accepted while none is open
//! and takes every message accepted in the room for the next `delay`; it is due `delay`
//! after its last message (so every message in it has had its full delay), at most
//! `2 x delay` after it opened. When it is due, the owner compares each member's
//! delivered marker with the window's last sequence: a member who has not acknowledged
//! it gets **one** hand-off for the window's messages past the member's marker (and past
//! the member's join point). A room therefore holds at most three windows at a time
//! (`delay` of joining plus `delay` of waiting), whatever its traffic, and a member
//! offline through a long conversation gets one hand-off per `delay`, not one per
//! message.
//!
//! A hand-off never ends with the member's own message: a window remembers its last message
//! and the last one by somebody else, and a member who published the last one is handed
//! off up to the other (or not at all). Its range is what the member has not acknowledged
//! (after the join point), so it may begin with messages of the member's own.
//!
//! Owns: the windows and when they are due. Must not touch: markers, membership, clocks
//! (time is an argument; the core applies the rest).

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::ids::RoomName;
use crate::sender_name::SenderName;

/// One message as a window remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Noted {
    /// Its sequence.
    pub seq: u64,
    /// When it was accepted, ms since the Unix epoch.
    pub ts_ms: u64,
    /// Who published it (the message's own sender, shared).
    pub publisher: SenderName,
}

/// Messages of one room accepted within `delay` of each other's window opening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// The room's epoch when it opened (a window of an earlier epoch is dropped).
    pub epoch: u64,
    /// The first sequence in it.
    pub first_seq: u64,
    /// Its last message.
    pub last: Noted,
    /// The last message in it by someone other than `last.publisher`, if any.
    pub other: Option<Noted>,
    opened: Instant,
    last_at: Instant,
    delay: Duration,
}

impl Window {
    /// When every message in it has waited its delay.
    pub fn due(&self) -> Instant {
        self.last_at + self.delay
    }

    /// The hand-off `member` gets: `(first_seq, the last message)`, given everything up to
    /// `done` reached the member (the larger of the delivered marker and the join point).
    /// `None` when nothing in the window is owed to the member.
    pub fn owed(&self, member: &str, done: u64) -> Option<(u64, &Noted)> {
        let last = if self.last.publisher.as_str() == member {
            self.other.as_ref()?
        } else {
            &self.last
        };
        let first = self.first_seq.max(done.saturating_add(1));
        (first <= last.seq).then_some((first, last))
    }
}

/// The windows of one room, oldest first.
#[derive(Debug, Default)]
pub struct RoomWindows {
    windows: VecDeque<Window>,
    /// The due time of the one scheduler entry that stands for this room, if any.
    scheduled: Option<Instant>,
}

impl RoomWindows {
    /// Notes `message`, accepted at `now` in `epoch`; `delay` gives the room's delay if a
    /// window opens. Returns the time to schedule the room at, if it has no entry in the
    /// scheduler yet.
    pub fn note(
        &mut self,
        now: Instant,
        epoch: u64,
        message: Noted,
        delay: impl FnOnce() -> Duration,
    ) -> Option<Instant> {
        match self.windows.back_mut() {
            Some(w) if w.epoch == epoch && now < w.opened + w.delay => {
                if w.last.publisher != message.publisher {
                    w.other = Some(std::mem::replace(&mut w.last, message));
                } else {
                    w.last = message;
                }
                w.last_at = now;
            }
            _ => self.windows.push_back(Window {
                epoch,
                first_seq: message.seq,
                last: message,
                other: None,
                opened: now,
                last_at: now,
                delay: delay(),
            }),
        }
        self.schedule()
    }

    /// Whether a scheduler entry due at `at` is this room's current one (others are stale:
    /// the room was rescheduled since). Consumes it.
    pub fn claim(&mut self, at: Instant) -> bool {
        if self.scheduled == Some(at) {
            self.scheduled = None;
            true
        } else {
            false
        }
    }

    /// The oldest window, if it is due at `now`.
    pub fn take_due(&mut self, now: Instant) -> Option<Window> {
        if self.windows.front()?.due() <= now {
            self.windows.pop_front()
        } else {
            None
        }
    }

    /// The time to schedule the room at next, if it needs an entry (it has windows and no
    /// entry stands for it).
    pub fn schedule(&mut self) -> Option<Instant> {
        if self.scheduled.is_some() {
            return None;
        }
        let due = self.windows.front()?.due();
        self.scheduled = Some(due);
        Some(due)
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Windows pending.
    pub fn len(&self) -> usize {
        self.windows.len()
    }
}

/// A scheduler entry: `room` has a window due at `at`. Ordered by time alone (earliest
/// first in a max-heap).
#[derive(Debug, Clone)]
pub struct Due {
    /// When.
    pub at: Instant,
    /// The room.
    pub room: RoomName,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> Ordering {
        other.at.cmp(&self.at)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use pabal_codec::Text;

    use super::*;

    const DELAY: Duration = Duration::from_secs(10);

    fn noted(seq: u64, publisher: &'static str) -> Noted {
        Noted {
            seq,
            ts_ms: seq * 1000,
            publisher: Text::from_static(publisher).into(),
        }
    }

    #[test]
    fn messages_within_the_delay_share_a_window_due_after_the_last() {
        let t0 = Instant::now();
        let mut r = RoomWindows::default();
        assert_eq!(r.note(t0, 1, noted(1, "ann"), || DELAY), Some(t0 + DELAY));
        let s = Duration::from_secs(1);
        assert_eq!(r.note(t0 + 4 * s, 1, noted(2, "ann"), || DELAY), None);
        assert_eq!(r.note(t0 + 9 * s, 1, noted(3, "bob"), || DELAY), None);
        // The delay after the window opened: a new window.
        assert_eq!(r.note(t0 + 10 * s, 1, noted(4, "ann"), || DELAY), None);
        assert_eq!(r.len(), 2);
        // The standing entry (t0 + 10 s) comes early: claimed, nothing due yet.
        assert!(r.claim(t0 + DELAY));
        assert!(!r.claim(t0 + DELAY), "claimed once");
        assert!(r.take_due(t0 + DELAY).is_none());
        assert_eq!(r.schedule(), Some(t0 + 19 * s));
        let w = r.take_due(t0 + 19 * s).unwrap();
        assert_eq!((w.first_seq, w.last.seq), (1, 3));
        assert_eq!(w.other, Some(noted(2, "ann")));
        assert!(r.take_due(t0 + 19 * s).is_none());
        assert!(r.claim(t0 + 19 * s));
        assert_eq!(r.schedule(), Some(t0 + 20 * s));
        let w = r.take_due(t0 + 20 * s).unwrap();
        assert_eq!((w.first_seq, w.last.seq), (4, 4));
        assert!(r.is_empty());
    }

    #[test]
    fn a_new_epoch_opens_a_new_window() {
        let t0 = Instant::now();
        let mut r = RoomWindows::default();
        r.note(t0, 1, noted(5, "ann"), || DELAY);
        r.note(t0, 2, noted(1, "ann"), || DELAY);
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn a_member_is_owed_what_is_past_their_marker_and_not_their_own() {
        let t0 = Instant::now();
        let mut r = RoomWindows::default();
        r.note(t0, 1, noted(3, "ann"), || DELAY);
        r.note(t0, 1, noted(4, "bob"), || DELAY);
        r.note(t0, 1, noted(5, "bob"), || DELAY);
        let w = r.take_due(t0 + DELAY).unwrap();
        let owed = |who: &'static str, done: u64| {
            w.owed(Text::from_static(who).as_str(), done)
                .map(|(first, last)| (first, last.seq, last.publisher.to_string()))
        };
        assert_eq!(owed("cy", 0), Some((3, 5, "bob".into())));
        assert_eq!(owed("cy", 3), Some((4, 5, "bob".into())), "past the marker");
        assert_eq!(owed("cy", 5), None, "all delivered");
        assert_eq!(owed("bob", 0), Some((3, 3, "ann".into())), "not bob's own");
        assert_eq!(owed("bob", 3), None);
        assert_eq!(owed("ann", 0), Some((3, 5, "bob".into())));
        let mut solo = RoomWindows::default();
        solo.note(t0, 1, noted(1, "ann"), || DELAY);
        let w = solo.take_due(t0 + DELAY).unwrap();
        assert!(w.owed("ann", 0).is_none());
    }
}
