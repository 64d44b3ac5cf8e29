//! TLS 1.3 for the phone listener and the WebSocket listener (wss), over rustls's buffered
//! API driven by the worker's own reads and writes: no second runtime, no thread.
//!
//! - **Certificates** come from `[tls] cert_file` and `key_file`. [`load_certified_key`]
//!   refuses a missing, unreadable or malformed file, a certificate that has expired or is
//!   not valid yet, and a key that does not match the certificate, naming the field; it runs
//!   at start, in `--check-config` and on every SIGHUP. A reload swaps the certificate in
//!   [`ReloadableCert`]: handshakes that start afterwards use the new one, connections
//!   already open keep theirs (nothing is dropped).
//! - **ALPN** `pabal/1`; a client that offers ALPN without it is refused in the handshake.
//! - **Resumption** is stateful: the relay keeps sessions in one memory cache shared by every
//!   worker (a phone's reconnect lands on any worker) and sends `tls.tickets_per_handshake`
//!   tickets naming them. Each ticket resumes **once** (the cache hands a session out and
//!   forgets it), which is rustls's condition for accepting early data.
//! - **0-RTT** (`tls.max_early_data` > 0): a resumed client may send its HELLO in the first
//!   flight. [`EarlyDataGate`] lets exactly one frame through, and only a HELLO; any other
//!   frame, or anything after the HELLO, in early data ends the connection with a fatal ERROR.
//!   Anti-replay: tickets are single use within this process, so a captured first flight
//!   cannot be replayed against the same relay process; across restarts (the cache is lost)
//!   it falls back to a full handshake. And a replayed HELLO is harmless: it changes no state
//!   but the connection's own (it authenticates, binds aliases and resumes delivery on that
//!   connection, which the replayer cannot decrypt); no PUBLISH, SUBSCRIBE or ACK may ride
//!   in early data, so nothing that changes rooms can be replayed.
//! - **Half-RTT**: the relay answers a 0-RTT HELLO (WELCOME, then the missed messages) right
//!   after its own Finished, so a resume costs one round trip after TCP.
//!
//! Owns: certificate loading and validation, the rustls server configuration, one
//! connection's [`TlsLayer`]. Must not touch: sockets, the protocol beyond the early-data
//! rule (that is the core's), other connections.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

use crate::config::TlsConfig;

/// The one application protocol the relay speaks over TLS.
pub const ALPN: &[u8] = b"pabal/1";

/// Why a certificate or key was refused.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CertError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The field naming the file.
        field: &'static str,
        /// The path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not what it should be (no PEM certificate, no key, bad DER).
    #[error("{path}: {why}")]
    Malformed {
        /// The field naming the file.
        field: &'static str,
        /// The path.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The certificate is outside its validity period.
    #[error("{path}: the certificate {why}")]
    Validity {
        /// The path.
        path: String,
        /// Expired when, or valid from when.
        why: String,
    },
    /// The key is not the certificate's.
    #[error("{path}: the key does not match the certificate in tls.cert_file: {why}")]
    Mismatch {
        /// The key file.
        path: String,
        /// rustls's words.
        why: String,
    },
}

impl CertError {
    /// The configuration field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            CertError::Read { field, .. } | CertError::Malformed { field, .. } => field,
            CertError::Validity { .. } => "tls.cert_file",
            CertError::Mismatch { .. } => "tls.key_file",
        }
    }
}

fn read_file(field: &'static str, path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        field,
        path: path.display().to_string(),
        source,
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks a certificate chain and its key as of `now`: readable, PEM, the leaf
/// within its validity period, the key matching the leaf.
pub fn load_certified_key(
    cert_file: &Path,
    key_file: &Path,
    now: SystemTime,
) -> Result<CertifiedKey, CertError> {
    let cert_path = cert_file.display().to_string();
    let key_path = key_file.display().to_string();
    let pem = read_file("tls.cert_file", cert_file)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Malformed {
            field: "tls.cert_file",
            path: cert_path.clone(),
            why: format!("not a PEM certificate chain: {e}"),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::Malformed {
            field: "tls.cert_file",
            path: cert_path,
            why: "holds no certificate".into(),
        });
    };
    check_validity(leaf, &cert_path, now)?;
    let key_pem = read_file("tls.key_file", key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| CertError::Malformed {
        field: "tls.key_file",
        path: key_path.clone(),
        why: format!("no PEM private key: {e}"),
    })?;
    let signing =
        provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| CertError::Malformed {
                field: "tls.key_file",
                path: key_path.clone(),
                why: format!("unusable private key: {e}"),
            })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| CertError::Mismatch {
        path: key_path,
        why: e.to_string(),
    })?;
    Ok(certified)
}

