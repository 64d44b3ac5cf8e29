//! The concrete population of a run: every phone, its link profile, its rooms and its sending
//! schedule, drawn deterministically from a [`Scenario`] and its seed.
//!
//! Owns: the choice of who is in which room, and room names and ids. Must not touch: sockets,
//! clocks, threads. The same scenario and seed always give the same plan, so runs are
//! reproducible and a failure names phones and rooms that exist in the next run too.
//! [`PlanBuilder`] builds small hand-made plans for tests.
//!
//! # Run isolation
//! [`Plan::namespace`] suffixes every room, channel and user name with `.RUN_ID`, so two runs
//! against one relay never share a room or a user: nothing an earlier run left in the relay
//! (memberships, history) reaches a later one. A suffix, not a prefix, so the relay's
//! retention overrides by name prefix still apply.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, bail};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

use crate::link::{LinkProfile, splitmix64};
use crate::profiles::{ProfileMix, catalog_with};
use crate::scenario::{Arrivals, Scenario, SizeKind};

/// Fan-out classes the report breaks latency down by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bucket {
    /// A 1:1 room.
    Direct,
    /// A group of at most 10.
    Group10,
    /// A group of 11 to 100.
    Group100,
    /// A group of 101 to 1000.
    Group1000,
    /// A group of more than 1000.
    GroupLarge,
    /// A broadcast channel.
    Channel,
}

impl Bucket {
    /// Every bucket, in report order.
    pub const ALL: [Bucket; 6] = [
        Bucket::Direct,
        Bucket::Group10,
        Bucket::Group100,
        Bucket::Group1000,
        Bucket::GroupLarge,
        Bucket::Channel,
    ];

    /// The bucket's position in [`Bucket::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The label in reports.
    pub fn label(self) -> &'static str {
        match self {
            Bucket::Direct => "1:1",
            Bucket::Group10 => "group <=10",
            Bucket::Group100 => "group <=100",
            Bucket::Group1000 => "group <=1000",
            Bucket::GroupLarge => "group >1000",
            Bucket::Channel => "channel",
        }
    }

    /// The bucket of a room with `members` receiving members.
    pub fn of(channel: bool, direct: bool, members: u32) -> Bucket {
        match (channel, direct, members) {
            (true, _, _) => Bucket::Channel,
            (false, true, _) => Bucket::Direct,
            (false, false, 0..=10) => Bucket::Group10,
            (false, false, 11..=100) => Bucket::Group100,
            (false, false, 101..=1000) => Bucket::Group1000,
            _ => Bucket::GroupLarge,
        }
    }
}

/// One room or channel.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomPlan {
    /// Its name on the wire.
    pub name: String,
    /// A broadcast channel (else a room).
    pub channel: bool,
    /// A 1:1 room.
    pub direct: bool,
    /// Its id (`pabal_codec::room_id`).
    pub id: u64,
    /// Members that receive its messages (channel publishers not counted).
    pub members: u32,
    /// Its fan-out class.
    pub bucket: Bucket,
}

/// Quiet periods of a publishing phone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuietPlan {
    /// Range of a quiet period, seconds.
    pub quiet_s: [f64; 2],
    /// Range of an active period, seconds.
    pub active_s: [f64; 2],
}

/// What and when a phone publishes.
#[derive(Debug, Clone, PartialEq)]
pub struct SendPlan {
    /// Messages per minute.
    pub per_min: f64,
    /// Spacing of the messages.
    pub arrivals: Arrivals,
    /// 1:1 rooms it writes to.
    pub direct: Vec<u32>,
    /// Groups (or the channel) it writes to.
    pub groups: Vec<u32>,
    /// Share of its messages that go to `groups` when it has both kinds.
    pub group_share: f64,
    /// Payload size, bytes.
    pub payload_bytes: usize,
    /// Stop after this many messages.
    pub max_count: Option<u64>,
    /// Quiet periods, if any.
    pub quiet: Option<QuietPlan>,
}

