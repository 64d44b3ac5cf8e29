//! Several loadgen processes against one relay (or cluster), where one process's descriptor
//! limit is the wall: `--shard i/n` runs the i-th of n disjoint parts of a population, and
//! `--merge` puts their JSON reports together into one verdict.
//!
//! Owns: the split and the merge. Must not touch: the run, the ledger.
//!
//! # What a shard is
//! Shard `i` of `n` runs the scenario scaled by `1/n` (so the n shards together hold the
//! whole population), with its own seed (`seed + i`) and run id (`<run id>-s<i>`). A room
//! therefore never spans two processes: every publisher and every receiver of a room are in
//! the same process, and that process's ledger checks every delivery against every
//! acknowledgement of the room, exactly as a single run does. Each shard has its own copy of
//! every channel (1/n of its subscribers, its full publish rate). The merged verdict passes
//! only if every shard's passed; counts are summed, and the latency percentiles come from
//! the shards' histograms merged (each report carries them, V2-serialized in base64), not
//! from averaging percentiles.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use base64::Engine;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde_json::{Value, json};

use crate::metrics::{Summary, histogram};
use crate::scenario::Scenario;

/// `i/n`: which part of the population this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// From 0.
    pub index: u32,
    /// How many processes share the population.
    pub count: u32,
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Shard> {
        let (i, n) = s.split_once('/').context("--shard: i/n, e.g. 0/4")?;
        let shard = Shard {
            index: i.trim().parse().context("--shard: i is not a number")?,
            count: n.trim().parse().context("--shard: n is not a number")?,
        };
        if shard.count == 0 || shard.index >= shard.count {
            bail!("--shard {s}: i must be below n (0/4 .. 3/4)");
        }
        Ok(shard)
    }
}

impl Shard {
    /// This shard's part of `scenario` (already scaled): `1/n` of its population, seed
    /// `seed + i`.
    pub fn part_of(&self, scenario: &Scenario) -> Scenario {
        let mut s = scenario.scaled(1.0 / f64::from(self.count));
        s.seed = s.seed.wrapping_add(u64::from(self.index));
        s
    }

    /// This shard's run id: `<base>-s<i>`.
    pub fn run_id(&self, base: &str) -> String {
        format!("{base}-s{}", self.index)
    }
}

/// A histogram as a report carries it.
pub fn encode_histogram(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    // Serializing into a Vec cannot fail for a histogram that exists.
    if V2Serializer::new().serialize(h, &mut bytes).is_err() {
        return String::new();
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn decode_histogram(text: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .context("a histogram is not base64")?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("a histogram does not decode: {e:?}"))
}

/// Adds every non-negative integer under `value` into `sums`, keyed by its dotted path.
fn add_numbers(sums: &mut BTreeMap<String, u64>, path: &str, value: &Value) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                add_numbers(sums, &format!("{path}.{k}"), v);
            }
        }
        Value::Number(n) => {
            if let Some(n) = n.as_u64() {
                *sums.entry(path.to_string()).or_default() += n;
            }
        }
        _ => {}
    }
}

/// The reports' counts, summed.
const SUMMED: [&str; 6] = [
    "counters",
    "api_counters",
    "publishes",
    "verification.summary",
    "verification.gaps",
    "verification.violations.counts",
];

/// Several shards' reports as one.
#[derive(Debug)]
pub struct Merged {
    /// Reports merged.
    pub shards: usize,
    /// Run ids, in order.
    pub run_ids: Vec<String>,
    /// Every shard passed.
    pub passed: bool,
    /// Phones of all shards.
    pub phones: u64,
    /// Summed counts by dotted path (`counters.delivered`, `verification.summary.pairs`).
    pub sums: BTreeMap<String, u64>,
    /// End-to-end latency of every shard's live deliveries.
    pub end_to_end: Histogram<u64>,
    /// What the relay added to them.
    pub relay_added: Histogram<u64>,
}

impl Merged {
    /// A summed count (0 if no report had it).
    pub fn sum(&self, path: &str) -> u64 {
        self.sums.get(path).copied().unwrap_or(0)
    }
}

/// Merges the JSON reports of a run's shards.
pub fn merge(reports: &[Value]) -> anyhow::Result<Merged> {
    if reports.is_empty() {
        bail!("--merge: no reports");
    }
    let mut m = Merged {
        shards: reports.len(),
        run_ids: Vec::new(),
        passed: true,
        phones: 0,
        sums: BTreeMap::new(),
        end_to_end: histogram(),
        relay_added: histogram(),
    };
    for (k, r) in reports.iter().enumerate() {
        let field = |path: &str| {
            r.pointer(path)
                .with_context(|| format!("report {k}: no {path}"))
        };
        m.passed &= field("/passed")?.as_bool().context("passed")?;
        m.phones += field("/phones")?.as_u64().context("phones")?;
        m.run_ids
            .push(field("/run_id")?.as_str().unwrap_or("?").to_string());
        for path in SUMMED {
            let pointer = format!("/{}", path.replace('.', "/"));
            add_numbers(&mut m.sums, path, field(&pointer)?);
        }
        for (name, into) in [
            ("end_to_end", &mut m.end_to_end),
            ("relay_added", &mut m.relay_added),
        ] {
            let text = field(&format!("/histograms/{name}"))?
                .as_str()
                .context("a histogram is not a string")?;
            into.add(decode_histogram(text)?)
                .map_err(|e| anyhow::anyhow!("report {k}: {name}: {e:?}"))?;
        }
    }
    Ok(m)
}

