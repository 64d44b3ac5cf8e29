//! What loadgen measures: HdrHistograms of latencies (in microseconds) and plain counters,
//! kept per worker thread without any sharing and merged at the end.
//!
//! Owns: the histograms, the counters and the per-second series. Must not touch: sockets,
//! the ledger, reports (those read a merged [`Metrics`]).

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::plan::Bucket;

/// Highest value a histogram holds: one hour, in microseconds (larger values saturate).
pub const MAX_US: u64 = 3_600_000_000;

/// A histogram for latencies in µs, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("constant bounds within hdrhistogram's range")
}

/// A coarser histogram (2 significant digits) for the per-second series.
pub fn coarse_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 2).expect("constant bounds within hdrhistogram's range")
}

/// Records a duration in ns into a µs histogram (at least 1 µs, saturating at the top).
pub fn record_ns(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record((ns / 1000).max(1));
}

/// Counters of one worker (or of the whole run, merged).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// PUBLISH frames written (sequenced messages).
    pub published: u64,
    /// PUBACKs received (or API publishes answered with a sequence).
    pub acked: u64,
    /// Publishes refused by the relay with an ERROR (rate limit, ...).
    pub refused: u64,
    /// Publishes whose connection ended before their PUBACK came.
    pub unacked_at_close: u64,
    /// Scheduled publishes skipped because the phone was not connected.
    pub skipped_offline: u64,
    /// Scheduled publishes skipped because the target room was not bound yet.
    pub skipped_unbound: u64,
    /// Sequenced messages delivered to phones.
    pub delivered: u64,
    /// Of those, messages sent before the receiver's current connection was welcomed
    /// (replayed on resume, or caught up after a join).
    pub delivered_resumed: u64,
    /// Deliveries with no link baseline (the sender's uplink time was not known).
    pub link_unknown: u64,
    /// GAP frames received.
    pub gaps: u64,
    /// Sequences announced lost by GAPs.
    pub gap_messages: u64,
    /// ROOMs that started a new epoch for a room the phone held (announced loss).
    pub epoch_resets: u64,
    /// LEFT frames.
    pub lefts: u64,
    /// Connection attempts.
    pub connects: u64,
    /// Attempts that failed before WELCOME (refused, reset, timed out).
    pub connect_failures: u64,
    /// WELCOMEs received.
    pub welcomes: u64,
    /// WELCOMEs on reconnects.
    pub reconnects: u64,
    /// Connections dropped by a link handover.
    pub link_drops: u64,
    /// Links blackholed by NAT expiry.
    pub blackholes: u64,
    /// Connections dropped by the scenario (`[drops]` and `[[event]]`).
    pub scripted_drops: u64,
    /// Connections the phone gave up on after its keepalive probe went unanswered.
    pub keepalive_timeouts: u64,
    /// Connections the relay closed (EOF or reset without GOAWAY).
    pub closed_by_relay: u64,
    /// GOAWAYs, by reason.
    pub goaways: BTreeMap<String, u64>,
    /// ERRORs from the relay, by code (and whether fatal).
    pub errors: BTreeMap<String, u64>,
    /// PINGs answered.
    pub pongs: u64,
    /// Keepalive PINGs sent.
    pub probes: u64,
    /// Bytes read from sockets (relay to phones).
    pub bytes_down: u64,
    /// Bytes written to sockets (phones to relay).
    pub bytes_up: u64,
}

impl Counters {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Counters) {
        macro_rules! sum {
            ($($f:ident),*) => { $(self.$f += other.$f;)* };
        }
        sum!(
            published,
            acked,
            refused,
            unacked_at_close,
            skipped_offline,
            skipped_unbound,
            delivered,
            delivered_resumed,
            link_unknown,
            gaps,
            gap_messages,
            epoch_resets,
            lefts,
            connects,
            connect_failures,
            welcomes,
            reconnects,
            link_drops,
            blackholes,
            scripted_drops,
            keepalive_timeouts,
            closed_by_relay,
            pongs,
            probes,
            bytes_down,
            bytes_up
        );
        for (k, v) in &other.goaways {
            *self.goaways.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }

    /// Connections lost: handovers, scenario drops, keepalive timeouts, closed by the relay.
    pub fn drops_total(&self) -> u64 {
        self.link_drops + self.scripted_drops + self.keepalive_timeouts + self.closed_by_relay
    }

    /// GOAWAYs of every reason.
    pub fn goaway_total(&self) -> u64 {
        self.goaways.values().sum()
    }
}

/// One delivery, when tracing is on (tests, debugging).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeliveryRecord {
    /// Receiving phone.
    pub phone: u32,
    /// Room index.
    pub room: u32,
    /// Sequence.
    pub seq: u64,
    /// Sender index.
    pub sender: u32,
    /// When it was decoded, ns since the run started.
    pub at_ns: u64,
    /// End-to-end latency from the intended send time, ns.
    pub e2e_ns: u64,
    /// The link model's share (uplink + downlink), ns, when known.
    pub link_ns: Option<u64>,
    /// Bytes of its DELIVER frame.
    pub frame_len: u32,
}

/// A set of histograms keyed the way the report breaks them down.
#[derive(Debug, Clone)]
pub struct Breakdown {
    /// Everything.
    pub all: Histogram<u64>,
    /// By the receiver's link profile (index into the plan's profiles).
    pub by_profile: Vec<Histogram<u64>>,
    /// By fan-out bucket ([`Bucket::index`]).
    pub by_bucket: Vec<Histogram<u64>>,
}

impl Breakdown {
    /// Empty, for `profiles` profiles.
    pub fn new(profiles: usize) -> Breakdown {
        Breakdown {
            all: histogram(),
            by_profile: (0..profiles).map(|_| histogram()).collect(),
            by_bucket: Bucket::ALL.iter().map(|_| histogram()).collect(),
        }
    }

