//! Reading the engine's topology without blocking the engine thread: the slot map of a
//! Redis Cluster (`CLUSTER SLOTS` from a seed or a known shard) or where Sentinel says
//! the master is (`SENTINEL get-master-addr-by-name`), asked on a connection of its own
//! registered on the engine thread's mio poll, one address after the other (each bounded
//! by `cluster.connect_timeout`, from the connect to the answer), with the engine's
//! backoff when none answers. While a seed or sentinel is slow or silent, every shard
//! already known keeps taking publishes and delivering pushes.
//!
//! Owns: the discovery connection and its state (connect, send, read the answer, next
//! address). Must not touch: the shards' connections or what is in flight on them (a map
//! read is handed to [`Engine::apply_map`]); slot arithmetic and the answers' meaning
//! live in [`super::super::slots`].

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::super::RedisAddr;
use super::super::resp::{self, Value};
use super::super::shard::{BACKOFF_MIN, Retry};
use super::super::slots::{self, SlotMap};
use super::Engine;

/// The discovery connection's token (shards use `1..`, the waker `0`).
pub(super) const DISCOVERY: Token = Token(usize::MAX - 1);
/// The longest answer read from a seed or sentinel (a `CLUSTER SLOTS` of a large cluster
/// is a few tens of KiB); past it the address is given up.
const ANSWER_MAX: usize = 4 << 20;

/// What is asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Question {
    /// `CLUSTER SLOTS`.
    ClusterSlots,
    /// `SENTINEL get-master-addr-by-name <name>`.
    Master(String),
}

impl Question {
    fn what(&self) -> &'static str {
        match self {
            Question::ClusterSlots => "slot map (CLUSTER SLOTS)",
            Question::Master(_) => "sentinel (SENTINEL get-master-addr-by-name)",
        }
    }

    /// The map an answer from `from` gives, or why it gives none.
    fn read(&self, reply: &Value, from: &RedisAddr) -> io::Result<SlotMap> {
        if let Value::Error(e) = reply {
            return Err(io::Error::other(String::from_utf8_lossy(e).into_owned()));
        }
        match self {
            Question::ClusterSlots => SlotMap::from_cluster_slots(reply, from).ok_or_else(|| {
                io::Error::other("CLUSTER SLOTS: a malformed answer, or slots nobody serves")
            }),
            Question::Master(name) => slots::master_from_sentinel(reply)
                .map(SlotMap::single)
                .ok_or_else(|| {
                    io::Error::other(format!("the sentinel knows no master named `{name}`"))
                }),
        }
    }
}

/// One address being asked.
struct Attempt {
    addr: RedisAddr,
    stream: TcpStream,
    /// The request, until written.
    wbuf: BytesMut,
    rbuf: BytesMut,
    /// When this address is given up.
    deadline: Instant,
}

/// One read of the topology in progress: the addresses still to ask, in order, and the
/// one being asked.
pub(super) struct Discovery {
    question: Question,
    /// Addresses not asked yet.
    addrs: VecDeque<RedisAddr>,
    /// Resolved socket addresses of the address being tried, not tried yet.
    ips: VecDeque<SocketAddr>,
    ips_of: Option<RedisAddr>,
    attempt: Option<Attempt>,
    timeout: Duration,
    last_error: Option<io::Error>,
}

impl Discovery {
    /// Starts asking `addrs` in turn; nothing is sent before [`Discovery::advance`].
    pub(super) fn new(question: Question, addrs: Vec<RedisAddr>, timeout: Duration) -> Self {
        Discovery {
            question,
            addrs: addrs.into(),
            ips: VecDeque::new(),
            ips_of: None,
            attempt: None,
            timeout,
            last_error: None,
        }
    }

