//! The fan-out shapes `relay_fanout` and `relay_cluster` measure, and one phase of them:
//! publishers (devices, a window of unacknowledged publishes each, or open loop at a rate,
//! their schedules staggered evenly over the gap) and every subscriber socket read on one
//! poll, latency from each message's intended send time (no coordinated omission).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use mio::net::TcpStream as MioStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use pabal_codec::{Ack, ClientFrame, Decoder, Publish, ServerFrame};

/// A fan-out shape: who publishes where, who binds what.
pub struct Scenario {
    /// Its name in the table.
    pub name: &'static str,
    /// (publisher user, rooms it publishes to)
    pub publishers: Vec<(String, Vec<(bool, String)>)>,
    /// (subscriber user, rooms or channels it binds)
    pub subscribers: Vec<(String, Vec<(bool, String)>)>,
}

/// One publisher, one channel, 1,000 subscriber connections.
pub fn channel_1000() -> Scenario {
    let ch = (true, "bench:channel".to_string());
    Scenario {
        name: "channel-1000",
        publishers: vec![("brand".into(), vec![ch.clone()])],
        subscribers: (0..1000)
            .map(|i| (format!("s{i}"), vec![ch.clone()]))
            .collect(),
    }
}

/// 100 rooms of 100 members each (1,000 connections, each in about 10 rooms), 10
/// publishers.
pub fn rooms_100x100() -> Scenario {
    let mut subscribers: Vec<(String, Vec<(bool, String)>)> =
        (0..1000).map(|i| (format!("m{i}"), Vec::new())).collect();
    for room in 0..100 {
        for j in 0..100 {
            // 100 distinct members per room, each user in about 10 rooms.
            let user = (room * 7 + j * 10) % 1000;
            subscribers[user].1.push((false, format!("room:{room}")));
        }
    }
    let publishers = (0..10)
        .map(|p| {
            let rooms = (0..10)
                .map(|k| (false, format!("room:{}", p * 10 + k)))
                .collect();
            (format!("p{p}"), rooms)
        })
        .collect();
    Scenario {
        name: "rooms-100x100",
        publishers,
        subscribers,
    }
}

/// What one phase measured.
pub struct Outcome {
    /// Deliveries read by the subscribers while publishing.
    pub deliveries: u64,
    /// Deliveries read by the subscribers by the time the reader stopped (the phase and
    /// the half second after it): what the relay had accepted and delivered late.
    pub delivered_by_stop: u64,
    /// Reads that returned data, over the same span as `delivered_by_stop`.
    pub reads: u64,
    /// Messages published.
    pub messages: u64,
    /// The phase's length.
    pub secs: f64,
    /// Publish-to-delivery latency, µs, from each message's intended send time.
    pub latency: Histogram<u64>,
    /// CPU time the load generator's own threads (the publishers' and the reader) ran
    /// during the phase, ns (the kernel's schedstat): what the load took from the machine
    /// the relay shares.
    pub load_run_ns: u64,
}

/// Runs publishers and the reader for `secs`. `rate`: `None` saturates (a window of
/// unacknowledged publishes per publisher), `Some(r)` publishes `r` messages/s in total,
/// open loop.
pub fn run_phase(
    publishers: &mut [Publisher],
    readers: &mut [Reader],
    secs: f64,
    rate: Option<f64>,
    ack: bool,
) -> Outcome {
    run_phase_with(publishers, readers, secs, rate, ack, &mut || {})
}

