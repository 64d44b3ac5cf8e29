//! The engine's side of a user across nodes ([`crate::cluster::presence`]): this
//! worker's presence entries (claimed at HELLO, rewritten when connections close, renewed
//! every third of the lease) and the server API's lookups.
//!
//! Owns: the worker's presence field, the renewal timer. Must not
//! touch: rooms' channels or publishes, users' notice subscriptions (`members.rs`).

use std::time::{Duration, Instant};

use super::super::membership as m;
use super::super::resp::Value;
use super::super::{ClaimOutcome, EngineCmd, EngineEvent};
use super::Engine;
use super::members::Step;

/// One worker's presence in the engine.
pub(super) struct PresenceState {
    /// `node/worker/run`: this worker's field in every user's presence hash (a new run of
    /// the node writes new fields; the old run's expire with their lease).
    pub(super) field: Vec<u8>,
    /// `cluster.presence_lease` in ms.
    pub(super) lease_ms: u64,
    /// The next renewal of every entry.
    renew_at: Instant,
}

impl PresenceState {
    pub(super) fn new(node_id: &str, worker: usize, lease: Duration) -> Self {
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        PresenceState {
            field: format!("{node_id}/{worker}/{run}").into_bytes(),
            lease_ms: lease.as_millis() as u64,
            renew_at: Instant::now() + lease / 3,
        }
    }
}

impl Engine {
    pub(super) fn on_presence_cmd(&mut self, cmd: EngineCmd) {
        match cmd {
            EngineCmd::Claim { ticket, user, max } => {
                // Counted from the moment it is sent: a count written meanwhile includes
                // it (the connection is FIFO, so Redis sees the claim first).
                match self.users.get_mut(&m::notice_channel(&user)) {
                    Some(w) => {
                        w.conns += 1;
                        self.send_step(Step::Claim { ticket, user, max }, None, 0);
                    }
                    // A claim comes after the user's watch; without one it cannot count.
                    None => self.out.push(EngineEvent::Claimed {
                        ticket,
                        outcome: ClaimOutcome::Failed,
                    }),
                }
            }
            EngineCmd::Release { user, closed } => {
                if let Some(w) = self.users.get_mut(&m::notice_channel(&user)) {
                    w.conns = w.conns.saturating_sub(closed);
                    self.send_step(Step::SetPresence { user }, None, 0);
                }
                // Not watched any more: the unwatch deleted the entry.
            }
            EngineCmd::Lookup { ticket, lookup } => {
                self.send_step(Step::Lookup { ticket, lookup }, None, 0)
            }
            other => tracing::error!(?other, "not a presence command"),
        }
    }

    pub(super) fn on_presence_reply(&mut self, step: Step, reply: &Value) {
        match step {
            Step::Claim { ticket, user, .. } => {
                let answer = reply
                    .array()
                    .and_then(|a| Some((a.first()?.int()?, a.get(1)?.int()?)));
                let outcome = match answer {
                    Some((1, _)) => ClaimOutcome::Granted,
                    Some((0, total)) => {
                        self.claim_undone(&user);
                        ClaimOutcome::Refused {
                            connections: total.max(0) as u64,
                        }
                    }
                    _ => {
                        tracing::warn!(worker = self.worker, reply = ?reply, "a malformed answer to a presence claim");
                        self.claim_undone(&user);
                        ClaimOutcome::Failed
                    }
                };
                self.out.push(EngineEvent::Claimed { ticket, outcome });
            }
            Step::SetPresence { .. } => {}
            Step::Lookup { ticket, lookup } => {
                let answer = lookup.parse(reply);
                if answer.is_none() {
                    tracing::warn!(worker = self.worker, reply = ?reply, "a malformed answer to a lookup");
                }
                self.out.push(EngineEvent::LookedUp { ticket, answer });
            }
            _ => {}
        }
    }

    /// A claim that did not count (refused, or unanswered): the worker's count goes back
    /// and is written again (a count written while the claim was in flight included it).
    pub(super) fn claim_undone(&mut self, user: &pabal_codec::Text) {
        if let Some(w) = self.users.get_mut(&m::notice_channel(user)) {
            w.conns = w.conns.saturating_sub(1);
            self.send_step(Step::SetPresence { user: user.clone() }, None, 0);
        }
    }

    /// Renews this worker's presence entries when due; returns when it must run next.
    pub(super) fn presence_timers(&mut self, now: Instant) -> Instant {
        if now >= self.presence.renew_at {
            let lease = Duration::from_millis(self.presence.lease_ms);
            self.presence.renew_at = now + lease / 3;
            let users: Vec<_> = self
                .users
                .values()
                .filter(|w| w.conns > 0)
                .map(|w| w.user.clone())
                .collect();
            for user in users {
                self.send_step(Step::SetPresence { user }, None, 0);
            }
        }
        self.presence.renew_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workers_field_names_its_node_worker_and_run() {
        let state = PresenceState::new("n1", 3, Duration::from_secs(30));
        let field = String::from_utf8(state.field).unwrap_or_default();
        let parts: Vec<&str> = field.split('/').collect();
        assert_eq!(parts.len(), 3, "{field}");
        assert_eq!(&parts[..2], &["n1", "3"]);
        assert!(parts[2].parse::<u128>().is_ok_and(|run| run > 0), "{field}");
        assert_eq!(state.lease_ms, 30_000);
    }
}
