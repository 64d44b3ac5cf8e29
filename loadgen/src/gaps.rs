//! Whether a GAP the relay sent was allowed: the contract lets a relay skip sequences only
//! when its retention (count, bytes or age) dropped them, or when the room's epoch changed.
//!
//! Owns: the retention limits loadgen judges against ([`Retention`]), the record of a GAP a
//! phone received ([`GapSeen`]), and the judgement ([`judge`]). Must not touch: sockets,
//! clocks, the relay's API (the run reads limits through [`crate::api`] and hands them in).
//!
//! # What can be proven from outside
//! loadgen does not see when the relay accepted a message, only a lower bound: the instant
//! the message was meant to be sent (its payload's intended time), and, since sequences are
//! given in acceptance order, the latest intended time of any message at or before it
//! (`L(seq)`, non-decreasing). A GAP `from..=to` received at `T` is explained when one of
//! these necessary conditions holds (a relay that dropped those messages for retention must
//! satisfy it; a GAP that satisfies none was not retention's doing):
//!
//! - **count**: some sequence `H >= to + max_messages` exists with `L(H) <= T` (the room had
//!   grown that far before the GAP);
//! - **bytes**: for the highest such `H > to`, the payload bytes of `to..=H` exceed
//!   `max_bytes` (unknown sizes count as the largest payload of the run);
//! - **age**: `T - L(to) > max_age` (less one second for the relay's wall clock);
//! - **epoch**: the phone was bound in another epoch than the room's first one.
//!
//! These conditions are loose (they never fail a correct relay; a lying relay can hide a
//! GAP only where retention could really have dropped the messages).

use serde::{Deserialize, Serialize};

use crate::ledger::RoomSnapshot;

/// Slack for the relay's wall clock against loadgen's monotonic one, ms.
const AGE_SLACK_MS: u64 = 1_000;

/// A relay's retention limits for one room (PROTOCOL.md, `[retention]` in the relay's
/// configuration; the server API's `GET /v1/rooms/{name}` reports the ones in force).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Messages kept.
    pub max_messages: u64,
    /// Payload bytes kept.
    pub max_bytes: u64,
    /// Age kept, seconds.
    pub max_age_s: u64,
}

impl Retention {
    /// The relay's defaults (`relay/relay.default.toml`).
    pub const RELAY_DEFAULT: Retention = Retention {
        max_messages: 1000,
        max_bytes: 1_048_576,
        max_age_s: 86_400,
    };
}

/// A GAP a phone received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GapSeen {
    /// The phone.
    pub phone: u32,
    /// Room index.
    pub room: u32,
    /// The epoch the phone held the room in.
    pub epoch: u64,
    /// First sequence skipped.
    pub from: u64,
    /// Last sequence skipped.
    pub to: u64,
    /// When it arrived, ms since the start.
    pub at_ms: u64,
}

/// Why a GAP was allowed, or that it was not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Explained {
    /// The room had grown past `max_messages` after the skipped sequences.
    Count,
    /// The messages after the skipped ones exceed `max_bytes`.
    Bytes,
    /// The skipped messages were older than `max_age`.
    Age,
    /// The phone was bound in another epoch.
    Epoch,
    /// Nothing explains it; the text says why.
    Unexplained(String),
}

/// A room's ledger snapshot prepared for judging its GAPs.
#[derive(Debug)]
pub struct RoomGaps {
    /// `L(seq)`: the latest intended time (ms) of any known message at or before `seq`
    /// (index `seq - 1`).
    lower: Vec<u32>,
    /// Payload bytes up to `seq` (index `seq`; unknown sizes at `max_size`).
    cumulative: Vec<u64>,
    epoch: Option<u64>,
}

impl RoomGaps {
    /// Prepares `snap`; `size_of(sender)` is a sender's payload size, `max_size` the largest
    /// of the run.
    pub fn new(snap: &RoomSnapshot, size_of: impl Fn(u32) -> u64, max_size: u64) -> RoomGaps {
        let mut lower = Vec::with_capacity(snap.slots.len());
        let mut cumulative = Vec::with_capacity(snap.slots.len() + 1);
        cumulative.push(0);
        let (mut l, mut bytes) = (0u32, 0u64);
        for &(msg, intended_ms) in &snap.slots {
            let size = match msg {
                Some(m) => {
                    l = l.max(intended_ms);
                    size_of(m.sender)
                }
                None => max_size,
            };
            bytes += size;
            lower.push(l);
            cumulative.push(bytes);
        }
        RoomGaps {
            lower,
            cumulative,
            epoch: snap.epoch,
        }
    }

