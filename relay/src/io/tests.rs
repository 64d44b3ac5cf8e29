//! Loopback tests of the backend contract, each written once and run against every backend:
//! io_uring (multishot, with a deliberately small buffer ring so that ENOBUFS re-arming is
//! exercised; receive bundles where the kernel has them), the same without bundles (plain
//! multishot receive, [`bundles`]), io_uring forced onto its single-shot paths, and epoll (with a small per-tick
//! budget). The io_uring variants print a skip line and pass where io_uring is unavailable,
//! except under CI (`CI=true`), where they fail ([`pabal_testkit::skip`]).
//!
//! The backend runs on the test thread (the io_uring one is single-issuer); clients are std
//! blocking sockets on their own threads. Every wait is bounded, so a hang fails the test.
//!
//! Tests that exhaust the process's descriptors run in a child process (this test binary,
//! re-run with a filter naming just that test), so that the other tests keep theirs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // reason: tests

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use socket2::{Domain, SockRef, Socket, Type};

use super::descriptors;
use super::epoll::EpollBackend;
use super::probe::{self, BackendOptions, ResolvedKind, Unavailable};
use super::uring::UringBackend;
use super::{Backend, BackendKind, CloseReason, EventSink, Token, Wakeup};

mod bundles;
mod half_close;
mod uring_record;

/// Longest any single wait in these tests may take before the test fails.
const LIMIT: Duration = Duration::from_secs(10);
const TICK: Duration = Duration::from_millis(5);

// ---- backends under test ----

fn uring_opts(multishot: bool) -> BackendOptions {
    BackendOptions {
        ring_entries: 256,
        cq_entries: 1024,
        buf_ring_count: 64,
        buf_size: 4096,
        uring_multishot: multishot,
        ..BackendOptions::default()
    }
}

fn make_uring(multishot: bool) -> Option<Box<dyn Backend>> {
    make_uring_with(&uring_opts(multishot))
}

/// Multishot receives without bundles (what a kernel before 6.10 runs).
fn make_uring_plain_multishot() -> Option<Box<dyn Backend>> {
    make_uring_with(&BackendOptions {
        uring_recv_bundle: false,
        ..uring_opts(true)
    })
}

fn make_uring_with(opts: &BackendOptions) -> Option<Box<dyn Backend>> {
    if let Err(e) = probe::probe_uring(opts) {
        pabal_testkit::skip(format_args!("the io_uring variant: {e}"));
        return None;
    }
    Some(Box::new(UringBackend::new(opts).expect("io_uring backend")))
}

fn make_epoll() -> Option<Box<dyn Backend>> {
    let opts = BackendOptions {
        io_budget: 256 * 1024,
        ..BackendOptions::default()
    };
    Some(Box::new(EpollBackend::new(&opts).expect("epoll backend")))
}

