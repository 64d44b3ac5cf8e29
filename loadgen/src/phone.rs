//! One virtual phone: a TCP connection to the relay seen through its emulated [`Link`], a
//! [`ClientSession`] that survives reconnects, and an open-loop publishing schedule.
//!
//! Owns: the phone's connection life cycle (connect, HELLO, WELCOME, resume, drop, GOAWAY,
//! keepalive, reconnect with backoff), the byte path through the link in both directions,
//! and turning what arrives into measurements and ledger entries. Must not touch: the event
//! loop (the [`crate::worker`] calls [`Phone::step`] when the phone's socket is ready or its
//! timer is due, then asks [`Phone::next_wake`]), other phones.
//!
//! # The byte path
//! ```text
//! frames the phone makes -> up_pending -> link.offer(Up) [<= can_accept] -> link.poll_deliver(Up)
//!                        -> wbuf -> socket write
//! socket read [only while link.can_accept(Down) > 0] -> link.offer(Down) -> link.poll_deliver(Down)
//!                        -> rbuf -> Decoder -> ClientSession::apply -> events
//! ```
//! Reading stops when the link's downlink buffer is full, so the kernel's receive buffer
//! (kept small, `rcvbuf_bytes`) fills and TCP backpressure reaches the relay, as a slow
//! phone's would.
//!
//! # Files
//! This file owns the phone's record, its life cycle and its publishing schedule; beside
//! it, [`wire`] is the byte path above and [`inbound`] what the received frames mean
//! (measurements, ledger checks, ACKs).
//!
//! # Link time
//! For each publish the phone notes when the last byte of its PUBLISH was offered to the
//! uplink and when the link released it; the difference goes into [`UplinkTimes`]. For each
//! delivery the receiver knows when the last byte of the DELIVER was offered to its downlink
//! (read from the socket) and when it was released. Their sum is the link model's share of
//! that delivery; the rest of the end-to-end latency is the relay's (plus the loopback's and
//! loadgen's own scheduling, which the timer-lag histogram shows).

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use pabal_codec::{Ack, ClientFrame, ClientSession, Decoder, Limits, Ping};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::api::Tokens;
use crate::gaps::GapSeen;
use crate::ledger::{Conflict, Ledger, Msg};
use crate::link::{Direction, Link, LinkState, splitmix64};
use crate::metrics::Metrics;
use crate::payload::{FLAG_SENDER_IDLE, Header};
use crate::plan::Plan;
use crate::schedule::{Schedule, drop_after, uniform_ms};
use crate::targets::Targets;
pub use crate::uplink::UplinkTimes;
use crate::verify::{EndState, Kind, PhoneEnd, RoomEnd, Violation, Violations};

mod inbound;
mod wire;

/// How phones keep their connections (the run-wide part of the scenario).
#[derive(Debug, Clone)]
pub struct PhoneSettings {
    /// Heartbeat interval asked for in HELLO, seconds (0: the relay's).
    pub heartbeat_s: u32,
    /// Silence beyond the granted heartbeat before the phone probes with a PING.
    pub probe_after: Duration,
    /// Silence after the probe before the phone gives up on the connection.
    pub probe_timeout: Duration,
    /// Give up on a connection that has no WELCOME after this long.
    pub handshake_timeout: Duration,
    /// SO_RCVBUF of each socket (0: the kernel's).
    pub rcvbuf: usize,
    /// Cumulative ACKs at most this often (`None`: only those riding on publishes).
    pub ack_interval: Option<Duration>,
    /// Idle threshold for "first message after idle".
    pub idle_threshold: Duration,
    /// Scenario drops per phone per hour.
    pub drops_per_hour: f64,
    /// Backoff after any drop (scripted, handover, dead connection, closed by the relay), ms.
    pub drop_backoff_ms: [u64; 2],
}

impl Default for PhoneSettings {
    fn default() -> Self {
        PhoneSettings {
            heartbeat_s: 0,
            probe_after: Duration::from_secs(30),
            probe_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(15),
            rcvbuf: 16 * 1024,
            ack_interval: Some(Duration::from_secs(10)),
            idle_threshold: Duration::from_secs(20),
            drops_per_hour: 0.0,
            drop_backoff_ms: [500, 5000],
        }
    }
}

