//! One worker's state machine: its connections, the rooms it owns, and the routing between
//! them. Sans-IO: it reacts to backend events ([`EventSink`]), to messages from other
//! workers ([`Core::handle`]) and to time ([`Core::run_timers`]), and it touches sockets only
//! through a [`Transport`] when [`Core::flush`] hands over what it queued. Tests drive it
//! with an in-memory transport.
//!
//! # Routing
//! Every room has one owner worker (by hash of its id). The owner assigns sequences, keeps
//! history, and knows which workers hold subscribed connections (a count per worker). A
//! publish travels to the owner; the owner sends the PUBACK to the publisher's worker and
//! then one delivery per interested worker; each worker fans out to its own connections,
//! encoding one small header per connection in front of the one shared payload.
//!
//! # No loss, no duplicate, at every seam
//! A connection binds a room by asking the owner ([`CoreMsg::Subscribe`]); until the answer
//! comes, live deliveries for it are ignored, and the answer carries everything after the
//! requested start up to the head as of the answer (or the first page of it). Because
//! messages between two workers keep their order, every delivery after the answer has a
//! higher sequence. A connection whose queue reaches its cap stops taking live deliveries
//! and catches up page by page from history as it drains, then goes live the same way.
//! Only history that retention already dropped becomes a GAP.
//!
//! Owns: connections, owned rooms, local subscriptions, timers. Must not touch: sockets
//! directly, other workers' state (only messages), the directory beyond membership calls.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pabal_codec::{
    ClientFrame, DecodeError, Decoder, DeliverContext, ErrorCode, ErrorFrame, GoAway, GoAwayReason,
    Left, LeftReason, Limits, PROTOCOL_VERSION, Pong, PubAck, Room, ServerFrame, Text, Welcome,
};
use socket2::{SockRef, TcpKeepalive};

use crate::config::{AuthMode, Config};
use crate::conn::{Conn, Phase, Sub, SubMode, TokenBucket};
use crate::directory::{Directory, DirectoryError};
use crate::history::History;
use crate::ids::{CoreId, Origin, RoomName, Stored, StoredRef};
use crate::io::{CloseReason, EventSink, Token};
use crate::mesh::{CoreMsg, Mesh, Page, StartFrom};
use crate::stats::{CoreStats, dec, inc};

/// Payloads shorter than this are copied out of the publisher's read buffer when accepted,
/// so that history never pins a whole receive buffer for a few bytes.
const COMPACT_BELOW: usize = 4096;
/// How long a closing connection may take to send its EOF after our half-close.
const LINGER: Duration = Duration::from_secs(2);
/// Ephemeral events held per lagging connection.
const EPHEMERAL_BACKLOG: usize = 64;
/// How long a room without members or subscribers waits before it is checked for eviction
/// (and rechecked while retention still holds messages of it).
const IDLE_ROOM_CHECK: Duration = Duration::from_secs(60);

/// What a worker needs from its I/O backend when it flushes. Every [`crate::io::Backend`]
/// is one; tests use an in-memory one.
pub trait Transport {
    /// Hands a batch to the socket (see [`crate::io::Backend::send`]).
    fn send(&mut self, token: Token, bufs: &mut std::collections::VecDeque<Bytes>);
    /// Pauses or resumes reading.
    fn set_reading(&mut self, token: Token, reading: bool);
    /// Half-closes after the batch in flight.
    fn shutdown_write(&mut self, token: Token);
    /// Closes now.
    fn close(&mut self, token: Token);
    /// Stops accepting.
    fn close_listeners(&mut self);
}

impl<B: crate::io::Backend + ?Sized> Transport for B {
    fn send(&mut self, token: Token, bufs: &mut std::collections::VecDeque<Bytes>) {
        crate::io::Backend::send(self, token, bufs)
    }
    fn set_reading(&mut self, token: Token, reading: bool) {
        crate::io::Backend::set_reading(self, token, reading)
    }
    fn shutdown_write(&mut self, token: Token) {
        crate::io::Backend::shutdown_write(self, token)
    }
    fn close(&mut self, token: Token) {
        crate::io::Backend::close(self, token)
    }
    fn close_listeners(&mut self) {
        crate::io::Backend::close_listeners(self)
    }
}

/// What all workers share: counted or swapped per connection or per reload, never touched
/// per message.
#[derive(Debug, Default)]
pub struct Shared {
    /// Connections open on the whole relay.
    pub connections: AtomicUsize,
    /// The token verifier (`None` without auth); swapped on reload.
    pub verifier: parking_lot::RwLock<Option<Arc<crate::auth::Verifier>>>,
}

/// A room this worker owns.
#[derive(Debug)]
struct OwnedRoom {
    epoch: u64,
    head: u64,
    history: History,
    /// Subscribed connections per worker.
    interest: Vec<u32>,
    /// Members (rooms) or subscribers (channels); the directory holds the same facts by
    /// user, and every change to both goes through this owner.
    members: HashSet<Text>,
    /// In the worker's queue of idle rooms to check for eviction.
    idle_queued: bool,
    /// The server API's recent `Idempotency-Key`s and the sequences they got.
    idempotency: crate::idempotency::IdempotencyWindow<u64>,
}

impl OwnedRoom {
    /// No members, no subscribed connection anywhere: only retained history keeps it.
    fn unused(&self) -> bool {
        self.members.is_empty() && self.interest.iter().all(|&n| n == 0)
    }
}

/// Shutdown progress.
#[derive(Debug, Default)]
struct Shutdown {
    draining: bool,
    fences: [usize; 2],
    goaways_sent: bool,
    deadline: Option<Instant>,
    stop: bool,
}

/// Wall-clock milliseconds derived from the monotonic clock (one `SystemTime` read at start).
#[derive(Debug, Clone, Copy)]
struct Clock {
    base: Instant,
    base_unix_ms: u64,
}

impl Clock {
    fn new() -> Self {
        let base_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Clock {
            base: Instant::now(),
            base_unix_ms,
        }
    }

    fn unix_ms(&self, now: Instant) -> u64 {
        self.base_unix_ms + now.saturating_duration_since(self.base).as_millis() as u64
    }
}

/// One worker's state.
#[derive(Debug)]
pub struct Core {
    id: CoreId,
    cores: usize,
    config: Arc<Config>,
    decoder: Decoder,
    directory: Arc<Directory>,
    mesh: Mesh,
    outbox: Vec<Vec<CoreMsg>>,
    conns: Vec<Option<Conn>>,
    free_slots: Vec<u32>,
    generation: u32,
    next_conn_id: u64,
    dirty: Vec<Token>,
    to_close: Vec<Token>,
    close_listeners: bool,
    owned: HashMap<RoomName, OwnedRoom>,
    local: HashMap<RoomName, Vec<(Token, u32)>>,
    users: HashMap<Text, Vec<Token>>,
    timers: BinaryHeap<Reverse<(Instant, Token)>>,
    /// Owned rooms that became unused, oldest first, with when to check them.
    idle_rooms: VecDeque<(Instant, RoomName)>,
    /// The next subscription request's id (answers are matched per request).
    next_request: u64,
    /// When this worker started (for `connection.restart_grace`).
    booted: Instant,
    /// The last epoch given to a room created here.
    last_epoch: u64,
    epoch: u64,
    clock: Clock,
    now: Instant,
    shutdown: Shutdown,
    stats: Arc<CoreStats>,
    rng: u64,
    /// State shared by all workers (touched per connection, never per message).
    shared: Arc<Shared>,
    accept_bucket: TokenBucket,
}

fn slot_of(token: Token) -> usize {
    (token & 0xffff_ffff) as usize
}

/// Advances an alias past `msg`: the header to write, or `None` when the message is the
/// connection's own (its position moves past it, its client cursor does not: the client
/// accounted for it at PUBACK). The one rule for live and replayed deliveries alike.
fn advance(
    ctx: &mut DeliverContext,
    sub: &mut Sub,
    alias: u32,
    msg: &Stored,
    me: Origin,
) -> Option<pabal_codec::DeliverHeader> {
    sub.position = msg.seq;
    if msg.origin == Some(me) {
        return None;
    }
    let header = ctx.header(alias, Some(msg.seq), sub.cursor, &msg.sender, msg.ts_ms);
    sub.cursor = msg.seq;
    Some(header)
}

/// The live connection for `token` in a slab (for methods that borrow other fields of the
/// core at the same time).
fn conn_in(conns: &mut [Option<Conn>], token: Token) -> Option<&mut Conn> {
    conns
        .get_mut(slot_of(token))?
        .as_mut()
        .filter(|c| c.token == token)
}