macro_rules! for_each_backend {
    ($($test:ident),* $(,)?) => {
        mod uring {
            $( #[test] fn $test() { if let Some(b) = super::make_uring(true) { super::$test(b) } } )*
        }
        mod uring_single_shot {
            $( #[test] fn $test() { if let Some(b) = super::make_uring(false) { super::$test(b) } } )*
        }
        mod uring_plain_multishot {
            $( #[test] fn $test() { if let Some(b) = super::make_uring_plain_multishot() { super::$test(b) } } )*
        }
        mod epoll {
            $( #[test] fn $test() { if let Some(b) = super::make_epoll() { super::$test(b) } } )*
        }
    };
}

/// Like [`for_each_backend!`], each variant in a child process of its own (see
/// [`in_child`]).
macro_rules! for_each_backend_in_child {
    ($($test:ident),* $(,)?) => {
        mod in_child {
            mod uring {
                $( #[test] fn $test() {
                    crate::io::tests::in_child(module_path!(), stringify!($test), || {
                        if let Some(b) = crate::io::tests::make_uring(true) { crate::io::tests::$test(b) }
                    })
                } )*
            }
            mod uring_single_shot {
                $( #[test] fn $test() {
                    crate::io::tests::in_child(module_path!(), stringify!($test), || {
                        if let Some(b) = crate::io::tests::make_uring(false) { crate::io::tests::$test(b) }
                    })
                } )*
            }
            mod epoll {
                $( #[test] fn $test() {
                    crate::io::tests::in_child(module_path!(), stringify!($test), || {
                        if let Some(b) = crate::io::tests::make_epoll() { crate::io::tests::$test(b) }
                    })
                } )*
            }
        }
    };
}

for_each_backend_in_child!(accept_retries_the_backlog_when_descriptors_return);

mod sends;
mod watch;

for_each_backend!(
    echo_1mib_random_chunks,
    many_connections,
    large_batch_partial_writes,
    full_socket_waits_for_room_without_blind_retries,
    pause_stops_received_until_resumed,
    shutdown_write_delivers_then_eof,
    peer_close_reported_once,
    short_connections_all_close,
    close_from_worker_silences_token,
    wakeup_interrupts_indefinite_poll,
    wakes_coalesce,
    close_listeners_refuses_new_connections,
    refused_connection_is_closed,
    an_idle_connection_holds_no_send_state,
    one_poll_reports_every_ready_connection,
    sends_do_not_crowd_out_receives_in_one_poll,
);

// ---- harness ----

/// Records every event and checks the contract's "never after closed" rule.
#[derive(Default)]
struct Rec {
    next: Token,
    accepted: Vec<Token>,
    rx: HashMap<Token, Vec<u8>>,
    rx_calls: HashMap<Token, usize>,
    sent: Vec<(Token, usize)>,
    closed: Vec<(Token, Result<(), String>)>,
    woken: usize,
    /// Reported closed, or closed by the worker: no event may name these again.
    dead: HashSet<Token>,
    violations: Vec<String>,
    /// Answer `accepted` with `None`.
    refuse: bool,
    /// SO_SNDBUF for accepted sockets.
    sndbuf: Option<usize>,
    /// Echo mode: what of `rx` has been sent back, and which tokens have a batch in flight.
    echo: bool,
    echoed: HashMap<Token, usize>,
    in_flight: HashSet<Token>,
}

impl Rec {
    fn check_live(&mut self, token: Token, what: &str) {
        if self.dead.contains(&token) {
            self.violations
                .push(format!("{what} for token {token} after it was closed"));
        }
    }
}

impl EventSink for Rec {
    fn accepted(&mut self, stream: &TcpStream, _peer: SocketAddr) -> Option<Token> {
        if self.refuse {
            return None;
        }
        if let Some(size) = self.sndbuf {
            SockRef::from(stream).set_send_buffer_size(size).unwrap();
        }
        self.next += 1;
        let token = 1000 + self.next;
        self.accepted.push(token);
        Some(token)
    }

    fn received(&mut self, token: Token, data: &[u8]) {
        self.check_live(token, "received");
        assert!(!data.is_empty(), "received an empty slice");
        self.rx.entry(token).or_default().extend_from_slice(data);
        *self.rx_calls.entry(token).or_default() += 1;
    }

    fn sent(&mut self, token: Token, bytes: usize) {
        self.check_live(token, "sent");
        self.in_flight.remove(&token);
        self.sent.push((token, bytes));
    }

    fn closed(&mut self, token: Token, reason: CloseReason) {
        self.check_live(token, "closed");
        self.dead.insert(token);
        let reason = match reason {
            CloseReason::PeerClosed => Ok(()),
            CloseReason::Error(e) => Err(e.to_string()),
        };
        self.closed.push((token, reason));
    }

    fn woken(&mut self) {
        self.woken += 1;
    }
}

/// A backend under test with its recording sink; generic so that a test of one backend can
/// reach that backend's own inspection methods.
struct Server<B: Backend + ?Sized = dyn Backend> {
    b: Box<B>,
    s: Rec,
    addr: SocketAddr,
}

fn bound_listener() -> (TcpListener, SocketAddr) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_reuse_port(true).unwrap();
    socket.set_nonblocking(true).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(1024).unwrap();
    let listener: TcpListener = socket.into();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

impl<B: Backend + ?Sized> Server<B> {
    fn new(mut b: Box<B>) -> Self {
        let (listener, addr) = bound_listener();
        b.add_listener(listener).unwrap();
        Self {
            b,
            s: Rec::default(),
            addr,
        }
    }

    fn tick(&mut self) {
        self.b.poll(Some(TICK), &mut self.s).unwrap();
        if self.s.echo {
            self.pump_echo();
        }
    }

    /// Sends back what arrived, in up to three `Bytes` per batch, one batch at a time.
    fn pump_echo(&mut self) {
        let tokens: Vec<Token> = self.s.rx.keys().copied().collect();
        for token in tokens {
            if self.s.in_flight.contains(&token) || self.s.dead.contains(&token) {
                continue;
            }
            let rx = &self.s.rx[&token];
            let done = self.s.echoed.get(&token).copied().unwrap_or(0);
            if done == rx.len() {
                continue;
            }
            let all = Bytes::copy_from_slice(&rx[done..]);
            let third = all.len() / 3;
            let mut batch: VecDeque<Bytes> = [
                all.slice(..third),
                all.slice(third..2 * third),
                all.slice(2 * third..),
            ]
            .into();
            self.s.echoed.insert(token, rx.len());
            self.s.in_flight.insert(token);
            self.b.send(token, &mut batch);
            assert!(batch.is_empty(), "send must drain the batch");
        }
    }

    /// Ticks until `done` holds; fails the test after [`LIMIT`].
    fn until(&mut self, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        let deadline = Instant::now() + LIMIT;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; {} accepted, {} closed, {} sent, rx sizes {:?}, backend {:?}",
                self.s.accepted.len(),
                self.s.closed.len(),
                self.s.sent.len(),
                self.s
                    .rx
                    .iter()
                    .map(|(t, v)| (*t, v.len()))
                    .collect::<Vec<_>>(),
                self.b.name(),
            );
            self.tick();
        }
    }

    /// Ticks until `done` has held for 200 ms in a row (connections may still be waiting in
    /// the backlog when a client thread finishes).
    fn until_settled(&mut self, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        let settle = Duration::from_millis(200);
        let mut since: Option<Instant> = None;
        self.until(what, |s| {
            if !done(s) {
                since = None;
                return false;
            }
            since.get_or_insert_with(Instant::now).elapsed() >= settle
        });
    }

    /// Ticks for `d` whatever happens.
    fn run_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.tick();
        }
    }

    fn close(&mut self, token: Token) {
        self.b.close(token);
        self.s.dead.insert(token);
    }

    fn assert_clean(&self) {
        assert!(
            self.s.violations.is_empty(),
            "contract violations: {:?}",
            self.s.violations
        );
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.set_write_timeout(Some(LIMIT)).unwrap();
    s
}

/// Deterministic sizes and contents: the relay's one PRNG.
struct Rng(crate::rng::SplitMix64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(crate::rng::SplitMix64::new(seed))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.0.below((hi - lo) as u64) as usize
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.next() as u8).collect()
}

fn join<T>(handle: thread::JoinHandle<T>) -> T {
    match handle.join() {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e),
    }
}

/// Names the test a child process runs (see [`in_child`]).
const CHILD_ENV: &str = "PABAL_IO_TEST_CHILD";

