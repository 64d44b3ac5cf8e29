//! One worker's engine: two pipelined connections (commands, pub/sub) to each Redis it needs
//! on a mio poll of its own, fed by the worker once per loop tick and answering through a
//! channel. It runs on the worker's thread (the default: the worker turns it each tick and
//! its backend watches the engine's poll, [`EngineHandle::turn`]) or, with
//! `cluster.engine_thread`, on a thread of its own woken by its waker and waking the worker
//! through the worker's wakeup ([`Driver`]); the passes are the same either way.
//!
//! With `cluster.topology = "single"` that is one Redis; with `"sentinel"` it is the one
//! master the sentinels name (asked again whenever its connection is lost or it answers
//! `READONLY`: a failover moves it). With `"cluster"` it is the shard masters of a Redis
//! Cluster that its commands need, each dialed on its first need (its commands wait on the
//! connection meanwhile): the slot map comes from the seeds (`CLUSTER SLOTS`,
//! [`super::slots`]); each room's commands go to the shard of its hash slot, its channel
//! is subscribed there with sharded pub/sub (`SSUBSCRIBE`; the script `SPUBLISH`es); a
//! `MOVED` corrects the map (and has it read again) and sends the command where Redis
//! said, an `ASK` sends `ASKING` and the command to the importing shard; a shard whose
//! connection is lost is handled like a lost single Redis (its publishes fail
//! `unavailable`, it is reconnected with backoff, its channels resubscribed and the owners
//! told to read the stream), and the map is read again in case its slots moved. So is a
//! connection that stays silent past `cluster.reply_timeout` (`connections`). A
//! subscription refused with an error (`-BUSY` while a script runs, ...) is sent again
//! after a backoff, on the same connection.
//!
//! Shards are dialed on their first need in `connections`, without blocking in [`dial`];
//! what they answer is read in [`replies`]; publishes answered `TRYAGAIN` wait for their
//! retry in `tryagain`, their room's later ones behind them, and so do opens, stream
//! reads and membership steps answered `TRYAGAIN`, `LOADING` or `BUSY` (each on its own
//! timer); membership's commands and users' notice channels are in [`members`]; presence
//! entries and lookups in `presence`.
//!
//! Owns: the slot map, the shards' connections, what is in flight on them, the subscribed
//! channels and reconnection with backoff. Must not touch: rooms or connections (it only
//! reports [`EngineEvent`]s), the worker's own state (it never blocks the worker: the worker
//! only sends on an unbounded channel whose length the worker bounds itself, and on the
//! worker's thread a pass never waits).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{Receiver, Sender};
use mio::{Events, Poll, Token, Waker};

use super::resp::{self, Value, decimal};
use super::script::{self, OPEN};
use super::shard::{self, Conn, Pending, Retry, Shard};
use super::slots::SlotMap;
use super::{
    ClusterConfig, ClusterStats, EngineCmd, EngineErrorKind, EngineEvent, MAX_OPEN_TAIL,
    PublishRequest, RedisAddr, StreamEntry, Topology,
};
use crate::ids::RoomName;

mod connections;
pub(super) mod dial;
#[cfg(test)]
mod fault_tests;
pub(super) mod members;
mod presence;
pub(super) mod receipts;
mod replies;
mod topology;
mod tryagain;

use replies::Redirect;

/// The engine's waker (shard `i`'s connections are tokens `2i+1` and `2i+2`).
const WAKE: Token = Token(0);
/// How often one command may be redirected (`MOVED`, `ASK`) before it is given up.
const MAX_HOPS: u8 = 5;
/// Readiness events one inline pass reads from the engine's poll (one per connection with
/// something to read: two per shard).
const INLINE_EVENTS: usize = 64;
/// Events waiting for the worker; a full queue makes an engine on its own thread wait (and Redis
/// buffer, or drop the subscriber, which the owner then repairs from the stream).
const EVENT_QUEUE: usize = 65_536;

/// The worker's side of its engine; dropping it stops the engine (and joins its thread).
#[derive(Debug)]
pub struct EngineHandle {
    /// Commands, each with when its worker queued it.
    tx: Sender<(Instant, EngineCmd)>,
    /// Events, each with when the engine read what it reports.
    events: Receiver<(Instant, EngineEvent)>,
    stats: Arc<ClusterStats>,
    driver: Driver,
}

/// Where the engine's loop runs (`cluster.engine_thread`).
enum Driver {
    /// On a thread of its own, woken by its mio [`Waker`].
    Thread {
        waker: Arc<Waker>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    },
    /// On the worker's thread: the worker turns it once per tick ([`EngineHandle::turn`])
    /// and after handing it commands ([`EngineHandle::wake`]), and its backend watches the
    /// engine's poll ([`EngineHandle::poll_fd`]) so that an answer from Redis ends the
    /// worker's wait. No thread hop either way.
    Inline {
        engine: Box<Engine>,
        events: Events,
        /// The engine's next timer as of its last pass.
        deadline: Option<Instant>,
        /// Its poll must be read at the next turn whether or not the backend saw it
        /// signal: the first turn, and after a read that filled `events` (more may wait,
        /// and a nested poll signals only what becomes ready anew).
        read_due: bool,
    },
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Driver::Thread { .. } => "Thread",
            Driver::Inline { .. } => "Inline",
        })
    }
}

