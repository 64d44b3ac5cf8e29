//! The test relay: [`loopback_config`], the one definition of a relay for tests and benches,
//! and [`TestRelay`], one started in this process and stopped when dropped.
//!
//! Owns: the test relay's configuration and lifetime. Must not touch: what a test tweaks on
//! top (its closure or its own fields).

use std::net::SocketAddr;
use std::ops::Deref;

use pabal_relay::cluster::ClusterConfig;
use pabal_relay::config::Config;
use pabal_relay::io::BackendKind;
use pabal_relay::runtime::RelayHandle;

/// A relay for tests: `workers` workers on `backend`, listening on 127.0.0.1 port 0 with its
/// control API on 127.0.0.1 port 0, workers unpinned, log level `warn`, and the publish rate
/// lifted (tests publish in bulk from one connection; the rate limit has its own tests).
pub fn loopback_config(backend: BackendKind, workers: usize) -> Config {
    let mut config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        workers,
        pin_workers: false,
        io_backend: backend,
        ..Config::default()
    };
    config.log.level = "warn".into();
    config.control.listen = "127.0.0.1:0".into();
    config.limits.publish_rate = 1e9;
    config.limits.publish_burst = 1e9;
    config
}

/// A relay for one test, stopped (gracefully) when dropped. Derefs to its [`RelayHandle`].
#[derive(Debug)]
pub struct TestRelay {
    handle: Option<RelayHandle>,
    /// Where clients connect.
    pub addr: SocketAddr,
}

impl TestRelay {
    /// A cluster node: two workers on `backend`, `cluster` as its `[cluster]` section,
    /// `tweak` for the rest; returned once every engine is up, since a phone's HELLO
    /// is refused `unavailable` before that (its rooms are read from the engine).
    pub fn cluster_node(
        backend: BackendKind,
        cluster: ClusterConfig,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let node = Self::start(backend, 2, |c| {
            c.cluster = Some(cluster);
            tweak(c);
        });
        node.wait_for_engine();
        node
    }

    /// Waits until every engine of a cluster node has its connections up (the
    /// slot map read, or the master found through Sentinel); panics after [`WAIT`].
    pub fn wait_for_engine(&self) {
        let stats = self.cluster().expect("a cluster node").clone();
        let deadline = std::time::Instant::now() + crate::WAIT;
        while !(stats.healthy() && stats.engines_up.load(std::sync::atomic::Ordering::Relaxed) > 0)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the engine never came up"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// A relay from [`loopback_config`] with `workers` workers and the given backend; `tweak`
    /// adjusts the rest of the configuration.
    pub fn start(backend: BackendKind, workers: usize, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = loopback_config(backend, workers);
        tweak(&mut config);
        let handle = RelayHandle::start(config).expect("relay starts");
        let addr = handle.local_addr();
        TestRelay {
            handle: Some(handle),
            addr,
        }
    }

    /// The running relay.
    pub fn handle(&self) -> &RelayHandle {
        self.handle.as_ref().expect("the relay is running")
    }

    /// Graceful shutdown, waiting for the workers.
    pub fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.stop().expect("clean shutdown");
        }
    }

    /// Begins a graceful shutdown without waiting.
    pub fn begin_shutdown(&self) {
        self.handle().shutdown();
    }

    /// Waits for the workers after [`TestRelay::begin_shutdown`].
    pub fn join(mut self) {
        if let Some(h) = self.handle.take() {
            h.join().expect("clean shutdown");
        }
    }
}

impl Deref for TestRelay {
    type Target = RelayHandle;

    fn deref(&self) -> &RelayHandle {
        self.handle()
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.stop();
        }
    }
}
