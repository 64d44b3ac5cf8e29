//! The relay's configuration: a TOML file where every field has a documented default, so an
//! empty file (or none at all) runs a loopback relay.
//!
//! Owns: parsing, defaults and validation (fail fast, naming the field). Must not touch:
//! sockets or threads; the runtime reads a validated [`Config`] and nothing else.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use crate::handoff::config::{HandoffConfig, HandoffRule};
use crate::io::BackendKind;

/// The most header a DELIVER adds in front of a payload (PROTOCOL.md, section 4).
pub const DELIVER_HEADER_MAX: usize = 288;

/// The configuration the relay runs with when no file is given: loopback, no auth.
pub const EMBEDDED_DEFAULT: &str = include_str!("../relay.default.toml");

/// Why a configuration was refused.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML is malformed or names an unknown field.
    #[error("invalid config: {0}")]
    Parse(#[from] toml::de::Error),
    /// The `[auth.jwt]` section is invalid (the message names the field).
    #[error("invalid config: {0}")]
    Auth(#[from] crate::auth::AuthError),
    /// A field holds a value the relay cannot run with.
    #[error("invalid config: `{field}`: {why}")]
    Invalid {
        /// The field, as written in the file.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// Everything the relay can be told. See `relay.default.toml` for each field's meaning.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where phones connect. Default `127.0.0.1:7700`.
    pub listen: SocketAddr,
    /// Worker threads, one per core; 0 = the cores available to the process. Default 0.
    pub workers: usize,
    /// Pin each worker to a core. Default true.
    pub pin_workers: bool,
    /// `auto`, `io_uring` or `epoll`. Default `auto`.
    pub io_backend: BackendKind,
    /// Authentication of clients.
    pub auth: AuthConfig,
    /// Per-connection bounds.
    pub connection: ConnectionConfig,
    /// Heartbeats.
    pub heartbeat: HeartbeatConfig,
    /// History kept per room and channel.
    pub retention: RetentionConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// The control listener: the app servers' API, metrics, health.
    pub control: ControlConfig,
    /// Limits that protect the relay from clients.
    pub limits: LimitsConfig,
    /// Logging.
    pub log: LogConfig,
    /// TLS on `listen` and on the WebSocket listener (see [`crate::transport::tls`]).
    pub tls: TlsConfig,
    /// The WebSocket listener for browsers (see [`crate::transport::ws`]).
    pub websocket: WebSocketConfig,
    /// Durable state: where history, membership and epochs are kept.
    pub storage: StorageConfig,
    /// Several relay nodes on one engine (Redis); `None` (no `[cluster]`): the relay runs
    /// alone. See [`crate::cluster`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// Offline hand-off to the app server (webhooks; see [`crate::handoff`]).
    pub handoff: HandoffConfig,
    /// Receipts (protocol v3): how often members hear of each other's markers.
    pub receipts: ReceiptsConfig,
}

/// `[receipts]`: delivered and read markers per (user, room) (PROTOCOL.md §12).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiptsConfig {
    /// The least time between two RECEIPT updates of one room: markers that move within it
    /// go out together, once. Default 1s; 10ms ..= 1h.
    #[serde(with = "humantime_secs")]
    pub interval: Duration,
    /// Rooms of at most this many members get every marker move in their RECEIPTs; larger
    /// ones only read-marker moves (with the delivered marker alongside). Default 32.
    pub delivered_max_members: usize,
}

impl Default for ReceiptsConfig {
    fn default() -> Self {
        ReceiptsConfig {
            interval: Duration::from_secs(1),
            delivered_max_members: 32,
        }
    }
}

/// `[tls]`: set `cert_file` and `key_file` to turn TLS on for `listen` and for the WebSocket
/// listener (wss); leave both unset to keep them plain (a TLS-terminating proxy in front).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first. Re-read on SIGHUP. Default: none.
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1). Re-read on SIGHUP.
    /// Default: none.
    pub key_file: Option<std::path::PathBuf>,
    /// Bytes of TLS 1.3 early data (0-RTT) accepted on a resumed connection; it may carry
    /// only the HELLO. 0 turns 0-RTT off. Default 16384.
    pub max_early_data: u32,
    /// Resumption tickets sent after each full handshake. Default 2.
    pub tickets_per_handshake: usize,
    /// Sessions remembered for resumption, shared by all workers; each ticket resumes once
    /// (single use: the anti-replay rule 0-RTT relies on). Default 65536.
    pub session_cache: usize,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: None,
            key_file: None,
            max_early_data: 16 * 1024,
            tickets_per_handshake: 2,
            session_cache: 65_536,
        }
    }
}

impl TlsConfig {
    /// Whether TLS is on.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() || self.key_file.is_some()
    }
}