impl EngineHandle {
    /// Starts worker `worker`'s engine: on a thread of its own with
    /// `cluster.engine_thread` (`wake_worker` wakes the worker's loop when events wait),
    /// else on the worker's thread (the worker drives it: [`EngineHandle::turn`]).
    /// `max_payload` (the node's `connection.max_frame_len`, which no reload changes and no
    /// payload passes) bounds what a connection buffers of a reply not yet whole
    /// (`shard::reply_max`).
    pub fn spawn(
        worker: usize,
        config: &ClusterConfig,
        max_payload: usize,
        node_id: &str,
        wake_worker: Box<dyn Fn() + Send>,
        stats: Arc<ClusterStats>,
    ) -> io::Result<Self> {
        let seeds = config.redis_addrs().map_err(io::Error::other)?;
        let master_name = match config.topology {
            Topology::Sentinel => Some(config.sentinels().map_err(io::Error::other)?.1),
            _ => None,
        };
        // One Redis serves every slot; a cluster's map is read by the engine.
        // The one Redis is dialed up front (it serves everything); a cluster's shards
        // each on their first command.
        let (map, shards) = match config.topology {
            Topology::Single => {
                let mut shard = Shard::new(seeds[0].clone());
                shard.wanted = true;
                (Some(SlotMap::single(seeds[0].clone())), vec![shard])
            }
            Topology::Cluster | Topology::Sentinel => (None, Vec::new()),
        };
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let resolver = dial::Resolver::new(waker.clone());
        let (tx, cmds) = crossbeam_channel::unbounded();
        // On the worker's thread the queue cannot be bounded by waiting (the worker is its
        // reader): it holds what one pass read, and the worker takes all of it before the
        // engine's next pass.
        let (events_tx, events) = if config.engine_thread {
            crossbeam_channel::bounded(EVENT_QUEUE)
        } else {
            crossbeam_channel::unbounded()
        };
        let stop = Arc::new(AtomicBool::new(false));
        // On the worker's thread the worker takes the events right after the pass that
        // read them: no wake-up needed (it would cost an eventfd write per pass).
        let wake_worker: Box<dyn Fn() + Send> = if config.engine_thread {
            wake_worker
        } else {
            Box::new(|| {})
        };
        let publish = script::node_publish_script(
            script::publish_script(config.stream_entry, config.window_order),
            config.stream_max_len,
            config.topology == Topology::Cluster,
        );
        let engine = Engine {
            prefix: format!("{node_id}/{worker}/").into_bytes(),
            node_id: node_id.to_owned(),
            worker,
            topology: config.topology,
            master_name,
            refresh_due: config.topology != Topology::Single,
            seeds,
            config: config.clone(),
            poll,
            cmds,
            events: events_tx,
            wake_worker,
            stop: stop.clone(),
            stats: stats.clone(),
            map,
            shards,
            map_retry: Retry::now(),
            resolver,
            dialed: false,
            reply_max: shard::reply_max(config.fill_batch, max_payload),
            held: tryagain::HeldPublishes::default(),
            later: tryagain::LaterCommands::default(),
            idle_check_at: Instant::now() + config.shard_idle / 4,
            discovery: None,
            channels: HashMap::new(),
            users: HashMap::new(),
            receipts: receipts::EngineReceipts::default(),
            fills_waiting: Vec::new(),
            redirects: Vec::new(),
            out: Vec::new(),
            publish_sha: script::sha1_hex(&publish),
            publish,
            message_head: Vec::new(),
            open_sha: script::sha1_hex(OPEN),
            fill_sha: script::sha1_hex(script::FILL),
            keys: Default::default(),
            up: false,
            replies: Vec::new(),
            ready: Vec::new(),
            woke: Instant::now(),
            presence: presence::PresenceState::new(node_id, worker, config.presence_lease),
        };
        // Counted before the engine runs: until it is up, the node is not healthy (counted
        // by the engine itself, a relay could look healthy while an engine had not started).
        let counted = engine.stats.clone();
        counted.engines.fetch_add(1, Ordering::Relaxed);
        let driver = if config.engine_thread {
            let thread = std::thread::Builder::new()
                .name(format!("pabal-engine-{worker}"))
                .spawn(move || engine.run())
                .inspect_err(|_| {
                    counted.engines.fetch_sub(1, Ordering::Relaxed);
                })?;
            Driver::Thread {
                waker,
                stop,
                thread: Some(thread),
            }
        } else {
            Driver::Inline {
                engine: Box::new(engine),
                events: Events::with_capacity(INLINE_EVENTS),
                deadline: Some(Instant::now()),
                read_due: true,
            }
        };
        Ok(EngineHandle {
            tx,
            events,
            stats,
            driver,
        })
    }

    /// Queues a command (the engine runs it at the next [`EngineHandle::wake`]); `queued`
    /// is when the worker's tick that queued it began (`ClusterStats::to_engine_us` counts
    /// from it): one clock read per tick, not per command.
    pub fn send(&self, queued: Instant, cmd: EngineCmd) {
        // The engine only ends when this handle drops.
        let _ = self.tx.send((queued, cmd));
    }

    /// Has the engine take the commands queued since the last wake: wakes its thread, or
    /// on the worker's thread runs its pass up to the writes (the commands go to Redis
    /// now, before the worker writes to its connections).
    pub fn wake(&mut self) {
        match &mut self.driver {
            Driver::Thread { waker, .. } => {
                if let Err(e) = waker.wake() {
                    tracing::warn!(error = %e, "cannot wake the engine thread");
                }
            }
            Driver::Inline {
                engine, deadline, ..
            } => *deadline = engine.before_poll(Instant::now()),
        }
    }

    /// On the worker's thread: one whole pass of the engine without waiting (what Redis
    /// answered, its timers, its writes); the events it read are then ready for
    /// [`EngineHandle::try_recv`]. `signalled`: the worker's backend saw the engine's poll
    /// become readable ([`crate::io::Backend::watch_fired`]); without it the pass skips the
    /// poll's system call (nothing new can be there). Nothing on a thread of its own.
    pub fn turn(&mut self, signalled: bool) {
        let Driver::Inline {
            engine,
            events,
            deadline,
            read_due,
        } = &mut self.driver
        else {
            return;
        };
        if signalled || *read_due {
            // A failed poll is logged there; the next signal or due read tries again.
            engine.poll_and_process(events, Some(std::time::Duration::ZERO));
            *read_due = events.iter().count() >= INLINE_EVENTS;
        } else if deadline.is_none_or(|at| at > Instant::now()) {
            // Nothing read and no timer due: nothing for the engine to do.
            return;
        }
        let now = Instant::now();
        *deadline = engine.before_poll(now);
        if *read_due {
            // More may wait in the engine's poll, and the backend's watch will not signal
            // what was ready already (io_uring's poll on it fires on what becomes ready
            // anew): the worker must not wait before the next turn reads it.
            *deadline = Some(now);
        }
    }

    /// On the worker's thread: when the engine's next timer is due (the worker waits no
    /// longer); `None` on a thread of its own or with no timer.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.driver {
            Driver::Thread { .. } => None,
            Driver::Inline { deadline, .. } => *deadline,
        }
    }

    /// On the worker's thread: the engine's poll, for the worker's backend to watch
    /// (readable when any of the engine's connections has something); `None` on a thread.
    pub fn poll_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match &self.driver {
            Driver::Thread { .. } => None,
            Driver::Inline { engine, .. } => Some(engine.poll.as_raw_fd()),
        }
    }

    /// The next event, if one waits; `now` (the worker's tick) counts its hand-over
    /// (`ClusterStats::to_worker_us`).
    pub fn try_recv(&self, now: Instant) -> Option<EngineEvent> {
        let (read, event) = self.events.try_recv().ok()?;
        let waited = now.saturating_duration_since(read).as_micros() as u64;
        self.stats.to_worker_us.record(waited, 1);
        Some(event)
    }

    /// Whether events wait.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        match &mut self.driver {
            Driver::Thread {
                waker,
                stop,
                thread,
            } => {
                stop.store(true, Ordering::SeqCst);
                if let Err(e) = waker.wake() {
                    tracing::warn!(error = %e, "cannot wake the engine thread");
                }
                if let Some(t) = thread.take()
                    && t.join().is_err()
                {
                    tracing::error!("the engine thread panicked");
                }
            }
            Driver::Inline { engine, .. } => engine.finish(),
        }
    }
}

