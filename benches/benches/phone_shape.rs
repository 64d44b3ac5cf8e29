//! The phone's shape beside the kernel's wall: many connections, each receiving one small
//! message now and then, through the relay and through a bare send loop, in one run.
//!
//! Not a criterion bench: a server's deliveries per second are measured by running it.
//!
//! # What runs where
//! - The relay runs in this process (`pin_workers`: worker `i` on core `i`).
//! - The clients run in a child process (this executable with `--phones-child`), pinned to
//!   the cores after the relay's (the last core on a 2-core machine), so each process stays
//!   under its descriptor limit: 10,000 phones are 10,000 descriptors on each side.
//! - The child holds `rooms x members` phone connections (phone `i` a member of room
//!   `i % rooms`, one room each) and, through the relay, one publisher per 10 rooms.
//!
//! # One trial (open loop, no coordinated omission)
//! Publish `k` of a trial is intended at `start + k * members / rate` and goes to room
//! `k % rooms`: every intended instant yields `members` deliveries, one per phone of the room,
//! so every phone receives one 32-byte message now and then. The payload carries the trial
//! and the intended send time (wall clock, shared by both processes); a phone's latency is
//! its arrival minus the intended time, so a sender that falls behind is charged for it. A
//! trial passes when every delivery arrived (zero loss) and p99 <= 50 ms.
//!
//! # The raw-send baseline
//! The same number of loopback sockets, held by this process (the relay's place, pinned to
//! core 0) and read by the same child: at each intended instant one `send(2)` of a DELIVER
//! frame of the relay's size to each of the room's `members` sockets, nothing else. It is
//! the kernel's wall for one send per delivery; relay/baseline is the share of it we reach.
//!
//! The max rate is searched (x1.5 up to the first failure, then bisected; a failed rate is
//! tried twice) for the relay on each backend and for the baseline, interleaved per round;
//! medians of the rounds. Each relay measurement runs in a process of its own (this
//! executable with `--relay-max`), so no backend measures on a heap another relay left.
//! The relay runs on the daemon's allocator (mimalloc, `relay/src/main.rs`).
//!
//! # CPU per delivery at a fixed rate (beside the max-rate ratio)
//! The max rate moves by a third from trial to trial on a shared VM; the work per delivery
//! does not. After its search, each measurement runs one more trial at
//! `PABAL_PHONE_CPU_RATE` deliveries/s (default 20,000, under every max seen; 0 skips it)
//! and reports the server's CPU time per delivery: the relay process's CPU time over the
//! trial (`CLOCK_PROCESS_CPUTIME_ID`: the worker, and io_uring's kernel workers if it punts
//! work to them; the rest of that process sleeps, and a relay waits in the kernel without
//! using CPU, so all of it is the relay's work: its loop, reads, routing and sends), and
//! for the baseline the sending thread's CPU time inside its send bursts
//! (`CLOCK_THREAD_CPUTIME_ID` before and after each; its sleeps and yields between instants
//! are not a server's work). baseline CPU / relay CPU is the share of the relay's CPU that
//! is the kernel's one send per delivery (1 = the relay adds nothing); it says what a
//! change to the relay's own work did, where the max-rate ratio (the figure)
//! cannot tell it from noise. The relay's process is pinned to core 0 with its worker:
//! started unpinned (its idle main thread free to run on the phones' core), the same relay
//! measured 9.9-13.0 us per delivery against 4.7-10.1 pinned on the 2-vCPU VM (load 7-10),
//! for a reason not yet found; compare figures taken the same way only.
//!
//! # Modes (`PABAL_PHONE_MODE`)
//! - `shape` (default): relay (io_uring, epoll) and baseline, `PABAL_PHONE_ROUNDS` rounds
//!   (default 3), shapes `PABAL_PHONE_SHAPES` (default `100x100`: 10,000 phones).
//! - `workers`: the relay's max rate at each worker count of `PABAL_WORKERS` (default `1,2`),
//!   with scaling efficiency against one worker.
//! - `storm`: a reconnect storm: `PABAL_STORM_THREADS` client threads (default 4) connect,
//!   bind a room and hang up as fast as they can for `PABAL_BENCH_SECS`, per worker count
//!   of `PABAL_WORKERS`: completed sessions per second.
//!
//! `cargo bench -p pabal-benches --bench phone_shape` (`PABAL_BENCH_SECS`: one trial's
//! length, default 2; `PABAL_PHONE_READERS`: the child's reader threads, default 1;
//! `PABAL_PHONE_RATE`: one trial at that rate instead of the search, to profile under load).
//! `benches/scripts/many_cores.sh` runs all modes at 1..16 workers on a large machine.

