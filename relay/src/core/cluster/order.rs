//! A room's order on this node (see `core/cluster.rs`, "Order and holes" and "Removals in
//! the room's order"): what the room's channel, the stream and the script's answers bring
//! is appended strictly in sequence order, holes read from the stream first, and each
//! removal applied between the message before it and the next.
//!
//! Owns: the appends, the reorder buffer's and the removals' draining, the stream reads'
//! pages and what they reveal of retention. Must not touch: the engine's connections (only
//! `EngineCmd::Fill` out), the room's open (the caller's).

use std::sync::atomic::Ordering;

use super::{Heard, MAX_REORDER, SyncState, stored};
use crate::cluster::{EngineCmd, EngineMessage, FillPage, RemovalMark};
use crate::core::Core;
use crate::ids::{RoomName, StoredRef};
use crate::mesh::CoreMsg;

impl Core {
    /// A message or a removal from the room's channel. Until the room's open is answered
    /// it waits: the channel is subscribed before the OPEN script runs, so a message
    /// published just after the script can be heard before the script's answer (Redis may
    /// write the subscriber's push before the command's reply, and the engine reads what
    /// arrives), while the room is not held here yet or holds another epoch. Dropped, it
    /// would be a hole nothing reveals when no later message comes (a 1:1 room's last
    /// ones).
    pub(super) fn on_channel(&mut self, room: &RoomName, epoch: u64, heard: Heard) {
        if let Some(sync) = self.sync_mut(room)
            && sync.awaiting_open
        {
            if sync.early.len() < MAX_REORDER {
                sync.early.push((epoch, heard));
            } else {
                // Read back from the stream once open, with whatever else it missed.
                sync.resync = true;
            }
            return;
        }
        match heard {
            Heard::Message(msg) => self.offer_engine_msg(room, epoch, msg, false),
            Heard::Removal(mark) => self.offer_mark(room, epoch, mark, false),
        }
    }

    /// A message from the channel or the stream (`from_fill`): this worker's own publish
    /// resolves its publisher first (so the PUBACK precedes the delivery and the publisher
    /// is not sent its own message), or was resolved from an unordered answer.
    pub(super) fn offer_engine_msg(
        &mut self,
        room: &RoomName,
        epoch: u64,
        m: EngineMessage,
        from_fill: bool,
    ) {
        let msg = match m.ticket.and_then(|t| self.take_pending(t)) {
            Some(p) => self.resolve(p, m.seq),
            None => {
                let resolved = m.ticket.and_then(|t| {
                    let sync = self.sync_mut(room)?;
                    match sync.answered.get(&m.seq) {
                        Some((ticket, _)) if *ticket == t => {
                            sync.answered.remove(&m.seq).map(|(_, msg)| msg)
                        }
                        _ => None,
                    }
                });
                match resolved {
                    Some(msg) => msg,
                    None => stored(m, self.now),
                }
            }
        };
        self.cluster_offer(room, epoch, msg, from_fill);
    }

