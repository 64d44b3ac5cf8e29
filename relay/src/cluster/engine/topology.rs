//! Reading the engine's topology without blocking the engine: the slot map of a
//! Redis Cluster (`CLUSTER SLOTS` from a seed or a known shard) or where Sentinel says
//! the master is (`SENTINEL get-master-addr-by-name`), asked on a connection of its own
//! registered on the engine's mio poll (dialed as a shard's are, `dial.rs`: names
//! resolved off the thread), one address after the other (each bounded
//! by `cluster.connect_timeout`, from the connect to the answer), with the engine's
//! backoff when none answers. While a seed or sentinel is slow or silent, every shard
//! already known keeps taking publishes and delivering pushes.
//!
//! Owns: the discovery connection and its state (connect, send, read the answer, next
//! address). Must not touch: the shards' connections or what is in flight on them (a map
//! read is handed to [`Engine::apply_map`]); slot arithmetic and the answers' meaning
//! live in [`super::super::slots`].

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use mio::{Registry, Token};

use super::super::resp::{self, Value};
use super::super::shard::{BACKOFF_MIN, Conn, Retry};
use super::super::slots::{self, SlotMap};
use super::super::{RedisAddr, RedisAnswered, malformed};
use super::Engine;
use super::dial::Resolver;

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
            return Err(RedisAnswered::io(String::from_utf8_lossy(e)));
        }
        match self {
            Question::ClusterSlots => SlotMap::from_cluster_slots(reply, from).ok_or_else(|| {
                malformed("CLUSTER SLOTS: a malformed answer, or slots nobody serves")
            }),
            Question::Master(name) => slots::master_from_sentinel(reply)
                .map(SlotMap::single)
                .ok_or_else(|| {
                    RedisAnswered::io(format!("the sentinel knows no master named `{name}`"))
                }),
        }
    }
}

/// One address being asked: its connection (dialed without blocking, the request in
/// its buffer until it is up) and when it is given up.
struct Attempt {
    addr: RedisAddr,
    conn: Conn,
    deadline: Instant,
}

/// One read of the topology in progress: the addresses still to ask, in order, and the
/// one being asked.
pub(super) struct Discovery {
    question: Question,
    /// Addresses not asked yet.
    addrs: VecDeque<RedisAddr>,
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
            attempt: None,
            timeout,
            last_error: None,
        }
    }

    /// When the address being asked is given up (the engine's poll wakes by then).
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.attempt.as_ref().map(|a| a.deadline)
    }

    /// Moves on as far as the resolver and the sockets allow at `now`: the map, the last
    /// error once every address failed, or `None` while an answer is awaited.
    pub(super) fn advance(
        &mut self,
        registry: &Registry,
        resolver: &mut Resolver,
        now: Instant,
    ) -> Option<Result<SlotMap, io::Error>> {
        loop {
            if self.attempt.is_none() {
                let Some(addr) = self.addrs.pop_front() else {
                    let e = self
                        .last_error
                        .take()
                        .unwrap_or_else(|| io::Error::other("no address to ask"));
                    return Some(Err(e));
                };
                let mut conn = Conn::dial(&addr, DISCOVERY, now, self.timeout);
                let name;
                let args: &[&[u8]] = match &self.question {
                    Question::ClusterSlots => &[b"CLUSTER", b"SLOTS"],
                    Question::Master(n) => {
                        name = n.as_bytes();
                        &[b"SENTINEL", b"get-master-addr-by-name", name]
                    }
                };
                resp::encode(&mut conn.wbuf, args.iter().copied());
                self.attempt = Some(Attempt {
                    addr,
                    conn,
                    deadline: now + self.timeout,
                });
            }
            let attempt = self.attempt.as_mut()?;
            match self.question.step(attempt, registry, resolver, now) {
                Ok(None) => return None,
                Ok(Some(map)) => {
                    self.close(registry);
                    return Some(Ok(map));
                }
                Err(e) => {
                    let addr = &attempt.addr;
                    self.last_error = Some(io::Error::new(e.kind(), format!("{addr}: {e}")));
                    self.close(registry);
                }
            }
        }
    }

    /// Gives up the connection (the engine stops, or the read is no longer wanted).
    pub(super) fn close(&mut self, registry: &Registry) {
        if let Some(mut a) = self.attempt.take() {
            a.conn.deregister(registry);
        }
    }
}

impl Question {
    /// One attempt's progress: its map once answered, `None` while waiting, an error when
    /// it failed or its time is up.
    fn step(
        &self,
        a: &mut Attempt,
        registry: &Registry,
        resolver: &mut Resolver,
        now: Instant,
    ) -> io::Result<Option<SlotMap>> {
        if now >= a.deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no answer within cluster.connect_timeout",
            ));
        }
        a.conn.advance(registry, resolver, now)?;
        if !a.conn.is_up() {
            return Ok(None);
        }
        a.conn.flush()?;
        a.conn.fill_at_most(ANSWER_MAX)?;
        match a.conn.decode().map_err(|e| malformed(e.to_string()))? {
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
        let Some(found) = d.advance(self.poll.registry(), &mut self.resolver, now) else {
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