/// The merged verdict as text.
pub fn table(m: &Merged) -> String {
    let (e2e, relay) = (Summary::of(&m.end_to_end), Summary::of(&m.relay_added));
    let violations: u64 = m
        .sums
        .iter()
        .filter(|(k, _)| k.starts_with("verification.violations.counts."))
        .map(|(_, v)| v)
        .sum();
    let mut t = format!(
        "merged {} shard reports ({}): {} phones\n",
        m.shards,
        m.run_ids.join(", "),
        m.phones
    );
    t.push_str(&format!(
        "publishes: {} published, {} acknowledged, {} refused; {} delivered\n",
        m.sum("publishes.published"),
        m.sum("publishes.acked"),
        m.sum("publishes.refused"),
        m.sum("counters.delivered"),
    ));
    t.push_str(&format!(
        "latency of {} live deliveries, ms: end to end p50 {:.1} p99 {:.1} p99.9 {:.1}; \
         relay added p50 {:.1} p99 {:.1} p99.9 {:.1}\n",
        e2e.count, e2e.p50, e2e.p99, e2e.p999, relay.p50, relay.p99, relay.p999
    ));
    t.push_str(&format!(
        "verification: {} (phone, room) pairs, {} caught up, {} with silent loss; {} violations\n",
        m.sum("verification.summary.pairs"),
        m.sum("verification.summary.caught_up"),
        m.sum("verification.summary.silent_loss_pairs"),
        violations,
    ));
    t.push_str(if m.passed {
        "RESULT: PASS (every shard passed)\n"
    } else {
        "RESULT: FAIL (at least one shard failed: see its report)\n"
    });
    t
}

/// The merged verdict as JSON.
pub fn to_json(m: &Merged) -> Value {
    json!({
        "shards": m.shards,
        "run_ids": m.run_ids,
        "passed": m.passed,
        "phones": m.phones,
        "sums": m.sums,
        "latency_ms": {
            "end_to_end": Summary::of(&m.end_to_end),
            "relay_added": Summary::of(&m.relay_added),
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn report(passed: bool, phones: u64, delivered: u64, samples: &[u64]) -> Value {
        let mut h = histogram();
        for &s in samples {
            h.record(s).unwrap();
        }
        json!({
            "passed": passed,
            "phones": phones,
            "run_id": "r1-s0",
            "counters": {"delivered": delivered},
            "api_counters": {"published": 1},
            "publishes": {"published": 3, "acked": 2},
            "verification": {
                "summary": {"pairs": phones, "caught_up": phones, "silent_loss_pairs": 0},
                "gaps": {"gaps": 0, "retention_source": "known"},
                "violations": {"counts": {}, "messages": {}, "examples": []},
            },
            "histograms": {"end_to_end": encode_histogram(&h), "relay_added": encode_histogram(&h)},
        })
    }

    #[test]
    fn shards_split_the_population_with_their_own_seeds_and_run_ids() {
        let mut s = Scenario::default();
        s.population.phones = 1000;
        let shard: Shard = "1/4".parse().unwrap();
        let part = shard.part_of(&s);
        assert_eq!(part.population.phones, 250);
        assert_eq!(part.seed, s.seed + 1);
        assert_eq!(shard.run_id("rab"), "rab-s1");
        assert!("4/4".parse::<Shard>().is_err());
        assert!("1/0".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
    }

    #[test]
    fn the_merge_sums_counts_merges_histograms_and_fails_if_any_shard_failed() {
        let a = report(true, 10, 100, &[1000, 2000]);
        let b = report(true, 20, 300, &[3000, 40_000]);
        let m = merge(&[a.clone(), b]).unwrap();
        assert!(m.passed);
        assert_eq!(m.phones, 30);
        assert_eq!(m.sum("counters.delivered"), 400);
        assert_eq!(m.sum("publishes.acked"), 4);
        assert_eq!(m.sum("verification.summary.pairs"), 30);
        assert_eq!(m.end_to_end.len(), 4);
        assert!(
            m.end_to_end.max() >= 39_000,
            "the slow shard's tail is kept"
        );
        assert!(table(&m).contains("RESULT: PASS"));
        let failed = report(false, 5, 1, &[1]);
        let m = merge(&[a, failed]).unwrap();
        assert!(!m.passed);
        assert!(table(&m).contains("RESULT: FAIL"));
        assert!(
            merge(&[json!({"passed": true})]).is_err(),
            "a report without fields"
        );
        assert!(merge(&[]).is_err());
    }
}
