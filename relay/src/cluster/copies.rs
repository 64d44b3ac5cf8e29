//! This worker's answered publishes and their copies on the room's channel, per shard: an
//! answer is handed to the worker only once its copy was read.
//!
//! A publish's script answers on the command connection and publishes the message on the
//! room's pub/sub connection; nothing orders the two as they arrive. What the channel
//! carried before the copy includes every removal placed before the message
//! ([`super::RemovalMark`]). Held until its copy is read, an answer reaches the worker after
//! all of that, so the message may enter the room's order from the answer
//! (`EngineEvent::Published { ordered: true }`) and no removal before it is passed over.
//! Redis queues a script's pushes and its reply in the same loop, so the hold is expected
//! to cost a pass of the engine at most (benches/RESULTS.md, Session 15: no difference at
//! 1,000 msg/s).
//!
//! Redis runs one shard's scripts one at a time: their answers and their copies come in the
//! same order, so a copy is found at the front of what is due, and what is before it will
//! get no copy (its room was unsubscribed meanwhile). An answer whose copy will not come
//! (that, the pub/sub connection lost, the shard gone from a new slot map, or
//! [`COPY_WAIT`] passed) goes to the worker marked unordered: the message then enters the
//! room's order from the stream.
//!
//! A copy read before its answer is handed over as any message is (the worker resolves the
//! publish from it and drops the answer), except while `cluster.wait_replicas` holds
//! acknowledgements: then the copy is dropped and remembered, and the answer, once `WAIT`
//! releases it, goes at once.
//!
//! Owns: the tickets and the held answers. Must not touch: connections.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::EngineEvent;

/// Tickets remembered per shard (answered with their copy due, or copies read before
/// their answer); past it the oldest is forgotten (an answer then goes unordered, a copy is
/// handed over as any message is).
const COPIES_MAX: usize = 4096;

/// How long an answer waits for its copy before it goes to the worker unordered (its
/// message then read from the stream): a pub/sub connection far behind its command
/// connection must not hold PUBACKs for long.
pub(crate) const COPY_WAIT: Duration = Duration::from_millis(100);

/// One shard's answered publishes and copies (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Copies {
    /// Answered publishes (not repeats) whose copy has not been read, in the order Redis
    /// ran them.
    due: Tickets,
    /// Copies read before their answer.
    early: Tickets,
    /// Answers ready for the worker, in the order Redis ran them, held while the first
    /// of them still waits for its copy: with when each became ready, and whether it
    /// stays ordered (its copy will come, or came).
    waiting: VecDeque<Held>,
}

/// Tickets in the order they came, at most [`COPIES_MAX`] (the oldest forgotten), with a
/// set beside them: a look-up per answer and per copy costs one hash, however many wait.
#[derive(Debug, Default)]
struct Tickets {
    order: VecDeque<u64>,
    set: HashSet<u64>,
}

impl Tickets {
    fn contains(&self, ticket: u64) -> bool {
        self.set.contains(&ticket)
    }

    fn push(&mut self, ticket: u64) {
        if self.order.len() >= COPIES_MAX
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        if self.set.insert(ticket) {
            self.order.push_back(ticket);
        }
    }

    /// Forgets `ticket`; whether it was there.
    fn remove(&mut self, ticket: u64) -> bool {
        if !self.set.remove(&ticket) {
            return false;
        }
        if let Some(at) = self.order.iter().position(|&t| t == ticket) {
            self.order.remove(at);
        }
        true
    }

    /// Forgets `ticket` and every one before it; those before it, in order.
    fn take_through(&mut self, ticket: u64) -> Vec<u64> {
        let mut before = Vec::new();
        while let Some(t) = self.order.pop_front() {
            self.set.remove(&t);
            if t == ticket {
                break;
            }
            before.push(t);
        }
        before
    }

    fn clear(&mut self) {
        self.order.clear();
        self.set.clear();
    }
}

/// An answer held in [`Copies::waiting`].
#[derive(Debug)]
struct Held {
    ticket: u64,
    since: Instant,
    event: EngineEvent,
    ordered: bool,
}

impl Copies {
    /// Redis answered publish `ticket` (and published it on its room's channel).
    pub(crate) fn answered(&mut self, ticket: u64) {
        if !self.early.remove(ticket) {
            self.due.push(ticket);
        }
    }

    /// An answer is ready for the worker (at once, or once `WAIT` released it): it goes
    /// to `out` if its copy was read (or is not due: a repeat) and no earlier answer is
    /// held, else it is held behind them (answers reach the worker in the order Redis ran
    /// them: a repeat's answer never passes the first publish's).
    pub(crate) fn ready(
        &mut self,
        ticket: u64,
        event: EngineEvent,
        now: Instant,
        out: &mut Vec<EngineEvent>,
    ) {
        if self.waiting.is_empty() && !self.due.contains(ticket) {
            return out.push(event);
        }
        self.waiting.push_back(Held {
            ticket,
            since: now,
            event,
            ordered: true,
        });
    }

    /// The copy of this worker's publish `ticket` was read. Returns whether its answer
    /// came first (the copy is then dropped: the answer carries it), having handed over
    /// the answers it released; `false` when the answer has not come (the copy is
    /// remembered).
    pub(crate) fn copy_read(&mut self, ticket: u64, out: &mut Vec<EngineEvent>) -> bool {
        if !self.due.contains(ticket) {
            self.early.push(ticket);
            return false;
        }
        // Those before it get no copy: their answers go unordered.
        for skipped in self.due.take_through(ticket) {
            if let Some(held) = self.waiting.iter_mut().find(|h| h.ticket == skipped) {
                held.ordered = false;
            }
        }
        self.release(out);
        true
    }

