//! pabal-client: a blocking Rust client for the pabal relay.
//!
//! - Connects over TCP or TLS 1.3 ([`TlsOptions`]); on a resumed TLS session the HELLO rides
//!   in the first flight as early data (0-RTT), so a reconnect costs one round trip after
//!   TCP before the first missed message arrives.
//! - Keeps every room's cursor across reconnects (the codec's [`ClientSession`] applies the
//!   protocol's rules: no silent skip, no repeat, no reorder) and resumes them in each HELLO.
//! - Acknowledges cumulatively, once per batch read (before it would block) or every
//!   [`ClientConfig::ack_every`] messages.
//! - Reconnects by itself after a lost link, with full-jitter exponential backoff
//!   (`random(0, min(cap, base * 2^attempt))`), or after exactly the relay's GOAWAY hint
//!   (already spread by the relay). A refused token stops it ([`ClientError::Refused`]).
//! - Heartbeats: answers the relay's PING; pings the relay when it has heard nothing for the
//!   granted interval plus [`ClientConfig::heartbeat_timeout`], and reconnects when that
//!   ping goes unanswered.
//! - Publishes are exactly once with a relay that speaks protocol version 2: the client
//!   sends its device id in HELLO, and a publish not acknowledged when the link drops is
//!   published again on the next connection with the same message id, which the relay
//!   recognises (PROTOCOL.md §7). A relay that refuses version 3 gets version 2 on the next
//!   attempt, and one that refuses 2 gets version 1; there a republish takes a fresh id (at
//!   least once, §12).
//! - Receipts (version 3): [`Client::read`] sends READ; members' delivered and read markers
//!   arrive as [`ClientEvent::Receipt`].
//!
//! Owns: one logical session with one relay, its socket and its timers. Must not touch:
//! anything global (no threads, no runtime): the caller drives it with
//! [`Client::next_event`].

mod backoff;
mod link;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pabal_codec::{
    Ack, ClientFrame, DecodeError, Decoder, ErrorCode, Event, GoAwayReason, LeftReason, Limits,
    Ping, Pong, ServerFrame, SessionError, Subscribe, Text,
};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use thiserror::Error;

pub use backoff::Backoff;
pub use link::{ALPN, TlsOptions};
pub use pabal_codec::ClientSession;

use link::Link;

