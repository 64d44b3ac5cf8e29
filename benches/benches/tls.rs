//! TLS against plain TCP, in one run, on a one-worker relay in this process:
//! - memory per idle connection (relay RSS growth; the phones live in a child process,
//!   this executable with `--phones`), plain vs TLS;
//! - full TLS handshakes (plus HELLO/WELCOME) per second on one worker, and resumed ones;
//! - deliveries per second to subscribers of one room, plain vs TLS.
//!
//! `cargo bench -p pabal-benches --bench tls` (`PABAL_IDLE_CONNS`, default 2000;
//! `PABAL_BENCH_SECS`, default 3; `PABAL_TLS_PHASES`, default `idle,handshakes,deliveries`:
//! which parts to run, e.g. `handshakes` alone to profile them; `PABAL_BENCH_BACKEND`,
//! `epoll` or `io_uring`: that backend alone, in this process). Test certificates are made at
//! run time (`pabal_testkit::pki`).

#![allow(clippy::unwrap_used)] // reason: a benchmark driver fails loudly

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pabal_client::{Client, ClientConfig, ClientEvent, TlsOptions};
use pabal_relay::config::Config;
use pabal_relay::io::BackendKind;
use pabal_relay::runtime::RelayHandle;
use pabal_testkit::pki::TestPki;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// The relay's certificate and key, and the CA that issued them (what clients trust).
#[derive(Debug, Clone)]
struct Certs {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

fn tls_options(ca: &Path, resume: bool) -> TlsOptions {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = TlsOptions::new(roots, "localhost").unwrap();
    if !resume {
        let mut config = (*tls.config).clone();
        config.resumption = rustls::client::Resumption::disabled();
        tls.config = Arc::new(config);
    }
    tls
}

fn client(addr: SocketAddr, user: &str, tls: Option<&TlsOptions>) -> Client {
    let mut config = ClientConfig::new(addr, user.to_string());
    config.tls = tls.cloned();
    let mut c = Client::new(config);
    c.connect().unwrap();
    c
}

fn wait_bound(c: &mut Client) {
    loop {
        if let Some(ClientEvent::Bound { .. }) = c.next_event(Duration::from_secs(10)).unwrap() {
            return;
        }
    }
}

/// The child: `n` phones (trusting the CA in file `ca`, if TLS), each bound to one room,
/// held until stdin closes.
fn phones(addr: SocketAddr, n: usize, ca: Option<&str>) {
    let tls = ca.map(|c| tls_options(Path::new(c), true));
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = client(addr, &format!("u{i}"), tls.as_ref());
        c.join(&format!("dm:{}", i / 2)).unwrap();
        wait_bound(&mut c);
        held.push(c);
    }
    println!("ready");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

fn relay(backend: BackendKind, certs: Option<&Certs>) -> RelayHandle {
    relay_keeping(backend, certs, None)
}

/// A relay whose rooms keep `history` messages (`None`: the default retention).
fn relay_keeping(
    backend: BackendKind,
    certs: Option<&Certs>,
    history: Option<usize>,
) -> RelayHandle {
    let mut config: Config = common::relay_config(backend);
    if let Some(messages) = history {
        config.retention.max_messages = messages;
        config.retention.max_bytes = usize::MAX;
    }
    if let Some(c) = certs {
        config.tls.cert_file = Some(c.cert.clone());
        config.tls.key_file = Some(c.key.clone());
    }
    RelayHandle::start(config).unwrap()
}

fn idle_memory(backend: BackendKind, n: usize, certs: Option<&Certs>) -> f64 {
    let relay = relay(backend, certs);
    let extra: Vec<String> = certs.iter().map(|c| c.ca.display().to_string()).collect();
    let grown = common::rss_growth_with_phones(&relay, n, &extra);
    relay.stop().unwrap();
    grown as f64 * 1024.0 / n as f64
}

fn handshakes(backend: BackendKind, certs: &Certs, resume: bool, secs: u64) -> f64 {
    let relay = relay(backend, Some(certs));
    let tls = tls_options(&certs.ca, resume);
    let addr = relay.local_addr();
    if resume {
        // One full handshake to get the tickets.
        drop(client(addr, "warm", Some(&tls)));
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        // connect() returns after WELCOME: a full TLS handshake plus HELLO/WELCOME.
        let mut c = client(addr, "hs", Some(&tls));
        c.close();
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    relay.stop().unwrap();
    rate
}

fn deliveries(backend: BackendKind, certs: Option<&Certs>, subs: usize, msgs: usize) -> f64 {
    // The writer publishes as fast as it can: a reader that falls more than its window
    // behind is fed from history, so the room keeps the whole run (with the default 1,000
    // a lagging reader was told of a gap and waited for messages that never came).
    let relay = relay_keeping(backend, certs, Some(msgs));
    let tls = certs.map(|c| tls_options(&c.ca, true));
    let addr = relay.local_addr();
    let mut readers: Vec<Client> = (0..subs)
        .map(|i| {
            let mut c = client(addr, &format!("r{i}"), tls.as_ref());
            c.join("room:bench").unwrap();
            wait_bound(&mut c);
            c
        })
        .collect();
    let mut writer = client(addr, "w", tls.as_ref());
    writer.join("room:bench").unwrap();
    wait_bound(&mut writer);
    let payload = bytes::Bytes::from(vec![b'x'; 100]);
    let start = Instant::now();
    let reader_threads: Vec<_> = readers
        .drain(..)
        .map(|mut r| {
            std::thread::spawn(move || {
                let mut got = 0;
                while got < msgs {
                    match r.next_event(Duration::from_secs(10)).unwrap() {
                        Some(ClientEvent::Message { .. }) => got += 1,
                        Some(ClientEvent::Gap { from, to, .. }) => {
                            panic!("a reader missed {from}..={to}: retention is too short")
                        }
                        Some(_) => {}
                        None => panic!("a reader got nothing for 10 s after {got} messages"),
                    }
                }
            })
        })
        .collect();
    for _ in 0..msgs {
        writer.publish("room:bench", payload.clone()).unwrap();
        while let Some(_e) = writer.next_event(Duration::ZERO).unwrap() {}
    }
    for t in reader_threads {
        t.join().unwrap();
    }
    let rate = (subs * msgs) as f64 / start.elapsed().as_secs_f64();
    relay.stop().unwrap();
    rate
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--phones") {
        return phones(
            args[i + 2].parse().unwrap(),
            args[i + 1].parse().unwrap(),
            args.get(i + 3).map(String::as_str),
        );
    }
    let n: usize = std::env::var("PABAL_IDLE_CONNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let secs: u64 = std::env::var("PABAL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    if let Some(i) = args.iter().position(|a| a == "--idle") {
        // One measurement per process: freed memory of an earlier run stays in the RSS.
        let backend = if args[i + 1] == "epoll" {
            BackendKind::Epoll
        } else {
            BackendKind::IoUring
        };
        let certs = args.get(i + 2).map(|c| Certs {
            cert: PathBuf::from(c),
            key: PathBuf::from(&args[i + 3]),
            ca: PathBuf::from(&args[i + 4]),
        });
        println!("{}", idle_memory(backend, n, certs.as_ref()));
        return;
    }
    // Each backend in a process of its own: a relay started after another in the same
    // process measures on the heap the first one left behind.
    let Some(backend) = common::child_backend() else {
        common::run_each_backend_in_its_own_process(&[]);
        return;
    };
    let pki = TestPki::new();
    let (cert, key) = pki.issue();
    let certs = Certs {
        cert,
        key,
        ca: pki.ca_file(),
    };
    let idle = |backend: BackendKind, tls: bool| -> f64 {
        let mut args = vec![
            "--idle".to_string(),
            if backend == BackendKind::Epoll {
                "epoll"
            } else {
                "io_uring"
            }
            .to_string(),
        ];
        if tls {
            for path in [&certs.cert, &certs.key, &certs.ca] {
                args.push(path.display().to_string());
            }
        }
        let out = Command::new(std::env::current_exe().unwrap())
            .args(&args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let phases = std::env::var("PABAL_TLS_PHASES")
        .unwrap_or_else(|_| "idle,handshakes,deliveries".to_string());
    let runs = |phase: &str| phases.split(',').any(|p| p.trim() == phase);
    if runs("idle") {
        let plain = idle(backend, false);
        let tls = idle(backend, true);
        println!(
            "{backend:?}: idle memory per connection ({n}): plain {plain:.0} B, TLS {tls:.0} B, \
             TLS costs {:.0} B more",
            tls - plain
        );
    }
    if runs("handshakes") {
        let full = handshakes(backend, &certs, false, secs);
        let resumed = handshakes(backend, &certs, true, secs);
        println!(
            "{backend:?}: handshakes + HELLO/WELCOME per second, one worker (client in the same \
             process): full {full:.0}/s, resumed (0-RTT HELLO) {resumed:.0}/s"
        );
    }
    if runs("deliveries") {
        let plain = deliveries(backend, None, 20, 20_000);
        let tls = deliveries(backend, Some(&certs), 20, 20_000);
        println!(
            "{backend:?}: deliveries per second, 20 subscribers x 20000 x 100 B: plain {plain:.0}/s, \
             TLS {tls:.0}/s ({:.0}%)",
            tls / plain * 100.0
        );
    }
}