    /// Appends `msg` if it follows the head (and whatever waited after it); holds it and
    /// reads the hole from the stream if it does not. While the stream is being read
    /// (`filling`), only the read's own messages (`from_fill`) are appended: what the
    /// channel brings meanwhile waits until the read is complete, since a removal placed
    /// before it may be in the part of the stream not read yet (a pub/sub connection that
    /// came back, a room reopened).
    pub(super) fn cluster_offer(
        &mut self,
        room: &RoomName,
        epoch: u64,
        msg: StoredRef,
        from_fill: bool,
    ) {
        let Some(owned) = self.owned.get_mut(room) else {
            return;
        };
        if epoch != owned.epoch {
            if epoch < owned.epoch {
                // From before the room started again here, or the engine started it again
                // under a lower epoch (a node whose clock is behind): the stream's read
                // says which, by the epoch it answers with.
                return self.request_fill(room);
            }
            self.restart_epoch(room, epoch);
            return self.cluster_offer(room, epoch, msg, from_fill);
        }
        let head = owned.head;
        if msg.seq <= head {
            return; // already here (an echo, or read back with a hole)
        }
        let filling = self.sync_mut(room).is_some_and(|s| s.filling);
        if msg.seq > head + 1 || (filling && !from_fill) {
            if let Some(sync) = self.sync_mut(room)
                && sync.reorder.len() < MAX_REORDER
            {
                // A copy that waited first may know its publisher: it stays.
                sync.reorder.entry(msg.seq).or_insert(msg);
            }
            return self.request_fill(room);
        }
        // The copy that waited after a hole came first: it alone may know its publisher
        // (so the publisher is not sent its own message).
        let msg = self
            .sync_mut(room)
            .and_then(|sync| sync.reorder.remove(&msg.seq))
            .unwrap_or(msg);
        self.cluster_append(room, msg);
        if !from_fill {
            self.drain_reorder(room);
        }
    }

    /// The engine lost the room and started it again in `epoch`: a new stream, from
    /// nothing. Every worker binding the room binds it again, told of the new epoch first
    /// ([`CoreMsg::Restarted`]); a stream read out now is of the old stream, and its
    /// answer is passed over (see [`Core::on_filled`]).
    fn restart_epoch(&mut self, room: &RoomName, epoch: u64) {
        let Some(owned) = self.owned.get_mut(room) else {
            return;
        };
        tracing::warn!(room = %room.name, old = owned.epoch, epoch, "the engine holds a new epoch of the room");
        owned.epoch = epoch;
        owned.head = 0;
        owned.clear_history();
        let cores: Vec<usize> = (0..owned.interest.len())
            .filter(|&c| owned.interest[c] > 0)
            .collect();
        for core in cores {
            let room = room.clone();
            self.send_to(core, CoreMsg::Restarted { room, epoch });
        }
        let Some(sync) = self.sync_mut(room) else {
            return;
        };
        sync.reorder.clear();
        sync.marks.clear();
        sync.answered.clear();
        sync.applied = (0, 0);
        // A reopening waited for the head to reach the old stream's: the new stream is
        // read from its start, and the waiting requests run now.
        if sync.state == SyncState::Opening && sync.open_at > 0 {
            self.finish_open(room);
        }
    }

    /// Appends the message after the head and fans it out, then applies the removals
    /// placed after it.
    pub(super) fn cluster_append(&mut self, room: &RoomName, msg: StoredRef) {
        self.append_and_fan_out(room, msg);
        self.apply_due_marks(room);
    }

    /// Appends what waited after a hole now filled (nothing while the stream is read).
    pub(super) fn drain_reorder(&mut self, room: &RoomName) {
        loop {
            let Some(head) = self.owned.get(room).map(|o| o.head) else {
                return;
            };
            let Some(sync) = self.sync_mut(room) else {
                return;
            };
            if sync.filling {
                return;
            }
            drop_through(&mut sync.reorder, head);
            match sync.reorder.first_entry() {
                Some(e) if *e.key() == head + 1 => {
                    let msg = e.remove();
                    self.cluster_append(room, msg);
                }
                Some(_) => return self.request_fill(room),
                None => {
                    // A removal held past the head (heard while the stream was read)
                    // reveals a hole as a message does.
                    if sync
                        .marks
                        .first_key_value()
                        .is_some_and(|(&(s, _), _)| s > head)
                    {
                        self.request_fill(room);
                    }
                    return;
                }
            }
        }
    }

