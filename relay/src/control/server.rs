//! The control listener's machinery: the `pabal-control` thread and its current-thread
//! runtime, the accept loop (which backs off on descriptor exhaustion and never stops), one
//! hyper HTTP/1.1 connection per client under every bound of `[control]`, and dispatch of
//! each request to an operations [`Route`], the event stream or the API.
//!
//! Owns: sockets of the control listener and their timeouts. Must not touch: what an
//! endpoint means ([`super::api`], [`super::events`], the routes' handlers).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::api::{self, ApiError};
use super::events::EventStream;
use super::{Beat, ControlPlane, Holdings, Plane, Response, Settings, Slot};
use crate::config::ControlConfig;
use crate::idempotency::IdempotencyKey;
use crate::runtime::Relay;

/// The body of every answer: a whole buffer, or the event stream.
pub type Body = Either<Full<Bytes>, EventStream>;

/// Threads the runtime may start for operations routes that block (health probes).
const BLOCKING_THREADS: usize = 4;
/// The first and the longest pause after a failed accept (descriptors exhausted).
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
/// What a connection past `control.max_connections` gets before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n";

/// The running control listener.
#[derive(Debug)]
pub struct ControlServer {
    plane: ControlPlane,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// What every request handler reads.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) relay: Arc<Relay>,
    pub(crate) plane: Arc<Plane>,
}

impl ControlServer {
    /// Binds the listener and starts the control thread (`None` if `control.listen` is
    /// empty). Fails if the address cannot be bound or the API key does not load.
    pub fn start(config: &ControlConfig, relay: Arc<Relay>) -> anyhow::Result<Option<Self>> {
        let Some(addr) = config.listen_addr()? else {
            return Ok(None);
        };
        let settings = Settings::load(config)?;
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen on control address {addr}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(BLOCKING_THREADS)
            .thread_name("pabal-control-blocking")
            .build()
            .context("cannot build the control runtime")?;
        let (probe, probe_rx) = tokio::sync::watch::channel(0);
        let (beats, beats_rx) = tokio::sync::mpsc::channel(1);
        let plane = Arc::new(Plane {
            addr,
            settings: parking_lot::RwLock::new(Arc::new(settings)),
            holdings: Holdings::default(),
            probe,
            ack: AtomicU64::new(0),
            beats,
        });
        let handoff = relay.take_handoff_sender();
        let ctx = Arc::new(Ctx {
            relay,
            plane: plane.clone(),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("pabal-control".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("control API: cannot register the listener: {e}");
                            return;
                        }
                    };
                    tokio::spawn(answer_beats(ctx.plane.clone(), probe_rx, beats_rx));
                    // Offline hand-offs to the app server (handoff/sender.rs).
                    if let Some(sender) = handoff {
                        tokio::spawn(sender.run());
                    }
                    tokio::select! {
                        () = accept_loop(listener, ctx) => {}
                        _ = stopped => {}
                    }
                });
                // Ends connections and streams; waits briefly for a health probe in progress.
                runtime.shutdown_timeout(Duration::from_secs(2));
            })
            .context("cannot spawn the control thread")?;
        Ok(Some(ControlServer {
            plane: ControlPlane { plane },
            stop: Some(stop),
            thread: Some(thread),
        }))
    }

    /// The running plane: its address, settings and probe.
    pub fn plane(&self) -> &ControlPlane {
        &self.plane
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.plane.addr()
    }

    /// Stops accepting, closes every connection and waits for the thread.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shut();
    }
}

/// Answers the watchdog's probes from the control runtime itself, so a wedged runtime (a
/// blocking call on its thread, a livelocked task) stops answering.
async fn answer_beats(
    plane: Arc<Plane>,
    mut probe: tokio::sync::watch::Receiver<u64>,
    mut beats: tokio::sync::mpsc::Receiver<Beat>,
) {
    loop {
        tokio::select! {
            changed = probe.changed() => {
                if changed.is_err() {
                    return;
                }
                let seq = *probe.borrow_and_update();
                plane.ack.store(seq, Ordering::Release);
            }
            Some(beat) = beats.recv() => match beat {
                // Wedges the control thread on purpose (tests of the watchdog).
                Beat::Stall(d) => std::thread::sleep(d),
            },
        }
    }
}

/// Accepts until the runtime stops. An accept error (descriptors exhausted: EMFILE,
/// ENFILE; kernel memory: ENOBUFS, ENOMEM) pauses accepting with a growing back-off and
/// retries; the backlog waits in the kernel meanwhile. One line is logged when it starts
/// failing and one when it recovers.
async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>) {
    let mut backoff = ACCEPT_BACKOFF.0;
    let mut failing: Option<(Instant, u64)> = None;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                if let Some((since, failures)) = failing.take() {
                    tracing::info!(
                        "control API: accepting again after {failures} failed accepts in {:.1} s",
                        since.elapsed().as_secs_f64()
                    );
                }
                backoff = ACCEPT_BACKOFF.0;
                admit(&ctx, stream);
            }
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                match &mut failing {
                    Some((_, failures)) => *failures += 1,
                    None => {
                        tracing::warn!(
                            "control API: accept failed: {e}; retrying with back-off up to {} ms",
                            ACCEPT_BACKOFF.1.as_millis()
                        );
                        failing = Some((Instant::now(), 1));
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
            }
        }
    }
}

/// Accept errors that concern one connection only (it went away in the backlog).
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) || e.raw_os_error() == Some(libc::EPROTO)
}

