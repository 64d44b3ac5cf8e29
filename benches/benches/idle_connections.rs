//! Memory per idle connection: the relay's resident set growth per mostly idle phone
//! connection (authenticated, two rooms bound), for each I/O backend.
//!
//! The relay runs in this process; the phones run in a child process (this same executable
//! with `--phones N`), so the relay's RSS is measured alone. Kernel socket buffers are not in
//! the RSS; they are the kernel's (tunable with `net.ipv4.tcp_rmem`/`tcp_wmem`).
//!
//! `cargo bench -p pabal-benches --bench idle_connections` (`PABAL_IDLE_CONNS`, default 5000).

#![allow(clippy::unwrap_used)] // reason: a benchmark driver fails loudly

mod common;

use pabal_relay::io::BackendKind;
use pabal_relay::runtime::RelayHandle;

/// The child: open `n` phones, each in a 1:1 room with its neighbour and in one shared
/// channel, print "ready", and hold them until stdin closes.
fn phones(addr: std::net::SocketAddr, n: usize) {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let rooms = [(false, format!("dm:{}", i / 2)), (true, "news".to_string())];
        held.push(common::pabal_client(addr, &format!("u{i}"), &rooms));
    }
    println!("ready");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

fn measure(backend: BackendKind, n: usize) {
    let config = common::relay_config(backend);
    let relay = RelayHandle::start(config).unwrap();
    let grown = common::rss_growth_with_phones(&relay, n, &[]);
    println!(
        "{:<9} {:>7} connections: relay RSS +{} KiB = {:.0} bytes per connection",
        relay.backend(),
        n,
        grown,
        grown as f64 * 1024.0 / n as f64
    );
    relay.stop().unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--phones") {
        return phones(args[i + 2].parse().unwrap(), args[i + 1].parse().unwrap());
    }
    let n: usize = std::env::var("PABAL_IDLE_CONNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    for backend in pabal_testkit::backends() {
        measure(backend, n);
    }
}