/// `[websocket]`: RFC 6455 for browsers; each binary message carries pabal frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Where browsers connect (`ws://`, or `wss://` with `[tls]`); empty string disables
    /// it. Default: disabled.
    pub listen: String,
    /// Origins allowed to open a connection (`https://app.example`); `"*"` allows any. A
    /// request without an `Origin` header (not a browser) is always allowed: the HELLO's
    /// token is the credential. Default: none (browsers are refused until listed).
    pub allowed_origins: Vec<String>,
    /// Largest upgrade request (request line and headers), bytes. Default 8192.
    pub max_handshake_bytes: usize,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            listen: String::new(),
            allowed_origins: Vec::new(),
            max_handshake_bytes: 8192,
        }
    }
}

/// A listen address where "" means disabled.
fn optional_addr(field: &'static str, text: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|e| ConfigError::Invalid {
        field,
        why: format!("`{text}`: {e}"),
    })
}

impl WebSocketConfig {
    /// The parsed listen address, or `None` when disabled.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        optional_addr("websocket.listen", &self.listen)
    }
}

/// `[auth]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `none`: the client names its user id in HELLO and may join rooms itself (development
    /// and tests). Refused on a non-loopback address unless `allow_none_on_public` is set.
    pub mode: AuthMode,
    /// Permit `mode = "none"` on a non-loopback address. Default false.
    pub allow_none_on_public: bool,
    /// Close a connection that has not completed HELLO within this time, at most 24 h.
    /// Default 5 s.
    #[serde(with = "humantime_secs")]
    pub handshake_timeout: Duration,
    /// Keys and leeway for `mode = "jwt"` (see [`crate::auth`]).
    pub jwt: Option<crate::auth::JwtConfig>,
}

/// How clients authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// No authentication: the token is the user id.
    None,
    /// A JWT signed by the app server (HS256 or EdDSA), checked against `[auth.jwt]` keys.
    Jwt,
}

/// `[connection]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionConfig {
    /// Largest frame body accepted from a client, bytes. Default 65536.
    pub max_frame_len: usize,
    /// Outbound window per connection, bytes: a DELIVER is queued only while it fits (an
    /// empty queue takes any one frame); past it, live traffic stops being queued and the
    /// connection falls behind to a cursor, fed from history page by page as its socket
    /// drains. It bounds what a stalled phone costs. Default 8 KiB.
    pub max_queued_bytes: usize,
    /// Rooms and channels bound on one connection. Default 4096.
    pub max_rooms: usize,
    /// Sender aliases kept per connection. Default 64. Passed with each DELIVER and
    /// RECEIPT entry (a connection keeps no copy): a reload applies to open connections at
    /// their next one; a table never shrinks (see `pabal_codec::SenderAliases`).
    pub sender_aliases: usize,
    /// Bytes of history fetched per page while a connection catches up (at most
    /// `max_queued_bytes`). Default 4 KiB.
    pub replay_page_bytes: usize,
    /// After a start with in-memory state, how long a resume entry from an earlier run of
    /// the relay that names a room the relay does not (yet) know for the user is answered
    /// LEFT `Restarted` (keep the room: the app server is re-sending membership) rather than
    /// LEFT `UnknownRoom` (drop it). Default 10 min.
    #[serde(with = "humantime_secs")]
    pub restart_grace: Duration,
    /// The kernel send buffer of each client socket (`SO_SNDBUF`), bytes; 0 leaves it to the
    /// kernel's autotuning. On loopback and fast links autotuning lets a stalled reader's
    /// socket hold megabytes of kernel memory; a bound caps what a stalled phone costs the
    /// kernel, as `max_queued_bytes` caps what it costs the relay. The kernel doubles the
    /// value and caps it at `net.core.wmem_max`. Default 0.
    pub send_buffer_bytes: usize,
}

/// `[heartbeat]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatConfig {
    /// Ping a connection that has been quiet this long. Default 240 s: under the ~5 min
    /// after which carrier NATs drop idle flows.
    #[serde(with = "humantime_secs")]
    pub interval: Duration,
    /// Smallest interval a client may ask for. Default 30 s.
    #[serde(with = "humantime_secs")]
    pub min_interval: Duration,
    /// Largest interval a client may ask for, at most 24 h. Default 1680 s (28 min, as
    /// mobile push services use).
    #[serde(with = "humantime_secs")]
    pub max_interval: Duration,
    /// Close a connection that sends nothing for this long after a ping, at most 24 h.
    /// Default 30 s.
    #[serde(with = "humantime_secs")]
    pub timeout: Duration,
}

/// `[retention]`: history per room; the first override whose prefix matches a name wins.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Messages kept per room. Default 1000.
    pub max_messages: usize,
    /// Payload bytes kept per room. Default 1 MiB.
    pub max_bytes: usize,
    /// Oldest message kept. Default 24 h.
    #[serde(with = "humantime_secs")]
    pub max_age: Duration,
    /// Overrides by name prefix.
    #[serde(rename = "override")]
    pub overrides: Vec<RetentionOverride>,
}

/// One `[[retention.override]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionOverride {
    /// Applies to rooms and channels whose name starts with this.
    pub prefix: String,
    /// Messages kept; default: the global value.
    pub max_messages: Option<usize>,
    /// Payload bytes kept; default: the global value.
    pub max_bytes: Option<usize>,
    /// Oldest message kept; default: the global value.
    #[serde(default, with = "humantime_secs_opt")]
    pub max_age: Option<Duration>,
}

