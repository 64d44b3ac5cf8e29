//! Named link profiles, TOML loading and weighted profile mixes.
//!
//! Owns the built-in profiles (`gprs`, `3g-slow`, `3g`, `hspa`, `lte`, `unshaped`) and the
//! rules for combining them with user profiles and choosing one per phone. The value and
//! source of every built-in number is in `loadgen/LINKS.md`; values marked "(guess)" there have
//! no published source and are defaults to tune. No I/O here: callers read files and pass text.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::Deserialize;

use crate::link::{
    GenericRadio, HandoverModel, InvalidProfile, LinkProfile, LteRadio, RadioModel, UmtsRrc,
    splitmix64,
};

/// The built-in profile names, slowest first.
pub const BUILTIN_NAMES: [&str; 6] = ["gprs", "3g-slow", "3g", "hspa", "lte", "unshaped"];

/// What went wrong loading profiles or parsing a mix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// A profile field is out of range.
    #[error(transparent)]
    Invalid(#[from] InvalidProfile),
    /// The TOML did not parse, or had an unknown or mistyped field.
    #[error("link profiles TOML: {0}")]
    Toml(#[from] toml::de::Error),
    /// Two profiles in one file share a name.
    #[error("link profile {0:?} is defined twice")]
    Duplicate(String),
    /// A mix names a profile that does not exist.
    #[error("unknown link profile {name:?} (known: {known})")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The names available, comma-separated.
        known: String,
    },
    /// A mix specification is malformed.
    #[error("profile mix {spec:?}: {problem}")]
    BadMix {
        /// The specification as given.
        spec: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// A built-in profile by name.
pub fn builtin(name: &str) -> Option<LinkProfile> {
    Some(match name {
        "gprs" => gprs(),
        "3g-slow" => three_g_slow(),
        "3g" => three_g(),
        "hspa" => hspa(),
        "lte" => lte(),
        "unshaped" => LinkProfile::unshaped("unshaped"),
        _ => return None,
    })
}

/// All built-in profiles, in [`BUILTIN_NAMES`] order.
pub fn builtins() -> Vec<LinkProfile> {
    BUILTIN_NAMES.iter().filter_map(|n| builtin(n)).collect()
}

fn shaped(name: &str, down_kbps: u32, up_kbps: u32, delay_ms: u64, jitter_ms: u64) -> LinkProfile {
    LinkProfile {
        down_kbps: Some(down_kbps),
        up_kbps: Some(up_kbps),
        delay_ms,
        jitter_ms,
        ..LinkProfile::unshaped(name)
    }
}

fn handover(
    mean_interval_s: u64,
    stall_min_ms: u64,
    stall_max_ms: u64,
    drop: f64,
) -> HandoverModel {
    HandoverModel {
        mean_interval_s,
        stall_min_ms,
        stall_max_ms,
        drop_probability: drop,
    }
}

/// 2G/GPRS: WebPageTest "2G" rates and latency, Facebook ATC 2G-DevelopingRural loss.
fn gprs() -> LinkProfile {
    LinkProfile {
        loss: 0.02,
        // (guess) 1 s promotion after 10 s idle.
        radio: RadioModel::Generic(GenericRadio {
            promotion_ms: 1000,
            idle_after_ms: 10_000,
        }),
        nat_idle_timeout_s: Some(5 * 60),
        // (guess) 2-8 s stall every 5 min; (guess) drop probability.
        handover: Some(handover(5 * 60, 2000, 8000, 0.3)),
        ..shaped("gprs", 35, 32, 650, 100)
    }
}

/// Slow 3G: Chrome DevTools "3G" (formerly "Slow 3G").
fn three_g_slow() -> LinkProfile {
    LinkProfile {
        loss: 0.01,
        radio: RadioModel::UmtsRrc(UmtsRrc::default()),
        nat_idle_timeout_s: Some(5 * 60),
        // (guess) 1-4 s stall every 10 min; (guess) drop probability.
        handover: Some(handover(10 * 60, 1000, 4000, 0.2)),
        ..shaped("3g-slow", 400, 400, 200, 50)
    }
}

/// Average 3G: WebPageTest 3GSlow / Facebook ATC 3G-Average.
fn three_g() -> LinkProfile {
    LinkProfile {
        loss: 0.005,
        radio: RadioModel::UmtsRrc(UmtsRrc::default()),
        // (guess) 10 min.
        nat_idle_timeout_s: Some(10 * 60),
        // (guess) 1-3 s stall every 15 min; (guess) drop probability.
        handover: Some(handover(15 * 60, 1000, 3000, 0.1)),
        // (guess) jitter 30 ms.
        ..shaped("3g", 780, 330, 100, 30)
    }
}

/// HSPA: WebPageTest "3G" rates, DevTools "Slow 4G" latency.
fn hspa() -> LinkProfile {
    LinkProfile {
        // (guess) 0.3 %.
        loss: 0.003,
        // PCH to DCH about 1 s, DCH kept up to 20 s.
        radio: RadioModel::Generic(GenericRadio {
            promotion_ms: 1000,
            idle_after_ms: 20_000,
        }),
        nat_idle_timeout_s: Some(30 * 60),
        // (guess) 0.5-2 s stall every 20 min; (guess) drop probability.
        handover: Some(handover(20 * 60, 500, 2000, 0.1)),
        ..shaped("hspa", 1600, 768, 75, 10)
    }
}

/// LTE: Chrome DevTools "Fast 4G".
fn lte() -> LinkProfile {
    LinkProfile {
        loss: 0.002,
        radio: RadioModel::Lte(LteRadio::default()),
        nat_idle_timeout_s: Some(30 * 60),
        // (guess) 0.1-0.5 s stall every 30 min; (guess) drop probability.
        handover: Some(handover(30 * 60, 100, 500, 0.05)),
        ..shaped("lte", 8100, 1350, 30, 5)
    }
}

/// Parses one profile from TOML (the fields of [`LinkProfile`] at top level) and validates it.
pub fn parse_profile(text: &str) -> Result<LinkProfile, ProfileError> {
    let profile: LinkProfile = toml::from_str(text)?;
    profile.validate()?;
    Ok(profile)
}

/// Parses a profiles file: any number of `[[profile]]` tables, each a [`LinkProfile`].
/// Every profile is validated and names must be unique within the file.
///
/// ```toml
/// [[profile]]
/// name = "3g-bad"
/// down_kbps = 300
/// up_kbps = 100
/// delay_ms = 300
/// loss = 0.05
/// radio = { model = "umts_rrc", idle_to_dch_ms = 3000 }
/// ```
pub fn parse_profiles(text: &str) -> Result<Vec<LinkProfile>, ProfileError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        profile: Vec<LinkProfile>,
    }
    let file: File = toml::from_str(text)?;
    for (i, p) in file.profile.iter().enumerate() {
        p.validate()?;
        if file.profile[..i].iter().any(|q| q.name == p.name) {
            return Err(ProfileError::Duplicate(p.name.clone()));
        }
    }
    Ok(file.profile)
}

