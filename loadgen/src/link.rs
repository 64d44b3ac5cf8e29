//! The link model: a sans-IO, deterministic, seeded emulator of one phone's mobile link.
//!
//! This kernel has no netem, so loadgen shapes traffic in user space. A [`Link`] stands between
//! a virtual phone and the real TCP socket that leads to the relay. It has two directions
//! ([`Direction::Up`], phone to relay, and [`Direction::Down`], relay to phone) that share one
//! radio, one NAT mapping and one handover schedule, because all three belong to the phone.
//!
//! # What it owns, what it must not touch
//! The model owns the arithmetic of one link: when each offered byte comes out of the far end,
//! how many more bytes a direction will take now, and when the flow dies. It never reads a
//! clock (time is passed in as [`Instant`]s), opens no socket, spawns no thread and logs
//! nothing. The same profile, seed, start instant and calls give the same schedule (within
//! one build: `SmallRng`'s algorithm may change between `rand` versions or platforms).
//!
//! This file holds the profile (the serialized configuration and its validation) and the
//! [`Link`] with its two lanes and NAT; the radio's state machine is in [`radio`] and the
//! handover schedule in [`mobility`].
//!
//! # How bytes are scheduled
//! Each offer is cut into segments of [`LinkProfile::segment_bytes`]. Each segment:
//! 1. waits for the radio: a promotion delay if the radio is idle (or, on 3G, in FACH with a
//!    burst above the FACH threshold); small 3G bursts in FACH travel at the FACH rate instead;
//! 2. waits for the serializer ("link busy until"): bytes leave at the direction's bandwidth,
//!    so a 400 kbit/s direction carries 50,000 B/s;
//! 3. if lost (probability [`LinkProfile::loss`] per segment), waits one RTO before it is
//!    (re)sent, and so does everything behind it; the RTO starts at
//!    [`LinkProfile::initial_rto_ms`], doubles while consecutive segments are lost (up to
//!    [`LinkProfile::max_rto_ms`]) and resets after a segment gets through (RFC 3481: loss
//!    above a link with link-layer retransmission shows up as delay, not as missing bytes);
//! 4. never transmits during a handover stall, and is not delivered during one;
//! 5. is delivered after the one-way delay plus a uniform jitter in
//!    `[-jitter, +jitter]` (clamped at zero), but never before the segment ahead of it:
//!    delivery times are monotone per direction, so jitter never reorders a TCP byte stream.
//!
//! Everything is computed eagerly when bytes are offered; later calls only look the schedule
//! up. Radio state, NAT expiry and handovers are functions of time, evaluated lazily. Pass
//! instants from one monotonic clock, non-decreasing from call to call; an earlier one is
//! tolerated (never a panic) but may be treated as the latest seen.
//!
//! # Driving it (the event loop's contract)
//! ```text
//! loop {
//!     // phone -> relay: the virtual phone offers at most can_accept(Up, now) bytes
//!     // relay -> phone: read at most can_accept(Down, now) bytes from the socket, offer them;
//!     //                 when it is 0, stop reading: TCP backpressure then reaches the relay
//!     while let Some(b) = link.poll_deliver(Up, now)   { write b to the relay socket }
//!     while let Some(b) = link.poll_deliver(Down, now) { hand b to the virtual phone }
//!     match link.poll_event(now) {
//!         Some(LinkEvent::Dropped { .. })    => close the socket,
//!         Some(LinkEvent::Blackholed { .. }) => stop relaying both ways, keep the socket open,
//!         None => {}
//!     }
//!     sleep until min(link.next_event(now), socket readiness); now = clock
//! }
//! ```
//! Deliver before polling events: bytes due before a drop are still handed out afterwards.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

mod mobility;
mod radio;

use mobility::Mobility;
use radio::Radio;

/// Default [`LinkProfile::segment_bytes`]: a TCP segment's payload, rounded down from the
/// 1448 B an Ethernet-sized MSS leaves with timestamps.
pub const DEFAULT_SEGMENT_BYTES: usize = 1400;
/// Default [`LinkProfile::buffer_bytes`]: how much a direction queues before it pushes back.
pub const DEFAULT_BUFFER_BYTES: usize = 64 * 1024;
/// Default [`LinkProfile::initial_rto_ms`]: RFC 6298's initial RTO, 1 s.
pub const DEFAULT_INITIAL_RTO_MS: u64 = 1000;
/// Default [`LinkProfile::max_rto_ms`]: RFC 6298 allows a cap of at least 60 s.
pub const DEFAULT_MAX_RTO_MS: u64 = 60_000;
/// The largest value a `*_ms` profile field may take: one day.
pub const MAX_MILLIS: u64 = 86_400_000;
/// The largest value a `*_s` profile field may take: one year.
pub const MAX_SECS: u64 = 365 * 86_400;

/// A profile's millisecond value as a duration, clamped to [`MAX_MILLIS`].
fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms.min(MAX_MILLIS))
}

/// Everything the model needs to know about one kind of link.
///
/// Deserializable from TOML (unknown fields are rejected); every field but `name` has a
/// default, and the defaults describe a perfect link: no bandwidth limit, no delay, no loss,
/// no radio, no NAT, no handovers. Run [`LinkProfile::validate`] on profiles that come from
/// outside; [`Link::new`] clamps out-of-range values instead of failing.
///
/// ```toml
/// name = "3g"
/// down_kbps = 780
/// up_kbps = 330
/// delay_ms = 100
/// jitter_ms = 30
/// loss = 0.005
/// nat_idle_timeout_s = 600
/// radio = { model = "umts_rrc" }
/// handover = { mean_interval_s = 900, stall_min_ms = 1000, stall_max_ms = 3000 }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkProfile {
    /// The profile's name, as used in a profile mix ("3g", "lte").
    pub name: String,
    /// Downlink (relay to phone) bandwidth in kbit/s (1 kbit = 1000 bit). Absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_kbps: Option<u32>,
    /// Uplink (phone to relay) bandwidth in kbit/s. Absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_kbps: Option<u32>,
    /// One-way propagation delay in ms, applied in each direction. Default 0.
    #[serde(default)]
    pub delay_ms: u64,
    /// Jitter in ms: each segment's delay varies uniformly within `delay_ms ± jitter_ms`
    /// (never below zero, never reordering). Default 0.
    #[serde(default)]
    pub jitter_ms: u64,
    /// Probability (0..=1) that a segment is lost once and stalls its direction for one RTO.
    /// Default 0.
    #[serde(default)]
    pub loss: f64,
    /// The radio's power-state model. Default: none (always on).
    #[serde(default)]
    pub radio: RadioModel,
    /// Seconds without a byte in either direction after which the carrier NAT forgets the flow
    /// and silently drops everything. Absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_idle_timeout_s: Option<u64>,
    /// Cell handovers. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<HandoverModel>,
    /// Granularity of loss, jitter and serialization, in payload bytes. Default 1400.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: usize,
    /// Extra bytes serialized per segment (IP and TCP headers: 52 B with IPv4 and timestamps).
    /// Default 0: bandwidth applies to payload, as the published presets apply it.
    #[serde(default)]
    pub overhead_bytes: usize,
    /// How many bytes a direction holds (waiting to be serialized, or delivered but not yet
    /// collected) before [`Link::can_accept`] says 0. Default 65536.
    #[serde(default = "default_buffer_bytes")]
    pub buffer_bytes: usize,
    /// The RTO a lost segment waits when the previous one got through, in ms. Default 1000.
    #[serde(default = "default_initial_rto_ms")]
    pub initial_rto_ms: u64,
    /// Cap on the doubling RTO, in ms. Default 60000.
    #[serde(default = "default_max_rto_ms")]
    pub max_rto_ms: u64,
}

