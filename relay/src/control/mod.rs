//! The control plane: the listener app servers and operators talk to (the server API, the
//! event stream, and the operations endpoints registered as [`Route`]s: metrics, health).
//! HTTP/1.1 with JSON bodies, on its own address, never the client port.
//!
//! It runs on one thread of its own (`pabal-control`) driving a current-thread tokio
//! runtime with hyper; the workers never see that runtime. Requests become
//! [`crate::mesh::ControlOp`]s sent to the worker that owns the room through the same mesh
//! the workers use among themselves, and the request awaits the answer (a oneshot channel,
//! which a worker fills without a runtime) with a deadline. Operations routes, which may
//! block (a health probe waits for the workers), run on the runtime's small blocking pool.
//!
//! Everything a client can hold is bounded ([`crate::config::ControlConfig`]): connections,
//! requests in flight, event streams, header bytes and count, body size, and the time
//! headers, a body, or an idle connection may take; running out of file descriptors makes
//! the accept loop back off and retry, never stop. The watchdog sees this thread through
//! [`ControlPlane::probe`]: a wedged or dead control plane stops answering like a wedged
//! worker does.
//!
//! - [`server`]: the accept loop, connections and their bounds, request dispatch.
//! - [`api`]: the `/v1` endpoints: validation, JSON, calls into the workers.
//! - [`events`]: `GET /v1/events`, the Server-Sent Events stream.
//!
//! Owns: HTTP, authentication by API key, the control runtime. Must not touch: worker
//! state, clients' sockets.

pub mod api;
pub mod events;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use subtle::ConstantTimeEq;

use crate::config::{ConfigError, ControlConfig};
use crate::runtime::Relay;

pub use server::ControlServer;

/// An HTTP answer from an operations route or the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
    /// `Retry-After`, seconds (503 while draining or busy).
    pub retry_after_s: Option<u64>,
}

impl Response {
    /// A JSON answer.
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        Response {
            status,
            content_type: "application/json",
            body: value.to_string(),
            retry_after_s: None,
        }
    }

    /// A plain-text answer.
    pub fn text(status: u16, content_type: &'static str, body: String) -> Self {
        Response {
            status,
            content_type,
            body,
            retry_after_s: None,
        }
    }
}

/// An operations endpoint (`GET /metrics`, health checks) added by the binary.
#[derive(Clone)]
pub struct Route {
    /// `GET` or `POST`.
    pub method: &'static str,
    /// The exact path.
    pub path: &'static str,
    /// Reachable without the API key (unless `control.metrics_need_key`).
    pub public: bool,
    /// Produces the answer; may block briefly (it runs on the control runtime's blocking
    /// pool, not on its event loop).
    pub handler: Arc<dyn Fn(&Relay) -> Response + Send + Sync>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

/// The settings a request is served under: `[control]` and the key it names, loaded. A
/// reload swaps them whole ([`ControlPlane::install`]); each connection and request reads
/// the ones in force when it starts.
#[derive(Debug)]
pub struct Settings {
    config: ControlConfig,
    key: Option<ApiKey>,
}

/// The API key; never printed.
struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

impl Settings {
    /// Loads `[control]`: reads `api_key_file` and applies the key rule. Fails, changing
    /// nothing, if the key does not load.
    pub fn load(config: &ControlConfig) -> Result<Settings, ConfigError> {
        let key = config.load_api_key()?.map(ApiKey);
        Ok(Settings {
            config: config.clone(),
            key,
        })
    }

    /// Whether both hold the same API key (a reload that re-read an unchanged path may
    /// still have found a new key in the file).
    pub fn same_key(&self, other: &Settings) -> bool {
        match (&self.key, &other.key) {
            (Some(ApiKey(a)), Some(ApiKey(b))) => a.as_bytes().ct_eq(b.as_bytes()).into(),
            (None, None) => true,
            _ => false,
        }
    }

    /// The `[control]` section in force.
    pub fn config(&self) -> &ControlConfig {
        &self.config
    }

    /// Whether the request presents the key (`Authorization: Bearer KEY` or `X-Api-Key:
    /// KEY`). Without a key configured the listener is loopback-only (validation enforces
    /// it) and everything is authorized; with one, an empty or absent value never is.
    pub fn authorized(&self, headers: &hyper::HeaderMap) -> bool {
        let Some(ApiKey(key)) = &self.key else {
            return true;
        };
        let bearer = headers
            .get_all(hyper::header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.as_bytes().strip_prefix(b"Bearer "));
        let plain = headers.get_all("x-api-key").iter().map(|v| v.as_bytes());
        bearer.chain(plain).any(|presented| {
            !presented.is_empty()
                && presented.len() == key.len()
                && bool::from(presented.ct_eq(key.as_bytes()))
        })
    }
}

/// Counters of what clients hold open, each checked against its bound.
#[derive(Debug, Default)]
pub(crate) struct Holdings {
    connections: AtomicUsize,
    /// Connections past `max_connections` being answered 503.
    refusals: AtomicUsize,
    in_flight: AtomicUsize,
    streams: AtomicUsize,
}

/// One unit of a bounded count, given back on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    plane: Arc<Plane>,
    which: fn(&Holdings) -> &AtomicUsize,
}

impl Slot {
    /// Takes one unit if fewer than `max` are held.
    fn take(plane: &Arc<Plane>, which: fn(&Holdings) -> &AtomicUsize, max: usize) -> Option<Slot> {
        which(&plane.holdings)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot {
                plane: plane.clone(),
                which,
            })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        (self.which)(&self.plane.holdings).fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the control thread answers besides HTTP: the watchdog's probes, and (tests only)
/// a stall.
#[derive(Debug)]
pub(crate) enum Beat {
    Stall(Duration),
}

/// The state the control thread and the rest of the relay share.
#[derive(Debug)]
pub(crate) struct Plane {
    addr: SocketAddr,
    settings: parking_lot::RwLock<Arc<Settings>>,
    holdings: Holdings,
    /// The latest probe sent; the control runtime copies it into `ack` when it runs.
    probe: tokio::sync::watch::Sender<u64>,
    ack: AtomicU64,
    beats: tokio::sync::mpsc::Sender<Beat>,
}

/// The running control plane as the rest of the relay sees it: where it listens, its
/// settings (a reload installs new ones), and its liveness probe.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    plane: Arc<Plane>,
}

impl ControlPlane {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.plane.addr
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.plane.settings.read().clone()
    }

    /// Puts new settings in force: every later connection and request uses them (a
    /// rotated key is checked from the next request on).
    pub fn install(&self, settings: Settings) {
        *self.plane.settings.write() = Arc::new(settings);
    }

    /// Asks the control runtime to acknowledge probe `seq` (see [`ControlPlane::probe_ack`]).
    pub fn probe(&self, seq: u64) {
        self.plane.probe.send_replace(seq);
    }

    /// The last probe the control runtime acknowledged: it stops moving when the control
    /// thread is wedged or gone.
    pub fn probe_ack(&self) -> u64 {
        self.plane.ack.load(Ordering::Acquire)
    }

    /// Blocks the control thread for `duration`: a wedged control plane, for watchdog
    /// tests; never reachable from the network.
    #[doc(hidden)]
    pub fn stall(&self, duration: Duration) {
        let _ = self.plane.beats.try_send(Beat::Stall(duration));
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.plane.holdings.connections.load(Ordering::Acquire)
    }
}
