//! Delivery verification: what the relay promised (PUBACKs and API publishes), what each phone
//! got, and the difference.
//!
//! Owns: the [`Ledger`] (per room, sequence → (sender, counter) as learned from acks and
//! first sightings; per sender, counter → (room, sequence)), the [`Violations`] found while
//! running, and the final comparison [`final_check`]. Must not touch: sockets, clocks. The
//! phones feed it; tests feed it fabricated events.
//!
//! What counts as what:
//! - **reorder / duplicate / skip on a connection**: `ClientSession` refuses any frame that
//!   breaks the cursor rules (`SessionError`); each refusal is a violation, with the phone,
//!   room and sequences.
//! - **duplicate or corrupted content**: every receiver of `(room, seq)` must see the same
//!   `(sender, counter)` the publisher's PUBACK named; and one `(sender, counter)` must never
//!   appear under two sequences.
//! - **silent loss**: at the end, a phone that is connected, on a live link and quiet, whose
//!   cursor in a room is below the room's last acknowledged sequence, lost what lies between
//!   without being told. Announced losses (GAP, a new epoch) are counted apart: the contract
//!   allows them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;

use serde::Serialize;

/// How many examples of each kind of violation are kept.
pub const EXAMPLES: usize = 10;
/// A sequence further than this past what a room has seen is not stored (it would mean the
/// relay sent garbage, which is reported, not allocated for).
const MAX_JUMP: u64 = 10_000_000;
const UNKNOWN: (u32, u32) = (u32::MAX, 0);

/// Where a ledger entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A PUBACK to the publisher, or the API's answer: the relay's promise.
    Ack,
    /// A delivery to a phone.
    Delivery,
}

#[derive(Debug, Default)]
struct RoomLog {
    /// Index `seq - 1`.
    entries: Vec<(u32, u32)>,
    acked: u64,
}

/// The shared record of what each room's sequences carry. One lock per room and per sender;
/// phones on different threads contend only when they touch the same room at once.
#[derive(Debug)]
pub struct Ledger {
    rooms: Vec<Mutex<RoomLog>>,
    senders: Vec<Mutex<Vec<(u32, u64)>>>,
}

/// A contradiction found while recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    /// `(room, seq)` carried two different messages.
    Content {
        /// Room index.
        room: u32,
        /// Sequence.
        seq: u64,
        /// (sender, counter) recorded first.
        first: (u32, u32),
        /// (sender, counter) now.
        now: (u32, u32),
    },
    /// One message under two sequences (or rooms).
    Duplicate {
        /// Sender index.
        sender: u32,
        /// The sender's counter.
        counter: u32,
        /// (room, seq) recorded first.
        first: (u32, u64),
        /// (room, seq) now.
        now: (u32, u64),
    },
    /// A sequence, sender or counter far outside anything sensible.
    OutOfRange {
        /// Room index.
        room: u32,
        /// Sequence.
        seq: u64,
    },
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::Content {
                room,
                seq,
                first,
                now,
            } => write!(
                f,
                "room {room} seq {seq}: carried sender {} #{} first, now sender {} #{}",
                first.0, first.1, now.0, now.1
            ),
            Conflict::Duplicate {
                sender,
                counter,
                first,
                now,
            } => write!(
                f,
                "sender {sender} message #{counter} appears as room {} seq {} and room {} seq {}",
                first.0, first.1, now.0, now.1
            ),
            Conflict::OutOfRange { room, seq } => write!(f, "room {room}: absurd sequence {seq}"),
        }
    }
}

