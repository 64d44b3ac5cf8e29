//! `loadgen --tls-reconnect`: what a phone's reconnect costs over TLS on each emulated link,
//! for a fresh handshake, a resumed one (session ticket) and a 0-RTT resume (the HELLO in
//! the first flight).
//!
//! Each trial: a writer and the phone (both [`pabal_client`] clients, straight to the relay)
//! join a fresh room; the phone receives message 1 and leaves; the writer publishes message
//! 2; then the phone reconnects **through its emulated [`Link`]** with the mode's TLS
//! settings and a HELLO resuming after message 1. That reconnect is measured:
//! - **handshake bytes**, each way: TLS records up to the client's Finished (the relay's up
//!   to its Finished); 0-RTT early data is application data, not counted;
//! - **round trips**: the client flight that carried the HELLO (a flight starts when the
//!   client sends after hearing from the relay); the relay answers that flight with the
//!   WELCOME and the missed message;
//! - **time to the first missed message**: from the first byte of the ClientHello offered to
//!   the link to message 2 decoded. The link starts as after a TCP handshake (radio awake):
//!   TCP's own round trip comes on top of every mode alike and is not in the figure.
//!
//! Owns: the probe's trials, its byte path (client TLS <-> link <-> socket) and its report.
//! Must not touch: the load run (phones, workers), the relay.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use pabal_client::{Backoff, Client, ClientConfig, ClientEvent, TlsOptions};
use pabal_codec::{ClientSession, Decoder, Event, Limits};
use rustls::ClientConnection;
use serde::Serialize;

use crate::link::{Direction, Link, LinkProfile, splitmix64};

/// How the phone's reconnect speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// No session to resume: a full handshake with the certificate.
    Fresh,
    /// A session ticket, no early data: the HELLO follows the client's Finished.
    Resumed,
    /// A session ticket and the HELLO as 0-RTT early data.
    ZeroRtt,
}

impl Mode {
    /// Every mode, in report order.
    pub const ALL: [Mode; 3] = [Mode::Fresh, Mode::Resumed, Mode::ZeroRtt];

    /// The report's name for it.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Fresh => "fresh",
            Mode::Resumed => "resumed",
            Mode::ZeroRtt => "0-rtt",
        }
    }

    /// TLS options for this mode over `base` (its roots and server name): no resumption at
    /// all for a fresh handshake, no early data for a plain resumption.
    fn options(self, base: &TlsOptions) -> TlsOptions {
        let mut config = (*base.config).clone();
        match self {
            Mode::Fresh => config.resumption = rustls::client::Resumption::disabled(),
            Mode::Resumed => config.enable_early_data = false,
            Mode::ZeroRtt => config.enable_early_data = true,
        }
        TlsOptions {
            config: Arc::new(config),
            server_name: base.server_name.clone(),
            early_data: self == Mode::ZeroRtt,
        }
    }
}

/// What the probe is told.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// The relay's TLS listener.
    pub relay: SocketAddr,
    /// Trust and server name (the modes derive their settings from it).
    pub tls: TlsOptions,
    /// The link profiles to measure.
    pub profiles: Vec<LinkProfile>,
    /// Reconnects measured per profile and mode.
    pub trials: usize,
    /// Seeds the links.
    pub seed: u64,
    /// Suffix of room and user names (run isolation).
    pub run_id: String,
    /// Longest wait for anything the relay owes (connect, a message, the reconnect).
    pub timeout: Duration,
}

/// One measured reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Trial {
    /// TLS handshake bytes the phone sent.
    pub handshake_up_bytes: u64,
    /// TLS handshake bytes the relay sent.
    pub handshake_down_bytes: u64,
    /// The client flight that carried the HELLO (TCP's round trip not included).
    pub round_trips: u32,
    /// From the ClientHello to the first missed message decoded, microseconds.
    pub first_message_us: u64,
    /// The TLS session was resumed.
    pub resumed: bool,
    /// The relay took the HELLO as early data.
    pub early_data: bool,
}

/// One profile and mode's trials.
#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    /// The link profile.
    pub profile: String,
    /// How the reconnect spoke TLS.
    pub mode: Mode,
    /// Each trial, in order.
    pub trials: Vec<Trial>,
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

impl ModeReport {
    fn column(&self, f: impl Fn(&Trial) -> u64) -> Vec<u64> {
        self.trials.iter().map(f).collect()
    }

    /// The table row: medians over the trials, and the slowest.
    fn row(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        let times = self.column(|t| t.first_message_us);
        let worst = times.iter().copied().max().unwrap_or(0);
        let resumed = self.trials.iter().filter(|t| t.resumed).count();
        let early = self.trials.iter().filter(|t| t.early_data).count();
        format!(
            "{:<10} {:<8} {:>8} {:>10} {:>6} {:>12.0} {:>10.0} {:>5}/{:<3} {:>5}/{:<3}\n",
            self.profile,
            self.mode.label(),
            median(self.column(|t| t.handshake_up_bytes)),
            median(self.column(|t| t.handshake_down_bytes)),
            median(self.column(|t| u64::from(t.round_trips))),
            ms(median(times)),
            ms(worst),
            resumed,
            self.trials.len(),
            early,
            self.trials.len(),
        )
    }
}