fn default_segment_bytes() -> usize {
    DEFAULT_SEGMENT_BYTES
}
fn default_buffer_bytes() -> usize {
    DEFAULT_BUFFER_BYTES
}
fn default_initial_rto_ms() -> u64 {
    DEFAULT_INITIAL_RTO_MS
}
fn default_max_rto_ms() -> u64 {
    DEFAULT_MAX_RTO_MS
}

impl LinkProfile {
    /// A profile with `name` and every other field at its default: a perfect link.
    pub fn unshaped(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            down_kbps: None,
            up_kbps: None,
            delay_ms: 0,
            jitter_ms: 0,
            loss: 0.0,
            radio: RadioModel::None,
            nat_idle_timeout_s: None,
            handover: None,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            overhead_bytes: 0,
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            initial_rto_ms: DEFAULT_INITIAL_RTO_MS,
            max_rto_ms: DEFAULT_MAX_RTO_MS,
        }
    }

    /// Checks every field's range; the error names the profile and the field.
    pub fn validate(&self) -> Result<(), InvalidProfile> {
        let bad = |field: &'static str, problem: &str| {
            Err(InvalidProfile {
                profile: self.name.clone(),
                field,
                problem: problem.to_owned(),
            })
        };
        let probability = |p: f64| p.is_finite() && (0.0..=1.0).contains(&p);
        if self.name.trim().is_empty() {
            return bad("name", "must not be empty");
        }
        if self.down_kbps == Some(0) {
            return bad("down_kbps", "must be at least 1 (omit it for unlimited)");
        }
        if self.up_kbps == Some(0) {
            return bad("up_kbps", "must be at least 1 (omit it for unlimited)");
        }
        if !probability(self.loss) {
            return bad("loss", "must be a probability between 0 and 1");
        }
        if self.nat_idle_timeout_s == Some(0) {
            return bad(
                "nat_idle_timeout_s",
                "must be at least 1 (omit it for never)",
            );
        }
        let too_long = |ms: u64| ms > MAX_MILLIS;
        for (field, value) in [
            ("delay_ms", self.delay_ms),
            ("jitter_ms", self.jitter_ms),
            ("initial_rto_ms", self.initial_rto_ms),
            ("max_rto_ms", self.max_rto_ms),
        ] {
            if too_long(value) {
                return bad(field, "must be at most 86400000 (one day)");
            }
        }
        if self.nat_idle_timeout_s.is_some_and(|s| s > MAX_SECS) {
            return bad("nat_idle_timeout_s", "must be at most 31536000 (one year)");
        }
        let radio_ms: &[(&'static str, u64)] = match &self.radio {
            RadioModel::None => &[],
            RadioModel::UmtsRrc(u) => &[
                ("radio.idle_to_dch_ms", u.idle_to_dch_ms),
                ("radio.fach_to_dch_ms", u.fach_to_dch_ms),
                ("radio.dch_tail_ms", u.dch_tail_ms),
                ("radio.fach_tail_ms", u.fach_tail_ms),
            ],
            RadioModel::Lte(l) => &[
                ("radio.promotion_ms", l.promotion_ms),
                ("radio.tail_ms", l.tail_ms),
                ("radio.paging_cycle_ms", l.paging_cycle_ms),
            ],
            RadioModel::Generic(g) => &[
                ("radio.promotion_ms", g.promotion_ms),
                ("radio.idle_after_ms", g.idle_after_ms),
            ],
        };
        for &(field, value) in radio_ms {
            if too_long(value) {
                return bad(field, "must be at most 86400000 (one day)");
            }
        }
        if self.segment_bytes == 0 {
            return bad("segment_bytes", "must be at least 1");
        }
        if self.buffer_bytes == 0 {
            return bad("buffer_bytes", "must be at least 1");
        }
        if self.initial_rto_ms == 0 {
            return bad("initial_rto_ms", "must be at least 1");
        }
        if self.max_rto_ms < self.initial_rto_ms {
            return bad("max_rto_ms", "must be at least initial_rto_ms");
        }
        if let RadioModel::UmtsRrc(u) = &self.radio
            && u.fach_kbps == 0
        {
            return bad("radio.fach_kbps", "must be at least 1");
        }
        if let Some(h) = &self.handover {
            if h.mean_interval_s == 0 {
                return bad("handover.mean_interval_s", "must be at least 1");
            }
            if h.mean_interval_s > MAX_SECS {
                return bad(
                    "handover.mean_interval_s",
                    "must be at most 31536000 (one year)",
                );
            }
            if too_long(h.stall_max_ms) {
                return bad(
                    "handover.stall_max_ms",
                    "must be at most 86400000 (one day)",
                );
            }
            if h.stall_min_ms > h.stall_max_ms {
                return bad("handover.stall_min_ms", "must not exceed stall_max_ms");
            }
            if !probability(h.drop_probability) {
                return bad(
                    "handover.drop_probability",
                    "must be a probability between 0 and 1",
                );
            }
        }
        Ok(())
    }
}

/// A [`LinkProfile`] field out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("link profile {profile:?}: `{field}` {problem}")]
pub struct InvalidProfile {
    /// The profile's name.
    pub profile: String,
    /// The offending field, dotted for nested ones (`handover.stall_min_ms`).
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

/// The radio's power states, shared by both directions of a phone: data either way wakes it
/// and restarts its tail timers. In TOML: `radio = { model = "umts_rrc" }`, with any of the
/// model's fields overriding its defaults.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "snake_case", deny_unknown_fields)]
pub enum RadioModel {
    /// Always on: no promotion delay ever.
    #[default]
    None,
    /// 3G (UMTS) RRC: IDLE, FACH (shared low-rate channel) and DCH (dedicated channel).
    UmtsRrc(UmtsRrc),
    /// LTE RRC: RRC_IDLE and RRC_CONNECTED, with a paging cycle for downlink data in idle.
    Lte(LteRadio),
    /// Any two-state radio: a promotion delay after `idle_after_ms` of silence.
    Generic(GenericRadio),
}

/// 3G RRC timers and thresholds (Qian et al., IMC 2010).
///
/// From IDLE, any data promotes to DCH. From FACH, a burst (the bytes this direction has
/// waiting, plus the new ones) of at most the direction's threshold travels on FACH at
/// `fach_kbps` without promotion; a larger one promotes to DCH. DCH falls to FACH after
/// `dch_tail_ms` without data, FACH to IDLE after a further `fach_tail_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UmtsRrc {
    /// IDLE to DCH promotion, ms. Default 2000.
    pub idle_to_dch_ms: u64,
    /// FACH to DCH promotion, ms. Default 1500.
    pub fach_to_dch_ms: u64,
    /// DCH to FACH inactivity timer, ms. Default 5000.
    pub dch_tail_ms: u64,
    /// FACH to IDLE inactivity timer, ms. Default 12000.
    pub fach_tail_ms: u64,
    /// Largest downlink burst FACH carries without promotion, bytes. Default 475.
    pub fach_down_threshold_bytes: usize,
    /// Largest uplink burst FACH carries without promotion, bytes. Default 543.
    pub fach_up_threshold_bytes: usize,
    /// FACH's rate, kbit/s (capped at the profile's bandwidth). Default 32.
    pub fach_kbps: u32,
}

impl Default for UmtsRrc {
    fn default() -> Self {
        Self {
            idle_to_dch_ms: 2000,
            fach_to_dch_ms: 1500,
            dch_tail_ms: 5000,
            fach_tail_ms: 12_000,
            fach_down_threshold_bytes: 475,
            fach_up_threshold_bytes: 543,
            fach_kbps: 32,
        }
    }
}