/// Why the client stopped or an operation failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A socket call failed.
    #[error("I/O: {0}")]
    Io(#[source] std::io::Error),
    /// TLS failed (certificate not trusted, handshake refused, ...).
    #[error("TLS: {0}")]
    Tls(#[source] rustls::Error),
    /// The relay sent bytes that are not valid frames.
    #[error("malformed frame from the relay: {0}")]
    Decode(#[from] DecodeError),
    /// The relay broke a protocol rule.
    #[error("protocol violation by the relay: {0}")]
    Protocol(#[from] SessionError),
    /// The relay refused the credential: reconnecting with it would be refused again.
    #[error("refused by the relay ({code:?}): {message}")]
    Refused {
        /// The code.
        code: ErrorCode,
        /// The relay's words.
        message: String,
    },
    /// The connection ended before WELCOME.
    #[error("the relay closed the connection during the handshake")]
    HandshakeClosed,
    /// The operation needs a room the session has not bound.
    #[error("no room or channel `{0}` is bound")]
    UnknownRoom(String),
    /// The operation needs an open connection.
    #[error("not connected")]
    NotConnected,
    /// The configuration is unusable.
    #[error("client configuration: {0}")]
    Config(String),
}

impl ClientError {
    /// Whether a reconnect could help (false for a refused credential or bad config).
    pub fn is_transient(&self) -> bool {
        !matches!(self, ClientError::Refused { .. } | ClientError::Config(_))
    }
}

/// What the client reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// A connection is open (WELCOME received); the resume list is being answered.
    Connected {
        /// The relay's id for the connection.
        conn_id: u64,
        /// The HELLO travelled as TLS early data (0-RTT).
        early_data: bool,
        /// The TLS session was resumed.
        tls_resumed: bool,
    },
    /// A room or channel is bound (joined, subscribed, resumed).
    Bound {
        /// Its alias on this connection.
        alias: u32,
        /// Its name, when the relay sent it.
        name: Option<String>,
        /// The room id.
        room_id: u64,
        /// The relay's head sequence.
        head: u64,
    },
    /// A room or channel was unbound.
    Left {
        /// The room id.
        room_id: u64,
        /// Why.
        reason: LeftReason,
    },
    /// A message (an ephemeral event when `seq` is `None`).
    Message {
        /// The room id.
        room_id: u64,
        /// The sequence.
        seq: Option<u64>,
        /// The sender.
        sender: String,
        /// When the relay accepted it, ms since the Unix epoch.
        ts_ms: u64,
        /// The body.
        payload: Bytes,
    },
    /// Sequences `from..=to` of a room will never arrive (retention dropped them).
    Gap {
        /// The room id.
        room_id: u64,
        /// First missing.
        from: u64,
        /// Last missing.
        to: u64,
    },
    /// One of our publishes was accepted.
    Published {
        /// The id [`Client::publish`] returned.
        id: u64,
        /// Its sequence.
        seq: u64,
    },
    /// The relay refused a request (non-fatal ERROR).
    Refused {
        /// The code.
        code: ErrorCode,
        /// What it refers to (a publish's message id, an alias).
        reference: u64,
        /// The relay's words.
        message: String,
    },
    /// Protocol version 3: members' delivered and read markers in a room moved.
    Receipt {
        /// The room id.
        room_id: u64,
        /// Each member whose markers moved, with its markers now.
        members: Vec<pabal_codec::MemberMarkers>,
    },
    /// The link is gone; the client reconnects after `retry_in`.
    Disconnected {
        /// What happened.
        reason: String,
        /// When it will try again.
        retry_in: Duration,
    },
}

/// How to reach the relay and behave.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The relay's address.
    pub addr: SocketAddr,
    /// TLS; `None` speaks plain TCP.
    pub tls: Option<TlsOptions>,
    /// The credential in HELLO (a JWT, or the user id when the relay runs `auth = "none"`).
    pub token: Bytes,
    /// Heartbeat interval to ask for, seconds (0: the relay's default).
    pub heartbeat_secs: u32,
    /// How long to wait for the relay after our own PING, and for connect + WELCOME.
    pub heartbeat_timeout: Duration,
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// Acknowledge at least every this many messages per room.
    pub ack_every: usize,
    /// Seed for the backoff jitter (tests); `None` seeds from the OS.
    pub seed: Option<u64>,
    /// The device id sent in HELLO (protocol version 2): keep it per installation, with
    /// the last message id ([`ClientSession::last_msg_id`]) as `first_msg_id`. `None`:
    /// drawn at random when the [`Client`] is made (exactly once for its lifetime).
    pub device_id: Option<u64>,
    /// The message counter to continue from (persisted with `device_id`).
    pub first_msg_id: u64,
}

impl ClientConfig {
    /// Defaults: plain TCP, the relay's heartbeat, 10 s timeout, backoff 250 ms .. 30 s.
    pub fn new(addr: SocketAddr, token: impl Into<Bytes>) -> ClientConfig {
        ClientConfig {
            addr,
            tls: None,
            token: token.into(),
            heartbeat_secs: 0,
            heartbeat_timeout: Duration::from_secs(10),
            backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(30)),
            ack_every: 64,
            seed: None,
            device_id: None,
            first_msg_id: 0,
        }
    }
}

/// A publish not yet acknowledged.
#[derive(Debug, Clone)]
struct Outgoing {
    id: u64,
    room_id: u64,
    payload: Bytes,
    /// The message id on the current connection, once sent.
    msg_id: Option<u64>,
    /// The message id it was last sent with (0: never): kept across reconnects.
    sent_as: u64,
}

/// The connection in use.
#[derive(Debug)]
struct Open {
    link: Link,
    rbuf: BytesMut,
    last_rx: Instant,
    ping_sent: Option<Instant>,
    heartbeat: Duration,
    /// Highest sequence received per alias and not yet acknowledged.
    acks: BTreeMap<u32, u64>,
    unacked: usize,
}

/// A session with one relay that survives reconnects.
#[derive(Debug)]
pub struct Client {
    config: ClientConfig,
    session: ClientSession,
    decoder: Decoder,
    open: Option<Open>,
    events: VecDeque<ClientEvent>,
    retry_at: Option<Instant>,
    retry_hint: Option<Duration>,
    rng: SmallRng,
    outbox: Vec<Outgoing>,
    next_id: u64,
    stopped: Option<(ErrorCode, String)>,
    /// Links opened, for tests and metrics.
    connects: u64,
}

