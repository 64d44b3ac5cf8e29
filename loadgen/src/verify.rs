//! The verdict: the kinds of violation, the violations found while running, and the final
//! comparison of every phone's state with what the relay promised.
//!
//! Owns: [`Kind`], [`Violations`], how a phone stood at the end ([`PhoneEnd`]), the
//! thresholds of [`Thresholds`] and [`final_check`]. Must not touch: sockets, clocks. What
//! each sequence carries is [`crate::ledger`]'s; whether a GAP was allowed,
//! [`crate::gaps`]'s.
//!
//! What counts as what:
//! - **sequence break**: `ClientSession` refused a frame that breaks the cursor rules
//!   (`SessionError`), with the phone, room and sequences.
//! - **corrupted**: a payload whose checksum does not match ([`crate::payload`]).
//! - **duplicate**: a phone got a message it had just got in the same room, or the relay
//!   acknowledged one message under two sequences.
//! - **reordered / content**: a delivery that contradicts what the relay acknowledged
//!   ([`crate::ledger`]).
//! - **unexplained GAP**: a GAP that neither retention nor an epoch change explains.
//! - **silent loss**: at the end, a phone that is connected, on a live link and quiet, whose
//!   cursor in a room is below the room's last acknowledged sequence.
//! - **unacknowledged publish**: a publish still without PUBACK (or refusal) at the end, on a
//!   connection that is open, live and quiet: the drain gave it its time.
//! - **never welcomed / never bound / not judged**: phones that never got a WELCOME,
//!   memberships never bound, phones that could not be judged at the end (still receiving, or
//!   offline without a relay's retry hint to explain it); each fails the run past its
//!   threshold (default 0).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// How many examples of each kind of violation are kept.
pub const EXAMPLES: usize = 10;

/// The kinds of violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `ClientSession` refused a frame: a skipped, repeated or reordered sequence, an unknown
    /// alias, sender or message id.
    Session,
    /// A frame from the relay did not decode.
    Malformed,
    /// A payload whose checksum does not match.
    Corrupted,
    /// A message other than the one the relay acknowledged at that sequence, or a payload
    /// that is not loadgen's.
    Content,
    /// A message delivered out of its place (acknowledged under another sequence of the
    /// room).
    Reordered,
    /// A message delivered twice to one phone, or acknowledged under two sequences.
    Duplicate,
    /// A ROOM moved a known cursor forward (a silent skip) or backward (repeats) in the same
    /// epoch.
    CursorJump,
    /// A room bound that the phone never joined.
    Misrouted,
    /// A GAP that neither retention nor an epoch change explains.
    UnexplainedGap,
    /// Missing at the end on a live, quiet connection, with no GAP.
    SilentLoss,
    /// A publish neither acknowledged nor refused by the end, on a live, quiet connection.
    UnackedPublish,
    /// A phone that never got a WELCOME.
    NeverWelcomed,
    /// A membership never bound on any connection of a welcomed phone.
    NeverBound,
    /// A phone that could not be judged at the end, and nothing explains why.
    NotJudged,
}

impl Kind {
    /// Every kind, in report order.
    pub const ALL: [Kind; 14] = [
        Kind::SilentLoss,
        Kind::UnackedPublish,
        Kind::UnexplainedGap,
        Kind::Corrupted,
        Kind::Content,
        Kind::Reordered,
        Kind::Duplicate,
        Kind::Session,
        Kind::CursorJump,
        Kind::Malformed,
        Kind::Misrouted,
        Kind::NeverWelcomed,
        Kind::NeverBound,
        Kind::NotJudged,
    ];

    /// A label for reports.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Session => "sequence break (skip/repeat/reorder)",
            Kind::Malformed => "malformed frame",
            Kind::Corrupted => "corrupted payload",
            Kind::Content => "content mismatch",
            Kind::Reordered => "reordered",
            Kind::Duplicate => "duplicate",
            Kind::CursorJump => "cursor jump on ROOM",
            Kind::Misrouted => "misrouted room",
            Kind::UnexplainedGap => "unexplained GAP",
            Kind::SilentLoss => "silent loss",
            Kind::UnackedPublish => "publish never acknowledged",
            Kind::NeverWelcomed => "never welcomed",
            Kind::NeverBound => "never bound",
            Kind::NotJudged => "not judged",
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

