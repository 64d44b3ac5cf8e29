//! WebSocket (RFC 6455) for browsers, server side, sans-IO: the upgrade request parsed with
//! httparse, the framing our own (a few dozen lines the RFC fixes exactly), driven over the
//! worker's buffers with no event loop of its own.
//!
//! - **Upgrade**: a `GET` with `Upgrade: websocket`, `Connection: upgrade`,
//!   `Sec-WebSocket-Version: 13` and a 16-byte `Sec-WebSocket-Key`, at most
//!   `websocket.max_handshake_bytes` long; an `Origin` header must be in
//!   `websocket.allowed_origins` (or the list holds `"*"`). A refused upgrade is answered
//!   with an HTTP error (400, 403, 426 or 431) and closed.
//! - **Messages**: each binary message carries whole pabal frames; the relay reads the
//!   payloads of binary messages as one byte stream (so a frame split across messages is
//!   still read right) and sends each batch of frames as one binary message. A message
//!   longer than one maximal frame (`connection.max_frame_len` plus its length prefix) is
//!   closed with 1009; a text message with 1003; a protocol breach (unmasked frame, reserved
//!   bits or opcodes, a fragmented or oversized control frame) with 1002.
//! - **Heartbeats**: a ping or pong from the browser counts as activity for the relay's
//!   heartbeat (the layer reports it; the core resets the connection's idle clock); pings
//!   are answered with pongs here. The relay's own heartbeat stays the protocol's PING frame
//!   inside a binary message, which browsers (that cannot send WebSocket pings) answer.
//! - **Close**: a close from the browser is echoed and ends the connection; when the relay
//!   closes (GOAWAY, fatal ERROR), a close frame 1000 follows its last message.
//!
//! Memory: while open, a connection holds at most one partial frame header (14 bytes) and
//! one control payload (125 bytes); payload bytes are unmasked in place and handed on.
//!
//! Owns: one connection's upgrade and framing. Must not touch: sockets, TLS (a layer below),
//! the pabal protocol (the core above).

use std::collections::VecDeque;

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use sha1::{Digest, Sha1};
use thiserror::Error;

/// The GUID RFC 6455 appends to the key.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL: usize = 125;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Close codes (RFC 6455 §7.4.1).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Protocol error.
    pub const PROTOCOL: u16 = 1002;
    /// Data the endpoint cannot accept (text).
    pub const UNSUPPORTED: u16 = 1003;
    /// Message too big.
    pub const TOO_BIG: u16 = 1009;
}

/// What the WebSocket listener enforces; shared by a worker's connections.
#[derive(Debug, Clone)]
pub struct WsPolicy {
    /// Allowed `Origin` values (lowercase); `"*"` allows any.
    pub allowed_origins: Vec<String>,
    /// Largest upgrade request, bytes.
    pub max_handshake_bytes: usize,
    /// Largest message, bytes.
    pub max_message: u64,
}

impl WsPolicy {
    /// The policy of a configuration.
    pub fn from_config(config: &crate::config::Config) -> WsPolicy {
        WsPolicy {
            allowed_origins: config
                .websocket
                .allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            max_handshake_bytes: config.websocket.max_handshake_bytes,
            max_message: (config.connection.max_frame_len + pabal_codec::varint::MAX_VARINT_LEN)
                as u64,
        }
    }

    fn origin_allowed(&self, origin: &[u8]) -> bool {
        let origin = String::from_utf8_lossy(origin).to_ascii_lowercase();
        self.allowed_origins
            .iter()
            .any(|o| o == "*" || *o == origin.trim_end_matches('/'))
    }
}

/// Why a WebSocket connection ends; the answer (HTTP response or close frame) is already
/// queued in the output.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WsError {
    /// The upgrade was refused with this HTTP status.
    #[error("WebSocket upgrade refused ({status}): {why}")]
    Refused {
        /// The HTTP status sent.
        status: u16,
        /// Why.
        why: &'static str,
    },
    /// The peer broke the framing rules; closed with this code.
    #[error("WebSocket closed ({code}): {why}")]
    Protocol {
        /// The close code sent.
        code: u16,
        /// Why.
        why: &'static str,
    },
}