/// Runs `body` in a child process: this test binary again, filtered to exactly this test
/// (`module` is the test's `module_path!()`), with [`CHILD_ENV`] telling it to run the body.
/// The parent passes when the child ran that one test and it passed.
fn in_child(module: &str, name: &str, body: impl FnOnce()) {
    let module = module
        .split_once("::")
        .map_or(module, |(_crate, rest)| rest);
    let test = format!("{module}::{name}");
    if std::env::var(CHILD_ENV).is_ok_and(|t| t == test) {
        body();
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &test)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (mut stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).unwrap();
        text
    });
    let err = thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    let deadline = Instant::now() + 3 * LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child running {test} did not finish");
        }
        thread::sleep(TICK);
    };
    let (out, err) = (join(out), join(err));
    assert!(
        status.success() && out.contains("1 passed"),
        "{test} in a child process: {status}\n--- stdout\n{out}\n--- stderr\n{err}"
    );
}

// ---- the tests, generic over the backend ----

fn echo_1mib_random_chunks(b: Box<dyn Backend>) {
    let mut srv = Server::new(b);
    srv.s.echo = true;
    let addr = srv.addr;
    let data = pattern(1, 1 << 20);
    let expect = data.clone();
    let client = thread::spawn(move || {
        let mut s = connect(addr);
        let mut w = s.try_clone().unwrap();
        let writer = thread::spawn(move || {
            let mut rng = Rng::new(7);
            let mut off = 0;
            while off < data.len() {
                let n = rng.range(1, 64 * 1024).min(data.len() - off);
                w.write_all(&data[off..off + n]).unwrap();
                off += n;
            }
        });
        let mut got = vec![0u8; expect.len()];
        let mut rng = Rng::new(11);
        let mut off = 0;
        while off < got.len() {
            let n = rng.range(1, 48 * 1024).min(got.len() - off);
            s.read_exact(&mut got[off..off + n]).unwrap();
            off += n;
        }
        join(writer);
        assert!(got == expect, "echoed bytes differ");
    });
    srv.until("the echo client", |_| client.is_finished());
    join(client);
    srv.until("the peer's close", |s| s.s.closed.len() == 1);
    assert!(srv.s.closed[0].1.is_ok(), "{:?}", srv.s.closed);
    srv.assert_clean();
}

fn many_connections(b: Box<dyn Backend>) {
    const N: usize = 200;
    let mut srv = Server::new(b);
    srv.s.echo = true;
    let addr = srv.addr;
    let client = thread::spawn(move || {
        let mut conns = Vec::with_capacity(N);
        for i in 0..N {
            let mut s = connect(addr);
            s.write_all(&pattern(i as u64 + 100, 1000)).unwrap();
            conns.push(s);
        }
        for (i, s) in conns.iter_mut().enumerate() {
            let mut got = vec![0u8; 1000];
            s.read_exact(&mut got).unwrap();
            assert!(
                got == pattern(i as u64 + 100, 1000),
                "connection {i} echoed wrong bytes"
            );
        }
    });
    srv.until("200 echo clients", |_| client.is_finished());
    join(client);
    srv.until("200 closes", |s| s.s.closed.len() == N);
    assert_eq!(srv.s.accepted.len(), N);
    let closed: HashSet<Token> = srv.s.closed.iter().map(|c| c.0).collect();
    assert_eq!(closed.len(), N, "each connection closed exactly once");
    srv.assert_clean();
}

/// Data already waiting on many connections is reported by one `poll` (up to the backend's
/// batch, 1,024 on both), as `epoll_wait` hands over every ready socket. On a `DEFER_TASKRUN`
/// ring the kernel completes at most 20 receives per pass of `io_uring_enter` (Linux 6.13+):
/// an io_uring tick that entered once reported about 20 of these 300, so a worker with many
/// acknowledging subscribers turned ten times per epoll tick, with smaller sends each.
fn one_poll_reports_every_ready_connection(b: Box<dyn Backend>) {
    const N: usize = 300;
    let mut srv = Server::new(b);
    let _clients = clients_with_data_waiting(&mut srv, N);
    srv.b.poll(Some(LIMIT), &mut srv.s).unwrap();
    assert_eq!(
        srv.s.rx.len(),
        N,
        "one poll reported {} of {N} connections with data waiting ({})",
        srv.s.rx.len(),
        srv.b.name()
    );
    assert!(srv.s.rx.values().all(|got| got == b"ack"));
    srv.assert_clean();
}

/// `n` connections, accepted with their receives armed, each with "ack" waiting in the
/// server's socket. Keep the clients: dropping them closes the connections.
fn clients_with_data_waiting(srv: &mut Server, n: usize) -> Vec<TcpStream> {
    let addr = srv.addr;
    let mut clients: Vec<TcpStream> = (0..n).map(|_| connect(addr)).collect();
    srv.until_settled("all accepted", |s| s.s.accepted.len() == n);
    for c in &mut clients {
        c.write_all(b"ack").unwrap();
    }
    // Loopback puts the bytes in the server's sockets during the writes; this only leaves
    // room for a slow machine.
    thread::sleep(Duration::from_millis(100));
    clients
}

/// A poll that sends to many connections still reports every one with data waiting: the
/// sends' completions do not use up the tick's budget (io_uring once ended such a tick after
/// the first enter's few receives, so the worker alternated sending and receiving ticks).
fn sends_do_not_crowd_out_receives_in_one_poll(b: Box<dyn Backend>) {
    const N: usize = 700; // sends plus receives exceed the 1,024 per tick; receives alone do not
    let mut srv = Server::new(b);
    let _clients = clients_with_data_waiting(&mut srv, N);
    for token in srv.s.accepted.clone() {
        srv.b
            .send(token, &mut VecDeque::from([Bytes::from_static(b"frame")]));
    }
    srv.b.poll(Some(LIMIT), &mut srv.s).unwrap();
    let name = srv.b.name();
    assert_eq!(srv.s.sent.len(), N, "sends reported in the poll ({name})");
    assert_eq!(
        srv.s.rx.len(),
        N,
        "the poll that sent to {N} connections reported {} of them with data waiting ({name})",
        srv.s.rx.len()
    );
    srv.assert_clean();
}