/// LTE RRC timers (Huang et al., MobiSys 2012).
///
/// After `tail_ms` without data the radio drops to RRC_IDLE. Data from idle waits
/// `promotion_ms`; downlink data first waits for the phone's next paging occasion (one per
/// `paging_cycle_ms`, at a phase fixed by the seed; 0 turns paging off).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LteRadio {
    /// RRC_IDLE to RRC_CONNECTED promotion, ms. Default 260.
    pub promotion_ms: u64,
    /// RRC_CONNECTED inactivity timer, ms. Default 10000.
    pub tail_ms: u64,
    /// Idle paging (DRX) cycle, ms. Default 1280.
    pub paging_cycle_ms: u64,
}

impl Default for LteRadio {
    fn default() -> Self {
        Self {
            promotion_ms: 260,
            tail_ms: 10_000,
            paging_cycle_ms: 1280,
        }
    }
}

/// A two-state radio: after `idle_after_ms` without data it sleeps; the next data waits
/// `promotion_ms`. Both fields are required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenericRadio {
    /// Sleep to active promotion, ms.
    pub promotion_ms: u64,
    /// Inactivity before the radio sleeps, ms.
    pub idle_after_ms: u64,
}

/// Cell handovers: a Poisson process. Each handover stalls both directions for a duration
/// drawn uniformly from `stall_min_ms..=stall_max_ms` and, with `drop_probability`, kills the
/// connection at its start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoverModel {
    /// Mean time between handovers (start to start), seconds.
    pub mean_interval_s: u64,
    /// Shortest stall, ms.
    pub stall_min_ms: u64,
    /// Longest stall, ms.
    pub stall_max_ms: u64,
    /// Probability (0..=1) that a handover kills the TCP connection. Default 0.
    #[serde(default)]
    pub drop_probability: f64,
}

/// One direction of a [`Link`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Uplink: phone to relay.
    Up,
    /// Downlink: relay to phone.
    Down,
}

impl Direction {
    /// Both directions, uplink first.
    pub const BOTH: [Direction; 2] = [Direction::Up, Direction::Down];

    fn index(self) -> usize {
        match self {
            Direction::Up => 0,
            Direction::Down => 1,
        }
    }
}

/// Whether the flow still carries bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkState {
    /// Bytes flow (subject to the schedule).
    Open,
    /// The NAT forgot the flow: everything offered vanishes, both ways, with no RST. The event
    /// loop stops relaying and keeps the socket open; the relay must notice by its heartbeat.
    Blackholed,
    /// A handover killed the connection: the event loop closes the socket.
    Dropped,
}

/// A change of [`LinkState`], reported once by [`Link::poll_event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LinkEvent {
    /// The NAT idle timeout expired at `at`.
    Blackholed {
        /// When the flow died (last activity plus the NAT idle timeout).
        at: Instant,
    },
    /// A handover dropped the connection at `at`.
    Dropped {
        /// When the connection died (the handover's start).
        at: Instant,
    },
}

/// What became of an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OfferOutcome {
    /// The bytes are scheduled and will come out of [`Link::poll_deliver`] in order.
    Scheduled,
    /// The link is blackholed or dropped: the bytes are gone.
    Swallowed,
}

/// The radio's power state at an instant, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RadioState {
    /// No radio model: always ready.
    AlwaysOn,
    /// Asleep: the next data pays a promotion.
    Idle,
    /// 3G shared channel: small bursts go at FACH rate, larger ones promote.
    Fach,
    /// 3G dedicated channel: full rate.
    Dch,
    /// LTE or generic radio awake.
    Connected,
    /// A promotion is under way; data waits until `ready_at`.
    Promoting {
        /// When the promotion completes.
        ready_at: Instant,
    },
}

/// Byte and segment counters of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Bytes offered while the link was open (scheduled for delivery).
    pub offered_bytes: u64,
    /// Bytes handed out by `poll_deliver`/`deliver_into`.
    pub delivered_bytes: u64,
    /// Bytes offered after the link was blackholed or dropped.
    pub swallowed_bytes: u64,
    /// Bytes scheduled but discarded because a handover dropped the connection first.
    pub discarded_bytes: u64,
    /// Segments scheduled.
    pub segments: u64,
    /// Segments that paid an RTO stall.
    pub lost_segments: u64,
}

/// Counters of a whole link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Uplink counters.
    pub up: DirectionStats,
    /// Downlink counters.
    pub down: DirectionStats,
    /// Radio promotions (IDLE or FACH to DCH, idle to connected).
    pub promotions: u64,
}

/// One phone's emulated link: two directions sharing a radio, a NAT mapping and a handover
/// schedule. See the module docs for the model and the event loop's contract.
#[derive(Debug, Clone)]
pub struct Link {
    profile: Arc<LinkProfile>,
    shape: Shape,
    lanes: [Lane; 2],
    radio: Radio,
    nat: Option<Nat>,
    mobility: Option<Mobility>,
    event_reported: bool,
    promotions: u64,
}

/// The profile turned into the units the scheduler uses, with out-of-range values clamped.
#[derive(Debug, Clone)]
struct Shape {
    kbps: [Option<u32>; 2],
    delay: Duration,
    jitter: Duration,
    loss: f64,
    /// `usize::MAX` when nothing is per-segment (unlimited, lossless, jitterless).
    segment: usize,
    overhead: usize,
    buffer: usize,
    initial_rto: Duration,
    max_rto: Duration,
}

#[derive(Debug, Clone)]
struct Segment {
    data: Bytes,
    /// When its last bit leaves the serializer.
    tx_end: Instant,
    /// When it comes out of the far end.
    deliver_at: Instant,
}

#[derive(Debug, Clone)]
struct Lane {
    queue: VecDeque<Segment>,
    busy_until: Instant,
    last_deliver: Instant,
    rto: Duration,
    rng: SmallRng,
    stats: DirectionStats,
}

#[derive(Debug, Clone)]
struct Nat {
    timeout: Duration,
    /// The last instant a byte passed (or is scheduled to pass) in either direction.
    last: Instant,
}

const SALT_UP: u64 = 0x7570_6c69_6e6b_0001;
const SALT_DOWN: u64 = 0x646f_776e_6c69_0002;
const SALT_MOBILITY: u64 = 0x6d6f_6269_6c65_0003;
const SALT_PAGING: u64 = 0x7061_6769_6e67_0004;

