//! `--spawn-relay`: a local relay (or `--nodes N` cluster nodes on one Redis) as child
//! processes, for a one-command demo and for failure runs.
//!
//! Owns: finding the `relay` binary (next to loadgen's own executable), picking free loopback
//! ports, writing a temporary configuration, starting the child, waiting until it accepts,
//! killing it with SIGKILL and starting it again on the same ports ([`SpawnedRelay::kill`],
//! [`SpawnedRelay::restart`]), and stopping it with SIGTERM (then waiting for its graceful
//! exit). Must not touch: the run itself, and Redis (the caller runs it).
//!
//! # Its log
//! The child's stderr (its log, `[log] level = "warn"`; `RUST_LOG` in loadgen's environment
//! reaches the child and overrides it) is loadgen's own, unless a folder is named
//! ([`SpawnOptions::log_dir`], or the environment variable [`NODE_LOGS_ENV`]): then each
//! child writes `<folder>/<name>.log` (the cluster node's id, else `relay-<n>`), appended
//! to across a kill and restart, each start marked by a line of loadgen's. A failed run
//! then keeps what every node said, node by node.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::scenario::RelaySpec;

/// What the spawned relay is told.
#[derive(Debug, Clone, Default)]
pub struct SpawnOptions {
    /// The binary; default: `relay` next to the current executable.
    pub relay_bin: Option<PathBuf>,
    /// Worker threads.
    pub workers: usize,
    /// The scenario's `[relay]` section.
    pub spec: RelaySpec,
    /// HS256 secret: the relay verifies JWTs with it.
    pub jwt_secret_file: Option<PathBuf>,
    /// The API key app servers present.
    pub api_key_file: Option<PathBuf>,
    /// A cluster node: its `[cluster]` section.
    pub cluster: Option<ClusterNode>,
    /// The relay's `io_backend` (`epoll`, `io_uring`); `None`: its default.
    pub io_backend: Option<String>,
    /// A folder for the child's log (`<name>.log`, see the module docs); `None`: the
    /// folder [`NODE_LOGS_ENV`] names, if set, else the child's stderr is loadgen's.
    pub log_dir: Option<PathBuf>,
}

/// The environment variable naming a folder for spawned relays' logs when
/// [`SpawnOptions::log_dir`] does not.
pub const NODE_LOGS_ENV: &str = "PABAL_LOADGEN_NODE_LOGS";

/// What makes a spawned relay one node of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    /// The engine, `redis://host:port`.
    pub redis: String,
    /// The node's name (unique in the cluster).
    pub node_id: String,
}

/// A running child relay; stopped (SIGTERM, then SIGKILL after 30 s) when dropped.
#[derive(Debug)]
pub struct SpawnedRelay {
    child: Option<Child>,
    /// Where phones connect.
    pub addr: SocketAddr,
    /// Where the control API listens.
    pub control: SocketAddr,
    config_path: PathBuf,
    bin: PathBuf,
    /// Where the child's stderr goes (appended to); `None`: loadgen's stderr.
    log_path: Option<PathBuf>,
    /// Starts so far (a restart is the second).
    starts: u32,
}

/// Tells apart the configuration files of the relays one loadgen process starts.
static NEXT_CONFIG: AtomicU32 = AtomicU32::new(0);

fn free_port() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot find a free loopback port")?;
    Ok(l.local_addr()?)
}

fn find_relay(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("cannot locate loadgen's own executable")?;
    let dir = exe
        .parent()
        .context("loadgen's executable has no directory")?;
    for candidate in [dir.join("relay"), dir.join("../relay")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "no `relay` binary next to {}: build it (`cargo build --release --bin relay --bin loadgen`) \
         or give --relay-bin",
        exe.display()
    )
}

/// The configuration file's text.
pub fn config_text(addr: SocketAddr, control: SocketAddr, o: &SpawnOptions) -> String {
    let mut t = format!(
        "# written by loadgen --spawn-relay\nlisten = \"{addr}\"\nworkers = {}\n",
        o.workers.max(1)
    );
    if let Some(backend) = &o.io_backend {
        t.push_str(&format!("io_backend = {backend:?}\n"));
    }
    if let Some(secret) = &o.jwt_secret_file {
        t.push_str(&format!(
            "\n[auth]\nmode = \"jwt\"\n\n[auth.jwt]\n[[auth.jwt.keys]]\nalgorithm = \"HS256\"\n\
             secret_file = {:?}\n",
            secret.display().to_string()
        ));
    }
    t.push_str(&format!("\n[control]\nlisten = \"{control}\"\n"));
    if let Some(key) = &o.api_key_file {
        t.push_str(&format!("api_key_file = {:?}\n", key.display().to_string()));
    }
    t.push_str("\n[log]\nlevel = \"warn\"\n");
    if let Some(node) = &o.cluster {
        t.push_str(&format!(
            "\n[cluster]\nengine = \"redis\"\nredis = [{:?}]\nnode_id = {:?}\n",
            node.redis, node.node_id
        ));
    }
    let spec = &o.spec;
    if spec.new_connections_per_second.is_some() {
        t.push_str("\n[limits]\n");
        if let Some(rate) = spec.new_connections_per_second {
            t.push_str(&format!(
                "new_connections_per_second = {:.3}\n",
                rate.max(0.001)
            ));
        }
    }
    if let Some(spread) = spec.reconnect_spread_s {
        t.push_str(&format!(
            "\n[shutdown]\nreconnect_spread = \"{}ms\"\n",
            (spread * 1000.0).round() as u64
        ));
    }
    if !spec.extra_toml.trim().is_empty() {
        t.push('\n');
        t.push_str(&spec.extra_toml);
        t.push('\n');
    }
    t
}

