//! A proxy between loadgen's phones and a real relay that misbehaves on purpose, driven by a
//! seed: the verifier's own test bench. It parses every frame in both directions with
//! pabal-codec (forwarding the original bytes of frames it leaves alone) and, in one
//! [`Misbehaviour`] per proxy, breaks the delivery contract a bounded number of times.
//!
//! Owns: test plumbing only (threads and blocking sockets, two per connection). A relay
//! behind a [`Misbehaviour::Clean`] proxy must pass; behind any other, the run must fail with
//! the violation that names it.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pabal_codec::{ClientFrame, Decoder, Framing, Gap, Limits, ServerFrame};
use pabal_loadgen::link::splitmix64;
use pabal_loadgen::payload::HEADER_LEN;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// What the proxy does wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Nothing: every frame passes as it came.
    Clean,
    /// Swallows PUBLISHes: never acknowledged, never delivered.
    SwallowPublishes,
    /// Changes a byte of a DELIVER's payload after loadgen's header.
    CorruptPayloads,
    /// Swaps two consecutive DELIVERs of one room (implicit sequences).
    Reorder,
    /// Sends a DELIVER twice (implicit sequence).
    Duplicate,
    /// Replaces a retained message's DELIVER with a GAP for its sequence.
    ForgeGaps,
    /// Swallows SUBSCRIBEs: the room is never bound.
    SwallowSubscriptions,
    /// Closes every connection of a seeded quarter of the users at their HELLO.
    RefuseConnections,
}

/// A running proxy; stops accepting when dropped (open connections end with their phones).
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
    acceptor: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct ProxyShared {
    relay: SocketAddr,
    mode: Misbehaviour,
    seed: u64,
    /// Misbehaviours allowed in all.
    budget: u64,
    acted: AtomicU64,
    frames: AtomicU64,
    stop: AtomicBool,
}

impl ProxyShared {
    /// Takes one misbehaviour from the budget.
    fn take(&self) -> bool {
        self.acted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.budget).then_some(n + 1)
            })
            .is_ok()
    }

    /// Whether `user`'s connections are refused: decided by the user's name without the
    /// run id (`u3.r1a2b3c4d` → `u3`), so the victims are the same in every run of a seed
    /// (hashed with the random run id, 16 phones had no victim in about 1 run in 100).
    fn victim(&self, user: &[u8]) -> bool {
        let name = user.split(|&b| b == b'.').next().unwrap_or(user);
        let h = name
            .iter()
            .fold(self.seed, |h, &b| splitmix64(h ^ u64::from(b)));
        h % 4 == 0
    }
}

