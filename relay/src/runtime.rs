//! Starting and stopping the relay: listeners, one worker thread per core, the mesh between
//! them, and graceful shutdown.
//!
//! Connections are spread across workers by `SO_REUSEPORT`: each worker has its own listening
//! socket on the same address and the kernel hashes each new connection to one of them. We
//! chose this over an acceptor thread that hands connections to the least-loaded worker
//! (Seastar's way) because a relay's connections are long-lived and numerous (hundreds of
//! thousands of phones), so hashing balances them statistically, while a single acceptor
//! would be the one serial point in a reconnect storm and would add a cross-core handoff to
//! every connection. The cost: `SO_REUSEPORT` never rebalances an existing imbalance, which
//! mobile churn (connections live minutes, not days) undoes by itself.
//!
//! Owns: threads and their lifecycle. Must not touch: protocol or routing (that is
//! [`crate::core`]), syscalls on connections (that is [`crate::io`]).

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use crossbeam_channel::{Receiver, Sender};
use socket2::{Domain, Protocol, Socket, Type};

use crate::cluster::{ClusterStats, EngineHandle};
use crate::config::{Config, StorageMode};
use crate::core::{Clock, Core, Shared};
use crate::directory::Directory;
use crate::io::descriptors::{self, FDS_PER_WORKER};
use crate::io::probe::{self, BackendOptions, ResolvedKind};
use crate::io::{Backend, CloseReason, EventSink, Token, Wakeup};
use crate::mesh::{CoreMsg, Mesh};
use crate::stats::{CoreStats, StatsSnapshot};
use crate::storage::{CommitExecutor, LogOptions, SyncThread, WorkerLog};
use crate::transport::{Layers, ListenerKind, TransportShared};

/// A running relay: what every thread outside the workers (main, signals, the control
/// API, the watchdog) may use. Shared behind an `Arc`; [`RelayHandle`] owns the threads.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    control: parking_lot::Mutex<Option<crate::control::ControlPlane>>,
    /// Where the WebSocket listener is bound, if it runs.
    ws_addr: Option<SocketAddr>,
    /// TLS and WebSocket, shared by the workers (certificate swapped on reload).
    transport: Arc<TransportShared>,
    backend: ResolvedKind,
    mesh: Mesh,
    exited: Receiver<usize>,
    stats: Vec<Arc<CoreStats>>,
    directory: Arc<Directory>,
    epoch: u64,
    shared: Arc<Shared>,
    config: parking_lot::Mutex<Arc<Config>>,
    started: Instant,
    draining: std::sync::atomic::AtomicBool,
    routes: parking_lot::RwLock<Vec<crate::control::Route>>,
    /// The soft `RLIMIT_NOFILE` in force (raised to the hard limit at start).
    nofile: u64,
    /// The cluster's metrics and health (`[cluster]` only).
    cluster: Option<Arc<ClusterStats>>,
    /// Offline hand-off (`[handoff] url` set): the sender the control thread takes at its
    /// start, and the counters.
    handoff: Option<Handoff>,
    /// Each worker's test hook.
    #[cfg(feature = "test-hooks")]
    stalls: Vec<Arc<StallHook>>,
}

/// The hand-off pipeline's relay-side ends.
#[derive(Debug)]
struct Handoff {
    sender: parking_lot::Mutex<Option<crate::handoff::sender::Sender>>,
    stats: Arc<crate::handoff::HandoffStats>,
}

/// A test hook, compiled in only with the `test-hooks` feature: blocks a worker's loop for
/// a while (a wedged worker, for the watchdog's tests). Without the feature it holds nothing
/// and does nothing; either way the core never sleeps.
#[derive(Debug, Default)]
struct StallHook {
    #[cfg(feature = "test-hooks")]
    ms: std::sync::atomic::AtomicU64,
}

