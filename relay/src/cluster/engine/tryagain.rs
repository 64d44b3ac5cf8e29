//! Publishes answered `TRYAGAIN`: during a slot's migration, with some of a room's keys
//! moved and some not yet, Redis refuses the room's script for a moment. The publish is
//! sent again after a backoff (50 ms doubling, at most [`MAX_TRIES`] times: 3.15 s in
//! all; each try may follow its own `MOVED`/`ASK` redirects, bounded as any command's),
//! instead of being refused to the phone.
//!
//! A room's order is kept by holding its later publishes behind it: once one of the
//! room's publishes waits for its retry, or came back unrun otherwise (`MOVED`, `ASK`,
//! `NOSCRIPT`: it goes again at once, where Redis said or as `EVAL`, but at the tail of a
//! pipeline that later publishes of its room may already be in), every later publish of
//! the room (new ones from the worker, and those in flight that come back unrun:
//! `TRYAGAIN`, `MOVED`, `ASK`, `NOSCRIPT`) waits in the room's queue in ticket order, and
//! the queue goes one publish at a time (the next once the one before is answered, and
//! once every publish of the room that was in flight when the room was held has come
//! back: answered, failed, or held in its place) until it is empty. We chose
//! holding over refusing the later ones: a refusal would make the phone retry them, and a
//! retry the phone sends before the refused one's is sequenced first, the very overtaking
//! this prevents; holding costs one round trip per publish of that room for the length of
//! the migration. What holding cannot undo: a later publish already in flight that Redis
//! ran before the earlier one's `TRYAGAIN` came back (a key arriving on the importing
//! shard between two pipelined scripts) keeps the sequence Redis gave it.
//!
//! Held publishes are bounded by `cluster.max_in_flight` (the worker counts them in
//! flight until answered and refuses more).
//!
//! Other commands answered with an error Redis gives for a while and then not
//! (`TRYAGAIN`, `LOADING`, `BUSY`: see [`super::receipts::transient`]) wait here too, each
//! on its own timer ([`LaterCommands`]): membership steps, rooms' opens and stream reads
//! go again after 50 ms doubling, at most [`super::MAX_HOPS`] redirects and retries
//! together; then a step fails, an open is answered `OpenFailed` (what waits for the room
//! is refused `unavailable`, retryable) and a stream read keeps going at the longest wait
//! (a read is idempotent and its owner has no other answer). They need no order among
//! themselves: a room has one open and one read of its owner in flight at a time.
//!
//! Owns: the rooms' queues of held publishes, the commands waiting for a retry, their
//! timers. Must not touch: how a command is encoded or routed (`send_publish`, ...),
//! the replies' meaning (`replies.rs`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::super::PublishRequest;
use super::super::resp::Value;
use super::super::shard::Pending;
use super::Engine;
use crate::ids::RoomName;

/// The first wait before a publish answered `TRYAGAIN` goes again (doubling per try).
const TRYAGAIN_BACKOFF: Duration = Duration::from_millis(50);
/// How often one publish is sent again after `TRYAGAIN` before it is refused.
pub(super) const MAX_TRIES: u8 = 6;

/// The wait before a publish goes again after its `tries`-th `TRYAGAIN`.
pub(super) fn tryagain_wait(tries: u8) -> Duration {
    TRYAGAIN_BACKOFF * (1 << tries.saturating_sub(1).min(8))
}

/// Whether `reply` says Redis did not run the command (it can go again as it was).
pub(super) fn not_run(reply: &Value) -> bool {
    matches!(reply, Value::Error(e) if [&b"TRYAGAIN"[..], b"MOVED ", b"ASK ", b"NOSCRIPT"]
        .iter()
        .any(|p| e.starts_with(p)))
}

/// Whether `reply` is `TRYAGAIN`.
pub(super) fn is_tryagain(reply: &Value) -> bool {
    matches!(reply, Value::Error(e) if e.starts_with(b"TRYAGAIN"))
}

/// The wait before a command (not a publish) goes again after its `hops`-th redirect or
/// retry.
fn later_wait(hops: u8) -> Duration {
    TRYAGAIN_BACKOFF * (1 << hops.min(8))
}

/// Commands (not publishes) waiting to go again after a transient error: (when, the
/// command, its redirects and retries so far). Bounded by what is in flight: each came
/// off a connection's in-flight queue.
#[derive(Default)]
pub(super) struct LaterCommands {
    waiting: Vec<(Instant, Pending, u8)>,
}

/// One room's publishes held behind a retry.
struct RoomQueue {
    /// In ticket order, each with the `TRYAGAIN`s it met.
    waiting: VecDeque<(PublishRequest, u8)>,
    /// The one sent and not answered yet (the queue's head went): its ticket and tries.
    sent: Option<(u64, u8)>,
    /// When the head goes (again).
    at: Instant,
    /// The room's publishes that were in flight when it was held, not back yet: the head
    /// waits for them (one coming back unrun takes its place in `waiting`).
    outstanding: HashSet<u64>,
}

