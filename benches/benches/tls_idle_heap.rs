//! What one idle TLS connection keeps on the heap, counted byte for byte (not RSS): rustls's
//! server side as the relay configures it (TLS 1.3, ALPN, single-use session cache, tickets,
//! 0-RTT, half-RTT data), after a full handshake and one small exchange each way, with the
//! client gone. Three ways:
//! - the buffered `ServerConnection` the relay runs today;
//! - the same with no tickets (what the session cache's entries cost);
//! - `UnbufferedServerConnection`, whose receive and send buffers are the caller's (a
//!   worker's scratch), so an idle connection keeps none.
//!
//! `cargo bench -p pabal-benches --bench tls_idle_heap` (`PABAL_IDLE_CONNS`, default 2000).
//! A wrapper around the system allocator counts live bytes; the relay's own per-connection
//! state (core, layer box) is not in these figures, only rustls's.

#![allow(clippy::unwrap_used)] // reason: a benchmark driver fails loudly

use std::alloc::System;
use std::io::{Read, Write};
use std::sync::Arc;

use pabal_testkit::pki::TestPki;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerSessionMemoryCache, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::{ClientConnection, ServerConfig, ServerConnection};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The relay's server configuration (`transport::tls::TlsShared::new`), `tickets` per
/// handshake; `chacha`: ChaCha20-Poly1305 only (smaller keys than AES-GCM's tables).
fn server_config(pki: &TestPki, tickets: usize, chacha: bool) -> Arc<ServerConfig> {
    let (cert, key) = pki.issue();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&key).unwrap();
    let mut provider = rustls::crypto::ring::default_provider();
    if chacha {
        provider.cipher_suites =
            vec![rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
    }
    let provider = Arc::new(provider);
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"pabal/1".to_vec()];
    config.session_storage = ServerSessionMemoryCache::new(65_536);
    config.send_tls13_tickets = tickets;
    config.max_early_data_size = 16 * 1024;
    config.send_half_rtt_data = true;
    Arc::new(config)
}

/// A server under test: socket bytes in, socket bytes out, plaintext both ways.
trait Server {
    fn input(&mut self, tls: &[u8], plain: &mut Vec<u8>);
    fn send(&mut self, plain: &[u8]);
    fn output(&mut self, out: &mut Vec<u8>);
}

impl Server for ServerConnection {
    fn input(&mut self, mut tls: &[u8], plain: &mut Vec<u8>) {
        while !tls.is_empty() {
            self.read_tls(&mut tls).unwrap();
            self.process_new_packets().unwrap();
        }
        let _ = self.reader().read_to_end(plain);
    }
    fn send(&mut self, plain: &[u8]) {
        self.writer().write_all(plain).unwrap();
    }
    fn output(&mut self, out: &mut Vec<u8>) {
        while self.wants_write() {
            self.write_tls(out).unwrap();
        }
    }
}

/// The unbuffered connection with the buffers a worker would lend it.
struct Unbuffered {
    conn: UnbufferedServerConnection,
    /// Encoded records waiting to be taken (empty while idle).
    out: Vec<u8>,
    /// Plaintext to encrypt once rustls allows it.
    pending: Vec<u8>,
}

fn encode_into(out: &mut Vec<u8>, mut f: impl FnMut(&mut [u8]) -> Result<usize, usize>) {
    let start = out.len();
    let mut room = 256;
    loop {
        out.resize(start + room, 0);
        match f(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return;
            }
            Err(required) => room = required,
        }
    }
}

impl Unbuffered {
    fn pump(&mut self, incoming: &mut Vec<u8>, plain: &mut Vec<u8>) {
        loop {
            let UnbufferedStatus { mut discard, state } = self.conn.process_tls_records(incoming);
            let mut done = false;
            match state.unwrap() {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        let rec = rec.unwrap();
                        discard += rec.discard;
                        plain.extend_from_slice(rec.payload);
                    }
                }
                ConnectionState::ReadEarlyData(mut r) => {
                    while let Some(rec) = r.next_record() {
                        let rec = rec.unwrap();
                        discard += rec.discard;
                        plain.extend_from_slice(rec.payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    encode_into(&mut self.out, |buf| match e.encode(buf) {
                        Ok(n) => Ok(n),
                        Err(EncodeError::InsufficientSize(s)) => Err(s.required_size),
                        Err(other) => panic!("{other}"),
                    });
                }
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::WriteTraffic(mut w) => {
                    if !self.pending.is_empty() {
                        let pending = std::mem::take(&mut self.pending);
                        encode_into(&mut self.out, |buf| match w.encrypt(&pending, buf) {
                            Ok(n) => Ok(n),
                            Err(EncryptError::InsufficientSize(s)) => Err(s.required_size),
                            Err(other) => panic!("{other}"),
                        });
                    }
                    done = true;
                }
                _ => done = true,
            }
            incoming.drain(..discard);
            if done {
                return;
            }
        }
    }
}