/// The limits that apply to one room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Messages kept.
    pub max_messages: usize,
    /// Payload bytes kept.
    pub max_bytes: usize,
    /// Oldest message kept.
    pub max_age: Duration,
}

/// `[shutdown]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long to flush queued traffic before closing anyway. Default 10 s.
    #[serde(with = "humantime_secs")]
    pub grace: Duration,
    /// Reconnect hints in GOAWAY are spread uniformly over this window. Default 30 s.
    #[serde(with = "humantime_secs")]
    pub reconnect_spread: Duration,
}

/// `[control]`: the server API for app servers, `/metrics` and health checks, on a listener
/// of its own (never the client port). Every bound below protects that listener from its
/// clients; all of them except `listen` change on a reload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Where the control API listens; empty string disables it. Default `127.0.0.1:7701`.
    pub listen: String,
    /// File holding the API key app servers present (`Authorization: Bearer KEY`): at least
    /// 16 bytes after a trailing newline is trimmed. Required (or `api_key`) when `listen` is
    /// not loopback. Default: none (loopback only).
    pub api_key_file: Option<std::path::PathBuf>,
    /// The API key inline (development; prefer `api_key_file`), same rule: at least 16
    /// bytes. Default: none.
    pub api_key: Option<String>,
    /// Largest request body, bytes (past it: 413, without reading it). Default 1 MiB.
    pub max_body: usize,
    /// Whether `/metrics` and the health endpoints also need the key. Default false.
    pub metrics_need_key: bool,
    /// Connections open at once; one past it is closed at once with a 503. Default 256.
    pub max_connections: usize,
    /// API requests being served at once; past it: 503 with `Retry-After`. Default 64.
    pub max_in_flight: usize,
    /// `GET /v1/events` streams open at once; past it: 503. Default 16.
    pub max_event_streams: usize,
    /// Largest request line plus headers, bytes; past it: 431. Default 16 KiB.
    pub max_header_bytes: usize,
    /// Most request headers; past it: 431. Default 64.
    pub max_headers: usize,
    /// The request line and headers must arrive within this; it also bounds how long a
    /// keep-alive connection may wait idle for its next request. Default 10 s.
    #[serde(with = "humantime_secs")]
    pub header_timeout: Duration,
    /// The body must arrive within this after the headers (past it: 408). Default 10 s.
    #[serde(with = "humantime_secs")]
    pub body_timeout: Duration,
    /// A connection on which no byte moves either way for this long is closed (a client
    /// that stops reading its answer). Default 60 s.
    #[serde(with = "humantime_secs")]
    pub idle_timeout: Duration,
    /// How long a call waits for the worker that executes it; past it: 504, and the
    /// operation may still complete. Default 5 s.
    #[serde(with = "humantime_secs")]
    pub reply_timeout: Duration,
    /// A comment line on every `GET /v1/events` stream this often. Default 15 s.
    #[serde(with = "humantime_secs")]
    pub event_keepalive: Duration,
    /// `Idempotency-Key`s each room's owner remembers (the oldest goes first). Default 1024.
    pub idempotency_keys: usize,
    /// How long a room's owner remembers an `Idempotency-Key`. Default 10 min.
    #[serde(with = "humantime_secs")]
    pub idempotency_max_age: Duration,
}

/// `[limits]`: each hit is refused with a clear error and counted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Connections open at once on the whole relay. Default 1,000,000. At start (and on
    /// reload) it is clamped to what `RLIMIT_NOFILE` allows after `reserved_fds`, with one
    /// warning; past it, new connections get GOAWAY(overload).
    pub max_connections: usize,
    /// Descriptors kept for everything that is not a client connection (stdio, the control
    /// API's connections, key and config files, logs, storage), on top of 3 per worker.
    /// Default 1024; at least 32.
    pub reserved_fds: usize,
    /// Connections one user may hold at once (phone, desktop, web...). Default 16.
    pub max_connections_per_user: usize,
    /// Rooms and channels one user may belong to. Default 4096; at most
    /// `connection.max_rooms`, since every connection of a user binds all the user's rooms.
    pub max_rooms_per_user: usize,
    /// Channels one user may block. Default 1000.
    pub max_blocked_per_user: usize,
    /// Rooms and channels the relay holds in memory before clients may no longer create new
    /// ones by subscribing (the server API still can). Rooms without members, subscribers or
    /// retained history are evicted. Default 4,000,000.
    pub max_rooms: usize,
    /// SUBSCRIBE and UNSUBSCRIBE frames per second per connection (token bucket rate).
    /// Default 10.
    pub subscribe_rate: f64,
    /// SUBSCRIBE and UNSUBSCRIBE frames a connection may burst above the rate. Default 100.
    pub subscribe_burst: f64,
    /// Publishes per second per connection (token bucket rate). Default 20.
    pub publish_rate: f64,
    /// Publishes a connection may burst above the rate. Default 50.
    pub publish_burst: f64,
    /// Largest message payload, bytes. Default 16 KiB.
    pub max_payload: usize,
    /// New connections per second on the whole relay (split evenly across workers); past
    /// it, a connection gets GOAWAY(overload) with a spread-out retry hint. Default 20,000.
    pub new_connections_per_second: f64,
    /// Publish ids (protocol v2: user, device, msg_id) each room remembers, so a PUBLISH
    /// repeated after a reconnect gets the original PUBACK instead of a second copy: the
    /// room's most recent ones (the oldest goes first). 0 turns recognition off. Default
    /// 1024.
    pub publish_ids: usize,
    /// How long a room remembers a publish id. Default 1 h. Past this (or past
    /// `publish_ids` newer messages) a repeat is a new message.
    #[serde(with = "humantime_secs")]
    pub publish_id_max_age: Duration,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            listen: "127.0.0.1:7701".into(),
            api_key_file: None,
            api_key: None,
            max_body: 1024 * 1024,
            metrics_need_key: false,
            max_connections: 256,
            max_in_flight: 64,
            max_event_streams: 16,
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            reply_timeout: Duration::from_secs(5),
            event_keepalive: Duration::from_secs(15),
            idempotency_keys: 1024,
            idempotency_max_age: Duration::from_secs(600),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 1_000_000,
            reserved_fds: 1024,
            max_connections_per_user: 16,
            max_rooms_per_user: 4096,
            max_blocked_per_user: 1000,
            max_rooms: 4_000_000,
            subscribe_rate: 10.0,
            subscribe_burst: 100.0,
            publish_rate: 20.0,
            publish_burst: 50.0,
            max_payload: 16 * 1024,
            new_connections_per_second: 20_000.0,
            publish_ids: 1024,
            publish_id_max_age: Duration::from_secs(3600),
        }
    }
}

