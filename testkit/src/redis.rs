//! A private Redis for one test: `redis-server` on a free loopback port in a temporary
//! directory, append-only with `appendfsync always` (so a restart keeps everything it
//! acknowledged), killed when dropped, restartable on the same port and directory.
//!
//! Owns: the child process and its directory. Must not touch: the system's Redis (never
//! port 6379 unless the kernel hands it out, never its configuration).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{TempDir, WAIT};

/// A running (or stopped, between [`RedisServer::kill`] and [`RedisServer::restart`])
/// redis-server.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: TempDir,
    /// Arguments after the common ones (a cluster node's).
    extra: Vec<String>,
}

/// Whether `redis-server` can be run here.
pub fn available() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl RedisServer {
    /// Starts one, or [`crate::skip`]s (a failure under CI) and returns `None` where
    /// `redis-server` is missing (`.ci/install-redis.sh` installs it).
    pub fn start(name: &str) -> Option<RedisServer> {
        Self::start_with(name, &[])
    }

    /// [`RedisServer::start`] with more `redis-server` arguments (`extra`), given again at
    /// every [`RedisServer::restart`].
    pub fn start_with(name: &str, extra: &[&str]) -> Option<RedisServer> {
        if !available() {
            crate::skip("redis-server is not installed (.ci/install-redis.sh installs it)");
            return None;
        }
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            dir: TempDir::new(&format!("redis-{name}")),
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
        };
        // The port was free when asked for; another test's process may take it before
        // redis-server binds it, and redis-server then exits: try again on another.
        for _ in 0..5 {
            match server.spawn_and_wait() {
                Ok(()) => return Some(server),
                Err(status) => {
                    eprintln!(
                        "redis-server on port {} exited ({status}) before answering PING; \
                         trying another port",
                        server.port
                    );
                    server.port = free_port();
                }
            }
        }
        panic!("redis-server exited five times before answering PING")
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server again (after [`RedisServer::kill`]) on the same port and
    /// directory, and waits until it answers PING (its append-only file loaded).
    pub fn restart(&mut self) {
        if let Err(status) = self.spawn_and_wait() {
            panic!(
                "redis-server on port {} exited ({status}) before answering PING",
                self.port
            );
        }
    }

    /// Starts `redis-server` on this port and directory and waits until it answers PING;
    /// its exit status if it exits first. Panics past [`WAIT`].
    fn spawn_and_wait(&mut self) -> Result<(), std::process::ExitStatus> {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--daemonize", "no"])
            .args(["--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path(""))
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            if self.try_cli(&["PING"]).is_some_and(|r| r.trim() == "PONG") {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(status);
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and waits for it; what it acknowledged is on disk.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server (SIGSTOP) until [`RedisServer::resume`]: its port still accepts
    /// connections (the kernel does) but nothing is answered on them, as from a Redis
    /// swapping hard, a hung proxy or a host gone without a RST.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a [`RedisServer::pause`]d server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let child = self.child.as_ref().expect("the server runs");
        let pid = libc::pid_t::try_from(child.id()).expect("a pid");
        // SAFETY: kill(2) on our own child's pid, which is not reaped before it is killed.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "signal {signal} to redis-server");
    }

    /// Runs one command with `redis-cli`; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args).expect("redis-cli runs")
    }

    /// Runs one command with `redis-cli`; its output, or `None` if it could not run.
    pub fn try_cli(&self, args: &[&str]) -> Option<String> {
        cli_on(self.port, args)
    }
}

/// A port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs one command with `redis-cli` against 127.0.0.1:`port`; its output, or `None` if
/// it could not run.
fn cli_on(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills every pub/sub client of one Redis (`CLIENT KILL TYPE pubsub`, sharded
/// subscribers included) every 15 ms, on a thread of its own, until stopped.
#[derive(Debug)]
pub struct PubSubKiller {
    done: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl PubSubKiller {
    /// Starts killing the pub/sub clients of the Redis on `port`.
    pub fn start(port: u16) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        let thread = std::thread::spawn(move || {
            let mut kills = 0;
            while !stop.load(Ordering::SeqCst) {
                let out = Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "CLIENT", "KILL", "TYPE", "pubsub"])
                    .output()
                    .unwrap();
                kills += String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
                std::thread::sleep(Duration::from_millis(15));
            }
            kills
        });
        PubSubKiller { done, thread }
    }

    /// Stops; how many connections it killed.
    pub fn stop(self) -> u64 {
        self.done.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// The at-most-once bus made lossy: a reader on node `b` binds `room`, `count` messages
/// are published through node `a` while every pub/sub connection to the Redis on `port`
/// (the room's) is killed over and over, and once more after the last publish (then only
/// a resubscription's catch-up from the stream brings what follows). The reader must get
/// every message, in order, once. Returns how many connections were killed (> 0).
pub fn filled_despite_killed_subscriptions(
    a: std::net::SocketAddr,
    b: std::net::SocketAddr,
    room: &str,
    port: u16,
    count: usize,
) -> u64 {
    let mut reader = crate::Client::connect(b, "reader");
    let alias = reader.join(room);
    let killer = PubSubKiller::start(port);
    let seqs = crate::Client::publish_all(a, room, "alice", count);
    let _ = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "CLIENT", "KILL", "TYPE", "pubsub"])
        .output();
    let mut last = crate::Client::connect(a, "closer");
    let last_alias = last.join(room);
    let final_seq = last.publish_acked(last_alias, &b"last"[..]);
    let kills = killer.stop();
    assert_eq!(seqs, (1..=count as u64).collect::<Vec<_>>());
    let got = reader.read_through(alias, final_seq);
    for (i, seq) in seqs.iter().enumerate() {
        assert_eq!(got[seq], bytes::Bytes::from(format!("alice-{i}")));
    }
    assert!(kills > 0, "the pub/sub connections were killed");
    kills
}

/// Opens in flight when their connection drops: a phone on `node` subscribes to
/// `channels` (each a room the node opens with a script on `redis`) while `redis` holds
/// every script (`CLIENT PAUSE WRITE`), so the opens are written and unanswered when
/// every command connection to `redis` is killed (`CLIENT KILL TYPE normal`). Each must
/// be answered: bound (its open sent again on the next connection) or refused typed and
/// retryable (`Overloaded`, not fatal), none left waiting; and the node binds a new one
/// after. Returns how many were bound.
pub fn opens_answered_despite_killed_commands(
    node: &crate::TestRelay,
    redis: &RedisServer,
    channels: &[String],
) -> usize {
    use pabal_codec::{ClientFrame, ErrorCode, Event, Subscribe, Text};
    let stats = node.cluster().expect("a cluster node").clone();
    let mut phone = crate::Client::connect(node.addr, "cmd-kill");
    redis.cli(&["CLIENT", "PAUSE", "60000", "WRITE"]);
    let before = stats.pipeline_depth.load(Ordering::Relaxed);
    for name in channels {
        phone.send(&ClientFrame::Subscribe(Subscribe {
            room: false,
            name: Text::from(name.as_str()),
        }));
    }
    let deadline = Instant::now() + WAIT;
    while stats.pipeline_depth.load(Ordering::Relaxed) < before + channels.len() as i64 {
        assert!(
            Instant::now() < deadline,
            "the opens never went to Redis: {} in flight",
            stats.pipeline_depth.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    assert_ne!(killed.trim(), "0", "no command connection was killed");
    redis.cli(&["CLIENT", "UNPAUSE"]);
    let mut bound = std::collections::HashSet::new();
    let mut refused = 0;
    while bound.len() + refused < channels.len() {
        match phone.wait_for(|e| matches!(e, Event::Bound { .. } | Event::Error(_))) {
            Event::Bound { room, .. } => {
                assert!(bound.insert(room.name.clone()), "bound twice: {room:?}");
            }
            Event::Error(e) => {
                assert_eq!(e.code, ErrorCode::Overloaded, "{e:?}");
                assert!(!e.fatal, "{e:?}");
                refused += 1;
            }
            _ => unreachable!(),
        }
    }
    phone.subscribe(&format!("{}-after", channels[0]));
    bound.len()
}

/// A Redis Cluster of private `redis-server` processes, one master per shard and no
/// replicas (`--cluster-enabled yes`, joined with `redis-cli --cluster create`), each
/// killed when dropped.
#[derive(Debug)]
pub struct RedisCluster {
    /// The shards' masters, in the order `redis-cli --cluster create` was given them (it
    /// hands them the slot ranges in that order).
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `shards` (at least 3, as `redis-cli --cluster create` asks) masters and
    /// joins them into one cluster covering every slot; waits until each says
    /// `cluster_state:ok`. `None` (after [`crate::skip`]) where `redis-server` is missing.
    pub fn start(name: &str, shards: usize) -> Option<RedisCluster> {
        let nodes = (0..shards)
            .map(|i| {
                // The cluster bus' port is its own free port (by default it is the port +
                // 10000, which may be taken, or past 65535).
                let bus = free_port().to_string();
                RedisServer::start_with(
                    &format!("{name}-{i}"),
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-node-timeout",
                        "2000",
                        "--cluster-port",
                        &bus,
                    ],
                )
            })
            .collect::<Option<Vec<_>>>()?;
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + WAIT;
        for n in &nodes {
            while !n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "the cluster never became ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Some(RedisCluster { nodes })
    }

    /// Every master's `redis://127.0.0.1:<port>`: the relay's seeds.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub fn slot(&self, key: &str) -> u16 {
        self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("a slot")
    }

    /// Which of [`RedisCluster::nodes`] serves `slot` (it alone answers `CLUSTER
    /// COUNTKEYSINSLOT` for it with its keys; asked here through its own slot list).
    pub fn owner_of(&self, slot: u16) -> usize {
        let out = self.nodes[0].cli(&["CLUSTER", "SLOTS"]);
        // redis-cli prints the nested reply flat: start, end, host, port, id, [replicas...]
        // per range; a range's master is the first host/port after its bounds.
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        let mut i = 0;
        while i + 3 < lines.len() {
            if let (Ok(start), Ok(end)) = (lines[i].parse::<u16>(), lines[i + 1].parse::<u16>())
                && lines[i + 2].contains('.')
                && let Ok(port) = lines[i + 3].parse::<u16>()
            {
                if (start..=end).contains(&slot) {
                    return self
                        .nodes
                        .iter()
                        .position(|n| n.port == port)
                        .expect("a node of this cluster");
                }
                i += 4;
            } else {
                i += 1;
            }
        }
        panic!("slot {slot} is served by no node: {out}")
    }

    /// Keys `nodes[node]` holds in `slot`.
    pub fn keys_in_slot(&self, node: usize, slot: u16) -> u64 {
        self.nodes[node]
            .cli(&["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()])
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// Moves `slot`, keys and all, from node `from` to node `to` (IMPORTING, MIGRATING,
    /// `MIGRATE` of its keys, then `SETSLOT NODE` on every node), as `redis-cli --cluster
    /// reshard` does.
    pub fn migrate(&self, slot: u16, from: usize, to: usize) {
        self.begin_migration(slot, from, to);
        self.finish_migration(slot, to);
    }

    /// The first half of [`RedisCluster::migrate`]: `slot` is MIGRATING on `from` and
    /// IMPORTING on `to`, and its keys have moved, so `from` answers `ASK` for them.
    pub fn begin_migration(&self, slot: u16, from: usize, to: usize) {
        let slot = slot.to_string();
        let id = |n: usize| self.nodes[n].cli(&["CLUSTER", "MYID"]).trim().to_owned();
        let (from_id, to_id) = (id(from), id(to));
        let ok = |n: usize, args: &[&str]| {
            let out = self.nodes[n].cli(args);
            assert_eq!(out.trim(), "OK", "{args:?} on node {n}");
        };
        ok(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]);
        ok(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]);
        let port = self.nodes[to].port.to_string();
        loop {
            let keys = self.nodes[from].cli(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
            let keys: Vec<&str> = keys
                .lines()
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().copied());
            ok(from, &args);
        }
    }

    /// The second half of [`RedisCluster::migrate`]: every node says `to` serves `slot`.
    pub fn finish_migration(&self, slot: u16, to: usize) {
        let slot = slot.to_string();
        let to_id = self.nodes[to].cli(&["CLUSTER", "MYID"]).trim().to_owned();
        let ok = |n: usize, args: &[&str]| {
            let out = self.nodes[n].cli(args);
            assert_eq!(out.trim(), "OK", "{args:?} on node {n}");
        };
        ok(to, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        for n in (0..self.nodes.len()).filter(|&n| n != to) {
            ok(n, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        }
    }
}

/// One master, one replica of it and one sentinel watching it (quorum 1, down after 1 s),
/// each a private process killed when dropped: enough for a real failover.
#[derive(Debug)]
pub struct RedisSentinel {
    /// The master (until a failover).
    pub master: RedisServer,
    /// Its replica (the master after a failover).
    pub replica: RedisServer,
    /// The sentinel's port.
    pub port: u16,
    child: Child,
    _dir: TempDir,
}

impl RedisSentinel {
    /// The name the sentinel knows the master by.
    pub const MASTER: &'static str = "pabal";

    /// Starts the three and waits until the replica is in sync and the sentinel names
    /// the master. `None` (after [`crate::skip`]) where `redis-server` is missing.
    pub fn start(name: &str) -> Option<RedisSentinel> {
        let master = RedisServer::start(&format!("{name}-master"))?;
        let mport = master.port.to_string();
        let replica = RedisServer::start_with(
            &format!("{name}-replica"),
            &["--replicaof", "127.0.0.1", &mport],
        )?;
        let port = free_port();
        let dir = TempDir::new(&format!("sentinel-{name}"));
        let conf = dir.path("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
                 sentinel monitor {m} 127.0.0.1 {mport} 1\n\
                 sentinel down-after-milliseconds {m} 1000\n\
                 sentinel failover-timeout {m} 3000\n",
                dir.path("").display(),
                m = Self::MASTER,
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel starts");
        let sentinel = RedisSentinel {
            master,
            replica,
            port,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + WAIT;
        while !sentinel
            .replica
            .try_cli(&["INFO", "replication"])
            .is_some_and(|i| i.contains("master_link_status:up"))
            || sentinel.master_port() != Some(sentinel.master.port)
            || !sentinel
                .sentinel_cli(&["SENTINEL", "replicas", Self::MASTER])
                .is_some_and(|r| r.contains(&sentinel.replica.port.to_string()))
        {
            assert!(
                Instant::now() < deadline,
                "the sentinel never saw master and replica"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(sentinel)
    }

    /// The cluster's address for the relay: `sentinel://127.0.0.1:<port>/pabal`.
    pub fn url(&self) -> String {
        format!("sentinel://127.0.0.1:{}/{}", self.port, Self::MASTER)
    }

    /// The master's port as the sentinel names it now.
    pub fn master_port(&self) -> Option<u16> {
        let out = self.sentinel_cli(&["SENTINEL", "get-master-addr-by-name", Self::MASTER])?;
        out.lines().nth(1)?.trim().parse().ok()
    }

    /// Stops the sentinel (SIGSTOP) until [`RedisSentinel::resume`]: its port still
    /// accepts connections (the kernel does) but nothing is answered on them.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a [`RedisSentinel::pause`]d sentinel run again (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid");
        // SAFETY: kill(2) on our own child's pid, which is not reaped before drop.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "signal {signal} to the sentinel");
    }

    fn sentinel_cli(&self, args: &[&str]) -> Option<String> {
        cli_on(self.port, args)
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        let _ = self.child.kill(); // SIGKILL ends a paused one too
        let _ = self.child.wait();
    }
}
