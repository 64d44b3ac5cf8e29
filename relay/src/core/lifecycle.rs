//! Connection and worker lifecycle: admitting a connection, closing it (gracefully, with its
//! last frame, or at once), the one timer per connection (handshake, heartbeat, linger),
//! bytes sent, reloads, and the shutdown drain with its two fences.
//!
//! Owns: connection slots, timers, shutdown progress. Must not touch: rooms' streams (only
//! through delivery and messages to owners), sockets.

use std::cmp::Reverse;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pabal_codec::{ErrorCode, ErrorFrame, GoAway, GoAwayReason, ServerFrame, Text};

use super::*;
use crate::config::Config;
use crate::conn::{BucketRates, Conn, Phase, RateBuckets, Stamp};
use crate::ids::RoomName;
use crate::io::Token;
use crate::mesh::CoreMsg;
use crate::stats::{dec, inc};

impl Core {
    /// Admits a connection whose socket is set up: a slot, a token, the handshake deadline,
    /// and, past the connection cap or the accept rate, a GOAWAY(overload). `None` only if
    /// this worker has no slot left (2^32 connections).
    pub fn admit(&mut self, now: Instant, peer: SocketAddr) -> Option<Token> {
        self.advance_to(now);
        let total = self.shared.connections.fetch_add(1, Ordering::Relaxed) + 1;
        let overloaded =
            total > self.config.limits.max_connections || !self.accept_bucket.take(self.now);
        let limits = &self.config.limits;
        let stamp = self.clock.stamp(self.now);
        let buckets = RateBuckets::full(BucketRates::from(limits), stamp);
        let conn = Conn::new(stamp, self.config.heartbeat.interval, buckets);
        let Ok(key) = self.conns.insert(conn) else {
            self.shared.connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        };
        let token = token_of(key);
        tracing::trace!(%peer, token, "connection admitted");
        inc(&self.stats.connections, 1);
        inc(&self.stats.accepted, 1);
        let deadline = self.now + self.config.auth.handshake_timeout;
        self.arm(token, deadline);
        if overloaded {
            // Shed load without amplifying it: tell the phone when to come back, spread
            // over the reconnect window, instead of a bare reset it would retry at once.
            inc(&self.stats.overload_refusals, 1);
            let spread = self.config.shutdown.reconnect_spread.as_millis().max(1) as u64;
            let retry_after_ms = 1000 + self.random() % spread;
            self.goaway(
                token,
                GoAwayReason::Overload,
                retry_after_ms,
                Text::from_static("relay busy; retry later"),
            );
        }
        Some(token)
    }

    /// Begins a graceful close: stop decoding, flush what is queued, half-close, wait
    /// briefly for the peer's EOF.
    pub(super) fn begin_close(&mut self, token: Token) {
        let now = self.now;
        let Core { conns, dirty, .. } = self;
        let Some(conn) = conn_in(conns, token) else {
            return;
        };
        if conn.phase() == Phase::Closing {
            return;
        }
        conn.set_phase(Phase::Closing);
        conn.rare_mut().closing_since = Some(now);
        conn.rbuf = None;
        Self::mark_dirty(dirty, token, conn);
        self.arm(token, now + LINGER);
    }

    /// Closes at once (a dead peer, a linger that ran out).
    pub(super) fn close_now(&mut self, token: Token) {
        if self.drop_conn(token) {
            self.to_close.push(token);
        }
    }

    /// Ends a connection with a fatal ERROR as its last frame. Publishes it sent before
    /// are answered first ([`Phase::Failing`]): a client stops reading at the ERROR, so a
    /// PUBACK after it would be lost and the message published twice.
    pub(super) fn fatal(&mut self, token: Token, code: ErrorCode, message: String) {
        inc(&self.stats.protocol_errors, 1);
        tracing::debug!(token, ?code, %message, "closing connection on protocol error");
        let frame = ServerFrame::Error(ErrorFrame {
            code,
            fatal: true,
            reference: 0,
            message: Text::from(message),
        });
        let now = self.now;
        let Core { conns, dirty, .. } = self;
        let Some(conn) = conn_in(conns, token) else {
            return;
        };
        match conn.phase() {
            Phase::Failing | Phase::Closing => {}
            Phase::Handshake | Phase::Open if conn.publishes_in_flight > 0 => {
                conn.set_phase(Phase::Failing);
                conn.rare_mut().fatal = Some(frame);
                conn.rbuf = None;
                conn.set_reading(false);
                Self::mark_dirty(dirty, token, conn);
                self.arm(token, now + LINGER);
            }
            Phase::Handshake | Phase::Open => {
                conn.write(&frame);
                self.begin_close(token);
            }
        }
    }

