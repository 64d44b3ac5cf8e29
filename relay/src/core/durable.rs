//! The core's side of durable state (`[storage] mode = "disk"`): what the owner appends to
//! its worker's log, what it restores from it at start, and the outputs it holds until the
//! log says they are durable.
//!
//! Owns: the worker's [`WorkerLog`] (handed in by the runtime, which runs its jobs on an
//! executor and feeds back the completions), the queue of held outputs, the retention
//! timer of the log. Must not touch: files or threads (the log only encodes into memory and
//! hands out jobs; reading history pages back is its one blocking read, off the hot path),
//! connections (it releases messages to workers, which write to connections).
//!
//! # Nothing leaves before it is durable
//! Once a record is appended, every output of this worker (messages to any worker,
//! itself included, and server-API answers) waits in [`Durability::held`] behind the LSN of
//! the newest record appended before it, until the runtime feeds a
//! [`StorageEvent::Durable`] covering it ([`Core::on_durable`]). One queue in order, so
//! outputs keep their order per destination and no PUBACK, delivery, subscription answer or
//! membership acknowledgement can reach anyone before what it reports is stored per the
//! fsync policy. Outputs queued while nothing is pending go out at once, so the memory mode
//! and an idle disk mode cost nothing. The queue holds at most what one commit's latency
//! lets the worker accept, which bounds it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pabal_codec::{ErrorCode, Text};

use super::{Core, ReplyTo};
use crate::directory::JoinPoint;
use crate::history::PageInfo;
use crate::ids::{CoreId, RoomName, Stored, StoredRef};
use crate::mesh::{ControlRefusal, ControlReply, CoreMsg};
use crate::sender_name::SenderName;
use crate::storage::{
    Completion, Job, Lsn, RecoveryReport, RoomKey, StorageError, StorageEvent, StoredMessage,
    WorkerLog,
};

/// How often retention trims the log.
pub(super) const RETENTION_EVERY: Duration = Duration::from_secs(1);
/// Messages of each room read back into memory at start (older ones are paged from disk).
pub(super) const RECOVERED_TAIL: u64 = 256;

/// An output waiting for its LSN to become durable.
#[derive(Debug)]
enum Held {
    Msg(CoreId, CoreMsg),
    Reply(ReplyTo, ControlReply),
}

/// The log and what waits on it.
#[derive(Debug)]
pub(super) struct Durability {
    pub(super) log: WorkerLog,
    /// Outputs with the LSN they wait for, ascending.
    held: VecDeque<(Lsn, Held)>,
    /// The highest LSN the log reported durable.
    acked: Lsn,
    /// The log failed (an fsync error): nothing more becomes durable until a restart.
    failed: bool,
    /// When retention next runs.
    pub(super) retention_at: Instant,
}

impl Durability {
    /// Whether an output queued now must wait: something appended is not durable yet, or
    /// earlier outputs wait (order).
    fn must_hold(&self) -> bool {
        !self.failed && (!self.held.is_empty() || self.log.next_lsn() - 1 > self.acked)
    }

    fn barrier(&self) -> Lsn {
        self.log.next_lsn() - 1
    }
}

/// The answer a refused storage append gets: retryable (space) or not.
pub(super) fn refusal_of(e: &StorageError) -> ControlRefusal {
    if e.is_retryable() {
        ControlRefusal::StorageFull
    } else {
        ControlRefusal::StorageFailed
    }
}

/// The protocol error for a publish the log refused: `Overloaded` (non-fatal, retry) with
/// the message `storage_full`, or `Internal` with `storage_failed`.
pub(super) fn error_of(e: &StorageError) -> (ErrorCode, &'static str) {
    if e.is_retryable() {
        (ErrorCode::Overloaded, "storage_full")
    } else {
        (ErrorCode::Internal, "storage_failed")
    }
}