impl Ledger {
    /// A ledger for `rooms` rooms and `senders` senders.
    pub fn new(rooms: usize, senders: usize) -> Ledger {
        Ledger {
            rooms: (0..rooms).map(|_| Mutex::new(RoomLog::default())).collect(),
            senders: (0..senders).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    /// Records that `(room, seq)` carries `(sender, counter)`, checking it against what is
    /// known. An [`Source::Ack`] also raises the room's last acknowledged sequence.
    pub fn record(
        &self,
        room: u32,
        seq: u64,
        sender: u32,
        counter: u32,
        source: Source,
    ) -> Result<(), Conflict> {
        let (Some(log), Some(slog)) = (
            self.rooms.get(room as usize),
            self.senders.get(sender as usize),
        ) else {
            return Err(Conflict::OutOfRange { room, seq });
        };
        if seq == 0 || counter == 0 {
            return Err(Conflict::OutOfRange { room, seq });
        }
        {
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            let have = log.entries.len() as u64;
            if seq > have + MAX_JUMP {
                return Err(Conflict::OutOfRange { room, seq });
            }
            if source == Source::Ack {
                log.acked = log.acked.max(seq);
            }
            let i = (seq - 1) as usize;
            if log.entries.len() <= i {
                log.entries.resize(i + 1, UNKNOWN);
            }
            let entry = &mut log.entries[i];
            if *entry == UNKNOWN {
                *entry = (sender, counter);
            } else if *entry != (sender, counter) {
                return Err(Conflict::Content {
                    room,
                    seq,
                    first: *entry,
                    now: (sender, counter),
                });
            }
        }
        let mut slog = slog.lock().unwrap_or_else(|e| e.into_inner());
        let i = (counter - 1) as usize;
        if i as u64 > slog.len() as u64 + MAX_JUMP {
            return Err(Conflict::OutOfRange { room, seq });
        }
        if slog.len() <= i {
            slog.resize(i + 1, (u32::MAX, 0));
        }
        let entry = &mut slog[i];
        if entry.1 == 0 {
            *entry = (room, seq);
        } else if *entry != (room, seq) {
            return Err(Conflict::Duplicate {
                sender,
                counter,
                first: *entry,
                now: (room, seq),
            });
        }
        Ok(())
    }

    /// The highest sequence of `room` the relay acknowledged so far (0: none).
    pub fn last_acked(&self, room: u32) -> u64 {
        self.rooms
            .get(room as usize)
            .map_or(0, |l| l.lock().unwrap_or_else(|e| e.into_inner()).acked)
    }

    /// Rooms in the ledger.
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }
}

/// The kinds of violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `ClientSession` refused a frame: a skipped, repeated or reordered sequence, an unknown
    /// alias or sender.
    Session,
    /// A frame from the relay did not decode.
    Malformed,
    /// Two messages under one sequence, or a payload that is not loadgen's.
    Content,
    /// One message under two sequences.
    Duplicate,
    /// A ROOM moved a known cursor forward (a silent skip) or backward (repeats) in the same
    /// epoch.
    CursorJump,
    /// A room bound that the phone never joined.
    Misrouted,
    /// Missing at the end on a live, quiet connection, with no GAP.
    SilentLoss,
}

impl Kind {
    /// A label for reports.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Session => "session error (skip/repeat/reorder)",
            Kind::Malformed => "malformed frame",
            Kind::Content => "content mismatch",
            Kind::Duplicate => "duplicate",
            Kind::CursorJump => "cursor jump on ROOM",
            Kind::Misrouted => "misrouted room",
            Kind::SilentLoss => "silent loss",
        }
    }
}

/// One violation, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// What kind.
    pub kind: Kind,
    /// The phone (index and user id), if one is concerned.
    pub phone: Option<String>,
    /// The room's name, if one is concerned.
    pub room: Option<String>,
    /// What exactly.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind.label())?;
        if let Some(p) = &self.phone {
            write!(f, ", phone {p}")?;
        }
        if let Some(r) = &self.room {
            write!(f, ", room {r}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// Violations found, counted by kind, with the first few of each kept as examples.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Violations {
    /// Count per kind.
    pub counts: BTreeMap<Kind, u64>,
    /// Messages concerned, per kind (a silent loss of 5 messages counts 5 here, 1 above).
    pub messages: BTreeMap<Kind, u64>,
    /// The first few of each kind.
    pub examples: Vec<Violation>,
}

impl Violations {
    /// Records one violation concerning `messages` messages.
    pub fn add(&mut self, v: Violation, messages: u64) {
        let n = self.counts.entry(v.kind).or_default();
        *n += 1;
        *self.messages.entry(v.kind).or_default() += messages;
        if *n as usize <= EXAMPLES {
            self.examples.push(v);
        }
    }

    /// Adds another collection's counts and examples.
    pub fn merge(&mut self, other: Violations) {
        for (k, n) in other.counts {
            *self.counts.entry(k).or_default() += n;
        }
        for (k, n) in other.messages {
            *self.messages.entry(k).or_default() += n;
        }
        for v in other.examples {
            let kept = self.examples.iter().filter(|e| e.kind == v.kind).count();
            if kept < EXAMPLES {
                self.examples.push(v);
            }
        }
    }

    /// Violations of every kind.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Violations of one kind.
    pub fn count(&self, kind: Kind) -> u64 {
        self.counts.get(&kind).copied().unwrap_or(0)
    }
}

/// How a phone stood when the run stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndState {
    /// Connected on a live link and nothing arrived for a while: what it lacks, it lost.
    Quiet,
    /// Connected, and deliveries were still arriving (or queued in its link).
    Receiving,
    /// Not connected (waiting to reconnect, or its link was dead).
    Offline,
}

/// A phone's standing in one room at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomEnd {
    /// Room index.
    pub room: u32,
    /// The phone's cursor (last sequence held, including its own acknowledged ones).
    pub cursor: u64,
}

