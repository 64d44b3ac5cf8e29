//! The engine's connections to its shards: a shard is dialed on its first need
//! (the first command or subscription routed to one of its slots, an `ASK` naming it;
//! the one Redis and the Sentinel master up front), its commands wait on the connection
//! while it dials (bounded: [`super::super::shard::DIAL_QUEUE_MAX`]), each loop turn moves
//! the dials on, what waited for a connection is queued once one starts (what did not fit
//! while it dialed, once it connects), and a failed dial refuses what waited for that
//! shard (publishes, opens, users' first loads) and backs off.
//! On a Redis Cluster a shard no longer needed (no room or user channel on its slots,
//! nothing in flight, no command routed to it for `cluster.shard_idle`) has its
//! connections closed; its next need dials it again.
//!
//! Silence (`cluster.reply_timeout`): each connection is sent a `PING` once connected
//! (it counts as up only once Redis answered on it) and whenever it has been idle that
//! long; one awaiting Redis (a command in flight, a `PING`) that hears nothing for that
//! long is lost as if Redis had closed it. The timers run on the engine's clock (`now`),
//! like every other.
//!
//! Owns: when shards are dialed and let go, and what a dial's outcome does. Must not
//! touch: the sockets and name resolution (`dial.rs`, `shard.rs`), what the commands mean.

use std::io;
use std::time::Instant;

use bytes::Bytes;

use super::super::resp;
use super::super::shard::{BACKOFF_MIN, Conn, Pending, Progress, Retry, Shard};
use super::super::{EngineEvent, Topology};
use super::{Engine, SubState};

impl Engine {
    /// The shard serving `key`, if the slot map is known, dialing it on this first need
    /// (its commands wait on the connection until it is up); `None` too while it dials
    /// with [`super::shard::DIAL_QUEUE_MAX`] commands waiting (the command is refused
    /// `unavailable` or waits, as when the engine is down).
    pub(super) fn route(&mut self, key: &[u8]) -> Option<usize> {
        let i = self.map.as_ref().map(|m| m.shard_of_key(key))?;
        self.need(i);
        (!self.shards.get(i)?.queue_full()).then_some(i)
    }

    /// Shard `i` is needed: its connections are dialed now unless they are up, dialing,
    /// or waiting for their backoff.
    pub(super) fn need(&mut self, i: usize) {
        let Some(shard) = self.shards.get_mut(i) else {
            return;
        };
        shard.last_used = self.woke;
        if !shard.wanted {
            shard.wanted = true;
            self.redial(i, Instant::now());
        }
    }

    /// On a Redis Cluster, closes the connections of the shards no longer needed: no room
    /// or user channel on their slots, nothing in flight or held, no command routed to
    /// them for `cluster.shard_idle`. Looked at every quarter of it (it walks the
    /// channels); returns when to look next.
    pub(super) fn release_idle_shards(&mut self, now: Instant) -> Option<Instant> {
        if self.topology != Topology::Cluster {
            return None;
        }
        if now < self.idle_check_at {
            return Some(self.idle_check_at);
        }
        let idle = self.config.shard_idle;
        self.idle_check_at = now + idle / 4;
        let mut in_use = vec![false; self.shards.len()];
        let on = self.channels.values().filter_map(|c| c.shard);
        for i in on.chain(self.users.values().filter_map(|w| w.shard)) {
            if let Some(used) = in_use.get_mut(i) {
                *used = true;
            }
        }
        for (i, shard) in self.shards.iter_mut().enumerate() {
            if in_use[i] || !shard.inflight.is_empty() || !shard.held.is_empty() {
                shard.last_used = now;
            }
            if !shard.wanted || now.saturating_duration_since(shard.last_used) < idle {
                continue;
            }
            for conn in [shard.cmd.as_mut(), shard.sub.as_mut()]
                .into_iter()
                .flatten()
            {
                conn.deregister(self.poll.registry());
            }
            shard.cmd = None;
            shard.sub = None;
            shard.wanted = false;
            shard.wait_due = false;
            shard.copies.lost(&mut self.out);
            shard.cmd_retry = Retry::now();
            shard.sub_retry = Retry::now();
            tracing::info!(worker = self.worker, node = %self.node_id, addr = %shard.addr, "engine connections to a shard no longer needed closed (cluster.shard_idle)");
        }
        self.note_health();
        Some(self.idle_check_at)
    }

