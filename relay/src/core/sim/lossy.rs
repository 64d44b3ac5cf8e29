//! Writes Redis lost, opt-in (`redis::Engine::lose_writes`, the cluster's lossy seeded
//! test): a failover to a replica behind, or a restart from an AOF not synced. The model
//! Redis loses a room's last one to three messages (only past every membership change of
//! the room and past what the stream trimmed, so the model's membership intervals stay
//! right): the room's sequence goes back, their stream entries and repeat keys are gone,
//! their bodies stay the truth phones that got them are checked against, and every node
//! loses both connections (reconnecting later, as after any lost connection). `RAISE` and
//! a publish's owner head (`script::RAISE`, `script::PUBLISH`) move the room's sequence up
//! for real, the sequences between staying lost.
//!
//! A publish given a lost write's sequence again is judged right after Redis ran it: where
//! some node's owner holds the room at or past it, or a phone got it (delivered or
//! acknowledged), it is the documented residual race (ARCHITECTURE.md, "Writes Redis
//! lost": a publish through a node behind another node's head, run before that node's
//! raise), and the run ends there, inconclusive and counted; otherwise nobody has the lost
//! body, the new body is the sequence's truth and the sequence is no longer lost. A lost
//! body that was still on its way and reaches a phone after its sequence went to another
//! body is the same race, found late. So is a removal Redis placed below a node owner's
//! head (the room's sequence went back): that owner may never apply it, and a delivery to
//! the removed user past its place ends the run the same way. What the checker allows in this mode: a GAP over a
//! lost sequence, a member missing one (or a drain's cursor before one), a lost sequence
//! reaching a user who was a member when it was lost (a removal Redis placed after the
//! loss comes before it in the room's order), a body that is in its room twice once at a
//! lost sequence (the publish failed with the failover, and the phone sent it again). What
//! it adds: an owner's history reaches its head (`check_history_ends`).
//!
//! Owns: test scaffolding only. Must not touch: anything outside tests.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use pabal_codec::Text;

use super::redis::{EPOCH, Engine, Fault, Room};
use super::{Sim, Violation};

/// What a room lost.
#[derive(Default)]
pub(super) struct Losses {
    /// The highest head at which the room's membership changed (a join point, the end of
    /// a membership, a removal's place): no write at or below it is lost.
    changed_at: u64,
    /// Sequences lost and not given again (their bodies stay in `Room::bodies`).
    lost: BTreeSet<u64>,
    /// The bodies lost sequences had before Redis gave them to another body.
    replaced: HashMap<u64, Vec<Bytes>>,
}

impl Losses {
    /// The room's membership changed at `head`.
    pub(super) fn changed(&mut self, head: u64) {
        self.changed_at = self.changed_at.max(head);
    }
}

/// A publish Redis gave a lost write's sequence.
#[derive(Debug)]
pub(super) struct Reuse {
    pub(super) room: u64,
    pub(super) seq: u64,
    pub(super) body: Bytes,
    /// The owner's head the publish named.
    pub(super) owner_head: Option<(u64, u64)>,
    /// The worker whose engine sent it.
    pub(super) node: usize,
}

/// What the lossy runs did, and how one ended.
#[derive(Default, Debug)]
pub(super) struct Tally {
    /// Failovers that lost writes (or none, where the room had none to lose).
    pub(super) failovers: u64,
    /// Sequences lost.
    pub(super) lost: u64,
    /// Lost sequences given again to another body while nobody had the lost one.
    pub(super) given_again: u64,
    /// The run ended at the documented residual race: what was found.
    pub(super) residual: Option<String>,
    /// The members of each lost sequence's room when Redis lost it, by (room id, seq).
    members: HashMap<(u64, u64), Vec<Text>>,
    /// Removals Redis placed below an owner's head, by (room id, user): (place's
    /// sequence, the owner's worker, its head then).
    removals_below: HashMap<(u64, Text), (u64, usize, u64)>,
}