impl Client {
    /// A client that connects on the first [`Client::next_event`] or [`Client::connect`].
    pub fn new(config: ClientConfig) -> Client {
        let rng = match config.seed {
            Some(seed) => SmallRng::seed_from_u64(seed),
            None => SmallRng::from_os_rng(),
        };
        // Not from the seeded generator: two clients of one user must not share a device.
        let device_id = config.device_id.unwrap_or_else(rand::random);
        let session = ClientSession::with_device(device_id, config.first_msg_id);
        Client {
            config,
            session,
            decoder: Decoder::new(Limits::default()),
            open: None,
            events: VecDeque::new(),
            retry_at: None,
            retry_hint: None,
            rng,
            outbox: Vec::new(),
            next_id: 0,
            stopped: None,
            connects: 0,
        }
    }

    /// The protocol state (rooms and their cursors).
    pub fn session(&self) -> &ClientSession {
        &self.session
    }

    /// Whether a connection is open.
    pub fn is_connected(&self) -> bool {
        self.open.is_some()
    }

    /// Connections opened so far.
    pub fn connects(&self) -> u64 {
        self.connects
    }

    /// Replaces the credential (an expired token); used from the next connection on.
    pub fn set_token(&mut self, token: impl Into<Bytes>) {
        self.config.token = token.into();
        self.stopped = None;
    }

    /// Opens a connection now and waits for WELCOME (events from the handshake are queued).
    pub fn connect(&mut self) -> Result<(), ClientError> {
        if let Some((code, message)) = &self.stopped {
            return Err(ClientError::Refused {
                code: *code,
                message: message.clone(),
            });
        }
        self.open = None;
        let mut hello = BytesMut::new();
        self.session
            .hello(self.config.token.clone(), self.config.heartbeat_secs)
            .encode(&mut hello);
        let timeout = self.config.heartbeat_timeout;
        let (link, opened) =
            Link::open(self.config.addr, self.config.tls.as_ref(), &hello, timeout)?;
        self.connects += 1;
        let now = Instant::now();
        self.open = Some(Open {
            link,
            rbuf: BytesMut::with_capacity(16 * 1024),
            last_rx: now,
            ping_sent: None,
            heartbeat: Duration::from_secs(240),
            acks: BTreeMap::new(),
            unacked: 0,
        });
        // Wait for WELCOME: frames before it would be a protocol violation anyway.
        let deadline = now + timeout;
        loop {
            if let Some(frame) = self.decode()? {
                match frame {
                    ServerFrame::Welcome(w) => {
                        let conn_id = w.conn_id;
                        let heartbeat = Duration::from_secs(u64::from(w.heartbeat_secs.max(1)));
                        self.session.apply(ServerFrame::Welcome(w))?;
                        if let Some(open) = &mut self.open {
                            open.heartbeat = heartbeat;
                        }
                        self.events.push_back(ClientEvent::Connected {
                            conn_id,
                            early_data: opened.early_data,
                            tls_resumed: opened.resumed,
                        });
                        self.config.backoff.reset();
                        self.retry_hint = None;
                        self.republish()?;
                        return Ok(());
                    }
                    ServerFrame::Error(e)
                        if e.code == ErrorCode::UnsupportedVersion
                            && self.session.refused_version() =>
                    {
                        // A relay that speaks only version 1: ask again in version 1.
                        self.open = None;
                        return self.connect();
                    }
                    other => {
                        let result = self.on_frame(other);
                        self.open = None;
                        result?;
                        if let Some((code, message)) = &self.stopped {
                            return Err(ClientError::Refused {
                                code: *code,
                                message: message.clone(),
                            });
                        }
                        return Err(ClientError::HandshakeClosed);
                    }
                }
            }
            if Instant::now() >= deadline || !self.read_some(deadline)? {
                self.open = None;
                return Err(ClientError::HandshakeClosed);
            }
        }
    }

