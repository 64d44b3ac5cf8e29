//! Per-connection byte layers between an I/O backend and the core: TLS ([`tls`]) and
//! WebSocket ([`ws`]), alone or stacked (wss = WebSocket over TLS). Sans-IO: bytes from the
//! socket go in and plaintext protocol bytes come out for the core; the core's protocol
//! bytes go in and socket bytes come out for the backend.
//!
//! The runtime wraps the core's [`EventSink`] in [`Layers::sink`] and the backend's
//! [`Transport`] in [`Layers::transport`], and calls [`Layers::flush`] after the core's
//! flush. A connection accepted on a plain listener gets no layer and costs one map probe
//! per event (none at all when no layered listener is configured).
//!
//! # Contract towards the core (the backend's, unchanged)
//! - The core sees `accepted` at TCP accept (its handshake deadline covers the TLS
//!   handshake and the WebSocket upgrade), plaintext in `received`, and `sent` for its batch
//!   once every socket byte that batch became is written. One core batch is in flight at a
//!   time, so a layer buffers at most one batch plus its own few control bytes.
//! - A peer that breaks TLS or WebSocket, refuses the upgrade, or sends anything but a HELLO
//!   in 0-RTT is reported to the core as `closed`; the layer sends its answer (alert, HTTP
//!   error, close frame, fatal ERROR) and then closes the socket itself.
//! - `shutdown_write` from the core sends the layer's goodbye (close_notify, a close frame)
//!   after the core's last bytes, then half-closes.
//! - WebSocket pings and pongs reach the core as an empty `received` (activity).
//!
//! Owns: which listener speaks what, each layered connection's layers and socket-bound
//! bytes. Must not touch: sockets (the backend's), the protocol (the core's).

pub mod tls;
pub mod ws;

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pabal_codec::{ErrorCode, ErrorFrame, ServerFrame, Text};

use crate::core::Transport;
use crate::io::{CloseReason, EventSink, Token};
use crate::stats::{CoreStats, inc};

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// pabal frames over TCP.
    Plain,
    /// pabal frames over TLS.
    Tls,
    /// pabal frames in WebSocket binary messages.
    Ws,
    /// WebSocket over TLS.
    Wss,
}

/// The layers every worker shares: the TLS configuration (one session cache for all) and
/// the WebSocket policy, both swapped by a reload.
#[derive(Debug)]
pub struct TransportShared {
    /// TLS, when `[tls]` is set.
    pub tls: Option<tls::TlsShared>,
    /// The WebSocket policy in force.
    pub ws_policy: parking_lot::RwLock<Arc<ws::WsPolicy>>,
}

impl TransportShared {
    /// From a validated configuration.
    pub fn new(config: &crate::config::Config) -> Result<TransportShared, tls::TlsSetupError> {
        let tls = if config.tls.enabled() {
            Some(tls::TlsShared::new(&config.tls)?)
        } else {
            None
        };
        Ok(TransportShared {
            tls,
            ws_policy: parking_lot::RwLock::new(Arc::new(ws::WsPolicy::from_config(config))),
        })
    }

    /// Applies a reload: re-reads the certificate, swaps the WebSocket policy. Open
    /// connections keep their session; on error nothing changes.
    pub fn reload(&self, config: &crate::config::Config) -> Result<(), tls::TlsSetupError> {
        if let Some(tls) = &self.tls {
            tls.reload(&config.tls)?;
        }
        *self.ws_policy.write() = Arc::new(ws::WsPolicy::from_config(config));
        Ok(())
    }
}

/// One layered connection.
#[derive(Debug)]
struct Layered {
    tls: Option<tls::TlsLayer>,
    ws: Option<ws::WsLayer>,
    /// Socket bytes not yet handed to the backend.
    wire: VecDeque<Bytes>,
    /// A batch is with the backend.
    in_flight: bool,
    /// The core's batch, encoded into `wire` and not yet acknowledged (its size).
    core_owed: Option<usize>,
    /// The core's batch that completes with the batch in flight.
    core_in_flight: Option<usize>,
    /// The core asked for a half-close.
    shut_requested: bool,
    shut_done: bool,
    /// The core has forgotten it: close once `wire` is written.
    doomed: bool,
    dirty: bool,
}

