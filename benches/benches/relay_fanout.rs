//! Relay fan-out throughput and latency, end to end over loopback TCP, for each I/O backend.
//!
//! Not a criterion bench: a server's deliveries per second are measured by running it, not by
//! timing a function. The relay runs in-process on one worker pinned to core 0; the load
//! (publishers and one reader thread for every subscriber socket) runs pinned to core 1, so
//! on a 2-core machine the relay has exactly one core.
//!
//! Scenarios (32-byte payloads carrying the intended send time):
//! - `channel-1000`: one publisher, one channel, 1,000 subscriber connections;
//! - `rooms-100x100`: 100 rooms of 100 members each (1,000 connections, each a member of
//!   about 10 rooms), 10 publishers.
//!
//! Each scenario runs twice: saturated (publishers keep a window of unacknowledged publishes
//! full) for the deliveries per second, then open-loop at half that message rate for the
//! latency percentiles, measured from each message's intended send time (no coordinated
//! omission).
//!
//! Publishers are devices (protocol v2, a device id in HELLO), so every publish carries a
//! publish id and the room's owner checks and records it: the cost of exactly-once publish
//! is in the figures. Their msg_ids keep counting across phases, as a device's do.
//!
//! Subscribers speak protocol v3 but by default acknowledge nothing, so no receipt work is
//! measured. With `PABAL_BENCH_ACK=1` each subscriber sends, after every batch it reads from
//! its socket, one cumulative ACK of every room it got messages in (as `pabal-client` does):
//! the relay then keeps delivered markers per (user, room) and sends RECEIPT updates to the
//! v3 subscribers (`receipts.interval`, 1 s), and the rows are marked `+ack`.
//!
//! `cargo bench -p pabal-benches --bench relay_fanout` (`PABAL_BENCH_SECS` sets each phase's
//! length, default 5; a scenario name as argument runs only that one;
//! `PABAL_BENCH_HANDOFF=1` turns the offline hand-off on, with a 1 s delay and an app server
//! that refuses every connection: no subscriber acks, so every member of every room is
//! handed off every window, the detection's worst case). Each backend runs in
//! a process of its own, so neither inherits the other's heap.

#![allow(clippy::unwrap_used)] // reason: a benchmark driver fails loudly

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use mio::net::TcpStream as MioStream;
use mio::{Events, Interest, Poll, Token};
use pabal_codec::{Ack, ClientFrame, Decoder, Publish, ServerFrame};
use pabal_relay::io::BackendKind;
use pabal_relay::runtime::RelayHandle;

struct Scenario {
    name: &'static str,
    /// (publisher user, rooms it publishes to)
    publishers: Vec<(String, Vec<(bool, String)>)>,
    /// (subscriber user, rooms or channels it binds)
    subscribers: Vec<(String, Vec<(bool, String)>)>,
}

fn channel_1000() -> Scenario {
    let ch = (true, "bench:channel".to_string());
    Scenario {
        name: "channel-1000",
        publishers: vec![("brand".into(), vec![ch.clone()])],
        subscribers: (0..1000)
            .map(|i| (format!("s{i}"), vec![ch.clone()]))
            .collect(),
    }
}

