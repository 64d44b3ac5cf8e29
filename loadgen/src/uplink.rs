//! How long each recent message spent in its sender's emulated uplink, shared by every
//! worker so the receiver of a delivery can subtract the link's share from its latency.
//!
//! Owns: a fixed ring of `(counter, µs)` slots per sender (about 16 MiB in all, allocated
//! once). Must not touch: sockets, the ledger. A receiver that finds another counter in the
//! slot (the ring wrapped) counts the delivery as `link_unknown`.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::plan::Plan;

/// The uplink time of recent messages, per sender, readable by every worker: a ring of
/// `(counter, µs)` slots per sender. A receiver that finds another counter in the slot (the
/// ring wrapped) counts the delivery as `link_unknown`.
#[derive(Debug)]
pub struct UplinkTimes {
    slots: Vec<AtomicU64>,
    base: Vec<u32>,
    ring: usize,
}

impl UplinkTimes {
    /// Slots for every sender of `plan`.
    pub fn new(plan: &Plan) -> UplinkTimes {
        let senders = plan
            .phones
            .iter()
            .filter(|p| p.send.is_some())
            .count()
            .max(1);
        // About 2M slots (16 MiB) in all, 16 to 1024 per sender.
        let ring = ((1usize << 21) / senders)
            .clamp(16, 1024)
            .next_power_of_two()
            / 2;
        let ring = ring.max(16);
        let mut next = 0u32;
        let base = plan
            .phones
            .iter()
            .map(|p| {
                if p.send.is_some() {
                    next += 1;
                    next - 1
                } else {
                    u32::MAX
                }
            })
            .collect();
        UplinkTimes {
            slots: (0..next as usize * ring)
                .map(|_| AtomicU64::new(0))
                .collect(),
            base,
            ring,
        }
    }

    fn slot(&self, sender: u32, counter: u32) -> Option<&AtomicU64> {
        let base = *self.base.get(sender as usize)?;
        if base == u32::MAX {
            return None;
        }
        self.slots
            .get(base as usize * self.ring + counter as usize % self.ring)
    }

    /// Records that `sender`'s message `counter` spent `ns` in its uplink.
    pub fn store(&self, sender: u32, counter: u32, ns: u64) {
        if let Some(slot) = self.slot(sender, counter) {
            let us = (ns / 1000).min(u64::from(u32::MAX));
            slot.store((u64::from(counter) << 32) | us, Ordering::Release);
        }
    }

    /// The uplink time of `sender`'s message `counter`, ns, if still known.
    pub fn load(&self, sender: u32, counter: u32) -> Option<u64> {
        let v = self.slot(sender, counter)?.load(Ordering::Acquire);
        ((v >> 32) as u32 == counter && counter != 0).then_some((v & 0xffff_ffff) * 1000)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use crate::plan::SendPlan;

    #[test]
    fn uplink_times_are_found_by_counter_until_the_ring_wraps() {
        let mut b = crate::plan::PlanBuilder::new();
        let r = b.room("r", false);
        b.phone(
            "a",
            crate::link::LinkProfile::unshaped("u"),
            &[r],
            Some(SendPlan::to_rooms(&[r], 1.0, 20)),
        );
        b.phone("b", crate::link::LinkProfile::unshaped("u"), &[r], None);
        let t = UplinkTimes::new(&b.build());
        t.store(0, 1, 5_000_000);
        assert_eq!(t.load(0, 1), Some(5_000_000));
        assert_eq!(t.load(0, 2), None);
        assert_eq!(t.load(1, 1), None, "not a sender");
        t.store(0, 1 + t.ring as u32, 1_000);
        assert_eq!(t.load(0, 1), None, "overwritten");
    }
}
