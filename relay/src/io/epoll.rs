//! The epoll backend, over mio: for kernels or sandboxes where io_uring is missing or denied.
//!
//! Owns: one `mio::Poll`, the worker's listeners and connections (as mio sockets, in a
//! [`Slab`] whose keys make the mio tokens), a reusable 64 KiB read buffer, and the
//! registration of the worker's [`Wakeup`] eventfd. It implements the contract in [`super`]
//! and nothing more: it never looks inside the bytes it moves and must not touch the
//! io_uring backend, the worker's state, or any socket it was not given.
//!
//! Readiness is edge-triggered (mio's only mode on Linux), so every readiness edge is either
//! consumed (read or written until `WouldBlock`) or remembered in a flag:
//! - `read_ready`: data may be waiting that no edge will announce again (reads were paused,
//!   or the per-tick budget ran out). A resumed or budget-limited connection goes on the
//!   `dirty` list and is read at the start of the next [`Backend::poll`].
//! - `write_blocked`: the last write was short (the socket buffer is full) or hit `WouldBlock`;
//!   the next `WRITABLE` edge resumes it. A short write is not retried at once: the retry
//!   would only return `EAGAIN` (a wasted syscall per full socket, [`SendStats`]), and the
//!   kernel raises the edge when room frees up (TCP sets `SOCK_NOSPACE` on a short write).
//!
//! Listeners are drained until `WouldBlock`. When accepting fails for lack of resources the
//! backend follows [`AcceptBackoff`]: it stops draining, and once the pause is over `poll`
//! drains every listener again by itself, since the connections left in the backlog raise
//! no new edge.
//!
//! A write is one `send(2)` when the batch is one buffer (a phone's usual batch: one
//! DELIVER), one `sendmsg` of up to `MAX_IOVECS` (64) buffers otherwise
//! ([`SendStats::vectored_writes`] counts those): the kernel's single-buffer path skips the
//! `msghdr` copy and the iovec import that a phone's stream would pay once per delivery.
//!
//! All sink calls happen inside [`Backend::poll`]: `send`, `set_reading` and `shutdown_write`
//! only record work (the `dirty` list), which `poll` performs before it waits. A tick that
//! produced events this way does not block in `epoll_wait`.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read};
use std::net::{self, Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token as MioToken};
use socket2::SockRef;

use super::accept::{AcceptBackoff, AcceptError};
use super::probe::BackendOptions;
use super::slab::{Key, ListPool, Slab, TokenIndex, consume};
use super::{AcceptStats, Backend, CloseReason, EventSink, SendStats, Token, Transport, Wakeup};

/// Most buffers handed to one `sendmsg` (the contract asks for vectored writes).
const MAX_IOVECS: usize = 64;

// mio tokens: the top two bits say what the token names.
// - connection: bits 0..32 slot index, bits 32..62 slot generation;
// - listener: bits 0..32 listener index;
// - the wakeup eventfd;
// - the watched descriptor (`Backend::watch_readable`).
const _: () = assert!(
    usize::BITS == 64,
    "the token encoding assumes a 64-bit target"
);
const KIND_SHIFT: u32 = 62;
const KIND_CONN: usize = 0;
const KIND_LISTENER: usize = 1;
const KIND_WAKE: usize = 2;
const KIND_WATCH: usize = 3;
const GEN_BITS: u32 = 30;
const GEN_MASK: u32 = (1 << GEN_BITS) - 1;
const WAKE_TOKEN: MioToken = MioToken(KIND_WAKE << KIND_SHIFT);
const WATCH_TOKEN: MioToken = MioToken(KIND_WATCH << KIND_SHIFT);

fn conn_token(key: Key) -> MioToken {
    MioToken(((key.generation as usize) << 32) | key.index as usize)
}

fn listener_token(idx: usize) -> MioToken {
    MioToken((KIND_LISTENER << KIND_SHIFT) | idx)
}