/// The report as a table (medians over the trials).
pub fn table(reports: &[ModeReport]) -> String {
    let mut out = format!(
        "{:<10} {:<8} {:>8} {:>10} {:>6} {:>12} {:>10} {:>9} {:>9}\n",
        "profile",
        "mode",
        "hs up B",
        "hs down B",
        "RTs",
        "first msg ms",
        "worst ms",
        "resumed",
        "0-rtt"
    );
    for r in reports {
        out.push_str(&r.row());
    }
    out.push_str(
        "hs: TLS handshake bytes; RTs: round trips to the first missed message after TCP's \
         own (not emulated);\nfirst msg: ClientHello to the first missed message decoded \
         (median), worst: the slowest trial.\n",
    );
    out
}

/// Runs every profile and mode.
pub fn run_probe(config: &ProbeConfig) -> anyhow::Result<Vec<ModeReport>> {
    let mut reports = Vec::new();
    for (p, profile) in config.profiles.iter().enumerate() {
        let profile = Arc::new(profile.clone());
        for mode in Mode::ALL {
            let tls = mode.options(&config.tls);
            let mut trials = Vec::with_capacity(config.trials);
            for t in 0..config.trials {
                let seed = splitmix64(config.seed ^ ((p as u64) << 32) ^ t as u64);
                let name = format!("{}-{}-{t}-{}", profile.name, mode.label(), config.run_id);
                let trial = one_trial(config, &tls, &profile, seed, &name)
                    .with_context(|| format!("{} {} trial {t}", profile.name, mode.label()))?;
                trials.push(trial);
            }
            reports.push(ModeReport {
                profile: profile.name.clone(),
                mode,
                trials,
            });
        }
    }
    Ok(reports)
}

fn client(config: &ProbeConfig, user: &str, tls: &TlsOptions) -> Client {
    let mut c = ClientConfig::new(config.relay, user.to_string());
    c.tls = Some(tls.clone());
    c.heartbeat_timeout = config.timeout;
    c.backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
    Client::new(c)
}

/// The next event matching `pred`, skipping others.
fn wait_event(
    c: &mut Client,
    timeout: Duration,
    mut pred: impl FnMut(&ClientEvent) -> bool,
) -> anyhow::Result<ClientEvent> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("the relay did not answer within {timeout:?}");
        }
        if let Some(e) = c.next_event(left)?
            && pred(&e)
        {
            return Ok(e);
        }
    }
}

fn one_trial(
    config: &ProbeConfig,
    tls: &TlsOptions,
    profile: &Arc<LinkProfile>,
    seed: u64,
    name: &str,
) -> anyhow::Result<Trial> {
    let room = format!("room:tls-{name}");
    let bound = |e: &ClientEvent| matches!(e, ClientEvent::Bound { .. });
    let mut writer = client(config, &format!("writer-{name}"), &config.tls);
    writer.connect()?;
    writer.join(&room)?;
    wait_event(&mut writer, config.timeout, bound)?;
    // The phone's earlier connection: joins, gets message 1, leaves (and keeps its tickets).
    let user = format!("phone-{name}");
    let mut phone = client(config, &user, tls);
    phone.connect()?;
    phone.join(&room)?;
    wait_event(&mut phone, config.timeout, bound)?;
    writer.publish(&room, "1")?;
    wait_event(&mut phone, config.timeout, |e| {
        matches!(e, ClientEvent::Message { seq: Some(1), .. })
    })?;
    let mut session = phone.session().clone();
    phone.close();
    writer.publish(&room, "2")?;
    wait_event(&mut writer, config.timeout, |e| {
        matches!(e, ClientEvent::Published { seq: 2, .. })
    })?;
    writer.close();
    // The measured reconnect, through the link.
    let mut hello = BytesMut::new();
    session
        .hello(Bytes::from(user.into_bytes()), 0)
        .encode(&mut hello);
    let conn =
        ClientConnection::new(tls.config.clone(), tls.server_name.clone()).context("TLS client")?;
    let tcp = TcpStream::connect_timeout(&config.relay, config.timeout)
        .with_context(|| format!("cannot connect to {}", config.relay))?;
    tcp.set_nodelay(true)?;
    tcp.set_nonblocking(true)?;
    let now = Instant::now();
    let mut reconnect = Reconnect::new(
        conn,
        Link::new(profile.clone(), seed, now),
        session,
        hello.freeze(),
        tls.early_data,
        now,
    );
    let deadline = now + config.timeout;
    let mut socket = Socket {
        tcp,
        out: VecDeque::new(),
    };
    loop {
        let now = Instant::now();
        if let Some(trial) = reconnect.step(now, &mut socket)? {
            return Ok(trial);
        }
        if now > deadline {
            bail!("no missed message within {:?}", config.timeout);
        }
        let wake = reconnect
            .link
            .next_event(now)
            .map_or(Duration::from_millis(1), |at| {
                at.saturating_duration_since(now)
            });
        std::thread::sleep(wake.min(Duration::from_millis(1)));
    }
}

