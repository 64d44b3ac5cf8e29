//! Scenario files: what a load run does, as TOML.
//!
//! Owns: the schema (every field optional, each with a documented default; unknown fields are
//! refused), validation that names the offending field, and `--scale`. Must not touch: I/O
//! other than reading the text the caller passes, sockets, threads. Turning a scenario into a
//! concrete population is [`crate::plan`]'s job.
//!
//! # Timeline of a run
//! ```text
//! 0 ── ramp-up ──> ramp end ── settle ──> steady start ── duration ──> publish end ── drain ──> stop
//!      phone i connects at i / connect_rate        events' at_s count from here      (early if settled)
//! ```
//! Phones publish from the steady start (or their first WELCOME, whichever is later) until
//! the publish end; then the drain waits for every phone to catch up, at most `drain_s`.
//!
//! # Scaling
//! `--scale F` multiplies the population (`population.phones`, each channel's `subscribers`)
//! and the population-level rates (`population.connect_rate`,
//! `relay.new_connections_per_second`), so a scaled run keeps the shape of the full one: the
//! same ramp-up duration, the same reconnect storm relative to the relay's accept rate.
//! Per-phone rates (messages per minute, drops per hour) and group sizes do not scale.

use serde::{Deserialize, Serialize};

use crate::gaps::Retention;
use crate::link::LinkProfile;
use crate::payload::HEADER_LEN;
use crate::verify::Thresholds;

/// A whole scenario file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// Name shown in reports. Default `"custom"`.
    pub name: String,
    /// Free text for people. Default empty.
    pub description: String,
    /// Seed of every random choice (population, schedules, links). Default 1.
    pub seed: u64,
    /// Length of the steady phase (publishing), seconds. Default 60.
    pub duration_s: f64,
    /// Longest wait after publishing stops for every phone to catch up, seconds. Default 10.
    pub drain_s: f64,
    /// Pause between the end of the ramp-up and the steady phase, so joins settle, seconds.
    /// Default 2.
    pub settle_s: f64,
    /// Payload size of every chat message, bytes (at least the 24-byte measurement header).
    /// Default 64.
    pub payload_bytes: usize,
    /// Who connects, on which links, and how phones keep their connections.
    pub population: Population,
    /// 1:1 and group chats.
    pub chat: Chat,
    /// Phones that go quiet for a while (they stop publishing; their radios fall asleep).
    pub idle: Idle,
    /// Connections dropped by the scenario itself, beyond the link model's handovers.
    pub drops: Drops,
    /// What is measured and how.
    pub measure: Measure,
    /// Broadcast channels, `[[channel]]`. Default none.
    #[serde(rename = "channel")]
    pub channels: Vec<ChannelSpec>,
    /// Events at fixed times, `[[event]]`. Default none.
    #[serde(rename = "event")]
    pub events: Vec<EventSpec>,
    /// Extra link profiles, `[[profile]]` (the schema of `loadgen/LINKS.md`); a profile with a
    /// built-in's name replaces it. Default none.
    #[serde(rename = "profile")]
    pub profiles: Vec<LinkProfile>,
    /// The relay `--spawn-relay` starts (against `--target`, a scenario that sets any of it
    /// is refused unless told to go on: see [`RelaySpec::cannot_apply`]).
    pub relay: RelaySpec,
    /// What the verdict tolerates, and the relay's retention when it cannot be read.
    pub verify: VerifySpec,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            name: "custom".into(),
            description: String::new(),
            seed: 1,
            duration_s: 60.0,
            drain_s: 10.0,
            settle_s: 2.0,
            payload_bytes: 64,
            population: Population::default(),
            chat: Chat::default(),
            idle: Idle::default(),
            drops: Drops::default(),
            measure: Measure::default(),
            channels: Vec::new(),
            events: Vec::new(),
            profiles: Vec::new(),
            relay: RelaySpec::default(),
            verify: VerifySpec::default(),
        }
    }
}

