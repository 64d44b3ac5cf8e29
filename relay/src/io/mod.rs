//! I/O backends: the only place in the relay that touches sockets, and so the only place
//! that holds `unsafe`.
//!
//! A worker owns one [`Backend`]. The backend owns the worker's sockets (listeners and
//! connections) and turns kernel activity into calls on an [`EventSink`] that the worker
//! implements. Everything protocol-related (decoding, routing, queues, timers) lives in the
//! worker and its sans-IO state machines; a backend never looks inside the bytes it moves.
//!
//! Two backends implement the same contract:
//! - [`uring`]: io_uring with batched submission (one `io_uring_enter` per loop tick),
//!   multishot accept, multishot receive into a provided buffer ring where the kernel has them.
//! - [`epoll`]: mio (epoll) for kernels or sandboxes where io_uring is missing or forbidden.
//!
//! [`probe`] decides between them for `io_backend = "auto"`. Both keep their connections in
//! one generational slab ([`slab`]), follow one accept policy ([`accept`]), and share the
//! descriptor budget ([`descriptors`]).
//!
//! # Contract every backend keeps
//! - Tokens are chosen by the sink in [`EventSink::accepted`]; the backend reports events for a
//!   token until it reports [`EventSink::closed`] for it or the worker calls [`Backend::close`],
//!   and never after either.
//! - [`Backend::send`] takes ownership of a batch of buffers and writes all of them, in order,
//!   as few syscalls as the kernel allows (vectored; a batch of one buffer needs no iovec,
//!   and epoll sends it with `send(2)`). At most one batch is in flight per
//!   connection: the worker calls `send` again only after [`EventSink::sent`] for that token.
//!   Partial writes are the backend's business, not the worker's. A short write means the
//!   socket buffer is full: the backend waits for the kernel to say there is room (epoll's
//!   writable edge, io_uring's `IORING_RECVSEND_POLL_FIRST`) and never tries a write it
//!   knows will fail ([`SendStats`]).
//! - Received bytes are lent to the sink in [`EventSink::received`]; the backend may reuse the
//!   memory once the call returns (the worker copies what it keeps).
//! - [`Backend::set_reading`] pauses and resumes reading from one connection (backpressure):
//!   while paused, no `received` calls are made for that token.
//! - [`Backend::shutdown_write`] half-closes after the last queued send (graceful close:
//!   the peer reads everything, then sees EOF); the socket stays open for reading so that
//!   unread input does not turn the close into a reset that discards our last frames.
//! - [`Backend::poll`] submits everything queued since the last call, waits until at least one
//!   event, the timeout, or a [`Wakeup`] from another thread, then reports all ready events.
//!   A failure that concerns one event (a connection's error, a failed eventfd read) is
//!   handled or logged there; it never abandons the rest of the batch.
//!
//! # Accept errors: one policy ([`accept::AcceptBackoff`])
//! - Errors about the one connection (ECONNABORTED, EPROTO, EPERM from a firewall rule, the
//!   network errors `accept(2)` passes on, EINTR, EAGAIN) are skipped: the next connection is
//!   accepted at once.
//! - Any other error (EMFILE, ENFILE, ENOBUFS, ENOMEM: the process or the kernel is out of
//!   descriptors or memory) pauses accepting on every listener of the backend for 10 ms,
//!   doubling per failed retry up to 1 s. When the pause is over the backend retries the
//!   backlog itself (epoll re-drains the listener, io_uring re-arms its accept) whether or not
//!   a new connection arrived: connections already waiting in the backlog are never left
//!   there for want of an edge. The connections stay queued in the kernel meanwhile.
//! - An episode (from the first failure to the next accept that works) is logged twice, never
//!   per attempt: a warning when it begins and a line with the count when it ends; failures
//!   and episodes are counted ([`Backend::accept_stats`], `pabal_accept_*` in `/metrics`).

pub mod accept;
pub mod descriptors;
pub mod epoll;
pub mod probe;
pub mod slab;
#[cfg(test)]
mod tests;
pub mod uring;
mod uring_buffers;
pub mod uring_storage;
mod wakeup;

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use bytes::Bytes;

pub use accept::AcceptStats;
pub use wakeup::Wakeup;

/// Identifies a connection within one worker; chosen by the worker (slot index plus a
/// generation, so a stale completion can never reach a reused slot).
pub type Token = u64;

/// Why the backend closed a connection on its own.
#[derive(Debug)]
pub enum CloseReason {
    /// The peer closed its side (EOF).
    PeerClosed,
    /// The socket failed (reset, timeout, ...).
    Error(io::Error),
}