/// The fewest bytes an API key may have.
pub const MIN_API_KEY_LEN: usize = 16;

impl ControlConfig {
    /// The API key, read from the file or taken inline; `None` when neither is set. Both
    /// follow one rule ([`MIN_API_KEY_LEN`] bytes at least, after a file's trailing newline
    /// is trimmed), so an empty or short key never reaches the listener.
    pub fn load_api_key(&self) -> Result<Option<String>, ConfigError> {
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
                field: "control.api_key_file",
                why: format!("cannot read {}: {e}", path.display()),
            })?;
            let key = text
                .strip_suffix('\n')
                .map(|k| k.strip_suffix('\r').unwrap_or(k))
                .unwrap_or(&text);
            check_api_key("control.api_key_file", key)?;
            return Ok(Some(key.to_string()));
        }
        if let Some(key) = &self.api_key {
            check_api_key("control.api_key", key)?;
        }
        Ok(self.api_key.clone())
    }

    /// The parsed listen address, or `None` when disabled.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        optional_addr("control.listen", &self.listen)
    }
}

impl ControlConfig {
    /// Checks `[control]` without reading files (`--check-config` and a reload also load
    /// `api_key_file`: [`Config::check_files`]).
    fn validate(&self, client_listen: SocketAddr) -> Result<(), ConfigError> {
        fn invalid(field: &'static str, why: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                field,
                why: why.into(),
            }
        }
        if self.api_key.is_some() && self.api_key_file.is_some() {
            return Err(invalid(
                "control.api_key",
                "set either control.api_key or control.api_key_file, not both",
            ));
        }
        if let Some(key) = &self.api_key {
            check_api_key("control.api_key", key)?;
        }
        if let Some(addr) = self.listen_addr()? {
            if addr == client_listen && addr.port() != 0 {
                return Err(invalid("control.listen", "must differ from `listen`"));
            }
            let has_key = self.api_key_file.is_some() || self.api_key.is_some();
            if !addr.ip().is_loopback() && !has_key {
                return Err(invalid(
                    "control.api_key_file",
                    format!("required when control.listen ({addr}) is not loopback"),
                ));
            }
        }
        for (field, value) in [
            ("control.max_body", self.max_body),
            ("control.max_connections", self.max_connections),
            ("control.max_in_flight", self.max_in_flight),
            ("control.max_event_streams", self.max_event_streams),
            ("control.max_headers", self.max_headers),
            ("control.idempotency_keys", self.idempotency_keys),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be > 0"));
            }
        }
        if !(1024..=1024 * 1024).contains(&self.max_header_bytes) {
            return Err(invalid(
                "control.max_header_bytes",
                "must be 1 KiB ..= 1 MiB",
            ));
        }
        for (field, value) in [
            ("control.header_timeout", self.header_timeout),
            ("control.body_timeout", self.body_timeout),
            ("control.idle_timeout", self.idle_timeout),
            ("control.reply_timeout", self.reply_timeout),
            ("control.event_keepalive", self.event_keepalive),
            ("control.idempotency_max_age", self.idempotency_max_age),
        ] {
            if value.is_zero() {
                return Err(invalid(field, "must be > 0"));
            }
        }
        if self.event_keepalive >= self.idle_timeout {
            return Err(invalid(
                "control.event_keepalive",
                "must be shorter than control.idle_timeout (the stream would be closed as idle)",
            ));
        }
        Ok(())
    }
}

