//! The shared record of what each room's sequences carry: what the relay promised (PUBACKs,
//! API answers) and what phones claim to have received, checked against each other.
//!
//! Owns: per room, sequence -> message (sender, counter), the earliest instant loadgen knows
//! the message was meant to be sent, and who vouches for it (the relay's acknowledgement, or
//! the first phone that received it); per sender, counter -> (room, sequence) as
//! acknowledged; and the claims that could not be checked yet. Must not touch: sockets,
//! clocks, the plan. Phones feed it; tests feed it fabricated events.
//!
//! # Acks are the truth, deliveries are claims
//! A PUBACK to the publisher (or the API's answer) says which message the relay put under a
//! sequence. A delivery is a phone's claim that it got that message there. A claim is checked
//! against the acknowledgement when there is one; a claim that arrives before the ack (a fast
//! receiver, a sender on a slow 3G downlink) is kept in the slot and checked when the ack
//! comes, and a claim that disagrees with an earlier one waits in a short list. So a wrong
//! delivery is pinned on the phone that got it, whoever arrived first, and is named by what
//! it is: a message **reordered** (it belongs to another sequence of the same room), or
//! **content** the relay never acknowledged there.
//!
//! In a correct run the list stays empty and each record is one lock of one room and, for
//! acks, one lock of one sender: phones on different threads contend only when they touch the
//! same room at once.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Vouched for by the relay's acknowledgement (no phone).
const ACKED: u32 = u32::MAX;
/// A sequence further than this past what a room has seen is not stored (it would mean the
/// relay sent garbage, which is reported, not allocated for).
const MAX_JUMP: u64 = 10_000_000;
/// Claims kept waiting at most; past this, a claim that cannot be checked at once is
/// reported as content that could not be verified (a broken relay cannot grow loadgen).
const MAX_PENDING: usize = 10_000;

/// One message: its sender's index and the sender's counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Msg {
    /// Sender index.
    pub sender: u32,
    /// The sender's n-th message, from 1.
    pub counter: u32,
}

impl std::fmt::Display for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sender {} #{}", self.sender, self.counter)
    }
}

const UNKNOWN: Msg = Msg {
    sender: u32::MAX,
    counter: 0,
};

#[derive(Debug, Clone, Copy)]
struct Slot {
    msg: Msg,
    /// Intended send time, ms since the start: a lower bound of when the relay accepted it.
    intended_ms: u32,
    /// [`ACKED`], or the phone whose delivery first filled the slot.
    by: u32,
}

const EMPTY: Slot = Slot {
    msg: UNKNOWN,
    intended_ms: 0,
    by: ACKED,
};

#[derive(Debug, Default)]
struct RoomLog {
    /// Index `seq - 1`.
    slots: Vec<Slot>,
    acked: u64,
    epoch: Option<u64>,
}

/// A phone's claim: it received `msg` as `(room, seq)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// Room index.
    pub room: u32,
    /// Sequence.
    pub seq: u64,
    /// The receiving phone.
    pub phone: u32,
    /// What it got.
    pub msg: Msg,
}

/// A contradiction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    /// A phone got a message at a sequence of a room, and the relay acknowledged that message
    /// at another sequence of the same room: it arrived out of its place.
    Reordered {
        /// The delivery.
        claim: Claim,
        /// The sequence the message was acknowledged under.
        belongs: u64,
    },
    /// A phone got, at `(room, seq)`, a message the relay did not acknowledge there, nor
    /// anywhere else in that room (or receivers disagree on a sequence never acknowledged).
    Content {
        /// The delivery.
        claim: Claim,
        /// What the relay acknowledged at that sequence, if it did.
        acked: Option<Msg>,
        /// Where the message was acknowledged instead, if anywhere: (room, seq).
        elsewhere: Option<(u32, u64)>,
    },
    /// The relay acknowledged two messages under one sequence.
    AckedTwice {
        /// Room index.
        room: u32,
        /// Sequence.
        seq: u64,
        /// Acknowledged first.
        first: Msg,
        /// Acknowledged now.
        now: Msg,
    },
    /// One message acknowledged under two sequences (or rooms).
    Duplicate {
        /// The message.
        msg: Msg,
        /// (room, seq) acknowledged first.
        first: (u32, u64),
        /// (room, seq) now.
        now: (u32, u64),
    },
    /// A room, sequence, sender or counter far outside anything sensible.
    OutOfRange {
        /// Room index.
        room: u32,
        /// Sequence.
        seq: u64,
        /// The phone that got it, if a phone did.
        phone: Option<u32>,
    },
}

