//! The sockets of one worker as its tests see them: one [`Transport`] for the unit tests'
//! harness (`core/tests.rs`), the deterministic simulation (`core/sim.rs`) and the
//! `test-hooks` worker (`test_hooks.rs`, which counts heap blocks: driving this wire
//! allocates nothing once each connection's buffer exists).
//!
//! It keeps what the core wrote to each connection until the test takes it, the send in
//! flight on each connection until the test completes it (the core's contract is one at a
//! time: a second is a bug in the core, and panics here), and which connections the core
//! half-closed or closed, counting sends made after either (a real socket answers EPIPE).
//!
//! Owns: that record. Must not touch: the core (tests call its entry points themselves).

use std::collections::{BTreeSet, HashMap, VecDeque};

use bytes::{Bytes, BytesMut};

use super::Transport;
use crate::io::Token;

/// What the core handed to "the sockets".
#[derive(Default)]
pub(crate) struct TestWire {
    /// Bytes written to each connection and not yet taken by the test (buffers reused).
    written: HashMap<Token, BytesMut>,
    /// The send in flight on each connection: its length.
    in_flight: HashMap<Token, usize>,
    half_closed: BTreeSet<Token>,
    closed: BTreeSet<Token>,
    /// Sends to a connection after the core half-closed or closed it.
    sends_after_end: usize,
}

impl Transport for TestWire {
    fn send(&mut self, token: Token, bufs: &mut VecDeque<Bytes>) {
        if self.has_ended(token) {
            self.sends_after_end += 1;
        }
        let out = self.written.entry(token).or_default();
        let mut n = 0;
        for b in bufs.drain(..) {
            n += b.len();
            out.extend_from_slice(&b);
        }
        assert!(
            self.in_flight.insert(token, n).is_none(),
            "two sends in flight on one connection"
        );
    }
    fn set_reading(&mut self, _: Token, _: bool) {}
    fn shutdown_write(&mut self, token: Token) {
        self.half_closed.insert(token);
    }
    fn close(&mut self, token: Token) {
        self.closed.insert(token);
    }
    fn close_listeners(&mut self) {}
}

// reason: built without `cfg(test)` for the `test-hooks` worker, which uses a part of it.
#[cfg_attr(not(test), allow(dead_code))]
impl TestWire {
    /// Completes the send in flight on `token`: its length (the core's `on_sent` is the
    /// caller's to call).
    pub(crate) fn complete(&mut self, token: Token) -> Option<usize> {
        self.in_flight.remove(&token)
    }

    /// Completes every send in flight (except to connections `held` names) into `done`,
    /// which the caller reuses: (connection, length).
    pub(crate) fn complete_all(
        &mut self,
        held: impl Fn(Token) -> bool,
        done: &mut Vec<(Token, usize)>,
    ) {
        done.extend(
            self.in_flight
                .iter()
                .filter(|(t, _)| !held(**t))
                .map(|(t, n)| (*t, *n)),
        );
        for (token, _) in done.iter() {
            self.in_flight.remove(token);
        }
    }

    /// Whether a send is in flight on `token`.
    pub(crate) fn sending(&self, token: Token) -> bool {
        self.in_flight.contains_key(&token)
    }

    /// Whether any send is in flight.
    pub(crate) fn any_sending(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Gives `token`'s connection a buffer of `capacity` bytes up front (a test that counts
    /// heap blocks then sees none from the wire).
    pub(crate) fn reserve(&mut self, token: Token, capacity: usize) {
        self.written
            .insert(token, BytesMut::with_capacity(capacity));
    }

    /// Everything written to `token` and not yet taken (its buffer stays for reuse).
    pub(crate) fn take_written(&mut self, token: Token) -> Option<BytesMut> {
        self.written.get_mut(&token).map(BytesMut::split)
    }

    /// The first `n` bytes written to `token` and not yet taken (one send's).
    pub(crate) fn take_first(&mut self, token: Token, n: usize) -> Option<BytesMut> {
        let written = self.written.get_mut(&token)?;
        (written.len() >= n).then(|| written.split_to(n))
    }

    /// What was written to `token` and not yet taken, to decode in place.
    pub(crate) fn written_mut(&mut self, token: Token) -> Option<&mut BytesMut> {
        self.written.get_mut(&token)
    }

    /// The core half-closed `token` (its last frame is out).
    pub(crate) fn half_closed(&self, token: Token) -> bool {
        self.half_closed.contains(&token)
    }

    /// The core closed `token`.
    pub(crate) fn closed(&self, token: Token) -> bool {
        self.closed.contains(&token)
    }

    /// The core half-closed or closed `token`.
    pub(crate) fn has_ended(&self, token: Token) -> bool {
        self.half_closed(token) || self.closed(token)
    }

    /// Sends made to a connection after the core half-closed or closed it.
    pub(crate) fn sends_after_end(&self) -> usize {
        self.sends_after_end
    }

    /// The connection is gone (the phone cut it): nothing of it is kept.
    pub(crate) fn forget(&mut self, token: Token) {
        self.written.remove(&token);
        self.in_flight.remove(&token);
        self.half_closed.remove(&token);
        self.closed.remove(&token);
    }
}
