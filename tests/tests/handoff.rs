//! Offline hand-off to the app server (`[handoff]`): the webhook sender against a real
//! HTTP/1.1 server in the test (a small one on std sockets that answers a script of
//! statuses and records every request).
//!
//! - the sender alone (its public API, on a tokio runtime of the test's own): batch
//!   contents exact and signed, a 500 then a 200 gets the same ids again, a 4xx is refused
//!   for good, a dead app server never grows the queue past `queue_max`;
//! - a relay with `[handoff]` on, once per I/O backend, end to end: an offline member gets
//!   exactly one hand-off per window of messages, a member that acks gets none, a member
//!   that receives but does not ack gets one; the counters are on `/metrics`.

#![allow(clippy::unwrap_used)] // reason: tests

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pabal_codec::{Ack, ClientFrame, Event, Text};
use pabal_relay::config::HandoffConfig;
use pabal_relay::handoff::sender::Sender;
use pabal_relay::handoff::{self, Handoff, HandoffSnapshot, wire};
use pabal_relay::ids::RoomName;
use pabal_testkit::http::raw_http;
use pabal_testkit::{Client, TestRelay, WAIT, per_backend};

const SECRET: &str = "handoff-test-secret-0123";

/// One request the app server received.
#[derive(Debug)]
struct Received {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// The items' `(id, first_seq)`.
    fn ids(&self) -> Vec<(String, u64)> {
        self.json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["id"].as_str().unwrap().to_string(),
                    i["first_seq"].as_u64().unwrap(),
                )
            })
            .collect()
    }
}

/// The app server: answers each request with the next status of its script (200 once the
/// script is used up) on kept-alive connections, and reports every request.
struct AppServer {
    addr: SocketAddr,
    requests: mpsc::Receiver<Received>,
}

impl AppServer {
    fn start(script: &[u16]) -> AppServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let script = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
        let (tx, requests) = mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (tx, script) = (tx.clone(), script.clone());
                std::thread::spawn(move || serve(stream, &tx, &script));
            }
        });
        AppServer { addr, requests }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/pabal", self.addr)
    }

    fn next(&self) -> Received {
        self.requests
            .recv_timeout(WAIT)
            .expect("the app server got no request")
    }
}

fn serve(stream: TcpStream, tx: &mpsc::Sender<Received>, script: &Mutex<VecDeque<u16>>) {
    let mut out = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (n, v) = h.split_once(':').unwrap();
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().unwrap());
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        let status = script.lock().unwrap().pop_front().unwrap_or(200);
        let _ = tx.send(Received {
            path,
            headers,
            body,
        });
        let answer = format!("HTTP/1.1 {status} Scripted\r\nContent-Length: 2\r\n\r\nok");
        if out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

fn config(url: String) -> HandoffConfig {
    HandoffConfig {
        url,
        secret: Some(SECRET.into()),
        batch_max: 2,
        batch_interval: Duration::from_millis(50),
        retry_initial: Duration::from_millis(10),
        retry_max: Duration::from_millis(40),
        timeout: Duration::from_secs(5),
        ..HandoffConfig::default()
    }
}

/// Starts the sender on a runtime of its own thread; returns the workers' end.
fn start_sender(config: &HandoffConfig, capacity: usize) -> handoff::HandoffTx {
    let (tx, rx) = handoff::channel(capacity);
    let sender = Sender::new(config, rx).unwrap();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(sender.run());
    });
    tx
}

fn item(user: &'static str, seq: u64) -> Handoff {
    Handoff {
        room: RoomName::new(false, Text::from_static("group:42")),
        epoch: 1_764_358_800_123,
        first_seq: seq,
        last_seq: seq + 1,
        user: Text::from_static(user),
        publisher: Text::from_static("ann"),
        time_ms: 1_764_358_812_000 + seq,
    }
}

fn stats(tx: &handoff::HandoffTx) -> HandoffSnapshot {
    tx.stats().snapshot()
}

