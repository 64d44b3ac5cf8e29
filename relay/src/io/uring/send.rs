//! The io_uring backend's sends: the boxed [`Batch`] a connection holds while it sends,
//! the `SEND` / `SENDMSG` it submits for it, the completion's accounting (short writes
//! resubmitted with `IORING_RECVSEND_POLL_FIRST`, `sent` once the batch is written), and a
//! half-close queued behind the batch.
//!
//! Owns the batch pool and the send state of a connection record. Must not touch the
//! receive side, the listeners, or the ring's enter/reap loop ([`super`]); the memory rules
//! for what the kernel reads are the module docs' of [`super`].

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::net::Shutdown;

use bytes::Bytes;
use io_uring::opcode;

use super::super::slab::consume;
use super::super::{CloseReason, EventSink, Token};
use super::{IOV_MAX, OP_SEND, RECVSEND_POLL_FIRST, UringBackend, errno, user_data};

/// A batch being sent: its buffers, its progress, and the `msghdr` and iovec list a
/// `SENDMSG` points the kernel at. Boxed, so the vectors keep their address while a send is
/// in flight; a connection holds one only from [`Transport::send`] to the batch's last
/// completion (taken from and given back to the backend's pool), so an idle connection
/// holds none.
pub(super) struct Batch {
    /// What is left of the batch; the `Bytes` stay here (not advanced, not dropped) until
    /// the send in flight completes.
    bufs: VecDeque<Bytes>,
    /// Batch size, for `sent`.
    total: usize,
    /// Bytes of the batch not yet written.
    remaining: usize,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
}

impl Batch {
    pub(super) fn new() -> Box<Self> {
        Box::new(Self {
            bufs: VecDeque::new(),
            total: 0,
            remaining: 0,
            iov: Vec::new(),
            // SAFETY: `msghdr` is a plain C struct for which all-zero is valid (null
            // pointers, zero lengths).
            msg: unsafe { mem::zeroed() },
        })
    }
}

/// Spare [`Batch`]es kept by one backend.
const BATCH_POOL: usize = 256;

/// Batches whose iovec list grew longer than this are freed rather than pooled.
const BATCH_POOL_IOV_MAX: usize = 64;

