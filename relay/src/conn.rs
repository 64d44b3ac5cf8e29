//! One client connection's state on its worker: read buffer, outbound queue, bound aliases
//! and their stream positions, heartbeat bookkeeping.
//!
//! Owns: the bytes queued for one socket and the per-alias cursors that decide how each
//! DELIVER is encoded. Must not touch: other connections, rooms, the backend (the worker
//! hands the queue to the backend when it flushes).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pabal_codec::{DeliverContext, DeliverHeader, ServerFrame, Text};

use crate::ids::RoomName;
use crate::io::Token;
use crate::mesh::StartFrom;

/// Payloads at least this long travel as their own shared buffer in the send batch (a
/// vectored send) instead of being copied into the connection's buffer.
pub const SHARED_PAYLOAD_MIN: usize = 2048;

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            tokens: burst,
            rate,
            burst,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Changes the rate and burst (a reload), keeping the tokens already earned.
    pub fn reconfigure(&mut self, rate: f64, burst: f64) {
        self.rate = rate;
        self.burst = burst;
        self.tokens = self.tokens.min(burst);
    }
}

/// Where a connection stands in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepted; waiting for HELLO.
    Handshake,
    /// Open.
    Open,
    /// A fatal error is decided but publishes this connection sent before it are still
    /// with their rooms' owners: their PUBACKs go out first, then the ERROR, so the ERROR is
    /// the last frame. Nothing is read or delivered meanwhile.
    Failing,
    /// Closing: the last frame is queued; flushing it, then half-closed, waiting for the
    /// peer's EOF. Nothing more is written.
    Closing,
}

/// How a bound alias is being fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubMode {
    /// Asked the room's owner; waiting for its answer. Deliveries are ignored.
    Pending,
    /// Behind the room's head: fed page by page from history, not from live deliveries.
    CatchingUp {
        /// A page request is in flight.
        fetching: bool,
    },
    /// At the head: fed by live deliveries.
    Live,
}

/// A bound alias.
#[derive(Debug, Clone)]
pub struct Sub {
    /// The room.
    pub room: RoomName,
    /// How the binding was asked for (decides whether a ROOM frame is needed).
    pub from: StartFrom,
    /// The epoch of the room's stream.
    pub epoch: u64,
    /// The client's cursor: the last sequence it has accounted for. DELIVER omits the
    /// sequence when it is `cursor + 1`.
    pub cursor: u64,
    /// The last sequence processed for this connection, including the client's own
    /// messages that are skipped rather than echoed (`position >= cursor`).
    pub position: u64,
    /// How it is fed.
    pub mode: SubMode,
    /// The highest sequence the client acknowledged (never past `position`).
    pub acked: u64,
    /// The membership this binding was made for (its serial; see `JoinPoint::serial`): a
    /// removal of another membership leaves it alone.
    pub membership: u64,
    /// The subscription request this binding waits for (or was answered by): answers to
    /// any other request, e.g. one still in flight from an earlier membership, are stale.
    pub request: u64,
}