    /// Hands over the held answers from the first on, up to one whose copy is still due.
    fn release(&mut self, out: &mut Vec<EngineEvent>) {
        while self
            .waiting
            .front()
            .is_some_and(|h| !self.due.contains(h.ticket))
        {
            if let Some(held) = self.waiting.pop_front() {
                out.push(held.into_event());
            }
        }
    }

    /// The shard's pub/sub connection was lost (or the shard left the slot map): no copy
    /// due will come, and the answers held go to the worker unordered.
    pub(crate) fn lost(&mut self, out: &mut Vec<EngineEvent>) {
        self.due.clear();
        self.early.clear();
        out.extend(self.waiting.drain(..).map(|h| unordered(h.event)));
    }

    /// Answers that waited [`COPY_WAIT`] for their copies go to the worker unordered
    /// (their copies, should they come, are dropped), with those held behind them that
    /// are not waiting for one. Returns when the next one is due.
    pub(crate) fn expire(&mut self, now: Instant, out: &mut Vec<EngineEvent>) -> Option<Instant> {
        while let Some(since) = self.waiting.front().map(|h| h.since) {
            if now.saturating_duration_since(since) < COPY_WAIT {
                return Some(since + COPY_WAIT);
            }
            // Its ticket stays due: the copy, should it come, is dropped.
            if let Some(held) = self.waiting.pop_front() {
                out.push(unordered(held.event));
            }
            self.release(out);
        }
        None
    }
}

impl Held {
    fn into_event(self) -> EngineEvent {
        if self.ordered {
            self.event
        } else {
            unordered(self.event)
        }
    }
}

/// `event` (a publish's answer) marked as not ordered after its copy.
fn unordered(mut event: EngineEvent) -> EngineEvent {
    if let EngineEvent::Published { ordered, .. } = &mut event {
        *ordered = false;
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(ticket: u64) -> EngineEvent {
        EngineEvent::Published {
            ticket,
            epoch: 1,
            seq: ticket,
            repeated: false,
            ordered: true,
        }
    }

    fn tickets(out: &[EngineEvent]) -> Vec<(u64, bool)> {
        out.iter()
            .filter_map(|e| match e {
                EngineEvent::Published {
                    ticket, ordered, ..
                } => Some((*ticket, *ordered)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_answer_waits_for_its_copy_and_earlier_ones_without_a_copy_go_unordered() {
        let (mut copies, now, mut out) = (Copies::default(), Instant::now(), Vec::new());
        for t in [1, 2, 3] {
            copies.answered(t);
            copies.ready(t, answer(t), now, &mut out);
        }
        assert!(out.is_empty(), "every answer waits for its copy");
        // 1's copy never came (its room was let go): 2's copy releases both.
        assert!(copies.copy_read(2, &mut out));
        assert_eq!(tickets(&out), [(1, false), (2, true)]);
        out.clear();
        assert!(copies.copy_read(3, &mut out));
        assert_eq!(tickets(&out), [(3, true)]);
        assert!(copies.due.order.is_empty() && copies.waiting.is_empty());
    }

    #[test]
    fn answers_reach_the_worker_in_the_order_redis_ran_them() {
        let (mut copies, now, mut out) = (Copies::default(), Instant::now(), Vec::new());
        copies.answered(1);
        copies.ready(1, answer(1), now, &mut out);
        // 2's copy was read before its answer; 3 is a repeat (no copy): both wait behind 1.
        assert!(!copies.copy_read(2, &mut out));
        copies.answered(2);
        copies.ready(2, answer(2), now, &mut out);
        copies.ready(3, answer(3), now, &mut out);
        assert!(out.is_empty(), "nothing passes 1");
        assert!(copies.copy_read(1, &mut out));
        assert_eq!(tickets(&out), [(1, true), (2, true), (3, true)]);
    }

    #[test]
    fn a_copy_read_before_its_answer_lets_the_answer_go_at_once() {
        let (mut copies, now, mut out) = (Copies::default(), Instant::now(), Vec::new());
        assert!(!copies.copy_read(7, &mut out), "no answer yet: handed over");
        copies.answered(7);
        copies.ready(7, answer(7), now, &mut out);
        assert_eq!(tickets(&out), [(7, true)]);
        assert!(copies.due.order.is_empty() && copies.early.order.is_empty());
    }

    #[test]
    fn answers_go_unordered_when_the_connection_is_lost_or_the_copy_is_late() {
        let (mut copies, now, mut out) = (Copies::default(), Instant::now(), Vec::new());
        copies.answered(1);
        copies.ready(1, answer(1), now, &mut out);
        assert_eq!(copies.expire(now, &mut out), Some(now + COPY_WAIT));
        assert!(out.is_empty());
        assert_eq!(copies.expire(now + COPY_WAIT, &mut out), None);
        assert_eq!(tickets(&out), [(1, false)]);
        out.clear();
        copies.answered(2);
        copies.ready(2, answer(2), now, &mut out);
        copies.lost(&mut out);
        assert_eq!(tickets(&out), [(2, false)]);
        assert!(copies.due.order.is_empty() && copies.due.set.is_empty());
    }

    #[test]
    fn what_is_remembered_is_bounded() {
        let (mut copies, mut out) = (Copies::default(), Vec::new());
        for t in 0..(COPIES_MAX as u64 + 10) {
            copies.answered(t);
            copies.copy_read(1_000_000 + t, &mut out);
        }
        assert_eq!(
            (copies.due.order.len(), copies.due.set.len()),
            (COPIES_MAX, COPIES_MAX)
        );
        assert_eq!(copies.early.set.len(), COPIES_MAX);
        assert!(!copies.copy_read(0, &mut out), "the oldest was forgotten");
    }
}