#![allow(clippy::unwrap_used)] // reason: a benchmark driver fails loudly

mod common;

/// The daemon's allocator: the relay in this process allocates as it does in production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use mio::net::TcpStream as MioStream;
use mio::{Events, Interest, Poll, Token};
use pabal_codec::{ClientFrame, Decoder, Deliver, DeliverHeader, Publish, ServerFrame};
use pabal_relay::io::BackendKind;
use pabal_relay::runtime::RelayHandle;

/// A trial passes with p99 at most this (microseconds).
const P99_LIMIT_US: u64 = 50_000;
/// Rooms per publisher connection.
const ROOMS_PER_PUBLISHER: usize = 10;
const PAYLOAD: usize = 32;

/// Wall-clock nanoseconds: the one clock both processes read.
fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// One trial's schedule, computed alike by both sides: `publishes` intended instants,
/// `gap_ns` apart from `start_ns`.
#[derive(Clone, Copy, Debug)]
struct Trial {
    id: u64,
    start_ns: u64,
    gap_ns: f64,
    publishes: u64,
}

impl Trial {
    fn new(id: u64, rate: f64, secs: f64, members: usize) -> Trial {
        let publish_rate = rate / members as f64;
        Trial {
            id,
            // Far enough ahead for the command to reach the child.
            start_ns: now_ns() + 50_000_000,
            gap_ns: 1e9 / publish_rate,
            publishes: (secs * publish_rate).max(1.0) as u64,
        }
    }

    fn intended(&self, k: u64) -> u64 {
        self.start_ns + (k as f64 * self.gap_ns) as u64
    }

    fn end_ns(&self) -> u64 {
        self.intended(self.publishes)
    }

    fn payload(&self, k: u64) -> [u8; PAYLOAD] {
        let mut p = [0u8; PAYLOAD];
        p[..8].copy_from_slice(&self.id.to_le_bytes());
        p[8..16].copy_from_slice(&self.intended(k).to_le_bytes());
        p
    }

    fn line(&self) -> String {
        format!(
            "trial {} {} {} {}\n",
            self.id, self.start_ns, self.gap_ns, self.publishes
        )
    }

    fn parse(line: &str) -> Trial {
        let f: Vec<&str> = line.split_whitespace().collect();
        Trial {
            id: f[1].parse().unwrap(),
            start_ns: f[2].parse().unwrap(),
            gap_ns: f[3].parse().unwrap(),
            publishes: f[4].parse().unwrap(),
        }
    }
}

/// Sleeps until the wall clock reaches `ns` (coarse sleep, then yield).
fn wait_until(ns: u64) {
    loop {
        let now = now_ns();
        if now >= ns {
            return;
        }
        let left = ns - now;
        if left > 300_000 {
            std::thread::sleep(Duration::from_nanos(left - 200_000));
        } else {
            std::thread::yield_now();
        }
    }
}

/// Where the CPUs this bench may use travel to its `--relay-max` children.
const CPUS_VAR: &str = "PABAL_PHONE_CPUS";

/// The CPUs this bench may use, in order: the mask the top-level process started with (a
/// `taskset` around the bench is kept), or `PABAL_PHONE_CPUS` in a `--relay-max` child,
/// which starts inside its parent's mask already narrowed to core 0. Every placement (the
/// relay's workers, the phones' readers, the baseline's sender) counts in this list, not
/// in the calling thread's current mask: counted there after a pin to core 0, the phones'
/// process went to core 0 with the server, and every worker with worker 0 (found in
/// session 20).
fn bench_cpus() -> &'static [usize] {
    static CPUS: OnceLock<Vec<usize>> = OnceLock::new();
    CPUS.get_or_init(|| match std::env::var(CPUS_VAR) {
        Ok(list) => common::placement::parse_cpus(CPUS_VAR, &list),
        Err(_) => {
            let cpus = common::placement::current_thread_cpus();
            if cpus.is_empty() { vec![0] } else { cpus }
        }
    })
}

