//! TLS 1.3 for the phone listener and the WebSocket listener (wss), over rustls's unbuffered
//! API driven by the worker's own reads and writes: no second runtime, no thread. Records
//! are decrypted in a per-worker scratch buffer and encoded into a buffer the next drain
//! hands to the backend whole, so an idle connection keeps no TLS buffer (the buffered API
//! kept a 4 KB receive buffer per connection); only a record a read cut in two waits with
//! its connection.
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
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{
    ClientHello, ResolvesServerCert, ServerConnectionData, ServerSessionMemoryCache,
    UnbufferedServerConnection,
};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, UnbufferedStatus, WriteTraffic,
};
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
        let conn = UnbufferedServerConnection::new(self.config.clone())?;
        let early = if self.config.max_early_data_size > 0 {
            EarlyDataGate::Open(FrameStart::default())
        } else {
            EarlyDataGate::Closed
        };
        Ok(TlsLayer {
            conn,
            early,
            progress: Progress::default(),
            partial: Vec::new(),
            pending: Vec::new(),
            out: Vec::new(),
            close: Close::Not,
        })
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

/// One connection's TLS: socket bytes in, plaintext out, and back, over rustls's unbuffered
/// API: records are decrypted in the worker's scratch and encoded into a buffer the next
/// drain hands over whole, so an idle connection keeps no buffer (only a record a read cut).
pub struct TlsLayer {
    conn: UnbufferedServerConnection,
    early: EarlyDataGate,
    progress: Progress,
    /// The start of a record the last read cut (empty otherwise).
    partial: Vec<u8>,
    /// Plaintext from the core that rustls may not encrypt yet (during the handshake).
    pending: Vec<u8>,
    /// Records for the socket, until the next drain.
    out: Vec<u8>,
    close: Close,
}

impl std::fmt::Debug for TlsLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsLayer")
            .field("handshaking", &self.conn.is_handshaking())
            .field("early", &self.early)
            .field("progress", &self.progress)
            .field("partial", &self.partial.len())
            .field("pending", &self.pending.len())
            .field("out", &self.out.len())
            .finish()
    }
}

/// close_notify: not asked for, asked for (sent once rustls may), sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    Not,
    Requested,
    Sent,
}

/// What the layer has already reported (each outcome once per connection).
#[derive(Debug, Default)]
struct Progress {
    /// Whether the ClientHello offers early data, once known.
    hello: HelloScan,
    /// rustls accepted early data on this connection.
    early_accepted: bool,
    /// The early-data outcome was reported.
    early_reported: bool,
    /// The handshake's completion was reported.
    handshake_reported: bool,
    /// rustls failed (its error was reported): nothing more goes in or out but its alert.
    failed: bool,
    /// Early data broke the 0-RTT rule: nothing more is read; the refusal still goes out.
    refused: bool,
}

/// What the relay decided about the client's 0-RTT early data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyData {
    /// Taken (a resumed session, a fresh single-use ticket).
    Accepted,
    /// Offered and skipped: the ticket is unknown or already used (a replay), or the
    /// client asked for more than `tls.max_early_data`.
    Rejected,
}

/// A completed handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handshake {
    /// It resumed a session from a ticket.
    pub resumed: bool,
}

/// What a call to [`TlsLayer::input`] found besides plaintext.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsInput {
    /// The peer sent close_notify: no more plaintext will come.
    pub peer_closed: bool,
    /// The handshake completed during this call.
    pub handshake: Option<Handshake>,
    /// The relay decided about offered early data during this call.
    pub early_data: Option<EarlyData>,
}

/// Why a handshake failed, as `pabal_tls_handshake_failures_total` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The client offered ALPN without `pabal/1`.
    Alpn,
    /// The peer sent an alert.
    PeerAlert,
    /// A malformed, unexpected or undecryptable message.
    BadMessage,
    /// Nothing in common: versions, cipher suites, key exchange groups.
    Incompatible,
    /// Anything else rustls reports.
    Other,
}

impl HandshakeFailure {
    /// Classifies a rustls error.
    pub fn of(e: &rustls::Error) -> HandshakeFailure {
        use rustls::Error as E;
        match e {
            E::NoApplicationProtocol => HandshakeFailure::Alpn,
            E::AlertReceived(_) => HandshakeFailure::PeerAlert,
            E::InvalidMessage(_)
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. }
            | E::PeerMisbehaved(_)
            | E::DecryptError
            | E::PeerSentOversizedRecord => HandshakeFailure::BadMessage,
            E::PeerIncompatible(_) => HandshakeFailure::Incompatible,
            _ => HandshakeFailure::Other,
        }
    }
}