/// Every room with held publishes.
#[derive(Default)]
pub(super) struct HeldPublishes {
    rooms: HashMap<RoomName, RoomQueue>,
}

impl HeldPublishes {
    /// Whether a publish of `room` with `ticket` must wait behind one of the room's held
    /// publishes (it is not the one sent).
    pub(super) fn behind(&self, room: &RoomName, ticket: u64) -> bool {
        !self.rooms.is_empty()
            && self
                .rooms
                .get(room)
                .is_some_and(|q| q.sent.is_none_or(|(t, _)| t != ticket))
    }

    /// Whether `room`'s publishes are held.
    pub(super) fn holds(&self, room: &RoomName) -> bool {
        !self.rooms.is_empty() && self.rooms.contains_key(room)
    }

    /// Publish `ticket` of `room` came back unrun (`MOVED`, `ASK`, `NOSCRIPT`) and goes
    /// again at once: the room is held behind it (as if its head were sent), unless it is
    /// already.
    fn lead(&mut self, room: &RoomName, ticket: u64, now: Instant) {
        self.rooms.entry(room.clone()).or_insert(RoomQueue {
            waiting: VecDeque::new(),
            sent: Some((ticket, 0)),
            at: now,
            outstanding: HashSet::new(),
        });
    }

    /// The room just held waits for `tickets`, its publishes in flight.
    fn wait_for(&mut self, room: &RoomName, tickets: HashSet<u64>) {
        if let Some(q) = self.rooms.get_mut(room) {
            q.outstanding = tickets;
        }
    }

    /// The `TRYAGAIN`s publish `ticket` of `room` met so far.
    pub(super) fn tries(&self, room: &RoomName, ticket: u64) -> u8 {
        if self.rooms.is_empty() {
            return 0;
        }
        match self.rooms.get(room).and_then(|q| q.sent) {
            Some((t, tries)) if t == ticket => tries,
            _ => 0,
        }
    }

    /// Holds `req` (after `tries` `TRYAGAIN`s), in ticket order; a room held anew waits
    /// `wait`. The one sent coming back unrun goes first again, after `wait`.
    fn hold(&mut self, req: PublishRequest, tries: u8, now: Instant, wait: Duration) {
        let q = self.rooms.entry(req.room.clone()).or_insert(RoomQueue {
            waiting: VecDeque::new(),
            sent: None,
            at: now + wait,
            outstanding: HashSet::new(),
        });
        q.outstanding.remove(&req.ticket);
        if q.sent.is_some_and(|(t, _)| t == req.ticket) {
            q.sent = None;
            q.at = now + wait;
        }
        let at = q.waiting.partition_point(|(r, _)| r.ticket < req.ticket);
        q.waiting.insert(at, (req, tries));
    }

    /// The publish `ticket` of `room` was answered (or given up): the room's next goes
    /// (once nothing it waits for is in flight).
    fn answered(&mut self, room: &RoomName, ticket: u64, now: Instant) {
        if self.rooms.is_empty() {
            return;
        }
        let Some(q) = self.rooms.get_mut(room) else {
            return;
        };
        q.outstanding.remove(&ticket);
        if q.sent.is_some_and(|(t, _)| t == ticket) {
            q.sent = None;
            q.at = now;
        }
        if q.sent.is_none() && q.waiting.is_empty() && q.outstanding.is_empty() {
            self.rooms.remove(room);
        }
    }

    /// The heads due at `now`, each marked sent.
    fn due(&mut self, now: Instant) -> Vec<(PublishRequest, u8)> {
        let mut due = Vec::new();
        for q in self.rooms.values_mut() {
            if q.sent.is_none()
                && q.outstanding.is_empty()
                && q.at <= now
                && let Some((req, tries)) = q.waiting.pop_front()
            {
                q.sent = Some((req.ticket, tries));
                due.push((req, tries));
            }
        }
        due
    }

    /// When the next head is due.
    fn next_at(&self) -> Option<Instant> {
        self.rooms
            .values()
            .filter(|q| q.sent.is_none() && q.outstanding.is_empty() && !q.waiting.is_empty())
            .map(|q| q.at)
            .min()
    }
}

impl Engine {
    /// Whether a publish answered `TRYAGAIN` may go again (it met fewer than
    /// [`MAX_TRIES`]).
    pub(super) fn may_retry(&self, req: &PublishRequest) -> bool {
        self.held.tries(&req.room, req.ticket) < MAX_TRIES
    }