/// `[population]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Population {
    /// Chat phones (scaled). Channel publishers come on top. Default 1000.
    pub phones: u64,
    /// Link profile mix, `name:weight,...` (built-ins: gprs, 3g-slow, 3g, hspa, lte,
    /// unshaped). Default `"3g:40,hspa:30,lte:20,3g-slow:8,gprs:2"`.
    pub profiles: String,
    /// New connections per second during the ramp-up (scaled). Default 500.
    pub connect_rate: f64,
    /// Heartbeat interval each phone asks for in HELLO, seconds; 0 takes the relay's.
    /// Default 0.
    pub heartbeat_s: u32,
    /// A phone that has heard nothing for the granted heartbeat plus this long sends a PING.
    /// Default 30 (the relay's default heartbeat timeout).
    pub probe_after_s: f64,
    /// ...and reconnects if nothing arrives within this long after it. Default 10.
    pub probe_timeout_s: f64,
    /// Give up on a connection without WELCOME after this long, seconds. Default 15.
    pub handshake_timeout_s: f64,
    /// SO_RCVBUF of each phone's socket, bytes (the kernel doubles it); small, so that a
    /// phone whose link is full pushes back on the relay quickly. 0 keeps the kernel's.
    /// Default 16384.
    pub rcvbuf_bytes: usize,
    /// Send a cumulative ACK of what arrived at most this often, seconds; 0: only the acks
    /// that ride on publishes. Default 10.
    pub ack_interval_s: f64,
}

impl Default for Population {
    fn default() -> Self {
        Population {
            phones: 1000,
            profiles: "3g:40,hspa:30,lte:20,3g-slow:8,gprs:2".into(),
            connect_rate: 500.0,
            heartbeat_s: 0,
            probe_after_s: 30.0,
            probe_timeout_s: 10.0,
            handshake_timeout_s: 15.0,
            rcvbuf_bytes: 16 * 1024,
            ack_interval_s: 10.0,
        }
    }
}

/// `[chat]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Chat {
    /// Average number of 1:1 rooms a phone is in (each room has two phones). Default 2.
    pub direct_per_phone: f64,
    /// Average number of group rooms a phone is in. Default 1.
    pub groups_per_phone: f64,
    /// Group sizes (members, including the sender).
    pub group_size: SizeDist,
    /// Share of phones that publish (the rest only read). Default 1.
    pub senders_share: f64,
    /// Messages per minute each publishing phone sends, on its own schedule. Default 1.
    pub msgs_per_min: f64,
    /// Share of a phone's messages that go to its groups (the rest to its 1:1 rooms).
    /// Default 0.3.
    pub group_share: f64,
    /// `"poisson"` (exponential gaps) or `"uniform"` (fixed gaps, random phase).
    /// Default `"poisson"`.
    pub arrivals: Arrivals,
}

impl Default for Chat {
    fn default() -> Self {
        Chat {
            direct_per_phone: 2.0,
            groups_per_phone: 1.0,
            group_size: SizeDist::default(),
            senders_share: 1.0,
            msgs_per_min: 1.0,
            group_share: 0.3,
            arrivals: Arrivals::Poisson,
        }
    }
}

/// How a sender's messages are spaced in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arrivals {
    /// A Poisson process: exponential gaps.
    Poisson,
    /// Fixed gaps of 1/rate, starting at a random phase.
    Uniform,
}

/// `group_size = { distribution = "zipf", min = 3, max = 100, exponent = 1.1 }`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SizeDist {
    /// `"zipf"` (many small groups, a long tail of big ones), `"uniform"` or `"fixed"`
    /// (always `min`). Default `"zipf"`.
    pub distribution: SizeKind,
    /// Smallest group, members (at least 2). Default 3.
    pub min: u32,
    /// Largest group, members (capped at the population). Default 100.
    pub max: u32,
    /// Zipf exponent (> 0): higher means fewer big groups. Default 1.1.
    pub exponent: f64,
}

impl Default for SizeDist {
    fn default() -> Self {
        SizeDist {
            distribution: SizeKind::Zipf,
            min: 3,
            max: 100,
            exponent: 1.1,
        }
    }
}

/// The shape of [`SizeDist`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SizeKind {
    /// Zipf over `min..=max` (rank 1 is `min`).
    Zipf,
    /// Uniform over `min..=max`.
    Uniform,
    /// Always `min`.
    Fixed,
}