fn large_batch_partial_writes(b: Box<dyn Backend>) {
    let mut srv = Server::new(b);
    srv.s.sndbuf = Some(64 * 1024);
    let addr = srv.addr;
    // ~6 MB in 3000 buffers: far more than one vectored write takes (64 / 1024 iovecs).
    let mut rng = Rng::new(3);
    let sizes: Vec<usize> = (0..3000).map(|_| rng.range(1, 4000)).collect();
    let total: usize = sizes.iter().sum();
    let whole = Bytes::from(pattern(5, total));
    let expect = whole.clone();
    let progress = Arc::new(AtomicUsize::new(0));
    let seen = progress.clone();
    let client = thread::spawn(move || {
        let mut s = slow_reader(addr);
        let mut got = vec![0u8; total];
        let mut off = 0;
        while off < total {
            let n = s.read(&mut got[off..(off + 16 * 1024).min(total)]).unwrap();
            assert!(n > 0, "early EOF at {off} of {total}");
            off += n;
            seen.store(off, Ordering::Release);
            if off < 2 << 20 {
                thread::sleep(Duration::from_micros(500)); // a slow reader at first
            }
        }
        assert!(got[..] == expect[..], "batch bytes differ");
    });
    srv.until("the accept", |s| s.s.accepted.len() == 1);
    let token = srv.s.accepted[0];
    let mut batch = VecDeque::new();
    let mut off = 0;
    for n in sizes {
        batch.push_back(whole.slice(off..off + n));
        off += n;
    }
    srv.b.send(token, &mut batch);
    assert!(batch.is_empty());
    srv.until("sent", |s| !s.s.sent.is_empty());
    let read_at_sent = progress.load(Ordering::Acquire);
    assert!(
        read_at_sent + (1 << 20) >= total,
        "sent reported with only {read_at_sent} of {total} bytes read by the peer"
    );
    srv.until("the slow reader", |_| client.is_finished());
    join(client);
    assert_eq!(srv.s.sent, vec![(token, total)]);
    srv.assert_clean();
}

/// A send that fills the socket buffer (a short write) waits for the kernel to report room:
/// no write is tried on a socket known to be full (epoll: no `EAGAIN` round after a short
/// write; io_uring: the rest goes with `IORING_RECVSEND_POLL_FIRST`), and every byte still
/// arrives, in order, with one `sent`.
fn full_socket_waits_for_room_without_blind_retries(b: Box<dyn Backend>) {
    // A phone's batch (one buffer) and a burst's (many): both paths meet the full buffer.
    let (srv, stats) = send_into_a_full_socket(b, 11, |whole| {
        let total = whole.len();
        let mut batch = VecDeque::new();
        batch.push_back(whole.slice(..total / 2));
        for chunk in (total / 2..total).step_by(16 * 1024) {
            batch.push_back(whole.slice(chunk..(chunk + 16 * 1024).min(total)));
        }
        batch
    });
    assert!(stats.short_writes > 1, "{stats:?}");
    srv.assert_clean();
}

/// Sends one batch of 4 MiB (`pattern(seed)`, cut by `batch_of`) into a 64 KiB socket
/// buffer whose reader reads nothing until the first short write; checks that every byte
/// arrives with one `sent` and that no write was tried on the full socket, and returns the
/// server and its send stats.
fn send_into_a_full_socket(
    b: Box<dyn Backend>,
    seed: u64,
    batch_of: impl FnOnce(&Bytes) -> VecDeque<Bytes>,
) -> (Server, super::SendStats) {
    let mut srv = Server::new(b);
    srv.s.sndbuf = Some(64 * 1024);
    let total = 4 << 20;
    let whole = Bytes::from(pattern(seed, total));
    let (go, client) = gated_slow_reader(srv.addr, whole.clone());
    srv.until("the accept", |s| s.s.accepted.len() == 1);
    let token = srv.s.accepted[0];
    srv.b.send(token, &mut batch_of(&whole));
    srv.until("a short write", |s| s.b.send_stats().short_writes > 0);
    go.store(true, Ordering::Release);
    srv.until("sent", |s| !s.s.sent.is_empty());
    srv.until("the reader", |_| client.is_finished());
    join(client);
    assert_eq!(srv.s.sent, vec![(token, total)]);
    let stats = srv.b.send_stats();
    assert_eq!(
        stats.blind_retries, 0,
        "a write was tried on a full socket: {stats:?}"
    );
    (srv, stats)
}

fn pause_stops_received_until_resumed(b: Box<dyn Backend>) {
    const LEN: usize = 2 << 20;
    let mut srv = Server::new(b);
    let addr = srv.addr;
    let data = pattern(9, LEN);
    let expect = data.clone();
    // The client sends the rest only once reading is paused: a backend may well take all of
    // it, and the EOF, in the tick that brings the first 64 KiB.
    let paused = Arc::new(AtomicBool::new(false));
    let go = paused.clone();
    let client = thread::spawn(move || {
        let mut s = connect(addr);
        let (first, rest) = data.split_at(64 * 1024);
        s.write_all(first).unwrap();
        let deadline = Instant::now() + LIMIT;
        while !go.load(Ordering::Acquire) && Instant::now() < deadline {
            thread::sleep(TICK);
        }
        for chunk in rest.chunks(8192) {
            s.write_all(chunk).unwrap();
        }
        // Then close: the EOF, too, must wait for the resume and come after the data.
    });
    srv.until("the first 64 KiB", |s| {
        s.s.rx.values().next().is_some_and(|v| v.len() >= 64 * 1024)
    });
    let token = srv.s.accepted[0];
    srv.b.set_reading(token, false);
    paused.store(true, Ordering::Release);
    let (len_at_pause, calls_at_pause) = (srv.s.rx[&token].len(), srv.s.rx_calls[&token]);
    srv.run_for(Duration::from_millis(300));
    assert_eq!(
        srv.s.rx_calls[&token], calls_at_pause,
        "received while paused"
    );
    assert_eq!(srv.s.rx[&token].len(), len_at_pause);
    assert!(
        srv.s.closed.is_empty(),
        "closed while paused: {:?}",
        srv.s.closed
    );
    srv.b.set_reading(token, true);
    srv.until("the rest and the EOF", |s| !s.s.closed.is_empty());
    assert!(
        srv.s.rx[&token] == expect,
        "bytes lost or reordered across the pause"
    );
    assert_eq!(srv.s.closed.len(), 1);
    assert!(srv.s.closed[0].1.is_ok(), "{:?}", srv.s.closed);
    join(client);
    srv.assert_clean();
}