fn check_validity(leaf: &CertificateDer<'_>, path: &str, now: SystemTime) -> Result<(), CertError> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(leaf).map_err(|e| CertError::Malformed {
        field: "tls.cert_file",
        path: path.to_string(),
        why: format!("the first certificate does not parse: {e}"),
    })?;
    let validity = &cert.tbs_certificate.validity;
    let not_after = SystemTime::UNIX_EPOCH + validity.not_after.to_unix_duration();
    let not_before = SystemTime::UNIX_EPOCH + validity.not_before.to_unix_duration();
    if now > not_after {
        return Err(CertError::Validity {
            path: path.to_string(),
            why: format!("expired at {}", validity.not_after),
        });
    }
    if now < not_before {
        return Err(CertError::Validity {
            path: path.to_string(),
            why: format!("is not valid before {}", validity.not_before),
        });
    }
    Ok(())
}

/// The server certificate, swapped by a reload; read once per handshake.
#[derive(Debug)]
pub struct ReloadableCert {
    current: parking_lot::RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// What every worker shares for TLS: one rustls configuration (so a session made on one
/// worker resumes on any other) and the reloadable certificate.
#[derive(Debug)]
pub struct TlsShared {
    config: Arc<ServerConfig>,
    cert: Arc<ReloadableCert>,
}

/// Why TLS could not be set up.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    /// `[tls]` has no certificate.
    #[error("[tls] needs cert_file and key_file")]
    NotConfigured,
    /// The certificate or key was refused.
    #[error("`{}`: {}", .0.field(), .0)]
    Cert(#[from] CertError),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsShared {
    /// Loads the certificate and builds the server configuration.
    pub fn new(config: &TlsConfig) -> Result<TlsShared, TlsSetupError> {
        let certified = Self::load(config)?;
        let cert = Arc::new(ReloadableCert {
            current: parking_lot::RwLock::new(Arc::new(certified)),
        });
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
        server.alpn_protocols = vec![ALPN.to_vec()];
        // Stateful, single-use resumption: rustls accepts early data only this way.
        server.session_storage = ServerSessionMemoryCache::new(config.session_cache.max(1));
        server.send_tls13_tickets = config.tickets_per_handshake;
        server.max_early_data_size = config.max_early_data;
        server.send_half_rtt_data = true;
        Ok(TlsShared {
            config: Arc::new(server),
            cert,
        })
    }

    fn load(config: &TlsConfig) -> Result<CertifiedKey, TlsSetupError> {
        let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) else {
            return Err(TlsSetupError::NotConfigured);
        };
        Ok(load_certified_key(cert, key, SystemTime::now())?)
    }

    /// Re-reads the certificate and key (SIGHUP): new handshakes use them, open connections
    /// are untouched. On error nothing changes.
    pub fn reload(&self, config: &TlsConfig) -> Result<(), TlsSetupError> {
        let certified = Self::load(config)?;
        *self.cert.current.write() = Arc::new(certified);
        Ok(())
    }

    /// A layer for one new connection.
    pub fn accept(&self) -> Result<TlsLayer, rustls::Error> {
        let mut conn = ServerConnection::new(self.config.clone())?;
        // The core bounds what it hands over (one batch in flight, capped queue); rustls
        // must take all of it.
        conn.set_buffer_limit(None);
        let early = if self.config.max_early_data_size > 0 {
            EarlyDataGate::Open(FrameStart::default())
        } else {
            EarlyDataGate::Closed
        };
        Ok(TlsLayer { conn, early })
    }
}

/// Why a TLS connection must end.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsLayerError {
    /// The peer broke TLS (bad record, failed handshake, ...); an alert is queued.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// Early data held something other than one HELLO.
    #[error("{0}")]
    EarlyData(&'static str),
}

/// The first bytes of the early-data stream, enough to know the first frame's type and end.
#[derive(Debug, Default)]
struct FrameStart {
    head: [u8; 11],
    len: usize,
    /// Bytes seen so far.
    seen: u64,
}

/// The rule for 0-RTT: one HELLO and nothing else.
#[derive(Debug)]
enum EarlyDataGate {
    /// Early data disabled (rustls refuses it; nothing to check).
    Closed,
    /// Checking.
    Open(FrameStart),
}

/// The type byte of HELLO (PROTOCOL.md §7).
const HELLO_TYPE: u8 = 0x01;

impl EarlyDataGate {
    /// Checks the next early-data bytes.
    fn check(&mut self, bytes: &[u8]) -> Result<(), TlsLayerError> {
        let EarlyDataGate::Open(start) = self else {
            return Err(TlsLayerError::EarlyData("early data is not accepted"));
        };
        let take = (start.head.len() - start.len).min(bytes.len());
        start.head[start.len..start.len + take].copy_from_slice(&bytes[..take]);
        start.len += take;
        start.seen += bytes.len() as u64;
        let head = &start.head[..start.len];
        let (body, header) = match pabal_codec::varint::get_u64(head) {
            Ok(pabal_codec::varint::Partial::Done(body, header)) => (body, header),
            Ok(pabal_codec::varint::Partial::NeedMore) => return Ok(()),
            Err(_) => return Err(TlsLayerError::EarlyData("malformed frame in early data")),
        };
        if head.len() > header && head[header] & 0x1f != HELLO_TYPE {
            return Err(TlsLayerError::EarlyData(
                "only HELLO may travel in TLS early data (0-RTT)",
            ));
        }
        if start.seen > (header as u64).saturating_add(body) {
            return Err(TlsLayerError::EarlyData(
                "nothing but one HELLO may travel in TLS early data (0-RTT)",
            ));
        }
        Ok(())
    }
}