/// A message read back from the log, as history holds it (`accepted_at`: when it was read;
/// it is only used for the latency of live deliveries, which these are not).
fn stored(m: StoredMessage, accepted_at: Instant) -> StoredRef {
    Arc::new(Stored {
        seq: m.seq,
        ts_ms: m.ts_ms,
        accepted_at,
        sender: SenderName::Wire(m.sender),
        origin: None,
        payload: m.payload,
    })
}

impl Core {
    /// Gives this worker its durable log (disk mode), as [`WorkerLog::open`] recovered it:
    /// every room it holds comes back with its epoch, head, members and blocks (into the
    /// directory) and the recent tail of its history; rooms that lost records to damage
    /// (`report.affected`) start a new epoch. Blocking only as far as reading the tails.
    pub fn attach_storage(
        &mut self,
        log: WorkerLog,
        report: &RecoveryReport,
        now: Instant,
    ) -> Result<(), StorageError> {
        self.advance_to(now);
        self.storage = Some(Box::new(Durability {
            log,
            held: VecDeque::new(),
            acked: 0,
            failed: false,
            retention_at: now + RETENTION_EVERY,
        }));
        let mut rooms: Vec<(RoomKey, RoomName)> = {
            let Some(d) = self.storage.as_deref_mut() else {
                unreachable!("set above")
            };
            d.acked = d.log.ack_lsn();
            d.log
                .state()
                .rooms
                .iter()
                .filter(|(_, r)| r.epoch != 0)
                .map(|(k, r)| (*k, r.name.clone()))
                .collect()
        };
        rooms.sort_by_key(|(k, _)| *k);
        for (key, name) in rooms {
            self.restore_room(key, &name)?;
        }
        for name in &report.affected {
            if self.owned.contains_key(name) {
                // Records of this room were lost: a new stream, so phones get an exact gap.
                let epoch = self.fresh_epoch();
                if let Some(owned) = self.owned.get_mut(name) {
                    owned.epoch = epoch;
                    owned.epoch_stored = false;
                    owned.clear_history();
                }
                self.store_epoch(name)?;
                tracing::error!(room = %name.name, epoch, "storage: the room lost records to damage; it starts a new epoch");
            }
        }
        self.publish_storage_metrics();
        Ok(())
    }

    /// One room from the log into memory and the directory.
    fn restore_room(&mut self, key: RoomKey, name: &RoomName) -> Result<(), StorageError> {
        let Some(d) = self.storage.as_deref_mut() else {
            return Ok(());
        };
        let Some(rs) = d.log.state().rooms.get(&key) else {
            return Ok(());
        };
        let (epoch, head, first) = (rs.epoch, rs.head, rs.first_retained);
        let members: Vec<(Text, JoinPoint)> =
            rs.members.iter().map(|(u, j)| (u.clone(), *j)).collect();
        let blocked: Vec<Text> = rs.blocked.iter().cloned().collect();
        let markers: Vec<(Text, super::Marker)> = rs
            .markers
            .iter()
            .map(|(u, m)| {
                let (delivered, read) = (m.delivered, m.read);
                (u.clone(), super::Marker { delivered, read })
            })
            .collect();
        let mut tail = Vec::new();
        // Enough to rebuild the window of publish ids too (`limits.publish_ids`).
        let publish_ids = self.config.limits.publish_ids as u64;
        let after = head
            .saturating_sub(RECOVERED_TAIL.max(publish_ids))
            .max(first.saturating_sub(1));
        d.log
            .read_page(key, after, usize::MAX, usize::MAX, &mut tail)?;
        self.last_epoch = self.last_epoch.max(epoch);
        self.create_room(name, epoch);
        let accepted_at = self.now;
        let (now_ms, max_age) = (self.now_ms(), self.config.limits.publish_id_max_age);
        let config = &self.config;
        let Some(owned) = self.owned.get_mut(name) else {
            return Ok(());
        };
        owned.head = head;
        owned.key = key;
        owned.epoch_stored = true;
        let history_from = head.saturating_sub(RECOVERED_TAIL);
        for m in tail {
            // Its age survives the restart: it was recorded when it was accepted.
            let age = Duration::from_millis(now_ms.saturating_sub(m.ts_ms));
            if let Some(id) = m.publish_id
                && age < max_age
                && let Some(at) = accepted_at.checked_sub(age)
            {
                owned
                    .state_mut()
                    .publish_ids
                    .get_or_insert_default()
                    .record(id, m.seq, at, publish_ids as usize, max_age);
            }
            if m.seq > history_from {
                let ts_ms = m.ts_ms;
                owned
                    .history_to_append(|| config.retention_for(name.name.as_str()))
                    .push(stored(m, accepted_at), ts_ms);
            }
        }
        for (user, _) in &members {
            owned.members.insert(user.clone());
        }
        if let Some(restored) = super::receipts::RoomMarkers::restored(markers.into_iter()) {
            owned.state_mut().receipts = Some(restored);
        }
        for (user, join) in members {
            if let Err(e) = self.directory.add(user.as_str(), name, join, false) {
                tracing::warn!(%user, room = %name.name, "storage: a stored member could not be restored: {e}");
            }
        }
        for user in blocked {
            self.directory.remove(user.as_str(), name, true);
        }
        self.note_if_unused(name);
        Ok(())
    }