/// A channel's subscription on its shard's pub/sub connection.
#[derive(PartialEq, Eq, Clone, Copy)]
enum SubState {
    /// Not asked for on the current connection (none is up, or it refused the channel and
    /// its backoff is not over: [`Engine::subscriptions_refused`]).
    Idle,
    /// SUBSCRIBE sent, not confirmed.
    Subscribing,
    /// Confirmed.
    Subscribed,
}

struct Channel {
    room: RoomName,
    state: SubState,
    /// The shard it is (to be) subscribed on; `None` before the slot map is known.
    shard: Option<usize>,
    /// Opens waiting for the subscription (epoch hint, tail).
    opens: Vec<(u64, u64)>,
    /// An open was sent: a resubscription must make the owner catch up.
    opened: bool,
}

struct Engine {
    /// `node/worker/`: the start of this worker's tags.
    prefix: Vec<u8>,
    node_id: String,
    worker: usize,
    topology: Topology,
    /// The master's name behind Sentinel.
    master_name: Option<String>,
    /// `cluster.redis`: the one Redis, the cluster's seeds, or the sentinels.
    seeds: Vec<RedisAddr>,
    config: ClusterConfig,
    poll: Poll,
    cmds: Receiver<(Instant, EngineCmd)>,
    events: Sender<(Instant, EngineEvent)>,
    wake_worker: Box<dyn Fn() + Send>,
    stop: Arc<AtomicBool>,
    stats: Arc<ClusterStats>,
    /// Which shard serves which room; `None` until a seed answered.
    map: Option<SlotMap>,
    /// `map.shards`, in the same order, with their connections.
    shards: Vec<Shard>,
    /// The slot map must be read again (a `MOVED`, a lost shard); not before `map_retry`.
    refresh_due: bool,
    map_retry: Retry,
    /// Resolves host names off the engine's thread (`engine/dial.rs`).
    resolver: dial::Resolver,
    /// A connection started dialing, or a command connection connected: what waits for
    /// one is queued on it ([`Engine::after_dials`]).
    dialed: bool,
    /// Publishes held behind one of their room's answered `TRYAGAIN` (`tryagain.rs`).
    held: tryagain::HeldPublishes,
    /// Opens, stream reads and membership steps waiting to go again after `TRYAGAIN`,
    /// `LOADING` or `BUSY` (`tryagain.rs`).
    later: tryagain::LaterCommands,
    /// When shards no longer needed are looked for next (`cluster.shard_idle`,
    /// `connections.rs`).
    idle_check_at: Instant,
    /// The slot map or master being read (`engine/topology.rs`), on the engine's poll.
    discovery: Option<topology::Discovery>,
    channels: HashMap<Bytes, Channel>,
    /// Users' notice channels (`members.rs`), on the shard of their key, with plain
    /// pub/sub whatever the topology (a Redis Cluster carries it to every node).
    users: HashMap<Bytes, members::UserWatch>,
    /// Receipts' commands waiting for the engine and gathers (`receipts.rs`).
    receipts: receipts::EngineReceipts,
    /// Stream reads waiting for their shard's command connection: room, start (see
    /// [`Engine::send_fill`]), reader.
    fills_waiting: Vec<(RoomName, (u64, u64), Option<u64>)>,
    /// Commands answered `MOVED` or `ASK` in the replies being read, with their hops.
    redirects: Vec<(Pending, u8, Redirect)>,
    out: Vec<EngineEvent>,
    /// The publish script this node runs (`cluster.stream_entry`, `cluster.window_order`).
    publish: String,
    publish_sha: Bytes,
    open_sha: Bytes,
    /// [`script::FILL`]'s.
    fill_sha: Bytes,
    /// Scratch for key names and the tag (reused: no allocation per publish).
    keys: [Vec<u8>; 6],
    /// Scratch for a packed publish's message head (reused; the payload goes straight
    /// from the request into the connection's buffer).
    message_head: Vec<u8>,
    /// Every shard's connections are up (counted in `engines_up`).
    up: bool,
    /// Replies decoded from one read (reused).
    replies: Vec<Value>,
    /// The most a connection buffers of a reply not yet whole ([`shard::reply_max`]).
    reply_max: usize,
    /// Connections with events from one poll (reused): (shard, pub/sub?).
    ready: Vec<(usize, bool)>,
    /// When the thread last woke (its loop's clock: commands written and replies read in
    /// one pass are stamped with it).
    woke: Instant,
    /// This worker's presence entries and membership steps waiting to go again
    /// (`presence.rs`).
    presence: presence::PresenceState,
}

/// Appends the head of one script call: the array's length, `EVALSHA <sha> <n keys>
/// <keys>` (`EVAL <script> ...` when `eval`, after a NOSCRIPT); `args` arguments follow.
fn push_script_head(
    out: &mut BytesMut,
    (script, sha, eval): (&str, &Bytes, bool),
    keys: &[&[u8]],
    args: usize,
) {
    let mut digits = [0; 20];
    resp::push_array_len(out, 3 + keys.len() + args);
    if eval {
        resp::push_bulk(out, b"EVAL");
        resp::push_bulk(out, script.as_bytes());
    } else {
        resp::push_bulk(out, b"EVALSHA");
        resp::push_bulk(out, sha);
    }
    resp::push_bulk(out, decimal(keys.len() as u64, &mut digits));
    for key in keys {
        resp::push_bulk(out, key);
    }
}

/// Appends one script call on a room's meta hash and stream: `EVALSHA <sha> 2 <meta>
/// <stream> <args>` (`EVAL <script> ...` when `eval`, after a NOSCRIPT).
fn encode_script(out: &mut BytesMut, script: (&str, &Bytes, bool), keys: &[&[u8]], args: &[&[u8]]) {
    push_script_head(out, script, keys, args.len());
    for arg in args {
        resp::push_bulk(out, arg);
    }
}