impl Link {
    /// A link for one phone whose connection starts at `now` (the radio is awake and the NAT
    /// mapping fresh, as right after a TCP handshake). The same `profile`, `seed`, `now` and
    /// sequence of calls give the same schedule. Out-of-range profile values are clamped
    /// (see [`LinkProfile::validate`] to reject them instead). Pass an `Arc` to share one
    /// profile among many links (a [`crate::profiles::ProfileMix`] hands out `Arc`s).
    pub fn new(profile: impl Into<Arc<LinkProfile>>, seed: u64, now: Instant) -> Self {
        let profile: Arc<LinkProfile> = profile.into();
        let p = &*profile;
        let kbps = [p.up_kbps.map(|k| k.max(1)), p.down_kbps.map(|k| k.max(1))];
        let loss = if p.loss.is_finite() {
            p.loss.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let jitter = millis(p.jitter_ms);
        let per_segment = kbps.iter().any(Option::is_some) || loss > 0.0 || !jitter.is_zero();
        let initial_rto = millis(p.initial_rto_ms.max(1));
        let shape = Shape {
            kbps,
            delay: millis(p.delay_ms),
            jitter,
            loss,
            segment: if per_segment {
                p.segment_bytes.max(1)
            } else {
                usize::MAX
            },
            overhead: p.overhead_bytes,
            buffer: p.buffer_bytes.max(1),
            initial_rto,
            max_rto: millis(p.max_rto_ms).max(initial_rto),
        };
        let lane = |salt: u64| Lane {
            queue: VecDeque::new(),
            busy_until: now,
            last_deliver: now,
            rto: initial_rto,
            rng: SmallRng::seed_from_u64(splitmix64(seed ^ salt)),
            stats: DirectionStats::default(),
        };
        Self {
            lanes: [lane(SALT_UP), lane(SALT_DOWN)],
            radio: Radio::new(&p.radio, splitmix64(seed ^ SALT_PAGING), now),
            nat: p.nat_idle_timeout_s.map(|s| Nat {
                timeout: Duration::from_secs(s.clamp(1, MAX_SECS)),
                last: now,
            }),
            mobility: p
                .handover
                .as_ref()
                .map(|h| Mobility::new(h, splitmix64(seed ^ SALT_MOBILITY), now)),
            shape,
            event_reported: false,
            promotions: 0,
            profile,
        }
    }

    /// The profile this link was built from.
    pub fn profile(&self) -> &LinkProfile {
        &self.profile
    }

    /// Offers `bytes` (copied) to `dir` at `now`. See [`Link::offer_bytes`].
    pub fn offer(&mut self, dir: Direction, now: Instant, bytes: &[u8]) -> OfferOutcome {
        self.offer_bytes(dir, now, Bytes::copy_from_slice(bytes))
    }

    /// Offers `data` to `dir` at `now` and schedules its delivery. All of it is taken even
    /// past [`Link::can_accept`] (the caller is expected to respect that bound); nothing is
    /// ever dropped while the link is open. Once the link is blackholed or dropped, the bytes
    /// are swallowed. An empty offer does nothing (and keeps no flow alive).
    pub fn offer_bytes(&mut self, dir: Direction, now: Instant, data: Bytes) -> OfferOutcome {
        self.advance(now);
        let i = dir.index();
        if self.terminal(now).is_some() {
            self.lanes[i].stats.swallowed_bytes += data.len() as u64;
            return OfferOutcome::Swallowed;
        }
        if data.is_empty() {
            return OfferOutcome::Scheduled;
        }
        let burst = self.lanes[i].unsent_bytes(now) + data.len();
        let admission = self.radio.admit(dir, now, burst);
        if admission.promoted {
            self.promotions += 1;
        }
        let kbps = match (admission.fach_kbps, self.shape.kbps[i]) {
            (Some(fach), Some(link)) => Some(fach.min(link)),
            (Some(fach), None) => Some(fach),
            (None, link) => link,
        };
        let lane = &mut self.lanes[i];
        let shape = &self.shape;
        let mobility = self.mobility.as_ref();
        let mut offset = 0;
        while offset < data.len() {
            let n = shape.segment.min(data.len() - offset);
            lane.schedule(
                data.slice(offset..offset + n),
                admission.floor,
                kbps,
                shape,
                mobility,
            );
            offset += n;
        }
        lane.stats.offered_bytes += data.len() as u64;
        let (busy_until, last_deliver) = (lane.busy_until, lane.last_deliver);
        self.radio.note_active(busy_until, admission.high);
        if let Some(nat) = &mut self.nat {
            nat.last = nat.last.max(now).max(last_deliver);
        }
        OfferOutcome::Scheduled
    }

    /// How many more bytes `dir` takes at `now` without its queue exceeding
    /// [`LinkProfile::buffer_bytes`]. The queue counts bytes not yet serialized plus bytes due
    /// but not yet collected; bytes in flight (serialized, not yet due) do not count. Zero once
    /// the link is blackholed or dropped: the event loop stops reading, as a dead path would.
    /// When this is less than a segment, [`Link::next_event`] includes the instant it grows.
    pub fn can_accept(&self, dir: Direction, now: Instant) -> usize {
        if self.terminal(now).is_some() {
            return 0;
        }
        let (held, _) = self.lanes[dir.index()].held(now);
        self.shape.buffer.saturating_sub(held)
    }

    /// The next chunk of `dir` whose delivery time has come by `now`, in offer order. Chunks
    /// are at most [`LinkProfile::segment_bytes`] long (whole offers on a link with nothing
    /// per-segment). Bytes due before a drop are still returned after it.
    pub fn poll_deliver(&mut self, dir: Direction, now: Instant) -> Option<Bytes> {
        self.advance(now);
        let lane = &mut self.lanes[dir.index()];
        if lane.queue.front()?.deliver_at > now {
            return None;
        }
        let segment = lane.queue.pop_front()?;
        lane.stats.delivered_bytes += segment.data.len() as u64;
        Some(segment.data)
    }

    /// Appends every byte of `dir` due by `now` to `out`; returns how many.
    pub fn deliver_into(&mut self, dir: Direction, now: Instant, out: &mut BytesMut) -> usize {
        let mut total = 0;
        while let Some(chunk) = self.poll_deliver(dir, now) {
            total += chunk.len();
            out.extend_from_slice(&chunk);
        }
        total
    }

    /// When the event loop should next call in, or `None` if nothing will happen until it
    /// offers bytes. The earliest of: the next delivery in either direction; the instant a
    /// direction that cannot take a whole segment frees space; the NAT expiry; the next
    /// handover that drops the connection (looking 64 handovers ahead; a later one shows up
    /// as a spurious wake-up at the 64th); an unreported [`LinkEvent`]. The result may be at or
    /// before `now`, meaning "call in now".
    pub fn next_event(&self, now: Instant) -> Option<Instant> {
        let terminal = self.terminal(now);
        let drop_at = match terminal {
            Some((LinkState::Dropped, at)) => Some(at),
            _ => None,
        };
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for lane in &self.lanes {
            if let Some(front) = lane.queue.front()
                && drop_at.is_none_or(|d| front.deliver_at < d)
            {
                consider(front.deliver_at);
            }
        }
        match terminal {
            Some((_, at)) => {
                if !self.event_reported {
                    consider(at);
                }
            }
            None => {
                let wanted = self.shape.segment.min(self.shape.buffer);
                for lane in &self.lanes {
                    let (held, space_at) = lane.held(now);
                    if let Some(t) = space_at
                        && self.shape.buffer.saturating_sub(held) < wanted
                    {
                        consider(t);
                    }
                }
                if let Some(nat) = &self.nat {
                    consider(nat.last + nat.timeout);
                }
                if let Some(t) = self.mobility.as_ref().and_then(|m| m.next_drop_after(now)) {
                    consider(t);
                }
            }
        }
        next
    }

    /// The link's state at `now`.
    pub fn state(&self, now: Instant) -> LinkState {
        self.terminal(now)
            .map_or(LinkState::Open, |(state, _)| state)
    }

    /// Whether the NAT has forgotten the flow by `now`.
    pub fn is_blackholed(&self, now: Instant) -> bool {
        self.state(now) == LinkState::Blackholed
    }

    /// Whether a handover has killed the connection by `now`.
    pub fn is_dropped(&self, now: Instant) -> bool {
        self.state(now) == LinkState::Dropped
    }

    /// Reports, once, that the link became blackholed or dropped by `now`.
    pub fn poll_event(&mut self, now: Instant) -> Option<LinkEvent> {
        self.advance(now);
        if self.event_reported {
            return None;
        }
        let (state, at) = self.terminal(now)?;
        self.event_reported = true;
        Some(match state {
            LinkState::Dropped => LinkEvent::Dropped { at },
            _ => LinkEvent::Blackholed { at },
        })
    }

    /// The radio's power state at `now`.
    pub fn radio_state(&self, now: Instant) -> RadioState {
        self.radio.state_at(now)
    }

    /// Bytes of `dir` scheduled but not yet delivered (queued, in flight or due).
    pub fn pending_bytes(&self, dir: Direction) -> usize {
        self.lanes[dir.index()]
            .queue
            .iter()
            .map(|s| s.data.len())
            .sum()
    }

    /// Counters since the link was created.
    pub fn stats(&self) -> LinkStats {
        LinkStats {
            up: self.lanes[0].stats,
            down: self.lanes[1].stats,
            promotions: self.promotions,
        }
    }

    /// How the flow ended by `now`, if it did: whichever of NAT expiry and a dropping handover
    /// came first.
    fn terminal(&self, now: Instant) -> Option<(LinkState, Instant)> {
        let blackhole = self
            .nat
            .as_ref()
            .map(|n| n.last + n.timeout)
            .filter(|&t| t <= now);
        let dropped = self.mobility.as_ref().and_then(|m| m.drop_at(now));
        match (blackhole, dropped) {
            (Some(b), Some(d)) if d < b => Some((LinkState::Dropped, d)),
            (Some(b), _) => Some((LinkState::Blackholed, b)),
            (None, Some(d)) => Some((LinkState::Dropped, d)),
            (None, None) => None,
        }
    }

    /// Moves the lazily evaluated state up to `now`: remembers passed handovers, and frees
    /// bytes that a drop made undeliverable.
    fn advance(&mut self, now: Instant) {
        if let Some(m) = &mut self.mobility {
            m.advance(now);
        }
        if let Some((LinkState::Dropped, at)) = self.terminal(now) {
            for lane in &mut self.lanes {
                while lane.queue.back().is_some_and(|s| s.deliver_at >= at) {
                    if let Some(s) = lane.queue.pop_back() {
                        lane.stats.discarded_bytes += s.data.len() as u64;
                    }
                }
            }
        }
    }
}

impl Lane {
    /// Schedules one segment (see the module docs for the steps).
    fn schedule(
        &mut self,
        data: Bytes,
        floor: Instant,
        kbps: Option<u32>,
        shape: &Shape,
        mobility: Option<&Mobility>,
    ) {
        // Always draw both numbers, so that one parameter never shifts another's sequence.
        let loss_draw: f64 = self.rng.random();
        let jitter_draw: f64 = self.rng.random();

        let mut start = floor.max(self.busy_until);
        if loss_draw < shape.loss {
            start += self.rto;
            self.rto = (self.rto * 2).min(shape.max_rto);
            self.stats.lost_segments += 1;
        } else {
            self.rto = shape.initial_rto;
        }
        let tx = kbps.map_or(Duration::ZERO, |k| {
            transmission_time(data.len() + shape.overhead, k)
        });
        if let Some(m) = mobility {
            start = m.clear_of(start, tx);
        }
        let tx_end = start + tx;

        let jitter_ns = shape.jitter.as_nanos() as f64 * (2.0 * jitter_draw - 1.0);
        let flight_ns = (shape.delay.as_nanos() as f64 + jitter_ns).max(0.0);
        let mut deliver_at = tx_end + Duration::from_nanos(flight_ns as u64);
        if let Some(m) = mobility {
            deliver_at = m.clear_of(deliver_at, Duration::ZERO);
        }
        let deliver_at = deliver_at.max(self.last_deliver);

        self.busy_until = tx_end;
        self.last_deliver = deliver_at;
        self.stats.segments += 1;
        self.queue.push_back(Segment {
            data,
            tx_end,
            deliver_at,
        });
    }

