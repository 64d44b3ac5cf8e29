//! `--spawn-relay`: a local relay as a child process, for a one-command demo.
//!
//! Owns: finding the `relay` binary (next to loadgen's own executable), picking free loopback
//! ports, writing a temporary configuration, starting the child, waiting until it accepts,
//! and stopping it with SIGTERM (then waiting for its graceful exit). Must not touch: the
//! run itself.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
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
}

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
    /// Starts the relay and waits (up to 20 s) until it accepts connections.
    pub fn start(o: &SpawnOptions) -> anyhow::Result<SpawnedRelay> {
        let bin = find_relay(o.relay_bin.as_deref())?;
        let addr = free_port()?;
        let mut control = free_port()?;
        while control == addr {
            control = free_port()?;
        }
        let config_path =
            std::env::temp_dir().join(format!("pabal-loadgen-relay-{}.toml", std::process::id()));
        std::fs::write(&config_path, config_text(addr, control, o))
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut relay = SpawnedRelay {
            child: Some(child),
            addr,
            control,
            config_path,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(relay);
            }
            if let Some(child) = &mut relay.child
                && let Some(status) = child.try_wait()?
            {
                relay.child = None;
                bail!(
                    "the relay exited at start ({status}); its configuration: {}",
                    relay.config_path.display()
                );
            }
            if Instant::now() >= deadline {
                bail!("the relay did not accept connections on {addr} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits for the graceful exit (SIGKILL after 30 s).
    pub fn stop(mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.terminate()
    }

    fn terminate(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
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
        assert_eq!(v["control"]["listen"].as_str(), Some("127.0.0.1:5001"));
        assert_eq!(
            v["limits"]["new_connections_per_second"].as_float(),
            Some(50.0)
        );
        assert_eq!(v["shutdown"]["reconnect_spread"].as_str(), Some("5000ms"));
        assert_eq!(v["retention"]["max_messages"].as_integer(), Some(5000));
    }
}
