//! One connection to the relay: plain TCP or TLS 1.3, with the HELLO in the first flight
//! (0-RTT) when a resumable session allows it.
//!
//! Owns: the socket and its TLS state. Must not touch: the protocol (the caller encodes the
//! HELLO), reconnect policy.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, RootCertStore, StreamOwned};

use crate::ClientError;

/// The one application protocol the relay speaks over TLS.
pub const ALPN: &[u8] = b"pabal/1";

/// How to speak TLS to the relay. Keep one per relay and reuse it: its session cache is
/// what makes the next connection a resumption (and its HELLO 0-RTT).
#[derive(Debug, Clone)]
pub struct TlsOptions {
    /// rustls's client configuration (its `resumption` store holds the tickets).
    pub config: Arc<rustls::ClientConfig>,
    /// The name the certificate must carry.
    pub server_name: ServerName<'static>,
    /// Send the HELLO as TLS early data on a resumed connection. Default true.
    pub early_data: bool,
}

impl TlsOptions {
    /// TLS 1.3 to a relay whose certificate chains to one of `roots`, ALPN `pabal/1`,
    /// resumption and early data on.
    pub fn new(roots: RootCertStore, server_name: &str) -> Result<TlsOptions, ClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(ClientError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.enable_early_data = true;
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| ClientError::Config(format!("server name `{server_name}`: {e}")))?;
        Ok(TlsOptions {
            config: Arc::new(config),
            server_name,
            early_data: true,
        })
    }
}

/// An open connection.
#[derive(Debug)]
pub(crate) enum Link {
    Tcp(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

/// What opening a link did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Opened {
    /// The HELLO travelled as early data and the relay took it.
    pub early_data: bool,
    /// The TLS session was resumed.
    pub resumed: bool,
}

impl Link {
    /// Connects and sends `hello` (in the first flight where TLS early data allows).
    pub(crate) fn open(
        addr: SocketAddr,
        tls: Option<&TlsOptions>,
        hello: &[u8],
        timeout: Duration,
    ) -> Result<(Link, Opened), ClientError> {
        let mut tcp = TcpStream::connect_timeout(&addr, timeout).map_err(ClientError::Io)?;
        tcp.set_nodelay(true).map_err(ClientError::Io)?;
        tcp.set_read_timeout(Some(timeout))
            .map_err(ClientError::Io)?;
        tcp.set_write_timeout(Some(timeout))
            .map_err(ClientError::Io)?;
        let Some(tls) = tls else {
            tcp.write_all(hello).map_err(ClientError::Io)?;
            let opened = Opened {
                early_data: false,
                resumed: false,
            };
            return Ok((Link::Tcp(tcp), opened));
        };
        let mut conn = ClientConnection::new(tls.config.clone(), tls.server_name.clone())
            .map_err(ClientError::Tls)?;
        let mut early_sent = false;
        if tls.early_data
            && let Some(mut early) = conn.early_data()
            && early.bytes_left() >= hello.len()
        {
            early.write_all(hello).map_err(ClientError::Io)?;
            early_sent = true;
        }
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).map_err(handshake_error)?;
        }
        let early_data = early_sent && conn.is_early_data_accepted();
        if !early_data {
            conn.writer().write_all(hello).map_err(ClientError::Io)?;
        }
        let resumed = matches!(conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
        let mut stream = StreamOwned::new(conn, tcp);
        stream.flush().map_err(ClientError::Io)?;
        Ok((
            Link::Tls(Box::new(stream)),
            Opened {
                early_data,
                resumed,
            },
        ))
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Link::Tcp(s) => s,
            Link::Tls(s) => &s.sock,
        }
    }

    /// Sets the read timeout of the socket.
    pub(crate) fn set_read_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.tcp()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
    }

    /// Ends the connection abruptly (both directions).
    pub(crate) fn cut(&self) {
        let _ = self.tcp().shutdown(std::net::Shutdown::Both);
    }
}

fn handshake_error(e: io::Error) -> ClientError {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => ClientError::Tls(tls.clone()),
        None => ClientError::Io(e),
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => s.read(buf),
            Link::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => s.write(buf),
            Link::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Link::Tcp(s) => s.flush(),
            Link::Tls(s) => s.flush(),
        }
    }
}