/// Moves the room's sequence up to `head` (`RAISE`, or a publish's owner head): the
/// sequences in between stay lost.
pub(super) fn raise_to(room: &mut Room, head: u64) {
    assert!(
        usize::try_from(head).unwrap() <= room.bodies.len(),
        "{:?} raised to {head}, past any sequence Redis gave ({})",
        room.name,
        room.bodies.len()
    );
    room.head = room.head.max(head);
}

impl Engine {
    /// Redis fails over to a replica that lacks room `room_index`'s last `k` writes (fewer
    /// where a membership change or the stream's trim comes first; `Fault::LoseWrites`).
    /// Every node loses both its connections.
    pub(super) fn fail_over(&mut self, room_index: usize, k: u64) {
        let k = k.min(self.losable(room_index));
        let i = room_index % self.rooms.len();
        let room = &mut self.rooms[i];
        let head = room.head - k;
        room.losses.lost.extend(head + 1..=room.head);
        room.head = head;
        room.stream.retain(|item| item.place().0 <= head);
        room.window.retain(|_, seq| *seq <= head);
        for node in 0..self.nodes_len() {
            self.fault(node, Fault::LoseCommands);
            self.fault(node, Fault::LosePubSub);
        }
    }

    /// How many of room `room_index`'s last writes a failover may lose: those past every
    /// membership change of the room and past what its stream trimmed.
    pub(super) fn losable(&self, room_index: usize) -> u64 {
        let room = &self.rooms[room_index % self.rooms.len()];
        let floor = room.losses.changed_at.max(room.trimmed);
        room.head.saturating_sub(floor)
    }

    /// `RAISE`: the room's sequence moves up to the owner's head, in its epoch only.
    pub(super) fn raise(&mut self, room_id: u64, epoch: u64, head: u64) {
        if epoch == EPOCH && !self.raise_ignored {
            raise_to(self.room_mut(room_id), head);
        }
    }

    /// Sequence `seq` of the room is a lost write's, not given again.
    pub(super) fn is_lost(&self, room_id: u64, seq: u64) -> bool {
        self.lose_writes && self.room(room_id).losses.lost.contains(&seq)
    }

    /// `body` was sequence `seq` of the room before Redis lost it and gave the sequence
    /// to another body.
    pub(super) fn replaced(&self, room_id: u64, seq: u64, body: &Bytes) -> bool {
        let losses = &self.room(room_id).losses;
        losses.replaced.get(&seq).is_some_and(|b| b.contains(body))
    }

    /// The lost sequence `reuse` took is a message again: the new body is its truth where
    /// `theirs` (nobody had the lost one), the lost body where not.
    fn settle(&mut self, reuse: &Reuse, theirs: bool) {
        let room = self.room_mut(reuse.room);
        room.losses.lost.remove(&reuse.seq);
        if theirs {
            let i = usize::try_from(reuse.seq - 1).unwrap();
            let old = std::mem::replace(&mut room.bodies[i], reuse.body.clone());
            room.losses.replaced.entry(reuse.seq).or_default().push(old);
        }
    }
}

impl Sim {
    /// Redis loses a room's last writes and fails over (`Fault::LoseWrites`): a room with
    /// writes it may lose, where there is one.
    pub(super) fn lose_writes(&mut self) -> Result<(), Violation> {
        let engine = self.engine.as_ref().unwrap();
        let rooms: Vec<usize> = (0..self.rooms.len())
            .filter(|&r| engine.losable(r) > 0)
            .collect();
        let r = match self.pick(&rooms) {
            Some(r) => r,
            None => self.random(self.rooms.len()),
        };
        let k = 1 + self.random(3) as u64;
        let engine = self.engine.as_mut().unwrap();
        let before = engine.head(self.rooms[r].id);
        engine.fault(0, Fault::LoseWrites { room: r, k });
        let room_id = self.rooms[r].id;
        let lost: Vec<u64> = (engine.head(room_id) + 1..=before).collect();
        let members: Vec<Text> = self
            .phones
            .iter()
            .map(|p| p.user.clone())
            .filter(|u| self.model.current(u, room_id).is_some())
            .collect();
        for &seq in &lost {
            self.lossy.members.insert((room_id, seq), members.clone());
        }
        self.lossy.failovers += 1;
        self.lossy.lost += lost.len() as u64;
        self.note(format!(
            "Redis fails over and loses {lost:?} of room{r}: every engine loses its connections"
        ));
        self.hand_over_immediate()
    }