impl SpawnedRelay {
    /// Starts the relay and waits (up to 20 s) until it accepts connections (clients and
    /// server API).
    pub fn start(o: &SpawnOptions) -> anyhow::Result<SpawnedRelay> {
        let bin = find_relay(o.relay_bin.as_deref())?;
        let addr = free_port()?;
        let mut control = free_port()?;
        while control == addr {
            control = free_port()?;
        }
        let n = NEXT_CONFIG.fetch_add(1, Ordering::Relaxed);
        let config_path = std::env::temp_dir().join(format!(
            "pabal-loadgen-relay-{}-{n}.toml",
            std::process::id(),
        ));
        std::fs::write(&config_path, config_text(addr, control, o))
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let log_dir = o
            .log_dir
            .clone()
            .or_else(|| std::env::var_os(NODE_LOGS_ENV).map(PathBuf::from));
        let log_path = match log_dir {
            Some(dir) => {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let name = o
                    .cluster
                    .as_ref()
                    .map_or_else(|| format!("relay-{n}"), |c| c.node_id.clone());
                Some(dir.join(format!("{name}.log")))
            }
            None => None,
        };
        let mut relay = SpawnedRelay {
            child: None,
            addr,
            control,
            config_path,
            bin,
            log_path,
            starts: 0,
        };
        relay.launch()?;
        Ok(relay)
    }

    /// Starts the child on the configuration already written and waits (up to 20 s) until
    /// it accepts connections on its client port and its server API.
    fn launch(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let stderr = match &self.log_path {
            Some(path) => Stdio::from(self.open_log(path)?),
            None => Stdio::inherit(),
        };
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // Both listeners: the server API comes up after the client port, and a run sets
            // memberships through it first thing.
            let accepts =
                |addr| TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok();
            if accepts(&self.addr) && accepts(&self.control) {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "the relay exited at start ({status}); its configuration: {}",
                    self.config_path.display()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the relay did not accept connections on {} within 20 s",
                    self.addr
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Opens the child's log for appending, marked with this start.
    fn open_log(&self, path: &Path) -> anyhow::Result<File> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        writeln!(
            file,
            "--- loadgen: start {} of {} on {} (unix time {}.{:03} s) ---",
            self.starts,
            self.bin.display(),
            self.addr,
            since_epoch.as_secs(),
            since_epoch.subsec_millis()
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(file)
    }

    /// The file the child's stderr goes to, if it has one (see the module docs).
    pub fn log_path(&self) -> Option<&Path> {
        self.log_path.as_deref()
    }

    /// The child's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the relay with SIGKILL (no GOAWAY, no graceful close: its connections reset,
    /// its publishes in flight are lost with them) and waits for it to be gone.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("cannot kill the relay")?;
            child.wait().context("cannot wait for the killed relay")?;
        }
        Ok(())
    }

    /// Starts the relay again, after [`SpawnedRelay::kill`], on the same ports and
    /// configuration; waits until it accepts.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("the relay on {} is still running", self.addr);
        }
        self.launch()
    }

    /// SIGTERM, then waits for the graceful exit (SIGKILL after 30 s).
    pub fn stop(mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.terminate()
    }

    fn terminate(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            let _ = std::fs::remove_file(&self.config_path);
            return Ok(None);
        };
        // std has no SIGTERM and loadgen has no unsafe code: ask kill(1).
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                let _ = std::fs::remove_file(&self.config_path);
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let status = child.wait()?;
                let _ = std::fs::remove_file(&self.config_path);
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SpawnedRelay {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn the_config_names_ports_workers_and_scenario_settings() {
        let o = SpawnOptions {
            workers: 2,
            spec: RelaySpec {
                new_connections_per_second: Some(50.0),
                reconnect_spread_s: Some(5.0),
                extra_toml: "[retention]\nmax_messages = 5000".into(),
                ..RelaySpec::default()
            },
            cluster: Some(ClusterNode {
                redis: "redis://127.0.0.1:6390".into(),
                node_id: "n2".into(),
            }),
            io_backend: Some("epoll".into()),
            ..SpawnOptions::default()
        };
        let t = config_text(
            "127.0.0.1:5000".parse().unwrap(),
            "127.0.0.1:5001".parse().unwrap(),
            &o,
        );
        let v: toml::Value = toml::from_str(&t).unwrap();
        assert_eq!(v["listen"].as_str(), Some("127.0.0.1:5000"));
        assert_eq!(v["workers"].as_integer(), Some(2));
        assert_eq!(v["io_backend"].as_str(), Some("epoll"));
        assert_eq!(v["control"]["listen"].as_str(), Some("127.0.0.1:5001"));
        assert_eq!(
            v["limits"]["new_connections_per_second"].as_float(),
            Some(50.0)
        );
        assert_eq!(v["shutdown"]["reconnect_spread"].as_str(), Some("5000ms"));
        assert_eq!(v["retention"]["max_messages"].as_integer(), Some(5000));
        assert_eq!(v["cluster"]["engine"].as_str(), Some("redis"));
        assert_eq!(
            v["cluster"]["redis"][0].as_str(),
            Some("redis://127.0.0.1:6390")
        );
        assert_eq!(v["cluster"]["node_id"].as_str(), Some("n2"));
    }
}
