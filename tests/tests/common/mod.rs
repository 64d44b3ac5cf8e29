//! HTTP on raw sockets for the control plane's tests: requests written byte for byte (so a
//! test can send what no client library would) and answers read with their headers.

#![allow(dead_code)] // reason: each test file uses its own subset
#![allow(clippy::unwrap_used)] // reason: test helpers fail loudly on purpose

use pabal_tests::TestRelay;

/// The API key the tests' relays run with.
pub const KEY: &str = "test-api-key-0123456789";

/// An HTTP answer read off a raw socket.
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Sends `request` as is and reads the answer to the end (`Connection: close`).
pub fn raw_http(addr: std::net::SocketAddr, request: &[u8]) -> Reply {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(pabal_tests::WAIT)).unwrap();
    stream.write_all(request).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap_or_else(|e| {
        panic!(
            "no answer to {:?}: {e}",
            String::from_utf8_lossy(&request[..request.len().min(80)])
        )
    });
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// A request with the API key, an optional `Idempotency-Key` and a JSON body.
pub fn request(method: &str, path: &str, idempotency_key: Option<&str>, body: &str) -> Vec<u8> {
    let idem = idempotency_key
        .map(|k| format!("Idempotency-Key: {k}\r\n"))
        .unwrap_or_default();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {KEY}\r\n{idem}\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

pub fn get(addr: std::net::SocketAddr, path: &str) -> Reply {
    raw_http(addr, &request("GET", path, None, ""))
}

pub fn with_ops_routes(relay: &TestRelay) -> std::net::SocketAddr {
    for route in pabal_relay::metrics::routes() {
        relay.handle().add_route(route);
    }
    relay.handle().control_addr().unwrap()
}
