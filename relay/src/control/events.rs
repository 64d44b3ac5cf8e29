//! `GET /v1/events`: a Server-Sent Events stream that tells an app server about the relay
//! itself. The first event is `relay`, with the boot epoch and the start time: an app server
//! that reconnects and sees another epoch knows the relay restarted, lost its in-memory
//! membership, and must send membership again. A comment line follows every
//! `control.event_keepalive`; when a graceful shutdown begins, a `draining` event ends the
//! stream. At most `control.max_event_streams` are open at once.
//!
//! Owns: the stream's wire format. Must not touch: connections (the server runs them).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::body::Frame;
use serde_json::json;

use super::api::ApiError;
use super::server::Ctx;
use super::{Settings, Slot};
use crate::runtime::Relay;

/// A keep-alive: an SSE comment, which clients ignore.
const KEEPALIVE: &[u8] = b": keep-alive\n\n";

/// One open event stream; holds its slot until the client goes away.
#[derive(Debug)]
pub struct EventStream {
    first: Option<Bytes>,
    tick: tokio::time::Interval,
    relay: Arc<Relay>,
    done: bool,
    _slot: Slot,
}

/// The `relay` event: who this relay is (its boot epoch) and since when.
pub fn relay_event(relay: &Relay) -> String {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let up = relay.started().elapsed();
    let data = json!({
        "epoch": relay.epoch(),
        "start_time_ms": now_ms.saturating_sub(up.as_millis() as u64),
        "uptime_s": up.as_secs(),
        "backend": relay.backend(),
        "workers": relay.workers(),
        "draining": relay.is_draining(),
    });
    format!(
        "retry: {}\nevent: relay\ndata: {data}\n\n",
        RECONNECT_HINT.as_millis()
    )
}

impl EventStream {
    /// Opens a stream if fewer than `control.max_event_streams` are open.
    pub(crate) fn open(ctx: &Ctx, settings: &Settings) -> Result<EventStream, ApiError> {
        let max = settings.config().max_event_streams;
        let slot = Slot::take(&ctx.plane, |h| &h.streams, max).ok_or_else(|| {
            ApiError::busy(format!(
                "{max} event streams are open (control.max_event_streams)"
            ))
        })?;
        let every = settings.config().event_keepalive;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(EventStream {
            first: Some(Bytes::from(relay_event(&ctx.relay))),
            tick,
            relay: ctx.relay.clone(),
            done: false,
            _slot: slot,
        })
    }
}

impl hyper::body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        if this.tick.poll_tick(cx).is_pending() {
            return Poll::Pending;
        }
        if this.relay.is_draining() {
            this.done = true;
            let data = json!({"epoch": this.relay.epoch()});
            let event = format!("event: draining\ndata: {data}\n\n");
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))));
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(KEEPALIVE)))))
    }
}

/// How long an app server should wait before reconnecting a stream, for the `retry:` field.
pub const RECONNECT_HINT: Duration = Duration::from_secs(1);
