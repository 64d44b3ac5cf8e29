//! Connecting to a Redis without blocking the engine: a host name is resolved on a
//! helper thread ([`Resolver`], which hands the addresses back through a channel and the
//! engine's waker), the socket connects on the engine's mio poll ([`Dial`]: mio's
//! `TcpStream::connect`, then writable, then the socket's error or its peer), and
//! `cluster.connect_timeout` is a deadline the engine's loop checks, not a blocking call.
//! While one shard resolves or connects (or its address drops SYNs), the others' commands
//! and pushes keep flowing.
//!
//! Name resolution: a name is resolved afresh for every dial that starts (at start and at
//! each reconnect), on a thread of its own, at most one per name at a time and at most
//! [`MAX_RESOLVING`] names at once; dials started while it runs take its answer. We chose
//! a helper thread per resolution over resolving once at startup: a shard's host comes
//! from the cluster's slot map at any time (not only at start), and a name that moved (a
//! replaced Redis behind DNS) is found at the next reconnect. An address literal is used
//! as is (no thread). `getaddrinfo` cannot be cancelled: a resolution slower than the
//! deadline fails the dial (the engine backs off), and the next dial of that name waits
//! for the same thread instead of starting another.
//!
//! Owns: the resolver's threads and answers, one connect in progress. Must not touch: what
//! is sent on a connection (its buffers are the caller's), the engine's backoff.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token, Waker};

use super::super::RedisAddr;

/// Names resolved at once; a dial of one more fails (and is retried with backoff).
pub(super) const MAX_RESOLVING: usize = 16;
/// Answers kept (one per name: the seeds and the shards' hosts); past it the oldest go.
const MAX_ANSWERS: usize = 1024;

/// A name's addresses, or why it has none.
type Answer = Result<Vec<IpAddr>, String>;

/// Resolves host names on helper threads without blocking the engine.
pub(crate) struct Resolver {
    waker: Arc<Waker>,
    tx: Sender<(String, Answer)>,
    rx: Receiver<(String, Answer)>,
    /// Names being resolved (one thread each).
    asking: HashSet<String>,
    /// The latest answer per name, with when it came.
    answers: HashMap<String, (Instant, Answer)>,
}

impl Resolver {
    /// A resolver whose threads wake the engine's poll through `waker` when they answer.
    pub(crate) fn new(waker: Arc<Waker>) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Resolver {
            waker,
            tx,
            rx,
            asking: HashSet::new(),
            answers: HashMap::new(),
        }
    }

    /// `host`'s addresses as resolved after `since`: `None` while a helper thread resolves
    /// it (one is started if none runs).
    fn lookup(&mut self, host: &str, since: Instant) -> Option<Answer> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Some(Ok(vec![ip]));
        }
        while let Ok((name, answer)) = self.rx.try_recv() {
            self.asking.remove(&name);
            if self.answers.len() >= MAX_ANSWERS
                && !self.answers.contains_key(&name)
                && let Some(oldest) = self
                    .answers
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(n, _)| n.clone())
            {
                self.answers.remove(&oldest);
            }
            self.answers.insert(name, (Instant::now(), answer));
        }
        if let Some((at, answer)) = self.answers.get(host)
            && *at >= since
        {
            return Some(answer.clone());
        }
        if self.asking.contains(host) {
            return None;
        }
        if self.asking.len() >= MAX_RESOLVING {
            return Some(Err(format!(
                "{MAX_RESOLVING} names are being resolved already"
            )));
        }
        let (name, tx, waker) = (host.to_owned(), self.tx.clone(), self.waker.clone());
        let spawned = std::thread::Builder::new()
            .name("pabal-resolve".into())
            .spawn(move || {
                let answer = (name.as_str(), 0)
                    .to_socket_addrs()
                    .map(|addrs| addrs.map(|a| a.ip()).collect())
                    .map_err(|e| e.to_string());
                // The engine may have stopped meanwhile: nobody to tell.
                if tx.send((name, answer)).is_ok() {
                    let _ = waker.wake();
                }
            });
        match spawned {
            Ok(_) => {
                self.asking.insert(host.to_owned());
                None
            }
            Err(e) => Some(Err(format!("cannot start a resolver thread: {e}"))),
        }
    }
}

/// What a dial came to.
pub(crate) enum Dialed {
    /// Still resolving or connecting (the poll wakes on the socket, the resolver's answer,
    /// or by [`Dial::deadline`]).
    Waiting,
    /// Connected, registered under the dial's token, `TCP_NODELAY` set.
    Connected(TcpStream),
    /// No address of the host took the connection by the deadline.
    Failed(io::Error),
}

/// One connect in progress: the host's addresses tried in turn until one connects or the
/// deadline passes.
pub(crate) struct Dial {
    addr: RedisAddr,
    token: Token,
    started: Instant,
    deadline: Instant,
    /// The host's addresses not tried yet; `None` until resolved.
    ips: Option<VecDeque<SocketAddr>>,
    /// The socket connecting.
    stream: Option<TcpStream>,
    last_error: Option<io::Error>,
}

impl Dial {
    /// Starts dialing `addr` at `now` (nothing happens before [`Dial::advance`]); the
    /// socket is registered as `token`.
    pub(crate) fn new(addr: RedisAddr, token: Token, now: Instant, timeout: Duration) -> Self {
        Dial {
            addr,
            token,
            started: now,
            deadline: now + timeout,
            ips: None,
            stream: None,
            last_error: None,
        }
    }

