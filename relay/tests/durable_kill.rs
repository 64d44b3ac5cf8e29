//! kill -9 under load with `[storage] mode = "disk"`, `fsync = "always"`: the real binary as
//! a child process, publishers on the server API each waiting for its answer (the
//! acknowledgement) before the next publish, SIGKILL at a seeded random point, restart on
//! the same directory. After each restart every acknowledged message is there with its
//! sequence and its body, in order, with no gap before it, in the same epoch; whatever
//! was stored without its acknowledgement reaching the publisher may be there too, after
//! the acknowledged ones, still without a gap. Several rounds on one directory, each
//! continuing the sequences of the last.

#![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::SmallRng};

use pabal_testkit::WAIT;
use pabal_testkit::daemon::{Daemon, addr_in};

const RELAY: &str = env!("CARGO_BIN_EXE_relay");

const ROOMS: usize = 4;
const ROUNDS: usize = 4;
const SEED: u64 = 0x5eed_0012;

/// One HTTP/1.1 request; `None` when the relay is gone before answering in full.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> Option<(u16, serde_json::Value)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(WAIT)).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, serde_json::from_str(body).ok()?))
}

fn spawn(config: &Path) -> (Daemon, SocketAddr) {
    let mut relay = Daemon::spawn(RELAY, config, |_| {});
    let line = relay.wait_log("control API listening");
    (relay, addr_in(&line))
}

/// Every message of `room` from the relay: (seq, text), and the room's epoch and head.
fn read_room(api: SocketAddr, room: &str) -> (Vec<(u64, String)>, u64, u64) {
    let mut out = Vec::new();
    loop {
        let after = out.last().map_or(0, |m: &(u64, String)| m.0);
        let path = format!("/v1/rooms/{room}/messages?after={after}&limit=1000");
        let (status, page) = http(api, "GET", &path, "").unwrap();
        if status == 404 && after == 0 {
            return (out, 0, 0); // never published to
        }
        assert_eq!(status, 200, "{page}");
        assert!(page["gap"].is_null(), "{room}: a gap after {after}: {page}");
        let msgs = page["messages"].as_array().unwrap();
        if msgs.is_empty() {
            let epoch = page["epoch"].as_u64().unwrap();
            return (out, epoch, page["last_seq"].as_u64().unwrap());
        }
        for m in msgs {
            out.push((
                m["seq"].as_u64().unwrap(),
                m["text"].as_str().unwrap().to_string(),
            ));
        }
    }
}

#[test]
fn kill_9_under_load_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nworkers = 2\n[control]\nlisten = \"127.0.0.1:0\"\n\
             [storage]\nmode = \"disk\"\ndir = \"{}\"\nfsync = \"always\"\n\
             segment_size = 1048576\n",
            state.display()
        ),
    )
    .unwrap();
    let mut rng = SmallRng::seed_from_u64(SEED);
    // Per room: the acknowledged (seq, text), in order, over every round.
    let mut acked: Vec<Vec<(u64, String)>> = vec![Vec::new(); ROOMS];
    let mut epochs: Vec<Option<u64>> = vec![None; ROOMS];
    for round in 0..ROUNDS {
        let (mut relay, api) = spawn(&config);
        // What the previous round left: every acknowledged message, nothing reordered.
        for (r, room_acked) in acked.iter_mut().enumerate() {
            let room = format!("room:{r}");
            let (stored, epoch, head) = read_room(api, &room);
            if let Some(e) = epochs[r] {
                assert_eq!(epoch, e, "{room}: the epoch changed across kill -9");
            }
            assert_eq!(
                stored.iter().map(|m| m.0).collect::<Vec<_>>(),
                (1..=head).collect::<Vec<_>>(),
                "{room}: sequences from 1 to the head, no hole"
            );
            for (seq, text) in room_acked.iter() {
                assert_eq!(
                    stored.get(*seq as usize - 1).map(|m| &m.1),
                    Some(text),
                    "{room}: acknowledged seq {seq} lost or changed (round {round})"
                );
            }
            // Stored without the acknowledgement reaching us: part of the history now.
            *room_acked = stored;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let publishers: Vec<_> = (0..ROOMS)
            .map(|r| {
                let stop = stop.clone();
                let from = acked[r].len() as u64;
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    let mut epoch = None;
                    for i in from + 1.. {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let text = format!("r{r}-m{i}");
                        let body = format!(r#"{{"sender": "app", "text": "{text}"}}"#);
                        let path = format!("/v1/rooms/room:{r}/messages");
                        let Some((200, answer)) = http(api, "POST", &path, &body) else {
                            break; // killed: this one was not acknowledged
                        };
                        got.push((answer["seq"].as_u64().unwrap(), text));
                        if epoch.is_none()
                            && let Some((200, info)) =
                                http(api, "GET", &format!("/v1/rooms/room:{r}"), "")
                        {
                            epoch = info["epoch"].as_u64();
                        }
                    }
                    (got, epoch)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(100..800)));
        relay.signal(libc::SIGKILL);
        relay.wait_exit();
        stop.store(true, Ordering::SeqCst);
        for (r, p) in publishers.into_iter().enumerate() {
            let (got, epoch) = p.join().unwrap();
            if let Some(e) = epoch {
                assert!(
                    epochs[r].is_none_or(|old| old == e),
                    "room:{r}: epoch changed"
                );
                epochs[r] = Some(e);
            }
            for (seq, text) in got {
                assert_eq!(
                    seq,
                    acked[r].len() as u64 + 1,
                    "room:{r}: sequences follow on"
                );
                acked[r].push((seq, text));
            }
        }
        let total: usize = acked.iter().map(Vec::len).sum();
        eprintln!("round {round}: {total} messages acknowledged so far");
        assert!(
            total > round,
            "round {round}: nothing was acknowledged before the kill"
        );
    }
    // A last start: everything acknowledged in the last round is there too.
    let (_relay, api) = spawn(&config);
    for (r, room_acked) in acked.iter().enumerate() {
        let (stored, epoch, _) = read_room(api, &format!("room:{r}"));
        if let Some(e) = epochs[r] {
            assert_eq!(epoch, e);
        }
        assert!(stored.len() >= room_acked.len());
        assert_eq!(&stored[..room_acked.len()], &room_acked[..]);
    }
}