/// `[idle]`: quiet phones alternate active and quiet periods, each drawn uniformly from its
/// range; they publish only while active.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Idle {
    /// Share of publishing phones that have quiet periods. Default 0.
    pub share: f64,
    /// Range of a quiet period, seconds. Default `[30, 120]`.
    pub quiet_s: [f64; 2],
    /// Range of an active period, seconds. Default `[20, 60]`.
    pub active_s: [f64; 2],
}

impl Default for Idle {
    fn default() -> Self {
        Idle {
            share: 0.0,
            quiet_s: [30.0, 120.0],
            active_s: [20.0, 60.0],
        }
    }
}

/// `[drops]`: each phone's connection is dropped (closed with a reset, as a radio losing the
/// network) as a Poisson process, and comes back after a backoff, resuming.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Drops {
    /// Drops per phone per hour (on top of the link profile's handovers). Default 0.
    pub per_hour: f64,
    /// Reconnect after a drop after a uniform draw in this range, ms. Default `[500, 5000]`.
    pub backoff_ms: [u64; 2],
}

impl Default for Drops {
    fn default() -> Self {
        Drops {
            per_hour: 0.0,
            backoff_ms: [500, 5000],
        }
    }
}

/// `[measure]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Measure {
    /// A delivery counts as "first message after idle" when the sender's or the receiver's
    /// link carried nothing for this long before it, seconds: past the 3G radio's tails
    /// (DCH 5 s + FACH 12 s), so the radio had fallen asleep. Default 20.
    pub idle_threshold_s: f64,
}

impl Default for Measure {
    fn default() -> Self {
        Measure {
            idle_threshold_s: 20.0,
        }
    }
}

/// `[[channel]]`: a broadcast channel with one publisher (a brand's app server).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSpec {
    /// The channel's name (letters, digits, `-`, `_`, `.`, `:`).
    pub name: String,
    /// Subscribers, drawn from the chat phones (scaled, capped at the population).
    pub subscribers: u64,
    /// Broadcasts per minute. Default 6.
    #[serde(default = "default_broadcast_rate")]
    pub msgs_per_min: f64,
    /// Spacing of broadcasts. Default `"uniform"`.
    #[serde(default = "default_broadcast_arrivals")]
    pub arrivals: Arrivals,
    /// Payload of each broadcast, bytes. Default: the scenario's `payload_bytes`.
    #[serde(default)]
    pub payload_bytes: Option<usize>,
    /// Link profile of the publishing connection (without a control API the publisher is a
    /// client connection). Default `"unshaped"`: an app server in a data centre.
    #[serde(default = "default_publisher_profile")]
    pub publisher_profile: String,
}

fn default_broadcast_rate() -> f64 {
    6.0
}
fn default_broadcast_arrivals() -> Arrivals {
    Arrivals::Uniform
}
fn default_publisher_profile() -> String {
    "unshaped".into()
}

/// `[[event]]`: something that happens to many phones at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSpec {
    /// When, seconds after the steady phase starts.
    pub at_s: f64,
    /// What: `"drop"` closes the connections (as a cell outage would).
    pub kind: EventKind,
    /// Share of the phones affected, drawn per phone. Default 1.
    #[serde(default = "one")]
    pub share: f64,
    /// Each affected phone reconnects after a uniform draw in this range, ms. Default `[0, 0]`:
    /// all at once, a reconnect storm (the relay's GOAWAY(overload) hints then spread it).
    #[serde(default)]
    pub backoff_ms: [u64; 2],
}

fn one() -> f64 {
    1.0
}

/// The kinds of [`EventSpec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Close the connections with a reset; the phones come back after the backoff.
    Drop,
}

/// `[relay]`: settings of the relay `--spawn-relay` starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySpec {
    /// Relay worker threads; `--relay-workers` overrides it. Default 1.
    pub workers: usize,
    /// The relay's `limits.new_connections_per_second` (scaled). Default: the relay's.
    pub new_connections_per_second: Option<f64>,
    /// The relay's `shutdown.reconnect_spread` (GOAWAY retry hints spread), seconds.
    /// Default: the relay's.
    pub reconnect_spread_s: Option<f64>,
    /// Raw TOML appended to the generated relay configuration (sections other than
    /// `[control]`, `[log]` and the top level). Default empty.
    pub extra_toml: String,
}