/// `[storage]`: durable history, membership and epochs (see `storage` and
/// `relay.default.toml` for what an acknowledgement means in each mode).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `memory` (nothing survives a restart) or `disk`. Default `memory`.
    pub mode: StorageMode,
    /// The directory holding one log per worker (`worker-N/`). Default `/var/lib/relay`.
    pub dir: std::path::PathBuf,
    /// `always`, `interval` or `never`. Default `always`.
    pub fsync: FsyncPolicy,
    /// With `fsync = "interval"`, written data is synced within this long. Default 10 ms;
    /// at most 1 s.
    #[serde(with = "humantime_secs")]
    pub fsync_interval: Duration,
    /// A segment file rolls at this size, bytes. Default 64 MiB; 1 MiB ..= 1 GiB.
    pub segment_size: u64,
    /// Appends are refused with `storage_full` past this many bytes on disk, split evenly
    /// across workers; 0: only the file system limits. Default 0.
    pub max_disk_bytes: u64,
    /// How often each worker writes a checkpoint of its index (also at a clean stop).
    /// Default 60 s.
    #[serde(with = "humantime_secs")]
    pub checkpoint_interval: Duration,
}

/// Where state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageMode {
    /// In memory only.
    Memory,
    /// In a log per worker under `[storage] dir`.
    Disk,
}

/// When the log is fdatasynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// Before anything is acknowledged (one sync per group commit).
    Always,
    /// Within `fsync_interval` of the write; acknowledged once written.
    Interval,
    /// Never by the relay; acknowledged once written.
    Never,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            mode: StorageMode::Memory,
            dir: "/var/lib/relay".into(),
            fsync: FsyncPolicy::Always,
            fsync_interval: Duration::from_millis(10),
            segment_size: 64 * 1024 * 1024,
            max_disk_bytes: 0,
            checkpoint_interval: Duration::from_secs(60),
        }
    }
}

impl StorageConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, why: &str| ConfigError::Invalid {
            field,
            why: why.into(),
        };
        if self.mode == StorageMode::Disk && !self.dir.is_absolute() {
            return Err(invalid("storage.dir", "must be an absolute path"));
        }
        if self.fsync_interval.is_zero() || self.fsync_interval > Duration::from_secs(1) {
            return Err(invalid(
                "storage.fsync_interval",
                "must be > 0 and at most 1s (an interval of minutes loses minutes of \
                 acknowledged messages on a power failure)",
            ));
        }
        if !(1 << 20..=1 << 30).contains(&self.segment_size) {
            return Err(invalid("storage.segment_size", "must be 1 MiB ..= 1 GiB"));
        }
        if self.max_disk_bytes != 0 && self.max_disk_bytes < 4 * self.segment_size {
            return Err(invalid(
                "storage.max_disk_bytes",
                "must be 0 (no quota) or at least 4 x storage.segment_size",
            ));
        }
        if self.checkpoint_interval < Duration::from_secs(1) {
            return Err(invalid(
                "storage.checkpoint_interval",
                "must be at least 1s",
            ));
        }
        Ok(())
    }
}