    /// A failing connection's publishes are all answered (or their time ran out): the fatal
    /// ERROR goes out last, and the connection closes.
    pub(super) fn finish_failing(&mut self, token: Token) {
        let Some(conn) = self.conn(token).filter(|c| c.phase() == Phase::Failing) else {
            return;
        };
        if let Some(frame) = conn.rare.as_mut().and_then(|r| r.fatal.take()) {
            conn.write(&frame);
        }
        self.begin_close(token);
    }

    /// Writes GOAWAY as the connection's last frame and closes it (a failing connection's
    /// last frame stays its ERROR).
    pub(super) fn goaway(
        &mut self,
        token: Token,
        reason: GoAwayReason,
        retry_after_ms: u64,
        message: Text,
    ) {
        if self
            .conn(token)
            .is_some_and(|c| c.phase() == Phase::Failing)
        {
            return self.finish_failing(token);
        }
        self.write(
            token,
            &ServerFrame::GoAway(GoAway {
                reason,
                retry_after_ms,
                message,
            }),
        );
        self.begin_close(token);
    }

    /// Forgets a connection and everything it subscribed. Returns whether it existed.
    pub(super) fn drop_conn(&mut self, token: Token) -> bool {
        let Some(conn) = self.conns.remove(key_of(token)) else {
            return false;
        };
        dec(&self.stats.connections, 1);
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
        if conn.lagging() {
            dec(&self.stats.lagging, 1);
        }
        for sub in conn.subs.into_bound() {
            if !sub.is_pending() {
                self.unsubscribe_local(&sub.room, token);
            }
        }
        if let Some(user) = conn.user {
            let last = self.users.remove(&user, token);
            self.directory.disconnect(&user, self.id);
            self.cluster_release(&user);
            if last {
                self.cluster_user_gone(&user);
            }
        }
        true
    }

    /// Removes a connection from a room's local fan-out list and tells the owner.
    pub(super) fn unsubscribe_local(&mut self, room: &RoomName, token: Token) {
        if let Some(list) = self.local.get_mut(room) {
            list.remove_token(token);
            if list.is_empty() {
                self.local.remove(room);
            }
        }
        let core = self.id;
        self.send_to_owner(
            room,
            CoreMsg::Unsubscribed {
                room: room.clone(),
                core,
            },
        );
    }

    /// The batch in flight for a connection was written.
    pub fn on_sent(&mut self, now: Instant, token: Token, _bytes: usize) {
        self.advance_to(now);
        let low_water = self.low_water();
        let Some(conn) = self.conn(token) else { return };
        conn.batch_sent();
        let drained = conn.queued() <= low_water;
        let lagging = conn.lagging();
        // Flush again: more output may be queued, reading may resume, or a close proceeds.
        let Core { conns, dirty, .. } = self;
        if let Some(conn) = conn_in(conns, token) {
            Self::mark_dirty(dirty, token, conn);
        }
        if drained {
            self.flush_ephemeral_backlog(token);
            if lagging {
                self.request_pages(token);
            }
        }
    }

    /// The peer closed the connection or it failed.
    pub fn on_closed(&mut self, now: Instant, token: Token) {
        self.advance_to(now);
        self.drop_conn(token);
    }

    pub(super) fn begin_drain(&mut self) {
        if self.shutdown.draining {
            return;
        }
        self.shutdown.draining = true;
        self.shutdown.deadline = Some(self.now + self.config.shutdown.grace);
        self.close_listeners = true;
        // Stop reading: no publish from this worker's clients after this point.
        for (key, conn) in self.conns.iter_mut_keyed() {
            conn.set_reading(false);
            Self::mark_dirty(&mut self.dirty, token_of(key), conn);
        }
        for core in 0..self.cores {
            self.send_to(core, CoreMsg::Fence { round: 1 });
        }
    }

    pub(super) fn on_fence(&mut self, round: u8) {
        let i = usize::from(round.clamp(1, 2) - 1);
        self.shutdown.fences[i] += 1;
        if self.shutdown.fences[i] < self.cores {
            return;
        }
        if round == 1 {
            // Every publish bound for rooms owned here has arrived and been accepted, so
            // every delivery from here is already in the outboxes ahead of this fence.
            for core in 0..self.cores {
                self.send_to(core, CoreMsg::Fence { round: 2 });
            }
            return;
        }
        // Every delivery acknowledged anywhere before the drain has reached this worker.
        self.shutdown.goaways_sent = true;
        let spread = self.config.shutdown.reconnect_spread.as_millis() as u64;
        let tokens: Vec<Token> = self.tokens();
        for token in tokens {
            if self
                .conn(token)
                .is_some_and(|c| c.phase() == Phase::Handshake)
            {
                self.close_now(token);
                continue;
            }
            let retry_after_ms = if spread == 0 {
                0
            } else {
                self.random() % spread
            };
            self.goaway(
                token,
                GoAwayReason::Shutdown,
                retry_after_ms,
                Text::from_static("relay shutting down"),
            );
        }
    }