/// Whether the client's ClientHello offers early data, read from the first record.
#[derive(Debug, Default)]
enum HelloScan {
    /// Nothing seen yet.
    #[default]
    Empty,
    /// The first record arrived in pieces: kept until whole (at most one record, 16 KiB
    /// plus its header; only during the handshake, and only when the peer splits it).
    Partial(Vec<u8>),
    /// Known.
    Done {
        /// The `early_data` extension is present.
        offered: bool,
    },
}

/// The largest TLS record: a 5-byte header and 2^14 + 256 bytes of fragment (RFC 8446 5.2).
const MAX_RECORD: usize = 5 + (1 << 14) + 256;

/// The `early_data` extension's type (RFC 8446 4.2).
const EXT_EARLY_DATA: u16 = 42;

/// Whether the ClientHello at the start of `wire` carries the `early_data` extension:
/// `None` while the first record is incomplete, `Some(false)` for anything malformed or
/// not a ClientHello (rustls refuses those itself).
fn client_hello_offers_early_data(wire: &[u8]) -> Option<bool> {
    let header = wire.get(..5)?;
    if header[0] != 0x16 {
        return Some(false);
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    let record = wire.get(5..5 + len)?;
    Some(scan_client_hello(record).unwrap_or(false))
}

/// Walks a ClientHello handshake message to its extensions (`None`: malformed or cut).
fn scan_client_hello(msg: &[u8]) -> Option<bool> {
    let mut r = Reader(msg);
    if r.take(1)?[0] != 0x01 {
        return None; // not a ClientHello
    }
    r.take(3)?; // length
    r.take(2 + 32)?; // legacy_version, random
    let session_id = usize::from(r.take(1)?[0]);
    r.take(session_id)?;
    let suites = r.u16()?;
    r.take(suites)?;
    let compression = usize::from(r.take(1)?[0]);
    r.take(compression)?;
    let exts_len = r.u16()?;
    let mut exts = Reader(r.take(exts_len)?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let len = exts.u16()?;
        exts.take(len)?;
        if ty == usize::from(EXT_EARLY_DATA) {
            return Some(true);
        }
    }
    Some(false)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<usize> {
        let b = self.take(2)?;
        Some(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
}

impl HelloScan {
    /// Looks at the next socket bytes (until the answer is known).
    fn feed(&mut self, data: &[u8]) {
        let verdict = match self {
            HelloScan::Done { .. } => return,
            HelloScan::Empty => client_hello_offers_early_data(data).ok_or(data),
            HelloScan::Partial(buf) => {
                let room = MAX_RECORD.saturating_sub(buf.len());
                buf.extend_from_slice(&data[..room.min(data.len())]);
                match client_hello_offers_early_data(buf) {
                    Some(v) => Ok(v),
                    None if buf.len() >= MAX_RECORD => Ok(false),
                    None => return,
                }
            }
        };
        *self = match verdict {
            Ok(offered) => HelloScan::Done { offered },
            Err(first) => HelloScan::Partial(first.to_vec()),
        };
    }

    fn offered(&self) -> bool {
        matches!(self, HelloScan::Done { offered: true })
    }
}

impl TlsLayer {
    /// Feeds socket bytes; appends the plaintext (early data first, checked by the 0-RTT
    /// rule) to `plain` and what happened besides to `input` (filled on error too).
    /// `scratch` is the worker's: records are decrypted in it, and only a record cut by the
    /// read stays with the connection. On error an alert may be queued: call
    /// [`TlsLayer::drain`] to send it.
    pub fn input(
        &mut self,
        data: &[u8],
        plain: &mut Vec<u8>,
        input: &mut TlsInput,
        scratch: &mut Vec<u8>,
    ) -> Result<(), TlsLayerError> {
        if self.progress.failed || self.progress.refused {
            return Ok(());
        }
        if self.conn.is_handshaking() {
            self.progress.hello.feed(data);
        }
        scratch.clear();
        scratch.extend_from_slice(&self.partial);
        scratch.extend_from_slice(data);
        self.partial = Vec::new();
        let result = self.pump(scratch, plain, input);
        match &result {
            Err(TlsLayerError::EarlyData(_)) => self.progress.refused = true,
            Err(TlsLayerError::Tls(_)) => {
                self.progress.failed = true;
                // The alert rustls queued, if any.
                let _ = self.pump(&mut [], &mut Vec::new(), &mut TlsInput::default());
            }
            Ok(()) => {}
        }
        result
    }

    /// Drives rustls over `incoming` until it needs more bytes: decrypts, encodes the
    /// handshake's records and the plaintext waiting in `pending` into `out`. Keeps a cut
    /// record in `partial`.
    fn pump(
        &mut self,
        incoming: &mut [u8],
        plain: &mut Vec<u8>,
        input: &mut TlsInput,
    ) -> Result<(), TlsLayerError> {
        let mut offset = 0;
        let result = loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut incoming[offset..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => break Err(TlsLayerError::Tls(e)),
            };
            let mut idle = false;
            match state {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(record) = r.next_record() {
                        let record = record?;
                        discard += record.discard;
                        plain.extend_from_slice(record.payload);
                    }
                }
                ConnectionState::ReadEarlyData(mut r) => {
                    let start = plain.len();
                    while let Some(record) = r.next_record() {
                        let record = record?;
                        discard += record.discard;
                        plain.extend_from_slice(record.payload);
                    }
                    if !self.progress.early_reported {
                        self.progress.early_reported = true;
                        self.progress.early_accepted = true;
                        input.early_data = Some(EarlyData::Accepted);
                    }
                    offset += discard;
                    if let Err(e) = self.early.check(&plain[start..]) {
                        break Err(e);
                    }
                    continue;
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    encode_into(&mut self.out, |buf| match e.encode(buf) {
                        Ok(n) => Ok(n),
                        Err(EncodeError::InsufficientSize(s)) => Err(Some(s.required_size)),
                        Err(_) => Err(None),
                    });
                }
                ConnectionState::TransmitTlsData(mut t) => {
                    if let Some(mut w) = t.may_encrypt_app_data() {
                        pending_out(&mut self.pending, &mut self.out, &mut self.close, &mut w);
                    }
                    t.done();
                }
                ConnectionState::WriteTraffic(mut w) => {
                    pending_out(&mut self.pending, &mut self.out, &mut self.close, &mut w);
                    idle = true;
                }
                ConnectionState::PeerClosed => input.peer_closed = true,
                ConnectionState::Closed => {
                    input.peer_closed = true;
                    idle = true;
                }
                _ => idle = true, // BlockedHandshake: more bytes needed
            }
            offset += discard;
            if idle {
                break Ok(());
            }
        };
        self.note_progress(input);
        if offset < incoming.len() && result.is_ok() {
            self.partial = incoming[offset..].to_vec();
        }
        result
    }

    /// Reports the handshake's completion, and the early data a completed handshake did not
    /// take, each once.
    fn note_progress(&mut self, input: &mut TlsInput) {
        let p = &mut self.progress;
        if p.handshake_reported || self.conn.is_handshaking() {
            return;
        }
        p.handshake_reported = true;
        if p.hello.offered() && !p.early_reported {
            p.early_reported = true;
            input.early_data = Some(EarlyData::Rejected);
        }
        p.hello = HelloScan::Done {
            offered: p.hello.offered(),
        };
        input.handshake = Some(Handshake {
            resumed: self.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        });
    }

    /// The handshake is still under way and has not failed: a connection ending now ends
    /// an incomplete handshake.
    pub fn handshake_pending(&self) -> bool {
        self.conn.is_handshaking() && !self.progress.failed && !self.progress.refused
    }

    /// The client offered early data and the connection ends before the relay took it (a
    /// replayed first flight whose ticket was used ends this way).
    pub fn early_data_unanswered(&self) -> bool {
        self.progress.hello.offered() && !self.progress.early_reported
    }

    /// Whether the handshake is still under way (a failure now is a handshake failure).
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Encrypts plaintext for the peer (kept until the handshake allows it).
    pub fn write(&mut self, plain: &[u8]) {
        self.pending.extend_from_slice(plain);
        self.flush_pending();
    }

    /// Queues close_notify (sent once the handshake allows it).
    pub fn close(&mut self) {
        if self.close == Close::Not {
            self.close = Close::Requested;
        }
        self.flush_pending();
    }

    fn flush_pending(&mut self) {
        if self.progress.failed {
            return;
        }
        let partial = std::mem::take(&mut self.partial);
        let mut none: [u8; 0] = [];
        if let Err(e) = self.pump(&mut none, &mut Vec::new(), &mut TlsInput::default()) {
            tracing::debug!(error = %e, "TLS refused to encrypt");
        }
        self.partial = partial;
    }

    /// Moves the TLS records ready for the socket into `wire` (the connection keeps no
    /// buffer afterwards).
    pub fn drain(&mut self, _scratch: &mut BytesMut, wire: &mut VecDeque<Bytes>) {
        if !self.out.is_empty() {
            wire.push_back(Bytes::from(std::mem::take(&mut self.out)));
        }
    }
}

/// Encrypts the plaintext waiting for rustls to allow it, and close_notify if asked.
fn pending_out(
    pending: &mut Vec<u8>,
    out: &mut Vec<u8>,
    close: &mut Close,
    w: &mut WriteTraffic<'_, ServerConnectionData>,
) {
    if !pending.is_empty() {
        let plain = std::mem::take(pending);
        encode_into(out, |buf| match w.encrypt(&plain, buf) {
            Ok(n) => Ok(n),
            Err(EncryptError::InsufficientSize(s)) => Err(Some(s.required_size)),
            Err(_) => Err(None),
        });
    }
    if *close == Close::Requested {
        *close = Close::Sent;
        encode_into(out, |buf| match w.queue_close_notify(buf) {
            Ok(n) => Ok(n),
            Err(EncryptError::InsufficientSize(s)) => Err(Some(s.required_size)),
            Err(_) => Err(None),
        });
    }
}

/// Appends what `f` encodes to `out`, growing it to the size rustls asks for.
fn encode_into(out: &mut Vec<u8>, mut f: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>) {
    let start = out.len();
    let mut room = 1024;
    loop {
        out.resize(start + room, 0);
        match f(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return;
            }
            Err(Some(required)) if required > room => room = required,
            Err(_) => {
                out.truncate(start);
                return;
            }
        }
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

    /// Moves the client's pending records to the layer in `cut`-byte reads; returns
    /// whether anything moved and the handshake the layer reported.
    fn client_to_layer(
        client: &mut rustls::ClientConnection,
        layer: &mut TlsLayer,
        cut: usize,
        plain: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
    ) -> (bool, Option<Handshake>) {
        let mut up = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut up).unwrap();
        }
        let mut handshake = None;
        for piece in up.chunks(cut) {
            let mut input = TlsInput::default();
            layer.input(piece, plain, &mut input, scratch).unwrap();
            handshake = handshake.or(input.handshake);
        }
        (!up.is_empty(), handshake)
    }

    /// Moves the layer's records to the client; whether anything moved.
    fn layer_to_client(layer: &mut TlsLayer, client: &mut rustls::ClientConnection) -> bool {
        let mut wire = VecDeque::new();
        layer.drain(&mut BytesMut::new(), &mut wire);
        for b in &wire {
            client.read_tls(&mut &b[..]).unwrap();
            client.process_new_packets().unwrap();
        }
        !wire.is_empty()
    }

    #[test]
    fn records_cut_anywhere_work_and_an_idle_layer_keeps_no_buffer() {
        use std::io::{Read, Write};
        let pki = pabal_testkit::pki::TestPki::new();
        let (cert, key) = pki.issue();
        let shared = TlsShared::new(&TlsConfig {
            cert_file: Some(cert),
            key_file: Some(key),
            ..TlsConfig::default()
        })
        .unwrap();
        let tls = pki.client();
        let mut scratch = Vec::new();
        for cut in [1, 2, 5, 7, 100, 4096] {
            let mut layer = shared.accept().unwrap();
            let mut client =
                rustls::ClientConnection::new(tls.config.clone(), tls.server_name.clone()).unwrap();
            let mut plain = Vec::new();
            let mut handshake = None;
            for _ in 0..10 {
                let (sent, done) =
                    client_to_layer(&mut client, &mut layer, cut, &mut plain, &mut scratch);
                handshake = handshake.or(done);
                if !layer_to_client(&mut layer, &mut client) && !sent {
                    break;
                }
            }
            assert!(
                !client.is_handshaking(),
                "cut {cut}: the handshake completed"
            );
            assert!(handshake.is_some(), "cut {cut}: the layer reported it");
            let hello = encoded(&[hello()]);
            client.writer().write_all(&hello).unwrap();
            client_to_layer(&mut client, &mut layer, cut, &mut plain, &mut scratch);
            assert_eq!(plain, hello, "cut {cut}: the HELLO came through whole");
            layer.write(b"welcome");
            assert!(layer_to_client(&mut layer, &mut client));
            let mut answer = Vec::new();
            let _ = client.reader().read_to_end(&mut answer);
            assert_eq!(answer, b"welcome", "cut {cut}");
            assert_eq!(
                (
                    layer.partial.capacity(),
                    layer.pending.capacity(),
                    layer.out.capacity()
                ),
                (0, 0, 0),
                "cut {cut}: an idle layer keeps no buffer"
            );
        }
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