/// What one call to [`WsLayer::input`] found besides payload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WsInput {
    /// The upgrade completed during this call.
    pub upgraded: bool,
    /// A ping or pong arrived (heartbeat activity).
    pub activity: bool,
    /// The peer sent a close frame (answered); nothing more will be read.
    pub peer_closed: bool,
}

/// A frame being read.
#[derive(Debug, Clone, Copy)]
struct FrameIn {
    opcode: u8,
    fin: bool,
    remaining: u64,
    mask: [u8; 4],
    pos: usize,
}

#[derive(Debug)]
enum State {
    /// Waiting for the whole upgrade request.
    Handshake(BytesMut),
    /// Frames flow.
    Open,
    /// A close was sent or received: nothing more is read or written.
    Closed,
}

/// One connection's WebSocket state.
#[derive(Debug)]
pub struct WsLayer {
    state: State,
    /// Output from the core before the upgrade completed, sent right after it.
    held: VecDeque<Bytes>,
    header: [u8; 14],
    header_len: usize,
    frame: Option<FrameIn>,
    /// A binary message is in progress (continuations expected).
    in_message: bool,
    message_len: u64,
    control: Vec<u8>,
}

impl Default for WsLayer {
    fn default() -> Self {
        WsLayer::new()
    }
}

impl WsLayer {
    /// A connection waiting for its upgrade request.
    pub fn new() -> WsLayer {
        WsLayer {
            state: State::Handshake(BytesMut::new()),
            held: VecDeque::new(),
            header: [0; 14],
            header_len: 0,
            frame: None,
            in_message: false,
            message_len: 0,
            control: Vec::new(),
        }
    }