impl Conflict {
    /// The phone to blame: the receiver of a wrong delivery, the sender of a wrongly
    /// acknowledged message.
    pub fn phone(&self) -> Option<u32> {
        match self {
            Conflict::Reordered { claim, .. } | Conflict::Content { claim, .. } => {
                Some(claim.phone)
            }
            Conflict::AckedTwice { now, .. } => Some(now.sender),
            Conflict::Duplicate { msg, .. } => Some(msg.sender),
            Conflict::OutOfRange { phone, .. } => *phone,
        }
    }

    /// The room concerned.
    pub fn room(&self) -> u32 {
        match self {
            Conflict::Reordered { claim, .. } | Conflict::Content { claim, .. } => claim.room,
            Conflict::AckedTwice { room, .. } | Conflict::OutOfRange { room, .. } => *room,
            Conflict::Duplicate { now, .. } => now.0,
        }
    }
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conflict::Reordered { claim, belongs } => write!(
                f,
                "got {} as seq {}, but the relay acknowledged it as seq {belongs}",
                claim.msg, claim.seq
            ),
            Conflict::Content {
                claim,
                acked,
                elsewhere,
            } => {
                write!(f, "got {} as seq {}", claim.msg, claim.seq)?;
                match acked {
                    Some(m) => write!(f, ", where the relay acknowledged {m}")?,
                    None => write!(
                        f,
                        ", a sequence the relay never acknowledged, and other receivers got \
                         something else there"
                    )?,
                }
                match elsewhere {
                    Some((room, seq)) => {
                        write!(f, "; the message was acknowledged in room {room} seq {seq}")
                    }
                    None => write!(f, "; the message was never acknowledged in this room"),
                }
            }
            Conflict::AckedTwice {
                room,
                seq,
                first,
                now,
            } => write!(
                f,
                "room {room} seq {seq} acknowledged for {first} and again for {now}"
            ),
            Conflict::Duplicate { msg, first, now } => write!(
                f,
                "{msg} acknowledged as room {} seq {} and as room {} seq {}",
                first.0, first.1, now.0, now.1
            ),
            Conflict::OutOfRange { room, seq, .. } => {
                write!(f, "room {room}: absurd sequence {seq}")
            }
        }
    }
}

/// What the ledger knows of one room, copied out for the end-of-run checks.
#[derive(Debug, Clone, Default)]
pub struct RoomSnapshot {
    /// Per sequence (index `seq - 1`): the message if known, and its intended send time (ms).
    pub slots: Vec<(Option<Msg>, u32)>,
    /// The highest acknowledged sequence.
    pub acked: u64,
    /// The epoch phones were first bound in.
    pub epoch: Option<u64>,
}

/// The shared record. See the module docs.
#[derive(Debug)]
pub struct Ledger {
    rooms: Vec<Mutex<RoomLog>>,
    senders: Vec<Mutex<Vec<(u32, u64)>>>,
    pending: Mutex<Vec<Claim>>,
    pending_len: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

enum Judged {
    Wait,
    Fine,
    Bad(Conflict),
}

impl Ledger {
    /// A ledger for `rooms` rooms and `senders` senders.
    pub fn new(rooms: usize, senders: usize) -> Ledger {
        Ledger {
            rooms: (0..rooms).map(|_| Mutex::new(RoomLog::default())).collect(),
            senders: (0..senders).map(|_| Mutex::new(Vec::new())).collect(),
            pending: Mutex::new(Vec::new()),
            pending_len: AtomicUsize::new(0),
        }
    }