/// The one rule for API keys, inline or from a file.
fn check_api_key(field: &'static str, key: &str) -> Result<(), ConfigError> {
    if key.len() < MIN_API_KEY_LEN {
        let what = if key.is_empty() { "empty" } else { "too short" };
        return Err(ConfigError::Invalid {
            field,
            why: format!(
                "the key is {what} ({} bytes); it must be at least {MIN_API_KEY_LEN} bytes",
                key.len()
            ),
        });
    }
    Ok(())
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter (`info`, `pabal_relay=debug`, ...); `RUST_LOG` overrides it.
    /// Default `info`.
    pub level: String,
    /// `text` or `json`. Default `text`.
    pub format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            workers: 0,
            pin_workers: true,
            io_backend: BackendKind::Auto,
            auth: AuthConfig::default(),
            connection: ConnectionConfig::default(),
            heartbeat: HeartbeatConfig::default(),
            retention: RetentionConfig::default(),
            shutdown: ShutdownConfig::default(),
            control: ControlConfig::default(),
            limits: LimitsConfig::default(),
            log: LogConfig::default(),
            tls: TlsConfig::default(),
            websocket: WebSocketConfig::default(),
            storage: StorageConfig::default(),
            cluster: None,
            handoff: HandoffConfig::default(),
            receipts: ReceiptsConfig::default(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::None,
            allow_none_on_public: false,
            handshake_timeout: Duration::from_secs(5),
            jwt: None,
        }
    }
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            max_frame_len: 64 * 1024,
            max_queued_bytes: 8 * 1024,
            max_rooms: 4096,
            sender_aliases: 64,
            replay_page_bytes: 4 * 1024,
            restart_grace: Duration::from_secs(600),
            send_buffer_bytes: 0,
        }
    }
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval: Duration::from_secs(240),
            min_interval: Duration::from_secs(30),
            max_interval: Duration::from_secs(1680),
            timeout: Duration::from_secs(30),
        }
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            max_messages: 1000,
            max_bytes: 1024 * 1024,
            max_age: Duration::from_secs(24 * 3600),
            overrides: Vec::new(),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace: Duration::from_secs(10),
            reconnect_spread: Duration::from_secs(30),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Config {
    /// Parses and validates TOML.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// The embedded default.
    pub fn embedded() -> Result<Self, ConfigError> {
        Self::from_toml(EMBEDDED_DEFAULT)
    }

    /// The effective configuration as TOML (for `--check-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// Worker threads to start.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// The retention for a room or channel name.
    pub fn retention_for(&self, name: &str) -> Retention {
        let r = &self.retention;
        let base = Retention {
            max_messages: r.max_messages,
            max_bytes: r.max_bytes,
            max_age: r.max_age,
        };
        match r.overrides.iter().find(|o| name.starts_with(&o.prefix)) {
            Some(o) => Retention {
                max_messages: o.max_messages.unwrap_or(base.max_messages),
                max_bytes: o.max_bytes.unwrap_or(base.max_bytes),
                max_age: o.max_age.unwrap_or(base.max_age),
            },
            None => base,
        }
    }

    /// Loads every file the configuration names (the API key file, the token keys) and
    /// applies the rules their contents must follow; [`Config::validate`] reads no file.
    /// `--check-config` runs both, so what it accepts, a start or a reload accepts too.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        self.control.load_api_key()?;
        self.handoff.load_secret()?;
        if let Some(jwt) = &self.auth.jwt {
            crate::auth::Verifier::from_config(jwt)?;
        }
        Ok(())
    }

    /// Checks every field the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(field: &'static str, why: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                field,
                why: why.into(),
            }
        }
        if self.auth.mode == AuthMode::None
            && !self.listen.ip().is_loopback()
            && !self.auth.allow_none_on_public
        {
            return Err(invalid(
                "auth.mode",
                format!(
                    "\"none\" lets any client claim any user id; refused on {} (not loopback) \
                     unless auth.allow_none_on_public = true",
                    self.listen
                ),
            ));
        }
        match (self.auth.mode, &self.auth.jwt) {
            (AuthMode::Jwt, None) => {
                return Err(invalid(
                    "auth.jwt",
                    "mode = \"jwt\" needs [auth.jwt] with keys",
                ));
            }
            (AuthMode::Jwt, Some(jwt)) => jwt.validate()?,
            (AuthMode::None, Some(_)) => {
                return Err(invalid(
                    "auth.mode",
                    "[auth.jwt] is set but mode = \"none\"; set mode = \"jwt\" or remove it",
                ));
            }
            (AuthMode::None, None) => {}
        }
        if self.workers > 1024 {
            return Err(invalid("workers", "at most 1024"));
        }
        let c = &self.connection;
        if !(64..=16 * 1024 * 1024).contains(&c.max_frame_len) {
            return Err(invalid(
                "connection.max_frame_len",
                "must be 64 B ..= 16 MiB",
            ));
        }
        if c.max_queued_bytes < 1024 {
            return Err(invalid("connection.max_queued_bytes", "at least 1024"));
        }
        if c.send_buffer_bytes != 0 && !(2048..=1 << 30).contains(&c.send_buffer_bytes) {
            return Err(invalid(
                "connection.send_buffer_bytes",
                "must be 0 (the kernel's autotuning) or 2048 ..= 1 GiB",
            ));
        }
        if c.max_rooms == 0 || c.max_rooms > 1 << 20 {
            return Err(invalid("connection.max_rooms", "must be 1 ..= 1048576"));
        }
        if c.sender_aliases == 0 || c.sender_aliases > 16_384 {
            return Err(invalid("connection.sender_aliases", "must be 1 ..= 16384"));
        }
        if c.replay_page_bytes < 1024 || c.replay_page_bytes > c.max_queued_bytes {
            return Err(invalid(
                "connection.replay_page_bytes",
                "must be 1024 ..= connection.max_queued_bytes",
            ));
        }
        let h = &self.heartbeat;
        if h.min_interval.is_zero() || h.min_interval > h.max_interval {
            return Err(invalid(
                "heartbeat.min_interval",
                "must be > 0 and <= heartbeat.max_interval",
            ));
        }
        if h.interval < h.min_interval || h.interval > h.max_interval {
            return Err(invalid(
                "heartbeat.interval",
                "must lie within [min_interval, max_interval]",
            ));
        }
        if h.timeout.is_zero() {
            return Err(invalid("heartbeat.timeout", "must be > 0"));
        }
        // A connection's record keeps its times as 32-bit ms stamps, exact for ages under
        // 49 days (`conn::Stamp`); these bound every age it keeps.
        const DAY: Duration = Duration::from_secs(86_400);
        for (field, value) in [
            ("heartbeat.max_interval", h.max_interval),
            ("heartbeat.timeout", h.timeout),
            ("auth.handshake_timeout", self.auth.handshake_timeout),
        ] {
            if value > DAY {
                return Err(invalid(field, "must be at most 24h"));
            }
        }
        let interval = self.receipts.interval;
        if interval < Duration::from_millis(10) || interval > Duration::from_secs(3600) {
            return Err(invalid("receipts.interval", "must be 10ms ..= 1h"));
        }
        if self.auth.handshake_timeout.is_zero() {
            return Err(invalid("auth.handshake_timeout", "must be > 0"));
        }
        let r = &self.retention;
        if r.max_messages == 0 {
            return Err(invalid("retention.max_messages", "must be > 0"));
        }
        for o in &r.overrides {
            if o.max_messages == Some(0) {
                return Err(invalid("retention.override.max_messages", "must be > 0"));
            }
        }
        self.control.validate(self.listen)?;
        self.validate_transport()?;
        let l = &self.limits;
        if l.max_connections == 0 || l.max_connections_per_user == 0 || l.max_rooms_per_user == 0 {
            return Err(invalid("limits", "connection and room limits must be > 0"));
        }
        if l.max_rooms_per_user > c.max_rooms {
            return Err(invalid(
                "limits.max_rooms_per_user",
                format!(
                    "{} exceeds connection.max_rooms ({}): every connection of a user binds \
                     all of the user's rooms",
                    l.max_rooms_per_user, c.max_rooms
                ),
            ));
        }
        if l.max_blocked_per_user == 0 || l.max_rooms == 0 {
            return Err(invalid(
                "limits",
                "max_blocked_per_user and max_rooms must be > 0",
            ));
        }
        if !(l.subscribe_rate > 0.0 && l.subscribe_rate.is_finite()) {
            return Err(invalid(
                "limits.subscribe_rate",
                "must be a positive number",
            ));
        }
        if !(l.subscribe_burst >= 1.0 && l.subscribe_burst.is_finite()) {
            return Err(invalid("limits.subscribe_burst", "must be >= 1"));
        }
        if l.reserved_fds < 32 {
            return Err(invalid(
                "limits.reserved_fds",
                "must be at least 32 (stdio, listeners and the control API need descriptors)",
            ));
        }
        if !(l.publish_rate > 0.0 && l.publish_rate.is_finite()) {
            return Err(invalid("limits.publish_rate", "must be a positive number"));
        }
        if !(l.publish_burst >= 1.0 && l.publish_burst.is_finite()) {
            return Err(invalid("limits.publish_burst", "must be >= 1"));
        }
        if l.publish_id_max_age.is_zero() {
            return Err(invalid("limits.publish_id_max_age", "must be > 0"));
        }
        if !(l.new_connections_per_second > 0.0 && l.new_connections_per_second.is_finite()) {
            return Err(invalid(
                "limits.new_connections_per_second",
                "must be a positive number",
            ));
        }
        // A DELIVER carries up to 288 bytes more header than the PUBLISH it came from (a
        // new sender's id, a full sequence, a time delta), and clients size their frame
        // limit by the relay's: the largest payload must leave that room.
        if l.max_payload == 0 || l.max_payload + DELIVER_HEADER_MAX > c.max_frame_len {
            return Err(invalid(
                "limits.max_payload",
                format!("must be > 0 and at most connection.max_frame_len - {DELIVER_HEADER_MAX}"),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        self.storage.validate()?;
        if let Some(cluster) = &self.cluster {
            cluster.validate(self.storage.mode)?;
        }
        self.handoff.validate(!self.control.listen.is_empty())?;
        Ok(())
    }

    /// `[tls]` and `[websocket]`: both files or neither, and they must load (a missing,
    /// unreadable, malformed, expired or mismatched certificate fails here, at start, on
    /// reload and in `--check-config`, naming the field).
    fn validate_transport(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, why: String| ConfigError::Invalid { field, why };
        let t = &self.tls;
        match (&t.cert_file, &t.key_file) {
            (Some(_), None) => {
                return Err(invalid(
                    "tls.key_file",
                    "required with tls.cert_file".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls.cert_file",
                    "required with tls.key_file".into(),
                ));
            }
            (Some(cert), Some(key)) => {
                crate::transport::tls::load_certified_key(cert, key, std::time::SystemTime::now())
                    .map_err(|e| invalid(e.field(), e.to_string()))?;
            }
            (None, None) => {}
        }
        if t.tickets_per_handshake > 16 {
            return Err(invalid("tls.tickets_per_handshake", "at most 16".into()));
        }
        if t.session_cache == 0 && t.max_early_data > 0 {
            return Err(invalid(
                "tls.session_cache",
                "0-RTT (tls.max_early_data > 0) needs a session cache > 0".into(),
            ));
        }
        if let Some(ws) = self.websocket.listen_addr()? {
            if ws == self.listen && ws.port() != 0 {
                return Err(invalid(
                    "websocket.listen",
                    "must differ from `listen`".into(),
                ));
            }
            if self.auth.mode == AuthMode::None
                && !ws.ip().is_loopback()
                && !self.auth.allow_none_on_public
            {
                return Err(invalid(
                    "auth.mode",
                    format!(
                        "\"none\" is refused on websocket.listen {ws} (not loopback) unless \
                         auth.allow_none_on_public = true"
                    ),
                ));
            }
        }
        let w = &self.websocket;
        if !(256..=65_536).contains(&w.max_handshake_bytes) {
            return Err(invalid(
                "websocket.max_handshake_bytes",
                "must be 256 ..= 65536".into(),
            ));
        }
        if let Some(bad) = w
            .allowed_origins
            .iter()
            .find(|o| o.as_str() != "*" && !(o.starts_with("http://") || o.starts_with("https://")))
        {
            return Err(invalid(
                "websocket.allowed_origins",
                format!("`{bad}`: an origin is \"*\" or scheme://host[:port]"),
            ));
        }
        Ok(())
    }
}

/// Durations written as `"30s"`, `"5m"`, `"2h"`, `"1d"`, `"250ms"` or a bare number of
/// seconds.
pub(crate) mod humantime_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(crate) fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("`{text}` is not a duration like \"30s\" or \"5m\""))?;
        let scale = match unit.trim() {
            "ms" => 0.001,
            "" | "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            other => return Err(format!("unknown duration unit `{other}` (ms, s, m, h, d)")),
        };
        Duration::try_from_secs_f64(value * scale).map_err(|e| e.to_string())
    }

    pub(crate) fn format(d: &Duration) -> String {
        if d.subsec_millis() != 0 {
            format!("{}ms", d.as_millis())
        } else {
            format!("{}s", d.as_secs())
        }
    }

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(d))
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Secs(u64),
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Text(t) => parse(&t).map_err(D::Error::custom),
            Raw::Secs(s) => Ok(Duration::from_secs(s)),
        }
    }
}