impl Layered {
    fn new(kind: ListenerKind, shared: &TransportShared) -> Result<Layered, rustls::Error> {
        let tls = match (kind, &shared.tls) {
            (ListenerKind::Tls | ListenerKind::Wss, Some(t)) => Some(t.accept()?),
            _ => None,
        };
        let ws = matches!(kind, ListenerKind::Ws | ListenerKind::Wss).then(ws::WsLayer::new);
        Ok(Layered {
            tls,
            ws,
            wire: VecDeque::new(),
            in_flight: false,
            core_owed: None,
            core_in_flight: None,
            shut_requested: false,
            shut_done: false,
            doomed: false,
            dirty: false,
        })
    }

    /// Sends plaintext bytes (already framed for WebSocket where it applies) down.
    fn down(&mut self, bytes: Bytes, scratch: &mut BytesMut) {
        match &mut self.tls {
            Some(tls) => {
                tls.write(&bytes);
                tls.drain(scratch, &mut self.wire);
            }
            None => self.wire.push_back(bytes),
        }
    }

    /// Encodes a core batch (framed as one binary message where WebSocket applies).
    fn encode(&mut self, bufs: &mut VecDeque<Bytes>, scratch: &mut BytesMut) {
        let total: usize = bufs.iter().map(Bytes::len).sum();
        if self.ws.is_some() {
            ws::encode_binary_header(total, scratch);
            let header = scratch.split().freeze();
            self.down(header, scratch);
        }
        for b in bufs.drain(..) {
            self.down(b, scratch);
        }
        self.core_owed = Some(self.core_owed.unwrap_or(0) + total);
    }
}

/// One worker's layered connections and the listeners' kinds.
#[derive(Debug)]
pub struct Layers {
    shared: Arc<TransportShared>,
    /// The worker's counters (the TLS and WebSocket ones are this module's).
    stats: Arc<CoreStats>,
    /// Local addresses of the layered listeners and what they speak.
    listeners: Vec<(SocketAddr, ListenerKind)>,
    conns: HashMap<Token, Box<Layered>>,
    dirty: Vec<Token>,
    /// Plaintext scratch (per worker: an idle connection keeps no buffer).
    plain: Vec<u8>,
    /// TLS records being decrypted (per worker, like `plain`).
    tls_in: Vec<u8>,
    /// Encoding scratch; batches are split off it.
    enc: BytesMut,
}

fn matches_listener(bound: SocketAddr, local: SocketAddr) -> bool {
    bound.port() == local.port() && (bound.ip().is_unspecified() || bound.ip() == local.ip())
}

impl Layers {
    /// Layers for one worker; `listeners` names the layered listeners' bound addresses
    /// (plain ones need not be listed); `stats` are the worker's counters.
    pub fn new(
        shared: Arc<TransportShared>,
        listeners: Vec<(SocketAddr, ListenerKind)>,
        stats: Arc<CoreStats>,
    ) -> Layers {
        Layers {
            shared,
            stats,
            listeners: listeners
                .into_iter()
                .filter(|(_, k)| *k != ListenerKind::Plain)
                .collect(),
            conns: HashMap::new(),
            dirty: Vec::new(),
            plain: Vec::new(),
            tls_in: Vec::new(),
            enc: BytesMut::new(),
        }
    }

    /// Whether work is queued for [`Layers::flush`] (the loop must not block meanwhile).
    pub fn has_work(&self) -> bool {
        !self.dirty.is_empty()
    }

    fn kind_of(&self, stream: &TcpStream) -> ListenerKind {
        if self.listeners.is_empty() {
            return ListenerKind::Plain;
        }
        let Ok(local) = stream.local_addr() else {
            return ListenerKind::Plain;
        };
        self.listeners
            .iter()
            .find(|(bound, _)| matches_listener(*bound, local))
            .map_or(ListenerKind::Plain, |(_, kind)| *kind)
    }