/// Everything the phones of every worker share.
#[derive(Debug)]
pub struct Shared {
    /// The population.
    pub plan: Plan,
    /// What the relay promised and what phones saw.
    pub ledger: Ledger,
    /// Uplink times of recent messages.
    pub uplink: UplinkTimes,
    /// The run's time origin.
    pub start: Instant,
    /// Publishing starts (no phone publishes before).
    pub steady_start: Instant,
    /// Publishing stops; the drain begins.
    pub publish_end: Instant,
    /// The relay's client addresses (a cluster's nodes) and which one a phone uses.
    pub targets: Targets,
    /// Tokens for HELLO.
    pub tokens: Tokens,
    /// Connection keeping.
    pub settings: PhoneSettings,
    /// Source addresses phones bind to (empty: the kernel's choice).
    pub source_ips: Vec<IpAddr>,
    /// Set by the main thread to end the run.
    pub stop: AtomicBool,
}

impl Shared {
    /// Ns since the start.
    pub fn since_start(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.start).as_nanos() as u64
    }
}

/// What a worker lends a phone for one step.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// Shared state.
    pub shared: &'a Shared,
    /// The worker's poll registry.
    pub registry: &'a Registry,
    /// The worker's metrics.
    pub metrics: &'a mut Metrics,
    /// The worker's violations.
    pub violations: &'a mut Violations,
    /// This second's end-to-end latencies.
    pub second: &'a mut Histogram<u64>,
    /// This second's relay-added latencies.
    pub second_relay: &'a mut Histogram<u64>,
    /// A read buffer.
    pub scratch: &'a mut [u8],
    /// Phones of the worker with a WELCOME.
    pub connected: &'a mut u64,
    /// GAPs received, judged at the end.
    pub gaps: &'a mut Vec<GapSeen>,
    /// Now.
    pub now: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Offline,
    Connecting,
    Handshake,
    Open,
}

#[derive(Debug, Clone)]
struct PhoneRoom {
    room: u32,
    alias: Option<u32>,
    /// (epoch, cursor) once bound at least once.
    known: Option<(u64, u64)>,
    /// The cursor last acknowledged to the relay.
    acked: u64,
    /// The last few messages received in this room on this binding (duplicate check).
    recent: [Msg; RECENT],
    /// Where the next one goes in `recent`.
    recent_at: u8,
    /// A violation in this room made the phone start over: its cursor is known to be off,
    /// and the ROOM that sets it right is not a second violation.
    resync: bool,
}

/// Messages a phone remembers per room to catch one delivered twice.
const RECENT: usize = 8;
const NO_MSG: Msg = Msg {
    sender: u32::MAX,
    counter: 0,
};

impl PhoneRoom {
    fn forget_recent(&mut self) {
        self.recent = [NO_MSG; RECENT];
    }

    /// After a misplaced delivery: the cursor is off, what was received may come again.
    fn start_over(&mut self) {
        self.forget_recent();
        self.resync = true;
    }

    /// Remembers `msg`; false if it was received just before.
    fn remember(&mut self, msg: Msg) -> bool {
        if self.recent.contains(&msg) {
            return false;
        }
        self.recent[self.recent_at as usize % RECENT] = msg;
        self.recent_at = self.recent_at.wrapping_add(1);
        true
    }
}

/// A publish awaiting its PUBACK.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    msg_id: u64,
    room: u32,
    counter: u32,
    intended_ms: u32,
}

