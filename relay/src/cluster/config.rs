//! `[cluster]`: the engine several relay nodes share, its address and bounds.
//!
//! Owns: the section's fields, defaults and validation. Must not touch: anything that runs
//! (the engines read a validated copy).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, StorageMode, humantime_secs};

/// The engine that sequences, stores and carries every room's messages between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Redis 7+ (or Valkey): one Lua script per publish, a capped stream per room, pub/sub.
    Redis,
}

/// How the engine's Redis is deployed (`cluster.topology`). Said in the configuration, not
/// guessed at connect: a guess would change where keys live and how messages are published
/// (`PUBLISH` or sharded `SPUBLISH`) on what one address happened to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    /// One Redis (primary): `cluster.redis` holds exactly its address.
    Single,
    /// A Redis Cluster: `cluster.redis` holds seed addresses; the engine reads the slot map
    /// (`CLUSTER SLOTS`) from the first that answers, connects to a shard's master on
    /// its first command, runs each room's script on the shard of its hash slot,
    /// subscribes with sharded pub/sub (`SSUBSCRIBE`) and follows `MOVED` and `ASK`.
    Cluster,
    /// One Redis master behind Sentinel: `cluster.redis` holds the sentinels,
    /// `sentinel://host:port/<master-name>` (one master name); the engine asks them where
    /// the master is at start and again whenever its connection is lost (a failover).
    Sentinel,
}

/// How a node writes a message into its room's stream (`cluster.stream_entry`). Every node
/// reads both, whatever it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamEntry {
    /// One field, `m`: the channel message's tail (`<ts> <tag> <sender length>
    /// <sender><payload>`), sent to Redis once for both the stream and the channel (8.8%
    /// fewer Redis instructions per publish than `fields`). Versions of the relay before
    /// this setting cannot read such entries.
    Packed,
    /// Four fields, `t` (ms), `g` (tag), `u` (sender), `p` (payload), as versions before
    /// `packed` wrote and read them: for a rolling upgrade from such a version, until every
    /// node runs this one (then `packed`, node by node). Those versions also predate
    /// `window_order`: `fields` goes with `window_order = "ascending"` only.
    Fields,
}

/// How a node scores the keys of each room's window of repeat keys in the engine
/// (`cluster.window_order`). Every node of this version reads and trims either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowOrder {
    /// By the sequence negated, the newest key first: Redis inserts it into a small
    /// window (a listpack, up to 128 keys) without reading every other score first (14%
    /// fewer Redis instructions per publish with a publish id while rooms' windows hold
    /// 51-154 keys; within 2% either way with fewer or more; benches/RESULTS.md, session
    /// 13). Versions before this setting mistake such a key's sequence and trim those keys
    /// first.
    Descending,
    /// By the sequence itself, as versions before this setting wrote and trimmed them: for
    /// a rolling upgrade from such a version, until every node runs this one (then
    /// `descending`, node by node).
    Ascending,
}