    /// A removal in the room's order: applied now if the head has reached the message it
    /// follows, else held until it does (and the messages before it are read from the
    /// stream: a removal after the head reveals a hole as a message does). One of another
    /// epoch is passed over: a newer epoch's first message starts the room again here,
    /// and its stream read brings the removal back.
    ///
    /// While the stream is read, one heard on the channel (not `in_order`: the stream's
    /// pages and an open's answer are) waits whatever its place: the read may bring an
    /// earlier removal the channel lost, and the two must be applied in their order.
    pub(super) fn offer_mark(
        &mut self,
        room: &RoomName,
        epoch: u64,
        mark: RemovalMark,
        in_order: bool,
    ) {
        let Some((room_epoch, head)) = self.owned.get(room).map(|o| (o.epoch, o.head)) else {
            return;
        };
        let Some(sync) = self.sync_mut(room) else {
            return;
        };
        if epoch != room_epoch || mark.place() <= sync.applied {
            return;
        }
        let filling = sync.filling;
        if mark.seq <= head && (in_order || !filling) {
            // After any held at an earlier place of the same message.
            sync.marks.insert(mark.place(), mark);
            return self.apply_due_marks(room);
        }
        // Past the bound it is read back from the stream with the messages before it (a
        // stream read brings every removal after the head).
        if sync.marks.len() < MAX_REORDER {
            sync.marks.insert(mark.place(), mark);
        }
        if !filling {
            self.request_fill(room);
        }
    }

    /// Applies the removals placed at or before the head, in order; forgets the answered
    /// messages the head passed.
    pub(super) fn apply_due_marks(&mut self, room: &RoomName) {
        let Some(head) = self.owned.get(room).map(|o| o.head) else {
            return;
        };
        if let Some(sync) = self.sync_mut(room) {
            drop_through(&mut sync.answered, head);
        }
        loop {
            let Some(sync) = self.sync_mut(room) else {
                return;
            };
            let (applied, limit) = (sync.applied, sync.apply_limit);
            match sync.marks.first_entry() {
                // Passed already (heard twice: the channel and the stream).
                Some(e) if *e.key() <= applied => {
                    e.remove();
                }
                Some(e) if e.key().0 <= head && limit.is_none_or(|l| *e.key() <= l) => {
                    let mark = e.remove();
                    self.apply_removal(room, mark);
                }
                _ => return,
            }
        }
    }

    /// A removal reached its place in the room's order here: the membership ends in this
    /// node's directory (and stays ended: a read or notice still naming it is older), and
    /// the user's connections bound by it are unbound (LEFT) before any later message of
    /// this owner reaches them, as one relay's owner removes a member. The user's notice,
    /// when it comes, finds the membership gone.
    pub(super) fn apply_removal(&mut self, room: &RoomName, mark: RemovalMark) {
        if let Some(sync) = self.sync_mut(room) {
            sync.applied = sync.applied.max(mark.place());
        }
        let user = mark.user.as_str();
        let removed = self.directory.end(user, room, mark.join.serial);
        // Only a membership this node held ends here: a removal of one it never knew (a
        // room's older removals, read at its open) leaves the owner's set and markers to
        // what the engine says of the user now.
        if removed.was.is_none() {
            return;
        }
        if let Some(cluster) = self.cluster.as_deref() {
            cluster
                .stats
                .removals_in_order
                .fetch_add(1, Ordering::Relaxed);
        }
        let handle = self
            .owned
            .get_mut(room)
            .and_then(|owned| owned.members.remove(user))
            .unwrap_or_else(|| crate::ids::UserName::from(user));
        self.forget_markers(room, user);
        for core in removed.cores {
            self.send_to(
                core,
                CoreMsg::MemberLeft {
                    room: room.clone(),
                    user: handle.clone(),
                    reason: mark.reason,
                    serial: mark.join.serial,
                },
            );
        }
    }