/// Waits until the counters satisfy `done`.
fn until(tx: &handoff::HandoffTx, what: &str, done: impl Fn(&HandoffSnapshot) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = stats(tx);
        if done(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "never {what}: {s:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn batches_are_signed_and_carry_exactly_the_items() {
    let app = AppServer::start(&[]);
    let tx = start_sender(&config(app.url()), 16);
    for (user, seq) in [("bob", 10), ("cy", 10), ("dee", 12)] {
        assert!(tx.offer(item(user, seq)));
    }
    let first = app.next();
    assert_eq!(first.path, "/hooks/pabal");
    assert_eq!(first.header("content-type"), Some("application/json"));
    let sig = first.header("x-pabal-signature").unwrap();
    assert!(wire::verify(
        SECRET.as_bytes(),
        sig,
        &first.body,
        now_s(),
        300
    ));
    assert!(!wire::verify(
        b"another-secret-of-16",
        sig,
        &first.body,
        now_s(),
        300
    ));
    let expected = |user: &'static str, seq: u64| {
        serde_json::json!({
            "id": wire::idempotency_id(&item(user, seq)),
            "kind": "room",
            "room": "group:42",
            "epoch": 1_764_358_800_123u64,
            "user": user,
            "first_seq": seq,
            "last_seq": seq + 1,
            "publisher": "ann",
            "time_ms": 1_764_358_812_000 + seq,
        })
    };
    assert_eq!(
        first.json(),
        serde_json::json!({"items": [expected("bob", 10), expected("cy", 10)]}),
        "batch_max = 2: the first two, in order"
    );
    let second = app.next();
    assert!(wire::verify(
        SECRET.as_bytes(),
        second.header("x-pabal-signature").unwrap(),
        &second.body,
        now_s(),
        300
    ));
    assert_eq!(
        second.json(),
        serde_json::json!({"items": [expected("dee", 12)]}),
        "the rest once batch_interval passed"
    );
    until(&tx, "sent 3", |s| {
        s.sent == 3 && s.batches == 2 && s.queued == 0
    });
}

#[test]
fn a_500_then_a_200_gets_the_same_ids_again() {
    let app = AppServer::start(&[500, 503]);
    let tx = start_sender(&config(app.url()), 16);
    tx.offer(item("bob", 1));
    tx.offer(item("cy", 1));
    let refused = app.next();
    let refused_again = app.next();
    let accepted = app.next();
    assert_eq!(refused.ids().len(), 2);
    assert_eq!(refused.ids(), refused_again.ids());
    assert_eq!(refused.ids(), accepted.ids(), "same items, same ids");
    until(&tx, "sent after two retries", |s| {
        s.sent == 2 && s.retried == 2 && s.queued == 0 && s.dropped_refused == 0
    });
}

#[test]
fn a_4xx_is_refused_for_good_and_the_next_items_still_go() {
    let app = AppServer::start(&[400]);
    let tx = start_sender(&config(app.url()), 16);
    tx.offer(item("bob", 1));
    assert_eq!(app.next().ids()[0].1, 1);
    until(&tx, "refused", |s| s.dropped_refused == 1 && s.queued == 0);
    tx.offer(item("bob", 3));
    let next = app.next();
    assert_eq!(next.ids().len(), 1, "the refused item is not sent again");
    assert_eq!(next.ids()[0].1, 3);
    until(&tx, "sent", |s| s.sent == 1 && s.retried == 0);
}

#[test]
fn a_dead_app_server_never_grows_the_queue_past_its_bound() {
    // A port nobody listens on: every attempt is a connection error, retried forever.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = config(format!("http://{dead}/hooks"));
    cfg.queue_max = 50;
    cfg.batch_max = 10;
    let tx = start_sender(&cfg, 64);
    let offered = 2_000u64;
    let mut taken = 0;
    let mut highest_queued = 0;
    for seq in 0..offered {
        if tx.offer(item("bob", seq)) {
            taken += 1;
        }
        highest_queued = highest_queued.max(stats(&tx).queued);
        if seq % 64 == 63 {
            // Let the sender drain the channel now and then, so most items reach the queue.
            until(&tx, "drained the channel", |s| s.enqueued == taken);
        }
    }
    until(&tx, "took every item", |s| s.enqueued == taken);
    let s = stats(&tx);
    assert!(highest_queued <= 50, "queue grew to {highest_queued}");
    assert_eq!(s.queued, 50, "{s:?}");
    assert_eq!(s.sent, 0);
    assert!(s.retried > 0, "{s:?}");
    // Every item is accounted for: held, dropped for a full queue, or for a full channel.
    assert_eq!(s.dropped_queue_full, taken - 50, "{s:?}");
    assert_eq!(s.dropped_channel_full, offered - taken, "{s:?}");
}