/// [`encode_script`] with each argument made of parts (a packed publish's message head and
/// its payload: the payload copied once, into `out`).
fn encode_script_parts(
    out: &mut BytesMut,
    script: (&str, &Bytes, bool),
    keys: &[&[u8]],
    args: &[&[&[u8]]],
) {
    push_script_head(out, script, keys, args.len());
    for parts in args {
        resp::push_bulk_parts(out, parts);
    }
}

/// Shard `shard`'s number in `map`, by its address in `before` (the numbering until now);
/// `None` when it is not in the new map (its subscriptions went with it).
fn renumbered(shard: Option<usize>, before: &[RedisAddr], map: &SlotMap) -> Option<usize> {
    let addr = before.get(shard?)?;
    map.shards.iter().position(|m| m == addr)
}

fn channel_key(room: &RoomName) -> Bytes {
    let mut k = Vec::new();
    script::key(&mut k, room, "c");
    Bytes::from(k)
}

impl Engine {
    fn run(mut self) {
        let mut events = Events::with_capacity(64);
        while !self.stop.load(Ordering::SeqCst) {
            let retry = self.before_poll(Instant::now());
            let timeout = retry.map(|at| at.saturating_duration_since(Instant::now()));
            if !self.poll_and_process(&mut events, timeout) {
                tracing::error!(worker = self.worker, "the engine thread stops");
                break;
            }
        }
        self.finish();
    }

    /// The first half of one pass: the topology, the worker's commands, the timers,
    /// connections, writes and events. Returns the next timer.
    fn before_poll(&mut self, now: Instant) -> Option<Instant> {
        self.woke = now;
        if self.refresh_due && self.discovery.is_none() && now >= self.map_retry.at {
            self.start_discovery();
        }
        self.advance_discovery(now);
        while let Ok((queued, cmd)) = self.cmds.try_recv() {
            let waited = now.saturating_duration_since(queued).as_micros() as u64;
            self.stats.to_engine_us.record(waited, 1);
            self.on_cmd(cmd);
        }
        let presence_at = self.presence_timers(now);
        let receipts_at = self.receipts_timer(now);
        let retry_at = self.retry_timers(now);
        let silence_at = self.silence_timers(now);
        let resubscribe_at = self.resubscribe_timers(now);
        let copies_at = self
            .shards
            .iter_mut()
            .filter_map(|s| s.copies.expire(now, &mut self.out))
            .min();
        // After the commands: a shard one of them needed starts connecting before the
        // poll waits.
        self.advance_connections(now);
        let idle_at = self.release_idle_shards(now);
        self.note_health();
        self.flush_writes();
        self.deliver_events();
        self.shards
            .iter()
            .flat_map(|s| {
                [
                    (s.wanted && s.cmd.is_none()).then_some(s.cmd_retry.at),
                    (s.wanted && s.sub.is_none()).then_some(s.sub_retry.at),
                    s.cmd.as_ref().and_then(Conn::deadline),
                    s.sub.as_ref().and_then(Conn::deadline),
                ]
            })
            .chain([
                (self.refresh_due && self.discovery.is_none()).then_some(self.map_retry.at),
                Some(presence_at),
                receipts_at,
                retry_at,
                silence_at,
                resubscribe_at,
                copies_at,
                idle_at,
                self.discovery
                    .as_ref()
                    .and_then(topology::Discovery::deadline),
            ])
            .flatten()
            .min()
    }

    /// The second half: waits up to `timeout` for the connections, reads what they
    /// have, follows redirects, writes and hands the events over. False when the poll
    /// itself failed.
    fn poll_and_process(
        &mut self,
        events: &mut Events,
        timeout: Option<std::time::Duration>,
    ) -> bool {
        if let Err(e) = self.poll.poll(events, timeout)
            && e.kind() != io::ErrorKind::Interrupted
        {
            tracing::error!(worker = self.worker, error = %e, "engine poll failed");
            return false;
        }
        self.woke = Instant::now();
        let mut ready = std::mem::take(&mut self.ready);
        ready.extend(
            events
                .iter()
                .filter(|ev| ev.token() != WAKE && ev.token() != topology::DISCOVERY)
                .map(|ev| ((ev.token().0 - 1) / 2, ev.token().0 % 2 == 0)),
        );
        // Answers before pushes: a publish's copy read in the same pass as its answer
        // releases the answer (after what the channel carried before it) and is not
        // handed over itself (`copies.rs`).
        ready.sort_unstable_by_key(|&(_, pubsub)| pubsub);
        for &(shard, pubsub) in &ready {
            if shard >= self.shards.len() {
                continue;
            }
            if pubsub {
                self.read_sub(shard);
            } else {
                self.read_cmd(shard);
            }
        }
        ready.clear();
        self.ready = ready;
        self.follow_redirects();
        self.flush_writes();
        self.deliver_events();
        true
    }

    /// The engine stops: the topology read closed, the counts of engines taken back.
    fn finish(&mut self) {
        if let Some(mut d) = self.discovery.take() {
            d.close(self.poll.registry());
        }
        if self.up {
            self.up = false;
            self.stats.engines_up.fetch_sub(1, Ordering::Relaxed);
        }
        self.stats.engines.fetch_sub(1, Ordering::Relaxed);
    }

    /// Up: the slot map (or master) is known and every shard in use has both connections
    /// up (one dialing counts as down; a shard no command needed yet is not waited for).
    fn note_health(&mut self) {
        let up = self.map.is_some()
            && !self.shards.is_empty()
            && self.shards.iter().filter(|s| s.wanted).all(Shard::up);
        if up != self.up {
            self.up = up;
            let d = if up { 1 } else { -1 };
            self.stats.engines_up.fetch_add(d, Ordering::Relaxed);
        }
    }

    /// `(subscribe, unsubscribe)`: sharded pub/sub on a Redis Cluster (a channel lives on
    /// its slot's shard), plain pub/sub on one Redis.
    fn sub_verbs(&self) -> (&'static [u8], &'static [u8]) {
        match self.topology {
            Topology::Single | Topology::Sentinel => (b"SUBSCRIBE", b"UNSUBSCRIBE"),
            Topology::Cluster => (b"SSUBSCRIBE", b"SUNSUBSCRIBE"),
        }
    }

    fn backoff(&self, retry: Retry, addr: &RedisAddr, e: &io::Error, what: &str) -> Retry {
        self.stats.count_error(EngineErrorKind::of_io(e));
        tracing::warn!(worker = self.worker, addr = %addr, error = %e, "engine {what} connection down; retrying in {} ms", retry.delay.as_millis());
        Retry {
            at: Instant::now() + retry.delay,
            delay: (retry.delay * 2).min(self.config.reconnect_max),
        }
    }

