//! The io_uring backend.
//!
//! Owns: one ring per worker, the provided-buffer ring its multishot receives fill (its
//! memory and which buffers are posted: [`super::uring_buffers`]), the
//! worker's listeners and connections (as raw fds with per-connection send state, inline in
//! the shared [`Slab`] whose keys `user_data` carries), and the ring's poll on the worker's
//! [`Wakeup`] eventfd. It implements the contract in [`super`] and nothing more: it never
//! looks inside the bytes it moves and must not touch the epoll backend, the worker's state,
//! or any fd it was not given.
//!
//! # Shape of one tick ([`Backend::poll`])
//! `send`, `set_reading`, `close` and re-arms only queue SQEs (`shutdown_write` half-closes
//! at once with `shutdown(2)` when no send is in flight, after the batch otherwise: io_uring
//! would run a `SHUTDOWN` on a worker thread, see `UringBackend::shutdown_now`). `poll`
//! delivers what is held in user space (data that arrived while a connection was paused),
//! then makes one `io_uring_enter` that submits everything queued and waits (with the
//! EXT_ARG timeout) for at least one completion, and reaps the completion queue. Then it
//! collects what else is ready: non-blocking `io_uring_enter(GETEVENTS)` calls, each
//! followed by a reap, until one brings nothing or the tick has reported
//! [`BackendOptions::uring_tick_completions`] completions other than sends' (epoll's
//! `epoll_wait` hands over up to `epoll_events` ready sockets at once, and its sends happen
//! outside that batch; this is the same batch).
//!
//! Why the sends do not count: the tick's `SEND`s complete inside its first enter (the data
//! fits the socket buffer), one per connection with output. Counted against the budget, a
//! tick that sent to 1,000 subscribers had spent it before collecting more than the first
//! enter's 40 receives, so the next tick had nothing to send: the worker alternated a
//! sending tick and a receiving one, and each connection got one `SEND` every other tick,
//! twice as large as epoll's (benches/RESULTS.md, "io_uring against epoll with ACKs").
//!
//! Why the extra enters: on a `DEFER_TASKRUN` ring a receive's completion is task work that
//! the kernel runs inside `io_uring_enter`, and since Linux 6.13 it runs at most 20 of them
//! per pass (`IO_LOCAL_TW_DEFAULT_MAX`; at most two passes per enter), and only as many as
//! the wait asked for (one) after it slept. One enter per tick made a tick handle at most
//! about 20 receives: with a thousand subscribers sending ACKs the worker turned ten times
//! as often as epoll's, fanned out a few publishes per turn and sent each connection half
//! as much per `SEND` (benches/RESULTS.md, "io_uring against epoll with ACKs"). The only other
//! `io_uring_enter` happens when the submission queue is full: it is flushed and the push
//! retried (and what still does not fit waits in a user-space backlog).
//!
//! # Files
//! This file owns the ring (setup, the submission backlog, the tick's enters and the
//! reaping that routes each completion by its `user_data`), a connection's closing, the
//! wakeup poll and teardown. By concern, beside it: [`record`] (the 32-byte connection
//! record: its flags as bits of one `u16`, its bounded count of cancellations in flight),
//! [`listeners`] (listeners and their accepts), [`recv`] (receives, the `POLLRDHUP` watch,
//! pausing reads), [`send`] (batches, `SEND`/`SENDMSG`, short writes, half-close).
//!
//! # Operations
//! - accept: multishot `ACCEPT` per listener (single-shot, re-armed, where unsupported). On
//!   a failure that is not about one connection (EMFILE, ENFILE, ENOBUFS, ENOMEM) the
//!   accept ends; it is re-armed when the [`AcceptBackoff`] pause is over, and picks up the
//!   connections waiting in the backlog;
//! - receive: multishot `RECV` selecting from a provided-buffer ring, as a bundle
//!   (`IORING_RECVSEND_BUNDLE`, Linux 6.10, where the kernel has it: one completion carries
//!   every buffer's worth the socket has ready, filling consecutive ring slots from the
//!   kernel's head, and names only the first buffer; `BufRing` mirrors which buffer sits in
//!   which slot, so the rest are found in order and all handed back; a kernel that answers
//!   EINVAL gets the plain multishot receive, one buffer per completion, as does
//!   [`BackendOptions::uring_recv_bundle`] off); each buffer goes back to the ring as soon
//!   as `EventSink::received` returns. Only a window of the ring's
//!   buffers is posted (8 at first, doubled whenever a receive finds none), topped up with
//!   the buffers most recently returned, so the same few stay in use and the rest of the
//!   ring's memory is never touched (`BufRing`). A multishot that ends (no
//!   `IORING_CQE_F_MORE`: ENOBUFS, CQ overflow, cancellation) is re-armed while the
//!   connection reads. Without buffer rings / multishot receive (kernels before 6.0, or
//!   [`BackendOptions::uring_multishot`] off) each connection gets its own buffer and a
//!   single-shot `RECV`. Next to a multishot receive, a one-shot `POLL_ADD(POLLRDHUP)`
//!   watches for the peer's FIN, because a kernel race can lose a multishot receive's EOF
//!   (see `UringBackend::arm_hup`);
//! - send: one `SEND` for a batch of one buffer (a phone's usual batch: its frames are
//!   coalesced into one buffer), else one `SENDMSG`, its iovecs pointing into the `Bytes` of
//!   the batch, which the connection holds until the completion. A short write means the
//!   socket buffer is full: the rest is resubmitted with `IORING_RECVSEND_POLL_FIRST`, so the
//!   kernel waits for room instead of trying a send that fails with `EAGAIN` and only then
//!   polling (the wasted round that [`SendStats::blind_retries`] counts). All of a tick's
//!   sends go to the kernel in the tick's one `io_uring_enter`;
//! - wake: multishot `POLL_ADD` on the eventfd;
//! - close: `ASYNC_CANCEL` of the connection's receive and send, then, once every operation
//!   that names the fd has completed, `CLOSE` through the ring. A connection counts its
//!   cancellations in flight in a `u16`; a receive's cancellation that would leave no room
//!   for closing's three is refused and the connection closed with that error
//!   (`record::CancelsExhausted`), so the count never wraps.
//!
//! # Why not `SEND_ZC`
//! We do not use zero-copy send. A relay sends small coalesced frames: tens to a few hundred
//! bytes per connection per tick. `SEND_ZC` pins the pages and posts a second, notification
//! CQE once the NIC (or loopback) has released them, and the buffer must stay untouched until
//! then; for small sends that bookkeeping costs more than the copy it saves. The kernel's
//! `MSG_ZEROCOPY` documentation (`Documentation/networking/msg_zerocopy.rst`) puts the
//! break-even around 10 KB per write; `SEND_ZC` makes the notification cheaper, not the
//! pinning, and io_uring's own benchmarks show gains only for large payloads, far above
//! our frame sizes. A quick check on the 2-core development VM (Linux 6.18, loopback,
//! one TCP connection, 32 sends in flight, `SEND` vs `SEND_ZC` waiting for its notification):
//! 64 B 1.4 µs vs 5.6 µs per send, 256 B 1.7 vs 6.3 µs, 4 KiB 2.9 vs 7.2 µs, 64 KiB 18 vs
//! 32 µs. Loopback copies zero-copy pages at the receiver anyway, so it overstates the loss
//! for large sends on a real NIC, but the fixed per-send cost that dominates small frames is
//! the same. Revisit only for bulk transfers (history replay of large batches).
//!
//! # Memory the kernel may touch, and why it stays valid
//! Every SQE carries `user_data` = op kind | slot generation | slot index, never a pointer.
//! A connection slot is reused only after every operation naming it has posted its final
//! CQE (the slot counts them), so a late completion can never reach a new connection; the
//! generation is a second check. The kernel is given no pointer into the connection record
//! itself (it lives inline in the slab, whose slots do not move, but nothing relies on
//! that): a send's `msghdr` and iovecs live in a boxed [`Batch`] that the connection
//! holds while the send is in flight, its `Bytes` and a single-shot receive's buffer are
//! heap memory the connection owns, and all of them are freed only once the operation's
//! final completion is reaped, so they outlive their operation. The buffer ring lives as
//! long as the backend; on drop the backend cancels everything and waits for the
//! completions, and leaks the memory rather than free it if the kernel does not answer.

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::net::{self, SocketAddr};
use std::os::fd::IntoRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use io_uring::{EnterFlags, IoUring, cqueue, opcode, squeue, types};