    fn mark_dirty(dirty: &mut Vec<Token>, token: Token, conn: &mut Layered) {
        if !conn.dirty {
            conn.dirty = true;
            dirty.push(token);
        }
    }

    /// The core's sink seen through the layers (for [`crate::io::Backend::poll`]).
    pub fn sink<'a>(&'a mut self, inner: &'a mut dyn EventSink) -> LayeredSink<'a> {
        LayeredSink {
            layers: self,
            inner,
        }
    }

    /// The backend seen through the layers (for the core's flush).
    pub fn transport<'a, T: Transport + ?Sized>(
        &'a mut self,
        inner: &'a mut T,
    ) -> LayeredTransport<'a, T> {
        LayeredTransport {
            layers: self,
            inner,
        }
    }

    /// Hands the socket bytes the layers produced to the backend, half-closes and closes
    /// what is due. Call after the core's flush.
    pub fn flush<T: Transport + ?Sized>(&mut self, backend: &mut T) {
        for token in std::mem::take(&mut self.dirty) {
            let Some(conn) = self.conns.get_mut(&token) else {
                continue;
            };
            conn.dirty = false;
            if !conn.in_flight && !conn.wire.is_empty() {
                conn.in_flight = true;
                conn.core_in_flight = conn.core_owed.take();
                backend.send(token, &mut conn.wire);
                conn.wire.clear();
            }
            if conn.wire.is_empty() && !conn.shut_done && (conn.shut_requested || conn.doomed) {
                conn.shut_done = true;
                backend.shutdown_write(token);
            }
            if conn.doomed && !conn.in_flight && conn.wire.is_empty() {
                self.remove(token);
                backend.close(token);
            }
        }
    }

    /// Forgets a connection; a TLS handshake it leaves unfinished counts as incomplete.
    fn remove(&mut self, token: Token) -> Option<Box<Layered>> {
        let conn = self.conns.remove(&token)?;
        if let Some(tls) = &conn.tls {
            if tls.handshake_pending() {
                inc(&self.stats.tls_failed_incomplete, 1);
            }
            if tls.early_data_unanswered() {
                inc(&self.stats.tls_early_rejected, 1);
            }
        }
        Some(conn)
    }

    /// A layer refused the peer: the core forgets the connection; the answer already in
    /// `wire` goes out, then the socket closes.
    fn doom(&mut self, token: Token, inner: &mut dyn EventSink, why: &dyn std::fmt::Display) {
        tracing::debug!(token, %why, "closing a layered connection");
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if !conn.doomed {
            conn.doomed = true;
            Self::mark_dirty(&mut self.dirty, token, conn);
            inner.closed(
                token,
                CloseReason::Error(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    why.to_string(),
                )),
            );
        }
    }

    fn received(&mut self, token: Token, data: &[u8], inner: &mut dyn EventSink) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return inner.received(token, data);
        };
        if conn.doomed {
            return;
        }
        let mut plain = std::mem::take(&mut self.plain);
        plain.clear();
        let mut peer_closed = false;
        let mut failure: Option<String> = None;
        match &mut conn.tls {
            Some(tls) => {
                let mut input = tls::TlsInput::default();
                let handshaking = tls.is_handshaking();
                let result = tls.input(data, &mut plain, &mut input, &mut self.tls_in);
                count_tls(&self.stats, &input, result.as_ref().err(), handshaking);
                match result {
                    Ok(()) => peer_closed = input.peer_closed,
                    Err(tls::TlsLayerError::EarlyData(why)) => {
                        // The protocol's own refusal, then close_notify.
                        let mut buf = BytesMut::new();
                        ServerFrame::Error(ErrorFrame {
                            code: ErrorCode::ProtocolViolation,
                            fatal: true,
                            reference: 0,
                            message: Text::from_static(why),
                        })
                        .encode(&mut buf);
                        tls.write(&buf);
                        tls.close();
                        plain.clear();
                        failure = Some(why.to_string());
                    }
                    Err(e) => failure = Some(e.to_string()),
                }
                tls.drain(&mut self.enc, &mut conn.wire);
            }
            None => plain.extend_from_slice(data),
        }
        if failure.is_none() && !plain.is_empty() {
            match &mut conn.ws {
                Some(ws) => {
                    let policy = self.shared.ws_policy.read().clone();
                    let mut out = BytesMut::new();
                    let result = ws.input(
                        &mut plain,
                        &policy,
                        &mut |payload| inner.received(token, payload),
                        &mut out,
                    );
                    let held = ws.take_held();
                    count_ws(&self.stats, &result);
                    if !out.is_empty() {
                        conn.down(out.freeze(), &mut self.enc);
                    }
                    match result {
                        Ok(input) => {
                            if input.activity {
                                inner.received(token, &[]);
                            }
                            peer_closed |= input.peer_closed;
                        }
                        Err(e) => failure = Some(e.to_string()),
                    }
                    if let Some(mut held) = held {
                        conn.encode(&mut held, &mut self.enc);
                    }
                }
                None => inner.received(token, &plain),
            }
        }
        self.plain = plain;
        if !conn.wire.is_empty() {
            Self::mark_dirty(&mut self.dirty, token, conn);
        }
        if let Some(why) = failure {
            self.doom(token, inner, &why);
        } else if peer_closed {
            self.doom(token, inner, &"the peer closed its session");
        }
    }

    fn sent(&mut self, token: Token, bytes: usize, inner: &mut dyn EventSink) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return inner.sent(token, bytes);
        };
        conn.in_flight = false;
        Self::mark_dirty(&mut self.dirty, token, conn);
        if let Some(core_bytes) = conn.core_in_flight.take()
            && !conn.doomed
        {
            inner.sent(token, core_bytes);
        }
    }

    fn send(&mut self, token: Token, bufs: &mut VecDeque<Bytes>) -> bool {
        let Some(conn) = self.conns.get_mut(&token) else {
            return false;
        };
        if conn.doomed {
            bufs.clear();
            return true;
        }
        match &mut conn.ws {
            Some(ws) if !ws.is_open() => ws.hold(bufs),
            _ => conn.encode(bufs, &mut self.enc),
        }
        Self::mark_dirty(&mut self.dirty, token, conn);
        true
    }

    fn shutdown_write(&mut self, token: Token) -> bool {
        let Some(conn) = self.conns.get_mut(&token) else {
            return false;
        };
        if !conn.shut_requested {
            conn.shut_requested = true;
            if let Some(ws) = &mut conn.ws {
                let mut out = BytesMut::new();
                ws.close(&mut out);
                if !out.is_empty() {
                    conn.down(out.freeze(), &mut self.enc);
                }
            }
            if let Some(tls) = &mut conn.tls {
                tls.close();
                tls.drain(&mut self.enc, &mut conn.wire);
            }
        }
        Self::mark_dirty(&mut self.dirty, token, conn);
        true
    }
}

