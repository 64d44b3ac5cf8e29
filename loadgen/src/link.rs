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
mod tests;
