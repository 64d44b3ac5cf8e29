//! The app server's side of a run: tokens for phones, and the relay's server API.
//!
//! Owns: minting HS256 tokens (`{sub, exp, chn: ["*"]}`) and a tiny blocking HTTP/1.1 client
//! for the control listener (`POST` JSON and `GET` with `Authorization: Bearer KEY`; loopback
//! only, one request per connection). Must not touch: phones, links, the event loop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use base64::Engine;
use bytes::Bytes;
use serde::Serialize;
use serde_json::{Value, json};

use crate::gaps::Retention;

/// What a phone presents in HELLO.
#[derive(Clone)]
pub enum Tokens {
    /// The relay runs without authentication: the token is the user id.
    UserId,
    /// HS256 tokens signed with a shared secret.
    Jwt {
        /// The signing key.
        key: jsonwebtoken::EncodingKey,
        /// Lifetime of each token.
        ttl: Duration,
    },
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokens::UserId => f.write_str("Tokens::UserId"),
            Tokens::Jwt { ttl, .. } => write!(f, "Tokens::Jwt {{ ttl: {ttl:?}, key: <secret> }}"),
        }
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    chn: [&'a str; 1],
}

impl Tokens {
    /// HS256 tokens from a secret file (one trailing newline trimmed, as the relay reads it).
    pub fn from_secret_file(path: &std::path::Path) -> anyhow::Result<Tokens> {
        let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let secret = raw.strip_suffix(b"\n").unwrap_or(&raw);
        let secret = secret.strip_suffix(b"\r").unwrap_or(secret);
        if secret.len() < 32 {
            bail!(
                "{}: an HS256 secret must be at least 32 bytes",
                path.display()
            );
        }
        Ok(Tokens::Jwt {
            key: jsonwebtoken::EncodingKey::from_secret(secret),
            ttl: Duration::from_secs(24 * 3600),
        })
    }

    /// The HELLO token for `user`.
    pub fn token_for(&self, user: &str) -> anyhow::Result<Bytes> {
        match self {
            Tokens::UserId => Ok(Bytes::copy_from_slice(user.as_bytes())),
            Tokens::Jwt { key, ttl } => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                let claims = Claims {
                    sub: user,
                    exp: (now + *ttl).as_secs(),
                    chn: ["*"],
                };
                let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
                let token =
                    jsonwebtoken::encode(&header, &claims, key).context("signing a token")?;
                Ok(Bytes::from(token))
            }
        }
    }

    /// Whether phones join rooms themselves (no authentication) rather than through the API.
    pub fn self_join(&self) -> bool {
        matches!(self, Tokens::UserId)
    }
}

/// The relay's server API.
#[derive(Debug, Clone)]
pub struct ControlApi {
    addr: SocketAddr,
    host: String,
    key: Option<String>,
    timeout: Duration,
}

impl ControlApi {
    /// `url` is `http://HOST:PORT` (a path, if any, is ignored); `key` the API key.
    pub fn new(url: &str, key: Option<String>) -> anyhow::Result<ControlApi> {
        let rest = url.strip_prefix("http://").with_context(|| {
            format!("--control {url:?}: only http:// URLs (loopback) are supported")
        })?;
        let host = rest.split('/').next().unwrap_or(rest).to_string();
        let addr = host
            .to_socket_addrs()
            .with_context(|| format!("--control {url:?}: cannot resolve {host:?}"))?
            .next()
            .with_context(|| format!("--control {url:?}: no address"))?;
        Ok(ControlApi {
            addr,
            host,
            key,
            timeout: Duration::from_secs(30),
        })
    }