impl StallHook {
    fn wait(&self) {
        #[cfg(feature = "test-hooks")]
        {
            let ms = self.ms.swap(0, std::sync::atomic::Ordering::Relaxed);
            if ms > 0 {
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
    }
}

/// The running relay and its worker threads.
#[derive(Debug)]
pub struct RelayHandle {
    relay: Arc<Relay>,
    workers: Vec<JoinHandle<anyhow::Result<()>>>,
    control: Option<crate::control::ControlServer>,
}

impl std::ops::Deref for RelayHandle {
    type Target = Relay;
    fn deref(&self) -> &Relay {
        &self.relay
    }
}

/// What a reload changed and what it could not, field by field (see [`crate::reload`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Changed fields now in force.
    pub live: Vec<String>,
    /// Changed fields whose new value needs a restart to take effect (the old value stays).
    pub needs_restart: Vec<String>,
}

/// Clamps `limits.max_connections` to the connections that `nofile` descriptors leave room
/// for after `limits.reserved_fds` and the workers' own, saying so in one warning; fails
/// when no descriptor is left for connections at all.
fn fit_to_descriptors(config: &mut Config, nofile: u64, workers: usize) -> anyhow::Result<()> {
    let limits = &mut config.limits;
    let budget = descriptors::connection_budget(nofile, limits.reserved_fds, workers)?;
    if limits.max_connections > budget {
        tracing::warn!(
            "limits.max_connections clamped from {} to {budget} because RLIMIT_NOFILE is \
             {nofile} (limits.reserved_fds = {} and {FDS_PER_WORKER} per worker are kept for \
             the relay itself)",
            limits.max_connections,
            limits.reserved_fds,
        );
        limits.max_connections = budget;
    }
    Ok(())
}

fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// One listening socket per worker on the same address. Port 0 picks a free port once,
/// then binds every worker's socket to it.
fn bind_listeners(
    addr: SocketAddr,
    workers: usize,
) -> anyhow::Result<(SocketAddr, Vec<TcpListener>)> {
    let first = bind_listener(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let bound = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..workers {
        listeners.push(
            bind_listener(bound)
                .with_context(|| format!("cannot listen on {bound} (SO_REUSEPORT)"))?,
        );
    }
    Ok((bound, listeners))
}

impl RelayHandle {
    /// Starts the relay: binds, starts the workers, and returns once all of them run.
    pub fn start(mut config: Config) -> anyhow::Result<RelayHandle> {
        config.validate()?;
        let workers = config.worker_count();
        if config.storage.mode == StorageMode::Disk {
            rehome_rooms(&config, workers)?;
        }
        let nofile = descriptors::raise_nofile()
            .context("cannot read RLIMIT_NOFILE")?
            .soft;
        fit_to_descriptors(&mut config, nofile, workers)?;
        let config = Arc::new(config);
        let options = BackendOptions::default();
        // Probe on a thread of its own: tearing down the probe ring can leave io_uring task
        // work for the thread that made it, which would interrupt (EINTR) the caller's next
        // blocking socket call with a timeout.
        let backend = std::thread::scope(|scope| {
            scope
                .spawn(|| probe::choose(config.io_backend, &options))
                .join()
                .map_err(|_| anyhow!("the io_uring probe panicked"))
        })??;
        // TLS and WebSocket (transport/): a bad certificate fails here, before binding.
        let transport = Arc::new(TransportShared::new(&config).context("[tls]")?);
        let (addr, listeners) = bind_listeners(config.listen, workers)?;
        let (ws_addr, mut ws_listeners) = match config.websocket.listen_addr()? {
            Some(ws) => {
                let (bound, listeners) = bind_listeners(ws, workers)?;
                (Some(bound), listeners.into_iter().map(Some).collect())
            }
            None => (None, Vec::new()),
        };
        let tls_on = transport.tls.is_some();
        let mut layered = vec![(
            addr,
            if tls_on {
                ListenerKind::Tls
            } else {
                ListenerKind::Plain
            },
        )];
        if let Some(ws) = ws_addr {
            layered.push((
                ws,
                if tls_on {
                    ListenerKind::Wss
                } else {
                    ListenerKind::Ws
                },
            ));
        }
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        let directory = Arc::new(Directory::new(
            workers * 8,
            config.limits.max_rooms_per_user,
        ));
        let shared = Arc::new(Shared::default());
        // Cluster mode: one node id for this start, one metrics block for every engine.
        let cluster = config
            .cluster
            .as_ref()
            .map(|c| (Arc::new(ClusterStats::default()), c.node_id_or_random()));
        if let Some((_, node)) = &cluster {
            tracing::info!(node = %node, "cluster node");
        }
        // The hand-off sender loads its secret here (a bad one fails the start); workers get
        // the channel's sending end, the control thread the rest.
        let (handoff_tx, handoff) = if config.handoff.enabled() {
            let (tx, rx) =
                crate::handoff::channel(crate::handoff::channel_capacity(&config.handoff));
            let stats = tx.stats().clone();
            let sender = crate::handoff::sender::Sender::new(&config.handoff, rx)?;
            let handoff = Handoff {
                sender: parking_lot::Mutex::new(Some(sender)),
                stats,
            };
            (Some(tx), Some(handoff))
        } else {
            (None, None)
        };
        if let Some(jwt) = &config.auth.jwt {
            let verifier =
                crate::auth::Verifier::from_config(jwt).context("cannot load token keys")?;
            *shared.verifier.write() = Some(Arc::new(verifier));
        }
        let (senders, receivers) = Mesh::channels(workers);
        let (ready_tx, ready_rx) =
            crossbeam_channel::bounded::<(usize, anyhow::Result<Wakeup>)>(workers);
        let (exited_tx, exited_rx) = crossbeam_channel::unbounded();
        // Worker `i` goes to the `i`-th CPU this thread may run on (its affinity mask, as
        // `taskset` or systemd's `CPUAffinity=` set it); past the mask's end they wrap round.
        let core_ids = if config.pin_workers {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        if !core_ids.is_empty() && workers > core_ids.len() {
            tracing::warn!(
                "{workers} workers pinned over the {} CPUs this process may run on: some share \
                 a CPU (set workers = 0 for one per CPU, or widen the CPU affinity)",
                core_ids.len()
            );
        }
        let mut mesh_txs = Vec::new();
        let mut handles = Vec::new();
        let mut stats = Vec::new();
        let stalls: Vec<Arc<StallHook>> = (0..workers).map(|_| Arc::default()).collect();
        for (id, (inbox, listener)) in receivers.into_iter().zip(listeners).enumerate() {
            let (mesh_tx, mesh_rx) = crossbeam_channel::bounded::<Mesh>(1);
            mesh_txs.push(mesh_tx);
            let core_stats = Arc::new(CoreStats::default());
            stats.push(core_stats.clone());
            let worker = Worker {
                id,
                config: config.clone(),
                directory: directory.clone(),
                kind: backend,
                options: options.clone(),
                listener,
                inbox,
                epoch,
                stats: core_stats,
                shared: shared.clone(),
                pin: core_ids.get(id % core_ids.len().max(1)).copied(),
                stall: stalls[id].clone(),
                workers,
                ws_listener: ws_listeners.get_mut(id).and_then(Option::take),
                transport: transport.clone(),
                layered: layered.clone(),
                cluster: cluster.clone(),
                handoff: handoff_tx.clone(),
            };
            let ready = ready_tx.clone();
            let exited = exited_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("pabal-worker-{id}"))
                .spawn(move || {
                    let result = worker.run(ready, mesh_rx);
                    if let Err(e) = &result {
                        tracing::error!(worker = id, "worker failed: {e:#}");
                    }
                    let _ = exited.send(id);
                    result
                })
                .context("cannot spawn worker thread")?;
            handles.push(handle);
        }
        drop(ready_tx);
        let mut wakeups: Vec<Option<Wakeup>> = (0..workers).map(|_| None).collect();
        // Recovery reads what the checkpoint does not cover: seconds per GB, not minutes.
        let start_limit = match config.storage.mode {
            StorageMode::Memory => Duration::from_secs(10),
            StorageMode::Disk => Duration::from_secs(300),
        };
        for _ in 0..workers {
            let (id, wakeup) = ready_rx.recv_timeout(start_limit).map_err(|_| {
                anyhow!("a worker did not start within {} s", start_limit.as_secs())
            })?;
            match wakeup {
                Ok(w) => wakeups[id] = Some(w),
                Err(e) => {
                    drop(mesh_txs);
                    for h in handles {
                        let _ = h.join();
                    }
                    bail!(
                        "worker {id} could not start ({} backend): {e:#}",
                        backend.name()
                    );
                }
            }
        }
        let wakeups: Vec<Wakeup> = wakeups.into_iter().flatten().collect();
        let mesh = Mesh::new(senders, wakeups);
        for tx in mesh_txs {
            let _ = tx.send(mesh.clone());
        }
        tracing::info!(
            %addr,
            workers,
            backend = backend.name(),
            epoch,
            max_connections = config.limits.max_connections,
            "relay listening"
        );
        if let Some(ws) = ws_addr {
            tracing::info!(%ws, tls = tls_on, "WebSocket listening");
        }
        let relay = Arc::new(Relay {
            addr,
            control: parking_lot::Mutex::new(None),
            ws_addr,
            transport,
            backend,
            mesh,
            exited: exited_rx,
            stats,
            directory,
            epoch,
            shared,
            config: parking_lot::Mutex::new(config.clone()),
            started: Instant::now(),
            draining: std::sync::atomic::AtomicBool::new(false),
            routes: parking_lot::RwLock::new(Vec::new()),
            nofile,
            cluster: cluster.map(|(stats, _)| stats),
            handoff,
            #[cfg(feature = "test-hooks")]
            stalls,
        });
        let mut handle = RelayHandle {
            relay: relay.clone(),
            workers: handles,
            control: None,
        };
        match crate::control::ControlServer::start(&config.control, relay.clone()) {
            Ok(Some(server)) => {
                *relay.control.lock() = Some(server.plane().clone());
                tracing::info!(addr = %server.local_addr(), "control API listening");
                handle.control = Some(server);
            }
            Ok(None) => {}
            Err(e) => {
                relay.shutdown();
                let _ = handle.join();
                return Err(e);
            }
        }
        Ok(handle)
    }

    /// The shared relay, for threads that outlive this borrow (control API, watchdog).
    pub fn relay(&self) -> &Arc<Relay> {
        &self.relay
    }

    /// Waits for every worker; the first worker error, if any.
    pub fn join(mut self) -> anyhow::Result<()> {
        if let Some(control) = self.control.take() {
            control.stop();
        }
        // Any worker leaving means the relay is going down: make sure the rest follow.
        let mut first_err = None;
        for (id, handle) in std::mem::take(&mut self.workers).into_iter().enumerate() {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.relay.mesh.broadcast(|| CoreMsg::Stop);
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    self.relay.mesh.broadcast(|| CoreMsg::Stop);
                    first_err.get_or_insert(anyhow!("worker {id} panicked"));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Shuts down and waits.
    pub fn stop(self) -> anyhow::Result<()> {
        self.shutdown();
        self.join()
    }
}

impl Relay {
    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.lock().clone()
    }

    /// The state all workers share (connection count, token verifier).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Applies a new configuration without dropping connections, field by field as
    /// [`crate::reload::Plan`] sorts them: each live field is applied by its subsystem (the
    /// token verifier, the membership directory, the control plane, the workers), each
    /// restart field keeps its running value and is reported. What can fail (validation,
    /// the token keys, the API key file) is done first: a configuration that fails changes
    /// nothing.
    pub fn reload(&self, mut new: Config) -> anyhow::Result<ReloadReport> {
        new.validate()?;
        self.fit_to_descriptors(&mut new)?;
        let old = self.config();
        let plan = crate::reload::Plan::new(&old, &new)?;
        if let Err(e) = plan.effective.validate() {
            // Valid only together with what needs a restart (e.g. `auth.mode` and its
            // `[auth.jwt]`): half of it would leave the relay in a state no file describes.
            bail!(
                "the new configuration holds only with {} changed, which needs a restart; \
                 nothing was reloaded: {e}",
                plan.needs_restart.join(", ")
            );
        }
        let mut new = plan.effective;
        let mut live = plan.live;
        let mut needs_restart = plan.needs_restart;
        if new.tls.enabled() != old.tls.enabled() {
            // Turning TLS on or off changes what the listeners speak: a restart.
            live.retain(|f| !f.starts_with("tls"));
            needs_restart.push("tls (turning it on or off)".into());
            new.tls = old.tls.clone();
        }
        let verifier = match &new.auth.jwt {
            Some(jwt) => Some(Arc::new(
                crate::auth::Verifier::from_config(jwt).context("cannot load token keys")?,
            )),
            None => None,
        };
        let control = crate::control::Settings::load(&new.control)?;
        // A new certificate (same paths, renewed files) applies to handshakes from now on.
        self.transport.reload(&new).context("[tls]")?;
        *self.shared.verifier.write() = verifier;
        self.directory
            .set_max_rooms_per_user(new.limits.max_rooms_per_user);
        if let Some(plane) = self.control_plane() {
            let rotated = !plane.settings().same_key(&control);
            if rotated && !live.iter().any(|f| f.starts_with("control.api_key")) {
                // Same path, new contents.
                live.push("control.api_key_file (new key in the file)".into());
            }
            plane.install(control);
        }
        let new = Arc::new(new);
        *self.config.lock() = new.clone();
        self.mesh.broadcast(|| CoreMsg::Reload(new.clone()));
        Ok(ReloadReport {
            live,
            needs_restart,
        })
    }

    /// Clamps `limits.max_connections` of a configuration about to be applied to what the
    /// descriptors allow (see `limits.reserved_fds`), as at start. [`Relay::reload`] calls it,
    /// so that the workers' admission never sees more connections than descriptors.
    pub fn fit_to_descriptors(&self, config: &mut Config) -> anyhow::Result<()> {
        fit_to_descriptors(config, self.nofile, self.workers())
    }

    /// Asks every worker to answer a liveness probe (see [`Relay::probe_acks`]).
    pub fn probe(&self, seq: u64) {
        self.mesh.broadcast(|| CoreMsg::Probe { seq });
    }

    /// The last probe each worker answered.
    pub fn probe_acks(&self) -> Vec<u64> {
        self.stats
            .iter()
            .map(|s| s.probe_ack.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    }

    /// Message batches waiting in each worker's inbox.
    pub fn inbox_depths(&self) -> Vec<usize> {
        (0..self.mesh.cores())
            .map(|c| self.mesh.inbox_depth(c))
            .collect()
    }

    /// Sends a request to one worker (the server API's path into the relay).
    pub fn send(&self, worker: usize, msg: CoreMsg) {
        self.mesh.send(worker, vec![msg]);
    }

    /// Workers running.
    pub fn workers(&self) -> usize {
        self.mesh.cores()
    }

    /// Blocks one worker's loop for `duration`: a wedged worker, for watchdog tests (feature
    /// `test-hooks`).
    #[cfg(feature = "test-hooks")]
    pub fn stall_worker(&self, worker: usize, duration: Duration) {
        if let Some(hook) = self.stalls.get(worker) {
            hook.ms.store(
                duration.as_millis() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            // An empty batch: only the wakeup matters.
            self.mesh.send(worker, Vec::new());
        }
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the WebSocket listener is bound, if it runs.
    pub fn websocket_addr(&self) -> Option<SocketAddr> {
        self.ws_addr
    }

    /// Whether `listen` (and the WebSocket listener) speak TLS.
    pub fn tls(&self) -> bool {
        self.transport.tls.is_some()
    }

    /// The backend the workers run.
    pub fn backend(&self) -> &'static str {
        self.backend.name()
    }

    /// The boot epoch of every room created in this process.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The membership directory.
    pub fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }

    /// Counters summed across workers.
    pub fn stats(&self) -> StatsSnapshot {
        let mut total = StatsSnapshot::default();
        for s in &self.stats {
            s.add_to(&mut total);
        }
        total
    }

    /// The cluster's metrics and engine health (`None` without `[cluster]`).
    pub fn cluster(&self) -> Option<&Arc<ClusterStats>> {
        self.cluster.as_ref()
    }

    /// Each worker's durable log's metrics as last copied (empty in memory mode).
    pub fn storage_metrics(&self) -> Vec<crate::storage::StorageMetrics> {
        self.stats
            .iter()
            .filter_map(|s| *s.storage.lock())
            .collect()
    }

    /// The hand-off counters, when `[handoff] url` is set.
    pub fn handoff_stats(&self) -> Option<crate::handoff::HandoffSnapshot> {
        self.handoff.as_ref().map(|h| h.stats.snapshot())
    }

    /// The hand-off sender, for the control thread to run (once; `None` after, or when
    /// hand-offs are off).
    pub(crate) fn take_handoff_sender(&self) -> Option<crate::handoff::sender::Sender> {
        self.handoff.as_ref().and_then(|h| h.sender.lock().take())
    }

    /// Each worker's counters.
    pub fn worker_stats(&self) -> Vec<StatsSnapshot> {
        self.stats
            .iter()
            .map(|s| {
                let mut one = StatsSnapshot::default();
                s.add_to(&mut one);
                one
            })
            .collect()
    }

    /// Begins a graceful shutdown: stop accepting, deliver what was acknowledged, GOAWAY
    /// everyone, close. Returns at once; [`RelayHandle::join`] waits.
    pub fn shutdown(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.mesh.broadcast(|| CoreMsg::Drain);
    }

    /// Whether a shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// When the relay started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Where the control API listens, if it runs.
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control.lock().as_ref().map(|c| c.addr())
    }

    /// The control plane, if it runs: its settings and its liveness probe.
    pub fn control_plane(&self) -> Option<crate::control::ControlPlane> {
        self.control.lock().clone()
    }

    /// The mesh to the workers (the control API's path into the relay).
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// Adds an endpoint to the control listener (operations: metrics, health, ...).
    pub fn add_route(&self, route: crate::control::Route) {
        self.routes.write().push(route);
    }

    /// The endpoints added with [`Relay::add_route`].
    pub fn routes(&self) -> Vec<crate::control::Route> {
        self.routes.read().clone()
    }

    /// Waits until a worker exits (shutdown finished, or a worker failed); returns its index.
    pub fn wait_any_exit(&self, timeout: Option<Duration>) -> Option<usize> {
        match timeout {
            Some(t) => self.exited.recv_timeout(t).ok(),
            None => self.exited.recv().ok(),
        }
    }
}

struct Worker {
    id: usize,
    config: Arc<Config>,
    directory: Arc<Directory>,
    kind: ResolvedKind,
    options: BackendOptions,
    listener: TcpListener,
    inbox: Receiver<Vec<CoreMsg>>,
    epoch: u64,
    stats: Arc<CoreStats>,
    shared: Arc<Shared>,
    pin: Option<core_affinity::CoreId>,
    stall: Arc<StallHook>,
    /// Workers in the relay.
    workers: usize,
    /// This worker's socket on the WebSocket address (`SO_REUSEPORT`), if it runs.
    ws_listener: Option<TcpListener>,
    transport: Arc<TransportShared>,
    /// Bound addresses and what they speak.
    layered: Vec<(SocketAddr, ListenerKind)>,
    /// `[cluster]`: the shared metrics and this node's id.
    cluster: Option<(Arc<ClusterStats>, String)>,
    /// Where the core's offline hand-offs go (`[handoff] url` set).
    handoff: Option<crate::handoff::HandoffTx>,
}

impl Worker {
    fn run(
        self,
        ready: Sender<(usize, anyhow::Result<Wakeup>)>,
        mesh_rx: Receiver<Mesh>,
    ) -> anyhow::Result<()> {
        if let Some(core) = self.pin
            && !core_affinity::set_for_current(core)
        {
            tracing::debug!(worker = self.id, "could not pin to core {}", core.id);
        }
        let mut backend = match probe::new_backend(self.kind, &self.options) {
            Ok(b) => b,
            Err(e) => {
                let text = e.to_string();
                let _ = ready.send((self.id, Err(anyhow!("backend: {text}"))));
                bail!("backend: {text}");
            }
        };
        let now = Instant::now();
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut core = Core::new(
            self.id,
            self.workers,
            self.config.clone(),
            self.directory,
            self.epoch,
            self.stats.clone(),
            self.shared,
            Clock::new(now, unix_ms),
            now,
        );
        // Disk mode: recover this worker's log and restore its rooms (and their members
        // into the directory) before the relay says it is ready, so no phone is told a room
        // does not exist because its owner had not read it back yet.
        let mut executor = match open_storage(self.id, &self.config, &mut core, &mut *backend) {
            Ok(exec) => exec,
            Err(e) => {
                let text = format!("{e:#}");
                let _ = ready.send((self.id, Err(e)));
                bail!("{text}");
            }
        };
        // Cluster mode: this worker's engine, on the worker's thread (its poll watched by the
        // backend) or on a thread of its own answering through the worker's wakeup.
        let mut engine = match (&self.config.cluster, &self.cluster) {
            (Some(config), Some((stats, node))) => {
                let wakeup = backend.wakeup();
                match EngineHandle::spawn(
                    self.id,
                    config,
                    // Restart-only, and above every payload `limits.max_payload` (which a
                    // reload may raise) lets through: the bound cannot fall below a page.
                    self.config.connection.max_frame_len,
                    node,
                    Box::new(move || wakeup.wake()),
                    stats.clone(),
                ) {
                    Ok(engine) => {
                        if let Some(fd) = engine.poll_fd()
                            && let Err(e) = backend.watch_readable(fd)
                        {
                            let text = format!("cannot watch the engine's connections: {e}");
                            let _ = ready.send((self.id, Err(anyhow!("{text}"))));
                            bail!("{text}");
                        }
                        core.attach_cluster(stats.clone());
                        Some(engine)
                    }
                    Err(e) => {
                        let text = format!("cannot start the engine: {e}");
                        let _ = ready.send((self.id, Err(anyhow!("{text}"))));
                        bail!("{text}");
                    }
                }
            }
            _ => None,
        };
        let _ = ready.send((self.id, Ok(backend.wakeup())));
        let Ok(mesh) = mesh_rx.recv() else {
            return Ok(()); // start-up aborted elsewhere
        };
        backend
            .add_listener(self.listener)
            .context("cannot accept on the listener")?;
        if let Some(ws) = self.ws_listener {
            backend
                .add_listener(ws)
                .context("cannot accept on the WebSocket listener")?;
        }
        let mut layers = Layers::new(self.transport, self.layered, self.stats.clone());
        let result = run_loop(
            &mut *backend,
            &mut core,
            &mut layers,
            &self.inbox,
            &mesh,
            &self.stats,
            &self.stall,
            executor.as_mut(),
            engine.as_mut(),
            self.handoff.as_ref(),
        );
        if let (Some(mut log), Some(exec)) = (core.take_storage(), executor.as_mut()) {
            // A clean stop: everything appended synced and a checkpoint written, so the
            // next start recovers without scanning.
            log.begin_close();
            let closed = match exec {
                Executor::Thread(t) => log.flush_blocking(t, CLOSE_LIMIT),
                Executor::Backend => {
                    log.flush_blocking(&mut DrivenByBackend(&mut *backend), CLOSE_LIMIT)
                }
            };
            if !closed {
                tracing::warn!(
                    worker = self.id,
                    "storage: the log did not close within {} s; the next start recovers it",
                    CLOSE_LIMIT.as_secs()
                );
            }
        }
        result
    }
}

/// How long a worker waits at a clean stop for its log's last sync and checkpoint.
const CLOSE_LIMIT: Duration = Duration::from_secs(10);

/// Disk mode: when `[storage] dir` holds the logs of another worker count (or a
/// re-homing a crash interrupted), re-homes every room into the log of the worker that owns
/// it under `workers` ([`crate::storage::rehome`]) before any worker starts.
fn rehome_rooms(config: &Config, workers: usize) -> anyhow::Result<()> {
    let opts = LogOptions::from_config(&config.storage, workers);
    let started = Instant::now();
    let report =
        crate::storage::rehome::rehome(&config.storage.dir, workers, opts).with_context(|| {
            format!(
                "storage.dir {}: re-homing rooms for workers = {workers}",
                config.storage.dir.display()
            )
        })?;
    if let Some(r) = report {
        tracing::warn!(
            from = r.from_workers,
            to = r.to_workers,
            rooms = r.rooms,
            moved = r.moved,
            messages = r.messages,
            new_epochs = r.new_epochs,
            ms = started.elapsed().as_millis() as u64,
            "storage: the worker count changed; every room was re-homed to its new owner's log"
        );
    }
    Ok(())
}

/// Who runs a worker's durable-log jobs.
enum Executor {
    /// The backend itself ([`Backend::storage_executor`]: io_uring, through the ring).
    Backend,
    /// A sync thread (epoll).
    Thread(SyncThread),
}

impl Executor {
    /// The executor to submit to and poll.
    fn get<'a>(&'a mut self, backend: &'a mut dyn Backend) -> Option<&'a mut dyn CommitExecutor> {
        match self {
            Executor::Thread(t) => Some(t),
            Executor::Backend => backend.storage_executor(),
        }
    }
}

/// The backend's executor with a blocking wait, for the clean stop: waiting polls the
/// backend (its events are dropped: the core has finished), which is what completes the
/// ring's operations.
struct DrivenByBackend<'a>(&'a mut dyn Backend);

impl CommitExecutor for DrivenByBackend<'_> {
    fn submit(&mut self, job: crate::storage::Job) {
        if let Some(exec) = self.0.storage_executor() {
            exec.submit(job);
        }
    }

    fn poll(&mut self, out: &mut Vec<crate::storage::Completion>) {
        if let Some(exec) = self.0.storage_executor() {
            exec.poll(out);
        }
    }

    fn wait(&mut self, out: &mut Vec<crate::storage::Completion>, timeout: Duration) {
        self.poll(out);
        if out.is_empty() {
            if let Err(e) = self.0.poll(Some(timeout), &mut Discard) {
                tracing::warn!(error = %e, "backend poll failed while closing the log");
            }
            if let Some(exec) = self.0.storage_executor() {
                exec.wait(out, Duration::ZERO);
            }
        }
    }
}

/// Drops a backend's events (a worker whose core has finished, closing its log).
struct Discard;

impl EventSink for Discard {
    fn accepted(&mut self, _: &std::net::TcpStream, _: SocketAddr) -> Option<Token> {
        None
    }
    fn received(&mut self, _: Token, _: &[u8]) {}
    fn sent(&mut self, _: Token, _: usize) {}
    fn closed(&mut self, _: Token, _: CloseReason) {}
    fn woken(&mut self) {}
}

/// Opens and recovers worker `id`'s log (disk mode), hands the core what it recovered, and
/// picks the executor that runs the log's jobs: the backend's own where it has one
/// (io_uring), else a sync thread woken through the worker's eventfd (epoll). `None` in
/// memory mode.
fn open_storage(
    id: usize,
    config: &Config,
    core: &mut Core,
    backend: &mut dyn Backend,
) -> anyhow::Result<Option<Executor>> {
    if config.storage.mode != StorageMode::Disk {
        return Ok(None);
    }
    let workers = config.worker_count();
    let opts = LogOptions::from_config(&config.storage, workers);
    let now = Instant::now();
    let (log, report) = WorkerLog::open(&config.storage.dir, id as u32, opts, now)
        .with_context(|| format!("storage.dir: worker {id}'s log"))?;
    tracing::info!(
        worker = id,
        ms = report.duration.as_millis() as u64,
        bytes = report.bytes_scanned,
        records = report.records,
        rooms = log.state().rooms.len(),
        torn_tail = report.torn_tail.is_some(),
        quarantined = report.quarantined.len(),
        "storage recovered"
    );
    for q in &report.quarantined {
        tracing::error!(worker = id, segment = q.segment, path = %q.path.display(), offset = q.offset, "storage: a damaged segment was quarantined; its rooms start a new epoch");
    }
    core.attach_storage(log, &report, now)
        .with_context(|| format!("storage.dir: restoring worker {id}'s rooms"))?;
    if backend.storage_executor().is_some() {
        return Ok(Some(Executor::Backend));
    }
    let wakeup = backend.wakeup();
    let exec = SyncThread::spawn(
        &format!("pabal-worker-{id}"),
        Some(Arc::new(move || wakeup.wake())),
    )
    .context("cannot start the storage threads")?;
    Ok(Some(Executor::Thread(exec)))
}

/// Hands a backend's events to the core, each with the time it happened, and sets up each
/// accepted socket. The only place a worker reads the clock for its core.
struct Driver<'a> {
    core: &'a mut Core,
}