    /// Messages concerned by violations of one kind.
    pub fn messages(&self, kind: Kind) -> u64 {
        self.messages.get(&kind).copied().unwrap_or(0)
    }
}

/// How many of the end-of-run shortfalls a run tolerates before they are violations
/// (scenario `[verify]`). Default: none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    /// Phones that never got a WELCOME.
    pub max_never_welcomed: u64,
    /// Memberships of welcomed phones never bound.
    pub max_never_bound: u64,
    /// Phones not judged at the end without a retry hint to explain it.
    pub max_not_judged: u64,
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
    /// It got a WELCOME at least once.
    pub welcomed: bool,
    /// Publishes still without PUBACK or refusal.
    pub unacked: u32,
    /// Offline, waiting out the retry hint of the relay's GOAWAY.
    pub waiting_for_hint: bool,
}

impl PhoneEnd {
    /// A welcomed phone in `state` with `rooms`, nothing else pending.
    pub fn new(phone: impl Into<String>, state: EndState, rooms: Vec<RoomEnd>) -> PhoneEnd {
        PhoneEnd {
            phone: phone.into(),
            state,
            rooms,
            never_bound: 0,
            welcomed: true,
            unacked: 0,
            waiting_for_hint: false,
        }
    }
}

/// The verdict on the final state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FinalSummary {
    /// Phones that connect (channel publishers through the API excluded).
    pub phones: u64,
    /// Phones judged: welcomed, and either caught up or quiet at the end.
    pub phones_judged: u64,
    /// Phones never welcomed.
    pub never_welcomed: u64,
    /// Phones not judged (still receiving, or offline) at the end.
    pub not_judged: u64,
    /// Of those, offline waiting out a relay's retry hint.
    pub not_judged_waiting_for_hint: u64,
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
    /// Memberships of welcomed phones never bound on any connection.
    pub never_bound: u64,
    /// Publishes without PUBACK at the end, on quiet phones (violations).
    pub unacked_quiet: u64,
    /// Publishes without PUBACK at the end, on phones not judged.
    pub unacked_not_judged: u64,
}

