//! One Redis an engine talks to (the single Redis, or one Redis Cluster shard's
//! master): its command and pub/sub connections on the engine's mio poll, their
//! buffers (what one buffers of a reply not yet whole is bounded: [`reply_max`]), their
//! reconnection backoff, and what is in flight on the command connection.
//!
//! Owns: the sockets and their bytes. Must not touch: what the commands mean (the engine
//! encodes them and reads the replies, see `engine.rs`).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::engine::dial::{Dial, Dialed, Resolver};
use super::resp::{self, RespError, Value};
use super::{MAX_OPEN_TAIL, PublishRequest, RedisAddr};
use crate::ids::RoomName;

/// The first reconnect delay (doubling up to `cluster.reconnect_max`).
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Commands that wait on a command connection while it dials; past it the shard's
/// commands are refused `unavailable` (retryable) until it is connected.
pub(super) const DIAL_QUEUE_MAX: usize = 4096;
/// The least [`reply_max`] is: room for the replies that are no page of messages (a
/// user's rooms, a hand-off page, a slot map) and for pages of small messages.
pub(super) const REPLY_MIN: usize = 64 << 20;
/// What a connection reads at most before what it read is decoded and handled (then it
/// reads on): what one read decodes into at once stays small, whatever Redis sends.
pub(super) const READ_ROUND: usize = 1 << 20;
/// A message's bytes in a reply beside its payload: its sender, time and tag, its stream
/// entry's id and fields, and their RESP framing.
const ENTRY_OVERHEAD: usize = 1024;

/// The most one connection buffers of a reply that is not whole yet: the largest reply
/// the engine asks for is a page of messages, `cluster.fill_batch` of them read from a
/// stream or an open's tail of at most [`MAX_OPEN_TAIL`], each at most `max_payload`
/// (the node's `connection.max_frame_len`: above any `limits.max_payload`, which a reload
/// may raise, and fixed until a restart) with its [`ENTRY_OVERHEAD`]; never less than
/// [`REPLY_MIN`]. Past it Redis is taken for broken (the connection is reset as for a
/// malformed answer, and the command sent again): without it, `*1048576` followed by
/// 16 MiB bulk strings would have a node buffer 16 TiB before its decoder could refuse
/// anything. It assumes the nodes of a cluster share `connection.max_frame_len`: a node
/// with a smaller one than another's would reset its connection on a page of that one's
/// largest messages again and again (found by review, with the bound on
/// `limits.max_payload`, which a reload raises).
pub(super) fn reply_max(fill_batch: usize, max_payload: usize) -> usize {
    let entries = fill_batch.max(MAX_OPEN_TAIL as usize);
    REPLY_MIN.max(entries.saturating_mul(max_payload.saturating_add(ENTRY_OVERHEAD)))
}

/// A connection to Redis with its buffers. While it dials, commands are written into
/// its buffer and wait there (see `Shard::queue_full`); they go when it is connected.
pub(super) struct Conn {
    link: Link,
    pub(super) rbuf: BytesMut,
    /// Decodes `rbuf`, remembering what the reply at its front still lacks.
    decoder: resp::Decoder,
    pub(super) wbuf: BytesMut,
    /// When Redis last sent anything on it (or it connected); `cluster.reply_timeout`
    /// counts from it (`engine/connections.rs`).
    pub(super) heard: Instant,
    /// Redis answered on it since it connected: only then does it count as up for the
    /// engine's health (a peer that accepts and never answers is not a Redis up).
    pub(super) answered: bool,
    /// Since when it has been waiting for Redis with nothing heard meanwhile: a command in
    /// flight, or a `PING` sent; `None` while nothing is awaited.
    pub(super) awaiting: Option<Instant>,
}

/// The socket of a [`Conn`].
enum Link {
    /// Resolving or connecting, by a deadline (`engine/dial.rs`).
    Dialing(Dial),
    Up(TcpStream),
}

/// What [`Conn::advance`] came to.
pub(super) enum Progress {
    /// Connected or still dialing: nothing to do.
    Same,
    /// Connected just now.
    Connected,
}

impl Conn {
    /// Starts dialing `addr` at `now` (the socket is registered as `token`);
    /// [`Conn::advance`] moves it on.
    pub(super) fn dial(addr: &RedisAddr, token: Token, now: Instant, timeout: Duration) -> Conn {
        Conn {
            link: Link::Dialing(Dial::new(addr.clone(), token, now, timeout)),
            rbuf: BytesMut::with_capacity(64 * 1024),
            decoder: resp::Decoder::default(),
            wbuf: BytesMut::with_capacity(64 * 1024),
            heard: now,
            answered: false,
            awaiting: None,
        }
    }