fn shutdown_write_delivers_then_eof(b: Box<dyn Backend>) {
    const LEN: usize = 1 << 20;
    let mut srv = Server::new(b);
    let addr = srv.addr;
    let whole = Bytes::from(pattern(13, LEN));
    let expect = whole.clone();
    let client = thread::spawn(move || {
        let mut s = connect(addr);
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap(); // ends at the relay's FIN
        assert!(
            got[..] == expect[..],
            "got {} of {LEN} bytes before EOF",
            got.len()
        );
        // Half-closed, not closed: the relay still reads.
        s.write_all(b"bye").unwrap();
    });
    srv.until("the accept", |s| s.s.accepted.len() == 1);
    let token = srv.s.accepted[0];
    let mut batch: VecDeque<Bytes> = (0..100)
        .map(|i| whole.slice(i * LEN / 100..(i + 1) * LEN / 100))
        .collect();
    srv.b.send(token, &mut batch);
    srv.b.shutdown_write(token); // with the batch still in flight
    srv.until("the peer's close", |s| !s.s.closed.is_empty());
    join(client);
    assert_eq!(srv.s.sent, vec![(token, LEN)]);
    assert_eq!(srv.s.rx.get(&token).map(Vec::as_slice), Some(&b"bye"[..]));
    assert_eq!(srv.s.closed.len(), 1);
    assert!(srv.s.closed[0].1.is_ok(), "{:?}", srv.s.closed);
    srv.run_for(Duration::from_millis(50));
    srv.assert_clean();
}

fn peer_close_reported_once(b: Box<dyn Backend>) {
    let mut srv = Server::new(b);
    let addr = srv.addr;
    let client = thread::spawn(move || {
        for i in 0..20 {
            let mut s = connect(addr);
            s.write_all(b"hello").unwrap();
            if i % 2 == 1 {
                // Abortive close: RST instead of FIN.
                SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
            } else {
                s.shutdown(Shutdown::Write).unwrap();
            }
        }
    });
    // A connection reset while still in the backlog may never be reported (io_uring's
    // multishot accept learns the peer address afterwards, and a reset socket has none).
    srv.until_settled("every accepted connection to close", |s| {
        client.is_finished() && s.s.closed.len() == s.s.accepted.len()
    });
    join(client);
    // The ten that closed with a FIN are always accepted.
    assert!(
        srv.s.accepted.len() >= 10,
        "only {} accepted",
        srv.s.accepted.len()
    );
    let closed: HashSet<Token> = srv.s.closed.iter().map(|c| c.0).collect();
    assert_eq!(closed, srv.s.accepted.iter().copied().collect());
    for (token, reason) in &srv.s.closed {
        if reason.is_ok() {
            assert_eq!(srv.s.rx.get(token).map(Vec::as_slice), Some(&b"hello"[..]));
        }
    }
    srv.assert_clean();
}

/// Many connections that send and close at once: the data and the FIN (or RST) race the
/// receive that io_uring arms at accept, the case where a multishot receive can lose its EOF.
fn short_connections_all_close(b: Box<dyn Backend>) {
    const N: usize = 400;
    let mut srv = Server::new(b);
    let addr = srv.addr;
    let client = thread::spawn(move || {
        for i in 0..N {
            let mut s = connect(addr);
            s.write_all(b"hello").unwrap();
            if i % 4 == 3 {
                SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
            } else {
                s.shutdown(Shutdown::Write).unwrap();
            }
        }
    });
    srv.until_settled("every accepted connection to close", |s| {
        client.is_finished() && s.s.closed.len() == s.s.accepted.len()
    });
    join(client);
    // Those that closed with a FIN (three in four) are always accepted.
    assert!(
        srv.s.accepted.len() >= 3 * N / 4,
        "only {} of {N} accepted",
        srv.s.accepted.len()
    );
    for (token, reason) in &srv.s.closed {
        if reason.is_ok() {
            assert_eq!(srv.s.rx.get(token).map(Vec::as_slice), Some(&b"hello"[..]));
        }
    }
    srv.assert_clean();
}