pub(crate) mod humantime_secs_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::humantime_secs::format(d)),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super::humantime_secs")] Duration);
        Option::<Wrap>::deserialize(d).map(|o| o.map(|w| w.0))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_loopback() {
        let c = Config::embedded().expect("embedded default");
        assert!(c.listen.ip().is_loopback());
        assert_eq!(c.auth.mode, AuthMode::None);
    }

    #[test]
    fn empty_file_means_defaults() {
        let c = Config::from_toml("").expect("defaults");
        assert_eq!(c.heartbeat.interval, Duration::from_secs(240));
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let err = Config::from_toml("listne = \"127.0.0.1:1\"").unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");
    }

    #[test]
    fn auth_none_is_refused_on_public_addresses() {
        let err = Config::from_toml("listen = \"0.0.0.0:7700\"").unwrap_err();
        assert!(err.to_string().contains("auth.mode"), "{err}");
        Config::from_toml("listen = \"0.0.0.0:7700\"\n[auth]\nallow_none_on_public = true")
            .expect("explicitly allowed");
    }

    #[test]
    fn bad_values_name_their_field() {
        for (toml, field) in [
            ("[heartbeat]\ninterval = \"1s\"", "heartbeat.interval"),
            ("[receipts]\ninterval = \"1ms\"", "receipts.interval"),
            (
                "[connection]\nmax_frame_len = 1",
                "connection.max_frame_len",
            ),
            ("[log]\nlevel = \"[[[\"", "log.level"),
            ("[heartbeat]\ntimeout = \"5 parsecs\"", "parsecs"),
            // Connection records keep 32-bit ms stamps: ages stay under a day.
            (
                "[heartbeat]\nmax_interval = \"90000s\"",
                "heartbeat.max_interval",
            ),
            ("[heartbeat]\ntimeout = \"90000s\"", "heartbeat.timeout"),
            (
                "[auth]\nhandshake_timeout = \"90000s\"",
                "auth.handshake_timeout",
            ),
            (
                "[storage]\nfsync_interval = \"2m\"",
                "storage.fsync_interval",
            ),
            (
                "[storage]\nfsync_interval = \"0ms\"",
                "storage.fsync_interval",
            ),
            ("[storage]\nsegment_size = 1000", "storage.segment_size"),
            (
                "[storage]\nmax_disk_bytes = 1048576",
                "storage.max_disk_bytes",
            ),
            (
                "[storage]\nmode = \"disk\"\ndir = \"rel/dir\"",
                "storage.dir",
            ),
            ("[storage]\nfsync = \"sometimes\"", "sometimes"),
            (
                "[storage]\ncheckpoint_interval = \"10ms\"",
                "storage.checkpoint_interval",
            ),
        ] {
            let err = Config::from_toml(toml).unwrap_err().to_string();
            assert!(err.contains(field), "{toml}: {err}");
        }
    }

    #[test]
    fn retention_overrides_match_by_prefix() {
        let c = Config::from_toml(
            "[[retention.override]]\nprefix = \"brand:\"\nmax_age = \"1d\"\nmax_messages = 50000",
        )
        .expect("valid");
        assert_eq!(c.retention_for("brand:acme").max_messages, 50_000);
        assert_eq!(c.retention_for("dm:1:2").max_messages, 1000);
    }

    #[test]
    fn effective_config_round_trips() {
        let c = Config::embedded().expect("embedded");
        let again = Config::from_toml(&c.to_toml()).expect("round trip");
        assert_eq!(again.to_toml(), c.to_toml());
    }
}
