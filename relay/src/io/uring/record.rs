//! The io_uring backend's connection record: [`Conn`], inline in the backend's slab, 32
//! bytes like epoll's (the token, the fd, its state flags packed in [`ConnFlags`], the count
//! of its cancellations in flight, and two boxes held only while needed: the batch being
//! sent and the [`Rare`] state), and the bound on that count ([`CancelsExhausted`]).
//!
//! Owns the record's layout and the bookkeeping that says when its slot may go (`ops`).
//! Must not submit anything to the ring or decide what an event means: the receive and
//! send paths ([`super::recv`], [`super::send`]) and the closing in [`super`] do that, and
//! read and write the flags only through their accessors.

use std::net;
use std::os::fd::AsRawFd;

use io_uring::types;

use super::super::{EventSink, Token};
use super::recv::Rare;
use super::send::Batch;

/// One connection's record, inline in the slab (32 bytes: what every connection needs; a
/// batch being sent and the rare state are boxed apart).
pub(super) struct Conn {
    pub(super) token: Token,
    /// Owned; closed through the ring once no operation names it.
    pub(super) stream: net::TcpStream,
    pub(super) flags: ConnFlags,
    /// Our cancellations in flight for this connection (see [`Conn::count_recv_cancel`]).
    cancels: u16,
    /// The batch being sent (`None` while idle).
    pub(super) batch: Option<Box<Batch>>,
    /// The stash and the single-shot receive buffer, made on first use.
    pub(super) rare: Option<Box<Rare>>,
}

/// The most cancellations one connection may have in flight.
const CANCELS_MAX: u16 = u16::MAX;
/// Cancellations closing submits at most (the receive, the send, the `POLLRDHUP` watch):
/// [`Conn::count_recv_cancel`] always leaves room for them.
pub(super) const CLOSE_CANCELS: u16 = 3;

/// A receive's cancellation refused: the connection has as many cancellations in flight
/// as its count holds, less the room kept for closing. Nothing we know of gets near it (a
/// connection has one receive cancellation in flight per pause or FIN, and each completes
/// at once); the connection is closed with this error rather than its count wrapping.
#[derive(Debug, thiserror::Error)]
#[error("{} cancellations already in flight for one connection", CANCELS_MAX - CLOSE_CANCELS)]
pub(super) struct CancelsExhausted;

impl Conn {
    pub(super) fn new(token: Token, stream: net::TcpStream) -> Self {
        let mut flags = ConnFlags::default();
        flags.set_reading(true);
        Self {
            token,
            stream,
            flags,
            cancels: 0,
            batch: None,
            rare: None,
        }
    }

    pub(super) fn fd(&self) -> types::Fd {
        types::Fd(self.stream.as_raw_fd())
    }

    /// Whether data waits in the stash.
    pub(super) fn stashed(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| !r.stash.is_empty())
    }

    /// Hands the stash to the sink and empties it; frees the rare state once nothing is
    /// left in it.
    pub(super) fn deliver_stash(&mut self, sink: &mut dyn EventSink) {
        if let Some(rare) = self.rare.as_mut()
            && !rare.stash.is_empty()
        {
            sink.received(self.token, &rare.stash);
            rare.stash.clear();
        }
        self.trim_rare();
    }

    /// Frees the rare state when it holds nothing: no stash, no single-shot buffer (whose
    /// address a receive may hold, so it stays while there is one).
    pub(super) fn trim_rare(&mut self) {
        if self
            .rare
            .as_ref()
            .is_some_and(|r| r.rbuf.is_none() && r.stash.is_empty())
        {
            self.rare = None;
        }
    }

    /// Counts a cancellation of the receive (a pause, or the peer's FIN), or refuses it once
    /// the count would leave less than [`CLOSE_CANCELS`] of room: the count never wraps.
    pub(super) fn count_recv_cancel(&mut self) -> Result<(), CancelsExhausted> {
        if self.cancels >= CANCELS_MAX - CLOSE_CANCELS {
            return Err(CancelsExhausted);
        }
        self.cancels += 1;
        Ok(())
    }

    /// Counts closing's cancellations (at most [`CLOSE_CANCELS`]). It always fits: receive
    /// cancellations keep that much room, closing counts once per connection, and none is
    /// counted after it (a closing connection is no longer found by its token, nor arms a
    /// receive). Saturating all the same: a count that fell short would let the slot go
    /// before a cancellation's completion, which the slot's generation then ignores.
    pub(super) fn count_close_cancels(&mut self, n: u16) {
        debug_assert!(n <= CLOSE_CANCELS);
        self.cancels = self.cancels.saturating_add(n);
    }

    /// One of our cancellations completed.
    pub(super) fn cancel_done(&mut self) {
        self.cancels = self.cancels.saturating_sub(1);
    }

    /// Operations in flight that name this connection's fd or memory.
    pub(super) fn ops(&self) -> u32 {
        let f = self.flags;
        u32::from(f.recv_armed())
            + u32::from(f.hup_armed())
            + u32::from(f.send_inflight())
            + u32::from(self.cancels)
    }

    /// Puts the cancellation count at its bound, as if that many receive cancellations
    /// were in flight (tests of the refusal).
    #[cfg(test)]
    pub(super) fn fill_cancels(&mut self) {
        self.cancels = CANCELS_MAX - CLOSE_CANCELS;
    }
}

/// A connection's state flags, one bit each in a `u16` (twelve bools took 12 bytes of the
/// record): each accessor is one bit test or one bit set, as a `bool` field's was a byte's.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct ConnFlags(u16);

