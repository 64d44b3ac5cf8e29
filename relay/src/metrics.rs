//! Operations endpoints on the control listener: `GET /metrics` (OpenMetrics text, which
//! Prometheus scrapes natively), `GET /healthz` (liveness) and `GET /readyz` (readiness).
//! The binary registers [`routes_with`] through [`Relay::add_route`]; tests register
//! [`routes`].
//!
//! No lock and no shared counter on the hot path: each worker adds to its own
//! [`crate::stats::CoreStats`] with relaxed atomics, and a scrape reads them all into a
//! [`Scrape`] and encodes that with `prometheus-client`'s encoder through a custom
//! collector. Counters carry a `worker` label (sum them in PromQL); the two histograms are
//! summed across workers at scrape time.
//!
//! The cluster's families are in `metrics/cluster.rs` (`pabal_cluster_*`), the durable
//! log's in `metrics/storage.rs` (`pabal_storage_*`); this module has the workers', the
//! transports' and the hand-off's, and puts a scrape together.
//!
//! Owns: metric names, help texts, the histogram conversion, the health answers. Must not
//! touch: worker state (it reads counters through [`Relay`]'s accessors only).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::control::{Response, Route};
use crate::handoff::HandoffSnapshot;
use crate::runtime::Relay;
use crate::stats::{BUCKETS, HistogramSnapshot, StatsSnapshot};
use crate::storage::StorageMetrics;
use crate::watchdog::{self, Liveness};

mod cluster;
mod storage;

pub use cluster::ClusterScrape;

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long `/healthz` waits for every worker to answer when no watchdog thread runs.
pub const HEALTH_PROBE_DEADLINE: Duration = Duration::from_secs(1);

/// `/metrics`, `/healthz` and `/readyz`, with `/healthz` probing the workers itself (for a
/// relay without a watchdog thread: tests, embedding).
pub fn routes() -> Vec<Route> {
    routes_with(None)
}

/// The operations routes; with `liveness`, `/healthz` answers from the watchdog's record
/// instead of probing.
pub fn routes_with(liveness: Option<Arc<Liveness>>) -> Vec<Route> {
    vec![
        Route {
            method: "GET",
            path: "/metrics",
            public: true,
            handler: Arc::new(metrics),
        },
        Route {
            method: "GET",
            path: "/healthz",
            public: true,
            handler: Arc::new(move |relay: &Relay| healthz(relay, liveness.as_deref())),
        },
        Route {
            method: "GET",
            path: "/readyz",
            public: true,
            handler: Arc::new(readyz),
        },
    ]
}

/// `GET /metrics`.
pub fn metrics(relay: &Relay) -> Response {
    match Scrape::of(relay).render() {
        Ok(body) => Response::text(200, CONTENT_TYPE, body),
        Err(e) => Response::text(
            500,
            "text/plain; charset=utf-8",
            format!("cannot encode metrics: {e}\n"),
        ),
    }
}

/// `GET /healthz`: 200 while every worker answers liveness probes; 503 naming the workers
/// that do not.
pub fn healthz(relay: &Relay, liveness: Option<&Liveness>) -> Response {
    let workers = relay.workers();
    let stuck: Vec<(usize, String)> = match liveness {
        Some(live) => match live.check(Instant::now()) {
            Ok(()) => Vec::new(),
            Err(stuck) => stuck
                .into_iter()
                .map(|(c, silent)| {
                    let why = format!(
                        "{} has not answered a liveness probe for {:.1} s",
                        watchdog::component_name(c, workers),
                        silent.as_secs_f64()
                    );
                    (c, why)
                })
                .collect(),
        },
        None => match watchdog::probe_now(relay, HEALTH_PROBE_DEADLINE) {
            Ok(()) => Vec::new(),
            Err(stuck) => stuck
                .into_iter()
                .map(|c| {
                    let why = format!(
                        "{} did not answer a liveness probe within {:.1} s",
                        watchdog::component_name(c, workers),
                        HEALTH_PROBE_DEADLINE.as_secs_f64()
                    );
                    (c, why)
                })
                .collect(),
        },
    };
    if stuck.is_empty() {
        return Response::json(200, &json!({ "status": "ok", "workers": workers }));
    }
    let message: Vec<&str> = stuck.iter().map(|(_, why)| why.as_str()).collect();
    Response::json(
        503,
        &json!({
            "status": "stuck",
            "workers": workers,
            "stuck": stuck.iter().map(|(w, _)| *w).collect::<Vec<_>>(),
            "message": message.join("; "),
        }),
    )
}

