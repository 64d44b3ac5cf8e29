//! Memory per idle connection: the relay's resident set growth per mostly idle phone
//! connection (authenticated, two rooms bound), for each I/O backend.
//!
//! Each measurement runs in a fresh process (this same executable with `--relay BACKEND N`)
//! that holds the relay; the phones run in another child process (`--phones N ADDR`), so the
//! relay's RSS is measured alone, and neither backend inherits memory the other freed. At
//! 18,500 connections the relay is near its 20,000-descriptor limit. Kernel socket buffers are not in
//! the RSS; they are the kernel's (tunable with `net.ipv4.tcp_rmem`/`tcp_wmem`).
//!
//! The relay runs on the allocator the daemon ships (mimalloc, `relay/src/main.rs`), so RSS
//! is the daemon's; heap in use is the usable size of mimalloc's live blocks (see
//! `common/alloc.rs`). `PABAL_BENCH_ALLOCATOR=glibc` runs it on glibc's malloc instead, for
//! valgrind's massif (which sees only the system allocator) and for comparison with figures
//! measured that way before. mimalloc backs its arenas with transparent huge pages where
//! the kernel allows it (`madvise` mode): `MIMALLOC_ALLOW_THP=0` shows the RSS without them.
//!
//! Before the measured phones connect, `PABAL_IDLE_WARM` warm-up phones (default 100, the
//! same shape, held in the relay's process through the measurement) pay the fixed costs:
//! the relay's code paged in by the first connections and the workers' first tables. The
//! figures are what each further phone costs. Three per connection: the RSS growth; its
//! anonymous part (`RssAnon`: the RSS less file pages, chiefly this executable's code,
//! which the first connections page in once: 250-450 KiB whatever the count, not a
//! phone's cost; with `PABAL_IDLE_WARM=0` it shows in the RSS growth); and the heap in use.
//! A profile of the whole heap (massif's per-site table divided by the count) wants
//! `PABAL_IDLE_WARM=0`: the warm-up phones' blocks, and their clients', are in it otherwise. The gap
//! between the anonymous growth and the heap is the allocator's: blocks freed while the
//! phones connected (the worker's tables and lists grown by reallocation) whose pages it
//! has not yet returned (benches/RESULTS.md, "Where RSS beyond the heap goes").
//!
//! `cargo bench -p pabal-benches --bench idle_connections` (`PABAL_IDLE_CONNS`: a comma
//! separated list of connection counts, default `10000,18500`; `PABAL_IDLE_ROOMS`: rooms
//! bound per phone, 0 to 2, default 2, to split the cost of a connection from its bindings).
//! Diagnostics: `PABAL_BENCH_SMAPS=PREFIX` saves `/proc/self/smaps` before and after the
//! phones connect (`benches/tools/smaps_diff.py` compares them mapping by mapping);
//! `PABAL_BENCH_TRACE_LARGE=1` prints each block of 16 KiB or more freed while they connect,
//! with the relay's frames that freed it (the measurement itself is then off: the traces
//! take memory).

#![allow(clippy::unwrap_used)] // reason: a benchmark driver fails loudly

mod common;

/// The daemon's allocator (or glibc's, by `PABAL_BENCH_ALLOCATOR`), counted.
#[global_allocator]
static ALLOCATOR: common::alloc::BenchAlloc = common::alloc::BenchAlloc;

use pabal_relay::io::BackendKind;
use pabal_relay::runtime::RelayHandle;

/// The child: open `n` phones, each in a 1:1 room with its neighbour and in one shared
/// channel, print "ready", and hold them until stdin closes.
fn phones(addr: std::net::SocketAddr, n: usize) {
    let bound: usize = std::env::var("PABAL_IDLE_ROOMS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let rooms = [(false, format!("dm:{}", i / 2)), (true, "news".to_string())];
        held.push(common::pabal_client(
            addr,
            &format!("u{i}"),
            &rooms[..bound.min(2)],
        ));
    }
    println!("ready");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

fn measure(backend: BackendKind, n: usize) {
    let config = common::relay_config(backend);
    let relay = RelayHandle::start(config).unwrap();
    // The first phones page in the relay's code for accepting, authenticating and binding
    // (file-backed pages of this executable, 250-450 KiB whatever the count) and make each
    // worker's tables: a fixed cost, paid here by warm-up phones of the same shape that stay
    // connected through the measurement, so the growth is what each further phone costs.
    let warm_phones = std::env::var("PABAL_IDLE_WARM")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100usize);
    let warm: Vec<_> = (0..warm_phones)
        .map(|i| {
            let rooms = [
                (false, format!("warm:{}", i / 2)),
                (true, "news".to_string()),
            ];
            common::pabal_client(relay.local_addr(), &format!("warm{i}"), &rooms)
        })
        .collect();
    let grown = common::growth_with_phones(&relay, n, &[]);
    drop(warm);
    let per = |kib: u64| kib as f64 * 1024.0 / n as f64;
    println!(
        "{:<9} {:>7} connections ({}): relay RSS +{} KiB = {:.0} bytes per connection, \
         anonymous +{} KiB = {:.0} (heap in use {:.0} bytes per connection)",
        relay.backend(),
        n,
        common::alloc::allocator_name(),
        grown.rss_kib,
        per(grown.rss_kib),
        grown.rss_anon_kib,
        per(grown.rss_anon_kib),
        grown.heap_bytes as f64 / n as f64
    );
    relay.stop().unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--phones") {
        return phones(args[i + 2].parse().unwrap(), args[i + 1].parse().unwrap());
    }
    if let Some(i) = args.iter().position(|a| a == "--relay") {
        let backend = match args[i + 1].as_str() {
            "epoll" => BackendKind::Epoll,
            _ => BackendKind::IoUring,
        };
        return measure(backend, args[i + 2].parse().unwrap());
    }
    let sizes: Vec<usize> = std::env::var("PABAL_IDLE_CONNS")
        .unwrap_or_else(|_| "10000,18500".to_string())
        .split(',')
        .map(|n| n.trim().parse().unwrap())
        .collect();
    // Each measurement in a fresh process: memory a previous relay freed stays with the
    // allocator and would hide the next relay's growth.
    for &n in &sizes {
        for backend in pabal_testkit::backends() {
            let name = match backend {
                BackendKind::Epoll => "epoll",
                _ => "io_uring",
            };
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--relay", name, &n.to_string()])
                .status()
                .unwrap();
            assert!(status.success(), "the {name} measurement at {n} failed");
        }
    }
}