impl Proxy {
    /// A proxy on 127.0.0.1:0 in front of `relay`, misbehaving at most `budget` times
    /// (choices drawn from `seed`).
    pub fn start(relay: SocketAddr, mode: Misbehaviour, seed: u64, budget: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy binds");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(ProxyShared {
            relay,
            mode,
            seed,
            budget,
            acted: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let acceptor = std::thread::spawn(move || accept_loop(&listener, &s));
        Proxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Where phones connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many times it misbehaved.
    pub fn acted(&self) -> u64 {
        self.shared.acted.load(Ordering::Acquire)
    }

    /// Frames it forwarded or dropped, both ways.
    pub fn frames(&self) -> u64 {
        self.shared.frames.load(Ordering::Acquire)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<ProxyShared>) {
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((client, _)) => {
                n += 1;
                let Ok(relay) = TcpStream::connect(shared.relay) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let conn = Arc::new(Conn {
                    shared: shared.clone(),
                    cursors: Mutex::new(HashMap::new()),
                    msg_alias: Mutex::new(HashMap::new()),
                    client,
                    relay,
                });
                let up = conn.clone();
                let seed = splitmix64(shared.seed ^ n);
                std::thread::spawn(move || up.client_to_relay(seed));
                std::thread::spawn(move || conn.relay_to_client(seed ^ 1));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// One proxied connection.
#[derive(Debug)]
struct Conn {
    shared: Arc<ProxyShared>,
    /// The relay's view of each alias's cursor on this connection.
    cursors: Mutex<HashMap<u32, u64>>,
    /// msg_id -> alias of the client's publishes.
    msg_alias: Mutex<HashMap<u64, u32>>,
    client: TcpStream,
    relay: TcpStream,
}

/// Reads what `from` has into `buf`; false at the end of the stream or on a stop.
fn fill(from: &mut TcpStream, buf: &mut BytesMut, stop: &AtomicBool) -> Result<bool, ()> {
    let mut chunk = [0u8; 16 * 1024];
    match from.read(&mut chunk) {
        Ok(0) => Err(()),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(true)
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            if stop.load(Ordering::Acquire) {
                Err(())
            } else {
                Ok(false)
            }
        }
        Err(e) if e.kind() == ErrorKind::Interrupted => Ok(false),
        Err(_) => Err(()),
    }
}

/// The next whole frame of `buf`: its original bytes and its body.
fn next_raw(decoder: &Decoder, buf: &mut BytesMut) -> Option<(Bytes, Bytes)> {
    match decoder.framing(buf) {
        Ok(Framing::Ready { header, body }) => {
            let raw = buf.split_to(header + body).freeze();
            let body = raw.slice(header..);
            Some((raw, body))
        }
        _ => None,
    }
}

fn encode_server(frame: &ServerFrame) -> Bytes {
    let mut out = BytesMut::new();
    frame.encode(&mut out);
    out.freeze()
}

impl Conn {
    fn close(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.relay.shutdown(Shutdown::Both);
    }

    fn client_to_relay(&self, seed: u64) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let (Ok(mut from), Ok(mut to)) = (self.client.try_clone(), self.relay.try_clone()) else {
            return self.close();
        };
        let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
        let decoder = Decoder::new(Limits::default());
        let limits = Limits::default();
        let mut buf = BytesMut::new();
        let mode = self.shared.mode;
        loop {
            match fill(&mut from, &mut buf, &self.shared.stop) {
                Ok(_) => {}
                Err(()) => return self.close(),
            }
            while let Some((raw, body)) = next_raw(&decoder, &mut buf) {
                self.shared.frames.fetch_add(1, Ordering::AcqRel);
                let Ok(frame) = ClientFrame::parse(body, &limits) else {
                    return self.close();
                };
                let forward = match &frame {
                    ClientFrame::Hello(h) => {
                        if mode == Misbehaviour::RefuseConnections && self.shared.victim(&h.token) {
                            self.shared.take();
                            return self.close();
                        }
                        let mut cursors = self.cursors.lock().unwrap();
                        for (i, e) in h.resume.iter().enumerate() {
                            cursors.insert(i as u32, e.last_seq);
                        }
                        true
                    }
                    ClientFrame::Publish(p) => {
                        if let Some(id) = p.msg_id {
                            self.msg_alias.lock().unwrap().insert(id, p.alias);
                        }
                        !(mode == Misbehaviour::SwallowPublishes
                            && p.msg_id.is_some()
                            && rng.random::<f64>() < 0.2
                            && self.shared.take())
                    }
                    ClientFrame::Subscribe(_) => {
                        !(mode == Misbehaviour::SwallowSubscriptions
                            && rng.random::<f64>() < 0.3
                            && self.shared.take())
                    }
                    _ => true,
                };
                if forward && to.write_all(&raw).is_err() {
                    return self.close();
                }
            }
        }
    }

    /// Follows the relay's cursor of an alias through one frame; for a DELIVER, its
    /// sequence.
    fn track(&self, frame: &ServerFrame) -> Option<u64> {
        let mut cursors = self.cursors.lock().unwrap();
        match frame {
            ServerFrame::Room(r) => {
                cursors.insert(r.alias, r.cursor);
            }
            ServerFrame::Left(l) => {
                cursors.remove(&l.alias);
            }
            ServerFrame::Gap(g) => {
                cursors.insert(g.alias, g.to);
            }
            ServerFrame::PubAck(p) => {
                if let Some(alias) = self.msg_alias.lock().unwrap().remove(&p.msg_id)
                    && let Some(c) = cursors.get_mut(&alias)
                    && *c + 1 == p.seq
                {
                    *c = p.seq;
                }
            }
            ServerFrame::Deliver(d) if !d.header.ephemeral => {
                let c = cursors.entry(d.header.alias).or_insert(0);
                let seq = d.header.seq.unwrap_or(*c + 1);
                *c = seq;
                return Some(seq);
            }
            _ => {}
        }
        None
    }

    fn relay_to_client(&self, seed: u64) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let (Ok(mut from), Ok(mut to)) = (self.relay.try_clone(), self.client.try_clone()) else {
            return self.close();
        };
        let decoder = Decoder::new(Limits::default());
        let limits = Limits::default();
        let mut buf = BytesMut::new();
        let mode = self.shared.mode;
        // A DELIVER held back to be swapped with the next one of its room.
        let mut held: Option<(Bytes, u32)> = None;
        loop {
            let wait = if held.is_some() { 100 } else { 200 };
            let _ = from.set_read_timeout(Some(Duration::from_millis(wait)));
            match fill(&mut from, &mut buf, &self.shared.stop) {
                Ok(true) => {}
                Ok(false) => {
                    // Nothing followed in time: let the held one go, in order.
                    if let Some((raw, _)) = held.take()
                        && to.write_all(&raw).is_err()
                    {
                        return self.close();
                    }
                    continue;
                }
                Err(()) => return self.close(),
            }
            let mut out = BytesMut::new();
            while let Some((raw, body)) = next_raw(&decoder, &mut buf) {
                self.shared.frames.fetch_add(1, Ordering::AcqRel);
                let Ok(frame) = ServerFrame::parse(body, &limits) else {
                    return self.close();
                };
                let seq = self.track(&frame);
                let plain = match &frame {
                    ServerFrame::Deliver(d) => {
                        (!d.header.ephemeral && d.header.new_sender.is_none()).then_some(d)
                    }
                    _ => None,
                };
                let implicit = plain.is_some_and(|d| d.header.seq.is_none());
                if let Some((h, alias)) = held.take() {
                    if implicit
                        && plain.is_some_and(|d| d.header.alias == alias)
                        && self.shared.take()
                    {
                        // The swap: the later message first.
                        out.extend_from_slice(&raw);
                        out.extend_from_slice(&h);
                        continue;
                    }
                    out.extend_from_slice(&h);
                }
                let Some(d) = plain else {
                    out.extend_from_slice(&raw);
                    continue;
                };
                match mode {
                    Misbehaviour::CorruptPayloads
                        if d.payload.len() > HEADER_LEN
                            && rng.random::<f64>() < 0.2
                            && self.shared.take() =>
                    {
                        let mut payload = d.payload.to_vec();
                        let at = HEADER_LEN + rng.random_range(0..payload.len() - HEADER_LEN);
                        payload[at] ^= 0x5a;
                        let mut bad = d.clone();
                        bad.payload = Bytes::from(payload);
                        out.extend_from_slice(&encode_server(&ServerFrame::Deliver(bad)));
                    }
                    Misbehaviour::Duplicate
                        if implicit && rng.random::<f64>() < 0.2 && self.shared.take() =>
                    {
                        out.extend_from_slice(&raw);
                        out.extend_from_slice(&raw);
                    }
                    Misbehaviour::Reorder
                        if implicit
                            && rng.random::<f64>() < 0.5
                            && self.shared.acted.load(Ordering::Acquire) < self.shared.budget =>
                    {
                        held = Some((raw, d.header.alias));
                    }
                    Misbehaviour::ForgeGaps
                        if implicit && rng.random::<f64>() < 0.2 && self.shared.take() =>
                    {
                        let seq = seq.unwrap_or(1);
                        let gap = Gap {
                            alias: d.header.alias,
                            from: seq,
                            to: seq,
                        };
                        out.extend_from_slice(&encode_server(&ServerFrame::Gap(gap)));
                    }
                    _ => out.extend_from_slice(&raw),
                }
            }
            if !out.is_empty() && to.write_all(&out).is_err() {
                return self.close();
            }
        }
    }
}