    /// Whether frames flow.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open)
    }

    /// Keeps the core's output until the upgrade completes.
    pub fn hold(&mut self, bufs: &mut VecDeque<Bytes>) {
        self.held.extend(bufs.drain(..));
    }

    /// The output held back during the upgrade, once open.
    pub fn take_held(&mut self) -> Option<VecDeque<Bytes>> {
        (self.is_open() && !self.held.is_empty()).then(|| std::mem::take(&mut self.held))
    }

    /// Feeds bytes from below (unmasked in place); payload goes to `deliver`, answers
    /// (the upgrade response, pongs, close frames) to `out`.
    pub fn input(
        &mut self,
        data: &mut [u8],
        policy: &WsPolicy,
        deliver: &mut dyn FnMut(&[u8]),
        out: &mut BytesMut,
    ) -> Result<WsInput, WsError> {
        let mut result = WsInput::default();
        match &mut self.state {
            State::Closed => Ok(result),
            State::Open => {
                self.frames(data, policy, deliver, out, &mut result)?;
                Ok(result)
            }
            State::Handshake(buf) => {
                buf.extend_from_slice(data);
                let mut request = std::mem::take(buf);
                match upgrade(&request, policy) {
                    Ok(None) => {
                        if let State::Handshake(buf) = &mut self.state {
                            *buf = request;
                        }
                        Ok(result)
                    }
                    Ok(Some((len, accept))) => {
                        out.extend_from_slice(
                            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                              Connection: Upgrade\r\nSec-WebSocket-Accept: ",
                        );
                        out.extend_from_slice(accept.as_bytes());
                        out.extend_from_slice(b"\r\n\r\n");
                        self.state = State::Open;
                        result.upgraded = true;
                        let rest = &mut request[len..];
                        self.frames(rest, policy, deliver, out, &mut result)?;
                        Ok(result)
                    }
                    Err(err) => {
                        self.state = State::Closed;
                        if let WsError::Refused { status, why } = &err {
                            refusal(*status, why, out);
                        }
                        Err(err)
                    }
                }
            }
        }
    }

    fn fail(&mut self, code: u16, why: &'static str, out: &mut BytesMut) -> WsError {
        close_frame(code, out);
        self.state = State::Closed;
        WsError::Protocol { code, why }
    }

    fn frames(
        &mut self,
        data: &mut [u8],
        policy: &WsPolicy,
        deliver: &mut dyn FnMut(&[u8]),
        out: &mut BytesMut,
        result: &mut WsInput,
    ) -> Result<(), WsError> {
        let mut i = 0;
        while i < data.len() {
            let Some(mut frame) = self.frame else {
                i += self.read_header(&data[i..]);
                if let Some(parsed) = self.parse_header() {
                    let frame = parsed.map_err(|(code, why)| self.fail(code, why, out))?;
                    self.start_frame(frame, policy, out)?;
                    self.header_len = 0;
                    if frame.remaining == 0 {
                        self.end_frame(frame, out, result);
                        if result.peer_closed {
                            return Ok(());
                        }
                    } else {
                        self.frame = Some(frame);
                    }
                }
                continue;
            };
            let n = (frame.remaining.min((data.len() - i) as u64)) as usize;
            let chunk = &mut data[i..i + n];
            for (k, b) in chunk.iter_mut().enumerate() {
                *b ^= frame.mask[(frame.pos + k) % 4];
            }
            frame.pos += n;
            frame.remaining -= n as u64;
            i += n;
            if matches!(frame.opcode, OP_BINARY | OP_CONTINUATION) {
                deliver(chunk);
            } else {
                self.control.extend_from_slice(chunk);
            }
            if frame.remaining == 0 {
                self.frame = None;
                self.end_frame(frame, out, result);
                if result.peer_closed {
                    return Ok(());
                }
            } else {
                self.frame = Some(frame);
            }
        }
        Ok(())
    }

    /// Copies header bytes until the header is complete; returns how many it took.
    fn read_header(&mut self, data: &[u8]) -> usize {
        let need = if self.header_len < 2 {
            2
        } else {
            header_len(self.header[1])
        };
        let take = (need - self.header_len).min(data.len());
        self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
        self.header_len += take;
        if self.header_len == 2 && take > 0 && data.len() > take {
            return take + self.read_header(&data[take..]);
        }
        take
    }

    /// The frame whose header is complete, if it is.
    #[allow(clippy::type_complexity)] // reason: a local result, named where it is used
    fn parse_header(&self) -> Option<Result<FrameIn, (u16, &'static str)>> {
        if self.header_len < 2 || self.header_len < header_len(self.header[1]) {
            return None;
        }
        let h = &self.header;
        let fin = h[0] & 0x80 != 0;
        let opcode = h[0] & 0x0f;
        if h[0] & 0x70 != 0 {
            return Some(Err((close_code::PROTOCOL, "reserved bits set")));
        }
        if h[1] & 0x80 == 0 {
            return Some(Err((close_code::PROTOCOL, "client frames must be masked")));
        }
        let (len, at) = match h[1] & 0x7f {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&h[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            n => (u64::from(n), 2),
        };
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&h[at..at + 4]);
        Some(Ok(FrameIn {
            opcode,
            fin,
            remaining: len,
            mask,
            pos: 0,
        }))
    }

    fn start_frame(
        &mut self,
        frame: FrameIn,
        policy: &WsPolicy,
        out: &mut BytesMut,
    ) -> Result<(), WsError> {
        match frame.opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !frame.fin || frame.remaining > MAX_CONTROL as u64 {
                    return Err(self.fail(
                        close_code::PROTOCOL,
                        "control frames are unfragmented and at most 125 bytes",
                        out,
                    ));
                }
                self.control.clear();
            }
            OP_TEXT => {
                return Err(self.fail(
                    close_code::UNSUPPORTED,
                    "text messages are not accepted; pabal frames travel in binary messages",
                    out,
                ));
            }
            OP_BINARY | OP_CONTINUATION => {
                if (frame.opcode == OP_BINARY) == self.in_message {
                    return Err(self.fail(
                        close_code::PROTOCOL,
                        "continuation frame outside a message, or a message inside one",
                        out,
                    ));
                }
                if frame.opcode == OP_BINARY {
                    self.message_len = 0;
                }
                self.message_len = self.message_len.saturating_add(frame.remaining);
                if self.message_len > policy.max_message {
                    return Err(self.fail(
                        close_code::TOO_BIG,
                        "message larger than the relay's frame limit",
                        out,
                    ));
                }
                self.in_message = !frame.fin;
            }
            _ => {
                return Err(self.fail(close_code::PROTOCOL, "reserved opcode", out));
            }
        }
        Ok(())
    }

    fn end_frame(&mut self, frame: FrameIn, out: &mut BytesMut, result: &mut WsInput) {
        match frame.opcode {
            OP_PING => {
                result.activity = true;
                encode_header(OP_PONG, self.control.len(), out);
                out.extend_from_slice(&self.control);
            }
            OP_PONG => result.activity = true,
            OP_CLOSE => {
                let code = match self.control.as_slice() {
                    [a, b, ..] => u16::from_be_bytes([*a, *b]),
                    _ => close_code::NORMAL,
                };
                close_frame(code, out);
                self.state = State::Closed;
                result.peer_closed = true;
            }
            _ => {}
        }
        if !matches!(frame.opcode, OP_BINARY | OP_CONTINUATION) {
            // Control payloads are tiny; keep no allocation while idle.
            self.control = Vec::new();
        }
    }

    /// Queues the relay's close frame (after its last message); nothing is sent after it.
    pub fn close(&mut self, out: &mut BytesMut) {
        if self.is_open() {
            close_frame(close_code::NORMAL, out);
        }
        self.state = State::Closed;
    }
}