use super::accept::AcceptBackoff;
use super::probe::{BackendOptions, log_receive_path, recv_bundles};
use super::slab::{Key, ListPool, Slab, TokenIndex};
use super::uring_buffers::BufRing;
use super::uring_storage::{RingCommits, StorageSqe};
use super::{AcceptStats, Backend, CloseReason, EventSink, SendStats, Token, Transport, Wakeup};
use crate::storage::CommitExecutor;

mod listeners;
mod record;
mod recv;
mod send;

use listeners::ListenerSlot;
use record::Conn;
use send::Batch;

/// The buffer group of our one provided-buffer ring.
const BGID: u16 = 0;
/// Linux's `UIO_MAXIOV`: the most iovecs one `sendmsg` accepts.
const IOV_MAX: usize = 1024;
/// `IORING_RECVSEND_POLL_FIRST` (uapi `io_uring.h`, Linux 5.19; in a send's `ioprio`): arm
/// the poll for room first instead of trying the send. A kernel without it answers EINVAL;
/// the backend then stops asking (`send_poll_first`) and resubmits plainly.
const RECVSEND_POLL_FIRST: u16 = 1;
/// How long drop waits for the kernel to finish cancelled operations.
const TEARDOWN_WAIT: Duration = Duration::from_secs(2);