    /// Bytes not yet serialized at `now`.
    fn unsent_bytes(&self, now: Instant) -> usize {
        self.queue
            .iter()
            .rev()
            .take_while(|s| s.tx_end > now)
            .map(|s| s.data.len())
            .sum()
    }

    /// Bytes counted against the buffer at `now` (not yet serialized, or due and not
    /// collected), and when the first unserialized segment finishes (space frees up then).
    fn held(&self, now: Instant) -> (usize, Option<Instant>) {
        let mut held = 0;
        let mut space_at = None;
        for s in self.queue.iter().rev().take_while(|s| s.tx_end > now) {
            held += s.data.len();
            space_at = Some(s.tx_end);
        }
        held += self
            .queue
            .iter()
            .take_while(|s| s.deliver_at <= now)
            .map(|s| s.data.len())
            .sum::<usize>();
        (held, space_at)
    }
}

/// Time to serialize `bytes` at `kbps` (1 kbit/s = 1000 bit/s), rounded up to the nanosecond.
fn transmission_time(bytes: usize, kbps: u32) -> Duration {
    let bits_x_1e6 = bytes as u128 * 8 * 1_000_000;
    let ns = bits_x_1e6.div_ceil(u128::from(kbps.max(1)));
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

/// SplitMix64: spreads a seed so that nearby seeds give unrelated streams.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::Rng;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// 3g-slow's rates and delay with no radio, loss, jitter, NAT or handovers.
    fn flat() -> LinkProfile {
        LinkProfile {
            down_kbps: Some(400),
            up_kbps: Some(400),
            delay_ms: 200,
            ..LinkProfile::unshaped("flat")
        }
    }

    type Delivery = (Duration, Direction, Bytes);

    /// Plays `script` (offers at offsets from `t0`) against `link`, stepping time only to the
    /// script's instants and to `next_event`, until `end`. Returns deliveries and events with
    /// times relative to `t0`.
    fn drive(
        link: &mut Link,
        t0: Instant,
        script: &[(Duration, Direction, Vec<u8>)],
        end: Duration,
    ) -> (Vec<Delivery>, Vec<LinkEvent>) {
        let mut script: VecDeque<_> = script.iter().collect();
        let (mut deliveries, mut events) = (Vec::new(), Vec::new());
        let mut now = t0;
        for _ in 0..1_000_000 {
            while let Some((at, dir, bytes)) = script.front() {
                if t0 + *at > now {
                    break;
                }
                link.offer(*dir, now, bytes);
                script.pop_front();
            }
            for dir in Direction::BOTH {
                while let Some(b) = link.poll_deliver(dir, now) {
                    deliveries.push((now - t0, dir, b));
                }
            }
            events.extend(link.poll_event(now));
            let next = [script.front().map(|s| t0 + s.0), link.next_event(now)]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(t) if t <= t0 + end => {
                    assert!(t > now, "next_event must move on after the loop caught up");
                    now = t;
                }
                _ => return (deliveries, events),
            }
        }
        panic!("too many steps");
    }

    fn concat(deliveries: &[Delivery], dir: Direction) -> Vec<u8> {
        deliveries
            .iter()
            .filter(|d| d.1 == dir)
            .flat_map(|d| d.2.iter().copied())
            .collect()
    }

    #[test]
    fn bandwidth_400kbps_carries_200kb_in_about_4s() {
        let t0 = Instant::now();
        let profile = LinkProfile {
            jitter_ms: 50,
            ..flat()
        };
        let mut link = Link::new(profile.clone(), 1, t0);
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let (mut sent, mut got) = (0, Vec::new());
        let (mut now, mut last, mut pushed_back) = (t0, t0, false);
        while got.len() < data.len() {
            let room = link.can_accept(Direction::Down, now);
            assert!(room <= DEFAULT_BUFFER_BYTES);
            pushed_back |= room == 0;
            let n = room.min(data.len() - sent);
            if n > 0 {
                link.offer(Direction::Down, now, &data[sent..sent + n]);
                sent += n;
            }
            while let Some(b) = link.poll_deliver(Direction::Down, now) {
                got.extend_from_slice(&b);
                last = now;
            }
            if got.len() < data.len() {
                let next = link.next_event(now).unwrap();
                assert!(next > now);
                now = next;
            }
        }
        assert_eq!(got, data);
        assert!(pushed_back, "the downlink never pushed back");
        // 200,000 B at 50,000 B/s is 4 s, plus the 200 ± 50 ms one-way delay.
        let transfer = (last - t0).as_secs_f64() - 0.2;
        eprintln!("200 KB took {transfer:.4} s after the delay");
        assert!((transfer - 4.0).abs() < 4.0 * 0.03, "took {transfer:.3} s");
    }