    fn valid(&self, room: u32, seq: u64, msg: Msg) -> bool {
        (room as usize) < self.rooms.len()
            && (msg.sender as usize) < self.senders.len()
            && seq > 0
            && msg.counter > 0
    }

    /// Writes `new` into the slot of `(room, seq)` (growing the room's log to hold it) if the
    /// slot is empty, or, for an ack, if only a claim filled it; an ack also raises the
    /// room's last acknowledged sequence. Returns the slot as it was; `None` out of range.
    fn put(&self, room: u32, seq: u64, new: Slot) -> Option<Slot> {
        let mut log = lock(self.rooms.get(room as usize)?);
        if seq == 0 || seq > log.slots.len() as u64 + MAX_JUMP {
            return None;
        }
        let i = (seq - 1) as usize;
        if log.slots.len() <= i {
            log.slots.resize(i + 1, EMPTY);
        }
        let ack = new.by == ACKED;
        if ack {
            log.acked = log.acked.max(seq);
        }
        let before = log.slots[i];
        if before.msg == UNKNOWN || (ack && before.by != ACKED) {
            log.slots[i] = new;
        }
        Some(before)
    }

    /// Where the relay acknowledged `msg`, if it did.
    fn acked_at(&self, msg: Msg) -> Option<(u32, u64)> {
        let log = lock(self.senders.get(msg.sender as usize)?);
        log.get(msg.counter.checked_sub(1)? as usize)
            .copied()
            .filter(|&(_, seq)| seq != 0)
    }

    /// Records the relay's acknowledgement: `(room, seq)` carries `msg`, meant to be sent at
    /// `intended_ms`. Contradictions found (with this ack, or claims it settles) go to `out`.
    pub fn ack(&self, room: u32, seq: u64, msg: Msg, intended_ms: u32, out: &mut Vec<Conflict>) {
        if !self.valid(room, seq, msg) {
            out.push(Conflict::OutOfRange {
                room,
                seq,
                phone: None,
            });
            return;
        }
        let slot = Slot {
            msg,
            intended_ms,
            by: ACKED,
        };
        let Some(before) = self.put(room, seq, slot) else {
            out.push(Conflict::OutOfRange {
                room,
                seq,
                phone: None,
            });
            return;
        };
        let mut settle = Vec::new();
        if before.msg != UNKNOWN && before.msg != msg {
            if before.by == ACKED {
                out.push(Conflict::AckedTwice {
                    room,
                    seq,
                    first: before.msg,
                    now: msg,
                });
            } else {
                // The phone that filled the slot got something else: judge it below.
                settle.push(Claim {
                    room,
                    seq,
                    phone: before.by,
                    msg: before.msg,
                });
            }
        }
        {
            let mut slog = lock(&self.senders[msg.sender as usize]);
            let i = (msg.counter - 1) as usize;
            if i as u64 > slog.len() as u64 + MAX_JUMP {
                out.push(Conflict::OutOfRange {
                    room,
                    seq,
                    phone: None,
                });
                return;
            }
            if slog.len() <= i {
                slog.resize(i + 1, (u32::MAX, 0));
            }
            let entry = &mut slog[i];
            if entry.1 == 0 {
                *entry = (room, seq);
            } else if *entry != (room, seq) {
                out.push(Conflict::Duplicate {
                    msg,
                    first: *entry,
                    now: (room, seq),
                });
            }
        }
        if settle.is_empty() && self.pending_len.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut pending = lock(&self.pending);
        // Claims this ack may settle: those at this sequence, and those of this message.
        let mut k = 0;
        while k < pending.len() {
            let c = pending[k];
            if (c.room == room && c.seq == seq) || c.msg == msg {
                settle.push(pending.swap_remove(k));
            } else {
                k += 1;
            }
        }
        for c in settle {
            match self.judge(&c) {
                Judged::Wait => pending.push(c),
                Judged::Fine => {}
                Judged::Bad(conflict) => out.push(conflict),
            }
        }
        self.pending_len.store(pending.len(), Ordering::Release);
    }

