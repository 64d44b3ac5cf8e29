//! A TCP address that drops every SYN, as a host whose packets are blackholed: a
//! listening socket (backlog 0) whose accept queue is filled and never accepted, so a
//! connect to it is neither taken nor refused, only left waiting. For tests of what a
//! connect in progress must not hold up.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

/// The blackholed address; connects to it wait until it is dropped.
#[derive(Debug)]
pub struct Blackhole {
    /// The port on 127.0.0.1.
    pub port: u16,
    _listener: Socket,
    /// The connections filling the accept queue.
    _fillers: Vec<TcpStream>,
}

impl Blackhole {
    /// Binds 127.0.0.1 on a free port and fills its accept queue; panics if a connect is
    /// still taken after that.
    pub fn start() -> Blackhole {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("a socket");
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        listener.bind(&any.into()).expect("bind");
        listener.listen(0).expect("listen");
        let addr = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("a local address");
        let mut fillers = Vec::new();
        // The kernel takes connections into the queue until it is full, then drops SYNs:
        // the first connect that times out proves the address blackholed.
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(c) => fillers.push(c),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break,
                Err(e) => panic!("filling the accept queue: {e}"),
            }
            assert!(fillers.len() < 64, "the accept queue never filled");
        }
        Blackhole {
            port: addr.port(),
            _listener: listener,
            _fillers: fillers,
        }
    }
}