fn close_from_worker_silences_token(b: Box<dyn Backend>) {
    let mut srv = Server::new(b);
    let addr = srv.addr;
    // A: streams at us until its writes fail (we close with its data unread: a reset).
    let writer = thread::spawn(move || {
        let mut s = connect(addr);
        let chunk = vec![7u8; 16 * 1024];
        let end = Instant::now() + LIMIT;
        while Instant::now() < end {
            if s.write_all(&chunk).is_err() {
                return true;
            }
        }
        false
    });
    srv.until("A's accept and data", |s| !s.s.rx.is_empty());
    let a = srv.s.accepted[0];
    srv.close(a);
    // B: we queue a large batch it does not read, then close with the send in flight.
    let go = Arc::new(AtomicBool::new(false));
    let go2 = go.clone();
    let reader = thread::spawn(move || {
        let mut s = connect(addr);
        while !go2.load(Ordering::Acquire) {
            thread::sleep(Duration::from_millis(1));
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(e.kind()), // a timeout: our fd was never closed
            }
        }
    });
    srv.until("B's accept", |s| s.s.accepted.len() == 2);
    let b_token = srv.s.accepted[1];
    let big = Bytes::from(vec![1u8; 8 << 20]);
    let mut batch: VecDeque<Bytes> = (0..8).map(|i| big.slice(i << 20..(i + 1) << 20)).collect();
    srv.b.send(b_token, &mut batch);
    srv.run_for(Duration::from_millis(50));
    srv.close(b_token);
    go.store(true, Ordering::Release);
    srv.run_for(Duration::from_millis(300));
    srv.until("both clients to finish", |_| {
        writer.is_finished() && reader.is_finished()
    });
    assert!(
        join(writer),
        "A's writes never failed: its connection was not closed"
    );
    assert_eq!(join(reader), Ok(()), "B never saw the close");
    assert!(
        srv.s.closed.is_empty(),
        "closed reported after close(): {:?}",
        srv.s.closed
    );
    assert!(srv.s.sent.is_empty(), "sent reported after close()");
    srv.assert_clean();
}

fn wakeup_interrupts_indefinite_poll(b: Box<dyn Backend>) {
    let mut srv = Server::new(b);
    let addr = srv.addr;
    let wakeup = srv.b.wakeup();
    // If a wake is lost, poll(None) would block forever: a watchdog connects after LIMIT,
    // which ends the poll and fails the test instead.
    let done = Arc::new(AtomicBool::new(false));
    let fired = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (done, fired) = (done.clone(), fired.clone());
        thread::spawn(move || {
            let end = Instant::now() + LIMIT;
            while Instant::now() < end {
                if done.load(Ordering::Acquire) {
                    return;
                }
                thread::sleep(Duration::from_millis(5));
            }
            fired.store(true, Ordering::Release);
            let _ = TcpStream::connect(addr);
        })
    };
    // A wake before the poll is not lost.
    wakeup.wake();
    srv.b.poll(None, &mut srv.s).unwrap();
    assert_eq!(srv.s.woken, 1);
    for round in 0..20 {
        let before = srv.s.woken;
        let w = wakeup.clone();
        let waker = thread::spawn(move || {
            thread::sleep(Duration::from_millis(2));
            for _ in 0..3 {
                w.wake();
            }
        });
        while srv.s.woken == before {
            srv.b.poll(None, &mut srv.s).unwrap();
            assert!(
                !fired.load(Ordering::Acquire),
                "round {round}: the wake never arrived"
            );
        }
        join(waker);
    }
    done.store(true, Ordering::Release);
    join(watchdog);
    srv.assert_clean();
}

fn wakes_coalesce(b: Box<dyn Backend>) {
    let mut srv = Server::new(b);
    let wakeup = srv.b.wakeup();
    join(thread::spawn(move || {
        for _ in 0..1000 {
            wakeup.wake();
        }
    }));
    srv.b
        .poll(Some(Duration::from_millis(500)), &mut srv.s)
        .unwrap();
    srv.b
        .poll(Some(Duration::from_millis(20)), &mut srv.s)
        .unwrap();
    assert_eq!(srv.s.woken, 1, "1000 wakes before a poll are one wake");
}

fn close_listeners_refuses_new_connections(b: Box<dyn Backend>) {
    let mut srv = Server::new(b);
    let addr = srv.addr;
    drop(connect(addr));
    srv.until("the first accept", |s| s.s.accepted.len() == 1);
    srv.b.close_listeners();
    srv.until("connection refused", |s| {
        s.tick();
        matches!(TcpStream::connect(s.addr), Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
    });
    srv.assert_clean();
}

fn refused_connection_is_closed(b: Box<dyn Backend>) {
    let mut srv = Server::new(b);
    srv.s.refuse = true;
    let addr = srv.addr;
    let client = thread::spawn(move || {
        let mut s = connect(addr);
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("expected EOF or reset from a refused connection, got {other:?}"),
        }
    });
    srv.until("the refused client", |_| client.is_finished());
    join(client);
    assert!(srv.s.accepted.is_empty() && srv.s.closed.is_empty());
}

// ---- probe ----

#[test]
fn probe_classifies_setup_errors() {
    let err = |n| io::Error::from_raw_os_error(n);
    assert!(matches!(
        probe::classify(err(libc::EPERM), Some(0)),
        Unavailable::Denied
    ));
    assert!(matches!(
        probe::classify(err(libc::EPERM), None),
        Unavailable::Denied
    ));
    assert!(matches!(
        probe::classify(err(libc::EPERM), Some(1)),
        Unavailable::Sysctl { value: 1 }
    ));
    assert!(matches!(
        probe::classify(err(libc::EPERM), Some(2)),
        Unavailable::Sysctl { value: 2 }
    ));
    assert!(matches!(
        probe::classify(err(libc::ENOSYS), Some(0)),
        Unavailable::NotImplemented
    ));
    assert!(matches!(
        probe::classify(err(libc::ENOMEM), Some(0)),
        Unavailable::MemoryLimit
    ));
    assert!(matches!(
        probe::classify(err(libc::EINVAL), Some(0)),
        Unavailable::Other(_)
    ));
    let msg = Unavailable::Sysctl { value: 1 }.to_string();
    assert!(
        msg.contains("io_uring_disabled = 1") && msg.contains("io_uring_group"),
        "{msg}"
    );
}