    /// Records a phone's claim that it received `claim.msg` as `(claim.room, claim.seq)`,
    /// meant to be sent at `intended_ms`. A contradiction that can be judged now goes to
    /// `out`; one that waits for an ack is kept.
    pub fn claim(&self, claim: Claim, intended_ms: u32, out: &mut Vec<Conflict>) {
        let Claim {
            room,
            seq,
            phone,
            msg,
        } = claim;
        if !self.valid(room, seq, msg) {
            out.push(Conflict::OutOfRange {
                room,
                seq,
                phone: Some(phone),
            });
            return;
        }
        let slot = Slot {
            msg,
            intended_ms,
            by: phone,
        };
        let Some(before) = self.put(room, seq, slot) else {
            out.push(Conflict::OutOfRange {
                room,
                seq,
                phone: Some(phone),
            });
            return;
        };
        if before.msg == UNKNOWN || before.msg == msg {
            return;
        }
        match self.judge(&claim) {
            Judged::Fine => {}
            Judged::Bad(conflict) => out.push(conflict),
            Judged::Wait => {
                let mut pending = lock(&self.pending);
                if pending.len() >= MAX_PENDING {
                    out.push(self.unverifiable(&claim));
                } else {
                    pending.push(claim);
                    self.pending_len.store(pending.len(), Ordering::Release);
                }
            }
        }
    }

    /// Judges a claim against the acks known now.
    fn judge(&self, c: &Claim) -> Judged {
        let truth = {
            let log = lock(&self.rooms[c.room as usize]);
            log.slots
                .get((c.seq - 1) as usize)
                .filter(|s| s.by == ACKED && s.msg != UNKNOWN)
                .map(|s| s.msg)
        };
        if truth == Some(c.msg) {
            return Judged::Fine;
        }
        let elsewhere = self.acked_at(c.msg);
        match (truth, elsewhere) {
            (_, Some((room, belongs))) if room == c.room => {
                Judged::Bad(Conflict::Reordered { claim: *c, belongs })
            }
            // Acknowledged in another room: it has no place here whatever this seq holds.
            (acked, elsewhere @ Some(_)) => Judged::Bad(Conflict::Content {
                claim: *c,
                acked,
                elsewhere,
            }),
            // Not (yet) acknowledged anywhere: its ack may still come and show where it
            // belongs; at the end, it is content the relay never acknowledged.
            (_, None) => Judged::Wait,
        }
    }

    fn unverifiable(&self, c: &Claim) -> Conflict {
        let acked = {
            let log = lock(&self.rooms[c.room as usize]);
            log.slots
                .get((c.seq - 1) as usize)
                .filter(|s| s.by == ACKED && s.msg != UNKNOWN)
                .map(|s| s.msg)
        };
        Conflict::Content {
            claim: *c,
            acked,
            elsewhere: self.acked_at(c.msg),
        }
    }

    /// The end of the run: claims still waiting (their messages were never acknowledged, and
    /// receivers disagree on them) are contradictions no ack will settle.
    pub fn finish(&self) -> Vec<Conflict> {
        let mut pending = lock(&self.pending);
        let left: Vec<Claim> = std::mem::take(&mut *pending);
        self.pending_len.store(0, Ordering::Release);
        drop(pending);
        left.iter()
            .map(|c| match self.judge(c) {
                Judged::Bad(conflict) => conflict,
                _ => self.unverifiable(c),
            })
            .collect()
    }

    /// Notes the epoch a phone was bound in; the first one seen is the room's epoch for the
    /// run. Returns it.
    pub fn note_epoch(&self, room: u32, epoch: u64) -> Option<u64> {
        let mut log = lock(self.rooms.get(room as usize)?);
        Some(*log.epoch.get_or_insert(epoch))
    }

