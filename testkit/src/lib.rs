//! pabal's one test kit, shared by every test crate and the benches: the one place that knows
//! what "a test relay" is ([`loopback_config`], [`TestRelay`]), a blocking client built on the
//! codec alone ([`Client`]), the spawned release binary ([`daemon::Daemon`]), raw HTTP for the
//! control plane ([`http`]), a WebSocket client ([`ws`]), test certificates ([`pki`]), a private
//! Redis ([`redis`]), and
//! the rule that nothing may skip under CI ([`skip`], [`per_backend!`], [`backends`]).
//!
//! Owns: test plumbing only. Every wait is bounded by [`WAIT`]: a hang fails the test
//! instead of CI. Must not touch: the relay's internals (only its public API), and nothing
//! here may be used by a production crate (it is a dev-dependency everywhere).

#![allow(clippy::unwrap_used)] // reason: test helpers fail loudly on purpose

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pabal_relay::io::BackendKind;
use pabal_relay::io::probe::{self, BackendOptions};

pub mod blackhole;
mod client;
pub mod daemon;
pub mod http;
pub mod pki;
pub mod redis;
mod relay;
pub mod ws;

pub use client::{Client, forged_resume};
pub use redis::free_port;
pub use relay::{TestRelay, loopback_config};

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// Whether this run is CI's (`CI=true`), where no test may skip.
pub fn under_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Reports a test (or a part of one) that cannot run on this machine: a `skipped:` line on
/// stderr, or, under CI, a failure, since CI runs on a machine that has everything.
///
/// The caller returns (or leaves the part out) after it.
pub fn skip(why: impl std::fmt::Display) {
    assert!(!under_ci(), "under CI no test may skip, but: {why}");
    eprintln!("skipped: {why}");
}

/// Runs a test body once per I/O backend: `mod epoll { #[test] fn name() }` and
/// `mod io_uring { ... }`. The io_uring variant [`skip`]s where io_uring is unavailable
/// (a failure under CI).
#[macro_export]
macro_rules! per_backend {
    ($($(#[$m:meta])* fn $name:ident($backend:ident) $body:block)*) => {
        $(
            #[allow(clippy::unwrap_used)]
            fn $name($backend: pabal_relay::io::BackendKind) $body
        )*
        mod epoll {
            $(
                #[test]
                $(#[$m])*
                fn $name() {
                    super::$name(pabal_relay::io::BackendKind::Epoll)
                }
            )*
        }
        mod io_uring {
            $(
                #[test]
                $(#[$m])*
                fn $name() {
                    if let Some(why) = $crate::uring_unavailable() {
                        $crate::skip(format_args!("io_uring unavailable here: {why}"));
                        return;
                    }
                    super::$name(pabal_relay::io::BackendKind::IoUring)
                }
            )*
        }
    };
}

/// Why io_uring cannot run here, if it cannot.
pub fn uring_unavailable() -> Option<String> {
    probe::probe_uring(&BackendOptions::default())
        .err()
        .map(|e| e.to_string())
}

/// The relay's I/O backends this machine runs, for tests that loop over them: epoll, and
/// io_uring where the kernel allows it (a [`skip`] where it does not, so a failure under CI).
pub fn backends() -> Vec<BackendKind> {
    match uring_unavailable() {
        None => vec![BackendKind::Epoll, BackendKind::IoUring],
        Some(why) => {
            skip(format_args!(
                "the io_uring variant (io_uring unavailable here: {why})"
            ));
            vec![BackendKind::Epoll]
        }
    }
}

/// A file of the repository, from its root (`systemd/relay.service`).
pub fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A fresh temporary directory, removed when dropped. Its name holds the process id, a
/// counter and `name`, so tests running at once never share one.
#[derive(Debug)]
pub struct TempDir(PathBuf);

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

impl TempDir {
    /// Creates `$TMPDIR/pabal-<pid>-<n>-<name>`.
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "pabal-{}-{}-{name}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// A path in the directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