#[test]
fn choose_and_build() {
    let opts = BackendOptions::default();
    assert_eq!(
        probe::choose(BackendKind::Epoll, &opts).unwrap(),
        ResolvedKind::Epoll
    );
    let auto = probe::choose(BackendKind::Auto, &opts).unwrap();
    match probe::choose(BackendKind::IoUring, &opts) {
        Ok(kind) => assert_eq!((kind, auto), (ResolvedKind::IoUring, ResolvedKind::IoUring)),
        Err(e) => {
            eprintln!("io_uring unavailable here: {e}");
            assert_eq!(auto, ResolvedKind::Epoll);
        }
    }
    let backend = probe::new_backend(auto, &opts).unwrap();
    assert_eq!(backend.name(), auto.name());
}

#[test]
fn options_validation_names_the_field() {
    let bad = BackendOptions {
        buf_ring_count: 1000,
        ..BackendOptions::default()
    };
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("buf_ring_count"), "{err}");
    let bad = BackendOptions {
        cq_entries: 1024,
        ..BackendOptions::default()
    };
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("cq_entries")
    );
    BackendOptions::default().validate().unwrap();
}

/// The epoll connection record lives inline in the slab, 32 bytes (72 with the batch in
/// flight's queue and its total inline, held by every idle connection): a batch being
/// written is boxed, from a pool, only while it is in flight (see
/// [`an_idle_connection_holds_no_send_state`]).
#[test]
fn epoll_connection_record_is_compact() {
    // 32 in release builds: the stream's fd (4), the token (8), the boxed batch (8) and
    // six flags; the rest of a debug build's mio stream on top.
    let (record, stream) = EpollBackend::connection_record_bytes();
    let limit = (stream + 24).next_multiple_of(8);
    assert!(limit == 32 || stream > 4, "a 4-byte stream leaves 32 bytes");
    assert_record_at_most("epoll", record, limit);
}

/// Fails if a backend's per-connection record grew past `limit` bytes.
fn assert_record_at_most(backend: &str, record: usize, limit: usize) {
    assert!(
        record <= limit,
        "the {backend} connection record grew to {record} bytes"
    );
}

/// The io_uring connection record lives inline in the slab, 32 bytes, no larger than
/// epoll's (it was boxed, 200-odd bytes with a send's `msghdr` and iovec list, then 136
/// inline with the send queue and its counters, the stash and the single-shot buffer, then
/// 48 with twelve bools and a `u32` of cancellations, now bits of a `u16` and a `u16`
/// count): a batch being sent comes from a pool while it is in flight (see
/// [`an_idle_connection_holds_no_send_state`]), the stash and the single-shot buffer are
/// boxed apart.
#[test]
fn uring_connection_record_is_compact_and_send_vectors_are_pooled() {
    let uring = UringBackend::connection_record_bytes();
    assert_record_at_most("io_uring", uring, 32);
    let (epoll, _) = EpollBackend::connection_record_bytes();
    assert!(
        uring <= epoll,
        "the io_uring record ({uring} bytes) is larger than epoll's ({epoll})"
    );
    let opts = uring_opts(true);
    if let Err(e) = probe::probe_uring(&opts) {
        pabal_testkit::skip(format_args!("the io_uring variant: {e}"));
        return;
    }
    let mut srv = Server::new(Box::new(UringBackend::new(&opts).unwrap()));
    echo_and_hold_idle(&mut srv, |srv| {
        assert_eq!(srv.b.batches_pooled(), 1, "the batch went back to the pool");
    });
}

/// Echoes 3,000 bytes on one connection (vectored batches of three buffers), then, while
/// the connection is open and idle, runs `check`.
fn echo_and_hold_idle<B: Backend + ?Sized>(
    srv: &mut Server<B>,
    check: impl FnOnce(&mut Server<B>),
) {
    srv.s.echo = true;
    let addr = srv.addr;
    let (release, held) = std::sync::mpsc::channel::<()>();
    let client = thread::spawn(move || {
        let mut s = connect(addr);
        s.write_all(&pattern(5, 3000)).unwrap();
        let mut got = vec![0u8; 3000];
        s.read_exact(&mut got).unwrap();
        assert!(got == pattern(5, 3000), "echoed bytes differ");
        // Stays open, idle, until the server side has looked.
        let _ = held.recv();
    });
    srv.until("the echo, sent in full", |s| {
        s.s.accepted.len() == 1
            && s.s.in_flight.is_empty()
            && s.s.echoed.values().sum::<usize>() == 3000
            && s.s.sent.iter().map(|&(_, n)| n).sum::<usize>() == 3000
    });
    check(srv);
    release.send(()).unwrap();
    join(client);
    srv.until("the peer's close", |s| s.s.closed.len() == 1);
    srv.assert_clean();
}

/// A connection whose batches are written holds no send queue (nor io_uring's vectors):
/// the emptied queue goes to the backend's pool, and the next batch takes one from there.
fn an_idle_connection_holds_no_send_state(b: Box<dyn Backend>) {
    let mut srv = Server::new(b);
    echo_and_hold_idle(&mut srv, |srv| {
        let (held, pooled) = srv.b.idle_send_state();
        assert_eq!(held, 0, "an idle connection holds send state");
        assert_eq!(pooled, 1, "the emptied queue went back to the pool");
    });
}

/// Rings far too small for the load: the submission queue fills (submit and retry, then the
/// backlog) and the completion queue overflows (the kernel holds the overflow, NODROP).
#[test]
fn uring_tiny_rings() {
    let opts = BackendOptions {
        ring_entries: 4,
        cq_entries: 8,
        buf_ring_count: 8,
        buf_size: 1024,
        ..BackendOptions::default()
    };
    if let Err(e) = probe::probe_uring(&opts) {
        pabal_testkit::skip(format_args!("the io_uring variant: {e}"));
        return;
    }
    many_connections(Box::new(UringBackend::new(&opts).unwrap()));
    echo_1mib_random_chunks(Box::new(UringBackend::new(&opts).unwrap()));
    short_connections_all_close(Box::new(UringBackend::new(&opts).unwrap()));
}