impl EventSink for Driver<'_> {
    fn accepted(&mut self, stream: &std::net::TcpStream, peer: SocketAddr) -> Option<Token> {
        if !self.core.accepting() {
            return None;
        }
        let config = self.core.config();
        configure_socket(
            stream,
            &config.heartbeat,
            config.connection.send_buffer_bytes,
        );
        self.core.admit(Instant::now(), peer)
    }

    fn received(&mut self, token: Token, data: &[u8]) {
        self.core.on_bytes(Instant::now(), token, data);
    }

    fn sent(&mut self, token: Token, bytes: usize) {
        self.core.on_sent(Instant::now(), token, bytes);
    }

    fn closed(&mut self, token: Token, reason: CloseReason) {
        tracing::trace!(token, ?reason, "connection closed by peer");
        self.core.on_closed(Instant::now(), token);
    }

    fn woken(&mut self) {}
}

/// Socket options for a client connection.
fn configure_socket(
    stream: &std::net::TcpStream,
    hb: &crate::config::HeartbeatConfig,
    send_buffer_bytes: usize,
) {
    let sock = socket2::SockRef::from(stream);
    if send_buffer_bytes > 0 {
        let _ = sock.set_send_buffer_size(send_buffer_bytes);
    }
    // The relay batches its own writes; Nagle would only add delay.
    let _ = sock.set_tcp_nodelay(true);
    // Kernel keepalive backs up the protocol heartbeat for peers that never finished the
    // handshake or whose app froze; unacknowledged data times out after the heartbeat
    // window so a vanished phone does not hold a socket for 15 minutes.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(hb.interval + hb.timeout)
        .with_interval(Duration::from_secs(15))
        .with_retries(4);
    let _ = sock.set_tcp_keepalive(&keepalive);
    let _ = sock.set_tcp_user_timeout(Some(hb.timeout + Duration::from_secs(60)));
}