/// One client connection.
#[derive(Debug)]
pub struct Conn {
    /// The backend's token.
    pub token: Token,
    /// Relay-wide id, sent in WELCOME.
    pub id: u64,
    /// Where it stands.
    pub phase: Phase,
    /// Bytes received but not yet decoded (at most one partial frame).
    pub rbuf: BytesMut,
    out: BytesMut,
    /// Batches ready for the backend, in order.
    pub pending: VecDeque<Bytes>,
    pending_bytes: usize,
    inflight_bytes: usize,
    /// A batch is with the backend.
    pub sending: bool,
    /// In the worker's list of connections to flush this tick.
    pub dirty: bool,
    /// The authenticated user, once open.
    pub user: Option<Text>,
    /// Bound aliases (index = alias).
    pub subs: Vec<Option<Sub>>,
    /// DELIVER encoding state.
    pub ctx: DeliverContext,
    /// Fed from history because the queue hit its cap.
    pub lagging: bool,
    /// Page requests in flight.
    pub fetches: usize,
    /// Latest ephemeral event per (alias, sender) held back while the queue is full.
    pub ephemeral_backlog: Vec<(u32, Text, u64, Bytes)>,
    /// When the connection was accepted.
    pub accepted_at: Instant,
    /// Last time anything arrived.
    pub last_rx: Instant,
    /// A heartbeat PING is outstanding since then.
    pub ping_sent: Option<Instant>,
    /// The negotiated heartbeat interval.
    pub heartbeat: Duration,
    /// When closing began.
    pub closing_since: Option<Instant>,
    /// Half-closed already.
    pub shut: bool,
    /// Publishes allowed per second.
    pub publish_bucket: TokenBucket,
    /// SUBSCRIBE and UNSUBSCRIBE frames allowed per second.
    pub subscribe_bucket: TokenBucket,
    /// Publishes sent to their rooms' owners and not yet answered.
    pub publishes_in_flight: u32,
    /// The fatal ERROR to send once `publishes_in_flight` reaches zero ([`Phase::Failing`]).
    pub fatal: Option<Box<ServerFrame>>,
    /// Aliases unbound (LEFT sent) that may not be bound again yet, each with the number of
    /// the relay PING whose PONG frees it: until the client has answered a PING sent after
    /// the LEFT, a frame naming the alias may still be one it sent for the old room.
    pub retired: Vec<(u32, u64)>,
    /// PINGs the relay sent on this connection, and PONGs the client answered with.
    pub pings_sent: u64,
    /// See `pings_sent`.
    pub pongs_seen: u64,
    /// A PING must follow the LEFTs queued since the last one (see `retired`).
    pub retire_ping_due: bool,
    /// The one heartbeat/handshake/linger deadline in force; timer entries for any other
    /// time are stale and ignored, so a connection has exactly one timer chain.
    pub timer_at: Option<Instant>,
    /// What the token allows (`None` without auth: everything a client may do).
    pub claims: Option<Box<crate::auth::Claims>>,
    /// A service connection (trusted app server): exempt from the publish rate limit and
    /// allowed to publish anywhere.
    pub service: bool,
    /// Protocol v2: who this connection publishes as, a hash of the user and HELLO's device
    /// id; its publishes' ids are `(publisher, msg_id)`, recognised by rooms when repeated.
    /// 0: version 1 or no device id (no recognition).
    pub publisher: u64,
    /// Reading is wanted by the protocol (false while draining for shutdown).
    pub reading: bool,
    /// Whether the backend is currently reading this socket (it starts reading on accept).
    pub backend_reading: bool,
}

impl Conn {
    /// A new connection in the handshake phase.
    pub fn new(
        token: Token,
        id: u64,
        now: Instant,
        heartbeat: Duration,
        publish_bucket: TokenBucket,
        subscribe_bucket: TokenBucket,
    ) -> Self {
        Conn {
            token,
            id,
            phase: Phase::Handshake,
            rbuf: BytesMut::new(),
            out: BytesMut::new(),
            pending: VecDeque::new(),
            pending_bytes: 0,
            inflight_bytes: 0,
            sending: false,
            dirty: false,
            user: None,
            subs: Vec::new(),
            ctx: DeliverContext::new(0, 1),
            lagging: false,
            fetches: 0,
            ephemeral_backlog: Vec::new(),
            accepted_at: now,
            last_rx: now,
            ping_sent: None,
            heartbeat,
            closing_since: None,
            shut: false,
            publish_bucket,
            subscribe_bucket,
            publishes_in_flight: 0,
            fatal: None,
            timer_at: None,
            retired: Vec::new(),
            pings_sent: 0,
            pongs_seen: 0,
            retire_ping_due: false,
            claims: None,
            service: false,
            publisher: 0,
            reading: true,
            backend_reading: true,
        }
    }

    /// Bytes queued or in flight.
    pub fn queued(&self) -> usize {
        self.out.len() + self.pending_bytes + self.inflight_bytes
    }

