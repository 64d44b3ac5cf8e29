//! Fan-out side by side with established brokers on the same machine: one publisher, 1,000
//! subscribers of one channel/topic, 32-byte payloads, for pabal (one worker), Mosquitto
//! (single-threaded by design) and NATS (`GOMAXPROCS=1`). Each server is pinned to core 0;
//! the same load driver (one publisher, one reader thread for all 1,000 sockets) is pinned
//! to core 1. Brokers that are not installed are skipped (`apt-get install mosquitto
//! nats-server`).
//!
//! Flow control is alike for all: the publisher keeps at most 256 messages unconfirmed
//! (pabal: PUBACK; MQTT: publish at QoS 1, PUBACK; NATS: a PING after every 256 PUBs, waiting
//! for the PONG). Subscribers take QoS 0 / no acks, as pabal's deliveries. Reported: deliveries
//! per second and bytes received per delivery.
//!
//! `cargo bench -p pabal-benches --bench broker_compare` (`PABAL_BENCH_SECS`, default 5).

#![allow(clippy::unwrap_used)] // reason: a benchmark driver fails loudly

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use mio::net::TcpStream as MioStream;
use mio::{Events, Interest, Poll, Token};
use pabal_codec::{ClientFrame, Decoder, Publish, ServerFrame};
use pabal_relay::runtime::RelayHandle;

const SUBSCRIBERS: usize = 1000;
const WINDOW: usize = 256;
const TOPIC: &str = "bench/channel";

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    Pabal,
    Mqtt,
    Nats,
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

use common::read_some;

// ---- MQTT 3.1.1, just enough ----------------------------------------------------------

fn mqtt_varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn mqtt_packet(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    mqtt_varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

fn mqtt_str(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Splits one MQTT packet off the buffer: (first byte, body).
fn mqtt_next(buf: &mut BytesMut) -> Option<(u8, Bytes)> {
    let mut len = 0usize;
    let mut mult = 1usize;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        len += (b & 0x7f) as usize * mult;
        mult *= 128;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    if buf.len() < i + len {
        return None;
    }
    let mut packet = buf.split_to(i + len);
    let first = packet[0];
    packet.advance(i);
    Some((first, packet.freeze()))
}

fn mqtt_connect(addr: SocketAddr, id: &str, subscribe: bool) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let mut body = Vec::new();
    mqtt_str("MQTT", &mut body);
    body.extend_from_slice(&[4, 0x02, 0, 60]); // v3.1.1, clean session, keepalive 60
    mqtt_str(id, &mut body);
    s.write_all(&mqtt_packet(0x10, &body)).unwrap();
    let mut buf = BytesMut::new();
    while mqtt_next(&mut buf).is_none() {
        read_some(&mut s, &mut buf);
    }
    if subscribe {
        let mut body = vec![0, 1];
        mqtt_str(TOPIC, &mut body);
        body.push(0); // QoS 0
        s.write_all(&mqtt_packet(0x82, &body)).unwrap();
        while mqtt_next(&mut buf).is_none() {
            read_some(&mut s, &mut buf);
        }
    }
    s
}

// ---- NATS, just enough ------------------------------------------------------------------

fn nats_connect(addr: SocketAddr, subscribe: bool) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let mut buf = BytesMut::new();
    while !buf.windows(2).any(|w| w == b"\r\n") {
        read_some(&mut s, &mut buf); // INFO
    }
    s.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")
        .unwrap();
    if subscribe {
        s.write_all(format!("SUB {TOPIC} 1\r\n").as_bytes())
            .unwrap();
    }
    s.write_all(b"PING\r\n").unwrap();
    let mut buf = BytesMut::new();
    while !buf.windows(6).any(|w| w == b"PONG\r\n") {
        read_some(&mut s, &mut buf);
    }
    s
}