impl Default for RelaySpec {
    fn default() -> Self {
        RelaySpec {
            workers: 1,
            new_connections_per_second: None,
            reconnect_spread_s: None,
            extra_toml: String::new(),
        }
    }
}

impl RelaySpec {
    /// The options set (away from their defaults) that only a relay loadgen starts itself can
    /// take: against a running relay (`--target`) they cannot apply.
    pub fn cannot_apply(&self) -> Vec<String> {
        let mut set = Vec::new();
        if self.workers != RelaySpec::default().workers {
            set.push(format!("relay.workers = {}", self.workers));
        }
        if let Some(v) = self.new_connections_per_second {
            set.push(format!("relay.new_connections_per_second = {v}"));
        }
        if let Some(v) = self.reconnect_spread_s {
            set.push(format!("relay.reconnect_spread_s = {v}"));
        }
        if !self.extra_toml.trim().is_empty() {
            set.push("relay.extra_toml".to_string());
        }
        set
    }
}

/// `[verify]`: thresholds of the verdict, and the retention to judge GAPs against when the
/// relay's server API cannot be asked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifySpec {
    /// Phones that may never get a WELCOME. Default 0.
    pub max_never_welcomed: u64,
    /// Memberships of welcomed phones that may never be bound. Default 0.
    pub max_never_bound: u64,
    /// Phones that may end unjudged (still receiving, or offline without a retry hint).
    /// Default 0.
    pub max_not_judged: u64,
    /// The relay's retention, `{ max_messages, max_bytes, max_age_s }`, for a `--target`
    /// relay without `--control`. Default: read from the server API when there is one, else
    /// the relay's defaults (1000 messages, 1 MiB, 24 h).
    pub retention: Option<Retention>,
}

impl VerifySpec {
    /// The thresholds.
    pub fn thresholds(&self) -> Thresholds {
        Thresholds {
            max_never_welcomed: self.max_never_welcomed,
            max_never_bound: self.max_never_bound,
            max_not_judged: self.max_not_judged,
        }
    }
}

