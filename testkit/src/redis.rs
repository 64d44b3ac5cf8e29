//! A private Redis for one test: `redis-server` on a free loopback port in a temporary
//! directory, append-only with `appendfsync always` (so a restart keeps everything it
//! acknowledged), killed when dropped, restartable on the same port and directory.
//!
//! Owns: the child process and its directory. Must not touch: the system's Redis (never
//! port 6379 unless the kernel hands it out, never its configuration).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
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
        if !available() {
            crate::skip("redis-server is not installed (.ci/install-redis.sh installs it)");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = RedisServer {
            child: None,
            port,
            dir: TempDir::new(&format!("redis-{name}")),
        };
        server.restart();
        Some(server)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server again (after [`RedisServer::kill`]) on the same port and
    /// directory, and waits until it answers PING (its append-only file loaded).
    pub fn restart(&mut self) {
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
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            if self.try_cli(&["PING"]).is_some_and(|r| r.trim() == "PONG") {
                return;
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

    /// Runs one command with `redis-cli`; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args).expect("redis-cli runs")
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