    /// Judges each publish Redis just gave a lost write's sequence (see the module's doc).
    pub(super) fn judge_reuses(&mut self) -> Result<(), Violation> {
        let reused = std::mem::take(&mut self.engine.as_mut().unwrap().reused);
        for reuse in reused {
            let (room, seq, node) = (reuse.room, reuse.seq, reuse.node);
            if reuse
                .owner_head
                .is_some_and(|(e, h)| e == EPOCH && h >= seq)
            {
                // Only a Redis that ignores the owner's head gets here: the lost body
                // stays the truth, and the sequence is owed to every member.
                self.note(format!(
                    "Redis gives {seq} of {room:#x} again, through worker {node} whose owner named {:?}",
                    reuse.owner_head
                ));
                self.engine.as_mut().unwrap().settle(&reuse, false);
                continue;
            }
            if let Some(holder) = self.holder(room, seq) {
                let what = format!(
                    "Redis gives {seq} of {room:#x} again through worker {node} (owner head {:?}) while {holder}",
                    reuse.owner_head
                );
                return Err(self.residual(what));
            }
            self.note(format!(
                "Redis gives lost {seq} of {room:#x} again; nobody had the lost body"
            ));
            self.lossy.given_again += 1;
            self.engine.as_mut().unwrap().settle(&reuse, true);
        }
        Ok(())
    }

    /// Notes each removal Redis just placed below a lost write's sequence (the room's
    /// sequence went back) where some node's owner holds the room past the place: that
    /// owner may have passed the place for good (its reads start after its head), the
    /// documented residual race for a removal (made through a node behind another node's
    /// head, before that node's raise). A delivery to the removed user past the place is
    /// then that race ([`Sim::removal_passed`]), and ends the run, inconclusive and
    /// counted; until one happens the run goes on.
    pub(super) fn judge_removals_below_lost(&mut self) {
        let placed = std::mem::take(&mut self.engine.as_mut().unwrap().placed_below_lost);
        for (room_id, user, at) in placed {
            let Some(room) = self.rooms.iter().find(|r| r.id == room_id) else {
                continue;
            };
            let past = self.cores.iter().enumerate().find_map(|(c, core)| {
                let o = core.owned.get(room)?;
                (o.epoch == EPOCH && o.head > at).then_some((c, o.head))
            });
            if let Some((c, head)) = past {
                self.note(format!(
                    "Redis places {user}'s removal from {room_id:#x} at {at} while worker {c}'s owner holds the room at {head}"
                ));
                self.lossy
                    .removals_below
                    .insert((room_id, user), (at, c, head));
            }
        }
    }

    /// `user` received `seq` of the room outside its membership, after Redis placed the
    /// removal that ended it below an owner's head ([`Sim::judge_removals_below_lost`]):
    /// the documented residual race, not a leak of the relay's own.
    pub(super) fn removal_passed(
        &mut self,
        user: &Text,
        room_id: u64,
        seq: u64,
    ) -> Option<Violation> {
        let &(at, c, head) = self.lossy.removals_below.get(&(room_id, user.clone()))?;
        (seq > at).then(|| {
            self.residual(format!(
                "{user} received {seq} of {room_id:#x} past its removal, which Redis placed at {at} while worker {c}'s owner held the room at {head}"
            ))
        })
    }

