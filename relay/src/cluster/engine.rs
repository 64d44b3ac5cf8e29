//! One worker's engine thread: two pipelined connections to Redis (commands, pub/sub) on
//! mio, fed by the worker once per loop tick and answering through a channel and the
//! worker's wakeup.
//!
//! Owns: the connections, what is in flight on them, the subscribed channels and
//! reconnection with backoff. Must not touch: rooms or connections (it only reports
//! [`EngineEvent`]s), the worker's thread (it never blocks the worker: the worker only
//! sends on an unbounded channel whose length the worker bounds itself).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{Receiver, Sender};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};

use super::resp::{self, Value, decimal};
use super::script::{self, OPEN, PUBLISH};
use super::{ClusterConfig, ClusterStats, EngineCmd, EngineEvent, PublishRequest, RedisAddr};
use crate::ids::RoomName;

const CMD: Token = Token(0);
const SUB: Token = Token(1);
const WAKE: Token = Token(2);
/// The first reconnect delay (doubling up to `cluster.reconnect_max`).
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Events waiting for the worker; a full queue makes the engine thread wait (and Redis
/// buffer, or drop the subscriber, which the owner then repairs from the stream).
const EVENT_QUEUE: usize = 65_536;

/// The worker's side of its engine thread; dropping it stops the thread.
#[derive(Debug)]
pub struct EngineHandle {
    tx: Sender<EngineCmd>,
    events: Receiver<EngineEvent>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EngineHandle {
    /// Starts worker `worker`'s engine thread; `wake_worker` wakes the worker's loop when
    /// events wait.
    pub fn spawn(
        worker: usize,
        config: &ClusterConfig,
        node_id: &str,
        wake_worker: Box<dyn Fn() + Send>,
        stats: Arc<ClusterStats>,
    ) -> io::Result<Self> {
        let addr = config.redis_addr().map_err(io::Error::other)?;
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let (tx, cmds) = crossbeam_channel::unbounded();
        let (events_tx, events) = crossbeam_channel::bounded(EVENT_QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let engine = Engine {
            prefix: format!("{node_id}/{worker}/").into_bytes(),
            node_id: node_id.to_owned(),
            worker,
            addr,
            config: config.clone(),
            poll,
            cmds,
            events: events_tx,
            wake_worker,
            stop: stop.clone(),
            stats,
            cmd: None,
            sub: None,
            cmd_retry: (Instant::now(), BACKOFF_MIN),
            sub_retry: (Instant::now(), BACKOFF_MIN),
            inflight: VecDeque::new(),
            channels: HashMap::new(),
            fills_waiting: Vec::new(),
            out: Vec::new(),
            publish_sha: script::sha1_hex(PUBLISH),
            open_sha: script::sha1_hex(OPEN),
            keys: Default::default(),
            up: false,
            replies: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("pabal-engine-{worker}"))
            .spawn(move || engine.run())?;
        Ok(EngineHandle {
            tx,
            events,
            waker,
            stop,
            thread: Some(thread),
        })
    }

    /// Queues a command (the engine thread runs it after the next [`EngineHandle::wake`]).
    pub fn send(&self, cmd: EngineCmd) {
        // The thread only ends when this handle drops.
        let _ = self.tx.send(cmd);
    }

    /// Wakes the engine thread for the commands queued since the last wake.
    pub fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            tracing::warn!(error = %e, "cannot wake the engine thread");
        }
    }

    /// The next event, if one waits.
    pub fn try_recv(&self) -> Option<EngineEvent> {
        self.events.try_recv().ok()
    }

    /// Whether events wait.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the engine thread panicked");
        }
    }
}

/// A connection to Redis with its buffers.
struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

/// A command on the command connection awaiting its reply (in order).
enum Pending {
    Publish(PublishRequest),
    Open {
        room: RoomName,
        hint: u64,
        tail: u64,
    },
    Fill {
        room: RoomName,
        after: u64,
        /// The owner's reader waiting for this page ([`EngineCmd::Read`]); `None`: a fill
        /// of the owner's own history.
        reader: Option<u64>,
    },
}