impl UringBackend {
    /// Submits what is left of the connection's batch. `full`: the last send was short, so
    /// the socket buffer is full and the kernel should wait for room before trying.
    pub(super) fn submit_send(&mut self, idx: u32, full: bool) {
        let Some((key, conn)) = self.conns.at_mut(idx) else {
            return;
        };
        let generation = key.generation;
        let fd = conn.fd();
        let Some(v) = conn.batch.as_deref_mut() else {
            return;
        };
        v.iov.clear();
        v.iov.extend(
            v.bufs
                .iter()
                .filter(|b| !b.is_empty())
                .take(IOV_MAX)
                .map(|b| libc::iovec {
                    iov_base: b.as_ptr().cast_mut().cast(),
                    iov_len: b.len(),
                }),
        );
        conn.flags.set_send_inflight(true);
        let ioprio = if full && self.send_poll_first {
            RECVSEND_POLL_FIRST
        } else {
            0
        };
        let entry = match v.iov.as_slice() {
            // One buffer (one send's length is at most u32::MAX; a larger one takes SENDMSG).
            [one] if u32::try_from(one.iov_len).is_ok() => {
                opcode::Send::new(fd, one.iov_base.cast_const().cast(), one.iov_len as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .ioprio(ioprio)
                    .build()
            }
            _ => {
                v.msg.msg_iov = v.iov.as_mut_ptr();
                v.msg.msg_iovlen = v.iov.len();
                opcode::SendMsg::new(fd, &raw const v.msg)
                    .flags(libc::MSG_NOSIGNAL as u32)
                    .ioprio(ioprio)
                    .build()
            }
        }
        .user_data(user_data(OP_SEND, idx, generation));
        // SAFETY: `msg` and `iov` live in the connection's boxed `Batch` (stable address,
        // whatever the slab does with the record) and are rewritten only here, which runs
        // only while no send is in flight; the box leaves the connection (back to the pool,
        // or freed with it) only after this send's completion (`ops()` counts it). The
        // iovecs (and a single SEND's buffer) point into the heap data of the `Bytes` in
        // `bufs`, which are neither advanced nor dropped until the completion (`send` may
        // only append, which moves the handles, not the data).
        unsafe { self.push(entry) }
    }

    /// Half-closes the connection now, with `shutdown(2)` on the worker's thread.
    ///
    /// Not through the ring: io_uring cannot run `IORING_OP_SHUTDOWN` without blocking, so
    /// it hands every one to a worker thread of its io-wq (`iou-wrk-*`), which the kernel
    /// wakes, runs and puts back to sleep for each half-close. A TLS or closing connection
    /// half-closes once in its life (after its last batch: `close_notify`, the goodbye):
    /// that was a thread wake-up per connection, competing for the worker's and the
    /// clients' cores, that epoll's direct `shutdown` does not pay (benches/RESULTS.md, "TLS
    /// handshakes: io_uring against epoll"). On a TCP socket `shutdown(SHUT_WR)` queues the
    /// FIN and returns; it never waits.
    pub(super) fn shutdown_now(&mut self, idx: u32) {
        let Some(conn) = self.conn_at(idx) else {
            return;
        };
        if let Err(e) = conn.stream.shutdown(Shutdown::Write) {
            tracing::debug!(token = conn.token, error = %e, "shutdown(SHUT_WR) failed");
        }
    }

    /// Takes a finished batch from the connection: its emptied queue to the queue pool, the
    /// rest to the batch pool (or freed).
    pub(super) fn release_batch(&mut self, idx: u32) {
        let Some(mut batch) = self.conn_at(idx).and_then(|c| c.batch.take()) else {
            return;
        };
        self.lists.give(mem::take(&mut batch.bufs));
        if batch.iov.capacity() <= BATCH_POOL_IOV_MAX && self.batches.len() < BATCH_POOL {
            self.batches.push(batch);
        }
    }

    pub(super) fn on_send(
        &mut self,
        idx: u32,
        generation: u32,
        res: i32,
        sink: &mut dyn EventSink,
    ) {
        let Some(conn) = self.conn_mut(idx, generation) else {
            return;
        };
        conn.flags.set_send_inflight(false);
        if conn.flags.closing() {
            self.release_batch(idx);
            self.maybe_finalize(idx);
            return;
        }
        if res < 0 {
            if matches!(-res, libc::EINTR | libc::EAGAIN) {
                let full = res == -libc::EAGAIN;
                self.send_stats.blind_retries += u64::from(full);
                self.submit_send(idx, full);
            } else if res == -libc::EINVAL && self.send_poll_first {
                // A kernel before 5.19 refuses RECVSEND_POLL_FIRST (and the EINVAL may be
                // that): stop asking for it and send plainly.
                tracing::debug!("io_uring: sends refuse IORING_RECVSEND_POLL_FIRST; not used");
                self.send_poll_first = false;
                self.submit_send(idx, false);
            } else {
                self.close_with(idx, CloseReason::Error(errno(res)), sink);
            }
            return;
        }
        let (token, shutdown) = (conn.token, conn.flags.shutdown_pending());
        let Some(batch) = conn.batch.as_deref_mut() else {
            return; // a completion for a send we never made: nothing to account
        };
        let n = (res as usize).min(batch.remaining);
        if n == 0 && batch.remaining > 0 {
            let e = io::Error::from(io::ErrorKind::WriteZero);
            self.close_with(idx, CloseReason::Error(e), sink);
            return;
        }
        // What this send offered: its iovecs are those of the last `submit_send`.
        let offered: usize = batch.iov.iter().map(|v| v.iov_len).sum();
        batch.remaining -= n;
        consume(&mut batch.bufs, n);
        if batch.remaining > 0 {
            // A short write (the socket buffer is full), or more than IOV_MAX buffers.
            let full = n < offered;
            self.send_stats.short_writes += u64::from(full);
            self.submit_send(idx, full);
            return;
        }
        let total = mem::take(&mut batch.total);
        conn.flags.set_shutdown_pending(false);
        // The emptied queue and the batch go to the pools: an idle connection holds none.
        self.release_batch(idx);
        sink.sent(token, total);
        if shutdown {
            self.shutdown_now(idx);
        }
    }

    /// Spare batches in the pool.
    #[cfg(test)]
    pub(in crate::io) fn batches_pooled(&self) -> usize {
        self.batches.len()
    }

    /// Takes a batch to send (the worker's `Transport::send`).
    pub(super) fn queue_send(&mut self, token: Token, bufs: &mut VecDeque<Bytes>) {
        let Some(idx) = self.by_token.get(token) else {
            tracing::debug!(token, "send on an unknown token; dropped");
            bufs.clear();
            return;
        };
        let Self {
            conns,
            batches,
            lists,
            ..
        } = self;
        let Some((_, conn)) = conns.at_mut(idx) else {
            return;
        };
        let total: usize = bufs.iter().map(Bytes::len).sum();
        let inflight = conn.flags.send_inflight();
        let batch = conn
            .batch
            .get_or_insert_with(|| batches.pop().unwrap_or_else(Batch::new));
        if inflight {
            // Contract breach (one batch at a time): append (moves handles, not data) and
            // report both as one `sent`.
            tracing::debug!(token, "send while a batch is in flight; appended to it");
            batch.bufs.extend(bufs.drain(..));
            batch.total += total;
            batch.remaining += total;
            return;
        }
        // Swap with a pooled queue, so that the worker gets an allocated list back.
        if batch.bufs.capacity() == 0 {
            batch.bufs = lists.take();
        }
        mem::swap(&mut batch.bufs, bufs);
        bufs.clear();
        batch.total = total;
        batch.remaining = total;
        self.submit_send(idx, false);
    }

    /// Half-closes after the batch in flight, or now (the worker's `Transport::shutdown_write`).
    pub(super) fn queue_shutdown_write(&mut self, token: Token) {
        let Some(idx) = self.by_token.get(token) else {
            return;
        };
        let Some(conn) = self.conn_at(idx) else {
            return;
        };
        if conn.flags.send_inflight() {
            conn.flags.set_shutdown_pending(true);
        } else {
            self.shutdown_now(idx);
        }
    }
}