/// A scenario field out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scenario: `{field}` {problem}")]
pub struct InvalidScenario {
    /// The field, dotted (`chat.group_size.max`).
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

/// What went wrong reading a scenario.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The TOML did not parse, or named an unknown field.
    #[error("scenario TOML: {0}")]
    Toml(#[from] toml::de::Error),
    /// A value is out of range.
    #[error(transparent)]
    Invalid(#[from] InvalidScenario),
}

impl Scenario {
    /// Parses and validates a scenario.
    pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        let scenario: Scenario = toml::from_str(text)?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Checks every range the types alone cannot.
    pub fn validate(&self) -> Result<(), InvalidScenario> {
        fn bad(field: &str, problem: &str) -> Result<(), InvalidScenario> {
            Err(InvalidScenario {
                field: field.into(),
                problem: problem.into(),
            })
        }
        let share = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
        let nonneg = |v: f64| v.is_finite() && v >= 0.0;
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let range = |r: [f64; 2]| nonneg(r[0]) && nonneg(r[1]) && r[0] <= r[1];
        if !positive(self.duration_s) {
            return bad("duration_s", "must be a positive number of seconds");
        }
        if !nonneg(self.drain_s) {
            return bad("drain_s", "must be >= 0");
        }
        if !nonneg(self.settle_s) {
            return bad("settle_s", "must be >= 0");
        }
        if self.payload_bytes < HEADER_LEN || self.payload_bytes > 60_000 {
            return bad(
                "payload_bytes",
                "must be 24 ..= 60000 (24: the measurement header)",
            );
        }
        let p = &self.population;
        if p.phones == 0 && self.channels.is_empty() {
            return bad("population.phones", "must be at least 1");
        }
        if p.phones > 10_000_000 {
            return bad("population.phones", "at most 10000000");
        }
        if !positive(p.connect_rate) {
            return bad(
                "population.connect_rate",
                "must be > 0 (connections per second)",
            );
        }
        for (field, v) in [
            ("population.probe_after_s", p.probe_after_s),
            ("population.ack_interval_s", p.ack_interval_s),
        ] {
            if !nonneg(v) {
                return bad(field, "must be >= 0");
            }
        }
        for (field, v) in [
            ("population.probe_timeout_s", p.probe_timeout_s),
            ("population.handshake_timeout_s", p.handshake_timeout_s),
        ] {
            if !positive(v) {
                return bad(field, "must be > 0");
            }
        }
        let c = &self.chat;
        if !nonneg(c.direct_per_phone) || c.direct_per_phone > 1000.0 {
            return bad("chat.direct_per_phone", "must be 0 ..= 1000");
        }
        if !nonneg(c.groups_per_phone) || c.groups_per_phone > 1000.0 {
            return bad("chat.groups_per_phone", "must be 0 ..= 1000");
        }
        if !share(c.senders_share) {
            return bad("chat.senders_share", "must be a share between 0 and 1");
        }
        if !share(c.group_share) {
            return bad("chat.group_share", "must be a share between 0 and 1");
        }
        if !nonneg(c.msgs_per_min) || c.msgs_per_min > 60_000.0 {
            return bad("chat.msgs_per_min", "must be 0 ..= 60000");
        }
        let g = &c.group_size;
        if g.min < 2 {
            return bad("chat.group_size.min", "must be at least 2");
        }
        if g.max < g.min {
            return bad("chat.group_size.max", "must be at least group_size.min");
        }
        if g.max > 100_000 {
            return bad("chat.group_size.max", "at most 100000");
        }
        if !positive(g.exponent) {
            return bad("chat.group_size.exponent", "must be > 0");
        }
        let i = &self.idle;
        if !share(i.share) {
            return bad("idle.share", "must be a share between 0 and 1");
        }
        if !range(i.quiet_s) || i.quiet_s[1] <= 0.0 {
            return bad(
                "idle.quiet_s",
                "must be [min, max] seconds with 0 <= min <= max, max > 0",
            );
        }
        if !range(i.active_s) || i.active_s[1] <= 0.0 {
            return bad(
                "idle.active_s",
                "must be [min, max] seconds with 0 <= min <= max, max > 0",
            );
        }
        if !nonneg(self.drops.per_hour) || self.drops.per_hour > 36_000.0 {
            return bad("drops.per_hour", "must be 0 ..= 36000");
        }
        if self.drops.backoff_ms[0] > self.drops.backoff_ms[1] {
            return bad("drops.backoff_ms", "must be [min, max] with min <= max");
        }
        if !nonneg(self.measure.idle_threshold_s) {
            return bad("measure.idle_threshold_s", "must be >= 0");
        }
        let mut names = std::collections::HashSet::new();
        for (k, ch) in self.channels.iter().enumerate() {
            let at = |f: &str| format!("channel[{k}].{f}");
            let valid_name = !ch.name.is_empty()
                && ch.name.len() <= 200
                && ch
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
            if !valid_name {
                return bad(&at("name"), "must be 1-200 of letters, digits, - _ . :");
            }
            if !names.insert(ch.name.as_str()) {
                return bad(&at("name"), "is used twice");
            }
            if !nonneg(ch.msgs_per_min) || ch.msgs_per_min > 60_000.0 {
                return bad(&at("msgs_per_min"), "must be 0 ..= 60000");
            }
            if let Some(n) = ch.payload_bytes
                && !(HEADER_LEN..=60_000).contains(&n)
            {
                return bad(&at("payload_bytes"), "must be 24 ..= 60000");
            }
        }
        for (k, e) in self.events.iter().enumerate() {
            let at = |f: &str| format!("event[{k}].{f}");
            if !nonneg(e.at_s) {
                return bad(&at("at_s"), "must be >= 0");
            }
            if !share(e.share) {
                return bad(&at("share"), "must be a share between 0 and 1");
            }
            if e.backoff_ms[0] > e.backoff_ms[1] {
                return bad(&at("backoff_ms"), "must be [min, max] with min <= max");
            }
        }
        for profile in &self.profiles {
            if let Err(e) = profile.validate() {
                return bad(&format!("profile.{}", e.field), &e.to_string());
            }
        }
        let r = &self.relay;
        if r.workers == 0 || r.workers > 1024 {
            return bad("relay.workers", "must be 1 ..= 1024");
        }
        if r.new_connections_per_second.is_some_and(|v| !positive(v)) {
            return bad("relay.new_connections_per_second", "must be > 0");
        }
        if r.reconnect_spread_s.is_some_and(|v| !positive(v)) {
            return bad("relay.reconnect_spread_s", "must be > 0");
        }
        if let Some(ret) = &self.verify.retention {
            for (field, v) in [
                ("verify.retention.max_messages", ret.max_messages),
                ("verify.retention.max_bytes", ret.max_bytes),
                ("verify.retention.max_age_s", ret.max_age_s),
            ] {
                if v == 0 {
                    return bad(field, "must be > 0");
                }
            }
        }
        Ok(())
    }

    /// The scenario with its population and population-level rates multiplied by `scale`
    /// (see the module docs). Counts round to the nearest integer, at least 1 (or 2 phones
    /// where chats need pairs).
    pub fn scaled(&self, scale: f64) -> Scenario {
        let mut s = self.clone();
        if !(scale.is_finite() && scale > 0.0) || scale == 1.0 {
            return s;
        }
        let count = |n: u64| ((n as f64 * scale).round() as u64).max(1);
        if s.population.phones > 0 {
            s.population.phones = count(s.population.phones).max(2);
        }
        s.population.connect_rate *= scale;
        for ch in &mut s.channels {
            ch.subscribers = count(ch.subscribers);
        }
        if let Some(rate) = &mut s.relay.new_connections_per_second {
            *rate *= scale;
        }
        s
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn empty_text_is_the_default_scenario() {
        let s = Scenario::parse("").unwrap();
        assert_eq!(s, Scenario::default());
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let err = Scenario::parse("[chat]\nmsg_per_min = 3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("msg_per_min"), "{err}");
    }

    #[test]
    fn bad_values_name_their_field() {
        for (text, field) in [
            ("payload_bytes = 4", "payload_bytes"),
            ("[chat]\ngroup_share = 2.0", "chat.group_share"),
            (
                "[chat.group_size]\nmin = 10\nmax = 5",
                "chat.group_size.max",
            ),
            (
                "[[channel]]\nname = \"a b\"\nsubscribers = 5",
                "channel[0].name",
            ),
            (
                "[[event]]\nat_s = 1\nkind = \"drop\"\nshare = 3",
                "event[0].share",
            ),
            ("[[profile]]\nname = \"x\"\nloss = 7", "profile.loss"),
            (
                "[verify.retention]\nmax_messages = 0\nmax_bytes = 1\nmax_age_s = 1",
                "verify.retention.max_messages",
            ),
        ] {
            let err = Scenario::parse(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn scaling_shrinks_populations_and_population_rates_only() {
        let s = Scenario::parse(
            "[population]\nphones = 100000\nconnect_rate = 2000\n[chat]\nmsgs_per_min = 2\n\
             [[channel]]\nname = \"brand\"\nsubscribers = 100000\n\
             [relay]\nnew_connections_per_second = 1000",
        )
        .unwrap()
        .scaled(0.05);
        assert_eq!(s.population.phones, 5000);
        assert_eq!(s.channels[0].subscribers, 5000);
        assert!((s.population.connect_rate - 100.0).abs() < 1e-9);
        assert_eq!(s.relay.new_connections_per_second, Some(50.0));
        assert!((s.chat.msgs_per_min - 2.0).abs() < 1e-9);
    }

    #[test]
    fn relay_options_that_cannot_reach_a_running_relay_are_listed() {
        assert!(Scenario::default().relay.cannot_apply().is_empty());
        let s = Scenario::parse(
            "[relay]\nworkers = 1\nnew_connections_per_second = 2000\nreconnect_spread_s = 10",
        )
        .unwrap();
        let set = s.relay.cannot_apply();
        assert_eq!(set.len(), 2, "{set:?}");
        assert!(set[0].contains("new_connections_per_second"), "{set:?}");
        assert!(set[1].contains("reconnect_spread_s"), "{set:?}");
    }

    #[test]
    fn shipped_scenarios_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                Scenario::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 3);
    }
}