    /// A publish answered `TRYAGAIN` goes again after a backoff, its room's later
    /// publishes behind it.
    pub(super) fn retry_publish_later(&mut self, req: PublishRequest) {
        let tries = self.held.tries(&req.room, req.ticket) + 1;
        let fresh = !self.held.holds(&req.room);
        let (room, ticket) = (req.room.clone(), req.ticket);
        self.held.hold(req, tries, self.woke, tryagain_wait(tries));
        if fresh {
            let in_flight = self.in_flight_of(&room, ticket);
            self.held.wait_for(&room, in_flight);
        }
    }

    /// A publish came back unrun (`MOVED`, `ASK`, `NOSCRIPT`) and goes again now: its
    /// room's later publishes are held behind it, so that none is run before it.
    pub(super) fn lead_room(&mut self, req: &PublishRequest) {
        if self.held.holds(&req.room) {
            return;
        }
        self.held.lead(&req.room, req.ticket, self.woke);
        let in_flight = self.in_flight_of(&req.room, req.ticket);
        self.held.wait_for(&req.room, in_flight);
    }

    /// The tickets of `room`'s publishes in flight on any shard, or answered `MOVED`/`ASK`
    /// and about to go again, other than `except`. A walk of everything in flight: only
    /// when a room starts being held.
    fn in_flight_of(&self, room: &RoomName, except: u64) -> HashSet<u64> {
        let in_flight = self.shards.iter().flat_map(|s| s.inflight.iter());
        in_flight
            .map(|(p, _)| p)
            .chain(self.redirects.iter().map(|(p, ..)| p))
            .filter_map(|p| match p {
                Pending::Publish(req, _) if req.ticket != except && req.room == *room => {
                    Some(req.ticket)
                }
                _ => None,
            })
            .collect()
    }

    /// A publish of a held room (a new one, or one in flight that came back unrun) waits
    /// in the room's queue.
    pub(super) fn hold_behind(&mut self, req: PublishRequest) {
        self.held.hold(req, 0, self.woke, Duration::ZERO);
    }

    /// Publish `ticket` of `room` was answered or given up: the room's next held one goes.
    pub(super) fn publish_answered(&mut self, room: &RoomName, ticket: u64) {
        self.held.answered(room, ticket, self.woke);
    }

    /// Sends `p` (not a publish) again after a backoff; `hops`: its redirects and retries
    /// so far, this one included.
    pub(super) fn retry_later(&mut self, p: Pending, hops: u8) {
        let at = Instant::now() + later_wait(hops);
        self.later.waiting.push((at, p, hops));
    }

    /// Sends the held publishes and the commands waiting for a retry that are due;
    /// returns when the next is due.
    pub(super) fn retry_timers(&mut self, now: Instant) -> Option<Instant> {
        for (req, _) in self.held.due(now) {
            self.send_publish(req, false, None, 0);
        }
        if self.later.waiting.iter().any(|(at, ..)| *at <= now) {
            let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.later.waiting)
                .into_iter()
                .partition(|(at, ..)| *at <= now);
            self.later.waiting = wait;
            for (_, p, hops) in due {
                self.resend(p, false, None, hops);
            }
        }
        let later = self.later.waiting.iter().map(|(at, ..)| *at).min();
        self.held.next_at().into_iter().chain(later).min()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests
mod tests {
    use super::*;
    use bytes::Bytes;
    use pabal_codec::Text;

    fn publish(room: &RoomName, ticket: u64) -> PublishRequest {
        PublishRequest {
            ticket,
            room: room.clone(),
            epoch_hint: 1,
            ts_ms: 0,
            sender: Text::from("alice").into(),
            payload: Bytes::new(),
            repeat: None,
            window: 1,
            expire_ms: None,
            owner_head: None,
        }
    }

