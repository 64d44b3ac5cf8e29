//! The blocking test client: a TCP connection driven by the codec's [`ClientSession`], so
//! every frame a test receives has passed the protocol's own checks (no silent skip, no
//! repeat, no reorder of sequences); and [`forged_resume`], a client that writes its own HELLO.
//!
//! Owns: the client side of the wire protocol in tests, on the codec only. Must not touch:
//! the relay (it is a peer on a socket) or `pabal-client` (that is the product under test).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pabal_codec::{
    ClientFrame, ClientSession, Decoder, ErrorCode, Event, Limits, Ping, ServerFrame, Subscribe,
    Text,
};

use crate::WAIT;

/// A blocking protocol client for tests.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    rbuf: BytesMut,
    decoder: Decoder,
    /// Protocol state; survives reconnects.
    pub session: ClientSession,
    queue: VecDeque<Event>,
    /// The user id.
    pub user: String,
    /// The relay's id for the connection (worker in the top 16 bits).
    pub conn_id: u64,
    /// Bytes read so far.
    pub bytes_in: usize,
}

impl Client {
    /// Connects as `user` (the relay runs with `auth = "none"`) and waits for WELCOME.
    pub fn connect(addr: SocketAddr, user: &str) -> Client {
        Self::connect_with(addr, user, ClientSession::new())
    }

    /// Connects with a small receive buffer, so a client that stops reading fills the
    /// relay's queue rather than the kernel's.
    pub fn connect_small_window(addr: SocketAddr, user: &str, rcvbuf: usize) -> Client {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        socket.connect(&addr.into()).expect("connect");
        Self::handshake(socket.into(), user, ClientSession::new())
    }