/// `GET /readyz`: 200 while serving, 503 once a graceful shutdown has begun (load
/// balancers stop sending new phones before the GOAWAYs go out), and 503
/// `engine_unavailable` while a cluster node's engine (Redis) connections are down (its
/// publishes are refused then; phones are better served by another node).
pub fn readyz(relay: &Relay) -> Response {
    if relay.is_draining() {
        Response::json(503, &json!({ "status": "draining" }))
    } else if relay.cluster().is_some_and(|c| !c.healthy()) {
        Response::json(503, &json!({ "status": "engine_unavailable" }))
    } else {
        Response::json(200, &json!({ "status": "ready" }))
    }
}

/// Everything one scrape reports, read from the relay's atomics at scrape time.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// The I/O backend the workers run.
    pub backend: &'static str,
    /// The relay's boot epoch (ms since the Unix epoch; rooms carry it).
    pub epoch: u64,
    /// Time since start.
    pub uptime: Duration,
    /// Whether a graceful shutdown has begun.
    pub draining: bool,
    /// Each worker's counters.
    pub workers: Vec<StatsSnapshot>,
    /// Message batches waiting in each worker's inbox.
    pub inbox_depths: Vec<usize>,
    /// Each worker's durable log's metrics (empty in memory mode).
    pub storage: Vec<StorageMetrics>,
    /// The cluster's metrics (`[cluster]` only).
    pub cluster: Option<ClusterScrape>,
    /// The offline hand-off counters (`None` while `[handoff] url` is empty).
    pub handoff: Option<HandoffSnapshot>,
}

type HandoffField = fn(&HandoffSnapshot) -> u64;

/// Hand-off counters (no `worker` label: one sender per relay): name, help, field.
const HANDOFF_COUNTERS: &[(&str, &str, HandoffField)] = &[
    (
        "pabal_handoff_enqueued",
        "Hand-offs the sender took from the workers.",
        |h| h.enqueued,
    ),
    (
        "pabal_handoff_sent",
        "Hand-offs the app server accepted (2xx).",
        |h| h.sent,
    ),
    (
        "pabal_handoff_batches",
        "Hand-off batches the app server accepted (2xx).",
        |h| h.batches,
    ),
    (
        "pabal_handoff_retried",
        "Hand-off POSTs that failed and will be retried (5xx, 408, 429, timeout, connection \
         error).",
        |h| h.retried,
    ),
];