/// Serves a new connection if a slot is free; otherwise answers 503 and closes it.
fn admit(ctx: &Arc<Ctx>, stream: TcpStream) {
    let settings = ctx.plane.settings.read().clone();
    let max = settings.config().max_connections;
    let Some(slot) = Slot::take(&ctx.plane, |h| &h.connections, max) else {
        // Answered and drained briefly (closing with the request unread would reset the
        // connection and lose the answer), as long as refusals in progress stay under the
        // same bound; past it, closed at once.
        if let Some(refusal) = Slot::take(&ctx.plane, |h| &h.refusals, max) {
            tokio::spawn(refuse(stream, refusal));
        }
        return;
    };
    let _ = stream.set_nodelay(true);
    tokio::spawn(connection(ctx.clone(), stream, settings, slot));
}

/// Answers 503, stops writing, and reads what the client sent for up to a second, so the
/// close does not reset the connection before the client reads the answer.
async fn refuse(mut stream: TcpStream, _slot: Slot) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let drain = async {
        stream.write_all(BUSY).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// One connection under the bounds in force when it was accepted.
async fn connection(ctx: Arc<Ctx>, stream: TcpStream, settings: Arc<Settings>, _slot: Slot) {
    let c = settings.config();
    let started = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(Tracked {
        stream,
        started,
        activity: activity.clone(),
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(c.header_timeout)
        .max_headers(c.max_headers)
        .max_header_size(c.max_header_bytes)
        .max_buf_size((c.max_header_bytes + 8 * 1024).max(8 * 1024));
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let idle = c.idle_timeout;
    let check = (idle / 4).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("control API connection: {e}");
                }
                return;
            }
            () = tokio::time::sleep(check) => {
                let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                if started.elapsed().saturating_sub(last) >= idle {
                    tracing::debug!("control API: closing a connection idle for {idle:?}");
                    return;
                }
            }
        }
    }
}

/// A stream that records when bytes last moved either way (for the idle timeout).
struct Tracked {
    stream: TcpStream,
    started: Instant,
    /// Milliseconds after `started` of the last read or write that moved bytes.
    activity: Arc<AtomicU64>,
}

impl Tracked {
    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.activity.store(ms, Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        result
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// One request: an operations route, the event stream, or the API.
async fn handle(ctx: &Arc<Ctx>, req: Request<Incoming>) -> hyper::Response<Body> {
    let settings = ctx.plane.settings.read().clone();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let routes = ctx.relay.routes();
    if routes.is_empty() && matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics") {
        // The binary adds these right after start: until then, not ready, rather than 404.
        return whole(ApiError::starting().response());
    }
    let route = routes
        .into_iter()
        .find(|r| r.method == method.as_str() && r.path == path);
    if let Some(route) = route {
        if (!route.public || settings.config().metrics_need_key)
            && !settings.authorized(req.headers())
        {
            return whole(api::unauthorized());
        }
        let relay = ctx.relay.clone();
        let answer = tokio::task::spawn_blocking(move || (route.handler)(&relay)).await;
        return whole(
            answer.unwrap_or_else(|_| ApiError::internal("the handler failed").response()),
        );
    }
    if !settings.authorized(req.headers()) {
        return whole(api::unauthorized());
    }
    if method == Method::GET && path == "/v1/events" {
        return match EventStream::open(ctx, &settings) {
            Ok(stream) => hyper::Response::builder()
                .header(CONTENT_TYPE, "text/event-stream")
                .header("cache-control", "no-cache")
                .body(Either::Right(stream))
                .unwrap_or_else(|_| whole(ApiError::internal("bad header").response())),
            Err(e) => whole(e.response()),
        };
    }
    let max = settings.config().max_in_flight;
    let Some(_slot) = Slot::take(&ctx.plane, |h| &h.in_flight, max) else {
        return whole(
            ApiError::busy(format!(
                "{max} requests are in flight (control.max_in_flight)"
            ))
            .response(),
        );
    };
    let mutation = matches!(method, Method::POST | Method::PUT | Method::DELETE);
    if mutation && ctx.relay.is_draining() {
        return whole(api::draining(&ctx.relay).response());
    }
    let key = match idempotency_key(req.headers()) {
        Ok(key) => key,
        Err(e) => return whole(e.response()),
    };
    let body = if mutation {
        match read_body(req, settings.config()).await {
            Ok(body) => body,
            Err(e) => return whole(e.response()),
        }
    } else {
        Bytes::new()
    };
    let call = api::Call {
        relay: &ctx.relay,
        settings: &settings,
        method: method.as_str(),
        path: &path,
        query: &query,
        body: &body,
        key,
    };
    whole(call.run().await)
}

/// The `Idempotency-Key` header, validated.
fn idempotency_key(headers: &hyper::HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::bad("give one Idempotency-Key header"));
    }
    IdempotencyKey::new(value.as_bytes())
        .map(Some)
        .map_err(|e| ApiError::bad(format!("Idempotency-Key: {e}")))
}

/// Reads the whole body within `control.body_timeout` and `control.max_body` (a declared
/// length past the bound is refused before a byte is read).
async fn read_body(req: Request<Incoming>, c: &ControlConfig) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::too_large(
            "body_too_large",
            format!("the body exceeds control.max_body = {} bytes", c.max_body),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > c.max_body as u64) {
        return Err(too_large());
    }
    let limited = Limited::new(req.into_body(), c.max_body);
    match tokio::time::timeout(c.body_timeout, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::bad(format!("cannot read the body: {e}"))),
        Err(_) => Err(ApiError::timeout_reading(c.body_timeout)),
    }
}

/// A whole answer as hyper's response.
fn whole(r: Response) -> hyper::Response<Body> {
    let mut response = hyper::Response::new(Either::Left(Full::new(Bytes::from(r.body))));
    *response.status_mut() =
        StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(r.content_type));
    if let Some(s) = r.retry_after_s {
        headers.insert(RETRY_AFTER, HeaderValue::from(s));
    }
    response
}