    #[test]
    fn a_rooms_held_publishes_go_one_at_a_time_in_ticket_order() {
        let room = RoomName::new(false, Text::from("r"));
        let other = RoomName::new(false, Text::from("o"));
        let mut held = HeldPublishes::default();
        let t0 = Instant::now();
        let wait = tryagain_wait(1);
        assert_eq!(wait, Duration::from_millis(50));
        assert_eq!(tryagain_wait(3), Duration::from_millis(200));
        let all: Duration = (1..=MAX_TRIES).map(tryagain_wait).sum();
        assert_eq!(all, Duration::from_millis(3150));
        // 2 meets TRYAGAIN; 4 (in flight behind it) comes back with an ASK, then 3.
        held.hold(publish(&room, 2), 1, t0, wait);
        assert!(held.behind(&room, 3));
        assert!(!held.behind(&other, 3), "another room is not held");
        held.hold(publish(&room, 4), 0, t0, Duration::ZERO);
        held.hold(publish(&room, 3), 0, t0, Duration::ZERO);
        assert!(held.due(t0).is_empty(), "the first waits its backoff");
        assert_eq!(held.next_at(), Some(t0 + wait));
        let t1 = t0 + wait;
        let first: Vec<u64> = held.due(t1).iter().map(|(r, _)| r.ticket).collect();
        assert_eq!(first, [2]);
        assert!(held.due(t1).is_empty(), "one at a time");
        assert!(!held.behind(&room, 2), "the one sent is not behind itself");
        assert_eq!(held.tries(&room, 2), 1);
        assert_eq!(held.tries(&room, 3), 0);
        // It meets TRYAGAIN again: first again, after a longer wait.
        held.hold(publish(&room, 2), 2, t1, tryagain_wait(2));
        assert!(held.due(t1).is_empty());
        let t2 = t1 + tryagain_wait(2);
        assert_eq!(held.due(t2)[0].0.ticket, 2);
        held.answered(&room, 2, t2);
        assert_eq!(held.due(t2)[0].0.ticket, 3);
        held.answered(&room, 3, t2);
        assert_eq!(held.due(t2)[0].0.ticket, 4);
        held.answered(&room, 4, t2);
        assert!(
            held.rooms.is_empty(),
            "the room is let go once its queue is empty"
        );
        assert!(!held.behind(&room, 5));
    }

    /// A room held because one of its publishes came back `MOVED` (sent again at once, to
    /// the slot's new shard) lets its next go only once the publishes that were in flight
    /// behind it (on the old shard) have come back: the one resent may be answered first.
    #[test]
    fn a_held_rooms_next_waits_for_what_was_in_flight_when_it_was_held() {
        let room = RoomName::new(false, Text::from("r"));
        let mut held = HeldPublishes::default();
        let t0 = Instant::now();
        let tickets = |due: Vec<(PublishRequest, u8)>| -> Vec<u64> {
            due.iter().map(|(r, _)| r.ticket).collect()
        };
        held.lead(&room, 1, t0);
        held.wait_for(&room, [2].into());
        assert!(held.behind(&room, 3), "a new one waits");
        held.hold(publish(&room, 3), 0, t0, Duration::ZERO);
        // 1 is answered by the new shard before 2's MOVED comes back from the old one.
        held.answered(&room, 1, t0);
        assert!(held.due(t0).is_empty(), "3 waits for 2");
        assert_eq!(held.next_at(), None);
        held.hold(publish(&room, 2), 0, t0, Duration::ZERO);
        assert_eq!(tickets(held.due(t0)), [2]);
        held.answered(&room, 2, t0);
        assert_eq!(tickets(held.due(t0)), [3]);
        held.answered(&room, 3, t0);
        assert!(!held.holds(&room), "let go once its queue is empty");
        // One in flight that Redis ran (answered, not unrun) is back too.
        held.lead(&room, 4, t0);
        held.wait_for(&room, [5].into());
        held.answered(&room, 4, t0);
        assert!(held.holds(&room), "5 is still out");
        held.answered(&room, 5, t0);
        assert!(!held.holds(&room));
    }

    #[test]
    fn only_unrun_answers_are_held() {
        let e = |s: &'static str| Value::Error(Bytes::from_static(s.as_bytes()));
        assert!(not_run(&e(
            "TRYAGAIN Multiple keys request during rehashing of slot"
        )));
        assert!(not_run(&e("MOVED 1 127.0.0.1:7000")));
        assert!(not_run(&e("ASK 1 127.0.0.1:7000")));
        assert!(not_run(&e("NOSCRIPT No matching script")));
        assert!(!not_run(&e("ERR script error")));
        assert!(!not_run(&Value::Int(1)));
        assert!(is_tryagain(&e("TRYAGAIN x")));
        assert!(!is_tryagain(&e("MOVED 1 a:1")));
    }

    #[test]
    fn retries_are_counted_by_the_kind_redis_answered() {
        use super::super::super::{ClusterStats, RetryKind};
        let stats = ClusterStats::default();
        for error in [
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "LOADING Redis is loading the dataset in memory",
            "BUSY Redis is busy running a script",
            "ASK 1 127.0.0.1:7000",
            "MOVED 1 127.0.0.1:7000",
            "MOVED 2 127.0.0.1:7001",
            "ERR script error",
            "NOSCRIPT No matching script",
        ] {
            stats.count_retry(error.as_bytes());
        }
        let counted: Vec<(&str, u64)> = RetryKind::ALL
            .iter()
            .map(|&k| (k.label(), stats.retries_of(k)))
            .collect();
        assert_eq!(
            counted,
            [
                ("tryagain", 1),
                ("loading", 1),
                ("busy", 1),
                ("ask", 1),
                ("moved", 2)
            ]
        );
        assert_eq!(RetryKind::of(b"ASKING"), None, "ASK is followed by a space");
    }
}