/// Receives keep to a few provided buffers: 1,500 small receives, one at a time, leave at
/// most 16 pages of buffer memory resident (64 KiB, what epoll's one read buffer can
/// touch), not the whole ring. (The kernel takes posted buffers in ring order: with all
/// 1,024 posted, every one was written in turn, and a worker held 4 MiB of buffer memory
/// whatever its connections did; with a window of 64 posted, 64 pages, about 30 bytes of
/// RSS per idle phone at 10,000 more than epoll.)
#[test]
fn uring_receives_keep_to_a_few_provided_buffers() {
    const ROUNDS: u64 = 1500;
    let opts = BackendOptions {
        buf_ring_count: 1024,
        buf_size: 16 * 1024,
        ..uring_opts(true)
    };
    if let Err(e) = probe::probe_uring(&opts) {
        pabal_testkit::skip(format_args!("the io_uring variant: {e}"));
        return;
    }
    let mut srv = Server::new(Box::new(UringBackend::new(&opts).unwrap()));
    srv.s.echo = true;
    let addr = srv.addr;
    let client = thread::spawn(move || {
        let mut s = connect(addr);
        let mut got = [0u8; 8];
        for i in 0..ROUNDS {
            s.write_all(&i.to_le_bytes()).unwrap();
            s.read_exact(&mut got).unwrap();
            assert_eq!(got, i.to_le_bytes(), "echo {i}");
        }
    });
    srv.until("1,500 echoes", |_| client.is_finished());
    join(client);
    let calls: usize = srv.s.rx_calls.values().sum();
    assert!(calls >= ROUNDS as usize / 2, "only {calls} receives");
    let resident = srv
        .b
        .buffer_pages_resident()
        .expect("a provided-buffer ring");
    assert!(
        resident <= 16,
        "{resident} pages of provided buffers resident after {calls} small receives"
    );
    srv.assert_clean();
}

/// Accepting runs out of descriptors while clients wait in the backlog; once descriptors are
/// free again the backend accepts them by itself, without any new connection arriving to
/// raise an edge. Runs in a child process ([`in_child`]): it lowers the soft RLIMIT_NOFILE
/// and fills the descriptor table.
fn accept_retries_the_backlog_when_descriptors_return(b: Box<dyn Backend>) {
    const CLIENTS: usize = 4;
    let mut srv = Server::new(b);
    descriptors::set_soft_nofile(256).unwrap();
    let clients: Vec<TcpStream> = (0..CLIENTS).map(|_| connect(srv.addr)).collect();
    let mut filler = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => filler.push(f),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
            Err(e) => panic!("open /dev/null: {e}"),
        }
        assert!(filler.len() < 256, "the lowered limit did not take");
    }
    srv.until("an accept to fail with EMFILE", |s| {
        s.b.accept_stats().failures > 0
    });
    assert!(srv.s.accepted.is_empty(), "nothing can be accepted yet");
    drop(filler);
    srv.until("the clients in the backlog to be accepted", |s| {
        s.s.accepted.len() == CLIENTS
    });
    let stats = srv.b.accept_stats();
    assert_eq!(stats.pauses, 1, "one episode: {stats:?}");
    // The accepted connections work.
    for mut c in clients {
        c.write_all(b"x").unwrap();
    }
    srv.until("every client's byte", |s| {
        s.s.rx.values().map(Vec::len).sum::<usize>() == CLIENTS
    });
    srv.assert_clean();
}

/// epoll: a wakeup whose read fails (here a pipe's write end with the read end closed:
/// EPOLLERR, then EBADF on read) neither fails the poll nor drops the rest of its batch.
#[test]
fn epoll_failed_wakeup_read_keeps_the_batch() {
    let (reader, writer) = io::pipe().unwrap();
    drop(reader);
    let wakeup = Wakeup::from_fd(writer.into());
    let b = EpollBackend::with_wakeup(&BackendOptions::default(), wakeup).unwrap();
    let mut srv = Server::new(Box::new(b));
    let mut client = connect(srv.addr);
    client.write_all(b"hello").unwrap();
    srv.until("the client's bytes", |s| {
        s.s.rx.values().any(|v| v == b"hello")
    });
    assert!(srv.s.woken >= 1, "a failed read counts as a wake");
    srv.assert_clean();
}

/// Reads `expect.len()` bytes from `s` and checks them against `expect`.
fn read_and_check(s: &mut TcpStream, expect: &[u8]) {
    let mut got = vec![0u8; expect.len()];
    s.read_exact(&mut got).unwrap();
    assert!(got[..] == expect[..], "bytes differ");
}

/// A client thread on a [`slow_reader`] socket that reads not a byte until the returned
/// flag is set (the server has met the full buffer), then reads and checks `expect`.
fn gated_slow_reader(
    addr: std::net::SocketAddr,
    expect: Bytes,
) -> (Arc<AtomicBool>, thread::JoinHandle<()>) {
    let go = Arc::new(AtomicBool::new(false));
    let go_client = go.clone();
    let client = thread::spawn(move || {
        let mut s = slow_reader(addr);
        let deadline = Instant::now() + LIMIT;
        while !go_client.load(Ordering::Acquire) {
            assert!(
                Instant::now() < deadline,
                "the server never filled the socket"
            );
            thread::sleep(TICK);
        }
        read_and_check(&mut s, &expect);
    });
    (go, client)
}

/// A client socket with a small (64 KiB) receive buffer, so the server's sends fill the
/// socket quickly, connected to `addr`, reads timing out after [`LIMIT`].
fn slow_reader(addr: std::net::SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    socket.connect(&addr.into()).unwrap();
    let s: TcpStream = socket.into();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s
}