/// `[cluster]`: present, the relay is one node of a cluster on the engine; absent, it runs
/// alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The engine. Default `redis` (the only one).
    pub engine: EngineKind,
    /// How Redis is deployed: `single`, `cluster` or `sentinel`. Default `single`.
    pub topology: Topology,
    /// The engine's addresses, `redis://host:port` (port 6379 if left out): exactly one
    /// with `topology = "single"`; one or more seeds of a Redis Cluster with `"cluster"`;
    /// the sentinels, `sentinel://host[:port]/<master-name>`, with `"sentinel"`.
    /// Default `["redis://127.0.0.1:6379"]`.
    pub redis: Vec<String>,
    /// This node's name, unique in the cluster: it tags the node's publishes so that the
    /// node recognises its own messages coming back over pub/sub. Letters, digits, `.`,
    /// `_`, `-`; 1 to 64 characters. Default: `node-<pid>-<random>` (unique per start).
    pub node_id: Option<String>,
    /// How long connecting to one Redis may take (name resolution and TCP connect, a
    /// deadline on the engine's loop: other shards go on meanwhile, the shard's
    /// commands wait and are refused `unavailable` if it is not up by then), and how long
    /// one seed or sentinel may take to answer a topology read (the next is asked after
    /// it). Default 1 s.
    #[serde(with = "humantime_secs")]
    pub connect_timeout: Duration,
    /// A lost engine connection is retried after 50 ms, doubling up to this. Default 2 s.
    #[serde(with = "humantime_secs")]
    pub reconnect_max: Duration,
    /// How long an engine connection may stay silent: a command in flight with no reply
    /// for this long, or a `PING` (sent on a connection idle for this long, and on every
    /// new connection) unanswered for this long, and the connection is taken for lost
    /// (closed, what was in flight on it failed, redialed with backoff; the engine is down
    /// until Redis answers on the new one). A command connection with `wait_replicas` is
    /// given `wait_timeout` more (a `WAIT` holds it that long). 100 ms ..= 300 s; default
    /// 5 s.
    #[serde(with = "humantime_secs")]
    pub reply_timeout: Duration,
    /// Messages each room's stream keeps in the engine (trimmed by `XTRIM MAXLEN ~` every
    /// 64 sequences): how far back a phone on any node can resume or page (from the
    /// stream, past the node's memory). Default 10000.
    pub stream_max_len: u64,
    /// How this node writes messages into the streams: `packed` (the default) or
    /// `fields` (readable by versions before `packed`; for a rolling upgrade from one,
    /// with `window_order = "ascending"`).
    pub stream_entry: StreamEntry,
    /// How this node scores the keys of each room's window of repeat keys:
    /// `descending` (the default) or `ascending` (as versions before it; for a rolling
    /// upgrade from one).
    pub window_order: WindowOrder,
    /// Whether a removal from a room (by the server API, or a phone's UNSUBSCRIBE; not a
    /// channel's, which goes by its notice) is placed in the room's own order, an entry of its stream and a message on its
    /// channel that every node applies before the next message: `true` (the default), so
    /// no node delivers a message published after a removal to the removed user's phones.
    /// `false`: the removal takes effect on each node as the user's notice arrives (a
    /// message published meanwhile can still reach the user's phones there), as versions
    /// before this setting did and the only kind they read (they take a stream holding
    /// removals for malformed): for a rolling upgrade from one, until every node runs this
    /// one (then `true`, node by node).
    pub ordered_removals: bool,
    /// Whether a room's history in Redis (its stream, window of repeat keys and last
    /// removals) expires once nobody publishes to it: `true` (the default) sets it to
    /// expire 3/2 of the room's span (the longest of `retention.max_age`,
    /// `limits.publish_id_max_age`, `control.idempotency_max_age`) after the last publish
    /// or removal. `false` sets no expiry, as versions before this setting did: for a
    /// rolling upgrade from one (whose publishes would not renew an expiry a new node set),
    /// until every node runs this one.
    pub expire_history: bool,
    /// Publishes one worker may have in flight to the engine; more are refused with
    /// `Overloaded` `unavailable` (retryable) rather than queued. Default 4096.
    pub max_in_flight: usize,
    /// Messages read per stream request when a node fills a hole, or per page for a phone
    /// resuming (a binding lagging) past the node's in-memory history. Default 256.
    pub fill_batch: usize,
    /// How long a node's count of a user's connections stays in the engine without being
    /// renewed (it is renewed every third of it): a node killed with -9 stops counting
    /// toward presence and `limits.max_connections_per_user` this long after. 1 s ..= 1 h.
    /// Default 30 s.
    #[serde(with = "humantime_secs")]
    pub presence_lease: Duration,
    /// Replicas that must hold a publish before it is acknowledged: after each loop
    /// tick's publishes on a shard, one `WAIT <wait_replicas> <wait_timeout>` covers them
    /// all, and their PUBACKs (and the server API's 200s) wait for it; fewer replicas in
    /// time refuse them `unavailable` (retryable: a retry with the same idempotency key is
    /// answered with the sequence the first try got). 0 (the default): off, a publish is
    /// acknowledged once its shard's master ran it. At most 16.
    pub wait_replicas: u32,
    /// How long `WAIT` may wait for `wait_replicas` (at most 60 s, more than 0). Default 1 s.
    #[serde(with = "humantime_secs")]
    pub wait_timeout: Duration,
    /// With `topology = "cluster"`: a shard none of a worker's rooms, users or commands
    /// has used for this long (no room channel or user channel on its slots, nothing in
    /// flight on it) has that worker's connections to it closed; its next need dials it
    /// again. 1 s ..= 24 h. Default 60 s. (The one Redis, or Sentinel's master, is never
    /// let go.)
    #[serde(with = "humantime_secs")]
    pub shard_idle: Duration,
    /// Where each worker's engine runs: `false` (the default), on the worker's own thread,
    /// its Redis connections on the worker's poll beside the phones' (no thread hop
    /// between the worker and Redis either way); `true`, on a thread of its own per
    /// worker (`pabal-engine-N`), handed commands and answering through channels and
    /// wake-ups. README "A cluster on Redis" has both measured.
    pub engine_thread: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            engine: EngineKind::Redis,
            topology: Topology::Single,
            redis: vec!["redis://127.0.0.1:6379".into()],
            node_id: None,
            connect_timeout: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(2),
            reply_timeout: Duration::from_secs(5),
            stream_max_len: 10_000,
            stream_entry: StreamEntry::Packed,
            window_order: WindowOrder::Descending,
            ordered_removals: true,
            expire_history: true,
            max_in_flight: 4096,
            fill_batch: 256,
            presence_lease: Duration::from_secs(30),
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(1),
            shard_idle: Duration::from_secs(60),
            engine_thread: false,
        }
    }
}