/// One connection's state.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    token: Token,
    /// The worker wants `received` calls.
    reading: bool,
    /// Data (or EOF) may be waiting that no readiness edge will announce again.
    read_ready: bool,
    /// The peer's FIN was announced (EPOLLRDHUP): read on until EOF, short reads included.
    rdhup: bool,
    /// The batch in flight (`None` while there is none).
    sending: Option<Box<Sending>>,
    /// The last write was short or hit `WouldBlock`; wait for a `WRITABLE` edge.
    write_blocked: bool,
    /// `shutdown_write` was called while a batch was in flight.
    shutdown_pending: bool,
    /// On the `dirty` list already.
    queued: bool,
}

/// A batch being written: what is left of it, and its total size for `sent`. Boxed and held
/// only while the batch is in flight, so that an idle connection's record holds a `None`
/// (the queue and its total inline took 40 bytes of every record: 72 bytes and a slot, 40
/// now).
#[derive(Debug, Default)]
struct Sending {
    out: VecDeque<Bytes>,
    total: usize,
}

/// Spare [`Sending`] boxes kept by one backend (their queues go to the [`ListPool`]).
const SENDING_POOL_MAX: usize = 256;

/// The mio/epoll implementation of [`Backend`].
#[derive(Debug)]
pub struct EpollBackend {
    poll: Poll,
    events: Events,
    wakeup: Wakeup,
    /// The watched descriptor signalled since [`Backend::watch_fired`] last asked.
    watch_fired: bool,
    listeners: Vec<Option<TcpListener>>,
    conns: Slab<Conn>,
    /// Spare send queues (a connection holds one only while it sends).
    lists: ListPool,
    /// Spare boxes for a batch in flight.
    #[allow(clippy::vec_box)]
    // reason: the boxes themselves are what is pooled (a connection holds one)
    sendings: Vec<Box<Sending>>,
    /// The slot of each token's connection.
    by_token: TokenIndex,
    /// Connections with work queued for the start of the next `poll`.
    dirty: Vec<Key>,
    /// Scratch copy of one `epoll_wait`'s events (kept for its allocation).
    ready: Vec<ReadyEvent>,
    rbuf: Box<[u8]>,
    /// Bytes one connection may move in one direction per tick before yielding.
    budget: usize,
    /// Whether accepting is paused, and when to drain the listeners again.
    accept: AcceptBackoff,
    send_stats: SendStats,
}

impl EpollBackend {
    /// Creates the epoll instance and registers a fresh [`Wakeup`].
    pub fn new(opts: &BackendOptions) -> io::Result<Self> {
        Self::with_wakeup(opts, Wakeup::new()?)
    }

    /// [`Self::new`] around a given wakeup (tests give it one whose reads fail).
    pub(crate) fn with_wakeup(opts: &BackendOptions, wakeup: Wakeup) -> io::Result<Self> {
        opts.validate()?;
        let poll = Poll::new()?;
        poll.registry().register(
            &mut SourceFd(&wakeup.as_raw_fd()),
            WAKE_TOKEN,
            Interest::READABLE,
        )?;
        Ok(Self {
            poll,
            events: Events::with_capacity(opts.epoll_events),
            wakeup,
            watch_fired: false,
            listeners: Vec::new(),
            conns: Slab::new(GEN_BITS),
            lists: ListPool::default(),
            sendings: Vec::new(),
            by_token: TokenIndex::default(),
            dirty: Vec::new(),
            ready: Vec::new(),
            rbuf: vec![0u8; opts.read_chunk].into_boxed_slice(),
            budget: opts.io_budget,
            accept: AcceptBackoff::default(),
            send_stats: SendStats::default(),
        })
    }

    /// The connection in slot `idx`, whatever its generation.
    fn conn_at(&mut self, idx: u32) -> Option<&mut Conn> {
        self.conns.at_mut(idx).map(|(_, conn)| conn)
    }

    fn lookup(&mut self, token: Token) -> Option<(u32, &mut Conn)> {
        let idx = self.by_token.get(token)?;
        Some((idx, self.conn_at(idx)?))
    }

    fn mark_dirty(&mut self, idx: u32) {
        if let Some((key, conn)) = self.conns.at_mut(idx)
            && !conn.queued
        {
            conn.queued = true;
            self.dirty.push(key);
        }
    }

