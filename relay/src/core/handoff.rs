//! Offline hand-off at the room's owner: each accepted message joins its room's window
//! ([`crate::handoff::detect`]); when a window is due, every member whose delivered marker
//! ([`super::receipts`]) has not reached the window's last message gets one [`Handoff`]
//! for the messages past the marker and past the member's join point. The hand-offs leave
//! as outputs ([`Core::drain_handoffs`]); the runtime offers them to the sender without
//! waiting.
//!
//! Cost: nothing per message while `[handoff] url` is empty; otherwise, per message, one
//! comparison and a shared-name clone into the room's open window (a window's allocation
//! happens when it opens, not per message); per window, one marker and one join-point
//! lookup per member.
//!
//! Owns: the scheduler of due windows and the hand-offs waiting to leave. Must not touch:
//! markers (read only), membership (read only), the sender.

use std::collections::BinaryHeap;
use std::time::Instant;

use pabal_codec::Text;

use super::{Core, OwnedRoom};
use crate::cluster::EngineCmd;
use crate::cluster::receipts::HandoffCheck;
use crate::directory::Membership;
use crate::handoff::Handoff;
use crate::handoff::detect::{Due, Noted, Window};
use crate::ids::RoomName;
use crate::sender_name::SenderName;
use crate::stats::inc;

/// The owner's hand-off state.
#[derive(Debug, Default)]
pub(super) struct Detection {
    /// `[handoff] url` is set.
    on: bool,
    /// One entry per room with windows pending (stale ones are skipped when popped).
    due: BinaryHeap<Due>,
    /// Hand-offs for the runtime to take.
    out: Vec<Handoff>,
}

impl Detection {
    pub(super) fn new(on: bool) -> Self {
        Detection {
            on,
            ..Detection::default()
        }
    }

    /// The earliest window due, if any.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|d| d.at)
    }
}

impl Core {
    /// The owner accepted message `seq` of `room` at `ts_ms`, from `publisher`: it joins the
    /// room's open window (or opens one) if the room fires hand-offs. In cluster mode only
    /// this node's own messages do ([`Core::note_own_for_handoff`]): another node decides
    /// the hand-off of its own.
    pub(super) fn note_for_handoff(
        &mut self,
        room: &RoomName,
        seq: u64,
        ts_ms: u64,
        publisher: &SenderName,
    ) {
        if self.cluster.is_none() {
            self.note_window(room, seq, ts_ms, publisher);
        }
    }

    /// Cluster mode: this node's owner got sequence `seq` for its own publish from the
    /// engine; the message joins the room's window here, and nowhere else.
    pub(super) fn note_own_for_handoff(
        &mut self,
        room: &RoomName,
        seq: u64,
        ts_ms: u64,
        publisher: &SenderName,
    ) {
        self.note_window(room, seq, ts_ms, publisher);
    }

    fn note_window(&mut self, room: &RoomName, seq: u64, ts_ms: u64, publisher: &SenderName) {
        if !self.handoff.on {
            return;
        }
        let now = self.now;
        let Some(owned) = self.owned.get_mut(room) else {
            return;
        };
        let handoff = &self.config.handoff;
        // A room with windows fires hand-offs; the rules are read once per window opened.
        let first = match owned.state().and_then(|s| s.handoffs.as_ref()) {
            Some(_) => None,
            None => match handoff.delay_for(room) {
                Some(delay) => Some(delay),
                None => return,
            },
        };
        let delay = || {
            first
                .or_else(|| handoff.delay_for(room))
                .unwrap_or(handoff.delay)
        };
        let message = Noted {
            seq,
            ts_ms,
            publisher: publisher.clone(),
        };
        let epoch = owned.epoch;
        let windows = owned.state_mut().handoffs.get_or_insert_with(Box::default);
        if let Some(at) = windows.note(now, epoch, message, delay) {
            self.handoff.due.push(Due {
                at,
                room: room.clone(),
            });
        }
    }