/// Counts what one TLS input found: a completed handshake (resumed or not), the early-data
/// decision, a refusal of early data, a failed handshake by reason.
fn count_tls(
    stats: &CoreStats,
    input: &tls::TlsInput,
    error: Option<&tls::TlsLayerError>,
    handshaking: bool,
) {
    if let Some(handshake) = input.handshake {
        inc(&stats.tls_handshakes, 1);
        if handshake.resumed {
            inc(&stats.tls_resumptions, 1);
        }
    }
    match input.early_data {
        Some(tls::EarlyData::Accepted) => inc(&stats.tls_early_accepted, 1),
        Some(tls::EarlyData::Rejected) => inc(&stats.tls_early_rejected, 1),
        None => {}
    }
    match error {
        Some(tls::TlsLayerError::EarlyData(_)) => inc(&stats.tls_early_refused, 1),
        Some(tls::TlsLayerError::Tls(e)) if handshaking => {
            let counter = match tls::HandshakeFailure::of(e) {
                tls::HandshakeFailure::Alpn => &stats.tls_failed_alpn,
                tls::HandshakeFailure::PeerAlert => &stats.tls_failed_peer_alert,
                tls::HandshakeFailure::BadMessage => &stats.tls_failed_bad_message,
                tls::HandshakeFailure::Incompatible => &stats.tls_failed_incompatible,
                tls::HandshakeFailure::Other => &stats.tls_failed_other,
            };
            inc(counter, 1);
        }
        Some(tls::TlsLayerError::Tls(_)) | None => {}
    }
}