// user_data: bits 56..64 op kind, 32..56 slot generation, 0..32 slot index.
const OP_ACCEPT: u8 = 1;
const OP_RECV: u8 = 2;
const OP_SEND: u8 = 3;
/// A cancellation on behalf of a connection (counted in its record: [`Conn::ops`]).
const OP_CANCEL: u8 = 5;
/// Close and listener/wake cancellations: nothing to do on completion.
const OP_MISC: u8 = 6;
const OP_WAKE: u8 = 7;
/// The per-connection `POLLRDHUP` watch (see [`UringBackend::arm_hup`]).
const OP_HUP: u8 = 8;
/// A durable-log write or sync ([`super::uring_storage`]): index and generation are the
/// executor's own.
const OP_STORAGE: u8 = 9;
/// The poll on the watched descriptor ([`Backend::watch_readable`]).
const OP_WATCH: u8 = 10;
const GEN_BITS: u32 = 24;
const GEN_MASK: u32 = (1 << GEN_BITS) - 1;

fn user_data(op: u8, idx: u32, generation: u32) -> u64 {
    (u64::from(op) << 56) | (u64::from(generation & GEN_MASK) << 32) | u64::from(idx)
}

/// Splits `user_data` into (op, slot index, generation).
fn decode(ud: u64) -> (u8, u32, u32) {
    ((ud >> 56) as u8, ud as u32, (ud >> 32) as u32 & GEN_MASK)
}

fn errno(res: i32) -> io::Error {
    io::Error::from_raw_os_error(-res)
}

/// The io_uring implementation of [`Backend`].
///
/// Create it on the thread that will poll it: with `IORING_SETUP_SINGLE_ISSUER` the ring
/// belongs to the thread that created it.
pub struct UringBackend {
    // Dropped first: the ring goes before the buffer memory it was told about.
    ring: IoUring,
    bufs: Option<BufRing>,
    recv_multishot: bool,
    /// Multishot receives are bundles (`IORING_RECVSEND_BUNDLE`, Linux 6.10), until the
    /// kernel answers EINVAL to one.
    recv_bundle: bool,
    /// Receive completions reaped, and those that found the buffer ring empty (ENOBUFS).
    recv_completions: u64,
    recv_dry: u64,
    accept_multishot: bool,
    poll_multishot: bool,
    buf_size: usize,
    /// Inline (the kernel holds no pointer into a record: see the module docs).
    conns: Slab<Conn>,
    /// Spare send queues (a connection holds one only while it sends).
    lists: ListPool,
    /// Spare [`Batch`]es, so a send allocates none.
    #[allow(clippy::vec_box)]
    // reason: each is handed to a connection as the box whose address the kernel reads
    batches: Vec<Box<Batch>>,
    /// The slot of each token's connection.
    by_token: TokenIndex,
    listeners: Vec<ListenerSlot>,
    /// Whether accepting is paused, and when to re-arm the listeners.
    accept: AcceptBackoff,
    wakeup: Wakeup,
    wake_armed: bool,
    wake_closing: bool,
    /// The watched descriptor ([`Backend::watch_readable`]) and whether its poll is armed.
    watch: Option<std::os::fd::RawFd>,
    watch_armed: bool,
    /// The watched descriptor signalled since [`Backend::watch_fired`] last asked.
    watch_fired: bool,
    /// Its poll failed for good: from then on every tick counts as signalled.
    watch_failed: bool,
    /// SQEs that did not fit in the submission queue.
    backlog: VecDeque<squeue::Entry>,
    /// Connections with user-space events for the next tick.
    ready: Vec<Key>,
    /// Scratch copy of the completion queue.
    cqes: Vec<cqueue::Entry>,
    /// Operations whose final completion has not been reaped.
    inflight: usize,
    send_stats: SendStats,
    /// [`BackendOptions::uring_tick_completions`].
    tick_completions: usize,
    /// The kernel takes `RECVSEND_POLL_FIRST` (until it answers EINVAL to one).
    send_poll_first: bool,
    /// The durable log's executor on this ring (disk mode), created when first asked for.
    storage: Option<RingCommits>,
    /// Scratch for its SQEs.
    storage_sqes: Vec<StorageSqe>,
}