    /// Judges one GAP against `retention`.
    pub fn judge(&self, gap: &GapSeen, retention: &Retention) -> Explained {
        if self.epoch.is_some_and(|e| e != gap.epoch) {
            return Explained::Epoch;
        }
        // The highest sequence the relay can have had before the GAP arrived.
        let known_before = self.lower.partition_point(|&l| u64::from(l) <= gap.at_ms) as u64;
        if known_before >= gap.to.saturating_add(retention.max_messages) {
            return Explained::Count;
        }
        let bytes = if known_before > gap.to && (gap.to as usize) <= self.lower.len() {
            self.cumulative[known_before as usize] - self.cumulative[(gap.to - 1) as usize]
        } else {
            0
        };
        if bytes > retention.max_bytes {
            return Explained::Bytes;
        }
        let oldest = self
            .lower
            .get((gap.to.max(1) - 1) as usize)
            .or(self.lower.last())
            .map_or(0, |&l| u64::from(l));
        let age_ms = gap.at_ms.saturating_sub(oldest);
        if age_ms + AGE_SLACK_MS > retention.max_age_s.saturating_mul(1000) {
            return Explained::Age;
        }
        Explained::Unexplained(format!(
            "GAP {}..={} at {:.1} s: the room had at most {known_before} messages by then (keeps \
             {}), {bytes} B after the gap (keeps {}), the last skipped one was at most {:.1} s \
             old (keeps {} s)",
            gap.from,
            gap.to,
            gap.at_ms as f64 / 1000.0,
            retention.max_messages,
            retention.max_bytes,
            age_ms as f64 / 1000.0,
            retention.max_age_s
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use crate::ledger::Msg;

    /// A room of `n` messages of 100 B, message `i` meant at `i * 1000` ms.
    fn room(n: u32) -> RoomGaps {
        let snap = RoomSnapshot {
            slots: (1..=n)
                .map(|i| {
                    (
                        Some(Msg {
                            sender: 0,
                            counter: i,
                        }),
                        i * 1000,
                    )
                })
                .collect(),
            acked: u64::from(n),
            epoch: Some(7),
        };
        RoomGaps::new(&snap, |_| 100, 1000)
    }

    fn gap(to: u64, at_ms: u64) -> GapSeen {
        GapSeen {
            phone: 0,
            room: 0,
            epoch: 7,
            from: 1,
            to,
            at_ms,
        }
    }

    const LOTS: Retention = Retention {
        max_messages: 1000,
        max_bytes: 1_000_000,
        max_age_s: 3600,
    };

    #[test]
    fn a_gap_over_retained_messages_is_unexplained() {
        let r = room(50);
        assert!(matches!(
            r.judge(&gap(10, 60_000), &LOTS),
            Explained::Unexplained(_)
        ));
    }

    #[test]
    fn count_bytes_and_age_each_explain_a_gap_when_they_can() {
        let r = room(50);
        let count = Retention {
            max_messages: 20,
            ..LOTS
        };
        assert_eq!(r.judge(&gap(10, 60_000), &count), Explained::Count);
        // Only messages meant before the GAP arrived count: at 25 s the room had 25.
        assert!(matches!(
            r.judge(&gap(10, 25_000), &count),
            Explained::Unexplained(_)
        ));
        let bytes = Retention {
            max_bytes: 3000,
            ..LOTS
        };
        // 10..=50 is 41 messages, 4,100 B.
        assert_eq!(r.judge(&gap(10, 60_000), &bytes), Explained::Bytes);
        let age = Retention {
            max_age_s: 30,
            ..LOTS
        };
        // Message 10 was meant at 10 s: at 60 s it is 50 s old.
        assert_eq!(r.judge(&gap(10, 60_000), &age), Explained::Age);
        assert!(matches!(
            r.judge(&gap(10, 30_000), &age),
            Explained::Unexplained(_)
        ));
    }

    #[test]
    fn another_epoch_explains_a_gap() {
        let r = room(5);
        let g = GapSeen {
            epoch: 8,
            ..gap(3, 1000)
        };
        assert_eq!(r.judge(&g, &LOTS), Explained::Epoch);
    }
}