    #[test]
    fn one_way_delay_adds_to_a_small_message() {
        let t0 = Instant::now();
        let mut link = Link::new(flat(), 7, t0);
        let (d, _) = drive(
            &mut link,
            t0,
            &[(ms(10), Direction::Up, vec![1; 100])],
            Duration::from_secs(5),
        );
        // 100 B at 400 kbit/s is 2 ms, then 200 ms of delay.
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].0, ms(10 + 2 + 200));

        let unlimited = LinkProfile {
            delay_ms: 200,
            ..LinkProfile::unshaped("delay only")
        };
        let mut link = Link::new(unlimited.clone(), 7, t0);
        let (d, _) = drive(
            &mut link,
            t0,
            &[(ms(0), Direction::Down, vec![1; 100])],
            Duration::from_secs(5),
        );
        assert_eq!(d[0].0, ms(200));
    }

    #[test]
    fn unshaped_passes_bytes_through_at_once() {
        let t0 = Instant::now();
        let mut link = Link::new(LinkProfile::unshaped("unshaped"), 3, t0);
        let t = t0 + ms(1234);
        assert_eq!(link.can_accept(Direction::Down, t), DEFAULT_BUFFER_BYTES);
        let big = vec![9u8; 100_000];
        assert_eq!(
            link.offer(Direction::Down, t, &big),
            OfferOutcome::Scheduled
        );
        assert_eq!(link.next_event(t), Some(t));
        let got = link.poll_deliver(Direction::Down, t).unwrap();
        assert_eq!(got.len(), big.len(), "one chunk, not segments");
        assert_eq!(link.poll_deliver(Direction::Down, t), None);
        assert_eq!(link.next_event(t), None);
        assert_eq!(link.radio_state(t), RadioState::AlwaysOn);
    }

    #[test]
    fn umts_rrc_promotes_from_idle_and_carries_small_bursts_on_fach() {
        let t0 = Instant::now();
        let profile = LinkProfile {
            radio: RadioModel::UmtsRrc(UmtsRrc::default()),
            ..flat()
        };
        let mut link = Link::new(profile.clone(), 1, t0);
        let s = Duration::from_secs;
        assert_eq!(link.radio_state(t0 + s(1)), RadioState::Dch);
        assert_eq!(link.radio_state(t0 + s(6)), RadioState::Fach);
        assert_eq!(link.radio_state(t0 + s(30)), RadioState::Idle);

        // After 30 s idle, the first message waits the 2 s IDLE->DCH promotion.
        let (d, _) = drive(
            &mut link,
            t0,
            &[(s(30), Direction::Up, vec![1; 100])],
            s(33),
        );
        assert_eq!(d[0].0, s(32) + ms(2 + 200));
        assert_eq!(link.stats().promotions, 1);
        assert_eq!(link.radio_state(t0 + s(33)), RadioState::Dch);

        // A second one right after does not, whichever direction it goes.
        let mut link2 = link.clone();
        let (d, _) = drive(
            &mut link2,
            t0 + s(33),
            &[(ms(0), Direction::Down, vec![2; 100])],
            s(3),
        );
        assert_eq!(d[0].0, ms(2 + 200));
        assert_eq!(link2.stats().promotions, 1);

        // Nothing since 32.002 s: FACH from 37.002 s. A 100 B burst (under 543 B up) goes on
        // FACH at 32 kbit/s, 25 ms, without promotion, and the radio stays in FACH.
        let t1 = t0 + s(40);
        assert_eq!(link.radio_state(t1), RadioState::Fach);
        let (d, _) = drive(&mut link, t1, &[(ms(0), Direction::Up, vec![3; 100])], s(1));
        assert_eq!(d[0].0, ms(25 + 200));
        assert_eq!(link.stats().promotions, 1);
        assert_eq!(link.radio_state(t1 + ms(500)), RadioState::Fach);

        // A 2000 B burst in FACH is over the threshold: 1.5 s FACH->DCH promotion first.
        let t2 = t1 + s(1);
        let (d, _) = drive(
            &mut link,
            t2,
            &[(ms(0), Direction::Up, vec![4; 2000])],
            s(5),
        );
        assert_eq!(link.stats().promotions, 2);
        let last = d.last().unwrap().0;
        assert_eq!(last, ms(1500 + 40 + 200));

        // FACH's tail is counted from the FACH transfer (12 s), DCH's 5 s before it.
        let active_until = t2 + ms(1540);
        assert_eq!(link.radio_state(active_until + ms(4999)), RadioState::Dch);
        assert_eq!(link.radio_state(active_until + ms(5001)), RadioState::Fach);
        assert_eq!(
            link.radio_state(active_until + ms(17_001)),
            RadioState::Idle
        );
    }

    #[test]
    fn promotion_holds_both_directions() {
        let t0 = Instant::now();
        let profile = LinkProfile {
            radio: RadioModel::UmtsRrc(UmtsRrc::default()),
            ..flat()
        };
        let mut link = Link::new(profile.clone(), 1, t0);
        let t = t0 + Duration::from_secs(60);
        link.offer(Direction::Up, t, &[1; 10]);
        assert!(matches!(
            link.radio_state(t + ms(100)),
            RadioState::Promoting { .. }
        ));
        link.offer(Direction::Down, t + ms(500), &[2; 10]);
        let (d, _) = drive(&mut link, t, &[], Duration::from_secs(5));
        let down = d.iter().find(|d| d.1 == Direction::Down).unwrap();
        // Waits for the promotion started by the uplink (done at +2 s), not for a new one.
        assert!(down.0 >= ms(2000 + 200) && down.0 < ms(2000 + 210));
        assert_eq!(link.stats().promotions, 1);
    }

    #[test]
    fn lte_downlink_from_idle_waits_for_paging_then_promotion() {
        let t0 = Instant::now();
        let profile = LinkProfile {
            radio: RadioModel::Lte(LteRadio::default()),
            delay_ms: 30,
            ..LinkProfile::unshaped("lte-ish")
        };
        for seed in 0..20 {
            let mut link = Link::new(profile.clone(), seed, t0);
            let t = t0 + Duration::from_secs(20);
            assert_eq!(link.radio_state(t), RadioState::Idle);
            let mut up = link.clone();
            let (d, _) = drive(&mut up, t, &[(ms(0), Direction::Up, vec![1])], ms(5000));
            assert_eq!(d[0].0, ms(260 + 30));
            let (d, _) = drive(&mut link, t, &[(ms(0), Direction::Down, vec![1])], ms(5000));
            assert!(d[0].0 >= ms(260 + 30) && d[0].0 < ms(1280 + 260 + 30));
        }
    }

    #[test]
    fn loss_stalls_each_segment_by_a_doubling_rto() {
        let t0 = Instant::now();
        let lossy = LinkProfile {
            loss: 1.0,
            ..flat()
        };
        let script = [(ms(0), Direction::Down, vec![5; 3 * 1400])];
        let (d, _) = drive(
            &mut Link::new(lossy.clone(), 1, t0),
            t0,
            &script,
            ms(20_000),
        );
        let times: Vec<_> = d.iter().map(|d| d.0).collect();
        // 1400 B at 400 kbit/s is 28 ms; stalls of 1 s, 2 s, 4 s; 200 ms delay.
        assert_eq!(times, [ms(1028 + 200), ms(3056 + 200), ms(7084 + 200)]);
        assert_eq!(concat(&d, Direction::Down), script[0].2);

        let (d, _) = drive(&mut Link::new(flat(), 1, t0), t0, &script, ms(20_000));
        let times: Vec<_> = d.iter().map(|d| d.0).collect();
        assert_eq!(times, [ms(228), ms(256), ms(284)]);

        // The RTO is capped.
        let capped = LinkProfile {
            max_rto_ms: 4000,
            ..lossy
        };
        let script = [(ms(0), Direction::Up, vec![5; 5 * 1400])];
        let mut link = Link::new(capped.clone(), 1, t0);
        let (d, _) = drive(&mut link, t0, &script, ms(60_000));
        let times: Vec<_> = d.iter().map(|d| d.0).collect();
        let stalls = [1000, 2000, 4000, 4000, 4000];
        let mut expect = Vec::new();
        let mut busy = 0;
        for stall in stalls {
            busy += stall + 28;
            expect.push(ms(busy + 200));
        }
        assert_eq!(times, expect);
        assert_eq!(link.stats().up.lost_segments, 5);
    }

    #[test]
    fn rto_resets_after_a_segment_gets_through() {
        let t0 = Instant::now();
        let profile = LinkProfile {
            loss: 0.5,
            ..flat()
        };
        let mut link = Link::new(profile.clone(), 11, t0);
        link.offer(Direction::Up, t0, &vec![0; 400 * 1400]);
        // Replay the stalls from the delivery schedule: a gap of 1 s after a clean segment,
        // and doubling gaps only after lost ones.
        let lane = &link.lanes[0];
        let mut prev = t0;
        let mut expected_rto = ms(1000);
        let mut saw_reset = false;
        for s in &lane.queue {
            let gap = s.tx_end - prev - ms(28);
            if gap.is_zero() {
                saw_reset |= expected_rto > ms(1000);
                expected_rto = ms(1000);
            } else {
                assert_eq!(gap, expected_rto);
                expected_rto = (expected_rto * 2).min(ms(60_000));
            }
            prev = s.tx_end;
        }
        assert!(saw_reset);
    }

    #[test]
    fn nat_blackholes_an_idle_flow_and_keepalives_keep_it() {
        let t0 = Instant::now();
        let profile = LinkProfile {
            nat_idle_timeout_s: Some(300),
            ..flat()
        };
        let mut link = Link::new(profile.clone(), 1, t0);
        // A ping every 60 s for 20 minutes, answered: never blackholed.
        let s = Duration::from_secs;
        let mut script = Vec::new();
        for i in 1..=20 {
            script.push((s(60 * i), Direction::Up, vec![0xAA; 2]));
            script.push((s(60 * i) + ms(500), Direction::Down, vec![0xBB; 2]));
        }
        let (d, events) = drive(&mut link, t0, &script, s(20 * 60 + 1));
        assert!(events.is_empty());
        assert_eq!(d.len(), 40);
        let last_activity = t0 + s(1200) + ms(500 + 200) + Duration::from_micros(40);
        assert_eq!(link.state(last_activity + s(299)), LinkState::Open);

        // Then silence: dead 300 s after the last byte, reported once.
        assert_eq!(link.next_event(t0 + s(1201)), Some(last_activity + s(300)));
        let dead = last_activity + s(300);
        assert!(link.is_blackholed(dead));
        assert_eq!(link.can_accept(Direction::Down, dead), 0);
        assert_eq!(
            link.poll_event(dead + s(10)),
            Some(LinkEvent::Blackholed { at: dead })
        );
        assert_eq!(link.poll_event(dead + s(20)), None);
        // What is offered afterwards never comes out, either way.
        for dir in Direction::BOTH {
            assert_eq!(
                link.offer(dir, dead + s(30), &[1; 100]),
                OfferOutcome::Swallowed
            );
        }
        let (d, events) = drive(&mut link, dead + s(30), &[], s(3600));
        assert!(d.is_empty() && events.is_empty());
        assert_eq!(link.next_event(dead + s(40)), None);
        assert!(link.is_blackholed(dead + s(100_000)));
        assert_eq!(link.stats().up.swallowed_bytes, 100);
        assert_eq!(link.stats().down.swallowed_bytes, 100);
    }

    fn handover_profile(drop_probability: f64) -> LinkProfile {
        LinkProfile {
            handover: Some(HandoverModel {
                mean_interval_s: 60,
                stall_min_ms: 1000,
                stall_max_ms: 3000,
                drop_probability,
            }),
            ..flat()
        }
    }

    #[test]
    fn handover_stalls_both_directions() {
        let t0 = Instant::now();
        let mut link = Link::new(handover_profile(0.0), 5, t0);
        let h = link.mobility.as_ref().unwrap().upcoming().next().unwrap();
        let stall = h.end - h.start;
        assert!(stall >= ms(1000) && stall <= ms(3000));
        // Offered during the stall: sent when it ends.
        link.offer(Direction::Up, h.start + ms(100), &[1; 100]);
        // In flight when the stall starts: delivered when it ends.
        link.offer(Direction::Down, h.start - ms(100), &[2; 100]);
        let mut up = None;
        let mut down = None;
        let mut now = h.start - ms(100);
        while up.is_none() || down.is_none() {
            now = link.next_event(now).unwrap();
            up = up.or(link.poll_deliver(Direction::Up, now).map(|_| now));
            down = down.or(link.poll_deliver(Direction::Down, now).map(|_| now));
        }
        assert_eq!(up, Some(h.end + ms(2 + 200)));
        assert_eq!(down, Some(h.end));
        assert_eq!(link.state(now), LinkState::Open);
    }

    #[test]
    fn handover_may_drop_the_connection() {
        let t0 = Instant::now();
        let mut link = Link::new(handover_profile(1.0), 5, t0);
        let h = link.mobility.as_ref().unwrap().upcoming().next().unwrap();
        assert_eq!(link.next_event(t0), Some(h.start));
        // Due before the drop: still delivered after it. Due after: gone.
        link.offer(Direction::Down, h.start - ms(500), &[1; 10]);
        link.offer(Direction::Down, h.start - ms(100), &[2; 10]);
        assert!(!link.is_dropped(h.start - ms(1)));
        assert!(link.is_dropped(h.start));
        let late = h.start + Duration::from_secs(10);
        // 10 B at 400 kbit/s: 200 µs.
        let first_due = h.start - ms(500) + Duration::from_micros(200) + ms(200);
        assert_eq!(link.next_event(late), Some(first_due));
        assert_eq!(link.poll_deliver(Direction::Down, late).unwrap()[0], 1);
        assert_eq!(link.poll_deliver(Direction::Down, late), None);
        assert_eq!(
            link.poll_event(late),
            Some(LinkEvent::Dropped { at: h.start })
        );
        assert_eq!(link.poll_event(late), None);
        assert_eq!(link.next_event(late), None);
        assert_eq!(
            link.offer(Direction::Up, late, &[3]),
            OfferOutcome::Swallowed
        );
        assert_eq!(link.can_accept(Direction::Up, late), 0);
        assert_eq!(link.stats().down.discarded_bytes, 10);
    }

    #[test]
    fn the_first_dropping_handover_ends_the_link_whatever_the_lookahead() {
        let t0 = Instant::now();
        for (seed, p) in [(1, 0.3), (2, 0.02), (3, 0.005), (4, 1.0)] {
            let mut link = Link::new(handover_profile(p), seed, t0);
            let fresh = link.mobility.clone().unwrap();
            let first = fresh
                .upcoming()
                .take(100_000)
                .find(|h| h.drops)
                .unwrap()
                .start;
            // An idle link wakes only at lookahead horizons and at the drop itself.
            let (d, events) = drive(&mut link, t0, &[], Duration::from_secs(10_000_000));
            assert!(d.is_empty());
            assert_eq!(events, [LinkEvent::Dropped { at: first }]);
            // A fresh link asked about a far instant, without stepping, agrees.
            let far = first + Duration::from_secs(1);
            let link = Link::new(handover_profile(p), seed, t0);
            assert_eq!(link.state(first - Duration::from_nanos(1)), LinkState::Open);
            assert_eq!(link.state(far), LinkState::Dropped);
        }
    }

    #[test]
    fn backpressure_bounds_the_queue_and_wakes_when_space_frees() {
        let t0 = Instant::now();
        let mut link = Link::new(flat(), 1, t0);
        link.offer(Direction::Down, t0, &vec![0; DEFAULT_BUFFER_BYTES + 10]);
        assert_eq!(link.can_accept(Direction::Down, t0), 0);
        assert_eq!(link.can_accept(Direction::Up, t0), DEFAULT_BUFFER_BYTES);
        // The first segment leaves the serializer after 28 ms: space for one segment.
        let wake = link.next_event(t0).unwrap();
        assert_eq!(wake, t0 + ms(28));
        assert!(link.can_accept(Direction::Down, wake) >= 1400 - 10);
        // Due but uncollected bytes count too: an event loop that stops collecting stops
        // being offered more.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(link.can_accept(Direction::Down, later), 0);
        let mut out = BytesMut::new();
        assert_eq!(
            link.deliver_into(Direction::Down, later, &mut out),
            DEFAULT_BUFFER_BYTES + 10
        );
        assert_eq!(
            link.can_accept(Direction::Down, later),
            DEFAULT_BUFFER_BYTES
        );
    }

    fn busy_script(seed: u64, n: usize) -> Vec<(Duration, Direction, Vec<u8>)> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut t = Duration::ZERO;
        (0..n)
            .map(|i| {
                t += ms(rng.random_range(0..20_000));
                let dir = if rng.random_bool(0.5) {
                    Direction::Up
                } else {
                    Direction::Down
                };
                let len = rng.random_range(1..3000);
                (t, dir, vec![i as u8; len])
            })
            .collect()
    }

    fn full_profile() -> LinkProfile {
        LinkProfile {
            name: "3g-like".into(),
            down_kbps: Some(780),
            up_kbps: Some(330),
            delay_ms: 100,
            jitter_ms: 30,
            loss: 0.05,
            radio: RadioModel::UmtsRrc(UmtsRrc::default()),
            nat_idle_timeout_s: Some(600),
            handover: Some(HandoverModel {
                mean_interval_s: 120,
                stall_min_ms: 1000,
                stall_max_ms: 3000,
                drop_probability: 0.0,
            }),
            ..LinkProfile::unshaped("x")
        }
    }

    #[test]
    fn same_seed_same_schedule_different_seed_different_jitter() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1000);
        let script = busy_script(1, 200);
        let end = Duration::from_secs(3600);
        let run = |seed: u64, start: Instant| {
            let (deliveries, events) = drive(
                &mut Link::new(full_profile(), seed, start),
                start,
                &script,
                end,
            );
            let events: Vec<_> = events
                .into_iter()
                .map(|e| match e {
                    LinkEvent::Blackholed { at } | LinkEvent::Dropped { at } => at - start,
                })
                .collect();
            (deliveries, events)
        };
        let a = run(42, t0);
        assert_eq!(a, run(42, t0));
        assert_eq!(
            a,
            run(42, t1),
            "the schedule depends on offsets, not the base"
        );
        let b = run(43, t0);
        assert_ne!(
            a.0.iter().map(|d| d.0).collect::<Vec<_>>(),
            b.0.iter().map(|d| d.0).collect::<Vec<_>>()
        );

        // Jitter alone differs by seed.
        let jitter_only = LinkProfile {
            jitter_ms: 50,
            ..flat()
        };
        let script = [(ms(0), Direction::Up, vec![0; 10])];
        let times = |seed| {
            drive(
                &mut Link::new(jitter_only.clone(), seed, t0),
                t0,
                &script,
                end,
            )
            .0[0]
                .0
        };
        assert_eq!(times(1), times(1));
        let distinct: std::collections::BTreeSet<_> = (0..10).map(times).collect();
        assert!(distinct.len() > 5);
        assert!(distinct.iter().all(|&t| t >= ms(150) && t <= ms(250 + 1)));
    }

    #[test]
    fn validate_names_the_field() {
        let mut p = flat();
        assert!(p.validate().is_ok());
        p.loss = 1.5;
        assert_eq!(p.validate().unwrap_err().field, "loss");
        p.loss = f64::NAN;
        assert_eq!(p.validate().unwrap_err().field, "loss");
        let mut p = handover_profile(0.0);
        if let Some(h) = &mut p.handover {
            h.stall_min_ms = 5000;
        }
        let e = p.validate().unwrap_err();
        assert_eq!(e.field, "handover.stall_min_ms");
        assert!(e.to_string().contains("\"flat\""), "{e}");
    }

    #[test]
    fn absurd_values_are_rejected_or_clamped_never_panic() {
        let absurd = LinkProfile {
            delay_ms: u64::MAX,
            jitter_ms: u64::MAX,
            loss: f64::NAN,
            nat_idle_timeout_s: Some(u64::MAX),
            initial_rto_ms: u64::MAX,
            max_rto_ms: 0,
            segment_bytes: 0,
            buffer_bytes: 0,
            down_kbps: Some(0),
            radio: RadioModel::Lte(LteRadio {
                promotion_ms: u64::MAX,
                tail_ms: u64::MAX,
                paging_cycle_ms: u64::MAX,
            }),
            handover: Some(HandoverModel {
                mean_interval_s: u64::MAX,
                stall_min_ms: u64::MAX,
                stall_max_ms: 0,
                drop_probability: f64::INFINITY,
            }),
            ..flat()
        };
        assert!(absurd.validate().is_err());
        let t0 = Instant::now();
        let mut link = Link::new(absurd.clone(), 1, t0);
        for dir in Direction::BOTH {
            link.offer(dir, t0, &[1; 3000]);
            let _ = link.can_accept(dir, t0);
        }
        let (d, _) = drive(&mut link, t0, &[], Duration::from_secs(10 * 86_400));
        assert_eq!(concat(&d, Direction::Up).len(), 3000);
        assert_eq!(concat(&d, Direction::Down).len(), 3000);
        let mut p = flat();
        p.nat_idle_timeout_s = Some(MAX_SECS + 1);
        assert_eq!(p.validate().unwrap_err().field, "nat_idle_timeout_s");
        let mut p = flat();
        p.radio = RadioModel::UmtsRrc(UmtsRrc {
            dch_tail_ms: MAX_MILLIS + 1,
            ..UmtsRrc::default()
        });
        assert_eq!(p.validate().unwrap_err().field, "radio.dch_tail_ms");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever the chunking, timing, jitter, loss, radio and handovers, each direction
        /// delivers exactly what was offered, in order, at non-decreasing times.
        #[test]
        fn jitter_never_reorders(
            seed in any::<u64>(),
            jitter_ms in 0u64..400,
            chunks in prop::collection::vec(
                (0u64..3000, any::<bool>(), 1usize..5000), 1..60),
            unshaped in any::<bool>(),
        ) {
            let profile = if unshaped {
                LinkProfile { jitter_ms, ..LinkProfile::unshaped("u") }
            } else {
                LinkProfile { jitter_ms, loss: 0.2, nat_idle_timeout_s: None, ..full_profile() }
            };
            let t0 = Instant::now();
            let mut t = Duration::ZERO;
            let mut counter = 0u32;
            let script: Vec<_> = chunks.iter().map(|&(gap, up, len)| {
                t += ms(gap);
                let bytes: Vec<u8> = (0..len).map(|_| { counter += 1; (counter % 251) as u8 }).collect();
                (t, if up { Direction::Up } else { Direction::Down }, bytes)
            }).collect();
            let mut link = Link::new(profile.clone(), seed, t0);
            let (d, events) = drive(&mut link, t0, &script, Duration::from_secs(100_000));
            prop_assert!(events.is_empty());
            for dir in Direction::BOTH {
                let offered: Vec<u8> = script.iter().filter(|s| s.1 == dir)
                    .flat_map(|s| s.2.iter().copied()).collect();
                prop_assert_eq!(concat(&d, dir), offered);
                let times: Vec<_> = d.iter().filter(|x| x.1 == dir).map(|x| x.0).collect();
                prop_assert!(times.windows(2).all(|w| w[0] <= w[1]));
            }
        }
    }
}