    /// Forgets the connection in `idx` and closes its socket. Reports nothing.
    /// The size of one connection's record in the slab, and of the mio stream in it (tests
    /// guard the rest: mio's stream is a 4-byte fd in release builds, and carries a
    /// selector id where debug assertions are on).
    #[cfg(test)]
    pub(super) fn connection_record_bytes() -> (usize, usize) {
        (
            std::mem::size_of::<Conn>(),
            std::mem::size_of::<TcpStream>(),
        )
    }

    fn release(&mut self, idx: u32) -> Option<Conn> {
        let conn = self.conns.remove_at(idx)?;
        self.by_token.remove(conn.token);
        // Closing the fd removes it from the epoll set; an explicit deregister would cost a
        // syscall for nothing (stale events are filtered by the generation).
        Some(conn)
    }

    /// Releases the connection and tells the sink why.
    fn close_with(&mut self, idx: u32, reason: CloseReason, sink: &mut dyn EventSink) {
        if let Some(conn) = self.release(idx) {
            sink.closed(conn.token, reason);
        }
    }

    /// Accepts from one listener until `WouldBlock`. Returns `false` when a failure paused
    /// accepting (or it was paused already): the backlog is left for the retry.
    fn accept_all(&mut self, lidx: usize, sink: &mut dyn EventSink) -> bool {
        if self.accept.paused() {
            return false; // `poll` drains every listener when the pause is over
        }
        loop {
            let Some(Some(listener)) = self.listeners.get(lidx) else {
                return true;
            };
            match listener.accept() {
                Ok((stream, peer)) => self.on_accepted(stream, peer, sink),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) => match AcceptError::of(e.raw_os_error().unwrap_or(0)) {
                    AcceptError::Transient => {}
                    AcceptError::Pause => {
                        self.accept.failed(Instant::now(), &e);
                        return false;
                    }
                },
            }
        }
    }

    /// The accept pause is over: drains every listener, new edge or not.
    fn retry_accepts(&mut self, sink: &mut dyn EventSink) {
        for lidx in 0..self.listeners.len() {
            if !self.accept_all(lidx, sink) {
                return; // paused again
            }
        }
        self.accept.succeeded(Instant::now());
    }

    fn on_accepted(&mut self, stream: TcpStream, peer: SocketAddr, sink: &mut dyn EventSink) {
        let std_stream = net::TcpStream::from(stream);
        let Some(token) = sink.accepted(&std_stream, peer) else {
            return;
        };
        if self.by_token.refuses_reuse(token) {
            return;
        }
        let conn = Conn {
            stream: TcpStream::from_std(std_stream),
            token,
            reading: true,
            read_ready: false,
            rdhup: false,
            sending: None,
            write_blocked: false,
            shutdown_pending: false,
            queued: false,
        };
        let key = match self.conns.insert(conn) {
            Ok(key) => key,
            Err(e) => {
                sink.closed(token, CloseReason::Error(e));
                return;
            }
        };
        let registered = match self.conns.get_mut(key) {
            Some(conn) => self.poll.registry().register(
                &mut conn.stream,
                conn_token(key),
                Interest::READABLE | Interest::WRITABLE,
            ),
            None => Err(io::Error::other("slab lost a connection just inserted")),
        };
        if let Err(e) = registered {
            drop(self.conns.remove_at(key.index));
            sink.closed(token, CloseReason::Error(e));
            return;
        }
        self.by_token.insert(token, key.index);
    }

    /// Reads until `WouldBlock`, EOF, an error, or the budget; reports what it read.
    fn do_read(&mut self, idx: u32, sink: &mut dyn EventSink) {
        let budget = self.budget;
        let mut moved = 0usize;
        loop {
            let Some(conn) = self.conns.at_mut(idx).map(|(_, conn)| conn) else {
                return;
            };
            if !conn.reading {
                return; // read_ready stays set; resumed by set_reading(true)
            }
            match conn.stream.read(&mut self.rbuf) {
                Ok(0) => {
                    self.close_with(idx, CloseReason::PeerClosed, sink);
                    return;
                }
                Ok(n) => {
                    let short = n < self.rbuf.len() && !conn.rdhup;
                    let token = conn.token;
                    sink.received(token, &self.rbuf[..n]);
                    moved += n;
                    if short {
                        // Edge-triggered: a short read emptied the socket; data that
                        // arrives later raises a new edge (tokio relies on the same rule).
                        conn.read_ready = false;
                        return;
                    }
                    if moved >= budget {
                        conn.read_ready = true;
                        self.mark_dirty(idx);
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.read_ready = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.close_with(idx, CloseReason::Error(e), sink);
                    return;
                }
            }
        }
    }

    /// Writes the batch in flight until done, `WouldBlock`, an error, or the budget.
    fn do_write(&mut self, idx: u32, sink: &mut dyn EventSink) {
        let budget = self.budget;
        let mut moved = 0usize;
        loop {
            let Some(conn) = self.conns.at_mut(idx).map(|(_, conn)| conn) else {
                return;
            };
            if conn.write_blocked {
                return;
            }
            let Some(sending) = conn.sending.as_mut() else {
                return;
            };
            while sending.out.front().is_some_and(|b| b.is_empty()) {
                sending.out.pop_front();
            }
            if sending.out.is_empty() {
                // The emptied queue and its box go to the pools: an idle connection holds
                // neither.
                let total = std::mem::take(&mut sending.total);
                if let Some(mut done) = conn.sending.take() {
                    self.lists.give(std::mem::take(&mut done.out));
                    if self.sendings.len() < SENDING_POOL_MAX {
                        self.sendings.push(done);
                    }
                }
                let token = conn.token;
                let shutdown = std::mem::take(&mut conn.shutdown_pending);
                if shutdown {
                    shutdown_write_now(conn);
                }
                sink.sent(token, total);
                return;
            }
            if moved >= budget {
                self.mark_dirty(idx);
                return;
            }
            let (res, offered) = write_some(&conn.stream, &sending.out, &mut self.send_stats);
            match res {
                Ok(0) => {
                    let e = io::Error::from(io::ErrorKind::WriteZero);
                    self.close_with(idx, CloseReason::Error(e), sink);
                    return;
                }
                Ok(n) => {
                    consume(&mut sending.out, n);
                    moved += n;
                    if n < offered {
                        // The socket buffer is full: the writable edge says when to go on.
                        self.send_stats.short_writes += 1;
                        conn.write_blocked = true;
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.send_stats.blind_retries += 1;
                    conn.write_blocked = true;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.close_with(idx, CloseReason::Error(e), sink);
                    return;
                }
            }
        }
    }

    /// Performs the work that `send`, `set_reading` and the read budget queued.
    fn run_dirty(&mut self, sink: &mut dyn EventSink) {
        let dirty = std::mem::take(&mut self.dirty);
        for &key in &dirty {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.queued = false;
            if conn.sending.is_some() && !conn.write_blocked {
                self.do_write(key.index, sink);
            }
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.reading && conn.read_ready {
                self.do_read(key.index, sink);
            }
        }
        // Put the (now empty) allocation back unless work was re-queued meanwhile.
        if self.dirty.is_empty() {
            let mut dirty = dirty;
            dirty.clear();
            self.dirty = dirty;
        }
    }

    fn on_conn_event(&mut self, key: Key, ev: &ReadyEvent, sink: &mut dyn EventSink) {
        let idx = key.index;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if ev.error {
            match conn.stream.take_error() {
                Ok(Some(e)) | Err(e) => {
                    self.close_with(idx, CloseReason::Error(e), sink);
                    return;
                }
                Ok(None) => {}
            }
        }
        if ev.writable {
            conn.write_blocked = false;
            if conn.sending.is_some() {
                self.do_write(idx, sink);
            }
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if ev.readable || ev.read_closed {
            conn.read_ready = true;
            conn.rdhup |= ev.read_closed;
            if conn.reading {
                self.do_read(idx, sink);
            }
        }
    }
}

/// What one epoll event said, copied out so the event buffer can be released.
#[derive(Debug, Clone, Copy)]
struct ReadyEvent {
    token: MioToken,
    readable: bool,
    writable: bool,
    read_closed: bool,
    error: bool,
}

/// Counts the calls made on a sink, so `poll` knows whether its queued work reported
/// anything (and must not block).
struct Counting<'a> {
    inner: &'a mut dyn EventSink,
    calls: usize,
}

impl EventSink for Counting<'_> {
    fn accepted(&mut self, stream: &net::TcpStream, peer: SocketAddr) -> Option<Token> {
        self.calls += 1;
        self.inner.accepted(stream, peer)
    }
    fn received(&mut self, token: Token, data: &[u8]) {
        self.calls += 1;
        self.inner.received(token, data);
    }
    fn sent(&mut self, token: Token, bytes: usize) {
        self.calls += 1;
        self.inner.sent(token, bytes);
    }
    fn closed(&mut self, token: Token, reason: CloseReason) {
        self.calls += 1;
        self.inner.closed(token, reason);
    }
    fn woken(&mut self) {
        self.calls += 1;
        self.inner.woken();
    }
}