    /// Whether it is connected (not dialing).
    pub(super) fn is_up(&self) -> bool {
        matches!(self.link, Link::Up(_))
    }

    /// When a dial in progress gives up.
    pub(super) fn deadline(&self) -> Option<Instant> {
        match &self.link {
            Link::Dialing(d) => Some(d.deadline()),
            Link::Up(_) => None,
        }
    }

    /// Moves a dial on at `now`: an error when it failed (the connection is then gone).
    pub(super) fn advance(
        &mut self,
        registry: &Registry,
        resolver: &mut Resolver,
        now: Instant,
    ) -> io::Result<Progress> {
        let Link::Dialing(dial) = &mut self.link else {
            return Ok(Progress::Same);
        };
        match dial.advance(registry, resolver, now) {
            Dialed::Waiting => Ok(Progress::Same),
            Dialed::Connected(stream) => {
                self.link = Link::Up(stream);
                self.heard = now;
                Ok(Progress::Connected)
            }
            Dialed::Failed(e) => Err(e),
        }
    }

    /// Registers the socket under `token` from now on.
    pub(super) fn reregister(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        match &mut self.link {
            Link::Dialing(d) => d.reregister(registry, token),
            Link::Up(s) => registry.reregister(s, token, Interest::READABLE | Interest::WRITABLE),
        }
    }

    /// Takes the socket off the poll (the connection is dropped after).
    pub(super) fn deregister(&mut self, registry: &Registry) {
        match &mut self.link {
            Link::Dialing(d) => d.close(registry),
            Link::Up(s) => {
                let _ = registry.deregister(s);
            }
        }
    }