#[derive(Debug, Clone, Copy)]
struct PubInUp {
    end: u64,
    counter: u32,
    offered: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct DownOffer {
    end: u64,
    at: Instant,
    idle: bool,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// Before WELCOME: refused, reset, timed out.
    Failed,
    /// A link handover, a scenario drop, a dead connection, the relay closing: reconnect after
    /// the drop backoff.
    Dropped,
    /// GOAWAY: after the hint.
    GoAway(Duration),
    /// A protocol error: reconnect after the failure backoff.
    Error,
}

/// One virtual phone.
#[derive(Debug)]
pub struct Phone {
    /// Global index (also the sender index in payloads).
    pub idx: u32,
    token: Token,
    profile: usize,
    seed: u64,
    rng: SmallRng,
    state: State,
    sock: Option<TcpStream>,
    link: Option<Link>,
    links_made: u64,
    session: ClientSession,
    decoder: Decoder,
    rbuf: BytesMut,
    wbuf: BytesMut,
    up_pending: BytesMut,
    readable: bool,
    writable: bool,
    eof: bool,
    up_produced: u64,
    up_offered: u64,
    up_released: u64,
    pubs_in_up: VecDeque<PubInUp>,
    down_released: u64,
    down_offered: u64,
    down_offers: VecDeque<DownOffer>,
    last_activity: Instant,
    rooms: Vec<PhoneRoom>,
    send_direct: Vec<usize>,
    send_groups: Vec<usize>,
    sched: Option<Schedule>,
    counter: u32,
    inflight: Vec<InFlight>,
    connect_started: Instant,
    reconnect_at: Option<Instant>,
    attempts: u32,
    /// How many times the phone left its target for the next ([`Targets::pick`]).
    target_moves: u32,
    ever_welcomed: bool,
    welcomed_at: Option<Instant>,
    granted_hb: Option<Duration>,
    last_rx: Instant,
    probe_sent: Option<Instant>,
    next_ack: Option<Instant>,
    next_drop: Option<Instant>,
    resume: Option<Vec<(usize, u64)>>,
    last_deliver: Option<Instant>,
    /// Why the last connection ended.
    last_close: Option<Why>,
    /// The instant the worker's timer heap holds for this phone.
    pub(crate) scheduled: Option<Instant>,
    /// Queued for a step in this loop iteration.
    pub(crate) dirty: bool,
}

impl Phone {
    /// Phone `idx` of the plan, polled under `token`, first connecting at `first_connect`.
    pub fn new(shared: &Shared, idx: u32, token: Token, first_connect: Instant) -> Phone {
        let plan = &shared.plan.phones[idx as usize];
        let rooms: Vec<PhoneRoom> = plan
            .rooms
            .iter()
            .map(|&room| PhoneRoom {
                room,
                alias: None,
                known: None,
                acked: 0,
                recent: [NO_MSG; RECENT],
                recent_at: 0,
                resync: false,
            })
            .collect();
        let slot_of = |r: &u32| rooms.iter().position(|pr| pr.room == *r);
        let (send_direct, send_groups) = match &plan.send {
            Some(s) => (
                s.direct.iter().filter_map(slot_of).collect(),
                s.groups.iter().filter_map(slot_of).collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        let mut rng = SmallRng::seed_from_u64(splitmix64(plan.seed ^ 0x7068_6f6e_6521));
        let next_drop =
            drop_after(&mut rng, shared.settings.drops_per_hour).map(|d| shared.steady_start + d);
        Phone {
            idx,
            token,
            profile: plan.profile,
            seed: plan.seed,
            rng,
            state: State::Offline,
            sock: None,
            link: None,
            links_made: 0,
            session: ClientSession::new(),
            decoder: Decoder::new(Limits::default()),
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            up_pending: BytesMut::new(),
            readable: false,
            writable: false,
            eof: false,
            up_produced: 0,
            up_offered: 0,
            up_released: 0,
            pubs_in_up: VecDeque::new(),
            down_released: 0,
            down_offered: 0,
            down_offers: VecDeque::new(),
            last_activity: first_connect,
            rooms,
            send_direct,
            send_groups,
            sched: None,
            counter: 0,
            inflight: Vec::new(),
            connect_started: first_connect,
            reconnect_at: Some(first_connect),
            attempts: 0,
            target_moves: 0,
            ever_welcomed: false,
            welcomed_at: None,
            granted_hb: None,
            last_rx: first_connect,
            probe_sent: None,
            next_ack: None,
            next_drop,
            resume: None,
            last_deliver: None,
            last_close: None,
            scheduled: None,
            dirty: false,
        }
    }

    /// Marks the socket readable/writable (from a readiness event).
    pub fn ready(&mut self, readable: bool, writable: bool) {
        self.readable |= readable;
        self.writable |= writable;
    }

    fn user<'s>(&self, shared: &'s Shared) -> &'s str {
        &shared.plan.phones[self.idx as usize].user
    }