/// One write of the front of `out` (non-empty, its front buffer non-empty): `send(2)` for
/// a single buffer, a phone's usual batch (the kernel takes it without `sendmsg`'s
/// `msghdr` copy and iovec import), `sendmsg` with up to [`MAX_IOVECS`] buffers otherwise.
/// MSG_NOSIGNAL either way: a write to a reset peer is EPIPE, not SIGPIPE, whatever the
/// process's signal disposition. Returns the result and the bytes offered.
fn write_some(
    stream: &TcpStream,
    out: &VecDeque<Bytes>,
    stats: &mut SendStats,
) -> (io::Result<usize>, usize) {
    let sock = SockRef::from(stream);
    if out.len() == 1
        && let Some(only) = out.front()
    {
        return (sock.send_with_flags(only, libc::MSG_NOSIGNAL), only.len());
    }
    let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
    let mut n_iov = 0;
    let mut offered = 0;
    for (slot, buf) in iov.iter_mut().zip(out.iter()) {
        *slot = IoSlice::new(buf);
        n_iov += 1;
        offered += buf.len();
    }
    stats.vectored_writes += 1;
    let res = sock.send_vectored_with_flags(&iov[..n_iov], libc::MSG_NOSIGNAL);
    (res, offered)
}

fn shutdown_write_now(conn: &Conn) {
    if let Err(e) = conn.stream.shutdown(Shutdown::Write) {
        // ENOTCONN after a reset: the error (or EOF) surfaces through the read side.
        tracing::debug!(token = conn.token, error = %e, "shutdown(SHUT_WR) failed");
    }
}