    /// Writes what is buffered until the socket would block (nothing while dialing).
    pub(super) fn flush(&mut self) -> io::Result<()> {
        let Link::Up(stream) = &mut self.link else {
            return Ok(());
        };
        while !self.wbuf.is_empty() {
            match stream.write(&self.wbuf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    let _ = self.wbuf.split_to(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what the socket has into the read buffer until it would block (`Ok(false)`)
    /// or until it read more than `most` bytes (`Ok(true)`: more may wait, to be read once
    /// what the buffer holds is handled); an error, or EOF as one (nothing while dialing).
    pub(super) fn fill(&mut self, most: usize) -> io::Result<bool> {
        let Link::Up(stream) = &mut self.link else {
            return Ok(false);
        };
        let mut chunk = [0u8; 16 * 1024];
        let mut read = 0;
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.rbuf.extend_from_slice(&chunk[..n]);
                    read += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if read > most {
                return Ok(true);
            }
        }
    }

    /// Reads what the socket has, failing once the read buffer holds more than `max`
    /// bytes.
    pub(super) fn fill_at_most(&mut self, max: usize) -> io::Result<()> {
        if self.fill(max)? || self.rbuf.len() > max {
            return Err(super::malformed("the answer is too long"));
        }
        Ok(())
    }

    /// Takes the next complete reply off the read buffer: `Ok(None)` until one is whole.
    pub(super) fn decode(&mut self) -> Result<Option<Value>, RespError> {
        self.decoder.decode(&mut self.rbuf)
    }
}

/// A command on a command connection awaiting its reply (in order).
pub(super) enum Pending {
    /// A publish, with when it was written (its engine's clock).
    Publish(PublishRequest, Instant),
    Open {
        room: RoomName,
        hint: u64,
        tail: u64,
    },
    Fill {
        room: RoomName,
        /// The entry the page starts after, `(seq, sub)` (see `Engine::send_fill`).
        after: (u64, u64),
        /// The owner's reader waiting for this page ([`super::EngineCmd::Read`]); `None`:
        /// a fill of the owner's own history.
        reader: Option<u64>,
    },
    /// `ASKING` before a command sent to a slot's importing shard (its `+OK` is dropped).
    Asking,
    /// `PING` on a new or idle connection (`cluster.reply_timeout`; its `+PONG` is
    /// dropped).
    Ping,
    /// Membership's commands (`engine/members.rs`).
    Members(super::engine::members::Step),
    /// Receipts' commands (`engine/receipts.rs`).
    Receipts(super::engine::receipts::Step),
    /// `WAIT <cluster.wait_replicas> <cluster.wait_timeout>` after a tick's publishes: the
    /// acknowledgements held in [`Shard::held`] wait for its answer.
    Wait,
}

/// When to try connecting next, and the delay after that.
#[derive(Clone, Copy)]
pub(super) struct Retry {
    pub(super) at: Instant,
    pub(super) delay: Duration,
}

impl Retry {
    pub(super) fn now() -> Self {
        Retry {
            at: Instant::now(),
            delay: BACKOFF_MIN,
        }
    }
}

/// One Redis: its two connections and the commands in flight on the first.
pub(super) struct Shard {
    pub(super) addr: RedisAddr,
    /// A command for one of its slots came (or it is the only Redis): its connections are
    /// dialed, and redialed when lost. A shard nobody needed has none.
    pub(super) wanted: bool,
    /// Commands; `Some` while dialing too (commands wait in its buffer).
    pub(super) cmd: Option<Conn>,
    /// Pub/sub; `Some` while dialing too (subscriptions wait in its buffer).
    pub(super) sub: Option<Conn>,
    pub(super) cmd_retry: Retry,
    pub(super) sub_retry: Retry,
    /// Commands sent on `cmd`, with how often each was redirected (`MOVED`, `ASK`).
    pub(super) inflight: VecDeque<(Pending, u8)>,
    /// This worker's publishes answered on `cmd` and their copies on `sub`.
    pub(super) copies: super::copies::Copies,
    /// Publishes were written on `cmd` since its last `WAIT` (`cluster.wait_replicas`).
    pub(super) wait_due: bool,
    /// Answered publishes (`EngineEvent::Published`) held until the `WAIT` after them
    /// answers (`cluster.wait_replicas`); bounded by the publishes in flight.
    pub(super) held: Vec<super::EngineEvent>,
    /// When a command was last routed to it, or a room or user channel last seen on its
    /// slots (`cluster.shard_idle` counts from it).
    pub(super) last_used: Instant,
    /// `sub` refused a subscription (an error reply: a busy script, ...): the channels
    /// not subscribed wait until then (backing off as `sub_retry` does), not to hammer a
    /// Redis that refuses.
    pub(super) resubscribe_at: Option<Instant>,
}

impl Shard {
    pub(super) fn new(addr: RedisAddr) -> Self {
        Shard {
            addr,
            wanted: false,
            cmd: None,
            sub: None,
            cmd_retry: Retry::now(),
            sub_retry: Retry::now(),
            inflight: VecDeque::new(),
            copies: super::copies::Copies::default(),
            wait_due: false,
            held: Vec::new(),
            last_used: Instant::now(),
            resubscribe_at: None,
        }
    }

    /// Shard `i`'s tokens: (command, pub/sub). Token 0 is the engine's waker.
    pub(super) fn tokens(i: usize) -> (Token, Token) {
        (Token(2 * i + 1), Token(2 * i + 2))
    }

    /// Both connections are up (connected, not dialing) and Redis answered on each.
    pub(super) fn up(&self) -> bool {
        let up = |c: &Conn| c.is_up() && c.answered;
        self.cmd.as_ref().is_some_and(up) && self.sub.as_ref().is_some_and(up)
    }

    /// The pub/sub connection to subscribe on at `now` (up, or dialing: the subscriptions
    /// wait in its buffer), unless subscriptions are held back after a refusal
    /// (`resubscribe_at`).
    pub(super) fn sub_for_subscribing(&mut self, now: Instant) -> Option<&mut Conn> {
        if self.resubscribe_at.is_some_and(|at| at > now) {
            return None;
        }
        self.sub.as_mut()
    }

    /// The command connection is dialing with [`DIAL_QUEUE_MAX`] commands waiting on it:
    /// more are refused (`unavailable`) rather than queued.
    pub(super) fn queue_full(&self) -> bool {
        self.cmd.as_ref().is_some_and(|c| !c.is_up()) && self.inflight.len() >= DIAL_QUEUE_MAX
    }

    /// Registers the open connections under shard `i`'s tokens (after the shards were
    /// renumbered by a new slot map).
    pub(super) fn reregister(&mut self, registry: &Registry, i: usize) -> io::Result<()> {
        let (ct, st) = Self::tokens(i);
        if let Some(c) = self.cmd.as_mut() {
            c.reregister(registry, ct)?;
        }
        if let Some(c) = self.sub.as_mut() {
            c.reregister(registry, st)?;
        }
        Ok(())
    }
}