impl std::fmt::Debug for UringBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringBackend")
            .field("connections", &self.by_token.len())
            .field(
                "listeners",
                &self
                    .listeners
                    .iter()
                    .filter(|l| l.listener.is_some())
                    .count(),
            )
            .field("inflight", &self.inflight)
            .field("buffer_ring", &self.bufs.is_some())
            .field("recv_multishot", &self.recv_multishot)
            .field("recv_bundle", &self.recv_bundle)
            .field("accept_multishot", &self.accept_multishot)
            .finish_non_exhaustive()
    }
}

fn build_ring(opts: &BackendOptions) -> io::Result<IoUring> {
    if opts.uring_defer_taskrun {
        let attempt = IoUring::builder()
            .setup_cqsize(opts.cq_entries)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .build(opts.ring_entries);
        match attempt {
            Ok(ring) => return Ok(ring),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!(
                    "io_uring: SINGLE_ISSUER|DEFER_TASKRUN refused; trying COOP_TASKRUN"
                );
            }
            Err(e) => return Err(e),
        }
        let attempt = IoUring::builder()
            .setup_cqsize(opts.cq_entries)
            .setup_coop_taskrun()
            .build(opts.ring_entries);
        match attempt {
            Ok(ring) => return Ok(ring),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!("io_uring: COOP_TASKRUN refused; plain setup");
            }
            Err(e) => return Err(e),
        }
    }
    IoUring::builder()
        .setup_cqsize(opts.cq_entries)
        .build(opts.ring_entries)
}

