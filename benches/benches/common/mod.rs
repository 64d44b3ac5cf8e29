//! What the server benches share on top of `pabal-testkit`: the bench relay's configuration,
//! a bound client's bare socket, and memory measurement.

#![allow(dead_code)] // reason: each bench binary uses a different subset of these helpers

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::BytesMut;
use pabal_relay::config::Config;
use pabal_relay::io::BackendKind;
use pabal_testkit::{Client, loopback_config};

pub mod alloc;
pub mod fanout;
pub mod phase_counts;
pub mod placement;
pub mod publish;
pub mod redis_capacity;
pub mod sched;

/// The test relay ([`loopback_config`]) on one worker, pinned, without the control listener,
/// and with no rate limit in the way.
pub fn relay_config(backend: BackendKind) -> Config {
    let mut config = loopback_config(backend, 1);
    config.pin_workers = true;
    config.control.listen = String::new();
    config.limits.publish_rate = 1e12;
    config.limits.publish_burst = 1e12;
    config.limits.new_connections_per_second = 1e12;
    config.connection.max_queued_bytes = 1 << 20;
    config
}

/// Reads once into `buf`, retrying interrupted reads; panics on EOF.
pub fn read_some(s: &mut TcpStream, buf: &mut BytesMut) {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => panic!("server closed"),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Connects as `user` (a relay without auth), binds `rooms` in order (`true`: a channel), so
/// their aliases are 0, 1, ..., and returns the bare socket once every binding is confirmed.
pub fn pabal_client(addr: SocketAddr, user: &str, rooms: &[(bool, String)]) -> TcpStream {
    bind_all(Client::connect(addr, user), rooms)
}

/// As [`pabal_client`], for a device (protocol v2 with a device id): its publishes carry
/// publish ids, which the rooms check and record.
pub fn pabal_device(
    addr: SocketAddr,
    user: &str,
    rooms: &[(bool, String)],
    device_id: u64,
) -> TcpStream {
    let session = pabal_codec::ClientSession::with_device(device_id, 0);
    bind_all(Client::connect_with(addr, user, session), rooms)
}

fn bind_all(mut client: Client, rooms: &[(bool, String)]) -> TcpStream {
    for (channel, name) in rooms {
        if *channel {
            client.subscribe(name);
        } else {
            client.join(name);
        }
    }
    client.into_stream()
}

/// This process's resident set, KiB.
pub fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

/// This process's anonymous resident memory, KiB: the resident set less the pages of files
/// mapped (its own executable's code among them, paged in as code paths first run) and of
/// shared memory.
pub fn rss_anon_kib() -> u64 {
    status_kib("RssAnon:")
}

/// One KiB figure of `/proc/self/status`, by its field name (with the colon).
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

pub use alloc::heap_in_use;

/// What the relay's process grew by while the phones were held.
#[derive(Debug, Clone, Copy)]
pub struct Growth {
    /// Resident set, KiB.
    pub rss_kib: u64,
    /// Anonymous resident memory ([`rss_anon_kib`]), KiB: the resident set without the
    /// executable's code paged in by the first connections (a fixed cost, not a phone's).
    pub rss_anon_kib: u64,
    /// Heap in use ([`heap_in_use`]), bytes.
    pub heap_bytes: u64,
}

/// The relay's RSS growth (KiB) while a child process (this executable with
/// `--phones N ADDR EXTRA...`) holds `n` connections to it; the child prints "ready" once
/// they are up and exits when its stdin closes.
pub fn rss_growth_with_phones(
    relay: &pabal_relay::runtime::RelayHandle,
    n: usize,
    extra: &[String],
) -> u64 {
    growth_with_phones(relay, n, extra).rss_kib
}

/// [`rss_growth_with_phones`], with the heap's growth beside the RSS's.
pub fn growth_with_phones(
    relay: &pabal_relay::runtime::RelayHandle,
    n: usize,
    extra: &[String],
) -> Growth {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    std::thread::sleep(Duration::from_millis(200));
    let connected_before = relay.stats().connections;
    let before = (rss_kib(), heap_in_use(), rss_anon_kib());
    save_smaps("before");
    let trace = std::env::var_os("PABAL_BENCH_TRACE_LARGE").is_some();
    alloc::trace_large_frees(trace);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--phones", &n.to_string(), &relay.local_addr().to_string()])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    std::thread::sleep(Duration::from_millis(500));
    let after = (rss_kib(), heap_in_use(), rss_anon_kib());
    save_smaps("after");
    if trace {
        alloc::trace_large_frees(false);
        alloc::print_large_frees();
    }
    assert_eq!(relay.stats().connections, connected_before + n as u64);
    // A profiler's window: `PABAL_BENCH_HOLD_SECS` keeps the phones connected this long
    // after the measurement (e.g. for `vgdb --pid=PID detailed_snapshot FILE` under massif).
    if let Some(secs) = std::env::var("PABAL_BENCH_HOLD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        eprintln!("holding {secs} s (pid {})", std::process::id());
        std::thread::sleep(Duration::from_secs(secs));
    }
    drop(child.stdin.take());
    child.wait().unwrap();
    Growth {
        rss_kib: after.0.saturating_sub(before.0),
        heap_bytes: after.1.saturating_sub(before.1),
        rss_anon_kib: after.2.saturating_sub(before.2),
    }
}

/// Where `PABAL_BENCH_SMAPS` asks for it, a copy of this process's `/proc/self/smaps` as
/// `PREFIX.PID.WHEN` (the resident set per mapping, for `benches/tools/smaps_diff.py`).
fn save_smaps(when: &str) {
    if let Ok(prefix) = std::env::var("PABAL_BENCH_SMAPS") {
        let path = format!("{prefix}.{}.{when}", std::process::id());
        // Read then written: procfs files do not copy with `copy_file_range`.
        let smaps = std::fs::read("/proc/self/smaps").unwrap();
        std::fs::write(&path, smaps).unwrap();
        eprintln!("smaps {when}: {path}");
    }
}

/// The environment variable that names the one backend a child run of a bench measures.
const CHILD_BACKEND: &str = "PABAL_BENCH_BACKEND";

/// In a child run started by [`run_each_backend_in_its_own_process`], the backend it measures.
pub fn child_backend() -> Option<BackendKind> {
    let name = std::env::var(CHILD_BACKEND).ok()?;
    Some(if name == "io_uring" {
        BackendKind::IoUring
    } else {
        BackendKind::Epoll
    })
}

/// Runs the bench's own executable once per available backend, each in a fresh process, with
/// `args` (stdout inherited, so the children print their rows under the parent's header).
/// Run second in the same process, a backend measures on the heap the first one left
/// behind (io_uring's broadcast fan-out measured at half speed that way).
pub fn run_each_backend_in_its_own_process(args: &[String]) {
    let exe = std::env::current_exe().unwrap();
    for backend in pabal_testkit::backends() {
        let name = match backend {
            BackendKind::IoUring => "io_uring",
            _ => "epoll",
        };
        let status = std::process::Command::new(&exe)
            .arg("--bench")
            .args(args)
            .env(CHILD_BACKEND, name)
            .status()
            .unwrap();
        assert!(status.success(), "the {name} run failed: {status}");
    }
}