    /// Records `ns` for a receiver on `profile` in a room of `bucket`.
    pub fn record(&mut self, profile: usize, bucket: Bucket, ns: u64) {
        record_ns(&mut self.all, ns);
        if let Some(h) = self.by_profile.get_mut(profile) {
            record_ns(h, ns);
        }
        record_ns(&mut self.by_bucket[bucket.index()], ns);
    }

    fn add(&mut self, other: &Breakdown) {
        let _ = self.all.add(&other.all);
        for (a, b) in self.by_profile.iter_mut().zip(&other.by_profile) {
            let _ = a.add(b);
        }
        for (a, b) in self.by_bucket.iter_mut().zip(&other.by_bucket) {
            let _ = a.add(b);
        }
    }
}

/// Everything one worker measured.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// End-to-end delivery latency, from the intended send time to decoding, of live
    /// deliveries: the receiver was connected (welcomed) when the message was meant to be
    /// sent.
    pub e2e: Breakdown,
    /// The link model's share of each delivery (sender's uplink + receiver's downlink).
    pub link: Breakdown,
    /// End to end minus the link's share: what the relay (and the loopback, and loadgen's
    /// own scheduling) added.
    pub relay: Breakdown,
    /// TCP connect to WELCOME, first connections.
    pub connect: Histogram<u64>,
    /// TCP connect to WELCOME, reconnections.
    pub reconnect: Histogram<u64>,
    /// Reconnection to caught up (every room's cursor at the head known when reconnecting).
    pub resume: Histogram<u64>,
    /// End-to-end latency of deliveries that were sent while the receiver was away, and
    /// reached it on its next connection (their latency is mostly the receiver's absence).
    pub resumed: Histogram<u64>,
    /// End-to-end latency of deliveries after either end's link had been idle.
    pub after_idle: Histogram<u64>,
    /// How late loadgen got to a phone after its timer was due or its socket became ready
    /// (a loaded loadgen shows here first; this lag is inside the "relay added" figures).
    pub timer_lag: Histogram<u64>,
    /// Counters.
    pub counters: Counters,
    /// Every delivery, when tracing.
    pub trace: Option<Vec<DeliveryRecord>>,
}

impl Metrics {
    /// Empty metrics for `profiles` link profiles.
    pub fn new(profiles: usize, trace: bool) -> Metrics {
        Metrics {
            e2e: Breakdown::new(profiles),
            link: Breakdown::new(profiles),
            relay: Breakdown::new(profiles),
            connect: histogram(),
            reconnect: histogram(),
            resume: histogram(),
            resumed: histogram(),
            after_idle: histogram(),
            timer_lag: histogram(),
            counters: Counters::default(),
            trace: trace.then(Vec::new),
        }
    }

    /// Adds another worker's metrics.
    pub fn merge(&mut self, other: Metrics) {
        self.e2e.add(&other.e2e);
        self.link.add(&other.link);
        self.relay.add(&other.relay);
        for (a, b) in [
            (&mut self.connect, &other.connect),
            (&mut self.reconnect, &other.reconnect),
            (&mut self.resume, &other.resume),
            (&mut self.resumed, &other.resumed),
            (&mut self.after_idle, &other.after_idle),
            (&mut self.timer_lag, &other.timer_lag),
        ] {
            let _ = a.add(b);
        }
        self.counters.add(&other.counters);
        if let (Some(a), Some(b)) = (&mut self.trace, other.trace) {
            a.extend(b);
        }
    }
}

/// Percentiles of a histogram, in ms, for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Median, ms.
    pub p50: f64,
    /// 90th percentile, ms.
    pub p90: f64,
    /// 99th percentile, ms.
    pub p99: f64,
    /// 99.9th percentile, ms.
    pub p999: f64,
    /// Largest, ms.
    pub max: f64,
    /// Mean, ms.
    pub mean: f64,
}

impl Summary {
    /// The summary of a µs histogram.
    pub fn of(h: &Histogram<u64>) -> Summary {
        if h.is_empty() {
            return Summary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Summary {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// One second of one worker, sent to the main thread for the live line and the chart.
#[derive(Debug, Clone)]
pub struct Second {
    /// Which worker.
    pub worker: usize,
    /// Seconds since the start (this covers `[sec, sec + 1)`).
    pub sec: u32,
    /// End-to-end latencies of this second's live deliveries.
    pub e2e: Histogram<u64>,
    /// What the relay added to them (end to end minus the link's share).
    pub relay: Histogram<u64>,
    /// loadgen's own lag this second (due or ready -> handled).
    pub lag: Histogram<u64>,
    /// Counters so far (cumulative).
    pub counters: Counters,
    /// Violations so far (cumulative).
    pub violations: u64,
    /// Phones connected (WELCOME received) now.
    pub connected: u64,
    /// During the drain: every phone of the worker has caught up.
    pub settled: bool,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn breakdowns_record_and_merge() {
        let mut a = Metrics::new(2, false);
        let mut b = Metrics::new(2, false);
        a.e2e.record(0, Bucket::Direct, 2_000_000);
        b.e2e.record(1, Bucket::Channel, 4_000_000);
        b.counters.delivered = 1;
        b.counters.goaways.insert("overload".into(), 2);
        a.merge(b);
        assert_eq!(a.e2e.all.len(), 2);
        assert_eq!(a.e2e.by_profile[1].len(), 1);
        assert_eq!(a.e2e.by_bucket[Bucket::Channel.index()].len(), 1);
        assert_eq!(a.counters.goaway_total(), 2);
        let s = Summary::of(&a.e2e.all);
        assert!((s.max - 4.0).abs() < 0.01, "{s:?}");
    }
}