    /// When the address being asked is given up (the engine's poll wakes by then).
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.attempt.as_ref().map(|a| a.deadline)
    }

    /// Moves on as far as the sockets allow at `now`: the map, the last error once every
    /// address failed, or `None` while an answer is awaited.
    pub(super) fn advance(
        &mut self,
        registry: &Registry,
        now: Instant,
    ) -> Option<Result<SlotMap, io::Error>> {
        loop {
            if self.attempt.is_none() {
                match self.connect_next(registry, now) {
                    Some(Ok(())) => {}
                    Some(Err(e)) => {
                        self.note_error(e);
                        continue;
                    }
                    None => {
                        let e = self
                            .last_error
                            .take()
                            .unwrap_or_else(|| io::Error::other("no address to ask"));
                        return Some(Err(e));
                    }
                }
            }
            let attempt = self.attempt.as_mut()?;
            match self.question.step(attempt, now) {
                Ok(None) => return None,
                Ok(Some(map)) => {
                    self.drop_attempt(registry);
                    return Some(Ok(map));
                }
                Err(e) => {
                    self.drop_attempt(registry);
                    self.note_error(e);
                }
            }
        }
    }

    /// Gives up the connection (the engine stops, or the read is no longer wanted).
    pub(super) fn close(&mut self, registry: &Registry) {
        self.drop_attempt(registry);
    }

    fn note_error(&mut self, e: io::Error) {
        let at = self
            .attempt
            .as_ref()
            .map(|a| &a.addr)
            .or(self.ips_of.as_ref());
        self.last_error = Some(match at {
            Some(addr) => io::Error::new(e.kind(), format!("{addr}: {e}")),
            None => e,
        });
    }

    fn drop_attempt(&mut self, registry: &Registry) {
        if let Some(mut a) = self.attempt.take() {
            let _ = registry.deregister(&mut a.stream);
        }
    }

    /// Starts connecting to the next socket address: `None` when none is left.
    fn connect_next(&mut self, registry: &Registry, now: Instant) -> Option<io::Result<()>> {
        while self.ips.is_empty() {
            let addr = self.addrs.pop_front()?;
            // Resolving a name may block; the seeds are usually addresses (a name is
            // resolved once per address per read).
            match (addr.host.as_str(), addr.port).to_socket_addrs() {
                Ok(ips) => self.ips.extend(ips),
                Err(e) => {
                    self.ips_of = Some(addr);
                    return Some(Err(e));
                }
            }
            self.ips_of = Some(addr);
        }
        let ip = self.ips.pop_front()?;
        let addr = self.ips_of.clone()?;
        let connected = TcpStream::connect(ip).and_then(|mut stream| {
            registry.register(
                &mut stream,
                DISCOVERY,
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(stream)
        });
        Some(connected.map(|stream| {
            let mut wbuf = BytesMut::new();
            let name;
            let args: &[&[u8]] = match &self.question {
                Question::ClusterSlots => &[b"CLUSTER", b"SLOTS"],
                Question::Master(n) => {
                    name = n.as_bytes();
                    &[b"SENTINEL", b"get-master-addr-by-name", name]
                }
            };
            resp::encode(&mut wbuf, args.iter().copied());
            self.attempt = Some(Attempt {
                addr,
                stream,
                wbuf,
                rbuf: BytesMut::new(),
                deadline: now + self.timeout,
            });
        }))
    }
}

impl Question {
    /// One attempt's progress: its map once answered, `None` while waiting, an error when
    /// it failed or its time is up.
    fn step(&self, a: &mut Attempt, now: Instant) -> io::Result<Option<SlotMap>> {
        if now >= a.deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no answer within cluster.connect_timeout",
            ));
        }
        if let Some(e) = a.stream.take_error()? {
            return Err(e);
        }
        if !a.wbuf.is_empty() {
            // Still connecting: the socket has no peer yet (mio's documented way to tell).
            match a.stream.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(None),
                Err(e) => return Err(e),
            }
            while !a.wbuf.is_empty() {
                match a.stream.write(&a.wbuf) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        let _ = a.wbuf.split_to(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match a.stream.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => a.rbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if a.rbuf.len() > ANSWER_MAX {
                return Err(io::Error::other("the answer is too long"));
            }
        }
        match resp::decode(&mut a.rbuf).map_err(io::Error::other)? {
            Some(reply) => self.read(&reply, &a.addr).map(Some),
            None => Ok(None),
        }
    }
}

impl Engine {
    /// Starts reading the slot map from the seeds (and the shards known), or asking the
    /// sentinels where the master is; [`Engine::advance_discovery`] takes the answer.
    pub(super) fn start_discovery(&mut self) {
        let (question, addrs) = match &self.master_name {
            Some(name) => (Question::Master(name.clone()), self.seeds.clone()),
            None => {
                let mut seeds = self.seeds.clone();
                for s in &self.shards {
                    if !seeds.contains(&s.addr) {
                        seeds.push(s.addr.clone());
                    }
                }
                (Question::ClusterSlots, seeds)
            }
        };
        // A MOVED or a lost shard from now on asks for another read after this one.
        self.refresh_due = false;
        self.discovery = Some(Discovery::new(question, addrs, self.config.connect_timeout));
    }

    /// Moves the read in progress on; on an answer the map is taken (shards renumbered,
    /// channels routed again), when every address failed the read is retried with backoff.
    pub(super) fn advance_discovery(&mut self, now: Instant) {
        let Some(d) = self.discovery.as_mut() else {
            return;
        };
        let Some(found) = d.advance(self.poll.registry(), now) else {
            return;
        };
        let what = d.question.what();
        let topology = self.topology;
        self.discovery = None;
        match found {
            Ok(map) => {
                // At most one read per this long, however many MOVEDs arrive.
                self.map_retry = Retry {
                    at: now + BACKOFF_MIN * 4,
                    delay: BACKOFF_MIN,
                };
                if self.map.as_ref() != Some(&map) {
                    tracing::info!(
                        worker = self.worker,
                        shards = ?map.shards,
                        topology = ?topology,
                        "engine topology read (cluster.topology)"
                    );
                    self.apply_map(map);
                } else {
                    self.route_channels();
                }
            }
            Err(e) => {
                self.refresh_due = true;
                let addr = self.seeds.first().cloned().unwrap_or(RedisAddr {
                    host: String::new(),
                    port: 0,
                });
                self.map_retry = self.backoff(self.map_retry, &addr, &e, what);
            }
        }
    }
}