impl Transport for EpollBackend {
    fn close_listeners(&mut self) {
        for listener in &mut self.listeners {
            if let Some(mut l) = listener.take() {
                let _ = self.poll.registry().deregister(&mut l);
            }
        }
    }

    fn send(&mut self, token: Token, bufs: &mut VecDeque<Bytes>) {
        let Some(idx) = self.by_token.get(token) else {
            tracing::debug!(token, "send on an unknown token; dropped");
            bufs.clear();
            return;
        };
        let Some((_, conn)) = self.conns.at_mut(idx) else {
            return;
        };
        let total: usize = bufs.iter().map(Bytes::len).sum();
        if let Some(sending) = &mut conn.sending {
            // Contract breach (one batch at a time): append, report both as one `sent`.
            tracing::debug!(token, "send while a batch is in flight; appended to it");
            sending.out.extend(bufs.drain(..));
            sending.total += total;
        } else {
            let mut sending = self.sendings.pop().unwrap_or_default();
            // Swap with a pooled queue, so that the worker gets an allocated list back.
            sending.out = self.lists.take();
            std::mem::swap(&mut sending.out, bufs);
            bufs.clear();
            sending.total = total;
            conn.sending = Some(sending);
        }
        self.mark_dirty(idx);
    }

    fn set_reading(&mut self, token: Token, reading: bool) {
        let Some((idx, conn)) = self.lookup(token) else {
            return;
        };
        let was = std::mem::replace(&mut conn.reading, reading);
        if reading && !was && conn.read_ready {
            self.mark_dirty(idx);
        }
    }