/// The header length implied by the second header byte (mask included).
fn header_len(b1: u8) -> usize {
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
}

/// Appends an unmasked (server) frame header.
pub fn encode_header(opcode: u8, len: usize, out: &mut BytesMut) {
    out.put_u8(0x80 | opcode);
    if len < 126 {
        out.put_u8(len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.put_u8(126);
        out.put_u16(short);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
}

/// Appends the header of one binary message of `len` bytes.
pub fn encode_binary_header(len: usize, out: &mut BytesMut) {
    encode_header(OP_BINARY, len, out);
}

fn close_frame(code: u16, out: &mut BytesMut) {
    encode_header(OP_CLOSE, 2, out);
    out.put_u16(code);
}

fn refusal(status: u16, why: &str, out: &mut BytesMut) {
    let reason = match status {
        403 => "Forbidden",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        _ => "Bad Request",
    };
    let extra = if status == 426 {
        "Sec-WebSocket-Version: 13\r\n"
    } else {
        ""
    };
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {status} {reason}\r\n{extra}Content-Type: text/plain\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{why}",
            why.len()
        )
        .as_bytes(),
    );
}

fn header<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The accept key for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Parses the upgrade request: `None` while incomplete, else its length and the accept key.
fn upgrade(buf: &[u8], policy: &WsPolicy) -> Result<Option<(usize, String)>, WsError> {
    let refused = |status, why| Err(WsError::Refused { status, why });
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > policy.max_handshake_bytes => {
            return refused(431, "upgrade request too large");
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return refused(431, "too many headers"),
        Err(_) => return refused(400, "not an HTTP request"),
    };
    if len > policy.max_handshake_bytes {
        return refused(431, "upgrade request too large");
    }
    if request.method != Some("GET") || request.version != Some(1) {
        return refused(400, "a WebSocket upgrade is an HTTP/1.1 GET");
    }
    let h = request.headers;
    if !header(h, "upgrade").is_some_and(|v| has_token(v, "websocket"))
        || !header(h, "connection").is_some_and(|v| has_token(v, "upgrade"))
    {
        return refused(426, "this endpoint speaks WebSocket only");
    }
    if header(h, "sec-websocket-version") != Some(b"13") {
        return refused(426, "WebSocket version 13 only");
    }
    let key = match header(h, "sec-websocket-key") {
        Some(k)
            if base64::engine::general_purpose::STANDARD
                .decode(k.trim_ascii())
                .is_ok_and(|d| d.len() == 16) =>
        {
            k.trim_ascii()
        }
        _ => return refused(400, "missing or malformed Sec-WebSocket-Key"),
    };
    if let Some(origin) = header(h, "origin")
        && !policy.origin_allowed(origin)
    {
        return refused(403, "origin not allowed (websocket.allowed_origins)");
    }
    Ok(Some((len, accept_key(key))))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use super::*;

    fn policy() -> WsPolicy {
        WsPolicy {
            allowed_origins: vec!["https://app.example".into()],
            max_handshake_bytes: 1024,
            max_message: 100,
        }
    }

    const REQUEST: &str = "GET /pabal HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\nOrigin: https://app.example\r\n\r\n";

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut v = vec![if fin { 0x80 } else { 0 } | opcode];
        if payload.len() < 126 {
            v.push(0x80 | payload.len() as u8);
        } else {
            v.push(0x80 | 126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        v
    }

    fn feed(ws: &mut WsLayer, bytes: &[u8]) -> (Result<WsInput, WsError>, Vec<u8>, Vec<u8>) {
        let mut got = Vec::new();
        let mut out = BytesMut::new();
        let mut data = bytes.to_vec();
        let r = ws.input(
            &mut data,
            &policy(),
            &mut |p| got.extend_from_slice(p),
            &mut out,
        );
        (r, got, out.to_vec())
    }

    #[test]
    fn upgrade_answers_rfc_accept_key() {
        // The example from RFC 6455 §1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let mut ws = WsLayer::new();
        let (r, _, out) = feed(&mut ws, REQUEST.as_bytes());
        assert!(r.unwrap().upgraded);
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with("HTTP/1.1 101"), "{out}");
        assert!(out.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    }

    #[test]
    fn payload_is_a_byte_stream_in_any_split() {
        let mut wire = REQUEST.as_bytes().to_vec();
        wire.extend(masked(OP_BINARY, false, b"hello "));
        wire.extend(masked(OP_PING, true, b"hb"));
        wire.extend(masked(OP_CONTINUATION, true, b"world"));
        for cut in 0..wire.len() {
            let mut ws = WsLayer::new();
            let (r1, mut got, mut out) = feed(&mut ws, &wire[..cut]);
            let (r2, got2, out2) = feed(&mut ws, &wire[cut..]);
            r1.unwrap();
            assert!(r2.is_ok());
            got.extend(got2);
            out.extend(out2);
            assert_eq!(got, b"hello world", "cut at {cut}");
            assert!(
                out.ends_with(&[0x8A, 2, b'h', b'b']),
                "pong echoes the ping"
            );
        }
    }

    #[test]
    fn refusals_name_their_reason() {
        let bad_origin = REQUEST.replace("https://app.example", "https://evil.example");
        let (r, _, out) = feed(&mut WsLayer::new(), bad_origin.as_bytes());
        assert_eq!(
            r.unwrap_err(),
            WsError::Refused {
                status: 403,
                why: "origin not allowed (websocket.allowed_origins)"
            }
        );
        assert!(out.starts_with(b"HTTP/1.1 403"));
        let plain_http = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let (r, _, _) = feed(&mut WsLayer::new(), plain_http.as_bytes());
        assert!(matches!(r, Err(WsError::Refused { status: 426, .. })));
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(2000));
        let (r, _, _) = feed(&mut WsLayer::new(), huge.as_bytes());
        assert!(matches!(r, Err(WsError::Refused { status: 431, .. })));
    }

    #[test]
    fn framing_breaches_close_with_their_code() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (masked(OP_TEXT, true, b"hi"), close_code::UNSUPPORTED),
            (masked(OP_BINARY, true, &[0; 101]), close_code::TOO_BIG),
            (masked(OP_CONTINUATION, true, b"x"), close_code::PROTOCOL),
            (masked(OP_PING, false, b"x"), close_code::PROTOCOL),
            (vec![0x82, 0x01, b'x'], close_code::PROTOCOL), // unmasked
        ];
        for (frame, code) in cases {
            let mut ws = WsLayer::new();
            feed(&mut ws, REQUEST.as_bytes()).0.unwrap();
            let (r, _, out) = feed(&mut ws, &frame);
            assert!(
                matches!(r, Err(WsError::Protocol { code: c, .. }) if c == code),
                "{r:?}"
            );
            assert_eq!(out, [0x88, 2, (code >> 8) as u8, code as u8]);
        }
    }

    #[test]
    fn peer_close_is_echoed() {
        let mut ws = WsLayer::new();
        feed(&mut ws, REQUEST.as_bytes()).0.unwrap();
        let (r, _, out) = feed(&mut ws, &masked(OP_CLOSE, true, &1001u16.to_be_bytes()));
        assert!(r.unwrap().peer_closed);
        assert_eq!(out, [0x88, 2, 0x03, 0xE9]);
    }
}