    /// Runs every timer that is due.
    pub fn run_timers(&mut self, now: Instant) {
        self.advance_to(now);
        let now = self.now;
        if self.shutdown.deadline.is_some_and(|d| now >= d) && !self.shutdown.stop {
            tracing::info!(
                core = self.id,
                remaining = self.connection_count(),
                "shutdown grace period over; closing the rest"
            );
            self.handle_one(CoreMsg::Stop);
        }
        let now_ms = self.clock.elapsed_ms(now);
        while let Some(Reverse((at, token))) = self.timers.peek().copied() {
            if at > now_ms {
                break;
            }
            self.timers.pop();
            // Truncating to 32 bits is the modulo (see `Stamp`).
            let at = Stamp(at as u32);
            let Some(conn) = self.conn(token) else {
                continue;
            };
            if conn.timer_at() != Some(at) {
                continue; // superseded by a sooner deadline
            }
            conn.set_timer_at(None);
            self.on_timer(token);
        }
        // After a storm of connections has gone, the heap gives back what it no longer
        // needs (at most once per quartering of its entries).
        let (len, capacity) = (self.timers.len(), self.timers.capacity());
        if capacity > 4 * len + TIMER_HEAP_STEP {
            self.timers.shrink_to(len + len / 4 + TIMER_HEAP_STEP);
        }
        self.evict_idle_rooms();
        self.send_due_receipts();
        self.run_storage_timers();
        self.run_handoff_timers();
    }

    /// The connection's deadline came: handshake timeout, heartbeat, a failing connection's
    /// last chance, or the end of a linger. Re-arms the next deadline.
    pub(super) fn on_timer(&mut self, token: Token) {
        let now = self.now;
        let handshake_timeout = self.config.auth.handshake_timeout;
        let timeout = self.config.heartbeat.timeout;
        let (clock, stamp) = (self.clock, self.clock.stamp(now));
        let rates = BucketRates::from(&self.config.limits);
        let Some(conn) = self.conn(token) else { return };
        match conn.phase() {
            Phase::Handshake => {
                let deadline = clock.instant_of(conn.accepted_at(), now) + handshake_timeout;
                if now >= deadline {
                    self.goaway(
                        token,
                        GoAwayReason::HandshakeTimeout,
                        0,
                        Text::from_static("no HELLO in time"),
                    );
                } else {
                    self.arm(token, deadline);
                }
            }
            Phase::Open => {
                // Keeps the buckets' stamp young (see `Stamp`): a heartbeat comes at
                // least once an interval.
                conn.buckets.settle(stamp, rates);
                let quiet_until = clock.instant_of(conn.last_rx, now)
                    + Duration::from_millis(conn.heartbeat_ms.into());
                if let Some(sent) = conn.ping_sent() {
                    let sent = clock.instant_of(sent, now);
                    if now >= sent + timeout {
                        inc(&self.stats.heartbeat_timeouts, 1);
                        tracing::debug!(token, "peer silent after ping; closing");
                        self.goaway(
                            token,
                            GoAwayReason::Timeout,
                            0,
                            Text::from_static("no answer to the heartbeat"),
                        );
                    } else {
                        self.arm(token, sent + timeout);
                    }
                } else if now >= quiet_until {
                    conn.set_ping_sent(stamp);
                    conn.ping();
                    let Core { conns, dirty, .. } = self;
                    if let Some(conn) = conn_in(conns, token) {
                        Self::mark_dirty(dirty, token, conn);
                    }
                    self.arm(token, now + timeout);
                } else {
                    self.arm(token, quiet_until);
                }
            }
            Phase::Failing => {
                // The owners' answers are overdue (they never should be): fail now.
                self.finish_failing(token);
            }
            Phase::Closing => {
                let closing_since = conn.rare.as_ref().and_then(|r| r.closing_since);
                if closing_since.is_some_and(|t| now >= t + LINGER) {
                    self.close_now(token);
                } else if let Some(t) = closing_since {
                    self.arm(token, t + LINGER);
                }
            }
        }
    }

    /// Applies what can change live; owned rooms take the new retention, connections the
    /// new publish limits.
    pub(super) fn reload(&mut self, config: Arc<Config>) {
        for (room, owned) in &mut self.owned {
            // A room without a history takes the retention when it makes one.
            if let Some(history) = owned.history_mut() {
                history.set_retention(config.retention_for(room.name.as_str()));
            }
        }
        // Connections' buckets take the new rates and bursts at their next take.
        let limits = &config.limits;
        self.directory
            .set_max_blocked_per_user(limits.max_blocked_per_user);
        let rate = limits.new_connections_per_second / self.cores as f64;
        self.accept_bucket.reconfigure(rate, rate.max(1.0));
        self.config = config;
    }

    /// Sums the bytes queued on every connection into the gauge (once a second).
    pub fn sample_queues(&mut self) {
        let total: usize = self.conns.iter().map(Conn::queued).sum();
        self.stats
            .queued_bytes
            .store(total as u64, Ordering::Relaxed);
        self.publish_storage_metrics();
    }
}