/// A channel's subscription on the pub/sub connection.
#[derive(PartialEq, Eq, Clone, Copy)]
enum SubState {
    /// Not asked for on the current connection (none is up).
    Idle,
    /// SUBSCRIBE sent, not confirmed.
    Subscribing,
    /// Confirmed.
    Subscribed,
}

struct Channel {
    room: RoomName,
    state: SubState,
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
    addr: RedisAddr,
    config: ClusterConfig,
    poll: Poll,
    cmds: Receiver<EngineCmd>,
    events: Sender<EngineEvent>,
    wake_worker: Box<dyn Fn() + Send>,
    stop: Arc<AtomicBool>,
    stats: Arc<ClusterStats>,
    cmd: Option<Conn>,
    sub: Option<Conn>,
    /// When to try connecting next, and the delay after that.
    cmd_retry: (Instant, Duration),
    sub_retry: (Instant, Duration),
    inflight: VecDeque<Pending>,
    channels: HashMap<Bytes, Channel>,
    fills_waiting: Vec<(RoomName, u64, Option<u64>)>,
    out: Vec<EngineEvent>,
    publish_sha: Bytes,
    open_sha: Bytes,
    /// Scratch for key names and the tag (reused: no allocation per publish).
    keys: [Vec<u8>; 6],
    /// Both connections are up (counted in `engines_up`).
    up: bool,
    /// Replies decoded from one read (reused).
    replies: Vec<Value>,
}

/// Appends one script call on a room's meta hash and stream: `EVALSHA <sha> 2 <meta>
/// <stream> <args>` (`EVAL <script> ...` when `eval`, after a NOSCRIPT).
fn encode_script(
    out: &mut BytesMut,
    (script, sha, eval): (&str, &Bytes, bool),
    keys: &[&[u8]],
    args: &[&[u8]],
) {
    let mut all: [&[u8]; 20] = [&[]; 20];
    let mut digits = [0; 20];
    let head: [&[u8]; 3] = if eval {
        [
            b"EVAL",
            script.as_bytes(),
            decimal(keys.len() as u64, &mut digits),
        ]
    } else {
        [b"EVALSHA", sha, decimal(keys.len() as u64, &mut digits)]
    };
    let mut n = 0;
    for part in [&head[..], keys, args] {
        all[n..n + part.len()].copy_from_slice(part);
        n += part.len();
    }
    resp::encode(out, all[..n].iter().copied());
}

fn channel_key(room: &RoomName) -> Bytes {
    let mut k = Vec::new();
    script::key(&mut k, room, "c");
    Bytes::from(k)
}