/// A parsed `redis://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisAddr {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl std::fmt::Display for RedisAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Parses `sentinel://host[:port]/<master-name>` (port 26379 if left out): the sentinel's
/// address and the master's name.
pub fn parse_sentinel_url(url: &str) -> Result<(RedisAddr, String), String> {
    let rest = url
        .strip_prefix("sentinel://")
        .ok_or_else(|| format!("`{url}` does not start with sentinel://"))?;
    let (addr, name) = rest
        .split_once('/')
        .filter(|(_, n)| !n.is_empty() && !n.contains(['/', '?', '@']))
        .ok_or_else(|| format!("`{url}`: needs sentinel://host[:port]/<master-name>"))?;
    let has_port = addr
        .rsplit_once(':')
        .is_some_and(|(h, _)| !h.ends_with(']') || addr.starts_with('['))
        && !addr.ends_with(']');
    let url = if has_port {
        format!("redis://{addr}")
    } else {
        format!("redis://{addr}:26379")
    };
    Ok((parse_redis_url(&url)?, name.to_owned()))
}

/// Parses `redis://host[:port]` (no user, password or database in this version).
pub fn parse_redis_url(url: &str) -> Result<RedisAddr, String> {
    let rest = url
        .strip_prefix("redis://")
        .ok_or_else(|| format!("`{url}` does not start with redis://"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(['@', '/', '?']) {
        return Err(format!(
            "`{url}`: only redis://host[:port] is supported (no credentials, database or options)"
        ));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || rest.starts_with('[') => {
            let port: u16 = port
                .parse()
                .map_err(|_| format!("`{url}`: `{port}` is not a port"))?;
            (host, port)
        }
        _ => (rest, 6379),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(format!("`{url}`: needs a host and a port > 0"));
    }
    Ok(RedisAddr {
        host: host.to_owned(),
        port,
    })
}

impl ClusterConfig {
    /// Checks the section; `storage` is `[storage] mode`: the engine is the durable store,
    /// so a node refuses a disk log of its own (two stores of truth for one sequence).
    pub fn validate(&self, storage: StorageMode) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, why: String| ConfigError::Invalid { field, why };
        if storage == StorageMode::Disk {
            return Err(invalid(
                "storage.mode",
                "\"disk\" cannot be combined with [cluster]: the engine (Redis) is the durable \
                 store of a cluster's rooms; set storage.mode = \"memory\" and make Redis \
                 durable (appendonly yes, appendfsync always)"
                    .into(),
            ));
        }
        if self.topology == Topology::Sentinel {
            self.sentinels().map_err(|e| invalid("cluster.redis", e))?;
        } else {
            for url in &self.redis {
                parse_redis_url(url).map_err(|e| invalid("cluster.redis", e))?;
            }
        }
        match (self.topology, self.redis.len()) {
            (_, 0) => {
                return Err(invalid(
                    "cluster.redis",
                    "needs the engine's address".into(),
                ));
            }
            (Topology::Single, 1) | (Topology::Cluster | Topology::Sentinel, _) => {}
            (Topology::Single, _) => {
                return Err(invalid(
                    "cluster.redis",
                    "exactly one address with topology = \"single\" (several are the seeds \
                     of a Redis Cluster: set cluster.topology = \"cluster\")"
                        .into(),
                ));
            }
        }
        if self.stream_entry == StreamEntry::Fields && self.window_order != WindowOrder::Ascending {
            return Err(invalid(
                "cluster.window_order",
                "stream_entry = \"fields\" is for a rolling upgrade from a version before \
                 \"packed\", which scores each room's window of repeat keys ascending too: set \
                 window_order = \"ascending\" with it"
                    .into(),
            ));
        }
        if let Some(id) = &self.node_id
            && (id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
        {
            return Err(invalid(
                "cluster.node_id",
                format!("`{id}`: 1 to 64 letters, digits, `.`, `_` or `-`"),
            ));
        }
        if self.connect_timeout.is_zero() || self.connect_timeout > Duration::from_secs(60) {
            return Err(invalid(
                "cluster.connect_timeout",
                "must be > 0 and at most 60s".into(),
            ));
        }
        if self.reconnect_max < Duration::from_millis(50)
            || self.reconnect_max > Duration::from_secs(300)
        {
            return Err(invalid(
                "cluster.reconnect_max",
                "must be 50ms ..= 300s".into(),
            ));
        }
        if self.reply_timeout < Duration::from_millis(100)
            || self.reply_timeout > Duration::from_secs(300)
        {
            return Err(invalid(
                "cluster.reply_timeout",
                "must be 100ms ..= 300s".into(),
            ));
        }
        if self.stream_max_len == 0 {
            return Err(invalid("cluster.stream_max_len", "must be > 0".into()));
        }
        if !(1..=1 << 20).contains(&self.max_in_flight) {
            return Err(invalid(
                "cluster.max_in_flight",
                "must be 1 ..= 1048576".into(),
            ));
        }
        if !(1..=10_000).contains(&self.fill_batch) {
            return Err(invalid("cluster.fill_batch", "must be 1 ..= 10000".into()));
        }
        if self.presence_lease < Duration::from_secs(1)
            || self.presence_lease > Duration::from_secs(3600)
        {
            return Err(invalid(
                "cluster.presence_lease",
                "must be 1s ..= 1h".into(),
            ));
        }
        if self.wait_replicas > 16 {
            return Err(invalid("cluster.wait_replicas", "must be 0 ..= 16".into()));
        }
        if self.wait_timeout.is_zero() || self.wait_timeout > Duration::from_secs(60) {
            return Err(invalid(
                "cluster.wait_timeout",
                "must be > 0 and at most 60s (WAIT 0 would wait forever)".into(),
            ));
        }
        if self.shard_idle < Duration::from_secs(1) || self.shard_idle > Duration::from_secs(86_400)
        {
            return Err(invalid("cluster.shard_idle", "must be 1s ..= 24h".into()));
        }
        Ok(())
    }

    /// The engine's addresses (validated): the one Redis, a Redis Cluster's seeds, or the
    /// sentinels.
    pub fn redis_addrs(&self) -> Result<Vec<RedisAddr>, String> {
        if self.redis.is_empty() {
            return Err("cluster.redis: no address".into());
        }
        if self.topology == Topology::Sentinel {
            return Ok(self.sentinels()?.0);
        }
        self.redis.iter().map(|u| parse_redis_url(u)).collect()
    }

    /// The sentinels' addresses and the one master name they all give.
    pub fn sentinels(&self) -> Result<(Vec<RedisAddr>, String), String> {
        let mut name: Option<String> = None;
        let mut addrs = Vec::new();
        for url in &self.redis {
            let (addr, n) = parse_sentinel_url(url)?;
            if name.as_ref().is_some_and(|m| *m != n) {
                return Err(format!("`{url}`: every sentinel must name the same master"));
            }
            name = Some(n);
            addrs.push(addr);
        }
        Ok((addrs, name.ok_or("no sentinel address")?))
    }

    /// This node's id: the configured one, or one unique to this start.
    pub fn node_id_or_random(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            format!("node-{}-{nanos:x}", std::process::id())
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_name_the_problem() {
        assert_eq!(
            parse_redis_url("redis://10.0.0.5:6380").unwrap(),
            RedisAddr {
                host: "10.0.0.5".into(),
                port: 6380
            }
        );
        assert_eq!(parse_redis_url("redis://db").unwrap().port, 6379);
        assert!(parse_redis_url("http://db:1").is_err());
        assert!(parse_redis_url("redis://u:p@db:1").is_err());
        assert!(parse_redis_url("redis://db:x").is_err());
        assert_eq!(
            parse_sentinel_url("sentinel://10.0.0.7/main").unwrap(),
            (
                RedisAddr {
                    host: "10.0.0.7".into(),
                    port: 26379
                },
                "main".into()
            )
        );
        assert_eq!(
            parse_sentinel_url("sentinel://s:5000/main").unwrap().0.port,
            5000
        );
        assert!(parse_sentinel_url("sentinel://s:5000").is_err());
        assert!(parse_sentinel_url("redis://s:5000/main").is_err());
    }

    #[test]
    fn disk_storage_and_bad_fields_are_refused_by_name() {
        let ok = ClusterConfig::default();
        ok.validate(StorageMode::Memory).unwrap();
        let field = |c: &ClusterConfig, mode| match c.validate(mode) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(field(&ok, StorageMode::Disk), "storage.mode");
        let two = ClusterConfig {
            redis: vec!["redis://a:1".into(), "redis://b:1".into()],
            ..ok.clone()
        };
        assert_eq!(field(&two, StorageMode::Memory), "cluster.redis");
        let seeds = ClusterConfig {
            topology: Topology::Cluster,
            ..two.clone()
        };
        seeds.validate(StorageMode::Memory).unwrap();
        let bad_seed = ClusterConfig {
            redis: vec!["redis://a:1".into(), "http://b:1".into()],
            ..seeds
        };
        assert_eq!(field(&bad_seed, StorageMode::Memory), "cluster.redis");
        let sentinels = ClusterConfig {
            topology: Topology::Sentinel,
            redis: vec!["sentinel://a:1/m".into(), "sentinel://b:1/m".into()],
            ..ok.clone()
        };
        sentinels.validate(StorageMode::Memory).unwrap();
        let two_masters = ClusterConfig {
            redis: vec!["sentinel://a:1/m".into(), "sentinel://b:1/n".into()],
            ..sentinels
        };
        assert_eq!(field(&two_masters, StorageMode::Memory), "cluster.redis");
        let bad_id = ClusterConfig {
            node_id: Some("a b".into()),
            ..ok.clone()
        };
        assert_eq!(field(&bad_id, StorageMode::Memory), "cluster.node_id");
        let wait = ClusterConfig {
            wait_replicas: 1,
            ..ok.clone()
        };
        wait.validate(StorageMode::Memory).unwrap();
        let forever = ClusterConfig {
            wait_timeout: Duration::ZERO,
            ..wait
        };
        assert_eq!(field(&forever, StorageMode::Memory), "cluster.wait_timeout");
        let too_many = ClusterConfig {
            wait_replicas: 17,
            ..ok.clone()
        };
        assert_eq!(
            field(&too_many, StorageMode::Memory),
            "cluster.wait_replicas"
        );
        let idle = ClusterConfig {
            shard_idle: Duration::from_millis(500),
            ..ok.clone()
        };
        assert_eq!(field(&idle, StorageMode::Memory), "cluster.shard_idle");
        for bad in [Duration::from_millis(99), Duration::from_secs(301)] {
            let silent = ClusterConfig {
                reply_timeout: bad,
                ..ok.clone()
            };
            assert_eq!(field(&silent, StorageMode::Memory), "cluster.reply_timeout");
        }
        let fields = |window_order| ClusterConfig {
            stream_entry: StreamEntry::Fields,
            window_order,
            ..ok.clone()
        };
        fields(WindowOrder::Ascending)
            .validate(StorageMode::Memory)
            .unwrap();
        assert_eq!(
            field(&fields(WindowOrder::Descending), StorageMode::Memory),
            "cluster.window_order"
        );
        let zero = ClusterConfig {
            stream_max_len: 0,
            ..ok
        };
        assert_eq!(field(&zero, StorageMode::Memory), "cluster.stream_max_len");
    }

    #[test]
    fn the_stream_entry_form_is_one_of_two_names() {
        let parse = |v: &str| toml::from_str::<ClusterConfig>(&format!("stream_entry = {v:?}"));
        assert_eq!(parse("packed").unwrap().stream_entry, StreamEntry::Packed);
        assert_eq!(parse("fields").unwrap().stream_entry, StreamEntry::Fields);
        let order = |v: &str| toml::from_str::<ClusterConfig>(&format!("window_order = {v:?}"));
        assert_eq!(
            ClusterConfig::default().window_order,
            WindowOrder::Descending
        );
        assert_eq!(
            order("ascending").unwrap().window_order,
            WindowOrder::Ascending
        );
        assert!(order("newest").is_err());
        let err = parse("packd").unwrap_err().to_string();
        assert!(err.contains("packed") && err.contains("fields"), "{err}");
    }

    #[test]
    fn the_documented_section_is_the_default() {
        // relay.default.toml documents [cluster] commented out; uncommented, it must say
        // exactly what the defaults are.
        let text = crate::config::EMBEDDED_DEFAULT;
        let start = text
            .find("\n# [cluster]\n")
            .expect("the section is documented");
        let section: String = text[start + 1..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let parsed: std::collections::BTreeMap<String, ClusterConfig> =
            toml::from_str(&section).unwrap();
        assert_eq!(parsed["cluster"], ClusterConfig::default());
    }
}