impl Core {
    /// A worker's state. `epoch` is the relay's boot epoch: every room created in this
    /// process starts its stream in it.
    pub fn new(
        id: CoreId,
        config: Arc<Config>,
        directory: Arc<Directory>,
        mesh: Mesh,
        epoch: u64,
        stats: Arc<CoreStats>,
        shared: Arc<Shared>,
    ) -> Self {
        let cores = mesh.cores();
        let accept_rate = config.limits.new_connections_per_second / cores as f64;
        let limits = Limits {
            max_frame_len: config.connection.max_frame_len,
            ..Limits::default()
        };
        let clock = Clock::new();
        directory.set_max_blocked_per_user(config.limits.max_blocked_per_user);
        Core {
            id,
            cores,
            decoder: Decoder::new(limits),
            config,
            directory,
            mesh,
            outbox: (0..cores).map(|_| Vec::new()).collect(),
            conns: Vec::new(),
            free_slots: Vec::new(),
            generation: 0,
            next_conn_id: 0,
            dirty: Vec::new(),
            to_close: Vec::new(),
            close_listeners: false,
            owned: HashMap::new(),
            local: HashMap::new(),
            users: HashMap::new(),
            timers: BinaryHeap::new(),
            idle_rooms: VecDeque::new(),
            next_request: 0,
            booted: clock.base,
            last_epoch: 0,
            epoch,
            clock,
            now: Instant::now(),
            shutdown: Shutdown::default(),
            stats,
            rng: 0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9),
            shared,
            accept_bucket: TokenBucket::new(accept_rate, accept_rate.max(1.0), Instant::now()),
        }
    }

    /// Counts a loop iteration.
    pub fn tick(&self) {
        inc(&self.stats.ticks, 1);
    }

    /// Sets the time for the events that follow.
    pub fn set_now(&mut self, now: Instant) {
        self.now = now;
    }

    fn now_ms(&self) -> u64 {
        self.clock.unix_ms(self.now)
    }

    fn random(&mut self) -> u64 {
        // splitmix64: jitter only, not security.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Connections open on this worker.
    pub fn connection_count(&self) -> usize {
        self.conns.iter().filter(|c| c.is_some()).count()
    }

    /// The worker has finished its shutdown and its loop should end.
    pub fn finished(&self) -> bool {
        self.shutdown.stop || (self.shutdown.goaways_sent && self.conns.iter().all(Option::is_none))
    }

    /// How long the loop may sleep before a timer is due.
    pub fn next_timeout(&self) -> Option<Duration> {
        let mut next = self.timers.peek().map(|Reverse((at, _))| *at);
        if let Some(deadline) = self.shutdown.deadline {
            next = Some(next.map_or(deadline, |n| n.min(deadline)));
        }
        next.map(|at| at.saturating_duration_since(self.now))
    }

    fn conn(&mut self, token: Token) -> Option<&mut Conn> {
        conn_in(&mut self.conns, token)
    }

    fn origin(&self, token: Token) -> Origin {
        Origin {
            core: self.id,
            token,
        }
    }

    fn send_to(&mut self, core: CoreId, msg: CoreMsg) {
        self.outbox[core].push(msg);
    }

    fn send_to_owner(&mut self, room: &RoomName, msg: CoreMsg) {
        let owner = room.owner(self.cores);
        self.send_to(owner, msg);
    }

    fn mark_dirty(dirty: &mut Vec<Token>, conn: &mut Conn) {
        if !conn.dirty {
            conn.dirty = true;
            dirty.push(conn.token);
        }
    }

    fn write(&mut self, token: Token, frame: &ServerFrame) {
        let Core { conns, dirty, .. } = self;
        if let Some(conn) = conn_in(conns, token) {
            conn.write(frame);
            Self::mark_dirty(dirty, conn);
        }
    }

    /// Makes `at` the connection's deadline if it is sooner than the one in force. Each
    /// connection has one deadline ([`Conn::timer_at`]); heap entries for other times are
    /// stale and skipped, so a connection never carries two timer chains.
    fn arm(&mut self, token: Token, at: Instant) {
        let Some(conn) = conn_in(&mut self.conns, token) else {
            return;
        };
        if conn.timer_at.is_none_or(|t| at < t) {
            conn.timer_at = Some(at);
            self.timers.push(Reverse((at, token)));
        }
    }

    // ---------------------------------------------------------------------------------
    // Connection lifecycle
    // ---------------------------------------------------------------------------------

    fn configure_socket(&self, stream: &TcpStream) {
        let sock = SockRef::from(stream);
        let hb = &self.config.heartbeat;
        // The relay batches its own writes; Nagle would only add delay.
        let _ = sock.set_tcp_nodelay(true);
        // Kernel keepalive backs up the protocol heartbeat for peers that never finished
        // the handshake or whose app froze; unacknowledged data times out after the
        // heartbeat window so a vanished phone does not hold a socket for 15 minutes.
        let keepalive = TcpKeepalive::new()
            .with_time(hb.interval + hb.timeout)
            .with_interval(Duration::from_secs(15))
            .with_retries(4);
        let _ = sock.set_tcp_keepalive(&keepalive);
        let _ = sock.set_tcp_user_timeout(Some(hb.timeout + Duration::from_secs(60)));
    }

    /// Begins a graceful close: stop decoding, flush what is queued, half-close, wait
    /// briefly for the peer's EOF.
    fn begin_close(&mut self, token: Token) {
        let now = self.now;
        let Core { conns, dirty, .. } = self;
        let Some(conn) = conn_in(conns, token) else {
            return;
        };
        if conn.phase == Phase::Closing {
            return;
        }
        conn.phase = Phase::Closing;
        conn.closing_since = Some(now);
        conn.rbuf.clear();
        Self::mark_dirty(dirty, conn);
        self.arm(token, now + LINGER);
    }

    /// Closes at once (a dead peer, a linger that ran out).
    fn close_now(&mut self, token: Token) {
        if self.drop_conn(token) {
            self.to_close.push(token);
        }
    }

    /// Ends a connection with a fatal ERROR as its last frame. Publishes it sent before
    /// are answered first ([`Phase::Failing`]): a client stops reading at the ERROR, so a
    /// PUBACK after it would be lost and the message published twice.
    fn fatal(&mut self, token: Token, code: ErrorCode, message: String) {
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
        match conn.phase {
            Phase::Failing | Phase::Closing => {}
            Phase::Handshake | Phase::Open if conn.publishes_in_flight > 0 => {
                conn.phase = Phase::Failing;
                conn.fatal = Some(Box::new(frame));
                conn.rbuf.clear();
                conn.reading = false;
                Self::mark_dirty(dirty, conn);
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
    fn finish_failing(&mut self, token: Token) {
        let Some(conn) = self.conn(token).filter(|c| c.phase == Phase::Failing) else {
            return;
        };
        if let Some(frame) = conn.fatal.take() {
            conn.write(&frame);
        }
        self.begin_close(token);
    }

    fn refuse(&mut self, token: Token, code: ErrorCode, reference: u64, message: String) {
        self.write(
            token,
            &ServerFrame::Error(ErrorFrame {
                code,
                fatal: false,
                reference,
                message: Text::from(message),
            }),
        );
    }

    /// Forgets a connection and everything it subscribed. Returns whether it existed.
    fn drop_conn(&mut self, token: Token) -> bool {
        let slot = slot_of(token);
        let Some(conn) = self
            .conns
            .get_mut(slot)
            .and_then(|c| c.take_if(|c| c.token == token))
        else {
            return false;
        };
        self.free_slots.push(slot as u32);
        dec(&self.stats.connections, 1);
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
        if conn.lagging {
            dec(&self.stats.lagging, 1);
        }
        for sub in conn.subs.into_iter().flatten() {
            if sub.mode != SubMode::Pending {
                self.unsubscribe_local(&sub.room, token);
            }
        }
        if let Some(user) = conn.user {
            if let Some(tokens) = self.users.get_mut(&user) {
                tokens.retain(|&t| t != token);
                if tokens.is_empty() {
                    self.users.remove(&user);
                }
            }
            self.directory.disconnect(&user, self.id);
        }
        true
    }

    /// Removes a connection from a room's local fan-out list and tells the owner.
    fn unsubscribe_local(&mut self, room: &RoomName, token: Token) {
        if let Some(list) = self.local.get_mut(room) {
            if let Some(i) = list.iter().position(|&(t, _)| t == token) {
                list.swap_remove(i);
            }
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

    // ---------------------------------------------------------------------------------
    // Frames from clients
    // ---------------------------------------------------------------------------------

    fn on_frame(&mut self, token: Token, frame: ClientFrame) {
        inc(&self.stats.frames_in, 1);
        let Some(conn) = self.conn(token) else { return };
        let phase = conn.phase;
        match (phase, frame) {
            (Phase::Failing | Phase::Closing, _) => {}
            (Phase::Handshake, ClientFrame::Hello(hello)) => self.on_hello(token, hello),
            (Phase::Handshake, other) => self.fatal(
                token,
                ErrorCode::ProtocolViolation,
                format!("{} before HELLO", other.name()),
            ),
            (Phase::Open, ClientFrame::Hello(_)) => {
                self.fatal(token, ErrorCode::ProtocolViolation, "second HELLO".into())
            }
            (Phase::Open, ClientFrame::Subscribe(_) | ClientFrame::Unsubscribe(_))
                if !self.take_subscribe_budget(token) =>
            {
                inc(&self.stats.subscribe_rate_limited, 1);
                self.refuse(
                    token,
                    ErrorCode::RateLimited,
                    0,
                    "subscribe rate limit; slow down".into(),
                );
            }
            (Phase::Open, ClientFrame::Subscribe(s)) => self.on_subscribe(token, s.room, s.name),
            (Phase::Open, ClientFrame::Unsubscribe(u)) => {
                self.on_unsubscribe(token, u.alias, u.block)
            }
            (Phase::Open, ClientFrame::Publish(p)) => self.on_publish(token, p),
            (Phase::Open, ClientFrame::Ack(ack)) => {
                // PROTOCOL.md §12: an ACK of an unbound alias is ignored (a LEFT may be in
                // flight), and one past what was sent counts only up to what was sent.
                if let Some(conn) = self.conn(token) {
                    for (alias, seq) in ack.iter() {
                        if let Some(Some(sub)) = conn.subs.get_mut(alias as usize) {
                            sub.acked = sub.acked.max(seq.min(sub.position));
                        }
                    }
                }
            }
            (Phase::Open, ClientFrame::Ping(ping)) => {
                let granted = ping.interval_secs.map(|secs| {
                    let granted = self.negotiate_heartbeat(secs);
                    if let Some(conn) = self.conn(token) {
                        conn.heartbeat = Duration::from_secs(u64::from(granted));
                        let at = conn.last_rx + conn.heartbeat;
                        self.arm(token, at);
                    }
                    granted
                });
                self.write(
                    token,
                    &ServerFrame::Pong(Pong {
                        interval_secs: granted,
                    }),
                );
            }
            (Phase::Open, ClientFrame::Pong(_)) => {}
            (Phase::Open, ClientFrame::Bye) => self.begin_close(token),
        }
    }

    fn take_subscribe_budget(&mut self, token: Token) -> bool {
        let now = self.now;
        self.conn(token)
            .is_some_and(|c| c.service || c.subscribe_bucket.take(now))
    }

    fn negotiate_heartbeat(&self, asked_secs: u32) -> u32 {
        let hb = &self.config.heartbeat;
        if asked_secs == 0 {
            return hb.interval.as_secs() as u32;
        }
        (u64::from(asked_secs)).clamp(hb.min_interval.as_secs(), hb.max_interval.as_secs()) as u32
    }

    /// Checks HELLO's credential; the user and, with tokens, the claims.
    fn authenticate(
        &self,
        token: &Bytes,
    ) -> Result<(Text, Option<crate::auth::Claims>), (ErrorCode, String)> {
        let user = match self.config.auth.mode {
            AuthMode::None => {
                let user = Text::from_utf8(token.clone())
                    .map_err(|_| (ErrorCode::AuthFailed, "user id is not UTF-8".to_string()))?;
                (user, None)
            }
            AuthMode::Jwt => {
                let verifier = self.shared.verifier.read().clone();
                let Some(verifier) = verifier else {
                    return Err((ErrorCode::Internal, "no token keys loaded".to_string()));
                };
                let now_s = self.now_ms() / 1000;
                match verifier.verify(token, now_s) {
                    Ok(claims) => (Text::from(claims.user.as_str()), Some(claims)),
                    Err(e) if e.is_expiry() => {
                        return Err((ErrorCode::TokenExpired, e.to_string()));
                    }
                    Err(e) => return Err((ErrorCode::AuthFailed, e.to_string())),
                }
            }
        };
        if user.0.is_empty() || user.0.len() > self.decoder.limits().max_name_len {
            return Err((
                ErrorCode::AuthFailed,
                "user id must be 1..=255 bytes".to_string(),
            ));
        }
        Ok(user)
    }

    fn on_hello(&mut self, token: Token, hello: pabal_codec::Hello) {
        let (user, claims) = match self.authenticate(&hello.token) {
            Ok(found) => found,
            Err((code, message)) => {
                inc(&self.stats.auth_failures, 1);
                return self.fatal(token, code, message);
            }
        };
        // Register with the directory first: a refusal must come before the session opens.
        let rooms = match self.directory.connect(
            &user,
            self.id,
            self.config.limits.max_connections_per_user,
        ) {
            Ok(rooms) => rooms,
            Err(e) => {
                inc(&self.stats.limit_refusals, 1);
                return self.fatal(token, ErrorCode::LimitExceeded, e.to_string());
            }
        };
        let granted = self.negotiate_heartbeat(hello.heartbeat_secs);
        let now_ms = self.now_ms();
        let max_rooms = self.config.connection.max_rooms;
        let sender_aliases = self.config.connection.sender_aliases;
        let max_frame_len = self.config.connection.max_frame_len as u32;
        let Some(conn) = self.conn(token) else { return };
        conn.phase = Phase::Open;
        conn.user = Some(user.clone());
        conn.service = claims.as_ref().is_some_and(|c| c.service);
        conn.claims = claims.map(Box::new);
        conn.heartbeat = Duration::from_secs(u64::from(granted));
        conn.ctx = DeliverContext::new(now_ms, sender_aliases);
        let conn_id = conn.id;
        self.write(
            token,
            &ServerFrame::Welcome(Welcome {
                version: PROTOCOL_VERSION,
                conn_id,
                server_time_ms: now_ms,
                heartbeat_secs: granted,
                max_frame_len,
                user: user.clone(),
            }),
        );
        self.users.entry(user.clone()).or_default().push(token);

        // Resolve resume entries against the user's own rooms: entry i is alias i.
        let mut by_id: HashMap<u64, usize> = HashMap::with_capacity(rooms.len());
        for (i, (room, _)) in rooms.iter().enumerate() {
            by_id
                .entry(room.id)
                .and_modify(|slot| *slot = usize::MAX) // ambiguous: never resolve it
                .or_insert(i);
        }
        // An entry from an earlier run of the relay naming a room it does not know for
        // the user may only mean the app server has not re-sent membership yet.
        let restarted = self.now < self.booted + self.config.connection.restart_grace;
        let mut taken = vec![false; rooms.len()];
        let resume: Vec<_> = hello.resume.iter().collect();
        let mut subscribe = Vec::new();
        let mut left = Vec::new();
        let mut over_limit = Vec::new();
        let mut subs: Vec<Option<Sub>> = Vec::with_capacity(resume.len().max(rooms.len()));
        for (alias, entry) in resume.iter().enumerate() {
            match by_id.get(&entry.room_id) {
                Some(&i) if i != usize::MAX && !taken[i] => {
                    taken[i] = true;
                    if subscribe.len() >= max_rooms {
                        subs.push(None);
                        over_limit.push((Some(alias as u32), rooms[i].0.clone()));
                        continue;
                    }
                    let from = StartFrom::Resume {
                        epoch: entry.epoch,
                        last_seq: entry.last_seq,
                    };
                    let request = self.new_request();
                    subs.push(Some(pending_sub(rooms[i].0.clone(), from, request)));
                    subscribe.push((alias as u32, rooms[i].0.clone(), from, request));
                }
                _ => {
                    subs.push(None);
                    let reason = if restarted && entry.epoch < self.epoch {
                        LeftReason::Restarted
                    } else {
                        LeftReason::UnknownRoom
                    };
                    left.push((alias as u32, reason));
                }
            }
        }
        inc(&self.stats.resumes, subscribe.len() as u64);
        for (i, (room, join)) in rooms.into_iter().enumerate() {
            if taken[i] {
                continue;
            }
            if subscribe.len() >= max_rooms {
                over_limit.push((None, room));
                continue;
            }
            // Aliases answered with LEFT are not reused in this HELLO's answer (§6.5).
            let alias = match subs.iter().position(Option::is_none) {
                Some(a) if !left.iter().any(|&(l, _)| l == a as u32) => a,
                _ => {
                    subs.push(None);
                    subs.len() - 1
                }
            };
            let from = StartFrom::Join {
                epoch: join.epoch,
                seq: join.seq,
            };
            let request = self.new_request();
            subs[alias] = Some(pending_sub(room.clone(), from, request));
            subscribe.push((alias as u32, room, from, request));
        }
        if let Some(conn) = self.conn(token) {
            conn.subs = subs;
        }
        for (alias, reason) in left {
            self.write(token, &ServerFrame::Left(Left { alias, reason }));
        }
        for (alias, room) in over_limit {
            self.refuse_room_limit(token, alias, &room);
        }
        let origin = self.origin(token);
        for (alias, room, from, request) in subscribe {
            self.send_to_owner(
                &room.clone(),
                CoreMsg::Subscribe {
                    room,
                    origin,
                    alias,
                    user: user.clone(),
                    from,
                    request,
                },
            );
        }
        let next = self.now + Duration::from_secs(u64::from(granted));
        self.arm(token, next);
    }

    fn new_request(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    /// A room the connection cannot bind: it already holds `connection.max_rooms`. The
    /// client gets a non-fatal ERROR `LimitExceeded` naming the room (and, for a resume
    /// entry, a LEFT for its alias); the refusal is counted.
    fn refuse_room_limit(&mut self, token: Token, alias: Option<u32>, room: &RoomName) {
        inc(&self.stats.limit_refusals, 1);
        let max = self.config.connection.max_rooms;
        if let Some(alias) = alias {
            self.write(
                token,
                &ServerFrame::Left(Left {
                    alias,
                    reason: LeftReason::UnknownRoom,
                }),
            );
        }
        self.refuse(
            token,
            ErrorCode::LimitExceeded,
            room.id,
            format!("{}: a connection binds at most {max} rooms", room.name),
        );
    }

    fn on_subscribe(&mut self, token: Token, is_room: bool, name: Text) {
        let room = RoomName::new(!is_room, name);
        let Some(conn) = self.conn(token) else { return };
        let user = conn.user.clone().unwrap_or_default();
        if let Some(alias) = conn.alias_of(&room) {
            // Already bound: restate the binding so a client waiting for ROOM gets one.
            if let Some(Some(sub)) = conn.subs.get(alias as usize)
                && sub.mode != SubMode::Pending
            {
                let frame = room_frame(alias, sub, sub.position);
                self.write(token, &frame);
            }
            return;
        }
        if conn.bound() >= self.config.connection.max_rooms {
            let max = self.config.connection.max_rooms;
            return self.refuse(
                token,
                ErrorCode::LimitExceeded,
                0,
                format!("{}: a connection binds at most {max} rooms", room.name),
            );
        }
        let permitted = self
            .conn(token)
            .is_some_and(|c| match (&c.claims, is_room) {
                (None, _) => true, // no auth: development mode, clients manage themselves
                (Some(_), true) => c.service,
                (Some(claims), false) => claims.may_subscribe(room.name.as_str()),
            });
        if !permitted {
            let why = if is_room {
                "rooms are joined through the app server"
            } else {
                "the token does not allow this channel"
            };
            return self.refuse(
                token,
                ErrorCode::NotPermitted,
                0,
                format!("{}: {why}", room.name),
            );
        }
        let requester = Some(self.origin(token));
        self.send_to_owner(
            &room.clone(),
            CoreMsg::Join {
                room,
                user,
                unblock: false,
                requester,
            },
        );
    }

    fn on_unsubscribe(&mut self, token: Token, alias: u32, block: bool) {
        let Some(conn) = self.conn(token) else { return };
        let user = conn.user.clone().unwrap_or_default();
        let Some(Some(sub)) = conn.subs.get(alias as usize) else {
            return self.refuse(
                token,
                ErrorCode::UnknownAlias,
                u64::from(alias),
                format!("alias {alias} is not bound"),
            );
        };
        let room = sub.room.clone();
        let reason = if block {
            LeftReason::Blocked
        } else {
            LeftReason::Unsubscribed
        };
        self.send_to_owner(
            &room.clone(),
            CoreMsg::Leave {
                room,
                user,
                block,
                reason,
            },
        );
    }

    fn on_publish(&mut self, token: Token, p: pabal_codec::Publish) {
        let origin = self.origin(token);
        let now = self.now;
        let max_payload = self.config.limits.max_payload;
        let auth_none = self.config.auth.mode == AuthMode::None;
        let reference = p.msg_id.unwrap_or(0);
        if p.payload.len() > max_payload {
            inc(&self.stats.limit_refusals, 1);
            return self.refuse(
                token,
                ErrorCode::PayloadTooLarge,
                reference,
                format!("payload of {} bytes exceeds {max_payload}", p.payload.len()),
            );
        }
        let Some(conn) = self.conn(token) else { return };
        if !conn.service && !conn.publish_bucket.take(now) {
            inc(&self.stats.rate_limited, 1);
            return self.refuse(
                token,
                ErrorCode::RateLimited,
                reference,
                "publish rate limit; slow down".into(),
            );
        }
        let service = conn.service;
        let may_publish = |name: &str| {
            auth_none || service || conn.claims.as_ref().is_some_and(|c| c.may_publish(name))
        };
        let sender = conn.user.clone().unwrap_or_default();
        let Some(Some(sub)) = conn.subs.get_mut(p.alias as usize) else {
            let reference = p.msg_id.unwrap_or(0);
            return self.refuse(
                token,
                ErrorCode::UnknownAlias,
                reference,
                format!("alias {} is not bound", p.alias),
            );
        };
        if let Some(ack) = p.ack {
            sub.acked = sub.acked.max(ack.min(sub.position));
        }
        let room = sub.room.clone();
        if room.channel && !may_publish(room.name.as_str()) {
            // With tokens, a channel takes publishes from service connections and from
            // users whose token names it in `pub`; everyone else only reads it.
            return self.refuse(
                token,
                ErrorCode::NotPermitted,
                reference,
                format!("{}: publishing to this channel is not permitted", room.name),
            );
        }
        if p.msg_id.is_some() {
            // Answered by the owner's PUBACK; a fatal error waits for it (`fatal`).
            conn.publishes_in_flight += 1;
        }
        let msg = match p.msg_id {
            Some(msg_id) => CoreMsg::Publish {
                room: room.clone(),
                origin,
                alias: p.alias,
                sender,
                msg_id,
                payload: p.payload,
            },
            None => CoreMsg::Ephemeral {
                room: room.clone(),
                origin,
                sender,
                payload: p.payload,
            },
        };
        self.send_to_owner(&room, msg);
    }

    // ---------------------------------------------------------------------------------
    // Messages from workers
    // ---------------------------------------------------------------------------------

    /// Handles a batch from another worker (or from this one).
    pub fn handle(&mut self, batch: Vec<CoreMsg>) {
        for msg in batch {
            self.handle_one(msg);
        }
    }

    /// An owned room, created (in a fresh epoch) if this worker does not hold it.
    fn owned_room(&mut self, room: &RoomName) -> &mut OwnedRoom {
        if !self.owned.contains_key(room) {
            let epoch = self.fresh_epoch();
            self.create_room(room, epoch);
        }
        let Some(owned) = self.owned.get_mut(room) else {
            unreachable!("created above")
        };
        owned
    }

    fn create_room(&mut self, room: &RoomName, epoch: u64) {
        let retention = self.config.retention_for(room.name.as_str());
        self.owned.insert(
            room.clone(),
            OwnedRoom {
                epoch,
                head: 0,
                history: History::new(retention),
                interest: vec![0; self.cores],
                members: HashSet::new(),
                idle_queued: false,
                idempotency: crate::idempotency::IdempotencyWindow::new(),
            },
        );
        self.stats
            .rooms
            .store(self.owned.len() as u64, Ordering::Relaxed);
        // Unused until someone joins or subscribes; checked for eviction in a while.
        self.note_if_unused(room);
    }

    /// The epoch of a room created now: unique on this worker and never below the boot
    /// epoch, so a room evicted and created again never reuses the sequences of an earlier
    /// stream under the same epoch, and epochs from an earlier run of the relay stay below
    /// every epoch of this one.
    fn fresh_epoch(&mut self) -> u64 {
        let epoch = self.now_ms().max(self.epoch).max(self.last_epoch + 1);
        self.last_epoch = epoch;
        epoch
    }

    /// Queues an owned room for an eviction check if nothing but history keeps it.
    fn note_if_unused(&mut self, room: &RoomName) {
        let due = self.now + IDLE_ROOM_CHECK;
        if let Some(owned) = self.owned.get_mut(room)
            && owned.unused()
            && !owned.idle_queued
        {
            owned.idle_queued = true;
            self.idle_rooms.push_back((due, room.clone()));
        }
    }

    /// Evicts owned rooms that have had no members and no subscribers since their check
    /// was queued and whose retention has dropped every message; rooms still holding
    /// history are checked again later. Bounded: rooms nobody uses do not accumulate.
    fn evict_idle_rooms(&mut self) {
        let now = self.now;
        let now_ms = self.now_ms();
        let mut evicted = 0;
        while let Some((due, _)) = self.idle_rooms.front() {
            if *due > now {
                break;
            }
            let Some((_, room)) = self.idle_rooms.pop_front() else {
                break;
            };
            let Some(owned) = self.owned.get_mut(&room) else {
                continue;
            };
            owned.idle_queued = false;
            if !owned.unused() {
                continue;
            }
            owned.history.evict_expired(now_ms);
            if owned.history.is_empty() {
                self.owned.remove(&room);
                evicted += 1;
            } else {
                owned.idle_queued = true;
                self.idle_rooms.push_back((now + IDLE_ROOM_CHECK, room));
            }
        }
        if evicted > 0 {
            inc(&self.stats.rooms_evicted, evicted);
            self.stats
                .rooms
                .store(self.owned.len() as u64, Ordering::Relaxed);
        }
    }

    /// The floor of `user`'s stream of an owned room: the user's join point in the room's
    /// current epoch (everything of a later epoch was published after the join), or `None`
    /// when the user is not a member. Every start (resume, join, page) is clamped to it.
    fn join_floor(&self, user: &Text, room: &RoomName, owned_epoch: u64) -> Option<u64> {
        let join = self.directory.join_point(user, room)?;
        Some(if join.epoch == owned_epoch {
            join.seq
        } else {
            0
        })
    }

    /// The owner answers a connection binding one of its rooms: the stream starts where the
    /// request asks, but never before the user's join point, whatever epoch the request
    /// names (so no resume entry can read what was published before the user joined or
    /// while they were removed).
    fn on_subscribe_request(
        &mut self,
        room: RoomName,
        origin: Origin,
        alias: u32,
        user: &Text,
        from: StartFrom,
        request: u64,
    ) {
        let epoch = self.owned.get(&room).map_or(self.epoch, |o| o.epoch);
        let Some(floor) = self.join_floor(user, &room, epoch) else {
            return self.not_member(room, origin, alias, request);
        };
        let owned = self.owned_room(&room);
        owned.interest[origin.core] += 1;
        let asked = match from {
            StartFrom::Live => owned.head,
            StartFrom::Resume { epoch, last_seq: s } | StartFrom::Join { epoch, seq: s } => {
                if epoch == owned.epoch {
                    s.min(owned.head)
                } else {
                    0
                }
            }
        };
        let start = asked.max(floor.min(owned.head));
        let Some((page, epoch, head)) = self.cut_page(&room, start) else {
            return;
        };
        self.send_to(
            origin.core,
            CoreMsg::Subscribed {
                room,
                origin,
                alias,
                epoch,
                head,
                start,
                page,
                request,
            },
        );
    }

    /// The owner answers a page request of a catching-up connection, from no earlier than
    /// the user's join point; a user no longer a member gets the alias unbound.
    fn on_fetch(
        &mut self,
        room: RoomName,
        origin: Origin,
        alias: u32,
        user: &Text,
        after: u64,
        request: u64,
    ) {
        let floor = self
            .owned
            .get(&room)
            .and_then(|o| Some(self.join_floor(user, &room, o.epoch)?.min(o.head)));
        let Some(floor) = floor else {
            return self.not_member(room, origin, alias, request);
        };
        let Some((page, _, _)) = self.cut_page(&room, after.max(floor)) else {
            return;
        };
        self.send_to(
            origin.core,
            CoreMsg::Paged {
                room,
                origin,
                alias,
                page,
                request,
            },
        );
    }

    fn not_member(&mut self, room: RoomName, origin: Origin, alias: u32, request: u64) {
        self.send_to(
            origin.core,
            CoreMsg::NotMember {
                room,
                origin,
                alias,
                request,
            },
        );
    }

    /// A page of an owned room's history after `after`, within retention, with the room's
    /// epoch and head as of the cut.
    fn cut_page(&mut self, room: &RoomName, after: u64) -> Option<(Page, u64, u64)> {
        let page_bytes = self.config.connection.replay_page_bytes;
        let now_ms = self.now_ms();
        let owned = self.owned.get_mut(room)?;
        owned.history.evict_expired(now_ms);
        let mut msgs = Vec::new();
        let info = owned
            .history
            .page(after, owned.head, page_bytes, usize::MAX, &mut msgs);
        let page = Page {
            gap: info.gap,
            msgs,
            complete: info.complete,
        };
        Some((page, owned.epoch, owned.head))
    }

    fn handle_one(&mut self, msg: CoreMsg) {
        match msg {
            CoreMsg::Publish {
                room,
                origin,
                alias,
                sender,
                msg_id,
                payload,
            } => {
                self.accept_publish(room, Some((origin, alias, msg_id)), sender, payload);
            }
            CoreMsg::Ephemeral {
                room,
                origin,
                sender,
                payload,
            } => {
                inc(&self.stats.ephemeral_in, 1);
                self.broadcast_ephemeral(&room, Some(origin), sender, payload);
            }
            CoreMsg::Subscribe {
                room,
                origin,
                alias,
                user,
                from,
                request,
            } => self.on_subscribe_request(room, origin, alias, &user, from, request),
            CoreMsg::Fetch {
                room,
                origin,
                alias,
                user,
                after,
                request,
            } => self.on_fetch(room, origin, alias, &user, after, request),
            CoreMsg::Unsubscribed { room, core } => {
                if let Some(owned) = self.owned.get_mut(&room) {
                    owned.interest[core] = owned.interest[core].saturating_sub(1);
                }
                self.note_if_unused(&room);
            }
            CoreMsg::Join {
                room,
                user,
                unblock,
                requester,
            } => {
                let cap = self.config.limits.max_rooms.div_ceil(self.cores);
                if let Some(origin) = requester
                    && !self.owned.contains_key(&room)
                    && self.owned.len() >= cap
                {
                    // A client may not make the relay hold ever more rooms by subscribing.
                    inc(&self.stats.limit_refusals, 1);
                    return self.send_to(
                        origin.core,
                        CoreMsg::Refused {
                            origin,
                            code: ErrorCode::LimitExceeded,
                            reference: 0,
                            message: format!(
                                "{}: the relay holds as many rooms as it may",
                                room.name
                            ),
                        },
                    );
                }
                if let Err(e) = self.join_member(&room, &user, unblock) {
                    if !matches!(e, DirectoryError::Blocked(_)) {
                        inc(&self.stats.limit_refusals, 1);
                    }
                    if let Some(origin) = requester {
                        let code = match e {
                            DirectoryError::Blocked(_) => ErrorCode::NotPermitted,
                            _ => ErrorCode::LimitExceeded,
                        };
                        self.send_to(
                            origin.core,
                            CoreMsg::Refused {
                                origin,
                                code,
                                reference: 0,
                                message: format!("{}: {e}", room.name),
                            },
                        );
                    }
                }
            }
            CoreMsg::Leave {
                room,
                user,
                block,
                reason,
            } => {
                self.leave_member(&room, &user, block, reason);
            }
            CoreMsg::Control { op, reply } => {
                let answer = self.control(op);
                let _ = reply.send(answer);
            }
            CoreMsg::Accepted {
                origin,
                alias,
                msg_id,
                seq,
            } => self.on_accepted(origin.token, alias, msg_id, seq),
            CoreMsg::Refused {
                origin,
                code,
                reference,
                message,
            } => self.refuse(origin.token, code, reference, message),
            CoreMsg::Subscribed {
                room,
                origin,
                alias,
                epoch,
                head,
                start,
                page,
                request,
            } => self.on_subscribed(room, origin.token, alias, epoch, head, start, page, request),
            CoreMsg::Paged {
                room,
                origin,
                alias,
                page,
                request,
            } => self.on_paged(&room, origin.token, alias, page, request),
            CoreMsg::NotMember {
                room,
                origin,
                alias,
                request,
            } => {
                let token = origin.token;
                if let Some(conn) = self.conn(token)
                    && conn
                        .sub_for(alias, &room)
                        .is_some_and(|s| s.request == request)
                {
                    self.unbind(token, alias, LeftReason::Removed);
                }
            }
            CoreMsg::Deliver { room, msg } => self.fan_out(&room, &msg),
            CoreMsg::DeliverEphemeral {
                room,
                origin,
                sender,
                ts_ms,
                payload,
            } => self.fan_out_ephemeral(&room, origin, &sender, ts_ms, &payload),
            CoreMsg::MemberJoined {
                room,
                user,
                epoch,
                seq,
            } => self.on_member_joined(room, user, epoch, seq),
            CoreMsg::MemberLeft { room, user, reason } => self.on_member_left(room, user, reason),
            CoreMsg::Drain => self.begin_drain(),
            CoreMsg::Fence { round } => self.on_fence(round),
            CoreMsg::Probe { seq } => {
                self.stats.probe_ack.store(seq, Ordering::Relaxed);
            }
            CoreMsg::Reload(config) => self.reload(config),
            CoreMsg::Stall(duration) => std::thread::sleep(duration),
            CoreMsg::Stop => {
                self.shutdown.stop = true;
                let tokens: Vec<Token> = self.conns.iter().flatten().map(|c| c.token).collect();
                for token in tokens {
                    self.close_now(token);
                }
                self.close_listeners = true;
            }
        }
    }

    /// Applies what can change live; owned rooms take the new retention, connections the
    /// new publish limits.
    fn reload(&mut self, config: Arc<Config>) {
        for (room, owned) in &mut self.owned {
            owned
                .history
                .set_retention(config.retention_for(room.name.as_str()));
        }
        let limits = &config.limits;
        for conn in self.conns.iter_mut().flatten() {
            conn.publish_bucket
                .reconfigure(limits.publish_rate, limits.publish_burst);
            conn.subscribe_bucket
                .reconfigure(limits.subscribe_rate, limits.subscribe_burst);
        }
        self.directory
            .set_max_blocked_per_user(limits.max_blocked_per_user);
        let rate = limits.new_connections_per_second / self.cores as f64;
        self.accept_bucket.reconfigure(rate, rate.max(1.0));
        self.config = config;
    }

    /// Sums the bytes queued on every connection into the gauge (once a second).
    pub fn sample_queues(&mut self) {
        let total: usize = self.conns.iter().flatten().map(Conn::queued).sum();
        self.stats
            .queued_bytes
            .store(total as u64, Ordering::Relaxed);
    }

    /// The owner adds a member: records the join point (the room's head now, so the new
    /// member's connections replay anything published after it) and tells the workers that
    /// hold the user's connections. Returns whether the user is new to the room.
    fn join_member(
        &mut self,
        room: &RoomName,
        user: &Text,
        unblock: bool,
    ) -> Result<bool, DirectoryError> {
        // A refused join creates nothing: the room exists only once someone is in it.
        let join = match self.owned.get(room) {
            Some(owned) => crate::directory::JoinPoint {
                epoch: owned.epoch,
                seq: owned.head,
            },
            None => crate::directory::JoinPoint {
                epoch: self.fresh_epoch(),
                seq: 0,
            },
        };
        let added = self.directory.add(user, room, join, unblock)?;
        if !self.owned.contains_key(room) {
            self.create_room(room, join.epoch);
        }
        if let Some(owned) = self.owned.get_mut(room) {
            owned.members.insert(user.clone());
        }
        if added.new {
            for core in added.cores {
                self.send_to(
                    core,
                    CoreMsg::MemberJoined {
                        room: room.clone(),
                        user: user.clone(),
                        epoch: join.epoch,
                        seq: join.seq,
                    },
                );
            }
        }
        Ok(added.new)
    }

    /// The owner removes a member and unbinds the room on the user's connections. Deliveries
    /// from this owner after this point never reach them (messages between two workers keep
    /// their order). Returns whether the user was a member.
    fn leave_member(
        &mut self,
        room: &RoomName,
        user: &Text,
        block: bool,
        reason: LeftReason,
    ) -> bool {
        let crate::directory::Removed {
            was,
            cores,
            block_refused,
        } = self.directory.remove(user, room, block);
        let reason = match block_refused {
            Some(e) => {
                // Left all the same, but not blocked: the LEFT says so.
                inc(&self.stats.limit_refusals, 1);
                tracing::debug!(%user, room = %room.name, "block refused: {e}");
                LeftReason::Unsubscribed
            }
            None => reason,
        };
        if let Some(owned) = self.owned.get_mut(room) {
            owned.members.remove(user);
        }
        self.note_if_unused(room);
        if was {
            for core in cores {
                self.send_to(
                    core,
                    CoreMsg::MemberLeft {
                        room: room.clone(),
                        user: user.clone(),
                        reason,
                    },
                );
            }
        }
        was
    }

    /// The owner passes an ephemeral event to every interested worker: no sequence, no
    /// history.
    fn broadcast_ephemeral(
        &mut self,
        room: &RoomName,
        origin: Option<Origin>,
        sender: Text,
        payload: Bytes,
    ) {
        let ts_ms = self.now_ms();
        let interest = std::mem::take(&mut self.owned_room(room).interest);
        for (core, &n) in interest.iter().enumerate() {
            if n > 0 {
                self.send_to(
                    core,
                    CoreMsg::DeliverEphemeral {
                        room: room.clone(),
                        origin,
                        sender: sender.clone(),
                        ts_ms,
                        payload: payload.clone(),
                    },
                );
            }
        }
        if let Some(owned) = self.owned.get_mut(room) {
            owned.interest = interest;
        }
    }

    /// The owner accepts a message: sequence, history, PUBACK, then one delivery per
    /// interested worker.
    fn accept_publish(
        &mut self,
        room: RoomName,
        from: Option<(Origin, u32, u64)>,
        sender: Text,
        payload: Bytes,
    ) -> u64 {
        let now_ms = self.now_ms();
        let now = self.now;
        // Small payloads are slices of a large receive buffer: give history its own copy
        // once, so a retained 20-byte message does not pin that buffer.
        let payload = if payload.len() < COMPACT_BELOW {
            Bytes::copy_from_slice(&payload)
        } else {
            payload
        };
        let owned = self.owned_room(&room);
        owned.head += 1;
        let seq = owned.head;
        let msg = Arc::new(Stored {
            seq,
            ts_ms: now_ms,
            accepted_at: now,
            sender,
            origin: from.map(|(o, _, _)| o),
            payload,
        });
        owned.history.push(msg.clone(), now_ms);
        let interest = std::mem::take(&mut owned.interest);
        inc(&self.stats.messages_in, 1);
        if let Some((origin, alias, msg_id)) = from {
            // The PUBACK goes first: the publisher's worker must see it before the delivery.
            self.send_to(
                origin.core,
                CoreMsg::Accepted {
                    origin,
                    alias,
                    msg_id,
                    seq,
                },
            );
        }
        for (core, &n) in interest.iter().enumerate() {
            if n > 0 {
                self.send_to(
                    core,
                    CoreMsg::Deliver {
                        room: room.clone(),
                        msg: msg.clone(),
                    },
                );
            }
        }
        if let Some(owned) = self.owned.get_mut(&room) {
            owned.interest = interest;
        }
        seq
    }

    fn on_accepted(&mut self, token: Token, alias: u32, msg_id: u64, seq: u64) {
        let Some(conn) = self.conn(token) else { return };
        conn.publishes_in_flight = conn.publishes_in_flight.saturating_sub(1);
        let failing = conn.phase == Phase::Failing;
        if let Some(Some(sub)) = conn.subs.get_mut(alias as usize) {
            // The same rule as the client's: a contiguous own message advances the cursor.
            if sub.cursor + 1 == seq {
                sub.cursor = seq;
            }
            if sub.position + 1 == seq {
                sub.position = seq;
            }
        }
        self.write(token, &ServerFrame::PubAck(PubAck { msg_id, seq }));
        if failing && self.conn(token).is_some_and(|c| c.publishes_in_flight == 0) {
            self.finish_failing(token);
        }
    }

    #[allow(clippy::too_many_arguments)] // reason: the fields of one message, unpacked
    fn on_subscribed(
        &mut self,
        room: RoomName,
        token: Token,
        alias: u32,
        epoch: u64,
        head: u64,
        start: u64,
        page: Page,
        request: u64,
    ) {
        let core = self.id;
        let Some(conn) = self.conn(token) else {
            return self.send_to_owner(&room.clone(), CoreMsg::Unsubscribed { room, core });
        };
        let Some(sub) = conn
            .sub_for(alias, &room)
            .filter(|s| s.mode == SubMode::Pending && s.request == request)
        else {
            return self.send_to_owner(&room.clone(), CoreMsg::Unsubscribed { room, core });
        };
        let clean_resume = matches!(sub.from,
            StartFrom::Resume { epoch: e, last_seq } if e == epoch && last_seq == start);
        sub.epoch = epoch;
        sub.cursor = start;
        sub.position = start;
        sub.mode = SubMode::CatchingUp { fetching: false };
        let frame = (!clean_resume).then(|| {
            let mut frame = room_frame(alias, sub, head);
            if let ServerFrame::Room(r) = &mut frame {
                r.cursor = start;
            }
            frame
        });
        if let Some(frame) = frame {
            self.write(token, &frame);
        }
        self.local
            .entry(room.clone())
            .or_default()
            .push((token, alias));
        // A phone resuming hundreds of rooms gets one first page per room; past its queue
        // cap the rest wait and are fetched page by page as the socket drains, like any
        // lagging connection, so a resume never grows memory past the cap.
        let cap = self.config.connection.max_queued_bytes;
        let page = if self.conn(token).is_some_and(|c| c.queued() >= cap) && !page.complete {
            Page::default()
        } else {
            page
        };
        self.apply_page(token, alias, page);
    }

    fn on_paged(&mut self, room: &RoomName, token: Token, alias: u32, page: Page, request: u64) {
        let Some(conn) = self.conn(token) else { return };
        conn.fetches = conn.fetches.saturating_sub(1);
        let Some(sub) = conn.sub_for(alias, room).filter(|s| s.request == request) else {
            return;
        };
        if sub.mode != (SubMode::CatchingUp { fetching: true }) {
            return;
        }
        sub.mode = SubMode::CatchingUp { fetching: false };
        self.apply_page(token, alias, page);
    }

    /// Writes a page of history to a catching-up alias; goes live when the page completes.
    fn apply_page(&mut self, token: Token, alias: u32, page: Page) {
        let me = self.origin(token);
        let low_water = self.low_water();
        let Core {
            conns,
            dirty,
            stats,
            ..
        } = self;
        let Some(conn) = conn_in(conns, token).filter(|c| c.is_open()) else {
            return;
        };
        if let Some((_, to)) = page.gap {
            let Some(Some(sub)) = conn.subs.get_mut(alias as usize) else {
                return;
            };
            if to > sub.position {
                // The client's cursor may trail `position` by its own skipped messages; the
                // gap covers those too, which the client already holds as its own.
                let gap = pabal_codec::Gap {
                    alias,
                    from: sub.cursor + 1,
                    to,
                };
                sub.cursor = to;
                sub.position = to;
                conn.write(&ServerFrame::Gap(gap));
                inc(&stats.gaps, 1);
            }
        }
        let mut written = 0;
        for msg in &page.msgs {
            let header = {
                let Some(Some(sub)) = conn.subs.get_mut(alias as usize) else {
                    return;
                };
                if msg.seq <= sub.position {
                    continue;
                }
                match advance(&mut conn.ctx, sub, alias, msg, me) {
                    Some(header) => header,
                    None => continue,
                }
            };
            conn.write_deliver(&header, &msg.payload);
            written += 1;
        }
        inc(&stats.deliveries, written);
        inc(&stats.replayed, written);
        let Some(Some(sub)) = conn.subs.get_mut(alias as usize) else {
            return;
        };
        sub.mode = if page.complete {
            SubMode::Live
        } else {
            SubMode::CatchingUp { fetching: false }
        };
        Self::mark_dirty(dirty, conn);
        if !page.complete && conn.queued() <= low_water {
            self.request_pages(token);
        }
        self.update_lagging(token);
    }

    fn low_water(&self) -> usize {
        self.config.connection.max_queued_bytes / 4
    }

    /// Asks owners for the next page of every catching-up alias of a connection, within a
    /// budget of pages in flight that keeps the queue near its cap.
    fn request_pages(&mut self, token: Token) {
        // Pages are asked for only below the low-water mark, so the pages in flight fill at
        // most the rest of the cap.
        let cap = self.config.connection.max_queued_bytes;
        let budget = ((cap - cap / 4) / self.config.connection.replay_page_bytes).max(1);
        let origin = self.origin(token);
        let mut requests = Vec::new();
        {
            let Some(conn) = self.conn(token) else { return };
            if conn.phase != Phase::Open {
                return;
            }
            let mut fetches = conn.fetches;
            for (alias, sub) in conn.subs.iter_mut().enumerate() {
                if fetches >= budget {
                    break;
                }
                if let Some(sub) = sub
                    && sub.mode == (SubMode::CatchingUp { fetching: false })
                {
                    sub.mode = SubMode::CatchingUp { fetching: true };
                    fetches += 1;
                    requests.push((sub.room.clone(), alias as u32, sub.position, sub.request));
                }
            }
            conn.fetches = fetches;
        }
        let user = self
            .conn(token)
            .and_then(|c| c.user.clone())
            .unwrap_or_default();
        for (room, alias, after, request) in requests {
            self.send_to_owner(
                &room.clone(),
                CoreMsg::Fetch {
                    room,
                    origin,
                    alias,
                    user: user.clone(),
                    after,
                    request,
                },
            );
        }
    }

    /// Keeps the lagging flag and gauge in step with the connection's aliases.
    fn update_lagging(&mut self, token: Token) {
        let Core { conns, stats, .. } = self;
        let Some(conn) = conn_in(conns, token) else {
            return;
        };
        let lagging = conn
            .subs
            .iter()
            .flatten()
            .any(|s| matches!(s.mode, SubMode::CatchingUp { .. }));
        match (conn.lagging, lagging) {
            (false, true) => {
                inc(&stats.lagging, 1);
                inc(&stats.lag_events, 1);
            }
            (true, false) => dec(&stats.lagging, 1),
            _ => {}
        }
        conn.lagging = lagging;
    }

    /// Writes a new message to every live connection of this worker subscribed to the room.
    fn fan_out(&mut self, room: &RoomName, msg: &StoredRef) {
        let core = self.id;
        let cap = self.config.connection.max_queued_bytes;
        let mut fell_behind: Vec<Token> = Vec::new();
        let Core {
            local,
            conns,
            dirty,
            stats,
            ..
        } = self;
        let Some(subs) = local.get(room) else { return };
        let mut written = 0;
        for &(token, alias) in subs {
            let Some(conn) = conn_in(conns, token).filter(|c| c.is_open()) else {
                continue;
            };
            let over_cap = conn.queued() >= cap;
            let header = {
                let Some(Some(sub)) = conn.subs.get_mut(alias as usize) else {
                    continue;
                };
                if sub.mode != SubMode::Live || msg.seq <= sub.position {
                    continue;
                }
                if msg.seq != sub.position + 1 || over_cap {
                    // Behind (queue full) or a hole: catch up from history instead.
                    sub.mode = SubMode::CatchingUp { fetching: false };
                    fell_behind.push(token);
                    continue;
                }
                match advance(&mut conn.ctx, sub, alias, msg, Origin { core, token }) {
                    Some(header) => header,
                    None => continue,
                }
            };
            conn.write_deliver(&header, &msg.payload);
            Self::mark_dirty(dirty, conn);
            written += 1;
        }
        inc(&stats.deliveries, written);
        if written > 0 {
            let waited = self.now.saturating_duration_since(msg.accepted_at);
            self.stats
                .publish_to_send
                .record(waited.as_micros() as u64, written);
            self.stats.fanout_batch.record(written, 1);
        }
        for token in fell_behind {
            self.update_lagging(token);
            if self.conn(token).is_some_and(|c| c.queued() <= cap / 4) {
                self.request_pages(token);
            }
        }
    }

    fn fan_out_ephemeral(
        &mut self,
        room: &RoomName,
        origin: Option<Origin>,
        sender: &Text,
        ts_ms: u64,
        payload: &Bytes,
    ) {
        let core = self.id;
        let cap = self.config.connection.max_queued_bytes;
        let Core {
            local,
            conns,
            dirty,
            ..
        } = self;
        let Some(subs) = local.get(room) else { return };
        for &(token, alias) in subs {
            if origin == Some(Origin { core, token }) {
                continue;
            }
            let Some(conn) = conn_in(conns, token).filter(|c| c.is_open()) else {
                continue;
            };
            let cursor = match conn.subs.get(alias as usize) {
                Some(Some(sub)) if sub.mode != SubMode::Pending => sub.cursor,
                _ => continue,
            };
            if conn.queued() >= cap || conn.lagging {
                // Collapse: keep only the latest event per (alias, sender).
                let backlog = &mut conn.ephemeral_backlog;
                backlog.retain(|(a, s, _, _)| !(*a == alias && s == sender));
                if backlog.len() >= EPHEMERAL_BACKLOG {
                    backlog.remove(0);
                }
                backlog.push((alias, sender.clone(), ts_ms, payload.clone()));
                continue;
            }
            let header = conn.ctx.header(alias, None, cursor, sender, ts_ms);
            conn.write_deliver(&header, payload);
            Self::mark_dirty(dirty, conn);
        }
    }

    fn flush_ephemeral_backlog(&mut self, token: Token) {
        let Core { conns, dirty, .. } = self;
        let Some(conn) = conn_in(conns, token).filter(|c| c.is_open()) else {
            return;
        };
        if conn.ephemeral_backlog.is_empty() {
            return;
        }
        for (alias, sender, ts_ms, payload) in std::mem::take(&mut conn.ephemeral_backlog) {
            let cursor = match conn.subs.get(alias as usize) {
                Some(Some(sub)) => sub.cursor,
                _ => continue,
            };
            let header = conn.ctx.header(alias, None, cursor, &sender, ts_ms);
            conn.write_deliver(&header, &payload);
        }
        Self::mark_dirty(dirty, conn);
    }

    fn on_member_joined(&mut self, room: RoomName, user: Text, epoch: u64, seq: u64) {
        let tokens = self.users.get(&user).cloned().unwrap_or_default();
        let max_rooms = self.config.connection.max_rooms;
        for token in tokens {
            let origin = self.origin(token);
            let Some(conn) = self.conn(token) else {
                continue;
            };
            if conn.phase != Phase::Open || conn.alias_of(&room).is_some() {
                continue;
            }
            if conn.bound() >= max_rooms {
                self.refuse_room_limit(token, None, &room);
                continue;
            }
            let alias = conn.free_alias();
            let from = StartFrom::Join { epoch, seq };
            let request = self.new_request();
            if let Some(conn) = self.conn(token) {
                conn.subs[alias as usize] = Some(pending_sub(room.clone(), from, request));
            }
            self.send_to_owner(
                &room.clone(),
                CoreMsg::Subscribe {
                    room: room.clone(),
                    origin,
                    alias,
                    user: user.clone(),
                    from,
                    request,
                },
            );
        }
    }

    fn on_member_left(&mut self, room: RoomName, user: Text, reason: LeftReason) {
        let tokens = self.users.get(&user).cloned().unwrap_or_default();
        for token in tokens {
            let Some(conn) = self.conn(token) else {
                continue;
            };
            let Some(alias) = conn.alias_of(&room) else {
                continue;
            };
            self.unbind(token, alias, reason);
        }
    }

    /// Unbinds an alias: leaves the room's local fan-out (if it got that far) and tells the
    /// client with LEFT, unless the client never saw the binding (a join whose ROOM had
    /// not been sent yet; resume entries are bound from the HELLO on).
    fn unbind(&mut self, token: Token, alias: u32, reason: LeftReason) {
        let Some(sub) = self
            .conn(token)
            .and_then(|c| c.subs.get_mut(alias as usize)?.take())
        else {
            return;
        };
        if sub.mode != SubMode::Pending {
            self.unsubscribe_local(&sub.room, token);
        }
        let announced =
            sub.mode != SubMode::Pending || matches!(sub.from, StartFrom::Resume { .. });
        if announced {
            self.write(token, &ServerFrame::Left(Left { alias, reason }));
        }
        self.update_lagging(token);
    }

    // ---------------------------------------------------------------------------------
    // Shutdown
    // ---------------------------------------------------------------------------------

    fn begin_drain(&mut self) {
        if self.shutdown.draining {
            return;
        }
        self.shutdown.draining = true;
        self.shutdown.deadline = Some(self.now + self.config.shutdown.grace);
        self.close_listeners = true;
        // Stop reading: no publish from this worker's clients after this point.
        for conn in self.conns.iter_mut().flatten() {
            conn.reading = false;
            Self::mark_dirty(&mut self.dirty, conn);
        }
        for core in 0..self.cores {
            self.send_to(core, CoreMsg::Fence { round: 1 });
        }
    }

    fn on_fence(&mut self, round: u8) {
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
        let tokens: Vec<Token> = self.conns.iter().flatten().map(|c| c.token).collect();
        for token in tokens {
            if self
                .conn(token)
                .is_some_and(|c| c.phase == Phase::Handshake)
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

    // ---------------------------------------------------------------------------------
    // Timers
    // ---------------------------------------------------------------------------------

    /// Runs every timer that is due.
    pub fn run_timers(&mut self) {
        let now = self.now;
        if self.shutdown.deadline.is_some_and(|d| now >= d) && !self.shutdown.stop {
            tracing::info!(
                core = self.id,
                remaining = self.connection_count(),
                "shutdown grace period over; closing the rest"
            );
            self.handle_one(CoreMsg::Stop);
        }
        while let Some(Reverse((at, token))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(conn) = self.conn(token) else {
                continue;
            };
            if conn.timer_at != Some(at) {
                continue; // superseded by a sooner deadline
            }
            conn.timer_at = None;
            self.on_timer(token);
        }
        self.evict_idle_rooms();
    }

    /// The connection's deadline came: handshake timeout, heartbeat, a failing connection's
    /// last chance, or the end of a linger. Re-arms the next deadline.
    fn on_timer(&mut self, token: Token) {
        let now = self.now;
        let handshake_timeout = self.config.auth.handshake_timeout;
        let timeout = self.config.heartbeat.timeout;
        let Some(conn) = self.conn(token) else { return };
        match conn.phase {
            Phase::Handshake => {
                if now >= conn.accepted_at + handshake_timeout {
                    self.goaway(
                        token,
                        GoAwayReason::HandshakeTimeout,
                        0,
                        Text::from_static("no HELLO in time"),
                    );
                } else {
                    let at = conn.accepted_at + handshake_timeout;
                    self.arm(token, at);
                }
            }
            Phase::Open => {
                if let Some(sent) = conn.ping_sent {
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
                } else if now >= conn.last_rx + conn.heartbeat {
                    conn.ping_sent = Some(now);
                    self.write(token, &ServerFrame::Ping(pabal_codec::Ping::default()));
                    self.arm(token, now + timeout);
                } else {
                    let at = conn.last_rx + conn.heartbeat;
                    self.arm(token, at);
                }
            }
            Phase::Failing => {
                // The owners' answers are overdue (they never should be): fail now.
                self.finish_failing(token);
            }
            Phase::Closing => {
                if conn.closing_since.is_some_and(|t| now >= t + LINGER) {
                    self.close_now(token);
                } else if let Some(t) = conn.closing_since {
                    self.arm(token, t + LINGER);
                }
            }
        }
    }

    /// Writes GOAWAY as the connection's last frame and closes it (a failing connection's
    /// last frame stays its ERROR).
    fn goaway(&mut self, token: Token, reason: GoAwayReason, retry_after_ms: u64, message: Text) {
        if self.conn(token).is_some_and(|c| c.phase == Phase::Failing) {
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

    // ---------------------------------------------------------------------------------
    // Flush
    // ---------------------------------------------------------------------------------

    /// Hands everything queued this tick to the world: messages to other workers (one batch
    /// each), and to each connection with output at most one send.
    pub fn flush<T: Transport + ?Sized>(&mut self, transport: &mut T) {
        // Messages to this worker itself are handled now, in order, until none are left.
        loop {
            let own = std::mem::take(&mut self.outbox[self.id]);
            if own.is_empty() {
                break;
            }
            self.handle(own);
        }
        for core in 0..self.cores {
            if core != self.id && !self.outbox[core].is_empty() {
                let batch = std::mem::take(&mut self.outbox[core]);
                self.mesh.send(core, batch);
            }
        }
        if std::mem::take(&mut self.close_listeners) {
            transport.close_listeners();
        }
        for token in self.to_close.drain(..) {
            transport.close(token);
        }
        let cap = self.config.connection.max_queued_bytes;
        for token in std::mem::take(&mut self.dirty) {
            let Some(conn) = conn_in(&mut self.conns, token) else {
                continue;
            };
            conn.dirty = false;
            // Backpressure on input: a client that does not read its replies stops being
            // read until its queue drains.
            let want_reading = conn.reading && conn.queued() < cap && !self.shutdown.draining;
            if want_reading != conn.backend_reading {
                transport.set_reading(token, want_reading);
                conn.backend_reading = want_reading;
            }
            let queued = conn.queued() as u64;
            if queued
                > self
                    .stats
                    .queue_high_water
                    .load(std::sync::atomic::Ordering::Relaxed)
            {
                self.stats
                    .queue_high_water
                    .fetch_max(queued, std::sync::atomic::Ordering::Relaxed);
            }
            if !conn.sending && conn.has_output() {
                let bytes = conn.take_batch();
                inc(&self.stats.bytes_out, bytes as u64);
                inc(&self.stats.sends, 1);
                transport.send(token, &mut conn.pending);
            }
            if conn.phase == Phase::Closing && !conn.sending && !conn.has_output() && !conn.shut {
                conn.shut = true;
                transport.shutdown_write(token);
            }
        }
    }
}

fn pending_sub(room: RoomName, from: StartFrom, request: u64) -> Sub {
    Sub {
        room,
        from,
        epoch: 0,
        cursor: 0,
        position: 0,
        mode: SubMode::Pending,
        acked: 0,
        request,
    }
}

fn room_frame(alias: u32, sub: &Sub, head: u64) -> ServerFrame {
    ServerFrame::Room(Room {
        alias,
        channel: sub.room.channel,
        room_id: sub.room.id,
        epoch: sub.epoch,
        cursor: sub.cursor,
        head: head.max(sub.cursor),
        name: sub.room.name.clone(),
    })
}

impl EventSink for Core {
    fn accepted(&mut self, stream: &TcpStream, peer: SocketAddr) -> Option<Token> {
        if self.shutdown.draining {
            return None;
        }
        self.now = Instant::now();
        self.configure_socket(stream);
        Some(self.admit(peer))
    }

    fn received(&mut self, token: Token, data: &[u8]) {
        self.now = Instant::now();
        self.on_bytes(token, data);
    }

    fn sent(&mut self, token: Token, bytes: usize) {
        self.on_sent(token, bytes);
    }

    fn closed(&mut self, token: Token, reason: CloseReason) {
        tracing::trace!(token, ?reason, "connection closed by peer");
        self.drop_conn(token);
    }

    fn woken(&mut self) {}
}

impl Core {
    /// Admits a connection whose socket is set up: a slot, a token, the handshake deadline,
    /// and, past the connection cap or the accept rate, a GOAWAY(overload).
    pub fn admit(&mut self, peer: SocketAddr) -> Token {
        let total = self.shared.connections.fetch_add(1, Ordering::Relaxed) + 1;
        let overloaded =
            total > self.config.limits.max_connections || !self.accept_bucket.take(self.now);
        let slot = match self.free_slots.pop() {
            Some(slot) => slot as usize,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        self.generation = self.generation.wrapping_add(1);
        let token = (u64::from(self.generation) << 32) | slot as u64;
        self.next_conn_id += 1;
        let conn_id = ((self.id as u64) << 48) | self.next_conn_id;
        let limits = &self.config.limits;
        let publish = TokenBucket::new(limits.publish_rate, limits.publish_burst, self.now);
        let subscribe = TokenBucket::new(limits.subscribe_rate, limits.subscribe_burst, self.now);
        let conn = Conn::new(
            token,
            conn_id,
            peer,
            self.now,
            self.config.heartbeat.interval,
            publish,
            subscribe,
        );
        self.conns[slot] = Some(conn);
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
        token
    }

    /// Bytes arrived on a connection (at the time last set with [`Core::set_now`]).
    pub fn on_bytes(&mut self, token: Token, data: &[u8]) {
        inc(&self.stats.bytes_in, data.len() as u64);
        let now = self.now;
        let draining = self.shutdown.draining;
        let Some(conn) = self.conn(token) else { return };
        conn.last_rx = now;
        if conn.ping_sent.take().is_some() {
            // The heartbeat was answered: the next ping is due an interval from now, which
            // may be sooner than the deadline armed for the answer.
            let at = now + conn.heartbeat;
            self.arm(token, at);
        }
        let Some(conn) = self.conn(token) else { return };
        if !matches!(conn.phase, Phase::Handshake | Phase::Open) || draining {
            return;
        }
        conn.rbuf.extend_from_slice(data);
        loop {
            let Core { conns, decoder, .. } = &mut *self;
            let Some(conn) =
                conn_in(conns, token).filter(|c| matches!(c.phase, Phase::Handshake | Phase::Open))
            else {
                return;
            };
            match decoder.decode_client(&mut conn.rbuf) {
                Ok(Some(frame)) => self.on_frame(token, frame),
                Ok(None) => return,
                Err(e) => return self.decode_failed(token, e),
            }
        }
    }

    /// The batch in flight for a connection was written.
    pub fn on_sent(&mut self, token: Token, _bytes: usize) {
        let low_water = self.low_water();
        let Some(conn) = self.conn(token) else { return };
        conn.batch_sent();
        let drained = conn.queued() <= low_water;
        let lagging = conn.lagging;
        // Flush again: more output may be queued, reading may resume, or a close proceeds.
        let Core { conns, dirty, .. } = self;
        if let Some(conn) = conn_in(conns, token) {
            Self::mark_dirty(dirty, conn);
        }
        if drained {
            self.flush_ephemeral_backlog(token);
            if lagging {
                self.request_pages(token);
            }
        }
    }

    /// The peer closed the connection or it failed.
    pub fn on_closed(&mut self, token: Token) {
        self.drop_conn(token);
    }

    fn decode_failed(&mut self, token: Token, e: DecodeError) {
        self.fatal(token, e.code(), e.to_string());
    }
}

#[path = "core_control.rs"]
mod control_exec;

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