/// The built-in profiles with `user` profiles added; a user profile replaces the built-in of
/// the same name.
pub fn catalog_with(user: &[LinkProfile]) -> Vec<LinkProfile> {
    let mut all: Vec<LinkProfile> = builtins()
        .into_iter()
        .filter(|b| !user.iter().any(|u| u.name == b.name))
        .collect();
    all.extend(user.iter().cloned());
    all
}

/// A weighted mix of profiles for a population of phones, such as
/// `"3g:40,hspa:30,lte:20,3g-slow:8,gprs:2"`. A name without `:weight` weighs 1, so `"lte"`
/// alone is a valid mix. Weights are relative (they need not sum to 100).
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileMix {
    entries: Vec<(Arc<LinkProfile>, u32)>,
    total: u64,
}

impl ProfileMix {
    /// Parses `spec` against the built-in profiles.
    pub fn parse(spec: &str) -> Result<Self, ProfileError> {
        Self::parse_with(spec, &builtins())
    }

    /// Parses `spec` against `catalog` (see [`catalog_with`]).
    pub fn parse_with(spec: &str, catalog: &[LinkProfile]) -> Result<Self, ProfileError> {
        let bad = |problem: String| ProfileError::BadMix {
            spec: spec.to_owned(),
            problem,
        };
        let mut entries: Vec<(Arc<LinkProfile>, u32)> = Vec::new();
        for item in spec.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(bad("empty entry".to_owned()));
            }
            let (name, weight) = match item.split_once(':') {
                Some((name, w)) => {
                    let w = w
                        .trim()
                        .parse::<u32>()
                        .map_err(|_| bad(format!("weight {w:?} of {name:?} is not a number")))?;
                    (name.trim(), w)
                }
                None => (item, 1),
            };
            if entries.iter().any(|(p, _)| p.name == name) {
                return Err(bad(format!("{name:?} appears twice")));
            }
            let profile =
                catalog
                    .iter()
                    .find(|p| p.name == name)
                    .ok_or_else(|| ProfileError::Unknown {
                        name: name.to_owned(),
                        known: catalog
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })?;
            entries.push((Arc::new(profile.clone()), weight));
        }
        let total = entries.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            return Err(bad("all weights are zero".to_owned()));
        }
        Ok(Self { entries, total })
    }

    /// A mix of one profile.
    pub fn single(profile: impl Into<Arc<LinkProfile>>) -> Self {
        Self {
            entries: vec![(profile.into(), 1)],
            total: 1,
        }
    }

    /// The profile for the phone with `seed`: the same seed always gets the same profile, and
    /// over many seeds each profile's share approaches its weight's share. Clone the `Arc` into
    /// [`crate::link::Link::new`].
    pub fn pick(&self, seed: u64) -> &Arc<LinkProfile> {
        // The modulo bias is below total / 2^64: nothing at these weights.
        let mut r = splitmix64(seed ^ 0x6d69_785f_7069_636b) % self.total;
        for (profile, weight) in &self.entries {
            let w = u64::from(*weight);
            if r < w {
                return profile;
            }
            r -= w;
        }
        // Unreachable: r < total, the sum of the weights. Fall back to the heaviest entry.
        self.entries
            .iter()
            .max_by_key(|(_, w)| *w)
            .map_or_else(|| &self.entries[0].0, |(p, _)| p)
    }

    /// The profiles and their weights, in the order given.
    pub fn entries(&self) -> impl Iterator<Item = (&LinkProfile, u32)> {
        self.entries.iter().map(|(p, w)| (&**p, *w))
    }
}