impl Scrape {
    fn encode_handoff(&self, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let Some(h) = &self.handoff else {
            return Ok(());
        };
        let g = ConstGauge::new(h.queued);
        g.encode(enc.encode_descriptor(
            "pabal_handoff_queued",
            "Hand-offs held by the sender: queued plus in flight (at most handoff.queue_max).",
            None,
            g.metric_type(),
        )?)?;
        for &(name, help, field) in HANDOFF_COUNTERS {
            let c = ConstCounter::new(field(h));
            c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let mut m = enc.encode_descriptor(
            "pabal_handoff_dropped",
            "Hand-offs dropped, by reason: queue_full (handoff.queue_max reached: the oldest \
             queued goes), channel_full (the workers' channel to the sender was full), \
             refused (the app server answered a 4xx other than 408/429), stopped (shutdown).",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in [
            ("queue_full", h.dropped_queue_full),
            ("channel_full", h.dropped_channel_full),
            ("refused", h.dropped_refused),
            ("stopped", h.dropped_stopped),
        ] {
            ConstCounter::new(n).encode(m.encode_family(&[("reason", reason)])?)?;
        }
        histogram(
            enc,
            "pabal_handoff_batch_seconds",
            "From a batch's oldest item entering the queue to the app server's 2xx.",
            &h.batch_latency_ms,
            1e3,
        )
    }
}

type Field = fn(&StatsSnapshot) -> u64;

/// Counters with a `worker` label: name (OpenMetrics adds `_total`), help, field.
const COUNTERS: &[(&str, &str, Field)] = &[
    ("pabal_connections_accepted", "Connections accepted.", |s| {
        s.accepted
    }),
    (
        "pabal_frames_received",
        "Frames received from clients.",
        |s| s.frames_in,
    ),
    (
        "pabal_messages_accepted",
        "Messages sequenced by the rooms this worker owns (PUBLISH and server API).",
        |s| s.messages_in,
    ),
    (
        "pabal_publishes_repeated",
        "Publishes recognised as repeats of a message the room holds (protocol v2 publish ids) \
         and answered with its original sequence, stored and delivered nothing again.",
        |s| s.publishes_repeated,
    ),
    (
        "pabal_markers_advanced",
        "Times a member's delivered or read marker (receipts) advanced at its room's owner.",
        |s| s.markers_advanced,
    ),
    (
        "pabal_ephemeral_accepted",
        "Ephemeral events accepted (not sequenced, not stored).",
        |s| s.ephemeral_in,
    ),
    (
        "pabal_deliveries",
        "Messages written to connections, live and replayed.",
        |s| s.deliveries,
    ),
    (
        "pabal_replayed",
        "Messages written to connections from history (resume and catch-up).",
        |s| s.replayed,
    ),
    (
        "pabal_received_bytes",
        "Bytes read from client sockets.",
        |s| s.bytes_in,
    ),
    (
        "pabal_sent_bytes",
        "Bytes written to client sockets.",
        |s| s.bytes_out,
    ),
    (
        "pabal_sends",
        "Sends submitted (at most one per connection per loop tick).",
        |s| s.sends,
    ),
    (
        "pabal_lag_events",
        "Times a connection's queue reached its cap and it started being fed from history.",
        |s| s.lag_events,
    ),
    ("pabal_gaps", "GAP frames sent.", |s| s.gaps),
    (
        "pabal_handoff_detected",
        "Offline hand-offs found by the rooms' owners (a member had not acked a window of \
         messages within handoff.delay).",
        |s| s.handoffs_detected,
    ),
    ("pabal_resumes", "Resume entries honoured in HELLO.", |s| {
        s.resumes
    }),
    (
        "pabal_auth_failures",
        "HELLOs refused for a bad or expired token.",
        |s| s.auth_failures,
    ),
    ("pabal_loop_ticks", "Worker loop iterations.", |s| s.ticks),
    (
        "pabal_rooms_evicted",
        "Rooms evicted from memory: no members, no subscribers, no retained history.",
        |s| s.rooms_evicted,
    ),
    (
        "pabal_accept_failures",
        "Accept attempts that failed for lack of descriptors or memory (EMFILE, ENFILE, \
         ENOBUFS, ENOMEM) and paused accepting.",
        |s| s.accept_failures,
    ),
    (
        "pabal_accept_pauses",
        "Episodes of paused accepting: runs of accept failures, each retried with backoff.",
        |s| s.accept_pauses,
    ),
];

/// `pabal_errors_total{kind}`: connections closed or requests refused, by cause.
const ERRORS: &[(&str, Field)] = &[
    ("protocol_error", |s| s.protocol_errors),
    ("heartbeat_timeout", |s| s.heartbeat_timeouts),
    ("rate_limited", |s| s.rate_limited),
    ("limit_refused", |s| s.limit_refusals),
    ("overload_refused", |s| s.overload_refusals),
    ("subscribe_rate_limited", |s| s.subscribe_rate_limited),
];

/// Gauges with a `worker` label.
const GAUGES: &[(&str, &str, Field)] = &[
    (
        "pabal_queued_bytes",
        "Bytes queued for this worker's connections (sampled once a second).",
        |s| s.queued_bytes,
    ),
    (
        "pabal_queue_high_water_bytes",
        "The most bytes any one connection of this worker had queued at a flush.",
        |s| s.queue_high_water,
    ),
    (
        "pabal_lagging_connections",
        "Connections being fed from history because their queue reached its cap.",
        |s| s.lagging,
    ),
    (
        "pabal_rooms",
        "Rooms and channels this worker owns (holds history and membership for).",
        |s| s.rooms,
    ),
];

// TLS and WebSocket (the transport layers'): plain counters, then counters by a label.

/// The transport layers' counters with a `worker` label.
const TRANSPORT_COUNTERS: &[(&str, &str, Field)] = &[
    (
        "pabal_tls_handshakes",
        "TLS handshakes completed (fresh and resumed).",
        |s| s.tls_handshakes,
    ),
    (
        "pabal_tls_resumptions",
        "TLS handshakes that resumed a session from a ticket.",
        |s| s.tls_resumptions,
    ),
    (
        "pabal_websocket_upgrades",
        "WebSocket upgrades completed (101 Switching Protocols).",
        |s| s.ws_upgrades,
    ),
];

/// A counter family split by one label besides `worker`: name, help, label, values.
type Labelled = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, Field)],
);

