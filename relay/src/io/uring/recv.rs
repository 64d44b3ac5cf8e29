//! The io_uring backend's receives: the multishot `RECV` from the provided-buffer ring
//! (single-shot, into a buffer of the connection's own, where the ring or multishot is
//! missing), the `POLLRDHUP` watch beside it, pausing and resuming reads (data that arrives
//! while paused is stashed and delivered on resume), and handing each buffer back to the
//! ring once the sink has read it.
//!
//! Owns the receive state of a connection record and its [`Rare`] part. Must not touch
//! sends, the listeners, or the ring's enter/reap loop ([`super`]); which buffers are posted
//! is [`super::super::uring_buffers`]'s business.

use std::io;
use std::mem;
use std::ptr;

use io_uring::{cqueue, opcode, squeue};

use super::super::slab::Key;
use super::super::{CloseReason, EventSink, Token};
use super::record::CancelsExhausted;
use super::{BGID, OP_CANCEL, OP_HUP, OP_RECV, UringBackend, errno, user_data};

/// What only a paused connection, or one on the single-shot receive path, needs: boxed, so
/// that the others do not carry it.
#[derive(Default)]
pub(super) struct Rare {
    /// Data that completed while reads were paused (a receive races its cancellation).
    pub(super) stash: Vec<u8>,
    /// Single-shot receive buffer (no buffer ring): heap memory of its own, whose address
    /// the kernel is given.
    pub(super) rbuf: Option<Box<[u8]>>,
}

/// Hands received bytes to the sink, or to the stash while reads are paused.
fn deliver(
    sink: &mut dyn EventSink,
    token: Token,
    reading: bool,
    stash: Option<&mut Vec<u8>>,
    data: &[u8],
) {
    match stash {
        Some(stash) if !reading => stash.extend_from_slice(data),
        _ => sink.received(token, data),
    }
}

impl UringBackend {
    pub(super) fn arm_recv(&mut self, idx: u32) {
        let ring = self.bufs.is_some();
        let multishot = self.recv_multishot && ring;
        let bundle = multishot && self.recv_bundle;
        let buf_size = self.buf_size;
        let Some((key, conn)) = self.conns.at_mut(idx) else {
            return;
        };
        let generation = key.generation;
        if conn.flags.recv_armed() || conn.flags.closing() {
            return;
        }
        let ud = user_data(OP_RECV, idx, generation);
        conn.flags.set_recv_is_bundle(bundle && !conn.flags.rdhup());
        let entry = if conn.flags.recv_is_bundle() {
            // One completion for every buffer's worth the socket has ready.
            opcode::RecvMultiBundle::new(conn.fd(), BGID)
                .build()
                .user_data(ud)
        } else if multishot && !conn.flags.rdhup() {
            opcode::RecvMulti::new(conn.fd(), BGID)
                .build()
                .user_data(ud)
        } else if ring {
            // Single-shot, still selecting from the buffer ring (len 0: the buffer's size).
            opcode::Recv::new(conn.fd(), ptr::null_mut(), 0)
                .buf_group(BGID)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
                .user_data(ud)
        } else {
            let fd = conn.fd();
            let buf = conn
                .rare
                .get_or_insert_default()
                .rbuf
                .get_or_insert_with(|| vec![0u8; buf_size].into_boxed_slice());
            let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
            opcode::Recv::new(fd, buf.as_mut_ptr(), len)
                .build()
                .user_data(ud)
        };
        conn.flags.set_recv_armed(true);
        conn.flags.set_recv_cancelling(false);
        // SAFETY: with buffer select the kernel writes only into buffer-ring memory, which
        // outlives every operation (see `Drop`). Otherwise `rbuf` is a heap block the
        // connection owns (not part of the record; the rare state holding it is kept while
        // it has one), freed only with the connection, after this receive's final
        // completion (`ops()` counts it), and read only after that completion.
        unsafe { self.push(entry) }
    }

    /// Watches the connection for the peer's FIN or an error with a one-shot
    /// `POLL_ADD(POLLRDHUP)`, alongside the multishot receive.
    ///
    /// Why: on Linux up to at least 6.18 a multishot `RECV` whose first issue races with the
    /// peer's data and FIN can post the data and then never post the EOF completion (the
    /// connection would sit open until the worker's heartbeat gives up on it; compare
    /// liburing issue #1549). Our tests hit it about once in a thousand short connections.
    /// When this poll fires we cancel the multishot receive and read the rest of the stream
    /// with single-shot receives, which do not have the race. The cost is one SQE per
    /// connection and one completion when the peer goes away.
    pub(super) fn arm_hup(&mut self, idx: u32) {
        if !(self.recv_multishot && self.bufs.is_some()) {
            return; // single-shot receives report EOF reliably
        }
        let Some((key, conn)) = self.conns.at_mut(idx) else {
            return;
        };
        let generation = key.generation;
        if conn.flags.hup_armed() || conn.flags.rdhup() || conn.flags.closing() {
            return;
        }
        conn.flags.set_hup_armed(true);
        // POLLERR and POLLHUP are always reported.
        let entry = opcode::PollAdd::new(conn.fd(), libc::POLLRDHUP as u32)
            .build()
            .user_data(user_data(OP_HUP, idx, generation));
        // SAFETY: a poll references no memory of ours; the fd stays open until its
        // completion (`ops()` counts it).
        unsafe { self.push(entry) }
    }