    /// The room's key in the log, writing its epoch record first if the log does not hold
    /// the room's current epoch yet (a room created since the last record).
    fn store_epoch(&mut self, room: &RoomName) -> Result<RoomKey, StorageError> {
        let Some(d) = self.storage.as_deref_mut() else {
            return Ok(0);
        };
        let Some(owned) = self.owned.get_mut(room) else {
            return Ok(0);
        };
        if owned.epoch_stored {
            return Ok(owned.key);
        }
        let key = d.log.room(room);
        d.log.append_epoch(key, owned.epoch, owned.head)?;
        owned.key = key;
        owned.epoch_stored = true;
        Ok(key)
    }

    /// Appends a message the owner is about to accept as `seq`; the message is accepted
    /// only if this succeeds.
    pub(super) fn store_message(
        &mut self,
        room: &RoomName,
        seq: u64,
        ts_ms: u64,
        sender: &str,
        payload: &Bytes,
        publish_id: Option<super::owner::PublishId>,
    ) -> Result<(), StorageError> {
        if self.storage.is_none() {
            return Ok(());
        }
        let key = self.store_epoch(room)?;
        if let Some(d) = self.storage.as_deref_mut() {
            d.log
                .append_message(key, seq, ts_ms, 0, sender, payload, publish_id)?;
        }
        Ok(())
    }

    /// Appends a join (and, with `unblock`, the end of a block) at `join`.
    pub(super) fn store_join(
        &mut self,
        room: &RoomName,
        user: &str,
        join: JoinPoint,
        unblock: bool,
    ) -> Result<(), StorageError> {
        if self.storage.is_none() {
            return Ok(());
        }
        let key = self.store_epoch(room)?;
        if let Some(d) = self.storage.as_deref_mut() {
            let blocked = d
                .log
                .state()
                .rooms
                .get(&key)
                .is_some_and(|r| r.blocked.contains(user));
            if unblock && blocked {
                d.log.append_block(key, user, false)?;
            }
            d.log.append_join(key, user, join.epoch, join.seq)?;
        }
        Ok(())
    }

    /// Appends a leave (`member`) and, with `block`, a block.
    pub(super) fn store_leave(
        &mut self,
        room: &RoomName,
        user: &str,
        member: bool,
        block: bool,
    ) -> Result<(), StorageError> {
        if self.storage.is_none() || !(member || block) {
            return Ok(());
        }
        let key = self.store_epoch(room)?;
        if let Some(d) = self.storage.as_deref_mut() {
            if member {
                d.log.append_leave(key, user)?;
            }
            if block {
                d.log.append_block(key, user, true)?;
            }
        }
        Ok(())
    }

