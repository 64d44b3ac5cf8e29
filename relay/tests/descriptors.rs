//! File descriptors: the real binary (`relay`) started under a low `RLIMIT_NOFILE`, once per
//! backend. It must clamp `limits.max_connections` to what the descriptors allow (one log
//! line), turn the clients past the clamp away with GOAWAY(overload) instead of running out
//! of descriptors, and keep the clamp when a reload asks for more.
//!
//! Every wait is bounded: a hang fails the test.

#![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

use std::net::SocketAddr;

use pabal_codec::{Event, GoAwayReason};
use pabal_testkit::daemon::{Daemon, addr_in, limit_nofile};
use pabal_testkit::{Client, TempDir, WAIT, skip, uring_unavailable};

/// The binary under test.
const RELAY: &str = env!("CARGO_BIN_EXE_relay");
/// The relay's hard descriptor limit; it starts with a lower soft one and must raise it.
const NOFILE_HARD: u64 = 256;
const NOFILE_SOFT: u64 = 128;
const RESERVED_FDS: usize = 64;
/// Clients beyond the clamp.
const EXTRA: usize = 5;

fn config(backend: &str, max_connections: Option<usize>) -> String {
    let max = max_connections.map_or(String::new(), |n| format!("max_connections = {n}\n"));
    format!(
        "listen = \"127.0.0.1:0\"\nworkers = 1\npin_workers = false\nio_backend = \"{backend}\"\n\
         [control]\nlisten = \"127.0.0.1:0\"\n\
         [limits]\n{max}reserved_fds = {RESERVED_FDS}\nnew_connections_per_second = 1000000.0\n\
         [log]\nlevel = \"info\"\nformat = \"text\"\n"
    )
}

/// What the relay answered a HELLO with.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Welcome,
    Overload,
}

/// Connects, says HELLO as `user`, and returns the connection with the relay's first answer.
fn hello(addr: SocketAddr, user: &str) -> (Client, Answer) {
    let mut client = Client::connect_raw(addr, user, user.as_bytes());
    let answer = match client.next_event(WAIT) {
        Some(Event::Welcome(_)) => Answer::Welcome,
        Some(Event::GoAway(g)) if g.reason == GoAwayReason::Overload => Answer::Overload,
        Some(other) => panic!("{user}: unexpected first frame {other:?}"),
        None => panic!("{user}: closed without an answer"),
    };
    (client, answer)
}

fn clients_past_the_descriptor_clamp_get_goaway_overload(backend: &str) {
    let dir = TempDir::new(&format!("fds-{backend}"));
    let path = dir.path("relay.toml");
    std::fs::write(&path, config(backend, None)).unwrap();
    let mut daemon = Daemon::spawn(RELAY, &path, |cmd| {
        limit_nofile(cmd, NOFILE_SOFT, NOFILE_HARD);
    });
    let addr = addr_in(&daemon.wait_log("relay listening"));

    // The one clamp line, with the raised soft limit.
    let clamp = daemon
        .seen
        .iter()
        .find(|l| l.contains("limits.max_connections clamped"))
        .unwrap_or_else(|| panic!("no clamp line; log:\n{}", daemon.seen.join("\n")))
        .clone();
    let expect = format!("because RLIMIT_NOFILE is {NOFILE_HARD}");
    assert!(
        clamp.contains("clamped from 1000000 to") && clamp.contains(&expect),
        "{clamp}"
    );
    let cap: usize = clamp
        .split("clamped from 1000000 to ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in {clamp:?}"));
    assert!(cap > 0 && (cap as u64) < NOFILE_HARD, "{clamp}");

    // Every client up to the clamp is welcomed; the ones past it are turned away.
    let mut held = Vec::new();
    for i in 0..cap {
        let (stream, answer) = hello(addr, &format!("user{i}"));
        assert_eq!(answer, Answer::Welcome, "client {i} of {cap}");
        held.push(stream);
    }
    for i in 0..EXTRA {
        let (_stream, answer) = hello(addr, &format!("extra{i}"));
        assert_eq!(answer, Answer::Overload, "extra client {i}");
    }

    // A reload that asks for more connections than descriptors is clamped the same way.
    std::fs::write(&path, config(backend, Some(1_000_000))).unwrap();
    daemon.signal(libc::SIGHUP);
    daemon.wait_log("configuration reloaded");
    let (_stream, answer) = hello(addr, "after-reload");
    assert_eq!(answer, Answer::Overload, "the reload kept the clamp");

    drop(held);
    daemon.signal(libc::SIGTERM);
    let log = daemon.into_log();
    let at_start = log
        .iter()
        .take_while(|l| !l.contains("relay listening"))
        .filter(|l| l.contains("limits.max_connections clamped"))
        .count();
    assert_eq!(
        at_start,
        1,
        "one clamp line at start; log:\n{}",
        log.join("\n")
    );
    let exhausted: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("accept failed") || l.contains("Too many open files"))
        .collect();
    assert!(exhausted.is_empty(), "descriptors ran out: {exhausted:#?}");
}

#[test]
fn epoll_clamps_to_the_descriptor_limit() {
    clients_past_the_descriptor_clamp_get_goaway_overload("epoll");
}

#[test]
fn io_uring_clamps_to_the_descriptor_limit() {
    if let Some(why) = uring_unavailable() {
        skip(format_args!("io_uring unavailable here: {why}"));
        return;
    }
    clients_past_the_descriptor_clamp_get_goaway_overload("io_uring");
}