    /// Whether anything waits to be handed to the backend.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty() || !self.pending.is_empty()
    }

    /// Whether frames may still be queued: not once closing, when the last frame (a GOAWAY
    /// or a fatal ERROR) is already queued and the socket is about to be half-closed.
    pub fn writable(&self) -> bool {
        self.phase != Phase::Closing
    }

    /// Whether the session is open for deliveries (not handshaking, failing or closing).
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// Queues a frame (dropped once closing: see [`Conn::writable`]).
    pub fn write(&mut self, frame: &ServerFrame) {
        if self.writable() {
            frame.encode(&mut self.out);
        }
    }

    /// Queues a DELIVER: the per-connection header, then the shared payload (copied when
    /// small, referenced when large). Dropped once closing.
    pub fn write_deliver(&mut self, header: &DeliverHeader, payload: &Bytes) {
        if !self.writable() {
            return;
        }
        header.encode_prefix(payload.len(), &mut self.out);
        if payload.len() >= SHARED_PAYLOAD_MIN {
            let head = self.out.split().freeze();
            self.pending_bytes += head.len() + payload.len();
            self.pending.push_back(head);
            self.pending.push_back(payload.clone());
        } else {
            self.out.extend_from_slice(payload);
        }
    }

    /// Moves everything queued into `pending` for a send; returns the batch's size.
    pub fn take_batch(&mut self) -> usize {
        if !self.out.is_empty() {
            let tail = self.out.split().freeze();
            self.pending_bytes += tail.len();
            self.pending.push_back(tail);
        }
        let bytes = self.pending_bytes;
        self.inflight_bytes = bytes;
        self.pending_bytes = 0;
        self.sending = true;
        bytes
    }

    /// The backend finished the batch in flight.
    pub fn batch_sent(&mut self) {
        self.inflight_bytes = 0;
        self.sending = false;
    }

    /// The lowest free alias: unbound and not retired (see [`Conn::retired`]).
    pub fn free_alias(&mut self) -> u32 {
        let retired = &self.retired;
        let free = self
            .subs
            .iter()
            .enumerate()
            .position(|(i, s)| s.is_none() && !retired.iter().any(|&(a, _)| a as usize == i));
        match free {
            Some(i) => i as u32,
            None => {
                self.subs.push(None);
                (self.subs.len() - 1) as u32
            }
        }
    }

    /// An alias was unbound with a LEFT: it stays out of use until the client answers the
    /// PING that will follow the LEFT (queued at the next flush).
    pub fn retire(&mut self, alias: u32) {
        self.retired.push((alias, self.pings_sent + 1));
        self.retire_ping_due = true;
    }

    /// Queues a PING (heartbeat or retirement), counting it.
    pub fn ping(&mut self) {
        self.write(&ServerFrame::Ping(pabal_codec::Ping::default()));
        self.pings_sent += 1;
        self.retire_ping_due = false;
    }

    /// The client answered a PING: aliases retired before it are free again.
    pub fn pong(&mut self) {
        self.pongs_seen = (self.pongs_seen + 1).min(self.pings_sent);
        let seen = self.pongs_seen;
        self.retired.retain(|&(_, ping)| ping > seen);
    }

    /// The alias bound to `room`, if any.
    pub fn alias_of(&self, room: &RoomName) -> Option<u32> {
        self.subs
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| &s.room == room))
            .map(|i| i as u32)
    }

    /// The sub bound to `alias`, if it is bound to `room`.
    pub fn sub_for(&mut self, alias: u32, room: &RoomName) -> Option<&mut Sub> {
        self.subs
            .get_mut(alias as usize)?
            .as_mut()
            .filter(|s| &s.room == room)
    }

    /// Bound aliases.
    pub fn bound(&self) -> usize {
        self.subs.iter().filter(|s| s.is_some()).count()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 3.0, t0);
        assert!(b.take(t0) && b.take(t0) && b.take(t0));
        assert!(!b.take(t0), "burst spent");
        assert!(
            b.take(t0 + Duration::from_millis(100)),
            "one token per 100 ms"
        );
        assert!(!b.take(t0 + Duration::from_millis(150)));
        // Idle for long: never more than the burst.
        let later = t0 + Duration::from_secs(60);
        assert!(b.take(later) && b.take(later) && b.take(later));
        assert!(!b.take(later));
    }
}