    /// Takes `map`: shards still in it keep their connections (renumbered), new ones
    /// connect, gone ones fail what was in flight on them (and hand over, unordered, the
    /// answers that waited for their copies).
    fn apply_map(&mut self, map: SlotMap) {
        let before: Vec<RedisAddr> = self.shards.iter().map(|s| s.addr.clone()).collect();
        let mut old: Vec<Option<Shard>> = std::mem::take(&mut self.shards)
            .into_iter()
            .map(Some)
            .collect();
        for (i, addr) in map.shards.iter().enumerate() {
            let mut shard = old
                .iter_mut()
                .find(|s| s.as_ref().is_some_and(|s| s.addr == *addr))
                .and_then(Option::take)
                .unwrap_or_else(|| Shard::new(addr.clone()));
            if let Err(e) = shard.reregister(self.poll.registry(), i) {
                tracing::warn!(worker = self.worker, error = %e, "cannot renumber an engine connection");
            }
            self.shards.push(shard);
        }
        // Channels follow their shard's new number; those of a gone shard lost their
        // subscription with it.
        for c in self.channels.values_mut() {
            let now_at = renumbered(c.shard, &before, &map);
            if now_at.is_none() {
                if c.state == SubState::Subscribed {
                    self.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
                }
                c.state = SubState::Idle;
            }
            c.shard = now_at;
        }
        self.renumber_users(&before, &map);
        self.map = Some(map);
        for mut gone in old.into_iter().flatten() {
            for conn in [gone.cmd.as_mut(), gone.sub.as_mut()].into_iter().flatten() {
                conn.deregister(self.poll.registry());
            }
            let inflight = std::mem::take(&mut gone.inflight);
            // Its pub/sub connection goes with it: the answers waiting for their copies
            // go to the worker unordered, as when that connection is lost.
            gone.copies.lost(&mut self.out);
            self.fail_held(std::mem::take(&mut gone.held));
            self.fail_inflight(inflight);
        }
        // Behind Sentinel the one master serves everything: dialed up front.
        if self.topology != Topology::Cluster {
            for i in 0..self.shards.len() {
                self.need(i);
            }
        }
        self.route_channels();
        self.note_health();
    }

    /// Moves every channel to the shard its slot maps to (unsubscribing where it was), and
    /// subscribes those not subscribed where their shard's pub/sub connection is up.
    fn route_channels(&mut self) {
        let (subscribe, unsubscribe) = self.sub_verbs();
        // The shards the channels (rooms' and users') live on are needed.
        let needed: Vec<usize> = match self.map.as_ref() {
            Some(map) => {
                let mut needed: Vec<usize> = (self.channels.keys())
                    .chain(self.users.keys())
                    .map(|ch| map.shard_of_key(ch))
                    .collect();
                needed.sort_unstable();
                needed.dedup();
                needed
            }
            None => return,
        };
        for i in needed {
            self.need(i);
        }
        let Some(map) = self.map.as_ref() else {
            return;
        };
        for (ch, c) in self.channels.iter_mut() {
            let want = map.shard_of_key(ch);
            if c.shard != Some(want) {
                if let Some(old) = c.shard
                    && c.state != SubState::Idle
                    && let Some(sub) = self.shards.get_mut(old).and_then(|s| s.sub.as_mut())
                {
                    resp::encode(&mut sub.wbuf, [unsubscribe, &ch[..]].into_iter());
                }
                if c.state == SubState::Subscribed {
                    self.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
                }
                c.state = SubState::Idle;
                c.shard = Some(want);
            }
            if c.state == SubState::Idle
                && let Some(sub) =
                    (self.shards.get_mut(want)).and_then(|s| s.sub_for_subscribing(self.woke))
            {
                resp::encode(&mut sub.wbuf, [subscribe, &ch[..]].into_iter());
                c.state = SubState::Subscribing;
            }
        }
        self.route_users();
    }

    /// The shard at `addr`, added (it connects at the next turn) if the map lacks it.
    fn shard_at(&mut self, addr: &RedisAddr) -> usize {
        if let Some(i) = self.shards.iter().position(|s| s.addr == *addr) {
            return i;
        }
        self.shards.push(Shard::new(addr.clone()));
        if let Some(map) = self.map.as_mut() {
            map.shards.push(addr.clone());
        }
        self.shards.len() - 1
    }

    /// A shard's connection failed: on a Redis Cluster its slots may have moved to a
    /// promoted replica, behind Sentinel the master may have, so the map is read again
    /// (from any node, or sentinel, that answers).
    fn lost_shard(&mut self) {
        if self.topology != Topology::Single {
            self.refresh_due = true;
        }
    }

    /// Commands that will get no reply: publishes fail (`unavailable`: the node does not
    /// know whether Redis ran them), opens and reads wait for the next connection.
    fn fail_inflight(&mut self, inflight: VecDeque<(Pending, u8)>) {
        let n = inflight
            .iter()
            .filter(|(p, _)| !matches!(p, Pending::Asking | Pending::Ping))
            .count() as i64;
        self.stats.pipeline_depth.fetch_sub(n, Ordering::Relaxed);
        for (p, _) in inflight {
            self.give_up(p);
        }
    }

    /// A command redirected or retried too often ([`MAX_HOPS`] together): an open is
    /// answered [`EngineEvent::OpenFailed`] (what waits for the room is refused
    /// `unavailable`; the next request opens it again), a stream read goes again after
    /// the longest wait (idempotent, and its owner has no other answer), anything else
    /// fails as when its connection is lost.
    fn refuse(&mut self, p: Pending) {
        match p {
            Pending::Fill { .. } => self.retry_later(p, MAX_HOPS),
            Pending::Open { room, .. } => {
                self.stats.retries_given_up.fetch_add(1, Ordering::Relaxed);
                self.out.push(EngineEvent::OpenFailed { room });
            }
            other => {
                self.stats.retries_given_up.fetch_add(1, Ordering::Relaxed);
                self.give_up(other);
            }
        }
    }