/// Counts NATS MSG deliveries in the buffer, consuming whole messages.
fn nats_count(buf: &mut BytesMut) -> u64 {
    let mut n = 0;
    loop {
        let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
            return n;
        };
        let line = std::str::from_utf8(&buf[..eol]).unwrap_or("");
        if let Some(rest) = line.strip_prefix("MSG ") {
            let size: usize = rest.rsplit(' ').next().unwrap().parse().unwrap();
            if buf.len() < eol + 2 + size + 2 {
                return n;
            }
            buf.advance(eol + 2 + size + 2);
            n += 1;
        } else {
            buf.advance(eol + 2); // PING/+OK/INFO
        }
    }
}

// ---- pabal -----------------------------------------------------------------------------

fn pabal_connect(addr: SocketAddr, user: &str) -> TcpStream {
    common::pabal_client(addr, user, &[(true, TOPIC.to_string())])
}

/// One run: returns (deliveries per second, bytes received per delivery).
fn drive(proto: Proto, addr: SocketAddr, secs: f64) -> (f64, f64) {
    let mut subs: Vec<MioStream> = (0..SUBSCRIBERS)
        .map(|i| {
            let s = match proto {
                Proto::Pabal => pabal_connect(addr, &format!("s{i}")),
                Proto::Mqtt => mqtt_connect(addr, &format!("s{i}"), true),
                Proto::Nats => nats_connect(addr, true),
            };
            s.set_nonblocking(true).unwrap();
            MioStream::from_std(s)
        })
        .collect();
    let mut publisher = match proto {
        Proto::Pabal => pabal_connect(addr, "brand"),
        Proto::Mqtt => mqtt_connect(addr, "brand", false),
        Proto::Nats => nats_connect(addr, false),
    };
    if let Some(core) = core_affinity::get_core_ids().and_then(|c| c.get(1).copied()) {
        core_affinity::set_for_current(core);
    }
    let start = Instant::now();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (count, bytes) = std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            if let Some(core) = core_affinity::get_core_ids().and_then(|c| c.get(1).copied()) {
                core_affinity::set_for_current(core);
            }
            let mut poll = Poll::new().unwrap();
            for (i, s) in subs.iter_mut().enumerate() {
                poll.registry()
                    .register(s, Token(i), Interest::READABLE)
                    .unwrap();
            }
            let mut bufs: Vec<BytesMut> = (0..SUBSCRIBERS).map(|_| BytesMut::new()).collect();
            let decoder = Decoder::default();
            let mut events = Events::with_capacity(1024);
            let mut chunk = vec![0u8; 256 * 1024];
            let (mut count, mut bytes) = (0u64, 0u64);
            let deadline = secs;
            while start.elapsed().as_secs_f64() < deadline {
                match poll.poll(&mut events, Some(Duration::from_millis(20))) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    other => other.unwrap(),
                }
                for ev in &events {
                    let i = ev.token().0;
                    loop {
                        match subs[i].read(&mut chunk) {
                            Ok(0) => break,
                            Ok(n) => {
                                bytes += n as u64;
                                bufs[i].extend_from_slice(&chunk[..n]);
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(e) => panic!("read: {e}"),
                        }
                    }
                    match proto {
                        Proto::Pabal => {
                            while let Some(f) = decoder.decode_server(&mut bufs[i]).unwrap() {
                                count += u64::from(matches!(f, ServerFrame::Deliver(_)));
                            }
                        }
                        Proto::Mqtt => {
                            while let Some((first, _)) = mqtt_next(&mut bufs[i]) {
                                count += u64::from(first >> 4 == 3);
                            }
                        }
                        Proto::Nats => count += nats_count(&mut bufs[i]),
                    }
                }
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            (count, bytes)
        });
        // The publisher, windowed.
        publisher.set_nonblocking(true).unwrap();
        let decoder = Decoder::default();
        let mut inbuf = BytesMut::new();
        let mut in_flight = 0usize;
        let mut next_id: u64 = 0;
        let mut chunk = vec![0u8; 64 * 1024];
        let payload = [7u8; 32];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut out = Vec::new();
            while in_flight < WINDOW {
                next_id += 1;
                match proto {
                    Proto::Pabal => {
                        let mut b = BytesMut::new();
                        ClientFrame::Publish(Publish {
                            alias: 0,
                            msg_id: Some(next_id),
                            ack: None,
                            payload: Bytes::copy_from_slice(&payload),
                        })
                        .encode(&mut b);
                        out.extend_from_slice(&b);
                        in_flight += 1;
                    }
                    Proto::Mqtt => {
                        let mut body = Vec::new();
                        mqtt_str(TOPIC, &mut body);
                        body.extend_from_slice(&((next_id % 65535 + 1) as u16).to_be_bytes());
                        body.extend_from_slice(&payload);
                        out.extend_from_slice(&mqtt_packet(0x32, &body)); // QoS 1
                        in_flight += 1;
                    }
                    Proto::Nats => {
                        for _ in 0..WINDOW {
                            out.extend_from_slice(format!("PUB {TOPIC} 32\r\n").as_bytes());
                            out.extend_from_slice(&payload);
                            out.extend_from_slice(b"\r\n");
                        }
                        out.extend_from_slice(b"PING\r\n");
                        in_flight = WINDOW;
                    }
                }
            }
            if !out.is_empty() {
                publisher.set_nonblocking(false).unwrap();
                publisher.write_all(&out).unwrap();
                publisher.set_nonblocking(true).unwrap();
            }
            match publisher.read(&mut chunk) {
                Ok(0) => panic!("publisher closed"),
                Ok(n) => inbuf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    std::thread::yield_now();
                    continue;
                }
                Err(e) => panic!("publisher read: {e}"),
            }
            match proto {
                Proto::Pabal => {
                    while let Some(f) = decoder.decode_server(&mut inbuf).unwrap() {
                        in_flight -= usize::from(matches!(f, ServerFrame::PubAck(_)));
                    }
                }
                Proto::Mqtt => {
                    while let Some((first, _)) = mqtt_next(&mut inbuf) {
                        in_flight -= usize::from(first >> 4 == 4);
                    }
                }
                Proto::Nats => {
                    if let Some(p) = inbuf.windows(6).position(|w| w == b"PONG\r\n") {
                        inbuf.advance(p + 6);
                        in_flight = 0;
                    }
                }
            }
        }
        reader.join().unwrap()
    });
    let elapsed = start.elapsed().as_secs_f64();
    (count as f64 / elapsed, bytes as f64 / count.max(1) as f64)
}