impl Engine {
    fn run(mut self) {
        self.stats.engines.fetch_add(1, Ordering::Relaxed);
        let mut events = Events::with_capacity(16);
        while !self.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            if self.cmd.is_none() && now >= self.cmd_retry.0 {
                self.connect_cmd(now);
            }
            if self.sub.is_none() && now >= self.sub_retry.0 {
                self.connect_sub(now);
            }
            self.note_health();
            while let Ok(cmd) = self.cmds.try_recv() {
                self.on_cmd(cmd);
            }
            self.flush_writes();
            self.deliver_events();
            let retry = [
                self.cmd.is_none().then_some(self.cmd_retry.0),
                self.sub.is_none().then_some(self.sub_retry.0),
            ]
            .into_iter()
            .flatten()
            .min();
            let timeout = retry.map(|at| at.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                tracing::error!(worker = self.worker, error = %e, "engine poll failed; the engine thread stops");
                break;
            }
            let (mut cmd_ready, mut sub_ready) = (false, false);
            for ev in events.iter() {
                match ev.token() {
                    CMD => cmd_ready = true,
                    SUB => sub_ready = true,
                    _ => {}
                }
            }
            if cmd_ready {
                self.read_cmd();
            }
            if sub_ready {
                self.read_sub();
            }
            self.flush_writes();
            self.deliver_events();
        }
        if self.up {
            self.stats.engines_up.fetch_sub(1, Ordering::Relaxed);
        }
        self.stats.engines.fetch_sub(1, Ordering::Relaxed);
    }

    fn note_health(&mut self) {
        let up = self.cmd.is_some() && self.sub.is_some();
        if up != self.up {
            self.up = up;
            let d = if up { 1 } else { -1 };
            self.stats.engines_up.fetch_add(d, Ordering::Relaxed);
        }
    }

    fn connect(&self, token: Token) -> io::Result<Conn> {
        let mut last = io::Error::other("the address resolves to nothing");
        for a in (self.addr.host.as_str(), self.addr.port).to_socket_addrs()? {
            match std::net::TcpStream::connect_timeout(&a, self.config.connect_timeout) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    s.set_nonblocking(true)?;
                    let mut stream = TcpStream::from_std(s);
                    self.poll.registry().register(
                        &mut stream,
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    return Ok(Conn {
                        stream,
                        rbuf: BytesMut::with_capacity(64 * 1024),
                        wbuf: BytesMut::with_capacity(64 * 1024),
                    });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn backoff(
        &self,
        now: Instant,
        delay: Duration,
        e: &io::Error,
        what: &str,
    ) -> (Instant, Duration) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(worker = self.worker, addr = %self.addr, error = %e, "engine {what} connection down; retrying in {} ms", delay.as_millis());
        (now + delay, (delay * 2).min(self.config.reconnect_max))
    }

    fn connect_cmd(&mut self, now: Instant) {
        match self.connect(CMD) {
            Ok(conn) => {
                self.cmd = Some(conn);
                self.cmd_retry.1 = BACKOFF_MIN;
                tracing::info!(worker = self.worker, node = %self.node_id, addr = %self.addr, "engine command connection up");
                let ready: Vec<Bytes> = self
                    .channels
                    .iter()
                    .filter(|(_, c)| c.state == SubState::Subscribed && !c.opens.is_empty())
                    .map(|(k, _)| k.clone())
                    .collect();
                for ch in ready {
                    self.send_opens(&ch);
                }
                for (room, after, reader) in std::mem::take(&mut self.fills_waiting) {
                    self.send_fill(room, after, reader);
                }
            }
            Err(e) => self.cmd_retry = self.backoff(now, self.cmd_retry.1, &e, "command"),
        }
    }

    fn connect_sub(&mut self, now: Instant) {
        match self.connect(SUB) {
            Ok(mut conn) => {
                self.sub_retry.1 = BACKOFF_MIN;
                tracing::info!(worker = self.worker, addr = %self.addr, "engine pub/sub connection up");
                if !self.channels.is_empty() {
                    let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
                    for (k, c) in self.channels.iter_mut() {
                        c.state = SubState::Subscribing;
                        args.push(&k[..]);
                    }
                    resp::encode(&mut conn.wbuf, args.into_iter());
                }
                self.sub = Some(conn);
            }
            Err(e) => self.sub_retry = self.backoff(now, self.sub_retry.1, &e, "pub/sub"),
        }
    }

    /// The command connection failed: what was in flight fails (publishes) or waits for
    /// the next connection (opens, fills).
    fn fail_cmd(&mut self, e: &io::Error) {
        if let Some(mut conn) = self.cmd.take() {
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
        let now = Instant::now();
        self.cmd_retry = self.backoff(now, self.cmd_retry.1, e, "command");
        let n = self.inflight.len() as i64;
        self.stats.pipeline_depth.fetch_sub(n, Ordering::Relaxed);
        for p in std::mem::take(&mut self.inflight) {
            match p {
                Pending::Publish(req) => {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
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
            }
        }
        self.note_health();
    }

    fn fail_sub(&mut self, e: &io::Error) {
        if let Some(mut conn) = self.sub.take() {
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
        let now = Instant::now();
        self.sub_retry = self.backoff(now, self.sub_retry.1, e, "pub/sub");
        let mut confirmed = 0;
        for c in self.channels.values_mut() {
            confirmed += i64::from(c.state == SubState::Subscribed);
            c.state = SubState::Idle;
        }
        self.stats
            .subscriptions
            .fetch_sub(confirmed, Ordering::Relaxed);
        self.note_health();
    }

    fn on_cmd(&mut self, cmd: EngineCmd) {
        match cmd {
            EngineCmd::Publish(req) => self.send_publish(req, false),
            EngineCmd::Open {
                room,
                epoch_hint,
                tail,
            } => {
                let ch = channel_key(&room);
                let sub_up = self.sub.is_some();
                let c = self.channels.entry(ch.clone()).or_insert(Channel {
                    room,
                    state: SubState::Idle,
                    opens: Vec::new(),
                    opened: false,
                });
                c.opens.push((epoch_hint, tail));
                let state = c.state;
                if state == SubState::Idle && sub_up {
                    c.state = SubState::Subscribing;
                }
                match state {
                    SubState::Subscribed => self.send_opens(&ch),
                    SubState::Subscribing => {}
                    SubState::Idle => {
                        if let Some(sub) = self.sub.as_mut() {
                            resp::encode(&mut sub.wbuf, [&b"SUBSCRIBE"[..], &ch[..]].into_iter());
                        }
                    }
                }
            }
            EngineCmd::Fill { room, after } => self.send_fill(room, after, None),
            EngineCmd::Read {
                room,
                after,
                reader,
            } => self.send_fill(room, after, Some(reader)),
            EngineCmd::Close { room } => {
                let ch = channel_key(&room);
                if let Some(c) = self.channels.remove(&ch) {
                    if c.state == SubState::Subscribed {
                        self.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
                    }
                    if c.state != SubState::Idle
                        && let Some(sub) = self.sub.as_mut()
                    {
                        resp::encode(&mut sub.wbuf, [&b"UNSUBSCRIBE"[..], &ch[..]].into_iter());
                    }
                }
            }
        }
    }

    fn send_publish(&mut self, req: PublishRequest, eval: bool) {
        let Some(conn) = self.cmd.as_mut() else {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            self.out
                .push(EngineEvent::PublishFailed { ticket: req.ticket });
            return;
        };
        let [meta, stream, ids, channel, tag, repeat] = &mut self.keys;
        script::key(meta, &req.room, "m");
        script::key(stream, &req.room, "s");
        script::key(ids, &req.room, "i");
        script::key(channel, &req.room, "c");
        script::tag(tag, &self.node_id, self.worker, req.ticket);
        script::repeat_key(repeat, req.repeat.as_ref());
        let (mut d1, mut d2, mut d3, mut d4) = ([0; 20], [0; 20], [0; 20], [0; 20]);
        let sha = &self.publish_sha;
        encode_script(
            &mut conn.wbuf,
            (PUBLISH, sha, eval),
            &[meta, stream, ids],
            &[
                decimal(req.epoch_hint, &mut d1),
                decimal(req.ts_ms, &mut d2),
                tag,
                req.sender.as_bytes(),
                &req.payload,
                decimal(self.config.stream_max_len, &mut d3),
                channel,
                repeat,
                decimal(req.window.max(1) as u64, &mut d4),
            ],
        );
        self.stats.pipeline_depth.fetch_add(1, Ordering::Relaxed);
        self.inflight.push_back(Pending::Publish(req));
    }

    fn send_open(&mut self, room: RoomName, hint: u64, tail: u64, eval: bool) {
        let Some(conn) = self.cmd.as_mut() else {
            if let Some(c) = self.channels.get_mut(&channel_key(&room)) {
                c.opens.push((hint, tail));
            }
            return;
        };
        let [meta, stream, ..] = &mut self.keys;
        script::key(meta, &room, "m");
        script::key(stream, &room, "s");
        let (mut d1, mut d2) = ([0; 20], [0; 20]);
        encode_script(
            &mut conn.wbuf,
            (OPEN, &self.open_sha, eval),
            &[meta, stream],
            &[decimal(hint, &mut d1), decimal(tail, &mut d2)],
        );
        self.stats.pipeline_depth.fetch_add(1, Ordering::Relaxed);
        self.inflight.push_back(Pending::Open { room, hint, tail });
    }

    /// Sends the opens waiting on channel `ch` (its subscription is confirmed).
    fn send_opens(&mut self, ch: &Bytes) {
        if self.cmd.is_none() {
            return;
        }
        let Some(c) = self.channels.get_mut(ch) else {
            return;
        };
        let opens = std::mem::take(&mut c.opens);
        c.opened = true;
        let room = c.room.clone();
        for (hint, tail) in opens {
            self.send_open(room.clone(), hint, tail, false);
        }
    }

    /// Reads a page of the room's stream after `after` (`XRANGE <after+1>-0 + COUNT
    /// fill_batch`), for the owner's history or for a `reader`; waits for the command
    /// connection while it is down.
    fn send_fill(&mut self, room: RoomName, after: u64, reader: Option<u64>) {
        let Some(conn) = self.cmd.as_mut() else {
            self.fills_waiting.push((room, after, reader));
            return;
        };
        let [_, stream, start, ..] = &mut self.keys;
        script::key(stream, &room, "s");
        start.clear();
        let mut d = [0; 20];
        start.extend_from_slice(decimal(after + 1, &mut d));
        start.extend_from_slice(b"-0");
        let mut d2 = [0; 20];
        resp::encode(
            &mut conn.wbuf,
            [
                &b"XRANGE"[..],
                &stream[..],
                &start[..],
                &b"+"[..],
                &b"COUNT"[..],
                decimal(self.config.fill_batch as u64, &mut d2),
            ]
            .into_iter(),
        );
        self.stats.pipeline_depth.fetch_add(1, Ordering::Relaxed);
        self.inflight.push_back(Pending::Fill {
            room,
            after,
            reader,
        });
    }

    fn flush_writes(&mut self) {
        let mut failed = [None, None];
        for (i, conn) in [self.cmd.as_mut(), self.sub.as_mut()]
            .into_iter()
            .enumerate()
        {
            let Some(conn) = conn else { continue };
            while !conn.wbuf.is_empty() {
                match conn.stream.write(&conn.wbuf) {
                    Ok(0) => {
                        failed[i] = Some(io::Error::from(io::ErrorKind::WriteZero));
                        break;
                    }
                    Ok(n) => {
                        let _ = conn.wbuf.split_to(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        failed[i] = Some(e);
                        break;
                    }
                }
            }
        }
        let [cmd, sub] = failed;
        if let Some(e) = cmd {
            self.fail_cmd(&e);
        }
        if let Some(e) = sub {
            self.fail_sub(&e);
        }
    }

    /// Reads what the socket has into the connection's buffer: an error, or EOF as one.
    fn fill_rbuf(conn: &mut Conn) -> io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(n) => conn.rbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads what connection `token` has and decodes every complete reply into
    /// `self.replies`; the read's or the decoder's error comes after what decoded.
    fn read_replies(&mut self, token: Token) -> io::Result<()> {
        let conn = if token == CMD {
            self.cmd.as_mut()
        } else {
            self.sub.as_mut()
        };
        let Some(conn) = conn else {
            return Ok(());
        };
        let read = Self::fill_rbuf(conn);
        loop {
            match resp::decode(&mut conn.rbuf) {
                Ok(Some(v)) => self.replies.push(v),
                Ok(None) => return read,
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    }

    fn read_cmd(&mut self) {
        let result = self.read_replies(CMD);
        let mut replies = std::mem::take(&mut self.replies);
        for reply in replies.drain(..) {
            let Some(pending) = self.inflight.pop_front() else {
                self.fail_cmd(&io::Error::other("a reply nobody asked for"));
                break;
            };
            self.stats.round_trips.fetch_add(1, Ordering::Relaxed);
            self.stats.pipeline_depth.fetch_sub(1, Ordering::Relaxed);
            if let Err(e) = self.on_reply(pending, reply) {
                self.fail_cmd(&e);
                break;
            }
        }
        replies.clear();
        self.replies = replies;
        if let (Err(e), Some(_)) = (result, &self.cmd) {
            self.fail_cmd(&e);
        }
    }

    fn on_reply(&mut self, pending: Pending, reply: Value) -> io::Result<()> {
        let noscript = matches!(&reply, Value::Error(e) if e.starts_with(b"NOSCRIPT"));
        match pending {
            Pending::Publish(req) => {
                if noscript {
                    self.send_publish(req, true);
                    return Ok(());
                }
                let answer = reply.array().and_then(|a| {
                    let repeated = a.get(2).and_then(Value::int) == Some(1);
                    Some((a.first()?.int()?, a.get(1)?.int()?, repeated))
                });
                match answer {
                    Some((epoch, seq, repeated)) if epoch > 0 && seq > 0 => {
                        self.out.push(EngineEvent::Published {
                            ticket: req.ticket,
                            epoch: epoch as u64,
                            seq: seq as u64,
                            repeated,
                        });
                    }
                    _ => {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        self.stats.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(worker = self.worker, reply = ?reply, "engine refused a publish");
                        self.out
                            .push(EngineEvent::PublishFailed { ticket: req.ticket });
                    }
                }
            }
            Pending::Open { room, hint, tail } => {
                if noscript {
                    self.send_open(room, hint, tail, true);
                    return Ok(());
                }
                let parsed = reply.array().and_then(|a| {
                    let epoch = a.first()?.int()?;
                    let seq = a.get(1)?.int()?;
                    let tail = script::parse_entries(a.get(2)?, &self.prefix)?;
                    Some((epoch, seq, tail))
                });
                let Some((epoch, seq, tail)) = parsed.filter(|(e, s, _)| *e > 0 && *s >= 0) else {
                    if let Some(c) = self.channels.get_mut(&channel_key(&room)) {
                        c.opens.push((hint, tail));
                    }
                    return Err(io::Error::other(format!(
                        "bad answer to a room's open: {reply:?}"
                    )));
                };
                self.out.push(EngineEvent::Opened {
                    room,
                    epoch: epoch as u64,
                    seq: seq as u64,
                    tail,
                });
            }
            Pending::Fill {
                room,
                after,
                reader,
            } => {
                let Some(msgs) = script::parse_entries(&reply, &self.prefix) else {
                    self.fills_waiting.push((room, after, reader));
                    return Err(io::Error::other(format!(
                        "bad answer to a stream read: {reply:?}"
                    )));
                };
                self.out.push(match reader {
                    None => EngineEvent::Filled { room, after, msgs },
                    Some(reader) => EngineEvent::Read {
                        room,
                        after,
                        reader,
                        msgs,
                    },
                });
            }
        }
        Ok(())
    }

    fn read_sub(&mut self) {
        let result = self.read_replies(SUB);
        let mut pushes = std::mem::take(&mut self.replies);
        for push in pushes.drain(..) {
            self.on_push(&push);
        }
        self.replies = pushes;
        if let Err(e) = result {
            self.fail_sub(&e);
        }
    }

    fn on_push(&mut self, push: &Value) {
        let Some([kind, ch, body]) = push.array() else {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(worker = self.worker, push = ?push, "unexpected reply on the pub/sub connection");
            return;
        };
        let (Some(kind), Some(ch)) = (kind.bytes(), ch.bytes()) else {
            return;
        };
        match &kind[..] {
            b"message" => {
                let Some(c) = self.channels.get(&ch[..]) else {
                    return; // unsubscribed meanwhile
                };
                match body
                    .bytes()
                    .and_then(|b| script::parse_channel_message(b, &self.prefix))
                {
                    Some((epoch, msg)) => self.out.push(EngineEvent::Message {
                        room: c.room.clone(),
                        epoch,
                        msg,
                    }),
                    None => {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            worker = self.worker,
                            "a malformed message on a room's channel was dropped"
                        );
                        // The owner sees the hole at the next message and reads it back.
                    }
                }
            }
            b"subscribe" => {
                let Some(c) = self.channels.get_mut(&ch[..]) else {
                    return;
                };
                if c.state != SubState::Subscribed {
                    c.state = SubState::Subscribed;
                    self.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
                }
                if c.opened && c.opens.is_empty() {
                    self.out.push(EngineEvent::Resubscribed {
                        room: c.room.clone(),
                    });
                }
                let ch = ch.clone();
                self.send_opens(&ch);
            }
            _ => {}
        }
    }

    /// Hands the events to the worker and wakes it.
    fn deliver_events(&mut self) {
        if self.out.is_empty() {
            return;
        }
        for mut ev in self.out.drain(..) {
            loop {
                match self.events.send_timeout(ev, Duration::from_millis(100)) {
                    Ok(()) => break,
                    Err(crossbeam_channel::SendTimeoutError::Timeout(back)) => {
                        if self.stop.load(Ordering::SeqCst) {
                            return;
                        }
                        (self.wake_worker)();
                        ev = back;
                    }
                    Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return,
                }
            }
        }
        (self.wake_worker)();
    }
}