/// [`run_phase`], calling `at_end` on the publishers' thread the moment publishing stops
/// (before the in-flight deliveries are let land): where a caller reads counters that
/// must cover the phase alone.
pub fn run_phase_with(
    publishers: &mut [Publisher],
    readers: &mut [Reader],
    secs: f64,
    rate: Option<f64>,
    ack: bool,
    at_end: &mut dyn FnMut(),
) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let deliveries = Arc::new(AtomicU64::new(0));
    let kind = if rate.is_some() { "paced" } else { "saturated" };
    phase_mark(kind, "start");
    let start = Instant::now();
    let (lat_tx, lat_rx) = std::sync::mpsc::channel();
    // The publishers run on this thread: on `PABAL_BENCH_LOAD_CPUS` for the phase, and so
    // is the reader it starts (`common::placement`).
    let _load = super::placement::pin_load_thread();
    let publishers_run_at_start = thread_run_ns();
    std::thread::scope(|scope| {
        // The reader: every subscriber socket on one poll.
        let stop_r = stop.clone();
        let deliveries_r = deliveries.clone();
        let reader = move || {
            let _load = super::placement::pin_load_thread();
            let run_at_start = thread_run_ns();
            let mut poll = Poll::new().unwrap();
            for (i, r) in readers.iter_mut().enumerate() {
                poll.registry()
                    .register(&mut r.stream, Token(i), Interest::READABLE)
                    .unwrap();
            }
            let decoder = Decoder::default();
            let mut events = Events::with_capacity(1024);
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let mut chunk = vec![0u8; 256 * 1024];
            let mut count = 0u64;
            let mut reads = 0u64;
            while !stop_r.load(Ordering::Relaxed) {
                match poll.poll(&mut events, Some(Duration::from_millis(50))) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    other => other.unwrap(),
                }
                for ev in &events {
                    let i = ev.token().0;
                    let reader = &mut readers[i];
                    // A closed socket stays quiet; what it delivered is counted.
                    let _closed = read_ready(
                        &mut reader.stream,
                        &mut chunk,
                        &mut reader.pending,
                        &mut reads,
                    );
                    let now = start.elapsed().as_nanos() as u64;
                    let mut got = false;
                    while let Some(frame) = decoder.decode_server(&mut reader.pending).unwrap() {
                        if let ServerFrame::Deliver(d) = frame {
                            let sent = u64::from_le_bytes(d.payload[..8].try_into().unwrap());
                            hist.record((now.saturating_sub(sent) / 1000).max(1))
                                .unwrap();
                            count += 1;
                            // Fresh rooms and no own messages: the n-th delivery is seq n.
                            let alias = d.header.alias as usize;
                            if reader.received.len() <= alias {
                                reader.received.resize(alias + 1, 0);
                            }
                            reader.received[alias] += 1;
                            got = true;
                        }
                    }
                    if ack && got {
                        reader.ack();
                    }
                }
                deliveries_r.store(count, Ordering::Relaxed);
            }
            lat_tx
                .send((hist, count, reads, thread_run_ns() - run_at_start))
                .unwrap();
        };
        // Named, so that `phase_counts` can tell it from the relay's threads.
        std::thread::Builder::new()
            .name("bench-reader".into())
            .spawn_scoped(scope, reader)
            .unwrap();
        // A panic below (a refused publish) must still stop the reader, or the scope waits
        // for it forever.
        let _stop_reader = StopOnDrop(&stop);
        // The publishers, on this thread.
        let window = 256u64;
        let mut in_flight = vec![0u64; publishers.len()];
        let mut next_msg = vec![0u64; publishers.len()];
        // A device never reuses a msg_id: the paced phase continues after the saturated one.
        let id_base = if rate.is_some() { 1 << 40 } else { 0 };
        // PUBACKs are read from the sockets the poll says are readable, not from every
        // publisher's socket each round: on a small machine the load generator's own system
        // calls take the core the relay under test needs.
        let mut acks = Poll::new().unwrap();
        for (p, publisher) in publishers.iter().enumerate() {
            publisher.stream.set_nonblocking(true).unwrap();
            acks.registry()
                .register(
                    &mut SourceFd(&publisher.stream.as_raw_fd()),
                    Token(p),
                    Interest::READABLE,
                )
                .unwrap();
        }
        let mut ack_events = Events::with_capacity(publishers.len().max(1));
        let decoder = Decoder::default();
        let mut published = 0u64;
        let mut out = BytesMut::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut ack_reads = 0u64;
        let per_pub_interval = rate.map(|r| 1e9 * publishers.len() as f64 / r);
        let publishers_n = publishers.len();
        while start.elapsed().as_secs_f64() < secs {
            let now = start.elapsed().as_nanos() as u64;
            for (p, publisher) in publishers.iter_mut().enumerate() {
                let aliases = &publisher.aliases;
                out.clear();
                loop {
                    let intended = match per_pub_interval {
                        None if in_flight[p] < window => now,
                        None => break,
                        Some(gap) => {
                            // Publisher p sends p/n of a gap after publisher 0: the paced
                            // rate is spread evenly, not a burst of every publisher at once
                            // (a burst of 12 went through Redis as one batch of 12 scripts,
                            // each message waiting for all of them).
                            let phase = p as f64 / publishers_n as f64;
                            let t = ((next_msg[p] as f64 + phase) * gap) as u64;
                            if t > now {
                                break;
                            }
                            t
                        }
                    };
                    let mut payload = [0u8; 32];
                    payload[..8].copy_from_slice(&intended.to_le_bytes());
                    let alias = aliases[(next_msg[p] % aliases.len() as u64) as usize];
                    next_msg[p] += 1;
                    ClientFrame::Publish(Publish {
                        alias,
                        msg_id: Some(id_base + next_msg[p]),
                        ack: None,
                        payload: Bytes::copy_from_slice(&payload),
                    })
                    .encode(&mut out);
                    in_flight[p] += 1;
                    published += 1;
                }
                if !out.is_empty() {
                    write_all_nonblocking(&mut publisher.stream, &out);
                }
            }
            // Wait for PUBACKs only where nothing is due before the next round: saturated,
            // every window full; paced, the round's sleep comes first.
            let all_full = rate.is_none() && in_flight.iter().all(|&n| n >= window);
            if rate.is_some() {
                std::thread::sleep(Duration::from_micros(200));
            }
            let wait = all_full.then_some(Duration::from_millis(1));
            match acks.poll(&mut ack_events, wait.or(Some(Duration::ZERO))) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                other => other.unwrap(),
            }
            for ev in &ack_events {
                let p = ev.token().0;
                let publisher = &mut publishers[p];
                if read_ready(
                    &mut publisher.stream,
                    &mut chunk,
                    &mut publisher.pending,
                    &mut ack_reads,
                ) {
                    panic!("publisher closed");
                }
                while let Some(frame) = decoder.decode_server(&mut publisher.pending).unwrap() {
                    match frame {
                        // A PUBACK of the phase before counts for nothing here.
                        ServerFrame::PubAck(_) => in_flight[p] = in_flight[p].saturating_sub(1),
                        ServerFrame::Error(e) => panic!("publish refused: {}", e.message),
                        _ => {}
                    }
                }
            }
        }
        let secs = start.elapsed().as_secs_f64();
        phase_mark(kind, "end");
        let read_at_end = deliveries.load(Ordering::Relaxed);
        let publishers_run = thread_run_ns() - publishers_run_at_start;
        at_end();
        // Let in-flight deliveries land so latency covers every message, then stop: until
        // the reader has counted nothing new for QUIET (at least 500 ms, at most DRAIN). A
        // broadcast saturated across nodes leaves seconds queued in the sockets, and a
        // phase started on that backlog would time the backlog.
        const QUIET: Duration = Duration::from_millis(300);
        const DRAIN: Duration = Duration::from_secs(30);
        let drain_start = Instant::now();
        std::thread::sleep(Duration::from_millis(200));
        let mut seen = deliveries.load(Ordering::Relaxed);
        loop {
            std::thread::sleep(QUIET);
            let now_seen = deliveries.load(Ordering::Relaxed);
            if now_seen == seen || drain_start.elapsed() >= DRAIN {
                break;
            }
            seen = now_seen;
        }
        stop.store(true, Ordering::Relaxed);
        let (latency, delivered_by_stop, reads, reader_run) = lat_rx.recv().unwrap();
        Outcome {
            deliveries: read_at_end,
            delivered_by_stop,
            reads,
            messages: published,
            secs,
            latency,
            load_run_ns: publishers_run + reader_run,
        }
    })
}