    fn label(&self, shared: &Shared) -> String {
        format!("{} ({})", self.idx, self.user(shared))
    }

    /// Does whatever is due: connects, moves bytes through the link both ways, handles
    /// frames, fires timers.
    pub fn step(&mut self, ctx: &mut Ctx<'_>) {
        let now = ctx.now;
        if self.state == State::Offline && self.reconnect_at.is_some_and(|t| t <= now) {
            self.connect(ctx);
        }
        if self.state == State::Connecting {
            if self.writable {
                self.check_connected(ctx);
            } else if now >= self.connect_started + ctx.shared.settings.handshake_timeout {
                self.close(ctx, Why::Failed);
            }
        }
        self.publish_due(ctx);
        if matches!(self.state, State::Handshake | State::Open) {
            self.timers(ctx);
        }
        if matches!(self.state, State::Handshake | State::Open) {
            self.pump(ctx);
        }
    }

    /// When the phone next needs a step (besides socket readiness).
    pub fn next_wake(&self, now: Instant, shared: &Shared) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        consider(self.sched.as_ref().and_then(Schedule::next));
        let s = &shared.settings;
        match self.state {
            State::Offline => consider(self.reconnect_at),
            State::Connecting => consider(Some(self.connect_started + s.handshake_timeout)),
            State::Handshake | State::Open => {
                consider(self.link.as_ref().and_then(|l| l.next_event(now)));
                consider(self.next_ack);
                consider(self.next_drop);
                if self.state == State::Handshake {
                    consider(Some(self.connect_started + s.handshake_timeout));
                }
                consider(self.keepalive_deadline(s));
            }
        }
        next
    }

    fn keepalive_deadline(&self, s: &PhoneSettings) -> Option<Instant> {
        if self.state != State::Open {
            return None;
        }
        match self.probe_sent {
            Some(p) => Some(p + s.probe_timeout),
            None => self.granted_hb.map(|hb| self.last_rx + hb + s.probe_after),
        }
    }

    // -----------------------------------------------------------------------------------
    // Connecting
    // -----------------------------------------------------------------------------------

    fn connect(&mut self, ctx: &mut Ctx<'_>) {
        let now = ctx.now;
        self.reconnect_at = None;
        ctx.metrics.counters.connects += 1;
        self.connect_started = now;
        match self.open_socket(ctx.shared) {
            Ok(mut sock) => {
                if let Err(e) = ctx.registry.register(
                    &mut sock,
                    self.token,
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    tracing::warn!(phone = self.idx, "cannot register a socket: {e}");
                    self.state = State::Connecting;
                    return self.close(ctx, Why::Failed);
                }
                self.sock = Some(sock);
                self.state = State::Connecting;
                self.readable = false;
                self.writable = false;
            }
            Err(e) => {
                tracing::debug!(phone = self.idx, "connect failed: {e}");
                self.state = State::Connecting;
                self.close(ctx, Why::Failed);
            }
        }
    }