/// The real socket: bytes the uplink released, written as the socket takes them.
struct Socket {
    tcp: TcpStream,
    out: VecDeque<Bytes>,
}

impl Socket {
    fn flush(&mut self) -> anyhow::Result<()> {
        while let Some(front) = self.out.front_mut() {
            match self.tcp.write(front) {
                Ok(0) => bail!("the relay closed the connection"),
                Ok(n) if n == front.len() => {
                    self.out.pop_front();
                }
                Ok(n) => front.advance(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Reads at most `max` bytes (0 when none wait).
    fn read(&mut self, max: usize, into: &mut Vec<u8>) -> anyhow::Result<()> {
        into.resize(max.min(64 * 1024), 0);
        match self.tcp.read(into) {
            Ok(0) if !into.is_empty() => bail!("the relay closed the connection"),
            Ok(n) => into.truncate(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => into.clear(),
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
}

/// The measured reconnect: the client's TLS and protocol on one side of the link.
struct Reconnect {
    tls: ClientConnection,
    link: Link,
    session: ClientSession,
    decoder: Decoder,
    hello: Bytes,
    hello_sent: bool,
    /// The HELLO went out as early data (sent again if the relay rejects it).
    early_sent: bool,
    started: Instant,
    /// Client bytes the uplink has not taken yet.
    up: BytesMut,
    /// Relay bytes out of the downlink, cut into whole records for the client.
    down: BytesMut,
    plain: BytesMut,
    scratch: Vec<u8>,
    handshake_up: u64,
    handshake_down: u64,
    flights: u32,
    heard_since_sent: bool,
    hello_flight: u32,
}

impl Reconnect {
    fn new(
        tls: ClientConnection,
        link: Link,
        session: ClientSession,
        hello: Bytes,
        early: bool,
        now: Instant,
    ) -> Reconnect {
        let mut r = Reconnect {
            tls,
            link,
            session,
            decoder: Decoder::new(Limits::default()),
            hello,
            hello_sent: false,
            early_sent: false,
            started: now,
            up: BytesMut::new(),
            down: BytesMut::new(),
            plain: BytesMut::new(),
            scratch: Vec::new(),
            handshake_up: 0,
            handshake_down: 0,
            flights: 0,
            heard_since_sent: false,
            hello_flight: 0,
        };
        // The ClientHello first (handshake bytes), then the HELLO as early data if a
        // ticket allows it (application bytes).
        r.pull(true);
        if early
            && let Some(mut e) = r.tls.early_data()
            && e.bytes_left() >= r.hello.len()
            && e.write_all(&r.hello).is_ok()
        {
            r.early_sent = true;
            r.pull(false);
            r.hello_sent = true;
            r.hello_flight = r.flights;
        }
        r
    }

    /// Takes what the client wants to send; `handshake`: it counts as handshake bytes.
    fn pull(&mut self, handshake: bool) {
        let before = self.up.len();
        while self.tls.wants_write() {
            let mut w = (&mut self.up).writer();
            match self.tls.write_tls(&mut w) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let n = (self.up.len() - before) as u64;
        if n == 0 {
            return;
        }
        if self.flights == 0 || self.heard_since_sent {
            self.flights += 1;
            self.heard_since_sent = false;
        }
        if handshake {
            self.handshake_up += n;
        }
    }

    /// Sends the HELLO after the handshake unless the relay took it as early data.
    fn hello_after_handshake(&mut self) -> anyhow::Result<()> {
        let rejected = self.early_sent && !self.tls.is_early_data_accepted();
        if self.hello_sent && !rejected {
            return Ok(());
        }
        self.tls.writer().write_all(&self.hello)?;
        self.pull(false);
        self.hello_sent = true;
        self.early_sent = false;
        self.hello_flight = self.flights;
        Ok(())
    }

    /// Moves bytes along the path at `now`; the trial once the first missed message is in.
    fn step(&mut self, now: Instant, socket: &mut Socket) -> anyhow::Result<Option<Trial>> {
        let take = self.link.can_accept(Direction::Up, now).min(self.up.len());
        if take > 0 {
            let bytes = self.up.split_to(take).freeze();
            self.link.offer_bytes(Direction::Up, now, bytes);
        }
        while let Some(b) = self.link.poll_deliver(Direction::Up, now) {
            socket.out.push_back(b);
        }
        socket.flush()?;
        let room = self.link.can_accept(Direction::Down, now);
        if room > 0 {
            socket.read(room, &mut self.scratch)?;
            if !self.scratch.is_empty() {
                self.link.offer(Direction::Down, now, &self.scratch);
            }
        }
        while let Some(b) = self.link.poll_deliver(Direction::Down, now) {
            self.down.extend_from_slice(&b);
            self.heard_since_sent = true;
        }
        if self.link.is_dropped(now) {
            bail!("the emulated link dropped the connection");
        }
        while let Some(len) = whole_record(&self.down) {
            let record = self.down.split_to(len);
            let handshaking = self.tls.is_handshaking();
            self.tls.read_tls(&mut &record[..])?;
            self.tls.process_new_packets()?;
            if handshaking {
                self.handshake_down += len as u64;
                if !self.tls.is_handshaking() {
                    // The client's Finished (and EndOfEarlyData) close the handshake.
                    self.pull(true);
                    self.hello_after_handshake()?;
                }
            }
            self.pull(false);
            if let Some(trial) = self.read_plaintext(now)? {
                return Ok(Some(trial));
            }
        }
        Ok(None)
    }

    fn read_plaintext(&mut self, now: Instant) -> anyhow::Result<Option<Trial>> {
        let mut chunk = [0u8; 4096];
        loop {
            match self.tls.reader().read(&mut chunk) {
                Ok(0) => bail!("the relay ended the TLS session"),
                Ok(n) => self.plain.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        while let Some(frame) = self.decoder.decode_server(&mut self.plain)? {
            match self.session.apply(frame)? {
                Event::Message { seq: Some(_), .. } => {
                    return Ok(Some(Trial {
                        handshake_up_bytes: self.handshake_up,
                        handshake_down_bytes: self.handshake_down,
                        round_trips: self.hello_flight,
                        first_message_us: now.duration_since(self.started).as_micros() as u64,
                        resumed: self.tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
                        early_data: self.tls.is_early_data_accepted(),
                    }));
                }
                Event::Error(e) => bail!("the relay refused the HELLO: {}", e.message.as_str()),
                _ => {}
            }
        }
        Ok(None)
    }
}

/// The length of the TLS record at the start of `buf`, when it is all there.
fn whole_record(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..5)?;
    let len = 5 + usize::from(u16::from_be_bytes([header[3], header[4]]));
    (buf.len() >= len).then_some(len)
}

/// A throwaway certificate authority and a `localhost` certificate it signs, for a relay
/// `--spawn-relay` starts: written to `dir` as `cert.pem` and `key.pem`; the returned
/// options trust that authority alone.
pub fn throwaway_certificate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, TlsOptions)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "loadgen throwaway CA");
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    let leaf_key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["localhost".to_string()])?
        .signed_by(&leaf_key, &Issuer::from_params(&ca_params, &ca_key))?;
    std::fs::create_dir_all(dir)?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, leaf.pem())?;
    std::fs::write(&key, leaf_key.serialize_pem())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone())?;
    Ok((cert, key, TlsOptions::new(roots, "localhost")?))
}

/// Client TLS options trusting the PEM certificates in `ca_file`, for `server_name`.
pub fn trust(ca_file: &Path, server_name: &str) -> anyhow::Result<TlsOptions> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem =
        std::fs::read(ca_file).with_context(|| format!("cannot read {}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(cert.with_context(|| format!("{}: not a PEM certificate", ca_file.display()))?)?;
    }
    if roots.is_empty() {
        bail!("{} holds no certificate", ca_file.display());
    }
    Ok(TlsOptions::new(roots, server_name)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

    use super::*;

    #[test]
    fn records_are_cut_whole() {
        assert_eq!(whole_record(&[0x17, 3, 3, 0]), None);
        assert_eq!(whole_record(&[0x17, 3, 3, 0, 2, 9]), None);
        assert_eq!(whole_record(&[0x17, 3, 3, 0, 2, 9, 9, 1]), Some(7));
    }

    #[test]
    fn the_table_takes_medians() {
        let trial = |us| Trial {
            handshake_up_bytes: 100,
            handshake_down_bytes: 200,
            round_trips: 1,
            first_message_us: us,
            resumed: true,
            early_data: true,
        };
        let report = ModeReport {
            profile: "3g".into(),
            mode: Mode::ZeroRtt,
            trials: vec![trial(300_000), trial(100_000), trial(900_000)],
        };
        let t = table(&[report]);
        assert!(t.contains("0-rtt"), "{t}");
        assert!(t.contains(" 300 "), "median of 100, 300, 900 ms: {t}");
        assert!(t.contains(" 900 "), "worst: {t}");
    }
}