impl SendPlan {
    /// A plan that sends `per_min` messages of `payload_bytes` to `rooms` (as groups).
    pub fn to_rooms(rooms: &[u32], per_min: f64, payload_bytes: usize) -> SendPlan {
        SendPlan {
            per_min,
            arrivals: Arrivals::Poisson,
            direct: Vec::new(),
            groups: rooms.to_vec(),
            group_share: 1.0,
            payload_bytes,
            max_count: None,
            quiet: None,
        }
    }
}

/// One virtual phone (or a channel's publisher).
#[derive(Debug, Clone, PartialEq)]
pub struct PhonePlan {
    /// Its user id.
    pub user: String,
    /// Index into [`Plan::profiles`].
    pub profile: usize,
    /// Seed of its link, schedule and choices.
    pub seed: u64,
    /// Every room and channel it belongs to.
    pub rooms: Vec<u32>,
    /// Its publishing, if it publishes.
    pub send: Option<SendPlan>,
    /// A channel publisher: with a control API it publishes through the API and never
    /// connects; without one it is a client connection like the phones.
    pub publisher: bool,
    /// HELLO heartbeat wish for this phone, overriding the run's setting.
    pub heartbeat_s: Option<u32>,
}

/// The whole population.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Phones, then channel publishers.
    pub phones: Vec<PhonePlan>,
    /// Rooms and channels.
    pub rooms: Vec<RoomPlan>,
    /// The link profiles in use.
    pub profiles: Vec<Arc<LinkProfile>>,
    /// The same profiles without handovers or NAT expiry: links opened during the drain use
    /// them, so that every phone can settle and be verified.
    pub calm_profiles: Vec<Arc<LinkProfile>>,
    /// Room index by room id.
    pub room_by_id: HashMap<u64, u32>,
    /// Initial connections per second (phone `i` first connects at `i / connect_rate`).
    pub connect_rate: f64,
}

impl Plan {
    /// When phone `i` first connects, seconds after the start.
    pub fn connect_offset_s(&self, i: usize) -> f64 {
        i as f64 / self.connect_rate
    }

    /// Seconds until every phone has started connecting.
    pub fn ramp_s(&self) -> f64 {
        self.phones.len() as f64 / self.connect_rate
    }

    /// Suffixes every room, channel and user name with `.run_id` (see the module docs) and
    /// recomputes the room ids.
    pub fn namespace(&mut self, run_id: &str) -> anyhow::Result<()> {
        if run_id.is_empty() {
            return Ok(());
        }
        if !valid_run_id(run_id) {
            bail!("run id {run_id:?}: 1-32 of letters, digits, - and _");
        }
        for room in &mut self.rooms {
            room.name = format!("{}.{run_id}", room.name);
            room.id = pabal_codec::room_id(room.channel, &room.name);
        }
        self.room_by_id = self
            .rooms
            .iter()
            .enumerate()
            .map(|(i, r)| (r.id, i as u32))
            .collect();
        for phone in &mut self.phones {
            phone.user = format!("{}.{run_id}", phone.user);
        }
        check_ids(self)
    }

    /// The profile names, in [`Plan::profiles`] order.
    pub fn profile_names(&self) -> Vec<String> {
        self.profiles.iter().map(|p| p.name.clone()).collect()
    }