/// The transport layers' counters split by reason or result.
const TRANSPORT_LABELLED: &[Labelled] = &[
    (
        "pabal_tls_handshake_failures",
        "TLS handshakes that failed, by reason: alpn (no pabal/1), peer_alert, bad_message \
         (malformed, unexpected or undecryptable), incompatible (no common version, suite or \
         group), incomplete (the peer or the handshake deadline ended it first), other.",
        "reason",
        &[
            ("alpn", |s| s.tls_failed_alpn),
            ("peer_alert", |s| s.tls_failed_peer_alert),
            ("bad_message", |s| s.tls_failed_bad_message),
            ("incompatible", |s| s.tls_failed_incompatible),
            ("incomplete", |s| s.tls_failed_incomplete),
            ("other", |s| s.tls_failed_other),
        ],
    ),
    (
        "pabal_tls_early_data",
        "TLS 0-RTT early data by result: accepted, rejected (ticket unknown or already used, \
         as a replay's is), refused (accepted by TLS but held more than one HELLO; the \
         connection ended).",
        "result",
        &[
            ("accepted", |s| s.tls_early_accepted),
            ("rejected", |s| s.tls_early_rejected),
            ("refused", |s| s.tls_early_refused),
        ],
    ),
    (
        "pabal_websocket_refusals",
        "WebSocket upgrades refused, by reason: bad_request (400), not_websocket (426), \
         too_large (431), origin (403, not in websocket.allowed_origins).",
        "reason",
        &[
            ("bad_request", |s| s.ws_refused_bad_request),
            ("not_websocket", |s| s.ws_refused_not_websocket),
            ("too_large", |s| s.ws_refused_too_large),
            ("origin", |s| s.ws_refused_origin),
        ],
    ),
];