/// The calling thread's CPU time so far, ns (the first field of its schedstat).
fn thread_run_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Reads a socket the poll reported readable (edge-triggered) into `buf` until it is
/// drained: a short read means the kernel had no more, so no second call to hear
/// `WouldBlock`. Counts reads that returned data in `reads`; true when the peer closed.
fn read_ready(
    stream: &mut impl Read,
    chunk: &mut [u8],
    buf: &mut BytesMut,
    reads: &mut u64,
) -> bool {
    loop {
        match stream.read(chunk) {
            Ok(0) => return true,
            Ok(n) => {
                *reads += 1;
                buf.extend_from_slice(&chunk[..n]);
                if n < chunk.len() {
                    return false;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Writes all of `bytes` to a non-blocking socket: one `send` when the socket has room (the
/// usual case), and only when it is full, blocking for the rest.
fn write_all_nonblocking(stream: &mut TcpStream, bytes: &[u8]) {
    let mut at = 0;
    while at < bytes.len() {
        match stream.write(&bytes[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                stream.set_nonblocking(false).unwrap();
                stream.write_all(&bytes[at..]).unwrap();
                stream.set_nonblocking(true).unwrap();
                return;
            }
            Err(e) => panic!("publish write: {e}"),
        }
    }
}

/// With `PABAL_BENCH_PHASE_MARKS=1`, prints (stderr) `phase KIND EDGE monotonic_ns=N`: the
/// phase's edges on `CLOCK_MONOTONIC`, the clock `perf record -k CLOCK_MONOTONIC` stamps
/// its samples with, so a trace can be cut to one phase (`benches/scripts/uring_ticks.py`).
fn phase_mark(kind: &str, edge: &str) {
    if std::env::var_os("PABAL_BENCH_PHASE_MARKS").is_none() {
        return;
    }
    // SAFETY: an all-zero `timespec` is valid; `clock_gettime` writes only it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid `timespec` for the call to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    let ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    eprintln!("phase {kind} {edge} monotonic_ns={ns}");
}

/// Sets its flag when dropped, unwinding included.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A publisher's socket, the aliases it publishes to, and what it read of a PUBACK not yet
/// whole (kept from one phase to the next: a phase can end between two reads of a frame).
pub struct Publisher {
    /// The socket.
    pub stream: TcpStream,
    /// The aliases it publishes to, in turn.
    pub aliases: Vec<u32>,
    /// Bytes read and not yet decoded.
    pending: BytesMut,
}

impl Publisher {
    /// A device publishing to `aliases` over `stream`.
    pub fn new(stream: TcpStream, aliases: Vec<u32>) -> Publisher {
        Publisher {
            stream,
            aliases,
            pending: BytesMut::new(),
        }
    }
}

/// A subscriber's socket, what it got per alias, and what it acknowledged.
pub struct Reader {
    /// The socket.
    pub stream: MioStream,
    /// Messages received per alias.
    pub received: Vec<u64>,
    /// The last sequence acknowledged per alias.
    pub acked: Vec<u64>,
    /// Bytes of ACK frames not yet written (the socket was full).
    pub out: Vec<u8>,
    /// Bytes read and not yet decoded: kept from one phase to the next, since a phase can
    /// end between two reads of one frame (the next phase's first read then starts mid-frame).
    pending: BytesMut,
}

impl Reader {
    /// A subscriber `user` of `rooms` on the relay at `addr`, its socket non-blocking.
    pub fn connect(addr: SocketAddr, user: &str, rooms: &[(bool, String)]) -> Reader {
        let s = super::pabal_client(addr, user, rooms);
        s.set_nonblocking(true).unwrap();
        Reader {
            stream: MioStream::from_std(s),
            received: Vec::new(),
            acked: Vec::new(),
            out: Vec::new(),
            pending: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// One cumulative ACK of every alias that got messages since the last one.
    pub fn ack(&mut self) {
        self.acked.resize(self.received.len(), 0);
        let pairs: Vec<(u32, u64)> = (0..self.received.len())
            .filter(|&a| self.received[a] > self.acked[a])
            .map(|a| (a as u32, self.received[a]))
            .collect();
        if pairs.is_empty() {
            return;
        }
        for &(a, seq) in &pairs {
            self.acked[a as usize] = seq;
        }
        let mut frame = BytesMut::new();
        ClientFrame::Ack(Ack::from_pairs(&pairs)).encode(&mut frame);
        self.out.extend_from_slice(&frame);
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // The rest goes after the next read.
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("ack write: {e}"),
            }
        }
    }
}

/// A publisher's device id: fixed per user, so runs are repeatable.
pub fn device_of(user: &str) -> u64 {
    pabal_codec::room_id(false, user)
}