    /// Draws the population of `scenario` (already scaled).
    pub fn generate(scenario: &Scenario) -> anyhow::Result<Plan> {
        scenario.validate()?;
        let catalog = catalog_with(&scenario.profiles);
        let mix = ProfileMix::parse_with(&scenario.population.profiles, &catalog)
            .context("population.profiles")?;
        let mut b = PlanBuilder::new();
        b.connect_rate = scenario.population.connect_rate;
        let seed = scenario.seed;
        let mut rng = SmallRng::seed_from_u64(splitmix64(seed ^ 0x706c_616e));
        let n = scenario.population.phones as usize;
        let chat = &scenario.chat;
        // Phones first: their profile and whether they publish.
        for i in 0..n {
            let phone_seed = splitmix64(seed.wrapping_mul(0x9E37_79B9).wrapping_add(i as u64));
            let profile = mix.pick(phone_seed).clone();
            let sends = rng.random::<f64>() < chat.senders_share && chat.msgs_per_min > 0.0;
            let quiet = sends && rng.random::<f64>() < scenario.idle.share;
            let idx = b.phone_arc(format!("u{i}"), profile, &[], None);
            b.plan.phones[idx as usize].seed = phone_seed;
            if sends {
                b.plan.phones[idx as usize].send = Some(SendPlan {
                    per_min: chat.msgs_per_min,
                    arrivals: chat.arrivals,
                    direct: Vec::new(),
                    groups: Vec::new(),
                    group_share: chat.group_share,
                    payload_bytes: scenario.payload_bytes,
                    max_count: None,
                    quiet: quiet.then_some(QuietPlan {
                        quiet_s: scenario.idle.quiet_s,
                        active_s: scenario.idle.active_s,
                    }),
                });
            }
        }
        if n >= 2 {
            let pairs = (n as f64 * chat.direct_per_phone / 2.0).round() as usize;
            for k in 0..pairs {
                let a = rng.random_range(0..n);
                let mut c = rng.random_range(0..n - 1);
                if c >= a {
                    c += 1;
                }
                let room = b.room_kind(&format!("dm-{k}"), false, true);
                b.join(a as u32, room);
                b.join(c as u32, room);
            }
            let target = (n as f64 * chat.groups_per_phone).round() as usize;
            let g = &chat.group_size;
            let (lo, hi) = (g.min as usize, (g.max as usize).min(n).max(2));
            let zipf = Zipf::new((hi.saturating_sub(lo) + 1) as f64, g.exponent)
                .map_err(|e| anyhow::anyhow!("chat.group_size: {e}"))?;
            let mut assigned = 0;
            let mut k = 0;
            while assigned < target {
                let size = match g.distribution {
                    SizeKind::Fixed => lo,
                    SizeKind::Uniform => rng.random_range(lo..=hi.max(lo)),
                    SizeKind::Zipf => lo - 1 + zipf.sample(&mut rng) as usize,
                }
                .clamp(2, n);
                let room = b.room_kind(&format!("g-{k}"), false, false);
                for m in rand::seq::index::sample(&mut rng, n, size) {
                    b.join(m as u32, room);
                }
                assigned += size;
                k += 1;
            }
        }
        for ch in &scenario.channels {
            let room = b.room(&ch.name, true);
            let subs = (ch.subscribers as usize).min(n);
            if subs == n {
                for m in 0..n {
                    b.join(m as u32, room);
                }
            } else {
                for m in rand::seq::index::sample(&mut rng, n, subs) {
                    b.join(m as u32, room);
                }
            }
            let profile = catalog
                .iter()
                .find(|p| p.name == ch.publisher_profile)
                .with_context(|| {
                    format!(
                        "channel {:?}: unknown publisher_profile {:?}",
                        ch.name, ch.publisher_profile
                    )
                })?
                .clone();
            let mut send = SendPlan::to_rooms(
                &[room],
                ch.msgs_per_min,
                ch.payload_bytes.unwrap_or(scenario.payload_bytes),
            );
            send.arrivals = ch.arrivals;
            let p = b.phone(&format!("pub-{}", ch.name), profile, &[room], Some(send));
            b.plan.phones[p as usize].publisher = true;
        }
        // Chat phones write to the rooms they are in.
        for phone in &mut b.plan.phones {
            if phone.publisher {
                continue;
            }
            let rooms = &b.plan.rooms;
            if let Some(send) = &mut phone.send {
                for &r in &phone.rooms {
                    let room = &rooms[r as usize];
                    if room.channel {
                        continue;
                    }
                    if room.direct {
                        send.direct.push(r);
                    } else {
                        send.groups.push(r);
                    }
                }
            }
        }
        Ok(b.build())
    }
}