impl FromStr for ProfileMix {
    type Err = ProfileError;

    /// Same as [`ProfileMix::parse`] (built-in profiles only).
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        Self::parse(spec)
    }
}

impl fmt::Display for ProfileMix {
    /// Writes the mix back as a specification (`3g:40,lte:60`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (p, w)) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}:{}", p.name, w)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_valid_and_named() {
        let all = builtins();
        assert_eq!(all.len(), BUILTIN_NAMES.len());
        for (p, name) in all.iter().zip(BUILTIN_NAMES) {
            assert_eq!(p.name, name);
            p.validate().unwrap();
        }
        assert_eq!(builtin("nope"), None);
    }

    #[test]
    fn builtins_carry_the_design_table() {
        let row = |n: &str| {
            let p = builtin(n).unwrap();
            (
                p.down_kbps,
                p.up_kbps,
                p.delay_ms,
                p.jitter_ms,
                p.loss,
                p.nat_idle_timeout_s,
            )
        };
        assert_eq!(row("gprs"), (Some(35), Some(32), 650, 100, 0.02, Some(300)));
        assert_eq!(
            row("3g-slow"),
            (Some(400), Some(400), 200, 50, 0.01, Some(300))
        );
        assert_eq!(row("3g"), (Some(780), Some(330), 100, 30, 0.005, Some(600)));
        assert_eq!(
            row("hspa"),
            (Some(1600), Some(768), 75, 10, 0.003, Some(1800))
        );
        assert_eq!(
            row("lte"),
            (Some(8100), Some(1350), 30, 5, 0.002, Some(1800))
        );
        assert_eq!(row("unshaped"), (None, None, 0, 0, 0.0, None));
        assert_eq!(
            builtin("3g").unwrap().radio,
            RadioModel::UmtsRrc(UmtsRrc::default())
        );
        assert_eq!(
            builtin("lte").unwrap().radio,
            RadioModel::Lte(LteRadio::default())
        );
        let stalls = |n: &str| {
            let h = builtin(n).unwrap().handover.unwrap();
            (h.mean_interval_s, h.stall_min_ms, h.stall_max_ms)
        };
        assert_eq!(stalls("gprs"), (300, 2000, 8000));
        assert_eq!(stalls("3g-slow"), (600, 1000, 4000));
        assert_eq!(stalls("3g"), (900, 1000, 3000));
        assert_eq!(stalls("hspa"), (1200, 500, 2000));
        assert_eq!(stalls("lte"), (1800, 100, 500));
    }

    #[test]
    fn builtins_round_trip_through_toml() {
        for p in builtins() {
            let text = toml::to_string(&p).unwrap();
            assert_eq!(parse_profile(&text).unwrap(), p, "{text}");
        }
    }

    #[test]
    fn the_docs_list_every_builtin() {
        let doc = include_str!("../LINKS.md");
        for name in BUILTIN_NAMES {
            assert!(
                doc.contains(&format!("`{name}`")),
                "LINKS.md lacks `{name}`"
            );
        }
    }

    #[test]
    fn profiles_file_with_overrides() {
        let text = r#"
            [[profile]]
            name = "3g-bad"
            down_kbps = 300
            up_kbps = 100
            delay_ms = 300
            loss = 0.05
            radio = { model = "umts_rrc", idle_to_dch_ms = 3000 }
            handover = { mean_interval_s = 60, stall_min_ms = 100, stall_max_ms = 200 }

            [[profile]]
            name = "wifi"
            delay_ms = 5
            radio = { model = "generic", promotion_ms = 50, idle_after_ms = 200 }
        "#;
        let ps = parse_profiles(text).unwrap();
        assert_eq!(ps.len(), 2);
        let RadioModel::UmtsRrc(u) = &ps[0].radio else {
            panic!("not umts: {:?}", ps[0].radio)
        };
        assert_eq!(u.idle_to_dch_ms, 3000);
        assert_eq!(u.fach_to_dch_ms, UmtsRrc::default().fach_to_dch_ms);
        assert_eq!(ps[0].handover.as_ref().unwrap().drop_probability, 0.0);
        assert_eq!(ps[1].down_kbps, None);
        assert_eq!(ps[1].buffer_bytes, crate::link::DEFAULT_BUFFER_BYTES);

        let catalog = catalog_with(&ps);
        assert_eq!(catalog.len(), BUILTIN_NAMES.len() + 2);
        let mix = ProfileMix::parse_with("3g-bad:1,lte:1", &catalog).unwrap();
        assert_eq!(mix.entries().count(), 2);
    }

    #[test]
    fn a_user_profile_replaces_the_builtin_of_its_name() {
        let mine = LinkProfile {
            delay_ms: 999,
            ..builtin("lte").unwrap()
        };
        let catalog = catalog_with(std::slice::from_ref(&mine));
        assert_eq!(catalog.len(), BUILTIN_NAMES.len());
        assert_eq!(
            catalog.iter().find(|p| p.name == "lte").unwrap().delay_ms,
            999
        );
    }

    #[test]
    fn bad_profiles_are_rejected_with_the_field_named() {
        let err = |text: &str| parse_profile(text).unwrap_err().to_string();
        assert!(err("name = \"x\"\ndelay = 5").contains("delay"));
        assert!(
            err("name = \"x\"\nradio = { model = \"umts_rrc\", idle_to_dch = 5 }")
                .contains("idle_to_dch")
        );
        assert!(err("name = \"x\"\nradio = { model = \"5g\" }").contains("5g"));
        assert!(
            err("name = \"x\"\nradio = { model = \"generic\", promotion_ms = 5 }")
                .contains("idle_after_ms")
        );
        assert!(
            err("name = \"x\"\nhandover = { mean_interval_s = 1, stall_min_ms = 1, stall_max_ms = 2, typo = 1 }")
                .contains("typo")
        );
        assert!(err("name = \"x\"\nloss = 2.0").contains("`loss`"));
        assert!(err("name = \"x\"\ndown_kbps = 0").contains("`down_kbps`"));
        assert!(err("down_kbps = 10").contains("name"));
        let dup = "[[profile]]\nname = \"a\"\n[[profile]]\nname = \"a\"\n";
        assert!(matches!(parse_profiles(dup), Err(ProfileError::Duplicate(n)) if n == "a"));
        let none = parse_profile("name = \"x\"\nradio = { model = \"none\" }").unwrap();
        assert_eq!(none.radio, RadioModel::None);
    }

    #[test]
    fn mix_parses_and_picks_by_weight() {
        let mix: ProfileMix = "3g:40,hspa:30,lte:20,3g-slow:8,gprs:2".parse().unwrap();
        assert_eq!(mix.to_string(), "3g:40,hspa:30,lte:20,3g-slow:8,gprs:2");
        let n = 100_000u64;
        let mut counts = std::collections::HashMap::new();
        for seed in 0..n {
            *counts.entry(mix.pick(seed).name.clone()).or_insert(0u64) += 1;
        }
        for (p, w) in mix.entries() {
            let share = counts[&p.name] as f64 / n as f64;
            let want = f64::from(w) / 100.0;
            assert!((share - want).abs() < 0.01, "{}: {share} vs {want}", p.name);
        }
        // The same seed always gets the same profile.
        assert_eq!(mix.pick(12345), mix.pick(12345));

        let one = ProfileMix::parse(" lte ").unwrap();
        assert_eq!(one.pick(7).name, "lte");
        assert_eq!(
            ProfileMix::single(builtin("gprs").unwrap()).pick(1).name,
            "gprs"
        );
        let zero_weight = ProfileMix::parse("lte:0,3g:1").unwrap();
        assert!((0..1000).all(|s| zero_weight.pick(s).name == "3g"));
    }

    #[test]
    fn bad_mixes_are_rejected() {
        let unknown = ProfileMix::parse("3g:1,5g:2").unwrap_err();
        assert!(matches!(&unknown, ProfileError::Unknown { name, .. } if name == "5g"));
        assert!(unknown.to_string().contains("3g-slow"), "{unknown}");
        for spec in ["", "3g:1,", "3g:x", "3g:-1", "3g:1,3g:2", "3g:0,lte:0"] {
            assert!(
                matches!(ProfileMix::parse(spec), Err(ProfileError::BadMix { .. })),
                "{spec:?} was accepted"
            );
        }
    }
}