impl Server for Unbuffered {
    fn input(&mut self, tls: &[u8], plain: &mut Vec<u8>) {
        // A worker's scratch in the relay; whatever stays (a cut record) is the connection's.
        let mut incoming = tls.to_vec();
        self.pump(&mut incoming, plain);
        assert!(incoming.is_empty(), "whole records were fed");
    }
    fn send(&mut self, plain: &[u8]) {
        self.pending.extend_from_slice(plain);
        self.pump(&mut Vec::new(), &mut Vec::new());
    }
    fn output(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.out);
        self.out = Vec::new();
    }
}

fn client_output(client: &mut ClientConnection) -> Vec<u8> {
    let mut out = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut out).unwrap();
    }
    out
}

/// A full handshake, a 100-byte HELLO and a 200-byte answer; the client is then dropped.
fn exchange(server: &mut dyn Server, client_config: &Arc<rustls::ClientConfig>) {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut client = ClientConnection::new(client_config.clone(), name).unwrap();
    let mut plain = Vec::new();
    let mut to_client = Vec::new();
    // Until neither side has anything to say.
    for _ in 0..10 {
        let up = client_output(&mut client);
        if !up.is_empty() {
            server.input(&up, &mut plain);
        }
        server.output(&mut to_client);
        if to_client.is_empty() && up.is_empty() {
            break;
        }
        if !to_client.is_empty() {
            client.read_tls(&mut &to_client[..]).unwrap();
            client.process_new_packets().unwrap();
            to_client.clear();
        }
    }
    assert!(!client.is_handshaking(), "the handshake completed");
    client.writer().write_all(&[7u8; 100]).unwrap();
    let up = client_output(&mut client);
    server.input(&up, &mut plain);
    assert_eq!(plain.len(), 100, "the server read the HELLO");
    server.send(&[9u8; 200]);
    server.output(&mut to_client);
    client.read_tls(&mut &to_client[..]).unwrap();
    client.process_new_packets().unwrap();
    let mut answer = Vec::new();
    let _ = client.reader().read_to_end(&mut answer);
    assert_eq!(answer.len(), 200, "the client read the answer");
}

/// Live heap bytes per idle connection after `n` exchanges on servers made by `make`.
fn idle_heap<S: Server>(
    n: usize,
    client_config: &Arc<rustls::ClientConfig>,
    make: impl Fn() -> S,
) -> f64 {
    // Warm up: lazily built tables and the like.
    let mut warm = make();
    exchange(&mut warm, client_config);
    drop(warm);
    let mut held: Vec<S> = Vec::with_capacity(n);
    let region = Region::new(GLOBAL);
    for _ in 0..n {
        let mut s = make();
        exchange(&mut s, client_config);
        held.push(s);
    }
    let stats = region.change();
    let live = stats.bytes_allocated as f64 - stats.bytes_deallocated as f64
        + stats.bytes_reallocated as f64;
    drop(held);
    live / n as f64
}

fn main() {
    let n: usize = std::env::var("PABAL_IDLE_CONNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let pki = TestPki::new();
    let client = pki.client();
    let mut client_config = (*client.config).clone();
    // The client keeps no tickets: only the server's memory grows.
    client_config.resumption = rustls::client::Resumption::disabled();
    let client_config = Arc::new(client_config);
    println!(
        "inline (in the relay's per-connection box): ServerConnection {} B, \
         UnbufferedServerConnection {} B",
        std::mem::size_of::<ServerConnection>(),
        std::mem::size_of::<Unbuffered>()
    );
    for (tickets, chacha) in [(2, false), (0, false), (2, true)] {
        let suite = if chacha {
            "ChaCha20-Poly1305"
        } else {
            "AES-256-GCM"
        };
        let config = server_config(&pki, tickets, chacha);
        let buffered = idle_heap(n, &client_config, || {
            let mut c = ServerConnection::new(config.clone()).unwrap();
            c.set_buffer_limit(None);
            c
        });
        let config = server_config(&pki, tickets, chacha);
        let unbuffered = idle_heap(n, &client_config, || Unbuffered {
            conn: UnbufferedServerConnection::new(config.clone()).unwrap(),
            out: Vec::new(),
            pending: Vec::new(),
        });
        println!(
            "{tickets} tickets per handshake, {suite}: live heap per idle TLS connection \
             ({n}): buffered ServerConnection {buffered:.0} B, unbuffered {unbuffered:.0} B"
        );
    }
}