    /// Connects with an existing session: its known rooms become the resume list.
    pub fn connect_with(addr: SocketAddr, user: &str, session: ClientSession) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        Self::handshake(stream, user, session)
    }

    /// Sends HELLO (with `token` as the credential) over `stream`, without waiting.
    fn hello_over(
        stream: TcpStream,
        user: &str,
        token: &[u8],
        mut session: ClientSession,
    ) -> Client {
        stream.set_nodelay(true).unwrap();
        let hello = session.hello(Bytes::copy_from_slice(token), 0);
        let mut client = Client {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            decoder: Decoder::new(Limits::default()),
            session,
            queue: VecDeque::new(),
            user: user.to_string(),
            conn_id: 0,
            bytes_in: 0,
        };
        // A refused client may be closed before its HELLO is read: what counts is the answer
        // (or the lack of one), which the caller reads next.
        let mut buf = BytesMut::new();
        hello.encode(&mut buf);
        let _ = client.send_raw(&buf);
        client
    }

    fn handshake(stream: TcpStream, user: &str, session: ClientSession) -> Client {
        let mut client = Self::hello_over(stream, user, user.as_bytes(), session);
        match client.next_event(WAIT) {
            Some(Event::Welcome(w)) => client.conn_id = w.conn_id,
            other => panic!("{user}: expected WELCOME, got {other:?}"),
        }
        client
    }

    /// The worker holding this connection.
    pub fn worker(&self) -> u64 {
        self.conn_id >> 48
    }

    /// Sends one frame.
    pub fn send(&mut self, frame: &ClientFrame) {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        self.stream.write_all(&buf).expect("write");
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Joins a room by name (self-join) and returns its alias once bound.
    pub fn join(&mut self, room: &str) -> u32 {
        self.bind(room, true)
    }

    /// Subscribes to a channel and returns its alias once bound.
    pub fn subscribe(&mut self, channel: &str) -> u32 {
        self.bind(channel, false)
    }

    fn bind(&mut self, name: &str, room: bool) -> u32 {
        self.send(&ClientFrame::Subscribe(Subscribe {
            room,
            name: Text::from(name),
        }));
        let name = name.to_string();
        match self.wait_for(|e| matches!(e, Event::Bound { room, .. } if room.name.as_ref().is_some_and(|n| n.as_str() == name))) {
            Event::Bound { alias, .. } => alias,
            _ => unreachable!(),
        }
    }

    /// Publishes and returns the message id.
    pub fn publish(&mut self, alias: u32, payload: impl Into<Bytes>) -> u64 {
        let (id, frame) = self.session.publish(alias, payload.into(), None);
        self.send(&frame);
        id
    }

    /// Publishes and waits for the PUBACK; returns the sequence.
    pub fn publish_acked(&mut self, alias: u32, payload: impl Into<Bytes>) -> u64 {
        let id = self.publish(alias, payload);
        match self.wait_for(|e| matches!(e, Event::PubAck { msg_id, .. } if *msg_id == id)) {
            Event::PubAck { seq, .. } => seq,
            _ => unreachable!(),
        }
    }

    /// Publishes `n` messages at once and sorts the answers: (acknowledged, rate-limited).
    /// Panics on any other refusal, or a rate limit that closes the connection.
    pub fn publish_burst(&mut self, alias: u32, n: usize) -> (usize, usize) {
        let ids: HashSet<u64> = (0..n).map(|_| self.publish(alias, "hello")).collect();
        let (mut acked, mut limited) = (0, 0);
        while acked + limited < n {
            match self.wait_for(|e| match e {
                Event::PubAck { msg_id, .. } => ids.contains(msg_id),
                Event::Error(err) => ids.contains(&err.reference),
                _ => false,
            }) {
                Event::PubAck { .. } => acked += 1,
                Event::Error(err) => {
                    assert_eq!(err.code, ErrorCode::RateLimited, "{err:?}");
                    assert!(!err.fatal, "a rate limit must not close the connection");
                    limited += 1;
                }
                _ => unreachable!(),
            }
        }
        (acked, limited)
    }

    /// PING, and the PONG that proves the connection still works.
    pub fn ping(&mut self) {
        self.send(&ClientFrame::Ping(Ping::default()));
        self.wait_for(|e| matches!(e, Event::Pong(_)));
    }

    /// The next event, reading from the socket as needed; `None` on timeout or EOF.
    /// Panics on a protocol violation by the relay.
    pub fn next_event(&mut self, timeout: Duration) -> Option<Event> {
        if let Some(e) = self.queue.pop_front() {
            return Some(e);
        }
        self.read_event(timeout)
    }

    fn read_event(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.decoder.decode_server(&mut self.rbuf) {
                Ok(Some(frame)) => return Some(self.apply(frame)),
                Ok(None) => {}
                Err(e) => panic!("{}: relay sent a malformed frame: {e}", self.user),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => {
                    self.bytes_in += n;
                    self.rbuf.extend_from_slice(&chunk[..n]);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return None;
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("{}: read failed: {e}", self.user),
            }
        }
    }

    fn apply(&mut self, frame: ServerFrame) -> Event {
        match self.session.apply(frame) {
            Ok(event) => event,
            Err(e) => panic!("{}: protocol violation by the relay: {e}", self.user),
        }
    }

    /// Waits for the first event matching `pred`, keeping the others queued in order.
    pub fn wait_for(&mut self, mut pred: impl FnMut(&Event) -> bool) -> Event {
        if let Some(i) = self.queue.iter().position(&mut pred) {
            return self.queue.remove(i).unwrap();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_event(left) {
                Some(e) if pred(&e) => return e,
                Some(e) => self.queue.push_back(e),
                None => panic!(
                    "{}: timed out waiting; queued: {:?}",
                    self.user,
                    self.queue.iter().take(5).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Collects `n` messages (sequenced) of `alias`, in arrival order, as (seq, payload);
    /// other events stay queued.
    pub fn messages(&mut self, alias: u32, n: usize) -> Vec<(u64, Bytes)> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.wait_for(
                |e| matches!(e, Event::Message { alias: a, seq: Some(_), .. } if *a == alias),
            ) {
                Event::Message {
                    seq: Some(seq),
                    payload,
                    ..
                } => out.push((seq, payload)),
                _ => unreachable!(),
            }
        }
        out
    }

    /// Reads `alias` until it holds every sequence up to `last`; returns seq -> payload.
    /// Panics on a GAP, a duplicate, a sequence missing, or after twice [`WAIT`]: what a
    /// phone of a cluster test must see.
    pub fn read_through(&mut self, alias: u32, last: u64) -> BTreeMap<u64, Bytes> {
        let mut got = BTreeMap::new();
        let deadline = Instant::now() + WAIT * 2;
        while got.keys().next_back().copied().unwrap_or(0) < last {
            assert!(
                Instant::now() < deadline,
                "{}: timed out at {:?} of {last}",
                self.user,
                got.keys().next_back()
            );
            match self.next_event(Duration::from_millis(100)) {
                Some(Event::Message {
                    alias: a,
                    seq: Some(seq),
                    payload,
                    ..
                }) if a == alias => {
                    assert!(got.insert(seq, payload).is_none(), "duplicate {seq}");
                }
                Some(Event::Gap { from, to, .. }) => panic!("{}: gap {from}..={to}", self.user),
                _ => {}
            }
        }
        assert_eq!(
            got.keys().copied().collect::<Vec<_>>(),
            (1..=last).collect::<Vec<_>>(),
            "{}: every sequence, in order, once",
            self.user
        );
        got
    }

    /// Publishes once to `alias`: `Some(seq)` on its PUBACK, `None` on a refusal, which
    /// must be the cluster's typed, retryable `Overloaded` `unavailable` (anything else
    /// fails the test).
    pub fn publish_or_unavailable(&mut self, alias: u32, payload: impl Into<Bytes>) -> Option<u64> {
        let id = self.publish(alias, payload);
        match self.wait_for(|e| {
            matches!(e, Event::Error(err) if err.reference == id)
                || matches!(e, Event::PubAck { msg_id, .. } if *msg_id == id)
        }) {
            Event::PubAck { seq, .. } => Some(seq),
            Event::Error(err) => {
                assert_eq!(err.message.as_str(), "unavailable");
                assert!(!err.fatal, "a refusal keeps the connection");
                None
            }
            other => panic!("not an answer to {id}: {other:?}"),
        }
    }

    /// Connects as `tag`, joins `room`, publishes `count` messages `<tag>-<i>` and waits
    /// for each PUBACK; their sequences.
    pub fn publish_all(addr: SocketAddr, room: &str, tag: &str, count: usize) -> Vec<u64> {
        let mut p = Client::connect(addr, tag);
        let alias = p.join(room);
        (0..count)
            .map(|i| p.publish_acked(alias, format!("{tag}-{i}").into_bytes()))
            .collect()
    }

    /// A cluster's first promise: a reader on every node of `nodes` joins `room`, then
    /// publishers on the first two nodes publish `each` messages at once; every PUBACK
    /// gets a distinct sequence, each publisher's rise, and every reader reads the same
    /// messages in the same order, with no hole and no duplicate.
    pub fn one_order_on_every_node(nodes: &[SocketAddr], room: &str, each: usize) {
        let mut readers: Vec<(Client, u32)> = nodes
            .iter()
            .enumerate()
            .map(|(i, &addr)| {
                let mut c = Client::connect(addr, &format!("reader{i}"));
                let alias = c.join(room);
                (c, alias)
            })
            .collect();
        let publisher = |addr: SocketAddr, tag: &'static str| {
            let room = room.to_owned();
            std::thread::spawn(move || Client::publish_all(addr, &room, tag, each))
        };
        let (pa, pb) = (publisher(nodes[0], "alice"), publisher(nodes[1], "bob"));
        let (mut seqs, seqs_b) = (pa.join().unwrap(), pb.join().unwrap());
        for s in [&seqs, &seqs_b] {
            assert!(
                s.windows(2).all(|w| w[0] < w[1]),
                "one publisher's sequences rise"
            );
        }
        seqs.extend(seqs_b);
        seqs.sort_unstable();
        let total = (2 * each) as u64;
        assert_eq!(
            seqs,
            (1..=total).collect::<Vec<_>>(),
            "{room}: distinct sequences"
        );
        let (first, rest) = readers.split_first_mut().expect("a node");
        let order = first.0.read_through(first.1, total);
        for (reader, alias) in rest {
            assert_eq!(
                reader.read_through(*alias, total),
                order,
                "{room}: one order"
            );
        }
    }

    /// Reads until the relay closes the connection, returning every event; panics if it
    /// stays open past [`WAIT`].
    pub fn until_closed(&mut self) -> Vec<Event> {
        let mut events: Vec<Event> = self.queue.drain(..).collect();
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{}: relay did not close the connection",
                self.user
            );
            match self.read_event(left) {
                Some(e) => events.push(e),
                None => {
                    // EOF or reset: make sure it is not just a quiet moment.
                    let mut probe = [0u8; 1];
                    self.stream
                        .set_read_timeout(Some(Duration::from_millis(50)))
                        .unwrap();
                    match self.stream.read(&mut probe) {
                        Ok(0) => return events,
                        Err(e) if e.kind() == ErrorKind::ConnectionReset => return events,
                        Ok(n) => {
                            self.rbuf.extend_from_slice(&probe[..n]);
                        }
                        Err(_) => {}
                    }
                }
            }
        }
    }

    /// The bare socket, blocking without a timeout, for a driver of its own (the benches);
    /// panics if frames the test has not seen are still buffered.
    pub fn into_stream(self) -> TcpStream {
        assert!(
            self.queue.is_empty() && self.rbuf.is_empty(),
            "{}: unread frames would be lost: {:?}",
            self.user,
            self.queue
        );
        self.stream.set_read_timeout(None).unwrap();
        self.stream
    }

    /// Closes the socket abruptly (like a phone losing its link).
    pub fn drop_link(self) -> ClientSession {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.session
    }
}