    /// Starts dialing shard `i`'s connections that are in use, down and past their
    /// backoff.
    fn redial(&mut self, i: usize, now: Instant) {
        let timeout = self.config.connect_timeout;
        let (cmd_token, sub_token) = Shard::tokens(i);
        let Some(shard) = self.shards.get_mut(i).filter(|s| s.wanted) else {
            return;
        };
        if shard.cmd.is_none() && now >= shard.cmd_retry.at {
            shard.cmd = Some(Conn::dial(&shard.addr, cmd_token, now, timeout));
            self.dialed = true;
        }
        if shard.sub.is_none() && now >= shard.sub_retry.at {
            shard.sub = Some(Conn::dial(&shard.addr, sub_token, now, timeout));
            self.dialed = true;
        }
    }

    /// Moves shard `i`'s command (`pubsub` false) or pub/sub connection's dial on: up, or
    /// failed (what waited on it fails as with a lost connection, and it is redialed with
    /// backoff).
    fn advance_dial(&mut self, i: usize, pubsub: bool, now: Instant) {
        let Some(shard) = self.shards.get_mut(i) else {
            return;
        };
        let (conn, retry) = if pubsub {
            (shard.sub.as_mut(), &mut shard.sub_retry)
        } else {
            (shard.cmd.as_mut(), &mut shard.cmd_retry)
        };
        let Some(conn) = conn else {
            return;
        };
        match conn.advance(self.poll.registry(), &mut self.resolver, now) {
            Ok(Progress::Same) => {}
            Ok(Progress::Connected) => {
                retry.delay = BACKOFF_MIN;
                let what = if pubsub { "pub/sub" } else { "command" };
                tracing::info!(worker = self.worker, node = %self.node_id, addr = %shard.addr, "engine {what} connection up");
                // Up once Redis answers on it (a peer that only accepts is not).
                self.ping(i, pubsub, now);
                self.note_health();
                // What could not wait on it while it dialed ([`Shard::queue_full`]) went
                // back to its waiting list: queued now (`after_dials`), it has room.
                self.dialed |= !pubsub;
            }
            Err(e) if pubsub => {
                self.fail_sub(i, &e);
                self.fail_opens(i);
                // The users whose channel waited on this dial: their first load (a
                // parked HELLO) is refused `unavailable` now, not kept waiting for a
                // shard that did not answer (one already loaded keeps what it has).
                for w in self.users.values().filter(|w| w.shard == Some(i)) {
                    self.out.push(EngineEvent::UserLoadFailed {
                        user: w.user.clone(),
                        over_cap: None,
                    });
                }
            }
            Err(e) => {
                self.fail_cmd(i, &e);
                self.fail_opens(i);
            }
        }
    }

    /// Writes a `PING` on shard `i`'s command (`pubsub` false) or pub/sub connection: it
    /// now awaits an answer (`cluster.reply_timeout`).
    fn ping(&mut self, i: usize, pubsub: bool, now: Instant) {
        let Some(shard) = self.shards.get_mut(i) else {
            return;
        };
        let conn = if pubsub {
            shard.sub.as_mut()
        } else {
            shard.cmd.as_mut()
        };
        let Some(conn) = conn else {
            return;
        };
        resp::encode(&mut conn.wbuf, [&b"PING"[..]].into_iter());
        conn.awaiting.get_or_insert(now);
        if !pubsub {
            shard.inflight.push_back((Pending::Ping, 0));
        }
    }