fn rooms_100x100() -> Scenario {
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

struct Outcome {
    deliveries: u64,
    messages: u64,
    secs: f64,
    latency: Histogram<u64>,
}

/// Runs publishers and the reader for `secs`. `rate`: `None` saturates (a window of
/// unacknowledged publishes per publisher), `Some(r)` publishes `r` messages/s in total,
/// open loop.
fn run_phase(
    publishers: &mut [(TcpStream, Vec<u32>)],
    readers: &mut [Reader],
    secs: f64,
    rate: Option<f64>,
    ack: bool,
) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let deliveries = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let (lat_tx, lat_rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        // The reader: every subscriber socket on one poll.
        let stop_r = stop.clone();
        let deliveries_r = deliveries.clone();
        scope.spawn(move || {
            let mut poll = Poll::new().unwrap();
            for (i, r) in readers.iter_mut().enumerate() {
                poll.registry()
                    .register(&mut r.stream, Token(i), Interest::READABLE)
                    .unwrap();
            }
            let mut bufs: Vec<BytesMut> = (0..readers.len())
                .map(|_| BytesMut::with_capacity(64 * 1024))
                .collect();
            let decoder = Decoder::default();
            let mut events = Events::with_capacity(1024);
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let mut chunk = vec![0u8; 256 * 1024];
            let mut count = 0u64;
            while !stop_r.load(Ordering::Relaxed) {
                match poll.poll(&mut events, Some(Duration::from_millis(50))) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    other => other.unwrap(),
                }
                for ev in &events {
                    let i = ev.token().0;
                    let reader = &mut readers[i];
                    loop {
                        match reader.stream.read(&mut chunk) {
                            Ok(0) => break,
                            Ok(n) => bufs[i].extend_from_slice(&chunk[..n]),
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(e) => panic!("read: {e}"),
                        }
                    }
                    let now = start.elapsed().as_nanos() as u64;
                    let mut got = false;
                    while let Some(frame) = decoder.decode_server(&mut bufs[i]).unwrap() {
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
            lat_tx.send(hist).unwrap();
        });
        // The publishers, on this thread.
        let window = 256u64;
        let mut in_flight = vec![0u64; publishers.len()];
        let mut next_msg = vec![0u64; publishers.len()];
        // A device never reuses a msg_id: the paced phase continues after the saturated one.
        let id_base = if rate.is_some() { 1 << 40 } else { 0 };
        let mut bufs: Vec<BytesMut> = publishers.iter().map(|_| BytesMut::new()).collect();
        for (s, _) in publishers.iter() {
            s.set_nonblocking(true).unwrap();
        }
        let decoder = Decoder::default();
        let mut published = 0u64;
        let mut out = BytesMut::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let per_pub_interval = rate.map(|r| 1e9 * publishers.len() as f64 / r);
        while start.elapsed().as_secs_f64() < secs {
            let now = start.elapsed().as_nanos() as u64;
            for (p, (stream, aliases)) in publishers.iter_mut().enumerate() {
                out.clear();
                loop {
                    let intended = match per_pub_interval {
                        None if in_flight[p] < window => now,
                        None => break,
                        Some(gap) => {
                            let t = (next_msg[p] as f64 * gap) as u64;
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
                    stream.set_nonblocking(false).unwrap();
                    stream.write_all(&out).unwrap();
                    stream.set_nonblocking(true).unwrap();
                }
                loop {
                    match stream.read(&mut chunk) {
                        Ok(0) => panic!("publisher closed"),
                        Ok(n) => bufs[p].extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => panic!("publisher read: {e}"),
                    }
                }
                while let Some(frame) = decoder.decode_server(&mut bufs[p]).unwrap() {
                    match frame {
                        ServerFrame::PubAck(_) => in_flight[p] -= 1,
                        ServerFrame::Error(e) => panic!("publish refused: {}", e.message),
                        _ => {}
                    }
                }
            }
            if rate.is_some() {
                std::thread::sleep(Duration::from_micros(200));
            } else {
                std::thread::yield_now();
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let at_end = deliveries.load(Ordering::Relaxed);
        // Let in-flight deliveries land so latency covers every message, then stop.
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let latency = lat_rx.recv().unwrap();
        Outcome {
            deliveries: at_end,
            messages: published,
            secs,
            latency,
        }
    })
}

/// A subscriber's socket, what it got per alias, and what it acknowledged.
struct Reader {
    stream: MioStream,
    /// Messages received per alias.
    received: Vec<u64>,
    /// The last sequence acknowledged per alias.
    acked: Vec<u64>,
    /// Bytes of ACK frames not yet written (the socket was full).
    out: Vec<u8>,
}

impl Reader {
    /// One cumulative ACK of every alias that got messages since the last one.
    fn ack(&mut self) {
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
fn device_of(user: &str) -> u64 {
    pabal_codec::room_id(false, user)
}

fn run(backend: BackendKind, scenario: &Scenario, secs: f64, ack: bool) {
    let mut config = common::relay_config(backend);
    config.limits.max_rooms_per_user = 100;
    if std::env::var_os("PABAL_BENCH_HANDOFF").is_some() {
        // The sender runs on the control thread. Port 9 (discard) on loopback: nothing
        // listens, every POST is retried.
        config.control.listen = "127.0.0.1:0".into();
        config.handoff.url = "http://127.0.0.1:9/hooks".into();
        config.handoff.secret = Some("bench-handoff-secret-0123".into());
        config.handoff.delay = Duration::from_secs(1);
    }
    let relay = RelayHandle::start(config).unwrap();
    let addr = relay.local_addr();
    if let Some(core) = core_affinity::get_core_ids().and_then(|ids| ids.get(1).copied()) {
        core_affinity::set_for_current(core);
    }
    let mut readers: Vec<Reader> = scenario
        .subscribers
        .iter()
        .map(|(user, rooms)| {
            let s = common::pabal_client(addr, user, rooms);
            s.set_nonblocking(true).unwrap();
            Reader {
                stream: MioStream::from_std(s),
                received: Vec::new(),
                acked: Vec::new(),
                out: Vec::new(),
            }
        })
        .collect();
    let mut publishers: Vec<(TcpStream, Vec<u32>)> = scenario
        .publishers
        .iter()
        .map(|(user, rooms)| {
            let s = common::pabal_device(addr, user, rooms, device_of(user));
            (s, (0..rooms.len() as u32).collect())
        })
        .collect();
    let saturated = run_phase(&mut publishers, &mut readers, secs, None, ack);
    let msg_rate = saturated.messages as f64 / saturated.secs;
    let paced = run_phase(
        &mut publishers,
        &mut readers,
        secs,
        Some(msg_rate / 2.0),
        ack,
    );
    let name = if ack {
        format!("{}+ack", scenario.name)
    } else {
        scenario.name.to_string()
    };
    let per_s = |o: &Outcome| o.deliveries as f64 / o.secs;
    let q = |o: &Outcome, p: f64| o.latency.value_at_quantile(p) as f64 / 1000.0;
    println!(
        "{:<9} {:<14} {:>12.0} {:>10.0} | {:>11.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
        relay.backend(),
        name,
        per_s(&saturated),
        msg_rate,
        per_s(&paced),
        q(&paced, 0.5),
        q(&paced, 0.99),
        q(&paced, 0.999),
        paced.latency.max() as f64 / 1000.0,
    );
    drop(readers);
    drop(publishers);
    relay.stop().unwrap();
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects scenarios by name.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let secs: f64 = std::env::var("PABAL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let ack = std::env::var("PABAL_BENCH_ACK").is_ok_and(|v| v == "1");
    let Some(backend) = common::child_backend() else {
        println!(
            "{:<9} {:<14} {:>12} {:>10} | {:>11} {:>8} {:>8} {:>8} {:>8}",
            "backend",
            "scenario",
            "deliv/s max",
            "msg/s max",
            "deliv/s@50%",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms"
        );
        common::run_each_backend_in_its_own_process(&filter.into_iter().collect::<Vec<_>>());
        return;
    };
    for scenario in [channel_1000(), rooms_100x100()] {
        if filter
            .as_deref()
            .is_some_and(|f| !scenario.name.contains(f))
        {
            continue;
        }
        run(backend, &scenario, secs, ack);
    }
}