    /// Appends members' receipts markers (coalesced by the caller: once per member per
    /// `receipts.interval`). A refusal (a full disk) leaves them in memory only, logged.
    pub(super) fn store_markers(
        &mut self,
        room: &RoomName,
        epoch: u64,
        markers: &[(Text, super::Marker)],
    ) {
        if self.storage.is_none() {
            return;
        }
        let stored = self.store_epoch(room).and_then(|key| {
            let Some(d) = self.storage.as_deref_mut() else {
                return Ok(());
            };
            for (user, m) in markers {
                d.log
                    .append_markers(key, user.as_str(), epoch, m.delivered, m.read)?;
            }
            Ok(())
        });
        if let Err(e) = stored {
            tracing::warn!(room = %room.name, "receipts markers not stored: {e}");
        }
    }

    /// Appends that an evicted room is gone (it comes back in a new epoch, as in memory
    /// mode). `false` when the log refused: the room stays.
    pub(super) fn store_drop(&mut self, room: &RoomName) -> bool {
        let Some(d) = self.storage.as_deref_mut() else {
            return true;
        };
        let Some(&key) = d.log.state().keys.get(room) else {
            return true;
        };
        d.log.append_drop(key).is_ok()
    }

    /// Whether storage is on (disk mode).
    pub(super) fn durable(&self) -> bool {
        self.storage.is_some()
    }

    /// Queues a message for a worker, behind what is not durable yet.
    pub(super) fn send_to(&mut self, core: CoreId, msg: CoreMsg) {
        self.output(Held::Msg(core, msg));
    }

    /// Queues a server-API answer, behind what is not durable yet.
    pub(super) fn reply(&mut self, to: ReplyTo, answer: ControlReply) {
        self.output(Held::Reply(to, answer));
    }

    /// Holds an output behind the newest record, or lets it go if nothing waits.
    fn output(&mut self, out: Held) {
        match self.storage.as_deref_mut() {
            Some(d) if d.must_hold() => {
                let lsn = d.barrier();
                d.held.push_back((lsn, out));
            }
            _ => self.release(out),
        }
    }

    /// Lets an output go: into the outbox or the answers drained this tick.
    fn release(&mut self, out: Held) {
        match out {
            Held::Msg(core, msg) => self.outbox[core].push(msg),
            Held::Reply(to, answer) => self.replies.push((to, answer)),
        }
    }

    /// Every record up to `through` is stored per the fsync policy: releases, in order, the
    /// outputs that waited for it.
    pub fn on_durable(&mut self, now: Instant, through: Lsn) {
        self.advance_to(now);
        let Some(d) = self.storage.as_deref_mut() else {
            return;
        };
        d.acked = d.acked.max(through);
        while let Some(d) = self.storage.as_deref_mut()
            && d.held.front().is_some_and(|(lsn, _)| *lsn <= d.acked)
            && let Some((_, out)) = d.held.pop_front()
        {
            self.release(out);
        }
    }

    /// Takes back what the executor did with a job of the log, and acts on what the log
    /// says about it.
    pub fn on_storage_completion(&mut self, now: Instant, completion: Completion) {
        self.advance_to(now);
        let Some(d) = self.storage.as_deref_mut() else {
            return;
        };
        d.log.on_completion(completion, now);
        while let Some(event) = self.storage.as_deref_mut().and_then(|d| d.log.poll_event()) {
            match event {
                StorageEvent::Durable { through } => self.on_durable(now, through),
                StorageEvent::Full { cause } => {
                    tracing::warn!(
                        core = self.id,
                        ?cause,
                        "storage full: publishes refused with storage_full until space returns"
                    );
                }
                StorageEvent::Available => {
                    tracing::info!(
                        core = self.id,
                        "storage: space is back; publishes taken again"
                    );
                }
                StorageEvent::Failed { reason } => self.on_storage_failed(&reason),
                StorageEvent::Checkpointed { .. } => {}
            }
        }
    }