    /// `cluster.reply_timeout` on every connection that is up: one awaiting Redis (a
    /// command in flight, a `PING`) with nothing heard for that long is lost (closed,
    /// what was in flight failed as when Redis closes it, redialed with backoff); one
    /// idle that long is sent a `PING`. Returns when the next is due.
    pub(super) fn silence_timers(&mut self, now: Instant) -> Option<Instant> {
        let limit = self.config.reply_timeout;
        // With `cluster.wait_replicas`, a `WAIT` may hold a command connection for
        // `cluster.wait_timeout` before it answers.
        let cmd_limit = match self.config.wait_replicas {
            0 => limit,
            _ => limit + self.config.wait_timeout,
        };
        let (mut lost, mut pings) = (Vec::new(), Vec::new());
        let mut next: Option<Instant> = None;
        for (i, shard) in self.shards.iter_mut().enumerate() {
            let busy = !shard.inflight.is_empty();
            for (pubsub, conn) in [(false, shard.cmd.as_mut()), (true, shard.sub.as_mut())] {
                let Some(conn) = conn.filter(|c| c.is_up()) else {
                    continue;
                };
                if !pubsub {
                    // Commands in flight are awaited from the pass that saw them.
                    conn.awaiting = match (busy, conn.awaiting) {
                        (false, _) => None,
                        (true, since) => Some(since.unwrap_or(now)),
                    };
                }
                let awaited = if pubsub { limit } else { cmd_limit };
                let due = match conn.awaiting {
                    Some(since) if now >= since + awaited => {
                        lost.push((i, pubsub));
                        continue;
                    }
                    Some(since) => since + awaited,
                    None if now >= conn.heard + limit => {
                        pings.push((i, pubsub));
                        now + limit
                    }
                    None => conn.heard + limit,
                };
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        for (i, pubsub) in pings {
            self.ping(i, pubsub, now);
        }
        for (i, pubsub) in lost {
            let e = io::Error::new(
                io::ErrorKind::TimedOut,
                "no answer from Redis within cluster.reply_timeout",
            );
            if pubsub {
                self.fail_sub(i, &e);
            } else {
                self.fail_cmd(i, &e);
            }
        }
        next
    }

    /// Shard `i` could not be dialed: the opens waiting for it are answered
    /// [`EngineEvent::OpenFailed`] (the owner refuses what waits for the room rather than
    /// keep it waiting for a shard that does not answer).
    fn fail_opens(&mut self, i: usize) {
        for c in self.channels.values_mut().filter(|c| c.shard == Some(i)) {
            if !c.opens.is_empty() {
                c.opens.clear();
                self.out.push(EngineEvent::OpenFailed {
                    room: c.room.clone(),
                });
            }
        }
    }

    /// Dials what is due and moves the dials in progress on; what waited for a connection
    /// is queued on those that started (which may need more shards: dialed in turn).
    pub(super) fn advance_connections(&mut self, now: Instant) {
        loop {
            for i in 0..self.shards.len() {
                self.redial(i, now);
                self.advance_dial(i, false, now);
                self.advance_dial(i, true, now);
            }
            if !self.dialed {
                return;
            }
            self.after_dials();
        }
    }

    /// Connections started dialing, or a command connection connected: what waited for
    /// one (subscriptions, opens, stream reads, receipts) is queued on them (it goes once
    /// they are connected). While a command connection dials, what is past
    /// [`super::super::shard::DIAL_QUEUE_MAX`] goes back to its waiting list, and is queued
    /// again when it connects.
    fn after_dials(&mut self) {
        if !std::mem::take(&mut self.dialed) {
            return;
        }
        self.route_channels();
        let ready: Vec<Bytes> = self
            .channels
            .iter()
            .filter(|(_, c)| {
                c.state == SubState::Subscribed
                    && !c.opens.is_empty()
                    && c.shard
                        .and_then(|i| self.shards.get(i))
                        .is_some_and(|s| s.cmd.is_some())
            })
            .map(|(k, _)| k.clone())
            .collect();
        for ch in ready {
            self.send_opens(&ch);
        }
        for (room, after, reader) in std::mem::take(&mut self.fills_waiting) {
            self.send_fill(room, after, reader, None, 0, false);
        }
        self.send_reads_due();
        self.send_receipts_waiting();
    }
}