    fn open_socket(&self, shared: &Shared) -> std::io::Result<TcpStream> {
        let target = shared.targets.pick(self.idx, self.target_moves);
        let socket = Socket::new(
            Domain::for_address(target),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        if shared.settings.rcvbuf > 0 {
            socket.set_recv_buffer_size(shared.settings.rcvbuf)?;
        }
        if !shared.source_ips.is_empty() {
            let ip = shared.source_ips[self.idx as usize % shared.source_ips.len()];
            socket.bind(&SocketAddr::new(ip, 0).into())?;
        }
        match socket.connect(&target.into()) {
            Ok(()) => {}
            // EINPROGRESS (115 on Linux): the non-blocking connect is under way.
            Err(e) if e.raw_os_error() == Some(115) || e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        Ok(TcpStream::from_std(socket.into()))
    }

    fn check_connected(&mut self, ctx: &mut Ctx<'_>) {
        let Some(sock) = &self.sock else { return };
        match sock.take_error() {
            Ok(None) => {}
            _ => return self.close(ctx, Why::Failed),
        }
        match sock.peer_addr() {
            Ok(_) => self.on_connected(ctx),
            Err(e) if e.kind() == ErrorKind::NotConnected => self.writable = false,
            Err(_) => self.close(ctx, Why::Failed),
        }
    }

    fn on_connected(&mut self, ctx: &mut Ctx<'_>) {
        let now = ctx.now;
        let shared = ctx.shared;
        let calm = now >= shared.publish_end;
        let profiles = if calm {
            &shared.plan.calm_profiles
        } else {
            &shared.plan.profiles
        };
        self.links_made += 1;
        let seed = splitmix64(self.seed ^ self.links_made.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        self.link = Some(Link::new(profiles[self.profile].clone(), seed, now));
        self.last_activity = now;
        self.last_rx = now;
        let token = match shared.tokens.token_for(self.user(shared)) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(phone = self.idx, "no token: {e:#}");
                return self.close(ctx, Why::Error);
            }
        };
        let hb = shared.plan.phones[self.idx as usize]
            .heartbeat_s
            .unwrap_or(shared.settings.heartbeat_s);
        let hello = self.session.hello(token, hb);
        self.send_frame(&hello);
        for r in &mut self.rooms {
            r.alias = None;
        }
        let bound: Vec<(u32, u64)> = self.session.rooms().map(|(a, r)| (a, r.room_id)).collect();
        for (alias, id) in bound {
            if let Some(slot) = self.slot_of_id(shared, id) {
                self.rooms[slot].alias = Some(alias);
            }
        }
        if self.ever_welcomed {
            // Resume: caught up once every room reaches the head known now.
            let targets = self
                .rooms
                .iter()
                .enumerate()
                .filter(|(_, r)| r.known.is_some())
                .map(|(i, r)| (i, shared.ledger.last_acked(r.room)))
                .collect();
            self.resume = Some(targets);
        }
        self.state = State::Handshake;
        self.writable = true;
    }

    fn slot_of_id(&self, shared: &Shared, room_id: u64) -> Option<usize> {
        let room = *shared.plan.room_by_id.get(&room_id)?;
        self.rooms.iter().position(|r| r.room == room)
    }

    fn slot_of_alias(&self, alias: u32) -> Option<usize> {
        self.rooms.iter().position(|r| r.alias == Some(alias))
    }

    fn send_frame(&mut self, frame: &ClientFrame) {
        let before = self.up_pending.len();
        frame.encode(&mut self.up_pending);
        self.up_produced += (self.up_pending.len() - before) as u64;
    }

    /// Ends the connection (a reset, like a phone losing its network) and schedules the next.
    fn close(&mut self, ctx: &mut Ctx<'_>, why: Why) {
        let now = ctx.now;
        if let Some(mut sock) = self.sock.take() {
            let _ = ctx.registry.deregister(&mut sock);
            let _ = SockRef::from(&sock).set_linger(Some(Duration::ZERO));
        }
        match self.state {
            State::Open => *ctx.connected = ctx.connected.saturating_sub(1),
            State::Connecting | State::Handshake => ctx.metrics.counters.connect_failures += 1,
            State::Offline => {}
        }
        let c = &mut ctx.metrics.counters;
        c.unacked_at_close += self.inflight.len() as u64;
        self.inflight.clear();
        self.link = None;
        self.rbuf = BytesMut::new();
        self.wbuf = BytesMut::new();
        self.up_pending = BytesMut::new();
        self.pubs_in_up.clear();
        self.down_offers.clear();
        (self.up_produced, self.up_offered, self.up_released) = (0, 0, 0);
        (self.down_offered, self.down_released) = (0, 0);
        (self.readable, self.writable, self.eof) = (false, false, false);
        self.probe_sent = None;
        self.next_ack = None;
        self.resume = None;
        self.granted_hb = None;
        self.welcomed_at = None;
        if ctx.shared.targets.moves_after(matches!(why, Why::Failed)) {
            self.target_moves = self.target_moves.wrapping_add(1);
        }
        let delay = match why {
            Why::Failed | Why::Error => {
                let base = 500u64 << self.attempts.min(6);
                self.attempts += 1;
                let ms = (base as f64 * (0.5 + self.rng.random::<f64>())).min(30_000.0);
                Duration::from_millis(ms as u64)
            }
            Why::Dropped => uniform_ms(&mut self.rng, ctx.shared.settings.drop_backoff_ms),
            Why::GoAway(d) => d,
        };
        self.state = State::Offline;
        self.last_close = Some(why);
        self.reconnect_at = Some(now + delay);
    }

    /// A scenario event drops this phone's connection; it comes back after `backoff`.
    pub fn force_drop(&mut self, ctx: &mut Ctx<'_>, backoff: [u64; 2]) {
        if matches!(
            self.state,
            State::Handshake | State::Open | State::Connecting
        ) {
            ctx.metrics.counters.scripted_drops += 1;
            self.close(ctx, Why::Dropped);
            self.reconnect_at = Some(ctx.now + uniform_ms(&mut self.rng, backoff));
        }
    }

    /// Draws whether a scenario event with `share` affects this phone.
    pub fn draw(&mut self, share: f64) -> bool {
        self.rng.random::<f64>() < share
    }

    // -----------------------------------------------------------------------------------
    // Timers
    // -----------------------------------------------------------------------------------

    fn publish_due(&mut self, ctx: &mut Ctx<'_>) {
        let now = ctx.now;
        for _ in 0..10_000 {
            let Some(sched) = &mut self.sched else { return };
            let Some(t) = sched.next() else { return };
            if t > now {
                return;
            }
            sched.advance(&mut self.rng);
            self.publish_one(t, ctx);
        }
    }

    fn publish_one(&mut self, intended: Instant, ctx: &mut Ctx<'_>) {
        let shared = ctx.shared;
        if self.state != State::Open {
            ctx.metrics.counters.skipped_offline += 1;
            return;
        }
        let Some(plan) = &shared.plan.phones[self.idx as usize].send else {
            return;
        };
        let use_groups = match (self.send_direct.is_empty(), self.send_groups.is_empty()) {
            (true, true) => return,
            (true, false) => true,
            (false, true) => false,
            (false, false) => self.rng.random::<f64>() < plan.group_share,
        };
        let pool = if use_groups {
            &self.send_groups
        } else {
            &self.send_direct
        };
        let bound = pool
            .iter()
            .filter(|&&s| self.rooms[s].alias.is_some())
            .count();
        if bound == 0 {
            ctx.metrics.counters.skipped_unbound += 1;
            return;
        }
        let pick = self.rng.random_range(0..bound);
        let Some(&slot) = pool
            .iter()
            .filter(|&&s| self.rooms[s].alias.is_some())
            .nth(pick)
        else {
            return;
        };
        let Some(alias) = self.rooms[slot].alias else {
            return;
        };
        self.counter += 1;
        let now = ctx.now;
        let idle =
            now.saturating_duration_since(self.last_activity) >= shared.settings.idle_threshold;
        let header = Header {
            intended_ns: shared.since_start(intended),
            sender: self.idx,
            counter: self.counter,
            flags: if idle { FLAG_SENDER_IDLE } else { 0 },
        };
        let payload = header.payload(plan.payload_bytes);
        let room = &mut self.rooms[slot];
        let ack = room.known.map(|(_, c)| c).filter(|&c| c > room.acked);
        if let Some(c) = ack {
            room.acked = c;
        }
        let room_idx = room.room;
        let (msg_id, frame) = self.session.publish(alias, payload, ack);
        self.inflight.push(InFlight {
            msg_id,
            room: room_idx,
            counter: self.counter,
            intended_ms: ms_u32(header.intended_ns),
        });
        self.send_frame(&frame);
        self.pubs_in_up.push_back(PubInUp {
            end: self.up_produced,
            counter: self.counter,
            offered: None,
        });
        ctx.metrics.counters.published += 1;
    }

    fn timers(&mut self, ctx: &mut Ctx<'_>) {
        let now = ctx.now;
        let s = &ctx.shared.settings;
        if self.state == State::Handshake && now >= self.connect_started + s.handshake_timeout {
            return self.close(ctx, Why::Failed);
        }
        if let Some(at) = self.next_drop
            && at <= now
        {
            // Scenario drops stop with publishing, so that the drain can settle.
            let end = ctx.shared.publish_end;
            self.next_drop = drop_after(&mut self.rng, s.drops_per_hour)
                .map(|d| now + d)
                .filter(|&t| t < end);
            // A drop due while the phone was away already happened, in effect.
            if at < end && at >= self.connect_started {
                ctx.metrics.counters.scripted_drops += 1;
                return self.close(ctx, Why::Dropped);
            }
        }
        if let Some(deadline) = self.keepalive_deadline(s)
            && now >= deadline
        {
            if self.probe_sent.is_some() {
                ctx.metrics.counters.keepalive_timeouts += 1;
                return self.close(ctx, Why::Dropped);
            }
            self.probe_sent = Some(now);
            ctx.metrics.counters.probes += 1;
            self.send_frame(&ClientFrame::Ping(Ping::default()));
        }
        if self.next_ack.is_some_and(|t| t <= now) {
            self.next_ack = None;
            let mut pairs = Vec::new();
            for r in &mut self.rooms {
                if let (Some(alias), Some((_, cursor))) = (r.alias, r.known)
                    && cursor > r.acked
                {
                    r.acked = cursor;
                    pairs.push((alias, cursor));
                }
            }
            for chunk in pairs.chunks(256) {
                self.send_frame(&ClientFrame::Ack(Ack::from_pairs(chunk)));
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Bytes
    // -----------------------------------------------------------------------------------

    // -----------------------------------------------------------------------------------
    // Frames
    // -----------------------------------------------------------------------------------

    // -----------------------------------------------------------------------------------
    // The end
    // -----------------------------------------------------------------------------------

    /// Whether the phone holds everything the relay acknowledged in each of its rooms and
    /// awaits no PUBACK. A phone between connections counts if its cursors are caught up:
    /// it has nothing left to receive, and it will resume from there.
    pub fn settled(&self, ledger: &Ledger) -> bool {
        self.inflight.is_empty()
            && self
                .rooms
                .iter()
                .all(|r| r.known.is_some_and(|(_, c)| c >= ledger.last_acked(r.room)))
    }

    /// How the phone stands at the end of the run.
    pub fn end(&self, now: Instant, shared: &Shared) -> PhoneEnd {
        let live_link = self
            .link
            .as_ref()
            .is_some_and(|l| l.state(now) == LinkState::Open);
        let state = if self.state != State::Open || !live_link {
            EndState::Offline
        } else if self
            .link
            .as_ref()
            .is_some_and(|l| l.pending_bytes(Direction::Down) > 0)
            || !self.rbuf.is_empty()
            || self
                .last_deliver
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(2))
        {
            EndState::Receiving
        } else {
            EndState::Quiet
        };
        PhoneEnd {
            phone: self.label(shared),
            state,
            welcomed: self.ever_welcomed,
            unacked: self.inflight.len() as u32,
            waiting_for_hint: self.state == State::Offline
                && matches!(self.last_close, Some(Why::GoAway(_)))
                && self.reconnect_at.is_some_and(|t| t > now),
            rooms: self
                .rooms
                .iter()
                .filter_map(|r| {
                    r.known.map(|(_, cursor)| RoomEnd {
                        room: r.room,
                        cursor,
                    })
                })
                .collect(),
            never_bound: self.rooms.iter().filter(|r| r.known.is_none()).count() as u32,
        }
    }
}

/// Ns since the start as ms, saturating (49 days).
fn ms_u32(ns: u64) -> u32 {
    u32::try_from(ns / 1_000_000).unwrap_or(u32::MAX)
}

/// Records a ledger contradiction as a violation of the phone it names.
fn report_conflict(c: &Conflict, ctx: &mut Ctx<'_>) {
    ctx.violations
        .add(conflict_violation(c, &ctx.shared.plan), 1);
}

/// A ledger contradiction as a violation, naming the phone and room.
pub fn conflict_violation(c: &Conflict, plan: &Plan) -> Violation {
    let kind = match c {
        Conflict::Reordered { .. } => Kind::Reordered,
        Conflict::Duplicate { .. } => Kind::Duplicate,
        Conflict::Content { .. } | Conflict::AckedTwice { .. } | Conflict::OutOfRange { .. } => {
            Kind::Content
        }
    };
    Violation {
        kind,
        phone: c.phone().and_then(|p| {
            plan.phones
                .get(p as usize)
                .map(|pp| format!("{p} ({})", pp.user))
        }),
        room: plan.rooms.get(c.room() as usize).map(|r| r.name.clone()),
        detail: c.to_string(),
    }
}