impl UringBackend {
    /// Sets up the ring (CQ = `cq_entries`), the buffer ring if multishot is on and the kernel
    /// has it, and the wakeup poll.
    pub fn new(opts: &BackendOptions) -> io::Result<Self> {
        opts.validate()?;
        let ring = build_ring(opts)?;
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks IORING_FEAT_EXT_ARG (Linux 5.11)",
            ));
        }
        let bufs = if opts.uring_multishot {
            match BufRing::new(opts.buf_ring_count, opts.buf_size) {
                Ok(bufs) => {
                    let (entries, count) = bufs.entries();
                    // SAFETY: the entries mapping is page-aligned and holds `count` entries;
                    // it lives in `self.bufs` until the backend drops, after the ring (field
                    // order) and after every operation has completed (see `Drop`).
                    let reg = unsafe {
                        ring.submitter()
                            .register_buf_ring_with_flags(entries, count, BGID, 0)
                    };
                    match reg {
                        Ok(()) => Some(bufs),
                        Err(e) => {
                            tracing::debug!(error = %e, "io_uring: no provided-buffer rings; single-shot receive into per-connection buffers");
                            None
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        } else {
            tracing::debug!(
                "io_uring: multishot disabled by options; single-shot accept and receive"
            );
            None
        };
        let recv_bundle = bufs.is_some() && opts.uring_recv_bundle && recv_bundles(&ring);
        log_receive_path(opts, bufs.is_some(), recv_bundle);
        let mut this = Self {
            ring,
            recv_multishot: bufs.is_some(),
            recv_bundle,
            recv_completions: 0,
            recv_dry: 0,
            bufs,
            accept_multishot: opts.uring_multishot,
            poll_multishot: opts.uring_multishot,
            buf_size: opts.buf_size as usize,
            conns: Slab::new(GEN_BITS),
            lists: ListPool::default(),
            batches: Vec::new(),
            by_token: TokenIndex::default(),
            listeners: Vec::new(),
            accept: AcceptBackoff::default(),
            wakeup: Wakeup::new()?,
            wake_armed: false,
            wake_closing: false,
            watch: None,
            watch_armed: false,
            watch_fired: false,
            watch_failed: false,
            backlog: VecDeque::new(),
            ready: Vec::new(),
            cqes: Vec::new(),
            inflight: 0,
            send_stats: SendStats::default(),
            tick_completions: opts.uring_tick_completions,
            send_poll_first: true,
            storage: None,
            storage_sqes: Vec::new(),
        };
        this.arm_wake();
        Ok(this)
    }

    /// Queues an SQE; if the submission queue is full, submits it and retries, and keeps
    /// what still does not fit in the backlog.
    ///
    /// # Safety
    /// Every pointer in `entry` must stay valid, and the memory it names unmoved (and not
    /// accessed by us, where the kernel writes it), until the operation's final completion
    /// has been reaped.
    unsafe fn push(&mut self, entry: squeue::Entry) {
        self.inflight += 1;
        if self.backlog.is_empty() {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            if self.ring.submit().is_ok() {
                // SAFETY: forwarded from this function's contract.
                if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                    return;
                }
            }
        }
        self.backlog.push_back(entry);
    }

    /// Moves the backlog into the submission queue, submitting as it fills.
    fn flush_backlog(&mut self) -> io::Result<()> {
        for _ in 0..64 {
            if self.backlog.is_empty() {
                return Ok(());
            }
            {
                let mut sq = self.ring.submission();
                while let Some(entry) = self.backlog.front() {
                    // SAFETY: every backlog entry was queued by `push`, whose caller
                    // guaranteed its memory until the completion.
                    if unsafe { sq.push(entry) }.is_err() {
                        break;
                    }
                    self.backlog.pop_front();
                }
            }
            if self.backlog.is_empty() {
                return Ok(()); // the tick's enter submits them
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The tick's one `io_uring_enter`: submits, and waits for a completion if `wait`.
    fn enter(&mut self, wait: bool, timeout: Option<Duration>) -> io::Result<()> {
        let res = match (wait, timeout) {
            (false, _) => {
                let to_submit = self.ring.submission().len() as u32;
                // SAFETY: a plain enter without an argument struct (`None`): it only reads
                // SQEs, whose memory `push`'s callers vouched for. GETEVENTS with
                // min_complete 0 runs deferred task work so that completions get posted.
                unsafe {
                    self.ring.submitter().enter::<libc::sigset_t>(
                        to_submit,
                        0,
                        EnterFlags::GETEVENTS.bits(),
                        None,
                    )
                }
            }
            (true, None) => self.ring.submitter().submit_and_wait(1),
            (true, Some(d)) => {
                let ts = types::Timespec::from(d);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match res {
            Ok(_) => Ok(()),
            // ETIME: the timeout; EINTR: a signal; EBUSY/EAGAIN: the CQ is backed up, which
            // reaping resolves (the SQEs stay queued for the next enter).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Handles what the completion queue holds; returns how many completions that was, and
    /// how many of them count against the tick's budget (all but the sends': see
    /// [`BackendOptions::uring_tick_completions`]).
    fn reap(&mut self, sink: &mut dyn EventSink) -> (usize, usize) {
        let mut reaped = 0;
        let mut sends = 0;
        // Without DEFER_TASKRUN completions may keep arriving while we work: bound the rounds.
        for _ in 0..8 {
            let mut cqes = mem::take(&mut self.cqes);
            cqes.clear();
            cqes.extend(self.ring.completion());
            let empty = cqes.is_empty();
            reaped += cqes.len();
            for cqe in &cqes {
                sends += usize::from(decode(cqe.user_data()).0 == OP_SEND);
                self.complete(cqe, sink);
            }
            self.cqes = cqes;
            if empty {
                break;
            }
        }
        // Follow-ups of the storage completions (the rest of a short write, the syncs
        // after the writes) go out with the next enter.
        self.push_storage();
        (reaped, reaped - sends)
    }

    /// Pushes the SQEs the durable log's executor queued.
    fn push_storage(&mut self) {
        let Some(storage) = self.storage.as_mut() else {
            return;
        };
        let mut sqes = mem::take(&mut self.storage_sqes);
        storage.take_sqes(&mut sqes);
        for (entry, idx, serial) in sqes.drain(..) {
            let entry = entry.user_data(user_data(OP_STORAGE, idx, serial));
            // SAFETY: the entry points into a buffer of the commit the executor runs, and
            // names files that commit holds (`Arc<File>`, the directory's `File`); the
            // executor keeps that commit until every operation it submitted has posted its
            // CQE, and the backend keeps the executor until `inflight` is zero (or leaks it,
            // see `Drop`).
            unsafe { self.push(entry) };
        }
        self.storage_sqes = sqes;
    }

    fn complete(&mut self, cqe: &cqueue::Entry, sink: &mut dyn EventSink) {
        let (op, idx, generation) = decode(cqe.user_data());
        let (res, flags) = (cqe.result(), cqe.flags());
        let more = cqueue::more(flags);
        if !more {
            self.inflight = self.inflight.saturating_sub(1);
        }
        match op {
            OP_WAKE => self.on_wake(res, more, sink),
            OP_WATCH => self.on_watch(res, more),
            OP_ACCEPT => self.on_accept(idx as usize, res, more, sink),
            OP_RECV => self.on_recv(idx, generation, res, flags, more, sink),
            OP_SEND => self.on_send(idx, generation, res, sink),
            OP_HUP => self.on_hup(idx, generation, res),
            OP_STORAGE => match self.storage.as_mut() {
                Some(storage) => storage.on_cqe(idx, generation, res),
                None => tracing::error!("storage completion without a storage executor"),
            },
            OP_CANCEL => {
                if let Some(conn) = self.conn_mut(idx, generation) {
                    conn.cancel_done();
                    self.maybe_finalize(idx);
                }
            }
            OP_MISC => {
                if res < 0 && !matches!(-res, libc::ENOENT | libc::EALREADY | libc::ECANCELED) {
                    tracing::debug!(error = %errno(res), "io_uring close/cancel failed");
                }
            }
            _ => tracing::error!(
                user_data = cqe.user_data(),
                "completion with unknown user_data"
            ),
        }
    }

    fn conn_mut(&mut self, idx: u32, generation: u32) -> Option<&mut Conn> {
        let key = Key {
            index: idx,
            generation,
        };
        self.conns.get_mut(key)
    }

    /// The connection in slot `idx`, whatever its generation.
    fn conn_at(&mut self, idx: u32) -> Option<&mut Conn> {
        self.conns.at_mut(idx).map(|(_, conn)| conn)
    }

    fn queue_ready(&mut self, idx: u32) {
        if let Some((key, conn)) = self.conns.at_mut(idx)
            && !conn.flags.queued()
        {
            conn.flags.set_queued(true);
            self.ready.push(key);
        }
    }

    // ---- arming operations ----

    fn arm_wake(&mut self) {
        self.wake_armed = true;
        self.push_readable_poll(self.wakeup.as_raw_fd(), OP_WAKE);
    }

    /// A poll for `fd` becoming readable (multishot where the kernel has it), completing
    /// as `op`.
    fn push_readable_poll(&mut self, fd: std::os::fd::RawFd, op: u8) {
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(self.poll_multishot)
            .build()
            .user_data(user_data(op, 0, 0));
        // SAFETY: a poll references no memory of ours; the kernel holds its own reference to
        // the descriptor's file (the wakeup's eventfd, or the watched descriptor) until the
        // poll completes or is cancelled (on drop).
        unsafe { self.push(entry) }
    }

    fn push_cancel(&mut self, target: u64, on_behalf: u64) {
        let entry = opcode::AsyncCancel::new(target)
            .build()
            .user_data(on_behalf);
        // SAFETY: a cancellation references no memory.
        unsafe { self.push(entry) }
    }

    // ---- closing ----

    /// Reports `closed` and starts releasing the connection.
    fn close_with(&mut self, idx: u32, reason: CloseReason, sink: &mut dyn EventSink) {
        let Some(conn) = self.conn_at(idx) else {
            return;
        };
        if conn.flags.closing() {
            return;
        }
        let token = conn.token;
        self.by_token.remove(token);
        sink.closed(token, reason);
        self.begin_close(idx);
    }

    /// Marks the connection closing (no more events), cancels its operations, and closes
    /// the fd once none is left.
    fn begin_close(&mut self, idx: u32) {
        let Some((key, conn)) = self.conns.at_mut(idx) else {
            return;
        };
        let generation = key.generation;
        if conn.flags.closing() {
            return;
        }
        conn.flags.set_closing(true);
        if let Some(rare) = conn.rare.as_mut() {
            rare.stash = Vec::new();
        }
        let cancel_recv = conn.flags.recv_armed() && !conn.flags.recv_cancelling();
        let cancel_send = conn.flags.send_inflight();
        let cancel_hup = conn.flags.hup_armed();
        if cancel_recv {
            conn.flags.set_recv_cancelling(true);
        }
        conn.count_close_cancels(
            u16::from(cancel_recv) + u16::from(cancel_send) + u16::from(cancel_hup),
        );
        let on_behalf = user_data(OP_CANCEL, idx, generation);
        if cancel_recv {
            self.push_cancel(user_data(OP_RECV, idx, generation), on_behalf);
        }
        if cancel_send {
            self.push_cancel(user_data(OP_SEND, idx, generation), on_behalf);
        }
        if cancel_hup {
            self.push_cancel(user_data(OP_HUP, idx, generation), on_behalf);
        }
        self.maybe_finalize(idx);
    }

    /// Resident pages of the provided buffers' memory (`None` without a buffer ring).
    #[cfg(test)]
    pub(super) fn buffer_pages_resident(&self) -> Option<usize> {
        self.bufs.as_ref().map(BufRing::resident_pages)
    }

    /// Receive completions reaped so far, and how many of them found the buffer ring empty.
    #[cfg(test)]
    pub(super) fn receive_completions(&self) -> (u64, u64) {
        (self.recv_completions, self.recv_dry)
    }

    /// Whether multishot receives run as bundles, and how many bundles ran past the buffer
    /// ring's last slot into its first.
    #[cfg(test)]
    pub(super) fn receive_bundles(&self) -> (bool, u64) {
        (
            self.recv_bundle,
            self.bufs.as_ref().map_or(0, |b| b.wrapped),
        )
    }

    /// The size of one connection's record in the slab (tests guard it).
    #[cfg(test)]
    pub(super) fn connection_record_bytes() -> usize {
        mem::size_of::<Conn>()
    }

    /// Puts `token`'s connection's count of cancellations in flight at its bound (tests of
    /// the refusal, [`record::CancelsExhausted`]).
    #[cfg(test)]
    pub(super) fn fill_cancels(&mut self, token: Token) {
        if let Some(conn) = self.by_token.get(token).and_then(|idx| self.conn_at(idx)) {
            conn.fill_cancels();
        }
    }

    /// Frees a closing connection's slot once no operation names it, closing its fd
    /// through the ring.
    fn maybe_finalize(&mut self, idx: u32) {
        match self.conn_at(idx) {
            Some(conn) if conn.flags.closing() && conn.ops() == 0 => {}
            _ => return,
        }
        let Some(conn) = self.conns.remove_at(idx) else {
            return;
        };
        let fd = conn.stream.into_raw_fd();
        let entry = opcode::Close::new(types::Fd(fd))
            .build()
            .user_data(user_data(OP_MISC, 0, 0));
        // SAFETY: close references no memory; the fd is ours (taken from the stream) and no
        // other operation names it any more.
        unsafe { self.push(entry) }
    }

    fn arm_watch(&mut self) {
        if let Some(fd) = self.watch {
            self.watch_armed = true;
            self.push_readable_poll(fd, OP_WATCH);
        }
    }

    // ---- completions ----

    /// The watched descriptor was readable: the completion itself ended the wait. Re-armed
    /// when the poll ended; a failure other than a cancellation is said and not re-armed
    /// (it would fail again at once).
    fn on_watch(&mut self, res: i32, more: bool) {
        if !more {
            self.watch_armed = false;
        }
        // Anything but a cancellation counts as signalled: the owner looks for itself.
        self.watch_fired |= res != -libc::ECANCELED;
        if res < 0 {
            if res == -libc::EINVAL && self.poll_multishot {
                tracing::debug!("io_uring: multishot poll unsupported; re-arming single-shot");
                self.poll_multishot = false;
            } else {
                if res != -libc::ECANCELED {
                    tracing::error!(error = %errno(res), "io_uring poll on the engine's descriptor failed; its owner is turned every tick");
                    self.watch_failed = true;
                }
                return;
            }
        }
        if !self.watch_armed && !self.wake_closing {
            self.arm_watch();
        }
    }

    fn on_wake(&mut self, res: i32, more: bool, sink: &mut dyn EventSink) {
        if !more {
            self.wake_armed = false;
        }
        if res >= 0 {
            match self.wakeup.drain() {
                Ok(true) => sink.woken(),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "reading the wakeup eventfd failed"),
            }
        } else if res == -libc::EINVAL && self.poll_multishot {
            tracing::debug!("io_uring: multishot poll unsupported; re-arming single-shot");
            self.poll_multishot = false;
        } else if res != -libc::ECANCELED {
            tracing::warn!(error = %errno(res), "io_uring poll on the wakeup eventfd failed");
        }
        if !self.wake_armed && !self.wake_closing {
            self.arm_wake();
        }
    }
}

impl Transport for UringBackend {
    fn close_listeners(&mut self) {
        self.stop_listeners()
    }

    fn send(&mut self, token: Token, bufs: &mut VecDeque<Bytes>) {
        self.queue_send(token, bufs)
    }

    fn set_reading(&mut self, token: Token, reading: bool) {
        self.switch_reading(token, reading)
    }

    fn shutdown_write(&mut self, token: Token) {
        self.queue_shutdown_write(token)
    }

    fn close(&mut self, token: Token) {
        if let Some(idx) = self.by_token.remove(token) {
            self.begin_close(idx);
        }
    }
}

impl Backend for UringBackend {
    #[cfg(test)]
    fn idle_send_state(&mut self) -> (usize, usize) {
        let held = self
            .conns
            .iter()
            .filter(|c| !c.flags.send_inflight() && c.batch.is_some())
            .count();
        (held, self.lists.spare())
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn add_listener(&mut self, listener: net::TcpListener) -> io::Result<()> {
        self.push_listener(listener)
    }

    fn wakeup(&self) -> Wakeup {
        self.wakeup.clone()
    }

    fn watch_fired(&mut self) -> bool {
        std::mem::take(&mut self.watch_fired) || self.watch_failed
    }

    fn watch_readable(&mut self, fd: std::os::fd::RawFd) -> io::Result<()> {
        if self.watch.is_some() {
            return Err(io::Error::other("one descriptor is watched already"));
        }
        self.watch = Some(fd);
        self.arm_watch();
        Ok(())
    }

    fn accept_stats(&self) -> AcceptStats {
        self.accept.stats()
    }

    fn send_stats(&self) -> SendStats {
        self.send_stats
    }

    fn storage_executor(&mut self) -> Option<&mut dyn CommitExecutor> {
        let wakeup = self.wakeup.clone();
        let storage = self.storage.get_or_insert_with(|| {
            let name = std::thread::current()
                .name()
                .unwrap_or("pabal-worker")
                .to_owned();
            RingCommits::new(name, Some(Arc::new(move || wakeup.wake())))
        });
        Some(storage)
    }

    fn poll(&mut self, timeout: Option<Duration>, sink: &mut dyn EventSink) -> io::Result<()> {
        self.push_storage();
        self.flush_backlog()?;
        let delivered = self.run_ready(sink);
        let mut timeout = timeout;
        if self.accept.paused() {
            let now = Instant::now();
            if self.accept.due(now) {
                self.rearm_listeners();
            } else {
                timeout = self.accept.bound_timeout(now, timeout);
            }
        }
        let pending = self.ring.submission().cq_overflow() || !self.ring.completion().is_empty();
        let wait = !(delivered || pending || timeout == Some(Duration::ZERO));
        self.enter(wait, timeout)?;
        let (mut reaped, mut reported) = self.reap(sink);
        // The kernel runs a bounded share of the ready completions per enter (see the
        // module docs): collect the rest without waiting, up to the tick's budget. The
        // sends' completions do not count against it (most complete inside the first enter,
        // one per connection with output): counted, a tick that sent to a thousand
        // connections ended after the first enter's few receives.
        while reaped > 0 && reported < self.tick_completions {
            self.flush_backlog()?;
            self.enter(false, None)?;
            let (more, counted) = self.reap(sink);
            (reaped, reported) = (more, reported + counted);
        }
        Ok(())
    }
}

/// Ignores everything: used while tearing down.
struct NullSink;

impl EventSink for NullSink {
    fn accepted(&mut self, _: &net::TcpStream, _: SocketAddr) -> Option<Token> {
        None
    }
    fn received(&mut self, _: Token, _: &[u8]) {}
    fn sent(&mut self, _: Token, _: usize) {}
    fn closed(&mut self, _: Token, _: CloseReason) {}
    fn woken(&mut self) {}
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        // Cancel everything, then wait for the kernel to let go of our memory.
        self.wake_closing = true;
        if self.wake_armed {
            self.push_cancel(user_data(OP_WAKE, 0, 0), user_data(OP_MISC, 0, 0));
        }
        if self.watch_armed {
            self.push_cancel(user_data(OP_WATCH, 0, 0), user_data(OP_MISC, 0, 0));
        }
        self.close_listeners();
        self.by_token = TokenIndex::default();
        for idx in 0..self.conns.slots() {
            self.begin_close(idx);
        }
        let deadline = Instant::now() + TEARDOWN_WAIT;
        while self.inflight > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if self.flush_backlog().is_err() || self.enter(true, Some(deadline - now)).is_err() {
                break;
            }
            self.reap(&mut NullSink);
        }
        if self.inflight > 0 {
            tracing::error!(
                inflight = self.inflight,
                "io_uring operations still in flight at drop; leaking their memory"
            );
            if let Some(bufs) = self.bufs.take() {
                mem::forget(bufs);
            }
            if let Some(storage) = self.storage.take() {
                mem::forget(storage);
            }
            for conn in self.conns.drain() {
                mem::forget(conn);
            }
        }
    }
}