    /// Sends the publishes the relay has not acknowledged: with their message ids in
    /// version 2 (the relay recognises a repeat), with fresh ones in version 1.
    fn republish(&mut self) -> Result<(), ClientError> {
        let mut outbox = std::mem::take(&mut self.outbox);
        for out in &mut outbox {
            out.msg_id = None;
            if let Some(alias) = self.alias_of_room(out.room_id) {
                let (msg_id, frame) =
                    self.session
                        .republish(alias, out.sent_as, out.payload.clone(), None);
                out.msg_id = Some(msg_id);
                out.sent_as = msg_id;
                self.send(&frame)?;
            }
        }
        self.outbox = outbox;
        Ok(())
    }

    fn alias_of_room(&self, room_id: u64) -> Option<u32> {
        self.session
            .rooms()
            .find(|(_, r)| r.room_id == room_id)
            .map(|(a, _)| a)
    }

    /// Joins a room (relays with `auth = "none"` or a token that allows it).
    pub fn join(&mut self, room: &str) -> Result<(), ClientError> {
        self.send(&ClientFrame::Subscribe(Subscribe {
            room: true,
            name: Text::from(room),
        }))
    }

    /// Subscribes to a channel.
    pub fn subscribe(&mut self, channel: &str) -> Result<(), ClientError> {
        self.send(&ClientFrame::Subscribe(Subscribe {
            room: false,
            name: Text::from(channel),
        }))
    }

    /// Publishes to a bound room or channel by name; returns the id that
    /// [`ClientEvent::Published`] will carry. If the link drops before the relay
    /// acknowledges it, it is published again on the next connection.
    pub fn publish(&mut self, room: &str, payload: impl Into<Bytes>) -> Result<u64, ClientError> {
        let alias = self
            .session
            .alias_of(room)
            .ok_or_else(|| ClientError::UnknownRoom(room.to_string()))?;
        let room_id = self.session.room(alias).map_or(0, |r| r.room_id);
        let payload = payload.into();
        self.next_id += 1;
        let id = self.next_id;
        let mut out = Outgoing {
            id,
            room_id,
            payload: payload.clone(),
            msg_id: None,
            sent_as: 0,
        };
        if self.open.is_some() {
            let ack = self.open.as_mut().and_then(|o| o.acks.remove(&alias));
            let (msg_id, frame) = self.session.publish(alias, payload, ack);
            out.msg_id = Some(msg_id);
            out.sent_as = msg_id;
            self.outbox.push(out);
            self.send(&frame)?;
        } else {
            self.outbox.push(out);
        }
        Ok(id)
    }

    /// Tells the relay the user read `room` up to `seq` (protocol version 3: READ; the
    /// room's members get it in their RECEIPTs). Returns whether it was sent: not when
    /// the room is not bound, no connection is open, or the relay speaks an older version.
    pub fn read(&mut self, room: &str, seq: u64) -> Result<bool, ClientError> {
        let frame = self
            .session
            .alias_of(room)
            .filter(|_| self.open.is_some())
            .and_then(|alias| self.session.read(alias, seq));
        match frame {
            Some(frame) => self.send(&frame).map(|()| true),
            None => Ok(false),
        }
    }

    /// Ends the link abruptly (a phone losing its network); the client reconnects with
    /// backoff on the next [`Client::next_event`].
    pub fn cut(&mut self) {
        if let Some(open) = self.open.take() {
            open.link.cut();
            self.lost("link cut".into(), Instant::now());
        }
    }

    /// Closes politely (BYE) and stops reconnecting until [`Client::connect`].
    pub fn close(&mut self) {
        if self.open.is_some() {
            let _ = self.send(&ClientFrame::Bye);
        }
        self.open = None;
        self.retry_at = None;
    }

    fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        let Some(open) = &mut self.open else {
            return Err(ClientError::NotConnected);
        };
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        if let Err(e) = open.link.write_all(&buf).and_then(|()| open.link.flush()) {
            self.lost(format!("write failed: {e}"), Instant::now());
        }
        Ok(())
    }

    /// The link is gone: schedule the reconnect.
    fn lost(&mut self, reason: String, now: Instant) {
        self.open = None;
        let delay = match self.retry_hint.take() {
            Some(hint) => hint,
            None => self.config.backoff.next_delay(&mut self.rng),
        };
        self.retry_at = Some(now + delay);
        self.events.push_back(ClientEvent::Disconnected {
            reason,
            retry_in: delay,
        });
    }

    fn decode(&mut self) -> Result<Option<ServerFrame>, ClientError> {
        let Some(open) = &mut self.open else {
            return Ok(None);
        };
        Ok(self.decoder.decode_server(&mut open.rbuf)?)
    }

    /// Reads once (until `deadline`); false on timeout. A lost link is handled here.
    fn read_some(&mut self, deadline: Instant) -> Result<bool, ClientError> {
        let Some(open) = &mut self.open else {
            return Ok(false);
        };
        let now = Instant::now();
        let _ = open
            .link
            .set_read_timeout(deadline.saturating_duration_since(now));
        let mut chunk = [0u8; 16 * 1024];
        match open.link.read(&mut chunk) {
            Ok(0) => {
                self.lost("the relay closed the connection".into(), now);
                Ok(false)
            }
            Ok(n) => {
                open.rbuf.extend_from_slice(&chunk[..n]);
                open.last_rx = Instant::now();
                open.ping_sent = None;
                Ok(true)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(true),
            Err(e) => {
                self.lost(format!("read failed: {e}"), now);
                Ok(false)
            }
        }
    }

    /// Sends the acknowledgements gathered since the last batch.
    fn flush_acks(&mut self) -> Result<(), ClientError> {
        let Some(open) = &mut self.open else {
            return Ok(());
        };
        if open.acks.is_empty() {
            return Ok(());
        }
        let pairs: Vec<(u32, u64)> = std::mem::take(&mut open.acks).into_iter().collect();
        open.unacked = 0;
        self.send(&ClientFrame::Ack(Ack::from_pairs(&pairs)))
    }

    /// The next event, waiting at most `timeout`; `Ok(None)` when nothing happened in time.
    /// Reconnects by itself; fails only when the relay refused the credential.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<ClientEvent>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(Some(event));
            }
            if let Some((code, message)) = &self.stopped {
                return Err(ClientError::Refused {
                    code: *code,
                    message: message.clone(),
                });
            }
            let now = Instant::now();
            if self.open.is_none() {
                let at = self.retry_at.unwrap_or(now);
                if at > now {
                    if deadline <= now {
                        return Ok(None);
                    }
                    std::thread::sleep(at.min(deadline) - now);
                    continue;
                }
                match self.connect() {
                    Ok(()) => {}
                    Err(e) if e.is_transient() => {
                        if self.open.is_none() && self.events.is_empty() {
                            self.lost(format!("connect failed: {e}"), Instant::now());
                        }
                    }
                    Err(e) => return Err(e),
                }
                continue;
            }
            match self.decode() {
                Ok(Some(frame)) => {
                    self.on_frame(frame)?;
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    self.lost(e.to_string(), now);
                    continue;
                }
            }
            self.flush_acks()?;
            if self.heartbeat(now)? {
                continue;
            }
            if now >= deadline {
                return Ok(None);
            }
            let wake = self
                .heartbeat_due()
                .map_or(deadline, |due| due.min(deadline));
            self.read_some(wake)?;
        }
    }

    /// When the heartbeat next needs attention.
    fn heartbeat_due(&self) -> Option<Instant> {
        let open = self.open.as_ref()?;
        Some(match open.ping_sent {
            Some(sent) => sent + self.config.heartbeat_timeout,
            None => open.last_rx + open.heartbeat + self.config.heartbeat_timeout,
        })
    }

    /// Pings a quiet relay, and gives up on one that does not answer. True if it acted.
    fn heartbeat(&mut self, now: Instant) -> Result<bool, ClientError> {
        let Some(due) = self.heartbeat_due() else {
            return Ok(false);
        };
        if now < due {
            return Ok(false);
        }
        let pinged = self.open.as_ref().is_some_and(|o| o.ping_sent.is_some());
        if pinged {
            if let Some(open) = self.open.take() {
                open.link.cut();
            }
            self.lost("the relay stopped answering heartbeats".into(), now);
        } else {
            if let Some(open) = &mut self.open {
                open.ping_sent = Some(now);
            }
            self.send(&ClientFrame::Ping(Ping::default()))?;
        }
        Ok(true)
    }

    fn on_frame(&mut self, frame: ServerFrame) -> Result<(), ClientError> {
        let event = match self.session.apply(frame) {
            Ok(event) => event,
            Err(e) => {
                // The relay broke the protocol: this connection cannot be trusted.
                if let Some(open) = self.open.take() {
                    open.link.cut();
                }
                self.lost(
                    format!("protocol violation by the relay: {e}"),
                    Instant::now(),
                );
                return Ok(());
            }
        };
        match event {
            Event::Welcome(_) => {}
            Event::Bound {
                alias, room, head, ..
            } => {
                self.events.push_back(ClientEvent::Bound {
                    alias,
                    name: room.name.as_ref().map(|n| n.as_str().to_string()),
                    room_id: room.room_id,
                    head,
                });
                // A publish queued while this room was not bound can go now.
                if self
                    .outbox
                    .iter()
                    .any(|o| o.msg_id.is_none() && o.room_id == room.room_id)
                {
                    self.republish_room(room.room_id)?;
                }
            }
            Event::Left {
                room_id, reason, ..
            } => {
                self.events.push_back(ClientEvent::Left { room_id, reason });
            }
            Event::Message {
                alias,
                room_id,
                seq,
                sender,
                ts_ms,
                payload,
            } => {
                if let (Some(seq), Some(open)) = (seq, &mut self.open) {
                    open.acks.insert(alias, seq);
                    open.unacked += 1;
                    if open.unacked >= self.config.ack_every {
                        self.flush_acks()?;
                    }
                }
                self.events.push_back(ClientEvent::Message {
                    room_id,
                    seq,
                    sender: sender.as_str().to_string(),
                    ts_ms,
                    payload,
                });
            }
            Event::Gap {
                room_id, from, to, ..
            } => self
                .events
                .push_back(ClientEvent::Gap { room_id, from, to }),
            Event::PubAck { msg_id, seq, .. } => {
                if let Some(i) = self.outbox.iter().position(|o| o.msg_id == Some(msg_id)) {
                    let out = self.outbox.remove(i);
                    self.events
                        .push_back(ClientEvent::Published { id: out.id, seq });
                }
            }
            Event::Receipt {
                room_id, members, ..
            } => self
                .events
                .push_back(ClientEvent::Receipt { room_id, members }),
            Event::Ping(_) => self.send(&ClientFrame::Pong(Pong::default()))?,
            Event::Pong(_) => {}
            Event::Error(e) => {
                let message = e.message.as_str().to_string();
                if e.fatal {
                    if matches!(e.code, ErrorCode::AuthFailed | ErrorCode::TokenExpired) {
                        self.stopped = Some((e.code, message.clone()));
                    }
                    if let Some(open) = self.open.take() {
                        open.link.cut();
                    }
                    self.lost(
                        format!("fatal error from the relay: {message}"),
                        Instant::now(),
                    );
                } else {
                    if e.reference != 0 {
                        self.outbox.retain(|o| o.msg_id != Some(e.reference));
                    }
                    self.events.push_back(ClientEvent::Refused {
                        code: e.code,
                        reference: e.reference,
                        message,
                    });
                }
            }
            Event::GoAway(g) => {
                if g.reason == GoAwayReason::TokenExpired {
                    self.stopped = Some((ErrorCode::TokenExpired, g.message.as_str().to_string()));
                }
                self.retry_hint = Some(Duration::from_millis(g.retry_after_ms));
            }
        }
        Ok(())
    }

    fn republish_room(&mut self, room_id: u64) -> Result<(), ClientError> {
        let Some(alias) = self.alias_of_room(room_id) else {
            return Ok(());
        };
        let mut outbox = std::mem::take(&mut self.outbox);
        for out in outbox
            .iter_mut()
            .filter(|o| o.msg_id.is_none() && o.room_id == room_id)
        {
            let (msg_id, frame) =
                self.session
                    .republish(alias, out.sent_as, out.payload.clone(), None);
            out.msg_id = Some(msg_id);
            out.sent_as = msg_id;
            self.send(&frame)?;
        }
        self.outbox = outbox;
        Ok(())
    }

    /// Rooms known to the session by id, with their cursors (what the next HELLO resumes):
    /// the bound ones and those a restarted relay did not know yet (LEFT `Restarted`).
    pub fn cursors(&self) -> HashMap<u64, u64> {
        self.session
            .rooms()
            .map(|(_, r)| r)
            .chain(self.session.parked())
            .map(|r| (r.room_id, r.cursor))
            .collect()
    }
}