    pub(super) fn on_recv(
        &mut self,
        idx: u32,
        generation: u32,
        res: i32,
        flags: u32,
        more: bool,
        sink: &mut dyn EventSink,
    ) {
        enum Next {
            Nothing,
            Rearm,
            Close(CloseReason),
            Finalize,
        }
        self.recv_completions += 1;
        let bid = cqueue::buffer_select(flags);
        let Self {
            conns,
            bufs,
            recv_multishot,
            recv_bundle,
            recv_dry,
            ..
        } = self;
        let key = Key {
            index: idx,
            generation,
        };
        let Some(conn) = conns.get_mut(key) else {
            // Cannot happen (a slot outlives its operations); if it did, a plain receive's
            // one buffer is known, a bundle's are not: keep those out of the ring.
            if let (Some(bid), Some(bufs), false) = (bid, bufs.as_mut(), *recv_bundle) {
                bufs.release(bid, 1);
            }
            return;
        };
        // Buffers this completion consumed from the ring: a bundle names the first and
        // fills as many as its bytes need (none when it carries no data); a plain receive
        // consumes the one it names.
        let consumed = match (bid, bufs.as_ref()) {
            (Some(first), Some(b)) if conn.flags.recv_is_bundle() => {
                b.bundle_len(first, res.max(0) as usize)
            }
            (Some(_), Some(_)) => Some(1),
            _ => Some(0),
        };
        if !more {
            conn.flags.set_recv_armed(false);
            conn.flags.set_recv_cancelling(false);
        }
        let next = if conn.flags.closing() {
            Next::Finalize
        } else if res > 0 {
            let (token, reading) = (conn.token, conn.flags.reading());
            if !reading {
                conn.rare.get_or_insert_default(); // for the stash
            }
            let (mut stash, rbuf) = match conn.rare.as_deref_mut() {
                Some(Rare { stash, rbuf }) => (Some(stash), rbuf.as_deref()),
                None => (None, None),
            };
            if reading
                && let Some(stash) = stash.as_deref_mut()
                && !stash.is_empty()
            {
                sink.received(token, stash);
                stash.clear();
            }
            let mut left = res as usize;
            let mut valid = consumed.is_some();
            match (bid, bufs.as_ref()) {
                (Some(first), Some(bufs)) => {
                    for i in 0..consumed.unwrap_or(0) {
                        let data = u16::try_from(i)
                            .ok()
                            .and_then(|i| bufs.nth_after(first, i))
                            .and_then(|(bid, cap)| bufs.slice(bid, left.min(cap)));
                        let Some(data) = data else {
                            valid = false;
                            break;
                        };
                        left -= data.len();
                        deliver(sink, token, reading, stash.as_deref_mut(), data);
                    }
                    // Every byte the completion reports lies in the buffers it consumed.
                    valid &= left == 0;
                }
                (None, _) => match rbuf.and_then(|b| b.get(..left)) {
                    Some(data) => deliver(sink, token, reading, stash, data),
                    None => valid = false,
                },
                (Some(_), None) => valid = false,
            }
            if reading {
                conn.trim_rare();
            }
            match (valid, more) {
                (false, _) => Next::Close(CloseReason::Error(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "receive completion names no valid buffer",
                ))),
                (true, true) => Next::Nothing,
                (true, false) => Next::Rearm,
            }
        } else if res == 0 {
            if conn.flags.reading() {
                conn.deliver_stash(sink);
                Next::Close(CloseReason::PeerClosed)
            } else {
                conn.flags.set_eof_pending(true);
                Next::Nothing
            }
        } else {
            match -res {
                // The ring ran dry (a bundle took what was posted, or nothing was): post
                // more buffers, and re-arm; the rest waits in the socket.
                libc::ENOBUFS => {
                    *recv_dry += 1;
                    if let Some(bufs) = bufs.as_mut() {
                        bufs.ran_dry();
                    }
                    Next::Rearm
                }
                // The receive was cancelled (pause): re-arm if reading.
                libc::ECANCELED | libc::EINTR | libc::EAGAIN => Next::Rearm,
                libc::EINVAL if conn.flags.recv_is_bundle() && *recv_bundle => {
                    tracing::warn!(
                        "io_uring: receive bundles refused (EINVAL); plain multishot receive"
                    );
                    *recv_bundle = false;
                    Next::Rearm
                }
                libc::EINVAL if *recv_multishot => {
                    tracing::debug!(
                        "io_uring: multishot receive unsupported (EINVAL); single-shot receive into per-connection buffers"
                    );
                    *recv_multishot = false;
                    Next::Rearm
                }
                _ => Next::Close(CloseReason::Error(errno(res))),
            }
        };
        // The sink is done with the buffers: give them back.
        if let (Some(bid), Some(bufs)) = (bid, bufs.as_mut())
            && !consumed.is_some_and(|n| bufs.release(bid, n))
        {
            tracing::error!(
                bid,
                consumed,
                "receive completion names buffers not in the ring"
            );
        }
        match next {
            Next::Nothing => {}
            Next::Rearm => {
                if let Some(conn) = self.conn_mut(idx, generation)
                    && conn.flags.reading()
                    && !conn.flags.eof_pending()
                    && !conn.flags.recv_armed()
                {
                    self.arm_recv(idx);
                }
            }
            Next::Close(reason) => self.close_with(idx, reason, sink),
            Next::Finalize => self.maybe_finalize(idx),
        }
    }

    pub(super) fn on_hup(&mut self, idx: u32, generation: u32, res: i32) {
        let Some(conn) = self.conn_mut(idx, generation) else {
            return;
        };
        conn.flags.set_hup_armed(false);
        if conn.flags.closing() {
            self.maybe_finalize(idx);
            return;
        }
        if res < 0 {
            if res != -libc::ECANCELED {
                tracing::debug!(token = conn.token, error = %errno(res), "POLLRDHUP watch failed");
            }
            return;
        }
        // The peer is done sending (or the socket failed). Replace the multishot receive by
        // single-shot ones; its cancellation completion re-arms (see `on_recv`).
        conn.flags.set_rdhup(true);
        self.cancel_recv(idx, generation);
    }

    /// Delivers what was held for resumed connections (data stashed while paused, then a
    /// deferred EOF) and re-arms their receives. Returns whether the sink heard anything.
    pub(super) fn run_ready(&mut self, sink: &mut dyn EventSink) -> bool {
        let mut delivered = false;
        let mut ready = mem::take(&mut self.ready);
        for &key in &ready {
            let idx = key.index;
            let Some(conn) = self.conn_mut(idx, key.generation) else {
                continue;
            };
            conn.flags.set_queued(false);
            if conn.flags.closing() {
                continue;
            }
            if conn.flags.cancels_exhausted() {
                let error = io::Error::other(CancelsExhausted);
                self.close_with(idx, CloseReason::Error(error), sink);
                delivered = true;
                continue;
            }
            if !conn.flags.reading() {
                continue;
            }
            if conn.stashed() {
                conn.deliver_stash(sink);
                delivered = true;
            }
            if conn.flags.eof_pending() {
                self.close_with(idx, CloseReason::PeerClosed, sink);
                delivered = true;
            } else {
                self.arm_recv(idx);
            }
        }
        ready.clear();
        if self.ready.is_empty() {
            self.ready = ready;
        }
        delivered
    }

    /// Cancels connection `idx`'s armed multishot receive, once (its cancellation's
    /// completion says what comes next: see `on_recv`).
    fn cancel_recv(&mut self, idx: u32, generation: u32) {
        let Some((_, conn)) = self.conns.at_mut(idx) else {
            return;
        };
        if !conn.flags.recv_armed() || conn.flags.recv_cancelling() {
            return;
        }
        if conn.count_recv_cancel().is_err() {
            // Refused: close on the next tick (the sink is not at hand here); until then a
            // paused connection's data waits in the stash, as when a receive races its
            // cancellation.
            conn.flags.set_cancels_exhausted(true);
            self.queue_ready(idx);
            return;
        }
        conn.flags.set_recv_cancelling(true);
        self.push_cancel(
            user_data(OP_RECV, idx, generation),
            user_data(OP_CANCEL, idx, generation),
        );
    }

    /// Pauses or resumes reading (the worker's `Transport::set_reading`).
    pub(super) fn switch_reading(&mut self, token: Token, reading: bool) {
        let Some(idx) = self.by_token.get(token) else {
            return;
        };
        let Some((key, conn)) = self.conns.at_mut(idx) else {
            return;
        };
        let generation = key.generation;
        if conn.flags.reading() == reading {
            return;
        }
        conn.flags.set_reading(reading);
        if !reading {
            self.cancel_recv(idx, generation);
        } else if conn.stashed() || conn.flags.eof_pending() {
            self.queue_ready(idx);
        } else if !conn.flags.recv_armed() {
            self.arm_recv(idx);
        }
        // Resumed while the cancellation is in flight: the cancelled receive's completion
        // re-arms it.
    }
}