/// Defines each flag's bit and its two accessors (and, for tests, the list of them all).
macro_rules! conn_flags {
    ($( $(#[$doc:meta])* $bit:literal => $get:ident, $set:ident; )*) => {
        impl ConnFlags {
            $(
                $(#[$doc])*
                #[inline]
                pub(super) fn $get(self) -> bool {
                    self.0 & (1 << $bit) != 0
                }

                #[inline]
                pub(super) fn $set(&mut self, on: bool) {
                    if on {
                        self.0 |= 1 << $bit;
                    } else {
                        self.0 &= !(1 << $bit);
                    }
                }
            )*

            /// Every flag: its name, its getter and its setter.
            #[cfg(test)]
            #[allow(clippy::type_complexity)] // reason: a test's table of accessors
            pub(super) const ALL: &[(&str, fn(ConnFlags) -> bool, fn(&mut ConnFlags, bool))] =
                &[$( (stringify!($get), ConnFlags::$get, ConnFlags::$set) ),*];
        }
    };
}

conn_flags! {
    /// The worker wants `received` calls (reads not paused).
    0 => reading, set_reading;
    /// A receive is armed (its final completion not yet reaped).
    1 => recv_armed, set_recv_armed;
    /// The armed receive's cancellation is in flight.
    2 => recv_cancelling, set_recv_cancelling;
    /// The armed receive is a bundle (its completions consume consecutive buffers).
    3 => recv_is_bundle, set_recv_is_bundle;
    /// The `POLLRDHUP` watch is in flight.
    4 => hup_armed, set_hup_armed;
    /// The peer shut down or the socket failed: receive single-shot from now on.
    5 => rdhup, set_rdhup;
    /// EOF arrived while reads were paused; reported on resume, after the stash.
    6 => eof_pending, set_eof_pending;
    /// A send of the connection's batch is in flight.
    7 => send_inflight, set_send_inflight;
    /// `shutdown_write` was asked for while a send was in flight: it follows the batch.
    8 => shutdown_pending, set_shutdown_pending;
    /// The worker closed it, or we reported `closed`: waiting for operations to finish.
    9 => closing, set_closing;
    /// On the `ready` list.
    10 => queued, set_queued;
    /// A receive's cancellation was refused ([`CancelsExhausted`]): the next tick closes
    /// the connection with that error.
    11 => cancels_exhausted, set_cancels_exhausted;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Twelve bools became bits of one `u16`: each accessor must set, clear and read its
    /// own bit and no other, whatever the others hold (a mix-up of two flags sharing the
    /// word would show as a pause that cancels the send, or a close that waits forever).
    #[test]
    fn each_connection_flag_sets_and_clears_only_its_own_bit() {
        let all = ConnFlags::ALL;
        assert_eq!(all.len(), 12);
        assert!(all.len() <= 16, "the flags fit the u16");
        for &(name, get, set) in all {
            for background in [ConnFlags(0), ConnFlags(u16::MAX)] {
                let mut flags = background;
                set(&mut flags, !get(background));
                for &(other, get_other, _) in all {
                    let changed = get_other(flags) != get_other(background);
                    assert_eq!(changed, other == name, "setting {name} changed {other}");
                }
                set(&mut flags, get(background));
                assert!(flags == background, "{name} did not clear back");
            }
        }
    }

    #[test]
    fn a_new_record_reads_and_is_32_bytes() {
        let (stream, _peer) = loopback_pair();
        let conn = Conn::new(7, stream);
        let flags = conn.flags;
        let set: Vec<&str> = ConnFlags::ALL
            .iter()
            .filter(|(_, get, _)| get(flags))
            .map(|(name, _, _)| *name)
            .collect();
        assert_eq!(set, ["reading"], "a new connection only reads");
        assert_eq!(conn.ops(), 0);
        assert_eq!(std::mem::size_of::<Conn>(), 32);
        assert_eq!(
            std::mem::size_of::<Option<Conn>>(),
            32,
            "the slab's `Option` takes the descriptor's niche, no tag"
        );
    }

    /// The count of cancellations in flight is a `u16`: receive cancellations are refused
    /// (typed) before it would leave no room for closing's three, and closing's always fit,
    /// so it never wraps.
    #[test]
    fn the_cancellation_count_refuses_past_its_bound_and_keeps_room_for_closing() {
        let (stream, _peer) = loopback_pair();
        let mut conn = Conn::new(1, stream);
        for _ in 0..CANCELS_MAX - CLOSE_CANCELS {
            assert!(conn.count_recv_cancel().is_ok());
        }
        assert_eq!(conn.ops(), u32::from(CANCELS_MAX - CLOSE_CANCELS));
        let refused = conn.count_recv_cancel();
        assert!(
            matches!(refused, Err(CancelsExhausted)),
            "the 65,533rd receive cancellation is refused"
        );
        assert_eq!(
            conn.ops(),
            u32::from(CANCELS_MAX - CLOSE_CANCELS),
            "unchanged"
        );
        conn.count_close_cancels(CLOSE_CANCELS);
        assert_eq!(
            conn.ops(),
            u32::from(CANCELS_MAX),
            "closing's three fit exactly"
        );
        for _ in 0..CANCELS_MAX {
            conn.cancel_done();
        }
        conn.cancel_done();
        assert_eq!(conn.ops(), 0, "completions count down to zero, not below");
    }

    fn loopback_pair() -> (net::TcpStream, net::TcpStream) {
        let listener = net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        (server, client)
    }
}