/// Builds a [`Plan`] by hand (tests, custom drivers).
#[derive(Debug)]
pub struct PlanBuilder {
    plan: Plan,
    /// Initial connections per second. Default 1000.
    pub connect_rate: f64,
}

impl Default for PlanBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PlanBuilder {
    /// An empty plan.
    pub fn new() -> Self {
        PlanBuilder {
            plan: Plan {
                phones: Vec::new(),
                rooms: Vec::new(),
                profiles: Vec::new(),
                calm_profiles: Vec::new(),
                room_by_id: HashMap::new(),
                connect_rate: 1000.0,
            },
            connect_rate: 1000.0,
        }
    }

    /// Adds a group room (`channel = false`) or a channel; returns its index.
    pub fn room(&mut self, name: &str, channel: bool) -> u32 {
        self.room_kind(name, channel, false)
    }

    fn room_kind(&mut self, name: &str, channel: bool, direct: bool) -> u32 {
        self.plan.rooms.push(RoomPlan {
            name: name.to_string(),
            channel,
            direct,
            id: pabal_codec::room_id(channel, name),
            members: 0,
            bucket: Bucket::Channel,
        });
        (self.plan.rooms.len() - 1) as u32
    }

    /// Adds a phone; returns its index. Its seed is its index until changed.
    pub fn phone(
        &mut self,
        user: &str,
        profile: LinkProfile,
        rooms: &[u32],
        send: Option<SendPlan>,
    ) -> u32 {
        self.phone_arc(user.to_string(), Arc::new(profile), rooms, send)
    }

    fn phone_arc(
        &mut self,
        user: String,
        profile: Arc<LinkProfile>,
        rooms: &[u32],
        send: Option<SendPlan>,
    ) -> u32 {
        let profile = match self.plan.profiles.iter().position(|p| **p == *profile) {
            Some(i) => i,
            None => {
                self.plan.profiles.push(profile);
                self.plan.profiles.len() - 1
            }
        };
        let idx = self.plan.phones.len() as u32;
        self.plan.phones.push(PhonePlan {
            user,
            profile,
            seed: u64::from(idx),
            rooms: rooms.to_vec(),
            send,
            publisher: false,
            heartbeat_s: None,
        });
        idx
    }

    /// Puts phone `phone` into room `room`.
    pub fn join(&mut self, phone: u32, room: u32) {
        let rooms = &mut self.plan.phones[phone as usize].rooms;
        if !rooms.contains(&room) {
            rooms.push(room);
        }
    }

    /// Sets a phone's HELLO heartbeat wish.
    pub fn heartbeat(&mut self, phone: u32, secs: u32) {
        self.plan.phones[phone as usize].heartbeat_s = Some(secs);
    }

    /// Finishes the plan: member counts, fan-out buckets, the id index, calm profiles.
    pub fn build(mut self) -> Plan {
        let plan = &mut self.plan;
        plan.connect_rate = self.connect_rate;
        for phone in &plan.phones {
            if phone.publisher {
                continue;
            }
            for &r in &phone.rooms {
                plan.rooms[r as usize].members += 1;
            }
        }
        for (i, room) in plan.rooms.iter_mut().enumerate() {
            room.bucket = Bucket::of(room.channel, room.direct, room.members);
            plan.room_by_id.insert(room.id, i as u32);
        }
        plan.calm_profiles = plan
            .profiles
            .iter()
            .map(|p| {
                let mut calm = (**p).clone();
                calm.handover = None;
                calm.nat_idle_timeout_s = None;
                Arc::new(calm)
            })
            .collect();
        self.plan
    }
}