/// A phone at the end of the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhoneEnd {
    /// A label: `index (user)`.
    pub phone: String,
    /// How it stood.
    pub state: EndState,
    /// Rooms it had been bound to at least once.
    pub rooms: Vec<RoomEnd>,
    /// Rooms of its plan it was never bound to.
    pub never_bound: u32,
}

/// The verdict on the final state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FinalSummary {
    /// (phone, room) pairs compared.
    pub pairs: u64,
    /// Pairs whose cursor reached the room's last acknowledged sequence.
    pub caught_up: u64,
    /// Pairs behind on a phone that was still receiving: not judged.
    pub behind_receiving: u64,
    /// Messages those pairs still lacked.
    pub behind_receiving_messages: u64,
    /// Pairs behind on a phone that was offline: not judged.
    pub behind_offline: u64,
    /// Messages those pairs lacked.
    pub behind_offline_messages: u64,
    /// Pairs with silent loss.
    pub silent_loss_pairs: u64,
    /// Messages silently lost.
    pub silent_loss_messages: u64,
    /// Memberships never bound on any connection.
    pub never_bound: u64,
}

/// Compares every phone's cursors with the rooms' last acknowledged sequences, recording
/// silent loss into `violations`.
pub fn final_check(
    ledger: &Ledger,
    phones: &[PhoneEnd],
    room_name: impl Fn(u32) -> String,
    violations: &mut Violations,
) -> FinalSummary {
    let mut s = FinalSummary::default();
    for phone in phones {
        s.never_bound += u64::from(phone.never_bound);
        for r in &phone.rooms {
            s.pairs += 1;
            let acked = ledger.last_acked(r.room);
            if r.cursor >= acked {
                s.caught_up += 1;
                continue;
            }
            let missing = acked - r.cursor;
            match phone.state {
                EndState::Receiving => {
                    s.behind_receiving += 1;
                    s.behind_receiving_messages += missing;
                }
                EndState::Offline => {
                    s.behind_offline += 1;
                    s.behind_offline_messages += missing;
                }
                EndState::Quiet => {
                    s.silent_loss_pairs += 1;
                    s.silent_loss_messages += missing;
                    violations.add(
                        Violation {
                            kind: Kind::SilentLoss,
                            phone: Some(phone.phone.clone()),
                            room: Some(room_name(r.room)),
                            detail: format!(
                                "sequences {}..={} acknowledged but never delivered nor \
                                 announced by a GAP",
                                r.cursor + 1,
                                acked
                            ),
                        },
                        missing,
                    );
                }
            }
        }
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn acks_and_deliveries_must_agree() {
        let l = Ledger::new(2, 3);
        l.record(0, 1, 2, 1, Source::Ack).unwrap();
        l.record(0, 1, 2, 1, Source::Delivery).unwrap();
        // A delivery seen before its ack is learned from, then checked.
        l.record(0, 2, 1, 1, Source::Delivery).unwrap();
        l.record(0, 2, 1, 1, Source::Ack).unwrap();
        assert_eq!(l.last_acked(0), 2);
        assert!(matches!(
            l.record(0, 2, 1, 2, Source::Delivery),
            Err(Conflict::Content { .. })
        ));
        // Sender 2's message #1 again under another sequence: a duplicate.
        assert!(matches!(
            l.record(0, 3, 2, 1, Source::Delivery),
            Err(Conflict::Duplicate { .. })
        ));
        assert!(matches!(
            l.record(1, u64::MAX, 0, 1, Source::Delivery),
            Err(Conflict::OutOfRange { .. })
        ));
        assert!(l.record(9, 1, 0, 1, Source::Ack).is_err());
    }

    #[test]
    fn quiet_phones_behind_the_acks_lost_messages_silently() {
        let l = Ledger::new(1, 1);
        for seq in 1..=5 {
            l.record(0, seq, 0, seq as u32, Source::Ack).unwrap();
        }
        let end = |state, cursor| PhoneEnd {
            phone: "1 (u1)".into(),
            state,
            rooms: vec![RoomEnd { room: 0, cursor }],
            never_bound: 0,
        };
        let mut v = Violations::default();
        let s = final_check(
            &l,
            &[
                end(EndState::Quiet, 5),
                end(EndState::Receiving, 3),
                end(EndState::Offline, 1),
            ],
            |_| "r".into(),
            &mut v,
        );
        assert_eq!(v.total(), 0);
        assert_eq!(
            (s.caught_up, s.behind_receiving, s.behind_offline),
            (1, 1, 1)
        );
        let s = final_check(&l, &[end(EndState::Quiet, 2)], |_| "r".into(), &mut v);
        assert_eq!((s.silent_loss_pairs, s.silent_loss_messages), (1, 3));
        assert_eq!(v.count(Kind::SilentLoss), 1);
        assert!(v.examples[0].detail.contains("3..=5"), "{}", v.examples[0]);
    }
}
