//! The hand-off sender: one task on the control thread's tokio runtime. It drains the
//! workers' channel into the [`Outbox`], POSTs one batch at a time to `handoff.url` over
//! HTTP/1.1 (hyper's client, one kept-alive connection, reopened after any error), and
//! feeds each answer back to the outbox, which decides what to send next and when.
//!
//! Every attempt (connect, send, read the answer) runs under `handoff.timeout`. The answer's
//! body is read (up to [`MAX_ANSWER_BYTES`], so a kept-alive connection stays usable) and
//! ignored; only the status counts: 2xx accepted; 5xx, 408, 429, a timeout or a connection
//! error retried; any other status refused for good (logged with the status).
//!
//! Owns: the HTTP client and the task's loop. Must not touch: the control listener, worker
//! state.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST, RETRY_AFTER, USER_AGENT};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::config::{Endpoint, HandoffConfig};
use super::queue::{Outbox, Outcome};
use super::{Handoff, HandoffRx, wire};
use crate::config::ConfigError;

/// The most answer body read from the app server (past it the connection is dropped).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Items taken from the channel per wake-up.
const DRAIN: usize = 256;

/// Everything the task needs, checked and loaded before it starts.
#[derive(Debug)]
pub struct Sender {
    config: HandoffConfig,
    endpoint: Endpoint,
    secret: Vec<u8>,
    rx: HandoffRx,
}

impl Sender {
    /// Loads `config` (its endpoint and secret) for the task that will drain `rx`. Fails,
    /// naming the field, when hand-offs are off or the secret does not load.
    pub fn new(config: &HandoffConfig, rx: HandoffRx) -> Result<Sender, ConfigError> {
        let endpoint = config.endpoint()?;
        let Some(secret) = config.load_secret()? else {
            return Err(ConfigError::Invalid {
                field: "handoff.secret_file",
                why: "required with handoff.url".into(),
            });
        };
        Ok(Sender {
            config: config.clone(),
            endpoint,
            secret,
            rx,
        })
    }

    /// Runs until every [`super::HandoffTx`] is gone (or the runtime stops). Must run on a
    /// tokio runtime with I/O and time enabled.
    pub async fn run(self) {
        let Sender {
            config,
            endpoint,
            secret,
            rx: HandoffRx { mut rx, stats },
        } = self;
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let mut outbox = Outbox::new(&config, stats, seed);
        let client = Client {
            endpoint: Arc::new(endpoint),
            secret: Arc::from(secret),
            timeout: config.timeout,
            conn: None,
        };
        let mut idle_client = Some(client);
        let mut in_flight = None;
        let mut taken: Vec<Handoff> = Vec::with_capacity(DRAIN);
        let mut open = true;
        while open || outbox.held() > 0 {
            if let Some(client) = idle_client.take() {
                match outbox.poll_batch(Instant::now()) {
                    Some(batch) => in_flight = Some(Box::pin(client.post(batch.body))),
                    None => idle_client = Some(client),
                }
            }
            let wake = outbox.deadline().map(tokio::time::Instant::from_std);
            tokio::select! {
                n = rx.recv_many(&mut taken, DRAIN), if open => {
                    if n == 0 {
                        open = false;
                    }
                    let now = Instant::now();
                    for item in taken.drain(..) {
                        outbox.push(now, item);
                    }
                }
                (client, outcome) = async {
                    match in_flight.as_mut() {
                        Some(post) => post.await,
                        None => std::future::pending().await,
                    }
                }, if in_flight.is_some() => {
                    in_flight = None;
                    idle_client = Some(client);
                    outbox.on_answer(Instant::now(), outcome);
                }
                () = async {
                    match wake {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                }, if in_flight.is_none() => {}
            }
            if !open && in_flight.is_none() && outbox.deadline().is_none() {
                break;
            }
        }
    }
}

/// One kept-alive HTTP/1.1 connection to the app server, opened when needed.
struct Client {
    endpoint: Arc<Endpoint>,
    secret: Arc<[u8]>,
    timeout: Duration,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    /// POSTs one batch; gives itself back with the outcome (the task holds it in between).
    async fn post(mut self, body: Vec<u8>) -> (Client, Outcome) {
        let outcome = match tokio::time::timeout(self.timeout, self.attempt(body)).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => {
                tracing::warn!(url = %self.url(), "hand-off POST failed, will retry: {e}");
                self.conn = None;
                Outcome::Retry { retry_after: None }
            }
            Err(_) => {
                tracing::warn!(
                    url = %self.url(),
                    "hand-off POST took longer than handoff.timeout ({:?}), will retry",
                    self.timeout
                );
                self.conn = None;
                Outcome::Retry { retry_after: None }
            }
        };
        (self, outcome)
    }

    fn url(&self) -> String {
        format!("http://{}{}", self.endpoint.authority, self.endpoint.path)
    }

    async fn attempt(&mut self, body: Vec<u8>) -> anyhow::Result<Outcome> {
        let unix_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let signature = wire::signature(&self.secret, unix_s, &body);
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.endpoint.path.as_str())
            .header(HOST, self.endpoint.authority.as_str())
            .header(CONTENT_TYPE, "application/json")
            .header(
                USER_AGENT,
                concat!("pabal-relay/", env!("CARGO_PKG_VERSION")),
            )
            .header(wire::SIGNATURE_HEADER, signature)
            .body(Full::new(Bytes::from(body)))?;
        let mut conn = match self.conn.take() {
            Some(c) if !c.is_closed() => c,
            _ => self.connect().await?,
        };
        if conn.ready().await.is_err() {
            // The kept-alive connection closed since: one fresh one.
            conn = self.connect().await?;
            conn.ready().await?;
        }
        let answer = conn.send_request(request).await?;
        let status = answer.status();
        let retry_after = answer
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Read the answer so the connection can carry the next batch; a huge one is dropped.
        if Limited::new(answer.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .is_ok()
        {
            self.conn = Some(conn);
        }
        Ok(classify(status, retry_after, &self.url()))
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let stream = TcpStream::connect((self.endpoint.host.as_str(), self.endpoint.port)).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("hand-off connection ended: {e}");
            }
        });
        Ok(sender)
    }
}

/// What a status means for the batch.
fn classify(status: StatusCode, retry_after: Option<Duration>, url: &str) -> Outcome {
    if status.is_success() {
        return Outcome::Accepted;
    }
    if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        tracing::warn!(%url, %status, "hand-off refused for now, will retry");
        return Outcome::Retry { retry_after };
    }
    tracing::error!(
        %url,
        %status,
        "hand-off batch refused for good (not 2xx, 5xx, 408 or 429): its items are dropped"
    );
    Outcome::Refused
}