    /// When the dial gives up.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Moves on as far as the resolver and the socket allow at `now`.
    pub(crate) fn advance(
        &mut self,
        registry: &Registry,
        resolver: &mut Resolver,
        now: Instant,
    ) -> Dialed {
        loop {
            if let Some(stream) = self.stream.as_mut() {
                match connected(stream) {
                    Ok(true) => {
                        let stream = self.stream.take();
                        return match stream.map(|s| s.set_nodelay(true).map(|()| s)) {
                            Some(Ok(s)) => Dialed::Connected(s),
                            Some(Err(e)) => Dialed::Failed(self.named(e)),
                            None => Dialed::Waiting,
                        };
                    }
                    Ok(false) if now < self.deadline => return Dialed::Waiting,
                    Ok(false) => {
                        let e = io::Error::new(
                            io::ErrorKind::TimedOut,
                            "not connected within cluster.connect_timeout",
                        );
                        self.close(registry);
                        return Dialed::Failed(self.named(e));
                    }
                    Err(e) => {
                        self.close(registry);
                        self.last_error = Some(e);
                    }
                }
            }
            if now >= self.deadline {
                let e = self.last_error.take().unwrap_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        "not resolved within cluster.connect_timeout",
                    )
                });
                return Dialed::Failed(self.named(e));
            }
            let ips = match self.ips.as_mut() {
                Some(ips) => ips,
                None => match resolver.lookup(&self.addr.host, self.started) {
                    None => return Dialed::Waiting,
                    Some(Err(e)) => return Dialed::Failed(self.named(io::Error::other(e))),
                    Some(Ok(ips)) => {
                        let port = self.addr.port;
                        self.ips
                            .insert(ips.into_iter().map(|ip| (ip, port).into()).collect())
                    }
                },
            };
            let Some(ip) = ips.pop_front() else {
                let e = self
                    .last_error
                    .take()
                    .unwrap_or_else(|| io::Error::other("the address resolves to nothing"));
                return Dialed::Failed(self.named(e));
            };
            let token = self.token;
            match TcpStream::connect(ip).and_then(|mut s| {
                registry.register(&mut s, token, Interest::READABLE | Interest::WRITABLE)?;
                Ok(s)
            }) {
                Ok(s) => self.stream = Some(s),
                Err(e) => self.last_error = Some(e),
            }
        }
    }

    /// Registers the socket connecting (if any) under `token` from now on.
    pub(crate) fn reregister(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        self.token = token;
        match self.stream.as_mut() {
            Some(s) => registry.reregister(s, token, Interest::READABLE | Interest::WRITABLE),
            None => Ok(()),
        }
    }

    /// Gives the socket connecting up.
    pub(crate) fn close(&mut self, registry: &Registry) {
        if let Some(mut s) = self.stream.take() {
            let _ = registry.deregister(&mut s);
        }
    }

    fn named(&self, e: io::Error) -> io::Error {
        io::Error::new(e.kind(), format!("{}: {e}", self.addr))
    }
}

/// Whether a socket mio connects has its peer: mio's documented way to tell, once it is
/// writable (`take_error` first: a refused connect has no peer either).
fn connected(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests
mod tests {
    use super::*;
    use mio::{Events, Poll};

    /// Dials until it comes to something other than waiting (the poll wakes on the socket
    /// or the resolver's answer).
    fn dial_through(poll: &mut Poll, resolver: &mut Resolver, dial: &mut Dial) -> Dialed {
        let mut events = Events::with_capacity(8);
        loop {
            match dial.advance(poll.registry(), resolver, Instant::now()) {
                Dialed::Waiting => {
                    poll.poll(&mut events, Some(Duration::from_millis(50)))
                        .unwrap();
                }
                done => return done,
            }
        }
    }

    #[test]
    fn a_name_is_resolved_on_a_helper_thread_and_connected() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
        let mut resolver = Resolver::new(waker);
        let addr = RedisAddr {
            host: "localhost".into(),
            port,
        };
        let mut dial = Dial::new(addr, Token(1), Instant::now(), Duration::from_secs(20));
        // The name is not resolved on this thread: the first step only asks for it.
        assert!(matches!(
            dial.advance(poll.registry(), &mut resolver, Instant::now()),
            Dialed::Waiting
        ));
        assert!(resolver.asking.contains("localhost"));
        match dial_through(&mut poll, &mut resolver, &mut dial) {
            Dialed::Connected(s) => assert_eq!(s.peer_addr().unwrap().port(), port),
            Dialed::Failed(e) => panic!("{e}"),
            Dialed::Waiting => unreachable!(),
        }
        assert!(resolver.asking.is_empty());
    }

    #[test]
    fn a_refused_connect_fails_and_an_address_that_drops_syns_fails_by_its_deadline() {
        let mut poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
        let mut resolver = Resolver::new(waker);
        // Nothing listens on port 1.
        let closed = RedisAddr {
            host: "127.0.0.1".into(),
            port: 1,
        };
        let mut dial = Dial::new(closed, Token(1), Instant::now(), Duration::from_secs(20));
        match dial_through(&mut poll, &mut resolver, &mut dial) {
            Dialed::Failed(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
            _ => panic!("connected to a closed port"),
        }
        // Past its deadline a dial still connecting gives up (the engine's loop calls
        // `advance` at the deadline: no blocking call waits for it).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = RedisAddr {
            host: "127.0.0.1".into(),
            port: listener.local_addr().unwrap().port(),
        };
        let start = Instant::now();
        let mut dial = Dial::new(open, Token(1), start, Duration::from_secs(1));
        let late = start + Duration::from_secs(2);
        match dial.advance(poll.registry(), &mut resolver, late) {
            Dialed::Failed(e) => assert_eq!(e.kind(), io::ErrorKind::TimedOut),
            _ => panic!("a dial past its deadline must fail"),
        }
    }
}