impl Scrape {
    fn encode_transport(&self, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
        for &(name, help, field) in TRANSPORT_COUNTERS {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (w, s) in self.workers.iter().enumerate() {
                ConstCounter::new(field(s)).encode(m.encode_family(&worker_label(w))?)?;
            }
        }
        for &(name, help, label, values) in TRANSPORT_LABELLED {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (w, s) in self.workers.iter().enumerate() {
                for &(value, field) in values {
                    let labels = [("worker", w.to_string()), (label, value.to_string())];
                    ConstCounter::new(field(s)).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

impl Scrape {
    /// Reads the relay's counters now.
    pub fn of(relay: &Relay) -> Self {
        Scrape {
            backend: relay.backend(),
            epoch: relay.epoch(),
            uptime: relay.started().elapsed(),
            draining: relay.is_draining(),
            workers: relay.worker_stats(),
            inbox_depths: relay.inbox_depths(),
            storage: relay.storage_metrics(),
            cluster: relay.cluster().map(|c| ClusterScrape::of(c)),
            handoff: relay.handoff_stats(),
        }
    }

    /// The OpenMetrics text exposition, ending in `# EOF`.
    pub fn render(self) -> Result<String, fmt::Error> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(out)
    }

    /// The relay-wide sum of one histogram.
    fn summed(&self, pick: fn(&StatsSnapshot) -> &HistogramSnapshot) -> HistogramSnapshot {
        let mut total = HistogramSnapshot::default();
        for w in &self.workers {
            let h = pick(w);
            for (t, c) in total.counts.iter_mut().zip(h.counts.iter()) {
                *t += c;
            }
            total.sum += h.sum;
        }
        total
    }
}

/// Our fixed buckets as the encoder takes them: `(upper bound / divisor, count in that
/// bucket alone)`, the last bound `+Inf`. The encoder accumulates them into the cumulative
/// `_bucket{le=...}` series Prometheus expects, so `le="+Inf"` equals `_count`.
pub fn buckets(h: &HistogramSnapshot, divisor: f64) -> Vec<(f64, u64)> {
    BUCKETS
        .iter()
        .map(|&bound| bound as f64 / divisor)
        .chain(std::iter::once(f64::INFINITY))
        .zip(h.counts.iter().copied())
        .collect()
}

fn worker_label(worker: usize) -> [(&'static str, String); 1] {
    [("worker", worker.to_string())]
}

fn histogram(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    h: &HistogramSnapshot,
    divisor: f64,
) -> fmt::Result {
    let mut metric = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    metric.encode_histogram::<NoLabelSet>(
        h.sum as f64 / divisor,
        h.count(),
        &buckets(h, divisor),
        None,
    )
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let info = Info::new([
            ("version", env!("CARGO_PKG_VERSION")),
            ("backend", self.backend),
        ]);
        info.encode(enc.encode_descriptor(
            "pabal_build",
            "The relay's version and I/O backend.",
            None,
            info.metric_type(),
        )?)?;
        let gauge = |enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: f64| {
            let g = ConstGauge::new(v);
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
        };
        gauge(
            &mut enc,
            "pabal_workers",
            "Worker threads.",
            self.workers.len() as f64,
        )?;
        gauge(
            &mut enc,
            "pabal_uptime_seconds",
            "Seconds since the relay started.",
            self.uptime.as_secs_f64(),
        )?;
        gauge(
            &mut enc,
            "pabal_start_time_seconds",
            "When the relay started, seconds since the Unix epoch.",
            self.epoch as f64 / 1e3,
        )?;
        gauge(
            &mut enc,
            "pabal_epoch",
            "The boot epoch rooms created in this process carry (ms since the Unix epoch).",
            self.epoch as f64,
        )?;
        gauge(
            &mut enc,
            "pabal_draining",
            "1 once a graceful shutdown has begun.",
            if self.draining { 1.0 } else { 0.0 },
        )?;

        let mut m = enc.encode_descriptor(
            "pabal_connections",
            "Connections open now.",
            None,
            MetricType::Gauge,
        )?;
        for (w, s) in self.workers.iter().enumerate() {
            let labels = [
                ("worker", w.to_string()),
                ("backend", self.backend.to_string()),
            ];
            ConstGauge::new(s.connections).encode(m.encode_family(&labels)?)?;
        }

        for &(name, help, field) in GAUGES {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (w, s) in self.workers.iter().enumerate() {
                ConstGauge::new(field(s)).encode(m.encode_family(&worker_label(w))?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "pabal_inbox_batches",
            "Message batches waiting in each worker's inbox (the mesh between workers).",
            None,
            MetricType::Gauge,
        )?;
        for (w, depth) in self.inbox_depths.iter().enumerate() {
            ConstGauge::new(*depth as u64).encode(m.encode_family(&worker_label(w))?)?;
        }

        for &(name, help, field) in COUNTERS {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (w, s) in self.workers.iter().enumerate() {
                ConstCounter::new(field(s)).encode(m.encode_family(&worker_label(w))?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "pabal_errors",
            "Connections closed or requests refused, by kind: protocol_error, \
             heartbeat_timeout, rate_limited (publish rate), limit_refused (payload, rooms, \
             connections per user...), overload_refused (GOAWAY overload), \
             subscribe_rate_limited (SUBSCRIBE/UNSUBSCRIBE rate).",
            None,
            MetricType::Counter,
        )?;
        for (w, s) in self.workers.iter().enumerate() {
            for &(kind, field) in ERRORS {
                let labels = [("worker", w.to_string()), ("kind", kind.to_string())];
                ConstCounter::new(field(s)).encode(m.encode_family(&labels)?)?;
            }
        }

        histogram(
            &mut enc,
            "pabal_publish_to_send_seconds",
            "Time from a message's acceptance by its room's owner to the loop tick that \
             queues it for a connection's send, per delivery.",
            &self.summed(|s| &s.publish_to_send),
            1e6,
        )?;
        histogram(
            &mut enc,
            "pabal_fanout_batch_connections",
            "Connections written per fan-out of one message on one worker.",
            &self.summed(|s| &s.fanout_batch),
            1.0,
        )?;
        self.encode_transport(&mut enc)?;
        if let Some(cluster) = &self.cluster {
            cluster.encode(&mut enc)?;
        }
        self.encode_handoff(&mut enc)?;
        self.encode_storage(&mut enc)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests fail loudly on purpose

    use super::*;

    fn scrape() -> Scrape {
        let mut w0 = StatsSnapshot {
            connections: 3,
            messages_in: 10,
            rate_limited: 2,
            ..StatsSnapshot::default()
        };
        // 4 at <= 1 us, 1 at <= 2 us, 2 above every bound.
        w0.publish_to_send.counts[0] = 4;
        w0.publish_to_send.counts[1] = 1;
        w0.publish_to_send.counts[BUCKETS.len()] = 2;
        w0.publish_to_send.sum = 4 + 2 + 4_000_000;
        let mut w1 = StatsSnapshot {
            connections: 1,
            ..StatsSnapshot::default()
        };
        // 3 at <= 2500 us.
        w1.publish_to_send.counts[10] = 3;
        w1.publish_to_send.sum = 6_000;
        Scrape {
            backend: "epoll",
            epoch: 1_700_000_000_000,
            uptime: Duration::from_millis(1500),
            draining: false,
            workers: vec![w0, w1],
            inbox_depths: vec![0, 5],
            storage: Vec::new(),
            cluster: None,
            handoff: None,
        }
    }

    #[test]
    fn handoff_families_appear_only_when_handoff_is_on() {
        let text = scrape().render().unwrap();
        assert!(!text.contains("pabal_handoff_queued"), "{text}");
        let mut s = scrape();
        let mut h = HandoffSnapshot {
            queued: 7,
            sent: 40,
            retried: 2,
            dropped_queue_full: 3,
            dropped_refused: 1,
            ..HandoffSnapshot::default()
        };
        h.batch_latency_ms.counts[9] = 2; // <= 1000 ms
        h.batch_latency_ms.sum = 1_500;
        s.handoff = Some(h);
        let text = s.render().unwrap();
        for expected in [
            "\npabal_handoff_queued 7\n",
            "\npabal_handoff_sent_total 40\n",
            "\npabal_handoff_retried_total 2\n",
            "\npabal_handoff_dropped_total{reason=\"queue_full\"} 3\n",
            "\npabal_handoff_dropped_total{reason=\"refused\"} 1\n",
            "\npabal_handoff_dropped_total{reason=\"channel_full\"} 0\n",
            "\npabal_handoff_batch_seconds_bucket{le=\"1.0\"} 2\n",
            "\npabal_handoff_batch_seconds_count 2\n",
        ] {
            assert!(text.contains(expected), "{expected:?} in\n{text}");
        }
    }

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?} in\n{text}"))
    }

    #[test]
    fn histograms_become_cumulative_seconds_with_inf() {
        let text = scrape().render().unwrap();
        let name = "pabal_publish_to_send_seconds";
        assert_eq!(
            line(&text, &format!("{name}_bucket{{le=\"0.000001\"}}"))
                .split(' ')
                .nth(1),
            Some("4")
        );
        assert_eq!(
            line(&text, &format!("{name}_bucket{{le=\"0.000002\"}}"))
                .split(' ')
                .nth(1),
            Some("5")
        );
        assert_eq!(
            line(&text, &format!("{name}_bucket{{le=\"0.001\"}}"))
                .split(' ')
                .nth(1),
            Some("5")
        );
        assert_eq!(
            line(&text, &format!("{name}_bucket{{le=\"0.0025\"}}"))
                .split(' ')
                .nth(1),
            Some("8")
        );
        assert_eq!(
            line(&text, &format!("{name}_bucket{{le=\"1.0\"}}"))
                .split(' ')
                .nth(1),
            Some("8")
        );
        assert_eq!(
            line(&text, &format!("{name}_bucket{{le=\"+Inf\"}}"))
                .split(' ')
                .nth(1),
            Some("10")
        );
        assert_eq!(
            line(&text, &format!("{name}_count ")),
            format!("{name}_count 10")
        );
        let sum: f64 = line(&text, &format!("{name}_sum "))
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 4.006006).abs() < 1e-9, "{sum}");
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with(&format!("{name}_bucket")))
                .count(),
            BUCKETS.len() + 1
        );
    }

    #[test]
    fn counters_are_per_worker_and_errors_by_kind() {
        let text = scrape().render().unwrap();
        assert!(
            text.contains("\npabal_messages_accepted_total{worker=\"0\"} 10\n"),
            "{text}"
        );
        assert!(
            text.contains("\npabal_messages_accepted_total{worker=\"1\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("\npabal_errors_total{worker=\"0\",kind=\"rate_limited\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("\npabal_connections{worker=\"0\",backend=\"epoll\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("\npabal_inbox_batches{worker=\"1\"} 5\n"),
            "{text}"
        );
        assert!(text.contains("\n# TYPE pabal_errors counter\n"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
