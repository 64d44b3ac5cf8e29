//! A minimal blocking WebSocket client for tests (what a browser does): the upgrade
//! request, masked binary messages out, unmasked frames in. Written from RFC 6455 on
//! purpose, independently of the relay's framing code.
//!
//! Owns: the browser side of a WebSocket in tests. Must not touch: the relay's framing code
//! (`relay/src/transport/ws.rs`), which this client checks independently.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pabal_codec::{ClientFrame, ClientSession, Decoder, Event, Limits, Subscribe, Text};

use crate::WAIT;

/// What came back on the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsFrame {
    /// A binary message.
    Binary(Vec<u8>),
    /// A pong with its payload.
    Pong(Vec<u8>),
    /// A close with its code.
    Close(u16),
}

/// A raw WebSocket connection.
#[derive(Debug)]
pub struct WsConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl WsConn {
    /// Sends the upgrade request (with `origin` if given); returns the connection and the
    /// HTTP status line of the answer.
    pub fn open(addr: SocketAddr, origin: Option<&str>) -> (WsConn, String) {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let origin = origin
            .map(|o| format!("Origin: {o}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET /pabal HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             {origin}\r\n"
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte) {
                Ok(1) => buf.push(byte[0]),
                _ => break,
            }
        }
        let head = String::from_utf8_lossy(&buf).to_string();
        let status = head.lines().next().unwrap_or("").to_string();
        if status.contains(" 101 ") {
            assert!(
                head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
                "{head}"
            );
        }
        (
            WsConn {
                stream,
                buf: Vec::new(),
            },
            status,
        )
    }

    /// Sends one masked frame.
    pub fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        let mut out = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&out).unwrap();
    }

    /// The next frame, or `None` on EOF or timeout.
    pub fn next_frame(&mut self, timeout: Duration) -> Option<WsFrame> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((frame, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
    }
}

fn parse(buf: &[u8]) -> Option<(WsFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames are unmasked");
    let (len, at) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => {
            let b: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(b) as usize, 10)
        }
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    let frame = match buf[0] & 0x0f {
        0x2 => WsFrame::Binary(payload),
        0xA => WsFrame::Pong(payload),
        0x8 => WsFrame::Close(u16::from_be_bytes([payload[0], payload[1]])),
        op => panic!("unexpected opcode {op}"),
    };
    Some((frame, at + len))
}

/// A protocol client over WebSocket, one frame per binary message (as a browser sends).
#[derive(Debug)]
pub struct WsClient {
    /// The connection.
    pub conn: WsConn,
    session: ClientSession,
    decoder: Decoder,
    rbuf: BytesMut,
    queue: std::collections::VecDeque<Event>,
    /// The user.
    pub user: String,
}

impl WsClient {
    /// Upgrades, sends HELLO as `user` and waits for WELCOME.
    pub fn connect(addr: SocketAddr, user: &str, origin: Option<&str>) -> WsClient {
        let (conn, status) = WsConn::open(addr, origin);
        assert!(status.contains(" 101 "), "upgrade refused: {status}");
        let mut client = WsClient {
            conn,
            session: ClientSession::new(),
            decoder: Decoder::new(Limits::default()),
            rbuf: BytesMut::new(),
            queue: Default::default(),
            user: user.to_string(),
        };
        let hello = client
            .session
            .hello(Bytes::copy_from_slice(user.as_bytes()), 0);
        client.send(&hello);
        match client.next_event() {
            Event::Welcome(_) => {}
            other => panic!("{user}: expected WELCOME, got {other:?}"),
        }
        client
    }

    /// Sends one frame in one binary message.
    pub fn send(&mut self, frame: &ClientFrame) {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        self.conn.send_frame(0x2, &buf);
    }

    /// The next protocol event (pongs skipped); panics after [`WAIT`].
    pub fn next_event(&mut self) -> Event {
        match self.queue.pop_front() {
            Some(e) => e,
            None => self.read_event(),
        }
    }

    /// The first event matching `pred`, keeping the others queued in order.
    pub fn wait_for(&mut self, mut pred: impl FnMut(&Event) -> bool) -> Event {
        if let Some(i) = self.queue.iter().position(&mut pred) {
            return self.queue.remove(i).unwrap();
        }
        loop {
            let e = self.read_event();
            if pred(&e) {
                return e;
            }
            self.queue.push_back(e);
        }
    }

    fn read_event(&mut self) -> Event {
        loop {
            if let Some(frame) = self.decoder.decode_server(&mut self.rbuf).unwrap() {
                return self.session.apply(frame).unwrap();
            }
            match self.conn.next_frame(WAIT) {
                Some(WsFrame::Binary(b)) => self.rbuf.extend_from_slice(&b),
                Some(WsFrame::Pong(_)) => {}
                other => panic!("{}: connection ended: {other:?}", self.user),
            }
        }
    }

    /// Joins a room and returns its alias.
    pub fn join(&mut self, room: &str) -> u32 {
        self.send(&ClientFrame::Subscribe(Subscribe {
            room: true,
            name: Text::from(room),
        }));
        match self.wait_for(|e| matches!(e, Event::Bound { .. })) {
            Event::Bound { alias, .. } => alias,
            _ => unreachable!(),
        }
    }

    /// Publishes and waits for the PUBACK; returns the sequence.
    pub fn publish_acked(&mut self, alias: u32, payload: &[u8]) -> u64 {
        let (id, frame) = self
            .session
            .publish(alias, Bytes::copy_from_slice(payload), None);
        self.send(&frame);
        match self.wait_for(|e| matches!(e, Event::PubAck { msg_id, .. } if *msg_id == id)) {
            Event::PubAck { seq, .. } => seq,
            _ => unreachable!(),
        }
    }

    /// The next message's (seq, payload).
    pub fn message(&mut self) -> (u64, Bytes) {
        match self.wait_for(|e| matches!(e, Event::Message { seq: Some(_), .. })) {
            Event::Message {
                seq: Some(seq),
                payload,
                ..
            } => (seq, payload),
            _ => unreachable!(),
        }
    }
}