    /// The highest sequence of `room` the relay acknowledged so far (0: none).
    pub fn last_acked(&self, room: u32) -> u64 {
        self.rooms.get(room as usize).map_or(0, |l| lock(l).acked)
    }

    /// A copy of what is known of `room`.
    pub fn snapshot(&self, room: u32) -> RoomSnapshot {
        let Some(log) = self.rooms.get(room as usize) else {
            return RoomSnapshot::default();
        };
        let log = lock(log);
        RoomSnapshot {
            slots: log
                .slots
                .iter()
                .map(|s| ((s.msg != UNKNOWN).then_some(s.msg), s.intended_ms))
                .collect(),
            acked: log.acked,
            epoch: log.epoch,
        }
    }

    /// Rooms in the ledger.
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn m(sender: u32, counter: u32) -> Msg {
        Msg { sender, counter }
    }

    fn claim(room: u32, seq: u64, phone: u32, msg: Msg) -> Claim {
        Claim {
            room,
            seq,
            phone,
            msg,
        }
    }

    #[test]
    fn acks_and_deliveries_must_agree() {
        let l = Ledger::new(2, 4);
        let mut out = Vec::new();
        l.ack(0, 1, m(2, 1), 0, &mut out);
        l.claim(claim(0, 1, 3, m(2, 1)), 0, &mut out);
        // A delivery seen before its ack is kept, then checked.
        l.claim(claim(0, 2, 3, m(1, 1)), 0, &mut out);
        l.ack(0, 2, m(1, 1), 0, &mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(l.last_acked(0), 2);
        // Something never acknowledged at an acknowledged sequence: judged at the end.
        l.claim(claim(0, 2, 0, m(1, 2)), 0, &mut out);
        assert!(out.is_empty());
        let left = l.finish();
        assert!(
            matches!(left.as_slice(), [Conflict::Content { claim, .. }] if claim.phone == 0),
            "{left:?}"
        );
        // Sender 2's #1 acknowledged again under another sequence.
        l.ack(0, 3, m(2, 1), 0, &mut out);
        assert!(matches!(out.as_slice(), [Conflict::Duplicate { .. }]));
        out.clear();
        l.ack(1, u64::MAX, m(0, 1), 0, &mut out);
        l.ack(9, 1, m(0, 1), 0, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|c| matches!(c, Conflict::OutOfRange { .. })));
    }

    /// A receiver gets A and B swapped before either is acknowledged; the other receiver
    /// gets them right. Once the acks come, the swapped receiver, and only it, is named,
    /// for a reorder.
    #[test]
    fn a_swap_before_the_acks_is_pinned_on_its_receiver() {
        let l = Ledger::new(1, 4);
        let mut out = Vec::new();
        let (a, b) = (m(0, 1), m(1, 1));
        l.claim(claim(0, 1, 2, b), 0, &mut out);
        l.claim(claim(0, 2, 2, a), 0, &mut out);
        l.claim(claim(0, 1, 3, a), 0, &mut out);
        l.claim(claim(0, 2, 3, b), 0, &mut out);
        assert!(out.is_empty());
        l.ack(0, 1, a, 0, &mut out);
        l.ack(0, 2, b, 0, &mut out);
        assert_eq!(out.len(), 2, "{out:?}");
        for c in &out {
            assert!(
                matches!(c, Conflict::Reordered { claim, .. } if claim.phone == 2),
                "{c}"
            );
        }
        assert!(l.finish().is_empty());
    }

    #[test]
    fn unsettled_disagreements_surface_at_the_end() {
        let l = Ledger::new(1, 4);
        let mut out = Vec::new();
        l.claim(claim(0, 1, 2, m(0, 1)), 0, &mut out);
        l.claim(claim(0, 1, 3, m(1, 1)), 0, &mut out);
        assert!(out.is_empty());
        let left = l.finish();
        assert!(
            matches!(left.as_slice(), [Conflict::Content { claim, acked: None, .. }] if claim.phone == 3),
            "{left:?}"
        );
    }
}
