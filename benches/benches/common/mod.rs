//! What the server benches share: the relay configuration they run, the backends to try, and
//! a pabal client's handshake.

#![allow(dead_code)] // reason: each bench binary uses a different subset of these helpers

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pabal_codec::{ClientFrame, Decoder, Hello, ResumeList, ServerFrame, Subscribe, Text};
use pabal_relay::config::Config;
use pabal_relay::io::BackendKind;
use pabal_relay::io::probe::{BackendOptions, probe_uring};

/// A loopback relay on one worker, without the control listener or any rate limit in the way.
pub fn relay_config(backend: BackendKind) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers: 1,
        io_backend: backend,
        ..Config::default()
    };
    config.control.listen = String::new();
    config.log.level = "warn".into();
    config.limits.publish_rate = 1e12;
    config.limits.publish_burst = 1e12;
    config.limits.new_connections_per_second = 1e12;
    config.connection.max_queued_bytes = 1 << 20;
    config
}

/// epoll, and io_uring where this machine has it (a line says when it does not).
pub fn backends() -> Vec<BackendKind> {
    let mut all = vec![BackendKind::Epoll];
    match probe_uring(&BackendOptions::default()) {
        Ok(()) => all.push(BackendKind::IoUring),
        Err(e) => println!("io_uring unavailable here ({e}): skipped"),
    }
    all
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

/// Connects as `user` (a relay without auth), binds `rooms` (`true`: a channel), and waits
/// until every binding is confirmed.
pub fn pabal_client(addr: SocketAddr, user: &str, rooms: &[(bool, String)]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut out = BytesMut::new();
    ClientFrame::Hello(Hello {
        version: 1,
        heartbeat_secs: 0,
        token: Bytes::copy_from_slice(user.as_bytes()),
        resume: ResumeList::default(),
    })
    .encode(&mut out);
    for (channel, name) in rooms {
        ClientFrame::Subscribe(Subscribe {
            room: !channel,
            name: Text::from(name.as_str()),
        })
        .encode(&mut out);
    }
    stream.write_all(&out).unwrap();
    let decoder = Decoder::default();
    let mut buf = BytesMut::new();
    let mut bound = 0;
    while bound < rooms.len() {
        while let Some(frame) = decoder.decode_server(&mut buf).unwrap() {
            bound += usize::from(matches!(frame, ServerFrame::Room(_)));
        }
        if bound < rooms.len() {
            read_some(&mut stream, &mut buf);
        }
    }
    stream.set_read_timeout(None).unwrap();
    stream
}

/// This process's resident set, KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The relay's RSS growth (KiB) while a child process (this executable with
/// `--phones N ADDR EXTRA...`) holds `n` connections to it; the child prints "ready" once
/// they are up and exits when its stdin closes.
pub fn rss_growth_with_phones(
    relay: &pabal_relay::runtime::RelayHandle,
    n: usize,
    extra: &[String],
) -> u64 {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    std::thread::sleep(Duration::from_millis(200));
    let before = rss_kib();
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
    let after = rss_kib();
    assert_eq!(relay.stats().connections, n as u64);
    drop(child.stdin.take());
    child.wait().unwrap();
    after.saturating_sub(before)
}
