//! One Redis an engine talks to (the single Redis, or one Redis Cluster shard's
//! master): its command and pub/sub connections on the engine's mio poll, their
//! buffers, their reconnection backoff, and what is in flight on the command connection.
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
use super::{PublishRequest, RedisAddr};
use crate::ids::RoomName;

/// The first reconnect delay (doubling up to `cluster.reconnect_max`).
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Commands that wait on a command connection while it dials; past it the shard's
/// commands are refused `unavailable` (retryable) until it is connected.
pub(super) const DIAL_QUEUE_MAX: usize = 4096;
/// Answered publishes whose channel copy is still expected, per shard; past it the oldest
/// is forgotten (its copy, should it come, is handed over as any message is).
const COPIES_DUE_MAX: usize = 4096;

/// A connection to Redis with its buffers. While it dials, commands are written into
/// its buffer and wait there (see `Shard::queue_full`); they go when it is connected.
pub(super) struct Conn {
    link: Link,
    pub(super) rbuf: BytesMut,
    pub(super) wbuf: BytesMut,
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
            wbuf: BytesMut::with_capacity(64 * 1024),
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

    /// Reads what the socket has into the read buffer: an error, or EOF as one (nothing
    /// while dialing).
    pub(super) fn fill(&mut self) -> io::Result<()> {
        self.fill_at_most(usize::MAX)
    }

    /// [`Conn::fill`], failing once the read buffer holds more than `max` bytes.
    pub(super) fn fill_at_most(&mut self, max: usize) -> io::Result<()> {
        let Link::Up(stream) = &mut self.link else {
            return Ok(());
        };
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if self.rbuf.len() > max {
                return Err(super::malformed("the answer is too long"));
            }
        }
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
        after: u64,
        /// The owner's reader waiting for this page ([`super::EngineCmd::Read`]); `None`:
        /// a fill of the owner's own history.
        reader: Option<u64>,
    },
    /// `ASKING` before a command sent to a slot's importing shard (its `+OK` is dropped).
    Asking,
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
    /// This worker's publishes answered on `cmd` whose copy on `sub` has not come yet.
    pub(super) copies_due: CopiesDue,
    /// Publishes were written on `cmd` since its last `WAIT` (`cluster.wait_replicas`).
    pub(super) wait_due: bool,
    /// Answered publishes (`EngineEvent::Published`) held until the `WAIT` after them
    /// answers (`cluster.wait_replicas`); bounded by the publishes in flight.
    pub(super) held: Vec<super::EngineEvent>,
    /// When a command was last routed to it, or a room or user channel last seen on its
    /// slots (`cluster.shard_idle` counts from it).
    pub(super) last_used: Instant,
}

/// The tickets of this worker's publishes that Redis answered (the worker has their
/// sequence), in the order Redis ran them, until their copy comes back on the shard's
/// pub/sub connection: that copy would only be a duplicate for the worker, so it is not
/// handed over (one event and one wake-up of the worker fewer per publish).
///
/// Redis runs one shard's scripts one at a time: their answers on the command connection
/// and their copies on the pub/sub connection come in the same order, so a copy is found
/// at the front, and what is before it will get no copy (its room was unsubscribed, or
/// the pub/sub connection was lost meanwhile). A copy read before its answer is not here
/// and is handed over (the worker resolves the publish from it and drops the answer).
#[derive(Default)]
pub(super) struct CopiesDue {
    tickets: VecDeque<u64>,
}

impl CopiesDue {
    /// Redis answered publish `ticket` (and published it on its room's channel).
    pub(super) fn answered(&mut self, ticket: u64) {
        if self.tickets.len() >= COPIES_DUE_MAX {
            self.tickets.pop_front();
        }
        self.tickets.push_back(ticket);
    }

    /// Whether the copy of `ticket` just read is one whose answer was handed over (it is
    /// then forgotten, with the older ones whose copies will not come).
    pub(super) fn take_copy(&mut self, ticket: u64) -> bool {
        match self.tickets.iter().position(|&t| t == ticket) {
            Some(at) => {
                self.tickets.drain(..=at);
                true
            }
            None => false,
        }
    }
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
            copies_due: CopiesDue::default(),
            wait_due: false,
            held: Vec::new(),
            last_used: Instant::now(),
        }
    }

    /// Shard `i`'s tokens: (command, pub/sub). Token 0 is the engine's waker.
    pub(super) fn tokens(i: usize) -> (Token, Token) {
        (Token(2 * i + 1), Token(2 * i + 2))
    }

    /// Both connections are up (connected, not dialing).
    pub(super) fn up(&self) -> bool {
        self.cmd.as_ref().is_some_and(Conn::is_up) && self.sub.as_ref().is_some_and(Conn::is_up)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_skipped_once_after_its_answer_and_older_answers_are_forgotten() {
        let mut due = CopiesDue::default();
        assert!(!due.take_copy(1), "read before its answer: handed over");
        for t in [1, 2, 3] {
            due.answered(t);
        }
        // 1's copy never came (its room was let go): 2's copy forgets it.
        assert!(due.take_copy(2));
        assert!(!due.take_copy(2), "skipped once");
        assert!(!due.take_copy(1), "forgotten");
        assert!(due.take_copy(3));
        assert!(due.tickets.is_empty());
    }

    #[test]
    fn answers_whose_copies_never_come_are_bounded() {
        let mut due = CopiesDue::default();
        for t in 0..(COPIES_DUE_MAX as u64 + 10) {
            due.answered(t);
        }
        assert_eq!(due.tickets.len(), COPIES_DUE_MAX);
        assert!(!due.take_copy(0), "the oldest was forgotten");
        assert!(due.take_copy(COPIES_DUE_MAX as u64 + 9));
    }
}