/// Hands the engine what the owners asked of it since the last hand-over, with one wake
/// (cluster mode); `queued`: when the tick began (one clock read per tick, not one per
/// command).
fn hand_to_engine(core: &mut Core, engine: Option<&mut EngineHandle>, queued: Instant) {
    if let Some(engine) = engine
        && core.drain_engine(|cmd| engine.send(queued, cmd))
    {
        engine.wake();
    }
}

/// The event loop: drain messages, run timers, flush (one send per connection, one batch
/// per peer worker), then wait in the backend (one `io_uring_enter` or `epoll_wait`).
///
/// TLS and WebSocket hook in here, and only here: the backend's events reach the core
/// through [`Layers::sink`], the core's flush reaches the backend through
/// [`Layers::transport`], and [`Layers::flush`] sends what the layers produced.
#[allow(clippy::too_many_arguments)] // reason: the parts of one worker, once
fn run_loop(
    backend: &mut dyn Backend,
    core: &mut Core,
    layers: &mut Layers,
    inbox: &Receiver<Vec<CoreMsg>>,
    mesh: &Mesh,
    stats: &CoreStats,
    stall: &StallHook,
    mut storage: Option<&mut Executor>,
    mut engine: Option<&mut EngineHandle>,
    handoff: Option<&crate::handoff::HandoffTx>,
) -> anyhow::Result<()> {
    let mut next_sample = Instant::now();
    let mut completions = Vec::new();
    loop {
        stall.wait();
        let now = Instant::now();
        core.tick();
        if let Some(exec) = storage.as_deref_mut().and_then(|s| s.get(&mut *backend)) {
            // What the disk finished since the last tick: releases the outputs held for it.
            exec.poll(&mut completions);
            for c in completions.drain(..) {
                core.on_storage_completion(now, c);
            }
        }
        if now >= next_sample {
            core.sample_queues();
            next_sample = now + Duration::from_secs(1);
        }
        while let Ok(batch) = inbox.try_recv() {
            core.handle(now, batch);
        }
        if let Some(engine) = engine.as_deref_mut() {
            // What the engine answered since the last tick (cluster mode); an engine on this
            // thread reads it now (its poll only when the backend saw it signal).
            engine.turn(backend.watch_fired());
            let took = Instant::now();
            while let Some(event) = engine.try_recv(took) {
                core.on_engine(now, event);
            }
        }
        core.run_timers(now);
        // What the tick's frames asked of the engine (publishes) goes before the
        // connections' writes: Redis runs the scripts while this worker writes. Stamped
        // with the tick's start, just after the poll that read the frames, so that
        // `pabal_cluster_to_engine_seconds` holds the worker's own time before the
        // hand-over.
        hand_to_engine(core, engine.as_deref_mut(), now);
        core.flush(&mut layers.transport(backend));
        layers.flush(backend);
        core.drain_mesh(|to, batch| mesh.send(to, batch));
        core.drain_replies(|to, answer| {
            // The control plane may have given up waiting; nothing to do then.
            let _ = to.send(answer);
        });
        // What the flush added (marker batches, releases).
        hand_to_engine(core, engine.as_deref_mut(), now);
        if let Some(tx) = handoff {
            // try_send: a full channel drops the hand-off and counts it; never waits.
            core.drain_handoffs(|h| {
                tx.offer(h);
            });
        }
        if let Some(exec) = storage.as_deref_mut().and_then(|s| s.get(&mut *backend)) {
            // Group commit: everything this tick appended goes out as one job.
            while let Some(job) = core.poll_storage_job(now) {
                exec.submit(job);
            }
        }
        if core.finished() {
            return Ok(());
        }
        let engine_waits = engine.as_deref().is_some_and(EngineHandle::has_events);
        let timeout = if inbox.is_empty() && !layers.has_work() && !engine_waits {
            // An engine on this thread: its next timer bounds the wait too.
            let engine_at = engine.as_deref().and_then(EngineHandle::deadline);
            match (core.next_timeout(), engine_at) {
                (t, None) => t,
                (t, Some(at)) => {
                    let until = at.saturating_duration_since(Instant::now());
                    Some(t.map_or(until, |t| t.min(until)))
                }
            }
        } else {
            Some(Duration::ZERO)
        };
        backend
            .poll(timeout, &mut layers.sink(&mut Driver { core }))
            .context("backend poll failed")?;
        let accept = backend.accept_stats();
        stats
            .accept_failures
            .store(accept.failures, std::sync::atomic::Ordering::Relaxed);
        stats
            .accept_pauses
            .store(accept.pauses, std::sync::atomic::Ordering::Relaxed);
    }
}
