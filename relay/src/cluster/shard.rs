//! One Redis an engine thread talks to (the single Redis, or one Redis Cluster shard's
//! master): its command and pub/sub connections on the engine thread's mio poll, their
//! buffers, their reconnection backoff, and what is in flight on the command connection.
//!
//! Owns: the sockets and their bytes. Must not touch: what the commands mean (the engine
//! encodes them and reads the replies, see `engine.rs`).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::ToSocketAddrs;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::{PublishRequest, RedisAddr};
use crate::ids::RoomName;

/// The first reconnect delay (doubling up to `cluster.reconnect_max`).
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Answered publishes whose channel copy is still expected, per shard; past it the oldest
/// is forgotten (its copy, should it come, is handed over as any message is).
const COPIES_DUE_MAX: usize = 4096;

/// A connection to Redis with its buffers.
pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) rbuf: BytesMut,
    pub(super) wbuf: BytesMut,
}

impl Conn {
    /// Connects (blocking, bounded by `timeout`) and registers the socket as `token`.
    pub(super) fn open(
        addr: &RedisAddr,
        timeout: Duration,
        registry: &Registry,
        token: Token,
    ) -> io::Result<Conn> {
        let mut last = io::Error::other("the address resolves to nothing");
        for a in (addr.host.as_str(), addr.port).to_socket_addrs()? {
            match std::net::TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    s.set_nonblocking(true)?;
                    let mut stream = TcpStream::from_std(s);
                    registry.register(
                        &mut stream,
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    return Ok(Conn {
                        stream,
                        rbuf: BytesMut::with_capacity(64 * 1024),
                        wbuf: BytesMut::with_capacity(64 * 1024),
                    });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Writes what is buffered until the socket would block.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        while !self.wbuf.is_empty() {
            match self.stream.write(&self.wbuf) {
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

    /// Reads what the socket has into the read buffer: an error, or EOF as one.
    pub(super) fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A command on a command connection awaiting its reply (in order).
pub(super) enum Pending {
    /// A publish, with when it was written (its engine thread's clock).
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
    pub(super) cmd: Option<Conn>,
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
            cmd: None,
            sub: None,
            cmd_retry: Retry::now(),
            sub_retry: Retry::now(),
            inflight: VecDeque::new(),
            copies_due: CopiesDue::default(),
            wait_due: false,
            held: Vec::new(),
        }
    }

    /// Shard `i`'s tokens: (command, pub/sub). Token 0 is the engine's waker.
    pub(super) fn tokens(i: usize) -> (Token, Token) {
        (Token(2 * i + 1), Token(2 * i + 2))
    }

    /// Both connections are up.
    pub(super) fn up(&self) -> bool {
        self.cmd.is_some() && self.sub.is_some()
    }

    /// Registers the open connections under shard `i`'s tokens (after the shards were
    /// renumbered by a new slot map).
    pub(super) fn reregister(&mut self, registry: &Registry, i: usize) -> io::Result<()> {
        let (ct, st) = Self::tokens(i);
        let both = Interest::READABLE | Interest::WRITABLE;
        if let Some(c) = self.cmd.as_mut() {
            registry.reregister(&mut c.stream, ct, both)?;
        }
        if let Some(c) = self.sub.as_mut() {
            registry.reregister(&mut c.stream, st, both)?;
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
