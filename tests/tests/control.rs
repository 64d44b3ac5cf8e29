//! End-to-end: the control listener under hostile clients (issue 10, items 2, 3, 13): slow
//! and oversized requests, the connection bound, API keys, the event stream. A real relay
//! on loopback; where sockets are involved, once per I/O backend.

#![allow(clippy::unwrap_used)] // reason: tests

use std::time::Duration;

use pabal_relay::config::Config;
use pabal_relay::io::BackendKind;
use pabal_testkit::http::{KEY, get, raw_http, request, with_ops_routes};
use pabal_testkit::{TestRelay, per_backend};

/// A two-worker relay whose control API needs [`KEY`].
fn keyed_relay(backend: BackendKind, tweak: impl FnOnce(&mut Config)) -> TestRelay {
    TestRelay::start(backend, 2, move |c| {
        c.control.api_key = Some(KEY.into());
        tweak(c);
    })
}

per_backend! {
    fn two_slowloris_sockets_do_not_stop_the_control_api(backend) {
        use std::io::Write;
        let relay = keyed_relay(backend, |c| {
            // Long enough that only concurrency, not a timeout, can explain an answer.
            c.control.body_timeout = Duration::from_secs(120);
            c.control.header_timeout = Duration::from_secs(120);
        });
        let addr = with_ops_routes(&relay);
        // A body promised and never sent, with and without the key, and headers never
        // finished.
        let mut holds = Vec::new();
        for head in [
            format!("POST /v1/rooms/r/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 100000\r\n\r\n"),
            "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".to_string(),
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_string(),
        ] {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(head.as_bytes()).unwrap();
            holds.push(s);
        }
        std::thread::sleep(Duration::from_millis(100));
        let health = get(addr, "/healthz");
        assert_eq!(health.status, 200, "{}", health.body);
        let metrics = get(addr, "/metrics");
        assert_eq!(metrics.status, 200);
        assert!(metrics.body.contains("pabal_workers"), "{}", metrics.body);
        let stats = get(addr, "/v1/stats");
        assert_eq!(stats.status, 200, "{}", stats.body);
        let published = raw_http(addr, &request("POST", "/v1/rooms/r/messages", None, r#"{"sender": "s", "text": "t"}"#));
        assert_eq!(published.status, 200, "{}", published.body);
        drop(holds);
        relay.stop();
    }

    fn oversized_headers_are_refused_431_without_memory_growth(backend) {
        use std::io::{Read, Write};
        let relay = keyed_relay(backend, |_| {});
        let addr = with_ops_routes(&relay);
        // One header past control.max_header_bytes (16 KiB), and too many headers.
        let long = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
        assert_eq!(raw_http(addr, long.as_bytes()).status, 431);
        let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
        let many = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n");
        assert_eq!(raw_http(addr, many.as_bytes()).status, 431);
        // Eight clients each try to send 16 MB of header: the relay reads at most its bound
        // from each and closes, so memory stays where it was (tiny_http grew by the full
        // header size for each).
        let chunk = vec![b'a'; 1024 * 1024];
        let before = rss();
        let senders: Vec<_> = (0..8)
            .map(|_| {
                let chunk = chunk.clone();
                std::thread::spawn(move || {
                    let mut s = std::net::TcpStream::connect(addr).unwrap();
                    s.set_write_timeout(Some(pabal_testkit::WAIT)).unwrap();
                    s.set_read_timeout(Some(pabal_testkit::WAIT)).unwrap();
                    let mut sent = 0;
                    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ").is_ok() {
                        for _ in 0..16 {
                            if s.write_all(&chunk).is_err() {
                                break;
                            }
                            sent += chunk.len();
                        }
                    }
                    let mut answer = Vec::new();
                    let _ = s.read_to_end(&mut answer);
                    sent
                })
            })
            .collect();
        let sent: Vec<usize> = senders.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(sent.iter().all(|&n| n < 16 * 1024 * 1024), "the relay read whole 16 MB headers: {sent:?}");
        let grown = rss().saturating_sub(before);
        assert!(grown < 32 * 1024 * 1024, "RSS grew by {} MB", grown / (1024 * 1024));
        assert_eq!(get(addr, "/healthz").status, 200);
        relay.stop();
    }
}

#[test]
fn a_body_that_never_arrives_is_answered_408() {
    let relay = keyed_relay(BackendKind::Epoll, |c| {
        c.control.body_timeout = Duration::from_millis(300);
    });
    let addr = relay.handle().control_addr().unwrap();
    let head = format!(
        "POST /v1/rooms/r/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Length: 100\r\nConnection: close\r\n\r\n{{\"sender\""
    );
    let reply = raw_http(addr, head.as_bytes());
    assert_eq!(reply.status, 408, "{}", reply.body);
    assert!(
        reply.body.contains("control.body_timeout"),
        "{}",
        reply.body
    );
    // A declared body past control.max_body is refused before it is read.
    let big = format!(
        "POST /v1/rooms/r/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        2 * 1024 * 1024
    );
    assert_eq!(raw_http(addr, big.as_bytes()).status, 413);
    relay.stop();
}

/// This process's resident memory, bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

#[test]
fn past_the_connection_bound_a_client_gets_503_and_others_are_served_after() {
    let relay = keyed_relay(BackendKind::Epoll, |c| c.control.max_connections = 2);
    let addr = with_ops_routes(&relay);
    let held: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let plane = relay.handle().control_plane().unwrap();
    let until = std::time::Instant::now() + pabal_testkit::WAIT;
    while plane.connections() < 2 {
        assert!(
            std::time::Instant::now() < until,
            "the two connections were not accepted"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let refused = get(addr, "/healthz");
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("retry-after"), Some("1"));
    drop(held);
    let until = std::time::Instant::now() + pabal_testkit::WAIT;
    while plane.connections() > 0 {
        assert!(
            std::time::Instant::now() < until,
            "closed connections were not released"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(get(addr, "/healthz").status, 200);
    relay.stop();
}

#[test]
fn an_empty_or_short_key_is_refused_and_an_empty_header_never_authorizes() {
    use pabal_relay::config::Config;
    for bad in ["", "a", "fifteen-bytes!!"] {
        let toml = format!("[control]\napi_key = {bad:?}\n");
        let err = Config::from_toml(&toml).unwrap_err().to_string();
        assert!(err.contains("control.api_key"), "{bad:?}: {err}");
    }
    Config::from_toml("[control]\napi_key = \"sixteen-bytes!!!\"\n").unwrap();
    let relay = keyed_relay(BackendKind::Epoll, |_| {});
    let addr = relay.handle().control_addr().unwrap();
    for header in [
        "Authorization: Bearer \r\n",
        "Authorization: \r\n",
        "X-Api-Key: \r\n",
        "",
    ] {
        let req = format!("GET /v1/stats HTTP/1.1\r\nHost: x\r\n{header}Connection: close\r\n\r\n");
        assert_eq!(raw_http(addr, req.as_bytes()).status, 401, "{header:?}");
    }
    let req = format!(
        "GET /v1/stats HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_http(addr, req.as_bytes()).status, 200);
    relay.stop();
}

#[test]
fn the_event_stream_tells_the_boot_epoch_and_is_bounded() {
    use std::io::{Read, Write};
    let relay = keyed_relay(BackendKind::Epoll, |c| {
        c.control.max_event_streams = 1;
        c.control.event_keepalive = Duration::from_millis(100);
    });
    let addr = relay.handle().control_addr().unwrap();
    let unauthorized = raw_http(
        addr,
        b"GET /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(unauthorized.status, 401);
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(pabal_testkit::WAIT)).unwrap();
    write!(
        stream,
        "GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n"
    )
    .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    // The first event, then at least one keep-alive.
    while !(seen.contains("event: relay") && seen.contains(": keep-alive")) {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(
        seen.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{seen}"
    );
    let data = seen
        .split("event: relay\ndata: ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap();
    let event: serde_json::Value = serde_json::from_str(data).unwrap();
    let stats = get(addr, "/v1/stats").json();
    assert_eq!(event["epoch"], stats["epoch"], "{event}");
    assert!(event["start_time_ms"].as_u64().unwrap() > 0);
    // One stream at most.
    let second = raw_http(addr, &request("GET", "/v1/events", None, ""));
    assert_eq!(second.status, 503, "{}", second.body);
    drop(stream);
    relay.stop();
}

#[test]
fn operations_endpoints_answer_starting_until_they_are_in_place() {
    // The binary adds /metrics, /healthz and /readyz a moment after the control API listens:
    // in between, a probe learns "not yet", never 404.
    let relay = TestRelay::start(BackendKind::Epoll, 1, |_| {});
    let addr = relay.control_addr().unwrap();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let reply = pabal_testkit::http::get_anonymous(addr, path);
        assert_eq!(reply.status, 503, "{path}: {}", reply.body);
        assert!(reply.body.contains("starting"), "{path}: {}", reply.body);
        assert!(
            reply.head.to_ascii_lowercase().contains("retry-after: 1"),
            "{}",
            reply.head
        );
    }
    with_ops_routes(&relay);
    assert_eq!(
        pabal_testkit::http::get_anonymous(addr, "/readyz").status,
        200
    );
}