/// Pins the calling thread to the `core`-th of [`bench_cpus`] (the last if there are fewer).
fn pin_to(core: usize) {
    let cpus = bench_cpus();
    let cpu = cpus[core.min(cpus.len() - 1)];
    common::placement::pin_current_thread(CPUS_VAR, &[cpu]);
}

// ---- the child: phones, publishers, readers ---------------------------------------------

/// What the child's reader threads share with its main thread.
struct Readers {
    trial: AtomicU64,
    received: AtomicU64,
    hists: Vec<Mutex<Histogram<u64>>>,
    stop: AtomicBool,
}

/// One reader thread: every socket in `socks` on one poll; counts DELIVERs of the current
/// trial and records their latency.
fn read_loop(mut socks: Vec<MioStream>, shared: &Readers, me: usize) {
    let mut poll = Poll::new().unwrap();
    for (i, s) in socks.iter_mut().enumerate() {
        poll.registry()
            .register(s, Token(i), Interest::READABLE)
            .unwrap();
    }
    let mut bufs: Vec<BytesMut> = socks.iter().map(|_| BytesMut::new()).collect();
    let decoder = Decoder::default();
    let mut events = Events::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    while !shared.stop.load(Ordering::Relaxed) {
        match poll.poll(&mut events, Some(Duration::from_millis(20))) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            other => other.unwrap(),
        }
        let trial = shared.trial.load(Ordering::Acquire);
        let mut hist = shared.hists[me].lock().unwrap();
        let mut got = 0;
        for ev in &events {
            let i = ev.token().0;
            loop {
                match socks[i].read(&mut chunk) {
                    Ok(0) => panic!("the server closed a phone"),
                    Ok(n) => bufs[i].extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => panic!("read: {e}"),
                }
            }
            let now = now_ns();
            while let Some(frame) = decoder.decode_server(&mut bufs[i]).unwrap() {
                match frame {
                    ServerFrame::Deliver(d) if d.payload.len() >= 16 => {
                        let id = u64::from_le_bytes(d.payload[..8].try_into().unwrap());
                        if id != trial {
                            continue;
                        }
                        let sent = u64::from_le_bytes(d.payload[8..16].try_into().unwrap());
                        hist.record((now.saturating_sub(sent) / 1000).max(1))
                            .unwrap();
                        got += 1;
                    }
                    ServerFrame::Error(e) => panic!("the relay refused: {}", e.message),
                    _ => {} // PUBACKs (publishers), PINGs
                }
            }
        }
        drop(hist);
        shared.received.fetch_add(got, Ordering::Relaxed);
    }
}

/// A publisher connection: the blocking stream the main thread writes (a clone of the one a
/// reader polls for PUBACKs) and the number of its rooms.
struct Publisher {
    stream: TcpStream,
    next_id: u64,
    out: BytesMut,
}

/// Publishes one trial's schedule: at each intended instant one message to room `k % rooms`.
fn publish_trial(publishers: &mut [Publisher], trial: &Trial, rooms: usize) {
    let mut k = 0;
    while k < trial.publishes {
        wait_until(trial.intended(k));
        let now = now_ns();
        while k < trial.publishes && trial.intended(k) <= now {
            let room = (k % rooms as u64) as usize;
            let count = publishers.len();
            let p = &mut publishers[room % count];
            p.next_id += 1;
            ClientFrame::Publish(Publish {
                alias: (room / count) as u32,
                msg_id: Some(p.next_id),
                ack: None,
                payload: Bytes::copy_from_slice(&trial.payload(k)),
            })
            .encode(&mut p.out);
            k += 1;
        }
        for p in publishers.iter_mut() {
            let mut off = 0;
            while off < p.out.len() {
                match p.stream.write(&p.out[off..]) {
                    Ok(n) => off += n,
                    Err(e)
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) =>
                    {
                        std::thread::yield_now();
                    }
                    Err(e) => panic!("publisher write: {e}"),
                }
            }
            p.out.clear();
        }
    }
}