    /// The log failed for good (until a restart): what waited on it will never be durable.
    /// Messages and PUBACKs are dropped (never acknowledged); everything else goes out.
    fn on_storage_failed(&mut self, reason: &str) {
        tracing::error!(core = self.id, %reason, "storage failed: unacknowledged messages are dropped and publishes refused until the relay restarts");
        let Some(d) = self.storage.as_deref_mut() else {
            return;
        };
        d.failed = true;
        for (_, out) in std::mem::take(&mut d.held) {
            if !matches!(
                out,
                Held::Msg(_, CoreMsg::Accepted { .. } | CoreMsg::Deliver { .. })
            ) {
                self.release(out);
            }
        }
    }

    /// The log's next job (a group commit of what this tick appended, a sync, a
    /// checkpoint), for the runtime to hand to its executor. Call at the end of every tick
    /// until `None`.
    pub fn poll_storage_job(&mut self, now: Instant) -> Option<Job> {
        self.storage.as_deref_mut()?.log.poll_job(now)
    }

    /// When the log or its retention next needs the loop although nothing happens.
    pub(super) fn storage_deadline(&self) -> Option<Instant> {
        let d = self.storage.as_deref()?;
        let at = d
            .log
            .next_deadline()
            .map_or(d.retention_at, |t| t.min(d.retention_at));
        // Never a deadline in the past: the loop would spin until the job completes.
        Some(at.max(self.now + Duration::from_millis(1)))
    }

    /// Runs retention over the log when it is due.
    pub(super) fn run_storage_timers(&mut self) {
        let now = self.now;
        let now_ms = self.now_ms();
        let config = self.config.clone();
        let Some(d) = self.storage.as_deref_mut() else {
            return;
        };
        if now < d.retention_at {
            return;
        }
        d.retention_at = now + RETENTION_EVERY;
        d.log.apply_retention(now_ms, &|name: &RoomName| {
            config.retention_for(name.name.as_str())
        });
    }

    /// Copies the log's metrics into this worker's stats (for `/metrics`); once a second.
    pub(super) fn publish_storage_metrics(&self) {
        if let Some(d) = self.storage.as_deref() {
            *self.stats.storage.lock() = Some(d.log.metrics());
        }
    }

    /// Takes the log out for a clean close (the runtime syncs and checkpoints it).
    pub fn take_storage(&mut self) -> Option<WorkerLog> {
        Some(self.storage.take()?.log)
    }

    /// A page of `room`'s history after `after` from the log, for a request that starts
    /// before the in-memory tail (`mem_first`, the first sequence memory holds; `head` the
    /// room's). `None` when the log has nothing there either (memory's answer, with its
    /// gap, stands).
    pub(super) fn disk_page(
        &mut self,
        room: &RoomName,
        after: u64,
        (mem_first, head): (u64, u64),
        max_bytes: usize,
        max_msgs: usize,
    ) -> Option<(Vec<StoredRef>, PageInfo)> {
        let accepted_at = self.now;
        let d = self.storage.as_deref_mut()?;
        let key = *d.log.state().keys.get(room)?;
        let mut msgs = Vec::new();
        let cap = (mem_first.saturating_sub(after + 1) as usize).min(max_msgs);
        let info = match d
            .log
            .read_page(key, after, max_bytes, cap.max(1), &mut msgs)
        {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!(room = %room.name, "storage: history read failed: {e}");
                return None;
            }
        };
        let last = msgs.last()?.seq;
        let out = msgs.into_iter().map(|m| stored(m, accepted_at)).collect();
        let info = PageInfo {
            gap: info.gap,
            complete: last >= head,
        };
        Some((out, info))
    }
}