    /// Who has sequence `seq` of the room: a node's owner at or past it, a phone that got
    /// it or its PUBACK.
    fn holder(&self, room_id: u64, seq: u64) -> Option<String> {
        let room = self.rooms.iter().find(|r| r.id == room_id)?;
        let owner = self.cores.iter().enumerate().find_map(|(c, core)| {
            let o = core.owned.get(room)?;
            (o.epoch == EPOCH && o.head >= seq)
                .then(|| format!("worker {c}'s owner holds the room at {}", o.head))
        });
        owner.or_else(|| {
            self.phones.iter().find_map(|p| {
                let got = p
                    .received
                    .get(&room_id)
                    .is_some_and(|v| v.iter().any(|&(s, _)| s == seq));
                let acked = p.own.get(&room_id).is_some_and(|o| o.contains(&seq));
                (got || acked).then(|| format!("{} got it (PUBACK: {acked})", p.user))
            })
        })
    }

    /// Ends the run at the documented residual race, inconclusive.
    fn residual(&mut self, what: String) -> Violation {
        self.note(format!("the documented residual race: {what}"));
        self.lossy.residual = Some(what.clone());
        self.fail(format!(
            "inconclusive, the documented residual race: {what}"
        ))
    }

    /// With lost writes: every owner on worker `core` holds its room's history up to its
    /// head. A history ending below the head (an open whose tail ended below the room's
    /// sequence: the last writes lost, and a raise past them) pages nothing past its end
    /// and no gap, and the next message breaks its order (`History::push`).
    pub(super) fn check_history_ends(&self, core: usize) -> Result<(), Violation> {
        if !self.engine.as_ref().is_some_and(|e| e.lose_writes) {
            return Ok(());
        }
        for room in &self.rooms {
            let Some(owned) = self.cores[core].owned.get(room) else {
                continue;
            };
            let history = owned.history();
            let Some(first) = history.first_seq() else {
                continue;
            };
            let last = first + history.len() as u64 - 1;
            if last < owned.head {
                return Err(self.fail(format!(
                    "worker {core}'s owner of {} is at {} and its history ends at {last}, with no gap between",
                    room.name, owned.head
                )));
            }
        }
        Ok(())
    }

    /// `user` was a member of the room when Redis lost its sequence `seq`, which is still
    /// lost: the owners that had it may deliver it to them, even where a removal Redis
    /// placed after the loss comes before it in the room's order now.
    pub(super) fn member_when_lost(&self, user: &Text, room_id: u64, seq: u64) -> bool {
        self.lost(room_id, seq)
            && self
                .lossy
                .members
                .get(&(room_id, seq))
                .is_some_and(|m| m.contains(user))
    }

    /// `seq` of the room is lost, and `user` joined the room again since Redis lost it:
    /// a membership that ended before it in the room's order (a removal placed after the
    /// loss) may have got it, and the new one gets it again.
    pub(super) fn rejoined_past_lost(&self, user: &Text, room_id: u64, seq: u64) -> bool {
        self.member_when_lost(user, room_id, seq)
            && self
                .model
                .intervals
                .get(&(user.clone(), room_id))
                .is_some_and(|v| v.len() > 1)
    }

    /// Sequence `seq` of the room is a lost write's: a GAP may name it, a member may lack
    /// it.
    pub(super) fn lost(&self, room_id: u64, seq: u64) -> bool {
        self.engine
            .as_ref()
            .is_some_and(|e| e.is_lost(room_id, seq))
    }

    /// `user` got `body` as `seq` of the room where Redis holds another body: where it is
    /// the lost body the sequence had before Redis gave it again, the residual race, found
    /// late (the run ends inconclusive).
    pub(super) fn lost_body_late(
        &mut self,
        user: &Text,
        room_id: u64,
        seq: u64,
        body: &Bytes,
    ) -> Option<Violation> {
        let engine = self.engine.as_ref()?;
        if !engine.lose_writes || !engine.replaced(room_id, seq, body) {
            return None;
        }
        let what = format!(
            "{user} got the lost {body:?} as {seq} of {room_id:#x}, given again to another body meanwhile"
        );
        Some(self.residual(what))
    }
}