/// A run id for [`Plan::namespace`]: 1-32 of letters, digits, `-` and `_`.
pub fn valid_run_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A fresh run id: `r` and 8 hex digits drawn from the clock and the process id.
pub fn fresh_run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mixed = crate::link::splitmix64(nanos ^ (u64::from(std::process::id()) << 40));
    format!("r{:08x}", mixed as u32)
}

/// Checks that no two rooms share an id (FNV collisions would confuse resume).
pub fn check_ids(plan: &Plan) -> anyhow::Result<()> {
    if plan.room_by_id.len() != plan.rooms.len() {
        bail!("two rooms of the plan share a room id; rename one");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn scenario(text: &str) -> Scenario {
        Scenario::parse(text).unwrap()
    }

    #[test]
    fn generation_is_deterministic_and_consistent() {
        let s = scenario(
            "[population]\nphones = 500\n[chat]\ndirect_per_phone = 2\ngroups_per_phone = 2\n\
             [[channel]]\nname = \"news\"\nsubscribers = 100",
        );
        let a = Plan::generate(&s).unwrap();
        let b = Plan::generate(&s).unwrap();
        assert_eq!(a.phones, b.phones);
        assert_eq!(a.rooms, b.rooms);
        check_ids(&a).unwrap();
        assert_eq!(a.phones.len(), 501, "500 phones and one channel publisher");
        let dms = a.rooms.iter().filter(|r| r.direct).count();
        assert_eq!(dms, 500);
        assert!(a.rooms.iter().filter(|r| r.direct).all(|r| r.members == 2));
        let news = &a.rooms[a.room_by_id[&pabal_codec::room_id(true, "news")] as usize];
        assert_eq!((news.members, news.bucket), (100, Bucket::Channel));
        let memberships: usize = a.phones.iter().map(|p| p.rooms.len()).sum();
        assert!(memberships >= 500 * 2 + 500 * 2 + 100, "{memberships}");
        // Senders write only to rooms they belong to.
        for p in &a.phones {
            if let Some(send) = &p.send {
                for r in send.direct.iter().chain(&send.groups) {
                    assert!(p.rooms.contains(r));
                }
            }
        }
    }

    #[test]
    fn a_different_seed_gives_a_different_population() {
        let a = Plan::generate(&scenario("seed = 1\n[population]\nphones = 100")).unwrap();
        let b = Plan::generate(&scenario("seed = 2\n[population]\nphones = 100")).unwrap();
        assert_ne!(a.rooms, b.rooms);
    }

    #[test]
    fn namespacing_renames_rooms_and_users_and_keeps_ids_consistent() {
        let mut p = Plan::generate(&scenario(
            "[population]\nphones = 20\n[[channel]]\nname = \"news\"\nsubscribers = 5",
        ))
        .unwrap();
        let before = p.clone();
        p.namespace("r1234abcd").unwrap();
        for (a, b) in p.rooms.iter().zip(&before.rooms) {
            assert_eq!(a.name, format!("{}.r1234abcd", b.name));
            assert_eq!(a.id, pabal_codec::room_id(a.channel, &a.name));
            assert_eq!(
                p.room_by_id[&a.id] as usize,
                p.rooms.iter().position(|r| r == a).unwrap()
            );
        }
        assert!(p.phones.iter().all(|ph| ph.user.ends_with(".r1234abcd")));
        assert!(p.clone().namespace("bad id").is_err());
        assert!(valid_run_id(&fresh_run_id()));
    }

    #[test]
    fn buckets_follow_member_counts() {
        assert_eq!(Bucket::of(false, true, 2), Bucket::Direct);
        assert_eq!(Bucket::of(false, false, 10), Bucket::Group10);
        assert_eq!(Bucket::of(false, false, 11), Bucket::Group100);
        assert_eq!(Bucket::of(false, false, 1000), Bucket::Group1000);
        assert_eq!(Bucket::of(false, false, 1001), Bucket::GroupLarge);
        assert_eq!(Bucket::of(true, false, 5), Bucket::Channel);
    }
}