/// Compares every phone's state with the rooms' last acknowledged sequences (`acked`),
/// recording violations into `violations`.
pub fn final_check(
    acked: impl Fn(u32) -> u64,
    phones: &[PhoneEnd],
    room_name: impl Fn(u32) -> String,
    thresholds: &Thresholds,
    violations: &mut Violations,
) -> FinalSummary {
    let mut s = FinalSummary::default();
    let mut never_welcomed = Vec::new();
    let mut never_bound = Vec::new();
    let mut not_judged = Vec::new();
    for phone in phones {
        s.phones += 1;
        if !phone.welcomed {
            s.never_welcomed += 1;
            never_welcomed.push(phone);
            continue;
        }
        if phone.never_bound > 0 {
            s.never_bound += u64::from(phone.never_bound);
            never_bound.push(phone);
        }
        let mut behind = false;
        for r in &phone.rooms {
            s.pairs += 1;
            let acked = acked(r.room);
            if r.cursor >= acked {
                s.caught_up += 1;
                continue;
            }
            behind = true;
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
        if phone.unacked > 0 {
            if phone.state == EndState::Quiet {
                s.unacked_quiet += u64::from(phone.unacked);
                violations.add(
                    Violation {
                        kind: Kind::UnackedPublish,
                        phone: Some(phone.phone.clone()),
                        room: None,
                        detail: format!(
                            "{} publish(es) neither acknowledged nor refused after the drain, \
                             on a live connection",
                            phone.unacked
                        ),
                    },
                    u64::from(phone.unacked),
                );
            } else {
                s.unacked_not_judged += u64::from(phone.unacked);
                behind = true;
            }
        }
        if behind && phone.state != EndState::Quiet {
            s.not_judged += 1;
            if phone.waiting_for_hint {
                s.not_judged_waiting_for_hint += 1;
            } else {
                not_judged.push(phone);
            }
        } else {
            s.phones_judged += 1;
        }
    }
    let mut over = |kind, phones: Vec<&PhoneEnd>, detail: &dyn Fn(&PhoneEnd) -> String| {
        for p in phones {
            let v = Violation {
                kind,
                phone: Some(p.phone.clone()),
                room: None,
                detail: detail(p),
            };
            violations.add(v, 0);
        }
    };
    if s.never_welcomed > thresholds.max_never_welcomed {
        over(Kind::NeverWelcomed, never_welcomed, &|_| {
            format!(
                "no WELCOME on any connection attempt ({} phones, {} tolerated)",
                s.never_welcomed, thresholds.max_never_welcomed
            )
        });
    }
    if s.never_bound > thresholds.max_never_bound {
        over(Kind::NeverBound, never_bound, &|p| {
            format!(
                "{} of its rooms never bound ({} memberships in all, {} tolerated)",
                p.never_bound, s.never_bound, thresholds.max_never_bound
            )
        });
    }
    let unexplained = not_judged.len() as u64;
    if unexplained > thresholds.max_not_judged {
        over(Kind::NotJudged, not_judged, &|p| {
            let state = match p.state {
                EndState::Offline => "offline",
                _ => "still receiving",
            };
            format!(
                "{state} at the end with messages or PUBACKs outstanding ({unexplained} such \
                 phones, {} tolerated)",
                thresholds.max_not_judged
            )
        });
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn check(phones: &[PhoneEnd], t: &Thresholds, v: &mut Violations) -> FinalSummary {
        final_check(|_| 5, phones, |_| "r".into(), t, v)
    }

    fn end(state: EndState, cursor: u64) -> PhoneEnd {
        PhoneEnd::new("1 (u1)", state, vec![RoomEnd { room: 0, cursor }])
    }

    #[test]
    fn quiet_phones_behind_the_acks_lost_messages_silently() {
        let mut v = Violations::default();
        let lenient = Thresholds {
            max_not_judged: 2,
            ..Thresholds::default()
        };
        let s = check(
            &[
                end(EndState::Quiet, 5),
                end(EndState::Receiving, 3),
                end(EndState::Offline, 1),
            ],
            &lenient,
            &mut v,
        );
        assert_eq!(v.total(), 0);
        assert_eq!(
            (s.caught_up, s.behind_receiving, s.behind_offline),
            (1, 1, 1)
        );
        assert_eq!((s.phones_judged, s.not_judged), (1, 2));
        let s = check(&[end(EndState::Quiet, 2)], &lenient, &mut v);
        assert_eq!((s.silent_loss_pairs, s.silent_loss_messages), (1, 3));
        assert_eq!(v.count(Kind::SilentLoss), 1);
        assert!(v.examples[0].detail.contains("3..=5"), "{}", v.examples[0]);
    }

    /// By default every shortfall at the end fails the run, each under its own name; a
    /// phone waiting out a relay's retry hint is explained.
    #[test]
    fn shortfalls_past_their_thresholds_are_violations() {
        let mut v = Violations::default();
        let mut unwelcomed = end(EndState::Offline, 0);
        unwelcomed.welcomed = false;
        let mut unbound = end(EndState::Quiet, 5);
        unbound.never_bound = 2;
        let mut unacked = end(EndState::Quiet, 5);
        unacked.unacked = 3;
        let mut hinted = end(EndState::Offline, 1);
        hinted.waiting_for_hint = true;
        let phones = [
            unwelcomed,
            unbound,
            unacked,
            end(EndState::Receiving, 1),
            hinted,
        ];
        let s = check(&phones, &Thresholds::default(), &mut v);
        for kind in [
            Kind::NeverWelcomed,
            Kind::NeverBound,
            Kind::UnackedPublish,
            Kind::NotJudged,
        ] {
            assert_eq!(v.count(kind), 1, "{kind:?}: {v:?}");
        }
        assert_eq!(v.messages(Kind::UnackedPublish), 3);
        assert_eq!((s.phones, s.phones_judged, s.never_welcomed), (5, 2, 1));
        assert_eq!((s.not_judged, s.not_judged_waiting_for_hint), (2, 1));
        let mut v = Violations::default();
        let tolerant = Thresholds {
            max_never_welcomed: 1,
            max_never_bound: 2,
            max_not_judged: 1,
        };
        check(&phones, &tolerant, &mut v);
        assert_eq!(v.total(), 1, "only the unacknowledged publish: {v:?}");
    }
}