    /// Reads the API key from a file (trailing newline trimmed).
    pub fn read_key(path: &std::path::Path) -> anyhow::Result<String> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(text.trim_end_matches(['\n', '\r']).to_string())
    }

    /// `POST path` with a JSON body; the status and the JSON answer (`null` if none).
    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        self.request("POST", path, Some(body))
    }

    /// `GET path`; the status and the JSON answer (`null` if none).
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        self.request("GET", path, None)
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let body = match body {
            Some(b) => serde_json::to_vec(b)?,
            None => Vec::new(),
        };
        let mut stream = TcpStream::connect_timeout(&self.addr, self.timeout)
            .with_context(|| format!("control API {}: connect", self.addr))?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        stream.set_nodelay(true)?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n",
            self.host,
            body.len()
        );
        if let Some(key) = &self.key {
            req.push_str(&format!("Authorization: Bearer {key}\r\n"));
        }
        req.push_str("\r\n");
        let mut out = req.into_bytes();
        out.extend_from_slice(&body);
        stream.write_all(&out)?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .with_context(|| format!("control API {}: reading the answer to {path}", self.addr))?;
        let (status, body) =
            parse_response(&raw).with_context(|| format!("control API: {path}"))?;
        let value = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()))
        };
        Ok((status, value))
    }

    fn post_ok(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let (status, value) = self.post(path, body)?;
        if !(200..300).contains(&status) {
            bail!("control API: POST {path}: HTTP {status}: {value}");
        }
        Ok(value)
    }

    /// Adds users to a room.
    pub fn add_room_members(&self, room: &str, users: &[&str]) -> anyhow::Result<()> {
        self.post_ok(
            &format!("/v1/rooms/{room}/members"),
            &json!({ "users": users }),
        )
        .map(drop)
    }

    /// Subscribes users to a channel.
    pub fn add_channel_subscribers(&self, channel: &str, users: &[&str]) -> anyhow::Result<()> {
        self.post_ok(
            &format!("/v1/channels/{channel}/subscribers"),
            &json!({ "users": users }),
        )
        .map(drop)
    }

    /// The retention in force for a room (or channel), from `GET /v1/{rooms|channels}/NAME`.
    pub fn retention(&self, name: &str, channel: bool) -> anyhow::Result<Retention> {
        let collection = if channel { "channels" } else { "rooms" };
        let path = format!("/v1/{collection}/{name}");
        let (status, value) = self.get(&path)?;
        if status != 200 {
            bail!("control API: GET {path}: HTTP {status}: {value}");
        }
        let r = value
            .get("retention")
            .with_context(|| format!("control API: GET {path}: no \"retention\" in {value}"))?;
        let field = |f: &str| {
            r.get(f).and_then(Value::as_u64).with_context(|| {
                format!("control API: GET {path}: no integer \"retention.{f}\" in {value}")
            })
        };
        Ok(Retention {
            max_messages: field("max_messages")?,
            max_bytes: field("max_bytes")?,
            max_age_s: field("max_age_s")?,
        })
    }

    /// Publishes into a channel as `sender`; the sequence the relay gave the message.
    pub fn publish_channel(&self, channel: &str, sender: &str, data: &[u8]) -> anyhow::Result<u64> {
        let data = base64::engine::general_purpose::STANDARD.encode(data);
        let value = self.post_ok(
            &format!("/v1/channels/{channel}/messages"),
            &json!({ "sender": sender, "data": data }),
        )?;
        value
            .get("seq")
            .and_then(Value::as_u64)
            .with_context(|| format!("control API: publish to {channel}: no \"seq\" in {value}"))
    }
}

/// Splits an HTTP/1.1 response into its status and its body (Content-Length, chunked, or
/// until the end).
fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..end]).context("headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            length = value.parse::<usize>().ok();
        } else if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        }
    }
    let body = &raw[end + 4..];
    if chunked {
        let mut out = Vec::new();
        let mut rest = body;
        loop {
            let line_end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .context("bad chunk")?;
            let size_text = std::str::from_utf8(&rest[..line_end])?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .context("bad chunk size")?;
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size).context("truncated chunk")?);
            rest = rest.get(size + 2..).unwrap_or(&[]);
        }
        return Ok((status, out));
    }
    let body = match length {
        Some(n) => body.get(..n).context("truncated body")?,
        None => body,
    };
    Ok((status, body.to_vec()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_with_length_chunked_or_eof() {
        let (s, b) =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{\"seq\":42}").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"{\"seq\":42}"[..]));
        let (s, b) = parse_response(
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((s, b.as_slice()), (201, &b"{\"a\":1}"[..]));
        let (s, b) = parse_response(b"HTTP/1.0 404 Not Found\r\n\r\nnope").unwrap();
        assert_eq!((s, b.as_slice()), (404, &b"nope"[..]));
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn tokens_are_hs256_jwts_with_the_user_as_subject() {
        let dir = std::env::temp_dir().join(format!("pabal-loadgen-secret-{}", std::process::id()));
        std::fs::write(&dir, b"0123456789abcdef0123456789abcdef\n").unwrap();
        let tokens = Tokens::from_secret_file(&dir).unwrap();
        let _ = std::fs::remove_file(&dir);
        let token = tokens.token_for("u7").unwrap();
        let text = std::str::from_utf8(&token).unwrap();
        let parts: Vec<&str> = text.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap();
        let claims: Value = serde_json::from_slice(&claims).unwrap();
        assert_eq!(claims["sub"], "u7");
        assert_eq!(claims["chn"], json!(["*"]));
        assert!(claims["exp"].as_u64().unwrap() > 1_700_000_000);
        assert!(!tokens.self_join());
        assert_eq!(&Tokens::UserId.token_for("u7").unwrap()[..], b"u7");
    }
}