/// Counts a completed or refused WebSocket upgrade.
fn count_ws(stats: &CoreStats, result: &Result<ws::WsInput, ws::WsError>) {
    let counter = match result {
        Ok(input) if input.upgraded => &stats.ws_upgrades,
        Err(ws::WsError::Refused { status, .. }) => match status {
            403 => &stats.ws_refused_origin,
            426 => &stats.ws_refused_not_websocket,
            431 => &stats.ws_refused_too_large,
            _ => &stats.ws_refused_bad_request,
        },
        _ => return,
    };
    inc(counter, 1);
}

/// The core's [`EventSink`] behind the layers.
pub struct LayeredSink<'a> {
    layers: &'a mut Layers,
    inner: &'a mut dyn EventSink,
}

impl std::fmt::Debug for LayeredSink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayeredSink")
            .field("layers", &self.layers)
            .finish()
    }
}

impl EventSink for LayeredSink<'_> {
    fn accepted(&mut self, stream: &TcpStream, peer: SocketAddr) -> Option<Token> {
        let kind = self.layers.kind_of(stream);
        let token = self.inner.accepted(stream, peer)?;
        if kind == ListenerKind::Plain {
            return Some(token);
        }
        match Layered::new(kind, &self.layers.shared) {
            Ok(conn) => {
                self.layers.conns.insert(token, Box::new(conn));
                Some(token)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start TLS on a new connection");
                self.inner
                    .closed(token, CloseReason::Error(std::io::Error::other(e)));
                None
            }
        }
    }

    fn received(&mut self, token: Token, data: &[u8]) {
        if self.layers.conns.is_empty() {
            return self.inner.received(token, data);
        }
        self.layers.received(token, data, self.inner);
    }

    fn sent(&mut self, token: Token, bytes: usize) {
        if self.layers.conns.is_empty() {
            return self.inner.sent(token, bytes);
        }
        self.layers.sent(token, bytes, self.inner);
    }

    fn closed(&mut self, token: Token, reason: CloseReason) {
        match self.layers.remove(token) {
            Some(conn) if conn.doomed => {} // the core already forgot it
            _ => self.inner.closed(token, reason),
        }
    }

    fn woken(&mut self) {
        self.inner.woken();
    }
}

/// The backend as the core's [`Transport`], behind the layers.
pub struct LayeredTransport<'a, T: ?Sized> {
    layers: &'a mut Layers,
    inner: &'a mut T,
}

impl<T: ?Sized> std::fmt::Debug for LayeredTransport<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayeredTransport")
            .field("layers", &self.layers)
            .finish()
    }
}

impl<T: Transport + ?Sized> Transport for LayeredTransport<'_, T> {
    fn send(&mut self, token: Token, bufs: &mut VecDeque<Bytes>) {
        if !self.layers.send(token, bufs) {
            self.inner.send(token, bufs);
        }
    }

    fn set_reading(&mut self, token: Token, reading: bool) {
        self.inner.set_reading(token, reading);
    }

    fn shutdown_write(&mut self, token: Token) {
        if !self.layers.shutdown_write(token) {
            self.inner.shutdown_write(token);
        }
    }

    fn close(&mut self, token: Token) {
        self.layers.remove(token);
        self.inner.close(token);
    }

    fn close_listeners(&mut self) {
        self.inner.close_listeners();
    }
}