/// The worker side of a backend: receives what the kernel reports.
pub trait EventSink {
    /// A connection was accepted on one of the backend's listeners. The sink sets socket
    /// options through the borrowed stream and answers with the token to use, or `None` to
    /// refuse it (the backend closes it at once).
    fn accepted(&mut self, stream: &TcpStream, peer: SocketAddr) -> Option<Token>;
    /// Bytes arrived on a connection. The slice is only valid during the call.
    fn received(&mut self, token: Token, data: &[u8]);
    /// The whole batch given to [`Transport::send`] for this token has been written.
    fn sent(&mut self, token: Token, bytes: usize);
    /// The connection is gone (peer EOF or socket error); the backend has released it.
    fn closed(&mut self, token: Token, reason: CloseReason);
    /// Another thread called [`Wakeup::wake`].
    fn woken(&mut self);
}

/// The socket operations a worker's core hands over when it flushes ([`crate::core::Core::flush`]):
/// what a worker asks of its sockets. Every [`Backend`] is one; the core's tests and the
/// simulator use in-memory ones, and the TLS/WebSocket layers wrap one.
pub trait Transport {
    /// Write every buffer in `bufs` (drained; left empty) to the connection, in order.
    /// Precondition: no batch is in flight for `token`.
    fn send(&mut self, token: Token, bufs: &mut VecDeque<Bytes>);
    /// Pause (`false`) or resume (`true`) reading from the connection.
    fn set_reading(&mut self, token: Token, reading: bool);
    /// Half-close the connection once the batch in flight, if any, has been written.
    fn shutdown_write(&mut self, token: Token);
    /// Close the connection now and forget the token; no event for it is reported after this.
    fn close(&mut self, token: Token);
    /// Stop accepting and close every listener (shutdown). Connections stay open.
    fn close_listeners(&mut self);
}

/// One worker's I/O backend: its sockets ([`Transport`]) plus listening, waiting and
/// waking. Created on the worker's own thread and used only there.
pub trait Backend: Transport {
    /// `"io_uring"` or `"epoll"`, for logs and metrics.
    fn name(&self) -> &'static str;
    /// Start accepting on a non-blocking listener (the caller has bound it, with
    /// `SO_REUSEPORT` where several workers share an address).
    fn add_listener(&mut self, listener: TcpListener) -> io::Result<()>;
    /// The handle other threads use to interrupt [`Backend::poll`].
    fn wakeup(&self) -> Wakeup;
    /// Ends [`Backend::poll`]'s wait whenever `fd` becomes readable (a cluster engine's
    /// own poll run on the worker's thread: its Redis connections beside the phones').
    /// Nothing is read from `fd`: the worker's next tick hands it to its owner. At most one
    /// descriptor; it must stay open until the backend drops.
    fn watch_readable(&mut self, fd: std::os::fd::RawFd) -> io::Result<()>;
    /// Whether the watched descriptor may have become readable since the last call (it
    /// signalled, or its watch failed and nothing can tell): the worker then turns its
    /// owner's poll, and skips that system call otherwise.
    fn watch_fired(&mut self) -> bool;
    /// Submit queued work, wait for events (at most `timeout`; `None` waits indefinitely),
    /// and report them to `sink`. While accepting is paused, the wait ends in time for the
    /// retry.
    fn poll(&mut self, timeout: Option<Duration>, sink: &mut dyn EventSink) -> io::Result<()>;
    /// Accept failures and pauses since the backend started.
    fn accept_stats(&self) -> AcceptStats;
    /// How sends met full socket buffers since the backend started.
    fn send_stats(&self) -> SendStats;
    /// The backend's own executor for the worker's durable-log jobs, where it has one: the
    /// io_uring backend writes and syncs through its ring ([`uring_storage`]), and reports
    /// the completions from [`Backend::poll`] (a completion ends the wait). `None` (epoll):
    /// the worker runs them on a [`crate::storage::SyncThread`].
    fn storage_executor(&mut self) -> Option<&mut dyn crate::storage::CommitExecutor> {
        None
    }
    /// Connections holding send state (a queue's allocation, io_uring's send vectors) with
    /// no send in flight, and spare queues in the backend's pool. Tests check that an idle
    /// connection holds none.
    #[cfg(test)]
    fn idle_send_state(&mut self) -> (usize, usize);
}

/// How a backend's sends met full socket buffers, since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendStats {
    /// Writes that took less than they were offered: the socket buffer filled.
    pub short_writes: u64,
    /// Writes tried on a socket already known to be full (epoll: a write that returned
    /// `EAGAIN`; io_uring: a send resubmitted after a short write without
    /// `IORING_RECVSEND_POLL_FIRST`). Each is a wasted round through the kernel; the
    /// backends keep it at zero, and tests assert that.
    pub blind_retries: u64,
    /// Writes that went through `sendmsg` with an iovec list because the batch held more
    /// than one buffer (epoll). A batch of one buffer, a phone's usual one, goes out with
    /// `send(2)`, which the kernel takes without importing a `msghdr` and an iovec; tests
    /// assert that a stream of one-buffer batches makes none. io_uring leaves it at zero.
    pub vectored_writes: u64,
}

/// Which backend to run; the config's `io_backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Probe io_uring at start; fall back to epoll with one log line saying why.
    Auto,
    /// io_uring or fail to start.
    IoUring,
    /// mio/epoll.
    Epoll,
}