    /// Reads the stream after the room's head (one read in flight per room), after the
    /// removals placed after the head's message already applied.
    pub(super) fn request_fill(&mut self, room: &RoomName) {
        let Some((after, epoch)) = self.owned.get(room).map(|o| (o.head, o.epoch)) else {
            return;
        };
        let Some(side) = self.cluster.as_deref_mut() else {
            return;
        };
        let Some(sync) = side.rooms.get_mut(room) else {
            return;
        };
        if !sync.filling {
            sync.filling = true;
            sync.fill_epoch = epoch;
            sync.fill_covers = sync.reorder.last_key_value().map_or(0, |(&s, _)| s);
            sync.fill_marks_cover = sync.marks.last_key_value().map_or((0, 0), |(&p, _)| p);
            let sub = if sync.applied.0 == after {
                sync.applied.1
            } else {
                0
            };
            side.out.push(EngineCmd::Fill {
                room: room.clone(),
                after,
                sub,
            });
        }
    }

    /// A page of the room's stream after `after`, read when the engine's epoch of the
    /// room was `epoch`. A page asked for in another epoch than the owner's now, or of
    /// another epoch, is not of its stream: of the epoch the owner held when it asked, it
    /// was read before the owner followed the engine's restart of the room; of any other,
    /// the engine started the room again (under a lower epoch too: a node whose clock is
    /// behind), and the owner follows it. Either way the owner's stream is read again
    /// from its head. Epoch 0: the engine holds none (it lost the room, and no publish or
    /// join started it again yet): nothing to read until one does.
    pub(super) fn on_filled(&mut self, room: &RoomName, page: FillPage) {
        let FillPage {
            epoch,
            room_seq,
            after,
            msgs,
            marks,
            full,
        } = page;
        let Some(owned_epoch) = self.owned.get(room).map(|o| o.epoch) else {
            return;
        };
        let Some(sync) = self.sync_mut(room) else {
            return;
        };
        let asked_in = sync.fill_epoch;
        if epoch != owned_epoch || asked_in != owned_epoch {
            // Asked in another epoch than the owner's now (where it starts is of the old
            // stream), or answered in one.
            sync.filling = false;
            if epoch == 0 {
                return;
            }
            // Of the epoch the owner held when it asked: read before the owner followed
            // the engine's restart of the room, and passed over.
            if epoch != owned_epoch && epoch != asked_in {
                self.restart_epoch(room, epoch);
            }
            return self.request_fill(room);
        }
        // Still filling while this page is applied: no second read for the same hole, and
        // nothing from the channel appended between its messages.
        let covers = sync.fill_covers;
        let stale = std::mem::take(&mut sync.stale_fill);
        // The page's removals join those held, in place order, so that each is applied at
        // its place whatever the channel brought meanwhile. A full page covers the stream
        // only up to its last entry: a held removal past that waits for the next page,
        // which may hold an earlier one at the same message.
        for mark in &marks {
            if mark.place() > sync.applied {
                sync.marks.insert(mark.place(), mark.clone());
            }
        }
        if full {
            let last_msg = msgs.last().map(|m| (m.seq, 0));
            let last_mark = marks.last().map(RemovalMark::place);
            sync.apply_limit = last_msg.max(last_mark);
        }
        // In the stream's order: the page holds everything from where it starts to its
        // last entry, so an entry past the head's next message says retention dropped
        // what is between (for a removal, the message it follows too).
        let mut filled = 0;
        let (mut marks, mut msgs) = (marks.into_iter().peekable(), msgs.into_iter().peekable());
        loop {
            let Some(head) = self.owned.get(room).map(|o| o.head) else {
                return;
            };
            let mark_first = match (marks.peek(), msgs.peek()) {
                (Some(r), Some(m)) => r.place() < (m.seq, 0),
                (r, _) => r.is_some(),
            };
            if mark_first {
                let Some(mark) = marks.next() else { break };
                self.jump(room, mark.seq + 1);
                self.offer_mark(room, epoch, mark, true);
                continue;
            }
            let Some(m) = msgs.next() else { break };
            if m.seq <= head {
                continue;
            }
            self.jump(room, m.seq);
            filled += 1;
            self.offer_engine_msg(room, epoch, m, true);
        }
        // The first message held past the head (one the page's jumps passed is dropped
        // when the reorder buffer drains).
        let head = self.owned.get(room).map_or(0, |o| o.head);
        let waiting = self
            .sync_mut(room)
            .and_then(|s| s.reorder.range(head + 1..).next().map(|(&s, _)| s));
        if let Some(first) = waiting
            && !full
            && first <= covers
            && self.owned.get(room).is_some_and(|o| o.head + 1 < first)
        {
            // The stream held `first` when it was read, and nothing between the head and
            // it: retention dropped that.
            self.jump(room, first);
        }
        if !full {
            // The page reached the stream's end, read in the same script as the room's
            // sequence: what that names past the head and the page is not in the stream
            // and never will be (Redis lost it and a raise moved the sequence past it, or
            // the stream expired). Waiting for it would stall the room: it is a gap, up to
            // what the channel brought meanwhile.
            let past = waiting.map_or(room_seq + 1, |first| first.min(room_seq + 1));
            self.jump(room, past);
            if !stale {
                // A removal Redis held when the read was sent, placed past the sequence the
                // read answered and past every message held, went with the writes Redis
                // lost (an open's answer named it, or it was heard before a failover): it
                // will never be read back, and holding it would have the stream read again
                // on every turn (and apply it once a new message takes its sequence).
                let head = self.owned.get(room).map_or(0, |o| o.head);
                if let Some(sync) = self.sync_mut(room) {
                    let bound = room_seq.max(head).max(sync.fill_covers);
                    let cover = sync.fill_marks_cover;
                    sync.marks
                        .retain(|&place, _| place > cover || place.0 <= bound);
                }
            }
        }
        if let Some(side) = self.cluster.as_deref_mut() {
            side.stats.holes_filled.fetch_add(filled, Ordering::Relaxed);
            if let Some(sync) = side.rooms.get_mut(room) {
                sync.filling = false;
                sync.apply_limit = None;
            }
        }
        if filled > 0 {
            tracing::debug!(room = %room.name, after, filled, "filled a hole from the stream");
        }
        if full {
            // The rest of the stream first: a removal after this page's last message
            // would be in the next page, and what waits after it must not pass it.
            self.request_fill(room);
        } else {
            // The read is complete: the removals held at the head's message (heard while
            // it was out) are due.
            self.apply_due_marks(room);
            self.drain_reorder(room);
        }
        let head = self.owned.get(room).map_or(0, |o| o.head);
        let reopening = self
            .sync_mut(room)
            .filter(|s| s.state == SyncState::Opening && s.open_at > 0)
            .map(|s| s.open_at);
        // A page that reached the stream's end, asked after the open (not stale), also
        // ends the reopening: Redis may have lost what the open's sequence named.
        if reopening.is_some_and(|open_at| head >= open_at || (!full && !stale)) {
            self.finish_open(room);
        }
        if stale {
            // A read older than a reopening or a resubscription may have stopped short
            // of what was published before them: read what it could not see.
            self.request_fill(room);
        }
    }

    /// Retention dropped the messages before `seq`: the head moves past them, and phones
    /// reading that far get an exact GAP.
    pub(super) fn jump(&mut self, room: &RoomName, seq: u64) {
        if let Some(owned) = self.owned.get_mut(room)
            && seq > owned.head + 1
        {
            tracing::warn!(room = %room.name, from = owned.head + 1, to = seq - 1, "the engine's stream no longer holds these messages");
            owned.clear_history();
            owned.head = seq - 1;
            // Removals placed among what was dropped still end their memberships.
            self.apply_due_marks(room);
        }
    }
}

/// Drops the entries at or below `head` (what the room's head has passed).
fn drop_through<V>(map: &mut std::collections::BTreeMap<u64, V>, head: u64) {
    while map.first_key_value().is_some_and(|(&s, _)| s <= head) {
        map.pop_first();
    }
}