    /// Hands off every window due at the worker's time (part of [`Core::run_timers`]).
    pub(super) fn run_handoff_timers(&mut self) {
        let now = self.now;
        while let Some(Due { at, .. }) = self.handoff.due.peek()
            && *at <= now
        {
            let Some(Due { at, room }) = self.handoff.due.pop() else {
                break;
            };
            let Some(windows) = self
                .owned
                .get_mut(&room)
                .and_then(|o| o.state_if_any()?.handoffs.as_mut())
            else {
                continue;
            };
            if !windows.claim(at) {
                continue; // stale: the room was rescheduled since
            }
            while let Some(owned) = self.owned.get_mut(&room)
                && let Some(window) = owned
                    .state_if_any()
                    .and_then(|s| s.handoffs.as_mut()?.take_due(now))
            {
                if window.epoch != owned.epoch {
                    continue; // the room's stream restarted: those sequences are gone
                }
                if let Some(side) = self.cluster.as_deref_mut() {
                    // The engine holds every node's markers and who was handed off what:
                    // it decides (`Core::handoffs_owed` takes its answer).
                    side.out.push(EngineCmd::Handoff(HandoffCheck {
                        room: room.clone(),
                        epoch: window.epoch,
                        last: window.last,
                        other: window.other,
                    }));
                    continue;
                }
                let found = owed(
                    &window,
                    &room,
                    owned,
                    &*self.directory,
                    &mut self.handoff.out,
                );
                inc(&self.stats.handoffs_detected, found as u64);
            }
            if let Some(owned) = self.owned.get_mut(&room)
                && let Some(state) = owned.state_if_any()
                && let Some(windows) = state.handoffs.as_mut()
            {
                match windows.schedule() {
                    Some(at) => self.handoff.due.push(Due { at, room }),
                    None if windows.is_empty() => {
                        state.handoffs = None;
                        owned.shed_empty_state();
                    }
                    None => {}
                }
            }
        }
    }

    /// The engine decided a window of this node's (cluster mode): one hand-off per member
    /// it found owed something.
    pub(super) fn handoffs_owed(&mut self, check: &HandoffCheck, owed: Vec<(Text, u64, u64)>) {
        let found = owed.len();
        for (user, first_seq, last_seq) in owed {
            let last = check.ending_at(last_seq);
            self.handoff.out.push(Handoff {
                room: check.room.clone(),
                epoch: check.epoch,
                first_seq,
                last_seq,
                user,
                publisher: last.publisher.text(),
                time_ms: last.ts_ms,
            });
        }
        inc(&self.stats.handoffs_detected, found as u64);
    }

    /// Hands the hand-offs found since the last call to `offer` (the runtime's
    /// [`crate::handoff::HandoffTx::offer`], which never waits).
    pub fn drain_handoffs(&mut self, mut offer: impl FnMut(Handoff)) {
        for h in self.handoff.out.drain(..) {
            offer(h);
        }
    }
}

/// Every member's hand-off for `window` of owned `room`, into `out`; how many.
fn owed(
    window: &Window,
    room: &RoomName,
    owned: &OwnedRoom,
    directory: &dyn Membership,
    out: &mut Vec<Handoff>,
) -> usize {
    let before = out.len();
    for member in &owned.members {
        let delivered = owned
            .state()
            .and_then(|s| s.receipts.as_ref()?.get(member))
            .unwrap_or_default()
            .delivered;
        let done = join_floor(directory, member, room, owned.epoch).max(delivered);
        if let Some((first_seq, last)) = window.owed(member, done) {
            out.push(Handoff {
                room: room.clone(),
                epoch: window.epoch,
                first_seq,
                last_seq: last.seq,
                user: member.text(),
                publisher: last.publisher.text(),
                time_ms: last.ts_ms,
            });
        }
    }
    out.len() - before
}

/// Where `user`'s stream of the room starts: the join point in the room's current epoch (0
/// for a membership from an earlier epoch; `u64::MAX`, nothing owed, for a non-member).
fn join_floor(directory: &dyn Membership, user: &str, room: &RoomName, epoch: u64) -> u64 {
    match directory.join_point(user, room) {
        Some(join) if join.epoch == epoch => join.seq,
        Some(_) => 0,
        None => u64::MAX,
    }
}