impl Client {
    /// Connects and sends HELLO with `token`, returning the client before any answer (for
    /// tests that expect a refusal).
    pub fn connect_raw(addr: SocketAddr, user: &str, token: &[u8]) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        Self::hello_over(stream, user, token, ClientSession::new())
    }

    /// Connects with a token (JWT mode) and waits for WELCOME.
    pub fn connect_token(addr: SocketAddr, user: &str, token: &str) -> Client {
        let mut client = Self::connect_raw(addr, user, token.as_bytes());
        match client.next_event(WAIT) {
            Some(Event::Welcome(w)) => client.conn_id = w.conn_id,
            other => panic!("{user}: expected WELCOME, got {other:?}"),
        }
        client
    }
}

/// A client that writes its own HELLO, with whatever resume entries it likes (as an attacker
/// or a buggy client would), and returns every frame the relay sent up to the PONG that
/// answers a PING sent after WELCOME. With one worker, everything the relay sends about the
/// resume comes before that PONG.
pub fn forged_resume(
    addr: SocketAddr,
    user: &str,
    entries: &[pabal_codec::ResumeEntry],
) -> Vec<ServerFrame> {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let hello = ClientFrame::Hello(pabal_codec::Hello {
        version: pabal_codec::PROTOCOL_VERSION,
        heartbeat_secs: 0,
        token: Bytes::copy_from_slice(user.as_bytes()),
        device_id: None,
        resume: pabal_codec::ResumeList::from_entries(entries),
    });
    let mut out = BytesMut::new();
    hello.encode(&mut out);
    stream.write_all(&out).unwrap();
    let decoder = Decoder::new(Limits::default());
    let mut rbuf = BytesMut::new();
    let mut frames = Vec::new();
    let mut pinged = false;
    let deadline = Instant::now() + WAIT;
    loop {
        while let Some(frame) = decoder.decode_server(&mut rbuf).expect("valid frames") {
            match frame {
                ServerFrame::Pong(_) => return frames,
                ServerFrame::Welcome(_) if !pinged => {
                    pinged = true;
                    let mut out = BytesMut::new();
                    ClientFrame::Ping(pabal_codec::Ping::default()).encode(&mut out);
                    stream.write_all(&out).unwrap();
                }
                other => frames.push(other),
            }
        }
        assert!(Instant::now() < deadline, "{user}: no PONG: {frames:?}");
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).expect("read");
        assert!(n > 0, "{user}: closed: {frames:?}");
        rbuf.extend_from_slice(&buf[..n]);
    }
}