/// One connection's TLS: socket bytes in, plaintext out, and back.
#[derive(Debug)]
pub struct TlsLayer {
    conn: ServerConnection,
    early: EarlyDataGate,
}

/// What a call to [`TlsLayer::input`] found besides plaintext.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsInput {
    /// The peer sent close_notify: no more plaintext will come.
    pub peer_closed: bool,
}

impl TlsLayer {
    /// Feeds socket bytes; appends the plaintext (early data first, checked by the 0-RTT
    /// rule) to `plain`. On error an alert may be queued: call [`TlsLayer::drain`] to send it.
    pub fn input(
        &mut self,
        mut data: &[u8],
        plain: &mut Vec<u8>,
    ) -> Result<TlsInput, TlsLayerError> {
        let mut input = TlsInput::default();
        while !data.is_empty() {
            match self.conn.read_tls(&mut data) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    return Err(TlsLayerError::Tls(rustls::Error::General(format!(
                        "read_tls: {e}"
                    ))));
                }
            }
            let state = self.conn.process_new_packets()?;
            if let Some(mut early) = self.conn.early_data() {
                let start = plain.len();
                read_all(&mut early, plain);
                self.early.check(&plain[start..])?;
            }
            if state.plaintext_bytes_to_read() > 0 {
                read_all(&mut self.conn.reader(), plain);
            }
            if state.peer_has_closed() {
                input.peer_closed = true;
                break;
            }
        }
        Ok(input)
    }

    /// Encrypts plaintext for the peer (buffered by rustls until the handshake allows it).
    pub fn write(&mut self, plain: &[u8]) {
        // The buffer limit is off: rustls takes everything.
        if let Err(e) = self.conn.writer().write_all(plain) {
            tracing::debug!(error = %e, "TLS writer refused plaintext");
        }
    }

    /// Queues close_notify.
    pub fn close(&mut self) {
        self.conn.send_close_notify();
    }

    /// Moves the TLS records ready for the socket into `wire`, split off `scratch` (a
    /// per-worker buffer, so an idle connection keeps none).
    pub fn drain(&mut self, scratch: &mut BytesMut, wire: &mut VecDeque<Bytes>) {
        while self.conn.wants_write() {
            let mut w = BytesWriter(scratch);
            match self.conn.write_tls(&mut w) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        if !scratch.is_empty() {
            wire.push_back(scratch.split().freeze());
        }
    }
}

fn read_all(reader: &mut impl Read, out: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    loop {
        match reader.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
}

struct BytesWriter<'a>(&'a mut BytesMut);

impl Write for BytesWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let mut n = 0;
        for b in bufs {
            self.0.extend_from_slice(b);
            n += b.len();
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose
mod tests {
    use super::*;
    use bytes::BytesMut;
    use pabal_codec::{ClientFrame, Hello, PROTOCOL_VERSION, Ping, ResumeList};

    fn encoded(frames: &[ClientFrame]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        for f in frames {
            f.encode(&mut buf);
        }
        buf.to_vec()
    }

    fn hello() -> ClientFrame {
        ClientFrame::Hello(Hello {
            version: PROTOCOL_VERSION,
            heartbeat_secs: 0,
            token: Bytes::from_static(b"alice"),
            device_id: None,
            resume: ResumeList::from_entries(&[]),
        })
    }

    fn gate() -> EarlyDataGate {
        EarlyDataGate::Open(FrameStart::default())
    }

    #[test]
    fn early_data_passes_one_hello_in_any_split() {
        let bytes = encoded(&[hello()]);
        for cut in 0..=bytes.len() {
            let mut g = gate();
            g.check(&bytes[..cut]).unwrap();
            g.check(&bytes[cut..]).unwrap();
        }
    }

    #[test]
    fn early_data_refuses_anything_but_hello() {
        let ping = encoded(&[ClientFrame::Ping(Ping::default())]);
        assert!(gate().check(&ping).is_err(), "a PING first is refused");
        let two = encoded(&[hello(), ClientFrame::Ping(Ping::default())]);
        for cut in 0..=two.len() {
            let mut g = gate();
            let r = g.check(&two[..cut]).and_then(|()| g.check(&two[cut..]));
            assert!(
                r.is_err(),
                "anything after the HELLO is refused (cut {cut})"
            );
        }
        assert!(
            EarlyDataGate::Closed.check(&encoded(&[hello()])).is_err(),
            "closed gate"
        );
    }
}
