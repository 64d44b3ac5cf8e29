//! HTTP/1.1 on raw sockets for the control plane's tests: requests written byte for byte (so
//! a test can send what no client library would) and answers read with their headers, one
//! connection per request (`Connection: close`).
//!
//! Owns: the tests' side of the control API's wire. Must not touch: the control plane's own
//! HTTP code (it is what these requests test).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use crate::{TestRelay, WAIT};

/// The API key the tests' relays run with.
pub const KEY: &str = "test-api-key-0123456789";

/// An HTTP answer read off a raw socket.
#[derive(Debug)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The status line and the headers.
    pub head: String,
    /// The body, as sent (this reader does not undo a chunked encoding).
    pub body: String,
}

impl Reply {
    /// The value of header `name` (any case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The body as JSON, or `Value::Null` when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Sends `request` as is and reads the answer to the end (`Connection: close`).
pub fn raw_http(addr: SocketAddr, request: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
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
    compose(
        method,
        path,
        &format!("Authorization: Bearer {KEY}\r\n{idem}"),
        body,
    )
}

/// A request with `headers` (each ending in CRLF) and a JSON body.
fn compose(method: &str, path: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: relay\r\n{headers}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A GET with the API key.
pub fn get(addr: SocketAddr, path: &str) -> Reply {
    raw_http(addr, &request("GET", path, None, ""))
}

/// A GET without credentials, as Prometheus or a load balancer's health check sends it.
pub fn get_anonymous(addr: SocketAddr, path: &str) -> Reply {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    raw_http(addr, request.as_bytes())
}

/// One request to the control API with `key` as its bearer token (if any) and a JSON body;
/// returns the status and the JSON answer (`Value::Null` when the body is not JSON).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let request = compose(method, path, &auth, body.unwrap_or(""));
    let reply = raw_http(addr, &request);
    (reply.status, reply.json())
}

/// Adds the operations routes (`/metrics`, `/healthz`, `/readyz`) to `relay`'s control
/// listener and returns its address.
pub fn with_ops_routes(relay: &TestRelay) -> SocketAddr {
    for route in pabal_relay::metrics::routes() {
        relay.add_route(route);
    }
    relay.control_addr().unwrap()
}