    /// A command that will not be answered: a publish fails, an open or read waits.
    fn give_up(&mut self, p: Pending) {
        match p {
            Pending::Publish(req, _) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                self.publish_answered(&req.room, req.ticket);
                self.out
                    .push(EngineEvent::PublishFailed { ticket: req.ticket });
            }
            Pending::Open { room, hint, tail } => {
                if let Some(c) = self.channels.get_mut(&channel_key(&room)) {
                    c.opens.push((hint, tail));
                }
            }
            Pending::Fill {
                room,
                after,
                reader,
            } => self.fills_waiting.push((room, after, reader)),
            // The acknowledgements it held are failed with the connection (`fail_cmd`).
            Pending::Asking | Pending::Ping | Pending::Wait => {}
            Pending::Members(step) => self.fail_member_step(step),
            Pending::Receipts(step) => self.receipts_give_up(step),
        }
    }

    fn fail_cmd(&mut self, i: usize, e: &io::Error) {
        let Some(shard) = self.shards.get_mut(i) else {
            return;
        };
        if let Some(mut conn) = shard.cmd.take() {
            conn.deregister(self.poll.registry());
        }
        let inflight = std::mem::take(&mut shard.inflight);
        let held = std::mem::take(&mut shard.held);
        shard.wait_due = false;
        let addr = shard.addr.clone();
        self.shards[i].cmd_retry = self.backoff(self.shards[i].cmd_retry, &addr, e, "command");
        self.fail_held(held);
        self.fail_inflight(inflight);
        self.lost_shard();
        self.note_health();
    }

    fn fail_sub(&mut self, i: usize, e: &io::Error) {
        let Some(shard) = self.shards.get_mut(i) else {
            return;
        };
        if let Some(mut conn) = shard.sub.take() {
            conn.deregister(self.poll.registry());
        }
        // No copy due will come: the answers waiting for one go unordered.
        shard.copies.lost(&mut self.out);
        // The next connection subscribes everything, after its own backoff.
        shard.resubscribe_at = None;
        let addr = shard.addr.clone();
        self.shards[i].sub_retry = self.backoff(self.shards[i].sub_retry, &addr, e, "pub/sub");
        let mut confirmed = 0;
        for c in self.channels.values_mut().filter(|c| c.shard == Some(i)) {
            confirmed += i64::from(c.state == SubState::Subscribed);
            c.state = SubState::Idle;
        }
        self.stats
            .subscriptions
            .fetch_sub(confirmed, Ordering::Relaxed);
        self.users_down(i);
        self.lost_shard();
        self.note_health();
    }

    /// Shard `i`'s pub/sub connection answered a subscription with an error (`-BUSY`
    /// while a script runs, `-NOPERM`, ...; the error does not name the channel): its
    /// channels and users not confirmed yet are subscribed again after a backoff (that of
    /// the pub/sub connection's reconnection, doubling from its last delay up to
    /// `cluster.reconnect_max`), the connection and what it holds untouched. One whose
    /// confirmation comes meanwhile (sent after the refused one) is subscribed as usual.
    fn subscriptions_refused(&mut self, i: usize) {
        let (now, max) = (self.woke, self.config.reconnect_max);
        let Some(shard) = self.shards.get_mut(i) else {
            return;
        };
        let mut refused = 0;
        for c in self.channels.values_mut().filter(|c| c.shard == Some(i)) {
            if c.state == SubState::Subscribing {
                c.state = SubState::Idle;
                refused += 1;
            }
        }
        for w in self.users.values_mut().filter(|w| w.shard == Some(i)) {
            if w.state == SubState::Subscribing {
                w.state = SubState::Idle;
                refused += 1;
            }
        }
        if refused == 0 {
            return; // it answered something else (a `PING`): nothing to subscribe again
        }
        let delay = shard.sub_retry.delay;
        shard.resubscribe_at = Some(now + delay);
        shard.sub_retry.delay = (delay * 2).min(max);
        tracing::warn!(worker = self.worker, addr = %self.shards[i].addr, "subscriptions refused; subscribing again in {} ms", delay.as_millis());
    }

    /// Subscribes what waited since a refusal ([`Engine::subscriptions_refused`]) once its
    /// backoff is over; returns when the next one is.
    fn resubscribe_timers(&mut self, now: Instant) -> Option<Instant> {
        let mut due = false;
        for shard in &mut self.shards {
            if shard.resubscribe_at.is_some_and(|at| at <= now) {
                shard.resubscribe_at = None;
                due = true;
            }
        }
        if due {
            self.route_channels();
        }
        self.shards.iter().filter_map(|s| s.resubscribe_at).min()
    }

    fn on_cmd(&mut self, cmd: EngineCmd) {
        match cmd {
            // Behind a publish of its room waiting for a retry (TRYAGAIN): after it.
            EngineCmd::Publish(req) if self.held.behind(&req.room, req.ticket) => {
                self.hold_behind(req)
            }
            EngineCmd::Publish(req) => self.send_publish(req, false, None, 0),
            EngineCmd::Open {
                room,
                epoch_hint,
                tail,
            } => {
                let ch = channel_key(&room);
                let shard = self.route(&ch);
                let c = self.channels.entry(ch.clone()).or_insert(Channel {
                    room,
                    state: SubState::Idle,
                    shard,
                    opens: Vec::new(),
                    opened: false,
                });
                c.opens.push((epoch_hint, tail.min(MAX_OPEN_TAIL)));
                match c.state {
                    SubState::Subscribed => self.send_opens(&ch),
                    SubState::Subscribing => {}
                    SubState::Idle => self.route_channels(),
                }
            }
            EngineCmd::Raise { room, epoch, head } => {
                let step = members::Step::Raise {
                    room,
                    epoch,
                    head,
                    tries: 0,
                };
                self.send_step(step, None, 0);
            }
            EngineCmd::Fill { room, after, sub } => {
                self.send_fill(room, (after, sub), None, None, 0, false);
            }
            EngineCmd::Read {
                room,
                after,
                reader,
            } => self.send_fill(room, (after, u64::MAX), Some(reader), None, 0, false),
            cmd @ (EngineCmd::Member(_)
            | EngineCmd::WatchUser { .. }
            | EngineCmd::UnwatchUser { .. }
            | EngineCmd::ReadMembers { .. }
            | EngineCmd::Kick { .. }
            | EngineCmd::Claim { .. }
            | EngineCmd::Release { .. }
            | EngineCmd::Lookup { .. }) => self.on_member_cmd(cmd),
            EngineCmd::Markers {
                room,
                epoch,
                markers,
            } => self.send_markers(room, epoch, markers, (false, None, 0)),
            EngineCmd::Handoff(check) => self.send_handoff(check, (false, None, 0)),
            EngineCmd::LoadMarkers { room } => self.send_load_markers(room),
            EngineCmd::ReadReceipts { ticket, room } => self.send_read_receipts(ticket, &room),
            EngineCmd::ReadUnread {
                ticket,
                user,
                max_rooms,
            } => self.send_read_unread(ticket, &user, max_rooms),
            EngineCmd::Close { room } => {
                let ch = channel_key(&room);
                let (_, unsubscribe) = self.sub_verbs();
                if let Some(c) = self.channels.remove(&ch) {
                    if c.state == SubState::Subscribed {
                        self.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
                    }
                    if c.state != SubState::Idle
                        && let Some(sub) = c
                            .shard
                            .and_then(|i| self.shards.get_mut(i))
                            .and_then(|s| s.sub.as_mut())
                    {
                        resp::encode(&mut sub.wbuf, [unsubscribe, &ch[..]].into_iter());
                    }
                }
            }
        }
    }

    /// Runs the publish script on the room's shard (`target`: a shard named by an `ASK`).
    fn send_publish(&mut self, req: PublishRequest, eval: bool, target: Option<usize>, hops: u8) {
        let mut meta = std::mem::take(&mut self.keys[0]);
        script::key(&mut meta, &req.room, "m");
        let shard = target.or_else(|| self.route(&meta));
        self.keys[0] = meta;
        let [meta, stream, ids, channel, tag, repeat] = &mut self.keys;
        let Some(shard) = shard.and_then(|i| self.shards.get_mut(i)) else {
            return self.give_up(Pending::Publish(req, self.woke));
        };
        let Some(conn) = shard.cmd.as_mut() else {
            return self.give_up(Pending::Publish(req, self.woke));
        };
        script::key(stream, &req.room, "s");
        script::key(ids, &req.room, "i");
        script::key(channel, &req.room, "c");
        script::tag(tag, &self.node_id, self.worker, req.ticket);
        script::repeat_key(repeat, req.repeat.as_ref());
        let (mut d1, mut d2, mut d4) = ([0; 20], [0; 20], [0; 20]);
        let (mut d5, mut d6, mut d7, mut d8) = ([0; 20], [0; 20], [0; 20], [0; 20]);
        let expire = match req.expire_ms {
            Some(ms) => decimal(ms, &mut d6),
            None => &[],
        };
        // The owner's epoch and head are the last two arguments, left out without them
        // (each argument costs Redis about 1,200 instructions a call).
        let (owner_epoch, owner_head) = match req.owner_head {
            Some((epoch, head)) => (decimal(epoch, &mut d7), decimal(head, &mut d8)),
            None => (&[][..], &[][..]),
        };
        let without_owner = usize::from(req.owner_head.is_none()) * 2;
        let hint = decimal(req.epoch_hint, &mut d1);
        let window = decimal(req.window.max(1) as u64, &mut d4);
        match self.config.stream_entry {
            StreamEntry::Packed => {
                let sender = req.sender.as_bytes();
                script::message_head(&mut self.message_head, req.ts_ms, tag, sender);
                let args: [&[&[u8]]; 8] = [
                    &[hint],
                    &[&self.message_head, &req.payload],
                    &[channel],
                    &[repeat],
                    &[window],
                    &[expire],
                    &[owner_epoch],
                    &[owner_head],
                ];
                encode_script_parts(
                    &mut conn.wbuf,
                    (&self.publish, &self.publish_sha, eval),
                    &[meta, stream, ids],
                    &args[..args.len() - without_owner],
                );
            }
            StreamEntry::Fields => {
                let args: [&[u8]; 12] = [
                    hint,
                    decimal(req.ts_ms, &mut d2),
                    tag,
                    req.sender.as_bytes(),
                    &req.payload,
                    channel,
                    repeat,
                    window,
                    decimal(req.sender.as_bytes().len() as u64, &mut d5),
                    expire,
                    owner_epoch,
                    owner_head,
                ];
                encode_script(
                    &mut conn.wbuf,
                    (&self.publish, &self.publish_sha, eval),
                    &[meta, stream, ids],
                    &args[..args.len() - without_owner],
                );
            }
        }
        self.stats.pipeline_depth.fetch_add(1, Ordering::Relaxed);
        shard.wait_due = self.config.wait_replicas > 0;
        shard
            .inflight
            .push_back((Pending::Publish(req, self.woke), hops));
    }

    fn send_open(
        &mut self,
        room: RoomName,
        hint: u64,
        tail: u64,
        eval: bool,
        target: Option<usize>,
        hops: u8,
    ) {
        let mut meta = std::mem::take(&mut self.keys[0]);
        script::key(&mut meta, &room, "m");
        let shard = target.or_else(|| self.route(&meta));
        self.keys[0] = meta;
        let [meta, stream, removals, ..] = &mut self.keys;
        let Some(shard) = shard.and_then(|i| self.shards.get_mut(i)) else {
            return self.give_up(Pending::Open { room, hint, tail });
        };
        let Some(conn) = shard.cmd.as_mut() else {
            return self.give_up(Pending::Open { room, hint, tail });
        };
        script::key(stream, &room, "s");
        script::key(removals, &room, "x");
        let (mut d1, mut d2) = ([0; 20], [0; 20]);
        encode_script(
            &mut conn.wbuf,
            (OPEN, &self.open_sha, eval),
            &[meta, stream, removals],
            &[decimal(hint, &mut d1), decimal(tail, &mut d2)],
        );
        self.stats.pipeline_depth.fetch_add(1, Ordering::Relaxed);
        shard
            .inflight
            .push_back((Pending::Open { room, hint, tail }, hops));
    }

    /// Sends the opens waiting on channel `ch` (its subscription is confirmed).
    fn send_opens(&mut self, ch: &Bytes) {
        let Some(c) = self.channels.get(ch) else {
            return;
        };
        if c.shard
            .and_then(|i| self.shards.get(i))
            .is_none_or(|s| s.cmd.is_none())
        {
            return; // they wait for the shard's command connection
        }
        let Some(c) = self.channels.get_mut(ch) else {
            return;
        };
        let opens = std::mem::take(&mut c.opens);
        c.opened = true;
        let room = c.room.clone();
        for (hint, tail) in opens {
            self.send_open(room.clone(), hint, tail, false, None, 0);
        }
    }

    /// Reads a page of the room's stream after the entry `after` = `(seq, sub)`, exclusive
    /// (`XRANGE (<seq>-<sub> + COUNT fill_batch`): for the owner's history (after its head
    /// message and the removals after it already applied) or for a `reader` (sub
    /// `u64::MAX`: from the next message); waits for the room's shard's command connection
    /// while it is down.
    ///
    /// The owner's reads run [`script::FILL`] (`eval`: by its text, after a `NOSCRIPT`),
    /// which also answers the room's epoch and the removals retention dropped; a reader's
    /// are a plain `XRANGE`.
    fn send_fill(
        &mut self,
        room: RoomName,
        after: (u64, u64),
        reader: Option<u64>,
        target: Option<usize>,
        hops: u8,
        eval: bool,
    ) {
        let mut stream_key = std::mem::take(&mut self.keys[1]);
        script::key(&mut stream_key, &room, "s");
        let shard = target.or_else(|| self.route(&stream_key));
        self.keys[1] = stream_key;
        let [meta, stream, start, removals, ..] = &mut self.keys;
        let Some(conn) = shard
            .and_then(|i| self.shards.get_mut(i))
            .and_then(|s| s.cmd.as_mut())
        else {
            self.fills_waiting.push((room, after, reader));
            return;
        };
        start.clear();
        let mut d = [0; 20];
        start.push(b'(');
        start.extend_from_slice(decimal(after.0, &mut d));
        start.push(b'-');
        start.extend_from_slice(decimal(after.1, &mut d));
        let mut d2 = [0; 20];
        let count = decimal(self.config.fill_batch as u64, &mut d2);
        if reader.is_none() {
            script::key(meta, &room, "m");
            script::key(removals, &room, "x");
            let (mut d3, mut d4) = ([0; 20], [0; 20]);
            encode_script(
                &mut conn.wbuf,
                (script::FILL, &self.fill_sha, eval),
                &[stream, removals, meta],
                &[
                    start,
                    count,
                    decimal(after.0, &mut d3),
                    decimal(after.1, &mut d4),
                ],
            );
        } else {
            resp::encode(
                &mut conn.wbuf,
                [
                    &b"XRANGE"[..],
                    &stream[..],
                    &start[..],
                    &b"+"[..],
                    &b"COUNT"[..],
                    count,
                ]
                .into_iter(),
            );
        }
        self.stats.pipeline_depth.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = shard.and_then(|i| self.shards.get_mut(i)) {
            s.inflight.push_back((
                Pending::Fill {
                    room,
                    after,
                    reader,
                },
                hops,
            ));
        }
    }

    /// Sends a redirected (or NOSCRIPT-answered) command again.
    fn resend(&mut self, p: Pending, eval: bool, target: Option<usize>, hops: u8) {
        match p {
            Pending::Publish(req, _) => self.send_publish(req, eval, target, hops),
            Pending::Open { room, hint, tail } => {
                self.send_open(room, hint, tail, eval, target, hops)
            }
            Pending::Fill {
                room,
                after,
                reader,
            } => self.send_fill(room, after, reader, target, hops, eval),
            Pending::Asking | Pending::Ping | Pending::Wait => {}
            // Membership's steps go where Redis said too (`engine/members.rs`).
            Pending::Members(step) => self.send_step_as(step, eval, target, hops),
            Pending::Receipts(step) => self.receipts_resend(step, eval, target, hops),
        }
    }

    /// Sends the commands answered `MOVED` or `ASK` where Redis said.
    fn follow_redirects(&mut self) {
        for (p, hops, r) in std::mem::take(&mut self.redirects) {
            match r {
                Redirect::Moved { slot, addr } => {
                    let i = self.shard_at(&addr);
                    if let Some(map) = self.map.as_mut() {
                        map.set(slot, i);
                    }
                    self.refresh_due = true;
                    self.route_channels();
                    self.resend(p, false, None, hops);
                }
                Redirect::Ask { addr } => {
                    let i = self.shard_at(&addr);
                    self.need(i);
                    match self.shards[i].cmd.as_mut() {
                        Some(conn) => {
                            resp::encode(&mut conn.wbuf, [&b"ASKING"[..]].into_iter());
                            self.shards[i].inflight.push_back((Pending::Asking, 0));
                            // EVAL, not EVALSHA: a NOSCRIPT's resend would lack the ASKING.
                            self.resend(p, true, Some(i), hops);
                        }
                        // Not connected yet: it goes back to the slot's owner, which asks
                        // again (bounded by the hops).
                        None => self.resend(p, false, None, hops),
                    }
                }
            }
        }
    }

    /// One `WAIT` after the publishes written on each shard since its last one
    /// (`cluster.wait_replicas`): their acknowledgements are held until it answers.
    fn append_waits(&mut self) {
        let mut replicas = [0; 20];
        let replicas = decimal(u64::from(self.config.wait_replicas), &mut replicas);
        let mut ms = [0; 20];
        let ms = decimal(self.config.wait_timeout.as_millis() as u64, &mut ms);
        for shard in self.shards.iter_mut().filter(|s| s.wait_due) {
            shard.wait_due = false;
            if let Some(conn) = shard.cmd.as_mut() {
                resp::encode(&mut conn.wbuf, [&b"WAIT"[..], replicas, ms].into_iter());
                self.stats.pipeline_depth.fetch_add(1, Ordering::Relaxed);
                shard.inflight.push_back((Pending::Wait, 0));
            }
        }
    }

    /// Acknowledgements held for a `WAIT` that will not answer, or answered with too few
    /// replicas: refused `unavailable` (Redis ran them; the retry with the same
    /// idempotency key gets their sequence).
    fn fail_held(&mut self, held: Vec<EngineEvent>) {
        for ev in held {
            if let EngineEvent::Published { ticket, .. } = ev {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                self.out.push(EngineEvent::PublishFailed { ticket });
            }
        }
    }

    fn flush_writes(&mut self) {
        self.append_waits();
        let mut failed = Vec::new();
        for (i, shard) in self.shards.iter_mut().enumerate() {
            if let Some(conn) = shard.cmd.as_mut()
                && let Err(e) = conn.flush()
            {
                failed.push((i, false, e));
            }
            if let Some(conn) = shard.sub.as_mut()
                && let Err(e) = conn.flush()
            {
                failed.push((i, true, e));
            }
        }
        for (i, pubsub, e) in failed {
            if pubsub {
                self.fail_sub(i, &e);
            } else {
                self.fail_cmd(i, &e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/readyz` and the tests' wait for the engine read `ClusterStats::healthy`: a node
    /// whose engine thread has not run yet must not look healthy (it did while the thread
    /// counted itself, and a HELLO sent then was refused `unavailable`).
    #[test]
    fn an_engine_counts_as_down_from_the_moment_it_is_spawned() {
        let stats = Arc::new(ClusterStats::default());
        let config = ClusterConfig {
            // Nothing listens on port 1: the engine stays down.
            redis: vec!["redis://127.0.0.1:1".into()],
            ..ClusterConfig::default()
        };
        let handle = EngineHandle::spawn(0, &config, 16 << 10, "t", Box::new(|| {}), stats.clone())
            .expect("the engine thread starts");
        assert_eq!(stats.engines.load(Ordering::Relaxed), 1);
        assert!(!stats.healthy());
        drop(handle);
        assert_eq!(stats.engines.load(Ordering::Relaxed), 0);
        assert!(stats.healthy(), "no engine left, none down");
    }
}
