//! Bounded per-room history: the recent messages of one room, capped by count, payload
//! bytes and age, and paged out to connections that resume or lag.
//!
//! Owns: the ring of [`StoredRef`]s and the paging arithmetic. Holds the same shared
//! payloads that were delivered (no second copy). Must not touch connections or cores.

use std::collections::VecDeque;

use crate::config::Retention;
use crate::ids::StoredRef;

/// One room's retained messages, in sequence order without holes.
#[derive(Debug)]
pub struct History {
    msgs: VecDeque<StoredRef>,
    bytes: usize,
    retention: Retention,
}

/// What a page request yields besides the messages themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageInfo {
    /// Sequences after the cursor that are no longer kept: `from..=to`.
    pub gap: Option<(u64, u64)>,
    /// The page reaches the head: the reader is caught up.
    pub complete: bool,
}

impl History {
    /// Empty history under `retention`.
    pub const fn new(retention: Retention) -> Self {
        History {
            msgs: VecDeque::new(),
            bytes: 0,
            retention,
        }
    }

    /// Appends the next message (its sequence must follow the last one) and evicts what the
    /// limits no longer allow.
    pub fn push(&mut self, msg: StoredRef, now_ms: u64) {
        debug_assert!(self.msgs.back().is_none_or(|last| last.seq + 1 == msg.seq));
        self.bytes += msg.payload.len();
        self.msgs.push_back(msg);
        while self.msgs.len() > self.retention.max_messages
            || (self.bytes > self.retention.max_bytes && self.msgs.len() > 1)
        {
            self.pop_front();
        }
        self.evict_expired(now_ms);
    }

    /// Forgets every message (the room starts a new epoch).
    pub fn clear(&mut self) {
        self.msgs.clear();
        self.bytes = 0;
    }

    /// Applies new limits (a reload), evicting what they no longer allow.
    pub fn set_retention(&mut self, retention: Retention) {
        self.retention = retention;
        while self.msgs.len() > retention.max_messages
            || (self.bytes > retention.max_bytes && self.msgs.len() > 1)
        {
            self.pop_front();
        }
    }

    /// Drops messages older than the age limit.
    pub fn evict_expired(&mut self, now_ms: u64) {
        let max_age = self.retention.max_age.as_millis() as u64;
        while self
            .msgs
            .front()
            .is_some_and(|m| m.ts_ms.saturating_add(max_age) < now_ms)
        {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some(m) = self.msgs.pop_front() {
            self.bytes -= m.payload.len();
        }
    }

    /// The oldest sequence kept, if any.
    pub fn first_seq(&self) -> Option<u64> {
        self.msgs.front().map(|m| m.seq)
    }

    /// Messages kept.
    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Payload bytes kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Appends to `out` the messages after `after`, up to about `max_bytes` of payload and
    /// `max_msgs` messages (at least one message), given the room's `head`. Reports the range
    /// lost to retention.
    pub fn page(
        &self,
        after: u64,
        head: u64,
        max_bytes: usize,
        max_msgs: usize,
        out: &mut Vec<StoredRef>,
    ) -> PageInfo {
        if after >= head {
            return PageInfo {
                gap: None,
                complete: true,
            };
        }
        let first = self.first_seq().unwrap_or(head + 1);
        let gap = (after + 1 < first).then(|| (after + 1, (first - 1).min(head)));
        let start = (after + 1).max(first);
        if start > head {
            return PageInfo {
                gap,
                complete: true,
            };
        }
        let mut taken_bytes = 0;
        let mut last = start - 1;
        for (taken, msg) in self.msgs.iter().skip((start - first) as usize).enumerate() {
            if (taken_bytes >= max_bytes || taken >= max_msgs) && last >= start {
                break;
            }
            taken_bytes += msg.payload.len() + 16;
            last = msg.seq;
            out.push(msg.clone());
        }
        PageInfo {
            gap,
            complete: last >= head,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use pabal_codec::Text;

    use super::*;
    use crate::ids::Stored;

    fn msg(seq: u64, ts_ms: u64, len: usize) -> StoredRef {
        Arc::new(Stored {
            seq,
            ts_ms,
            accepted_at: std::time::Instant::now(),
            sender: Text::from("u").into(),
            origin: None,
            payload: Bytes::from(vec![0u8; len]),
        })
    }

    fn retention(n: usize, bytes: usize, age_s: u64) -> Retention {
        Retention {
            max_messages: n,
            max_bytes: bytes,
            max_age: Duration::from_secs(age_s),
        }
    }

    #[test]
    fn count_bytes_and_age_limits_evict_the_oldest() {
        let mut h = History::new(retention(3, 1000, 60));
        for seq in 1..=5 {
            h.push(msg(seq, 0, 10), 0);
        }
        assert_eq!((h.first_seq(), h.len()), (Some(3), 3));
        let mut h = History::new(retention(100, 25, 60));
        for seq in 1..=5 {
            h.push(msg(seq, 0, 10), 0);
        }
        assert_eq!((h.first_seq(), h.bytes()), (Some(4), 20));
        let mut h = History::new(retention(100, 1000, 1));
        h.push(msg(1, 0, 1), 0);
        h.push(msg(2, 1500, 1), 1500);
        h.evict_expired(2_001);
        assert_eq!(h.first_seq(), Some(2));
    }

    #[test]
    fn pages_report_gaps_and_completion() {
        let mut h = History::new(retention(5, 1 << 20, 60));
        for seq in 1..=10 {
            h.push(msg(seq, 0, 100), 0);
        }
        // Kept: 6..=10. A reader at 2 lost 3..=5.
        let mut out = Vec::new();
        let info = h.page(2, 10, 1 << 20, usize::MAX, &mut out);
        assert_eq!(info.gap, Some((3, 5)));
        assert!(info.complete);
        assert_eq!(
            out.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![6, 7, 8, 9, 10]
        );
        // Paged by bytes: at least one message per page, never skipping.
        let mut out = Vec::new();
        let info = h.page(7, 10, 1, usize::MAX, &mut out);
        assert_eq!((info.gap, info.complete), (None, false));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].seq, 8);
        // Paged by count.
        let mut out = Vec::new();
        assert!(!h.page(5, 10, 1 << 20, 2, &mut out).complete);
        assert_eq!(out.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![6, 7]);
        // Caught up already.
        let mut out = Vec::new();
        assert!(h.page(10, 10, 100, usize::MAX, &mut out).complete);
        assert!(out.is_empty());
    }

    #[test]
    fn a_reader_past_everything_kept_gets_only_a_gap() {
        let h = History::new(retention(5, 1 << 20, 60));
        let mut out = Vec::new();
        // Head 7 but nothing kept (e.g. all expired).
        let info = h.page(3, 7, 100, usize::MAX, &mut out);
        assert_eq!(info.gap, Some((4, 7)));
        assert!(info.complete && out.is_empty());
    }
}