/// `--phones-child MODE ADDR ROOMS MEMBERS READERS`: MODE `relay` (pabal phones plus
/// publishers) or `raw` (bare sockets the parent sends to). Then one `trial ...` line per
/// trial on stdin, answered with `result RECEIVED P99_US MAX_US`.
fn child(args: &[String]) {
    let mode = args[0].as_str();
    let addr: SocketAddr = args[1].parse().unwrap();
    let rooms: usize = args[2].parse().unwrap();
    let members: usize = args[3].parse().unwrap();
    let readers: usize = args[4].parse().unwrap();
    let phones = rooms * members;
    let mut socks: Vec<MioStream> = Vec::with_capacity(phones + rooms);
    for i in 0..phones {
        let s = if mode == "relay" {
            let room = (false, format!("room:{}", i % rooms));
            common::pabal_client(addr, &format!("phone{i}"), &[room])
        } else {
            TcpStream::connect(addr).unwrap()
        };
        s.set_nonblocking(true).unwrap();
        socks.push(MioStream::from_std(s));
    }
    let mut publishers = Vec::new();
    if mode == "relay" {
        let count = rooms.div_ceil(ROOMS_PER_PUBLISHER);
        for p in 0..count {
            let bound: Vec<(bool, String)> = (p..rooms)
                .step_by(count)
                .map(|r| (false, format!("room:{r}")))
                .collect();
            let s = common::pabal_client(addr, &format!("publisher{p}"), &bound);
            s.set_nonblocking(true).unwrap();
            publishers.push(Publisher {
                stream: s.try_clone().unwrap(),
                next_id: 0,
                out: BytesMut::new(),
            });
            socks.push(MioStream::from_std(s));
        }
    }
    let shared = Arc::new(Readers {
        trial: AtomicU64::new(0),
        received: AtomicU64::new(0),
        hists: (0..readers)
            .map(|_| Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()))
            .collect(),
        stop: AtomicBool::new(false),
    });
    let mut shares: Vec<Vec<MioStream>> = (0..readers).map(|_| Vec::new()).collect();
    for (i, s) in socks.into_iter().enumerate() {
        shares[i % readers].push(s);
    }
    let threads: Vec<_> = shares
        .into_iter()
        .enumerate()
        .map(|(me, socks)| {
            let shared = shared.clone();
            std::thread::spawn(move || read_loop(socks, &shared, me))
        })
        .collect();
    println!("ready");
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        if !line.starts_with("trial") {
            break;
        }
        let trial = Trial::parse(&line);
        for h in &shared.hists {
            h.lock().unwrap().reset();
        }
        shared.received.store(0, Ordering::Relaxed);
        shared.trial.store(trial.id, Ordering::Release);
        if mode == "relay" {
            publish_trial(&mut publishers, &trial, rooms);
        }
        // Wait for the stragglers: until all arrived, or no progress for a second.
        let expected = trial.publishes * members as u64;
        wait_until(trial.end_ns());
        let mut last = (shared.received.load(Ordering::Relaxed), Instant::now());
        loop {
            let got = shared.received.load(Ordering::Relaxed);
            if got >= expected {
                break;
            }
            if got != last.0 {
                last = (got, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(1) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        shared.trial.store(0, Ordering::Release);
        let mut merged = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
        for h in &shared.hists {
            merged.add(&*h.lock().unwrap()).unwrap();
        }
        println!(
            "result {} {} {}",
            shared.received.load(Ordering::Relaxed),
            merged.value_at_quantile(0.99),
            merged.max()
        );
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
}

/// The parent's handle on a child.
struct ChildLink {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ChildLink {
    fn spawn(mode: &str, addr: SocketAddr, rooms: usize, members: usize, core: usize) -> Self {
        let readers: usize = env_or("PABAL_PHONE_READERS", 1);
        let cpus = bench_cpus();
        let first = core.min(cpus.len() - 1);
        let last = (first + readers - 1).min(cpus.len() - 1);
        let mut child = Command::new("taskset")
            .args(["-c", &common::placement::cpu_text(&cpus[first..=last])])
            .arg(std::env::current_exe().unwrap())
            .args(["--phones-child", mode, &addr.to_string()])
            .args([rooms.to_string(), members.to_string(), readers.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        ChildLink {
            child,
            stdin,
            stdout,
        }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the phones child exited");
        line
    }

    fn wait_ready(&mut self) {
        assert_eq!(self.line().trim(), "ready");
    }

    fn start(&mut self, trial: &Trial) {
        self.stdin.write_all(trial.line().as_bytes()).unwrap();
        self.stdin.flush().unwrap();
    }

    /// (received, p99 µs, max µs)
    fn result(&mut self) -> (u64, u64, u64) {
        let line = self.line();
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap())
            .collect();
        (f[0], f[1], f[2])
    }

    fn finish(mut self) {
        let _ = self.stdin.write_all(b"quit\n");
        drop(self.stdin);
        self.child.wait().unwrap();
    }
}

// ---- the parent -------------------------------------------------------------------------

/// What one trial showed.
#[derive(Clone, Copy, Debug)]
struct Outcome {
    rate: f64,
    p99_us: u64,
    lost: u64,
}

/// The rate (deliveries/s) of the trial that measures CPU per delivery; 0 skips it.
fn cpu_rate() -> f64 {
    env_or("PABAL_PHONE_CPU_RATE", 20_000.0)
}

impl Outcome {
    fn passed(&self) -> bool {
        self.lost == 0 && self.p99_us <= P99_LIMIT_US
    }
}

/// CPU time so far on `clock` (`CLOCK_THREAD_CPUTIME_ID`, `CLOCK_PROCESS_CPUTIME_ID`),
/// nanoseconds. The kernel brings a running task's count up to date for these clocks (a
/// task's `schedstat` lags until its next tick or switch: too coarse for one burst).
fn cpu_clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime({clock})");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Searches the max rate (deliveries/s) that `trial` passes: x1.5 from `start` up to the
/// first failure (or /1.5 down to the first pass), then bisected.
/// With `PABAL_PHONE_RATE` set, runs that one rate instead (for profiling at a fixed load).
///
/// A rate that fails is tried once more before it counts as failed (for the relay and the
/// baseline alike): on a machine shared with other work one stall fails a trial.
fn search(start: f64, mut trial_once: impl FnMut(f64) -> Outcome) -> Outcome {
    let mut trial = |rate| {
        let o = trial_once(rate);
        if o.passed() { o } else { trial_once(rate) }
    };
    if let Some(rate) = std::env::var("PABAL_PHONE_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
    {
        return trial(rate);
    }
    let mut first = trial(start);
    let (mut pass, mut fail) = if first.passed() {
        let mut pass = first;
        loop {
            let o = trial(pass.rate * 1.5);
            if !o.passed() {
                break (pass, o.rate);
            }
            pass = o;
        }
    } else {
        loop {
            let rate = first.rate / 1.5;
            let o = trial(rate);
            if o.passed() || rate < 100.0 {
                break (o, first.rate);
            }
            first = o;
        }
    };
    for _ in 0..4 {
        let o = trial((pass.rate + fail) / 2.0);
        if o.passed() {
            pass = o;
        } else {
            fail = o.rate;
        }
    }
    pass
}

fn next_trial_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn trial_secs() -> f64 {
    env_or("PABAL_BENCH_SECS", 2.0)
}

/// The relay's max rate at the shape, with `workers` workers, and its worker's CPU
/// nanoseconds per delivery at [`cpu_rate`] (one worker's; 0 when skipped).
fn relay_max(
    backend: BackendKind,
    workers: usize,
    rooms: usize,
    members: usize,
    start: f64,
) -> (Outcome, &'static str, f64) {
    let mut config = common::relay_config(backend);
    config.workers = workers;
    // The workers take the first `workers` CPUs of this thread's mask, so it must hold all
    // of them: a mask inherited from a pinned parent (core 0 alone) put every worker on
    // core 0 (session 20's 16-core run: 1 to 8 workers all at one core's rate). Then this
    // thread joins worker 0's core.
    common::placement::pin_current_thread(CPUS_VAR, bench_cpus());
    let relay = RelayHandle::start(config).unwrap();
    pin_to(0);
    let name = relay.backend();
    let mut link = ChildLink::spawn("relay", relay.local_addr(), rooms, members, workers);
    link.wait_ready();
    let secs = trial_secs();
    let best = search(start, |rate| {
        let trial = Trial::new(next_trial_id(), rate, secs, members);
        link.start(&trial);
        let (received, p99_us, _) = link.result();
        let expected = trial.publishes * members as u64;
        Outcome {
            rate,
            p99_us,
            lost: expected.saturating_sub(received),
        }
    });
    let mut cpu = 0.0;
    if cpu_rate() > 0.0 && workers == 1 {
        let trial = Trial::new(next_trial_id(), cpu_rate(), secs, members);
        // The whole process: the worker, and io_uring's kernel workers where it punts work.
        let before = cpu_clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID);
        link.start(&trial);
        let (received, _, _) = link.result();
        let used = cpu_clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID) - before;
        cpu = used as f64 / received.max(1) as f64;
    }
    link.finish();
    relay.stop().unwrap();
    (best, name, cpu)
}

/// [`relay_max`] in a process of its own (this executable with `--relay-max`): a relay
/// started after another in the same process measures on the heap the first one left
/// behind, so each measurement gets a fresh process, as the other server benches do.
fn relay_max_isolated(
    backend: BackendKind,
    workers: usize,
    rooms: usize,
    members: usize,
    start: f64,
) -> (Outcome, String, f64) {
    let name = match backend {
        BackendKind::Epoll => "epoll",
        _ => "io_uring",
    };
    let out = Command::new(std::env::current_exe().unwrap())
        .env(CPUS_VAR, common::placement::cpu_text(bench_cpus()))
        .args(["--relay-max", name])
        .args([workers, rooms, members].map(|n| n.to_string()))
        .arg(start.to_string())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "the {name} measurement failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("relay-max: "))
        .expect("the child's result line");
    let f: Vec<&str> = line.split_whitespace().collect();
    let outcome = Outcome {
        rate: f[0].parse().unwrap(),
        p99_us: f[1].parse().unwrap(),
        lost: f[2].parse().unwrap(),
    };
    (outcome, f[3].to_string(), f[4].parse().unwrap())
}

/// The child side of [`relay_max_isolated`]: `--relay-max BACKEND WORKERS ROOMS MEMBERS START`.
/// Worker `i` runs on core `i` (core 0 the baseline's), whoever started the process and on
/// whatever cores; the rest of the process runs on core 0 with worker 0 ([`relay_max`]).
fn relay_max_child(args: &[String]) {
    let backend = if args[0] == "epoll" {
        BackendKind::Epoll
    } else {
        BackendKind::IoUring
    };
    let n = |i: usize| -> usize { args[i].parse().unwrap() };
    let (o, name, cpu) = relay_max(backend, n(1), n(2), n(3), args[4].parse().unwrap());
    println!("relay-max: {} {} {} {name} {cpu}", o.rate, o.p99_us, o.lost);
}

/// A DELIVER frame as the relay sends it to a phone (steady state: next in sequence, a
/// known sender), carrying `payload`.
fn deliver_frame(payload: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    ServerFrame::Deliver(Deliver {
        header: DeliverHeader {
            alias: 0,
            seq: None,
            ephemeral: false,
            sender_alias: 1,
            new_sender: None,
            ts_delta_ms: 0,
        },
        payload: Bytes::copy_from_slice(payload),
    })
    .encode(&mut out);
    out
}

/// The raw-send baseline's max rate: this thread (on core 0) sends, the child reads. With
/// it, the sending thread's CPU nanoseconds per delivery inside its send bursts at
/// [`cpu_rate`] (0 when skipped).
fn baseline_max(rooms: usize, members: usize, start: f64) -> (Outcome, f64) {
    pin_to(0);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut link = ChildLink::spawn("raw", listener.local_addr().unwrap(), rooms, members, 1);
    let socks: Vec<TcpStream> = (0..rooms * members)
        .map(|_| {
            let (s, _) = listener.accept().unwrap();
            s.set_nodelay(true).unwrap();
            s
        })
        .collect();
    link.wait_ready();
    let secs = trial_secs();
    // One trial at `rate`: its outcome and the CPU time spent in its send bursts.
    let mut trial_at = |rate| {
        let trial = Trial::new(next_trial_id(), rate, secs, members);
        link.start(&trial);
        let mut k = 0;
        let mut cpu_ns = 0;
        while k < trial.publishes {
            wait_until(trial.intended(k));
            let burst = cpu_clock_ns(libc::CLOCK_THREAD_CPUTIME_ID);
            let now = now_ns();
            while k < trial.publishes && trial.intended(k) <= now {
                let frame = deliver_frame(&trial.payload(k));
                let room = (k % rooms as u64) as usize;
                for m in 0..members {
                    (&socks[room + m * rooms]).write_all(&frame).unwrap();
                }
                k += 1;
            }
            cpu_ns += cpu_clock_ns(libc::CLOCK_THREAD_CPUTIME_ID) - burst;
        }
        let (received, p99_us, _) = link.result();
        let outcome = Outcome {
            rate,
            p99_us,
            lost: (trial.publishes * members as u64).saturating_sub(received),
        };
        (outcome, cpu_ns as f64 / received.max(1) as f64)
    };
    let best = search(start, |rate| trial_at(rate).0);
    let cpu = if cpu_rate() > 0.0 {
        trial_at(cpu_rate()).1
    } else {
        0.0
    };
    link.finish();
    (best, cpu)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn shape(spec: &str) -> (usize, usize) {
    let (r, m) = spec.split_once('x').expect("a shape is ROOMSxMEMBERS");
    (r.parse().unwrap(), m.parse().unwrap())
}

fn show(o: &Outcome) -> String {
    format!("{:.0} (p99 {:.1} ms)", o.rate, o.p99_us as f64 / 1000.0)
}

fn mode_shape() {
    let rounds: usize = env_or("PABAL_PHONE_ROUNDS", 3);
    let backends = pabal_testkit::backends();
    for spec in env_list("PABAL_PHONE_SHAPES", "100x100") {
        let (rooms, members) = shape(&spec);
        println!(
            "shape {spec}: {} phones, one room each, {PAYLOAD} B payloads, p99 <= 50 ms, zero loss",
            rooms * members
        );
        let mut base_rates = Vec::new();
        let mut base_cpus = Vec::new();
        let mut relay_rates: Vec<Vec<f64>> = backends.iter().map(|_| Vec::new()).collect();
        let mut ratios: Vec<Vec<f64>> = backends.iter().map(|_| Vec::new()).collect();
        let mut cpus: Vec<Vec<f64>> = backends.iter().map(|_| Vec::new()).collect();
        let mut cpu_ratios: Vec<Vec<f64>> = backends.iter().map(|_| Vec::new()).collect();
        let mut names = vec![String::new(); backends.len()];
        // `PABAL_PHONE_CPU_RATE=0` skips the CPU trial: print no CPU figures then.
        let cpu_measured = cpu_rate() > 0.0;
        let mut start = 20_000.0;
        for round in 1..=rounds {
            let (base, base_cpu) = baseline_max(rooms, members, start);
            start = base.rate * 0.8;
            let mut line = format!("  round {round}: baseline {}", show(&base));
            if cpu_measured {
                line += &format!(", {:.2} us/delivery", base_cpu / 1000.0);
            }
            base_rates.push(base.rate);
            base_cpus.push(base_cpu);
            for (b, &backend) in backends.iter().enumerate() {
                let (o, name, cpu) = relay_max_isolated(backend, 1, rooms, members, start);
                line += &format!("; {name} {} = {:.2}", show(&o), o.rate / base.rate);
                if cpu_measured {
                    line += &format!(", {:.2} us/delivery = {:.2}", cpu / 1000.0, base_cpu / cpu);
                }
                names[b] = name;
                relay_rates[b].push(o.rate);
                ratios[b].push(o.rate / base.rate);
                cpus[b].push(cpu);
                cpu_ratios[b].push(base_cpu / cpu);
            }
            println!("{line}");
        }
        let mut line = format!("  median baseline {:.0} deliveries/s", median(base_rates));
        if cpu_measured {
            line += &format!(
                "; CPU per delivery at {:.0}/s: {:.2} us",
                cpu_rate(),
                median(base_cpus) / 1000.0
            );
        }
        println!("{line}");
        for b in 0..backends.len() {
            let mut line = format!(
                "  median {:<9} {:.0} deliveries/s, relay/baseline {:.2}",
                names[b],
                median(relay_rates[b].clone()),
                median(ratios[b].clone())
            );
            if cpu_measured {
                line += &format!(
                    "; CPU per delivery {:.2} us, baseline/relay {:.2}",
                    median(cpus[b].clone()) / 1000.0,
                    median(cpu_ratios[b].clone())
                );
            }
            println!("{line}");
        }
    }
}

fn worker_counts() -> Vec<usize> {
    env_list("PABAL_WORKERS", "1,2")
        .iter()
        .map(|w| w.parse().unwrap())
        .collect()
}

fn mode_workers() {
    let (rooms, members) = shape(&env_list("PABAL_PHONE_SHAPES", "100x100")[0]);
    for backend in pabal_testkit::backends() {
        let mut one = None;
        let mut start = 20_000.0;
        for workers in worker_counts() {
            let (o, name, _) = relay_max_isolated(backend, workers, rooms, members, start);
            start = o.rate;
            let base = *one.get_or_insert(o.rate / workers as f64);
            println!(
                "{name:<9} {workers:>2} workers: {} deliveries/s, scaling efficiency {:.2}",
                show(&o),
                o.rate / (base * workers as f64)
            );
        }
    }
}

/// Storm client: connect, bind a room, hang up, until `stop`; returns sessions completed.
fn storm_thread(addr: SocketAddr, me: usize, stop: &AtomicBool) -> u64 {
    let mut done = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let user = format!("storm{me}-{done}");
        let s = common::pabal_client(addr, &user, &[(false, format!("room:{}", done % 100))]);
        drop(s);
        done += 1;
    }
    done
}

fn mode_storm() {
    let threads: usize = env_or("PABAL_STORM_THREADS", 4);
    let secs = trial_secs().max(3.0);
    // Each backend's relays in a process of their own (the mode travels in the environment).
    let Some(backend) = common::child_backend() else {
        common::run_each_backend_in_its_own_process(&[]);
        return;
    };
    {
        for workers in worker_counts() {
            let mut config = common::relay_config(backend);
            config.workers = workers;
            let relay = RelayHandle::start(config).unwrap();
            let addr = relay.local_addr();
            let stop = AtomicBool::new(false);
            let started = Instant::now();
            let total: u64 = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..threads)
                    .map(|me| {
                        let stop = &stop;
                        scope.spawn(move || storm_thread(addr, me, stop))
                    })
                    .collect();
                std::thread::sleep(Duration::from_secs_f64(secs));
                stop.store(true, Ordering::Relaxed);
                handles.into_iter().map(|h| h.join().unwrap()).sum()
            });
            let elapsed = started.elapsed().as_secs_f64();
            println!(
                "{:<9} {workers:>2} workers, {threads} client threads: {:.0} sessions/s (connect, HELLO, join, hang up)",
                relay.backend(),
                total as f64 / elapsed
            );
            relay.stop().unwrap();
        }
    }
}

fn main() {
    // Before anything pins a thread: the CPUs this bench may use.
    bench_cpus();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--phones-child") {
        return child(&args[i + 1..]);
    }
    if let Some(i) = args.iter().position(|a| a == "--relay-max") {
        return relay_max_child(&args[i + 1..]);
    }
    match std::env::var("PABAL_PHONE_MODE")
        .as_deref()
        .unwrap_or("shape")
    {
        "workers" => mode_workers(),
        "storm" => mode_storm(),
        _ => mode_shape(),
    }
}