fn spawn(cmd: &mut Command) -> Option<Child> {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()
}

fn main() {
    let secs: f64 = std::env::var("PABAL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    println!(
        "{:<22} {:>14} {:>16}",
        "server (core 0)", "deliveries/s", "bytes/delivery"
    );
    for backend in pabal_testkit::backends() {
        let config = common::relay_config(backend);
        let Ok(relay) = RelayHandle::start(config) else {
            continue;
        };
        let (rate, per) = drive(Proto::Pabal, relay.local_addr(), secs);
        println!(
            "{:<22} {:>14.0} {:>16.1}",
            format!("pabal ({})", relay.backend()),
            rate,
            per
        );
        relay.stop().unwrap();
    }
    let dir = std::env::temp_dir().join(format!("pabal-brokers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = pabal_testkit::free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\nmax_inflight_messages 0\n")).unwrap();
    match spawn(
        Command::new("taskset")
            .args(["-c", "0", "mosquitto", "-c"])
            .arg(&conf),
    ) {
        Some(mut child) => {
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            wait_listening(addr);
            let (rate, per) = drive(Proto::Mqtt, addr, secs);
            println!("{:<22} {:>14.0} {:>16.1}", "mosquitto 2 (MQTT)", rate, per);
            let _ = child.kill();
            let _ = child.wait();
        }
        None => println!("mosquitto: not installed, skipped"),
    }
    let port = pabal_testkit::free_port();
    match spawn(
        Command::new("taskset")
            .args([
                "-c",
                "0",
                "nats-server",
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .env("GOMAXPROCS", "1"),
    ) {
        Some(mut child) => {
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            wait_listening(addr);
            let (rate, per) = drive(Proto::Nats, addr, secs);
            println!("{:<22} {:>14.0} {:>16.1}", "nats-server 2.9", rate, per);
            let _ = child.kill();
            let _ = child.wait();
        }
        None => println!("nats-server: not installed, skipped"),
    }
    let _ = std::fs::remove_dir_all(dir);
}