#[test]
fn a_full_channel_drops_and_counts_without_waiting() {
    // No sender runs: the worker's end must neither block nor grow.
    let (tx, _rx) = handoff::channel(3);
    for seq in 0..10 {
        tx.offer(item("bob", seq));
    }
    let s = stats(&tx);
    assert_eq!(s.dropped_channel_full, 7);
    assert_eq!(s.enqueued, 0);
}

/// The delay of the end-to-end test: long enough that a member's ACK, sent as soon as the
/// message arrives on loopback, reaches the owner well before it (the ACK is what is
/// tested, not its speed).
const E2E_DELAY: Duration = Duration::from_secs(3);

/// `(user, first_seq, last_seq, publisher)` of every item in a request, sorted.
fn items(r: &Received) -> Vec<(String, u64, u64, String)> {
    let mut v: Vec<_> = r.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            assert_eq!(i["room"], "group:e2e");
            assert_eq!(i["kind"], "room");
            (
                i["user"].as_str().unwrap().to_string(),
                i["first_seq"].as_u64().unwrap(),
                i["last_seq"].as_u64().unwrap(),
                i["publisher"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Waits for message `seq` on `alias`.
fn receive(client: &mut Client, alias: u32, seq: u64) {
    client.wait_for(
        |e| matches!(e, Event::Message { alias: a, seq: Some(s), .. } if *a == alias && *s == seq),
    );
}

per_backend! {
    fn offline_and_unacking_members_are_handed_off_once_per_window_acking_ones_never(backend) {
        let app = AppServer::start(&[]);
        let relay = TestRelay::start(backend, 2, |c| {
            c.handoff.url = app.url();
            c.handoff.secret = Some(SECRET.into());
            c.handoff.delay = E2E_DELAY;
            c.handoff.batch_interval = Duration::from_millis(100);
        });
        for route in pabal_relay::metrics::routes() {
            relay.handle().add_route(route);
        }
        let room = "group:e2e";
        // cy joins and goes away: a member with no connection at all.
        let mut cy = Client::connect(relay.addr, "cy");
        cy.join(room);
        drop(cy.drop_link());
        let mut ann = Client::connect(relay.addr, "ann");
        let a = ann.join(room);
        let mut bob = Client::connect(relay.addr, "bob");
        let b = bob.join(room);
        // dee is connected and receives, but never acknowledges.
        let mut dee = Client::connect(relay.addr, "dee");
        let d = dee.join(room);

        for window in [1u64, 3] {
            let (first, last) = (window, window + 1);
            for seq in first..=last {
                assert_eq!(ann.publish_acked(a, format!("m{seq}")), seq);
            }
            receive(&mut bob, b, last);
            bob.send(&ClientFrame::Ack(Ack::from_pairs(&[(b, last)])));
            receive(&mut dee, d, last);
            // The next request is this window's (so the last window sent nothing again),
            // and it holds exactly cy and dee: not bob, who acked, not ann, the publisher.
            let request = app.next();
            let sig = request.header("x-pabal-signature").unwrap();
            assert!(wire::verify(SECRET.as_bytes(), sig, &request.body, now_s(), 300));
            assert_eq!(
                items(&request),
                [
                    ("cy".to_string(), first, last, "ann".to_string()),
                    ("dee".to_string(), first, last, "ann".to_string()),
                ],
                "window {first}..={last}"
            );
        }
        let reply = raw_http(
            relay.handle().control_addr().unwrap(),
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(reply.status, 200);
        let metric = |name: &str| -> u64 {
            reply
                .body
                .lines()
                .filter(|l| l.starts_with(name))
                .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
                .sum()
        };
        assert_eq!(metric("pabal_handoff_detected_total"), 4, "{}", reply.body);
        // The last batch's 2xx may still be on its way back to the sender.
        assert!(metric("pabal_handoff_sent_total") >= 2, "{}", reply.body);
        assert_eq!(metric("pabal_handoff_dropped_total"), 0, "{}", reply.body);
        assert!(app.requests.try_recv().is_err(), "nothing else was sent");
    }
}