    fn shutdown_write(&mut self, token: Token) {
        let Some((_, conn)) = self.lookup(token) else {
            return;
        };
        if conn.sending.is_some() {
            conn.shutdown_pending = true;
        } else {
            shutdown_write_now(conn);
        }
    }

    fn close(&mut self, token: Token) {
        if let Some(idx) = self.by_token.get(token) {
            drop(self.release(idx));
        }
    }
}

impl Backend for EpollBackend {
    #[cfg(test)]
    fn idle_send_state(&mut self) -> (usize, usize) {
        let held = self
            .conns
            .iter()
            .filter(|c| c.sending.as_ref().is_some_and(|s| s.out.is_empty()))
            .count();
        (held, self.lists.spare())
    }

    fn name(&self) -> &'static str {
        "epoll"
    }

    fn add_listener(&mut self, listener: net::TcpListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        let idx = self.listeners.len();
        self.poll
            .registry()
            .register(&mut listener, listener_token(idx), Interest::READABLE)?;
        self.listeners.push(Some(listener));
        Ok(())
    }

    fn wakeup(&self) -> Wakeup {
        self.wakeup.clone()
    }

    fn watch_readable(&mut self, fd: std::os::fd::RawFd) -> io::Result<()> {
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), WATCH_TOKEN, Interest::READABLE)
    }

    fn watch_fired(&mut self) -> bool {
        std::mem::take(&mut self.watch_fired)
    }

    fn accept_stats(&self) -> AcceptStats {
        self.accept.stats()
    }

    fn send_stats(&self) -> SendStats {
        self.send_stats
    }

    fn poll(&mut self, timeout: Option<Duration>, sink: &mut dyn EventSink) -> io::Result<()> {
        let mut counting = Counting {
            inner: sink,
            calls: 0,
        };
        self.run_dirty(&mut counting);
        if self.accept.paused() && self.accept.due(Instant::now()) {
            self.retry_accepts(&mut counting);
        }
        let sink = counting.inner;
        // Events already reported, or work left over: look, but do not wait.
        let busy = counting.calls > 0 || !self.dirty.is_empty();
        let timeout = if busy {
            Some(Duration::ZERO)
        } else if self.accept.paused() {
            self.accept.bound_timeout(Instant::now(), timeout)
        } else {
            timeout
        };
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        // Copy the events out: handling them needs `&mut self`.
        let mut ready = std::mem::take(&mut self.ready);
        ready.clear();
        ready.extend(self.events.iter().map(|e| ReadyEvent {
            token: e.token(),
            readable: e.is_readable(),
            writable: e.is_writable(),
            read_closed: e.is_read_closed(),
            error: e.is_error(),
        }));
        for ev in &ready {
            let raw = ev.token.0;
            match raw >> KIND_SHIFT {
                KIND_WAKE => match self.wakeup.drain() {
                    Ok(true) => sink.woken(),
                    Ok(false) => {}
                    Err(e) => {
                        // The rest of the batch still gets handled; the worker looks at its
                        // inbox as if woken, so a wake is never lost to a failed read.
                        tracing::warn!(error = %e, "reading the wakeup eventfd failed");
                        sink.woken();
                    }
                },
                // The wait ended; the worker's next tick turns the watched descriptor's
                // owner.
                KIND_WATCH => self.watch_fired = true,
                KIND_LISTENER => {
                    let lidx = raw & ((1 << 32) - 1);
                    if self.accept_all(lidx, sink) && self.accept.in_episode() {
                        self.accept.succeeded(Instant::now());
                    }
                }
                KIND_CONN => {
                    let key = Key {
                        index: (raw & 0xFFFF_FFFF) as u32,
                        generation: (raw >> 32) as u32 & GEN_MASK,
                    };
                    self.on_conn_event(key, ev, sink);
                }
                _ => {}
            }
        }
        self.ready = ready;
        Ok(())
    }
}
